"""``exposure perf``: how fast the monitor is on this machine, and beside what.

    exposure perf [latency|throughput|compare] [--rate N] [--duration S] [--warmup S]
                  [--runs K] [--config FILE] [--link-delay-us N] [--json] [--plot FILE.png]

* ``latency`` (default): one session sends a realistic flow open-loop at a fixed rate
  (default 20,000 events/s for 30 s after 2 s of warm-up), one event per frame. Latency is
  from each event's *intended* send time (coordinated-omission correction) to the receipt
  of the first multicast update that reflects it; HdrHistogram percentiles.
* ``throughput``: frames of ``--frame`` events; the highest rate (doubling, then
  bisecting) that runs ``--duration`` seconds with every event sent on time, every event
  acknowledged within a second of the last send and seen on multicast, nothing lost and
  nothing rejected (the flow is valid: a node that rejects it is not measuring tallies).
* ``compare``: ``latency`` on the node, then on the floor (``perf/floor.py``: the same
  client and transports, a server that does nothing) and on the two-tier design the fund
  had before (``perf/twotier.py``: the same kernel, its state in a real ``redis-server``),
  each on the CPU the node spins on, in the same invocation. With ``--runs K`` the systems
  take turns (run 1 of each, then run 2 of each, ...; each started for its run and stopped
  after it), so a change in the shared machine's speed during the invocation falls on all
  of them alike; each system's figures are the medians of its runs, and the JSON's
  ``paired`` gives, per system, its p50 over the node's in each turn and their median (the
  ratio least moved by that drift). ``--link-delay-us N`` adds a
  *projection* onto a network with that one-way delay: each design's measured figures plus
  N per network crossing on its critical path (counted while it ran: the two-tier service
  reports the sequential Redis round trips it made).

The node is the one of ``--config`` (the built-in default without it); if none answers on
its port, the tool starts it (``exposure run``) and stops it afterwards, on a scratch data
directory beside the config's (the same disk; removed when it stops), so the synthetic flow
never lands in a node's own journal and every start is a fresh day. The client runs in
this process, pinned to a CPU the node does not spin on.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
import psutil

from exposure.bench.flowgen import generate
from exposure.bench.loadgen import RunRaw, open_loop
from exposure.bench.measure import (
    PLOT_PERCENTILES,
    percentile_curve,
    summarize,
)
from exposure.bench.recorder import ArrivalRecorder
from exposure.config.node import ConfigError, NodeConfig, load_config
from exposure.core.log import setup
from exposure.harness.localnode import cpu_times, free_group, free_port

# redis, hiredis (the two-tier baseline) and matplotlib (--plot) are the [perf] extra, not
# the node's dependencies: without them, say so before anything runs.
_MISSING = [m for m in ("redis", "hiredis", "matplotlib") if importlib.util.find_spec(m) is None]
if _MISSING:
    raise SystemExit(f"exposure perf needs {', '.join(_MISSING)}, the [perf] extra: "
                     "pip install 'exposure[perf]' (from a checkout: pip install -e '.[perf]')")

__all__ = ["main", "measure_run", "Target"]

KEYS = ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _wait_listening(proc: subprocess.Popen, host: str, port: int, what: str,
                    timeout: float = 180) -> None:
    end = time.time() + timeout
    while not _answers(host, port):
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{what} exited with status {proc.returncode}: {err[-2000:]}")
        if time.time() > end:
            raise RuntimeError(f"{what} did not listen on {host}:{port} in {timeout:.0f} s")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen | None, timeout: float = 20) -> str:
    """SIGTERM, wait, SIGKILL if needed; returns what it printed on stdout."""
    if proc is None:
        return ""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


class Target:
    """A system under measurement: where to send, where to listen, which processes."""

    name = "node"

    def __init__(self, host: str, port: int, group: str, mport: int, interface: str):
        self.host, self.port, self.group, self.mport = host, port, group, mport
        self.interface = interface
        self.pids: dict[str, int] = {}

    def crossings(self) -> int:
        """Network crossings on an event's critical path (client -> server -> client)."""
        return 2

    def stats(self) -> dict:
        return {}

    def stop(self) -> None:
        pass


