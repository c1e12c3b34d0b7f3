"""SPEC section 7 (currencies) in the engine, rule by rule: the ``fx`` record on both parse
paths, valuation and P&L in the base currency, an ``fx`` revaluing every instrument of its
currency (and only those), instruments that change currency, the rejections and their
precedence, the roll, replay in any batching, and a snapshot taken mid-stream that
recovers to what replay computes."""

import json
import subprocess
import sys

import numpy as np
import orjson
import pytest
from reference_model import run_lines
from support import Run, currency_chains_ok

from exposure.bench.flowgen import generate, to_jsonl
from exposure.core.capacity import Capacities
from exposure.core.types import (
    C_BCAST_ACCEPTED,
    C_BCAST_BAD_FIELD,
    C_BCAST_OUT_OF_RANGE,
    EVENT_DTYPE,
    T_FX,
    T_INSTRUMENT,
    TYPE_CODES,
)
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import (
    parse_events,
    record_objects,
    record_values,
    records_from_objects,
)
from exposure.engine.replay import Engine
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_layout import allocate
from exposure.store.snapshot import load_snapshot, write_snapshot

USD, JPY, EUR = 0, 2, 3


def inst(i=1, currency=None, multiplier=10.0, sector=4):
    e = {"type": "instrument", "instrument": i, "multiplier": multiplier,
         "margin_rate": 0.5, "beta": 2.0, "sector": sector}
    if currency is not None:
        e["currency"] = currency
    return e


def fx(currency, rate):
    return {"type": "fx", "currency": currency, "rate": rate}


def mark(price, instrument=1):
    return {"type": "mark", "instrument": instrument, "price": price}


def fill(oid, side="buy", qty=100, price=100.0, account=1, instrument=1):
    return {"type": "fill", "order_id": oid, "account": account, "instrument": instrument,
            "side": side, "qty": qty, "price": price}


def agrees_with_the_model(r: Run, lines, **caps) -> None:
    want, statuses = run_lines([json.dumps(x) for x in lines], **caps)
    assert r.statuses() == statuses
    assert compare_documents(r.doc, want) == []
    assert compare_documents(r.doc, r.scratch) == []


# ----------------------------------------------------------------------------- the records
def test_fx_is_record_type_12_with_currency_in_qty_and_rate_in_price_on_both_paths():
    assert TYPE_CODES["fx"] == T_FX == 12
    objs = [fx(JPY, 0.0067), inst(7, EUR), inst(8), {"type": "fx", "currency": 2},
            {"type": "fx", "currency": 2.0, "rate": 1.0}, inst(9, "JPY")]
    col = records_from_objects(objs)
    assert col["type"].tolist() == [T_FX, T_INSTRUMENT, T_INSTRUMENT, T_FX, T_FX, T_INSTRUMENT]
    assert col["qty"].tolist()[:3] == [JPY, EUR, 0]  # an instrument without the key: 0
    assert col["price"][0] == 0.0067
    assert col["reject"].tolist() == [0, 0, 0, 2, 2, 2]  # bad_field: missing, wrong kinds
    for k, o in enumerate(objs):  # the Producer's one-object path: the same bytes
        assert record_values(o) == col[k].item()
    assert record_objects(col[:3]) == [fx(JPY, 0.0067), inst(7, EUR), inst(8)]


