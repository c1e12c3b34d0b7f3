"""Ingest's jitted hot path: complete EVENTS frames of one connection's receive buffer
straight into the compute ring (read by compute and by the journal: each record is written
once), with the session's sequence rule and entitlements checked per record (:func:`scan`).

Python (:mod:`exposure.node.stages.ingest`) handles everything the scanner stops at: logins,
heartbeats, malformed headers, a sequence gap.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.routing import owns
from exposure.core.types import (
    EVENT_WORDS,
    R_BAD_FIELD,
    R_UNAUTHORIZED,
    R_WRONG_PARTITION,
    REJECT_SHIFT,
    T_BUST,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_FX,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_NEW,
    T_POSITION,
    T_REPLACE,
    T_ROLL,
    TYPE_SHIFT,
    W_ACCOUNT,
    W_EPOCH,
    W_GSEQ,
    W_RECV_NS,
    W_SESSION,
    W_SSEQ,
    W_TYPE,
)
from exposure.net import wire as W
from exposure.net.sessions import (
    ENT_ALL_ACCOUNTS,
    ENT_ALL_SOURCES,
    ENT_FX,
    ENT_INSTRUMENT,
    ENT_LIMIT,
    ENT_MARK,
    ENT_ROLL,
)
from exposure.shm import ring_layout as RL
from exposure.shm.intrinsics import store_release
from exposure.shm.ring import journal_asleep, producer_head, sleeping

__all__ = ["scan", "NEED_MORE", "CONTROL", "RING_FULL", "SEQ_GAP", "RES_WORDS"]

# Why the scanner stopped (res[0]).
NEED_MORE = 0   # no complete frame left at pos
CONTROL = 1     # a frame at pos that Python handles (login, heartbeat, anything invalid)
RING_FULL = 2   # the compute ring has no room for the rest of the frame at pos
SEQ_GAP = 3     # a record whose seq is neither held nor the next one: res[6] = expected
RES_WORDS = 8

_HDR = W.HEADER.size
_REC = EVENT_WORDS * 8
_HIGH = np.uint64(0xFFFF_FFFF_0000_0000)  # keeps the high half of a shared word
_LOW = np.uint64(0xFFFF_FFFF)
_BYTE = np.uint64(0xFF)
_REJ_MASK = ~(_BYTE << np.uint64(REJECT_SHIFT))
_UNAUTH = np.uint64(R_UNAUTHORIZED) << np.uint64(REJECT_SHIFT)
_BAD_FIELD = np.uint64(R_BAD_FIELD) << np.uint64(REJECT_SHIFT)
_WRONG = np.uint64(R_WRONG_PARTITION) << np.uint64(REJECT_SHIFT)


@njit(inline="always", cache=True, _nrt=False)
def _bit(bits, s, x):
    """Bit ``x`` of bitmap row ``s`` (0 beyond the bitmap)."""
    if x >= bits.shape[1] * 64:
        return False
    return (bits[s, x >> 6] >> np.uint64(x & 63)) & np.uint64(1) != 0


@njit(inline="always", cache=True, _nrt=False)
def _entitled(w_type, w_src, w_acct, ef, esrc, eacct, s):
    """Whether session ``s`` (flags ``ef``) may send the record whose type word, source
    word and account word these are (the rules: :mod:`exposure.net.sessions`). Unknown types
    pass: the kernel rejects them as bad_type."""
    t = np.int64((w_type >> np.uint64(TYPE_SHIFT)) & _BYTE)
    src = np.int64(w_src >> np.uint64(32))
    acct = np.int64(w_acct & _LOW)
    if (t == T_NEW or t == T_FILL or t == T_REPLACE or t == T_CANCEL or t == T_DONE
            or t == T_BUST):
        if (ef & ENT_ALL_SOURCES) == 0 and not _bit(esrc, s, src):
            return False
    if t == T_NEW or t == T_FILL or t == T_POSITION or t == T_LIMIT or t == T_BUST:
        if (ef & ENT_ALL_ACCOUNTS) == 0 and not _bit(eacct, s, acct):
            return False
    if t == T_LIMIT:
        return (ef & ENT_LIMIT) != 0
    if t == T_INSTRUMENT:
        return (ef & ENT_INSTRUMENT) != 0
    if t == T_ROLL:  # an operator's: its own entitlement
        return (ef & ENT_ROLL) != 0
    if t == T_MARK:
        return (ef & ENT_MARK) != 0
    if t == T_FX:
        return (ef & ENT_FX) != 0
    return True


@njit(cache=True, _nrt=False)
def scan(buf, wbuf, pos, fill, session, held, now, gseq, ctrl, slots, eflags, esrc, eacct,
         me, acc_owner, src_owner, res):
    """Take the complete EVENTS frames of ``buf[pos:fill]`` straight into the ring.

    Each record whose session seq is ``held + 1`` is stamped with the session id, the
    receive time, epoch 0 and the next global seq; its ``reject`` byte says
    ``R_UNAUTHORIZED`` when the session is not entitled to it (``eflags``/``esrc``/
    ``eacct``: :class:`exposure.net.sessions.Entitlements`), else ``R_WRONG_PARTITION`` when
    this node is partition ``me`` of a cluster and does not own it (``acc_owner``,
    ``src_owner``: :mod:`exposure.core.partition`; ``me`` < 0: not a cluster); a client's own
    ``R_UNAUTHORIZED`` or ``R_WRONG_PARTITION`` becomes ``R_BAD_FIELD`` (only ingest
    decides those). It is then written to the ring. A record at or below ``held`` is a
    resend and is skipped; any other seq stops the scan (``SEQ_GAP``) with nothing of that
    record applied. A record's
    seq counts as held only once it is in the ring, so a frame cut short by a full ring is
    simply scanned again later: what it already delivered is skipped as a resend. The
    scanner stops at the first frame that is incomplete, is not an EVENTS frame of a
    logged-in session, or has a header that is not exactly right; Python deals with those
    (its :func:`wire.check_header` is the statement of the rules and says what is wrong).
    ``wbuf`` is ``buf`` as u8 words: valid frames are multiples of 8 bytes long, so
    records start on word boundaries. A record is taken only when the ring has room past
    both its consumers (compute and the journal).

    Writes (why, pos, held, pushed, compute asleep, journal asleep, expected seq) to ``res``
    (u8 words: a seq is a u8 whatever a client sends).
    """
    s_idx = np.int64(session)
    session = np.uint64(session)
    held = np.uint64(held)
    now = np.uint64(now)
    gseq = np.uint64(gseq)
    ef = np.int64(eflags[s_idx]) if s_idx < eflags.shape[0] else 0
    cap = slots.shape[0]
    mask = cap - 1
    tail = np.int64(ctrl[RL.W_TAIL])  # only this process writes it
    head = np.int64(ctrl[RL.W_HEAD_CACHE])
    t0 = tail
    why = NEED_MORE
    while fill - pos >= _HDR:
        kind = buf[pos + 3]
        length = (np.int64(buf[pos + 4]) | (np.int64(buf[pos + 5]) << 8)
                  | (np.int64(buf[pos + 6]) << 16) | (np.int64(buf[pos + 7]) << 24))
        if (buf[pos] != 0x45 or buf[pos + 1] != 0x58 or buf[pos + 2] != W.VERSION
                or kind != W.K_EVENTS or session == 0 or length == 0
                or length > W.MAX_PAYLOAD or length % _REC != 0 or pos % 8 != 0):
            why = CONTROL
            break
        if fill - pos - _HDR < length:
            break  # incomplete
        w0 = (pos + _HDR) // 8
        stop = NEED_MORE
        for k in range(length // _REC):
            r = w0 + k * EVENT_WORDS
            sq = wbuf[r + W_SSEQ]
            if sq <= held:
                continue  # already held: a resend
            if sq != held + np.uint64(1):
                stop = SEQ_GAP
                break
            head = producer_head(ctrl, tail, head, cap)
            if tail - head >= cap:
                stop = RING_FULL
                break
            wt = wbuf[r + W_TYPE]
            if not _entitled(wt, wbuf[r + W_SESSION], wbuf[r + W_ACCOUNT], ef, esrc, eacct,
                             s_idx):
                wt = (wt & _REJ_MASK) | _UNAUTH
            elif (wt & ~_REJ_MASK) == _UNAUTH or (wt & ~_REJ_MASK) == _WRONG:
                wt = (wt & _REJ_MASK) | _BAD_FIELD
            elif me >= 0 and (wt & ~_REJ_MASK) == 0 and not owns(
                    np.int64((wt >> np.uint64(TYPE_SHIFT)) & _BYTE),
                    np.int64(wbuf[r + W_SESSION] >> np.uint64(32)),
                    np.int64(wbuf[r + W_ACCOUNT] & _LOW), me, acc_owner, src_owner):
                wt = (wt & _REJ_MASK) | _WRONG
            j = tail & mask
            for b in range(EVENT_WORDS):
                slots[j, b] = wbuf[r + b]
            slots[j, W_TYPE] = wt
            slots[j, W_SESSION] = (slots[j, W_SESSION] & _HIGH) | session
            slots[j, W_EPOCH] &= _HIGH
            slots[j, W_RECV_NS] = now
            slots[j, W_GSEQ] = gseq + np.uint64(tail - t0)
            tail += 1
            held = sq
        if stop != NEED_MORE:
            why = stop
            break
        pos += _HDR + length
    pushed = tail - t0
    asleep = 0
    tasleep = 0
    if pushed > 0:
        store_release(ctrl, RL.W_TAIL, tail)  # publish: the slot writes happen-before
        asleep = 1 if sleeping(ctrl, RL.W_CONSUMER_SLEEPING) else 0
        tasleep = journal_asleep(ctrl)
    res[0] = why
    res[1] = pos
    res[2] = held
    res[3] = pushed
    res[4] = asleep
    res[5] = tasleep
    res[6] = held + np.uint64(1)
