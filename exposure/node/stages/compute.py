"""Compute stage: the kernel over batches from the compute ring.

Per batch: apply under the state seqlock, publish the changed rows (row seqlocks), update
the session table (highest seq processed, rejects per reason) and push one feed row per
changed account, the fund, each changed instrument and sector onto the fan-out ring
(conflated: the batch's latest state of each, tagged with the event that last moved it;
exposure.engine.publish), then (feed version 4) a limits row per moved account whose
limits changed and, with ``positions`` (``[fanout] positions``), a position row per moved
cell. A batch that moved more cells than the row buffer holds (``_POS_CHUNK``: a roll, a
mark of a widely held instrument) pushes its position rows in parts before the next batch
is taken.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    C_NCCHANGED,
    EVENT_DTYPE,
    INSTRUMENT_ROW_DTYPE,
    LIMITS_ROW_DTYPE,
    POSITION_ROW_DTYPE,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
    W_GSEQ,
    W_RECV_NS,
)
from exposure.engine.kernel import apply_batch
from exposure.engine.publish import (
    count_sessions,
    limit_rows,
    position_rows,
    publish_batch,
    versions,
)
from exposure.node.stages.agent import Stage
from exposure.shm import counters_layout as CN
from exposure.shm import ring_layout as RL
from exposure.shm.handle import Handle, bind, members
from exposure.shm.intrinsics import clock_realtime_ns
from exposure.shm.ring import ring_pop, ring_push, ring_size, sleeping
from exposure.shm.seqlock import write_begin, write_end

__all__ = ["ComputeStage", "step_pass"]


_EVENTS = CN.INDEX["compute_events_total"]
_BATCHES = CN.INDEX["compute_batches_total"]
_ROWS = CN.INDEX["compute_rows_total"]
_RING_FULL = CN.INDEX["compute_ring_full_total"]
_GSEQ = CN.INDEX["compute_gseq"]
_RECV = CN.INDEX["compute_recv_ns"]
# Position rows one pass puts in the row buffer at most (the rest of a batch's follow).
_POS_CHUNK = 65536
# pend: rows not yet pushed, from which row, the next cell to send, the batch's size (for
# the position rows' tags), whether position rows are sent.
_P_LEFT, _P_FROM, _P_CELL, _P_N, _P_ON = range(5)


@njit(cache=True, inline="always")
def _step(ictrl, islots, words, recs, status, st, seg_words, pver, iver, sver, cver, ctrver,
          sess_flat, ncols, rlog, arows, irows, srows, prows, lrows, lim_sent, row_words, octrl,
          oslots, cnt, pend, now_ns, direct):
    """Rows left on the fan-out ring's doorstep first (``pend``: how many, from which; the
    ring was full), then the batch's position rows that did not fit the buffer; then pop,
    apply under the state seqlock, publish, count, emit feed rows, push them, and count the
    batch into ``cnt`` (the counters segment): one entry from Python per pass.

    With ``direct`` > 0 (the fused pass, :mod:`exposure.node.stages.fused`: the rows of one
    datagram), a batch of more rows than that whose rows find the fan-out ring empty and
    fit it is not pushed: its caller sends them from ``row_words`` itself. Each row of a
    batch is a different row of the feed, so with nothing before them on the ring there is
    nothing to conflate, and the datagrams are those the fan-out would pack from the ring.
    (A batch of one datagram's rows takes the ring, whose copies cost next to nothing for
    a few rows, and goes by a plain ``send``: the path of an event at low rates.)

    Returns (work done: records applied or rows pushed, rows still pending, fan-out
    consumer asleep, the batch's rows left in ``row_words`` for the caller: 0 unless
    ``direct``)."""
    asleep = 0
    done = 0
    while True:
        if pend[_P_LEFT] > 0:
            m = ring_push(octrl, oslots, row_words[pend[_P_FROM]:], pend[_P_LEFT])
            pend[_P_LEFT] -= m
            pend[_P_FROM] += m
            done += m
            if m > 0 and sleeping(octrl, RL.W_CONSUMER_SLEEPING):
                asleep = 1
            if pend[_P_LEFT] > 0:
                return done, pend[_P_LEFT], asleep, 0
        if pend[_P_ON] == 0 or pend[_P_CELL] >= st.ctr[C_NCCHANGED]:
            break
        # the batch's next position rows (its cells are listed until the next batch)
        m, pend[_P_CELL] = position_rows(st, recs, pend[_P_N], arows, prows, 0,
                                         row_words.shape[0], pend[_P_CELL], now_ns)
        pend[_P_LEFT] = m
        pend[_P_FROM] = 0
        cnt[_ROWS] += np.uint64(m)
    if done > 0:
        return done, 0, asleep, 0
    n = ring_pop(ictrl, islots, words, words.shape[0])
    if n == 0:
        return 0, 0, asleep, 0
    r = recs[:n]
    s = status[:n]
    write_begin(seg_words)
    apply_batch(st, r, s)
    write_end(seg_words)
    m = publish_batch(st, pver, iver, sver, cver, ctrver, r, n, arows, irows, srows, now_ns)
    m = limit_rows(st, r, n, lim_sent, arows, lrows, m, now_ns)
    pend[_P_N] = n
    pend[_P_CELL] = 0
    if pend[_P_ON]:
        m, pend[_P_CELL] = position_rows(st, r, n, arows, prows, m, row_words.shape[0], 0,
                                         now_ns)
    else:
        pend[_P_CELL] = st.ctr[C_NCCHANGED]
    count_sessions(r, s, n, sess_flat, ncols, rlog)
    taken = 0
    if 0 < direct < m <= oslots.shape[0] and ring_size(octrl) == 0:
        taken = pushed = m  # the caller sends them (see above)
    else:
        pushed = ring_push(octrl, oslots, row_words, m)
        if pushed > 0 and sleeping(octrl, RL.W_CONSUMER_SLEEPING):
            asleep = 1
    pend[_P_LEFT] = m - pushed
    pend[_P_FROM] = pushed
    cnt[_EVENTS] += np.uint64(n)
    cnt[_BATCHES] += np.uint64(1)
    cnt[_ROWS] += np.uint64(m)
    cnt[_GSEQ] = words[n - 1, W_GSEQ]
    cnt[_RECV] = words[n - 1, W_RECV_NS]
    if pushed < m:
        cnt[_RING_FULL] += np.uint64(1)
    more = pend[_P_CELL] < st.ctr[C_NCCHANGED]  # position rows that did not fit
    return n, m - pushed + (1 if more else 0), asleep, taken


@njit(cache=True)
def step_pass(h, direct):
    """:func:`_step` over the arrays of the stage's :class:`exposure.shm.handle.Handle`,
    stamped with the clock read here (``CLOCK_REALTIME``, as ``time.time_ns()``).

    ``_step`` and the engine functions it calls are inlined here (numba's
    ``inline="always"``), so the state's named tuple of arrays is never passed by value
    to a call: one call with it costs its every array's fields as arguments (the
    one-event pass: 1.46 against 1.87 us, docs/performance.md). ``apply_batch`` stays a
    call: inlined too, it saved under 0.1 us for 12 s more of a cold compile. numba
    inlines no call with a starred argument, hence the names."""
    (ictrl, islots, words, recs, status, st, seg_words, pver, iver, sver, cver, ctrver,
     sess_flat, ncols, rlog, arows, irows, srows, prows, lrows, lim_sent, row_words, octrl,
     oslots, cnt, pend) = members(h)
    return _step(ictrl, islots, words, recs, status, st, seg_words, pver, iver, sver, cver,
                 ctrver, sess_flat, ncols, rlog, arows, irows, srows, prows, lrows, lim_sent,
                 row_words, octrl, oslots, cnt, pend, clock_realtime_ns(), direct)


class ComputeStage(Stage):
    """Pops the compute ring, applies, publishes, pushes updates to the fan-out ring."""

    name = "compute"
    fed_by = "ingest"

    def __init__(self, segment, sessions: np.ndarray, in_ring, out_ring, batch: int = 8192,
                 counters: np.ndarray | None = None, rejects: np.ndarray | None = None,
                 positions: bool = True, pos_chunk: int = _POS_CHUNK):
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
        # One batch's rows: accounts, the fund, instruments, sectors, limits, and up to
        # ``pos_chunk`` position rows (the rest of a batch's follow in parts).
        if pos_chunk < 1:
            raise ValueError(f"pos_chunk = {pos_chunk}: at least 1")
        nrows = (2 * st.acc.shape[0] + 1 + st.inst.shape[0] + st.sec.shape[0]
                 + (min(st.cells.shape[0], pos_chunk) if positions else 0))
        self.row_words = np.zeros((nrows, ROW_SIZE // 8), np.uint64)
        flat = self.row_words.reshape(-1)
        self.arows = flat.view(UPDATE_DTYPE)
        self.irows = flat.view(INSTRUMENT_ROW_DTYPE)
        self.srows = flat.view(SECTOR_ROW_DTYPE)
        self.prows = flat.view(POSITION_ROW_DTYPE)
        self.lrows = flat.view(LIMITS_ROW_DTYPE)
        self.lim_sent = np.zeros_like(st.acc_lim)  # the limits last sent, per account
        self.pending = 0  # updates not yet on the fan-out ring (it was full)
        self.pend = np.zeros(5, np.int64)  # (_P_*): the jitted step's
        self.pend[_P_ON] = 1 if positions else 0
        # Bound once: the per-pass call passes this handle and the clock, nothing else.
        self.handle = Handle(self.inp.ctrl, self.inp.slots, self.words, self.recs,
                             self.status, self.st, self.seg.words, *self.vers.args(),
                             self.sess_flat, self.ncols, self.rlog, self.arows, self.irows,
                             self.srows, self.prows, self.lrows, self.lim_sent,
                             self.row_words, self.out.ctrl, self.out.slots,
                             self.cnt, self.pend)
        # compiled (or loaded) now, before the node accepts sessions
        self._step = bind(step_pass, self.handle, 0)
        # The idle check's two words of the input ring, as memoryviews (an index is half a
        # numpy one's cost): nothing to do while they are equal and nothing is pending.
        self.tail = memoryview(self.inp.ctrl[RL.W_TAIL:])
        self.head = memoryview(self.inp.ctrl[RL.W_HEAD:])

    def poll(self) -> int:
        """One step; returns the work done (0 = idle)."""
        if not self.pending and self.tail[0] == self.head[0]:
            return 0  # nothing on the ring (a plain read: the jitted pop re-reads, acquire)
        work, pending, asleep, _ = self._step(self.handle, 0)
        return self.stepped(work, pending, asleep)

    def stepped(self, work: int, pending: int, asleep: int) -> int:
        """After a step (:func:`step_pass`'s results): the rows still pending, and a
        fan-out that sleeps on its ring woken. Returns the work done."""
        self.pending = pending
        if asleep:
            self.out.semaphore.release()  # a fan-out process that sleeps on the ring
        return work

    def close(self) -> None:
        self.handle.close()
