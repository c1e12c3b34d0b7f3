"""Ingest stage: TCP sessions from upstream systems into the compute ring.

A session logs in with its id (1..max_sessions; one connection per id at a time) and is told
the last session seq the node holds. Its EVENTS frames carry records numbered by session
seq; records at or below what the node holds are dropped (a client may resend after a
reconnect). Ingest stamps each kept record with the session id, the receive time and the
next global seq, and pushes it to the compute ring; when the ring is full the session's
records wait (and its socket is not read) until there is room. The node acknowledges to
each session the highest seq that compute has processed, with the session's rejects per
reason; while events stream, ACKs are coalesced to one per session per ``ack_interval_us``
(each is a send on the hot path), and the last one follows within that interval.

Complete EVENTS frames go from the receive buffer to the ring in one jitted scan per read
(:func:`_scan`); login, heartbeat and anything malformed are handled here in Python.

A client's bytes never harm the node: a malformed frame gets a REJECT and the session is
closed; other sessions and the tallies are untouched.

**Roles** (a node of a primary/backup pair reads its role from the control block): a
backup does not listen for sessions at all (clients fail over to the primary); its ingest
runs the replica side of the link instead (:mod:`exposure.stages.replica`), which puts the
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

In a pair, two more rules (:mod:`exposure.election`): a primary recorded in etcd as
**running alone** (``CTL_ALONE``) releases on its own durability whatever the policy; and a
primary that is not alone acknowledges nothing once its **fence** has expired (no echo of
its heartbeats from the backup for about ``failover_ms``): the backup may be promoting.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time
from collections import deque

import numpy as np
from numba import njit

from .. import _jit
from .. import wire as W
from .._sock import flush, send_or_queue
from ..shm import ring_layout as RL
from ..shm.control import (
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
from ..shm.intrinsics import load_acquire, store_release
from ..shm.ring import sleeping
from ..types import EVENT_WORDS, W_EPOCH, W_GSEQ, W_RECV_NS, W_SESSION, W_SSEQ
from .compute import S_DONE, S_DURABLE, S_HELD, S_REJ

__all__ = ["IngestStage"]

_HIGH = np.uint64(0xFFFF_FFFF_0000_0000)  # keeps the high half of a shared word
_HDR = W.HEADER.size
_REC = EVENT_WORDS * 8
# Why the scanner stopped.
_NEED_MORE = 0   # no complete frame left at pos
_CONTROL = 1     # a frame at pos that Python handles (login, heartbeat, anything invalid)
_RING_FULL = 2   # the compute ring has no room for the rest of the frame at pos
_BUF = 2 * (_HDR + W.MAX_PAYLOAD)  # per-connection receive buffer (virtual until touched)
_MARK_NS = 100_000   # replicated-release checkpoints: at most one per session per 100 us
_MAX_MARKS = 4096


@njit(cache=True, _nrt=False)
def _scan(buf, wbuf, pos, fill, session, held, now, gseq, ctrl, slots, tctrl, tslots, tap,
          res):
    """Take the complete EVENTS frames of ``buf[pos:fill]`` straight into the ring.

    Each record whose session seq is above ``held`` (and increasing) is stamped with the
    session id, the receive time, epoch 0 and the next global seq, and written to the ring.
    A record's seq counts as held only once it is in the ring, so a frame cut short by a
    full ring is simply scanned again later: what it already delivered is skipped as a
    resend. The scanner stops at the first frame that is incomplete, is not an EVENTS frame
    of a logged-in session, or has a header that is not exactly right; Python deals with
    those (its :func:`wire.check_header` is the statement of the rules and says what is
    wrong). ``wbuf`` is ``buf`` as u8 words: valid frames are multiples of 8 bytes long,
    so records start on word boundaries. With ``tap`` set, every record also goes to the
    tap ring (``tctrl``/``tslots``: the journal's input), and a record is taken only when
    both rings have room.

    Writes (why, pos, held, pushed, compute consumer asleep, tap consumer asleep) to
    ``res``.
    """
    session = np.uint64(session)
    held = np.uint64(held)
    now = np.uint64(now)
    gseq = np.uint64(gseq)
    cap = slots.shape[0]
    mask = cap - 1
    tail = np.int64(ctrl[RL.W_TAIL])  # only this process writes it
    head = np.int64(ctrl[RL.W_HEAD_CACHE])
    t0 = tail
    tcap = tslots.shape[0]
    tmask = tcap - 1
    ttail = np.int64(tctrl[RL.W_TAIL])
    thead = np.int64(tctrl[RL.W_HEAD_CACHE])
    why = _NEED_MORE
    while fill - pos >= _HDR:
        kind = buf[pos + 3]
        length = (np.int64(buf[pos + 4]) | (np.int64(buf[pos + 5]) << 8)
                  | (np.int64(buf[pos + 6]) << 16) | (np.int64(buf[pos + 7]) << 24))
        if (buf[pos] != 0x45 or buf[pos + 1] != 0x58 or buf[pos + 2] != W.VERSION
                or kind != W.K_EVENTS or session == 0 or length == 0
                or length > W.MAX_PAYLOAD or length % _REC != 0 or pos % 8 != 0):
            why = _CONTROL
            break
        if fill - pos - _HDR < length:
            break  # incomplete
        w0 = (pos + _HDR) // 8
        full = False
        for k in range(length // _REC):
            r = w0 + k * EVENT_WORDS
            s = wbuf[r + W_SSEQ]
            if s <= held:
                continue  # already held: a resend
            if tail - head >= cap:
                head = np.int64(load_acquire(ctrl, RL.W_HEAD))
                ctrl[RL.W_HEAD_CACHE] = head
                if tail - head >= cap:
                    full = True
                    break
            if tap and ttail - thead >= tcap:
                thead = np.int64(load_acquire(tctrl, RL.W_HEAD))
                tctrl[RL.W_HEAD_CACHE] = thead
                if ttail - thead >= tcap:
                    full = True
                    break
            j = tail & mask
            for b in range(EVENT_WORDS):
                slots[j, b] = wbuf[r + b]
            slots[j, W_SESSION] = (slots[j, W_SESSION] & _HIGH) | session
            slots[j, W_EPOCH] &= _HIGH
            slots[j, W_RECV_NS] = now
            slots[j, W_GSEQ] = gseq + np.uint64(tail - t0)
            if tap:
                jt = ttail & tmask
                for b in range(EVENT_WORDS):
                    tslots[jt, b] = slots[j, b]
                ttail += 1
            tail += 1
            held = s
        if full:
            why = _RING_FULL
            break
        pos += _HDR + length
    pushed = tail - t0
    asleep = 0
    tasleep = 0
    if pushed > 0:
        if tap:  # the journal first: it may take longer, and nothing waits on it here
            store_release(tctrl, RL.W_TAIL, ttail)
            tasleep = 1 if sleeping(tctrl, RL.W_CONSUMER_SLEEPING) else 0
        store_release(ctrl, RL.W_TAIL, tail)  # publish: the slot writes happen-before
        asleep = 1 if sleeping(ctrl, RL.W_CONSUMER_SLEEPING) else 0
    res[0] = why
    res[1] = pos
    res[2] = np.int64(held)
    res[3] = pushed
    res[4] = asleep
    res[5] = tasleep


class _Conn:
    __slots__ = ("sock", "fd", "buf", "wbuf", "mv", "pos", "fill", "stalled", "session",
                 "held", "acked", "ack_due", "out", "marks", "mark_ns", "repl")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.buf = np.zeros(_BUF, np.uint8)  # pages are touched only as far as frames go
        self.wbuf = self.buf.view(np.uint64)
        self.mv = memoryview(self.buf)
        self.pos = 0       # next unconsumed byte of buf
        self.fill = 0      # bytes received into buf
        self.stalled = False  # the ring was full: frames wait in buf, the socket is not read
        self.session = 0
        self.held = 0
        self.acked = -1
        self.ack_due = 0   # monotonic ns before which no further ACK is sent (coalescing)
        self.out = bytearray()
        self.marks: deque = deque()  # (last gseq, session seq held): see IngestStage._mark
        self.mark_ns = 0
        self.repl = 0      # highest session seq the backup has received


class IngestStage:
    def __init__(self, host: str, port: int, sessions: np.ndarray, out_ring, next_gseq: int,
                 max_sessions: int, ack_interval_us: int = 0, tap_ring=None,
                 ctl: np.ndarray | None = None, release: str = "local", replica=None):
        self.sessions = sessions
        self.out = out_ring
        self.max_sessions = max_sessions
        self.next_gseq = next_gseq
        self.ack_interval_ns = ack_interval_us * 1000
        self.addr = (host, port)
        self.ctl = ctl
        self.local = release in ("local", "replicated+local") and tap_ring is not None
        self.replicated = release in ("replicated", "replicated+local")
        # A node of a pair acknowledges only while it may act (the fence, or running alone:
        # exposure.shm.control.may_act); alone, it releases on its own durability.
        self.pair = replica is not None and ctl is not None
        self.alone = -1 if self.pair else 0  # CTL_ALONE as last acted on (-1: not yet)
        self.fenced = False
        self.seq_shown = -1
        self.ep = select.epoll()
        self.lsock: socket.socket | None = None
        self.lfd = -1
        self.conns: dict[int, _Conn] = {}
        self.by_session: dict[int, _Conn] = {}
        self.stalled: set[_Conn] = set()   # sessions whose frames wait for ring space
        self.unacked: set[_Conn] = set()   # sessions with records not yet acknowledged
        self.backlog: set[_Conn] = set()   # sessions with answers the socket did not take
        self.tap = tap_ring
        # Without a journal the tap arguments are the compute ring's (never written).
        t = tap_ring if tap_ring is not None else out_ring
        self._tap_args = (t.ctrl, t.slots, tap_ring is not None)
        self.res = np.zeros(6, np.int64)
        self._scan = _jit.entry(_scan, self.res.view(np.uint8), self.res.view(np.uint64),
                                0, 0, 0, 0, 0, 0, self.out.ctrl, self.out.slots,
                                *self._tap_args, self.res)  # compiled (or loaded) now
        # A backup runs the replica side (``replica``: a factory next_gseq -> ReplicaStage)
        # until the supervisor promotes the node; ``self.rep`` is None once primary.
        self.rep = None
        if ctl is not None and ctl[CTL_ROLE] == ROLE_BACKUP:
            self.rep = replica(next_gseq)
        else:
            self._listen()

    def _listen(self) -> None:
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(self.addr)
        self.lsock.listen(128)
        self.lsock.setblocking(False)
        self.lfd = self.lsock.fileno()
        self.ep.register(self.lfd, select.EPOLLIN)

    def _promoted(self) -> None:
        """The supervisor made this node the primary: stop following, accept sessions."""
        rep, self.rep = self.rep, None
        self.next_gseq = rep.next_gseq
        rep.close()
        for _ in range(50):
            try:
                self._listen()
                break
            except OSError as e:
                print(f"exposure ingest: cannot listen on {self.addr[0]}:{self.addr[1]} "
                      f"({e.strerror}); retrying", file=sys.stderr, flush=True)
                if self.lsock is not None:
                    self.lsock.close()
                    self.lsock = None
                time.sleep(0.1)
        else:  # the process dies; the supervisor restarts the node's processes (as primary)
            raise RuntimeError(f"cannot listen for sessions on {self.addr[0]}:{self.addr[1]}")
        print(f"exposure ingest: primary (epoch {int(self.ctl[CTL_EPOCH])}): accepting "
              f"sessions on {self.addr[0]}:{self.addr[1]} from gseq {self.next_gseq}",
              file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ loop
    def poll(self, timeout: float | None = 0) -> int:
        if self.rep is not None:
            if self.ctl[CTL_ROLE] == ROLE_PRIMARY:
                self._promoted()
            else:
                return self.rep.poll(timeout or 0)
        work = 0
        for fd, _ in self.ep.poll(timeout if timeout is not None else -1):
            if fd == self.lfd:
                work += self._accept()
            else:
                c = self.conns.get(fd)
                if c is not None and not c.stalled:
                    work += self._read(c)
        if self.stalled:
            for c in list(self.stalled):
                work += self._consume(c)
        return work

    def after(self) -> None:
        """Answers: ACKs due and unsent bytes. The process loop calls this after the whole
        pipeline pass (compute and fan-out included), so an ACK never delays the
        processing of an event that arrived with it."""
        if self.rep is not None:
            self.rep.after()
            self._show_seq(self.rep.next_gseq - 1)
            return
        if self.pair:
            self._pair_state()
        if self.unacked and not self.fenced:
            now = time.monotonic_ns()
            for c in list(self.unacked):
                if now >= c.ack_due:
                    self._ack(c, now)
        if self.backlog:
            for c in list(self.backlog):
                self._flush(c)

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
        self._show_seq(self.next_gseq - 1)  # (after SEEN: see exposure.election)
        if not self.unacked:
            return  # (the fence matters only to what is about to be acknowledged)
        fenced = not may_act(ctl, time.monotonic_ns())
        if fenced != self.fenced:
            self.fenced = fenced
            ctl[CTL_FENCED] = int(fenced)
            print(f"exposure ingest: {'fenced' if fenced else 'no longer fenced'} (epoch "
                  f"{int(ctl[CTL_EPOCH])}): "
                  + ("no valid echo from the backup and not recorded as running alone: "
                     "acknowledging and publishing nothing" if fenced else
                     "acknowledging again"), file=sys.stderr, flush=True)

    def _accept(self) -> int:
        try:
            s, _ = self.lsock.accept()
        except BlockingIOError:
            return 0
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(s)
        self.conns[c.fd] = c
        self.ep.register(c.fd, select.EPOLLIN)
        return 1

    def _close(self, c: _Conn) -> None:
        try:
            self.ep.unregister(c.fd)
        except (KeyError, ValueError, OSError):
            pass
        self.conns.pop(c.fd, None)
        self.stalled.discard(c)
        self.unacked.discard(c)
        self.backlog.discard(c)
        if c.session and self.by_session.get(c.session) is c:
            del self.by_session[c.session]
        c.sock.close()

    def _reject(self, c: _Conn, code: int, text: str) -> None:
        try:
            c.sock.setblocking(True)
            c.sock.settimeout(0.2)
            c.sock.sendall(bytes(c.out) + W.encode_reject(code, text))
        except OSError:
            pass
        self._close(c)

    def _read(self, c: _Conn) -> int:
        if c.pos == c.fill:
            c.pos = c.fill = 0
        elif c.pos and c.fill > _BUF // 2:
            # An incomplete frame (at most one maximal frame, half the buffer) in the upper
            # half: move it to the front, so the buffer always has room for the rest.
            n = c.fill - c.pos
            c.buf[:n] = c.buf[c.pos:c.fill]
            c.pos, c.fill = 0, n
        try:
            got = c.sock.recv_into(c.mv[c.fill:])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            got = 0
        if not got:
            self._close(c)  # the client went away (possibly mid-frame: nothing applied)
            return 1
        c.fill += got
        self._consume(c)
        return 1

    def _consume(self, c: _Conn) -> int:
        """Take the complete frames received so far: EVENTS into the ring (jitted), the
        rest here. Returns the records pushed."""
        pushed = 0
        res = self.res
        while True:
            now = time.time_ns()
            self._scan(c.buf, c.wbuf, c.pos, c.fill, c.session, c.held, now,
                       self.next_gseq, self.out.ctrl, self.out.slots, *self._tap_args, res)
            why, c.pos, held, n = int(res[0]), int(res[1]), int(res[2]), int(res[3])
            if n:
                pushed += n
                self.next_gseq += n
                c.held = held
                self.sessions[c.session, S_HELD] = held
                if self.replicated:
                    self._mark(c, held, now)
                self.unacked.add(c)
                if res[4]:
                    self.out.semaphore.release()  # a compute process asleep on the ring
                if res[5]:
                    self.tap.semaphore.release()  # a journal asleep on the tap ring
            if why == _RING_FULL:
                if not c.stalled:
                    c.stalled = True
                    self.stalled.add(c)
                return pushed
            if c.stalled:
                c.stalled = False
                self.stalled.discard(c)
            if why == _NEED_MORE or not self._control(c):
                return pushed

    def _mark(self, c: _Conn, held: int, now: int) -> None:
        """Checkpoint (last gseq pushed, session seq held) for the replicated release.

        One mark per ``_MARK_NS`` window: within a window the newest mark moves forward;
        once its window has passed it is frozen and released as soon as the backup has
        received its gseq (a mark that kept moving would never be reached while events
        stream). Without a backup for a long time the oldest marks are dropped: a dropped
        mark's seq is released with the next mark, later, never early."""
        g = self.next_gseq - 1
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
        Returns False when the scan cannot go on (incomplete frame, session closed)."""
        pos = c.pos
        magic, version, kind, length = W.HEADER.unpack_from(c.buf, pos)
        try:
            W.check_header(magic, version, kind, length, pos)
        except W.ProtocolError as e:
            self._reject(c, e.code, str(e))
            return False
        end = pos + _HDR + length
        if end > c.fill:
            return False
        payload = c.buf[pos + _HDR:end].tobytes()
        c.pos = end
        if kind == W.K_LOGIN:
            self._login(c, payload)
        elif kind == W.K_EVENTS and not c.session:
            self._reject(c, W.E_NOT_LOGGED_IN, "EVENTS before LOGIN")
        elif kind == W.K_EVENTS:  # (unreachable: the scanner takes aligned EVENTS frames)
            self._reject(c, W.E_PROTOCOL, f"EVENTS frame at unaligned byte {pos}")
        elif kind == W.K_HEARTBEAT:
            self._send(c, W.encode_heartbeat())
        else:
            self._reject(c, W.E_PROTOCOL, f"a client may not send frame kind {kind}")
        return c.fd in self.conns and self.conns[c.fd] is c

    def _login(self, c: _Conn, payload: bytes) -> None:
        sid, _ = struct.unpack("<II", payload)
        if c.session:
            self._reject(c, W.E_SESSION, "already logged in")
        elif not 1 <= sid <= self.max_sessions:
            self._reject(c, W.E_SESSION, f"session id {sid} outside 1..{self.max_sessions}")
        elif sid in self.by_session:
            self._reject(c, W.E_SESSION, f"session {sid} is already connected")
        else:
            c.session = sid
            c.held = int(self.sessions[sid, S_HELD])
            c.marks.append((self.next_gseq - 1, c.held))  # what it holds: pushed before now
            self.by_session[sid] = c
            self._send(c, W.encode_login_ok(c.held))
            self.unacked.add(c)  # a first ACK tells the client what compute has processed

    def _ack(self, c: _Conn, now: int) -> None:
        # Compute writes a session's reject counters, then (release) its S_DONE; reading
        # S_DONE first and the counters after is ordered on x86 (loads are not reordered
        # with loads) and Python does not reorder its own loads.
        done = int(self.sessions[c.session, S_DONE])
        if self.local or self.alone:  # acknowledged only once durable as well
            done = min(done, int(self.sessions[c.session, S_DURABLE]))
        if self.replicated:  # ... and in the backup's memory (unless running alone)
            recv = int(self.ctl[CTL_REPL_RECV])
            while c.marks and c.marks[0][0] <= recv:
                c.repl = c.marks.popleft()[1]
            if not self.alone:
                done = min(done, c.repl)
        if done > c.acked:
            c.acked = done
            c.ack_due = now + self.ack_interval_ns
            self._send(c, W.encode_ack(done, self.sessions[c.session, S_REJ:S_REJ + 8]))
        if c.acked >= c.held:
            self.unacked.discard(c)

    def _send(self, c: _Conn, data: bytes) -> None:
        if not send_or_queue(c.sock, c.out, data):
            self._close(c)
        elif c.out:
            self.backlog.add(c)

    def _flush(self, c: _Conn) -> None:
        if not flush(c.sock, c.out):
            self._close(c)
        elif not c.out:
            self.backlog.discard(c)

    def close(self) -> None:
        if self.rep is not None:
            self.rep.close()
        for c in list(self.conns.values()):
            self._close(c)
        if self.lsock is not None:
            self.ep.unregister(self.lfd)
            self.lsock.close()
        self.ep.close()
