"""The session port under abuse (issue 12), end to end: a real node (`exposure run`) with a
sessions file and small port limits, attacked over real sockets while well-behaved
sessions keep sending. Whatever the attack, a session that logged in keeps being served
(its events acknowledged and in `exposure dump`), a new well-behaved login gets in, every
resource stays bounded, the node's counters say what happened, and no process restarts.

The attackers are :class:`exposure.harness.attack.Attack` (non-blocking sockets on one selector,
in a thread) and plain sockets; nothing here asserts a duration except that a deadline is
not enforced early. Two tests reproduce bugs found here, since fixed (a flood of refused
logins locked new connections out; a paced `exposure send` was closed as idle). The tests
share one node (`[ingest]` limits below) and run one after another; each waits until no
connection of the one before is open, and compares counters before and after.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time

import numpy as np
import orjson
import pytest
from support import DATA

from exposure.engine.parse import read_events
from exposure.harness.attack import Attack
from exposure.harness.localnode import LocalNode
from exposure.net import wire as W

pytestmark = pytest.mark.process

CAP = 40            # [ingest] max_connections
LOGIN_MS = 500      # login_timeout_ms
IDLE_MS = 6000      # idle_timeout_ms: above exposure.net.client.HEARTBEAT_S (5 s), so that a
                    # waiting `exposure send` is kept alive by its heartbeats
OUTPUT_KB = 16      # max_output_kb
N_SESSIONS = 160    # ids in the sessions file

EVENTS = read_events(DATA / "clean-5000.jsonl")


def secret(sid: int) -> bytes:
    return f"abuse-test-secret-of-session-{sid:04d}".encode()


def until(cond, seconds: float, what: str, tick=None, step: float = 0.002) -> None:
    """Wait for ``cond()``, calling ``tick()`` meanwhile (heartbeats, pumping)."""
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"no {what} within {seconds} s")
        if tick is not None:
            tick()
        time.sleep(step)


class Client:
    """One connection to the session port: sends block (with a timeout), reads never do.
    ``frames``: what the node sent; ``closed``: the node closed it (EOF or reset)."""

    def __init__(self, port: int, rcvbuf: int = 0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.t0 = time.monotonic()
        self.reader = W.FrameReader()
        self.frames: list[tuple[int, object]] = []
        self.closed = False
        self.closed_at = 0.0

    def take(self, wait: float = 0.0) -> None:
        """Read what has arrived (waiting up to ``wait`` s for something). (A socket with
        a timeout polls before each recv, MSG_DONTWAIT or not: hence the select.)"""
        while not self.closed:
            if not select.select([self.sock], [], [], wait)[0]:
                return
            wait = 0.0
            try:
                data = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # reset: the node closed with bytes of ours unread
                data = b""
            if not data:
                self.closed, self.closed_at = True, time.monotonic()
                return
            self.frames += self.reader.feed(data)

    def kinds(self) -> list[int]:
        self.take()
        return [k for k, _ in self.frames]

    def rejects(self) -> list[tuple[int, int, str]]:
        self.take()
        return [W.decode_reject(p) for k, p in self.frames if k == W.K_REJECT]

    def gone(self) -> bool:
        self.take()
        return self.closed

    def unread(self) -> int:
        """Bytes the node sent that this client has not read (FIONREAD)."""
        return struct.unpack("i", fcntl.ioctl(self.sock, termios.FIONREAD, b"\0" * 4))[0]

    def close(self) -> None:
        self.sock.close()


class Session(Client):
    """A well-behaved session: answers the CHALLENGE with its secret's proof, numbers its
    events after what the node holds, reads every answer, and sends a HEARTBEAT when it
    has sent nothing for a second (:meth:`keepalive`, called while it waits)."""

    def __init__(self, port: int, sid: int, key: bytes | None = None, rcvbuf: int = 0):
        super().__init__(port, rcvbuf)
        self.sid = sid
        self.key = key if key is not None else secret(sid)
        self.held = -1
        self.next = 0          # the next session seq to send
        self.sent = 0          # events sent on this connection
        self.last_tx = time.monotonic()

    def nonce(self, seconds: float = 10) -> bytes:
        until(lambda: self.kinds() or self.closed, seconds, "CHALLENGE")
        kind, payload = self.frames[0]
        assert kind == W.K_CHALLENGE, f"no CHALLENGE but {self.rejects() or kind}"
        return payload

    def login(self, seconds: float = 10) -> int:
        """Log in; the seq the node holds. AssertionError if refused or closed."""
        self.send(W.encode_login(self.sid, W.login_mac(self.key, self.sid,
                                                       self.nonce(seconds))))
        until(lambda: W.K_LOGIN_OK in self.kinds() or self.rejects() or self.closed,
              seconds, f"answer to the login of session {self.sid}")
        assert W.K_LOGIN_OK in self.kinds(), \
            f"login of session {self.sid} refused: {self.rejects()}, closed {self.closed}"
        payload = next(p for k, p in self.frames if k == W.K_LOGIN_OK)
        self.held = struct.unpack("<Q", payload)[0]
        self.next = self.held + 1
        return self.held

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.last_tx = time.monotonic()

    def send_events(self, n: int, frame: int = 256) -> int:
        """The next ``n`` events of the test flow (cyclic); returns the last seq sent."""
        idx = (np.arange(self.next, self.next + n) - 1) % len(EVENTS)
        recs = EVENTS[idx].copy()
        recs["sseq"] = np.arange(self.next, self.next + n, dtype=np.uint64)
        for lo in range(0, n, frame):
            self.send(W.encode_events(recs[lo:lo + frame]))
        self.next += n
        self.sent += n
        return self.next - 1

    @property
    def acked(self) -> int:
        self.take()
        acks = [W.decode_ack(p)[0] for k, p in self.frames if k == W.K_ACK]
        return max(acks, default=-1)

    def keepalive(self) -> None:
        if not self.closed and time.monotonic() - self.last_tx > 1.0:
            self.send(W.encode_heartbeat())

    def wait_acked(self, seq: int | None = None, seconds: float = 30, tick=None) -> None:
        seq = self.next - 1 if seq is None else seq

        def both():
            self.keepalive()
            if tick is not None:
                tick()

        until(lambda: self.acked >= seq or self.closed, seconds,
              f"ACK of seq {seq} for session {self.sid}", both)
        assert self.acked >= seq, \
            f"session {self.sid} closed at ACK {self.acked}: {self.rejects()}"

    def served(self, n: int = 50, tick=None) -> None:
        """Send ``n`` more events and wait for their ACK."""
        self.wait_acked(self.send_events(n), tick=tick)


class Clients:
    """Every connection and attack a test makes, closed when it ends (passed or not)."""

    def __init__(self, port: int):
        self.port = port
        self.all: list[Client] = []

    def session(self, sid: int, **kw) -> Session:
        s = Session(self.port, sid, **kw)
        self.all.append(s)
        return s

    def client(self, **kw) -> Client:
        c = Client(self.port, **kw)
        self.all.append(c)
        return c

    def close(self) -> None:
        for c in self.all:
            c.close()


class Background:
    """An :class:`Attack` run in a thread (``with``: stopped and joined on the way out);
    ``result``: its summary once stopped."""

    def __init__(self, attack: Attack):
        self.attack = attack
        self.result: dict = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.attack.run()
        except BaseException as e:  # (re-raised in the test's thread)
            self.error = e

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.attack.stop()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the attack thread did not stop"
        if self.error is not None and exc[0] is None:
            raise self.error

    def check(self) -> None:
        if self.error is not None:
            raise self.error


def _processed(node, *alive: Session) -> int:
    """Events the node's document counts (accepted + rejected), from `exposure dump`; the
    sessions ``alive`` send their heartbeats meanwhile (a CLI start can take seconds on a
    busy machine, longer than the idle timeout)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen([sys.executable, "-m", "exposure", "dump", "--compact",
                              "--config", str(node.config)], stdout=out, stderr=err)
        try:
            until(lambda: p.poll() is not None, 120, "exposure dump",
                  tick=lambda: [s.keepalive() for s in alive], step=0.02)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
        out.seek(0)
        err.seek(0)
        assert p.returncode == 0, err.read().decode()
        c = orjson.loads(out.read())["counts"]
    return c["accepted"] + c["rejected"]


