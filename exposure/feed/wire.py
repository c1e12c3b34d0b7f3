"""The feed's formats: multicast datagrams and recovery snapshots (docs/feed.md is the spec).

Datagram (UDP multicast, little-endian)::

    off size type field     meaning
      0    4 u4   magic     0x58505544 ("DUPX")
      4    4 u4   epoch     the sending node's incarnation (every restart and promotion
                            makes a higher one; a receiver follows the highest it has seen)
      8    8 u8   seq       INCREMENTAL: 1, 2, 3, ... per epoch (a receiver detects gaps);
                            REFRESH and HEARTBEAT: the last incremental seq sent (no advance)
     16    2 u2   count     rows that follow
     18    1 u1   type      1 INCREMENTAL, 2 REFRESH, 3 HEARTBEAT
     19    1 u1   version   4 (3: instrument rows carry currency and rate, issue 29;
                            4: position and limits rows, issue 28)
     20    2 u2   row_size  160
     22    2 u2   reserved  0
     24    8 i8   sent_ns   when the fan-out sent it (CLOCK_REALTIME ns)
     32  160 x count        rows (types.UPDATE_DTYPE, INSTRUMENT_ROW_DTYPE, SECTOR_ROW_DTYPE,
                            POSITION_ROW_DTYPE, LIMITS_ROW_DTYPE: byte 0 of each row
                            names its kind, types.ROW_DTYPES)

Snapshot (TCP, the node's recovery server, ``[fanout] snapshot_port``): the client sends
one 16-byte request; the server answers with a 32-byte header and ``count`` rows, then
closes::

    request:  0 u4 magic 0x51504E53 ("SNPQ")   4 u2 version 5   6 u2 0   8 u8 0
    response: 0 u4 magic 0x50414E53 ("SNAP")   4 u4 epoch       8 u8 gseq (every row
              includes every event up to it)   16 u4 count      20 u1 status (SNAP_*)
              21 u1 version 5                  22 u2 row_size   24 i8 taken_ns

Every row carries the gseq of the event that last moved it, and a row's state is a function
of that gseq within one epoch; so a receiver merges rows from incrementals, refreshes and
snapshots by keeping, per row, the one with the highest gseq.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

import numpy as np

from exposure.core.types import (
    MAX_DATAGRAM,
    ROW_ACCOUNT,
    ROW_DTYPES,
    ROW_LIMITS,
    ROW_SIZE,
    UPDATE_DTYPE,
)

__all__ = ["DGRAM_MAGIC", "DGRAM_HEADER", "FEED_VERSION", "DG_INCREMENTAL", "DG_REFRESH",
           "DG_HEARTBEAT", "DG_TYPES", "Datagram", "parse_datagram", "dgram_word",
           "open_receiver", "open_sender", "datagram_size", "rows_per_datagram", "MAX_DATAGRAM",
           "FALLBACK_DATAGRAM", "SNAP_REQUEST", "SNAP_REQUEST_MAGIC", "SNAP_HEADER", "SNAP_MAGIC",
           "SNAP_OK", "SNAP_NOT_PRIMARY", "SNAP_BUSY", "SNAP_NOT_READY", "SNAP_STATUS",
           "Snapshot", "snapshot_request", "parse_snapshot_header", "rows_of"]

DGRAM_MAGIC = 0x58505544
FEED_VERSION = 5  # 4: position and limits rows (issue 28); 5: position rows without
# prices (pnl and mv derived from the instrument row); a receiver refuses other versions
# magic, epoch, seq, count | type << 16 | version << 24 (one u4), row_size | 0 << 16, sent_ns
DGRAM_HEADER = struct.Struct("<IIQIIq")
DG_INCREMENTAL = 1
DG_REFRESH = 2
DG_HEARTBEAT = 3
DG_TYPES = {DG_INCREMENTAL: "incremental", DG_REFRESH: "refresh", DG_HEARTBEAT: "heartbeat"}

SNAP_REQUEST_MAGIC = 0x51504E53
SNAP_REQUEST = struct.Struct("<IHHQ")
SNAP_MAGIC = 0x50414E53
SNAP_HEADER = struct.Struct("<IIQIBBHq")
SNAP_OK = 0
SNAP_NOT_PRIMARY = 1  # a backup (or a fenced primary): ask the other node
SNAP_BUSY = 2         # too many requests at once: retry later
SNAP_NOT_READY = 3    # starting, recovering or changing role: retry later
SNAP_STATUS = {SNAP_OK: "ok", SNAP_NOT_PRIMARY: "not primary", SNAP_BUSY: "busy",
               SNAP_NOT_READY: "not ready"}


def dgram_word(count: int, dtype: int) -> tuple[int, int]:
    """The two u4 words at offsets 16 and 20 of a datagram header."""
    return count | dtype << 16 | FEED_VERSION << 24, ROW_SIZE


class Datagram(NamedTuple):
    epoch: int
    seq: int
    sent_ns: int
    updates: np.ndarray  # every row, viewed as UPDATE_DTYPE (use rows_of for other kinds)
    type: int = DG_INCREMENTAL

    def rows(self, kind: int) -> np.ndarray:
        """This datagram's rows of one kind (types.ROW_*), in that kind's dtype."""
        return rows_of(self.updates, kind)


def rows_of(rows: np.ndarray, kind: int) -> np.ndarray:
    """The rows of ``kind`` among ``rows`` (any 160-byte row dtype), viewed in its dtype."""
    sel = rows[rows["kind"] == kind]
    return sel.view(ROW_DTYPES.get(kind, UPDATE_DTYPE))


def parse_datagram(data) -> Datagram:
    """A datagram's header and rows; ValueError (saying why) if it is not a valid one."""
    n = len(data)
    if n < DGRAM_HEADER.size:
        raise ValueError(f"datagram of {n} bytes is shorter than its {DGRAM_HEADER.size}-byte "
                         "header")
    magic, epoch, seq, w16, w20, sent = DGRAM_HEADER.unpack_from(data)
    if magic != DGRAM_MAGIC:
        raise ValueError(f"bad magic {magic:#x}: not an exposure feed datagram")
    count, dtype, version, row_size = w16 & 0xFFFF, (w16 >> 16) & 0xFF, w16 >> 24, w20 & 0xFFFF
    if version != FEED_VERSION:
        raise ValueError(f"feed version {version}, this library reads {FEED_VERSION}")
    if dtype not in DG_TYPES:
        raise ValueError(f"unknown datagram type {dtype}")
    if row_size != ROW_SIZE or n != DGRAM_HEADER.size + count * ROW_SIZE:
        raise ValueError(f"datagram of {n} bytes does not hold {count} rows of {row_size}")
    rows = np.frombuffer(data, UPDATE_DTYPE, count, DGRAM_HEADER.size)
    if count:
        kinds = bytes(memoryview(data)[DGRAM_HEADER.size::ROW_SIZE])  # byte 0 of each row
        if min(kinds) < ROW_ACCOUNT or max(kinds) > ROW_LIMITS:
            raise ValueError("a row of unknown kind")
    return Datagram(epoch, seq, sent, rows, dtype)