class NodeTarget(Target):
    """The node of a config: the running one, or one this tool starts."""

    def __init__(self, cfg: NodeConfig, config_path: str | None):
        super().__init__(cfg.ingest_host, cfg.ingest_port, cfg.group, cfg.fanout_port,
                         cfg.interface)
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.scratch: Path | None = None  # the data directory of a node this tool started
        if not _answers(cfg.ingest_host, cfg.ingest_port):
            self.scratch = _scratch_dir(cfg.data_dir)
            cmd = [sys.executable, "-m", "exposure", "run", "--data-dir", str(self.scratch)]
            if config_path:
                cmd += ["--config", config_path]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
            try:
                _wait_listening(self.proc, cfg.ingest_host, cfg.ingest_port, "the node")
            except BaseException:
                self.stop()
                raise
        self.pids = self._find_processes()

    def _find_processes(self) -> dict[str, int]:
        """The node's stage processes (``python -m exposure.node.supervisor --process NAME``) that
        belong to this config's node, found by their command lines."""
        out = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            cl = p.info["cmdline"] or []
            if "exposure.node.supervisor" in cl and "--process" in cl:
                if self.proc is not None and p.pid not in {
                        c.pid for c in psutil.Process(self.proc.pid).children()}:
                    continue
                out[cl[cl.index("--process") + 1]] = p.pid
        return out

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = None


def _scratch_dir(data_dir: Path) -> Path:
    """A fresh directory beside ``data_dir`` (on its disk), or in the system's temporary
    directory where that one cannot be made."""
    try:
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{data_dir.name}.perf-", dir=data_dir.parent))
    except OSError:
        return Path(tempfile.mkdtemp(prefix="exposure-perf-node-"))


class FloorTarget(Target):
    name = "floor"

    def __init__(self, cpu: int | None, interface: str):
        port, mport, group = free_port(), free_port(), free_group()
        super().__init__("127.0.0.1", port, group, mport, interface)
        cmd = [sys.executable, "-m", "exposure.bench.floor", "--port", str(port), "--group", group,
               "--mport", str(mport), "--interface", interface]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        try:
            _wait_listening(self.proc, self.host, port, "the floor server")
        except BaseException:
            self.stop()
            raise
        self.pids = {"floor": self.proc.pid}

    def stop(self) -> None:
        _stop(self.proc)


class TwoTierTarget(Target):
    name = "two_tier"

    def __init__(self, cpu: int | None, config_path: str | None, interface: str,
                 workdir: Path):
        from exposure.bench.twotier import RedisServer

        port, mport, group = free_port(), free_port(), free_group()
        super().__init__("127.0.0.1", port, group, mport, interface)
        self.proc = None
        self.redis = RedisServer(workdir, cpu=cpu)
        self._stats: dict = {}
        try:
            cmd = [sys.executable, "-m", "exposure.bench.twotier", "--port", str(port), "--group",
                   group, "--mport", str(mport), "--redis-port", str(self.redis.port)]
            if config_path:
                cmd += ["--config", config_path]
            if cpu is not None:
                cmd += ["--cpu", str(cpu)]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
            _wait_listening(self.proc, self.host, port, "the two-tier service")
        except BaseException:
            self.stop()
            raise
        self.pids = {"service": self.proc.pid, "redis-server": self.redis.proc.pid}

    def crossings(self) -> int:
        rt = int(self._stats.get("round_trips_per_batch", 2))
        return 2 + 2 * rt

    def stats(self) -> dict:
        return self._stats

    def stop(self) -> None:
        out = _stop(self.proc)
        self.proc = None
        for line in out.splitlines()[::-1]:
            try:
                self._stats = orjson.loads(line)
                break
            except orjson.JSONDecodeError:
                continue
        self.redis.stop()


def _flow(n: int, seed: int) -> np.ndarray:
    return generate(n, accounts=200, instruments=2000, universe=50, live_target=5000,
                    seed=seed)


