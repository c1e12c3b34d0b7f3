"""The backup's side of replication, run by the ingest stage while the node is a backup.

The primary's mirror connects to ``[replication] listen``. The link is authenticated first
(:mod:`exposure.net.repl`: CHALLENGE, AUTH, WELCOME); nothing an unauthenticated peer sends is
looked at beyond its handshake frame, and a peer that fails it is refused and logged. Then
RECORDS frames (already sequenced by the primary) go into this node's compute ring (read by
compute and the journal)
exactly as the primary's ingest put them into its own (:func:`_push`), so compute and the
journal here produce the same tallies and the same journal. The session table's held marks
follow, so a promoted backup answers logins with what it holds.

This side acknowledges the highest gseq received (in its rings) and the highest durable (its
journal's), coalesced to one ACK per ``ack_interval_us``, and sends a HEARTBEAT when it has
had nothing to say for ``heartbeat_ms``. Both carry the echo of the newest primary
HEARTBEAT heard, at once when it is new: the primary's fence (:mod:`exposure.net.repl`). It
marks the node *in sync* once it holds what the primary had sequenced at the handshake (the
catch-up target); only an in-sync backup that etcd records as the synchronous member may
promote itself (:mod:`exposure.pair.election`). A RESET (this node's state cannot continue the
primary's) or a complete snapshot asks the supervisor to rebuild the node (``CTL_RELOAD``).

Liveness (:mod:`exposure.net.liveness`): the primary's mirror sends a HEARTBEAT every
``heartbeat_ms``; a primary that has sent nothing for ``failover_ms`` (hung, SIGSTOPped, a
host gone without a reset: the kernel still takes this side's bytes) is taken for dead and
its link closed (``CTL_HEARD_NS``, the last frame heard, is also what the supervisor's
promotion waits on). The check runs after every pass of the ingest loop, which never
sleeps more than a millisecond; after SIGCONT the primary's mirror connects again and the
link resumes from what this node holds.

**The port is bounded** (it runs on the ingest stage's hot thread, and anyone who can reach
it may connect): at most ``_MAX_LINKS`` connections, the oldest unauthenticated one evicted
for a new one at the cap (a flood never locks the real primary out); running out of
descriptors (EMFILE, ENFILE) is survived by :class:`exposure.net.guard.Listener` (a spare
descriptor: the pending connection is accepted and closed rather than left to spin the loop).
A peer must send a valid AUTH within ``_HANDSHAKE_NS``; before it, nothing is read beyond the
AUTH frame's bytes, anything else is a violation (REFUSE, close), and nothing is answered but
the CHALLENGE (and the REFUSE). An unauthenticated peer never touches the link's state: the
control-block words, the timers, the current link. Each pass reads at most ``_READ_BYTES``
and handles at most ``_FRAMES_PER_PASS`` frames per connection (the rest waits in ``pending``
and is handled on the following passes whether or not more bytes arrive). Sends never block:
what the socket does not take is queued up to ``_MAX_OUT`` bytes; a peer that lets more pile
up is disconnected. Accepted sockets use TCP keepalive (:func:`exposure.net.guard.keepalive`).
Every such event is counted in ``ReplicaStage.counters`` and logged at most once per
``_LOG_EVERY_S`` per kind (:class:`exposure.net.guard.RateLog`).
"""

from __future__ import annotations

import hmac
import logging
import os
import select
import socket
import time
from collections import deque
from pathlib import Path

import numpy as np
from numba import njit

from exposure.core import jit as _jit
from exposure.core.types import EVENT_WORDS, W_GSEQ, W_SESSION, W_SSEQ
from exposure.net import repl as R
from exposure.net.conn import GONE, SLOW, Conn, Conns, discard
from exposure.net.guard import Listener, RateLog, keepalive
from exposure.net.liveness import silent
from exposure.node.stages.sequencer import Sequencer
from exposure.shm import ring_layout as RL
from exposure.shm.control import (
    CTL_HEARD_NS,
    CTL_IN_SYNC,
    CTL_LINK,
    CTL_PEER_EPOCH,
    CTL_PRIMARY_GSEQ,
    CTL_RELOAD,
)
from exposure.shm.intrinsics import store_release
from exposure.shm.ring import journal_asleep, producer_head, sleeping
from exposure.shm.session_layout import S_DURABLE, S_HELD

__all__ = ["ReplicaStage", "RELOAD_RESET", "RELOAD_SNAPSHOT", "INCOMING", "COUNTERS"]

