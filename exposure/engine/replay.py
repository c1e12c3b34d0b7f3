"""Offline replay: run records through the kernel into a fresh private state."""

from __future__ import annotations

import numpy as np

from exposure.core.capacity import Capacities
from exposure.engine.kernel import apply_batch
from exposure.shm.tally_layout import State, allocate

__all__ = ["Engine", "replay_records"]


class Engine:
    """A kernel with its own private state: the offline twin of the compute stage."""

    def __init__(self, caps: Capacities | None = None):
        self.caps = caps or Capacities()
        self.buf, self.state = allocate(self.caps)
        self._next_gseq = 1

    def apply(self, recs: np.ndarray, batch: int = 65536) -> np.ndarray:
        """Apply records in order (assigning gseq where it is 0); return per-event status."""
        status = np.zeros(len(recs), np.uint8)
        unset = recs["gseq"] == 0
        if unset.any():
            recs = recs.copy()
            k = int(unset.sum())
            recs["gseq"][unset] = np.arange(self._next_gseq, self._next_gseq + k, dtype=np.uint64)
        if len(recs):
            self._next_gseq = int(recs["gseq"].max()) + 1
        for lo in range(0, len(recs), batch):
            apply_batch(self.state, recs[lo:lo + batch], status[lo:lo + batch])
        return status


def replay_records(recs: np.ndarray, caps: Capacities | None = None) -> State:
    """The state after applying ``recs`` to an empty day."""
    eng = Engine(caps)
    eng.apply(recs)
    return eng.state
