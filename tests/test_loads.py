"""Start-of-day loads (exposure/core/loads.py and `exposure refdata|limits|positions|fx load`):
each kind of file as the SPEC events it means, every bad row reported with its line and
nothing returned or sent, hostile files as clear errors, names and symbols resolved, the
kind told by the header, and a load through a node equal to replay of the same events."""

from __future__ import annotations

import json
import math
import os
import random

import pytest

from exposure.core import refdata
from exposure.core.capacity import Capacities
from exposure.core.currency import Currencies
from exposure.core.loads import (
    MAX_PROBLEMS,
    LoadError,
    detect_kind,
    fx_events,
    instrument_events,
    limit_events,
    load_events,
    position_events,
    read_load,
)
from exposure.core.refdata import Account, Instrument, RefData

INSTRUMENTS = """symbol,instrument,multiplier,margin_rate,beta,sector,name,currency
AAPL,7,1,0.25,1.2,3,Apple Inc,EUR
ES,8,50,0.1,,2,"S&P 500, e-mini",

VOD.L,9,,,,,,GBP
"""
# SPEC section 7: a node's [currencies] table; rates.csv (currency, rate)
CCY = Currencies.from_table("USD", {"EUR": 1, "GBP": 3})
RATES = "currency,rate\nEUR,1.08\n\nGBP,1.27\n"
LIMITS = """name,account,gross,net,margin,loss
PM1,3,1000000,250000,50000,10000
PM Two,4,2e6,,,
"""
POSITIONS = """account,name,instrument,symbol,qty,price
3,,7,,100,12.5
,PM Two,,ES,-20,
3,PM1,9,VOD.L,0,2.25
"""
NAMES = RefData.from_rows(
    [Instrument(7, "AAPL", currency=1), Instrument(8, "ES"), Instrument(9, "VOD.L", currency=3)],
    [Account(3, "PM1"), Account(4, "PM Two")], CCY)


