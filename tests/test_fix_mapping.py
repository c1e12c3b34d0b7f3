"""FIX ExecutionReports to SPEC events (exposure/fix/mapping.py) and the dead-letter file
(exposure/fix/deadletter.py): the mapping table for FIX.4.2 and FIX.4.4, the order key,
ExecID deduplication, busts and corrections, dead letters, determinism, snapshots and the
state's bounds. Messages are dict-backed stand-ins for the codec's FixMessage."""

from __future__ import annotations

import json
import random
import struct
import zlib

import orjson
import pytest

from exposure.core import types
from exposure.core.refdata import Account, Instrument, RefData
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import parse_events
from exposure.engine.replay import Engine
from exposure.fix.deadletter import (
    DeadLetterFile,
    DeadLetterFull,
    RawFields,
    read_dead_letters,
    redeliver,
    rewrite,
    show_raw,
)
from exposure.fix.mapping import Mapper, MapperStateError, MapResult

HAS_BUST = hasattr(types, "T_BUST")

# Tag numbers by the names the tests use.
TAGS = {"msg_type": 35, "exec_id": 17, "exec_type": 150, "trans_type": 20, "ref": 19,
        "clordid": 11, "orig": 41, "orderid": 37, "account": 1, "symbol": 55,
        "security_id": 48, "id_source": 22, "side": 54, "order_qty": 38, "price": 44,
        "last_qty": 32, "last_px": 31, "leaves": 151, "status": 39, "currency": 15}


class Msg(dict):
    """A stand-in for FixMessage: ``get(tag)`` is the value as text, or None."""

    __slots__ = ()
    get = dict.get


def er(exec_type: str | None, exec_id: str, **fields: str) -> Msg:
    m = Msg({35: "8", 17: exec_id})
    if exec_type is not None:
        m[150] = exec_type
    for k, v in fields.items():
        m[TAGS[k]] = v
    return m


REF = RefData.from_rows(
    [Instrument(7, "AAPL", name="Apple", security_id="US0378331005", security_id_source="4"),
     Instrument(8, "MSFT"), Instrument(9, "VOD.L", security_id="BH4HKS3", security_id_source="2")],
    [Account(3, "PM1"), Account(4, "PM2")])
ORDER = dict(account="PM1", symbol="AAPL", side="1")


def mapper(**kw) -> Mapper:
    kw.setdefault("source", 5)
    return Mapper(REF, **kw)


def new(m: Mapper, clordid: str, exec_id: str, qty: str = "100", price: str | None = "10",
        **kw) -> MapResult:
    f = {**ORDER, "clordid": clordid, "order_qty": qty, **kw}
    if price is not None:
        f["price"] = price
    return m.map(er("0", exec_id, **f))


def fill(m: Mapper, clordid: str, exec_id: str, qty: str = "40", px: str = "10.5",
         **kw) -> MapResult:
    return m.map(er("F", exec_id, **{**ORDER, "clordid": clordid, "last_qty": qty,
                                     "last_px": px, **kw}))


def one(res: MapResult) -> dict:
    assert res.dead is None and res.counted is None, res
    assert len(res.events) == 1, res
    return res.events[0]


# ------------------------------------------------------------------------ the table
@pytest.mark.parametrize("begin", ["FIX.4.4", "FIXT.1.1", "FIX.4.2"])
def test_each_exec_type_maps_as_the_table_says(begin):
    m = mapper(begin_string=begin)
    assert one(new(m, "c1", "e1")) == {"type": "new", "source": 5, "order_id": 1,
                                       "account": 3, "instrument": 7, "side": "buy",
                                       "qty": 100, "price": 10.0}
    assert one(fill(m, "c1", "e2")) == {"type": "fill", "source": 5, "order_id": 1,
                                        "account": 3, "instrument": 7, "side": "buy",
                                        "qty": 40, "price": 10.5}
    for et in ("5", "D"):
        assert one(m.map(er(et, f"r{et}", clordid="c1", order_qty="300", price="11"))) == \
            {"type": "replace", "source": 5, "order_id": 1, "qty": 300, "price": 11.0}
    # a replace without a Price: 0
    assert one(m.map(er("5", "r0", clordid="c1", order_qty="250")))["price"] == 0.0
    assert one(m.map(er("4", "x1", clordid="c1"))) == {"type": "cancel", "source": 5,
                                                       "order_id": 1}
    for k, et in enumerate(("C", "3", "8")):
        new(m, f"d{k}", f"dn{k}")
        assert one(m.map(er(et, f"dd{k}", clordid=f"d{k}"))) == {
            "type": "done", "source": 5, "order_id": 2 + k}
    for et, name in (("A", "pending_new"), ("6", "pending_cancel"),
                     ("E", "pending_replace"), ("I", "order_status")):
        res = m.map(er(et, f"p{et}", clordid="c1", **ORDER))
        assert res.events == [] and res.counted == name and res.dead is None
    # H: the bust of the trade ExecRefID names, with that trade's fields
    assert m.map(er("H", "b1", ref="e2", clordid="c1")).events == [
        {"type": "bust", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 40, "price": 10.5}]
    # G: the bust of the trade, then the corrected fill
    fill(m, "c1", "e3", qty="10", px="10.25")
    assert m.map(er("G", "g1", ref="e3", clordid="c1", last_qty="12",
                    last_px="10.20", **ORDER)).events == [
        {"type": "bust", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 10, "price": 10.25},
        {"type": "fill", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 12, "price": 10.2}]