def _delta(node, before: dict) -> dict:
    now = node.port_counters()
    return {k: now[k] - before[k] for k in now if k != "open"}


def _unharmed(node, pids: dict) -> None:
    """The node's processes are the ones it started with, and it never restarted them."""
    assert node.alive, node.log.read_text()[-3000:]
    assert node.pids() == pids, "a node process was restarted"
    assert "restarting" not in node.log.read_text(errors="replace")


def _settled(node) -> None:
    """No connection of an earlier test is still open."""
    until(lambda: node.port_counters()["open"] == 0, 15, "port without connections")


def _start(n) -> None:
    """Start a node (on a busy 2-core machine that can take a while); its log if not."""
    try:
        n.start(timeout=240)
    except RuntimeError as e:
        raise RuntimeError(f"{e}; its log: {n.log.read_text()[-3000:]}") from None


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("abuse")
    sessions = tmp / "sessions.toml"
    sessions.write_text("".join(
        f'[[session]]\nid = {s}\nsecret = "{secret(s).decode()}"\nsources = "all"\n'
        'accounts = "all"\ninstrument = true\nmark = true\nlimit = true\n'
        for s in range(1, N_SESSIONS + 1)))
    sessions.chmod(0o600)
    n = LocalNode(tmp, start=False)
    n.add_keys("ingest", f'sessions = "{sessions}"\nmax_connections = {CAP}\n'
                         f"login_timeout_ms = {LOGIN_MS}\nidle_timeout_ms = {IDLE_MS}\n"
                         f"max_output_kb = {OUTPUT_KB}\n")
    # The idle test stops the journal process for a few seconds (so that ACKs wait):
    # that must not count as a hung process.
    n.add_keys("node", "stall_ms = 60000")
    try:
        _start(n)
        n.first_pids = n.pids()
        yield n
    finally:
        n.stop()
    assert n.segments() == [], "the node left shared memory behind"


