"""SPEC section 6: ``bust`` (a trade taken back) and ``roll`` (a new trading day), rule by
rule, through the real parser and kernel; then through a real node (journal, recovery, the
desk's rows) and a cluster."""

import json

import numpy as np
import pytest
from reference_model import run_lines
from support import Run

from exposure.core.capacity import Capacities
from exposure.core.partition import PartitionMap
from exposure.core.routing import ALL, route
from exposure.core.types import (
    C_CELLS,
    T_BUST,
    T_ROLL,
    TYPE_CODES,
)
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import parse_events, record_values, records_from_objects
from exposure.engine.replay import replay_records

INST = {"type": "instrument", "instrument": 1, "multiplier": 10.0, "margin_rate": 0.5,
        "beta": 2.0, "sector": 4}
ROLL = {"type": "roll"}


def mark(price, instrument=1):
    return {"type": "mark", "instrument": instrument, "price": price}


def new(oid, side="buy", qty=100, price=100.0, account=1, instrument=1, source=0):
    return {"type": "new", "source": source, "order_id": oid, "account": account,
            "instrument": instrument, "side": side, "qty": qty, "price": price}


def fill(oid, side="buy", qty=100, price=100.0, account=1, instrument=1, source=0):
    return {"type": "fill", "source": source, "order_id": oid, "account": account,
            "instrument": instrument, "side": side, "qty": qty, "price": price}


def bust(oid, side="buy", qty=100, price=100.0, account=1, instrument=1, source=0):
    return {**fill(oid, side, qty, price, account, instrument, source), "type": "bust"}


def agrees_with_the_model(r: Run, lines, **caps) -> None:
    want, statuses = run_lines([json.dumps(x) for x in lines], **caps)
    assert r.statuses() == statuses
    assert compare_documents(r.doc, want) == []
    assert compare_documents(r.doc, r.scratch) == []


# ----------------------------------------------------------------------------- the records
def test_bust_and_roll_are_record_types_10_and_11_on_both_parse_paths():
    assert (TYPE_CODES["bust"], TYPE_CODES["roll"]) == (T_BUST, T_ROLL) == (10, 11)
    objs = [bust(7, "sell", 5, 9.5, account=3, instrument=4, source=2), ROLL,
            {"type": "bust", "order_id": 1}]  # a bust needs the trade's fields
    col = records_from_objects(objs)
    assert col["type"].tolist() == [T_BUST, T_ROLL, T_BUST]
    assert col["reject"].tolist() == [0, 0, 2]  # bad_field
    for k, o in enumerate(objs):  # the Producer's one-object path: the same bytes
        assert record_values(o) == col[k].item()


# ----------------------------------------------------------------------------- bust
def test_bust_of_a_live_orders_trade_takes_back_position_and_flow_not_the_order(run):
    lines = [INST, mark(100.0), new(1, "buy", 100), fill(1, "buy", 40, 101.0),
             bust(1, "buy", 40, 101.0)]
    r = run(lines)
    assert r.statuses() == [None] * 5
    assert r.position(1, 1) == {"account": 1, "instrument": 1, "pos": 0, "open_buy": 60,
                                "open_sell": 0, "pnl": 0.0}
    assert r.account(1)["live_orders"] == 1  # the order is as the fill left it
    assert r.doc["counts"]["busts"] == 1 and r.doc["counts"]["accepted"] == 5
    # the order still has 60 open: a fill of 60 finishes it
    r = run(lines + [fill(1, "buy", 60, 100.0)])
    assert r.account(1)["live_orders"] == 0 and r.position(1, 1)["pos"] == 60
    agrees_with_the_model(r, lines + [fill(1, "buy", 60, 100.0)])


def test_bust_that_does_not_match_its_live_order_is_a_fill_mismatch(run):
    lines = [INST, mark(100.0), new(1, "buy", 100), fill(1, "buy", 40),
             bust(1, "sell", 40), bust(1, "buy", 40, account=2), bust(1, "buy", 40,
                                                                      instrument=2)]
    r = run(lines)
    assert r.statuses()[4:] == ["fill_mismatch"] * 3
    assert r.position(1, 1)["pos"] == 40 and r.doc["counts"].get("busts", 0) == 0
    agrees_with_the_model(r, lines)


