"""The sequencer: the one owner of a node's global sequence and of the compute ring's
producer side.

Whoever puts records on the compute ring does it through one :class:`Sequencer`: on a
primary, ingest's jitted scan stamps each session record with :attr:`Sequencer.next_gseq`
onwards; on a backup, the replica's jitted push copies the primary's records verbatim,
expecting exactly that gseq. Either writes the slots itself (one copy, straight from the
receive buffer) and publishes the tail; then it calls :meth:`Sequencer.commit`, which
advances the sequence, counts, and wakes each consumer (compute, the journal) that said
it was going to sleep. When the node is promoted, the same sequencer passes from the
replica to ingest: the sequence continues from the last record received, with no
hand-over of numbers.
"""

from __future__ import annotations

import numpy as np

from exposure.shm import counters_layout as CN
from exposure.shm.ring import Ring

__all__ = ["Sequencer"]

_EVENTS = CN.INDEX["ingest_events_total"]
_RECEIVED = CN.INDEX["ingest_received_gseq"]


class Sequencer:
    """The next gseq and the producer end of ``ring`` (the compute ring: consumer 0 is
    compute, consumer 1, when there is one, the journal)."""

    def __init__(self, ring: Ring, next_gseq: int, counters: np.ndarray | None = None):
        if next_gseq < 1:
            raise ValueError(f"next_gseq {next_gseq} must be at least 1")
        self.ring = ring
        self.ctrl, self.slots = ring.ctrl, ring.slots
        self.next_gseq = next_gseq
        self.journal_end = ring.reader(1) if ring.consumers > 1 else None
        self.cnt = CN.or_private(counters)

    @property
    def last(self) -> int:
        """The last gseq put on the ring (0: none yet)."""
        return self.next_gseq - 1

    def commit(self, n: int, compute_asleep: int = 0, journal_asleep: int = 0,
               counted: bool = False) -> None:
        """A producer has published ``n`` records, gseqs ``next_gseq`` on: take them, and
        wake the consumers that announced sleep (the jitted producer read their flags
        after its release store of the tail). ``counted``: the jitted producer has
        already added them to the counters (``ingest_events_total``,
        ``ingest_received_gseq``), one crossing less per read."""
        self.next_gseq += n
        if not counted:
            cnt = self.cnt
            cnt[_EVENTS] += n
            cnt[_RECEIVED] = self.next_gseq - 1
        if compute_asleep:
            self.ring.semaphore.release()
        if journal_asleep and self.journal_end is not None:
            self.journal_end.semaphore.release()
