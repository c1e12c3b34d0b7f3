"""The FIX session layer against a real FIX engine: QuickFIX (C++, Debian's libquickfix-dev)
as the counterparty, compiled once per test session from tests/fix/counterparty.cpp; and a
raw peer for the bytes no FIX engine sends (tests/fixsupport.py)."""

import os
import signal

import pytest
from fixsupport import QuickFix, RawPeer, build_counterparty, free_port

from exposure.fix.codec import encode
from exposure.fix.server import FixEngine
from exposure.fix.session import FileSeqStore, SessionConfig
from exposure.harness.wait import wait_for

pytestmark = pytest.mark.process

ER = "35=8|37=O{i}|11=C{i}|17=E{i}|150=F|39=1|54=1|55=AAPL|38=100|32=10|31=1.5|14=10|151=90|6=1.5"


def day(a, b):
    return [ER.format(i=i) for i in range(a, b)]


@pytest.fixture(scope="session")
def qf_exe(tmp_path_factory):
    return build_counterparty(tmp_path_factory.mktemp("quickfix"))


class World:
    """Engines and QuickFIX processes of one test, all stopped at its end."""

    def __init__(self, tmp_path, exe):
        self.tmp, self.exe = tmp_path, exe
        self.engines, self.procs, self.peers = [], [], []
        self.got = {}  # session key -> [ExecID] in delivery order

    def config(self, **kw):
        table = {"role": "acceptor", "listen": f"127.0.0.1:{kw.pop('port', free_port())}",
                 "begin_string": "FIX.4.4", "sender_comp_id": "EXPOSURE",
                 "target_comp_id": "BROKER1", "source": 3, **kw}
        return SessionConfig.from_table(table)

    def engine(self, configs, *, store=None, on_app=None, **kw):
        store = store or FileSeqStore(self.tmp / "seqs.json")

        def record(cfg, msg):
            self.got.setdefault(cfg.key, []).append(msg.get(17))

        e = FixEngine(configs, on_app or record, store, tick_s=0.05, **kw)
        e.start()
        e.ready.wait(5)
        self.engines.append(e)
        return e

    def quickfix(self, port, script=(), *, role="initiator", name="qf", **kw):
        q = QuickFix(self.exe, self.tmp / name, role=role, port=port, script=list(script),
                     name=name, **kw)
        self.procs.append(q)
        return q

    def raw(self, port, **kw):
        p = RawPeer(port, **kw)
        self.peers.append(p)
        return p

    def wait_got(self, key, ids, timeout=10.0):
        wait_for(lambda: self.got.get(key, []) == ids, timeout,
                 f"{key} to deliver {ids}", show=lambda: self.got.get(key))

    def close(self):
        for p in self.peers:
            p.close()
        for q in self.procs:
            q.kill()
        for e in self.engines:
            e.stop()


@pytest.fixture
def world(tmp_path, qf_exe):
    w = World(tmp_path, qf_exe)
    try:
        yield w
    finally:
        w.close()


def ids(a, b):
    return [f"E{i}" for i in range(a, b)]


@pytest.mark.parametrize("begin_string", ["FIX.4.2", "FIXT.1.1"])  # FIX.4.4: all the others
def test_quickfix_logs_on_and_its_execution_reports_arrive_once_in_order(world, begin_string):
    cfg = world.config(begin_string=begin_string)
    e = world.engine([cfg])
    q = world.quickfix(cfg.listen_addr[1], day(0, 5), begin_string=begin_string)
    world.wait_got(cfg.key, ids(0, 5))
    q.wait_line("DONE")
    q.stop()
    wait_for(lambda: e.counters()["sessions"][cfg.key]["state"] == "closed", 5, "logout")
    assert q.received("5"), "our side answered the Logout"
    assert e.store.get(cfg.key)[0] == 8  # Logon, 5 reports, Logout
    if begin_string == "FIXT.1.1":
        assert "|1137=9|" in q.received("A")[0]


def test_a_wrong_comp_id_gets_a_logout_and_no_session(world):
    cfg = world.config()
    e = world.engine([cfg])
    q = world.quickfix(cfg.listen_addr[1], day(0, 2), sender="BROKER9")
    q.wait("our Logout", lambda: q.received("5"))
    c = e.counters()
    assert c["unknown_comp_id"] >= 1 and c["sessions"][cfg.key]["logons"] == 0
    assert world.got == {}


def test_a_gap_is_resent_and_possdup_duplicates_are_dropped(world):
    cfg = world.config()
    e = world.engine([cfg])
    # 0..2, then seqs 5 and 6 skipped (QuickFIX gap-fills them), 3..4, then 3..4 once more
    # as possible duplicates of seqs already passed on
    q = world.quickfix(cfg.listen_addr[1], day(0, 3) + ["#skip 2"] + day(3, 5) +
                       ["#sleep 300", "#possdup 2"] + day(5, 6))
    world.wait_got(cfg.key, ids(0, 6))
    q.wait_line("DONE")
    s = e.counters()["sessions"][cfg.key]
    assert s["resend_requests_sent"] == 1 and s["gap_fills_in"] == 1
    assert s["possdup_dropped"] >= 2
    assert q.received("2")[0].count("|7=5|16=0|") == 1
    assert world.got[cfg.key] == ids(0, 6)


def test_messages_stored_while_logged_out_come_again_as_possdup_resends(world):
    cfg = world.config()
    world.engine([cfg])
    q = world.quickfix(cfg.listen_addr[1], day(0, 2) + ["#logout"] + day(2, 4) +
                       ["#logon"] + day(4, 5))
    world.wait_got(cfg.key, ids(0, 5))
    assert any("|43=Y|" in m and "|17=E2|" in m for m in q.sent("8"))


