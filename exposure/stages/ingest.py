"""Ingest stage: TCP sessions from upstream systems into the compute ring.

A session logs in with its id (1..max_sessions; one connection per id at a time) and is told
the last session seq the node holds. Its EVENTS frames carry records numbered by session
seq; records at or below what the node holds are dropped (a client may resend after a
reconnect). Ingest stamps each kept record with the session id, the receive time and the
next global seq, and pushes it to the compute ring; when the ring is full the session's
records wait (and its socket is not read) until there is room. The node acknowledges to
each session the highest seq that compute has processed, with the session's rejects per
reason.

A client's bytes never harm the node: a malformed frame gets a REJECT and the session is
closed; other sessions and the tallies are untouched.
"""

from __future__ import annotations

import selectors
import socket
import struct
import time

import numpy as np
from numba import njit

from .. import _jit  # noqa: F401
from .. import wire as W
from ..shm.ring import ring_push
from ..shm.wait import WaitStrategy
from ..types import EVENT_WORDS, W_EPOCH, W_GSEQ, W_RECV_NS, W_SESSION, W_SSEQ
from .compute import S_DONE, S_HELD, S_REJ

__all__ = ["IngestStage"]

_HIGH = np.uint64(0xFFFF_FFFF_0000_0000)  # keeps the high half of a shared word


@njit(cache=True, _nrt=False)
def _stamp_and_push(w, held, session, now, gseq, ctrl, slots, out):
    """Keep the records with new, increasing session seqs; stamp session, receive time,
    epoch 0 and global seqs; push them to the ring. Returns (kept, pushed, new held seq);
    kept records are in ``out[:kept]`` (those past ``pushed`` did not fit in the ring)."""
    kept = 0
    for k in range(w.shape[0]):
        s = w[k, W_SSEQ]
        if s <= held:
            continue  # already held: a resend
        held = s
        for j in range(EVENT_WORDS):
            out[kept, j] = w[k, j]
        out[kept, W_SESSION] = (out[kept, W_SESSION] & _HIGH) | session
        out[kept, W_EPOCH] &= _HIGH
        out[kept, W_RECV_NS] = now
        out[kept, W_GSEQ] = gseq + np.uint64(kept)
        kept += 1
    pushed = ring_push(ctrl, slots, out, kept)
    return kept, pushed, held


class _Conn:
    __slots__ = ("sock", "reader", "session", "pending", "pending_stamped", "acked", "out")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = W.FrameReader()
        self.session = 0
        self.pending = np.zeros((0, EVENT_WORDS), np.uint64)  # records as u8 words
        self.pending_stamped = False  # True: deduplicated and stamped, only gseq to set
        self.acked = -1
        self.out = bytearray()


