"""``exposure roll``: one roll through an operator session, then the closing day's fund line.

The roll (SPEC section 6, dated with the trading day it closes: ``--date``, else the
trading day in progress by the node's ``[day]`` schedule, else undated) goes to the node
through a :class:`~exposure.net.producer.Producer` on ``--session`` (which needs the
``roll`` entitlement where the node has a sessions file). Once it is acknowledged, the
roll's gseq is found in the node's journal (the record of that session and seq), and the
fund line printed is the document **as of the event before the roll**, exactly: the node's
newest snapshot at or before that gseq, plus the journal replayed up to it (the same kernel:
what ``exposure replay --journal DIR --upto GSEQ-1`` prints). Reading the desk before or
after the send would not be exact while other sessions stream. So the command runs where
the node's data directory is (as ``exposure dump`` runs where its tally segment is).

In a cluster (``--cluster FILE``) every partition gets the roll (one session per
partition, all at once: SPEC section 6, a roll goes to every partition and counts once),
and the fund line is composed from each partition's document before its roll
(:func:`exposure.cluster.topology.compose`).
"""

from __future__ import annotations

import threading

import numpy as np

from exposure.core import day as D
from exposure.core.types import C_LAST_GSEQ, C_ROLL_DATE, T_ROLL

__all__ = ["RollError", "roll_date", "last_roll", "state_at", "roll_node", "roll_cluster",
           "fund_line", "describe"]

FUND_KEYS = ("gross", "net", "pnl", "live_orders")


class RollError(RuntimeError):
    """The roll could not be sent, acknowledged or found (the message says which)."""


def roll_date(cfg, date: str | None, now: float | None = None) -> int:
    """The date the roll closes (YYYYMMDD, 0 = undated): ``date`` ("YYYY-MM-DD"), else the
    trading day in progress by ``cfg``'s schedule, else 0. ValueError for a bad ``date``."""
    if date is not None:
        return D.date_code(date)
    if cfg.roll_schedule is not None:
        return D.trading_day(cfg.roll_schedule, D.clock_from_env()() if now is None else now)
    return 0


def last_roll(cfg) -> tuple[int, int]:
    """(the last roll's date, the last gseq) of the node running here; (0, 0) when no node
    of ``cfg`` runs on this host."""
    from exposure.shm.tally_segment import TallySegment

    try:
        with TallySegment.attach(cfg.segment("tally")) as seg:
            return int(seg.state.ctr[C_ROLL_DATE]), int(seg.state.ctr[C_LAST_GSEQ])
    except (FileNotFoundError, ValueError, OSError):
        return 0, 0


def state_at(cfg, gseq: int):
    """The node's state after the event ``gseq`` (0: before the first), from its data
    directory: the newest snapshot at or before it that loads, plus the journal."""
    from exposure.shm.session_layout import SESSION_COLS
    from exposure.shm.tally_layout import allocate, reset
    from exposure.store.recovery import replay_journal
    from exposure.store.snapshot import SnapshotError, load_snapshot, snapshots

    buf, st = allocate(cfg.caps)
    if gseq <= 0:
        return st
    sessions = np.zeros((cfg.max_sessions + 1, SESSION_COLS), np.uint64)
    base = 0
    for g, path in reversed(snapshots(cfg.data_dir)):
        if g > gseq:
            continue
        try:
            base = load_snapshot(path, buf, sessions)
            break
        except (SnapshotError, OSError):
            reset(st)
    if base < gseq:
        import inspect

        kw = ({"archive": True} if "archive" in inspect.signature(replay_journal).parameters
              else {})
        replay_journal(st, cfg.data_dir, from_gseq=base + 1, upto=gseq, **kw)
    return st


