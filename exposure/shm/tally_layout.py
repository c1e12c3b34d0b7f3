"""Layout of the tally state: one contiguous buffer holding every table of the kernel.

The kernel's whole state lives in one flat byte buffer so that the same bytes can be a
private numpy allocation (offline replay), a POSIX shared-memory segment (the live node,
read by desks), a snapshot file or a replication payload. This module is the only place
that knows where each table sits.

::

    +---------------------------+ 0
    | header (256 bytes)        |  magic, version, layout size, capacities, seqlock words
    +---------------------------+ 256 (every table starts on a 4 KiB boundary)
    | ctr      i8[32]           |  counters (types.C_*)
    | fund     f8[10, 2]        |  fund tallies: (value, compensation) pairs
    | acc      f8[A, 8, 2]      |  account tallies
    | acc_lim  f8[A, 4]         |  account limits (0 = off)
    | acc_live i8[A]            |  live orders per account
    | acc_gseq u8[A]            |  gseq of the last event that moved the account
    | acc_stamp i8[A]           |  batch stamp (changed-account dedup)
    | changed  i4[A]            |  accounts moved by the last batch
    | ichanged i4[I]            |  instruments moved by the last batch (inst.dirty = 1)
    | sec      f8[S, 2, 2]      |  sector net_mv / gross_mv pairs
    | sec_gseq u8[S]            |  gseq of the last event that moved the sector
    | sec_dirty i4[S]           |  1 while the sector is listed in schanged
    | schanged i4[S]            |  sectors moved by the last batch
    | inst     INSTRUMENT[I]    |  reference data + fund aggregates per instrument
    | rate     f8[256]          |  SPEC 7: base-currency value of one unit of each currency
    | cur_head i4[256]          |  first instrument of each currency's chain (inst.cnext)
    | cprev    i4[I]            |  the instrument before each one in its currency's chain
    | cells    CELL[C]          |  position cells
    | cchanged i4[C]            |  cells moved by the last batch (cell.dirty = 1)
    | cidx     CELLIDX[CS]      |  cell index: (key = account * I + instrument, cell id)
    | orders   ORDER[OS]        |  live-order open-addressing table
    | pub      PUBROW[A + 1]    |  published account rows + the fund row (row seqlocks)
    | ipub     INSTPUB[I]       |  published instrument rows
    | spub     SECPUB[S]        |  published sector rows
    | cpub     POSPUB[C]        |  published position rows (one per cell)
    | ctrpub   CTRPUB[1]        |  published counters
    +---------------------------+ size

The ``pub`` tables are what desks read without waiting (exposure.engine.publish writes them
after every batch, each row under its own version); everything above them is the kernel's
working state, consistent only between batches (the header's seqlock).

A = accounts, I = instruments, S = sectors, C = cells, CS = cell slots (pow2 >= 2C),
OS = order slots (pow2 >= 2 x live orders).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from exposure.core import types as T
from exposure.core.capacity import Capacities

__all__ = ["TallyLayout", "State", "LayoutError", "MAGIC", "VERSION", "HEADER_SIZE", "table_specs"]

MAGIC = 0x5941_4C4C_4154_5845  # "EXPTALLY" little-endian
VERSION = 5  # 4: currencies (SPEC section 7): rate, cur_head, cprev, inst.currency/cnext
# 5: the published position row (cpub) carries sod_qty, sod_price, flow (96 bytes)
HEADER_SIZE = 256
_ALIGN = 4096

HEADER_DTYPE = np.dtype(
    {
        "names": ["magic", "version", "size", "accounts", "instruments", "sectors", "sources",
                  "orders", "cells", "order_slots", "cell_slots", "seqlock", "writer_pid",
                  "writer_start"],
        "formats": ["<u8", "<u8", "<u8", "<i8", "<i8", "<i8", "<i8",
                    "<i8", "<i8", "<i8", "<i8", "<u8", "<i8", "<f8"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 128, 192, 200],
        "itemsize": HEADER_SIZE,
    }
)

State = namedtuple(
    "State",
    ["ctr", "fund", "acc", "acc_lim", "acc_live", "acc_gseq", "acc_stamp", "changed",
     "ichanged", "sec", "sec_gseq", "sec_dirty", "schanged", "inst", "rate", "cur_head",
     "cprev", "cells", "cchanged", "cidx", "orders", "pub", "ipub", "spub", "cpub", "ctrpub"],
)
State.__doc__ = "Numpy views of every table of the tally state (see the module diagram)."


class LayoutError(ValueError):
    """A buffer whose header does not match the expected layout."""


def _tables(c: Capacities) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    A, I, S = c.accounts, c.instruments, c.sectors
    return [
        ("ctr", np.dtype("<i8"), (T.N_COUNTERS,)),
        ("fund", np.dtype("<f8"), (T.N_FUND_TALLIES, 2)),
        ("acc", np.dtype("<f8"), (A, T.N_CELL_TALLIES, 2)),
        ("acc_lim", np.dtype("<f8"), (A, 4)),
        ("acc_live", np.dtype("<i8"), (A,)),
        ("acc_gseq", np.dtype("<u8"), (A,)),
        ("acc_stamp", np.dtype("<i8"), (A,)),
        ("changed", np.dtype("<i4"), (A,)),
        ("ichanged", np.dtype("<i4"), (I,)),
        ("sec", np.dtype("<f8"), (S, 2, 2)),
        ("sec_gseq", np.dtype("<u8"), (S,)),
        ("sec_dirty", np.dtype("<i4"), (S,)),
        ("schanged", np.dtype("<i4"), (S,)),
        ("inst", T.INSTRUMENT_DTYPE, (I,)),
        ("rate", np.dtype("<f8"), (T.N_CURRENCIES,)),
        ("cur_head", np.dtype("<i4"), (T.N_CURRENCIES,)),
        ("cprev", np.dtype("<i4"), (I,)),
        ("cells", T.CELL_DTYPE, (c.cells,)),
        ("cchanged", np.dtype("<i4"), (c.cells,)),
        ("cidx", T.CELLIDX_DTYPE, (c.cell_slots,)),
        ("orders", T.ORDER_DTYPE, (c.order_slots,)),
        ("pub", T.PUBROW_DTYPE, (A + 1,)),
        ("ipub", T.INSTPUB_DTYPE, (I,)),
        ("spub", T.SECPUB_DTYPE, (S,)),
        ("cpub", T.POSPUB_DTYPE, (c.cells,)),
        ("ctrpub", T.CTRPUB_DTYPE, (1,)),
    ]


def table_specs(c: Capacities) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    """The current layout's tables (name, dtype, shape), in order, for capacities ``c``."""
    return _tables(c)


