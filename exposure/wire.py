"""The TCP wire protocol between upstream systems (sessions) and a node's ingest.

Every frame is an 8-byte header and a payload, little-endian::

    off size field
      0    2 magic    0x5845 ("EX")
      2    1 version  1
      3    1 kind     K_* below
      4    4 length   payload bytes (<= MAX_PAYLOAD)

=========== ======== ==================================================================
kind        from     payload
=========== ======== ==================================================================
LOGIN       client   u4 session id (1..max_sessions), u4 0
LOGIN_OK    node     u8 the last session seq the node holds for this session
EVENTS      client   n x 128-byte event records (types.EVENT_DTYPE), 1 <= n <= 8,192;
                     each carries its session seq (``sseq``) and ``source``; records whose
                     seq the node already holds are dropped (a client may resend)
ACK         node     u8 highest session seq processed, then u8 x 8: the session's
                     rejects so far per reason code (index 0 unused)
REJECT      node     u2 code, then UTF-8 text; the node closes the session after it
HEARTBEAT   both     empty
=========== ======== ==================================================================

:class:`FrameReader` decodes a byte stream incrementally. Anything malformed (bad magic,
version, kind, a length over the limit or wrong for the kind) raises :class:`ProtocolError`
at once, before the payload is buffered: a client's bytes never make the node allocate more
than one maximal frame.
"""

from __future__ import annotations

import struct

import numpy as np

from .types import EVENT_DTYPE, EVENT_SIZE

__all__ = [
    "MAGIC", "VERSION", "HEADER", "MAX_RECORDS", "MAX_PAYLOAD", "K_LOGIN", "K_LOGIN_OK",
    "K_EVENTS", "K_ACK", "K_REJECT", "K_HEARTBEAT", "ProtocolError", "FrameReader",
    "encode_login", "encode_login_ok", "encode_events", "encode_ack", "encode_reject",
    "encode_heartbeat", "decode_ack", "check_header",
]

MAGIC = 0x5845
VERSION = 1
HEADER = struct.Struct("<HBBI")
MAX_RECORDS = 8192
MAX_PAYLOAD = MAX_RECORDS * EVENT_SIZE

K_LOGIN, K_LOGIN_OK, K_EVENTS, K_ACK, K_REJECT, K_HEARTBEAT = 1, 2, 3, 4, 5, 6
_FIXED = {K_LOGIN: 8, K_LOGIN_OK: 8, K_ACK: 72, K_HEARTBEAT: 0}
_ACK = struct.Struct("<Q8Q")

# REJECT codes
E_PROTOCOL = 1      # malformed frame
E_SESSION = 2       # invalid or busy session id
E_NOT_LOGGED_IN = 3  # events before a login
E_BUSY = 4          # too many sessions


class ProtocolError(ValueError):
    """A malformed frame; ``code`` is the REJECT code to answer with."""

    def __init__(self, message: str, code: int = E_PROTOCOL):
        super().__init__(message)
        self.code = code


def _frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


def encode_login(session: int) -> bytes:
    return _frame(K_LOGIN, struct.pack("<II", session, 0))


def encode_login_ok(last_seq: int) -> bytes:
    return _frame(K_LOGIN_OK, struct.pack("<Q", last_seq))


def encode_events(recs: np.ndarray) -> bytes:
    """One EVENTS frame (at most MAX_RECORDS records)."""
    if recs.dtype != EVENT_DTYPE or not 1 <= len(recs) <= MAX_RECORDS:
        raise ValueError(f"an EVENTS frame holds 1..{MAX_RECORDS} event records, "
                         f"got {len(recs)} of {recs.dtype}")
    return _frame(K_EVENTS, np.ascontiguousarray(recs).tobytes())


def encode_ack(seq: int, rejects) -> bytes:
    r = [int(x) for x in rejects][:8]
    return _frame(K_ACK, _ACK.pack(seq, *(r + [0] * (8 - len(r)))))


def decode_ack(payload) -> tuple[int, list[int]]:
    seq, *rej = _ACK.unpack(payload)
    return seq, rej


def encode_reject(code: int, text: str) -> bytes:
    return _frame(K_REJECT, struct.pack("<H", code) + text.encode()[:500])


def encode_heartbeat() -> bytes:
    return _frame(K_HEARTBEAT)


def check_header(magic: int, version: int, kind: int, length: int, pos: int = 0) -> None:
    """Raise :class:`ProtocolError` unless these header fields can start a frame (``pos``:
    where in the stream, for the message). The one statement of the framing rules; the
    ingest stage's jitted scanner hands every header it does not take to this function."""
    if magic != MAGIC:
        raise ProtocolError(f"bad frame magic {magic:#06x} at byte {pos}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this node speaks {VERSION}")
    if kind in _FIXED:
        if length != _FIXED[kind]:
            raise ProtocolError(f"frame kind {kind} with length {length}, "
                                f"expected {_FIXED[kind]}")
    elif kind == K_EVENTS:
        if length == 0 or length > MAX_PAYLOAD or length % EVENT_SIZE:
            raise ProtocolError(f"EVENTS frame of {length} bytes: must be 1..{MAX_RECORDS}"
                                f" records of {EVENT_SIZE} bytes")
    elif kind == K_REJECT:
        if not 2 <= length <= 502:
            raise ProtocolError(f"REJECT frame of {length} bytes")
    else:
        raise ProtocolError(f"unknown frame kind {kind}")


class FrameReader:
    """Incremental decoder: ``feed(bytes)`` returns the complete frames as (kind, payload).

    EVENTS payloads come back as read-only record arrays viewing the frame's bytes (no
per-field work; ``.view(np.uint64)`` gives the words).
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held (a client that vanished mid-frame)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, object]]:
        self._buf += data
        out: list[tuple[int, object]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            magic, version, kind, length = HEADER.unpack_from(buf, pos)
            check_header(magic, version, kind, length, pos)
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            body = bytes(buf[pos + HEADER.size:end])
            if kind == K_EVENTS:
                out.append((kind, np.frombuffer(body, EVENT_DTYPE)))
            else:
                out.append((kind, body))
            pos = end
        if pos:
            del buf[:pos]
        return out
