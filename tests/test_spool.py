"""The producer's durable spool (exposure.store.spool): round trips, reopen, torn tails cut,
corruption named, the bound, trimming, the lock, a seeded model of append/trim/reopen, and
a kill -9 in the middle of an append loop (the one `process` test)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from exposure.core.types import EVENT_DTYPE, EVENT_SIZE
from exposure.store.spool import (
    BLOCK_HEADER,
    FILE_HEADER,
    Spool,
    SpoolError,
    SpoolFull,
    SpoolLocked,
)

ROOT = Path(__file__).resolve().parents[1]
BLOCK = BLOCK_HEADER.size


def recs(first: int, n: int, session: int = 7) -> np.ndarray:
    """``n`` records from sseq ``first``, their content a function of the sseq."""
    r = np.zeros(n, EVENT_DTYPE)
    s = np.arange(first, first + n, dtype=np.uint64)
    r["sseq"] = s
    r["session"] = session
    r["order_id"] = s * 7 + 3
    r["qty"] = (s % 1000).astype(np.int64) - 500
    r["price"] = s.astype(np.float64) / 8
    r["type"] = 1 + s % 3
    return r


def check(rows: np.ndarray, first: int, last: int) -> None:
    """``rows`` are exactly the records ``first..last`` as :func:`recs` makes them."""
    assert len(rows) == max(0, last - first + 1), (len(rows), first, last)
    if len(rows):
        assert rows.tobytes() == recs(first, last - first + 1, int(rows["session"][0])).tobytes()


def segs(d: Path) -> list[Path]:
    return sorted(d.glob("spool-*.seg"))


def disk_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in segs(d))


def test_append_pending_trim_round_trip(tmp_path):
    with Spool(tmp_path, session=7) as s:
        assert (s.last_seq, s.acked_seq, s.bytes_held) == (0, 0, 0)
        assert len(s.pending(0)) == 0
        s.append(recs(1, 1))
        s.append(recs(2, 64))
        s.append(recs(66, 1024))
        assert s.last_seq == 1089 and s.unacked == 1089
        assert s.bytes_held == FILE_HEADER.size + 3 * BLOCK + 1089 * EVENT_SIZE == disk_bytes(
            tmp_path)
        check(s.pending(0), 1, 1089)
        check(s.pending(30), 31, 1089)
        check(s.pending(30, limit=100), 31, 130)
        check(s.pending(1088), 1089, 1089)
        assert len(s.pending(1089)) == 0 and len(s.pending(5000)) == 0
        s.trim(500)
        assert s.acked_seq == 500
        check(s.pending(0), 501, 1089)
        check(s.pending(700), 701, 1089)
        s.trim(400)  # an older acknowledgement changes nothing
        assert s.acked_seq == 500
        s.append(recs(1090, 5))  # a record (np.void) alone, too
        s.append(recs(1095, 1)[0])
        check(s.pending(0), 501, 1095)


def test_append_refuses_what_is_not_next(tmp_path):
    with Spool(tmp_path) as s:
        s.append(recs(1, 3))
        size = disk_bytes(tmp_path)
        for bad in (recs(5, 2), recs(3, 2), np.concatenate([recs(4, 2), recs(7, 1)])):
            with pytest.raises(ValueError, match="not consecutive after last_seq 3"):
                s.append(bad)
        with pytest.raises(TypeError, match="not EVENT_DTYPE"):
            s.append(np.zeros(3, np.uint64))
        s.append(recs(4, 0))  # nothing to do
        assert s.last_seq == 3 and disk_bytes(tmp_path) == size


def test_reopen_after_close(tmp_path):
    with Spool(tmp_path, session=7, segment_bytes=4096) as s:
        for k in range(40):
            s.append(recs(s.last_seq + 1, 1 + k % 7))
        s.trim(77)
        last, held = s.last_seq, s.bytes_held
    assert len(segs(tmp_path)) > 3
    with Spool(tmp_path, session=7, segment_bytes=4096) as s:
        assert (s.last_seq, s.acked_seq, s.bytes_held, s.session) == (last, 77, held, 7)
        check(s.pending(0), 78, last)
        s.append(recs(last + 1, 10))
    with Spool(tmp_path) as s:  # session None: the spool's own
        assert s.session == 7 and s.last_seq == last + 10
        check(s.pending(0), 78, last + 10)
    with pytest.raises(SpoolError, match="a segment of session 7, this spool is opened for "
                                         "session 8"):
        Spool(tmp_path, session=8)


def _last_block_offset(path: Path) -> int:
    """The offset of the last block of a segment (walking its headers)."""
    data = path.read_bytes()
    off, last = FILE_HEADER.size, None
    while off < len(data):
        last = off
        off += BLOCK + BLOCK_HEADER.unpack_from(data, off)[1] * EVENT_SIZE
    assert last is not None
    return last


@pytest.mark.parametrize("damage", ["mid_record", "mid_block_header", "flip_last_record",
                                    "flip_block_header", "zeros_tail"])
def test_torn_tail_is_cut(tmp_path, damage, caplog):
    with Spool(tmp_path) as s:
        s.append(recs(1, 10))
        s.append(recs(11, 5))
    seg = segs(tmp_path)[-1]
    size = seg.stat().st_size
    start = _last_block_offset(seg)
    with open(seg, "r+b") as f:
        if damage == "mid_record":
            f.truncate(size - EVENT_SIZE // 2)
        elif damage == "mid_block_header":
            f.truncate(start + 10)
        elif damage == "flip_last_record":
            f.seek(size - 40)
            b = f.read(1)
            f.seek(size - 40)
            f.write(bytes([b[0] ^ 0xFF]))
        elif damage == "flip_block_header":
            f.seek(start + 9)
            f.write(b"\x7f")
        else:  # a power cut: the file's length grew, its data never came
            f.seek(size)
            f.write(b"\0" * 3000)
    keep, end = (15, size) if damage == "zeros_tail" else (10, start)
    with Spool(tmp_path) as s:
        assert s.last_seq == keep and s.bytes_held == end == seg.stat().st_size
        check(s.pending(0), 1, keep)
        s.append(recs(keep + 1, 3))
    assert "cut a torn tail off" in caplog.text
    with Spool(tmp_path) as s:
        check(s.pending(0), 1, keep + 3)


def test_a_segment_cut_in_its_header_is_removed(tmp_path):
    with Spool(tmp_path, segment_bytes=2048) as s:
        for _ in range(6):
            s.append(recs(s.last_seq + 1, 3))
        last = s.last_seq
    # a crash while the next segment was being created
    (tmp_path / f"spool-{last + 1:020d}.seg").write_bytes(b"EXSPOOL\x01\x01\0")
    with Spool(tmp_path, segment_bytes=2048) as s:
        assert s.last_seq == last
        check(s.pending(0), 1, last)
        s.append(recs(last + 1, 2))
        check(s.pending(0), 1, last + 2)


def _flip(path: Path, off: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x01]))


def test_corruption_in_the_middle_is_an_error(tmp_path):
    with Spool(tmp_path, segment_bytes=4096) as s:
        for _ in range(20):
            s.append(recs(s.last_seq + 1, 4))
    files = segs(tmp_path)
    assert len(files) >= 3
    last = files[-1]
    # a bad record with valid blocks after it, in the last segment
    _flip(last, FILE_HEADER.size + BLOCK + 5)
    with pytest.raises(SpoolError, match=rf"{last}: offset {FILE_HEADER.size}: block payload "
                                         r"checksum fails \(valid data follows"):
        Spool(tmp_path)
    _flip(last, FILE_HEADER.size + BLOCK + 5)
    # the last block of a segment that is not the last one
    mid = files[1]
    off = _last_block_offset(mid)
    _flip(mid, mid.stat().st_size - 3)
    with pytest.raises(SpoolError, match=rf"{mid}: offset {off}: block payload checksum fails"):
        Spool(tmp_path)
    _flip(mid, mid.stat().st_size - 3)
    # a file header
    _flip(mid, 20)
    with pytest.raises(SpoolError, match=rf"{mid}: offset 0: file header checksum fails"):
        Spool(tmp_path)
    _flip(mid, 20)
    # a segment missing from the middle
    data = mid.read_bytes()
    mid.unlink()
    with pytest.raises(SpoolError, match=r"offset 0: starts at sseq \d+, expected \d+ \(a "
                                         "segment is missing\\)"):
        Spool(tmp_path)
    mid.write_bytes(data)
    # a foreign file
    (tmp_path / "spool-x.seg").write_bytes(b"")
    with pytest.raises(SpoolError, match="not a spool segment name"):
        Spool(tmp_path)
    (tmp_path / "spool-x.seg").unlink()
    with Spool(tmp_path) as s:
        check(s.pending(0), 1, 80)


def test_corruption_found_by_pending_names_the_file(tmp_path):
    with Spool(tmp_path) as s:
        s.append(recs(1, 4))
        s.append(recs(5, 4))
        seg = segs(tmp_path)[-1]
        _flip(seg, FILE_HEADER.size + BLOCK + 100)
        with pytest.raises(SpoolError, match=rf"{seg}: offset {FILE_HEADER.size}: block "
                                             "payload checksum fails"):
            s.pending(0)


def test_spool_full_writes_nothing(tmp_path):
    one = BLOCK + 10 * EVENT_SIZE
    bound = FILE_HEADER.size + 3 * one + 100
    with Spool(tmp_path, max_bytes=bound, segment_bytes=1 << 20) as s:
        for k in range(3):
            s.append(recs(10 * k + 1, 10))
        before = sorted((p.name, p.read_bytes()) for p in segs(tmp_path))
        with pytest.raises(SpoolFull) as e:
            s.append(recs(31, 10))
        msg = str(e.value)
        assert str(tmp_path) in msg and f"max_bytes={bound}" in msg
        assert f"{s.bytes_held} bytes held" in msg and "30 record(s) not acknowledged" in msg
        assert s.last_seq == 30 and sorted((p.name, p.read_bytes())
                                           for p in segs(tmp_path)) == before
        with pytest.raises(SpoolFull):  # a batch larger than the whole bound
            s.append(recs(31, bound // EVENT_SIZE))
        s.trim(20)  # the newest segment is still partly unacknowledged: no room
        with pytest.raises(SpoolFull):
            s.append(recs(31, 10))
        s.trim(30)  # now its space can go: a new segment takes its place
        s.append(recs(31, 10))
        assert s.bytes_held == FILE_HEADER.size + one == disk_bytes(tmp_path)
        check(s.pending(0), 31, 40)
    with Spool(tmp_path) as s:
        assert (s.last_seq, s.acked_seq) == (40, 30)


def test_trim_deletes_whole_segments(tmp_path):
    with Spool(tmp_path, segment_bytes=4096) as s:
        for _ in range(20):
            s.append(recs(s.last_seq + 1, 5))
        firsts = [int(p.name[6:26]) for p in segs(tmp_path)]
        assert len(firsts) >= 4
        s.trim(firsts[2] - 1)  # the first two segments, exactly
        assert [int(p.name[6:26]) for p in segs(tmp_path)] == firsts[2:]
        assert s.bytes_held == disk_bytes(tmp_path)
        s.trim(firsts[3])  # into the fourth: the third goes
        assert [int(p.name[6:26]) for p in segs(tmp_path)] == firsts[3:]
        check(s.pending(0), firsts[3] + 1, 100)
        s.trim(100)  # everything: the newest segment stays (it says where sseq is)
        assert len(segs(tmp_path)) == 1 and len(s.pending(0)) == 0
    with Spool(tmp_path, segment_bytes=4096) as s:
        assert (s.last_seq, s.acked_seq) == (100, 100)
        s.append(recs(101, 1))


def test_trim_past_last_seq_moves_it_on(tmp_path):
    with Spool(tmp_path) as s:
        s.append(recs(1, 3))
        s.trim(1000)  # the node holds more of this session than this spool
        assert (s.last_seq, s.acked_seq) == (1000, 1000)
        with pytest.raises(ValueError):
            s.append(recs(4, 1))
        s.append(recs(1001, 2))
    assert [p.name for p in segs(tmp_path)] == [f"spool-{1001:020d}.seg"]
    with Spool(tmp_path) as s:
        assert (s.last_seq, s.acked_seq) == (1002, 1000)
        check(s.pending(0), 1001, 1002)


def test_acked_mark_survives_a_bad_slot(tmp_path):
    with Spool(tmp_path) as s:
        s.append(recs(1, 10))
        s.trim(4)
        s.trim(6)  # the second slot
    with open(tmp_path / "acked", "r+b") as f:
        f.seek(32 + 20)
        f.write(b"\xff")
    with Spool(tmp_path) as s:  # the other slot: an older mark, a little resent
        assert s.acked_seq == 4
        s.trim(8)
    with Spool(tmp_path) as s:
        assert s.acked_seq == 8
    (tmp_path / "acked").write_bytes(b"garbage")
    with Spool(tmp_path) as s:  # no mark at all: everything held is pending
        assert s.acked_seq == 0
        check(s.pending(0), 1, 10)


def test_the_lock(tmp_path):
    s = Spool(tmp_path)
    try:
        with pytest.raises(SpoolLocked, match=rf"spool {tmp_path} is in use by another "
                                              rf"producer \(pid {os.getpid()}\)"):
            Spool(tmp_path)
    finally:
        s.close()
    s.close()  # idempotent
    with pytest.raises(SpoolError, match="is closed"):
        s.append(recs(1, 1))
    with Spool(tmp_path) as s2:
        s2.append(recs(1, 1))


def test_model(tmp_path):
    """Seeded random sequences of append (some refused as full), trim, pending, reopen and
    torn tails against a list: the spool holds exactly what the list does."""
    seed = int(os.environ.get("SPOOL_SEED", random.randrange(1 << 30)))
    print(f"test_model seed {seed} (SPOOL_SEED={seed} reruns it)")
    rng = random.Random(seed)
    for round_ in range(6):
        d = tmp_path / f"r{round_}"
        max_bytes = rng.choice([16 << 10, 48 << 10, 1 << 20])
        seg_bytes = rng.choice([2048, 8192, 1 << 20])
        kw = {"max_bytes": max_bytes, "segment_bytes": seg_bytes, "session": 3}
        s = Spool(d, **kw)
        last = acked = 0
        last_append = 0  # records in the newest block, if it is the file's end
        try:
            for _ in range(300):
                op = rng.random()
                if op < 0.5:
                    n = rng.choice([1, 1, 2, 5, 17, 64, rng.randrange(1, 200)])
                    before = disk_bytes(d)
                    try:
                        s.append(recs(last + 1, n, 3))
                    except SpoolFull:
                        assert disk_bytes(d) == before and s.last_seq == last
                        assert s.bytes_held + FILE_HEADER.size + BLOCK + n * EVENT_SIZE > max_bytes
                        continue
                    last += n
                    last_append = n
                elif op < 0.7:
                    a = rng.randrange(acked, last + 1) if rng.random() < 0.9 else last
                    s.trim(a)
                    acked = max(acked, a)
                elif op < 0.8:
                    s.close()
                    s = Spool(d, **kw)
                elif op < 0.9 and last_append:
                    # a torn tail: the last append had not returned
                    s.close()
                    f = segs(d)[-1]
                    size = f.stat().st_size
                    cut = rng.randrange(1, BLOCK + last_append * EVENT_SIZE)
                    if rng.random() < 0.5:
                        os.truncate(f, size - cut)
                    else:
                        _flip(f, size - cut)
                    s = Spool(d, **kw)
                    last -= last_append
                    if acked > last:  # (acknowledged before the cut: sseq moves on)
                        last = acked
                    last_append = 0
                else:
                    after = rng.randrange(0, last + 2)
                    lim = rng.choice([None, 1, 10, 1000])
                    lo = max(after, acked) + 1
                    hi = last if lim is None else min(last, lo + lim - 1)
                    check(s.pending(after, limit=lim), lo, hi)
                    continue
                assert (s.last_seq, s.acked_seq) == (last, acked), (seed, round_)
                assert s.bytes_held == disk_bytes(d) <= max_bytes
            check(s.pending(0), acked + 1, last)
        finally:
            s.close()


# Each line is one write(2) to the pipe (under PIPE_BUF: atomic), so the kill cannot cut
# one: print() writes its words and the newline one by one where stdout is unbuffered
# (PYTHONUNBUFFERED), and a kill between them left "done" without its seq (seen once).
CHILD = textwrap.dedent("""
    import os, random, sys
    sys.path.insert(0, sys.argv[3])
    from test_spool import recs
    from exposure.store.spool import Spool
    def say(*words):
        os.write(1, (" ".join(map(str, words)) + "\\n").encode())
    s = Spool(sys.argv[1], segment_bytes=64 << 10)
    rng = random.Random(int(sys.argv[2]))
    say("open", s.last_seq, s.acked_seq)
    while True:
        n = rng.choice([1, 3, 64, 200, 1024])
        say("try", s.last_seq + n)
        s.append(recs(s.last_seq + 1, n))
        say("done", s.last_seq)
        if rng.random() < 0.1:
            s.trim(max(s.acked_seq, s.last_seq - 2000))
            say("acked", s.acked_seq)
