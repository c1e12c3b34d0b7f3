"""The scheduled roll: the stage that rolls its node once per trading day.

With ``[day] roll_at`` set (:mod:`exposure.core.day`: the trading day, the schedule), the
stage ``roll`` runs where the journal runs (the durable, sleeping process). Every
``check_s`` it reads the node's own record of the last roll (the tally's ``C_ROLL_DATE``:
the date the last dated roll closed, a counter of the state that is journaled, replicated,
snapshotted and recovered with everything else) and the clock; each trading day whose roll
time has passed and that comes after that date is *due* (:func:`exposure.core.day.due`:
oldest first, at most :data:`~exposure.core.day.MAX_CATCH_UP` of them). It sends one
``{"type": "roll", "date": D}`` per due day, in order, through a
:class:`~exposure.net.producer.Producer` to its own node's ingest, on the reserved operator
session :func:`roll_session` (``[ingest] max_sessions - 1``), and after the last
one the events of ``[day] load_after_roll`` (:func:`exposure.core.loads.load_events`; a
file with a bad row is logged and none of it is sent).

**Exactly once.** The roll is an event of the stream, so whether day D is rolled is in the
node's state, not in this stage: a restarted node, or a backup promoted after the roll,
reads D from its own tally and does not roll again; a node that was down over the roll time
rolls when it is back (catch-up). Only an acting primary (a standalone node is one) sends:
a backup never does. Between the send and the tally showing it, the stage never sends
again: it waits for the acknowledgement (the producer resends what the node lacks, and the
node takes each session seq once), and a new attempt first looks in the session table
whether the node already holds the seq it sent. The loads after a roll are exactly once
too: they follow the roll on the same session, so once this stage starts (and after a
failed attempt) it reads the last roll's record from the journal, and when that roll was
its own and the session holds fewer events after it than the files give, it sends the
rest (a node that died between the roll and its loads, or in the middle of them). While
the node has never rolled (no dated
roll in its state) the days before the trading day in progress when the stage first ran on
this data directory are not due: that date is kept in ``DATA_DIR/roll-baseline``.

The blocking parts (the producer's login, its flush) run in a worker thread: :meth:`poll`
only reads the clock and a few words, at most every ``check_s``, and never blocks the
journal beside it. The clock is injectable (``clock``; the node takes
:func:`exposure.core.day.clock_from_env`, which tests point at a file they move).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from exposure.core import day as D
from exposure.core.types import C_ROLL_DATE, C_ROLL_GSEQ
from exposure.node.stages.agent import Stage
from exposure.shm import session_layout as SL
from exposure.shm.control import CTL_ROLE, ROLE_PRIMARY, may_act

__all__ = ["RollScheduler", "roll_session"]

log = logging.getLogger(__name__)

BASELINE = "roll-baseline"


def roll_session(cfg) -> int:
    """The session the scheduled roll logs in as: ``[ingest] max_sessions - 1`` (255 by
    default), kept for it; the operator's commands (``exposure roll``, the loads) default
    to ``max_sessions``, so that the two never share a session's seqs."""
    return max(1, int(cfg.max_sessions) - 1)


class _Refused(Exception):
    """The node acknowledged a roll without applying it (rejected)."""


