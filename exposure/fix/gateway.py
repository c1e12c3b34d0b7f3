"""The FIX drop-copy gateway: FIX sessions in (:mod:`exposure.fix.server`), one exposure
session out (:class:`exposure.net.producer.Producer`), exactly once (docs/fix.md).

Every application message the session layer passes up is appended to the inbound journal
(:mod:`exposure.fix.journal`) and mapped at once by its session's Mapper
(:mod:`exposure.fix.mapping`); the events it yields wait until the journal record that
produced them is durable (a group commit on the committer thread), and only then go to
the producer. So the k-th event produced since the journal began always gets exposure seq
``base + k``: the seqs are a function of the journal. A restarted gateway rebuilds every
Mapper by replaying its journal from a checkpoint, sends the events above what the node
holds (the node holds every seq it acknowledged, across a pair's failover) and asks each
counterparty for the FIX seqs after the last journaled one (the SeqStore's inbound seqs
*are* the journal's).

Everything the mapping depends on is in the journal, so a replay is deterministic: the
reference data (``D`` records, when the CSV files changed at a start or a redeliver), each
FIX session's source and BeginString (``S``), the messages (``M``) and the redeliver
requests (``R``).

:class:`GatewayState` is that deterministic part (no I/O: a new dead letter goes to its
``on_dead``); :class:`Gateway` the process around it, which keeps the dead-letter file
(:mod:`exposure.fix.deadletter`) equal to the dead letters pending.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pickle
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from exposure.core.log import RateLog
from exposure.fix.config import GatewayConfig, session_key
from exposure.fix.deadletter import (
    DeadLetter,
    DeadLetterFile,
    DeadLetterFull,
    read_dead_letters,
    redeliver,
    rewrite,
    utc_now,
)
from exposure.fix.journal import (
    K_HEADER,
    K_MESSAGE,
    K_REDELIVER,
    K_REFDATA,
    K_SEQ,
    K_SESSION,
    Journal,
    JournalError,
    Record,
    decode_refdata,
    encode_refdata,
)

__all__ = ["Gateway", "GatewayError", "GatewayState", "JournalSeqStore", "session_name",
           "currencies_bytes"]

log = logging.getLogger(__name__)
_ratelog = RateLog(log)

_STATE_VERSION = 1


class GatewayError(RuntimeError):
    """The gateway cannot start or go on (the message says why)."""


def session_name(scfg) -> str:
    """A FIX session's name in the journal: its key, BEGIN:SENDER->TARGET (the SeqStore's)."""
    return session_key(scfg)


def currencies_bytes(ccy) -> bytes:
    """A ``[currencies]`` table as journaled with the reference data (b"": the default)."""
    from exposure.core.currency import Currencies

    if ccy == Currencies():
        return b""
    return orjson.dumps({"base": ccy.base, "ids": dict(ccy.ids)})


def _refdata_from_bytes(instruments: bytes, accounts: bytes, caps=None,
                        currencies: bytes = b""):
    """A RefData of the two CSV files' bytes and the currencies table's (as journaled:
    the codes of the currency column mean what they meant when the files were taken)."""
    from exposure.core.currency import Currencies, CurrencyError
    from exposure.core.refdata import RefDataError, load_refdata

    try:
        ccy = Currencies.from_table(**orjson.loads(currencies)) if currencies else None
    except (CurrencyError, orjson.JSONDecodeError, TypeError) as e:
        raise RefDataError(f"the journaled [currencies] table: {e}") from None
    with tempfile.TemporaryDirectory(prefix="exposure-fix-ref-") as d:
        ip, ap = Path(d, "instruments.csv"), Path(d, "accounts.csv")
        ip.write_bytes(instruments)
        ap.write_bytes(accounts)
        return load_refdata(ip, ap, caps, currencies=ccy)


class GatewayState:
    """The journal's meaning: apply records in order, get the events each produces.

    ``on_dead(letter)`` is called for every message that goes to the dead letters (on a
    replay too: the gateway sets it once its recovery is done). ``dead``: the letters
    pending redeliver, by journal index (at most ``dead_limit``; more are counted,
    ``dead_dropped``).
    """

    def __init__(self, *, caps=None, dead_limit: int = 1_000_000,
                 on_dead: Callable[[DeadLetter], None] | None = None):
        self.caps = caps
        self.dead_limit = dead_limit
        self.on_dead = on_dead
        self.base = 0                 # the exposure seq the session held when it began
        self.events = 0               # events produced since
        self.index = 0                # the next record's index
        self.inbound: dict[str, int] = {}      # FIX session -> last inbound seq taken
        self.params: dict[str, dict] = {}      # FIX session -> mapping parameters
        # instruments.csv, accounts.csv and the [currencies] table (b"": the default)
        self.refdata_bytes: tuple[bytes, bytes, bytes] = (b"", b"", b"")
        self.dead: dict[int, DeadLetter] = {}  # pending, by journal index
        self.counters: dict[str, Any] = {
            "messages": 0, "events": 0, "dead_letters": 0, "redelivered": 0,
            "dead_dropped": 0, "counted": {}, "dead_reasons": {}}
        self._refdata = None
        self._mappers: dict[str, Any] = {}

    @property
    def seq(self) -> int:
        """The exposure seq of the last event produced."""
        return self.base + self.events

    # -- state <-> checkpoint ------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"version": _STATE_VERSION, "base": self.base, "events": self.events,
                "index": self.index, "inbound": dict(self.inbound),
                "params": {k: dict(v) for k, v in self.params.items()},
                "refdata": self.refdata_bytes,
                "dead": {i: (d.session, d.seq, d.raw, d.reason, d.kind, d.time)
                         for i, d in self.dead.items()},
                "counters": orjson.loads(orjson.dumps(self.counters)),
                "mappers": {k: m.snapshot() for k, m in self._mappers.items()}}

    def restore(self, snap: dict) -> None:
        if snap.get("version") != _STATE_VERSION:
            raise GatewayError(f"a checkpoint of version {snap.get('version')}, this "
                               f"gateway reads {_STATE_VERSION}")
        self.base, self.events, self.index = snap["base"], snap["events"], snap["index"]
        self.inbound = dict(snap["inbound"])
        self.params = {k: dict(v) for k, v in snap["params"].items()}
        self.refdata_bytes = (*tuple(snap["refdata"]), b"")[:3]  # (a 2-tuple before 29)
        self.dead = {i: DeadLetter(t[5] if len(t) > 5 else "", t[0], t[1], t[3], t[2],
                                   t[4] if len(t) > 4 else "", i)
                     for i, t in snap["dead"].items()}  # (version 1 had 4-tuples)
        self.counters = snap["counters"]
        self._refdata = None
        self._mappers = {}
        from exposure.fix.mapping import Mapper

        for name, ms in snap["mappers"].items():
            self._mappers[name] = Mapper.restore(
                self.refdata(), ms, begin_string=self.params[name]["begin_string"])

    # -- mapping -------------------------------------------------------------------------

    def refdata(self):
        if self._refdata is None:
            self._refdata = _refdata_from_bytes(*self.refdata_bytes[:2], self.caps,
                                                self.refdata_bytes[2])
        return self._refdata

    def _mapper(self, name: str):
        m = self._mappers.get(name)
        if m is None:
            from exposure.fix.mapping import Mapper

            p = self.params.get(name)
            if p is None:
                raise GatewayError(f"the journal has messages of FIX session {name!r} "
                                   "before its parameters (a damaged journal)")
            m = Mapper(self.refdata(), source=p["source"], order_key=p["order_key"],
                       begin_string=p["begin_string"])
            self._mappers[name] = m
        return m

    def apply(self, rec: Record) -> list[dict]:
        """Apply one record (the next index); returns the events it produced."""
        if rec.index != self.index:
            raise GatewayError(f"journal record {rec.index} applied where {self.index} "
                               "was due")
        self.index += 1
        k = rec.kind
        if k == K_MESSAGE:
            self.inbound[rec.session] = rec.seq
            self.counters["messages"] += 1
            return self._map(rec.index, rec.session, rec.seq, rec.body, first=True)
        if k == K_SEQ:
            self.inbound[rec.session] = rec.seq
            return []
        if k == K_REDELIVER:
            return self._redeliver()
        if k == K_REFDATA:
            self.refdata_bytes = decode_refdata(rec.body)
            self._refdata = None
            from exposure.fix.mapping import Mapper

            for n, m in list(self._mappers.items()):  # the same state over the new names
                self._mappers[n] = Mapper.restore(
                    self.refdata(), m.snapshot(), begin_string=self.params[n]["begin_string"])
            return []
        if k == K_SESSION:
            p = orjson.loads(rec.body)
            if self.params.get(rec.session) != p:  # (a new source or order key: the
                self.params[rec.session] = p         # session's mapping starts afresh)
                self._mappers.pop(rec.session, None)
            return []
        if k == K_HEADER:
            self.base = rec.seq
            return []
        raise GatewayError(f"journal record {rec.index}: unknown kind {k!r}")

    def apply_messages(self, index: int, session: str, run, i: int, j: int, seqs
                       ) -> np.ndarray | None:
        """Apply ``M`` records ``index..`` holding messages ``i..j`` of a FixRun (with
        MsgSeqNums ``seqs[i:j]``): the same state and events as :meth:`apply` of each
        (:meth:`exposure.fix.mapping.Mapper.map_batch`; the messages it does not take go
        through :meth:`_map`). Returns the events as EVENT_DTYPE records, or None."""
        if index != self.index:
            raise GatewayError(f"journal record {index} applied where {self.index} was due")
        mapper = self._mapper(session)

        def one(m: int) -> list[dict]:
            self.index = index + (m - i) + 1
            self.inbound[session] = int(seqs[m])
            return self._map(index + (m - i), session, int(seqs[m]), run.raw(m), first=True)

        self.counters["messages"] += j - i
        ev0 = self.events
        evs, _ = mapper.map_batch(run, i, j, fallback=one)
        self.index = index + (j - i)
        self.inbound[session] = int(seqs[j - 1])
        if evs is not None:
            fast = len(evs) - (self.events - ev0)   # (_map counted the others' events)
            self.events += fast
            self.counters["events"] += fast
        return evs

    def _map(self, index: int, session: str, seq: int, raw: bytes, first: bool) -> list[dict]:
        from exposure.fix.codec import FixMessage

        res = self._mapper(session).map(FixMessage(raw))
        c = self.counters
        if res.counted:
            c["counted"][res.counted] = c["counted"].get(res.counted, 0) + 1
        if res.dead:
            kind = res.dead_kind or "other"
            c["dead_letters"] += 1
            c["dead_reasons"][kind] = c["dead_reasons"].get(kind, 0) + 1
            if len(self.dead) < self.dead_limit:
                letter = DeadLetter(utc_now(), session, seq, res.dead, raw, kind, index)
                self.dead[index] = letter
                if self.on_dead is not None:
                    self.on_dead(letter)
            else:
                c["dead_dropped"] += 1
                _dropped_log(index, session, seq, res.dead)
            return []
        if res.events:
            self.events += len(res.events)
            c["events"] += len(res.events)
        return list(res.events)

    def _redeliver(self) -> list[dict]:
        """Map the pending dead letters again, in the order they arrived
        (:func:`exposure.fix.deadletter.redeliver`, each through its session's Mapper and
        the codec's FixMessage, as at first)."""
        from exposure.fix.codec import FixMessage

        out = redeliver(self._mapper, [self.dead[i] for i in sorted(self.dead)],
                        fields=FixMessage)
        self.dead = {d.index: d for d in out.dead}  # type: ignore[misc]
        c = self.counters
        for k, n in out.counted.items():
            c["counted"][k] = c["counted"].get(k, 0) + n
        c["redelivered"] += len(out.passed)
        self.events += len(out.events)
        c["events"] += len(out.events)
        return out.events


def _dropped_log(index: int, session: str, seq: int, reason: str) -> None:
    _ratelog("dead_dropped", f"dead letters at their bound: journal record {index} "
             f"({session} seq {seq}: {reason}) is counted, not held for redeliver (it "
             "stays in the journal)", logging.ERROR)


class JournalSeqStore:
    """The session layer's SeqStore (:class:`exposure.fix.session.SeqStore`) over the
    gateway: the next inbound seq of a FIX session is the journal's (one after the last
    application message journaled, or the seq a session-level message moved it to, which is
    journaled as an ``N`` record), so it is durable exactly when the messages before it are.
    The outbound seqs live in a small file, written and synced on :meth:`flush` when they
    changed."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.path = gw.cfg.seqs_file
        try:
            data = orjson.loads(self.path.read_bytes())
            self._out: dict[str, int] = {str(k): int(v) for k, v in data.items()}
        except (OSError, orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            self._out = {}
        self._dirty = False
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[int, int]:
        return self.gw.state.inbound.get(key, 0) + 1, self._out.get(key, 1)

    def set(self, key: str, inbound: int, outbound: int) -> None:
        self.gw.inbound_seq(key, inbound - 1)
        with self._lock:
            if self._out.get(key) != outbound:
                self._out[key] = outbound
                self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            data = orjson.dumps(self._out)
            self._dirty = False
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class Gateway:
    """The gateway process's parts. ``start()`` locks the data directory, connects the
    producer, recovers from the journal, starts the committer and the FIX engine;
    ``stop()`` undoes it. ``say`` gets the lines for the operator."""

    def __init__(self, cfg: GatewayConfig, say: Callable[[str], None] = log.info):
        self.cfg = cfg
        self.say = say
        self.node_cfg = cfg.node_config()
        self.state = GatewayState(caps=self.node_cfg.caps, dead_limit=cfg.limits.dead_letters)
        self.journal: Journal | None = None
        self.producer = None
        self.engine = None
        self.control = None
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._out: list[dict] = []        # events of records not yet durable
        self._ck_due: tuple[int, bytes, int] | None = None
        self._ck_seq: dict[int, int] = {}  # checkpoint index -> its exposure seq
        self._last_ck = 0
        self._lockfd = -1
        self._stop = False
        self._stopped = threading.Event()  # (set with _stop: what housekeeping waits on)
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._dead: DeadLetterFile | None = None
        self.dead_file_errors = 0
        self.node_rejects: dict[str, int] = {}
        self.started = time.time()
        self.sends = 0

    # -- start ---------------------------------------------------------------------------

    def _lock_dir(self) -> None:
        d = self.cfg.data_dir
        d.mkdir(parents=True, exist_ok=True)
        self._lockfd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lockfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self._lockfd, 32, 0).decode(errors="replace").strip()
            os.close(self._lockfd)
            self._lockfd = -1
            raise GatewayError(f"{d} is in use by another gateway (pid {pid or '?'})") \
                from None
        os.ftruncate(self._lockfd, 0)
        os.pwrite(self._lockfd, f"{os.getpid()}\n".encode(), 0)

    def open_producer(self):
        from exposure.net.producer import Producer

        return Producer(self.node_cfg, self.cfg.session, secret_file=self.cfg.secret_file,
                        spool=self.cfg.spool, window=self.cfg.limits.window,
                        connect_timeout=self.cfg.connect_timeout,
                        on_result=self._on_result, frame=1024)

    def start(self) -> None:
        self._lock_dir()
        self.journal = Journal.open(self.cfg.journal_dir, self.cfg.limits.segment_bytes,
                                    self.cfg.limits.prewrite_bytes)
        self.producer = self.open_producer()
        self._recover()
        self._sync_dead_file()
        self.state.on_dead = self._write_dead
        self._adopt_config()
        self.journal.sync()
        self._spawn(self._committer, "fix-commit")
        self._spawn(self._housekeeping, "fix-status")
        from exposure.fix.control import ControlServer

        self.control = ControlServer(self.cfg.control_socket, {
            "status": self.status, "redeliver": self.redeliver})
        self._start_engine()

    def ready_line(self) -> str:
        where = []
        for s in self.cfg.fix:
            where.append(f"{s.key} " + (f"on {s.listen}" if s.role == "acceptor"
                                        else f"to {s.connect}"))
        return (f"ready: {len(self.cfg.fix)} FIX session(s) ({'; '.join(where)}) into "
                f"session {self.cfg.session} of node {self.node_cfg.name} "
                f"(exposure seq {self.state.seq})")

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=self._guard, args=(fn,), name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # the gateway stops: systemd restarts it
            log.exception("%s failed", threading.current_thread().name)
            self._error = e
            with self._cond:
                self._stop = True
                self._stopped.set()
                self._cond.notify_all()

    def _recover(self) -> None:
        """Rebuild the state from the newest usable checkpoint and the journal after it;
        send the events above what the node holds."""
        j, st = self.journal, self.state
        held = int(self.producer.sent)
        start = None
        for ck in sorted(j.checkpoints, reverse=True):
            try:
                snap = pickle.loads(j.read_checkpoint(ck))
            except (JournalError, pickle.UnpicklingError, EOFError) as e:
                log.warning("checkpoint %d unusable (%s); trying an older one", ck, e)
                continue
            seq = snap["base"] + snap["events"]
            self._ck_seq[ck] = seq
            if start is None and seq <= held and (
                    not j.segments or j.segments[0].first <= ck):
                st.restore(snap)
                start = ck
        if start is None:
            if j.segments and j.segments[0].first > 0:
                raise GatewayError(
                    f"the node holds seq {held} of session {self.cfg.session}, less than "
                    f"every checkpoint of the gateway's journal {j.dir} (whose oldest "
                    f"segment begins at record {j.segments[0].first}): a node that lost "
                    "what it acknowledged, or another node; a new day on a new node "
                    "needs a new journal (move the data directory away)")
            start = 0
        self._last_ck = start
        replayed = 0
        batch: list[dict] = []
        for rec in j.records(start):
            evs = st.apply(rec)
            replayed += 1
            if evs:
                first = st.seq - len(evs) + 1
                if st.seq > held:
                    batch += evs[max(0, held + 1 - first):]
                if len(batch) >= 4096:
                    self._send(batch)
                    batch = []
        if not j.segments:  # a new journal: its header says where the session began
            j.append(K_HEADER, "", held)
            st.apply(Record(st.index, K_HEADER, "", held, b""))
        if held > st.seq:
            raise GatewayError(
                f"the node holds seq {held} of session {self.cfg.session}, but the "
                f"gateway's journal produced only {st.seq}: another client sends as this "
                "session, or the journal was lost")
        if batch:
            self._send(batch)
        self.say(f"recovered {replayed} journal records from record {start}: "
                 f"{st.counters['messages']} messages, exposure seq {st.seq} (the node "
                 f"held {held}), {len(st.dead)} dead letters pending")

    # -- the dead-letter file: the letters pending, each with its journal index ---------

    def _open_dead_file(self) -> None:
        self._dead = DeadLetterFile(self.cfg.dead_letter_file,
                                    max_letters=self.cfg.limits.dead_letters, fsync=False)

    def _sync_dead_file(self) -> None:
        """After a recovery: make the dead-letter file hold exactly the letters pending
        (by journal index; the times already on file kept), then open it for appends. A
        crash between a redeliver's rewrite and its journal record, or a file of an older
        gateway, is put right here."""
        path = self.cfg.dead_letter_file
        letters, bad = read_dead_letters(path)
        pending = self.state.dead
        if bad or [d.index for d in letters] != sorted(pending):
            times = {d.index: d.time for d in letters if d.index in pending}
            for i, d in pending.items():
                if i in times:
                    pending[i] = DeadLetter(times[i], d.session, d.seq, d.reason, d.raw,
                                            d.kind, i)
            rewrite(path, [pending[i] for i in sorted(pending)])
            log.info("dead letters %s rewritten: %d pending (the file had %d, %d "
                     "unreadable lines)", path, len(pending), len(letters), bad)
        self._open_dead_file()

    def _write_dead(self, letter: DeadLetter) -> None:
        """``GatewayState.on_dead``: append a new letter (not synced: the journal holds
        the message, and a restart rewrites the file from it). A full or failing file is
        counted and logged, never an error of the FIX session."""
        if self._dead is None:
            return
        try:
            self._dead.write(letter)
        except DeadLetterFull:
            self.dead_file_errors += 1
        except OSError as e:
            self.dead_file_errors += 1
            log.error("dead letters %s: cannot write journal record %s: %s",
                      self._dead.path, letter.index, e)

    def _rewrite_dead(self) -> None:
        """After a redeliver: the file holds the letters still pending."""
        if self._dead is not None:
            self._dead.close()
        rewrite(self.cfg.dead_letter_file,
                [self.state.dead[i] for i in sorted(self.state.dead)])
        self._open_dead_file()

    def _send(self, events: list) -> None:
        """Pass events on; their seqs must be the journal's. ``events``: dicts, and
        EVENT_DTYPE arrays of the batch path among them."""
        if any(isinstance(e, np.ndarray) for e in events):
            part: list[dict] = []
            for e in events:
                if isinstance(e, np.ndarray):
                    if part:
                        self._send(part)
                        part = []
                    self._send_one_kind(e)
                else:
                    part.append(e)
            if part:
                self._send_one_kind(part)
            return
        self._send_one_kind(events)

    def _send_one_kind(self, events: list | np.ndarray) -> None:
        """Dicts or one EVENT_DTYPE array to the producer, checking the seqs it gives."""
        want = int(self.producer.sent) + len(events)
        got = self.producer.send(events)
        self.sends += 1
        if got != want:
            raise GatewayError(f"the producer numbered events up to {got}, the journal "
                               f"says {want}")

    def _append_apply(self, kind: bytes, session: str, seq: int, body: bytes) -> list[dict]:
        """Journal one record and apply it (under the lock); its events wait for the
        commit."""
        idx = self.journal.append(kind, session, seq, body)
        evs = self.state.apply(Record(idx, kind, session, seq, body))
        if evs:
            self._out += evs
        if idx + 1 - self._last_ck >= self.cfg.limits.checkpoint_every and \
                self._ck_due is None:
            self._ck_due = (idx + 1, pickle.dumps(self.state.snapshot(), protocol=5),
                            self.state.seq)
            self._last_ck = idx + 1
        return evs

    def _adopt_config(self) -> None:
        """Journal what changed in the config since the journal's state: each FIX
        session's mapping parameters and the reference data."""
        with self._lock:
            for scfg in self.cfg.fix:
                name = session_name(scfg)
                p = {"source": int(scfg.source), "order_key": self.cfg.order_key,
                     "begin_string": str(scfg.begin_string)}
                if self.state.params.get(name) != p:
                    self._append_apply(K_SESSION, name, 0, orjson.dumps(p))
            self._adopt_refdata()

    def _adopt_refdata(self) -> bool:
        """Journal the CSV files and the node's ``[currencies]`` if they differ from the ones
        in force (checked first: a broken file is an error and nothing changes). Under the
        lock."""
        from exposure.core.refdata import RefDataError

        try:
            ib, ab = self.cfg.instruments.read_bytes(), self.cfg.accounts.read_bytes()
        except OSError as e:
            raise GatewayError(f"cannot read the reference data: {e}") from e
        cb = currencies_bytes(self.node_cfg.currencies)
        if (ib, ab, cb) == self.state.refdata_bytes:
            return False
        try:
            _refdata_from_bytes(ib, ab, self.node_cfg.caps, cb)
        except RefDataError as e:
            raise GatewayError(f"{e} ([gateway] instruments = {str(self.cfg.instruments)!r}"
                               f", accounts = {str(self.cfg.accounts)!r})") from e
        self._append_apply(K_REFDATA, "", 0, encode_refdata(ib, ab, cb))
        return True

    def _start_engine(self) -> None:
        from exposure.fix.server import FixEngine

        self.seqstore = JournalSeqStore(self)
        lim = self.cfg.limits
        self.engine = FixEngine(list(self.cfg.fix), self.on_app, self.seqstore,
                                max_connections=lim.max_connections,
                                max_message=lim.max_message, on_batch=self._on_batch,
                                on_app_batch=None if os.environ.get("EXPOSURE_FIX_BATCH")
                                == "0" else self.on_app_batch)  # (0: for benchmarks)
        self.engine.start()
        if not self.engine.ready.wait(30):
            raise GatewayError("the FIX engine did not start within 30 s")

    # -- the hot path --------------------------------------------------------------------

    def on_app(self, scfg, msg) -> None:
        """An application message from the session layer: journal it, map it. Returns once
        it is journaled (durable by the next group commit; its events go out then); waits
        while too many messages are not yet durable."""
        name = session_name(scfg)
        seq = msg.seq or 0
        with self._cond:
            while self.journal.next_index - self.journal.durable_index >= \
                    self.cfg.limits.pending_messages and not self._stop:
                self._cond.wait(0.1)
            if self._error is not None:
                raise GatewayError(f"the gateway is stopping: {self._error}")
            self._append_apply(K_MESSAGE, name, seq, msg.raw)

    def on_app_batch(self, scfg, run, i: int, j: int) -> None:
        """Messages ``i..j`` of a FixRun, in-order ExecutionReports the session layer
        passes on at once: journaled in one piece (:func:`exposure.fix.fast.journal_records`)
        and mapped in one call (:meth:`GatewayState.apply_messages`); the same records,
        state and events as :meth:`on_app` of each."""
        from exposure.fix.fast import journal_records

        name = session_name(scfg)
        seqs = run.seqs
        with self._cond:
            while self.journal.next_index - self.journal.durable_index >= \
                    self.cfg.limits.pending_messages and not self._stop:
                self._cond.wait(0.1)
            if self._error is not None:
                raise GatewayError(f"the gateway is stopping: {self._error}")
            idx = self.journal.append_encoded(
                journal_records(run, i, j, seqs, K_MESSAGE, name), j - i)
            evs = self.state.apply_messages(idx, name, run, i, j, seqs)
            if evs is not None:
                self._out.append(evs)
            end = idx + (j - i)
            if end - self._last_ck >= self.cfg.limits.checkpoint_every and \
                    self._ck_due is None:
                self._ck_due = (end, pickle.dumps(self.state.snapshot(), protocol=5),
                                self.state.seq)
                self._last_ck = end

    def _on_batch(self) -> None:
        """The engine's round of reads ended: the committer makes it durable."""
        with self._cond:
            self._cond.notify_all()

    def inbound_seq(self, name: str, seq: int) -> None:
        """The session layer took inbound seq ``seq`` of ``name`` (a session-level message,
        a GapFill, a reset): journaled where it differs from the journal's."""
        if self.state.inbound.get(name) == seq:  # (an application message's: journaled)
            return
        with self._cond:
            if self.state.inbound.get(name) != seq:
                self._append_apply(K_SEQ, name, seq, b"")
                self._cond.notify_all()

    def _committer(self) -> None:
        j = self.journal
        while True:
            with self._cond:
                while not j.buffered and not self._stop:
                    self._cond.wait(0.05)
                if self._stop and not j.buffered:
                    return
                batch, self._out = self._out, []
                ck, self._ck_due = self._ck_due, None
            j.sync()
            with self._cond:
                self._cond.notify_all()
            if batch:
                self._send(batch)
            if ck is not None:
                idx, data, seq = ck
                j.write_checkpoint(idx, data)
                self._ck_seq[idx] = seq

    def _trim(self) -> None:
        acked = int(self.producer.acked)
        safe = max((i for i, s in self._ck_seq.items() if s <= acked), default=None)
        if safe is not None and self.journal is not None:
            n = self.journal.trim(safe)
            for i in [i for i in self._ck_seq if i < safe]:
                del self._ck_seq[i]
            if n:
                log.info("journal trimmed below record %d (%d files)", safe, n)

    def _housekeeping(self) -> None:
        from exposure.fix.control import write_status

        while not self._stop:
            self._trim()
            with contextlib.suppress(OSError):
                write_status(self.cfg.status_file, self.status())
            # (not the lock's condition: that wakes at every round of FIX reads)
            self._stopped.wait(1.0)

    def _on_result(self, ack) -> None:
        for _, reason in ack.rejected:
            self.node_rejects[reason] = self.node_rejects.get(reason, 0) + 1

    # -- redeliver, status ---------------------------------------------------------------

    def redeliver(self) -> dict:
        """Re-read the CSV files and pass the dead letters on again (journaled: exactly
        once). Returns the counts."""
        with self._cond:
            before = len(self.state.dead)
            changed = self._adopt_refdata()
            ev0 = self.state.events
            self._append_apply(K_REDELIVER, "", 0, b"")
            self._rewrite_dead()
            self._cond.notify_all()
            return {"dead_letters_before": before, "passed_on": before - len(self.state.dead),
                    "still_dead": len(self.state.dead), "events": self.state.events - ev0,
                    "refdata_changed": changed}

    def status(self) -> dict:
        st = self.state
        c = st.counters
        eng = {}
        if self.engine is not None:
            with contextlib.suppress(Exception):
                eng = dict(self.engine.counters())
        p = self.producer
        return {
            "gateway": self.cfg.name, "pid": os.getpid(), "started": self.started,
            "session": self.cfg.session, "messages": c["messages"], "events": c["events"],
            "dead_letters": c["dead_letters"], "dead_pending": len(st.dead),
            "dead_reasons": dict(c["dead_reasons"]), "redelivered": c["redelivered"],
            "dead_dropped": c["dead_dropped"], "dead_file_errors": self.dead_file_errors,
            "not_mapped": dict(c["counted"]), "seq": st.seq,
            "acked": int(p.acked) if p is not None else 0,
            "node_rejects": dict(self.node_rejects),
            "inbound": dict(st.inbound),
            "journal": {"records": self.journal.next_index if self.journal else 0,
                        "durable": self.journal.durable_index if self.journal else 0,
                        "bytes": self.journal.disk_bytes() if self.journal else 0,
                        "segments": len(self.journal.segments) if self.journal else 0,
                        "checkpoints": sorted(self._ck_seq)},
            "fix": eng,
        }

    # -- the gateway stopped -------------------------------------------------------------

    @classmethod
    def redeliver_offline(cls, cfg: GatewayConfig, say: Callable[[str], None] = log.info
                          ) -> dict:
        """``exposure fix redeliver`` while no gateway runs: replay the journal (nothing is
        sent), journal the CSV files and a redeliver request, and say what the next start
        will pass on (it sends those events then, exactly once, as any journaled ones)."""
        gw = cls(cfg, say)
        gw._lock_dir()
        try:
            gw.journal = j = Journal.open(cfg.journal_dir, cfg.limits.segment_bytes,
                                              cfg.limits.prewrite_bytes)
            start = 0
            for ck in sorted(j.checkpoints, reverse=True):
                if not j.segments or j.segments[0].first <= ck:
                    gw.state.restore(pickle.loads(j.read_checkpoint(ck)))
                    start = ck
                    break
            if not j.segments and not j.checkpoints:
                raise GatewayError(f"{j.dir}: an empty journal (the gateway never ran): "
                                   "nothing to redeliver")
            for rec in j.records(start):
                gw.state.apply(rec)
            gw._last_ck = gw.state.index
            res = gw.redeliver()
            j.sync()
            res["sent_at_next_start"] = True
            return res
        finally:
            if gw._dead is not None:  # (opened by the redeliver's rewrite)
                gw._dead.close()
            if gw.journal is not None:
                gw.journal.close()
            if gw._lockfd >= 0:
                os.close(gw._lockfd)

    # -- stop ----------------------------------------------------------------------------

    def wait(self, stop: list) -> str:
        """Run until ``stop`` is non-empty (a signal) or a part fails; returns why."""
        while not stop:
            if self._error is not None:
                raise GatewayError(f"the gateway failed: {self._error}")
            if self.engine is not None and self.engine.error is not None:
                raise GatewayError(f"the FIX engine failed: {self.engine.error}")
            err = getattr(self.producer, "_error", None)
            if err is not None:
                raise GatewayError(f"the producer failed: {err}")
            time.sleep(0.1)
        return "stopped by a signal"

    def stop(self) -> None:
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.stop()
        with self._cond:
            self._stop = True
            self._stopped.set()
            self._cond.notify_all()
        for t in self._threads:
            t.join(10)
        if self.control is not None:
            self.control.close()
        if self.journal is not None:
            with contextlib.suppress(OSError):
                self.journal.sync()
            if self._out and self.producer is not None and self._error is None:
                with contextlib.suppress(Exception):
                    self._send(self._out)
                self._out = []
            self.journal.close()
        if self.producer is not None:
            with contextlib.suppress(Exception):
                self.producer.close(timeout=10)
        with contextlib.suppress(OSError):
            from exposure.fix.control import write_status

            write_status(self.cfg.status_file, self.status())
        if self._dead is not None:
            self._dead.close()
        if self._lockfd >= 0:
            os.close(self._lockfd)
            self._lockfd = -1