@pytest.fixture
def clients(node):
    _settled(node)
    c = Clients(node.port)
    try:
        yield c
    finally:
        c.close()


# ---------------------------------------------------------------------- connection flood
@pytest.mark.timeout(120, func_only=True)  # (the module's node starts before)
def test_a_flood_past_the_cap_evicts_only_connections_that_have_not_logged_in(node,
                                                                              clients):
    a = clients.session(1)
    a.login()
    a.served(200)
    before, done0 = node.port_counters(), _processed(node, a)
    # 3x the cap held open (silent, or half a LOGIN), and garbage, on one selector
    flood = Attack("127.0.0.1", node.port, {"silent": 200, "partial": 200, "garbage": 100},
                   hold=3 * CAP, lifetime_s=5)
    with Background(flood) as bg:
        until(lambda: _delta(node, before)["evicted_before_login"] >= 2 * CAP, 60,
              "evictions at the cap", tick=a.keepalive)
        for _ in range(5):  # the session that was in before keeps being served
            a.served(100, tick=bg.check)
        tries = 0
        while True:  # a new well-behaved login gets in: the oldest unknown one makes room
            tries += 1
            b = clients.session(2)
            try:
                b.login()
                break
            except AssertionError:
                assert tries < 10, f"no login of session 2 in {tries} tries during the flood"
        b.served(100, tick=bg.check)
        a.served(100, tick=bg.check)
        d = _delta(node, before)
    res = bg.result
    assert sum(res["opened"].values()) > 3 * CAP
    assert res["other_than_challenge"] == 0 and res["rejects"] == {}, res
    assert d["evicted_before_login"] >= 2 * CAP
    assert d["closed_before_login"] > 0          # the garbage
    assert d["refused_at_cap"] == 0              # there was always one to evict
    assert d["logins"] >= 1 and d["replaced"] == 0 and d["closed_slow"] == 0
    assert not a.closed and a.rejects() == [] and not b.closed
    assert node.session_counters(1)["logins"] == 1  # never dropped, never back
    assert _processed(node, a, b) - done0 == a.sent - 200 + b.sent
    _unharmed(node, node.first_pids)


@pytest.mark.timeout(120, func_only=True)  # (the module's node starts before)
def test_at_the_cap_with_every_connection_logged_in_a_new_one_gets_E_BUSY(node, clients):
    before = node.port_counters()
    sessions = []

    def alive():
        for s in sessions:
            s.keepalive()

    for sid in range(101, 101 + CAP):
        s = clients.session(sid)
        s.login()
        sessions.append(s)
        alive()

    extra = clients.client()
    until(extra.gone, 10, "the refused connection to be closed", tick=alive)
    assert extra.kinds() == [W.K_REJECT]          # no CHALLENGE: refused at once
    assert extra.rejects()[0][0] == W.E_BUSY
    sessions[0].served(50, tick=alive)            # the sessions in are unharmed
    sessions[-1].served(50, tick=alive)
    sessions.pop(3).close()                       # one leaves: room for another login
    until(lambda: node.port_counters()["open"] == CAP - 1, 10, "the close", tick=alive)
    late = clients.session(101 + CAP)
    late.login()
    late.served(10, tick=alive)
    d = _delta(node, before)
    assert d["refused_at_cap"] == 1 and d["evicted_before_login"] == 0
    assert d["logins"] == CAP + 1
    _unharmed(node, node.first_pids)