class IngestStage:
    def __init__(self, host: str, port: int, sessions: np.ndarray, out_ring, next_gseq: int,
                 max_sessions: int):
        self.sessions = sessions
        self.out = out_ring
        self.max_sessions = max_sessions
        self.next_gseq = next_gseq
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, port))
        self.lsock.listen(128)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ, None)
        self.conns: dict[int, _Conn] = {}
        self.scratch = np.zeros((W.MAX_RECORDS, EVENT_WORDS), np.uint64)
        self.by_session: dict[int, _Conn] = {}

    # ------------------------------------------------------------------ loop
    def poll(self, timeout: float | None = 0) -> int:
        work = 0
        for key, _ in self.sel.select(timeout):
            if key.data is None:
                work += self._accept()
            else:
                work += self._read(key.data)
        for c in list(self.conns.values()):
            if len(c.pending):
                work += self._push(c)
            self._ack(c)
            if c.out:
                self._flush(c)
        return work

    def _accept(self) -> int:
        try:
            s, _ = self.lsock.accept()
        except BlockingIOError:
            return 0
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = _Conn(s)
        self.conns[s.fileno()] = c
        self.sel.register(s, selectors.EVENT_READ, c)
        return 1

    def _close(self, c: _Conn) -> None:
        if c.session and c.pending_stamped and len(c.pending):
            # Records accepted but never pushed (the ring was full) die with the connection:
            # the node must not claim to hold them, or the client would never resend them.
            self.sessions[c.session, S_HELD] = c.pending[0, W_SSEQ] - np.uint64(1)
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(c.sock.fileno(), None)
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
        if len(c.pending):
            return 0  # back-pressure: do not read while this session's records wait
        try:
            data = c.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            data = b""
        if not data:
            self._close(c)  # the client went away (possibly mid-frame: nothing applied)
            return 1
        try:
            frames = c.reader.feed(data)
        except W.ProtocolError as e:
            self._reject(c, e.code, str(e))
            return 1
        for kind, payload in frames:
            if kind == W.K_LOGIN:
                self._login(c, payload)
            elif kind == W.K_EVENTS:
                if not c.session:
                    self._reject(c, W.E_NOT_LOGGED_IN, "EVENTS before LOGIN")
                    return 1
                self._events(c, payload)
            elif kind == W.K_HEARTBEAT:
                c.out += W.encode_heartbeat()
            else:
                self._reject(c, W.E_PROTOCOL, f"a client may not send frame kind {kind}")
                return 1
            if c.sock.fileno() < 0:
                return 1
        return 1

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
            self.by_session[sid] = c
            c.out += W.encode_login_ok(int(self.sessions[sid, S_HELD]))

    def _events(self, c: _Conn, recs: np.ndarray) -> None:
        w = recs.view(np.uint64).reshape(len(recs), EVENT_WORDS)
        if len(c.pending):  # still backed up: queue behind (stamped when pushed)
            c.pending = np.concatenate([c.pending, w])
            return
        self._stamp_push(c, w)

    def _stamp_push(self, c: _Conn, w: np.ndarray) -> int:
        # One call does the dedup, stamping, global seqs and the ring push (numpy calls on a
        # one-record frame would cost microseconds each).
        held = np.uint64(self.sessions[c.session, S_HELD])
        kept, pushed, new_held = _stamp_and_push(
            w, held, np.uint64(c.session), np.uint64(time.time_ns()),
            np.uint64(self.next_gseq), self.out.ctrl, self.out.slots, self.scratch)
        self.next_gseq += pushed
        self.sessions[c.session, S_HELD] = new_held
        if pushed < kept:  # ring full: keep the stamped-but-unpushed rest, in order
            c.pending = self.scratch[pushed:kept].copy()
            c.pending_stamped = True
        if pushed:
            WaitStrategy.wake(self.out)  # a compute process that sleeps on the ring
        return pushed

    def _push(self, c: _Conn) -> int:
        p = c.pending
        if not c.pending_stamped:
            c.pending = np.zeros((0, EVENT_WORDS), np.uint64)
            return self._stamp_push(c, p)
        n = len(p)
        p[:, W_GSEQ] = np.arange(self.next_gseq, self.next_gseq + n, dtype=np.uint64)
        m = ring_push(self.out.ctrl, self.out.slots, p, n)
        self.next_gseq += m
        c.pending = p[m:]
        if not len(c.pending):
            c.pending_stamped = False
        if m:
            WaitStrategy.wake(self.out)
        return m

    def _ack(self, c: _Conn) -> None:
        if not c.session:
            return
        done = int(self.sessions[c.session, S_DONE])
        if done > c.acked:
            c.acked = done
            c.out += W.encode_ack(done, self.sessions[c.session, S_REJ:S_REJ + 8])

    def _flush(self, c: _Conn) -> None:
        try:
            n = c.sock.send(c.out)
            del c.out[:n]
        except BlockingIOError:
            pass
        except OSError:
            self._close(c)

    def close(self) -> None:
        for c in list(self.conns.values()):
            self._close(c)
        self.sel.unregister(self.lsock)
        self.lsock.close()
        self.sel.close()