class RollScheduler(Stage):
    """See the module. ``ctr``: the tally's counters (read); ``sessions``: the session
    table; ``ctl``: the control block; ``clock``: UNIX seconds."""

    name = "roll"

    def __init__(self, cfg, ctr: np.ndarray, sessions: np.ndarray, ctl: np.ndarray,
                 clock: D.Clock = D.system_clock, check_s: float = 0.2,
                 retry_s: float = 5.0, timeout_s: float = 30.0,
                 producer_factory: Callable | None = None) -> None:
        self.cfg, self.ctr, self.sessions, self.ctl = cfg, ctr, sessions, ctl
        self.schedule: D.Schedule = cfg.roll_schedule
        self.clock = clock
        self.check_s, self.retry_s, self.timeout_s = check_s, retry_s, timeout_s
        self.session = roll_session(cfg)
        self._factory = producer_factory or self._producer
        self._next = 0.0
        self._worker: threading.Thread | None = None
        self._result: list = []
        self._sent_date = 0        # the highest date this stage saw acknowledged
        self._unsure: tuple[int, int] | None = None  # (date, seq) sent, not acknowledged
        self._baseline = self._read_baseline()
        self._check_loads = bool(cfg.load_after_roll)  # see the module: loads cut short
        self.rolls = 0             # rolls acknowledged (tests, logs)
        self.failures = 0

    # ------------------------------------------------------------------ the agent
    def poll(self) -> int:
        now = time.monotonic()
        if now < self._next:
            return 0
        self._next = now + self.check_s
        if self._worker is not None:
            if self._worker.is_alive():
                return 0
            self._worker = None
            if self._result and self._result[-1]:  # failed: wait, then again
                self._next = now + self._result[-1]
                return 0
        try:
            t = float(self.clock())
            days = self.due(t)  # (a backup too: its baseline, while nothing has rolled)
        except (ValueError, OverflowError, OSError) as e:  # a clock that says nonsense
            log.warning("scheduled roll: cannot read the clock or the schedule (%s)", e)
            return 0
        acting = self.ctl[CTL_ROLE] == ROLE_PRIMARY and (
            not self.cfg.replicated or may_act(self.ctl, time.monotonic_ns()))
        if not days:
            if self._check_loads and acting:
                self._check_loads = False
                self._result = []
                self._worker = threading.Thread(target=self._run_loads,
                                                name="exposure-roll-loads", daemon=True)
                self._worker.start()
                return 1
            return 0
        if not acting:
            return 0  # only an acting primary rolls
        if self._unsure is not None:
            date, seq = self._unsure
            if (int(self.sessions[self.session, SL.S_HELD]) >= seq
                    and int(self.ctr[C_ROLL_DATE]) < date):
                return 0  # the node holds it: the tally shows it once compute applies it
            self._unsure = None
        self._result = []
        self._worker = threading.Thread(target=self._run, args=(days,),
                                        name="exposure-roll", daemon=True)
        self._worker.start()
        return 1

    def due(self, t: float) -> list[int]:
        """The trading days to roll at time ``t`` (see the module)."""
        last = max(int(self.ctr[C_ROLL_DATE]), self._sent_date)
        if last == 0:
            if self._baseline == 0:
                self._baseline = self._write_baseline(t)
            last = self._baseline
        return D.due(self.schedule, t, last)

    def close(self) -> None:
        w = self._worker
        if w is not None and w.is_alive():
            w.join(1.0)

    # ------------------------------------------------------------------ the baseline
    def _read_baseline(self) -> int:
        try:
            code = int((Path(self.cfg.data_dir) / BASELINE).read_text().strip())
            D.date_of(code)
            return code
        except (OSError, ValueError):
            return 0

    def _write_baseline(self, t: float) -> int:
        """The day before the trading day in progress at ``t``: nothing before it is due
        while the node has never rolled; kept so that a restart does not move it."""
        import datetime as dt

        d = D.date_of(D.trading_day(self.schedule, t)) - dt.timedelta(days=1)
        code = d.year * 10000 + d.month * 100 + d.day
        path = Path(self.cfg.data_dir) / BASELINE
        try:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{code}\n")
            tmp.replace(path)
        except OSError as e:
            log.warning("scheduled roll: cannot keep %s (%s)", path, e)
        log.info("scheduled roll: no roll yet; the first due is the trading day after %s "
                 "(next roll %s)", D.date_text(code),
                 time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(
                     D.next_roll(self.schedule, t))))
        return code

    # ------------------------------------------------------------------ the worker
    def _producer(self):
        from exposure.net.producer import Producer, endpoints_of

        return Producer(self.cfg, self.session, endpoints=endpoints_of(self.cfg)[:1],
                        connect_timeout=10.0, window=1 << 16, send_timeout=self.timeout_s)

    def _run(self, days: list[int]) -> None:
        delay = 0.0
        try:
            self._roll(days)
        except _Refused as e:
            delay = 60.0
            self.failures += 1
            log.error("scheduled roll: %s; trying again in %.0f s", e, delay)
        except Exception as e:  # noqa: BLE001  (logged; the next check tries again)
            delay = self.retry_s
            self.failures += 1
            self._check_loads = bool(self.cfg.load_after_roll)  # (the roll may have gone)
            log.warning("scheduled roll of %s: %s; trying again in %.0f s",
                        ", ".join(map(D.date_text, days)), e, delay)
        self._result.append(delay)

    def loads_pending(self) -> tuple[int, int] | None:
        """(the last roll's session seq, events the session holds after it) when that roll
        was this stage's own; None otherwise (another session's roll, or its record no
        longer in the journal)."""
        from exposure.core.types import EVENT_DTYPE
        from exposure.store.journal import read_record

        g = int(self.ctr[C_ROLL_GSEQ])
        if g == 0:
            return None
        w = read_record(self.cfg.data_dir, g)
        if w is None:
            return None
        rec = w.view(EVENT_DTYPE)[0]
        if int(rec["session"]) != self.session:
            return None
        seq = int(rec["sseq"])
        return seq, max(0, int(self.sessions[self.session, SL.S_HELD]) - seq)

    def _run_loads(self) -> None:
        """Send what the loads after the last roll lack (see the module)."""
        delay = 0.0
        try:
            pend = self.loads_pending()
            if pend is not None:
                seq, held = pend
                events = self._load_events()
                if held < len(events):
                    log.warning("scheduled roll: the node holds %d of the %d load events "
                                "after its roll (session %d, seq %d): sending the rest",
                                held, len(events), self.session, seq)
                    p = self._factory()
                    try:
                        p.send(events[held:])
                        p.flush(self.timeout_s)
                    finally:
                        p.close(self.timeout_s)
        except Exception as e:  # noqa: BLE001  (logged; the next check tries again)
            delay = self.retry_s
            self.failures += 1
            self._check_loads = True
            log.warning("scheduled roll: the loads after the roll: %s; trying again in "
                        "%.0f s", e, delay)
        self._result.append(delay)

    def _roll(self, days: list[int]) -> None:
        p = self._factory()
        try:
            for date in days:
                seq = p.send({"type": "roll", "date": date})
                self._unsure = (date, seq)
                p.flush(self.timeout_s)
                self._unsure = None
                if int(self.ctr[C_ROLL_DATE]) < date:  # acknowledged, not applied
                    raise _Refused(f"the node rejected the roll of {D.date_text(date)} "
                                   f"(session {self.session}: is it entitled to roll?)")
                self._sent_date = max(self._sent_date, date)
                self.rolls += 1
                log.info("scheduled roll: trading day %s closed (gseq %d)",
                         D.date_text(date), int(self.ctr[C_ROLL_GSEQ]))
            self._loads(p)
            p.close(self.timeout_s)
        except BaseException:
            try:
                p.close(0.5)
            except Exception:  # noqa: BLE001  (the first error is the one to report)
                pass
            raise

    def _load_events(self, log_each: bool = False) -> list[dict]:
        """The events of ``[day] load_after_roll``, file after file (each all or nothing:
        a file with a bad row is logged and left out)."""
        from exposure.core.loads import LoadError, load_events

        out: list[dict] = []
        for path in self.cfg.load_after_roll:
            try:
                events = load_events(path, names=self.cfg.names, caps=self.cfg.caps,
                                     currencies=self.cfg.currencies)
            except (LoadError, OSError, ValueError) as e:
                log.error("scheduled roll: %s not loaded: %s", path, e)
                continue
            if log_each:
                log.info("scheduled roll: %s: %d events to load", path, len(events))
            out.extend(events)
        return out

    def _loads(self, p) -> None:
        """``[day] load_after_roll``, right after the roll on the same session."""
        events = self._load_events(log_each=True)
        if events:
            p.send(events)
            p.flush(self.timeout_s)
        log.info("scheduled roll: %d load events sent", len(events))
