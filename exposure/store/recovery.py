"""Recovery: a node's tallies and session table rebuilt from its data directory.

``exposure run`` calls :func:`recover` before any process of the node starts and before
any session is accepted: a torn journal tail is truncated (with a log line saying how many
bytes went), every block is replayed through the same kernel in the same batches of the
journal's order, and the session table gets, per session, the last seq the node holds (all
of it durable: it came from disk) and its rejects per reason. Desks see the result at once:
every account row is published.

Corruption anywhere but the tail raises :class:`exposure.store.journal.JournalError`, naming the
file and offset; the node does not start on a journal it cannot trust.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exposure.core.fs import publish_file
from exposure.core.types import C_LAST_GSEQ, EVENT_DTYPE, T_ROLL
from exposure.engine.kernel import apply_batch
from exposure.engine.publish import Versions, count_sessions, publish_all
from exposure.shm import reject_layout as RJ
from exposure.shm.seqlock import write_begin, write_end
from exposure.shm.session_layout import S_DONE, S_DURABLE, S_HELD
from exposure.shm.tally_layout import State, reset
from exposure.store.journal import JournalWriter, ScanResult, read_blocks
from exposure.store.snapshot import load_newest

# The tables desks read: kept while a restarting node recovers (publish_all rewrites them).
PUBLISHED = ("pub", "ipub", "spub", "cpub", "ctrpub")

__all__ = ["recover", "Recovered", "replay_journal", "replay_to_roll", "next_epoch",
           "read_epoch", "store_epoch"]


def next_epoch(directory: str | Path) -> int:
    """Bump and return the node's incarnation number, stored durably in ``directory``.

    Every start and every restart of the node's processes is a new epoch; the multicast
    header carries it, so a receiver knows that the stream (whose seqs restart at 1) and
    the global seqs after the journal's last one come from a new incarnation."""
    epoch = read_epoch(directory) + 1
    store_epoch(directory, epoch)
    return epoch


def read_epoch(directory: str | Path, name: str = "epoch") -> int:
    """The number stored in ``directory/name`` (0 when there is none)."""
    path = Path(directory) / name
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError:
        raise ValueError(f"{path}: not an epoch number") from None


def store_epoch(directory: str | Path, epoch: int, name: str = "epoch") -> None:
    """Write ``epoch`` to ``directory/name`` durably (atomically replaced)."""
    path = Path(directory) / name
    tmp = path.with_suffix(".tmp")
    f = open(tmp, "w")  # noqa: SIM115  (publish_file closes it)
    f.write(f"{epoch}\n")
    publish_file(tmp, path, f)


@dataclass
class Recovered:
    records: int = 0
    last_gseq: int = 0
    torn_bytes: int = 0
    seconds: float = 0.0
    snapshot_gseq: int = 0  # the snapshot recovery started from (0: none)
    last_roll: int = 0      # the gseq of the last roll record replayed (0: none)