def test_late_bust_of_a_finished_order_still_takes_back_the_trade(run):
    lines = [INST, mark(100.0), new(1, "short", 50), fill(1, "short", 50, 99.0),
             bust(1, "short", 50, 99.0), bust(9, "buy", 10, 98.0, account=2)]
    r = run(lines)
    assert r.statuses() == [None] * 6  # accepted, and not late fills
    assert r.position(1, 1)["pos"] == 0 and r.position(2, 1)["pos"] == -10
    assert r.doc["counts"]["late_fills"] == 0 and r.doc["counts"]["busts"] == 2
    agrees_with_the_model(r, lines)


def test_bust_is_not_a_price_hint(run):
    r = run([new(1, "buy", 10, 50.0), bust(1, "buy", 5, 70.0)])
    assert r.doc["instruments"][0]["ref_price"] == 50.0


def test_bust_across_a_roll_moves_todays_pnl_by_that_trades_pnl_up_to_the_roll(run):
    # Bought 40 at 101 yesterday; the day closed at 105: 40 x 4 x 10 = 1,600 of yesterday's
    # P&L went into the position carried into today, valued now at 107.
    lines = [INST, mark(100.0), new(1, "buy", 100), fill(1, "buy", 40, 101.0), mark(105.0),
             ROLL, mark(107.0)]
    r = run(lines)
    assert r.position(1, 1)["pnl"] == pytest.approx(40 * 2 * 10)  # today: 105 -> 107
    r = run(lines + [bust(1, "buy", 40, 101.0)])
    # The trade never happened: today loses its 800 and the 1,600 it carried in.
    assert r.position(1, 1)["pos"] == 0
    assert r.position(1, 1)["pnl"] == pytest.approx(-40 * 4 * 10)
    agrees_with_the_model(r, lines + [bust(1, "buy", 40, 101.0)])


# ----------------------------------------------------------------------------- roll
def test_roll_starts_a_day_every_pnl_zero_positions_orders_limits_and_marks_kept(run):
    lines = [INST, {"type": "limit", "account": 1, "loss": 1000.0}, mark(100.0),
             new(1, "buy", 100), fill(1, "buy", 40, 101.0), mark(90.0)]
    r = run(lines)
    assert r.account(1)["breach"] == 16  # pnl 40 x (90 - 101) x 10 < -1000
    r = run(lines + [ROLL])
    assert r.account(1)["breach"] == 0 and r.account(1)["pnl"] == 0.0
    assert r.position(1, 1) == {"account": 1, "instrument": 1, "pos": 40, "open_buy": 60,
                                "open_sell": 0, "pnl": 0.0}
    assert r.doc["instruments"][0]["ref_price"] == 90.0
    assert r.doc["counts"]["rolls"] == 1
    # the last mark is the new day's start-of-day price
    r = run(lines + [ROLL, mark(91.0), fill(1, "buy", 60, 92.0)])
    assert r.position(1, 1)["pnl"] == pytest.approx(10 * (40 * 1 + 60 * (91 - 92)))
    assert r.account(1)["live_orders"] == 0
    agrees_with_the_model(r, lines + [ROLL, mark(91.0), fill(1, "buy", 60, 92.0)])


