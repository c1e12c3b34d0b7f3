"""Trading days on disk: the end-of-day reports, the index of the days rolled, and the
document as of any gseq the journal (live or archived) still holds.

**The end-of-day report.** At each ``roll`` (SPEC section 6) the closing document, as of the
event before the roll, goes to ``DATA_DIR/eod/YYYY-MM-DD.json`` (the date the roll record
carries in ``qty``, YYYYMMDD; an undated roll: ``eod/gseq-<roll gseq>.json``), with one CSV
per table beside it for the back office (``YYYY-MM-DD.accounts.csv``, ``.instruments.csv``,
``.sectors.csv``, ``.positions.csv``, ``.fund.csv``). The JSON is the SPEC document plus an
``"eod"`` object (``date``, ``roll_gseq``, ``gseq``: the last event of the day); every file
is written atomically (a temporary file, fsync, rename, fsync of the directory), the CSVs
first and the JSON last, so a JSON in place means the whole report is. The snapshot
process writes it (:mod:`exposure.node.snapshotter`) as it replays the journal through the
roll: off the hot path, the same bytes on a pair's two nodes, and again after a crash that
came before it (the journal still holds the roll; the next snapshot passes it again). A
second roll dated as an earlier one (an operator's mistake) gets ``DATE.gseq-<N>.json``.

**The days index** ``DATA_DIR/eod/days.csv`` (``roll_gseq,date,report``: one line per roll
the kernel accepted, oldest first) is what the retention counts days by
(:func:`exposure.store.snapshot.retain`) and where ``exposure replay --day`` finds a day.
"""

from __future__ import annotations

import csv
import datetime
import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson

from exposure.core.fs import publish_file
from exposure.core.types import T_ROLL
from exposure.shm.tally_layout import State
from exposure.store.journal import JournalError, read_blocks
from exposure.store.recovery import replay_journal
from exposure.store.snapshot import SnapshotError, load_snapshot, snapshots

__all__ = ["EOD_DIR", "TABLES", "date_code", "date_text", "report_stem", "write_report",
           "read_days", "note_day", "find_rolls", "state_at"]

log = logging.getLogger(__name__)

EOD_DIR = "eod"
DAYS_FILE = "days.csv"
TABLES = ("accounts", "instruments", "sectors", "positions", "fund")


def date_code(text: str) -> int:
    """``"YYYY-MM-DD"`` (a calendar date) -> YYYYMMDD; ValueError otherwise."""
    if len(text) != 10 or not text.isascii():
        raise ValueError("a date is YYYY-MM-DD")
    d = datetime.date.fromisoformat(text)
    return d.year * 10000 + d.month * 100 + d.day


def date_text(code: int) -> str | None:
    """YYYYMMDD -> ``"YYYY-MM-DD"`` (``None`` for 0: an undated roll)."""
    if not code:
        return None
    return f"{code // 10000:04d}-{code // 100 % 100:02d}-{code % 100:02d}"


def report_stem(roll_gseq: int, date: int) -> str:
    """The report's file name without ``.json``: the date, or ``gseq-<N>`` undated."""
    return date_text(date) or f"gseq-{roll_gseq}"


