"""Fan-out stage: feed rows from the fan-out ring to UDP multicast (docs/feed.md).

Datagrams (:mod:`exposure.feed.wire`): INCREMENTAL ones carry the rows compute pushed, with
stream seqs 1, 2, 3, ... per epoch; when the ring is idle the stage also sends a HEARTBEAT
every ``heartbeat_ms`` (the last seq, so a receiver that lost the last datagrams before a
quiet spell sees the gap) and a REFRESH cycle: published rows re-read from the tally segment
(:func:`exposure.engine.publish.gather_rows`) at ``refresh_rows_per_s``, so rows that stay silent
converge in a receiver that missed them. Neither advances the seq.

Conflation: each poll takes everything on the ring and keeps only the latest row of each
account, the fund, each instrument, each sector, each position cell and each account's
limits (feed version 4), in the order of those last rows, so
under load a receiver gets fewer, fresher rows; every row carries the epoch it is sent
under and the gseq, session, session seq and client send time of the event that last
moved it.

In a pair, a backup packs (to keep up) but sends nothing, and a primary sends only while
it may act (:func:`exposure.shm.control.may_act`): a primary cut off from its backup and
from etcd holds its rows once its fence has expired.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    INSTPUB_DTYPE,
    INSTRUMENT_ROW_DTYPE,
    LIMITS_ROW_DTYPE,
    POSITION_ROW_DTYPE,
    POSPUB_DTYPE,
    PUBROW_DTYPE,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SECTOR,
    ROW_SIZE,
    SECPUB_DTYPE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.publish import gather_rows, versions
from exposure.feed.wire import (
    DG_HEARTBEAT,
    DG_INCREMENTAL,
    DG_REFRESH,
    DGRAM_HEADER,
    DGRAM_MAGIC,
    FEED_VERSION,
    datagram_size,
    open_sender,
    rows_per_datagram,
)
from exposure.net.guard import RateLog
from exposure.net.mmsg import BatchSender, HeadedSender, send_datagrams, send_headed
from exposure.node.stages.agent import Stage
from exposure.shm import counters_layout as CN
from exposure.shm import ring_layout as RL
from exposure.shm.control import CTL_EPOCH, CTL_FANOUT_ERRORS, CTL_ROLE, ROLE_PRIMARY, may_act
from exposure.shm.handle import Handle, bind, members
from exposure.shm.intrinsics import clock_realtime_ns
from exposure.shm.ring import ring_pop

__all__ = ["FanoutStage", "pack_pass", "send_rows", "SEND", "PACK", "HOLD"]

log = logging.getLogger(__name__)

_ROW_WORDS = ROW_SIZE // 8
_DATAGRAMS = CN.INDEX["fanout_datagrams_total"]
_REFRESHES = CN.INDEX["fanout_refresh_datagrams_total"]
_HEARTBEATS = CN.INDEX["fanout_heartbeats_total"]
_ROWS = CN.INDEX["fanout_rows_total"]
_DROPPED = CN.INDEX["fanout_dropped_total"]
_CYCLES = CN.INDEX["fanout_refresh_cycles_total"]
_HDR_WORDS = DGRAM_HEADER.size // 8  # the header as u8 words
_LOW32 = np.uint64(0xFFFFFFFF)
_HIGH32 = np.uint64(0xFFFFFFFF00000000)
# FanoutStage.mode(): send the rows; pack them and send nothing (a backup); hold them on the
# ring (a fenced primary).
SEND, PACK, HOLD = 1, 0, -1


@njit(cache=True, _nrt=False, inline="always")
def _close_datagram(out, hdr, epoch, seq, count, dtype, now):
    """The header words of the datagram starting at word ``hdr`` (feedwire.DGRAM_HEADER)."""
    out[hdr] = np.uint64(DGRAM_MAGIC) | (np.uint64(epoch) << np.uint64(32))
    out[hdr + 1] = np.uint64(seq)
    out[hdr + 2] = (np.uint64(count) | (np.uint64(dtype) << np.uint64(16))
                    | (np.uint64(FEED_VERSION) << np.uint64(24))
                    | (np.uint64(ROW_SIZE) << np.uint64(32)))
    out[hdr + 3] = np.uint64(now)


@njit(cache=True, _nrt=False, inline="always")
def _with_epoch(word1, ep):
    """A row's second word with the epoch it is sent under in its low half (the gseq's
    high half stays): every datagram's rows are stamped so, packed or sent in place."""
    return (word1 & _HIGH32) | ep


