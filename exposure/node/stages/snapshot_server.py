"""Snapshot stage: the node's recovery server, every published row as of a gseq over TCP.

A receiver that joins late or lost datagrams asks for a snapshot (docs/feed.md; the formats
are :mod:`exposure.feed.wire`): it connects to ``[fanout] snapshot_host:snapshot_port`` and
sends one 16-byte ``SNAP_REQUEST`` (magic ``SNAP_REQUEST_MAGIC``, version ``FEED_VERSION``,
two reserved words); the server answers a 32-byte ``SNAP_HEADER`` (epoch, gseq, count,
status, version, row size, taken_ns) and ``count`` rows of ``ROW_SIZE`` bytes, then closes.
The rows are every published account, the fund (account -1), every instrument and every
sector row that ever moved (gseq != 0), then (feed version 4) every position cell that
ever moved (in use, or freed by a roll: account -1) and the limits of every account that
ever moved, untagged (session ``NO_SESSION``) and stamped with
the header's epoch, read with :func:`exposure.engine.publish.gather_rows` (row seqlocks: the
server never waits for compute, and only reads the tally segment, which may be mapped
read-only). The header's gseq is read before the rows: every row includes every event up to
it (a row may be newer; a receiver keeps, per row, the one with the highest gseq).

Statuses: ``SNAP_OK``; ``SNAP_NOT_PRIMARY`` from a backup or, in a pair, from a primary
that may not act (:func:`exposure.shm.control.may_act`: its fence expired), so the receiver
asks the other node; ``SNAP_BUSY`` when ``max_clients`` connections are open;
``SNAP_NOT_READY`` when the node's epoch or role changed while the rows were read. Every
status but OK has no rows. A request that does not parse (magic, version, or more than 16
bytes) is closed unanswered; its two reserved words are not looked at.

**Bounded** (anyone who can reach the port may connect; the stage's process polls every
~500 us and no poll may block):

* at most ``max_clients`` connections; a further one gets a BUSY header (as far as a
  non-blocking send takes it) and is closed;
* the request must arrive within ``_REQUEST_NS`` (2 s) of the accept, and the whole answer
  must be handed to the kernel within ``deadline_s`` of it; past either, the connection
  is closed (``timeouts``); a client that never reads is therefore dropped;
* at most ``_ACCEPTS_PER_POLL`` accepts and ``_SEND_PER_POLL`` bytes sent per poll, shared
  round-robin between the clients being answered;
* memory: one preallocated rows buffer (every row of the state) to gather into, and one
  response (header + rows) per connection; connections whose requests see the same epoch
  and gseq share one response, so at most ``max_clients`` responses exist at once;
* running out of descriptors is survived by :class:`exposure.net.guard.Listener`.

A client's misbehaviour (a reset, a half-close, garbage, a slow or absent reader) closes
that client only and never raises out of :meth:`SnapshotServer.poll`. Counters (attributes,
for tests and the status page): ``served``, ``refused_busy``, ``refused_not_primary``,
``not_ready``, ``bad_requests``, ``timeouts``, ``accepted``, ``emfile``,
``accept_errors``. Events are logged at most once per ``_LOG_EVERY_S`` per kind.
"""

from __future__ import annotations

import logging
import select
import socket
import time

import numpy as np

