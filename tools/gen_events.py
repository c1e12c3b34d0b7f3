#!/usr/bin/env python3
"""Write a realistic generated day as SPEC JSON lines (for replay, send and benchmarks).

    python tools/gen_events.py OUT.jsonl [--events N] [--accounts A] [--instruments I]
                               [--seed S]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from exposure.bench.flowgen import generate, to_jsonl


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--accounts", type=int, default=500)
    p.add_argument("--instruments", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    recs = generate(a.events, accounts=a.accounts, instruments=a.instruments, seed=a.seed)
    a.out.write_bytes(to_jsonl(recs))
    print(f"wrote {len(recs):,} events to {a.out} (seed {a.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
