"""A node's start and stop, as the tests pay them (issue: the suite's time budget).

    python -m perf.bench_start [--nodes 10] [--json]

Starts ``--nodes`` real nodes one after the other (``exposure.harness.localnode.LocalNode``
on the built-in default config, an empty data directory: what most tests start), each
until it listens, and stops each (SIGTERM until the supervisor has exited). Reports the
median start and stop in seconds and the CPU seconds the node's processes used per start
and stop (supervisor and stage processes together, from ``RUSAGE_CHILDREN``), with the load
average and the steal while it ran. The kernels must be in numba's cache (run it twice:
the first run of new sources compiles them).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import orjson

from exposure.harness.localnode import LocalNode
from exposure.harness.machine import steal_since, steal_ticks

__all__ = ["main"]


def measure(nodes: int) -> dict:
    """Start and stop ``nodes`` nodes; the figures (see the module's doc)."""
    starts, stops = [], []
    load0, s0 = os.getloadavg()[0], steal_ticks()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(prefix="exposure-bench-start-") as d:
        for _ in range(nodes):
            t0 = time.perf_counter()
            n = LocalNode(Path(d))
            t1 = time.perf_counter()
            n.stop()
            stops.append(time.perf_counter() - t1)
            starts.append(t1 - t0)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"nodes": nodes, "start_s_median": round(statistics.median(starts), 3),
            "start_s_min": round(min(starts), 3),
            "stop_s_median": round(statistics.median(stops), 3),
            "stop_s_min": round(min(stops), 3),
            "cpu_s_per_node": round(cpu / nodes, 3),
            "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2),
            **steal_since(s0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_start", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=10)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    if a.nodes < 1:
        p.error("--nodes is at least 1")
    r = measure(a.nodes)
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(r) + b"\n")
    else:
        print(f"{r['nodes']} nodes: start median {r['start_s_median']:.2f} s (min "
              f"{r['start_s_min']:.2f}), stop median {r['stop_s_median']:.2f} s (min "
              f"{r['stop_s_min']:.2f}), {r['cpu_s_per_node']:.2f} CPU s per start and stop; "
              f"load {r['load_before']}-{r['load_after']}, steal {r['steal_percent']}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
