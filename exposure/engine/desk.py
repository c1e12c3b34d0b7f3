"""Read-only access to a running node's tallies, for desks: every read is wait-free.

The node's tally segment is mapped ``PROT_READ``: a desk cannot change it (a write through
numpy raises; a write through a raw pointer faults).

Example::

    from exposure.engine.desk import Desk

    with Desk("exposure") as desk:            # the node's name (config [node] name)
        fund = desk.fund()                    # dict: gross, net, crossing, ...
        rows = desk.accounts()                # numpy structured array, one row per account
        worst = rows[np.argmax(rows["gross"])]
        ins = desk.instruments()              # ref data and fund aggregates per instrument
        secs = desk.sectors()                 # net_mv / gross_mv per sector
        book = desk.positions(3)              # account 3's position rows
        counts = desk.counts()                # the SPEC's counts (accepted, rejects, ...)
        doc = desk.document()                 # the SPEC document (what `exposure dump` prints)

What a desk reads are the **published tables** of the segment (:mod:`exposure.engine.publish`
writes them after every batch): one row per account plus the fund's (``pub``), per
instrument (``ipub``), per sector (``spub``), per position cell (``cpub``) and the
counters (``ctrpub``). Each row sits under its own version word (odd while the compute
stage writes it, for the few nanoseconds of one row's stores); a reader copies a row
between two acquire loads of that word and retries the row if it moved. So a read never
waits for a batch, never takes the state's seqlock, and works on a node that never pauses.

Each row is consistent on its own, as of the batch that last published it (its ``gseq``
says which event); a set of rows (say, :meth:`Desk.document`) is not one atomic snapshot
of the whole book: rows read a moment apart may stand a batch or two apart.
:meth:`Desk.document` reads the counters first, then the rows, so it lists every position
cell that the counters count.

A row whose ``gseq`` is 0 never moved and is left out.

:meth:`Desk.over` reads the published tables of any state (a private one: tests, tools).

``Desk.names`` is the node's reference data (:class:`exposure.core.refdata.RefData`: symbols
and account names from its ``[reference]`` files) when the desk was opened with them
(``exposure.desk.open_desk(config)``), else None. ``Desk.currencies`` is the node's
``[currencies]`` table (:class:`exposure.core.currency.Currencies`; the default, USD alone,
unless opened with one): ``desk.currencies.base`` labels every money figure (SPEC section 7:
they are in the base currency), ``desk.currencies.code(row["currency"])`` an instrument's
own currency, in which its ``ref_price`` is quoted; its ``rate`` converts it.
"""

from __future__ import annotations

import numpy as np

from exposure.core.currency import Currencies
from exposure.core.refdata import RefData
from exposure.core.types import (
    C_ACCEPTED,
    C_BUSTS,
    C_CELLS,
    C_LATE_FILLS,
    C_REJECTED,
    C_REJECTS,
    C_ROLLS,
    INSTPUB_DTYPE,
    POSPUB_DTYPE,
    PUBROW_DTYPE,
    REASONS,
    SECPUB_DTYPE,
)
from exposure.shm.tally_layout import State
from exposure.shm.tally_segment import TallySegment, copy_rows

__all__ = ["Desk", "ACCOUNT_ROW", "INSTRUMENT_ROW", "SECTOR_ROW", "POSITION_ROW"]


def _with_id(idname: str, src: np.dtype, fields: list[str]) -> np.dtype:
    return np.dtype([(idname, "<i8")] + [(f, src.fields[f][0]) for f in fields])


# What :meth:`Desk.accounts` returns: the published row (types.PUBROW_DTYPE) plus its id.
_ROW_FIELDS = ["gseq", "long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
               "worst_gross", "margin", "beta_net", "pnl", "live_orders", "breach"]
