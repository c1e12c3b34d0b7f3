"""End to end: a real node (`exposure run`), real TCP sessions, real multicast, `dump`."""

import json
import socket
import struct
import time

import numpy as np
import pytest
from support import DATA, SCENARIOS, load_expected, read_stream

from exposure.bench.flowgen import generate, to_jsonl
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import read_events
from exposure.engine.replay import replay_records
from exposure.feed.wire import open_receiver
from exposure.harness.localnode import LocalNode
from exposure.net import wire as W

pytestmark = [pytest.mark.timeout(300), pytest.mark.process]


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_sent_to_a_node_dumps_its_expected_document(tmp_path, name):
    n = LocalNode(tmp_path)
    try:
        p = n.cli("send", str(DATA / f"{name}.jsonl"))
        assert p.returncode == 0, p.stderr.decode()
        res = json.loads(p.stdout)
        want = load_expected(name)
        assert res["acknowledged"] == res["sent"]
        assert res["rejected"] == want["counts"]["rejected"]
        doc = n.dump()
        assert compare_documents(doc, want) == []
        replay = document(replay_records(read_events(DATA / f"{name}.jsonl")))
        assert compare_documents(doc, replay) == []
    finally:
        n.stop()
    assert n.segments() == []


def test_a_resend_after_reconnect_is_not_counted_twice(node):
    out = []
    for _ in range(2):
        p = node.cli("send", str(DATA / "basic.jsonl"), "--session", "5")
        assert p.returncode == 0, p.stderr.decode()
        out.append(json.loads(p.stdout))
    first, res = out
    assert res["sent"] == 0 and res["resent_skipped"] == res["acknowledged"] == 23
    # the session's rejects so far, reported by the resend too
    assert (res["rejected"], res["rejects"]) == (first["rejected"], first["rejects"])
    assert compare_documents(node.dump(), load_expected("basic")) == []


