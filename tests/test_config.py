"""The node configuration: the built-in default, and every way a config can be wrong."""

import os
import socket
from pathlib import Path

import pytest

from exposure.config.node import DEFAULT_TOML, ConfigError, check_ports_free, load_config

CPUS = sorted(os.sched_getaffinity(0))


def _cfg(tmp_path, text):
    p = tmp_path / "node.toml"
    p.write_text(text)
    return load_config(p)


def test_the_built_in_default_fits_this_machine():
    cfg = load_config()
    assert [p.stages for p in cfg.processes] == [("ingest", "compute", "fanout"),
                                                  ("journal", "mirror", "snapshot")]
    spin = [p for p in cfg.processes if p.wait == "spin"]
    if len(CPUS) > 1:
        assert len(spin) == 1 and spin[0].cpu == CPUS[-1]
        journal = cfg.processes[1]
        assert journal.wait == "sleep" and journal.cpu == CPUS[-2]  # the other core
    # ACKs wait for the durable process: it goes ahead of a client busy-polling its core
    assert cfg.processes[1].nice == -10 and cfg.processes[0].nice == 0
    assert cfg.segment("tally") == "/exposure.exposure.tally"
    assert cfg.caps.orders == 1_048_576 and cfg.rings["compute"] == 131072
    assert "tap" not in cfg.rings  # the journal reads the compute ring


def test_an_older_config_s_tap_ring_is_checked_then_dropped(tmp_path):
    p = tmp_path / "old.toml"
    p.write_text("[rings]\ntap = 4096\n")
    assert "tap" not in load_config(p).rings
    p.write_text("[rings]\ntap = 1000\n")
    with pytest.raises(ConfigError, match="rings.tap"):
        load_config(p)


def test_the_default_text_is_commented_and_complete():
    for key in ("[node]", "[capacities]", "[rings]", "[ingest]", "[fanout]", "[journal]",
                "[[process]]"):
        assert key in DEFAULT_TOML
    assert DEFAULT_TOML.count("#") > 10


def test_a_file_overrides_only_what_it_names(tmp_path):
    cfg = _cfg(tmp_path, '[node]\nname = "pm-a"\n[ingest]\nport = 7800\n')
    assert cfg.name == "pm-a" and cfg.ingest_port == 7800 and cfg.fanout_port == 7701
    assert cfg.journal_cache_bytes == 256 << 20
    assert _cfg(tmp_path, "[journal]\ncache_mb = 0\n").journal_cache_bytes == 0


