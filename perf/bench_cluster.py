"""A partitioned cluster against one node, measured in one run on this machine (issue 16).

    python -m perf.bench_cluster [--partitions 1,2,4] [--events 1000000] [--runs 2]
                                 [--cons-rate 0] [--latency-rate 10000]
                                 [--latency-seconds 15] [--latency-partitions 2]
                                 [--skip single,rate,cost,latency] [--quick] [--json]

A full run takes 2-4 minutes; ``--quick`` (400,000 events, 2 partitions only, one run,
5 s of latency) about one. One invocation measures, back to back, on one generated stream
(perf/flowgen.py's realistic day at the perf tool's size: 200 accounts, 2,000 instruments;
each order's source moved into its account's partition, so that the stream respects every
map and nothing is rejected as wrong_partition):

1. **the router**: :func:`exposure.core.routing.route` and ``split`` (what ``send_cluster``,
   so ``exposure send --cluster``, does to the records) over the whole stream, for 1, 2,
   4 and 8 partitions: ns per event, median of ``--router-repeats``;
2. **one node's sustained rate**: a real node (``exposure run``, its own name, ports and
   data directory, the journal fsyncing every 2 ms) with the process map a partition has
   on 2 cores (hot process ``spin-then-block`` on the last CPU, journal and recovery server
   sleeping 2 ms ticks on the first); the stream sent closed loop with
   :func:`exposure.net.client.send_records` (frames of 1,024), timed until every event is
   acknowledged. The node runs for the whole invocation: each cluster run below follows a
   run of it, and the ratio is the median of those pairs (this VM's speed drifts);
3. **each cluster's sustained rate**, for every ``--partitions`` count: that many partition
   nodes (the same process map, hot processes alternating between the last and the first
   CPU), the same stream through :func:`exposure.cluster.topology.send_cluster`, timed the same
   way: events/s of the stream, of what the partitions took (marks and instruments go to
   each), each partition's own rate (its events until its last one was applied, read from
   its tally segment), the client's CPU share (is the client the limit?);
4. **the consolidator's cost per row it publishes**: ``exposure consolidate``'s
   :func:`exposure.cluster.consolidator.run_consolidator` in a child process, its stage's ``poll``
   and ``_publish`` wrapped in timers, while the stream goes through the cluster once more
   (``--cons-rate``, 0: as fast as it goes): its process CPU time and its time in
   ``_publish`` per row, from its first poll after the send began to its first publish
   that includes every partition's last row; then what it does for a few seconds without
   any event (rows, batches and polls per second, CPU);
5. **the consolidator's added latency**: at ``--latency-rate`` events/s (one event per
   frame, each partition's share paced by ``send_records``; ``send_cluster``'s frames of
   1,024 would leave in bursts), a receiver process joins every partition's feed and the
   consolidator's (plain multicast sockets: stamped on receipt, parsed after the run, as
   the perf tool's client) and takes ``time.time_ns() - send_ns`` of every account, fund
   and instrument row (the client's send time, CLOCK_REALTIME; the consolidator copies the
   partition rows' into its own), each (row, event) counted at its first arrival (a row
   republished without a new event is counted apart, as "repeated"). Percentiles through
   the partitions, through the consolidator, and per event the consolidator's row against
   the first partition row of the same event: the latency the consolidator adds. The CPU
   share of every process while it runs is reported too. This runs a fresh consolidator
   without the timers of 4 (they read clocks on every poll): only its rows and batches
   are counted, and its CPU per row is its process's CPU time over its rows.

Steal time (``/proc/stat``), CPU pressure (``/proc/pressure/cpu``: the share of time some
task waited for a CPU), the load average and how many other exposure or pytest processes
were running are reported with the figures: this VM has 2 cores, which every node, the
client, the consolidator and the receiver share, so a cluster cannot be faster here than
one node; the figures say what partitioning costs, not what it gains on a host with a core
per partition. A node that restarts during a run (its watchdog) is survived (the client
reconnects and resends) and the run is marked. Everything the bench starts (nodes, child
processes, segments, temporary directories) is stopped and removed, also when it fails.
"""

from __future__ import annotations

import argparse
import mmap
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import psutil

from exposure.bench.flowgen import generate
from exposure.bench.measure import summarize
from exposure.cluster.topology import Cluster, load_cluster, send_cluster
from exposure.core.partition import PartitionMap
from exposure.core.routing import route, split
from exposure.core.types import C_LAST_GSEQ, T_CANCEL, T_DONE, T_FILL, T_NEW, T_REPLACE
from exposure.harness.cluster import LocalCluster, map_ranges, partition_process_map
from exposure.harness.localnode import LocalNode, cpu_times, terminate
from exposure.harness.machine import cpu_pressure_us, steal_since, steal_ticks
from exposure.harness.wait import wait_for
from exposure.net.client import SendError, send_records

Say = Callable[[str], None]  # where progress goes (stderr)

__all__ = ["main", "bench_map", "respect_map", "router_cost", "BenchCluster"]

ACCOUNTS, SOURCES = 4096, 1024   # the ids the maps cover (SPEC section 1's capacities)
SOURCES_PER_PART = 8             # flowgen's sources, moved to sources 8k..8k+7 in partition k
_ORDER_TYPES = (T_NEW, T_FILL, T_REPLACE, T_CANCEL, T_DONE)
_ROOT = Path(__file__).resolve().parents[1]
WARMUP_EVENTS = 50_000  # sent to every node (session 1) before anything is measured
# A node whose process stalls (its watchdog, [node] stall_ms) restarts from its journal;
# the client reconnects and resends what it does not hold. Runs with reconnects say so.
RETRY_S = 30.0

# The consolidator child's counters (a memory-mapped int64 file the bench reads).
(_S_READY, _S_ROWS, _S_BATCHES, _S_PUB_NS, _S_POLL_NS, _S_IN, _S_CPU_NOW, _S_CPU_PUB,
 _S_LAST_PUB, _S_GAPS, _S_RECOVERIES, _S_DONE, _S_POLLS, _S_PUB_WALL_NS) = range(14)
_S_SUBG = 16  # + k: the gseq partition k's subscriber had reached at the last publish
MAX_PARTITIONS = 64
_N_STATS = _S_SUBG + MAX_PARTITIONS


