"""The gateway's config file (exposure/fix/config.py), without processes: the defaults,
file names relative to the config, every key's type and range checked with an error that
names the key and the value, unknown keys named, and the [[fix]] tables checked by the
session layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from exposure.fix.config import (
    GATEWAY_KEYS,
    LIMIT_KEYS,
    GatewayConfigError,
    Limits,
    load_gateway_config,
)

FIX = '''
[[fix]]
role = "acceptor"
listen = "127.0.0.1:9878"
begin_string = "FIX.4.4"
sender_comp_id = "EXPOSURE"
target_comp_id = "BROKER1"
source = 3
'''


def write(tmp_path: Path, gateway: str, rest: str = FIX, name: str = "brokers.toml") -> Path:
    """A config whose [gateway] has ``gateway``'s lines, and the required keys it lacks."""
    p = tmp_path / "etc" / name
    p.parent.mkdir(parents=True, exist_ok=True)
    given = {ln.split("=")[0].strip() for ln in gateway.splitlines() if "=" in ln}
    required = [f"{k} = {v}" for k, v in (("session", "5"),
                                         ("instruments", '"instruments.csv"'),
                                         ("accounts", '"accounts.csv"')) if k not in given]
    p.write_text("[gateway]\n" + "\n".join(required) + "\n" + gateway + "\n" + rest)
    return p


def load(tmp_path: Path, gateway: str = "", rest: str = FIX, **kw):
    return load_gateway_config(write(tmp_path, gateway, rest), **kw)


def error(tmp_path: Path, gateway: str = "", rest: str = FIX, sessions: bool = False) -> str:
    with pytest.raises(GatewayConfigError) as e:
        load(tmp_path, gateway, rest, sessions=sessions)
    return str(e.value)


def test_the_smallest_config_takes_the_defaults(tmp_path):
    cfg = load(tmp_path)
    etc = (tmp_path / "etc").resolve()
    assert cfg.name == "brokers" and cfg.session == 5 and cfg.node is None
    assert cfg.instruments == etc / "instruments.csv" and cfg.accounts == etc / "accounts.csv"
    assert cfg.data_dir == etc / "brokers.fixdata" and cfg.spool is None
    assert cfg.secret_file is None and cfg.order_key == "clordid"
    assert cfg.connect_timeout == 60.0 and cfg.limits == Limits()
    assert {k: getattr(cfg.limits, k) for k in LIMIT_KEYS} == \
        {k: v[0] for k, v in LIMIT_KEYS.items()}
    assert cfg.limits.prewrite_bytes == 4 << 20
    assert cfg.journal_dir == cfg.data_dir / "journal"
    assert cfg.dead_letter_file == cfg.data_dir / "dead-letters.fix"
    assert cfg.status_file.parent == cfg.control_socket.parent == cfg.seqs_file.parent \
        == cfg.data_dir
    (s,) = cfg.fix
    assert s.role == "acceptor" and s.source == 3 and cfg.fix_tables[0]["source"] == 3


def test_file_names_are_relative_to_the_config_and_absolute_ones_kept(tmp_path):
    etc = (tmp_path / "etc").resolve()
    cfg = load(tmp_path, 'node = "../node.toml"\nsecret_file = "s/fix.secret"\n'
                         'data_dir = "/var/lib/exposure/fix"\nspool = "spool-dir"\n'
                         'name = "desk-1.b_2"\norder_key = "OrderID"\nconnect_timeout = 2.5')
    assert cfg.node == etc / "../node.toml" and cfg.secret_file == etc / "s/fix.secret"
    assert cfg.data_dir == Path("/var/lib/exposure/fix") and cfg.spool == etc / "spool-dir"
    assert cfg.name == "desk-1.b_2" and cfg.order_key == "orderid"
    assert cfg.connect_timeout == 2.5
    assert load(tmp_path, "spool = true").spool == etc / "brokers.fixdata" / "spool"
    assert load(tmp_path, 'data_dir = "d"\nspool = true').spool == etc / "d" / "spool"
    # a [[fix]] password_file is relative to the config too
    cfg = load(tmp_path, rest=FIX + 'password_file = "pw"\n', sessions=False)
    assert cfg.fix_tables[0]["password_file"] == str(etc / "pw")


@pytest.mark.parametrize("key", sorted(GATEWAY_KEYS))
def test_every_gateway_key_of_the_wrong_type_is_named_with_its_value(tmp_path, key):
    bad = "[1, 2]"
    text = error(tmp_path, f"{key} = {bad}").replace("\n", " ")
    assert f"[gateway] {key} = [1, 2]: must be" in text


