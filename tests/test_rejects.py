"""Per-event reject reasons: compute's reject log (exposure.shm.reject_layout), its reader,
and the REJECTED frames a session asks for with the LOGIN flag (exposure.net.wire)."""

import random
import socket

import numpy as np
import pytest

from exposure.core.types import EVENT_DTYPE, REASON_CODES
from exposure.engine.parse import records_from_objects
from exposure.engine.publish import count_sessions
from exposure.harness.localnode import LocalNode
from exposure.harness.wait import wait_for
from exposure.net import wire as W
from exposure.shm import reject_layout as RJ
from exposure.shm.session_layout import S_DONE, S_REJ, SESSION_COLS

GOOD = {"type": "limit", "account": 7, "gross": 1e6}
BAD = [({"type": "nope"}, "bad_type"),
       ({"type": "limit", "account": 1, "loss": -5}, "bad_field"),
       ({"type": "cancel", "order_id": 77}, "unknown_order"),
       ({"type": "instrument", "instrument": 1, "multiplier": 1, "margin_rate": 0,
         "beta": 0, "sector": 256}, "out_of_range")]


# ----------------------------------------------------------------------- the log, in memory
def _batch(session, seqs, codes):
    recs = np.zeros(len(seqs), EVENT_DTYPE)
    recs["session"] = session
    recs["sseq"] = seqs
    return recs, np.asarray(codes, np.uint8)


def test_compute_logs_each_reject_and_nothing_per_accepted_event():
    sessions = np.zeros((4, SESSION_COLS), np.uint64)
    log = np.zeros(RJ.reject_shape(2), np.uint64)  # sessions 1..2 logged; 3 is not
    recs, status = _batch(1, [1, 2, 3, 4], [0, 2, 0, 5])
    recs["session"][3] = 3
    count_sessions(recs, status, 4, sessions.reshape(-1), SESSION_COLS, log.reshape(-1))
    assert int(log[1, RJ.W_HEAD]) == 1 and int(log[2, RJ.W_HEAD]) == 0
    assert int(log[1, RJ.ENTRY]) == RJ.pack(2, 2)
    assert int(sessions[3, S_REJ + 5]) == 1 and int(sessions[1, S_DONE]) == 3
    # The ring keeps the last RING rejects, in seq order.
    n = RJ.RING + 10
    recs, status = _batch(2, np.arange(1, n + 1), np.full(n, 3))
    count_sessions(recs, status, n, sessions.reshape(-1), SESSION_COLS, log.reshape(-1))
    assert int(log[2, RJ.W_HEAD]) == n
    seqs, codes = RJ.unpack(log[2, RJ.ENTRY:])
    assert sorted(seqs.tolist()) == list(range(11, n + 1)) and set(codes.tolist()) == {3}


def _log(pairs, ring_base=0):
    row = np.zeros(RJ.ROW_WORDS, np.uint64)
    row[RJ.W_BASE] = ring_base
    for k, (seq, code) in enumerate(pairs):
        row[RJ.ENTRY + k % RJ.RING] = RJ.pack(seq, code)
    row[RJ.W_HEAD] = len(pairs)
    return row


def test_the_reader_lists_what_an_ack_covers_and_says_what_was_lost():
    row = _log([(3, 2), (7, 5), (9, 1), (12, 2)])
    after, seqs, codes, cur = RJ.read_since(row, 0, 0, 10)
    assert (after, seqs.tolist(), codes.tolist(), cur) == (0, [3, 7, 9], [2, 5, 1], 3)
    after, seqs, codes, cur = RJ.read_since(row, cur, 10, 15)
    assert (after, seqs.tolist(), cur) == (10, [12], 4)
    assert RJ.read_since(row, 4, 15, 20)[0::3] == (15, 4)  # nothing new: nothing read
    # More rejects than the ring holds since the reader's last frame: the overwritten
    # ones are lost; the rest from the oldest kept on.
    n = RJ.RING + 5
    row = _log([(2 * k + 1, 4) for k in range(n)])
    after, seqs, _, cur = RJ.read_since(row, 3, 6, 2 * n)
    assert after == 2 * 5 + 1 - 1 and seqs.tolist()[0] == 11 and cur == n
    assert len(seqs) == RJ.RING
    # A reader behind everything kept, and an ACK below the oldest entry kept.
    after, seqs, _, cur = RJ.read_since(row, 0, 0, 8)
    assert (after, len(seqs), cur) == (8, 0, 5)


# ----------------------------------------------------------------------- a live node
@pytest.fixture(scope="module")
def node(tmp_path_factory):
    n = LocalNode(tmp_path_factory.mktemp("rejects"))
    try:
        yield n
    finally:
        n.stop()
    assert n.segments() == []


class Client:
    """A raw session: every frame the node sends, in order."""

    def __init__(self, node, sid: int, flags: int = 0):
        self.s = socket.create_connection(("127.0.0.1", node.port), timeout=20)
        self.rd = W.FrameReader()
        self.frames: list = []
        self.sid = sid
        self.s.sendall(W.encode_login(sid, flags=flags))

    def pump(self) -> None:
        data = self.s.recv(1 << 20)
        if not data:
            raise EOFError(f"closed after {[k for k, _ in self.frames]}")
        self.frames += self.rd.feed(data)

    def until_acked(self, seq: int) -> None:
        while not any(k == W.K_ACK and W.decode_ack(p)[0] >= seq for k, p in self.frames):
            self.pump()

    def close(self) -> None:
        self.s.close()


