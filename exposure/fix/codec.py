"""FIX tag=value: encode one message, frame and parse a byte stream (docs/fix.md, "Session
layer").

:class:`FixReader` turns whatever bytes a socket gave into whole messages and typed errors,
never an exception: garbage before a ``8=FIX`` is skipped (and reported as
:class:`FixError` ``garbage``), a BodyLength that does not land on ``10=`` is ``bad_length``,
a wrong CheckSum is ``bad_checksum``, a BodyLength over ``max_message`` is ``too_long``. The
buffer never holds more than one message of ``max_message`` bytes plus one read.

Parsing is on the gateway's hot path: the reader finds each message with ``bytes.find``,
checks its sum with one ``sum()`` over a ``bytes`` slice, and a :class:`FixMessage` splits its
fields only when asked (``get`` builds a dict of the first occurrence of each tag, once).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

__all__ = [
    "SOH",
    "FixError",
    "FixMessage",
    "FixReader",
    "checksum",
    "encode",
    "utc_timestamp",
]

SOH = b"\x01"
_START = b"8=FIX"
_TRAILER = b"\x0110="
_TAG_BYTES = [str(i).encode() for i in range(2048)]  # tag -> b"tag", for dict keys


def _tag_key(tag: int) -> bytes:
    return _TAG_BYTES[tag] if 0 <= tag < 2048 else str(tag).encode()


def checksum(data: bytes) -> int:
    """FIX CheckSum (10): the sum of the bytes modulo 256."""
    return sum(data) & 0xFF


@dataclass(frozen=True, slots=True)
class FixError:
    """One piece of the stream that is not a message: ``kind`` is ``garbage``,
    ``bad_length``, ``bad_checksum``, ``too_long`` or ``garbled`` (no MsgType, or a header
    that does not parse); ``raw`` the bytes concerned (at most 256 kept), ``size`` how many
    bytes were dropped, ``detail`` words for a log."""

    kind: str
    raw: bytes
    size: int
    detail: str = ""


class FixMessage:
    """One framed, checksummed message. ``raw`` is its exact bytes; ``fields`` the
    ``(tag, value)`` pairs in order (BeginString, BodyLength and CheckSum included), split on
    first use; :meth:`get` the first occurrence of a tag, decoded as ASCII."""

    __slots__ = ("raw", "_fields", "_map", "_type", "_seq")

    def __init__(self, raw: bytes, msg_type: str | None = None) -> None:
        self.raw = raw
        self._fields: list[tuple[int, bytes]] | None = None
        self._map: dict[bytes, bytes] | None = None
        self._type = msg_type
        self._seq: int | None = None

    def _pairs(self) -> list[list[bytes]]:
        return [p.split(b"=", 1) for p in self.raw.split(SOH)[:-1]]

    @property
    def fields(self) -> list[tuple[int, bytes]]:
        if self._fields is None:
            out = []
            for p in self._pairs():
                try:
                    out.append((int(p[0]), p[1] if len(p) > 1 else b""))
                except ValueError:
                    out.append((-1, p[-1]))
            self._fields = out
        return self._fields

    def _dict(self) -> dict[bytes, bytes]:
        m = self._map
        if m is None:
            pairs = [p for p in self._pairs() if len(p) == 2]
            pairs.reverse()  # so that the first occurrence wins
            m = self._map = dict(pairs)  # type: ignore[arg-type]
        return m

    def get(self, tag: int, default: str | None = None) -> str | None:
        """The first value of ``tag`` decoded as ASCII (undecodable bytes replaced), or
        ``default``."""
        v = self._dict().get(_tag_key(tag))
        if v is None:
            return default
        return v.decode("ascii", "replace")

    def get_bytes(self, tag: int) -> bytes | None:
        """The first value of ``tag`` as bytes, or None."""
        return self._dict().get(_tag_key(tag))

    def has(self, tag: int) -> bool:
        return _tag_key(tag) in self._dict()

    def count(self, tag: int) -> int:
        """How many times ``tag`` occurs."""
        return sum(1 for t, _ in self.fields if t == tag)

    @property
    def msg_type(self) -> str:
        if self._type is None:
            self._type = self.get(35, "") or ""
        return self._type

    @property
    def seq(self) -> int | None:
        """MsgSeqNum (34) as an int; None when absent or not a positive integer."""
        if self._seq is None:
            v = self._dict().get(b"34")
            if v is not None and v.isdigit() and 0 < len(v) < 19:
                self._seq = int(v)
        return self._seq

    @property
    def poss_dup(self) -> bool:
        return self._dict().get(b"43") == b"Y"

    @property
    def poss_resend(self) -> bool:
        return self._dict().get(b"97") == b"Y"

    def __repr__(self) -> str:
        return f"FixMessage({self.raw.replace(SOH, b'|')!r})"


_last_second = [0, b""]


def utc_timestamp(t: float | None = None) -> bytes:
    """UTC ``YYYYMMDD-HH:MM:SS.sss`` for SendingTime (52) and OrigSendingTime (122)."""
    if t is None:
        t = time.time()
    sec = int(t)
    if _last_second[0] != sec or not _last_second[1]:
        _last_second[1] = time.strftime("%Y%m%d-%H:%M:%S", time.gmtime(sec)).encode()
        _last_second[0] = sec
    return _last_second[1] + b".%03d" % min(999, int((t - sec) * 1000))


def _value(v: object) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, bool):
        return b"Y" if v else b"N"
    return str(v).encode()


def encode(begin_string: str, msg_type: str, fields: list[tuple[int, object]] | tuple = (),
           *, sender: str, target: str, seq: int, sending_time: bytes | None = None,
           poss_dup: bool = False, orig_sending_time: bytes | None = None) -> bytes:
    """One complete message: the standard header (8, 9, 35, 49, 56, 34, 52 and 43/122 for a
    possible duplicate), ``fields`` in the order given (values: bytes, str, int, or bool as
    Y/N), and the trailer with BodyLength (9) and CheckSum (10) computed."""
    st = sending_time if sending_time is not None else utc_timestamp()
    parts = [b"35=" + msg_type.encode(), b"49=" + sender.encode(), b"56=" + target.encode(),
             b"34=%d" % seq]
    if poss_dup:
        parts.append(b"43=Y")
    parts.append(b"52=" + st)
    if poss_dup:
        parts.append(b"122=" + (orig_sending_time or st))
    for tag, v in fields:
        parts.append(b"%d=" % tag + _value(v))
    body = SOH.join(parts) + SOH
    msg = b"8=" + begin_string.encode() + SOH + b"9=%d" % len(body) + SOH + body
    return msg + b"10=%03d" % checksum(msg) + SOH


class FixReader:
    """Frames FIX messages out of a byte stream. ``feed(data)`` returns the whole messages
    and the errors found so far, in stream order; a partial message stays buffered. Nothing
    raises. The buffer is bounded: at most ``max_message`` bytes of one message (the body
    a BodyLength announces) and the header before it."""

    __slots__ = ("max_message", "_buf", "counts")

    def __init__(self, max_message: int = 65536) -> None:
        if max_message < 64:
            raise ValueError(f"max_message must be at least 64 bytes, not {max_message}")
        self.max_message = max_message
        self._buf = b""
        self.counts = {"messages": 0, "garbage": 0, "bad_length": 0, "bad_checksum": 0,
                       "too_long": 0, "garbled": 0, "bytes": 0}

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[FixMessage | FixError]:
        counts = self.counts
        counts["bytes"] += len(data)
        buf = self._buf + data if self._buf else bytes(data)
        out: list[FixMessage | FixError] = []
        pos = 0
        n = len(buf)
        limit = self.max_message
        find = buf.find
        while pos < n:
            start = find(_START, pos)
            if start < 0:
                cut = _tail(buf, pos, n)
                if cut > pos:
                    self._garbage(out, buf, pos, cut)
                pos = cut
                break
            if start > pos:
                self._garbage(out, buf, pos, start)
                pos = start
            # 8=FIX.x.y<SOH>9=NNN<SOH>35=
            e1 = find(SOH, start, start + 24)
            if e1 < 0:
                if n - start < 24:
                    break
                pos = self._error(out, "garbled", buf, start, "no BeginString (8)")
                continue
            if buf[e1 + 1:e1 + 3] != b"9=":
                if n - e1 < 3:
                    break
                pos = self._error(out, "bad_length", buf, start,
                                  "BodyLength (9) is not the second field")
                continue
            e2 = find(SOH, e1 + 3, e1 + 14)
            if e2 < 0:
                if n - e1 < 14:
                    break
                pos = self._error(out, "bad_length", buf, start, "BodyLength (9) is not a number")
                continue
            digits = buf[e1 + 3:e2]
            if not digits.isdigit():
                pos = self._error(out, "bad_length", buf, start,
                                  f"BodyLength (9) is {digits[:16]!r}")
                continue
            length = int(digits)
            if length > limit:
                pos = self._error(out, "too_long", buf, start,
                                  f"BodyLength {length} > max_message {limit}")
                continue
            body_end = e2 + 1 + length
            end = body_end + 7  # 10=NNN<SOH>
            if end > n:
                break
            if buf[body_end - 1:body_end + 3] != _TRAILER or buf[end - 1] != 1:
                pos = self._error(out, "bad_length", buf, start,
                                  f"BodyLength {length} does not end at CheckSum (10)")
                continue
            cs = buf[body_end + 3:body_end + 6]
            total = sum(buf[start:body_end]) & 0xFF
            if not cs.isdigit() or int(cs) != total:
                counts["bad_checksum"] += 1
                out.append(FixError("bad_checksum", buf[start:min(end, start + 256)],
                                    end - start, f"CheckSum {cs!r} != {total:03d}"))
                pos = end
                continue
            if buf[e2 + 1:e2 + 4] != b"35=":
                counts["garbled"] += 1
                out.append(FixError("garbled", buf[start:min(end, start + 256)], end - start,
                                    "MsgType (35) is not the third field"))
                pos = end
                continue
            t_end = find(SOH, e2 + 4, end)
            counts["messages"] += 1
            out.append(FixMessage(buf[start:end], buf[e2 + 4:t_end].decode("ascii", "replace")))
            pos = end
        self._buf = buf[pos:] if pos < n else b""
        return out

    def feed_batch(self, data: bytes) -> list:
        """As :meth:`feed`, but the clean messages at the front of the buffer come back as
        one :class:`exposure.fix.fast.FixRun` (framed by a compiled kernel, with the
        offsets of the tags the session layer and the mapping read); whatever follows the
        first thing that is not a whole clean message goes through :meth:`feed`. The same
        messages, errors, order, counters and buffer bound as :meth:`feed`."""
        from exposure.fix.fast import frame

        counts = self.counts
        buf = self._buf + data if self._buf else bytes(data)
        self._buf = b""
        run, pos = frame(buf, self.max_message, FixMessage)
        counts["bytes"] += len(data) - (len(buf) - pos)  # (feed counts the rest)
        if run is None:
            return self.feed(buf)
        counts["messages"] += run.n
        if pos == len(buf):
            return [run]
        return [run, *self.feed(buf[pos:])]

    def _garbage(self, out: list, buf: bytes, a: int, b: int) -> None:
        self.counts["garbage"] += 1
        out.append(FixError("garbage", buf[a:min(b, a + 256)], b - a,
                            f"{b - a} bytes outside any message"))

    def _error(self, out: list, kind: str, buf: bytes, start: int, detail: str) -> int:
        """Count an error at ``start`` and return where to go on: the next ``8=FIX`` (the
        bytes up to it belong to this error), or the end less a possible partial start."""
        n = len(buf)
        nxt = buf.find(_START, start + 1)
        if nxt < 0:
            nxt = _tail(buf, start + 1, n)
        self.counts[kind] += 1
        out.append(FixError(kind, buf[start:min(nxt, start + 256)], nxt - start, detail))
        return nxt


def _tail(buf: bytes, pos: int, n: int) -> int:
    """Where the bytes from ``pos`` stop being garbage: ``n``, or the start of a trailing
    piece that may be the beginning of ``8=FIX``."""
    j = buf.find(b"8", max(pos, n - (len(_START) - 1)))
    while j >= 0:
        if _START.startswith(buf[j:n]):
            return j
        j = buf.find(b"8", j + 1)
    return n
