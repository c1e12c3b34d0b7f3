"""The one shape every stage has, and the one loop that runs a process's stages.

A **stage** is an agent with one duty cycle (Agrona's ``Agent``): :meth:`Stage.poll` does a
bounded amount of work and says how much; :meth:`Stage.after` runs once per pass after
every stage of the process has polled (answers that must not delay the pass's work, such as
ingest's ACKs); :meth:`Stage.close` releases what it holds. A stage also says where its
input comes from (``fed_by``: the stage that produces it, or None for a socket) and what
to sleep on when there is nothing to do (``wake_source``: its input ring's consumer end,
see :mod:`exposure.shm.wait`), and a stage that owns a selector may sleep in it
(:meth:`Stage.wait_io`).

:class:`Runner` is the process loop (Agrona's ``CompositeAgent`` with an ``IdleStrategy``):
it knows no particular stage. It polls them in order, calls their ``after``, and when a
whole pass did nothing it idles on the wake source of the first stage whose producer runs
in another process (a blocking process: or in the selector of a stage that has one), so
that work arriving from outside is what wakes it. It writes the process's progress counter
(the supervisor's stall detection) every 64 passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from exposure.shm.wait import WaitStrategy

__all__ = ["Stage", "Runner"]


class Stage:
    """Base of every stage: override :meth:`poll`; the rest has defaults."""

    name: str = "stage"
    fed_by: str | None = None  # the stage producing this one's input ring (None: a socket)
    wake_source = None         # the consumer end to sleep on (a Ring or RingReader)

    def poll(self) -> int:
        """Do a bounded amount of work; return how much (0: idle)."""
        raise NotImplementedError

    def after(self) -> None:
        """Once per pass, after every stage of the process has polled."""

    def wait_io(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` seconds in this stage's selector, doing the work that
        wakes it; False when the stage has none."""
        return False

    def close(self) -> None:
        """Release sockets, files and mappings."""

    @property
    def parts(self) -> tuple[Stage, ...]:
        """The stages this one runs (itself; a fused pair: both, :mod:`.fused`)."""
        return (self,)


class Runner:
    """The loop of one process over its ``stages`` (in order) until ``stop`` is set."""

    def __init__(self, stages: Sequence[Stage], wait: WaitStrategy,
                 progress: Callable[[int], None] = lambda beat: None):
        self.stages = list(stages)
        self.wait = wait
        self.progress = progress
        self.afters = [s for s in self.stages if type(s).after is not Stage.after]
        names = {p.name for s in self.stages for p in s.parts}
        # Where work from outside arrives: the first stage fed by another process.
        outside = [s for s in self.stages if s.fed_by is not None and s.fed_by not in names
                   and s.wake_source is not None]
        self.wake_source = outside[0].wake_source if outside else None
        io = [s for s in self.stages if type(s).wait_io is not Stage.wait_io]
        self.io = io[0] if io and wait.kind in ("spin-then-block", "block") else None

    def run(self, stop: list) -> None:
        # (bound methods, looked up once: an idle pass of the spinning process is a few
        # hundred bytecodes, and each lookup was a few percent of it)
        polls = [s.poll for s in self.stages]
        afters = [s.after for s in self.afters]
        wait, io, source = self.wait, self.io, self.wake_source
        # what a pass that did nothing does (decided once): nothing, for a spinning process
        sleep = wait.kind != "spin" and io is None and source is None
        beat = 1
        self.progress(beat)
        while not stop:
            beat += 1
            if not beat & 63:
                self.progress(beat)
            work = 0
            for poll in polls:
                work += poll()
            for after in afters:
                after()
            if work:
                wait.reset()
            elif io is not None:
                io.wait_io(0.001)  # sockets wake it
            elif source is not None:
                wait.idle(source)
            elif sleep:
                time.sleep(wait.tick_s)

    def close(self) -> None:
        for s in self.stages:
            s.close()
