"""Independent reference model of the exposure tally contract (test oracle).

Written from ``SPEC.md`` and the example scenarios only, without looking at the
implementation under test.  It favours obviously-correct code over speed: state is
kept in plain dicts keyed by ids, and every tally is computed from scratch, from the
per-cell state, the live orders and the reference data, when ``document()`` is called.

Public API:

* ``Model(accounts=4096, instruments=65536, sectors=256, sources=1024,
  orders=1_048_576, cells=1_048_576)`` -- capacities.
* ``Model.apply_line(line)`` / ``Model.apply_obj(obj)`` -- apply one event; return
  ``None`` (accepted), ``"late_fill"`` (accepted as a late fill), a reject reason, or
  ``"skip"`` for a blank line (``apply_line`` only; nothing is changed or counted).
* ``Model.document()`` -- the SPEC section-4 tally document.
* ``run_lines(lines, **caps)`` -- ``(document, per-line results without "skip")``.
"""

import json
import math

MAX_QTY = 10**12
ORDER_ID_END = 2**63
SIDES = {"buy": 1, "sell": -1, "short": -1}
TYPES = ("instrument", "limit", "position", "mark", "new", "replace", "cancel", "done", "fill",
         "bust", "roll", "fx")
CURRENCIES = 256  # SPEC section 7: 0 <= currency < 256, 0 the base currency

# Reject reasons.
BAD_TYPE = "bad_type"
BAD_FIELD = "bad_field"
OUT_OF_RANGE = "out_of_range"
DUPLICATE_ORDER = "duplicate_order"
UNKNOWN_ORDER = "unknown_order"
FILL_MISMATCH = "fill_mismatch"
CAPACITY = "capacity"
LATE_FILL = "late_fill"
SKIP = "skip"

# JSON's own whitespace characters (RFC 8259): a line made only of these is blank.
JSON_WHITESPACE = " \t\r\n"

_MISSING = object()


def _is_date(v) -> bool:
    """A roll's date: "YYYY-MM-DD" or the integer YYYYMMDD, a calendar date 1900..9999."""
    import datetime
    import re

    if type(v) is str:
        if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", v):
            return False
        y, m, d = int(v[:4]), int(v[5:7]), int(v[8:])
    elif type(v) is int:
        y, m, d = v // 10000, v // 100 % 100, v % 100
        if not 19000101 <= v <= 99991231:
            return False
    else:
        return False
    try:
        datetime.date(y, m, d)
    except ValueError:
        return False
    return y >= 1900


class _Reject(Exception):
    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def _parse_int(text):
    # Python refuses to convert integer literals longer than ~4300 digits. Any such
    # value is far outside every domain, so a stand-in of the same sign behaves the same.
    if len(text) > 4000:
        return -(10**4000) if text.startswith("-") else 10**4000
    return int(text)


def _int_field(obj, key, lo, hi=None, default=_MISSING):
    """An integer field: only a JSON integer (bool excluded), lo <= v (<= hi)."""
    if key not in obj:
        if default is _MISSING:
            raise _Reject(BAD_FIELD)
        return default
    v = obj[key]
    if type(v) is not int:
        raise _Reject(BAD_FIELD)
    if v < lo or (hi is not None and v > hi):
        raise _Reject(BAD_FIELD)
    return v


def _float_field(obj, key, rule=None, default=_MISSING):
    """A float field: any finite JSON number. rule: None, '>0' or '>=0'."""
    if key not in obj:
        if default is _MISSING:
            raise _Reject(BAD_FIELD)
        return default
    v = obj[key]
    if type(v) is not int and type(v) is not float:
        raise _Reject(BAD_FIELD)
    try:
        f = float(v)
    except OverflowError:  # an integer too big for a double: not a finite float
        raise _Reject(BAD_FIELD) from None
    if not math.isfinite(f):
        raise _Reject(BAD_FIELD)
    if rule == ">0" and not f > 0:
        raise _Reject(BAD_FIELD)
    if rule == ">=0" and not f >= 0:
        raise _Reject(BAD_FIELD)
    return f


def _id_field(obj, key, default=_MISSING):
    """An id: a non-negative JSON integer (the capacity check comes later)."""
    return _int_field(obj, key, 0, None, default)


def _qty_field(obj):
    return _int_field(obj, "qty", 1, MAX_QTY)


def _order_id_field(obj):
    return _int_field(obj, "order_id", 0, ORDER_ID_END - 1)


