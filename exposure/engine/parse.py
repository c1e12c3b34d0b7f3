"""JSON lines (SPEC section 2) to event records, column by column.

Every non-blank line is decoded on its own, so each line yields exactly one record and a
line is an event only if the whole line is one JSON value (surrounding JSON whitespace
allowed) that is an object: two objects on one line, an array split over lines, a scalar
or trailing garbage all get ``reject = bad_field``. Lines go through ``orjson`` (strict), in
chunks; where a line fails there, the lines of its chunk are decoded one by one, and a line
orjson refuses is tried with Python's ``json`` on its UTF-8 text, which also reads
NaN/Infinity. A line with a run of 19+ digits is also decoded by ``json``, so that an
integer beyond 64 bits stays an integer. Such values then fail the field checks with the
right reason.

The objects are then grouped by event type and each field is converted as a whole column:
kind checks (a JSON integer, any JSON number, a side name) and conversion to the record's
binary types. Only what the binary record cannot carry is decided here (a wrong JSON kind, a
missing field, a negative id): such records get ``reject`` set and the kernel counts them.
Every domain and range check that a binary client could also get wrong is left to the
kernel, so both paths reject the same things for the same reasons.
"""

from __future__ import annotations

import csv
import io
import json
import re
import struct
from itertools import repeat
from pathlib import Path

import numpy as np
import orjson

from exposure.core.day import date_code, date_text
from exposure.core.types import (
    EVENT_DTYPE,
    F_HAS_PRICE,
    R_BAD_FIELD,
    R_BAD_TYPE,
    SIDE_CODES,
    SIDE_NAMES,
    T_BUST,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_FX,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_NEW,
    T_POSITION,
    T_REPLACE,
    T_ROLL,
    TYPE_CODES,
    TYPE_NAMES,
)

__all__ = ["parse_events", "records_from_objects", "record_values", "RECORD", "read_events",
           "read_instruments_csv", "EventFileError", "record_objects", "to_jsonl"]


class EventFileError(Exception):
    """An events or reference-data file that cannot be read at all."""


class _Missing:
    """Marks an absent key in a column."""


_MISSING = _Missing()
_NOT_OBJECT = _Missing()  # a line that did not decode to a JSON object

# Kind codes of a column's values.
_K_INT, _K_FLOAT, _K_MISSING, _K_OTHER = 0, 1, 2, 3
_KIND = {int: _K_INT, float: _K_FLOAT, _Missing: _K_MISSING}

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

# Field conversions: (json key, record field, converter, required).
#   id    : non-negative integer id; values beyond u4 are clamped (the kernel then says
#           out_of_range, as it would for any id at or beyond capacity)
#   oid   : integer in u8 (the kernel rejects >= 2**63)
#   qty   : integer in i8 (the kernel checks the SPEC's domain)
#   num   : any JSON number (finite or not: the kernel checks)
#   side  : "buy" | "sell" | "short"
#   date  : "YYYY-MM-DD" or the integer YYYYMMDD, a calendar date (core.day.date_code)
_ORDER = [("source", "source", "id", False), ("order_id", "order_id", "oid", True)]
_FIELDS = {
    T_NEW: _ORDER + [("account", "account", "id", True), ("instrument", "instrument", "id", True),
                     ("side", "side", "side", True), ("qty", "qty", "qty", True),
                     ("price", "price", "num", True)],
    T_FILL: _ORDER + [("account", "account", "id", True),
                      ("instrument", "instrument", "id", True), ("side", "side", "side", True),
                      ("qty", "qty", "qty", True), ("price", "price", "num", True)],
    # SPEC section 6: a bust carries the fields of the trade it takes back; a roll none.
    T_BUST: _ORDER + [("account", "account", "id", True),
                      ("instrument", "instrument", "id", True), ("side", "side", "side", True),
                      ("qty", "qty", "qty", True), ("price", "price", "num", True)],
    T_ROLL: [("date", "qty", "date", False)],  # the trading date it closes (0: undated)
    T_REPLACE: _ORDER + [("qty", "qty", "qty", True), ("price", "price", "num", True)],
    T_CANCEL: _ORDER,
    T_DONE: _ORDER,
    T_MARK: [("instrument", "instrument", "id", True), ("price", "price", "num", True)],
    T_POSITION: [("account", "account", "id", True), ("instrument", "instrument", "id", True),
                 ("qty", "qty", "qty", True), ("price", "price", "num", False)],
    T_INSTRUMENT: [("instrument", "instrument", "id", True), ("multiplier", "x0", "num", True),
                   ("margin_rate", "x1", "num", True), ("beta", "x2", "num", True),
                   ("sector", "sector", "id", True),
                   ("currency", "qty", "id", False)],  # SPEC section 7 (absent: 0)
    # SPEC section 7: a currency's rate. The kernel checks 1 <= currency < 256, rate > 0.
    T_FX: [("currency", "qty", "id", True), ("rate", "price", "num", True)],
    T_LIMIT: [("account", "account", "id", True), ("gross", "x0", "num", False),
              ("net", "x1", "num", False), ("margin", "x2", "num", False),
              ("loss", "x3", "num", False)],
}


