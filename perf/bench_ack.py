"""The acknowledgement tail, A against B in one run: two node configs that differ by a few
TOML lines, measured alternately (A, B, A, B, ...) with ``exposure perf latency``.

    python -m perf.bench_ack --runs 4 --rate 20000 --duration 10 \\
        --a '[journal]prewrite_mb = 0' --b '[journal]prewrite_mb = 4'

Each ``--a`` / ``--b`` is ``[section]key = value`` lines separated by ``;``; they are placed
in that section of a node config that is otherwise the harness's (its own name, ports and
data directory). Every run starts a fresh node (a fresh journal), measures, and reads the
node's journal counters (fsyncs, their mean and max) before stopping it. It prints one line
per run and the medians per side, and the machine's steal over each run; ``--json`` prints
them as JSON. Compare the two sides of one invocation, never numbers from different hours.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from exposure.harness.localnode import LocalNode
from exposure.harness.machine import steal_ms


def _apply(node: LocalNode, spec: str) -> None:
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        if not item.startswith("[") or "]" not in item:
            raise SystemExit(f"--a/--b item {item!r}: write [section]key = value")
        section, line = item[1:].split("]", 1)
        node.add_keys(section, line)


def _run(tmp: Path, spec: str, args: argparse.Namespace) -> dict:
    node = LocalNode(tmp, start=False)
    _apply(node, spec)
    node.start()
    try:
        before = node.counters()
        s0 = steal_ms()
        p = subprocess.run([sys.executable, "-m", "exposure", "perf", "latency", "--config",
                            str(node.config), "--rate", str(args.rate), "--duration",
                            str(args.duration), "--json"], capture_output=True, text=True,
                           timeout=args.duration * 4 + 120)
        steal = steal_ms() - s0
        after = node.counters()
    finally:
        node.stop()
    if p.returncode != 0:
        raise SystemExit(f"exposure perf latency failed:\n{p.stderr[-2000:]}")
    res = json.loads(p.stdout)["node"]
    n = after["journal_fsyncs_total"] - before["journal_fsyncs_total"]
    ns = after["journal_fsync_ns_total"] - before["journal_fsync_ns_total"]
    return {"ack_p50_ms": res["ack"]["p50_us"] / 1e3, "ack_p99_ms": res["ack"]["p99_us"] / 1e3,
            "ack_max_ms": res["ack"]["max_us"] / 1e3, "p50_us": res["p50_us"],
            "p99_us": res["p99_us"], "lost": res["lost"], "fsyncs": n,
            "fsync_mean_ms": ns / max(n, 1) / 1e6,
            "fsync_max_ms": after["journal_fsync_ns_max"] / 1e6, "steal_ms": steal}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", default="", help="config lines of side A ([section]key = v; ...)")
    ap.add_argument("--b", required=True, help="config lines of side B")
    ap.add_argument("--runs", type=int, default=4, help="runs per side, alternated")
    ap.add_argument("--rate", type=int, default=20000)
    ap.add_argument("--duration", type=float, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="bench_ack.") as d:
        for k in range(args.runs):
            for side, spec in (("A", args.a), ("B", args.b)):
                r = _run(Path(d), spec, args)
                out[side].append(r)
                if not args.json:
                    print(f"{side} run {k + 1}: ack p50 {r['ack_p50_ms']:.2f} ms, p99 "
                          f"{r['ack_p99_ms']:.2f} ms, max {r['ack_max_ms']:.1f} ms; fsync "
                          f"mean {r['fsync_mean_ms']:.2f} ms, max {r['fsync_max_ms']:.1f} ms;"
                          f" wire p50 {r['p50_us']:.0f} us; steal {r['steal_ms']:.0f} ms",
                          flush=True)
    med = {side: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
           for side, runs in out.items()}
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, "runs": out, "median": med}))
    else:
        for side, spec in (("A", args.a), ("B", args.b)):
            m = med[side]
            print(f"{side} median ({spec or 'the default'}): ack p50 {m['ack_p50_ms']:.2f} ms,"
                  f" p99 {m['ack_p99_ms']:.2f} ms, max {m['ack_max_ms']:.1f} ms; fsync mean "
                  f"{m['fsync_mean_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
