"""The FIX gateway's inbound journal (exposure/fix/journal.py), without processes: records
appended and read back, one group commit per sync, a torn tail cut, prewritten zeros as the
end of the data, checkpoints whole or absent, trimming, and corruption that is an error
naming the file and the byte offset."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import exposure.fix.journal as FJ
from exposure.fix.journal import (
    K_HEADER,
    K_MESSAGE,
    K_REFDATA,
    K_SEQ,
    Journal,
    JournalError,
    decode_refdata,
    encode_refdata,
)

SEG = 1 << 16
PRE = 1 << 14


def msg(i: int) -> bytes:
    return b"8=FIX.4.4\x0135=8\x0134=%d\x0117=E%d\x01" % (i, i) + b"x" * (i % 50)


def fill(j: Journal, n: int, first: int = 1, every: int = 10) -> None:
    for i in range(first, first + n):
        j.append(K_MESSAGE, "FIX.4.4:EXPOSURE->BROKER1", i, msg(i))
        if i % every == 0:
            j.sync()
    j.sync()


def seqs(j: Journal, start: int = 0) -> list[int]:
    return [r.seq for r in j.records(start)]


def data_end(path: Path) -> int:
    """Where the records of a segment end (the first zero header, else its size)."""
    data = path.read_bytes()
    pos = 0
    while pos + 8 <= len(data) and data[pos:pos + 8] != bytes(8):
        pos += 8 + int.from_bytes(data[pos:pos + 4], "little")
    return pos


def test_appended_records_are_read_back_in_order_with_their_fields(tmp_path):
    j = Journal.open(tmp_path)
    assert j.append(K_HEADER, "", 41) == 0
    assert j.append(K_MESSAGE, "S1", 7, b"8=FIX\x01") == 1
    assert j.append(K_SEQ, "S1", 9) == 2
    body = encode_refdata(b"symbol,instrument\n", b"name,account\n")
    assert j.append(K_REFDATA, "", 0, body) == 3
    assert j.buffered == 4 and j.durable_index == 0
    assert j.sync() == 4 and j.buffered == 0
    recs = list(j.records())
    assert [(r.index, r.kind, r.session, r.seq) for r in recs] == [
        (0, b"H", "", 41), (1, b"M", "S1", 7), (2, b"N", "S1", 9), (3, b"D", "", 0)]
    assert recs[1].body == b"8=FIX\x01"
    assert decode_refdata(recs[3].body) == (b"symbol,instrument\n", b"name,account\n", b"")
    # with the [currencies] table they were read with (SPEC 7; b"": the default table,
    # whose record keeps the first format)
    body = encode_refdata(b"symbol,instrument,currency\n", b"name,account\n", b'{"x":1}')
    assert decode_refdata(body) == (b"symbol,instrument,currency\n", b"name,account\n",
                                    b'{"x":1}')
    assert decode_refdata(encode_refdata(b"", b"a")) == (b"", b"a", b"")
    assert [r.index for r in j.records(2)] == [2, 3]
    j.close()
    again = Journal.open(tmp_path)
    assert again.next_index == again.durable_index == 4
    assert [r.seq for r in again.records()] == [41, 7, 9, 0]
    with pytest.raises(ValueError, match="255 bytes"):
        again.append(K_MESSAGE, "x" * 256, 1)


def test_one_sync_writes_every_record_appended_since_the_last_one(tmp_path):
    j = Journal.open(tmp_path, prewrite=PRE)
    for i in range(1, 101):
        j.append(K_MESSAGE, "S", i, msg(i))
    assert j.sync() == 100 and j.syncs == 1
    assert j.sync() == 100 and j.syncs == 1       # nothing appended: no write, no sync
    j.append(K_MESSAGE, "S", 101, msg(101))
    assert j.sync() == 101 and j.syncs == 2
    assert seqs(j) == list(range(1, 102))


def test_prewritten_zeros_end_the_data_and_a_restart_writes_on_over_them(tmp_path):
    j = Journal.open(tmp_path, segment_bytes=SEG, prewrite=PRE)
    fill(j, 20)
    seg = j.segments[-1].path
    # the file is the data, then zeros written ahead (the sync committed no file size)
    assert seg.stat().st_size == PRE > data_end(seg)
    assert seg.read_bytes()[data_end(seg):] == bytes(PRE - data_end(seg))
    assert seqs(j) == list(range(1, 21))           # a reader stops at the zeros
    # killed: no close; the reopen cuts the zeros (not a torn tail) and writes on
    j2 = Journal.open(tmp_path, segment_bytes=SEG, prewrite=PRE)
    assert j2.torn_bytes == 0 and j2.next_index == 20
    assert seg.stat().st_size == data_end(seg)
    fill(j2, 20, first=21)
    assert seqs(j2) == list(range(1, 41)) and len(j2.segments) == 1
    j2.close()                                     # a close cuts the zeros too
    assert seg.stat().st_size == data_end(seg)


def test_prewrite_zero_is_plain_appends(tmp_path):
    j = Journal.open(tmp_path, prewrite=0)
    fill(j, 10)
    seg = j.segments[-1].path
    assert seg.stat().st_size == data_end(seg)


def test_a_torn_last_record_is_cut_and_the_journal_goes_on(tmp_path):
    j = Journal.open(tmp_path, prewrite=0)
    fill(j, 10)
    seg = j.segments[-1].path
    good = seg.stat().st_size
    whole = FJ.encode_record(K_MESSAGE, "S", 11, msg(11))
    with open(seg, "ab") as f:                     # the sync that had not returned
        f.write(whole[:len(whole) - 5])
    j2 = Journal.open(tmp_path, prewrite=0)
    assert j2.torn_bytes == len(whole) - 5 and j2.next_index == 10
    assert seg.stat().st_size == good
    fill(j2, 1, first=11)
    assert seqs(j2) == list(range(1, 12))


@pytest.mark.parametrize("cut", [3, 8, 20])
def test_a_record_torn_before_the_prewritten_zeros_is_a_torn_tail(tmp_path, cut):
    j = Journal.open(tmp_path, prewrite=PRE)
    fill(j, 10)
    seg = j.segments[-1].path
    end = data_end(seg)
    rec = FJ.encode_record(K_MESSAGE, "S", 11, msg(11))
    with open(seg, "r+b") as f:                    # part of the next record over the zeros
        f.seek(end)
        f.write(rec[:cut])
    j2 = Journal.open(tmp_path, prewrite=PRE)
    assert j2.next_index == 10 and j2.torn_bytes == PRE - end
    assert seg.stat().st_size == end and seqs(j2) == list(range(1, 11))


def test_a_last_record_with_a_bad_checksum_before_the_zeros_is_torn(tmp_path):
    j = Journal.open(tmp_path, prewrite=PRE)
    fill(j, 10)
    seg = j.segments[-1].path
    end = data_end(seg)
    with open(seg, "r+b") as f:                    # the last record's last byte never landed
        f.seek(end - 1)
        f.write(b"\xff")
    j2 = Journal.open(tmp_path, prewrite=PRE)
    assert j2.next_index == 9 and seqs(j2) == list(range(1, 10))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x55]))


def offset_of(path: Path, k: int) -> int:
    """The byte offset of the k-th record of a segment."""
    data = path.read_bytes()
    pos = 0
    for _ in range(k):
        pos += 8 + int.from_bytes(data[pos:pos + 4], "little")
    return pos


@pytest.mark.parametrize("prewrite", [0, PRE])
def test_a_corrupt_record_in_the_middle_is_an_error_naming_file_and_offset(tmp_path,
                                                                           prewrite):
    j = Journal.open(tmp_path, prewrite=prewrite)
    fill(j, 10)
    j.close()
    seg = j.segments[-1].path
    at = offset_of(seg, 4)
    flip(seg, at + 20)                             # inside record 4's payload
    with pytest.raises(JournalError) as e:
        Journal.open(tmp_path, prewrite=prewrite)
    assert str(seg) in str(e.value) and f"byte {at} " in str(e.value)
    assert "record 4" in str(e.value) and "checksum" in str(e.value)


def test_a_corrupt_record_in_an_older_segment_is_an_error_when_read(tmp_path):
    j = Journal.open(tmp_path, segment_bytes=1 << 12, prewrite=PRE)
    fill(j, 200)
    assert len(j.segments) > 2
    old = j.segments[0].path
    at = offset_of(old, 2)
    flip(old, at + 12)
    j.close()
    j2 = Journal.open(tmp_path, segment_bytes=1 << 12, prewrite=PRE)  # (the newest is fine)
    with pytest.raises(JournalError, match=rf"{old.name}: a bad checksum at byte {at} "):
        list(j2.records())


def test_rolled_segments_are_cut_to_their_data_and_zeros_in_one_are_an_error(tmp_path):
    j = Journal.open(tmp_path, segment_bytes=1 << 12, prewrite=PRE)
    fill(j, 200)
    segs = [s.path for s in j.segments]
    assert len(segs) > 2
    for p in segs[:-1]:
        assert p.stat().st_size == data_end(p)
    assert seqs(j) == list(range(1, 201))
    assert [r.index for r in j.records(150)] == list(range(150, 200))
    j.close()
    with open(segs[0], "ab") as f:                 # zeros where only the newest may have them
        f.write(bytes(64))
    j2 = Journal.open(tmp_path, segment_bytes=1 << 12, prewrite=PRE)
    with pytest.raises(JournalError, match=rf"{segs[0].name}: zeros at byte"):
        list(j2.records())


def test_a_full_disk_falls_back_to_room_for_one_commit(tmp_path, monkeypatch):
    j = Journal.open(tmp_path, prewrite=PRE)
    real = os.pwrite
    calls = {"zeros": 0}

    def full(fd, data, offset):  # zeros past the first 1 KiB of the file do not fit
        if not any(data) and offset + len(data) > 1024 and len(data) > 200:
            calls["zeros"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(FJ.os, "pwrite", full)
    fill(j, 3)
    monkeypatch.setattr(FJ.os, "pwrite", real)
    seg = j.segments[-1].path
    assert calls["zeros"] >= 1 and seg.stat().st_size == data_end(seg)
    assert seqs(j) == [1, 2, 3]


def test_checkpoints_are_whole_or_absent_and_trim_keeps_what_is_needed(tmp_path):
    j = Journal.open(tmp_path, segment_bytes=1 << 12, prewrite=PRE)
    fill(j, 100)
    state = {"base": 3, "events": 100, "mappers": {"S": b"\x00" * 10}}
    j.write_checkpoint(60, state)
    j.write_checkpoint(90, {"base": 3, "events": 150})
    assert j.checkpoints == [60, 90] and j.read_checkpoint(60) == state
    # a checkpoint crashed mid-write is a .tmp, removed on open; a damaged one is an error
    (tmp_path / "checkpoint-0000000000000099.tmp").write_bytes(b"half")
    ck = tmp_path / "checkpoint-0000000000000090.ck"
    flip(ck, len(ck.read_bytes()) - 1)
    j.close()
    j = Journal.open(tmp_path, segment_bytes=1 << 12, prewrite=PRE)
    assert not list(tmp_path.glob("*.tmp")) and j.checkpoints == [60, 90]
    with pytest.raises(JournalError, match=rf"{ck.name}: a bad checksum"):
        j.read_checkpoint(90)
    # trimming at 60: older checkpoints and the segments wholly before record 60 go
    before = [s.first for s in j.segments]
    assert j.trim(60) >= 1
    assert j.checkpoints == [60, 90]
    assert all(s.first <= 60 for s in j.segments[:1]) and j.segments[0].first > 0
    assert [s.first for s in j.segments] == [f for f in before if f >= j.segments[0].first]
    assert [r.index for r in j.records(60)] == list(range(60, 100))
    with pytest.raises(JournalError, match="trimmed past it"):
        list(j.records(0))
    j.trim(90)
    assert j.checkpoints == [90]
    assert [r.seq for r in j.records(90)] == list(range(91, 101))
