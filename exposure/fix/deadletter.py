"""The dead-letter file: FIX messages that could not be mapped to events (docs/fix.md,
"Dead letters").

One JSON object per line, appended::

    {"time": "2026-12-06T14:03:07.123456Z", "session": "EXPOSURE-BROKER1", "seq": 812,
     "kind": "unknown_account", "reason": "unknown Account (1) 'PM9' (not in accounts.csv)",
     "raw": "8=FIX.4.4|9=178|35=8|34=812|...|10=093|"}

``index``, where the writer has one, is the message's place in the writer's own journal
(the gateway's inbound journal: two letters of the same session, seq and bytes at two
indexes are two letters, and a gateway that replays its journal knows each one by it).
``raw`` is the message with SOH shown as ``|`` (bytes outside ASCII as the characters of
the same code, latin-1); where the message itself holds a ``|``, ``raw_b64`` carries its
exact bytes too. A letter is written once: one with the session, MsgSeqNum, bytes (and
index) of one already in the file is not appended again (a gateway that maps its journal again
after a restart meets the same dead messages again). The file is bounded by a number of
letters and of bytes: at either bound :meth:`DeadLetterFile.append` raises
:class:`DeadLetterFull` (counted in ``refused``) and writes nothing. A torn last line (a
crash mid-append) is cut when the file is opened.

:func:`redeliver` maps dead letters again through a mapper, or one per FIX session (the
reference data fixed and reloaded), and returns the events, the letters passed on and the
letters still dead; :func:`rewrite` replaces the file with the letters that remain.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import logging
import os
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from exposure.core.fs import fsync_dir, publish_file
from exposure.core.log import RateLog
from exposure.fix.mapping import FixFields, Mapper

__all__ = ["DeadLetter", "DeadLetterFile", "DeadLetterFull", "Redelivery", "RawFields",
           "read_dead_letters", "redeliver", "rewrite", "show_raw", "utc_now", "MAX_LETTERS",
           "MAX_BYTES"]

log = logging.getLogger(__name__)
_ratelog = RateLog(log)

MAX_LETTERS = 1_000_000
MAX_BYTES = 1 << 30
SOH = b"\x01"


class DeadLetterFull(OSError):
    """The dead-letter file is at its bound; the letter was not written."""


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter: when, from which FIX session and MsgSeqNum, why, the message's
    exact bytes and (where the writer journals its messages) its journal index."""

    time: str
    session: str
    seq: int | None
    reason: str
    raw: bytes
    kind: str = ""
    index: int | None = None

    def key(self) -> tuple[str, int | None, int, int | None]:
        """What makes a letter the same letter: the session, the seq, the bytes' CRC and
        the journal index."""
        return (self.session, self.seq, zlib.crc32(self.raw), self.index)

    def to_json(self) -> bytes:
        d: dict = {"time": self.time, "session": self.session, "seq": self.seq,
                   "kind": self.kind, "reason": self.reason, "raw": show_raw(self.raw)}
        if self.index is not None:
            d["index"] = self.index
        if b"|" in self.raw:
            d["raw_b64"] = base64.b64encode(self.raw).decode("ascii")
        return orjson.dumps(d)

    @classmethod
    def from_json(cls, line: bytes) -> DeadLetter:
        """ValueError for a line that is not a dead letter."""
        d = orjson.loads(line)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        try:
            if "raw_b64" in d:
                raw = base64.b64decode(d["raw_b64"], validate=True)
            else:
                raw = str(d["raw"]).replace("|", "\x01").encode("latin-1")
            seq = d.get("seq")
            index = d.get("index")
            for name, v in (("seq", seq), ("index", index)):
                if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                    raise ValueError(f"{name} {v!r}")
            return cls(time=str(d.get("time", "")), session=str(d.get("session", "")),
                       seq=seq, reason=str(d.get("reason", "")), raw=raw,
                       kind=str(d.get("kind", "")), index=index)
        except (KeyError, UnicodeEncodeError, binascii.Error) as e:
            raise ValueError(f"not a dead letter: {e}") from None


def show_raw(raw: bytes) -> str:
    """A FIX message as text: SOH as ``|``, other bytes as latin-1 characters."""
    return raw.decode("latin-1").replace("\x01", "|")


