"""The streaming producer (exposure.client.Producer) at full size through each fault: 200,000
events at 20,000 events/s (a generated flow) while a standalone node is killed with -9 and
restarted, a pair's primary is killed with -9, a pair's primary is stopped (SIGSTOP: a hung
machine), the producer itself is killed with -9 and restarted from its spool, the window
fills, and a producer with a wrong secret tries the same session. Each run ends equal to
replay of what was sent, with every (session, seq) once in the journal. Seeded: each test
prints its seed."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from nodes import etcd_or_skip

from exposure.bench.flowgen import generate
from exposure.client import AuthError, Producer
from exposure.config import load_config
from exposure.engine.document import compare_documents, document
from exposure.engine.replay import replay_records
from exposure.harness.localnode import LocalNode, LocalPair
from exposure.harness.wait import wait_for
from exposure.shm import session_layout as SL
from exposure.shm.control import (
    CTL_EPOCH,
    CTL_IN_SYNC,
    CTL_PEER_EPOCH,
    CTL_ROLE,
    ROLE_BACKUP,
    ROLE_PRIMARY,
)
from exposure.store.journal import read_blocks, scan

pytestmark = [pytest.mark.process, pytest.mark.timeout(420)]

N = 200_000
RATE = 20_000
SECRET = "faults-secret-0123456789abcdef"


def seeded() -> random.Random:
    seed = random.SystemRandom().randrange(1 << 30)
    print(f"seed {seed}")
    return random.Random(seed)


def flow(rnd: random.Random, n: int = N) -> np.ndarray:
    return generate(n, accounts=100, instruments=1000, universe=40, live_target=5000,
                    seed=rnd.randrange(1 << 30))


class Stream:
    """A thread that sends ``recs[start:]`` through ``p`` at ``rate`` events/s (chunks of
    ``chunk``, each at its scheduled time: open loop, so a stall is caught up at once),
    recording errors and the longest single send."""

    def __init__(self, p, recs: np.ndarray, rate: float = RATE, chunk: int = 20,
                 start: int = 0):
        self.p, self.recs, self.rate, self.chunk, self.start = p, recs, rate, chunk, start
        self.errors: list[BaseException] = []
        self.longest = 0.0
        self.in_send = 0.0  # when the send under way began (0: none is)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            t0 = time.monotonic()
            for lo in range(self.start, len(self.recs), self.chunk):
                due = t0 + (lo - self.start) / self.rate
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                t = self.in_send = time.monotonic()
                self.p.send(self.recs[lo:lo + self.chunk])
                self.in_send = 0.0
                self.longest = max(self.longest, time.monotonic() - t)
        except BaseException as e:  # (the test's assertion says what)
            self.errors.append(e)
        finally:
            self.done.set()

    def join(self, timeout: float = 120) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the stream did not finish"
        assert not self.errors, self.errors


def finish(p, stream: Stream, n: int = N) -> None:
    stream.join()
    p.flush(120)
    assert p.acked == p.sent == n


def assert_equal_to_replay(node, recs: np.ndarray, session: int,
                           process: bool = True) -> None:
    """The node's document equals replay of ``recs`` and its journal holds each seq of
    ``session`` 1..len(recs) exactly once (and nothing else twice)."""
    recs = recs.copy()
    recs["gseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)  # one stream, as the node
    want = document(replay_records(recs))
    assert compare_documents(node.dump(process=process), want) == [], node.name
    wait_for(lambda: scan(node.data_dir).last == node.last_gseq(), 60, "the journal", node)
    got = np.concatenate([b.records for b in read_blocks(node.data_dir)])
    keys = (got["session"].astype(np.uint64) << np.uint64(40)) | got["sseq"]
    assert len(keys) == len(np.unique(keys)), "a (session, seq) twice in the journal"
    seqs = np.sort(got["sseq"][got["session"] == session])
    assert np.array_equal(seqs, np.arange(1, len(recs) + 1, dtype=seqs.dtype)), node.name


# ---------------------------------------------------------------------------- standalone
def test_kill_9_of_a_standalone_node_mid_stream_then_its_restart(node):
    rnd = seeded()
    recs = flow(rnd)
    with Producer(node.config, session=21) as p:
        s = Stream(p, recs)
        at = rnd.randrange(20_000, 120_000)
        wait_for(lambda: p.acked >= at or s.done.is_set(), 60, f"{at:,} acknowledged", node)
        node.kill9()
        node.start()
        finish(p, s)
        assert p.stats["reconnects"] >= 1
    assert_equal_to_replay(node, recs, 21)


def test_a_full_window_stalls_sending_which_resumes_losing_nothing(node):
    """A window of 512 events (25 ms at 20,000/s) with block=True; the node stops for a
    second (SIGSTOP, within liveness): send waits for room, then the stream catches up."""
    rnd = seeded()
    recs = flow(rnd)
    with Producer(node.config, session=22, window=512, block=True, send_timeout=60,
                  liveness_s=10) as p:
        s = Stream(p, recs)
        at = rnd.randrange(20_000, 120_000)
        wait_for(lambda: p.acked >= at, 60, f"{at:,} acknowledged", node)
        node.signal_all(signal.SIGSTOP)
        try:
            wait_for(lambda: s.in_send and time.monotonic() - s.in_send >= 1.0, 10,
                     "a send waiting a second for room", node)
            assert p.sent - p.acked == 512, "sending went on past a full window"
        finally:
            node.signal_all(signal.SIGCONT)
        finish(p, s)
        assert s.longest >= 0.9, f"the longest send waited only {s.longest:.3f} s"
        assert p.stats["reconnects"] == 0
    assert_equal_to_replay(node, recs, 22)


def test_a_producer_killed_with_its_spool_is_restarted_and_resends_what_the_node_lacks(
        node, tmp_path):
    """The producer runs in a child process with a spool. Mid-stream its node stops
    (SIGSTOP) for long enough that the child gives up the link and spools ahead of what the
    node holds; then the child is killed with -9 (its window in memory lost) and the node
    continued. A new producer on the same spool numbers from the spool, resends what the
    node lacks and streams the rest."""
    rnd = seeded()
    recs = flow(rnd)
    np.save(tmp_path / "recs.npy", recs)
    spool = tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", f"""
