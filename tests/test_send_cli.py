"""`exposure send` on the producer: standard input streamed line by line, a followed file
through growth, rotation and truncation (and a follower started again from its position
file), a send started together with its node, and a send to a port where nothing listens."""

import os
import signal
import subprocess
import sys
import time

import orjson
import pytest
from support import DATA

from exposure.bench.flowgen import generate, to_jsonl
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import parse_events
from exposure.engine.replay import replay_records
from exposure.harness.localnode import LocalNode, free_port
from exposure.harness.wait import wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.process]


def _send(node, *args: str, stdin=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "exposure", "send", *args, "--config",
                             str(node.config)], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def _done(node, session: int) -> int:
    return node.session_counters(session).get("done", 0)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.stdout.read(), proc.stderr.read()  # (stdin may be closed: no communicate)
    proc.wait(timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    return orjson.loads(out)


def _lines(n: int, seed: int) -> list[bytes]:
    recs = generate(n, accounts=30, instruments=200, universe=20, live_target=300, seed=seed)
    return to_jsonl(recs).splitlines(keepends=True)


def _assert_replay(node, data: bytes) -> None:
    """The node's document equals replay of ``data`` (JSON lines, as `send FILE` reads
    them: a line that does not parse is a rejected record)."""
    assert compare_documents(node.dump(), document(replay_records(parse_events(data)))) == []


def test_standard_input_is_streamed_as_lines_arrive(node):
    lines = _lines(3000, seed=5)
    bad = b'{"type": "fill", "account": \n'  # not JSON: a record rejected as bad_field
    p = _send(node, "-", "--session", "2", stdin=subprocess.PIPE)
    try:
        for k, ln in enumerate(lines[:40]):  # a line at a time, with pauses
            p.stdin.write(ln)
            p.stdin.flush()
            if k % 10 == 9:
                wait_for(lambda k=k: _done(node, 2) == k + 1, 60, f"line {k + 1} at the node",
                         node)
        p.stdin.write(bad + b"\n   \n")  # (a blank line is no event, as in a file)
        p.stdin.flush()
        wait_for(lambda: _done(node, 2) == 41, 60, "the unparsable line at the node", node)
        p.stdin.write(b"".join(lines[40:-1]) + lines[-1].rstrip(b"\n"))  # (no last newline)
        p.stdin.close()
        res = _result(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    n = len(lines) + 1
    assert res["sent"] == res["acknowledged"] == n and res["resent_skipped"] == 0
    assert res["rejects"].get("bad_field", 0) >= 1
    _assert_replay(node, b"".join(lines[:40]) + bad + b"".join(lines[40:]))


def _append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


def _offset_after(data: bytes, k: int) -> int:
    """The byte offset after the first ``k`` lines of ``data``."""
    off = 0
    for _ in range(k):
        off = data.index(b"\n", off) + 1
    return off


def test_follow_survives_growth_rotation_and_truncation_and_goes_on_from_its_position(
        node, tmp_path):
    f = tmp_path / "events.jsonl"
    pos = tmp_path / "events.pos"
    lines = _lines(1000, seed=7)
    sent: list[bytes] = []

    def add(path, chunk: list[bytes]) -> None:
        _append(path, b"".join(chunk))
        sent.extend(chunk)

    add(f, lines[:100])  # already there when the follower starts: sent too
    p = _send(node, "--follow", str(f), "--position", str(pos), "--session", "3")
    try:
        wait_for(lambda: _done(node, 3) == 100, 60, "the file's first lines", node)
        _append(f, lines[100][:20])  # half a line waits for its newline
        add(f, [lines[100][20:]] + lines[101:200])
        sent[-100] = lines[100]
        wait_for(lambda: _done(node, 3) == 200, 60, "the grown file", node)
        os.rename(f, tmp_path / "events.jsonl.1")  # rotation: renamed away...
        add(tmp_path / "events.jsonl.1", lines[200:220])  # (written on after the rename)
        add(f, lines[220:400])  # ...and a new file at the path
        wait_for(lambda: _done(node, 3) == 400, 60, "the rotated and the new file", node)
        f.write_bytes(b"")  # truncation (a copytruncate rotation)
        add(f, lines[400:450])  # (shorter than what was read: seen as truncated)
        wait_for(lambda: _done(node, 3) == 450, 60, "the truncated file", node)
        _append(f, lines[450][:10])  # an unterminated line at the stop: left for later
        p.send_signal(signal.SIGINT)
        res = _result(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert res["sent"] == res["acknowledged"] == 450, res
    assert res["rotations"] == 1 and res["truncations"] == 1, res
    saved = orjson.loads(pos.read_bytes())
    assert saved["seq"] == 450 and saved["offset"] == len(b"".join(lines[400:450]))

    # Without its position, a follower of a session that holds events refuses to guess.
    q = _send(node, "--follow", str(f), "--session", "3")
    _, err = q.communicate(timeout=120)
    assert q.returncode == 2 and b"--position" in err, err

    # A follower killed before its position caught up (here: a position 30 lines behind)
    # goes on from there, skipping what the node holds: nothing lost, nothing twice.
    data = f.read_bytes()
    pos.write_bytes(orjson.dumps({**saved, "seq": 420, "offset": _offset_after(data, 20)}))
    _append(f, lines[450][10:])
    sent.append(lines[450])
    add(f, lines[451:500])
    p = _send(node, "--follow", str(f), "--position", str(pos), "--session", "3")
    try:
        wait_for(lambda: _done(node, 3) == 500, 60, "the restarted follower", node)
        p.send_signal(signal.SIGTERM)
        res = _result(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert res["resent_skipped"] == 30 and res["sent"] == 50, res
    assert res["acknowledged"] == 500
    _assert_replay(node, b"".join(sent))


def test_send_started_together_with_its_node_waits_for_it(tmp_path):
    node = LocalNode(tmp_path, start=False)
    try:
        node.launch()
        p = _send(node, str(DATA / "basic.jsonl"), "--timeout", "120")
        res = _result(p)
        assert res["acknowledged"] == res["sent"] == 23
    finally:
        node.stop()
    assert node.segments() == []


def test_a_send_where_nothing_listens_fails_after_its_timeout_naming_the_address(tmp_path):
    port = free_port()
    cfg = tmp_path / "n.toml"
    cfg.write_text(f'[node]\nname = "nobody{os.getpid()}"\n[ingest]\nport = {port}\n')
    for args in ([str(DATA / "basic.jsonl")], ["-"]):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "exposure", "send", *args, "--config",
                            str(cfg), "--timeout", "2"], capture_output=True, timeout=120,
                           stdin=subprocess.DEVNULL)
        took = time.monotonic() - t0
        assert p.returncode == 2, p.stderr
        assert f"127.0.0.1:{port}".encode() in p.stderr and b"cannot reach" in p.stderr
        assert 2 <= took < 60, took
