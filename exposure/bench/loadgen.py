"""The perf tool's client: one session, an open-loop sender on a fixed schedule, and a
receiver for the multicast updates and the node's ACKs, in one pinned process.

The sender never waits for replies: event *k* is due at ``t0 + k / rate`` and goes out as
soon as it is due (frames of ``frame`` events are due with their first event). Between
sends the loop polls (epoll) the multicast socket and the session socket. A datagram is
folded in as it arrives by one compiled call (:mod:`exposure.bench.recorder`: which events
it shows, the legs of its measured rows), into memory made and touched before the run's
clock starts; an ACK is stored with its receipt time. So the client's work per datagram is
small and fixed, and does not grow with the stream's bytes. The flow is a block of records
replayed cyclically; each cycle's order ids are moved to a fresh range, and every run
numbers its session seqs after what the node already holds for the session, so runs can
follow each other against one node.
"""

from __future__ import annotations

import gc
import resource
import select
import socket
import struct
import time
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from exposure.bench.recorder import ArrivalRecorder
from exposure.core import jit as _jit
from exposure.core.types import (
    EVENT_WORDS,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_NEW,
    T_REPLACE,
    W_ORDER_ID,
    W_SEND_NS,
    W_SSEQ,
)
from exposure.feed.wire import open_receiver
from exposure.harness.machine import steal_ms
from exposure.net import wire as W

__all__ = ["RunRaw", "open_loop", "build_frames", "move_order_ids"]

_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; Python does not export it
_ORDER_TYPES = (T_NEW, T_FILL, T_REPLACE, T_CANCEL, T_DONE)


def build_frames(block: np.ndarray, frame: int) -> tuple[np.ndarray, int, np.ndarray]:
    """The flow ``block`` (trimmed to whole frames) as EVENTS frames of ``frame`` records in
    one u8 buffer; returns (buffer, frame size in bytes, per-record order-event mask).
    Session seqs, send times and the order-id range are patched in place at send time."""
    nf = len(block) // frame
    if nf < 1:
        raise ValueError(f"a flow of {len(block)} events holds no frame of {frame}")
    w = block[:nf * frame].view(np.uint64).reshape(nf * frame, EVENT_WORDS)
    fbytes = W.HEADER.size + frame * EVENT_WORDS * 8
    buf = np.zeros(nf * fbytes, np.uint8)
    full = buf.reshape(nf, fbytes)
    full[:, :W.HEADER.size] = np.frombuffer(
        W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, frame * EVENT_WORDS * 8), np.uint8)
    full[:, W.HEADER.size:] = w.view(np.uint8).reshape(nf, -1)
    is_order = np.isin(block["type"][:nf * frame], _ORDER_TYPES).reshape(nf, frame)
    return buf, fbytes, is_order


@njit(cache=True, nogil=True)
def _stamp_frame(words, w0, cnt, sseq0, ts, is_order, j, delta):
    """Stamp the ``cnt`` records from word ``w0`` of ``words`` (frame ``j`` of the block)
    for sending: session seqs from ``sseq0``, send time ``ts``, and the order ids of its
    order events moved by ``delta`` (a new cycle of the block; 0: none). One compiled call a
    frame instead of four numpy ones."""
    t = np.uint64(ts)
    for i in range(cnt):
        b = w0 + i * EVENT_WORDS
        words[b + W_SSEQ] = np.uint64(sseq0 + i)
        words[b + W_SEND_NS] = t
        if delta != 0 and is_order[j, i]:
            words[b + W_ORDER_ID] += np.uint64(delta)


def move_order_ids(buf: np.ndarray, fbytes: int, is_order: np.ndarray, j: int,
                   delta: int) -> None:
    """Add ``delta`` to the order id of every order event of frame ``j`` of ``buf`` (as
    :func:`build_frames` made it), in place: a run's fresh order-id range, a new cycle of
    the block. Nothing else of the records moves (the word is the types module's)."""
    frame = is_order.shape[1]
    w0 = (j * fbytes + W.HEADER.size) // 8
    ids = buf.view(np.uint64)[w0 + W_ORDER_ID:w0 + frame * EVENT_WORDS:EVENT_WORDS]
    ids[is_order[j]] += np.uint64(delta)


