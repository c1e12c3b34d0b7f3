"""The gateway's inbound journal: every FIX application message, in the order the gateway
took it, durable before anything is passed on (docs/fix.md#exactly-once).

Files in the journal directory::

    seg-<index of its first record, 16 digits>.fj    records, appended
    checkpoint-<index, 16 digits>.ck                  the gateway's state before that record

A record is ``[u32 length][u32 crc32c of the payload][payload]``; the payload is
``[u8 kind][u8 len][session name][u64 FIX seq][body]``. Kinds (:data:`KINDS`): ``M`` an
application message (body: the raw FIX bytes), ``N`` the next inbound FIX seq of a session
after session-level traffic (a heartbeat, a GapFill, a SequenceReset, a logon with
ResetSeqNumFlag), ``D`` the reference data in force from here on (body: the two CSV
files), ``S`` what the mapping of a FIX session's messages depends on from here on (body:
JSON: its source, BeginString, the order key), ``R`` a request to pass the dead letters on
again, ``H`` the journal's header (seq: the exposure seq the session held when the journal
began).

Records are numbered from 0 since the journal began (the *index*). Appends go to a buffer;
:meth:`Journal.sync` writes the buffer and ``fdatasync``s it (one call per batch: a group
commit). A record is durable once the sync that wrote it returned.

After a crash (:meth:`Journal.open`), the newest segment may end in a torn write (the
sync that had not returned): it is cut off at the first record that is short or fails its
checksum, and logged. A bad record anywhere else is a :class:`JournalError` naming the
file and the byte offset.

A checkpoint is a pickled state (what the gateway hands :meth:`Journal.write_checkpoint`)
behind a magic and a crc32c, written to a temporary file, synced and renamed, so a
checkpoint file either is whole or is not there. :meth:`Journal.trim` deletes the
checkpoints and segments the gateway no longer needs (it says which: docs/fix.md).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import crc32c

__all__ = ["Journal", "JournalError", "Record", "KINDS", "K_MESSAGE", "K_SEQ", "K_REFDATA",
           "K_REDELIVER", "K_HEADER", "K_SESSION", "encode_refdata", "decode_refdata"]

log = logging.getLogger(__name__)

K_MESSAGE, K_SEQ, K_REFDATA, K_REDELIVER, K_HEADER, K_SESSION = (
    b"M", b"N", b"D", b"R", b"H", b"S")
KINDS = {K_MESSAGE: "message", K_SEQ: "seq", K_REFDATA: "refdata", K_REDELIVER: "redeliver",
         K_HEADER: "header", K_SESSION: "session"}
_KIND_SET = frozenset(k[0] for k in KINDS)

_REC = struct.Struct("<II")
_SEQ = struct.Struct("<Q")
_MAX_RECORD = 1 << 28
_SEG = re.compile(r"^seg-(\d{16})\.fj$")
_CK = re.compile(r"^checkpoint-(\d{16})\.ck$")
_CK_MAGIC = b"EXPFIXC1"


class JournalError(RuntimeError):
    """The journal cannot be used (the message names the file and the byte offset)."""


class Record(NamedTuple):
    index: int
    kind: bytes
    session: str
    seq: int
    body: bytes


@dataclass
class _Segment:
    first: int
    path: Path


def _seg_name(first: int) -> str:
    return f"seg-{first:016d}.fj"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_refdata(instruments: bytes, accounts: bytes) -> bytes:
    """The body of a ``D`` record: both CSV files' bytes."""
    return struct.pack("<I", len(instruments)) + instruments + accounts


def decode_refdata(body: bytes) -> tuple[bytes, bytes]:
    n = struct.unpack_from("<I", body)[0]
    return bytes(body[4:4 + n]), bytes(body[4 + n:])


def encode_record(kind: bytes, session: str, seq: int, body: bytes) -> bytes:
    name = session.encode()
    if len(name) > 255:
        raise ValueError(f"session name {session!r}: at most 255 bytes")
    payload = b"".join((kind, bytes((len(name),)), name, _SEQ.pack(seq), body))
    return _REC.pack(len(payload), crc32c.crc32c(payload)) + payload