def utc_now(when: float | None = None) -> str:
    """A letter's time: ``when`` (seconds since the epoch; default now) in UTC, to the
    microsecond."""
    t = _dt.datetime.now(_dt.UTC) if when is None else \
        _dt.datetime.fromtimestamp(when, _dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class DeadLetterFile:
    """The append side of a dead-letter file at ``path`` (created, with its directory, if
    absent). ``count``, ``size``: letters and bytes in the file; ``refused``: letters not
    written because it was full; ``duplicates``: letters already in it."""

    def __init__(self, path: str | Path, *, max_letters: int = MAX_LETTERS,
                 max_bytes: int = MAX_BYTES, fsync: bool = True):
        if max_letters < 1 or max_bytes < 1:
            raise ValueError(f"max_letters {max_letters}, max_bytes {max_bytes}: >= 1")
        self.path = Path(path)
        self.max_letters, self.max_bytes, self.fsync = max_letters, max_bytes, fsync
        self.refused = 0
        self.duplicates = 0
        self._keys: set[tuple[str, int | None, int]] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._f = open(self.path, "a+b")  # noqa: SIM115  (closed by close())
        try:
            self._load()
        except BaseException:
            self._f.close()
            raise
        if new and fsync:
            fsync_dir(self.path.parent)

    def _load(self) -> None:
        f = self._f
        f.seek(0)
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):   # a torn last line: cut it
            log.warning("dead letters %s: a torn last line of %d bytes cut", self.path,
                        len(data) - end)
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        bad = 0
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                self._keys.add(DeadLetter.from_json(line).key())
            except ValueError:
                bad += 1
        if bad:
            log.warning("dead letters %s: %d unreadable lines (kept, not counted)",
                        self.path, bad)
        self.count = len(self._keys)
        self.size = end
        f.seek(0, os.SEEK_END)

    @property
    def full(self) -> bool:
        return self.count >= self.max_letters or self.size >= self.max_bytes

    def append(self, session: str, seq: int | None, reason: str, raw: bytes, *,
               kind: str = "", when: float | None = None, index: int | None = None) -> bool:
        """Write one letter (``when``: its time, default now; ``index``: its journal
        index); False where the same letter is in the file already.
        :class:`DeadLetterFull` at the file's bound."""
        return self.write(DeadLetter(utc_now(when), session, seq, reason, bytes(raw), kind,
                                     index))

    def write(self, letter: DeadLetter) -> bool:
        """:meth:`append` of a letter made already."""
        k = letter.key()
        if k in self._keys:
            self.duplicates += 1
            return False
        line = letter.to_json() + b"\n"
        if self.count + 1 > self.max_letters or self.size + len(line) > self.max_bytes:
            self.refused += 1
            _ratelog("full", f"dead letters {self.path} full ({self.count:,} letters, "
                     f"{self.size:,} bytes; bounds {self.max_letters:,} and "
                     f"{self.max_bytes:,}): {self.refused:,} refused", logging.ERROR)
            raise DeadLetterFull(f"dead-letter file {self.path} is full ({self.count:,} "
                                 f"letters, {self.size:,} bytes): redeliver or move them")
        self._f.write(line)
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._keys.add(k)
        self.count += 1
        self.size += len(line)
        return True

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> DeadLetterFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_dead_letters(path: str | Path) -> tuple[list[DeadLetter], int]:
    """The letters of a dead-letter file in file order, and how many lines could not be
    read (a torn last line among them). An absent file has none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return [], 0
    out: list[DeadLetter] = []
    bad = 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(DeadLetter.from_json(line))
        except ValueError:
            bad += 1
    return out, bad


class RawFields:
    """A FIX message's fields for :meth:`Mapper.map`: ``get(tag)``, the first value of a
    tag as text (non-ASCII bytes replaced, as the codec does)."""

    __slots__ = ("_d",)

    def __init__(self, raw: bytes):
        d: dict[int, bytes] = {}
        for part in raw.split(SOH):
            tag, eq, value = part.partition(b"=")
            if eq and tag.isdigit() and len(tag) <= 9:
                d.setdefault(int(tag), value)
        self._d = d

    def get(self, tag: int) -> str | None:
        v = self._d.get(tag)
        return None if v is None else v.decode("ascii", "replace")


@dataclass
class Redelivery:
    """What :func:`redeliver` found: ``events`` to pass on (in letter order), ``dead``: the
    letters still dead (with today's reason), ``counted``: letters that now map to nothing
    on purpose, by name (``duplicate_exec_id``: passed on since); ``passed``: the letters
    that are no longer dead (mapped to events or counted), in order."""

    events: list[dict] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    counted: dict[str, int] = field(default_factory=dict)
    passed: list[DeadLetter] = field(default_factory=list)


def redeliver(mapper: Mapper | Callable[[str], Mapper], letters: list[DeadLetter],
              session: str | None = None, *,
              fields: Callable[[bytes], FixFields] = RawFields) -> Redelivery:
    """Map ``letters`` (those of ``session`` only, when given; the others are kept as they
    are) again, in order, through ``mapper``: one Mapper, or a function giving the Mapper
    of a letter's session (the gateway's, one per FIX session). ``fields`` makes a
    message's fields of its bytes (the gateway passes the codec's ``FixMessage``, as for
    the message's first mapping). The mappers' state changes as for any message mapped,
    so the caller journals the redelivery (or checkpoints the mappers) before it passes
    the events on. A letter still dead keeps its time and index, with today's reason."""
    out = Redelivery()
    one = mapper if isinstance(mapper, Mapper) else None
    for letter in letters:
        if session is not None and letter.session != session:
            out.dead.append(letter)
            continue
        m = one if one is not None else mapper(letter.session)  # type: ignore[operator]
        res = m.map(fields(letter.raw))
        if res.dead is not None:
            out.dead.append(DeadLetter(letter.time, letter.session, letter.seq, res.dead,
                                       letter.raw, res.dead_kind or "", letter.index))
            continue
        if res.counted is not None:
            out.counted[res.counted] = out.counted.get(res.counted, 0) + 1
        else:
            out.events.extend(res.events)
        out.passed.append(letter)
    return out


def rewrite(path: str | Path, letters: list[DeadLetter]) -> None:
    """Replace the dead-letter file at ``path`` with ``letters``, atomically (a reader
    sees the old file or the new one, also after a crash). Close any
    :class:`DeadLetterFile` on it first and open it again after."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    f = open(tmp, "wb")  # noqa: SIM115  (closed by publish_file)
    try:
        for letter in letters:
            f.write(letter.to_json() + b"\n")
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    publish_file(tmp, path, f)
