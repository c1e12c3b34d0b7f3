"""The kernel against the SPEC, one rule at a time."""

import numpy as np
import pytest

from exposure.core.capacity import Capacities
from exposure.core.types import C_NCHANGED, EVENT_DTYPE
from exposure.engine.document import compare_documents
from exposure.engine.kernel import apply_batch
from exposure.shm.tally_layout import allocate

INST = {"type": "instrument", "instrument": 1, "multiplier": 10.0, "margin_rate": 0.5,
        "beta": 2.0, "sector": 4}
MARK = {"type": "mark", "instrument": 1, "price": 100.0}


def new(oid, side="buy", qty=100, price=100.0, account=1, instrument=1, source=0):
    return {"type": "new", "source": source, "order_id": oid, "account": account,
            "instrument": instrument, "side": side, "qty": qty, "price": price}


def fill(oid, side="buy", qty=100, price=100.0, account=1, instrument=1, source=0):
    return {"type": "fill", "source": source, "order_id": oid, "account": account,
            "instrument": instrument, "side": side, "qty": qty, "price": price}


def cancel(oid, source=0, kind="cancel"):
    return {"type": kind, "source": source, "order_id": oid}


def replace(oid, qty, price=100.0, source=0):
    return {"type": "replace", "source": source, "order_id": oid, "qty": qty, "price": price}


def test_new_order_adds_open_exposure_on_its_side(run):
    r = run([INST, MARK, new(1, "buy", 30), new(2, "short", 20)])
    acc = r.account(1)
    assert acc["open_buy_mv"] == pytest.approx(30 * 100 * 10)
    assert acc["open_sell_mv"] == pytest.approx(20 * 100 * 10)
    assert acc["worst_gross"] == pytest.approx(30 * 1000)  # max(|0+30|, |0-20|)
    assert acc["live_orders"] == 2 and acc["gross"] == 0


def test_fill_moves_position_and_reduces_open(run):
    r = run([INST, MARK, new(1, "buy", 100), fill(1, "buy", 40, 101.0)])
    assert r.position(1, 1) | {"pnl": 0} == {"account": 1, "instrument": 1, "pos": 40,
                                             "open_buy": 60, "open_sell": 0, "pnl": 0}
    # ref price is the mark (100): pnl = 10 * (40 * 100 - 40 * 101)
    assert r.position(1, 1)["pnl"] == pytest.approx(-400.0)
    assert r.account(1)["live_orders"] == 1


def test_fill_after_cancel_still_moves_position(run):
    r = run([INST, MARK, new(1, "sell", 50), cancel(1), fill(1, "sell", 50, 99.0)])
    assert r.statuses() == [None, None, None, None, "late_fill"]
    assert r.position(1, 1)["pos"] == -50 and r.position(1, 1)["open_sell"] == 0
    assert r.doc["counts"]["late_fills"] == 1 and r.doc["counts"]["accepted"] == 5


def test_fill_of_an_unknown_order_lands_in_its_cell(run):
    r = run([fill(77, "buy", 5, 10.0, account=9, instrument=3)])
    assert r.statuses() == ["late_fill"]
    assert r.position(9, 3)["pos"] == 5


def test_overfill_moves_position_by_the_whole_fill_and_finishes_the_order(run):
    r = run([INST, MARK, new(1, "buy", 100), fill(1, "buy", 150), cancel(1)])
    assert r.position(1, 1)["pos"] == 150 and r.position(1, 1)["open_buy"] == 0
    assert r.statuses()[-1] == "unknown_order"  # finished by the overfill


def test_replace_sets_total_quantity_and_below_filled_finishes(run):
    r = run([INST, MARK, new(1, "buy", 100), fill(1, "buy", 30), replace(1, 200)])
    assert r.position(1, 1)["open_buy"] == 170
    r = run([INST, MARK, new(1, "buy", 100), fill(1, "buy", 30), replace(1, 20), cancel(1)])
    assert r.position(1, 1)["open_buy"] == 0 and r.account(1)["live_orders"] == 0
    assert r.statuses()[-1] == "unknown_order"


@pytest.mark.parametrize("kind", ["cancel", "done"])
def test_cancel_and_done_finish_the_order_and_free_its_key(run, kind):
    r = run([INST, MARK, new(1, "buy", 100), cancel(1, kind=kind), new(1, "sell", 5)])
    assert r.statuses() == [None] * 5
    assert r.position(1, 1)["open_buy"] == 0 and r.position(1, 1)["open_sell"] == 5


