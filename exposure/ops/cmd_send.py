"""``exposure send``: a file, standard input or a followed file through one held
:class:`exposure.net.producer.Producer`, or through a cluster's routing."""

from __future__ import annotations

import argparse
import sys

import orjson

from exposure.ops.common import fail, load_cfg, load_cluster, secret_of, wait_if_starting

__all__ = ["cmd_send"]


def cmd_send(args: argparse.Namespace) -> int:
    """``exposure send FILE | - | --follow FILE``, on a producer (exposure.net.sender)."""
    import time

    from exposure.net.client import SendError

    if args.cluster:
        return _send_cluster(args)
    if (args.events is None) == (args.follow is None):
        return fail("send takes an events FILE, - (standard input) or --follow FILE")
    if args.follow is None and args.position:
        return fail("--position goes with --follow FILE")
    if args.events not in (None, "-") and args.spool:
        return fail("--spool goes with - or --follow: a file is its own spool (its lines "
                     "are seqs 1..n; a send started again resends what the node lacks)")
    cfg = load_cfg(args.config)
    if not 1 <= args.session <= min(cfg.max_sessions, 2**32 - 1):
        return fail(f"--session {args.session}: a session id is 1..{cfg.max_sessions}")
    secret = secret_of(args, cfg, args.session)
    if isinstance(secret, int):
        return secret
    recs = None
    if args.events not in (None, "-"):
        from exposure.engine.parse import EventFileError, read_events

        try:
            recs = read_events(args.events)
        except EventFileError as e:
            return fail(str(e))
    deadline = time.monotonic() + args.timeout
    wait_if_starting(cfg, args.timeout)
    try:
        if recs is not None:
            res = _send_file(args, cfg, secret, recs, deadline)
        else:
            res = _send_stream(args, cfg, secret, deadline)
    except SendError as e:
        return fail(str(e))
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
        return fail("--cluster takes each partition's config and secret from the cluster "
                     "file; leave out --config and --secret-file")
    if args.events in (None, "-") or args.follow or args.position or args.spool:
        return fail("send --cluster takes an events FILE (not -, --follow, --position or "
                     "--spool)")
    cl = load_cluster(args.cluster)
    secrets = []
    for name, cfg in zip(cl.names, cl.configs, strict=True):
        if not 1 <= args.session <= min(cfg.max_sessions, 2**32 - 1):
            return fail(f"--session {args.session}: partition {name!r} takes session ids "
                         f"1..{cfg.max_sessions}")
        try:
            secrets.append(secret_for(cfg.sessions_file, args.session)
                           if cfg.sessions_file is not None else None)
        except (SessionsError, OSError) as e:
            return fail(f"partition {name!r}: no secret for session {args.session}: {e}")
    try:
        recs = read_events(args.events)
    except EventFileError as e:
        return fail(str(e))
    for cfg in cl.configs:
        wait_if_starting(cfg, args.timeout)
    try:
        res = send_cluster(cl, recs, args.session, timeout=args.timeout, retry_s=args.retry,
                           rate=args.rate, secrets=secrets,
                           progress=_send_progress)
    except SendError as e:
        return fail(str(e))
    sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
    return 0
