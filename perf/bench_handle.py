"""The Python-to-numba boundary: what one call costs by how its arrays are passed (issue 30).

    python -m perf.bench_handle [--calls 200000] [--json]

* ``compute``: compute's own step over its 23 members (rings, batch buffers, the state's
  named tuple of arrays, the published tables' versions, the session table, the
  counters) with an empty input ring, so the call is the boundary plus an empty pop:
  the arrays through the dispatcher, through the compiled entry (``exposure.core.jit.entry``,
  what the stages did before), and one :class:`exposure.shm.handle.Handle` through its
  compiled entry (what they do now);
* ``ten``: ten arrays, the same ten bound in a ``Handle``, and in a numba ``structref``
  (the other candidate that caches the functions using it): each through the dispatcher
  and through the compiled entry; plus the time to make the structref, whose constructor
  is generated from the field list and so compiled at every start (numba cannot cache
  it), and the handle's. (A ``jitclass`` is not cached at all: ruled out for a node
  start that must not compile.)

Best of 5 repeats of ``--calls`` calls each, in ns per call; run it twice, the second run
loads every function from numba's cache. Load and steal are reported.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import timeit

import numba
import numpy as np
import orjson
from numba import njit, types
from numba.experimental import structref

from exposure.core import jit as _jit
from exposure.harness.machine import steal_since, steal_ticks
from exposure.shm.handle import Handle, bind, members

__all__ = ["main"]


@structref.register
class _BagType(types.StructRef):
    def preprocess_fields(self, fields):
        return tuple((n, types.unliteral(t)) for n, t in fields)


class _Bag(structref.StructRefProxy):
    pass


structref.define_boxing(_BagType, _Bag)


@njit(cache=True)
def _body(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, now):
    return a0[0] + a9[0] + now


@njit(cache=True)
def _via_bag(b, now):
    return _body(b.f0, b.f1, b.f2, b.f3, b.f4, b.f5, b.f6, b.f7, b.f8, b.f9, now)


@njit(cache=True)
def _via_handle(h, now):
    return _body(*members(h), now)


def _bag(arrs: list) -> tuple:
    """A structref of ``arrs`` (fields f0..f9) and the seconds its constructor took."""
    t = _BagType([(f"f{i}", numba.typeof(a)) for i, a in enumerate(arrs)])
    names = [f"f{i}" for i in range(len(arrs))]
    body = "\n".join(f"    st.{k} = {k}" for k in names)
    src = f"def ctor({', '.join(names)}):\n    st = new(T)\n{body}\n    return st\n"
    g = {"new": structref.new, "T": t}
    exec(src, g)  # (what numba's own define_constructor does)
    t0 = time.perf_counter()
    bag = njit(g["ctor"])(*arrs)
    return bag, time.perf_counter() - t0


def _ns(f, args: tuple, calls: int) -> float:
    return round(min(timeit.repeat(lambda: f(*args), number=calls, repeat=5)) / calls * 1e9)


def _compute(calls: int) -> dict:
    from exposure.core.capacity import Capacities
    from exposure.core.types import EVENT_WORDS, ROW_SIZE
    from exposure.node.stages import compute as C
    from exposure.shm import counters_layout as CN
    from exposure.shm.ring import Ring
    from exposure.shm.session_layout import SESSION_COLS
    from exposure.shm.tally_segment import TallySegment

    caps = Capacities()
    tag = f"{os.getpid()}"
    seg = TallySegment.create(f"exposure-benchh-{tag}-tally", caps)
    inp = Ring.create(f"exposure-benchh-{tag}-cin", 131072, EVENT_WORDS * 8)
    out = Ring.create(f"exposure-benchh-{tag}-fout", 16384, ROW_SIZE)
    try:
        stage = C.ComputeStage(seg, np.zeros((caps.sources + 1, SESSION_COLS), np.uint64),
                               inp, out, counters=np.zeros(CN.COUNTER_WORDS, np.uint64))
        vals = stage.handle.values
        arrays_entry = _jit.entry(C._step, *vals, 0)
        r = {"members": len(vals),
             "arrays_dispatcher_ns": _ns(C._step, (*vals, 0), calls // 4),
             "arrays_entry_ns": _ns(arrays_entry, (*vals, 0), calls),
             "handle_entry_ns": _ns(stage._step, (stage.handle,), calls)}
        stage.close()
        return r
    finally:
        inp.close()
        out.close()
        seg.close()


def _ten(calls: int) -> dict:
    arrs = [np.arange(5, dtype=np.float64) for _ in range(10)]
    bag, ctor_s = _bag(arrs)
    t0 = time.perf_counter()
    h = Handle(*arrs)
    fh = bind(_via_handle, h, 0)
    handle_s = time.perf_counter() - t0
    fb = bind(_via_bag, bag, 0)
    fa = bind(_body, *arrs, 0)
    return {"arrays_dispatcher_ns": _ns(_body, (*arrs, 1), calls),
            "arrays_entry_ns": _ns(fa, (*arrs, 1), calls),
            "structref_dispatcher_ns": _ns(_via_bag, (bag, 1), calls),
            "structref_entry_ns": _ns(fb, (bag, 1), calls),
            "handle_dispatcher_ns": _ns(_via_handle, (h, 1), calls // 4),
            "handle_entry_ns": _ns(fh, (h, 1), calls),
            "structref_make_s": round(ctor_s, 3), "handle_make_and_bind_s": round(handle_s, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=200_000)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    steal0 = steal_ticks()
    load0 = os.getloadavg()[0]
    out = {"compute": _compute(a.calls), "ten": _ten(a.calls)}
    out["steal_percent"] = steal_since(steal0)["steal_percent"]
    out["load"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(out, option=orjson.OPT_INDENT_2) + b"\n")
    else:
        for part in ("compute", "ten"):
            print(part, " ".join(f"{k}={v}" for k, v in out[part].items()))
        print(f"steal {out['steal_percent']}%, load {out['load'][0]} -> {out['load'][1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
