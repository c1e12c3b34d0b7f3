"""Lock-free single-producer ring of fixed-size records in POSIX shared memory, with one
consumer or two (each record written once, read by both: a Disruptor gating sequence).

The hot paths are the ``@njit`` functions :func:`ring_push` and :func:`ring_pop`, which move
a whole batch per call (one release store per batch). :class:`Ring` owns the segment: it
creates it (mode 0600, exclusive), attaches to it (checking the header), maps it, and
unlinks it. See :mod:`exposure.shm.ring_layout` for the layout and
:mod:`exposure.shm.intrinsics` for the ordering argument.

A process uses one end only: exactly one producer, and one process per consumer. Consumer
0 is the ring itself (:func:`ring_pop`, ``len(ring)``, ``ring.semaphore``); consumer 1 of a
two-consumer ring is :meth:`Ring.reader` ``(1)``, a :class:`RingReader` with the same
surface, whose jitted pop is :func:`ring_pop_at` with its own head word.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import posix_ipc
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.shm import ring_layout as L
from exposure.shm.intrinsics import fence_seq_cst, load_acquire, store_release
from exposure.shm.segment import release

__all__ = ["Ring", "RingReader", "ring_push", "ring_pop", "ring_pop_at", "ring_size",
           "ring_size_at", "producer_head", "journal_asleep", "RingError"]


class RingError(L.RingLayoutError):
    """A ring segment that is missing, foreign or of another shape."""


@njit(inline="always", cache=True, _nrt=False)
def _slowest_head(ctrl):
    """The head the producer may fill up to: consumer 0's, or the smaller of the two
    (load_acquire: each consumer's reads of the slots it passed happened before). The
    consumer count is written once, before the ring is published (the magic)."""
    head = np.int64(load_acquire(ctrl, L.W_HEAD))
    if ctrl[L.W_CONSUMERS] > 1:
        head2 = np.int64(load_acquire(ctrl, L.W_HEAD2))
        if head2 < head:
            head = head2
    return head


@njit(inline="always", cache=True, _nrt=False)
def producer_head(ctrl, tail, head, cap):
    """For a producer that writes one record at a time into its own view of the ring:
    the consumers' position as far as slot ``tail`` needs it. ``head`` is the position
    last seen; only while it says the ring is full is the real one loaded (the slowest
    consumer's) and cached in ``W_HEAD_CACHE``. The slot is free when
    ``tail - result < cap``."""
    if tail - head >= cap:
        head = _slowest_head(ctrl)
        ctrl[L.W_HEAD_CACHE] = head
    return head


@njit(cache=True, _nrt=False)
def ring_push(ctrl, slots, src, n):
    """Copy up to ``n`` records from ``src`` (uint64 [>=n, record size / 8]) into the ring.

    Returns how many were written (fewer when the ring is full: back-pressure). The records
    become visible to the consumers all at once, with one release store of the tail.
    """
    cap = slots.shape[0]
    mask = cap - 1
    # Positions as int64 (u64 - i64 would be float64 in numba; 2**63 records is forever).
    tail = np.int64(ctrl[L.W_TAIL])  # only this process writes it
    head = np.int64(ctrl[L.W_HEAD_CACHE])
    if cap - (tail - head) < n:
        head = _slowest_head(ctrl)
        ctrl[L.W_HEAD_CACHE] = head
    m = min(n, cap - (tail - head))
    rs = slots.shape[1]
    for k in range(m):
        j = (tail + k) & mask
        for b in range(rs):
            slots[j, b] = src[k, b]
    if m > 0:
        store_release(ctrl, L.W_TAIL, tail + m)  # publish: payload writes happen-before
    return m


@njit(cache=True, _nrt=False)
def ring_pop_at(ctrl, slots, dst, max_n, head_word):
    """Consumer whose head is ``head_word``: copy up to ``max_n`` available records into
    ``dst`` (uint64 [>=max_n, record size / 8]); return how many."""
    cap = slots.shape[0]
    mask = cap - 1
    head = np.int64(ctrl[head_word])  # only this consumer writes it
    tail = np.int64(load_acquire(ctrl, L.W_TAIL))  # payload reads below happen-after
    m = min(max_n, tail - head)
    rs = slots.shape[1]
    for k in range(m):
        j = (head + k) & mask
        for b in range(rs):
            dst[k, b] = slots[j, b]
    if m > 0:
        store_release(ctrl, head_word, head + m)  # frees the slots (once both passed them)
    return m


@njit(cache=True, _nrt=False)
def ring_pop(ctrl, slots, dst, max_n):
    """Consumer 0: :func:`ring_pop_at` with ``W_HEAD``."""
    return ring_pop_at(ctrl, slots, dst, max_n, L.W_HEAD)


@njit(cache=True, _nrt=False)
def ring_size_at(ctrl, head_word):
    """Records published and not yet taken by the consumer whose head is ``head_word`` (a
    consistent lower bound from either side)."""
    return np.int64(load_acquire(ctrl, L.W_TAIL)) - np.int64(load_acquire(ctrl, head_word))


@njit(cache=True, _nrt=False)
def ring_size(ctrl):
    """Consumer 0's backlog: :func:`ring_size_at` with ``W_HEAD``."""
    return ring_size_at(ctrl, L.W_HEAD)


@njit(cache=True, _nrt=False)
def announce_sleep(ctrl, word):
    """Set a sleeping flag, then a full fence: a following emptiness check cannot be
    reordered before the flag store, so a producer that publishes after the check sees the
    flag and wakes the sleeper (no lost wake-up)."""
    store_release(ctrl, word, np.uint64(1))
    fence_seq_cst()


@njit(cache=True, _nrt=False)
def clear_sleep(ctrl, word):
    store_release(ctrl, word, np.uint64(0))


@njit(cache=True, _nrt=False)
def sleeping(ctrl, word):
    """After a publish: is the other side asleep? (The fence orders the tail store before
    this load.)"""
    fence_seq_cst()
    return load_acquire(ctrl, word) != 0


@njit(cache=True, _nrt=False)
def journal_asleep(ctrl):
    """After a publish and :func:`sleeping` of consumer 0 (whose fence orders the tail
    store before this load): is consumer 1 of a two-consumer ring asleep? 0 or 1."""
    if ctrl[L.W_CONSUMERS] > 1 and load_acquire(ctrl, L.W_CONSUMER2_SLEEPING) != 0:
        return 1
    return 0


def _shm_name(name: str) -> str:
    if not name or "/" in name.lstrip("/") or len(name) > 200:
        raise RingError(f"ring name {name!r} must be a non-empty path component")
    return name if name.startswith("/") else "/" + name


class _ConsumerEnd:
    """What one consumer of a ring uses: its pop, its backlog and its wake-up semaphore,
    by its head word, sleeping word and semaphore name (:class:`Ring` is consumer 0's end,
    :class:`RingReader` consumer 1's)."""

    ctrl: np.ndarray
    slots: np.ndarray
    record_size: int
    head_word: int
    sleep_word: int
    _semname: str
    _sem: posix_ipc.Semaphore | None

    def pop(self, out: np.ndarray) -> int:
        """Pop into a record array; returns how many records were written to ``out``."""
        dst = out.view(np.uint64).reshape(len(out), self.record_size // 8)
        return int(ring_pop_at(self.ctrl, self.slots, dst, len(out), self.head_word))

    def __len__(self) -> int:
        return int(ring_size_at(self.ctrl, self.head_word))

    @property
    def semaphore(self) -> posix_ipc.Semaphore:
        """This consumer's wake-up semaphore (created on first use, removed with the
        ring)."""
        if self._sem is None:
            self._sem = posix_ipc.Semaphore(self._semname, posix_ipc.O_CREAT, mode=0o600,
                                            initial_value=0)
        return self._sem


class Ring(_ConsumerEnd):
    """One SPSC ring segment, mapped into this process."""

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, owner: bool):
        self.name = name
        self._owner = owner
        size = shm.size
        self._map = mmap.mmap(shm.fd, size)
        shm.close_fd()
        buf = np.frombuffer(self._map, dtype=np.uint8)
        self.ctrl = buf[: L.HEADER_BYTES].view(np.uint64)
        cap, rs = int(self.ctrl[L.W_CAPACITY]), int(self.ctrl[L.W_RECORD_SIZE])
        self.capacity, self.record_size = cap, rs
        self.consumers = int(self.ctrl[L.W_CONSUMERS])
        # Slots as 8-byte words: records are multiples of 8 bytes, and word copies are what
        # the copy loops vectorise well.
        self.slots = buf[L.HEADER_BYTES: L.HEADER_BYTES + cap * rs].view(np.uint64).reshape(
            cap, rs // 8)
        self._semname = name
        self._sem = None
        self._reader: RingReader | None = None

    # consumer 0's words (a RingReader has its own)
    head_word = L.W_HEAD
    sleep_word = L.W_CONSUMER_SLEEPING

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, name: str, capacity: int, record_size: int, consumers: int = 1) -> Ring:
        """Create (exclusively, mode 0600) and initialise a ring segment read by
        ``consumers`` consumers (1 or 2)."""
        size = L.segment_size(capacity, record_size)
        L.check_consumers(consumers)
        nm = _shm_name(name)
        try:
            shm = posix_ipc.SharedMemory(nm, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError as e:
            raise RingError(f"ring segment {nm} already exists") from e
        ctrl = np.frombuffer(mmap.mmap(shm.fd, L.HEADER_BYTES), dtype=np.uint64)
        ctrl[L.W_RECORD_SIZE] = record_size
        ctrl[L.W_CAPACITY] = capacity
        ctrl[L.W_CREATOR] = os.getpid()
        ctrl[L.W_CONSUMERS] = consumers
        ctrl[L.W_VERSION] = L.VERSION
        ctrl[L.W_MAGIC] = L.MAGIC  # last: an attacher that sees the magic sees the rest
        del ctrl
        return cls(nm, shm, owner=True)

    @classmethod
    def attach(cls, name: str, record_size: int | None = None,
               capacity: int | None = None) -> Ring:
        """Map an existing ring, checking magic, version and (if given) the shape."""
        nm = _shm_name(name)
        try:
            shm = posix_ipc.SharedMemory(nm)
        except posix_ipc.ExistentialError as e:
            raise RingError(f"ring segment {nm} does not exist") from e
        if shm.size < L.HEADER_BYTES:
            shm.close_fd()
            raise RingError(f"ring segment {nm} is {shm.size} bytes: too small for a header")
        hdr = np.frombuffer(mmap.mmap(shm.fd, L.HEADER_BYTES), dtype=np.uint64).copy()
        problem = None
        if int(hdr[L.W_MAGIC]) != L.MAGIC:
            problem = f"bad magic {int(hdr[L.W_MAGIC]):#x} (expected {L.MAGIC:#x})"
        elif int(hdr[L.W_VERSION]) != L.VERSION:
            problem = f"layout version {int(hdr[L.W_VERSION])}, expected {L.VERSION}"
        elif record_size is not None and int(hdr[L.W_RECORD_SIZE]) != record_size:
            problem = f"record size {int(hdr[L.W_RECORD_SIZE])}, expected {record_size}"
        elif not 1 <= int(hdr[L.W_CONSUMERS]) <= L.MAX_CONSUMERS:
            problem = f"{int(hdr[L.W_CONSUMERS])} consumers, expected 1..{L.MAX_CONSUMERS}"
        elif capacity is not None and int(hdr[L.W_CAPACITY]) != capacity:
            problem = f"capacity {int(hdr[L.W_CAPACITY])}, expected {capacity}"
        elif shm.size < L.segment_size(int(hdr[L.W_CAPACITY]), int(hdr[L.W_RECORD_SIZE])):
            problem = f"segment of {shm.size} bytes is smaller than its header says"
        if problem:
            shm.close_fd()
            raise RingError(f"ring segment {nm}: {problem}")
        return cls(nm, shm, owner=False)

    def close(self) -> None:
        """Unmap (and unlink, if this process created the segment)."""
        if self._sem is not None:
            self._sem.close()
            self._sem = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self.ctrl = self.slots = None  # type: ignore[assignment]
        release(self._map, None)
        if self._owner:
            self.unlink(self.name)  # the segment and its wake-up semaphore
            self._owner = False

    @staticmethod
    def unlink(name: str) -> None:
        """Remove a ring segment (and its wake-up semaphore) by name; missing is fine."""
        nm = _shm_name(name)
        for remove, what in ((posix_ipc.unlink_shared_memory, nm),
                             (posix_ipc.unlink_semaphore, nm),
                             (posix_ipc.unlink_semaphore, RingReader.semaphore_name(nm, 1))):
            try:
                remove(what)
            except posix_ipc.ExistentialError:
                pass

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ convenience
    def push(self, recs: np.ndarray) -> int:
        """Push a record array (itemsize = record size); returns how many fit."""
        src = recs.view(np.uint64).reshape(len(recs), self.record_size // 8)
        return int(ring_push(self.ctrl, self.slots, src, len(recs)))

    def reader(self, k: int) -> Ring | RingReader:
        """Consumer ``k``'s end: the ring itself for 0, a :class:`RingReader` for 1."""
        if not 0 <= k < self.consumers:
            raise RingError(f"ring {self.name} has {self.consumers} consumer(s): no "
                            f"consumer {k}")
        if k == 0:
            return self
        if self._reader is None:
            self._reader = RingReader(self, k)
        return self._reader


class RingReader(_ConsumerEnd):
    """Consumer ``k`` (> 0) of a ring: its slots and control words, its head and sleeping
    words, its own wake-up semaphore and backlog; what :class:`exposure.shm.wait.WaitStrategy`
    and a consumer stage need, as for consumer 0 on the :class:`Ring` itself."""

    def __init__(self, ring: Ring, k: int):
        self.ring = ring
        self.name = ring.name
        self.ctrl, self.slots = ring.ctrl, ring.slots
        self.capacity, self.record_size = ring.capacity, ring.record_size
        self.head_word = L.HEAD_WORDS[k]
        self.sleep_word = L.SLEEP_WORDS[k]
        self._semname = self.semaphore_name(ring.name, k)
        self._sem: posix_ipc.Semaphore | None = None

    @staticmethod
    def semaphore_name(ring_name: str, k: int) -> str:
        return f"{ring_name}.c{k}"

    def close(self) -> None:
        """Drop the views (the ring unmaps) and close the semaphore (the ring's creator
        removes it)."""
        if self._sem is not None:
            self._sem.close()
            self._sem = None
        self.ctrl = self.slots = None  # type: ignore[assignment]
