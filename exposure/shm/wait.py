"""Wait strategies: what a stage does when its input ring is empty.

=================  =====================================  ==================================
strategy           latency after work arrives             cost while idle
=================  =====================================  ==================================
``spin``           the hand-off itself (~100 ns)           a whole core, always
``spin-then-block``the hand-off while spinning; a wake-up  a core for ``spins`` polls, then
                   (~22 us cross-core, NOTES.md) after     nothing
``block``          a wake-up every time (~22 us)           nothing
``sleep``          up to one tick (``tick_us``)            a wake-up per tick; the producer
                                                          never pays a wake-up (no flag)
=================  =====================================  ==================================

``sleep`` suits a stage whose latency does not matter at the microsecond scale and whose
producer is on the hot path: the journal, which fsyncs every couple of milliseconds anyway.

Never run more spinners than cores (NOTES.md: two spinners on one core turn p99 into
milliseconds). Blocking uses the ring's POSIX semaphore and the sleeping flag protocol of
:func:`exposure.shm.ring.announce_sleep`: announce, fence, re-check, then sleep; the producer
wakes a sleeper after publishing (:meth:`WaitStrategy.wake` from Python; the node's jitted
producers check :func:`exposure.shm.ring.sleeping` in the same call as the push), so no
wake-up is lost.
"""

from __future__ import annotations

import time

import posix_ipc

from exposure.shm.ring import Ring, RingReader, announce_sleep, clear_sleep, ring_size_at, sleeping
from exposure.shm.wait_names import WAIT_STRATEGIES

__all__ = ["WaitStrategy", "WAIT_STRATEGIES"]


class WaitStrategy:
    """Consumer side: call :meth:`idle` after a poll found nothing, :meth:`reset` after
    work. Producer side: call :meth:`wake` after publishing."""

    def __init__(self, kind: str = "spin-then-block", spins: int = 20_000,
                 timeout_s: float = 0.05, tick_s: float = 0.0005):
        if kind not in WAIT_STRATEGIES:
            raise ValueError(f"wait strategy {kind!r} is not one of {', '.join(WAIT_STRATEGIES)}")
        if spins < 0 or timeout_s <= 0:
            raise ValueError(f"spins={spins} must be >= 0 and timeout_s={timeout_s} > 0")
        self.kind = kind
        self.spins = 0 if kind == "block" else spins
        self.timeout_s = timeout_s
        self.tick_s = tick_s
        self._idle = 0

    def reset(self) -> None:
        self._idle = 0

    def idle(self, ring: Ring | RingReader) -> None:
        """Nothing to do on ``ring`` (a consumer's end: the ring for consumer 0, or its
        :meth:`Ring.reader`): spin, or sleep until the producer wakes us (or the timeout
        passes, so the caller can check for shutdown)."""
        self._idle += 1
        if self.kind == "sleep":
            time.sleep(self.tick_s)
            return
        if self.kind == "spin" or self._idle <= self.spins:
            return
        ctrl, word = ring.ctrl, ring.sleep_word
        announce_sleep(ctrl, word)
        try:
            if ring_size_at(ctrl, ring.head_word) == 0:
                try:
                    ring.semaphore.acquire(self.timeout_s)
                except posix_ipc.BusyError:
                    pass
        finally:
            clear_sleep(ctrl, word)

    @staticmethod
    def wake(ring: Ring) -> None:
        """After publishing to ``ring``: wake each consumer that announced sleep."""
        for k in range(ring.consumers):
            end = ring.reader(k)
            if sleeping(ring.ctrl, end.sleep_word):
                end.semaphore.release()

