"""Ingest in-process: back-pressure from a full ring, and what a session holds after it."""

import os
import socket
import struct
import time
import uuid

import numpy as np
import pytest

from exposure.core.types import EVENT_DTYPE, EVENT_SIZE
from exposure.harness.localnode import free_port
from exposure.net import wire as W
from exposure.node.stages.ingest import IngestStage
from exposure.shm import session_layout as SL
from exposure.shm.ring import Ring
from exposure.shm.session_layout import S_HELD, SESSION_COLS

pytestmark = pytest.mark.process


@pytest.fixture
def stage():
    name = f"exposure-test-ingest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ring = Ring.create(name, 8, EVENT_SIZE)  # no consumer: it fills after 8 records
    sessions = np.zeros((5, SESSION_COLS), np.uint64)
    port = free_port()
    st = IngestStage("127.0.0.1", port, sessions, ring, next_gseq=1, max_sessions=4)
    try:
        yield st, ring, sessions, port
    finally:
        st.close()
        ring.close()


def _poll_until(st, cond, seconds=5.0):
    end = time.time() + seconds
    while not cond() and time.time() < end:
        st.wait_io(0.01)
        st.after()


def _send20(port, session):
    c = socket.create_connection(("127.0.0.1", port))
    recs = np.zeros(20, EVENT_DTYPE)
    recs["sseq"] = np.arange(1, 21)
    recs["type"] = 4
    c.sendall(W.encode_login(session) + W.encode_events(recs))
    return c


def test_a_backed_up_session_loses_nothing_even_if_the_client_leaves(stage):
    st, ring, sessions, port = stage
    c = _send20(port, 3)
    _poll_until(st, lambda: len(ring) == 8)
    assert len(ring) == 8  # 12 wait in ingest: the ring is full
    c.close()  # not read while records wait (back-pressure), so they are still pushed
    got = []
    out = np.zeros(8, EVENT_DTYPE)
    for _ in range(4):
        n = ring.pop(out)
        got += out["sseq"][:n].tolist()
        st.wait_io(0.01)
        st.after()
    _poll_until(st, lambda: not st.conns, seconds=10)  # (unacknowledged: at most 5 s)
    got += out["sseq"][:ring.pop(out)].tolist()
    assert got == list(range(1, 21)) and not st.conns
    assert int(sessions[3, S_HELD]) == 20


def test_a_session_dropped_while_records_wait_does_not_claim_them(stage):
    """A failed send to a vanished client closes the session with records still waiting:
    the node must then not claim to hold them, so the client resends them."""
    st, ring, sessions, port = stage
    c = _send20(port, 2)
    _poll_until(st, lambda: len(ring) == 8)
    (conn,) = st.conns.values()
    st._close(conn)  # the path a failed send() takes
    assert int(sessions[2, S_HELD]) == 8
    c.close()
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(W.encode_login(2))
    c.setblocking(False)
    rd, frames = W.FrameReader(), []

    def answered():
        try:
            frames.extend(rd.feed(c.recv(4096)))
        except BlockingIOError:
            pass
        return bool(frames)

    _poll_until(st, lambda: answered() and any(k == W.K_LOGIN_OK for k, _ in frames))
    assert [k for k, _ in frames][:2] == [W.K_CHALLENGE, W.K_LOGIN_OK]
    assert struct.unpack("<Q", frames[1][1])[0] == 8
    c.close()


