"""The compute stage's feed version 4 rows, in-process: a position row per cell a batch
moved (in parts when they outnumber the row buffer, before the next batch is taken), a
limits row when an account's limits changed, none for a mark (the instrument row carries
the price; the desks' published cells are revalued), a roll's compaction of the cell table
(every id it moved or freed, a freed one with account -1), and none with ``positions``
off."""

import json
import os
import uuid

import numpy as np
import pytest

from exposure.core.capacity import Capacities
from exposure.core.types import (
    LIMITS_ROW_DTYPE,
    POSITION_ROW_DTYPE,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SIZE,
    UPDATE_DTYPE,
    W_GSEQ,
)
from exposure.engine.parse import parse_events
from exposure.engine.publish import position_values
from exposure.feed.wire import rows_of
from exposure.node.stages.compute import ComputeStage
from exposure.shm.ring import Ring, ring_pop, ring_push
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_segment import TallySegment

pytestmark = [pytest.mark.timeout(300), pytest.mark.process]  # (the first use compiles)

CAPS = Capacities(accounts=64, instruments=16, sectors=4, sources=4, orders=256, cells=128)
N = 40  # accounts with a position in instrument 1: more cells than a part holds


def _fill(oid: int, account: int, side: str, qty: int) -> dict:
    return {"type": "fill", "source": 0, "order_id": oid, "account": account,
            "instrument": 1, "side": side, "qty": qty, "price": 10.0}