def _find_roll(cfg, session: int, seq: int, after: int) -> int:
    """The gseq of session ``session``'s record ``seq`` (a roll) in the journal, looked for
    after gseq ``after``."""
    from exposure.store.journal import read_blocks

    for blk in read_blocks(cfg.data_dir, from_gseq=max(after, 0) + 1):
        r = blk.records
        hit = np.flatnonzero((r["session"] == session) & (r["sseq"] == seq))
        if hit.size:
            k = int(hit[0])
            if int(r["type"][k]) != T_ROLL:
                raise RollError(f"gseq {int(r['gseq'][k])} of session {session} seq {seq} is "
                                "not a roll")
            return int(r["gseq"][k])
    raise RollError(f"the roll (session {session} seq {seq}) was acknowledged but is not in "
                    f"the journal at {cfg.data_dir} (run exposure roll where the node runs)")


def _send_roll(cfg, session: int, secret, date: int, timeout: float) -> tuple[int, int]:
    """Send one roll; (its seq, the gseq it was looked for after) once acknowledged."""
    from exposure.net.producer import Producer, ProducerError

    _, before = last_roll(cfg)
    event: dict = {"type": "roll"}
    if date:
        event["date"] = date
    try:
        with Producer(cfg, session, secret=secret, connect_timeout=timeout) as p:
            seq = p.send(event)
            p.flush(timeout)
            acks = list(p.results(0))
    except ProducerError as e:
        raise RollError(str(e)) from None
    for ack in acks:
        for s, reason in ack.rejected:
            if s in (seq, 0):
                raise RollError(f"the node rejected the roll: {reason}"
                                + (" (the session needs the roll entitlement)"
                                   if reason == "unauthorized" else ""))
    return seq, before


def fund_line(doc: dict) -> dict:
    return {k: doc["fund"][k] for k in FUND_KEYS}


def roll_node(cfg, date: int, session: int = 1, secret: bytes | None = None,
              timeout: float = 30.0) -> dict:
    """Roll one node; the result: date, gseq of the roll, and the fund line before it."""
    from exposure.engine.document import document

    seq, before = _send_roll(cfg, session, secret, date, timeout)
    gseq = _find_roll(cfg, session, seq, before)
    doc = document(state_at(cfg, gseq - 1))
    return {"date": D.date_text(date) if date else None, "gseq": gseq,
            "fund": fund_line(doc), "currency": cfg.currencies.base}


def roll_cluster(cluster, date: int, session: int = 1,
                 secrets: list | None = None, timeout: float = 30.0) -> dict:
    """Roll every partition (at once); the composed fund line before the rolls."""
    from exposure.cluster.topology import compose, primary_of, state_view

    n = len(cluster.names)
    out: list = [None] * n

    def one(k: int) -> None:
        cfg = primary_of(cluster.members[k]) if cluster.members else cluster.configs[k]
        try:
            seq, before = _send_roll(cfg, session, secrets[k] if secrets else None, date,
                                     timeout)
            g = _find_roll(cfg, session, seq, before)
            out[k] = (g, state_view(state_at(cfg, g - 1)))
        except Exception as e:  # noqa: BLE001  (reported as this partition's failure)
            out[k] = e

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [f"partition {cluster.names[k]!r}: {r}" for k, r in enumerate(out)
              if isinstance(r, Exception)]
    if failed:
        raise RollError("; ".join(failed))
    doc = compose([v for _, v in out], cluster.pmap)
    return {"date": D.date_text(date) if date else None,
            "gseq": {cluster.names[k]: out[k][0] for k in range(n)},
            "fund": fund_line(doc), "currency": cluster.configs[0].currencies.base}


def describe(res: dict) -> str:
    """The result as the line ``exposure roll`` prints."""
    f = res["fund"]
    g = res["gseq"]
    at = (f"gseq {g}" if isinstance(g, int)
          else "gseq " + ", ".join(f"{k} {v}" for k, v in g.items()))
    day = res["date"] or "(undated)"
    ccy = f" ({res['currency']})" if res.get("currency") else ""  # SPEC 7: the base
    return (f"rolled {day} at {at}; closing fund{ccy}: gross {f['gross']:,.2f}  net "
            f"{f['net']:,.2f}  pnl {f['pnl']:,.2f}  live orders {f['live_orders']}")
