"""Compile the node's numba kernels into the cache before the suite's first process test.

With ``EXPOSURE_WARMUP=1`` (opt-in: it did not pay in the whole suite, see
``tests/conftest.py`` and docs/testing.md), ``tests/conftest.py`` runs this script in the
background when a session that selects `process` tests starts, and orders the tests that
start no process first: on a fresh clone the kernels' first compile (about 20 s of CPU on
this 2-core machine) then runs on the second core while the unit tests run on the first,
instead of inside the first process test's setup. The cache directory is keyed by the
package's sources (:mod:`exposure.core.jit`), so the processes the tests start load what
this one compiled.

What it does is what a test does: a real node (``exposure run``) takes the example flow
from ``exposure send``, is dumped, restarted on its journal (recovery's replay) and
stopped; the node and this script keep to the last CPU and nothing spins, so that the
other core is the unit tests'. (The kernels do not depend on the process map: numba
compiles by argument types.) It prints what it did; a failure here is not a test
failure (the tests compile what they need themselves), only a slower start.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exposure.harness.localnode import LocalNode  # noqa: E402

ONE_CPU = """
[[process]]
name = "hot"
stages = ["ingest", "compute", "fanout"]
cpu = -1
wait = "sleep"

[[process]]
name = "durable"
stages = ["journal", "mirror", "snapshot"]
cpu = -1
wait = "sleep"
"""


def main() -> int:
    t0 = time.perf_counter()
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # the node's processes inherit it
    with tempfile.TemporaryDirectory(prefix="exposure-warm-") as d:
        n = LocalNode(Path(d), start=False, extra=ONE_CPU)
        try:
            n.start(timeout=900)  # a cold compile on a busy machine: minutes
            p = n.cli("send", str(ROOT / "examples" / "basic.jsonl"))
            if p.returncode != 0:
                print(p.stderr.decode(errors="replace")[-2000:], file=sys.stderr)
                return 1
            n.dump()
            n.stop()
            n.start(timeout=900)  # recovery replays the journal
            n.dump()
        finally:
            n.stop()
    print(f"numba warm-up: a node started, fed, restarted and stopped in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