# ----------------------------------------------------------------------------- the stream
def flow(n: int, seed: int) -> np.ndarray:
    """The perf tool's flow (exposure.bench.tool._flow): ``n`` events of a realistic day."""
    return generate(n, accounts=200, instruments=2000, universe=50, live_target=5000,
                    seed=seed)


def bench_map(partitions: int) -> PartitionMap:
    """Accounts in ``partitions`` contiguous ranges of 0..4095; sources 8k..8k+7 in
    partition k."""
    step = ACCOUNTS // partitions
    parts = [(f"p{k}", [[k * step, ACCOUNTS - 1 if k == partitions - 1 else (k + 1) * step - 1]],
              [[SOURCES_PER_PART * k, SOURCES_PER_PART * (k + 1) - 1]])
             for k in range(partitions)]
    return PartitionMap.from_ranges(parts, ACCOUNTS, SOURCES)


def respect_map(recs: np.ndarray, pmap: PartitionMap) -> np.ndarray:
    """A copy of ``recs`` whose orders respect ``pmap``: each order's source ``s``
    (0..7) becomes ``s + 8 k``, ``k`` its account's partition (replaces, cancels and dones
    carry no account: theirs is their order's, found by (source, order id))."""
    out = recs.copy()
    t = out["type"]
    acc = out["account"].astype(np.int64)
    part = pmap.acc_owner[np.minimum(acc, len(pmap.acc_owner) - 1)].astype(np.int64)
    part[part < 0] = 0
    key = (out["source"].astype(np.uint64) << np.uint64(48)) | out["order_id"]
    new = t == T_NEW
    order = np.argsort(key[new], kind="stable")
    nkeys, nparts = key[new][order], part[new][order]
    ref = np.isin(t, (T_REPLACE, T_CANCEL, T_DONE))
    dest = part.copy()
    if len(nkeys) and ref.any():
        i = np.minimum(np.searchsorted(nkeys, key[ref]), len(nkeys) - 1)
        dest[ref] = np.where(nkeys[i] == key[ref], nparts[i], 0)
    orders = np.isin(t, _ORDER_TYPES)
    if (out["source"][orders] >= SOURCES_PER_PART).any():
        raise ValueError(f"the flow has sources beyond 0..{SOURCES_PER_PART - 1}")
    out["source"][orders] += (SOURCES_PER_PART * dest[orders]).astype(np.uint32)
    return out


def fresh_orders(recs: np.ndarray, run: int) -> np.ndarray:
    """``recs`` with every order id moved to range ``run`` (a later run against the same
    nodes sends new orders, not duplicates)."""
    if run == 0:
        return recs
    out = recs.copy()
    orders = np.isin(out["type"], _ORDER_TYPES)
    out["order_id"][orders] += np.uint64(run) << np.uint64(40)
    return out


# ----------------------------------------------------------------------------- 1. router
def router_cost(recs: np.ndarray, counts: list[int], repeats: int) -> dict:
    """ns per event of route() and of split() (route, then each partition's records)."""
    out = {}
    for p in counts:
        pmap = bench_map(p)
        r = respect_map(recs, pmap)
        route(r[:1000], pmap)  # JIT (compile or cache load)
        t_route, t_split = [], []
        for _ in range(repeats):
            t0 = time.perf_counter_ns()
            route(r, pmap)
            t1 = time.perf_counter_ns()
            split(r, pmap)
            t2 = time.perf_counter_ns()
            t_route.append((t1 - t0) / len(r))
            t_split.append((t2 - t1) / len(r))
        out[p] = {"route_ns": round(statistics.median(t_route), 2),
                  "split_ns": round(statistics.median(t_split), 2),
                  "events": len(r), "repeats": repeats}
    return out


# ----------------------------------------------------------------------------- nodes
class Progress:
    """Each node's last applied gseq, read from its tally segment (mapped once; mapped
    again by :meth:`reopen`, since a node that restarts makes a new segment)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.segs: list = []
        self.reopen()

    def reopen(self) -> None:
        from exposure.shm.tally_segment import TallySegment

        self.close()
        try:
            for n in self.names:
                self.segs.append(TallySegment.attach(f"/exposure.{n}.tally"))
        except BaseException:
            self.close()
            raise

    def gseqs(self) -> list[int]:
        return [int(s.state.ctr[C_LAST_GSEQ]) for s in self.segs]

    def published(self) -> np.ndarray:
        """The highest gseq among each node's published rows (what its feed carries)."""
        return np.array([max(int(s.state.pub["gseq"].max()), int(s.state.ipub["gseq"].max()),
                             int(s.state.spub["gseq"].max())) for s in self.segs], np.int64)

    def close(self) -> None:
        for s in self.segs:
            s.close()
        self.segs = []


def timed_send(send: Callable[[], dict], progress: Progress, counts: list[int]) -> dict:
    """Run ``send()`` (it returns once every event is acknowledged) and time it; a watcher
    thread notes when each node applied the last of its ``counts`` new events (None for a
    node that restarted meanwhile: its new segment is not the one watched)."""
    progress.reopen()
    base = progress.gseqs()
    want = [b + c for b, c in zip(base, counts, strict=True)]
    applied: list[float | None] = [None] * len(want)
    stop = threading.Event()
    t0 = time.perf_counter()

    def watch() -> None:
        while not stop.is_set():
            g = progress.gseqs()
            now = time.perf_counter()
            for k, w in enumerate(want):
                if applied[k] is None and g[k] >= w:
                    applied[k] = now - t0
            if all(a is not None for a in applied):
                return
            time.sleep(0.001)

    th = threading.Thread(target=watch, daemon=True)
    cpu0, steal0, psi0 = time.process_time(), steal_ticks(), cpu_pressure_us()
    th.start()
    try:
        res = send()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        th.join(timeout=5)
    finally:
        stop.set()
    return {"seconds": wall, "result": res, "applied_s": applied,
            "client_cpu_percent": round(100 * cpu / wall, 1),
            "cpu_pressure_percent": round((cpu_pressure_us() - psi0) / 1e4 / wall, 1),
            **steal_since(steal0)}


def _others() -> int:
    """Processes of exposure nodes, consolidators or tests that this run did not start
    (others measuring or testing on the same machine meanwhile)."""
    mine = {os.getpid(), *(c.pid for c in psutil.Process().children(recursive=True))}
    n = 0
    for p in psutil.process_iter(["pid", "cmdline"]):
        cl = " ".join(p.info["cmdline"] or [])
        if p.info["pid"] not in mine and ("exposure" in cl or "pytest" in cl) \
                and "python" in cl:
            n += 1
    return n


