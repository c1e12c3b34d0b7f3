"""The snapshotter: the process that takes a node's snapshots without stalling compute.

The supervisor starts ``python -m exposure.node.snapshotter`` every ``every_events`` journaled
events or ``every_s`` seconds, at nice 19 on a CPU the node does not spin on. It loads the
newest valid snapshot into a private state, replays the journal after it (up to the
journal's durable gseq) through the same kernel, writes the result
(:func:`exposure.store.snapshot.write_snapshot`) and applies the retention
(:func:`exposure.store.snapshot.retain`). The snapshot format is :mod:`exposure.store.snapshot`; the
replay is :mod:`exposure.store.recovery`'s, so this module sits above both.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exposure.config.node import ConfigError, load_config
from exposure.core.log import setup
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_layout import allocate, reset
from exposure.store.journal import JournalError, ScanResult
from exposure.store.recovery import replay_journal
from exposure.store.snapshot import load_newest, retain, write_snapshot

__all__ = ["take_snapshot", "main"]

log = logging.getLogger(__name__)


def take_snapshot(cfg, log: Callable[[str], None], nice: bool = True, upto: int = 0) -> int:
    """Newest snapshot + journal replay (up to gseq ``upto``: the supervisor passes the
    journal's *durable* seq, so a snapshot never holds what a power cut could still take
    from the journal) -> a new snapshot; returns its gseq (0: nothing new)."""
    if nice:
        try:
            os.nice(19)
        except OSError:
            pass
    buf, st = allocate(cfg.caps)
    sessions = np.zeros((cfg.max_sessions + 1, SESSION_COLS), np.uint64)
    base = load_newest(cfg.data_dir, buf, sessions, log, lambda: reset(st))
    res = ScanResult()
    if upto and upto <= base:
        return 0
    n = replay_journal(st, cfg.data_dir, sessions, from_gseq=base + 1, result=res, upto=upto)
    last = base + n
    if n == 0:
        return 0
    t0 = time.perf_counter()
    path = write_snapshot(cfg.data_dir, last, buf, sessions)
    log(f"snapshot {path.name}: {n:,} events replayed onto gseq {base}, written in "
        f"{time.perf_counter() - t0:.2f} s ({path.stat().st_size / 2**20:.0f} MiB)")
    retain(cfg.data_dir, cfg.snapshot_keep, cfg.snapshot_journal, log)
    return last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exposure.node.snapshotter",
                                description="take one snapshot of a node's data directory")
    p.add_argument("--config")
    p.add_argument("--data-dir")
    p.add_argument("--cpus", help="comma-separated CPUs to run on (after reading the config)")
    p.add_argument("--upto", type=int, default=0, help="the journal's durable gseq")
    a = p.parse_args(argv)
    setup(label="exposure/snapshot")
    try:
        cfg = load_config(a.config)
    except ConfigError as e:
        log.error(str(e))
        return 2
    if a.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=Path(a.data_dir))
    if a.cpus:
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    try:
        take_snapshot(cfg, log.info, upto=a.upto)
    except (JournalError, OSError) as e:
        log.error(f"snapshot failed: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