def test_fix42_exec_trans_type_and_the_fill_exec_types():
    m = mapper(begin_string="FIX.4.2")
    new(m, "c1", "e1", trans_type="0")
    assert one(m.map(er("1", "e2", trans_type="0", clordid="c1", last_qty="30",
                        last_px="10", **ORDER)))["type"] == "fill"
    assert one(m.map(er("2", "e3", clordid="c1", last_qty="70", last_px="10.5",
                        **ORDER)))["qty"] == 70
    # ExecTransType 1 (cancel): a bust of the trade ExecRefID names
    assert m.map(er("2", "e4", trans_type="1", ref="e3", clordid="c1")).events == [
        {"type": "bust", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 70, "price": 10.5}]
    # ExecTransType 2 (correct): a bust and the corrected fill
    assert [e["type"] for e in m.map(er("1", "e5", trans_type="2", ref="e2", clordid="c1",
                                        last_qty="25", last_px="10",
                                        **ORDER)).events] == ["bust", "fill"]
    # ExecTransType 3 (status): counted
    assert m.map(er("1", "e6", trans_type="3", clordid="c1")).counted == "status"
    # a cancel of a report that is not a trade: counted; of one never seen: dead
    assert m.map(er("0", "e7", trans_type="1", ref="e1", clordid="c1")).counted == \
        "cancel_of_non_trade"
    res = m.map(er("1", "e8", trans_type="1", ref="nope", clordid="c1"))
    assert res.dead_kind == "unknown_exec_ref" and "'nope'" in res.dead
    assert m.map(er("0", "e9", trans_type="7", clordid="c1")).dead_kind == "bad_field"


def test_fix44_ignores_exec_trans_type():
    m = mapper(begin_string="FIX.4.4")
    new(m, "c1", "e1")
    assert one(fill(m, "c1", "e2", trans_type="1"))["type"] == "fill"


@pytest.mark.parametrize("side,name", [("1", "buy"), ("2", "sell"), ("5", "short"),
                                       ("6", "short"), ("3", "buy"), ("4", "sell")])
def test_side(side, name):
    m = mapper()
    assert one(new(m, "c1", "e1", side=side))["side"] == name


def test_an_unsupported_side_is_a_dead_letter():
    res = new(mapper(), "c1", "e1", side="8")
    assert res.events == [] and res.dead_kind == "unsupported" and "Side (54)" in res.dead


# ------------------------------------------------------------------------ the order key
def test_the_clordid_chain_through_replace_and_cancel_and_a_late_fill():
    m = mapper()
    assert one(new(m, "A1", "e1"))["order_id"] == 1
    assert one(new(m, "B1", "e2"))["order_id"] == 2
    # replace: the new ClOrdID A2 continues A1 (OrigClOrdID)
    assert one(m.map(er("5", "e3", clordid="A2", orig="A1", order_qty="50")))["order_id"] == 1
    assert one(fill(m, "A2", "e4"))["order_id"] == 1
    # a second replace, then a cancel whose ClOrdID is the cancel request's own
    assert one(m.map(er("5", "e5", clordid="A3", orig="A2", order_qty="60")))["order_id"] == 1
    assert one(m.map(er("4", "e6", clordid="A4", orig="A3")))["order_id"] == 1
    # a fill after the cancel still finds the order (the kernel counts it as a late fill)
    assert one(fill(m, "A3", "e7"))["order_id"] == 1
    assert one(fill(m, "A1", "e8"))["order_id"] == 1
    assert one(fill(m, "B1", "e9"))["order_id"] == 2
    # a cancel of a finished order, or of one never opened: counted, nothing sent
    assert m.map(er("4", "e10", clordid="A5", orig="A4")).counted == \
        "cancel_of_finished_order"
    assert m.map(er("8", "e11", clordid="R1")).counted == "done_of_unseen_order"
    assert m.map(er("5", "e12", clordid="R2", order_qty="5")).counted == \
        "replace_of_unseen_order"


