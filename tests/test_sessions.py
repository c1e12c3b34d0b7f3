"""Sessions: credentials, entitlements and the sequence rule, against a real node with a
sessions file; the sessions file's and the config's own checks."""

import grp
import json
import os
import socket
import struct

import numpy as np
import orjson
import pytest

from exposure.config.node import ConfigError, load_config
from exposure.core.types import R_UNAUTHORIZED
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import records_from_objects
from exposure.engine.replay import replay_records
from exposure.harness.localnode import LocalNode
from exposure.net import wire as W
from exposure.net.client import SendError, send_records
from exposure.net.sessions import Entitlements, SessionsError, load_sessions

pytestmark = pytest.mark.timeout(300)

SECRET = {1: b"alpha-secret-0123456789", 2: b"bravo-secret-0123456789",
          3: b"ref-data-secret-0123456789"}
SESSIONS = f"""
[[session]]
id = 1
name = "alpha"
secret = "{SECRET[1].decode()}"
sources = [1]
accounts = [10, "11-12"]

[[session]]
id = 2
name = "bravo"
secret_file = "bravo.secret"
sources = [2]
accounts = [20]

[[session]]
id = 3
name = "reference"
secret = "{SECRET[3].decode()}"
instrument = true
mark = true
limit = true
fx = true
accounts = "all"
"""


# ----------------------------------------------------------------------- the files
def test_a_sessions_file_gives_each_session_its_secret_and_entitlements(tmp_path):
    (tmp_path / "bravo.secret").write_bytes(SECRET[2] + b"\n")
    (tmp_path / "s.toml").write_text(SESSIONS)
    specs = load_sessions(tmp_path / "s.toml", 8, 4096, 1024)
    assert {k: s.secret for k, s in specs.items()} == SECRET
    assert SECRET[1].decode() not in repr(specs)  # never printed
    e = Entitlements.of(specs, 8, 4096, 1024)
    assert e.allows(1, "source", 1) and not e.allows(1, "source", 2)
    assert [a for a in range(4096) if e.allows(1, "account", a)] == [10, 11, 12]
    assert not any(e.allows(1, f) for f in ("instrument", "mark", "limit", "fx"))
    assert e.allows(3, "account", 4095) and not e.allows(3, "source", 0)
    assert e.allows(3, "fx") and not e.allows(3, "roll")
    assert not e.allows(5, "account", 10)  # not configured: nothing


@pytest.mark.parametrize("text,message", [
    ("", "no \\[\\[session\\]\\]"),
    ('[[session]]\nid = 0\nsecret = "0123456789abcdef"', "id = 0: 1..8"),
    ('[[session]]\nid = 1\nsecret = "short"', "5 bytes"),
    ('[[session]]\nid = 1\nsecret = "0123456789abcdef"\n[[session]]\nid = 1\n'
     'secret = "0123456789abcdef"', "given twice"),
    ('[[session]]\nid = 1\nsecret = "0123456789abcdef"\nacounts = [1]', "unknown key"),
    ('[[session]]\nid = 1\nsecret = "0123456789abcdef"\naccounts = ["5-4096"]',
     "outside 0..4095"),
    ('[[session]]\nid = 1\nsecret = "0123456789abcdef"\nmark = "yes"', "true or false"),
    ('[[session]]\nid = 1', "exactly one of secret and secret_file"),
    ('[[session]]\nid = 1\nsecret_file = "missing"', "cannot read"),
])
def test_a_bad_sessions_file_is_refused_naming_the_key(tmp_path, text, message):
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(SessionsError, match=message):
        load_sessions(tmp_path / "s.toml", 8, 4096, 1024)


def test_a_node_others_can_reach_refuses_to_start_without_a_sessions_file(tmp_path):
    cfg = tmp_path / "n.toml"
    cfg.write_text('[ingest]\nhost = "0.0.0.0"\n')
    with pytest.raises(ConfigError, match="needs ingest.sessions"):
        load_config(cfg)
    (tmp_path / "bravo.secret").write_bytes(SECRET[2])
    (tmp_path / "s.toml").write_text(SESSIONS)
    cfg.write_text('[ingest]\nhost = "0.0.0.0"\nsessions = "s.toml"\n')
    assert load_config(cfg).sessions_file == tmp_path / "s.toml"
    assert load_config(None).sessions_file is None  # the default: loopback, open


@pytest.mark.parametrize("mode", ["0666", "0620", "0400", "rw"])
def test_the_desks_mode_keeps_the_segment_read_only_for_everyone_but_the_node(tmp_path, mode):
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[desks]\nmode = "{mode}"\n')
    with pytest.raises(ConfigError, match="desks.mode"):
        load_config(cfg)


