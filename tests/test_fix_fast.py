"""The gateway's batch path (exposure/fix/fast.py, FixReader.feed_batch, Mapper.map_batch,
the session layer's runs) gives exactly what the message-by-message path gives: the same
framing, errors and counters on hostile streams, the same events and the same Mapper state
on seeded report streams that mix the common reports with everything that falls back, and
the same journal bytes."""

from __future__ import annotations

import random

import crc32c
import numpy as np

from exposure.core.currency import Currencies
from exposure.core.refdata import Account, Instrument, RefData
from exposure.fix import fast
from exposure.fix.codec import FixError, FixMessage, FixReader, encode
from exposure.fix.fast import COL, TAGS, FixRun
from exposure.fix.journal import K_MESSAGE, encode_record
from exposure.fix.mapping import _KEY_COLS, Mapper, _dict_records
from exposure.fix.session import MemorySeqStore, Session, SessionConfig

REF = RefData.from_rows(
    [Instrument(7, "AAPL", security_id="US0378331005", security_id_source="4"),
     Instrument(8, "MSFT"), Instrument(9, "VOD.L", currency=3)],
    [Account(3, "PM1"), Account(4, "PM2"), Account(5, "Zürich")],
    Currencies.from_table("USD", {"EUR": 1, "GBP": 3}))


def msg(fields: list[tuple[int, object]], seq: int = 1, bs: str = "FIX.4.4") -> bytes:
    return encode(bs, "8", fields, sender="BROKER1", target="EXPOSURE", seq=seq,
                  sending_time=b"20260101-00:00:00.000")


def flatten(items: list) -> list:
    out = []
    for it in items:
        if isinstance(it, FixRun):
            out += [("M", it.raw(i), it.message(i).msg_type) for i in range(it.n)]
        elif isinstance(it, FixMessage):
            out.append(("M", it.raw, it.msg_type))
        else:
            assert isinstance(it, FixError)
            out.append(("E", it.kind, it.raw, it.size, it.detail))
    return out


def test_batch_framing_equals_the_reader_on_hostile_streams():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    data = b"".join(msg([(17, f"E{k}"), (150, "0"), (11, f"C{k}")], seq=k + 1)
                    for k in range(300))
    for _ in range(200):
        d = bytearray(data[:rng.randrange(1, len(data))])
        for _ in range(rng.randrange(0, 4)):
            d[rng.randrange(len(d))] = rng.randrange(256)
        a, b = FixReader(256), FixReader(256)
        cuts = sorted(rng.sample(range(len(d) + 1), rng.randrange(1, 6))) + [len(d)]
        got_a, got_b, prev = [], [], 0
        for c in cuts:
            got_a += flatten(a.feed(bytes(d[prev:c])))
            got_b += flatten(b.feed_batch(bytes(d[prev:c])))
            prev = c
        assert got_a == got_b
        assert a.counts == b.counts and a.buffered == b.buffered


def test_the_kernel_finds_the_first_value_of_each_tag_as_get_does():
    raw = msg([(17, "E1"), (17, "E2"), (11, ""), (37, "a=b"), (1, "PM1"), (55, "\xff")]) + \
        msg([(150, "F"), (41, "X")])
    # a field without "=", and tags written with a leading zero, are not those tags
    odd = raw[:raw.index(b"17=")] + b"017=Z\x01junk\x01" + raw[raw.index(b"17="):]
    for data in (raw, odd):
        (run,) = FixReader().feed_batch(fix_checksum(data) if data is odd else data)
        for i in range(run.n):
            m = run.message(i)
            for c, t in enumerate(TAGS):
                o, n = run.vo[i, c], run.vl[i, c]
                assert (m.get_bytes(t) is None and o < 0) or m.get_bytes(t) == run.buf[o:o + n]
    assert [TAGS[c] for c in _KEY_COLS] == [17, 37, 11, 41]
    assert COL[17] == _KEY_COLS[0]


def fix_checksum(data: bytes) -> bytes:
    """One message with its BodyLength and CheckSum made right again."""
    body = data[data.index(b"\x0135=") + 1:data.rindex(b"10=")]
    head = data[:data.index(b"\x01") + 1] + b"9=%d\x01" % len(body)
    m = head + body
    return m + b"10=%03d\x01" % (sum(m) & 0xFF)