def _mix(seed: int, n: int):
    """``n`` events, about a third of them bad; the expected (seq, reason code) of each
    bad one."""
    rnd = random.Random(seed)
    print(f"seed {seed}")
    objs, want = [], []
    for seq in range(1, n + 1):
        if rnd.random() < 0.35:
            ev, why = rnd.choice(BAD)
            want.append((seq, REASON_CODES[why]))
        else:
            ev = GOOD
        objs.append(ev)
    recs = records_from_objects(objs)
    recs["sseq"] = np.arange(1, n + 1)
    return recs, want


def _send(c: Client, recs: np.ndarray, chunk: int = 300) -> None:
    for k in range(0, len(recs), chunk):
        c.s.sendall(W.encode_events(recs[k:k + chunk]))


def test_an_acks_counts_leave_out_the_rejects_processed_beyond_it():
    # Compute may have processed beyond what an ACK acknowledges (durability, the backup):
    # the log's rejects above the ACK's seq are what its counters must not include.
    row = _log([(3, 2), (7, 5), (9, 1), (12, 2)])
    assert RJ.counts_after(row, 12, 16) == [0] * 16  # the newest at or below: nothing
    assert RJ.counts_after(row, 8, 16)[:6] == [0, 1, 1, 0, 0, 0]  # 9 (1) and 12 (2)
    assert RJ.counts_after(row, 0, 16)[:6] == [0, 1, 2, 0, 0, 1]
    assert RJ.counts_after(_log([]), 5, 16) == [0] * 16
    # Entries above the seq overwritten: the log cannot tell (None: counts as they are).
    row = _log([(2 * k + 1, 4) for k in range(RJ.RING + 5)])
    assert RJ.counts_after(row, 3, 16) is None
    assert RJ.counts_after(row, 2 * (RJ.RING + 5) - 3, 16)[4] == 1


@pytest.mark.process
def test_a_flagged_session_gets_each_reject_before_the_ack_that_covers_it(node):
    recs, want = _mix(random.randrange(1 << 30), 2000)  # (fewer rejects than the log keeps)
    c = Client(node, 3, W.LOGIN_REJECTED)
    _send(c, recs)
    c.until_acked(len(recs))
    got, upto, acks = [], 0, 0
    for k, p in c.frames:
        if k == W.K_REJECTED:
            after, up = W.rejected_range(p)
            assert after == upto and up > upto  # nothing lost, nothing twice
            got += W.decode_rejected(p)
            upto = up
        elif k == W.K_ACK:
            seq, counts = W.decode_ack(p)
            acks += 1
            assert [s for s, _ in want if s <= seq] == [s for s, _ in got]  # all, before
            assert upto == seq or not [s for s, _ in want if upto < s <= seq]
            assert sum(counts) == len(got)
    assert got == want and acks >= 1
    c.close()
    # A new connection of the session gets the rejects the log still holds, then the ACK.
    c = Client(node, 3, W.LOGIN_REJECTED)
    c.until_acked(len(recs))
    kinds = [k for k, _ in c.frames if k != W.K_HEARTBEAT]
    assert kinds[:3] == [W.K_CHALLENGE, W.K_LOGIN_OK, W.K_REJECTED], kinds
    p = c.frames[2][1]
    assert W.rejected_range(p) == (0, len(recs)) and W.decode_rejected(p) == want
    c.close()


@pytest.mark.process
def test_a_session_without_the_flag_sees_todays_frames_only(node):
    recs, want = _mix(random.randrange(1 << 30), 1000)
    c = Client(node, 4)
    _send(c, recs)
    c.until_acked(len(recs))
    assert {k for k, _ in c.frames} <= {W.K_CHALLENGE, W.K_LOGIN_OK, W.K_ACK, W.K_HEARTBEAT}
    seq, counts = W.decode_ack([p for k, p in c.frames if k == W.K_ACK][-1])
    assert seq == len(recs) and sum(counts) == len(want)
    for why in {w for _, w in BAD}:
        code = REASON_CODES[why]
        assert counts[code] == sum(r == code for _, r in want)
    c.close()


@pytest.mark.process
def test_an_unknown_login_flag_is_refused_clearly(node):
    c = Client(node, 5, 0x6)
    wait_for(lambda: (c.pump() or any(k == W.K_REJECT for k, _ in c.frames)), 20,
             "the REJECT of an unknown flag", node)
    code, _, text = W.decode_reject(next(p for k, p in c.frames if k == W.K_REJECT))
    assert code == W.E_PROTOCOL and "flags 0x6" in text
    c.close()


@pytest.mark.process
def test_after_a_restart_the_log_is_what_recovery_replayed(node):
    """The journal replayed from its start (no snapshot yet): the rejects of session 3 come
    back whole."""
    c = Client(node, 3, W.LOGIN_REJECTED)
    c.until_acked(1)
    before = [(k, p) for k, p in c.frames if k == W.K_REJECTED]
    c.close()
    node.stop()
    node.start()
    c = Client(node, 3, W.LOGIN_REJECTED)
    c.until_acked(2000)
    after = [(k, p) for k, p in c.frames if k == W.K_REJECTED]
    assert len(before) == len(after) == 1
    assert W.rejected_range(after[0][1]) == W.rejected_range(before[0][1]) == (0, 2000)
    assert W.decode_rejected(after[0][1]) == W.decode_rejected(before[0][1])
    c.close()
