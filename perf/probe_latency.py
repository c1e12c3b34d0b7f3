"""Wire-to-wire latency probe of a live node (issue 3's quick probe; the full perf tool is
issue 4).

    python -m perf.probe_latency [--rate 20000] [--events 100000] [--warmup 20000]
                                 [--runs 3] [--json]

Starts a node on the built-in default process map (its own name and ports), connects one
session and joins the multicast group. One client process, pinned to the CPU the node does
not spin on, runs an open loop: it sends one event per frame on a fixed schedule (never
waiting for replies) and, between sends, busy-polls the multicast socket. Latency is from
the event's client send timestamp (``send_ns``, stamped just before the send) to the receipt
of the first multicast update of its session whose session seq is at or beyond the event's
(updates are conflated: a row carries the state after the last event that moved it, which
includes every earlier event). Datagrams are only timestamped during the run and matched
afterwards, so the client's own work does not queue behind the stream. The first
``--warmup`` events are excluded. Percentiles come from an
HdrHistogram (1 ns .. 1 s, 3 significant digits).
"""

from __future__ import annotations

import argparse
import gc
import os
import select
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from hdrh.histogram import HdrHistogram

from exposure import wire as W
from exposure.stages.fanout import open_receiver, parse_datagram
from perf.flowgen import generate
from perf.localnode import LocalNode


def steal_ms() -> float:
    """Time the hypervisor has taken from this VM's vCPUs so far (``/proc/stat``, all CPUs
    together), in ms.

    On this kind of machine the host sometimes stops a vCPU for ~100 ms (a plain spinning
    loop with nothing else running sees it too); a run that overlaps such a theft has its
    tail ruined by it, so every run reports how much was stolen while it ran."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) * 1000 / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_once(rate: int, events: int, warmup: int, session: int, port: int, group: str,
             mport: int) -> dict:
    recs = generate(events + warmup, accounts=200, instruments=2000, universe=50,
                    live_target=5000, seed=session)
    n = len(recs)
    recs["sseq"] = np.arange(1, n + 1, dtype=np.uint64)
    rx = open_receiver(group, mport)
    rx.setblocking(False)
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(W.encode_login(session))
    rd = W.FrameReader()
    while not any(k == W.K_LOGIN_OK for k, _ in rd.feed(sock.recv(4096))):
        pass
    sock.setblocking(False)
    ep = select.epoll()
    sock_fd = sock.fileno()
    ep.register(sock_fd, select.EPOLLIN)
    ep.register(rx.fileno(), select.EPOLLIN)
    send_ns = np.zeros(n + 1, np.int64)
    recv_ns = np.zeros(n + 1, np.int64)
    period = 1e9 / rate
    frames = [W.encode_events(recs[k:k + 1]) for k in range(n)]  # prebuilt: no Python work
    hdr_off = 16  # send_ns offset inside the record, after the 8-byte frame header
    gc.collect()
    gc.disable()  # the client's own collector would stall its receive loop
    stolen0 = steal_ms()
    t0 = time.perf_counter_ns() + 50_000_000
    late = 0
    k = 0
    buf = bytearray(65536)
    got: list[tuple[int, bytes]] = []
    while k < n or time.perf_counter_ns() < t0 + (n * period) + 200_000_000:
        now = time.perf_counter_ns()
        if k < n and now >= t0 + k * period:
            if now - (t0 + k * period) > 50_000:
                late += 1
            f = bytearray(frames[k])
            ts = time.time_ns()
            f[W.HEADER.size + hdr_off:W.HEADER.size + hdr_off + 8] = ts.to_bytes(8, "little",
                                                                                  signed=True)
            sock.send(f)
            send_ns[k + 1] = ts
            k += 1
            continue
        ready = ep.poll(0)  # 0.2 us when nothing is there (a failed recv costs 1 us)
        if not ready:
            continue
        for fd, _ in ready:
            if fd == sock_fd:
                try:
                    sock.recv(65536)  # acks: drained, not used
                except BlockingIOError:
                    pass
        try:
            m = rx.recv_into(buf)
        except BlockingIOError:
            continue
        got.append((time.time_ns(), bytes(buf[:m])))  # matched after the run
    gc.enable()
    ep.close()
    stolen = steal_ms() - stolen0
    sock.close()
    rx.close()
    # An update carries the state after the last event that moved its row, so its arrival
    # is when every earlier event of that session is reflected: each event is seen at the
    # first update of its session with a session seq at or beyond its own.
    reach = 0
    for t, data in got:
        upd = parse_datagram(data).updates
        mine = upd["sseq"][upd["session"] == session]
        if len(mine):
            top = min(int(mine.max()), n)
            if top > reach:
                recv_ns[reach + 1:top + 1] = t
                reach = top
    lat = (recv_ns - send_ns)[warmup + 1:]
    seen = recv_ns[warmup + 1:] != 0
    h = HdrHistogram(1, 1_000_000_000, 3)
    for v in lat[seen]:
        h.record_value(max(1, int(v)))
    us = {f"p{q}".replace(".", ""): h.get_value_at_percentile(q) / 1000
          for q in (50, 90, 99, 99.9)}
    return {"events": int(len(lat)), "seen": int(seen.sum()), "late_sends": late,
            "p50_us": us["p50"], "p90_us": us["p90"], "p99_us": us["p99"],
            "p999_us": us["p999"], "max_us": h.get_max_value() / 1000, "rate": rate,
            "steal_ms": stolen, "max_send_gap_us": int(np.diff(send_ns[1:]).max()) / 1000}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=int, default=20_000)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--warmup", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        node = LocalNode(Path(tmp), orders=1_048_576, cells=1_048_576, prefix="probe")
        port, group, mport = node.port, node.group, node.mport
        try:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) > 1:
                os.sched_setaffinity(0, {cpus[0]})  # the node spins on the last CPU
            runs = [run_once(a.rate, a.events, a.warmup, 1 + r, port, group, mport)
                    for r in range(a.runs)]
        finally:
            node.stop()
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("p50_us", "p90_us", "p99_us", "p999_us", "max_us")}
    out = {"runs": runs, "median": med}
    if a.json:
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    else:
        for r in runs:
            print(f"run: {r['events']:,} events at {r['rate']:,}/s, seen {r['seen']:,}, "
                  f"late sends {r['late_sends']}, stolen {r['steal_ms']:.0f} ms: "
                  f"p50 {r['p50_us']:.1f} us, "
                  f"p90 {r['p90_us']:.1f}, p99 {r['p99_us']:.1f}, p99.9 {r['p999_us']:.1f}, "
                  f"max {r['max_us']:.0f}")
        print(f"median of {len(runs)} runs: p50 {med['p50_us']:.1f} us, "
              f"p99 {med['p99_us']:.1f} us, p99.9 {med['p999_us']:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
