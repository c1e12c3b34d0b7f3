"""Compute stage: the kernel over batches from the compute ring.

Per batch: apply under the state seqlock, publish the changed rows (row seqlocks), update
the session table (highest seq processed, rejects per reason) and push one feed row per
changed account, the fund, each changed instrument and sector onto the fan-out ring
(conflated: the batch's latest state of each, tagged with the event that last moved it;
exposure.engine.publish).
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    EVENT_DTYPE,
    INSTRUMENT_ROW_DTYPE,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
    W_GSEQ,
    W_RECV_NS,
)
from exposure.engine.kernel import apply_batch
from exposure.engine.publish import count_sessions, publish_batch, versions
from exposure.node.stages.agent import Stage
from exposure.shm import counters_layout as CN
from exposure.shm import ring_layout as RL
from exposure.shm.handle import Handle, bind, members
from exposure.shm.ring import ring_pop, ring_push, sleeping
from exposure.shm.seqlock import write_begin, write_end

__all__ = ["ComputeStage"]


_EVENTS = CN.INDEX["compute_events_total"]
_BATCHES = CN.INDEX["compute_batches_total"]
_ROWS = CN.INDEX["compute_rows_total"]
_RING_FULL = CN.INDEX["compute_ring_full_total"]
_GSEQ = CN.INDEX["compute_gseq"]
_RECV = CN.INDEX["compute_recv_ns"]


@njit(cache=True)
def _step(ictrl, islots, words, recs, status, st, seg_words, pver, iver, sver, cver, ctrver,
          sess_flat, ncols, rlog, arows, irows, srows, row_words, octrl, oslots, cnt, pend,
          now_ns):
    """Rows left on the fan-out ring's doorstep first (``pend``: how many, from which; the
    ring was full); then pop, apply under the state seqlock, publish, count, emit feed rows,
    push them, and count the batch into ``cnt`` (the counters segment): one entry from
    Python per pass.

    Returns (work done: records applied or rows pushed, rows still pending, fan-out
    consumer asleep)."""
    asleep = 0
    if pend[0] > 0:
        m = ring_push(octrl, oslots, row_words[pend[1]:], pend[0])
        pend[0] -= m
        pend[1] += m
        if m > 0 and sleeping(octrl, RL.W_CONSUMER_SLEEPING):
            asleep = 1
        if pend[0] > 0:
            return m, pend[0], asleep
    n = ring_pop(ictrl, islots, words, words.shape[0])
    if n == 0:
        return 0, 0, asleep
    r = recs[:n]
    s = status[:n]
    write_begin(seg_words)
    apply_batch(st, r, s)
    write_end(seg_words)
    m = publish_batch(st, pver, iver, sver, cver, ctrver, r, n, arows, irows, srows, now_ns)
    count_sessions(r, s, n, sess_flat, ncols, rlog)
    pushed = ring_push(octrl, oslots, row_words, m)
    if pushed > 0 and sleeping(octrl, RL.W_CONSUMER_SLEEPING):
        asleep = 1
    pend[0] = m - pushed
    pend[1] = pushed
    cnt[_EVENTS] += np.uint64(n)
    cnt[_BATCHES] += np.uint64(1)
    cnt[_ROWS] += np.uint64(m)
    cnt[_GSEQ] = words[n - 1, W_GSEQ]
    cnt[_RECV] = words[n - 1, W_RECV_NS]
    if pushed < m:
        cnt[_RING_FULL] += np.uint64(1)
    return n, m - pushed, asleep


@njit(cache=True)
def _step_bound(h, now_ns):
    """:func:`_step` over the arrays of the stage's :class:`exposure.shm.handle.Handle`."""
    return _step(*members(h), now_ns)


class ComputeStage(Stage):
    """Pops the compute ring, applies, publishes, pushes updates to the fan-out ring."""

    name = "compute"
    fed_by = "ingest"

    def __init__(self, segment, sessions: np.ndarray, in_ring, out_ring, batch: int = 4096,
                 counters: np.ndarray | None = None, rejects: np.ndarray | None = None):
        self.cnt = CN.or_private(counters)
        self.seg = segment
        self.st = segment.state
        self.vers = versions(self.st)
        self.sess_flat = sessions.reshape(-1)
        self.ncols = sessions.shape[1]
        # The reject log (exposure.shm.reject_layout), flat; none: an empty array.
        self.rlog = (rejects.reshape(-1) if rejects is not None
                     else np.zeros(0, np.uint64))
        self.inp, self.out = in_ring, out_ring
        self.wake_source = in_ring
        self.recs = np.zeros(batch, EVENT_DTYPE)
        self.words = self.recs.view(np.uint64).reshape(batch, -1)
        self.status = np.zeros(batch, np.uint8)
        st = self.st
        nrows = st.acc.shape[0] + 1 + st.inst.shape[0] + st.sec.shape[0]
        self.row_words = np.zeros((nrows, ROW_SIZE // 8), np.uint64)  # one batch's rows
        flat = self.row_words.reshape(-1)
        self.arows = flat.view(UPDATE_DTYPE)
        self.irows = flat.view(INSTRUMENT_ROW_DTYPE)
        self.srows = flat.view(SECTOR_ROW_DTYPE)
        self.pending = 0  # updates not yet on the fan-out ring (it was full)
        self.pend = np.zeros(2, np.int64)  # (how many, from which row): the jitted step's
        # Bound once: the per-pass call passes this handle and the clock, nothing else.
        self.handle = Handle(self.inp.ctrl, self.inp.slots, self.words, self.recs,
                             self.status, self.st, self.seg.words, *self.vers.args(),
                             self.sess_flat, self.ncols, self.rlog, self.arows, self.irows,
                             self.srows, self.row_words, self.out.ctrl, self.out.slots,
                             self.cnt, self.pend)
        # compiled (or loaded) now, before the node accepts sessions
        self._step = bind(_step_bound, self.handle, 0)
        # The idle check's two words as memoryviews (an index is half a numpy one's cost)
        self._tail = memoryview(self.inp.ctrl[RL.W_TAIL:])
        self._head = memoryview(self.inp.ctrl[RL.W_HEAD:])

    def poll(self) -> int:
        """One step; returns the work done (0 = idle)."""
        if not self.pending and self._tail[0] == self._head[0]:
            return 0  # nothing on the ring (a plain read: the jitted pop re-reads, acquire)
        work, self.pending, asleep = self._step(self.handle, time.time_ns())
        if asleep:
            self.out.semaphore.release()  # a fan-out process that sleeps on the ring
        return work

    def close(self) -> None:
        self.handle.close()