def _batches(directory: str | Path, result: ScanResult | None, from_gseq: int, upto: int,
             batch: int, depth: int = 3, archive: bool = False) -> Iterator[np.ndarray]:
    """The journal's records from ``from_gseq`` (to ``upto``), gathered into batches of
    ``batch`` by a reader thread while the caller applies the previous ones.

    Blocks are a group commit's size (often a few records): gathering them makes the
    kernel, not Python per block, set the pace, and the thread overlaps the reads, the
    checksums and the copies with the kernel (which runs without the GIL) on another core.
    The tallies do not depend on where batches are cut (a pair's two nodes cut one stream
    differently and hold the same state: tests/test_pair.py). ``depth`` buffers bound the
    memory; an error of the reader (JournalError) is raised here, after the batches before
    it."""
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for _ in range(depth):
        free.put(np.empty(batch, EVENT_DTYPE))
    stop = threading.Event()

    def read() -> None:
        try:
            buf, fill = free.get(), 0
            for blk in read_blocks(directory, result, from_gseq=from_gseq,
                                   archive=archive):
                recs = blk.records
                if upto and blk.first > upto:
                    break
                if upto and blk.last > upto:
                    recs = recs[:upto - blk.first + 1]
                if blk.first < from_gseq:
                    recs = recs[from_gseq - blk.first:]
                while len(recs):
                    take = min(batch - fill, len(recs))
                    buf[fill:fill + take] = recs[:take]
                    fill += take
                    recs = recs[take:]
                    if fill == batch:
                        full.put((buf, fill))
                        buf, fill = free.get(), 0
                        if stop.is_set():
                            return
            if fill:
                full.put((buf, fill))
            full.put(None)
        except BaseException as e:  # (to the caller's thread)
            full.put(e)

    reader = threading.Thread(target=read, name="exposure-recovery-reader", daemon=True)
    reader.start()
    try:
        while (item := full.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            buf, n = item
            yield buf[:n]
            free.put(buf)  # the caller is done with it: it asked for the next one
    finally:
        stop.set()
        free.put(np.empty(0, EVENT_DTYPE))  # (a reader waiting for a buffer sees stop)
        reader.join(10)


def replay_journal(st: State, directory: str | Path, sessions: np.ndarray | None = None,
                   upto: int = 0, batch: int = 65536, from_gseq: int = 1,
                   result: ScanResult | None = None,
                   progress: Callable[[str], None] | None = None,
                   rejects: np.ndarray | None = None, archive: bool = False,
                   rolls: list[int] | None = None) -> int:
    """Apply the journal's records from gseq ``from_gseq`` (up to ``upto`` when given) to
    ``st``; with ``sessions``, count each session's processed seq and rejects as compute
    does, and log each reject in ``rejects`` (the reject log:
    :mod:`exposure.shm.reject_layout`) when given. ``progress`` hears every 5 s how far a
    long replay is. ``archive``: read the archived segments too. ``rolls`` gets the gseq
    of every ``roll`` record replayed. Returns the records applied."""
    return replay_to_roll(st, directory, sessions, upto, batch, from_gseq, result, progress,
                          rejects, archive, rolls, stop=False)[0]


def replay_to_roll(st: State, directory: str | Path, sessions: np.ndarray | None = None,
                   upto: int = 0, batch: int = 65536, from_gseq: int = 1,
                   result: ScanResult | None = None,
                   progress: Callable[[str], None] | None = None,
                   rejects: np.ndarray | None = None, archive: bool = False,
                   rolls: list[int] | None = None,
                   stop: bool = True) -> tuple[int, int, int]:
    """:func:`replay_journal` that stops (with ``stop``) right before the first ``roll``
    record from ``from_gseq`` on: the state is then the day's closing state (the end-of-day
    report's). Returns (records applied, the roll's gseq, its date YYYYMMDD); gseq 0: no
    roll up to ``upto`` or the journal's end (all of it applied)."""
    status = np.zeros(batch, np.uint8)
    flat = sessions.reshape(-1) if sessions is not None else np.zeros(12, np.uint64)
    ncols = sessions.shape[1] if sessions is not None else 12
    rlog = rejects.reshape(-1) if rejects is not None else np.zeros(0, np.uint64)
    parts = _batches(directory, result, from_gseq, upto, batch, archive=archive)
    try:
        return _apply(st, parts, sessions, status, flat, ncols, rlog, from_gseq, progress,
                      rolls, stop)
    finally:
        parts.close()  # (stopped at a roll: the reader thread ends now)


def _apply(st: State, parts: Iterator[np.ndarray], sessions: np.ndarray | None,
           status: np.ndarray, flat: np.ndarray, ncols: int, rlog: np.ndarray,
           from_gseq: int, progress: Callable[[str], None] | None,
           rolls: list[int] | None, stop: bool) -> tuple[int, int, int]:
    done = 0
    t0 = said = time.monotonic()
    for part in parts:
        n = len(part)
        if stop or rolls is not None:  # (a day's few rolls: one vector compare a batch)
            at = np.flatnonzero((part["type"] == T_ROLL) & (part["reject"] == 0))
            halt = at if stop else at[:0]
            if len(halt):
                n = int(halt[0])  # the state before this roll: the day's close
                at = at[at < n]
            if rolls is not None:
                rolls.extend(part["gseq"][at].tolist())
            if len(halt):
                if n:
                    apply_batch(st, part[:n], status[:n])
                    if sessions is not None:
                        count_sessions(part[:n], status[:n], n, flat, ncols, rlog)
                return done + n, int(part["gseq"][n]), int(part["qty"][n])
        apply_batch(st, part, status[:n])
        if sessions is not None:
            count_sessions(part, status[:n], n, flat, ncols, rlog)
        done += n
        if progress is not None and time.monotonic() - said >= 5.0:
            said = time.monotonic()
            progress(f"recovering: {done:,} events replayed up to gseq "
                     f"{int(part['gseq'][-1]):,} ({done / (said - t0):,.0f} events/s)")
    return done, 0, 0


def recover(st: State, vers: Versions, seg_words: np.ndarray, sessions: np.ndarray,
            directory: str | Path, segment_bytes: int, log: Callable[[str], None],
            reset_first: bool = False, state_buf: np.ndarray | None = None,
            rejects: np.ndarray | None = None) -> Recovered:
    """Rebuild ``st`` and ``sessions`` from ``directory``; the replay runs under the
    segment's state seqlock (``seg_words``). ``reset_first``: empty them first (a node that
    restarts its processes; its published rows stay until recovery replaces them).
    ``state_buf`` (the whole state buffer ``st`` views): start from the newest valid
    snapshot in ``directory`` and replay only the journal after it. ``rejects`` (the reject
    log, :mod:`exposure.shm.reject_layout`) is rebuilt from what is replayed: its base is
    each session's processed seq before the replay (a snapshot's; rejects of seqs up to it
    are counts only)."""
    t0 = time.perf_counter()
    w = JournalWriter(directory, segment_bytes)  # truncates a torn tail
    torn = w.torn
    w.close()
    if torn.torn_path is not None:
        log(f"journal: dropped a torn tail of {torn.torn_bytes} bytes at offset "
            f"{torn.torn_offset} of {torn.torn_path} (a write cut short by a crash)")
    write_begin(seg_words)  # desks that attach meanwhile wait instead of reading zeros
    try:
        if reset_first:
            reset(st, keep=PUBLISHED)
            sessions[...] = 0
        base = 0
        if state_buf is not None:
            def fresh() -> None:
                reset(st, keep=PUBLISHED)
                sessions[...] = 0

            base = load_newest(directory, state_buf, sessions, log, fresh)
            if base:
                log(f"loaded snapshot at gseq {base}")
        if rejects is not None:
            rejects[...] = 0
            rows = min(rejects.shape[0], sessions.shape[0])
            rejects[:rows, RJ.W_BASE] = sessions[:rows, S_DONE]
        rolls: list[int] = []
        n = replay_journal(st, directory, sessions, from_gseq=base + 1, progress=log,
                           rejects=rejects, rolls=rolls)
    finally:
        write_end(seg_words)
    # Everything replayed came from disk: held = processed = durable.
    sessions[:, S_HELD] = sessions[:, S_DONE]
    sessions[:, S_DURABLE] = sessions[:, S_DONE]
    sessions[0, S_DURABLE] = st.ctr[C_LAST_GSEQ]
    publish_all(st, vers, int(st.ctr[C_LAST_GSEQ]))
    return Recovered(n, int(st.ctr[C_LAST_GSEQ]), torn.torn_bytes,
                     time.perf_counter() - t0, base, rolls[-1] if rolls else 0)


assert EVENT_DTYPE.itemsize == 128