def test_a_fill_of_an_order_never_seen_still_maps_with_a_new_order_id():
    m = mapper()
    new(m, "A1", "e1")
    ev = one(fill(m, "ZZ", "e2"))
    assert ev["order_id"] == 2 and ev["account"] == 3
    assert one(fill(m, "ZZ", "e3"))["order_id"] == 2


def test_a_report_with_only_the_order_id_finds_the_order_by_its_alias():
    m = mapper()
    new(m, "A1", "e1", orderid="X-1")
    ev = one(m.map(er("F", "e2", orderid="X-1", last_qty="5", last_px="9", **ORDER)))
    assert ev["order_id"] == 1
    # OrderID "NONE" (a rejected order's) links nothing
    new(m, "B1", "e3", orderid="NONE")
    new(m, "C1", "e4", orderid="NONE")
    assert one(m.map(er("4", "e5", clordid="C1", orderid="NONE")))["order_id"] == 3


def test_a_new_with_the_key_of_a_finished_order_is_a_new_order():
    m = mapper()
    new(m, "A1", "e1")
    m.map(er("4", "e2", clordid="A1"))
    assert one(new(m, "A1", "e3"))["order_id"] == 2
    assert one(fill(m, "A1", "e4"))["order_id"] == 2


def test_order_key_orderid():
    m = mapper(order_key="orderid")
    assert one(new(m, "A1", "e1", orderid="O1"))["order_id"] == 1
    # the ClOrdID changes on a replace; OrderID stays: no OrigClOrdID needed
    assert one(m.map(er("5", "e2", clordid="A2", orderid="O1", order_qty="70")))[
        "order_id"] == 1
    assert one(fill(m, "A9", "e3", orderid="O1"))["order_id"] == 1
    # without an OrderID: the ClOrdID
    assert one(new(m, "B1", "e4"))["order_id"] == 2


def test_a_report_without_an_order_key_is_a_dead_letter():
    m = mapper()
    res = m.map(er("F", "e1", last_qty="1", last_px="1", **ORDER))
    assert res.dead_kind == "missing_field" and "ClOrdID (11)" in res.dead


# ------------------------------------------------------------------------ ExecID
def test_an_exec_id_passed_on_before_maps_to_nothing():
    m = mapper()
    new(m, "A1", "e1")
    assert fill(m, "A1", "e2").events
    again = fill(m, "A1", "e2")
    assert again.events == [] and again.counted == "duplicate_exec_id"
    assert new(m, "A1", "e1").counted == "duplicate_exec_id"
    assert m.counts["counted_duplicate_exec_id"] == 2
    # a dead letter does not make its ExecID a duplicate: fixed and resent, it maps
    assert fill(m, "A1", "e3", account="PM9").dead_kind == "unknown_account"
    assert fill(m, "A1", "e3").events


# ------------------------------------------------------------------------ busts
def test_bust_and_correct_carry_the_original_trade():
    m = mapper()
    new(m, "A1", "e1", side="2", symbol="MSFT", account="PM2")
    fill(m, "A1", "t1", qty="40", px="20", side="2", symbol="MSFT", account="PM2")
    # the correction names other fields: they win; the bust carries the original's
    res = m.map(er("G", "t2", ref="t1", clordid="A1", last_qty="35", last_px="19.5",
                   side="2", symbol="MSFT", account="PM2"))
    assert res.events == [
        {"type": "bust", "source": 5, "order_id": 1, "account": 4, "instrument": 8,
         "side": "sell", "qty": 40, "price": 20.0},
        {"type": "fill", "source": 5, "order_id": 1, "account": 4, "instrument": 8,
         "side": "sell", "qty": 35, "price": 19.5}]
    # a correction without account, symbol or side: the original trade's
    res = m.map(er("G", "t3", ref="t2", clordid="A1", last_qty="30", last_px="19"))
    assert res.events[1] == {"type": "fill", "source": 5, "order_id": 1, "account": 4,
                             "instrument": 8, "side": "sell", "qty": 30, "price": 19.0}
    # the corrected trade (t3) can be busted; the corrected-away ones (t1, t2) cannot
    assert m.map(er("H", "t4", ref="t3", clordid="A1")).events[0]["qty"] == 30
    for ref, k in (("t1", 5), ("t2", 6), ("t3", 7)):
        res = m.map(er("H", f"t{k}", ref=ref, clordid="A1"))
        assert res.dead_kind == "unknown_exec_ref" and "busted already" in res.dead