@njit(cache=True, _nrt=False, inline="always")
def _slot(word0, nacc, ninst, nsec, ncell):
    """Where a row (kind in the low byte of its first word, i4 id in the high half) sits in
    ``last``: accounts, the fund, instruments, sectors, position cells, limits; anything
    else in the spill slot."""
    kind = word0 & np.uint64(0xFF)
    rid = np.int64(word0 >> np.uint64(32))
    if rid >= 0x80000000:
        rid -= 0x100000000
    base = nacc + 1 + ninst + nsec
    spill = base + ncell + nacc
    if kind == ROW_ACCOUNT:
        return rid if 0 <= rid < nacc else spill
    if kind == ROW_POSITION:
        return base + rid if 0 <= rid < ncell else spill
    if kind == ROW_FUND:
        return nacc
    if kind == ROW_INSTRUMENT:
        return nacc + 1 + rid if 0 <= rid < ninst else spill
    if kind == ROW_SECTOR:
        return nacc + 1 + ninst + rid if 0 <= rid < nsec else spill
    if kind == ROW_LIMITS:
        return base + ncell + rid if 0 <= rid < nacc else spill
    return spill


@njit(cache=True, _nrt=False)
def _pack(ctrl, slots, upd, last, epoch, seq, per, out, ends, now, nacc, ninst, nsec, ncell):
    """Pop every row on the ring, keep the last of each (account, fund, instrument,
    sector), in the order of those last rows, stamp the epoch into each and pack them into
    INCREMENTAL datagrams in ``out`` (u8 words, header included). Returns (rows popped,
    datagrams); datagram d is bytes ``ends[d - 1]:ends[d]`` of ``out`` (``ends[-1]`` read
    as 0).

    ``last`` (i8, one slot per row plus a spill slot, all -1 between calls) maps a row to
    the index of its latest version in this batch."""
    n = ring_pop(ctrl, slots, upd, upd.shape[0])
    if n == 0:
        return 0, 0
    for k in range(n):
        last[_slot(upd[k, 0], nacc, ninst, nsec, ncell)] = k
    w = 0
    d = 0
    count = 0
    hdr = 0
    ep = np.uint64(epoch)
    for k in range(n):
        if last[_slot(upd[k, 0], nacc, ninst, nsec, ncell)] != k:
            continue  # conflated: a later version of this row follows
        if count == 0:  # open a datagram: header words filled when it closes
            hdr = w
            w += _HDR_WORDS
        out[w] = upd[k, 0]
        out[w + 1] = _with_epoch(upd[k, 1], ep)
        for b in range(2, _ROW_WORDS):
            out[w + b] = upd[k, b]
        w += _ROW_WORDS
        count += 1
        if count == per:
            seq += 1
            _close_datagram(out, hdr, epoch, seq, count, DG_INCREMENTAL, now)
            ends[d] = w * 8
            d += 1
            count = 0
    if count:
        seq += 1
        _close_datagram(out, hdr, epoch, seq, count, DG_INCREMENTAL, now)
        ends[d] = w * 8
        d += 1
    for k in range(n):  # back to all -1
        last[_slot(upd[k, 0], nacc, ninst, nsec, ncell)] = -1
    return n, d


