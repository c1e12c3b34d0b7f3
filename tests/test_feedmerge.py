"""The subscriber's jitted hot path (exposure.feed.merge) against plain models of its rules,
on seeded random input: the merge (duplicate ids, equal gseqs, re-sent states with
different tags and padding, bad ids, tables that must grow) and the datagram scan (losses,
duplicates, epochs, malformed and hostile datagrams, through a real socket)."""

import os
import socket
import time

import numpy as np
import pytest

from exposure.core.types import (
    ROW_ACCOUNT,
    ROW_DTYPES,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SECTOR,
    UPDATE_DTYPE,
)
from exposure.feed.merge import ROW_WORDS
from exposure.feed.subscriber import Subscriber
from exposure.feed.wire import (
    DG_HEARTBEAT,
    DG_INCREMENTAL,
    DG_REFRESH,
    DGRAM_HEADER,
    DGRAM_MAGIC,
    dgram_word,
)
from exposure.harness.localnode import free_group, free_port

pytestmark = pytest.mark.process

# Feed version 4: position rows (by cell id) and limits rows (by account) too.
KINDS = (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR, ROW_POSITION, ROW_LIMITS)
DTYPES = ROW_DTYPES
BOUNDS = {ROW_ACCOUNT: 3000, ROW_FUND: 1, ROW_INSTRUMENT: 9000, ROW_SECTOR: 300,
          ROW_POSITION: 5000, ROW_LIMITS: 3000}


def _state(kind: int, row) -> tuple:
    """What the rule compares: the breach byte and the kind's fields after the head."""
    dt = DTYPES[kind]
    return (int(row["breach"]),) + tuple(
        row[n].item() for n in dt.names if dt.fields[n][1] >= 56)


class Model:
    """The rule, row by row, from the module docstring of exposure.feed.subscriber."""

    def __init__(self):
        self.view: dict[tuple[int, int], tuple[int, tuple, bytes]] = {}
        self.bad = 0

    def merge(self, rows: np.ndarray, replace_equal: bool) -> dict:
        raw = rows.view(np.uint64).reshape(len(rows), ROW_WORDS)  # whole rows, padding too
        best: dict[tuple[int, int], int] = {}
        for j, r in enumerate(rows):
            kind, rid = int(r["kind"]), int(r["account"])
            if kind not in BOUNDS:
                self.bad += 1
                continue
            if kind == ROW_FUND:
                if rid != -1:
                    self.bad += 1
                    continue
            elif not 0 <= rid < BOUNDS[kind]:
                self.bad += 1
                continue
            key = (kind, rid)
            if key not in best or r["gseq"] >= rows[best[key]]["gseq"]:
                best[key] = j
        changed = {}
        for key, j in sorted(best.items()):
            kind = key[0]
            st = _state(kind, rows[j:j + 1].view(DTYPES[kind])[0])
            cur = self.view.get(key)
            g = int(rows[j]["gseq"])
            if cur is None or g > cur[0] or (replace_equal and g == cur[0] and st != cur[1]):
                changed[key] = cur[1][0] if cur else 0
                self.view[key] = (g, st, raw[j].tobytes())
        return changed