ACCOUNT_ROW = _with_id("account", PUBROW_DTYPE, _ROW_FIELDS)
# :meth:`Desk.instruments`: the instrument id and its published row (types.INSTPUB_DTYPE).
_INST_FIELDS = [f for f in INSTPUB_DTYPE.names if f != "ver" and not f.startswith("_")]
INSTRUMENT_ROW = _with_id("instrument", INSTPUB_DTYPE, _INST_FIELDS)
# :meth:`Desk.sectors`.
_SEC_FIELDS = ["gseq", "net_mv", "gross_mv"]
SECTOR_ROW = _with_id("sector", SECPUB_DTYPE, _SEC_FIELDS)
# :meth:`Desk.positions`: one account's position rows (types.POSPUB_DTYPE).
_POS_FIELDS = ["gseq", "pos", "open_buy", "open_sell", "pnl", "mv"]
POSITION_ROW = _with_id("instrument", POSPUB_DTYPE, _POS_FIELDS)

_ACC_DOC = ["long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
            "worst_gross", "margin", "beta_net", "pnl"]


# ----------------------------------------------------------------------------- row seqlocks
def _copy(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Rows ``table[idx]``, each consistent on its own (its version even and unchanged
    across the copy: :func:`exposure.shm.tally_segment.copy_rows`, numpy only)."""
    return copy_rows(table, idx)


def _moved(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Consistent copies of the rows that ever moved, and their indices. The prefilter on
    ``gseq`` is a plain read (a row that starts moving during it is read next time); the
    copies are checked again."""
    idx = np.flatnonzero(table["gseq"] != 0)
    rows = _copy(table, idx)
    keep = rows["gseq"] != 0
    return rows[keep], idx[keep]


def _pick(idname: str, ids: np.ndarray, rows: np.ndarray, dt: np.dtype) -> np.ndarray:
    out = np.zeros(len(ids), dt)
    out[idname] = ids
    for f in dt.names[1:]:
        out[f] = rows[f]
    return out


def _records(arr: np.ndarray, names: list[str]) -> list[dict]:
    cols = [arr[n].tolist() for n in names]
    return [dict(zip(names, row, strict=True)) for row in zip(*cols, strict=True)]


class Desk:
    """A read-only view of one node's tallies."""

    segment: TallySegment | None
    state: State
    names: RefData | None  # instruments.csv / accounts.csv names ([reference]), or None

    def __init__(self, node: str = "exposure", *, names: RefData | None = None,
                 currencies: Currencies | None = None):
        self.segment = TallySegment.attach(f"/exposure.{node}.tally", writable=False)
        self.state = self.segment.state
        self.names = names
        self.currencies = currencies or (names.currencies if names is not None
                                         else Currencies())

    @classmethod
    def over(cls, state: State) -> Desk:
        """A desk over the published tables of ``state`` (any tally state: a private one
        of :func:`exposure.shm.tally_layout.allocate`, a mapped segment's); closing it
        closes nothing."""
        desk = cls.__new__(cls)
        desk.segment = None
        desk.state = state
        desk.names = None
        desk.currencies = Currencies()
        return desk

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None
        self.state = None  # type: ignore[assignment]

    def __enter__(self) -> Desk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ accounts, fund
    def _rows(self) -> np.ndarray:
        return copy_rows(self.state.pub)

    def accounts(self) -> np.ndarray:
        """Every account the day has touched, each row consistent on its own (as of the
        batch that last moved it; ``gseq`` says which event that was)."""
        rows = self._rows()[:-1]
        ids = np.flatnonzero(rows["gseq"] != 0)
        out = np.zeros(len(ids), ACCOUNT_ROW)
        out["account"] = ids
        for f in _ROW_FIELDS:
            out[f] = rows[f][ids]
        return out

    def fund(self) -> dict:
        """The fund row (SPEC section 3) and ``gseq``, the last event it includes."""
        st = self.state
        r = copy_rows(st.pub, np.array([len(st.pub) - 1]))[0]
        row = {f: float(r[f]) for f in ("long_mv", "short_mv", "gross", "net", "open_buy_mv",
                                        "open_sell_mv", "worst_gross", "margin", "beta_net",
                                        "pnl")}
        row["live_orders"] = int(r["live_orders"])
        row["net_long_mv"] = float(r["net_long_mv"])
        row["net_short_mv"] = float(r["net_short_mv"])
        row["crossing"] = row["gross"] - (row["net_long_mv"] + row["net_short_mv"])
        row["gseq"] = int(r["gseq"])
        return row

    # ------------------------------------------------------------------ the other tables
    def instruments(self) -> np.ndarray:
        """Every instrument whose row ever moved (reference data, ``ref_price`` in its own
        currency, ``fund_pos``, open quantities, ``net_mv``/``gross_mv`` = fund_pos and the
        sum of abs(pos), times ref_price x multiplier x rate: in the base currency;
        ``currency`` and ``rate``, SPEC section 7), sorted by id; each row consistent on
        its own, as of the event ``gseq``."""
        rows, ids = _moved(self.state.ipub)
        return _pick("instrument", ids, rows, INSTRUMENT_ROW)

    def sectors(self) -> np.ndarray:
        """Every sector whose row ever moved: ``net_mv``, ``gross_mv`` (SPEC section 3)."""
        rows, ids = _moved(self.state.spub)
        return _pick("sector", ids, rows, SECTOR_ROW)

    def _counters(self) -> np.ndarray:
        """The published counters row (types.CTRPUB_DTYPE)."""
        return _copy(self.state.ctrpub, np.zeros(1, np.int64))[0]

    def counters(self) -> np.ndarray:
        """The node's counters (``types.C_*``) as of the end of the last published batch."""
        return self._counters()["ctr"].copy()

    def _cells(self, ncells: int) -> np.ndarray:
        """Consistent copies of the position rows of cells ``0..ncells-1`` that moved."""
        rows = _copy(self.state.cpub, np.arange(ncells, dtype=np.int64))
        return rows[rows["gseq"] != 0]

    def positions(self, account: int) -> np.ndarray:
        """The account's position rows (every instrument it held or ordered since the last
        ``roll``, or holds), sorted by instrument; ``gseq`` is the last event of the batch
        that published the row."""
        cpub = self.state.cpub
        n = min(int(self._counters()["ctr"][C_CELLS]), len(cpub))
        idx = np.flatnonzero(cpub["account"][:n] == account)
        rows = _copy(cpub, idx)
        rows = rows[(rows["gseq"] != 0) & (rows["account"] == account)]
        rows = rows[np.argsort(rows["instrument"], kind="stable")]
        return _pick("instrument", rows["instrument"].astype(np.int64), rows, POSITION_ROW)

    def counts(self) -> dict:
        """The SPEC document's ``counts`` (accepted, rejected, late_fills and the rejects
        by reason), as of the end of the last published batch."""
        return _counts(self._counters()["ctr"])

    # ------------------------------------------------------------------ the document
    def document(self) -> dict:
        """The SPEC tally document (what ``exposure dump`` prints) from the published rows:
        each row as of the batch that last published it; never waits for the node."""
        ctr = self._counters()["ctr"]
        n = min(int(ctr[C_CELLS]), len(self.state.cpub))
        acc = self.accounts()
        accounts = _records(acc, ["account", *_ACC_DOC, "live_orders", "breach"])
        fund = self.fund()
        del fund["gseq"]
        ins = self.instruments()
        instruments = _records(ins, ["instrument", "ref_price", "fund_pos", "open_buy",
                                     "open_sell"])
        sectors = _records(self.sectors(), ["sector", "net_mv", "gross_mv"])
        cells = self._cells(n)
        cells = cells[np.lexsort((cells["instrument"], cells["account"]))]
        positions = _records(cells, ["account", "instrument", "pos", "open_buy", "open_sell",
                                     "pnl"])
        return {"accounts": accounts, "fund": fund, "instruments": instruments,
                "sectors": sectors, "positions": positions, "counts": _counts(ctr)}


def _counts(ctr: np.ndarray) -> dict:
    rej = {name: int(ctr[C_REJECTS + code]) for code, name in REASONS.items()
           if ctr[C_REJECTS + code]}
    return {"accepted": int(ctr[C_ACCEPTED]), "rejected": int(ctr[C_REJECTED]),
            "late_fills": int(ctr[C_LATE_FILLS]), "busts": int(ctr[C_BUSTS]),
            "rolls": int(ctr[C_ROLLS]), "rejects": rej}