def test_a_correction_to_nothing_is_the_bust_alone():
    m = mapper()
    new(m, "A1", "e1")
    fill(m, "A1", "t1")
    assert [e["type"] for e in m.map(er("G", "t2", ref="t1", clordid="A1", last_qty="0",
                                        last_px="0")).events] == ["bust"]


def test_a_bust_of_an_unknown_exec_ref_is_a_dead_letter():
    m = mapper()
    for et in ("H", "G"):
        res = m.map(er(et, f"b{et}", ref="never", clordid="A1", last_qty="1", last_px="1"))
        assert res.events == [] and res.dead_kind == "unknown_exec_ref"
    res = m.map(er("H", "b3", clordid="A1"))
    assert res.dead_kind == "missing_field" and "ExecRefID (19)" in res.dead


# ------------------------------------------------------------------------ names, fields
def test_unknown_account_and_symbol_are_dead_letters_and_change_nothing():
    m = mapper()
    before = m.snapshot()
    res = new(m, "A1", "e1", account="PM9")
    assert res.events == [] and res.dead_kind == "unknown_account" and "'PM9'" in res.dead
    res = new(m, "A1", "e2", symbol="TSLA")
    assert res.dead_kind == "unknown_instrument" and "'TSLA'" in res.dead
    res = m.map(er("0", "e3", clordid="A1", account="PM1", side="1", order_qty="5"))
    assert res.dead_kind == "missing_field" and "Symbol (55)" in res.dead
    # the mapping state is as before (only the counters moved)
    m.counts.clear()
    assert m.snapshot() == before
    assert one(new(m, "A1", "e4"))["order_id"] == 1


def test_currency_15_must_be_the_instruments_own_else_a_dead_letter():
    """SPEC section 7: a report's Currency (15), where present, is checked against the
    instrument's currency (instruments.csv's column; no column: the base currency)."""
    from exposure.core.currency import Currencies

    ref = RefData.from_rows([Instrument(7, "AAPL"), Instrument(8, "SONY", currency=2)],
                            [Account(3, "PM1")], Currencies.from_table("USD", {"JPY": 2}))
    for fast in (True, False):
        m = Mapper(ref, source=5)
        m.fast_path = fast
        assert one(new(m, "A1", "e1", currency="USD"))["instrument"] == 7
        assert one(new(m, "S1", "e2", symbol="SONY", currency="JPY", price="2500"))[
            "instrument"] == 8
        assert one(new(m, "S2", "e3", symbol="SONY"))["instrument"] == 8   # no tag 15
        m.counts.clear()
        before = m.snapshot()
        for exec_id, kw in (("x1", {"symbol": "SONY", "currency": "USD"}),
                            ("x2", {"currency": "JPY"}), ("x3", {"currency": "usd"}),
                            ("x4", {"currency": ""})):
            res = new(m, "S9", exec_id, **kw)
            assert res.events == [] and res.dead_kind == "currency_mismatch", res
            assert "Currency (15)" in res.dead and "is not instrument" in res.dead
        # a fill without a Symbol takes its order's instrument, and is checked against it
        res = m.map(er("F", "x5", clordid="S1", account="PM1", side="1", last_qty="5",
                       last_px="2501", currency="USD"))
        assert res.dead_kind == "currency_mismatch" and "instrument 8's currency JPY" in \
            res.dead
        assert m.counts["dead_currency_mismatch"] == 5
        m.counts.clear()
        assert m.snapshot() == before            # a dead letter changes nothing
        assert one(m.map(er("F", "f1", clordid="S1", account="PM1", side="1", last_qty="5",
                            last_px="2501", currency="JPY")))["instrument"] == 8


def test_security_id_with_its_source_names_the_instrument():
    m = mapper()
    assert one(new(m, "A1", "e1", symbol="whatever", security_id="BH4HKS3",
                   id_source="2"))["instrument"] == 9
    assert one(m.map(er("0", "e2", clordid="A2", account="PM1", side="1", order_qty="1",
                        security_id="US0378331005", id_source="4")))["instrument"] == 7
    # an unknown SecurityID falls back to the Symbol
    assert one(new(m, "A3", "e3", symbol="MSFT", security_id="X", id_source="4"))[
        "instrument"] == 8
    res = m.map(er("0", "e4", clordid="A4", account="PM1", side="1", order_qty="1",
                   security_id="X", id_source="4"))
    assert res.dead_kind == "unknown_instrument" and "SecurityID (48) 'X'" in res.dead


