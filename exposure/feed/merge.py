"""The subscriber's hot path as jitted passes: a batch of datagrams checked and sequenced
(:func:`scan_datagrams`), and its rows merged into the view (:func:`merge_rows`).

**Datagrams** (docs/feed.md; :mod:`exposure.feed.wire`'s header, ``DGRAM_HEADER``) arrive
in the slots of a :class:`exposure.net.mmsg.BatchReceiver`. Each is checked as
``feedwire.parse_datagram`` would (magic, version, type, row size, length, row kinds), then
sequenced by the subscriber's rules (:mod:`exposure.feed.subscriber`: a lower epoch is ignored, a
higher one stops the scan for the subscriber to drop its view; a seq jump, or a heartbeat
or refresh naming a seq above the last, is a loss that wants a snapshot), and its rows are
gathered, incrementals and refreshes apart, for the merge.

**Rows:**

A batch (the rows of the datagrams one :meth:`exposure.feed.subscriber.Subscriber.poll` took, or a
snapshot's rows) is merged into the view's six tables (accounts, the fund, instruments,
sectors, position cells, limits: feed version 4) by the per-row gseq rule
(:mod:`exposure.feed.subscriber`): per (kind, id) the batch's row with the highest gseq (the last of
equals) replaces the view's when its gseq is higher, or when the view has none; with
``replace_equal`` (a refresh, a snapshot) also when the gseqs are equal and the state
differs. A re-sent row of the same gseq and the same state is not written, so the view
keeps the event's tags (session, times) rather than a refresh's.

Rows and tables are handled as 64-bit words (every feed row is ``ROW_WORDS`` words; the
head's layout is types.UPDATE_DTYPE's)::

    word 0   kind (byte 0) | breach (byte 1) | breach_prev | flags | id (int32, bytes 4-7)
    word 2   gseq
    words BODY[kind]   the state compared for equal gseqs (with the breach byte)

The state compared is the kind's fields after the 56-byte head, from its first field to
its last: padding is not state (numpy's copies of a dtype with gaps leave it undefined).
What changed comes back as four arrays, sorted by (kind, id): the new row (words), the
kind, the id (the fund's: -1) and the breach bits the view held before (0 when it had no
row).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    ROW_ACCOUNT,
    ROW_DTYPES,
    ROW_FUND,
    ROW_LIMITS,
    ROW_SIZE,
)
from exposure.feed.wire import DG_HEARTBEAT, DG_INCREMENTAL, DG_REFRESH, DGRAM_MAGIC, FEED_VERSION

__all__ = ["ROW_WORDS", "BODY", "merge_rows", "scan_datagrams", "words", "S_EPOCH", "S_SEQ",
           "S_WANT", "S_JOINED", "S_NEXT_EPOCH", "S_INC", "S_REF", "SCAN_STATE", "SCAN_COUNTERS",
           "N_KINDS", "INFO", "I_GSEQ", "I_START"]

ROW_WORDS = ROW_SIZE // 8
_HEAD = 56


def _body(dt: np.dtype) -> tuple[int, int]:
    spans = [(o, o + d.itemsize) for d, o in (v[:2] for v in dt.fields.values()) if o >= _HEAD]
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    if lo % 8:
        raise ValueError(f"a feed row body starting at byte {lo}, not on a word")
    return lo // 8, -(-hi // 8)


# Row kinds are 1..N_KINDS (types.ROW_*; 5 position and 6 limits: feed version 4).
N_KINDS = ROW_LIMITS
# BODY[kind] = (first word, end word) of the state compared.
BODY = np.zeros((N_KINDS + 1, 2), np.int64)
for _k, _dt in ROW_DTYPES.items():
    BODY[_k] = _body(_dt)
# merge_rows' ``info``: [0] bad rows, [kind] the table size a kind needs (grow), [I_GSEQ]
# the highest gseq written, [I_START + kind - 1] where that kind's changed rows start.
I_GSEQ = N_KINDS + 1
I_START = N_KINDS + 2
INFO = I_START + N_KINDS


def words(a: np.ndarray) -> np.ndarray:
    """Feed rows (any of the four row dtypes, C-contiguous) as uint64 words, one row a
    line (a view)."""
    return a.view(np.uint64).reshape(len(a), ROW_WORDS)


@njit(cache=True)
def merge_rows(rows, t_acc, t_fund, t_inst, t_sec, t_pos, t_lim, bounds, replace_equal, body,
               out_rows, out_kind, out_id, out_prev, info):
    """Merge ``rows`` (uint64 words, ``[n, ROW_WORDS]``) into the tables (uint64 words;
    the fund's has one row; positions by cell id, limits by account). ``bounds[kind]``:
    ids at or above it are bad rows (counted in ``info[0]``, ignored), as is a row of a
    kind outside 1..N_KINDS. Returns how many rows changed, their new rows, kinds, ids and
    previous breach bits in ``out_*[:count]``, sorted by kind then id; ``info[I_GSEQ]`` is
    their highest gseq and ``info[I_START + kind - 1]`` where that kind's rows start.
    Returns -1 when a row's id lies beyond its table: nothing was written, and
    ``info[kind]`` holds the highest such id plus one (grow the table and merge again)."""
    n = rows.shape[0]
    tabs = (t_acc, t_fund, t_inst, t_sec, t_pos, t_lim)
    key = np.empty(n, np.int64)
    pos = np.empty(n, np.int64)
    for k in range(INFO):
        info[k] = 0
    m = 0
    bad = 0
    short = False
    for i in range(n):
        w0 = rows[i, 0]
        kind = np.int64(w0 & np.uint64(0xFF))
        rid = np.int64((w0 >> np.uint64(32)) & np.uint64(0xFFFFFFFF))
        if rid >= 0x80000000:
            rid -= 0x100000000
        if kind == ROW_FUND:
            if rid != -1:
                bad += 1
                continue
            idx = 0
        elif ROW_ACCOUNT <= kind <= N_KINDS:
            if rid < 0 or rid >= bounds[kind]:
                bad += 1
                continue
            idx = rid
        else:
            bad += 1
            continue
        if idx >= tabs[kind - 1].shape[0]:
            short = True
            if idx + 1 > info[kind]:
                info[kind] = idx + 1
        key[m] = (kind << 32) | idx
        pos[m] = i
        m += 1
    info[0] = bad
    if short:
        return -1
    order = np.argsort(key[:m], kind="mergesort")  # stable: equals keep their order
    count = 0
    j = 0
    while j < m:
        kk = key[order[j]]
        best = pos[order[j]]
        j += 1
        while j < m and key[order[j]] == kk:
            p = pos[order[j]]
            if rows[p, 2] >= rows[best, 2]:
                best = p
            j += 1
        kind = kk >> 32
        idx = kk & 0xFFFFFFFF
        t = tabs[kind - 1]
        had = (t[idx, 0] & np.uint64(0xFF)) != 0
        gnew = rows[best, 2]
        gcur = t[idx, 2]
        write = (not had) or gnew > gcur
        if not write and replace_equal and gnew == gcur:
            m8 = np.uint64(0xFF00)
            if (rows[best, 0] & m8) != (t[idx, 0] & m8):
                write = True
            else:
                for w in range(body[kind, 0], body[kind, 1]):
                    if rows[best, w] != t[idx, w]:
                        write = True
                        break
        if not write:
            continue
        out_prev[count] = np.int64((t[idx, 0] >> np.uint64(8)) & np.uint64(0xFF)) if had else 0
        for w in range(rows.shape[1]):
            t[idx, w] = rows[best, w]
            out_rows[count, w] = rows[best, w]
        out_kind[count] = kind
        out_id[count] = -1 if kind == ROW_FUND else idx
        if np.int64(gnew) > info[I_GSEQ]:
            info[I_GSEQ] = np.int64(gnew)
        count += 1
    c = 0
    for kind in range(1, N_KINDS + 1):
        while c < count and out_kind[c] < kind:
            c += 1
        info[I_START + kind - 1] = c
    return count


# scan_datagrams' state (an int64 array the subscriber keeps in step with its attributes).
S_EPOCH = 0        # the view's epoch
S_SEQ = 1          # the last incremental seq of the epoch (-1: none yet)
S_WANT = 2         # the loss generation (a snapshot fetched after it is wanted)
S_JOINED = 3       # 1 once serverless and a datagram arrived
S_NEXT_EPOCH = 4   # out: the higher epoch the scan stopped at
S_INC = 5          # rows gathered for the incremental merge
S_REF = 6          # rows gathered for the refresh merge
SCAN_STATE = 7
# The counters it adds to, in this order (exposure.feed.subscriber.COUNTERS names them).
SCAN_COUNTERS = ("incrementals", "refreshes", "heartbeats", "gaps", "missed", "stale_epoch",
                 "bad_datagrams", "dropped")
_C_INC, _C_REF, _C_HB, _C_GAPS, _C_MISSED, _C_STALE, _C_BAD, _C_DROPPED = range(8)
_HDR_WORDS = 4  # the 32-byte header


@njit(cache=True)
def scan_datagrams(words_, lens, start, n, d0, drop_every, servers, st, ctr, inc, ref):
    """Datagrams ``start .. n`` of a receive batch (datagram k: ``lens[k]`` bytes at the
    start of ``words_[k]``, the slots as uint64). ``d0``: the datagrams received before
    the batch (with ``drop_every`` > 0, datagram number ``d0 + k + 1`` divisible by it is
    dropped on purpose). ``servers``: whether the subscriber has recovery servers. Rows go
    to ``inc`` / ``ref`` (words, from ``st[S_INC]`` / ``st[S_REF]``). Returns the index of
    the first datagram of a higher epoch (its epoch in ``st[S_NEXT_EPOCH]``; the caller
    drops its view, takes that epoch and scans again from there), or ``n``."""
    for k in range(start, n):
        if drop_every > 0 and (d0 + k + 1) % drop_every == 0:
            ctr[_C_DROPPED] += 1
            continue
        ln = lens[k]
        if ln < 8 * _HDR_WORDS:
            ctr[_C_BAD] += 1
            continue
        w = words_[k]
        magic = w[0] & np.uint64(0xFFFFFFFF)
        epoch = np.int64(w[0] >> np.uint64(32))
        seq = np.int64(w[1])
        w16 = w[2] & np.uint64(0xFFFFFFFF)
        w20 = w[2] >> np.uint64(32)
        count = np.int64(w16 & np.uint64(0xFFFF))
        dtype = np.int64((w16 >> np.uint64(16)) & np.uint64(0xFF))
        version = np.int64(w16 >> np.uint64(24))
        row_size = np.int64(w20 & np.uint64(0xFFFF))
        if (magic != DGRAM_MAGIC or version != FEED_VERSION or seq < 0
                or not (dtype == DG_INCREMENTAL or dtype == DG_REFRESH or dtype == DG_HEARTBEAT)
                or row_size != ROW_SIZE or ln != 8 * _HDR_WORDS + count * ROW_SIZE):
            ctr[_C_BAD] += 1
            continue
        ok = True  # (a seq of 2**63 or more, read as negative above, is no node's: bad)
        for r in range(count):
            kind = w[_HDR_WORDS + r * ROW_WORDS] & np.uint64(0xFF)
            if kind < ROW_ACCOUNT or kind > N_KINDS:
                ok = False
                break
        if not ok:
            ctr[_C_BAD] += 1
            continue
        if epoch < st[S_EPOCH]:
            ctr[_C_STALE] += 1
            continue
        if epoch > st[S_EPOCH]:
            st[S_NEXT_EPOCH] = epoch
            return k
        if dtype == DG_INCREMENTAL:
            ctr[_C_INC] += 1
        elif dtype == DG_REFRESH:
            ctr[_C_REF] += 1
        else:
            ctr[_C_HB] += 1
        if st[S_SEQ] < 0:
            # The first datagram of this epoch: whatever was lost before it is invisible
            # to seq checks, so the view needs a snapshot fetched after it.
            st[S_SEQ] = seq
            st[S_WANT] += 1
        elif dtype == DG_INCREMENTAL:
            if seq > st[S_SEQ] + 1:
                ctr[_C_GAPS] += 1
                ctr[_C_MISSED] += seq - st[S_SEQ] - 1
                st[S_WANT] += 1
            if seq > st[S_SEQ]:
                st[S_SEQ] = seq
        elif seq > st[S_SEQ]:  # a heartbeat or refresh naming incrementals never seen
            ctr[_C_GAPS] += 1
            ctr[_C_MISSED] += seq - st[S_SEQ]
            st[S_WANT] += 1
            st[S_SEQ] = seq
        if not servers:
            st[S_JOINED] = 1
        if dtype != DG_HEARTBEAT and count:
            out = inc if dtype == DG_INCREMENTAL else ref
            at = S_INC if dtype == DG_INCREMENTAL else S_REF
            base = st[at]
            for r in range(count):
                for j in range(ROW_WORDS):
                    out[base + r, j] = w[_HDR_WORDS + r * ROW_WORDS + j]
            st[at] = base + count
    return n
