"""The command line: ``python -m perf.fuzz --frames 1000000 ...`` (see :mod:`perf.fuzz`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import perf.fuzz
from perf.fuzz.run import run_fuzz


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.fuzz",
                                description=perf.fuzz.__doc__.split("\n")[0])
    p.add_argument("--frames", type=int, default=1_000_000)
    p.add_argument("--connections", type=int, default=32,
                   help="concurrent client lanes (one per session, the rest never log in)")
    p.add_argument("--workers", type=int, default=2, help="client processes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument("--login-timeout-ms", type=int, default=None,
                   help="the node's [ingest] login_timeout_ms (default: its own, 5000)")
    p.add_argument("--rss-limit-mb", type=int, default=256,
                   help="the most the node's RSS may grow (default 256)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    try:
        rep = run_fuzz(args.frames, args.connections, args.workers, args.seed,
                       login_timeout_ms=args.login_timeout_ms,
                       rss_limit_mb=args.rss_limit_mb, keep=args.keep)
    except Exception as e:  # the report says what went wrong
        rep = getattr(e, "report", {"pass": False, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rep, indent=2, default=str))
        if args.out:
            args.out.write_text(json.dumps(rep, indent=2, default=str) + "\n")
        return 2
    text = json.dumps(rep, indent=2, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if rep["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
