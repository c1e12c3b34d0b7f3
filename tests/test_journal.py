"""The journal on disk, and a node that comes back from it with exactly its tallies."""

import json

import numpy as np
import orjson
import pytest
from support import DATA, SCENARIOS

from exposure.core.types import EVENT_DTYPE, EVENT_WORDS
from exposure.engine.document import compare_documents
from exposure.engine.parse import read_events
from exposure.harness.localnode import LocalNode
from exposure.harness.wait import wait_for
from exposure.store.journal import JournalError, JournalWriter, read_blocks, scan

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(params=[None, 100, 1000], ids=["chunk-8MiB", "chunk-100B", "chunk-1000B"])
def chunk(request, monkeypatch):
    """The reader's chunk size: its default, and chunks smaller than a block (every block
    read across chunk ends: the reader restarts a chunk at the block's start)."""
    import exposure.store.journal as J

    if request.param is not None:
        monkeypatch.setattr(J, "_CHUNK", request.param)
    return request.param


def _write(d, blocks=40, per=7, segment_bytes=8_000):
    w = JournalWriter(d, segment_bytes=segment_bytes)
    g = 1
    for _ in range(blocks):
        r = np.zeros(per, EVENT_DTYPE)
        r["gseq"] = np.arange(g, g + per)
        r["account"] = g
        g += per
        w.append(r.view(np.uint64).reshape(per, EVENT_WORDS))
    w.sync()
    w.close()
    return g - 1


@pytest.mark.usefixtures("chunk")
def test_blocks_read_back_in_order_across_segments(tmp_path):
    last = _write(tmp_path)
    res = scan(tmp_path)
    assert res.segments > 3 and res.blocks == 40 and res.records == last == 280
    gseqs = np.concatenate([b.records["gseq"] for b in read_blocks(tmp_path)])
    assert gseqs.tolist() == list(range(1, 281))
    assert res.torn_path is None


@pytest.mark.usefixtures("chunk")
def test_a_torn_tail_is_truncated_and_the_journal_goes_on_after_it(tmp_path):
    _write(tmp_path)
    last = sorted(tmp_path.glob("*.seg"))[-1]
    data = last.read_bytes()
    last.write_bytes(data[:-50])  # a crash in the middle of the last block
    w = JournalWriter(tmp_path)
    assert w.torn.torn_bytes == 32 + 7 * 128 - 50 and w.next_gseq == 274
    r = np.zeros(3, EVENT_DTYPE)
    r["gseq"] = [274, 275, 276]
    w.append(r.view(np.uint64).reshape(3, EVENT_WORDS))
    w.close()
    assert scan(tmp_path).last == 276


@pytest.mark.usefixtures("chunk")
def test_a_flipped_byte_before_the_tail_names_the_file_and_offset(tmp_path):
    _write(tmp_path)
    seg = sorted(tmp_path.glob("*.seg"))[1]
    b = bytearray(seg.read_bytes())
    b[64 + 32 + 5] ^= 0x40  # inside the first block's payload
    seg.write_bytes(bytes(b))
    with pytest.raises(JournalError, match=f"{seg.name}: offset 64: block payload checksum"):
        scan(tmp_path)


@pytest.mark.usefixtures("chunk")
def test_a_missing_segment_is_an_error_not_a_gap(tmp_path):
    _write(tmp_path)
    sorted(tmp_path.glob("*.seg"))[2].unlink()
    with pytest.raises(JournalError, match="a segment is missing"):
        scan(tmp_path)


@pytest.mark.usefixtures("chunk")
def test_an_empty_data_directory_is_an_empty_journal(tmp_path):
    res = scan(tmp_path)
    assert (res.records, res.last, res.torn_path) == (0, 0, None)


@pytest.mark.process
@pytest.mark.parametrize("fsync", ["batch", "none"])  # (interval: every other node test)
def test_a_restarted_node_recovers_exactly_its_tallies_and_sessions(tmp_path, fsync):
    data = tmp_path / "data"
    n = LocalNode(tmp_path, data_dir=data, fsync=fsync)
    try:
        for k, name in enumerate(SCENARIOS):
            p = n.cli("send", str(DATA / f"{name}.jsonl"), "--session", str(k + 1))
            assert p.returncode == 0, p.stderr.decode()
        before = n.dump()
    finally:
        n.stop()
    n = LocalNode(tmp_path, data_dir=data, fsync=fsync)
    try:
        assert compare_documents(n.dump(), before) == []
        # Every session resumes where it was: a resend is skipped, nothing counts twice.
        p = n.cli("send", str(DATA / f"{SCENARIOS[0]}.jsonl"), "--session", "1")
        res = json.loads(p.stdout)
        assert res["sent"] == 0 and res["acknowledged"] == res["resent_skipped"]
        assert compare_documents(n.dump(), before) == []
    finally:
        n.stop()
    # Every record sent is in the journal, rejected ones included (they are inputs too).
    assert scan(data).records == sum(len(read_events(DATA / f"{s}.jsonl")) for s in SCENARIOS)


