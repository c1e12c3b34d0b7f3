"""Fan-out stage: tally updates from the fan-out ring to UDP multicast.

Datagram::

    off size field
      0    4 magic        0x58505544 ("DUPX")
      4    4 epoch        the primary's epoch (0 until failover exists)
      8    8 stream seq   1, 2, 3, ... per datagram: a receiver detects gaps
     16    4 count        updates that follow
     20    4 reserved
     24  128 x count      types.UPDATE_DTYPE records

Conflation: each poll takes everything on the ring and keeps only the latest update of each
account (and of the fund), so under load a receiver gets fewer, fresher updates; every
update carries the global seq, session, session seq and client send time of the event that
last moved the row.
"""

from __future__ import annotations

import socket
import struct

import numpy as np

from ..shm.ring import ring_pop
from ..types import UPDATE_DTYPE

__all__ = ["FanoutStage", "DGRAM_HEADER", "DGRAM_MAGIC", "parse_datagram", "open_receiver"]

DGRAM_MAGIC = 0x58505544
DGRAM_HEADER = struct.Struct("<IIQII")


def parse_datagram(data: bytes) -> tuple[int, int, np.ndarray]:
    """(epoch, stream seq, updates) of one datagram; ValueError if it is not one."""
    if len(data) < DGRAM_HEADER.size:
        raise ValueError(f"datagram of {len(data)} bytes is shorter than its header")
    magic, epoch, seq, count, _ = DGRAM_HEADER.unpack_from(data)
    if magic != DGRAM_MAGIC or len(data) != DGRAM_HEADER.size + count * UPDATE_DTYPE.itemsize:
        raise ValueError("not an exposure tally datagram")
    return epoch, seq, np.frombuffer(data, UPDATE_DTYPE, count, DGRAM_HEADER.size)


def open_receiver(group: str, port: int, interface: str = "127.0.0.1") -> socket.socket:
    """A UDP socket joined to the node's multicast group (what a connectivity engine does)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("", port))
    mreq = socket.inet_aton(group) + socket.inet_aton(interface)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    return s


class FanoutStage:
    def __init__(self, in_ring, group: str, port: int, interface: str, ttl: int,
                 max_datagram: int, epoch: int = 0):
        self.inp = in_ring
        self.dest = (group, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                             socket.inet_aton(interface))
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.per = max(1, (max_datagram - DGRAM_HEADER.size) // UPDATE_DTYPE.itemsize)
        self.epoch = epoch
        self.seq = 0
        self.buf = np.zeros(in_ring.capacity, UPDATE_DTYPE)
        self.words = self.buf.view(np.uint64).reshape(len(self.buf), -1)

    def poll(self) -> int:
        n = ring_pop(self.inp.ctrl, self.inp.slots, self.words, len(self.buf))
        if n == 0:
            return 0
        if n > 1:  # conflate: the last update of each account, in arrival order
            _, last = np.unique(self.buf["account"][:n][::-1], return_index=True)
            rows = self.words[np.sort(n - 1 - last)]
        else:
            rows = self.words[:1]
        for lo in range(0, len(rows), self.per):
            part = rows[lo:lo + self.per]
            self.seq += 1
            hdr = DGRAM_HEADER.pack(DGRAM_MAGIC, self.epoch, self.seq, len(part), 0)
            try:
                self.sock.sendto(hdr + part.tobytes(), self.dest)
            except OSError:
                pass  # a full socket buffer loses this datagram; receivers see the gap
        return n

    def close(self) -> None:
        self.sock.close()
