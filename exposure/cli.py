"""The ``exposure`` command."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import orjson

__all__ = ["main"]


def _fail(msg: str, code: int = 2) -> int:
    print(f"exposure: {msg}", file=sys.stderr)
    return code


def _cmd_replay(args: argparse.Namespace) -> int:
    from .document import document
    from .parse import EventFileError, read_events, read_instruments_csv
    from .replay import replay_records

    try:
        parts = []
        if args.instruments:
            parts.append(read_instruments_csv(args.instruments))
        parts.append(read_events(args.events))
    except EventFileError as e:
        return _fail(str(e))
    recs = np.concatenate(parts)
    st = replay_records(recs)
    opt = 0 if args.compact else orjson.OPT_INDENT_2
    sys.stdout.buffer.write(orjson.dumps(document(st), option=opt) + b"\n")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="exposure", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("replay", help="apply a JSON-lines event file, print the tally document")
    r.add_argument("events", help="events, one JSON object per line (SPEC section 2)")
    r.add_argument("--instruments", metavar="REF.csv",
                   help="reference data (instrument,multiplier,margin_rate,beta,sector), "
                        "applied before the events")
    r.add_argument("--compact", action="store_true", help="one-line JSON")
    r.set_defaults(func=_cmd_replay)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