@dataclass
class RunRaw:
    """What one open-loop run saw (times are CLOCK_REALTIME ns)."""
    session: int
    first_sseq: int                 # session seq of event 0
    rate: float
    frame: int
    intended_ns: np.ndarray         # per event: when it was due
    send_ns: np.ndarray             # per event: when its frame went out (0: never sent)
    arrivals: ArrivalRecorder | None = None  # what the run saw on multicast
    ack_log: list = field(default_factory=list)     # (receipt ns, acknowledged seq)
    # The session's reject counters (per reason) in the first and the last ACK of the run:
    # their difference is what the node rejected of this run (after the first ACK's seq).
    rejects_first: list | None = None
    rejects_last: list | None = None
    late_sends: int = 0             # frames sent more than 50 us after they were due
    # The client's own CPU (user, system) over its loop, as fractions of the loop's wall
    # time. The loop spins, so it is high either way; a high system share (and page faults)
    # says the client, not the target, was short of room.
    client_cpu: tuple[float, float] = (0.0, 0.0)
    client_faults: int = 0          # page faults the client took in its loop
    steal_ms: float = 0.0
    wall_s: float = 0.0             # from the first due time to the last send

    @property
    def sent(self) -> int:
        return int(np.count_nonzero(self.send_ns))

    @property
    def catch_up_ms(self) -> float:
        """How long after the last send the last event was acknowledged (-1: never)."""
        last = self.first_sseq + len(self.send_ns) - 1
        t = next((t for t, s in self.ack_log if s >= last), None)
        return -1.0 if t is None or not len(self.send_ns) else (t - int(self.send_ns.max())) / 1e6

    @property
    def acknowledged(self) -> int:
        """Events of this run the node acknowledged (processed)."""
        top = max((s for _, s in self.ack_log), default=0)
        return int(min(max(0, top - self.first_sseq + 1), len(self.send_ns)))

    @property
    def rejected(self) -> int:
        """Events of this run the node rejected, after the first ACK (a run whose flow
        the node rejects measures rejects, not the tallies: every flow here is valid)."""
        if self.rejects_first is None or self.rejects_last is None:
            return 0
        return int(sum(self.rejects_last) - sum(self.rejects_first))


def _login(sock: socket.socket, session: int, timeout: float = 10.0,
           secret: bytes | None = None) -> int:
    """Log in (answering the node's CHALLENGE with ``secret``'s proof when given; a node
    without a sessions file takes the LOGIN at once); the seq the node holds."""
    if secret is None:
        sock.sendall(W.encode_login(session))
    rd = W.FrameReader()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the node closed the session at login")
        for kind, payload in rd.feed(data):
            if kind == W.K_CHALLENGE and secret is not None:
                sock.sendall(W.encode_login(session, W.login_mac(secret, session, payload)))
            if kind == W.K_LOGIN_OK:
                return struct.unpack("<Q", payload)[0]
            if kind == W.K_REJECT:
                raise ConnectionError(f"login refused: {W.decode_reject(payload)[2]}")
    raise TimeoutError("no answer to the login")


