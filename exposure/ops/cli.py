"""The ``exposure`` command."""

# Every subcommand's arguments and the dispatch are here; the commands themselves live by
# group in exposure.ops.cmd_* (replay, send, load, read, serve), each importing what it
# needs when it runs, so that the reading commands load no numba.

from __future__ import annotations

import argparse
import sys

from exposure.ops.cmd_load import cmd_load, cmd_roll
from exposure.ops.cmd_read import cmd_dump, cmd_metrics, cmd_status, cmd_top, cmd_watch
from exposure.ops.cmd_replay import cmd_journal, cmd_replay
from exposure.ops.cmd_send import cmd_send
from exposure.ops.cmd_serve import cmd_consolidate, cmd_demo, cmd_fix, cmd_run, cmd_web

__all__ = ["main"]


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
    r.set_defaults(func=cmd_replay)

    r = sub.add_parser("run", help="start a node (the built-in default config, or --config)")
    r.add_argument("--config", metavar="FILE", help="node config (TOML)")
    r.add_argument("--data-dir", metavar="DIR", help="journal and snapshots (overrides "
                   "[journal] dir)")
    r.set_defaults(func=cmd_run)

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
    r.set_defaults(func=cmd_send)

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
        r.set_defaults(func=cmd_load)

    r = sub.add_parser("roll", help="start a new trading day: one roll through an operator "
                       "session, then the closing day's fund line (docs/operations.md)")
    _operator_options(r, "roll every partition of a cluster",
                      "the operator session, entitled to roll (default: the last session "
                      "id, [ingest] max_sessions)", "its acknowledgement")
    r.add_argument("--date", metavar="YYYY-MM-DD",
                   help="the trading day it closes (default: the one in progress by the "
                        "node's [day] schedule; without one the roll is undated)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=cmd_roll)

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
    r.set_defaults(func=cmd_fix)

    r = sub.add_parser("consolidate", help="compose a cluster's rows from its partitions' "
                       "feeds; publish them as a node does (segment, multicast, snapshots)")
    r.add_argument("--cluster", metavar="FILE", required=True, help="the cluster file")
    r.set_defaults(func=cmd_consolidate)

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
    r.set_defaults(func=cmd_status)

    r = sub.add_parser("metrics", help="serve a node's counters to Prometheus (/metrics), "
                       "read-only")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--port", type=int, default=9477, help="HTTP port (default 9477)")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on")
    r.add_argument("--fix", metavar="GATEWAY.toml", action="append",
                   help="also serve a FIX gateway's counters (exposure_fix_*); repeatable")
    r.set_defaults(func=cmd_metrics)

    r = sub.add_parser("top", help="a live dashboard of a node: fund, accounts, "
                       "instruments, sectors, events/s, wire-to-wire latency, lags")
    r.add_argument("--config", metavar="FILE", help="which node (default: the built-in)")
    r.add_argument("--seconds", type=float, help="exit after this many seconds")
    r.add_argument("--rows", type=int, default=10, help="rows per table (default 10)")
    r.set_defaults(func=cmd_top)

    r = sub.add_parser("demo", help="start a node, stream a generated flow to it and "
                       "watch it on the dashboard")
    r.add_argument("--rate", type=float, default=5000.0, help="events/s (default 5000)")
    r.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    r.add_argument("--config", metavar="FILE", help="the node (default: the built-in)")
    r.set_defaults(func=cmd_demo)

    r = sub.add_parser("journal", help="check or print a node's journal")
    r.add_argument("action", choices=("verify", "inspect"),
                   help="verify: checksums, sequence, counts; inspect: records as JSON lines")
    r.add_argument("dir", help="the node's data directory (with its archive/ segments)")
    r.add_argument("--from", dest="from_seq", type=int, metavar="SEQ")
    r.add_argument("--to", dest="to_seq", type=int, metavar="SEQ")
    r.add_argument("--source", type=int)
    r.add_argument("--account", type=int)
    r.set_defaults(func=cmd_journal)

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
    r.set_defaults(func=cmd_dump)

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
    r.set_defaults(func=cmd_watch)

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
    r.set_defaults(func=cmd_web)
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