class Stage:
    """A ComputeStage on a private segment; ``out``: a small fan-out ring, drained by
    :meth:`run` between polls (as the fan-out does)."""

    def __init__(self, positions: bool = True):
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.seg = TallySegment.create(f"exposure-test-cpos-{tag}-tally", CAPS)
        self.inp = Ring.create(f"exposure-test-cpos-{tag}-in", 1024, 128)
        self.out = Ring.create(f"exposure-test-cpos-{tag}-out", 16, ROW_SIZE)
        sessions = np.zeros((CAPS.sources + 1, SESSION_COLS), np.uint64)
        self.stage = ComputeStage(self.seg, sessions, self.inp, self.out, batch=256,
                                  positions=positions, pos_chunk=8)
        self.gseq = 0

    def run(self, events: list[dict]) -> list[np.ndarray]:
        """Send ``events`` as one batch; poll and drain until the stage is idle. Returns
        the rows of each poll that pushed some, in order."""
        recs = parse_events("\n".join(json.dumps(e) for e in events).encode())
        words = recs.view(np.uint64).reshape(len(recs), -1).copy()
        words[:, W_GSEQ] = np.arange(self.gseq + 1, self.gseq + 1 + len(recs), dtype=np.uint64)
        self.gseq += len(recs)
        assert ring_push(self.inp.ctrl, self.inp.slots, words, len(words)) == len(words)
        sink = np.zeros((self.out.capacity, ROW_SIZE // 8), np.uint64)
        polls = []
        for _ in range(1000):
            self.stage.poll()
            n = ring_pop(self.out.ctrl, self.out.slots, sink, len(sink))
            if n:
                polls.append(sink[:n].copy().view(UPDATE_DTYPE).reshape(n))
            elif not self.stage.pending and not n:
                break
        return polls

    def close(self) -> None:
        self.stage.close()
        for r in (self.inp, self.out):
            r.close()
        self.seg.close()


@pytest.fixture
def stage():
    s = Stage()
    try:
        yield s
    finally:
        s.close()


def test_a_batch_s_cells_come_in_parts_then_limits_and_a_roll_s_compaction(stage):
    setup = [{"type": "instrument", "instrument": 1, "multiplier": 2.0, "margin_rate": 0.5,
              "beta": 1.0, "sector": 1},
             {"type": "mark", "instrument": 1, "price": 10.0},
             {"type": "limit", "account": 3, "gross": 1000.0, "net": 500.0},
             {"type": "limit", "account": 5, "loss": 7.5}]
    setup += [_fill(a + 1, a, "buy", a + 1) for a in range(N)]
    polls = stage.run(setup)
    rows = np.concatenate(polls)
    # The buffer holds 8 position rows: the 40 cells took several polls, each cell once,
    # with the batch's last gseq, as the segment published them.
    assert len(polls) >= 5
    pos = rows_of(rows, ROW_POSITION)
    assert sorted(pos["cell"].tolist()) == list(range(N))
    assert (pos["gseq"] == stage.gseq).all()
    cpub = stage.seg.state.cpub
    for r in pos:
        c = int(r["cell"])
        assert (r["account"], r["instrument"], r["pos"]) == (c, 1, c + 1)
        assert (r["sod_qty"], r["sod_price"], r["flow"]) == (0, 0.0, 10.0 * (c + 1))
        assert tuple(cpub[c][f].item() for f in ("sod_qty", "sod_price", "flow")) == (
            0, 0.0, 10.0 * (c + 1))
        # a receiver's pnl and mv at the instrument row's price: the node's, bit for bit
        pnl, mv = position_values(r["pos"], r["sod_qty"], r["sod_price"], r["flow"], 10.0,
                                  2.0, 1.0)
        assert (pnl, mv) == (cpub[c]["pnl"], cpub[c]["mv"]) == (0.0, 20.0 * (c + 1))
    lim = rows_of(rows, ROW_LIMITS)
    assert lim.dtype == LIMITS_ROW_DTYPE
    assert {int(r["account"]): (r["gross_limit"], r["net_limit"], r["margin_limit"],
                                r["loss_limit"]) for r in lim} == {
        3: (1000.0, 500.0, 0.0, 0.0), 5: (0.0, 0.0, 0.0, 7.5)}
    # The next batch moves one cell: its row only, and no limits row (unchanged).
    rows = np.concatenate(stage.run([_fill(100, 7, "sell", 8)]))
    assert rows_of(rows, ROW_POSITION)[["cell", "account", "pos"]].tolist() == [(7, 7, 0)]
    assert not len(rows_of(rows, ROW_LIMITS))
    # A mark moves every holder's P&L but no quantity: the instrument row carries the new
    # price and no position row goes out, except account 2's, whose fill followed it.
    rows = np.concatenate(stage.run([{"type": "mark", "instrument": 1, "price": 11.37},
                                     _fill(101, 2, "buy", 1)]))
    assert rows_of(rows, ROW_INSTRUMENT)[["instrument", "ref_price"]].tolist() == [(1, 11.37)]
    assert rows_of(rows, ROW_POSITION)[["cell", "account", "pos"]].tolist() == [(2, 2, 4)]
    # the desks' published cells are all revalued, with the batch's gseq, and a receiver's
    # figures from the rows and the instrument row are the same bits
    p = cpub[:N]
    assert (p["gseq"] == stage.gseq).all()
    pnl, mv = position_values(p["pos"], p["sod_qty"], p["sod_price"], p["flow"], 11.37, 2.0,
                              1.0)
    assert pnl.tolist() == p["pnl"].tolist() and mv.tolist() == p["mv"].tolist()
    assert p["pnl"][5] == pytest.approx(2.0 * (6 * 11.37 - 6 * 10.0))
    # A roll forgets account 7's flat cell: ids 8.. move down one, id 39 is freed; every
    # id goes out (its start of day moved).
    rows = np.concatenate(stage.run([{"type": "roll", "date": "2030-01-07"}]))
    pos = rows_of(rows, ROW_POSITION)
    assert sorted(pos["cell"].tolist()) == list(range(N))
    got = {int(r["cell"]): (int(r["account"]), int(r["pos"])) for r in pos}
    want = {c: (c, c + 1) for c in range(7)} | {c: (c + 1, c + 2) for c in range(7, N - 1)}
    assert got == want | {2: (2, 4), N - 1: (-1, 0)}
    pos = pos.view(POSITION_ROW_DTYPE)
    kept = pos[pos["account"] >= 0]
    assert (kept["sod_qty"] == kept["pos"]).all() and (kept["sod_price"] == 11.37).all()
    assert (pos["flow"] == 0.0).all()
    assert cpub["pnl"][:N].tolist() == [0.0] * N


def test_positions_off_sends_no_position_rows():
    s = Stage(positions=False)
    try:
        rows = np.concatenate(s.run([{"type": "mark", "instrument": 1, "price": 10.0}]
                                    + [_fill(a + 1, a, "buy", 1) for a in range(20)]))
        assert not len(rows_of(rows, ROW_POSITION))
        assert int(s.seg.state.cpub["gseq"][19]) == s.gseq  # (still published to desks)
    finally:
        s.close()