def test_a_counterparty_restart_with_and_without_reset_on_logon(world):
    cfg = world.config()
    e = world.engine([cfg])
    port = cfg.listen_addr[1]
    q = world.quickfix(port, day(0, 2))
    world.wait_got(cfg.key, ids(0, 2))
    q.stop()
    # restarted with its store: its seqs go on, ours too
    q = world.quickfix(port, day(2, 4))
    world.wait_got(cfg.key, ids(0, 4))
    assert "|34=1|" not in q.received("A")[0]
    q.stop()
    # restarted with ResetOnLogon: both sides start again at 1
    q = world.quickfix(port, day(4, 6), reset_on_logon=True)
    world.wait_got(cfg.key, ids(0, 6))
    assert "|141=Y|" in q.received("A")[0] and "|34=1|" in q.received("A")[0]
    assert e.counters()["sessions"][cfg.key]["seq_too_low"] == 0


def test_the_engine_stopped_dead_and_started_again_asks_for_exactly_what_it_missed(world):
    cfg = world.config()
    passed = []

    def crashing(c, msg):  # the gateway dies while passing E3 on
        if msg.get(17) == "E3":
            raise RuntimeError("killed")
        passed.append(msg.get(17))

    e1 = world.engine([cfg], on_app=crashing)
    q = world.quickfix(cfg.listen_addr[1], day(0, 6))
    wait_for(lambda: e1.counters()["app_errors"] == 1, 10, "the first engine's failure")
    e1.stop()
    assert passed == ids(0, 3)
    # a new engine on the same seq file: QuickFIX reconnects; we ask from E3's seq
    world.engine([cfg], store=FileSeqStore(world.tmp / "seqs.json"))
    world.wait_got(cfg.key, ids(3, 6))
    assert q.received("2")[-1].count("|7=5|16=0|") == 1  # Logon 1, E0..E2 = 2..4


def test_heartbeats_test_request_and_a_dead_peer(world):
    cfg = world.config()
    e = world.engine([cfg])
    q = world.quickfix(cfg.listen_addr[1], heartbeat_s=1)
    q.wait("our heartbeat", lambda: q.received("0"))
    os.kill(q.proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: e.counters()["sessions"][cfg.key]["peer_dead"] == 1, 10,
                 "the silent counterparty to be found dead")
    finally:
        os.kill(q.proc.pid, signal.SIGCONT)
    s = e.counters()["sessions"][cfg.key]
    assert s["test_requests_sent"] >= 1


def test_our_initiator_logs_on_to_a_quickfix_acceptor_and_reconnects(world):
    port = free_port()
    cfg = world.config(role="initiator", listen=None, connect=f"127.0.0.1:{port}",
                       reconnect_s=0.2)
    q = world.quickfix(port, day(0, 3), role="acceptor", sender="BROKER1", target="EXPOSURE")
    e = world.engine([cfg])
    world.wait_got(cfg.key, ids(0, 3))
    q.stop()
    q = world.quickfix(port, day(3, 5), role="acceptor")
    world.wait_got(cfg.key, ids(0, 5))
    assert e.counters()["connects"] >= 2


def test_malformed_input_gets_what_fix_prescribes_and_no_other_session_is_disturbed(world):
    good = world.config(target_comp_id="BROKER2")
    bad = world.config(port=good.listen_addr[1])
    e = world.engine([good, bad], max_connections=4)
    port = good.listen_addr[1]
    world.quickfix(port, day(0, 3) + ["#sleep 1500"] + day(3, 6), sender="BROKER2")
    p = world.raw(port)
    p.logon()
    p.send(b"\x00garbage\xff")                                   # garbage: skipped
    m = p.msg("8", [(37, "O"), (17, "X1"), (150, "0"), (39, "0"), (54, "1")])
    p.send(m[:-4] + b"000\x01")                                  # bad CheckSum: ignored
    p.send(p.msg("0"))                                           # so: a gap, a resend
    assert p.expect("2").get(7) == "2"
    p.send(p.msg("4", [(123, "Y"), (36, 4)], seq=2, poss_dup=True))
    p.send(p.msg("8", [(37, "O"), (17, "X2")]))                   # missing tags: Reject
    r = p.expect("3")
    assert (r.get(373), r.get(371), r.get(45)) == ("1", "150", "4")
    p.send(p.msg("ZZ"))                                           # unknown MsgType: 35=j
    assert p.expect("j").get(380) == "3"
    # too many connections: the fourth and later are closed at once
    extra = [world.raw(port) for _ in range(3)]
    wait_for(lambda: e.counters()["connections_refused"] >= 1, 5, "a refused connection")
    p.send(b"8=FIX.4.4\x019=99999999\x0135=8\x01")                 # far too long: Logout
    p.expect("5")
    p.wait_closed()
    for x in extra:
        x.close()
    world.wait_got(good.key, ids(0, 6))
    c = e.counters()
    s = c["sessions"][bad.key]
    assert (s["garbage"], s["bad_checksum"], s["missing_tag"], s["unknown_msg_type"],
            s["too_long"], s["rejects_sent"], s["business_rejects_sent"]) == (1, 1, 1, 1, 1, 1, 1)
    assert c["sessions"][good.key]["state"] == "active"
    assert world.got.get(bad.key) is None


def test_a_connection_from_an_address_not_allowed_gets_a_logout(world):
    cfg = world.config(allowed=["10.9.8.7"])
    e = world.engine([cfg])
    p = world.raw(cfg.listen_addr[1])
    p.send(encode("FIX.4.4", "A", [(98, 0), (108, 30)], sender="BROKER1", target="EXPOSURE",
                  seq=1))
    assert "not allowed" in p.expect("5").get(58)
    p.wait_closed()
    assert e.counters()["address_not_allowed"] == 1
