"""The pipeline against its kernel and its floor, as ratios measured in one run (issue 15).

    python -m perf.bench_pipeline [--events 2000000] [--runs 3] [--block 256]
                                  [--duration 5] [--latency-runs 3] [--latency-duration 20]
                                  [--skip node,latency] [--json]

This VM's speed changes from hour to hour, so every figure here is measured back to back in
one invocation and reported against the one it is judged by:

* ``kernel``: the kernel alone (:mod:`perf.bench_kernel`'s loop: batches of 4096 of a
  realistic flow into a fresh state), median events/s of ``--runs``;
* ``recovery``: the same flow written to a journal in blocks of ``--block`` records (a group
  commit's size at a few hundred thousand events/s) and replayed as ``exposure run`` does
  on start (:func:`exposure.store.recovery.replay_journal`, with the session table: the kernel
  on one core, its reader thread on another; the files in the page cache), median of
  ``--runs``; target: at least 80% of the kernel's rate;
* ``node``: ``exposure perf throughput`` against a node of the default process map (its own
  name, ports and data directory, started and stopped by the perf tool): the highest rate
  it sustains with the journal, every event acknowledged and seen on multicast; target: at
  least 50% of the kernel's rate;
* ``latency``: ``exposure perf compare --systems node,floor`` at 20,000 events/s: the node's
  p50 and p99 against the floor's (the same client and transports, a server that does
  nothing); targets: p50 at most 1.2x (issue 30; 1.3x before it), p99 at most 2x, nothing lost.
  The two take turns (``--latency-runs`` of each), and the median of the turns' own p50
  ratios is reported beside the ratio of the medians.

Steal time (``/proc/stat``) over the whole run is reported with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson

from exposure.bench.flowgen import generate
from exposure.core.capacity import Capacities
from exposure.harness.localnode import LocalNode
from exposure.harness.machine import steal_since, steal_ticks
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_layout import allocate
from exposure.store.journal import JournalWriter
from exposure.store.recovery import replay_journal
from perf.bench_kernel import _pin, run_once

__all__ = ["main"]

TARGETS = {"recovery_vs_kernel": 0.8, "node_vs_kernel": 0.5, "p50_vs_floor": 1.2,
           "p99_vs_floor": 2.0}


def _kernel(recs: np.ndarray, runs: int) -> dict:
    run_once(recs[:50_000], 4096)  # JIT warm-up (compile or cache load)
    rates = [len(recs) / run_once(recs, 4096)[0] for _ in range(runs)]
    return {"events_per_s": round(statistics.median(rates)), "runs": [round(r) for r in rates]}


def _recovery(recs: np.ndarray, runs: int, block: int, base: Path) -> dict:
    d = base / "journal"
    w = JournalWriter(d, segment_bytes=256 << 20)
    words = recs.view(np.uint64).reshape(len(recs), -1)
    for lo in range(0, len(recs), block):
        w.append(words[lo:lo + block])
    w.sync()
    w.close()
    caps = Capacities()
    sessions = np.zeros((caps.sources + 1, SESSION_COLS), np.uint64)
    _, st = allocate(caps)
    replay_journal(st, d, sessions, upto=1)  # compile (or load) the kernels first
    rates = []
    for _ in range(runs):
        buf, st = allocate(caps)
        sessions[:] = 0
        t0 = time.perf_counter()
        k = replay_journal(st, d, sessions)
        rates.append(k / (time.perf_counter() - t0))
        assert k == len(recs), (k, len(recs))
        del buf, st
    shutil.rmtree(d)
    return {"events_per_s": round(statistics.median(rates)), "block": block,
            "runs": [round(r) for r in rates]}


def _perf(args: list[str], timeout: float) -> dict:
    p = subprocess.run([sys.executable, "-m", "exposure", "perf", *args, "--json"],
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"exposure perf {' '.join(args)} failed: {p.stderr[-2000:]}")
    for line in p.stderr.splitlines():  # its progress, as it goes
        print(f"    {line}", file=sys.stderr, flush=True)
    return json.loads(p.stdout)


def _node_config(base: Path) -> Path:
    caps = Capacities()
    return LocalNode(base, orders=caps.orders, cells=caps.cells, prefix="bench",
                     start=False).config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=2_000_000)
    p.add_argument("--runs", type=int, default=3, help="kernel and recovery runs (median)")
    p.add_argument("--block", type=int, default=256, help="records per journal block")
    p.add_argument("--duration", type=float, default=5.0, help="throughput trial seconds")
    p.add_argument("--latency-runs", type=int, default=3)
    p.add_argument("--latency-duration", type=float, default=20.0)
    p.add_argument("--skip", default="", help="comma-separated: node, latency")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    steal0 = steal_ticks()
    t0 = time.time()
    out: dict = {"events": a.events, "targets": TARGETS}
    base = Path(tempfile.mkdtemp(prefix="exposure-pipeline-"))
    try:
        recs = generate(a.events, seed=1)
        mask = os.sched_getaffinity(0)
        _pin()  # the kernel alone on one core
        try:
            say("kernel ...")
            out["kernel"] = _kernel(recs, a.runs)
            say(f"  {out['kernel']['events_per_s']:,} events/s")
        finally:
            os.sched_setaffinity(0, mask)
        # Recovery as `exposure run` does it, before the node's processes start: the
        # kernel on one core, the journal's reader thread on another.
        say("recovery ...")
        out["recovery"] = _recovery(recs, a.runs, a.block, base)
        say(f"  {out['recovery']['events_per_s']:,} events/s")
        kernel = out["kernel"]["events_per_s"]
        ratios = {"recovery_vs_kernel": out["recovery"]["events_per_s"] / kernel}
        if "node" not in skip:
            say("node throughput (exposure perf throughput) ...")
            cfg = _node_config(base)
            r = _perf(["throughput", "--config", str(cfg), "--duration", str(a.duration)],
                      timeout=1800)["node"]
            out["node"] = {"sustained_rate": r["sustained_rate"], "p50_us": r["p50_us"],
                           "p99_us": r["p99_us"], "stages": r.get("stages", {})}
            ratios["node_vs_kernel"] = r["sustained_rate"] / kernel
        if "latency" not in skip:
            say("latency at 20,000 events/s (exposure perf compare --systems node,floor) ...")
            cfg = _node_config(base)
            r = _perf(["compare", "--systems", "node,floor", "--config", str(cfg),
                       "--runs", str(a.latency_runs), "--duration", str(a.latency_duration)],
                      timeout=3600)
            keep = ("p50_us", "p99_us", "p999_us", "max_us", "lost", "late_sends", "runs")
            out["latency"] = {s: {k: r[s][k] for k in keep if k in r[s]}
                              for s in ("node", "floor")}
            ratios["p50_vs_floor"] = r["node"]["p50_us"] / r["floor"]["p50_us"]
            ratios["p99_vs_floor"] = r["node"]["p99_us"] / r["floor"]["p99_us"]
            if "paired" in r:  # (runs in turns: the median of the turns' own ratios)
                out["latency"]["paired"] = r["paired"]["floor"]
                ratios["p50_vs_floor_paired"] = r["paired"]["floor"]["median_p50_ratio"]
            out["latency"]["lost"] = r["node"]["lost"]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    out["steal_percent"] = steal_since(steal0)["steal_percent"]
    out["seconds"] = round(time.time() - t0, 1)
    out["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    met = {k: (v >= TARGETS[k] if k.endswith("_kernel") else v <= TARGETS[k])
           for k, v in ratios.items() if k in TARGETS}
    if "latency" in out:
        met["nothing_lost"] = out["latency"]["lost"] == 0
    out["met"] = met
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    print(f"kernel     {kernel:>12,} events/s")
    print(f"recovery   {out['recovery']['events_per_s']:>12,} events/s  "
          f"{ratios['recovery_vs_kernel']:.2f}x kernel (target >= 0.8)")
    if "node" in out:
        print(f"node       {out['node']['sustained_rate']:>12,.0f} events/s  "
              f"{ratios['node_vs_kernel']:.2f}x kernel (target >= 0.5)")
    if "latency" in out:
        n, f = out["latency"]["node"], out["latency"]["floor"]
        print(f"p50        node {n['p50_us']:.1f} us, floor {f['p50_us']:.1f} us: "
              f"{ratios['p50_vs_floor']:.2f}x (target <= {TARGETS['p50_vs_floor']})")
        if "p50_vs_floor_paired" in ratios:
            print(f"           turn by turn: {out['latency']['paired']['node_p50_over']}, "
                  f"median {ratios['p50_vs_floor_paired']:.2f}x")
        print(f"p99        node {n['p99_us']:.0f} us, floor {f['p99_us']:.0f} us: "
              f"{ratios['p99_vs_floor']:.2f}x (target <= 2); lost {n['lost']}")
    print(f"steal      {out['steal_percent']}% over {out['seconds']} s; met: "
          + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in met.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
