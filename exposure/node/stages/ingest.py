"""Ingest stage: TCP sessions from upstream systems into the compute ring.

**Sessions** (:mod:`exposure.net.wire`). On every connection the node first sends a CHALLENGE
(a fresh nonce); the client logs in with its session id and an HMAC of the nonce under the
session's secret (:mod:`exposure.net.sessions`; a node without a sessions file serves loopback
clients without one). It is told the last session seq the node holds. Its EVENTS frames
carry records numbered by session seq: a record at or below what the node holds is a
resend and is dropped; the next one is taken; any other seq closes the session with a
REJECT naming the expected seq. Ingest stamps each taken record with the session id, the
receive time and the next global seq, marks it unauthorized when the session is not
entitled to it (or wrong_partition when the node is a cluster's partition that does not
own it: exposure.core.partition), and pushes it to the compute ring; when the ring is full
the session's
records wait (and its socket is not read) until there is room. The node acknowledges to
each session the highest seq that compute has processed, with the session's rejects per
reason; while events stream, ACKs are coalesced to one per session per ``ack_interval_us``
(each is a send on the hot path), and the last one follows within that interval. A session
that logged in with the LOGIN_REJECTED flag gets, just before each ACK, a REJECTED frame
listing the (seq, reason) of every event the ACK newly covers that was rejected, read from
compute's reject log (:mod:`exposure.shm.reject_layout`; nothing is read for a session
with no new rejects).

Complete EVENTS frames go from the receive buffer to the ring in one jitted scan per read
(:mod:`exposure.node.stages.ingest_scan`); where the process runs compute and the fan-out
right after ingest, the same call goes on with their pass (``down``:
:mod:`exposure.node.stages.fused`). Login, heartbeat and anything malformed are handled
here in Python.

**Hostile input is normal input.** No byte a client sends can harm the node or another
session: a malformed frame after login gets a REJECT and the session is closed; before
login nothing is answered but the login itself, and anything else closes the connection.
Every resource is bounded (:class:`PortLimits`): the number of connections (at the cap
the oldest connection that has not logged in makes room, so a flood cannot lock real
sessions out; the descriptor limit is survived: :class:`exposure.net.guard.Listener`), a
login deadline, an idle timeout plus TCP keepalive, the bytes read and control frames
handled per connection per pass, and the answers queued for a client (one that does not
read them is disconnected, never waited for). Nothing here blocks: a REJECT is queued
like any answer, the write side is shut once it is out, and the connection is closed when
the client has gone or after a second. Counters of all of it are in the session table
(:mod:`exposure.shm.session_layout`, ``exposure status``).

**Roles** (a node of a primary/backup pair reads its role from the control block): a
backup does not listen for sessions at all (clients fail over to the primary); its ingest
runs the replica side of the link instead (:mod:`exposure.node.stages.replica`), which puts the
primary's records into the same rings. When the supervisor promotes the node, ingest
closes the replica side, opens the session port and continues the global sequence from
the last record it received.

**Release policy**: a session's seq is acknowledged when compute has processed it and,
per ``release``, it is durable here (``local``), the backup has received it
(``replicated``), or both (``replicated+local``). For the replicated part ingest keeps,
per session, checkpoints (last gseq, last session seq) of what it pushed; a checkpoint is
released once the backup's received gseq (``CTL_REPL_RECV``) reaches it. What a session
held at login counts as pushed at the gseq before the login, so after a restart or a
failover nothing is acknowledged that the backup may not hold.

In a pair, two more rules (:mod:`exposure.pair.election`): a primary recorded in etcd as
**running alone** (``CTL_ALONE``) releases on its own durability whatever the policy; and a
primary that is not alone acknowledges nothing once its **fence** has expired (no echo of
its heartbeats from the backup for about ``failover_ms``): the backup may be promoting.
"""

from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np
from numba import njit

from exposure.core import jit as _jit  # noqa: F401  (sets numba's cache directory before this module's kernels)
from exposure.net import wire as W
from exposure.net.conn import GONE, SLOW, Conn, Conns
from exposure.net.guard import Listener, RateLog, keepalive
from exposure.net.hosts import client_host
from exposure.net.sessions import Entitlements
from exposure.node.stages.agent import Stage
from exposure.node.stages.ingest_scan import NEED_MORE, RES_WORDS, RING_FULL, SEQ_GAP, scan
from exposure.node.stages.sequencer import Sequencer
from exposure.shm import counters_layout as CN
from exposure.shm import reject_layout as RJ
from exposure.shm import session_layout as SL
from exposure.shm.control import (
    CTL_ALONE,
    CTL_ALONE_SEEN,
    CTL_EPOCH,
    CTL_FENCED,
    CTL_REPL_RECV,
    CTL_ROLE,
    CTL_SEQUENCED,
    ROLE_BACKUP,
    ROLE_PRIMARY,
    may_act,
)
from exposure.shm.handle import Handle, bind, members
from exposure.shm.intrinsics import clock_realtime_ns
from exposure.shm.ipc_layout import W_SLEEPING, W_TAIL, IpcError, IpcRing, ipc_name
from exposure.shm.session_layout import N_PROCESSED, N_REJ, S_DONE, S_DURABLE, S_HELD, S_REJ

__all__ = ["IngestStage", "PortLimits", "scan_bound"]

log = logging.getLogger(__name__)