# ------------------------------------------------------------------------ the mapping
def report_stream(seed: int, n: int) -> list[list[tuple[int, object]]]:
    """A seeded day: mostly plain news, fills, replaces, cancels and dones (the batch
    path), mixed with what falls back: unknown names, odd quantities and prices,
    busts and corrections, duplicates, missing keys, FIX.4.2 ExecTransType, SecurityIDs,
    non-ASCII bytes, long values, LeavesQty spellings."""
    rng = random.Random(seed)
    out: list[list] = []
    live: list[str] = []
    trades: list[str] = []
    for k in range(n):
        r = rng.random()
        odd = rng.random() < 0.25   # this report's fields may be odd
        acct = rng.choice(["PM1", "PM2", "PM1", "PM9", None, "Z\xfcrich"] if odd
                          else ["PM1", "PM2"])
        sym = rng.choice(["AAPL", "MSFT", "VOD.L", "TSLA", "AAPL", None] if odd
                         else ["AAPL", "MSFT"])
        base: list = []
        if acct is not None:
            base.append((1, acct.encode("latin-1")))
        if sym is not None:
            base.append((55, sym))
        if odd and rng.random() < 0.2:
            base += [(48, "US0378331005"), (22, "4")]
        if rng.random() < 0.3:   # Currency (15): the instrument's, or not
            base.append((15, rng.choice(["USD", "GBP", "USD", "GBP", "usd", "EUR", "", "US"]
                                        if odd else {"AAPL": ["USD"], "MSFT": ["USD"],
                                                     "VOD.L": ["GBP"]}.get(sym, ["USD"]))))
        if not odd or rng.random() < 0.8:
            base.append((54, rng.choice("1234567" if odd else "1256")))
        lv = rng.random()
        if lv < 0.5:
            base.append((151, rng.choice(["0", "00", "0.0", "0.", "5", "05", "0x", "", "1.0"])))
        elif lv < 0.8:
            base.append((39, rng.choice("0123478CZ")))
        qty = rng.choice(["100", "100", "0100", "5.0", "0", "1" * 14, "10000000000000", "x"]
                         if odd else ["100", "20", "0100"])
        px = rng.choice(["10.25", "10", ".5", "1.", "0", "0.0", "1e3", "-1", ".",
                         "123456789012.3456", "1.5000000000000000000000001", "10.125"]
                        if odd else ["10.25", "10", ".5", "1.", "10.125"])
        if r < 0.3 or not live:
            c = f"c{k}"
            if rng.random() < 0.05:   # non-ASCII bytes in a key (one character each)
                c = (c + rng.choice(["\xe9", "\xff\x80", "\xfc"])).encode(
                    "latin-1")
            live.append(c)
            f = [(11, c), (37, rng.choice([f"o{k}", "NONE", ""])), (17, f"n{k}"),
                 (150, "0"), (38, qty), *base]
            if rng.random() < 0.8:
                f.append((44, px))
        elif r < 0.6:
            c = rng.choice(live)
            e = f"f{k}" if rng.random() < 0.95 else f"f{k}\xe9\x81".encode("latin-1")
            trades.append(e)
            f = [(11, c), (37, rng.choice(["", f"o{k}"])), (17, e),
                 (150, rng.choice("FFF12")), (32, qty), (31, px), *base]
            if rng.random() < 0.1:
                f = [x for x in f if x[0] != 11]
        elif r < 0.7:
            c = rng.choice(live)
            c2 = f"c{k}"
            live[live.index(c)] = c2
            f = [(11, c2), (41, rng.choice([c, c2, "?" * 300])), (37, "o"), (17, f"r{k}"),
                 (150, rng.choice("5D")), (38, qty), *base]
            if rng.random() < 0.7:
                f.append((44, px))
        elif r < 0.78:
            c = rng.choice(live)
            f = [(11, f"c{k}"), (41, c), (37, "o"), (17, f"x{k}"), (150, rng.choice("4C38")),
                 *base]
        elif r < 0.82 and trades:
            f = [(11, rng.choice(live)), (37, "o"), (17, f"b{k}"), (150, "H"),
                 (19, rng.choice(trades))]
        elif r < 0.86 and trades:
            e = f"g{k}"
            f = [(11, rng.choice(live)), (37, "o"), (17, e), (150, "G"),
                 (19, rng.choice(trades)), (32, "7"), (31, "10.1"), *base]
            trades.append(e)
        elif r < 0.92 and out:
            f = list(rng.choice(out))   # a resend: the same ExecID
        elif r < 0.95:
            f = [(11, rng.choice(live)), (37, "o"), (17, f"p{k}"), (150, rng.choice("A6EIZ")),
                 *base]
        else:
            f = [(11, "y" * rng.choice([10, 300])), (37, "o"), (17, rng.choice(
                [f"w{k}", "", "e" * 300])), (150, "0"), (38, "1"), (20, rng.choice("0123")),
                 *base]
        if rng.random() < 0.03:
            f.append((35, "D"))
        out.append(f)
    return out


def results_by_message(m: Mapper, raws: list[bytes]) -> tuple[list, np.ndarray]:
    results = [m.map(FixMessage(r)) for r in raws]
    evs = [e for res in results for e in res.events]
    return results, (_dict_records(evs) if evs else np.zeros(0, _dict_records([{}]).dtype))


