"""Zeros written ahead of a log file's data, shared by the node's journal
(:mod:`exposure.store.journal`) and the FIX gateway's (:mod:`exposure.fix.journal`).

A log that keeps zeros written (and made durable) ahead of its data writes each group
commit over blocks the file already has: the commit's ``fdatasync`` has no file size or
extent to commit, so the filesystem's metadata journal stays out of the commit's latency
(docs/performance.md). The log's reader must then take a header of zeros as the end of
the data (no valid header is all zeros), and the writer cuts a file to its data when it
closes it or rolls away from it, so only the newest file ever has spare space.

:func:`reserve` grows the zeros ahead ``prewrite`` bytes at a time, never past the file's
limit by more than the write it is for; on a full disk it falls back to room for that one
write. :func:`zero_fill` writes zeros over a range and leaves the file as it was on a
failure (a short write is ENOSPC).
"""

from __future__ import annotations

import errno
import os

__all__ = ["reserve", "zero_fill", "PREWRITE"]

PREWRITE = 4 << 20  # bytes of zeros written ahead of the data (the journals' default)


def zero_fill(fd: int, start: int, end: int) -> None:
    """Write zeros over bytes ``[start, end)`` of ``fd``. On any failure the file is cut
    back to ``start`` (it ended there) and the error raised; a short write raises ENOSPC."""
    zeros = bytes(min(end - start, 1 << 20))
    at = start
    try:
        while at < end:
            n = os.pwrite(fd, zeros[:end - at], at)
            if n <= 0:
                raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a short write "
                              "of the journal's prewritten space)")
            at += n
    except OSError:
        os.ftruncate(fd, start)
        raise


def reserve(fd: int, size: int, alloc: int, need: int, prewrite: int, limit: int) -> int:
    """Make the file ``fd`` (data up to ``size``, zeros up to ``alloc``) reach ``size +
    need`` bytes with zeros past the data, extending it by at least ``prewrite`` bytes
    but not past ``limit`` (the segment's size) unless the write itself goes past it.
    Returns the new ``alloc``. A full disk falls back to room for ``need`` only; when even
    that fails the file is as it was and ENOSPC is raised."""
    target = size + need
    if target <= alloc:
        return alloc
    end = max(target, min(alloc + prewrite, limit))
    try:
        zero_fill(fd, alloc, end)
    except OSError as e:  # a nearly full disk: room for this write only, if there is
        if e.errno != errno.ENOSPC or end == target:
            raise
        end = target
        zero_fill(fd, alloc, end)
    return end
