"""The FIX session layer, without I/O (docs/fix.md, "Session layer").

A :class:`Session` is one FIX session of a :class:`SessionConfig` (FIX.4.2, FIX.4.4, or
FIXT.1.1 with DefaultApplVerID 9, FIX 5.0 SP2). The I/O (server.py) gives it what a
connection read (:meth:`Session.receive`: messages and framing errors from
:class:`~exposure.fix.codec.FixReader`) and the time (:meth:`Session.tick`); it answers with
bytes to write (:attr:`Session.outbox`) and whether to close (:attr:`Session.closing`), and
calls ``on_app(config, message)`` once per application message, in MsgSeqNum order.

Persistence: a :class:`SeqStore` holds each session's next expected inbound MsgSeqNum and
next outbound one. The inbound number moves past a message only after ``on_app`` returned
for it (a session message moves it at once), so a gateway killed with -9 and started again
asks (ResendRequest) for exactly what it did not pass on, once the store has been flushed
after the callbacks made their events durable. :class:`FileSeqStore` writes one JSON file
atomically (temporary file, fsync, rename, fsync of the directory).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from exposure.fix.codec import FixError, FixMessage, encode, utc_timestamp
from exposure.fix.fast import F_PLAIN, F_POSS_RESEND, FixRun, session_flags

__all__ = [
    "BEGIN_STRINGS",
    "ConfigError",
    "FileSeqStore",
    "MemorySeqStore",
    "SeqStore",
    "Session",
    "SessionConfig",
]

log = logging.getLogger(__name__)

BEGIN_STRINGS = ("FIX.4.2", "FIX.4.4", "FIXT.1.1")
ADMIN_TYPES = frozenset({"0", "1", "2", "3", "4", "5", "A"})
# Application MsgTypes FIX defines (4.2 to 5.0 SP2): one of these that a session does not
# take is "unsupported" (BusinessMessageReject 380=3), anything else "unknown" (the same
# answer, counted apart).
_KNOWN_APP = re.compile(r"^([6-9]|[B-Za-z]|A[A-Z]|B[A-Z]|C[A-Z])$")

# What a message of a type must carry (besides the standard header), checked before it is
# passed on: a missing one is a session Reject 373=1 naming it (371).
REQUIRED: dict[str, tuple[int, ...]] = {
    "1": (112,),
    "2": (7, 16),
    "4": (36,),
    "8": (37, 17, 150, 39, 54),
}


def _int(v: bytes | None) -> int | None:
    """A non-negative integer field's value, or None when absent, not digits or absurd."""
    if v is None or not v.isdigit() or len(v) > 18:
        return None
    return int(v)


class ConfigError(ValueError):
    """A [[fix]] table that is not valid: the message names the key and its value."""


