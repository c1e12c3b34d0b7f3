"""Attackers on a node's session port, for the abuse tests and ``perf/bench_abuse.py``.

:class:`Attack`: one thread, non-blocking sockets on one selector, opening connections at
given rates that misbehave before login (silent, half a LOGIN, garbage, only HEARTBEATs),
LOGINs of out-of-range session ids, and logged-in clients that stream events and never read
(``slowreader``). It counts what it did and what the node answered (:attr:`Attack.stats`).
"""

from __future__ import annotations

import collections
import errno
import selectors
import socket
import struct
import time

import numpy as np

from exposure.core.types import EVENT_DTYPE, W_SSEQ
from exposure.net import wire as W

__all__ = ["Attack", "KINDS", "PRE_KINDS"]

# What one attack connection does. Before login: ``silent`` (connects, sends nothing,
# holds), ``partial`` (the first 20 bytes of a LOGIN, never the rest), ``garbage`` (bytes
# that are no frame), ``heartbeat`` (only HEARTBEAT frames), ``badlogin`` (a LOGIN of an
# out-of-range session id, then holds the connection until its lifetime ends);
# ``slowreader``: logs in, then streams events and never reads again.
KINDS = ("silent", "partial", "garbage", "heartbeat", "badlogin", "slowreader")
PRE_KINDS = ("silent", "partial", "garbage", "heartbeat")
_GARBAGE = b"\x17\x03\x01\x00GET / HTTP/1.1\r\n\r\n" + bytes(range(40))
_BAD_TYPE = 200  # an event type the kernel does not know: processed, rejected, acknowledged


class _Conn:
    __slots__ = ("sock", "kind", "born", "live", "reader", "frames", "pending", "session",
                 "seq", "next_ns", "eof")

    def __init__(self, sock: socket.socket, kind: str, born: float, session: int = 0):
        self.sock, self.kind, self.born, self.session = sock, kind, born, session
        self.live = False          # slowreader: logged in (reads nothing any more)
        self.reader = W.FrameReader()
        self.frames: list[int] = []  # kinds of the frames the node sent
        self.pending = b""
        self.seq = 0
        self.next_ns = 0
        self.eof = False