import threading, time
import numpy as np
from exposure.client import Producer
recs = np.load({str(tmp_path / "recs.npy")!r})
p = Producer({str(node.config)!r}, session=23, spool={str(spool)!r}, liveness_s=1)
def report():
    while True:
        print(p.stats["spooled"], p.stats["dead_links"], flush=True)
        time.sleep(0.02)
threading.Thread(target=report, daemon=True).start()
t0 = time.monotonic()
for lo in range(0, len(recs), 20):
    wait = t0 + lo / {RATE} - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    p.send(recs[lo:lo + 20])
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    spooled, dead = [0], [0]

    def read() -> None:
        for line in child.stdout:
            spooled[0], dead[0] = map(int, line.split())

    threading.Thread(target=read, daemon=True).start()
    stopped = False
    try:
        at = rnd.randrange(20_000, 120_000)
        wait_for(lambda: (node.session_row(23) or [0] * SL.SESSION_COLS)[SL.S_HELD] >= at,
                 120, f"{at:,} of the child's events at the node", node)
        node.signal_all(signal.SIGSTOP)
        stopped = True
        # Once the child has given the link up, nothing it spools reaches the node.
        wait_for(lambda: dead[0] >= 1, 30, "the child giving the link up", node)
        ahead = spooled[0] + rnd.randrange(2_000, 30_000)
        wait_for(lambda: spooled[0] >= ahead, 30, "the child spooling ahead", node,
                 show=lambda: spooled[0])
    finally:
        child.kill()  # kill -9 of the producer
        child.wait()
        if stopped:
            node.signal_all(signal.SIGCONT)
    # (the node reads what its dead connection still held, then closes it)
    wait_for(lambda: node.session_counters(23)["connected"] == 0, 30, "the link closed",
             node)
    held = node.session_row(23)[SL.S_HELD]
    with Producer(node.config, session=23, spool=spool) as p:
        k = p.sent  # what the spool holds: numbered from there
        print(f"killed with {held:,} held by the node, {k:,} spooled")
        assert held < k < N, (held, k)
        s = Stream(p, recs, start=k)
        finish(p, s)
    assert_equal_to_replay(node, recs, 23)


