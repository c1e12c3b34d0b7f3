"""The recovery server (exposure.node.stages.snapshot_server): what it answers, and its bounds."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest

from exposure.core.capacity import Capacities
from exposure.core.types import (
    EVENT_DTYPE,
    INSTRUMENT_ROW_DTYPE,
    LIMITS_ROW_DTYPE,
    NO_SESSION,
    POSITION_ROW_DTYPE,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SECTOR,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    T_INSTRUMENT,
    UPDATE_DTYPE,
)
from exposure.engine.kernel import apply_batch
from exposure.engine.parse import parse_events
from exposure.engine.publish import publish_batch, versions
from exposure.feed.wire import (
    FEED_VERSION,
    SNAP_BUSY,
    SNAP_HEADER,
    SNAP_NOT_PRIMARY,
    SNAP_NOT_READY,
    SNAP_OK,
    SNAP_REQUEST,
    SNAP_REQUEST_MAGIC,
    parse_snapshot_header,
    rows_of,
    snapshot_request,
)
from exposure.harness.localnode import free_port
from exposure.harness.wait import wait_for
from exposure.node.stages.snapshot_server import SnapshotServer
from exposure.shm.control import (
    CONTROL_WORDS,
    CTL_ALONE,
    CTL_EPOCH,
    CTL_ROLE,
    CTL_VALID_NS,
    ROLE_BACKUP,
    ROLE_PRIMARY,
)
from exposure.shm.tally_layout import TallyLayout, allocate

pytestmark = pytest.mark.process

CAPS = Capacities(accounts=16, instruments=64, sectors=8, orders=64, cells=64)
EPOCH = 7
WAIT_S = 20.0  # a condition that does not hold by then is a failure

ACC_FIELDS = ("live_orders", "long_mv", "short_mv", "gross", "net", "open_buy_mv",
              "open_sell_mv", "worst_gross", "margin", "beta_net", "pnl", "net_long_mv",
              "net_short_mv")
INST_FIELDS = ("fund_pos", "ref_price", "open_buy", "open_sell", "net_mv", "gross_mv",
               "multiplier", "margin_rate", "beta", "sector", "marked")
POS_FIELDS = ("account", "instrument", "pos", "open_buy", "open_sell", "sod_qty", "sod_price",
              "flow")
LIM_FIELDS = ("gross_limit", "net_limit", "margin_limit", "loss_limit")


# ----------------------------------------------------------------------------- state
class Tally:
    """A private tally state fed batch by batch as compute does (apply, then publish);
    ``ro``: the same state through read-only views, as the node's snapshot process maps
    it."""

    def __init__(self, caps: Capacities = CAPS):
        self.caps = caps
        self.buf, self.st = allocate(caps)
        ro = self.buf.view()
        ro.flags.writeable = False
        self.ro = TallyLayout(caps).views(ro)
        self.vers = versions(self.st)
        n = caps.accounts + 1 + caps.instruments + caps.sectors
        self.row_words = np.zeros((n, ROW_SIZE // 8), np.uint64)
        flat = self.row_words.reshape(-1)
        self.rows = (flat.view(UPDATE_DTYPE), flat.view(INSTRUMENT_ROW_DTYPE),
                     flat.view(SECTOR_ROW_DTYPE))
        self.gseq = 0

    def apply(self, recs: np.ndarray) -> None:
        recs = recs.copy()
        n = len(recs)
        recs["gseq"] = np.arange(self.gseq + 1, self.gseq + 1 + n, dtype=np.uint64)
        self.gseq += n
        status = np.zeros(n, np.uint8)
        apply_batch(self.st, recs, status)
        assert not status.any(), status
        v = self.vers
        publish_batch(self.st, v.pub, v.ipub, v.spub, v.cpub, v.ctrpub, recs, n,
                      *self.rows, time.time_ns())

    def apply_lines(self, objs: list[dict]) -> None:
        self.apply(parse_events("\n".join(json.dumps(o) for o in objs).encode()))


def instrument(i, sector, mult=10.0):
    return {"type": "instrument", "instrument": i, "multiplier": mult, "margin_rate": 0.25,
            "beta": 1.5, "sector": sector}


def mark(i, price):
    return {"type": "mark", "instrument": i, "price": price}


def order(kind, oid, account, i, side, qty, price):
    return {"type": kind, "source": 0, "order_id": oid, "account": account,
            "instrument": i, "side": side, "qty": qty, "price": price}


BATCH1 = [instrument(1, 2), instrument(5, 3, 2.0), instrument(9, 2), mark(1, 100.0),
          mark(5, 20.0), order("new", 1, 3, 1, "buy", 100, 100.0),
          order("fill", 1, 3, 1, "buy", 40, 101.0), order("new", 2, 7, 5, "short", 50, 20.0)]
BATCH2 = [order("fill", 2, 7, 5, "short", 50, 19.5), mark(9, 33.0),
          order("new", 3, 12, 9, "buy", 10, 33.0)]


@pytest.fixture(scope="module")
def tally():
    t = Tally()
    t.apply_lines(BATCH1)
    return t


def primary_ctl(epoch: int = EPOCH) -> np.ndarray:
    ctl = np.zeros(CONTROL_WORDS, np.uint64)
    ctl[CTL_ROLE] = ROLE_PRIMARY
    ctl[CTL_EPOCH] = epoch
    return ctl


# ----------------------------------------------------------------------------- server
class Running:
    """A SnapshotServer polled by a background thread (as the node's runner does, with a
    short sleep when idle); an exception out of poll() fails the test at stop()."""

    def __init__(self, state, ctl, **kw):
        self.server = SnapshotServer("127.0.0.1", free_port(), state, ctl, **kw)
        self.addr = ("127.0.0.1", self.server.port)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self.server.poll() == 0:
                    time.sleep(0.0002)
        except BaseException as e:  # (reported by stop())
            self.error = e

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.server.close()
        if self.error is not None:
            raise AssertionError(f"poll() raised {self.error!r}") from self.error


@pytest.fixture
def serve():
    """``serve(state, ctl, **kw)``: a running server, stopped after the test."""
    running: list[Running] = []

    def start(state, ctl, **kw) -> Running:
        r = Running(state, ctl, **kw)
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop()


def connect(addr, timeout: float = WAIT_S) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.settimeout(timeout)
    return s


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        b = s.recv(1 << 20)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def snapshot(addr) -> tuple[tuple[int, int, int, int, int], np.ndarray]:
    """One request: the parsed header and the rows (UPDATE_DTYPE view)."""
    s = connect(addr)
    try:
        s.sendall(snapshot_request())
        data = read_all(s)
    finally:
        s.close()
    assert len(data) >= SNAP_HEADER.size, data
    head = parse_snapshot_header(data)
    count = head[2]
    assert len(data) == SNAP_HEADER.size + count * ROW_SIZE
    return head, np.frombuffer(data, UPDATE_DTYPE, count, SNAP_HEADER.size)


def expected_rows(st) -> list[tuple]:
    """What a snapshot must hold, from the published tables: (kind, id, gseq, body)."""
    out = []
    A = st.pub.shape[0] - 1
    for a in range(A + 1):
        p = st.pub[a]
        if p["gseq"]:
            out.append((ROW_FUND if a == A else ROW_ACCOUNT, -1 if a == A else a,
                        int(p["gseq"]), int(p["breach"]),
                        tuple(p[f].item() for f in ACC_FIELDS)))
    for i in range(st.ipub.shape[0]):
        p = st.ipub[i]
        if p["gseq"]:
            out.append((ROW_INSTRUMENT, i, int(p["gseq"]), 0,
                        tuple(p[f].item() for f in INST_FIELDS)))
    for s in range(st.spub.shape[0]):
        p = st.spub[s]
        if p["gseq"]:
            out.append((ROW_SECTOR, s, int(p["gseq"]), 0,
                        (p["net_mv"].item(), p["gross_mv"].item())))
    for c in range(st.cpub.shape[0]):  # feed version 4: the cells, taken in order
        p = st.cpub[c]
        if not p["gseq"]:
            break
        out.append((ROW_POSITION, c, int(p["gseq"]), 0, tuple(p[f].item() for f in POS_FIELDS)))
    for a in range(A):  # and every moved account's limits, as of the account's last event
        if st.acc_gseq[a]:
            out.append((ROW_LIMITS, a, int(st.acc_gseq[a]), 0, tuple(st.acc_lim[a].tolist())))
    return out


def got_rows(rows: np.ndarray) -> list[tuple]:
    out = []
    for r in rows:
        kind = int(r["kind"])
        if kind in (ROW_ACCOUNT, ROW_FUND):
            out.append((kind, int(r["account"]), int(r["gseq"]), int(r["breach"]),
                        tuple(r[f].item() for f in ACC_FIELDS)))
        elif kind == ROW_INSTRUMENT:
            u = r.reshape(1).view(INSTRUMENT_ROW_DTYPE)[0]
            out.append((kind, int(u["instrument"]), int(u["gseq"]), int(u["breach"]),
                        tuple(u[f].item() for f in INST_FIELDS)))
        elif kind == ROW_SECTOR:
            u = r.reshape(1).view(SECTOR_ROW_DTYPE)[0]
            out.append((kind, int(u["sector"]), int(u["gseq"]), int(u["breach"]),
                        (u["net_mv"].item(), u["gross_mv"].item())))
        elif kind == ROW_POSITION:
            u = r.reshape(1).view(POSITION_ROW_DTYPE)[0]
            out.append((kind, int(u["cell"]), int(u["gseq"]), int(u["breach"]),
                        tuple(u[f].item() for f in POS_FIELDS)))
        else:
            u = r.reshape(1).view(LIMITS_ROW_DTYPE)[0]
            out.append((kind, int(u["account"]), int(u["gseq"]), int(u["breach"]),
                        tuple(u[f].item() for f in LIM_FIELDS)))
    return out


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ----------------------------------------------------------------------------- answers
@pytest.mark.timeout(300)  # the first use compiles gather_rows (numba)
def test_snapshot_rows_are_the_published_rows(serve):
    t = Tally()
    t.apply_lines(BATCH1)
    run = serve(t.ro, primary_ctl())
    (epoch, gseq, count, status, taken), rows = snapshot(run.addr)
    assert (epoch, status) == (EPOCH, SNAP_OK)
    assert gseq == len(BATCH1) == int(t.st.pub[-1]["gseq"])
    assert abs(taken - time.time_ns()) < 60e9
    want = expected_rows(t.st)
    assert got_rows(rows) == want
    kinds = [w[0] for w in want]
    # accounts 3 and 7, the fund, instruments 1, 5 and 9, sectors 2 and 3 and 0 (which
    # the instruments left): only moved rows; then cells 0 and 1 (account 3's instrument
    # 1, account 7's instrument 5) and the two accounts' limits (none set: zeros)
    assert kinds == ([ROW_ACCOUNT] * 2 + [ROW_FUND] + [ROW_INSTRUMENT] * 3
                     + [ROW_SECTOR] * 3 + [ROW_POSITION] * 2 + [ROW_LIMITS] * 2)
    assert [w[1] for w in want] == [3, 7, -1, 1, 5, 9, 0, 2, 3, 0, 1, 3, 7]
    pos = rows_of(rows, ROW_POSITION)
    assert pos[["account", "instrument", "pos", "open_buy", "open_sell"]].tolist() == [
        (3, 1, 40, 60, 0), (7, 5, 0, 0, 50)]
    # (no prices: the P&L terms that do not move with them; a receiver derives mv and pnl)
    assert pos[["sod_qty", "sod_price", "flow"]].tolist() == [(0, 0.0, 40 * 101.0),
                                                              (0, 0.0, 0.0)]
    assert count == len(want)
    assert (rows["epoch"] == EPOCH).all() and (rows["session"] == NO_SESSION).all()
    assert not rows["sseq"].any() and not rows["send_ns"].any()
    assert rows_of(rows, ROW_INSTRUMENT)["multiplier"].tolist() == [10.0, 2.0, 10.0]
    assert run.server.served == 1

    # a later batch: the next snapshot has its gseq and its rows (not the first answer)
    t.apply_lines(BATCH2)
    (epoch, gseq, count, status, _), rows = snapshot(run.addr)
    assert (epoch, gseq, status) == (EPOCH, len(BATCH1) + len(BATCH2), SNAP_OK)
    assert got_rows(rows) == expected_rows(t.st)
    assert [int(r["account"]) for r in rows_of(rows, ROW_ACCOUNT)] == [3, 7, 12]
    assert run.server.served == 2


@pytest.mark.timeout(120)
def test_the_header_gseq_is_read_from_the_last_row_a_batch_publishes(serve):
    """publish_batch writes accounts, the fund, instruments, sectors, cells, then the
    counters row: in the middle of a batch the fund row already carries the batch's last
    gseq while its instrument and sector rows are still the previous ones, so the header
    takes the counters row's gseq (every row read after it includes every event up to
    it)."""
    t = Tally()
    t.apply_lines(BATCH1)
    t.st.pub[-1]["gseq"] = 1000  # a batch up to 1000 half-published: fund row written
    run = serve(t.ro, primary_ctl())
    (epoch, gseq, count, status, _), rows = snapshot(run.addr)
    assert (gseq, status) == (len(BATCH1), SNAP_OK)
    assert rows_of(rows, ROW_FUND)["gseq"].tolist() == [1000]  # a newer row: allowed


@pytest.mark.timeout(120)
def test_concurrent_requests_get_the_same_snapshot(serve, tally):
    run = serve(tally.ro, primary_ctl())
    socks = [connect(run.addr) for _ in range(4)]
    try:
        for s in socks:
            s.sendall(snapshot_request())
        answers = [read_all(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert len(set(answers)) == 1
    assert parse_snapshot_header(answers[0])[3] == SNAP_OK
    wait_for(lambda: run.server.served == 4, WAIT_S, "four snapshots served")


@pytest.mark.timeout(120)
def test_a_backup_answers_not_primary(serve, tally):
    ctl = primary_ctl(epoch=11)
    ctl[CTL_ROLE] = ROLE_BACKUP
    run = serve(tally.ro, ctl)
    (epoch, gseq, count, status, _), rows = snapshot(run.addr)
    assert (epoch, count, status) == (11, 0, SNAP_NOT_PRIMARY) and len(rows) == 0
    assert run.server.refused_not_primary == 1 and run.server.served == 0
    ctl[CTL_ROLE] = ROLE_PRIMARY  # promoted: it serves
    assert snapshot(run.addr)[0][3] == SNAP_OK


@pytest.mark.timeout(120)
def test_a_primary_of_a_pair_answers_only_while_it_may_act(serve, tally):
    ctl = primary_ctl()
    run = serve(tally.ro, ctl, pair=True)
    assert snapshot(run.addr)[0][3] == SNAP_NOT_PRIMARY  # fence expired, not alone
    ctl[CTL_VALID_NS] = time.monotonic_ns() + 60 * 10**9  # a valid echo from the backup
    assert snapshot(run.addr)[0][3] == SNAP_OK
    ctl[CTL_VALID_NS] = 0
    ctl[CTL_ALONE] = 1  # etcd records it as running alone
    assert snapshot(run.addr)[0][3] == SNAP_OK
    assert run.server.refused_not_primary == 1 and run.server.served == 2


@pytest.mark.timeout(120)
def test_an_epoch_change_while_reading_answers_not_ready(serve, tally):
    ctl = primary_ctl()
    run = serve(tally.ro, ctl)
    srv = run.server
    gather = srv._gather

    def promoted_meanwhile(*args):
        res = gather(*args)
        ctl[CTL_EPOCH] += 1
        return res

    srv._gather = promoted_meanwhile
    (epoch, gseq, count, status, _), rows = snapshot(run.addr)
    assert (epoch, count, status) == (EPOCH + 1, 0, SNAP_NOT_READY)
    assert srv.not_ready == 1
    srv._gather = gather
    (epoch, _, _, status, _), _rows = snapshot(run.addr)
    assert (epoch, status) == (EPOCH + 1, SNAP_OK)


@pytest.mark.timeout(120)
def test_an_empty_state_answers_no_rows(serve):
    t = Tally()
    run = serve(t.ro, primary_ctl())
    (epoch, gseq, count, status, _), rows = snapshot(run.addr)
    assert (epoch, gseq, count, status) == (EPOCH, 0, 0, SNAP_OK)


@pytest.mark.timeout(120)
def test_a_half_closed_client_still_gets_its_answer(serve, tally):
    run = serve(tally.ro, primary_ctl())
    s = connect(run.addr)
    try:
        s.sendall(snapshot_request()[:5])
        wait_for(lambda: len(run.server.clients) == 1, WAIT_S, "the connection accepted")
        s.sendall(snapshot_request()[5:])
        s.shutdown(socket.SHUT_WR)
        data = read_all(s)
    finally:
        s.close()
    assert parse_snapshot_header(data)[3] == SNAP_OK
    assert len(data) == SNAP_HEADER.size + len(expected_rows(tally.st)) * ROW_SIZE


# ----------------------------------------------------------------------------- bounds
def refused(s: socket.socket) -> bool:
    """The server closed ``s`` without a byte of answer (EOF or a reset)."""
    try:
        return s.recv(4096) == b""
    except ConnectionResetError:
        return True


@pytest.mark.timeout(120)
def test_bad_requests_are_closed_and_the_server_still_serves(serve, tally):
    run = serve(tally.ro, primary_ctl())
    bad = [b"GET / HTTP/1.0\r\n\r\n",
           SNAP_REQUEST.pack(SNAP_REQUEST_MAGIC, FEED_VERSION + 1, 0, 0),  # version
           snapshot_request() + b"\0" * 16,                                 # size
           struct.pack("<I", 0xDEADBEEF)]                                   # magic, short
    for k, req in enumerate(bad, 1):
        s = connect(run.addr)
        try:
            s.sendall(req)
            assert refused(s)
        finally:
            s.close()
        wait_for(lambda k=k: run.server.bad_requests == k, WAIT_S, f"bad request {k} counted")
    head, rows = snapshot(run.addr)
    assert head[3] == SNAP_OK and len(rows) == len(expected_rows(tally.st))
    wait_for(lambda: not run.server.clients, WAIT_S, "every connection closed")


@pytest.mark.timeout(120)
def test_connections_beyond_max_clients_get_busy(serve, tally):
    run = serve(tally.ro, primary_ctl(), max_clients=3)
    held = []
    try:
        for _ in range(3):
            held.append(connect(run.addr))  # connected, no request yet
        wait_for(lambda: len(run.server.clients) == 3, WAIT_S, "three connections held")
        for k in (1, 2):
            s = connect(run.addr)
            try:
                s.sendall(snapshot_request())
                data = read_all(s)
            finally:
                s.close()
            assert len(data) == SNAP_HEADER.size
            epoch, gseq, count, status, _ = parse_snapshot_header(data)
            assert (epoch, count, status) == (EPOCH, 0, SNAP_BUSY)
            assert run.server.refused_busy == k
        # the held ones are still served
        held[0].sendall(snapshot_request())
        data = read_all(held[0])
        assert parse_snapshot_header(data)[3] == SNAP_OK
    finally:
        for s in held:
            s.close()
    wait_for(lambda: not run.server.clients, WAIT_S, "the held connections closed")
    assert snapshot(run.addr)[0][3] == SNAP_OK


@pytest.mark.timeout(120)
def test_a_client_that_sends_no_request_is_closed_after_two_seconds(serve, tally):
    run = serve(tally.ro, primary_ctl())
    t0 = time.monotonic()  # (before the connect: the server's 2 s count from its accept,
    s = connect(run.addr)  # which is later, so the lower bound holds however slow we are)
    try:
        s.sendall(snapshot_request()[:10])  # a slowloris: never the rest
        assert refused(s)
        assert 1.9 < time.monotonic() - t0 < 10
    finally:
        s.close()
    assert run.server.timeouts == 1
    assert snapshot(run.addr)[0][3] == SNAP_OK


@pytest.fixture(scope="module")
def big():
    """A state whose snapshot (every one of 65536 instruments moved: 10 MiB) is more than
    a socket's send buffer and its peer's receive buffer hold."""
    t = Tally(Capacities(accounts=16, instruments=65536, sectors=8, orders=64, cells=64))
    n = 65536
    recs = np.zeros(n, EVENT_DTYPE)
    recs["type"] = T_INSTRUMENT
    recs["instrument"] = np.arange(n)
    recs["sector"] = np.arange(n) % 8
    recs["x0"] = 1.0
    recs["x1"] = 0.1
    recs["x2"] = 1.0
    t.apply(recs)
    return t


@pytest.mark.timeout(300)
def test_a_client_that_never_reads_is_dropped_at_the_deadline(serve, big):
    run = serve(big.ro, primary_ctl(), deadline_s=1.0)
    s = socket.socket()
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(WAIT_S)
        s.connect(run.addr)
        s.sendall(snapshot_request())
        wait_for(lambda: run.server.timeouts == 1, 30, "the non-reader dropped")
        assert run.server.served == 0
        assert not run.server.clients
    finally:
        s.close()
    # and the server keeps serving (a reader gets the whole 10 MiB)
    (epoch, gseq, count, status, _), rows = snapshot(run.addr)
    assert (status, count, gseq) == (SNAP_OK, 65536 + 1 + 8, 65536)
    assert rows_of(rows, ROW_INSTRUMENT)["instrument"].tolist() == list(range(65536))
    assert run.server.served == 1


@pytest.mark.timeout(300)
def test_connect_close_cycles_leave_no_descriptors_behind(serve, tally):
    run = serve(tally.ro, primary_ctl())
    snapshot(run.addr)  # anything opened once (epoll, the first answer) is open now
    wait_for(lambda: not run.server.clients, WAIT_S, "the first connection closed")
    before = fds()
    for k in range(200):
        s = connect(run.addr)
        try:
            how = k % 5
            if how == 1:
                s.sendall(snapshot_request()[:7])  # half a request, then gone
            elif how == 2:
                s.sendall(snapshot_request())      # a request, never read
            elif how == 3:                         # a request, then a reset
                s.sendall(snapshot_request())
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == 4:
                s.sendall(snapshot_request())
                assert parse_snapshot_header(read_all(s))[3] == SNAP_OK
        finally:
            s.close()
    wait_for(lambda: not run.server.clients, WAIT_S, "every connection closed")
    assert fds() == before
    assert run.server.timeouts == 0 and run.server.bad_requests == 0
    assert run.server.served >= 40
    assert snapshot(run.addr)[0][3] == SNAP_OK


@pytest.mark.timeout(60)
def test_a_port_taken_by_someone_else_leaves_the_server_off_not_the_process_dead():
    from exposure.node.stages.snapshot_server import SnapshotServer

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    _, st = allocate(Capacities(accounts=16, instruments=64, sectors=8, orders=64, cells=64))
    ctl = np.zeros(CONTROL_WORDS, np.uint64)
    try:
        srv = SnapshotServer("127.0.0.1", taken.getsockname()[1], st, ctl)
        assert srv.listener is None and srv.poll() == 0
        srv.close()
    finally:
        taken.close()
