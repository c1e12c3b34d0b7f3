"""The feed's cost: what publishing and sending the rows of a realistic flow costs per event.

    python -m perf.bench_fanout [--events 1000000] [--batches 64,256,1024] [--runs 3]
                                [--max-datagram 1400] [--positions on|off|both] [--json]

A generated day (perf/flowgen.py, as perf.bench_kernel uses) runs through the node's own
code in one process: the kernel (``apply_batch``), then what compute does after it
(``exposure.engine.publish.publish_batch``: the published tables and the feed rows; feed
version 4's limits rows and, with ``--positions on``, a position row per cell whose
quantities moved (a mark's revalued cells send none: feed version 5), as the compute stage
makes them; and the push onto a real fan-out ring), then the fan-out
stage's poll (conflation, packing, one
``send`` per datagram to a multicast group that a receiver socket has joined on loopback,
drained between batches outside the timed part). Each part is timed on its own.

The batch size stands for the load: a node that takes 1 M events/s sees batches of
hundreds of events per loop (the ring holds what arrived while the last batch ran). The
report gives, per batch size, the seconds each part costs per million events: at 1 M
events/s, that is the share of one core the part needs. ``--positions both`` runs each
batch size with position rows on and off (``[fanout] positions``), interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

import numpy as np
import orjson

from exposure.bench.flowgen import generate
from exposure.core.capacity import Capacities
from exposure.core.types import (
    C_NCCHANGED,
    INSTRUMENT_ROW_DTYPE,
    LIMITS_ROW_DTYPE,
    POSITION_ROW_DTYPE,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.kernel import apply_batch
from exposure.engine.publish import limit_rows, position_rows, publish_batch, versions
from exposure.feed.wire import open_receiver
from exposure.harness.localnode import free_group, free_port
from exposure.node.stages.fanout import FanoutStage
from exposure.shm.control import CONTROL_WORDS, CTL_EPOCH, CTL_ROLE, ROLE_PRIMARY
from exposure.shm.ring import Ring, ring_push
from exposure.shm.tally_layout import allocate


def _pin() -> None:
    try:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    except (AttributeError, OSError):
        pass


def run_once(recs: np.ndarray, batch: int, group: str, port: int,
             max_datagram: int = 1400, positions: bool = True) -> dict:
    caps = Capacities()
    buf, st = allocate(caps)
    vers = versions(st)
    chunk = 1 << 15  # position rows per part (the compute stage's are 65,536)
    nrows = 2 * caps.accounts + 1 + caps.instruments + caps.sectors + chunk
    row_words = np.zeros((nrows, ROW_SIZE // 8), np.uint64)
    flat = row_words.reshape(-1)
    arows, irows, srows = (flat.view(UPDATE_DTYPE), flat.view(INSTRUMENT_ROW_DTYPE),
                           flat.view(SECTOR_ROW_DTYPE))
    prows, lrows = flat.view(POSITION_ROW_DTYPE), flat.view(LIMITS_ROW_DTYPE)
    lim_sent = np.zeros_like(st.acc_lim)
    ring = Ring.create(f"exposure-bench-fanout-{os.getpid()}-{uuid.uuid4().hex[:6]}", 1 << 16,
                       ROW_SIZE)
    ctl = np.zeros(CONTROL_WORDS, np.uint64)
    ctl[CTL_ROLE], ctl[CTL_EPOCH] = ROLE_PRIMARY, 1
    fo = FanoutStage(ring, group, port, "127.0.0.1", 1, max_datagram, st, epoch=1, ctl=ctl,
                     refresh_rows_per_s=0)
    rx = open_receiver(group, port)
    rx.setblocking(False)
    status = np.zeros(batch, np.uint8)
    t_kernel = t_publish = t_fanout = 0
    rows = 0
    received = 0
    try:
        for lo in range(0, len(recs), batch):
            part = recs[lo:lo + batch]
            n = len(part)
            t0 = time.perf_counter_ns()
            apply_batch(st, part, status[:n])
            t1 = time.perf_counter_ns()
            m = publish_batch(st, *vers.args(), part, n, arows, irows, srows, t1)
            m = limit_rows(st, part, n, lim_sent, arows, lrows, m, t1)
            cur, ncc = 0, int(st.ctr[C_NCCHANGED]) if positions else 0
            pushed = want = 0
            while True:
                if positions:
                    m, cur = position_rows(st, part, n, arows, prows, m, nrows, cur, t1)
                pushed += ring_push(ring.ctrl, ring.slots, row_words, m)
                want += m
                if cur >= ncc:
                    break
                m = 0
            m = want
            t2 = time.perf_counter_ns()
            fo.poll()
            t3 = time.perf_counter_ns()
            assert pushed == m, "the bench's fan-out ring is too small"
            t_kernel += t1 - t0
            t_publish += t2 - t1
            t_fanout += t3 - t2
            rows += m
            while True:  # drain (untimed), as an engine would on its own core
                try:
                    rx.recv(65536)
                    received += 1
                except BlockingIOError:
                    break
        sent = fo.sent[1]
    finally:
        fo.close()
        rx.close()
        ring.close()
        del buf
    per_m = 1e6 / len(recs)
    return {"kernel_s_per_M": t_kernel / 1e9 * per_m, "publish_s_per_M": t_publish / 1e9 * per_m,
            "fanout_s_per_M": t_fanout / 1e9 * per_m, "rows_per_event": rows / len(recs),
            "datagrams_per_event": sent / len(recs), "send_errors": fo.send_errors,
            "received": received, "datagrams": sent}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--batches", default="64,256,1024")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-datagram", type=int, default=1400,
                   help="bytes per datagram ([fanout] max_datagram; 8972 = a 9000 MTU)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--positions", choices=("on", "off", "both"), default="on",
                   help="position rows (feed version 4, [fanout] positions); both: each "
                        "batch size with and without, interleaved")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    _pin()
    recs = generate(a.events, seed=a.seed)
    group, port = free_group(), free_port()
    run_once(recs[:20_000], 256, group, port)  # JIT warm-up (compile or cache load)
    out: dict = {"events": len(recs), "runs": a.runs, "max_datagram": a.max_datagram,
                 "by_batch": {}}
    modes = {"on": (True,), "off": (False,), "both": (True, False)}[a.positions]
    for b in (int(x) for x in a.batches.split(",")):
        runs: dict[bool, list] = {m: [] for m in modes}
        for _ in range(a.runs):
            for mode in modes:
                runs[mode].append(run_once(recs, b, group, port, a.max_datagram, mode))
        for mode in modes:
            got = runs[mode]
            med = {k: statistics.median(r[k] for r in got) for k in got[0]}
            out["by_batch"][f"{b}" + ("" if len(modes) == 1 else
                                      " positions " + ("on" if mode else "off"))] = med
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2
                                             | orjson.OPT_NON_STR_KEYS) + b"\n")
        return 0
    print(f"{len(recs):,} events, {a.max_datagram}-byte datagrams, median of {a.runs} runs; "
          "seconds per million events (= share of one core at 1 M events/s)")
    print(f"{'batch':>18} {'kernel':>8} {'publish':>8} {'fan-out':>8} {'rows/ev':>8} "
          f"{'dgrams/ev':>9}")
    for b, r in out["by_batch"].items():
        print(f"{b:>18} {r['kernel_s_per_M']:>8.3f} {r['publish_s_per_M']:>8.3f} "
              f"{r['fanout_s_per_M']:>8.3f} {r['rows_per_event']:>8.2f} "
              f"{r['datagrams_per_event']:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
