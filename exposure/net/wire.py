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
LOGIN       client   u4 session id (1..max_sessions), u4 flags, 32-byte proof:
                     HMAC-SHA256(session secret, "exposure-session/2 " + u4 session id +
                     the nonce) (:func:`login_mac`; ignored by a node without a sessions
                     file, which serves only loopback clients). Flags: bit 0
                     (LOGIN_REJECTED) "send me REJECTED frames"; 0 is today's login.
                     Any other bit set gets REJECT E_PROTOCOL (a flag this node does not
                     know is refused, never silently ignored)
LOGIN_OK    node     u8 the last session seq the node holds for this session
EVENTS      client   n x 128-byte event records (types.EVENT_DTYPE), 1 <= n <= 8,192;
                     each carries its session seq (``sseq``) and ``source``. A record's
                     seq must be exactly the next one (held + 1); one at or below the held
                     seq is a resend and is dropped; any other seq gets a REJECT (E_SEQ,
                     naming the expected seq) and the session is closed
ACK         node     u8 highest session seq acknowledged, then u8 x 16: the session's
                     rejects of seqs up to it per reason code (index 0 unused; types.R_*
                     and R_UNAUTHORIZED); where the reject log has lost entries above it,
                     all the rejects processed so far
REJECT      node     u2 code, u8 detail (E_SEQ: the expected seq; else 0), UTF-8 text;
                     the node closes the session after it
REJECTED    node     (only to a session logged in with LOGIN_REJECTED) u8 after, u8 upto,
                     then n x 16-byte records (u8 seq, u1 reason code, 7 bytes 0),
                     0 <= n <= MAX_REJECTED (1,024), seqs ascending: every event of the
                     session with after < seq <= upto that was rejected is listed, with
                     its reason (types.R_*, R_UNAUTHORIZED), and no other. Sent just
                     before the ACK of ``upto``: a client that reads an ACK has every
                     rejected seq it covers. ``after`` is the previous REJECTED's ``upto``
                     on the connection unless entries were lost: then the seqs between
                     those two are known only by the ACK's per-reason counters
=========== ======== ==================================================================

**Per-event rejects** (:mod:`exposure.shm.reject_layout`). Compute logs each rejected
event's (seq, reason) in a ring of the session's last 1,024 rejects (nothing per accepted
event); before each ACK to a flagged session ingest sends the log's entries up to the
ACK's seq in one REJECTED frame (skipped when there is none and nothing was lost). Lost
entries (``after`` above the previous ``upto``): a session with more than 1,024 rejects
between two ACKs (a client far behind, acknowledgements held back by durability), or the
log being rebuilt. The first REJECTED on a connection (before its first ACK) lists the
rejects the log still holds: its ``after`` is where the log's knowledge starts, the seq
before the oldest entry kept or, when nothing was overwritten, the log's base (0 for a
node that has replayed its whole journal; after a restart from a snapshot, the seq the
session had processed at the snapshot: rejects of older seqs are counts only). A backup's
compute logs the same rejects from the replicated stream, so after a failover the new
primary answers the same; after a restart the log holds what recovery replayed.
HEARTBEAT   both     empty; the node answers one only after login

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
    "REJECT_NAMES", "K_REJECTED", "LOGIN_REJECTED", "LOGIN_FLAGS", "MAX_REJECTED",
    "REJECTED_DTYPE", "decode_login_flags", "encode_rejected", "decode_rejected",
    "rejected_range",
]

MAGIC = 0x5845
VERSION = 2  # 2: CHALLENGE and the login proof, 16 reject counters, REJECT's detail
HEADER = framing.HEADER
MAX_RECORDS = 8192
MAX_PAYLOAD = MAX_RECORDS * EVENT_SIZE
NONCE = 32
N_ACK_REJECTS = 16

