"""Layout of a session's shared-memory link: one client-to-node byte ring per IPC session.

A producer on the node's own host may send its frames through shared memory instead of
TCP (:mod:`exposure.node.stages.ingest`, "IPC sessions"; :class:`exposure.net.producer.Producer`):
it logs in over a Unix socket, and the node answers LOGIN_OK with the descriptor of a
``memfd`` holding this ring. From then on the client writes the same frames it would send
(:mod:`exposure.net.wire`) into the ring, and the node's ingest, spinning, takes them on
its next pass: no system call on either side per event (a loopback TCP send of one frame
costs about 5 us of CPU on this VM, docs/performance.md). Everything the node says
(ACKs, REJECTs, heartbeats) still comes over the Unix socket, whose end is also how each
side learns that the other has gone.

::

    byte 0     MAGIC (u8 word)        node, at creation
    byte 8     CAPACITY (bytes)       node, at creation: a power of two
    byte 64    TAIL                   client: bytes published so far (a running count)
    byte 128   HEAD                   node: bytes taken so far (a running count)
    byte 192   SLEEPING               node: 1 while its ingest sleeps in its selector; the
                                      client then writes one byte (a doorbell) to the socket
    byte 256   DATA[CAPACITY]         byte ``n`` of the stream at DATA[n % CAPACITY]

TAIL and HEAD each have a cache line of their own. The ring holds TAIL - HEAD bytes; the
client writes only into DATA[TAIL .. HEAD + CAPACITY).

**Ordering.** The client copies a frame into DATA, then stores TAIL; the node loads TAIL,
then copies DATA out. Each word is one aligned 8-byte ``mov`` (a memoryview's item store
and load: CPython's ``memcpy`` of 8 bytes), and a call into C is opaque to the compiler
(nothing is moved across it), so x86-64's ordering (stores are not reordered with stores,
loads not with loads) makes every DATA byte written before a TAIL store visible to a load
of DATA after a load of that TAIL. The same holds for HEAD in the other direction. This is
the release/acquire pair of :mod:`exposure.shm.intrinsics`, in Python: x86 only, as the
rest of the project.

**The client is not trusted.** It can write anything anywhere in the ring, at any time:

* the node keeps its own HEAD and never reads the shared one back;
* a TAIL behind the node's HEAD, or more than CAPACITY ahead of it, is a protocol error
  (the session is closed with a REJECT);
* the node copies what TAIL covers into the connection's private buffer first and parses
  only that copy, so bytes changed after the TAIL store cannot change what was checked;
* the memfd is sealed against shrinking and growing (``F_SEAL_SHRINK | F_SEAL_GROW |
  F_SEAL_SEAL``) before the client gets it: a client cannot truncate it under the node's
  mapping (which would kill the node with SIGBUS on its next read).
"""

from __future__ import annotations

import fcntl
import mmap
import os

__all__ = ["MAGIC", "W_MAGIC", "W_CAPACITY", "W_TAIL", "W_HEAD", "W_SLEEPING", "DATA",
           "MIN_CAPACITY", "MAX_CAPACITY", "IpcRing", "IpcError", "ring_size", "ipc_name"]

MAGIC = 0x31_43_50_49_5F_58_50_45  # "EXP_IPC1", little-endian
W_MAGIC = 0
W_CAPACITY = 1
W_TAIL = 8        # byte 64
W_HEAD = 16       # byte 128
W_SLEEPING = 24   # byte 192
DATA = 256
MIN_CAPACITY = 1 << 16   # a maximal frame is 8 + 1,024 x 128 bytes: several fit
MAX_CAPACITY = 1 << 30


def ipc_name(host: str, port: int) -> str:
    """The IPC socket of the node whose session port is ``host:port`` as its clients name
    it (``exposure.net.hosts.client_host``: a wildcard bind address is the loopback's): a
    name in Linux's abstract namespace (no file; like a loopback port, scoped to the
    network namespace). The host is part of the name, so two nodes on one port of two
    loopback addresses are never confused."""
    return f"\0exposure-ingest-{host}:{int(port)}"


class IpcError(ValueError):
    """A ring that cannot be made or mapped, or one that is not an exposure IPC ring."""


