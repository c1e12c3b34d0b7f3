"""Start-of-day loads: the files a fund already has, as SPEC events.

Four kinds of CSV file, each with a header row (names are case-insensitive, cells and
names stripped of surrounding spaces, blank lines skipped, a UTF-8 byte-order mark allowed;
any other column is ignored):

=============  ===============================================  ===========================
kind           columns                                          events
=============  ===============================================  ===========================
instruments    symbol, instrument; multiplier, margin_rate,     ``instrument`` (a blank
               beta, sector, currency (at least one of these    cell is the SPEC default:
               five); name, security_id, ... as the FIX         1.0, 1.0, 1.0, 0, the base
               gateway's ``instruments.csv``                    currency)
limits         account or name (or both); gross, net, margin,   ``limit`` (all four; a
               loss (at least one; each >= 0)                   blank cell is 0 = no limit)
positions      account or name; instrument or symbol; qty       ``position`` (price only
               (an integer, ``abs(qty) <= 10**12``); price      where the cell is not
               (optional, > 0)                                  blank)
fx             currency (a code of ``[currencies]``, not the    ``fx`` (SPEC section 7)
               base), rate (> 0: the base-currency value of
               one unit)
=============  ===============================================  ===========================

A currency code (instruments' ``currency``, fx's ``currency``) is mapped to its id by a
:class:`~exposure.core.currency.Currencies` (a node's ``[currencies]``); a code it does
not name is a bad row. A name (account) or symbol (instrument) is resolved through a
:class:`RefData` (a node's ``[reference]`` files, or files given on the command line);
where a row gives both the id and the name, they must agree. Ids are checked against the
capacities (SPEC section 1, or a node's raised ones). A file may not set the same
account's limits, or the same (account, instrument) position, or the same currency's rate,
twice.

**All or nothing.** Every row is checked before anything is returned: a file with any bad
row raises :class:`LoadError`, which lists every bad row (file, line, column and value;
the first :data:`MAX_PROBLEMS`, and how many in all) and returns no event. A file that is
not a regular file, larger than :data:`~exposure.core.refdata.MAX_BYTES`, not UTF-8,
without the columns its kind needs, or with more rows than the capacity could hold
(accounts for limits, position cells for positions: a file that long has a duplicate or
an id beyond the capacity) is a :class:`LoadError` too. The reading and the checks
of each cell are :mod:`exposure.core.refdata`'s (the FIX gateway's and ``dump --names``'
reader of the same files).

:func:`load_events` picks the kind from the header (:func:`detect_kind`), so that a config
(``[day] load_after_roll``) can list files without saying what they are.

No numba, no sockets, no I/O beyond reading the file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from exposure.core.capacity import Capacities
from exposure.core.currency import Currencies
from exposure.core.refdata import RefData, RefDataError, RowErrors
from exposure.core.refdata import float_cell as _float
from exposure.core.refdata import int_cell as _int
from exposure.core.refdata import name_cell as _name
from exposure.core.refdata import read_instruments as _read_instruments
from exposure.core.refdata import read_rows as _rows

__all__ = ["KINDS", "MAX_PROBLEMS", "MAX_QTY", "Load", "LoadError", "detect_kind",
           "instrument_events", "limit_events", "position_events", "fx_events",
           "load_events", "read_load"]

log = logging.getLogger(__name__)

KINDS = ("instruments", "limits", "positions", "fx")
MAX_PROBLEMS = 100          # bad rows listed in one LoadError (all are counted)
MAX_QTY = 10**12            # SPEC: abs(qty) of a position
_LIMITS = ("gross", "net", "margin", "loss")
_REF = ("multiplier", "margin_rate", "beta", "sector", "currency")
_HEAD_BYTES = 65536         # what detect_kind reads to find the header
_QTY = re.compile(r"-?[0-9]{1,13}")


class LoadError(ValueError):
    """A file that cannot be loaded, with every bad row: ``problems`` is a list of (line,
    message) pairs (line 0: the file as a whole), ``count`` how many in all."""

    def __init__(self, path: str | Path, problems: list[tuple[int, str]],
                 count: int | None = None) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        self.count = len(self.problems) if count is None else count
        head = (f"{str(self.path)!r}: {self.count} bad row{'s' if self.count != 1 else ''}; "
                f"nothing from this file is loaded")
        if self.count == 1 and self.problems and self.problems[0][0] == 0:
            head = f"{str(self.path)!r}: cannot be loaded"
        more = self.count - len(self.problems)
        super().__init__("\n  ".join([head] + [m for _, m in self.problems]
                                     + ([f"... and {more} more"] if more > 0 else [])))

    @property
    def lines(self) -> list[int]:
        """The line numbers of the bad rows listed (0: the file as a whole)."""
        return [line for line, _ in self.problems]


@dataclass(frozen=True, slots=True)
class Load:
    """A checked file: its kind, its events in file order, and each event's line."""

    kind: str
    path: Path
    events: list[dict]
    lines: list[int]

    def line_of(self, index: int) -> int:
        """The file line of event ``index`` (0-based)."""
        return self.lines[index]