def measure_run(target: Target, block: np.ndarray, rate: float, duration: float,
                warmup: float, session: int, frame: int = 1,
                client_cpu: int | None = None) -> dict:
    """One open-loop run against ``target`` (the client pinned to ``client_cpu``); the
    figures of the measured part."""
    n = max(1, int(rate * (warmup + duration)))
    mask = os.sched_getaffinity(0)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    cpu0, t0 = cpu_times(target.pids), time.monotonic()
    try:
        raw = open_loop(target.host, target.port, target.group, target.mport,
                        target.interface, block, n, rate, session, frame=frame,
                        warmup_s=warmup)
    finally:
        os.sched_setaffinity(0, mask)  # processes started later get every CPU
    wall = time.monotonic() - t0
    cpu1 = cpu_times(target.pids)
    return summarize_run(raw, warmup, {k: round(100 * (cpu1[k] - cpu0[k]) / wall, 1)
                                       for k in cpu1 if k in cpu0})


def summarize_run(raw: RunRaw, warmup: float, cpu: dict | None = None) -> dict:
    """The report of one run: latency from intended send times (coordinated-omission
    corrected) over the events due after ``warmup`` seconds; counts over all events."""
    n = len(raw.send_ns)
    sseqs = raw.first_sseq + np.arange(n, dtype=np.int64)
    arr = raw.arrivals or ArrivalRecorder(raw.session, raw.first_sseq, n)  # (none: saw nothing)
    seen = arr.seen
    measured = (raw.intended_ns - raw.intended_ns[0]) >= warmup * 1e9
    ok = measured & (seen > 0) & (raw.send_ns > 0)
    out = summarize(seen[ok] - raw.intended_ns[ok])
    raw_lat = summarize(seen[ok] - raw.send_ns[ok])
    # Acknowledgement latency (after durability, on a node with a journal): each event is
    # acknowledged by the first ACK at or beyond its seq.
    acked_at = np.zeros(n, np.int64)
    if raw.ack_log:
        t_ack = np.array([t for t, _ in raw.ack_log], np.int64)
        reach = np.maximum.accumulate(np.array([q for _, q in raw.ack_log], np.int64))
        idx = np.searchsorted(reach, sseqs, side="left")
        has = idx < len(reach)
        acked_at[has] = t_ack[idx[has]]
    ack_ok = ok & (acked_at > 0)
    ack = summarize(acked_at[ack_ok] - raw.intended_ns[ack_ok])
    out.update({
        "rate": round(raw.sent / raw.wall_s, 1) if raw.wall_s > 0 else 0.0,
        "target_rate": raw.rate,
        "sent": raw.sent,
        "acknowledged": raw.acknowledged,
        "rejected": raw.rejected,
        "seen": int(np.count_nonzero(seen)),
        "lost": int(raw.sent - np.count_nonzero(seen[raw.send_ns > 0])),
        "measured": int(ok.sum()),
        "stream_gaps": arr.stream_gaps,
        "late_sends": raw.late_sends,
        "catch_up_ms": raw.catch_up_ms,
        "steal_ms": raw.steal_ms,
        "client_cpu": {"user": round(raw.client_cpu[0], 3), "sys": round(raw.client_cpu[1], 3),
                       "faults": raw.client_faults},
        "uncorrected": {k: raw_lat[k] for k in ("p50_us", "p99_us", "max_us")},
        "ack": {k: ack[k] for k in ("p50_us", "p99_us", "max_us")},
        "stages": arr.legs(),
        "cpu_percent": cpu or {},
        "hist": percentile_curve(seen[ok] - raw.intended_ns[ok]),
    })
    return out


def _median(runs: list[dict]) -> dict:
    if len(runs) == 1:
        return dict(runs[0])
    out = dict(runs[-1])
    out["hist"] = [statistics.median(v) for v in zip(*(r["hist"] for r in runs), strict=True)]
    for k in KEYS + ("rate",):
        out[k] = statistics.median(r[k] for r in runs)
    for k in ("sent", "acknowledged", "rejected", "seen", "lost", "measured"):
        out[k] = sum(r[k] for r in runs)
    out["runs"] = [{k: r[k] for k in KEYS + ("rate", "lost", "steal_ms")} for r in runs]
    return out