RELOAD_RESET = 1      # move the data directory's state aside and start empty
RELOAD_SNAPSHOT = 2   # ... and install the snapshot in INCOMING
INCOMING = "incoming"  # data_dir subdirectory for a snapshot being received

_OK, _FULL, _GAP = 0, 1, 2

# Bounds of the replication port (see the module docstring).
_MAX_LINKS = 8                  # connections: the primary and a few pending handshakes
_LISTEN_BACKLOG = 64
_ACCEPTS_PER_PASS = 16          # accept() calls per pass (a flood is evicted at this pace)
_HANDSHAKE_NS = 2_000_000_000   # a valid AUTH within this of the accept, or closed
_HELLO = R.HEADER.size + R.AUTH.size  # all an unauthenticated peer may send: one AUTH
_READ_BYTES = 256 << 10         # per connection and pass
_FRAMES_PER_PASS = 256          # per connection and pass
_MAX_OUT = 64 << 10             # bytes queued for a peer that does not read, then closed
_SNDBUF = 64 << 10              # the backup sends only small frames (ACK, HEARTBEAT, ...)
_KEEPIDLE_S, _KEEPINTVL_S, _KEEPCNT = 5, 2, 3
_LOG_EVERY_S = 5.0              # one log line per kind of event per this, with a count
_DISCARD = 64 << 10             # read (and dropped) before closing a misbehaving peer

# ReplicaStage.counters: connections accepted; unauthenticated ones evicted at the cap;
# connections refused (at the cap with none to evict, or while the node reloads); connections
# closed at EMFILE/ENFILE; other accept() failures; peers closed at the handshake deadline;
# AUTHs that did not verify; anything but an AUTH before authentication; peers that did not
# read what was queued for them.
COUNTERS = ("accepted", "evicted", "refused", "emfile", "accept_errors",
            "handshake_timeouts", "auth_failures", "preauth_violations", "slow_readers")


@njit(cache=True, _nrt=False)
def _push(words, lo, n, expect, ctrl, slots, sess_flat, ncols, res):
    """Records ``words[lo:n]`` into the compute ring (read by compute and the journal),
    verbatim, from gseq
    ``expect`` on (earlier ones are already held: skipped). Stops at a full ring (the rest
    is pushed later) or a gap in the sequence. Sets each session's held mark.

    Writes (why, next index, next expected gseq, pushed, compute asleep, journal asleep)
    to ``res``."""
    cap = slots.shape[0]
    mask = cap - 1
    tail = np.int64(ctrl[RL.W_TAIL])
    head = np.int64(ctrl[RL.W_HEAD_CACHE])
    t0 = tail
    why = _OK
    nsess = sess_flat.shape[0] // ncols
    k = lo
    while k < n:
        g = words[k, W_GSEQ]
        if g < expect:
            k += 1
            continue
        if g != expect:
            why = _GAP
            break
        head = producer_head(ctrl, tail, head, cap)
        if tail - head >= cap:
            why = _FULL
            break
        j = tail & mask
        for b in range(EVENT_WORDS):
            slots[j, b] = words[k, b]
        s = np.int64(words[k, W_SESSION] & np.uint64(0xFFFFFFFF))
        if 0 < s < nsess:
            sess_flat[s * ncols + S_HELD] = words[k, W_SSEQ]
        tail += 1
        expect += np.uint64(1)
        k += 1
    pushed = tail - t0
    asleep = 0
    tasleep = 0
    if pushed > 0:
        store_release(ctrl, RL.W_TAIL, tail)
        asleep = 1 if sleeping(ctrl, RL.W_CONSUMER_SLEEPING) else 0
        tasleep = journal_asleep(ctrl)
    res[0] = why
    res[1] = k
    res[2] = np.int64(expect)
    res[3] = pushed
    res[4] = asleep
    res[5] = tasleep


log = logging.getLogger(__name__)


class _Link(Conn):
    """A connection to the replication port (``since``: accepted; ``out``: frames queued,
    at most ``_MAX_OUT``)."""

    __slots__ = ("reader", "nonce", "authed", "hello", "pending", "pending_at", "snap",
                 "snap_path", "snap_left")

    def __init__(self, sock: socket.socket, addr):
        super().__init__(sock, addr, None, _MAX_OUT)
        self.reader = R.ReplReader()  # used once authenticated
        self.nonce = os.urandom(R.NONCE)
        self.authed = False
        self.hello = bytearray()  # the AUTH frame's bytes so far (before authentication)
        self.pending: deque = deque()  # frames received, not handled yet (RECORDS: not
        self.pending_at = 0            # wholly in the rings); index into pending[0]
        self.snap = None          # an open snapshot file being received
        self.snap_path: Path | None = None
        self.snap_left = 0


