"""After each batch: the rows desks read and the rows the feed sends, and the session counts.

The kernel (:mod:`exposure.engine.kernel`) lists what a batch moved: accounts (``changed``),
instruments (``ichanged``), sectors (``schanged``) and cells (``cchanged``). Here, in one
jitted pass per batch:

* the **published tables** of the tally segment (``pub``, ``ipub``, ``spub``, ``cpub``,
  ``ctrpub``): each row is written under its own version word (odd while written; read
  by :func:`exposure.shm.tally_segment.copy_rows` and :mod:`exposure.shm.seqlock`), so a
  desk reads any row without waiting for the node;
* the **feed rows** (types.UPDATE_DTYPE / INSTRUMENT_ROW_DTYPE / SECTOR_ROW_DTYPE, 160
  bytes each): one per moved account, the fund, one per moved instrument and sector, each
  tagged with the event that last moved it; compute pushes them to the fan-out ring;
* the **session counters** (processed seq and rejects per reason).

:func:`gather_rows` reads published rows back into feed rows (the fan-out's refresh cycle
and the recovery server's snapshots); :func:`publish_all` republishes every row (after
recovery).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    C_CELLS,
    C_LIVE,
    C_NCCHANGED,
    C_NCHANGED,
    C_NICHANGED,
    C_NSCHANGED,
    K_NET_LONG,
    K_NET_SHORT,
    K_SEC_GROSS,
    K_SEC_NET,
    NO_SESSION,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SECTOR,
)
from exposure.engine.kernel import account_values
from exposure.shm.intrinsics import fence_release, prefetch, store_release
from exposure.shm.reject_layout import ENTRY, RING, ROW_WORDS, SEQ_MASK, W_HEAD
from exposure.shm.seqlock import read_begin, read_end, read_row
from exposure.shm.session_layout import N_PROCESSED, N_REJ, S_DONE, S_REJ

_RL_ROW, _RL_HEAD, _RL_ENTRY, _RL_RING = ROW_WORDS, W_HEAD, ENTRY, np.uint64(RING)
_RL_MASK = np.uint64(SEQ_MASK)

__all__ = ["publish_batch", "publish_all", "publish", "set_values", "count_sessions",
           "gather_rows", "store_rows", "Versions", "versions", "position_rows", "limit_rows",
           "LIMIT_TRIES", "position_values"]


class Versions:
    """The version words of the published tables, as 1-d u8 views (what the seqlocks
    store to): ``pub``, ``ipub``, ``spub``, ``cpub``, ``ctrpub``."""

    __slots__ = ("pub", "ipub", "spub", "cpub", "ctrpub")

    def __init__(self, st):
        self.pub = st.pub["ver"]
        self.ipub = st.ipub["ver"]
        self.spub = st.spub["ver"]
        self.cpub = st.cpub["ver"]
        self.ctrpub = st.ctrpub["ver"]

    def args(self) -> tuple:
        return self.pub, self.ipub, self.spub, self.cpub, self.ctrpub


def versions(st) -> Versions:
    return Versions(st)


# ----------------------------------------------------------------------------- one row each
@njit(cache=True, _nrt=False, inline="always")
def _begin(ver, r):
    v = np.uint64(ver[r] + np.uint64(1))
    store_release(ver, r, v)  # odd: being written
    fence_release()
    return v


@njit(cache=True, _nrt=False, inline="always")
def _end(ver, r, v):
    store_release(ver, r, np.uint64(v + np.uint64(1)))  # even: complete


@njit(cache=True, _nrt=False)
def set_values(row, vals):
    """The SPEC's ten account values of a row (published row or fan-out update) from the
    eight kept tallies ``vals`` (types.K_* order)."""
    row.long_mv = vals[0]
    row.short_mv = vals[1]
    row.gross = vals[0] + vals[1]
    row.net = vals[0] - vals[1]
    row.open_buy_mv = vals[2]
    row.open_sell_mv = vals[3]
    row.worst_gross = vals[4]
    row.margin = vals[5]
    row.beta_net = vals[6]
    row.pnl = vals[7]


@njit(cache=True, _nrt=False)
def _put_row(pub, ver, r, vals, live, breach, gseq, nl, ns):
    v = np.uint64(ver[r] + np.uint64(1))
    store_release(ver, r, v)  # odd: being written
    fence_release()
    row = pub[r]
    row.gseq = gseq
    set_values(row, vals)
    row.live_orders = live
    row.breach = breach
    row.net_long_mv = nl
    row.net_short_mv = ns
    store_release(ver, r, np.uint64(v + np.uint64(1)))  # even: complete


@njit(cache=True)
def publish(st, ver, last_gseq):
    """After a batch: publish the changed accounts' rows and the fund row.

    ``ver`` is ``st.pub['ver']`` (a strided u8 view). Each row is written under its own
    version, so a reader copying one row never waits for more than one row's stores.
    """
    vals = np.empty(8)  # the only allocation: once per batch, not per event
    n = st.ctr[C_NCHANGED]
    for k in range(n):
        a = np.int64(st.changed[k])
        b = np.int64(account_values(st.acc, st.acc_lim, a, vals))
        _put_row(st.pub, ver, a, vals, np.int64(st.acc_live[a]), b, np.uint64(st.acc_gseq[a]),
                 0.0, 0.0)
    for j in range(8):
        vals[j] = st.fund[j, 0] + st.fund[j, 1]
    _put_row(st.pub, ver, np.int64(st.acc.shape[0]), vals, np.int64(st.ctr[C_LIVE]),
             np.int64(0), np.uint64(last_gseq),
             st.fund[K_NET_LONG, 0] + st.fund[K_NET_LONG, 1],
             st.fund[K_NET_SHORT, 0] + st.fund[K_NET_SHORT, 1])


@njit(cache=True, _nrt=False)
def _put_inst(st, iver, i):
    ins = st.inst[i]
    rate = st.rate[ins.currency]
    v = _begin(iver, i)
    p = st.ipub[i]
    val = ins.ref_price * ins.multiplier * rate
    p.gseq = ins.gseq
    p.fund_pos = ins.fund_pos
    p.ref_price = ins.ref_price
    p.open_buy = ins.open_buy
    p.open_sell = ins.open_sell
    p.net_mv = ins.fund_pos * val
    p.gross_mv = ins.abs_pos * val
    p.multiplier = ins.multiplier
    p.margin_rate = ins.margin_rate
    p.beta = ins.beta
    p.sector = ins.sector
    p.marked = ins.marked
    p.rate = rate
    p.currency = ins.currency
    _end(iver, i, v)


@njit(cache=True, _nrt=False)
def _put_sec(st, sver, s):
    v = _begin(sver, s)
    p = st.spub[s]
    p.gseq = st.sec_gseq[s]
    p.net_mv = st.sec[s, K_SEC_NET, 0] + st.sec[s, K_SEC_NET, 1]
    p.gross_mv = st.sec[s, K_SEC_GROSS, 0] + st.sec[s, K_SEC_GROSS, 1]
    _end(sver, s, v)


@njit(cache=True, _nrt=False)
def _put_cell(st, cver, c, gseq):
    cell = st.cells[c]
    ins = st.inst[cell.instrument]
    v = _begin(cver, c)
    p = st.cpub[c]
    p.gseq = gseq
    p.account = cell.account
    p.instrument = cell.instrument
    p.pos = cell.pos
    p.open_buy = cell.open_buy
    p.open_sell = cell.open_sell
    rate = st.rate[ins.currency]
    p.pnl = ins.multiplier * rate * (
        cell.pos * ins.ref_price - cell.sod_qty * cell.sod_price - cell.flow)
    p.mv = cell.pos * (ins.ref_price * ins.multiplier * rate)
    p.sod_qty = cell.sod_qty
    p.sod_price = cell.sod_price
    p.flow = cell.flow
    _end(cver, c, v)


@njit(cache=True, _nrt=False)
def _put_counters(st, ctrver, gseq):
    v = _begin(ctrver, 0)
    p = st.ctrpub[0]
    p.gseq = gseq
    for k in range(st.ctr.shape[0]):
        p.ctr[k] = st.ctr[k]
    _end(ctrver, 0, v)


@njit(cache=True, _nrt=False)
def store_rows(words, ver, idx, src):
    """Write whole rows ``src[j]`` (u8 words, word 0 the version, not copied) to rows
    ``idx[j]`` of a published table (``words``: the table as u8 words, one row per line)
    under each row's version, as the compute stage writes its own rows: a writer other than
    the kernel (the consolidator) publishes in the same format."""
    for j in range(idx.shape[0]):
        r = idx[j]
        v = _begin(ver, r)
        for w in range(1, words.shape[1]):
            words[r, w] = src[j, w]
        _end(ver, r, v)


# ----------------------------------------------------------------------------- feed rows
@njit(cache=True, _nrt=False, inline="always")
def _tag(u, kind, r, now_ns):
    u.kind = kind
    u.breach = 0  # (an account row sets its own)
    u.breach_prev = 0
    u.flags = 0
    u.epoch = 0  # the fan-out writes the epoch it sends under
    u.session = r.session
    u.gseq = r.gseq
    u.sseq = r.sseq
    u.send_ns = r.send_ns
    u.recv_ns = r.recv_ns
    u.compute_ns = now_ns


@njit(cache=True, _nrt=False, inline="always")
def _untag(u, kind, gseq):
    """The head of a row that no event tags (a refresh or snapshot row)."""
    u.kind = kind
    u.breach = 0  # (an account row sets its own)
    u.breach_prev = 0
    u.flags = 0
    u.epoch = 0
    u.session = NO_SESSION
    u.gseq = gseq
    u.sseq = 0
    u.send_ns = 0
    u.recv_ns = 0
    u.compute_ns = 0


@njit(cache=True, _nrt=False, inline="always")
def _clear_body(u):
    """Zero bytes 56..160 of a row (through its account view, whose body covers them all):
    an instrument or sector row leaves some of them reserved, and the buffer is reused."""
    u.live_orders = 0
    u.long_mv = 0.0
    u.short_mv = 0.0
    u.gross = 0.0
    u.net = 0.0
    u.open_buy_mv = 0.0
    u.open_sell_mv = 0.0
    u.worst_gross = 0.0
    u.margin = 0.0
    u.beta_net = 0.0
    u.pnl = 0.0
    u.net_long_mv = 0.0
    u.net_short_mv = 0.0


@njit(cache=True, _nrt=False, inline="always")
def _inst_body(u, p):
    """An instrument feed row's body from its published row ``p``."""
    u.fund_pos = p.fund_pos
    u.ref_price = p.ref_price
    u.open_buy = p.open_buy
    u.open_sell = p.open_sell
    u.net_mv = p.net_mv
    u.gross_mv = p.gross_mv
    u.multiplier = p.multiplier
    u.margin_rate = p.margin_rate
    u.beta = p.beta
    u.sector = p.sector
    u.marked = p.marked
    u.rate = p.rate
    u.currency = p.currency


