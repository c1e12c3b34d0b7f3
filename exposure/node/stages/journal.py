"""Journal stage: the compute ring to disk, then what is durable to the session table.

The journal is the compute ring's second consumer (ingest writes every sequenced record
once; compute and the journal each read it, and a slot is free once both have passed it).
Each poll takes up to 4,096 records and appends them as one block: one ``writev`` per
group commit (:class:`exposure.store.journal.JournalWriter`); bounded blocks keep a full disk from
holding back records that would still fit. When the records become durable depends on the
``fsync`` policy:

* ``batch``: fsync after every block, before anything of it is acknowledged;
* ``interval``: fsync at most once every ``interval_ms``, so many blocks share one fsync
  (when the stream stops, the next poll after the interval syncs the rest);
* ``none``: after ``write()`` (the page cache: survives a process crash, not a power cut).

With a mirror ring (a node of a primary/backup pair), every block written is handed to the
mirror stage while this node is the primary; a full mirror ring is never waited for: the
hand-off is dropped, and the mirror reads the gap back from the journal files.

A ``roll`` record (SPEC section 6: a new trading day) begins a new segment
(:meth:`exposure.store.journal.JournalWriter.roll_at`), so each day's records lie in segments
of their own (the retention keeps or archives whole days); its gseq goes to the counter
``journal_roll_gseq``, which tells the supervisor to start the snapshot process once it is
durable: that process writes the day's end-of-day report (:mod:`exposure.store.eod`).

Then the stage publishes, per session, the highest session seq that is durable
(``S_DURABLE`` of the session table, a release store after the data is on disk) and the
journal's durable global seq (row 0 of the table, ``S_DURABLE``). Ingest acknowledges a
session's seq only when compute has processed it *and* it is durable.

A write or fsync that fails (disk full, unwritable directory) stops nothing else: the
stage keeps the records it could not write, reports the error once on stderr, stops
advancing the durable marks (so ingest stops acknowledging), and retries every poll; the
rings fill and ingest stops reading its sessions; nothing acknowledged is lost.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    EVENT_WORDS,
    REJECT_SHIFT,
    T_ROLL,
    TYPE_SHIFT,
    W_GSEQ,
    W_RECV_NS,
    W_SESSION,
    W_SSEQ,
    W_TYPE,
)
from exposure.node.stages.agent import Stage
from exposure.shm import counters_layout as CN
from exposure.shm import ring_layout as RL
from exposure.shm.control import CTL_ROLE, ROLE_PRIMARY
from exposure.shm.handle import Handle, bind, members
from exposure.shm.intrinsics import store_release
from exposure.shm.ring import ring_pop_at, ring_push, sleeping
from exposure.shm.session_layout import S_DURABLE
from exposure.store.journal import JournalWriter

__all__ = ["JournalStage"]

log = logging.getLogger(__name__)


_RECORDS = CN.INDEX["journal_records_total"]
_WRITES = CN.INDEX["journal_writes_total"]
_FSYNCS = CN.INDEX["journal_fsyncs_total"]
_FSYNC_NS = CN.INDEX["journal_fsync_ns_total"]
_FSYNC_MAX = CN.INDEX["journal_fsync_ns_max"]
_DURABLE_GSEQ = CN.INDEX["journal_durable_gseq"]
_DURABLE_RECV = CN.INDEX["journal_durable_recv_ns"]
_MIRROR_DROPPED = CN.INDEX["journal_mirror_dropped_total"]
_ROLL_GSEQ = CN.INDEX["journal_roll_gseq"]


# The stage's handle (exposure.shm.handle): what each of its jitted calls reads.
_H = ("ctrl", "slots", "buf", "head_word", "rolls", "pending", "sess_flat", "ncols",
      "mctrl", "mslots", "cnt")


@njit(cache=True, _nrt=False)
def _note_sessions(words, n, pending):
    """The highest session seq per session among ``words[:n]`` into ``pending``."""
    for k in range(n):
        s = np.int64(words[k, W_SESSION] & np.uint64(0xFFFFFFFF))
        if s < pending.shape[0] and words[k, W_SSEQ] > pending[s]:
            pending[s] = words[k, W_SSEQ]


@njit(cache=True, _nrt=False)
def _rolls(words, n, out):
    """The gseqs of the ``roll`` records among ``words[:n]`` (none rejected by the parser)
    into ``out``; returns how many (at most ``len(out)``)."""
    k = 0
    for i in range(n):
        w = words[i, W_TYPE]
        if ((w >> np.uint64(TYPE_SHIFT)) & np.uint64(0xFF)) == T_ROLL and (
                (w >> np.uint64(REJECT_SHIFT)) & np.uint64(0xFF)) == 0 and k < out.shape[0]:
            out[k] = words[i, W_GSEQ]
            k += 1
    return k


@njit(cache=True, _nrt=False)
def _publish(pending, sess_flat, ncols, gseq):
    """Durable marks: per session, then the journal's global seq (row 0)."""
    for s in range(1, pending.shape[0]):
        if pending[s] > sess_flat[s * ncols + S_DURABLE]:
            store_release(sess_flat, s * ncols + S_DURABLE, pending[s])
    store_release(sess_flat, S_DURABLE, gseq)





