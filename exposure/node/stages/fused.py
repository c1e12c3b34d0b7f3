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

**Ingest's scan in the same call.** Where ingest runs just before them in the same process
and feeds compute's ring (the default map), :func:`fuse` also chains the two: each scan of
a connection's buffer is one jitted call that takes the frames onto the ring, then runs
compute's step and the fan-out's pack and send (:func:`_scan_step_pack`), so an event's
path from its receive stamp to its datagram has no return to Python in it. Between the
scan and compute's call there were its results boxed, ingest's bookkeeping, the runner's
loop, the fused stage's checks and a second entry: 2-3 us of the node's p50 at 20,000
events/s (docs/performance.md, the nineteenth session). Ingest's bookkeeping of what it
pushed (the sequence, the ACKs) follows the call; the rings between the stages are
unchanged (a scan that fills compute's ring leaves the rest to the fused stage's own pass,
which uses the same compiled call with nothing to scan). One read's first scan is
chained, the scans after a control frame in it are not (their records go in the fused
stage's pass, later in the same runner pass), so a flood of HEARTBEATs costs a scan each,
not a pass of every stage. A fenced primary's scans are ingest's own: compute goes on in
the fused stage's pass, the rows held.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.node.stages.agent import Stage
from exposure.node.stages.compute import ComputeStage, step_pass
from exposure.node.stages.fanout import HOLD, SEND, FanoutStage, pack_pass, send_rows
from exposure.node.stages.ingest import IngestStage, scan_bound
from exposure.shm.handle import Handle, bind

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


@njit(cache=True)
def _scan_step_pack(hi, b, pos, fill, session, held, gseq, hc, hf, hd, per, epoch, seq,
                    send):
    """Ingest's scan of the buffer ``b`` from ``pos`` to ``fill`` over its handle ``hi``
    (:func:`exposure.node.stages.ingest.scan_bound`), then :func:`_step_then_pack`: (the
    scan's results, the step's and pack's results). With ``pos == fill`` it is the fused
    stage's own pass."""
    got = scan_bound(hi, b, pos, fill, session, held, gseq)
    return got, _step_then_pack(hc, hf, hd, per, epoch, seq, send)


class ComputeFanout(Stage):
    """``compute`` and then ``fanout`` (its consumer, in the same process) as one stage;
    with ``ingest`` (the stage that runs just before them and feeds compute's ring), each
    of its scans runs this stage's pass in the same call (:meth:`scan_then_pass`)."""

    def __init__(self, compute: ComputeStage, fanout: FanoutStage,
                 ingest: IngestStage | None = None):
        if fanout.inp is not compute.out:
            raise ValueError("the fan-out does not read the compute stage's output ring")
        if ingest is not None and ingest.out is not compute.inp:
            raise ValueError("ingest does not feed the compute stage's input ring")
        self.compute, self.fanout = compute, fanout
        self.name = f"{compute.name}+{fanout.name}"
        self.fed_by = compute.fed_by
        self.wake_source = compute.wake_source
        self._direct = fanout.direct(compute.row_words)
        self._chained = ingest is not None
        if ingest is None:
            self._call = bind(_step_then_pack, compute.handle, fanout.handle, self._direct,
                              fanout.per, 0, 0, True)
        else:  # (one compiled entry for both passes: a scan's, and its own with nothing to scan)
            buf = np.zeros(8, np.uint8)
            self._ingest = ingest.handle
            self._empty = Handle(buf, buf.view(np.uint64))  # nothing to scan
            self._chain = bind(_scan_step_pack, ingest.handle, self._empty, 0, 0, 0, 0, 0,
                               compute.handle, fanout.handle, self._direct, fanout.per, 0,
                               0, True)
            ingest.down = self
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
        if self._chained:
            _, (work, pending, asleep, n, d, refused, err) = self._chain(
                self._ingest, self._empty, 0, 0, 0, 0, 0, c.handle, f.handle, self._direct,
                f.per, f.epoch, f.seq, mode == SEND)
        else:
            work, pending, asleep, n, d, refused, err = self._call(
                c.handle, f.handle, self._direct, f.per, f.epoch, f.seq, mode == SEND)
        return c.stepped(work, pending, asleep) + f.packed(mode, n, d, refused, err)

    def scan_then_pass(self, b: Handle, pos: int, fill: int, session: int, held: int,
                       gseq: int) -> tuple | None:
        """Ingest's scan (its arguments: the connection's buffer handle and scalars), then
        this stage's pass, in one call; returns the scan's results, or None when the
        fan-out holds its rows (a fenced primary: ingest scans on its own)."""
        f = self.fanout
        mode = f.mode()
        if mode == HOLD:
            return None
        c = self.compute
        got, (work, pending, asleep, n, d, refused, err) = self._chain(
            self._ingest, b, pos, fill, session, held, gseq, c.handle, f.handle,
            self._direct, f.per, f.epoch, f.seq, mode == SEND)
        c.stepped(work, pending, asleep)
        f.packed(mode, n, d, refused, err)
        return got

    def close(self) -> None:
        self.compute.close()
        self.fanout.close()


def fuse(stages: Sequence[Stage]) -> list[Stage]:
    """``stages`` (a process's, in its map's order) with every compute stage that is
    directly followed by the fan-out reading its ring made one :class:`ComputeFanout`,
    chained to the ingest stage directly before it that feeds its ring, if any."""
    out: list[Stage] = []
    for s in stages:
        prev = out[-1] if out else None
        if (isinstance(s, FanoutStage) and isinstance(prev, ComputeStage)
                and s.inp is prev.out):
            up = out[-2] if len(out) > 1 else None
            ingest = up if isinstance(up, IngestStage) and up.out is prev.inp else None
            out[-1] = ComputeFanout(prev, s, ingest)
        else:
            out.append(s)
    return out