def _latency_runs(target: Target, a, block: np.ndarray, session: int, runs: range,
                  log=None) -> list[dict]:
    out = []
    for k in runs:
        r = measure_run(target, block, a.rate, a.duration, a.warmup, session,
                        client_cpu=a.client_cpu)
        out.append(r)
        if log is not None:
            log(f"  run {k + 1}/{a.runs}: p50 {r['p50_us']:,.1f} us, p99 {r['p99_us']:,.0f} "
                f"us, lost {r['lost']}, rejected {r['rejected']}, "
                f"steal {r.get('steal_ms', 0):,.0f} ms")
    return out


def _paired(runs: dict[str, list[dict]]) -> dict:
    """Per system other than the node: its p50 and p99 over the node's, turn by turn (runs
    measured back to back), and the medians of those ratios."""
    node = runs.get("node")
    if not node:
        return {}
    out = {}
    for name, rs in runs.items():
        if name == "node":
            continue
        p50 = [n["p50_us"] / max(r["p50_us"], 1e-9) for n, r in zip(node, rs, strict=True)]
        p99 = [n["p99_us"] / max(r["p99_us"], 1e-9) for n, r in zip(node, rs, strict=True)]
        out[name] = {"node_p50_over": [round(x, 4) for x in p50],
                     "node_p99_over": [round(x, 4) for x in p99],
                     "median_p50_ratio": round(statistics.median(p50), 4),
                     "median_p99_ratio": round(statistics.median(p99), 4)}
    return out


def _throughput(target: Target, a, block: np.ndarray, session: int, log) -> dict:
    def trial(rate: float) -> tuple[bool, dict]:
        r = measure_run(target, block, rate, a.duration, 0.0, session, frame=a.frame,
                        client_cpu=a.client_cpu)
        good = (r["lost"] == 0 and r["acknowledged"] == r["sent"] and r["rejected"] == 0
                and r["rate"] >= 0.97 * rate and r["catch_up_ms"] <= 1000)
        cc = r["client_cpu"]
        log(f"  {rate:>12,.0f} events/s: achieved {r['rate']:,.0f}, lost {r['lost']}, "
            f"rejected {r['rejected']:,}, "
            f"acknowledged {r['acknowledged']:,}/{r['sent']:,} (last {r['catch_up_ms']:,.0f} ms "
            f"after the last send), p99 {r['p99_us']:,.0f} us, client CPU "
            f"{100 * cc['user']:.0f}% user {100 * cc['sys']:.0f}% sys, {cc['faults']:,} faults "
            f"-> {'sustained' if good else 'not sustained'}")
        return good, r

    lo, best, hi = 0.0, None, None
    rate = float(a.rate or 250_000)
    while hi is None:
        good, r = trial(rate)
        if good:
            lo, best = rate, r
            rate *= 2
        else:
            hi = rate
        if rate > a.max_rate:
            break
    for _ in range(a.bisect):
        if hi is None or (hi - lo) / max(hi, 1) < 0.1:
            break
        mid = (lo + hi) / 2 if lo else hi / 2
        good, r = trial(mid)
        if good:
            lo, best = mid, r
        else:
            hi = mid
    if best is None:
        return {"sustained_rate": 0.0, **{k: 0.0 for k in KEYS}, "rate": 0.0, "sent": 0,
                "lost": 0}
    best["sustained_rate"] = lo
    return best


def _projection(res: dict, delay_us: float) -> dict:
    out = {}
    for name, r in res.items():
        add = delay_us * r.get("crossings", 2)
        out[name] = {"crossings": r.get("crossings", 2),
                     "p50_us": r["p50_us"] + add, "p99_us": r["p99_us"] + add}
    return out


