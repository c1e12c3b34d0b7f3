"""IPC sessions: a producer on the node's host logs in on a Unix socket and sends its frames
through a shared-memory ring (exposure.shm.ipc_layout). The same stream ends equal to replay
as over TCP; a client that scribbles on its ring, lies about its tail or tries to shrink the
ring under the node gets a REJECT and harms nothing; a node whose ingest sleeps is woken by
the doorbell; ``[ingest] ipc = false`` keeps every client on TCP."""

import os
import socket
import struct
import time

import numpy as np
import pytest

from exposure.bench.flowgen import generate
from exposure.client import Producer
from exposure.engine.document import compare_documents, document
from exposure.engine.replay import replay_records
from exposure.harness.localnode import LocalNode, process_map
from exposure.harness.wait import wait_for
from exposure.net import wire as W
from exposure.shm import session_layout as SL
from exposure.shm.ipc_layout import (
    DATA,
    MIN_CAPACITY,
    W_HEAD,
    W_TAIL,
    IpcError,
    IpcRing,
    ipc_name,
)
from exposure.store.journal import read_blocks, scan

pytestmark = pytest.mark.timeout(300)


def _events(n: int, seed: int = 1) -> np.ndarray:
    return generate(n, accounts=40, instruments=300, universe=30, live_target=400, seed=seed)


def _assert_replay_and_journal(node, recs: np.ndarray, session: int) -> None:
    assert compare_documents(node.dump(), document(replay_records(recs))) == []
    wait_for(lambda: scan(node.data_dir).last == node.last_gseq(), 60, "the journal", node)
    got = np.concatenate([b.records for b in read_blocks(node.data_dir)])
    seqs = np.sort(got["sseq"][got["session"] == session])
    assert seqs.tolist() == list(range(1, len(recs) + 1))


def _send_all(node, session: int, recs: np.ndarray, transport: str) -> None:
    """One producer sends ``recs`` as one array over ``transport`` (what it chose itself),
    then the node equals replay."""
    with Producer(node.config, session=session) as p:
        assert p.stats["transport"] == transport
        p.send(recs)
        p.flush(timeout=60)
    _assert_replay_and_journal(node, recs, session)


class RawIpc:
    """A hand-driven IPC client: login on the Unix socket, then the ring, byte by byte."""

    def __init__(self, node, session: int):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(ipc_name("127.0.0.1", node.port))
        self.reader = W.FrameReader()
        (kind, nonce), = self._frames()
        assert kind == W.K_CHALLENGE
        self.sock.sendall(W.encode_login(session, bytes(32)))
        data, fds, _, _ = socket.recv_fds(self.sock, 4096, 2)
        assert len(fds) == 1, "the LOGIN_OK carries the ring's descriptor"
        self.fd = os.dup(fds[0])  # (kept: the tests try to resize it)
        self.ring = IpcRing.from_fd(fds[0])
        (kind, payload), = self.reader.feed(data)
        assert kind == W.K_LOGIN_OK
        self.held = struct.unpack("<Q", payload)[0]
        self.tail = 0

    def _frames(self):
        while True:
            got = self.reader.feed(self.sock.recv(4096))
            if got:
                return got

    def put(self, data: bytes) -> None:
        self.tail = self.ring.put(self.tail, (data,))

    def answers(self, timeout: float = 10) -> list:
        """Frames from the node until it closes the socket (or ``timeout``)."""
        out, end = [], time.monotonic() + timeout
        self.sock.settimeout(0.2)
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            if not data:
                break
            out += self.reader.feed(data)
        return out

    def close(self) -> None:
        self.sock.close()
        os.close(self.fd)
        self.ring.close()


def test_a_ring_is_sealed_against_resizing_and_a_foreign_descriptor_is_refused():
    ring = IpcRing.create(MIN_CAPACITY)
    try:
        for size in (0, DATA, DATA + 2 * MIN_CAPACITY):
            with pytest.raises(PermissionError):
                os.ftruncate(ring.fd, size)
        fd = os.dup(ring.fd)
        mapped = IpcRing.from_fd(fd)
        assert mapped.capacity == MIN_CAPACITY
        mapped.put(0, (b"x" * 8,))
        buf = memoryview(bytearray(64))
        assert ring.take(0, buf, 0, 64) == 8 and bytes(buf[:8]) == b"x" * 8
        assert ring.words[W_HEAD] == 8
        mapped.words[W_TAIL] = 8 + MIN_CAPACITY + 1  # more than the ring holds
        assert ring.take(8, buf, 0, 64) == -1
        mapped.words[W_TAIL] = 7  # behind what the node took
        assert ring.take(8, buf, 0, 64) == -1
        mapped.close()
    finally:
        ring.close()
    other = os.memfd_create("not-a-ring")
    os.ftruncate(other, DATA + MIN_CAPACITY)
    with pytest.raises(IpcError, match="not an exposure IPC ring"):
        IpcRing.from_fd(other)
    with pytest.raises(IpcError, match="power of two"):
        IpcRing.create(MIN_CAPACITY + 8)


