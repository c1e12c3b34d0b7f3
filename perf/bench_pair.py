"""What the backup costs and how fast the pair recovers: ``python -m perf.bench_pair``.

* **latency**: wire-to-wire (client send to multicast receipt, coordinated-omission
  corrected, as ``exposure perf latency``) and ACK latency, open loop at ``--rate``, for a
  node without a backup (``standalone``, the same process map) and for a pair under each
  release policy; the policies are interleaved run by run, and the median of ``--runs``
  is reported;
* **failover**, per release policy: a client (:class:`perf.ackclock.AckClock`) streams at
  ``--failover-rate``; the primary's whole node is killed with SIGKILL; the time from the
  kill to the promotion, and to the first ACK of a record sent after the kill (only the
  new primary can acknowledge it), ``--failovers`` times;
* **alone**: the same with the backup killed: the time until the primary acknowledges a
  record sent after the kill (only a primary running alone can);
* **catch-up**: ``--catchup`` events reach the primary while its backup is down; the backup
  is started; records per second from the link coming up to the backup holding the
  primary's tail (received), and to compute having applied it.

Every node is real (``exposure run``), on loopback, with the process map of
``exposure.harness.localnode.LocalPair`` (on 2 cores only the primary's hot process spins).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from exposure.bench.flowgen import generate, to_jsonl
from exposure.bench.tool import Target, _flow, measure_run
from exposure.harness.localnode import LocalEtcd, LocalNode, LocalPair, process_map
from exposure.harness.wait import wait_for
from exposure.shm.control import (
    CTL_ALONE,
    CTL_IN_SYNC,
    CTL_LINK,
    CTL_PRIMARY_GSEQ,
    CTL_ROLE,
    ROLE_PRIMARY,
)
from perf.ackclock import AckClock

POLICIES = ("standalone", "local", "replicated", "replicated+local")
_STANDALONE_MAP = process_map()  # the same map as the pair primary's


def _target(node: LocalNode) -> Target:
    t = Target("127.0.0.1", node.port, node.group, node.mport, "127.0.0.1")
    t.pids = {k: v for k, v in node.pids().items() if k != "supervisor"}
    return t


def latency(tmp: Path, etcd, policies, rate: float, duration: float, warmup: float,
            runs: int, log) -> dict:
    block = _flow(200_000, 7)
    results: dict[str, list[dict]] = {p: [] for p in policies}
    for run in range(runs):
        for pol in policies:
            d = Path(tempfile.mkdtemp(dir=tmp))
            if pol == "standalone":
                node, stop = LocalNode(d, extra=_STANDALONE_MAP), None
                stop = node.stop
            else:
                pair = LocalPair(d, etcd, release=pol)
                node, stop = pair.a, pair.stop
                wait_for(lambda p=pair: _synchronous(p), 60, "the backup synchronous")
            try:  # the client on the core the primary's hot process does not spin on
                r = measure_run(_target(node), block, rate, duration, warmup, 250,
                                client_cpu=sorted(os.sched_getaffinity(0))[0])
            finally:
                stop()
            results[pol].append(r)
            log(f"run {run + 1} {pol:17s} p50 {r['p50_us']:7.1f} us  p99 {r['p99_us']:8.1f} us"
                f"  ack p50 {r['ack']['p50_us']:8.1f} us  p99 {r['ack']['p99_us']:9.1f} us  "
                f"lost {r['lost']}  steal {r['steal_ms']:.0f} ms")
    out = {}
    for pol, rs in results.items():
        out[pol] = {k: statistics.median(r[k] for r in rs) for k in ("p50_us", "p99_us")}
        out[pol].update({f"ack_{k}": statistics.median(r["ack"][k] for r in rs)
                         for k in ("p50_us", "p99_us")})
        out[pol]["steal_ms"] = [r["steal_ms"] for r in rs]
        out[pol]["runs"] = [{"p50_us": r["p50_us"], "p99_us": r["p99_us"],
                             "ack_p50_us": r["ack"]["p50_us"]} for r in rs]
    return out


def _synchronous(pair: LocalPair) -> bool:
    """The backup in sync and recorded by etcd as the synchronous member."""
    c = pair.b.control()
    if c is None or not c[CTL_IN_SYNC]:
        return False
    rec = pair.record()
    return rec is not None and rec.sync == pair.b.name


def _flow_recs(n: int, seed: int):
    from exposure.engine.parse import read_events

    path = Path(tempfile.mkstemp(suffix=".jsonl")[1])
    try:
        path.write_bytes(to_jsonl(generate(n, accounts=100, instruments=1000, universe=40,
                                           live_target=5000, seed=seed)))
        return read_events(path)
    finally:
        path.unlink()


def _kill(node: LocalNode) -> int:
    pids = node.pids()
    t = time.time_ns()
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)
    return t


def _kill_under_stream(pair: LocalPair, victim: LocalNode, endpoints, recs, rate: float,
                       until, what: str) -> tuple[float, float]:
    """An AckClock streams to ``endpoints``; once acknowledged for a second, ``victim`` is
    killed (-9, whole node). Returns the ms from the kill to ``until()`` being true, and to
    the first ACK of a record sent after the kill."""
    clock = AckClock(endpoints, recs, rate)
    killed = False
    try:
        wait_for(lambda: _synchronous(pair), 60, "the backup synchronous")
        clock.start()
        wait_for(lambda: clock.acked() > rate, 30, "the stream acknowledged")
        time.sleep(0.3)
        t_kill = _kill(victim)
        killed = True
        wait_for(until, 10, what)
        t_until = time.time_ns()
        wait_for(lambda: clock.first_ack_of_records_sent_after(t_kill), 30,
                 "an ACK of a record sent after the kill")
        t_ack = clock.first_ack_of_records_sent_after(t_kill)
        return (t_until - t_kill) / 1e6, (t_ack - t_kill) / 1e6
    finally:
        clock.stop.set()
        if clock.is_alive():
            clock.join(5)
        if killed:
            victim.proc.wait()  # (reaped: pair.stop() then leaves it alone)


def failover(tmp: Path, etcd, policies, times: int, rate: float, log) -> dict:
    """Per release policy: kill -9 of the primary mid-stream; from the kill to the
    promotion, and to the first ACK of a record sent after the kill (only the new primary
    can acknowledge it)."""
    recs = _flow_recs(int(rate * 30), 3)
    out: dict[str, dict] = {}
    for pol in policies:
        runs = []
        for k in range(times):
            pair = LocalPair(Path(tempfile.mkdtemp(dir=tmp)), etcd, release=pol)
            try:
                promoted, ack = _kill_under_stream(
                    pair, pair.a, [("127.0.0.1", pair.a.port), ("127.0.0.1", pair.b.port)],
                    recs, rate, lambda p=pair: (c := p.b.control()) is not None
                    and c[CTL_ROLE] == ROLE_PRIMARY, "the promotion")
            finally:
                pair.stop()
            runs.append({"promoted_ms": promoted, "first_ack_ms": ack})
            log(f"failover {pol:17s} {k + 1}: promoted after at most {promoted:.0f} ms; "
                f"first ACK of a record sent after the kill {ack:.0f} ms after it")
        out[pol] = _summary(runs)
    return out


def alone(tmp: Path, etcd, times: int, rate: float, log) -> dict:
    """kill -9 of the backup mid-stream (default policy); from the kill to the first ACK of
    a record sent after it (only a primary running alone can acknowledge it)."""
    recs = _flow_recs(int(rate * 30), 4)
    runs = []
    for k in range(times):
        pair = LocalPair(Path(tempfile.mkdtemp(dir=tmp)), etcd)
        try:
            alone_ms, ack = _kill_under_stream(
                pair, pair.b, [("127.0.0.1", pair.a.port)], recs, rate,
                lambda p=pair: p.a.control()[CTL_ALONE] == 1, "running alone")
        finally:
            pair.stop()
        runs.append({"alone_ms": alone_ms, "first_ack_ms": ack})
        log(f"backup killed {k + 1}: running alone after at most {alone_ms:.0f} ms; first "
            f"ACK of a record sent after the kill {ack:.0f} ms after it")
    return _summary(runs)


def _summary(runs: list[dict]) -> dict:
    acks = [r["first_ack_ms"] for r in runs]
    return {"runs": runs, "first_ack_ms_median": statistics.median(acks),
            "first_ack_ms_max": max(acks)}


def catchup(tmp: Path, etcd, n: int, log) -> dict:
    d = Path(tempfile.mkdtemp(dir=tmp))
    pair = LocalPair(d, etcd, release="local", start=False)
    events = d / "catchup.jsonl"
    events.write_bytes(to_jsonl(generate(n, accounts=200, instruments=2000, universe=50,
                                         live_target=5000, seed=5)))
    try:
        pair.a.start()
        t0 = time.time()
        p = pair.a.cli("send", str(events), timeout=600)
        assert p.returncode == 0, p.stderr.decode()
        log(f"catch-up: {n:,} events sent to the primary alone in {time.time() - t0:.1f} s")
        pair.b.start()
        wait_for(lambda: (c := pair.b.control()) is not None and c[CTL_LINK], 60, "the link")
        t_link = time.perf_counter()
        c = pair.b.control()
        target = int(c[CTL_PRIMARY_GSEQ])
        wait_for(lambda: pair.b.control()[CTL_IN_SYNC], 600, "in sync")
        t_sync = time.perf_counter()
        wait_for(lambda: pair.b.last_gseq() >= target, 600, "applied")
        t_applied = time.perf_counter()
    finally:
        pair.stop()
    r = {"events": target, "received_s": t_sync - t_link, "applied_s": t_applied - t_link,
         "received_per_s": target / max(t_sync - t_link, 1e-9),
         "applied_per_s": target / max(t_applied - t_link, 1e-9)}
    log(f"catch-up: {target:,} events received in {r['received_s']:.2f} s "
        f"({r['received_per_s'] / 1e6:.2f} M/s), applied in {r['applied_s']:.2f} s "
        f"({r['applied_per_s'] / 1e6:.2f} M/s)")
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_pair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=20_000, help="latency: events/s")
    p.add_argument("--duration", type=float, default=10.0, help="latency: measured s/run")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=3, help="latency: runs per policy")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--failovers", type=int, default=5)
    p.add_argument("--failover-rate", type=float, default=5_000)
    p.add_argument("--catchup", type=int, default=1_000_000, help="events (0: skip)")
    p.add_argument("--skip", default="",
                   help="comma list: latency,failover,alone,catchup")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_pair.") as tmp:
        tmp = Path(tmp)
        etcd = LocalEtcd(tmp)
        try:
            if "latency" not in skip:
                res["latency"] = latency(tmp, etcd, a.policies.split(","), a.rate,
                                         a.duration, a.warmup, a.runs, log)
            if "failover" not in skip and a.failovers:
                res["failover"] = failover(tmp, etcd, [p for p in a.policies.split(",")
                                                      if p != "standalone"],
                                           a.failovers, a.failover_rate, log)
            if "alone" not in skip and a.failovers:
                res["alone"] = alone(tmp, etcd, a.failovers, a.failover_rate, log)
            if "catchup" not in skip and a.catchup:
                res["catchup"] = catchup(tmp, etcd, a.catchup, log)
        finally:
            etcd.stop()
    if a.json:
        print(json.dumps(res, indent=1))
        return 0
    if "latency" in res:
        print(f"wire-to-wire at {a.rate:,.0f}/s, median of {a.runs} runs "
              "(p50 / p99; ACK p50 / p99), microseconds")
        base = res["latency"].get("standalone", {}).get("p50_us")
        for pol, r in res["latency"].items():
            extra = f"  (+{r['p50_us'] - base:.1f} us p50)" if base and pol != "standalone" \
                else ""
            print(f"  {pol:17s} {r['p50_us']:8.1f} / {r['p99_us']:9.1f}   ack "
                  f"{r['ack_p50_us']:9.1f} / {r['ack_p99_us']:10.1f}{extra}")
    if "failover" in res:
        print("failover: kill -9 of the primary to the first ACK of a record sent after "
              "the kill (ms)")
        for pol, f in res["failover"].items():
            print(f"  {pol:17s} median {f['first_ack_ms_median']:.0f}, max "
                  f"{f['first_ack_ms_max']:.0f} over {len(f['runs'])} (promoted after "
                  f"{statistics.median(r['promoted_ms'] for r in f['runs']):.0f})")
    if "alone" in res:
        f = res["alone"]
        print(f"backup killed: the primary acknowledges alone after median "
              f"{f['first_ack_ms_median']:.0f} ms, max {f['first_ack_ms_max']:.0f} ms over "
              f"{len(f['runs'])}")
    if "catchup" in res:
        c = res["catchup"]
        print(f"catch-up of {c['events']:,} events: received at "
              f"{c['received_per_s'] / 1e6:.2f} M/s, applied at "
              f"{c['applied_per_s'] / 1e6:.2f} M/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

