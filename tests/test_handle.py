"""exposure.shm.handle: a stage's arrays bound once (issue 30).

A Handle's descriptor describes exactly the arrays it was made from (address, shape,
strides; named tuples of them; numbers), jitted code sees those very arrays, and a handle
that is closed or of other types is refused at the boundary with a clear error, before any
jitted code runs. Functions over handles are cached on disk like any other.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import namedtuple

import numba
import numpy as np
import pytest
from numba import njit

from exposure.shm.handle import Handle, bind, members

Pair = namedtuple("Pair", "rows ver")
REC = np.dtype([("ver", np.uint64), ("x", np.float64), ("n", np.int32), ("_pad", np.int32)])


@njit(cache=True)
def _probe(h):
    """(address, shapes, strides) of the first array, the tuple's two arrays, and the
    numbers, as jitted code sees them."""
    a, p, k, f, b = members(h)
    return (a.ctypes.data, a.shape[0], a.shape[1], a.strides[0], a.strides[1],
            p.rows.ctypes.data, p.rows.shape[0], p.ver.ctypes.data, p.ver.strides[0],
            k, f, b)


@njit(cache=True)
def _write(h, v):
    """Writes through every array of the handle; returns sums read through it."""
    a, p, k, f, b = members(h)
    a[1, 2] = v
    p.rows[3].x = v
    p.ver[2] = np.uint64(k)
    return a.sum(), p.rows["x"].sum()


def _handle():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    rows = np.zeros(5, REC)
    return a, rows, Handle(a, Pair(rows, rows["ver"]), 7, 2.5, True)


def test_the_descriptor_is_the_arrays_addresses_shapes_and_strides_and_the_numbers():
    a, rows, h = _handle()
    ver = rows["ver"]
    assert h.desc[0] == h.nbtype.tag and h.desc[0] != 0
    assert h.desc[1:].tolist() == [
        a.ctypes.data, 3, 4, 32, 8,               # a: address, shape, strides
        rows.ctypes.data, 5, REC.itemsize,        # the named tuple's record array
        ver.ctypes.data, 5, REC.itemsize,         # its strided field view
        7, int(np.float64(2.5).view(np.uint64)), 1]
    assert h.nbtype.members == tuple(numba.typeof(v) for v in h.values)


def test_jitted_code_sees_and_writes_the_very_arrays_bound():
    a, rows, h = _handle()
    got = _probe(h)
    assert got == (a.ctypes.data, 3, 4, 32, 8, rows.ctypes.data, 5,
                   rows["ver"].ctypes.data, REC.itemsize, 7, 2.5, True)
    call = bind(_write, h, 0.0)  # the compiled entry: no typing per call
    assert call(h, 100.0) == (a.sum(), 100.0)
    assert a[1, 2] == 100.0 and rows[3]["x"] == 100.0 and rows["ver"][2] == 7


def test_a_new_state_field_flows_through_without_an_edit():
    """The member types come from numba.typeof of what is bound: a wider named tuple is
    simply another handle type."""
    Wide = namedtuple("Wide", "rows ver extra")
    rows = np.zeros(4, REC)
    h = Handle(Wide(rows, rows["ver"], np.ones(6, np.int32)))
    assert "extra" not in h.nbtype.name  # (types, not names)
    assert h.nbtype.members[0].count == 3
    assert len(h.desc) == 1 + 3 * 3


def test_a_closed_handle_is_refused_before_any_jitted_code_runs():
    a, rows, h = _handle()
    call = bind(_write, h, 0.0)
    h.close()
    with pytest.raises(TypeError, match="closed Handle"):
        call(h, 5.0)
    with pytest.raises(TypeError, match="closed Handle"):
        _write(h, 5.0)
    with pytest.raises(TypeError, match="closed Handle"):
        bind(_write, h, 0.0)
    assert a[1, 2] == 6.0 and rows[3]["x"] == 0.0  # nothing was written


def test_a_handle_of_other_types_is_refused_by_a_compiled_entry():
    a, rows, h = _handle()
    call = bind(_write, h, 0.0)
    other = Handle(a.astype(np.float32), Pair(rows, rows["ver"]), 7, 2.5, True)
    with pytest.raises(TypeError, match="whose members are not"):
        call(other, 5.0)
    with pytest.raises(AttributeError):  # not a handle at all
        call(a, 5.0)
    assert a[1, 2] == 6.0


def test_what_a_handle_cannot_hold_is_refused_when_it_is_made():
    with pytest.raises(TypeError, match="holds arrays"):
        Handle(np.zeros(3), "text")
    with pytest.raises(TypeError, match="holds arrays"):
        Handle((np.zeros(3), [1, 2]))


@pytest.mark.process
def test_a_function_over_a_handle_loads_from_the_disk_cache_in_a_new_process(tmp_path,
                                                                             monkeypatch):
    """A node start must not compile: a new process finds this one's machine code."""
    (tmp_path / "handle_cache_probe.py").write_text(textwrap.dedent("""
        from collections import namedtuple
        import numpy as np
        from numba import njit
        from exposure.shm.handle import Handle, bind, members
        S = namedtuple("S", "a b")

        @njit(cache=True)
        def f(h, k):
            a, s = members(h)
            return a.sum() + s.b[0] + k

        def run():
            h = Handle(np.ones(4), S(np.zeros(2, np.int32), np.full(3, 2.0)))
            assert bind(f, h, 1)(h, 1) == 7.0
            return sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())
    """))
    cache = tmp_path / "cache"
    monkeypatch.setattr(numba.core.config, "CACHE_DIR", str(cache))  # (this module only)
    monkeypatch.syspath_prepend(str(tmp_path))
    import handle_cache_probe

    assert handle_cache_probe.run() == (0, 1)  # compiled here, and saved
    env = {"PYTHONPATH": f"{tmp_path}:{':'.join(sys.path)}", "NUMBA_CACHE_DIR": str(cache),
           "EXPOSURE_NUMBA_CACHE": str(tmp_path / "unused")}
    r = subprocess.run([sys.executable, "-c", "import handle_cache_probe as m; print(*m.run())"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "0"]  # loaded there, nothing compiled
    sys.modules.pop("handle_cache_probe", None)
