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

**Prewritten space**, as the node's journal (:mod:`exposure.store.journal`, the shared
code in :mod:`exposure.store.prewrite`): the writer keeps zeros written ahead of its data,
``prewrite`` bytes at a time (4 MiB; ``[limits] prewrite_bytes``, 0: plain appends), and
writes each group commit over them, so its ``fdatasync`` commits no file size. The newest
segment therefore ends in zeros: a record header of 8 zero bytes is the **end of the
data** (no record has length 0), not a torn record. A segment is cut to its data when the
writer rolls away from it or closes it, and :meth:`Journal.open` cuts the newest one's.

After a crash (:meth:`Journal.open`), the newest segment may end in a torn write (the
sync that had not returned): a record header cut short, a length that cannot be (under
10 bytes, over 256 MiB, past the file's end), or a last record whose checksum fails and
that reaches the end of the file or the zeros. It is cut off and logged. Anything else
that is wrong (a bad record with a good one after it, zeros in a segment that is not the
newest, a bad record in an older segment) is a :class:`JournalError` naming the file and
the byte offset.

A checkpoint is a pickled state (what the gateway hands :meth:`Journal.write_checkpoint`)
behind a magic and a crc32c, written to a temporary file, synced and renamed, so a
checkpoint file either is whole or is not there. :meth:`Journal.trim` deletes the
checkpoints and segments the gateway no longer needs (it says which: docs/fix.md).
"""

from __future__ import annotations

import errno
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

from exposure.store.prewrite import PREWRITE, reserve

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
_ZERO_HEAD = bytes(_REC.size)


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


_WITH_CURRENCIES = 0xFFFFFFFF   # (no instruments file is 4 GiB: the length cannot be it)


def encode_refdata(instruments: bytes, accounts: bytes, currencies: bytes = b"") -> bytes:
    """The body of a ``D`` record: both CSV files' bytes, and the node's ``[currencies]``
    table they were read with (its JSON; b"": the default table, the base USD alone, whose
    record keeps the first format: u4 length, instruments, accounts)."""
    if not currencies:
        return struct.pack("<I", len(instruments)) + instruments + accounts
    return (struct.pack("<III", _WITH_CURRENCIES, len(instruments), len(accounts))
            + instruments + accounts + currencies)


def decode_refdata(body: bytes) -> tuple[bytes, bytes, bytes]:
    """(instruments, accounts, currencies) of a ``D`` record's body (currencies b"": the
    default table)."""
    n = struct.unpack_from("<I", body)[0]
    if n != _WITH_CURRENCIES:
        return bytes(body[4:4 + n]), bytes(body[4 + n:]), b""
    _, ni, na = struct.unpack_from("<III", body)
    return (bytes(body[12:12 + ni]), bytes(body[12 + ni:12 + ni + na]),
            bytes(body[12 + ni + na:]))


def encode_record(kind: bytes, session: str, seq: int, body: bytes) -> bytes:
    name = session.encode()
    if len(name) > 255:
        raise ValueError(f"session name {session!r}: at most 255 bytes")
    payload = b"".join((kind, bytes((len(name),)), name, _SEQ.pack(seq), body))
    return _REC.pack(len(payload), crc32c.crc32c(payload)) + payload


def _bad_record(data: bytes, mv: memoryview, pos: int, newest: bool) -> str | None:
    """What is wrong with the record at ``pos`` (None: nothing; ``"zeros"``: a zero
    header, prewritten space). In the newest segment a bad checksum or kind is a torn
    write only where the record reaches the file's end or the zeros; with a record after
    it, the text ends in "follows)" (corruption)."""
    if pos + _REC.size > len(data):
        return "a short record header"
    if data[pos:pos + _REC.size] == _ZERO_HEAD:
        return "zeros"
    length, crc = _REC.unpack_from(data, pos)
    end = pos + _REC.size + length
    if length < 10 or length > _MAX_RECORD or end > len(data):
        return f"a bad record length {length}"
    if crc32c.crc32c(mv[pos + _REC.size:end]) != crc:
        bad = "a bad checksum"
    elif data[pos + _REC.size] not in _KIND_SET:
        bad = "an unknown record kind"
    else:
        return None
    if newest and (end == len(data) or data[end:end + _REC.size] == _ZERO_HEAD):
        return bad
    return f"{bad} (a good record follows)" if newest else bad


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

    def __init__(self, directory: Path, segment_bytes: int = 64 << 20,
                 prewrite: int = PREWRITE):
        self.dir = Path(directory)
        self.segment_bytes = segment_bytes
        self.prewrite = max(0, int(prewrite))
        self._alloc = 0              # where the newest segment's file ends (zeros past data)
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
    def open(cls, directory: Path, segment_bytes: int = 64 << 20,
             prewrite: int = PREWRITE) -> Journal:
        """Open (creating) the journal in ``directory``: list its segments and checkpoints,
        check the records of the newest segment, cut a torn tail or the prewritten zeros.
        Reading records is :meth:`records`."""
        j = cls(directory, segment_bytes, prewrite)
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
            n, good, size, torn = j._scan(last.path, last.first, tolerate_tail=True)
            if good < size:
                if torn:
                    j.torn_bytes = size - good
                    log.warning("journal %s: a torn tail of %d bytes cut off at byte %d (a "
                                "write that had not returned)", last.path, size - good, good)
                with open(last.path, "r+b") as f:
                    f.truncate(good)
                    os.fsync(f.fileno())
            j.next_index = last.first + n
            j.durable_index = j.next_index
        return j

    def _scan(self, path: Path, first: int, tolerate_tail: bool
              ) -> tuple[int, int, int, bool]:
        """(records, bytes of whole good records, file size, whether what follows them is
        a torn write rather than prewritten zeros) of one segment; ``tolerate_tail``: the
        newest segment (the rules of the module's docstring)."""
        data = path.read_bytes()
        pos = n = 0
        mv = memoryview(data)
        while pos < len(data):
            bad = _bad_record(data, mv, pos, tolerate_tail)
            if bad == "zeros":
                if not tolerate_tail:
                    raise JournalError(f"{path}: zeros at byte {pos} (record {first + n}) "
                                       "in a segment that is not the newest")
                return n, pos, len(data), False
            if bad:
                if tolerate_tail and not bad.endswith("follows)"):
                    return n, pos, len(data), True
                raise JournalError(f"{path}: {bad} at byte {pos} (record {first + n})")
            pos += _REC.size + _REC.unpack_from(data, pos)[0]
            n += 1
        return n, pos, len(data), False

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
            newest = nxt is None
            while pos < len(data):
                bad = _bad_record(data, mv, pos, newest)
                if bad == "zeros" and newest:
                    break  # the end of the data: prewritten space
                if bad:
                    raise JournalError(f"{seg.path}: {bad} at byte {pos} (record {idx})")
                end = pos + _REC.size + _REC.unpack_from(data, pos)[0]
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

    def append_encoded(self, records: bytes, count: int) -> int:
        """Buffer ``count`` records already encoded as :func:`encode_record` does (the
        gateway's batches: :func:`exposure.fix.fast.journal_records`); returns the first
        one's index."""
        with self._lock:
            self._buf += records
            idx = self.next_index
            self.next_index += count
            self._buf_records += count
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
        if self.prewrite:
            self._alloc = reserve(self._fd, self._seg_size, self._alloc, len(buf),
                                  self.prewrite, self.segment_bytes)
        view = memoryview(buf)
        at = self._seg_size
        try:
            while view:
                n = os.pwrite(self._fd, view, at)
                if n <= 0:
                    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short "
                                  "write to the FIX journal)")
                view, at = view[n:], at + n
        except OSError:  # never leave half a record behind (the zeros back, or the end)
            if self._alloc > self._seg_size:
                os.pwrite(self._fd, bytes(min(at - self._seg_size,
                                              self._alloc - self._seg_size)), self._seg_size)
            else:
                os.ftruncate(self._fd, self._seg_size)
            raise
        os.fdatasync(self._fd)
        self._alloc = max(self._alloc, at)
        self._seg_size += len(buf)
        self.bytes_written += len(buf)
        self.syncs += 1
        self.durable_index = upto
        return upto

    def _cut(self) -> None:
        """Close the current segment, cut to its data (the prewritten zeros off)."""
        if self._fd >= 0:
            if self._alloc > self._seg_size:
                os.ftruncate(self._fd, self._seg_size)
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            self._alloc = 0

    def _roll(self, first: int) -> None:
        if self._fd >= 0:
            self._cut()
        if self.segments and self._fd < 0 and self._seg_size == 0 and \
                self.segments[-1].first <= first and \
                self.segments[-1].path.stat().st_size < self.segment_bytes:
            seg = self.segments[-1]      # (opening: go on appending to the newest segment)
        else:
            seg = _Segment(first, self.dir / _seg_name(first))
            self.segments.append(seg)
        self._fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT, 0o600)
        self._seg_size = self._alloc = os.fstat(self._fd).st_size
        _fsync_dir(self.dir)

    def close(self) -> None:
        """Close the newest segment, cut to its data (the records appended and not
        synced are not written: :meth:`sync` first)."""
        self._cut()

    def disk_bytes(self) -> int:
        total = 0
        for seg in self.segments:
            try:
                total += seg.path.stat().st_size
            except FileNotFoundError:
                pass
        return total
