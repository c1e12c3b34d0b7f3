"""Capacities of the tally state (SPEC section 1), validated up front.

Every table of the kernel is preallocated from a :class:`Capacities`; nothing grows while
events flow. The defaults are the SPEC's; a config can raise them within the limits that
the record and table layouts can represent (checked here, with the bad value in the
message).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["Capacities", "CapacityError"]


class CapacityError(ValueError):
    """A capacity that the layouts cannot represent."""


# Upper bounds that the layouts impose (inclusive).
_LIMITS = {
    "accounts": 2**24,        # account ids are u4 in the record; tallies are [accounts, ...]
    "instruments": 2**24,     # cell key = account * instruments + instrument must fit i8
    "sectors": 2**16,
    "sources": 2**16 - 1,     # an order slot keeps its source in a u2
    "orders": 2**28,          # live orders; the slot table is the next power of two >= 2x
    "cells": 2**28,           # position cells; cell ids are i4
}


def _pow2_at_least(n: int) -> int:
    p = 1
    while p < n:
        p <<= 1
    return p


@dataclass(frozen=True)
class Capacities:
    """Sizes of every table. Ids must be ``< accounts`` etc.; see SPEC section 1."""

    accounts: int = 4096
    instruments: int = 65536
    sectors: int = 256
    sources: int = 1024
    orders: int = 1_048_576
    cells: int = 1_048_576

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise CapacityError(f"capacity {f.name} must be an integer, got {v!r}")
            lim = _LIMITS[f.name]
            if not 1 <= v <= lim:
                raise CapacityError(f"capacity {f.name}={v} is outside 1..{lim}")

    @property
    def order_slots(self) -> int:
        """Slots of the live-order hash table: load factor at most 1/2 when full."""
        return _pow2_at_least(2 * self.orders)

    @property
    def cell_slots(self) -> int:
        """Slots of the cell index hash table: load factor at most 1/2 when full."""
        return _pow2_at_least(2 * self.cells)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Capacities:
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise CapacityError(f"unknown capacity key(s): {', '.join(sorted(unknown))}")
        return cls(**d)