# ----------------------------------------------------------------------------- valuation
def test_tallies_are_in_the_base_currency_and_pnl_is_converted_at_the_current_rate(run):
    # 100 yen-quoted shares bought at 1,000 yen, multiplier 10; a yen is 0.0067 dollars.
    lines = [inst(1, JPY), fx(JPY, 0.0067), fill(1, "buy", 100, 1000.0), mark(1100.0)]
    r = run(lines)
    assert r.statuses() == [None, None, "late_fill", None]
    v = 1100.0 * 10.0 * 0.0067
    acc = r.account(1)
    assert acc["long_mv"] == pytest.approx(100 * v)
    assert acc["margin"] == pytest.approx(100 * v * 0.5)
    assert acc["beta_net"] == pytest.approx(100 * v * 2.0)
    assert acc["pnl"] == pytest.approx(10.0 * 0.0067 * (100 * 1100.0 - 100 * 1000.0))
    assert r.doc["sectors"] == [{"sector": 4, "net_mv": pytest.approx(100 * v),
                                 "gross_mv": pytest.approx(100 * v)}]
    # prices stay in yen: the instrument row shows the yen price, nothing more (SPEC 4)
    assert r.doc["instruments"] == [{"instrument": 1, "ref_price": 1100.0, "fund_pos": 100,
                                     "open_buy": 0, "open_sell": 0}]
    agrees_with_the_model(r, lines)


def test_an_fx_moves_every_tally_of_its_currencys_instruments_and_no_others(run):
    lines = [inst(1, JPY), inst(2, JPY, sector=5), inst(3, EUR), inst(4),
             fill(1, "buy", 100, 1000.0, account=1, instrument=1),
             fill(2, "short", 50, 2000.0, account=2, instrument=2),
             fill(3, "buy", 10, 50.0, account=1, instrument=3),
             fill(4, "sell", 10, 30.0, account=3, instrument=4)]
    before = run(lines)
    after = run(lines + [fx(JPY, 0.0067)])
    # before any fx every rate is 1.0: the yen prices count as dollars
    assert before.account(2)["short_mv"] == pytest.approx(50 * 2000.0 * 10.0)
    assert after.account(2)["short_mv"] == pytest.approx(50 * 2000.0 * 10.0 * 0.0067)
    assert after.account(1)["long_mv"] == pytest.approx(100 * 1000.0 * 10 * 0.0067
                                                        + 10 * 50.0 * 10)
    assert after.account(3) == before.account(3)  # dollars: untouched
    sec = {s["sector"]: s for s in after.doc["sectors"]}
    assert sec[5]["net_mv"] == pytest.approx(-50 * 2000.0 * 10.0 * 0.0067)
    agrees_with_the_model(after, lines + [fx(JPY, 0.0067)])
    # a second fx moves them again, from the first rate
    agrees_with_the_model(run(lines + [fx(JPY, 0.0067), fx(JPY, 0.0071), fx(EUR, 1.08)]),
                          lines + [fx(JPY, 0.0067), fx(JPY, 0.0071), fx(EUR, 1.08)])


def test_an_instrument_that_changes_currency_is_revalued_and_leaves_its_old_currency(run):
    lines = [inst(1, JPY), inst(2, JPY), inst(3, JPY), fx(JPY, 0.5), fx(EUR, 2.0),
             fill(1, "buy", 10, 100.0, instrument=1), fill(2, "buy", 10, 100.0, instrument=2),
             fill(3, "buy", 10, 100.0, instrument=3),
             inst(2, EUR),            # the middle of the yen chain moves to euros
             fx(JPY, 0.25),           # moves 1 and 3 only
             inst(3, USD),            # the head of the chain moves to the base
             fx(JPY, 0.125), fx(EUR, 4.0),
             inst(2, JPY), inst(2, JPY), inst(1, EUR),  # and back; again; the last one out
             fx(JPY, 0.1), fx(EUR, 3.0)]
    r = run(lines)
    assert set(r.statuses()) == {None, "late_fill"}
    want = 10 * 100.0 * 10.0 * (3.0 + 0.1 + 1.0)  # 1 in euros, 2 in yen, 3 in dollars
    assert r.account(1)["long_mv"] == pytest.approx(want)
    assert currency_chains_ok(r.state)
    agrees_with_the_model(r, lines)