@pytest.mark.timeout(60, func_only=True)  # (the module's node starts before)
def test_connections_refused_at_login_do_not_lock_new_sessions_out(node, clients):
    before = node.port_counters()
    refused = []
    for _ in range(CAP):  # LOGINs of a session id that does not exist, held open after
        c = clients.client()
        c.sock.sendall(W.encode_login(0))
        refused.append(c)
    for c in refused:
        until(lambda c=c: c.rejects(), 10, "the REJECT of a bad login")
        assert c.rejects()[0][0] == W.E_SESSION
    assert _delta(node, before)["bad_session_ids"] == CAP
    # Every connection has been refused; none is logged in: a well-behaved one gets in.
    b = clients.session(10)
    try:
        b.login()
    finally:
        d = _delta(node, before)
    assert d["refused_at_cap"] == 0, d
    b.served(10)


# ---------------------------------------------------------------------- clients that never read
@pytest.mark.timeout(120, func_only=True)  # (the module's node starts before)
def test_a_session_that_never_reads_is_disconnected_and_others_are_served(node, clients):
    a = clients.session(3)
    a.login()
    c = clients.session(4, rcvbuf=4096)  # small: the node's queue for it fills sooner
    c_held = c.login()
    before, done0 = node.port_counters(), _processed(node, a, c)
    a_sent0 = a.sent
    # c streams one event per frame and never reads its ACKs again; a keeps sending
    pending, a_due, jammed_acks, k = b"", 0, 0, 0
    c_seq = c_held
    end = time.monotonic() + 60
    while node.session_counters(4)["connected"]:
        assert time.monotonic() < end, "the never-reading session was not disconnected"
        if not pending:
            c_seq += 1
            rec = EVENTS[(c_seq - 1) % len(EVENTS):][:1].copy()
            rec["sseq"] = c_seq
            pending = W.encode_events(rec)
        try:
            pending = pending[c.sock.send(pending, socket.MSG_DONTWAIT):]
        except BlockingIOError:
            pass
        except OSError:
            break  # the node dropped it
        k += 1
        if k % 20 == 0:
            if a.acked >= a_due > 0 and c.unread() >= 2048:
                jammed_acks += 1  # a was served while c's answers were piling up
            if a.acked >= a_due:
                a_due = a.send_events(5)
        time.sleep(0.0003)
    until(lambda: node.session_counters(4)["connected"] == 0, 10, "the disconnect")
    a.served(50)
    sc = node.session_counters(4)
    d = _delta(node, before)
    assert sc["closed_slow"] == 1 and d["closed_slow"] == 1
    assert d["closed_idle"] == d["protocol_errors"] == d["seq_rejects"] == 0
    assert jammed_acks >= 1, "the other session was never served while one did not read"
    assert not a.closed and a.rejects() == []
    # what c sent before it was dropped was applied, and nothing else went missing
    assert _processed(node, a) - done0 == (a.sent - a_sent0) + (sc["held"] - c_held)
    _unharmed(node, node.first_pids)


