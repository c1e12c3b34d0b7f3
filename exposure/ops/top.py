"""``exposure top``: a live terminal dashboard of one node (rich).

Every second it redraws, from read-only sources only:

* the trading day in progress (``[day]``), the next roll and the last one (its date and
  gseq, from the tally's counters);
* the node line: role, epoch, events/s, the gseqs and the lags to the journal (and the
  backup), from the counters (:func:`exposure.ops.status.node_status` without its sampling);
* wire-to-wire p50/p99 over the last few seconds: a feed subscriber
  (:class:`exposure.feed.Subscriber`) takes every INCREMENTAL row and the client send time
  it carries (``send_ns``), against the time it arrived;
* the fund row (gross, net, crossing, ...), the accounts with the largest gross (breaches
  in red), the instruments with the largest crossing (gross_mv - |net_mv|: what PMs hold
  against each other in it) and the sectors, from the desk's published rows
  (:class:`exposure.engine.desk.Desk`: never waits for the node). Accounts and
  instruments show their names (account names, symbols) where the config's
  ``[reference]`` files name them, else their bare ids. Money figures are in the base
  currency (SPEC section 7), whose code (``[currencies] base``) every table's title
  names; an instrument row shows its own currency's code and rate (its ``ref price`` is
  in that currency).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from exposure.config.node import NodeConfig
from exposure.core.currency import Currencies
from exposure.core.refdata import RefData

__all__ = ["Top", "run", "account_table", "instrument_table", "account_label",
           "instrument_label"]

_BREACH = {1: "gross", 2: "net", 4: "margin", 8: "worst", 16: "loss"}


def _money(x: float) -> str:
    a = abs(x)
    for div, suf in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{x / div:,.2f}{suf}"
    return f"{x:,.0f}"


class Top:
    """One dashboard; :meth:`frame` builds one screen (a rich renderable)."""

    def __init__(self, cfg: NodeConfig, rows: int = 10):
        from exposure.engine.desk import Desk
        from exposure.feed.subscriber import Subscriber

        self.cfg = cfg
        self.rows = rows
        self.desk = Desk(cfg.name)
        self.sub = Subscriber.from_config(cfg)
        self.lat: deque[tuple[float, float]] = deque(maxlen=200_000)  # (arrived, us)
        self.prev: tuple[float, int] | None = None
        self.rate = 0.0

    def close(self) -> None:
        self.sub.close()
        self.desk.close()

    def pump(self, seconds: float) -> None:
        """Take the feed for ``seconds``: the wire-to-wire samples."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for ch in self.sub.poll(0.05):
                row = ch.row
                if row is None or ch.kind not in (1, 2) or not row["send_ns"]:
                    continue
                now = time.time_ns()
                self.lat.append((time.monotonic(), (now - int(row["send_ns"])) / 1e3))

    def _latency(self) -> tuple[float, float, int]:
        cut = time.monotonic() - 10.0
        while self.lat and self.lat[0][0] < cut:
            self.lat.popleft()
        if not self.lat:
            return 0.0, 0.0, 0
        us = np.fromiter((v for _, v in self.lat), float)
        return float(np.percentile(us, 50)), float(np.percentile(us, 99)), len(us)

    def day_line(self) -> str:
        """The trading day in progress (by the [day] schedule) and the last roll."""
        from exposure.core.day import clock_from_env, day_info
        from exposure.core.types import C_ROLL_DATE, C_ROLL_GSEQ, C_ROLLS

        ctr = self.desk.counters()
        d = day_info(self.cfg.roll_schedule, int(ctr[C_ROLL_DATE]), int(ctr[C_ROLL_GSEQ]),
                     int(ctr[C_ROLLS]), clock_from_env()())
        last = (f"last roll {d['last_roll_date'] or '(undated)'} (gseq "
                f"{d['last_roll_gseq']:,})" if d["last_roll_gseq"] else "no roll yet")
        if d["trading_day"]:
            return f"trading day {d['trading_day']}  next roll {d['next_roll']}  {last}"
        return f"trading day: no scheduled roll  {last}"

    def frame(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        from exposure.ops.status import lags, read_control, read_counters
        from exposure.shm.control import CTL_EPOCH, CTL_REPL_DUR, CTL_ROLE, ROLE_NAMES

        c = read_counters(self.cfg)
        ctl = read_control(self.cfg)
        now = time.monotonic()
        ev = c["compute_events_total"]
        if self.prev is not None and now > self.prev[0]:
            self.rate = (ev - self.prev[1]) / (now - self.prev[0])
        self.prev = (now, ev)
        computed, durable = c["compute_gseq"], c["journal_durable_gseq"]
        p50, p99, n = self._latency()
        head = Text()
        head.append(f"exposure top  node {self.cfg.name}  ", style="bold")
        head.append(f"{ROLE_NAMES.get(int(ctl[CTL_ROLE]), '?')}  epoch {int(ctl[CTL_EPOCH])}  ")
        head.append(f"events/s {self.rate:,.0f}  ", style="bold cyan")
        lag = lags(c, computed, durable,
                   int(ctl[CTL_REPL_DUR]) if self.cfg.replicated else None)
        head.append(f"gseq {computed:,}  journal lag {lag['journal_events']:,} "
                    f"({lag['journal_us']:,.0f} us)")
        if self.cfg.replicated:
            head.append(f"  backup lag {lag['replication_events']:,} "
                        f"({lag['replication_us']:,.0f} us)")
        head.append(f"\nwire to wire p50 {p50:,.0f} us  p99 {p99:,.0f} us  ({n:,} updates, "
                    f"10 s)  feed {self.sub.state}, gaps {self.sub.counters['gaps']}  "
                    f"restarts {c['restarts_total']}")
        head.append("\n" + self.day_line(), style="bold")
        fund = self.desk.fund()
        ccy = self.cfg.currencies
        ft = Table(title=f"fund ({ccy.base})", expand=True)
        for k in ("gross", "net", "long_mv", "short_mv", "crossing", "worst_gross", "margin",
                  "pnl", "live_orders"):
            ft.add_column(k, justify="right")
        ft.add_row(*[(f"{fund[k]:,}" if k == "live_orders" else _money(fund[k]))
                     for k in ("gross", "net", "long_mv", "short_mv", "crossing",
                               "worst_gross", "margin", "pnl", "live_orders")])
        at = account_table(self.desk.accounts(), self.rows, self.cfg.names, ccy)
        it = instrument_table(self.desk.instruments(), self.rows, self.cfg.names, ccy)
        sec = self.desk.sectors()
        st = Table(title=f"sectors ({ccy.base})", expand=True)
        for k in ("sector", "net mv", "gross mv"):
            st.add_column(k, justify="right")
        for r in sec[np.argsort(-np.abs(sec["gross_mv"]))][:self.rows]:
            st.add_row(str(r["sector"]), _money(r["net_mv"]), _money(r["gross_mv"]))
        return Group(head, ft, at, it, st)


def account_label(account: int, names: RefData | None) -> str:
    """An account as people read it: its name from ``accounts.csv``, else the bare id."""
    n = names.account_name(account) if names is not None else None
    return str(account) if n is None else n


def instrument_label(instrument: int, names: RefData | None) -> str:
    """An instrument as people read it: its symbol from ``instruments.csv``, else the id."""
    s = names.symbol(instrument) if names is not None else None
    return str(instrument) if s is None else s


def _ccy(names: RefData | None, ccy: Currencies | None) -> Currencies:
    return ccy or (names.currencies if names is not None else Currencies())


def account_table(acc: np.ndarray, rows: int, names: RefData | None = None,
                  ccy: Currencies | None = None):
    """The accounts with the largest gross (rows of ``Desk.accounts()``), breaches in red,
    each named where ``names`` knows it; the title names the base currency of ``ccy``
    (default: ``names``', else USD) (a rich Table)."""
    from rich.table import Table

    base = _ccy(names, ccy).base
    at = Table(title=f"accounts by gross (top {rows}, {base})", expand=True)
    for k in ("account", "gross", "net", "open buy", "open sell", "pnl", "breach"):
        at.add_column(k, justify="right")
    for r in acc[np.argsort(-acc["gross"])][:rows]:
        b = int(r["breach"])
        at.add_row(account_label(int(r["account"]), names), _money(r["gross"]),
                   _money(r["net"]), _money(r["open_buy_mv"]), _money(r["open_sell_mv"]),
                   _money(r["pnl"]), ",".join(v for k, v in _BREACH.items() if b & k) or "-",
                   style="bold red" if b else None)
    return at


def instrument_table(ins: np.ndarray, rows: int, names: RefData | None = None,
                     ccy: Currencies | None = None):
    """The instruments with the largest crossing (rows of ``Desk.instruments()``), each by
    its symbol where ``names`` knows it; the title names the base currency (the money
    columns'), each row its own currency's code and rate (``ref price`` is in it) (a rich
    Table)."""
    from rich.table import Table

    c = _ccy(names, ccy)
    cross = ins["gross_mv"] - np.abs(ins["net_mv"])
    it = Table(title=f"instruments by crossing ({c.base})", expand=True)
    for k in ("instrument", "crossing", "fund pos", "net mv", "gross mv", "ref price", "ccy",
              "rate"):
        it.add_column(k, justify="right")
    for k in np.argsort(-cross)[:rows]:
        r = ins[k]
        it.add_row(instrument_label(int(r["instrument"]), names), _money(cross[k]),
                   f"{int(r['fund_pos']):,}", _money(r["net_mv"]), _money(r["gross_mv"]),
                   f"{r['ref_price']:,.2f}", c.label(int(r["currency"])),
                   f"{float(r['rate']):.6g}")
    return it


def run(cfg: NodeConfig, seconds: float | None = None, rows: int = 10) -> int:
    """The dashboard until Ctrl-C (or ``seconds``)."""
    from rich.live import Live

    top = Top(cfg, rows)
    end = None if seconds is None else time.monotonic() + seconds
    try:
        with Live(top.frame(), refresh_per_second=2, screen=False) as live:
            while end is None or time.monotonic() < end:
                top.pump(1.0)
                live.update(top.frame())
    except KeyboardInterrupt:
        pass
    finally:
        top.close()
    return 0
