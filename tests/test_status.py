"""The operator's tools against a live node: `exposure send` issued before the node is
ready waits and succeeds; `exposure status`, `exposure metrics` (scraped over HTTP) and
`exposure top` (driven in a real terminal through tmux) show what was sent (events,
sessions, seqs); no node is a clear line and exit status 2."""

import os
import time

import orjson
import pytest
from support import DATA

from exposure.engine.parse import read_events
from exposure.harness.localnode import LocalNode

pytestmark = pytest.mark.timeout(300)


N = len(read_events(DATA / "clean-5000.jsonl"))


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node that was sent clean-5000.jsonl as session 7 by an `exposure send` issued
    while it was still starting (its segments exist, its session port does not listen
    yet): the send waits for it and succeeds."""
    import subprocess
    import sys

    n = LocalNode(tmp_path_factory.mktemp("status"), start=False)
    try:
        n.launch()
        deadline = time.monotonic() + 120
        while not n.segments():
            assert n.proc.poll() is None and time.monotonic() < deadline, n.log.read_text()
            time.sleep(0.01)
        early = subprocess.run(
            [sys.executable, "-m", "exposure", "send", str(DATA / "clean-5000.jsonl"),
             "--session", "7", "--config", str(n.config), "--timeout", "120"],
            capture_output=True, timeout=240)
        assert early.returncode == 0, early.stderr.decode()
        assert orjson.loads(early.stdout)["acknowledged"] == N
        n.wait_ready()
        yield n
    finally:
        n.stop()
    assert n.segments() == [], "the node left shared memory behind"


def status(node) -> dict:
    p = node.cli("status", "--json")
    assert p.returncode == 0, p.stderr.decode()
    return orjson.loads(p.stdout)


@pytest.mark.process
def test_status_reports_what_was_sent(node):
    n = N
    deadline = time.monotonic() + 30
    while (st := status(node))["gseq"]["durable"] < n:  # the journal's fsync interval
        assert time.monotonic() < deadline, st["gseq"]
    assert st["role"] == "primary" and st["epoch"] >= 1
    assert st["gseq"] == {"received": n, "computed": n, "durable": n}
    assert st["lag"]["journal_events"] == 0
    assert st["rings"]["compute"]["capacity"] > 0 and st["rings"]["fanout"]["fill"] >= 0
    assert st["rings"]["compute>journal"] == {"fill": 0,  # the journal has read it all
                                              "capacity": st["rings"]["compute"]["capacity"]}
    assert {"id": 7, "held": n} == {k: v for k, v in next(
        s for s in st["sessions"] if s["id"] == 7).items() if k in ("id", "held")}
    c = st["counters"]
    assert c["ingest_events_total"] == c["compute_events_total"] == n
    assert c["journal_records_total"] == n and c["journal_durable_gseq"] == n
    assert c["compute_batches_total"] >= 1 and c["fanout_datagrams_total"] >= 1
    assert c["fanout_dropped_total"] == 0 and c["restarts_total"] == 0
    names = {p["name"]: p for p in st["processes"]}
    assert {"supervisor", "hot", "durable"} <= set(names)
    assert all(p["pid"] > 0 and p["cpu"] >= 0 for p in names.values())
    assert names["hot"]["wait"] == "spin"
    text = node.cli("status").stdout.decode()
    assert f"node {node.name}: primary" in text and f"computed {n:,}" in text


def test_lags_are_events_and_microseconds_of_receive_time_behind_compute():
    from exposure.ops.status import lags

    c = {"compute_recv_ns": 5_000_000, "journal_durable_recv_ns": 3_500_000,
         "mirror_replicated_recv_ns": 1_000_000}
    assert lags(c, 900, 700, None) == {"journal_events": 200, "journal_us": 1500.0}
    assert lags(c, 900, 900, 400) == {"journal_events": 0, "journal_us": 0.0,
                                      "replication_events": 500, "replication_us": 4000.0}
    # nothing durable yet (no receive time) and a mark ahead of compute read as no lag
    c["journal_durable_recv_ns"] = 0
    assert lags(c, 900, 0, 901)["journal_us"] == 0.0
    assert lags(c, 900, 0, 901)["replication_events"] == 0


@pytest.mark.process
def test_status_of_no_node_is_one_clear_line_and_status_2(tmp_path):
    cfg = tmp_path / "none.toml"
    cfg.write_text('[node]\nname = "nobody-here"\n')
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "exposure", "status", "--config", str(cfg)],
                       capture_output=True, timeout=60)
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "no node 'nobody-here' is running" in err


def _scrape(url: str) -> dict[str, float]:
    import urllib.request

    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@pytest.mark.process
def test_metrics_are_scraped_over_http_and_match_what_was_sent(node):
    import subprocess
    import sys

    from exposure.harness.localnode import free_port

    n = N
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exposure", "metrics", "--config",
                             str(node.config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"serving metrics" in proc.stdout.readline()
        deadline = time.monotonic() + 30
        while True:
            m = _scrape(f"http://127.0.0.1:{port}/metrics")
            if m.get(f'exposure_gseq{{node="{node.name}",stage="durable"}}') == n:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.1)
        lab = f'node="{node.name}"'
        assert m[f"exposure_up{{{lab}}}"] == 1
        assert m[f"exposure_events_total{{{lab}}}"] == n
        assert m[f"exposure_ingest_events_total{{{lab}}}"] == n
        assert m[f"exposure_journal_records_total{{{lab}}}"] == n
        assert m[f'exposure_session_held{{{lab},session="7"}}'] == n
        assert m[f'exposure_gseq{{{lab},stage="computed"}}'] == n
        assert m[f"exposure_role{{{lab}}}"] == 1
        assert m[f"exposure_journal_lag_events{{{lab}}}"] == 0
        assert m[f"exposure_journal_lag_seconds{{{lab}}}"] == 0
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.process
def test_promtool_accepts_the_metrics_of_a_live_node(node):
    """Prometheus's own linter (`promtool check metrics`, Debian's prometheus package:
    tools/install-prometheus) passes `exposure metrics`'s output of a live node: base units,
    `_timestamp_seconds` for points in time, `_total` on counters only."""
    import shutil
    import subprocess
    import sys
    import urllib.request

    from exposure.harness.localnode import free_port

    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (tools/install-prometheus: Debian's "
                    "prometheus package)")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "exposure", "metrics", "--config",
                             str(node.config), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert b"serving metrics" in proc.stdout.readline()
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    finally:
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    check = subprocess.run(["promtool", "check", "metrics"], input=text,
                           capture_output=True, timeout=60)
    assert check.returncode == 0, (check.stdout + check.stderr).decode()
    m = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            m[name] = float(value)
    lab = f'node="{node.name}"'
    now = time.time()
    assert now - 600 < m[f"exposure_started_timestamp_seconds{{{lab}}}"] <= now
    assert now - 600 < m[f"exposure_compute_recv_timestamp_seconds{{{lab}}}"] <= now
    assert m[f"exposure_journal_durable_recv_timestamp_seconds{{{lab}}}"] == \
        m[f"exposure_compute_recv_timestamp_seconds{{{lab}}}"]  # everything is durable
    fsyncs = m[f"exposure_journal_fsyncs_total{{{lab}}}"]
    spent = m[f"exposure_journal_fsync_seconds_total{{{lab}}}"]
    longest = m[f"exposure_journal_fsync_seconds_max{{{lab}}}"]
    assert fsyncs > 0 and 0 < longest <= spent < fsyncs * 10


@pytest.mark.process
def test_top_runs_in_a_real_terminal_driven_through_tmux(node):
    import os
    import shutil
    import subprocess
    import sys
    import uuid

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    n = N
    name = f"exposure-top-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cmd = f"{sys.executable} -m exposure top --config {node.config} --seconds 120 --rows 5"

    def pane() -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", name],
                              capture_output=True, timeout=10).stdout.decode()

    subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "150", "-y", "70", cmd],
                   check=True, timeout=10, env={**os.environ, "TERM": "xterm-256color"})
    try:
        deadline = time.monotonic() + 90
        while True:
            out = pane()
            if f"gseq {n:,}" in out and "accounts by gross" in out and "sectors" in out:
                break
            assert time.monotonic() < deadline, out
            time.sleep(0.2)
        assert f"node {node.name}" in out and "primary" in out and "events/s" in out
        assert "fund" in out and "instruments by crossing" in out
        assert "wire to wire p50" in out
        subprocess.run(["tmux", "send-keys", "-t", name, "C-c"], timeout=10)
        deadline = time.monotonic() + 20
        while subprocess.run(["tmux", "has-session", "-t", name],
                             capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "top did not exit on Ctrl-C"
            time.sleep(0.1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)



@pytest.mark.process
def test_demo_starts_a_node_streams_a_flow_shows_it_and_cleans_up(tmp_path):
    """`exposure demo` (here on a config of its own, so it runs beside other tests): a
    node that becomes ready, a generated flow at --rate, the dashboard showing the events
    arriving, and nothing left behind once it ends."""
    import re
    import subprocess
    import sys

    n = LocalNode(tmp_path, start=False)  # only its config: the demo starts the node
    p = subprocess.run([sys.executable, "-m", "exposure", "demo", "--rate", "2000",
                        "--seconds", "3", "--config", str(n.config)],
                       capture_output=True, timeout=240,
                       env={**os.environ, "TMPDIR": str(tmp_path)})  # its data dir here
    out = p.stdout.decode()
    assert p.returncode == 0, (out[-3000:], p.stderr.decode()[-3000:])
    assert "exposure demo: streaming 6,000 generated events at 2,000/s" in out
    seen = [int(g.replace(",", "")) for g in re.findall(r"gseq ([\d,]+)", out)]
    assert seen and seen[-1] > 0, out[-3000:]  # the dashboard saw the flow arrive
    assert "fund" in out and "accounts" in out
    assert n.segments() == [], "the demo left shared memory behind"
    assert not list(tmp_path.glob("exposure-demo-*")), "the demo left its data behind"
