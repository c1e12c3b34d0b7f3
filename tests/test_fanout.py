"""The fan-out stage in-process: conflation per row kind, the epoch in every row, heartbeats
that repeat the last seq, a refresh cycle of published rows, and send errors counted."""

import contextlib
import errno
import os
import socket
import time
import uuid

import numpy as np
import pytest

from exposure.core.capacity import Capacities
from exposure.core.types import (
    INSTRUMENT_ROW_DTYPE,
    MAX_DATAGRAM,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_SECTOR,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.publish import publish_all, versions
from exposure.feed.wire import (
    DG_HEARTBEAT,
    DG_INCREMENTAL,
    DG_REFRESH,
    DGRAM_HEADER,
    FALLBACK_DATAGRAM,
    datagram_size,
    open_receiver,
    parse_datagram,
    rows_of,
)
from exposure.harness.localnode import free_group, free_port
from exposure.node.stages.fanout import FanoutStage
from exposure.shm.control import CONTROL_WORDS, CTL_EPOCH, CTL_FANOUT_ERRORS, CTL_ROLE, ROLE_PRIMARY
from exposure.shm.ring import Ring
from exposure.shm.tally_layout import allocate

pytestmark = [pytest.mark.timeout(120), pytest.mark.process]

CAPS = Capacities(accounts=16, instruments=64, sectors=8, orders=64, cells=64)


def _closed_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens: a send there draws ICMP port unreachable
    return port


def _ring(cap: int = 64) -> Ring:
    return Ring.create(f"exposure-test-fanout-{os.getpid()}-{uuid.uuid4().hex[:6]}", cap,
                       UPDATE_DTYPE.itemsize)


def _ctl(epoch: int = 1) -> np.ndarray:
    ctl = np.zeros(CONTROL_WORDS, np.uint64)
    ctl[CTL_ROLE], ctl[CTL_EPOCH] = ROLE_PRIMARY, epoch
    return ctl


@contextlib.contextmanager
def _feed(st, max_datagram: int, epoch: int, ring_cap: int = 64, **kw):
    """A fan-out of ``st`` (as primary of ``epoch``) from a fresh ring to a fresh group that
    a receiver has joined (its socket times out after 2 s); yields (ring, stage, receiver)
    and closes all three."""
    ring = _ring(ring_cap)
    group, port = free_group(), free_port()
    rx = open_receiver(group, port)
    rx.settimeout(2)
    try:
        fo = FanoutStage(ring, group, port, "127.0.0.1", 1, max_datagram, st, epoch=epoch,
                         ctl=_ctl(epoch), **kw)
        try:
            yield ring, fo, rx
        finally:
            fo.close()
    finally:
        rx.close()
        ring.close()


def _row(kind: int, rid: int, gseq: int) -> np.ndarray:
    dt = {ROW_INSTRUMENT: INSTRUMENT_ROW_DTYPE, ROW_SECTOR: SECTOR_ROW_DTYPE}.get(kind,
                                                                              UPDATE_DTYPE)
    r = np.zeros(1, dt)
    r["kind"], r[dt.names[4]], r["gseq"], r["session"] = kind, rid, gseq, 7
    return r.view(np.uint64).reshape(1, -1)


def _drain(rx) -> list:
    out = []
    while True:
        try:
            out.append(parse_datagram(rx.recv(65536)))
        except (BlockingIOError, TimeoutError):
            return out


def test_datagrams_the_socket_refuses_are_counted_and_the_stage_goes_on():
    ring = _ring()
    ctl = _ctl()
    _, st = allocate(CAPS)
    # A destination that refuses: the connected UDP socket reports the ICMP error on the
    # next send (ECONNREFUSED), a real send error like a full buffer's ENOBUFS.
    fo = FanoutStage(ring, "127.0.0.1", _closed_udp_port(), "127.0.0.1", 1, 1400, st,
                     epoch=1, ctl=ctl)
    try:
        for k in range(20):
            assert ring.push(_row(ROW_ACCOUNT, k % 4, k + 1)) == 1
            assert fo.poll() == 1  # taken and sent (or lost), never raised
        assert fo.seq == 20  # every datagram had its stream seq: receivers see the gaps
        assert fo.send_errors >= 1 and int(ctl[CTL_FANOUT_ERRORS]) == fo.send_errors
    finally:
        fo.close()
        ring.close()


def test_rows_conflate_per_kind_and_id_and_carry_the_epoch():
    _, st = allocate(CAPS)
    with _feed(st, 1400, 5, refresh_rows_per_s=0) as (ring, fo, rx):
        rows = [_row(ROW_ACCOUNT, 3, 1), _row(ROW_INSTRUMENT, 3, 2), _row(ROW_SECTOR, 3, 3),
                _row(ROW_ACCOUNT, 3, 4), _row(ROW_FUND, -1, 5), _row(ROW_INSTRUMENT, 3, 6),
                _row(ROW_INSTRUMENT, 9, 7), _row(ROW_FUND, -1, 8)]
        assert ring.push(np.concatenate(rows)) == len(rows)
        assert fo.poll() == len(rows)
        got = []
        while len(got) < 5:  # the 8 rows conflate to 5 (account 3, sector 3, instrument
            d = parse_datagram(rx.recv(65536))  # 3 and 9, the fund)
            assert d.type == DG_INCREMENTAL and d.epoch == 5
            got += list(zip(d.updates["kind"].tolist(), d.updates["account"].tolist(),
                            d.updates["gseq"].tolist(), d.updates["epoch"].tolist(),
                            strict=True))
        assert got == [(ROW_SECTOR, 3, 3, 5), (ROW_ACCOUNT, 3, 4, 5),
                       (ROW_INSTRUMENT, 3, 6, 5), (ROW_INSTRUMENT, 9, 7, 5),
                       (ROW_FUND, -1, 8, 5)]


def test_a_datagram_is_as_large_as_the_interface_allows_unless_configured():
    # Loopback's MTU is 65,536: one datagram of 406 rows where 1,400 bytes would take 51.
    _, st = allocate(CAPS)
    with _feed(st, 0, 1, ring_cap=1024, refresh_rows_per_s=0) as (ring, fo, rx):
        per = (MAX_DATAGRAM - DGRAM_HEADER.size) // ROW_SIZE
        assert fo.max_datagram == MAX_DATAGRAM and fo.per == per == 406
        rows = np.concatenate([_row(ROW_ACCOUNT, k, k + 1) for k in range(CAPS.accounts)]
                              + [_row(ROW_INSTRUMENT, k, 100 + k) for k in range(64)]
                              + [_row(ROW_FUND, -1, 500)] * 500)  # 81 rows after conflation
        assert ring.push(rows) == len(rows) and fo.poll() == len(rows)
        d = parse_datagram(rx.recv(65536))
        assert d.type == DG_INCREMENTAL and len(d.updates) == CAPS.accounts + 64 + 1
        assert fo.seq == 1  # one datagram for the whole batch


def test_the_datagram_size_falls_back_where_the_system_cannot_say_the_mtu():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # not connected: no path MTU
    try:
        assert datagram_size(s, 0) == FALLBACK_DATAGRAM == 1400
        assert datagram_size(s, 9000) == 9000  # a configured size is taken as it is
    finally:
        s.close()


def test_an_idle_feed_sends_heartbeats_with_the_last_seq():
    _, st = allocate(CAPS)
    with _feed(st, 1400, 2, heartbeat_ms=20, refresh_rows_per_s=0) as (ring, fo, rx):
        for k in range(3):
            ring.push(_row(ROW_ACCOUNT, k, k + 1))
            fo.poll()
        beats = []
        deadline = time.monotonic() + 10
        while len(beats) < 3 and time.monotonic() < deadline:
            fo.poll()
            rx.setblocking(False)
            beats += [d for d in _drain(rx) if d.type == DG_HEARTBEAT]
        assert len(beats) >= 3
        assert {(d.seq, d.epoch, len(d.updates)) for d in beats} == {(3, 2, 0)}
        assert fo.seq == 3  # heartbeats do not advance the stream


def test_the_refresh_cycle_resends_every_published_row_that_ever_moved():
    from exposure.engine.kernel import apply_batch
    from exposure.engine.parse import records_from_objects

    _, st = allocate(CAPS)
    evs = [{"type": "instrument", "instrument": 5, "multiplier": 2.0, "margin_rate": 0.1,
            "beta": 1.0, "sector": 3},
           {"type": "mark", "instrument": 5, "price": 10.0},
           {"type": "fill", "source": 0, "order_id": 1, "account": 2, "instrument": 5,
            "side": "buy", "qty": 7, "price": 10.0},
           {"type": "fill", "source": 0, "order_id": 2, "account": 4, "instrument": 5,
            "side": "sell", "qty": 3, "price": 10.0}]
    recs = records_from_objects(evs)
    recs["gseq"] = np.arange(1, len(recs) + 1)
    apply_batch(st, recs, np.zeros(len(recs), np.uint8))
    publish_all(st, versions(st), int(recs["gseq"][-1]))
    with _feed(st, 400, 3, refresh_rows_per_s=100_000) as (_, fo, rx):
        rx.setblocking(False)
        seen: dict = {}
        deadline = time.monotonic() + 20
        while fo.cycles < 2 and time.monotonic() < deadline:
            fo.poll()
            for d in _drain(rx):
                assert d.type == DG_REFRESH and d.seq == 0 and d.epoch == 3
                for kind in (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR):
                    for r in rows_of(d.updates, kind):
                        seen[(kind, int(r[4]))] = r
        assert fo.cycles >= 2
        # Sector 0 moved too: the instrument event took instrument 5 out of it.
        assert set(seen) == {(ROW_ACCOUNT, 2), (ROW_ACCOUNT, 4), (ROW_FUND, -1),
                             (ROW_INSTRUMENT, 5), (ROW_SECTOR, 0), (ROW_SECTOR, 3)}
        assert seen[(ROW_ACCOUNT, 2)]["long_mv"] == 140.0
        assert seen[(ROW_FUND, -1)]["net_long_mv"] == 80.0
        ins = seen[(ROW_INSTRUMENT, 5)]
        assert (ins["fund_pos"], ins["ref_price"], ins["net_mv"], ins["sector"]) == (
            4, 10.0, 80.0, 3)
        assert seen[(ROW_SECTOR, 3)]["gross_mv"] == 200.0
        assert seen[(ROW_ACCOUNT, 2)]["session"] == 0xFFFFFFFF  # no event tags a refresh
        # reserved bytes are zero, whatever row the buffer held before
        assert not seen[(ROW_SECTOR, 3)].tobytes()[80:].strip(b"\0")
        assert (ins["rate"], ins["currency"]) == (1.0, 0)  # SPEC 7: the base currency
        assert not seen[(ROW_INSTRUMENT, 5)].tobytes()[152:].strip(b"\0")


def _sender_and_receiver() -> tuple[socket.socket, socket.socket]:
    """A UDP socket connected to a fresh group on loopback, and a receiver that joined it
    (5 s timeout)."""
    group, port = free_group(), free_port()
    rx = open_receiver(group, port)
    rx.settimeout(5)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    s.connect((group, port))
    return s, rx


def test_batch_sender_sends_every_slice_in_order_in_calls_of_at_most_max_msgs():
    from exposure.net.mmsg import BatchSender

    s, rx = _sender_and_receiver()
    buf = np.arange(4000, dtype=np.uint64).view(np.uint8)[:10_000].copy()
    ends = np.cumsum([100 * (k + 1) for k in range(10)]).astype(np.int64)  # 100..1000 bytes
    try:
        bs = BatchSender(s, buf, max_msgs=3)
        assert bs.send(ends, 10) == 0
        lo = 0
        for k in range(10):
            assert rx.recv(65536) == buf[lo:ends[k]].tobytes(), k
            lo = int(ends[k])
    finally:
        s.close()
        rx.close()


def test_a_headed_sender_sends_each_header_then_its_slice_in_calls_of_at_most_max_msgs():
    """The fused pass's datagrams are gathered by the kernel from a header row and a slice
    of compute's buffer: each arrives as the two back to back; a refusal is counted."""
    from exposure.net.mmsg import HeadedSender, send_headed

    s, rx = _sender_and_receiver()
    heads = (np.arange(40, dtype=np.uint64) + 7_000).reshape(10, 4)  # 32-byte headers
    buf = np.arange(4000, dtype=np.uint64).view(np.uint8)[:10_000].copy()
    ends = np.cumsum([100 * (k + 1) for k in range(10)]).astype(np.int64)  # 100..1000 bytes
    try:
        hs = HeadedSender(s, heads, buf, max_msgs=3)
        assert send_headed(*hs.args[:5], ends, 10, hs.args[5]) == (0, 0)
        lo = 0
        for k in range(10):
            want = heads[k].tobytes() + buf[lo:ends[k]].tobytes()
            assert rx.recv(65536) == want, k
            lo = int(ends[k])
    finally:
        s.close()
        rx.close()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", _closed_udp_port()))
    try:
        hs = HeadedSender(s, heads, buf, max_msgs=4)
        refused = [send_headed(*hs.args[:5], ends, 8, hs.args[5]) for _ in range(5)]
        assert sum(r for r, _ in refused) >= 1
        assert any(e == errno.ECONNREFUSED for _, e in refused), refused
    finally:
        s.close()


def test_batch_sender_counts_what_the_socket_refuses_and_names_the_error():
    """More than one datagram goes by sendmmsg from jitted code: refusals (here ICMP port
    unreachable, reported on the next call as ECONNREFUSED) are counted, with the error's
    text, and the rest is still sent; a failure is never raised."""
    from exposure.net.mmsg import BatchSender

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", _closed_udp_port()))
    buf = np.zeros(4096, np.uint8)
    ends = np.arange(1, 9, dtype=np.int64) * 100  # 8 datagrams of 100 bytes
    try:
        bs = BatchSender(s, buf, max_msgs=4)
        refused = sum(bs.send(ends, 8) for _ in range(5))
        assert refused >= 1 and "refused" in bs.last_error.lower(), (refused, bs.last_error)
    finally:
        s.close()


def test_the_jitted_clock_reads_what_time_time_ns_reads():
    from numba import njit

    from exposure.shm.intrinsics import clock_realtime_ns

    now = njit(lambda: clock_realtime_ns())
    now()
    before = time.time_ns()
    t = now()
    after = time.time_ns()
    assert before <= t <= after
