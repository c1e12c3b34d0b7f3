"""The book the web page shows, and the messages pushed to each client.

:class:`Book` keeps a feed :class:`~exposure.feed.subscriber.Subscriber` (the node's
multicast feed, in this process: the node never waits for the page). The feed (version 4)
carries everything the page shows, an account's positions (the drill-down) and limits (the
breach flags' limit and use in percent) included, so the page works the same on any host
that receives the feed and on a cluster's consolidator's feed. Where the node runs on this
host, a read-only :class:`~exposure.engine.desk.Desk` adds the node's role and the last
roll's date, and the positions of a node whose feed sends none (``[fanout] positions =
false``).

Changes are conflated: :meth:`Book.pump` takes datagrams as they come and only marks which
rows moved; :meth:`Book.take` (called by the app at most 10 times a second) makes one
:class:`Tick` of the rows that moved since the last one. A tick's message for a user
(:meth:`Tick.message`) carries the fund line, instruments and sectors (fund-level: everyone
sees them) and only the accounts that user may see: the server filters, not the browser.

Every table is a column list (``*_COLUMNS``): the page builds its headers and cells from the
``columns`` of the snapshot, so a column is added here, in one line, and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import orjson

from exposure.config.model import NodeConfig
from exposure.core.refdata import RefData
from exposure.core.types import (
    C_ROLL_DATE,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SECTOR,
)
from exposure.feed.subscriber import Rows, Subscriber
from exposure.web.users import User

__all__ = ["Book", "Tick", "FUND_COLUMNS", "ACCOUNT_COLUMNS", "INSTRUMENT_COLUMNS",
           "SECTOR_COLUMNS", "POSITION_COLUMNS", "STALE_S", "columns"]

log = logging.getLogger(__name__)

STALE_S = 2.0  # nothing from the feed for this long: the page says stale

# The tables' columns, in the order the page shows them. Each is a SPEC key (the page's
# data-field) or one of the derived columns of :func:`_account_cols` and friends.
FUND_COLUMNS = ("gross", "net", "long_mv", "short_mv", "crossing", "worst_gross", "margin",
                "beta_net", "pnl", "live_orders")
ACCOUNT_COLUMNS = ("account", "name", "gross", "net", "long_mv", "short_mv", "worst_gross",
                   "margin", "beta_net", "pnl", "live_orders", "open_buy_mv", "open_sell_mv",
                   "breach", "limits")
INSTRUMENT_COLUMNS = ("instrument", "symbol", "crossing", "fund_pos", "net_mv", "gross_mv",
                      "ref_price", "currency", "rate", "open_buy", "open_sell", "sector")
SECTOR_COLUMNS = ("sector", "net_mv", "gross_mv")
POSITION_COLUMNS = ("instrument", "symbol", "pos", "open_buy", "open_sell", "mv", "pnl")
_LIMITS = ("gross_limit", "net_limit", "margin_limit", "loss_limit")


def columns() -> dict[str, list[str]]:
    """Every table's column list (what a snapshot tells the page)."""
    return {"fund": list(FUND_COLUMNS), "accounts": list(ACCOUNT_COLUMNS),
            "instruments": list(INSTRUMENT_COLUMNS), "sectors": list(SECTOR_COLUMNS),
            "positions": list(POSITION_COLUMNS)}


def _rows_of(cols: list[list]) -> list[list]:
    return [list(r) for r in zip(*cols, strict=True)] if cols else []


def _named(ids: np.ndarray, lookup: Callable[[int], str | None] | None) -> list:
    if lookup is None:
        return [None] * len(ids)
    return [lookup(i) for i in ids.tolist()]


@dataclass
class Tick:
    """What moved since the last tick, ready to send: the shared parts encoded once, the
    account rows kept as (ids, rows) so that each user's message takes only theirs.
    ``reset``: the view was dropped (a new epoch) and every client gets a snapshot.
    ``feed_ns``: the oldest and newest compute time (CLOCK_REALTIME ns) of the tagged rows
    in it (0: none), for the feed-to-browser latency."""

    meta: bytes
    shared: bytes                       # the fund, instruments and sectors parts
    ids: np.ndarray                     # account ids that moved, ascending
    rows: list[list]                    # their rows (ACCOUNT_COLUMNS)
    reset: bool = False
    feed_ns: tuple[int, int] = (0, 0)
    moved: frozenset[int] = frozenset()  # the accounts that moved (drill-downs to refresh)
    _cache: dict = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        return not self.shared and not len(self.ids)

    def message(self, user: User | None) -> bytes:
        """The update for ``user`` (None: every account), as JSON (UTF-8 bytes: sent as a
        binary frame, encoded once); the same object for users of the same accounts (one
        encoding per scope and tick)."""
        key = None if user is None else user.accounts
        m = self._cache.get(key)
        if m is None:
            if key is None:
                acc = self.rows
            else:
                keep = np.flatnonzero(np.isin(self.ids, np.fromiter(key, np.int64,
                                                                    len(key))))
                acc = [self.rows[k] for k in keep.tolist()]
            body = b'{"type":"update","feed_ns":' + orjson.dumps(list(self.feed_ns)) + \
                b',"meta":' + self.meta + self.shared + b',"accounts":' + \
                orjson.dumps(acc) + b"}"
            m = self._cache[key] = body
        return m