@pytest.mark.parametrize("qty,ok", [("100", 100), ("100.0", 100), ("100.", 100),
                                    ("100.5", None), ("1e2", None), ("-5", None),
                                    ("0", None), ("abc", None), ("", None),
                                    (str(10**12 + 1), None), (str(10**12), 10**12)])
def test_quantities_must_be_whole_numbers_in_range(qty, ok):
    res = new(mapper(), "A1", "e1", qty=qty)
    if ok is None:
        assert res.events == [] and res.dead_kind == "bad_field" and "OrderQty (38)" in \
            res.dead
    else:
        assert one(res)["qty"] == ok


def test_prices():
    m = mapper()
    assert one(new(m, "A1", "e1", price=None))["price"] == 0.0   # a market order
    assert one(new(m, "A2", "e2", price="0"))["price"] == 0.0
    assert one(new(m, "A3", "e3", price=".5"))["price"] == 0.5
    for bad in ("nan", "inf", "1e3", "1_0", " 1", "-1", "abc"):
        assert new(m, "A4", f"x{bad}", price=bad).dead_kind == "bad_field", bad
    # a fill needs LastPx > 0
    assert fill(m, "A1", "f1", px="0").dead_kind == "bad_field"
    assert m.map(er("F", "f2", clordid="A1", last_qty="1", **ORDER)).dead_kind == \
        "missing_field"


def test_other_messages_and_exec_types_are_dead_letters():
    m = mapper()
    assert m.map(Msg({35: "D", 17: "e1"})).dead_kind == "unsupported"
    assert m.map(er("Z", "e2", clordid="A1")).dead_kind == "unsupported"
    assert m.map(er(None, "e3", clordid="A1")).dead_kind == "missing_field"
    assert m.map(Msg({35: "8", 150: "0"})).dead == "missing ExecID (17)"


def test_hostile_values_never_raise():
    rng = random.Random(26)
    print("seed 26")
    junk = ["", "NONE", "\x00", "9" * 300, "-0", "1.5", "x" * 5000, "\ufffd", "0.0", "1e308",
            "F", "G", "H", "2", "5"]
    m = mapper()
    for k in range(3000):
        msg = Msg({t: rng.choice(junk) for t in rng.sample(list(TAGS.values()), 8)})
        msg[35] = "8"
        msg[17] = f"h{k}"
        res = m.map(msg)
        assert isinstance(res, MapResult)
        assert bool(res.events) + (res.counted is not None) + (res.dead is not None) == 1


# ------------------------------------------------------------------------ determinism
def flow(seed: int, n: int = 600) -> list[Msg]:
    """A seeded day of ExecutionReports: orders opened, filled, replaced, cancelled and
    done; busts and corrections; resent duplicates; pending and status reports; unknown
    names and bad quantities; fills of orders never seen."""
    rng = random.Random(seed)
    out: list[Msg] = []
    live: list[str] = []
    trades: list[str] = []
    k = 0
    for _ in range(n):
        k += 1
        r = rng.random()
        acct, sym = rng.choice(["PM1", "PM2", "PM1", "PM9"]), rng.choice(
            ["AAPL", "MSFT", "VOD.L", "TSLA", "AAPL"])
        base = dict(account=acct, symbol=sym, side=rng.choice("12565"),
                    leaves=str(rng.choice([0, 5, 10])))
        if r < 0.25 or not live:
            c = f"c{k}"
            live.append(c)
            out.append(er("0", f"n{k}", clordid=c, orderid=f"o{k}", order_qty="100",
                          price=rng.choice(["10", "10.5", "0"]), **base))
        elif r < 0.55:
            c = rng.choice(live)
            e = f"f{k}"
            trades.append(e)
            out.append(er("F", e, clordid=c, last_qty=rng.choice(["10", "20", "5.0", "1.5"]),
                          last_px=rng.choice(["10", "10.25", "9.75"]), **base))
        elif r < 0.62:
            c = rng.choice(live)
            c2 = f"c{k}"
            live[live.index(c)] = c2
            out.append(er(rng.choice("5D"), f"r{k}", clordid=c2, orig=c,
                          order_qty=rng.choice(["50", "150"]), price="11"))
        elif r < 0.68:
            c = rng.choice(live)
            out.append(er(rng.choice("4C38"), f"x{k}", clordid=f"c{k}", orig=c))
        elif r < 0.74 and trades:
            out.append(er("H", f"b{k}", ref=rng.choice(trades), clordid=rng.choice(live)))
        elif r < 0.80 and trades:
            e = f"g{k}"
            out.append(er("G", e, ref=rng.choice(trades), clordid=rng.choice(live),
                          last_qty="7", last_px="10.1", **base))
            trades.append(e)
        elif r < 0.86 and out:
            out.append(Msg(rng.choice(out)))   # a resend: the same ExecID
        elif r < 0.92:
            out.append(er(rng.choice("A6EI"), f"p{k}", clordid=rng.choice(live), **base))
        else:
            e = f"u{k}"
            trades.append(e)
            out.append(er("F", e, clordid=f"never{k}", last_qty="3", last_px="10", **base))
    return out