# ----------------------------------------------------------------------------- decoding
_LONG_DIGITS = re.compile(rb"\d{19}")
# A quick test for any 19-digit run: every ASCII digit becomes b"0", then a plain search.
_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_ZEROS_19 = b"0" * 19


def _exact_int(token: str) -> int:
    """An integer token; beyond Python's 4,300-digit conversion limit it is clamped to a
    value that is beyond every capacity and domain anyway (the reject is the same)."""
    if len(token) <= 4000:
        return int(token)
    return -(2**70) if token.startswith("-") else 2**70


def _json_loads(line: bytes):
    # Decoded as UTF-8 text first: given bytes, ``json`` would also guess UTF-16/32 and
    # skip a byte-order mark, so a line that is not UTF-8 JSON could become an object.
    return json.loads(line.decode("utf-8"), parse_int=_exact_int)


def _decode_one(line: bytes):
    # orjson is strict; Python's decoder also takes NaN/Infinity and integers beyond 64
    # bits, which then fail the field checks with the right reason.
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            return _json_loads(line)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _NOT_OBJECT


# Lines decoded per orjson pass: a line orjson refuses sends only its chunk to the slower
# per-line fallback.
_CHUNK = 8192


def _decode_lines(lines: list[bytes]) -> list:
    """One decoded value per line, in order. Each line is decoded on its own and must be
    exactly one JSON value (surrounding JSON whitespace allowed), else it becomes
    ``_NOT_OBJECT``; nothing is ever decoded across lines. A value that is not an object
    is rejected as ``bad_field`` by :func:`records_from_objects`."""
    loads = orjson.loads
    objs: list = []
    for lo in range(0, len(lines), _CHUNK):
        chunk = lines[lo:lo + _CHUNK]
        try:
            objs += [loads(line) for line in chunk]
        except orjson.JSONDecodeError:  # orjson's depth limit raises this too
            objs += [_decode_one(line) for line in chunk]
    if _ZEROS_19 in b"\n".join(lines).translate(_ZERO_DIGITS):
        # orjson turns an integer beyond 64 bits into a float, losing the fact that the
        # token was an integer (an id beyond capacity, not a wrong kind). Only a line with
        # a run of 19+ digits can hold one; those are decoded exactly.
        for k, line in enumerate(lines):
            if _LONG_DIGITS.search(line):
                try:
                    objs[k] = _json_loads(line)
                except (ValueError, RecursionError):
                    objs[k] = _NOT_OBJECT
    return objs


def _kinds(vals: list) -> np.ndarray:
    return np.fromiter(map(_KIND.get, map(type, vals), repeat(_K_OTHER)), np.int8, len(vals))


def _int_values(vals: list, ok: np.ndarray, lo: int, hi: int, clamp_hi: bool):
    """Integer column: values as Python ints clipped to [lo, hi] (or marked bad)."""
    bad = ~ok
    out = np.zeros(len(vals), dtype=np.uint64 if lo >= 0 and hi > _I64_MAX else np.int64)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return out, bad
    picked = [vals[i] for i in idx]
    try:
        arr = np.array(picked, dtype=out.dtype)
        inside = (arr >= lo) & (arr <= hi)
        if inside.all():
            out[idx] = arr
            return out, bad
    except OverflowError:
        pass
    for i, v in zip(idx, picked, strict=True):  # rare: out-of-type-range values
        if v < lo:
            bad[i] = True
        elif v > hi:
            if clamp_hi:
                out[i] = hi
            else:
                bad[i] = True
        else:
            out[i] = v
    return out, bad