def _batch(rng, n: int, pool: np.ndarray) -> np.ndarray:
    rows = np.zeros(n, UPDATE_DTYPE)
    u8 = rows.view(np.uint8).reshape(n, 8 * ROW_WORDS)
    u8[:] = rng.integers(0, 256, u8.shape, dtype=np.uint8)  # padding and tags: noise
    kinds = rng.choice(np.array(KINDS), n)
    rows["kind"] = kinds
    ids = rng.integers(0, 40, n)
    ids[kinds == ROW_FUND] = -1
    ids[rng.random(n) < 0.03] = rng.choice([-7, 3000, 9000, 300, 5000, 2**31 - 1], 1)[0]
    far = rng.random(n) < 0.05  # beyond the tables' first sizes, within the bounds
    ids[far & (kinds == ROW_ACCOUNT)] = 2900
    ids[far & (kinds == ROW_INSTRUMENT)] = 8191
    ids[far & (kinds == ROW_POSITION)] = 4999
    ids[far & (kinds == ROW_LIMITS)] = 2999
    rows["kind"][rng.random(n) < 0.02] = 7  # a kind beyond the known ones: a bad row
    rows["account"] = ids
    rows["gseq"] = rng.integers(1, 12, n)
    # States from a small pool, so that equal gseqs often carry equal states.
    body = pool[rng.integers(0, len(pool), n)]
    for k in KINDS:  # field by field: the padding between and after them stays noise
        m = np.flatnonzero(kinds == k)
        dt = DTYPES[k]
        mine, theirs = rows.view(dt), body.view(dt)
        for name in dt.names:
            if dt.fields[name][1] >= 56:
                mine[name][m] = theirs[name][m]
    rows["breach"] = rng.integers(0, 2, n)
    return rows


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [int(os.environ.get("EXPOSURE_SEED", 0)) or 1, 2, 3])
def test_merge_rows_equals_the_per_row_model(seed):
    print("seed", seed)
    rng = np.random.default_rng(seed)
    pool = np.zeros(6, UPDATE_DTYPE)
    pool.view(np.uint64)[:] = rng.integers(0, 2**63, 6 * ROW_WORDS, dtype=np.uint64)
    sub = Subscriber("239.255.77.99", 0, accounts=BOUNDS[ROW_ACCOUNT],
                     instruments=BOUNDS[ROW_INSTRUMENT], sectors=BOUNDS[ROW_SECTOR],
                     cells=BOUNDS[ROW_POSITION])
    model = Model()
    try:
        for step in range(300):
            rows = _batch(rng, int(rng.integers(0, 60)), pool)
            replace_equal = bool(rng.random() < 0.5)
            want = model.merge(rows, replace_equal)
            out: list = []
            sub._merge(rows, replace_equal, out)
            got = {}
            for b in out:
                assert list(b.ids) == sorted(b.ids), "ids ascending within a kind"
                raw = b.rows.view(np.uint64).reshape(len(b.rows), ROW_WORDS)
                for i, r, p in zip(b.ids.tolist(), raw, b.prev.tolist(), strict=True):
                    key = (b.kind, i)
                    assert key not in got, f"step {step}: {key} changed twice"
                    got[key] = p
                    assert r.tobytes() == model.view[key][2], \
                        f"step {step}: {key} the winning row"
            assert got == want, f"step {step} (replace_equal {replace_equal})"
            assert [b.kind for b in out] == sorted(b.kind for b in out)
        assert sub.counters["bad_rows"] == model.bad
        for (kind, i), (_g, _st, raw) in model.view.items():
            t = sub.table(kind)
            assert t.view(np.uint64).reshape(len(t), ROW_WORDS)[max(i, 0)].tobytes() == raw
        present = sum(len(sub.present(k)) for k in KINDS)
        assert present == len(model.view)
    finally:
        sub.close()


# ----------------------------------------------------------------------------- datagrams
def _model_scan(dgrams, epoch0, servers: bool, drop_every: int):
    """The subscriber's datagram rules, datagram by datagram (what exposure.feed.subscriber did in
    Python before the scan was jitted): counters, epoch, last seq, loss generations."""
    from exposure.feed.wire import parse_datagram

    ctr = dict.fromkeys(("datagrams", "incrementals", "refreshes", "heartbeats", "gaps",
                         "missed", "stale_epoch", "bad_datagrams", "dropped",
                         "epoch_changes"), 0)
    epoch, seq, want, joined = epoch0, None, 0, False
    rows: dict = {}
    for raw in dgrams:
        ctr["datagrams"] += 1
        if drop_every and ctr["datagrams"] % drop_every == 0:
            ctr["dropped"] += 1
            continue
        try:
            d = parse_datagram(raw)
        except ValueError:
            ctr["bad_datagrams"] += 1
            continue
        if d.seq >= 2**63:
            ctr["bad_datagrams"] += 1
            continue
        if d.epoch < epoch:
            ctr["stale_epoch"] += 1
            continue
        if d.epoch > epoch:
            if epoch:
                ctr["epoch_changes"] += 1
            rows = {}
            epoch, seq = d.epoch, None
        ctr[{DG_INCREMENTAL: "incrementals", DG_REFRESH: "refreshes"}.get(
            d.type, "heartbeats")] += 1
        if seq is None:
            seq = d.seq
            want += 1
        elif d.type == DG_INCREMENTAL:
            if d.seq > seq + 1:
                ctr["gaps"] += 1
                ctr["missed"] += d.seq - seq - 1
                want += 1
            seq = max(seq, d.seq)
        elif d.seq > seq:
            ctr["gaps"] += 1
            ctr["missed"] += d.seq - seq
            want += 1
            seq = d.seq
        if not servers:
            joined = True
        for r in d.updates if d.type != DG_HEARTBEAT else ():  # (a heartbeat's: ignored)
            key = (int(r["kind"]), int(r["account"]))
            if key not in rows or r["gseq"] > rows[key]:
                rows[key] = int(r["gseq"])
    return ctr, epoch, seq, want, joined, rows


