"""A network partition between two hosts: each node of the pair in its own network
namespace (tests/netns.py), etcd in the root namespace reachable from both, the client in
the root namespace too. The primary is cut off from everything: at no moment do two
nodes acknowledge; the backup takes over, the client fails over to it; after healing the
old primary rejoins as a backup and the tallies are exact."""

import time

import pytest
from netns import two_hosts_or_skip
from test_pair import (
    acting,
    assert_equal_to_replay,
    finish,
    flow,
    in_sync,
    role,
    seeded,
    send,
    streaming,
    synchronous,
)

from exposure.harness.localnode import LocalEtcd, LocalPair
from exposure.harness.wait import wait_for
from exposure.shm.control import ROLE_BACKUP, ROLE_PRIMARY

pytestmark = pytest.mark.process


@pytest.fixture
def hosts():
    th = two_hosts_or_skip()
    yield th
    th.close()


# Nodes that others can reach authenticate their sessions (issue 12): the same sessions
# file on both hosts; `exposure send --config` takes session 1's secret from it.
SESSIONS = """[[session]]
id = 1
secret = "partition-test-secret-0123456789"
sources = "all"
accounts = "all"
instrument = true
mark = true
limit = true
"""


def place(p: LocalPair, th) -> None:
    """Put a on host a and b on host b: every address in the configs becomes the host's
    own (the multicast stays on each host's loopback), with a sessions file."""
    sessions = p.a.config.parent / "sessions.toml"
    sessions.write_text(SESSIONS)
    for node, host, other, other_host in ((p.a, th.a, p.b, th.b), (p.b, th.b, p.a, th.a)):
        text = node.config.read_text()
        text = text.replace(f"[ingest]\nport = {node.port}\n",
                            f'[ingest]\nhost = "{host.addr}"\nport = {node.port}\n'
                            f'sessions = "{sessions}"\n')
        text = text.replace(f'listen = "127.0.0.1:{node.repl_port}"',
                            f'listen = "{host.addr}:{node.repl_port}"')
        text = text.replace(f'peer = "127.0.0.1:{other.repl_port}"',
                            f'peer = "{other_host.addr}:{other.repl_port}"')
        text = text.replace(f'peer_ingest = "127.0.0.1:{other.port}"',
                            f'peer_ingest = "{other_host.addr}:{other.port}"')
        node.config.write_text(text)
        node.wrap = host.cmd([])


@pytest.mark.timeout(400)
def test_a_primary_cut_off_from_its_backup_and_etcd_never_acts_beside_the_new_primary(
        tmp_path, hosts):
    rnd = seeded()
    etcd = LocalEtcd(tmp_path, host=hosts.gw)
    p = LocalPair(tmp_path, etcd, start=False)
    try:
        place(p, hosts)
        p.a.launch()
        wait_for(lambda: (r := p.record()) is not None and r.primary == p.a.name, 120,
                 "a recorded primary", p.a)
        p.b.launch()
        wait_for(lambda: in_sync(p.b, p.a) and synchronous(p, p.b), 120,
                 "b in sync and synchronous", p.b)
        n = 60_000
        events = flow(tmp_path, n, rnd.randrange(1 << 30))
        client = send(p.a, events, rate=10_000, timeout=4)
        with streaming(client):
            time.sleep(rnd.uniform(1.0, 2.0))
            hosts.cut(hosts.a)
            t0 = time.time()
            promoted = None
            while time.time() - t0 < 3.0:  # ten times failover_ms
                both = acting(p.a) and acting(p.b)
                assert not both, "two nodes acknowledge at once"
                if promoted is None and role(p.b) == ROLE_PRIMARY:
                    promoted = time.time() - t0
                time.sleep(0.002)
            assert promoted is not None, p.b.log.read_text()[-3000:]
            print(f"b promoted {promoted * 1000:.0f} ms after the cut")
            assert not acting(p.a)  # fenced: no echo, and it could not record "alone"
            assert "fenced" in p.a.log.read_text()
            hosts.heal(hosts.a)
            t0 = time.time()
            while role(p.a) != ROLE_BACKUP:
                assert not (acting(p.a) and acting(p.b))
                assert time.time() - t0 < 30, p.a.log.read_text()[-3000:]
                time.sleep(0.002)
            wait_for(lambda: in_sync(p.a, p.b), 120, "a following b", p.a)
            finish(client, n)
        assert_equal_to_replay(p, events)
    finally:
        p.stop()
        etcd.stop()
    assert p.a.segments() == [] and p.b.segments() == []
