"""The web page's server under load: N simulated browser clients, a node at R events/s.

    python -m perf.bench_web [--clients 100] [--rate 10000] [--seconds 20]

Starts a node (harness.LocalNode), ``exposure web`` on it (its own process, as deployed),
a sender streaming a generated flow at ``--rate`` over ``--accounts`` accounts (its own
process), and ``--clients`` WebSocket clients in ``--procs`` processes (each a selectors
loop over plain sockets that reads every frame as it comes: little Python per message, so
that the clients keep up and the figures are the server's).
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
import base64
import multiprocessing as mp
import os
import re
import selectors
import shutil
import socket
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


def _connect(port: int) -> tuple[socket.socket, bytes]:
    """A WebSocket client's connection, handshake done (a plain socket: the frames are
    read by :func:`_clients` itself, with little Python per message)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall((f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode())
    s.setblocking(False)
    return s, head.split(b"\r\n\r\n", 1)[1]


def _clients(port: int, n: int, seconds: float, warm: float) -> dict:
    """``n`` clients in one process: each reads every frame off its socket as it comes
    (selectors), stamps its arrival, and reads the stamps at the head of an update."""
    lat_old: list[int] = []
    lat_new: list[int] = []
    got = {"messages": 0, "bytes": 0, "snapshots": 0, "closed": 0}
    sel = selectors.DefaultSelector()
    for _ in range(n):
        s, rest = _connect(port)
        sel.register(s, selectors.EVENT_READ, bytearray(rest))
    t_measure = time.monotonic() + warm
    end = t_measure + seconds
    while (now_m := time.monotonic()) < end and sel.get_map():
        for key, _ in sel.select(min(0.1, end - now_m)):
            buf: bytearray = key.data
            try:
                chunk = key.fileobj.recv(1 << 20)
            except BlockingIOError:
                continue
            if not chunk:
                got["closed"] += 1
                sel.unregister(key.fileobj)
                continue
            buf += chunk
            now = time.time_ns()
            measuring = time.monotonic() >= t_measure
            while len(buf) >= 2:  # whole frames (server frames are not masked)
                ln, off = buf[1] & 0x7F, 2
                if ln == 126:
                    if len(buf) < 4:
                        break
                    ln, off = int.from_bytes(buf[2:4], "big"), 4
                elif ln == 127:
                    if len(buf) < 10:
                        break
                    ln, off = int.from_bytes(buf[2:10], "big"), 10
                if len(buf) < off + ln:
                    break
                if measuring and buf[0] & 0x0F in (1, 2):
                    got["messages"] += 1
                    got["bytes"] += ln
                    head = _HEAD.match(bytes(buf[off:off + 128]))
                    if head is None:
                        got["snapshots"] += buf[off:off + 18] == b'{"type":"snapshot"'
                    elif int(head[1]):
                        lat_old.append(now - int(head[1]))
                        lat_new.append(now - int(head[2]))
                del buf[:off + ln]
    for key in list(sel.get_map().values()):
        key.fileobj.close()
    return {"got": got, "old": lat_old, "new": lat_new}


def _client_process(port: int, n: int, seconds: float, warm: float, out) -> None:
    out.put(_clients(port, n, seconds, warm))


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
    ap.add_argument("--procs", type=int, default=2, help="client processes")
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
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        per = [args.clients // args.procs + (k < args.clients % args.procs)
               for k in range(args.procs)]
        procs = [ctx.Process(target=_client_process, args=(port, k, args.seconds, args.warm,
                                                            out), daemon=True)
                 for k in per if k]
        for p in procs:
            p.start()
        time.sleep(args.warm)
        t = proc.cpu_times()
        cpu = {"t0": time.monotonic(), "c0": t.user + t.system, "g0": node.last_gseq()}
        parts = [out.get(timeout=args.seconds + 120) for _ in procs]
        t = proc.cpu_times()
        cpu["t1"], cpu["c1"] = time.monotonic(), t.user + t.system
        cpu["g1"] = node.last_gseq()
        for p in procs:
            p.join(10)
        res = {"got": {k: sum(r["got"][k] for r in parts) for k in parts[0]["got"]},
               "old": np.array([x for r in parts for x in r["old"]]),
               "new": np.array([x for r in parts for x in r["new"]])}
        share = (cpu["c1"] - cpu["c0"]) / (cpu["t1"] - cpu["t0"])
        g = res["got"]
        print(f"bench_web: {args.clients} clients, {args.rate:,.0f} events/s over "
              f"{args.accounts} accounts, "
              f"{args.seconds:g} s measured (after {args.warm:g} s), load average "
              f"before {load0[0]:.2f}, {psutil.cpu_count()} CPUs")
        rate = (cpu["g1"] - cpu["g0"]) / (cpu["t1"] - cpu["t0"])
        print(f"  the node applied {rate:,.0f} events/s in the window")
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