class TallyLayout:
    """Offsets of every table for one set of capacities."""

    def __init__(self, caps: Capacities | None = None):
        self.caps = caps or Capacities()
        self.offsets: dict[str, int] = {}
        self._specs = _tables(self.caps)
        off = HEADER_SIZE
        for name, dt, shape in self._specs:
            off = (off + _ALIGN - 1) // _ALIGN * _ALIGN
            self.offsets[name] = off
            off += dt.itemsize * int(np.prod(shape))
        self.size = (off + _ALIGN - 1) // _ALIGN * _ALIGN

    # ------------------------------------------------------------------ views
    def header(self, buf) -> np.ndarray:
        """The header record (a 0-d structured view) of ``buf``."""
        return np.ndarray((), HEADER_DTYPE, buffer=buf, offset=0)

    def views(self, buf, check: bool = True) -> State:
        """Numpy views of every table over ``buf`` (no copy)."""
        if len(memoryview(buf).cast("B")) < self.size:
            raise LayoutError(f"buffer of {len(memoryview(buf).cast('B'))} bytes is smaller "
                              f"than the layout's {self.size}")
        if check:
            self.check(buf)
        arrays = {
            name: np.ndarray(shape, dt, buffer=buf, offset=self.offsets[name])
            for name, dt, shape in self._specs
        }
        return State(**arrays)

    # ------------------------------------------------------------------ init / check
    def init(self, buf) -> State:
        """Write a fresh header and the empty state into ``buf`` (assumed zero-filled)."""
        h = self.header(buf)
        h["magic"] = MAGIC
        h["version"] = VERSION
        h["size"] = self.size
        for k, v in self.caps.as_dict().items():
            h[k] = v
        h["order_slots"] = self.caps.order_slots
        h["cell_slots"] = self.caps.cell_slots
        st = self.views(buf)
        st.ctr[T.C_MAX_ORDERS] = self.caps.orders
        st.ctr[T.C_MAX_SOURCES] = self.caps.sources
        reset(st, zero=False)
        return st

    def check(self, buf) -> None:
        """Raise :class:`LayoutError` naming the first header field that does not match."""
        h = self.header(buf)
        if int(h["magic"]) != MAGIC:
            raise LayoutError(f"bad magic {int(h['magic']):#x} (expected {MAGIC:#x}): "
                              "not a tally state")
        if int(h["version"]) != VERSION:
            raise LayoutError(f"tally layout version {int(h['version'])}, expected {VERSION}")
        for k, v in self.caps.as_dict().items():
            if int(h[k]) != v:
                raise LayoutError(f"capacity {k}={int(h[k])} in the buffer, "
                                  f"{v} in the config")
        if int(h["size"]) != self.size:
            raise LayoutError(f"layout size {int(h['size'])} in the buffer, expected {self.size}")

    @staticmethod
    def caps_of(buf) -> Capacities:
        """Read the capacities a buffer was made with (to attach without a config)."""
        h = np.ndarray((), HEADER_DTYPE, buffer=buf, offset=0)
        if int(h["magic"]) != MAGIC:
            raise LayoutError(f"bad magic {int(h['magic']):#x}: not a tally state")
        return Capacities(**{k: int(h[k]) for k in Capacities().as_dict()})


