"""The journal's page-cache window: what is more than ``keep`` bytes behind the newest
synced byte leaves the page cache (read from the kernel with mincore), oldest first and
across segments, and the journal reads back whole."""

import ctypes
import logging
import mmap
import os

import numpy as np
import pytest

from exposure.core.types import EVENT_DTYPE, EVENT_WORDS
from exposure.store.dropbehind import ALIGN, DropBehind
from exposure.store.journal import JournalWriter, read_blocks, scan

pytestmark = pytest.mark.timeout(60)

_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE
MiB = 1 << 20


def _resident(path, lo: int = 0, hi: int | None = None) -> int:
    """Bytes of ``path`` in ``[lo, hi)`` (whole pages) that are in the page cache."""
    size = os.path.getsize(path)
    hi = size if hi is None else hi
    pages = -(-size // _PAGE)
    vec = (ctypes.c_ubyte * pages)()
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # never written: the file's
        try:                                                      # own pages
            head = ctypes.c_char.from_buffer(m)
            rc = _libc.mincore(ctypes.c_void_p(ctypes.addressof(head)), ctypes.c_size_t(size),
                               vec)
            del head
            if rc != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            m.close()
    res = np.frombuffer(bytes(vec), np.uint8) & 1
    return int(res[lo // _PAGE:-(-hi // _PAGE)].sum()) * _PAGE


def _written(path, n: int) -> int:
    """A file of ``n`` bytes, written and synced; its fd (open for writing)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, os.urandom(n))
    os.fdatasync(fd)
    return fd


@pytest.fixture
def page_cache(tmp_path):
    """Skip where the filesystem keeps written pages whatever the advice (tmpfs)."""
    probe = tmp_path / "probe"
    fd = _written(probe, MiB)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    if _resident(probe) > MiB // 2:
        pytest.skip("this filesystem keeps written pages in memory whatever the advice")
    probe.unlink()


@pytest.mark.usefixtures("page_cache")
def test_what_lies_more_than_keep_behind_leaves_the_cache_oldest_first_across_segments(
        tmp_path):
    db = DropBehind(keep=2 * MiB, step=MiB)
    a, b = tmp_path / "a.seg", tmp_path / "b.seg"
    fa = _written(a, 8 * MiB)
    db.synced(fa, 8 * MiB)             # 6 MiB behind the window: dropped
    assert _resident(a, 0, 6 * MiB) == 0 and _resident(a, 6 * MiB) == 2 * MiB
    os.close(fa)
    db.rolled(a, 8 * MiB)
    fb = _written(b, MiB)
    db.synced(fb, MiB)                 # 1 MiB over, but no whole 2 MiB: nothing yet
    assert _resident(a, 6 * MiB) == 2 * MiB and db.dropped == 6 * MiB
    os.write(fb, os.urandom(4 * MiB))
    os.fdatasync(fb)
    db.synced(fb, 5 * MiB)             # the rest of a, then b's oldest whole 2 MiB
    assert _resident(a) == 0
    assert _resident(b, 0, 2 * MiB) == 0 and _resident(b, 2 * MiB) == 3 * MiB
    assert db.dropped == 10 * MiB
    os.close(fb)


def test_a_removed_segment_and_a_refusing_file_cost_nothing_but_the_advice(tmp_path, caplog):
    db = DropBehind(keep=0, step=1)
    db.rolled(tmp_path / "gone.seg", MiB)  # removed by the retention meanwhile
    r, w = os.pipe()
    try:
        with caplog.at_level(logging.WARNING, "exposure.store.dropbehind"):
            db.synced(r, MiB)              # a pipe refuses the advice (ESPIPE)
            db.synced(r, 2 * MiB)          # and is not asked again
    finally:
        os.close(r)
        os.close(w)
    assert [rec.message.count("refused") for rec in caplog.records] == [1]


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="keep=-1"):
        DropBehind(keep=-1)
    with pytest.raises(ValueError, match="step=0"):
        DropBehind(keep=0, step=0)


@pytest.mark.usefixtures("page_cache")
def test_a_journal_with_a_window_keeps_its_newest_bytes_cached_and_reads_back_whole(
        tmp_path):
    w = JournalWriter(tmp_path, segment_bytes=4 * MiB, cache_bytes=2 * MiB)
    w.cache.step = MiB
    g, per = 1, 512
    for _ in range(160):               # 160 blocks of 64 KiB: 10 MiB over 3 segments
        r = np.zeros(per, EVENT_DTYPE)
        r["gseq"] = np.arange(g, g + per)
        g += per
        w.append(r.view(np.uint64).reshape(per, EVENT_WORDS))
        w.sync()
    w.close()
    segs = sorted(tmp_path.glob("journal-*.seg"))
    held = sum(_resident(p) for p in segs)
    assert len(segs) == 3 and w.cache.dropped >= 5 * MiB
    assert 2 * MiB - (64 << 10) <= held <= 2 * MiB + MiB + ALIGN
    assert _resident(segs[-1], os.path.getsize(segs[-1]) - (256 << 10)) >= 256 << 10
    res = scan(tmp_path)
    assert res.records == g - 1
    gseqs = np.concatenate([b.records["gseq"] for b in read_blocks(tmp_path)])
    assert gseqs.tolist() == list(range(1, g))
