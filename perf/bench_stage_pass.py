"""The fixed cost of one pass of each hot stage, in ns, measured in-process (issue 30).

    python -m perf.bench_stage_pass [--passes 200000] [--events 20000] [--runs 5]
                                    [--stages compute,fanout,journal,pair,fused,batch]
                                    [--evict MIB] [--json]

Builds the stages as a node's processes do (a tally segment of the default capacities, the
compute and fan-out rings, the counters) but in this one process, and times their public
``poll()``:

* ``build_s``: constructing the stage (its jitted calls compiled, or loaded from numba's
  cache: run it twice, the second figure is a node start's);
* ``idle_ns``: a pass with nothing on the input ring (the loop's cost when idle);
* ``one_ns``: a pass that finds one record (compute: one event of a realistic flow applied,
  published and pushed as feed rows; fan-out: one row conflated, packed and sent, the
  ``sendmmsg`` included; journal: one record written with ``fsync = none``, the ``writev``
  included; ``pair``: compute's poll then the fan-out's, as the default map's hot process
  ran them, the event's rows sent; ``fused``: the same as one stage of one jitted call,
  :mod:`exposure.node.stages.fused`, as it runs them now); median over ``--events`` passes,
  each timed alone (the clock's own cost, measured, subtracted), the input put on the ring
  and the output drained outside the timer. With ``--evict MIB``, a buffer of that size is
  written between passes (outside the timer), so each pass starts with the caches holding
  none of the stage's state: the cost of an event that finds them cold, as on a node whose
  events come tens of microseconds apart on a shared machine.
* ``event_ns`` (stage ``batch``): the fused pass under load, ns an event over 500,000
  events of the flow in batches of 4,096 (a node's batch at millions of events a second),
  datagrams as large as loopback takes, a receiver drained between batches outside the
  timer: what caps the hot process's sustained rate, besides ingest.

Uses only the stages' constructors and ``poll()``, so the same file measures an older
checkout (``PYTHONPATH=<checkout> python <this file>``). Steal and load are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid

import numpy as np
import orjson

from exposure.bench.flowgen import generate
from exposure.core.capacity import Capacities
from exposure.core.types import EVENT_WORDS, ROW_SIZE, W_GSEQ
from exposure.harness.machine import steal_since, steal_ticks
from exposure.shm import counters_layout as CN
from exposure.shm.ring import Ring, ring_pop, ring_push
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_segment import TallySegment

__all__ = ["main"]


def _clock_ns() -> float:
    n = 20000
    t0 = time.perf_counter_ns()
    for _ in range(n):
        time.perf_counter_ns()
    return (time.perf_counter_ns() - t0) / n


def _idle(poll, passes: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(passes):
        poll()
    return (time.perf_counter_ns() - t0) / passes


_EVICT: np.ndarray | None = None  # --evict: written between one-record passes


def _one(poll, feed, drain, events: int, clock: float) -> float:
    ts = []
    pc = time.perf_counter_ns
    ev = _EVICT
    for k in range(events):
        feed(k)
        if ev is not None:
            ev += 1  # every cache line of a buffer larger than the caches
        t0 = pc()
        poll()
        t1 = pc()
        ts.append(t1 - t0 - clock)
        drain()
    return statistics.median(ts)


@contextlib.contextmanager
def _compute_rig(tag: str):
    """A tally segment of the default capacities, compute's input ring and its fan-out
    ring, a session table and counters, as a node's processes attach them; yields (segment,
    input ring, fan-out ring, sessions, counters) and removes the segments."""
    caps = Capacities()
    seg = TallySegment.create(f"exposure-bench30-{tag}-tally", caps)
    inp = Ring.create(f"exposure-bench30-{tag}-cin", 131072, EVENT_WORDS * 8)
    out = Ring.create(f"exposure-bench30-{tag}-fout", 16384, ROW_SIZE)
    try:
        yield (seg, inp, out, np.zeros((caps.sources + 1, SESSION_COLS), np.uint64),
               np.zeros(CN.COUNTER_WORDS, np.uint64))
    finally:
        for r in (inp, out):
            r.close()  # (and unlinks: this process created them)
        seg.close()


def _flow_words(events: int) -> np.ndarray:
    """``events`` records of the benchmark flow as u64 words, gseqs 1 on."""
    recs = generate(events, seed=1)
    words = recs.view(np.uint64).reshape(len(recs), -1).copy()
    words[:, W_GSEQ] = np.arange(1, len(recs) + 1, dtype=np.uint64)
    return words


def _compute(tag: str, passes: int, events: int, clock: float) -> dict:
    from exposure.node.stages.compute import ComputeStage

    with _compute_rig(tag) as (seg, inp, out, sessions, cnt):
        t0 = time.perf_counter()
        stage = ComputeStage(seg, sessions, inp, out, counters=cnt)
        build = time.perf_counter() - t0
        words = _flow_words(events)
        sink = np.zeros((out.capacity, ROW_SIZE // 8), np.uint64)
        idle = _idle(stage.poll, passes)

        def feed(k: int) -> None:
            ring_push(inp.ctrl, inp.slots, words[k:k + 1], 1)

        def drain() -> None:
            ring_pop(out.ctrl, out.slots, sink, len(sink))

        one = _one(stage.poll, feed, drain, events, clock)
        assert int(cnt[CN.INDEX["compute_events_total"]]) == events
        stage.close()
        return {"build_s": round(build, 3), "idle_ns": round(idle), "one_ns": round(one)}


@contextlib.contextmanager
def _hot_pair(tag: str, group: str, port: int, max_datagram: int, batch: int = 8192):
    """Compute (batches of up to ``batch``) and the fan-out of its ring, sending to
    ``group``:``port`` in datagrams of ``max_datagram`` bytes (0: the interface's), over
    :func:`_compute_rig`; yields (compute, fan-out, input ring, fan-out ring, counters,
    seconds the two took to build) and closes them."""
    from exposure.node.stages.compute import ComputeStage
    from exposure.node.stages.fanout import FanoutStage

    stages = []
    with _compute_rig(tag) as (seg, inp, out, sessions, cnt):
        try:
            t0 = time.perf_counter()
            cs = ComputeStage(seg, sessions, inp, out, counters=cnt, batch=batch)
            stages.append(cs)
            fo = FanoutStage(out, group, port, "127.0.0.1", 0, max_datagram, seg.state,
                             heartbeat_ms=1_000_000, refresh_rows_per_s=0, counters=cnt,
                             words=seg.words)
            stages.append(fo)
            yield cs, fo, inp, out, cnt, time.perf_counter() - t0
        finally:
            for s in stages:
                s.close()


def _pair(tag: str, passes: int, events: int, clock: float, fused: bool) -> dict:
    """Compute and the fan-out of its ring (to a real multicast group), as the default
    map's hot process runs them: polled one after the other (``fused`` False) or as one
    stage of one jitted call a pass (exposure.node.stages.fused)."""
    from exposure.harness.localnode import free_group, free_port
    from exposure.node.stages.fused import ComputeFanout

    with _hot_pair(tag, free_group(), free_port(), 1400) as (cs, fo, inp, out, cnt, build):
        if fused:
            t0 = time.perf_counter()
            poll = ComputeFanout(cs, fo).poll
            build += time.perf_counter() - t0
        else:
            def poll() -> int:
                return cs.poll() + fo.poll()
        words = _flow_words(events)
        idle = _idle(poll, passes)

        def feed(k: int) -> None:
            ring_push(inp.ctrl, inp.slots, words[k:k + 1], 1)

        one = _one(poll, feed, lambda: None, events, clock)
        assert int(cnt[CN.INDEX["compute_events_total"]]) == events
        assert len(out) == 0  # every row packed and sent in the pass
        return {"build_s": round(build, 3), "idle_ns": round(idle), "one_ns": round(one)}


_BATCH = 4096  # events a batch of the ``batch`` stage (a node's batch under load)
_BATCH_EVENTS = 500_000  # and the events it runs through, per run


def _batch(tag: str, passes: int, events: int, clock: float) -> dict:
    """The fused pass (exposure.node.stages.fused) under load: :data:`_BATCH_EVENTS` of
    the flow in batches of :data:`_BATCH`, datagrams as large as loopback takes (the
    default ``max_datagram``), a receiver joined and drained between batches outside the
    timer; ns an event, and feed rows an event."""
    import socket

    from exposure.feed.wire import open_receiver
    from exposure.harness.localnode import free_group, free_port
    from exposure.node.stages.fused import ComputeFanout

    group, port = free_group(), free_port()
    rx = open_receiver(group, port)
    rx.setblocking(False)
    with contextlib.suppress(OSError):  # SO_RCVBUFFORCE (root): room for a batch's rows
        rx.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)
    try:
        with _hot_pair(tag, group, port, 0, _BATCH) as (cs, fo, inp, out, cnt, build):
            t0 = time.perf_counter()
            poll = ComputeFanout(cs, fo).poll
            build += time.perf_counter() - t0
            words = _flow_words(_BATCH_EVENTS)
            buf = bytearray(65536)
            spent = 0
            for lo in range(0, len(words), _BATCH):
                n = min(_BATCH, len(words) - lo)
                ring_push(inp.ctrl, inp.slots, words[lo:lo + n], n)
                t = time.perf_counter_ns()
                while poll():
                    pass
                spent += time.perf_counter_ns() - t
                while True:
                    try:
                        rx.recv_into(buf)
                    except BlockingIOError:
                        break
            assert int(cnt[CN.INDEX["compute_events_total"]]) == len(words)
            rows = int(cnt[CN.INDEX["fanout_rows_total"]])
            return {"build_s": round(build, 3), "event_ns": round(spent / len(words), 1),
                    "rows_per_event": round(rows / len(words), 3)}
    finally:
        rx.close()


def _fanout(tag: str, passes: int, events: int, clock: float) -> dict:
    from exposure.harness.localnode import free_group, free_port
    from exposure.node.stages.fanout import FanoutStage
    from exposure.shm.tally_layout import allocate

    _, st = allocate(Capacities(accounts=64, instruments=256, sectors=16, sources=16,
                                orders=1024, cells=1024))
    ring = Ring.create(f"exposure-bench30-{tag}-fo", 16384, ROW_SIZE)
    cnt = np.zeros(CN.COUNTER_WORDS, np.uint64)
    try:
        t0 = time.perf_counter()
        fo = FanoutStage(ring, free_group(), free_port(), "127.0.0.1", 0, 1400, st,
                         heartbeat_ms=1_000_000, refresh_rows_per_s=0, counters=cnt)
        build = time.perf_counter() - t0
        idle = _idle(fo.poll, passes)
        row = np.zeros((1, ROW_SIZE // 8), np.uint64)
        row[0, 0] = 1 | (3 << 32)  # an account row (kind 1), id 3

        def feed(k: int) -> None:
            ring_push(ring.ctrl, ring.slots, row, 1)

        one = _one(fo.poll, feed, lambda: None, events, clock)
        fo.close()
        return {"build_s": round(build, 3), "idle_ns": round(idle), "one_ns": round(one)}
    finally:
        ring.close()


def _journal(tag: str, passes: int, events: int, clock: float) -> dict:
    from exposure.node.stages.journal import JournalStage
    from exposure.store.journal import JournalWriter

    d = tempfile.mkdtemp(prefix="exposure-bench30-")
    ring = Ring.create(f"exposure-bench30-{tag}-jr", 131072, EVENT_WORDS * 8)
    sessions = np.zeros((1025, SESSION_COLS), np.uint64)
    cnt = np.zeros(CN.COUNTER_WORDS, np.uint64)
    try:
        t0 = time.perf_counter()
        js = JournalStage(ring, sessions, JournalWriter(d, 64 << 20), "none", 0,
                          counters=cnt)
        build = time.perf_counter() - t0
        idle = _idle(js.poll, passes)
        recs = generate(events, seed=2)
        words = recs.view(np.uint64).reshape(len(recs), -1).copy()
        words[:, W_GSEQ] = np.arange(1, len(recs) + 1, dtype=np.uint64)

        def feed(k: int) -> None:
            ring_push(ring.ctrl, ring.slots, words[k:k + 1], 1)

        one = _one(js.poll, feed, lambda: None, events, clock)
        js.close()
        return {"build_s": round(build, 3), "idle_ns": round(idle), "one_ns": round(one)}
    finally:
        ring.close()
        shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=200_000, help="idle passes per run")
    p.add_argument("--events", type=int, default=20_000, help="one-record passes per run")
    p.add_argument("--runs", type=int, default=5, help="runs (medians reported)")
    p.add_argument("--stages", default="compute,fanout,journal")
    p.add_argument("--evict", type=int, default=0,
                   help="MiB written between one-record passes (0: none)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    global _EVICT
    _EVICT = np.zeros(a.evict << 17, np.uint64) if a.evict > 0 else None
    steal0 = steal_ticks()
    load0 = os.getloadavg()[0]
    clock = _clock_ns()
    tag = uuid.uuid4().hex[:6]
    fns = {"compute": _compute, "fanout": _fanout, "journal": _journal,
           "pair": lambda *a: _pair(*a, fused=False), "fused": lambda *a: _pair(*a, fused=True),
           "batch": _batch}
    out: dict = {"clock_ns": round(clock, 1), "evict_mib": a.evict}
    for name in a.stages.split(","):
        runs = [fns[name](f"{tag}{k}", a.passes, a.events, clock) for k in range(a.runs)]
        out[name] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        out[name]["first_build_s"] = runs[0]["build_s"]
        out[name]["runs"] = runs
        got = out[name]
        what = (f"{got['event_ns']:7,.1f} ns an event ({got['rows_per_event']} rows), "
                f"batches of {_BATCH}" if name == "batch" else
                f"idle {got['idle_ns']:7,.0f} ns  one {got['one_ns']:7,.0f} ns")
        print(f"{name:8} {what}  build {runs[0]['build_s']:.3f} s first, "
              f"{got['build_s']:.3f} s median", file=sys.stderr, flush=True)
    out["steal_percent"] = steal_since(steal0)["steal_percent"]
    out["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        print(f"steal {out['steal_percent']}%, load {out['load'][0]} -> {out['load'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
