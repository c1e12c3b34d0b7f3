"""What a feed subscriber (exposure.feed.subscriber.Subscriber) costs per datagram, woken and warm.

    python -m perf.bench_subscriber [--rate 2000] [--seconds 4] [--rows 8] [--json]

Two measurements, one after the other:

1. **woken**: a sender process sends INCREMENTAL datagrams of ``--rows`` account rows
   (each a new state) at ``--rate`` per second to a multicast group on loopback; this
   process sleeps in ``select`` on the subscriber's sockets and calls ``poll_rows(0)``
   whenever it wakes, as the cluster's consolidator does. CPU per poll (user + system,
   ``getrusage``), polls, datagrams and changes: what one wake-up costs with the caches
   as another process left them. Then the same with REFRESH datagrams of unchanged rows
   (nothing changes: the merge's no-change path);
2. **warm**: the same datagrams sent in bursts of ``--burst`` and taken by one
   ``poll_rows(0)`` each, back to back: CPU per datagram with the loop's code and data
   in cache.

The machine's steal time over the run is printed with the figures.
"""

from __future__ import annotations

import argparse
import resource
import select
import socket
import subprocess
import sys
import time

import numpy as np
import orjson

from exposure.core.types import ROW_ACCOUNT, UPDATE_DTYPE
from exposure.feed.subscriber import Subscriber
from exposure.feed.wire import DG_INCREMENTAL, DG_REFRESH, DGRAM_HEADER, DGRAM_MAGIC, dgram_word
from exposure.harness.localnode import free_group, free_port
from exposure.harness.machine import steal_since, steal_ticks

_TYPES = {"incremental": DG_INCREMENTAL, "refresh": DG_REFRESH}


def _datagrams(kind: int, n: int, rows: int) -> list[bytes]:
    r = np.zeros(rows, UPDATE_DTYPE)
    r["kind"], r["account"] = ROW_ACCOUNT, np.arange(rows)
    out = []
    for i in range(n):
        seq = i + 1 if kind == DG_INCREMENTAL else 0
        r["gseq"] = i + 2 if kind == DG_INCREMENTAL else 1
        out.append(DGRAM_HEADER.pack(DGRAM_MAGIC, 1, seq, *dgram_word(rows, kind), 0)
                   + r.tobytes())
    return out


def _sender(group: str, port: int, kind: int, rate: float, n: int, rows: int) -> int:
    tx = _tx()
    dgs = _datagrams(kind, n, rows)
    t0 = time.monotonic()
    for i, d in enumerate(dgs):
        tx.sendto(d, (group, port))
        wait = t0 + (i + 1) / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
    return 0


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _warm_up(sub: Subscriber, group: str, port: int, rows: int) -> None:
    """One datagram of each type through ``sub`` before measuring: the first loads (or,
    after a change of the sources, compiles) the jitted passes, which takes seconds."""
    tx = _tx()
    try:
        for kind in _TYPES.values():
            seen = sub.counters["datagrams"]
            tx.sendto(_datagrams(kind, 1, rows)[0], (group, port))
            end = time.monotonic() + 120
            while sub.counters["datagrams"] == seen and time.monotonic() < end:
                select.select(sub.selectables, [], [], 0.05)
                sub.poll_rows(0)
    finally:
        tx.close()


def _tx() -> socket.socket:
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    return tx


def woken(kind: str, rate: float, seconds: float, rows: int) -> dict:
    group, port = free_group(), free_port()
    with Subscriber(group, port) as sub:
        _warm_up(sub, group, port, rows)
        d0 = sub.counters["datagrams"]
        n = int(rate * seconds)
        snd = subprocess.Popen([sys.executable, "-m", "perf.bench_subscriber", "--send",
                                group, str(port), str(_TYPES[kind]), str(rate), str(n),
                                str(rows)])
        try:
            c0, polls, changed = _cpu(), 0, 0
            while snd.poll() is None or sub.counters["datagrams"] - d0 < n:
                if not select.select(sub.selectables, [], [], 0.2)[0] and snd.poll() is not None:
                    break
                changed += sum(len(b.ids) for b in sub.poll_rows(0))
                polls += 1
            cpu = _cpu() - c0
        finally:
            snd.kill()
            snd.wait()
        return {"type": kind, "rate": rate, "rows_per_datagram": rows, "polls": polls,
                "datagrams": sub.counters["datagrams"] - d0, "changed": changed,
                "us_cpu_per_poll": round(1e6 * cpu / max(polls, 1), 1)}


def warm(rows: int, burst: int, bursts: int) -> dict:
    group, port = free_group(), free_port()
    tx = _tx()
    dgs = _datagrams(DG_INCREMENTAL, burst * (bursts + 1), rows)
    try:
        with Subscriber(group, port) as sub:
            _warm_up(sub, group, port, rows)
            d0 = sub.counters["datagrams"]
            spent, taken = 0.0, 0
            for b in range(1, bursts + 1):
                for d in dgs[b * burst:(b + 1) * burst]:
                    tx.sendto(d, (group, port))
                t0 = time.perf_counter()
                end = time.monotonic() + 10
                while (sub.counters["datagrams"] - d0 < b * burst
                       and time.monotonic() < end):
                    sub.poll_rows(0)
                spent += time.perf_counter() - t0
                taken += burst
    finally:
        tx.close()
    return {"burst": burst, "rows_per_datagram": rows,
            "us_per_datagram": round(1e6 * spent / max(taken, 1), 2)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--send":
        g, p, k, r, n, rows = argv[1:7]
        return _sender(g, int(p), int(k), float(r), int(n), int(rows))
    ap = argparse.ArgumentParser(prog="python -m perf.bench_subscriber",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    s0 = steal_ticks()
    out = {"woken": [woken(k, a.rate, a.seconds, a.rows) for k in _TYPES],
           "warm": warm(a.rows, a.burst, 200)}
    out["steal_percent"] = steal_since(s0)["steal_percent"]
    if a.json:
        print(orjson.dumps(out).decode())
        return 0
    for w in out["woken"]:
        print(f"woken, {w['type']:<11} {w['rate']:,.0f}/s of {w['rows_per_datagram']} rows: "
              f"{w['us_cpu_per_poll']} us CPU per poll ({w['polls']:,} polls, "
              f"{w['datagrams']:,} datagrams, {w['changed']:,} rows changed)")
    w = out["warm"]
    print(f"warm, bursts of {w['burst']}: {w['us_per_datagram']} us per datagram "
          f"(receive, scan, merge, changes as arrays)")
    print(f"steal {out['steal_percent']}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