from exposure.core import jit as _jit
from exposure.core.types import (
    INSTPUB_DTYPE,
    INSTRUMENT_ROW_DTYPE,
    LIMITS_ROW_DTYPE,
    POSITION_ROW_DTYPE,
    POSPUB_DTYPE,
    PUBROW_DTYPE,
    ROW_SIZE,
    SECPUB_DTYPE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.publish import gather_rows, versions
from exposure.feed.wire import (
    FEED_VERSION,
    SNAP_BUSY,
    SNAP_HEADER,
    SNAP_MAGIC,
    SNAP_NOT_PRIMARY,
    SNAP_NOT_READY,
    SNAP_OK,
    SNAP_REQUEST,
    SNAP_REQUEST_MAGIC,
)
from exposure.net.conn import Conn, Conns, discard
from exposure.net.guard import Listener, RateLog
from exposure.node.stages.agent import Stage
from exposure.shm import counters_layout as CN
from exposure.shm.control import CTL_EPOCH, CTL_ROLE, ROLE_PRIMARY, may_act

__all__ = ["SnapshotServer", "COUNTERS"]

log = logging.getLogger(__name__)

_ACCEPTS_PER_POLL = 4
_SEND_PER_POLL = 1 << 20        # bytes handed to the kernel per poll, all clients together
_REQUEST_NS = 2_000_000_000     # the request within this of the accept, or closed
_REQ_READ = 64                  # read per recv while waiting for the request (more than a
                                # request's 16 bytes: a longer one is seen and refused)
_DISCARD = 4096                 # read and dropped before a close, so that it is a FIN
_LISTEN_BACKLOG = 64
_LOG_EVERY_S = 5.0
_EPOCH_MASK = 0xFFFFFFFF        # the header's epoch is a u4
_STATUS_AT = 20                 # the header's status byte

_SERVED = CN.INDEX["snapshot_served_total"]
_REFUSED = CN.INDEX["snapshot_refused_total"]
COUNTERS = ("accepted", "served", "refused_busy", "refused_not_primary", "not_ready",
            "bad_requests", "timeouts", "emfile", "accept_errors")


class _Client(Conn):
    """A connection to the recovery server (``since``: accepted)."""

    __slots__ = ("req", "resp", "sent")

    def __init__(self, sock: socket.socket, addr, now: int):
        super().__init__(sock, addr, now)
        self.req = b""       # the request's bytes so far
        self.resp = None     # the response (bytes-like), once the request is answered
        self.sent = 0        # bytes of ``resp`` handed to the kernel


_peer = Conn.peer  # _peer(c): "host:port" of a client


class SnapshotServer(Stage):
    """The recovery server (see the module docstring). ``state``: the tally state (a
    read-only mapping is enough); ``ctl``: the node's control words; ``pair``: a replicated
    node, whose primary answers only while it may act."""

    name = "snapshot"

    def __init__(self, host: str, port: int, state, ctl: np.ndarray, pair: bool = False,
                 max_clients: int = 8, deadline_s: float = 10.0,
                 counters: np.ndarray | None = None, words: np.ndarray | None = None,
                 positions: bool = True):
        self.cnt = CN.or_private(counters)
        if max_clients < 1:
            raise ValueError(f"max_clients = {max_clients}: at least 1")
        self.st = state
        self.ctl = ctl
        self.pair = pair
        self.max_clients = max_clients
        self.deadline_ns = int(deadline_s * 1e9)
        # Counters (COUNTERS; see the module docstring).
        self.accepted = self.served = self.refused_busy = self.refused_not_primary = 0
        self.not_ready = self.bad_requests = self.timeouts = 0
        self.emfile = self.accept_errors = 0
        self.log = RateLog(log, _LOG_EVERY_S)
        st = state
        # Every row: accounts and the fund, instruments, sectors, position cells (with
        # ``positions``), limits. ``words``: the tally segment's header words (the state
        # seqlock the limits are read under; None: a private one, for a state no batch
        # writes concurrently).
        self.positions = 1 if positions else 0
        self.nrows = (st.pub.shape[0] + st.ipub.shape[0] + st.spub.shape[0]
                      + (st.cpub.shape[0] if positions else 0) + st.acc.shape[0])
        # One rows buffer, gathered into per snapshot (then copied into the response; its
        # pages are touched only as far as rows are gathered).
        self.row_words = np.zeros((self.nrows, ROW_SIZE // 8), np.uint64)
        flat = self.row_words.reshape(-1)
        self.row_bytes = memoryview(flat.view(np.uint8))
        self.arows = flat.view(UPDATE_DTYPE)
        vers = versions(st)
        seg_words = words if words is not None else np.zeros(32, np.uint64)
        self._gather_args = (st, vers.pub, vers.ipub, vers.spub, vers.cpub, seg_words)
        self._gather_bufs = (self.arows, flat.view(INSTRUMENT_ROW_DTYPE),
                             flat.view(SECTOR_ROW_DTYPE), flat.view(POSITION_ROW_DTYPE),
                             flat.view(LIMITS_ROW_DTYPE), np.zeros(1, PUBROW_DTYPE),
                             np.zeros(1, INSTPUB_DTYPE), np.zeros(1, SECPUB_DTYPE),
                             np.zeros(1, POSPUB_DTYPE))
        # Compiled (or loaded) now, not at the first request.
        self._gather = _jit.entry(gather_rows, *self._gather_args, 0, 0, 0, 0,
                                  *self._gather_bufs)
        self._cache: tuple[tuple[int, int], bytearray] | None = None  # (epoch, gseq), answer
        self._idle = 0  # passes since the listener was last looked at (while no client)
        self._turn = 0  # round-robin start among the clients being answered
        self.ep = select.epoll()
        self.clients: Conns = Conns(self.ep)  # fd -> _Client
        try:
            self.listener: Listener | None = Listener((host, port), _LISTEN_BACKLOG)
        except OSError as e:  # never take the process (the journal's) down for it: the
            self.listener = None  # feed goes on without recovery, and the log says so
            self.port = 0
            self.log("bind", f"recovery server: cannot listen on {host}:{port} "
                             f"({e.strerror or e}); subscribers cannot recover from this "
                             "node")
            return
        self.port = self.listener.sock.getsockname()[1]
        try:
            self.ep.register(self.listener.fd, select.EPOLLIN)
        except OSError:
            self.ep.close()
            self.listener.close()
            raise

    # ------------------------------------------------------------------ the loop
    def poll(self) -> int:
        """One pass: accepts, requests, sends, deadlines; returns the work done (0 idle).
        Never blocks, never raises for anything a client does."""
        if self.listener is None:
            return 0
        if not self.clients:  # idle: look at the listener on every 8th pass only (a few ms
            self._idle = (self._idle + 1) & 7  # late for a snapshot; it shares the
            if self._idle:                     # clients' core on a small host)
                return 0
        try:
            events = self.ep.poll(0)
        except InterruptedError:
            events = []
        now = time.monotonic_ns()
        work = 0
        sending: list[_Client] = []
        for fd, _ev in events:
            if fd == self.listener.fd:
                work += self._accept(now)
                continue
            c = self.clients.get(fd)
            if c is None:
                continue
            if c.resp is None:
                work += self._read(c)
            if c.resp is not None and self.clients.get(c.fd) is c:
                sending.append(c)
        if sending:
            work += self._send(sending)
        if self.clients:
            work += self._expire(now)
        else:
            self._cache = None  # nobody holds it any more: free the memory
        if work:  # the shared counters (exposure status, metrics)
            self.cnt[_SERVED] = self.served
            self.cnt[_REFUSED] = (self.refused_busy + self.refused_not_primary
                                  + self.not_ready + self.bad_requests)
        return work

    def _event(self, kind: str, msg: str) -> None:
        """Count an event of ``kind`` and log it, rate-limited per kind."""
        setattr(self, kind, getattr(self, kind) + 1)
        self.log(kind, msg)

    # ------------------------------------------------------------------ connections
    def _accept(self, now: int) -> int:
        work = 0
        lis = self.listener
        for _ in range(_ACCEPTS_PER_POLL):
            got = lis.accept_addr(self.log)
            if got is None:
                break
            work += 1
            s, addr = got
            self.accepted += 1
            if len(self.clients) >= self.max_clients:
                self._event("refused_busy", f"{len(self.clients)} snapshot connections "
                            f"open (the cap): answered BUSY to {addr[0]}:{addr[1]}")
                try:
                    s.send(self._header(SNAP_BUSY, int(self.ctl[CTL_EPOCH]), 0, 0))
                except OSError:
                    pass
                self._close_sock(s)
                continue
            c = _Client(s, addr, now)
            try:
                self.clients.add(c)
            except OSError:
                s.close()
                continue
        if lis.fd_limit or lis.accept_errors:
            work += lis.fd_limit
            self.emfile += lis.fd_limit
            self.accept_errors += lis.accept_errors
            lis.fd_limit = lis.accept_errors = 0
        return work

    @staticmethod
    def _close_sock(s: socket.socket) -> None:
        """Close, after reading what the peer sent (unread bytes would make it a reset,
        which can destroy what is still on its way to the peer)."""
        discard(s, _DISCARD)
        s.close()

    def _close(self, c: _Client) -> None:
        if not self.clients.drop(c):
            return  # closed already (its descriptor number may belong to a newer client)
        c.resp = None
        self._close_sock(c.sock)

    def _expire(self, now: int) -> int:
        work = 0
        for c in list(self.clients.values()):
            age = now - c.since
            if c.resp is None and age > _REQUEST_NS:
                why = f"no request within {_REQUEST_NS / 1e9:g} s"
            elif age > self.deadline_ns:
                why = (f"{c.sent} of {len(c.resp or b'')} bytes sent in "
                       f"{self.deadline_ns / 1e9:g} s")
            else:
                continue
            peer = _peer(c)
            self._close(c)  # closed first: a reader that sees the count sees it gone
            self._event("timeouts", f"closed snapshot client {peer}: {why}")
            work += 1
        return work

    # ------------------------------------------------------------------ requests
    def _read(self, c: _Client) -> int:
        data = c.recv(_REQ_READ - len(c.req))
        if data is None:
            return 0
        if not data:  # closed, reset or half-closed before a whole request
            self._close(c)
            return 1
        c.req += data
        n = len(c.req)
        if n >= 4 and int.from_bytes(c.req[:4], "little") != SNAP_REQUEST_MAGIC:
            return self._bad(c, "not a snapshot request")
        if n > SNAP_REQUEST.size:
            return self._bad(c, f"a request of {n} bytes or more ({SNAP_REQUEST.size} "
                             "expected)")
        if n < SNAP_REQUEST.size:
            return 1
        _magic, version, _r0, _r1 = SNAP_REQUEST.unpack(c.req)
        if version != FEED_VERSION:
            return self._bad(c, f"request version {version}, this node speaks "
                             f"{FEED_VERSION}")
        try:
            c.resp = self._answer()
        except Exception as e:  # (never out of poll: this client only)
            self.log("error", f"cannot build a snapshot: {e!r}")
            self._close(c)
            return 1
        c.sent = 0
        try:
            self.ep.modify(c.fd, select.EPOLLOUT)
        except OSError:
            self._close(c)
        return 1

    def _bad(self, c: _Client, why: str) -> int:
        peer = _peer(c)
        self._close(c)  # closed first: a reader that sees the count sees it gone
        self._event("bad_requests", f"closed snapshot client {peer}: {why}")
        return 1

    # ------------------------------------------------------------------ answers
    @staticmethod
    def _header(status: int, epoch: int, gseq: int, count: int,
                taken_ns: int = 0) -> bytes:
        return SNAP_HEADER.pack(SNAP_MAGIC, epoch & _EPOCH_MASK, gseq, count, status,
                                FEED_VERSION, ROW_SIZE, taken_ns or time.time_ns())

    def _may_serve(self) -> bool:
        ctl = self.ctl
        if int(ctl[CTL_ROLE]) != ROLE_PRIMARY:
            return False
        return not (self.pair and not may_act(ctl, time.monotonic_ns()))

    def _answer(self):
        """The response to a valid request (bytes-like, never modified afterwards)."""
        ctl = self.ctl
        epoch, role = int(ctl[CTL_EPOCH]), int(ctl[CTL_ROLE])
        if not self._may_serve():
            self._event("refused_not_primary", "answered NOT_PRIMARY (this node is not a "
                        "primary that may act)")
            return self._header(SNAP_NOT_PRIMARY, epoch, 0, 0)
        # The gseq before any row: the counters row is the last row compute publishes for
        # a batch (exposure.engine.publish.publish_batch: accounts, fund, instruments, sectors,
        # cells, counters), so every row read after it includes every event up to it. (The
        # fund row's gseq is written before the batch's instrument and sector rows.)
        gseq = int(self.st.ctrpub[0]["gseq"])
        key = (epoch, gseq)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        taken = time.time_ns()
        m, _ = self._gather(*self._gather_args, 0, self.nrows, self.nrows, self.positions,
                            *self._gather_bufs)
        if int(ctl[CTL_EPOCH]) != epoch or int(ctl[CTL_ROLE]) != role:
            self._event("not_ready", "answered NOT_READY: the node's epoch or role changed "
                        "while the snapshot was read")
            return self._header(SNAP_NOT_READY, int(ctl[CTL_EPOCH]), 0, 0)
        m = int(m)
        self.arows["epoch"][:m] = epoch & _EPOCH_MASK  # as the fan-out stamps its rows
        size = SNAP_HEADER.size + m * ROW_SIZE
        out = bytearray(size)
        SNAP_HEADER.pack_into(out, 0, SNAP_MAGIC, epoch & _EPOCH_MASK, gseq, m, SNAP_OK,
                              FEED_VERSION, ROW_SIZE, taken)
        memoryview(out)[SNAP_HEADER.size:] = self.row_bytes[:m * ROW_SIZE]
        self._cache = (key, out)
        return out

    def _send(self, sending: list[_Client]) -> int:
        """Hand the kernel what it takes of each answer, at most _SEND_PER_POLL bytes in
        all, starting with a different client each poll."""
        work = 0
        budget = _SEND_PER_POLL
        k = len(sending)
        self._turn = (self._turn + 1) % k if k else 0
        for j in range(k):
            if budget <= 0:
                break
            c = sending[(self._turn + j) % k]
            if self.clients.get(c.fd) is not c or c.resp is None:
                continue
            left = len(c.resp) - c.sent
            chunk = min(left, budget)
            n = c.send_now(memoryview(c.resp)[c.sent:c.sent + chunk])
            if n is None:  # reset, broken pipe: this client only
                self._close(c)
                work += 1
                continue
            if not n:  # (the socket takes nothing now)
                continue
            work += 1
            budget -= n
            c.sent += n
            if c.sent >= len(c.resp):
                if c.resp[_STATUS_AT] == SNAP_OK:  # (NOT_PRIMARY, NOT_READY: not served)
                    self.served += 1
                self._close(c)
        return work

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        for c in list(self.clients.values()):
            self._close(c)
        self._cache = None
        try:
            self.ep.close()
        finally:
            if self.listener is not None:
                self.listener.close()
                self.listener = None


assert _jit is not None
