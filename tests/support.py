"""Test helpers: run JSON lines through the real parser and kernel; scenario data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson

from exposure.core.capacity import Capacities
from exposure.core.types import REASONS, S_LATE_FILL
from exposure.engine.document import document, document_from_cells
from exposure.engine.parse import parse_events
from exposure.engine.replay import Engine

DATA = Path(__file__).resolve().parent / "data"
SCENARIOS = sorted(p.name[: -len(".jsonl")] for p in DATA.glob("*.jsonl"))


def status_name(s: int) -> str | None:
    """Kernel status code -> the reference model's vocabulary."""
    if s == 0:
        return None
    if s == S_LATE_FILL:
        return "late_fill"
    return REASONS[s]


class Run:
    """The state and per-event outcomes of a stream applied by the real kernel."""

    def __init__(self, lines, caps: Capacities | None = None):
        data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()
        self.engine = Engine(caps)
        self.status = self.engine.apply(parse_events(data))
        self.state = self.engine.state

    @property
    def doc(self) -> dict:
        return document(self.state)

    @property
    def scratch(self) -> dict:
        return document_from_cells(self.state)

    def statuses(self) -> list:
        return [status_name(int(s)) for s in self.status]

    def account(self, a: int) -> dict:
        return next((r for r in self.doc["accounts"] if r["account"] == a), {})

    def position(self, a: int, i: int) -> dict:
        return next((r for r in self.doc["positions"]
                     if r["account"] == a and r["instrument"] == i), {})


def load_expected(name: str) -> dict:
    return orjson.loads((DATA / f"{name}.expected.json").read_bytes())


def read_stream(rx, check=None) -> tuple[list[int], dict]:
    """Every INCREMENTAL datagram on the multicast socket ``rx`` until none has come for
    its timeout (heartbeats and refreshes, which keep coming, are skipped): the stream seqs
    in arrival order and each account's latest update (by gseq). ``check(datagram)`` is
    called on each one."""
    import time

    from exposure.core.types import ROW_ACCOUNT, ROW_FUND
    from exposure.feed.wire import DG_INCREMENTAL, parse_datagram

    seqs, latest = [], {}
    quiet = rx.gettimeout() or 1.0
    last = time.monotonic()
    while True:
        if time.monotonic() - last > quiet:
            return seqs, latest
        try:
            data = rx.recv(65536)
        except TimeoutError:
            return seqs, latest
        d = parse_datagram(data)
        if d.type != DG_INCREMENTAL:
            continue  # heartbeats and refreshes repeat the last seq and carry no event
        last = time.monotonic()
        if check is not None:
            check(d)
        seqs.append(d.seq)
        kinds = d.updates["kind"]
        for u in d.updates[(kinds == ROW_ACCOUNT) | (kinds == ROW_FUND)]:
            prev = latest.get(int(u["account"]))
            if prev is None or u["gseq"] >= prev["gseq"]:
                latest[int(u["account"])] = u.copy()


def currency_chains_ok(st) -> bool:
    """The kernel's currency chains (SPEC section 7) hold exactly the instruments of each
    currency other than the base, once each, linked both ways."""
    cur_of = st.inst["currency"]
    used = set(np.unique(cur_of).tolist()) | set(np.flatnonzero(st.cur_head >= 0).tolist())
    for cur in sorted(used - {0}):
        seen, prev, i = [], -1, int(st.cur_head[cur])
        while i >= 0 and len(seen) <= len(st.inst):
            if int(st.cprev[i]) != prev:
                return False
            seen.append(i)
            prev, i = i, int(st.inst[i]["cnext"])
        if sorted(seen) != np.flatnonzero(cur_of == cur).tolist():
            return False
    base = np.flatnonzero(cur_of == 0)
    return bool((st.inst["cnext"][base] == -1).all() and (st.cprev[base] == -1).all())