def test_a_roll_starts_the_day_at_the_current_rate_and_later_fx_moves_only_new_pnl(run):
    lines = [inst(1, EUR), fx(EUR, 1.1), fill(1, "buy", 100, 50.0), mark(55.0), {"type": "roll"}]
    r = run(lines)
    assert r.account(1)["pnl"] == 0.0
    r = run(lines + [fx(EUR, 1.2)])
    assert r.account(1)["pnl"] == 0.0  # no P&L since the roll: converted, still 0
    assert r.account(1)["long_mv"] == pytest.approx(100 * 55.0 * 10.0 * 1.2)
    lines += [fx(EUR, 1.2), mark(56.0)]
    r = run(lines)
    assert r.account(1)["pnl"] == pytest.approx(10.0 * 1.2 * 100 * (56.0 - 55.0))
    agrees_with_the_model(r, lines)


# ----------------------------------------------------------------------------- rejections
@pytest.mark.parametrize("event, reason", [
    (fx(0, 1.1), "bad_field"),                     # the base currency has no rate
    (fx(-1, 1.1), "bad_field"),                    # not an id
    (fx(256, 1.1), "out_of_range"),                # at capacity
    (fx(2**64, 1.1), "out_of_range"),
    (fx(256, -1.0), "bad_field"),                  # rule 2 before rule 3
    (fx(0, 0.0), "bad_field"),
    (fx(JPY, 0.0), "bad_field"),
    (fx(JPY, -0.0067), "bad_field"),
    (fx(JPY, "0.0067"), "bad_field"),
    (fx(JPY, 1e400), "bad_field"),                 # not finite (JSON's Infinity)
    (fx(JPY, float("nan")), "bad_field"),
    ({"type": "fx", "rate": 1.1}, "bad_field"),    # missing
    ({"type": "fx", "currency": 2}, "bad_field"),
    (fx(True, 1.1), "bad_field"),
    (inst(1, 256), "out_of_range"),
    (inst(1, -1), "bad_field"),
    (inst(1, 2.0), "bad_field"),
    ({**inst(1, 256), "multiplier": 0.0}, "bad_field"),
], ids=lambda x: json.dumps(x) if isinstance(x, dict) else x)
def test_spec_7_rejections_and_their_precedence(run, event, reason):
    lines = [inst(1, JPY), fx(JPY, 0.5), fill(1, "buy", 10, 100.0), event]
    r = run(lines)
    assert r.statuses()[-1] == reason
    assert compare_documents(r.doc, run(lines[:-1]).doc | {"counts": r.doc["counts"]}) == []
    assert r.doc["counts"]["rejects"] == {reason: 1}
    agrees_with_the_model(r, lines)


def test_binary_records_get_the_same_rejections():
    """A binary client can put any value in the record: the kernel checks every field."""
    recs = np.zeros(6, EVENT_DTYPE)
    recs["type"] = [T_FX, T_FX, T_FX, T_INSTRUMENT, T_INSTRUMENT, T_FX]
    recs["qty"] = [-5, 2**40, 3, -1, 300, 3]
    recs["price"] = [1.0, 1.0, np.inf, 0.0, 0.0, 2.0]
    recs["x0"] = recs["x1"] = 1.0  # an instrument's multiplier and margin rate
    recs["instrument"] = 1
    eng = Engine()
    status = eng.apply(recs)
    assert status.tolist() == [2, 3, 2, 2, 3, 0]  # bad_field, out_of_range, ..., accepted
    assert eng.state.rate[3] == 2.0 and eng.state.rate[0] == 1.0
    ctr = eng.state.ctr  # broadcast events, which a cluster counts once (SPEC 5, 7)
    assert (ctr[C_BCAST_ACCEPTED], ctr[C_BCAST_BAD_FIELD], ctr[C_BCAST_OUT_OF_RANGE]) == (1, 3,
                                                                                         2)


