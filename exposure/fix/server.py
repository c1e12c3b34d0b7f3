"""The FIX sessions' I/O: acceptors and initiators in one thread (docs/fix.md, "Session
layer").

:class:`FixEngine` runs a ``selectors`` loop on its own thread: it listens for acceptor
sessions (a connection is matched to its session by its Logon's CompIDs, then checked
against the session's allowed source addresses), connects initiator sessions (reconnecting
with a doubling backoff), reads in large chunks and hands each read's messages to its
:class:`~exposure.fix.session.Session` as one batch. After each round of reads it calls
``on_batch`` (where the gateway makes the events of the round durable), then flushes the
:class:`~exposure.fix.session.SeqStore`, then writes what the sessions answered: so an
inbound seq is durable only after its event, and an outbound seq before its message leaves.

Bounds: ``max_connections`` sockets (one more is closed at once and counted), a reader holds
at most ``max_message`` bytes of one message, a connection's unsent output at most
``max_outbuf`` bytes (a counterparty that reads nothing is disconnected), a session queues at
most ``max_queue`` messages past a gap.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from exposure.fix.codec import FixError, FixMessage, FixReader, encode
from exposure.fix.fast import FixRun
from exposure.fix.session import SeqStore, Session, SessionConfig

__all__ = ["FixEngine"]

log = logging.getLogger(__name__)

ENGINE_COUNTERS = (
    "accepted", "connections_refused", "unknown_comp_id", "address_not_allowed",
    "already_logged_on", "not_logon_first", "logon_timeout", "slow_consumer", "app_errors",
    "connects", "connect_failures", "pending_garbage", "batches",
)


class _Conn:
    __slots__ = ("sock", "peer", "reader", "session", "out", "t0", "connecting", "closing",
                 "logons0")

    def __init__(self, sock: socket.socket, peer: str, max_message: int, t0: float) -> None:
        self.sock = sock
        self.peer = peer
        self.reader = FixReader(max_message)
        self.session: Session | None = None
        self.out = bytearray()
        self.t0 = t0
        self.connecting = False
        self.closing = False
        self.logons0 = 0


class FixEngine:
    """FIX sessions over TCP. ``on_app(config, message)`` receives each application
    message exactly once, in MsgSeqNum order, on the engine's thread; ``on_batch()`` (if
    given) is called after a round of reads that delivered any, before the seq store is
    flushed; ``on_bad(config, reason, raw)`` (if given) hears every rejected or dropped
    input of a known session."""

    def __init__(self, sessions: list[SessionConfig],
                 on_app: Callable[[SessionConfig, FixMessage], None], store: SeqStore, *,
                 max_connections: int = 64, max_message: int = 65536,
                 max_outbuf: int = 1 << 20, read_size: int = 1 << 18,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[], None] | None = None,
                 on_bad: Callable[[SessionConfig, str, bytes], None] | None = None,
                 tick_s: float = 0.1,
                 on_app_batch: Callable[[SessionConfig, Any, int, int], None] | None = None
                 ) -> None:
        keys = [c.key for c in sessions]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise ValueError(f"two [[fix]] tables for the same session: {', '.join(dup)}")
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self.configs = list(sessions)
        self.store = store
        self.on_batch = on_batch
        self.max_connections = max_connections
        self.max_message = max_message
        self.max_outbuf = max_outbuf
        self.read_size = read_size
        self.clock = clock
        self.tick_s = tick_s
        self._on_app_batch = on_app_batch
        self.sessions = {c.key: Session(c, store, self._deliver, clock=clock, on_bad=on_bad,
                                        on_app_batch=self._deliver_batch
                                        if on_app_batch is not None else None)
                         for c in sessions}
        self._on_app = on_app
        self._delivered = 0
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._counters = dict.fromkeys(ENGINE_COUNTERS, 0)
        self._sel = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._by_session: dict[str, _Conn] = {}
        self._listeners: dict[str, socket.socket] = {}
        self._bound: dict[str, tuple[str, int]] = {}
        self._initiators = {c.key: [0.0, c.reconnect_s] for c in sessions
                            if c.role == "initiator"}  # next attempt, backoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------------------ control
    def start(self) -> None:
        """Bind the acceptors' addresses (errors raise here) and start the thread;
        :attr:`ready` is set once it runs."""
        for c in self.configs:
            if c.role != "acceptor" or c.listen in self._listeners:
                continue
            host, port = c.listen_addr
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                s.close()
                self.close()
                raise OSError(e.errno, f"[[fix]] listen = {c.listen!r}: {e.strerror}") from e
            s.listen(128)
            s.setblocking(False)
            self._listeners[c.listen] = s
            self._bound[c.listen] = s.getsockname()[:2]
            self._sel.register(s, selectors.EVENT_READ, ("listen", c.listen))
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self._thread = threading.Thread(target=self._run, name="fix-engine", daemon=True)
        self._thread.start()

    def address(self, config: SessionConfig) -> tuple[str, int]:
        """Where an acceptor session listens (its port, when it asked for port 0)."""
        return self._bound[config.listen]

    def stop(self, timeout: float = 5.0) -> None:
        """Log every session out (waiting at most its ``logout_timeout_s``), close all,
        flush the seq store, and end the thread."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
        self.close()

    def close(self) -> None:
        for c in list(self._conns.values()):
            self._drop(c, "closed")
        for s in self._listeners.values():
            s.close()
        self._listeners.clear()
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass
        try:
            self._sel.close()
        except (OSError, RuntimeError):
            pass

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def counters(self) -> dict[str, Any]:
        """The engine's counters, each session's (with its state and seqs), and the
        sessions' totals."""
        out: dict[str, Any] = dict(self._counters)
        out["connections"] = len(self._conns)
        totals: dict[str, int] = {}
        per: dict[str, Any] = {}
        for key, s in list(self.sessions.items()):
            c = dict(s.counters)
            for k, v in c.items():
                totals[k] = totals.get(k, 0) + v
            c.update(state=s.state, inbound=s.inbound, outbound=s.outbound,
                     source=s.config.source)
            per[key] = c
        out["totals"] = totals
        out["sessions"] = per
        return out

    # ---------------------------------------------------------------------- the loop
    def _deliver(self, config: SessionConfig, msg: FixMessage) -> None:
        self._on_app(config, msg)
        self._delivered += 1

    def _deliver_batch(self, config: SessionConfig, run: Any, i: int, j: int) -> None:
        self._on_app_batch(config, run, i, j)
        self._delivered += j - i

    def _run(self) -> None:
        try:
            self.ready.set()
            stop_at = None
            next_tick = self.clock()
            while True:
                if self._stop.is_set() and stop_at is None:
                    stop_at = self.clock() + max(
                        [c.logout_timeout_s for c in self.configs] or [1.0])
                    for c in list(self._conns.values()):
                        if c.session is not None and c.session.active:
                            c.session.logout("the gateway stops")
                        else:
                            self._drop(c, "stopping")
                    self._pump()
                if stop_at is not None and (not self._conns or self.clock() > stop_at):
                    break
                if stop_at is None:
                    self._connect_due()
                events = self._sel.select(timeout=self.tick_s)
                delivered = self._delivered
                for key, mask in events:
                    kind = key.data
                    if isinstance(kind, _Conn):
                        self._io(kind, mask)
                    elif kind[0] == "listen":
                        self._accept(key.fileobj, kind[1])
                    else:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                now = self.clock()
                if now >= next_tick:
                    next_tick = now + self.tick_s
                    self._tick(now)
                if self._delivered != delivered:
                    self._counters["batches"] += 1
                    if self.on_batch is not None:
                        self.on_batch()
                self._pump()
        except BaseException as e:  # noqa: BLE001 - kept for the owner to see
            self.error = e
            log.exception("the FIX engine stopped on an error")
        finally:
            for c in list(self._conns.values()):
                self._drop(c, "stopped")
            try:
                self.store.flush()
            except OSError:
                log.exception("could not flush the FIX sequence store")

    def _pump(self) -> None:
        """Flush the seq store, then write every session's answers and close what must
        close."""
        self.store.flush()
        for c in list(self._conns.values()):
            s = c.session
            if s is not None and s.outbox:
                for m in s.outbox:
                    c.out += m
                s.outbox.clear()
            if c.out and not c.connecting:
                self._write(c)
            if c in self._conns.values() and (c.closing or (s is not None and s.closing)):
                if c.out:
                    self._write(c)
                self._drop(c, s.close_reason if s is not None else "closed")

    def _tick(self, now: float) -> None:
        for c in list(self._conns.values()):
            if c.session is not None:
                c.session.tick()
            elif not c.connecting and now - c.t0 > self._logon_timeout(c):
                self._counters["logon_timeout"] += 1
                c.closing = True

    def _logon_timeout(self, c: _Conn) -> float:
        return max([x.logon_timeout_s for x in self.configs] or [10.0])

    # ---------------------------------------------------------------------- accept
    def _accept(self, lsock: Any, listen: str) -> None:
        for _ in range(64):
            try:
                sock, addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept on %s: %s", listen, e)
                return
            if len(self._conns) >= self.max_connections:
                self._counters["connections_refused"] += 1
                log.warning("FIX: connection from %s refused: %d connections already",
                            addr[0], len(self._conns))
                sock.close()
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = _Conn(sock, addr[0], self.max_message, self.clock())
            self._conns[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)
            self._counters["accepted"] += 1

    def _match(self, c: _Conn, msg: FixMessage, listen: str | None) -> Session | None:
        sender, target = msg.get(49), msg.get(56)
        bs = msg.get(8)
        for cfg in self.configs:
            if (cfg.role == "acceptor" and cfg.target_comp_id == sender
                    and cfg.sender_comp_id == target and cfg.begin_string == bs
                    and (listen is None or cfg.listen == listen)):
                return self.sessions[cfg.key]
        return None

    def _refuse(self, c: _Conn, msg: FixMessage, counter: str, text: str) -> None:
        """Answer a Logon we cannot take with a Logout (from the CompIDs it named) and
        close."""
        self._counters[counter] += 1
        log.warning("FIX: Logon from %s refused: %s (%s)", c.peer, text,
                    msg.raw[:160].replace(b"\x01", b"|"))
        bs = msg.get(8) or "FIX.4.4"
        c.out += encode(bs, "5", [(58, text)], sender=msg.get(56) or "?",
                        target=msg.get(49) or "?", seq=1)
        c.closing = True

    def _first(self, c: _Conn, items: list[FixMessage | FixError]) -> None:
        """The first messages of an accepted connection: its Logon chooses the session."""
        i = 0
        while i < len(items) and isinstance(items[i], FixError):
            self._counters["pending_garbage"] += 1
            i += 1
        if i == len(items):
            return
        msg = items[i]
        assert isinstance(msg, FixMessage)
        if msg.msg_type != "A":
            self._counters["not_logon_first"] += 1
            log.warning("FIX: %s sent %r before a Logon: closed", c.peer, msg.msg_type)
            c.closing = True
            return
        listen = None
        for lst, addr in self._bound.items():
            if addr[1] == c.sock.getsockname()[1]:
                listen = lst
        s = self._match(c, msg, listen)
        if s is None:
            self._refuse(c, msg, "unknown_comp_id",
                         f"unknown session {msg.get(8)}:{msg.get(56)}->{msg.get(49)}")
            return
        cfg = s.config
        if cfg.allowed and c.peer not in cfg.allowed:
            self._refuse(c, msg, "address_not_allowed", f"address {c.peer} not allowed")
            return
        other = self._by_session.get(cfg.key)
        if other is not None and other is not c:
            self._refuse(c, msg, "already_logged_on", "session already logged on")
            return
        c.session = s
        self._by_session[cfg.key] = c
        s.logon(msg)
        s.receive(items[i + 1:])

    # --------------------------------------------------------------------------- I/O
    def _io(self, c: _Conn, mask: int) -> None:
        if c.connecting:
            self._connected(c)
            return
        if mask & selectors.EVENT_WRITE and c.out:
            self._write(c)
        if not mask & selectors.EVENT_READ or c.closing:
            return
        try:
            data = c.sock.recv(self.read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(c, f"read: {e}")
            return
        if not data:
            self._drop(c, "closed by the counterparty")
            return
        items = c.reader.feed_batch(data)
        if not items:
            return
        try:
            if c.session is None:
                self._first(c, _expand(items))
            else:
                c.session.receive(items)
        except Exception:
            self._counters["app_errors"] += 1
            log.exception("FIX %s: the application failed on a message; disconnecting",
                          c.session.config.key if c.session else c.peer)
            c.closing = True

    def _write(self, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as e:
            c.out.clear()
            c.closing = True
            log.info("FIX %s: write: %s", c.peer, e)
            return
        del c.out[:n]
        if len(c.out) > self.max_outbuf:
            self._counters["slow_consumer"] += 1
            c.out.clear()
            c.closing = True
            return
        try:
            self._sel.modify(c.sock, selectors.EVENT_READ | (
                selectors.EVENT_WRITE if c.out else 0), c)
        except (KeyError, ValueError, OSError):
            pass

    def _drop(self, c: _Conn, reason: str) -> None:
        fd = None
        for k, v in list(self._conns.items()):
            if v is c:
                fd = k
        if fd is None:
            return
        del self._conns[fd]
        try:
            self._sel.unregister(c.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            c.sock.close()
        except OSError:
            pass
        s = c.session
        if s is not None:
            if self._by_session.get(s.config.key) is c:
                del self._by_session[s.config.key]
            log.info("FIX %s: disconnected (%s)", s.config.key, reason)
            s.disconnected()
            if s.config.role == "initiator":
                st = self._initiators[s.config.key]
                if s.counters["logons"] > c.logons0:  # it logged on: start the backoff again
                    st[1] = s.config.reconnect_s
                st[0] = self.clock() + st[1]
                st[1] = min(st[1] * 2, s.config.reconnect_max_s)

    # ---------------------------------------------------------------------- initiators
    def _connect_due(self) -> None:
        now = self.clock()
        for key, st in self._initiators.items():
            if key in self._by_session or now < st[0]:
                continue
            s = self.sessions[key]
            if len(self._conns) >= self.max_connections:
                self._counters["connections_refused"] += 1
                st[0] = now + st[1]
                continue
            host, port = s.config.connect_addr
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            sock.setblocking(False)
            err = sock.connect_ex((host, port))
            if err not in (0, errno.EINPROGRESS, errno.EWOULDBLOCK):
                sock.close()
                self._counters["connect_failures"] += 1
                st[0] = now + st[1]
                st[1] = min(st[1] * 2, s.config.reconnect_max_s)
                continue
            c = _Conn(sock, host, self.max_message, now)
            c.connecting = True
            c.session = s
            c.logons0 = s.counters["logons"]
            self._conns[sock.fileno()] = c
            self._by_session[key] = c
            self._sel.register(sock, selectors.EVENT_WRITE, c)

    def _connected(self, c: _Conn) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        s = c.session
        assert s is not None
        if err:
            self._counters["connect_failures"] += 1
            log.info("FIX %s: connect to %s: %s", s.config.key, s.config.connect,
                     errno.errorcode.get(err, err))
            self._drop(c, "connect failed")
            return
        c.connecting = False
        self._counters["connects"] += 1
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sel.modify(c.sock, selectors.EVENT_READ, c)
        s.connected()


def _expand(items: list) -> list[FixMessage | FixError]:
    """Runs (:class:`exposure.fix.fast.FixRun`) as their messages, one by one."""
    out: list[FixMessage | FixError] = []
    for it in items:
        if isinstance(it, FixRun):
            out += [it.message(i) for i in range(it.n)]
        else:
            out.append(it)
    return out