def check_equal(seed: int, n: int, **kw) -> dict:
    reports = report_stream(seed, n)
    bs = kw.get("begin_string", "FIX.4.4")
    raws = [msg(f, seq=k + 1, bs=bs) for k, f in enumerate(reports)]
    slow = Mapper(REF, source=5, **kw)
    fast_ = Mapper(REF, source=5, **kw)
    results, want = results_by_message(slow, raws)
    rng = random.Random(seed)
    (run,) = FixReader().feed_batch(b"".join(raws))
    assert run.n == len(raws)
    chunks, fallbacks, i = [], {}, 0
    while i < run.n:
        j = min(run.n, i + rng.randrange(1, 300))
        evs, fb = fast_.map_batch(run, i, j)
        if evs is not None:
            chunks.append(evs)
        fallbacks.update(fb)
        i = j
    got = np.concatenate(chunks) if chunks else want[:0]
    assert got.tobytes() == want.tobytes()
    for k, res in enumerate(results):
        if k in fallbacks:
            assert fallbacks[k] == res
        else:
            assert len(res.events) == 1 and res.counted is None and res.dead is None
    assert fast_.snapshot() == slow.snapshot()
    assert list(fast_.counts.items()) == list(slow.counts.items())
    return {"fast": run.n - len(fallbacks), "fallback": len(fallbacks)}


def test_map_batch_equals_map_on_seeded_streams():
    seed = random.randrange(1 << 30)
    print("seed", seed)
    for k, kw in enumerate([{}, {"order_key": "orderid"}, {"begin_string": "FIX.4.2"},
                            {"max_orders": 50, "max_trades": 40, "max_reports": 30}]):
        mix = check_equal(seed + k, 1500, **kw)
        assert mix["fast"] > 300 and mix["fallback"] > 300, mix


def test_map_batch_after_a_restore_equals_map():
    raws = [msg(f, seq=k + 1) for k, f in enumerate(report_stream(7, 600))]
    a = Mapper(REF, source=5)
    for r in raws[:300]:
        a.map(FixMessage(r))
    b = Mapper.restore(REF, a.snapshot())
    (run,) = FixReader().feed_batch(b"".join(raws[300:]))
    b.map_batch(run, 0, run.n)
    for r in raws[300:]:
        a.map(FixMessage(r))
    assert a.snapshot() == b.snapshot()


def test_map_batch_equals_map_when_order_ids_wrap_onto_held_orders():
    # order_ids wrap to 1 after 2**63 - 1: a new order then takes an id still held, which
    # the batch path's inlined New leaves to the general step; both give the same
    raws = [msg(f, seq=k + 1) for k, f in enumerate(report_stream(3, 800))]
    slow, fast_ = Mapper(REF, source=5), Mapper(REF, source=5)
    for part in (raws[:400], raws[400:]):
        _, want = results_by_message(slow, part)
        (run,) = FixReader().feed_batch(b"".join(part))
        evs, _ = fast_.map_batch(run, 0, run.n)
        assert (b"" if evs is None else evs.tobytes()) == want.tobytes()
        assert fast_.snapshot() == slow.snapshot()
        slow._next_id = fast_._next_id = 1
    assert fast_.counts == slow.counts


def test_prices_in_the_kernel_are_pythons_floats():
    rng = random.Random(3)
    vals = ["0.1", "0.3", "123.456", "9999999.99999999", ".000001", "1." + "0" * 20 + "1",
            "0" * 20 + "12.5", "100000000000000", "999999999999999.9"]
    vals += [f"{rng.randrange(10 ** rng.randrange(1, 16))}.{rng.randrange(10 ** 6):06d}"
             for _ in range(2000)]
    for v in vals:
        raw = v.encode()
        got = fast._price(np.frombuffer(raw, np.uint8), 0, len(raw), fast._P10)
        assert got == -1.0 or got == float(v), v


# ------------------------------------------------------------------------ journal, session
def test_journal_records_are_the_journals_bytes():
    raws = [msg([(17, f"E{k}"), (11, "x" * k)], seq=k + 1) for k in range(50)]
    (run,) = FixReader().feed_batch(b"".join(raws))
    seqs = np.arange(1, 51, dtype=np.int64) * 1000
    want = b"".join(encode_record(K_MESSAGE, "FIX.4.4:EXPOSURE->BROKER1", int(s), r)
                    for s, r in zip(seqs, raws, strict=True))
    assert fast.journal_records(run, 0, 50, seqs, K_MESSAGE, "FIX.4.4:EXPOSURE->BROKER1") \
        == want
    for data in (b"", b"123456789", b"".join(raws)):
        assert fast.crc32c(data) == crc32c.crc32c(data)


