"""The producer's durable spool: every event a :class:`~exposure.net.producer.Producer`
accepted, on disk before it goes out, until the node acknowledges it.

A spool directory holds segment files ``spool-<first sseq, 20 digits>.seg``, a lock file
``lock`` and the acknowledged mark ``acked``. A segment is a file header and then blocks,
one block per :meth:`Spool.append` (one ``writev`` and one ``fdatasync`` per call)::

    segment   +--------------------------------------------------------------+ 0
              | file header (64 B): magic "EXSPOOL\\1", version, record size,  |
              |   session, first sseq, creation time, crc32c of the bytes     |
              |   before it                                                    |
              +--------------------------------------------------------------+ 64
              | block header (32 B): magic "SBLK", count, first sseq,          |
              |   payload crc32c, header crc32c (of its first 28 bytes)        |
              | payload: count x 128-byte event records (types.EVENT_DTYPE)   |
              +--------------------------------------------------------------+
              | block ...                                                      |

Session sequence numbers (``sseq``) run on without a gap from block to block and from
segment to segment; a segment holding only its header says where the next append starts
(``last_seq`` survives a spool whose every record was acknowledged and trimmed).

What a reopen accepts:

* the end of the *last* segment may hold a torn block (a kill -9 or a power cut in the
  middle of an append that had not returned): a block header cut short, a payload cut
  short, a bad checksum in the block that reaches the end of the file. It is cut off
  (truncated, logged); a last segment whose file header is cut short or still all zeros
  (a crash while it was being created) is removed;
* anything else that is wrong (a bad checksum with valid data after it, a gap in the
  sequence, a foreign file, another session's segment) is a :class:`SpoolError` naming the
  file and the byte offset; nothing is ever skipped silently.

``acked`` holds two 32-byte slots written in turn (a counter, the acknowledged sseq, a
crc32c); a reopen takes the newest valid one. :meth:`Spool.trim` writes it without a sync
(a kill -9 of the process cannot lose it; a power cut can, and then the producer resends
a little that the node already holds, which the node drops). Segments wholly at or below
the acknowledged sseq are deleted; the newest segment is never deleted but replaced by a
fresh one when its space is needed.

One process at a time: the directory's ``lock`` file is held with ``flock`` for as long as
the spool is open (:class:`SpoolLocked` names the holder's pid).

:meth:`Spool.append`, :meth:`Spool.pending`, :meth:`Spool.trim` and :meth:`Spool.close`
may be called from different threads (one lock); :meth:`Spool.trim` never waits for an
append's ``fdatasync`` except when it moves ``last_seq`` forward.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np

from exposure.core.fs import fsync_dir
from exposure.core.types import EVENT_DTYPE, EVENT_SIZE

__all__ = ["Spool", "SpoolError", "SpoolFull", "SpoolLocked", "FILE_HEADER", "BLOCK_HEADER",
           "segment_name"]

log = logging.getLogger(__name__)

FILE_MAGIC = b"EXSPOOL\x01"
FILE_VERSION = 1
# magic, version, record size, session, reserved, first sseq, created ns, reserved, crc32c
FILE_HEADER = struct.Struct("<8sIIIIQq20sI")
BLOCK_MAGIC = 0x4B4C4253  # "SBLK"
# magic, count, first sseq, payload crc32c, reserved, reserved, header crc32c
BLOCK_HEADER = struct.Struct("<IIQIIII")
_BH_CRC_SPAN = BLOCK_HEADER.size - 4
ACK_MAGIC = 0x4B434153  # "SACK"
# magic, reserved, counter, acked sseq, reserved, crc32c
ACK_SLOT = struct.Struct("<IIQQII")
assert FILE_HEADER.size == 64 and BLOCK_HEADER.size == 32 and ACK_SLOT.size == 32

_CHUNK = 4 << 20        # bytes read at a time (a block is read whole)
_CHECKPOINT = 256 << 10  # an index entry at least every this many bytes of a segment


class SpoolError(RuntimeError):
    """Corruption or misuse a spool must not paper over; names the file and offset."""


class SpoolFull(SpoolError):
    """An append would take the spool past its bound; nothing was written."""


class SpoolLocked(SpoolError):
    """Another process holds the spool directory."""


def segment_name(first_seq: int) -> str:
    return f"spool-{first_seq:020d}.seg"


def _file_header(session: int, first: int) -> bytes:
    head = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, EVENT_SIZE, session, 0, first,
                            time.time_ns(), b"", 0)
    return head[:-4] + struct.pack("<I", crc32c.crc32c(head[:-4]))


def _block_header(count: int, first: int, payload) -> bytes:
    head = BLOCK_HEADER.pack(BLOCK_MAGIC, count, first, crc32c.crc32c(payload), 0, 0, 0)
    return head[:-4] + struct.pack("<I", crc32c.crc32c(head[:_BH_CRC_SPAN]))


@dataclass
class _Seg:
    first: int                      # sseq of its first record (from the name and header)
    path: Path
    size: int                       # bytes in the file
    # (sseq, offset) of block starts, at least one per _CHECKPOINT bytes: where a read of
    # sseq >= that one may begin
    marks: list[tuple[int, int]] = field(default_factory=list)

    def mark(self, seq: int, off: int) -> None:
        if not self.marks or off - self.marks[-1][1] >= _CHECKPOINT:
            self.marks.append((seq, off))


@dataclass
class _Block:
    offset: int
    first: int
    records: np.ndarray


def _blocks(fd: int, seg: _Seg, size: int, start_off: int, expect: int,
            torn_ok: bool) -> Iterator[_Block]:
    """The checked blocks of one segment from ``start_off`` (a block start whose first
    sseq is ``expect``) to ``size``. A torn block at the end of the file ends the iteration
    with ``StopIteration.value`` = its offset when ``torn_ok``; anything else wrong raises."""
    path = seg.path
    base = start_off
    data = os.pread(fd, min(size - base, _CHUNK), base)
    pos = 0
    while base + pos < size:
        need = BLOCK_HEADER.size
        if len(data) - pos >= BLOCK_HEADER.size:
            need += BLOCK_HEADER.unpack_from(data, pos)[1] * EVENT_SIZE
        if len(data) - pos < need and base + len(data) < size:
            base += pos
            data = os.pread(fd, min(size - base, max(_CHUNK, need)), base)
            pos = 0
            continue
        off = base + pos
        torn = None
        if len(data) - pos < BLOCK_HEADER.size:
            torn = "block header cut short"
        else:
            magic, count, bfirst, pcrc, _, _, hcrc = BLOCK_HEADER.unpack_from(data, pos)
            end = pos + BLOCK_HEADER.size + count * EVENT_SIZE
            if magic != BLOCK_MAGIC or hcrc != crc32c.crc32c(data[pos:pos + _BH_CRC_SPAN]):
                torn = "block header checksum fails"
            elif end > len(data):
                torn = "block payload cut short"
            elif pcrc != crc32c.crc32c(memoryview(data)[pos + BLOCK_HEADER.size:end]):
                torn = "block payload checksum fails"
                if base + end < size:
                    raise SpoolError(f"{path}: offset {off}: {torn} (valid data follows: "
                                     "corruption, not a torn write)")
            elif count == 0:
                raise SpoolError(f"{path}: offset {off}: an empty block")
        if torn is not None:
            if not torn_ok:
                raise SpoolError(f"{path}: offset {off}: {torn} in a segment that is not "
                                 "the last")
            return off
        if bfirst != expect:
            raise SpoolError(f"{path}: offset {off}: block starts at sseq {bfirst}, "
                             f"expected {expect}")
        recs = np.frombuffer(data, EVENT_DTYPE, count, pos + BLOCK_HEADER.size)
        yield _Block(off, bfirst, recs)
        expect = bfirst + count
        pos = end
    return None


class Spool:
    """A producer's spool in ``directory`` (created, or reopened as a kill -9 left it).

    ``max_bytes`` bounds the segment files' total size (:attr:`bytes_held`);
    ``segment_bytes`` is where a segment ends (default: a sixteenth of ``max_bytes``,
    between 1 MiB, or a quarter of a smaller bound, and 64 MiB). ``session``: the session
    the spool belongs to (a reopen of another session's spool is an error; ``None`` takes
    whatever the spool holds, 0 for a new one)."""

    def __init__(self, directory: str | Path, max_bytes: int = 1 << 30,
                 session: int | None = None, *, segment_bytes: int | None = None):
        self.dir = Path(directory)
        self.max_bytes = int(max_bytes)
        if segment_bytes is None:
            segment_bytes = min(64 << 20, max(min(1 << 20, self.max_bytes // 4),
                                              self.max_bytes // 16))
        self.segment_bytes = int(segment_bytes)
        if self.max_bytes < FILE_HEADER.size + BLOCK_HEADER.size + EVENT_SIZE:
            raise ValueError(f"max_bytes {self.max_bytes}: too small for one record")
        self._lock = threading.Lock()     # segments, the active file, last_seq
        self._ack_lock = threading.Lock()  # the acked file
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = -1
        self._fd = -1
        self._ack_fd = -1
        self._segs: list[_Seg] = []
        self.last_seq = 0
        self.acked_seq = 0
        self._ack_count = 0
        self._take_lock()
        try:
            self._ack_fd = os.open(self.dir / "acked", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                   0o600)
            self._open(session)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------- opening

    def _take_lock(self) -> None:
        path = self.dir / "lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(f"spool {self.dir} is in use by another producer (pid "
                              f"{holder}); one process at a time") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _read_acked(self) -> int:
        data = os.pread(self._ack_fd, 2 * ACK_SLOT.size, 0)
        best = (-1, 0)
        for k in range(2):
            slot = data[k * ACK_SLOT.size:(k + 1) * ACK_SLOT.size]
            if len(slot) < ACK_SLOT.size:
                continue
            magic, _, count, acked, _, crc = ACK_SLOT.unpack(slot)
            if magic == ACK_MAGIC and crc == crc32c.crc32c(slot[:-4]):
                best = max(best, (count, acked))
        self._ack_count = best[0] + 1
        return best[1]

    def _write_acked(self, acked: int) -> None:
        slot = ACK_SLOT.pack(ACK_MAGIC, 0, self._ack_count, acked, 0, 0)
        slot = slot[:-4] + struct.pack("<I", crc32c.crc32c(slot[:-4]))
        os.pwrite(self._ack_fd, slot, (self._ack_count & 1) * ACK_SLOT.size)
        self._ack_count += 1

    def _list(self) -> list[tuple[int, Path]]:
        out = []
        for p in self.dir.glob("spool-*.seg"):
            try:
                out.append((int(p.name[6:26]), p))
            except ValueError:
                raise SpoolError(f"{p}: not a spool segment name") from None
            if len(p.name) != 30:
                raise SpoolError(f"{p}: not a spool segment name")
        return sorted(out)

    def _open(self, session: int | None) -> None:
        acked_file = self._read_acked()
        listed = self._list()
        self.session = session
        segs: list[_Seg] = []
        expect = None
        for k, (first, path) in enumerate(listed):
            last = k == len(listed) - 1
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                head = os.pread(fd, FILE_HEADER.size, 0)
                if last and (len(head) < FILE_HEADER.size or not any(head)):
                    log.warning("spool %s: removing %s: its file header is cut short (%d "
                                "bytes; a crash while it was being created)", self.dir,
                                path.name, size)
                    path.unlink()
                    fsync_dir(self.dir)
                    break
                hsess = self._check_header(path, head, first)
                if self.session is None:
                    self.session = hsess
                elif hsess != self.session:
                    raise SpoolError(f"{path}: offset 0: a segment of session {hsess}, "
                                     f"this spool is opened for session {self.session}")
                if expect is not None and first != expect:
                    if first > expect and acked_file >= first - 1:
                        # segments before a gap that the acknowledgement covers: left over
                        # from a trim that a crash interrupted
                        for s in segs:
                            s.path.unlink(missing_ok=True)
                        fsync_dir(self.dir)
                        segs = []
                    else:
                        raise SpoolError(f"{path}: offset 0: starts at sseq {first}, "
                                         f"expected {expect} (a segment is missing)")
                seg = _Seg(first, path, size)
                torn = None
                gen = _blocks(fd, seg, size, FILE_HEADER.size, first, torn_ok=last)
                nxt = first
                while True:
                    try:
                        b = next(gen)
                    except StopIteration as stop:
                        torn = stop.value
                        break
                    seg.mark(b.first, b.offset)
                    nxt = b.first + len(b.records)
                if torn is not None:
                    log.warning("spool %s: cut a torn tail off %s at offset %d (%d bytes: "
                                "an append that had not returned)", self.dir, path.name,
                                torn, size - torn)
                    with open(path, "r+b") as f:
                        f.truncate(torn)
                        os.fsync(f.fileno())
                    seg.size = torn
                segs.append(seg)
                expect = nxt
            finally:
                os.close(fd)
        if self.session is None:
            self.session = 0
        self._segs = segs
        if segs:
            self.last_seq = expect - 1
            self.acked_seq = max(segs[0].first - 1, min(acked_file, self.last_seq))
            act = segs[-1]
            self._fd = os.open(act.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if acked_file > self.last_seq:
            # acknowledged beyond what the segments hold (they were lost or removed): never
            # hand out an acknowledged sseq again
            log.warning("spool %s: acknowledged up to sseq %d, the segments end at %d: "
                        "continuing after %d", self.dir, acked_file, self.last_seq, acked_file)
            with self._lock:
                self._roll(acked_file + 1, [], 0)
            self.last_seq = self.acked_seq = acked_file
        with self._lock:
            self._drop_acked()

    def _check_header(self, path: Path, head: bytes, first_named: int) -> int:
        if len(head) < FILE_HEADER.size:
            raise SpoolError(f"{path}: offset 0: file header cut short ({len(head)} bytes)")
        magic, ver, rsize, sess, _, first, _, _, crc = FILE_HEADER.unpack(head)
        if magic != FILE_MAGIC:
            raise SpoolError(f"{path}: offset 0: not a spool segment (magic {magic!r})")
        if crc != crc32c.crc32c(head[:-4]):
            raise SpoolError(f"{path}: offset 0: file header checksum fails")
        if ver != FILE_VERSION or rsize != EVENT_SIZE:
            raise SpoolError(f"{path}: offset 0: version {ver} / record size {rsize}, this "
                             f"build reads version {FILE_VERSION} / {EVENT_SIZE}")
        if first != first_named:
            raise SpoolError(f"{path}: offset 0: header says first sseq {first}, the name "
                             f"{first_named}")
        return sess

    # ----------------------------------------------------------------------- state

    @property
    def bytes_held(self) -> int:
        """Bytes in the segment files (what the bound counts)."""
        return sum(s.size for s in self._segs)

    @property
    def unacked(self) -> int:
        """Records spooled and not yet acknowledged."""
        return self.last_seq - self.acked_seq

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Spool({str(self.dir)!r}, session={self.session}, last_seq={self.last_seq}, "
                f"acked_seq={self.acked_seq}, bytes_held={self.bytes_held})")

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise SpoolError(f"spool {self.dir} is closed")

    # ----------------------------------------------------------------------- writing

    def _drop_acked(self) -> None:
        """Delete the segments (not the newest) wholly at or below ``acked_seq``. Holds
        ``_lock``."""
        n = 0
        while len(self._segs) > 1 and self._segs[1].first - 1 <= self.acked_seq:
            self._segs.pop(0).path.unlink(missing_ok=True)
            n += 1
        if n:
            fsync_dir(self.dir)

    def _full(self, n: int, need: int) -> SpoolFull:
        return SpoolFull(
            f"spool {self.dir} is full: {self.bytes_held} bytes held in {len(self._segs)} "
            f"segment(s), {self.unacked} record(s) not acknowledged (sseq "
            f"{self.acked_seq + 1}..{self.last_seq}); an append of {n} record(s) needs "
            f"{need} bytes more and the bound is max_bytes={self.max_bytes}")

    def append(self, records: np.ndarray) -> None:
        """Spool ``records`` (EVENT_DTYPE, ``sseq`` set, consecutive after
        :attr:`last_seq`) as one block: durable (written and ``fdatasync``'ed) on return.
        :class:`SpoolFull` (nothing written) if it would take the spool past ``max_bytes``."""
        recs = np.ascontiguousarray(records)
        if recs.dtype != EVENT_DTYPE:
            raise TypeError(f"spool append: records of dtype {recs.dtype}, not EVENT_DTYPE")
        recs = recs.reshape(-1)
        n = len(recs)
        if n == 0:
            return
        with self._lock:
            self._check_open()
            sseq = recs["sseq"]
            first = int(sseq[0])
            if (first != self.last_seq + 1 or int(sseq[-1]) != first + n - 1
                    or (n > 2 and bool(np.any(np.diff(sseq) != 1)))):
                raise ValueError(f"spool append: sseq {first}..{int(sseq[-1])} ({n} records) "
                                 f"is not consecutive after last_seq {self.last_seq}")
            payload = recs.view(np.uint8)
            bhead = _block_header(n, first, payload)
            need = len(bhead) + n * EVENT_SIZE
            act = self._segs[-1] if self._segs else None
            # a new segment when there is none, the newest is past its size, or the space
            # the newest takes is wholly acknowledged and needed
            roll = act is None or (act.size + need > self.segment_bytes
                                   and act.size > FILE_HEADER.size)
            if not roll and self.bytes_held + need > self.max_bytes \
                    and self.acked_seq >= self.last_seq and act.size > FILE_HEADER.size:
                roll = True
            grow = need + (FILE_HEADER.size if roll else 0)
            freed = act.size if roll and act is not None and self.acked_seq >= self.last_seq \
                else 0
            if self.bytes_held - freed + grow > self.max_bytes:
                raise self._full(n, grow)
            if roll:
                self._roll(first, [bhead, payload], n)
            else:
                self._write(act, [bhead, payload], need)
                act.mark(first, act.size)
                act.size += need
            self.last_seq = first + n - 1
            self._drop_acked()

    def _write(self, act: _Seg, parts: list, total: int) -> None:
        done = 0
        try:
            done = os.writev(self._fd, parts)
            if done != total:
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write to "
                              f"{act.path}: {done} of {total} bytes)")
            os.fdatasync(self._fd)
        except OSError:
            # never leave part of a block behind an append that failed
            try:
                os.ftruncate(self._fd, act.size)
            except OSError:
                log.exception("spool %s: could not cut a failed append off %s", self.dir,
                              act.path)
            raise

    def _roll(self, first: int, parts: list, n: int) -> None:
        """A new newest segment starting at ``first`` holding ``parts`` (a header-only
        segment when ``parts`` is empty), durable with its directory entry."""
        path = self.dir / segment_name(first)
        head = _file_header(self.session, first)
        total = len(head) + sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        try:
            done = os.writev(fd, [head, *parts])
            if done != total:
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write to "
                              f"{path}: {done} of {total} bytes)")
            os.fdatasync(fd)
            fsync_dir(self.dir)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        seg = _Seg(first, path, total)
        if n:
            seg.mark(first, len(head))
        self._segs.append(seg)

    def trim(self, acked_seq: int) -> None:
        """Forget the records at or below ``acked_seq`` (acknowledged by the node): the
        mark is written (no sync), whole segments deleted. An ``acked_seq`` past
        :attr:`last_seq` (the node holds more of this session than the spool) moves
        ``last_seq`` there: the next append continues after it."""
        acked_seq = int(acked_seq)
        if acked_seq <= self.acked_seq:
            return
        if acked_seq > self.last_seq:
            with self._lock:
                self._check_open()
                if acked_seq > self.last_seq:
                    self._roll(acked_seq + 1, [], 0)
                    self.last_seq = acked_seq
        with self._ack_lock:
            self._check_open()
            if acked_seq <= self.acked_seq:
                return
            self.acked_seq = acked_seq
            self._write_acked(acked_seq)
        # deleting segments waits for no append: the next append does it otherwise
        if self._lock.acquire(blocking=False):
            try:
                if self._lock_fd >= 0:
                    self._drop_acked()
            finally:
                self._lock.release()

    # ----------------------------------------------------------------------- reading

    def pending(self, after_seq: int = 0, limit: int | None = None) -> np.ndarray:
        """Every spooled record with ``sseq > after_seq`` and above the acknowledged mark,
        in order (a copy; at most ``limit`` records when given). Raises
        :class:`SpoolError` on a record that fails its checksum."""
        with self._lock:
            self._check_open()
            start = max(int(after_seq), self.acked_seq) + 1
            stop = self.last_seq + 1
            if limit is not None:
                stop = min(stop, start + max(0, int(limit)))
            if start >= stop:
                return np.empty(0, EVENT_DTYPE)
            out = np.empty(stop - start, EVENT_DTYPE)
            firsts = [s.first for s in self._segs]
            k = max(0, bisect.bisect_right(firsts, start) - 1)
            at = start
            while at < stop and k < len(self._segs):
                seg = self._segs[k]
                if not seg.marks:  # a segment of its header only
                    k += 1
                    continue
                i = max(0, bisect.bisect_right(seg.marks, (at, 1 << 62)) - 1)
                mseq, moff = seg.marks[i]
                fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    for b in _blocks(fd, seg, seg.size, moff, mseq, torn_ok=False):
                        lo = max(at, b.first) - b.first
                        hi = min(stop, b.first + len(b.records)) - b.first
                        if hi > lo:
                            out[at - start:at - start + hi - lo] = b.records[lo:hi]
                            at += hi - lo
                        if at >= stop:
                            break
                finally:
                    os.close(fd)
                k += 1
            if at != stop:
                raise SpoolError(f"spool {self.dir}: sseq {at}..{stop - 1} missing from the "
                                 "segments")
            return out

    # ----------------------------------------------------------------------- closing

    def close(self) -> None:
        """Close the files and let the directory go (idempotent)."""
        with self._lock, self._ack_lock:
            for name in ("_fd", "_ack_fd", "_lock_fd"):
                fd = getattr(self, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)
