"""The feed end to end: a subscriber (exposure.feed) of a real node ends equal to `exposure
dump` of that node when it loses every 10th datagram while the stream flows, and `exposure
watch --json` joining after the stream has ended prints what `exposure dump` prints.
(Late join and a restart of the node with three subscribers: tests/test_feed.py; a pair's
failover: tests/test_pair.py.)"""

import json
import subprocess
import sys
import time

import orjson
import pytest
from nodes import LiveNode

from exposure.document import compare_documents
from exposure.feed import Subscriber
from exposure.shm.control import CTL_EPOCH
from perf.flowgen import generate, to_jsonl

pytestmark = pytest.mark.timeout(400)

SECTIONS = ("accounts", "fund", "instruments", "sectors")


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = LiveNode(tmp_path_factory.mktemp("feed-live"))
    try:
        yield n
    finally:
        n.stop()
    assert n.segments() == [], "the node left shared memory behind"


def dump(node) -> dict:
    """The node's document (exposure dump), the sections the feed carries."""
    p = node.cli("dump", "--compact")
    assert p.returncode == 0, p.stderr.decode()
    doc = orjson.loads(p.stdout)
    return {k: doc[k] for k in SECTIONS}


def flow(tmp_path, n: int, seed: int, name: str):
    path = tmp_path / name
    path.write_bytes(to_jsonl(generate(n, accounts=100, instruments=1000, universe=40,
                                       live_target=5000, seed=seed)))
    return path


def send(node, events, rate: int = 0, session: int = 1) -> subprocess.Popen:
    args = [sys.executable, "-m", "exposure", "send", str(events), "--config",
            str(node.config), "--session", str(session)]
    if rate:
        args += ["--rate", str(rate)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(client, n: int) -> None:
    out, err = client.communicate(timeout=300)
    assert client.returncode == 0, err
    assert json.loads(out)["acknowledged"] == n


def converge(sub: Subscriber, node, timeout: float = 60) -> float:
    """Poll ``sub`` until its view equals the node's dump; returns the seconds it took."""
    t0 = time.monotonic()
    want = dump(node)
    while True:
        sub.poll(0.05)
        diffs = compare_documents(sub.document(), want)
        if not diffs:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the subscriber did not converge ({sub.describe()}): "
                                 f"{diffs[:5]}")
        want = dump(node)


def pump(sub: Subscriber, client) -> None:
    while client.poll() is None:
        sub.poll(0.02)


def test_a_subscriber_that_drops_every_10th_datagram_ends_equal_to_the_dump(node, tmp_path):
    events = flow(tmp_path, 20_000, 11, "a.jsonl")
    with Subscriber.from_config(node.config, drop_every=10) as sub:
        client = send(node, events, rate=20_000)
        pump(sub, client)
        finish(client, 20_000)
        took = converge(sub, node)
        c = sub.counters
        print(f"converged {took:.2f}s after the stream; {sub.describe()}")
        assert c["dropped"] >= c["datagrams"] // 10 > 0
        assert c["gaps"] > 0 and c["recoveries"] > 1  # losses seen and repaired
        assert sub.epoch == int(node.control()[CTL_EPOCH])


def test_exposure_watch_json_prints_what_exposure_dump_prints(node, tmp_path):
    events = flow(tmp_path, 5_000, 13, "c.jsonl")
    finish(send(node, events, session=3), 5_000)
    p = node.cli("watch", "--seconds", "3", "--drop-every", "10", "--json", timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    got = orjson.loads(p.stdout.splitlines()[-1])
    assert set(got) >= set(SECTIONS)
    assert compare_documents(got, dump(node)) == []
