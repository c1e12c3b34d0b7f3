"""The tally kernel: applies event records to the state, exactly as shared/SPEC.md says.

Plain ``@njit`` functions over the numpy views of :mod:`exposure.shm.tally_layout`; no
allocation per event, no Python per event. The entry point is :func:`apply_batch`.

How the tallies stay incremental
--------------------------------
Every tally is a sum of *contributions*: a cell contributes eight numbers to its account
and to the fund (long, short, open buy/sell, worst gross, margin, beta, pnl; see
:func:`_contrib`), and an instrument contributes four to the fund and its sector (net
long/short of its fund position, sector net and gross). When an event changes a cell, the
kernel computes the cell's contribution before and after from the cell's state and the
instrument's reference data and moves the sums by the difference. A mark, a reference
price change or an ``instrument`` event walks the instrument's chain of cells and does the
same for each. Every value is in the base currency (SPEC section 7): an instrument's is
ref_price x multiplier x ``st.rate[currency]``, and an ``fx`` event walks its currency's
chain of instruments (``st.cur_head``, ``inst.cnext``), revaluing each as a mark would, at
the old rate and then the new one (the chains are doubly linked, ``st.cprev``, so an
instrument changes currency in O(1)). Nothing is recomputed from scratch.

Each sum is kept as a (value, compensation) pair with compensated (TwoSum) addition, and
the old contribution is removed with the bit-identical float it was added with, so a tally
whose cells all return to zero returns to (almost exactly) zero after any number of events:
the result does not drift with the length of the day.

Tables
------
* live orders: open addressing with linear probing keyed by (source, order_id); deletion by
  backward shift, so probe chains stay correct without tombstones however many times keys
  are reused. Load factor at most 1/2 at full capacity. 16 consecutive ids of a source
  share an aligned run of slots (OMS ids are sequential), the runs are scattered.
* cells: an insert-only linear-probing index keyed by account * instruments + instrument,
  plus a singly linked chain of cells per instrument (``inst.head`` / ``cell.next``).

Memory
------
The tables are far larger than the caches, and a dependent miss costs ~180 ns here. The
batch loop prefetches, 16 records ahead, each record's order slot, cell-index slot and
instrument row (all computable from the record alone) and, 8 records ahead, its cell row
(named by the slots fetched in the first stage), so misses overlap instead of queueing.

Changed accounts
----------------
Each batch bumps a stamp; an account moved by an accepted event is appended once per batch
to ``st.changed`` (``ctr[C_NCHANGED]`` entries) and its ``acc_gseq`` is set to the event's
global sequence number. Instruments (``inst.gseq``), sectors (``sec_gseq``) and cells are
listed the same way in ``ichanged``, ``schanged`` and ``cchanged``, deduplicated by a dirty
flag that the next batch clears (a cell's is 1 when it was only revalued by a price, 2 when
its quantities or P&L terms moved: only those go on the feed as position rows, whose
receivers derive P&L and value from the instrument row). :mod:`exposure.engine.publish`
publishes exactly those rows, and
the fan-out sends them (conflated: the latest state of each, tagged with the last event
that moved it).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    B_GROSS,
    B_LOSS,
    B_MARGIN,
    B_NET,
    B_WORST,
    C_ACCEPTED,
    C_BCAST_ACCEPTED,
    C_BCAST_BAD_FIELD,
    C_BCAST_OUT_OF_RANGE,
    C_BUSTS,
    C_CELLS,
    C_EVENTS,
    C_LAST_GSEQ,
    C_LATE_FILLS,
    C_LIVE,
    C_MAX_ORDERS,
    C_MAX_SOURCES,
    C_NCCHANGED,
    C_NCHANGED,
    C_NICHANGED,
    C_NSCHANGED,
    C_REJECTED,
    C_REJECTS,
    C_ROLL_DATE,
    C_ROLL_GSEQ,
    C_ROLLS,
    C_STAMP,
    C_UNAUTHORIZED,
    F_HAS_PRICE,
    K_LONG,
    K_MARGIN,
    K_NET_LONG,
    K_NET_SHORT,
    K_PNL,
    K_SEC_GROSS,
    K_SEC_NET,
    K_SHORT,
    K_WORST,
    L_GROSS,
    L_LOSS,
    L_MARGIN,
    L_NET,
    MAX_ORDER_ID,
    MAX_QTY,
    N_CELL_TALLIES,
    N_CURRENCIES,
    R_BAD_FIELD,
    R_BAD_TYPE,
    R_CAPACITY,
    R_DUPLICATE_ORDER,
    R_FILL_MISMATCH,
    R_OUT_OF_RANGE,
    R_UNAUTHORIZED,
    R_UNKNOWN_ORDER,
    R_WRONG_PARTITION,
    S_ACCEPTED,
    S_LATE_FILL,
    SIDE_BUY,
    SIDE_SHORT,
    T_BUST,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_FX,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_MAX,
    T_NEW,
    T_POSITION,
    T_REPLACE,
    T_ROLL,
)
from exposure.shm.intrinsics import prefetch

__all__ = ["apply_batch", "breach_flags", "account_values", "order_home", "cell_home"]

_U64 = np.uint64
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S4 = np.uint64(4)
_LOOKAHEAD = 16  # records ahead whose hash slots are prefetched (stage 1)
_LOOKAHEAD2 = 8  # records ahead whose cell rows are prefetched (stage 2)
_MAX_OID = np.uint64(MAX_ORDER_ID)


# ----------------------------------------------------------------------------- hashing
@njit(cache=True, _nrt=False)
def _mix(x):
    """murmur3's 64-bit finaliser: every input bit affects every output bit."""
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
    return x