# ----------------------------------------------------------------------------- replay
def _currency_day(n: int, seed: int) -> list[str]:
    """A generated day (flowgen) whose instruments are spread over five currencies (its own
    ``instrument`` events carry them), with an fx of one of them every 50 events and, every
    997, an instrument moved to another currency."""
    rng = np.random.default_rng(seed)
    recs = generate(n, accounts=40, instruments=300, universe=30, live_target=2000, seed=seed)
    described = recs["type"] == T_INSTRUMENT
    recs["qty"][described] = rng.integers(0, 5, int(described.sum()))
    ids = np.unique(recs["instrument"][described]).tolist()
    lines = to_jsonl(recs).decode().splitlines()
    rates = {c: float(rng.choice([0.0067, 0.92, 1.08, 1.27])) for c in range(1, 5)}
    out = []
    for k, line in enumerate(lines):
        out.append(line)
        if k % 50 == 49:
            c = int(rng.integers(1, 5))
            rates[c] *= float(rng.uniform(0.98, 1.02))
            out.append(json.dumps(fx(c, rates[c])))
        if k % 997 == 996:
            out.append(json.dumps(inst(int(rng.choice(ids)), int(rng.integers(0, 5)))))
    return out


def test_a_generated_day_in_five_currencies_agrees_with_the_model_in_any_batching():
    seed = 29
    print(f"seed {seed}")
    lines = _currency_day(10_000, seed)
    recs = parse_events("\n".join(lines).encode())
    want, statuses = run_lines(lines)
    assert statuses.count(None) > 10_000 // 2
    for batch in (65536, 1000, 7):
        eng = Engine()
        status = eng.apply(recs, batch=batch)
        assert (status != 0).sum() == sum(s is not None for s in statuses)
        assert compare_documents(document(eng.state), want, rel=1e-13) == [], batch
        assert currency_chains_ok(eng.state)


def test_a_snapshot_taken_mid_stream_recovers_to_what_replay_computes(tmp_path):
    """The rates, the currencies and their chains travel in the state buffer: a state
    loaded from a snapshot and fed the rest of the stream equals replay of all of it."""
    caps = Capacities(accounts=64, instruments=65536, sectors=16, orders=4096, cells=8192)
    lines = _currency_day(6000, 7)
    recs = parse_events("\n".join(lines).encode())
    recs["gseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)
    cut = len(recs) // 2
    first = Engine(caps)
    first.apply(recs[:cut])
    sessions = np.zeros((3, SESSION_COLS), np.uint64)
    path = write_snapshot(tmp_path, cut, first.buf, sessions)
    buf, st = allocate(caps)
    assert load_snapshot(path, buf, np.zeros_like(sessions)) == cut
    assert (st.rate != 1.0).sum() == 4 and (st.cur_head >= 0).sum() == 4
    eng = Engine(caps)
    eng.buf, eng.state = buf, st
    eng.apply(recs[cut:])
    whole = Engine(caps)
    whole.apply(recs)
    assert compare_documents(document(st), document(whole.state)) == []
    assert np.array_equal(st.rate, whole.state.rate)
    assert np.array_equal(st.cur_head, whole.state.cur_head)
    assert np.array_equal(st.cprev, whole.state.cprev) and currency_chains_ok(st)
    for f in ("currency", "cnext", "ref_price", "multiplier", "sector", "fund_pos", "gseq"):
        assert np.array_equal(st.inst[f], whole.state.inst[f]), f  # (not the batch's flags)


@pytest.mark.process
def test_the_replay_command_values_a_day_in_five_currencies_as_the_model(tmp_path):
    seed = 31
    print(f"seed {seed}")
    lines = _currency_day(3000, seed)
    path = tmp_path / "fx-day.jsonl"
    path.write_text("\n".join(lines) + "\n")
    p = subprocess.run([sys.executable, "-m", "exposure", "replay", str(path)],
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    want, _ = run_lines(lines)
    assert compare_documents(orjson.loads(p.stdout), want, rel=1e-13) == []
    # the base-currency figures are not the one-currency ones: the rates matter
    flat, _ = run_lines([ln for ln in lines if '"type": "fx"' not in ln])  # every rate 1.0
    assert abs(want["fund"]["gross"] - flat["fund"]["gross"]) > 0.01 * flat["fund"]["gross"]