def settle(pids: list[int], say: Say, timeout: float = 30.0, busy: float = 0.25) -> float:
    """Wait until ``pids`` together use less than ``busy`` of a core over half a second
    (nodes that just started still load their code and touch their memory); the seconds
    waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c0 = sum(cpu_times({str(p): p for p in pids}).values())
        time.sleep(0.5)
        if sum(cpu_times({str(p): p for p in pids}).values()) - c0 < 0.5 * busy:
            return time.monotonic() - t0
    say(f"  (still busy after {timeout:.0f} s; measuring anyway)")
    return time.monotonic() - t0


def _child_cmd(*args: str) -> tuple[list[str], dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return ([sys.executable, "-c", "import sys\nfrom perf.bench_cluster import _child\n"
             "sys.exit(_child(sys.argv[1:]))", *args], env)


class BenchCluster(LocalCluster):
    """``pmap``'s partitions as a :class:`exposure.harness.cluster.LocalCluster` in a
    directory of its own under ``base``, whose consolidator is an instrumented ``exposure
    consolidate`` (a child of this script: its counters in a memory-mapped file, ``stats``),
    and whose nodes' progress is read from their tally segments (``progress``)."""

    def __init__(self, base: Path, pmap: PartitionMap):
        super().__init__(base / f"cluster{pmap.partitions}-{uuid.uuid4().hex[:6]}",
                         map_ranges(pmap), name="bench", prefix="bc")
        self.pmap = pmap
        self.stats_file = self.dir / "consolidator.stats"
        self.stats: np.ndarray | None = None
        self.progress: Progress | None = None

    def start(self, timeout: float = 180) -> None:
        super().start(timeout)
        self.progress = Progress([n.name for n in self.nodes])

    def start_consolidator(self, timeout: float = 120, timed: bool = True) -> None:
        """The consolidator child; ``timed``: its poll and _publish wrapped in timers,
        else only its rows and batches counted (the latency run: the timers' own clock
        reads would be part of what it measures)."""
        self.stop_consolidator()
        np.zeros(_N_STATS, np.int64).tofile(self.stats_file)
        self.stats = np.memmap(self.stats_file, np.int64, mode="r", shape=(_N_STATS,))
        cmd, env = _child_cmd("consolidator" if timed else "consolidator-plain",
                              str(self.file), str(self.stats_file))
        super().start_consolidator(timeout, cmd, lambda: self.stats[_S_READY] == 1,
                                   env=env, cwd=_ROOT)

    def stop(self) -> None:
        try:
            if self.progress is not None:
                self.progress.close()
                self.progress = None
        finally:
            super().stop()


# ----------------------------------------------------------------------------- 2, 3. rates
def _clean(r: dict) -> bool:
    """A run during which no node restarted (the client never had to reconnect)."""
    return r["result"]["reconnects"] == 0


def _rate_summary(runs: list[dict], n: int, parts: list[int] | None,
                  names: tuple[str, ...] | None) -> dict:
    """Medians over the runs no node restart disturbed (over all when none was clean)."""
    use = [r for r in runs if _clean(r)] or runs
    walls = [r["seconds"] for r in runs]
    med = statistics.median(r["seconds"] for r in use)
    out = {"events": n, "runs_s": [round(w, 3) for w in walls],
           "events_per_s": round(n / med),
           "client_cpu_percent": statistics.median(r["client_cpu_percent"] for r in use),
           "steal_s": round(sum(r["steal_s"] for r in runs), 2),
           "cpu_pressure_percent": [r["cpu_pressure_percent"] for r in runs],
           "rejected": runs[-1]["result"]["rejected"],
           "rejects": runs[-1]["result"]["rejects"],
           "reconnects": sum(r["result"]["reconnects"] for r in runs),
           "disturbed_runs": sum(not _clean(r) for r in runs)}
    if parts is not None and names is not None:
        out["delivered"] = sum(parts)
        out["delivered_per_s"] = round(sum(parts) / med)
        out["partitions"] = {}
        for k, name in enumerate(names):
            ts = [r["applied_s"][k] for r in use if r["applied_s"][k]]
            t = statistics.median(ts) if ts else med
            out["partitions"][name] = {"events": parts[k], "applied_s": round(t, 3),
                                       "events_per_s": round(parts[k] / t)}
    return out


class SingleNode:
    """One node (no [partition]) with the partitions' process map, started once and kept
    for the whole run, so that each cluster run is paired with a run of the node just
    before it (this VM's speed drifts from minute to minute)."""

    def __init__(self, base: Path, recs: np.ndarray):
        self.node = LocalNode(base, prefix="bcs", start=False,
                              extra=partition_process_map(-1))
        self.recs = recs
        self.runs: list[dict] = []
        self.progress: Progress | None = None

    def start(self, say: Say) -> None:
        """Start, warm up (a first send of the stream's head) and wait until idle."""
        self.node.start(180)
        self.progress = Progress([self.node.name])
        send_records("127.0.0.1", self.node.port, self.recs[:WARMUP_EVENTS], session=1,
                     timeout=120, retry_s=RETRY_S)
        settle(list(self.node.pids().values()), say)

    def run(self, say: Say) -> dict:
        """The stream once, closed loop (a new session, fresh order ids), timed until every
        event is acknowledged."""
        r = len(self.runs)
        rr = fresh_orders(self.recs, r + 1)
        res = timed_send(lambda: send_records(
            "127.0.0.1", self.node.port, rr, session=r + 2, timeout=120, retry_s=RETRY_S),
            self.progress, [len(rr)])
        say(f"  one node, run {r + 1}: {len(rr) / res['seconds']:,.0f} events/s "
            f"(client cpu {res['client_cpu_percent']:.0f}%, steal {res['steal_s']} s, "
            f"cpu pressure {res['cpu_pressure_percent']}%)")
        self.runs.append(res)
        return res

    def summary(self) -> dict:
        return _rate_summary(self.runs, len(self.recs), None, None)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.node.stop()


