"""The operator's day: ``exposure refdata|limits|positions|fx load`` (start-of-day files
on an operator session) and ``exposure roll``."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np
import orjson

from exposure.ops.common import fail, load_cfg, load_cluster, secret_of, wait_if_starting

__all__ = ["cmd_load", "cmd_roll"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ start-of-day loads
_LOAD_KINDS = {"refdata": "instruments", "limits": "limits", "positions": "positions",
               "fx": "fx"}


def cmd_load(args: argparse.Namespace) -> int:
    """``exposure refdata|limits|positions|fx load FILE``: check the whole file, then send
    its events on one operator session (through the cluster's routing with --cluster)."""
    from exposure.core.loads import LoadError, read_load
    from exposure.core.refdata import RefDataError, load_refdata

    kind = _LOAD_KINDS[args.cmd]
    say = f"exposure {args.cmd} load"
    if args.cluster and (args.config or args.secret_file):
        return fail("--cluster takes each partition's config and secret from the cluster "
                     "file; leave out --config and --secret-file")
    if args.cluster:
        cl = load_cluster(args.cluster)
        names, configs, cfg0 = list(cl.names), list(cl.configs), cl.configs[0]
    else:
        cl, cfg0 = None, load_cfg(args.config)
        names, configs = [cfg0.name], [cfg0]
    refs = cfg0.names
    if args.instruments or args.accounts:
        try:
            refs = load_refdata(args.instruments, args.accounts, cfg0.caps,
                                currencies=cfg0.currencies)
        except RefDataError as e:
            return fail(str(e))
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
            return fail(f"--session {s}: {name!r} takes session ids 1..{c.max_sessions}")
        sec = secret_of(args, c, s, name)
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
        wait_if_starting(c, args.timeout)
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


def cmd_roll(args: argparse.Namespace) -> int:
    """``exposure roll [--config FILE | --cluster FILE] [--date YYYY-MM-DD]``: one roll
    through an operator session, then the closing day's fund line (exposure.ops.roll)."""

    from exposure.ops.roll import RollError, describe, last_roll, roll_cluster, roll_date, roll_node

    if args.cluster and (args.config or args.secret_file):
        return fail("--cluster takes each partition's config and secret from the cluster "
                     "file; leave out --config and --secret-file")
    cl = load_cluster(args.cluster) if args.cluster else None
    cfgs = list(cl.configs) if cl else [load_cfg(args.config)]
    try:
        date = roll_date(cfgs[0], args.date)
    except ValueError as e:
        return fail(f"--date: {e}")
    secrets = []
    for cfg in cfgs:
        session = args.session or cfg.max_sessions
        if not 1 <= session <= cfg.max_sessions:
            return fail(f"--session {session}: node {cfg.name!r} takes session ids "
                         f"1..{cfg.max_sessions}")
        secret = secret_of(args, cfg, session)
        if isinstance(secret, int):
            return secret
        secrets.append(secret)
        last, _ = last_roll(cfg)
        if date and last >= date:
            from exposure.core.day import date_text

            return fail(f"node {cfg.name!r} has already rolled {date_text(last)}; a roll "
                         f"closes a later day (--date)")
        wait_if_starting(cfg, args.timeout)
    try:
        if cl is not None:
            res = roll_cluster(cl, date, args.session or cfgs[0].max_sessions, secrets,
                               args.timeout)
        else:
            res = roll_node(cfgs[0], date, args.session or cfgs[0].max_sessions, secrets[0],
                            args.timeout)
    except RollError as e:
        return fail(str(e), 1)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
    else:
        print(describe(res))
    return 0