@njit(cache=True, _nrt=False)
def order_home(source, order_id, mask):
    """Home slot of (source, order_id): blocks of 16 consecutive ids of a source share an
    aligned run of 16 slots (sequential ids from an OMS stay on adjacent cache lines);
    the blocks themselves are scattered by a full-avalanche hash."""
    h = _mix((order_id >> _S4) ^ (_U64(source) * _GOLDEN))
    return np.int64(((h << _S4) | (order_id & _U64(15))) & _U64(mask))


# ----------------------------------------------------------------------------- sums
@njit(cache=True, _nrt=False)
def _kadd(t, k, x):
    """t[k] += x as a compensated sum: t[k, 0] value, t[k, 1] the low bits lost so far.

    Knuth's TwoSum gives the exact rounding error of ``s + x`` without a branch (Neumaier's
    ``abs(s) >= abs(x)`` test mispredicts about half the time on real flows).
    """
    s = t[k, 0]
    u = s + x
    bp = u - s
    t[k, 1] += (s - (u - bp)) + (x - bp)
    t[k, 0] = u


@njit(cache=True, _nrt=False)
def _move(t, k, old, new):
    if old != new:
        _kadd(t, k, -old)
        _kadd(t, k, new)


# ----------------------------------------------------------------------------- contributions
@njit(cache=True, _nrt=False)
def _contrib(pos, ob, os_, sod_qty, sod_price, flow, ref, mult, mr, beta, rate):
    """The eight numbers a cell adds to its account (types.K_* order), in the base
    currency: ``rate`` is that of the instrument's currency (SPEC section 7)."""
    v = ref * mult * rate
    p = float(pos)
    lng = p * v if pos > 0 else 0.0
    sht = -p * v if pos < 0 else 0.0
    w = max(abs(pos + ob), abs(pos - os_))
    ap = abs(p)
    return (
        lng,
        sht,
        float(ob) * v,
        float(os_) * v,
        float(w) * v,
        ap * v * mr,
        p * v * beta,
        mult * rate * (p * ref - float(sod_qty) * sod_price - flow),
    )


@njit(cache=True, _nrt=False)
def _cell_contrib(cells, c, ref, mult, mr, beta, rate):
    return _contrib(cells[c].pos, cells[c].open_buy, cells[c].open_sell, cells[c].sod_qty,
                    cells[c].sod_price, cells[c].flow, ref, mult, mr, beta, rate)


@njit(cache=True, _nrt=False)
def _inst_contrib(fund_pos, abs_pos, ref, mult, rate):
    """(net long, net short, sector net, sector gross) of one instrument."""
    v = ref * mult * rate
    fp = float(fund_pos)
    nl = fp * v if fund_pos > 0 else 0.0
    ns = -fp * v if fund_pos < 0 else 0.0
    return (nl, ns, fp * v, float(abs_pos) * v)


@njit(inline="always", cache=True, _nrt=False)
def _inst_now(st, i):
    return _inst_contrib(st.inst[i].fund_pos, st.inst[i].abs_pos, st.inst[i].ref_price,
                         st.inst[i].multiplier, st.rate[st.inst[i].currency])


@njit(cache=True, _nrt=False)
def _move2(t, f, k, o, n):
    """Move column ``k`` of account tallies ``t`` and fund tallies ``f`` from o to n."""
    if o != n:
        _kadd(t, k, -o)
        _kadd(t, k, n)
        _kadd(f, k, -o)
        _kadd(f, k, n)


@njit(cache=True, _nrt=False)
def _apply_cell(t, f, old, new):
    """Move account tallies ``t`` and fund tallies ``f`` from contributions old to new.

    Written out, not looped: indexing a tuple with a loop variable compiles to a jump
    table per access, which mispredicts on every iteration.
    """
    _move2(t, f, 0, old[0], new[0])
    _move2(t, f, 1, old[1], new[1])
    _move2(t, f, 2, old[2], new[2])
    _move2(t, f, 3, old[3], new[3])
    _move2(t, f, 4, old[4], new[4])
    _move2(t, f, 5, old[5], new[5])
    _move2(t, f, 6, old[6], new[6])
    _move2(t, f, 7, old[7], new[7])


@njit(cache=True, _nrt=False)
def _apply_inst(fund, sec, s_old, old, s_new, new):
    """Move the fund's net long/short and the sector sums of one instrument."""
    _move(fund, K_NET_LONG, old[0], new[0])
    _move(fund, K_NET_SHORT, old[1], new[1])
    if s_old == s_new:
        _move(sec[s_new], K_SEC_NET, old[2], new[2])
        _move(sec[s_new], K_SEC_GROSS, old[3], new[3])
    else:
        _kadd(sec[s_old], K_SEC_NET, -old[2])
        _kadd(sec[s_old], K_SEC_GROSS, -old[3])
        _kadd(sec[s_new], K_SEC_NET, new[2])
        _kadd(sec[s_new], K_SEC_GROSS, new[3])


