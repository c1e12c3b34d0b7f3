"""Read-only access to a running node's tallies, for desks.

The node's tally segment is mapped ``PROT_READ``: a desk cannot change it (a write through
numpy raises; a write through a raw pointer faults). Every read is consistent (seqlocks; see
:mod:`exposure.shm.tally_segment`): a desk never sees half of an event.

Example::

    from exposure.desk import Desk

    with Desk("exposure") as desk:            # the node's name (config [node] name)
        fund = desk.fund()                    # dict: gross, net, crossing, ...
        rows = desk.accounts()                # numpy structured array, one row per account
        worst = rows[np.argmax(rows["gross"])]
        doc = desk.document()                 # the SPEC document (what `exposure dump` prints)

Account and fund rows are published by the compute stage after every batch, each under its
own version, so reading them never waits on a busy node. :meth:`Desk.document` copies the
whole state under the state's seqlock, which needs a moment between two batches; on a node
that never pauses it retries and finally raises ``TimeoutError``.
"""

from __future__ import annotations

import numpy as np

from .document import document
from .shm.tally_layout import State
from .shm.tally_segment import TallySegment, read_rows
from .types import C_CELLS, PUBROW_DTYPE

__all__ = ["Desk", "ACCOUNT_ROW"]

# What :meth:`Desk.accounts` returns: the published row (types.PUBROW_DTYPE) plus its id.
_ROW_FIELDS = ["gseq", "long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
               "worst_gross", "margin", "beta_net", "pnl", "live_orders", "breach"]
ACCOUNT_ROW = np.dtype([("account", "<i8")] + [(f, PUBROW_DTYPE.fields[f][0])
                                               for f in _ROW_FIELDS])


def _copy_for_document(st: State) -> State:
    n = int(st.ctr[C_CELLS])
    return st._replace(
        ctr=st.ctr.copy(), fund=st.fund.copy(), acc=st.acc.copy(), acc_lim=st.acc_lim.copy(),
        acc_live=st.acc_live.copy(), acc_gseq=st.acc_gseq.copy(), acc_stamp=st.acc_stamp[:0],
        changed=st.changed[:0], sec=st.sec.copy(), inst=st.inst.copy(),
        cells=st.cells[:n].copy(), cidx=st.cidx[:0], orders=st.orders[:0])


class Desk:
    """A read-only view of one node's tallies."""

    def __init__(self, node: str = "exposure"):
        self.segment = TallySegment.attach(f"/exposure.{node}.tally", writable=False)

    def close(self) -> None:
        self.segment.close()

    def __enter__(self) -> Desk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def document(self) -> dict:
        """The SPEC tally document, as of one moment between two batches."""
        st, _ = self.segment.consistent(_copy_for_document)
        return document(st)

    def _rows(self) -> np.ndarray:
        st = self.segment.state
        out = np.zeros(len(st.pub), PUBROW_DTYPE)
        read_rows(st.pub, st.pub["ver"], out)
        return out

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
        st = self.segment.state
        out = np.zeros(1, PUBROW_DTYPE)
        read_rows(st.pub[-1:], st.pub["ver"][-1:], out)
        r = out[0]
        row = {f: float(r[f]) for f in ("long_mv", "short_mv", "gross", "net", "open_buy_mv",
                                        "open_sell_mv", "worst_gross", "margin", "beta_net",
                                        "pnl")}
        row["live_orders"] = int(r["live_orders"])
        row["net_long_mv"] = float(r["net_long_mv"])
        row["net_short_mv"] = float(r["net_short_mv"])
        row["crossing"] = row["gross"] - (row["net_long_mv"] + row["net_short_mv"])
        row["gseq"] = int(r["gseq"])
        return row