@pytest.mark.parametrize("text,message", [
    ("[node]\nnmae = 'x'\n", "unknown key node.nmae"),
    ("[nodes]\nname = 'x'\n", "unknown section [nodes]"),
    ("[ingest]\nport = 'x'\n", "ingest.port = 'x': expected int"),
    ("[ingest]\nport = 70000\n", "ingest.port = 70000"),
    ("[ingest]\nipc = 'yes'\n", "ingest.ipc = 'yes': expected bool"),
    ("[ingest]\nipc_ring_kb = 100\n", "ingest.ipc_ring_kb = 100: a power of two"),
    ("[ingest]\nipc_ring_kb = 32\n", "ingest.ipc_ring_kb = 32"),
    ("[rings]\ncompute = 1000\n", "rings.compute: ring capacity 1000"),
    ("[capacities]\nsources = 70000\n", "sources=70000"),
    ("[fanout]\ngroup = '10.0.0.1'\n", "not a multicast address"),
    ("[fanout]\nmax_datagram = 100\n",
     "fanout.max_datagram = 100: 0 (the interface's MTU) or 256..65000"),
    ("[fanout]\nmax_datagram = 65001\n", "fanout.max_datagram = 65001"),
    ("[node]\nname = 'a/b'\n", "node.name = 'a/b'"),
    ("[[process]]\nname='a'\nstages=['ingest','compute']\ncpu=0\nwait='block'\n",
     "stage(s) fanout, journal run in no process"),
    ("[[process]]\nname='a'\nstages=['ingest','compute','fanout']\ncpu=999\n", "cpu = 999"),
    ("[[process]]\nname='a'\nstages=['ingest','compute','fanout','bogus']\n",
     "unknown stage 'bogus'"),
    ("[[process]]\nname='a'\nstages=['ingest','compute']\n[[process]]\nname='b'\n"
     "stages=['compute','fanout']\n", "stage 'compute' is in both process 'a' and 'b'"),
    ("[[process]]\nname='a'\nstages=['ingest','compute','fanout']\nwait='nap'\n",
     "wait = 'nap'"),
    ("[[process]]\nname='a'\nstages=['ingest','compute','fanout']\nwait='spin'\n",
     "needs a pinned cpu"),
    ("[[process]]\nname='a'\nstages=['ingest','compute','fanout']\ncolour=1\n",
     "unknown key process[0].colour"),
    ("[[process]]\nname='a'\nstages=['ingest','compute','fanout']\nnice=-21\n",
     "process[0].nice = -21: -20..19"),
    ("not toml [", "not valid TOML"),
    ("[web]\nport = 0\n", "web.port = 0: 1..65535"),
    ("[web]\ntls_cert = 'c.pem'\n", "web.tls_cert and web.tls_key: both or neither"),
    ("[web]\nmax_clients = 0\n", "web.max_clients = 0"),
    ("[web]\nhost = ''\n", "web.host is empty"),
    ("[journal]\ncache_mb = -1\n", "journal.cache_mb = -1: 0..65536"),
])
def test_a_bad_config_is_a_clear_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, text)
    assert message in str(e.value)


def test_the_currencies_table_names_the_base_and_the_others_ids(tmp_path):
    """SPEC section 7: [currencies] base (id 0) and the others' ids; default USD alone."""
    assert load_config().currencies.base == "USD" and load_config().currencies.ids == {}
    c = _cfg(tmp_path, '[currencies]\nbase = "EUR"\nids = { JPY = 2, USD = 1, CNH = 9 }\n'
             ).currencies
    assert c.base == "EUR" and c.id_of("EUR") == 0 and c.id_of("CNH") == 9
    assert c.codes == {0: "EUR", 1: "USD", 2: "JPY", 9: "CNH"} and c.id_of("GBP") is None
    assert c.label(9) == "CNH" and c.label(200) == "#200"
    assert "[currencies]" in DEFAULT_TOML


@pytest.mark.parametrize("text,message", [
    ('base = "usd"', "currencies.base = 'usd': a currency code, three capital letters"),
    ('base = "US"', "currencies.base = 'US'"),
    ("base = 840", "currencies.base = 840: expected str"),
    ("ids = { EUR = 0 }", "currencies.ids.EUR = 0: an id 1..255 (0 is the base currency, "
                          "USD)"),
    ("ids = { EUR = 256 }", "currencies.ids.EUR = 256: an id 1..255"),
    ("ids = { EUR = 1.5 }", "currencies.ids.EUR = 1.5: an id 1..255"),
    ("ids = { EUR = true }", "currencies.ids.EUR = True: an id 1..255"),
    ("ids = { EUR = 1, GBP = 1 }", "currencies.ids.GBP = 1: id 1 is EUR's too"),
    ("ids = { USD = 3 }", "currencies.ids.USD: USD is the base currency, whose id is "
                          "always 0"),
    ("ids = { Euro = 3 }", "currencies.ids: 'Euro' is not a currency code"),
    ('ids = { "E1R" = 3 }', "currencies.ids: 'E1R' is not a currency code"),
    ("ids = [1, 2]", "currencies.ids = [1, 2]: expected dict"),
    ("rates = { EUR = 1.1 }", "unknown key currencies.rates (allowed: base, ids)"),
])
def test_a_bad_currencies_table_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, f"[currencies]\n{text}\n")
    assert message in str(e.value)


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two CPUs")
def test_two_spinners_on_one_core_are_refused(tmp_path):
    c = CPUS[0]
    text = (f"[[process]]\nname='a'\nstages=['ingest']\ncpu={c}\nwait='spin'\n"
            f"[[process]]\nname='b'\nstages=['compute','fanout']\ncpu={c}\nwait='spin'\n")
    with pytest.raises(ConfigError, match="both spin on cpu"):
        _cfg(tmp_path, text)
    text = "".join(f"[[process]]\nname='p{k}'\nstages=['{s}']\ncpu={k}\nwait='spin'\n"
                   for k, s in zip(CPUS, ["ingest", "compute", "fanout"], strict=False))
    if len(CPUS) == 2:
        text += "[[process]]\nname='x'\nstages=['fanout','journal']\nwait='block'\n"
    else:
        text += "[[process]]\nname='x'\nstages=['journal']\nwait='block'\n"
    with pytest.raises(ConfigError, match="leave one core"):
        _cfg(tmp_path, text)


