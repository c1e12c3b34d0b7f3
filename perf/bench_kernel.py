"""Kernel throughput: events/s on one core, median of several runs, JIT warm-up excluded.

    python -m perf.bench_kernel [--events 2000000] [--runs 5] [--batch 4096] [--json]

A realistic generated day (perf/flowgen.py: 500 accounts, 20,000 instruments, about 35%
new, 35% fills, 10% cancels, 10% replaces, 10% marks) is applied in ring-sized batches to a
fresh state of the default capacities in each run. Also reports the resident memory of that
state (the default capacities, prefaulted as the node does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import orjson
import psutil

from exposure.bench.flowgen import generate
from exposure.core.capacity import Capacities
from exposure.core.types import (
    C_CELLS,
    C_LIVE,
    C_REJECTED,
    T_CANCEL,
    T_FILL,
    T_MARK,
    T_NEW,
    T_REPLACE,
)
from exposure.engine.kernel import apply_batch
from exposure.shm.tally_layout import TallyLayout, allocate


def _pin() -> None:
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


def run_once(recs: np.ndarray, batch: int) -> tuple[float, dict]:
    buf, st = allocate()
    status = np.zeros(len(recs), np.uint8)
    n = len(recs)
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        apply_batch(st, recs[lo:lo + batch], status[lo:lo + batch])
    dt = time.perf_counter() - t0
    info = {"live_orders_end": int(st.ctr[C_LIVE]), "rejected": int(st.ctr[C_REJECTED]),
            "cells": int(st.ctr[C_CELLS])}
    del buf
    return dt, info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=2_000_000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    _pin()
    recs = generate(a.events, seed=a.seed)
    mix = {name: round(float(np.mean(recs["type"] == t)), 3) for name, t in
           (("new", T_NEW), ("fill", T_FILL), ("cancel", T_CANCEL), ("replace", T_REPLACE),
            ("mark", T_MARK))}
    run_once(recs[:50_000], a.batch)  # JIT warm-up (compile or cache load)
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    buf, st = allocate()
    state_rss = proc.memory_info().rss - rss0
    del buf, st
    rates, info = [], {}
    for _ in range(a.runs):
        dt, info = run_once(recs, a.batch)
        rates.append(len(recs) / dt)
    out = {
        "events": len(recs), "runs": a.runs, "batch": a.batch,
        "median_events_per_s": statistics.median(rates),
        "rates": [round(r) for r in rates],
        "ns_per_event": 1e9 / statistics.median(rates),
        "mix": mix, **info,
        "state_bytes": TallyLayout(Capacities()).size,
        "state_rss_bytes": state_rss,
    }
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        shares = ", ".join(f"{k} {v:.0%}" for k, v in mix.items())
        print(f"events            {out['events']:,} ({shares})")
        print(f"median            {out['median_events_per_s'] / 1e6:.2f} M events/s "
              f"({out['ns_per_event']:.0f} ns/event, {a.runs} runs, batch {a.batch})")
        print(f"runs              {', '.join(f'{r / 1e6:.2f}M' for r in rates)}")
        print(f"live orders (end) {info['live_orders_end']:,}; cells {info['cells']:,}; "
              f"rejected {info['rejected']:,}")
        print(f"state             {out['state_bytes'] / 2**20:.0f} MiB layout, "
              f"{state_rss / 2**20:.0f} MiB resident (default capacities)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