def _hostport(key: str, value: Any) -> tuple[str, int]:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"[[fix]] {key} = {value!r}: expected \"host:port\"")
    host, _, port = value.rpartition(":")
    if not (port.isascii() and port.isdigit() and len(port) <= 5) or int(port) > 65535:
        raise ConfigError(f"[[fix]] {key} = {value!r}: the port is not 0..65535")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class SessionConfig:
    """One [[fix]] table: a FIX session. ``from_table`` validates it and names any bad or
    unknown key."""

    role: str
    begin_string: str
    sender_comp_id: str
    target_comp_id: str
    source: int
    listen: str | None = None
    connect: str | None = None
    password: str | None = None
    allowed: tuple[str, ...] = ()
    heartbeat_s: int = 30
    reset_on_logon: bool = False
    msg_types: tuple[str, ...] = ("8",)
    max_queue: int = 10000
    logon_timeout_s: float = 10.0
    logout_timeout_s: float = 2.0
    reconnect_s: float = 1.0
    reconnect_max_s: float = 30.0
    name: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    KEYS = ("role", "listen", "connect", "begin_string", "sender_comp_id", "target_comp_id",
            "source", "password", "allowed", "heartbeat_s", "reset_on_logon", "msg_types",
            "max_queue", "logon_timeout_s", "logout_timeout_s", "reconnect_s",
            "reconnect_max_s", "name")

    @property
    def key(self) -> str:
        """The session's identity, as QuickFIX writes it: BEGIN:SENDER->TARGET."""
        return f"{self.begin_string}:{self.sender_comp_id}->{self.target_comp_id}"

    @property
    def listen_addr(self) -> tuple[str, int]:
        return _hostport("listen", self.listen)

    @property
    def connect_addr(self) -> tuple[str, int]:
        return _hostport("connect", self.connect)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], *, known: Iterable[str] = ()) -> SessionConfig:
        """Validate one [[fix]] table. ``known``: more keys that a caller (the gateway)
        reads itself; they are kept in ``extra``, anything else unknown is an error."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"[[fix]] must be a table, not {table!r}")
        allowed_keys = set(cls.KEYS) | set(known)
        unknown = sorted(k for k in table if k not in allowed_keys)
        if unknown:
            raise ConfigError(f"[[fix]] unknown key(s): {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(allowed_keys))})")
        t = dict(table)
        extra = {k: t.pop(k) for k in list(t) if k not in cls.KEYS}

        def need(k: str) -> Any:
            if k not in t:
                raise ConfigError(f"[[fix]] missing key {k}")
            return t[k]

        role = need("role")
        if role not in ("acceptor", "initiator"):
            raise ConfigError(f"[[fix]] role = {role!r}: expected \"acceptor\" or \"initiator\"")
        bs = need("begin_string")
        if bs not in BEGIN_STRINGS:
            raise ConfigError(f"[[fix]] begin_string = {bs!r}: expected one of "
                              f"{', '.join(BEGIN_STRINGS)}")
        for k in ("sender_comp_id", "target_comp_id"):
            v = need(k)
            if not isinstance(v, str) or not v or not v.isprintable() or "\x01" in v \
                    or len(v) > 64 or " " in v:
                raise ConfigError(f"[[fix]] {k} = {v!r}: expected a non-empty name "
                                  "(printable, no spaces, at most 64 characters)")
        src = need("source")
        if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < 2 ** 31:
            raise ConfigError(f"[[fix]] source = {src!r}: expected an integer 0..2^31-1")
        if role == "acceptor":
            _hostport("listen", need("listen"))
            if t.get("connect") is not None:
                raise ConfigError(f"[[fix]] connect = {t['connect']!r}: an acceptor listens "
                                  "(listen = \"host:port\")")
        else:
            _hostport("connect", need("connect"))
            if t.get("listen") is not None:
                raise ConfigError(f"[[fix]] listen = {t['listen']!r}: an initiator connects "
                                  "(connect = \"host:port\")")
        pw = t.get("password")
        if pw is not None and (not isinstance(pw, str) or "\x01" in pw):
            raise ConfigError("[[fix]] password: expected a string")
        allowed = t.get("allowed", [])
        if not isinstance(allowed, list | tuple) or not all(
                isinstance(a, str) and a for a in allowed):
            raise ConfigError(f"[[fix]] allowed = {allowed!r}: expected a list of addresses")
        t["allowed"] = tuple(allowed)
        mt = t.get("msg_types", ["8"])
        if not isinstance(mt, list | tuple) or not mt or not all(
                isinstance(m, str) and m and m not in ADMIN_TYPES for m in mt):
            raise ConfigError(f"[[fix]] msg_types = {mt!r}: expected a list of application "
                              "MsgTypes such as [\"8\"]")
        t["msg_types"] = tuple(mt)
        for k, lo, hi in (("heartbeat_s", 1, 3600), ("max_queue", 1, 10_000_000)):
            if k in t:
                v = t[k]
                if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                    raise ConfigError(f"[[fix]] {k} = {v!r}: expected an integer {lo}..{hi}")
        for k in ("logon_timeout_s", "logout_timeout_s", "reconnect_s", "reconnect_max_s"):
            if k in t:
                v = t[k]
                if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 3600:
                    raise ConfigError(f"[[fix]] {k} = {v!r}: expected seconds in (0, 3600]")
                t[k] = float(v)
        if "reset_on_logon" in t and not isinstance(t["reset_on_logon"], bool):
            raise ConfigError(f"[[fix]] reset_on_logon = {t['reset_on_logon']!r}: "
                              "expected true or false")
        if "name" in t and not isinstance(t["name"], str):
            raise ConfigError(f"[[fix]] name = {t['name']!r}: expected a string")
        return cls(**{f.name: t[f.name] for f in fields(cls) if f.name in t}, extra=extra)


class SeqStore(Protocol):
    """Each session's next expected inbound MsgSeqNum and next outbound one."""

    def get(self, key: str) -> tuple[int, int]:
        """(next inbound expected, next outbound) of session ``key``; (1, 1) if new."""
        ...

    def set(self, key: str, inbound: int, outbound: int) -> None:
        """Record both numbers (in memory; durable at the next :meth:`flush`)."""
        ...

    def flush(self) -> None:
        """Make what was set durable."""
        ...


