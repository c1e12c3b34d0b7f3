"""Older tally layouts, read into the current one (a snapshot taken before an upgrade).

A node keeps its journal only back to its oldest snapshot, so a snapshot that a new
version could not read would leave it unable to recover after an upgrade. This module
knows the tables of every earlier layout version and copies a buffer of one into a fresh
state of the current layout, table by table and field by field:

* version 2 (before issue 13's feed): no change lists of instruments, sectors or cells, no
  ``sec_gseq``, no published instrument, sector, position and counter rows; instruments
  were 80 bytes without ``gseq``. The copy gives every instrument and sector that holds
  anything the snapshot's gseq as the event that last moved it (the true one is not in the
  old layout), so the feed and snapshots list them; ``publish_all`` after recovery writes
  the published rows.
* version 3 (before issue 29's currencies): no ``rate``, ``cur_head`` and ``cprev`` tables, and the
  instrument row's last 8 bytes were padding. Every instrument is in the base currency
  (``currency`` 0, in no currency chain) and every rate is 1.0: the values the state had.
* version 4 (before the feed's position rows stopped carrying pnl and mv): the published
  position row (``cpub``) was 64 bytes without ``sod_qty``, ``sod_price`` and ``flow``;
  ``publish_all`` after recovery writes them from the cells.
"""

from __future__ import annotations

import numpy as np

from exposure.core import types as T
from exposure.core.capacity import Capacities
from exposure.shm.tally_layout import (
    HEADER_DTYPE,
    HEADER_SIZE,
    VERSION,
    LayoutError,
    State,
    table_specs,
)

__all__ = ["OLD_VERSIONS", "migrate"]

_ALIGN = 4096

_INSTRUMENT_V2 = np.dtype(
    {
        "names": ["ref_price", "multiplier", "margin_rate", "beta", "fund_pos", "abs_pos",
                  "open_buy", "open_sell", "head", "sector", "marked", "_pad"],
        "formats": ["<f8", "<f8", "<f8", "<f8", "<i8", "<i8", "<i8", "<i8",
                    "<i4", "<i4", "<i4", "<i4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 68, 72, 76],
        "itemsize": 80,
    },
    align=True,
)


# The published position row of layouts 3 and 4 (64 bytes).
_POSPUB_V4 = np.dtype(
    {
        "names": ["ver", "gseq", "account", "instrument", "pos", "open_buy", "open_sell",
                  "pnl", "mv"],
        "formats": ["<u8", "<u8", "<i4", "<i4", "<i8", "<i8", "<i8", "<f8", "<f8"],
        "offsets": [0, 8, 16, 20, 24, 32, 40, 48, 56],
        "itemsize": 64,
    },
    align=True,
)


def _tables_v2(c: Capacities) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
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
        ("sec", np.dtype("<f8"), (S, 2, 2)),
        ("inst", _INSTRUMENT_V2, (I,)),
        ("cells", T.CELL_DTYPE, (c.cells,)),
        ("cidx", T.CELLIDX_DTYPE, (c.cell_slots,)),
        ("orders", T.ORDER_DTYPE, (c.order_slots,)),
        ("pub", T.PUBROW_DTYPE, (A + 1,)),
    ]


_INSTRUMENT_V3 = np.dtype(
    {
        "names": ["ref_price", "multiplier", "margin_rate", "beta", "fund_pos", "abs_pos",
                  "open_buy", "open_sell", "head", "sector", "marked", "dirty", "gseq",
                  "_pad"],
        "formats": ["<f8", "<f8", "<f8", "<f8", "<i8", "<i8", "<i8", "<i8",
                    "<i4", "<i4", "<i4", "<i4", "<u8", "<u8"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 68, 72, 76, 80, 88],
        "itemsize": 96,
    },
    align=True,
)

# The published instrument row of version 3 (frozen here: the current one may grow).
_INSTPUB_V3 = np.dtype(
    {
        "names": ["ver", "gseq", "fund_pos", "ref_price", "open_buy", "open_sell", "net_mv",
                  "gross_mv", "multiplier", "margin_rate", "beta", "sector", "marked"],
        "formats": ["<u8", "<u8", "<i8", "<f8", "<i8", "<i8", "<f8", "<f8", "<f8", "<f8",
                    "<f8", "<i4", "<i4"],
        "offsets": [0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 92],
        "itemsize": 96,
    },
    align=True,
)