def _print_table(res: dict, mode: str, delay_us: float, proj: dict | None) -> None:
    print(f"exposure perf {mode}")
    head = (f"{'system':<10}{'p50':>10}{'p90':>10}{'p99':>10}{'p99.9':>10}{'max':>11}"
            f"{'rate/s':>12}{'sent':>10}{'acked':>10}{'seen':>10}{'lost':>7}")
    print(head)
    for name, r in res.items():
        print(f"{name:<10}{r['p50_us']:>8.1f}us{r['p90_us']:>8.1f}us{r['p99_us']:>8.1f}us"
              f"{r['p999_us']:>8.1f}us{r['max_us']:>9.0f}us{r['rate']:>12,.0f}"
              f"{r['sent']:>10,}{r.get('acknowledged', 0):>10,}{r.get('seen', 0):>10,}"
              f"{r['lost']:>7,}")
    node = res.get("node")
    for name, r in res.items():
        extra = []
        if r.get("stages"):
            extra.append("stages p50: " + ", ".join(
                f"{k.replace('_', ' ')} {v['p50_us']:.1f}us" for k, v in r["stages"].items()))
        if r.get("cpu_percent"):
            extra.append("cpu: " + ", ".join(f"{k} {v:.0f}%"
                                            for k, v in r["cpu_percent"].items()))
        if r.get("ack"):
            extra.append(f"acknowledged p50 {r['ack']['p50_us']:.0f}us p99 "
                         f"{r['ack']['p99_us']:.0f}us")
        extra.append(f"late sends {r.get('late_sends', 0)}, steal {r.get('steal_ms', 0):.0f}"
                     f" ms, stream gaps {r.get('stream_gaps', 0)}, rejected "
                     f"{r.get('rejected', 0)}")
        if "sustained_rate" in r:
            extra.append(f"sustained {r['sustained_rate']:,.0f} events/s")
        if node is not None and r is not node and node["p50_us"] > 0:
            extra.append(f"p50 {r['p50_us'] / node['p50_us']:.2f}x the node's, "
                         f"p99 {r['p99_us'] / max(node['p99_us'], 1e-9):.2f}x")
        print(f"  {name}: " + "; ".join(extra))
    if proj:
        print(f"projection onto a network with {delay_us:.0f} us one-way delay "
              "(measured + delay x crossings; not measured):")
        for name, p in proj.items():
            ratio = ""
            if name != "node" and "node" in proj:
                ratio = f"  ({p['p50_us'] / proj['node']['p50_us']:.1f}x the node's p50)"
            print(f"  {name:<10} {p['crossings']} crossings: p50 {p['p50_us']:.1f} us, "
                  f"p99 {p['p99_us']:.1f} us{ratio}")