def run(m: Mapper, msgs: list[Msg]) -> list[tuple]:
    return [(tuple(map(json.dumps, r.events)), r.counted, r.dead) for r in map(m.map, msgs)]


def test_mapping_is_a_function_of_the_message_sequence():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    msgs = flow(seed)
    first = run(mapper(), msgs)
    assert run(mapper(), msgs) == first
    kinds = {("events" if e else "counted" if c else "dead") for e, c, _ in first}
    assert kinds == {"events", "counted", "dead"}
    # snapshot and restore midway: the same results, the same final state
    a = mapper()
    half = len(msgs) // 2
    head = run(a, msgs[:half])
    b = Mapper.restore(REF, a.snapshot(), source=5, order_key="clordid")
    assert head + run(b, msgs[half:]) == first
    run(a, msgs[half:])
    assert a.snapshot() == b.snapshot()
    assert a.counts == b.counts


def test_the_inlined_path_equals_the_general_path():
    for seed in (1, 2, 3):
        print("seed", seed)
        msgs = flow(seed, 800)
        fast, slow = mapper(), mapper()
        slow.fast_path = False
        assert run(fast, msgs) == run(slow, msgs)
        assert fast.snapshot() == slow.snapshot()


def test_a_snapshot_is_checked_before_it_is_restored():
    m = mapper()
    new(m, "A1", "e1")
    data = m.snapshot()
    with pytest.raises(MapperStateError, match="corrupt"):
        Mapper.restore(REF, data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(MapperStateError, match="magic"):
        Mapper.restore(REF, b"x" * 64)
    with pytest.raises(MapperStateError, match="too short"):
        Mapper.restore(REF, b"")
    with pytest.raises(MapperStateError, match="source 5, not 6"):
        Mapper.restore(REF, data, source=6)
    with pytest.raises(MapperStateError, match="keyed by clordid"):
        Mapper.restore(REF, data, order_key="orderid")


def _v1_snapshot(m: Mapper) -> bytes:
    """The snapshot as version 1 wrote it (lists of [order_id, ...] and [ExecID, ...])."""
    body = orjson.dumps({
        "source": m.source, "order_key": m.order_key, "next_id": m._next_id,
        "orders": [[oid, *r] for oid, r in m._orders.items()], "done": list(m._done),
        "trades": [[k, *t] for k, t in m._trades.items()], "reports": list(m._reports),
        "counts": m.counts})
    return struct.pack("<16sIIQ", b"EXPOSURE-FIXMAP\n", 1, zlib.crc32(body), len(body)) + body


def test_a_version_1_snapshot_restores_the_same_state():
    msgs = flow(11, 400)
    a = mapper()
    run(a, msgs[:200])
    b = Mapper.restore(REF, _v1_snapshot(a), source=5, order_key="clordid")
    assert b.snapshot() == a.snapshot()
    assert run(b, msgs[200:]) == run(a, msgs[200:])
    assert b.snapshot() == a.snapshot()


def test_a_snapshot_of_the_wrong_shape_is_refused_not_raised():
    m = mapper()
    new(m, "A1", "e1")
    good = orjson.loads(m.snapshot()[32:])
    for field, value in (("orders", [1, 2]), ("orders", {"x": []}), ("trades", [["e"]]),
                         ("orders", {"1": [["C"], True]}), ("trades", 5)):
        body = orjson.dumps({**good, field: value})
        data = struct.pack("<16sIIQ", b"EXPOSURE-FIXMAP\n", 2, zlib.crc32(body),
                           len(body)) + body
        with pytest.raises(MapperStateError, match="unreadable"):
            Mapper.restore(REF, data)


# ------------------------------------------------------------------------ bounds
def test_the_state_is_bounded_finished_orders_evicted_first():
    m = mapper(max_orders=3, max_trades=2, max_reports=4)
    new(m, "A", "e1")
    new(m, "B", "e2")
    m.map(er("4", "e3", clordid="B"))          # B finished
    new(m, "C", "e4")
    new(m, "D", "e5")                           # a 4th order: B (finished) goes first
    assert m.counts["evicted_orders"] == 1 and m.sizes["orders"] == 3
    assert one(fill(m, "A", "t1"))["order_id"] == 1
    # B is forgotten: a late fill of it is an order never seen (a new order_id)
    assert one(fill(m, "B", "t2"))["order_id"] == 5
    # none finished: the oldest live order goes
    assert m.counts["evicted_live_orders"] == 1
    # trades: only the last 2 are kept; a bust of an evicted one is a dead letter
    fill(m, "C", "t3")
    assert m.counts["evicted_trades"] == 1
    res = m.map(er("H", "b1", ref="t1", clordid="A"))
    assert res.dead_kind == "unknown_exec_ref" and "evicted" in res.dead
    assert m.map(er("H", "b2", ref="t3", clordid="C")).events
    assert m.sizes["reports"] <= 4 and m.counts["evicted_reports"] >= 1
    # a restore with smaller bounds evicts down to them
    r = Mapper.restore(REF, m.snapshot(), max_orders=1, max_trades=1, max_reports=1)
    assert r.sizes["orders"] == 1 and r.sizes["trades"] == 1 and r.sizes["reports"] == 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="order_key"):
        mapper(order_key="x")
    with pytest.raises(ValueError, match="begin_string"):
        mapper(begin_string="FIX.4.0")
    with pytest.raises(ValueError, match="source"):
        mapper(source=-1)
    with pytest.raises(ValueError, match="max_orders"):
        mapper(max_orders=0)


