"""The streaming producer: one session held open all day, events sent as they come.

A :class:`Producer` logs in once (the protocol: :mod:`exposure.net.wire`), then takes
events one by one or in arrays with :meth:`Producer.send`, which numbers them with the
session's seqs, copies them into a bounded window and returns at once. One I/O thread owns
the socket: it sends what the window holds in frames, reads the node's ACKs, keeps the
session alive with HEARTBEATs, and when the node goes away (a reset connection, or a node
that says nothing for ``liveness_s``: a hung or stopped machine) it connects to the next
endpoint (a pair's other node) and resumes from the seq that node holds. An event leaves
the window only when the node has acknowledged it (processed and durable, per its release
policy); with a spool (:mod:`exposure.store.spool`) every event is on disk before it goes
out, so a producer killed with -9 and started again resends what the node lacks.

On the node's host (a loopback endpoint, ``ipc=True``) the link is the node's Unix socket
and a shared-memory ring (:mod:`exposure.shm.ipc_layout`): a ``send`` writes its frame into
the ring itself, and the I/O thread only reads the node's answers on the socket and writes
what the sends could not (see :class:`_Link`).

Seqs: the producer's first login says what the node holds for the session; new events are
numbered from there (or from the spool's last seq, whichever is higher). So the
constructor waits for the first login (up to ``connect_timeout``).

Thread-safety: :meth:`send` may be called from several threads (a lock keeps each call's
seqs contiguous); ``on_result`` runs on the I/O thread and must not block.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from exposure.core.types import EVENT_DTYPE, EVENT_SIZE, NODE_REASONS
from exposure.engine.parse import RECORD as _RECORD
from exposure.engine.parse import record_values
from exposure.net import wire as W
from exposure.net.ack_rejects import RejectBook
from exposure.net.hosts import client_host, is_loopback
from exposure.shm.ipc_layout import W_HEAD, W_SLEEPING, W_TAIL, IpcError, IpcRing, ipc_name

__all__ = ["Producer", "Ack", "ProducerError", "WindowFull", "FlushTimeout", "AuthError",
           "endpoints_of", "liveness_of"]

log = logging.getLogger(__name__)

_WORDS = EVENT_SIZE // 8
_W_SSEQ = EVENT_DTYPE.fields["sseq"][1] // 8
_W_SEND_NS = EVENT_DTYPE.fields["send_ns"][1] // 8
_BURST_FRAMES = 8         # frames queued per pass (the rest wait for the socket)
_RESULTS = 65536          # Acks kept for results() (the oldest dropped beyond)
_RECV = 1 << 16
_BACKOFF_MAX = 1.0        # seconds between rounds of the endpoints, at most
_FATAL_REJECTS = {W.E_AUTH, W.E_SEQ, W.E_SESSION, W.E_REPLACED, W.E_PROTOCOL}
_HDR1 = W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, EVENT_SIZE)  # one record's frame
_HDR1_WORD = int.from_bytes(_HDR1, "little")  # (its header is one word)
_FRAME1 = len(_HDR1) + EVENT_SIZE
_RING_POLL_S = 0.0005     # an IPC link whose ring is full: look for room this often


class ProducerError(RuntimeError):
    """The producer cannot go on (the message says why)."""


class WindowFull(ProducerError):
    """The window of unacknowledged events is full (block=False, or after send_timeout)."""


class FlushTimeout(ProducerError):
    """Not every event sent was acknowledged within the timeout."""


class AuthError(ProducerError):
    """The node refused the login (wrong secret, or a session it does not know)."""


class Ack(NamedTuple):
    """An acknowledgement: every seq <= ``upto`` is processed and durable at the node.

    ``rejected``: (seq, reason name) of the rejected events among those newly acknowledged
    (reason names: :data:`exposure.core.types.NODE_REASONS`), exact where the node listed
    them (REJECTED frames). Where it could not, the ACK's per-reason counts fill in: exact
    only where they leave no doubt (none, one event, or all of them rejected); otherwise
    each rejected event of the range is listed with seq 0 ("one of this range") and its
    reason, and a reason the counts cannot tell is ``"unknown"``."""

    upto: int
    rejected: tuple[tuple[int, str], ...] = ()


class _Fatal(Exception):
    def __init__(self, error: ProducerError):
        super().__init__(str(error))
        self.error = error


class _Never(Exception):
    """(no spool: nothing raises this)"""


class _Dropped(Exception):
    """The connection is gone (the message says why); try the next endpoint."""


def endpoints_of(cfg) -> list[tuple[str, int]]:
    """A node config's session endpoints: its own ingest address, then its pair peer's."""
    out = [(client_host(cfg.ingest_host), int(cfg.ingest_port))]
    if cfg.peer_ingest:
        out.append((client_host(cfg.peer_ingest[0]), int(cfg.peer_ingest[1])))
    return out


def liveness_of(cfg) -> float:
    """The default liveness interval for a config: a pair's ``failover_ms`` x 2 (at least
    0.5 s), a standalone node's 3 s. A pair's backup promotes itself after ``failover_ms``
    of silence, so by twice that the next endpoint answers as primary; with the shipped
    300 ms a SIGSTOPped primary's stream resumes on its backup within a second
    (perf/bench_producer.py). Giving up a live but slow primary costs a reconnect, never
    an event."""
    if cfg is not None and cfg.replicated:
        return max(0.5, cfg.failover_ms * 2 / 1000)
    return 3.0


def _fmt(ep: tuple[str, int]) -> str:
    return f"{ep[0]}:{ep[1]}"


class _Link:
    """An IPC session's ring, as the producer writes it: its own TAIL count, and
    ``next``, the first seq not yet in the ring (-1 once the I/O thread has given the link
    up). Every write into the ring, and these fields, are under the send lock: a send
    writes its own frame (no hand-off to the I/O thread), an array's send its frames, a
    send waiting for room in the window what is not in the ring yet, and the I/O thread
    the rest (a resend after a login, a ring that was full) when it gets the lock without
    waiting (a send holds it while it waits for the ACKs that the I/O thread reads)."""

    __slots__ = ("ring", "sock", "tail", "next", "words", "data", "q", "mask", "cap",
                 "frames")

    def __init__(self, ring: IpcRing, sock: socket.socket, nxt: int):
        self.ring, self.sock = ring, sock
        self.tail = 0
        self.next = nxt
        self.words, self.data = ring.words, ring.data
        self.q = ring.data.cast("Q")  # DATA as u8 words (a frame starts on a word)
        self.mask, self.cap = ring.mask, ring.capacity
        self.frames = 0       # frames written by sends (the I/O thread counts its own)

    def doorbell(self) -> None:
        """The node's ingest sleeps in its selector: one byte on the socket wakes it."""
        try:
            self.sock.send(b"\0")
        except OSError:
            pass  # (full of doorbells already, or gone: the I/O thread sees the end)