@njit(cache=True, _nrt=False, inline="always")
def _acc_body(u, p):
    """An account (or fund) feed row's body from its published row ``p``."""
    u.live_orders = p.live_orders
    u.long_mv = p.long_mv
    u.short_mv = p.short_mv
    u.gross = p.gross
    u.net = p.net
    u.open_buy_mv = p.open_buy_mv
    u.open_sell_mv = p.open_sell_mv
    u.worst_gross = p.worst_gross
    u.margin = p.margin
    u.beta_net = p.beta_net
    u.pnl = p.pnl
    u.net_long_mv = p.net_long_mv
    u.net_short_mv = p.net_short_mv


@njit(cache=True, _nrt=False, inline="always")
def _at(recs, g0, n, gseq):
    """The batch record of event ``gseq`` (gseqs are consecutive within a batch)."""
    k = np.int64(gseq) - g0
    if k < 0 or k >= n:
        k = n - 1
    return recs[k]


_AHEAD = 8  # rows fetched ahead by publish_batch (its loops over the changed lists)


@njit(cache=True, _nrt=False, inline="always")
def _fetch_ahead(ids, j, n, rows, pub):
    """Prefetch the lines of row ``ids[j + _AHEAD]`` of ``rows`` and ``pub`` (none past
    ``n``): in a large state (a day's cells and instruments) every changed row misses the
    cache, and fetched early its miss overlaps the rows' work before it."""
    if j + _AHEAD < n:
        k = np.int64(ids[j + _AHEAD])
        prefetch(rows, k)
        prefetch(pub, k)


