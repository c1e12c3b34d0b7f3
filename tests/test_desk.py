"""Desks read the published tables: the SPEC document, instruments, sectors, positions and
counts, without ever taking the state's seqlock (a node that never pauses)."""

import json
import os
import random
import uuid

import numpy as np
import pytest

from exposure.core.capacity import Capacities
from exposure.core.types import (
    C_CELLS,
    INSTRUMENT_ROW_DTYPE,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.desk import Desk
from exposure.engine.document import compare_documents, document
from exposure.engine.kernel import apply_batch
from exposure.engine.parse import parse_events
from exposure.engine.publish import publish_batch, versions
from exposure.shm.seqlock import write_begin, write_end
from exposure.shm.tally_layout import allocate
from exposure.shm.tally_segment import TallySegment

# Small tables, so that cells and live orders run out (capacity rejects) and ids collide.
CAPS = Capacities(accounts=6, instruments=12, sectors=4, sources=3, orders=24, cells=40)


def _seed() -> int:
    seed = random.SystemRandom().randrange(1 << 30)
    print(f"seed {seed}")
    return seed


def _event(rnd: random.Random) -> dict | str:
    """One random event over the small universe, some of them rejected."""
    acc = rnd.randrange(CAPS.accounts + (1 if rnd.random() < 0.03 else 0))
    ins = rnd.randrange(CAPS.instruments + (1 if rnd.random() < 0.03 else 0))
    src, oid = rnd.randrange(CAPS.sources), rnd.randrange(12)
    side = rnd.choice(["buy", "sell", "short"])
    qty = rnd.choice([1, 7, 100, 250, 10**6])
    price = rnd.choice([0.0, 1.0, 99.5, 100.0, round(rnd.uniform(0.01, 500), 2)])
    kind = rnd.choices(["new", "fill", "cancel", "done", "replace", "mark", "instrument",
                        "limit", "position", "bad", "bust", "roll"],
                       [20, 25, 6, 3, 8, 8, 4, 3, 4, 3, 3, 1])[0]
    if kind == "roll":  # SPEC section 6: forgets flat cells, so position rows are reused
        return {"type": kind}
    if kind in ("new", "fill", "bust"):
        return {"type": kind, "source": src, "order_id": oid, "account": acc,
                "instrument": ins, "side": side, "qty": qty,
                "price": price if kind == "new" else max(price, 0.5)}
    if kind in ("cancel", "done"):
        return {"type": kind, "source": src, "order_id": oid}
    if kind == "replace":
        return {"type": kind, "source": src, "order_id": oid, "qty": qty, "price": price}
    if kind == "mark":
        return {"type": kind, "instrument": ins, "price": round(rnd.uniform(0.5, 300), 3)}
    if kind == "instrument":
        return {"type": kind, "instrument": ins, "multiplier": rnd.choice([0.5, 1.0, 10.0]),
                "margin_rate": rnd.choice([0.0, 0.1, 1.0]), "beta": rnd.choice([-0.5, 1.2]),
                "sector": rnd.randrange(CAPS.sectors + (1 if rnd.random() < 0.1 else 0))}
    if kind == "limit":
        return {"type": kind, "account": acc, "gross": rnd.choice([0, 1e4, 1e7]),
                "net": rnd.choice([0, 5e3]), "margin": rnd.choice([0, 1e5]),
                "loss": rnd.choice([0, 100.0])}
    if kind == "position":
        e = {"type": kind, "account": acc, "instrument": ins, "qty": rnd.randrange(-500, 500)}
        if rnd.random() < 0.5:
            e["price"] = round(rnd.uniform(1, 200), 2)
        return e
    return rnd.choice(["not json", '{"type": "bogus"}', '{"type": "new"}', "[1]",
                       '{"type": "mark", "instrument": 1, "price": -1}'])


def _events(rnd: random.Random, n: int) -> np.ndarray:
    lines = [e if isinstance(e, str) else json.dumps(e) for e in (_event(rnd) for _ in range(n))]
    return parse_events("\n".join(lines).encode())


class Writer:
    """What the compute stage's ``_step`` does per batch, on a given state: apply under the
    state seqlock (``words``: the header as u8 words), then publish the batch."""

    def __init__(self, st, words):
        self.st, self.words = st, words
        self.vers = versions(st)
        nrows = st.acc.shape[0] + 1 + st.inst.shape[0] + st.sec.shape[0]
        flat = np.zeros((nrows, ROW_SIZE // 8), np.uint64).reshape(-1)
        self.rows = (flat.view(UPDATE_DTYPE), flat.view(INSTRUMENT_ROW_DTYPE),
                     flat.view(SECTOR_ROW_DTYPE))
        self.gseq = 0

    def batch(self, recs: np.ndarray) -> int:
        recs = recs.copy()
        recs["gseq"] = np.arange(self.gseq + 1, self.gseq + 1 + len(recs), dtype=np.uint64)
        self.gseq += len(recs)
        status = np.zeros(len(recs), np.uint8)
        write_begin(self.words)
        apply_batch(self.st, recs, status)
        write_end(self.words)
        return publish_batch(self.st, *self.vers.args(), recs, len(recs), *self.rows, 0)

    def day(self, rnd: random.Random, n: int, check=None) -> None:
        """``n`` random events in random batches; ``check()`` after some of them."""
        recs = _events(rnd, n)
        lo = 0
        while lo < len(recs):
            hi = min(len(recs), lo + rnd.choice([1, 2, 5, 17, 64, 200]))
            self.batch(recs[lo:hi])
            lo = hi
            if check is not None and (rnd.random() < 0.15 or lo == len(recs)):
                check()


def _private():
    buf, st = allocate(CAPS)
    return st, Writer(st, buf[:256].view(np.uint64))


def _check_tables(desk: Desk, st) -> None:
    """instruments(), sectors(), positions() and counts() against the working state."""
    want = document(st)
    assert compare_documents(desk.document(), want, limit=0) == []
    assert desk.counts() == want["counts"]

    ins = desk.instruments()
    ids = np.flatnonzero(st.inst["gseq"] != 0)
    assert ins["instrument"].tolist() == ids.tolist()
    s = st.inst[ids]
    for f in ("gseq", "fund_pos", "ref_price", "open_buy", "open_sell", "multiplier",
              "margin_rate", "beta", "sector", "marked"):
        assert np.array_equal(ins[f], s[f]), f
    v = s["ref_price"] * s["multiplier"]
    assert np.array_equal(ins["net_mv"], s["fund_pos"] * v)
    assert np.array_equal(ins["gross_mv"], s["abs_pos"] * v)

    sec = desk.sectors()
    sids = np.flatnonzero(st.sec_gseq != 0)
    assert sec["sector"].tolist() == sids.tolist()
    assert np.array_equal(sec["gseq"], st.sec_gseq[sids])
    assert np.array_equal(sec["net_mv"], st.sec[sids, 0, 0] + st.sec[sids, 0, 1])
    assert np.array_equal(sec["gross_mv"], st.sec[sids, 1, 0] + st.sec[sids, 1, 1])

    cells = st.cells[: int(st.ctr[C_CELLS])]
    for a in range(CAPS.accounts):
        got = desk.positions(a)
        mine = cells[cells["account"] == a]
        mine = mine[np.argsort(mine["instrument"])]
        assert got["instrument"].tolist() == mine["instrument"].tolist()
        for f in ("pos", "open_buy", "open_sell"):
            assert np.array_equal(got[f], mine[f]), f
        i = st.inst[mine["instrument"]]
        pnl = i["multiplier"] * (mine["pos"] * i["ref_price"]
                                 - mine["sod_qty"] * mine["sod_price"] - mine["flow"])
        assert np.array_equal(got["pnl"], pnl)
        assert (got["gseq"] != 0).all()
    assert len(desk.positions(CAPS.accounts + 5)) == 0
    # A row beyond the cells in use was never used, or was freed by a roll: nobody's.
    beyond = st.cpub[int(st.ctr[C_CELLS]):]
    assert ((beyond["gseq"] == 0) | (beyond["account"] == -1)).all()


@pytest.mark.timeout(300)
def test_a_desk_over_a_private_state_reads_what_the_kernel_holds_after_every_batch():
    rnd = random.Random(_seed())
    st, w = _private()
    desk = Desk.over(st)
    empty = desk.document()
    assert empty["accounts"] == empty["positions"] == empty["instruments"] == []
    assert empty["counts"] == {"accepted": 0, "rejected": 0, "late_fills": 0, "busts": 0,
                              "rolls": 0, "rejects": {}}
    w.day(rnd, 1500, check=lambda: _check_tables(desk, st))
    doc = desk.document()
    assert doc["positions"] and doc["instruments"] and doc["sectors"] and doc["accounts"]
    assert doc["counts"]["rejected"] > 0 and doc["counts"]["rejects"].get("capacity", 0) > 0
    # Exactly the keys, and the order of the lists, of exposure.engine.document.
    want = document(st)
    assert list(doc) == list(want) and list(doc["fund"]) == list(want["fund"])
    for k in ("accounts", "instruments", "sectors", "positions"):
        if want[k]:
            assert list(doc[k][0]) == list(want[k][0]), k
    assert [(p["account"], p["instrument"]) for p in doc["positions"]] == sorted(
        (p["account"], p["instrument"]) for p in doc["positions"])
    assert doc["fund"]["crossing"] == pytest.approx(
        doc["fund"]["gross"] - (doc["fund"]["net_long_mv"] + doc["fund"]["net_short_mv"]))


@pytest.mark.timeout(300)
def test_reading_never_waits_for_the_state_seqlock():
    """A writer that holds the state's seqlock odd forever (a node that never pauses
    between batches) does not stop a desk: only the rows' own versions matter."""
    rnd = random.Random(_seed())
    st, w = _private()
    w.day(rnd, 400)
    write_begin(w.words)  # a batch "in progress", never ended
    desk = Desk.over(st)
    assert compare_documents(desk.document(), document(st), limit=0) == []
    _check_tables(desk, st)


@pytest.mark.timeout(300)
def test_a_desk_on_a_real_segment_reads_the_document_while_the_writer_is_mid_batch():
    rnd = random.Random(_seed())
    node = f"test{os.getpid()}{uuid.uuid4().hex[:6]}"
    seg = TallySegment.create(f"/exposure.{node}.tally", CAPS)
    desk = None
    try:
        w = Writer(seg.state, seg.words)
        w.day(rnd, 600)
        write_begin(seg.words)  # held odd while the desk reads
        desk = Desk(node)
        assert desk.state.ipub.flags.writeable is False  # mapped read-only
        assert compare_documents(desk.document(), document(seg.state), limit=0) == []
        _check_tables(desk, seg.state)
        write_end(seg.words)
        w.day(rnd, 300)
        assert compare_documents(desk.document(), document(seg.state), limit=0) == []
    finally:
        if desk is not None:
            desk.close()
        seg.close()
    assert not os.path.exists(f"/dev/shm/exposure.{node}.tally")


@pytest.mark.timeout(300)
def test_a_row_being_written_is_waited_out_and_a_finished_one_is_read():
    """A row whose version is odd is not read until it is even again; the copy is the
    row's new content, never half of it."""
    import threading

    rnd = random.Random(_seed())
    st, w = _private()
    w.day(rnd, 300)
    desk = Desk.over(st)
    sec = desk.sectors()
    assert len(sec)
    s = int(sec["sector"][0])
    st.spub["ver"][s] += 1  # odd: a writer is in the middle of this row
    st.spub["net_mv"][s] = 12345.0  # half-written
    got = []
    t = threading.Thread(target=lambda: got.append(desk.sectors()), daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive() and not got  # waits for the row
    st.spub["gross_mv"][s] = 678.0
    st.spub["ver"][s] += 1  # even: done
    t.join(30)
    row = got[0][got[0]["sector"] == s][0]
    assert row["net_mv"] == 12345.0 and row["gross_mv"] == 678.0
