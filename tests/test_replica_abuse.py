"""The backup's replication port under abuse (issue 12), in-process over real sockets: a
ReplicaStage with real shared-memory rings, a fake primary that knows the secret, and peers
that do not. Only an authenticated primary may touch the link's state; everything else is
bounded (connections, handshake time, per-pass work, queued output) and counted."""

from __future__ import annotations

import errno
import os
import random
import resource
import select
import socket
import struct
import time
import uuid

import numpy as np
import pytest

from exposure.core.types import EVENT_SIZE, EVENT_WORDS, W_GSEQ, W_SESSION, W_SSEQ
from exposure.harness.localnode import free_port
from exposure.net import repl as R
from exposure.node.stages import replica as RP
from exposure.node.stages.replica import INCOMING, ReplicaStage
from exposure.node.stages.sequencer import Sequencer
from exposure.shm.control import (
    CONTROL_WORDS,
    CTL_HEARD_NS,
    CTL_IN_SYNC,
    CTL_LINK,
    CTL_PEER_EPOCH,
    CTL_PRIMARY_GSEQ,
    CTL_RELOAD,
)
from exposure.shm.ring import Ring
from exposure.shm.session_layout import SESSION_COLS

pytestmark = pytest.mark.process

SECRET = b"the-replication-secret-0123456789"
LINK_WORDS = (CTL_LINK, CTL_HEARD_NS, CTL_PEER_EPOCH, CTL_PRIMARY_GSEQ, CTL_IN_SYNC,
              CTL_RELOAD)