@njit(cache=True, inline="always")
def publish_batch(st, pver, iver, sver, cver, ctrver, recs, n, arows, irows, srows, now_ns):
    """Publish what the batch of ``recs[:n]`` moved and write its feed rows; returns how
    many feed rows (``arows``, ``irows`` and ``srows`` are views of one buffer, one row per
    index: accounts, then the fund, then instruments, then sectors)."""
    if n == 0:
        return 0
    last = recs[n - 1].gseq
    g0 = np.int64(recs[0].gseq)
    vals = np.empty(8)
    m = 0
    na = st.ctr[C_NCHANGED]
    for j in range(na):
        _fetch_ahead(st.changed, j, na, st.acc, st.pub)
        a = np.int64(st.changed[j])
        b = np.int64(account_values(st.acc, st.acc_lim, a, vals))
        prev = st.pub[a].breach
        g = np.uint64(st.acc_gseq[a])
        _put_row(st.pub, pver, a, vals, np.int64(st.acc_live[a]), b, g, 0.0, 0.0)
        u = arows[m]
        _tag(u, ROW_ACCOUNT, _at(recs, g0, n, g), now_ns)
        u.account = a
        u.breach = b
        u.breach_prev = prev
        _acc_body(u, st.pub[a])
        m += 1
    fa = st.acc.shape[0]
    for t in range(8):
        vals[t] = st.fund[t, 0] + st.fund[t, 1]
    nl = st.fund[K_NET_LONG, 0] + st.fund[K_NET_LONG, 1]
    ns = st.fund[K_NET_SHORT, 0] + st.fund[K_NET_SHORT, 1]
    _put_row(st.pub, pver, fa, vals, np.int64(st.ctr[C_LIVE]), np.int64(0), last, nl, ns)
    u = arows[m]
    _tag(u, ROW_FUND, recs[n - 1], now_ns)
    u.account = -1
    _acc_body(u, st.pub[fa])
    m += 1
    ni = st.ctr[C_NICHANGED]
    for j in range(ni):
        _fetch_ahead(st.ichanged, j, ni, st.inst, st.ipub)
        i = np.int64(st.ichanged[j])
        _put_inst(st, iver, i)
        _clear_body(arows[m])
        u = irows[m]
        _tag(u, ROW_INSTRUMENT, _at(recs, g0, n, st.inst[i].gseq), now_ns)
        u.instrument = i
        _inst_body(u, st.ipub[i])
        m += 1
    for j in range(st.ctr[C_NSCHANGED]):
        s = np.int64(st.schanged[j])
        _put_sec(st, sver, s)
        _clear_body(arows[m])
        u = srows[m]
        _tag(u, ROW_SECTOR, _at(recs, g0, n, st.sec_gseq[s]), now_ns)
        u.sector = s
        u.net_mv = st.spub[s].net_mv
        u.gross_mv = st.spub[s].gross_mv
        m += 1
    nc = st.ctr[C_NCCHANGED]
    for j in range(nc):
        _fetch_ahead(st.cchanged, j, nc, st.cells, st.cpub)
        _put_cell(st, cver, np.int64(st.cchanged[j]), last)
    _put_counters(st, ctrver, last)
    return m


