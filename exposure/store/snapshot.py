"""Snapshots: the kernel state and the session table as of one global seq, on disk.

A snapshot ``snapshot-<gseq, 20 digits>.snap`` is::

    +--------------------------------------------------------------+ 0
    | header (64 B): magic "EXSNAP\\0\\1", version, gseq, state bytes, |
    |   session rows, session columns, body crc32c, header crc32c   |
    +--------------------------------------------------------------+ 64
    | the tally state buffer (its own header carries the capacities) |
    | the session table (u8 [rows, cols])                            |
    +--------------------------------------------------------------+

It is written atomically: to a temporary file, fsync, rename, fsync of the directory; a
reader never sees half a snapshot under the final name.

**How a snapshot is taken without stalling compute** (:mod:`exposure.node.snapshotter`): it is
not taken from the live state at all. A separate low-priority process (``python -m
exposure.node.snapshotter``, started by
the supervisor every ``every_events`` journaled events or ``every_s`` seconds) loads the
newest valid snapshot into a private state, replays the journal after it through the same
kernel (the journal is the truth; replay is deterministic), and writes the result. Compute
never pauses, never copies, never knows; the price is the replay's CPU on the core the node
does not spin on, at nice 19. Then journal segments wholly covered by the oldest snapshot
kept are deleted or archived (``[snapshot] journal``), and older snapshots beyond ``keep``
are removed. Keeping two means a snapshot that fails its checksum falls back to the one
before it, with the journal still there to replay from it. With ``[day] keep_days``, the
retention also keeps the last days replayable (:func:`retain`: one rule for both).
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import crc32c
import numpy as np

from exposure.core.fs import publish_file
from exposure.shm.tally_layout import HEADER_SIZE, LayoutError, TallyLayout
from exposure.shm.tally_migrate import migrate
from exposure.store.journal import read_blocks, segments

__all__ = ["SnapshotError", "write_snapshot", "load_snapshot", "load_newest", "snapshots",
           "snapshot_name", "retain", "SNAP_HEADER"]

MAGIC = b"EXSNAP\x00\x01"
VERSION = 1
# magic, version, reserved, gseq, state bytes, session rows, session cols, body crc, hdr crc
SNAP_HEADER = struct.Struct("<8sIIQQQQII")
_PAD = 64 - SNAP_HEADER.size
_CHUNK = 8 << 20


class SnapshotError(RuntimeError):
    """A snapshot that cannot be used (checksum, truncation, another layout)."""


def snapshot_name(gseq: int) -> str:
    return f"snapshot-{gseq:020d}.snap"


def snapshots(directory: str | Path) -> list[tuple[int, Path]]:
    """(gseq, path) of every snapshot, oldest first."""
    out = []
    for p in Path(directory).glob("snapshot-*.snap"):
        try:
            out.append((int(p.name[9:29]), p))
        except ValueError:
            continue
    return sorted(out)


def write_snapshot(directory: str | Path, gseq: int, state_buf: np.ndarray,
                   sessions: np.ndarray) -> Path:
    directory = Path(directory)
    body = [memoryview(np.ascontiguousarray(state_buf)).cast("B"),
            memoryview(np.ascontiguousarray(sessions)).cast("B")]
    crc = 0
    for b in body:
        for lo in range(0, len(b), _CHUNK):
            crc = crc32c.crc32c(b[lo:lo + _CHUNK], crc)
    head = SNAP_HEADER.pack(MAGIC, VERSION, 0, gseq, len(body[0]), sessions.shape[0],
                            sessions.shape[1], crc, 0)
    head = head[:-4] + struct.pack("<I", crc32c.crc32c(head[:-4])) + b"\0" * _PAD
    final = directory / snapshot_name(gseq)
    tmp = final.with_suffix(".tmp")
    f = open(tmp, "wb")  # noqa: SIM115  (publish_file closes it)
    try:
        f.write(head)
        for b in body:
            for lo in range(0, len(b), _CHUNK):
                f.write(b[lo:lo + _CHUNK])
    except BaseException:
        f.close()
        tmp.unlink(missing_ok=True)
        raise
    publish_file(tmp, final, f)
    return final


def load_snapshot(path: Path, state_buf: np.ndarray, sessions: np.ndarray) -> int:
    """Read ``path`` into the state's tables and the session table; returns its gseq.
    The state's own header (capacities, seqlock, writer) is checked, not overwritten. A
    snapshot of an older tally layout (taken before an upgrade) is read into a buffer of
    its own and migrated table by table (:mod:`exposure.shm.tally_migrate`)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < SNAP_HEADER.size:
            raise SnapshotError(f"{path}: header cut short")
        magic, ver, _, gseq, size, rows, cols, crc, hcrc = SNAP_HEADER.unpack_from(head)
        if magic != MAGIC or hcrc != crc32c.crc32c(head[:SNAP_HEADER.size - 4]):
            raise SnapshotError(f"{path}: not a snapshot, or its header checksum fails")
        if ver != VERSION or (rows, cols) != sessions.shape or size < HEADER_SIZE or (
                size != state_buf.nbytes and size > 4 * state_buf.nbytes):
            raise SnapshotError(f"{path}: version {ver}, {size} state bytes, sessions "
                                f"{rows}x{cols}; this node has {state_buf.nbytes} bytes, "
                                f"sessions {sessions.shape[0]}x{sessions.shape[1]}")
        hdr = np.frombuffer(f.read(HEADER_SIZE), np.uint8)
        if len(hdr) < HEADER_SIZE or TallyLayout.caps_of(hdr) != TallyLayout.caps_of(
                state_buf):
            raise SnapshotError(f"{path}: taken with other capacities")
        old = None
        if size != state_buf.nbytes:  # another layout version: read, then migrate
            old = np.zeros(size, np.uint8)
            old[:HEADER_SIZE] = hdr
        got = crc32c.crc32c(hdr)
        target = state_buf if old is None else old
        tables = memoryview(target[HEADER_SIZE:]).cast("B")
        scratch = bytearray(_CHUNK)
        for lo in range(0, len(tables), _CHUNK):
            n = f.readinto(memoryview(scratch)[:min(_CHUNK, len(tables) - lo)])
            if n < min(_CHUNK, len(tables) - lo):
                raise SnapshotError(f"{path}: cut short")
            got = crc32c.crc32c(memoryview(scratch)[:n], got)
            tables[lo:lo + n] = memoryview(scratch)[:n]
        rest = f.read(sessions.nbytes + 1)
        if len(rest) != sessions.nbytes:
            raise SnapshotError(f"{path}: session table cut short or trailing bytes")
        got = crc32c.crc32c(rest, got)
        if got != crc:
            raise SnapshotError(f"{path}: body checksum fails")
        if old is not None:
            try:
                migrate(old, TallyLayout(TallyLayout.caps_of(state_buf)).views(state_buf),
                        gseq)
            except LayoutError as e:
                raise SnapshotError(f"{path}: {e}") from None
        sessions[...] = np.frombuffer(rest, sessions.dtype).reshape(sessions.shape)
    return gseq