# ------------------------------------------------------------------------ replay
def _doc(lines: list[dict]) -> dict:
    eng = Engine()
    eng.apply(parse_events(b"\n".join(json.dumps(d).encode() for d in lines)))
    return document(eng.state)


def _day(with_busts: bool) -> tuple[list[Msg], list[dict]]:
    """A small day as ExecutionReports and as the equivalent hand-written events."""
    msgs = [er("0", "e1", clordid="A1", order_qty="100", price="10", **ORDER),
            er("0", "e2", clordid="B1", order_qty="50", price="20", account="PM2",
               symbol="MSFT", side="5"),
            er("F", "t1", clordid="A1", last_qty="30", last_px="10.1", **ORDER),
            er("5", "e3", clordid="A2", orig="A1", order_qty="80", price="10.2"),
            er("F", "t2", clordid="A2", last_qty="20", last_px="10.2", **ORDER),
            er("F", "t3", clordid="B1", last_qty="50", last_px="19.9", account="PM2",
               symbol="MSFT", side="5", leaves="0"),
            er("4", "e4", clordid="A3", orig="A2"),
            er("F", "t4", clordid="A2", last_qty="5", last_px="10.3", **ORDER),  # late
            er("A", "p1", clordid="C1", **ORDER)]
    want = [
        {"type": "new", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 100, "price": 10.0},
        {"type": "new", "source": 5, "order_id": 2, "account": 4, "instrument": 8,
         "side": "short", "qty": 50, "price": 20.0},
        {"type": "fill", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 30, "price": 10.1},
        {"type": "replace", "source": 5, "order_id": 1, "qty": 80, "price": 10.2},
        {"type": "fill", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 20, "price": 10.2},
        {"type": "fill", "source": 5, "order_id": 2, "account": 4, "instrument": 8,
         "side": "short", "qty": 50, "price": 19.9},
        {"type": "cancel", "source": 5, "order_id": 1},
        {"type": "fill", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 5, "price": 10.3}]
    if with_busts:
        msgs += [er("H", "x1", ref="t2", clordid="A2"),
                 er("G", "x2", ref="t3", clordid="B1", last_qty="45", last_px="19.8",
                    account="PM2", symbol="MSFT", side="5")]
        want += [
            {"type": "bust", "source": 5, "order_id": 1, "account": 3, "instrument": 7,
             "side": "buy", "qty": 20, "price": 10.2},
            {"type": "bust", "source": 5, "order_id": 2, "account": 4, "instrument": 8,
             "side": "short", "qty": 50, "price": 19.9},
            {"type": "fill", "source": 5, "order_id": 2, "account": 4, "instrument": 8,
             "side": "short", "qty": 45, "price": 19.8}]
    return msgs, want


def test_the_mapped_events_replay_to_the_document_of_the_equivalent_json():
    msgs, want = _day(with_busts=False)
    m = mapper()
    got = [e for msg in msgs for e in m.map(msg).events]
    assert got == want
    doc = _doc(got)
    assert compare_documents(doc, _doc(want)) == []
    assert doc["counts"]["late_fills"] == 1 and doc["counts"]["rejected"] == 0