def ring_size(capacity: int) -> int:
    """The memfd's size for ``capacity`` bytes of data (a power of two in range)."""
    if not MIN_CAPACITY <= capacity <= MAX_CAPACITY or capacity & (capacity - 1):
        raise IpcError(f"IPC ring capacity {capacity}: a power of two in "
                       f"{MIN_CAPACITY}..{MAX_CAPACITY} bytes")
    return DATA + capacity


class IpcRing:
    """One mapped ring. The node makes it (:meth:`create`, keeping the descriptor to pass
    until :meth:`release_fd`); the client maps the descriptor it received
    (:meth:`from_fd`). ``words``: the header as u8 words; ``data``: the DATA bytes."""

    __slots__ = ("mm", "words", "data", "capacity", "mask", "fd")

    def __init__(self, mm: mmap.mmap, capacity: int, fd: int = -1):
        self.mm = mm
        self.capacity = capacity
        self.mask = capacity - 1
        self.words = memoryview(mm)[:DATA].cast("Q")
        self.data = memoryview(mm)[DATA:DATA + capacity]
        self.fd = fd

    @classmethod
    def create(cls, capacity: int, name: str = "exposure-ipc") -> IpcRing:
        size = ring_size(capacity)
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            mm = mmap.mmap(fd, size)
        except OSError as e:
            os.close(fd)
            raise IpcError(f"cannot make an IPC ring of {capacity} bytes: "
                           f"{e.strerror or e}") from None
        ring = cls(mm, capacity, fd)
        ring.words[W_CAPACITY] = capacity
        ring.words[W_MAGIC] = MAGIC
        return ring

    @classmethod
    def from_fd(cls, fd: int) -> IpcRing:
        """Map a ring the node sent (the descriptor is closed here, mapped or not)."""
        try:
            size = os.fstat(fd).st_size
            if size < DATA + MIN_CAPACITY:
                raise IpcError(f"an IPC ring of {size} bytes: too small")
            mm = mmap.mmap(fd, size)
        except OSError as e:
            raise IpcError(f"cannot map the IPC ring: {e.strerror or e}") from None
        finally:
            os.close(fd)
        words = memoryview(mm)[:DATA].cast("Q")
        magic, cap = words[W_MAGIC], words[W_CAPACITY]
        words.release()
        if magic != MAGIC or size != DATA + cap or cap & (cap - 1):
            mm.close()
            raise IpcError(f"not an exposure IPC ring (magic {magic:#x}, capacity {cap}, "
                           f"{size} bytes)")
        return cls(mm, cap)

    def release_fd(self) -> None:
        """The node's copy of the descriptor, once passed (the mapping stays)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------ the node's side
    def take(self, head: int, dst: memoryview, off: int, room: int) -> int:
        """Copy the bytes after ``head`` (the node's own count) into ``dst`` at ``off`` (at
        most ``room``); store the new HEAD; return how many. -1: the client's TAIL is out
        of range (behind ``head`` or more than the capacity ahead)."""
        n = self.words[W_TAIL] - head
        if n <= 0:
            return 0 if n == 0 else -1
        if n > self.capacity:
            return -1
        n = min(n, room)
        a = head & self.mask
        k = min(n, self.capacity - a)
        dst[off:off + k] = self.data[a:a + k]
        if k < n:
            dst[off + k:off + n] = self.data[:n - k]
        self.words[W_HEAD] = head + n
        return n

    # ------------------------------------------------------------------ the client's side
    def room(self) -> int:
        """Bytes the client may write now."""
        return self.capacity - (self.words[W_TAIL] - self.words[W_HEAD])

    def put(self, tail: int, pieces) -> int:
        """Copy ``pieces`` (buffers) at ``tail`` (the client's own count; the caller checked
        the room), then publish the new TAIL; returns it."""
        data, cap, mask = self.data, self.capacity, self.mask
        for p in pieces:
            n = len(p)
            a = tail & mask
            k = cap - a
            if n <= k:
                data[a:a + n] = p
            else:
                data[a:] = p[:k]
                data[:n - k] = p[k:]
            tail += n
        self.words[W_TAIL] = tail
        return tail

    def close(self) -> None:
        self.release_fd()
        self.words.release()
        self.data.release()
        try:
            self.mm.close()
        except BufferError:  # a view still exported somewhere: the mapping goes with it
            pass
