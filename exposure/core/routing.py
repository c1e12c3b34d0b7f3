"""The rule of a cluster's partition map (shared/SPEC.md section 5), jitted: where each
event goes (:func:`route`, :func:`split`) and what a partition may apply (:func:`owns`,
:func:`mark`). The map itself (its owner tables, the cluster file) is
:mod:`exposure.core.partition`, numpy only; the table of which event goes where is there.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.core.partition import ALL, PartitionMap
from exposure.core.types import (
    R_BAD_FIELD,
    R_WRONG_PARTITION,
    T_BUST,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_FX,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_NEW,
    T_POSITION,
    T_REPLACE,
    T_ROLL,
)

__all__ = ["ALL", "route", "split", "mark", "owns"]


# ----------------------------------------------------------------------------- the rule
@njit(inline="always", cache=True, _nrt=False)
def _owner(table, x):
    return np.int64(table[x]) if x < table.shape[0] else np.int64(-1)


@njit(cache=True, _nrt=False)
def owns(t, src, acct, me, acc_owner, src_owner):
    """Whether partition ``me`` owns an event of type ``t`` with these source and account
    ids (``me`` < 0: not a cluster, everything is owned)."""
    if me < 0:
        return True
    if t == T_NEW or t == T_FILL or t == T_BUST:
        return _owner(src_owner, src) == me and _owner(acc_owner, acct) == me
    if t == T_REPLACE or t == T_CANCEL or t == T_DONE:
        return _owner(src_owner, src) == me
    if t == T_POSITION or t == T_LIMIT:
        return _owner(acc_owner, acct) == me
    return True  # mark, instrument, fx, roll: everyone's; no valid type: the kernel's bad_type


@njit(cache=True, _nrt=False)
def _dest(t, src, acct, acc_owner, src_owner):
    if t == T_MARK or t == T_INSTRUMENT or t == T_ROLL or t == T_FX:
        return np.int64(ALL)
    if (t == T_NEW or t == T_FILL or t == T_REPLACE or t == T_CANCEL or t == T_DONE
            or t == T_BUST):
        k = _owner(src_owner, src)
    elif t == T_POSITION or t == T_LIMIT:
        k = _owner(acc_owner, acct)
    else:
        k = np.int64(0)  # no valid type: the first partition rejects it as bad_type
    return k if k >= 0 else np.int64(0)


@njit(cache=True, _nrt=False)
def _route(recs, acc_owner, src_owner, out):
    for k in range(recs.shape[0]):
        r = recs[k]
        out[k] = _dest(np.int64(r.type), np.int64(r.source), np.int64(r.account),
                       acc_owner, src_owner)


def route(recs: np.ndarray, pmap: PartitionMap) -> np.ndarray:
    """Each record's partition (int16; :data:`ALL` for mark, instrument, fx and roll)."""
    out = np.empty(len(recs), np.int16)
    _route(recs, pmap.acc_owner, pmap.src_owner, out)
    return out


def split(recs: np.ndarray, pmap: PartitionMap) -> list[np.ndarray]:
    """The sub-stream of each partition, in stream order (mark, instrument, fx and roll
    in all)."""
    dest = route(recs, pmap)
    return [recs[(dest == k) | (dest == ALL)] for k in range(pmap.partitions)]


_WRONG = np.uint8(R_WRONG_PARTITION)
_BAD = np.uint8(R_BAD_FIELD)


@njit(cache=True, _nrt=False)
def _mark(recs, me, acc_owner, src_owner):
    n = 0
    for k in range(recs.shape[0]):
        r = recs[k]
        if r.reject == _WRONG:  # only the partition decides this one
            r.reject = _BAD
        if r.reject == 0 and not owns(np.int64(r.type), np.int64(r.source),
                                      np.int64(r.account), me, acc_owner, src_owner):
            r.reject = _WRONG
            n += 1
    return n


def mark(recs: np.ndarray, pmap: PartitionMap, me: int) -> int:
    """Mark in place, as partition ``me``'s ingest does, the records it does not own
    (``reject`` = wrong_partition); return how many. A record that claims the reason
    itself gets bad_field."""
    return int(_mark(recs, np.int64(me), pmap.acc_owner, pmap.src_owner))
