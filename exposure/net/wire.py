"""The TCP wire protocol between upstream systems (sessions) and a node's ingest.

Every frame is an 8-byte header and a payload, little-endian (the header's layout and rules,
shared with the replication protocol: :mod:`exposure.net.framing`)::

    off size field
      0    2 magic    0x5845 ("EX")
      2    1 version  2
      3    1 kind     K_* below
      4    4 length   payload bytes (<= MAX_PAYLOAD)

=========== ======== ==================================================================
kind        from     payload
=========== ======== ==================================================================
CHALLENGE   node     32-byte random nonce: the first frame on every connection
LOGIN       client   u4 session id (1..max_sessions), u4 0, 32-byte proof:
                     HMAC-SHA256(session secret, "exposure-session/2 " + u4 session id +
                     the nonce) (:func:`login_mac`; ignored by a node without a sessions
                     file, which serves only loopback clients)
LOGIN_OK    node     u8 the last session seq the node holds for this session
EVENTS      client   n x 128-byte event records (types.EVENT_DTYPE), 1 <= n <= 8,192;
                     each carries its session seq (``sseq``) and ``source``. A record's
                     seq must be exactly the next one (held + 1); one at or below the held
                     seq is a resend and is dropped; any other seq gets a REJECT (E_SEQ,
                     naming the expected seq) and the session is closed
ACK         node     u8 highest session seq processed, then u8 x 16: the session's
                     rejects so far per reason code (index 0 unused; types.R_* and
                     R_UNAUTHORIZED)
REJECT      node     u2 code, u8 detail (E_SEQ: the expected seq; else 0), UTF-8 text;
                     the node closes the session after it
HEARTBEAT   both     empty; the node answers one only after login
=========== ======== ==================================================================

Before its LOGIN is accepted a connection may send nothing but one LOGIN: anything else
closes it unanswered, and so does a login deadline. A LOGIN whose proof does not verify
gets REJECT E_AUTH. An authenticated LOGIN of a session that is already connected replaces
the older connection (which gets REJECT E_REPLACED): a half-open connection never locks a
session out. The nonce is fresh per connection, so a recorded LOGIN cannot be replayed.

:class:`FrameReader` decodes a byte stream incrementally. Anything malformed (bad magic,
version, kind, a length over the limit or wrong for the kind) raises :class:`ProtocolError`
at once, before the payload is buffered: a client's bytes never make the node allocate more
than one maximal frame.
"""

from __future__ import annotations

import hmac
import struct
from hashlib import sha256

import numpy as np

from exposure.core.types import EVENT_DTYPE, EVENT_SIZE
from exposure.net import framing

__all__ = [
    "MAGIC", "VERSION", "HEADER", "MAX_RECORDS", "MAX_PAYLOAD", "K_LOGIN", "K_LOGIN_OK",
    "K_EVENTS", "K_ACK", "K_REJECT", "K_HEARTBEAT", "ProtocolError", "FrameReader",
    "encode_login", "decode_login", "encode_login_ok", "encode_events", "encode_ack",
    "encode_reject",
    "encode_heartbeat", "decode_ack", "decode_reject", "check_header", "K_CHALLENGE",
    "NONCE", "N_ACK_REJECTS", "encode_challenge", "login_mac", "E_PROTOCOL", "E_SESSION",
    "E_NOT_LOGGED_IN", "E_BUSY", "E_AUTH", "E_SEQ", "E_SLOW", "E_IDLE", "E_REPLACED",
    "REJECT_NAMES",
]

MAGIC = 0x5845
VERSION = 2  # 2: CHALLENGE and the login proof, 16 reject counters, REJECT's detail
HEADER = framing.HEADER
MAX_RECORDS = 8192
MAX_PAYLOAD = MAX_RECORDS * EVENT_SIZE
NONCE = 32
N_ACK_REJECTS = 16

K_LOGIN, K_LOGIN_OK, K_EVENTS, K_ACK, K_REJECT, K_HEARTBEAT, K_CHALLENGE = 1, 2, 3, 4, 5, 6, 7
_LOGIN = struct.Struct("<II32s")
_ACK = struct.Struct(f"<Q{N_ACK_REJECTS}Q")
_REJECT = struct.Struct("<HQ")
MAX_REJECT_TEXT = 500
_FIXED = {K_LOGIN: _LOGIN.size, K_LOGIN_OK: 8, K_ACK: _ACK.size, K_HEARTBEAT: 0,
          K_CHALLENGE: NONCE}