def open_loop(host: str, port: int, group: str, mport: int, interface: str,
              block: np.ndarray, n_events: int, rate: float, session: int, frame: int = 1,
              drain_s: float = 0.5, ack_timeout_s: float = 10.0,
              oid_base: int | None = None, warmup_s: float = 0.0) -> RunRaw:
    """Send ``n_events`` of the cyclic flow ``block`` at ``rate`` events/s as one session,
    in frames of ``frame`` events; keep receiving until ``drain_s`` after the last send and
    until the last event is acknowledged (at most ``ack_timeout_s`` more). The stage
    breakdown counts the events due after ``warmup_s``."""
    if rate <= 0 or n_events < 1 or frame < 1:
        raise ValueError(f"rate={rate}, n_events={n_events}, frame={frame}: must be positive")
    rx = open_receiver(group, mport, interface)
    try:
        rx.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, 64 << 20)
    except OSError:
        pass  # not root: the 8 MiB of open_receiver
    rx.setblocking(False)
    sock = socket.create_connection((host, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        held = _login(sock, session)
        first = held + 1
        if oid_base is None:
            oid_base = (time.time_ns() // 1000 & 0xFFFFF) << 43  # a fresh order-id range
        fbuf, fsz, is_order = build_frames(block, frame)
        nblock = len(is_order)            # frames in the block
        fmv = memoryview(fbuf)
        uv = fbuf.view(np.uint64)
        cycle_of = np.zeros(nblock, np.int64)  # how often each frame's order ids moved on
        # A fresh order-id range per run (ids are unique per source), moved on per cycle.
        for j in range(nblock):
            move_order_ids(fbuf, fsz, is_order, j, oid_base)
        nframes = -(-n_events // frame)
        n_events = nframes * frame  # whole frames only
        period = 1e9 / rate
        due = (np.arange(nframes) * frame * period).astype(np.int64).tolist()  # ns after t0
        pack_q = struct.Struct("<Q").pack_into
        # What the loop writes is made and touched before its clock starts (on this VM a
        # fresh page costs more than the loop's own work: docs/performance.md); the
        # per-event times are made after it.
        raw = RunRaw(session, first, rate, frame, np.zeros(0, np.int64), np.zeros(0, np.int64))
        fsend = np.empty(nframes, np.int64)  # per frame: when it went out (0: never)
        fsend.fill(0)
        measured_from = first + min(n_events, int(np.ceil(warmup_s * rate)))
        rec = ArrivalRecorder(session, first, n_events, measured_from)
        sock.setblocking(False)
        ep = select.epoll()
        sfd, rfd = sock.fileno(), rx.fileno()
        ep.register(sfd, select.EPOLLIN)
        ep.register(rfd, select.EPOLLIN)
        rbuf, take = rec.buffer, rec.take
        stamp = _jit.entry(_stamp_frame, uv, 0, frame, 0, 0, is_order, 0, 0)
        gc.collect()
        gc.disable()  # the client's collector would stall its loop
        stolen0 = steal_ms()
        ru0, loop0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter_ns()
        k = 0          # next frame
        pc0 = time.perf_counter_ns() + 20_000_000
        wall0 = time.time_ns() + (pc0 - time.perf_counter_ns())
        pending = b""
        rd = W.FrameReader()
        acked = held
        last_sseq = first + n_events - 1
        ack_wait_ns = int((drain_s + ack_timeout_s) * 1e9)
        last_send = pc0
        while True:
            now = time.perf_counter_ns()
            if k < nframes and now - pc0 >= due[k] and not pending:
                ev0 = k * frame
                j, cyc = k % nblock, k // nblock
                off = j * fsz
                w0 = (off + W.HEADER.size) // 8
                delta = 0
                if cyc != cycle_of[j]:  # a new cycle of the block: new order ids
                    delta = int(cyc - cycle_of[j]) << 36
                    cycle_of[j] = cyc
                cnt = frame
                ts = time.time_ns()
                if cnt == 1:  # the latency path: no numpy on it
                    if delta:
                        move_order_ids(fbuf, fsz, is_order, j, delta)
                    pack_q(fmv, off + W.HEADER.size + 8 * W_SSEQ, first + ev0)
                    pack_q(fmv, off + W.HEADER.size + 8 * W_SEND_NS, ts)
                else:
                    stamp(uv, w0, cnt, first + ev0, ts, is_order, j, delta)
                fsend[k] = ts
                if now - pc0 - due[k] > 50_000:
                    raw.late_sends += 1
                data = fmv[off:off + W.HEADER.size + cnt * EVENT_WORDS * 8]
                try:
                    n = sock.send(data)
                except BlockingIOError:
                    n = 0
                if n < len(data):
                    pending = data[n:]
                k += 1
                last_send = time.perf_counter_ns()
                continue
            if pending:  # the node is pushing back: finish the frame first
                try:
                    n = sock.send(pending)
                    pending = pending[n:]
                except BlockingIOError:
                    pass
            elif k >= nframes:
                quiet = time.perf_counter_ns() - last_send
                if quiet > drain_s * 1e9 and (acked >= last_sseq or quiet > ack_wait_ns):
                    break
            for fd, _ in ep.poll(0):
                if fd == rfd:
                    while True:
                        try:
                            m = rx.recv_into(rbuf)
                        except BlockingIOError:
                            break
                        take(time.time_ns(), m)
                else:
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        raise ConnectionError("the node closed the session")
                    t = time.time_ns()
                    for kind, payload in rd.feed(data):
                        if kind == W.K_ACK:
                            acked, rej = W.decode_ack(payload)
                            raw.ack_log.append((t, acked))
                            if raw.rejects_first is None:
                                raw.rejects_first = rej
                            raw.rejects_last = rej
        raw.wall_s = (last_send - pc0) / 1e9
        raw.steal_ms = steal_ms() - stolen0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        loop_s = (time.perf_counter_ns() - loop0) / 1e9
        raw.client_faults = ru1.ru_minflt + ru1.ru_majflt - ru0.ru_minflt - ru0.ru_majflt
        raw.client_cpu = ((ru1.ru_utime - ru0.ru_utime) / loop_s,
                          (ru1.ru_stime - ru0.ru_stime) / loop_s)
        raw.intended_ns = wall0 + (np.arange(n_events) * period).astype(np.int64)
        raw.send_ns = fsend if frame == 1 else np.repeat(fsend, frame)
        raw.arrivals = rec
        ep.close()
        return raw
    finally:
        gc.enable()
        sock.close()
        rx.close()