# ----------------------------------------------------------------------------- helpers
def _id_or_name(cells: dict[str, str], id_col: str, name_col: str, hi: int,
                lookup: dict[str, int] | None, what: str, ref: str, where: str) -> int:
    """The id of a row from its ``id_col`` cell, its ``name_col`` cell resolved through
    ``lookup``, or both (which must agree)."""
    v_id, v_name = cells.get(id_col, ""), cells.get(name_col, "")
    if not v_id and not v_name:
        raise RefDataError(f"{where}: neither {id_col} nor {name_col} is given")
    x = _int(cells, id_col, 0, hi, where) if v_id else None
    if v_name:
        name = _name(cells, name_col, where)
        if lookup is None:
            if x is not None:
                return x  # nothing to check the name against
            raise RefDataError(f"{where}: {name_col} {name!r} cannot be resolved: no {ref} "
                               f"file (a node's [reference] {ref}, or --{ref} FILE)")
        y = lookup.get(name)
        if y is None:
            raise RefDataError(f"{where}: {name_col} {name!r} is no {what} of the {ref} "
                               f"file")
        if x is not None and x != y:
            raise RefDataError(f"{where}: {name_col} {name!r} is {what} {y} in the {ref} "
                               f"file, not {x}")
        x = y
    assert x is not None
    return x


def _accounts_of(names: RefData | None) -> dict[str, int] | None:
    return names.account_ids if names is not None and names.accounts else None


def _instruments_of(names: RefData | None) -> dict[str, int] | None:
    return names.instrument_ids if names is not None and names.instruments else None


def _qty(cells: dict[str, str], where: str) -> int:
    v = cells.get("qty", "")
    if not _QTY.fullmatch(v):
        raise RefDataError(f"{where}: qty {v!r} is not an integer")
    q = int(v)
    if abs(q) > MAX_QTY:
        raise RefDataError(f"{where}: qty {v!r}: abs(qty) is at most 10**12")
    return q


