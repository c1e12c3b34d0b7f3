"""How much the platform itself stalls a spinning process (in the spirit of jHiccup).

    python -m perf.hiccup [--seconds 30] [--cpu N ...] [--threshold-us 200] [--json]

One process per CPU (all CPUs by default) spins on the clock doing nothing else and records
every gap between two consecutive clock reads longer than the threshold: time the process
did not run although it never blocked (the OS or the hypervisor took the CPU). It also
reports the hypervisor's steal time from ``/proc/stat`` over the same interval.

Run it before trusting a latency figure on a VM: a node cannot have a better tail than the
machine it runs on. On the 2-vCPU VM this project is developed on, a plain spinner loses
about 1.1 ms every 512 ms and, a few times a minute, about 100 ms (steal).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time

import orjson

from exposure.harness.machine import steal_ms

__all__ = ["spin_gaps", "main"]


def spin_gaps(seconds: float, threshold_ns: int) -> list[tuple[float, float]]:
    """Spin for ``seconds``; return (ms since start, gap in us) of each gap over the
    threshold."""
    clock = time.perf_counter_ns
    t0 = last = clock()
    end = t0 + int(seconds * 1e9)
    gaps = []
    while last < end:
        now = clock()
        if now - last > threshold_ns:
            gaps.append(((last - t0) / 1e6, (now - last) / 1e3))
        last = now
    return gaps


def _worker(cpu: int, seconds: float, threshold_ns: int, q) -> None:
    os.sched_setaffinity(0, {cpu})
    q.put((cpu, spin_gaps(seconds, threshold_ns)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--cpu", type=int, nargs="*")
    p.add_argument("--threshold-us", type=float, default=200.0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    cpus = a.cpu if a.cpu else sorted(os.sched_getaffinity(0))
    if a.seconds <= 0 or a.threshold_us <= 0:
        p.error("--seconds and --threshold-us must be positive")
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    stolen0 = steal_ms()
    procs = [ctx.Process(target=_worker, args=(c, a.seconds, int(a.threshold_us * 1000), q))
             for c in cpus]
    for pr in procs:
        pr.start()
    res = dict(q.get() for _ in procs)
    for pr in procs:
        pr.join()
    stolen = steal_ms() - stolen0
    out = {"seconds": a.seconds, "threshold_us": a.threshold_us, "steal_ms": stolen, "cpus": {
        str(c): {"gaps": len(g), "total_ms": sum(x for _, x in g) / 1000,
                 "max_us": max((x for _, x in g), default=0.0),
                 "over_10ms": sum(1 for _, x in g if x > 10_000)}
        for c, g in sorted(res.items())}}
    if a.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"{a.seconds:.0f} s of spinning, gaps over {a.threshold_us:.0f} us; "
          f"hypervisor steal over the interval (all CPUs): {stolen:.0f} ms")
    for c, r in out["cpus"].items():
        print(f"  cpu {c}: {r['gaps']} gaps, {r['total_ms']:.1f} ms lost, "
              f"max {r['max_us']:.0f} us, {r['over_10ms']} over 10 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