@njit(cache=True, _nrt=False, inline="always")
def _pos_body(u, p):
    """A position feed row's body from its published row ``p`` (types.POSPUB_DTYPE)."""
    u.account = p.account
    u.instrument = p.instrument
    u.pos = p.pos
    u.open_buy = p.open_buy
    u.open_sell = p.open_sell
    u.sod_qty = p.sod_qty
    u.sod_price = p.sod_price
    u.flow = p.flow


@njit(cache=True, _nrt=False, inline="always")
def position_rows(st, recs, n, arows, prows, m, end, cursor, now_ns):
    """The feed's position rows (types.POSITION_ROW_DTYPE) of the cells the batch of
    ``recs[:n]`` moved (``cchanged``, published by :func:`publish_batch`), from the
    ``cursor``-th on, into rows ``m .. end`` of the batch's row buffer (``arows`` and
    ``prows`` views of it), tagged with the batch's last event (their gseq, as the fund's).
    Returns (rows now in the buffer, the next cursor): a batch that moved more cells than
    the buffer holds (a roll) is sent in parts. A cell only revalued (``dirty`` 1: a mark,
    an fx, an instrument change) gets no row: its row holds nothing that moves with prices
    (a receiver derives pnl and mv from the instrument row: :func:`position_values`)."""
    k = np.int64(cursor)
    nc = np.int64(st.ctr[C_NCCHANGED])
    if n == 0:
        return m, nc
    r = recs[n - 1]
    while k < nc and m < end:
        c = np.int64(st.cchanged[k])
        k += 1
        if st.cells[c].dirty == 1:
            continue
        _clear_body(arows[m])
        u = prows[m]
        _tag(u, ROW_POSITION, r, now_ns)
        u.cell = c
        _pos_body(u, st.cpub[c])
        u.gseq = st.cpub[c].gseq
        m += 1
    return m, k


