"""How fast the FIX gateway is: ``python -m perf.bench_fix``.

* **throughput**: ExecutionReports per second through one gateway (``exposure fix``) into
  a real node. A fast Python FIX initiator (:class:`exposure.harness.fixgateway.FixClient`,
  messages pre-encoded before the clock starts) sends ``--messages`` reports (orders of
  100 shares: a New, then a Trade that fills it, so the node's live orders stay few) as fast
  as the socket takes them; the clock stops when the node holds every event of the
  gateway's session (its session table). Each run is a fresh gateway (its own journal, a
  new exposure session and source) on the same node.
* **latency**: closed loop, one report at a time: the time from writing a New to the
  gateway's socket until a feed subscriber (multicast) sees the account row it moves; the
  same measured for the same event sent straight to the node by a Producer (no FIX, no
  gateway), so the difference is what the gateway adds; then ``exposure perf latency``
  against the same node, in the same run, for the tool's open-loop figure.

Each part reports the median of ``--runs`` and each run's figures, with the hypervisor's
steal (exposure.harness.machine) over the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exposure.harness.fixgateway import FixClient, FixSide, LocalGateway
from exposure.harness.localnode import LocalNode
from exposure.harness.machine import steal_since, steal_ticks
from exposure.harness.wait import wait_for

ACCOUNTS = 50
SYMBOLS = 200


def _csvs() -> tuple[str, str]:
    ins = "symbol,instrument\n" + "".join(f"S{i},{i}\n" for i in range(1, SYMBOLS + 1))
    acc = "name,account\n" + "".join(f"A{i},{i}\n" for i in range(1, ACCOUNTS + 1))
    return ins, acc


def _reports(n: int, tag: str) -> list[list]:
    out = []
    for k in range(n // 2):
        a, s = 1 + k % ACCOUNTS, 1 + (k * 7) % SYMBOLS
        common = [(37, f"{tag}O{k}"), (11, f"{tag}C{k}"), (54, "1" if k % 3 else "2"),
                  (55, f"S{s}"), (1, f"A{a}")]
        out.append(common + [(17, f"{tag}N{k}"), (150, "0"), (39, "0"), (38, 100),
                             (44, "10.25")])
        out.append(common + [(17, f"{tag}F{k}"), (150, "F"), (39, "2"), (38, 100),
                             (44, "10.25"), (32, 100), (31, "10.5")])
    return out


def _held(node: LocalNode, session: int) -> int:
    return node.session_counters(session).get("held", 0)


def throughput(node: LocalNode, tmp: Path, n: int, run: int) -> dict:
    ins, acc = _csvs()
    session = 10 + run
    gw = LocalGateway(tmp, node.config, session=session, instruments=ins, accounts=acc,
                      limits="window = 1048576\n", sides=[FixSide("BROKER1", 1 + run)])
    try:
        c = FixClient(gw.port)
        msgs = c.prepare(_reports(n, f"r{run}"))
        s0 = steal_ticks()
        t0 = time.perf_counter()
        c.send_raw(msgs, chunk=512)
        t_sent = time.perf_counter()
        wait_for(lambda: _held(node, session) >= n, 600, f"{n:,} events at the node",
                 node, step=0.002)
        t1 = time.perf_counter()
        st = gw.status()
        c.logout()
        c.close()
    finally:
        gw.stop()
    return {"messages": n, "seconds": round(t1 - t0, 3),
            "rate": round(n / (t1 - t0)), "send_seconds": round(t_sent - t0, 3),
            "events": st["events"], "journal_bytes": st["journal"]["bytes"],
            **steal_since(s0)}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def latency(node: LocalNode, tmp: Path, probes: int, run: int, limits: str = "") -> dict:
    from exposure.client import Producer
    from exposure.feed.subscriber import Subscriber

    ins, acc = _csvs()
    session = 40 + run
    gw = LocalGateway(tmp, node.config, session=session, instruments=ins, accounts=acc,
                      sides=[FixSide("BROKER1", 20 + run)], limits=limits)
    fix_us: list[float] = []
    direct_us: list[float] = []
    s0 = steal_ticks()
    try:
        with Subscriber.from_config(node.config) as sub:
            wait_for(lambda: sub.poll(0.05) is not None and sub.state == "live", 30,
                     "the feed to be live")
            account = 1 + run

            def seen(g: int) -> int:
                r = sub.account(account)
                return 0 if r is None else int(r["gseq"])

            def probe(send) -> float:
                g = seen(0)
                t0 = time.perf_counter()
                send()
                while seen(0) == g:
                    sub.poll(0.0005)
                    if time.perf_counter() - t0 > 10:
                        raise RuntimeError("no feed update within 10 s")
                return (time.perf_counter() - t0) * 1e6

            c = FixClient(gw.port)
            with Producer(node.config, session=session + 20) as p:
                for k in range(probes):
                    fields = [(37, f"L{run}O{k}"), (11, f"L{run}C{k}"), (54, "1"),
                              (55, "S1"), (1, f"A{account}"), (17, f"L{run}N{k}"),
                              (150, "0"), (39, "0"), (38, 100), (44, "10.25")]
                    msg = c.prepare([fields])
                    fix_us.append(probe(lambda m=msg: c.send_raw(m)))
                    ev = {"type": "new", "source": 60 + run, "order_id": k + 1,
                          "account": account, "instrument": 1, "side": "buy", "qty": 100,
                          "price": 10.25}
                    direct_us.append(probe(lambda e=ev: p.send(e)))
                    time.sleep(0.002)
            c.logout()
            c.close()
    finally:
        gw.stop()
    out = {"probes": probes, **steal_since(s0)}
    for name, xs in (("fix", fix_us), ("direct", direct_us)):
        out[name] = {"p50_us": round(_pct(xs, 0.5), 1), "p99_us": round(_pct(xs, 0.99), 1),
                     "max_us": round(max(xs), 1)}
    out["added_p50_us"] = round(out["fix"]["p50_us"] - out["direct"]["p50_us"], 1)
    out["added_p99_us"] = round(out["fix"]["p99_us"] - out["direct"]["p99_us"], 1)
    return out


def journal_sync(tmp: Path, rounds: int = 6, commits: int = 300) -> dict:
    """The gateway journal's group commit alone (one ~230-byte record appended, then
    ``sync``: its write and fdatasync), with plain appends and with zeros written ahead,
    alternated A B B A ... ``rounds`` times in one run; p50/p99 per side (us)."""
    from exposure.fix.journal import K_MESSAGE, Journal

    raw = b"8=FIX.4.4\x019=200\x0135=8\x01" + b"x" * 200
    out: dict[str, list[float]] = {"append": [], "prewrite": []}
    for r in range(rounds):
        sides = [("append", 0), ("prewrite", 4 << 20)]
        for label, pre in (sides if r % 2 == 0 else sides[::-1]):
            with tempfile.TemporaryDirectory(prefix="fixj-", dir=tmp) as d:
                j = Journal.open(Path(d), prewrite=pre)
                for k in range(commits):
                    j.append(K_MESSAGE, "FIX.4.4:EXPOSURE->BROKER1", k + 1, raw)
                    t0 = time.perf_counter()
                    j.sync()
                    out[label].append((time.perf_counter() - t0) * 1e6)
                j.close()
    return {label: {"commits": len(xs), "p50_us": round(_pct(xs, 0.5), 1),
                    "p99_us": round(_pct(xs, 0.99), 1)} for label, xs in out.items()}


def perf_latency(node: LocalNode, seconds: float) -> dict:
    p = subprocess.run([sys.executable, "-m", "exposure", "perf", "latency", "--config",
                        str(node.config), "--rate", "20000", "--duration", str(seconds),
                        "--warmup", "1", "--json"], capture_output=True, text=True,
                       timeout=600)
    try:
        out = json.loads(p.stdout)
    except json.JSONDecodeError:
        return {"error": (p.stderr or p.stdout)[-500:]}
    r = out.get("node", next(iter(out.values()), {})) if isinstance(out, dict) else {}
    return {k: r.get(k) for k in ("p50_us", "p99_us", "max_us", "rate")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--probes", type=int, default=300)
    ap.add_argument("--perf-seconds", type=float, default=5.0)
    ap.add_argument("--skip", default="", help="comma list of parts to skip "
                    "(throughput, latency, perf, sync)")
    ap.add_argument("--prewrite-ab", action="store_true",
                    help="latency twice a run: the gateway's journal with plain appends "
                    "([limits] prewrite_bytes = 0) and with zeros written ahead (the "
                    "default), alternated A B B A ...; and first the journal's group "
                    "commit alone, the same two ways")
    a = ap.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))
    if a.prewrite_ab and "sync" not in skip:
        with tempfile.TemporaryDirectory(prefix="bench-fix-sync-") as d:
            sync = journal_sync(Path(d))
        print(f"the journal's group commit alone: {sync}", flush=True)
    res: dict = {"throughput": [], "latency": [], "perf_latency": None}
    if a.prewrite_ab and "sync" not in skip:
        res["journal_sync"] = sync
    with tempfile.TemporaryDirectory(prefix="bench-fix-") as d:
        tmp = Path(d)
        node = LocalNode(tmp, orders=1 << 20)
        try:
            for r in range(a.runs):
                if "throughput" not in skip:
                    t = throughput(node, tmp, a.messages, r)
                    res["throughput"].append(t)
                    print(f"throughput run {r + 1}: {t['rate']:,} reports/s ({t['messages']:,}"
                          f" in {t['seconds']} s; sent in {t['send_seconds']} s; steal "
                          f"{t['steal_percent']}%)", flush=True)
                sides = [("", "")]
                if a.prewrite_ab:
                    sides = [("append", "prewrite_bytes = 0"), ("prewrite", "")]
                    sides = sides if r % 2 == 0 else sides[::-1]
                for k, (label, limits) in enumerate(sides if "latency" not in skip else []):
                    lat = latency(node, tmp, a.probes, r * len(sides) + k, limits)
                    if label:
                        lat["journal"] = label
                        res.setdefault("latency_" + label, []).append(lat)
                    else:
                        res["latency"].append(lat)
                    name = f"{r + 1} {label}" if label else f"{r + 1}"
                    print(f"latency run {name}: FIX p50 {lat['fix']['p50_us']} us p99 "
                          f"{lat['fix']['p99_us']} us; direct p50 {lat['direct']['p50_us']} us"
                          f" p99 {lat['direct']['p99_us']} us; the gateway adds p50 "
                          f"{lat['added_p50_us']} us, p99 {lat['added_p99_us']} us (steal "
                          f"{lat['steal_percent']}%)", flush=True)
            if "perf" not in skip:
                res["perf_latency"] = perf_latency(node, a.perf_seconds)
                print(f"exposure perf latency --rate 20000: {res['perf_latency']}", flush=True)
        finally:
            node.stop()
    if res["throughput"]:
        res["throughput_median"] = statistics.median(t["rate"] for t in res["throughput"])
        print(f"median: {res['throughput_median']:,.0f} reports/s")
    for label in ("append", "prewrite"):
        xs = res.get("latency_" + label)
        if xs:
            for k in ("added_p50_us", "added_p99_us"):
                res[f"{label}_{k}_median"] = statistics.median(x[k] for x in xs)
            print(f"{label}: the gateway adds p50 {res[f'{label}_added_p50_us_median']} us,"
                  f" p99 {res[f'{label}_added_p99_us_median']} us (medians of {len(xs)})")
    if res["latency"]:
        for k in ("added_p50_us", "added_p99_us"):
            res[k + "_median"] = statistics.median(x[k] for x in res["latency"])
        for side in ("fix", "direct"):
            for k in ("p50_us", "p99_us"):
                res[f"{side}_{k}_median"] = statistics.median(x[side][k]
                                                              for x in res["latency"])
        print("medians: " + ", ".join(f"{k} {v}" for k, v in res.items()
                                      if k.endswith("_median") and "throughput" not in k
                                      and not k.startswith(("append", "prewrite"))))
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