def test_a_session_passes_runs_on_as_it_passes_messages_on():
    """The same messages reach the application in the same order with the same counters
    and seqs, whether they come one by one, in runs to on_app, or in runs to
    on_app_batch: a gap and its resend, a PossDup below the expected seq, a wrong CompID
    and a missing required tag in the middle of a stream of reports."""
    cfg = SessionConfig(role="acceptor", begin_string="FIX.4.4", sender_comp_id="EXPOSURE",
                        target_comp_id="BROKER1", source=1, listen="127.0.0.1:0")
    logon = encode("FIX.4.4", "A", [(98, 0), (108, 30)], sender="BROKER1", target="EXPOSURE",
                   seq=1)
    stream = [msg([(37, "o"), (17, f"E{k}"), (150, "0"), (39, "0"), (54, "1")], seq=k)
              for k in range(2, 40)]
    stream.insert(10, stream.pop(25))      # a gap: 27 arrives after 11
    stream.insert(30, encode("FIX.4.4", "8", [(37, "o"), (17, "D"), (150, "0"), (39, "0"),
                                              (54, "1")], sender="BROKER1",
                             target="EXPOSURE", seq=5, poss_dup=True))
    stream[35] = stream[35].replace(b"54=1\x01", b"")  # a missing tag: a reject
    data = logon + b"".join(fix_checksum(m) for m in stream)

    def drive(mode: str):
        got: list = []
        s = Session(cfg, MemorySeqStore(), lambda c, m: got.append(m.raw),
                    on_app_batch=(lambda c, run, i, j: got.extend(run.raw(k)
                                                                  for k in range(i, j)))
                    if mode == "batch" else None)
        r = FixReader()
        first, *rest = r.feed(logon)
        s.logon(first)
        body = data[len(logon):]
        for k in range(0, len(body), 700):
            chunk = body[k:k + 700]
            s.receive(r.feed(chunk) if mode == "one" else r.feed_batch(chunk))
        return got, s.counters, s.inbound, [m[:60] for m in s.outbox]

    one = drive("one")
    assert drive("runs") == one
    assert drive("batch")[:3] == one[:3]
    assert one[1]["resend_requests_sent"] == 1 and one[1]["missing_tag"] == 1


def test_the_gateway_state_applies_a_batch_as_it_applies_its_records():
    """GatewayState.apply_messages (the gateway's batch path) and apply of each journal
    record give the same events, counters, dead letters, seqs and mapper state: so a
    restart that replays the journal record by record rebuilds what the batches built."""
    import orjson

    from exposure.fix.gateway import GatewayState
    from exposure.fix.journal import K_REFDATA, K_SESSION, Record, encode_refdata

    ins = b"symbol,instrument,currency\nAAPL,7,\nMSFT,8,USD\nVOD.L,9,GBP\n"
    acc = b"name,account\nPM1,3\nPM2,4\n"
    name = "FIX.4.4:EXPOSURE->BROKER1"
    raws = [msg(f, seq=k + 1) for k, f in enumerate(report_stream(11, 800))]
    seqs = np.arange(1, len(raws) + 1, dtype=np.int64)
    # the files journaled with the [currencies] table they are read with (GBP = 3)
    head = [Record(0, K_SESSION, name, 0, orjson.dumps(
        {"source": 5, "order_key": "clordid", "begin_string": "FIX.4.4"})),
        Record(1, K_REFDATA, "", 0, encode_refdata(
            ins, acc, orjson.dumps({"base": "USD", "ids": {"GBP": 3}})))]
    dead_a: list = []
    dead_b: list = []
    a, b = GatewayState(on_dead=dead_a.append), GatewayState(on_dead=dead_b.append)
    for st in (a, b):
        for rec in head:
            st.apply(rec)
    want = [e for k, r in enumerate(raws) for e in a.apply(Record(2 + k, b"M", name,
                                                                  k + 1, r))]
    (run,) = FixReader().feed_batch(b"".join(raws))
    got, i = [], 0
    while i < run.n:
        j = min(run.n, i + 97)
        evs = b.apply_messages(2 + i, name, run, i, j, seqs)
        if evs is not None:
            got.append(evs)
        i = j
    assert np.concatenate(got).tobytes() == _dict_records(want).tobytes()
    assert (a.index, a.events, a.inbound, a.counters) == (b.index, b.events, b.inbound,
                                                          b.counters)
    assert [(d.index, d.seq, d.reason, d.raw) for d in dead_a] == \
        [(d.index, d.seq, d.reason, d.raw) for d in dead_b]
    assert a.refdata().currency_of(9) == 3   # the journaled table, not a config's
    assert any("Currency (15)" in d.reason for d in dead_a)
    assert sorted(a.dead) == sorted(b.dead) and len(a.dead) > 10
    assert a.snapshot()["mappers"] == b.snapshot()["mappers"]
