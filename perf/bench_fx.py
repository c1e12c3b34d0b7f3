"""Currencies in the kernel (issue 29, SPEC section 7): what an ``fx`` costs, and what
currencies cost the kernel's flow without any ``fx``.

    python -m perf.bench_fx [--fx 400] [--baseline DIR] [--rev REV] [--rounds 5]
                            [--events 1000000] [--json]

1. **One fx.** A default-capacity state holding a currency in 10,000 cells of 1,000
   instruments (10 accounts hold every instrument; 1,000 more instruments in the base
   currency and 1,000 in another one, with positions too, which the fx must not touch);
   then ``--fx`` fx events of that currency with moving rates, each its own batch as a node
   applies it alone: per-fx times of ``apply_batch`` (each includes clearing the previous
   fx's change lists, the next batch's first act), median and p99. Target: at most 1 ms.
2. **The flow without fx, against the kernel before currencies.** With ``--baseline DIR``
   (a checkout of the commit before, e.g. ``git worktree add /tmp/fxbase fb6294b``): the
   generated flow of ``perf/bench_kernel.py`` is written once to a temporary file and
   applied by this tree's kernel and by DIR's, each in a child process of its own (the two
   ``exposure`` packages cannot share one), alternating old, new, new, old ... ``--rounds``
   times; each child reports its median of 3 runs (JIT warm-up excluded) and the ratio is
   of the medians over rounds. Target: at least 0.95.
3. **The kernel's code alone** (``--rev REV``, e.g. ``fb6294b``): REV's kernel source
   (``git show``) loaded as a module of its own in this process, over this tree's state
   layout, against this kernel on the same records, alternating, ``--rounds`` pairs: the
   ratio of medians and the median of the paired ratios (adjacent runs share the
   machine's drift, which on a shared VM is the larger error).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from exposure.bench.flowgen import generate
from exposure.core.types import C_CELLS, EVENT_DTYPE, T_FILL, T_FX, T_INSTRUMENT
from exposure.engine.kernel import apply_batch
from exposure.shm.tally_layout import allocate

ROOT = Path(__file__).resolve().parent.parent

# The child: applies the records of a file with its own tree's kernel (PYTHONPATH).
_CHILD = r"""
import json, statistics, sys, time
import numpy as np
from exposure.core.types import EVENT_DTYPE
from exposure.engine.kernel import apply_batch
from exposure.shm.tally_layout import allocate
recs = np.fromfile(sys.argv[1], EVENT_DTYPE)
runs, batch = int(sys.argv[2]), int(sys.argv[3])
def once(r):
    buf, st = allocate()
    status = np.zeros(len(r), np.uint8)
    t0 = time.perf_counter()
    for lo in range(0, len(r), batch):
        apply_batch(st, r[lo:lo + batch], status[lo:lo + batch])
    return time.perf_counter() - t0
once(recs[:50_000])
rates = [len(recs) / once(recs) for _ in range(runs)]
print(json.dumps({"median": statistics.median(rates), "rates": rates}))
"""


def _pin() -> None:
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


def _cpu_times() -> list[int]:
    """The machine's cpu line of /proc/stat (user ... steal), or [] where there is none."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return []


def _steal(t0: list[int], t1: list[int]) -> float | None:
    """The share of CPU time stolen by the host between two :func:`_cpu_times`."""
    if not t0 or not t1:
        return None
    d = [b - a for a, b in zip(t0, t1, strict=True)]
    return d[7] / sum(d) if sum(d) else None


def _rec(n: int) -> np.ndarray:
    return np.zeros(n, EVENT_DTYPE)