def test_order_keys_are_per_source(run):
    r = run([new(1, source=0), new(1, source=1), new(1, source=0)])
    assert r.statuses() == [None, None, "duplicate_order"]


@pytest.mark.parametrize("field,value", [("side", "short"), ("account", 2), ("instrument", 2)])
def test_fill_that_contradicts_its_live_order_is_a_mismatch(run, field, value):
    f = fill(1, "sell")
    f[field] = value
    r = run([INST, MARK, new(1, "sell", 100), f])
    assert r.statuses()[-1] == "fill_mismatch"
    assert r.position(1, 1)["pos"] == 0 and r.position(1, 1)["open_sell"] == 100


def test_a_rejected_event_changes_nothing_but_the_counters(run):
    base = [INST, MARK, new(1, "buy", 100), fill(1, "buy", 10)]
    bad = [fill(1, "sell"), cancel(5), new(1), {"type": "mark", "instrument": 1, "price": 0},
           {"type": "zap"}, new(2, qty=0), new(3, account=5000), replace(9, 10)]
    a, b = run(base).doc, run(base + bad).doc
    assert b["counts"]["rejected"] == len(bad)
    a.pop("counts")
    b.pop("counts")
    assert compare_documents(a, b) == []


@pytest.mark.parametrize("event,reason", [
    ({"type": "nope", "qty": "x"}, "bad_type"),
    ({"qty": 1}, "bad_type"),
    ({"type": "new", "source": 0, "order_id": 1, "account": 99999, "instrument": 1,
      "side": "up", "qty": 1, "price": 1.0}, "bad_field"),  # bad_field before out_of_range
    ({"type": "new", "order_id": 1, "account": 1, "instrument": 1, "side": "buy",
      "qty": 1.0, "price": 1.0}, "bad_field"),  # 1.0 is not a JSON integer
    ({"type": "new", "order_id": 1, "account": 1, "instrument": 1, "side": "buy",
      "qty": True, "price": 1.0}, "bad_field"),
    ({"type": "new", "order_id": 1, "account": -1, "instrument": 1, "side": "buy",
      "qty": 1, "price": 1.0}, "bad_field"),
    ({"type": "new", "order_id": 2**63, "account": 1, "instrument": 1, "side": "buy",
      "qty": 1, "price": 1.0}, "bad_field"),
    ({"type": "new", "order_id": 1, "account": 1, "instrument": 1, "side": "buy",
      "qty": 10**12 + 1, "price": 1.0}, "bad_field"),
    ({"type": "new", "source": 1024, "order_id": 1, "account": 1, "instrument": 1,
      "side": "buy", "qty": 1, "price": 1.0}, "out_of_range"),
    ({"type": "new", "order_id": 1, "account": 2**40, "instrument": 1, "side": "buy",
      "qty": 1, "price": 1.0}, "out_of_range"),
    ({"type": "cancel", "source": 2000, "order_id": 1}, "out_of_range"),
    ({"type": "cancel", "order_id": 1}, "unknown_order"),
    ({"type": "replace", "order_id": 1, "qty": 5, "price": -1}, "bad_field"),
    ({"type": "fill", "order_id": 1, "account": 1, "instrument": 1, "side": "buy",
      "qty": 1, "price": 0}, "bad_field"),
    ({"type": "position", "account": 1, "instrument": 1, "qty": -(10**12)}, None),
    ({"type": "position", "account": 1, "instrument": 1, "qty": 5, "price": 0}, "bad_field"),
    ({"type": "instrument", "instrument": 1, "multiplier": 0, "margin_rate": 0, "beta": 0,
      "sector": 0}, "bad_field"),
    ({"type": "instrument", "instrument": 1, "multiplier": 1, "margin_rate": 0, "beta": 0,
      "sector": 256}, "out_of_range"),
    ({"type": "limit", "account": 1, "loss": -5}, "bad_field"),
    ({"type": "limit", "account": 1, "gross": None}, "bad_field"),
    ({"type": "limit", "account": 4096}, "out_of_range"),
    ({"type": "mark", "instrument": 65536, "price": 1}, "out_of_range"),
])
def test_reject_reasons_follow_the_spec_precedence(run, event, reason):
    assert run([event]).statuses() == [reason]