@pytest.mark.parametrize("gateway, words", [
    ("session = 0", "[gateway] session = 0: a session id is 1..4294967295"),
    ("session = 4294967296", "session = 4294967296"),
    ("session = true", "[gateway] session = True: must be an integer"),
    ('order_key = "symbol"', "[gateway] order_key = 'symbol': one of clordid, orderid"),
    ('name = "a b"', "[gateway] name = 'a b': letters, digits"),
    ('name = ""', "[gateway] name = '': letters, digits"),
    ("connect_timeout = 0", "[gateway] connect_timeout = 0.0: seconds"),
    ("connect_timeout = 86401", "connect_timeout = 86401.0"),
    ('data_dir = ""', "[gateway] data_dir = '': an empty file name"),
    ('node = ""', "[gateway] node = '': an empty file name"),
    ('spool = ""', "[gateway] spool = '': an empty file name"),
])
def test_bad_gateway_values_are_named(tmp_path, gateway, words):
    text = error(tmp_path, gateway)
    assert words in text


@pytest.mark.parametrize("key", ["session", "instruments", "accounts"])
def test_the_required_gateway_keys(tmp_path, key):
    p = tmp_path / "g.toml"
    lines = {"session": "session = 5", "instruments": 'instruments = "i.csv"',
             "accounts": 'accounts = "a.csv"'}
    p.write_text("[gateway]\n" + "\n".join(v for k, v in lines.items() if k != key)
                 + "\n" + FIX)
    with pytest.raises(GatewayConfigError, match=rf"\[gateway\] {key} is required"):
        load_gateway_config(p, sessions=False)


@pytest.mark.parametrize("key", sorted(LIMIT_KEYS))
def test_every_limit_is_an_integer_in_its_range(tmp_path, key):
    dflt, lo, hi = LIMIT_KEYS[key]
    for bad in (lo - 1, hi + 1, '"1"', "1.5", "true"):
        if bad == lo - 1 and lo == 0 and key != "prewrite_bytes":
            continue
        text = error(tmp_path, rest=f"[limits]\n{key} = {bad}\n" + FIX)
        assert text.startswith(f"[limits] {key} = ") and f"an integer {lo}..{hi}" in text
    for good in (lo, hi):
        cfg = load(tmp_path, rest=f"[limits]\n{key} = {good}\n" + FIX, sessions=False)
        assert getattr(cfg.limits, key) == good


def test_unknown_keys_are_named_wherever_they_are(tmp_path):
    text = error(tmp_path, 'sesion = 5\nnodes = "x"')
    assert "unknown keys in [gateway]: nodes, sesion" in text and "known: accounts" in text
    text = error(tmp_path, rest="[limits]\nwindoww = 5\n" + FIX)
    assert "unknown key in [limits]: windoww" in text
    text = error(tmp_path, rest="[extra]\n" + FIX)
    assert "unknown key in [the gateway config's top level]: extra" in text
    text = error(tmp_path, rest=FIX + "colour = 'red'\n", sessions=True)
    assert text.startswith("[[fix]] #1:") and "colour" in text


def test_the_fix_tables_are_required_and_checked_by_the_session_layer(tmp_path):
    assert "at least one [[fix]] table" in error(tmp_path, rest="")
    p = tmp_path / "top.toml"
    p.write_text('fix = 3\n[gateway]\nsession = 5\ninstruments = "i"\naccounts = "a"\n')
    with pytest.raises(GatewayConfigError, match=r"at least one \[\[fix\]\] table"):
        load_gateway_config(p)
    second = FIX.replace('"127.0.0.1:9878"', '"127.0.0.1:9879"').replace("source = 3",
                                                                         "source = 4")
    text = error(tmp_path, rest=FIX + second, sessions=True)
    assert "two sessions with the same CompIDs" in text
    bad = FIX.replace('role = "acceptor"', 'role = "both"')
    assert error(tmp_path, rest=FIX + bad, sessions=True).startswith("[[fix]] #2:")
    # without sessions=True only their presence is checked (tools that need data_dir)
    assert load(tmp_path, rest=bad, sessions=False).fix == ()


def test_files_that_cannot_be_read_or_parsed_say_so(tmp_path):
    with pytest.raises(GatewayConfigError, match="cannot read gateway config"):
        load_gateway_config(tmp_path / "absent.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[gateway\n")
    with pytest.raises(GatewayConfigError, match="is not valid TOML"):
        load_gateway_config(p)
    p.write_text("[limits]\n")
    with pytest.raises(GatewayConfigError, match="no \\[gateway\\] table"):
        load_gateway_config(p)
    p.write_text("gateway = 3\n")
    with pytest.raises(GatewayConfigError, match="no \\[gateway\\] table"):
        load_gateway_config(p)
    p.write_text('limits = 3\n[gateway]\nsession = 5\ninstruments = "i"\naccounts = "a"\n'
                 + FIX)
    with pytest.raises(GatewayConfigError, match="\\[limits\\] must be a table"):
        load_gateway_config(p)
