"""The hot process's idle pass on a live node, in ns, and against another tree (issue 30).

    python -m perf.bench_idle_pass [--seconds 10] [--session] [--baseline TREE] [--json]

Starts a real node on the built-in default config (:class:`LocalNode`) and reads its hot
process's progress counter (``CTL_PROGRESS``: the runner counts every pass and stores the
count every 64, :mod:`exposure.node.stages.agent`) once a second: with nothing to do, ns
per pass is one second over the passes in it. ``--session`` keeps one session logged in
meanwhile (``exposure send --follow`` of one event, acknowledged), as during a latency
run.

With ``--baseline TREE`` (a checkout, e.g. ``git worktree add /tmp/base HEAD~1``) a
second node runs from that tree at the same time, its hot process on the same CPU (the
default map puts both on the last one), so the scheduler gives each half of it over the
same seconds: the ratio of their passes is the ratio of their passes' costs, measured in
one period. (The VM's speed moves by more than the difference between two trees from one
minute to the next, so two runs one after the other could not tell them apart.) The
median of the per-second ratios is reported; run it both ways round, since the first node
started has come out about 2% slower than an identical second one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

from exposure.harness.localnode import LocalNode, terminate
from exposure.harness.machine import steal_since, steal_ticks
from exposure.shm.control import CTL_PROGRESS

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]


def _tree(tree: str | None) -> Path:
    return Path(tree).resolve() if tree else ROOT


def _node(tmp: Path, tree: str | None) -> LocalNode:
    """A node of ``tree`` (None: this checkout). It runs in that directory: ``python -m``
    puts the working directory first on the path, before PYTHONPATH, so a node started
    from another checkout's directory would run that checkout's code."""
    n = LocalNode(tmp, start=False)
    n.env["PYTHONPATH"] = str(_tree(tree))
    n.wrap = ["env", f"--chdir={_tree(tree)}"]
    n.start()
    return n


def _follow(n: LocalNode, tmp: Path, tree: str | None) -> subprocess.Popen:
    """One session held open: ``exposure send --follow`` of the example's first event."""
    ev = tmp / "one.jsonl"
    ev.write_text((ROOT / "examples" / "basic.jsonl").read_text().splitlines()[0] + "\n")
    return subprocess.Popen([sys.executable, "-m", "exposure", "send", "--config",
                             str(n.config), "--follow", str(ev)], cwd=_tree(tree),
                            env={**os.environ, "PYTHONPATH": str(_tree(tree))},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(seconds: int, session: bool, baseline: str | None) -> dict:
    """Passes a second of this tree's node (and of ``baseline``'s, at the same time)."""
    trees = [None] + ([baseline] if baseline else [])
    nodes: list[LocalNode] = []
    follows: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="exposure-bench-idle-") as d:
        try:
            for i, tree in enumerate(trees):
                tmp = Path(d) / str(i)
                tmp.mkdir()
                n = _node(tmp, tree)
                nodes.append(n)
                if session:
                    follows.append(_follow(n, tmp, tree))
            time.sleep(3)  # logged in, acknowledged, idle
            s0 = steal_ticks()
            passes: list[list[int]] = [[] for _ in trees]
            for _ in range(seconds):
                b0 = [int(n.control()[CTL_PROGRESS]) for n in nodes]
                t0 = time.perf_counter()
                time.sleep(1)
                b1 = [int(n.control()[CTL_PROGRESS]) for n in nodes]
                dt = time.perf_counter() - t0
                for i in range(len(trees)):
                    passes[i].append(round((b1[i] - b0[i]) / dt))
            steal = steal_since(s0)
        finally:
            for p in follows:
                terminate(p)
            for n in nodes:
                n.stop()
    out = {"seconds": seconds, "session": session, "steal": steal,
           "passes_per_s": passes[0], "ns_per_pass": round(1e9 / statistics.median(passes[0]))}
    if baseline:
        ratios = [b / a for a, b in zip(passes[0], passes[1], strict=True) if a > 0]
        out.update(baseline=baseline, baseline_passes_per_s=passes[1],
                   cost_vs_baseline=round(statistics.median(ratios), 3))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--session", action="store_true", help="one session logged in")
    p.add_argument("--baseline", metavar="TREE", help="a checkout to run beside this one")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    r = measure(a.seconds, a.session, a.baseline)
    if a.json:
        print(orjson.dumps(r).decode())
        return 0
    share = " (each on half of the same CPU)" if a.baseline else ""
    print(f"idle pass{' with a session' if a.session else ''}: {r['ns_per_pass']} ns "
          f"(median of {a.seconds} s{share}); steal {r['steal']['steal_percent']}%")
    if a.baseline:
        print(f"this tree's pass costs {r['cost_vs_baseline']:.3f}x {a.baseline}'s "
              f"(median of the per-second ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
