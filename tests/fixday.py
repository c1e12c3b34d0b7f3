"""A seeded day of FIX ExecutionReports and, built beside them and independently of the
gateway's Mapper, the SPEC events they mean (docs/fix.md's mapping table): for the gateway's
end-to-end tests and its benchmark.

Order ids: each source's orders are numbered 1, 2, 3, ... in the order their first event
reaches the node (:func:`number_orders` does that over the expected events, so a test that
reorders them, e.g. dead letters passed on later, numbers them as the gateway would)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Day", "Book", "number_orders", "script_line", "ACCOUNTS", "SYMBOLS",
           "accounts_csv", "instruments_csv"]

ACCOUNTS = {f"ACC{i}": 10 + i for i in range(1, 9)}
SYMBOLS = {f"SYM{i}": 100 + i for i in range(1, 21)}


def accounts_csv(accounts: dict[str, int] = ACCOUNTS) -> str:
    return "name,account\n" + "".join(f"{n},{a}\n" for n, a in accounts.items())


def instruments_csv(symbols: dict[str, int] = SYMBOLS) -> str:
    return "symbol,instrument\n" + "".join(f"{s},{i}\n" for s, i in symbols.items())


def script_line(fields: list) -> str:
    """One QuickFIX counterparty script line (tests/fix/counterparty.cpp)."""
    return "35=8|" + "|".join(f"{t}={v}" for t, v in fields)


@dataclass
class _Order:
    key: str            # the ClOrdID of its first report (its name in the expected events)
    clordid: str
    orderid: str
    account: str
    symbol: str
    side: str           # "1" buy, "2" sell
    qty: int
    price: float
    filled: int = 0
    live: bool = True


@dataclass
class Book:
    """What has been reported so far, to make the next report."""

    source: int
    rnd: random.Random
    prefix: str = "D"
    orders: list[_Order] = field(default_factory=list)
    trades: list[tuple[str, _Order, int, float]] = field(default_factory=list)
    n: int = 0

    def _id(self, what: str) -> str:
        self.n += 1
        return f"{self.prefix}{what}{self.n}"

    @staticmethod
    def _common(o: _Order, exec_id: str, exec_type: str, status: str) -> list:
        return [(37, o.orderid), (11, o.clordid), (17, exec_id), (150, exec_type),
                (39, status), (54, o.side), (55, o.symbol), (1, o.account)]

    def _ev(self, o: _Order, kind: str, **kw) -> dict:
        ev = {"type": kind, "source": self.source, "order_id": o.key}
        if kind in ("new", "fill", "bust"):
            ev.update(account=ACCOUNTS.get(o.account, o.account),
                      instrument=SYMBOLS.get(o.symbol, o.symbol),
                      side="buy" if o.side == "1" else "sell")
        ev.update(kw)
        return ev

    def new(self, account: str | None = None, symbol: str | None = None):
        r = self.rnd
        cl = self._id("C")
        o = _Order(cl, cl, self._id("O"), account or r.choice(list(ACCOUNTS)),
                   symbol or r.choice(list(SYMBOLS)), r.choice("12"), r.randrange(1, 50) * 100,
                   round(r.uniform(10, 200), 2))
        self.orders.append(o)
        fix = self._common(o, self._id("E"), "0", "0") + [(38, o.qty), (44, o.price)]
        return fix, [self._ev(o, "new", qty=o.qty, price=o.price)]

    def live(self) -> list[_Order]:
        return [o for o in self.orders if o.live]

    def fill(self, o: _Order):
        qty = min(o.qty - o.filled, self.rnd.randrange(1, 20) * 100)
        px = round(o.price + self.rnd.uniform(-1, 1), 2)
        o.filled += qty
        done = o.filled >= o.qty
        o.live = not done
        ex = self._id("E")
        self.trades.append((ex, o, qty, px))
        fix = self._common(o, ex, "F", "2" if done else "1") + [
            (38, o.qty), (44, o.price), (32, qty), (31, px), (14, o.filled),
            (151, o.qty - o.filled)]
        return fix, [self._ev(o, "fill", qty=qty, price=px)]

    def replace(self, o: _Order):
        orig = o.clordid
        o.clordid = self._id("C")
        o.qty = o.filled + self.rnd.randrange(1, 30) * 100
        o.price = round(o.price * self.rnd.uniform(0.98, 1.02), 2)
        fix = self._common(o, self._id("E"), "5", "5") + [(41, orig), (38, o.qty),
                                                           (44, o.price)]
        return fix, [self._ev(o, "replace", qty=o.qty, price=o.price)]

    def finish(self, o: _Order, exec_type: str):
        """4 canceled, or C / 3 / 8 (done)."""
        orig = o.clordid
        o.live = False
        extra = []
        if exec_type == "4":
            o.clordid = self._id("C")
            extra = [(41, orig)]
        status = {"4": "4", "C": "C", "3": "3", "8": "8"}[exec_type]
        fix = self._common(o, self._id("E"), exec_type, status) + extra + [(38, o.qty)]
        return fix, [self._ev(o, "cancel" if exec_type == "4" else "done")]

    def pending(self, o: _Order):
        """A report that maps to nothing (Pending Cancel)."""
        fix = self._common(o, self._id("E"), "6", "6") + [(38, o.qty)]
        return fix, []

    def bust(self):
        """A Trade Cancel (H) of a random earlier trade not busted yet."""
        ex, o, qty, px = self.trades.pop(self.rnd.randrange(len(self.trades)))
        fix = self._common(o, self._id("E"), "H", "1") + [(19, ex), (32, qty), (31, px),
                                                          (38, o.qty)]
        return fix, [self._ev(o, "bust", qty=qty, price=px)]

    def correct(self):
        """A Trade Correct (G): a bust of the trade, then a fill of the corrected one."""
        i = self.rnd.randrange(len(self.trades))
        ex, o, qty, px = self.trades[i]
        nq = max(100, qty + self.rnd.choice((-100, 100)))
        npx = round(px + 0.05, 2)
        nex = self._id("E")
        self.trades[i] = (nex, o, nq, npx)
        fix = self._common(o, nex, "G", "1") + [(19, ex), (32, nq), (31, npx), (38, o.qty)]
        return fix, [self._ev(o, "bust", qty=qty, price=px),
                     self._ev(o, "fill", qty=nq, price=npx)]


class Day:
    """``n`` reports of source ``source``: ``fix`` (field lists, in order) and ``events``
    (the SPEC events they mean; order ids still the orders' first ClOrdIDs)."""

    def __init__(self, rnd: random.Random, n: int, source: int = 1, busts: bool = False,
                 prefix: str = "D"):
        self.book = Book(source, rnd, prefix)
        self.fix: list[list] = []
        self.events: list[list[dict]] = []   # per report
        self.more(n, busts)

    def more(self, n: int, busts: bool = False) -> tuple[int, int]:
        b, r = self.book, self.book.rnd
        first = len(self.fix)
        while len(self.fix) - first < n:
            live = b.live()
            x = r.random()
            if not live or x < 0.25:
                f, e = b.new()
            elif x < 0.6:
                f, e = b.fill(r.choice(live))
            elif x < 0.7:
                f, e = b.replace(r.choice(live))
            elif x < 0.78:
                f, e = b.finish(r.choice(live), r.choice("4C38"))
            elif x < 0.82:
                f, e = b.pending(r.choice(live))
            elif busts and b.trades and x < 0.91:
                f, e = b.bust() if x < 0.87 else b.correct()
            else:
                f, e = b.fill(r.choice(live))
            self.fix.append(f)
            self.events.append(e)
        return first, len(self.fix)

    def add(self, fix_events) -> None:
        f, e = fix_events
        self.fix.append(f)
        self.events.append(e)


def number_orders(events: list[dict]) -> list[dict]:
    """The events with each (source, order key) numbered 1, 2, ... per source in the order
    first seen (as the gateway's order key does)."""
    ids: dict[tuple[int, str], int] = {}
    nxt: dict[int, int] = {}
    out = []
    for ev in events:
        ev = dict(ev)
        if "order_id" in ev and isinstance(ev["order_id"], str):
            k = (ev["source"], ev["order_id"])
            if k not in ids:
                nxt[ev["source"]] = nxt.get(ev["source"], 0) + 1
                ids[k] = nxt[ev["source"]]
            ev["order_id"] = ids[k]
        out.append(ev)
    return out
