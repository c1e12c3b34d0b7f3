"""The intrinsics' machine code (exposure.shm.intrinsics): a prefetch fetches every cache
line of the row it names, a release fence costs no instruction on x86-64 where a full
fence does, and neither changes what the code computes."""

import platform

import numba
import numpy as np
import pytest
from numba import njit

from exposure.core.types import CELL_DTYPE, INSTPUB_DTYPE, POSPUB_DTYPE
from exposure.shm.intrinsics import _line_offsets, fence_release, fence_seq_cst, prefetch

pytestmark = pytest.mark.timeout(120)

x86 = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                         reason="reads x86-64 instructions")


@njit
def _fetch(rows, i):
    prefetch(rows, i)


def _row_writer(fence):
    """A seqlock row write (odd version, the value, even version) with ``fence`` between
    the odd version and the value."""
    @njit
    def write(ver, vals, i, x):
        ver[i] += np.uint64(1)
        fence()
        vals[i] = x
        ver[i] += np.uint64(1)

    return write


def _asm(fn, *args) -> str:
    fn(*args)
    return fn.inspect_asm(tuple(numba.typeof(a) for a in args))


def test_the_offsets_reach_every_line_a_row_can_straddle():
    for size in (8, 16, 32, 64, 96, 112, 128, 160):
        offs = _line_offsets(size)
        for start in range(64):  # wherever in a line the row begins
            lines = {(start + b) // 64 for b in range(size)}
            assert {(start + o) // 64 for o in offs} == lines, (size, start)


@x86
@pytest.mark.parametrize("dtype", [POSPUB_DTYPE, INSTPUB_DTYPE, CELL_DTYPE])
def test_a_prefetch_of_a_row_fetches_each_of_its_lines(dtype):
    rows = np.zeros(16, dtype)
    asm = _asm(_fetch, rows, 3)
    assert asm.count("prefetcht0") == len(_line_offsets(dtype.itemsize)), asm
    # of an N-d array: the first line of the row (its callers' tables are 1-d records)
    assert _asm(njit(lambda a, i: prefetch(a, i)), np.zeros((8, 8, 2)), 1).count(
        "prefetcht0") == 1


@x86
def test_a_release_fence_is_no_instruction_and_a_full_fence_is_one():
    ver, vals = np.zeros(4, np.uint64), np.zeros(4)
    assert "mfence" not in _asm(_row_writer(fence_release), ver, vals, 1, 2.5)
    full = _asm(_row_writer(fence_seq_cst), ver, vals, 1, 2.5)
    assert "mfence" in full or "lock" in full
    assert ver[1] == 4 and vals[1] == 2.5  # both ran once: two versions each
