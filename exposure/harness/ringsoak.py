"""Two-process ring soak: one process produces numbered, patterned records into a ring,
another consumes and verifies them (no gap, no corrupted byte). Validates a host's shared
memory and the ring's ordering under wrap-around and back-pressure.

    python -m exposure.harness.ringsoak produce RING N [--seed S]
    python -m exposure.harness.ringsoak consume RING N [--wait spin|spin-then-block|block]
                                             [--check full|seq] [--consumer K]
                                             [--pause-every M]

The ring must exist (``Ring.create``); both sides attach. A two-consumer ring gets one
consumer process per ``--consumer`` (0 and 1), each of which must see every record;
``--pause-every M`` makes a consumer sleep a millisecond every M pops (a slow consumer: the
producer must wait for it, never overwrite what it has not read). The consumer prints one JSON line
``{"records": N, "ok": true, ...}`` and exits 0 when every record checked out.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import orjson
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.log import setup
from exposure.shm.ring import Ring, RingReader, ring_pop_at, ring_push
from exposure.shm.wait import WAIT_STRATEGIES, WaitStrategy


@njit(cache=True)
def _fill(buf, first, n, full):
    rs = buf.shape[1] if full else 8
    for k in range(n):
        seq = first + k
        for b in range(8):
            buf[k, b] = (seq >> (8 * b)) & 0xFF
        for b in range(8, rs):
            buf[k, b] = (seq * 31 + b * 7) & 0xFF


@njit(cache=True)
def _check(buf, first, n, full):
    """Index of the first bad record in buf[:n], or -1 (``full``: every byte, else the
    sequence word only)."""
    rs = buf.shape[1] if full else 8
    for k in range(n):
        seq = first + k
        got = 0
        for b in range(8):
            got |= np.int64(buf[k, b]) << (8 * b)
        if got != seq:
            return k
        for b in range(8, rs):
            if buf[k, b] != (seq * 31 + b * 7) & 0xFF:
                return k
    return -1


def produce(ring: Ring, total: int, seed: int = 1, wait: WaitStrategy | None = None,
            full: bool = True) -> int:
    """Push ``total`` records in batches of random size; returns the number of full-ring
    retries (back-pressure events)."""
    rng = np.random.default_rng(seed)
    batch = np.zeros((4096, ring.record_size), np.uint8)
    words = batch.view(np.uint64)
    sent = retries = 0
    while sent < total:
        n = min(int(rng.integers(1, 4097)), total - sent)
        _fill(batch, sent, n, full)
        done = 0
        while done < n:
            m = ring_push(ring.ctrl, ring.slots, words[done:n], n - done)
            done += m
            if wait is not None and m:
                wait.wake(ring)
            if done < n:
                retries += 1
        sent += n
    return retries


def consume(ring: Ring | RingReader, total: int, wait: WaitStrategy, full: bool = True,
            pause_every: int = 0) -> dict:
    """``ring``: a consumer's end (the ring for consumer 0, ``ring.reader(1)``)."""
    out = np.zeros((4096, ring.record_size), np.uint8)
    words = out.view(np.uint64)
    got = empty = pops = 0
    t0 = time.perf_counter()
    while got < total:
        m = ring_pop_at(ring.ctrl, ring.slots, words, min(4096, total - got), ring.head_word)
        if m == 0:
            empty += 1
            wait.idle(ring)
            continue
        pops += 1
        if pause_every and pops % pause_every == 0:
            time.sleep(0.001)
        wait.reset()
        bad = _check(out, got, m, full)
        if bad >= 0:
            return {"records": got + bad, "ok": False, "error": f"record {got + bad} corrupt"}
        got += m
    dt = time.perf_counter() - t0
    return {"records": got, "ok": True, "empty_polls": empty, "seconds": round(dt, 3),
            "records_per_s": round(got / dt)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("side", choices=["produce", "consume"])
    p.add_argument("ring")
    p.add_argument("records", type=int)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--wait", choices=WAIT_STRATEGIES, default="spin")
    p.add_argument("--consumer", type=int, default=0, help="which consumer (0 or 1)")
    p.add_argument("--pause-every", type=int, default=0,
                   help="sleep 1 ms every this many pops (a slow consumer)")
    p.add_argument("--check", choices=["full", "seq"], default="full",
                   help="verify every byte (default) or only each record's sequence word")
    a = p.parse_args(argv)
    setup(label="ringsoak")
    ring = Ring.attach(a.ring)
    try:
        wait = WaitStrategy(a.wait)
        if a.side == "produce":
            retries = produce(ring, a.records, a.seed, wait if a.wait != "spin" else None,
                              a.check == "full")
            print(orjson.dumps({"records": a.records, "full_ring_retries": retries}).decode())
            return 0
        res = consume(ring.reader(a.consumer), a.records, wait, a.check == "full",
                      a.pause_every)
        print(orjson.dumps(res).decode())
        return 0 if res["ok"] else 1
    finally:
        ring.close()


if __name__ == "__main__":
    sys.exit(main())
