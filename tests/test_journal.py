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
def _crash(w):
    """The writer's process dies: its descriptor closes, nothing is cut or synced more."""
    import os

    os.close(w.fd)
    w.fd = -1


def _blocks(w, first, blocks, per=7):
    g = first
    for _ in range(blocks):
        r = np.zeros(per, EVENT_DTYPE)
        r["gseq"] = np.arange(g, g + per)
        r["reserved"] = -1  # a record that ends in non-zero bytes
        g += per
        w.append(r.view(np.uint64).reshape(per, EVENT_WORDS))
    w.sync()
    return g - 1


@pytest.mark.usefixtures("chunk")
def test_prewritten_zeros_end_the_data_and_a_restart_writes_on_over_them(tmp_path):
    """The writer writes zeros ahead of its blocks; a crash leaves them at the end of the
    last segment: the data ends at the first zero header (not a torn tail), and a new
    writer cuts them off and goes on from the next gseq."""
    w = JournalWriter(tmp_path, segment_bytes=1 << 20, prewrite=64 << 10)
    last = _blocks(w, 1, 10)
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    assert seg.stat().st_size >= 64 << 10 > w.size  # zeros past the data
    _crash(w)
    res = scan(tmp_path)
    assert res.records == last == 70 and res.torn_path is None
    assert res.spare_path == seg and res.spare_offset == w.size
    w = JournalWriter(tmp_path, segment_bytes=1 << 20, prewrite=64 << 10)
    assert w.torn.torn_path is None and seg.stat().st_size == res.spare_offset
    last = _blocks(w, last + 1, 5)
    w.close()  # a clean close cuts the zeros off
    assert seg.stat().st_size == w.size
    gseqs = np.concatenate([b.records["gseq"] for b in read_blocks(tmp_path)])
    assert gseqs.tolist() == list(range(1, last + 1))


@pytest.mark.usefixtures("chunk")
def test_a_block_torn_before_the_prewritten_zeros_is_a_torn_tail_not_corruption(tmp_path):
    w = JournalWriter(tmp_path, segment_bytes=1 << 20, prewrite=64 << 10)
    _blocks(w, 1, 10)
    end = w.size
    _crash(w)
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    b = bytearray(seg.read_bytes())
    b[end - 20:end] = bytes(20)  # the last block's payload never reached the disk whole
    seg.write_bytes(bytes(b))
    res = scan(tmp_path)
    assert res.records == 63 and res.torn_path == seg
    assert res.torn_offset == end - (32 + 7 * 128)
    w = JournalWriter(tmp_path, segment_bytes=1 << 20, prewrite=64 << 10)
    assert _blocks(w, 64, 1) == 70
    w.close()
    assert scan(tmp_path).records == 70


def test_a_fast_stream_appends_plainly_and_a_slow_one_writes_zeros_ahead_again(tmp_path):
    """Above ``append_above`` bytes a second (over windows of at least 20 ms) the writer
    writes no zeros ahead: each byte would be written twice. Below it, zeros ahead again.
    What it wrote reads back and recovers whole either way."""
    import time

    w = JournalWriter(tmp_path, segment_bytes=64 << 20, prewrite=64 << 10,
                      append_above=1 << 20)  # 1 MiB/s: a test's loop is far above it
    g = _blocks(w, 1, 1)
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    assert seg.stat().st_size >= 64 << 10 > w.size and not w.fast  # zeros ahead
    t_end = time.monotonic() + 0.1
    while time.monotonic() < t_end or w.size < 256 << 10:  # 100 ms, past the zeros
        g = _blocks(w, g + 1, 20)
    assert w.fast
    assert seg.stat().st_size == w.size  # the data's end is the file's: no zeros ahead
    for _ in range(2):  # the window that saw the fast blocks, then a slow one
        time.sleep(0.05)
        g = _blocks(w, g + 1, 1)
    assert not w.fast
    assert seg.stat().st_size >= w.size + (64 << 10) - 2000  # zeros ahead again
    _crash(w)
    res = scan(tmp_path)
    assert res.records == g and res.torn_path is None and res.spare_path == seg
    w = JournalWriter(tmp_path, segment_bytes=64 << 20)
    w.close()
    gseqs = np.concatenate([b.records["gseq"] for b in read_blocks(tmp_path)])
    assert gseqs.tolist() == list(range(1, g + 1))