class Attack:
    """Hostile clients of a session port, multiplexed on one selector in one thread.

    ``rates``: new connections per second of each pre-login kind (``PRE_KINDS`` and
    ``badlogin``), opened on a fixed schedule while fewer than ``hold`` are open;
    ``lifetime_s``: an attack connection the node has not closed is closed by the client
    after this long. ``slow``: how many ``slowreader`` clients to keep (session ids
    ``slow_sessions``, secrets ``secrets`` by id when the node has a sessions file), each
    sending one event per frame at ``slow_rate`` events/s, each followed by
    ``slow_heartbeats`` HEARTBEATs (each answered: the answers pile up faster). :meth:`run`
    until ``stop()``
    (or a deadline); :attr:`stats` counts everything. Tests drive it in a thread; the
    benchmark in its own process."""

    def __init__(self, host: str, port: int, rates: dict[str, float] | None = None,
                 hold: int = 100, lifetime_s: float = 5.0, slow: int = 0,
                 slow_rate: float = 500.0, slow_sessions=(), secrets: dict | None = None,
                 slow_heartbeats: int = 0):
        self.addr = (host, port)
        self.rates = {k: float(v) for k, v in (rates or {}).items() if v > 0}
        bad = set(self.rates) - set(PRE_KINDS) - {"badlogin"}
        if bad:
            raise ValueError(f"unknown attack kinds {sorted(bad)}")
        self.hold = hold
        self.lifetime_s = lifetime_s
        self.slow = slow
        self.slow_period_ns = int(1e9 / slow_rate) if slow_rate > 0 else 0
        self.slow_heartbeats = slow_heartbeats
        self.slow_sessions = list(slow_sessions)[:slow] if slow else []
        if len(self.slow_sessions) < slow:
            raise ValueError(f"{slow} slow readers need {slow} session ids")
        self.secrets = secrets or {}
        self.sel = selectors.DefaultSelector()
        self.conns: set[_Conn] = set()
        self.slow_conns: dict[int, _Conn] = {}   # session -> its connection
        self.slow_retry: dict[int, float] = {}   # session -> when it may reconnect
        self.started: dict[str, float] = {}
        self.opened_by: dict[str, int] = collections.Counter()
        self.stats: dict = {
            "opened": collections.Counter(),        # connections opened, by kind
            "connect_failed": 0,                    # connect() refused or reset
            "closed_by_node": collections.Counter(),  # EOF or reset seen, by kind
            "closed_by_client": collections.Counter(),  # lifetime over, or stop
            "frames_received": collections.Counter(),  # by frame kind name
            "rejects": collections.Counter(),       # REJECT codes received, by name
            "other_than_challenge": 0,  # pre-login connections sent anything else
            "frames_sent": 0,           # frames (or garbage writes) sent
            "bytes_sent": 0,
            "slow_logins": 0,
            "slow_events": 0,
            "slow_dropped": 0,          # slowreader connections the node closed
        }
        self._stop = False
        self._t0 = 0.0
        self._slow_event = self._event_template()
        self._slow_beats = W.encode_heartbeat() * slow_heartbeats

    # ------------------------------------------------------------------ control
    def stop(self) -> None:
        self._stop = True

    def run(self, seconds: float | None = None) -> dict:
        """The attack until :meth:`stop` (from another thread or a signal handler) or for
        ``seconds``; then every connection is closed. Returns :meth:`summary`."""
        self._t0 = time.monotonic()
        end = self._t0 + seconds if seconds is not None else None
        try:
            while not self._stop and (end is None or time.monotonic() < end):
                self.step()
        finally:
            self.close()
        return self.summary()

    def step(self, timeout: float = 0.002) -> None:
        now = time.monotonic()
        if not self._t0:
            self._t0 = now
        self._open_due(now)
        for key, ev in self.sel.select(timeout):
            c = key.data
            if ev & selectors.EVENT_WRITE:
                self._connected(c)
            elif ev & selectors.EVENT_READ:
                self._readable(c)
        self._slow_send(time.monotonic_ns())
        self._expire(time.monotonic())

    def close(self) -> None:
        for c in list(self.conns):
            self._drop(c, by_node=False)
        self.sel.close()

    def summary(self) -> dict:
        s = dict(self.stats)
        for k in ("opened", "closed_by_node", "closed_by_client", "frames_received",
                  "rejects"):
            s[k] = dict(s[k])
        wall = max(1e-9, time.monotonic() - self._t0) if self._t0 else 0.0
        s["seconds"] = round(wall, 3)
        if wall:
            s["connections_per_s"] = round(sum(s["opened"].values()) / wall, 1)
            s["frames_per_s"] = round((s["frames_sent"]) / wall, 1)
            s["bytes_per_s"] = round(s["bytes_sent"] / wall, 1)
        return s

    # ------------------------------------------------------------------ connections
    def _open_due(self, now: float) -> None:
        el = now - self._t0
        due = {k: int(el * r) - self.opened_by[k] for k, r in self.rates.items()}
        budget = 64  # at most 64 a step (the rest on the next one)
        while budget > 0 and any(d > 0 for d in due.values()):
            for kind in self.rates:  # in turn, so that ``hold`` favours no kind
                if due[kind] <= 0:
                    continue
                due[kind] -= 1
                self.opened_by[kind] += 1
                if len(self.conns) - len(self.slow_conns) < self.hold:
                    self._open(kind)  # (else skipped: never more than ``hold`` open)
                budget -= 1
        for sid in self.slow_sessions:
            if sid not in self.slow_conns and now >= self.slow_retry.get(sid, 0.0):
                self._open("slowreader", sid)

    def _open(self, kind: str, session: int = 0) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if kind == "slowreader":  # a small receive buffer: the node's queue fills sooner
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self.stats["connect_failed"] += 1
            s.close()
            if kind == "slowreader":
                self.slow_retry[session] = time.monotonic() + 0.01
            return
        c = _Conn(s, kind, time.monotonic(), session)
        self.conns.add(c)
        if kind == "slowreader":
            self.slow_conns[session] = c
        self.stats["opened"][kind] += 1
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def _connected(self, c: _Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.stats["connect_failed"] += 1
            self._drop(c, by_node=False, failed=True)
            return
        self.sel.modify(c.sock, selectors.EVENT_READ, c)
        first = {"partial": (W.encode_login(1)[:20], 0), "garbage": (_GARBAGE, 1),
                 "heartbeat": (W.encode_heartbeat() * 3, 3),
                 "badlogin": (W.encode_login(0), 1)}
        if c.kind in first:
            self._write(c, *first[c.kind])

    def _write(self, c: _Conn, data: bytes, frames: int = 1) -> bool:
        """Send what the socket takes now (the rest waits in ``c.pending``); ``frames``:
        how many frames (or garbage writes) ``data`` counts as."""
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(c, by_node=True)
            return False
        self.stats["frames_sent"] += frames
        self.stats["bytes_sent"] += n
        c.pending = data[n:]
        return True

    def _readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if c.kind == "badlogin" and not c.eof and W.K_CHALLENGE in c.frames:
                c.eof = True  # the node shut its side after the REJECT: hold ours
                self.stats["closed_by_node"][c.kind] += 1
                self.sel.unregister(c.sock)
                return
            self._drop(c, by_node=True)
            return
        try:
            frames = c.reader.feed(data)
        except W.ProtocolError:
            frames = []
        for kind, payload in frames:
            name = _KIND_NAMES.get(kind, str(kind))
            self.stats["frames_received"][name] += 1
            c.frames.append(kind)
            if kind == W.K_REJECT:
                code = W.decode_reject(payload)[0]
                self.stats["rejects"][W.REJECT_NAMES.get(code, str(code))] += 1
            if not c.live and kind not in (W.K_CHALLENGE, W.K_REJECT) \
                    and c.kind != "slowreader":
                self.stats["other_than_challenge"] += 1
            if c.kind == "slowreader" and not c.live:
                if kind == W.K_CHALLENGE:
                    secret = self.secrets.get(c.session)
                    proof = W.login_mac(secret, c.session, payload) if secret else bytes(32)
                    self._write(c, W.encode_login(c.session, proof))
                elif kind == W.K_LOGIN_OK:
                    (held,) = struct.unpack("<Q", payload)
                    c.seq = held
                    c.live = True
                    c.next_ns = time.monotonic_ns()
                    self.stats["slow_logins"] += 1
                    self.sel.unregister(c.sock)  # it never reads again
                    return

    def _drop(self, c: _Conn, by_node: bool, failed: bool = False) -> None:
        if c not in self.conns:
            return
        self.conns.discard(c)
        if self.slow_conns.get(c.session) is c:
            del self.slow_conns[c.session]
            self.slow_retry[c.session] = time.monotonic() + 0.01
            if by_node and c.live:
                self.stats["slow_dropped"] += 1
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        c.sock.close()
        if failed:
            return
        if by_node:
            if not (c.kind == "badlogin" and c.eof):
                self.stats["closed_by_node"][c.kind] += 1
        else:
            self.stats["closed_by_client"][c.kind] += 1

    def _expire(self, now: float) -> None:
        old = now - self.lifetime_s
        for c in [c for c in self.conns if c.born < old and c.kind != "slowreader"]:
            self._drop(c, by_node=False)

    # ------------------------------------------------------------------ slow readers
    @staticmethod
    def _event_template() -> bytearray:
        rec = np.zeros(1, EVENT_DTYPE)
        rec["type"] = _BAD_TYPE
        return bytearray(W.encode_events(rec))

    def _slow_send(self, now_ns: int) -> None:
        if not self.slow_conns or not self.slow_period_ns:
            return
        off = W.HEADER.size + 8 * W_SSEQ
        for c in list(self.slow_conns.values()):
            if not c.live or now_ns < c.next_ns:
                continue
            if c.pending:  # the node pushes back: finish the frame first
                if not self._write(c, c.pending, 0):
                    continue
                if c.pending:
                    continue
            c.seq += 1
            struct.pack_into("<Q", self._slow_event, off, c.seq)
            if self._write(c, bytes(self._slow_event) + self._slow_beats,
                           1 + self.slow_heartbeats):
                self.stats["slow_events"] += 1
            c.next_ns = max(c.next_ns + self.slow_period_ns, now_ns - 10 * self.slow_period_ns)


_KIND_NAMES = {W.K_CHALLENGE: "challenge", W.K_LOGIN_OK: "login_ok", W.K_ACK: "ack",
               W.K_REJECT: "reject", W.K_HEARTBEAT: "heartbeat", W.K_EVENTS: "events"}