def test_reference_price_follows_accepted_prices_until_the_first_mark(run):
    r = run([new(1, price=50.0), fill(1, qty=10, price=51.0), replace(1, 100, price=0),
             fill(9, "sell", 1, 52.0, account=2)])
    assert r.doc["instruments"][0]["ref_price"] == 52.0  # late fills count too
    r = run([new(1, price=50.0), {"type": "mark", "instrument": 1, "price": 40.0},
             fill(1, qty=10, price=51.0), new(2, price=55.0)])
    assert r.doc["instruments"][0]["ref_price"] == 40.0
    r = run([new(1, price=50.0), fill(1, "sell", 1, 60.0)])  # mismatch: not accepted
    assert r.doc["instruments"][0]["ref_price"] == 50.0


def test_position_without_price_starts_pnl_at_the_reference_price(run):
    r = run([MARK, {"type": "position", "account": 1, "instrument": 1, "qty": 10},
             {"type": "mark", "instrument": 1, "price": 103.0}])
    assert r.position(1, 1)["pnl"] == pytest.approx(30.0)
    r = run([MARK, fill(5, qty=4, price=101.0),
             {"type": "position", "account": 1, "instrument": 1, "qty": -2, "price": 90.0}])
    assert r.position(1, 1)["pos"] == -2  # sets, does not add; flow restarts
    assert r.position(1, 1)["pnl"] == pytest.approx(-2 * 100.0 + 2 * 90.0)


def test_reference_data_change_revalues_existing_cells_and_moves_sector(run):
    r = run([MARK, new(1, "buy", 10), fill(1, "buy", 10),
             {**INST, "multiplier": 3.0, "sector": 9}])
    acc = r.account(1)
    assert acc["long_mv"] == pytest.approx(10 * 100 * 3)
    assert acc["margin"] == pytest.approx(10 * 100 * 3 * 0.5)
    assert acc["beta_net"] == pytest.approx(10 * 100 * 3 * 2)
    secs = {s["sector"]: s for s in r.doc["sectors"]}
    assert secs[9]["gross_mv"] == pytest.approx(3000) and secs.get(0, {}).get("gross_mv", 0) == 0


def test_crossing_is_what_pms_hold_against_each_other(run):
    r = run([MARK, fill(1, "buy", 10, account=1), fill(2, "short", 4, account=2)])
    f = r.doc["fund"]
    assert f["gross"] == pytest.approx(1400) and f["net_long_mv"] == pytest.approx(600)
    assert f["crossing"] == pytest.approx(800)


def test_breach_bits(run):
    lim = {"type": "limit", "account": 1, "gross": 500.0, "net": 100.0, "margin": 100.0,
           "loss": 5.0}
    r = run([lim, MARK, fill(1, "buy", 4, 101.0), new(2, "buy", 10)])
    # gross 400 (ok), net 400 > 100, margin 400 > 100, worst 1400 > 500, pnl -4 (ok)
    assert r.account(1)["breach"] == 2 | 4 | 8
    r = run([lim, MARK, fill(1, "buy", 6, 102.0)])
    assert r.account(1)["breach"] == 1 | 2 | 4 | 8 | 16
    r = run([{**lim, "gross": 0, "net": 0, "margin": 0, "loss": 0}, MARK, fill(1, qty=99)])
    assert r.account(1)["breach"] == 0


def test_live_order_capacity_is_a_capacity_reject(run):
    caps = Capacities(orders=3, cells=10)
    r = run([new(k) for k in range(5)] + [cancel(0), new(9)], caps)
    assert r.statuses() == [None, None, None, "capacity", "capacity", None, None]
    assert r.doc["fund"]["live_orders"] == 3
    assert r.scratch == r.doc


def test_cell_capacity_is_a_capacity_reject_and_existing_cells_keep_working(run):
    caps = Capacities(orders=10, cells=2)
    r = run([fill(1, account=1), fill(2, account=2), fill(3, account=3),
             new(4, account=3), {"type": "position", "account": 3, "instrument": 1, "qty": 1},
             fill(5, account=1), new(6, account=2)], caps)
    assert r.statuses() == ["late_fill", "late_fill", "capacity", "capacity", "capacity",
                            "late_fill", None]
    assert r.position(1, 1)["pos"] == 200 and r.account(2)["live_orders"] == 1
    assert compare_documents(r.doc, r.scratch) == []


