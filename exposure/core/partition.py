"""The partition map of a cluster (shared/SPEC.md section 5): which partition owns each
account and each source, where each event goes, and what a partition may apply.

A map is two small owner tables, ``acc_owner[account]`` and ``src_owner[source]`` (the
partition's index, or -1 for an id the map leaves out). The map is numpy only (the
operator's tools read it without loading numba); the rule is the jitted functions of
:mod:`exposure.core.routing`, which everything that needs it uses, so the router at the edge
(``route``), a partition's ingest (``stages.ingest_scan``) and ``exposure replay
--partition`` (``mark``) cannot disagree:

============================================  =====================================
event                                         goes to
============================================  =====================================
new, replace, cancel, done, fill, bust        the partition of its source
position, limit                               the partition of its account
mark, instrument, fx, roll                    every partition (:data:`ALL`)
no valid type (or an id the map leaves out)   the first partition, which rejects it
============================================  =====================================

A partition *owns* an event when it owns the event's source (orders) and account (new,
fill, bust, position, limit); marks, instruments, fx and rolls are everyone's, and an event
without a valid type is left to the kernel's ``bad_type``. An event a partition does not
own is marked ``wrong_partition`` in its ``reject`` byte; the kernel reports that reason
after rules 1-3 (so an out-of-range id is still ``out_of_range``) and applies nothing.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PartitionMap", "MapError", "ALL", "read_toml"]

ALL = -1  # routing.route(): the event goes to every partition (mark, instrument, fx, roll)
MAX_PARTITIONS = 256


class MapError(ValueError):
    """A partition map that does not give every id at most one partition."""


@dataclass(frozen=True, eq=False)  # (numpy tables: compared by identity)
class PartitionMap:
    """Owner tables of a cluster: ``names[k]`` owns the accounts ``a`` with
    ``acc_owner[a] == k`` and the sources ``s`` with ``src_owner[s] == k``."""

    names: tuple[str, ...]
    acc_owner: np.ndarray  # int16 per account id; -1: no partition
    src_owner: np.ndarray  # int16 per source id; -1: no partition

    @classmethod
    def from_ranges(cls, parts: list[tuple[str, list, list]], accounts: int,
                    sources: int) -> PartitionMap:
        """``parts``: (name, account ranges, source ranges) per partition, in order; a
        range is ``[lo, hi]`` (inclusive) or a single id. Ids up to ``accounts`` and
        ``sources`` (the capacities); an id in two partitions is an error."""
        if not 1 <= len(parts) <= MAX_PARTITIONS:
            raise MapError(f"{len(parts)} partitions: 1..{MAX_PARTITIONS}")
        acc = np.full(accounts, -1, np.int16)
        src = np.full(sources, -1, np.int16)
        names = []
        for k, (name, accs, srcs) in enumerate(parts):
            if name in names:
                raise MapError(f"partition name {name!r} is used twice")
            names.append(name)
            for what, table, ranges in (("accounts", acc, accs), ("sources", src, srcs)):
                for lo, hi in _ranges(ranges, f"{name}.{what}", len(table)):
                    taken = table[lo:hi + 1]
                    if (taken >= 0).any():
                        x = lo + int(np.argmax(taken >= 0))
                        raise MapError(f"{name}.{what}: {what[:-1]} {x} is already in "
                                       f"partition {names[table[x]]!r}")
                    taken[:] = k
        return cls(tuple(names), acc, src)

    @classmethod
    def load(cls, path: str | Path) -> PartitionMap:
        """The map of a cluster file (``exposure.cluster.topology``): its ``[cluster]`` accounts
        and sources (the ids the map covers; SPEC section 1's capacities by default) and
        each ``[[partition]]``'s name, accounts and sources."""
        doc = read_toml(path)
        top = doc.get("cluster", {})
        parts = doc.get("partition")
        if not isinstance(top, dict):
            raise MapError(f"{path}: [cluster] must be a table")
        if not isinstance(parts, list) or not parts:
            raise MapError(f"{path}: no [[partition]] tables")
        caps = {}
        for key, default in (("accounts", 4096), ("sources", 1024)):
            v = top.get(key, default)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 24:
                raise MapError(f"{path}: cluster.{key} = {v!r}: 1..{1 << 24}")
            caps[key] = v
        rows = []
        for k, p in enumerate(parts):
            if not isinstance(p, dict) or not isinstance(p.get("name"), str) or not p["name"]:
                raise MapError(f"{path}: partition[{k}] needs a name")
            rows.append((p["name"], p.get("accounts", []), p.get("sources", [])))
        try:
            return cls.from_ranges(rows, caps["accounts"], caps["sources"])
        except MapError as e:
            raise MapError(f"{path}: {e}") from None

    @property
    def partitions(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise MapError(f"no partition {name!r} (partitions: "
                           f"{', '.join(self.names)})") from None

    def describe(self, k: int) -> str:
        """Partition ``k``'s ids as ranges, e.g. ``accounts 0-2047, sources 0-7``."""
        return (f"accounts {_spans(self.acc_owner == k)}, "
                f"sources {_spans(self.src_owner == k)}")


def read_toml(path: str | Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise MapError(f"cannot read {str(path)!r}: "
                       f"{getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise MapError(f"{str(path)!r} is not valid TOML: {e}") from None


def _ranges(v, where: str, cap: int) -> list[tuple[int, int]]:
    if not isinstance(v, list):
        raise MapError(f"{where} = {v!r}: a list of ids and [lo, hi] ranges")
    out = []
    for r in v:
        if isinstance(r, int) and not isinstance(r, bool):
            lo = hi = r
        elif (isinstance(r, list) and len(r) == 2
              and all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
            lo, hi = r
        else:
            raise MapError(f"{where}: {r!r} is neither an id nor a [lo, hi] range")
        if not 0 <= lo <= hi < cap:
            raise MapError(f"{where}: {r!r} is not within 0..{cap - 1} (the capacity)")
        out.append((lo, hi))
    return out


def _spans(mask: np.ndarray) -> str:
    ids = np.flatnonzero(mask)
    if not len(ids):
        return "none"
    cuts = np.flatnonzero(np.diff(ids) != 1) + 1
    return ", ".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}"
                     for g in np.split(ids, cuts))
