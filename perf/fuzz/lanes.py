"""The fuzzer's lanes: :class:`SessionLane` (one authenticated session's connections: its
content, floods, resends, hostile frames and ends) and :class:`ChaosLane` (connections that
never log in)."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np

from exposure.core.types import EVENT_SIZE
from exposure.net import wire as W
from perf.fuzz.client import Conn, Lane
from perf.fuzz.content import (
    _HB,
    MAX_SESSIONS,
    SPECS,
    UNCONFIGURED,
    Content,
    Spec,
    _hdr,
    _random_records,
    _sizes,
    events_frames,
    secret_of,
)

if TYPE_CHECKING:
    from perf.fuzz.traffic import Worker


class SessionLane(Lane):
    """One authenticated session's connections (the only writer of its sseqs)."""

    def __init__(self, w: Worker, key: int, budget: int, spec: Spec):
        super().__init__(w, key, budget)
        self.spec = spec
        self.sid = spec.id
        self.secret = secret_of(w.seed, spec.id)
        self.content = Content(w.seed, spec.id)
        self.sent_max = w.start_held.get(spec.id, 0)   # highest content sseq sent
        self.acked = 0
        self.expect: int | None = w.start_held.get(spec.id)  # held exactly, next login
        self.expect_why = "start"
        self.slow_at = self.rnd.randrange(max(budget, 1))
        # frames of one content burst (bigger on a big run: fewer round trips a frame)
        self.burst_sizes = [1, 2, 4, 8, 16, 32, 64, 256] + (
            [512, 1024] if budget >= 50_000 else [])
        self.slow_done = False

    def pick(self):
        if not self.slow_done and self.frames >= self.slow_at:
            return self.slow_reader
        u = self.rnd.random()
        if u < 0.02:
            return self.replayed_login
        if u < 0.03:
            return self.cross_login
        return self.session

    async def login(self) -> tuple[Conn, int] | None:
        opened = await self.open_challenged()
        if opened is None:
            return None
        c, nonce = opened
        login = W.encode_login(self.sid, W.login_mac(self.secret, self.sid, nonce))
        self.w.captured.append(login)
        await c.send(login)
        self.count("login")
        if not await c.wait(lambda: c.held is not None or c.closed):
            self.anomaly("timeout", f"no LOGIN_OK for session {self.sid}")
            c.rst()
            return None
        if c.held is None:
            if c.rejects:
                self.anomaly("login_refused", f"session {self.sid}: {c.rejects[0]}")
            else:
                self.w.stats["login_closed_unanswered"] += 1  # evicted at the cap
            c.close()
            return None
        held = c.held
        self.w.stats["logins_ok"] += 1
        if self.expect is not None and held != self.expect:
            self.anomaly("held", f"session {self.sid}: LOGIN_OK says {held}, expected "
                                 f"exactly {self.expect} ({self.expect_why})")
        elif not self.acked <= held <= self.sent_max:
            self.anomaly("held", f"session {self.sid}: LOGIN_OK says {held}, outside "
                                 f"acknowledged {self.acked} .. sent {self.sent_max}")
        self.expect = None
        return c, held

    def _note_ack(self, c: Conn) -> None:
        if c.acked > self.acked:
            self.acked = c.acked

    async def session(self) -> None:
        got = await self.login()
        if got is None:
            await asyncio.sleep(0.005)
            return
        c, held = got
        cursor = held + 1
        hb0 = c.hb
        hb_sent = 0
        rnd = self.rnd
        if held and rnd.random() < 0.3:  # resend a window before what it holds
            lo = max(1, cursor - rnd.randint(1, 50))
            hi = cursor + rnd.randint(0, 20)
            await c.send(events_frames(self.content.raw(lo, hi)))
            self.count("resend_identical", cursor - lo)
            self.count("events", hi - cursor)
            self.sent_max = max(self.sent_max, hi - 1)
            cursor = hi
        for _ in range(rnd.randint(1, 6)):
            if self.frames >= self.budget or c.closed:
                break
            u = rnd.random()
            parts = []
            if u < 0.64:    # content
                nf = rnd.choice(self.burst_sizes)
                sizes = _sizes(rnd, nf)
                if self.budget >= 50_000 and rnd.random() < 0.01:  # the largest frames
                    nf, sizes = 1, [rnd.choice([W.MAX_RECORDS, W.MAX_RECORDS - 1])]
                n = nf if sizes is None else sum(sizes)
                parts.append(events_frames(self.content.raw(cursor, cursor + n), sizes))
                self.count("events", nf)
                cursor += n
            elif u < 0.76:  # heartbeat flood
                h = rnd.choice([1, 5, 20, 50, 100, 300, 1000])
                parts.append(_HB * h)
                hb_sent += h
                self.count("heartbeat", h)
            elif u < 0.90:  # mixed
                for _ in range(rnd.randint(2, 40)):
                    if rnd.random() < 0.5:
                        parts.append(_HB)
                        hb_sent += 1
                        self.count("heartbeat")
                    else:
                        k = rnd.choice([1, 1, 1, 2, 5])
                        parts.append(events_frames(self.content.raw(cursor, cursor + k),
                                                   [k]))
                        cursor += k
                        self.count("events")
            elif u < 0.95:  # identical resends
                if cursor > 1:
                    lo = rnd.randint(1, cursor - 1)
                    hi = min(cursor, lo + rnd.randint(1, 64))
                    parts.append(events_frames(self.content.raw(lo, hi)))
                    self.count("resend_identical", hi - lo)
            else:           # garbage resends: random records at or below what it holds
                k = rnd.randint(1, 16)
                recs = _random_records(self.nrng, k)
                recs["sseq"] = self.nrng.integers(0, cursor, k, dtype=np.uint64)
                parts.append(events_frames(recs.tobytes()))
                self.count("resend_garbage", k)
            self.sent_max = max(self.sent_max, cursor - 1)
            await c.send(b"".join(parts))
            if hb_sent - (c.hb - hb0) > 4096:  # answers outstanding: let them arrive
                await c.wait(lambda h=hb_sent: h - (c.hb - hb0) <= 1024 or c.closed)
            self._note_ack(c)
        if c.closed:
            self._unexpected(c, "during bursts")
            return
        await self.finish(c, cursor, hb0, hb_sent)

    def _unexpected(self, c: Conn, when: str) -> None:
        codes = c.reject_codes()
        self.anomaly("closed", f"session {self.sid}'s connection closed by the node {when} "
                               f"(rejects {c.rejects[:2]})")
        if not codes:
            self.w.stats["closed_unanswered"] += 1

    async def finish(self, c: Conn, cursor: int, hb0: int, hb_sent: int) -> None:
        rnd = self.rnd
        u = rnd.random()
        if u < 0.40:    # clean: every heartbeat answered, then FIN
            if not await c.wait(lambda: c.hb - hb0 >= hb_sent or c.closed):
                self.anomaly("timeout", f"{hb_sent - (c.hb - hb0)} heartbeats unanswered")
            elif c.closed:
                self._unexpected(c, "while its heartbeats were answered")
                return
            self._note_ack(c)
            c.close()
            self.w.stats["end_clean"] += 1
        elif u < 0.85:  # one hostile frame
            await self.hostile(c, cursor)
        elif u < 0.89:  # a truncated frame once all before it is acknowledged
            if await c.wait(lambda: c.acked >= cursor - 1 or c.closed) and not c.closed:
                self._note_ack(c)
                n = rnd.randint(1, 4)
                f = events_frames(self.content.raw(cursor, cursor + n), [n])
                await c.send(f[:rnd.randint(1, len(f) - 1)])
                self.count("truncated")
                self.sent_max = max(self.sent_max, cursor + n - 1)
                await asyncio.sleep(0.001)
                c.rst() if rnd.random() < 0.5 else c.close()
                self.expect, self.expect_why = cursor - 1, "a truncated frame"
                self.w.stats["end_truncated"] += 1
            else:
                self.anomaly("timeout", f"session {self.sid}: no ACK of {cursor - 1}")
                c.rst()
        elif u < 0.93:  # half-close: the node takes everything sent, then closes
            c.t.write_eof()
            if await self.until_closed(c, "a half-close"):
                self.expect, self.expect_why = cursor - 1, "a half-close"
            self.w.stats["end_half_close"] += 1
        elif u < 0.96:  # a reset in the middle of a frame
            n = rnd.randint(1, 8)
            f = events_frames(self.content.raw(cursor, cursor + n), [n])
            await c.send(f[:rnd.randint(1, len(f) - 1)])
            self.count("truncated")
            self.sent_max = max(self.sent_max, cursor + n - 1)
            c.rst()
            self.w.stats["end_rst"] += 1
        else:           # a second connection logs in as the same session
            got = await self.login()
            if got is None:
                c.close()
                return
            c2, held = got
            if await c.wait(lambda: c.closed):
                if c.reject_codes()[-1:] != [W.E_REPLACED]:
                    self.anomaly("replaced", f"the replaced connection got {c.rejects}")
            else:
                self.anomaly("timeout", "the replaced connection was not closed")
                c.rst()
            self.w.stats["end_replaced"] += 1
            await self.finish(c2, held + 1, c2.hb, 0)

    async def hostile(self, c: Conn, cursor: int) -> None:
        """One hostile frame after login; the node must REJECT it (with the expected code
        and seq) and close; it then holds exactly what came before it."""
        rnd, nrng = self.rnd, self.nrng
        kind = rnd.choice(["seq_gap", "seq_gap", "poison_seq", "poison_seq",
                           "random_payload", "huge_length", "bad_length", "random_kind",
                           "client_kind", "fixed_length", "second_login", "bad_magic",
                           "bad_version", "garbage", "header_bit_flip",
                           "header_bit_flip"])
        codes: set[int] | None = {W.E_PROTOCOL}
        detail = None
        if kind in ("seq_gap", "poison_seq"):
            j = rnd.choice([0, 0, 1, 2, 5])
            tail = rnd.choice([0, 0, 1, 3])
            recs = self.content.records(cursor, cursor + j + 1 + tail)
            if kind == "seq_gap":
                bad = cursor + j + rnd.choice([1, 2, 3, 1000, 2**32])
            else:
                bad = rnd.choice([2**63, 2**64 - 1, 2**63 - 1])
            recs["sseq"][j] = bad
            data = events_frames(recs.tobytes(), [len(recs)])
            codes, detail = {W.E_SEQ}, cursor + j
            self.sent_max = max(self.sent_max, cursor + j - 1)
            cursor += j
        elif kind == "random_payload":
            k = rnd.choice([1, 1, 2, 8, 100])
            recs = _random_records(nrng, k)
            if recs["sseq"][0] <= cursor:
                recs["sseq"][0] = cursor + 1 + int(recs["sseq"][0]) % 2**40
            data = events_frames(recs.tobytes(), [k])
            codes, detail = {W.E_SEQ}, cursor
        elif kind == "huge_length":
            n = rnd.choice([W.MAX_PAYLOAD + EVENT_SIZE, 2**31, 2**32 - 1, 2**32 - EVENT_SIZE])
            data = _hdr(W.K_EVENTS, n) + nrng.bytes(rnd.choice([0, 100, 4096]))
        elif kind == "bad_length":
            n = rnd.choice([0, 1, 8, 127, 129, 200, 1000])
            data = _hdr(W.K_EVENTS, n) + nrng.bytes(n)
        elif kind == "random_kind":
            k = rnd.choice([0, W.K_REJECTED + 1, W.K_REJECTED + 2, 100, 254, 255])
            n = rnd.choice([0, 8, 40, 128, 4096])
            data = _hdr(k, n) + nrng.bytes(n)
        elif kind == "client_kind":
            k, n = rnd.choice([(W.K_LOGIN_OK, 8), (W.K_ACK, 136), (W.K_CHALLENGE, 32),
                               (W.K_REJECT, 10), (W.K_REJECT, 60), (W.K_REJECT, 510),
                               (W.K_REJECTED, 16), (W.K_REJECTED, 48)])
            data = _hdr(k, n) + nrng.bytes(n)
        elif kind == "fixed_length":
            k, n = rnd.choice([(W.K_HEARTBEAT, 1), (W.K_HEARTBEAT, 16), (W.K_LOGIN, 39),
                               (W.K_LOGIN, 41), (W.K_LOGIN, 0), (W.K_REJECT, 9),
                               (W.K_REJECT, 511)])
            data = _hdr(k, n) + nrng.bytes(n)
        elif kind == "second_login":
            sid = rnd.choice([self.sid, 0, 2, 2**32 - 1])
            data = W.encode_login(sid, nrng.bytes(32))
            codes = {W.E_SESSION}
        elif kind in ("bad_magic", "bad_version"):
            if kind == "bad_magic":
                h = _hdr(W.K_EVENTS, EVENT_SIZE, magic=rnd.choice([0, 0x4558, 0xFFFF]))
            else:
                h = _hdr(W.K_EVENTS, EVENT_SIZE, version=rnd.choice([0, 1, 3, 255]))
            data = h + self.content.raw(cursor, cursor + 1)
        elif kind == "header_bit_flip":  # (never a bit that leaves a valid longer frame)
            frame = bytearray(events_frames(self.content.raw(cursor, cursor + 1)))
            bit = rnd.choice([b for b in range(64) if b < 40 or b >= 52])
            frame[bit // 8] ^= 1 << (bit % 8)
            data = bytes(frame)
        else:
            data = nrng.bytes(rnd.choice([8, 9, 64, 1000, 5000]))
            if data[:2] == W.HEADER.pack(W.MAGIC, 0, 0, 0)[:2]:
                codes = None
        self.count(kind)
        await c.send(data)
        self.w.stats["end_hostile"] += 1
        if not await self.until_closed(c, f"a hostile frame ({kind})"):
            return
        if codes is not None:
            got = c.reject_codes()
            if len(got) != 1 or got[0] not in codes:
                self.anomaly("reject", f"{kind}: REJECT codes {c.rejects}, expected one of "
                                       f"{sorted(codes)}")
            elif detail is not None and c.rejects[0][1] != detail:
                self.anomaly("reject", f"{kind}: E_SEQ names {c.rejects[0][1]}, expected "
                                       f"{detail}")
            else:
                self.expect, self.expect_why = cursor - 1, f"REJECT of {kind}"
        self._note_ack(c)

    async def replayed_login(self) -> None:
        """A LOGIN whose proof was made for another connection's nonce."""
        if not self.w.captured:
            return await self.session()
        c = await self.open()
        if c is None:
            return
        if await self.challenge(c) is None:
            c.close()
            return
        await c.send(self.rnd.choice(self.w.captured))
        self.count("auth_replayed")
        await self.w.expect_auth(c, {W.E_AUTH}, "a replayed login")

    async def cross_login(self) -> None:
        """A proof made with this session's secret for the nonce, claiming another id."""
        opened = await self.open_challenged()
        if opened is None:
            return
        c, nonce = opened
        other = self.rnd.choice([s.id for s in SPECS if s.id != self.sid]
                                + list(UNCONFIGURED[:3]))
        await c.send(W.encode_login(other, W.login_mac(self.secret, self.sid, nonce)))
        self.count("auth_cross_session")
        await self.w.expect_auth(c, {W.E_AUTH}, "a proof of another session")

    async def slow_reader(self) -> None:
        """Logs in, stops reading, floods heartbeats: the node must disconnect it rather
        than queue its answers without bound (once per lane; its heartbeats do not count
        against the lane's budget)."""
        self.slow_done = True
        opened = await self.open_challenged(rcvbuf=4096)
        if opened is None:
            return
        c, nonce = opened
        await c.send(W.encode_login(self.sid, W.login_mac(self.secret, self.sid, nonce)))
        self.count("login")
        if not await c.wait(lambda: c.held is not None or c.closed) or c.held is None:
            c.rst()
            return
        self.w.stats["logins_ok"] += 1
        c.t.pause_reading()
        h = 40_000
        for _ in range(10):
            if not await c.send(_HB * (h // 10)):
                break
        self.w.stats["slow_reader_heartbeats"] += h  # (not in the frame counts)
        # Once all is written (the node has read it), give it time to answer and give
        # up; then read: a node that closed it leaves its answers short and an EOF (its
        # FIN waits behind the answers in a full window).
        t = time.monotonic()
        while c.t.get_write_buffer_size() and not c.closed and time.monotonic() - t < 5:
            await asyncio.sleep(0.02)
        await asyncio.sleep(2.0)
        if not c.closed:
            c.t.resume_reading()
        await c.wait(lambda: c.closed or c.hb >= h, 10.0)
        self.w.stats["slow_reader_closed" if c.closed and c.hb < h
                     else "slow_reader_survived"] += 1
        c.rst()


class ChaosLane(Lane):
    """Connections that never log in."""

    def pick(self):
        u = self.rnd.random()
        if u < 0.40:
            return self.prelogin
        if u < 0.75:
            return self.bad_login
        if u < 0.80:
            return self.drip_login
        if u < 0.81:
            return self.flood
        return self.connect_close

    async def prelogin(self) -> None:
        """Anything but a LOGIN first: the node closes the connection unanswered."""
        rnd, nrng = self.rnd, self.nrng
        c = await self.open()
        if c is None:
            return
        early = rnd.random() < 0.3  # before the CHALLENGE has arrived
        if not early and await self.challenge(c) is None:
            c.close()
            return
        u = rnd.random()
        if u < 0.30:    # one frame of a kind: valid length, or not
            k = rnd.choice([0, W.K_LOGIN_OK, W.K_EVENTS, W.K_ACK, W.K_REJECT, W.K_HEARTBEAT,
                            W.K_CHALLENGE, W.K_REJECTED, 9, 77, 255])
            n = {W.K_LOGIN_OK: 8, W.K_ACK: 136, W.K_CHALLENGE: 32, W.K_HEARTBEAT: 0,
                 W.K_EVENTS: EVENT_SIZE, W.K_REJECT: 20}.get(k, 16)
            if rnd.random() < 0.3:
                n = rnd.choice([1, 39, 41, 129, 4000])
            data = _hdr(k, n) + nrng.bytes(n)
            if k == W.K_EVENTS and n == EVENT_SIZE:
                data = _hdr(k, n) + self.w.any_content(rnd)
            self.count(f"prelogin_kind_{k}")
        elif u < 0.45:  # a wrong-length LOGIN (its header is checked at once)
            n = rnd.choice([0, 8, 39, 41, 1000, 2**31])
            data = _hdr(W.K_LOGIN, n) + nrng.bytes(min(n, 64))
            self.count("prelogin_login_bad_length")
        elif u < 0.60:  # a heartbeat flood
            h = rnd.choice([1, 2, 10, 10, 100])
            data = _HB * h
            self.count("prelogin_heartbeat", h)
        elif u < 0.72:  # garbage
            data = nrng.bytes(rnd.choice([1, 7, 8, 100, 4096, 5000, 20000]))
            if data[:2] == W.HEADER.pack(W.MAGIC, 0, 0, 0)[:2]:
                data = b"\0" + data
            self.count("prelogin_garbage")
        elif u < 0.82:  # huge lengths
            data = _hdr(rnd.choice([W.K_EVENTS, W.K_REJECT, 200]),
                        rnd.choice([2**31, 2**32 - 1, W.MAX_PAYLOAD + EVENT_SIZE]))
            self.count("prelogin_huge_length")
        elif u < 0.92:  # events frames, as if logged in
            k = rnd.randint(1, 20)
            data = events_frames(b"".join(self.w.any_content(rnd) for _ in range(k)))
            self.count("prelogin_events", k)
        else:           # bad magic / version
            data = _hdr(W.K_LOGIN, 40, magic=rnd.choice([0, 0x4558]),
                        version=rnd.choice([1, 3])) + nrng.bytes(40)
            self.count("prelogin_bad_header")
        await c.send(data)
        short = len(data) < 8
        if short:  # an incomplete header: the node waits for more; we leave
            c.rst() if rnd.random() < 0.5 else c.close()
            return
        if not await self.until_closed(c, "a pre-login frame"):
            return
        if early and c.first is None:
            self.w.stats["closed_before_challenge"] += 1
        elif c.first != W.K_CHALLENGE and not (c.first == W.K_REJECT and
                                               c.reject_codes()[:1] == [W.E_BUSY]):
            self.anomaly("first_frame", f"first frame of kind {c.first}")
        if c.rejects and c.reject_codes() != [W.E_BUSY]:
            self.anomaly("prelogin_answered", f"a pre-login frame got {c.rejects}")

    async def bad_login(self) -> None:
        rnd, nrng = self.rnd, self.nrng
        opened = await self.open_challenged()
        if opened is None:
            return
        c, nonce = opened
        flags = 0
        u = rnd.random()
        if u < 0.35:
            sid = rnd.choice(SPECS).id
            proof = W.login_mac(nrng.bytes(32).hex().encode(), sid, nonce)
            codes, cat = {W.E_AUTH}, "auth_wrong_secret"
        elif u < 0.55 and self.w.captured:
            c_login = rnd.choice(self.w.captured)
            await c.send(c_login)
            self.count("auth_replayed")
            await self.w.expect_auth(c, {W.E_AUTH}, "a replayed login")
            return
        elif u < 0.80:
            sid = rnd.choice(UNCONFIGURED)
            proof = (W.login_mac(secret_of(self.w.seed, sid), sid, nonce)
                     if rnd.random() < 0.5 else nrng.bytes(32))
            codes, cat = {W.E_AUTH}, "auth_unconfigured"
        elif u < 0.90:
            sid = rnd.choice([0, MAX_SESSIONS + 1, 2**31, 2**32 - 1])
            proof = nrng.bytes(32)
            codes, cat = {W.E_SESSION}, "auth_bad_id"
        elif u < 0.95:
            sid = rnd.choice(SPECS).id
            proof = nrng.bytes(32)
            codes, cat = {W.E_AUTH}, "auth_random_proof"
        else:  # a valid proof with LOGIN flags the node does not know: refused, and the
            sid = rnd.choice(SPECS).id  # session's live connection is not replaced
            proof = W.login_mac(secret_of(self.w.seed, sid), sid, nonce)
            flags = rnd.choice([2, 3, 0x80, 2**31, 2**32 - 1])
            codes, cat = {W.E_PROTOCOL}, "login_unknown_flags"
        tail = b""
        if rnd.random() < 0.2:  # frames after it, which must never be looked at
            tail = _HB * rnd.randint(1, 50) + events_frames(self.w.any_content(rnd))
        await c.send(W.encode_login(sid, proof, flags) + tail)
        self.count(cat)
        await self.w.expect_auth(c, codes, cat)

    async def drip_login(self) -> None:
        """A bad LOGIN one small piece at a time: the node reassembles it, then refuses."""
        c = await self.open()
        if c is None:
            return
        if await self.challenge(c) is None:
            c.close()
            return
        data = W.encode_login(self.rnd.choice(SPECS).id, self.nrng.bytes(32))
        pos = 0
        while pos < len(data) and not c.closed:
            k = self.rnd.randint(1, 7)
            await c.send(data[pos:pos + k])
            pos += k
            await asyncio.sleep(0.0005)
        self.count("auth_dripped")
        await self.w.expect_auth(c, {W.E_AUTH}, "a dripped login")

    async def flood(self) -> None:
        """Many connections at once, none of which logs in."""
        n = self.rnd.randint(20, 120)
        conns = await asyncio.gather(*(self.open() for _ in range(n)))
        for c in conns:
            if c is not None and self.rnd.random() < 0.5:
                await c.send(b"\x45")
                self.count("flood_byte")
        await asyncio.sleep(self.rnd.choice([0.0, 0.05, 0.2]))
        for c in conns:
            if c is not None:
                c.rst() if self.rnd.random() < 0.5 else c.close()
        self.w.stats["floods"] += 1

    async def connect_close(self) -> None:
        c = await self.open()
        if c is None:
            return
        if self.rnd.random() < 0.5:
            await asyncio.sleep(0)
        c.rst() if self.rnd.random() < 0.5 else c.close()
        self.count("connect_close")