def fx_times(n_fx: int, cur: int = 7) -> dict:
    """Part 1: per-fx seconds for a currency in 10,000 cells of 1,000 instruments."""
    buf, st = allocate()
    status = np.zeros(1 << 16, np.uint8)
    gseq = 1

    def apply(recs: np.ndarray) -> tuple[float, float]:
        nonlocal gseq
        recs["gseq"] = np.arange(gseq, gseq + len(recs), dtype=np.uint64)
        gseq += len(recs)
        t0, c0 = time.perf_counter(), time.thread_time()
        apply_batch(st, recs, status[:len(recs)])
        return time.perf_counter() - t0, time.thread_time() - c0

    n_inst = 3000  # 0..999 in ``cur``, 1000..1999 in the base, 2000..2999 in currency 8
    ins = _rec(n_inst)
    ins["type"] = T_INSTRUMENT
    ins["instrument"] = np.arange(n_inst)
    ins["x0"], ins["x1"], ins["x2"] = 1.0, 0.2, 1.0
    ins["sector"] = np.arange(n_inst) % 50
    ins["qty"] = np.where(np.arange(n_inst) < 1000, cur, np.where(np.arange(n_inst) < 2000, 0, 8))
    apply(ins)
    fills = _rec(10 * n_inst)  # 10 accounts x every instrument: 10,000 cells in ``cur``
    fills["type"] = T_FILL
    fills["side"] = 1 + (np.arange(len(fills)) % 2)
    fills["account"] = np.arange(len(fills)) % 10
    fills["instrument"] = np.arange(len(fills)) // 10
    fills["order_id"] = np.arange(len(fills))
    fills["qty"] = 100 + np.arange(len(fills)) % 900
    fills["price"] = 10.0 + (np.arange(len(fills)) % 97)
    apply(fills)
    cells = st.cells[:int(st.ctr[C_CELLS])]
    held = int((st.inst["currency"][cells["instrument"]] == cur).sum())
    rng = np.random.default_rng(29)
    times = []
    rate = 0.0067
    for _ in range(n_fx):
        rate *= float(rng.uniform(0.99, 1.01))
        r = _rec(1)
        r["type"], r["qty"], r["price"] = T_FX, cur, rate
        times.append(apply(r))
        assert status[0] == 0
    del buf
    wall = sorted(t[0] for t in times)
    cpu = sorted(t[1] for t in times)
    p99 = min(len(times) - 1, int(0.99 * len(times)))
    return {"cells_in_currency": held, "fx": n_fx,
            "median_us": statistics.median(wall) * 1e6, "p99_us": wall[p99] * 1e6,
            "max_us": wall[-1] * 1e6, "cpu_median_us": statistics.median(cpu) * 1e6,
            "cpu_p99_us": cpu[p99] * 1e6}


