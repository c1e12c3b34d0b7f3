"""The snapshotter: the process that takes a node's snapshots without stalling compute.

The supervisor starts ``python -m exposure.node.snapshotter`` every ``every_events`` journaled
events or ``every_s`` seconds, at nice 19 on a CPU the node does not spin on. It loads the
newest valid snapshot into a private state, replays the journal after it (up to the
journal's durable gseq) through the same kernel, writes the result
(:func:`exposure.store.snapshot.write_snapshot`) and applies the retention
(:func:`exposure.store.snapshot.retain`). On its way it stops at every ``roll`` record: the
state just before it is the day's close, written as the end-of-day report
(:mod:`exposure.store.eod`), and the state just after it is written as a snapshot (the next
day starts from it). A node killed before a report was written writes it when it restarts
(the supervisor starts this process at once when recovery replayed a roll no snapshot
covers). The snapshot format is :mod:`exposure.store.snapshot`; the
replay is :mod:`exposure.store.recovery`'s, so this module sits above both.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exposure.config.node import ConfigError, load_config
from exposure.core import jit as _jit  # noqa: F401  (before any kernel: the keyed cache)
from exposure.core.log import setup
from exposure.core.types import C_ROLLS
from exposure.engine.document import document
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_layout import allocate, reset
from exposure.store.eod import date_text, read_days, write_report
from exposure.store.journal import JournalError, ScanResult
from exposure.store.recovery import replay_journal, replay_to_roll
from exposure.store.snapshot import (
    load_newest,
    retain,
    snapshot_name,
    snapshots,
    write_snapshot,
)

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
    if upto and upto <= base:
        return 0
    last = base
    while True:  # day by day: each roll's report, then the roll's own snapshot
        res = ScanResult()
        n, roll, date = replay_to_roll(st, cfg.data_dir, sessions, from_gseq=last + 1,
                                       result=res, upto=upto)
        last += n
        if not roll:
            break
        last = _close_day(cfg, st, buf, sessions, roll, date, log)
    if last == base:
        return 0
    if not snapshots(cfg.data_dir) or snapshots(cfg.data_dir)[-1][0] < last:
        t0 = time.perf_counter()
        path = write_snapshot(cfg.data_dir, last, buf, sessions)
        log(f"snapshot {path.name}: {last - base:,} events replayed onto gseq {base}, "
            f"written in {time.perf_counter() - t0:.2f} s "
            f"({path.stat().st_size / 2**20:.0f} MiB)")
    retain(cfg.data_dir, cfg.snapshot_keep, cfg.snapshot_journal, log,
           keep_days=cfg.keep_days, days=[g for g, _, _ in read_days(cfg.data_dir)])
    return last


def _close_day(cfg, st, buf: np.ndarray, sessions: np.ndarray, roll: int, date: int,
               log: Callable[[str], None]) -> int:
    """The state is the day's close (gseq ``roll - 1``): apply the roll; when the kernel
    accepted it, write the day's report (:mod:`exposure.store.eod`) and the snapshot the
    next day starts from (at the roll's gseq). Returns the roll's gseq."""
    doc = document(st)
    before = int(st.ctr[C_ROLLS])
    replay_journal(st, cfg.data_dir, sessions, from_gseq=roll, upto=roll)
    if int(st.ctr[C_ROLLS]) == before:
        log(f"the roll at gseq {roll} was refused by the kernel: no day closed")
        return roll
    path = write_report(cfg.data_dir, doc, roll, date)
    log(f"end of day {date_text(date) or '(undated)'}: {path} (as of gseq {roll - 1})")
    if not any(g == roll for g, _ in snapshots(cfg.data_dir)):
        write_snapshot(cfg.data_dir, roll, buf, sessions)
        log(f"snapshot {snapshot_name(roll)}: the start of the day after")
    return roll


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
    from exposure.node.process import exit_process

    exit_process(main())  # (no interpreter teardown: 0.1-0.5 s of CPU after numba)
