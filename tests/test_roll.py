"""The roll (issue 27): the trading date it carries, the trading day and its schedule
(exposure/core/day.py), ``exposure roll`` (exposure/ops/roll.py) and the scheduled roll
(exposure/node/stages/scheduler.py): exactly once per trading day across kill -9, a
failover and a cluster. Time is moved through ``EXPOSURE_CLOCK_FILE``, never waited for."""

import datetime as dt
import json

import numpy as np
import pytest

from exposure.core import day as D
from exposure.core.types import C_ROLL_DATE, C_ROLL_GSEQ, T_LIMIT, T_ROLL
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import (
    RECORD,
    parse_events,
    record_objects,
    record_values,
    records_from_objects,
)
from exposure.engine.replay import replay_records

NY = D.parse_schedule("17:00", "America/New_York")


def at(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


# ----------------------------------------------------------------------------- the day
def test_the_trading_day_turns_at_roll_at_and_skips_the_days_that_do_not_roll():
    assert D.trading_day(NY, at("2030-01-07T16:59:59-05:00")) == 20300107  # a Monday
    assert D.trading_day(NY, at("2030-01-07T17:00:00-05:00")) == 20300108
    assert D.trading_day(NY, at("2030-01-11T17:00:00-05:00")) == 20300114  # Fri -> Mon
    assert D.trading_day(NY, at("2030-01-12T12:00:00-05:00")) == 20300114  # Saturday
    # Time zones: 17:00 New York is 22:00 UTC in winter, 21:00 in summer.
    assert D.next_roll(NY, at("2030-01-07T12:00:00+00:00")) == at("2030-01-07T22:00:00+00:00")
    assert D.next_roll(NY, at("2030-07-08T12:00:00+00:00")) == at("2030-07-08T21:00:00+00:00")


def test_the_days_due_are_the_missed_trading_days_in_order_and_bounded():
    t = at("2030-01-09T17:00:01-05:00")  # Wednesday just after the roll time
    assert D.due(NY, t, 20300108) == [20300109]
    assert D.due(NY, t, 20300109) == []
    assert D.due(NY, t, 20300104) == [20300107, 20300108, 20300109]  # Fri's done: Mon..Wed
    assert D.due(NY, at("2030-01-09T16:59:00-05:00"), 20300108) == []
    assert D.due(NY, t, 20200101) == [20291231, 20300101, 20300102, 20300103, 20300104,
                                      20300107, 20300108, 20300109][-D.MAX_CATCH_UP:]


@pytest.mark.parametrize("roll_at,tz,days", [("5pm", "UTC", ["mon"]), ("24:00", "UTC", []),
                                             ("17:00", "Mars/Olympus", ["mon"]),
                                             ("17:00", "UTC", ["funday"]),
                                             ("17:00", "UTC", [])])
def test_a_bad_schedule_names_the_key(roll_at, tz, days):
    with pytest.raises(ValueError, match="day\\."):
        D.parse_schedule(roll_at, tz, days)


def test_the_day_section_of_a_config(tmp_path):
    from exposure.config.node import ConfigError, load_config

    f = tmp_path / "n.toml"
    f.write_text('[day]\nroll_at = "17:00"\ntz = "America/New_York"\n'
                 'weekdays = ["mon", "wed"]\nload_after_roll = ["limits.csv"]\n')
    cfg = load_config(f)
    assert cfg.roll_schedule.weekdays == {0, 2}
    assert cfg.load_after_roll == (tmp_path / "limits.csv",)
    assert any("roll" in p.stages and "journal" in p.stages for p in cfg.processes)
    assert load_config().roll_schedule is None  # no scheduled roll by default
    f.write_text('[day]\nroll_at = "5pm"\n')
    with pytest.raises(ConfigError, match="day.roll_at"):
        load_config(f)
    f.write_text('[day]\nrollat = "17:00"\n')
    with pytest.raises(ConfigError, match="day.rollat"):
        load_config(f)


def test_loads_cut_short_by_a_crash_after_the_roll_are_completed_once(tmp_path):
    """The loads after a scheduled roll follow it on the roll's session; a node that died
    between the roll and its loads (or in the middle of them) sends, once it is back, only
    the events its session does not hold after the roll, and nothing after a roll that was
    not its own. No process: the stage with a fake producer over a real journal."""
    from exposure.config.node import load_config
    from exposure.core.types import C_ROLL_GSEQ, EVENT_DTYPE, EVENT_WORDS, N_COUNTERS, T_ROLL
    from exposure.node.stages.scheduler import RollScheduler, roll_session
    from exposure.shm import session_layout as SL
    from exposure.shm.control import CONTROL_WORDS, CTL_ROLE, ROLE_PRIMARY
    from exposure.store.journal import JournalWriter

    (tmp_path / "limits.csv").write_text("name,account,gross\nA,1,100\nB,2,200\nC,3,300\n")
    f = tmp_path / "n.toml"
    f.write_text(f'[journal]\ndir = "{tmp_path / "data"}"\n[day]\nroll_at = "17:00"\n'
                 'load_after_roll = ["limits.csv"]\n')
    cfg = load_config(f)
    sid = roll_session(cfg)

    def journal_with_roll(session: int, seq: int) -> None:
        r = np.zeros(1, EVENT_DTYPE)
        r["gseq"], r["type"], r["session"], r["sseq"] = 7, T_ROLL, session, seq
        w = JournalWriter(cfg.data_dir, prewrite=0)
        w.append(r.view(np.uint64).reshape(1, EVENT_WORDS))
        w.sync()
        w.close()

    sent: list[list[dict]] = []

    class Fake:
        def send(self, events):
            sent.append(list(events))
            return 0

        def flush(self, timeout=None):
            pass

        def close(self, timeout=None):
            pass

    def stage(held: int) -> RollScheduler:
        ctr = np.zeros(N_COUNTERS, np.int64)
        ctr[C_ROLL_GSEQ] = 7
        sessions = np.zeros((sid + 2, SL.SESSION_COLS), np.uint64)
        sessions[sid, SL.S_HELD] = held
        ctl = np.zeros(CONTROL_WORDS, np.int64)
        ctl[CTL_ROLE] = ROLE_PRIMARY
        return RollScheduler(cfg, ctr, sessions, ctl, producer_factory=Fake)

    journal_with_roll(sid, 5)  # the roll was the stage's own, seq 5
    for held, rest in ((5, 3), (6, 2), (8, 0), (9, 0)):
        sent.clear()
        s = stage(held)
        assert s.loads_pending() == (5, held - 5)
        s._run_loads()
        want = [{"type": "limit", "account": a, "gross": g, "net": 0.0, "margin": 0.0,
                 "loss": 0.0} for a, g in ((1, 100.0), (2, 200.0), (3, 300.0))][3 - rest:]
        assert [[{k: e[k] for k in want[0]} for e in b] for b in sent] == (
            [want] if rest else [])
    for p in cfg.data_dir.glob("journal-*.seg"):
        p.unlink()
    journal_with_roll(sid + 1, 5)  # an operator's roll on another session: not ours
    s = stage(5)
    assert s.loads_pending() is None
    sent.clear()
    s._run_loads()
    assert sent == []


# ----------------------------------------------------------------------------- the record
def test_a_roll_carries_the_date_it_closes_on_both_parse_paths_and_in_the_kernel():
    objs = [{"type": "roll"}, {"type": "roll", "date": "2030-01-07"},
            {"type": "roll", "date": 20300108}, {"type": "roll", "date": "2030-02-30"},
            {"type": "roll", "date": "2030-1-7"}, {"type": "roll", "date": True},
            {"type": "roll", "date": 2.0}, {"type": "roll", "date": None},
            {"type": "roll", "date": 18991231}, {"type": "roll", "date": "２０３０-01-07"}]
    recs = records_from_objects(objs)
    assert recs["qty"][:3].tolist() == [0, 20300107, 20300108]
    assert recs["reject"].tolist() == [0, 0, 0] + [2] * 7  # bad_field
    for o in objs:
        assert RECORD.pack(*record_values(o)) == records_from_objects([o]).tobytes()
    assert record_objects(recs[:3]) == [{"type": "roll"}, {"type": "roll", "date": "2030-01-07"},
                                        {"type": "roll", "date": "2030-01-08"}]
    lines = [{"type": "mark", "instrument": 1, "price": 5.0}, objs[1], objs[0], objs[3]]
    st = replay_records(records_from_objects(lines))
    # The kernel keeps the last dated roll's date and the last roll's gseq; the document
    # does not change (the tallies ignore the date).
    assert (int(st.ctr[C_ROLL_DATE]), int(st.ctr[C_ROLL_GSEQ])) == (20300107, 3)
    bare = replay_records(records_from_objects([lines[0], {"type": "roll"}, objs[0]]))
    assert compare_documents(document(st), {**document(bare), "counts": {
        **document(bare)["counts"], "rejected": 1, "rejects": {"bad_field": 1}}}) == []
    # A record whose qty is no date (a binary client's) is bad_field in the kernel too.
    bad = records_from_objects([{"type": "roll"}])
    bad["qty"] = 20300230
    assert document(replay_records(bad))["counts"]["rejects"] == {"bad_field": 1}


def test_a_dated_roll_in_a_cluster_counts_once_and_every_partition_knows_its_date():
    from exposure.cluster.topology import replay_cluster, replay_partition
    from exposure.core.capacity import Capacities
    from exposure.core.partition import PartitionMap

    pmap = PartitionMap.from_ranges([("a", [[0, 1]], [[0, 1]]), ("b", [[2, 3]], [[2, 3]])],
                                    accounts=4, sources=4)
    lines = [{"type": "mark", "instrument": 1, "price": 10.0},
             {"type": "position", "account": 0, "instrument": 1, "qty": 5},
             {"type": "position", "account": 2, "instrument": 1, "qty": 7},
             {"type": "roll", "date": "2030-01-07"}, {"type": "mark", "instrument": 1,
                                                       "price": 11.0}]
    recs = parse_events("\n".join(json.dumps(x) for x in lines).encode())
    caps = Capacities(accounts=4, instruments=8, sectors=4, sources=4, orders=16, cells=16)
    doc = replay_cluster(recs, pmap, caps)
    assert doc["counts"]["rolls"] == 1
    assert compare_documents(doc, document(replay_records(recs, caps))) == []
    for k in range(2):
        assert replay_partition(recs, pmap, k, caps).ctr[C_ROLL_DATE] == 20300107


# ----------------------------------------------------------------------------- live nodes
REF = [{"type": "instrument", "instrument": 1, "multiplier": 1.0, "margin_rate": 0.1,
        "beta": 1.0, "sector": 0}]


def day_events(k: int) -> list[dict]:
    """A trading day's events: a mark, fills in two accounts, an order left live."""
    return [{"type": "mark", "instrument": 1, "price": 10.0 + k},
            {"type": "fill", "source": 0, "order_id": 10 * k + 1, "account": 1,
             "instrument": 1, "side": "buy", "qty": 10 + k, "price": 9.5 + k},
            {"type": "fill", "source": 0, "order_id": 10 * k + 2, "account": 2,
             "instrument": 1, "side": "sell", "qty": 3, "price": 10.5 + k},
            {"type": "new", "source": 0, "order_id": 10 * k + 3, "account": 1,
             "instrument": 1, "side": "buy", "qty": 1, "price": 9.0 + k}]


def send(node, events, session=1) -> None:
    from exposure.client import Producer

    with Producer(str(node.config), session=session) as p:
        p.send(events)
        p.flush(30)


def ctr(node) -> np.ndarray:
    from exposure.shm.tally_segment import TallySegment

    with TallySegment.attach(f"/exposure.{node.name}.tally") as seg:
        return seg.state.ctr.copy()


def journal_rolls(node) -> list[int]:
    import inspect

    from exposure.store.journal import read_blocks

    kw = {"archive": True} if "archive" in inspect.signature(read_blocks).parameters else {}
    out = []
    for blk in read_blocks(node.data_dir, **kw):
        r = blk.records
        ok = (r["type"] == T_ROLL) & (r["reject"] == 0)
        out += r["qty"][ok].tolist()
    return out


def operator_records(node) -> np.ndarray:
    """The journal's records of the scheduled roll's session (255), in order."""
    from exposure.store.journal import read_blocks

    blocks = [b.records[b.records["session"] == 255] for b in read_blocks(node.data_dir,
                                                                           archive=True)]
    return np.concatenate(blocks) if blocks else np.zeros(0, RECORD)


def equals_replay_of_its_journal(node) -> None:
    """The node's document equals replay of its journal (archive and live), compared at a
    moment when the journal holds everything compute applied and nothing new came in:
    events the node sends itself (the loads right after a scheduled roll) may still be on
    their way to compute or to the disk."""
    import inspect
    import time

    from exposure.config.node import load_config
    from exposure.shm.tally_layout import allocate
    from exposure.store.journal import scan
    from exposure.store.recovery import replay_journal

    kw = {"archive": True} if "archive" in inspect.signature(replay_journal).parameters else {}
    caps = load_config(node.config).caps
    deadline = time.monotonic() + 30
    while True:
        g = node.last_gseq()
        if scan(node.data_dir).last == g:
            _, st = allocate(caps)
            replay_journal(st, node.data_dir, **kw)
            doc = node.dump()
            if node.last_gseq() == g:  # (else something came meanwhile: again)
                assert compare_documents(doc, document(st)) == []
                return
        assert time.monotonic() < deadline, (
            f"the journal (last {scan(node.data_dir).last}) never caught up with the node "
            f"(last gseq {node.last_gseq()}) within 30 s")
        time.sleep(0.05)


SESSIONS = """[[session]]
id = 1
secret = "0123456789abcdef0123"
sources = "all"
accounts = "all"
instrument = true
mark = true
limit = true
[[session]]
id = 256
name = "operator"
secret = "fedcba9876543210fedc"
roll = true
"""


@pytest.mark.process
@pytest.mark.timeout(300)
def test_exposure_roll_prints_the_closing_fund_line_as_replay_and_needs_the_entitlement(
        tmp_path):
    from exposure.harness.localnode import LocalNode

    (tmp_path / "sessions.toml").write_text(SESSIONS)
    n = LocalNode(tmp_path, orders=1024, cells=1024,
                  ingest=f'sessions = "{tmp_path / "sessions.toml"}"')
    try:
        before = REF + day_events(1)
        send(n, before)
        r = n.cli("roll", "--session", "1", "--date", "2030-01-07")
        assert r.returncode == 1 and b"unauthorized" in r.stderr, r.stderr
        assert ctr(n)[C_ROLL_DATE] == 0
        r = n.cli("roll", "--date", "2030-01-07", "--json")  # session 256: the operator's
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        want = document(replay_records(records_from_objects(before)))["fund"]
        assert res["fund"] == {k: want[k] for k in ("gross", "net", "pnl", "live_orders")}
        assert res["date"] == "2030-01-07" and res["gseq"] == len(before) + 2  # + the refused
        assert res["fund"]["pnl"] != 0 and n.dump()["fund"]["pnl"] == 0
        assert (ctr(n)[C_ROLL_DATE], ctr(n)[C_ROLL_GSEQ]) == (20300107, res["gseq"])
        r = n.cli("roll", "--date", "2030-01-07")
        assert r.returncode == 2 and b"already rolled 2030-01-07" in r.stderr
        st = json.loads(n.cli("status", "--json").stdout)
        assert st["day"]["last_roll_date"] == "2030-01-07"
        assert st["day"]["last_roll_gseq"] == res["gseq"]
        assert journal_rolls(n) == [20300107]
        equals_replay_of_its_journal(n)
    finally:
        n.stop()


# Segments a retention rule takes away stay readable (replay from gseq 1 at the end).
ARCHIVE = '[snapshot]\njournal = "archive"\n'


def scheduled_node(tmp_path, clock, day: str = "", **kw):
    from exposure.harness.localnode import LocalNode

    n = LocalNode(tmp_path, orders=1024, cells=1024, start=False,
                  extra=f'{ARCHIVE}[day]\nroll_at = "17:00"\ntz = "America/New_York"\n{day}',
                  **kw)
    n.env["EXPOSURE_CLOCK_FILE"] = str(clock)
    return n


def rolled(node, date: int):
    """The node has applied the roll of ``date`` and its journal holds it (durable: a
    roll applied but not yet journaled is lost by a kill -9, and rolled again)."""
    return lambda: node.alive and ctr(node)[C_ROLL_DATE] == date and date in journal_rolls(
        node)


@pytest.mark.process
@pytest.mark.timeout(300)
def test_the_scheduled_roll_happens_once_a_day_across_kill9_before_during_and_after(
        tmp_path, capsys, monkeypatch):
    from exposure.config.node import load_config
    from exposure.harness.wait import wait_for
    from exposure.ops.cli import main
    from exposure.ops.metrics import NodeCollector
    from exposure.ops.top import Top

    clock = tmp_path / "clock"
    clock.write_text("2030-01-07T16:00:00-05:00")  # Monday, before the roll
    # load_after_roll: a good limits file goes right after the roll; a bad one not at all
    (tmp_path / "limits.csv").write_text("account,gross,net,margin,loss\n1,1e6,,,\n2,,5e5,,\n")
    (tmp_path / "bad.csv").write_text("account,gross,net,margin,loss\n1,2e6,,,\n2,lots,,,\n")
    n = scheduled_node(tmp_path, clock, day=f'load_after_roll = ["{tmp_path / "bad.csv"}", '
                                            f'"{tmp_path / "limits.csv"}"]\n')
    try:
        n.start()
        send(n, REF + day_events(1))
        # Killed before the roll and down over its time: it rolls Monday when it is back.
        n.kill9()
        clock.write_text("2030-01-07T17:02:00-05:00")
        n.start()
        wait_for(rolled(n, 20300107), 30, "Monday's roll, caught up", n)
        wait_for(lambda: len(operator_records(n)) >= 3, 30, "the loads after the roll", n)
        recs = operator_records(n)[:3]
        assert recs["type"].tolist() == [T_ROLL, T_LIMIT, T_LIMIT]
        assert np.all(np.diff(recs["gseq"].astype(np.int64)) == 1)  # right after the roll
        assert recs["account"][1:].tolist() == [1, 2]
        assert f"{tmp_path / 'bad.csv'} not loaded" in n.log.read_text()
        send(n, day_events(2))
        # Killed right after Tuesday's roll was sent (ingest holds it, or not yet), which
        # is also after Monday's: neither is rolled twice when it is back.
        sid = 255
        held = n.session_counters(sid)["held"]
        clock.write_text("2030-01-08T17:00:30-05:00")
        wait_for(lambda: n.session_counters(sid).get("held", 0) > held, 30,
                 "Tuesday's roll sent", n, step=0.001)
        n.kill9()
        n.start()
        wait_for(rolled(n, 20300108), 30, "Tuesday's roll", n)
        send(n, day_events(3))
        clock.write_text("2030-01-09T17:01:00-05:00")
        wait_for(rolled(n, 20300109), 30, "Wednesday's roll", n)
        assert journal_rolls(n) == [20300107, 20300108, 20300109]
        equals_replay_of_its_journal(n)
        assert n.dump()["counts"]["rolls"] == 3
        # status, the metrics and top show the last roll and, by the same clock, the day
        monkeypatch.setenv(D.CLOCK_ENV, str(clock))
        g = int(ctr(n)[C_ROLL_GSEQ])
        capsys.readouterr()
        assert main(["status", "--json", "--config", str(n.config)]) == 0
        day = json.loads(capsys.readouterr().out)["day"]
        assert (day["trading_day"], day["last_roll_date"], day["last_roll_gseq"]) == (
            "2030-01-10", "2030-01-09", g)
        cfg = load_config(n.config)
        assert {f.name: f.samples[0].value for f in NodeCollector(cfg).collect()
                if f.name.startswith("exposure_last_roll")} == {
            "exposure_last_roll_date": 20300109, "exposure_last_roll_gseq": g}
        top = Top(cfg)
        try:
            line = top.day_line()
        finally:
            top.close()
        assert line.startswith("trading day 2030-01-10  next roll 2030-01-10T17:00"), line
        assert f"last roll 2030-01-09 (gseq {g:,})" in line
    finally:
        n.stop()


@pytest.mark.process
@pytest.mark.timeout(300)
def test_a_backup_promoted_after_the_scheduled_roll_does_not_roll_again(tmp_path):
    from nodes import etcd_or_skip

    from exposure.harness.localnode import LocalPair
    from exposure.harness.wait import wait_for
    from exposure.shm.control import CTL_ROLE, ROLE_PRIMARY

    etcd = etcd_or_skip(tmp_path)
    clock = tmp_path / "clock"
    clock.write_text("2030-01-07T16:59:00-05:00")
    p = None
    try:
        p = LocalPair(tmp_path, etcd, start=False, orders=1024, cells=1024,
                      node_extra=f'{ARCHIVE}[day]\nroll_at = "17:00"\ntz = "America/New_York"\n')
        for node in (p.a, p.b):
            node.env["EXPOSURE_CLOCK_FILE"] = str(clock)
        p.start()
        send(p.a, REF + day_events(1))
        clock.write_text("2030-01-07T17:00:10-05:00")
        wait_for(lambda: rolled(p.a, 20300107)() and rolled(p.b, 20300107)(), 30,
                 "Monday's roll on both nodes", p.a)
        # Only a backup that etcd records as synchronous may be promoted: one that joined
        # late (the primary ran alone meanwhile) waits until the primary says it is back.
        wait_for(lambda: (r := p.record()) is not None and r.sync == p.b.name, 30,
                 "the backup recorded as synchronous", p.a)
        p.a.kill9()
        wait_for(lambda: (c := p.b.control()) is not None and c[CTL_ROLE] == ROLE_PRIMARY,
                 30, "the promotion", p.b)
        clock.write_text("2030-01-08T17:00:10-05:00")  # the next roll is the promoted one's
        wait_for(rolled(p.b, 20300108), 30, "Tuesday's roll on the promoted backup", p.b)
        assert journal_rolls(p.b) == [20300107, 20300108]
        equals_replay_of_its_journal(p.b)
    finally:
        if p is not None:
            p.stop()
        etcd.stop()


@pytest.mark.process
@pytest.mark.timeout(300)
def test_subscribers_see_every_account_the_roll_moves_in_the_batch_that_carries_it(tmp_path):
    """Item 7: a roll sets every account's P&L to 0 (and forgets flat cells). Each account
    with a cell, the flat one and the one with only a live order included, comes on the
    feed as an incremental row stamped with the roll's gseq, with no snapshot recovery,
    and the subscriber's view then equals ``dump``. The refresh cycle is off, so nothing
    but the roll's incrementals can bring the rows. (About 3 s: a node's start and stop.)"""
    from exposure.core.types import ROW_ACCOUNT
    from exposure.feed.subscriber import Subscriber
    from exposure.harness.localnode import LocalNode
    from exposure.harness.wait import wait_for

    n = LocalNode(tmp_path, orders=1024, cells=1024, start=False)
    n.config.write_text(n.config.read_text().replace(
        "[fanout]\n", "[fanout]\nrefresh_rows_per_s = 0\n"))
    sub = None
    try:
        n.start()
        events = REF + [{"type": "mark", "instrument": 1, "price": 10.0}]
        for a in range(40):  # 40 accounts: more account rows than one datagram holds
            events.append({"type": "fill", "source": 0, "order_id": a + 1, "account": a,
                           "instrument": 1, "side": "buy", "qty": a + 1,
                           "price": 9.0 + a / 64})
        events += [  # account 40: a round trip, flat with P&L; 41: a live order only
            {"type": "fill", "source": 0, "order_id": 100, "account": 40, "instrument": 1,
             "side": "buy", "qty": 5, "price": 9.0},
            {"type": "fill", "source": 0, "order_id": 101, "account": 40, "instrument": 1,
             "side": "sell", "qty": 5, "price": 11.0},
            {"type": "new", "source": 0, "order_id": 102, "account": 41, "instrument": 1,
             "side": "buy", "qty": 2, "price": 9.5}]
        send(n, events)
        sub = Subscriber.from_config(n.config)
        sections = ("accounts", "fund", "instruments", "sectors", "positions")

        def agrees(changes: list) -> bool:
            changes += sub.poll(0.02)
            want = n.dump(process=False)  # a desk's read (the command's is checked below)
            return sub.state == "live" and compare_documents(
                sub.document(), {k: want[k] for k in sections}) == []

        wait_for(lambda: agrees([]), 30, "the feed to agree with dump before the roll", n)
        assert all(a["pnl"] != 0 for a in sub.document()["accounts"][:41])
        recoveries = sub.counters["recoveries"]
        send(n, [{"type": "roll", "date": "2030-01-07"}])
        gseq = int(ctr(n)[C_ROLL_GSEQ])
        assert gseq == len(events) + 1
        seen: list = []
        wait_for(lambda: agrees(seen), 30, "the feed to agree with dump after the roll", n)
        rolled = {c.id for c in seen if c.kind == ROW_ACCOUNT and c.row is not None
                  and int(c.row["gseq"]) == gseq}
        assert rolled == set(range(42))
        assert sub.counters["recoveries"] == recoveries and sub.counters["gaps"] == 0
        view = sub.document()
        assert all(a["pnl"] == 0 for a in view["accounts"]) and view["fund"]["pnl"] == 0
        # Feed version 4's position rows came through the roll's compaction of the cell
        # table by incrementals alone: account 40's flat cell is gone (its id now holds
        # account 41's, whose old id was sent freed), every other cell kept, P&L 0.
        assert [(p["account"], p["pos"]) for p in view["positions"]] == \
            [(a, a + 1) for a in range(40)] + [(41, 0)]
        assert all(p["pnl"] == 0 for p in view["positions"])
        equals_replay_of_its_journal(n)
    finally:
        if sub is not None:
            sub.close()
        n.stop()


@pytest.mark.process
@pytest.mark.timeout(300)
def test_a_cluster_loads_its_day_rolls_once_and_equals_replay_of_the_whole_stream(tmp_path,
                                                                                  capsys):
    """``exposure refdata|limits|positions load --cluster`` and ``exposure roll --cluster``
    on two partitions: the loads go to their accounts' partitions (instruments to every
    one), the roll to every partition, counted once; the printed closing fund line is that
    of replay up to the roll, and ``dump --cluster`` equals replay of the whole stream,
    alone and as the cluster would. The commands run in this process (their ``main``), to
    save their start-up. (About 4 s beyond the two nodes' start and stop; 9-12 s in all.)"""
    from exposure.cluster.topology import replay_cluster
    from exposure.core.loads import read_load
    from exposure.core.routing import split
    from exposure.harness.cluster import LocalCluster
    from exposure.harness.wait import wait_for
    from exposure.ops.cli import main
    from exposure.ops.roll import describe, fund_line

    c = LocalCluster(tmp_path, [("p0", [[0, 1]], [[0, 1]]), ("p1", [[2, 3]], [[2, 3]])])
    files = {"refdata": "symbol,instrument,multiplier,margin_rate,beta,sector,name\n"
                        "AAA,1,1,0.1,1.0,0,A\nBBB,2,10,0.2,0.5,1,B\n",
             "limits": "name,account,gross,net,margin,loss\nPM0,0,1e6,,,\nPM3,3,,5e5,,\n",
             "positions": "account,instrument,qty,price\n1,1,100,10\n2,2,-5,20\n"}
    try:
        c.start()
        loaded: list[dict] = []
        for cmd, text in files.items():
            f = tmp_path / f"{cmd}.csv"
            f.write_text(text)
            assert main([cmd, "load", str(f), "--cluster", str(c.file)]) == 0
            loaded += read_load(f).events
        day = [{"type": "mark", "instrument": 1, "price": 11.0},
               {"type": "mark", "instrument": 2, "price": 19.0}]
        for a in range(4):
            day.append({"type": "fill", "source": a, "order_id": a + 1, "account": a,
                        "instrument": 1 + a % 2, "side": "buy", "qty": 3 + a,
                        "price": 10.5})
        day.append({"type": "new", "source": 3, "order_id": 9, "account": 3,
                    "instrument": 1, "side": "sell", "qty": 2, "price": 12.0})
        c.send(records_from_objects(day))
        before = records_from_objects(loaded + day)
        capsys.readouterr()
        assert main(["roll", "--cluster", str(c.file), "--date", "2030-01-07"]) == 0
        printed = capsys.readouterr().out
        after = records_from_objects([{"type": "mark", "instrument": 1, "price": 12.0}])
        c.send(after, "--session", "2")  # (a file is its session's seqs 1..n)
        whole = np.concatenate([before, records_from_objects(
            [{"type": "roll", "date": "2030-01-07"}]), after])
        subs = split(whole, c.cluster.pmap)
        for n, m in zip(c.nodes, map(len, subs), strict=True):
            wait_for(lambda n=n, m=m: n.last_gseq() == m, 30, f"{n.name} applied")
        gseqs = {name: len(sub) - len(after) for name, sub in
                 zip(c.cluster.names, subs, strict=True)}
        closing = fund_line(document(replay_records(before)))
        assert closing["pnl"] != 0
        assert printed.strip() == describe({"date": "2030-01-07", "gseq": gseqs,
                                            "fund": closing, "currency": "USD"})
        assert "closing fund (USD): gross" in printed  # labelled (SPEC 7: the base)
        want = document(replay_records(whole))
        got = c.dump()
        assert got["counts"]["rolls"] == 1 and got["fund"]["pnl"] != 0
        assert compare_documents(got, want) == []
        assert compare_documents(got, replay_cluster(whole, c.cluster.pmap)) == []
    finally:
        c.stop()