def test_deleting_and_reinserting_orders_many_times_keeps_the_table_correct(run):
    """A tiny slot table (64 slots) churned through 20,000 lifecycles in random order."""
    rng = np.random.default_rng(7)
    print("seed 7")
    caps = Capacities(orders=32, cells=64)
    events, live = [], set()
    for _ in range(20_000):
        if live and (len(live) >= 32 or rng.random() < 0.5):
            oid = int(rng.choice(sorted(live)))
            live.discard(oid)
            events.append(cancel(oid, source=oid % 3))
        else:
            oid = int(rng.integers(0, 200)) * 16 + int(rng.integers(0, 3))  # collide blocks
            if oid in live:
                continue
            live.add(oid)
            events.append(new(oid, source=oid % 3, account=oid % 5))
    events += [cancel(oid, source=oid % 3) for oid in sorted(live)]
    r = run(events, caps)
    assert all(s is None for s in r.statuses()), "a live order was lost or duplicated"
    assert r.doc["fund"]["live_orders"] == 0
    assert (r.state.orders["cell"] < 0).all()


def test_tallies_return_to_zero_when_the_book_goes_flat(run):
    """Compensated sums: huge values added and removed leave no residue."""
    ev = [{"type": "mark", "instrument": i, "price": 1e6 + i / 7} for i in range(50)]
    for i in range(50):
        ev += [fill(i, "buy", 10**12 - i, 1e6, account=i % 7, instrument=i),
               fill(10_000 + i, "sell", 10**12 - i, 1e6, account=i % 7, instrument=i)]
    ev += [{"type": "mark", "instrument": i, "price": 3.3 + i} for i in range(50)]
    f = run(ev).doc["fund"]
    for k in ("long_mv", "short_mv", "gross", "net", "worst_gross", "margin", "beta_net"):
        assert abs(f[k]) <= 1e-6, k


def test_a_batch_reports_each_changed_account_once_with_its_last_event():
    buf, st = allocate(Capacities(accounts=16, instruments=16, orders=16, cells=16))
    recs = np.zeros(5, EVENT_DTYPE)
    recs["gseq"] = [1, 2, 3, 4, 5]
    recs["type"] = [9, 9, 9, 2, 9]      # fill, fill, fill, limit, fill (bad qty)
    recs["account"] = [3, 5, 3, 7, 3]
    recs["instrument"] = 1
    recs["side"] = 1
    recs["qty"] = [1, 1, 1, 0, 0]
    recs["price"] = 2.0
    status = np.zeros(5, np.uint8)
    assert apply_batch(st, recs, status) == 5
    changed = st.changed[: st.ctr[C_NCHANGED]].tolist()
    assert sorted(changed) == [3, 5, 7]
    assert st.acc_gseq[3] == 3 and st.acc_gseq[5] == 2 and st.acc_gseq[7] == 4
    apply_batch(st, recs[:1], status[:1])
    assert st.changed[: st.ctr[C_NCHANGED]].tolist() == [3]


def test_random_bytes_as_records_never_break_the_kernel(run):
    """A binary client can send anything: every record is validated by the kernel."""
    seed = 11
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=20_000 * 128, dtype=np.uint8)
    recs = raw.view(EVENT_DTYPE).copy()
    # Make a share of them plausible so that deeper paths run too.
    recs["type"][::2] = rng.integers(1, 10, size=len(recs[::2]))
    recs["reject"] = 0
    recs["account"][::3] %= 4096
    recs["instrument"][::3] %= 65536
    recs["source"][::3] %= 1024
    recs["side"][::3] = rng.integers(1, 4, size=len(recs[::3]))
    recs["qty"][::3] = rng.integers(1, 1000, size=len(recs[::3]))
    recs["price"][::3] = rng.random(len(recs[::3])) * 100
    recs["order_id"][::3] %= 50
    recs["gseq"] = 0
    from exposure.engine.replay import Engine
    eng = Engine(Capacities(orders=1000, cells=5000))
    status = eng.apply(recs)
    assert set(np.unique(status).tolist()) <= {0, 1, 2, 3, 4, 5, 6, 7, 0x80}
    from exposure.engine.document import document, document_from_cells
    assert compare_documents(document(eng.state), document_from_cells(eng.state)) == []


@pytest.mark.parametrize("token,reason", [
    (str(2**64), "out_of_range"),          # orjson would read this as a float
    ("1" + "0" * 5000, "out_of_range"),    # beyond Python's int-conversion limit
    ("-1" + "0" * 5000, "bad_field"),
    ("18446744073709551616.5", "bad_field"),  # a JSON float, not an integer
])
def test_integers_beyond_64_bits_keep_their_kind(run, token, reason):
    line = '{"type": "mark", "instrument": ' + token + ', "price": 1.0}'
    assert run([line]).statuses() == [reason]