@njit(inline="always", cache=True, _nrt=False)
def _touch(st, a, gseq):
    """Record that account ``a`` moved in this batch (once per batch in ``changed``)."""
    stamp = st.ctr[C_STAMP]
    if st.acc_stamp[a] != stamp:
        st.acc_stamp[a] = stamp
        n = st.ctr[C_NCHANGED]
        st.changed[n] = a
        st.ctr[C_NCHANGED] = n + 1
    st.acc_gseq[a] = gseq


@njit(inline="always", cache=True, _nrt=False)
def _touch_inst(st, i, gseq):
    """Record that instrument ``i``'s row moved (once per batch in ``ichanged``)."""
    ins = st.inst[i]
    if ins.dirty == 0:
        ins.dirty = 1
        n = st.ctr[C_NICHANGED]
        st.ichanged[n] = i
        st.ctr[C_NICHANGED] = n + 1
    ins.gseq = gseq


@njit(inline="always", cache=True, _nrt=False)
def _touch_sec(st, s, gseq):
    """Record that sector ``s`` moved (once per batch in ``schanged``)."""
    if st.sec_dirty[s] == 0:
        st.sec_dirty[s] = 1
        n = st.ctr[C_NSCHANGED]
        st.schanged[n] = s
        st.ctr[C_NSCHANGED] = n + 1
    st.sec_gseq[s] = gseq


@njit(inline="always", cache=True, _nrt=False)
def _touch_cell(st, c):
    """Record that cell ``c``'s quantities or P&L terms moved (once per batch in
    ``cchanged``, dirty 2: its published row and its feed position row)."""
    cell = st.cells[c]
    if cell.dirty == 0:
        n = st.ctr[C_NCCHANGED]
        st.cchanged[n] = c
        st.ctr[C_NCCHANGED] = n + 1
    cell.dirty = 2


@njit(inline="always", cache=True, _nrt=False)
def _revalue_touch_cell(st, c):
    """Record that cell ``c`` was only revalued (dirty 1 unless already listed: its
    published row's pnl and mv move, the feed sends no position row for it)."""
    cell = st.cells[c]
    if cell.dirty == 0:
        cell.dirty = 1
        n = st.ctr[C_NCCHANGED]
        st.cchanged[n] = c
        st.ctr[C_NCCHANGED] = n + 1


@njit(cache=True, _nrt=False)
def _clear_changed(st):
    """Empty the instrument, sector and cell lists of the previous batch (their flags)."""
    ctr = st.ctr
    for k in range(ctr[C_NICHANGED]):
        st.inst[st.ichanged[k]].dirty = 0
    for k in range(ctr[C_NSCHANGED]):
        st.sec_dirty[st.schanged[k]] = 0
    for k in range(ctr[C_NCCHANGED]):
        st.cells[st.cchanged[k]].dirty = 0
    ctr[C_NICHANGED] = 0
    ctr[C_NSCHANGED] = 0
    ctr[C_NCCHANGED] = 0


# ----------------------------------------------------------------------------- revaluation
@njit(inline="always", cache=True, _nrt=False)
def _revalue_cells(st, i, ref, mult, mr, beta, o_rate, rate, gseq):
    """Move the tallies of instrument ``i``'s cells from its current reference data and
    the rate ``o_rate`` to (ref, mult, mr, beta) and ``rate``; the caller then stores them."""
    ins = st.inst[i]
    o_ref, o_mult, o_mr, o_beta = ins.ref_price, ins.multiplier, ins.margin_rate, ins.beta
    c = ins.head
    while c >= 0:
        old = _cell_contrib(st.cells, c, o_ref, o_mult, o_mr, o_beta, o_rate)
        new = _cell_contrib(st.cells, c, ref, mult, mr, beta, rate)
        a = st.cells[c].account
        _apply_cell(st.acc[a], st.fund, old, new)
        _touch(st, a, gseq)
        _revalue_touch_cell(st, c)
        c = st.cells[c].next


@njit(cache=True, _nrt=False)
def _chain_move(inst, cur_head, cprev, i, o_cur, cur):
    """Move instrument ``i`` from currency ``o_cur``'s chain to ``cur``'s (the base
    currency, 0, has none): doubly linked (``inst.cnext``, ``cprev``), so O(1) whatever the
    chains' lengths."""
    if o_cur != 0:
        p = np.int64(cprev[i])
        n = np.int64(inst[i].cnext)
        if p >= 0:
            inst[p].cnext = n
        else:
            cur_head[o_cur] = n
        if n >= 0:
            cprev[n] = p
    if cur != 0:
        h = np.int64(cur_head[cur])
        inst[i].cnext = h
        if h >= 0:
            cprev[h] = i
        cur_head[cur] = i
    else:
        inst[i].cnext = -1
    cprev[i] = -1


@njit(inline="always", cache=True, _nrt=False)
def _revalue(st, i, ref, mult, mr, beta, sector, cur, gseq):
    """Change instrument ``i``'s reference data (currency ``cur`` included) and move every
    tally that depends on it."""
    ins = st.inst[i]
    old_i = _inst_now(st, i)
    s_old = ins.sector
    o_cur = np.int64(ins.currency)
    _revalue_cells(st, i, ref, mult, mr, beta, st.rate[o_cur], st.rate[cur], gseq)
    ins.ref_price = ref
    ins.multiplier = mult
    ins.margin_rate = mr
    ins.beta = beta
    ins.sector = sector
    if cur != o_cur:  # the currency chains: only currencies other than the base have one
        _chain_move(st.inst, st.cur_head, st.cprev, i, o_cur, cur)
        ins.currency = cur
    _apply_inst(st.fund, st.sec, s_old, old_i, sector, _inst_now(st, i))
    _touch_inst(st, i, gseq)
    _touch_sec(st, s_old, gseq)
    _touch_sec(st, sector, gseq)


