"""Record and table layouts: sizes and offsets are part of the wire and file formats."""

import numpy as np
import pytest

from exposure.core import types as T
from exposure.core.capacity import Capacities, CapacityError
from exposure.shm.tally_layout import HEADER_SIZE, LayoutError, TallyLayout, allocate


def _offsets(dt):
    return {name: dt.fields[name][1] for name in dt.names}


def test_event_record_is_128_bytes_with_documented_offsets():
    assert T.EVENT_SIZE == 128
    assert T.EVENT_DTYPE.isalignedstruct
    assert _offsets(T.EVENT_DTYPE) == {
        "gseq": 0, "sseq": 8, "send_ns": 16, "recv_ns": 24, "session": 32, "source": 36,
        "account": 40, "instrument": 44, "order_id": 48, "qty": 56, "price": 64, "x0": 72,
        "x1": 80, "x2": 88, "x3": 96, "sector": 104, "type": 108, "side": 109, "reject": 110,
        "flags": 111, "epoch": 112, "crc": 116, "reserved": 120,
    }
    for name in T.EVENT_DTYPE.names:
        dt, off = T.EVENT_DTYPE.fields[name][:2]
        assert dt.byteorder in ("<", "|", "="), name
        assert off % dt.itemsize == 0, f"{name} misaligned"


def test_state_rows_fit_cache_lines():
    assert T.CELL_DTYPE.itemsize == 64
    assert T.ORDER_DTYPE.itemsize == 32
    assert T.CELLIDX_DTYPE.itemsize == 16
    assert T.INSTRUMENT_DTYPE.itemsize == 96
    assert _offsets(T.ORDER_DTYPE)["cell"] == 24


def test_type_side_and_reason_codes_round_trip():
    assert {T.TYPE_CODES[n] for n in T.TYPE_NAMES.values()} == set(range(1, T.T_MAX + 1))
    assert T.SIDE_CODES == {"buy": 1, "sell": 2, "short": 3}
    assert list(T.REASONS) == sorted(T.REASONS)  # codes follow the SPEC's precedence
    assert list(T.REASONS.values()) == ["bad_type", "bad_field", "out_of_range",
                                         "duplicate_order", "unknown_order", "fill_mismatch",
                                         "capacity", "wrong_partition"]  # (a cluster's:
    # its code is last, its place in the precedence is after out_of_range)
    assert T.C_REJECTS + max(T.REASONS) < T.C_BCAST_ACCEPTED < T.N_COUNTERS


def test_layout_tables_are_page_aligned_and_disjoint():
    lay = TallyLayout(Capacities(accounts=10, instruments=100, orders=100, cells=100))
    spans = []
    for name, off in lay.offsets.items():
        assert off % 4096 == 0 and off >= HEADER_SIZE
        arr = getattr(lay.views(np.zeros(lay.size, np.uint8), check=False), name)
        spans.append((off, off + arr.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert spans[-1][1] <= lay.size


def test_attaching_with_other_capacities_is_a_clear_error():
    buf, _ = allocate(Capacities(accounts=10, instruments=100, orders=100, cells=100))
    other = TallyLayout(Capacities(accounts=11, instruments=100, orders=100, cells=100))
    with pytest.raises(LayoutError, match="accounts=10 in the buffer, 11 in the config"):
        other.check(buf)
    assert TallyLayout.caps_of(buf).accounts == 10
    with pytest.raises(LayoutError, match="bad magic"):
        TallyLayout().check(np.zeros(TallyLayout().size, np.uint8))


def test_capacity_limits_name_the_bad_value():
    with pytest.raises(CapacityError, match="sources=70000"):
        Capacities(sources=70000)
    with pytest.raises(CapacityError, match="orders=0"):
        Capacities(orders=0)
    with pytest.raises(CapacityError, match="unknown capacity key"):
        Capacities.from_dict({"acounts": 5})
    c = Capacities(orders=1000)
    assert c.order_slots == 2048 and c.cell_slots == 2**21


def test_feed_rows_and_datagram_header_layout():
    from exposure.feed.wire import DGRAM_HEADER, SNAP_HEADER, SNAP_REQUEST
    head = {"kind": 0, "breach": 1, "breach_prev": 2, "flags": 3, "epoch": 8, "session": 12,
            "gseq": 16, "sseq": 24, "send_ns": 32, "recv_ns": 40, "compute_ns": 48}
    for dt, idname in ((T.UPDATE_DTYPE, "account"), (T.INSTRUMENT_ROW_DTYPE, "instrument"),
                       (T.SECTOR_ROW_DTYPE, "sector")):
        assert dt.itemsize == T.ROW_SIZE == 160
        assert dt.fields[idname][1] == 4
        for name, off in head.items():
            assert dt.fields[name][1] == off, name
    want = {"live_orders": 56, "long_mv": 64, "pnl": 136, "net_long_mv": 144,
            "net_short_mv": 152}
    for name, off in want.items():
        assert T.UPDATE_DTYPE.fields[name][1] == off, name
    assert T.INSTRUMENT_ROW_DTYPE.fields["fund_pos"][1] == 56
    assert T.SECTOR_ROW_DTYPE.fields["net_mv"][1] == 64
    assert DGRAM_HEADER.size == 32 and SNAP_HEADER.size == 32 and SNAP_REQUEST.size == 16
