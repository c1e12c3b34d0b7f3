"""The commands that run something: ``exposure run`` (a node), ``demo``, ``web``, ``fix``
(the FIX gateway) and ``consolidate`` (a cluster's consolidator)."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys

import orjson

from exposure.ops.common import fail, load_cfg, load_cluster

__all__ = ["cmd_run", "cmd_demo", "cmd_web", "cmd_fix", "cmd_consolidate"]

log = logging.getLogger(__name__)


def cmd_run(args: argparse.Namespace) -> int:
    import dataclasses
    import signal
    from pathlib import Path

    from exposure.config.node import ConfigError
    from exposure.node.supervisor import Node
    from exposure.pair.election import Stopped
    from exposure.shm.tally_segment import SegmentBusy, SegmentModeError
    from exposure.store.journal import JournalError

    cfg = load_cfg(args.config)
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
        return fail(str(e))
    except OSError as e:
        return fail(f"cannot use the data directory {cfg.data_dir}: {e}")
    def ready() -> None:  # the banner only once the node does what it says
        print(node.describe(), flush=True)
        print(f"exposure: {node.ready_line()}", flush=True)

    try:
        why = node.wait(stop, on_ready=ready, say=log.info)
        log.log(logging.INFO if stop else logging.ERROR, why)
        return 0 if stop else 1
    finally:
        node.stop()


def cmd_demo(args: argparse.Namespace) -> int:
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
    cfg = load_cfg(args.config)
    try:
        read_counters(cfg)
        return fail(f"a node {cfg.name!r} already runs on this host: stop it, or give the "
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
                return fail(f"the node exited: {(data / 'node.log').read_text()[-2000:]}")
            try:
                if read_counters(cfg)["ingest_listening"]:
                    break
            except (FileNotFoundError, ValueError):
                pass
            if time.monotonic() - t0 > 600:
                return fail("the node did not become ready within 10 minutes")
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


def cmd_web(args: argparse.Namespace) -> int:
    """``exposure web``: the risk desk's page (exposure.web.serve; docs/web.md)."""
    if args.hash_password:
        from exposure.web.users import hash_password

        print(hash_password(sys.stdin.readline().rstrip("\n")))
        return 0
    from exposure.web.serve import serve

    cfg = load_cluster(args.cluster).consolidator if args.cluster else load_cfg(args.config)
    if cfg is None:
        return fail(f"{args.cluster}: no [consolidator] config = \"FILE\"")
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
        return fail(str(e))
    except OSError as e:
        return fail(f"cannot serve on {host}:{port}: {e.strerror or e}")
    return 0


def cmd_fix(args: argparse.Namespace) -> int:
    """``exposure fix [run|status|redeliver] --config GATEWAY.toml``: the FIX gateway."""
    from exposure.fix.config import GatewayConfigError, load_gateway_config
    from exposure.fix.control import ControlError, read_status, request

    try:
        cfg = load_gateway_config(args.config, sessions=args.action == "run")
    except GatewayConfigError as e:
        return fail(str(e))
    if args.action == "status":
        try:
            st = read_status(cfg.control_socket, cfg.status_file)
        except ControlError as e:
            return fail(f"gateway {cfg.name}: {e}", 1)
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
                return fail(str(e))
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
        return fail(str(e))
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
        return fail(str(e), 1)
    finally:
        gw.stop()


def cmd_consolidate(args: argparse.Namespace) -> int:
    from exposure.cluster.consolidator import main

    cl = load_cluster(args.cluster)
    if cl.consolidator is None:
        return fail(f"{args.cluster}: no [consolidator] config = \"FILE\"")
    return main(cl)