# ---------------------------------------------------------------------- heartbeats before login
@pytest.mark.timeout(120, func_only=True)  # (the module's node starts before)
def test_heartbeats_before_login_get_only_the_challenge_and_a_flood_harms_no_one(node,
                                                                                clients):
    one = clients.client()
    one.sock.sendall(W.encode_heartbeat() * 3)
    until(one.gone, 10, "the close of a connection that sent HEARTBEATs before login")
    assert one.kinds() == [W.K_CHALLENGE]
    a = clients.session(5)
    a.login()
    before, done0 = node.port_counters(), _processed(node, a)
    # (fewer held than the cap: each one is closed for what it sent, none evicted)
    flood = Attack("127.0.0.1", node.port, {"heartbeat": 1000}, hold=CAP // 2, lifetime_s=5)
    with Background(flood) as bg:
        until(lambda: _delta(node, before)["closed_before_login"] >= 500, 60,
              "500 HEARTBEAT connections closed", tick=a.keepalive)
        for _ in range(3):
            a.served(100, tick=bg.check)
    res = bg.result
    d = _delta(node, before)
    closed = res["closed_by_node"].get("heartbeat", 0)
    assert closed >= 400, res
    assert closed + res["closed_by_client"].get("heartbeat", 0) == res["opened"]["heartbeat"]
    assert set(res["frames_received"]) == {"challenge"} and res["other_than_challenge"] == 0
    assert d["closed_before_login"] + d["login_timeouts"] >= closed
    assert d["closed_before_login"] >= 500 and d["evicted_before_login"] == 0
    assert d["logins"] == 0 and d["protocol_errors"] == 0
    assert not a.closed and a.rejects() == []
    assert _processed(node, a) - done0 == 300
    _unharmed(node, node.first_pids)


# ---------------------------------------------------------------------- deadlines
@pytest.mark.timeout(60, func_only=True)  # (the module's node starts before)
def test_a_connection_that_never_logs_in_is_closed_at_the_login_deadline(node, clients):
    before = node.port_counters()
    quiet = clients.client()                   # connects and sends nothing
    half = clients.client()
    half.sock.sendall(W.encode_login(1)[:20])  # half a LOGIN, never the rest
    for c in (quiet, half):
        until(c.gone, 10, "the close at the login deadline")
        assert c.kinds() == [W.K_CHALLENGE]
        assert c.closed_at - c.t0 >= LOGIN_MS / 1000  # (never before the deadline)
    d = _delta(node, before)
    assert d["login_timeouts"] == 2 and d["closed_before_login"] == 0
    assert d["evicted_before_login"] == 0
    _unharmed(node, node.first_pids)


@pytest.mark.timeout(120, func_only=True)  # (the module's node starts before)
def test_an_idle_session_gets_E_IDLE_while_exposure_send_waiting_for_acks_stays(node,
                                                                               clients,
                                                                               tmp_path):
    before = node.port_counters()
    ev = tmp_path / "ev.jsonl"
    ev.write_bytes((DATA / "basic.jsonl").read_bytes())
    n_ev = len(read_events(ev))
    idle = clients.session(6)
    idle.login()                                 # then sends nothing at all
    durable = node.pids()["durable"]
    send = None
    os.kill(durable, signal.SIGSTOP)             # the journal halts: ACKs wait for it
    try:
        send = subprocess.Popen([sys.executable, "-m", "exposure", "send", str(ev),
                                 "--session", "7", "--timeout", "60", "--config",
                                 str(node.config)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        until(lambda: node.session_counters(7)["held"] >= n_ev, 30, "the events of send")
        t_sent = time.monotonic()
        until(idle.gone, IDLE_MS / 1000 + 10, "the close of the idle session")
        assert [r[0] for r in idle.rejects()] == [W.E_IDLE]
        assert idle.closed_at - idle.last_tx >= IDLE_MS / 1000  # (never before)
        # send has nothing left to send and has waited longer than the idle timeout
        until(lambda: time.monotonic() - t_sent > IDLE_MS / 1000 + 0.5, IDLE_MS / 1000 + 5,
              "a wait longer than the idle timeout")
        assert send.poll() is None, send.communicate()[1].decode()
        assert node.session_counters(7)["connected"] == 1
    finally:
        os.kill(durable, signal.SIGCONT)
        if send is not None and send.poll() is None:
            try:
                out, err = send.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                send.kill()
                out, err = send.communicate()
        elif send is not None:
            out, err = send.communicate()
    assert send.returncode == 0, err.decode()
    res = orjson.loads(out)
    assert res["acknowledged"] == res["sent"] == n_ev
    assert node.session_counters(6)["closed_idle"] == 1
    assert node.session_counters(7)["closed_idle"] == 0
    d = _delta(node, before)
    assert d["closed_idle"] == 1 and d["logins"] == 2
    _unharmed(node, node.first_pids)


@pytest.mark.timeout(120, func_only=True)  # (the module's node starts before)
def test_a_paced_exposure_send_slower_than_the_idle_timeout_is_not_closed(node, clients,
                                                                          tmp_path):
    ev = tmp_path / "ev.jsonl"
    lines = (DATA / "clean-5000.jsonl").read_text().splitlines()[:1100]
    ev.write_text("\n".join(lines) + "\n")
    rate = 1024 / (IDLE_MS / 1000 + 1)  # the second frame is due a second after the idle
    p = node.cli("send", str(ev), "--session", "11", "--rate", f"{rate:.1f}")
    assert p.returncode == 0, p.stderr.decode()
    assert orjson.loads(p.stdout)["acknowledged"] == 1100


# ---------------------------------------------------------------------- stale connections
@pytest.mark.timeout(60, func_only=True)  # (the module's node starts before)
def test_an_authenticated_login_replaces_a_stale_connection_of_its_session(node, clients):
    before = node.port_counters()
    old = clients.session(8)
    old.login()
    old.served(10)
    # old goes quiet (still connected, reading nothing): the client restarted elsewhere
    new = clients.session(8)
    assert new.login() == 10                      # told what the node holds
    until(old.gone, 10, "the replaced connection to be closed")
    assert [r[0] for r in old.rejects()] == [W.E_REPLACED]
    # a login that does not prove the secret replaces nothing
    forged = clients.session(8, key=b"not-the-secret-of-session-8")
    with pytest.raises(AssertionError, match="refused"):
        forged.login()
    assert [r[0] for r in forged.rejects()] == [W.E_AUTH]
    # nor does a proof recorded from another connection (its nonce is not this one's)
    replay = clients.client()
    proof = W.login_mac(secret(8), 8, new.nonce())
    replay.sock.sendall(W.encode_login(8, proof))
    until(replay.gone, 10, "the replayed login to be refused")
    assert [r[0] for r in replay.rejects()] == [W.E_AUTH]
    assert not new.gone() and node.session_counters(8)["connected"] == 1
    new.served(10)
    prev = new
    for _ in range(5):  # never refused: each new login takes over
        nxt = clients.session(8)
        assert nxt.login() == prev.next - 1
        until(prev.gone, 10, "the replaced connection to be closed")
        assert [r[0] for r in prev.rejects()] == [W.E_REPLACED]
        nxt.served(3)
        prev = nxt
    sc = node.session_counters(8)
    assert sc["replaced"] == 6 and sc["auth_failures"] == 2 and sc["logins"] == 7
    assert sc["connected"] == 1
    d = _delta(node, before)
    assert d["replaced"] == 6 and d["auth_failures"] == 2
    _unharmed(node, node.first_pids)


# ---------------------------------------------------------------------- descriptor limit
@pytest.mark.timeout(360)
def test_a_node_out_of_file_descriptors_survives_and_serves_after_the_flood(tmp_path):
    n = LocalNode(tmp_path, start=False)
    n.add_keys("ingest", f"login_timeout_ms = {LOGIN_MS}\n")
    n.wrap = ["prlimit", "--nofile=64:64", "--"]  # the node's processes: 64 descriptors
    cl = Clients(n.port)
    try:
        _start(n)
        pids = n.pids()
        hot = f"/proc/{pids['hot']}"
        assert "64" in next(x for x in open(f"{hot}/limits") if x.startswith("Max open f"))
        a = cl.session(1)  # a node without a sessions file: any proof
        a.login()
        a.served(50)
        fds = len(os.listdir(f"{hot}/fd"))
        before, done0 = n.port_counters(), _processed(n, a)
        flood = Attack("127.0.0.1", n.port, {"silent": 1000}, hold=300, lifetime_s=3)
        with Background(flood) as bg:
            until(lambda: _delta(n, before)["fd_limit"] >= 50, 60, "accepts at EMFILE",
                  tick=a.keepalive)
            a.served(50, tick=bg.check)  # the session in is served during the flood
        until(lambda: n.port_counters()["open"] == 1, 15, "the flood's connections closed",
              tick=a.keepalive)
        assert len(os.listdir(f"{hot}/fd")) == fds  # nothing leaked, the spare is back
        b = cl.session(2)  # after the flood: a new login is served
        b.login()
        b.served(50)
        a.served(50)
        d = _delta(n, before)
        assert d["fd_limit"] >= 50 and d["logins"] == 1
        assert bg.result["opened"]["silent"] > 64
        assert _processed(n, a, b) - done0 == 150
        assert not a.closed and a.rejects() == []
        _unharmed(n, pids)
        assert "out of file descriptors" in n.log.read_text()
    finally:
        cl.close()
        n.stop()
    assert n.segments() == []
