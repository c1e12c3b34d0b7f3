"""A snapshot written by the previous tally layout (version 2: before the feed's tables)
loads into the current one, so a node that is upgraded recovers without the journal its
snapshot covered. tests/data/snapshot-v2 was written by the version-2 code (commit
4715bd2) from events.jsonl beside it."""

import shutil
import struct

import crc32c
import numpy as np
import pytest
from support import DATA

from exposure.core.capacity import Capacities
from exposure.engine.desk import Desk
from exposure.engine.document import compare_documents, document
from exposure.engine.kernel import apply_batch
from exposure.engine.parse import read_events, records_from_objects
from exposure.engine.publish import publish_all, versions
from exposure.engine.replay import replay_records
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_layout import HEADER_DTYPE, HEADER_SIZE, MAGIC, allocate
from exposure.shm.tally_migrate import OLD_VERSIONS, migrate
from exposure.store.snapshot import SNAP_HEADER, SnapshotError, load_snapshot, snapshots

pytestmark = pytest.mark.timeout(120)

CAPS = Capacities(accounts=16, instruments=64, sectors=64, orders=512, cells=512)
V2 = DATA / "snapshot-v2"


def _load(path):
    buf, st = allocate(CAPS)
    sessions = np.zeros((3, SESSION_COLS), np.uint64)
    return load_snapshot(path, buf, sessions), st, sessions


def test_a_version_2_snapshot_is_migrated_into_the_current_layout():
    (_, path), = snapshots(V2)
    g, st, sessions = _load(path)
    recs = read_events(V2 / "events.jsonl")
    assert g == len(recs) and int(sessions[1, 1]) == len(recs)
    want = document(replay_records(recs, CAPS))
    assert compare_documents(document(st), want) == []
    publish_all(st, versions(st), g)  # what recovery does next
    assert compare_documents(Desk.over(st).document(), want) == []
    moved = (st.inst["head"] >= 0) | (st.inst["ref_price"] != 0)
    assert moved.any() and (st.inst["gseq"][moved] == g).all()  # listed by the feed


def test_a_snapshot_of_a_layout_version_nobody_knows_is_refused(tmp_path):
    (_, path), = snapshots(V2)
    bad = tmp_path / path.name
    shutil.copy(path, bad)
    data = bytearray(bad.read_bytes())
    struct.pack_into("<Q", data, 64 + 8, 99)  # the state header's layout version
    head = SNAP_HEADER.unpack_from(data)
    body_crc = crc32c.crc32c(bytes(data[64:]))
    SNAP_HEADER.pack_into(data, 0, *head[:7], body_crc, 0)
    SNAP_HEADER.pack_into(data, 0, *head[:7], body_crc,
                          crc32c.crc32c(bytes(data[:SNAP_HEADER.size - 4])))
    bad.write_bytes(bytes(data))
    assert HEADER_SIZE == 256
    with pytest.raises(SnapshotError, match="layout version 99"):
        _load(bad)


def test_a_version_3_snapshot_is_migrated_into_the_base_currency():
    """tests/data/snapshot-v3 was written by the version-3 code (commit fb6294b, before
    SPEC section 7) from snapshot-v2/events.jsonl: every instrument comes back in the base
    currency at rate 1.0, with its own change tags, and the currencies work after it."""
    (_, path), = snapshots(DATA / "snapshot-v3")
    g, st, _ = _load(path)
    recs = read_events(V2 / "events.jsonl")
    whole = replay_records(recs, CAPS)
    assert g == len(recs) and compare_documents(document(st), document(whole)) == []
    assert (st.inst["currency"] == 0).all() and (st.inst["cnext"] == -1).all()
    assert (st.rate == 1.0).all() and (st.cur_head == -1).all() and (st.cprev == -1).all()
    assert np.array_equal(st.inst["gseq"], whole.inst["gseq"])  # not the snapshot's gseq
    more = records_from_objects([
        {"type": "instrument", "instrument": 3, "multiplier": 1.0, "margin_rate": 0.1,
         "beta": 1.0, "sector": 0, "currency": 2}, {"type": "fx", "currency": 2, "rate": 0.5}])
    more["gseq"] = [g + 1, g + 2]
    apply_batch(st, more, np.zeros(2, np.uint8))
    whole = replay_records(np.concatenate([recs, more]), CAPS)
    assert compare_documents(document(st), document(whole)) == []


def test_a_version_4_state_migrates_and_recovery_publishes_the_cells_p_and_l_terms():
    """A version-4 state (its published position rows 64 bytes, without sod_qty, sod_price
    and flow), laid out as that code did (the header, then each table on a 4 KiB
    boundary), migrates field by field; publish_all (what recovery does next) writes the
    cells' P&L terms that the feed's position rows now carry."""
    recs = records_from_objects(
        [{"type": "instrument", "instrument": i, "multiplier": 2.0, "margin_rate": 0.1,
          "beta": 1.0, "sector": 1} for i in (1, 2)]
        + [{"type": "mark", "instrument": 1, "price": 10.5},
           {"type": "position", "account": 3, "instrument": 2, "qty": 70, "price": 4.25}]
        + [{"type": "fill", "source": 0, "order_id": k + 1, "account": k % 5,
            "instrument": 1 + k % 2, "side": "buy" if k % 3 else "sell", "qty": 10 + k,
            "price": 10.0 + k / 8} for k in range(12)]
        + [{"type": "mark", "instrument": 2, "price": 4.75}])
    whole = replay_records(recs, CAPS)
    g = len(recs)
    publish_all(whole, versions(whole), g)
    specs = OLD_VERSIONS[4](CAPS)
    assert dict((n, dt.itemsize) for n, dt, _ in specs)["cpub"] == 64
    offsets, off = {}, HEADER_SIZE
    for name, dt, shape in specs:
        off = -(-off // 4096) * 4096
        offsets[name] = off
        off += dt.itemsize * int(np.prod(shape))
    old = np.zeros(-(-off // 4096) * 4096, np.uint8)
    h = np.ndarray((), HEADER_DTYPE, buffer=old)
    h["magic"], h["version"], h["size"] = MAGIC, 4, len(old)
    for k, v in CAPS.as_dict().items():
        h[k] = v
    h["order_slots"], h["cell_slots"] = CAPS.order_slots, CAPS.cell_slots
    for name, dt, shape in specs:
        t = np.ndarray(shape, dt, buffer=old, offset=offsets[name])
        src = getattr(whole, name)
        for f in dt.names or ():
            t[f] = src[f]
        if dt.names is None:
            t[...] = src
    _, st = allocate(CAPS)
    migrate(old, st, g)
    publish_all(st, versions(st), g)
    assert compare_documents(document(st), document(whole)) == []
    for f in ("account", "instrument", "pos", "sod_qty", "sod_price", "flow", "pnl", "mv"):
        assert np.array_equal(st.cpub[f], whole.cpub[f]), f
    assert whole.cpub["flow"].any() and whole.cpub["sod_qty"].any()  # (not all zeros)
