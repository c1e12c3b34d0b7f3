"""The FIX tag=value codec: what encode writes, and how FixReader frames a hostile byte
stream (garbage, a bad BodyLength, a bad CheckSum, a message far too long) into messages and
typed errors without raising; plus the session state machine's config validation and its
answers, without sockets."""

import random

import pytest

from exposure.fix.codec import FixError, FixMessage, FixReader, checksum, encode
from exposure.fix.session import ConfigError, MemorySeqStore, Session, SessionConfig


def er(seq, **kw):
    return encode("FIX.4.4", "8", [(37, "O1"), (17, f"E{seq}"), (150, "F"), (39, "1"),
                                   (54, "1"), (55, "AAPL"), (32, 100), (31, "10.5")],
                  sender="BROKER1", target="EXPOSURE", seq=seq, **kw)


def test_encode_computes_body_length_and_checksum():
    m = er(7, sending_time=b"20261206-12:00:00.000")
    head, _, rest = m.partition(b"\x0135=")
    body_len = int(head.split(b"9=")[1])
    assert len(b"35=" + rest) - 7 == body_len
    assert m.endswith(b"10=%03d\x01" % checksum(m[:-7]))
    assert m.startswith(b"8=FIX.4.4\x019=")


def test_a_message_reads_back_field_by_field():
    [m] = FixReader().feed(er(3, poss_dup=True, orig_sending_time=b"20261206-11:00:00.000"))
    assert isinstance(m, FixMessage)
    assert (m.msg_type, m.seq, m.poss_dup, m.poss_resend) == ("8", 3, True, False)
    assert m.get(55) == "AAPL" and m.get(122) == "20261206-11:00:00.000"
    assert m.get(9999) is None and m.get(9999, "x") == "x"
    assert m.fields[0] == (8, b"FIX.4.4") and m.fields[-1][0] == 10


def test_the_first_occurrence_of_a_repeated_tag_wins():
    [m] = FixReader().feed(encode("FIX.4.4", "8", [(448, "A"), (448, "B")], sender="S",
                                  target="T", seq=1))
    assert m.get(448) == "A" and m.count(448) == 2


def test_messages_split_anywhere_across_reads_come_out_whole():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rnd = random.Random(seed)
    stream = b"".join(er(i) for i in range(1, 201))
    r, got, pos = FixReader(), [], 0
    while pos < len(stream):
        n = rnd.randint(1, 300)
        got += r.feed(stream[pos:pos + n])
        pos += n
    assert [m.seq for m in got] == list(range(1, 201))
    assert r.buffered == 0


def test_garbage_between_messages_is_reported_and_skipped():
    got = FixReader().feed(b"hello" + er(1) + b"\x00\xff junk 8=FIY " + er(2) + b"8=FI")
    kinds = [g.kind if isinstance(g, FixError) else g.seq for g in got]
    assert kinds == ["garbage", 1, "garbage", 2]


def test_a_bad_body_length_is_an_error_and_the_next_message_still_reads():
    def relength(m, delta):
        n = int(m.split(b"\x019=")[1].split(b"\x01")[0])
        return m.replace(b"\x019=%d" % n, b"\x019=%d" % (n + delta), 1)

    # too long (it waits for the bytes, then finds no CheckSum there), too short, no number
    bad = [relength(er(1), 9), relength(er(2), -9), er(3).replace(b"\x019=", b"\x019=x", 1)]
    got = FixReader().feed(b"".join(bad) + er(4))
    assert [g.kind if isinstance(g, FixError) else g.seq for g in got] == \
        ["bad_length", "bad_length", "bad_length", 4]


def test_a_bad_checksum_is_an_error_of_one_message():
    m = er(1)
    bad = m[:-4] + (b"%03d" % ((int(m[-4:-1]) + 1) % 256)) + b"\x01"
    got = FixReader().feed(bad + er(2))
    assert isinstance(got[0], FixError) and got[0].kind == "bad_checksum"
    assert got[0].size == len(bad) and got[1].seq == 2


def test_a_message_far_too_long_is_refused_without_buffering_it():
    r = FixReader(max_message=1024)
    head = b"8=FIX.4.4\x019=10000000\x0135=8\x01"
    got = r.feed(head + b"x" * 5000)
    assert [g.kind for g in got] == ["too_long"]
    assert r.buffered < 8
    assert r.feed(er(1))[0].seq == 1


def test_random_bytes_never_raise_and_the_buffer_stays_bounded():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rnd = random.Random(seed)
    r = FixReader(max_message=512)
    pieces = [er(1), b"8=FIX.4.4\x019=", b"\x01", b"10=", b"8=FIX", b"35=8", b"9=99999\x01"]
    for _ in range(3000):
        if rnd.random() < 0.5:
            data = rnd.choice(pieces)
        else:
            data = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 40)))
        r.feed(data)
        assert r.buffered <= 512 + 64
    assert r.feed(b"\x01" * 600 + er(9))[-1].seq == 9