def _header(path: Path) -> list[str]:
    """The column names of a file's first non-blank row (of its first 64 KiB)."""
    try:
        with open(path, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise LoadError(path, [(0, f"{str(path)!r}: not a regular file")])
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        raise LoadError(path, [(0, f"cannot read {str(path)!r}: {e.strerror or e}")]
                        ) from None
    text = head.decode("utf-8-sig", errors="replace")
    try:
        for row in csv.reader(io.StringIO(text, newline="")):
            if any(c.strip() for c in row):
                return [c.strip().lower() for c in row]
    except csv.Error:
        pass
    return []


def _fail(path: Path, errors: RowErrors) -> None:
    if errors:
        raise LoadError(path, errors.items, errors.count)


# ----------------------------------------------------------------------------- kinds
def _instruments(path: Path, caps: Capacities, ccy: Currencies | None) -> Load:
    errors, lines = RowErrors(MAX_PROBLEMS), []
    try:
        if not any(c in _header(path) for c in _REF):
            raise RefDataError(
                f"instruments file {str(path)!r}: the header names none of "
                f"{', '.join(_REF)} (a file of names alone would reset every "
                f"instrument's reference data to the SPEC defaults)")
        rows, cols = _read_instruments(path, caps, errors, lines, ccy)
    except RefDataError as e:
        raise LoadError(path, [(0, str(e))]) from None
    _fail(path, errors)
    events = RefData(rows, [], ref_columns=cols, currencies=ccy).instrument_events()
    return Load("instruments", path, events, lines)


def _limits(path: Path, names: RefData | None, caps: Capacities) -> Load:
    errors = RowErrors(MAX_PROBLEMS)
    events: list[dict] = []
    lines: list[int] = []
    seen: dict[int, int] = {}
    lookup = _accounts_of(names)
    try:
        for line, cells in _rows(path, "limits", (), one_of=(("account", "name"), _LIMITS),
                                 errors=errors, max_rows=caps.accounts):
            where = f"limits file {str(path)!r} line {line}"
            try:
                acc = _id_or_name(cells, "account", "name", caps.accounts, lookup,
                                  "account", "accounts", where)
                lim = {k: _float(cells, k, 0.0, lambda x: x >= 0, ">= 0", where)
                       for k in _LIMITS}
                if acc in seen:
                    raise RefDataError(f"{where}: account {acc} again (first on line "
                                       f"{seen[acc]})")
            except RefDataError as e:
                errors.add(line, str(e))
                continue
            seen[acc] = line
            events.append({"type": "limit", "account": acc, **lim})
            lines.append(line)
    except RefDataError as e:
        raise LoadError(path, [(0, str(e))]) from None
    _fail(path, errors)
    return Load("limits", path, events, lines)


def _positions(path: Path, names: RefData | None, caps: Capacities) -> Load:
    errors = RowErrors(MAX_PROBLEMS)
    events: list[dict] = []
    lines: list[int] = []
    seen: dict[tuple[int, int], int] = {}
    accs, insts = _accounts_of(names), _instruments_of(names)
    try:
        for line, cells in _rows(path, "positions", ("qty",),
                                 one_of=(("account", "name"), ("instrument", "symbol")),
                                 errors=errors, max_rows=caps.cells):
            where = f"positions file {str(path)!r} line {line}"
            try:
                acc = _id_or_name(cells, "account", "name", caps.accounts, accs, "account",
                                  "accounts", where)
                inst = _id_or_name(cells, "instrument", "symbol", caps.instruments, insts,
                                   "instrument", "instruments", where)
                qty = _qty(cells, where)
                price = (_float(cells, "price", 0.0, lambda x: x > 0, "> 0", where)
                         if cells.get("price", "") else None)
                if (acc, inst) in seen:
                    raise RefDataError(f"{where}: account {acc}, instrument {inst} again "
                                       f"(first on line {seen[(acc, inst)]})")
            except RefDataError as e:
                errors.add(line, str(e))
                continue
            seen[(acc, inst)] = line
            ev = {"type": "position", "account": acc, "instrument": inst, "qty": qty}
            if price is not None:
                ev["price"] = price
            events.append(ev)
            lines.append(line)
    except RefDataError as e:
        raise LoadError(path, [(0, str(e))]) from None
    _fail(path, errors)
    return Load("positions", path, events, lines)


def _fx(path: Path, ccy: Currencies | None) -> Load:
    ccy = ccy or Currencies()
    errors = RowErrors(MAX_PROBLEMS)
    events: list[dict] = []
    lines: list[int] = []
    seen: dict[int, int] = {}
    try:
        for line, cells in _rows(path, "fx", ("currency", "rate"), errors=errors,
                                 max_rows=256):
            where = f"fx file {str(path)!r} line {line}"
            try:
                code = cells["currency"]
                cid = ccy.id_of(code)
                if cid is None:
                    raise RefDataError(f"{where}: currency {code!r} is not in the node's "
                                       f"[currencies] table ({ccy.describe()})")
                if cid == 0:
                    raise RefDataError(f"{where}: currency {code!r} is the base currency "
                                       f"(its rate is 1 by definition)")
                if cells["rate"] == "":
                    raise RefDataError(f"{where}: an empty rate")
                rate = _float(cells, "rate", 0.0, lambda x: x > 0, "> 0", where)
                if cid in seen:
                    raise RefDataError(f"{where}: currency {code} again (first on line "
                                       f"{seen[cid]})")
            except RefDataError as e:
                errors.add(line, str(e))
                continue
            seen[cid] = line
            events.append({"type": "fx", "currency": cid, "rate": rate})
            lines.append(line)
    except RefDataError as e:
        raise LoadError(path, [(0, str(e))]) from None
    _fail(path, errors)
    return Load("fx", path, events, lines)


# ----------------------------------------------------------------------------- public
def detect_kind(path: str | Path) -> str:
    """The kind of a load file by its header: ``positions`` when it has a ``qty`` column,
    else ``limits`` when it has any of gross, net, margin, loss, else ``instruments`` when
    it has symbol or instrument and any of multiplier, margin_rate, beta, sector,
    currency, else ``fx`` when it has currency and rate. :class:`LoadError` when the
    header says none of these."""
    path = Path(path)
    cols = _header(path)
    if "qty" in cols:
        return "positions"
    if any(c in cols for c in _LIMITS):
        return "limits"
    if any(c in cols for c in ("symbol", "instrument")) and any(c in cols for c in _REF):
        return "instruments"
    if "currency" in cols and "rate" in cols:
        return "fx"
    shown = ",".join(cols)[:200]
    raise LoadError(path, [(0, f"{str(path)!r}: cannot tell from its header ({shown!r}) "
                               f"whether it holds instruments (symbol, instrument, "
                               f"multiplier, ...), limits (account or name, gross, net, "
                               f"margin, loss), positions (account or name, instrument "
                               f"or symbol, qty, price) or fx rates (currency, rate)")])


def read_load(path: str | Path, kind: str | None = None, names: RefData | None = None,
              caps: Capacities | None = None, currencies: Currencies | None = None) -> Load:
    """Check a whole file of ``kind`` (one of :data:`KINDS`; None: by its header) and
    return its events with their line numbers; :class:`LoadError` lists every bad row.
    ``currencies`` maps currency codes (default: ``names``' table, else the base, USD,
    alone)."""
    path = Path(path)
    caps = caps or Capacities()
    if kind is None:
        kind = detect_kind(path)
    if currencies is None and names is not None:
        currencies = names.currencies
    if kind == "instruments":
        load = _instruments(path, caps, currencies)
    elif kind == "limits":
        load = _limits(path, names, caps)
    elif kind == "positions":
        load = _positions(path, names, caps)
    elif kind == "fx":
        load = _fx(path, currencies)
    else:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    log.debug("%s: %d %s events", path, len(load.events), kind)
    return load


def load_events(path: str | Path, kind: str | None = None, names: RefData | None = None,
                caps: Capacities | None = None,
                currencies: Currencies | None = None) -> list[dict]:
    """The SPEC events of a load file of ``kind`` (None: told by its header, see
    :func:`detect_kind`), in file order; :class:`LoadError` (every bad row, nothing
    returned) when any row is bad. For the scheduled roll's ``[day] load_after_roll``."""
    return read_load(path, kind, names, caps, currencies).events


def instrument_events(path: str | Path, caps: Capacities | None = None,
                      currencies: Currencies | None = None) -> list[dict]:
    """``instrument`` events of an ``instruments.csv`` (symbol, instrument, multiplier,
    margin_rate, beta, sector, currency, name, ...: the FIX gateway's file)."""
    return read_load(path, "instruments", None, caps, currencies).events


def limit_events(path: str | Path, names: RefData | None = None,
                 caps: Capacities | None = None) -> list[dict]:
    """``limit`` events of a limits file (account or name; gross, net, margin, loss)."""
    return read_load(path, "limits", names, caps).events


def position_events(path: str | Path, names: RefData | None = None,
                    caps: Capacities | None = None) -> list[dict]:
    """``position`` events of a positions file (account or name, instrument or symbol, qty,
    price)."""
    return read_load(path, "positions", names, caps).events


def fx_events(path: str | Path, currencies: Currencies | None = None) -> list[dict]:
    """``fx`` events of a rates file (currency as a code of ``currencies``, rate > 0)."""
    return read_load(path, "fx", None, None, currencies).events
