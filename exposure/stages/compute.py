"""Compute stage: the kernel over batches from the compute ring.

Per batch: apply under the state seqlock, publish the changed rows (row seqlocks), update
the session table (highest seq processed, rejects per reason) and emit one tally update per
changed account plus one for the fund onto the fan-out ring (conflated: the batch's latest
state of each, tagged with the event that last moved it).
"""

from __future__ import annotations

import time

import numpy as np
from numba import njit

from .. import _jit
from ..kernel import account_values, apply_batch
from ..shm import ring_layout as RL
from ..shm.intrinsics import store_release
from ..shm.ring import ring_pop, ring_push, sleeping
from ..shm.session_layout import N_REJ, S_DONE, S_REJ
from ..shm.tally_segment import publish, set_values, write_begin, write_end
from ..types import (
    C_LAST_GSEQ,
    C_LIVE,
    C_NCHANGED,
    EVENT_DTYPE,
    UPDATE_DTYPE,
)

__all__ = ["ComputeStage"]


@njit(cache=True)
def _after_batch(st, recs, status, n, sess_flat, ncols, upd, now_ns):
    """Session counters, then the batch's updates into ``upd``; returns how many."""
    if n == 0:
        return 0
    nsess = sess_flat.shape[0] // ncols
    for k in range(n):
        s = np.int64(recs[k].session)
        if s < nsess:
            code = status[k]
            if code != 0 and code < N_REJ:
                sess_flat[s * ncols + S_REJ + code] += np.uint64(1)
    for k in range(n):  # then the processed marks, each after its counters (release)
        s = np.int64(recs[k].session)
        if s < nsess and recs[k].sseq > sess_flat[s * ncols + S_DONE]:
            store_release(sess_flat, s * ncols + S_DONE, recs[k].sseq)
    g0 = np.int64(recs[0].gseq)
    vals = np.empty(8)
    m = 0
    for j in range(st.ctr[C_NCHANGED] + 1):
        u = upd[m]
        if j < st.ctr[C_NCHANGED]:
            a = np.int64(st.changed[j])
            u.breach = account_values(st.acc, st.acc_lim, a, vals)
            u.live_orders = st.acc_live[a]
            u.account = a
            k = np.int64(st.acc_gseq[a]) - g0
        else:  # the fund row, triggered by the batch's last event
            for t in range(8):
                vals[t] = st.fund[t, 0] + st.fund[t, 1]
            u.breach = 0
            u.live_orders = st.ctr[C_LIVE]
            u.account = -1
            k = n - 1
        if k < 0 or k >= n:
            k = n - 1
        r = recs[k]
        u.session = r.session
        u.gseq = r.gseq
        u.sseq = r.sseq
        u.send_ns = r.send_ns
        u.recv_ns = r.recv_ns
        set_values(u, vals)
        u.compute_ns = now_ns
        m += 1
    return m


@njit(cache=True)
def _step(ictrl, islots, words, recs, status, st, ver, seg_words, sess_flat, ncols, upd,
          upd_words, octrl, oslots, now_ns):
    """Pop, apply under the state seqlock, publish, count, emit updates, push them: one
    entry from Python per batch (each entry unboxes the 14-array state once).

    Returns (records applied, updates made, updates pushed, fan-out consumer asleep)."""
    n = ring_pop(ictrl, islots, words, words.shape[0])
    if n == 0:
        return 0, 0, 0, 0
    r = recs[:n]
    s = status[:n]
    write_begin(seg_words)
    apply_batch(st, r, s)
    write_end(seg_words)
    publish(st, ver, r[n - 1].gseq)
    m = _after_batch(st, r, s, n, sess_flat, ncols, upd, now_ns)
    pushed = ring_push(octrl, oslots, upd_words, m)
    asleep = 1 if pushed > 0 and sleeping(octrl, RL.W_CONSUMER_SLEEPING) else 0
    return n, m, pushed, asleep


class ComputeStage:
    """Pops the compute ring, applies, publishes, pushes updates to the fan-out ring."""

    def __init__(self, segment, sessions: np.ndarray, in_ring, out_ring, batch: int = 4096):
        self.seg = segment
        self.st = segment.state
        self.ver = self.st.pub["ver"]
        self.sess_flat = sessions.reshape(-1)
        self.ncols = sessions.shape[1]
        self.inp, self.out = in_ring, out_ring
        self.recs = np.zeros(batch, EVENT_DTYPE)
        self.words = self.recs.view(np.uint64).reshape(batch, -1)
        self.status = np.zeros(batch, np.uint8)
        self.upd = np.zeros(self.st.acc.shape[0] + 1, UPDATE_DTYPE)
        self.upd_words = self.upd.view(np.uint64).reshape(len(self.upd), -1)
        self.pending = 0  # updates not yet on the fan-out ring (it was full)
        self.pending_from = 0
        self._warm()
        self._args = (self.inp.ctrl, self.inp.slots, self.words, self.recs, self.status,
                      self.st, self.ver, self.seg.words, self.sess_flat, self.ncols,
                      self.upd, self.upd_words, self.out.ctrl, self.out.slots)
        self._step = _jit.entry(_step, *self._args, 0)
        self._tail, self._head = self.inp.ctrl[RL.W_TAIL:], self.inp.ctrl[RL.W_HEAD:]

    def _warm(self) -> None:
        """Compile (or load) every kernel now, before the node accepts sessions."""
        recs, status = self.recs[:0], self.status[:0]
        write_begin(self.seg.words)
        apply_batch(self.st, recs, status)
        write_end(self.seg.words)
        publish(self.st, self.ver, np.uint64(self.st.ctr[C_LAST_GSEQ]))
        _after_batch(self.st, self.recs[:1], self.status[:1], 0, self.sess_flat, self.ncols,
                     self.upd, 0)
        _step(self.inp.ctrl, self.inp.slots, self.words[:0], self.recs, self.status, self.st,
              self.ver, self.seg.words, self.sess_flat, self.ncols, self.upd, self.upd_words,
              self.out.ctrl, self.out.slots, 0)

    def poll(self) -> int:
        """One step; returns the work done (0 = idle)."""
        if self.pending:
            m = ring_push(self.out.ctrl, self.out.slots, self.upd_words[self.pending_from:],
                          self.pending)
            self.pending -= m
            self.pending_from += m
            if self.pending:
                return m
        if self._tail[0] == self._head[0]:
            return 0  # nothing on the ring (a plain read: the jitted pop re-reads, acquire)
        n, m, pushed, asleep = self._step(*self._args, time.time_ns())
        if n == 0:
            return 0
        self.pending, self.pending_from = m - pushed, pushed
        if asleep:
            self.out.semaphore.release()  # a fan-out process that sleeps on the ring
        return n