def test_an_unreadable_config_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.process
def test_a_port_in_use_is_refused(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        cfg = _cfg(tmp_path, f"[ingest]\nport = {port}\n")
        with pytest.raises(ConfigError, match=f"ingest.port = {port}"):
            check_ports_free(cfg)
    finally:
        s.close()
    check_ports_free(cfg)


_PAIR = ("[replication]\npeer = '127.0.0.1:7722'\nlisten = '127.0.0.1:7712'\n"
         "secret_file = 'secret'\n")


def test_the_example_pair_configs_load_and_name_each_other():
    pair = Path(__file__).resolve().parents[1] / "examples" / "pair"
    a = load_config(pair / "primary.toml")
    b = load_config(pair / "backup.toml")
    assert a.replicated and b.replicated and a.release == b.release == "replicated+local"
    assert a.repl_peer == b.repl_listen and b.repl_peer == a.repl_listen
    assert a.peer_ingest == (b.ingest_host, b.ingest_port)
    assert b.peer_ingest == (a.ingest_host, a.ingest_port)
    assert a.etcd == b.etcd and a.etcd_prefix == b.etcd_prefix  # one pair, one record
    assert a.secret_file == b.secret_file and not a.strict and a.alone_after_ms > 0
    assert a.name != b.name and a.data_dir != b.data_dir
    assert (a.group, a.fanout_port) == (b.group, b.fanout_port)
    # the feed's recovery server runs with the journal, one port per node, each naming
    # the other's (a subscriber asks both)
    assert [p.stages for p in a.processes][1] == ("journal", "mirror", "snapshot")
    assert a.peer_snapshot == (b.snapshot_host, b.snapshot_port)
    assert b.peer_snapshot == (a.snapshot_host, a.snapshot_port)
    assert a.snapshot_port != b.snapshot_port


def test_the_recovery_server_goes_with_the_journal_unless_placed_or_off(tmp_path):
    base = "[[process]]\nname = \"hot\"\nstages = [\"ingest\", \"compute\", \"fanout\"]\n" \
        "wait = \"block\"\n[[process]]\nname = \"d\"\nstages = [\"journal\"]\n" \
        "wait = \"sleep\"\n"
    placed = _cfg(tmp_path, base)
    assert placed.processes[1].stages == ("journal", "snapshot")
    off = _cfg(tmp_path, "[fanout]\nsnapshot_port = 0\n" + base)
    assert all("snapshot" not in p.stages for p in off.processes)
    own = _cfg(tmp_path, base + "[[process]]\nname = \"s\"\nstages = [\"snapshot\"]\n"
               "wait = \"sleep\"\n")
    assert [p.stages for p in own.processes][1:] == [("journal",), ("snapshot",)]
    for bad in ("snapshot_port = 70000", "snapshot_host = \"nowhere\"",
                "heartbeat_ms = 5", "refresh_rows_per_s = -1"):
        with pytest.raises(ConfigError, match="fanout"):
            _cfg(tmp_path, f"[fanout]\n{bad}\n")


def test_a_pair_config_resolves_its_files_next_to_it(tmp_path):
    (tmp_path / "secret").write_text("s" * 32)
    cfg = _cfg(tmp_path, _PAIR)
    assert cfg.secret_file == tmp_path / "secret"
    assert cfg.etcd == ("http://127.0.0.1:2379",) and cfg.etcd_prefix == "/exposure/pair"


def test_the_web_section_gives_the_page_s_address_and_files_next_to_the_config(tmp_path):
    d = load_config()
    assert (d.web_host, d.web_port, d.web_max_clients) == ("127.0.0.1", 8080, 200)
    assert d.web_users is d.web_tls_cert is d.web_tls_key is None
    cfg = _cfg(tmp_path, "[web]\nhost = '0.0.0.0'\nport = 8443\nusers = 'users.toml'\n"
                         "tls_cert = 'c.pem'\ntls_key = '/etc/k.pem'\nmax_clients = 50\n")
    assert (cfg.web_host, cfg.web_port, cfg.web_max_clients) == ("0.0.0.0", 8443, 50)
    assert cfg.web_users == tmp_path / "users.toml" and cfg.web_tls_cert == tmp_path / "c.pem"
    assert str(cfg.web_tls_key) == "/etc/k.pem"


def test_a_pair_config_takes_a_list_of_etcd_endpoints_and_its_settings(tmp_path):
    (tmp_path / "secret").write_text("s" * 32)
    cfg = _cfg(tmp_path, _PAIR + "etcd = ['http://10.0.0.1:2379', 'https://e2:2380']\n"
               "etcd_prefix = '/fund/a/'\nalone_after_ms = 150\nstrict = true\n"
               "[node]\nstall_ms = 900\n")
    assert cfg.etcd == ("http://10.0.0.1:2379", "https://e2:2380")
    assert cfg.etcd_prefix == "/fund/a" and cfg.alone_after_ms == 150 and cfg.strict
    assert cfg.stall_ms == 900
    assert not load_config().replicated and load_config().release == "local"


@pytest.mark.parametrize("text,message", [
    (_PAIR.replace("'127.0.0.1:7722'", "'localhost'"), "replication.peer = 'localhost'"),
    (_PAIR.replace("listen = '127.0.0.1:7712'\n", ""), "replication.listen is required"),
    (_PAIR + "etcd = ''\n", "replication.etcd is required"),
    (_PAIR + "etcd = 'localhost:2379'\n", "replication.etcd: 'localhost:2379': expected"),
    (_PAIR + "etcd = ['http://e:2379', 7]\n", "URLs as strings"),
    (_PAIR + "etcd = 'http://e:99999'\n", "the port is not a number"),
    (_PAIR + "etcd_prefix = 'pair'\n", "replication.etcd_prefix = 'pair'"),
    (_PAIR + "etcd_prefix = '/'\n", "replication.etcd_prefix = '/'"),
    (_PAIR + "alone_after_ms = 0\n", "replication.alone_after_ms = 0"),
    (_PAIR + "strict = 1\n", "replication.strict = 1: expected bool"),
    (_PAIR + "witness = 'w.lock'\n", "replication.witness is no longer a setting"),
    (_PAIR + "[node]\nstall_ms = 5\n", "node.stall_ms = 5"),
    (_PAIR + "release = 'eventually'\n", "replication.release = 'eventually'"),
    (_PAIR + "heartbeat_ms = 200\nfailover_ms = 300\n", "failover_ms = 300: at least two"),
    (_PAIR.replace("'secret'", "'missing'"), "cannot read the replication secret"),
    (_PAIR.replace("'secret'", "'short'"), "use at least 16"),
    (_PAIR + "[[process]]\nname='a'\nstages=['ingest','compute','fanout','journal']\n",
     "stage(s) mirror run in no process"),
])
def test_a_bad_pair_config_is_a_clear_error_naming_the_key(tmp_path, text, message):
    (tmp_path / "secret").write_text("s" * 32)
    (tmp_path / "short").write_text("tiny\n")
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, text)
    assert message in str(e.value)