def cluster_rate(bc: BenchCluster, recs: np.ndarray, runs: int, first_session: int,
                 say: Say, single: SingleNode | None = None) -> dict:
    """The stream through ``send_cluster``, ``runs`` times (each a new session), each run
    just after one of the ``single`` node's; the ratio is the median of the pairs'."""
    parts = [len(p) for p in split(recs, bc.pmap)]
    out, ratios = [], []
    for r in range(runs):
        one = single.run(say) if single is not None else None
        rr = fresh_orders(recs, first_session - 1 + r)
        res = timed_send(lambda rr=rr, r=r: send_cluster(
            bc.cluster, rr, session=first_session + r, timeout=120, retry_s=RETRY_S),
            bc.progress, parts)
        say(f"  {bc.pmap.partitions} partitions, run {r + 1}: "
            f"{len(rr) / res['seconds']:,.0f} events/s (client cpu "
            f"{res['client_cpu_percent']:.0f}%, steal {res['steal_s']} s, cpu pressure "
            f"{res['cpu_pressure_percent']}%)")
        out.append(res)
        if one is not None and _clean(one) and _clean(res):
            ratios.append(one["seconds"] / res["seconds"])
    summary = _rate_summary(out, len(recs), parts, bc.pmap.names)
    if ratios:
        summary["paired_ratios"] = [round(x, 3) for x in ratios]
        summary["ratio_to_one_node"] = round(statistics.median(ratios), 3)
    return summary


# ----------------------------------------------------------------------------- 4. consolidator
def consolidator_cost(bc: BenchCluster, recs: np.ndarray, session: int, rate: float,
                      idle_s: float, say: Say) -> dict:
    """The stream through the cluster while the consolidator runs: its CPU time and its
    ``_publish`` time per row it published, from its first poll after the send began to
    its first publish that includes every partition's last row; then what it does in
    ``idle_s`` seconds without events."""
    st = bc.stats
    parts = [len(p) for p in split(recs, bc.pmap)]
    rr = fresh_orders(recs, session - 1)
    s0 = np.array(st)
    mono0 = time.monotonic_ns()
    res = timed_send(lambda: send_cluster(bc.cluster, rr, session=session, timeout=120,
                                          rate=rate, retry_s=RETRY_S), bc.progress, parts)
    # Done when a publish includes every partition's last published row (the feed's rows
    # carry the gseq of the event that last moved them).
    bc.progress.reopen()
    want = bc.progress.published()
    k = len(want)
    deadline = time.monotonic() + 60
    while (st[_S_SUBG:_S_SUBG + k] < want).any():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the consolidator did not catch up in 60 s: it has "
                               f"{st[_S_SUBG:_S_SUBG + k].tolist()}, the partitions {want}")
        time.sleep(0.002)
    s1 = np.array(st)
    caught_up_s = (time.monotonic_ns() - mono0) / 1e9
    rows = int(s1[_S_ROWS] - s0[_S_ROWS])
    batches = int(s1[_S_BATCHES] - s0[_S_BATCHES])
    cpu_ns = int(s1[_S_CPU_PUB] - s0[_S_CPU_NOW])
    busy_s = (int(s1[_S_LAST_PUB]) - mono0) / 1e9
    applied = [a for a in res["applied_s"] if a is not None]
    last_applied = max(applied) if len(applied) == len(parts) else res["seconds"]
    out = {"events": len(recs), "rate": rate, "send_s": round(res["seconds"], 3),
           "rows": rows, "batches": batches,
           "rows_per_batch": round(rows / max(batches, 1), 2),
           "input_changes": int(s1[_S_IN] - s0[_S_IN]),
           "cpu_ns_per_row": round(cpu_ns / max(rows, 1)),
           "cpu_us_per_batch": round(cpu_ns / 1e3 / max(batches, 1), 1),
           "publish_ns_per_row": round(int(s1[_S_PUB_NS] - s0[_S_PUB_NS]) / max(rows, 1)),
           "publish_wall_ns_per_row": round(int(s1[_S_PUB_WALL_NS] - s0[_S_PUB_WALL_NS])
                                            / max(rows, 1)),
           "poll_ns_per_row": round(int(s1[_S_POLL_NS] - s0[_S_POLL_NS]) / max(rows, 1)),
           "cpu_s": round(cpu_ns / 1e9, 3),
           "cpu_percent": round(100 * cpu_ns / 1e9 / max(busy_s, 1e-9), 1),
           "caught_up_after_last_apply_ms": round(1000 * (caught_up_s - last_applied), 1),
           "reconnects": res["result"]["reconnects"],
           "gaps": int(s1[_S_GAPS] - s0[_S_GAPS]),
           "recoveries": int(s1[_S_RECOVERIES] - s0[_S_RECOVERIES]),
           "steal_s": res["steal_s"]}
    # Idle: no event for idle_s seconds (the partitions' feeds send heartbeats and their
    # slow refresh cycle of unchanged rows).
    time.sleep(0.2)
    i0, c0, t0 = np.array(st), bc.consolidator_cpu_seconds(), time.monotonic()
    time.sleep(idle_s)
    i1, c1, dt = np.array(st), bc.consolidator_cpu_seconds(), time.monotonic() - t0
    out["idle"] = {"seconds": round(dt, 2),
                   "input_changes_per_s": round(int(i1[_S_IN] - i0[_S_IN]) / dt, 1),
                   "rows_per_s": round(int(i1[_S_ROWS] - i0[_S_ROWS]) / dt, 1),
                   "batches_per_s": round(int(i1[_S_BATCHES] - i0[_S_BATCHES]) / dt, 1),
                   "polls_per_s": round(int(i1[_S_POLLS] - i0[_S_POLLS]) / dt, 1),
                   "cpu_percent": round(100 * (c1 - c0) / dt, 1)}
    say(f"  consolidator, {bc.pmap.partitions} partitions: {rows:,} rows in {batches:,} "
        f"batches, {out['cpu_ns_per_row']:,} ns CPU per row ({out['publish_ns_per_row']:,} "
        f"in _publish), gaps {out['gaps']}, steal {res['steal_s']} s; idle: "
        f"{out['idle']['rows_per_s']:,.0f} rows/s, {out['idle']['cpu_percent']}% CPU")
    return out


# ----------------------------------------------------------------------------- 5. latency
def paced_send(cluster: Cluster, recs: np.ndarray, session: int, rate: float,
               frame: int) -> dict:
    """``send_cluster`` (each partition's session paced at its share of ``rate``) with
    frames of ``frame`` events: frames of 1,024 would leave in bursts at a paced rate."""
    try:
        return send_cluster(cluster, recs, session, timeout=60, retry_s=RETRY_S, rate=rate,
                            frame=frame)
    except SendError as e:
        raise RuntimeError(f"paced send failed: {e}") from None