# ----------------------------------------------------------------------- a live node
@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sessions")
    (tmp / "bravo.secret").write_bytes(SECRET[2])
    (tmp / "sessions.toml").write_text(SESSIONS)
    group = grp.getgrgid(os.getgid()).gr_name
    n = LocalNode(tmp, ingest=f'sessions = "{tmp / "sessions.toml"}"',
                 extra=f'[desks]\nmode = "0640"\ngroup = "{group}"\n')
    try:
        yield n
    finally:
        n.stop()
    assert n.segments() == []


def _status(node) -> dict:
    p = node.cli("status", "--compact")
    assert p.returncode == 0, p.stderr.decode()
    return orjson.loads(p.stdout)


class Conn:
    """A raw session connection: the CHALLENGE read, frames collected."""

    def __init__(self, node):
        self.s = socket.create_connection(("127.0.0.1", node.port), timeout=10)
        self.rd = W.FrameReader()
        self.frames: list = []
        self.nonce = self.next(W.K_CHALLENGE)

    def next(self, kind: int):
        while True:
            for k, (got, payload) in enumerate(self.frames):
                if got == kind:
                    del self.frames[:k + 1]
                    return payload
            data = self.s.recv(65536)
            if not data:
                raise EOFError(f"closed; frames: {[k for k, _ in self.frames]}")
            self.frames += self.rd.feed(data)

    def login(self, sid: int, secret: bytes | None = None, proof: bytes | None = None):
        if proof is None:
            proof = W.login_mac(secret or SECRET[sid], sid, self.nonce)
        self.s.sendall(W.encode_login(sid, proof))

    def rejected(self) -> tuple[int, int, str]:
        return W.decode_reject(self.next(W.K_REJECT))

    def close(self):
        self.s.close()


def _events(objs: list[dict], first_seq: int) -> np.ndarray:
    recs = records_from_objects(objs)
    recs["sseq"] = np.arange(first_seq, first_seq + len(recs))
    return recs


def _held(node, sid: int) -> int:
    c = Conn(node)
    try:
        c.login(sid)
        return struct.unpack("<Q", c.next(W.K_LOGIN_OK))[0]
    finally:
        c.close()


@pytest.mark.process
def test_a_wrong_secret_a_replayed_login_and_an_unknown_session_are_refused(node):
    before = _status(node)["port"]["auth_failures"]
    held = _held(node, 1)
    c = Conn(node)
    c.login(1, secret=b"not-the-secret-0123456789")
    assert c.rejected()[0] == W.E_AUTH
    c.close()
    good = Conn(node)  # a valid proof, captured, is good for that connection only
    proof = W.login_mac(SECRET[1], 1, good.nonce)
    replay = Conn(node)
    replay.login(1, proof=proof)
    assert replay.rejected()[0] == W.E_AUTH
    replay.close()
    good.close()
    c = Conn(node)
    c.login(7, secret=b"whatever-secret-0123456789")  # not in the sessions file
    assert c.rejected()[0] == W.E_AUTH
    c.close()
    st = _status(node)
    assert st["port"]["auth_failures"] == before + 3
    assert next(s for s in st["sessions"] if s["session"] == 1)["auth_failures"] >= 2
    assert _held(node, 1) == held  # no refused login took anything


