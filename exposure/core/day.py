"""The trading day: dates of rolls, the schedule of ``[day]`` and an injectable clock.

A roll record carries the trading date it closes (SPEC section 6; the record's ``qty`` as
YYYYMMDD, 0 = undated). With ``[day] roll_at = "17:00"``, ``tz = "America/New_York"`` and
``weekdays`` (default Monday to Friday), the roll scheduled at local date D's ``roll_at``
closes trading day D. The trading day *in progress* at time t is the first rolling date D
(a date whose weekday is in ``weekdays``) whose roll time is after t: the local date of t
when t is before that date's ``roll_at``, else the next date, and over a weekend the
Monday (Friday 17:00 to Monday 17:00 is Monday's day).

Everything here is a pure function of a given time (UNIX seconds) except the clocks:
:func:`system_clock`, and :func:`clock_from_env`, the hook tests use to move a node's
time (``EXPOSURE_CLOCK_FILE``: a file holding the time, read at each call).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["WEEKDAYS", "MAX_CATCH_UP", "CLOCK_ENV", "Schedule", "Clock", "date_code",
           "date_of", "date_text", "parse_schedule", "roll_time", "trading_day",
           "next_roll", "due", "day_info", "system_clock", "file_clock", "clock_from_env"]

log = logging.getLogger(__name__)

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_CATCH_UP = 7        # rolls a node sends at most to catch up missed trading days
CLOCK_ENV = "EXPOSURE_CLOCK_FILE"
_MIN, _MAX = 19000101, 99991231

Clock = Callable[[], float]


# ----------------------------------------------------------------------------- dates
def date_code(v) -> int:
    """A roll's ``date`` as the record holds it (YYYYMMDD): from ``"YYYY-MM-DD"`` or the
    integer YYYYMMDD, a calendar date from 1900-01-01 to 9999-12-31; ValueError
    otherwise (the kernel's rule too: ``exposure.engine.kernel._roll_date_ok``)."""
    if type(v) is str:
        if len(v) != 10 or v[4] != "-" or v[7] != "-" or not (
                v[:4] + v[5:7] + v[8:]).isdigit() or not v.isascii():
            raise ValueError(f"date {v!r}: YYYY-MM-DD")
        code = int(v[:4] + v[5:7] + v[8:])
    elif type(v) is int:
        code = v
    else:
        raise ValueError(f"date {v!r}: \"YYYY-MM-DD\" or the integer YYYYMMDD")
    date_of(code)
    return code


def date_of(code: int) -> dt.date:
    """The date of YYYYMMDD ``code``; ValueError when it is not one (1900..9999)."""
    if not _MIN <= code <= _MAX:
        raise ValueError(f"date {code}: YYYYMMDD from 19000101 to 99991231")
    try:
        return dt.date(code // 10000, code // 100 % 100, code % 100)
    except ValueError:
        raise ValueError(f"date {code}: not a calendar date") from None


def date_text(code: int) -> str:
    """YYYYMMDD as ``"YYYY-MM-DD"`` (what the JSON form and the reports show)."""
    return f"{code // 10000:04d}-{code // 100 % 100:02d}-{code % 100:02d}"


def _code(d: dt.date) -> int:
    return d.year * 10000 + d.month * 100 + d.day


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class Schedule:
    """``[day]``: the local time of the roll, its time zone and the weekdays that roll
    (0 = Monday)."""

    hour: int
    minute: int
    tz: ZoneInfo
    weekdays: frozenset[int]

    @property
    def roll_at(self) -> str:
        return f"{self.hour:02d}:{self.minute:02d}"


def parse_schedule(roll_at: str, tz: str = "UTC",
                   weekdays: Sequence[str] = WEEKDAYS[:5]) -> Schedule:
    """The schedule of ``[day]``; ValueError naming the key and the value."""
    parts = roll_at.split(":") if isinstance(roll_at, str) else []
    if (len(parts) != 2 or not all(p.isdigit() and p.isascii() and len(p) == 2
                                   for p in parts)
            or not (0 <= int(parts[0]) < 24 and 0 <= int(parts[1]) < 60)):
        raise ValueError(f"day.roll_at = {roll_at!r}: a local time \"HH:MM\" (00:00-23:59)")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ValueError(f"day.tz = {tz!r}: an IANA time zone such as "
                         "\"America/New_York\" or \"UTC\"") from None
    days = set()
    for w in weekdays:
        if not isinstance(w, str) or w.lower()[:3] not in WEEKDAYS:
            raise ValueError(f"day.weekdays: {w!r} is not a weekday ({', '.join(WEEKDAYS)})")
        days.add(WEEKDAYS.index(w.lower()[:3]))
    if not days:
        raise ValueError("day.weekdays: at least one weekday rolls")
    return Schedule(int(parts[0]), int(parts[1]), zone, frozenset(days))


def roll_time(s: Schedule, d: dt.date) -> float:
    """UNIX time of the roll of local date ``d`` (a time a DST change skips counts as the
    same wall time before the change, as zoneinfo reads it)."""
    return dt.datetime(d.year, d.month, d.day, s.hour, s.minute, tzinfo=s.tz).timestamp()


def _local_date(s: Schedule, t: float) -> dt.date:
    return dt.datetime.fromtimestamp(t, s.tz).date()


def trading_day(s: Schedule, t: float) -> int:
    """The trading day in progress at time ``t`` (YYYYMMDD): the first rolling date whose
    roll time is after ``t``."""
    d = _local_date(s, t)
    if t >= roll_time(s, d):
        d += dt.timedelta(days=1)
    while d.weekday() not in s.weekdays:
        d += dt.timedelta(days=1)
    return _code(d)


def next_roll(s: Schedule, t: float) -> float:
    """UNIX time of the next roll after ``t`` (that of the trading day in progress)."""
    return roll_time(s, date_of(trading_day(s, t)))


def due(s: Schedule, t: float, last: int, limit: int = MAX_CATCH_UP) -> list[int]:
    """The trading days (YYYYMMDD, oldest first) whose roll time is at or before ``t``
    and that come after ``last`` (the last roll's date), at most the ``limit`` most recent
    of them (older missed days are left: rolls with nothing between them change nothing)."""
    out: list[int] = []
    d = date_of(trading_day(s, t)) - dt.timedelta(days=1)
    floor = date_of(last) if last else None
    for _ in range(7 * (limit + 1)):
        if len(out) >= limit or (floor is not None and d <= floor):
            break
        if d.weekday() in s.weekdays:
            out.append(_code(d))
        d -= dt.timedelta(days=1)
    return out[::-1]


def day_info(s: Schedule | None, last_date: int, last_gseq: int, rolls: int,
             t: float) -> dict:
    """What ``exposure status`` and ``top`` show of the day: the last roll (its date,
    None when undated or none, and gseq), the rolls so far, and with a schedule the
    trading day in progress and the next roll (local time, ISO 8601)."""
    out: dict = {"last_roll_date": date_text(last_date) if last_date else None,
                 "last_roll_gseq": int(last_gseq), "rolls": int(rolls),
                 "trading_day": None, "next_roll": None, "roll_at": None}
    if s is not None:
        out["trading_day"] = date_text(trading_day(s, t))
        out["next_roll"] = dt.datetime.fromtimestamp(next_roll(s, t), s.tz).isoformat(
            timespec="minutes")
        out["roll_at"] = f"{s.roll_at} {s.tz.key}"
    return out


# ----------------------------------------------------------------------------- clocks
def system_clock() -> float:
    """The wall clock (UNIX seconds)."""
    return time.time()


def _read_time(text: str) -> float:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    t = dt.datetime.fromisoformat(text)
    if t.tzinfo is None:
        raise ValueError(f"{text!r}: an ISO time needs its UTC offset")
    return t.timestamp()


def file_clock(path: str | os.PathLike) -> Clock:
    """A clock that reads the time from ``path`` at each call (UNIX seconds, or an ISO
    8601 time with its offset); the wall clock while the file is missing or unreadable."""
    said: list[str] = []

    def now() -> float:
        try:
            with open(path) as f:
                return _read_time(f.read(200))
        except (OSError, ValueError, OverflowError) as e:
            if str(e) not in said:
                said[:] = [str(e)]
                log.warning("clock file %s: %s; using the wall clock", path, e)
            return time.time()
    return now


def clock_from_env() -> Clock:
    """``EXPOSURE_CLOCK_FILE``'s :func:`file_clock` when set (tests move a node's time
    with it), else :func:`system_clock`."""
    path = os.environ.get(CLOCK_ENV)
    return file_clock(path) if path else system_clock