def _datagram(rng, epoch: int, seq: int, kind_of: int) -> bytes:
    n = int(rng.integers(0, 5))
    r = np.zeros(n, UPDATE_DTYPE)
    r["kind"] = rng.choice(np.array(KINDS), n)
    r["account"] = rng.integers(0, 20, n)
    r["account"][r["kind"] == ROW_FUND] = -1
    r["gseq"] = rng.integers(1, 50, n)
    dtype = kind_of
    hdr = DGRAM_HEADER.pack(DGRAM_MAGIC, epoch, seq, *dgram_word(n, dtype), 0)
    return hdr + r.tobytes()


def _spoil(rng, d: bytes) -> bytes:
    """A malformed or hostile variant of a datagram."""
    b = bytearray(d)
    what = int(rng.integers(0, 7))
    if what == 0:
        return bytes(b[: int(rng.integers(0, 32))])          # shorter than a header
    if what == 1:
        b[0] ^= 0xFF                                          # magic
    elif what == 2:
        b[19] = (b[19] + 1) & 0xFF                            # version
    elif what == 3:
        b[18] = 9                                             # type
    elif what == 4:
        return bytes(b) + b"\0" * 7                           # length
    elif what == 5 and len(b) > 32:
        b[32] = int(rng.choice([0, 7, 9, 255]))               # a row's kind (7: just past
                                                              # version 4's limits)
    else:
        b[8:16] = (2**64 - 1 - int(rng.integers(0, 3))).to_bytes(8, "little")  # seq
    return bytes(b)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [int(os.environ.get("EXPOSURE_SEED", 0)) or 11, 12, 13, 14])
def test_datagram_scan_equals_the_per_datagram_model(seed):
    """Seeded streams of datagrams (losses, duplicates, reordering, heartbeats and
    refreshes, higher and lower epochs, malformed and hostile ones) through a real socket:
    the counters, epoch, seq and rows of the view equal the per-datagram model's."""
    print("seed", seed)
    rng = np.random.default_rng(seed)
    servers = bool(seed % 2)
    drop_every = int(rng.choice([0, 0, 7]))
    group, port = free_group(), free_port()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    # Servers that never answer: the view only counts what it wants (no fetch completes).
    sub = Subscriber(group, port, snapshot=[("127.0.0.1", 9)] if servers else [],
                     drop_every=drop_every, join_wait=3600)
    try:
        dgrams, epoch, seq = [], 1, 1
        for _ in range(1500):
            u = rng.random()
            if u < 0.01:
                epoch += 1                      # a restart
                seq = 1
            kind_of = DG_INCREMENTAL if rng.random() < 0.8 else int(
                rng.choice([DG_REFRESH, DG_HEARTBEAT]))
            s = seq + (int(rng.integers(2, 5)) if rng.random() < 0.05 else 1)  # losses
            e = epoch - 1 if rng.random() < 0.02 and epoch > 1 else epoch      # stale
            d = _datagram(rng, e, s if kind_of == DG_INCREMENTAL else s - 1, kind_of)
            if rng.random() < 0.05:
                d = _spoil(rng, d)
            dgrams.append(d)
            if kind_of == DG_INCREMENTAL:
                seq = s
            if rng.random() < 0.03:
                dgrams.append(dgrams[-1])       # a duplicate
        got_rows: dict = {}
        # In bursts (so that receive batches vary) small enough for the smallest socket
        # buffer Linux gives by default (rmem_default 212,992 bytes): nothing is lost.
        burst = 41
        for k in range(0, len(dgrams), burst):
            for d in dgrams[k:k + burst]:
                tx.sendto(d, (group, port))
            end = time.monotonic() + 10
            while sub.counters["datagrams"] < min(k + burst, len(dgrams)):
                assert time.monotonic() < end, f"datagrams lost on loopback: {sub.counters}"
                for b in sub.poll_rows(0.01):
                    for i, r in zip(b.ids.tolist(), [None] * len(b.ids) if b.rows is None
                                    else b.rows["gseq"].tolist(), strict=True):
                        key = (b.kind, i)
                        if r is None:
                            got_rows.pop(key, None)
                        else:
                            got_rows[key] = r
        ctr, m_epoch, m_seq, m_want, m_joined, m_rows = _model_scan(dgrams, 0, servers,
                                                                   drop_every)
        c = sub.counters
        assert {k: c[k] for k in ctr} == ctr
        assert (sub.epoch, sub.seq, sub._want, sub._joined) == (m_epoch, m_seq, m_want,
                                                                m_joined)
        assert got_rows == m_rows
    finally:
        sub.close()
        tx.close()
