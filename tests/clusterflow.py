"""Seeded event streams for a cluster's tests: they respect a partition map (every order's
account and source in one partition) and mark every instrument before any other event
names it, the conditions under which the cluster's document equals replay of the whole
stream (SPEC section 5). Optionally some ``new`` and ``fill`` events are misrouted (the
account in another partition than the source): each must be rejected as wrong_partition.
Optionally (``currencies``) the instruments are quoted in several currencies and ``fx``
events move their rates throughout (SPEC section 7: every partition sees every fx).
"""

from __future__ import annotations

import json
import random

import numpy as np

from exposure.core.partition import PartitionMap
from exposure.core.types import (
    EVENT_DTYPE,
    F_HAS_PRICE,
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
)

__all__ = ["cluster_stream", "two_partitions", "three_partitions", "quote_in_currencies"]


def two_partitions() -> PartitionMap:
    """examples/cluster's map."""
    return PartitionMap.from_ranges([("p0", [[0, 2047]], [[0, 7]]),
                                     ("p1", [[2048, 4095]], [[8, 15]])], 4096, 1024)


def three_partitions() -> PartitionMap:
    return PartitionMap.from_ranges([("p0", [[0, 999]], [[0, 3]]),
                                     ("p1", [[1000, 2999], 4095], [[4, 9], 1000]),
                                     ("p2", [[3000, 4094]], [[10, 15]])], 4096, 1024)


