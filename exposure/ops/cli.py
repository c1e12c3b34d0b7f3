"""The ``exposure`` command."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

import numpy as np
import orjson

__all__ = ["main"]

log = logging.getLogger(__name__)


def _fail(msg: str, code: int = 2) -> int:
    print(f"exposure: {msg}", file=sys.stderr)
    return code


def _cmd_replay(args: argparse.Namespace) -> int:
    from exposure.engine.document import document
    from exposure.engine.parse import EventFileError, read_events, read_instruments_csv
    from exposure.engine.replay import replay_records

    if args.journal:
        if args.events or args.instruments:
            return _fail("replay takes an events file or --journal DIR, not both")
        doc = _journal_document(args)
        if isinstance(doc, int):
            return doc
        opt = 0 if args.compact else orjson.OPT_INDENT_2
        sys.stdout.buffer.write(orjson.dumps(doc, option=opt) + b"\n")
        return 0
    if args.day:
        return _fail("--day needs --journal DIR")
    if not args.events:
        return _fail("replay needs an events file (or --journal DIR)")
    try:
        parts = []
        if args.instruments:
            parts.append(read_instruments_csv(args.instruments))
        parts.append(read_events(args.events))
    except EventFileError as e:
        return _fail(str(e))
    recs = np.concatenate(parts)
    if args.cluster:
        doc = _replay_cluster(args, recs)
        if isinstance(doc, int):
            return doc
    elif args.partition:
        return _fail("--partition needs --cluster FILE")
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

    cfg = _load_cfg(args.config)
    buf, st = allocate(cfg.caps)
    sessions = np.zeros((cfg.max_sessions + 1, SESSION_COLS), np.uint64)
    upto = args.upto or 0
    try:
        if args.day:
            if args.upto:
                return _fail("--day or --upto, not both")
            try:
                day = date_code(args.day)
            except ValueError as e:
                return _fail(f"--day {args.day!r}: {e}")
            days = [(g, dt) for g, dt, _ in read_days(args.journal)]
            if not any(dt == day for _, dt in days):  # not indexed (yet): the journal's
                days += find_rolls(args.journal, max((g for g, _ in days), default=0) + 1)
            rolls = [g for g, dt in days if dt == day]
            if rolls:
                upto = min(rolls) - 1
            elif any(dt > day for _, dt in days):
                return _fail(f"--day {args.day}: no roll closed that day in this journal "
                             "(the days rolled: DIR/eod/days.csv)")
            else:
                print(f"exposure replay: {args.day} has not rolled: the document as of the "
                      "latest event", file=sys.stderr)
        state_at(st, buf, sessions, args.journal, upto, lambda: reset(st))
    except (JournalError, OSError) as e:
        return _fail(str(e))
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
        return _fail(str(e))
    return replay_cluster(recs, pmap)


def _load_cluster(path):
    from exposure.cluster.topology import ClusterError, load_cluster

    try:
        return load_cluster(path)
    except ClusterError as e:
        raise SystemExit(_fail(str(e))) from None


def _cmd_journal(args: argparse.Namespace) -> int:
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
        return _fail(str(e))


def _load_cfg(path):
    from exposure.config.node import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as e:
        raise SystemExit(_fail(str(e))) from None


def _cmd_run(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    from pathlib import Path

    from exposure.config.node import ConfigError
    from exposure.node.supervisor import Node
    from exposure.pair.election import Stopped
    from exposure.shm.tally_segment import SegmentBusy, SegmentModeError
    from exposure.store.journal import JournalError

    cfg = _load_cfg(args.config)
    if args.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=Path(args.data_dir))
    node = Node(cfg, args.config)
    stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # (SIGHUP: its terminal
        signal.signal(sig, lambda *_: stop.append(1))          # closed) a clean stop
    try:
        node.start(stop)
    except Stopped:
        node.stop()
        return 0
    except (SegmentBusy, SegmentModeError, ConfigError, JournalError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot use the data directory {cfg.data_dir}: {e}")
    def ready() -> None:  # the banner only once the node does what it says
        print(node.describe(), flush=True)
        print(f"exposure: {node.ready_line()}", flush=True)

    try:
        why = node.wait(stop, on_ready=ready, say=log.info)
        log.log(logging.INFO if stop else logging.ERROR, why)
        return 0 if stop else 1
    finally:
        node.stop()


def _cmd_send(args: argparse.Namespace) -> int:
    """``exposure send FILE | - | --follow FILE``, on a producer (exposure.net.sender)."""
    import time
    from pathlib import Path

    from exposure.net.client import SendError
    from exposure.net.sessions import MIN_SECRET, SessionsError, secret_for

    if args.cluster:
        return _send_cluster(args)
    if (args.events is None) == (args.follow is None):
        return _fail("send takes an events FILE, - (standard input) or --follow FILE")
    if args.follow is None and args.position:
        return _fail("--position goes with --follow FILE")
    if args.events not in (None, "-") and args.spool:
        return _fail("--spool goes with - or --follow: a file is its own spool (its lines "
                     "are seqs 1..n; a send started again resends what the node lacks)")
    cfg = _load_cfg(args.config)
    if not 1 <= args.session <= min(cfg.max_sessions, 2**32 - 1):
        return _fail(f"--session {args.session}: a session id is 1..{cfg.max_sessions}")
    secret = None
    try:
        if args.secret_file:
            secret = Path(args.secret_file).read_bytes().strip()
            if len(secret) < MIN_SECRET:
                return _fail(f"--secret-file {args.secret_file}: {len(secret)} bytes; a "
                             f"secret has at least {MIN_SECRET}")
        elif cfg.sessions_file is not None:
            secret = secret_for(cfg.sessions_file, args.session)
    except OSError as e:
        return _fail(f"cannot read the secret {args.secret_file!r}: {e.strerror or e}")
    except SessionsError as e:
        return _fail(f"no secret for session {args.session}: {e} (use --secret-file)")
    recs = None
    if args.events not in (None, "-"):
        from exposure.engine.parse import EventFileError, read_events

        try:
            recs = read_events(args.events)
        except EventFileError as e:
            return _fail(str(e))
    deadline = time.monotonic() + args.timeout
    _wait_if_starting(cfg, args.timeout)
    try:
        if recs is not None:
            res = _send_file(args, cfg, secret, recs, deadline)
        else:
            res = _send_stream(args, cfg, secret, deadline)
    except SendError as e:
        return _fail(str(e))
    sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
    return 0


def _retry_of(args: argparse.Namespace, cfg, streaming: bool) -> float | None:
    """--retry, else 60 s for a pair and 0 for a node (a file), no limit (a stream)."""
    if args.retry is not None:
        return args.retry
    if streaming:
        return None
    return 60.0 if cfg.peer_ingest else 0.0


def _send_file(args: argparse.Namespace, cfg, secret, recs, deadline: float) -> dict:
    """``send FILE``: its records are seqs 1..n; only what the node lacks goes out."""
    import time

    from exposure.net.sender import Watch, finish, open_producer, send_numbered, summary

    p = open_producer(cfg, args.session, secret, max(1.0, deadline - time.monotonic()))
    try:
        watch = Watch(p, args.timeout, _retry_of(args, cfg, False))
        skipped = send_numbered(p, recs, watch, rate=args.rate, progress=_send_progress)
    except BaseException:
        from exposure.net.sender import abandon

        abandon(p)
        raise
    finish(p, watch)
    return summary(p, len(recs) - skipped, skipped)


def _send_stream(args: argparse.Namespace, cfg, secret, deadline: float) -> dict:
    """``send -`` and ``send --follow FILE``: lines as they arrive, until the input ends
    or SIGINT/SIGTERM/SIGHUP; then every event acknowledged, and the summary."""
    import signal
    import time

    from exposure.net.client import SendError
    from exposure.net.sender import Watch, abandon, finish, open_producer, summary
    from exposure.ops.stream import Follow, Position, Stdin, stream

    stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(1))
    pos = Position(args.position, args.session) if args.position else None
    last = pos.load() if pos is not None else None
    p = open_producer(cfg, args.session, secret, max(1.0, deadline - time.monotonic()),
                      spool=args.spool)
    try:
        held = p.sent  # what the node (or the spool) holds of the session
        skip = 0
        if args.follow is None:
            source = Stdin()
        elif last is not None:
            seq, dev, ino, off = last
            if held < seq:
                raise SendError(
                    f"the position file {args.position} says seq {seq} of session "
                    f"{args.session} was acknowledged, but the node holds only {held} (another "
                    f"node, or a session started afresh: remove the position file)")
            skip = held - seq
            source = Follow(args.follow, start=(dev, ino, off))
        elif held:
            raise SendError(
                f"session {args.session} already holds seqs up to {held}: a follower started "
                f"again needs --position FILE to know where it stopped (or use a new "
                f"--session)")
        else:
            source = Follow(args.follow)
        watch = Watch(p, args.timeout, _retry_of(args, cfg, True))
        sent = stream(p, source, watch, stop, progress=_send_progress, position=pos,
                      skip=skip)
    except BaseException:
        abandon(p)
        raise
    # (the input ended: with no --retry, the last acknowledgements get --timeout in all)
    finish(p, watch, limit=args.timeout if args.retry is None else None)
    if pos is not None:
        pos.advance(p.acked, force=True)
    res = summary(p, sent, skip)
    if args.follow is not None:
        res["rotations"], res["truncations"] = source.rotations, source.truncations
        source.close()
    return res


def _send_progress(msg: str) -> None:
    print(f"exposure send: {msg}", file=sys.stderr, flush=True)


def _send_cluster(args: argparse.Namespace) -> int:
    """``send --cluster``: each record to its partition, one session per partition."""
    from exposure.cluster.topology import send_cluster
    from exposure.engine.parse import EventFileError, read_events
    from exposure.net.client import SendError
    from exposure.net.sessions import SessionsError, secret_for

    if args.config or args.secret_file:
        return _fail("--cluster takes each partition's config and secret from the cluster "
                     "file; leave out --config and --secret-file")
    if args.events in (None, "-") or args.follow or args.position or args.spool:
        return _fail("send --cluster takes an events FILE (not -, --follow, --position or "
                     "--spool)")
    cl = _load_cluster(args.cluster)
    secrets = []
    for name, cfg in zip(cl.names, cl.configs, strict=True):
        if not 1 <= args.session <= min(cfg.max_sessions, 2**32 - 1):
            return _fail(f"--session {args.session}: partition {name!r} takes session ids "
                         f"1..{cfg.max_sessions}")
        try:
            secrets.append(secret_for(cfg.sessions_file, args.session)
                           if cfg.sessions_file is not None else None)
        except (SessionsError, OSError) as e:
            return _fail(f"partition {name!r}: no secret for session {args.session}: {e}")
    try:
        recs = read_events(args.events)
    except EventFileError as e:
        return _fail(str(e))
    for cfg in cl.configs:
        _wait_if_starting(cfg, args.timeout)
    try:
        res = send_cluster(cl, recs, args.session, timeout=args.timeout, retry_s=args.retry,
                           rate=args.rate, secrets=secrets,
                           progress=_send_progress)
    except SendError as e:
        return _fail(str(e))
    sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
    return 0


def _wait_if_starting(cfg, timeout: float) -> None:
    """A node of this config that runs on this host but does not accept sessions yet (it
    is loading or compiling its kernels, or recovering): wait for it, within ``timeout``.
    Anything else (no such node here, a backup, a remote node) is left to the connection."""
    import time

    from exposure.ops.status import read_control, read_counters
    from exposure.shm.control import CTL_ROLE, ROLE_BACKUP
    from exposure.shm.tally_segment import TallySegment

    deadline = time.monotonic() + timeout
    said = False
    while time.monotonic() < deadline:
        try:
            if read_counters(cfg)["ingest_listening"] or int(
                    read_control(cfg)[CTL_ROLE]) == ROLE_BACKUP:
                return
        except (FileNotFoundError, ValueError):
            # No counters yet: a supervisor that has made its tally segment is still
            # making the rest; no live writer of that segment: no node here.
            pid = TallySegment.writer_of(cfg.segment("tally"))
            try:
                if pid <= 0 or os.kill(pid, 0) is not None:
                    return
            except ProcessLookupError:
                return
            except PermissionError:
                pass
        if not said:
            said = True
            print(f"exposure: node {cfg.name!r} is starting; waiting for it to accept "
                  "sessions", file=sys.stderr, flush=True)
        time.sleep(0.05)


# ------------------------------------------------------------------ start-of-day loads
_LOAD_KINDS = {"refdata": "instruments", "limits": "limits", "positions": "positions",
               "fx": "fx"}


def _cmd_load(args: argparse.Namespace) -> int:
    """``exposure refdata|limits|positions|fx load FILE``: check the whole file, then send
    its events on one operator session (through the cluster's routing with --cluster)."""
    from exposure.core.loads import LoadError, read_load
    from exposure.core.refdata import RefDataError, load_refdata

    kind = _LOAD_KINDS[args.cmd]
    say = f"exposure {args.cmd} load"
    if args.cluster and (args.config or args.secret_file):
        return _fail("--cluster takes each partition's config and secret from the cluster "
                     "file; leave out --config and --secret-file")
    if args.cluster:
        cl = _load_cluster(args.cluster)
        names, configs, cfg0 = list(cl.names), list(cl.configs), cl.configs[0]
    else:
        cl, cfg0 = None, _load_cfg(args.config)
        names, configs = [cfg0.name], [cfg0]
    refs = cfg0.names
    if args.instruments or args.accounts:
        try:
            refs = load_refdata(args.instruments, args.accounts, cfg0.caps,
                                currencies=cfg0.currencies)
        except RefDataError as e:
            return _fail(str(e))
    try:
        load = read_load(args.file, kind, refs, cfg0.caps, cfg0.currencies)
    except LoadError as e:
        print(f"{say}: {e}", file=sys.stderr)
        return 1
    print(f"{say}: {args.file}: {len(load.events)} {kind} rows checked", flush=True)
    if args.check or not load.events:
        return 0
    sessions = [args.session or c.max_sessions for c in configs]
    secrets = []
    for name, c, s in zip(names, configs, sessions, strict=True):
        if not 1 <= s <= min(c.max_sessions, 2**32 - 1):
            return _fail(f"--session {s}: {name!r} takes session ids 1..{c.max_sessions}")
        sec = _load_secret(args, c, s, name)
        if isinstance(sec, int):
            return sec
        secrets.append(sec)
    from exposure.engine.parse import records_from_objects

    recs = records_from_objects(load.events)
    if cl is not None:
        from exposure.core.routing import ALL, route

        dest = route(recs, cl.pmap)
        parts = [np.flatnonzero((dest == k) | (dest == ALL)) for k in range(len(configs))]
    else:
        parts = [np.arange(len(recs))]
    for c in configs:
        _wait_if_starting(c, args.timeout)
    results: list = [None] * len(configs)

    def one(k: int) -> None:
        try:
            results[k] = _load_send(configs[k], sessions[k], secrets[k], recs[parts[k]],
                                    args.timeout)
        except Exception as e:  # noqa: BLE001  (reported as this partition's failure)
            results[k] = e

    if len(configs) == 1:
        one(0)
    else:
        import threading

        threads = [threading.Thread(target=one, args=(k,), daemon=True)
                   for k in range(len(configs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    code = 0
    for k, r in enumerate(results):
        where = f" (partition {names[k]!r})" if cl is not None else ""
        if isinstance(r, Exception):
            print(f"{say}: {names[k]}: {r}", file=sys.stderr)
            code = 1
            continue
        sent, acked, session, rejected = r
        print(f"{say}: {names[k]}: {sent} sent, {acked} acknowledged, {len(rejected)} "
              f"rejected (session {session})", flush=True)
        for idx, reason in rejected:
            code = 1
            line = (f"line {load.line_of(int(parts[k][idx]))}" if idx is not None
                    else "a row of this send (the node did not say which)")
            print(f"{say}: {args.file} {line}{where}: rejected: {reason}", file=sys.stderr)
    return code


def _load_secret(args: argparse.Namespace, cfg, session: int, name: str):
    """The secret of ``session`` for ``cfg`` (--secret-file, else its sessions file, else
    None), or an exit code."""
    from pathlib import Path

    from exposure.net.sessions import MIN_SECRET, SessionsError, secret_for

    try:
        if args.secret_file:
            secret = Path(args.secret_file).read_bytes().strip()
            if len(secret) < MIN_SECRET:
                return _fail(f"--secret-file {args.secret_file}: {len(secret)} bytes; a "
                             f"secret has at least {MIN_SECRET}")
            return secret
        if cfg.sessions_file is not None:
            return secret_for(cfg.sessions_file, session)
    except OSError as e:
        return _fail(f"cannot read the secret {args.secret_file!r}: {e.strerror or e}")
    except SessionsError as e:
        return _fail(f"{name}: no secret for session {session}: {e} (use --secret-file)")
    return None


def _load_send(cfg, session: int, secret, recs: np.ndarray, timeout: float):
    """Send ``recs`` on one producer, wait for every acknowledgement; (sent, acknowledged,
    session, [(index in recs or None, reason)])."""
    from exposure.net.producer import AuthError, Producer, ProducerError

    try:
        p = Producer(cfg, session, secret=secret, window=65536, send_timeout=timeout,
                     connect_timeout=timeout)
    except AuthError as e:
        raise RuntimeError(f"login refused: {e}") from None
    except ProducerError as e:
        raise RuntimeError(f"cannot reach the node: {e}") from None
    try:
        first = p.sent + 1
        last = p.send(recs)
        p.flush(timeout)
        rejected: list = []
        for ack in p.results(timeout=timeout):
            for seq, reason in ack.rejected:
                rejected.append((seq - first if first <= seq <= last else None, reason))
            if ack.upto >= last:
                break
        return len(recs), p.acked - first + 1, session, rejected
    finally:
        try:
            p.close(timeout)
        except ProducerError as e:
            log.warning("session %s: %s", session, e)

def _cmd_roll(args: argparse.Namespace) -> int:
    """``exposure roll [--config FILE | --cluster FILE] [--date YYYY-MM-DD]``: one roll
    through an operator session, then the closing day's fund line (exposure.ops.roll)."""
    from pathlib import Path

    from exposure.net.sessions import MIN_SECRET, SessionsError, secret_for
    from exposure.ops.roll import RollError, describe, last_roll, roll_cluster, roll_date, roll_node

    if args.cluster and (args.config or args.secret_file):
        return _fail("--cluster takes each partition's config and secret from the cluster "
                     "file; leave out --config and --secret-file")
    cl = _load_cluster(args.cluster) if args.cluster else None
    cfgs = list(cl.configs) if cl else [_load_cfg(args.config)]
    try:
        date = roll_date(cfgs[0], args.date)
    except ValueError as e:
        return _fail(f"--date: {e}")
    secrets = []
    for cfg in cfgs:
        session = args.session or cfg.max_sessions
        if not 1 <= session <= cfg.max_sessions:
            return _fail(f"--session {session}: node {cfg.name!r} takes session ids "
                         f"1..{cfg.max_sessions}")
        try:
            if args.secret_file:
                secret = Path(args.secret_file).read_bytes().strip()
                if len(secret) < MIN_SECRET:
                    return _fail(f"--secret-file {args.secret_file}: {len(secret)} bytes; a "
                                 f"secret has at least {MIN_SECRET}")
            else:
                secret = (secret_for(cfg.sessions_file, session)
                          if cfg.sessions_file is not None else None)
        except OSError as e:
            return _fail(f"cannot read the secret: {e.strerror or e}")
        except SessionsError as e:
            return _fail(f"no secret for session {session}: {e} (use --secret-file)")
        secrets.append(secret)
        last, _ = last_roll(cfg)
        if date and last >= date:
            from exposure.core.day import date_text

            return _fail(f"node {cfg.name!r} has already rolled {date_text(last)}; a roll "
                         f"closes a later day (--date)")
        _wait_if_starting(cfg, args.timeout)
    try:
        if cl is not None:
            res = roll_cluster(cl, date, args.session or cfgs[0].max_sessions, secrets,
                               args.timeout)
        else:
            res = roll_node(cfgs[0], date, args.session or cfgs[0].max_sessions, secrets[0],
                            args.timeout)
    except RollError as e:
        return _fail(str(e), 1)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
    else:
        print(describe(res))
    return 0


def _cmd_metrics(args: argparse.Namespace) -> int:
    import signal

    from exposure.ops.metrics import serve

    cfg = _load_cfg(args.config)
    extra = []
    for f in args.fix or ():
        from exposure.fix.config import GatewayConfigError, load_gateway_config
        from exposure.fix.control import GatewayCollector

        try:
            extra.append(GatewayCollector(load_gateway_config(f, sessions=False)))
        except GatewayConfigError as e:
            return _fail(str(e))
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    try:
        serve(cfg, args.port, args.host, stop, extra=tuple(extra), ready=lambda a: print(
            f"exposure: serving metrics of node {cfg.name!r} on http://{a[0]}:{a[1]}/metrics",
            flush=True))
    except OSError as e:
        return _fail(f"cannot serve metrics on {args.host}:{args.port}: {e.strerror or e}")
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    from exposure.ops.top import run

    cfg = _load_cfg(args.config)
    try:
        return run(cfg, args.seconds, args.rows)
    except FileNotFoundError as e:
        return _fail(f"no node {cfg.name!r} is running on this host ({e})")


def _cmd_demo(args: argparse.Namespace) -> int:
    """A node on the default config (or --config), a realistic generated flow streamed to
    it at --rate, and the dashboard: the system at work within a minute."""
    import shutil
    import signal
    import subprocess
    import tempfile
    import threading
    import time
    from pathlib import Path

    from exposure.net.client import send_records
    from exposure.ops.status import read_counters
    from exposure.ops.top import run

    def interrupted(*_) -> None:  # SIGTERM, SIGHUP (its terminal closed): clean up as
        raise KeyboardInterrupt   # for Ctrl-C

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    cfg = _load_cfg(args.config)
    try:
        read_counters(cfg)
        return _fail(f"a node {cfg.name!r} already runs on this host: stop it, or give the "
                     "demo another config (--config)")
    except FileNotFoundError:
        pass
    data = Path(tempfile.mkdtemp(prefix="exposure-demo-"))
    cmd = [sys.executable, "-m", "exposure", "run", "--data-dir", str(data)]
    if args.config:
        cmd += ["--config", args.config]
    log = open(data / "node.log", "w")  # noqa: SIM115  (closed below)
    node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    print(f"exposure demo: starting node {cfg.name!r} (its log: {data / 'node.log'}; a first "
          "run compiles the kernels: about a minute)", flush=True)
    try:
        t0 = time.monotonic()
        while True:
            if node.poll() is not None:
                return _fail(f"the node exited: {(data / 'node.log').read_text()[-2000:]}")
            try:
                if read_counters(cfg)["ingest_listening"]:
                    break
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() - t0 > 600:
                return _fail("the node did not become ready within 10 minutes")
            time.sleep(0.1)
        from exposure.bench.flowgen import generate

        n = max(1, int(args.rate * args.seconds))
        recs = generate(n, accounts=200, instruments=2000, universe=40, live_target=20_000,
                        seed=int(time.time()) & 0xFFFF)
        def stream() -> None:
            try:
                send_records(cfg.ingest_host, cfg.ingest_port, recs, session=1, timeout=60,
                             rate=args.rate, frame=max(1, min(1024, int(args.rate // 100))))
            except Exception:  # the demo ended (the node stops) before the flow did
                pass

        sender = threading.Thread(target=stream, daemon=True)
        sender.start()
        print(f"exposure demo: streaming {n:,} generated events at {args.rate:,.0f}/s",
              flush=True)
        run(cfg, args.seconds)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the clean-up is not interrupted
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(30)
        except subprocess.TimeoutExpired:
            node.kill()
            node.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def _cmd_dump(args: argparse.Namespace) -> int:
    from exposure.engine.desk import Desk

    if args.cluster:
        from exposure.cluster.topology import ClusterError, compose, partition_views

        if args.names:
            return _fail("--names goes with --config (the node's [reference] files), not "
                         "--cluster")
        cl = _load_cluster(args.cluster)
        try:
            doc = compose(partition_views(cl), cl.pmap)
        except ClusterError as e:
            return _fail(str(e))
        opt = 0 if args.compact else orjson.OPT_INDENT_2
        sys.stdout.buffer.write(orjson.dumps(doc, option=opt) + b"\n")
        return 0
    cfg = _load_cfg(args.config)
    if args.names and cfg.names is None:
        return _fail(f"--names: the config {cfg.source!r} names no [reference] files "
                     "(instruments = \"instruments.csv\", accounts = \"accounts.csv\")")
    try:
        with Desk(cfg.name) as desk:
            doc = desk.document()
            ins = desk.instruments() if args.names else None
    except (FileNotFoundError, TimeoutError) as e:
        return _fail(str(e))
    if args.names:
        doc = cfg.names.name_document(doc, _rates(ins))
    opt = 0 if args.compact else orjson.OPT_INDENT_2
    sys.stdout.buffer.write(orjson.dumps(doc, option=opt) + b"\n")
    return 0


def _rates(ins: np.ndarray) -> dict[int, tuple[int, float]]:
    """instrument -> (currency id, rate) of instrument rows (a desk's or the feed's)."""
    return dict(zip(ins["instrument"].tolist(),
                    zip(ins["currency"].tolist(), ins["rate"].tolist(), strict=True),
                    strict=True))


def _cmd_consolidate(args: argparse.Namespace) -> int:
    from exposure.cluster.consolidator import main

    cl = _load_cluster(args.cluster)
    if cl.consolidator is None:
        return _fail(f"{args.cluster}: no [consolidator] config = \"FILE\"")
    return main(cl)


def _cmd_status(args: argparse.Namespace) -> int:
    from exposure.ops.status import cluster_status, node_status, render, render_cluster

    if args.cluster:
        st, text = cluster_status(_load_cluster(args.cluster)), render_cluster
    else:
        cfg = _load_cfg(args.config)
        try:
            st, text = node_status(cfg), render
        except (FileNotFoundError, TimeoutError) as e:
            return _fail(f"no node {cfg.name!r} is running on this host ({e})")
    fix = _fix_status(args.fix or ())
    if isinstance(fix, int):
        return fix
    if args.json or args.compact:
        if fix:
            st = {**st, "fix": fix}
        opt = 0 if args.compact else orjson.OPT_INDENT_2
        sys.stdout.buffer.write(orjson.dumps(st, option=opt) + b"\n")
    else:
        print(text(st))
        if fix:
            from exposure.fix.control import render_status

            for g in fix:
                print(render_status(g))
    return 0


def _fix_status(files) -> list | int:
    """``status --fix GATEWAY.toml``: each gateway's counters (exposure fix status)."""
    from exposure.fix.config import GatewayConfigError, load_gateway_config
    from exposure.fix.control import ControlError, read_status

    out = []
    for f in files:
        try:
            g = load_gateway_config(f, sessions=False)
            out.append(read_status(g.control_socket, g.status_file))
        except (GatewayConfigError, ControlError) as e:
            return _fail(str(e))
    return out


def _cmd_watch(args: argparse.Namespace) -> int:
    import time

    from exposure.feed.subscriber import Subscriber

    cfg = _load_cfg(args.config)
    if args.drop_every < 0:
        return _fail(f"--drop-every {args.drop_every}: 0 (off) or N >= 1")
    if args.seconds is not None and args.seconds < 0:
        return _fail(f"--seconds {args.seconds}: a number of seconds >= 0")
    if args.names and (not args.json or cfg.names is None):
        return _fail("--names goes with --json and a config with [reference] files")
    # With --json, stdout carries only the final view: the per-second lines go to stderr.
    out = sys.stderr if args.json else sys.stdout
    try:
        sub = Subscriber.from_config(cfg, drop_every=args.drop_every)
    except OSError as e:
        return _fail(f"cannot join {cfg.group}:{cfg.fanout_port} on {cfg.interface}: "
                     f"{e.strerror or e}")
    interrupted = False
    with sub:
        start = time.monotonic()
        end = None if args.seconds is None else start + args.seconds
        tick = start + 1.0
        try:
            while True:
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                sub.poll((tick if end is None else min(tick, end)) - now)
                if time.monotonic() >= tick:
                    print(f"{time.monotonic() - start:6.1f}s {sub.describe()}", file=out,
                          flush=True)
                    while tick <= time.monotonic():
                        tick += 1.0
        except KeyboardInterrupt:
            interrupted = True
        if args.json:
            view = sub.document()
            if args.names:
                view = sub.names.name_document(view, _rates(sub.instruments))
            sys.stdout.buffer.write(orjson.dumps(view) + b"\n")
            sys.stdout.flush()
        state, why = sub.state, sub.last_snapshot_error
        print(f"{time.monotonic() - start:6.1f}s final {sub.describe()}", file=out, flush=True)
    if interrupted:
        return 130
    if state != "live":
        return _fail(f"the view is not live ({state}" + (f"; {why}" if why else "") + ")", 1)
    return 0


def _cmd_web(args: argparse.Namespace) -> int:
    """``exposure web``: the risk desk's page (exposure.web.serve; docs/web.md)."""
    if args.hash_password:
        from exposure.web.users import hash_password

        print(hash_password(sys.stdin.readline().rstrip("\n")))
        return 0
    from exposure.web.serve import serve

    cfg = _load_cluster(args.cluster).consolidator if args.cluster else _load_cfg(args.config)
    if cfg is None:
        return _fail(f"{args.cluster}: no [consolidator] config = \"FILE\"")
    def opt(given, configured):  # (a command-line option overrides the config's [web])
        return configured if given is None else given

    host, port = opt(args.host, cfg.web_host), opt(args.port, cfg.web_port)
    try:
        serve(cfg, host, port, opt(args.users, cfg.web_users),
              opt(args.tls_cert, cfg.web_tls_cert), opt(args.tls_key, cfg.web_tls_key),
              opt(args.max_clients, cfg.web_max_clients),
              ready=lambda url: print(f"exposure: the page of {cfg.name!r} is at {url}",
                                      flush=True))
    except (ValueError, OverflowError) as e:  # WebError, UsersError, a bad number
        return _fail(str(e))
    except OSError as e:
        return _fail(f"cannot serve on {host}:{port}: {e.strerror or e}")
    return 0


def _cmd_fix(args: argparse.Namespace) -> int:
    """``exposure fix [run|status|redeliver] --config GATEWAY.toml``: the FIX gateway."""
    from exposure.fix.config import GatewayConfigError, load_gateway_config
    from exposure.fix.control import ControlError, read_status, request

    try:
        cfg = load_gateway_config(args.config, sessions=args.action == "run")
    except GatewayConfigError as e:
        return _fail(str(e))
    if args.action == "status":
        try:
            st = read_status(cfg.control_socket, cfg.status_file)
        except ControlError as e:
            return _fail(f"gateway {cfg.name}: {e}", 1)
        if args.json:
            sys.stdout.buffer.write(orjson.dumps(st, option=orjson.OPT_INDENT_2) + b"\n")
        else:
            from exposure.fix.control import render_status

            print(render_status(st))
        return 0
    if args.action == "redeliver":
        from exposure.fix.gateway import Gateway, GatewayError

        try:
            res = request(cfg.control_socket, "redeliver", timeout=args.timeout)
        except ControlError:
            try:  # no gateway running: journal the request for its next start
                res = Gateway.redeliver_offline(cfg)
            except GatewayError as e:
                return _fail(str(e))
        sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
        return 0
    return _run_gateway(cfg)


def _run_gateway(cfg) -> int:
    import signal

    from exposure.fix.gateway import Gateway, GatewayError
    from exposure.net.producer import ProducerError

    stop: list = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.append(1))
    try:
        gw = Gateway(cfg, say=lambda m: print(f"exposure fix: {m}", flush=True))
    except Exception as e:  # a bad node config: its message names the key
        return _fail(str(e))
    tune_gc = os.environ.get("EXPOSURE_FIX_GC") != "0"   # (0: the defaults, for A/B runs)
    try:
        if tune_gc:
            # Young collections every 100,000 allocations instead of 700: the mapping's
            # state (tuples per order and trade, a million of each) makes the default's
            # passes frequent and long (docs/performance.md, "The FIX gateway"); and the
            # recovered state frozen out of the collector's sight.
            gc.set_threshold(100_000, 50, 100)
        gw.start()
        if tune_gc:
            gc.collect()
            gc.freeze()
        print(f"exposure fix: {gw.ready_line()}", flush=True)
        log.info(gw.wait(stop))
        return 0
    except (GatewayError, ProducerError, OSError) as e:
        return _fail(str(e), 1)
    finally:
        gw.stop()


def _operator_options(r: argparse.ArgumentParser, cluster: str, session: str,
                      acks: str) -> None:
    """The options every operator command that sends through a session shares."""
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--cluster", metavar="FILE", help=cluster)
    r.add_argument("--session", type=int, default=0, help=session)
    r.add_argument("--secret-file", metavar="FILE",
                   help="the session's secret (default: from the config's sessions file)")
    r.add_argument("--timeout", type=float, default=60.0,
                   help=f"seconds to reach the node and for {acks} (default 60)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exposure", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="apply a JSON-lines event file, print the tally document")
    r.add_argument("events", nargs="?",
                   help="events, one JSON object per line (SPEC section 2)")
    r.add_argument("--journal", metavar="DIR", help="replay a node's journal instead")
    r.add_argument("--upto", type=int, metavar="SEQ",
                   help="with --journal: the document as of this global seq")
    r.add_argument("--day", metavar="YYYY-MM-DD",
                   help="with --journal: the document at the end of that trading day (up "
                        "to the event before its roll; the latest event if it has not "
                        "rolled), from archived segments too")
    r.add_argument("--config", metavar="FILE",
                   help="with --journal: the node's config (capacities)")
    r.add_argument("--instruments", metavar="REF.csv",
                   help="reference data (instrument,multiplier,margin_rate,beta,sector), "
                        "applied before the events")
    r.add_argument("--cluster", metavar="FILE",
                   help="as a cluster of this file's partition map would (SPEC section 5): "
                        "each partition replays its events, then the documents compose")
    r.add_argument("--partition", metavar="NAME",
                   help="with --cluster: only this partition's document")
    r.add_argument("--compact", action="store_true", help="one-line JSON")
    r.set_defaults(func=_cmd_replay)

    r = sub.add_parser("run", help="start a node (the built-in default config, or --config)")
    r.add_argument("--config", metavar="FILE", help="node config (TOML)")
    r.add_argument("--data-dir", metavar="DIR", help="journal and snapshots (overrides "
                   "[journal] dir)")
    r.set_defaults(func=_cmd_run)

    r = sub.add_parser("send", help="send JSON-lines events to a node as one session: a "
                       "file, standard input (-) or a file followed as it grows (--follow)")
    r.add_argument("events", nargs="?",
                   help="a file (its events are the session's seqs 1..n: a send started "
                        "again resends only what the node lacks), or - for standard input "
                        "(streamed: each line goes out as it arrives)")
    r.add_argument("--follow", metavar="FILE",
                   help="keep reading FILE as it grows, through rotation (renamed, then a "
                        "new file) and truncation, like tail -F, until SIGINT/SIGTERM; then "
                        "wait for the acknowledgements and print the counts")
    r.add_argument("--position", metavar="FILE",
                   help="with --follow: where the follower stopped (kept up to date as "
                        "acknowledgements arrive); a follower started again goes on from "
                        "there, nothing lost or sent twice. Without it, --follow needs a "
                        "session that holds nothing yet")
    r.add_argument("--spool", metavar="DIR",
                   help="with - or --follow: every event is on disk in DIR before it goes "
                        "out; a send killed and started again on DIR resends what the node "
                        "lacks of what it had read")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--cluster", metavar="FILE",
                   help="send through a cluster: each event to its partition by the map "
                        "(marks and instruments to all), one session per partition")
    r.add_argument("--session", type=int, default=1, help="session id (default 1)")
    r.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the node to accept the session (one "
                        "starting now is waited for), and for an acknowledgement while "
                        "events are outstanding (default 60)")
    r.add_argument("--retry", type=float, default=None, metavar="SECONDS",
                   help="how long the node may stay away (a restart, a failover, a silent "
                   "node given up after the liveness interval): it reconnects and resends "
                   "what the node lacks meanwhile (default for a file: 0, fail; 60 when "
                   "the config names a pair: it fails over to replication.peer_ingest; "
                   "for - and --follow: no limit)")
    r.add_argument("--rate", type=float, default=0.0, metavar="EVENTS/S",
                   help="pace the sending (default: as fast as the node takes it)")
    r.add_argument("--secret-file", metavar="FILE",
                   help="the session's secret (default: from the [ingest] sessions file of "
                        "--config, when this machine can read it)")
    r.set_defaults(func=_cmd_send)

    for cmd, what in (("refdata", "instruments.csv (symbol, instrument, multiplier, "
                                  "margin_rate, beta, sector, currency, name): instrument "
                                  "events"),
                      ("limits", "accounts.csv (account or name; gross, net, margin, "
                                 "loss): limit events"),
                      ("positions", "positions.csv (account or name, instrument or symbol, "
                                    "qty, price): position events"),
                      ("fx", "rates.csv (currency, rate: a code of [currencies] and the "
                             "base-currency value of one unit): fx events")):
        r = sub.add_parser(cmd, help=f"start-of-day load of {what}; the whole file is "
                           "checked first, and nothing is sent when a row is bad")
        r.add_argument("action", choices=("load",))
        r.add_argument("file", help="the CSV file (docs/operations.md, Trading day)")
        _operator_options(r, "through a cluster: each event to its account's partition "
                             "(instrument and fx events to every partition)",
                          "the operator session (default: the last session id, [ingest] "
                          "max_sessions, 256 unless raised)",
                          "its acknowledgements")
        r.add_argument("--accounts", metavar="FILE",
                       help="resolve account names through this accounts.csv (default: the "
                            "config's [reference] accounts)")
        r.add_argument("--instruments", metavar="FILE",
                       help="resolve symbols through this instruments.csv (default: the "
                            "config's [reference] instruments)")
        r.add_argument("--check", action="store_true", help="check the file, send nothing")
        r.set_defaults(func=_cmd_load)

    r = sub.add_parser("roll", help="start a new trading day: one roll through an operator "
                       "session, then the closing day's fund line (docs/operations.md)")
    _operator_options(r, "roll every partition of a cluster",
                      "the operator session, entitled to roll (default: the last session "
                      "id, [ingest] max_sessions)", "its acknowledgement")
    r.add_argument("--date", metavar="YYYY-MM-DD",
                   help="the trading day it closes (default: the one in progress by the "
                        "node's [day] schedule; without one the roll is undated)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=_cmd_roll)

    r = sub.add_parser("fix", help="the FIX drop-copy gateway: FIX sessions in, one "
                       "session to the node out (docs/fix.md)")
    r.add_argument("action", nargs="?", default="run", choices=("run", "status", "redeliver"),
                   help="run (default): the gateway; prints a line with 'ready' once it "
                        "accepts FIX sessions. status: its counters (a running gateway's, "
                        "else the last it wrote). redeliver: pass the dead letters on again "
                        "after instruments.csv / accounts.csv were fixed (exactly once: "
                        "journaled by the running gateway, or for its next start)")
    r.add_argument("--config", metavar="GATEWAY.toml", required=True,
                   help="the gateway config ([gateway], [[fix]])")
    r.add_argument("--json", action="store_true", help="status: JSON instead of text")
    r.add_argument("--timeout", type=float, default=60.0,
                   help="redeliver: how long the running gateway may take (default 60 s)")
    r.set_defaults(func=_cmd_fix)

    r = sub.add_parser("consolidate", help="compose a cluster's rows from its partitions' "
                       "feeds; publish them as a node does (segment, multicast, snapshots)")
    r.add_argument("--cluster", metavar="FILE", required=True, help="the cluster file")
    r.set_defaults(func=_cmd_consolidate)

    r = sub.add_parser("status", help="what a running node is doing: role, epoch, seqs, "
                       "lags, processes, rates, counters, sessions")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--cluster", metavar="FILE", help="every partition of a cluster and its "
                   "consolidator, in brief")
    r.add_argument("--json", action="store_true", help="JSON instead of text")
    r.add_argument("--compact", action="store_true", help="one-line JSON")
    r.add_argument("--fix", metavar="GATEWAY.toml", action="append",
                   help="add a FIX gateway's counters (messages, events, dead letters, "
                        "rejects by kind, sessions logged on); repeatable")
    r.set_defaults(func=_cmd_status)

    r = sub.add_parser("metrics", help="serve a node's counters to Prometheus (/metrics), "
                       "read-only")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--port", type=int, default=9477, help="HTTP port (default 9477)")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on")
    r.add_argument("--fix", metavar="GATEWAY.toml", action="append",
                   help="also serve a FIX gateway's counters (exposure_fix_*); repeatable")
    r.set_defaults(func=_cmd_metrics)

    r = sub.add_parser("top", help="a live dashboard of a node: fund, accounts, "
                       "instruments, sectors, events/s, wire-to-wire latency, lags")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--seconds", type=float, help="exit after this many seconds")
    r.add_argument("--rows", type=int, default=10, help="rows per table (default 10)")
    r.set_defaults(func=_cmd_top)

    r = sub.add_parser("demo", help="start a node, stream a generated flow to it and "
                       "watch it on the dashboard")
    r.add_argument("--rate", type=float, default=5000.0, help="events/s (default 5000)")
    r.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    r.add_argument("--config", metavar="FILE", help="the node (default: the built-in)")
    r.set_defaults(func=_cmd_demo)

    r = sub.add_parser("journal", help="check or print a node's journal")
    r.add_argument("action", choices=("verify", "inspect"),
                   help="verify: checksums, sequence, counts; inspect: records as JSON lines")
    r.add_argument("dir", help="the node's data directory (with its archive/ segments)")
    r.add_argument("--from", dest="from_seq", type=int, metavar="SEQ")
    r.add_argument("--to", dest="to_seq", type=int, metavar="SEQ")
    r.add_argument("--source", type=int)
    r.add_argument("--account", type=int)
    r.set_defaults(func=_cmd_journal)

    sub.add_parser("perf", help="measure latency/throughput, and compare with the floor and "
                   "the two-tier baseline (exposure perf --help)", add_help=False)

    r = sub.add_parser("dump", help="print a running node's tallies (the SPEC document)")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--cluster", metavar="FILE", help="the cluster's document, composed from "
                   "its partitions' tallies on this host (SPEC section 5)")
    r.add_argument("--compact", action="store_true", help="one-line JSON")
    r.add_argument("--names", action="store_true", help="add names from the config's "
                   "[reference] files: name on accounts, symbol (and name) on instruments, "
                   "symbol and account_name on positions (without it: the SPEC document)")
    r.set_defaults(func=_cmd_dump)

    r = sub.add_parser("watch", help="subscribe to a node's multicast feed (a pair's, when "
                       "--config names one of its nodes) and show its tallies live")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--seconds", type=float, default=None, metavar="S",
                   help="exit after S seconds (default: until Ctrl-C)")
    r.add_argument("--drop-every", type=int, default=0, metavar="N",
                   help="discard every Nth datagram on receipt, to show recovery at work")
    r.add_argument("--json", action="store_true",
                   help="at the end print the view as JSON (accounts, fund, instruments, "
                        "sectors, as `exposure dump`); the per-second lines go to stderr")
    r.add_argument("--names", action="store_true",
                   help="with --json: names from the config's [reference] files on the "
                        "rows, as `exposure dump --names`")
    r.set_defaults(func=_cmd_watch)

    r = sub.add_parser("web", help="the risk desk's web page: live tallies in a browser "
                       "(docs/web.md)")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--cluster", metavar="FILE", help="a cluster's consolidated feed")
    r.add_argument("--host", help="address (beyond loopback: --users); default: the "
                   "config's [web] host, 127.0.0.1")
    r.add_argument("--port", type=int, help="HTTP port (default: [web] port, 8080)")
    r.add_argument("--users", metavar="FILE", help="who may log in and sees which accounts "
                   "(default: [web] users)")
    r.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate "
                   "(default: [web] tls_cert)")
    r.add_argument("--tls-key", metavar="PEM", help="... and this key ([web] tls_key)")
    r.add_argument("--max-clients", type=int, help="browsers at once ([web] max_clients, "
                   "200)")
    r.add_argument("--hash-password", action="store_true",
                   help="print the users-file hash of the password read from stdin")
    r.set_defaults(func=_cmd_web)
    return p


def main(argv: list[str] | None = None) -> int:
    from exposure.core.log import setup

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["perf"]:  # its own parser (perf/tool.py): modes and many options
        from exposure.bench.tool import main as perf_main

        try:
            return perf_main(argv[1:])
        except KeyboardInterrupt:
            return 130
    args = _parser().parse_args(argv)
    setup()
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