def reset(st: State, zero: bool = True, keep: tuple[str, ...] = ()) -> None:
    """Put the empty-state values into every table (markers, reference-data defaults).

    ``zero=False`` skips clearing a buffer that is known to be zero-filled (fresh shared
    memory or ``np.zeros``), which keeps that step from touching every page twice. Tables
    named in ``keep`` are left alone (a restarting node keeps its published rows, which
    desks may be reading, until recovery publishes new ones).
    """
    caps_orders, caps_sources = int(st.ctr[T.C_MAX_ORDERS]), int(st.ctr[T.C_MAX_SOURCES])
    if zero:
        for name, a in zip(st._fields, st, strict=True):
            if name not in keep:
                a[...] = 0
    st.changed[:] = -1
    st.cidx["key"] = -1
    st.cidx["id"] = -1
    st.orders["cell"] = -1
    st.inst["multiplier"] = 1.0
    st.inst["margin_rate"] = 1.0
    st.inst["beta"] = 1.0
    st.inst["head"] = -1
    st.inst["cnext"] = -1
    st.rate[:] = 1.0       # SPEC section 7: a currency's rate before its first fx
    st.cur_head[:] = -1
    st.cprev[:] = -1
    st.cells["next"] = -1
    if zero:
        st.ctr[T.C_MAX_ORDERS] = caps_orders
        st.ctr[T.C_MAX_SOURCES] = caps_sources


def prefault(buf) -> None:
    """Touch every page of ``buf`` so that no page fault lands on the hot path."""
    b = np.ndarray(len(memoryview(buf).cast("B")), np.uint8, buffer=buf)
    b[::4096] = b[::4096]


def allocate(caps: Capacities | None = None) -> tuple[np.ndarray, State]:
    """A private, initialised, prefaulted state buffer (offline replay, tests, benches)."""
    lay = TallyLayout(caps)
    buf = np.zeros(lay.size, dtype=np.uint8)
    prefault(buf)
    return buf, lay.init(buf)
