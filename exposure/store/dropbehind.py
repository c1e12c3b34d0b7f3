"""Keep only the newest part of a write-once log in the page cache.

A journal is written once and read back soon only by its near readers (the snapshotter
replays from the newest snapshot, the mirror from where its backup stands); recovery reads
it from disk anyway. Left to itself the kernel keeps every page written, so a node writing
250 MB/s grows the page cache by that much: every journal write then lands on pages the
kernel has just taken from its free memory. On this machine (a VM whose memory the host
provides on first touch) that copy ran at 150-300 MB/s, and above 2 M events/s it was two
thirds of the journal process's samples, which fell behind and pushed back on compute
(docs/performance.md). Dropping what is more than ``keep`` bytes behind the newest synced
byte keeps the cache at a bounded size, so new writes reuse pages freed a moment ago.

Only synced bytes are dropped (``POSIX_FADV_DONTNEED`` skips dirty pages anyway), in
steps of at least ``step`` bytes, oldest first, across segments: a rolled segment's pages
are dropped through its path. A range ends on a multiple of :data:`ALIGN` (or at the end
of a rolled segment): the kernel keeps file pages in folios of up to 2 MiB and drops only
those wholly inside the advised range, so a cut through a folio would keep it for good. A
filesystem that refuses the advice (or a segment removed meanwhile) costs nothing but the
advice: the log is never affected.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path

__all__ = ["DropBehind", "DROP_STEP", "ALIGN"]

log = logging.getLogger(__name__)

DROP_STEP = 16 << 20  # bytes dropped at a time, at least: one advice per 16 MiB written
ALIGN = 2 << 20       # the largest page-cache folio (a PMD): ranges end on its multiples


class DropBehind:
    """The page-cache window of one log: :meth:`rolled` when a segment is closed (its data
    durable), :meth:`synced` after each sync of the current segment."""

    def __init__(self, keep: int, step: int = DROP_STEP):
        if keep < 0 or step < 1:
            raise ValueError(f"keep={keep}, step={step}: keep not negative, step positive")
        self.keep, self.step = int(keep), int(step)
        self._behind: deque[list] = deque()  # rolled segments' cached ranges: [path, lo, hi]
        self._lo = 0        # the current segment's bytes below this are dropped
        self.dropped = 0    # bytes dropped in all (status, tests)
        self._failed = False

    def rolled(self, path: Path, size: int) -> None:
        """The current segment (``path``, ``size`` bytes, all durable) is closed; the next
        :meth:`synced` is about a new one."""
        if size > self._lo:
            self._behind.append([Path(path), self._lo, size])
        self._lo = 0

    def synced(self, fd: int, size: int) -> None:
        """The current segment (open as ``fd``) is durable up to ``size`` bytes: drop what
        lies more than ``keep`` behind it."""
        if self._failed:
            return
        held = size - self._lo + sum(hi - lo for _, lo, hi in self._behind)
        if held < self.keep + self.step:
            return
        excess = held - self.keep
        while self._behind and excess > 0:
            seg = self._behind[0]
            path, lo, hi = seg
            if hi - lo <= excess:  # the whole rest of a rolled segment, to its end
                self._drop_path(path, lo, 0, hi - lo)
                excess -= hi - lo
                self._behind.popleft()
                continue
            cut = (lo + excess) & ~(ALIGN - 1)
            if cut > lo:
                self._drop_path(path, lo, cut - lo, cut - lo)
                seg[1] = cut
            return
        cut = (self._lo + excess) & ~(ALIGN - 1)
        if cut > self._lo:
            self._advise(fd, self._lo, cut - self._lo, cut - self._lo)
            self._lo = cut

    def _drop_path(self, path: Path, lo: int, n: int, counted: int) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return  # removed meanwhile (retention): its pages went with it
        try:
            self._advise(fd, lo, n, counted)
        finally:
            os.close(fd)

    def _advise(self, fd: int, lo: int, n: int, counted: int) -> None:
        """Advise ``n`` bytes from ``lo`` (0: to the end of the file) away."""
        try:
            os.posix_fadvise(fd, lo, n, os.POSIX_FADV_DONTNEED)
            self.dropped += counted
        except OSError as e:
            self._failed = True
            log.warning("the journal's page-cache window is off: posix_fadvise refused "
                        "(%s); the kernel keeps what it likes", e)
