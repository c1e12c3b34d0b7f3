"""The web page's server under load: N simulated browser clients, a node at R events/s.

    python -m perf.bench_web [--clients 100] [--rate 10000] [--seconds 20]

Starts a node (harness.LocalNode), ``exposure web`` on it (its own process, as deployed),
a sender streaming a generated flow at ``--rate`` over ``--accounts`` accounts (its own
process), and ``--clients`` WebSocket clients in this process (asyncio).
Reports the web process's CPU (user + system, over the measured window, as a share of one
core), the messages and bytes the clients received, and the **feed-to-browser latency**:
for each update a client receives (a simulated client reads every message off its socket
and takes the stamps at the head of an update, without parsing the rest: it measures the
server and the network, not a browser's rendering), its arrival time minus the compute time
(``compute_ns``, CLOCK_REALTIME, stamped when the node published the row; the feed sends
it at once) of the oldest row in it (it waited longest: conflation included) and of the
newest. Percentiles p50/p99/max over every (client, update).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from exposure.bench.flowgen import generate
from exposure.harness.localnode import LocalNode, free_port, listening, terminate
from exposure.harness.wait import wait_for

_HEAD = re.compile(rb'\{"type":"update","feed_ns":\[(\d+),(\d+)\]')


def _sender(host: str, port: int, rate: float, seconds: float, accounts: int) -> None:
    from exposure.net.client import send_records

    recs = generate(int(rate * seconds), accounts=accounts, instruments=2000, universe=40,
                    live_target=20_000, seed=7)
    send_records(host, port, recs, session=1, rate=rate, frame=max(1, int(rate // 1000)),
                 timeout=120)


async def _clients(port: int, n: int, seconds: float, warm: float) -> dict:
    import websockets

    lat_old: list[int] = []
    lat_new: list[int] = []
    got = {"messages": 0, "bytes": 0, "snapshots": 0, "closed": 0}
    t_measure = time.monotonic() + warm
    end = t_measure + seconds

    async def one() -> None:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{port}/ws",
                                          max_size=1 << 26) as ws:
                while (left := end - time.monotonic()) > 0:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), left)
                    except TimeoutError:
                        break
                    now = time.time_ns()
                    if time.monotonic() < t_measure:
                        continue
                    got["messages"] += 1
                    got["bytes"] += len(raw)
                    head = _HEAD.match(raw)  # (the stamps lead an update: no full parse)
                    if head is None:
                        got["snapshots"] += raw.startswith(b'{"type":"snapshot"')
                    elif int(head[1]):
                        lat_old.append(now - int(head[1]))
                        lat_new.append(now - int(head[2]))
        except Exception:
            got["closed"] += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return {"got": got, "old": np.array(lat_old), "new": np.array(lat_new)}


def _pct(a: np.ndarray) -> str:
    if not len(a):
        return "none"
    ms = a / 1e6
    return (f"p50 {np.percentile(ms, 50):.1f} ms, p99 {np.percentile(ms, 99):.1f} ms, "
            f"max {ms.max():.1f} ms ({len(a):,} updates)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rate", type=float, default=10_000.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--accounts", type=int, default=200, help="accounts the flow moves")
    ap.add_argument("--warm", type=float, default=3.0, help="seconds before measuring")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-web-"))
    node = LocalNode(tmp)
    web = None
    sender = None
    try:
        port = free_port()
        web = subprocess.Popen([sys.executable, "-m", "exposure", "web", "--config",
                                str(node.config), "--port", str(port), "--max-clients",
                                str(args.clients + 10)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(lambda: listening("127.0.0.1", port), 60, "exposure web to listen")
        proc = psutil.Process(web.pid)
        total = args.warm + args.seconds + 2
        sender = mp.get_context("spawn").Process(
            target=_sender, args=("127.0.0.1", node.port, args.rate, total, args.accounts),
            daemon=True)
        sender.start()
        load0 = psutil.getloadavg()
        cpu = {}

        async def run() -> dict:
            task = asyncio.create_task(_clients(port, args.clients, args.seconds, args.warm))
            await asyncio.sleep(args.warm)
            t = proc.cpu_times()
            cpu["t0"], cpu["c0"] = time.monotonic(), t.user + t.system
            res = await task
            t = proc.cpu_times()
            cpu["t1"], cpu["c1"] = time.monotonic(), t.user + t.system
            return res

        res = asyncio.run(run())
        share = (cpu["c1"] - cpu["c0"]) / (cpu["t1"] - cpu["t0"])
        g = res["got"]
        print(f"bench_web: {args.clients} clients, {args.rate:,.0f} events/s over "
              f"{args.accounts} accounts, "
              f"{args.seconds:g} s measured (after {args.warm:g} s), load average "
              f"before {load0[0]:.2f}, {psutil.cpu_count()} CPUs")
        print(f"  web process CPU: {100 * share:.1f}% of one core")
        per = g["messages"] / args.seconds / max(1, args.clients)
        print(f"  received: {g['messages']:,} messages ({per:.1f}/s per client), "
              f"{g['bytes'] / 1e6:,.1f} MB; clients closed early: {g['closed']}")
        print(f"  feed-to-browser, oldest row of each update: {_pct(res['old'])}")
        print(f"  feed-to-browser, newest row of each update: {_pct(res['new'])}")
        return 0
    finally:
        if sender is not None and sender.is_alive():
            sender.terminate()
            sender.join(10)
        terminate(web)
        node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
