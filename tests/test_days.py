"""Day after day (issue 27): each roll's end-of-day report, the journal kept by day, and a
cell table that lasts for weeks.

* the journal writer begins a new segment at a roll (the journal stage's cue), and a
  block retried after half of it was written is not written twice;
* the snapshot process writes each day's report (JSON and CSVs) equal to ``exposure replay
  --journal --upto`` the gseq before the roll, and the roll's snapshot; ``[day] keep_days``
  keeps the last days replayable and archives (or deletes) the older ones; ``replay
  --day`` of a kept day and of an archived one, ``journal verify`` across both;
* a node killed with -9 before a roll's report was written writes it when it restarts, and
  a node restarted after days were archived recovers exactly;
* 30 days against a cell capacity far below the cells ever touched: no ``capacity``
  reject, the end equal to replay, offline and on a node.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
import orjson
import pytest

from exposure.config.node import load_config
from exposure.core.capacity import Capacities
from exposure.core.types import EVENT_WORDS, T_ROLL
from exposure.engine.document import compare_documents, document
from exposure.engine.parse import records_from_objects
from exposure.engine.replay import replay_records
from exposure.harness.localnode import LocalNode
from exposure.harness.wait import wait_for
from exposure.node.snapshotter import take_snapshot
from exposure.ops.cli import main as cli
from exposure.store.eod import TABLES, read_days
from exposure.store.journal import JournalWriter, segments
from exposure.store.snapshot import snapshots

CELLS = 512  # the cell capacity of the 30-day flow: it touches 6,000 cells


def month(days: int = 30, accounts: int = 10, per_day: int = 20) -> list[dict]:
    """``days`` trading days, each a dated roll after a flow that opens and closes its own
    positions (account x instrument cells new every day: ``accounts * per_day`` a day),
    plus one position carried over every day and a live order left overnight once."""
    ev: list[dict] = [{"type": "position", "account": 0, "instrument": 60_000, "qty": 100,
                       "price": 10.0}]
    oid = 1
    for d in range(days):
        for a in range(1, accounts + 1):
            for j in range(per_day):
                ins = 1 + d * per_day + j
                px = 10.0 + d + j / 8
                for side, qty in (("buy", 300), ("sell", 300)):
                    ev.append({"type": "new", "source": 1, "order_id": oid, "account": a,
                               "instrument": ins, "side": side, "qty": qty, "price": px})
                    ev.append({"type": "fill", "source": 1, "order_id": oid, "account": a,
                               "instrument": ins, "side": side, "qty": qty,
                               "price": px + (0.25 if side == "sell" else 0.0)})
                    oid += 1
        if d == 3:  # a live order over the night: its cell is kept, then cancelled
            ev.append({"type": "new", "source": 2, "order_id": 1, "account": 1,
                       "instrument": 59_000, "side": "buy", "qty": 5, "price": 1.0})
        if d == 5:
            ev.append({"type": "cancel", "source": 2, "order_id": 1})
        ev.append({"type": "mark", "instrument": 60_000, "price": 10.0 + d})
        ev.append({"type": "roll", "date": f"2024-{1 + d // 28:02d}-{1 + d % 28:02d}"})
    return ev


def records(objs: list[dict]) -> np.ndarray:
    recs = records_from_objects(objs)
    recs["gseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)
    return recs


def journal(data: Path, recs: np.ndarray, block: int = 500, segment: int = 1 << 20) -> None:
    """Write ``recs`` as the journal stage does: a roll begins a segment."""
    w = JournalWriter(data, segment)
    words = recs.view(np.uint64).reshape(-1, EVENT_WORDS)
    for lo in range(0, len(words), block):
        part = words[lo:lo + block]
        for g in part[(recs["type"][lo:lo + block] == T_ROLL), 0].tolist():
            w.roll_at(g)
        w.append(part)
    w.sync()
    w.close()


def replay_cli(capsysbinary, *args: str) -> dict:
    assert cli(["replay", "--compact", *args]) == 0
    return orjson.loads(capsysbinary.readouterr().out)


def csv_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def check_report(data: Path, stem: str, want: dict) -> None:
    """The report ``eod/<stem>`` equals ``want``: the JSON (SPEC document) and each CSV."""
    got = orjson.loads((data / "eod" / f"{stem}.json").read_bytes())
    assert compare_documents(got, want) == []
    for t in TABLES:
        rows = csv_rows(data / "eod" / f"{stem}.{t}.csv")
        wrows = [want[t]] if t == "fund" else want[t]
        assert len(rows) == len(wrows), t
        for r, w in zip(rows, wrows, strict=True):
            assert {k: float(v) for k, v in r.items()} == {k: float(v) for k, v in w.items()}


def test_a_roll_begins_a_segment_and_a_retried_block_is_not_written_twice(tmp_path):
    recs = records([{"type": "mark", "instrument": 1, "price": 1.0}] * 5
                   + [{"type": "roll", "date": "2024-03-01"}]
                   + [{"type": "mark", "instrument": 1, "price": 2.0}] * 4)
    words = recs.view(np.uint64).reshape(-1, EVENT_WORDS)
    w = JournalWriter(tmp_path)
    w.roll_at(6)
    w.append(words[:8])   # cut at the roll: two blocks, two segments
    w.append(words[6:])   # a retry of a block whose first part was written: the rest only
    w.sync()
    w.close()
    assert [g for g, _ in segments(tmp_path)] == [1, 6]
    assert cli(["journal", "verify", str(tmp_path)]) == 0


def test_each_days_report_equals_replay_and_the_journal_keeps_the_last_days(
        tmp_path, capsysbinary):
    objs = month(days=6)
    recs = records(objs)
    rolls = recs["gseq"][recs["type"] == T_ROLL].tolist()
    data = tmp_path / "data"
    journal(data, recs, segment=64 << 10)
    caps = Capacities(cells=CELLS, orders=1024)
    cfg = dataclasses.replace(load_config(None), data_dir=data, caps=caps, keep_days=2,
                              snapshot_keep=2, snapshot_journal="archive")
    config = tmp_path / "node.toml"
    config.write_text(f"[capacities]\ncells = {CELLS}\norders = 1024\n")
    # Two passes, as the supervisor runs it: to the middle of day 3, then to the end.
    take_snapshot(cfg, lambda _: None, nice=False, upto=rolls[2] + 10)
    assert [g for g, _, _ in read_days(data)] == rolls[:3]
    take_snapshot(cfg, lambda _: None, nice=False, upto=len(recs))
    days = read_days(data)
    assert [g for g, _, _ in days] == rolls
    for g, date, stem in days:
        assert stem == f"2024-01-{date % 100:02d}"
        want = document(replay_records(recs[:g - 1], caps))
        check_report(data, stem, want)
        assert compare_documents(
            replay_cli(capsysbinary, "--journal", str(data), "--upto", str(g - 1),
                       "--config", str(config)), want) == []
    # keep_days = 2: the day in progress (empty: after the last roll) and the day before
    # stay live, with the snapshot each starts from; older days went to the archive
    live = [g for g, _ in segments(data)]
    assert min(live) == rolls[-2]
    assert {g for g, _ in segments(data, archive=True)} - set(live)
    assert rolls[-2] in [g for g, _ in snapshots(data)]
    # replay --day: a kept day (from the live segments and its snapshot) and an archived
    # one (from the archive, from gseq 1)
    for day, g in (("2024-01-05", rolls[4]), ("2024-01-02", rolls[1])):
        got = replay_cli(capsysbinary, "--journal", str(data), "--day", day, "--config",
                         str(config))
        assert compare_documents(got, document(replay_records(recs[:g - 1], caps))) == []
    assert cli(["journal", "verify", str(data)]) == 0
    out = orjson.loads(capsysbinary.readouterr().out)
    assert (out["first_gseq"], out["last_gseq"], out["records"]) == (1, len(recs), len(recs))


def test_a_day_not_rolled_gives_the_latest_and_an_unknown_day_is_refused(tmp_path,
                                                                         capsysbinary):
    recs = records(month(days=2))
    data = tmp_path / "data"
    journal(data, recs)
    whole = document(replay_records(recs))
    assert compare_documents(replay_cli(capsysbinary, "--journal", str(data), "--day",
                                        "2024-01-03"), whole) == []
    assert cli(["replay", "--journal", str(data), "--day", "2023-12-31"]) == 2
    assert "no roll closed that day" in capsysbinary.readouterr().err.decode()
    assert cli(["replay", "--journal", str(data), "--day", "2024-02-30"]) == 2


def test_thirty_days_fit_a_cell_table_smaller_than_the_cells_they_touch():
    objs = month()
    recs = records(objs)
    touched = {(o["account"], o["instrument"]) for o in objs if "account" in o}
    assert len(touched) > 10 * CELLS
    st = replay_records(recs, Capacities(cells=CELLS, orders=1024))
    doc = document(st)
    assert doc["counts"]["rejects"] == {} and doc["counts"]["rolls"] == 30
    assert {(p["account"], p["instrument"]) for p in doc["positions"]} == {(0, 60_000)}


@pytest.mark.process
def test_a_node_writes_the_report_at_each_roll_also_after_a_kill_and_recovers_by_day(
        tmp_path):
    """A node's days: each roll's report, equal to replay; killed with -9, its reports
    and the roll's snapshot taken away (as if it died before writing them), it writes them
    again on restart; 30 days through a 512-cell table with 2 days kept and the rest
    archived: the restarted node recovers exactly from a kept day's snapshot."""
    objs = month()
    events = tmp_path / "month.jsonl"
    events.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in objs))
    recs = records(objs)
    rolls = recs["gseq"][recs["type"] == T_ROLL].tolist()
    caps = Capacities(cells=CELLS, orders=1024)
    data = tmp_path / "data"
    extra = ("segment_mb = 1\n[snapshot]\nevery_events = 0\nevery_s = 0\njournal = "
             '"archive"\n[day]\nkeep_days = 2\n')
    n = LocalNode(tmp_path, orders=1024, cells=CELLS, data_dir=data, extra=extra)
    try:
        assert n.cli("send", str(events), "--rate", "50000").returncode == 0
        wait_for(lambda: len(read_days(data)) == 30, 60, "30 end-of-day reports", n,
                 step=0.2)
        final = n.dump()
        assert compare_documents(final, document(replay_records(recs, caps))) == []
        assert final["counts"]["rejects"] == {}
        # (the retention runs after the last roll's report: wait for its result too)
        wait_for(lambda: min(g for g, _ in segments(data)) == rolls[-2], 60,
                 "the days before the two kept archived", n, step=0.2)
        n.kill9()
        last = rolls[-1]
        for p in (data / "eod").glob("2024-02-02*"):  # the last day's report...
            p.unlink()
        for g, p in snapshots(data):  # ... and the roll's snapshot: never written
            if g >= last:
                p.unlink()
        archived = {g for g, _ in segments(data, archive=True)} - dict(segments(data)).keys()
        assert archived and min(g for g, _ in segments(data)) == rolls[-2]
        (data / "archive").rename(tmp_path / "moved-off")  # the archive left the machine
        n.start()  # recovers from the day before's roll snapshot: no archived segment
        assert f"loaded snapshot at gseq {rolls[-2]}" in n.log.read_text()
        assert compare_documents(n.dump(), final) == []
        wait_for(lambda: (data / "eod" / "2024-02-02.json").exists(), 60,
                 "the last day's report written again", n, step=0.2)
        check_report(data, "2024-02-02", document(replay_records(recs[:last - 1], caps)))
        # (the roll's snapshot is taken again too; it may land after the report)
        wait_for(lambda: last in [g for g, _ in snapshots(data)], 60,
                 "the roll's snapshot taken again", n, step=0.2)
    finally:
        n.stop()