@njit(cache=True, _nrt=False)
def _fx(st, cur, rate, gseq):
    """SPEC section 7's ``fx``: currency ``cur``'s rate becomes ``rate``, which moves every
    tally of every instrument quoted in it, as a mark moves one instrument's. A call of its
    own (off the per-event path, like the roll): it walks the currency's chain of
    instruments and each one's chain of cells, with the same before/after brackets as
    :func:`_revalue`."""
    o_rate = st.rate[cur]
    if rate == o_rate:
        return
    i = np.int64(st.cur_head[cur])
    while i >= 0:
        ins = st.inst[i]
        old_i = _inst_now(st, i)
        _revalue_cells(st, i, ins.ref_price, ins.multiplier, ins.margin_rate, ins.beta,
                       o_rate, rate, gseq)
        s = np.int64(ins.sector)
        new_i = _inst_contrib(ins.fund_pos, ins.abs_pos, ins.ref_price, ins.multiplier, rate)
        _apply_inst(st.fund, st.sec, s, old_i, s, new_i)
        _touch_inst(st, i, gseq)
        _touch_sec(st, s, gseq)
        i = np.int64(ins.cnext)
    st.rate[cur] = rate


# ----------------------------------------------------------------------------- tables
@njit(cache=True, _nrt=False)
def _order_find(orders, source, order_id):
    """Slot of (source, order_id) if live (>= 0), else -(free slot + 1)."""
    mask = orders.shape[0] - 1
    h = order_home(source, order_id, mask)
    while True:
        if orders[h].cell < 0:
            return -h - 1
        if orders[h].order_id == order_id and orders[h].source == source:
            return h
        h = (h + 1) & mask


@njit(cache=True, _nrt=False)
def _order_delete(orders, i):
    """Remove slot ``i`` by backward shift (Knuth 6.4 Algorithm R): no tombstones."""
    mask = orders.shape[0] - 1
    j = i
    while True:
        j = (j + 1) & mask
        if orders[j].cell < 0:
            break
        k = order_home(orders[j].source, orders[j].order_id, mask)
        # Entry j may move to the hole i only if its home k is not cyclically in (i, j].
        if i <= j:
            if i < k <= j:
                continue
        elif k > i or k <= j:
            continue
        orders[i].order_id = orders[j].order_id
        orders[i].open = orders[j].open
        orders[i].filled = orders[j].filled
        orders[i].cell = orders[j].cell
        orders[i].source = orders[j].source
        orders[i].side = orders[j].side
        i = j
    orders[i].cell = -1


@njit(cache=True, _nrt=False)
def cell_home(cidx, key):
    """Home slot of position cell ``key`` in the cell index ``cidx`` (a power-of-two
    table; linear probing from here: :func:`_cell_slot`)."""
    return np.int64(_mix(_U64(key)) & _U64(cidx.shape[0] - 1))


@njit(cache=True, _nrt=False)
def _cell_slot(cidx, key):
    """Slot of ``key`` in the cell index, or -(free slot + 1)."""
    mask = cidx.shape[0] - 1
    h = cell_home(cidx, key)
    while True:
        k = cidx[h].key
        if k == key:
            return h
        if k < 0:
            return -h - 1
        h = (h + 1) & mask


@njit(inline="always", cache=True, _nrt=False)
def _cell_get(st, a, i):
    """Cell id of (a, i), creating it; -1 when the cell table is full."""
    key = np.int64(a) * st.inst.shape[0] + i
    h = _cell_slot(st.cidx, key)
    if h >= 0:
        return np.int64(st.cidx[h].id)
    n = st.ctr[C_CELLS]
    if n >= st.cells.shape[0]:
        return -1
    h = -h - 1
    st.cidx[h].key = key
    st.cidx[h].id = n
    st.ctr[C_CELLS] = n + 1
    cell = st.cells[n]
    cell.account = a
    cell.instrument = i
    cell.pos = 0
    cell.open_buy = 0
    cell.open_sell = 0
    cell.sod_qty = 0
    cell.sod_price = 0.0
    cell.flow = 0.0
    cell.next = st.inst[i].head
    st.inst[i].head = n
    return n


@njit(inline="always", cache=True, _nrt=False)
def _open_add(st, c, side, q):
    """Add ``q`` (may be negative) to the open quantity on ``side`` of cell ``c``."""
    i = st.cells[c].instrument
    if side == SIDE_BUY:
        st.cells[c].open_buy += q
        st.inst[i].open_buy += q
    else:
        st.cells[c].open_sell += q
        st.inst[i].open_sell += q


@njit(cache=True, _nrt=False)
def _finite(x):
    return np.isfinite(x)


