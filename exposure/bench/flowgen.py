"""A realistic, seeded order flow as event records (the benchmarks' and perf tool's input).

The day opens with reference data for every instrument, limits for every account, a
start-of-day book and a first mark per instrument; then the flow: about 35% new orders,
35% fills, 10% cancels, 10% replaces and 10% marks. Each account trades its own universe of
instruments with a popularity skew, orders live for a while (the live table holds tens of
thousands), fills are partial or complete, some replaces go below the filled quantity,
and a few fills arrive after their order was cancelled (late fills). Optionally (off by
default, so the benchmarks' flow does not change) a fraction of the fills are followed
later by a ``bust`` of a recent trade, and a ``roll`` starts a new day every so many events
(SPEC section 6).

Generation is a numba kernel with numba's own seeded generator: the same arguments give
the same records on every machine.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.types import (
    EVENT_DTYPE,
    F_HAS_PRICE,
    SIDE_BUY,
    SIDE_SELL,
    SIDE_SHORT,
    T_BUST,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_NEW,
    T_POSITION,
    T_REPLACE,
    T_ROLL,
)
from exposure.engine.parse import to_jsonl

__all__ = ["generate", "to_jsonl"]  # to_jsonl: exposure.engine.parse's, re-exported for the benches

# Columns of the generator's live-order pool.
_SRC, _OID, _ACC, _INS, _SIDE, _QTY, _FILLED = range(7)


@njit(cache=True)
def _gen(out, n_accounts, n_instruments, n_sources, universe, live_target, seed, busts,
         roll_every):
    np.random.seed(seed)
    n = out.shape[0]
    # Instrument ids are spread over the SPEC's id space; accounts too.
    inst_ids = np.random.permutation(65536)[:n_instruments]
    acc_ids = np.random.permutation(4096)[:n_accounts]
    price = np.empty(n_instruments)
    for j in range(n_instruments):
        price[j] = 5.0 + np.random.random() * 495.0
    # Each account trades a universe drawn with a popularity skew (square of a uniform).
    uni = np.empty((n_accounts, universe), np.int64)
    for a in range(n_accounts):
        for u in range(universe):
            uni[a, u] = int(n_instruments * np.random.random() ** 2)
    next_oid = np.ones(n_sources, np.uint64)
    cap = 4 * live_target
    # The live pool: one row per live order (columns _SRC.._FILLED); removal moves the last
    # row into the hole.
    live = np.zeros((cap, 7), np.int64)
    nlive = 0
    dead = 4096  # recently finished orders, for late fills
    d_src = np.zeros(dead, np.int64)
    d_oid = np.zeros(dead, np.uint64)
    d_acc = np.zeros(dead, np.int64)
    d_ins = np.zeros(dead, np.int64)
    d_side = np.zeros(dead, np.int64)
    ndead = 0
    ntr = 4096  # recent trades, for busts
    t_src = np.zeros(ntr, np.int64)
    t_oid = np.zeros(ntr, np.uint64)
    t_acc = np.zeros(ntr, np.int64)
    t_ins = np.zeros(ntr, np.int64)
    t_side = np.zeros(ntr, np.int64)
    t_qty = np.zeros(ntr, np.int64)
    t_px = np.zeros(ntr)
    ntrades = 0
    k = 0
    # ---- start of day: reference data, limits, book, first marks
    for j in range(n_instruments):
        if k >= n:
            return k
        r = out[k]
        r.type = T_INSTRUMENT
        r.instrument = inst_ids[j]
        r.x0 = 1.0 if np.random.random() < 0.8 else 100.0
        r.x1 = 0.05 + 0.3 * np.random.random()
        r.x2 = 0.5 + np.random.random()
        r.sector = np.random.randint(0, 64)
        k += 1
    for a in range(n_accounts):
        if k >= n:
            return k
        r = out[k]
        r.type = T_LIMIT
        r.account = acc_ids[a]
        r.x0 = 5e8
        r.x1 = 1e8
        r.x2 = 5e7
        r.x3 = 2e6
        k += 1
    for a in range(n_accounts):
        for u in range(universe // 4):
            if k >= n:
                return k
            r = out[k]
            r.type = T_POSITION
            r.account = acc_ids[a]
            j = uni[a, u]
            r.instrument = inst_ids[j]
            r.qty = (np.random.randint(1, 50) * 100) * (1 if np.random.random() < 0.6 else -1)
            r.price = price[j]
            r.flags = F_HAS_PRICE
            k += 1
    for j in range(n_instruments):
        if k >= n:
            return k
        r = out[k]
        r.type = T_MARK
        r.instrument = inst_ids[j]
        r.price = price[j]
        k += 1
    # ---- the flow
    while k < n:
        r = out[k]
        if roll_every > 0 and k % roll_every == 0:  # a new trading day
            r.type = T_ROLL
            k += 1
            continue
        if busts > 0.0 and ntrades > 0 and np.random.random() < busts:  # a trade taken back
            x = np.random.randint(0, min(ntrades, ntr))
            r.type = T_BUST
            r.source = t_src[x]
            r.order_id = t_oid[x]
            r.account = acc_ids[t_acc[x]]
            r.instrument = inst_ids[t_ins[x]]
            r.side = t_side[x]
            r.qty = t_qty[x]
            r.price = t_px[x]
            k += 1
            continue
        u = np.random.random()
        if u < 0.35 or nlive == 0:  # new
            if nlive >= cap:
                continue
            s = np.random.randint(0, n_sources)
            a = np.random.randint(0, n_accounts)
            j = uni[a, np.random.randint(0, universe)]
            side = SIDE_BUY if np.random.random() < 0.5 else (
                SIDE_SELL if np.random.random() < 0.7 else SIDE_SHORT)
            q = np.random.randint(1, 100) * 100
            r.type = T_NEW
            r.source = s
            r.order_id = next_oid[s]
            r.account = acc_ids[a]
            r.instrument = inst_ids[j]
            r.side = side
            r.qty = q
            r.price = 0.0 if np.random.random() < 0.1 else round(price[j] * (
                1.0 + 0.002 * (np.random.random() - 0.5)), 2)
            live[nlive, _SRC] = s
            live[nlive, _OID] = np.int64(next_oid[s])
            live[nlive, _ACC] = a
            live[nlive, _INS] = j
            live[nlive, _SIDE] = side
            live[nlive, _QTY] = q
            live[nlive, _FILLED] = 0
            nlive += 1
            next_oid[s] += np.uint64(1 + np.random.randint(0, 3))
        elif u < 0.70:  # fill
            if ndead > 0 and np.random.random() < 0.03:  # late fill after a cancel
                x = np.random.randint(0, min(ndead, dead))
                r.type = T_FILL
                r.source = d_src[x]
                r.order_id = d_oid[x]
                r.account = acc_ids[d_acc[x]]
                r.instrument = inst_ids[d_ins[x]]
                r.side = d_side[x]
                r.qty = np.random.randint(1, 10) * 100
                r.price = round(price[d_ins[x]], 2)
            else:
                x = np.random.randint(0, nlive)
                open_ = live[x, _QTY] - live[x, _FILLED]
                p_full = 0.5 + 0.5 * min(nlive / live_target, 1.0)
                q = open_ if (np.random.random() < p_full or open_ <= 100) else (
                    max(100, (open_ * np.random.randint(1, 10)) // 1000 * 100))
                if np.random.random() < 0.01:
                    q = open_ + 100  # overfill
                r.type = T_FILL
                r.source = live[x, _SRC]
                r.order_id = np.uint64(live[x, _OID])
                r.account = acc_ids[live[x, _ACC]]
                r.instrument = inst_ids[live[x, _INS]]
                r.side = live[x, _SIDE]
                r.qty = q
                r.price = round(price[live[x, _INS]]
                                * (1.0 + 0.001 * (np.random.random() - 0.5)), 2)
                live[x, _FILLED] += q
                if busts > 0.0:
                    y = ntrades % ntr
                    t_src[y] = live[x, _SRC]
                    t_oid[y] = np.uint64(live[x, _OID])
                    t_acc[y] = live[x, _ACC]
                    t_ins[y] = live[x, _INS]
                    t_side[y] = live[x, _SIDE]
                    t_qty[y] = q
                    t_px[y] = r.price
                    ntrades += 1
                if live[x, _FILLED] >= live[x, _QTY]:
                    nlive -= 1
                    live[x] = live[nlive]
        elif u < 0.80:  # cancel / done
            x = np.random.randint(0, nlive)
            r.type = T_CANCEL if np.random.random() < 0.9 else T_DONE
            r.source = live[x, _SRC]
            r.order_id = np.uint64(live[x, _OID])
            y = ndead % dead
            d_src[y] = live[x, _SRC]
            d_oid[y] = np.uint64(live[x, _OID])
            d_acc[y] = live[x, _ACC]
            d_ins[y] = live[x, _INS]
            d_side[y] = live[x, _SIDE]
            ndead += 1
            nlive -= 1
            live[x] = live[nlive]
        elif u < 0.90:  # replace
            x = np.random.randint(0, nlive)
            if np.random.random() < 0.1:
                q = max(1, live[x, _FILLED] - 100)  # below the filled quantity: finishes
            else:
                q = live[x, _FILLED] + np.random.randint(1, 100) * 100
            r.type = T_REPLACE
            r.source = live[x, _SRC]
            r.order_id = np.uint64(live[x, _OID])
            r.qty = q
            r.price = round(price[live[x, _INS]] * (1.0 + 0.002 * (np.random.random() - 0.5)), 2)
            live[x, _QTY] = q
            if q <= live[x, _FILLED]:
                nlive -= 1
                live[x] = live[nlive]
        else:  # mark: a random walk
            j = np.random.randint(0, n_instruments)
            price[j] = round(price[j] * (1.0 + 0.005 * (np.random.random() - 0.5)), 2)
            r.type = T_MARK
            r.instrument = inst_ids[j]
            r.price = price[j]
        k += 1
    return k


def generate(n_events: int, accounts: int = 500, instruments: int = 20_000, sources: int = 8,
             universe: int = 200, live_target: int = 100_000, seed: int = 1,
             busts: float = 0.0, roll_every: int = 0) -> np.ndarray:
    """``n_events`` event records of a realistic day (gseq 1..n).

    ``busts``: the probability that an event of the flow is a ``bust`` of one of the last
    4,096 trades (0: none); ``roll_every``: a ``roll`` every that many events (0: none).
    With both off the records are those of earlier versions, seed for seed."""
    if not 1 <= accounts <= 4096 or not 1 <= instruments <= 65536 or sources < 1:
        raise ValueError(f"accounts={accounts} instruments={instruments} sources={sources} "
                         "outside 1..4096 / 1..65536 / >= 1")
    out = np.zeros(n_events, EVENT_DTYPE)
    k = _gen(out, accounts, instruments, sources, universe, live_target, seed, float(busts),
             int(roll_every))
    out = out[:k]
    out["gseq"] = np.arange(1, k + 1, dtype=np.uint64)
    return out
