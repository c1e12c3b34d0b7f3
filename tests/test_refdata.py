"""Reference data: instruments.csv and accounts.csv (exposure/core/refdata.py), a node's
[reference] section, and the names people see: `exposure dump --names`, `top`, `watch
--json --names`, desks and subscribers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from exposure.config import ConfigError, load_config
from exposure.core.capacity import Capacities
from exposure.core.currency import Currencies
from exposure.core.refdata import Account, Instrument, RefData, RefDataError, load_refdata
from exposure.engine.desk import ACCOUNT_ROW, INSTRUMENT_ROW
from exposure.engine.parse import parse_events
from exposure.engine.replay import Engine

INSTRUMENTS = """symbol,instrument,name,multiplier,margin_rate,beta,sector,currency,desk
AAPL,7,Apple Inc,1,0.25,1.2,3,USD,tech
ES,8,"S&P 500, e-mini",50,0.1,,2,,futures
VOD.L,9,,,,,,GBP,
"""
CCY = Currencies.from_table("USD", {"EUR": 1, "GBP": 3})
ACCOUNTS = "name,account,desk\nPM1,3,equities\nPM Two,4,macro\n"


def write(tmp: Path, name: str, text: str) -> Path:
    p = tmp / name
    p.write_text(text)
    return p


def test_both_files_read_with_lookups_both_ways(tmp_path):
    rd = load_refdata(write(tmp_path, "i.csv", INSTRUMENTS), write(tmp_path, "a.csv", ACCOUNTS),
                      currencies=CCY)
    assert rd.instrument_of("AAPL") == 7 and rd.instrument_of("aapl") is None
    assert rd.symbol(8) == "ES" and rd.instrument_name(8) == "S&P 500, e-mini"
    assert rd.instrument_name(9) is None and rd.symbol(1) is None
    assert rd.account_of("PM Two") == 4 and rd.account_name(3) == "PM1"
    assert rd.account_of("PM9") is None and rd.account_name(99) is None
    # unknown columns are kept, not rejected
    assert rd.instrument_row(7).extra == {"desk": "tech"}
    assert rd.accounts[1].extra == {"desk": "macro"}
    # currency codes mapped by the [currencies] table (SPEC 7); a blank cell is the base
    assert [rd.currency_of(i) for i in (7, 8, 9, 10)] == [0, 0, 3, None]
    assert [rd.currency_code(i) for i in (7, 8, 9, 10)] == ["USD", "USD", "GBP", None]
    # the rows as SPEC instrument events; blank cells are the SPEC's defaults
    assert rd.instrument_events() == [
        {"type": "instrument", "instrument": 7, "multiplier": 1.0, "margin_rate": 0.25,
         "beta": 1.2, "sector": 3, "currency": 0},
        {"type": "instrument", "instrument": 8, "multiplier": 50.0, "margin_rate": 0.1,
         "beta": 1.0, "sector": 2, "currency": 0},
        {"type": "instrument", "instrument": 9, "multiplier": 1.0, "margin_rate": 1.0,
         "beta": 1.0, "sector": 0, "currency": 3}]
    eng = Engine()
    status = eng.apply(parse_events("\n".join(map(json.dumps,
                                                  rd.instrument_events())).encode()))
    assert not status.any()


def test_a_file_of_names_alone_gives_no_instrument_events(tmp_path):
    rd = load_refdata(write(tmp_path, "i.csv", "symbol,instrument\nAAPL,7\n"))
    assert rd.instrument_events() == [] and rd.accounts == ()


def test_security_ids(tmp_path):
    rd = load_refdata(write(tmp_path, "i.csv", "\ufeffSymbol , Instrument,security_id,"
                            "security_id_source\nAAPL,7,US0378331005,4\nMSFT,8,,\n"))
    assert rd.instrument_by_security_id("4", "US0378331005") == 7
    assert rd.instrument_by_security_id("1", "US0378331005") is None


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("symbol,name\nAAPL,Apple\n", r"line 1: the header has no 'instrument' column"),
    ("symbol,instrument\nAAPL,7\nMSFT,7\n", r"line 3: duplicate instrument 7 \(first on "
                                            r"line 2\)"),
    ("symbol,instrument\nAAPL,7\n\nAAPL,8\n", r"line 4: duplicate symbol 'AAPL'"),
    ("symbol,instrument\nAAPL,seven\n", r"line 2: instrument 'seven' is not an integer"),
    ("symbol,instrument\nAAPL,7.0\n", r"instrument '7.0' is not an integer"),
    ("symbol,instrument\nAAPL,1_0\n", r"instrument '1_0' is not an integer"),
    ("symbol,instrument\nAAPL,-1\n", r"instrument -1 is outside 0..65535"),
    ("symbol,instrument\nAAPL,65536\n", r"instrument 65536 is outside 0..65535"),
    ("symbol,instrument\n,7\n", r"line 2: an empty symbol"),
    ("symbol,instrument\nAAPL,7,x\n", r"line 2: 3 cells, the header has 2"),
    ("symbol,instrument,multiplier\nAAPL,7,0\n", r"multiplier '0' must be > 0"),
    ("symbol,instrument,margin_rate\nAAPL,7,-1\n", r"margin_rate '-1' must be >= 0"),
    ("symbol,instrument,beta\nAAPL,7,nan\n", r"beta 'nan' must be finite"),
    ("symbol,instrument,sector\nAAPL,7,256\n", r"sector 256 is outside 0..255"),
    ("symbol,instrument,symbol\nAAPL,7,B\n", r"column 'symbol' appears twice"),
    ("symbol,instrument,security_id\nAAPL,7,X\n", r"security_id and security_id_source "
                                                 r"go together"),
    ("symbol,instrument,security_id,security_id_source\nA,7,X,4\nB,8,X,4\n",
     r"line 3: duplicate security_id 'X' with security_id_source '4'"),
    ("symbol,instrument,security_id,security_id_source\nA,7,X,\n", r"both or neither"),
    ("symbol,instrument,currency\nAAPL,7,USD\nSONY,8,JPY\n",
     r"line 3: currency 'JPY' is not in the node's \[currencies\] table \(USD \(base\)\)"),
    ("symbol,instrument,currency\nAAPL,7,usd\n", r"line 2: currency 'usd' is not in"),
])
def test_a_broken_instruments_file_names_the_file_line_and_value(tmp_path, text, match):
    p = write(tmp_path, "ins.csv", text)
    with pytest.raises(RefDataError, match=match) as e:
        load_refdata(p)
    assert "ins.csv" in str(e.value)


@pytest.mark.parametrize("text,match", [
    ("account,name\n3,PM1\n4,PM1\n", r"line 3: duplicate account name 'PM1'"),
    ("name,account\nPM1,3\nPM2,3\n", r"line 3: duplicate account 3"),
    ("name\nPM1\n", r"no 'account' column"),
    ("name,account\nPM1,4096\n", r"account 4096 is outside 0..4095"),
    ("name,account\nPM\x01,1\n", r"control characters"),
])
def test_a_broken_accounts_file_names_the_file_line_and_value(tmp_path, text, match):
    p = write(tmp_path, "acc.csv", text)
    with pytest.raises(RefDataError, match=match) as e:
        load_refdata(accounts=p)
    assert "acc.csv" in str(e.value)


def test_ids_are_checked_against_the_given_capacities(tmp_path):
    p = write(tmp_path, "acc.csv", "name,account\nPM1,5000\n")
    with pytest.raises(RefDataError):
        load_refdata(accounts=p)
    assert load_refdata(accounts=p, caps=Capacities(accounts=8192)).account_of("PM1") == 5000


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RefDataError, match="cannot read instruments file"):
        load_refdata(tmp_path / "nope.csv")


# ------------------------------------------------------------------------ the config
def test_the_reference_section_is_read_relative_to_the_config(tmp_path):
    write(tmp_path, "i.csv", INSTRUMENTS)
    write(tmp_path, "a.csv", ACCOUNTS)
    cfg = write(tmp_path, "n.toml", '[reference]\ninstruments = "i.csv"\naccounts = "a.csv"\n'
                '[currencies]\nbase = "USD"\nids = { EUR = 1, GBP = 3 }\n')
    names = load_config(cfg).names
    assert names.symbol(7) == "AAPL" and names.account_name(4) == "PM Two"
    assert names.currency_of(9) == 3 and names.currencies.base == "USD"
    assert load_config().names is None
    only = write(tmp_path, "o.toml", '[reference]\naccounts = "a.csv"\n')
    assert load_config(only).names.instruments == ()


def test_a_broken_reference_file_fails_the_config(tmp_path):
    write(tmp_path, "a.csv", "name,account\nPM1,3\nPM1,4\n")
    cfg = write(tmp_path, "n.toml", '[reference]\naccounts = "a.csv"\n')
    with pytest.raises(ConfigError, match=r"reference: accounts file .*a.csv' line 3: "
                                          "duplicate account name 'PM1'"):
        load_config(cfg)
    bad = write(tmp_path, "b.toml", '[reference]\nsymbols = "a.csv"\n')
    with pytest.raises(ConfigError, match="unknown key reference.symbols"):
        load_config(bad)
    # a currency code the config's [currencies] does not name (here: GBP, the default
    # table being USD alone)
    write(tmp_path, "i.csv", INSTRUMENTS)
    cfg = write(tmp_path, "c.toml", '[reference]\ninstruments = "i.csv"\n')
    with pytest.raises(ConfigError, match=r"reference: instruments file .*i.csv' line 4: "
                                          r"currency 'GBP' is not in the node's"):
        load_config(cfg)


def test_the_public_lookup_api(tmp_path):
    from exposure.desk import load_names

    write(tmp_path, "a.csv", ACCOUNTS)
    cfg = write(tmp_path, "n.toml", '[reference]\naccounts = "a.csv"\n')
    assert load_names(cfg).account_name(3) == "PM1"
    assert load_names(load_config(cfg)).account_of("PM1") == 3
    assert load_names() is None


# ------------------------------------------------------------------------ what people see
DOC = {"accounts": [{"account": 3, "gross": 1.0}, {"account": 5, "gross": 2.0}],
       "fund": {"gross": 3.0},
       "instruments": [{"instrument": 7, "fund_pos": 1}, {"instrument": 9, "fund_pos": 2},
                       {"instrument": 11, "fund_pos": 3}],
       "sectors": [{"sector": 0}],
       "positions": [{"account": 3, "instrument": 7, "pos": 1},
                     {"account": 5, "instrument": 11, "pos": 3}],
       "counts": {"accepted": 1}}


def test_names_added_to_a_document_and_the_rest_unchanged(tmp_path):
    rd = load_refdata(write(tmp_path, "i.csv", INSTRUMENTS), write(tmp_path, "a.csv", ACCOUNTS),
                      currencies=CCY)
    before = json.dumps(DOC)
    got = rd.name_document(DOC)
    assert json.dumps(DOC) == before          # the input is not changed
    assert got["accounts"] == [{"account": 3, "gross": 1.0, "name": "PM1"},
                               {"account": 5, "gross": 2.0}]
    assert got["instruments"] == [
        {"instrument": 7, "fund_pos": 1, "symbol": "AAPL", "name": "Apple Inc",
         "currency": "USD"},
        {"instrument": 9, "fund_pos": 2, "symbol": "VOD.L", "currency": "GBP"},
        {"instrument": 11, "fund_pos": 3}]
    assert got["base_currency"] == "USD"   # the label of every money figure (SPEC 7)
    assert got["positions"] == [
        {"account": 3, "instrument": 7, "pos": 1, "symbol": "AAPL", "account_name": "PM1"},
        {"account": 5, "instrument": 11, "pos": 3}]
    assert got["fund"] == DOC["fund"] and got["sectors"] == DOC["sectors"]
    assert got["counts"] == DOC["counts"]
    # a feed's view has no positions or counts: none are added
    view = {k: DOC[k] for k in ("accounts", "fund", "instruments", "sectors")}
    assert set(rd.name_document(view)) == set(view) | {"base_currency"}
    # with the rates the node published (a desk's or the feed's instrument rows): each
    # row's currency as published (an id the table does not name: "#id") and its rate
    got = rd.name_document(DOC, {7: (0, 1.0), 9: (3, 1.27), 11: (5, 0.5)})
    assert [(r.get("currency"), r.get("rate")) for r in got["instruments"]] == [
        ("USD", 1.0), ("GBP", 1.27), ("#5", 0.5)]


def _render(table) -> str:
    from rich.console import Console

    con = Console(width=140, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    con.print(table)
    con.file.close()
    return con.export_text()


def test_top_shows_account_names_and_symbols_where_known():
    from exposure.ops.top import account_table, instrument_table

    rd = RefData.from_rows([Instrument(7, "AAPL")], [Account(3, "PM1")])
    acc = np.zeros(2, ACCOUNT_ROW)
    acc["account"] = [3, 5]
    acc["gross"] = [2e6, 1e6]
    acc["breach"] = [1, 0]
    ins = np.zeros(2, INSTRUMENT_ROW)
    ins["instrument"] = [7, 9]
    ins["gross_mv"] = [5e5, 1e5]
    text = _render(account_table(acc, 10, rd))
    assert "PM1" in text and " 5 " in text and "gross" in text
    text = _render(instrument_table(ins, 10, rd))
    assert "AAPL" in text and " 9 " in text
    # without names: the bare ids
    text = _render(account_table(acc, 10, None))
    assert "PM1" not in text and " 3 " in text
    # SPEC 7: the base currency labels the money figures; an instrument row shows its own
    # currency and rate
    ccy = Currencies.from_table("EUR", {"JPY": 2})
    ins["currency"] = [2, 0]
    ins["rate"] = [0.0061, 1.0]
    assert "accounts by gross (top 10, EUR)" in _render(account_table(acc, 10, rd, ccy))
    text = _render(instrument_table(ins, 10, rd, ccy))
    assert "instruments by crossing (EUR)" in text
    rows = {line.split()[1]: line for line in text.splitlines() if line.count("│") > 2}
    assert "JPY" in rows["AAPL"] and "0.0061" in rows["AAPL"]
    assert "EUR" in rows["9"] and " 1 " in rows["9"]


@pytest.mark.process
def test_dump_names_on_a_live_node(tmp_path):
    from exposure.harness.localnode import LocalNode

    write(tmp_path, "i.csv", INSTRUMENTS)
    write(tmp_path, "a.csv", ACCOUNTS)
    events = write(tmp_path, "e.jsonl", "\n".join(json.dumps(e) for e in [
        {"type": "mark", "instrument": 7, "price": 10.0},
        {"type": "new", "source": 1, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 10, "price": 10.0},
        {"type": "fill", "source": 1, "order_id": 1, "account": 3, "instrument": 7,
         "side": "buy", "qty": 4, "price": 10.0}]) + "\n")
    n = LocalNode(tmp_path, extra='\n[reference]\ninstruments = "i.csv"\n'
                                  'accounts = "a.csv"\n'
                                  '[currencies]\nids = { EUR = 1, GBP = 3 }\n')
    try:
        assert n.cli("send", str(events)).returncode == 0
        plain = n.dump()
        p = n.cli("dump", "--compact", "--names")
        assert p.returncode == 0, p.stderr.decode()
        named = json.loads(p.stdout)
    finally:
        n.stop()
    assert n.segments() == []
    assert "name" not in plain["accounts"][0] and "symbol" not in plain["instruments"][0]
    assert named["accounts"][0]["name"] == "PM1"
    assert named["instruments"][0]["symbol"] == "AAPL"
    # the money figures' currency and the instrument's own, with the rate it was valued at
    assert named["base_currency"] == "USD" and "base_currency" not in plain
    assert (named["instruments"][0]["currency"], named["instruments"][0]["rate"]) == \
        ("USD", 1.0)
    assert named["positions"][0]["account_name"] == "PM1"
    assert {k: v for k, v in named["accounts"][0].items() if k != "name"} == \
        plain["accounts"][0]


@pytest.mark.process
def test_names_without_reference_files_is_a_clear_error():
    import subprocess
    import sys

    for args in (["dump", "--names"], ["watch", "--json", "--names", "--seconds", "0"]):
        p = subprocess.run([sys.executable, "-m", "exposure", *args], capture_output=True,
                           timeout=60)
        assert p.returncode == 2 and b"[reference]" in p.stderr, p.stderr
