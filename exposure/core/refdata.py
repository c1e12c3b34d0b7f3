"""Reference data: the names of instruments and accounts (``instruments.csv``,
``accounts.csv``), for the FIX gateway's lookups and for people (``dump --names``,
``top``, ``watch``, desks). ``instruments.csv`` has a header row naming at least
``symbol`` and ``instrument``; optional columns: ``name`` (a description), ``multiplier``,
``margin_rate``, ``beta``, ``sector``, ``currency`` (the SPEC ``instrument`` event's
reference data, for a start-of-day load: :meth:`RefData.instrument_events`), and
``security_id`` with ``security_id_source`` (FIX SecurityID 48 and SecurityIDSource 22).
``currency`` is a code (``USD``, ``JPY``) that the node's ``[currencies]`` table maps to
its id (SPEC section 7; a blank cell is the base currency;
:class:`~exposure.core.currency.Currencies`). Any other column (a desk, ...) is kept as
text in the row's ``extra``, not rejected. ``accounts.csv`` has a header row naming at
least ``name`` and ``account``; other columns are kept the same way.

Every rule is checked when the file is read and a broken file is an error
(:class:`RefDataError`) naming the file, the line and the value: a missing column, a
non-integer or out-of-capacity id (SPEC section 1, or a config's raised capacities), a
duplicate symbol, account name, id or (security_id_source, security_id), a bad multiplier
(> 0), margin rate (>= 0), beta (finite) or sector, a currency code the table does not
name. Blank lines are skipped; cells and
header names are stripped of surrounding spaces; a UTF-8 byte-order mark is allowed. A
file must be a regular file of at most :data:`MAX_BYTES`.

The readers also serve the start-of-day loads (:mod:`exposure.core.loads`), which report
every bad row of a file rather than the first: given a :class:`RowErrors`, a row's problem
is recorded there (file, line, column and value in its message) and the row skipped, and
only a problem of the whole file (unreadable, no header, too large) raises.

No numba, no I/O beyond reading the two files.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from exposure.core.capacity import Capacities
from exposure.core.currency import Currencies

__all__ = ["RefData", "RefDataError", "Instrument", "Account", "load_refdata",
           "INSTRUMENT_COLUMNS", "ACCOUNT_COLUMNS", "MAX_ROWS", "MAX_BYTES", "RowErrors",
           "read_rows", "read_instruments", "int_cell", "float_cell", "name_cell"]

# Columns with a meaning here; any other column is kept as text in the row's ``extra``.
INSTRUMENT_COLUMNS = ("symbol", "instrument", "name", "multiplier", "margin_rate", "beta",
                      "sector", "currency", "security_id", "security_id_source")
ACCOUNT_COLUMNS = ("name", "account")
_REF_COLUMNS = ("multiplier", "margin_rate", "beta", "sector", "currency")
MAX_ROWS = 16_777_216   # rows of one file (the largest capacity the layouts allow)
MAX_BYTES = 1 << 30     # bytes of one file (16 M rows of ~60 bytes)
_MAX_CELL = 256         # characters of one cell (symbols, names, security ids)
_INT = re.compile(r"-?[0-9]{1,20}")


class RefDataError(ValueError):
    """A reference-data file that cannot be used; the message names the file, the line and
    the value."""


class RowErrors:
    """The bad rows of one file, collected instead of raised: ``(line, message)`` pairs,
    the first ``limit`` kept (``items``) and all of them counted (``count``)."""

    __slots__ = ("items", "count", "limit")

    def __init__(self, limit: int = 100) -> None:
        self.items: list[tuple[int, str]] = []
        self.count = 0
        self.limit = limit

    def add(self, line: int, message: str) -> None:
        self.count += 1
        if len(self.items) < self.limit:
            self.items.append((line, message))

    def __bool__(self) -> bool:
        return self.count > 0


def _read_text(path: Path, what: str) -> str:
    """The text of a regular file of at most MAX_BYTES (UTF-8, an optional BOM)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RefDataError(f"{what} file {str(path)!r}: not a regular file")
            if st.st_size > MAX_BYTES:
                raise RefDataError(f"{what} file {str(path)!r}: {st.st_size:,} bytes (at "
                                   f"most {MAX_BYTES:,})")
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise RefDataError(f"{what} file {str(path)!r}: more than {MAX_BYTES:,} bytes")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RefDataError(f"{what} file {str(path)!r} line {line}: not UTF-8 text (byte "
                           f"{data[e.start:e.start + 1]!r} at offset {e.start})") from None
    except OSError as e:
        raise RefDataError(f"cannot read {what} file {str(path)!r}: "
                           f"{e.strerror or e}") from e