def test_roll_forgets_flat_cells_and_frees_their_capacity(run):
    caps = dict(accounts=8, instruments=8, sectors=4, sources=4, orders=8, cells=4)
    # Four cells fill the table: (1,1) flat, (1,2) long, (2,1) flat with a live order,
    # (2,2) flat.
    day1 = [new(1, "buy", 10, 5.0), fill(1, "buy", 10, 5.0), fill(1, "sell", 10, 6.0),
            fill(2, "buy", 3, 7.0, instrument=2), new(3, "sell", 5, 9.0, account=2),
            fill(4, "buy", 1, 1.0, account=2, instrument=2),
            fill(4, "sell", 1, 1.0, account=2, instrument=2)]
    full = day1 + [fill(5, "buy", 1, 1.0, account=3, instrument=3)]
    r = run(full, Capacities(**caps))
    assert r.statuses()[-1] == "capacity"
    r = run(day1 + [ROLL], Capacities(**caps))
    assert int(r.state.ctr[C_CELLS]) == 2
    assert {(p["account"], p["instrument"]) for p in r.doc["positions"]} == {(1, 2), (2, 1)}
    # Two cells free: two new ones fit, a third does not; the live order still works.
    after = [fill(5, "buy", 1, 1.0, account=3, instrument=3),
             fill(6, "buy", 1, 1.0, account=1, instrument=1),
             fill(7, "buy", 1, 1.0, account=4, instrument=4),
             fill(3, "sell", 5, 9.0, account=2), fill(2, "buy", 2, 7.0, instrument=2)]
    lines = day1 + [ROLL] + after
    r = run(lines, Capacities(**caps))
    assert r.statuses()[-5:] == ["late_fill", "late_fill", "capacity", None, "late_fill"]
    assert r.position(2, 1)["pos"] == -5 and r.account(2)["live_orders"] == 0
    assert r.position(1, 2)["pos"] == 5 and r.position(3, 3)["pos"] == 1
    agrees_with_the_model(r, lines, **caps)
    # Day after day: rolls keep the table from filling up.
    week = []
    for d in range(20):
        week += [fill(100 + d, "buy", 5, 2.0, account=d % 8, instrument=d % 7),
                 fill(100 + d, "sell", 5, 2.0, account=d % 8, instrument=d % 7), ROLL]
    r = run(week, Capacities(**caps))
    assert "capacity" not in r.statuses() and int(r.state.ctr[C_CELLS]) == 0
    agrees_with_the_model(r, week, **caps)


def test_a_roll_revalues_nothing_and_a_mark_after_it_reaches_the_kept_cells(run):
    lines = [INST, mark(10.0), fill(1, "buy", 5, 10.0), fill(2, "sell", 5, 10.0, account=2),
             fill(3, "buy", 5, 10.0, account=3), fill(3, "sell", 5, 10.0, account=3), ROLL,
             mark(12.0), fill(4, "buy", 1, 12.0, account=4)]
    r = run(lines)
    assert r.doc["fund"]["pnl"] == pytest.approx(0.0)
    assert r.account(1)["pnl"] == pytest.approx(100.0)
    assert r.account(2)["pnl"] == pytest.approx(-100.0)
    assert r.account(3) == {}  # forgotten: no row
    agrees_with_the_model(r, lines)


# ----------------------------------------------------------------------------- sessions
def test_a_bust_needs_its_source_and_account_and_a_roll_the_roll_entitlement(tmp_path):
    from numba import njit

    from exposure.core.types import W_ACCOUNT, W_SESSION, W_TYPE
    from exposure.net.sessions import Entitlements, load_sessions
    from exposure.node.stages.ingest_scan import _entitled

    @njit
    def entitled(words, ent_flags, esrc, eacct, s):
        return _entitled(words[W_TYPE], words[W_SESSION], words[W_ACCOUNT], ent_flags[s],
                         esrc, eacct, s)

    (tmp_path / "s.toml").write_text(
        '[[session]]\nid = 1\nsecret = "0123456789abcdef"\nsources = [1]\naccounts = [10]\n'
        '[[session]]\nid = 2\nsecret = "0123456789abcdef"\nroll = true\n'
        '[[session]]\nid = 3\nsecret = "0123456789abcdef"\ninstrument = true\n')
    e = Entitlements.of(load_sessions(tmp_path / "s.toml", 4, 64, 8), 4, 64, 8)
    dated = {**ROLL, "date": "2025-03-14"}

    def may(session, obj):
        words = records_from_objects([obj]).view(np.uint64)
        return bool(entitled(words, e.flags, e.src, e.acct, session))

    assert may(1, bust(1, source=1, account=10))
    assert not may(1, bust(1, source=2, account=10))
    assert not may(1, bust(1, source=1, account=11))
    assert not may(1, ROLL) and may(2, ROLL) and may(2, dated)
    assert not may(3, ROLL) and not may(3, dated)  # instrument is not enough: roll is its own
    assert not may(2, bust(1, source=1, account=10))