""")


@pytest.mark.process
def test_kill_9_mid_append_keeps_every_returned_append(tmp_path):
    """A child appends in a loop and says what returned; it is killed with -9 at a random
    moment, four times over the same spool. After each, every sseq whose append returned
    is there, and nothing beyond the one append in flight."""
    seed = int(os.environ.get("SPOOL_SEED", random.randrange(1 << 30)))
    print(f"kill -9 test seed {seed}")
    rng = random.Random(seed)
    d = tmp_path / "spool"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for round_ in range(4):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(d), str(seed + round_),
                              str(ROOT / "tests")], stdout=subprocess.PIPE, text=True,
                             env=env, cwd=ROOT)
        done = tried = acked = 0
        appends = 0
        want = rng.randrange(20, 300)
        try:
            deadline = time.monotonic() + 120
            while appends < want:
                assert time.monotonic() < deadline, "the child appended too slowly"
                line = p.stdout.readline()
                assert line, f"the child ended (rc {p.poll()})"
                word, value, *_ = line.split()
                if word == "try":
                    tried = int(value)
                elif word == "done":
                    done = int(value)
                    appends += 1
                elif word == "acked":
                    acked = int(value)
            os.kill(p.pid, signal.SIGKILL)
            # what it printed after we stopped counting returned too
            rest = p.stdout.read()
            for line in rest.splitlines():
                word, value, *_ = line.split()
                if word == "try":
                    tried = int(value)
                elif word == "done":
                    done = int(value)
                elif word == "acked":
                    acked = int(value)
        finally:
            p.kill()
            p.wait(30)
            p.stdout.close()
        with Spool(d) as s:
            assert done <= s.last_seq <= tried, (seed, round_, done, s.last_seq, tried)
            assert acked <= s.acked_seq <= done
            check(s.pending(0), s.acked_seq + 1, s.last_seq)
