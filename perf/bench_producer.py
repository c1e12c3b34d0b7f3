"""What the streaming producer (exposure.client.Producer) costs and how fast it goes:
``python -m perf.bench_producer``.

* **cpu**: the producer's CPU per event: the process CPU time of this process (the caller's
  thread, which calls ``send``, plus the producer's I/O thread; nothing else runs here)
  divided by the events sent, from the first send to the last acknowledgement, at
  ``--rate`` (100,000 events/s) and at full speed (as fast as ``send`` returns), for each
  way of sending: one record per call (``record``: an EVENT_DTYPE ``np.void``), one SPEC
  event dict per call (``dict``), arrays of 100 records (``array``) and lists of 100 dicts
  (``dicts``), over each ``--transport``: ``ipc`` (the node's shared-memory ring, what a
  producer on the node's host uses by default) and ``tcp``. The caller's share
  (``time.thread_time``) is reported apart. The events, records and dicts are made before
  the clock starts; the pacing loop's own CPU (measured apart, with a send that does
  nothing) is reported and subtracted ("the producer").
* **throughput**: one producer's sustained rate against a node (arrays of ``--frame``
  records sent as fast as the window lets, until every one is acknowledged), as a ratio to
  ``exposure perf throughput`` against the same node in the same run (interleaved run by
  run).
* **failover**: a producer streams at ``--failover-rate`` to a pair with the example
  pair's settings (:class:`exposure.harness.localnode.LocalPair`: failover_ms 300,
  heartbeat_ms 50, release replicated+local); every process of the primary is stopped
  (SIGSTOP); the time from the stop to the first acknowledgement of an event sent after
  it (only the promoted backup can acknowledge it), with the producer's default liveness
  (failover_ms x 2, at least 0.5 s) and with ``--short-liveness``. The old primary is then
  continued and awaited as the new backup, and the next stop hits the other node.

Each part reports the median of ``--runs`` and each run's figures, with the hypervisor's
steal (exposure.harness.machine) and the load average over the run. The node is real
(``exposure run``) with the default process map (its hot process spins on the last CPU);
this process is pinned to the first CPU, as ``exposure perf`` pins its client.
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
import threading
import time
from pathlib import Path

import numpy as np

from exposure.bench.flowgen import generate
from exposure.client import Producer
from exposure.config.node import load_config
from exposure.core.types import T_CANCEL, T_DONE, T_FILL, T_NEW, T_REPLACE
from exposure.engine.parse import record_objects
from exposure.harness.localnode import LocalEtcd, LocalNode, LocalPair
from exposure.harness.machine import steal_since, steal_ticks
from exposure.harness.wait import wait_for
from exposure.shm.control import (
    CTL_EPOCH,
    CTL_IN_SYNC,
    CTL_PEER_EPOCH,
    CTL_ROLE,
    ROLE_BACKUP,
    ROLE_PRIMARY,
)

_ORDER_TYPES = (T_NEW, T_FILL, T_REPLACE, T_CANCEL, T_DONE)
_BLOCK = 1_000_000


def _flow(n: int, seed: int) -> np.ndarray:
    return generate(n, accounts=200, instruments=2000, universe=50, live_target=5000,
                    seed=seed)


def _cycle(block: np.ndarray, n: int) -> np.ndarray:
    """``n`` events of the cyclic flow ``block``, each cycle's order ids moved on (as
    ``exposure perf`` does: every cycle is a fresh day of orders)."""
    reps = -(-n // len(block))
    out = np.concatenate([block] * reps)[:n]
    cyc = (np.arange(n) // len(block)).astype(np.uint64)
    orders = np.isin(out["type"], _ORDER_TYPES)
    out["order_id"][orders] += cyc[orders] << np.uint64(36)
    return out


_CLIENT_CPUS: set[int] | None = None  # where the producer runs (main() sets it)


class _pinned:
    """The calling thread (and the threads it starts meanwhile: a producer's I/O thread)
    on the client's CPU, off the one the node's hot process spins on; nodes are started
    outside, so that they place their own processes."""

    def __enter__(self) -> None:
        self.mask = os.sched_getaffinity(0)
        if _CLIENT_CPUS:
            os.sched_setaffinity(0, _CLIENT_CPUS)

    def __exit__(self, *exc) -> None:
        os.sched_setaffinity(0, self.mask)


class _Run:
    """What one measurement saw of the machine: steal, load, the wall time."""

    def __enter__(self) -> _Run:
        self.s0 = steal_ticks()
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        self.wall_s = time.monotonic() - self.t0
        self.machine = {**steal_since(self.s0),
                        "load1": round(os.getloadavg()[0], 2)}


# ---------------------------------------------------------------------------------- cpu
def _paced(send, items: list, rate: float | None) -> None:
    """Call ``send(item)`` for each item, at ``rate`` items/s (None: as fast as it
    returns); open loop: what falls due while a call waits goes out at once after it."""
    n = len(items)
    if rate is None:
        for x in items:
            send(x)
        return
    t0 = time.monotonic()
    i = 0
    while i < n:
        due = min(n, int((time.monotonic() - t0) * rate) + 1)
        if due <= i:
            time.sleep(max(0.0, min(0.0005, (i + 1) / rate - (time.monotonic() - t0))))
            continue
        for x in items[i:due]:
            send(x)
        i = due


def _pacer_cpu(items: list, rate: float | None, per: int) -> float:
    """The pacing loop's own CPU (s) for ``items`` at ``rate``, with a send that does
    nothing: the application's share, which :func:`cpu_run` reports apart."""
    with _pinned():
        t0 = time.thread_time()
        _paced(_nothing, items, None if rate is None else rate / per)
        return time.thread_time() - t0


def _nothing(x) -> None:
    return None


def cpu_run(node: LocalNode, session: int, how: str, rate: float | None,
            recs: np.ndarray, linger_us: float = 0.0, ipc: bool = True) -> dict:
    if how == "record":
        items, per = list(recs), 1
    elif how == "dict":
        items, per = record_objects(recs), 1
    elif how == "dicts":
        objs = record_objects(recs)
        items, per = [objs[i:i + 100] for i in range(0, len(objs), 100)], 100
    else:
        items, per = [recs[i:i + 100] for i in range(0, len(recs), 100)], 100
    n = len(recs)
    cfg = load_config(node.config)  # (before pinning: the config resolves CPUs)
    pacer = _pacer_cpu(items, rate, per)
    with _pinned(), Producer(cfg, session=session, linger_us=linger_us, ipc=ipc) as p:
        transport = p.stats["transport"]
        with _Run() as m:
            c0, t0 = time.process_time(), time.thread_time()
            w0 = time.monotonic()
            _paced(p.send, items, None if rate is None else rate / per)
            w_send = time.monotonic() - w0
            p.flush(120)
            c1, t1 = time.process_time(), time.thread_time()
        assert p.acked == n, (p.acked, n)
    return {"how": how, "target_rate": rate, "events": n, "linger_us": linger_us,
            "transport": transport,
            "rate": round(n / w_send), "acked_rate": round(n / m.wall_s),
            "cpu_us_per_event": round((c1 - c0) * 1e6 / n, 3),
            "pacer_us_per_event": round(pacer * 1e6 / n, 3),
            "producer_us_per_event": round((c1 - c0 - pacer) * 1e6 / n, 3),
            "caller_us_per_event": round((t1 - t0) * 1e6 / n, 3),
            "io_thread_us_per_event": round(((c1 - c0) - (t1 - t0)) * 1e6 / n, 3),
            **m.machine}


def cpu(tmp: Path, rate: float, duration: float, runs: int, hows, log,
        lingers=(0.0,), transports=("ipc",)) -> dict:
    node = LocalNode(Path(tempfile.mkdtemp(dir=tmp)))
    out: dict[str, list[dict]] = {}
    try:
        block = _flow(_BLOCK, 7)
        session = 1
        for run in range(runs):
            for how, linger, tr in [(h, g, t) for h in hows for g in lingers
                                    for t in transports]:
                for label, r in (("paced", rate), ("full", None)):
                    n = int(rate * duration)
                    if how == "dict":  # (about 100 us each: a few seconds' worth)
                        n = min(n, 30_000)
                    elif how == "dicts":  # (the dicts' memory)
                        n = min(n, 300_000)
                    recs = _cycle(block, n)
                    res = cpu_run(node, session, how, r, recs, linger, tr == "ipc")
                    session += 1
                    key = (f"{how}@{label}" + (f"+linger{linger:g}us" if linger else "")
                           + f"/{res['transport']}")
                    out.setdefault(key, []).append(res)
                    log(f"run {run + 1} {key:26s} sent at {res['rate']:>9,}/s: "
                        f"{res['cpu_us_per_event']:6.2f} us/event (caller "
                        f"{res['caller_us_per_event']:.2f}, I/O thread "
                        f"{res['io_thread_us_per_event']:.2f}, the pacing loop "
                        f"{res['pacer_us_per_event']:.2f}: the producer "
                        f"{res['producer_us_per_event']:.2f}); steal "
                        f"{res['steal_percent']}%, load {res['load1']}")
    finally:
        node.stop()
    return {k: {"cpu_us_per_event": statistics.median(r["cpu_us_per_event"] for r in v),
                "producer_us_per_event": statistics.median(r["producer_us_per_event"]
                                                           for r in v),
                "caller_us_per_event": statistics.median(r["caller_us_per_event"]
                                                         for r in v),
                "rate": statistics.median(r["rate"] for r in v), "runs": v}
            for k, v in out.items()}


# ---------------------------------------------------------------------------- throughput
def producer_rate(node: LocalNode, session: int, block: np.ndarray, duration: float,
                  frame: int, ipc: bool = True) -> dict:
    """Arrays of ``frame`` events as fast as the window lets for ``duration`` s, then
    until all are acknowledged: events / (first send .. last acknowledgement)."""
    cfg = load_config(node.config)
    with _pinned(), Producer(cfg, session=session, frame=min(frame, 1024), ipc=ipc) as p:
        transport = p.stats["transport"]
        with _Run() as m:
            t0 = time.monotonic()
            cyc = 0
            n = 0
            orders = np.isin(block["type"], _ORDER_TYPES)
            while time.monotonic() - t0 < duration:
                # cycle ``cyc`` of the flow: one copy of the block, its order ids moved on
                # (until 2026-12-06 this built all cycles so far again, each time: at
                # 800,000 events/s most of this thread's time)
                recs = block
                if cyc:
                    recs = block.copy()
                    recs["order_id"][orders] += np.uint64(cyc) << np.uint64(36)
                for lo in range(0, len(recs), frame):
                    p.send(recs[lo:lo + frame])
                    n += min(frame, len(recs) - lo)
                    if time.monotonic() - t0 >= duration:
                        break
                cyc += 1
            p.flush(120)
        assert p.acked == n
    return {"events": n, "rate": round(n / m.wall_s), "transport": transport, **m.machine}


def tool_rate(node: LocalNode, session: int, duration: float, frame: int) -> dict:
    """``exposure perf throughput`` against the same node: its sustained rate."""
    with _Run() as m:
        p = subprocess.run(
            [sys.executable, "-m", "exposure", "perf", "throughput", "--config",
             str(node.config), "--duration", str(duration), "--frame", str(frame),
             "--session", str(session), "--json"], capture_output=True, text=True,
            timeout=1200)
    if p.returncode != 0:
        raise RuntimeError(f"exposure perf throughput failed: {p.stderr[-2000:]}")
    res = json.loads(p.stdout)["node"]
    return {"rate": res["sustained_rate"], **m.machine}


def throughput(tmp: Path, duration: float, frame: int, runs: int, log,
               transports=("ipc",)) -> dict:
    """Per run: the tool, then a producer over each transport (its ratio to the tool's
    rate of the same run). The figures at the top are the first transport's."""
    node = LocalNode(Path(tempfile.mkdtemp(dir=tmp)))
    rows = []
    session = 100
    try:
        block = _flow(_BLOCK, 11)
        for run in range(runs):
            t = tool_rate(node, 200 + run, duration, frame)
            for tr in transports:
                pr = producer_rate(node, session, block, duration, frame, tr == "ipc")
                session += 1
                ratio = pr["rate"] / t["rate"] if t["rate"] else 0.0
                rows.append({"producer": pr, "tool": t, "ratio": round(ratio, 3),
                             "transport": pr["transport"]})
                log(f"run {run + 1}: producer ({pr['transport']}) {pr['rate']:,}/s, exposure "
                    f"perf throughput {t['rate']:,.0f}/s: {ratio:.2f}x; steal "
                    f"{pr['steal_percent']}% / {t['steal_percent']}%, load {pr['load1']} / "
                    f"{t['load1']}")
    finally:
        node.stop()
    by = {tr: [r for r in rows if r["transport"] == tr] for tr in {r["transport"] for r in rows}}
    first = by[rows[0]["transport"]]
    return {"ratio": statistics.median(r["ratio"] for r in first),
            "producer_rate": statistics.median(r["producer"]["rate"] for r in first),
            "tool_rate": statistics.median(r["tool"]["rate"] for r in first),
            "transport": rows[0]["transport"],
            "by_transport": {tr: {"ratio": statistics.median(r["ratio"] for r in v),
                                  "producer_rate": statistics.median(r["producer"]["rate"]
                                                                     for r in v)}
                             for tr, v in by.items()},
            "runs": rows}


# ------------------------------------------------------------------------------ failover
def _role(node: LocalNode) -> int:
    c = node.control()
    return 0 if c is None else int(c[CTL_ROLE])


def _follows(backup: LocalNode, primary: LocalNode) -> bool:
    c, cp = backup.control(), primary.control()
    return (c is not None and cp is not None and c[CTL_ROLE] == ROLE_BACKUP
            and bool(c[CTL_IN_SYNC]) and cp[CTL_EPOCH] == c[CTL_PEER_EPOCH])


def _synchronous(pair: LocalPair, backup: LocalNode) -> bool:
    rec = pair.record()
    return rec is not None and rec.sync == backup.name


def failover(tmp: Path, times: int, rate: float, short_liveness: float, log) -> dict:
    etcd = LocalEtcd(Path(tempfile.mkdtemp(dir=tmp)))
    out = {}
    try:
        for label, live in (("default", None), ("short", short_liveness)):
            pair = LocalPair(Path(tempfile.mkdtemp(dir=tmp)), etcd)
            try:
                out[label] = _failovers(pair, times, rate, live, log, label)
            finally:
                pair.stop()
    finally:
        etcd.stop()
    return out


def _failovers(pair: LocalPair, times: int, rate: float, liveness: float | None, log,
               label: str) -> dict:
    block = _flow(_BLOCK, 13)
    acks: list[tuple[float, int]] = []  # (monotonic, upto)
    lock = threading.Lock()

    def on_ack(a) -> None:
        with lock:
            acks.append((time.monotonic(), a.upto))

    rows: list[dict] = []
    cfg = load_config(pair.a.config)
    with _pinned(), Producer(cfg, session=1, liveness_s=liveness,
                             on_result=on_ack) as p:
        stop = threading.Event()
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                t0 = time.monotonic()
                k = 0
                while not stop.is_set():
                    due = t0 + k * 20 / rate
                    if (w := due - time.monotonic()) > 0:
                        time.sleep(w)
                    lo = (k * 20) % len(block)
                    p.send(block[lo:lo + 20])  # (cycles: rejects of reused ids are fine)
                    k += 1
            except BaseException as e:
                errors.append(e)

        th = threading.Thread(target=stream, daemon=True)
        th.start()
        try:
            tries = skipped = 0
            while len(rows) < times and tries < 3 * times:
                tries += 1
                wait_for(lambda: {_role(pair.a), _role(pair.b)} == {ROLE_PRIMARY,
                                                                    ROLE_BACKUP},
                         120, "one primary and one backup")
                primary = pair.a if _role(pair.a) == ROLE_PRIMARY else pair.b
                backup = pair.b if primary is pair.a else pair.a
                wait_for(lambda b=backup, a=primary: _follows(b, a)
                         and _synchronous(pair, b), 120, "the backup synchronous", backup)
                wait_for(lambda a=primary: p.stats["endpoint"] == f"127.0.0.1:{a.port}"
                         and p.acked >= p.sent - 2000, 60, "the producer on the primary",
                         primary)
                time.sleep(0.3 + 0.2 * (tries % 3))  # a moment into the stream
                if _role(primary) != ROLE_PRIMARY or _role(backup) != ROLE_BACKUP:
                    skipped += 1  # (a failover of its own meanwhile: a loaded machine)
                    continue
                with _Run() as m:
                    t_stop = time.monotonic()
                    primary.signal_all(signal.SIGSTOP)
                    after = p.sent  # events sent from here on only the new primary acks
                    try:
                        wait_for(lambda b=backup: _role(b) == ROLE_PRIMARY, 20,
                                 "the promotion", backup)
                        t_prom = time.monotonic()
                        wait_for(lambda s=after: p.acked > s, 30, "a new event acknowledged",
                                 backup)
                    finally:
                        primary.signal_all(signal.SIGCONT)
                with lock:
                    t_ack = next(t for t, u in acks if u > after and t >= t_stop)
                row = {"promoted_ms": round((t_prom - t_stop) * 1000, 1),
                       "first_ack_ms": round((t_ack - t_stop) * 1000, 1),
                       "wall_s": round(m.wall_s, 2), **m.machine}
                if row["promoted_ms"] < 100:  # promoting already: not this stop's doing
                    skipped += 1
                    log(f"{label}: skipped a stop the backup had begun to take over before")
                    continue
                rows.append(row)
                log(f"{label} liveness {p.liveness_s:g} s, stop {len(rows)}: promoted after "
                    f"{row['promoted_ms']:.0f} ms, first new event acknowledged after "
                    f"{row['first_ack_ms']:.0f} ms; steal {row['steal_percent']}%, load "
                    f"{row['load1']}")
        finally:
            stop.set()
            th.join(30)
        if errors:
            raise errors[0]
    return {"liveness_s": liveness, "skipped": skipped, "first_ack_ms": statistics.median(
        r["first_ack_ms"] for r in rows), "promoted_ms": statistics.median(
        r["promoted_ms"] for r in rows), "runs": rows}


# ---------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_producer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="cpu,throughput,failover",
                    help="which parts (comma-separated: cpu, throughput, failover)")
    ap.add_argument("--rate", type=float, default=100_000, help="cpu: the paced rate")
    ap.add_argument("--duration", type=float, default=3.0,
                    help="cpu: seconds at the paced rate; throughput: seconds per run")
    ap.add_argument("--how", default="record,dict,array,dicts",
                    help="cpu: ways of sending (record, dict, array, dicts)")
    ap.add_argument("--linger-us", default="0",
                    help="cpu: the producer's linger_us values to try (comma-separated)")
    ap.add_argument("--transport", default="ipc,tcp",
                    help="cpu, throughput: how the producer reaches the node (ipc: its "
                         "shared-memory ring, the default on the node's host; tcp)")
    ap.add_argument("--frame", type=int, default=1000, help="throughput: events per send")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--failovers", type=int, default=3, help="SIGSTOPs per liveness")
    ap.add_argument("--failover-rate", type=float, default=20_000)
    ap.add_argument("--short-liveness", type=float, default=0.6,
                    help="failover: the second liveness_s tried (s)")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    a = ap.parse_args(argv)
    parts = [s.strip() for s in a.parts.split(",") if s.strip()]

    def log(msg: str) -> None:
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    global _CLIENT_CPUS
    _CLIENT_CPUS = {sorted(os.sched_getaffinity(0))[0]}  # as exposure perf's client
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "load_at_start": [round(x, 2) for x in os.getloadavg()]}
    log(f"load average at start: {res['load_at_start']}")
    with tempfile.TemporaryDirectory(prefix="bench-producer-") as d:
        tmp = Path(d)
        if "cpu" in parts:
            res["cpu"] = cpu(tmp, a.rate, a.duration, a.runs,
                             [h.strip() for h in a.how.split(",") if h.strip()], log,
                             [float(x) for x in a.linger_us.split(",") if x.strip()],
                             [t.strip() for t in a.transport.split(",") if t.strip()])
        if "throughput" in parts:
            res["throughput"] = throughput(
                tmp, a.duration, a.frame, a.runs, log,
                [t.strip() for t in a.transport.split(",") if t.strip()])
        if "failover" in parts:
            res["failover"] = failover(tmp, a.failovers, a.failover_rate,
                                       a.short_liveness, log)
    res["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        log("summary:")
        for k, v in res.get("cpu", {}).items():
            log(f"  cpu {k:26s} {v['cpu_us_per_event']:.2f} us/event (caller "
                f"{v['caller_us_per_event']:.2f}; less the pacing loop: "
                f"{v['producer_us_per_event']:.2f}) at {v['rate']:,.0f} events/s")
        if "throughput" in res:
            t = res["throughput"]
            for tr, v in t["by_transport"].items():
                log(f"  throughput ({tr}): producer {v['producer_rate']:,.0f}/s, tool "
                    f"{t['tool_rate']:,.0f}/s: {v['ratio']:.2f}x")
        for k, v in res.get("failover", {}).items():
            log(f"  failover ({k}, liveness {v['liveness_s'] or 'default'}): first new "
                f"ack {v['first_ack_ms']:.0f} ms, promotion {v['promoted_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
