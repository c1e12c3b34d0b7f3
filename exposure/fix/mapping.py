"""FIX ExecutionReports (35=8) to SPEC events (docs/fix.md, "Mapping ExecutionReports").

One :class:`Mapper` per FIX session (one SPEC ``source``). :meth:`Mapper.map` takes one
message (anything with ``get(tag) -> str | None``: the codec's ``FixMessage``) and returns
a :class:`MapResult`: the SPEC events (JSON form, what ``Producer.send`` takes), or a
count of a message that maps to nothing (``counted``), or the reason it cannot be mapped
(``dead``: it goes to the dead-letter file, :mod:`exposure.fix.deadletter`).

By ExecType (150):

====================  ===========================================================
0                     ``new`` (OrderQty 38, Price 44 or 0)
5, D                  ``replace`` (OrderQty 38 is the new total, Price 44 or 0)
4                     ``cancel``
C, 3, 8               ``done``
F (and 1, 2)          ``fill`` (LastQty 32, LastPx 31)
H                     ``bust`` of the trade named by ExecRefID 19, with its fields
G                     ``bust`` of ExecRefID's trade, then ``fill`` of LastQty/LastPx
A 6 E I 7 9 B J K L   nothing, counted (pending new/cancel/replace, order status, ...)
====================  ===========================================================

FIX.4.2's ExecTransType (20): 0 new (by ExecType as above), 1 cancel (a bust of ExecRefID's
trade), 2 correct (bust and fill), 3 status (counted). Side (54): 1 and 3 buy, 2 and 4 sell,
5 and 6 short. Account (1) through ``accounts.csv``; SecurityID (48) with SecurityIDSource
(22), else Symbol (55), through ``instruments.csv``. Currency (15), where a new, fill, bust
or correction has it, must be its instrument's currency code (``instruments.csv``'s
``currency``; a blank cell or no column: the base currency, SPEC section 7), else the
report is a dead letter (``currency_mismatch``): its prices would be valued in the wrong
currency.

**The order key**: each source's orders get order_ids 1, 2, 3, ... in the order they are
first seen. ``order_key="clordid"`` keys an order by ClOrdID (11) and follows OrigClOrdID
(41) through replaces and cancels (the new ClOrdID is linked to the same order_id); its
OrderID (37, unless "NONE") is linked too, so a report that carries only OrderID finds it.
``order_key="orderid"`` keys by OrderID (ClOrdID where OrderID is absent or "NONE").
Keys stay after an order finishes: a late fill finds its order (the kernel applies it as
a late fill). A ``new`` whose key names a finished order starts a new order_id (a key
used again).

**ExecID (17)** is deduplicated: a report whose ExecID was passed on before maps to
nothing (counted ``duplicate_exec_id``). The trades passed on are kept (ExecID -> order,
account, instrument, side, qty, price), so a bust or correction carries the original
trade's fields; a corrected trade is kept under the correction's ExecID.

**Determinism**: :meth:`Mapper.map` is a function of the sequence of messages mapped (no
clock, no randomness, no I/O), so a gateway rebuilds it by mapping its journal again; a
message that comes out dead leaves the state untouched. :meth:`Mapper.snapshot` and
:meth:`Mapper.restore` checkpoint it (versioned, checksummed).

**Bounds**: at most ``max_orders`` orders (the oldest finished evicted first, then the
oldest), ``max_trades`` trades and ``max_reports`` other ExecIDs (the oldest evicted
first); every eviction is counted. A bust of an evicted trade is a dead letter (unknown
ExecRefID); a late report of an evicted order is mapped as one never seen.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from collections.abc import Iterable
from typing import NamedTuple, Protocol

import numpy as np
import orjson

from exposure.core.refdata import RefData
from exposure.core.types import (
    EVENT_DTYPE,
    SIDE_BUY,
    SIDE_SELL,
    SIDE_SHORT,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_NEW,
    T_REPLACE,
)

__all__ = ["Mapper", "MapResult", "MapperStateError", "FixFields", "ORDER_KEYS",
           "BEGIN_STRINGS", "COUNTED_EXEC_TYPES", "SNAPSHOT_VERSION", "MAX_QTY"]

ORDER_KEYS = ("clordid", "orderid")
BEGIN_STRINGS = ("FIX.4.2", "FIX.4.4", "FIXT.1.1")
MAX_QTY = 10**12              # SPEC section 1: 1 <= qty <= 10**12 in order messages
MAX_ORDER_ID = 2**63 - 1
SNAPSHOT_VERSION = 2           # (restore reads version 1 too)
_MAGIC = b"EXPOSURE-FIXMAP\n"
_HEAD = struct.Struct("<16sIIQ")  # magic, version, crc32 of the body, body length

# ExecType (150) -> what it maps to.
_E_NEW, _E_REPLACE, _E_CANCEL, _E_DONE, _E_FILL, _E_BUST, _E_CORRECT = range(7)
_EXEC_TYPES = {"0": _E_NEW, "5": _E_REPLACE, "D": _E_REPLACE, "4": _E_CANCEL,
               "C": _E_DONE, "3": _E_DONE, "8": _E_DONE, "F": _E_FILL, "1": _E_FILL,
               "2": _E_FILL, "H": _E_BUST, "G": _E_CORRECT}
# ExecTypes that map to nothing and are counted, by name.
COUNTED_EXEC_TYPES = {"A": "pending_new", "6": "pending_cancel", "E": "pending_replace",
                      "I": "order_status", "7": "stopped", "9": "suspended",
                      "B": "calculated", "J": "trade_in_clearing_hold",
                      "K": "trade_released_to_clearing", "L": "triggered"}
_SIDES = {"1": "buy", "2": "sell", "3": "buy", "4": "sell", "5": "short", "6": "short"}
# OrdStatus (39) values after which the order is finished (filled, done for day,
# cancelled, rejected, expired): for eviction (finished orders go first) only.
_FINISHED_STATUS = frozenset(("2", "3", "4", "8", "C"))
_QTY_RE = re.compile(r"[0-9]{1,20}(?:\.0*)?")
_DEC_RE = re.compile(r"[0-9]{1,20}\.[0-9]*")
_PRICE_RE = re.compile(r"-?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})")
_MAX_VALUE = 256              # characters of a key, ExecID, account or symbol looked up


_KIND_NAMES = {1: "replace", 2: "cancel", 3: "done"}   # exposure.fix.fast's K_*
_SIDE_OF_CODE = (None, "buy", "sell", "short")
_SIDE_CODE = {None: 0, "buy": SIDE_BUY, "sell": SIDE_SELL, "short": SIDE_SHORT}
# (map_batch's columns: exposure.fix.fast.COL of 17, 37, 11, 41)
_KEY_COLS = [7, 6, 11, 12]
# kernel kind -> the event's type code
_TYPE_OF_KIND = np.array([T_NEW, T_REPLACE, T_CANCEL, T_DONE, T_FILL], np.uint8)


def _records(rows, oids, accts, insts, sides, kind, qty, price, source: int) -> np.ndarray:
    """The fast path's events as records (the same bytes as ``record_values`` of the
    event dicts :meth:`Mapper.map` returns)."""
    idx = np.array(rows, np.int64)
    out = np.zeros(len(rows), EVENT_DTYPE)
    k = kind[idx]
    out["type"] = _TYPE_OF_KIND[k]
    out["source"] = source
    out["order_id"] = oids
    out["account"] = accts
    out["instrument"] = insts
    out["side"] = sides
    has_qty = k != 2
    has_qty &= k != 3
    out["qty"] = np.where(has_qty, qty[idx], 0)
    out["price"] = np.where(has_qty, price[idx], 0.0)
    return out


def _dict_records(events: list[dict]) -> np.ndarray:
    from exposure.engine.parse import RECORD, record_values

    buf = bytearray(RECORD.size * len(events))
    for k, e in enumerate(events):
        RECORD.pack_into(buf, k * RECORD.size, *record_values(e))
    return np.frombuffer(buf, EVENT_DTYPE).copy()


class FixFields(Protocol):
    """What :meth:`Mapper.map` reads: the first value of a tag, or None."""

    def get(self, tag: int) -> str | None: ...


class MapperStateError(ValueError):
    """A snapshot that cannot be restored (corrupt, another version, another source)."""


class MapResult(NamedTuple):
    """What one message maps to: ``events`` (SPEC JSON-form dicts, in order), else
    ``counted`` (the name of a message that maps to nothing on purpose), else ``dead``
    (why it cannot be mapped, for the dead-letter file; ``dead_kind`` is its short name
    for counters: ``unknown_account``, ``unknown_instrument``, ``unknown_exec_ref``,
    ``bad_field``, ``missing_field``, ``unsupported``, ``currency_mismatch``)."""

    events: list[dict] = []   # (never mutated: a result with no events shares it)
    counted: str | None = None
    dead: str | None = None
    dead_kind: str | None = None

    def __repr__(self) -> str:
        if self.dead is not None:
            return f"MapResult(dead={self.dead!r})"
        if self.counted is not None:
            return f"MapResult(counted={self.counted!r})"
        return f"MapResult(events={self.events!r})"


_result = tuple.__new__   # _result(MapResult, (events, None, None, None)): no Python call


class _Dead(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _show(v: str) -> str:
    return repr(v if len(v) <= 64 else v[:64] + "...")


def _qty(m: FixFields, tag: int, name: str, zero_ok: bool = False) -> int:
    s = m.get(tag)
    if s is None:
        raise _Dead("missing_field", f"missing {name} ({tag})")
    if s.isdigit() and s.isascii() and len(s) <= 20:
        q = int(s)
    elif _QTY_RE.fullmatch(s):
        q = int(s.split(".", 1)[0])
    elif _DEC_RE.fullmatch(s):
        raise _Dead("bad_field", f"{name} ({tag}) {_show(s)} is not a whole number")
    else:
        raise _Dead("bad_field", f"{name} ({tag}) {_show(s)} is not a quantity")
    if not (0 if zero_ok else 1) <= q <= MAX_QTY:
        raise _Dead("bad_field", f"{name} ({tag}) {_show(s)} is outside "
                                 f"{0 if zero_ok else 1}..{MAX_QTY}")
    return q


def _price(m: FixFields, tag: int, name: str, positive: bool) -> float:
    s = m.get(tag)
    if s is None:
        if positive:
            raise _Dead("missing_field", f"missing {name} ({tag})")
        return 0.0
    if not _PRICE_RE.fullmatch(s):
        raise _Dead("bad_field", f"{name} ({tag}) {_show(s)} is not a price")
    p = float(s)
    if not math.isfinite(p) or p < 0 or (positive and p == 0):
        raise _Dead("bad_field", f"{name} ({tag}) {_show(s)} must be "
                                 f"{'> 0' if positive else '>= 0'}")
    return p + 0.0  # -0.0 -> 0.0


def _finished(get) -> bool:
    """Whether the report says its order is finished (for eviction's order only):
    LeavesQty (151) 0, or where it is absent OrdStatus (39) filled, done for day,
    cancelled, rejected or expired."""
    lv = get(151)
    if lv is None:
        st = get(39)
        return st is not None and st in _FINISHED_STATUS
    return lv == "0" or (_QTY_RE.fullmatch(lv) is not None
                         and int(lv.split(".", 1)[0]) == 0)


class Mapper:
    """ExecutionReports of one FIX session to SPEC events of ``source``.

    ``refdata``: the names (:func:`exposure.core.refdata.load_refdata`); ``order_key``:
    ``"clordid"`` or ``"orderid"``; ``begin_string``: ``FIX.4.2`` (ExecTransType is read),
    ``FIX.4.4`` or ``FIXT.1.1``. ``max_orders``, ``max_trades``, ``max_reports``: the
    state's bounds (see the module's docstring). ``counts``: messages by outcome."""

    def __init__(self, refdata: RefData, *, source: int, order_key: str = "clordid",
                 begin_string: str = "FIX.4.4", max_orders: int = 1_048_576,
                 max_trades: int = 1_048_576, max_reports: int = 1_048_576):
        if not isinstance(source, int) or isinstance(source, bool) or \
                not 0 <= source < 2**16 - 1:
            raise ValueError(f"source = {source!r}: an integer 0..65534")
        if order_key not in ORDER_KEYS:
            raise ValueError(f"order_key = {order_key!r}: one of {', '.join(ORDER_KEYS)}")
        if begin_string not in BEGIN_STRINGS:
            raise ValueError(f"begin_string = {begin_string!r}: one of "
                             f"{', '.join(BEGIN_STRINGS)}")
        for k, v in (("max_orders", max_orders), ("max_trades", max_trades),
                     ("max_reports", max_reports)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 2**31:
                raise ValueError(f"{k} = {v!r}: 1..{2**31}")
        self.refdata = refdata
        self._account_of = refdata.account_ids.get
        self._instrument_of = refdata.instrument_ids.get
        self._secid_of = refdata.security_ids.get
        self._secids = bool(refdata.security_ids)
        # instrument -> its currency's code (Currency 15 is checked against it)
        self._ccy = {r.instrument: refdata.currencies.code(r.currency)
                     for r in refdata.instruments}
        self.source = source
        self.order_key = order_key
        self.begin_string = begin_string
        self.max_orders, self.max_trades, self.max_reports = max_orders, max_trades, \
            max_reports
        self._fix42 = begin_string == "FIX.4.2"
        self._by_orderid = order_key == "orderid"
        self._next_id = 1
        # key ("C"+ClOrdID or "O"+OrderID) -> order_id
        self._keys: dict[str, int] = {}
        # order_id -> (keys, opened, finished, account, instrument, side); creation order
        self._orders: dict[int, tuple] = {}
        self._done: dict[int, None] = {}       # finished order_ids, in the order finished
        # ExecID -> (order_id, account, instrument, side, qty, price, busted); oldest first
        self._trades: dict[str, tuple] = {}
        self._reports: dict[str, None] = {}    # other ExecIDs passed on, oldest first
        self.counts: dict[str, int] = {}
        # The common reports (fill, new, cancel, done, replace with every field plain and
        # every name known) take one inlined path; anything else, the general one. Both
        # give the same results (tests/test_fix_mapping.py holds them equal); False: the
        # general path only.
        self.fast_path = True
        self._tables = None           # the reference data's hash tables (map_batch)
        self._tables_of = None

    # ------------------------------------------------------------------ the mapping
    def map(self, msg: FixFields) -> MapResult:
        """The events of one ExecutionReport (see the module's docstring). Never raises for
        any content of ``msg``: what cannot be mapped comes back ``dead``."""
        counts = self.counts
        counts["messages"] = counts.get("messages", 0) + 1
        if self.fast_path:
            res = self._fast(msg.get)
            if res is not None:
                t = res.events[0]["type"]
                counts[t] = counts.get(t, 0) + 1
                return res
        try:
            res = self._map(msg)
        except _Dead as d:
            res = MapResult(dead=d.reason, dead_kind=d.kind)
            k = "dead_" + d.kind
            counts[k] = counts.get(k, 0) + 1
            return res
        if res.counted is not None:
            k = "counted_" + res.counted
            counts[k] = counts.get(k, 0) + 1
        else:
            for e in res.events:
                k = e["type"]
                counts[k] = counts.get(k, 0) + 1
        return res

    def _map(self, m: FixFields) -> MapResult:
        mt = m.get(35)
        if mt is not None and mt != "8":
            raise _Dead("unsupported", f"MsgType (35) {_show(mt)} is not an ExecutionReport")
        exec_id = m.get(17)
        if not exec_id:
            raise _Dead("missing_field", "missing ExecID (17)")
        if len(exec_id) > _MAX_VALUE:
            raise _Dead("bad_field", f"ExecID (17) is {len(exec_id)} characters long")
        if exec_id in self._trades or exec_id in self._reports:
            return MapResult(counted="duplicate_exec_id")
        et = m.get(150)
        if self._fix42:
            tt = m.get(20)
            if tt is not None and tt != "0":
                if tt == "1":
                    return self._bust(m, exec_id, correct=False, strict=False)
                if tt == "2":
                    return self._bust(m, exec_id, correct=True, strict=False)
                if tt == "3":
                    return MapResult(counted="status")
                raise _Dead("bad_field", f"ExecTransType (20) {_show(tt)} is not 0, 1, 2 "
                                         "or 3")
        if et is None:
            raise _Dead("missing_field", "missing ExecType (150)")
        kind = _EXEC_TYPES.get(et)
        if kind is None:
            name = COUNTED_EXEC_TYPES.get(et)
            if name is not None:
                return MapResult(counted=name)
            raise _Dead("unsupported", f"ExecType (150) {_show(et)} is not mapped")
        if kind == _E_FILL:
            return self._fill(m, exec_id)
        if kind == _E_NEW:
            return self._new(m, exec_id)
        if kind == _E_BUST:
            return self._bust(m, exec_id, correct=False, strict=True)
        if kind == _E_CORRECT:
            return self._bust(m, exec_id, correct=True, strict=True)
        return self._order_change(m, exec_id, kind)

    def _fast(self, get) -> MapResult | None:
        """The common reports, inlined; None for anything else (then :meth:`_map` decides,
        dead letters included). Changes state only where it returns a result."""
        et = get(150)
        kind = _EXEC_TYPES.get(et) if et is not None else None
        if kind is None or kind >= _E_BUST:
            return None
        mt = get(35)
        if mt is not None and mt != "8":
            return None
        if self._fix42:
            tt = get(20)
            if tt is not None and tt != "0":
                return None
        exec_id = get(17)
        if not exec_id or len(exec_id) > _MAX_VALUE or exec_id in self._trades or \
                exec_id in self._reports:
            return None
        # the order key (as _key)
        o37 = get(37)
        if o37 == "NONE" or o37 == "":
            o37 = None
        elif o37 is not None and len(o37) > _MAX_VALUE:
            return None
        orig = alias = None
        if self._by_orderid and o37 is not None:
            key = "O" + o37
        else:
            c = get(11)
            if not c:
                if o37 is None:
                    return None
                key = "O" + o37
            else:
                if len(c) > _MAX_VALUE:
                    return None
                key = "C" + c
                o = get(41)
                if o and o != c:
                    if len(o) > _MAX_VALUE:
                        return None
                    orig = "C" + o
                if o37 is not None and not self._by_orderid:
                    alias = "O" + o37
        keys = self._keys
        oid = keys.get(key)
        if oid is None and orig is not None:
            oid = keys.get(orig)
        if oid is None and alias is not None:
            oid = keys.get(alias)
        src = self.source
        if kind == _E_FILL or kind == _E_NEW:
            if kind == _E_FILL:
                if oid is None:
                    return None
                rec = self._orders[oid]
            else:
                rec = None
            s = get(1)
            if s is None:
                if rec is None or rec[3] < 0:
                    return None
                account = rec[3]
            else:
                account = self._account_of(s)
                if account is None:
                    return None
            instrument = None
            sym = get(55)
            sid = get(48) if self._secids or sym is None else None
            if sid is not None:
                s22 = get(22)
                if s22 is not None:
                    instrument = self._secid_of((s22, sid))
            if instrument is None:
                if sym is None:
                    if sid is not None or rec is None or rec[4] < 0:
                        return None
                    instrument = rec[4]
                else:
                    instrument = self._instrument_of(sym)
                    if instrument is None:
                        return None
            c15 = get(15)
            if c15 is not None and c15 != self._ccy.get(instrument):
                return None
            s = get(54)
            if s is None:
                if rec is None or rec[5] is None:
                    return None
                side = rec[5]
            else:
                side = _SIDES.get(s)
                if side is None:
                    return None
            q = get(32 if kind == _E_FILL else 38)
            if q is None or len(q) > 13 or not q.isdigit() or not q.isascii():
                return None
            qty = int(q)
            if not 1 <= qty <= MAX_QTY:
                return None
            p = get(31 if kind == _E_FILL else 44)
            if p is None:
                if kind == _E_FILL:
                    return None
                price = 0.0
            else:
                if len(p) > 30 or not p.isascii() or not p.replace(".", "", 1).isdigit():
                    return None
                price = float(p)
                if kind == _E_FILL and price <= 0:
                    return None
            # the state changes
            lv = get(151)
            if lv is None:
                st = get(39)
                fin = st is not None and st in _FINISHED_STATUS
            else:
                fin = lv == "0" or (lv[:1] == "0" and _finished(get))
            if kind == _E_FILL:
                if keys.get(key) != oid or (orig is not None and keys.get(orig) != oid) or \
                        (alias is not None and keys.get(alias) != oid):
                    rec = self._link(oid, rec, key, orig, alias)
                if fin and not rec[2]:
                    self._finish(oid, rec)
                trades = self._trades
                trades[exec_id] = (oid, account, instrument, side, qty, price, False)
                if len(trades) > self.max_trades:
                    del trades[next(iter(trades))]
                    self._bump("evicted_trades")
                return _result(MapResult, ([{"type": "fill", "source": src, "order_id": oid,
                                             "account": account, "instrument": instrument,
                                             "side": side, "qty": qty, "price": price}],
                                           None, None, None))
            oid = keys.get(key)
            if oid is None and alias is not None:
                oid = keys.get(alias)
            rec = self._orders.get(oid) if oid is not None else None
            if rec is None or rec[2]:
                oid, rec = self._open_order(key, None, alias)
            else:
                rec = self._link(oid, rec, key, alias)
            rec = self._opened(oid, rec, account, instrument, side)
            if fin:
                self._finish(oid, rec)
            self._remember_report(exec_id)
            return _result(MapResult, ([{"type": "new", "source": src, "order_id": oid,
                                         "account": account, "instrument": instrument,
                                         "side": side, "qty": qty, "price": price}],
                                       None, None, None))
        # replace, cancel, done
        if oid is None:
            return None
        rec = self._orders[oid]
        if not rec[1] or rec[2]:
            return None
        if kind == _E_REPLACE:
            q = get(38)
            if q is None or len(q) > 13 or not q.isdigit() or not q.isascii():
                return None
            qty = int(q)
            if not 1 <= qty <= MAX_QTY:
                return None
            p = get(44)
            if p is None:
                price = 0.0
            else:
                if len(p) > 30 or not p.isascii() or not p.replace(".", "", 1).isdigit():
                    return None
                price = float(p)
            rec = self._link(oid, rec, key, orig, alias)
            if _finished(get):
                self._finish(oid, rec)
            self._remember_report(exec_id)
            return MapResult([{"type": "replace", "source": src, "order_id": oid,
                               "qty": qty, "price": price}])
        rec = self._link(oid, rec, key, orig, alias)
        self._finish(oid, rec)
        self._remember_report(exec_id)
        return MapResult([{"type": "cancel" if kind == _E_CANCEL else "done", "source": src,
                           "order_id": oid}])

    # ------------------------------------------------------------------ lookups
    def _account(self, m: FixFields, fallback: int) -> int:
        s = m.get(1)
        if s is None:
            if fallback >= 0:
                return fallback
            raise _Dead("missing_field", "missing Account (1)")
        a = self._account_of(s)
        if a is None:
            raise _Dead("unknown_account", f"unknown Account (1) {_show(s)} (not in "
                                           "accounts.csv)")
        return a

    def _currency(self, m: FixFields, i: int) -> int:
        """``i``, when the message's Currency (15) is absent or instrument ``i``'s."""
        c = m.get(15)
        if c is not None:
            want = self._ccy.get(i)
            if c != want:
                raise _Dead("currency_mismatch",
                            f"Currency (15) {_show(c)} is not instrument {i}'s currency "
                            + (f"{want} (instruments.csv)" if want is not None
                               else "(the instrument is not in instruments.csv)"))
        return i

    def _instrument(self, m: FixFields, fallback: int) -> int:
        sid = m.get(48)
        if sid is not None:
            src = m.get(22)
            if src is not None:
                i = self._secid_of((src, sid))
                if i is not None:
                    return self._currency(m, i)
        sym = m.get(55)
        if sym is not None:
            i = self._instrument_of(sym)
            if i is not None:
                return self._currency(m, i)
        if sym is None and sid is None and fallback >= 0:
            return self._currency(m, fallback)
        what = []
        if sym is not None:
            what.append(f"Symbol (55) {_show(sym)}")
        if sid is not None:
            what.append(f"SecurityID (48) {_show(sid)} with SecurityIDSource (22) "
                        f"{_show(m.get(22) or '')}")
        if not what:
            raise _Dead("missing_field", "missing Symbol (55) and SecurityID (48)")
        raise _Dead("unknown_instrument", f"unknown instrument: {', '.join(what)} (not in "
                                          "instruments.csv)")

    def _side(self, m: FixFields, fallback: str | None) -> str:
        s = m.get(54)
        if s is None:
            if fallback is not None:
                return fallback
            raise _Dead("missing_field", "missing Side (54)")
        side = _SIDES.get(s)
        if side is None:
            raise _Dead("unsupported", f"Side (54) {_show(s)} is not buy (1, 3), sell (2, 4) "
                                       "or short (5, 6)")
        return side

    def _key(self, m: FixFields) -> tuple[str, str | None, str | None]:
        """(the order's key, the key it continues (OrigClOrdID) or None, an alias (its
        OrderID in clordid mode) or None)."""
        oid = m.get(37)
        if oid == "NONE" or oid == "":
            oid = None
        if self._by_orderid and oid is not None:
            if len(oid) > _MAX_VALUE:
                raise _Dead("bad_field", f"OrderID (37) is {len(oid)} characters long")
            return "O" + oid, None, None
        c = m.get(11)
        if c:
            if len(c) > _MAX_VALUE:
                raise _Dead("bad_field", f"ClOrdID (11) is {len(c)} characters long")
            o = m.get(41)
            orig = "C" + o if o and o != c and len(o) <= _MAX_VALUE else None
            alias = "O" + oid if oid is not None and len(oid) <= _MAX_VALUE and \
                not self._by_orderid else None
            return "C" + c, orig, alias
        if oid is not None:
            if len(oid) > _MAX_VALUE:
                raise _Dead("bad_field", f"OrderID (37) is {len(oid)} characters long")
            return "O" + oid, None, None
        raise _Dead("missing_field", "missing ClOrdID (11) and OrderID (37)"
                    if not self._by_orderid else "missing OrderID (37) and ClOrdID (11)")

    def _find(self, key: str, orig: str | None, alias: str | None) -> int | None:
        keys = self._keys
        oid = keys.get(key)
        if oid is None and orig is not None:
            oid = keys.get(orig)
        if oid is None and alias is not None:
            oid = keys.get(alias)
        return oid

    # ------------------------------------------------------------------ state changes
    def _link(self, oid: int, rec: tuple, *ks: str | None) -> tuple:
        """Point keys ``ks`` (None skipped) at order ``oid``; a key that named another order
        leaves that order's keys (each key is in exactly its order's). Returns the order's
        record (records are tuples, replaced when they change: no object the cyclic GC
        must keep visiting per order)."""
        keys = self._keys
        orders = self._orders
        added: list[str] = []
        for k in ks:
            if k is not None:
                old = keys.get(k)
                if old != oid:
                    if old is not None:
                        orec = orders.get(old)
                        if orec is not None:
                            orders[old] = (tuple(x for x in orec[0] if x != k), *orec[1:])
                    keys[k] = oid
                    added.append(k)
        if added:
            rec = (rec[0] + tuple(added), *rec[1:])
            orders[oid] = rec
        return rec

    def _open_order(self, key: str, orig: str | None, alias: str | None) -> tuple[int, tuple]:
        oid = self._next_id
        self._next_id = oid + 1 if oid < MAX_ORDER_ID else 1
        rec: tuple = ((), False, False, -1, -1, None)
        self._orders[oid] = rec
        rec = self._link(oid, rec, key, orig, alias)
        if len(self._orders) > self.max_orders:
            self._evict_order()
        return oid, rec

    def _finish(self, oid: int, rec: tuple) -> tuple:
        if not rec[2]:
            rec = (rec[0], rec[1], True, rec[3], rec[4], rec[5])
            self._orders[oid] = rec
            self._done[oid] = None
        return rec

    def _opened(self, oid: int, rec: tuple, account: int, instrument: int, side: str) -> tuple:
        rec = (rec[0], True, rec[2], account, instrument, side)
        self._orders[oid] = rec
        return rec

    def _evict_order(self) -> None:
        if self._done:
            oid = next(iter(self._done))
            del self._done[oid]
            self._bump("evicted_orders")
        else:
            oid = next(iter(self._orders))
            self._bump("evicted_live_orders")
        rec = self._orders.pop(oid)
        keys = self._keys
        for k in rec[0]:
            del keys[k]

    def _remember_report(self, exec_id: str) -> None:
        r = self._reports
        r[exec_id] = None
        if len(r) > self.max_reports:
            del r[next(iter(r))]
            self._bump("evicted_reports")

    def _remember_trade(self, exec_id: str, trade: tuple) -> None:
        t = self._trades
        t[exec_id] = trade
        if len(t) > self.max_trades:
            del t[next(iter(t))]
            self._bump("evicted_trades")

    def _bump(self, k: str) -> None:
        self.counts[k] = self.counts.get(k, 0) + 1

    # ------------------------------------------------------------------ by ExecType
    def _fill(self, m: FixFields, exec_id: str) -> MapResult:
        key, orig, alias = self._key(m)
        oid = self._find(key, orig, alias)
        rec = self._orders.get(oid) if oid is not None else None
        if rec is not None:
            account = self._account(m, rec[3])
            instrument = self._instrument(m, rec[4])
            side = self._side(m, rec[5])
        else:
            account = self._account(m, -1)
            instrument = self._instrument(m, -1)
            side = self._side(m, None)
        qty = _qty(m, 32, "LastQty")
        price = _price(m, 31, "LastPx", True)
        # nothing below can fail: the state changes
        if rec is None:
            oid, rec = self._open_order(key, orig, alias)
        else:
            rec = self._link(oid, rec, key, orig, alias)
        if _finished(m.get):
            self._finish(oid, rec)
        self._remember_trade(exec_id, (oid, account, instrument, side, qty, price, False))
        return MapResult([{"type": "fill", "source": self.source, "order_id": oid,
                           "account": account, "instrument": instrument, "side": side,
                           "qty": qty, "price": price}])

    def _new(self, m: FixFields, exec_id: str) -> MapResult:
        key, orig, alias = self._key(m)
        account = self._account(m, -1)
        instrument = self._instrument(m, -1)
        side = self._side(m, None)
        qty = _qty(m, 38, "OrderQty")
        price = _price(m, 44, "Price", False)
        oid = self._find(key, None, alias)
        rec = self._orders.get(oid) if oid is not None else None
        if rec is None or rec[2]:   # never seen, or a finished order's key used again
            oid, rec = self._open_order(key, None, alias)
        else:
            rec = self._link(oid, rec, key, alias)
        rec = self._opened(oid, rec, account, instrument, side)
        if _finished(m.get):
            self._finish(oid, rec)
        self._remember_report(exec_id)
        return MapResult([{"type": "new", "source": self.source, "order_id": oid,
                           "account": account, "instrument": instrument, "side": side,
                           "qty": qty, "price": price}])

    def _order_change(self, m: FixFields, exec_id: str, kind: int) -> MapResult:
        key, orig, alias = self._key(m)
        name = "replace" if kind == _E_REPLACE else "cancel" if kind == _E_CANCEL else "done"
        if kind == _E_REPLACE:
            qty = _qty(m, 38, "OrderQty")
            price = _price(m, 44, "Price", False)
        oid = self._find(key, orig, alias)
        rec = self._orders.get(oid) if oid is not None else None
        if rec is None or not rec[1]:
            return MapResult(counted=f"{name}_of_unseen_order")
        if rec[2]:
            return MapResult(counted=f"{name}_of_finished_order")
        rec = self._link(oid, rec, key, orig, alias)
        if kind != _E_REPLACE or _finished(m.get):
            self._finish(oid, rec)
        self._remember_report(exec_id)
        if kind == _E_REPLACE:
            return MapResult([{"type": "replace", "source": self.source, "order_id": oid,
                               "qty": qty, "price": price}])
        return MapResult([{"type": name, "source": self.source, "order_id": oid}])

    def _bust(self, m: FixFields, exec_id: str, correct: bool, strict: bool) -> MapResult:
        """A trade cancel (bust) or correct (bust, then the corrected fill) of the trade
        named by ExecRefID (19). ``strict``: ExecType H/G (the reference must be a trade);
        else FIX.4.2's ExecTransType cancel/correct, which may name another report."""
        ref = m.get(19)
        if not ref:
            raise _Dead("missing_field", "missing ExecRefID (19)")
        trade = self._trades.get(ref)
        if trade is None:
            if not strict and ref in self._reports:
                return MapResult(counted="correct_of_non_trade" if correct
                                 else "cancel_of_non_trade")
            raise _Dead("unknown_exec_ref", f"ExecRefID (19) {_show(ref)} names no trade "
                        f"passed on (never seen, or evicted: the last {self.max_trades:,} "
                        "trades are kept)")
        oid0, acc0, inst0, side0, qty0, price0, busted = trade
        if busted:
            raise _Dead("unknown_exec_ref", f"ExecRefID (19) {_show(ref)}: that trade was "
                                            "busted already")
        bust = {"type": "bust", "source": self.source, "order_id": oid0, "account": acc0,
                "instrument": inst0, "side": side0, "qty": qty0, "price": price0}
        if not correct:
            self._trades[ref] = (oid0, acc0, inst0, side0, qty0, price0, True)
            self._remember_report(exec_id)
            return MapResult([bust])
        qty = _qty(m, 32, "LastQty", zero_ok=True)
        if qty == 0:   # corrected to nothing: the bust alone
            self._trades[ref] = (oid0, acc0, inst0, side0, qty0, price0, True)
            self._remember_report(exec_id)
            return MapResult([bust])
        price = _price(m, 31, "LastPx", True)
        account = self._account(m, acc0)
        instrument = self._instrument(m, inst0)
        side = self._side(m, side0)
        try:
            key, orig, alias = self._key(m)
        except _Dead:
            key = None
        if key is None:
            oid = oid0
        else:
            oid = self._find(key, orig, alias)
            if oid is None or oid not in self._orders:
                oid = oid0
        self._trades[ref] = (oid0, acc0, inst0, side0, qty0, price0, True)
        self._remember_trade(exec_id, (oid, account, instrument, side, qty, price, False))
        return MapResult([bust, {"type": "fill", "source": self.source, "order_id": oid,
                                 "account": account, "instrument": instrument, "side": side,
                                 "qty": qty, "price": price}])

    # ------------------------------------------------------------------ state
    @property
    def sizes(self) -> dict[str, int]:
        """How much state is held: orders, order keys, trades, other ExecIDs."""
        return {"orders": len(self._orders), "keys": len(self._keys),
                "trades": len(self._trades), "reports": len(self._reports)}

    def snapshot(self) -> bytes:
        """The whole state as bytes (a header with magic, version, CRC-32 and length, then
        JSON), for :meth:`restore`."""
        # (version 2: the dicts as JSON objects, serialized by orjson alone, no Python
        # step per entry: a gateway's checkpoint of a million orders in tens of ms)
        body = orjson.dumps({
            "source": self.source, "order_key": self.order_key, "next_id": self._next_id,
            "orders": self._orders, "done": list(self._done), "trades": self._trades,
            "reports": list(self._reports), "counts": self.counts},
            option=orjson.OPT_NON_STR_KEYS)
        return _HEAD.pack(_MAGIC, SNAPSHOT_VERSION, zlib.crc32(body), len(body)) + body

    @classmethod
    def restore(cls, refdata: RefData, data: bytes, *, source: int | None = None,
                order_key: str | None = None, begin_string: str = "FIX.4.4",
                max_orders: int = 1_048_576, max_trades: int = 1_048_576,
                max_reports: int = 1_048_576) -> Mapper:
        """A mapper in the state :meth:`snapshot` saved. ``source`` and ``order_key``, when
        given, must be the snapshot's (:class:`MapperStateError` otherwise: the state
        belongs to another mapping); smaller bounds evict the oldest (counted)."""
        if len(data) < _HEAD.size:
            raise MapperStateError(f"mapper snapshot of {len(data)} bytes: too short")
        magic, version, crc, n = _HEAD.unpack_from(data)
        if magic != _MAGIC:
            raise MapperStateError("not a mapper snapshot (bad magic)")
        if version not in (1, SNAPSHOT_VERSION):
            raise MapperStateError(f"mapper snapshot version {version}: this build reads "
                                   f"1 and {SNAPSHOT_VERSION}")
        body = data[_HEAD.size:]
        if len(body) != n or zlib.crc32(body) != crc:
            raise MapperStateError("mapper snapshot corrupt (length or CRC-32)")
        try:
            d = orjson.loads(body)
            src, key = d["source"], d["order_key"]
            if source is not None and source != src:
                raise MapperStateError(f"mapper snapshot of source {src}, not {source}")
            if order_key is not None and order_key != key:
                raise MapperStateError(f"mapper snapshot keyed by {key}, not {order_key}")
            mp = cls(refdata, source=src, order_key=key, begin_string=begin_string,
                     max_orders=max_orders, max_trades=max_trades, max_reports=max_reports)
            mp._next_id = int(d["next_id"])
            orders = d["orders"]
            if version == 1:    # [[order_id, keys, ...]], [[ExecID, ...]]
                orders = ((oid, r) for oid, *r in orders)
                trades = ((k, t) for k, *t in d["trades"])
            else:               # {"order_id": [keys, ...]}, {ExecID: [...]}
                orders = ((int(oid), r) for oid, r in orders.items())
                trades = d["trades"].items()
            for oid, (ks, opened, fin, acc, inst, side) in orders:
                mp._orders[oid] = (tuple(ks), opened, fin, acc, inst, side)
                for k in ks:
                    mp._keys[k] = oid
            for oid in d["done"]:
                mp._done[oid] = None
            for k, t in trades:
                mp._trades[k] = tuple(t)
            mp._reports = dict.fromkeys(d["reports"])
            mp.counts = {str(k): int(v) for k, v in d["counts"].items()}
        except MapperStateError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise MapperStateError(f"mapper snapshot unreadable: {e!r}") from None
        while len(mp._orders) > mp.max_orders:
            mp._evict_order()
        while len(mp._trades) > mp.max_trades:
            del mp._trades[next(iter(mp._trades))]
            mp._bump("evicted_trades")
        while len(mp._reports) > mp.max_reports:
            del mp._reports[next(iter(mp._reports))]
            mp._bump("evicted_reports")
        return mp

    def map_batch(self, run, i0: int, i1: int, fallback=None
                  ) -> tuple[np.ndarray | None, list]:
        """:meth:`map` of messages ``i0..i1`` of a :class:`exposure.fix.fast.FixRun`, in
        order, with the same results and the same state as mapping each one: the common
        reports' fields come from a compiled kernel (:func:`exposure.fix.fast.map_fields`)
        and only the state changes run in Python; any other message goes to :meth:`map`.
        Returns (the events as EVENT_DTYPE records, or None when there are none;
        ``[(i, MapResult)]`` of the messages that went to :meth:`map`, in order: counted,
        dead, or events, which are in the records too). ``fallback(i) -> events``, when
        given, maps such a message instead (it must call :meth:`map` on it: the gateway's
        own accounting of dead letters) and the list comes back empty."""
        from exposure.fix.fast import K_FILL, K_NEW, K_REPLACE, RefTables, map_fields

        tables = self._tables
        if tables is None or self._tables_of is not self.refdata:
            tables = self._tables = RefTables(self.refdata)
            self._tables_of = self.refdata
        ok, kind, acct, inst, side, qty, price, fin = map_fields(
            run, i0, i1, self._fix42, self._secids, tables)
        buf, vo, vl = run.buf, run.vo, run.vl
        counts = self.counts
        counts.setdefault("messages", 0)
        keys, orders, trades, reports = self._keys, self._orders, self._trades, self._reports
        done = self._done
        max_orders, max_reports = self.max_orders, self.max_reports
        by_orderid = self._by_orderid
        src = self.source
        sides = _SIDE_OF_CODE
        chunks: list[np.ndarray] = []
        fallbacks: list = []
        rows: list[int] = []          # per event: the message's index in the kernel arrays
        r_oid: list[int] = []
        r_acct: list[int] = []
        r_inst: list[int] = []
        r_side: list[int] = []
        nfast = 0
        okl = ok.tolist()
        kl = kind.tolist()
        acct_l, inst_l, side_l, fin_l = acct.tolist(), inst.tolist(), side.tolist(), \
            fin.tolist()
        qty_l, price_l = qty.tolist(), price.tolist()
        # The messages' bytes decoded once: ASCII with "replace" turns each byte into one
        # character, so a value's slice of the text is its bytes' decode (offsets from
        # ``base``; an absent value's stays negative).
        base = int(run.starts[i0]) if i1 > i0 else 0
        text = buf[base:int(run.ends[i1 - 1]) if i1 > i0 else 0].decode("ascii", "replace")
        cols = (vo[i0:i1, _KEY_COLS] - base).tolist()
        lens = vl[i0:i1, _KEY_COLS].tolist()

        for r in range(i1 - i0):
            if okl[r]:
                res = None
                k = kl[r]
                o17, o37, o11, o41 = cols[r]
                l17, l37, l11, l41 = lens[r]
                exec_id = text[o17:o17 + l17]
                if exec_id in trades or exec_id in reports:
                    k = -1
                else:
                    o37 = text[o37:o37 + l37] if o37 >= 0 \
                        else None
                    if o37 == "NONE" or o37 == "":
                        o37 = None
                    orig = alias = None
                    if by_orderid and o37 is not None:
                        key = "O" + o37
                    else:
                        c = text[o11:o11 + l11] if o11 >= 0 \
                            else None
                        if not c:
                            key = "O" + o37 if o37 is not None else None
                        else:
                            key = "C" + c
                            o = text[o41:o41 + l41] if o41 >= 0 \
                                else None
                            if o and o != c:
                                orig = "C" + o
                            if o37 is not None and not by_orderid:
                                alias = "O" + o37
                    if key is None:
                        k = -1
                if k >= 0:
                    oid = kk = keys.get(key)   # (kk: what the key itself names)
                    if oid is None and orig is not None:
                        oid = keys.get(orig)
                    if oid is None and alias is not None:
                        oid = keys.get(alias)
                    if k == K_FILL or k == K_NEW:
                        rec = None
                        if k == K_FILL:
                            if oid is None:
                                k = -1
                            else:
                                rec = orders[oid]
                        if k >= 0:
                            account = acct_l[r]
                            if account < 0:
                                if rec is None or rec[3] < 0:
                                    k = -1
                                else:
                                    account = rec[3]
                            instrument = inst_l[r]
                            if instrument < 0:
                                if rec is None or rec[4] < 0:
                                    k = -1
                                else:
                                    instrument = rec[4]
                            sc = side_l[r]
                            if sc == 0:
                                if rec is None or rec[5] is None:
                                    k = -1
                                else:
                                    sd = rec[5]
                            else:
                                sd = sides[sc]
                        if k == K_FILL:
                            if kk != oid or (
                                    orig is not None and keys.get(orig) != oid) or \
                                    (alias is not None and keys.get(alias) != oid):
                                rec = self._link(oid, rec, key, orig, alias)
                            if fin_l[r] and not rec[2]:   # (_finish, inlined)
                                orders[oid] = (rec[0], rec[1], True, rec[3], rec[4], rec[5])
                                done[oid] = None
                            trades[exec_id] = (oid, account, instrument, sd, qty_l[r],
                                               price_l[r], False)
                            if len(trades) > self.max_trades:
                                del trades[next(iter(trades))]
                                self._bump("evicted_trades")
                            res = "fill"
                        elif k == K_NEW:
                            oid = kk
                            if oid is None and alias is not None:
                                oid = keys.get(alias)
                            if oid is None and self._next_id not in orders:
                                # an order never seen (the common case), inlined: what
                                # _open_order, _link, _opened, _finish and
                                # _remember_report do for it
                                oid = self._next_id
                                self._next_id = oid + 1 if oid < MAX_ORDER_ID else 1
                                keys[key] = oid
                                if alias is None:
                                    ks = (key,)
                                else:
                                    ks = (key, alias)
                                    keys[alias] = oid
                                orders[oid] = (ks, True, False, account, instrument, sd)
                                if len(orders) > max_orders:
                                    self._evict_order()
                                if fin_l[r]:
                                    orders[oid] = (ks, True, True, account, instrument, sd)
                                    done[oid] = None
                                reports[exec_id] = None
                                if len(reports) > max_reports:
                                    del reports[next(iter(reports))]
                                    self._bump("evicted_reports")
                            else:
                                rec = orders.get(oid) if oid is not None else None
                                if rec is None or rec[2]:
                                    oid, rec = self._open_order(key, None, alias)
                                else:
                                    rec = self._link(oid, rec, key, alias)
                                rec = self._opened(oid, rec, account, instrument, sd)
                                if fin_l[r]:
                                    self._finish(oid, rec)
                                self._remember_report(exec_id)
                            res = "new"
                    else:
                        rec = orders[oid] if oid is not None else None
                        if rec is None or not rec[1] or rec[2]:
                            k = -1
                        else:
                            rec = self._link(oid, rec, key, orig, alias)
                            if k != K_REPLACE or fin_l[r]:
                                self._finish(oid, rec)
                            self._remember_report(exec_id)
                            res = _KIND_NAMES[k]
                            account = instrument = sc = 0
                if res is not None:
                    counts[res] = counts.get(res, 0) + 1
                    nfast += 1
                    rows.append(r)
                    r_oid.append(oid)
                    if k == K_FILL or k == K_NEW:
                        r_acct.append(account)
                        r_inst.append(instrument)
                        r_side.append(_SIDE_CODE[sd])
                    else:
                        r_acct.append(0)
                        r_inst.append(0)
                        r_side.append(0)
                    continue
            # anything else: the general mapping, message by message
            if rows:
                chunks.append(_records(rows, r_oid, r_acct, r_inst, r_side, kind, qty,
                                       price, src))
                rows, r_oid, r_acct, r_inst, r_side = [], [], [], [], []
            counts["messages"] += nfast
            nfast = 0
            if fallback is not None:
                evs = fallback(i0 + r)
            else:
                res = self.map(run.message(i0 + r))
                fallbacks.append((i0 + r, res))
                evs = res.events
            if evs:
                chunks.append(_dict_records(evs))
        counts["messages"] += nfast
        if rows:
            chunks.append(_records(rows, r_oid, r_acct, r_inst, r_side, kind, qty, price,
                                   src))
        if not chunks:
            return None, fallbacks
        return (chunks[0] if len(chunks) == 1 else np.concatenate(chunks)), fallbacks

    def map_all(self, msgs: Iterable[FixFields]) -> list[MapResult]:
        """:meth:`map` of each message, in order."""
        return [self.map(m) for m in msgs]