@njit(cache=True, _nrt=False)
def _take(h):
    """Pop up to a block (``buf``) from the ring; the gseqs of its roll records into
    ``rolls``. Returns (records, rolls)."""
    ctrl, slots, buf, head_word, rolls, _, _, _, _, _, _ = members(h)
    n = ring_pop_at(ctrl, slots, buf, buf.shape[0], head_word)
    return n, (_rolls(buf, n, rolls) if n > 0 else 0)


@njit(cache=True, _nrt=False)
def _written(h, n, mirror):
    """After the block's ``n`` records are written: hand them to the mirror ring (when
    ``mirror``; a full ring drops the hand-off, counted), note each session's highest seq
    among them, count. Returns (mirror consumer asleep, last gseq, its receive time)."""
    _, _, buf, _, _, pending, _, _, mctrl, mslots, cnt = members(h)
    asleep = 0
    if mirror:
        handed = ring_push(mctrl, mslots, buf, n)
        if handed < n:
            cnt[_MIRROR_DROPPED] += np.uint64(n - handed)
        if sleeping(mctrl, RL.W_CONSUMER_SLEEPING):
            asleep = 1
    _note_sessions(buf, n, pending)
    cnt[_RECORDS] += np.uint64(n)
    cnt[_WRITES] += np.uint64(1)
    return asleep, buf[n - 1, W_GSEQ], buf[n - 1, W_RECV_NS]


@njit(cache=True, _nrt=False)
def _publish_bound(h, gseq):
    """:func:`_publish` over the stage's handle."""
    _, _, _, _, _, pending, sess_flat, ncols, _, _, _ = members(h)
    _publish(pending, sess_flat, ncols, np.uint64(gseq))


