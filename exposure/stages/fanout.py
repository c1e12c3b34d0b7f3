"""Fan-out stage: tally updates from the fan-out ring to UDP multicast.

Datagram::

    off size field
      0    4 magic        0x58505544 ("DUPX")
      4    4 epoch        the node's incarnation: bumped at every start, restart and promotion
                          (in a pair etcd's record keeps epochs strictly increasing across
                          both nodes: a receiver drops a datagram of an epoch lower than
                          one it has seen); the stream seq starts again at 1 in a new epoch
      8    8 stream seq   1, 2, 3, ... per datagram: a receiver detects gaps
     16    4 count        updates that follow
     20    4 reserved
     24    8 sent_ns      when the fan-out sent it (CLOCK_REALTIME ns; per-stage timing)
     32  136 x count      types.UPDATE_DTYPE records

Conflation: each poll takes everything on the ring and keeps only the latest update of each
account (and of the fund), so under load a receiver gets fewer, fresher updates; every
update carries the global seq, session, session seq and client send time of the event that
last moved the row.

In a pair, a backup packs (to keep up) but sends nothing, and a primary sends only while
it may act (:func:`exposure.shm.control.may_act`): a primary cut off from its backup and
from etcd holds its updates once its fence has expired.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import NamedTuple

import numpy as np
from numba import njit

from .. import _jit
from .._netguard import RateLog
from ..shm import ring_layout as RL
from ..shm.control import CTL_EPOCH, CTL_FANOUT_ERRORS, CTL_ROLE, ROLE_PRIMARY, may_act
from ..shm.ring import ring_pop
from ..types import UPDATE_DTYPE

__all__ = ["FanoutStage", "DGRAM_HEADER", "DGRAM_MAGIC", "Datagram", "parse_datagram",
           "open_receiver"]

DGRAM_MAGIC = 0x58505544
DGRAM_HEADER = struct.Struct("<IIQIIq")


class Datagram(NamedTuple):
    epoch: int
    seq: int
    sent_ns: int
    updates: np.ndarray  # UPDATE_DTYPE records, viewing the datagram's bytes


def parse_datagram(data: bytes) -> Datagram:
    """(epoch, stream seq, sent_ns, updates) of one datagram; ValueError if it is not one."""
    if len(data) < DGRAM_HEADER.size:
        raise ValueError(f"datagram of {len(data)} bytes is shorter than its header")
    magic, epoch, seq, count, _, sent = DGRAM_HEADER.unpack_from(data)
    if magic != DGRAM_MAGIC or len(data) != DGRAM_HEADER.size + count * UPDATE_DTYPE.itemsize:
        raise ValueError("not an exposure tally datagram")
    return Datagram(epoch, seq, sent, np.frombuffer(data, UPDATE_DTYPE, count,
                                                    DGRAM_HEADER.size))


def open_receiver(group: str, port: int, interface: str = "127.0.0.1") -> socket.socket:
    """A UDP socket joined to the node's multicast group (what a connectivity engine does)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("", port))
    mreq = socket.inet_aton(group) + socket.inet_aton(interface)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    return s


_UPD_WORDS = UPDATE_DTYPE.itemsize // 8
_HDR_WORDS = DGRAM_HEADER.size // 8  # the header as u8 words


@njit(cache=True, _nrt=False, inline="always")
def _close_datagram(out, hdr, epoch, seq, count, now):
    """The header words of the datagram starting at word ``hdr`` (DGRAM_HEADER)."""
    out[hdr] = np.uint64(DGRAM_MAGIC) | (np.uint64(epoch) << np.uint64(32))
    out[hdr + 1] = np.uint64(seq)
    out[hdr + 2] = np.uint64(count)
    out[hdr + 3] = np.uint64(now)


@njit(cache=True, _nrt=False, inline="always")
def _slot(word0, nacc):
    """Where an update's account (the low i4 of its first word) sits in ``last``: its id,
    or ``nacc`` for the fund (-1) and anything out of range."""
    a = np.int64(word0 & np.uint64(0xFFFFFFFF))
    return nacc if a >= 0x80000000 else min(a, nacc)


