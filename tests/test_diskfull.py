"""A full disk: the node stops acknowledging, says why, loses nothing, and goes on when
space returns."""

import json
import subprocess

import orjson
import pytest

from exposure.bench.flowgen import generate, to_jsonl
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import read_events
from exposure.engine.replay import replay_records
from exposure.harness.localnode import LocalNode
from exposure.store.journal import scan

pytestmark = [pytest.mark.timeout(300), pytest.mark.process]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs (needs root and mount; skipped, saying so, where it is not allowed)."""
    d = tmp_path / "data"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def test_a_full_disk_stops_acknowledgements_and_nothing_is_lost(tmp_path, tiny_fs):
    flow = tmp_path / "flow.jsonl"
    flow.write_bytes(to_jsonl(generate(20_000, accounts=50, instruments=500, universe=30,
                                       live_target=2000, seed=4)))
    node = LocalNode(tmp_path, data_dir=tiny_fs, extra="segment_mb = 1\n")
    try:
        p = node.cli("send", str(flow), "--timeout", "5")
        assert p.returncode != 0  # not everything can be acknowledged: the disk is full
        assert node.proc.poll() is None, "the node must keep running"
        assert "No space left on device" in node.log.read_text()
        durable = scan(tiny_fs).records
        assert 0 < durable < 20_000
        subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_fs)], check=True)
        p = node.cli("send", str(flow), "--retry", "60", "--timeout", "60")
        assert p.returncode == 0, p.stderr.decode()
        assert json.loads(p.stdout)["acknowledged"] == 20_000
        assert "writing again" in node.log.read_text()
        live = orjson.loads(node.cli("dump", "--compact").stdout)
    finally:
        node.stop()
    assert compare_documents(live, document(replay_records(read_events(flow)))) == []
    assert scan(tiny_fs).records == 20_000
