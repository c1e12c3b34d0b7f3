"""A session client that notes when every ACK arrives, for the pair benchmark.

:class:`AckClock` streams records paced at a fixed rate to a pair's session endpoints,
failing over as ``exposure send --retry`` does (a lost or silent connection: the other
endpoint, log in, resend what the node does not hold). It records when each record was
first sent and when each ACK arrived, so the benchmark can ask: after a fault at time T,
when was the first record *sent after T* acknowledged? A record sent after the primary
died can only be acknowledged by the new primary; one sent after the backup died can only
be acknowledged by a primary that runs alone.
"""

from __future__ import annotations

import select
import socket
import struct
import threading
import time

import numpy as np

from exposure.net import wire as W

__all__ = ["AckClock"]


class AckClock(threading.Thread):
    def __init__(self, endpoints: list[tuple[str, int]], recs: np.ndarray, rate: float,
                 session: int = 1, frame: int = 25, silent_s: float = 2.0):
        super().__init__(daemon=True)
        self.endpoints = endpoints
        self.recs = recs.copy()
        self.recs["sseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)
        self.rate = rate
        self.session = session
        self.frame = frame
        self.silent_ns = int(silent_s * 1e9)
        self.first_sent = np.zeros(len(recs) + 1, np.int64)  # ns, by seq (0: not yet)
        self.acks: list[tuple[int, int]] = []   # (ns, acked seq), in arrival order
        self.reconnects = 0
        self.stop = threading.Event()
        self.error: str | None = None

    def acked(self) -> int:
        return self.acks[-1][1] if self.acks else 0

    def first_ack_of_records_sent_after(self, t_ns: int) -> int | None:
        """ns of the first ACK covering a record first sent after ``t_ns`` (None: none)."""
        seqs = np.flatnonzero(self.first_sent > t_ns)
        if not len(seqs):
            return None
        s = int(seqs[0])
        times = [t for t, a in self.acks if a >= s]
        return times[0] if times else None

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # reported by the benchmark
            self.error = f"{type(e).__name__}: {e}"

    def _run(self) -> None:
        n = len(self.recs)
        t0 = time.monotonic_ns()
        k = 0
        while not self.stop.is_set() and self.acked() < n:
            host, port = self.endpoints[k % len(self.endpoints)]
            try:
                sock = socket.create_connection((host, port), timeout=0.5)
            except OSError:
                k += 1
                time.sleep(0.02)
                continue
            try:
                self._session(sock, t0)
            except OSError:
                pass
            finally:
                sock.close()
            self.reconnects += 1
            k += 1

    def _session(self, sock: socket.socket, t0: int) -> None:
        n = len(self.recs)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(2)
        sock.sendall(W.encode_login(self.session))
        reader = W.FrameReader()
        held = None
        while held is None:
            data = sock.recv(65536)
            if not data:
                return
            for kind, payload in reader.feed(data):
                if kind == W.K_LOGIN_OK:
                    (held,) = struct.unpack("<Q", payload)
                elif kind == W.K_REJECT:
                    return
        sock.setblocking(False)
        nxt = int(held)  # index of the next record to send
        last_progress = time.monotonic_ns()
        while not self.stop.is_set() and self.acked() < n:
            now = time.monotonic_ns()
            due = min(n, int((now - t0) * self.rate / 1e9) + 1)
            if nxt < due:
                hi = min(due, nxt + self.frame)
                part = self.recs[nxt:hi]
                part["send_ns"] = time.time_ns()
                try:
                    sock.sendall(W.encode_events(part))
                except BlockingIOError:
                    pass  # the node is not reading: the silence check below decides
                else:
                    fresh = self.first_sent[nxt + 1:hi + 1] == 0
                    self.first_sent[nxt + 1:hi + 1][fresh] = time.time_ns()
                    nxt = hi
            r, _, _ = select.select([sock], [], [], 0.001)
            if r:
                data = sock.recv(65536)
                if not data:
                    return
                for kind, payload in reader.feed(data):
                    if kind == W.K_ACK:
                        a, _ = W.decode_ack(payload)
                        if a > self.acked():
                            self.acks.append((time.time_ns(), int(a)))
                            last_progress = now
                    elif kind == W.K_REJECT:
                        return
            if self.acked() >= nxt:
                last_progress = now  # nothing outstanding: silence is fine
            elif now - last_progress > self.silent_ns:
                return  # a silent node: try the other