class JournalStage(Stage):
    name = "journal"
    fed_by = "ingest"

    def __init__(self, reader, sessions: np.ndarray, writer: JournalWriter, fsync: str,
                 interval_ms: int, batch: int = 4096, mirror_ring=None,
                 ctl: np.ndarray | None = None, counters: np.ndarray | None = None):
        # ``reader``: the journal's end of the compute ring (its second consumer,
        # exposure.shm.ring.RingReader), or any ring's consumer end
        self.inp = reader
        self.wake_source = reader
        self.cnt = CN.or_private(counters)
        self.mirror = mirror_ring
        self.ctl = ctl
        self.sess_flat = sessions.reshape(-1)
        self.ncols = sessions.shape[1]
        self.w = writer
        self.fsync = fsync
        self.interval_ns = interval_ms * 1_000_000
        self.buf = np.zeros((batch, EVENT_WORDS), np.uint64)
        self.held = 0           # records in buf not yet written (a failed write)
        self.pending = np.zeros(sessions.shape[0], np.uint64)  # written, not yet durable
        # What recovery found durable (row 0 of the session table) is where this journal
        # stands: never published lower (a lower mark would tell a backup that it is in
        # sync, and ingest that less is durable, than is true).
        self.written_gseq = self.durable_gseq = int(self.sess_flat[S_DURABLE])
        self.written_recv = 0
        self.cnt[_DURABLE_GSEQ] = self.durable_gseq
        self.last_sync = time.monotonic_ns()
        self.error: str | None = None
        # The idle check's two words as memoryviews (an index is half a numpy one's cost)
        self._tail = memoryview(reader.ctrl[RL.W_TAIL:])
        self._head = memoryview(reader.ctrl[reader.head_word:])
        self.rolls = np.zeros(64, np.uint64)  # roll gseqs found in a block
        # Bound once (exposure.shm.handle; without a mirror ring, arrays of its types that
        # are never touched): each jitted call of a pass passes this handle and scalars.
        m = mirror_ring
        mctrl = m.ctrl if m is not None else np.zeros(reader.ctrl.shape, np.uint64)
        mslots = m.slots if m is not None else np.zeros((1, EVENT_WORDS), np.uint64)
        self.handle = Handle(reader.ctrl, reader.slots, self.buf, reader.head_word,
                             self.rolls, self.pending, self.sess_flat, self.ncols, mctrl,
                             mslots, self.cnt)
        assert len(self.handle.values) == len(_H)
        # compiled (or loaded) now, not later
        self._take = bind(_take, self.handle)
        self._written = bind(_written, self.handle, 0, False)
        self._publish = bind(_publish_bound, self.handle, 0)
        self._publish(self.handle, self.durable_gseq)

    def _fail(self, what: str, e: OSError) -> None:
        msg = f"{what} failed: {e}; not acknowledging until it succeeds"
        if msg != self.error:  # once, not every retry
            log.error(msg)
            self.error = msg

    def poll(self) -> int:
        work = 0
        if not self.held and self._tail[0] != self._head[0]:
            self.held, nroll = self._take(self.handle)
            if nroll:
                for g in self.rolls[:nroll].tolist():
                    self.w.roll_at(g)  # a new trading day begins a new segment
                    self.cnt[_ROLL_GSEQ] = g
        if self.held:
            try:
                self.w.append(self.buf[:self.held])
            except OSError as e:
                self._fail("write", e)
                return 0
            mirror = self.mirror is not None and bool(self.ctl[CTL_ROLE] == ROLE_PRIMARY)
            asleep, self.written_gseq, self.written_recv = self._written(
                self.handle, self.held, mirror)  # (mirror hand-off, sessions, counters)
            if asleep:
                self.mirror.semaphore.release()
            work, self.held = self.held, 0
        if self.written_gseq > self.durable_gseq:
            now = time.monotonic_ns()
            # interval: at most one fsync per interval (a later poll, a tick away at most,
            # syncs what is left when the stream stops)
            if self.fsync != "interval" or now - self.last_sync >= self.interval_ns:
                if self.fsync != "none":
                    t0 = time.perf_counter_ns()
                    try:
                        self.w.sync()
                    except OSError as e:
                        self._fail("fsync", e)
                        return work
                    took = time.perf_counter_ns() - t0
                    cnt = self.cnt
                    cnt[_FSYNCS] += 1
                    cnt[_FSYNC_NS] += took
                    if took > cnt[_FSYNC_MAX]:
                        cnt[_FSYNC_MAX] = took
                self.last_sync = now
                self.durable_gseq = self.written_gseq
                self.cnt[_DURABLE_GSEQ] = self.durable_gseq
                self.cnt[_DURABLE_RECV] = self.written_recv
                self._publish(self.handle, self.durable_gseq)
                if self.error:
                    log.info("writing again")
                    self.error = None
        return work

    def close(self) -> None:
        try:
            if self.held:
                self.w.append(self.buf[:self.held])
            self.w.sync()
        except OSError:
            pass
        self.w.close()
        self.handle.close()
