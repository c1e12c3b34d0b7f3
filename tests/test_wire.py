"""The wire protocol's framing: round trips, partial reads, and every kind of bad frame."""


import numpy as np
import pytest

from exposure.core.types import EVENT_DTYPE
from exposure.net import wire as W


def _recs(n):
    r = np.zeros(n, EVENT_DTYPE)
    r["sseq"] = np.arange(1, n + 1)
    r["type"] = 5
    return r


def test_frames_round_trip_even_one_byte_at_a_time():
    stream = (W.encode_challenge(b"n" * 32) + W.encode_login(7, b"p" * 32)
              + W.encode_events(_recs(3)) + W.encode_heartbeat()
              + W.encode_ack(3, [0, 1, 2]) + W.encode_login_ok(41)
              + W.encode_reject(W.E_SEQ, "no", 12))
    for chunk in (len(stream), 1, 5):
        rd = W.FrameReader()
        frames = []
        for k in range(0, len(stream), chunk):
            frames += rd.feed(stream[k:k + chunk])
        kinds = [k for k, _ in frames]
        assert kinds == [W.K_CHALLENGE, W.K_LOGIN, W.K_EVENTS, W.K_HEARTBEAT, W.K_ACK,
                         W.K_LOGIN_OK, W.K_REJECT]
        assert frames[0][1] == b"n" * 32
        assert W.decode_login(frames[1][1]) == (7, b"p" * 32)
        assert frames[2][1]["sseq"].tolist() == [1, 2, 3]
        assert W.decode_ack(frames[4][1]) == (3, [0, 1, 2] + [0] * 13)
        assert W.decode_reject(frames[6][1]) == (W.E_SEQ, 12, "no")
        assert rd.pending == 0


@pytest.mark.parametrize("data,message", [
    (b"\x00" * 8, "bad frame magic"),
    (b"GET / HTTP/1.1\r\n\r\n", "bad frame magic"),
    (W.HEADER.pack(W.MAGIC, 9, W.K_LOGIN, 8), "protocol version 9"),
    (W.HEADER.pack(W.MAGIC, W.VERSION, 77, 0), "unknown frame kind 77"),
    (W.HEADER.pack(W.MAGIC, W.VERSION, W.K_LOGIN, 9), "expected 40"),
    (W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, 2**31), "EVENTS frame of 2147483648 bytes"),
    (W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, 100), "EVENTS frame of 100 bytes"),
    (W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, 0), "EVENTS frame of 0 bytes"),
])
def test_a_bad_frame_is_refused_before_its_payload_is_buffered(data, message):
    with pytest.raises(W.ProtocolError, match=message):
        W.FrameReader().feed(data)


def test_a_truncated_frame_waits_and_is_reported_as_pending():
    f = W.encode_events(_recs(2))
    rd = W.FrameReader()
    assert rd.feed(f[:-1]) == []
    assert rd.pending == len(f) - 1
    assert [k for k, _ in rd.feed(f[-1:])] == [W.K_EVENTS]


def test_encoders_refuse_what_no_node_would_take():
    with pytest.raises(ValueError, match="1..8192"):
        W.encode_events(_recs(0))
    with pytest.raises(ValueError, match="1..8192"):
        W.encode_events(_recs(W.MAX_RECORDS + 1))


def test_login_flags_and_rejected_frames_round_trip():
    old = W.encode_login(7, b"p" * 32)
    assert W.encode_login(7, b"p" * 32, flags=0) == old  # today's bytes, exactly
    flagged = W.encode_login(7, b"p" * 32, flags=W.LOGIN_REJECTED)
    assert len(flagged) == len(old) and flagged != old
    (k, p), = W.FrameReader().feed(flagged)
    assert k == W.K_LOGIN and W.decode_login_flags(p) == (7, W.LOGIN_REJECTED, b"p" * 32)
    assert W.decode_login(p) == (7, b"p" * 32)
    f = W.encode_rejected(3, 20, [5, 9, 17], [2, 8, 9])
    assert len(f) == W.HEADER.size + 16 + 3 * 16
    frames = []
    rd = W.FrameReader()
    for b in f + W.encode_rejected(20, 20, [], []):
        frames += rd.feed(bytes([b]))
    assert [k for k, _ in frames] == [W.K_REJECTED, W.K_REJECTED]
    assert W.decode_rejected(frames[0][1]) == [(5, 2), (9, 8), (17, 9)]
    assert W.rejected_range(frames[0][1]) == (3, 20)
    assert W.decode_rejected(frames[1][1]) == [] and W.rejected_range(frames[1][1]) == (20, 20)
    big = W.encode_rejected(0, 2**40, np.arange(1, W.MAX_REJECTED + 1) * 2**30,
                            np.full(W.MAX_REJECTED, 3))
    (k, p), = W.FrameReader().feed(big)
    got = W.decode_rejected(p)
    assert len(got) == W.MAX_REJECTED and got[-1] == (W.MAX_REJECTED * 2**30, 3)


def test_rejected_frames_are_bounded():
    with pytest.raises(ValueError, match="0..1024"):
        W.encode_rejected(0, 1, np.arange(W.MAX_REJECTED + 1), np.ones(W.MAX_REJECTED + 1))
    with pytest.raises(ValueError):
        W.encode_rejected(0, 1, [1, 2], [1])
    h = W.HEADER
    for n in (0, 8, 24, 16 + 16 * W.MAX_REJECTED + 16, 2**31):
        with pytest.raises(W.ProtocolError, match="REJECTED frame of"):
            W.FrameReader().feed(h.pack(W.MAGIC, W.VERSION, W.K_REJECTED, n))
    with pytest.raises(W.ProtocolError):
        W.decode_rejected(b"\0" * 20)