@pytest.mark.skipif(not HAS_BUST, reason="the kernel's bust (T_BUST in exposure.core.types, "
                    "SPEC section 6) has not landed yet")
def test_busts_and_corrections_replay_to_the_document_of_the_equivalent_json():
    msgs, want = _day(with_busts=True)
    m = mapper()
    got = [e for msg in msgs for e in m.map(msg).events]
    assert got == want
    doc = _doc(got)
    assert compare_documents(doc, _doc(want)) == []
    assert doc["counts"]["rejected"] == 0 and doc["counts"].get("busts") == 2


# ------------------------------------------------------------------------ dead letters
RAW = b"8=FIX.4.4\x019=60\x0135=8\x0134=7\x0117=d1\x01150=0\x0111=A1\x011=PM9\x0155=AAPL" \
      b"\x0154=1\x0138=100\x0144=10\x0110=000\x01"


def test_dead_letters_are_appended_once_read_back_and_bounded(tmp_path):
    path = tmp_path / "dl" / "dead.jsonl"
    with DeadLetterFile(path, max_letters=3) as f:
        assert f.append("S1", 7, "unknown Account (1) 'PM9'", RAW, kind="unknown_account",
                        when=0.0)
        assert not f.append("S1", 7, "again", RAW)          # the same letter: once
        raw2 = RAW.replace(b"d1", b"d2").replace(b"34=7", b"34=8") + b"58=a|b\x01"
        assert f.append("S1", 8, "why", raw2)
        assert f.count == 2 and f.duplicates == 1
    letters, bad = read_dead_letters(path)
    assert bad == 0 and [x.seq for x in letters] == [7, 8]
    assert letters[0].raw == RAW and letters[1].raw == raw2    # a '|' in a value survives
    assert letters[0].time == "1970-01-01T00:00:00.000000Z"
    line = path.read_bytes().splitlines()[0]
    assert json.loads(line)["raw"] == show_raw(RAW) and b"|35=8|" in line
    # reopened: the letters are known; the bound holds; a torn tail is cut
    with open(path, "ab") as fh:
        fh.write(b'{"time": "torn')
    with DeadLetterFile(path, max_letters=3) as f:
        assert f.count == 2 and not f.append("S1", 7, "x", RAW)
        assert f.append("S2", 1, "x", RAW)
        with pytest.raises(DeadLetterFull, match="full"):
            f.append("S2", 2, "x", RAW)
        assert f.refused == 1 and f.full
    assert read_dead_letters(path)[1] == 0
    with DeadLetterFile(tmp_path / "small", max_bytes=100) as f, \
            pytest.raises(DeadLetterFull):
        f.append("S", 1, "r", RAW)
    assert read_dead_letters(tmp_path / "absent") == ([], 0)


def test_redeliver_maps_the_dead_letters_again_once_the_names_are_fixed(tmp_path):
    path = tmp_path / "dead.jsonl"
    m = mapper()
    fields = RawFields(RAW)
    assert fields.get(1) == "PM9" and fields.get(999) is None
    res = m.map(fields)
    assert res.dead_kind == "unknown_account"
    other = RAW.replace(b"1=PM9", b"1=PM8").replace(b"17=d1", b"17=d2")
    with DeadLetterFile(path) as f:
        f.append("S1", 7, res.dead, RAW, kind=res.dead_kind)
        f.append("S1", 8, "unknown Account (1) 'PM8'", other, kind="unknown_account")
        f.append("S2", 1, "elsewhere", other, kind="unknown_account")
    letters, _ = read_dead_letters(path)
    # accounts.csv gains PM9: the first maps, the second is still dead, S2 is left as is
    fixed = RefData.from_rows(REF.instruments, [*REF.accounts, Account(9, "PM9")])
    m2 = Mapper.restore(fixed, m.snapshot())
    out = redeliver(m2, letters, session="S1")
    assert out.events == [{"type": "new", "source": 5, "order_id": 1, "account": 9,
                           "instrument": 7, "side": "buy", "qty": 100, "price": 10.0}]
    assert [(x.session, x.seq) for x in out.dead] == [("S1", 8), ("S2", 1)]
    assert "'PM8'" in out.dead[0].reason
    # passed on now: delivered again it is a duplicate
    assert redeliver(m2, letters[:1]).counted == {"duplicate_exec_id": 1}
    rewrite(path, out.dead)
    assert [(x.session, x.seq) for x in read_dead_letters(path)[0]] == [("S1", 8), ("S2", 1)]
