"""Durable file-system steps shared by the journal, snapshots and the epoch file."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "publish_file"]


def fsync_dir(directory: str | Path) -> None:
    """Make a directory's entries (a new or renamed file) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: Path, final: Path, f) -> None:
    """Atomically put the fully written, still open file ``f`` (at ``tmp``) in place as
    ``final``: fsync its data, rename, fsync the directory. A reader sees the old file or
    the whole new one, before and after a crash."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, final)
    fsync_dir(final.parent)