# ----------------------------------------------------------------------------- cluster
def test_a_bust_goes_to_its_sources_partition_and_a_roll_to_all_counted_once():
    from exposure.cluster.topology import replay_cluster

    pmap = PartitionMap.from_ranges([("a", [[0, 1]], [[0, 1]]), ("b", [[2, 3]], [[2, 3]])],
                                    accounts=4, sources=4)
    lines = [mark(100.0), fill(1, "buy", 10, source=0, account=0),
             fill(1, "buy", 7, source=2, account=2), fill(2, "sell", 3, source=2, account=3),
             fill(2, "buy", 3, source=2, account=3), mark(102.0), ROLL, mark(101.0),
             bust(1, "buy", 10, source=0, account=0), bust(1, "buy", 7, source=2, account=2),
             fill(3, "buy", 1, source=1, account=1), ROLL]
    recs = parse_events("\n".join(json.dumps(x) for x in lines).encode())
    assert route(recs, pmap).tolist() == [ALL, 0, 1, 1, 1, ALL, ALL, ALL, 0, 1, 0, ALL]
    caps = Capacities(accounts=4, instruments=8, sectors=4, sources=4, orders=16, cells=16)
    doc = replay_cluster(recs, pmap, caps)
    whole = document(replay_records(recs, caps))
    assert doc["counts"]["rolls"] == whole["counts"]["rolls"] == 2
    assert doc["counts"]["busts"] == 2 and doc["counts"]["accepted"] == len(lines)
    assert compare_documents(doc, whole) == []
    # A bust whose account is another partition's than its source: wrong_partition.
    recs = parse_events(json.dumps(bust(1, "buy", 10, source=0, account=2)).encode())
    doc = replay_cluster(recs, pmap, caps)
    assert doc["counts"]["rejects"] == {"wrong_partition": 1}


# ----------------------------------------------------------------------------- a real node
@pytest.mark.process
@pytest.mark.timeout(300)
def test_a_node_with_busts_and_rolls_equals_replay_live_on_its_desk_and_after_kill9(tmp_path):
    """Busts and rolls sent to a real node: `dump` and a desk's view equal replay of the
    file; killed with -9 (recovery from a snapshot taken across rolls plus the journal
    after it) the node comes back identical, and a cell row freed by a roll and reused by
    another (account, instrument) shows only the new one."""
    from exposure.bench.flowgen import generate, to_jsonl
    from exposure.engine.desk import Desk
    from exposure.engine.parse import read_events
    from exposure.harness.localnode import LocalNode

    seed = 5
    print(f"seed {seed}")
    recs = generate(12_000, accounts=20, instruments=100, universe=15, live_target=300,
                    seed=seed, busts=0.02, roll_every=2500)
    f = tmp_path / "week.jsonl"
    f.write_bytes(to_jsonl(recs))
    want = document(replay_records(read_events(f)))
    assert want["counts"]["rolls"] == 4 and want["counts"]["busts"] > 100
    n = LocalNode(tmp_path, data_dir=tmp_path / "data",
                  extra="[snapshot]\nevery_events = 3000\n")
    try:
        p = n.cli("send", str(f))
        assert p.returncode == 0, p.stderr.decode()
        assert compare_documents(n.dump(), want) == []
        assert compare_documents(n.dump(process=False), want) == []
        n.kill9()
        n.start()
        assert compare_documents(n.dump(), want) == []
        with Desk(n.name) as desk:
            for a in {r["account"] for r in want["positions"]}:
                rows = desk.positions(a)
                got = {(a, int(i)): int(q) for i, q in zip(rows["instrument"], rows["pos"],
                                                           strict=True)}
                assert got == {(a, r["instrument"]): r["pos"] for r in want["positions"]
                               if r["account"] == a}
    finally:
        n.stop()
    assert n.segments() == []