@njit(cache=True, _nrt=False)
def pack_pass(h, epoch, seq, send):
    """:func:`_pack` over the arrays of the stage's handle (ring, buffers, table sizes,
    counters, the sender's), stamped with the clock read here; with ``send``, the
    datagrams go out in the same call (:func:`exposure.net.mmsg.send_datagrams`) and are
    counted with their rows (a backup packs, to keep up, and sends nothing). Returns (rows
    popped, datagrams, datagrams the socket refused, the last refusal's errno)."""
    (ctrl, slots, upd, last, per, out, ends, nacc, ninst, nsec, ncell, cnt, fd, iov, msgs_at,
     base) = members(h)
    n, d = _pack(ctrl, slots, upd, last, epoch, seq, per, out, ends, clock_realtime_ns(),
                 nacc, ninst, nsec, ncell)
    refused = 0
    err = 0
    if send and d > 0:
        refused, err = send_datagrams(fd, iov, msgs_at, ends, d, base)
        cnt[_DATAGRAMS] += np.uint64(d)
        cnt[_ROWS] += np.uint64((ends[d - 1] // 8 - d * _HDR_WORDS) // _ROW_WORDS)
    return n, d, refused, err


@njit(cache=True, _nrt=False)
def send_rows(h, m, epoch, seq, send):
    """Rows ``0 .. m`` of the buffer a :meth:`FanoutStage.direct` handle ``h`` was made
    for (a batch's rows, each a different row of the feed: nothing to conflate) as
    INCREMENTAL datagrams, not copied: each row's epoch is stamped where it is, each
    datagram's header written on its own and, with ``send``, the kernel gathers header and
    rows (:func:`exposure.net.mmsg.send_headed`). The same datagrams as :func:`pack_pass`
    makes of the same rows popped from the ring, at none of its copies. Returns what
    ``pack_pass`` returns."""
    rows, heads, ends, per, cnt, fd, iov, msgs_at, heads_at, head, base = members(h)
    now = clock_realtime_ns()
    ep = np.uint64(epoch)
    for k in range(m):
        rows[k, 1] = _with_epoch(rows[k, 1], ep)
    d = 0
    k = 0
    while k < m:
        c = min(per, m - k)
        seq += 1
        _close_datagram(heads, d * _HDR_WORDS, epoch, seq, c, DG_INCREMENTAL, now)
        k += c
        ends[d] = k * ROW_SIZE
        d += 1
    refused = 0
    err = 0
    if send and d > 0:
        refused, err = send_headed(fd, iov, msgs_at, heads_at, head, ends, d, base)
        cnt[_DATAGRAMS] += np.uint64(d)
        cnt[_ROWS] += np.uint64(m)
    return m, d, refused, err


@njit(cache=True)
def _gather_bound(h, b, cursor, limit, scan, positions):
    """:func:`exposure.engine.publish.gather_rows` over the state's handle ``h`` (the state,
    its published tables' versions and the segment's words) and the buffers' handle
    ``b``."""
    return gather_rows(*members(h), cursor, limit, scan, positions, *members(b))


@njit(cache=True, _nrt=False)
def _seal(out, m, epoch, seq, dtype, now):
    """Stamp the epoch into rows ``0..m`` that follow the header words of ``out`` and
    write a header of type ``dtype``; returns the datagram's length in bytes."""
    ep = np.uint64(epoch)
    for k in range(m):
        w = _HDR_WORDS + k * _ROW_WORDS + 1
        out[w] = _with_epoch(out[w], ep)
    _close_datagram(out, 0, epoch, seq, m, dtype, now)
    return (_HDR_WORDS + m * _ROW_WORDS) * 8


class FanoutStage(Stage):
    """Sends the fan-out ring's rows as INCREMENTAL datagrams; HEARTBEAT and REFRESH ones
    while idle. ``state``: the tally state (a read-only mapping is enough), for the
    refresh cycle and the table sizes; ``words``: the tally segment as u8 words (its
    state seqlock, for the refresh's limits rows; None: a private seqlock word, for a
    state no batch writes concurrently); ``positions``: position rows in the refresh
    cycle (``[fanout] positions``)."""

    name = "fanout"
    fed_by = "compute"

    def __init__(self, in_ring, group: str, port: int, interface: str, ttl: int,
                 max_datagram: int, state, epoch: int = 0, ctl: np.ndarray | None = None,
                 pair: bool = False, heartbeat_ms: int = 100, refresh_rows_per_s: int = 2000,
                 counters: np.ndarray | None = None, words: np.ndarray | None = None,
                 positions: bool = True):
        self.inp = in_ring
        self.wake_source = in_ring
        self.cnt = CN.or_private(counters)
        self.ctl = ctl  # role and epoch (a backup packs, to keep up, but sends nothing)
        # (read on every pass with work: a memoryview's index is a third of numpy's)
        self._ctl = memoryview(ctl) if ctl is not None else None
        self.pair = pair and ctl is not None  # a fenced primary holds its rows
        self.dest = (group, port)
        self.sock = open_sender(group, port, interface, ttl)
        # (0: as large as the interface's MTU allows: fewer datagrams under load, the
        # kernel's cost being per datagram; docs/feed.md)
        self.max_datagram = datagram_size(self.sock, max_datagram)
        self.per = rows_per_datagram(self.max_datagram)
        log.info("fan-out: %s:%d through %s, datagrams of up to %d bytes (%d rows)",
                 group, port, interface, self.max_datagram, self.per)
        self.epoch = epoch
        self.seq = 0
        self.send_errors = 0
        self.sent = {DG_INCREMENTAL: 0, DG_REFRESH: 0, DG_HEARTBEAT: 0}  # datagrams
        self.log = RateLog(log)
        st = state
        self.st = st
        self.nacc, self.ninst, self.nsec = st.acc.shape[0], st.inst.shape[0], st.sec.shape[0]
        self.ncell = st.cpub.shape[0]
        self.positions = 1 if positions else 0
        cap = in_ring.capacity
        self.upd = np.zeros((cap, _ROW_WORDS), np.uint64)
        self.last = np.full(2 * self.nacc + 1 + self.ninst + self.nsec + self.ncell + 1, -1,
                            np.int64)
        self.out = np.zeros(cap * _ROW_WORDS + (cap // self.per + 1) * _HDR_WORDS, np.uint64)
        self.ends = np.zeros(cap // self.per + 2, np.int64)
        self.sender = BatchSender(self.sock, self.out)  # one sendmmsg per poll
        # Bound once (exposure.shm.handle): the per-pass call passes the handle and scalars.
        self.handle = Handle(in_ring.ctrl, in_ring.slots, self.upd, self.last, self.per,
                             self.out, self.ends, self.nacc, self.ninst, self.nsec, self.ncell,
                             self.cnt, *self.sender.args)
        self._pack = bind(pack_pass, self.handle, 0, 0, True)  # compiled (or loaded) now
        self._direct: list = []  # (sender, handle) of direct(): a fused pass's
        # The idle check's two words as memoryviews (an index is half a numpy one's cost)
        self._tail = memoryview(in_ring.ctrl[RL.W_TAIL:])
        self._head = memoryview(in_ring.ctrl[RL.W_HEAD:])
        # Idle work: heartbeats and the refresh cycle.
        self.hb_ns = int(heartbeat_ms) * 1_000_000
        self.last_send = time.monotonic_ns()
        self.refresh_every_ns = (self.per * 1_000_000_000 // refresh_rows_per_s
                                 if refresh_rows_per_s > 0 else 0)
        self.next_refresh = time.monotonic_ns() + self.refresh_every_ns
        self.cursor = 0
        self._idle = 0
        self.cycles = 0  # refresh cycles completed
        self.hb = np.zeros(_HDR_WORDS, np.uint64)
        self.hb_mv = memoryview(self.hb.view(np.uint8))
        self.rbuf = np.zeros(_HDR_WORDS + self.per * _ROW_WORDS, np.uint64)
        self.rbuf_mv = memoryview(self.rbuf.view(np.uint8))
        rows = self.rbuf[_HDR_WORDS:]
        vers = versions(st)
        seg_words = words if words is not None else np.zeros(32, np.uint64)
        self._gather_args = (st, vers.pub, vers.ipub, vers.spub, vers.cpub, seg_words)
        self._gather_bufs = (rows.view(UPDATE_DTYPE), rows.view(INSTRUMENT_ROW_DTYPE),
                             rows.view(SECTOR_ROW_DTYPE), rows.view(POSITION_ROW_DTYPE),
                             rows.view(LIMITS_ROW_DTYPE), np.zeros(1, PUBROW_DTYPE),
                             np.zeros(1, INSTPUB_DTYPE), np.zeros(1, SECPUB_DTYPE),
                             np.zeros(1, POSPUB_DTYPE))
        self._gather_h = (Handle(*self._gather_args), Handle(*self._gather_bufs))
        self._gather = bind(_gather_bound, *self._gather_h, 0, 0, 0, 0)
        _seal(self.rbuf, 0, 0, 0, DG_REFRESH, 0)  # compiled (or loaded) now

    def direct(self, rows: np.ndarray) -> Handle:
        """A handle for :func:`send_rows` over ``rows`` (u8 words, one feed row a line:
        the buffer the compute stage before this one in the process makes a batch's rows
        in), for the fused pass (:mod:`exposure.node.stages.fused`); made once, kept with
        this stage and closed with it."""
        if rows.ndim != 2 or rows.shape[1] != _ROW_WORDS or not rows.flags.c_contiguous:
            raise ValueError(f"rows: C-contiguous u8 words [n, {_ROW_WORDS}], not "
                             f"{rows.shape}")
        most = rows.shape[0] // self.per + 1
        heads = np.zeros((most, _HDR_WORDS), np.uint64)
        ends = np.zeros(most, np.int64)
        sender = HeadedSender(self.sock, heads, rows)
        h = Handle(rows, heads.reshape(-1), ends, self.per, self.cnt, *sender.args)
        self._direct.append((sender, h))
        return h

    def mode(self) -> int:
        """What this node does with the rows now: :data:`SEND` (a primary, and in a pair
        one that may act), :data:`PACK` (a backup: packs, to keep up, sends nothing) or
        :data:`HOLD` (a fenced primary: the rows stay on the ring)."""
        ctl = self._ctl
        if ctl is None:
            return SEND
        epoch = ctl[CTL_EPOCH]
        if epoch != self.epoch:  # a new incarnation or a promotion: a new stream
            self.epoch, self.seq = epoch, 0
        if ctl[CTL_ROLE] != ROLE_PRIMARY:
            return PACK
        if self.pair and not may_act(self.ctl, time.monotonic_ns()):
            return HOLD
        return SEND

    def _may_send(self) -> bool:
        """Whether this node publishes now: a primary, and in a pair one that may act."""
        return self.mode() == SEND

    def _lost(self, n: int, why: str) -> None:
        """``n`` datagrams the socket refused: receivers see the gap."""
        self.send_errors += n
        self.cnt[_DROPPED] += n
        if self.ctl is not None:
            self.ctl[CTL_FANOUT_ERRORS] += n
        self.log("send", f"multicast send failed ({why}): {self.send_errors} datagrams lost "
                         "so far")

    def _send(self, view) -> None:
        try:
            self.sock.send(view)
        except OSError as e:
            self._lost(1, e.strerror or str(e))

    def poll(self) -> int:
        if self._tail[0] == self._head[0]:
            # Nothing on the ring (a plain read: the jitted pop re-reads, acquire): idle
            # work, with the clock read on every 32nd idle poll only (a spinning loop polls
            # millions of times a second; heartbeats and refreshes need milliseconds).
            self._idle += 1
            if self._idle & 31:
                return 0
            now = time.monotonic_ns()
            if self.refresh_every_ns and now >= self.next_refresh:
                self.next_refresh = now + self.refresh_every_ns
                self._refresh()
            elif now - self.last_send >= self.hb_ns:
                self._heartbeat(now)
            return 0
        mode = self.mode()
        if mode == HOLD:
            return 0  # fenced: nothing goes out (the ring fills; compute waits)
        # popped, packed and (SEND) sent in one call (the counters: counted there too)
        return self.packed(mode, *self._pack(self.handle, self.epoch, self.seq, mode == SEND))

    def packed(self, mode: int, n: int, d: int, refused: int, err: int) -> int:
        """After a pack in ``mode`` (:func:`pack_pass`'s results): the stream seq moves
        past the datagrams sent, refusals are counted. Returns the rows popped."""
        if n == 0 or mode != SEND:
            return n
        self.seq += d
        if refused:
            self._lost(refused, os.strerror(err))
        self.sent[DG_INCREMENTAL] += d
        self.last_send = time.monotonic_ns()
        return n

    def _heartbeat(self, now: int) -> None:
        self.last_send = now
        if not self._may_send():
            return
        _seal(self.hb, 0, self.epoch, self.seq, DG_HEARTBEAT, time.time_ns())
        self._send(self.hb_mv)
        self.sent[DG_HEARTBEAT] += 1
        self.cnt[_HEARTBEATS] += 1

    def _refresh(self) -> None:
        """One REFRESH datagram: the next published rows of the cycle (at most one
        datagram's worth, looking at most at 512 positions of the tables)."""
        if not self._may_send():
            return
        m, cursor = self._gather(*self._gather_h, self.cursor, self.per, 512, self.positions)
        if cursor < self.cursor or (cursor == 0 and self.cursor == 0 and m == 0):
            self.cycles += 1
            self.cnt[_CYCLES] += 1
        self.cursor = cursor
        if m == 0:
            return
        size = _seal(self.rbuf, m, self.epoch, self.seq, DG_REFRESH, time.time_ns())
        self._send(self.rbuf_mv[:size])
        self.sent[DG_REFRESH] += 1
        self.cnt[_REFRESHES] += 1
        self.last_send = time.monotonic_ns()

    def close(self) -> None:
        self.handle.close()
        for _, h in self._direct:
            h.close()
        self.sock.close()