def _column(ds: list[dict], key: str, conv: str, required: bool):
    """Convert one field of a group of objects: (values, bad mask, present mask)."""
    vals = [d.get(key, _MISSING) for d in ds]
    kinds = _kinds(vals)
    missing = kinds == _K_MISSING
    if conv == "side":
        codes = np.fromiter(
            (SIDE_CODES.get(v, 0) if type(v) is str else 0 for v in vals), np.uint8, len(vals)
        )
        return codes, codes == 0, ~missing
    if conv == "date":
        out = np.zeros(len(vals), np.int64)
        bad = np.zeros(len(vals), bool)
        for i in np.flatnonzero(~missing):
            out[i], bad[i] = _scalar(vals[i], "date")
        return out, bad, ~missing
    if conv == "num":
        ok = (kinds == _K_INT) | (kinds == _K_FLOAT)
        out = np.zeros(len(vals), np.float64)
        idx = np.flatnonzero(ok)
        if idx.size:
            try:
                out[idx] = [float(vals[i]) for i in idx]
            except OverflowError:  # an integer beyond the float range: not finite
                out[idx] = [_to_float(vals[i]) for i in idx]
        bad = ~ok
    else:
        ok = kinds == _K_INT
        if conv == "id":
            out, bad = _int_values(vals, ok, 0, _U32_MAX, clamp_hi=True)
            out = out.astype(np.uint32)
        elif conv == "oid":
            out, bad = _int_values(vals, ok, 0, _U64_MAX, clamp_hi=False)
        else:  # qty
            out, bad = _int_values(vals, ok, _I64_MIN, _I64_MAX, clamp_hi=False)
    if not required:
        bad &= ~missing
    return out, bad, ~missing


def _to_float(v) -> float:
    try:
        return float(v)
    except OverflowError:
        return float("inf") if v > 0 else float("-inf")


def _type_code(o) -> int:
    if type(o) is not dict:
        return -1
    t = o.get("type")
    return TYPE_CODES.get(t, 0) if type(t) is str else 0


def records_from_objects(objs: list) -> np.ndarray:
    """Event records for decoded JSON values, one per value, in order.

    A value that is not an object gets ``reject = bad_field``; an object of unknown type
    ``reject = bad_type``; a missing or wrongly-kinded field ``reject = bad_field``.
    """
    n = len(objs)
    rec = np.zeros(n, EVENT_DTYPE)
    codes = np.fromiter(map(_type_code, objs), np.int16, n)
    rec["reject"][codes < 0] = R_BAD_FIELD
    rec["reject"][codes == 0] = R_BAD_TYPE
    for t, fields in _FIELDS.items():
        idx = np.flatnonzero(codes == t)
        if idx.size == 0:
            continue
        ds = [objs[i] for i in idx]
        sub = np.zeros(idx.size, EVENT_DTYPE)
        sub["type"] = t
        bad = np.zeros(idx.size, bool)
        for key, field, conv, required in fields:
            vals, b, present = _column(ds, key, conv, required)
            sub[field] = vals
            bad |= b
            if t == T_POSITION and key == "price":
                sub["flags"] |= np.where(present, F_HAS_PRICE, 0).astype(np.uint8)
        sub["reject"][bad] = R_BAD_FIELD
        rec[idx] = sub
    return rec


# One record's bytes without numpy: EVENT_DTYPE's 23 fields, packed (no padding: checked).
RECORD = struct.Struct("<QQqqIIIIQqdddddIBBBBIIq")
if RECORD.size != EVENT_DTYPE.itemsize:
    raise AssertionError(f"RECORD packs {RECORD.size} bytes, EVENT_DTYPE holds "
                         f"{EVENT_DTYPE.itemsize}")
_AT = {name: k for k, name in enumerate(EVENT_DTYPE.names)}
_ZERO_VALUES = tuple(0.0 if EVENT_DTYPE.fields[n][0].kind == "f" else 0
                     for n in EVENT_DTYPE.names)
# Per type: (json key, index in the record's values, converter, required).
_SCALAR_FIELDS = {t: [(key, _AT[field], conv, req) for key, field, conv, req in fields]
                  for t, fields in _FIELDS.items()}


def _scalar(v, conv: str) -> tuple:
    """One field's (value, bad) by the rules of :func:`_column`, for one value."""
    tv = type(v)
    if conv == "num":
        if tv is float:
            return v, False
        if tv is int:
            return _to_float(v), False
        return 0.0, True
    if conv == "side":
        code = SIDE_CODES.get(v, 0) if tv is str else 0
        return code, code == 0
    if conv == "date":
        try:
            return date_code(v), False
        except ValueError:
            return 0, True
    if tv is not int:
        return 0, True
    if conv == "id":
        return (0, True) if v < 0 else (min(v, _U32_MAX), False)
    if conv == "oid":
        return (v, False) if 0 <= v <= _U64_MAX else (0, True)
    return (v, False) if _I64_MIN <= v <= _I64_MAX else (0, True)  # qty


def record_values(obj) -> tuple:
    """The record of one decoded JSON value as a tuple of EVENT_DTYPE's fields in order
    (pack it with :data:`RECORD`): the same bytes as ``records_from_objects([obj])``, in
    about a microsecond instead of the column path's fixed cost (tested against it)."""
    vals = list(_ZERO_VALUES)
    t = _type_code(obj)
    if t <= 0:
        vals[_AT["reject"]] = R_BAD_FIELD if t < 0 else R_BAD_TYPE
        return tuple(vals)
    vals[_AT["type"]] = t
    bad = False
    for key, at, conv, required in _SCALAR_FIELDS[t]:
        v = obj.get(key, _MISSING)
        if v is _MISSING:
            bad = bad or required or conv == "side"
            continue
        vals[at], b = _scalar(v, conv)
        bad = bad or b
        if t == T_POSITION and key == "price":
            vals[_AT["flags"]] |= F_HAS_PRICE
    if bad:
        vals[_AT["reject"]] = R_BAD_FIELD
    return tuple(vals)