def test_a_wrong_secret_is_refused_clearly_without_a_retry_storm_or_harm_to_the_session(
        tmp_path):
    """While the session streams with its secret, a producer with a wrong one is refused
    at once with AuthError, tries once (the node's auth-failure counter stays at 1) and
    does not disturb the stream."""
    rnd = seeded()
    (tmp_path / "sessions.toml").write_text(
        f'[[session]]\nid = 24\nsecret = "{SECRET}"\nsources = "all"\n'
        f'accounts = "all"\ninstrument = true\nmark = true\nlimit = true\n')
    n = LocalNode(tmp_path, ingest=f'sessions = "{tmp_path / "sessions.toml"}"')
    try:
        recs = flow(rnd)
        with Producer(n.config, session=24) as p:  # the secret from the sessions file
            s = Stream(p, recs)
            at = rnd.randrange(20_000, 150_000)
            wait_for(lambda: p.acked >= at, 60, f"{at:,} acknowledged", n)
            t0 = time.monotonic()
            with pytest.raises(AuthError, match="refused session 24"):
                Producer(n.config, session=24, secret=b"not-the-secret-0123456789",
                         connect_timeout=60)
            assert time.monotonic() - t0 < 5
            finish(p, s)  # 5+ s later: time enough for a storm to show
            assert n.session_row(24)[SL.S_AUTH_FAILS] == 1
            assert p.stats["reconnects"] == 0
        assert_equal_to_replay(n, recs, 24)
    finally:
        n.stop()
    assert n.segments() == []


# ---------------------------------------------------------------------------------- pair
@pytest.fixture
def pair(tmp_path):
    etcd = etcd_or_skip(tmp_path)
    p = None
    try:
        p = LocalPair(tmp_path, etcd)
        wait_for(lambda: in_sync(p.b) and p.record().sync == p.b.name, 60,
                 "the backup in sync and recorded as synchronous", p.b)
        yield p
    finally:
        if p is not None:
            p.stop()
        etcd.stop()
    assert p.a.segments() == [] and p.b.segments() == []


def role(node) -> int:
    c = node.control()
    return 0 if c is None else int(c[CTL_ROLE])


def in_sync(node, primary=None) -> bool:
    c = node.control()
    if c is None or c[CTL_ROLE] != ROLE_BACKUP or not c[CTL_IN_SYNC]:
        return False
    if primary is None:
        return True
    cp = primary.control()
    return cp is not None and cp[CTL_EPOCH] == c[CTL_PEER_EPOCH]


def test_kill_9_of_a_pairs_primary_the_producer_fails_over_to_the_promoted_backup(pair):
    rnd = seeded()
    recs = flow(rnd)
    with Producer(pair.a.config, session=25) as p:  # endpoints: a, then its peer b
        assert p.stats["endpoint"] == f"127.0.0.1:{pair.a.port}"
        s = Stream(p, recs)
        at = rnd.randrange(20_000, 120_000)
        wait_for(lambda: p.acked >= at, 60, f"{at:,} acknowledged", pair.a)
        pair.a.kill9()
        wait_for(lambda: role(pair.b) == ROLE_PRIMARY, 10, "the promotion", pair.b)
        finish(p, s)
        assert p.stats["endpoint"] == f"127.0.0.1:{pair.b.port}"
        assert p.stats["reconnects"] >= 1
    assert_equal_to_replay(pair.b, recs, 25, process=False)


def test_sigstop_of_a_pairs_primary_the_producer_detects_the_silence_and_fails_over(pair):
    """Every process of the primary stopped: the backup promotes after failover_ms, the
    producer hears nothing for liveness_s (failover_ms x 2, at least 0.5 s) and fails over;
    the old primary, continued, follows the new one as its backup; both end equal."""
    rnd = seeded()
    recs = flow(rnd)
    with Producer(pair.a.config, session=26) as p:
        failover_ms = load_config(pair.a.config).failover_ms
        assert p.liveness_s == max(0.5, failover_ms * 2 / 1000)
        s = Stream(p, recs)
        at = rnd.randrange(20_000, 120_000)
        wait_for(lambda: p.acked >= at, 60, f"{at:,} acknowledged", pair.a)
        pair.a.signal_all(signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(lambda: role(pair.b) == ROLE_PRIMARY, 10, "the promotion", pair.b)
            wait_for(lambda: p.stats["endpoint"] == f"127.0.0.1:{pair.b.port}"
                     and p.acked > at, 30, "the producer acknowledged by the new primary",
                     pair.b, show=lambda: p.stats)
            print(f"failed over in {time.monotonic() - t0:.2f} s")
            assert p.stats["dead_links"] >= 1
        finally:
            pair.a.signal_all(signal.SIGCONT)
        wait_for(lambda: in_sync(pair.a, pair.b), 120, "the old primary following", pair.a)
        finish(p, s)
    wait_for(lambda: pair.a.last_gseq() == pair.b.last_gseq(), 120, "both at one gseq")
    for n in (pair.b, pair.a):
        assert_equal_to_replay(n, recs, 26, process=False)
