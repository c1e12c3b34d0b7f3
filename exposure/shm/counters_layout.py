"""Layout of a node's counters segment: what each stage has done, for status, top, metrics.

One shared segment (``/exposure.<name>.counters``), u8 words, like Aeron's counters in its
CnC file: every word has exactly one writer (the stage or the supervisor named below),
written with plain stores at batch granularity (never per record); readers (``exposure
status``, ``exposure top``, ``exposure metrics``) map it read-only and read each word on
its own (a counter only grows; a gauge is meaningful alone; no multi-word invariant, so no
seqlock). A word is 8 bytes aligned: a reader never sees half of one.

::

    word   0       MAGIC ("EXPCNTRS")
    word   1       VERSION
    word   2       COUNTER_WORDS (the segment's length in words)
    words  3..7    reserved
    words  8..     one word per entry of COUNTERS, in that order (the index is the word)

The session table keeps the session port's and each session's counters
(:mod:`exposure.shm.session_layout`), the control block the role, epoch and replication
marks (:mod:`exposure.shm.control`); this segment holds the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["MAGIC", "VERSION", "COUNTER_WORDS", "Counter", "COUNTERS", "INDEX",
           "HEADER_WORDS", "check", "or_private"]

MAGIC = 0x5352_544E_4355_5058  # "EXPCNTRS" little-endian
VERSION = 1
HEADER_WORDS = 8
COUNTER_WORDS = 128


class Counter(NamedTuple):
    name: str    # also the Prometheus name, after "exposure_" (ns ones: metrics.SECONDS)
    writer: str  # the stage (or "supervisor") that alone writes it
    kind: str    # "counter" (only grows) or "gauge"
    help: str


COUNTERS: tuple[Counter, ...] = (
    # ingest
    Counter("ingest_events_total", "ingest", "counter",
            "records sequenced onto the compute ring (each with the next gseq)"),
    Counter("ingest_ring_full_total", "ingest", "counter",
            "passes on which the compute ring had no room for a session's records (its "
            "socket was left unread: back-pressure)"),
    Counter("ingest_received_gseq", "ingest", "gauge", "the last gseq sequenced"),
    Counter("ingest_listening", "ingest", "gauge",
            "1 once the session port listens (the node is ready for sessions)"),
    # compute
    Counter("compute_events_total", "compute", "counter", "records applied by the kernel"),
    Counter("compute_batches_total", "compute", "counter", "batches applied"),
    Counter("compute_ring_full_total", "compute", "counter",
            "batches whose feed rows did not all fit on the fan-out ring at once"),
    Counter("compute_rows_total", "compute", "counter", "feed rows made"),
    Counter("compute_gseq", "compute", "gauge", "the last gseq applied"),
    Counter("compute_recv_ns", "compute", "gauge",
            "ingest's receive time (CLOCK_REALTIME ns) of the last record applied"),
    # fan-out
    Counter("fanout_datagrams_total", "fanout", "counter", "INCREMENTAL datagrams sent"),
    Counter("fanout_refresh_datagrams_total", "fanout", "counter", "REFRESH datagrams sent"),
    Counter("fanout_heartbeats_total", "fanout", "counter", "HEARTBEAT datagrams sent"),
    Counter("fanout_rows_total", "fanout", "counter", "rows sent in INCREMENTAL datagrams"),
    Counter("fanout_dropped_total", "fanout", "counter",
            "datagrams the multicast socket refused (receivers see each as a gap)"),
    Counter("fanout_refresh_cycles_total", "fanout", "counter", "refresh cycles completed"),
    # journal
    Counter("journal_records_total", "journal", "counter", "records written to the journal"),
    Counter("journal_writes_total", "journal", "counter", "write() calls"),
    Counter("journal_fsyncs_total", "journal", "counter", "fsyncs (fdatasync) of the journal"),
    Counter("journal_fsync_ns_total", "journal", "counter", "time spent in fsyncs, ns"),
    Counter("journal_fsync_ns_max", "journal", "gauge", "the longest fsync so far, ns"),
    Counter("journal_durable_gseq", "journal", "gauge", "the last gseq on disk (fsynced)"),
    Counter("journal_durable_recv_ns", "journal", "gauge",
            "ingest's receive time of the last durable record (CLOCK_REALTIME ns)"),
    Counter("journal_mirror_dropped_total", "journal", "counter",
            "records the mirror ring had no room for when the journal handed them over"),
    # snapshot (the feed's recovery server)
    Counter("snapshot_served_total", "snapshot", "counter", "feed snapshots answered"),
    Counter("snapshot_refused_total", "snapshot", "counter",
            "snapshot requests refused (busy, not primary, not ready, bad)"),
    # supervisor
    Counter("restarts_total", "supervisor", "counter",
            "restarts of the node's processes (a process died, stalled or a rebuild)"),
    Counter("started_ns", "supervisor", "gauge", "when the node started (CLOCK_REALTIME ns)"),
    # mirror (a pair's primary; appended: older readers keep their indices)
    Counter("mirror_records_total", "mirror", "counter", "records sent to the backup"),
    Counter("mirror_journal_records_total", "mirror", "counter",
            "of those, records read back from the journal files (a catch-up, or hand-offs "
            "the journal dropped on a full mirror ring)"),
    Counter("mirror_replicated_recv_ns", "mirror", "gauge",
            "ingest's receive time (CLOCK_REALTIME ns) of the last record the backup "
            "acknowledged durable (at frame granularity: at most that record's)"),
    # journal (appended)
    Counter("journal_roll_gseq", "journal", "gauge",
            "the gseq of the last roll record journaled (0: none since the start); the "
            "supervisor starts the snapshot process, which writes the day's end-of-day "
            "report, once it is durable"),
)
INDEX = {c.name: HEADER_WORDS + k for k, c in enumerate(COUNTERS)}
assert HEADER_WORDS + len(COUNTERS) <= COUNTER_WORDS


def check(words) -> None:
    """ValueError (naming what is wrong) unless ``words`` is a counters segment of this
    layout."""
    if len(words) < COUNTER_WORDS:
        raise ValueError(f"a counters segment of {len(words)} words, expected {COUNTER_WORDS}")
    if int(words[0]) != MAGIC:
        raise ValueError(f"bad magic {int(words[0]):#x}: not a counters segment")
    if int(words[1]) != VERSION:
        raise ValueError(f"counters layout version {int(words[1])}, expected {VERSION}")


def or_private(words: np.ndarray | None) -> np.ndarray:
    """A stage's counter words: the node's segment, or (a stage built alone, in a test or
    a benchmark) private words of the same layout that nobody reads."""
    return words if words is not None else np.zeros(COUNTER_WORDS, np.uint64)