def load_newest(directory: str | Path, state_buf: np.ndarray, sessions: np.ndarray,
                log: Callable[[str], None], reset: Callable[[], None]) -> int:
    """The newest snapshot that loads; 0 (and a reset state) when none does."""
    for _, path in reversed(snapshots(directory)):
        try:
            return load_snapshot(path, state_buf, sessions)
        except (SnapshotError, OSError) as e:
            log(f"snapshot {path.name} unusable ({e}); falling back to the one before")
            reset()
    return 0


def retain(directory: Path, keep: int, journal: str, log: Callable[[str], None],
           keep_days: int = 0, days: Sequence[int] = ()) -> None:
    """The retention, one rule for snapshots and journal segments.

    Kept snapshots: the ``keep`` newest, and with ``keep_days`` (N > 0) the newest one at
    or before the start of each of the last N trading days (``days``: the gseqs of the
    rolls the kernel accepted, oldest first; the day in progress is one of the N, and the
    roll's own snapshot is the one its day starts from). A journal segment goes (deleted,
    or moved to ``DIR/archive``, per ``journal``; ``"keep"``: never) only when every record
    of it is both covered by the oldest kept snapshot and, with ``keep_days``, before the
    oldest kept day: so ``replay --journal --upto`` reaches any gseq of the kept days, and
    recovery never needs an archived segment. With fewer than N days rolled, the first
    day is kept whole (nothing goes)."""
    snaps = snapshots(directory)
    horizon = None  # the first gseq of the oldest kept day (None: no day rule)
    if keep_days > 0:
        starts = [0, *sorted(days)]  # where each day begins (0: the journal's first day)
        horizon = starts[-keep_days] if len(starts) >= keep_days else 0
    kept = {g for g, _ in snaps[-keep:]}
    if horizon is not None:
        for start in [horizon, *(d for d in days if d > horizon)] if horizon else []:
            base = [g for g, _ in snaps if g <= start]
            if base:
                kept.add(base[-1])
    for g, p in snaps:
        if g not in kept:
            p.unlink()
            log(f"removed old snapshot {p.name}")
    snaps = snapshots(directory)
    if journal == "keep" or not snaps or len(snaps) < keep:
        return
    covered = snaps[0][0]  # the oldest snapshot kept: a fallback must still replay from it
    why = f"covered by snapshot {covered}"
    if horizon is not None:
        if covered > horizon:  # no snapshot the oldest kept day starts from
            return
        covered = min(covered, horizon - 1)
        why += f", before the {keep_days} days kept (from gseq {horizon})"
    segs = segments(directory)
    for (_, path), (nxt, _) in zip(segs, segs[1:], strict=False):
        if nxt - 1 <= covered:  # every record of this segment is in the snapshot
            if journal == "archive":
                (directory / "archive").mkdir(exist_ok=True)
                shutil.move(str(path), directory / "archive" / path.name)
            else:
                path.unlink()
            log(f"{journal}d journal segment {path.name} ({why})")


assert read_blocks is not None
