"""The tally state in a POSIX shared-memory segment: one writer (compute), many readers.

Layout: :mod:`exposure.shm.tally_layout`. Here: the segment itself (create, attach, the
writer's pid, close) and the numpy reads of its published rows (:func:`copy_rows`);
nothing here loads numba, so the operator's tools (``exposure status``, ``exposure dump``)
and desks read a node without the compiler. The seqlocks the writer and the jitted readers
use are :mod:`exposure.shm.seqlock`; the rows are written by :mod:`exposure.engine.publish`.

A node that finds a segment of its name whose writer is alive refuses to start; a segment
whose writer is dead is reclaimed.
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
import posix_ipc

from exposure.core.capacity import Capacities
from exposure.shm.segment import release
from exposure.shm.tally_layout import HEADER_DTYPE, State, TallyLayout, prefault

__all__ = ["TallySegment", "SegmentBusy", "SegmentModeError", "copy_rows"]


class SegmentModeError(ValueError):
    """The segment cannot get the configured group or mode ([desks])."""


class SegmentBusy(RuntimeError):
    """A live node already owns a segment of this name."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TallySegment:
    """A mapped tally segment; ``writable`` only in the compute stage."""

    def __init__(self, name: str, shm_size: int, mm: mmap.mmap, writable: bool,
                 owner: bool):
        self.name = name
        self.writable = writable
        self._owner = owner
        self._map = mm
        self.buf = np.frombuffer(mm, dtype=np.uint8)
        self.caps = TallyLayout.caps_of(self.buf)
        self.layout = TallyLayout(self.caps)
        self.layout.check(self.buf)
        self.words = self.buf[: 256].view(np.uint64)
        self.state: State = self.layout.views(self.buf)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, caps: Capacities | None = None, mode: int = 0o600,
               group: str = "") -> TallySegment:
        """Create the segment, reclaiming one left by a dead writer. ``mode`` (permission
        bits, not subject to the umask) and ``group`` (a group name; "" keeps the
        creator's) decide who may map it: desks map it read-only, so with group read and
        no group write the OS enforces "read-only" for the group's members."""
        if mode & 0o022 or mode & 0o600 != 0o600:
            raise ValueError(f"tally segment mode {mode:#o}: the owner reads and writes, "
                             "group and others at most read")
        gid = -1
        if group:
            import grp

            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ValueError(f"tally segment group {group!r}: no such group") from None
        lay = TallyLayout(caps)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=lay.size)
        except posix_ipc.ExistentialError:
            pid = cls.writer_of(name)
            if _alive(pid) and pid != os.getpid():
                raise SegmentBusy(f"tally segment {name} belongs to live process {pid}: "
                                  "another node of this name is running") from None
            posix_ipc.unlink_shared_memory(name)  # a dead node's leftovers
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=lay.size)
        try:
            if gid >= 0:
                os.fchown(shm.fd, -1, gid)
            os.fchmod(shm.fd, mode)
        except OSError as e:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise SegmentModeError(f"tally segment {name}: cannot give it group {group!r} and "
                             f"mode {mode:#o}: {e.strerror} (the node's user must be a "
                             "member of the group)") from None
        mm = mmap.mmap(shm.fd, lay.size)
        shm.close_fd()
        buf = np.frombuffer(mm, dtype=np.uint8)
        prefault(buf)
        lay.init(buf)
        hdr = lay.header(buf)
        hdr["writer_pid"] = os.getpid()
        hdr["writer_start"] = time.time()
        del buf, hdr
        return cls(name, lay.size, mm, writable=True, owner=True)

    @classmethod
    def attach(cls, name: str, writable: bool = False) -> TallySegment:
        """Map an existing segment; read-only (PROT_READ) unless ``writable``."""
        try:
            shm = posix_ipc.SharedMemory(name, read_only=not writable)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"no tally segment {name}: is the node running?") from None
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        # The writer maps every page up front (MAP_POPULATE): no page fault on the hot path.
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if writable else 0)
        mm = mmap.mmap(shm.fd, shm.size, flags=flags, prot=prot)
        size = shm.size
        shm.close_fd()
        return cls(name, size, mm, writable=writable, owner=False)

    @staticmethod
    def writer_of(name: str) -> int:
        """Pid recorded by the segment's writer (0 if unreadable)."""
        try:
            shm = posix_ipc.SharedMemory(name, read_only=True)
        except posix_ipc.ExistentialError:
            return 0
        try:
            if shm.size < 256:
                return 0
            mm = mmap.mmap(shm.fd, 256, prot=mmap.PROT_READ)
            hdr = np.ndarray((), HEADER_DTYPE, buffer=mm)
            pid = int(hdr["writer_pid"])
            del hdr
            mm.close()
            return pid
        finally:
            shm.close_fd()

    def close(self) -> None:
        """Unmap (and unlink, if this process created the segment)."""
        self.state = self.words = self.buf = None  # type: ignore[assignment]
        release(self._map, self.name if self._owner else None)
        self._owner = False

    def __enter__(self) -> TallySegment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def consistent(self, copy, retries: int = 10_000):
        """Run ``copy(state)`` (which must copy what it returns) until it ran while no
        batch was being written; returns its result and the seqlock version it saw."""
        from exposure.shm.seqlock import read_begin, read_end  # (jitted: loads numba)

        for k in range(retries):
            v1 = read_begin(self.words)
            if v1 & 1 == 0:
                out = copy(self.state)
                if read_end(self.words) == v1:
                    return out, int(v1)
            if k > 100:
                time.sleep(0.0001 * min(k - 100, 100))
        raise TimeoutError(f"no consistent read of {self.name} in {retries} tries: the "
                           "writer never paused")


# ----------------------------------------------------------------------------- row seqlocks
def copy_rows(table: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Copies of the published rows ``table[idx]`` (every row when ``idx`` is None), each
    consistent on its own: its version word (``table["ver"]``) even and unchanged across
    the copy, as :func:`exposure.shm.seqlock.read_row` reads a row, in numpy. A row caught
    while being written is copied again, alone; the writer holds a row for the few
    nanoseconds of its stores, so a read never waits for a batch.

    Ordering: the versions are loaded, then the rows, then the versions again, each by
    one numpy copy (separate calls: no compiler moves a load across them). On x86-64 loads
    are not reordered with other loads, so a row whose version was even and the same
    both times was not written in between (the writer stores the odd version, a full
    fence, the row, the even version: :mod:`exposure.engine.publish`).
    """
    ver = table["ver"]
    rows = table.view(np.dtype((np.void, table.dtype.itemsize)))  # (bytes: a fast gather)
    todo = (np.arange(len(table), dtype=np.int64) if idx is None
            else np.asarray(idx, dtype=np.int64))
    v1 = ver[todo]
    out = rows[todo]
    v2 = ver[todo]
    bad = np.flatnonzero((v1 != v2) | (v1 & np.uint64(1) != 0))
    rounds = 0
    while len(bad):  # only the rows caught being written, again
        rounds += 1
        if rounds > 100:  # a writer descheduled mid-row: let it run
            time.sleep(0.0001 * min(rounds - 100, 100))
        at = todo[bad]
        v1 = ver[at]
        again = rows[at]
        v2 = ver[at]
        ok = (v1 == v2) & (v1 & np.uint64(1) == 0)
        out[bad[ok]] = again[ok]
        bad = bad[~ok]
    return out.view(table.dtype)
