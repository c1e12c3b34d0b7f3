"""The tally segment's seqlocks, jitted: the state's (one version word for a whole batch)
and each published row's (one version word per row).

The state's: the writer (compute, recovery) brackets every batch with :func:`write_begin`
/ :func:`write_end`; a reader copies what it needs between :func:`read_begin` and
:func:`read_end` and retries when the version moved or was odd
(:meth:`exposure.shm.tally_segment.TallySegment.consistent`). The word is the header's
``seqlock`` (:mod:`exposure.shm.tally_layout`), on its own cache line at byte 128.

Ordering argument:
* writer: ``store_release(seq, odd)`` then a full fence, so no data store of the batch can
  become visible (or be compiled) before the odd version; the batch's stores; then
  ``store_release(seq, even)``, after all of them.
* reader: ``load_acquire(seq)`` before the copy, so the copy cannot read older data than
  that version; a full fence, then the second ``load_acquire(seq)``, so the copy's loads
  complete before the version is re-read. Equal and even: nothing was written in between.

A published row's (:mod:`exposure.engine.publish` writes them): :func:`read_row` and
:func:`read_rows` copy rows each under its own version, for jitted readers (the fan-out's
refresh, the snapshot server). Python readers (desks, ``exposure dump``) use the numpy
copy :func:`exposure.shm.tally_segment.copy_rows`, which loads no compiler.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.shm.intrinsics import fence_seq_cst, load_acquire, store_release
from exposure.shm.tally_layout import HEADER_DTYPE

__all__ = ["write_begin", "write_end", "read_begin", "read_end", "read_row", "read_rows"]

_SEQ_WORD = HEADER_DTYPE.fields["seqlock"][1] // 8


@njit(cache=True, _nrt=False)
def write_begin(words):
    v = np.uint64(words[_SEQ_WORD] + np.uint64(1))
    store_release(words, _SEQ_WORD, v)
    fence_seq_cst()


@njit(cache=True, _nrt=False)
def write_end(words):
    store_release(words, _SEQ_WORD, np.uint64(words[_SEQ_WORD] + np.uint64(1)))


@njit(cache=True, _nrt=False)
def read_begin(words):
    return load_acquire(words, _SEQ_WORD)


@njit(cache=True, _nrt=False)
def read_end(words):
    fence_seq_cst()
    return load_acquire(words, _SEQ_WORD)


# ----------------------------------------------------------------------------- row seqlocks
@njit(cache=True, _nrt=False)
def read_row(pub, ver, r, out):
    """Copy published row ``r`` into ``out[0]`` consistently; returns the attempts used."""
    tries = 0
    while True:
        tries += 1
        v1 = load_acquire(ver, r)
        if v1 & np.uint64(1) == 0:
            out[0] = pub[r]
            fence_seq_cst()
            if load_acquire(ver, r) == v1:
                return tries


@njit(cache=True, _nrt=False)
def read_rows(pub, ver, out):
    """Copy every published row consistently (each row on its own); returns total tries."""
    tries = 0
    for r in range(pub.shape[0]):
        tries += read_row(pub, ver, r, out[r:r + 1])
    return tries