def flow_ratio(baseline: Path, events: int, rounds: int, batch: int = 4096) -> dict:
    """Part 2: this tree's kernel against ``baseline``'s on the generated flow, no fx."""
    recs = generate(events, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flow.bin"
        recs.tofile(path)
        out: dict[str, list[float]] = {"old": [], "new": []}
        pair = [("old", baseline), ("new", ROOT)]
        for k in range(rounds):  # old first, then new first, ...: no order advantage
            for name, tree in (pair if k % 2 == 0 else pair[::-1]):
                env = {**os.environ, "PYTHONPATH": str(tree)}
                res = subprocess.run([sys.executable, "-c", _CHILD, str(path), "3", str(batch)],
                                     cwd=tree, env=env, capture_output=True, text=True)
                if res.returncode != 0:
                    raise SystemExit(f"the {name} kernel's run in {tree} failed "
                                     f"(exit {res.returncode}):\n{res.stderr[-2000:]}")
                out[name].append(json.loads(res.stdout.strip().splitlines()[-1])["median"])
    old, new = statistics.median(out["old"]), statistics.median(out["new"])
    return {"events": events, "rounds": rounds, "old_median": old, "new_median": new,
            "ratio": new / old, "old": out["old"], "new": out["new"]}


def _old_kernel(rev: str, tmp: Path):
    """The kernel source of commit ``rev`` as a module of its own (``git show``), over
    this tree's types and state layout: the commit before currencies reads none of the new
    fields, and every constant it uses has the same value but ``T_MAX`` (11 then: pinned)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:exposure/engine/kernel.py"],
                         capture_output=True, text=True, check=True).stdout
    if "t < 1 or t > T_MAX" not in src:
        raise SystemExit(f"{rev}'s kernel has no 't > T_MAX' check to pin")
    src = src.replace("t < 1 or t > T_MAX", "t < 1 or t > 11")
    path = tmp / f"kernel_{rev[:12]}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"kernel_{rev[:12]}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.apply_batch


def kernel_ratio(rev: str, events: int, rounds: int, batch: int = 4096) -> dict:
    """Part 3: this kernel against ``rev``'s kernel source in one process, on the same
    records and the same layout, alternating (new, old, old, new, ...): the code's cost
    alone, with the machine's drift shared by each adjacent pair."""
    recs = generate(events, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        old_apply = _old_kernel(rev, Path(tmp))

        def once(fn) -> tuple[float, float]:
            """Events per second of wall time and of this thread's CPU time (which a
            busy machine's other processes do not lengthen)."""
            buf, st = allocate()
            status = np.zeros(len(recs), np.uint8)
            t0, c0 = time.perf_counter(), time.thread_time()
            for lo in range(0, len(recs), batch):
                fn(st, recs[lo:lo + batch], status[lo:lo + batch])
            dt, dc = time.perf_counter() - t0, time.thread_time() - c0
            del buf, st
            return len(recs) / dt, len(recs) / dc

        once(old_apply)  # warm-up (the old source compiles once: ~40 s)
        once(apply_batch)
        out: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for k in range(rounds):
            pair = [("new", apply_batch), ("old", old_apply)]
            for name, fn in (pair if k % 2 == 0 else pair[::-1]):
                out[name].append(once(fn))
    res: dict = {"rev": rev, "events": events, "rounds": rounds}
    for j, clock in enumerate(("wall", "cpu")):
        old = [x[j] for x in out["old"]]
        new = [x[j] for x in out["new"]]
        ratios = [n / o for n, o in zip(new, old, strict=True)]
        res[clock] = {"old_median": statistics.median(old), "new_median": statistics.median(new),
                      "ratio_of_medians": statistics.median(new) / statistics.median(old),
                      "median_paired_ratio": statistics.median(ratios), "old": old,
                      "new": new}
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--fx", type=int, default=400)
    p.add_argument("--baseline", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--rev", default=None,
                   help="also run part 3: this kernel against REV's in one process")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    _pin()
    out: dict = {"loadavg": os.getloadavg()}
    cpu0 = _cpu_times()
    fx_times(5)  # JIT warm-up (compile or cache load)
    out["fx"] = fx_times(a.fx)
    if a.baseline is not None:
        out["flow"] = flow_ratio(a.baseline, a.events, a.rounds)
    if a.rev is not None:
        out["kernel"] = kernel_ratio(a.rev, a.events, a.rounds)
    out["loadavg_end"] = os.getloadavg()
    out["steal"] = _steal(cpu0, _cpu_times())
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    f = out["fx"]
    print(f"fx of a currency in {f['cells_in_currency']:,} cells of 1,000 instruments: "
          f"median {f['median_us']:.0f} us, p99 {f['p99_us']:.0f} us, max "
          f"{f['max_us']:.0f} us ({f['fx']} fx; target at most 1,000 us); its thread's CPU "
          f"time: median {f['cpu_median_us']:.0f} us, p99 {f['cpu_p99_us']:.0f} us")
    if "flow" in out:
        w = out["flow"]
        print(f"flow without fx, {w['events']:,} events: new {w['new_median'] / 1e6:.2f} M/s, "
              f"old {w['old_median'] / 1e6:.2f} M/s, ratio {w['ratio']:.3f} "
              f"(medians of {w['rounds']} alternating rounds; target at least 0.95)")
        print("  old " + ", ".join(f"{x / 1e6:.2f}" for x in w["old"]))
        print("  new " + ", ".join(f"{x / 1e6:.2f}" for x in w["new"]))
    if "kernel" in out:
        k = out["kernel"]
        for clock in ("wall", "cpu"):
            w = k[clock]
            print(f"kernel code alone, one process, {k['events']:,} events, {clock} time: new "
                  f"{w['new_median'] / 1e6:.2f} M/s, {k['rev'][:12]} "
                  f"{w['old_median'] / 1e6:.2f} M/s; ratio of medians "
                  f"{w['ratio_of_medians']:.3f}, median of paired ratios "
                  f"{w['median_paired_ratio']:.3f} ({k['rounds']} rounds)")
            print("  old " + ", ".join(f"{x / 1e6:.2f}" for x in w["old"]))
            print("  new " + ", ".join(f"{x / 1e6:.2f}" for x in w["new"]))
    steal = "n/a" if out["steal"] is None else f"{out['steal']:.1%}"
    print(f"load average {out['loadavg'][0]:.1f} at the start, "
          f"{out['loadavg_end'][0]:.1f} at the end; steal {steal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