K_LOGIN, K_LOGIN_OK, K_EVENTS, K_ACK, K_REJECT, K_HEARTBEAT, K_CHALLENGE = 1, 2, 3, 4, 5, 6, 7
K_REJECTED = 8
LOGIN_REJECTED = 1           # LOGIN flag: send me REJECTED frames
LOGIN_FLAGS = LOGIN_REJECTED  # every LOGIN flag this node knows
MAX_REJECTED = 1024          # records per REJECTED frame
REJECTED_DTYPE = np.dtype([("seq", "<u8"), ("reason", "u1"), ("_pad", "V7")])
_LOGIN = struct.Struct("<II32s")
_REJECTED = struct.Struct("<QQ")  # after, upto
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
     K_REJECT: (_REJECT.size, _REJECT.size + MAX_REJECT_TEXT, 1),
     K_REJECTED: (_REJECTED.size, _REJECTED.size + MAX_REJECTED * REJECTED_DTYPE.itemsize,
                  REJECTED_DTYPE.itemsize)},
    {K_EVENTS: "EVENTS", K_REJECT: "REJECT", K_REJECTED: "REJECTED"}, ProtocolError)

assert _REJECTED.size == REJECTED_DTYPE.itemsize == 16
_frame = FRAMING.frame


def encode_challenge(nonce: bytes) -> bytes:
    return _frame(K_CHALLENGE, nonce)


def login_mac(secret: bytes, session: int, nonce: bytes) -> bytes:
    """The LOGIN proof: HMAC-SHA256 over the protocol, the session id and the node's nonce
    (so a proof is good for one connection of one session)."""
    return hmac.new(secret, f"exposure-session/{VERSION} ".encode()
                    + struct.pack("<I", session) + nonce, sha256).digest()


def encode_login(session: int, proof: bytes = bytes(32), flags: int = 0) -> bytes:
    """LOGIN as ``session`` with ``proof`` (:func:`login_mac` over the CHALLENGE's nonce;
    any 32 bytes for a node without a sessions file); ``flags``: LOGIN_REJECTED for
    REJECTED frames (0: today's bytes exactly)."""
    return _frame(K_LOGIN, _LOGIN.pack(session, flags, proof))


def decode_login(payload) -> tuple[int, bytes]:
    sid, _, proof = _LOGIN.unpack(payload)
    return sid, proof


def decode_login_flags(payload) -> tuple[int, int, bytes]:
    """(session id, flags, proof) of a LOGIN."""
    sid, flags, proof = _LOGIN.unpack(payload)
    return sid, flags, proof


def encode_rejected(after: int, upto: int, seqs, reasons) -> bytes:
    """One REJECTED frame: the rejected ``seqs`` (ascending, each in (after, upto]) with
    their ``reasons`` (reason codes), at most MAX_REJECTED."""
    n = len(seqs)
    if n != len(reasons) or n > MAX_REJECTED:
        raise ValueError(f"a REJECTED frame holds 0..{MAX_REJECTED} (seq, reason) pairs, "
                         f"got {n} seqs and {len(reasons)} reasons")
    recs = np.zeros(n, REJECTED_DTYPE)
    recs["seq"] = seqs
    recs["reason"] = reasons
    return _frame(K_REJECTED, _REJECTED.pack(after, upto) + recs.tobytes())


def _rejected_records(payload) -> np.ndarray:
    if len(payload) < _REJECTED.size or (len(payload) - _REJECTED.size) % 16:
        raise ProtocolError(f"REJECTED payload of {len(payload)} bytes")
    return np.frombuffer(payload, REJECTED_DTYPE, offset=_REJECTED.size)


def decode_rejected(payload) -> list[tuple[int, int]]:
    """(seq, reason code) of each event a REJECTED frame lists (reason names:
    types.NODE_REASONS)."""
    r = _rejected_records(payload)
    return list(zip(r["seq"].tolist(), r["reason"].tolist(), strict=True))


def rejected_range(payload) -> tuple[int, int]:
    """(after, upto) of a REJECTED frame: every rejected seq in (after, upto] is listed;
    rejected seqs between the previous frame's ``upto`` and ``after`` were lost (counts
    only, in the ACK)."""
    after, upto = _REJECTED.unpack_from(payload)
    return after, upto


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