def open_receiver(group: str, port: int, interface: str = "127.0.0.1") -> socket.socket:
    """A UDP socket joined to the node's multicast group (what a connectivity engine does)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    except OSError:
        pass
    s.bind(("", port))
    mreq = socket.inet_aton(group) + socket.inet_aton(interface)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    return s


# The size taken where the system cannot say the path's MTU (MAX_DATAGRAM, the largest a
# feed sends, is the types module's).
FALLBACK_DATAGRAM = 1400
_IP_MTU = getattr(socket, "IP_MTU", 14)  # Linux: the path MTU of a connected socket
_IP_UDP_HEADERS = 20 + 8


def open_sender(group: str, port: int, interface: str, ttl: int) -> socket.socket:
    """A UDP socket that sends to the multicast ``group`` through ``interface`` (looped
    back to receivers on this host), with an 8 MiB send buffer; connected (a send skips
    the route lookup, and the socket knows its path's MTU)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        s.connect((group, port))
    except OSError:
        s.close()
        raise
    return s


def datagram_size(sock: socket.socket, configured: int) -> int:
    """The bytes of one datagram: ``configured``, or for 0 (``[fanout] max_datagram = 0``,
    the default) the largest that leaves the connected ``sock``'s interface unfragmented:
    its MTU less the IP and UDP headers (1,472 on Ethernet, 8,972 with jumbo frames, 65,000
    on loopback), at most :data:`MAX_DATAGRAM`; :data:`FALLBACK_DATAGRAM` where the system
    does not say."""
    if configured:
        return int(configured)
    try:
        mtu = int(sock.getsockopt(socket.IPPROTO_IP, _IP_MTU))
    except OSError:
        return FALLBACK_DATAGRAM
    size = min(MAX_DATAGRAM, mtu - _IP_UDP_HEADERS)
    return size if size >= 256 else FALLBACK_DATAGRAM


def rows_per_datagram(size: int) -> int:
    """Rows a datagram of ``size`` bytes holds after its header (at least one)."""
    return max(1, (size - DGRAM_HEADER.size) // ROW_SIZE)


# ----------------------------------------------------------------------------- snapshots
class Snapshot(NamedTuple):
    epoch: int
    gseq: int
    status: int
    taken_ns: int
    rows: np.ndarray  # UPDATE_DTYPE view of every row (rows_of for other kinds)


def snapshot_request() -> bytes:
    return SNAP_REQUEST.pack(SNAP_REQUEST_MAGIC, FEED_VERSION, 0, 0)


def parse_snapshot_header(data) -> tuple[int, int, int, int, int]:
    """(epoch, gseq, count, status, taken_ns) of a response header; ValueError if bad."""
    magic, epoch, gseq, count, status, version, row_size, taken = SNAP_HEADER.unpack_from(data)
    if magic != SNAP_MAGIC:
        raise ValueError(f"bad magic {magic:#x}: not an exposure snapshot")
    if version != FEED_VERSION or row_size != ROW_SIZE:
        raise ValueError(f"snapshot version {version} with {row_size}-byte rows, this library "
                         f"reads {FEED_VERSION} with {ROW_SIZE}")
    if status not in SNAP_STATUS:
        raise ValueError(f"unknown snapshot status {status}")
    if status != SNAP_OK and count:
        raise ValueError(f"a snapshot with status {status} and {count} rows")
    return epoch, gseq, count, status, taken