@dataclass(frozen=True, slots=True)
class Instrument:
    """One row of ``instruments.csv``."""

    instrument: int
    symbol: str
    name: str = ""
    multiplier: float = 1.0
    margin_rate: float = 1.0
    beta: float = 1.0
    sector: int = 0
    currency: int = 0          # SPEC section 7: the id of the currency it is quoted in
    security_id: str = ""
    security_id_source: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, slots=True)
class Account:
    """One row of ``accounts.csv``."""

    account: int
    name: str
    extra: dict[str, str] = field(default_factory=dict, compare=False)


def _rows(path: Path, what: str, required: tuple[str, ...], *,
          one_of: tuple[tuple[str, ...], ...] = (), errors: RowErrors | None = None,
          max_rows: int = MAX_ROWS) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: stripped cell}) of each non-blank data row of ``path``. The
    header names every column of ``required`` and at least one of each group of ``one_of``.
    With ``errors``, a row of the wrong length or with too long a cell is recorded there
    and skipped. More than ``max_rows`` rows is an error of the file."""
    text = _read_text(path, what)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        while header is not None and not any(c.strip() for c in header):
            header = next(reader, None)
        if header is None:
            raise RefDataError(f"{what} file {str(path)!r}: empty (a header row naming "
                               f"{', '.join(required)} is required)")
        cols = [c.strip().lower() for c in header]
        where = f"{what} file {str(path)!r} line {reader.line_num}"
        for c in required:
            if c not in cols:
                raise RefDataError(f"{where}: the header has no {c!r} column (found "
                                   f"{','.join(cols)!r}; required: {','.join(required)})")
        for group in one_of:
            if not any(c in cols for c in group):
                raise RefDataError(f"{where}: the header names none of "
                                   f"{' or '.join(map(repr, group))} (found "
                                   f"{','.join(cols)!r})")
        seen: set[str] = set()
        for c in cols:
            if not c:
                raise RefDataError(f"{where}: an empty column name in the header")
            if c in seen:
                raise RefDataError(f"{where}: column {c!r} appears twice in the header")
            seen.add(c)
        n = 0
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            line = reader.line_num
            n += 1
            if n > max_rows:
                raise RefDataError(f"{what} file {str(path)!r}: more than {max_rows:,} rows")
            try:
                if len(row) != len(cols):
                    raise RefDataError(f"{what} file {str(path)!r} line {line}: {len(row)} "
                                       f"cells, the header has {len(cols)}: "
                                       f"{','.join(row)[:_MAX_CELL]!r}")
                cells = {k: v.strip() for k, v in zip(cols, row, strict=True)}
                for k, v in cells.items():
                    if len(v) > _MAX_CELL:
                        raise RefDataError(f"{what} file {str(path)!r} line {line}: {k} is "
                                           f"{len(v)} characters long (at most {_MAX_CELL})")
            except RefDataError as e:
                if errors is None:
                    raise
                errors.add(line, str(e))
                continue
            yield line, cells
    except csv.Error as e:
        raise RefDataError(f"{what} file {str(path)!r} line {reader.line_num}: {e}") from e


def _int(cells: dict[str, str], key: str, lo: int, hi: int, where: str) -> int:
    v = cells[key]
    if not _INT.fullmatch(v):
        raise RefDataError(f"{where}: {key} {v!r} is not an integer")
    x = int(v)
    if not lo <= x < hi:
        raise RefDataError(f"{where}: {key} {x} is outside 0..{hi - 1} (the capacity is "
                           f"{hi}; a node's [capacities] can raise it)")
    return x


def _float(cells: dict[str, str], key: str, default: float, ok, rule: str,
           where: str) -> float:
    v = cells.get(key, "")
    if v == "":
        return default
    try:
        x = float(v)
    except ValueError:
        raise RefDataError(f"{where}: {key} {v!r} is not a number") from None
    if not math.isfinite(x) or not ok(x):
        raise RefDataError(f"{where}: {key} {v!r} must be {rule}")
    return x


def _name(cells: dict[str, str], key: str, where: str) -> str:
    v = cells[key]
    if not v:
        raise RefDataError(f"{where}: an empty {key}")
    if any(ord(c) < 32 or c == "\x7f" for c in v):
        raise RefDataError(f"{where}: {key} {v!r} has control characters")
    return v


class RefData:
    """Instruments and accounts by id and by name, every lookup one dict access.

    Build it with :func:`load_refdata` (or :meth:`from_rows`); either file may be absent
    (its tables are then empty and every lookup answers None)."""

    __slots__ = ("instruments", "accounts", "instruments_file", "accounts_file",
                 "instrument_ids", "security_ids", "account_ids", "_by_id", "_acc_by_id",
                 "_ref_columns", "currencies")

    def __init__(self, instruments: list[Instrument], accounts: list[Account], *,
                 instruments_file: Path | None = None, accounts_file: Path | None = None,
                 ref_columns: tuple[str, ...] = (), currencies: Currencies | None = None):
        # The [currencies] table the currency column was read with (codes for people).
        self.currencies = currencies or Currencies()
        self.instruments: tuple[Instrument, ...] = tuple(instruments)
        self.accounts: tuple[Account, ...] = tuple(accounts)
        self.instruments_file = instruments_file
        self.accounts_file = accounts_file
        self._ref_columns = ref_columns
        # The lookups by name as plain dicts, for hot paths (read-only by convention):
        # symbol -> instrument, (security_id_source, security_id) -> instrument,
        # account name -> account.
        self.instrument_ids: dict[str, int] = {r.symbol: r.instrument for r in self.instruments}
        self.security_ids: dict[tuple[str, str], int] = {
            (r.security_id_source, r.security_id): r.instrument
            for r in self.instruments if r.security_id}
        self.account_ids: dict[str, int] = {a.name: a.account for a in self.accounts}
        self._by_id = {r.instrument: r for r in self.instruments}
        self._acc_by_id = {a.account: a.name for a in self.accounts}

    @classmethod
    def from_rows(cls, instruments: Sequence[Instrument] = (),
                  accounts: Sequence[Account] = (),
                  currencies: Currencies | None = None) -> RefData:
        """From rows built in code (tests, tools); duplicates are a :class:`RefDataError`,
        as is a row whose currency id ``currencies`` (default: the base alone) leaves
        out."""
        ccy = currencies or Currencies()
        for r in instruments:
            if ccy.code(r.currency) is None:
                raise RefDataError(f"instrument {r.instrument}: currency {r.currency} is "
                                   f"not in the currencies table ({ccy.describe()})")
        for what, keys in (("symbol", [r.symbol for r in instruments]),
                           ("instrument", [r.instrument for r in instruments]),
                           ("account name", [a.name for a in accounts]),
                           ("account", [a.account for a in accounts])):
            if len(set(keys)) != len(keys):
                raise RefDataError(f"duplicate {what} in the rows given")
        cols = tuple(c for c in _REF_COLUMNS if instruments and (
            c != "currency" or any(r.currency for r in instruments)))
        return cls(list(instruments), list(accounts), ref_columns=cols, currencies=ccy)

    # --------------------------------------------------------------- lookups
    def instrument_of(self, symbol: str) -> int | None:
        """The instrument id of a symbol (exact, case-sensitive), or None."""
        return self.instrument_ids.get(symbol)

    def instrument_by_security_id(self, source: str, security_id: str) -> int | None:
        """The instrument of FIX SecurityIDSource (22) ``source`` and SecurityID (48), or
        None."""
        return self.security_ids.get((source, security_id))

    def symbol(self, instrument: int) -> str | None:
        """The symbol of an instrument id, or None."""
        r = self._by_id.get(instrument)
        return None if r is None else r.symbol

    def instrument_name(self, instrument: int) -> str | None:
        """The ``name`` column of an instrument (None when absent or empty)."""
        r = self._by_id.get(instrument)
        return r.name or None if r is not None else None

    def instrument_row(self, instrument: int) -> Instrument | None:
        return self._by_id.get(instrument)

    def currency_of(self, instrument: int) -> int | None:
        """The currency id of an instrument (0, the base, where the file has no currency
        column or a blank cell), or None for an instrument the file does not name."""
        r = self._by_id.get(instrument)
        return None if r is None else r.currency

    def currency_code(self, instrument: int) -> str | None:
        """The currency code of an instrument the file names (the base's where it gives
        none), or None."""
        r = self._by_id.get(instrument)
        return None if r is None else self.currencies.code(r.currency)

    def account_of(self, name: str) -> int | None:
        """The account id of an account name (exact, case-sensitive), or None."""
        return self.account_ids.get(name)

    def account_name(self, account: int) -> str | None:
        """The name of an account id, or None."""
        return self._acc_by_id.get(account)

    @property
    def empty(self) -> bool:
        return not self.instruments and not self.accounts

    # --------------------------------------------------------------- events
    def instrument_events(self) -> list[dict]:
        """SPEC ``instrument`` events (JSON form) for the rows, in file order, when the file
        has any of the reference columns (multiplier, margin_rate, beta, sector, currency;
        a blank cell is the SPEC's default); none when it names only symbols, so that a
        file of names never resets reference data set elsewhere. ``currency`` (the id) is
        in the events where the file has that column."""
        if not self._ref_columns:
            return []
        out = [{"type": "instrument", "instrument": r.instrument,
                "multiplier": r.multiplier, "margin_rate": r.margin_rate, "beta": r.beta,
                "sector": r.sector} for r in self.instruments]
        if "currency" in self._ref_columns:
            for e, r in zip(out, self.instruments, strict=True):
                e["currency"] = r.currency
        return out

    # --------------------------------------------------------------- documents
    def name_document(self, doc: dict,
                      rates: Mapping[int, tuple[int, float]] | None = None) -> dict:
        """A copy of a SPEC document (``exposure dump``, ``watch --json``) with names added:
        ``name`` on account rows; ``symbol`` (and ``name`` where the file has one) on
        instrument rows; ``symbol`` and ``account_name`` on position rows. A row whose id
        the files do not name gets no key. And the currencies (SPEC section 7):
        ``base_currency``, the code every money figure is in; on each instrument row its
        own ``currency`` code and, where ``rates`` (instrument -> (currency id, rate): what
        the node published) has it, its ``rate``. The input is not changed."""
        out = dict(doc)
        ccy = self.currencies
        out["base_currency"] = ccy.base
        rates = rates or {}
        accs = []
        for r in doc.get("accounts", ()):
            n = self._acc_by_id.get(r.get("account"))
            accs.append({**r, "name": n} if n is not None else r)
        if "accounts" in doc:
            out["accounts"] = accs
        if "instruments" in doc:
            ins = []
            for r in doc["instruments"]:
                row = self._by_id.get(r.get("instrument"))
                extra: dict = {}
                if row is not None:
                    extra["symbol"] = row.symbol
                    if row.name:
                        extra["name"] = row.name
                cr = rates.get(r.get("instrument"))
                if cr is not None:
                    extra["currency"] = ccy.label(cr[0])
                    extra["rate"] = cr[1]
                elif row is not None:
                    extra["currency"] = ccy.label(row.currency)
                ins.append({**r, **extra} if extra else r)
            out["instruments"] = ins
        if "positions" in doc:
            pos = []
            for r in doc["positions"]:
                extra = {}
                row = self._by_id.get(r.get("instrument"))
                if row is not None:
                    extra["symbol"] = row.symbol
                n = self._acc_by_id.get(r.get("account"))
                if n is not None:
                    extra["account_name"] = n
                pos.append({**r, **extra} if extra else r)
            out["positions"] = pos
        return out

    def __repr__(self) -> str:
        return (f"RefData({len(self.instruments)} instruments from {self.instruments_file}, "
                f"{len(self.accounts)} accounts from {self.accounts_file})")


def _currency(cells: dict[str, str], ccy: Currencies, where: str) -> int:
    """The id of a row's currency code (a blank cell: the base currency, 0)."""
    v = cells.get("currency", "")
    if v == "":
        return 0
    cid = ccy.id_of(v)
    if cid is None:
        raise RefDataError(f"{where}: currency {v!r} is not in the node's [currencies] "
                           f"table ({ccy.describe()})")
    return cid


def _read_instruments(path: Path, caps: Capacities, errors: RowErrors | None = None,
                      lines: list[int] | None = None, currencies: Currencies | None = None
                      ) -> tuple[list[Instrument], tuple]:
    """The rows and the reference columns the file names; ``lines`` gets each row's line
    number; ``currencies`` maps the currency column's codes (default: the base alone)."""
    ccy = currencies or Currencies()
    rows: list[Instrument] = []
    by_symbol: dict[str, int] = {}
    by_id: dict[int, int] = {}
    by_secid: dict[tuple[str, str], int] = {}
    cols: tuple[str, ...] = ()
    for line, cells in _rows(path, "instruments", ("symbol", "instrument"), errors=errors):
        where = f"instruments file {str(path)!r} line {line}"
        if not cols:
            cols = tuple(c for c in _REF_COLUMNS if c in cells)
            if ("security_id" in cells) != ("security_id_source" in cells):
                raise RefDataError(f"instruments file {str(path)!r}: the columns "
                                   "security_id and security_id_source go together")
        try:
            symbol = _name(cells, "symbol", where)
            inst = _int(cells, "instrument", 0, caps.instruments, where)
            if symbol in by_symbol:
                raise RefDataError(f"{where}: duplicate symbol {symbol!r} (first on line "
                                   f"{by_symbol[symbol]})")
            if inst in by_id:
                raise RefDataError(f"{where}: duplicate instrument {inst} (first on line "
                                   f"{by_id[inst]})")
            by_symbol[symbol], by_id[inst] = line, line
            sector = 0
            if cells.get("sector", ""):
                sector = _int(cells, "sector", 0, caps.sectors, where)
            sid, ssrc = cells.get("security_id", ""), cells.get("security_id_source", "")
            if bool(sid) != bool(ssrc):
                raise RefDataError(f"{where}: security_id {sid!r} and security_id_source "
                                   f"{ssrc!r}: both or neither")
            if sid:
                if (ssrc, sid) in by_secid:
                    raise RefDataError(f"{where}: duplicate security_id {sid!r} with "
                                       f"security_id_source {ssrc!r} (first on line "
                                       f"{by_secid[(ssrc, sid)]})")
                by_secid[(ssrc, sid)] = line
            extra = {k: v for k, v in cells.items() if k not in INSTRUMENT_COLUMNS}
            rows.append(Instrument(
                instrument=inst, symbol=symbol, name=cells.get("name", ""),
                multiplier=_float(cells, "multiplier", 1.0, lambda x: x > 0, "> 0", where),
                margin_rate=_float(cells, "margin_rate", 1.0, lambda x: x >= 0, ">= 0", where),
                beta=_float(cells, "beta", 1.0, lambda x: True, "finite", where),
                sector=sector, currency=_currency(cells, ccy, where), security_id=sid,
                security_id_source=ssrc, extra=extra))
            if lines is not None:
                lines.append(line)
        except RefDataError as err:
            if errors is None:
                raise
            errors.add(line, str(err))
    return rows, cols


def _read_accounts(path: Path, caps: Capacities, errors: RowErrors | None = None
                   ) -> list[Account]:
    rows: list[Account] = []
    by_name: dict[str, int] = {}
    by_id: dict[int, int] = {}
    for line, cells in _rows(path, "accounts", ("name", "account"), errors=errors):
        where = f"accounts file {str(path)!r} line {line}"
        try:
            name = _name(cells, "name", where)
            acc = _int(cells, "account", 0, caps.accounts, where)
            if name in by_name:
                raise RefDataError(f"{where}: duplicate account name {name!r} (first on line "
                                   f"{by_name[name]})")
            if acc in by_id:
                raise RefDataError(f"{where}: duplicate account {acc} (first on line "
                                   f"{by_id[acc]})")
            by_name[name], by_id[acc] = line, line
            rows.append(Account(acc, name, {k: v for k, v in cells.items()
                                            if k not in ACCOUNT_COLUMNS}))
        except RefDataError as err:
            if errors is None:
                raise
            errors.add(line, str(err))
    return rows


# The reader and the cell checks, for the start-of-day loads (exposure.core.loads): the
# same rules for the same files.
read_rows = _rows
read_instruments = _read_instruments
int_cell = _int
float_cell = _float
name_cell = _name


def load_refdata(instruments: str | Path | None = None, accounts: str | Path | None = None,
                 caps: Capacities | None = None, *,
                 currencies: Currencies | None = None) -> RefData:
    """Read and check ``instruments.csv`` and ``accounts.csv`` (either may be None: its
    tables stay empty); ids are checked against ``caps`` (default: SPEC section 1), the
    currency column's codes against ``currencies`` (a node's ``[currencies]``; default: the
    base, USD, alone). :class:`RefDataError` names the file, the line and the value of the
    first problem."""
    caps = caps or Capacities()
    ins: list[Instrument] = []
    cols: tuple[str, ...] = ()
    accs: list[Account] = []
    ipath = None if instruments is None else Path(instruments)
    apath = None if accounts is None else Path(accounts)
    if ipath is not None:
        ins, cols = _read_instruments(ipath, caps, currencies=currencies)
    if apath is not None:
        accs = _read_accounts(apath, caps)
    return RefData(ins, accs, instruments_file=ipath, accounts_file=apath, ref_columns=cols,
                   currencies=currencies)