def _tables_v3(c: Capacities) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
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
        ("inst", _INSTRUMENT_V3, (I,)),
        ("cells", T.CELL_DTYPE, (c.cells,)),
        ("cchanged", np.dtype("<i4"), (c.cells,)),
        ("cidx", T.CELLIDX_DTYPE, (c.cell_slots,)),
        ("orders", T.ORDER_DTYPE, (c.order_slots,)),
        ("pub", T.PUBROW_DTYPE, (A + 1,)),
        ("ipub", _INSTPUB_V3, (I,)),
        ("spub", T.SECPUB_DTYPE, (S,)),
        ("cpub", _POSPUB_V4, (c.cells,)),
        ("ctrpub", T.CTRPUB_DTYPE, (1,)),
    ]


def _tables_v4(c: Capacities) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    return [(name, _POSPUB_V4 if name == "cpub" else dt, shape)
            for name, dt, shape in table_specs(c)]


OLD_VERSIONS = {2: _tables_v2, 3: _tables_v3, 4: _tables_v4}
# Tables of the old layouts that are batch scratch: not copied (the current state starts
# them empty).
_SCRATCH = ("acc_stamp", "changed", "pub")


def _views(buf: np.ndarray, specs) -> tuple[dict[str, np.ndarray], int]:
    off = HEADER_SIZE
    out = {}
    for name, dt, shape in specs:
        off = (off + _ALIGN - 1) // _ALIGN * _ALIGN
        out[name] = np.ndarray(shape, dt, buffer=buf, offset=off)
        off += dt.itemsize * int(np.prod(shape))
    return out, (off + _ALIGN - 1) // _ALIGN * _ALIGN


def migrate(old: np.ndarray, st: State, gseq: int) -> None:
    """Copy the tables of ``old`` (a state buffer of an older layout version, with the same
    capacities as ``st``) into ``st`` (a reset state of the current layout). ``gseq``: the
    last event the old state includes. LayoutError if ``old`` is no layout this module
    knows."""
    if len(old) < HEADER_SIZE:
        raise LayoutError(f"a state buffer of {len(old)} bytes has no header")
    h = np.ndarray((), HEADER_DTYPE, buffer=old, offset=0)
    version = int(h["version"])
    if version not in OLD_VERSIONS:
        raise LayoutError(f"tally layout version {version}: this node reads "
                          f"{', '.join(map(str, sorted(OLD_VERSIONS)))} and {VERSION}")
    caps = Capacities(**{k: int(h[k]) for k in Capacities().as_dict()})
    if int(h["accounts"]) != st.acc.shape[0] or int(h["instruments"]) != st.inst.shape[0] \
            or int(h["sectors"]) != st.sec.shape[0] or int(h["cells"]) != st.cells.shape[0]:
        raise LayoutError("the old state was taken with other capacities")
    tables, size = _views(old, OLD_VERSIONS[version](caps))
    if len(old) < size or int(h["size"]) != size:
        raise LayoutError(f"a version-{version} state of {len(old)} bytes, its layout needs "
                          f"{size}")
    for name, src in tables.items():
        if name in _SCRATCH:
            continue
        dst = getattr(st, name)
        if src.dtype == dst.dtype:
            dst[...] = src
        else:  # a row type that grew: field by field
            for f in src.dtype.names:
                if f in dst.dtype.names and not f.startswith("_"):
                    dst[f] = src[f]
    st.ctr[T.C_NCHANGED] = 0
    st.cells["dirty"] = 0
    if version != 2:  # a version-3 state has its own change tags (and no currencies)
        return
    g = np.uint64(gseq)
    inst = st.inst
    moved = (inst["head"] >= 0) | (inst["ref_price"] != 0) | (inst["multiplier"] != 1.0) | (
        inst["margin_rate"] != 1.0) | (inst["beta"] != 1.0) | (inst["sector"] != 0)
    inst["gseq"][moved] = g
    used = np.zeros(st.sec.shape[0], bool)
    used[inst["sector"][moved]] = True
    used |= (st.sec != 0).reshape(st.sec.shape[0], -1).any(axis=1)
    st.sec_gseq[used] = g
