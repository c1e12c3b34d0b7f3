"""The read side: ``exposure status``, ``dump``, ``watch``, ``metrics`` and ``top`` (they
read a node's shared memory, or a cluster's feed; none loads numba)."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import orjson

from exposure.ops.common import fail, load_cfg, load_cluster

__all__ = ["cmd_status", "cmd_dump", "cmd_watch", "cmd_metrics", "cmd_top"]


def cmd_status(args: argparse.Namespace) -> int:
    from exposure.ops.status import cluster_status, node_status, render, render_cluster

    if args.cluster:
        st, text = cluster_status(load_cluster(args.cluster)), render_cluster
    else:
        cfg = load_cfg(args.config)
        try:
            st, text = node_status(cfg), render
        except (FileNotFoundError, TimeoutError) as e:
            return fail(f"no node {cfg.name!r} is running on this host ({e})")
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
            return fail(str(e))
    return out


def cmd_dump(args: argparse.Namespace) -> int:
    from exposure.engine.desk import Desk

    if args.cluster:
        from exposure.cluster.topology import ClusterError, compose, partition_views

        if args.names:
            return fail("--names goes with --config (the node's [reference] files), not "
                         "--cluster")
        cl = load_cluster(args.cluster)
        try:
            doc = compose(partition_views(cl), cl.pmap)
        except ClusterError as e:
            return fail(str(e))
        opt = 0 if args.compact else orjson.OPT_INDENT_2
        sys.stdout.buffer.write(orjson.dumps(doc, option=opt) + b"\n")
        return 0
    cfg = load_cfg(args.config)
    if args.names and cfg.names is None:
        return fail(f"--names: the config {cfg.source!r} names no [reference] files "
                     "(instruments = \"instruments.csv\", accounts = \"accounts.csv\")")
    try:
        with Desk(cfg.name) as desk:
            doc = desk.document()
            ins = desk.instruments() if args.names else None
    except (FileNotFoundError, TimeoutError) as e:
        return fail(str(e))
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


def cmd_watch(args: argparse.Namespace) -> int:
    import time

    from exposure.feed.subscriber import Subscriber

    cfg = load_cfg(args.config)
    if args.drop_every < 0:
        return fail(f"--drop-every {args.drop_every}: 0 (off) or N >= 1")
    if args.seconds is not None and args.seconds < 0:
        return fail(f"--seconds {args.seconds}: a number of seconds >= 0")
    if args.names and (not args.json or cfg.names is None):
        return fail("--names goes with --json and a config with [reference] files")
    # With --json, stdout carries only the final view: the per-second lines go to stderr.
    out = sys.stderr if args.json else sys.stdout
    try:
        sub = Subscriber.from_config(cfg, drop_every=args.drop_every)
    except OSError as e:
        return fail(f"cannot join {cfg.group}:{cfg.fanout_port} on {cfg.interface}: "
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
        return fail(f"the view is not live ({state}" + (f"; {why}" if why else "") + ")", 1)
    return 0


def cmd_metrics(args: argparse.Namespace) -> int:
    import signal

    from exposure.ops.metrics import serve

    cfg = load_cfg(args.config)
    extra = []
    for f in args.fix or ():
        from exposure.fix.config import GatewayConfigError, load_gateway_config
        from exposure.fix.control import GatewayCollector

        try:
            extra.append(GatewayCollector(load_gateway_config(f, sessions=False)))
        except GatewayConfigError as e:
            return fail(str(e))
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    try:
        serve(cfg, args.port, args.host, stop, extra=tuple(extra), ready=lambda a: print(
            f"exposure: serving metrics of node {cfg.name!r} on http://{a[0]}:{a[1]}/metrics",
            flush=True))
    except OSError as e:
        return fail(f"cannot serve metrics on {args.host}:{args.port}: {e.strerror or e}")
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from exposure.ops.top import run

    cfg = load_cfg(args.config)
    try:
        return run(cfg, args.seconds, args.rows)
    except FileNotFoundError as e:
        return fail(f"no node {cfg.name!r} is running on this host ({e})")
