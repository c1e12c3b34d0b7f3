"""The cluster's rows composed from the partitions' rows (shared/SPEC.md section 5): the
consolidator's jitted kernels, one per row kind.

Each takes the ids that moved (int64, ascending, within bounds), the partitions' views of
that kind (a tuple of feed-row tables, one per partition, in partition order: what
:meth:`exposure.feed.subscriber.Subscriber.table` holds; a table may be shorter than the ids, and a
row is present when its ``kind`` is not 0), and writes, for each id:

* ``out[j]``: the cluster's feed row (zeroed by the caller), tagged as the consolidator's
  (its ``gseq``, ``compute_ns`` = ``now``, no session) and carrying the ``send_ns`` and
  ``recv_ns`` of the partition row it came from (accounts) or of the latest one (instruments,
  the fund): wire-to-wire times through the consolidator;
* the published row (the desks' table ``pubw``, its versions ``pubver``, under its
  seqlock: :func:`exposure.engine.publish.store_rows`) through ``pub``, a scratch array of the
  published dtype at least as long as the ids, and ``pubsrc``, the same as words.

Sums run in partition order from 0.0. The fund's ``net_long_mv`` and ``net_short_mv`` are
sums over every instrument of the cluster; they are kept as running compensated (Neumaier)
sums in ``acc`` (``[long, its error, short, its error]``), updated by each instrument's
change of contribution (``fpos`` and ``val``, the last composed ``fund_pos`` and
``ref_price x multiplier x rate`` of every instrument: in the base currency, SPEC section
7), so a batch costs its instruments, not the cluster's; :func:`resum` recomputes them
from scratch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import NO_SESSION, ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR
from exposure.engine.publish import store_rows

__all__ = ["compose_accounts", "compose_instruments", "compose_sectors", "compose_fund",
           "resum"]


@njit(cache=True, inline="always")
def _add(acc, k, x):
    """acc[k] += x, its rounding error kept in acc[k + 1] (Neumaier)."""
    s = acc[k]
    t = s + x
    if abs(s) >= abs(x):
        acc[k + 1] += (s - t) + x
    else:
        acc[k + 1] += (x - t) + s
    acc[k] = t


@njit(cache=True, inline="always")
def _tag(o, kind, gseq, now):
    """The head of a row the consolidator composed: its kind, its own gseq and time, no
    session (the caller sets the id, whose field is named by the kind)."""
    o.kind = kind
    o.session = NO_SESSION
    o.gseq = gseq
    o.compute_ns = now


@njit(cache=True, inline="always")
def _published(p, o, gseq):
    """An account's or the fund's published row (PUBROW_DTYPE) from its feed row."""
    p.gseq = gseq
    p.long_mv = o.long_mv
    p.short_mv = o.short_mv
    p.gross = o.gross
    p.net = o.net
    p.open_buy_mv = o.open_buy_mv
    p.open_sell_mv = o.open_sell_mv
    p.worst_gross = o.worst_gross
    p.margin = o.margin
    p.beta_net = o.beta_net
    p.pnl = o.pnl
    p.live_orders = o.live_orders
    p.breach = o.breach
    p.net_long_mv = o.net_long_mv
    p.net_short_mv = o.net_short_mv


@njit(cache=True)
def compose_accounts(ids, owner, tabs, gseq, now, out, pub, pubsrc, pubw, pubver):
    """An account's row is its owner's (``owner``: the map's account owners; an account it
    leaves out: the first partition's)."""
    for j in range(ids.shape[0]):
        a = ids[j]
        k = owner[a] if a < owner.shape[0] else -1
        if k < 0:
            k = 0
        t = tabs[k]
        if a < t.shape[0]:
            out[j] = t[a]
        o = out[j]
        _tag(o, ROW_ACCOUNT, gseq, now)
        o.account = a
        o.net_long_mv = 0.0  # the fund's alone
        o.net_short_mv = 0.0
        _published(pub[j], o, gseq)
    store_rows(pubw, pubver, ids, pubsrc)


@njit(cache=True)
def compose_instruments(ids, tabs, gseq, now, out, fpos, val, acc, pub, pubsrc, pubw, pubver):
    """``fund_pos``, ``open_buy``, ``open_sell`` and ``gross_mv`` (base currency) summed;
    ``ref_price`` the lowest-numbered partition's that has priced it; reference data,
    ``currency`` and ``rate`` included (every partition sees every instrument and fx
    event), the lowest-numbered partition's that has the row; ``net_mv`` = fund_pos x
    ref_price x multiplier x rate."""
    for j in range(ids.shape[0]):
        i = ids[j]
        o = out[j]
        have = False
        send = 0
        for k in range(len(tabs)):
            t = tabs[k]
            if i >= t.shape[0]:
                continue
            r = t[i]
            if r.kind == 0:
                continue
            o.fund_pos += r.fund_pos
            o.open_buy += r.open_buy
            o.open_sell += r.open_sell
            o.gross_mv += r.gross_mv
            if o.ref_price == 0.0:
                o.ref_price = r.ref_price
            if not have:
                have = True
                o.multiplier = r.multiplier
                o.margin_rate = r.margin_rate
                o.beta = r.beta
                o.sector = r.sector
                o.marked = r.marked
                o.rate = r.rate
                o.currency = r.currency
            if r.send_ns > send:
                send = r.send_ns
                o.send_ns = r.send_ns
                o.recv_ns = r.recv_ns
        v = o.ref_price * o.multiplier * o.rate
        o.net_mv = o.fund_pos * v
        old = fpos[i] * val[i]
        if fpos[i] > 0:
            _add(acc, 0, -old)
        elif fpos[i] < 0:
            _add(acc, 2, old)
        new = o.fund_pos * v
        if o.fund_pos > 0:
            _add(acc, 0, new)
        elif o.fund_pos < 0:
            _add(acc, 2, -new)
        fpos[i] = o.fund_pos
        val[i] = v
        _tag(o, ROW_INSTRUMENT, gseq, now)
        o.instrument = i
        p = pub[j]
        p.gseq = gseq
        p.fund_pos = o.fund_pos
        p.ref_price = o.ref_price
        p.open_buy = o.open_buy
        p.open_sell = o.open_sell
        p.net_mv = o.net_mv
        p.gross_mv = o.gross_mv
        p.multiplier = o.multiplier
        p.margin_rate = o.margin_rate
        p.beta = o.beta
        p.sector = o.sector
        p.marked = o.marked
        p.rate = o.rate
        p.currency = o.currency
    store_rows(pubw, pubver, ids, pubsrc)


@njit(cache=True)
def compose_sectors(ids, tabs, gseq, now, out, pub, pubsrc, pubw, pubver):
    """``net_mv`` and ``gross_mv`` summed."""
    for j in range(ids.shape[0]):
        s = ids[j]
        o = out[j]
        for k in range(len(tabs)):
            t = tabs[k]
            if s < t.shape[0] and t[s].kind != 0:
                o.net_mv += t[s].net_mv
                o.gross_mv += t[s].gross_mv
        _tag(o, ROW_SECTOR, gseq, now)
        o.sector = s
        p = pub[j]
        p.gseq = gseq
        p.net_mv = o.net_mv
        p.gross_mv = o.gross_mv
    store_rows(pubw, pubver, ids, pubsrc)


@njit(cache=True)
def compose_fund(tabs, row, gseq, now, out, acc, pub, pubsrc, pubw, pubver):
    """The account sums summed; ``net_long_mv`` / ``net_short_mv`` from ``acc`` (every
    instrument's summed ``fund_pos``: the cluster's crossing). Published as row ``row``."""
    o = out[0]
    send = 0
    for k in range(len(tabs)):
        r = tabs[k][0]
        if r.kind == 0:
            continue
        o.long_mv += r.long_mv
        o.short_mv += r.short_mv
        o.gross += r.gross
        o.net += r.net
        o.open_buy_mv += r.open_buy_mv
        o.open_sell_mv += r.open_sell_mv
        o.worst_gross += r.worst_gross
        o.margin += r.margin
        o.beta_net += r.beta_net
        o.pnl += r.pnl
        o.live_orders += r.live_orders
        if r.send_ns > send:
            send = r.send_ns
            o.send_ns = r.send_ns
            o.recv_ns = r.recv_ns
    o.net_long_mv = acc[0] + acc[1]
    o.net_short_mv = acc[2] + acc[3]
    _tag(o, ROW_FUND, gseq, now)
    o.account = -1
    _published(pub[0], o, gseq)
    idx = np.empty(1, np.int64)
    idx[0] = row
    store_rows(pubw, pubver, idx, pubsrc)


@njit(cache=True)
def resum(fpos, val, acc):
    """``acc`` recomputed from every instrument's contribution."""
    acc[:] = 0.0
    for i in range(fpos.shape[0]):
        if fpos[i] > 0:
            _add(acc, 0, fpos[i] * val[i])
        elif fpos[i] < 0:
            _add(acc, 2, -fpos[i] * val[i])
