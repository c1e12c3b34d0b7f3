"""The feed subscriber (exposure.feed.subscriber) against a synthetic node: a multicast sender and a
recovery server speaking exposure.feed.wire, both driven by the test."""

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import orjson
import pytest

from exposure.core.types import (
    INSTRUMENT_ROW_DTYPE,
    NO_SESSION,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_SECTOR,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.document import compare_documents
from exposure.feed.subscriber import Subscriber
from exposure.feed.wire import (
    DG_HEARTBEAT,
    DG_INCREMENTAL,
    DG_REFRESH,
    DGRAM_HEADER,
    DGRAM_MAGIC,
    FEED_VERSION,
    SNAP_BUSY,
    SNAP_HEADER,
    SNAP_MAGIC,
    SNAP_NOT_PRIMARY,
    SNAP_OK,
    SNAP_REQUEST,
    dgram_word,
    parse_datagram,
)
from exposure.harness.localnode import free_group, free_port

pytestmark = [pytest.mark.timeout(60), pytest.mark.process]

ACC_FLOATS = ("long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
              "worst_gross", "margin", "beta_net", "pnl")


# ----------------------------------------------------------------------------- rows
def acc(account: int, gseq: int, long_mv: float = 0.0, short_mv: float = 0.0,
        live: int = 0, breach: int = 0, breach_prev: int = 0) -> np.ndarray:
    r = np.zeros(1, UPDATE_DTYPE)
    r["kind"], r["account"], r["gseq"] = ROW_ACCOUNT, account, gseq
    r["long_mv"], r["short_mv"] = long_mv, short_mv
    r["gross"], r["net"] = long_mv + short_mv, long_mv - short_mv
    r["worst_gross"], r["margin"], r["pnl"] = 2 * (long_mv + short_mv), 0.1 * long_mv, -1.5
    r["live_orders"], r["breach"], r["breach_prev"] = live, breach, breach_prev
    r["session"], r["sseq"] = 1, gseq
    return r


def fund(gseq: int, long_mv: float, short_mv: float, net_long: float,
         net_short: float) -> np.ndarray:
    r = acc(-1, gseq, long_mv, short_mv, live=3)
    r["kind"] = ROW_FUND
    r["net_long_mv"], r["net_short_mv"] = net_long, net_short
    return r


def inst(i: int, gseq: int, ref_price: float, fund_pos: int, open_buy: int = 0) -> np.ndarray:
    r = np.zeros(1, INSTRUMENT_ROW_DTYPE)
    r["kind"], r["instrument"], r["gseq"] = ROW_INSTRUMENT, i, gseq
    r["ref_price"], r["fund_pos"], r["open_buy"], r["multiplier"] = ref_price, fund_pos, \
        open_buy, 1.0
    return r


def sec(s: int, gseq: int, net_mv: float, gross_mv: float) -> np.ndarray:
    r = np.zeros(1, SECTOR_ROW_DTYPE)
    r["kind"], r["sector"], r["gseq"] = ROW_SECTOR, s, gseq
    r["net_mv"], r["gross_mv"] = net_mv, gross_mv
    return r


def datagram(epoch: int, seq: int, rows=(), dtype: int = DG_INCREMENTAL) -> bytes:
    body = b"".join(r.tobytes() for r in rows)
    assert len(body) % ROW_SIZE == 0
    return DGRAM_HEADER.pack(DGRAM_MAGIC, epoch, seq, *dgram_word(len(body) // ROW_SIZE,
                                                                 dtype),
                             time.time_ns()) + body


def expected(rows: dict) -> dict:
    """The SPEC document's sections of a set of rows (what the node would dump; this fake
    node sends no position rows, so ``positions`` is empty)."""
    by = {k: sorted((key[1], r) for key, r in rows.items() if key[0] == k)
          for k in (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR)}
    accounts = [{"account": a, **{k: float(r[k][0]) for k in ACC_FLOATS},
                 "live_orders": int(r["live_orders"][0]), "breach": int(r["breach"][0])}
                for a, r in by[ROW_ACCOUNT]]
    f = {k: 0.0 for k in ACC_FLOATS} | {"live_orders": 0, "net_long_mv": 0.0,
                                        "net_short_mv": 0.0, "crossing": 0.0}
    for _, r in by[ROW_FUND]:
        f = {k: float(r[k][0]) for k in ACC_FLOATS}
        f |= {"live_orders": int(r["live_orders"][0]), "net_long_mv": float(r["net_long_mv"][0]),
              "net_short_mv": float(r["net_short_mv"][0])}
        f["crossing"] = f["gross"] - (f["net_long_mv"] + f["net_short_mv"])
    instruments = [{"instrument": i, "ref_price": float(r["ref_price"][0]),
                    "fund_pos": int(r["fund_pos"][0]), "open_buy": int(r["open_buy"][0]),
                    "open_sell": int(r["open_sell"][0])} for i, r in by[ROW_INSTRUMENT]]
    sectors = [{"sector": s, "net_mv": float(r["net_mv"][0]), "gross_mv": float(r["gross_mv"][0])}
               for s, r in by[ROW_SECTOR]]
    return {"accounts": accounts, "fund": f, "instruments": instruments, "sectors": sectors,
            "positions": []}


def _key(r: np.ndarray) -> tuple[int, int]:
    kind = int(r["kind"][0])
    return kind, int(r[{ROW_INSTRUMENT: "instrument", ROW_SECTOR: "sector"}.get(kind,
                                                                                "account")][0])


# ----------------------------------------------------------------------------- the fake node
class SnapServer:
    """A recovery server on a free port: each connection reads one request and gets
    ``answer()`` -> (status, epoch, gseq, rows), taken when the request arrives and sent
    once ``gate`` is set (a slow transfer, or a server that goes silent); its first
    ``split`` bytes go out before the gate (a server that goes silent mid-transfer)."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = 0
        self.split = 0
        self.gate = threading.Event()
        self.gate.set()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(16)
        self.addr = self.lsock.getsockname()
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with c:
                try:
                    c.settimeout(5)
                    req = b""
                    while len(req) < SNAP_REQUEST.size:
                        chunk = c.recv(SNAP_REQUEST.size - len(req))
                        if not chunk:
                            break
                        req += chunk
                    self.requests += 1
                    status, epoch, gseq, rows = self.answer()
                    body = b"".join(r.tobytes() for r in rows)
                    data = SNAP_HEADER.pack(SNAP_MAGIC, epoch, gseq, len(body) // ROW_SIZE,
                                            status, FEED_VERSION, ROW_SIZE, time.time_ns()) \
                        + body
                    split = min(self.split, len(data)) if not self.gate.is_set() else 0
                    c.sendall(data[:split])
                    while not self.gate.wait(0.05):
                        if self._stop:
                            return
                    c.sendall(data[split:])
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.gate.set()
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        self.thread.join(5)


class FakeNode:
    """The truth (every row as of the last event), a multicast sender and a recovery
    server answering the truth. ``lose`` moves the truth like ``send`` but the datagram
    never leaves (a loss on the network)."""

    def __init__(self, epoch: int = 1):
        self.group, self.port = free_group(), free_port()
        self.epoch, self.seq, self.gseq = epoch, 0, 0
        self.rows: dict[tuple[int, int], np.ndarray] = {}
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                           socket.inet_aton("127.0.0.1"))
        self.tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        self.server = SnapServer(self.snapshot)
        self.sent = 0

    def snapshot(self):
        rows = [r.copy() for r in self.rows.values()]
        for r in rows:  # snapshot rows carry no event tag
            r["session"], r["sseq"], r["breach_prev"] = NO_SESSION, 0, r["breach"]
        return SNAP_OK, self.epoch, self.gseq, rows

    def event(self, *rows) -> list:
        """Rows moved by one event: each gets the next gseq; the truth takes them."""
        self.gseq += 1
        for r in rows:
            r["gseq"], r["epoch"] = self.gseq, self.epoch
            self.rows[_key(r)] = r
        return list(rows)

    def raw(self, data: bytes) -> None:
        self.tx.sendto(data, (self.group, self.port))
        self.sent += 1

    def send(self, *rows) -> None:
        self.seq += 1
        self.raw(datagram(self.epoch, self.seq, self.event(*rows)))

    def lose(self, *rows) -> None:
        self.seq += 1
        self.event(*rows)

    def heartbeat(self) -> None:
        self.raw(datagram(self.epoch, self.seq, (), DG_HEARTBEAT))

    def refresh(self) -> None:
        self.raw(datagram(self.epoch, self.seq, list(self.snapshot()[3])[:5], DG_REFRESH))

    def restart(self, durable: dict) -> None:
        """A new incarnation that recovered the rows ``durable`` (what it journaled)."""
        self.epoch += 1
        self.seq = 0
        self.rows = durable
        self.gseq = max((int(r["gseq"][0]) for r in self.rows.values()), default=0)

    def subscriber(self, **kw) -> Subscriber:
        kw.setdefault("snapshot", [self.server.addr])
        return Subscriber(self.group, self.port, **kw)

    def document(self) -> dict:
        return expected(self.rows)

    def close(self) -> None:
        self.server.close()
        self.tx.close()


@pytest.fixture
def node():
    n = FakeNode()
    try:
        yield n
    finally:
        n.close()


def pump(sub: Subscriber, pred, what: str, timeout: float = 15.0) -> list:
    """Poll ``sub`` until ``pred()`` holds; the changes seen meanwhile."""
    seen: list = []
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}: {sub!r} {sub.counters} "
                                 f"{sub.last_snapshot_error!r}")
        seen += sub.poll(0.02)
    return seen


def settled(sub: Subscriber, node: FakeNode, received: int | None = None):
    """Live, and every datagram the node sent has been received."""
    n = node.sent if received is None else received
    return lambda: sub.counters["datagrams"] >= n and sub.state == "live"


def same(sub: Subscriber, node: FakeNode) -> None:
    got, want = sub.document(), node.document()
    assert compare_documents(got, want) == []
    assert got == want  # same keys, same values, same order: what `exposure dump` prints


def _base(node: FakeNode) -> None:
    node.event(acc(1, 0, 100.0, 20.0, live=2), fund(0, 100.0, 20.0, 90.0, 10.0))
    node.event(acc(2, 0, 0.0, 50.0), fund(0, 100.0, 70.0, 90.0, 60.0), inst(7, 0, 12.5, -4),
               sec(3, 0, -50.0, 50.0))


# ----------------------------------------------------------------------------- tests
@pytest.mark.timeout(60)
def test_late_join_takes_a_snapshot_then_merges_incrementals_by_gseq(node):
    _base(node)  # the node has history before the subscriber joins
    sub = node.subscriber()
    try:
        assert sub.state == "joining"
        pump(sub, lambda: sub.state == "live", "the join snapshot")
        assert sub.counters["recoveries"] == 1 and sub.snapshot_gseq == node.gseq == 2
        same(sub, node)
        node.send(acc(2, 0, 5.0, 50.0), fund(0, 105.0, 70.0, 95.0, 60.0))
        pump(sub, settled(sub, node), "the first incremental")
        same(sub, node)
        assert sub.account(2)["gseq"] == 3 and sub.seq == 1 and sub.gseq == 3
        # An incremental row older than what the view holds changes nothing (its datagram
        # is a reordered one: seq 1 again).
        stale = acc(2, 2, 999.0)
        node.raw(datagram(node.epoch, 1, [stale]))
        pump(sub, lambda: sub.counters["datagrams"] == node.sent, "the old row")
        same(sub, node)
        assert sub.counters["gaps"] == 0 and sub.counters["bad_datagrams"] == 0
        assert sub.table(ROW_ACCOUNT)["kind"][[1, 2]].tolist() == [ROW_ACCOUNT] * 2
        assert sub.present(ROW_ACCOUNT).tolist() == [1, 2]
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_rows_re_sent_with_the_same_state_are_no_change(node):
    """Refresh rows of unchanged state (several in one batch, of every kind, instrument
    and sector rows with padding after their last field) report no change and leave the
    event's tags in the view."""
    sub = node.subscriber(snapshot=[])
    try:
        node.send(acc(4, 0, 10.0, 1.0), inst(9, 0, 3.5, 12, 2), sec(5, 0, 42.0, 42.0))
        pump(sub, settled(sub, node), "the event")
        sent_ns = int(sub.table(ROW_INSTRUMENT)[9]["send_ns"])
        for _ in range(3):
            rows = [r.copy() for r in node.rows.values()]
            for r in rows:  # as a refresh sends them: no event tag
                r["session"], r["sseq"], r["send_ns"] = NO_SESSION, 0, 0
            node.raw(datagram(node.epoch, node.seq, rows + rows, DG_REFRESH))
            assert pump(sub, settled(sub, node), "the refresh") == []
        assert int(sub.table(ROW_INSTRUMENT)[9]["send_ns"]) == sent_ns
        same(sub, node)
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_a_slow_snapshot_never_holds_up_datagrams(node):
    _base(node)
    node.server.gate.clear()  # the recovery server takes its time
    sub = node.subscriber(join_wait=0.0)
    t0 = None
    try:
        pump(sub, lambda: node.server.requests >= 1, "the join request")
        for k in range(5):
            node.send(acc(10 + k, 0, 1.0 + k))
        pump(sub, lambda: sub.counters["incrementals"] == 5, "incrementals while joining")
        assert sub.state == "joining"
        assert sub.present(ROW_ACCOUNT).tolist() == [10, 11, 12, 13, 14]  # applied already
        node.server.gate.set()
        pump(sub, settled(sub, node), "the snapshots")
        same(sub, node)
        assert sub.counters["recoveries"] >= 1
        node.server.gate.clear()
        node.send(acc(9, 0))
        node.lose(acc(8, 0))
        node.send(acc(7, 0))
        pump(sub, lambda: sub.counters["gaps"] == 1, "the gap")
        t0 = time.monotonic()
    finally:
        sub.close()  # with a fetch held up by the server: close does not wait for it
    assert t0 is not None and time.monotonic() - t0 < 2.0


@pytest.mark.timeout(60)
def test_a_loss_before_the_first_datagram_seen_is_covered_by_a_later_snapshot(node):
    _base(node)
    node.server.gate.clear()
    sub = node.subscriber(join_wait=0.0)
    try:
        pump(sub, lambda: node.server.requests == 1, "the join snapshot taken")
        node.lose(acc(5, 0, 5.0))  # seq 1: after the join snapshot, lost
        node.send(acc(6, 0, 6.0))  # seq 2: the first datagram the subscriber sees
        pump(sub, lambda: sub.counters["incrementals"] == 1, "the first datagram")
        assert sub.counters["gaps"] == 0  # no seq to compare it with
        node.server.gate.set()
        pump(sub, lambda: sub.state == "live", "live")
        assert sub.counters["recoveries"] == 2 and sub.account(5)["long_mv"] == 5.0
        same(sub, node)
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_a_gap_in_the_incrementals_is_recovered_by_a_snapshot(node):
    _base(node)
    changes: list = []
    sub = node.subscriber(on_change=lambda *c: changes.append(c))
    try:
        node.send(acc(1, 0, 110.0, 20.0))
        pump(sub, settled(sub, node), "live")
        recoveries = sub.counters["recoveries"]
        node.lose(acc(5, 0, 7.0), fund(0, 117.0, 70.0, 97.0, 60.0))  # seq 2 never arrives
        node.lose(acc(6, 0, 8.0))                                     # nor seq 3
        node.send(acc(2, 0, 1.0, 49.0))                               # seq 4
        pump(sub, lambda: sub.counters["gaps"] == 1, "the gap")
        assert sub.state == "recovering" and sub.counters["missed"] == 2
        assert sub.account(5) is None
        seen = pump(sub, lambda: sub.state == "live", "the recovery")
        assert sub.counters["recoveries"] == recoveries + 1
        same(sub, node)
        assert {(c.kind, c.id) for c in seen} >= {(ROW_ACCOUNT, 5), (ROW_ACCOUNT, 6),
                                                   (ROW_FUND, -1)}
        assert [c for c in changes if c[:2] == (ROW_ACCOUNT, 5)][-1][2]["long_mv"] == 7.0
    finally:
        sub.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("tell", ["heartbeat", "refresh"])
def test_a_heartbeat_or_refresh_ahead_of_the_last_seq_reveals_a_loss(node, tell):
    _base(node)
    sub = node.subscriber()
    try:
        node.send(acc(1, 0, 111.0))
        pump(sub, settled(sub, node), "live")
        node.lose(acc(3, 0, 3.0, 4.0))  # the last incremental is lost: only the next
        getattr(node, tell)()           # heartbeat (or refresh) can tell
        pump(sub, lambda: sub.counters["gaps"] == 1, "the loss")
        assert sub.counters["heartbeats" if tell == "heartbeat" else "refreshes"] == 1
        pump(sub, lambda: sub.state == "live", "the recovery")
        same(sub, node)
        assert sub.account(3)["short_mv"] == 4.0 and sub.seq == node.seq
        # Heartbeats at the last seq are no loss.
        node.heartbeat()
        node.heartbeat()
        pump(sub, settled(sub, node), "two heartbeats")
        assert sub.counters["gaps"] == 1
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_a_new_epoch_drops_phantom_rows_and_older_epochs_are_ignored(node):
    _base(node)
    sub = node.subscriber()
    try:
        node.send(acc(1, 0, 130.0))                  # gseq 3: durable
        durable = {k: r.copy() for k, r in node.rows.items()}
        node.send(acc(7, 0, 70.0), acc(2, 0, 1.0))   # gseq 4: never made durable
        node.send(acc(1, 0, 140.0))                  # gseq 5: never made durable
        pump(sub, settled(sub, node), "live in epoch 1")
        assert sub.account(7) is not None and sub.epoch == 1
        # The node restarts (epoch 2) with gseq 1..3 durable; its next event reuses gseq 4
        # with other contents.
        node.restart(durable)
        node.send(acc(4, 0, 4.0))                    # epoch 2, seq 1, gseq 4
        seen = pump(sub, lambda: sub.counters["epoch_changes"] == 1, "the new epoch")
        assert sub.epoch == 2 and sub.state == "recovering"
        assert (ROW_ACCOUNT, 7) in {(c.kind, c.id) for c in seen if c.row is None}
        pump(sub, lambda: sub.state == "live", "the new epoch's snapshot")
        same(sub, node)  # no account 7, account 1 as of gseq 3 (not the phantom gseq 5)
        assert sub.account(7) is None and sub.account(1)["long_mv"] == 130.0
        # The deposed incarnation's datagrams: ignored and counted, not a gap.
        stale = sub.counters["stale_epoch"]
        node.raw(datagram(1, 4, [acc(9, 6, 9.0)]))
        node.raw(datagram(1, 99, [], DG_HEARTBEAT))
        node.heartbeat()
        pump(sub, settled(sub, node), "the stale datagrams")
        assert sub.counters["stale_epoch"] == stale + 2 and sub.counters["gaps"] == 0
        assert sub.account(9) is None and sub.epoch == 2
        same(sub, node)
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_a_snapshot_of_a_newer_epoch_is_followed_an_older_one_skipped():
    old, new = FakeNode(epoch=3), FakeNode(epoch=4)
    new.group, new.port = old.group, old.port  # one pair: one group
    try:
        _base(old)
        _base(new)
        new.event(acc(5, 0, 55.0))
        # The view is at epoch 4 (the new primary's datagrams); the first server listed
        # still serves epoch 3 (a deposed primary): skipped, the other one serves 4.
        sub = Subscriber(old.group, old.port, snapshot=[old.server.addr, new.server.addr])
        try:
            new.send(acc(6, 0, 66.0))
            pump(sub, settled(sub, new), "live at epoch 4")
            assert sub.counters["snapshot_stale"] >= 1 and old.server.requests >= 1
            assert sub.epoch == 4
            same(sub, new)
        finally:
            sub.close()
        # A view at epoch 3 follows a snapshot of epoch 4 (the restarted node has not
        # sent a datagram yet): the old rows are dropped.
        old.rows[(ROW_ACCOUNT, 9)] = acc(9, 3, 9.0)
        sub = Subscriber(old.group, old.port, snapshot=[old.server.addr])
        try:
            old.send(acc(8, 0))
            pump(sub, settled(sub, old), "live at epoch 3")
            old.server.answer = new.snapshot
            old.lose(acc(1, 0))
            old.heartbeat()
            pump(sub, lambda: sub.epoch == 4 and sub.state == "live", "epoch 4")
            assert sub.counters["epoch_changes"] == 1
            same(sub, new)
        finally:
            sub.close()
    finally:
        old.close()
        new.close()


@pytest.mark.timeout(60)
def test_drop_every_loses_datagrams_on_purpose_and_the_view_recovers(node):
    _base(node)
    sub = node.subscriber(drop_every=3)
    try:
        for k in range(12):
            node.send(acc(20 + k, 0, 1.0 + k), fund(0, 200.0 + k, 0.0, 200.0 + k, 0.0))
        node.heartbeat()  # the 12th was dropped: the heartbeat tells
        pump(sub, settled(sub, node), "recovered")
        c = sub.counters
        assert c["datagrams"] == 13 and c["dropped"] == 4 and c["gaps"] >= 1
        assert c["recoveries"] >= 1 and c["incrementals"] == 8 and c["heartbeats"] == 1
        same(sub, node)
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_malformed_datagrams_are_counted_and_ignored(node):
    _base(node)
    sub = node.subscriber(accounts=64)
    try:
        node.send(acc(1, 0, 1.0))
        pump(sub, settled(sub, node), "live")
        good = datagram(node.epoch, node.seq + 1, [acc(2, 99, 2.0)])
        bad_kind = bytearray(good)
        bad_kind[DGRAM_HEADER.size] = 9
        w16, w20 = dgram_word(1, DG_INCREMENTAL)
        bad = [b"", b"short", b"\0" * 32 + good[32:],                      # bad magic
               DGRAM_HEADER.pack(DGRAM_MAGIC, 1, 9, w16 & ~(0xFF << 24) | 1 << 24, w20, 0)
               + good[32:],                                               # version 1
               DGRAM_HEADER.pack(DGRAM_MAGIC, 1, 9, 1 | 7 << 16 | FEED_VERSION << 24, w20,
                                 0) + good[32:],                          # type 7
               good[:-1],                                                 # a short row
               good + b"\0" * ROW_SIZE,                                   # count says 1
               bytes(bad_kind)]                                           # row kind 9
        for b in bad:
            with pytest.raises(ValueError):  # the subscriber agrees with feedwire's parser
                parse_datagram(b)
            node.raw(b)
        pump(sub, lambda: sub.counters["datagrams"] == node.sent, "the bad datagrams")
        assert sub.counters["bad_datagrams"] == len(bad) and sub.counters["gaps"] == 0
        same(sub, node)
        # A valid datagram with a row beyond the id bounds: the row is counted, the rest
        # applied.
        node.send(acc(3, 0, 3.0))
        node.raw(datagram(node.epoch, node.seq + 1, [acc(64, 200, 1.0), acc(4, 200, 4.0)]))
        node.seq += 1
        pump(sub, lambda: sub.counters["datagrams"] == node.sent, "the out-of-bounds row")
        assert sub.counters["bad_rows"] == 1 and sub.account(4)["long_mv"] == 4.0
        assert sub.counters["gaps"] == 0 and sub.state == "live"
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_not_primary_and_busy_servers_are_passed_over(node):
    _base(node)
    backup = SnapServer(lambda: (SNAP_NOT_PRIMARY, node.epoch, 0, []))
    busy = [2]

    def flaky():
        if busy[0]:
            busy[0] -= 1
            return SNAP_BUSY, 0, 0, []
        return node.snapshot()

    node.server.answer = flaky
    sub = Subscriber(node.group, node.port, snapshot=[backup.addr, node.server.addr],
                     backoff=(0.01, 0.05))
    try:
        pump(sub, lambda: sub.state == "live", "a snapshot from the primary")
        c = sub.counters
        assert backup.requests >= 1 and c["snapshot_not_primary"] == backup.requests
        assert c["snapshot_busy"] == 2 and c["recoveries"] == 1
        same(sub, node)
        # Once one answered, the subscriber asks it first.
        asked = backup.requests
        node.send(acc(1, 0))
        pump(sub, settled(sub, node), "live after the first datagram")
        assert backup.requests == asked
    finally:
        sub.close()
        backup.close()


@pytest.mark.timeout(60)
def test_an_unreachable_server_is_retried_while_datagrams_flow(node):
    _base(node)
    dead = ("127.0.0.1", free_port())
    sub = Subscriber(node.group, node.port, snapshot=[dead], backoff=(0.01, 0.05),
                     join_wait=0.0)
    try:
        node.send(acc(1, 0, 1.0))
        pump(sub, lambda: sub.counters["snapshot_errors"] >= 3 and sub.counters["datagrams"],
             "failed fetches")
        assert sub.state == "joining" and sub.account(1)["long_mv"] == 1.0
        assert "127.0.0.1" in sub.last_snapshot_error
    finally:
        sub.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("split", [0, SNAP_HEADER.size + ROW_SIZE], ids=["silent",
                                                                          "mid-transfer"])
def test_a_server_gone_silent_is_given_up_within_the_bound_and_asked_again(node, split):
    """A recovery server that accepts, then sends nothing (a hung or SIGSTOPped node: the
    kernel still accepts), or stops after the header and a row: the fetch gives up after
    snapshot_timeout of silence (the liveness rule), and the server is asked again; once
    it answers, the subscriber goes live."""
    _base(node)
    node.server.gate.clear()
    node.server.split = split
    bound = 0.5
    sub = node.subscriber(snapshot_timeout=bound, backoff=(0.05, 0.2), join_wait=0.0)
    try:
        node.send(acc(1, 0, 1.0))
        t0 = time.monotonic()
        pump(sub, lambda: sub.counters["snapshot_errors"] >= 1, "the silent fetch given up",
             timeout=bound + 3.0)  # the bound, and room for a loaded machine
        assert time.monotonic() - t0 >= bound * 0.9
        assert f"silent for {bound:g} s" in sub.last_snapshot_error
        assert sub.state == "joining" and sub.account(1)["long_mv"] == 1.0
        node.server.gate.set()
        pump(sub, settled(sub, node), "live once the server answers")
        same(sub, node)
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_a_feed_that_stops_is_reported_silent_until_a_datagram_comes(node):
    """No datagram for liveness_s (a live feed heartbeats every 100 ms): ``silent``; the
    next datagram (a heartbeat) ends it."""
    _base(node)
    sub = node.subscriber(liveness_s=0.3)
    try:
        node.send(acc(1, 0, 1.0))
        pump(sub, settled(sub, node), "live")
        pump(sub, lambda: sub.silent, "silent after liveness_s", timeout=0.3 + 3.0)
        assert sub.silent_for > 0.3 and "silent" in sub.describe()
        node.heartbeat()
        pump(sub, lambda: not sub.silent, "a heartbeat heard")
        assert sub.state == "live"
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_breach_transitions_are_visible_in_changes(node):
    changes: list = []
    sub = node.subscriber(on_change=lambda *c: changes.append(c))
    try:
        node.send(acc(1, 0, 10.0))
        pump(sub, settled(sub, node), "live")
        node.send(acc(1, 0, 500.0, breach=1, breach_prev=0))
        ch = pump(sub, lambda: sub.counters["datagrams"] == node.sent, "the breach")
        assert [(c.id, c.prev_breach, int(c.row["breach"]), c.breach_changed) for c in ch] \
            == [(1, 0, 1, True)]
        assert sub.breaches().tolist() == [1]
        node.send(acc(1, 0, 10.0, breach=0, breach_prev=1))
        ch = pump(sub, lambda: sub.counters["datagrams"] == node.sent, "the end of it")
        assert [(c.prev_breach, c.breach_changed) for c in ch] == [(1, True)]
        assert sub.breaches().tolist() == []
        assert changes[-1][:2] == (ROW_ACCOUNT, 1) and changes[-1][2]["breach"] == 0
        # A re-sent row of the same state (a refresh) is no change.
        node.refresh()
        ch = pump(sub, lambda: sub.counters["datagrams"] == node.sent, "the refresh")
        assert ch == []
    finally:
        sub.close()


@pytest.mark.timeout(60)
def test_updates_iterates_for_a_while_and_close_is_idempotent(node):
    _base(node)
    with node.subscriber(join_wait=0.0) as sub:
        got = list(sub.updates(seconds=0.3))
        assert sub.state == "live"
        assert {(c.kind, c.id) for c in got} == set(node.rows)
    assert sub.closed
    sub.close()
    with pytest.raises(ValueError):
        sub.poll(0)


def _config(tmp_path, node: FakeNode, extra: str = "", snapshot_port: int = 0) -> str:
    p = tmp_path / "watch.toml"
    p.write_text(f'[node]\nname = "watch{free_port()}"\n[ingest]\nport = {free_port()}\n'
                 f'[fanout]\ngroup = "{node.group}"\nport = {node.port}\n'
                 f"snapshot_port = {snapshot_port or node.server.addr[1]}\n{extra}")
    return str(p)


@pytest.mark.timeout(60)
def test_from_config_follows_a_pair(tmp_path, node):
    backup = SnapServer(lambda: (SNAP_NOT_PRIMARY, node.epoch, 0, []))
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    cfg = _config(tmp_path, node, snapshot_port=backup.addr[1], extra=(
        f'[replication]\npeer = "127.0.0.1:{free_port()}"\nlisten = "127.0.0.1:{free_port()}"\n'
        f'secret_file = "{secret}"\npeer_snapshot = "127.0.0.1:{node.server.addr[1]}"\n'))
    try:
        _base(node)
        with Subscriber.from_config(cfg) as sub:
            assert sub.servers == [backup.addr, node.server.addr]
            pump(sub, lambda: sub.state == "live", "the pair's primary")
            same(sub, node)
        # and `exposure watch` on it
        node.send(acc(3, 0, 33.0))
        p = subprocess.run([sys.executable, "-m", "exposure", "watch", "--config", cfg,
                            "--seconds", "1.5", "--json"], capture_output=True, timeout=30)
        assert p.returncode == 0, p.stderr.decode()
        doc = orjson.loads(p.stdout)
        assert doc == node.document()
        lines = p.stderr.decode().splitlines()
        assert lines and all("epoch 1" in ln for ln in lines) and "live" in lines[-1]
    finally:
        backup.close()


@pytest.mark.timeout(60)
def test_watch_shows_recovery_and_prints_the_view(tmp_path, node):
    _base(node)
    cfg = _config(tmp_path, node)
    p = subprocess.Popen([sys.executable, "-m", "exposure", "watch", "--config", cfg,
                          "--seconds", "3", "--drop-every", "2", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # the watcher's first status line: it is up and subscribed
        first = p.stderr.readline().decode()
        assert "epoch" in first, first
        for k in range(6):
            node.send(acc(30 + k, 0, 3.0 + k))
        node.heartbeat()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err.decode()
    assert orjson.loads(out) == node.document()
    last = err.decode().splitlines()[-1]
    assert "dropped 3" in last and "gaps 0" not in last, last


def test_watch_rejects_bad_arguments(tmp_path):
    p = subprocess.run([sys.executable, "-m", "exposure", "watch", "--drop-every", "-1"],
                       capture_output=True, timeout=30)
    assert p.returncode == 2 and b"--drop-every" in p.stderr


# ----------------------------------------------------------------------------- end to end
SECTIONS = ("accounts", "fund", "instruments", "sectors", "positions")


@pytest.mark.timeout(300)
def test_a_real_node_s_feed_rebuilds_what_dump_prints_through_loss_late_join_and_restart(
        tmp_path):
    from support import DATA

    from exposure.engine.parse import read_events
    from exposure.harness.localnode import LocalNode
    from exposure.net.client import send_records

    def dump(n) -> dict:
        doc = n.dump()
        return {k: doc[k] for k in SECTIONS}

    def agree(sub: Subscriber, want: dict, epoch: int = 0) -> None:
        pump(sub, lambda: (sub.state == "live" and sub.epoch > epoch
                           and compare_documents(sub.document(), want) == []),
             f"the feed to agree with dump ({compare_documents(sub.document(), want)[:3]})",
             timeout=60)

    n = LocalNode(tmp_path)
    subs: list[Subscriber] = []
    try:
        early = Subscriber.from_config(n.config)
        subs.append(early)
        lossy = Subscriber.from_config(n.config, drop_every=10)
        subs.append(lossy)
        # The subscribers take the stream while it flows, in many small batches (frames of
        # 8 events at 2,000 events/s), the lossy one recovering under way.
        recs = read_events(DATA / "mixed-1000.jsonl")
        res: list = []
        t = threading.Thread(target=lambda: res.append(send_records(
            "127.0.0.1", n.port, recs, session=1, frame=8, rate=2000)))
        t.start()
        try:
            while t.is_alive():
                for s in subs:
                    s.poll(0.005)
        finally:
            t.join(60)
        assert res and res[0]["acknowledged"] == len(recs), res
        want = dump(n)
        assert want["accounts"] and want["fund"]["gross"] > 0
        late = Subscriber.from_config(n.config)
        subs.append(late)
        for s in subs:
            agree(s, want)
        assert early.counters["incrementals"] > 20 and early.counters["gaps"] == 0
        assert lossy.counters["dropped"] > 0 and lossy.counters["gaps"] > 0
        # (the join's snapshot and the first gap's may be one: a gap seen before the join
        # requests its snapshot is served by it, as under load, when the first datagrams
        # arrive together; the gap rules are counted exactly in the unit tests above)
        assert lossy.counters["recoveries"] >= 1 and late.counters["recoveries"] >= 1
        # exposure watch, joining now (after the stream), losing every 10th datagram too
        p = n.cli("watch", "--seconds", "3", "--drop-every", "10", "--json", timeout=60)
        assert p.returncode == 0, p.stderr.decode()
        assert compare_documents(orjson.loads(p.stdout.splitlines()[-1]), want) == []
        # A restart (kill -9): a new epoch; every subscriber drops its view and rebuilds it
        # from the new incarnation's snapshot and incrementals.
        epoch = early.epoch
        n.kill9()
        n.start()
        p = n.cli("send", str(DATA / "basic.jsonl"), "--session", "2")
        assert p.returncode == 0, p.stderr.decode()
        want = dump(n)
        for s in subs:
            agree(s, want, epoch)
            assert s.counters["epoch_changes"] == 1 and s.counters["bad_datagrams"] == 0
        print([s.counters for s in subs])
    finally:
        for s in subs:
            s.close()
        n.stop()


@pytest.mark.timeout(300)
def test_a_node_stopped_while_a_subscriber_joins_is_given_up_then_followed_after_sigcont(
        tmp_path):
    """Every process of a real node SIGSTOPped (a hung machine: its kernel still accepts
    the snapshot connection) while a subscriber joins: each fetch gives up after
    snapshot_timeout of silence, the feed is reported silent; after SIGCONT the next
    fetch succeeds and the view equals what dump prints."""
    import signal

    from support import DATA

    from exposure.harness.localnode import LocalNode, listening
    from exposure.harness.wait import wait_for

    n = LocalNode(tmp_path)
    sub = None
    try:
        p = n.cli("send", str(DATA / "basic.jsonl"))
        assert p.returncode == 0, p.stderr.decode()
        want = {k: v for k, v in n.dump().items() if k in SECTIONS}
        wait_for(lambda: listening("127.0.0.1", n.sport), 60, "the recovery server", n)
        n.signal_all(signal.SIGSTOP)
        try:
            bound = 1.0
            sub = Subscriber.from_config(n.config, snapshot_timeout=bound,
                                         backoff=(0.05, 0.5), join_wait=0.0)
            assert sub.liveness_s == 1.0  # 10 feed heartbeats of 100 ms
            t0 = time.monotonic()
            pump(sub, lambda: sub.counters["snapshot_errors"] >= 1,
                 "the fetch from the stopped node given up", timeout=bound + 4.0)
            assert time.monotonic() - t0 >= bound * 0.9
            assert f"silent for {bound:g} s" in sub.last_snapshot_error
            pump(sub, lambda: sub.silent, "the feed reported silent", timeout=5.0)
            assert sub.state == "joining"
        finally:
            n.signal_all(signal.SIGCONT)
        pump(sub, lambda: (sub.state == "live" and not sub.silent
                           and compare_documents(sub.document(), want) == []),
             "the view after SIGCONT", timeout=60)
        print(sub.counters)
    finally:
        if sub is not None:
            sub.close()
        n.stop()