def cluster_stream(seed: int, pmap: PartitionMap, n: int = 20_000, instruments: int = 300,
                   accounts: int = 40, misroute: float = 0.0, currencies: int = 0,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(records, misrouted): ``n`` events after the reference data, marks, limits and
    start-of-day book; ``misrouted`` is a boolean mask of the events sent with an account
    of another partition than their source. ``currencies`` > 0: each instrument in one of
    the base currency and currencies 1..``currencies``, a first fx of each after the
    marks, and one event in 100 of the stream an fx that moves a rate by up to 0.5%."""
    rng = np.random.default_rng(seed)
    P = pmap.partitions
    accs = [rng.choice(np.flatnonzero(pmap.acc_owner == k), accounts, replace=False)
            for k in range(P)]
    srcs = [np.flatnonzero(pmap.src_owner == k) for k in range(P)]
    inst = rng.choice(65536, instruments, replace=False)
    price = dict(zip(inst.tolist(), rng.uniform(5, 500, instruments).tolist(), strict=True))
    ev: list[dict] = []
    bad: list[bool] = []

    def emit(e: dict, wrong: bool = False) -> None:
        ev.append(e)
        bad.append(wrong)

    for i in inst.tolist():
        e = {"type": T_INSTRUMENT, "instrument": i, "x0": float(rng.choice([1.0, 50.0])),
             "x1": float(rng.uniform(0, 0.5)), "x2": float(rng.uniform(-1, 2)),
             "sector": int(rng.integers(0, 12))}
        if currencies:
            e["qty"] = int(rng.integers(0, currencies + 1))  # SPEC 7: its currency
        emit(e)
    for i in inst.tolist():
        emit({"type": T_MARK, "instrument": i, "price": price[i]})
    rate = {c: float(rng.choice([1.08, 0.0067, 1.27, 0.74, 0.11])) * rng.uniform(0.9, 1.1)
            for c in range(1, currencies + 1)}
    for c, x in rate.items():
        emit({"type": T_FX, "qty": c, "price": x})
    for k in range(P):
        for a in accs[k][:accounts // 2].tolist():
            emit({"type": T_LIMIT, "account": a, "x0": float(rng.uniform(1e5, 1e7)),
                  "x1": float(rng.uniform(1e5, 1e7)), "x2": 0.0,
                  "x3": float(rng.uniform(1e3, 1e5))})
        for a in accs[k].tolist():
            for i in rng.choice(inst, 5, replace=False).tolist():
                p = {"type": T_POSITION, "account": a, "instrument": i,
                     "qty": int(rng.integers(-5000, 5000))}
                if rng.random() < 0.5:
                    p["price"], p["flags"] = price[i] * rng.uniform(0.9, 1.1), F_HAS_PRICE
                emit(p)
    live: list[tuple] = []  # (source, oid, account, instrument, side, qty, filled)
    dead: list[tuple] = []
    next_oid = {}
    for _ in range(n):
        if currencies and rng.random() < 0.01:
            c = int(rng.integers(1, currencies + 1))
            rate[c] *= rng.uniform(0.995, 1.005)
            emit({"type": T_FX, "qty": c, "price": rate[c]})
            continue
        u = rng.random()
        k = int(rng.integers(0, P))
        if u < 0.35 or not live:
            src = int(rng.choice(srcs[k]))
            wrong = P > 1 and rng.random() < misroute
            a = int(rng.choice(accs[(k + 1) % P] if wrong else accs[k]))
            i = int(rng.choice(inst))
            oid = next_oid.get(src, 1)
            next_oid[src] = oid + 1
            side, qty = int(rng.integers(1, 4)), int(rng.integers(1, 1000))
            px = 0.0 if rng.random() < 0.1 else price[i] * rng.uniform(0.98, 1.02)
            emit({"type": T_NEW, "source": src, "order_id": oid, "account": a,
                  "instrument": i, "side": side, "qty": qty, "price": px}, wrong)
            if not wrong:
                live.append([src, oid, a, i, side, qty, 0])
        elif u < 0.65:
            if dead and rng.random() < 0.05:  # a fill racing its cancel: a late fill
                src, oid, a, i, side = dead[int(rng.integers(0, len(dead)))][:5]
                emit({"type": T_FILL, "source": src, "order_id": oid, "account": a,
                      "instrument": i, "side": side, "qty": int(rng.integers(1, 100)),
                      "price": price[i] * rng.uniform(0.98, 1.02)})
                continue
            j = int(rng.integers(0, len(live)))
            o = live[j]
            q = int(rng.integers(1, o[5] - o[6] + 1)) if o[5] > o[6] else 1
            emit({"type": T_FILL, "source": o[0], "order_id": o[1], "account": o[2],
                  "instrument": o[3], "side": o[4], "qty": q,
                  "price": price[o[3]] * rng.uniform(0.98, 1.02)})
            o[6] += q
            if o[6] >= o[5]:
                dead.append(tuple(live.pop(j)))
        elif u < 0.75:
            o = live.pop(int(rng.integers(0, len(live))))
            emit({"type": T_CANCEL if rng.random() < 0.8 else T_DONE, "source": o[0],
                  "order_id": o[1]})
            dead.append(tuple(o))
        elif u < 0.85:
            j = int(rng.integers(0, len(live)))
            o = live[j]
            q = int(rng.integers(1, 1200))
            emit({"type": T_REPLACE, "source": o[0], "order_id": o[1], "qty": q,
                  "price": price[o[3]] * rng.uniform(0.98, 1.02)})
            o[5] = q
            if q <= o[6]:
                dead.append(tuple(live.pop(j)))
        else:
            i = int(rng.choice(inst))
            price[i] *= rng.uniform(0.99, 1.01)
            emit({"type": T_MARK, "instrument": i, "price": price[i]})
    recs = np.zeros(len(ev), EVENT_DTYPE)
    for j, e in enumerate(ev):
        r = recs[j]
        for f, v in e.items():
            r[f] = v
    return recs, np.array(bad)


def quote_in_currencies(jsonl: bytes, currencies: int, seed: int) -> bytes:
    """A JSONL stream (the benchmark's flow) with its instruments quoted in the base and
    ``currencies`` other currencies (``instrument % (currencies + 1)``) and one mark in 20
    replaced by an ``fx`` that moves a rate by up to 1% (SPEC section 7): as many events.
    (Only those lines are parsed: the rest pass through as they are.)"""
    rng = random.Random(seed)
    rate = {c: rng.choice((1.08, 0.0067, 1.27, 0.74)) for c in range(1, currencies + 1)}
    out, marks = [], 0
    for line in jsonl.splitlines():
        if line.startswith(b'{"type":"instrument"'):
            e = json.loads(line)
            e["currency"] = e["instrument"] % (currencies + 1)
            line = json.dumps(e, separators=(",", ":")).encode()
        elif line.startswith(b'{"type":"mark"'):
            marks += 1
            if marks % 20 == 0:
                c = rng.randrange(1, currencies + 1)
                rate[c] *= rng.uniform(0.99, 1.01)
                line = json.dumps({"type": "fx", "currency": c, "rate": rate[c]}).encode()
        out.append(line)
    return b"\n".join(out) + b"\n"
