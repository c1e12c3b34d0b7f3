"""The backup's side of replication, run by the ingest stage while the node is a backup.

The primary's mirror connects to ``[replication] listen``. The link is authenticated first
(:mod:`exposure.repl`: CHALLENGE, AUTH, WELCOME); nothing an unauthenticated peer sends is
looked at beyond its handshake frame, and a peer that fails it is refused and logged. Then
RECORDS frames (already sequenced by the primary) go into this node's compute and tap rings
exactly as the primary's ingest put them into its own (:func:`_push`), so compute and the
journal here produce the same tallies and the same journal. The session table's held marks
follow, so a promoted backup answers logins with what it holds.

This side acknowledges the highest gseq received (in its rings) and the highest durable (its
journal's), coalesced to one ACK per ``ack_interval_us``, and sends a HEARTBEAT when it has
had nothing to say for ``heartbeat_ms``. Both carry the echo of the newest primary
HEARTBEAT heard, at once when it is new: the primary's fence (:mod:`exposure.repl`). It
marks the node *in sync* once it holds what the primary had sequenced at the handshake (the
catch-up target); only an in-sync backup that etcd records as the synchronous member may
promote itself (:mod:`exposure.election`). A RESET (this node's state cannot continue the
primary's) or a complete snapshot asks the supervisor to rebuild the node (``CTL_RELOAD``).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit

from .. import _jit
from .. import repl as R
from .._sock import flush, send_or_queue
from ..shm import ring_layout as RL
from ..shm.control import (
    CTL_HEARD_NS,
    CTL_IN_SYNC,
    CTL_LINK,
    CTL_PEER_EPOCH,
    CTL_PRIMARY_GSEQ,
    CTL_RELOAD,
)
from ..shm.intrinsics import load_acquire, store_release
from ..shm.ring import sleeping
from ..types import EVENT_WORDS, W_GSEQ, W_SESSION, W_SSEQ
from .compute import S_DURABLE, S_HELD

__all__ = ["ReplicaStage", "RELOAD_RESET", "RELOAD_SNAPSHOT", "INCOMING"]

RELOAD_RESET = 1      # move the data directory's state aside and start empty
RELOAD_SNAPSHOT = 2   # ... and install the snapshot in INCOMING
INCOMING = "incoming"  # data_dir subdirectory for a snapshot being received

_OK, _FULL, _GAP = 0, 1, 2


@njit(cache=True, _nrt=False)
def _push(words, lo, n, expect, ctrl, slots, tctrl, tslots, sess_flat, ncols, res):
    """Records ``words[lo:n]`` into the compute and tap rings, verbatim, from gseq
    ``expect`` on (earlier ones are already held: skipped). Stops at a full ring (the rest
    is pushed later) or a gap in the sequence. Sets each session's held mark.

    Writes (why, next index, next expected gseq, pushed, compute asleep, tap asleep) to
    ``res``."""
    cap = slots.shape[0]
    mask = cap - 1
    tail = np.int64(ctrl[RL.W_TAIL])
    head = np.int64(ctrl[RL.W_HEAD_CACHE])
    tcap = tslots.shape[0]
    tmask = tcap - 1
    ttail = np.int64(tctrl[RL.W_TAIL])
    thead = np.int64(tctrl[RL.W_HEAD_CACHE])
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
        if tail - head >= cap:
            head = np.int64(load_acquire(ctrl, RL.W_HEAD))
            ctrl[RL.W_HEAD_CACHE] = head
            if tail - head >= cap:
                why = _FULL
                break
        if ttail - thead >= tcap:
            thead = np.int64(load_acquire(tctrl, RL.W_HEAD))
            tctrl[RL.W_HEAD_CACHE] = thead
            if ttail - thead >= tcap:
                why = _FULL
                break
        j = tail & mask
        jt = ttail & tmask
        for b in range(EVENT_WORDS):
            slots[j, b] = words[k, b]
            tslots[jt, b] = words[k, b]
        s = np.int64(words[k, W_SESSION] & np.uint64(0xFFFFFFFF))
        if 0 < s < nsess:
            sess_flat[s * ncols + S_HELD] = words[k, W_SSEQ]
        tail += 1
        ttail += 1
        expect += np.uint64(1)
        k += 1
    pushed = tail - t0
    asleep = 0
    tasleep = 0
    if pushed > 0:
        store_release(tctrl, RL.W_TAIL, ttail)
        tasleep = 1 if sleeping(tctrl, RL.W_CONSUMER_SLEEPING) else 0
        store_release(ctrl, RL.W_TAIL, tail)
        asleep = 1 if sleeping(ctrl, RL.W_CONSUMER_SLEEPING) else 0
    res[0] = why
    res[1] = k
    res[2] = np.int64(expect)
    res[3] = pushed
    res[4] = asleep
    res[5] = tasleep


def _log(msg: str) -> None:
    print(f"exposure replica: {msg}", file=sys.stderr, flush=True)


class _Link:
    __slots__ = ("sock", "fd", "addr", "reader", "nonce", "authed", "out", "since",
                 "pending", "pending_at", "snap", "snap_path", "snap_left")

    def __init__(self, sock: socket.socket, addr):
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.reader = R.ReplReader()
        self.nonce = os.urandom(R.NONCE)
        self.authed = False
        self.out = bytearray()
        self.since = time.monotonic_ns()
        self.pending: list = []   # RECORDS frames not yet (wholly) in the rings
        self.pending_at = 0       # index into pending[0]
        self.snap = None          # an open snapshot file being received
        self.snap_path: Path | None = None
        self.snap_left = 0


class ReplicaStage:
    """Accepts the primary's mirror, puts what it sends into the rings (see the module
    docstring). ``next_gseq`` is the next gseq this node expects (the ingest stage takes it
    over on promotion)."""

    def __init__(self, listen: tuple[str, int], secret: bytes, ctl: np.ndarray,
                 sessions: np.ndarray, out_ring, tap_ring, next_gseq: int,
                 last_record: np.ndarray | None, data_dir: Path, heartbeat_ms: int,
                 failover_ms: int, ack_interval_us: int):
        self.secret = secret
        self.ctl = ctl
        self.sessions = sessions
        self.sess_flat = sessions.reshape(-1)
        self.ncols = sessions.shape[1]
        self.out, self.tap = out_ring, tap_ring
        self.next_gseq = next_gseq
        self.last_record = (last_record.copy() if last_record is not None
                            else np.zeros(EVENT_WORDS, np.uint64))
        self.data_dir = Path(data_dir)
        self.heartbeat_ns = heartbeat_ms * 1_000_000
        self.failover_ns = failover_ms * 1_000_000
        self.ack_interval_ns = ack_interval_us * 1000
        self.ep = select.epoll()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(listen)
        self.lsock.listen(8)
        self.lsock.setblocking(False)
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self.links: dict[int, _Link] = {}
        self.link: _Link | None = None  # the authenticated one
        self.acked = (-1, -1, -1)
        self.echo = 0               # the newest primary HEARTBEAT time heard (its clock)
        self.last_sent = 0
        self.reloading = False
        self.res = np.zeros(6, np.int64)
        w = np.zeros((1, EVENT_WORDS), np.uint64)
        self._push = _jit.entry(_push, w, 0, 0, np.uint64(0), out_ring.ctrl, out_ring.slots,
                                tap_ring.ctrl, tap_ring.slots, self.sess_flat, self.ncols,
                                self.res)
        ctl[CTL_LINK] = 0

    # ------------------------------------------------------------------ loop
    def poll(self, timeout: float = 0) -> int:
        work = 0
        for fd, _ in self.ep.poll(timeout):
            if fd == self.lsock.fileno():
                work += self._accept()
            else:
                ln = self.links.get(fd)
                if ln is not None and not ln.pending:
                    work += self._read(ln)
        if self.link is not None and self.link.pending:
            work += self._drain(self.link)
        return work

    def after(self) -> None:
        now = time.monotonic_ns()
        for ln in list(self.links.values()):
            if not ln.authed and now - ln.since > 2_000_000_000:
                self._refuse(ln, R.E_PROTOCOL, "no valid AUTH within 2 s")
        ln = self.link
        if ln is None:
            return
        if now - int(self.ctl[CTL_HEARD_NS]) > self.failover_ns:
            _log(f"the primary at {ln.addr[0]}:{ln.addr[1]} has been silent for "
                 f"{(now - int(self.ctl[CTL_HEARD_NS])) / 1e6:.0f} ms; closing the link")
            self._close(ln)
            return
        received = self.next_gseq - 1
        durable = int(self.sessions[0, S_DURABLE])
        # a new echo goes out at once: the primary's fence waits for it
        if (self.echo != self.acked[2] or (received, durable) != self.acked[:2]
                and now - self.last_sent >= self.ack_interval_ns):
            self.acked = (received, durable, self.echo)
            self._send(ln, R.frame(R.K_ACK, R.ACK.pack(received, durable, self.echo)), now)
        elif now - self.last_sent >= self.heartbeat_ns:
            self._send(ln, R.frame(R.K_HEARTBEAT, R.BEAT.pack(received, 0, self.echo)), now)
        if ln.out and ln.fd in self.links:
            self._flush(ln)

    # ------------------------------------------------------------------ connections
    def _accept(self) -> int:
        try:
            s, addr = self.lsock.accept()
        except BlockingIOError:
            return 0
        if self.reloading:
            s.close()
            return 1
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ln = _Link(s, addr)
        self.links[ln.fd] = ln
        self.ep.register(ln.fd, select.EPOLLIN)
        self._send(ln, R.frame(R.K_CHALLENGE, ln.nonce))
        return 1

    def _close(self, ln: _Link) -> None:
        if self.links.get(ln.fd) is not ln:
            return  # closed already (its descriptor number may belong to a newer link)
        try:
            self.ep.unregister(ln.fd)
        except (KeyError, ValueError, OSError):
            pass
        del self.links[ln.fd]
        if ln.snap is not None:
            ln.snap.close()
            if ln.snap_path is not None:
                ln.snap_path.unlink(missing_ok=True)
        if self.link is ln:
            self.link = None
            self.ctl[CTL_LINK] = 0
        ln.sock.close()

    def _refuse(self, ln: _Link, code: int, text: str) -> None:
        _log(f"refused replication peer {ln.addr[0]}:{ln.addr[1]}: {text}")
        try:
            ln.sock.send(bytes(ln.out) + R.frame(R.K_REFUSE, code.to_bytes(2, "little")
                                                   + text.encode()[:500]))
        except OSError:
            pass
        self._close(ln)

    def _send(self, ln: _Link, data: bytes, now: int = 0) -> None:
        self.last_sent = now or time.monotonic_ns()
        if not send_or_queue(ln.sock, ln.out, data):
            self._close(ln)

    def _flush(self, ln: _Link) -> None:
        if not flush(ln.sock, ln.out):
            self._close(ln)

    def _read(self, ln: _Link) -> int:
        try:
            data = ln.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            data = b""
        if not data:
            if ln.authed:
                _log(f"the primary at {ln.addr[0]}:{ln.addr[1]} closed the link")
            self._close(ln)
            return 1
        if ln.authed:
            self.ctl[CTL_HEARD_NS] = time.monotonic_ns()
        try:
            frames = ln.reader.feed(data)
        except R.ReplError as e:
            self._refuse(ln, e.code, str(e))
            return 1
        for kind, payload in frames:
            if ln.fd not in self.links:
                break
            if ln.pending:  # records wait for ring space: everything after them waits too
                ln.pending.append((kind, payload))
                continue
            self._frame(ln, kind, payload)
        if ln.pending:
            self._drain(ln)
        return 1

    # ------------------------------------------------------------------ frames
    def _frame(self, ln: _Link, kind: int, payload) -> None:
        if not ln.authed:
            if kind != R.K_AUTH:
                self._refuse(ln, R.E_PROTOCOL, f"frame kind {kind} before AUTH")
            else:
                self._auth(ln, payload)
            return
        if kind == R.K_RECORDS:
            ln.pending.append((kind, payload))
            ln.pending_at = 0
            self._drain(ln)
        elif kind == R.K_HEARTBEAT:
            self.echo = max(self.echo, R.BEAT.unpack(payload)[2])
            self._check_sync()
        elif kind == R.K_RESET:
            _log(f"the primary says this node's state cannot continue its own: "
                 f"{payload.decode(errors='replace')}; moving it aside and rebuilding")
            self._reload(ln, RELOAD_RESET)
        elif kind == R.K_SNAP_BEGIN:
            self._snap_begin(ln, payload)
        elif kind == R.K_SNAP_DATA:
            if ln.snap is None or len(payload) > ln.snap_left:
                self._refuse(ln, R.E_PROTOCOL, "SNAP_DATA outside a snapshot")
                return
            ln.snap.write(payload)
            ln.snap_left -= len(payload)
        elif kind == R.K_SNAP_END:
            self._snap_end(ln)
        elif kind == R.K_REFUSE:
            _log(f"the primary refused: {payload[2:].decode(errors='replace')}")
            self._close(ln)
        else:
            self._refuse(ln, R.E_PROTOCOL, f"a primary may not send frame kind {kind}")

    def _auth(self, ln: _Link, payload: bytes) -> None:
        proof, nonce, epoch, tail = R.AUTH.unpack(payload)
        import hmac

        if not hmac.compare_digest(proof, R.mac(self.secret, "primary", ln.nonce)):
            self._refuse(ln, R.E_AUTH, "its AUTH does not verify (a wrong secret?)")
            return
        known = int(self.ctl[CTL_PEER_EPOCH])
        last = self.next_gseq - 1
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
            _log("a new authenticated link replaces the old one")
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
        _log(f"following the primary at {ln.addr[0]}:{ln.addr[1]} (epoch {epoch}); "
             f"holding gseq {last}, its journal is at {tail}")
        self._check_sync()

    def _check_sync(self) -> None:
        if not self.ctl[CTL_IN_SYNC] and self.next_gseq - 1 >= int(self.ctl[CTL_PRIMARY_GSEQ]):
            self.ctl[CTL_IN_SYNC] = 1
            _log(f"in sync with the primary at gseq {self.next_gseq - 1}")

    def _drain(self, ln: _Link) -> int:
        """Push pending RECORDS frames (then handle the frames that queued behind them)."""
        res = self.res
        pushed = 0
        while ln.pending and ln.fd in self.links:
            kind, payload = ln.pending[0]
            if kind != R.K_RECORDS:
                ln.pending.pop(0)
                self._frame(ln, kind, payload)
                continue
            self._push(payload, ln.pending_at, len(payload), np.uint64(self.next_gseq),
                       self.out.ctrl, self.out.slots, self.tap.ctrl, self.tap.slots,
                       self.sess_flat, self.ncols, res)
            why, k, n = int(res[0]), int(res[1]), int(res[3])
            if n:
                pushed += n
                self.next_gseq = int(res[2])
                self.last_record = payload[k - 1].copy()
                if res[4]:
                    self.out.semaphore.release()
                if res[5]:
                    self.tap.semaphore.release()
            if why == _GAP:
                self._refuse(ln, R.E_PROTOCOL, f"gseq {int(payload[k, W_GSEQ])} after "
                             f"{self.next_gseq - 1}: a gap")
                return pushed
            if why == _FULL:
                ln.pending_at = k
                return pushed
            ln.pending.pop(0)
            ln.pending_at = 0
        self._check_sync()
        return pushed

    def _snap_begin(self, ln: _Link, payload: bytes) -> None:
        gseq, size = R.SNAP_BEGIN.unpack(payload)
        from ..snapshot import _name

        inc = self.data_dir / INCOMING
        inc.mkdir(parents=True, exist_ok=True)
        ln.snap_path = inc / (_name(gseq) + ".part")
        ln.snap = open(ln.snap_path, "wb")  # noqa: SIM115  (closed at SNAP_END or _close)
        ln.snap_left = size
        _log(f"receiving the primary's snapshot at gseq {gseq} ({size / 2**20:.1f} MiB)")

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
        self.lsock.close()


assert _jit is not None