@pytest.mark.process
@pytest.mark.parametrize("how", ["one by one", "arrays", "dicts"])
def test_a_producer_on_the_node_s_host_streams_through_its_ring_equal_to_replay(node, how):
    recs = _events(20_000, seed=7)
    with Producer(node.config, session=5, window=4096) as p:
        assert p.stats["transport"] == "ipc"
        if how == "one by one":
            for r in recs:
                p.send(r)
        elif how == "arrays":
            for lo in range(0, len(recs), 700):  # (frames wrap around the ring's end)
                p.send(recs[lo:lo + 700])
        else:
            from exposure.engine.parse import record_objects
            for obj in record_objects(recs):
                p.send(obj)
        p.flush(timeout=60)
        assert p.acked == len(recs) and p.stats["reconnects"] == 0, p.stats["last_error"]
        assert p.stats["events_sent"] == len(recs), p.stats
    assert node.session_counters(5)["protocol_errors"] == 0
    _assert_replay_and_journal(node, recs, 5)


@pytest.mark.process
def test_scribbles_and_a_lying_tail_are_rejected_and_harm_no_other_session(node):
    recs = _events(3000, seed=8)
    with Producer(node.config, session=9) as good:
        good.send(recs[:1000])
        # garbage in the ring: a malformed frame, REJECTed
        a = RawIpc(node, 11)
        a.put(b"\xff" * 64)
        kinds = [k for k, _ in a.answers()]
        assert W.K_REJECT in kinds
        # can the ring be shrunk under the node? no: sealed
        with pytest.raises(PermissionError):
            os.ftruncate(a.fd, 0)
        a.close()
        # a tail beyond what the ring can hold
        b = RawIpc(node, 12)
        b.ring.words[W_TAIL] = 1 << 62
        rej = [W.decode_reject(p) for k, p in b.answers() if k == W.K_REJECT]
        assert rej and rej[0][0] == W.E_PROTOCOL and "tail" in rej[0][2]
        b.close()
        # frames on the socket after login are doorbells: dropped, not applied
        c = RawIpc(node, 13)
        c.sock.sendall(W.encode_events(recs[:1]))
        c.put(W.encode_heartbeat())
        time.sleep(0.3)
        assert node.session_row(13)[SL.S_HELD] == 0
        c.close()
        good.send(recs[1000:])
        good.flush(timeout=60)
    wait_for(lambda: node.session_counters(11)["connected"] == 0, 10, "closed", node)
    assert node.session_counters(11)["protocol_errors"] == 1
    assert node.session_counters(12)["protocol_errors"] == 1
    _assert_replay_and_journal(node, recs, 9)


@pytest.mark.process
def test_what_a_client_wrote_before_it_went_away_is_taken(node):
    recs = _events(500, seed=9)
    c = RawIpc(node, 14)
    recs = recs.copy()
    recs["sseq"] = np.arange(1, len(recs) + 1)
    c.put(W.encode_events(recs))
    c.close()  # the socket's end right after the ring's tail: the ring is read first
    wait_for(lambda: node.session_row(14)[SL.S_HELD] == len(recs), 10, "taken", node)
    _assert_replay_and_journal(node, recs, 14)


@pytest.mark.process
def test_a_sleeping_ingest_is_woken_by_the_doorbell(tmp_path):
    # The hot process blocks in its selector when idle (wait = "block"): the client rings
    # the doorbell, and each event is acknowledged without waiting for anything else.
    node = LocalNode(tmp_path, extra=process_map(hot_wait="block"))
    try:
        recs = _events(400, seed=10)
        with Producer(node.config, session=6) as p:
            assert p.stats["transport"] == "ipc"
            for r in recs:
                p.send(r)
                time.sleep(0.001)
            p.flush(timeout=60)
            assert p.acked == len(recs)
        _assert_replay_and_journal(node, recs, 6)
    finally:
        node.stop()


@pytest.mark.process
def test_ipc_off_keeps_every_client_on_tcp(tmp_path):
    node = LocalNode(tmp_path, ingest="ipc = false")
    try:
        with pytest.raises(OSError):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(ipc_name("127.0.0.1", node.port))
            finally:
                s.close()
        _send_all(node, 2, _events(300, seed=11), "tcp")
    finally:
        node.stop()


@pytest.mark.process
def test_a_flood_of_ipc_connections_is_bounded_and_a_session_still_logs_in(tmp_path):
    """More connections to the IPC socket than [ingest] max_connections, none logging in:
    the oldest make room (as on TCP), no ring is made for any of them, and a producer
    still logs in and streams."""
    node = LocalNode(tmp_path, ingest="max_connections = 8")
    socks = []
    try:
        for _ in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(ipc_name("127.0.0.1", node.port))
            socks.append(s)
        wait_for(lambda: node.port_counters().get("accepted", 0) >= 40, 20,
                 "the flood accepted", node)
        assert node.port_counters()["evicted_before_login"] >= 32
        _send_all(node, 3, _events(500, seed=12), "ipc")
        assert node.port_counters()["ipc_logins"] == 1  # (no ring for the flood)
    finally:
        for s in socks:
            s.close()
        node.stop()
