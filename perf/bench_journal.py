"""Journal and recovery benchmarks (issue 5's numbers).

    python -m perf.bench_journal [--records 2000000] [--block 4096] [--recover 1000000]
                                 [--dir DIR] [--json]

* Journal throughput per fsync policy: ``JournalWriter`` appending blocks of ``--block``
  realistic records (one ``writev`` per block, as the journal stage's group commit), with
  ``batch`` (fsync after every block), ``interval`` (fsync every 2 ms) and ``none``.
* Recovery: a journal of ``--recover`` realistic events replayed through the kernel into a
  fresh state with the session table, as ``exposure run`` does on start (records/s).

The data directory defaults to a temporary directory on the same file system as the
working directory's ``/tmp``; pass ``--dir`` to measure the disk the node will use.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from exposure.bench.flowgen import generate
from exposure.core.capacity import Capacities
from exposure.core.types import EVENT_SIZE, EVENT_WORDS
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_layout import allocate
from exposure.store.journal import JournalWriter
from exposure.store.recovery import replay_journal

__all__ = ["main"]


def _journal(directory: Path, recs: np.ndarray, block: int, policy: str) -> dict:
    w = JournalWriter(directory, segment_bytes=256 << 20)
    words = recs.view(np.uint64).reshape(len(recs), EVENT_WORDS)
    last_sync = time.perf_counter()
    t0 = time.perf_counter()
    for lo in range(0, len(recs), block):
        w.append(words[lo:lo + block])
        now = time.perf_counter()
        if policy == "batch" or (policy == "interval" and now - last_sync >= 0.002):
            w.sync()
            last_sync = now
    if policy != "none":
        w.sync()
    dt = time.perf_counter() - t0
    w.close()
    return {"policy": policy, "records": len(recs), "seconds": round(dt, 3),
            "records_per_s": round(len(recs) / dt), "mb_per_s": round(len(recs) * EVENT_SIZE
                                                                       / dt / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=2_000_000)
    p.add_argument("--block", type=int, default=4096)
    p.add_argument("--recover", type=int, default=1_000_000)
    p.add_argument("--dir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    base = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="exposure-bench-"))
    out: dict = {"journal": [], "recovery": {}}
    try:
        n = max(a.records, a.recover)
        recs = generate(n, accounts=500, instruments=20_000, live_target=100_000, seed=3)
        for policy in ("batch", "interval", "none"):
            d = base / f"j-{policy}"
            r = _journal(d, recs[:a.records], a.block, policy)
            out["journal"].append(r)
            if not a.json:
                print(f"journal fsync={policy:<8} {r['records_per_s']:>12,} records/s "
                      f"{r['mb_per_s']:>8,.1f} MB/s  ({r['records']:,} in {r['seconds']} s)")
            shutil.rmtree(d)
        d = base / "j-recover"
        _journal(d, recs[:a.recover], 65536, "none")
        caps = Capacities()
        _, st = allocate(caps)
        sessions = np.zeros((257, SESSION_COLS), np.uint64)
        replay_journal(st, d, sessions, upto=1)  # compile (or load) the kernels first
        _, st = allocate(caps)
        sessions[:] = 0
        t0 = time.perf_counter()
        k = replay_journal(st, d, sessions)
        dt = time.perf_counter() - t0
        out["recovery"] = {"records": k, "seconds": round(dt, 3),
                           "records_per_s": round(k / dt),
                           "seconds_per_million": round(dt / k * 1e6, 3)}
        if not a.json:
            print(f"recovery: {k:,} journaled events replayed in {dt:.2f} s = "
                  f"{k / dt:,.0f} records/s ({dt / k * 1e6:.2f} s per million)")
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)
    if a.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