@njit(cache=True, _nrt=False)
def _pack(ctrl, slots, upd, last, epoch, seq, per, out, ends, now):
    """Pop every update on the ring, keep the last of each account (the fund is account
    -1), in the order of those last updates, and pack them into datagrams in ``out`` (u8
    words, header included). Returns (updates popped, datagrams); datagram d is bytes
    ``ends[d - 1]:ends[d]`` of ``out`` (``ends[-1]`` read as 0).

    ``last`` (i8, one slot per account plus the fund, all -1 between calls) maps an account
    to the index of its latest update in this batch."""
    n = ring_pop(ctrl, slots, upd, upd.shape[0])
    if n == 0:
        return 0, 0
    nacc = last.shape[0] - 1
    for k in range(n):
        last[_slot(upd[k, 0], nacc)] = k
    w = 0
    d = 0
    count = 0
    hdr = 0
    for k in range(n):
        if last[_slot(upd[k, 0], nacc)] != k:
            continue  # conflated: a later update of this account follows
        if count == 0:  # open a datagram: header words filled when it closes
            hdr = w
            w += _HDR_WORDS
        for b in range(_UPD_WORDS):
            out[w + b] = upd[k, b]
        w += _UPD_WORDS
        count += 1
        if count == per:
            seq += 1
            _close_datagram(out, hdr, epoch, seq, count, now)
            ends[d] = w * 8
            d += 1
            count = 0
    if count:
        seq += 1
        _close_datagram(out, hdr, epoch, seq, count, now)
        ends[d] = w * 8
        d += 1
    for k in range(n):  # back to all -1
        last[_slot(upd[k, 0], nacc)] = -1
    return n, d


class FanoutStage:
    def __init__(self, in_ring, group: str, port: int, interface: str, ttl: int,
                 max_datagram: int, max_accounts: int, epoch: int = 0,
                 ctl: np.ndarray | None = None, pair: bool = False):
        self.inp = in_ring
        self.ctl = ctl  # role and epoch (a backup packs, to keep up, but sends nothing)
        self.pair = pair and ctl is not None  # a fenced primary holds its updates
        self.dest = (group, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                             socket.inet_aton(interface))
        self.sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        self.sock.connect(self.dest)  # send() on a connected socket skips a route lookup
        self.per = max(1, (max_datagram - DGRAM_HEADER.size) // UPDATE_DTYPE.itemsize)
        self.epoch = epoch
        self.seq = 0
        self.send_errors = 0
        self.log = RateLog("exposure fanout")
        cap = in_ring.capacity
        self.upd = np.zeros((cap, _UPD_WORDS), np.uint64)
        self.last = np.full(max_accounts + 1, -1, np.int64)
        self.out = np.zeros(cap * _UPD_WORDS + (cap // self.per + 1) * _HDR_WORDS, np.uint64)
        self.mv = memoryview(self.out.view(np.uint8))
        self.ends = np.zeros(cap // self.per + 2, np.int64)
        self._pack = _jit.entry(_pack, in_ring.ctrl, in_ring.slots, self.upd, self.last, 0, 0,
                                self.per, self.out, self.ends, 0)  # compiled (or loaded) now
        self._tail, self._head = in_ring.ctrl[RL.W_TAIL:], in_ring.ctrl[RL.W_HEAD:]

    def poll(self) -> int:
        if self._tail[0] == self._head[0]:
            return 0  # nothing on the ring (a plain read: the jitted pop re-reads, acquire)
        if self.ctl is not None:
            epoch = int(self.ctl[CTL_EPOCH])
            if epoch != self.epoch:  # a new incarnation or a promotion: a new stream
                self.epoch, self.seq = epoch, 0
            if self.ctl[CTL_ROLE] != ROLE_PRIMARY:
                n, _ = self._pack(self.inp.ctrl, self.inp.slots, self.upd, self.last,
                                  self.epoch, self.seq, self.per, self.out, self.ends, 0)
                return n
            if self.pair and not may_act(self.ctl, time.monotonic_ns()):
                return 0  # fenced: nothing goes out (the ring fills; compute waits)
        n, d = self._pack(self.inp.ctrl, self.inp.slots, self.upd, self.last, self.epoch,
                          self.seq, self.per, self.out, self.ends, time.time_ns())
        if n == 0:
            return 0
        self.seq += d
        lo = 0
        for k in range(d):
            hi = int(self.ends[k])
            try:
                self.sock.send(self.mv[lo:hi])
            except OSError as e:  # this datagram is lost: receivers see the gap
                self.send_errors += 1
                if self.ctl is not None:
                    self.ctl[CTL_FANOUT_ERRORS] += 1
                self.log("send", f"multicast send failed ({e.strerror or e}): "
                                 f"{self.send_errors} datagrams lost so far")
            lo = hi
        return n

    def close(self) -> None:
        self.sock.close()
