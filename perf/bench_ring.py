"""Ring throughput between two pinned processes (event-sized records, verified).

    python -m perf.bench_ring [--records 5000000] [--capacity 4096] [--record-size 128]
                              [--runs 3] [--check seq|full]

Producer and consumer are separate processes (``python -m exposure.harness.ringsoak``), pinned to
the last two CPUs, both spinning, batches of up to 4,096 records; the consumer checks every
record's sequence word (``--check full``: every byte). Reports the consumer's records/s,
median of the runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import uuid

import orjson

from exposure.shm.ring import Ring


def run_once(records: int, capacity: int, record_size: int, check: str = "seq") -> dict:
    name = f"exposure-bench-ring-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ring = Ring.create(name, capacity, record_size)
    cpus = sorted(os.sched_getaffinity(0))[-2:]
    procs = []
    try:
        for side, cpu in (("consume", cpus[-1]), ("produce", cpus[0])):
            procs.append(subprocess.Popen(
                ["taskset", "-c", str(cpu), sys.executable, "-m", "exposure.harness.ringsoak", side,
                 name, str(records), "--check", check], stdout=subprocess.PIPE))
        outs = [p.communicate(timeout=600)[0] for p in procs]
        if any(p.returncode for p in procs):
            raise RuntimeError("a soak process failed")
        return orjson.loads(outs[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        ring.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=5_000_000)
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--record-size", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--check", choices=["seq", "full"], default="seq",
                   help="consumer verifies sequence words (default) or every byte")
    a = p.parse_args(argv)
    run_once(10_000, a.capacity, a.record_size)  # JIT cache warm-up
    rates = [run_once(a.records, a.capacity, a.record_size, a.check)["records_per_s"]
             for _ in range(a.runs)]
    med = statistics.median(rates)
    print(f"ring {a.capacity} x {a.record_size} B, {a.records:,} records, {a.runs} runs: "
          f"median {med / 1e6:.2f} M records/s ({med * a.record_size / 2**20:.0f} MiB/s); "
          f"runs {', '.join(f'{r / 1e6:.2f}M' for r in rates)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