def test_rolled_segments_hold_no_zeros_and_zeros_in_one_are_an_error(tmp_path):
    w = JournalWriter(tmp_path, segment_bytes=8_000, prewrite=64 << 10)
    _blocks(w, 1, 40)
    _crash(w)
    segs = sorted(tmp_path.glob("*.seg"))
    assert len(segs) > 3
    for seg in segs[:-1]:  # cut to their data when the writer rolled away
        assert not seg.read_bytes().endswith(bytes(32))
    assert scan(tmp_path).records == 280
    segs[1].write_bytes(segs[1].read_bytes() + bytes(4096))
    with pytest.raises(JournalError, match=f"{segs[1].name}: offset .*zeros in a segment "
                                           "that is not the last"):
        scan(tmp_path)


def test_a_cursor_reads_through_prewritten_space_and_across_rolls(tmp_path):
    from exposure.store.journal import JournalCursor

    w = JournalWriter(tmp_path, segment_bytes=8_000, prewrite=64 << 10)
    c = JournalCursor(tmp_path, 1)
    got = []
    g = 1
    for _ in range(30):
        g = _blocks(w, g, 1) + 1
        while (x := c.read(g - 1)) is not None:
            got.extend(x[:, 0].tolist())
        assert c.read(1 << 62) is None  # the zeros after the data: nothing more yet
    c.close()
    w.close()
    assert got == list(range(1, g))


def test_a_full_disk_while_prewriting_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    import errno
    import os

    import exposure.store.journal as J

    w = JournalWriter(tmp_path, segment_bytes=1 << 20, prewrite=16 << 10)
    _blocks(w, 1, 10)
    seg = sorted(tmp_path.glob("*.seg"))[-1]
    before = seg.stat().st_size
    real = os.pwrite

    def full(fd, data, off):
        if off >= w.alloc:  # only the zeros past the prewritten end fail
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, off)

    monkeypatch.setattr(J.os, "pwrite", full)
    with pytest.raises(OSError, match="No space left"):
        _blocks(w, 71, 40)  # runs past the prewritten space
    monkeypatch.setattr(J.os, "pwrite", real)
    assert seg.stat().st_size >= before
    w.sync()
    _crash(w)
    assert scan(tmp_path).torn_path is None  # what was written before the failure stands


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

    lines = to_jsonl(generate(40_000, accounts=50, instruments=500, universe=30,
                              live_target=2000, seed=11)).splitlines(keepends=True)
    halves = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    halves[0].write_bytes(b"".join(lines[:20_000]))
    halves[1].write_bytes(b"".join(lines[20_000:]))
    data = tmp_path / "data"
    extra = ("segment_mb = 1\n[snapshot]\nevery_events = 10000\nevery_s = 0\nkeep = 2\n"
             'journal = "delete"\n[day]\nkeep_days = 0\n')  # by snapshots only: no rolls

    def journal_starts() -> int:
        return min(int(p.name[8:28]) for p in data.glob("journal-*.seg"))

    n = LocalNode(tmp_path, data_dir=data, extra=extra)
    try:
        # A snapshot is taken once 10,000 events are journaled past the last one (a late
        # one where the stream is): after the first half, one at 10,000..20,000, which
        # covers the first 1 MiB segment (about 8,190 records); after the second, one
        # past 30,000, and the older kept one's segments are deleted.
        assert n.cli("send", str(halves[0]), "--rate", "20000").returncode == 0
        wait_for(lambda: snapshots(data), 60, "a snapshot of the first half", n, step=0.2)
        assert n.cli("send", str(halves[1]), "--rate", "20000",
                     "--session", "2").returncode == 0
        wait_for(lambda: snapshots(data)[-1][0] > 30_000 and journal_starts() > 1, 60,
                 "a snapshot past 30,000 and the first journal segment deleted", n,
                 step=0.2)
        before = n.dump()
    finally:
        n.stop()
    snaps = snapshots(data)
    assert len(snaps) == 2, n.log.read_text()
    assert journal_starts() > 1  # segments covered by the older snapshot were deleted
    n = LocalNode(tmp_path, data_dir=data, extra=extra)
    try:
        assert compare_documents(n.dump(), before) == []
    finally:
        n.stop()
    assert f"loaded snapshot at gseq {snaps[-1][0]}" in n.log.read_text()
    assert snapshots(data) == snaps  # under 10,000 events past the newest: none more
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