class MemorySeqStore:
    """A :class:`SeqStore` in memory (tests; a gateway that keeps the numbers itself)."""

    def __init__(self) -> None:
        self.seqs: dict[str, tuple[int, int]] = {}
        self.flushes = 0

    def get(self, key: str) -> tuple[int, int]:
        return self.seqs.get(key, (1, 1))

    def set(self, key: str, inbound: int, outbound: int) -> None:
        self.seqs[key] = (inbound, outbound)

    def flush(self) -> None:
        self.flushes += 1


class FileSeqStore(MemorySeqStore):
    """A :class:`SeqStore` in one JSON file, ``{key: [inbound, outbound]}``, rewritten
    atomically on :meth:`flush` when something changed."""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = Path(path)
        self._dirty = False
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            data = {}
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.path}: not a FIX sequence file ({e})") from e
        if not isinstance(data, dict):
            raise ValueError(f"{self.path}: not a FIX sequence file")
        for k, v in data.items():
            if (not isinstance(v, list) or len(v) != 2
                    or not all(isinstance(x, int) and x >= 1 for x in v)):
                raise ValueError(f"{self.path}: {k}: expected [inbound, outbound], got {v!r}")
            self.seqs[k] = (v[0], v[1])

    def set(self, key: str, inbound: int, outbound: int) -> None:
        if self.seqs.get(key) != (inbound, outbound):
            self.seqs[key] = (inbound, outbound)
            self._dirty = True

    def flush(self) -> None:
        if not self._dirty:
            return
        self.flushes += 1
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({k: list(v) for k, v in sorted(self.seqs.items())}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._dirty = False


# Session states
WAIT_LOGON = "wait_logon"     # acceptor: connected, no Logon yet; initiator: Logon sent
ACTIVE = "active"
LOGOUT_SENT = "logout_sent"
CLOSED = "closed"

COUNTER_NAMES = (
    "logons", "logouts", "app_messages", "admin_messages", "heartbeats_sent",
    "test_requests_sent", "resend_requests_sent", "resend_requests_answered", "gap_fills_in",
    "seq_resets_in", "possdup_dropped", "poss_resend", "queued", "queue_dropped",
    "rejects_sent", "business_rejects_sent", "rejects_in", "unknown_msg_type",
    "unsupported_msg_type", "missing_tag", "bad_value", "wrong_comp_id", "wrong_begin_string",
    "bad_password", "seq_too_low", "peer_dead", "garbage", "bad_length", "bad_checksum",
    "too_long", "garbled", "not_logon_first", "logon_timeout",
)


class Session:
    """One FIX session's state, across its connections. The I/O calls :meth:`connected`
    when a connection starts (for an acceptor: with the Logon that matched it),
    :meth:`receive` with what it read, :meth:`tick` now and then, and :meth:`disconnected`;
    it writes :attr:`outbox` and closes when :attr:`closing`."""

    def __init__(self, config: SessionConfig, store: SeqStore,
                 on_app: Callable[[SessionConfig, FixMessage], None], *,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time,
                 on_bad: Callable[[SessionConfig, str, bytes], None] | None = None,
                 on_app_batch: Callable[[SessionConfig, Any, int, int], None] | None = None
                 ) -> None:
        self.config = config
        self.on_app_batch = on_app_batch
        self.store = store
        self.on_app = on_app
        self.on_bad = on_bad
        self.clock = clock
        self.wallclock = wallclock
        self.inbound, self.outbound = store.get(config.key)
        self.state = CLOSED
        self.outbox: list[bytes] = []
        self.closing = False
        self.close_reason = ""
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self.heartbeat_s = float(config.heartbeat_s)
        self._queue: dict[int, FixMessage] = {}
        self._resend_until = 0       # a ResendRequest is outstanding up to this seq
        self._last_sent = 0.0
        self._last_received = 0.0
        self._test_sent = 0.0        # when the outstanding TestRequest went (0: none)
        self._test_seq = 0
        self._logout_at = 0.0
        self._connected_at = 0.0
        self._logon_sent = False
        self._bs = config.begin_string
        self._sender = config.sender_comp_id.encode()
        self._target = config.target_comp_id.encode()
        self._types = frozenset(config.msg_types)
        self._bs_bytes = self._bs.encode()

    # ---------------------------------------------------------------------------- output
    def _send(self, msg_type: str, body: list[tuple[int, object]] | tuple = (), *,
              seq: int | None = None, poss_dup: bool = False) -> None:
        now = self.wallclock()
        st = utc_timestamp(now)
        if seq is None:
            seq = self.outbound
            self.outbound += 1
        self.outbox.append(encode(self._bs, msg_type, body, sender=self.config.sender_comp_id,
                                  target=self.config.target_comp_id, seq=seq, sending_time=st,
                                  poss_dup=poss_dup, orig_sending_time=st))
        self._last_sent = self.clock()
        self._save()

    def _save(self) -> None:
        self.store.set(self.config.key, self.inbound, self.outbound)

    def _logon_body(self, reset: bool, hb: int) -> list[tuple[int, object]]:
        body: list[tuple[int, object]] = [(98, 0), (108, hb)]
        if reset:
            body.append((141, "Y"))
        if self.config.password and self.config.role == "initiator":
            body.append((554, self.config.password))
        if self._bs == "FIXT.1.1":
            body.append((1137, 9))
        return body

    def _logout(self, text: str, *, close_now: bool = False) -> None:
        self._send("5", [(58, text)] if text else [])
        self.counters["logouts"] += 1
        if close_now:
            self._close(text)
        else:
            self.state = LOGOUT_SENT
            self._logout_at = self.clock()
            self.close_reason = text

    def _close(self, reason: str) -> None:
        self.closing = True
        self.close_reason = reason
        self.state = CLOSED

    def _reject(self, msg: FixMessage, reason: int, text: str, tag: int | None = None) -> None:
        body: list[tuple[int, object]] = []
        if msg.seq is not None:
            body.append((45, msg.seq))
        if tag is not None:
            body.append((371, tag))
        if msg.msg_type:
            body.append((372, msg.msg_type))
        body += [(373, reason), (58, text)]
        self._send("3", body)
        self.counters["rejects_sent"] += 1
        self._bad(text, msg.raw)

    def _business_reject(self, msg: FixMessage, reason: int, text: str) -> None:
        body: list[tuple[int, object]] = [(45, msg.seq or 0), (372, msg.msg_type),
                                          (380, reason), (58, text)]
        self._send("j", body)
        self.counters["business_rejects_sent"] += 1
        self._bad(text, msg.raw)

    def _bad(self, reason: str, raw: bytes) -> None:
        log.warning("FIX %s: %s", self.config.key, reason)
        if self.on_bad is not None:
            self.on_bad(self.config, reason, raw)

    # --------------------------------------------------------------------- connections
    def connected(self) -> None:
        """A connection starts: an initiator sends its Logon; an acceptor waits for
        :meth:`logon`."""
        self.outbox.clear()
        self.closing = False
        self.close_reason = ""
        self._queue.clear()
        self._resend_until = 0
        self._test_sent = 0.0
        self._logon_sent = False
        self.inbound, self.outbound = self.store.get(self.config.key)
        now = self.clock()
        self._connected_at = self._last_received = now
        self.state = WAIT_LOGON
        if self.config.role == "initiator":
            if self.config.reset_on_logon:
                self.inbound = self.outbound = 1
            self._send("A", self._logon_body(self.config.reset_on_logon,
                                             self.config.heartbeat_s))
            self._logon_sent = True

    def disconnected(self) -> None:
        """The connection is gone (either side closed it)."""
        self.state = CLOSED
        self._queue.clear()
        self._resend_until = 0
        self.outbox.clear()

    @property
    def active(self) -> bool:
        return self.state in (ACTIVE, LOGOUT_SENT)

    def logout(self, text: str = "") -> None:
        """Start the Logout handshake (the gateway stops): wait ``logout_timeout_s`` for the
        counterparty's Logout, then close."""
        if self.state == ACTIVE:
            self._logout(text)
        elif self.state == WAIT_LOGON:
            self._close(text or "stopped")

    # ------------------------------------------------------------------------- timers
    def tick(self) -> None:
        """Heartbeats, TestRequests, a dead peer, Logon and Logout timeouts."""
        if self.state == CLOSED:
            return
        now = self.clock()
        if self.state == WAIT_LOGON:
            if now - self._connected_at > self.config.logon_timeout_s:
                self.counters["logon_timeout"] += 1
                self._close("no Logon in time")
            return
        if self.state == LOGOUT_SENT:
            if now - self._logout_at > self.config.logout_timeout_s:
                self._close(self.close_reason or "Logout not answered")
            return
        hb = self.heartbeat_s
        if now - self._last_sent >= hb:
            self._send("0")
            self.counters["heartbeats_sent"] += 1
        quiet = now - self._last_received
        if self._test_sent:
            if now - self._test_sent > hb * 1.2 + 0.5:
                self.counters["peer_dead"] += 1
                self._close("no answer to a TestRequest: the counterparty is gone")
        elif quiet > hb * 1.2 + 0.5:
            self._test_seq += 1
            self._send("1", [(112, f"TEST{self._test_seq}")])
            self._test_sent = now
            self.counters["test_requests_sent"] += 1

    # ------------------------------------------------------------------------- input
    def logon(self, msg: FixMessage, password_ok: bool = True) -> None:
        """An acceptor's first message on a connection, already matched to this session
        by its CompIDs: a Logon."""
        self.connected()
        self.receive([msg])

    def receive(self, items: Iterable[FixMessage | FixError]) -> None:
        """Process what a connection read, in order: messages, framing errors, and runs
        of clean messages (:class:`exposure.fix.fast.FixRun`, from
        :meth:`~exposure.fix.codec.FixReader.feed_batch`)."""
        for item in items:
            if self.closing:
                return
            if isinstance(item, FixRun):
                self._run(item)
                continue
            if isinstance(item, FixError):
                # garbled: ignored as FIX prescribes (the seq is not consumed; the next good
                # message shows the gap and causes a ResendRequest); a message too long for
                # our bound cannot be skipped safely: Logout
                self.counters[item.kind] += 1
                self._bad(f"{item.kind}: {item.detail}", item.raw)
                if item.kind == "too_long" and self.state in (ACTIVE, WAIT_LOGON):
                    if self.state == ACTIVE:
                        self._logout(f"message too long ({item.detail})", close_now=True)
                    else:
                        self._close(f"message too long ({item.detail})")
                continue
            self._last_received = self.clock()
            self._test_sent = 0.0
            self._one(item)

    def _run(self, run: FixRun) -> None:
        """A run of clean messages: in-order plain ExecutionReports go to ``on_app_batch``
        (or ``on_app`` one by one) a run at a time, with exactly the checks, counters and
        seq moves :meth:`_one` would make; any other message goes through :meth:`_one`."""
        flags, seqs = run.flags, run.seqs
        if flags is None:
            flags, seqs = session_flags(run, self._bs_bytes, self._sender, self._target)
            run.flags, run.seqs = flags, seqs
        n = run.n
        bulk = "8" in self._types
        i = 0
        while i < n:
            if self.closing:
                return
            if bulk and self.state == ACTIVE and not self._queue and \
                    flags[i] & F_PLAIN and seqs[i] == self.inbound:
                j = i + 1
                nxt = self.inbound + 1
                while j < n and flags[j] & F_PLAIN and seqs[j] == nxt:
                    j += 1
                    nxt += 1
                self._last_received = self.clock()
                self._test_sent = 0.0
                c = self.counters
                resent = int(np.count_nonzero(flags[i:j] & F_POSS_RESEND))
                if self.on_app_batch is not None:
                    c["app_messages"] += j - i
                    c["poss_resend"] += resent
                    self.on_app_batch(self.config, run, i, j)
                    self.inbound += j - i
                    self._save()
                else:
                    for m in range(i, j):
                        c["app_messages"] += 1
                        if flags[m] & F_POSS_RESEND:
                            c["poss_resend"] += 1
                        self.on_app(self.config, run.message(m))
                        self.inbound += 1
                        self._save()
                i = j
                continue
            self._last_received = self.clock()
            self._test_sent = 0.0
            self._one(run.message(i))
            i += 1

    def _one(self, msg: FixMessage) -> None:
        mt = msg.msg_type
        # the standard header
        if msg.raw[2:2 + len(self._bs)] != self._bs.encode() or \
                msg.raw[2 + len(self._bs)] != 1:
            self.counters["wrong_begin_string"] += 1
            self._bad("wrong BeginString", msg.raw)
            if self.state == ACTIVE:
                self._logout(f"BeginString must be {self._bs}", close_now=True)
            else:
                self._close("wrong BeginString")
            return
        seq = msg.seq
        if seq is None:
            self.counters["missing_tag" if not msg.has(34) else "bad_value"] += 1
            self._bad("MsgSeqNum (34) missing or not a number", msg.raw)
            if self.state == ACTIVE:
                self._logout("MsgSeqNum (34) missing or not a number", close_now=True)
            else:
                self._close("MsgSeqNum (34) missing")
            return
        if msg.get_bytes(49) != self._target or msg.get_bytes(56) != self._sender:
            self.counters["wrong_comp_id"] += 1
            if self.state == ACTIVE:
                self._reject(msg, 9, "CompID problem")
                self._logout("CompID problem", close_now=True)
            else:
                self._bad("wrong CompID on Logon", msg.raw)
                self._logout("CompID problem", close_now=True)
            return
        if self.state == WAIT_LOGON:
            if mt != "A":
                self.counters["not_logon_first"] += 1
                self._bad(f"first message is {mt!r}, not a Logon", msg.raw)
                self._close("first message not a Logon")
                return
            self._on_logon(msg, seq)
            return
        if self.state == CLOSED:
            return
        if mt == "A":
            self._reject(msg, 99, "Logon while logged on")
            self.counters["bad_value"] += 1
            if seq == self.inbound:
                self.inbound += 1
                self._save()
            return
        if mt == "4" and msg.get(123) != "Y":
            self._sequence_reset(msg)
            return
        if mt == "2":
            # a counterparty's ResendRequest is answered whatever its own seq
            self._resend_request(msg)
        expected = self.inbound
        if seq > expected:
            if mt == "5":
                self._on_logout(msg)
                return
            self._gap(msg, seq)
            return
        if seq < expected:
            if msg.poss_dup:
                self.counters["possdup_dropped"] += 1
                return
            self.counters["seq_too_low"] += 1
            self._bad(f"MsgSeqNum too low, expecting {expected} but received {seq}", msg.raw)
            self._logout(f"MsgSeqNum too low, expecting {expected} but received {seq}",
                         close_now=True)
            return
        self._process(msg)
        self._drain()

    def _gap(self, msg: FixMessage, seq: int) -> None:
        if len(self._queue) < self.config.max_queue:
            self._queue[seq] = msg
            self.counters["queued"] += 1
        else:
            self.counters["queue_dropped"] += 1
        if self._resend_until < self.inbound:
            # no request outstanding for this gap
            self._send("2", [(7, self.inbound), (16, 0)])
            self.counters["resend_requests_sent"] += 1
            self._resend_until = seq - 1
            log.info("FIX %s: gap %d..%d, ResendRequest sent", self.config.key,
                     self.inbound, seq - 1)

    def _drain(self) -> None:
        q = self._queue
        while q and not self.closing:
            m = q.pop(self.inbound, None)
            if m is None:
                # drop what fell below (duplicates), keep what is still ahead
                for s in [s for s in q if s < self.inbound]:
                    del q[s]
                if q and self._resend_until < self.inbound:
                    # messages past a gap that is not asked for (a queue that overflowed)
                    self._send("2", [(7, self.inbound), (16, 0)])
                    self.counters["resend_requests_sent"] += 1
                    self._resend_until = min(q) - 1
                return
            self._process(m)

    def _process(self, msg: FixMessage) -> None:
        """A message whose seq is the expected one."""
        mt = msg.msg_type
        req = REQUIRED.get(mt)
        if req is not None:
            for tag in req:
                if not msg.has(tag):
                    self.counters["missing_tag"] += 1
                    self.inbound += 1
                    self._reject(msg, 1, f"Required tag missing: {tag}", tag)
                    return
        pd = msg._dict().get(b"43")
        if pd is not None and pd not in (b"Y", b"N"):
            self.counters["bad_value"] += 1
            self.inbound += 1
            self._reject(msg, 5, "Value is incorrect (out of range) for this tag: 43", 43)
            return
        if mt in ADMIN_TYPES:
            self.counters["admin_messages"] += 1
            if mt == "4":
                self._gap_fill(msg)
                return
            self.inbound += 1
            if mt == "0":
                pass
            elif mt == "1":
                self._send("0", [(112, msg.get_bytes(112))])
                self.counters["heartbeats_sent"] += 1
            elif mt == "3":
                self.counters["rejects_in"] += 1
                log.warning("FIX %s: our message %s rejected: %s", self.config.key,
                            msg.get(45), msg.get(58))
            elif mt == "5":
                self.inbound -= 1
                self._on_logout(msg)
                return
            self._save()
            return
        if mt not in self._types:
            known = bool(_KNOWN_APP.match(mt))
            self.counters["unsupported_msg_type" if known else "unknown_msg_type"] += 1
            self.inbound += 1
            self._business_reject(msg, 3, f"Unsupported Message Type {mt!r}")
            return
        self.counters["app_messages"] += 1
        if msg.poss_resend:
            self.counters["poss_resend"] += 1
        self.on_app(self.config, msg)
        self.inbound += 1
        self._save()

    def _on_logon(self, msg: FixMessage, seq: int) -> None:
        cfg = self.config
        hb_raw = msg.get_bytes(108)
        hb = _int(hb_raw)
        if hb is None or not 0 < hb <= 3600:
            self.counters["missing_tag" if hb_raw is None else "bad_value"] += 1
            self._bad("Logon without a valid HeartBtInt (108)", msg.raw)
            self._logout("HeartBtInt (108) missing or invalid", close_now=True)
            return
        if cfg.role == "acceptor" and cfg.password is not None \
                and msg.get(554) != cfg.password:
            self.counters["bad_password"] += 1
            self._bad("wrong Password (554)", msg.raw)
            self._logout("Password (554) not accepted", close_now=True)
            return
        reset = msg.get(141) == "Y"
        if reset:
            self.inbound = 1
            if cfg.role == "acceptor" or not self._logon_sent:
                self.outbound = 1
        elif cfg.role == "acceptor" and cfg.reset_on_logon:
            # we reset: both sides start at 1; the counterparty must too
            self.inbound = 1
            self.outbound = 1
        if cfg.role == "acceptor":
            self.heartbeat_s = float(hb)
        self.state = ACTIVE
        self.counters["logons"] += 1
        log.info("FIX %s: logged on (seq %d, expecting %d)", cfg.key, seq, self.inbound)
        if cfg.role == "acceptor":
            self._send("A", self._logon_body(reset or cfg.reset_on_logon, hb))
        if seq < self.inbound:
            self.counters["seq_too_low"] += 1
            self._logout(f"MsgSeqNum too low, expecting {self.inbound} but received {seq}",
                         close_now=True)
            return
        if seq > self.inbound:
            self._send("2", [(7, self.inbound), (16, 0)])
            self.counters["resend_requests_sent"] += 1
            self._resend_until = seq - 1
            return
        self.inbound += 1
        self._save()

    def _on_logout(self, msg: FixMessage) -> None:
        seq = msg.seq or 0
        if seq == self.inbound:
            self.inbound += 1
            self._save()
        if self.state == LOGOUT_SENT:
            self._close(self.close_reason or "logged out")
        else:
            text = msg.get(58) or ""
            log.info("FIX %s: the counterparty logs out: %s", self.config.key, text)
            self._logout("", close_now=True)
            self.close_reason = f"the counterparty logged out {text}".strip()

    def _resend_request(self, msg: FixMessage) -> None:
        b, e = msg.get_bytes(7), msg.get_bytes(16)
        if b is None or e is None:
            return  # _process rejects it (required tag missing) if it is next in order
        bi, ei = _int(b), _int(e)
        if bi is None or ei is None:
            self.counters["bad_value"] += 1
            return
        begin = max(1, bi)
        if begin >= self.outbound:
            return
        # a drop copy sends no application message: one GapFill covers the range
        self._send("4", [(123, "Y"), (36, self.outbound)], seq=begin, poss_dup=True)
        self.counters["resend_requests_answered"] += 1

    def _gap_fill(self, msg: FixMessage) -> None:
        new = _int(msg.get_bytes(36))
        if new is None:
            self.counters["bad_value"] += 1
            self.inbound += 1
            self._reject(msg, 6, "Incorrect data format for value: 36", 36)
            return
        if new <= self.inbound:
            self.counters["bad_value"] += 1
            self.inbound += 1
            self._reject(msg, 5, f"NewSeqNo {new} would lower the sequence "
                         f"(expecting {self.inbound - 1})", 36)
            return
        self.counters["gap_fills_in"] += 1
        self.inbound = new
        self._save()

    def _sequence_reset(self, msg: FixMessage) -> None:
        """SequenceReset-Reset: its MsgSeqNum is ignored; NewSeqNo is the next expected."""
        v = msg.get_bytes(36)
        new = _int(v)
        if new is None or new < 1:
            self.counters["missing_tag" if v is None else "bad_value"] += 1
            self._reject(msg, 1 if v is None else 6, "NewSeqNo (36) missing or invalid", 36)
            return
        self.counters["seq_resets_in"] += 1
        if new < self.inbound:
            self.counters["bad_value"] += 1
            self._reject(msg, 5, f"NewSeqNo {new} lower than expected {self.inbound}", 36)
            return
        self.inbound = new
        for s in [s for s in self._queue if s < new]:
            del self._queue[s]
        self._save()
        self._drain()
