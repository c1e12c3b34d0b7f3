"""The journal: every sequenced input record, in global sequence order, on disk.

A data directory holds segment files ``journal-<first gseq, 20 digits>.seg``; a segment is
a file header and then blocks, one block per group commit::

    segment   +--------------------------------------------------------------+ 0
              | file header (64 B): magic "EXJRNL\\0\\1", version, record size, |
              |   first gseq, creation time, crc32c of the bytes before it     |
              +--------------------------------------------------------------+ 64
              | block header (32 B): magic "EBLK", count, first gseq,          |
              |   payload crc32c, header crc32c (of its first 28 bytes)        |
              | payload: count x 128-byte event records (types.EVENT_DTYPE)   |
              +--------------------------------------------------------------+
              | block ...                                                      |

Checksums are CRC32C (the ``crc32c`` package, hardware-accelerated). Sequence numbers run
on without a gap from block to block and from segment to segment.

**Prewritten space** (:mod:`exposure.store.prewrite`, shared with the FIX gateway's
journal). The writer keeps zeros written (and made durable) ahead of its last
block, ``prewrite`` bytes at a time, and writes blocks over them: an ``fdatasync`` that
covers only overwritten, already-allocated blocks has no file size or extent to commit, so
the filesystem's metadata journal stays out of the acknowledgement path (on this machine's
ext4: sync p99 0.23-0.34 ms against 0.51-1.12 ms for appends, docs/performance.md). Above
``append_above`` bytes a second (:data:`APPEND_ABOVE`, about 500,000 events/s; measured
over windows of at least 20 ms of appends) the writer appends plainly instead: there the
zeros cost as much CPU as the data (each byte is written twice: at 2 M events/s offered,
half the journal process's time on the client's core went to writing them) while a group
commit is large enough that the sync's one metadata commit is a small part of it. The
last segment therefore ends in zeros: a block header of 32 zero bytes is the **end of the
data**, not a torn block, and whatever follows it was never made durable before it (writes
are sequential) and is dropped like a torn tail. A segment that is rolled away from is cut
to its data first, so only the last segment has spare space.

What a reader accepts (:func:`scan`):

* the end of the *last* segment may hold a torn block (a crash in the middle of a write):
  a block header cut short, a payload cut short, or a last block whose checksum fails and
  that reaches the end of the file or the prewritten zeros. Recovery truncates it and says
  how many bytes went;
* the last segment may end in prewritten zeros (above): the data ends at the first zero
  block header;
* anything else that is wrong (a bad checksum with valid data after it, a gap in the
  sequence, a segment missing from the middle, a foreign file) is a :class:`JournalError`
  naming the file and the byte offset; nothing is ever skipped silently.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import crc32c
import numpy as np

from exposure.core.fs import fsync_dir
from exposure.core.types import EVENT_DTYPE, EVENT_SIZE, EVENT_WORDS, W_GSEQ
from exposure.store.dropbehind import DropBehind
from exposure.store.prewrite import PREWRITE, reserve

# Appends above this many bytes a second skip the zeros ahead (see the module docstring).
APPEND_ABOVE = 64 << 20
_RATE_WINDOW_NS = 20_000_000  # the append rate is measured over at least this long

__all__ = ["JournalError", "JournalWriter", "JournalCursor", "Block", "ScanResult", "scan",
           "read_blocks", "read_record", "segment_name", "segments", "first_gseq", "FILE_HEADER",
           "BLOCK_HEADER", "FSYNC_POLICIES", "ARCHIVE"]

FILE_MAGIC = b"EXJRNL\x00\x01"
FILE_VERSION = 1
# magic, version, record size, first gseq, created ns, reserved x 3, crc32c
FILE_HEADER = struct.Struct("<8sIIQq28sI")
BLOCK_MAGIC = 0x4B4C4245  # "EBLK"
# magic, count, first gseq, payload crc32c, reserved, reserved, header crc32c
BLOCK_HEADER = struct.Struct("<IIQIIII")
_BH_CRC_SPAN = BLOCK_HEADER.size - 4
FSYNC_POLICIES = ("batch", "interval", "none")
assert FILE_HEADER.size == 64 and BLOCK_HEADER.size == 32


class JournalError(RuntimeError):
    """Corruption or a gap that recovery must not paper over; names the file and offset."""


def segment_name(first_gseq: int) -> str:
    return f"journal-{first_gseq:020d}.seg"


ARCHIVE = "archive"  # DATA_DIR/archive: segments moved there by the retention


def segments(directory: Path, archive: bool = False) -> list[tuple[int, Path]]:
    """(first gseq, path) of the directory's segments, oldest first; with ``archive``, those
    of its ``archive`` subdirectory too (the retention's ``[snapshot] journal = "archive"``
    moves old segments there: together they are one journal)."""
    directory = Path(directory)
    found = {}
    dirs = [directory / ARCHIVE, directory] if archive else [directory]
    for d in dirs:  # a segment in both (a move cut short) is read from the live directory
        for p in d.glob("journal-*.seg"):
            try:
                found[int(p.name[8:28])] = p
            except ValueError:
                raise JournalError(f"{p}: not a journal segment name") from None
    return sorted(found.items())


@dataclass
class Block:
    path: Path
    offset: int            # of the block header in the file
    first: int             # gseq of the first record
    records: np.ndarray    # EVENT_DTYPE

    @property
    def last(self) -> int:
        return self.first + len(self.records) - 1


@dataclass
class ScanResult:
    segments: int = 0
    blocks: int = 0
    records: int = 0
    first: int = 0          # first gseq in the journal (0: empty)
    last: int = 0           # last gseq in the journal (0: empty)
    bytes: int = 0
    torn_path: Path | None = None
    torn_offset: int = 0    # where the torn tail starts
    torn_bytes: int = 0     # bytes after it (dropped by recovery)
    spare_path: Path | None = None  # the last segment when it ends in prewritten zeros
    spare_offset: int = 0   # where its data ends (the first zero block header)


def _read_file_header(path: Path, data: bytes) -> int:
    if len(data) < FILE_HEADER.size:
        raise JournalError(f"{path}: offset 0: file header cut short ({len(data)} bytes)")
    magic, ver, rsize, first, _, _, crc = FILE_HEADER.unpack_from(data)
    if magic != FILE_MAGIC:
        raise JournalError(f"{path}: offset 0: not a journal segment (magic {magic!r})")
    if crc != crc32c.crc32c(data[:FILE_HEADER.size - 4]):
        raise JournalError(f"{path}: offset 0: file header checksum fails")
    if ver != FILE_VERSION or rsize != EVENT_SIZE:
        raise JournalError(f"{path}: offset 0: version {ver} / record size {rsize}, this "
                           f"build reads version {FILE_VERSION} / {EVENT_SIZE}")
    return first


def read_blocks(directory: str | Path, result: ScanResult | None = None,
                from_gseq: int | None = None, archive: bool = False) -> Iterator[Block]:
    """Every block of the journal in order. With ``from_gseq``, blocks ending before it are
    skipped (whole segments unread) and the journal must reach back to it; without, it
    starts wherever its oldest segment does (older ones may have been removed after a
    snapshot). ``archive``: the archived segments too (:func:`segments`). Raises
    :class:`JournalError` on anything but a torn tail, which ends the iteration and is
    described in ``result``."""
    directory = Path(directory)
    res = result if result is not None else ScanResult()
    segs = segments(directory, archive)
    expect = None
    if from_gseq is None:
        from_gseq = segs[0][0] if segs else 1
    for k, (first_named, path) in enumerate(segs):
        last_seg = k == len(segs) - 1
        if k + 1 < len(segs) and segs[k + 1][0] <= from_gseq:
            expect = segs[k + 1][0]
            continue  # wholly before from_gseq: its successor says where it ends
        fd = os.open(path, os.O_RDONLY)
        try:
            expect = yield from _segment_blocks(fd, path, last_seg, from_gseq, expect,
                                                first_named, res)
        finally:
            os.close(fd)


_CHUNK = 8 << 20  # bytes read at a time (a block is read whole; chunks restart at one)
_ZERO_HEADER = bytes(BLOCK_HEADER.size)


def _zeros_at(fd: int, off: int) -> bool:
    """Whether the file holds a zero block header at ``off`` (prewritten space)."""
    return os.pread(fd, BLOCK_HEADER.size, off) == _ZERO_HEADER


def _segment_blocks(fd: int, path: Path, last_seg: bool, from_gseq: int,
                    expect: int | None, first_named: int,
                    res: ScanResult) -> Generator[Block, None, int]:
    """The blocks of one segment, read ``_CHUNK`` bytes at a time (``pread``: a block's
    records are a view of an immutable chunk, valid as long as they are held); the rules of
    :func:`read_blocks`. A block is judged torn only against the file's end. Returns the
    gseq the next segment must start at."""
    size = os.fstat(fd).st_size
    res.segments += 1
    res.bytes += size
    data = os.pread(fd, min(size, _CHUNK), 0)
    first = _read_file_header(path, data)
    if first != first_named:
        raise JournalError(f"{path}: offset 0: header says first gseq {first}, the name "
                           f"{first_named}")
    if expect is not None and first != expect:
        raise JournalError(f"{path}: offset 0: starts at gseq {first}, expected {expect} "
                           f"(a segment is missing)")
    if expect is None and first > from_gseq:
        raise JournalError(f"{path}: offset 0: the journal starts at gseq {first}, but "
                           f"gseq {from_gseq} is needed (its beginning was removed and "
                           "no snapshot covers it)")
    expect = first
    base, pos = 0, FILE_HEADER.size   # data = the file's bytes [base, base + len(data))
    reread = -1  # the offset of a block read again once (a writer beside the reader)
    while base + pos < size:
        # What the next block needs: its header, then its payload; read on from the
        # block's start when the chunk ends before (only the file's end can tear it).
        need = BLOCK_HEADER.size
        if len(data) - pos >= BLOCK_HEADER.size:
            count = BLOCK_HEADER.unpack_from(data, pos)[1]
            need += count * EVENT_SIZE
        if len(data) - pos < need and base + len(data) < size:
            base += pos
            data = os.pread(fd, min(size - base, max(_CHUNK, need)), base)
            pos = 0
            continue
        off = base + pos  # in the file
        torn = None
        if len(data) - pos < BLOCK_HEADER.size:
            torn = "block header cut short"
        elif data[pos:pos + BLOCK_HEADER.size] == _ZERO_HEADER:
            if not last_seg:
                raise JournalError(f"{path}: offset {off}: zeros in a segment that is not "
                                   "the last")
            res.spare_path, res.spare_offset = path, off
            return expect
        else:
            magic, count, bfirst, pcrc, _, _, hcrc = BLOCK_HEADER.unpack_from(data, pos)
            end = pos + BLOCK_HEADER.size + count * EVENT_SIZE
            if magic != BLOCK_MAGIC or hcrc != crc32c.crc32c(
                    data[pos:pos + _BH_CRC_SPAN]):
                torn = "block header checksum fails"
            elif end > len(data):
                torn = "block payload cut short"
            elif pcrc != crc32c.crc32c(memoryview(data)[pos + BLOCK_HEADER.size:end]):
                torn = "block payload checksum fails"
                if last_seg and reread != off:
                    # the writer may have been copying this block into the page cache
                    # while the chunk was read: read it once more before judging it
                    reread, base = off, off
                    data = os.pread(fd, min(size - base, max(_CHUNK, end - pos)), base)
                    pos = 0
                    continue
                if base + end < size and last_seg and _zeros_at(fd, base + end):
                    pass  # the last block, torn, before the prewritten zeros
                elif base + end < size or not last_seg:
                    raise JournalError(f"{path}: offset {off}: {torn} (valid data "
                                       "follows: corruption, not a torn write)")
        if torn is not None:
            if not last_seg:
                raise JournalError(f"{path}: offset {off}: {torn} in a segment that is "
                                   "not the last")
            res.torn_path, res.torn_offset = path, off
            res.torn_bytes = size - off
            return expect
        if bfirst != expect:
            raise JournalError(f"{path}: offset {off}: block starts at gseq {bfirst}, "
                               f"expected {expect}")
        recs = np.frombuffer(data, EVENT_DTYPE, count, pos + BLOCK_HEADER.size)
        res.blocks += 1
        res.records += count
        res.first = res.first or bfirst
        res.last = bfirst + count - 1
        expect = bfirst + count
        if res.last >= from_gseq:
            yield Block(path, off, bfirst, recs)
        pos = end
    return expect


def scan(directory: str | Path) -> ScanResult:
    """Check every checksum and the sequence; the counts, and the torn tail if any."""
    res = ScanResult()
    for _ in read_blocks(directory, res):
        pass
    return res


def first_gseq(directory: str | Path) -> int:
    """The first gseq the journal holds (by its oldest segment's name; 0: no segment)."""
    segs = segments(Path(directory))
    return segs[0][0] if segs else 0


class JournalCursor:
    """Reads the journal from gseq ``start`` on, block by block, continuing where it
    stopped (the mirror's catch-up from disk, beside a writer that keeps appending).

    :meth:`read` returns the records of the next complete, checksummed block that ends at or
    before ``upto`` (u8 words ``[n, 16]``, starting exactly at the cursor), or ``None`` when
    there is none yet: a block still being written looks torn and is simply not there yet.
    A gseq before the journal's start raises :class:`JournalError`."""

    def __init__(self, directory: str | Path, start: int):
        self.dir = Path(directory)
        self.next = start
        self.fd = -1
        self.path: Path | None = None
        self.off = 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _open(self) -> bool:
        segs = segments(self.dir)
        before = [s for s in segs if s[0] <= self.next]
        if not before:
            if segs:
                raise JournalError(f"{self.dir}: gseq {self.next} is not in the journal (it "
                                   f"starts at gseq {segs[0][0]})")
            return False
        first, path = before[-1]
        self.close()
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.path, self.off = path, FILE_HEADER.size
        _read_file_header(path, os.pread(self.fd, FILE_HEADER.size, 0))
        return True

    def read(self, upto: int) -> np.ndarray | None:
        if self.next > upto:
            return None
        if self.fd < 0 and not self._open():
            return None
        while True:
            head = os.pread(self.fd, BLOCK_HEADER.size, self.off)
            if len(head) < BLOCK_HEADER.size:
                # the end of this segment: on to the one holding the cursor, once it exists
                segs = [p for first, p in segments(self.dir) if first <= self.next]
                if segs and segs[-1] != self.path:
                    self._open()
                    continue
                return None
            magic, count, bfirst, pcrc, _, _, hcrc = BLOCK_HEADER.unpack(head)
            if magic != BLOCK_MAGIC or hcrc != crc32c.crc32c(head[:_BH_CRC_SPAN]):
                return None  # being written
            if bfirst > self.next:
                raise JournalError(f"{self.path}: offset {self.off}: block starts at gseq "
                                   f"{bfirst}, expected at most {self.next}")
            end = self.off + BLOCK_HEADER.size + count * EVENT_SIZE
            if bfirst + count <= self.next:
                self.off = end  # wholly before the cursor
                continue
            if bfirst + count - 1 > upto:
                return None  # not durable yet
            payload = os.pread(self.fd, count * EVENT_SIZE, self.off + BLOCK_HEADER.size)
            if len(payload) < count * EVENT_SIZE or pcrc != crc32c.crc32c(payload):
                return None
            self.off = end
            words = np.frombuffer(payload, np.uint64).reshape(count, EVENT_WORDS)
            words = words[self.next - bfirst:]
            self.next = bfirst + count
            return words



def read_record(directory: str | Path, gseq: int) -> np.ndarray | None:
    """The record at ``gseq`` (its u8 words), or ``None`` when the journal does not hold it
    (before its start, after its end, or in a block not yet complete)."""
    c = JournalCursor(directory, gseq)
    try:
        w = c.read(1 << 62)
    except JournalError:
        return None
    finally:
        c.close()
    return None if w is None else w[0].copy()


class JournalWriter:
    """Appends blocks to the newest segment, rolling at ``segment_bytes``.

    Opening truncates a torn tail (the caller logs ``torn``) and any prewritten zeros.
    ``append`` is one ``pwritev`` per group commit, over zeros written ahead of it
    ``prewrite`` bytes at a time (0: plain appends; and while blocks come faster than
    ``append_above`` bytes a second, see the module's docstring); ``sync``
    makes everything appended durable (fdatasync of the file; fsync of the directory after
    a new segment). :meth:`roll_at` makes a given record begin a new segment (a trading
    day's roll: each day's records lie in segments of their own). With ``cache_bytes``,
    only the newest ``cache_bytes`` of synced data stay in the page cache
    (:mod:`exposure.store.dropbehind`; 0: the kernel keeps what it likes)."""

    def __init__(self, directory: str | Path, segment_bytes: int = 256 << 20,
                 prewrite: int = PREWRITE, append_above: int = APPEND_ABOVE,
                 cache_bytes: int = 0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.segment_bytes = segment_bytes
        self.prewrite = max(0, int(prewrite))
        self.append_above = append_above
        self.fast = False  # blocks come faster than append_above: no zeros written ahead
        self._appended = 0  # bytes appended since the writer opened (the rate's count)
        self._mark = (time.monotonic_ns(), 0)  # the rate window's start: (ns, bytes)
        res = scan(self.dir)
        self.torn = res
        cut = res.torn_path or res.spare_path
        if cut is not None:
            with open(cut, "r+b") as f:
                f.truncate(res.torn_offset if res.torn_path else res.spare_offset)
                os.fsync(f.fileno())
        self.next_gseq = res.last + 1 if res.last else 0
        segs = segments(self.dir)
        self.fd = -1
        self.size = 0      # where the data ends (the next block goes here)
        self.alloc = 0     # where the file ends: data, then prewritten zeros
        self._dir_dirty = False
        self._roll_points: list[int] = []  # gseqs that begin a new segment (roll_at)
        self.cache = DropBehind(cache_bytes) if cache_bytes > 0 else None
        self.seg_first = segs[-1][0] if segs else 0  # the current segment's first gseq
        if segs:
            path = segs[-1][1]
            self.fd = os.open(path, os.O_WRONLY)
            self.size = self.alloc = os.fstat(self.fd).st_size
            if self.next_gseq == 0:  # a segment with only its header
                self.next_gseq = segs[-1][0]

    def _cut(self) -> None:
        """Close the current segment, its prewritten zeros cut off and its data durable."""
        if self.fd >= 0:
            if self.alloc > self.size:
                os.ftruncate(self.fd, self.size)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def _roll(self, first: int) -> None:
        old = self.dir / segment_name(self.seg_first), self.size
        was_open = self.fd >= 0
        self._cut()
        if was_open and self.cache is not None:
            self.cache.rolled(*old)
        path = self.dir / segment_name(first)
        head = FILE_HEADER.pack(FILE_MAGIC, FILE_VERSION, EVENT_SIZE, first, time.time_ns(),
                                b"", 0)
        head = head[:-4] + struct.pack("<I", crc32c.crc32c(head[:-4]))
        # The header goes into a file of another name first, which is then linked under the
        # segment's name: a reader of the live journal (the mirror, a tool) or a recovery
        # after a crash never finds the segment without its header (created, then
        # written, a reader could read 0 bytes: "file header cut short"). The link fails,
        # as O_EXCL did, where the segment exists.
        tmp = path.with_name(path.name + ".new")  # (not a segment name: never listed)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if os.write(fd, head) != len(head):
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write of a "
                              "segment header)")
            os.link(tmp, path)
        except OSError:  # (disk full) no half-made segment is left behind: retried later
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        tmp.unlink()
        self.fd = fd
        self.size = self.alloc = len(head)
        self.seg_first = first
        self._dir_dirty = True

    def roll_at(self, gseq: int) -> None:
        """Make the record ``gseq`` (not yet appended) begin a new segment: :meth:`append`
        cuts its block there, and the segment before is cut to its data as at any roll. A
        segment that already begins at ``gseq`` (its first append failed) is kept."""
        if gseq >= self.next_gseq and gseq not in self._roll_points:
            self._roll_points.append(gseq)
            self._roll_points.sort()

    def append(self, words: np.ndarray) -> None:
        """Append records (u64 words ``[n, EVENT_WORDS]``, gseqs consecutive from
        ``next_gseq`` when it is known) as one block."""
        n = len(words)
        if n == 0:
            return
        first = int(words[0, W_GSEQ])
        if self.next_gseq and first < self.next_gseq < first + n:
            # a retry of a block cut at a roll point whose first part was written
            words = words[self.next_gseq - first:]
            first, n = self.next_gseq, n - (self.next_gseq - first)
        if self.next_gseq and first != self.next_gseq:
            raise JournalError(f"append of gseq {first}, the journal is at {self.next_gseq}")
        points = self._roll_points
        while points and points[0] < first:
            points.pop(0)  # (a roll point behind the journal: nothing to cut)
        if points and points[0] < first + n and points[0] != first:
            cut = points[0] - first  # a roll inside the block: two blocks
            self.append(words[:cut])
            self.append(words[cut:])
            return
        if points and points[0] == first:
            if self.fd < 0 or self.seg_first != first:
                self._roll(first)
            points.pop(0)
        elif self.fd < 0 or self.size >= self.segment_bytes:
            self._roll(first)
        payload = np.ascontiguousarray(words).view(np.uint8).reshape(-1)
        head = BLOCK_HEADER.pack(BLOCK_MAGIC, n, first, crc32c.crc32c(payload), 0, 0, 0)
        head = head[:-4] + struct.pack("<I", crc32c.crc32c(head[:_BH_CRC_SPAN]))
        total = len(head) + n * EVENT_SIZE
        if self.prewrite:
            now = time.monotonic_ns()
            t0, b0 = self._mark
            if now - t0 >= _RATE_WINDOW_NS:
                self.fast = (self._appended - b0) * 1_000_000_000 > self.append_above * (now - t0)
                self._mark = (now, self._appended)
            if not self.fast:
                self.alloc = reserve(self.fd, self.size, self.alloc, total, self.prewrite,
                                     self.segment_bytes)
        done = os.pwritev(self.fd, [head, payload], self.size)
        if done != total:  # a short write (disk full): never leave half a block behind
            if self.alloc > self.size:  # the zeros back where the block began
                os.pwrite(self.fd, bytes(min(total, self.alloc - self.size)), self.size)
            else:
                os.ftruncate(self.fd, self.size)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write to the "
                          f"journal: {done} of {total} bytes)")
        self.alloc = max(self.alloc, self.size + total)
        self.size += total
        self._appended += total
        self.next_gseq = first + n

    def sync(self) -> None:
        if self.fd >= 0:
            os.fdatasync(self.fd)  # the data and the size that reads it back, not the mtime
            if self.cache is not None:
                self.cache.synced(self.fd, self.size)
        if self._dir_dirty:
            fsync_dir(self.dir)
            self._dir_dirty = False

    def close(self) -> None:
        """Close the segment, its prewritten zeros cut off (the data is synced first)."""
        if self.fd >= 0:
            if self.alloc > self.size:
                os.fdatasync(self.fd)
                os.ftruncate(self.fd, self.size)
            os.close(self.fd)
            self.fd = -1


assert EVENT_WORDS * 8 == EVENT_SIZE
