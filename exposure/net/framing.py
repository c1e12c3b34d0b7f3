"""The frame of the node's two TCP protocols (sessions: :mod:`exposure.net.wire`,
replication: :mod:`exposure.net.repl`): the one place that knows the header's layout, the
rules a header must meet, and the incremental reader.

Every frame is an 8-byte header and a payload, little-endian::

    byte 0  +--------+--------+--------+--------+
            | magic (u2)      | version| kind   |   OFF_MAGIC 0, OFF_VERSION 2, OFF_KIND 3
    byte 4  +--------+--------+--------+--------+
            | length (u4): payload bytes        |   OFF_LENGTH 4
    byte 8  +-----------------------------------+
            | payload: length bytes             |
            +-----------------------------------+

A protocol is a :class:`Framing`: its magic and version, the kinds whose payload has one
fixed length, and the kinds whose length lies in a range (optionally a whole number of
records). The two protocols differ only in those values; their frames, payloads and
handshakes are their own modules' business.

:meth:`Framing.check` says what is wrong with a header, with the bad value in the message,
and :class:`FrameReader` applies it to every header as soon as its 8 bytes are in, before
the payload is buffered: a peer's bytes never make a reader hold more than one maximal
frame (plus what one read brought).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["HEADER", "HEADER_SIZE", "OFF_MAGIC", "OFF_VERSION", "OFF_KIND", "OFF_LENGTH",
           "MAX_LENGTH", "E_PROTOCOL", "FrameError", "Framing", "FrameReader"]

HEADER = struct.Struct("<HBBI")  # magic, version, kind, length
HEADER_SIZE = 8
OFF_MAGIC = 0
OFF_VERSION = 2
OFF_KIND = 3
OFF_LENGTH = 4
MAX_LENGTH = 2**32 - 1  # what the length field can say (each protocol allows far less)
E_PROTOCOL = 1          # both protocols' code for a malformed frame

assert HEADER.size == HEADER_SIZE == OFF_LENGTH + 4


class FrameError(ValueError):
    """A malformed frame; ``code`` is the protocol's code to answer with (its REJECT or
    REFUSE)."""

    def __init__(self, message: str, code: int = E_PROTOCOL):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Framing:
    """One protocol's frame rules.

    ``fixed``: kind -> the only payload length it may have. ``ranged``: kind -> (least,
    most, unit): its length lies in least..most and is a multiple of unit (a frame of
    records). ``names``: kind -> its name in messages (``kind N`` otherwise). ``error``:
    the :class:`FrameError` subclass a bad header raises.
    """

    magic: int
    version: int
    fixed: Mapping[int, int]
    ranged: Mapping[int, tuple[int, int, int]]
    names: Mapping[int, str] = field(default_factory=dict)
    error: type[FrameError] = FrameError

    def __post_init__(self) -> None:
        if not 0 <= self.magic <= 0xFFFF:
            raise ValueError(f"frame magic {self.magic!r} must fit in 2 bytes")
        if not 0 <= self.version <= 0xFF:
            raise ValueError(f"frame version {self.version!r} must fit in 1 byte")
        for kind, n in self.fixed.items():
            if not 0 <= kind <= 0xFF or not 0 <= n <= MAX_LENGTH:
                raise ValueError(f"fixed frame kind {kind!r} of length {n!r}: the kind "
                                 f"must fit in 1 byte, the length in 4")
        for kind, (lo, hi, unit) in self.ranged.items():
            if (not 0 <= kind <= 0xFF or kind in self.fixed or unit < 1
                    or not 0 <= lo <= hi <= MAX_LENGTH or lo % unit or hi % unit):
                raise ValueError(f"ranged frame kind {kind!r} ({lo!r}..{hi!r} in units of "
                                 f"{unit!r}): a 1-byte kind not also fixed, and 0 <= least "
                                 f"<= most < 2**32, both multiples of the unit")

    def frame(self, kind: int, payload: bytes = b"") -> bytes:
        """One frame: the header, then ``payload``."""
        return HEADER.pack(self.magic, self.version, kind, len(payload)) + payload

    def check(self, magic: int, version: int, kind: int, length: int, pos: int = 0) -> None:
        """Raise ``error`` unless these header fields can start a frame (``pos``: where in
        the stream, for the message)."""
        if magic != self.magic:
            raise self.error(f"bad frame magic {magic:#06x} at byte {pos}")
        if version != self.version:
            raise self.error(f"protocol version {version}, this node speaks {self.version}")
        n = self.fixed.get(kind)
        if n is not None:
            if length != n:
                raise self.error(f"frame kind {kind} with length {length}, expected {n}")
            return
        bounds = self.ranged.get(kind)
        if bounds is None:
            raise self.error(f"unknown frame kind {kind}")
        lo, hi, unit = bounds
        if not lo <= length <= hi or length % unit:
            name = self.names.get(kind, f"kind {kind}")
            if unit > 1:
                raise self.error(f"{name} frame of {length} bytes: must be {lo // unit}.."
                                 f"{hi // unit} records of {unit} bytes")
            raise self.error(f"{name} frame of {length} bytes: must be {lo}..{hi} bytes")


class FrameReader:
    """Incremental decoder of one stream of ``framing``'s frames: ``feed(bytes)`` returns
    the complete frames as (kind, payload). A payload is a copy of the frame's bytes, or
    ``decode[kind](those bytes)``. A bad header raises (``framing.error``) before its
    payload is buffered; the stream cannot go on after it."""

    def __init__(self, framing: Framing,
                 decode: Mapping[int, Callable[[bytes], object]] | None = None) -> None:
        self._buf = bytearray()
        self._check = framing.check
        self._decode = decode or {}

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a peer that vanished mid-frame)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        self._buf += data
        buf, pos, out = self._buf, 0, []
        check, decode = self._check, self._decode
        while len(buf) - pos >= HEADER_SIZE:
            magic, version, kind, length = HEADER.unpack_from(buf, pos)
            check(magic, version, kind, length, pos)
            end = pos + HEADER_SIZE + length
            if len(buf) < end:
                break
            body = bytes(buf[pos + HEADER_SIZE:end])
            d = decode.get(kind)
            out.append((kind, body if d is None else d(body)))
            pos = end
        if pos:
            del buf[:pos]
        return out
