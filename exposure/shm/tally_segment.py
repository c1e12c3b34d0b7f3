"""The tally state in a POSIX shared-memory segment: one writer (compute), many readers.

Layout: :mod:`exposure.shm.tally_layout` (the header's ``seqlock`` word sits on its own
cache line at byte 128). The writer brackets every batch with :func:`write_begin` /
:func:`write_end`; readers copy what they need between :func:`read_begin` and
:func:`read_end` and retry when the version moved or was odd, so a reader never returns a
row, or a set of rows, that a batch was in the middle of changing.

Ordering argument (seqlock):
* writer: ``store_release(seq, odd)`` then a full fence, so no data store of the batch can
  become visible (or be compiled) before the odd version; the batch's stores; then
  ``store_release(seq, even)``, after all of them.
* reader: ``load_acquire(seq)`` before the copy, so the copy cannot read older data than
  that version; a full fence, then the second ``load_acquire(seq)``, so the copy's loads
  complete before the version is re-read. Equal and even: nothing was written in between.

A node that finds a segment of its name whose writer is alive refuses to start; a segment
whose writer is dead is reclaimed.
"""

from __future__ import annotations

import mmap
import os
import time

import numpy as np
import posix_ipc
from numba import njit

from exposure.core.capacity import Capacities
from exposure.core.types import C_LIVE, C_NCHANGED, K_NET_LONG, K_NET_SHORT
from exposure.engine.kernel import account_values
from exposure.shm.intrinsics import fence_seq_cst, load_acquire, store_release
from exposure.shm.segment import release
from exposure.shm.tally_layout import HEADER_DTYPE, State, TallyLayout, prefault

__all__ = ["TallySegment", "SegmentBusy", "SegmentModeError", "write_begin", "write_end",
           "read_begin", "read_end", "publish", "read_row"]

_SEQ_WORD = HEADER_DTYPE.fields["seqlock"][1] // 8


class SegmentModeError(ValueError):
    """The segment cannot get the configured group or mode ([desks])."""


class SegmentBusy(RuntimeError):
    """A live node already owns a segment of this name."""


@njit(cache=True, _nrt=False)
def write_begin(words):
    v = np.uint64(words[_SEQ_WORD] + np.uint64(1))
    store_release(words, _SEQ_WORD, v)
    fence_seq_cst()


@njit(cache=True, _nrt=False)
def write_end(words):
    store_release(words, _SEQ_WORD, np.uint64(words[_SEQ_WORD] + np.uint64(1)))


@njit(cache=True, _nrt=False)
def read_begin(words):
    return load_acquire(words, _SEQ_WORD)


@njit(cache=True, _nrt=False)
def read_end(words):
    fence_seq_cst()
    return load_acquire(words, _SEQ_WORD)


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
@njit(cache=True, _nrt=False)
def set_values(row, vals):
    """The SPEC's ten account values of a row (published row or fan-out update) from the
    eight kept tallies ``vals`` (types.K_* order)."""
    row.long_mv = vals[0]
    row.short_mv = vals[1]
    row.gross = vals[0] + vals[1]
    row.net = vals[0] - vals[1]
    row.open_buy_mv = vals[2]
    row.open_sell_mv = vals[3]
    row.worst_gross = vals[4]
    row.margin = vals[5]
    row.beta_net = vals[6]
    row.pnl = vals[7]


@njit(cache=True, _nrt=False)
def _put_row(pub, ver, r, vals, live, breach, gseq, nl, ns):
    v = np.uint64(ver[r] + np.uint64(1))
    store_release(ver, r, v)  # odd: being written
    fence_seq_cst()
    row = pub[r]
    row.gseq = gseq
    set_values(row, vals)
    row.live_orders = live
    row.breach = breach
    row.net_long_mv = nl
    row.net_short_mv = ns
    store_release(ver, r, np.uint64(v + np.uint64(1)))  # even: complete


@njit(cache=True)
def publish(st, ver, last_gseq):
    """After a batch: publish the changed accounts' rows and the fund row.

    ``ver`` is ``st.pub['ver']`` (a strided u8 view). Each row is written under its own
    version, so a reader copying one row never waits for more than one row's stores.
    """
    vals = np.empty(8)  # the only allocation: once per batch, not per event
    n = st.ctr[C_NCHANGED]
    for k in range(n):
        a = np.int64(st.changed[k])
        b = np.int64(account_values(st.acc, st.acc_lim, a, vals))
        _put_row(st.pub, ver, a, vals, np.int64(st.acc_live[a]), b, np.uint64(st.acc_gseq[a]),
                 0.0, 0.0)
    for j in range(8):
        vals[j] = st.fund[j, 0] + st.fund[j, 1]
    _put_row(st.pub, ver, np.int64(st.acc.shape[0]), vals, np.int64(st.ctr[C_LIVE]),
             np.int64(0), np.uint64(last_gseq),
             st.fund[K_NET_LONG, 0] + st.fund[K_NET_LONG, 1],
             st.fund[K_NET_SHORT, 0] + st.fund[K_NET_SHORT, 1])


@njit(cache=True, _nrt=False)
def read_row(pub, ver, r, out):
    """Copy published row ``r`` into ``out[0]`` consistently; returns the attempts used."""
    tries = 0
    while True:
        tries += 1
        v1 = load_acquire(ver, r)
        if v1 & np.uint64(1) == 0:
            out[0] = pub[r]
            fence_seq_cst()
            if load_acquire(ver, r) == v1:
                return tries


@njit(cache=True, _nrt=False)
def read_rows(pub, ver, out):
    """Copy every published row consistently (each row on its own); returns total tries."""
    tries = 0
    for r in range(pub.shape[0]):
        tries += read_row(pub, ver, r, out[r:r + 1])
    return tries