def test_three_concurrent_sessions_equal_the_replay_of_their_files(node, tmp_path):
    files = []
    for k in range(3):  # disjoint sources and instruments: their interleaving cannot matter
        recs = generate(20_000, accounts=30, instruments=200, universe=20, live_target=500,
                        seed=10 + k)
        recs["source"] = k
        recs["instrument"] = recs["instrument"] % 20_000 + 20_000 * k
        f = tmp_path / f"s{k}.jsonl"
        f.write_bytes(to_jsonl(recs))
        files.append(f)
    import subprocess
    import sys
    procs = [subprocess.Popen([sys.executable, "-m", "exposure", "send", str(f), "--session",
                               str(10 + k), "--config", str(node.config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for k, f in enumerate(files)]
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()
    all_recs = np.concatenate([read_events(f) for f in files])
    assert compare_documents(node.dump(), document(replay_records(all_recs))) == []


def test_multicast_updates_are_contiguous_and_rebuild_every_account(node):
    rx = open_receiver(node.group, node.mport)
    rx.settimeout(0.5)
    try:
        p = node.cli("send", str(DATA / "clean-5000.jsonl"))
        assert p.returncode == 0, p.stderr.decode()
        seqs, latest = read_stream(rx)
    finally:
        rx.close()
    assert seqs == list(range(1, len(seqs) + 1)), "a gap in the stream"
    doc = node.dump()
    for row in doc["accounts"]:
        u = latest[row["account"]]
        for k in ("long_mv", "short_mv", "gross", "net", "worst_gross", "margin", "pnl"):
            assert u[k] == pytest.approx(row[k], abs=1e-6), (row["account"], k)
        assert u["live_orders"] == row["live_orders"] and u["breach"] == row["breach"]
    assert latest[-1]["gross"] == pytest.approx(doc["fund"]["gross"])


def _raw(node, payload: bytes, read: bool = True) -> bytes:
    s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    try:
        s.sendall(payload)
        if not read:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(4096)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def _reject_text(data: bytes) -> str:
    frames = W.FrameReader().feed(data)
    rej = [p for k, p in frames if k == W.K_REJECT]
    assert rej, f"no REJECT in {data!r}"
    return W.decode_reject(rej[0])[2]


def _unanswered(data: bytes) -> bool:
    """Only the CHALLENGE every connection gets, then the node closed it."""
    return [k for k, _ in W.FrameReader().feed(data)] == [W.K_CHALLENGE]


def test_bad_input_gets_a_clear_reject_and_harms_nothing(node):
    p = node.cli("send", str(DATA / "basic.jsonl"), "--session", "1")
    assert p.returncode == 0
    before = node.dump()
    # before login nothing is answered: the connection is closed
    assert _unanswered(_raw(node, b"\x17\x03garbage" * 10))
    assert _unanswered(_raw(node, W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, 2**31)))
    assert _unanswered(_raw(node, W.encode_events(read_events(DATA / "basic.jsonl")[:1])))
    assert _unanswered(_raw(node, W.encode_heartbeat()))
    # a login with a bad session id is refused; after login a bad frame gets its reason
    assert "outside" in _reject_text(_raw(node, W.encode_login(0)))
    assert "outside" in _reject_text(_raw(node, W.encode_login(2**32 - 1)))
    assert "bad frame magic" in _reject_text(_raw(node, W.encode_login(4)
                                                  + b"\x17\x03garbage" * 10))
    big = W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, 2**31)
    assert "EVENTS frame of" in _reject_text(_raw(node, W.encode_login(4) + big))
    # a client killed mid-frame: half a frame, then the connection drops
    frame = W.encode_login(2) + W.encode_events(read_events(DATA / "basic.jsonl")[:3])
    logins = node.session_counters(2)["logins"]
    _raw(node, frame[:-50], read=False)
    # the node took the login, then saw the connection drop: it has read all it ever will
    deadline = time.monotonic() + 30
    while not (node.session_counters(2)["logins"] > logins
               and not node.session_counters(2)["connected"]
               and node.port_counters()["open"] == 0):
        assert time.monotonic() < deadline, (node.session_counters(2), node.port_counters())
        time.sleep(0.005)
    assert compare_documents(node.dump(), before) == []
    # an unknown record type in a well-formed frame is counted by the kernel, not fatal
    rec = read_events(DATA / "basic.jsonl")[:1].copy()
    rec["type"] = 200
    rec["sseq"] = 1
    data = _raw_session(node, 3, rec)
    seq, rejects = W.decode_ack(data)
    assert seq == 1 and rejects[1] == 1  # bad_type
    # the first session is unharmed and the node still serves
    p = node.cli("send", str(DATA / "basic.jsonl"), "--session", "1")
    assert p.returncode == 0 and json.loads(p.stdout)["resent_skipped"] == 23
    after = node.dump()
    assert after["counts"]["rejected"] == before["counts"]["rejected"] + 1
    after["counts"] = before["counts"]
    assert compare_documents(after, before) == []


def _raw_session(node, sid: int, recs) -> bytes:
    s = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    rd = W.FrameReader()
    try:
        s.sendall(W.encode_login(sid) + W.encode_events(recs))
        while True:
            for kind, payload in rd.feed(s.recv(4096)):
                if kind == W.K_ACK and struct.unpack_from("<Q", payload)[0] >= len(recs):
                    return payload
    finally:
        s.close()


def test_an_unreachable_node_is_a_nonzero_exit(tmp_path):
    from exposure.harness.localnode import free_port
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nname = "nobody"\n[ingest]\nport = {free_port()}\n')
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "exposure", "send", str(DATA / "basic.jsonl"),
                        "--config", str(cfg), "--timeout", "2"], capture_output=True,
                       timeout=120)  # (a node may start meanwhile: waited for --timeout)
    assert p.returncode == 2 and b"cannot reach the node" in p.stderr
    p = subprocess.run([sys.executable, "-m", "exposure", "dump", "--config", str(cfg)],
                       capture_output=True, timeout=120)
    assert p.returncode == 2 and b"is the node running" in p.stderr