def position_values(pos: np.ndarray, sod_qty: np.ndarray, sod_price: np.ndarray,
                    flow: np.ndarray, ref_price: np.ndarray, multiplier: np.ndarray,
                    rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(pnl, mv) of position rows (the feed's kind 5: pos, sod_qty, sod_price, flow)
    at their instruments' ``ref_price``, ``multiplier`` and ``rate`` (the instrument rows'),
    by the node's own expressions (``_put_cell``), so equal to its published figures bit
    for bit: pnl = multiplier x rate x (pos x ref_price - sod_qty x sod_price - flow),
    mv = pos x (ref_price x multiplier x rate)."""
    p = np.asarray(pos, np.int64).astype(np.float64)
    q = np.asarray(sod_qty, np.int64).astype(np.float64)
    ref = np.asarray(ref_price, np.float64)
    mult = np.asarray(multiplier, np.float64)
    r = np.asarray(rate, np.float64)
    pnl = mult * r * (p * ref - q * np.asarray(sod_price, np.float64)
                      - np.asarray(flow, np.float64))
    mv = p * (ref * mult * r)
    return pnl, mv


@njit(cache=True, _nrt=False, inline="always")
def _lim_body(u, lim, a):
    u.gross_limit = lim[a, 0]
    u.net_limit = lim[a, 1]
    u.margin_limit = lim[a, 2]
    u.loss_limit = lim[a, 3]


@njit(cache=True, _nrt=False, inline="always")
def limit_rows(st, recs, n, sent, arows, lrows, m, now_ns):
    """Feed version 4's limits rows (types.LIMITS_ROW_DTYPE): one for each account the
    batch moved whose limits differ from ``sent`` (the limits last sent, [A, 4], the
    compute stage's own; updated here), appended at row ``m`` of the batch's row buffer
    and tagged with the event that last moved the account. Returns the rows now in it."""
    if n == 0:
        return m
    g0 = np.int64(recs[0].gseq)
    lim = st.acc_lim
    for j in range(st.ctr[C_NCHANGED]):
        a = np.int64(st.changed[j])
        same = True
        for q in range(4):
            if lim[a, q] != sent[a, q]:
                same = False
                sent[a, q] = lim[a, q]
        if same:
            continue
        _clear_body(arows[m])
        u = lrows[m]
        _tag(u, ROW_LIMITS, _at(recs, g0, n, st.acc_gseq[a]), now_ns)
        u.account = a
        _lim_body(u, lim, a)
        m += 1
    return m


@njit(cache=True)
def _publish_rest(st, iver, sver, cver, ctrver, last):
    for i in range(st.inst.shape[0]):
        _put_inst(st, iver, i)
    for s in range(st.sec.shape[0]):
        _put_sec(st, sver, s)
    for c in range(st.ctr[C_CELLS]):
        _put_cell(st, cver, c, last)
    _put_counters(st, ctrver, last)


def publish_all(st, vers: Versions, last_gseq: int) -> None:
    """Republish every row (a recovered or reloaded state): accounts that never moved get
    zero rows with gseq 0, so no row of a previous incarnation survives."""
    n = 0
    for a in range(st.acc.shape[0]):  # every account, moved or not (Python: once per start)
        st.changed[n] = a
        n += 1
    st.ctr[C_NCHANGED] = n
    publish(st, vers.pub, np.uint64(last_gseq))
    st.ctr[C_NCHANGED] = 0
    _publish_rest(st, vers.ipub, vers.spub, vers.cpub, vers.ctrpub, np.uint64(last_gseq))


# ----------------------------------------------------------------------------- sessions
@njit(cache=True, _nrt=False, nogil=True, inline="always")
def count_sessions(recs, status, n, sess_flat, ncols, rlog):
    """Each session's rejects per reason, and each reject's (seq, reason) in the session's
    reject log (``rlog``: the log's rows flat, :mod:`exposure.shm.reject_layout`; an empty
    array for none), then its processed seq (after its counters and log), then the
    batch's last gseq in row 0 (``N_PROCESSED``: ingest's one look per pass)."""
    nsess = sess_flat.shape[0] // ncols
    nlog = rlog.shape[0] // _RL_ROW
    for k in range(n):
        s = np.int64(recs[k].session)
        if s < nsess:
            code = status[k]
            if code != 0 and code < N_REJ:
                sess_flat[s * ncols + S_REJ + code] += np.uint64(1)
                if s < nlog:  # the entry, then (release) the head that covers it
                    row = s * _RL_ROW
                    h = rlog[row + _RL_HEAD]
                    rlog[row + _RL_ENTRY + np.int64(h % _RL_RING)] = (
                        ((recs[k].sseq & _RL_MASK) << np.uint64(8)) | np.uint64(code))
                    store_release(rlog, row + _RL_HEAD, h + np.uint64(1))
    for k in range(n):  # then the processed marks, each after its counters (release)
        s = np.int64(recs[k].session)
        if s < nsess and recs[k].sseq > sess_flat[s * ncols + S_DONE]:
            store_release(sess_flat, s * ncols + S_DONE, recs[k].sseq)
    if n > 0 and ncols > N_PROCESSED and nsess > 0:  # then the batch's gseq, row 0 (release)
        store_release(sess_flat, N_PROCESSED, recs[n - 1].gseq)


# ----------------------------------------------------------------------------- reading back
# Tries of the state's seqlock for one account's limits (a batch being applied holds it
# odd for microseconds; past this many the row is left for the next cycle or snapshot).
LIMIT_TRIES = 100_000


@njit(cache=True, _nrt=False)
def _read_limits(st, words, a, out):
    """Account ``a``'s limits into ``out[:4]`` and its gseq (the event that last moved it:
    within an epoch the limits are a function of it), read under the state's seqlock
    (``words``: the tally segment as u8 words); -1 if the seqlock never held still."""
    for _ in range(LIMIT_TRIES):
        v = read_begin(words)
        if v & np.uint64(1):
            continue
        g = st.acc_gseq[a]
        for q in range(4):
            out[q] = st.acc_lim[a, q]
        if read_end(words) == v:
            return np.int64(g)
    return np.int64(-1)


@njit(cache=True)
def gather_rows(st, pver, iver, sver, cver, words, cursor, limit, scan, positions, arows,
                irows, srows, prows, lrows, tmp_a, tmp_i, tmp_s, tmp_p):
    """Feed rows (untagged) of the published rows that ever moved (gseq != 0), starting at
    position ``cursor`` of the cycle accounts, fund, instruments, sectors, position cells
    (with ``positions``; the cells in use and the ones a roll freed: the published cells
    up to the first that never moved) and limits (every account that ever moved, read
    under the state's seqlock: ``words``); at most ``limit`` rows and ``scan`` positions
    looked at. Each row is copied consistently on its own. Returns (rows written, next
    cursor); the cursor wraps to 0 after the last account's limits.

    ``tmp_a``/``tmp_i``/``tmp_s``/``tmp_p``: one-row scratch arrays of
    PUBROW/INSTPUB/SECPUB/POSPUB dtype."""
    A1 = st.pub.shape[0]  # accounts + the fund
    I = st.ipub.shape[0]
    S = st.spub.shape[0]
    C = st.cpub.shape[0] if positions else 0
    A = st.acc.shape[0]
    total = A1 + I + S + C + A
    lim = np.empty(4)
    m = 0
    looked = 0
    pos = cursor
    while m < limit and looked < scan:
        if pos >= total:
            pos = 0
            break
        if pos < A1:
            r = pos
            read_row(st.pub, pver, r, tmp_a)
            p = tmp_a[0]
            if p.gseq != 0:
                u = arows[m]
                fund = r == A1 - 1
                _untag(u, ROW_FUND if fund else ROW_ACCOUNT, p.gseq)
                u.account = -1 if fund else r
                u.breach = p.breach
                u.breach_prev = p.breach
                _acc_body(u, p)
                m += 1
        elif pos < A1 + I:
            i = pos - A1
            read_row(st.ipub, iver, i, tmp_i)
            p = tmp_i[0]
            if p.gseq != 0:
                _clear_body(arows[m])
                u = irows[m]
                _untag(u, ROW_INSTRUMENT, p.gseq)
                u.instrument = i
                _inst_body(u, p)
                m += 1
        elif pos < A1 + I + S:
            s = pos - A1 - I
            read_row(st.spub, sver, s, tmp_s)
            p = tmp_s[0]
            if p.gseq != 0:
                _clear_body(arows[m])
                u = srows[m]
                _untag(u, ROW_SECTOR, p.gseq)
                u.sector = s
                u.net_mv = p.net_mv
                u.gross_mv = p.gross_mv
                m += 1
        elif pos < A1 + I + S + C:
            c = pos - A1 - I - S
            read_row(st.cpub, cver, c, tmp_p)
            p = tmp_p[0]
            if p.gseq == 0:  # cells are taken in order: none moved beyond this one
                pos = A1 + I + S + C
                looked += 1
                continue
            _clear_body(arows[m])
            u = prows[m]
            _untag(u, ROW_POSITION, p.gseq)
            u.cell = c
            _pos_body(u, p)
            m += 1
        else:
            a = pos - A1 - I - S - C
            g = _read_limits(st, words, a, lim)
            if g > 0:
                _clear_body(arows[m])
                u = lrows[m]
                _untag(u, ROW_LIMITS, np.uint64(g))
                u.account = a
                u.gross_limit = lim[0]
                u.net_limit = lim[1]
                u.margin_limit = lim[2]
                u.loss_limit = lim[3]
                m += 1
        pos += 1
        looked += 1
    if pos >= total:
        pos = 0
    return m, pos
