"""``exposure replay`` and ``exposure journal``: offline replay of event files, a journal
(as of any seq) and a cluster, and a journal's contents."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import orjson

from exposure.ops.common import fail, load_cfg

__all__ = ["cmd_replay", "cmd_journal"]


def cmd_replay(args: argparse.Namespace) -> int:
    from exposure.engine.document import document
    from exposure.engine.parse import EventFileError, read_events, read_instruments_csv
    from exposure.engine.replay import replay_records

    if args.journal:
        if args.events or args.instruments:
            return fail("replay takes an events file or --journal DIR, not both")
        doc = _journal_document(args)
        if isinstance(doc, int):
            return doc
        opt = 0 if args.compact else orjson.OPT_INDENT_2
        sys.stdout.buffer.write(orjson.dumps(doc, option=opt) + b"\n")
        return 0
    if args.day:
        return fail("--day needs --journal DIR")
    if not args.events:
        return fail("replay needs an events file (or --journal DIR)")
    try:
        parts = []
        if args.instruments:
            parts.append(read_instruments_csv(args.instruments))
        parts.append(read_events(args.events))
    except EventFileError as e:
        return fail(str(e))
    recs = np.concatenate(parts)
    if args.cluster:
        doc = _replay_cluster(args, recs)
        if isinstance(doc, int):
            return doc
    elif args.partition:
        return fail("--partition needs --cluster FILE")
    else:
        doc = document(replay_records(recs))
    opt = 0 if args.compact else orjson.OPT_INDENT_2
    sys.stdout.buffer.write(orjson.dumps(doc, option=opt) + b"\n")
    return 0


def _journal_document(args: argparse.Namespace) -> dict | int:
    """``replay --journal DIR [--upto SEQ | --day DATE]``: the document from the newest
    snapshot at or before the target and the journal after it, archived segments included
    (:func:`exposure.store.eod.state_at`). ``--day``: up to the event before that day's
    roll (the days index, else the journal's roll records); a day not rolled yet: the
    latest event."""
    from exposure.engine.document import document
    from exposure.shm.session_layout import SESSION_COLS
    from exposure.shm.tally_layout import allocate, reset
    from exposure.store.eod import date_code, find_rolls, read_days, state_at
    from exposure.store.journal import JournalError

    cfg = load_cfg(args.config)
    buf, st = allocate(cfg.caps)
    sessions = np.zeros((cfg.max_sessions + 1, SESSION_COLS), np.uint64)
    upto = args.upto or 0
    try:
        if args.day:
            if args.upto:
                return fail("--day or --upto, not both")
            try:
                day = date_code(args.day)
            except ValueError as e:
                return fail(f"--day {args.day!r}: {e}")
            days = [(g, dt) for g, dt, _ in read_days(args.journal)]
            if not any(dt == day for _, dt in days):  # not indexed (yet): the journal's
                days += find_rolls(args.journal, max((g for g, _ in days), default=0) + 1)
            rolls = [g for g, dt in days if dt == day]
            if rolls:
                upto = min(rolls) - 1
            elif any(dt > day for _, dt in days):
                return fail(f"--day {args.day}: no roll closed that day in this journal "
                             "(the days rolled: DIR/eod/days.csv)")
            else:
                print(f"exposure replay: {args.day} has not rolled: the document as of the "
                      "latest event", file=sys.stderr)
        state_at(st, buf, sessions, args.journal, upto, lambda: reset(st))
    except (JournalError, OSError) as e:
        return fail(str(e))
    return document(st)


def _replay_cluster(args: argparse.Namespace, recs: np.ndarray) -> dict | int:
    """The cluster's document for ``recs`` (or one partition's, with --partition)."""
    from exposure.cluster.topology import replay_cluster, replay_partition
    from exposure.core.partition import MapError, PartitionMap
    from exposure.engine.document import document

    try:
        pmap = PartitionMap.load(args.cluster)
        if args.partition:
            return document(replay_partition(recs, pmap, pmap.index(args.partition)))
    except MapError as e:
        return fail(str(e))
    return replay_cluster(recs, pmap)


def cmd_journal(args: argparse.Namespace) -> int:
    from exposure.engine.parse import record_objects
    from exposure.store.journal import JournalError, ScanResult, read_blocks

    res = ScanResult()
    try:
        if args.action == "verify":  # the archived segments and the live ones: one journal
            for _ in read_blocks(args.dir, res, archive=True):
                pass
            print(orjson.dumps({
                "segments": res.segments, "blocks": res.blocks, "records": res.records,
                "first_gseq": res.first, "last_gseq": res.last, "bytes": res.bytes,
                "torn_tail_bytes": res.torn_bytes,
                "torn_tail_at": f"{res.torn_path}:{res.torn_offset}" if res.torn_path else None,
            }, option=orjson.OPT_INDENT_2).decode())
            return 0
        out = sys.stdout.buffer
        for blk in read_blocks(args.dir, res, from_gseq=args.from_seq or 1,
                               archive=True):
            r = blk.records
            keep = np.ones(len(r), bool)
            if args.from_seq:
                keep &= r["gseq"] >= args.from_seq
            if args.to_seq:
                keep &= r["gseq"] <= args.to_seq
            if args.source is not None:
                keep &= r["source"] == args.source
            if args.account is not None:
                keep &= r["account"] == args.account
            if keep.any():
                out.write(b"".join(orjson.dumps(d) + b"\n"
                                   for d in record_objects(r[keep], stamps=True)))
            if args.to_seq and blk.last >= args.to_seq:
                break
        return 0
    except (JournalError, OSError) as e:
        return fail(str(e))