def write(tmp, name: str, text: str | bytes):
    p = tmp / name
    (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
    return p


# ----------------------------------------------------------------------------- good rows
def test_instruments_are_instrument_events_with_the_spec_defaults_for_blank_cells(tmp_path):
    assert instrument_events(write(tmp_path, "i.csv", INSTRUMENTS), currencies=CCY) == [
        {"type": "instrument", "instrument": 7, "multiplier": 1.0, "margin_rate": 0.25,
         "beta": 1.2, "sector": 3, "currency": 1},
        {"type": "instrument", "instrument": 8, "multiplier": 50.0, "margin_rate": 0.1,
         "beta": 1.0, "sector": 2, "currency": 0},
        {"type": "instrument", "instrument": 9, "multiplier": 1.0, "margin_rate": 1.0,
         "beta": 1.0, "sector": 0, "currency": 3}]
    # without the currency column: no currency key (the SPEC's default, the base)
    f = write(tmp_path, "j.csv", "symbol,instrument,beta\nAAPL,7,2\n")
    assert instrument_events(f) == [{"type": "instrument", "instrument": 7,
                                     "multiplier": 1.0, "margin_rate": 1.0, "beta": 2.0,
                                     "sector": 0}]


def test_fx_rates_are_fx_events_by_currency_code(tmp_path):
    load = read_load(write(tmp_path, "r.csv", RATES), "fx", currencies=CCY)
    assert load.events == [{"type": "fx", "currency": 1, "rate": 1.08},
                           {"type": "fx", "currency": 3, "rate": 1.27}]
    assert load.lines == [2, 4]
    # the table comes with the names too (a node's [reference] carries its [currencies])
    assert fx_events(write(tmp_path, "s.csv", RATES), NAMES.currencies) == load.events


def test_limits_are_limit_events_with_all_four_limits_blank_meaning_none(tmp_path):
    assert limit_events(write(tmp_path, "l.csv", LIMITS)) == [
        {"type": "limit", "account": 3, "gross": 1e6, "net": 250000.0, "margin": 50000.0,
         "loss": 10000.0},
        {"type": "limit", "account": 4, "gross": 2e6, "net": 0.0, "margin": 0.0,
         "loss": 0.0}]


def test_positions_resolve_names_and_symbols_and_carry_a_price_only_when_given(tmp_path):
    load = read_load(write(tmp_path, "p.csv", POSITIONS), "positions", NAMES)
    assert load.events == [
        {"type": "position", "account": 3, "instrument": 7, "qty": 100, "price": 12.5},
        {"type": "position", "account": 4, "instrument": 8, "qty": -20},
        {"type": "position", "account": 3, "instrument": 9, "qty": 0, "price": 2.25}]
    assert load.lines == [2, 3, 4]  # each event's line, for the node's rejects


def test_limits_by_name_alone(tmp_path):
    f = write(tmp_path, "l.csv", "Name ,Loss\nPM Two,5\n")
    assert limit_events(f, NAMES) == [{"type": "limit", "account": 4, "gross": 0.0,
                                       "net": 0.0, "margin": 0.0, "loss": 5.0}]


def test_the_kind_is_told_by_the_header(tmp_path):
    files = {"instruments": INSTRUMENTS, "limits": LIMITS, "positions": POSITIONS,
             "fx": RATES}
    for kind, text in files.items():
        f = write(tmp_path, f"{kind}.csv", "\ufeff\n" + text)   # a BOM and a blank line
        assert detect_kind(f) == kind
        assert load_events(f, names=NAMES) == load_events(f, kind, NAMES)
    for header in ("symbol,instrument,name\n", "account,name\n", "a,b\n", "", "\x00\xff"):
        with pytest.raises(LoadError, match="cannot tell from its header"):
            load_events(write(tmp_path, "x.csv", header + "1,2\n"))


# ----------------------------------------------------------------------------- bad rows
BAD = [
    ("instruments", "symbol,instrument,beta\nAAPL,seven,1\n", "instrument 'seven' is not"),
    ("instruments", "symbol,instrument,beta\nAAPL,65536,1\n", "instrument 65536 is outside"),
    ("instruments", "symbol,instrument,beta\nAAPL,7,nan\n", "beta 'nan' must be finite"),
    ("instruments", "symbol,instrument,multiplier\nAAPL,7,0\n", "multiplier '0' must be > 0"),
    ("instruments", "symbol,instrument,margin_rate\nAAPL,7,-1\n", "margin_rate '-1' must be"),
    ("instruments", "symbol,instrument,sector\nAAPL,7,256\n", "sector 256 is outside"),
    ("instruments", "symbol,instrument,beta\n,7,1\n", "an empty symbol"),
    ("instruments", "symbol,instrument,beta\nAAPL,7,1,2\n", "4 cells, the header has 3"),
    ("limits", "account,gross\n3,-1\n", "gross '-1' must be >= 0"),
    ("limits", "account,loss\n3,inf\n", "loss 'inf' must be >= 0"),
    ("limits", "account,net\n3,abc\n", "net 'abc' is not a number"),
    ("limits", "account,net\n4096,1\n", "account 4096 is outside 0..4095"),
    ("limits", "account,net\n-3,1\n", "account -3 is outside"),
    ("limits", "name,net\nPM9,1\n", "name 'PM9' is no account of the accounts file"),
    ("limits", "name,account,net\nPM1,4,1\n", "name 'PM1' is account 3 in the accounts "
                                               "file, not 4"),
    ("limits", "name,account,net\n,,1\n", "neither account nor name is given"),
    ("positions", "account,instrument,qty\n3,7,1.5\n", "qty '1.5' is not an integer"),
    ("positions", "account,instrument,qty\n3,7,1000000000001\n", r"abs\(qty\) is at most"),
    ("positions", "account,instrument,qty\n3,7,99999999999999999999999\n", "not an integer"),
    ("positions", "account,instrument,qty\n3,7,\n", "qty '' is not an integer"),
    ("positions", "account,instrument,qty,price\n3,7,1,0\n", "price '0' must be > 0"),
    ("positions", "account,instrument,qty,price\n3,7,1,-inf\n", "price '-inf' must be > 0"),
    ("positions", "account,symbol,qty\n3,MSFT,1\n", "symbol 'MSFT' is no instrument of"),
    ("positions", "account,symbol,qty\n3,ES\x01,1\n", "control characters"),
    ("positions", "account,instrument,qty\n3,7," + "9" * 300 + "\n", "characters long"),
    ("instruments", "symbol,instrument,currency\nAAPL,7,JPY\n",
     r"currency 'JPY' is not in the node's \[currencies\] table \(USD \(base\), EUR = 1, "
     r"GBP = 3\)"),
    ("fx", "currency,rate\nJPY,0.0067\n", "currency 'JPY' is not in the node's"),
    ("fx", "currency,rate\nUSD,1\n", "currency 'USD' is the base currency"),
    ("fx", "currency,rate\nEUR,0\n", "rate '0' must be > 0"),
    ("fx", "currency,rate\nEUR,-1.1\n", "rate '-1.1' must be > 0"),
    ("fx", "currency,rate\nEUR,nan\n", "rate 'nan' must be > 0"),
    ("fx", "currency,rate\nEUR,inf\n", "rate 'inf' must be > 0"),
    ("fx", "currency,rate\nEUR,x\n", "rate 'x' is not a number"),
    ("fx", "currency,rate\nEUR,\n", "an empty rate"),
    ("fx", "currency,rate\neur,1.1\n", "currency 'eur' is not in"),
]


@pytest.mark.parametrize("kind,text,match", BAD)
def test_a_bad_row_is_reported_with_its_file_line_and_value(tmp_path, kind, text, match):
    head, row = text.split("\n", 1)
    f = write(tmp_path, f"{kind}.csv", f"{head}\n\n{row}")  # the bad row on line 3
    with pytest.raises(LoadError, match=match) as e:
        read_load(f, kind, NAMES)   # (NAMES carries CCY, the currencies table)
    assert e.value.lines == [3] and e.value.count == 1
    assert f"file {str(f)!r} line 3: " in str(e.value)
    assert "nothing from this file is loaded" in str(e.value)


def test_every_bad_row_of_a_file_is_listed_and_the_good_ones_are_not_returned(tmp_path):
    f = write(tmp_path, "p.csv", "account,instrument,qty\n3,7,1\n3,7,2\n4,70000,1\n4,8,x\n"
                                 "4,8,-5\n")
    with pytest.raises(LoadError) as e:
        position_events(f)
    assert e.value.lines == [3, 4, 5]
    msg = str(e.value)
    assert "3 bad rows" in msg and "account 3, instrument 7 again (first on line 2)" in msg
    assert "instrument 70000 is outside 0..65535" in msg and "qty 'x'" in msg
    f = write(tmp_path, "l.csv", "account,gross\n1,1\n1,2\n")
    with pytest.raises(LoadError, match=r"line 3: account 1 again \(first on line 2\)"):
        limit_events(f)
    f = write(tmp_path, "r.csv", "currency,rate\nGBP,1.2\nGBP,1.3\n")
    with pytest.raises(LoadError, match=r"line 3: currency GBP again \(first on line 2\)"):
        fx_events(f, CCY)


def test_the_list_is_bounded_but_every_bad_row_is_counted(tmp_path):
    f = write(tmp_path, "l.csv", "account,gross\n" + "1,-1\n" * 1000)
    with pytest.raises(LoadError) as e:
        limit_events(f)
    assert e.value.count == 1000 and len(e.value.problems) == MAX_PROBLEMS
    assert "1000 bad rows" in str(e.value) and f"and {1000 - MAX_PROBLEMS} more" in str(e.value)


def test_ids_are_checked_against_the_node_capacities(tmp_path):
    f = write(tmp_path, "p.csv", "account,instrument,qty\n5000,70000,1\n")
    with pytest.raises(LoadError, match="account 5000 is outside 0..4095"):
        position_events(f)
    assert position_events(f, caps=Capacities(accounts=8192, instruments=131072)) == [
        {"type": "position", "account": 5000, "instrument": 70000, "qty": 1}]


def test_a_file_longer_than_the_capacity_is_refused_as_a_whole(tmp_path):
    caps = Capacities(accounts=16)
    f = write(tmp_path, "l.csv", "account,gross\n" + "".join(f"{a},1\n" for a in range(17)))
    with pytest.raises(LoadError, match="more than 16 rows") as e:
        limit_events(f, caps=caps)
    assert e.value.lines == [0]


def test_names_need_a_reference_file(tmp_path):
    f = write(tmp_path, "p.csv", "name,symbol,qty\nPM1,AAPL,1\n")
    with pytest.raises(LoadError, match="name 'PM1' cannot be resolved: no accounts file"):
        position_events(f)
    with pytest.raises(LoadError, match="symbol 'AAPL' cannot be resolved: no instruments"):
        position_events(f, RefData.from_rows([], [Account(3, "PM1")]))
    assert position_events(f, NAMES) == [
        {"type": "position", "account": 3, "instrument": 7, "qty": 1}]


# ----------------------------------------------------------------------------- hostile files
@pytest.mark.parametrize("kind,header", [("instruments", "symbol,instrument,beta"),
                                         ("limits", "account,gross"),
                                         ("positions", "account,instrument,qty"),
                                         ("fx", "currency,rate,x")])
def test_hostile_files_are_clear_errors(tmp_path, kind, header, monkeypatch):
    cases = {
        "binary": (header.encode() + b"\n\x00\xff\xfe\x80garbage\n", "line 2: not UTF-8"),
        "latin-1": (f"{header}\ncaf\xe9,1,1\n".encode("latin-1"), "line 2: not UTF-8"),
        "nul": (f"{header}\n\x00,\x00,\x00\n".encode(), "line 2"),
        "quote": (f'{header}\n"1,2\n'.encode(), "line"),
        "empty": (b"", "empty"),
        "no column": (b"foo,bar\n1,2\n", "the header"),
    }
    for what, (data, match) in cases.items():
        f = write(tmp_path, f"{what}.csv", data)
        with pytest.raises(LoadError, match=match):
            read_load(f, kind, NAMES)
    with pytest.raises(LoadError, match="Is a directory"):
        read_load(tmp_path, kind)
    with pytest.raises(LoadError, match="No such file"):
        read_load(tmp_path / "absent.csv", kind)
    big = write(tmp_path, "big.csv", f"{header}\n" + "1,2,3\n" * 100)
    monkeypatch.setattr(refdata, "MAX_BYTES", 200)
    with pytest.raises(LoadError, match="bytes"):
        read_load(big, kind)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer, so opening it does not block
    try:
        with pytest.raises(LoadError, match="not a regular file"):
            read_load(fifo, "limits")
        with pytest.raises(LoadError, match="not a regular file"):
            detect_kind(fifo)
    finally:
        os.close(fd)


def test_every_event_replays_without_a_reject(tmp_path):
    from exposure.engine.parse import parse_events
    from exposure.engine.replay import Engine

    events = (instrument_events(write(tmp_path, "i.csv", INSTRUMENTS), currencies=CCY)
              + fx_events(write(tmp_path, "r.csv", RATES), CCY)
              + limit_events(write(tmp_path, "l.csv", LIMITS))
              + position_events(write(tmp_path, "p.csv", POSITIONS), NAMES))
    status = Engine().apply(parse_events("\n".join(map(json.dumps, events)).encode()))
    assert not status.any()
    assert all(math.isfinite(v) for e in events for v in e.values()
               if isinstance(v, float))


# ----------------------------------------------------------------------------- the commands
def test_the_command_checks_the_whole_file_before_it_connects(tmp_path, capsys):
    """(No node and no socket: the bad file is refused before anything is sent.)"""
    from exposure.ops.cli import main

    f = write(tmp_path, "l.csv", "account,gross\n3,1\n3,-1\n5000,1\n")
    assert main(["limits", "load", str(f)]) == 1
    err = capsys.readouterr().err
    assert "2 bad rows" in err and "line 3: gross '-1'" in err and "line 4: account 5000" in err
    f = write(tmp_path, "p.csv", "account,instrument,qty\n3,7,1\n")
    assert main(["positions", "load", str(f), "--check"]) == 0
    assert "1 positions rows checked" in capsys.readouterr().out


@pytest.mark.process
@pytest.mark.timeout(300)
def test_loads_through_a_node_equal_replay_and_rejects_name_their_lines(tmp_path):
    """The operator session (256, the last id) may write account 3 only: account 4's rows
    are rejected by the node and reported by line; a bad file changes nothing."""
    from exposure.engine.document import compare_documents, document
    from exposure.engine.parse import parse_events
    from exposure.engine.replay import replay_records
    from exposure.harness.localnode import LocalNode

    write(tmp_path, "accounts.csv", "name,account\nPM1,3\nPM Two,4\n")
    write(tmp_path, "names.csv", "symbol,instrument\nAAPL,7\nES,8\nVOD.L,9\n")
    sessions = write(tmp_path, "sessions.toml", '[[session]]\nid = 256\nsecret = '
                     '"0123456789abcdef0123"\naccounts = [3]\ninstrument = true\n'
                     'limit = true\nfx = true\n')
    node = LocalNode(tmp_path, ingest=f'sessions = "{sessions}"',
                     extra=f'[reference]\naccounts = "{tmp_path / "accounts.csv"}"\n'
                           f'instruments = "{tmp_path / "names.csv"}"\n'
                           '[currencies]\nids = { EUR = 1, GBP = 3 }\n')
    try:
        before = node.dump(False)
        bad = write(tmp_path, "bad.csv", "name,symbol,qty\nPM1,AAPL,1\nPM9,AAPL,2\n"
                                         "PM1,ES,1.5\n")
        p = node.cli("positions", "load", str(bad))
        err = p.stderr.decode()
        assert p.returncode == 1 and "2 bad rows" in err, err
        assert "line 3: name 'PM9'" in err and "line 4: qty '1.5'" in err
        assert node.last_gseq() == 0 and compare_documents(node.dump(False), before) == []

        sent = []
        for cmd, name, text, rejected in (
                ("refdata", "i.csv", INSTRUMENTS, []),
                ("fx", "r.csv", RATES, []),
                ("limits", "l.csv", LIMITS, [3]),
                ("positions", "p.csv", POSITIONS, [3])):
            f = write(tmp_path, name, text)
            p = node.cli(cmd, "load", str(f))
            out, err = p.stdout.decode(), p.stderr.decode()
            load = read_load(f, None, NAMES)
            n = len(load.events)
            assert f"{n} sent, {n} acknowledged, {len(rejected)} rejected (session 256)" in out
            assert p.returncode == (1 if rejected else 0), err
            for line in rejected:
                assert f"{f} line {line}: rejected: unauthorized" in err
            sent += [e for e, line in zip(load.events, load.lines, strict=True)
                     if line not in rejected]
        # a feed of fx events through a session (SPEC section 7), one event per send, the
        # rates moving: the node takes them as any event
        from exposure.config import load_config
        from exposure.net.producer import Producer

        rng = random.Random(29)
        rate = {1: 1.08, 3: 1.27}
        feed = []
        for _ in range(200):
            c = rng.choice((1, 3))
            rate[c] *= rng.uniform(0.995, 1.005)
            feed.append({"type": "fx", "currency": c, "rate": rate[c]})
        p = Producer(load_config(node.config), 256, secret=b"0123456789abcdef0123")
        try:
            for e in feed:
                p.send(e)
            p.flush(60)
            assert p.acked == p.sent
            assert not [r for ack in p.results(timeout=0.1) for r in ack.rejected]
        finally:
            p.close(10)
        sent += feed
        want = document(replay_records(parse_events(
            "\n".join(map(json.dumps, sent)).encode())))
        assert compare_documents(node.dump(False), want) == []
    finally:
        node.stop()
    assert node.segments() == []