class Peer:
    """A client of the replication port (a non-blocking socket: sends wait up to 5 s for
    room, reads never wait). ``frames``: what the backup sent; ``closed``: it closed the
    connection."""

    def __init__(self, port: int, rcvbuf: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(5)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.reader = R.ReplReader()
        self.frames: list[tuple[int, object]] = []
        self.closed = False
        self.nonce = b""  # the backup's CHALLENGE
        self.mine = b""   # this peer's nonce in its AUTH

    def take(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # (a reset: the backup closed with bytes unread)
                data = b""
            if not data:
                self.closed = True
                return
            self.frames += self.reader.feed(data)

    def kinds(self) -> list[int]:
        self.take()
        return [k for k, _ in self.frames]

    def gone(self) -> bool:
        """The backup closed this connection."""
        self.take()
        return self.closed

    def send(self, data: bytes) -> None:
        view, end = memoryview(data), time.monotonic() + 5
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                assert time.monotonic() < end, "the backup does not take what is sent"
                select.select([], [self.sock], [], 0.01)

    def auth_frame(self, secret: bytes = SECRET, epoch: int = 1, tail: int = 0) -> bytes:
        self.mine = os.urandom(R.NONCE)
        return R.frame(R.K_AUTH, R.AUTH.pack(R.mac(secret, "primary", self.nonce), self.mine,
                                             epoch, tail))

    def close(self) -> None:
        self.sock.close()


class Harness:
    def __init__(self, st: ReplicaStage, out: Ring, tap, ctl: np.ndarray, port: int,
                 data_dir):
        self.st, self.out, self.tap, self.ctl, self.port = st, out, tap, ctl, port
        self.data_dir = data_dir
        self.peers: list[Peer] = []
        self.gseqs: list[int] = []   # what reached the compute ring, in order
        self.tapped = 0
        self.longest = 0.0           # the longest single poll() + after() pass, seconds
        self._buf = np.zeros((1024, EVENT_WORDS), np.uint64)

    def peer(self, rcvbuf: int = 0) -> Peer:
        p = Peer(self.port, rcvbuf)
        self.peers.append(p)
        return p

    def step(self, timeout: float = 0.001) -> None:
        t0 = time.perf_counter()
        self.st.poll(timeout)
        self.st.after()
        self.longest = max(self.longest, time.perf_counter() - t0 - timeout)
        n = self.out.pop(self._buf.view(np.uint8).view(_REC))
        self.gseqs += self._buf[:n, W_GSEQ].tolist()
        self.tapped += self.tap.pop(self._buf.view(np.uint8).view(_REC))

    def until(self, cond, seconds: float = 10.0, what: str = "the condition") -> None:
        end = time.monotonic() + seconds
        while not cond():
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {seconds} s waiting for {what}")
            self.step()

    def handshake(self, p: Peer, epoch: int = 1, tail: int = 0) -> None:
        self.until(lambda: R.K_CHALLENGE in p.kinds(), what="the CHALLENGE")
        p.nonce = p.frames[0][1]
        p.send(p.auth_frame(epoch=epoch, tail=tail))
        self.until(lambda: R.K_WELCOME in p.kinds() or p.closed, what="the WELCOME")
        (payload,) = [pl for k, pl in p.frames if k == R.K_WELCOME]
        proof = R.WELCOME.unpack(payload)[0]
        assert proof == R.mac(SECRET, "backup", p.mine)

    def primary(self, epoch: int = 1, tail: int = 0) -> Peer:
        p = self.peer()
        self.handshake(p, epoch, tail)
        assert self.st.link is not None and self.st.link.authed
        return p

    def link_state(self) -> tuple:
        return (self.st.link, self.st.seq.next_gseq, self.st.reloading,
                *(int(self.ctl[w]) for w in LINK_WORDS))

    def close(self) -> None:
        for p in self.peers:
            p.close()


_REC = np.dtype((np.void, EVENT_SIZE))


def records(first: int, n: int) -> bytes:
    w = np.zeros((n, EVENT_WORDS), np.uint64)
    w[:, W_GSEQ] = np.arange(first, first + n)
    w[:, W_SESSION] = 1
    w[:, W_SSEQ] = np.arange(first, first + n)
    return R.frame(R.K_RECORDS, w.tobytes())


def beat(ns: int, gseq: int = 0, epoch: int = 1) -> bytes:
    return R.frame(R.K_HEARTBEAT, R.BEAT.pack(gseq, epoch, ns))


@pytest.fixture
def rep(tmp_path):
    tag = f"exposure-test-replica-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    rings, st, h = [], None, None
    try:
        out = Ring.create(tag + "-c", 1024, EVENT_SIZE, consumers=2)  # compute, journal
        rings.append(out)
        tap = out.reader(1)  # the journal's end
        ctl = np.zeros(CONTROL_WORDS, np.uint64)
        sessions = np.zeros((5, SESSION_COLS), np.uint64)
        port = free_port()
        st = ReplicaStage(("127.0.0.1", port), SECRET, ctl, sessions, Sequencer(out, 1), None,
                          tmp_path, heartbeat_ms=50, failover_ms=10_000, ack_interval_us=0)
        h = Harness(st, out, tap, ctl, port, tmp_path)
        yield h
    finally:
        if h is not None:
            h.close()
        if st is not None:
            st.close()
        for r in rings:
            r.close()


def _refused(p: Peer, code: int) -> bool:
    """Only the CHALLENGE and a REFUSE of ``code`` came back (the REFUSE may be lost to a
    reset), and the backup closed the connection."""
    kinds = p.kinds()
    if not p.closed:
        return False
    assert kinds[0] == R.K_CHALLENGE and set(kinds[1:]) <= {R.K_REFUSE}, kinds
    assert len(kinds) <= 2, kinds
    for _, pl in p.frames[1:]:
        assert int.from_bytes(pl[:2], "little") == code
    return True


# ---------------------------------------------------------------------- tests
@pytest.mark.timeout(60)
def test_a_flood_past_the_cap_leaves_the_streaming_link_and_its_state_alone(rep):
    """A flood of connections (idle and garbage) while the primary streams: at most
    _MAX_LINKS are held, the oldest unauthenticated ones are evicted, every record arrives,
    and the link's words move only with what the primary itself does."""
    h = rep
    p = h.primary(epoch=3, tail=0)
    link = h.st.link
    rnd = random.Random(12)
    flood: list[Peer] = []
    sent = 0
    t_end = time.monotonic() + 1.0
    while time.monotonic() < t_end or sent < 3000:
        for _ in range(3):  # a few connects per pass: more than the cap every few passes
            f = h.peer()
            if rnd.random() < 0.3:
                f.send(os.urandom(rnd.randrange(1, 64)))
            flood.append(f)
        if sent < 3000:
            n = rnd.randrange(1, 40)
            p.send(records(sent + 1, n) + beat(time.monotonic_ns()))
            sent += n
        h.step(0)
        assert len(h.st.links) <= RP._MAX_LINKS
        assert h.st.link is link and int(h.ctl[CTL_LINK]) == 1
        assert int(h.ctl[CTL_PEER_EPOCH]) == 3 and int(h.ctl[CTL_PRIMARY_GSEQ]) == 0
        for f in [f for f in flood if f.gone()]:
            f.close()
            flood.remove(f)
            h.peers.remove(f)
    h.until(lambda: h.gseqs[-1:] == [sent] and h.tapped == sent, what="all records")
    assert h.gseqs == list(range(1, sent + 1))

    def acked():
        acks = [R.ACK.unpack(pl) for k, pl in p.frames if k == R.K_ACK]
        return p.kinds() and acks and acks[-1][0] == sent

    h.until(acked, what="the ACK of everything")
    c = h.st.counters
    assert c["evicted"] > 0 and c["accepted"] >= c["evicted"] + 1
    assert c["preauth_violations"] > 0 and c["auth_failures"] == 0
    assert h.st.link is link and not p.closed
    assert (h.st.reloading, int(h.ctl[CTL_RELOAD])) == (False, 0)
    assert h.longest < 1.0


@pytest.mark.timeout(60)
def test_unauthenticated_connects_do_not_move_the_links_timers(rep):
    """While the primary is silent, connects keep coming: the backup's HEARTBEATs still go
    out every heartbeat_ms (a CHALLENGE is not the link's send), and the time the primary
    was last heard stays what it was."""
    h = rep
    p = h.primary()
    h.until(lambda: R.K_ACK in p.kinds(), what="the first ACK")
    heard = int(h.ctl[CTL_HEARD_NS])
    before = len(p.kinds())
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:
        f = h.peer()
        h.until(lambda f=f: R.K_CHALLENGE in f.kinds(), what="a CHALLENGE")
        f.close()
        h.peers.remove(f)
    h.until(lambda: len(h.st.links) == 1, what="the flood's connections gone")
    beats = [k for k in p.kinds()[before:] if k == R.K_HEARTBEAT]
    assert len(beats) >= 4, beats  # heartbeat_ms = 50 over 0.6 s
    assert int(h.ctl[CTL_HEARD_NS]) == heard
    assert h.st.counters["accepted"] >= 10
    assert int(h.ctl[CTL_LINK]) == 1 and h.st.link is not None


@pytest.mark.timeout(60)
def test_a_primary_gone_silent_is_dropped_within_failover_ms_and_a_new_link_resumes(rep):
    """An authenticated primary that stops sending (hung, SIGSTOPped: its socket stays
    open): the link is closed once it has been silent for failover_ms (the liveness rule),
    not before; the primary's next connection resumes from what this node holds."""
    h = rep
    bound = 300_000_000
    h.st.failover_ns = bound
    p = h.primary()
    p.send(records(1, 10) + beat(time.monotonic_ns()))
    h.until(lambda: h.gseqs[-1:] == [10], what="the records")
    h.until(lambda: h.st.link is None, seconds=bound / 1e9 + 3, what="the silent link closed")
    silence = time.monotonic_ns() - int(h.ctl[CTL_HEARD_NS])
    assert bound < silence < bound + 1_000_000_000, silence
    assert int(h.ctl[CTL_LINK]) == 0
    h.until(p.gone, what="the silent primary's connection closed")
    q = h.primary()
    (welcome,) = [pl for k, pl in q.frames if k == R.K_WELCOME]
    assert R.WELCOME.unpack(welcome)[1] == 10  # what it holds: resume from gseq 11
    q.send(records(11, 5) + beat(time.monotonic_ns()))
    h.until(lambda: h.gseqs[-1:] == [15], what="the records after the reconnect")
    assert h.gseqs == list(range(1, 16)) and int(h.ctl[CTL_LINK]) == 1


@pytest.mark.timeout(60)
def test_at_the_cap_a_real_primary_still_gets_in(rep):
    """The cap is full of idle connections (and one authenticated link): a new primary
    evicts the oldest idle one, authenticates, and replaces the old link as today."""
    h = rep
    old = h.primary(epoch=1)
    idle = [h.peer() for _ in range(RP._MAX_LINKS - 1)]
    h.until(lambda: all(R.K_CHALLENGE in i.kinds() for i in idle), what="the CHALLENGEs")
    assert len(h.st.links) == RP._MAX_LINKS
    new = h.primary(epoch=2)
    assert h.st.counters["evicted"] == 1
    so = h.st.link.sock
    assert so.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert so.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == RP._KEEPIDLE_S
    assert so.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == RP._KEEPCNT
    h.until(idle[0].gone, what="the oldest idle one closed")
    assert not any(i.closed for i in idle[1:])
    h.until(old.gone, what="the old link closed")
    assert h.st.link is not None and h.st.link.addr == new.sock.getsockname()
    assert int(h.ctl[CTL_PEER_EPOCH]) == 2 and int(h.ctl[CTL_LINK]) == 1


@pytest.mark.timeout(60)
def test_peers_that_do_not_authenticate_in_time_are_closed(rep):
    """Silent peers, and one that sends half an AUTH, are closed after the handshake
    deadline, having been sent nothing but the CHALLENGE; the live link is untouched."""
    h = rep
    h.primary()
    state = h.link_state()
    silent = [h.peer() for _ in range(3)]
    half = h.peer()
    h.until(lambda: R.K_CHALLENGE in half.kinds(), what="the CHALLENGE")
    half.nonce = half.frames[0][1]
    half.send(half.auth_frame()[:40])
    t0 = time.monotonic()
    peers = [*silent, half]
    h.until(lambda: all(s.gone() for s in peers), 10, "the deadline")
    waited = time.monotonic() - t0
    assert RP._HANDSHAKE_NS / 1e9 - 0.3 <= waited < 6
    for s in peers:
        assert s.kinds() == [R.K_CHALLENGE]
    assert h.st.counters["handshake_timeouts"] == 4
    assert h.link_state() == state and len(h.st.links) == 1


@pytest.mark.timeout(60)
def test_anything_but_auth_before_authentication_closes_and_changes_nothing(rep):
    """Garbage, and every frame kind but AUTH (even records that would come next), are
    refused at their header: nothing reaches the rings, the link or the data directory."""
    h = rep
    p = h.primary(epoch=5, tail=0)
    p.send(records(1, 10))
    h.until(lambda: len(h.gseqs) == 10, what="the primary's records")
    state = h.link_state()
    w = np.zeros((4, EVENT_WORDS), np.uint64)
    w[:, W_GSEQ] = np.arange(11, 15)
    cases = [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        bytes(8),
        R.frame(R.K_RECORDS, w.tobytes()),                       # the next gseqs
        R.HEADER.pack(R.MAGIC, R.VERSION, R.K_RECORDS, R.MAX_RECORDS * EVENT_SIZE),
        R.HEADER.pack(R.MAGIC, R.VERSION, R.K_SNAP_DATA, R.SNAP_CHUNK) + bytes(1000),
        beat(time.monotonic_ns(), 99, 9),
        R.frame(R.K_ACK, R.ACK.pack(1, 1, 1)),
        R.frame(R.K_RESET, b"you diverged"),
        R.frame(R.K_SNAP_BEGIN, R.SNAP_BEGIN.pack(5, 100)),
        R.frame(R.K_SNAP_END),
        R.frame(R.K_REFUSE, b"\x01\x00go away"),
        R.frame(R.K_CHALLENGE, bytes(R.NONCE)),
        R.HEADER.pack(R.MAGIC, R.VERSION, R.K_AUTH, 10) + bytes(10),  # a short AUTH
        R.HEADER.pack(R.MAGIC, R.VERSION + 1, R.K_AUTH, R.AUTH.size) + bytes(R.AUTH.size),
        R.HEADER.pack(R.MAGIC, R.VERSION, 200, 4) + bytes(4),
    ]
    for lo in range(0, len(cases), 5):  # (in groups under the cap: none evicted)
        peers = []
        for data in cases[lo:lo + 5]:
            q = h.peer()
            q.send(data)
            peers.append(q)
        h.until(lambda peers=peers: all(_refused(q, R.E_PROTOCOL) for q in peers),
                what="the refusals")
    assert h.st.counters["preauth_violations"] == len(cases)
    assert h.st.counters["evicted"] == 0
    assert h.st.counters["handshake_timeouts"] == 0
    assert h.link_state() == state and len(h.st.links) == 1
    assert h.gseqs == list(range(1, 11)) and h.tapped == 10
    assert not (h.data_dir / INCOMING).exists()
    p.send(records(11, 5))  # the primary's link goes on
    h.until(lambda: len(h.gseqs) == 15, what="more records")


@pytest.mark.timeout(60)
def test_a_wrong_secret_or_a_replayed_auth_is_refused(rep):
    h = rep
    p = h.primary(epoch=2)
    state = h.link_state()
    wrong = h.peer()
    h.until(lambda: R.K_CHALLENGE in wrong.kinds(), what="the CHALLENGE")
    wrong.nonce = wrong.frames[0][1]
    wrong.send(wrong.auth_frame(secret=b"not-the-secret-at-all-0123456789", epoch=9)
               + records(1, 3))
    replay = h.peer()  # the real primary's AUTH of another connection (another nonce)
    replay.nonce = p.nonce
    replay.send(replay.auth_frame(epoch=9))
    h.until(lambda: _refused(wrong, R.E_AUTH) and _refused(replay, R.E_AUTH),
            what="the refusals")
    assert h.st.counters["auth_failures"] == 2
    assert h.link_state() == state and h.gseqs == []
    assert int(h.ctl[CTL_PEER_EPOCH]) == 2


@pytest.mark.timeout(60)
def test_a_primary_that_does_not_read_is_disconnected_without_blocking(rep):
    """Each new HEARTBEAT is echoed at once; a primary that never reads makes the answers
    pile up: past the queue's bound the link is closed, and no pass ever waited."""
    h = rep
    p = h.peer(rcvbuf=4096)
    h.handshake(p)
    n = 0
    end = time.monotonic() + 30
    while h.st.link is not None:
        assert time.monotonic() < end, "the link was never closed"
        n += 1
        p.send(beat(n))
        h.step(0)
    assert h.st.counters["slow_readers"] == 1
    assert int(h.ctl[CTL_LINK]) == 0 and not h.st.links and not h.st.backlog
    assert h.longest < 1.0  # (a blocking send would wait for ever: the peer never reads)
    print(f"closed after {n} unread ACKs; the longest pass {h.longest * 1e3:.2f} ms")
    q = h.primary()  # a new link is welcome
    assert int(h.ctl[CTL_LINK]) == 1 and not q.closed


@pytest.mark.timeout(60)
def test_a_pass_handles_a_bounded_number_of_frames_and_the_rest_later(rep):
    """Thousands of small frames in the socket at once: each pass handles at most
    _FRAMES_PER_PASS; what is left in the link's queue is handled by later passes although
    no further byte arrives (the socket is drained: epoll would not report it)."""
    h = rep
    p = h.primary()
    n = 1500
    p.send(b"".join(records(i, 1) + beat(i) for i in range(1, n + 1)))
    passes, queue_only = 0, 0
    while h.st.seq.next_gseq <= n or h.st.echo < n:
        before = h.st.seq.next_gseq + h.st.echo
        h.step(0)
        passes += 1
        handled = h.st.seq.next_gseq + h.st.echo - before  # (one record a frame; echo = i)
        assert handled <= RP._FRAMES_PER_PASS
        ln = h.st.link
        if ln is not None and ln.pending:
            try:
                ln.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                queue_only += 1  # nothing more to read: the queue alone is the work
        assert passes < 20_000
    assert passes >= 2 * n // RP._FRAMES_PER_PASS
    assert queue_only > 0
    assert h.gseqs == list(range(1, n + 1)) and not h.st.link.pending
    print(f"{2 * n} frames in {passes} passes ({queue_only} from the queue alone)")


@pytest.mark.timeout(60)
def test_out_of_descriptors_new_connections_are_accepted_and_closed(rep):
    """At EMFILE the pending connections are taken with the spare descriptor and closed
    (counted; the loop does not spin on a readable listening socket); the live link is
    untouched, and once descriptors are free again a connection is served."""
    h = rep
    p = h.primary()
    state = h.link_state()
    waiting = [h.peer() for _ in range(4)]  # in the listen queue, not accepted yet
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = os.dup(0)
    os.close(low)  # the lowest free descriptor: with the limit there, none is free
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
        with pytest.raises(OSError) as e:
            os.dup(0)
        assert e.value.errno == errno.EMFILE
        end = time.monotonic() + 10
        while h.st.counters["emfile"] < len(waiting):
            assert time.monotonic() < end, h.st.counters
            h.step(0.001)
        for _ in range(20):
            h.step(0)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert h.st.counters["emfile"] == len(waiting)
    for w in waiting:
        h.until(w.gone, what="a closed connection")
        assert w.frames == []  # not even a CHALLENGE
    assert h.st.listener._spare >= 0  # (the spare descriptor, reopened)
    assert h.link_state() == state
    q = h.peer()
    h.until(lambda: R.K_CHALLENGE in q.kinds(), what="a CHALLENGE after EMFILE")
    p.send(records(1, 2))
    h.until(lambda: len(h.gseqs) == 2, what="the link's records")


@pytest.mark.timeout(90)
def test_random_abuse_never_raises_and_never_touches_the_link(rep):
    """Random bytes, truncated and corrupted frames, resets and half-closes, many at a
    time: the stage never raises, never holds more than the cap, and the link streams on."""
    h = rep
    p = h.primary(epoch=4)
    rnd = random.Random(2026)
    sent = 0
    valid_auth = None
    open_: list[Peer] = []
    for i in range(400):
        q = h.peer()
        open_.append(q)
        kind = rnd.randrange(8)
        if kind == 0:
            q.send(os.urandom(rnd.randrange(1, 2000)))
        elif kind == 1:  # a header of each kind with a random length, some payload
            q.send(R.HEADER.pack(R.MAGIC, R.VERSION, rnd.randrange(0, 256),
                                 rnd.randrange(0, 1 << 32)) + os.urandom(rnd.randrange(50)))
        elif kind == 2:  # a reset right away
            q.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            q.close()
        elif kind == 3:
            q.sock.shutdown(socket.SHUT_WR)
        elif kind == 4:  # an AUTH frame with a random proof, then records
            q.send(R.frame(R.K_AUTH, os.urandom(R.AUTH.size)) + records(sent + 1, 3))
        elif kind == 5:  # a proof for another nonce (recorded), one byte at a time
            valid_auth = valid_auth or p.auth_frame(epoch=4)
            for b in valid_auth[:rnd.randrange(1, len(valid_auth))]:
                q.send(bytes([b]))
        # 6, 7: idle
        if i % 3 == 0:
            p.send(records(sent + 1, 5) + beat(time.monotonic_ns(), epoch=4))
            sent += 5
        h.step(0)
        assert len(h.st.links) <= RP._MAX_LINKS
        assert int(h.ctl[CTL_LINK]) == 1 and int(h.ctl[CTL_PEER_EPOCH]) == 4
        for q in [q for q in open_ if q.gone()]:
            q.close()
            open_.remove(q)
            h.peers.remove(q)
    h.until(lambda: h.gseqs[-1:] == [sent], what="all records")
    assert h.gseqs == list(range(1, sent + 1))
    assert not p.closed and h.st.link is not None and h.st.link.authed
    c = h.st.counters
    assert c["preauth_violations"] > 0 and c["auth_failures"] > 0 and c["evicted"] > 0
    print(c)


@pytest.mark.timeout(30)
def test_events_are_logged_at_most_once_per_interval(rep, caplog):
    h = rep
    peers = []
    for _ in range(5):
        q = h.peer()
        q.send(bytes(16))
        peers.append(q)
    h.until(lambda: all(_refused(q, R.E_PROTOCOL) for q in peers), what="the refusals")
    err = caplog.text  # (the stage's logger: exposure.core.log's RateLog)
    assert err.count("before AUTH") == 1, err
    assert h.st.counters["preauth_violations"] == 5