def _publish(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    f = open(tmp, "wb")  # noqa: SIM115  (publish_file closes it)
    try:
        f.write(data)
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    publish_file(tmp, path, f)


def _csv(rows: list[dict]) -> bytes:
    out = io.StringIO()
    if rows:
        w = csv.writer(out, lineterminator="\n")
        w.writerow(list(rows[0]))
        w.writerows([[repr(v) if isinstance(v, float) else v for v in r.values()]
                      for r in rows])
    return out.getvalue().encode()


def write_report(data_dir: str | Path, doc: dict, roll_gseq: int, date: int) -> Path:
    """Write the end-of-day report of the day the roll at ``roll_gseq`` closes (``doc``: the
    document as of ``roll_gseq - 1``) and note the day in the index; returns the JSON's
    path. Writing it again for the same roll writes the same bytes."""
    d = Path(data_dir) / EOD_DIR
    d.mkdir(exist_ok=True)
    stem = report_stem(roll_gseq, date)
    for g, _dt, name in read_days(data_dir):
        if name == stem and g != roll_gseq:  # the date closed twice: the second by gseq
            stem = f"{stem}.gseq-{roll_gseq}"
            break
    for t in TABLES:
        rows = doc.get(t, [])
        _publish(d / f"{stem}.{t}.csv", _csv([rows] if isinstance(rows, dict) else rows))
    body = {"eod": {"date": date_text(date), "roll_gseq": roll_gseq, "gseq": roll_gseq - 1},
            **doc}
    path = d / f"{stem}.json"
    _publish(path, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n")
    note_day(data_dir, roll_gseq, date, stem)
    return path


def read_days(data_dir: str | Path) -> list[tuple[int, int, str]]:
    """(roll gseq, date YYYYMMDD or 0, report stem) of every day rolled, oldest first (from
    the index; lines it cannot read are skipped with a warning)."""
    path = Path(data_dir) / EOD_DIR / DAYS_FILE
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return []
    except (OSError, UnicodeDecodeError) as e:
        log.warning(f"{path}: unreadable ({e}); no days known")
        return []
    out = {}
    for k, line in enumerate(text.splitlines()[1:], 2):
        try:
            g, dt, stem = line.split(",")
            out[int(g)] = (int(g), int(dt), stem)
        except ValueError:
            log.warning(f"{path}:{k}: not 'roll_gseq,date,report': {line[:80]!r}")
    return sorted(out.values())


def note_day(data_dir: str | Path, roll_gseq: int, date: int, stem: str) -> None:
    """Add (or replace) the day the roll at ``roll_gseq`` closed in the index."""
    days = {g: (g, dt, s) for g, dt, s in read_days(data_dir)}
    days[roll_gseq] = (roll_gseq, date, stem)
    lines = ["roll_gseq,date,report"] + [f"{g},{dt},{s}" for g, dt, s in sorted(days.values())]
    _publish(Path(data_dir) / EOD_DIR / DAYS_FILE, ("\n".join(lines) + "\n").encode())


def find_rolls(data_dir: str | Path, from_gseq: int = 1) -> list[tuple[int, int]]:
    """(gseq, date) of the roll records the journal (live and archived) holds from
    ``from_gseq`` on (those the parser did not reject; the kernel may still have refused
    one: the index says which it accepted)."""
    out = []
    for blk in read_blocks(data_dir, from_gseq=from_gseq, archive=True):
        r = blk.records
        at = np.flatnonzero((r["type"] == T_ROLL) & (r["reject"] == 0)
                            & (r["gseq"] >= from_gseq))
        out += zip(r["gseq"][at].tolist(), r["qty"][at].tolist(), strict=True)
    return out


def state_at(st: State, state_buf: np.ndarray, sessions: np.ndarray, data_dir: str | Path,
             upto: int, reset: Callable[[], None]) -> int:
    """Rebuild ``st`` as of gseq ``upto`` (0: the journal's end) from the newest snapshot at
    or before it that loads, and the journal (live and archived) after it; without one,
    from the journal's first record. Returns the last gseq applied. Raises
    :class:`exposure.store.journal.JournalError` when the journal no longer reaches back
    to the snapshot (or to gseq 1)."""
    base = 0
    for g, path in reversed(snapshots(data_dir)):
        if upto and g > upto:
            continue
        try:
            base = load_snapshot(path, state_buf, sessions)
            break
        except (SnapshotError, OSError) as e:
            log.warning(f"snapshot {path.name} unusable ({e}); trying the one before")
            reset()
            sessions[...] = 0
    if upto and upto <= base:
        return base
    try:
        n = replay_journal(st, data_dir, sessions, upto=upto, from_gseq=base + 1,
                           archive=True)
    except JournalError as e:
        where = f"snapshot {base}" if base else "gseq 1 (no snapshot at or before it)"
        raise JournalError(f"{e}; the document as of gseq {upto or 'the end'} needs the "
                           f"journal from {where}") from None
    return base + n
