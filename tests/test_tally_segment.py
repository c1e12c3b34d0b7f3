"""The tally segment and the desk reader: real shared memory, a real second process."""

import os
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
from support import DATA, load_expected

from exposure.core.capacity import Capacities
from exposure.core.types import INSTRUMENT_ROW_DTYPE, ROW_SIZE, SECTOR_ROW_DTYPE, UPDATE_DTYPE
from exposure.engine.desk import Desk
from exposure.engine.document import compare_documents, document
from exposure.engine.kernel import apply_batch
from exposure.engine.parse import read_events
from exposure.engine.publish import publish_batch, versions
from exposure.engine.replay import replay_records
from exposure.shm.seqlock import write_begin, write_end
from exposure.shm.tally_segment import SegmentBusy, TallySegment

# The SPEC's id ranges (the scenarios use them), small order and cell tables.
SMALL = Capacities(orders=4096, cells=8192)


@pytest.fixture
def node_name():
    name = f"test{os.getpid()}{uuid.uuid4().hex[:6]}"
    yield name
    path = f"/dev/shm/exposure.{name}.tally"
    if os.path.exists(path):
        os.unlink(path)


def _apply(seg, recs, batch=64):
    """Apply and publish as the compute stage does (exposure.engine.publish.publish_batch)."""
    st = seg.state
    status = np.zeros(len(recs), np.uint8)
    recs = recs.copy()
    recs["gseq"] = np.arange(1, len(recs) + 1)
    nrows = st.acc.shape[0] + 1 + st.inst.shape[0] + st.sec.shape[0]
    flat = np.zeros(nrows * ROW_SIZE // 8, np.uint64)
    views = (flat.view(UPDATE_DTYPE), flat.view(INSTRUMENT_ROW_DTYPE),
             flat.view(SECTOR_ROW_DTYPE))
    for lo in range(0, len(recs), batch):
        r = recs[lo:lo + batch]
        write_begin(seg.words)
        apply_batch(st, r, status[lo:lo + batch])
        write_end(seg.words)
        publish_batch(st, *versions(st).args(), r, len(r), *views, 0)


def test_a_desk_reads_the_same_document_as_replay_and_cannot_write(node_name):
    recs = read_events(DATA / "mixed-1000.jsonl")
    with TallySegment.create(f"/exposure.{node_name}.tally", SMALL) as seg:
        assert oct(os.stat(f"/dev/shm/exposure.{node_name}.tally").st_mode & 0o777) == "0o600"
        _apply(seg, recs)
        with Desk(node_name) as desk:
            doc = desk.document()
            assert compare_documents(doc, load_expected("mixed-1000")) == []
            assert compare_documents(doc, document(replay_records(recs, SMALL))) == []
            f = desk.fund()
            assert f["gseq"] == len(recs)
            assert f["gross"] == pytest.approx(doc["fund"]["gross"])
            rows = desk.accounts()
            assert sorted(rows["account"].tolist()) == [a["account"] for a in doc["accounts"]]
            by_id = {a["account"]: a for a in doc["accounts"]}
            for r in rows:
                for k in ("gross", "net", "worst_gross", "pnl", "live_orders", "breach"):
                    assert r[k] == pytest.approx(by_id[int(r["account"])][k]), k
            with pytest.raises(ValueError, match="read-only"):
                desk.segment.state.acc[0, 0, 0] = 1.0
    assert not os.path.exists(f"/dev/shm/exposure.{node_name}.tally")


@pytest.mark.process
def test_a_live_writer_keeps_its_segment_and_a_dead_ones_is_reclaimed(node_name):
    name = f"/exposure.{node_name}.tally"
    with TallySegment.create(name, SMALL):
        code = f"from exposure.shm.tally_segment import TallySegment as T; T.create({name!r})"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
        assert p.returncode != 0 and b"another node of this name is running" in p.stderr
    # A writer that died without unlinking: the next node reclaims the segment.
    code = (f"import os; from exposure.shm.tally_segment import TallySegment as T; "
            f"T.create({name!r}); os._exit(0)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert os.path.exists(f"/dev/shm/exposure.{node_name}.tally")
    with TallySegment.create(name, SMALL) as seg:
        assert seg.state.ctr[0] == 0


def test_missing_segment_is_a_clear_error(node_name):
    with pytest.raises(FileNotFoundError, match="is the node running"):
        Desk(node_name)
    with pytest.raises(SegmentBusy):
        with TallySegment.create(f"/exposure.{node_name}.tally", SMALL):
            code = ("from exposure.shm.tally_segment import TallySegment as T, SegmentBusy\n"
                    "raise SegmentBusy('x')")
            raise SegmentBusy(code)


def test_copy_rows_copies_a_row_again_while_it_is_being_written():
    """The numpy row copy (what desks and `exposure dump` read with, no numba) gives a row
    only once its version is even and did not move: a row whose writer is mid-row (odd
    version) is copied again, alone, until the writer finished it."""
    import threading

    from exposure.core.types import PUBROW_DTYPE
    from exposure.shm.tally_segment import copy_rows

    t = np.zeros(8, PUBROW_DTYPE)
    t["gseq"] = np.arange(1, 9)
    t["ver"] = 2
    t["ver"][3] = 3  # being written: half its new values stored
    t["long_mv"][3] = 5.0

    def finish() -> None:
        time.sleep(0.05)
        t["short_mv"][3] = 2.0
        t["ver"][3] = 4

    th = threading.Thread(target=finish)
    th.start()
    rows = copy_rows(t, np.arange(8))
    th.join()
    assert rows["ver"][3] == 4 and (rows["long_mv"][3], rows["short_mv"][3]) == (5.0, 2.0)
    assert np.array_equal(rows["gseq"], np.arange(1, 9)) and rows.dtype == PUBROW_DTYPE
    assert np.array_equal(copy_rows(t), t) and np.array_equal(copy_rows(t, [7, 0]), t[[7, 0]])


@pytest.mark.process
@pytest.mark.timeout(300)
def test_a_reader_hammering_snapshots_never_sees_a_torn_batch(node_name):
    """A writer process applies and publishes batches as fast as it can for 3 seconds; the
    reader keeps reading every published row and checks gross = long_mv + short_mv and
    net = long_mv - short_mv in each (a row read half before and half after a batch breaks
    them), and that it kept up with the writer (it saw many different versions)."""
    name = f"/exposure.{node_name}.tally"
    writer = textwrap.dedent(f"""
        import sys, time, numpy as np
        from exposure.core.capacity import Capacities
        from exposure.engine.kernel import apply_batch
        from exposure.engine.publish import publish
        from exposure.shm.seqlock import write_begin, write_end
        from exposure.shm.tally_segment import TallySegment
        from exposure.bench.flowgen import generate
        recs = generate(300_000, accounts=200, instruments=3000, universe=50,
                        live_target=3000, seed=9)
        seg = TallySegment.create({name!r}, Capacities(**{SMALL.as_dict()!r}))
        status = np.zeros(len(recs), np.uint8)
        write_begin(seg.words)  # compile every jitted call before the reader's window
        apply_batch(seg.state, recs[:0], status[:0])
        write_end(seg.words)
        publish(seg.state, seg.state.pub["ver"], 0)
        print("ready", flush=True)
        sys.stdin.readline()
        t_end = time.perf_counter() + 3.0
        while time.perf_counter() < t_end:  # the day again and again, for 3 seconds
            for lo in range(0, len(recs), 256):
                write_begin(seg.words)
                apply_batch(seg.state, recs[lo:lo + 256], status[lo:lo + 256])
                write_end(seg.words)
                publish(seg.state, seg.state.pub["ver"], lo)
        print("done", flush=True)
        sys.stdin.readline()
        seg.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", writer], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        desk = Desk(node_name)
        desk.accounts()  # compile the reader's side before the writer starts
        p.stdin.write("go\n")
        p.stdin.flush()
        checked, seen = 0, set()
        t_end = time.perf_counter() + 2.5
        while time.perf_counter() < t_end:
            rows = desk.accounts()
            assert np.array_equal(rows["gross"], rows["long_mv"] + rows["short_mv"])
            assert np.array_equal(rows["net"], rows["long_mv"] - rows["short_mv"])
            seen.add(desk.fund()["gseq"])
            checked += 1
        print(f"{checked} snapshots, {len(seen)} distinct fund versions")
        assert checked > 100 and len(seen) > 50
        desk.close()
    finally:
        if p.poll() is None:
            p.stdin.write("bye\n")
            p.stdin.flush()
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


_PROBE = """
import mmap, os, sys
path = sys.argv[1]
for flags, prot, what in ((os.O_RDONLY, mmap.PROT_READ, "read"),
                          (os.O_RDWR, mmap.PROT_READ | mmap.PROT_WRITE, "write")):
    try:
        fd = os.open(path, flags)
        mmap.mmap(fd, 4096, mmap.MAP_SHARED, prot).close()
        os.close(fd)
        print(what, "yes")
    except PermissionError:
        print(what, "no")
"""


def _as(uid: int, gid: int, path: str) -> list[str]:
    """What a process of ``uid``/``gid`` (no other groups) may do with ``path``: the OS's
    answer (shm_open is open(2) under /dev/shm)."""
    p = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                        "/usr/bin/python3", "-c", _PROBE, path],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout.split("\n")[:2]


@pytest.mark.process
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/setpriv")
                    or not os.path.exists("/usr/bin/python3"),
                    reason="needs root, setpriv and /usr/bin/python3 to act as other users")
def test_the_os_lets_the_desks_group_read_the_segment_and_nobody_else_write_it(node_name):
    import grp

    gid = grp.getgrnam("nogroup").gr_gid
    seg = TallySegment.create(f"/exposure.{node_name}.tally", SMALL, mode=0o640,
                              group="nogroup")
    try:
        path = f"/dev/shm/exposure.{node_name}.tally"
        assert _as(65534, gid, path) == ["read yes", "write no"]     # a desk (the group)
        assert _as(65534, gid - 1, path) == ["read no", "write no"]  # anyone else
    finally:
        seg.close()
