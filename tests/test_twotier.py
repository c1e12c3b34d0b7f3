"""The two-tier baseline (perf/twotier.py): a real redis-server and a real service process.

The baseline keeps the state in Redis and runs the node's kernel on rows fetched per batch;
these tests hold it to exactly the node's results: every scenario's expected document, the
offline replay of a generated day (the raw tables, byte for byte, not only the document),
the fan-out's datagram format and stream sequence, and honest round-trip statistics. An
in-process test with tiny tables (long probe runs, wrap-around, deletions by backward
shift, capacity rejects) checks after every batch that no row outside the fetched ones was
touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

if shutil.which("redis-server") is None:
    pytest.skip("redis-server is not installed (Debian package redis-server): the two-tier "
                "baseline needs a real Redis", allow_module_level=True)
pytest.importorskip("redis", reason="the redis package (redis-py) is not installed")

from support import DATA, SCENARIOS, load_expected, read_stream  # noqa: E402

from exposure.bench.flowgen import generate  # noqa: E402
from exposure.bench.twotier import RedisServer, TwoTier, load_state  # noqa: E402
from exposure.core import types as T
from exposure.core.capacity import Capacities  # noqa: E402
from exposure.engine.document import compare_documents, document  # noqa: E402
from exposure.engine.parse import parse_events, read_events  # noqa: E402
from exposure.engine.replay import replay_records  # noqa: E402
from exposure.feed.wire import open_receiver  # noqa: E402
from exposure.harness.localnode import free_port  # noqa: E402
from exposure.net import wire as W
from exposure.net.client import send_records  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CAPS = Capacities(orders=65536, cells=65536)


# ----------------------------------------------------------------------------- helpers
def state_diffs(got, want) -> list[str]:
    """Tables of two states that differ, byte for byte. Batch scratch is left out (the
    batch stamp and the changed list depend on how the stream was cut into batches), and
    an empty order slot compares equal to any other (deletion leaves stale bytes there)."""
    def clean(rows):  # the dirty flags are batch scratch too
        r = rows.copy()
        r["dirty"] = 0
        return r.tobytes()

    out = [name for name in ("fund", "acc", "acc_lim", "acc_live", "acc_gseq", "sec", "cidx")
           if getattr(got, name).tobytes() != getattr(want, name).tobytes()]
    if clean(got.inst) != clean(want.inst):
        out.append("inst")
    cg, cw = got.ctr.copy(), want.ctr.copy()
    scratch = [T.C_STAMP, T.C_NCHANGED, T.C_NICHANGED, T.C_NSCHANGED, T.C_NCCHANGED]
    cg[scratch] = cw[scratch] = 0
    if cg.tobytes() != cw.tobytes():
        out.append("ctr")
    n = int(want.ctr[T.C_CELLS])
    if clean(got.cells[:n]) != clean(want.cells[:n]):
        out.append("cells")

    def live(orders):
        o = orders.copy()
        o[orders["cell"] < 0] = np.zeros(1, T.ORDER_DTYPE)[0]
        o["cell"][orders["cell"] < 0] = -1
        return o.tobytes()

    if live(got.orders) != live(want.orders):
        out.append("orders")
    return out


def tricky() -> np.ndarray:
    """Cases where a batch reads what an earlier record of the same batch wrote: an order's
    new, replace, fills and deletion; a key reused at once; a block of 16 sequential ids
    (one probe run) with deletions in its middle and reinserts; unmarked instruments whose
    order prices revalue every cell (order and instrument known only through the batch);
    a sector move with open positions; late fills creating cells; marks; limits."""
    ev: list[dict] = [
        {"type": "instrument", "instrument": 7, "multiplier": 1.0, "margin_rate": 0.2,
         "beta": 1.1, "sector": 1},
        {"type": "instrument", "instrument": 8, "multiplier": 10.0, "margin_rate": 0.3,
         "beta": 0.9, "sector": 2},
        {"type": "position", "account": 1, "instrument": 7, "qty": 100, "price": 10.0},
        {"type": "position", "account": 2, "instrument": 7, "qty": -50, "price": 10.0},
        {"type": "position", "account": 3, "instrument": 8, "qty": 5},
        {"type": "new", "source": 0, "order_id": 1, "account": 1, "instrument": 7,
         "side": "buy", "qty": 100, "price": 0},
        {"type": "replace", "source": 0, "order_id": 1, "qty": 200, "price": 11.0},
        {"type": "fill", "source": 0, "order_id": 1, "account": 1, "instrument": 7,
         "side": "buy", "qty": 50, "price": 11.5},
        {"type": "instrument", "instrument": 7, "multiplier": 2.0, "margin_rate": 0.25,
         "beta": 1.0, "sector": 3},
        {"type": "fill", "source": 0, "order_id": 1, "account": 1, "instrument": 7,
         "side": "buy", "qty": 150, "price": 11.6},
        {"type": "new", "source": 0, "order_id": 1, "account": 2, "instrument": 8,
         "side": "sell", "qty": 10, "price": 0},
        {"type": "replace", "source": 0, "order_id": 1, "qty": 12, "price": 20.0},
        {"type": "cancel", "source": 0, "order_id": 1},
    ]
    for k in range(16, 32):
        ev.append({"type": "new", "source": 1, "order_id": k, "account": 1 + k % 3,
                   "instrument": 7 + k % 2, "side": ("buy", "sell", "short")[k % 3],
                   "qty": 10 + k, "price": 0 if k % 4 == 0 else 9.0 + k / 10})
    ev += [
        {"type": "cancel", "source": 1, "order_id": 20},
        {"type": "fill", "source": 1, "order_id": 21, "account": 2, "instrument": 8,
         "side": "buy", "qty": 31, "price": 12.0},
        {"type": "done", "source": 1, "order_id": 22},
        {"type": "replace", "source": 1, "order_id": 23, "qty": 5, "price": 12.5},
        {"type": "new", "source": 1, "order_id": 20, "account": 4, "instrument": 9,
         "side": "buy", "qty": 7, "price": 3.0},
        {"type": "fill", "source": 1, "order_id": 22, "account": 1, "instrument": 7,
         "side": "buy", "qty": 3, "price": 12.0},
        {"type": "mark", "instrument": 7, "price": 12.25},
        {"type": "fill", "source": 2, "order_id": 5, "account": 5, "instrument": 9,
         "side": "sell", "qty": 4, "price": 3.5},
        {"type": "mark", "instrument": 9, "price": 3.25},
        {"type": "instrument", "instrument": 9, "multiplier": 5.0, "margin_rate": 0.5,
         "beta": 2.0, "sector": 2},
        {"type": "limit", "account": 1, "gross": 1000.0, "net": 500.0, "margin": 100.0,
         "loss": 10.0},
        {"type": "fill", "source": 1, "order_id": 24, "account": 3, "instrument": 7,
         "side": "short", "qty": 40, "price": 12.0},
        {"type": "cancel", "source": 1, "order_id": 99},
        {"type": "new", "source": 1, "order_id": 25, "account": 2, "instrument": 8,
         "side": "sell", "qty": 1, "price": 1.0},
        {"type": "mark", "instrument": 8, "price": 21.0},
        {"type": "position", "account": 1, "instrument": 7, "qty": 0},
    ]
    return parse_events("\n".join(json.dumps(e) for e in ev).encode())


def session_send(port: int, recs: np.ndarray, sizes: list[int], session: int = 1,
                 timeout: float = 120.0) -> list[int]:
    """Send ``recs`` as one session (seqs 1..n) in frames of the given sizes (cycled);
    wait until all are acknowledged; return the ACK's rejects per reason."""
    recs = recs.copy()
    recs["sseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)
    rd = W.FrameReader()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(W.encode_login(session))
        lo, k = 0, 0
        while lo < len(recs):
            part = recs[lo:lo + sizes[k % len(sizes)]]
            part["send_ns"] = time.time_ns()
            s.sendall(W.encode_events(part))
            lo += len(part)
            k += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for kind, payload in rd.feed(s.recv(65536)):
                assert kind != W.K_REJECT, payload
                if kind == W.K_ACK:
                    seq, rejects = W.decode_ack(payload)
                    if seq >= len(recs):
                        return rejects
        raise AssertionError("not every record was acknowledged in time")


def generated_day(seed: int) -> np.ndarray:
    """A realistic generated day (reference data, limits, positions, marks, then new,
    fill, cancel and replace flow with late fills) with the tricky batch in its middle."""
    day = generate(4000, accounts=40, instruments=300, universe=30, live_target=60, seed=seed)
    mid = len(day) // 2
    recs = np.concatenate([day[:mid], tricky(), day[mid:]])
    recs["gseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)  # what ingest assigns
    return recs


# ----------------------------------------------------------------------------- fixtures
class Service:
    """A real ``python -m exposure.bench.twotier`` with its own ports and multicast group."""

    def __init__(self, tmp: Path, redis_port: int):
        self.tmp = tmp
        self.name = f"tt{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.port, self.mport = free_port(), free_port()
        self.group = f"239.255.{os.getpid() % 250}.{1 + int(uuid.uuid4().hex[:2], 16) % 250}"
        self.config = tmp / f"{self.name}.toml"
        self.config.write_text(
            f'[node]\nname = "{self.name}"\n[capacities]\norders = {CAPS.orders}\n'
            f"cells = {CAPS.cells}\n[ingest]\nport = {self.port}\n[fanout]\n"
            f'port = {self.mport}\ngroup = "{self.group}"\n')
        self.out = open(tmp / f"{self.name}.out", "w+b")
        self.err = open(tmp / f"{self.name}.err", "w+b")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exposure.bench.twotier", "--port", str(self.port), "--group",
             self.group, "--mport", str(self.mport), "--redis-port", str(redis_port),
             "--config", str(self.config), "--max-batch", "64", "--wait", "block"],
            cwd=REPO, stdout=self.out, stderr=self.err)
        self.stats: dict | None = None
        deadline = time.time() + 240  # the first run compiles the jitted code
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited: {self.stderr()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError("the service did not start listening") from None
                time.sleep(0.1)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")

    def stop(self) -> dict | None:
        """SIGTERM; returns the statistics line it printed (None if it printed none)."""
        if self.out.closed:
            return self.stats
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.seek(0)
        lines = self.out.read().decode().splitlines()
        self.stats = json.loads(lines[0]) if lines else None
        self.lines = lines
        self.out.close()
        self.err.close()
        return self.stats

    def ring_left(self) -> bool:
        return os.path.exists(f"/dev/shm/exposure.twotier.{self.proc.pid}.ring")


@pytest.fixture
def redis_server(tmp_path):
    srv = RedisServer(tmp_path / "redis", port=free_port())
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def service(tmp_path, redis_server):
    svc = Service(tmp_path, redis_server.port)
    try:
        yield svc
    finally:
        svc.stop()
    assert not svc.ring_left(), "the service left its ring segment behind"


def _redis_doc(srv: RedisServer) -> tuple[dict, object]:
    c = srv.client()
    try:
        st = load_state(c, CAPS)
    finally:
        c.close()
    return document(st), st


# ----------------------------------------------------------------------------- tests
@pytest.mark.process
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", SCENARIOS)
def test_every_scenario_through_redis_gives_its_expected_document(name, service,
                                                                  redis_server):
    recs = read_events(DATA / f"{name}.jsonl")
    res = send_records("127.0.0.1", service.port, recs, session=1, timeout=120)
    want = load_expected(name)
    assert res["acknowledged"] == res["sent"] == len(recs)
    assert res["rejected"] == want["counts"]["rejected"]
    doc, st = _redis_doc(redis_server)
    assert compare_documents(doc, want) == []
    replay = replay_records(recs, CAPS)
    assert compare_documents(doc, document(replay)) == []
    assert state_diffs(st, replay) == []


@pytest.mark.process
@pytest.mark.timeout(400)
def test_a_generated_day_in_frames_of_every_size_equals_the_offline_replay(service,
                                                                           redis_server):
    seed = int.from_bytes(os.urandom(2), "little")
    print(f"generated day: seed {seed}")
    recs = generated_day(seed)
    assert len({int(t) for t in recs["type"]} & {T.T_NEW, T.T_FILL, T.T_CANCEL, T.T_REPLACE,
                                                 T.T_MARK}) == 5
    n_tricky = len(tricky())
    mid = (len(recs) - n_tricky) // 2
    first = recs[:mid]
    session_send(service.port, first, [1, 2, 5, 17, 64, 100, 333, 1000])
    # the tricky records in one frame, alone in the ring: one batch of the service
    session_send(service.port, recs[mid:mid + n_tricky], [n_tricky], session=2)
    session_send(service.port, recs[mid + n_tricky:], [1000, 7, 64, 1, 250], session=3)
    doc, st = _redis_doc(redis_server)
    replay = replay_records(recs, CAPS)
    assert compare_documents(doc, document(replay)) == [], f"seed {seed}"
    assert state_diffs(st, replay) == [], f"seed {seed}"
    stats = service.stop()
    assert stats["events"] == len(recs)
    assert 1 < stats["max_batch"] <= 64  # batches of several records happened


@pytest.mark.process
@pytest.mark.timeout(400)
def test_multicast_updates_parse_and_have_contiguous_stream_seqs(service, redis_server):
    rx = open_receiver(service.group, service.mport)
    rx.settimeout(1.0)
    try:
        recs = read_events(DATA / "clean-5000.jsonl")
        session_send(service.port, recs, [1, 64, 500])
        def check(d):
            assert d.epoch == 0 and d.sent_ns > 0 and len(d.updates) > 0

        seqs, latest = read_stream(rx, check)
    finally:
        rx.close()
    assert seqs == list(range(1, len(seqs) + 1)), "a gap in the stream"
    doc, _ = _redis_doc(redis_server)
    for row in doc["accounts"]:
        u = latest[row["account"]]
        for k in ("long_mv", "short_mv", "gross", "net", "worst_gross", "margin", "pnl"):
            assert u[k] == pytest.approx(row[k], abs=1e-6), (row["account"], k)
        assert u["live_orders"] == row["live_orders"] and u["breach"] == row["breach"]
    assert latest[-1]["gross"] == pytest.approx(doc["fund"]["gross"])
    assert latest[-1]["live_orders"] == doc["fund"]["live_orders"]


@pytest.mark.process
@pytest.mark.timeout(400)
def test_the_statistics_line_reports_events_and_two_round_trips_per_batch(service):
    recs = read_events(DATA / "mixed-1000.jsonl")
    session_send(service.port, recs, [1, 3, 64, 200])
    stats = service.stop()
    assert service.proc.returncode == 0, service.stderr()
    assert len(service.lines) == 1, service.lines
    assert set(stats) == {"events", "batches", "redis_round_trips", "round_trips_per_batch",
                          "max_batch"}
    assert stats["events"] == len(recs)
    assert stats["round_trips_per_batch"] == 2
    assert stats["redis_round_trips"] == 2 * stats["batches"]
    assert 1 <= stats["max_batch"] <= 64
    assert len(recs) / 64 <= stats["batches"] <= len(recs)
    assert not service.ring_left()


def _tiny_streams(seed: int, caps: Capacities, marks: bool) -> np.ndarray:
    """A generated day folded onto tiny id spaces (some ids out of range, order keys
    reused), with the tricky batch in the middle; without marks, every order price moves
    its instrument's reference price and revalues all of its cells."""
    day = generate(3000, accounts=60, instruments=300, universe=30, live_target=40,
                   sources=4, seed=seed)
    day["account"] %= caps.accounts + 1
    day["instrument"] %= caps.instruments + 1
    day["sector"] %= caps.sectors + 1
    day["order_id"] %= 97
    if not marks:
        day = day[day["type"] != T.T_MARK]
    mid = len(day) // 2
    recs = np.concatenate([day[:mid], tricky(), day[mid:]])
    recs["gseq"] = np.arange(1, len(recs) + 1, dtype=np.uint64)
    return recs


@pytest.mark.process
@pytest.mark.timeout(400)
@pytest.mark.parametrize("orders,cells", [(16, 40), (64, 300)])
def test_in_process_tiny_tables_every_batch_touches_only_fetched_rows(redis_server, orders,
                                                                      cells):
    caps = Capacities(accounts=8, instruments=16, sectors=4, sources=3, orders=orders,
                      cells=cells)
    client = redis_server.client()
    svc = TwoTier(client, caps, max_batch=64)
    try:
        for seed, marks in ((1, True), (2, False)):
            client.flushall()
            client.set("meta", json.dumps(caps.as_dict(), sort_keys=True))
            recs = _tiny_streams(seed, caps, marks)
            rng = np.random.default_rng(seed)
            k = 0
            while k < len(recs):
                n = int(rng.choice([1, 2, 3, 8, 33, 64]))
                part = recs[k:k + n]
                svc.recs[:len(part)] = part
                svc.run_batch(len(part))
                assert svc.scratch_is_pristine(), f"seed {seed}: batch at {k} left rows"
                k += len(part)
            st = load_state(client, caps)
            replay = replay_records(recs, caps)
            assert compare_documents(document(st), document(replay)) == [], seed
            assert state_diffs(st, replay) == [], seed
            # emptied order slots were deleted: Redis holds exactly the live orders
            assert sum(1 for _ in client.scan_iter("o:*")) == int(st.ctr[T.C_LIVE])
            assert sum(1 for _ in client.scan_iter("x:*")) == int(st.ctr[T.C_CELLS])
        assert svc.stats()["round_trips_per_batch"] == 2
    finally:
        svc.close()
        client.close()


@pytest.mark.timeout(60)
def test_a_missing_redis_server_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    with pytest.raises(RuntimeError, match="redis-server"):
        RedisServer(tmp_path)


@pytest.mark.process
@pytest.mark.timeout(60)
def test_redis_server_answers_and_stops(tmp_path):
    with RedisServer(tmp_path / "r") as srv:
        c = srv.client()
        assert c.ping()
        c.close()
        port = srv.port
    assert srv.proc.poll() is not None
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


@pytest.mark.timeout(60)
def test_the_row_offsets_the_lua_scripts_read_are_the_layouts():
    # The scripts read ids out of rows at fixed offsets; keep them honest.
    assert T.ORDER_DTYPE.fields["cell"][1] == 24 and T.ORDER_DTYPE.fields["source"][1] == 28
    assert T.CELL_DTYPE.fields["account"][1] == 48 and T.CELL_DTYPE.fields["next"][1] == 56
    assert T.CELL_DTYPE.fields["instrument"][1] == 52
    assert T.INSTRUMENT_DTYPE.fields["head"][1] == 64
    assert T.INSTRUMENT_DTYPE.fields["sector"][1] == 68
    assert T.INSTRUMENT_DTYPE.fields["marked"][1] == 72
    assert T.CELLIDX_DTYPE.fields["id"][1] == 8
