"""The streaming producer (exposure.client.Producer) against a real node: events one by one
and in arrays, flush, results, a full window, close, a wrong secret, a node killed with -9
mid-stream; each run ends equal to replay with every (session, seq) once in the journal."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from exposure.bench.flowgen import generate
from exposure.client import Ack, AuthError, Producer, WindowFull
from exposure.core.types import T_CANCEL
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import record_objects
from exposure.engine.replay import replay_records
from exposure.harness.localnode import LocalNode, free_port
from exposure.harness.wait import wait_for
from exposure.shm import session_layout as SL
from exposure.store.journal import read_blocks, scan

pytestmark = pytest.mark.timeout(300)

SECRET = b"producer-secret-0123456789"


def _events(n: int, seed: int = 1) -> np.ndarray:
    return generate(n, accounts=40, instruments=300, universe=30, live_target=400, seed=seed)


def _assert_replay_and_journal(node, recs: np.ndarray, session: int) -> None:
    """The node's document equals replay of ``recs``, and its journal holds each seq of
    ``session`` 1..len(recs) exactly once."""
    want = document(replay_records(recs))
    assert compare_documents(node.dump(), want) == []
    wait_for(lambda: scan(node.data_dir).last == node.last_gseq(), 60, "the journal", node)
    blocks = [b.records for b in read_blocks(node.data_dir)]
    got = np.concatenate(blocks) if blocks else np.zeros(0)
    seqs = np.sort(got["sseq"][got["session"] == session])
    assert seqs.tolist() == list(range(1, len(recs) + 1))


@pytest.mark.process
def test_events_one_by_one_in_arrays_and_as_dicts_stream_and_equal_replay(node):
    recs = _events(6000)
    acks: list[Ack] = []
    with Producer(node.config, session=3, on_result=acks.append, frame=256) as p:
        assert p.sent == p.acked == 0
        for r in recs[:1000]:  # one record at a time
            p.send(r)
        same = recs[1000:2000].astype(np.dtype(recs.dtype.descr))  # equal, not the same
        assert same.dtype is not recs.dtype and same.dtype == recs.dtype
        for r in same:
            p.send(r)
        other = np.zeros(2, [("type", "u1"), ("qty", "<i8")])
        for bad in (other, other[0]):  # refused, and nothing was numbered for it
            with pytest.raises(ValueError, match="expected EVENT_DTYPE"):
                p.send(bad)
        assert p.sent == 2000
        for obj in record_objects(recs[2000:2300]):  # SPEC event dicts
            p.send(obj)
        lo = 2300
        for size in (1, 7, 100, 1000, 2592):  # arrays
            assert p.send(recs[lo:lo + size]) == lo + size
            lo += size
        assert lo == len(recs) == p.sent
        p.flush(timeout=60)
        assert p.acked == p.sent == len(recs)
        got = list(p.results(timeout=0))
        assert got and got[-1].upto == len(recs)
        assert [a.upto for a in got] == sorted(a.upto for a in got)
        assert p.stats["endpoint"] == f"127.0.0.1:{node.port}"
        assert p.stats["reconnects"] == 0
    assert acks == got
    _assert_replay_and_journal(node, recs, 3)


@pytest.mark.process
def test_the_asyncio_producer_streams_waits_off_the_loop_and_equals_replay(node):
    """AsyncProducer: sends that fit the window are made on the loop, one that waits for
    room waits in a worker thread (the loop keeps ticking), acknowledgements come back as
    an async iterator, and the run equals replay."""
    import asyncio

    from exposure.client import AsyncProducer

    recs = _events(3000, seed=4)

    async def main() -> tuple[list[int], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        async with await AsyncProducer.open(node.config, session=4, window=64,
                                            frame=16) as p:
            for r in recs[:1000]:
                await p.send(r)  # the 64-event window fills: these wait off the loop
            await p.send(recs[1000:2000])  # an array larger than the window
            for obj in record_objects(recs[2000:]):
                await p.send(obj)
            await p.flush(timeout=60)
            assert p.acked == p.sent == len(recs)
            got = [a.upto async for a in p.results(timeout=0.2)]
        assert p.closed
        t.cancel()
        return got, ticks

    got, ticks = asyncio.run(main())
    assert got and got[-1] == len(recs) and got == sorted(got)
    assert ticks > 5  # the loop was never held for the whole run
    _assert_replay_and_journal(node, recs, 4)


@pytest.mark.process
def test_rejects_come_back_with_their_reasons(node):
    recs = _events(50)
    bad = np.zeros(1, recs.dtype)  # a cancel of an order nobody placed
    bad["type"] = T_CANCEL
    bad["source"], bad["order_id"] = 1, 10**12
    with Producer(node.config, session=4) as p:
        p.send(recs)
        p.flush(30)
        seq = p.send(bad[0])
        p.flush(30)
        acks = list(p.results(timeout=0))
    assert acks[-1] == Ack(seq, ((seq, "unknown_order"),))
    assert p.stats["rejects"] == {"unknown_order": 1}


@pytest.mark.process
def test_a_reject_among_many_is_named_with_its_seq_where_the_node_lists_rejects(node):
    recs = _events(3000, seed=2)
    bad = np.zeros(1, recs.dtype)
    bad["type"], bad["source"], bad["order_id"] = T_CANCEL, 1, 10**12
    with Producer(node.config, session=8) as p:
        p.send(np.concatenate([recs[:1500], bad, recs[1500:]]))
        p.flush(30)
        rejected = [r for a in p.results(timeout=0) for r in a.rejected]
    assert rejected == [(1501, "unknown_order")]  # the node lists it: the exact seq


@pytest.mark.process
def test_a_full_window_raises_without_blocking_and_waits_with_it(node):
    recs = _events(200)
    with Producer(node.config, session=5, window=64, block=False, liveness_s=60) as p:
        node.signal_all(signal.SIGSTOP)  # nothing is acknowledged while it is stopped
        try:
            p.send(recs[:64])
            with pytest.raises(WindowFull):
                p.send(recs[64])
            with pytest.raises(WindowFull):
                p.send(recs[64:70])
            assert p.sent == 64
        finally:
            node.signal_all(signal.SIGCONT)
        p.flush(60)
        p.send(recs[64:128])
    with Producer(node.config, session=5, window=64, send_timeout=0.3, liveness_s=60) as p:
        assert p.sent == 128  # numbered after what the node holds
        node.signal_all(signal.SIGSTOP)
        try:
            p.send(recs[128:192])
            t0 = time.monotonic()
            with pytest.raises(WindowFull, match="stayed full"):
                p.send(recs[192])
            assert time.monotonic() - t0 >= 0.25
            p.send_timeout = 60
            threading.Timer(0.5, node.signal_all, (signal.SIGCONT,)).start()
            t0 = time.monotonic()
            p.send(recs[192:])  # waits for room, then proceeds once acks arrive
            assert time.monotonic() - t0 >= 0.3
        finally:
            node.signal_all(signal.SIGCONT)
    _assert_replay_and_journal(node, recs, 5)


@pytest.mark.process
def test_a_linger_batches_events_sent_one_by_one_into_fewer_frames(node):
    # Over TCP (a linger is TCP's: an IPC link's sends write their frames themselves),
    # paced one by one, each event would find the I/O thread asleep and go alone; with a
    # linger of 20 ms the I/O thread waits for more after each batch (a sleep of 0.2-2 ms
    # between sends still puts ten or more in a frame).
    recs = _events(300, seed=4)
    with pytest.raises(ValueError, match="linger_us"):
        Producer(node.config, session=8, linger_us=-1)
    with Producer(node.config, session=7, linger_us=20_000, ipc=False) as p:
        assert p.stats["transport"] == "tcp"
        for r in recs:
            p.send(r)
            time.sleep(0.0002)
        p.flush(timeout=60)
        assert p.acked == len(recs)
        assert p.stats["frames_sent"] <= len(recs) // 3, p.stats
    _assert_replay_and_journal(node, recs, 7)


@pytest.mark.process
def test_close_flushes_everything_sent(node):
    recs = _events(3000)
    p = Producer(node.config, session=6)
    for lo in range(0, len(recs), 10):
        p.send(recs[lo:lo + 10])
    p.close()
    assert p.acked == p.sent == len(recs)
    p.close()  # idempotent
    with pytest.raises(Exception, match="closed"):
        p.send(recs[0])
    _assert_replay_and_journal(node, recs, 6)


@pytest.mark.process
def test_a_wrong_secret_is_refused_at_once_and_never_retried(tmp_path):
    (tmp_path / "sessions.toml").write_text(
        f'[[session]]\nid = 1\nsecret = "{SECRET.decode()}"\nsources = "all"\n'
        f'accounts = "all"\ninstrument = true\nmark = true\nlimit = true\n')
    n = LocalNode(tmp_path, ingest=f'sessions = "{tmp_path / "sessions.toml"}"')
    try:
        t0 = time.monotonic()
        with pytest.raises(AuthError, match="refused session 1"):
            Producer(n.config, session=1, secret=b"not-the-secret-0123456789",
                     connect_timeout=60)
        assert time.monotonic() - t0 < 5
        assert n.session_row(1)[SL.S_AUTH_FAILS] == 1  # one try, no storm
        recs = _events(500)
        with Producer(n.config, session=1) as p:  # the secret from the sessions file
            p.send(recs)
        assert p.acked == len(recs)
        assert n.session_row(1)[SL.S_AUTH_FAILS] == 1
    finally:
        n.stop()
    assert n.segments() == []


@pytest.mark.process
def test_nothing_listening_fails_after_the_connect_timeout_naming_the_address():
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(Exception, match=f"127.0.0.1:{port}"):
        Producer(endpoints=[("127.0.0.1", port)], connect_timeout=1.0)
    assert time.monotonic() - t0 < 10


@pytest.mark.process
@pytest.mark.parametrize("ipc", [True, False], ids=["ipc", "tcp"])
def test_a_node_killed_mid_stream_and_restarted_ends_equal_to_replay(node, ipc):
    # (ipc: the node's shared-memory ring, as a producer on its host has by default; tcp:
    # as one on another host)
    recs = _events(40_000, seed=7)
    seed = 7
    print("seed", seed)
    with Producer(node.config, session=9, window=8192, ipc=ipc) as p:
        assert p.stats["transport"] == ("ipc" if ipc else "tcp")
        done = threading.Event()
        errors: list[BaseException] = []

        def stream() -> None:
            try:
                for lo in range(0, len(recs), 20):  # about 20,000 events/s
                    p.send(recs[lo:lo + 20])
                    time.sleep(0.001)
            except BaseException as e:  # (the test's assertion says what)
                errors.append(e)
            finally:
                done.set()

        t = threading.Thread(target=stream)
        t.start()
        wait_for(lambda: p.acked >= 5000, 60, "5,000 events acknowledged", node)
        node.kill9()
        node.start()
        t.join(120)
        assert not errors, errors
        p.flush(120)
        assert p.acked == p.sent == len(recs)
        assert p.stats["reconnects"] >= 1
    _assert_replay_and_journal(node, recs, 9)


@pytest.mark.process
def test_a_producer_killed_with_a_spool_resends_on_restart_what_the_node_lacks(node,
                                                                               tmp_path):
    recs = _events(6000, seed=3)
    np.save(tmp_path / "recs.npy", recs)
    spool = tmp_path / "spool"
    child = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
import numpy as np
from exposure.client import Producer
recs = np.load({str(tmp_path / "recs.npy")!r})
p = Producer({str(node.config)!r}, session=12, spool={str(spool)!r}, liveness_s=1)
p.send(recs[:2000])
p.flush(60)
print("flushed", flush=True)
sys.stdin.readline()  # the node is gone now
for lo in range(2000, len(recs), 50):
    p.send(recs[lo:lo + 50])
while p.stats["spooled"] < len(recs):
    time.sleep(0.01)
print("spooled", flush=True)
time.sleep(600)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("flushed")
        node.kill9()  # the child goes on accepting and spooling while the node is away
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().startswith("spooled")
    finally:
        child.kill()  # kill -9 of the producer, its window in memory lost
        child.wait()
    node.start()
    assert node.session_row(12)[SL.S_HELD] == 2000
    with Producer(node.config, session=12, spool=spool) as p:
        assert p.sent == len(recs)  # numbered from the spool
        p.flush(60)
        assert p.acked == len(recs)
    _assert_replay_and_journal(node, recs, 12)


@pytest.mark.process
def test_a_linger_returns_the_node_s_answer_also_beyond_select_s_descriptor_limit():
    """Producer._linger: select (microsecond timeouts) below fd 1024, a sleep and an epoll
    look above it; either way an answer waiting on the socket is returned, and nothing
    when there is none."""
    import resource
    import select
    import socket

    a, b = socket.socketpair()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = None
    try:
        if hard == resource.RLIM_INFINITY or hard > 1100:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
            high = os.dup2(a.fileno(), 1090)
        for fd in [a.fileno()] + ([high] if high is not None else []):
            ep = select.epoll()
            try:
                ep.register(fd, select.EPOLLIN)
                assert Producer._linger(ep, fd, 0.0002) == []
                b.send(b"x")
                got = Producer._linger(ep, fd, 0.0002)
                assert [f for f, ev in got if ev & select.EPOLLIN] == [fd]
                assert a.recv(8) == b"x"
            finally:
                ep.close()
    finally:
        if high is not None:
            os.close(high)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        a.close()
        b.close()
    assert high is not None or hard <= 1100  # (the high path ran wherever the limit allows)


def test_rejects_without_their_seqs_are_never_guessed():
    from exposure.net.ack_rejects import from_counts as f

    z = [0] * 16
    assert f(5, 9, z, z) == ()
    one = list(z)
    one[5] = 1  # unknown_order
    assert f(5, 5, z, one) == ((5, "unknown_order"),)
    assert f(5, 9, z, one) == ((0, "unknown_order"),)
    all5 = list(z)
    all5[5], all5[1] = 3, 2
    assert f(5, 9, z, all5) == tuple((s, "unknown") for s in range(5, 10))
    assert f(5, 9, one, z) == ((0, "unknown"),)  # counters went back: a restarted node


@pytest.mark.process
@pytest.mark.parametrize("ipc", [True, False], ids=["ipc", "tcp"])
def test_a_silent_node_is_given_up_after_liveness_and_the_stream_resumes(node, ipc):
    recs = _events(4000, seed=5)
    with Producer(node.config, session=13, liveness_s=1.0, ipc=ipc) as p:
        p.send(recs[:1000])
        p.flush(30)
        node.signal_all(signal.SIGSTOP)  # a hung machine: the connection stays open
        try:
            p.send(recs[1000:2000])
            wait_for(lambda: p.stats["dead_links"] >= 1, 10, "the link given up", node)
        finally:
            node.signal_all(signal.SIGCONT)
        p.send(recs[2000:])
        p.flush(60)
        assert p.acked == len(recs) and p.stats["reconnects"] >= 1
    _assert_replay_and_journal(node, recs, 13)


def test_listed_rejects_are_exact_and_the_counts_fill_only_what_the_lists_miss():
    from exposure.net.ack_rejects import RejectBook

    b = RejectBook()
    z = [0] * 16
    two = list(z)
    two[5] = 2  # two unknown_order in all
    b.listed, b.lo, b.hi = {7: 5, 12: 5}, 0, 20
    assert b.resolve(1, 20, z, two) == ((7, "unknown_order"), (12, "unknown_order"))
    assert b.listed == {}
    b.listed, b.lo, b.hi = {12: 5}, 10, 20  # seqs 1..10 not covered by any list
    assert b.resolve(1, 20, z, two) == ((12, "unknown_order"), (0, "unknown_order"))
    b.listed, b.lo, b.hi = {12: 5}, 10, 20
    assert b.resolve(1, 20, None, two) == ((12, "unknown_order"), (0, "unknown"))
    b.new_connection()  # no list covers anything yet: the counters alone
    assert b.resolve(21, 22, z, two) == ((21, "unknown_order"), (22, "unknown_order"))