@njit(cache=True, _nrt=False)
def _roll_date_ok(q):
    """A roll's ``qty``: 0 (undated) or a calendar date YYYYMMDD from 1900-01-01 to
    9999-12-31 (the rule of :func:`exposure.core.day.date_code`, which the parser uses)."""
    if q == 0:
        return True
    if q < 19000101 or q > 99991231:
        return False
    y = q // 10000
    m = (q // 100) % 100
    d = q % 100
    if m < 1 or m > 12 or d < 1:
        return False
    if m == 2:
        leap = (y % 4 == 0 and y % 100 != 0) or y % 400 == 0
        return d <= (29 if leap else 28)
    if m == 4 or m == 6 or m == 9 or m == 11:
        return d <= 30
    return d <= 31


# ----------------------------------------------------------------------------- the roll
@njit(cache=True, _nrt=False)
def _roll(st, gseq):
    """SPEC section 6's ``roll``: a new trading day.

    Every cell's start of day becomes its position at the instrument's reference price and
    its flow 0, moving its P&L contribution (and so its account's and the fund's) to 0 by
    the usual bracket. Then the cells with no position and no live order (every live order
    has open quantity > 0, so: pos, open_buy and open_sell all 0) are forgotten: their
    contributions are all exactly 0 by now, so no tally moves. The cell table is compacted
    in place (survivors keep their order, so ids only go down), which keeps "cells
    ``0..ctr[C_CELLS]-1`` are in use" true for every reader; ``cchanged`` serves as the
    old-to-new id map while the live orders' cell ids are rewritten, then the cell index and
    the instruments' cell chains are rebuilt. Afterwards ``cchanged`` lists every old id:
    the survivors under their new ids and the freed rows (zeroed, account -1), so the
    published position rows of the freed ids stop showing an old (account, instrument).

    A roll costs a pass over the cells, the order slots and the cell-index slots (14 ms
    for 98,000 cells at the default capacities): once a day, off the per-event path.
    """
    cells = st.cells
    inst = st.inst
    n = np.int64(st.ctr[C_CELLS])
    # The previous events of this batch listed some cells; the list is rebuilt below, to
    # cover them all (an earlier roll of the batch may have listed freed ids beyond n).
    hi = n
    for k in range(st.ctr[C_NCCHANGED]):
        cells[st.cchanged[k]].dirty = 0
        hi = max(hi, np.int64(st.cchanged[k]) + 1)
    st.ctr[C_NCCHANGED] = 0
    # 1. the start of the day, cell by cell (every account with a cell is touched)
    for c in range(n):
        i = cells[c].instrument
        ins = inst[i]
        ref, mult, mr, beta = ins.ref_price, ins.multiplier, ins.margin_rate, ins.beta
        rate = st.rate[ins.currency]
        old = _cell_contrib(cells, c, ref, mult, mr, beta, rate)
        cells[c].sod_qty = cells[c].pos
        cells[c].sod_price = ref
        cells[c].flow = 0.0
        a = cells[c].account
        _apply_cell(st.acc[a], st.fund, old,
                    _cell_contrib(cells, c, ref, mult, mr, beta, rate))
        _touch(st, a, gseq)
    # 2. compaction: cchanged[old id] = new id, or -1 for a forgotten cell
    m = np.int64(0)
    for c in range(n):
        if cells[c].pos != 0 or cells[c].open_buy != 0 or cells[c].open_sell != 0:
            if m != c:
                cells[m] = cells[c]
            st.cchanged[c] = m
            m += 1
        else:
            st.cchanged[c] = -1
    if m < n:
        for k in range(st.orders.shape[0]):  # live orders only point at kept cells
            oc = st.orders[k].cell
            if oc >= 0:
                st.orders[k].cell = st.cchanged[oc]
        for h in range(st.cidx.shape[0]):
            st.cidx[h].key = -1
            st.cidx[h].id = -1
        nin = np.int64(inst.shape[0])
        for i in range(nin):  # (the moved rows hide which instruments had cells)
            inst[i].head = -1
        for c in range(m):  # the index and the chains again, in id order
            a = np.int64(cells[c].account)
            i = np.int64(cells[c].instrument)
            h = -_cell_slot(st.cidx, a * nin + i) - 1
            st.cidx[h].key = a * nin + i
            st.cidx[h].id = c
            cells[c].next = inst[i].head
            inst[i].head = c
        for c in range(m, n):  # freed rows: nobody's
            cells[c].pos = 0
            cells[c].open_buy = 0
            cells[c].open_sell = 0
            cells[c].sod_qty = 0
            cells[c].sod_price = 0.0
            cells[c].flow = 0.0
            cells[c].account = -1
            cells[c].instrument = 0
            cells[c].next = -1
        st.ctr[C_CELLS] = m
    # 3. every row changed (pnl 0) or was freed: list them all
    for c in range(hi):  # (dirty 2: their start of day moved, the feed sends them all)
        cells[c].dirty = 2
        st.cchanged[c] = c
    st.ctr[C_NCCHANGED] = hi


# ----------------------------------------------------------------------------- events
# Why one step function: numba compiles each @njit function separately and calls it with
# every argument flattened; passing the State (14 arrays) costs ~100 stack pushes per call.
# So every function that takes the State is inlined by numba (``inline="always"``) into one
# step body in which each appears once (one lookup site, one revaluation site, one
# before/after bracket): nothing is duplicated. Small helpers over scalars or one array
# (_kadd, _contrib, hashing, probing) stay ordinary functions: LLVM inlines them after
# linking, and numba's IR-level inlining of dozens of call sites would take minutes to
# compile.

@njit(inline="always", cache=True, _nrt=False)
def _validate(st, r, t):
    """Reasons 1-3 of the SPEC (bad_type, bad_field, out_of_range) for record ``r``, then
    a cluster's wrong_partition (SPEC section 5), which ingest marked."""
    wrong_partition = r.reject == R_WRONG_PARTITION
    if r.reject != 0 and not wrong_partition:  # decided before the kernel (the JSON form)
        return R_BAD_TYPE if r.reject == R_BAD_TYPE else R_BAD_FIELD
    if t < 1 or t > T_MAX:
        return R_BAD_TYPE
    price = r.price
    if t == T_NEW or t == T_FILL or t == T_BUST:
        if (r.side < SIDE_BUY or r.side > SIDE_SHORT or r.qty < 1 or r.qty > MAX_QTY
                or not _finite(price) or r.order_id >= _MAX_OID
                or (t == T_NEW and price < 0.0) or (t != T_NEW and price <= 0.0)):
            return R_BAD_FIELD
        if (r.account >= st.acc.shape[0] or r.instrument >= st.inst.shape[0]
                or r.source >= st.ctr[C_MAX_SOURCES]):
            return R_OUT_OF_RANGE
    elif t == T_CANCEL or t == T_DONE or t == T_REPLACE:
        if t == T_REPLACE and (r.qty < 1 or r.qty > MAX_QTY or not _finite(price)
                               or price < 0.0):
            return R_BAD_FIELD
        if r.order_id >= _MAX_OID:
            return R_BAD_FIELD
        if r.source >= st.ctr[C_MAX_SOURCES]:
            return R_OUT_OF_RANGE
    elif t == T_MARK:
        if not _finite(price) or price <= 0.0:
            return R_BAD_FIELD
        if r.instrument >= st.inst.shape[0]:
            return R_OUT_OF_RANGE
    elif t == T_POSITION:
        if r.qty < -MAX_QTY or r.qty > MAX_QTY or (
                (r.flags & F_HAS_PRICE) != 0 and (not _finite(price) or price <= 0.0)):
            return R_BAD_FIELD
        if r.account >= st.acc.shape[0] or r.instrument >= st.inst.shape[0]:
            return R_OUT_OF_RANGE
    elif t == T_ROLL:
        if not _roll_date_ok(r.qty):  # the trading date it closes (0: undated)
            return R_BAD_FIELD
    elif t == T_INSTRUMENT:  # currency (SPEC section 7) in qty; negative: not an id
        if not (_finite(r.x0) and r.x0 > 0.0 and _finite(r.x1) and r.x1 >= 0.0
                and _finite(r.x2)) or r.qty < 0:
            return R_BAD_FIELD
        if (r.instrument >= st.inst.shape[0] or r.sector >= st.sec.shape[0]
                or r.qty >= N_CURRENCIES):
            return R_OUT_OF_RANGE
    elif t == T_FX:  # SPEC section 7: currency (1..) in qty, rate (> 0) in price
        if r.qty < 1 or not _finite(price) or price <= 0.0:
            return R_BAD_FIELD
        if r.qty >= N_CURRENCIES:
            return R_OUT_OF_RANGE
    else:  # T_LIMIT
        if not (_finite(r.x0) and r.x0 >= 0.0 and _finite(r.x1) and r.x1 >= 0.0
                and _finite(r.x2) and r.x2 >= 0.0 and _finite(r.x3) and r.x3 >= 0.0):
            return R_BAD_FIELD
        if r.account >= st.acc.shape[0]:
            return R_OUT_OF_RANGE
    return R_WRONG_PARTITION if wrong_partition else 0


@njit(inline="always", cache=True, _nrt=False)
def _step(st, r):
    """Apply one record; return its status (0, S_LATE_FILL or a reject reason)."""
    t = np.int64(r.type)
    gseq = r.gseq
    reason = _validate(st, r, t)
    if reason != 0:
        return reason

    # ---- reference-data events that touch no single cell
    if t == T_LIMIT:
        a = np.int64(r.account)
        st.acc_lim[a, L_GROSS] = r.x0
        st.acc_lim[a, L_NET] = r.x1
        st.acc_lim[a, L_MARGIN] = r.x2
        st.acc_lim[a, L_LOSS] = r.x3
        _touch(st, a, gseq)
        return S_ACCEPTED

    if t == T_FX:  # SPEC section 7: a call of its own too (it walks a currency's chain)
        _fx(st, np.int64(r.qty), r.price, gseq)
        return S_ACCEPTED

    if t == T_ROLL:  # SPEC section 6: rare, so a call of its own (off the hot path)
        _roll(st, gseq)
        st.ctr[C_ROLL_GSEQ] = gseq
        if r.qty != 0:
            st.ctr[C_ROLL_DATE] = r.qty
        return S_ACCEPTED

    # ---- order lookup (one site) and the rule-4/5 rejects
    order_event = t != T_MARK and t != T_INSTRUMENT and t != T_POSITION
    slot = np.int64(-1)
    c = np.int64(-1)
    if order_event:
        slot = _order_find(st.orders, r.source, r.order_id)
        if t == T_NEW:
            if slot >= 0:
                return R_DUPLICATE_ORDER
            if st.ctr[C_LIVE] >= st.ctr[C_MAX_ORDERS]:
                return R_CAPACITY
        elif slot >= 0:
            c = np.int64(st.orders[slot].cell)
            if (t == T_FILL or t == T_BUST) and (st.cells[c].account != r.account
                                or st.cells[c].instrument != r.instrument
                                or st.orders[slot].side != r.side):
                return R_FILL_MISMATCH
        elif t != T_FILL and t != T_BUST:
            return R_UNKNOWN_ORDER
    if c < 0 and (t == T_NEW or t == T_FILL or t == T_POSITION or t == T_BUST):
        c = _cell_get(st, np.int64(r.account), np.int64(r.instrument))
        if c < 0:
            return R_CAPACITY
    status = S_LATE_FILL if (t == T_FILL and slot < 0) else S_ACCEPTED

    # ---- reference price / reference data: the one revaluation site
    # New, fill and position name their instrument (a live fill's was checked equal); only
    # replace/cancel/done must take it from the order's cell.
    if t == T_REPLACE or t == T_CANCEL or t == T_DONE:
        i = np.int64(st.cells[c].instrument)
    else:
        i = np.int64(r.instrument)
    ins = st.inst[i]
    ref, mult, mr, beta, sector = (ins.ref_price, ins.multiplier, ins.margin_rate, ins.beta,
                                   np.int64(ins.sector))
    cur = np.int64(ins.currency)
    price = r.price
    if t == T_MARK:
        ins.marked = 1
        ref = price
    elif t == T_INSTRUMENT:
        mult, mr, beta, sector = r.x0, r.x1, r.x2, np.int64(r.sector)
        cur = np.int64(r.qty)
    elif (t != T_POSITION and t != T_CANCEL and t != T_DONE and t != T_BUST and price > 0.0
          and ins.marked == 0):  # a bust is not a price hint (SPEC section 6)
        ref = price
    if (ref != ins.ref_price or mult != ins.multiplier or mr != ins.margin_rate
            or beta != ins.beta or sector != ins.sector or cur != ins.currency):
        _revalue(st, i, ref, mult, mr, beta, sector, cur, gseq)
    if c < 0:  # mark or instrument event: done
        return S_ACCEPTED

    # ---- the cell bracket: contributions before, the change, contributions after
    # (ref, mult, mr, beta and cur are the instrument's values now, revalued or not: kept
    # in registers rather than read again from its row after each store to the cell)
    rate = st.rate[cur]
    cell = st.cells[c]
    a = np.int64(cell.account)
    old_i = _inst_contrib(ins.fund_pos, ins.abs_pos, ref, mult, rate)
    old = _cell_contrib(st.cells, c, ref, mult, mr, beta, rate)
    finish = False
    moves = t == T_FILL or t == T_POSITION or t == T_BUST
    if moves:
        old_pos = cell.pos
        if t != T_POSITION:
            sq = r.qty if r.side == SIDE_BUY else -r.qty
            if t == T_BUST:  # the trade taken back; the order itself does not change
                sq = -sq
            cell.pos = old_pos + sq
            cell.flow += float(sq) * price
        else:
            cell.pos = r.qty
            cell.sod_qty = r.qty
            cell.sod_price = price if (r.flags & F_HAS_PRICE) != 0 else ins.ref_price
            cell.flow = 0.0
        ins.fund_pos += cell.pos - old_pos
        ins.abs_pos += abs(cell.pos) - abs(old_pos)
    if t == T_NEW:
        o = st.orders[-slot - 1]
        o.order_id = r.order_id
        o.source = r.source
        o.side = r.side
        o.open = r.qty
        o.filled = 0
        o.cell = c
        _open_add(st, c, r.side, r.qty)
        st.acc_live[a] += 1
        st.ctr[C_LIVE] += 1
    elif slot >= 0 and t != T_BUST:  # replace, cancel, done, or a fill of a live order
        o = st.orders[slot]
        if t == T_REPLACE:
            new_open = max(r.qty - o.filled, 0)
        elif t == T_FILL:
            o.filled += r.qty
            new_open = o.open - min(r.qty, o.open)
        else:
            new_open = 0
        _open_add(st, c, o.side, new_open - o.open)
        o.open = new_open
        finish = new_open == 0
    _apply_cell(st.acc[a], st.fund, old, _cell_contrib(st.cells, c, ref, mult, mr, beta, rate))
    if moves:
        _apply_inst(st.fund, st.sec, sector, old_i, sector,
                    _inst_contrib(ins.fund_pos, ins.abs_pos, ref, mult, rate))
        _touch_sec(st, sector, gseq)
    _touch_inst(st, i, gseq)
    _touch_cell(st, c)
    if finish:
        _order_delete(st.orders, slot)
        st.acc_live[a] -= 1
        st.ctr[C_LIVE] -= 1
    _touch(st, a, gseq)
    return status


@njit(inline="always", cache=True, _nrt=False)
def _prefetch_for(st, r):
    """Start the cache misses of a record that is ``_LOOKAHEAD`` places ahead.

    The hash slots are computed from the record alone: its order slot, its cell-index
    slot and its instrument row. By the time the step reaches the record they are (mostly)
    in cache, so the batch's misses overlap instead of stalling one after another.
    """
    t = r.type
    if t >= T_NEW and t <= T_BUST:
        prefetch(st.orders, order_home(r.source, r.order_id, st.orders.shape[0] - 1))
    if (t == T_NEW or t == T_FILL or t == T_POSITION or t == T_BUST) and (
            r.account < st.acc.shape[0] and r.instrument < st.inst.shape[0]):
        key = np.int64(r.account) * st.inst.shape[0] + r.instrument
        prefetch(st.cidx, cell_home(st.cidx, key))
    if r.instrument < st.inst.shape[0]:
        prefetch(st.inst, np.int64(r.instrument))


@njit(inline="always", cache=True, _nrt=False)
def _prefetch_cell_for(st, r):
    """Stage 2: the slots fetched by stage 1 name the cell; fetch the cell's row.

    Reads only the home slots (a hint: if the key sits further along its probe chain the
    prefetch is merely useless), so it costs no probing.
    """
    t = r.type
    c = -1
    if t >= T_NEW and t <= T_BUST:
        h = order_home(r.source, r.order_id, st.orders.shape[0] - 1)
        if st.orders[h].order_id == r.order_id:
            c = st.orders[h].cell
    if c < 0 and (t == T_NEW or t == T_FILL or t == T_POSITION or t == T_BUST) and (
            r.account < st.acc.shape[0] and r.instrument < st.inst.shape[0]):
        key = np.int64(r.account) * st.inst.shape[0] + r.instrument
        c = st.cidx[cell_home(st.cidx, key)].id
    if c >= 0:
        prefetch(st.cells, np.int64(c))


@njit(cache=True, _nrt=False, nogil=True)
def apply_batch(st, recs, status):
    """Apply ``recs`` in order; write each event's outcome to ``status``; return the count.

    ``status[k]`` is 0 (accepted), ``S_LATE_FILL`` (accepted late fill) or a reject reason
    (types.R_*). After the call ``st.changed[:st.ctr[C_NCHANGED]]`` lists the accounts the
    batch moved, each once, and ``st.acc_gseq[a]`` is the gseq of the last event that moved
    account ``a``; ``ichanged``, ``schanged`` and ``cchanged`` (C_NICHANGED, C_NSCHANGED,
    C_NCCHANGED) do the same for instruments (``inst.gseq``), sectors (``sec_gseq``) and
    cells. The whole batch is always processed: the return value is ``len(recs)``.
    """
    ctr = st.ctr
    ctr[C_STAMP] += 1
    ctr[C_NCHANGED] = 0
    _clear_changed(st)
    n = recs.shape[0]
    for k in range(min(n, _LOOKAHEAD)):
        _prefetch_for(st, recs[k])
    for k in range(min(n, _LOOKAHEAD2)):
        _prefetch_cell_for(st, recs[k])
    for k in range(n):
        if k + _LOOKAHEAD < n:
            _prefetch_for(st, recs[k + _LOOKAHEAD])
        if k + _LOOKAHEAD2 < n:
            _prefetch_cell_for(st, recs[k + _LOOKAHEAD2])
        r = recs[k]
        if r.reject == R_UNAUTHORIZED:  # outside its session's entitlements: not an event
            status[k] = R_UNAUTHORIZED
            ctr[C_UNAUTHORIZED] += 1
            ctr[C_LAST_GSEQ] = r.gseq
            continue
        s = _step(st, r)
        status[k] = s
        t = r.type
        if t == T_MARK or t == T_INSTRUMENT or t == T_ROLL or t == T_FX:  # counted once
            # by a cluster (every partition sees them)
            if s == S_ACCEPTED:
                ctr[C_BCAST_ACCEPTED] += 1
                if t == T_ROLL:
                    ctr[C_ROLLS] += 1
            elif s == R_BAD_FIELD:
                ctr[C_BCAST_BAD_FIELD] += 1
            elif s == R_OUT_OF_RANGE:
                ctr[C_BCAST_OUT_OF_RANGE] += 1
        if s == S_ACCEPTED:
            ctr[C_ACCEPTED] += 1
            if t == T_BUST:
                ctr[C_BUSTS] += 1
        elif s == S_LATE_FILL:
            ctr[C_ACCEPTED] += 1
            ctr[C_LATE_FILLS] += 1
        else:
            ctr[C_REJECTED] += 1
            ctr[C_REJECTS + s] += 1
        ctr[C_LAST_GSEQ] = r.gseq
    ctr[C_EVENTS] += n
    return n


# ----------------------------------------------------------------------------- readers
@njit(inline="always", cache=True, _nrt=False)
def breach_flags(long_mv, short_mv, worst, margin, pnl, lim):
    """SPEC breach bits of an account from its tallies and limits (0 = limit off)."""
    gross = long_mv + short_mv
    net = long_mv - short_mv
    b = 0
    if lim[L_GROSS] > 0.0 and gross > lim[L_GROSS]:
        b |= B_GROSS
    if lim[L_NET] > 0.0 and abs(net) > lim[L_NET]:
        b |= B_NET
    if lim[L_MARGIN] > 0.0 and margin > lim[L_MARGIN]:
        b |= B_MARGIN
    if lim[L_GROSS] > 0.0 and worst > lim[L_GROSS]:
        b |= B_WORST
    if lim[L_LOSS] > 0.0 and pnl < -lim[L_LOSS]:
        b |= B_LOSS
    return b


@njit(cache=True, _nrt=False)
def account_values(acc, acc_lim, a, out):
    """Account ``a``'s eight tallies (compensated values) into ``out[:8]``; returns breach."""
    for k in range(N_CELL_TALLIES):
        out[k] = acc[a, k, 0] + acc[a, k, 1]
    return breach_flags(out[K_LONG], out[K_SHORT], out[K_WORST], out[K_MARGIN], out[K_PNL],
                        acc_lim[a])


