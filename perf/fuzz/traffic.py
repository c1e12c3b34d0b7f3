"""The fuzzer's client processes: a :class:`Worker` runs its lanes on one asyncio loop
(:func:`_worker_main`, in a process of its own)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections import Counter, defaultdict, deque

from exposure.core.types import EVENT_SIZE
from exposure.net import wire as W
from perf.fuzz.client import Conn, connect
from perf.fuzz.content import CHUNK, SPEC_BY_ID, SPECS, content_chunk
from perf.fuzz.lanes import ChaosLane, SessionLane


class Worker:
    """One client process: its lanes on one asyncio loop."""

    def __init__(self, a: dict):
        self.seed = a["seed"]
        self.addr = ("127.0.0.1", a["port"])
        self.start_held = a["start_held"]
        self.login_timeout_s = a["login_timeout_ms"] / 1000
        self.frames: Counter = Counter()
        self.stats: Counter = Counter()
        self.anomalies: list[str] = []
        self.captured: deque = deque(maxlen=256)
        self._cc: dict[int, bytes] = {}
        self.episodes: dict[str, list] = defaultdict(lambda: [0, 0.0])
        self.lane_s: list[float] = []
        self.a = a

    def anomaly(self, what: str, detail: str) -> None:
        self.stats[f"anomaly_{what}"] += 1
        if len(self.anomalies) < 40:
            self.anomalies.append(f"{what}: {detail}")

    def any_content(self, rnd: random.Random) -> bytes:
        """Some session's record (for frames that must never be taken)."""
        sid = rnd.choice(SPECS).id
        cache = self._cc
        if sid not in cache:
            cache[sid] = content_chunk(self.seed, sid, 0)[0].tobytes()
        i = rnd.randrange(CHUNK)
        return cache[sid][i * EVENT_SIZE:(i + 1) * EVENT_SIZE]

    async def expect_auth(self, c: Conn, codes: set[int], what: str) -> None:
        lane_ok = await c.wait(lambda: c.closed)
        if not lane_ok:
            self.anomaly("timeout", f"the node did not close after {what}")
            c.rst()
            return
        got = c.reject_codes()
        if not got:
            self.stats["auth_closed_unanswered"] += 1  # evicted at the cap meanwhile
        elif len(got) != 1 or got[0] not in codes:
            self.anomaly("auth", f"{what}: REJECT {c.rejects}, expected {sorted(codes)}")
        else:
            self.stats[f"auth_rejected_{W.REJECT_NAMES.get(got[0], got[0])}"] += 1
        if c.held is not None:
            self.anomaly("auth", f"{what}: LOGIN_OK {c.held}")

    async def sleepers(self, n: int) -> None:
        """Connections that never log in (one sends half a LOGIN): the login deadline must
        close them."""
        conns = [await connect(self.addr) for _ in range(n)]
        self.stats["connections"] += n
        for c in conns:
            if c is not None:
                c.on_bad = lambda what: self.anomaly("malformed", what)
        t0 = time.monotonic()
        for k, c in enumerate(conns):
            if c is not None and k % 2:
                await c.send(W.encode_login(1)[:20])
                self.frames["sleeper_partial_login"] += 1
        for c in conns:
            if c is None:
                continue
            left = self.login_timeout_s + 10 - (time.monotonic() - t0)
            if await c.wait(lambda c=c: c.closed, max(left, 0.1)):
                self.stats["sleepers_closed"] += 1
            else:
                self.anomaly("sleeper", "a connection that never logged in was not closed "
                                        "by the login deadline")
                c.rst()

    async def run(self) -> dict:
        a = self.a
        lanes = [SessionLane(self, 1000 + sid, a["session_budget"], SPEC_BY_ID[sid])
                 for sid in a["sids"]]
        lanes += [ChaosLane(self, k, a["chaos_budget"]) for k in a["chaos"]]
        t0 = time.monotonic()
        await asyncio.gather(*(lane.run() for lane in lanes),
                             self.sleepers(a["sleepers"]))
        return {"frames": dict(self.frames), "stats": dict(self.stats),
                "episodes": dict(self.episodes), "lane_s": self.lane_s,
                "anomalies": self.anomalies,
                "seconds": time.monotonic() - t0}


def _worker_main(a: dict) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) > 1:  # off the CPU the node's hot process spins on (the last one)
        os.sched_setaffinity(0, cpus[:-1])
    import resource

    w = Worker(a)
    for sid in a["sids"]:  # (numba's cache loads now, not inside the event loop)
        content_chunk(a["seed"], sid, 0)
    w.any_content(random.Random(0))
    out = asyncio.run(w.run())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 2)
    return out
