"""The FIX gateway end to end (docs/fix.md): a real QuickFIX initiator (tests/fix/
counterparty.cpp) sends a seeded day of ExecutionReports to ``exposure fix``, which feeds a
real node as one session. The node's document must equal ``exposure replay`` of the SPEC
events the reports mean (built beside them by tests/fixday.py, not by the gateway's
Mapper), and its journal must hold each (session, seq) once:

* a plain day;
* the gateway killed with -9 mid-day and started again (the counterparty reconnects, the
  gateway asks for what it had not journaled);
* the node's pair primary killed with -9 mid-day (the producer fails over);
* busts and corrections, across a ``roll`` sent by another session, and a counterparty
  restarted in between;
* an unknown account and symbol go to the dead letters; the CSVs fixed, ``exposure fix
  redeliver`` passes them on.

Seeded: each test prints its seed."""

from __future__ import annotations

import random

import numpy as np
import pytest
from fixday import (
    ACCOUNTS,
    SYMBOLS,
    Day,
    accounts_csv,
    instruments_csv,
    number_orders,
    script_line,
)
from fixsupport import QuickFix, build_counterparty
from nodes import etcd_or_skip

from exposure.client import Producer
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import records_from_objects
from exposure.engine.replay import replay_records
from exposure.harness.fixgateway import LocalGateway
from exposure.harness.localnode import LocalPair
from exposure.harness.wait import wait_for
from exposure.store.journal import read_blocks, scan

pytestmark = [pytest.mark.process, pytest.mark.timeout(300)]

SESSION = 5


def seeded() -> random.Random:
    seed = random.SystemRandom().randrange(1 << 30)
    print(f"seed {seed}")
    return random.Random(seed)


@pytest.fixture(scope="module")
def quickfix(tmp_path_factory):
    return build_counterparty(tmp_path_factory.mktemp("qf"))


def flat(events: list[list[dict]]) -> list[dict]:
    return [e for evs in events for e in evs]


def script(day: Day, lo: int = 0, hi: int | None = None, pause_every: int = 0,
           pause_ms: int = 0) -> list[str]:
    out = []
    for i, f in enumerate(day.fix[lo:hi]):
        out.append(script_line(f))
        if pause_every and i % pause_every == pause_every - 1:
            out.append(f"#sleep {pause_ms}")
    return out


def held(node, session: int = SESSION) -> int:
    return node.session_counters(session).get("held", 0)