# REJECT codes
E_PROTOCOL = framing.E_PROTOCOL  # malformed frame (1)
E_SESSION = 2       # invalid session id, or a second login on one connection
E_NOT_LOGGED_IN = 3  # (not sent: a connection that sends anything before LOGIN is closed)
E_BUSY = 4          # too many connections
E_AUTH = 5          # the login proof does not verify (wrong secret, replayed login)
E_SEQ = 6           # a record's seq is not the next one; detail: the expected seq
E_SLOW = 7          # the client does not read its answers (bounded output queue)
E_IDLE = 8          # nothing received for the idle timeout
E_REPLACED = 9      # an authenticated login of the same session took over
REJECT_NAMES = {E_PROTOCOL: "protocol", E_SESSION: "session", E_NOT_LOGGED_IN:
                "not_logged_in", E_BUSY: "busy", E_AUTH: "auth", E_SEQ: "seq",
                E_SLOW: "slow", E_IDLE: "idle", E_REPLACED: "replaced"}


class ProtocolError(framing.FrameError):
    """A malformed frame; ``code`` is the REJECT code to answer with."""


FRAMING = framing.Framing(
    MAGIC, VERSION, _FIXED,
    {K_EVENTS: (EVENT_SIZE, MAX_PAYLOAD, EVENT_SIZE),
     K_REJECT: (_REJECT.size, _REJECT.size + MAX_REJECT_TEXT, 1)},
    {K_EVENTS: "EVENTS", K_REJECT: "REJECT"}, ProtocolError)
_frame = FRAMING.frame


def encode_challenge(nonce: bytes) -> bytes:
    return _frame(K_CHALLENGE, nonce)


def login_mac(secret: bytes, session: int, nonce: bytes) -> bytes:
    """The LOGIN proof: HMAC-SHA256 over the protocol, the session id and the node's nonce
    (so a proof is good for one connection of one session)."""
    return hmac.new(secret, f"exposure-session/{VERSION} ".encode()
                    + struct.pack("<I", session) + nonce, sha256).digest()


def encode_login(session: int, proof: bytes = bytes(32)) -> bytes:
    """LOGIN as ``session`` with ``proof`` (:func:`login_mac` over the CHALLENGE's nonce;
    any 32 bytes for a node without a sessions file)."""
    return _frame(K_LOGIN, _LOGIN.pack(session, 0, proof))


def decode_login(payload) -> tuple[int, bytes]:
    sid, _, proof = _LOGIN.unpack(payload)
    return sid, proof


def encode_login_ok(last_seq: int) -> bytes:
    return _frame(K_LOGIN_OK, struct.pack("<Q", last_seq))


def encode_events(recs: np.ndarray) -> bytes:
    """One EVENTS frame (at most MAX_RECORDS records)."""
    if recs.dtype != EVENT_DTYPE or not 1 <= len(recs) <= MAX_RECORDS:
        raise ValueError(f"an EVENTS frame holds 1..{MAX_RECORDS} event records, "
                         f"got {len(recs)} of {recs.dtype}")
    return _frame(K_EVENTS, np.ascontiguousarray(recs).tobytes())


def encode_ack(seq: int, rejects) -> bytes:
    r = [int(x) for x in rejects][:N_ACK_REJECTS]
    return _frame(K_ACK, _ACK.pack(seq, *(r + [0] * (N_ACK_REJECTS - len(r)))))


def decode_ack(payload) -> tuple[int, list[int]]:
    seq, *rej = _ACK.unpack(payload)
    return seq, rej


def encode_reject(code: int, text: str, detail: int = 0) -> bytes:
    return _frame(K_REJECT, _REJECT.pack(code, detail)
                  + text.encode()[:MAX_REJECT_TEXT])


def decode_reject(payload) -> tuple[int, int, str]:
    """(code, detail, text) of a REJECT."""
    code, detail = _REJECT.unpack_from(payload)
    return code, detail, bytes(payload[_REJECT.size:]).decode(errors="replace")


def encode_heartbeat() -> bytes:
    return _frame(K_HEARTBEAT)


# check_header(magic, version, kind, length, pos=0): raise ProtocolError unless these
# header fields can start a frame (pos: where in the stream, for the message). The one
# statement of the framing rules; the ingest stage's jitted scanner hands every header it
# does not take to this function.
check_header = FRAMING.check


def _records(body: bytes) -> np.ndarray:
    return np.frombuffer(body, EVENT_DTYPE)


class FrameReader(framing.FrameReader):
    """Incremental decoder: ``feed(bytes)`` returns the complete frames as (kind, payload).

    EVENTS payloads come back as read-only record arrays viewing the frame's bytes (no
    per-field work; ``.view(np.uint64)`` gives the words). ``pending``: bytes of an
    incomplete frame held (a client that vanished mid-frame).
    """

    def __init__(self) -> None:
        super().__init__(FRAMING, {K_EVENTS: _records})
