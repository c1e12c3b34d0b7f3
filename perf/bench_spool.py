"""What the producer's spool costs per event: ``python -m perf.bench_spool [--dir DIR]
[--seconds S] [--batches 1,64,1024]``.

For each batch size, appends batches of that many 128-byte records to a fresh spool
(``exposure.store.spool.Spool``: one ``writev`` and one ``fdatasync`` per append) for
``--seconds``, trimming behind itself as a producer whose node keeps up would, and reports
the wall time per append (p50, p99, max), the wall time and the CPU time per event, and
records/s. Then a reopen of a spool holding ``--reopen`` records in batches of 64 (the
check a restart after kill -9 does) and a ``pending`` of all of them.

The directory (``--dir``, default a temporary one under the current directory, so on the
disk a producer would use) is removed afterwards. JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from exposure.core.types import EVENT_DTYPE
from exposure.store.spool import Spool


def _records(first: int, n: int) -> np.ndarray:
    r = np.zeros(n, EVENT_DTYPE)
    r["sseq"] = np.arange(first, first + n, dtype=np.uint64)
    r["session"] = 1
    r["order_id"] = r["sseq"]
    r["qty"] = 100
    r["price"] = 10.5
    return r


def bench_batch(directory: Path, batch: int, seconds: float) -> dict:
    d = directory / f"b{batch}"
    pool = _records(1, batch)
    times = []
    with Spool(d, max_bytes=1 << 30) as s:
        t_end = time.perf_counter() + seconds
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        while time.perf_counter() < t_end:
            pool["sseq"] += np.uint64(batch) if times else np.uint64(0)
            t0 = time.perf_counter_ns()
            s.append(pool)
            times.append(time.perf_counter_ns() - t0)
            if s.unacked >= 65536:
                s.trim(s.last_seq - 1024)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        events = s.last_seq
    a = np.array(times, dtype=np.float64) / 1e3
    return {"batch": batch, "appends": len(times), "events": events,
            "append_us_p50": round(float(np.percentile(a, 50)), 1),
            "append_us_p99": round(float(np.percentile(a, 99)), 1),
            "append_us_max": round(float(a.max()), 1),
            "wall_us_per_event": round(wall * 1e6 / events, 3),
            "cpu_us_per_event": round(cpu * 1e6 / events, 3),
            "events_per_s": round(events / wall)}


def bench_reopen(directory: Path, records: int) -> dict:
    d = directory / "reopen"
    with Spool(d, max_bytes=1 << 30) as s:
        batch = _records(1, 64)
        for _ in range(records // 64):
            batch["sseq"] = np.arange(s.last_seq + 1, s.last_seq + 65, dtype=np.uint64)
            s.append(batch)
    t0 = time.perf_counter()
    with Spool(d, max_bytes=1 << 30) as s:
        t1 = time.perf_counter()
        n = len(s.pending(0))
        t2 = time.perf_counter()
    return {"records": n, "reopen_s": round(t1 - t0, 3), "pending_s": round(t2 - t1, 3)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None, help="where to make the spools (default: a "
                    "temporary directory under the current one)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    ap.add_argument("--batches", default="1,64,1024")
    ap.add_argument("--reopen", type=int, default=1_000_000,
                    help="records in the spool that is reopened (0: skip)")
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_spool.", dir=args.dir or "."))
    try:
        out = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "batches": [bench_batch(root, int(b), args.seconds)
                           for b in args.batches.split(",")]}
        if args.reopen:
            out["reopen"] = bench_reopen(root, args.reopen)
        print(json.dumps(out, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
