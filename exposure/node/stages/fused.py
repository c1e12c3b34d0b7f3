"""Compute and the fan-out in one pass, when a process runs them one after the other.

In the default process map one spinning process runs ingest, compute and the fan-out
(``exposure.config.defaults``). Each stage's pass is one jitted call over its handle
(:mod:`exposure.shm.handle`); between compute's call and the fan-out's there was a return
to Python, the runner's loop, the fan-out's idle check and its role check, then a second
call: about 1 us an event at 20,000 events/s on this VM, a seventh of the node's excess
over the floor (docs/performance.md, the fifteenth session). :class:`ComputeFanout` keeps
both stages as they are and makes the pass that finds records on the compute ring one call:
compute's step, then the fan-out's pop, pack and send (:func:`_step_then_pack`), with the
fan-out's role decided before it (:meth:`FanoutStage.mode`). A pass that finds nothing for
compute is the fan-out's own (its rows held while fenced, heartbeats, the refresh cycle).

The two stages stay separate agents with their own rings. A batch of more rows than one
datagram holds, whose rows find the fan-out ring empty and fit it, does not go through it:
each row of a batch is a different row of the feed, so with nothing before them there is
nothing to conflate, and the fan-out sends them from compute's buffer
(:func:`exposure.node.stages.fanout.send_rows`: each datagram's header and its rows
gathered by the kernel, ``sendmmsg`` with two iovecs). That saves three copies of every row
(onto the ring, off it, into the datagram buffer) and the conflation's three lookups a row:
with the prefetches of the same session, the pass over batches of 4,096 events cost
0.67-0.76x its time before, in-process (docs/performance.md, the sixteenth session).
Otherwise (one datagram's rows, the path of an event at low rates; rows already waiting; a
batch larger than the ring; a fenced primary) the ring is written and read as before (a
batch's rows are conflated there, and rows left over when it was full go first next pass).
Either way what goes on the wire is the same, datagram for datagram (tests/test_fused.py).
:func:`fuse` is how the process builder (:mod:`exposure.node.process`) asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.node.stages.agent import Stage
from exposure.node.stages.compute import ComputeStage, step_pass
from exposure.node.stages.fanout import HOLD, SEND, FanoutStage, pack_pass, send_rows
from exposure.shm.handle import bind

__all__ = ["ComputeFanout", "fuse"]


@njit(cache=True)
def _step_then_pack(hc, hf, hd, per, epoch, seq, send):
    """Compute's step over its handle ``hc``, then the fan-out's pop, pack and (``send``)
    send over ``hf``, or, for a batch whose rows compute left in its buffer (the ring was
    empty and they are more than one datagram's ``per``), the fan-out's datagrams of them
    sent from there (``hd``): (compute's work, rows pending, fan-out asleep, rows popped or
    taken, datagrams, datagrams refused, the last refusal's errno)."""
    work, pending, asleep, taken = step_pass(hc, per)
    if taken > 0:
        n, d, refused, err = send_rows(hd, taken, epoch, seq, send)
    else:
        n, d, refused, err = pack_pass(hf, epoch, seq, send)
    return work, pending, asleep, n, d, refused, err


class ComputeFanout(Stage):
    """``compute`` and then ``fanout`` (its consumer, in the same process) as one stage."""

    def __init__(self, compute: ComputeStage, fanout: FanoutStage):
        if fanout.inp is not compute.out:
            raise ValueError("the fan-out does not read the compute stage's output ring")
        self.compute, self.fanout = compute, fanout
        self.name = f"{compute.name}+{fanout.name}"
        self.fed_by = compute.fed_by
        self.wake_source = compute.wake_source
        self._direct = fanout.direct(compute.row_words)
        self._call = bind(_step_then_pack, compute.handle, fanout.handle, self._direct,
                          fanout.per, 0, 0, True)
        self._fanout_poll = fanout.poll  # (bound once: the idle pass is most passes)

    @property
    def parts(self) -> tuple[Stage, ...]:
        return self.compute, self.fanout

    def poll(self) -> int:
        c = self.compute
        if not c.pending and c.tail[0] == c.head[0]:
            return self._fanout_poll()  # nothing for compute: the fan-out's own pass
        f = self.fanout
        mode = f.mode()
        if mode == HOLD:  # fenced: compute goes on until the fan-out ring is full
            return c.poll()
        work, pending, asleep, n, d, refused, err = self._call(
            c.handle, f.handle, self._direct, f.per, f.epoch, f.seq, mode == SEND)
        return c.stepped(work, pending, asleep) + f.packed(mode, n, d, refused, err)

    def close(self) -> None:
        self.compute.close()
        self.fanout.close()


def fuse(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` (a process's, in its map's order) with every compute stage that is
    directly followed by the fan-out reading its ring made one :class:`ComputeFanout`."""
    out: list[Stage] = []
    for s in stages:
        prev = out[-1] if out else None
        if (isinstance(s, FanoutStage) and isinstance(prev, ComputeStage)
                and s.inp is prev.out):
            out[-1] = ComputeFanout(prev, s)
        else:
            out.append(s)
    return out
