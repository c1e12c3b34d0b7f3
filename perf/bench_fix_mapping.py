"""CPU per ExecutionReport of the mapping alone: ``python -m perf.bench_fix_mapping``.

A day of New + Trade pairs (the gateway benchmark's flow: perf/bench_fix.py), encoded by
the codec and framed by ``FixReader`` before the clock starts, then mapped by one
:class:`exposure.fix.mapping.Mapper`: (a) through ``FixMessage.get`` (what the gateway
does: the codec's lazy field split is part of the cost), (b) through a dict stand-in (the
mapping's own cost), also with the objects made before the clock frozen out of the
cyclic GC (``gc.freeze``: what a long-running process with a big heap gains). For scale,
in the same run: ``engine.parse.record_values`` of one event dict (what ``Producer.send``
does with each event the mapper yields). CPU time (process_time), best of ``--runs``.
"""

from __future__ import annotations

import argparse
import gc
import time

from exposure.core.refdata import Account, Instrument, RefData
from exposure.engine.parse import record_values
from exposure.fix.codec import FixReader, encode
from exposure.fix.mapping import Mapper


class _Fields(dict):
    __slots__ = ()
    get = dict.get


def _messages(n: int) -> list[bytes]:
    out = []
    for k in range(n // 2):
        common = [(37, f"O{k}"), (11, f"C{k}"), (54, "1" if k % 3 else "2"),
                  (55, f"S{1 + (k * 7) % 200}"), (1, f"A{1 + k % 50}")]
        for extra in ([(17, f"N{k}"), (150, "0"), (39, "0"), (38, 100), (44, "10.25"),
                       (151, 100)],
                      [(17, f"F{k}"), (150, "F"), (39, "2"), (38, 100), (44, "10.25"),
                       (32, 100), (31, "10.5"), (151, 0)]):
            out.append(encode("FIX.4.4", "8", [*common, *extra], sender="BROKER",
                              target="EXPOSURE", seq=len(out) + 1,
                              sending_time=b"20261206-10:00:00.000"))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args(argv)
    rd = RefData.from_rows([Instrument(i, f"S{i}") for i in range(1, 201)],
                           [Account(i, f"A{i}") for i in range(1, 51)])
    raw = _messages(a.messages)
    n = len(raw)
    best = {"FixMessage": 1e9, "dict": 1e9, "dict, GC frozen": 1e9, "record_values": 1e9}
    for _ in range(a.runs):
        rd_ = FixReader(1 << 16)
        msgs = [m for r in raw for m in rd_.feed(r)]
        dicts = [_Fields({t: v.decode() for t, v in m.fields}) for m in msgs]
        m1, m2 = Mapper(rd, source=1), Mapper(rd, source=1)
        t = time.process_time()
        evs = [m1.map(m) for m in msgs]
        best["FixMessage"] = min(best["FixMessage"], (time.process_time() - t) / n)
        t = time.process_time()
        for d in dicts:
            m2.map(d)
        best["dict"] = min(best["dict"], (time.process_time() - t) / n)
        m3 = Mapper(rd, source=1)
        gc.collect()
        gc.freeze()   # the benchmark's own objects out of the cyclic GC's way
        t = time.process_time()
        for d in dicts:
            m3.map(d)
        best["dict, GC frozen"] = min(best["dict, GC frozen"], (time.process_time() - t) / n)
        gc.unfreeze()
        ev = [r.events[0] for r in evs]
        t = time.process_time()
        for e in ev:
            record_values(e)
        best["record_values"] = min(best["record_values"], (time.process_time() - t) / n)
    loop = time.process_time()
    x = 0
    for i in range(1_000_000):
        x += i
    loop = (time.process_time() - loop) / 1e6
    print(f"{n:,} reports (New + Trade), best of {a.runs}; a bare Python loop step here: "
          f"{loop * 1e9:.0f} ns")
    for k, v in best.items():
        print(f"  {k:16s} {v * 1e6:6.2f} us per report  ({1 / v:>10,.0f}/s)")


if __name__ == "__main__":
    main()
