"""What the backup costs and how fast the pair recovers: ``python -m perf.bench_pair``.

* **latency**: wire-to-wire (client send to multicast receipt, coordinated-omission
  corrected, as ``exposure perf latency``) and ACK latency, open loop at ``--rate``, for a
  node without a backup (``standalone``, the same process map) and for a pair under each
  release policy; the policies are interleaved run by run, and the median of ``--runs``
  is reported;
* **failover**: a client streams at ``--failover-rate``; the primary's whole node is killed
  with SIGKILL; the time from the kill to the first event the new primary accepted (that
  event's receive stamp, from the new primary's journal), ``--failovers`` times;
* **catch-up**: ``--catchup`` events reach the primary while its backup is down; the backup
  is started; records per second from the link coming up to the backup holding the
  primary's tail (received), and to compute having applied it.

Every node is real (``exposure run``), on loopback, with the process map of
``perf.localnode.LocalPair`` (on 2 cores only the primary's hot process spins).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exposure.journal import read_blocks
from exposure.shm.control import CTL_IN_SYNC, CTL_LINK, CTL_PRIMARY_GSEQ, CTL_ROLE, ROLE_PRIMARY
from perf.flowgen import generate, to_jsonl
from perf.localnode import LocalNode, LocalPair, process_map
from perf.tool import Target, _flow, measure_run

POLICIES = ("standalone", "local", "replicated", "replicated+local")
_STANDALONE_MAP = process_map()  # the same map as the pair primary's


def _wait(pred, timeout: float, what: str) -> None:
    end = time.time() + timeout
    while not pred():
        if time.time() > end:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _target(node: LocalNode) -> Target:
    t = Target("127.0.0.1", node.port, node.group, node.mport, "127.0.0.1")
    t.pids = {k: v for k, v in node.pids().items() if k != "supervisor"}
    return t


def latency(tmp: Path, policies, rate: float, duration: float, warmup: float,
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
                pair = LocalPair(d, release=pol)
                node, stop = pair.a, pair.stop
                _wait(lambda p=pair: (c := p.b.control()) is not None and c[CTL_IN_SYNC],
                      60, "the backup in sync")
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


def failover(tmp: Path, times: int, rate: float, log) -> dict:
    """Kill -9 of the primary mid-stream; from the kill to the first event accepted by
    the new primary (its receive stamp in the new primary's journal)."""
    events = tmp / "failover.jsonl"
    events.write_bytes(to_jsonl(generate(int(rate * 30), accounts=100, instruments=1000,
                                         universe=40, live_target=5000, seed=3)))
    out = []
    for k in range(times):
        d = Path(tempfile.mkdtemp(dir=tmp))
        pair = LocalPair(d)
        client = None
        try:
            _wait(lambda p=pair: (c := p.b.control()) is not None and c[CTL_IN_SYNC], 60,
                  "the backup in sync")
            client = subprocess.Popen(
                [sys.executable, "-m", "exposure", "send", str(events), "--config",
                 str(pair.a.config), "--rate", str(rate), "--retry", "60"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait(lambda p=pair: p.a.last_gseq() > rate, 30, "the stream")
            time.sleep(0.5)
            pids = pair.a.pids()
            t_kill = time.time_ns()
            for pid in pids.values():
                os.kill(pid, signal.SIGKILL)
            _wait(lambda p=pair: (c := p.b.control()) is not None
                  and c[CTL_ROLE] == ROLE_PRIMARY, 10, "the promotion")
            t_role = time.time_ns()
            m = None
            end = time.time() + 20
            while m is None and time.time() < end:
                m = re.search(r"accepting sessions on \S+ from gseq (\d+)",
                              pair.b.log.read_text())
                time.sleep(0.01)
            first = int(m.group(1))
            _wait(lambda p=pair, f=first: p.b.last_gseq() >= f, 20,
                  "the first event on the new primary")
            time.sleep(0.3)  # the journal
            recv = None
            for blk in read_blocks(pair.b.data_dir, from_gseq=first):
                recs = blk.records[blk.records["gseq"] >= first]
                if len(recs):
                    recv = int(recs["recv_ns"][0])
                    break
            r = {"promoted_ms": (t_role - t_kill) / 1e6,
                 "first_event_ms": (recv - t_kill) / 1e6 if recv else None}
            out.append(r)
            log(f"failover {k + 1}: promoted after at most {r['promoted_ms']:.0f} ms; first "
                f"event accepted by the new primary {r['first_event_ms']:.0f} ms after the "
                "kill")
        finally:
            if client is not None:
                client.kill()
                client.wait()
            pair.a.proc.wait()
            pair.stop()
    good = [r["first_event_ms"] for r in out if r["first_event_ms"] is not None]
    return {"runs": out, "first_event_ms_median": statistics.median(good) if good else None,
            "first_event_ms_max": max(good) if good else None}


def catchup(tmp: Path, n: int, log) -> dict:
    d = Path(tempfile.mkdtemp(dir=tmp))
    pair = LocalPair(d, release="local", start=False)
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
        _wait(lambda: (c := pair.b.control()) is not None and c[CTL_LINK], 60, "the link")
        t_link = time.perf_counter()
        c = pair.b.control()
        target = int(c[CTL_PRIMARY_GSEQ])
        _wait(lambda: pair.b.control()[CTL_IN_SYNC], 600, "in sync")
        t_sync = time.perf_counter()
        _wait(lambda: pair.b.last_gseq() >= target, 600, "applied")
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
    p.add_argument("--skip", default="", help="comma list: latency,failover,catchup")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    res: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_pair.") as tmp:
        tmp = Path(tmp)
        if "latency" not in skip:
            res["latency"] = latency(tmp, a.policies.split(","), a.rate, a.duration,
                                     a.warmup, a.runs, log)
        if "failover" not in skip and a.failovers:
            res["failover"] = failover(tmp, a.failovers, a.failover_rate, log)
        if "catchup" not in skip and a.catchup:
            res["catchup"] = catchup(tmp, a.catchup, log)
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
        f = res["failover"]
        print(f"failover (kill -9 of the primary to the first event accepted by the new "
              f"one): median {f['first_event_ms_median']:.0f} ms, max "
              f"{f['first_event_ms_max']:.0f} ms over {len(f['runs'])}")
    if "catchup" in res:
        c = res["catchup"]
        print(f"catch-up of {c['events']:,} events: received at "
              f"{c['received_per_s'] / 1e6:.2f} M/s, applied at "
              f"{c['applied_per_s'] / 1e6:.2f} M/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