_HDR = W.HEADER.size
_MARK_NS = 100_000   # replicated-release checkpoints: at most one per session per 100 us
_MAX_MARKS = 4096
_PRE, _LIVE, _CLOSING = 0, 1, 2
_PRE_BUF = 4096      # a connection's buffer until it has logged in (a LOGIN is 48 bytes)
_LINGER_NS = 1_000_000_000  # a closing connection gets this long to take its REJECT
_END_NS = 5_000_000_000     # a session whose input ended: at most this long to finish
_SWEEP_NS = 50_000_000      # deadlines are checked this often
_ACCEPTS_PER_PASS = 8  # each accept costs the hot loop ~100-200 us of syscalls on this VM


@dataclass(frozen=True)
class PortLimits:
    """The bounds of a session port (``[ingest]`` keys of the same names)."""

    max_connections: int = 320     # open connections, logged in or not
    login_timeout_ms: int = 5000   # from accept to a valid LOGIN
    idle_timeout_ms: int = 30000   # nothing received (clients send HEARTBEATs when idle)
    # Bytes read per connection per pass: 8,192 records, one batch of compute's. Under load a
    # bigger batch conflates more rows (0.87 against 1.34 an event at 2 M events/s):
    # docs/performance.md, the fourteenth session.
    read_budget: int = 1024 * 1024
    control_budget: int = 64       # frames other than EVENTS handled per connection per pass
    max_output: int = 64 * 1024    # answers queued for a client that does not read them
    ipc_ring_kb: int = 1024        # an IPC session's ring (exposure.shm.ipc_layout)

    @property
    def buffer(self) -> int:
        """A logged-in connection's receive buffer: a maximal frame plus one read."""
        return -(-(_HDR + W.MAX_PAYLOAD + self.read_budget) // 8) * 8


class _Conn(Conn):
    """A session connection (``since``: accepted; ``out``: answers queued, at most
    ``max_output``)."""

    __slots__ = ("buf", "wbuf", "mv", "mv0", "hbuf", "pos", "fill", "stalled", "session", "row",
                 "held", "acked", "ack_due", "marks", "mark_ns", "repl", "state", "nonce",
                 "last_rx", "rx", "close_at", "flags", "rcur", "rupto", "ipc", "ring",
                 "rhead")

    def __init__(self, sock: socket.socket, now: int, max_out: int, budget: int,
                 ipc: bool = False):
        super().__init__(sock, None, now, max_out)
        self._buffer(_PRE_BUF, budget)
        self.pos = 0       # next unconsumed byte of buf
        self.fill = 0      # bytes received into buf
        self.stalled = False  # the ring was full: frames wait in buf, the socket is not read
        self.session = 0
        self.row = None    # its session's row of the session table (a memoryview: cheap reads)
        self.held = 0
        self.acked = -1
        self.ack_due = 0   # monotonic ns before which no further ACK is sent (coalescing)
        self.marks: deque = deque()  # (last gseq, session seq held): see IngestStage._mark
        self.mark_ns = 0
        self.repl = 0      # highest session seq the backup has received
        self.state = _PRE
        self.nonce = os.urandom(W.NONCE)
        self.last_rx = now  # monotonic ns, as of the last deadline sweep that saw reads
        self.rx = False    # bytes read since that sweep (no clock read per receive)
        self.close_at = 0
        self.flags = 0     # the LOGIN's flags (W.LOGIN_REJECTED: REJECTED frames)
        self.rcur = 0      # the reject log's next entry not yet sent (an index, not a slot)
        self.rupto = 0     # the last REJECTED's upto (at login: the log's base)
        self.ipc = ipc     # came in on the IPC socket: after login, frames come by ring
        self.ring: IpcRing | None = None  # its ring once logged in
        self.rhead = 0     # the ring's bytes taken (the node's own count, never read back)

    def _buffer(self, size: int, budget: int) -> None:
        old = getattr(self, "buf", None)
        self.buf = np.zeros(size, np.uint8)  # pages are touched only as far as frames go
        if old is not None:
            n = self.fill - self.pos
            self.buf[:n] = old[self.pos:self.fill]
            self.pos, self.fill = 0, n
        self.wbuf = self.buf.view(np.uint64)
        self.mv = memoryview(self.buf)
        self.mv0 = self.mv[:budget]  # what one read takes into an empty buffer
        self.hbuf = Handle(self.buf, self.wbuf)  # the scan's view of it (exposure.shm.handle)


_EVENTS = CN.INDEX["ingest_events_total"]
_RECEIVED = CN.INDEX["ingest_received_gseq"]


@njit(cache=True, _nrt=False)
def scan_bound(h, b, pos, fill, session, held, gseq):
    """:func:`exposure.node.stages.ingest_scan.scan` over a connection's buffer handle ``b``
    (its bytes and words) and the stage's handle ``h`` (the ring, the entitlements, the
    partition, the result words, the session table, the counters), the records stamped
    with the clock read here (``CLOCK_REALTIME``, as ``time.time_ns()``: one read from
    Python costs more); what it pushed is counted (the sequencer's counters) and the
    session's held seq stored here. Returns the result words (why, pos, held, pushed,
    compute asleep, journal asleep, expected seq)."""
    now = clock_realtime_ns()
    buf, wbuf = members(b)
    ctrl, slots, eflags, esrc, eacct, me, acc_owner, src_owner, res, sess, cnt = members(h)
    scan(buf, wbuf, pos, fill, session, held, now, gseq, ctrl, slots, eflags, esrc, eacct,
         me, acc_owner, src_owner, res)
    pushed = np.int64(res[3])
    if pushed > 0:
        cnt[_EVENTS] += np.uint64(pushed)
        cnt[_RECEIVED] = np.uint64(gseq + pushed - 1)
        sess[session, S_HELD] = res[2]
    return (np.int64(res[0]), np.int64(res[1]), res[2], pushed, np.int64(res[4]),
            np.int64(res[5]), res[6])


_RING_FULL = CN.INDEX["ingest_ring_full_total"]
_LISTENING = CN.INDEX["ingest_listening"]


class IngestStage(Stage):
    name = "ingest"

    def __init__(self, host: str, port: int, sessions: np.ndarray, out_ring, next_gseq: int,
                 max_sessions: int, ack_interval_us: int = 0,
                 ctl: np.ndarray | None = None, release: str = "local", replica=None,
                 secrets: dict[int, bytes] | None = None,
                 entitlements: Entitlements | None = None,
                 limits: PortLimits = PortLimits(), counters: np.ndarray | None = None,
                 partition: tuple[int, np.ndarray, np.ndarray] | None = None,
                 rejects: np.ndarray | None = None, ipc: bool = False):
        self.cnt = CN.or_private(counters)
        self.sessions = sessions
        # The reject log compute writes (exposure.shm.reject_layout): None (a stage built
        # without one) refuses the LOGIN_REJECTED flag.
        self.rlog = rejects
        self.out = out_ring
        self.seq = Sequencer(out_ring, next_gseq, self.cnt)  # the gseq and the ring's producer
        self.max_sessions = max_sessions
        self.ack_interval_ns = ack_interval_us * 1000
        self.addr = (host, port)
        self.ctl = ctl
        # The journal reads the compute ring as its second consumer (none: no journal).
        self.local = release in ("local", "replicated+local") and out_ring.consumers > 1
        self.replicated = release in ("replicated", "replicated+local")
        # Sessions: ``secrets`` None serves every session id without a proof (loopback
        # only: exposure.config.node); else only the ids it has, each proving its secret.
        self.secrets = secrets
        self.ents = entitlements or Entitlements.everything(max_sessions)
        if sessions.shape[0] < max_sessions + 1:  # (the jitted scan writes a row per id)
            raise ValueError(f"a session table of {sessions.shape[0]} rows, max_sessions is "
                             f"{max_sessions}")
        if self.ents.flags.shape[0] != max_sessions + 1:
            raise ValueError(f"entitlements for {self.ents.flags.shape[0] - 1} sessions, "
                             f"max_sessions is {max_sessions}")
        self.lim = limits
        self.node = sessions[0]  # row 0: the port's counters
        self.log = RateLog(log)
        # A node of a pair acknowledges only while it may act (the fence, or running alone:
        # exposure.shm.control.may_act); alone, it releases on its own durability.
        self.pair = replica is not None and ctl is not None
        self.alone = -1 if self.pair else 0  # CTL_ALONE as last acted on (-1: not yet)
        self.fenced = False
        self.seq_shown = -1
        self.ep = select.epoll()
        self.listener: Listener | None = None
        self.lfd = -1
        # IPC sessions (exposure.shm.ipc_layout): a Unix socket beside the TCP port, where
        # a producer on this host logs in and then sends through a shared-memory ring
        self.ipc = ipc
        self.ulistener: Listener | None = None
        self.ufd = -1
        self.rings: set[_Conn] = set()     # logged-in IPC sessions whose ring is read
        self.conns: Conns = Conns(self.ep)  # fd -> _Conn
        self.pre: OrderedDict[int, _Conn] = OrderedDict()  # not logged in, oldest first
        self.by_session: dict[int, _Conn] = {}
        self.closing: set[_Conn] = set()   # REJECTed: the answer drains, then close
        self.ending: set[_Conn] = set()    # input ended: what it sent is taken, then close
        self.stalled: set[_Conn] = set()   # sessions whose frames wait for ring space
        self.ready: set[_Conn] = set()     # complete frames left over by a pass's budget
        self.unacked: set[_Conn] = set()   # sessions with records not yet acknowledged
        self.backlog: set[_Conn] = set()   # sessions with answers the socket did not take
        self.sweep_at = 0
        self._passes = 0   # after()'s passes, for the deadlines' clock
        # after()'s look at the ACKs: row 0 of the session table (a memoryview: cheap
        # reads), the key last looked at, and whether to look anyway next pass (an ACK
        # held back by the interval, a session with new records or newly logged in)
        self._gate = memoryview(sessions[0])
        self._seen: tuple = ()
        self._look = True
        self.scratch = bytearray(self.lim.read_budget)  # what closing connections send
        # A cluster's partition (index, account and source owner tables: exposure.core.partition)
        # marks what it does not own as wrong_partition; (-1, ...) is a whole-fund node.
        none = np.full(1, -1, np.int16)
        me, acc_owner, src_owner = partition or (-1, none, none)
        self._ent_args = (self.ents.flags, self.ents.src, self.ents.acct, np.int64(me),
                          acc_owner, src_owner)
        self.res = np.zeros(RES_WORDS, np.uint64)
        # Bound once (exposure.shm.handle): a scan passes this handle, the connection's
        # buffer handle and scalars.
        self.handle = Handle(self.out.ctrl, self.out.slots, *self._ent_args, self.res,
                             self.sessions, self.cnt)
        buf = np.zeros(8, np.uint8)
        self._scan = bind(scan_bound, self.handle, Handle(buf, buf.view(np.uint64)), 0, 0,
                          0, 0, 0)  # compiled (or loaded) now
        # A backup runs the replica side (``replica``: a factory Sequencer -> ReplicaStage)
        # until the supervisor promotes the node; ``self.rep`` is None once primary.
        self.rep = None
        # The compute and fan-out stage this one runs just before, in this process, when
        # the process builder chained them (exposure.node.stages.fused): a scan runs its
        # pass in the same call.
        self.down = None
        if ctl is not None and ctl[CTL_ROLE] == ROLE_BACKUP:
            self.rep = replica(self.seq)
        else:
            self._listen()

    def _count(self, col: int, session: int = 0, scol: int = -1) -> None:
        self.node[col] += 1
        if session and scol >= 0:
            self.sessions[session, scol] += 1

    def _listen(self) -> None:
        # The IPC socket first where its name is known (the configured port): a client that
        # finds the TCP port accepting then finds it too (it was opened after, and a client
        # trying IPC first could be refused in between).
        if self.addr[1]:
            self._listen_ipc(self.addr[1])
        self.listener = Listener(self.addr)
        self.lfd = self.listener.fd
        self.ep.register(self.lfd, select.EPOLLIN)
        if not self.addr[1]:  # (port 0: its number is known now)
            self._listen_ipc(self.listener.sock.getsockname()[1])
        self.cnt[_LISTENING] = 1  # bound and listening: what the supervisor calls ready

    def _listen_ipc(self, port: int) -> None:
        if not self.ipc or self.ulistener is not None:
            return
        name = ipc_name(client_host(self.addr[0]), port)
        try:
            self.ulistener = Listener(name)
        except OSError as e:
            log.warning("no IPC sessions: cannot listen on @%s (%s); TCP only", name[1:],
                        e.strerror)
        else:
            self.ufd = self.ulistener.fd
            self.ep.register(self.ufd, select.EPOLLIN)

    def _promoted(self) -> None:
        """The supervisor made this node the primary: stop following, accept sessions."""
        rep, self.rep = self.rep, None
        rep.close()  # (the sequence goes on in self.seq, which the replica shared)
        for _ in range(50):
            try:
                self._listen()
                break
            except OSError as e:
                log.warning("cannot listen on %s:%s (%s); retrying", self.addr[0],
                            self.addr[1], e.strerror)
                time.sleep(0.1)
        else:  # the process dies; the supervisor restarts the node's processes (as primary)
            raise RuntimeError(f"cannot listen for sessions on {self.addr[0]}:{self.addr[1]}")
        log.info("primary (epoch %s): accepting sessions on %s:%s from gseq %s",
                 int(self.ctl[CTL_EPOCH]), self.addr[0], self.addr[1], self.seq.next_gseq)

    # ------------------------------------------------------------------ loop
    def wait_io(self, timeout: float) -> bool:
        """Sleep in the selector (a blocking process's idle): a client's bytes wake it. An
        IPC session's client is asked for a doorbell (a byte on its socket) meanwhile; one
        that publishes just as the flag is raised may miss it (store, then load, on both
        sides, without a fence): its frames wait for the end of ``timeout``, no longer."""
        rings = self.rings
        if rings:
            for c in rings:
                c.ring.words[W_SLEEPING] = 1
            if any(c.ring.words[W_TAIL] != c.rhead for c in rings):
                timeout = 0
        self.poll(timeout)
        for c in self.rings:
            c.ring.words[W_SLEEPING] = 0
        return True

    def poll(self, timeout: float = 0) -> int:
        """One pass: what epoll reports (waiting up to ``timeout`` s: the spinning loop's
        pass waits for nothing), the IPC sessions' rings, the sessions whose frames wait.
        (One frame: a spinning process runs this hundreds of thousands of times a second,
        and a call from another method was a seventh of its idle pass.)"""
        if self.rep is not None:
            if self.ctl[CTL_ROLE] == ROLE_PRIMARY:
                self._promoted()
            else:
                return self.rep.poll(timeout or 0)
        work = 0
        for fd, _ in self.ep.poll(timeout):
            if fd == self.lfd:
                work += self._accept(self.listener)
                continue
            if fd == self.ufd:
                work += self._accept(self.ulistener, ipc=True)
                continue
            c = self.conns.get(fd)
            if c is None or c.stalled or c in self.ready:
                continue  # (frames wait in its buffer: they go first)
            if c.state == _CLOSING:
                self._drain(c)
            else:
                work += self._read(c)
        if self.rings:  # (one word read per IPC session and pass)
            for c in tuple(self.rings):
                r = c.ring  # (None: closed meanwhile by this pass)
                if (r is not None and r.words[W_TAIL] != c.rhead and not c.stalled
                        and c not in self.ready):
                    work += self._take(c)
        if self.stalled:
            for c in list(self.stalled):
                work += self._consume(c)
        if self.ready:
            for c in list(self.ready):
                self.ready.discard(c)
                if c.state != _CLOSING:
                    work += self._consume(c)
        return work

    def after(self) -> None:
        """Answers: ACKs due and unsent bytes; deadlines. The process loop calls this after
        the whole pipeline pass (compute and fan-out included), so an ACK never delays the
        processing of an event that arrived with it."""
        if self.rep is not None:
            self.rep.after()
            self._show_seq(self.seq.last)
            return
        if self.pair:
            self._pair_state()
        if self.unacked and not self.fenced:
            # An ACK moves only after compute's or the journal's row-0 word has (each is
            # stored after the sessions' words: exposure.shm.session_layout), or the
            # backup's, or an ACK held back by the interval, or a session newly unacked;
            # else the sessions' rows are not looked at (they were, on every pass: each
            # pass's cost delays the pick-up of the next event, for every session there is)
            g = self._gate
            key = (g[N_PROCESSED], g[S_DURABLE],
                   int(self.ctl[CTL_REPL_RECV]) if self.replicated else 0, self.alone)
            if key != self._seen or self._look:
                self._seen = key  # (read before the rows: a later move shows next pass)
                self._look = False
                now = time.monotonic_ns()
                for c in list(self.unacked):
                    if self._ack(c, now):
                        self._look = True
        if self.backlog:
            for c in list(self.backlog):
                self._flush(c)
        if self.conns:
            self._passes += 1
            if not self._passes & 63:  # deadlines (coarse: _SWEEP_NS); the clock every 64
                now = time.monotonic_ns()
                if now >= self.sweep_at:
                    self.sweep_at = now + _SWEEP_NS
                    self._sweep(now)

    def _show_seq(self, gseq: int) -> None:
        if gseq != self.seq_shown:
            self.seq_shown = gseq
            self.ctl[CTL_SEQUENCED] = gseq

    def _pair_state(self) -> None:
        """Once per pass: what the supervisor decided (alone or not: acknowledged back in
        CTL_ALONE_SEEN, after which every ACK follows it), what was sequenced, and the
        fence."""
        ctl = self.ctl
        if ctl[CTL_ALONE] != self.alone:  # (-1 at first: every ingest says what it saw)
            self.alone = int(ctl[CTL_ALONE])
            ctl[CTL_ALONE_SEEN] = self.alone + 1
        self._show_seq(self.seq.last)  # (after SEEN: see exposure.pair.election)
        if not self.unacked:
            return  # (the fence matters only to what is about to be acknowledged)
        fenced = not may_act(ctl, time.monotonic_ns())
        if fenced != self.fenced:
            self.fenced = fenced
            self._look = True  # (ACKs held while fenced: looked at again once not)
            ctl[CTL_FENCED] = int(fenced)
            log.log(logging.WARNING if fenced else logging.INFO, "%s (epoch %s): %s",
                    "fenced" if fenced else "no longer fenced", int(ctl[CTL_EPOCH]),
                    "no valid echo from the backup and not recorded as running alone: "
                    "acknowledging and publishing nothing" if fenced else
                    "acknowledging again")

    # ------------------------------------------------------------------ connections
    def _accept(self, listener: Listener, ipc: bool = False) -> int:
        n = 0
        for _ in range(_ACCEPTS_PER_PASS):
            s = listener.accept(self.log)
            if s is None:
                break
            n += 1
            self._count(SL.N_ACCEPTED)
            if len(self.conns) >= self.lim.max_connections:
                if self.closing:  # make room: one already refused, then the oldest
                    self._close(next(iter(self.closing)))  # that has not logged in
                elif self.pre:
                    self._count(SL.N_EVICTED)
                    self._close(next(iter(self.pre.values())))
                else:
                    self._count(SL.N_REFUSED)
                    self.log("cap", f"{len(self.conns)} connections open (the cap, "
                                    "[ingest] max_connections): refusing new ones")
                    try:
                        s.send(W.encode_reject(W.E_BUSY, "too many connections"))
                    except OSError:
                        pass
                    s.close()
                    continue
            try:
                if not ipc:
                    keepalive(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.lim.max_output)
            except OSError:
                s.close()
                continue
            c = _Conn(s, time.monotonic_ns(), self.lim.max_output, self.lim.read_budget,
                      ipc)
            self.conns.add(c)
            self.pre[c.fd] = c
            self._send(c, W.encode_challenge(c.nonce))
        if listener.fd_limit:
            self.node[SL.N_EMFILE] += listener.fd_limit
            listener.fd_limit = 0
        self.node[SL.N_OPEN] = len(self.conns)
        return n

    def _close(self, c: _Conn) -> None:
        if not self.conns.drop(c):
            return
        self._detach(c)
        for group in (self.closing, self.ending, self.stalled, self.ready, self.unacked,
                      self.backlog, self.rings):
            group.discard(c)
        c.sock.close()
        if c.ring is not None:
            c.ring.close()
            c.ring = None
        self.node[SL.N_OPEN] = len(self.conns)

    def _detach(self, c: _Conn) -> None:
        """``c`` is no longer its session's connection, nor one waiting to log in."""
        if c.session and self.by_session.get(c.session) is c:
            del self.by_session[c.session]
            self.sessions[c.session, SL.S_CONNECTED] = 0
        self.pre.pop(c.fd, None)

    def _reject(self, c: _Conn, code: int, text: str, detail: int = 0) -> None:
        """Answer REJECT, then close without waiting for anything: the connection leaves
        every group but ``closing``; its write side is shut once the answer is out."""
        if c.state == _CLOSING:
            return
        self._detach(c)
        for group in (self.stalled, self.ready, self.unacked, self.ending, self.rings):
            group.discard(c)
        c.stalled = False
        c.state = _CLOSING
        c.close_at = time.monotonic_ns() + _LINGER_NS
        self.closing.add(c)
        self._send(c, W.encode_reject(code, text, detail))
        if c.fd in self.conns and not c.out:
            self._shut(c)

    def _shut(self, c: _Conn) -> None:
        try:
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(c)

    def _drain(self, c: _Conn) -> None:
        """A closing connection: what it sends is read and dropped until it goes."""
        got = c.recv_into(self.scratch)
        if got == 0:
            self._close(c)

    def _end(self, c: _Conn) -> None:
        """End of input from a session: its complete frames are still taken (a client may
        send events and then shut its write side), its ACK still sent; then it is closed
        (:meth:`_sweep`), within ``_END_NS`` at most. A frame it left incomplete is not
        applied."""
        try:
            self.ep.unregister(c.fd)  # (level-triggered: the end would be reported forever)
        except (KeyError, ValueError, OSError):
            pass
        c.close_at = time.monotonic_ns() + _END_NS
        self.ending.add(c)
        self._consume(c)

    def _sweep(self, now: int) -> None:
        """Deadlines: logins, idle sessions, closing and ending connections."""
        login = self.lim.login_timeout_ms * 1_000_000
        while self.pre:
            c = next(iter(self.pre.values()))
            if now - c.since < login:
                break
            self._count(SL.N_LOGIN_TIMEOUT)
            self._close(c)
        idle = self.lim.idle_timeout_ms * 1_000_000
        for c in list(self.by_session.values()):
            if c.rx:  # read since the last sweep
                c.rx = False
                c.last_rx = now
            elif (now - c.last_rx >= idle and not c.stalled and c not in self.unacked
                    and c not in self.ending):
                self._count(SL.N_IDLE, c.session, SL.S_IDLE)
                self._reject(c, W.E_IDLE, f"nothing received for "
                             f"{self.lim.idle_timeout_ms} ms (send HEARTBEATs when idle)")
        for c in list(self.closing):
            if now >= c.close_at:
                self._close(c)
        for c in list(self.ending):
            if now >= c.close_at or not (c.stalled or c in self.ready or c in self.unacked
                                         or c.out or (c.ring is not None and
                                                      c.ring.words[W_TAIL] != c.rhead)):
                self._close(c)

    def _room(self, c: _Conn) -> int:
        """The bytes ``c``'s buffer takes now (at most ``read_budget``); -1: none will ever
        fit, and ``c`` is closed."""
        if c.pos == c.fill:
            c.pos = c.fill = 0
        elif c.pos and len(c.buf) - c.fill < self.lim.read_budget:
            # An incomplete frame (at most one maximal frame) near the end: move it to the
            # front, so the buffer always has room for a whole read.
            n = c.fill - c.pos
            c.buf[:n] = c.buf[c.pos:c.fill]
            c.pos, c.fill = 0, n
        room = min(len(c.buf) - c.fill, self.lim.read_budget)
        if room <= 0:  # (only a pre-login buffer full of a frame that is not a LOGIN)
            self._count(SL.N_PRELOGIN)
            self._close(c)
            return -1
        return room

    def _take(self, c: _Conn) -> int:
        """An IPC session's frames: what its ring holds, copied into its buffer (the copy
        is what is checked and parsed: see exposure.shm.ipc_layout), then consumed."""
        room = self._room(c)
        if room < 0:
            return 1
        got = c.ring.take(c.rhead, c.mv, c.fill, room)
        if got <= 0:
            if got < 0:
                self._count(SL.N_PROTOCOL, c.session, SL.S_PROTOCOL)
                self._reject(c, W.E_PROTOCOL, "the IPC ring's tail is out of range")
            return 0
        c.rhead += got
        c.fill += got
        c.rx = True
        self._consume(c)
        return 1

    def _read(self, c: _Conn) -> int:
        if c.ring is not None:
            return self._doorbell(c)
        if c.pos == c.fill:  # (the usual case: everything received so far was taken)
            c.pos = c.fill = 0
            view = c.mv0
        else:
            room = self._room(c)
            if room < 0:
                return 1
            view = c.mv[c.fill:c.fill + room]
        got = c.recv_into(view)
        if got is None:
            return 0
        if not got:  # the client went away, or shut its write side (it may still read)
            if c.state == _LIVE and (c.pos < c.fill or c in self.unacked):
                self._end(c)  # what it sent first is taken and acknowledged, then closed
            else:
                self._close(c)
            return 1
        c.fill += got
        c.rx = True
        self._consume(c)
        return 1

    def _doorbell(self, c: _Conn) -> int:
        """An IPC session's socket after login: the client writes only doorbells there
        (read and dropped); its end is the session's end: what the ring holds is taken
        first (:meth:`_end`; later passes take the rest)."""
        got = c.recv_into(self.scratch)
        if got is None or got:
            return 0
        while (c.state == _LIVE and c.ring is not None and not c.stalled
               and c not in self.ready and c.ring.words[W_TAIL] != c.rhead
               and self._take(c)):
            pass
        if self.conns.get(c.fd) is not c:
            return 1
        if c.state == _LIVE and (c.pos < c.fill or c in self.unacked or (
                c.ring is not None and c.ring.words[W_TAIL] != c.rhead)):
            self._end(c)
        else:
            self._close(c)
        return 1

    def _consume(self, c: _Conn) -> int:
        """Take the complete frames received so far: EVENTS into the ring (jitted), the
        rest here (at most ``control_budget`` of them per pass). Returns the records
        pushed."""
        pushed = 0
        budget = self.lim.control_budget
        down = self.down
        while True:
            got = None if down is None else down.scan_then_pass(
                c.hbuf, c.pos, c.fill, c.session, c.held, self.seq.next_gseq)
            # (one chained pass per call: the scans after a control frame are ingest's
            # own, and what they push goes in the fused stage's pass, later in this one;
            # a flood of control frames costs a scan each, not a pass of every stage)
            down = None
            if got is None:
                got = self._scan(self.handle, c.hbuf, c.pos, c.fill, c.session, c.held,
                                 self.seq.next_gseq)
            why, c.pos, held, n, casleep, jasleep, expected = got
            if n:  # (counted, and the session's held seq stored, by the jitted scan)
                pushed += n
                self.seq.commit(n, casleep, jasleep, True)
                c.held = held
                if self.replicated:
                    self._mark(c, held, time.time_ns())
                self.unacked.add(c)
                self._look = True
            if why == RING_FULL:
                self.cnt[_RING_FULL] += 1
                if not c.stalled:
                    c.stalled = True
                    self.stalled.add(c)
                return pushed
            if c.stalled:
                c.stalled = False
                self.stalled.discard(c)
            if why == SEQ_GAP:
                self._count(SL.N_SEQ_REJECTS, c.session, SL.S_SEQ_REJECTS)
                self._reject(c, W.E_SEQ, f"a record's session seq is not {expected}, the "
                             "next one: nothing from it on was applied", expected)
                return pushed
            if why == NEED_MORE:
                return pushed
            if budget == 0:  # the rest on a later pass (the socket may have nothing new)
                self.ready.add(c)
                return pushed
            budget -= 1
            if not self._control(c):
                return pushed

    def _mark(self, c: _Conn, held: int, now: int) -> None:
        """Checkpoint (last gseq pushed, session seq held) for the replicated release.

        One mark per ``_MARK_NS`` window: within a window the newest mark moves forward;
        once its window has passed it is frozen and released as soon as the backup has
        received its gseq (a mark that kept moving would never be reached while events
        stream). Without a backup for a long time the oldest marks are dropped: a dropped
        mark's seq is released with the next mark, later, never early."""
        g = self.seq.last
        m = c.marks
        if m and now - c.mark_ns < _MARK_NS:
            m[-1] = (g, held)
            return
        if len(m) >= _MAX_MARKS:
            m.popleft()
        m.append((g, held))
        c.mark_ns = now


    def _control(self, c: _Conn) -> bool:
        """The frame at ``c.pos`` that the scanner left: check it, handle it if complete.
        Returns False when the scan cannot go on (incomplete frame, session closed).
        Before login only a LOGIN is looked at: anything else closes the connection
        unanswered, as soon as its header shows what it is."""
        pos = c.pos
        magic, version, kind, length = W.HEADER.unpack_from(c.buf, pos)
        if c.state == _PRE and kind != W.K_LOGIN:
            self._count(SL.N_PRELOGIN)
            self._close(c)
            return False
        try:
            W.check_header(magic, version, kind, length, pos)
        except W.ProtocolError as e:
            if c.state == _PRE:
                self._count(SL.N_PRELOGIN)
                self._close(c)
            else:
                self._count(SL.N_PROTOCOL, c.session, SL.S_PROTOCOL)
                self._reject(c, e.code, str(e))
            return False
        end = pos + _HDR + length
        if end > c.fill:
            return False
        payload = c.buf[pos + _HDR:end].tobytes()
        c.pos = end
        if kind == W.K_LOGIN:
            self._login(c, payload)
        elif kind == W.K_HEARTBEAT:
            self._send(c, W.encode_heartbeat())
        elif kind == W.K_EVENTS:  # (unreachable: the scanner takes aligned EVENTS frames)
            self._count(SL.N_PROTOCOL, c.session, SL.S_PROTOCOL)
            self._reject(c, W.E_PROTOCOL, f"EVENTS frame at unaligned byte {pos}")
        else:
            self._count(SL.N_PROTOCOL, c.session, SL.S_PROTOCOL)
            self._reject(c, W.E_PROTOCOL, f"a client may not send frame kind {kind}")
        return self.conns.get(c.fd) is c and c.state != _CLOSING

    def _login(self, c: _Conn, payload: bytes) -> None:
        sid, flags, proof = W.decode_login_flags(payload)
        if c.state != _PRE:
            self._count(SL.N_PROTOCOL, c.session, SL.S_PROTOCOL)
            self._reject(c, W.E_SESSION, "already logged in")
            return
        if not 1 <= sid <= self.max_sessions:
            self._count(SL.N_BAD_SESSION)
            self._reject(c, W.E_SESSION, f"session id {sid} outside 1..{self.max_sessions}")
            return
        if self.secrets is not None:
            secret = self.secrets.get(sid)
            good = W.login_mac(secret, sid, c.nonce) if secret else bytes(32)
            if secret is None or not hmac.compare_digest(proof, good):
                self._count(SL.N_AUTH_FAILS, sid, SL.S_AUTH_FAILS)
                self.log("auth", f"login as session {sid} refused: the proof does not "
                                 "verify (wrong secret, or a session not configured)")
                self._reject(c, W.E_AUTH, "authentication failed")
                return
        if flags & ~W.LOGIN_FLAGS or (flags and self.rlog is None):
            self._count(SL.N_PROTOCOL, sid, SL.S_PROTOCOL)
            self._reject(c, W.E_PROTOCOL, f"LOGIN flags {flags:#x}: this node knows "
                         f"{W.LOGIN_FLAGS if self.rlog is not None else 0:#x} only")
            return
        ring = None
        if c.ipc:  # its ring goes with the LOGIN_OK, before anything else is queued
            if c.out:
                self._count(SL.N_PROTOCOL, sid, SL.S_PROTOCOL)
                self._reject(c, W.E_PROTOCOL, "LOGIN before the CHALLENGE was read")
                return
            try:
                ring = IpcRing.create(self.lim.ipc_ring_kb * 1024, f"exposure-ipc-{sid}")
            except IpcError as e:
                self.log("ipc", f"session {sid}: {e}")
                self._reject(c, W.E_BUSY, "no IPC ring now: log in over TCP")
                return
        old = self.by_session.get(sid)
        if old is not None:  # a stale connection (half-open, or a client that restarted)
            self._count(SL.N_REPLACED, sid, SL.S_REPLACED)
            self.log("replaced", f"session {sid} logged in again: its older connection is "
                                 "closed")
            self._reject(old, W.E_REPLACED, "the session logged in on another connection")
        del self.pre[c.fd]
        c.state = _LIVE
        c._buffer(self.lim.buffer, self.lim.read_budget)
        c.session = sid
        c.row = memoryview(self.sessions[sid])
        c.held = int(self.sessions[sid, S_HELD])
        if flags & W.LOGIN_REJECTED:  # from the oldest entry the log keeps
            c.flags = flags
            c.rcur = 0
            c.rupto = int(self.rlog[sid, RJ.W_BASE])
        c.marks.append((self.seq.last, c.held))  # what it holds: pushed before now
        self.by_session[sid] = c
        self.sessions[sid, SL.S_CONNECTED] = 1
        self._count(SL.N_LOGINS, sid, SL.S_LOGINS)
        if ring is None:
            self._send(c, W.encode_login_ok(c.held))
        else:
            ok = W.encode_login_ok(c.held)
            try:
                sent = socket.send_fds(c.sock, [ok], [ring.fd])
            except OSError:
                sent = -1
            ring.release_fd()
            c.ring = ring
            if sent != len(ok):  # (an empty Unix socket takes 16 bytes, or has failed)
                self._close(c)
                return
            self.rings.add(c)
            self.node[SL.N_IPC_LOGINS] += 1
        self.unacked.add(c)  # a first ACK tells the client what compute has processed
        self._look = True

    def _ack(self, c: _Conn, now: int) -> bool:
        # Compute writes a session's reject counters, then (release) its S_DONE; reading
        # S_DONE first and the counters after is ordered on x86 (loads are not reordered
        # with loads) and Python does not reorder its own loads.
        # (called by after()'s look, on passes where row 0 moved, mostly to find nothing
        # new: its row's words through a memoryview, where numpy's 2-D indexing was 22%
        # of a spinning hot process at 20,000 events/s). True: an ACK is due but held back
        # by the interval, so the next pass looks again.
        row = c.row
        done = row[S_DONE]
        if self.local or self.alone:  # acknowledged only once durable as well
            done = min(done, row[S_DURABLE])
        if self.replicated:  # ... and in the backup's memory (unless running alone)
            recv = int(self.ctl[CTL_REPL_RECV])
            while c.marks and c.marks[0][0] <= recv:
                c.repl = c.marks.popleft()[1]
            if not self.alone:
                done = min(done, c.repl)
        if done > c.acked:
            if now < c.ack_due:
                return True  # held back by the interval (looked at again next pass)
            c.acked = done
            c.ack_due = now + self.ack_interval_ns
            if c.flags and done > c.rupto:
                self._rejected(c, done)
                if self.conns.get(c.fd) is not c:  # (it did not read its answers: closed)
                    return False
            # (tolist: one C call, where encode_ack's loop would box 16 numpy scalars)
            rej = self.sessions[c.session, S_REJ:S_REJ + N_REJ].tolist()
            if self.rlog is not None:
                # The counters are as of what compute processed, which may be beyond
                # ``done`` (durability, the backup): the ACK's are as of ``done``, so the
                # rejects the log holds above it are taken back.
                above = RJ.counts_after(self.rlog[c.session], done, N_REJ)
                if above is not None:
                    rej = [a - b for a, b in zip(rej, above, strict=True)]
            self._send(c, W.encode_ack(done, rej))
        if c.acked >= c.held:
            self.unacked.discard(c)
        return False

    def _rejected(self, c: _Conn, done: int) -> None:
        """Before the ACK of ``done``: a REJECTED frame listing the session's rejected seqs
        in (c.rupto, done] from the reject log, or saying which of them were lost (none
        when there is nothing to say). Compute stores an entry, then the log's head, then
        DONE (all release); ``done`` was read first, so every reject of a seq <= done is
        below the head :func:`exposure.shm.reject_layout.read_since` reads."""
        after, seqs, codes, c.rcur = RJ.read_since(self.rlog[c.session], c.rcur, c.rupto,
                                                   done)
        if len(seqs) or after > c.rupto:
            self._send(c, W.encode_rejected(after, done, seqs, codes))
        c.rupto = done

    def _send(self, c: _Conn, data: bytes) -> None:
        """Queue ``data`` behind what waits (sent now if nothing does). A client whose
        queue would pass ``max_output`` does not read its answers: it is closed."""
        r = c.send(data)
        if r == SLOW:
            self._count(SL.N_SLOW, c.session, SL.S_SLOW)
            who = f"session {c.session}" if c.session else "a client not logged in"
            self.log("slow", f"{who} does not read its answers: disconnected")
            self._close(c)
        elif r == GONE:
            self._close(c)
        elif c.out:
            self.backlog.add(c)

    def _flush(self, c: _Conn) -> None:
        if not c.flush():
            self._close(c)
        elif not c.out:
            self.backlog.discard(c)
            if c.state == _CLOSING:
                self._shut(c)

    def close(self) -> None:
        self.handle.close()
        if self.rep is not None:
            self.rep.close()
        for c in list(self.conns.values()):
            self._close(c)
        if self.listener is not None:
            self.ep.unregister(self.lfd)
            self.listener.close()
        if self.ulistener is not None:
            self.ep.unregister(self.ufd)
            self.ulistener.close()
        self.ep.close()