class Producer:
    """A session held open: ``send`` events, ``flush``, read results; see the module.

    ``config``: a node's (or a pair member's) NodeConfig (:class:`exposure.client.Producer`
    also takes a TOML path, or None for the built-in default node on this host);
    ``endpoints``: [(host, port), ...] instead.
    ``secret`` / ``secret_file``: the session's secret (else read from the config's
    sessions file where readable; None for a node without one). ``spool``: a directory
    where every accepted event is written (and fdatasync'ed) before it goes out, at most
    ``spool_bytes``. ``window``: the most unacknowledged events held; when it is full,
    ``send`` waits up to ``send_timeout`` (``block=True``) or raises :class:`WindowFull`.
    ``liveness_s``: no frame from the node this long and the connection is dead (default
    :func:`liveness_of`). ``connect_timeout``: how long the first login may take.
    ``on_result(Ack)``: called on the I/O thread for every acknowledgement. ``frame``:
    records per EVENTS frame, at most. ``linger_us``: after the I/O thread sends a batch,
    it waits this long for more before it sleeps on the wake-up (0, the default: it
    sleeps at once, and each ``send`` that finds it asleep wakes it). While events keep
    coming, a linger batches them: fewer wake-ups and frames, so less CPU per event (one
    record per ``send``: about 1 us instead of 2.5-6.5 us at 100,000/s), for at most
    ``linger_us`` more latency (docs/client.md). ``ipc``: to a node on this host (a
    loopback endpoint whose node offers it), log in on its Unix socket and send through
    the shared-memory ring it gives (:class:`_Link`; no system call per event, no linger
    needed); False, or a node without IPC: TCP.
    """

    def __init__(self, config=None, session: int = 1, *, endpoints=None, secret=None,
                 secret_file=None, spool=None, spool_bytes: int = 1 << 30,
                 window: int = 65536, block: bool = True, send_timeout: float = 30.0,
                 liveness_s: float | None = None, connect_timeout: float = 60.0,
                 on_result: Callable[[Ack], Any] | None = None, frame: int = 1024,
                 linger_us: float = 0.0, ipc: bool = True) -> None:
        cfg = config
        if cfg is not None and not hasattr(cfg, "ingest_port"):
            raise TypeError(f"config: a NodeConfig, not {type(cfg).__name__} (the public "
                            f"exposure.client.Producer also takes a TOML path)")
        if endpoints is None:
            if cfg is None:
                raise ValueError("a producer needs a config or endpoints")
            endpoints = endpoints_of(cfg)
        self.endpoints: list[tuple[str, int]] = [(str(h), int(p)) for h, p in endpoints]
        if not self.endpoints:
            raise ValueError("a producer needs at least one endpoint")
        if not 1 <= session < 2**32:
            raise ValueError(f"session {session}: a session id is 1..2**32-1")
        if not 1 <= frame <= W.MAX_RECORDS:
            raise ValueError(f"frame {frame}: 1..{W.MAX_RECORDS} records")
        if window < 1:
            raise ValueError(f"window {window}: at least 1")
        if not 0 <= linger_us <= 1e6:
            raise ValueError(f"linger_us {linger_us}: 0..1,000,000 (us)")

        self.session = int(session)
        self._secret = self._resolve_secret(secret, secret_file, cfg, session)
        self.liveness_s = float(liveness_s) if liveness_s else liveness_of(cfg)
        self._hb_s = self.liveness_s / 3
        self.block, self.send_timeout = block, send_timeout
        self.connect_timeout = connect_timeout
        self.frame = int(frame)
        self.on_result = on_result
        self.linger_s = float(linger_us) / 1e6
        self.ipc = bool(ipc)
        self._iolink: _Link | None = None  # the IPC link while one is up
        self._link: _Link | None = None  # ... where a send writes its own frame (no spool)
        self._no_ipc: set[tuple[str, int]] = set()  # endpoints whose IPC ring failed

        self._spool = None
        self._spool_full: type[BaseException] = _Never
        self._spool_error: type[BaseException] = _Never
        self._spool_blocked = False
        self._hi_queued = 0
        pending = np.zeros(0, EVENT_DTYPE)
        last = 0
        if spool is not None:
            from exposure.store.spool import Spool, SpoolError, SpoolFull

            self._spool_full, self._spool_error = SpoolFull, SpoolError
            self._spool = Spool(Path(spool), spool_bytes, session=self.session)
            last = int(self._spool.last_seq)
            pending = np.asarray(self._spool.pending(0))
        cap = max(int(window), len(pending))
        self._cap = cap
        self._dtype_ok: np.dtype = EVENT_DTYPE  # the last equal dtype seen (_check_dtype)
        self._ring = np.zeros(cap, EVENT_DTYPE)
        self._words = self._ring.view(np.uint64).reshape(cap, _WORDS)
        self._bytes = memoryview(self._ring.view(np.uint8))  # a dict's packed record goes here
        self._q = self._bytes.cast("Q")  # the ring as u8 words, for one word's store
        self._i64 = self._ring.view(np.int64).reshape(cap, _WORDS)
        # seqs: (acked, sent] are in the window; (acked, spooled] also on disk
        self.sent = last
        self.acked = int(pending["sseq"][0]) - 1 if len(pending) else last
        self._spooled = last
        if len(pending):
            self._put(pending, self.acked + 1)

        self._send_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0
        self._error: ProducerError | None = None
        self._results: collections.deque[Ack] = collections.deque()
        self._rej: list[int] | None = None  # the node's reject counters at the last ACK
        self._flags = W.LOGIN_REJECTED  # per-event rejects (0: a node without)
        self._rejects = RejectBook()  # REJECTED frames' entries, until an ACK covers them
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._idle = False
        self._stop = False
        self._closed = False
        self._broken = False  # closed or failed: send's one test for both
        self._logged_in = False
        self._first = True
        self.stats: dict[str, Any] = {
            "reconnects": 0, "endpoint": None, "logins": 0, "rejects": {},
            "bytes_sent": 0, "frames_sent": 0, "events_sent": 0, "resent": 0,
            "heartbeats_sent": 0, "acks": 0, "results_dropped": 0, "dead_links": 0,
            "last_error": None, "spooled": last, "transport": None}
        self._thread = threading.Thread(target=self._run, name=f"producer-{session}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + connect_timeout + self.liveness_s
        with self._cond:
            while not self._logged_in and self._error is None:
                if not self._cond.wait(max(0.0, deadline - time.monotonic())):
                    break
        if not self._logged_in:
            err = self._error or ProducerError(
                f"no node accepted session {session} at "
                f"{', '.join(map(_fmt, self.endpoints))} within {connect_timeout:g} s")
            self._shutdown()
            raise type(err)(str(err))

    # ------------------------------------------------------------------ public
    def send(self, event) -> int:
        """Queue ``event`` (a SPEC event dict, a list of them, one EVENT_DTYPE record or an
        array of records); return the (last) session seq assigned. Waits only for room in
        the window (``block``, ``send_timeout``); the records' ``sseq`` is overwritten."""
        if isinstance(event, np.void):
            dt = event.dtype
            if dt is not EVENT_DTYPE and dt is not self._dtype_ok:
                self._check_dtype(dt, "a record")
            return self._send_one(event.tobytes())
        if isinstance(event, np.ndarray):
            if event.dtype is not EVENT_DTYPE:
                self._check_dtype(event.dtype, "an array")
            recs = event.reshape(-1)
        elif isinstance(event, dict):
            return self._send_one(_RECORD.pack(*record_values(event)))
        elif isinstance(event, (list, tuple)):
            buf = bytearray(_RECORD.size * len(event))
            for k, obj in enumerate(event):
                _RECORD.pack_into(buf, k * _RECORD.size, *record_values(obj))
            recs = np.frombuffer(buf, EVENT_DTYPE)
        else:
            raise TypeError(f"send takes a SPEC event dict or EVENT_DTYPE records, not "
                            f"{type(event).__name__}")
        return self._send_many(recs)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has begun disconnecting, or the producer failed."""
        return self._broken

    @property
    def room(self) -> int:
        """Free slots in the window now: a ``send`` of at most this many events does not
        wait (unless another thread sends meanwhile)."""
        return self._cap - (self.sent - self.acked)

    def flush(self, timeout: float | None = None) -> None:
        """Return once every seq sent so far is acknowledged; :class:`FlushTimeout` after
        ``timeout`` seconds (None: no limit)."""
        target = self.sent
        self._raise_error()
        if self.acked >= target:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            self._waiting += 1
            try:
                while self.acked < target and self._error is None and not self._closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._waiting -= 1
        self._raise_error()
        if self.acked < target:
            where = self.stats["endpoint"] or "no node"
            why = self.stats["last_error"]
            raise FlushTimeout(
                f"{target - self.acked} events (seqs {self.acked + 1}..{target}) not "
                f"acknowledged within {timeout} s (connected to {where}"
                + (f"; last error: {why}" if why else "") + ")")

    def results(self, timeout: float | None = None) -> Iterator[Ack]:
        """The acknowledgements, in order (the same as ``on_result``), until none comes for
        ``timeout`` seconds (None: until the producer is closed). At most 65,536 wait; the
        oldest are dropped beyond (``stats['results_dropped']``)."""
        while True:
            with self._cond:
                if not self._results:
                    self._waiting += 1
                    try:
                        self._cond.wait_for(lambda: self._results or self._closed
                                            or self._error is not None, timeout)
                    finally:
                        self._waiting -= 1
                if not self._results:
                    return
                ack = self._results.popleft()
            yield ack

    def close(self, timeout: float = 30.0) -> None:
        """Flush (up to ``timeout``), then disconnect; idempotent. Raises what flush
        raised, after disconnecting."""
        if self._closed:
            return
        try:
            if self._error is None:
                self.flush(timeout)
        finally:
            self._shutdown()
        self._raise_error()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, et, ev, tb) -> None:
        if et is None:
            self.close()
            return
        try:
            self.close()
        except ProducerError as e:
            log.warning("closing the producer after an error: %s", e)

    # ------------------------------------------------------------------ sending
    def _raise_error(self) -> None:
        e = self._error
        if e is not None:
            raise type(e)(str(e))

    def _check_dtype(self, dt: np.dtype, what: str) -> None:
        """Accept a dtype equal to EVENT_DTYPE but not the same object (np.concatenate and
        np.frombuffer make those), and remember it: comparing two structured dtypes costs
        about 0.85 us, as much as the rest of ``send`` (measured, docs/performance.md)."""
        if dt != EVENT_DTYPE:
            raise ValueError(f"{what} of {dt}, expected EVENT_DTYPE records")
        self._dtype_ok = dt

    def _room(self, n: int) -> int:
        """Wait until ``n`` slots are free (n <= capacity); return when they are."""
        if self._cap - (self.sent - self.acked) >= n:
            return n
        if not self.block:
            raise WindowFull(f"the window of {self._cap} unacknowledged events is full")
        deadline = time.monotonic() + self.send_timeout
        with self._cond:
            self._waiting += 1
            try:
                while self._cap - (self.sent - self.acked) < n:
                    if self._error is not None:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise WindowFull(
                            f"the window of {self._cap} unacknowledged events stayed full "
                            f"for {self.send_timeout:g} s (acknowledged up to "
                            f"{self.acked}, sent {self.sent})")
                    link = self._iolink  # (the send lock is held: the I/O thread cannot
                    if link is not None and 0 < link.next <= self._ring_limit():  # write)
                        self._fill_ring(link)
                        if link.next <= self._ring_limit():
                            left = min(left, _RING_POLL_S)  # the ring is full
                    self._cond.wait(left)
            finally:
                self._waiting -= 1
        self._raise_error()
        return n

    def _send_one(self, rec: bytes) -> int:
        """``rec``: one record's 128 bytes (``np.void.tobytes``, or a dict's packed by
        parse.RECORD). The common case is a handful of attribute reads and two memoryview
        stores (bytes into the ring's memory: half the cost of a structured element
        assignment); the checks that rarely fire (closed, failed, a full window) share one
        test. On an IPC link with everything before this seq in its ring, the send writes
        its frame there itself (inline: a call is a tenth of this path), and the node's
        spinning ingest takes it on its next pass; else the I/O thread sends it."""
        lock = self._send_lock
        lock.acquire()  # (100 ns less than a with statement, measured)
        try:
            seq = self.sent + 1
            if self._broken or seq - self.acked > self._cap:
                if self._error is not None or self._closed:
                    self._raise_error()
                    raise ProducerError("the producer is closed")
                self._room(1)
            off = (seq - 1) % self._cap * EVENT_SIZE
            self._bytes[off:off + EVENT_SIZE] = rec
            self._q[(off >> 3) + _W_SSEQ] = seq
            self.sent = seq
            link = self._link
            if link is not None and link.next == seq:
                # (the ring's words: the frame's header, seq and send time are three word
                # stores and the record one copy, half the cost of slicing the window's)
                tail = link.tail
                words = link.words
                a = tail & link.mask
                if link.cap - (tail - words[W_HEAD]) >= _FRAME1 and a + _FRAME1 <= link.cap:
                    w = a >> 3
                    q = link.q
                    link.data[a + 8:a + _FRAME1] = rec
                    q[w] = _HDR1_WORD
                    q[w + 1 + _W_SSEQ] = seq
                    q[w + 1 + _W_SEND_NS] = time.time_ns()
                    link.tail = tail = tail + _FRAME1
                    words[W_TAIL] = tail
                    link.next = seq + 1
                    link.frames += 1
                    if words[W_SLEEPING]:
                        link.doorbell()
                    return seq
            if self._idle:  # (also a frame that would wrap around the ring's end)
                self._wake()
            return seq
        finally:
            lock.release()

    def _send_many(self, recs: np.ndarray) -> int:
        n = len(recs)
        with self._send_lock:
            if self._error is not None or self._closed:
                self._raise_error()
                raise ProducerError("the producer is closed")
            if n == 0:
                return self.sent
            if not self.block and self._cap - (self.sent - self.acked) < n:
                raise WindowFull(f"{n} events do not fit the window ({self._cap} "
                                 f"unacknowledged at most, {self.sent - self.acked} held)")
            lo = 0
            while lo < n:
                room = self._cap - (self.sent - self.acked)
                if room <= 0:
                    room = self._room(min(n - lo, max(1, self._cap // 4)))
                k = min(room, n - lo)
                self._put(recs[lo:lo + k], self.sent + 1)
                self.sent += k
                lo += k
                link = self._link
                if link is not None:  # (an IPC link: its frames, written here)
                    self._fill_ring(link)
                    if link.next > self.sent:
                        continue
                if self._idle:
                    self._wake()
            return self.sent

    def _put(self, recs: np.ndarray, first: int) -> None:
        """Copy ``recs`` into the slots of seqs first.. and number them."""
        n = len(recs)
        s0 = (first - 1) % self._cap
        k = min(n, self._cap - s0)
        seqs = np.arange(first, first + n, dtype=np.uint64)
        self._ring[s0:s0 + k] = recs[:k]
        self._words[s0:s0 + k, _W_SSEQ] = seqs[:k]
        if k < n:
            self._ring[:n - k] = recs[k:]
            self._words[:n - k, _W_SSEQ] = seqs[k:]

    def _spans(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The window's slots of seqs lo..hi (inclusive): one or two ranges [a, b) of the
        ring (two where they wrap)."""
        n = hi - lo + 1
        s0 = (lo - 1) % self._cap
        if s0 + n <= self._cap:
            return [(s0, s0 + n)]
        return [(s0, self._cap), (0, s0 + n - self._cap)]

    def _pieces(self, lo: int, hi: int) -> list[np.ndarray]:
        """The window's slots of seqs lo..hi (inclusive): one or two slices of the ring."""
        return [self._ring[a:b] for a, b in self._spans(lo, hi)]

    def _wake(self) -> None:
        self._idle = False
        try:
            os.eventfd_write(self._efd, 1)
        except OSError:
            pass

    def _notify(self) -> None:
        if self._waiting:
            with self._cond:
                self._cond.notify_all()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _resolve_secret(secret, secret_file, cfg, session: int) -> bytes | None:
        if secret is not None:
            return secret.encode() if isinstance(secret, str) else bytes(secret)
        if secret_file is not None:
            try:
                return Path(secret_file).read_bytes().strip()
            except OSError as e:
                raise ProducerError(f"cannot read the secret file {secret_file}: "
                                    f"{e.strerror or e}") from None
        if cfg is not None and cfg.sessions_file is not None:
            from exposure.net.sessions import SessionsError, secret_for

            try:
                return secret_for(cfg.sessions_file, session)
            except PermissionError:
                return None
            except (OSError, SessionsError) as e:
                raise ProducerError(f"no secret for session {session}: {e}") from None
        return None

    def _shutdown(self) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(10)
        self._closed = self._broken = True
        with self._cond:
            self._cond.notify_all()
        if not self._thread.is_alive():
            try:
                os.close(self._efd)
            except OSError:
                pass
            self._efd = -1
            if self._spool is not None:
                self._spool.close()

    def _fail(self, err: ProducerError) -> None:
        log.error("producer of session %s: %s", self.session, err)
        with self._cond:
            self._error = err
            self._broken = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ the I/O thread
    def _run(self) -> None:
        try:
            k = 0
            rounds = 0
            first_deadline = time.monotonic() + self.connect_timeout
            while not self._stop:
                self._spool_now()
                ep = self.endpoints[k % len(self.endpoints)]
                try:
                    sock, held, ring = self._connect(ep)
                except _Dropped as e:
                    self.stats["last_error"] = f"{_fmt(ep)}: {e}"
                    log.debug("producer of session %s: %s: %s", self.session, _fmt(ep), e)
                    k += 1
                    if k % len(self.endpoints) == 0:
                        rounds += 1
                        if self._first and time.monotonic() >= first_deadline:
                            raise _Fatal(ProducerError(
                                f"no node accepted session {self.session} at "
                                f"{', '.join(map(_fmt, self.endpoints))} within "
                                f"{self.connect_timeout:g} s (last: "
                                f"{self.stats['last_error']})")) from None
                        self._pause(min(_BACKOFF_MAX, 0.02 * 2 ** min(rounds, 6)))
                    continue
                rounds = 0
                try:
                    if ring is None:
                        self._pump(sock, ep, held)
                    else:
                        self._pump_ipc(sock, ring, ep, held)
                except _Dropped as e:
                    self.stats["last_error"] = f"{_fmt(ep)}: {e}"
                    if not self._stop:
                        self.stats["reconnects"] += 1
                        log.warning("producer of session %s: %s: %s; trying %s",
                                    self.session, _fmt(ep), e,
                                    _fmt(self.endpoints[(k + 1) % len(self.endpoints)]))
                        k += 1
                finally:
                    sock.close()
        except _Fatal as e:
            self._fail(e.error)
        except Exception as e:  # a bug: say so, never hang the caller
            log.exception("producer of session %s: the I/O thread failed", self.session)
            self._fail(ProducerError(f"the producer's I/O thread failed: {e!r}"))
        finally:
            with self._cond:
                self._cond.notify_all()

    def _pause(self, seconds: float) -> None:
        """Wait ``seconds`` between rounds of the endpoints, spooling what is sent
        meanwhile (or until the producer stops)."""
        end = time.monotonic() + seconds
        while not self._stop and (left := end - time.monotonic()) > 0:
            self._idle = True
            self._spool_now()
            try:
                if select.select([self._efd], [], [], left)[0]:
                    os.eventfd_read(self._efd)
            except (BlockingIOError, InterruptedError):
                pass
            finally:
                self._idle = False
        self._spool_now()

    def _spool_now(self) -> None:
        """Disconnected: what was sent goes to the spool anyway (a producer killed while
        its node is away loses nothing it accepted)."""
        if self._spool is not None and self.sent > self._spooled and not self._spool_blocked:
            self._spool_up_to(self.sent)

    def _connect_ipc(self, ep: tuple[str, int]) -> socket.socket | None:
        """The node's IPC socket for ``ep`` (a node on this host), or None (not local, no
        such socket, or IPC turned off): then TCP."""
        if not self.ipc or ep in self._no_ipc or not is_loopback(ep[0]):
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.liveness_s)
            sock.connect(ipc_name(client_host(ep[0]), ep[1]))
        except OSError:
            sock.close()
            return None
        return sock

    def _connect(self, ep: tuple[str, int]) -> tuple[socket.socket, int, IpcRing | None]:
        """Connect and log in within ``liveness_s``: the socket (non-blocking), the seq the
        node holds, and the IPC ring where the node gave one (a node on this host: then
        the frames go there, and the socket, a Unix one, carries the node's answers).
        _Dropped for anything a retry may cure; _Fatal for a refusal."""
        sock = self._connect_ipc(ep)
        ipc = sock is not None
        if sock is None:
            try:
                sock = socket.create_connection(ep, timeout=self.liveness_s)
            except OSError as e:
                raise _Dropped(f"cannot connect: {e.strerror or e}") from None
        fds: list[int] = []
        try:
            if not ipc:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            deadline = time.monotonic() + self.liveness_s
            reader = W.FrameReader()
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    raise _Dropped(f"no login answer within {self.liveness_s:g} s")
                sock.settimeout(left)
                try:
                    if ipc:
                        data, got, _, _ = socket.recv_fds(sock, _RECV, 2)
                        fds += got
                    else:
                        data = sock.recv(_RECV)
                except TimeoutError:
                    continue
                if not data:
                    raise _Dropped("closed the connection before login")
                for kind, payload in reader.feed(data):
                    if kind == W.K_CHALLENGE:
                        proof = (W.login_mac(self._secret, self.session, payload)
                                 if self._secret else bytes(32))
                        sock.sendall(W.encode_login(self.session, proof, self._flags)
                                     if self._flags else W.encode_login(self.session, proof))
                    elif kind == W.K_REJECT:
                        if self._flags and W.decode_reject(payload)[0] == W.E_PROTOCOL:
                            self._flags = 0  # a node without per-event rejects
                            raise _Dropped("the node sends no per-event rejects: logging "
                                           "in without asking for them")
                        self._rejected(payload, ep)
                    elif kind == W.K_LOGIN_OK:
                        (held,) = struct.unpack("<Q", payload)
                        ring = None
                        if ipc:
                            if not fds:
                                raise IpcError("a LOGIN_OK without its ring")
                            ring = IpcRing.from_fd(fds.pop(0))
                        sock.setblocking(False)
                        self.stats["transport"] = "ipc" if ipc else "tcp"
                        return sock, held, ring
        except IpcError as e:  # (this endpoint by TCP from now on)
            sock.close()
            self._no_ipc.add(ep)
            log.warning("producer of session %s: %s: IPC failed (%s): TCP from now on",
                        self.session, _fmt(ep), e)
            raise _Dropped(f"IPC failed: {e}") from None
        except (OSError, W.ProtocolError) as e:
            sock.close()
            raise _Dropped(f"login failed: {e}") from None
        except BaseException:
            sock.close()
            raise
        finally:
            for fd in fds:
                os.close(fd)

    def _rejected(self, payload, ep) -> None:
        """A REJECT from the node: fatal for a refusal a retry cannot cure, else
        _Dropped."""
        code, detail, text = W.decode_reject(payload)
        name = W.REJECT_NAMES.get(code, str(code))
        where = _fmt(ep)
        if code == W.E_AUTH:
            raise _Fatal(AuthError(
                f"{where} refused session {self.session}: {text} (wrong secret, or a "
                f"session its sessions file does not have)"))
        if code == W.E_SEQ:
            raise _Fatal(ProducerError(
                f"{where} expected seq {detail} of session {self.session} and got another "
                f"(a producer bug, or another client sending as this session): {text}"))
        if code in _FATAL_REJECTS:
            raise _Fatal(ProducerError(f"{where} refused session {self.session}: {text} "
                                       f"({name})"))
        raise _Dropped(f"rejected: {text} ({name})")

    def _login_ok(self, held: int, ep) -> int:
        """What to send first after a login at which the node holds ``held``."""
        if self._first:
            self._first = False
            if held > self.sent:  # the session's history from before this producer
                with self._send_lock:
                    if held > self.sent:
                        log.info("session %s: the node holds seqs up to %s: numbering "
                                 "from %s", self.session, held, held + 1)
                        self.sent = self.acked = self._spooled = held
                        if self._spool is not None:
                            self._spool.trim(held)
        elif held > self.sent:
            raise _Fatal(ProducerError(
                f"{_fmt(ep)} holds seq {held} of session {self.session}, beyond the "
                f"{self.sent} this producer sent: another client sends as this session"))
        if held < self.acked:
            raise _Fatal(ProducerError(
                f"{_fmt(ep)} holds only seq {held} of session {self.session} but "
                f"acknowledged {self.acked}: the node lost acknowledged events"))
        self.stats["endpoint"] = _fmt(ep)
        self.stats["logins"] += 1
        if self._hi_queued > held:
            self.stats["resent"] += self._hi_queued - held
        with self._cond:
            self._logged_in = True
            self._cond.notify_all()
        return held + 1

    def _pump(self, sock: socket.socket, ep, held: int) -> None:
        """Run one logged-in connection until it drops (_Dropped) or the producer stops."""
        nxt = self._login_ok(held, ep)
        reader = W.FrameReader()
        self._rejects.new_connection()
        ep_ = select.epoll()
        sfd = sock.fileno()
        try:
            ep_.register(self._efd, select.EPOLLIN)
            ep_.register(sfd, select.EPOLLIN)
            mask = select.EPOLLIN
            out: collections.deque = collections.deque()
            now = time.monotonic()
            last_rx = last_tx = last_hb = now
            hb, live, linger = self._hb_s, self.liveness_s, self.linger_s
            while not self._stop:
                queued = False
                if not out and nxt <= self._limit():
                    nxt = self._queue(out, nxt)
                    queued = True
                if out and self._write(sock, out):
                    last_tx = time.monotonic()
                want = select.EPOLLIN | (select.EPOLLOUT if out else 0)
                if want != mask:
                    ep_.modify(sfd, want)
                    mask = want
                if linger and queued and not out and nxt > self._limit():
                    # everything sent: while events keep coming, wait for more (and for
                    # ACKs) instead of sleeping on the wake-up, which each send would
                    # then pay for
                    events = self._linger(ep_, sfd, linger)
                else:
                    timeout = 0.0  # more to send: look at the socket, then go on
                    if out or nxt > self._limit():
                        self._idle = True  # (then re-check: a send may have come meanwhile)
                        if out or nxt > self._limit():
                            now = time.monotonic()
                            due = last_rx + live
                            if not out:
                                due = min(due, max(min(last_rx, last_tx), last_hb) + hb)
                            timeout = max(0.001, due - now)
                    events = ep_.poll(timeout)
                self._idle = False
                if self._heard(events, sock, reader, ep):
                    last_rx = time.monotonic()
                now = time.monotonic()
                if now - last_rx >= live:
                    self.stats["dead_links"] += 1
                    raise _Dropped(f"nothing heard for {live:g} s (liveness_s)")
                if (not out and now - last_hb >= hb
                        and (now - last_rx >= hb or now - last_tx >= hb)):
                    out.append(memoryview(W.encode_heartbeat()))
                    self.stats["heartbeats_sent"] += 1
                    last_hb = now
                    if self._write(sock, out):
                        last_tx = now
        finally:
            self._idle = False
            ep_.close()

    def _pump_ipc(self, sock: socket.socket, ring: IpcRing, ep, held: int) -> None:
        """Run one logged-in IPC link until it drops (_Dropped) or the producer stops: the
        frames go into ``ring`` (see :class:`_Link` for who writes them), the node's
        answers come on ``sock``."""
        # The link is up before the login is announced (_login_ok, which sends wait for
        # the first time): from the first send on, the sends write their own frames.
        link = _Link(ring, sock, held + 1)
        self._iolink = link
        if self._spool is None:  # (with one, every event goes to disk first: the sends
            self._link = link    # do not write their own frames)
        reader = W.FrameReader()
        self._rejects.new_connection()
        ep_ = select.epoll()
        lock = self._send_lock
        try:
            self._login_ok(held, ep)
            ep_.register(self._efd, select.EPOLLIN)
            ep_.register(sock.fileno(), select.EPOLLIN)
            now = time.monotonic()
            last_rx = last_hb = now
            hb, live = self._hb_s, self.liveness_s
            while not self._stop:
                if self._spool is not None and self.sent > self._spooled \
                        and not self._spool_blocked:
                    self._spool_up_to(self.sent)  # (outside the lock: it fsyncs)
                wrote, pending = 0, True
                if not lock.acquire(False):  # (held: a send writing, or one waiting for
                    if self._waiting:        # room: that one writes what is pending)
                        with self._cond:
                            self._cond.notify_all()
                else:
                    try:
                        wrote = self._fill_ring(link)
                        pending = link.next <= self._ring_limit()
                        if not pending:
                            self._idle = True  # (a send that cannot write wakes us)
                        if now - last_hb >= hb and (
                                link.cap - (link.tail - link.words[W_HEAD]) >= 8):
                            # (every hb while nothing is written here: the node hears
                            # something within its idle timeout)
                            link.tail = ring.put(link.tail, (W.encode_heartbeat(),))
                            self.stats["heartbeats_sent"] += 1
                            wrote = 1
                            if link.words[W_SLEEPING]:
                                link.doorbell()  # (_fill_ring rings for its frames)
                    finally:
                        lock.release()
                if wrote:
                    last_hb = now
                if pending:
                    timeout = _RING_POLL_S  # a full ring, or the lock was held: soon
                else:
                    timeout = max(0.001, min(last_rx + live, last_hb + hb) - now)
                events = ep_.poll(timeout)
                self._idle = False
                if self._heard(events, sock, reader, ep):
                    last_rx = time.monotonic()
                now = time.monotonic()
                if now - last_rx >= live:
                    self.stats["dead_links"] += 1
                    raise _Dropped(f"nothing heard for {live:g} s (liveness_s)")
        finally:
            # Without the send lock (a send may hold it, waiting for ACKs): a send that is
            # writing now writes into a ring that nobody reads any more (the mapping goes
            # with the last reference), and the next link resends from what its node holds.
            self._hi_queued = max(self._hi_queued, link.next - 1)
            link.next = -1
            self._link = self._iolink = None
            self._idle = False
            self._count_direct(link)
            ep_.close()

    def _count_direct(self, link: _Link) -> None:
        """Fold the frames the sends wrote into the stats."""
        if link.frames:
            self.stats["frames_sent"] += link.frames
            self.stats["events_sent"] += link.frames
            self.stats["bytes_sent"] += link.frames * _FRAME1
            link.frames = 0

    def _ring_limit(self) -> int:
        """The highest seq an IPC link may carry now: with a spool, what is on disk."""
        return self.sent if self._spool is None else self._spooled

    def _fill_ring(self, link: _Link) -> int:
        """Under the send lock: write the frames of seqs ``link.next``.. (what may go out
        now) that the ring has room for; returns the bytes written."""
        self._count_direct(link)
        hi = self._ring_limit()
        lo = link.next
        if not 0 < lo <= hi:  # (nothing to write, or the link was given up)
            return 0
        now_ns = time.time_ns()
        ring, start = link.ring, link.tail
        n_frames = 0
        while lo <= hi:
            room = (ring.room() - W.HEADER.size) // EVENT_SIZE
            if room <= 0:
                break
            top = min(hi, lo + min(self.frame, room) - 1)
            n = top - lo + 1
            pieces = [W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, n * EVENT_SIZE)]
            for a, b in self._spans(lo, top):
                self._i64[a:b, _W_SEND_NS] = now_ns
                pieces.append(self._bytes[a * EVENT_SIZE:b * EVENT_SIZE])
            link.tail = ring.put(link.tail, pieces)
            n_frames += 1
            lo = top + 1
        if not n_frames:
            return 0
        self._hi_queued = max(self._hi_queued, lo - 1)
        self.stats["frames_sent"] += n_frames
        self.stats["events_sent"] += lo - link.next
        self.stats["bytes_sent"] += link.tail - start
        link.next = lo
        if link.words[W_SLEEPING]:
            link.doorbell()
        return link.tail - start

    def _heard(self, events, sock: socket.socket, reader: W.FrameReader, ep) -> bool:
        """What a pump's poll returned: the wake-up consumed, the node's frames read; True
        when something came from the node."""
        heard = False
        for fd, ev in events:
            if fd == self._efd:
                try:
                    os.eventfd_read(self._efd)
                except BlockingIOError:
                    pass
            elif ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                heard = self._read(sock, reader, ep) or heard
        return heard

    @staticmethod
    def _linger(ep, fd: int, seconds: float) -> list:
        """Wait up to ``seconds`` for more events to send or for the node's answer on
        ``fd``; returns what ``ep.poll`` would. One ``select`` (its timeout has
        microseconds; epoll's is whole milliseconds, so a 200 us linger would wait 1 ms);
        beyond select's descriptor limit, a sleep and a look."""
        if fd < 1024:
            try:
                ready = select.select([fd], [], [], seconds)[0]
            except InterruptedError:
                return []
            return [(fd, select.EPOLLIN)] if ready else []
        time.sleep(seconds)
        return ep.poll(0)

    def _queue(self, out: collections.deque, nxt: int) -> int:
        """Queue frames of seqs nxt.. (at most _BURST_FRAMES frames), spooling first what is
        not on disk yet; returns the next seq to queue."""
        hi = min(self.sent, nxt + self.frame * _BURST_FRAMES - 1)
        if self._spool is not None and hi > self._spooled:
            hi = min(hi, self._spool_up_to(self.sent))
            if hi < nxt:
                return nxt
        now_ns = time.time_ns()
        lo = nxt
        n_frames = 0
        while lo <= hi:
            top = min(hi, lo + self.frame - 1)
            n = top - lo + 1
            out.append(memoryview(W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS,
                                                n * EVENT_SIZE)))
            for a, b in self._spans(lo, top):  # (the ring's bytes: no buffer format)
                self._i64[a:b, _W_SEND_NS] = now_ns
                out.append(self._bytes[a * EVENT_SIZE:b * EVENT_SIZE])
            n_frames += 1
            lo = top + 1
        self._hi_queued = max(self._hi_queued, hi)
        self.stats["frames_sent"] += n_frames
        self.stats["events_sent"] += hi - nxt + 1
        return hi + 1

    def _limit(self) -> int:
        """The highest seq that may go out now (with a full spool: what is on disk)."""
        return self._spooled if self._spool_blocked else self.sent

    def _spool_up_to(self, top: int) -> int:
        """Put seqs up to ``top`` on disk (one fdatasync for all that was published);
        return the highest seq on disk. A full spool waits for acknowledgements to trim
        it (fatal when nothing it holds awaits one)."""
        try:
            for piece in self._pieces(self._spooled + 1, top):
                self._spool.append(piece)
                self._spooled += len(piece)
        except self._spool_full as e:
            if self.acked >= self._spooled:
                raise _Fatal(ProducerError(
                    f"the spool is full with nothing to trim (spool_bytes too small for "
                    f"one batch?): {e}")) from None
            self._spool_blocked = True
            self.stats["last_error"] = f"spool full: {e}"
        except (OSError, self._spool_error) as e:
            raise _Fatal(ProducerError(f"the spool cannot take more events: {e}")) \
                from None
        self.stats["spooled"] = self._spooled
        return self._spooled

    def _write(self, sock: socket.socket, out: collections.deque) -> int:
        try:
            n = sock.sendmsg(list(out)[:64])
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            raise _Dropped(f"the connection failed: {e.strerror or e}") from None
        self.stats["bytes_sent"] += n
        left = n
        while left and out:
            b = out[0]
            if len(b) <= left:
                left -= len(b)
                out.popleft()
            else:
                out[0] = b[left:]
                left = 0
        return n

    def _read(self, sock: socket.socket, reader: W.FrameReader, ep) -> bool:
        try:
            data = sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            raise _Dropped(f"the connection failed: {e.strerror or e}") from None
        if not data:
            raise _Dropped("the node closed the connection")
        try:
            frames = reader.feed(data)
        except W.ProtocolError as e:
            raise _Dropped(f"a malformed frame from the node: {e}") from None
        for kind, payload in frames:
            if kind == W.K_ACK:
                done, rej = W.decode_ack(payload)
                self._ack(done, rej, ep)
            elif kind == W.K_REJECTED:
                self._rejects.on_rejected(payload, self.acked, self.sent)
            elif kind == W.K_REJECT:
                self._rejected(payload, ep)
            elif kind != W.K_HEARTBEAT:
                raise _Dropped(f"an unexpected frame kind {kind} from the node")
        return True

    # ------------------------------------------------------------------ acknowledgements
    def _ack(self, done: int, rej: list[int], ep) -> None:
        prev = self._rej
        self._rej = rej
        self.stats["acks"] += 1
        if done > self.sent:
            raise _Fatal(ProducerError(
                f"{_fmt(ep)} acknowledged seq {done} of session {self.session}, beyond the "
                f"{self.sent} sent: another client sends as this session"))
        # the session's rejects so far, also when this ACK moves nothing (a resend of what
        # the node already holds: `exposure send` reports them as before)
        self.stats["rejects"] = {NODE_REASONS.get(i, str(i)): int(v)
                                 for i, v in enumerate(rej) if i and v}
        if done <= self.acked:
            return
        lo = self.acked + 1
        rejected = self._rejects.resolve(lo, done, prev, rej)
        with self._cond:
            self.acked = done
            self._cond.notify_all()
        if self._spool is not None:
            self._spool.trim(done)
            self._spool_blocked = False
        ack = Ack(done, rejected)
        if len(self._results) >= _RESULTS:
            self._results.popleft()
            self.stats["results_dropped"] += 1
        self._results.append(ack)
        if self.on_result is not None:
            try:
                self.on_result(ack)
            except Exception:
                log.exception("producer of session %s: on_result raised", self.session)