def _first_receipts(send: np.ndarray, recv: np.ndarray, key: np.ndarray, t_from: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The first receipt of each (row, send_ns) sent after ``t_from``: a row that arrives
    again with the same event's send time (republished without a new event) is counted
    once, at its first arrival; returns (send, recv, key, repeats left out)."""
    m = send >= t_from
    send, recv, key = send[m], recv[m], key[m]
    order = np.lexsort((recv, send, key))
    k2, s2 = key[order], send[order]
    first = np.ones(len(order), bool)
    first[1:] = (k2[1:] != k2[:-1]) | (s2[1:] != s2[:-1])
    keep = order[first]
    return send[keep], recv[keep], key[keep], int(len(order) - len(keep))


def consolidator_latency(bc: BenchCluster, recs: np.ndarray, session: int, rate: float,
                         seconds: float, warmup: float, frame: int, say: Say) -> dict:
    n = int(rate * (seconds + warmup))
    rr = fresh_orders(recs[:n], session - 1)
    spec = {"partitions": [str(x.config) for x in bc.nodes],
            "consolidator": str(bc.cons_config), "ready": str(bc.dir / "rx.ready"),
            "stop": str(bc.dir / "rx.stop"), "out": str(bc.dir / "rx.npz")}
    spec_file = bc.dir / "rx.json"
    spec_file.write_bytes(orjson.dumps(spec))
    cmd, env = _child_cmd("receiver", str(spec_file))
    log = bc.dir / "receiver.log"
    with open(log, "a") as f:
        rx = subprocess.Popen(cmd, stdout=f, stderr=f, env=env, cwd=_ROOT)
    try:
        wait_for(lambda: Path(spec["ready"]).exists() or rx.poll() is not None, 120,
                 "the receiver joined every feed", step=0.05)
        if rx.poll() is not None:
            raise RuntimeError(f"the receiver exited: {log.read_text()[-3000:]}")
        st = bc.stats
        pids = {f"{name}.{proc}": pid for name, n in zip(bc.pmap.names, bc.nodes, strict=True)
                for proc, pid in n.pids().items()}
        pids.update(consolidator=bc.cons.pid, receiver=rx.pid, client=os.getpid())
        s0 = np.array(st)
        steal0, psi0 = steal_ticks(), cpu_pressure_us()
        cpu0 = cpu_times(pids)
        t_start = time.time_ns()
        mono0 = time.monotonic_ns()
        res = paced_send(bc.cluster, rr, session, rate, frame)
        wall = (time.monotonic_ns() - mono0) / 1e9
        cpu1 = cpu_times(pids)
        psi = round((cpu_pressure_us() - psi0) / 1e4 / wall, 1)
        time.sleep(0.5)  # the last rows through the consolidator
        s1 = np.array(st)
        Path(spec["stop"]).touch()
        rx.wait(timeout=60)
        if rx.returncode != 0:
            raise RuntimeError(f"the receiver failed: {log.read_text()[-3000:]}")
    finally:
        terminate(rx)
    steal = steal_since(steal0)
    data = np.load(spec["out"])
    t_from = t_start + int(warmup * 1e9)
    ps, pr, pk, pn = _first_receipts(data["part_send"], data["part_recv"], data["part_key"],
                                     t_from)
    cs, cr, ck, cn = _first_receipts(data["cons_send"], data["cons_recv"], data["cons_key"],
                                     t_from)
    direct = summarize(pr - ps)
    through = summarize(cr - cs)
    # Per event: the consolidator's row against the first partition row of the same event
    # (the same send_ns: one event per frame, so a send time names one event).
    order = np.lexsort((pr, ps))
    us, first = np.unique(ps[order], return_index=True)
    first_recv = pr[order][first]
    added = np.zeros(0, np.int64)
    if len(us) and len(cs):
        i = np.minimum(np.searchsorted(us, cs), len(us) - 1)
        hit = us[i] == cs
        added = cr[hit] - first_recv[i[hit]]
    rows = int(s1[_S_ROWS] - s0[_S_ROWS])
    cpu_ns = int(1e9 * (cpu1["consolidator"] - cpu0["consolidator"]))
    out = {"rate": rate, "seconds": seconds, "warmup_s": warmup, "frame": frame,
           "events": len(rr), "achieved_rate": round(len(rr) / wall),
           "rejected": res["rejected"], "reconnects": res["reconnects"],
           "partition": {**direct, "rows": len(ps), "repeats": pn},
           "consolidator": {**through, "rows": len(cs), "repeats": cn},
           "added": {**summarize(added), "rows": len(added)},
           "added_p50_us_difference": round(through["p50_us"] - direct["p50_us"], 1),
           "added_p99_us_difference": round(through["p99_us"] - direct["p99_us"], 1),
           "consolidator_rows": rows,
           "consolidator_rows_per_batch": round(rows / max(
               int(s1[_S_BATCHES] - s0[_S_BATCHES]), 1), 2),
           "consolidator_cpu_ns_per_row": round(cpu_ns / max(rows, 1)),
           "consolidator_cpu_percent": round(100 * cpu_ns / 1e9 / max(wall, 1e-9), 1),
           "cpu_pressure_percent": psi,
           "cpu_percent": {k: round(100 * (cpu1[k] - cpu0[k]) / wall, 1)
                           for k in cpu1 if k in cpu0},
           "receiver_gaps": {"partitions": int(data["gaps"][:-1].sum()),
                             "consolidator": int(data["gaps"][-1])},
           **steal}
    say(f"  latency at {rate:,.0f}/s: partition p50 {direct['p50_us']:,.1f} us p99 "
        f"{direct['p99_us']:,.0f} us; consolidator p50 {through['p50_us']:,.1f} us p99 "
        f"{through['p99_us']:,.0f} us; steal {steal['steal_s']} s")
    return out


# ----------------------------------------------------------------------------- children
def _consolidator_child(cluster_file: str, stats_file: str, timed: bool = True) -> int:
    """``exposure consolidate``'s run_consolidator, its stage's poll and _publish timed
    into the stats file (``timed``), or only its rows and batches counted there."""
    from exposure.cluster.consolidate import ConsolidateStage
    from exposure.cluster.consolidator import run_consolidator
    from exposure.feed.subscriber import Subscriber

    with open(stats_file, "r+b") as f:  # a plain array on the mapping (np.memmap's
        mm = mmap.mmap(f.fileno(), _N_STATS * 8)  # item access costs microseconds)
    st = np.frombuffer(mm, np.int64, _N_STATS)
    publish, poll, close = ConsolidateStage._publish, ConsolidateStage.poll, \
        ConsolidateStage.close
    sub_poll = Subscriber.poll_rows
    # CPU time of the stage's own thread (this VM's 2 cores are shared: wall time would
    # count the waits for a core too); the process's CPU time for the whole.
    clock, cpu = time.thread_time_ns, time.process_time_ns

    def feed_counters(stage) -> None:
        c = [s.counters for s in stage.subs]
        st[_S_GAPS] = sum(x["gaps"] for x in c)
        st[_S_RECOVERIES] = sum(x["recoveries"] for x in c)

    def timed_publish(self) -> None:
        t0, w0 = clock(), time.perf_counter_ns()
        publish(self)
        st[_S_PUB_NS] += clock() - t0
        st[_S_PUB_WALL_NS] += time.perf_counter_ns() - w0
        st[_S_ROWS] = self.rows_total
        st[_S_BATCHES] = self.batches
        if self.batches & 63 == 0:
            feed_counters(self)
        for k, s in enumerate(self.subs):
            st[_S_SUBG + k] = s.gseq
        st[_S_CPU_PUB] = cpu()
        st[_S_LAST_PUB] = time.monotonic_ns()

    def timed_poll(self) -> int:
        st[_S_CPU_NOW] = cpu()
        st[_S_POLLS] += 1
        t0 = clock()
        w = poll(self)
        st[_S_POLL_NS] += clock() - t0
        return w

    def counted_sub_poll(self, timeout=0.0):
        ch = sub_poll(self, timeout)
        st[_S_IN] += sum(len(b.ids) for b in ch)
        return ch

    def counted_close(self) -> None:
        feed_counters(self)
        close(self)

    def counted_publish(self) -> None:
        publish(self)
        st[_S_ROWS] = self.rows_total
        st[_S_BATCHES] = self.batches

    if timed:
        ConsolidateStage._publish = timed_publish
        ConsolidateStage.poll = timed_poll
        ConsolidateStage.close = counted_close
        Subscriber.poll_rows = counted_sub_poll
    else:
        ConsolidateStage._publish = counted_publish
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))

    def ready(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)
        st[_S_READY] = 1

    res = run_consolidator(load_cluster(cluster_file), stop, on_ready=ready)
    st[_S_DONE] = 1
    mm.flush()
    print(f"stopped: {res}", file=sys.stderr, flush=True)
    return 0


def _receiver_child(spec_file: str) -> int:
    """Join every partition's feed and the consolidator's (plain multicast sockets, as the
    perf tool's client: receive and stamp now, parse after the run), until told to stop;
    then write (receipt time, send_ns, row) of every account, fund and instrument row of
    the incremental datagrams."""
    from exposure.config.node import load_config
    from exposure.core.types import ROW_SECTOR
    from exposure.feed.wire import DG_INCREMENTAL, open_receiver, parse_datagram

    spec = orjson.loads(Path(spec_file).read_bytes())
    socks: list = []
    ep = select.epoll()
    try:
        for path in [*spec["partitions"], spec["consolidator"]]:
            cfg = load_config(Path(path))
            s = open_receiver(cfg.group, cfg.fanout_port, cfg.interface)
            try:  # this socket's group only (Linux delivers every joined group by port)
                s.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_MULTICAST_ALL", 49), 0)
            except OSError:
                pass
            s.setblocking(False)
            socks.append(s)
            ep.register(s.fileno(), select.EPOLLIN)
        feed_of = {s.fileno(): k for k, s in enumerate(socks)}
        got: list[list[tuple[int, bytes]]] = [[] for _ in socks]
        buf = bytearray(65536)
        Path(spec["ready"]).touch()
        stop = Path(spec["stop"])
        check = time.monotonic()
        while True:
            for fd, _ in ep.poll(0.05):
                s, dst = socks[feed_of[fd]], got[feed_of[fd]]
                while True:
                    try:
                        n = s.recv_into(buf)
                    except BlockingIOError:
                        break
                    dst.append((time.time_ns(), bytes(buf[:n])))
            if time.monotonic() - check > 0.1:
                check = time.monotonic()
                if stop.exists():
                    break
        cols: list[dict[str, list]] = []
        gaps = []
        for k, dgrams in enumerate(got):
            c: dict[str, list] = {"recv": [], "send": [], "key": []}
            last, lost = None, 0
            for t, data in dgrams:
                d = parse_datagram(data)
                if d.type != DG_INCREMENTAL:
                    continue
                if last is not None and d.seq > last + 1:
                    lost += d.seq - last - 1
                last = d.seq if last is None else max(last, d.seq)
                u = d.updates
                m = (u["kind"] != ROW_SECTOR) & (u["send_ns"] > 0)
                if not m.any():
                    continue
                c["recv"].append(np.full(int(m.sum()), t, np.int64))
                c["send"].append(u["send_ns"][m].astype(np.int64))
                c["key"].append((u["kind"][m].astype(np.int64) << 32)
                                + u["account"][m].astype(np.int64) + 1 + (k << 48))
            cols.append({f: np.concatenate(v) if v else np.zeros(0, np.int64)
                         for f, v in c.items()})
            gaps.append(lost)
        part = cols[:-1]
        np.savez(spec["out"],
                 part_recv=np.concatenate([c["recv"] for c in part]),
                 part_send=np.concatenate([c["send"] for c in part]),
                 part_key=np.concatenate([c["key"] for c in part]),
                 cons_recv=cols[-1]["recv"], cons_send=cols[-1]["send"],
                 cons_key=cols[-1]["key"], gaps=np.array(gaps, np.int64))
        return 0
    finally:
        ep.close()
        for s in socks:
            s.close()


def _child(argv: list[str]) -> int:
    if argv[0] in ("consolidator", "consolidator-plain"):
        return _consolidator_child(argv[1], argv[2], argv[0] == "consolidator")
    if argv[0] == "receiver":
        return _receiver_child(argv[1])
    raise SystemExit(f"unknown child {argv[0]!r}")


# ----------------------------------------------------------------------------- the run
def _restarted(r: dict) -> str:
    n = r.get("reconnects", 0)
    if not n:
        return ""
    if "disturbed_runs" in r:
        return (f"  ({r['disturbed_runs']} of {len(r['runs_s'])} runs disturbed by a node "
                f"restart, {n} reconnects: medians over the others)")
    return f"  ({n} RECONNECTS: a node restarted during the run)"


def _print_report(out: dict) -> None:
    print(f"exposure cluster bench, {out['started']} ({out['seconds']} s): {out['command']}")
    print(f"stream: {out['events']:,} events (perf/flowgen.py, 200 accounts, 2,000 "
          "instruments; sources moved into their accounts' partitions)")
    print("\n1. router: exposure.core.routing.route / split (what send --cluster does), ns per "
          f"event, median of {next(iter(out['router'].values()))['repeats']}")
    print(f"  {'partitions':>10} {'route':>8} {'split':>8}")
    for p, r in out["router"].items():
        print(f"  {p:>10} {r['route_ns']:>8.1f} {r['split_ns']:>8.1f}")
    single = out.get("single")
    print("\n2-3. sustained rate, closed loop, until every event acknowledged (journal "
          "fsync every 2 ms);\n   ratio: the median of (cluster run / the one node's run "
          "just before it)")
    print(f"  {'system':<14} {'events/s':>10} {'ratio':>6} {'delivered/s':>12} "
          f"{'client cpu':>10}  per partition (its events / until its last was applied)")
    if single:
        print(f"  {'one node':<14} {single['events_per_s']:>10,} {1:>6.2f} {'':>12} "
              f"{single['client_cpu_percent']:>9.0f}%  runs {single['runs_s']} s"
              + _restarted(single))
    for p, c in out["clusters"].items():
        r = c.get("rate")
        if not r:
            continue
        ratio = r.get("ratio_to_one_node", float("nan"))
        per = ", ".join(f"{n} {v['events_per_s']:,}/s ({v['events']:,})"
                        for n, v in r["partitions"].items())
        print(f"  {f'{p} partitions':<14} {r['events_per_s']:>10,} {ratio:>6.2f} "
              f"{r['delivered_per_s']:>12,} {r['client_cpu_percent']:>9.0f}%  {per}"
              + _restarted(r))
    print("\n4. consolidator, CPU ns per row it published: the process's; its stage's poll "
          "(the partitions' feeds in,\n   merged, composed, published); of that, _publish "
          "(composed, published). From its first poll after the send\n   began to the "
          "publish that holds every partition's last row (lag: after the last was applied); "
          "in/row:\n   partition row changes per row out")
    print(f"  {'partitions':>10} {'rate':>7} {'rows':>9} {'batches':>8} {'rows/b':>7} "
          f"{'in/row':>6} {'process':>8} {'poll':>8} {'publish':>8} {'us/batch':>9} "
          f"{'cpu %':>6} {'lag ms':>7} {'gaps':>5}")
    for p, c in out["clusters"].items():
        k = c.get("consolidator")
        if not k:
            continue
        rate = f"{k['rate']:,.0f}" if k["rate"] else "max"
        print(f"  {p:>10} {rate:>7} {k['rows']:>9,} {k['batches']:>8,} "
              f"{k['rows_per_batch']:>7.1f} {k['input_changes'] / max(k['rows'], 1):>6.2f} "
              f"{k['cpu_ns_per_row']:>8,} {k['poll_ns_per_row']:>8,} "
              f"{k['publish_ns_per_row']:>8,} "
              f"{k['cpu_us_per_batch']:>9,.0f} {k['cpu_percent']:>6.1f} "
              f"{k['caught_up_after_last_apply_ms']:>7.0f} {k['gaps']:>5}" + _restarted(k))
    for p, c in out["clusters"].items():
        k = c.get("consolidator")
        if k:
            i = k["idle"]
            print(f"  {p} partitions, then {i['seconds']:g} s without events: "
                  f"{i['input_changes_per_s']:,.0f} changes/s in, {i['rows_per_s']:,.0f} "
                  f"rows/s and {i['batches_per_s']:,.0f} batches/s out, "
                  f"{i['polls_per_s']:,.0f} polls/s, {i['cpu_percent']:.1f}% CPU")
    for p, c in out["clusters"].items():
        lat = c.get("latency")
        if not lat:
            continue
        print(f"\n5. wire to wire at {lat['rate']:,.0f} events/s ({lat['achieved_rate']:,} "
              f"achieved), {p} partitions, frames of {lat['frame']}, {lat['seconds']:g} s "
              f"after {lat['warmup_s']:g} s; now - row send_ns, us")
        print(f"  {'through':<24} {'p50':>8} {'p90':>8} {'p99':>9} {'p99.9':>9} "
              f"{'max':>9} {'rows':>8}")
        for name, key in (("the partitions", "partition"), ("the consolidator",
                                                            "consolidator"),
                          ("added (same event)", "added")):
            s = lat[key]
            print(f"  {name:<24} {s['p50_us']:>8.1f} {s['p90_us']:>8.1f} {s['p99_us']:>9.1f}"
                  f" {s['p999_us']:>9.1f} {s['max_us']:>9.0f} {s['rows']:>8,}"
                  + (f"  (+{s['repeats']:,} repeated)" if s.get("repeats") else ""))
        print(f"  p50 difference {lat['added_p50_us_difference']:+.1f} us, p99 difference "
              f"{lat['added_p99_us_difference']:+.1f} us; consolidator "
              f"{lat['consolidator_cpu_ns_per_row']:,} ns CPU per row, "
              f"{lat['consolidator_rows_per_batch']:.1f} rows per batch, "
              f"{lat['consolidator_cpu_percent']:.0f}% of a core; receiver gaps "
              f"{lat['receiver_gaps']}; steal {lat['steal_s']} s" + _restarted(lat))
        print("  CPU while sending: " + ", ".join(f"{k} {v:.0f}%"
                                                 for k, v in lat["cpu_percent"].items())
              + f"; some task waited for a CPU {lat['cpu_pressure_percent']}% of the time")
    for p, c in out["clusters"].items():
        if c.get("failed"):
            print(f"\n{p} partitions FAILED in {c['failed']}")
    restarts = [*out.get("single", {}).get("node_restarts", []),
                *(x for c in out["clusters"].values() for x in c.get("node_restarts", []))]
    if restarts:
        print("\nnode restarts (their supervisors' words):")
        for line in restarts:
            print(f"  {line}")
    print(f"\nsteal: {out['steal_percent']}% of CPU time ({out['steal_s']} s) over the run; "
          f"{os.cpu_count()} CPUs; load average {out['load_average']['start']} at the start, "
          f"{out['load_average']['end']} at the end; other exposure/pytest processes "
          f"{out['other_processes']['start']} at the start, {out['other_processes']['end']} "
          f"at the end; some task waited for a CPU {out['cpu_pressure_percent']}% of the time "
          "(/proc/pressure/cpu)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partitions", help="cluster sizes to start (default 1,2,4; --quick: 2)")
    p.add_argument("--events", type=int, help="events in the stream (default 1,000,000; "
                   "--quick: 400,000)")
    p.add_argument("--runs", type=int, help="throughput runs per system, median "
                   "(default 2; --quick: 1)")
    p.add_argument("--router-repeats", type=int, default=5)
    p.add_argument("--cons-rate", type=float, default=0.0,
                   help="events/s of the consolidator's cost run (0: as fast as it goes)")
    p.add_argument("--latency-rate", type=float, default=10_000.0)
    p.add_argument("--latency-seconds", type=float, help="measured seconds (default 15; "
                   "--quick: 5)")
    p.add_argument("--latency-frame", type=int, default=1, help="events per frame")
    p.add_argument("--latency-partitions", type=int, default=2,
                   help="the cluster size (one of --partitions) whose consolidator's latency "
                   "is measured (0: none)")
    p.add_argument("--skip", default="", help="comma-separated: single, rate, cost, latency")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--quick", action="store_true", help="a smoke run (about a minute)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    a.partitions = a.partitions or ("2" if a.quick else "1,2,4")
    a.events = a.events or (400_000 if a.quick else 1_000_000)
    a.runs = a.runs or (1 if a.quick else 2)
    a.latency_seconds = a.latency_seconds or (5.0 if a.quick else 15.0)
    counts = sorted({int(x) for x in a.partitions.split(",") if x.strip()})
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    if not counts or min(counts) < 1 or max(counts) > MAX_PARTITIONS or a.events < 10_000 \
            or a.runs < 1 or a.latency_rate <= 0 or a.latency_frame < 1:
        p.error(f"--partitions within 1..{MAX_PARTITIONS}, --events at least 10,000, --runs "
                "at least 1, --latency-rate and --latency-frame positive")
    if "latency" not in skip and a.latency_partitions and a.latency_partitions not in counts:
        p.error(f"--latency-partitions {a.latency_partitions} is not one of --partitions "
                f"{a.partitions} (0: no latency run)")

    t_say = time.monotonic()

    def say(msg: str) -> None:  # progress, on stderr
        print(f"[{time.monotonic() - t_say:5.0f} s] {msg}", file=sys.stderr, flush=True)

    # SIGTERM (a timeout's kill) unwinds through the finally blocks: nodes stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(UTC)
    steal0, t0 = steal_ticks(), time.monotonic()
    load0, others0, psi0 = os.getloadavg()[0], _others(), cpu_pressure_us()
    out: dict = {"started": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
                 "command": " ".join(["python -m perf.bench_cluster", *(
                     sys.argv[1:] if argv is None else argv)]),
                 "events": a.events, "partitions": counts, "clusters": {}}
    base = Path(tempfile.mkdtemp(prefix="exposure-bench-cluster-"))
    single: SingleNode | None = None
    try:
        say(f"generating {a.events:,} events ...")
        recs = flow(a.events, a.seed)
        say("router ...")
        out["router"] = router_cost(recs, sorted({1, 2, 4, 8} | set(counts)), a.router_repeats)
        # The one node takes the stream as the 2-partition cluster has it (any map's
        # stream is the same work for a node that owns everything).
        if "single" not in skip and "rate" not in skip:
            say("one node: starting ...")
            single = SingleNode(base, respect_map(recs, bench_map(2)))
            single.start(say)
        for n in counts:
            pmap = bench_map(n)
            stream = respect_map(recs, pmap)
            say(f"{n} partitions: starting ...")
            bc = BenchCluster(base, pmap)
            res: dict = {}
            out["clusters"][n] = res
            phase = "start"
            try:
                bc.start()
                send_cluster(bc.cluster, stream[:WARMUP_EVENTS], session=1, timeout=120,
                             retry_s=RETRY_S)
                settle(bc.node_pids(), say)
                session = 2
                if "rate" not in skip:
                    phase = "rate"
                    res["rate"] = cluster_rate(bc, stream, a.runs, session, say, single)
                    session += a.runs
                if not ({"cost", "latency"} <= skip):
                    phase = "consolidator start"
                    bc.start_consolidator()  # (an idle one polls every ms: not waited for)
                    settle(bc.node_pids(), say)
                if "cost" not in skip:
                    phase = "consolidator cost"
                    res["consolidator"] = consolidator_cost(
                        bc, stream, session, a.cons_rate, 1.0 if a.quick else 2.0, say)
                    session += 1
                if "latency" not in skip and n == a.latency_partitions:
                    phase = "latency"
                    bc.start_consolidator(timed=False)  # a fresh one, without timers
                    settle(bc.node_pids(), say)
                    res["latency"] = consolidator_latency(
                        bc, stream, session, a.latency_rate, a.latency_seconds, 1.0,
                        a.latency_frame, say)
            except Exception as e:  # recorded; the other clusters are still measured
                res["failed"] = f"{phase}: {type(e).__name__}: {e}"
                say(f"  FAILED in {phase}: {type(e).__name__}: {e}")
                say(bc.log_tails())
            finally:
                res["node_restarts"] = bc.events()
                bc.stop()
        if single is not None and single.runs:
            out["single"] = single.summary()
            out["single"]["node_restarts"] = single.node.restarts()
    finally:
        try:
            if single is not None:
                single.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)
    out.update(steal_since(steal0))
    out["load_average"] = {"start": round(load0, 2), "end": round(os.getloadavg()[0], 2)}
    out["other_processes"] = {"start": others0, "end": _others()}
    out["seconds"] = round(time.monotonic() - t0, 1)
    out["cpu_pressure_percent"] = round((cpu_pressure_us() - psi0) / 1e4 / out["seconds"], 1)
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2
                                             | orjson.OPT_NON_STR_KEYS
                                             | orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    else:
        _print_report(out)
    return 1 if any(c.get("failed") for c in out["clusters"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