class Book:
    """The page's view of one node (or consolidator): its feed, and its desk where local.

    ``cfg``: the node's config (its ``[fanout]``, capacities, ``[reference]`` names and
    ``[day]``). ``sub``: a subscriber to use instead of ``Subscriber.from_config(cfg)``.
    ``local``: read the node's shared memory for its role and the last roll, and the
    positions of a node that sends none on its feed (True: try, and again every few
    seconds while it is absent; False: never)."""

    def __init__(self, cfg: NodeConfig, sub: Subscriber | None = None, local: bool = True,
                 clock: Callable[[], float] = time.time):
        self.cfg = cfg
        self.names: RefData | None = cfg.names
        self.sub = sub if sub is not None else Subscriber.from_config(cfg)
        self.local = local
        self.clock = clock
        self._desk = None
        self._desk_at = 0.0
        self._dirty: dict[int, set[int]] = {k: set() for k in
                                             (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT,
                                              ROW_SECTOR)}
        # Positions from the feed (version 4) unless the node sends none.
        self.feed_positions = bool(getattr(cfg, "feed_positions", True))
        self._reset = False
        self._feed_ns = {False: [0, 0], True: [0, 0]}  # by fund-level (instruments, sectors)
        self._epoch = 0
        self._meta: bytes = b""
        self._meta_at = 0.0

    def close(self) -> None:
        self.sub.close()
        if self._desk is not None:
            self._desk.close()
            self._desk = None

    # ---------------------------------------------------------------- the node's desk
    def desk(self):
        """The node's desk on this host, or None (not local, or not running)."""
        if not self.local:
            return None
        now = time.monotonic()
        if self._desk is None and now >= self._desk_at:
            from exposure.engine.desk import Desk

            self._desk_at = now + 3.0
            try:
                self._desk = Desk(self.cfg.name)
            except Exception as e:  # no segment (remote node, not started): feed only
                log.debug("no desk for node %s: %s", self.cfg.name, e)
        return self._desk

    def _reopen_desk(self) -> None:
        if self._desk is not None:
            self._desk.close()
            self._desk = None
        self._desk_at = 0.0

    # ---------------------------------------------------------------- the feed
    def pump(self) -> int:
        """Take what the feed has (no wait) and mark the rows that moved; returns how
        many changed."""
        n = 0
        for b in self.sub.poll_rows(0):
            n += self._mark(b)
        if self.sub.epoch != self._epoch:
            self._epoch = self.sub.epoch
            self._reset = True
            self._reopen_desk()  # a restarted node: its new segment
        return n

    def _mark(self, b: Rows) -> int:
        if b.rows is None:  # an epoch change dropped these rows: a full snapshot follows
            self._reset = True
            return len(b.ids)
        if b.kind == ROW_LIMITS:  # its account's row (the flags' limits) goes again
            ids = b.ids.tolist()
            self._dirty[ROW_ACCOUNT].update(ids)
            return len(ids)
        if b.kind == ROW_POSITION:  # its account moved (an open drill-down is refreshed)
            acc = b.rows["account"]
            self._dirty[ROW_ACCOUNT].update(acc[acc >= 0].tolist())
            return len(b.ids)
        ids = b.ids.tolist()
        self._dirty[b.kind].update(ids)
        stamps = b.rows["compute_ns"]
        stamps = stamps[stamps > 0]
        if len(stamps):
            lo, hi = int(stamps.min()), int(stamps.max())
            f = self._feed_ns[b.kind in (ROW_INSTRUMENT, ROW_SECTOR)]
            f[0] = lo if not f[0] else min(f[0], lo)
            f[1] = max(f[1], hi)
        return len(ids)

    # ---------------------------------------------------------------- what the page shows
    def meta(self) -> dict:
        """The node line: role, epoch, trading day, the feed's state and staleness."""
        sub = self.sub
        silent_for = sub.silent_for
        state = sub.state
        stale = []
        if silent_for > STALE_S:
            stale.append(f"nothing from the feed for {silent_for:.1f} s")
        if state != "live":
            stale.append("the feed has a gap it has not recovered yet" if state ==
                         "recovering" else "joining the feed")
        role, last_roll = "primary", None  # (only a primary sends on the feed)
        desk = self.desk()
        if desk is not None:
            try:
                from exposure.node.segments import read_control
                from exposure.shm.control import CTL_ROLE, ROLE_NAMES

                role = ROLE_NAMES.get(int(read_control(self.cfg)[CTL_ROLE]), role)
            except Exception:  # a consolidator has no control block; a node that stopped
                pass
            code = int(desk.counters()[C_ROLL_DATE])
            if code:
                from exposure.core.day import date_text

                last_roll = date_text(code)
        day = None
        if self.cfg.roll_schedule is not None:
            from exposure.core.day import date_text, trading_day

            day = date_text(trading_day(self.cfg.roll_schedule, self.clock()))
        return {"node": self.cfg.name, "role": role, "epoch": int(sub.epoch),
                "base_currency": sub.currencies.base,  # SPEC 7: every money figure's
                "trading_day": day, "last_roll": last_roll, "feed": state,
                "silent_s": round(silent_for, 2), "gaps": sub.counters["gaps"],
                "stale": bool(stale), "stale_why": "; ".join(stale),
                "positions": self.feed_positions or desk is not None, "limits": True,
                "time_ns": time.time_ns()}

    def stale(self) -> bool:
        """Whether the page should say stale now (the cheap test of :meth:`meta`)."""
        return self.sub.silent_for > STALE_S or self.sub.state != "live"

    def _meta_bytes(self, fresh: bool = False) -> bytes:
        now = time.monotonic()
        if fresh or not self._meta or now - self._meta_at >= 0.25:
            self._meta = orjson.dumps(self.meta())
            self._meta_at = now
        return self._meta

    def _fund(self) -> dict:
        f = self.sub.fund()
        return {k: f[k] for k in FUND_COLUMNS}

    def _account_rows(self, ids: np.ndarray) -> list[list]:
        t = self.sub.table(ROW_ACCOUNT)
        ids = ids[(ids < len(t))]
        ids = ids[t["kind"][ids] != 0]
        lim: list = [None] * len(ids)
        if len(ids):  # the feed's limits rows ([gross, net, margin, loss]; none: None)
            lt = self.sub.table(ROW_LIMITS)
            ok = ids < len(lt)
            have = np.zeros(len(ids), bool)
            have[ok] = lt["kind"][ids[ok]] != 0
            got = np.zeros((len(ids), 4))
            for j, k in enumerate(_LIMITS):
                got[have, j] = lt[k][ids[have]]
            lim = [g if h else None for g, h in zip(got.tolist(), have.tolist(), strict=True)]
        lookup = self.names.account_name if self.names is not None else None
        cols = {"account": ids.tolist(), "name": _named(ids, lookup), "limits": lim}
        for c in ACCOUNT_COLUMNS:
            if c not in cols:
                cols[c] = t[c][ids].tolist()
        return _rows_of([cols[c] for c in ACCOUNT_COLUMNS])

    def _instrument_rows(self, ids: np.ndarray) -> list[list]:
        t = self.sub.table(ROW_INSTRUMENT)
        ids = ids[(ids < len(t))]
        ids = ids[t["kind"][ids] != 0]
        r = t[ids]
        lookup = self.names.symbol if self.names is not None else None
        label = self.sub.currencies.label  # the instrument's own currency, by its code
        cols = {"instrument": ids.tolist(), "symbol": _named(ids, lookup),
                "crossing": (r["gross_mv"] - np.abs(r["net_mv"])).tolist(),
                "currency": [label(c) for c in r["currency"].tolist()]}
        for c in INSTRUMENT_COLUMNS:
            if c not in cols:
                cols[c] = r[c].tolist()
        return _rows_of([cols[c] for c in INSTRUMENT_COLUMNS])

    def _sector_rows(self, ids: np.ndarray) -> list[list]:
        t = self.sub.table(ROW_SECTOR)
        ids = ids[(ids < len(t))]
        ids = ids[t["kind"][ids] != 0]
        r = t[ids]
        cols = {"sector": ids.tolist()}
        for c in SECTOR_COLUMNS[1:]:
            cols[c] = r[c].tolist()
        return _rows_of([cols[c] for c in SECTOR_COLUMNS])

    def snapshot(self, user: User | None) -> bytes:
        """The whole book ``user`` may see (None: all), as JSON: what a client gets
        when it connects and after a new epoch."""
        acc = self.sub.present(ROW_ACCOUNT)
        if user is not None and user.accounts is not None:
            acc = acc[np.isin(acc, np.fromiter(user.accounts, np.int64,
                                               len(user.accounts)))]
        doc = {"type": "snapshot", "user": None if user is None else user.name,
               "scope": "all" if user is None or user.accounts is None else "accounts",
               "columns": columns(), "meta": self.meta(), "fund": self._fund(),
               "accounts": self._account_rows(acc),
               "instruments": self._instrument_rows(self.sub.present(ROW_INSTRUMENT)),
               "sectors": self._sector_rows(self.sub.present(ROW_SECTOR))}
        return orjson.dumps(doc)

    def positions(self, account: int, user: User | None) -> bytes:
        """The drill-down of ``account`` (JSON): its positions from the feed (or, for a
        node that sends none, from its desk where it is local), or why there are none (not
        an account this user may see: the server filters)."""
        out: dict = {"type": "positions", "account": account, "rows": None, "why": ""}
        if user is not None and not user.may_see(account):
            out["why"] = "not one of your accounts"
            return orjson.dumps(out)
        vals: dict[str, np.ndarray] = {}
        if self.feed_positions:
            p = self.sub.positions(account)
            # (a position row carries no price: mv and pnl from the instrument rows)
            vals["pnl"], vals["mv"] = self.sub.position_values(p)
        elif (desk := self.desk()) is None:
            out["why"] = ("this node sends no positions on its feed ([fanout] positions = "
                          "false): run exposure web on the node's host")
            p = None
        else:
            p = desk.positions(account)
        if p is not None:
            ids = p["instrument"]
            lookup = self.names.symbol if self.names is not None else None
            cols = {"instrument": ids.tolist(), "symbol": _named(ids, lookup)}
            for c in POSITION_COLUMNS[2:]:
                cols[c] = (vals[c] if c in vals else p[c]).tolist()
            out["rows"] = _rows_of([cols[c] for c in POSITION_COLUMNS])
        return orjson.dumps(out)

    def _stamps(self, fund_level: bool) -> tuple[int, int]:
        """The oldest and newest compute stamps of the rows this tick sends (0: none)."""
        a = self._feed_ns[False]
        f = self._feed_ns[True] if fund_level else [0, 0]
        lo = min([x for x in (a[0], f[0]) if x], default=0)
        out = (lo, max(a[1], f[1]))
        self._feed_ns[False] = [0, 0]
        if fund_level:
            self._feed_ns[True] = [0, 0]
        return out

    def take(self, fresh_meta: bool = False, fund_level: bool = True) -> Tick:
        """What moved since the last call, as a :class:`Tick` (the conflation point);
        ``fresh_meta``: the node line read now (else at most 0.25 s old); ``fund_level``
        False: the instruments and sectors that moved wait for a later tick (the app sends
        those large fund-level tables less often than the accounts)."""
        d = self._dirty
        meta = self._meta_bytes(fresh_meta)
        reset, self._reset = self._reset, False
        feed_ns = self._stamps(fund_level or reset)
        if reset:
            for s in d.values():
                s.clear()
            return Tick(meta, b"", np.zeros(0, np.int64), [], reset=True)
        shared = b""
        if d[ROW_FUND]:
            shared += b',"fund":' + orjson.dumps(self._fund())
        if d[ROW_INSTRUMENT] and fund_level:
            ids = np.fromiter(sorted(d[ROW_INSTRUMENT]), np.int64)
            shared += b',"instruments":' + orjson.dumps(self._instrument_rows(ids))
        if d[ROW_SECTOR] and fund_level:
            ids = np.fromiter(sorted(d[ROW_SECTOR]), np.int64)
            shared += b',"sectors":' + orjson.dumps(self._sector_rows(ids))
        ids = np.fromiter(sorted(d[ROW_ACCOUNT]), np.int64)
        rows = self._account_rows(ids) if len(ids) else []
        moved = frozenset(d[ROW_ACCOUNT])
        for kind, s in d.items():
            if fund_level or kind in (ROW_ACCOUNT, ROW_FUND):
                s.clear()
        return Tick(meta, shared, np.array([r[0] for r in rows], np.int64), rows,
                    feed_ns=feed_ns, moved=moved)
