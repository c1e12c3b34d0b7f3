"""What an attack on the session port costs a well-behaved session:
``python -m perf.bench_abuse [--seconds S] [--rate R] [--runs K]``.

One real node (``exposure run``, the default process map: the hot process spins on the
last CPU) with small port limits. In every run, against the same node:

* phase **A**: one session sends a realistic flow open-loop at ``--rate`` events/s, one
  event per frame, and its wire-to-wire latency is measured with the perf tool's
  machinery (:func:`exposure.bench.tool.measure_run`: from each event's intended send time to the
  multicast update that reflects it, coordinated-omission corrected, HdrHistogram);
* phase **B**: the same while an attacker process
  (:class:`exposure.harness.attack.Attack`, one process, one thread, non-blocking sockets
  on one epoll) floods the port: connections past the cap that send nothing, half a
  LOGIN, garbage or only HEARTBEATs (``--conn-rate`` per second, ``--hold`` held open at a
  time), plus ``--slow`` logged-in clients that stream events, each with
  ``--slow-heartbeats`` HEARTBEATs, and never read the answers (each logs in again when
  the node drops it).

The report (JSON on stdout): p50/p99/p99.9/max of A and B side by side (per run, and
the medians), the attack's volume (connections/s, frames/s, bytes/s and what the
attacker saw), the node's port counters over each phase (``exposure.shm.session_layout``),
the hypervisor steal time and load average of each phase (``/proc/stat``), the CPU the
node's and the attacker's processes used, and the latency of each leg of the path.

On 2 cores there is no spare CPU for an attacker: the node's hot process spins on one and
the measuring client busy-polls on the other. The attacker runs on the client's CPU,
niced (``--nice``, default 10: CFS gives it about a tenth of that CPU while the client
spins), so what it achieves is less than asked and is reported as achieved. The legs
separate where a slowdown comes from: ``client_to_ingest``, ``ingest_to_compute`` and
``compute_to_fanout`` are the node's (its loop busy with the attack), ``fanout_to_client``
is the client's (its CPU shared with the attacker).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exposure.harness.attack import PRE_KINDS, Attack
from exposure.harness.machine import steal_ms
from exposure.harness.wait import wait_for

__all__ = ["main"]



# ---------------------------------------------------------------------- the attacker process
def _attacker_main(a: argparse.Namespace) -> int:
    """``--attacker``: run an Attack until SIGTERM, then print its summary as JSON."""
    try:
        os.nice(a.nice)
    except OSError:
        pass
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    per = a.conn_rate / len(PRE_KINDS)
    att = Attack("127.0.0.1", a.port, {k: per for k in PRE_KINDS}, hold=a.hold,
                 lifetime_s=a.lifetime, slow=a.slow, slow_rate=a.slow_rate,
                 slow_sessions=range(a.slow_first, a.slow_first + a.slow),
                 slow_heartbeats=a.slow_heartbeats)
    signal.signal(signal.SIGTERM, lambda *_: att.stop())
    print("attacking", flush=True)
    out = att.run()
    print(json.dumps(out), flush=True)
    return 0


class _Attacker:
    """The attacker process of one phase B."""

    def __init__(self, port: int, a: argparse.Namespace, cpu: int | None):
        cmd = [sys.executable, "-m", "perf.bench_abuse", "--attacker", "--port", str(port),
               "--conn-rate", str(a.conn_rate), "--hold", str(a.hold), "--slow",
               str(a.slow), "--slow-rate", str(a.slow_rate), "--slow-first",
               str(a.slow_first), "--lifetime", str(a.lifetime), "--slow-heartbeats",
               str(a.slow_heartbeats)]
        if cpu is not None:
            cmd += ["--cpu", str(cpu)]
        cmd += ["--nice", str(a.nice)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "attacking" not in line:
            self.proc.kill()
            raise RuntimeError(f"the attacker did not start: {line!r}")

    def cpu_s(self) -> float:
        import psutil

        try:
            t = psutil.Process(self.proc.pid).cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        for line in reversed((out or "").splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        return {}


def _delta(after: dict, before: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if k != "open"}


def _phase(node, target, block, a, session: int, client_cpu: int, attack: bool) -> dict:
    from exposure.bench.tool import measure_run

    pids0 = node.pids()
    c0, s0, t0 = node.port_counters(), steal_ms(), time.monotonic()
    load0 = os.getloadavg()[0]
    att = _Attacker(node.port, a, client_cpu) if attack else None
    try:
        if att is not None:  # the flood is at the cap before the measurement starts
            wait_for(lambda: node.port_counters().get("evicted_before_login", 0)
                       > c0.get("evicted_before_login", 0), 30, "the flood to reach the cap")
        a_cpu0 = att.cpu_s() if att else 0.0
        r = measure_run(target, block, a.rate, a.seconds, a.warmup, session,
                        client_cpu=client_cpu)
        a_cpu = att.cpu_s() - a_cpu0 if att else 0.0
    finally:
        stats = att.stop() if att is not None else {}
    wall = time.monotonic() - t0
    c1 = node.port_counters()
    out = {"loadavg_1m_before": round(load0, 2)}
    out.update({k: r[k] for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us", "rate",
                             "sent", "acknowledged", "lost", "late_sends", "steal_ms")})
    out["ack"] = r["ack"]
    # Where the time goes (medians and p99 of each leg, us): client_to_ingest grows when
    # the node's loop is busy with the attack; fanout_to_client when the client's CPU is.
    out["stages"] = r["stages"]
    out["cpu_percent"] = r["cpu_percent"]
    out["phase_steal_ms"] = round(steal_ms() - s0, 1)
    out["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    out["phase_s"] = round(wall, 2)
    out["node_counters"] = _delta(c1, c0)
    out["open_connections_after"] = c1.get("open", 0)
    out["node_restarted"] = node.pids() != pids0
    if att is not None:
        stats["cpu_percent"] = round(100 * a_cpu / max(a.seconds + a.warmup, 1e-9), 1)
        out["attack"] = stats
    return out


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_abuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds excluded per phase")
    p.add_argument("--rate", type=float, default=5000.0, help="the session's events/s")
    p.add_argument("--runs", type=int, default=3, help="A/B pairs (medians reported)")
    p.add_argument("--conn-rate", type=float, default=2000.0,
                   help="attack connections/s before login (all four kinds together)")
    p.add_argument("--hold", type=int, default=200, help="attack connections held open")
    p.add_argument("--lifetime", type=float, default=5.0,
                   help="seconds an attack connection is held if the node does not close it")
    p.add_argument("--slow", type=int, default=4, help="never-reading logged-in clients")
    p.add_argument("--slow-rate", type=float, default=500.0,
                   help="events/s each never-reading client sends")
    p.add_argument("--slow-first", type=int, default=200, help="their first session id")
    p.add_argument("--slow-heartbeats", type=int, default=32,
                   help="HEARTBEATs each never-reading client sends with each event")
    p.add_argument("--max-connections", type=int, default=64)
    p.add_argument("--login-timeout-ms", type=int, default=1000)
    p.add_argument("--idle-timeout-ms", type=int, default=10000)
    p.add_argument("--max-output-kb", type=int, default=16)
    p.add_argument("--session", type=int, default=250, help="the measured session's id")
    p.add_argument("--attacker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    p.add_argument("--nice", type=int, default=10,
                   help="the attacker's niceness (it shares the measuring client's CPU)")
    a = p.parse_args(argv)
    if a.attacker:
        return _attacker_main(a)
    if a.seconds <= 0 or a.rate <= 0 or a.runs < 1 or a.warmup < 0:
        p.error("--seconds, --rate and --runs must be positive, --warmup not negative")

    from exposure.bench.tool import Target, _flow
    from exposure.harness.localnode import LocalNode

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    block = _flow(min(1_000_000, int(a.rate * (a.seconds + a.warmup)) + 1), 7)
    cpus = sorted(os.sched_getaffinity(0))
    client_cpu = cpus[0]  # the hot process spins on the last CPU
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_abuse.") as tmp:
        node = LocalNode(Path(tmp), start=False)
        node.add_keys("ingest", f"max_connections = {a.max_connections}\n"
                                f"login_timeout_ms = {a.login_timeout_ms}\n"
                                f"idle_timeout_ms = {a.idle_timeout_ms}\n"
                                f"max_output_kb = {a.max_output_kb}\n")
        try:
            node.start()
            target = Target("127.0.0.1", node.port, node.group, node.mport, "127.0.0.1")
            target.pids = {k: v for k, v in node.pids().items() if k != "supervisor"}
            pids0 = node.pids()
            for k in range(a.runs):
                r = {}
                for phase, attack in (("A", False), ("B", True)):
                    r[phase] = _phase(node, target, block, a, a.session, client_cpu, attack)
                    x = r[phase]
                    log(f"run {k + 1} {phase}: p50 {x['p50_us']:.1f} us, p99 "
                        f"{x['p99_us']:.1f} us, p99.9 {x['p999_us']:.1f} us, max "
                        f"{x['max_us']:.0f} us, lost {x['lost']}, steal "
                        f"{x['phase_steal_ms']:.0f} ms"
                        + (f"; attack {x['attack'].get('connections_per_s', 0):.0f} conn/s, "
                           f"{x['attack'].get('frames_per_s', 0):.0f} frames/s"
                           if attack else ""))
                runs.append(r)
            restarted = node.pids() != pids0
            log_text = node.log.read_text(errors="replace")
        finally:
            node.stop()
    keys = ("p50_us", "p99_us", "p999_us", "max_us")
    summary = {ph: {k: _median([r[ph] for r in runs], k) for k in keys + ("lost",)}
               for ph in ("A", "B")}
    for ph in ("A", "B"):
        summary[ph]["late_sends"] = _median([r[ph] for r in runs], "late_sends")
        summary[ph]["stages_p99_us"] = {
            leg: round(statistics.median(r[ph]["stages"][leg]["p99_us"] for r in runs), 1)
            for leg in runs[0][ph]["stages"]}
        summary[ph]["phase_steal_ms"] = [r[ph]["phase_steal_ms"] for r in runs]
        summary[ph]["loadavg_1m"] = [r[ph]["loadavg_1m_before"] for r in runs]
    atk = [r["B"]["attack"] for r in runs]
    summary["attack"] = {
        "connections_per_s": _median(atk, "connections_per_s"),
        "frames_per_s": _median(atk, "frames_per_s"),
        "bytes_per_s": _median(atk, "bytes_per_s"),
        "cpu_percent": _median(atk, "cpu_percent"),
        "slow_readers_dropped": _median(atk, "slow_dropped"),
    }
    summary["node_counters_B"] = {k: int(statistics.median(r["B"]["node_counters"][k]
                                                           for r in runs))
                                  for k in runs[0]["B"]["node_counters"]}
    out = {"command": "python -m perf.bench_abuse " + " ".join(argv or sys.argv[1:]),
           "rate": a.rate, "seconds": a.seconds, "warmup": a.warmup, "runs_n": a.runs,
           "limits": {"max_connections": a.max_connections,
                      "login_timeout_ms": a.login_timeout_ms,
                      "idle_timeout_ms": a.idle_timeout_ms, "max_output_kb": a.max_output_kb},
           "attack_config": {"conn_rate": a.conn_rate, "hold": a.hold, "slow": a.slow,
                             "slow_rate": a.slow_rate, "slow_heartbeats": a.slow_heartbeats,
                             "lifetime_s": a.lifetime, "nice": a.nice},
           "median": summary, "node_restarted": restarted,
           "node_log_restarts": log_text.count("restarting"), "runs": runs}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