# --------------------------------------------------------------------------- the config
TABLE = {"role": "acceptor", "listen": "127.0.0.1:9878", "begin_string": "FIX.4.4",
         "sender_comp_id": "EXPOSURE", "target_comp_id": "BROKER1", "source": 3}


def test_a_config_table_validates_and_names_the_bad_key():
    c = SessionConfig.from_table(TABLE)
    assert c.key == "FIX.4.4:EXPOSURE->BROKER1" and c.listen_addr == ("127.0.0.1", 9878)
    for change, words in [({"role": "both"}, "role"), ({"begin_string": "FIX.4.0"},
                          "begin_string"), ({"listen": "nowhere"}, "listen"),
                          ({"source": "3"}, "source"), ({"heartbeat_s": 0}, "heartbeat_s"),
                          ({"colour": 1}, "colour"), ({"allowed": "1.2.3.4"}, "allowed")]:
        with pytest.raises(ConfigError, match=words):
            SessionConfig.from_table({**TABLE, **change})


# ------------------------------------------------------------------- the session, no I/O
class Clock:
    t = 1000.0

    def __call__(self):
        return self.t


def session(**kw):
    got = []
    clock = Clock()
    s = Session(SessionConfig.from_table({**TABLE, **kw}), MemorySeqStore(),
                lambda c, m: got.append(m.seq), clock=clock)
    return s, got, clock


def msgs(*raw):
    return FixReader().feed(b"".join(raw))


def peer(mt, fields=(), seq=1, **kw):
    return encode("FIX.4.4", mt, list(fields), sender="BROKER1", target="EXPOSURE", seq=seq,
                  **kw)


def out_types(s):
    types = [FixReader().feed(m)[0].msg_type for m in s.outbox]
    s.outbox.clear()
    return types


def test_session_logon_gap_resend_possdup_and_gapfill():
    s, got, _ = session()
    s.logon(msgs(peer("A", [(98, 0), (108, 30)]))[0])
    assert s.state == "active" and out_types(s) == ["A"]
    s.receive(msgs(er(2), er(5), er(6)))
    assert got == [2] and out_types(s) == ["2"]          # one ResendRequest for 3..
    s.receive(msgs(er(3, poss_dup=True), peer("4", [(123, "Y"), (36, 5)], seq=4,
                                              poss_dup=True)))
    assert got == [2, 3, 5, 6] and s.inbound == 7        # queued 5, 6 delivered in order
    s.receive(msgs(er(5, poss_dup=True), er(6, poss_dup=True)))
    assert got == [2, 3, 5, 6] and s.counters["possdup_dropped"] == 2
    s.receive(msgs(er(4)))                               # too low, no PossDup: Logout
    assert out_types(s) == ["5"] and s.closing


def test_session_rejects_missing_tags_and_unsupported_types_and_goes_on():
    s, got, _ = session()
    s.logon(msgs(peer("A", [(98, 0), (108, 30)]))[0])
    out_types(s)
    s.receive(msgs(peer("8", [(37, "O")], seq=2), peer("ZZ", seq=3), peer("D", seq=4),
                   peer("1", seq=5), er(6)))
    assert out_types(s) == ["3", "j", "j", "3"] and got == [6]
    assert s.counters["missing_tag"] == 2 and s.counters["unknown_msg_type"] == 1
    assert s.counters["unsupported_msg_type"] == 1 and s.inbound == 7


def test_session_heartbeat_test_request_and_a_dead_peer():
    s, _, clock = session()
    s.logon(msgs(peer("A", [(98, 0), (108, 2)]))[0])
    out_types(s)
    clock.t += 2.1
    s.tick()
    assert out_types(s) == ["0"]                    # our heartbeat
    clock.t += 1.0
    s.tick()
    assert out_types(s) == ["1"]                    # silence: a TestRequest
    s.receive(msgs(peer("1", [(112, "X")], seq=2)))
    assert out_types(s) == ["0"] and not s.closing  # we answer theirs
    clock.t += 3.0
    s.tick()
    clock.t += 3.0
    s.tick()
    assert s.closing and s.counters["peer_dead"] == 1


def test_session_answers_a_resend_request_with_one_gap_fill():
    s, _, _ = session()
    s.logon(msgs(peer("A", [(98, 0), (108, 30)]))[0])
    s.receive(msgs(peer("1", [(112, "a")], seq=2), peer("1", [(112, "b")], seq=3)))
    out_types(s)
    s.receive(msgs(peer("2", [(7, 1), (16, 0)], seq=4)))
    [gf] = FixReader().feed(s.outbox[0])
    assert (gf.msg_type, gf.seq, gf.get(123), gf.get(36), gf.poss_dup) == \
        ("4", 1, "Y", str(s.outbound), True)


def test_session_wrong_password_gets_a_logout():
    s, _, _ = session(password="pw")
    s.logon(msgs(peer("A", [(98, 0), (108, 30), (554, "nope")]))[0])
    assert out_types(s) == ["5"] and s.closing and s.counters["bad_password"] == 1
    s, _, _ = session(password="pw")
    s.logon(msgs(peer("A", [(98, 0), (108, 30), (554, "pw")]))[0])
    assert s.state == "active"