_peer = Conn.peer  # _peer(ln): "host:port" of a link's peer


class ReplicaStage:
    """Accepts the primary's mirror, puts what it sends into the rings (see the module
    docstring). ``seq`` (:class:`exposure.node.stages.sequencer.Sequencer`, ingest's) holds the
    next gseq this node expects and the compute ring; ingest goes on with it on promotion.
    ``counters``: events on the port (:data:`COUNTERS`)."""

    def __init__(self, listen: tuple[str, int], secret: bytes, ctl: np.ndarray,
                 sessions: np.ndarray, seq: Sequencer,
                 last_record: np.ndarray | None, data_dir: Path, heartbeat_ms: int,
                 failover_ms: int, ack_interval_us: int):
        self.secret = secret
        self.ctl = ctl
        self.sessions = sessions
        self.sess_flat = sessions.reshape(-1)
        self.ncols = sessions.shape[1]
        self.seq = seq
        self.last_record = (last_record.copy() if last_record is not None
                            else np.zeros(EVENT_WORDS, np.uint64))
        self.data_dir = Path(data_dir)
        self.heartbeat_ns = heartbeat_ms * 1_000_000
        self.failover_ns = failover_ms * 1_000_000
        self.ack_interval_ns = ack_interval_us * 1000
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.log = RateLog(log, _LOG_EVERY_S)
        self.ep = select.epoll()
        self.links: Conns = Conns(self.ep)   # fd -> _Link
        self.hellos: dict[int, _Link] = {}   # the unauthenticated ones, oldest first
        self.backlog: set[_Link] = set()     # links with bytes the socket did not take
        self.link: _Link | None = None  # the authenticated one
        self.acked = (-1, -1, -1)
        self.echo = 0               # the newest primary HEARTBEAT time heard (its clock)
        self.last_sent = 0          # the authenticated link's last send
        self.reloading = False
        self.res = np.zeros(6, np.int64)
        self.listener: Listener | None = None
        try:
            self.listener = Listener(listen, _LISTEN_BACKLOG)
            self.lfd = self.listener.fd
            self.ep.register(self.lfd, select.EPOLLIN)
            w = np.zeros((1, EVENT_WORDS), np.uint64)
            self._push = _jit.entry(_push, w, 0, 0, np.uint64(0), seq.ctrl, seq.slots,
                                    self.sess_flat, self.ncols, self.res)
        except BaseException:
            self.close()
            raise
        ctl[CTL_LINK] = 0

    # ------------------------------------------------------------------ loop
    def poll(self, timeout: float = 0) -> int:
        work = 0
        drained = self.link
        if drained is not None and drained.pending:  # what an earlier pass's budget left
            work += self._drain(drained)
            timeout = 0  # (level-triggered epoll: unread bytes would not wait anyway)
        else:
            drained = None
        for fd, _ in self.ep.poll(timeout):
            if fd == self.lfd:
                work += self._accept()
                continue
            ln = self.links.get(fd)
            if ln is None or ln.pending or ln is drained:  # (its frames come first; one
                continue                                   # budget per pass)
            work += self._read(ln) if ln.authed else self._read_hello(ln)
        return work

    def after(self) -> None:
        now = time.monotonic_ns()
        while self.hellos:  # the oldest first: stop at the first one still in time
            old = next(iter(self.hellos.values()))
            if now - old.since <= _HANDSHAKE_NS:
                break
            self._event("handshake_timeouts", f"closed replication peer {_peer(old)}: "
                        f"no valid AUTH within {_HANDSHAKE_NS / 1e9:g} s")
            self._close(old)
        if self.backlog:
            for b in list(self.backlog):
                self._flush(b)
        ln = self.link
        if ln is None:
            return
        heard = int(self.ctl[CTL_HEARD_NS])
        if silent(now, heard, self.failover_ns):
            log.warning(f"the primary at {_peer(ln)} has been silent for "
                        f"{(now - heard) / 1e6:.0f} ms; closing the link")
            self._close(ln)
            return
        received = self.seq.last
        durable = int(self.sessions[0, S_DURABLE])
        # a new echo goes out at once: the primary's fence waits for it
        if (self.echo != self.acked[2] or (received, durable) != self.acked[:2]
                and now - self.last_sent >= self.ack_interval_ns):
            self.acked = (received, durable, self.echo)
            self._send(ln, R.frame(R.K_ACK, R.ACK.pack(received, durable, self.echo)), now)
        elif now - self.last_sent >= self.heartbeat_ns:
            self._send(ln, R.frame(R.K_HEARTBEAT, R.BEAT.pack(received, 0, self.echo)), now)

    # ------------------------------------------------------------------ events
    def _event(self, kind: str, msg: str) -> None:
        """Count an event of ``kind`` and log it, rate-limited per kind."""
        self.counters[kind] += 1
        self.log(kind, msg)

    # ------------------------------------------------------------------ connections
    def _accept(self) -> int:
        work = 0
        lis = self.listener
        for _ in range(_ACCEPTS_PER_PASS):
            got = lis.accept_addr(self.log)
            if got is None:  # none pending, or one closed at EMFILE (counted below), or an
                break        # accept() failure (ENOBUFS, ...): tried again on a later pass
            work += 1
            s, addr = got
            if self.reloading:
                s.close()
                self.counters["refused"] += 1
                continue
            self._admit(s, addr)
        if lis.fd_limit or lis.accept_errors:
            work += lis.fd_limit
            self.counters["emfile"] += lis.fd_limit
            self.counters["accept_errors"] += lis.accept_errors
            lis.fd_limit = lis.accept_errors = 0
        return work

    def _admit(self, s: socket.socket, addr) -> None:
        if len(self.links) >= _MAX_LINKS:
            if self.hellos:
                old = next(iter(self.hellos.values()))
                self._event("evicted", f"{_MAX_LINKS} connections on the replication port: "
                            f"closed the oldest unauthenticated one ({_peer(old)})")
                self._close(old)
            else:  # (only one link is ever authenticated: not reached with _MAX_LINKS > 1)
                self._event("refused", f"{_MAX_LINKS} connections on the replication port: "
                            "refused a new one")
                s.close()
                return
        try:  # (non-blocking and TCP_NODELAY already: Listener)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            keepalive(s, _KEEPIDLE_S, _KEEPINTVL_S, _KEEPCNT)
            ln = _Link(s, addr)
            self.links.add(ln)
        except OSError:
            s.close()
            return
        self.counters["accepted"] += 1
        self.hellos[ln.fd] = ln
        self._send(ln, R.frame(R.K_CHALLENGE, ln.nonce))

    def _close(self, ln: _Link) -> None:
        if not self.links.drop(ln):
            return  # closed already (its descriptor number may belong to a newer link)
        self.hellos.pop(ln.fd, None)
        self.backlog.discard(ln)
        ln.pending.clear()
        if ln.snap is not None:
            ln.snap.close()
            if ln.snap_path is not None:
                ln.snap_path.unlink(missing_ok=True)
        if self.link is ln:
            self.link = None
            self.ctl[CTL_LINK] = 0
        ln.sock.close()

    def _refuse(self, ln: _Link, code: int, text: str, kind: str = "") -> None:
        """A REFUSE, sent as far as the socket takes it now (never waited for), then close.
        ``kind``: the event counted and logged (rate-limited); none: logged as is."""
        msg = f"refused replication peer {_peer(ln)}: {text}"
        if kind:
            self._event(kind, msg)
        else:
            log.warning(msg)
        if not ln.authed:  # what it sent beyond its frame: read, so the close is a FIN
            discard(ln.sock, _DISCARD)
        ln.send_now(bytes(ln.out) + R.frame(R.K_REFUSE, code.to_bytes(2, "little")
                                            + text.encode()[:500]))  # (never waited for)
        self._close(ln)

    def _send(self, ln: _Link, data: bytes, now: int = 0) -> None:
        if ln is self.link:  # (the link's timer: no other connection may move it)
            self.last_sent = now or time.monotonic_ns()
        r = ln.send(data)
        if r == SLOW:
            self._event("slow_readers", f"closed replication peer {_peer(ln)}: it does not "
                        f"read ({len(ln.out) + len(data)} bytes queued)")
            self._close(ln)
        elif r == GONE:
            self._close(ln)
        elif ln.out:
            self.backlog.add(ln)

    def _flush(self, ln: _Link) -> None:
        if not ln.flush():
            self._close(ln)
        elif not ln.out:
            self.backlog.discard(ln)

    def _read_hello(self, ln: _Link) -> int:
        """Before authentication: the bytes of one AUTH frame, no more."""
        data = ln.recv(_HELLO - len(ln.hello))
        if data is None:
            return 0
        if not data:
            self._close(ln)
            return 1
        h = ln.hello
        h += data
        if len(h) >= R.HEADER.size:
            magic, version, kind, length = R.HEADER.unpack_from(h)
            if magic != R.MAGIC or version != R.VERSION:
                self._refuse(ln, R.E_PROTOCOL, "not a replication frame before AUTH",
                             "preauth_violations")
                return 1
            if kind != R.K_AUTH or length != R.AUTH.size:
                self._refuse(ln, R.E_PROTOCOL, f"frame kind {kind} ({length} bytes) before "
                             "AUTH", "preauth_violations")
                return 1
        if len(h) == _HELLO:
            self._auth(ln, bytes(h[R.HEADER.size:]))
        return 1

    def _read(self, ln: _Link) -> int:
        data = ln.recv(_READ_BYTES)
        if data is None:
            return 0
        if not data:
            log.warning(f"the primary at {_peer(ln)} closed the link")
            self._close(ln)
            return 1
        self.ctl[CTL_HEARD_NS] = time.monotonic_ns()
        try:
            frames = ln.reader.feed(data)
        except R.ReplError as e:
            self._refuse(ln, e.code, str(e))
            return 1
        if frames:
            ln.pending.extend(frames)
            self._drain(ln)
        return 1

    # ------------------------------------------------------------------ frames
    def _frame(self, ln: _Link, kind: int, payload) -> None:
        """A frame of the authenticated link other than RECORDS (see _drain)."""
        if kind == R.K_HEARTBEAT:
            self.echo = max(self.echo, R.BEAT.unpack(payload)[2])
            self._check_sync()
        elif kind == R.K_RESET:
            log.warning(f"the primary says this node's state cannot continue its own: "
                        f"{payload.decode(errors='replace')}; moving it aside and rebuilding")
            self._reload(ln, RELOAD_RESET)
        elif kind in (R.K_SNAP_BEGIN, R.K_SNAP_DATA, R.K_SNAP_END):
            try:
                self._snap(ln, kind, payload)
            except OSError as e:  # (a full disk: the primary retries the link)
                self._refuse(ln, R.E_PROTOCOL, f"cannot store the snapshot: "
                             f"{e.strerror or e}")
        elif kind == R.K_REFUSE:
            log.warning(f"the primary refused: {payload[2:].decode(errors='replace')}")
            self._close(ln)
        else:
            self._refuse(ln, R.E_PROTOCOL, f"a primary may not send frame kind {kind}")

    def _auth(self, ln: _Link, payload: bytes) -> None:
        proof, nonce, epoch, tail = R.AUTH.unpack(payload)
        if not hmac.compare_digest(proof, R.mac(self.secret, "primary", ln.nonce)):
            self._refuse(ln, R.E_AUTH, "its AUTH does not verify (a wrong secret?)",
                         "auth_failures")
            return
        del self.hellos[ln.fd]  # authenticated: no handshake deadline, never evicted
        known = int(self.ctl[CTL_PEER_EPOCH])
        last = self.seq.last
        rec = self.last_record if last else np.zeros(EVENT_WORDS, np.uint64)
        welcome = R.frame(R.K_WELCOME, R.WELCOME.pack(R.mac(self.secret, "backup", nonce),
                                                      last, known, rec.tobytes()))
        if epoch < known:
            # A stale primary: it is told the newer epoch in an authenticated WELCOME (an
            # unauthenticated refusal must not be able to demote a primary), then dropped.
            self._send(ln, welcome)
            self._refuse(ln, R.E_EPOCH, f"it is at epoch {epoch}, this node knows epoch "
                         f"{known}")
            return
        if self.link is not None:  # a primary that reconnects: the new link wins
            log.info("a new authenticated link replaces the old one")
            self._close(self.link)
        ln.authed = True
        self.link = ln
        # Not in sync *before* the new epoch is visible: the supervisor reads the epoch,
        # then the flag, so it never takes an old "in sync" for the new epoch's.
        self.ctl[CTL_IN_SYNC] = 0
        self.ctl[CTL_PEER_EPOCH] = epoch
        self.ctl[CTL_PRIMARY_GSEQ] = tail
        self.ctl[CTL_HEARD_NS] = time.monotonic_ns()
        self.ctl[CTL_LINK] = 1
        self.acked = (-1, -1, -1)
        self.echo = 0
        self._send(ln, welcome)
        log.info(f"following the primary at {_peer(ln)} (epoch {epoch}); "
                 f"holding gseq {last}, its journal is at {tail}")
        self._check_sync()

    def _check_sync(self) -> None:
        if not self.ctl[CTL_IN_SYNC] and self.seq.last >= int(self.ctl[CTL_PRIMARY_GSEQ]):
            self.ctl[CTL_IN_SYNC] = 1
            log.info(f"in sync with the primary at gseq {self.seq.last}")

    def _drain(self, ln: _Link) -> int:
        """Handle the link's pending frames in order, at most _FRAMES_PER_PASS of them: push
        RECORDS into the rings (stopping at a full ring), the others by _frame. Returns the
        work done (records pushed, frames handled)."""
        res = self.res
        work = 0
        budget = _FRAMES_PER_PASS
        while ln.pending and budget > 0 and self.links.get(ln.fd) is ln:
            budget -= 1
            kind, payload = ln.pending[0]
            if kind != R.K_RECORDS:
                ln.pending.popleft()
                work += 1
                self._frame(ln, kind, payload)
                continue
            self._push(payload, ln.pending_at, len(payload), np.uint64(self.seq.next_gseq),
                       self.seq.ctrl, self.seq.slots, self.sess_flat, self.ncols, res)
            why, k, n = int(res[0]), int(res[1]), int(res[3])
            if n:
                work += n
                self.seq.commit(n, int(res[4]), int(res[5]))  # (next: res[2])
                self.last_record = payload[k - 1].copy()
            if why == _GAP:
                self._refuse(ln, R.E_PROTOCOL, f"gseq {int(payload[k, W_GSEQ])} after "
                             f"{self.seq.last}: a gap")
                return work
            if why == _FULL:
                ln.pending_at = k
                return work
            ln.pending.popleft()
            ln.pending_at = 0
        self._check_sync()
        return work

    def _snap(self, ln: _Link, kind: int, payload: bytes) -> None:
        if kind == R.K_SNAP_BEGIN:
            if ln.snap is not None:
                self._refuse(ln, R.E_PROTOCOL, "SNAP_BEGIN inside a snapshot")
                return
            self._snap_begin(ln, payload)
        elif kind == R.K_SNAP_DATA:
            if ln.snap is None or len(payload) > ln.snap_left:
                self._refuse(ln, R.E_PROTOCOL, "SNAP_DATA outside a snapshot")
                return
            ln.snap.write(payload)
            ln.snap_left -= len(payload)
        else:
            self._snap_end(ln)

    def _snap_begin(self, ln: _Link, payload: bytes) -> None:
        gseq, size = R.SNAP_BEGIN.unpack(payload)
        from exposure.store.snapshot import snapshot_name as _name

        inc = self.data_dir / INCOMING
        inc.mkdir(parents=True, exist_ok=True)
        ln.snap_path = inc / (_name(gseq) + ".part")
        ln.snap = open(ln.snap_path, "wb")  # noqa: SIM115  (closed at SNAP_END or _close)
        ln.snap_left = size
        log.info(f"receiving the primary's snapshot at gseq {gseq} ({size / 2**20:.1f} MiB)")

    def _snap_end(self, ln: _Link) -> None:
        if ln.snap is None or ln.snap_left:
            self._refuse(ln, R.E_PROTOCOL, "SNAP_END before the whole snapshot")
            return
        ln.snap.flush()
        os.fsync(ln.snap.fileno())
        ln.snap.close()
        ln.snap = None
        final = ln.snap_path.with_suffix("")  # drop ".part"
        os.replace(ln.snap_path, final)
        ln.snap_path = None
        self._reload(ln, RELOAD_SNAPSHOT)

    def _reload(self, ln: _Link, how: int) -> None:
        """Stop taking anything and ask the supervisor to rebuild the node."""
        self.reloading = True
        self._close(ln)
        for other in list(self.links.values()):
            self._close(other)
        self.ctl[CTL_RELOAD] = how

    def close(self) -> None:
        for ln in list(self.links.values()):
            self._close(ln)
        self.ep.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None


assert _jit is not None