def parse_events(data: bytes) -> np.ndarray:
    """Records for a JSON-lines document; blank lines are skipped."""
    lines = [ln for ln in data.split(b"\n") if ln.strip(b" \t\r")]  # JSON whitespace
    return records_from_objects(_decode_lines(lines))


def read_events(path: str | Path) -> np.ndarray:
    """Records of a JSON-lines file; :class:`EventFileError` if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise EventFileError(f"cannot read events file {str(path)!r}: {e.strerror or e}") from e
    return parse_events(data)


_CSV_HEADER = ["instrument", "multiplier", "margin_rate", "beta", "sector"]


def _csv_value(s: str, integer: bool):
    try:
        return int(s) if integer else float(s)
    except ValueError:
        return s  # kept as text: the record is rejected as bad_field


def read_instruments_csv(path: str | Path) -> np.ndarray:
    """``instrument`` event records from a REF.csv with the SPEC's reference-data columns."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        msg = getattr(e, "strerror", None) or str(e)
        raise EventFileError(f"cannot read instruments file {str(path)!r}: {msg}") from e
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] != _CSV_HEADER:
        got = ",".join(rows[0]) if rows else "(empty file)"
        raise EventFileError(f"instruments file {str(path)!r}: header must be "
                             f"{','.join(_CSV_HEADER)!r}, found {got!r}")
    objs = []
    for row in rows[1:]:
        if not any(c.strip() for c in row):
            continue
        d: dict = {"type": "instrument"}
        for k, v in zip(_CSV_HEADER, row, strict=False):
            d[k] = _csv_value(v.strip(), k in ("instrument", "sector"))
        objs.append(d)
    return records_from_objects(objs)


def record_objects(recs: np.ndarray, stamps: bool = False) -> list[dict]:
    """Event records back as SPEC objects (the inverse of :func:`records_from_objects` for
    valid records; a record of an unknown type comes back with its numeric type). With
    ``stamps``: the node's gseq, session, session seq and receive time in front."""
    out = []
    for r, t in zip(recs.tolist(), recs["type"].tolist(), strict=True):
        (gseq, sseq, _, recv_ns, sess, source, account, instrument, order_id, qty, price,
         x0, x1, x2, x3, sector, _, side, _, flags, *_) = r
        name = TYPE_NAMES.get(t, t)
        if t in (T_NEW, T_FILL, T_BUST):
            d = {"type": name, "source": source, "order_id": order_id, "account": account,
                 "instrument": instrument, "side": SIDE_NAMES.get(side, side), "qty": qty,
                 "price": price}
        elif t == T_REPLACE:
            d = {"type": name, "source": source, "order_id": order_id, "qty": qty,
                 "price": price}
        elif t in (T_CANCEL, T_DONE):
            d = {"type": name, "source": source, "order_id": order_id}
        elif t == T_MARK:
            d = {"type": name, "instrument": instrument, "price": price}
        elif t == T_POSITION:
            d = {"type": name, "account": account, "instrument": instrument, "qty": qty}
            if flags & F_HAS_PRICE:
                d["price"] = price
        elif t == T_INSTRUMENT:
            d = {"type": name, "instrument": instrument, "multiplier": x0, "margin_rate": x1,
                 "beta": x2, "sector": sector}
            if qty:  # the currency (absent: 0, the base)
                d["currency"] = qty
        elif t == T_FX:
            d = {"type": name, "currency": qty, "rate": price}
        elif t == T_LIMIT:
            d = {"type": name, "account": account, "gross": x0, "net": x1, "margin": x2,
                 "loss": x3}
        elif t == T_ROLL:
            d = {"type": name}
            if qty:  # the trading date it closes (a value no date is written as it is)
                try:
                    d["date"] = date_text(date_code(qty))
                except ValueError:
                    d["date"] = qty
        else:
            d = {"type": name}
        if stamps:
            d = {"gseq": gseq, "session": sess, "sseq": sseq, "recv_ns": recv_ns, **d}
        out.append(d)
    return out


def to_jsonl(recs: np.ndarray) -> bytes:
    """The records as SPEC JSON lines (for files fed to ``exposure replay``/``send``)."""
    return b"".join(orjson.dumps(d) + b"\n" for d in record_objects(recs))