@pytest.mark.process
def test_records_outside_the_entitlements_are_unauthorized_and_never_applied(node, tmp_path):
    ref = [{"type": "instrument", "instrument": 5, "multiplier": 1.0, "margin_rate": 0.1,
            "beta": 1.0, "sector": 1, "currency": 1},
           {"type": "mark", "instrument": 5, "price": 10.0},
           {"type": "fx", "currency": 1, "rate": 1.1},
           {"type": "limit", "account": 10, "gross": 1e9}]
    res = send_records("127.0.0.1", node.port, _events(ref, 1), session=3,
                       secret=SECRET[3])
    assert res["rejected"] == 0
    held = _held(node, 1)
    mine = [{"type": "new", "source": 1, "order_id": 1, "account": 10, "instrument": 5,
             "side": "buy", "qty": 100, "price": 10.0},
            {"type": "fill", "source": 1, "order_id": 1, "account": 10, "instrument": 5,
             "side": "buy", "qty": 10, "price": 10.0},
            {"type": "fill", "source": 1, "order_id": 9, "account": 11, "instrument": 5,
             "side": "sell", "qty": 3, "price": 10.5}]
    theirs = [{"type": "new", "source": 1, "order_id": 2, "account": 20, "instrument": 5,
               "side": "buy", "qty": 100, "price": 10.0},       # bravo's account
              {"type": "new", "source": 2, "order_id": 3, "account": 10, "instrument": 5,
               "side": "buy", "qty": 100, "price": 10.0},       # bravo's source
              {"type": "cancel", "source": 2, "order_id": 3},
              {"type": "mark", "instrument": 5, "price": 99.0},  # no mark entitlement
              {"type": "fx", "currency": 1, "rate": 9.0},        # no fx entitlement
              {"type": "instrument", "instrument": 5, "multiplier": 7.0, "margin_rate": 0.1,
               "beta": 1.0, "sector": 1},
              {"type": "limit", "account": 10, "gross": 1.0},
              {"type": "position", "account": 20, "instrument": 5, "qty": 5}]
    stream = mine[:1] + theirs + mine[1:]
    recs = _events(stream, 1)  # (send_records numbers them from 1 and skips what is held)
    out = send_records("127.0.0.1", node.port, recs, session=1, secret=SECRET[1])
    assert held == 0 and out["acknowledged"] == len(stream)
    assert out["rejects"] == {"unauthorized": len(theirs)}
    want = document(replay_records(_events(ref + mine, 1)))
    got = node.dump()
    assert compare_documents(got, want) == [], "only the entitled events are applied"
    st = _status(node)
    assert st["unauthorized"] >= len(theirs)
    alpha = next(s for s in st["sessions"] if s["session"] == 1)
    assert alpha["rejects"]["unauthorized"] == len(theirs) and alpha["name"] == "alpha"
    assert "unauthorized" not in got["counts"]["rejects"]  # not a SPEC reason
    assert st["fanout"] == {"send_errors": 0}
    assert R_UNAUTHORIZED not in (1, 2, 3, 4, 5, 6, 7)


@pytest.mark.process
@pytest.mark.parametrize("poison", [2**63, 2**64 - 1, 2**63 + 1])
def test_a_poison_seq_is_rejected_naming_the_next_one_and_the_session_goes_on(node, poison):
    held = _held(node, 2)
    c = Conn(node)
    c.login(2)
    c.next(W.K_LOGIN_OK)
    rec = _events([{"type": "new", "source": 2, "order_id": 50 + held, "account": 20,
                    "instrument": 9, "side": "sell", "qty": 1, "price": 1.0}], 1)
    rec["sseq"] = np.uint64(poison)
    c.s.sendall(W.encode_events(rec))
    code, expected, text = c.rejected()
    assert (code, expected) == (W.E_SEQ, held + 1) and str(held + 1) in text
    c.close()
    assert _held(node, 2) == held  # nothing applied
    # the same session logs in again and is served; the node did not restart
    pids = node.pids()
    objs = [{"type": "new", "source": 2, "order_id": 100 + k, "account": 20,
             "instrument": 9, "side": "buy", "qty": 1, "price": 1.0} for k in range(held + 1)]
    res = send_records("127.0.0.1", node.port, _events(objs, 1), session=2,
                       secret=SECRET[2])
    assert res["sent"] == 1 and res["acknowledged"] == held + 1
    assert node.pids() == pids and node.alive


@pytest.mark.process
def test_send_takes_the_secret_from_the_config_or_a_file_and_fails_clearly(node, tmp_path):
    ev = tmp_path / "ev.jsonl"

    def one_more() -> None:  # a file of one line more than session 3 holds
        n = _held(node, 3) + 1
        ev.write_text("".join(json.dumps({"type": "mark", "instrument": 6, "price": 1.0 + k})
                              + "\n" for k in range(n)))

    one_more()
    p = node.cli("send", str(ev), "--session", "3")  # the secret from --config's sessions
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["sent"] == 1
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("definitely-not-it-0123456789\n")
    one_more()
    p = node.cli("send", str(ev), "--session", "3", "--secret-file", str(wrong))
    assert p.returncode == 2 and b"authentication failed" in p.stderr
    right = tmp_path / "right.secret"
    right.write_bytes(SECRET[3] + b"\n")
    p = node.cli("send", str(ev), "--session", "3", "--secret-file", str(right))
    assert p.returncode == 0, p.stderr.decode()
    assert json.loads(p.stdout)["sent"] == 1
    with pytest.raises(SendError, match="authentication failed"):
        send_records("127.0.0.1", node.port, _events([{"type": "mark"}], 1), session=3)


@pytest.mark.process
def test_the_tally_segment_has_the_configured_mode_and_group(node):
    st = os.stat(f"/dev/shm/exposure.{node.name}.tally")
    assert st.st_mode & 0o777 == 0o640 and st.st_gid == os.getgid()


@pytest.mark.process
def test_the_secret_never_reaches_the_journal_or_the_log(node):
    # (the other tests of this module have logged in, failed and sent by now)
    for s in SECRET.values():
        assert s not in node.log.read_bytes()
        for f in node.data_dir.rglob("*"):
            if f.is_file():
                assert s not in f.read_bytes(), f