def _decode(payload: memoryview, index: int) -> Record:
    kind = bytes(payload[:1])
    n = payload[1]
    name = bytes(payload[2:2 + n]).decode()
    seq = _SEQ.unpack_from(payload, 2 + n)[0]
    return Record(index, kind, name, seq, bytes(payload[10 + n:]))


class Journal:
    """An open journal directory (see the module docstring). One writer: the gateway holds
    the data directory's lock. ``append`` is called under the gateway's lock; ``sync`` from
    its committer thread (it takes the buffer under ``self._lock`` and writes outside)."""

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20):
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._buf = bytearray()
        self._buf_records = 0
        self.next_index = 0          # the index the next append gets
        self.durable_index = 0       # every record below it is durable
        self._fd = -1
        self._seg_size = 0
        self.segments: list[_Segment] = []
        self.checkpoints: list[int] = []
        self.torn_bytes = 0
        self.bytes_written = 0
        self.syncs = 0

    # -- opening and reading -------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, segment_bytes: int = 64 << 20) -> Journal:
        """Open (creating) the journal in ``directory``: list its segments and checkpoints,
        check the records of the newest segment, cut a torn tail. Reading records is
        :meth:`records`."""
        j = cls(directory, segment_bytes)
        j.dir.mkdir(parents=True, exist_ok=True)
        for tmp in j.dir.glob("*.tmp"):
            tmp.unlink()
        for name in sorted(os.listdir(j.dir)):
            if m := _SEG.match(name):
                j.segments.append(_Segment(int(m.group(1)), j.dir / name))
            elif m := _CK.match(name):
                j.checkpoints.append(int(m.group(1)))
        if j.segments:
            last = j.segments[-1]
            n, good, size = j._scan(last.path, last.first, tolerate_tail=True)
            if good < size:
                j.torn_bytes = size - good
                log.warning("journal %s: a torn tail of %d bytes cut off at byte %d (a "
                            "write that had not returned)", last.path, size - good, good)
                with open(last.path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            j.next_index = last.first + n
            j.durable_index = j.next_index
        return j

    def _scan(self, path: Path, first: int, tolerate_tail: bool) -> tuple[int, int, int]:
        """(records, bytes of whole good records, file size) of one segment."""
        data = path.read_bytes()
        pos = n = 0
        while pos < len(data):
            bad = None
            if pos + _REC.size > len(data):
                bad = "a short record header"
            else:
                length, crc = _REC.unpack_from(data, pos)
                end = pos + _REC.size + length
                if length < 10 or length > _MAX_RECORD or end > len(data):
                    bad = f"a bad record length {length}"
                elif crc32c.crc32c(memoryview(data)[pos + _REC.size:end]) != crc:
                    bad = "a bad checksum"
                elif data[pos + _REC.size] not in _KIND_SET:
                    bad = "an unknown record kind"
            if bad:
                if tolerate_tail:
                    return n, pos, len(data)
                raise JournalError(f"{path}: {bad} at byte {pos} (record {first + n})")
            pos = end
            n += 1
        return n, pos, len(data)

    def records(self, start: int = 0) -> Iterator[Record]:
        """Every record from index ``start`` on, in order; JournalError where one is
        missing (a deleted segment) or bad."""
        segs = self.segments
        if not segs:
            if start != self.next_index and start != 0:
                raise JournalError(f"{self.dir}: no segment holds record {start}")
            return
        if start < segs[0].first:
            raise JournalError(f"{self.dir}: record {start} is before the oldest segment "
                               f"({segs[0].path.name}): the journal was trimmed past it")
        for i, seg in enumerate(segs):
            nxt = segs[i + 1].first if i + 1 < len(segs) else None
            if nxt is not None and nxt <= start:
                continue
            data = seg.path.read_bytes()
            pos, idx = 0, seg.first
            mv = memoryview(data)
            while pos < len(data):
                if pos + _REC.size > len(data):
                    raise JournalError(f"{seg.path}: a short record header at byte {pos}")
                length, crc = _REC.unpack_from(data, pos)
                end = pos + _REC.size + length
                if length < 10 or end > len(data) or \
                        crc32c.crc32c(mv[pos + _REC.size:end]) != crc:
                    raise JournalError(f"{seg.path}: a bad record at byte {pos} "
                                       f"(record {idx})")
                if idx >= start:
                    yield _decode(mv[pos + _REC.size:end], idx)
                pos, idx = end, idx + 1
            if nxt is not None and idx != nxt:
                raise JournalError(f"{seg.path}: ends at record {idx}, the next segment "
                                   f"begins at {nxt}: a segment is missing")

    # -- checkpoints --------------------------------------------------------------------

    def write_checkpoint(self, index: int, state: Any) -> None:
        """The gateway's state before record ``index`` (everything below it applied),
        whole or absent after a crash."""
        data = pickle.dumps(state, protocol=5)
        path = self.dir / f"checkpoint-{index:016d}.ck"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(_CK_MAGIC + struct.pack("<IQ", crc32c.crc32c(data), len(data)) + data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
        _fsync_dir(self.dir)
        if index not in self.checkpoints:
            self.checkpoints.append(index)
            self.checkpoints.sort()

    def read_checkpoint(self, index: int) -> Any:
        path = self.dir / f"checkpoint-{index:016d}.ck"
        data = path.read_bytes()
        if data[:8] != _CK_MAGIC or len(data) < 20:
            raise JournalError(f"{path}: not a gateway checkpoint")
        crc, n = struct.unpack_from("<IQ", data, 8)
        body = data[20:]
        if len(body) != n or crc32c.crc32c(body) != crc:
            raise JournalError(f"{path}: a bad checksum (byte 8)")
        return pickle.loads(body)

    def trim(self, keep_from: int) -> int:
        """Delete the checkpoints below ``keep_from`` and every segment whose records are
        all below it (the gateway passes the newest checkpoint whose events the node
        acknowledged); returns the number of files deleted."""
        gone = 0
        for ck in [c for c in self.checkpoints if c < keep_from]:
            try:
                (self.dir / f"checkpoint-{ck:016d}.ck").unlink()
            except FileNotFoundError:
                pass
            self.checkpoints.remove(ck)
            gone += 1
        while len(self.segments) > 1 and self.segments[1].first <= keep_from:
            seg = self.segments.pop(0)
            try:
                seg.path.unlink()
            except FileNotFoundError:
                pass
            gone += 1
        return gone

    # -- appending ----------------------------------------------------------------------

    def append(self, kind: bytes, session: str, seq: int, body: bytes = b"") -> int:
        """Buffer one record; returns its index (durable once a later :meth:`sync`
        returned)."""
        rec = encode_record(kind, session, seq, body)
        with self._lock:
            self._buf += rec
            idx = self.next_index
            self.next_index += 1
            self._buf_records += 1
        return idx

    @property
    def buffered(self) -> int:
        """Records appended and not yet durable."""
        return self.next_index - self.durable_index

    def sync(self) -> int:
        """Write what was appended and fdatasync it; returns the index below which every
        record is durable."""
        with self._lock:
            if not self._buf:
                return self.durable_index
            buf, self._buf = self._buf, bytearray()
            upto = self.next_index
            first = upto - self._buf_records
            self._buf_records = 0
        if self._fd < 0 or self._seg_size >= self.segment_bytes:
            self._roll(first)
        view = memoryview(buf)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fdatasync(self._fd)
        self._seg_size += len(buf)
        self.bytes_written += len(buf)
        self.syncs += 1
        self.durable_index = upto
        return upto

    def _roll(self, first: int) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.segments and self._fd < 0 and self._seg_size == 0 and \
                self.segments[-1].first <= first and \
                self.segments[-1].path.stat().st_size < self.segment_bytes:
            seg = self.segments[-1]      # (opening: go on appending to the newest segment)
        else:
            seg = _Segment(first, self.dir / _seg_name(first))
            self.segments.append(seg)
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seg_size = os.fstat(self._fd).st_size
        _fsync_dir(self.dir)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def disk_bytes(self) -> int:
        total = 0
        for seg in self.segments:
            try:
                total += seg.path.stat().st_size
            except FileNotFoundError:
                pass
        return total
