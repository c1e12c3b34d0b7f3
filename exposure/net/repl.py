"""Replication between a primary and its backup: the link's frames, its authentication,
and the echo that fences the primary (which node is primary is etcd's record:
:mod:`exposure.pair.election`).

**The link.** The primary's mirror stage connects over TCP to the backup's replication
address (``[replication] listen`` of the backup). Frames have the session protocol's 8-byte
header (:mod:`exposure.net.framing`) with their own magic ("ER")::

    off size field
      0    2 magic    0x5245
      2    1 version  1
      3    1 kind     K_* below
      4    4 length   payload bytes

=============== ========== ==============================================================
kind            from       payload
=============== ========== ==============================================================
CHALLENGE       backup     32-byte random nonce (the first frame on every connection)
AUTH            primary    HMAC-SHA256(secret, "exposure-repl/1 primary" + backup nonce),
                           its own 32-byte nonce, u8 epoch, u8 tail: the highest gseq it
                           has sequenced (what the backup must hold to be in sync)
WELCOME         backup     HMAC-SHA256(secret, "exposure-repl/1 backup" + primary nonce),
                           u8 last gseq held, u8 highest epoch known, the 128-byte record
                           at that gseq (zeros at gseq 0)
REFUSE          either     u2 code, UTF-8 text; the sender closes the link (a backup that
                           knows a newer epoch than the primary's sends its WELCOME first,
                           so the primary learns it from an authenticated frame)
RECORDS         primary    n x 128-byte sequenced records (gseq consecutive), 1..8,192
ACK             backup     u8 highest gseq received, u8 highest gseq durable, u8 echo (as
                           in HEARTBEAT)
HEARTBEAT       both       u8 gseq (primary: journal tail; backup: received), u8 epoch
                           (the primary's; 0 from the backup), u8 ns: the primary's send
                           time / the backup's echo of the newest primary HEARTBEAT heard
RESET           primary    UTF-8 reason: the backup's state cannot continue the primary's
                           (it diverged, or it is older than the primary's journal); the
                           backup moves its data aside and rebuilds from what follows
SNAP_BEGIN      primary    u8 gseq, u8 bytes: a snapshot file follows in SNAP_DATA frames
SNAP_DATA       primary    up to 1 MiB of the snapshot file
SNAP_END        primary    empty
=============== ========== ==============================================================

Nothing from a peer reaches the rings before it has proved that it knows the secret (the
backup's CHALLENGE must come back as a valid AUTH), and the backup proves it in turn
(WELCOME), so a primary never streams to an impostor. Nonces are fresh per connection, so a
recorded handshake cannot be replayed.

**Fencing by echo.** The primary's HEARTBEAT carries its CLOCK_MONOTONIC send time, at
least every ``heartbeat_ms`` whatever else it sends; the backup echoes the newest one it has
heard in every ACK and HEARTBEAT. A backup promotes itself only after ``failover_ms`` of
silence from the primary, so once the echo of a heartbeat sent at ``t`` is back, the
primary knows the backup cannot have promoted itself before ``t + failover_ms``; it may act
(acknowledge, publish) until then, less a margin (:mod:`exposure.pair.election`).

Which node may be primary is not decided here: it is etcd's pair record
(:mod:`exposure.pair.coord`, :mod:`exposure.pair.election`).
"""

from __future__ import annotations

import hmac
import struct
from hashlib import sha256
from pathlib import Path

import numpy as np

from exposure.core.types import EVENT_DTYPE, EVENT_SIZE
from exposure.net import framing

__all__ = ["MAGIC", "VERSION", "HEADER", "ReplReader", "ReplError", "frame", "mac",
           "K_CHALLENGE", "K_AUTH", "K_WELCOME", "K_REFUSE", "K_RECORDS", "K_ACK",
           "K_HEARTBEAT", "K_RESET", "K_SNAP_BEGIN", "K_SNAP_DATA", "K_SNAP_END",
           "AUTH", "WELCOME", "ACK", "BEAT", "SNAP_BEGIN", "MAX_RECORDS", "SNAP_CHUNK",
           "NONCE", "read_secret", "E_AUTH", "E_EPOCH", "E_PROTOCOL", "E_BUSY"]