def _plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    qs = np.array(PLOT_PERCENTILES)
    for name, r in res.items():
        if "hist" not in r:
            continue
        ax.plot(1 / (1 - qs / 100), r["hist"], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(1 / (1 - qs / 100))
    ax.set_xticklabels([f"{q:g}" for q in qs])
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (us)")
    ax.set_title("exposure: wire-to-wire latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="exposure perf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="latency",
                   choices=("latency", "throughput", "compare"))
    p.add_argument("--rate", type=float, help="events/s (latency: default 20000; "
                   "throughput: the first rate tried, default 250000)")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds excluded at the start")
    p.add_argument("--runs", type=int, default=1, help="runs per system (median reported)")
    p.add_argument("--frame", type=int, default=1000, help="events per frame (throughput)")
    p.add_argument("--bisect", type=int, default=3, help="bisection steps (throughput)")
    p.add_argument("--max-rate", type=float, default=50e6,
                   help="throughput: stop doubling above this rate")
    p.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    p.add_argument("--session", type=int, default=250, help="session id to send as")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--link-delay-us", type=float, default=0.0,
                   help="project onto a network with this one-way delay (compare)")
    p.add_argument("--systems", default="node,floor,two_tier",
                   help="which systems compare measures (comma-separated)")
    p.add_argument("--json", action="store_true", help="one JSON object, keyed by system")
    p.add_argument("--plot", metavar="FILE.png", help="latency-percentile plot")
    a = p.parse_args(argv)
    setup(label="exposure/perf")
    if a.rate is None and a.mode != "throughput":
        a.rate = 20_000.0
    if (a.rate is not None and a.rate <= 0) or a.duration <= 0 or a.warmup < 0 \
            or a.runs < 1 or not 1 <= a.frame <= 8192 or a.link_delay_us < 0:
        p.error("--rate, --duration, --runs must be positive, --warmup and --link-delay-us "
                "not negative, --frame within 1..8192")
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in ("node", "floor", "two_tier")]
    if bad:
        p.error(f"--systems: unknown {', '.join(bad)} (node, floor, two_tier)")
    if a.mode == "compare" and "two_tier" in systems and shutil.which("redis-server") is None:
        p.error("compare needs redis-server for the two-tier baseline (Debian package "
                "redis-server: apt-get install redis-server), or leave it out with "
                "--systems node,floor")
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        print(f"exposure perf: {e}", file=sys.stderr)
        return 2
    spin_cpus = {pr.cpu for pr in cfg.processes if pr.wait == "spin" and pr.cpu is not None}
    cpus = sorted(os.sched_getaffinity(0))
    free = [c for c in cpus if c not in spin_cpus] or cpus
    server_cpu = max(spin_cpus) if spin_cpus else None
    a.client_cpu = free[0]
    quiet = a.json
    session = min(a.session, cfg.max_sessions)

    def log(msg: str) -> None:  # progress: on stderr when stdout carries the JSON
        print(msg, file=sys.stderr if quiet else sys.stdout, flush=True)

    block_n = 1_000_000 if a.mode == "throughput" else min(
        1_000_000, max(1, int(a.rate * (a.duration + a.warmup))))
    block = _flow(block_n, a.seed)
    res: dict[str, dict] = {}
    paired: dict = {}
    with tempfile.TemporaryDirectory(prefix="exposure-perf-") as tmp:
        order = systems if a.mode == "compare" else ["node"]
        # compare with several runs: the systems take turns, one run each a turn
        turns = a.runs if a.mode == "compare" and len(order) > 1 else 1
        runs: dict[str, list[dict]] = {name: [] for name in order}
        extra: dict[str, dict] = {name: {} for name in order}
        for turn in range(turns):
            for name in order:
                log(f"measuring {name} ..." if turns == 1 else
                    f"measuring {name} (turn {turn + 1}/{turns}) ...")
                target: Target | None = None
                try:
                    if name == "node":
                        target = NodeTarget(cfg, a.config)
                        if target.proc is None and a.mode == "compare" and len(order) > 1:
                            log("note: a node was already running; it keeps spinning while "
                                "the baselines are measured beside it")
                    elif name == "floor":
                        target = FloorTarget(server_cpu, cfg.interface)
                    else:
                        target = TwoTierTarget(server_cpu, a.config, cfg.interface, Path(tmp))
                    if a.mode == "throughput":
                        res[name] = _throughput(target, a, block, session, log)
                    else:
                        some = range(turn, turn + 1) if turns > 1 else range(a.runs)
                        runs[name] += _latency_runs(target, a, block, session, some, log)
                finally:
                    if target is not None:
                        target.stop()
                # (after stop: the two-tier service reports its round trips as it exits)
                extra[name]["crossings"] = target.crossings()
                if target.stats():
                    extra[name]["service"] = target.stats()
        if a.mode != "throughput":
            for name in order:
                res[name] = {**_median(runs[name]), **extra[name]}
            paired = _paired(runs) if turns > 1 else {}
    proj = _projection(res, a.link_delay_us) if a.link_delay_us > 0 else None
    if a.plot:
        _plot(res, a.plot)
    for r in res.values():
        r.pop("hist", None)
    if a.json:
        out = dict(res)
        if paired:
            out["paired"] = paired
        if proj:
            out["projection"] = {"link_delay_us": a.link_delay_us, **proj}
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)
              .decode())
    else:
        _print_table(res, a.mode, a.link_delay_us, proj)
        if a.plot:
            print(f"plot written to {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
