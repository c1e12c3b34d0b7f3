"""The fuzzer's client connections: :class:`Conn` (one non-blocking connection on an
asyncio loop, parsing what the node sends), :class:`Lane` (a sequence of connections driven
by its own seeded generators) and :class:`_Sync` (a blocking session: the reference block,
the final logins)."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from collections import Counter, deque
from typing import TYPE_CHECKING

import numpy as np

from exposure.net import wire as W
from perf.fuzz.content import _M64

if TYPE_CHECKING:
    from perf.fuzz.traffic import Worker

WAIT_S = 20.0           # the longest the fuzzer waits for any answer of the node
# (no REJECTED: the fuzzer logs in without LOGIN_REJECTED, so one would be the node's bug)
_FROM_NODE = (W.K_CHALLENGE, W.K_LOGIN_OK, W.K_ACK, W.K_REJECT, W.K_HEARTBEAT)
_AFTER_LOGIN = (W.K_ACK, W.K_HEARTBEAT)


class Conn(asyncio.Protocol):
    """One client connection: parses what the node sends as it arrives."""

    def __init__(self) -> None:
        self.t: asyncio.Transport | None = None
        self.buf = bytearray()
        self.first: int | None = None     # kind of the first frame
        self.nonce: bytes | None = None
        self.held: int | None = None      # from LOGIN_OK
        self.rejects: list[tuple[int, int, str]] = []
        self.hb = 0
        self.acked = -1
        self.kinds: Counter = Counter()
        self.bad: str | None = None       # a malformed frame from the node
        self.closed = False
        self.on_bad = None                # called with what was wrong
        self._paused = False
        self._waiters: list[tuple[object, asyncio.Future]] = []

    # asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        n = len(buf)
        hdr = W.HEADER
        while n - pos >= 8:
            magic, version, kind, length = hdr.unpack_from(buf, pos)
            if magic != W.MAGIC or version != W.VERSION or length > 1 << 20:
                self._bad(f"a bad header from the node: {bytes(buf[pos:pos + 8]).hex()}")
                self.t.abort()
                break
            end = pos + 8 + length
            if end > n:
                break
            if self.first is None:
                self.first = kind
            if kind not in _FROM_NODE or (self.held is None and kind in _AFTER_LOGIN):
                self._bad(f"the node sent kind {kind}"
                          + (" before LOGIN_OK" if kind in _FROM_NODE else ""))
            if kind == W.K_HEARTBEAT:
                self.hb += 1
            else:
                self.kinds[kind] += 1
                p = bytes(buf[pos + 8:end])
                if kind == W.K_ACK:
                    self.acked = struct.unpack_from("<Q", p)[0]
                elif kind == W.K_CHALLENGE:
                    self.nonce = p
                elif kind == W.K_LOGIN_OK:
                    self.held = struct.unpack("<Q", p)[0]
                elif kind == W.K_REJECT:
                    self.rejects.append(W.decode_reject(p))
            pos = end
        if pos:
            del buf[:pos]
        self._wake()

    def _bad(self, what: str) -> None:
        if self.bad is None:
            self.bad = what
            if self.on_bad is not None:
                self.on_bad(what)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._paused = False
        self._wake()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            keep = []
            for pred, fut in self._waiters:
                if fut.done():
                    continue
                if pred():
                    fut.set_result(True)
                else:
                    keep.append((pred, fut))
            self._waiters = keep

    async def wait(self, pred, timeout: float = WAIT_S) -> bool:
        """Until ``pred()`` (checked after every arrival and at the close); False on a
        timeout."""
        if pred():
            return True
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False

    async def send(self, data: bytes) -> bool:
        if self.closed or self.t is None or self.t.is_closing():
            return False
        self.t.write(data)
        if self._paused:
            await self.wait(lambda: not self._paused or self.closed)
        return not self.closed

    def rst(self) -> None:
        """Close with a reset (SO_LINGER 0)."""
        if self.t is not None and not self.closed:
            sock = self.t.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.t.abort()

    def close(self) -> None:
        if self.t is not None and not self.closed:
            self.t.close()

    def reject_codes(self) -> list[int]:
        return [r[0] for r in self.rejects]


async def connect(addr, rcvbuf: int = 0) -> Conn | None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, addr), WAIT_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _, conn = await loop.create_connection(Conn, sock=sock)
    except (OSError, TimeoutError):
        sock.close()
        return None
    return conn


class Lane:
    """A sequence of connections driven by its own seeded generators."""

    def __init__(self, w: Worker, key: int, budget: int):
        self.w = w
        self.addr = w.addr
        self.budget = budget
        self.rnd = random.Random(w.seed * 1_000_003 + key)
        self.nrng = np.random.default_rng([w.seed & _M64, 77, key])
        self.frames = 0

    def count(self, cat: str, n: int = 1) -> None:
        self.frames += n
        self.w.frames[cat] += n

    def anomaly(self, what: str, detail: str = "") -> None:
        self.w.anomaly(what, detail)

    async def run(self) -> None:
        t0 = time.monotonic()
        while self.frames < self.budget:
            episode = self.pick()
            t = time.monotonic()
            await episode()
            self.w.episodes[episode.__name__][0] += 1
            self.w.episodes[episode.__name__][1] += time.monotonic() - t
        self.w.lane_s.append(round(time.monotonic() - t0, 2))

    async def open(self, rcvbuf: int = 0) -> Conn | None:
        c = await connect(self.addr, rcvbuf)
        self.w.stats["connections"] += 1
        if c is None:
            self.w.stats["connect_failures"] += 1
        else:
            c.on_bad = lambda what: self.anomaly("malformed", what)
        return c

    async def open_challenged(self, rcvbuf: int = 0) -> tuple[Conn, bytes] | None:
        """A new connection and the nonce of its CHALLENGE; None (the connection closed)
        when either fails."""
        c = await self.open(rcvbuf)
        if c is None:
            return None
        nonce = await self.challenge(c)
        if nonce is None:
            c.close()
            return None
        return c, nonce

    async def challenge(self, c: Conn) -> bytes | None:
        """The CHALLENGE every connection gets first (None: the node closed it first, at
        the connection cap)."""
        if not await c.wait(lambda: c.nonce is not None or c.closed or c.first is not None):
            self.anomaly("timeout", "no CHALLENGE")
            return None
        if c.first is not None and c.first != W.K_CHALLENGE:
            if c.first == W.K_REJECT and c.reject_codes()[:1] == [W.E_BUSY]:
                self.w.stats["refused_busy"] += 1
            else:
                self.anomaly("first_frame", f"first frame of kind {c.first}, not CHALLENGE")
            return None
        if c.nonce is None:
            self.w.stats["closed_before_challenge"] += 1
        elif len(c.nonce) != W.NONCE:
            self.anomaly("challenge", f"a {len(c.nonce)}-byte nonce")
        return c.nonce

    async def until_closed(self, c: Conn, what: str, timeout: float = WAIT_S) -> bool:
        if not await c.wait(lambda: c.closed, timeout):
            self.anomaly("timeout", f"the node did not close the connection after {what}")
            c.rst()
            return False
        return True

class _Sync:
    """A blocking session (the reference block, the final logins)."""

    def __init__(self, port: int, sid: int, secret: bytes):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rd = W.FrameReader()
        self.pending: deque = deque()
        self.held: int | None = None
        kind, nonce = self.frame()
        assert kind == W.K_CHALLENGE, kind
        self.s.sendall(W.encode_login(sid, W.login_mac(secret, sid, nonce)))
        kind, p = self.frame()
        if kind != W.K_LOGIN_OK:
            raise RuntimeError(f"login of session {sid} refused: {W.decode_reject(p)}")
        self.held = struct.unpack("<Q", p)[0]

    def frame(self, deadline: float | None = None):
        """The next frame; a HEARTBEAT every 2 s while it waits (the node may still be
        loading a stage: not idleness)."""
        deadline = deadline or time.monotonic() + WAIT_S
        while not self.pending:
            self.s.settimeout(2.0)
            try:
                data = self.s.recv(1 << 16)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the node did not answer") from None
                if self.held is not None:
                    self.s.sendall(W.encode_heartbeat())
                continue
            if not data:
                raise RuntimeError("the node closed the session")
            self.pending.extend(self.rd.feed(data))
        return self.pending.popleft()

    def wait_ack(self, seq: int, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while True:
            kind, p = self.frame(deadline)
            if kind == W.K_ACK and W.decode_ack(p)[0] >= seq:
                return
            if kind == W.K_REJECT:
                raise RuntimeError(f"REJECT {W.decode_reject(p)}")

    def close(self) -> None:
        self.s.close()