def _side_field(obj):
    if "side" not in obj:
        raise _Reject(BAD_FIELD)
    v = obj["side"]
    if type(v) is not str or v not in SIDES:
        raise _Reject(BAD_FIELD)
    return v


class Model:
    def __init__(
        self,
        accounts=4096,
        instruments=65536,
        sectors=256,
        sources=1024,
        orders=1_048_576,
        cells=1_048_576,
    ):
        self.cap_accounts = accounts
        self.cap_instruments = instruments
        self.cap_sectors = sectors
        self.cap_sources = sources
        self.cap_orders = orders
        self.cap_cells = cells

        # instrument -> {"multiplier", "margin_rate", "beta", "sector", "currency"}
        self.refdata = {}
        # currency -> its last fx rate (a currency never given one: 1.0)
        self.rates = {}
        # instrument -> last mark price
        self.marks = {}
        # instrument -> price of the most recent accepted fill/new/replace with price > 0
        self.last_order_price = {}
        # account -> {"gross", "net", "margin", "loss"} (0 = off)
        self.limits = {}
        # (account, instrument) -> {"pos", "sod_qty", "sod_price", "flow"}
        self.cells = {}
        # (source, order_id) -> {"account", "instrument", "side", "qty", "filled", "open",
        #                        "price"}; only live orders are kept
        self.orders = {}

        self.accepted = 0
        self.rejected = 0
        self.late_fills = 0
        self.busts = 0
        self.rolls = 0
        self.rejects = {}

    # ------------------------------------------------------------------ helpers

    def _instrument(self, i):
        rd = self.refdata.get(i)
        if rd is None:
            return {"multiplier": 1.0, "margin_rate": 1.0, "beta": 1.0, "sector": 0,
                    "currency": 0}
        return rd

    def rate(self, i):
        """The base-currency value of one unit of instrument i's currency (SPEC 7)."""
        return self.rates.get(self._instrument(i)["currency"], 1.0)

    def ref_price(self, i):
        if i in self.marks:
            return self.marks[i]
        return self.last_order_price.get(i, 0.0)

    def _note_price(self, i, price):
        if price > 0:
            self.last_order_price[i] = price

    def _check_range(self, value, cap):
        if value >= cap:
            raise _Reject(OUT_OF_RANGE)

    def _need_cell(self, a, i):
        if (a, i) not in self.cells and len(self.cells) >= self.cap_cells:
            raise _Reject(CAPACITY)

    def _cell(self, a, i):
        key = (a, i)
        if key not in self.cells:
            self.cells[key] = {"pos": 0, "sod_qty": 0, "sod_price": 0.0, "flow": 0.0}
        return self.cells[key]

    # ------------------------------------------------------------------ applying

    def apply_line(self, line):
        if line.strip(JSON_WHITESPACE) == "":
            return SKIP
        try:
            obj = json.loads(line, parse_int=_parse_int)
        except (ValueError, RecursionError):
            return self._count_reject(BAD_FIELD)
        return self.apply_obj(obj)

    def apply_obj(self, obj):
        try:
            result = self._apply(obj)
        except _Reject as r:
            return self._count_reject(r.reason)
        self.accepted += 1
        if result == LATE_FILL:
            self.late_fills += 1
        if obj["type"] == "bust":
            self.busts += 1
        elif obj["type"] == "roll":
            self.rolls += 1
        return result

    def _count_reject(self, reason):
        self.rejected += 1
        self.rejects[reason] = self.rejects.get(reason, 0) + 1
        return reason

    def _apply(self, obj):
        if not isinstance(obj, dict):
            raise _Reject(BAD_FIELD)
        t = obj.get("type", _MISSING)
        if type(t) is not str or t not in TYPES:
            raise _Reject(BAD_TYPE)
        return getattr(self, "_ev_" + t)(obj)

    # Each handler: all bad_field checks, then all out_of_range checks, then the
    # order-table checks, then capacity, and only then any change of state.

    def _ev_instrument(self, obj):
        i = _id_field(obj, "instrument")
        multiplier = _float_field(obj, "multiplier", ">0")
        margin_rate = _float_field(obj, "margin_rate", ">=0")
        beta = _float_field(obj, "beta")
        sector = _id_field(obj, "sector")
        currency = _id_field(obj, "currency", 0)
        self._check_range(i, self.cap_instruments)
        self._check_range(sector, self.cap_sectors)
        self._check_range(currency, CURRENCIES)
        self.refdata[i] = {
            "multiplier": multiplier,
            "margin_rate": margin_rate,
            "beta": beta,
            "sector": sector,
            "currency": currency,
        }
        return None

    # SPEC section 7.

    def _ev_fx(self, obj):
        currency = _int_field(obj, "currency", 1)  # 0 (the base) or negative: bad_field
        rate = _float_field(obj, "rate", ">0")
        self._check_range(currency, CURRENCIES)
        self.rates[currency] = rate
        return None

    def _ev_limit(self, obj):
        a = _id_field(obj, "account")
        values = {k: _float_field(obj, k, ">=0", 0.0) for k in ("gross", "net", "margin", "loss")}
        self._check_range(a, self.cap_accounts)
        self.limits[a] = values
        return None

    def _ev_position(self, obj):
        a = _id_field(obj, "account")
        i = _id_field(obj, "instrument")
        qty = _int_field(obj, "qty", -MAX_QTY, MAX_QTY)
        price = _float_field(obj, "price", ">0", None)
        self._check_range(a, self.cap_accounts)
        self._check_range(i, self.cap_instruments)
        self._need_cell(a, i)
        cell = self._cell(a, i)
        cell["pos"] = qty
        cell["sod_qty"] = qty
        cell["sod_price"] = price if price is not None else self.ref_price(i)
        cell["flow"] = 0.0
        return None

    def _ev_mark(self, obj):
        i = _id_field(obj, "instrument")
        price = _float_field(obj, "price", ">0")
        self._check_range(i, self.cap_instruments)
        self.marks[i] = price
        return None

    def _ev_new(self, obj):
        src = _id_field(obj, "source", 0)
        oid = _order_id_field(obj)
        a = _id_field(obj, "account")
        i = _id_field(obj, "instrument")
        side = _side_field(obj)
        qty = _qty_field(obj)
        price = _float_field(obj, "price", ">=0")
        self._check_range(src, self.cap_sources)
        self._check_range(a, self.cap_accounts)
        self._check_range(i, self.cap_instruments)
        key = (src, oid)
        if key in self.orders:
            raise _Reject(DUPLICATE_ORDER)
        if len(self.orders) >= self.cap_orders:
            raise _Reject(CAPACITY)
        self._need_cell(a, i)
        self._cell(a, i)
        self.orders[key] = {
            "account": a,
            "instrument": i,
            "side": side,
            "qty": qty,
            "filled": 0,
            "open": qty,
            "price": price,
        }
        self._note_price(i, price)
        return None

    def _ev_replace(self, obj):
        src = _id_field(obj, "source", 0)
        oid = _order_id_field(obj)
        qty = _qty_field(obj)
        price = _float_field(obj, "price", ">=0")
        self._check_range(src, self.cap_sources)
        key = (src, oid)
        order = self.orders.get(key)
        if order is None:
            raise _Reject(UNKNOWN_ORDER)
        order["qty"] = qty
        order["price"] = price
        order["open"] = max(qty - order["filled"], 0)
        self._note_price(order["instrument"], price)
        if order["open"] == 0:
            del self.orders[key]
        return None

    def _finish(self, obj):
        src = _id_field(obj, "source", 0)
        oid = _order_id_field(obj)
        self._check_range(src, self.cap_sources)
        key = (src, oid)
        if key not in self.orders:
            raise _Reject(UNKNOWN_ORDER)
        del self.orders[key]
        return None

    def _ev_cancel(self, obj):
        return self._finish(obj)

    def _ev_done(self, obj):
        return self._finish(obj)

    def _ev_fill(self, obj):
        src = _id_field(obj, "source", 0)
        oid = _order_id_field(obj)
        a = _id_field(obj, "account")
        i = _id_field(obj, "instrument")
        side = _side_field(obj)
        qty = _qty_field(obj)
        price = _float_field(obj, "price", ">0")
        self._check_range(src, self.cap_sources)
        self._check_range(a, self.cap_accounts)
        self._check_range(i, self.cap_instruments)
        key = (src, oid)
        order = self.orders.get(key)
        if order is not None:
            if order["account"] != a or order["instrument"] != i or order["side"] != side:
                raise _Reject(FILL_MISMATCH)
        else:
            self._need_cell(a, i)
        signed = SIDES[side] * qty
        cell = self._cell(a, i)
        cell["pos"] += signed
        cell["flow"] += signed * price
        self._note_price(i, price)
        if order is None:
            return LATE_FILL
        order["filled"] += qty
        order["open"] -= min(qty, order["open"])
        if order["open"] == 0:
            del self.orders[key]
        return None

    # SPEC section 6.

    def _ev_bust(self, obj):
        src = _id_field(obj, "source", 0)
        oid = _order_id_field(obj)
        a = _id_field(obj, "account")
        i = _id_field(obj, "instrument")
        side = _side_field(obj)
        qty = _qty_field(obj)
        price = _float_field(obj, "price", ">0")
        self._check_range(src, self.cap_sources)
        self._check_range(a, self.cap_accounts)
        self._check_range(i, self.cap_instruments)
        order = self.orders.get((src, oid))
        if order is not None:
            if order["account"] != a or order["instrument"] != i or order["side"] != side:
                raise _Reject(FILL_MISMATCH)
        else:
            self._need_cell(a, i)
        # The trade never happened: position and flow lose it; the order does not change
        # and the price is no hint.
        signed = SIDES[side] * qty
        cell = self._cell(a, i)
        cell["pos"] -= signed
        cell["flow"] -= signed * price
        return None

    def _ev_roll(self, obj):
        if "date" in obj and not _is_date(obj["date"]):  # the trading date it closes
            raise _Reject(BAD_FIELD)
        working = {(o["account"], o["instrument"]) for o in self.orders.values()}
        for key in list(self.cells):
            cell = self.cells[key]
            if cell["pos"] == 0 and key not in working:
                del self.cells[key]
                continue
            cell["sod_qty"] = cell["pos"]
            cell["sod_price"] = self.ref_price(key[1])
            cell["flow"] = 0.0
        return None

    # ------------------------------------------------------------------ tallies

    def document(self):
        # Open quantities per cell and live-order counts per account, from the live orders.
        open_buy = {}
        open_sell = {}
        live = {}
        for order in self.orders.values():
            ck = (order["account"], order["instrument"])
            if SIDES[order["side"]] > 0:
                open_buy[ck] = open_buy.get(ck, 0) + order["open"]
            else:
                open_sell[ck] = open_sell.get(ck, 0) + order["open"]
            live[order["account"]] = live.get(order["account"], 0) + 1

        def v(i):
            return self.ref_price(i) * self._instrument(i)["multiplier"] * self.rate(i)

        # Positions.
        positions = []
        cell_pnl = {}
        for a, i in sorted(self.cells):
            c = self.cells[(a, i)]
            mult = self._instrument(i)["multiplier"]
            pnl = mult * self.rate(i) * (
                c["pos"] * self.ref_price(i) - c["sod_qty"] * c["sod_price"] - c["flow"])
            cell_pnl[(a, i)] = pnl
            positions.append(
                {
                    "account": a,
                    "instrument": i,
                    "pos": c["pos"],
                    "open_buy": open_buy.get((a, i), 0),
                    "open_sell": open_sell.get((a, i), 0),
                    "pnl": pnl,
                }
            )

        # Group the cells by account and by instrument (lists of the other id).
        cells_of_account = {}
        cells_of_instrument = {}
        for a, i in self.cells:
            cells_of_account.setdefault(a, []).append(i)
            cells_of_instrument.setdefault(i, []).append(a)

        # Accounts.
        account_ids = sorted({a for (a, _i) in self.cells} | set(live))
        float_keys = (
            "long_mv",
            "short_mv",
            "gross",
            "net",
            "open_buy_mv",
            "open_sell_mv",
            "worst_gross",
            "margin",
            "beta_net",
            "pnl",
        )
        # Every sum is exact (math.fsum): the oracle states the SPEC's real-number value,
        # rounded once, whatever the order of the cells.
        accounts = []
        fund_terms = {k: [] for k in float_keys}
        for a in account_ids:
            row = {"account": a}
            terms = {k: [] for k in float_keys}
            for i in cells_of_account.get(a, ()):
                c = self.cells[(a, i)]
                pos = c["pos"]
                ob = open_buy.get((a, i), 0)
                os_ = open_sell.get((a, i), 0)
                vi = v(i)
                rd = self._instrument(i)
                terms["long_mv"].append(max(pos, 0) * vi)
                terms["short_mv"].append(max(-pos, 0) * vi)
                terms["open_buy_mv"].append(ob * vi)
                terms["open_sell_mv"].append(os_ * vi)
                terms["worst_gross"].append(max(abs(pos + ob), abs(pos - os_)) * vi)
                terms["margin"].append(abs(pos) * vi * rd["margin_rate"])
                terms["beta_net"].append(pos * vi * rd["beta"])
                terms["pnl"].append(cell_pnl[(a, i)])
            for k, ts in terms.items():
                row[k] = math.fsum(ts)
                fund_terms[k].extend(ts)
            row["gross"] = row["long_mv"] + row["short_mv"]
            row["net"] = row["long_mv"] - row["short_mv"]
            row["live_orders"] = live.get(a, 0)
            lim = self.limits.get(a, {"gross": 0.0, "net": 0.0, "margin": 0.0, "loss": 0.0})
            breach = 0
            if lim["gross"] > 0 and row["gross"] > lim["gross"]:
                breach |= 1
            if lim["net"] > 0 and abs(row["net"]) > lim["net"]:
                breach |= 2
            if lim["margin"] > 0 and row["margin"] > lim["margin"]:
                breach |= 4
            if lim["gross"] > 0 and row["worst_gross"] > lim["gross"]:
                breach |= 8
            if lim["loss"] > 0 and row["pnl"] < -lim["loss"]:
                breach |= 16
            row["breach"] = breach
            accounts.append(row)

        # Instruments.
        instrument_ids = sorted(
            {i for (_a, i) in self.cells} | set(self.marks) | set(self.last_order_price)
        )
        instruments = []
        fund_pos = {}
        for i in instrument_ids:
            holders = cells_of_instrument.get(i, ())
            fp = sum(self.cells[(a, i)]["pos"] for a in holders)
            fund_pos[i] = fp
            instruments.append(
                {
                    "instrument": i,
                    "ref_price": self.ref_price(i),
                    "fund_pos": fp,
                    "open_buy": sum(open_buy.get((a, i), 0) for a in holders),
                    "open_sell": sum(open_sell.get((a, i), 0) for a in holders),
                }
            )

        # Fund.
        fund = {}
        for k in ("long_mv", "short_mv", "open_buy_mv", "open_sell_mv", "worst_gross",
                  "margin", "beta_net", "pnl"):
            fund[k] = math.fsum(fund_terms[k])
        fund["gross"] = fund["long_mv"] + fund["short_mv"]
        fund["net"] = fund["long_mv"] - fund["short_mv"]
        fund["live_orders"] = sum(row["live_orders"] for row in accounts)
        fund["net_long_mv"] = math.fsum(max(fp, 0) * v(i) for i, fp in fund_pos.items())
        fund["net_short_mv"] = math.fsum(max(-fp, 0) * v(i) for i, fp in fund_pos.items())
        fund["crossing"] = fund["gross"] - (fund["net_long_mv"] + fund["net_short_mv"])
        fund_order = (
            "long_mv",
            "short_mv",
            "gross",
            "net",
            "open_buy_mv",
            "open_sell_mv",
            "worst_gross",
            "margin",
            "beta_net",
            "pnl",
            "live_orders",
            "net_long_mv",
            "net_short_mv",
            "crossing",
        )
        fund = {k: fund[k] for k in fund_order}

        # Sectors (each instrument's current sector).
        sector_ids = sorted({self._instrument(i)["sector"] for i in instrument_ids})
        sectors = []
        for s in sector_ids:
            net_mv = math.fsum(
                fp * v(i) for i, fp in fund_pos.items() if self._instrument(i)["sector"] == s
            )
            gross_mv = math.fsum(
                abs(self.cells[(a, i)]["pos"]) * v(i)
                for i in instrument_ids
                if self._instrument(i)["sector"] == s
                for a in cells_of_instrument.get(i, ())
            )
            sectors.append({"sector": s, "net_mv": net_mv, "gross_mv": gross_mv})

        return {
            "accounts": accounts,
            "fund": fund,
            "instruments": instruments,
            "sectors": sectors,
            "positions": positions,
            "counts": {
                "accepted": self.accepted,
                "rejected": self.rejected,
                "late_fills": self.late_fills,
                "busts": self.busts,
                "rolls": self.rolls,
                "rejects": {k: n for k, n in self.rejects.items() if n},
            },
        }


def run_lines(lines, **caps):
    """Apply every line to a fresh Model; return (document, results without "skip")."""
    model = Model(**caps)
    results = []
    for line in lines:
        r = model.apply_line(line)
        if r != SKIP:
            results.append(r)
    return model.document(), results