@pytest.mark.process
def test_journal_tools_verify_inspect_and_replay_as_of_any_seq(tmp_path):
    import subprocess
    import sys

    from exposure.engine.document import document
    from exposure.engine.replay import replay_records

    name = SCENARIOS[0]
    n = LocalNode(tmp_path)
    try:
        assert n.cli("send", str(DATA / f"{name}.jsonl")).returncode == 0
        live = n.dump()
    finally:
        n.stop()

    def cli(*args):
        p = subprocess.run([sys.executable, "-m", "exposure", *args], capture_output=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr.decode()
        return p.stdout

    recs = read_events(DATA / f"{name}.jsonl")
    v = orjson.loads(cli("journal", "verify", str(n.data_dir)))
    assert v["records"] == len(recs) and v["first_gseq"] == 1 and v["torn_tail_bytes"] == 0
    lines = [orjson.loads(x) for x in cli("journal", "inspect", str(n.data_dir), "--from", "2",
                                          "--to", "4").splitlines()]
    assert [x["gseq"] for x in lines] == [2, 3, 4] and all(x["session"] == 1 for x in lines)
    assert compare_documents(orjson.loads(cli("replay", "--journal", str(n.data_dir))),
                             live) == []
    upto = len(recs) // 2
    half = orjson.loads(cli("replay", "--journal", str(n.data_dir), "--upto", str(upto)))
    assert compare_documents(half, document(replay_records(recs[:upto]))) == []


def test_resetting_a_used_state_keeps_its_capacities_and_equals_a_fresh_one():
    from exposure.core.capacity import Capacities
    from exposure.engine.document import document
    from exposure.engine.kernel import apply_batch
    from exposure.engine.replay import replay_records
    from exposure.shm.tally_layout import allocate, reset

    caps = Capacities(orders=4096, cells=4096)
    recs = read_events(DATA / f"{SCENARIOS[0]}.jsonl")
    _, st = allocate(caps)
    status = np.zeros(len(recs), np.uint8)
    apply_batch(st, recs.copy(), status)
    reset(st, keep=("pub",))
    apply_batch(st, recs.copy(), status)
    assert document(st) == document(replay_records(recs, caps))


@pytest.mark.process
def test_snapshots_bound_recovery_and_a_corrupt_one_falls_back_to_the_previous(tmp_path):
    from exposure.bench.flowgen import generate, to_jsonl
    from exposure.store.snapshot import snapshots

    flow = tmp_path / "flow.jsonl"
    flow.write_bytes(to_jsonl(generate(40_000, accounts=50, instruments=500, universe=30,
                                       live_target=2000, seed=11)))
    data = tmp_path / "data"
    extra = ("segment_mb = 1\n[snapshot]\nevery_events = 8000\nevery_s = 0\nkeep = 2\n"
             'journal = "delete"\n')
    n = LocalNode(tmp_path, data_dir=data, extra=extra)
    try:
        assert n.cli("send", str(flow), "--rate", "20000").returncode == 0
        # the snapshotter caught up with the 40,000 events (one every 8,000 at most; a late
        # one is taken where the stream is, so the gseqs vary) and deleted the journal
        # segments the oldest kept covers: the first one holds about 8,190 records of 1 MiB
        def caught_up() -> bool:
            s = snapshots(data)
            segs = [int(p.name[8:28]) for p in data.glob("journal-*.seg")]
            return len(s) >= 2 and s[-1][0] >= 32_000 and bool(segs) and min(segs) > 1

        wait_for(caught_up, 60, "two snapshots, the newest past 32,000, and the first "
                 "journal segment deleted", n, step=0.2)
        before = n.dump()
    finally:
        n.stop()
    snaps = snapshots(data)
    assert len(snaps) == 2, n.log.read_text()
    first_seg = min(int(p.name[8:28]) for p in data.glob("journal-*.seg"))
    assert first_seg > 1  # segments covered by the older snapshot were deleted
    n = LocalNode(tmp_path, data_dir=data, extra=extra)
    try:
        assert compare_documents(n.dump(), before) == []
    finally:
        n.stop()
    assert f"loaded snapshot at gseq {snaps[-1][0]}" in n.log.read_text()
    # The restarted node's snapshotter may have taken one more (the journal ran 12,000
    # events past the newest): the newest and the one before it are the ones kept now.
    snaps = snapshots(data)
    assert len(snaps) == 2, n.log.read_text()
    newest = snaps[-1][1]
    b = bytearray(newest.read_bytes())
    b[len(b) // 2] ^= 0x01
    newest.write_bytes(bytes(b))
    n = LocalNode(tmp_path, data_dir=data, extra=extra)
    try:
        assert compare_documents(n.dump(), before) == []
    finally:
        n.stop()
    log = n.log.read_text()
    assert f"{newest.name} unusable" in log and "body checksum fails" in log
    assert f"loaded snapshot at gseq {snaps[0][0]}" in log


def test_replay_gathers_blocks_into_batches_and_any_cut_gives_the_same_state(tmp_path):
    """Recovery's reader thread gathers the journal's blocks into batches; the tallies do
    not depend on where the batches are cut, from any gseq, up to any gseq."""
    from exposure.bench.flowgen import generate
    from exposure.shm.session_layout import SESSION_COLS
    from exposure.shm.tally_layout import allocate
    from exposure.store.recovery import replay_journal

    recs = generate(3000, accounts=20, instruments=50, live_target=200, seed=5)
    recs["session"] = 1 + np.arange(len(recs)) % 3  # three sessions, seqs 1, 2, ... each
    recs["sseq"] = 1 + np.arange(len(recs)) // 3
    w = JournalWriter(tmp_path, segment_bytes=64 << 10)  # several segments
    words = recs.view(np.uint64).reshape(len(recs), -1)
    for lo in range(0, len(recs), 37):
        w.append(words[lo:lo + 37])
    w.sync()
    w.close()

    from exposure.core.types import (
        C_LAST_GSEQ,
        C_NCCHANGED,
        C_NCHANGED,
        C_NICHANGED,
        C_NSCHANGED,
        C_STAMP,
    )
    from exposure.shm.session_layout import S_DONE

    batch_books = ("changed", "ichanged", "schanged", "cchanged", "acc_stamp", "sec_dirty")

    from exposure.core.capacity import Capacities

    caps = Capacities(accounts=64, instruments=64, sectors=16, sources=16, orders=4096,
                      cells=4096)

    def replayed(batch, upto=0):
        _, st = allocate(caps)
        sessions = np.zeros((9, SESSION_COLS), np.uint64)
        n = replay_journal(st, tmp_path, sessions, upto=upto, batch=batch)
        tables = {}
        for name, x in zip(st._fields, st, strict=True):
            if name in batch_books:
                continue
            x = x.copy()
            if name == "ctr":
                x[[C_STAMP, C_NCHANGED, C_NICHANGED, C_NSCHANGED, C_NCCHANGED]] = 0
            if name in ("inst", "cells"):
                x["dirty"] = 0
            tables[name] = x.view(np.uint8)
        return n, tables, sessions

    n, want, want_s = replayed(65536)
    assert n == len(recs) and int(want["ctr"].view(np.uint64)[C_LAST_GSEQ]) == n
    for batch in (1, 7, 64, 4096):
        k, got, got_s = replayed(batch)
        assert k == n and np.array_equal(got_s, want_s)
        for name in want:
            assert np.array_equal(got[name], want[name]), (batch, name)
    k, _, s = replayed(100, upto=1234)
    assert k == 1234 and s[1:4, S_DONE].tolist() == [412, 411, 411]
    assert want_s[1:4, S_DONE].tolist() == [1000, 1000, 1000]


def test_a_replay_raises_the_readers_error_and_leaves_no_thread(tmp_path):
    import threading

    from exposure.core.capacity import Capacities
    from exposure.shm.tally_layout import allocate
    from exposure.store.recovery import replay_journal

    _write(tmp_path)
    seg = sorted(tmp_path.glob("*.seg"))[1]
    b = bytearray(seg.read_bytes())
    b[64 + 32 + 5] ^= 0x40
    seg.write_bytes(bytes(b))
    _, st = allocate(Capacities(orders=1024, cells=1024))
    with pytest.raises(JournalError, match="checksum"):
        replay_journal(st, tmp_path, batch=3)
    assert not [t for t in threading.enumerate() if t.name == "exposure-recovery-reader"]