def assert_node_equals_replay(node, expected: list[dict], sessions: dict[int, int]) -> None:
    """The node's document equals replay of ``expected`` (in the node's order), and its
    journal holds seqs 1..n of each session once (``sessions``: session -> n)."""
    recs = records_from_objects(number_orders(expected))
    recs["gseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)
    want = document(replay_records(recs))
    assert compare_documents(node.dump(), want) == [], node.name
    wait_for(lambda: scan(node.data_dir).last == node.last_gseq(), 60, "the journal", node)
    got = np.concatenate([b.records for b in read_blocks(node.data_dir)])
    keys = (got["session"].astype(np.uint64) << np.uint64(40)) | got["sseq"]
    assert len(keys) == len(np.unique(keys)), "a (session, seq) twice in the node's journal"
    for s, n in sessions.items():
        seqs = np.sort(got["sseq"][got["session"] == s])
        assert np.array_equal(seqs, np.arange(1, n + 1, dtype=seqs.dtype)), (s, n, len(seqs))


def gateway(tmp_path, node_config, **kw) -> LocalGateway:
    kw.setdefault("instruments", instruments_csv())
    kw.setdefault("accounts", accounts_csv())
    return LocalGateway(tmp_path, node_config, session=SESSION, **kw)


def test_a_day_of_execution_reports_equals_replay_of_the_events_they_mean(
        node, tmp_path, quickfix):
    rnd = seeded()
    day = Day(rnd, 1500)
    want = flat(day.events)
    gw = gateway(tmp_path, node.config)
    qf = None
    try:
        qf = QuickFix(quickfix, tmp_path / "qf", role="initiator", port=gw.port,
                      script=script(day))
        wait_for(lambda: held(node) >= len(want), 60, f"{len(want)} events at the node",
                 node)
        st = gw.status()
        assert st["messages"] == len(day.fix) and st["events"] == len(want)
        assert st["dead_letters"] == 0 and st["acked"] == len(want)
        assert st["not_mapped"].get("pending_cancel", 0) + sum(
            st["not_mapped"].values()) >= sum(1 for e in day.events if not e)
        assert_node_equals_replay(node, want, {SESSION: len(want)})
    finally:
        if qf is not None:
            qf.stop()
        gw.stop()


def test_the_gateway_killed_with_9_mid_day_loses_nothing_and_passes_nothing_twice(
        node, tmp_path, quickfix):
    rnd = seeded()
    day = Day(rnd, 2000)
    want = flat(day.events)
    gw = gateway(tmp_path, node.config, limits="checkpoint_every = 500\n")
    qf = None
    try:
        qf = QuickFix(quickfix, tmp_path / "qf", role="initiator", port=gw.port,
                      script=script(day, pause_every=50, pause_ms=40))
        at = rnd.randrange(len(want) // 5, len(want) // 2)
        wait_for(lambda: held(node) >= at, 60, f"{at} events at the node", node)
        gw.kill9()
        gw.start()
        wait_for(lambda: held(node) >= len(want), 60, f"{len(want)} events at the node",
                 node)
        qf.wait_line("DONE", 30)
        st = gw.status()
        assert st["messages"] == len(day.fix) and st["events"] == len(want)
        assert_node_equals_replay(node, want, {SESSION: len(want)})
    finally:
        if qf is not None:
            qf.stop()
        gw.stop()


def test_the_pairs_primary_killed_with_9_mid_day_the_gateway_fails_over(tmp_path, quickfix):
    rnd = seeded()
    etcd = etcd_or_skip(tmp_path)
    pair = gw = qf = None
    try:
        pair = LocalPair(tmp_path, etcd)
        day = Day(rnd, 1500)
        want = flat(day.events)
        gw = gateway(tmp_path, pair.a.config)
        qf = QuickFix(quickfix, tmp_path / "qf", role="initiator", port=gw.port,
                      script=script(day, pause_every=50, pause_ms=40))
        at = rnd.randrange(len(want) // 5, len(want) // 2)
        wait_for(lambda: held(pair.a) >= at, 60, f"{at} events at the primary", pair.a)
        pair.a.kill9()
        wait_for(lambda: held(pair.b) >= len(want), 90,
                 f"{len(want)} events at the promoted backup", pair.b)
        assert gw.status()["acked"] == len(want)
        assert_node_equals_replay(pair.b, want, {SESSION: len(want)})
    finally:
        if qf is not None:
            qf.stop()
        if gw is not None:
            gw.stop()
        if pair is not None:
            pair.stop()
        etcd.stop()


def test_busts_and_corrections_across_a_roll_and_a_counterparty_restart(
        node, tmp_path, quickfix):
    rnd = seeded()
    day = Day(rnd, 600, busts=True)
    cut = len(day.fix)
    day.more(400, busts=True)            # after the roll: busts of trades from before too
    before, after = flat(day.events[:cut]), flat(day.events[cut:])
    assert any(e["type"] == "bust" for e in after)
    gw = gateway(tmp_path, node.config)
    qf = None
    try:
        qf = QuickFix(quickfix, tmp_path / "qf", role="initiator", port=gw.port,
                      script=script(day, 0, cut))
        wait_for(lambda: held(node) >= len(before), 60, "the morning at the node", node)
        qf.wait_line("DONE", 30)
        qf.stop()                        # the counterparty logs out; it comes back later
        with Producer(node.config, session=SESSION + 1) as p:
            p.send({"type": "roll"})
            p.flush(30)
        qf = QuickFix(quickfix, tmp_path / "qf", role="initiator", port=gw.port,
                      script=script(day, cut))
        want = before + [{"type": "roll"}] + after
        wait_for(lambda: held(node) >= len(before) + len(after), 60, "the day", node)
        assert_node_equals_replay(node, want, {SESSION: len(before) + len(after),
                                               SESSION + 1: 1})
        doc = node.dump()
        assert doc["counts"]["busts"] == sum(e["type"] == "bust" for e in want)
        assert doc["counts"]["rolls"] == 1
    finally:
        if qf is not None:
            qf.stop()
        gw.stop()


def test_unknown_account_and_symbol_go_to_dead_letters_and_are_redelivered_once_fixed(
        node, tmp_path, quickfix):
    rnd = seeded()
    day = Day(rnd, 300)
    book = day.book
    # an order of an account the CSV lacks, and one of a symbol it lacks, each filled
    lost = []
    for acct, sym in (("ACCNEW", "SYM1"), ("ACC1", "NEWSYM")):
        f, e = book.new(account=acct, symbol=sym)
        day.add((f, e))
        o = book.orders[-1]
        lost.append(len(day.fix) - 1)
        day.add(book.fill(o))
        lost.append(len(day.fix) - 1)
        o.live = False                   # (no more reports of it)
    day.more(100)
    good = flat(e for i, e in enumerate(day.events) if i not in lost)
    dead = flat(day.events[i] for i in lost)
    dead_ids = {e["account"] for e in dead if e["type"] == "new"} | {
        e["instrument"] for e in dead if e["type"] == "new"}
    assert {"ACCNEW", "NEWSYM"} <= dead_ids
    gw = gateway(tmp_path, node.config)
    qf = None
    try:
        qf = QuickFix(quickfix, tmp_path / "qf", role="initiator", port=gw.port,
                      script=script(day))
        wait_for(lambda: held(node) >= len(good), 60, "the mappable reports", node)
        qf.wait_line("DONE", 30)
        wait_for(lambda: gw.status()["messages"] == len(day.fix), 30, "every report")
        st = gw.status()
        assert st["dead_letters"] == 4 and st["dead_pending"] == 4
        assert st["dead_reasons"] == {"unknown_account": 2, "unknown_instrument": 2}
        lines = gw.data_dir.joinpath("dead-letters.fix").read_text().splitlines()
        assert len(lines) == 4 and all("reason" in ln and "35=8" in ln for ln in lines)
        # redeliver before the fix: nothing passes, nothing is lost
        r = gw.redeliver()
        assert r["passed_on"] == 0 and r["still_dead"] == 4
        # fix the CSVs: both go through, once
        gw.accounts.write_text(accounts_csv({**ACCOUNTS, "ACCNEW": 99}))
        gw.instruments.write_text(instruments_csv({**SYMBOLS, "NEWSYM": 199}))
        r = gw.redeliver()
        assert r["passed_on"] == 4 and r["still_dead"] == 0 and r["events"] == len(dead)
        n = len(good) + len(dead)
        wait_for(lambda: held(node) >= n, 30, "the redelivered events", node)
        for e in dead:
            if e.get("account") == "ACCNEW":
                e["account"] = 99
            if e.get("instrument") == "NEWSYM":
                e["instrument"] = 199
        # a restart replays the journal: the redeliver is not passed on again
        gw.stop()
        gw.start()
        assert gw.status()["dead_pending"] == 0
        assert gw.redeliver()["passed_on"] == 0
        assert_node_equals_replay(node, good + dead, {SESSION: n})
    finally:
        if qf is not None:
            qf.stop()
        gw.stop()