MAGIC = 0x5245
VERSION = 2  # 2: the echo in HEARTBEAT and ACK
HEADER = framing.HEADER
MAX_RECORDS = 8192
SNAP_CHUNK = 1 << 20
NONCE = 32

(K_CHALLENGE, K_AUTH, K_WELCOME, K_REFUSE, K_RECORDS, K_ACK, K_HEARTBEAT, K_RESET,
 K_SNAP_BEGIN, K_SNAP_DATA, K_SNAP_END) = range(1, 12)

AUTH = struct.Struct("<32s32sQQ")        # mac, nonce, epoch, tail
WELCOME = struct.Struct(f"<32sQQ{EVENT_SIZE}s")  # mac, last gseq, known epoch, record
ACK = struct.Struct("<QQQ")              # received, durable, echo ns
BEAT = struct.Struct("<QQQ")             # gseq, epoch, ns (sent / echoed)
SNAP_BEGIN = struct.Struct("<QQ")        # gseq, bytes

_FIXED = {K_CHALLENGE: NONCE, K_AUTH: AUTH.size, K_WELCOME: WELCOME.size, K_ACK: ACK.size,
          K_HEARTBEAT: BEAT.size, K_SNAP_BEGIN: SNAP_BEGIN.size, K_SNAP_END: 0}
_RANGED = {K_REFUSE: (0, 502, 1), K_RECORDS: (EVENT_SIZE, MAX_RECORDS * EVENT_SIZE, EVENT_SIZE),
           K_RESET: (0, 500, 1), K_SNAP_DATA: (0, SNAP_CHUNK, 1)}
_NAMES = {K_REFUSE: "REFUSE", K_RECORDS: "RECORDS", K_RESET: "RESET", K_SNAP_DATA: "SNAP_DATA"}

# REFUSE codes
E_PROTOCOL = framing.E_PROTOCOL  # a malformed or unexpected frame (1)
E_AUTH = 2       # the HMAC does not verify: the peer does not know the secret
E_EPOCH = 3      # the peer's epoch is older than one this node knows: it is not the primary
E_BUSY = 4       # a backup already follows an authenticated primary


class ReplError(framing.FrameError):
    """A malformed replication frame; ``code`` is the REFUSE code."""


FRAMING = framing.Framing(MAGIC, VERSION, _FIXED, _RANGED, _NAMES, ReplError)
frame = FRAMING.frame  # frame(kind, payload=b""): one frame's bytes


def mac(secret: bytes, role: str, nonce: bytes) -> bytes:
    """The proof that the sender knows ``secret``: HMAC-SHA256 over the role and the
    nonce the other side chose."""
    return hmac.new(secret, f"exposure-repl/{VERSION} {role}".encode() + nonce,
                    sha256).digest()


def read_secret(path: str | Path) -> bytes:
    """The shared secret: the file's bytes, surrounding whitespace removed (at least 16)."""
    try:
        data = Path(path).read_bytes().strip()
    except OSError as e:
        raise ValueError(f"cannot read the replication secret {str(path)!r}: "
                         f"{e.strerror or e}") from None
    if len(data) < 16:
        raise ValueError(f"the replication secret in {str(path)!r} is {len(data)} bytes; "
                         "use at least 16 (e.g. `head -c 32 /dev/urandom | base64`)")
    return data


def _records(body: bytes) -> np.ndarray:
    return np.frombuffer(body, np.uint64).reshape(-1, EVENT_SIZE // 8).copy()


class ReplReader(framing.FrameReader):
    """Incremental decoder of one link: ``feed(bytes)`` returns complete frames as
    (kind, payload); EVENTS-like RECORDS payloads come back as u8 word arrays
    ``[n, 16]`` (a copy: the ring push reads them). Raises :class:`ReplError` on a bad
    header before buffering its payload, so a peer never makes us hold more than one
    maximal frame."""

    def __init__(self) -> None:
        super().__init__(FRAMING, {K_RECORDS: _records})


def record_bytes(words: np.ndarray | None) -> bytes:
    """One record's 128 bytes (zeros for ``None``)."""
    if words is None:
        return bytes(EVENT_SIZE)
    return np.ascontiguousarray(words, np.uint64).tobytes()


assert EVENT_DTYPE.itemsize == EVENT_SIZE == WELCOME.size - 48