def test_resends_are_dropped_and_a_gap_closes_the_session_with_the_expected_seq(stage):
    st, ring, sessions, port = stage
    c = socket.create_connection(("127.0.0.1", port))
    recs = np.zeros(6, EVENT_DTYPE)
    recs["sseq"] = [1, 2, 2, 5, 3, 6]  # a resend, then a gap
    c.sendall(W.encode_login(1) + W.encode_events(recs))
    c.settimeout(5)
    rd, frames = W.FrameReader(), []
    _poll_until(st, lambda: sessions[0, SL.N_SEQ_REJECTS] == 1 and not st.conns)
    while data := c.recv(4096):
        frames += rd.feed(data)
    out = np.zeros(8, EVENT_DTYPE)
    n = ring.pop(out)
    assert out["sseq"][:n].tolist() == [1, 2]  # nothing from the gap on
    assert out["gseq"][:n].tolist() == [1, 2]
    (rej,) = [p for k, p in frames if k == W.K_REJECT]
    code, expected, text = W.decode_reject(rej)
    assert (code, expected) == (W.E_SEQ, 3) and "3" in text
    assert int(sessions[1, S_HELD]) == 2
    c.close()


def test_frames_sent_before_a_half_close_are_all_taken_even_past_the_pass_budget(stage):
    """More control frames than one pass handles, then EVENTS, then the client shuts its
    write side: the EVENTS are still taken (found by the fuzzer: they were dropped)."""
    st, ring, sessions, port = stage
    c = socket.create_connection(("127.0.0.1", port))
    rec = np.zeros(1, EVENT_DTYPE)
    rec["sseq"] = 1
    rec["type"] = 4
    c.sendall(W.encode_login(1) + W.encode_heartbeat() * 1000 + W.encode_events(rec))
    c.shutdown(socket.SHUT_WR)
    _poll_until(st, lambda: len(ring) == 1)
    assert len(ring) == 1 and int(sessions[1, S_HELD]) == 1
    c.setblocking(False)
    frames, rd = [], W.FrameReader()

    def beats() -> int:
        try:
            frames.extend(rd.feed(c.recv(1 << 20)))
        except BlockingIOError:
            pass
        return sum(k == W.K_HEARTBEAT for k, _ in frames)

    _poll_until(st, lambda: beats() == 1000)
    assert beats() == 1000  # every one answered, over several passes
    c.close()


def test_an_ack_goes_out_each_time_the_processed_seq_moves_and_never_twice(stage):
    """The loop looks for ACKs to send after every pass; while a session's processed seq
    stands still, hundreds of passes send nothing, and each move is acknowledged once.
    Compute stores a session's DONE and then row 0's processed gseq; the loop looks at
    the sessions' rows only after that word has moved."""
    st, ring, sessions, port = stage
    c = socket.create_connection(("127.0.0.1", port))
    recs = np.zeros(5, EVENT_DTYPE)
    recs["sseq"] = np.arange(1, 6)
    recs["type"] = 4
    c.sendall(W.encode_login(2) + W.encode_events(recs))
    c.settimeout(5)
    rd, frames = W.FrameReader(), []

    def acks() -> list[int]:
        return [W.decode_ack(p)[0] for k, p in frames if k == W.K_ACK]

    def drain() -> None:
        try:
            c.setblocking(False)
            frames.extend(rd.feed(c.recv(4096)))
        except BlockingIOError:
            pass
        finally:
            c.setblocking(True)

    def read_until(cond) -> None:
        end = time.time() + 5
        while not cond() and time.time() < end:
            st.wait_io(0.01)
            st.after()
            drain()

    _poll_until(st, lambda: len(ring) == 5)
    read_until(lambda: acks() == [0])  # the first ACK: what compute has processed (nothing)
    for done in (3, 5):
        for _ in range(300):  # passes with nothing new: no ACK
            st.poll()
            st.after()
        sessions[2, SL.S_DONE] = done  # compute processed up to `done` ...
        for _ in range(300):  # (row 0 not yet moved: not looked at)
            st.poll()
            st.after()
        time.sleep(0.05)  # (an ACK sent would be here by now: loopback)
        drain()
        assert acks() == [0] + [3] * (done == 5)
        sessions[0, SL.N_PROCESSED] = done  # ... then stores its gseq in row 0
        read_until(lambda d=done: acks()[-1:] == [d])
    assert acks() == [0, 3, 5]  # (TCP keeps order: a repeated ACK would show before 5)
    c.close()
