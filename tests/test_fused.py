"""Compute and the fan-out fused into one call a pass (exposure.node.stages.fused): the
wire sees exactly what the two stages polled one after the other send, datagram for
datagram, through a full fan-out ring and past an empty one (a batch's rows sent from
compute's buffer); a backup packs and sends nothing; a fenced primary
holds its rows while compute goes on; only a compute stage directly followed by the
fan-out reading its ring is fused. Ingest chained to it (each scan and the pass in one
call) sends what it sends unchained, through back-pressure and a fenced primary."""

import contextlib
import os
import random
import socket
import time
import uuid

import numpy as np
import pytest

from exposure.bench.flowgen import generate
from exposure.core.capacity import Capacities
from exposure.core.types import (
    C_LAST_GSEQ,
    EVENT_WORDS,
    ROW_POSITION,
    ROW_SIZE,
    UPDATE_DTYPE,
)
from exposure.feed.wire import DG_INCREMENTAL, open_receiver, parse_datagram
from exposure.harness.localnode import free_group, free_port
from exposure.net import wire as W
from exposure.node.stages.agent import Runner, Stage
from exposure.node.stages.compute import ComputeStage
from exposure.node.stages.fanout import FanoutStage
from exposure.node.stages.fused import ComputeFanout, fuse
from exposure.node.stages.ingest import IngestStage
from exposure.shm import ring_layout as RL
from exposure.shm.control import (
    CONTROL_WORDS,
    CTL_EPOCH,
    CTL_ROLE,
    CTL_VALID_NS,
    ROLE_BACKUP,
    ROLE_PRIMARY,
)
from exposure.shm.ring import Ring, ring_push
from exposure.shm.session_layout import S_HELD, SESSION_COLS
from exposure.shm.tally_segment import TallySegment
from exposure.shm.wait import WaitStrategy

pytestmark = [pytest.mark.timeout(300), pytest.mark.process]  # (the first use compiles)

# (the flow generator draws instrument ids from 0..65535 and sectors from 0..63)
CAPS = Capacities(accounts=64, instruments=65536, sectors=64, sources=4, orders=8192,
                  cells=4096)
_COMPUTE_NS = UPDATE_DTYPE.fields["compute_ns"][1] // 8  # the same word in every row kind


@contextlib.contextmanager
def _pipeline(out_cap: int = 16, role: int = ROLE_PRIMARY, pair: bool = False,
              in_cap: int = 4096):
    """Compute over a fresh tally segment and its fan-out (through a fan-out ring of
    ``out_cap`` rows) to a fresh group a receiver has joined; yields (input ring, compute,
    fan-out, receiver, control block) and removes all of it."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    seg = TallySegment.create(f"exposure-test-fused-{tag}-tally", CAPS)
    inp = Ring.create(f"exposure-test-fused-{tag}-in", in_cap, EVENT_WORDS * 8)
    out = Ring.create(f"exposure-test-fused-{tag}-out", out_cap, ROW_SIZE)
    ctl = np.zeros(CONTROL_WORDS, np.uint64)
    ctl[CTL_ROLE], ctl[CTL_EPOCH] = role, 3
    group, port = free_group(), free_port()
    rx = open_receiver(group, port)
    rx.setblocking(False)
    cs = fo = None
    try:
        sessions = np.zeros((CAPS.sources + 1, SESSION_COLS), np.uint64)
        cs = ComputeStage(seg, sessions, inp, out, batch=512)
        fo = FanoutStage(out, group, port, "127.0.0.1", 1, 1400, seg.state, epoch=3, ctl=ctl,
                         pair=pair, words=seg.words)
        yield inp, cs, fo, rx, ctl
    finally:
        for s in (fo, cs):
            if s is not None:
                s.close()
        rx.close()
        for r in (inp, out):
            r.close()
        seg.close()


def _datagrams(rx) -> list:
    out = []
    while True:
        try:
            out.append(parse_datagram(rx.recv(65536)))
        except BlockingIOError:
            return out


def _rows(datagrams) -> np.ndarray:
    """The INCREMENTAL datagrams' rows as words, compute's clock word zeroed."""
    rows = [d.updates.view(np.uint64).reshape(-1, ROW_SIZE // 8) for d in datagrams
            if d.type == DG_INCREMENTAL]
    words = np.concatenate(rows) if rows else np.zeros((0, ROW_SIZE // 8), np.uint64)
    words[:, _COMPUTE_NS] = 0
    return words


def _settle(polls, done=lambda: True, after=lambda: None, seconds: float = 30.0) -> None:
    """Run ``polls`` (then ``after``, ingest's) until ``done()`` and a whole pass idles."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        work = sum(p() for p in polls)
        after()
        if not work and done():
            return
    raise AssertionError("the stages did not settle")


def _run(stage_polls, inp, chunks) -> None:
    """Push each chunk of records, then poll until a whole pass does nothing."""
    for words in chunks:
        assert ring_push(inp.ctrl, inp.slots, words, len(words)) == len(words)
        _settle(stage_polls)


@pytest.mark.parametrize("out_cap", [16, 4096])
def test_one_call_a_pass_sends_what_the_two_stages_send_datagram_for_datagram(out_cap):
    """Through a 16-row fan-out ring most batches fill it and their rows go in several
    parts; through one of 4,096 every batch's rows fit, so the fused pass sends them from
    compute's buffer without the ring, and the wire must not tell."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    recs = generate(6000, accounts=CAPS.accounts, instruments=200, sources=4,
                    universe=200, live_target=2000, seed=seed % 1000 + 1)
    words = recs.view(np.uint64).reshape(len(recs), -1)
    cuts = sorted(rng.sample(range(1, len(words)), 300))  # batches of 1 to hundreds
    chunks = [words[a:b] for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]
    got = {}
    for fused in (True, False):
        with _pipeline(out_cap=out_cap) as (inp, cs, fo, rx, _):
            if fused:
                one = ComputeFanout(cs, fo)
                _run([one.poll], inp, chunks)
            else:
                _run([cs.poll, fo.poll], inp, chunks)
            dgs = _datagrams(rx)
            assert [d.seq for d in dgs if d.type == DG_INCREMENTAL] == list(
                range(1, fo.seq + 1))
            got[fused] = (_rows(dgs), fo.seq, cs.st.ctr.copy(),
                          [(d.seq, len(d.updates)) for d in dgs if d.type == DG_INCREMENTAL])
            through_ring = int(cs.out.ctrl[RL.W_TAIL])  # rows pushed onto the ring
            if not fused:
                assert through_ring == len(got[fused][0])
            elif out_cap > 512 * 4:  # (a batch of 512 makes fewer rows than that)
                # every batch of more than one datagram's rows went from compute's buffer
                assert through_ring < len(got[fused][0]) // 2
    (rows_f, seq_f, ctr_f, sizes_f), (rows_s, seq_s, ctr_s, sizes_s) = got[True], got[False]
    assert sizes_f == sizes_s  # the same datagrams: each with the same rows
    assert seq_f == seq_s > len(chunks)  # more datagrams than batches: the ring was full
    assert len(rows_f) == len(rows_s) > 0
    assert (rows_f == rows_s).all()
    assert (ctr_f == ctr_s).all()


def test_a_backup_packs_and_sends_nothing_and_a_fenced_primary_holds_its_rows():
    recs = generate(200, accounts=CAPS.accounts, instruments=200, sources=4,
                    universe=50, live_target=100, seed=5)
    words = recs.view(np.uint64).reshape(len(recs), -1)
    with _pipeline(out_cap=4096, role=ROLE_BACKUP) as (inp, cs, fo, rx, _):
        one = ComputeFanout(cs, fo)
        _run([one.poll], inp, [words])
        assert len(cs.out) == 0  # packed, to keep up
        assert _datagrams(rx) == [] and fo.seq == 0
        assert cs.st.ctr[C_LAST_GSEQ] == len(words)  # compute applied every record
    with _pipeline(out_cap=4096, pair=True) as (inp, cs, fo, rx, ctl):
        ctl[CTL_VALID_NS] = 0  # a primary of a pair whose fence has expired
        one = ComputeFanout(cs, fo)
        _run([one.poll], inp, [words])
        assert cs.st.ctr[C_LAST_GSEQ] == len(words) and len(cs.out) > 0  # rows held
        assert [d for d in _datagrams(rx) if d.type == DG_INCREMENTAL] == [] and fo.seq == 0


class _Named(Stage):
    def __init__(self, name, fed_by=None, wake_source=None):
        self.name, self.fed_by, self.wake_source = name, fed_by, wake_source

    def poll(self):
        return 0


def test_only_compute_directly_followed_by_the_fan_out_of_its_ring_is_fused():
    with _pipeline() as (inp, cs, fo, rx, _):
        ingest = _Named("ingest")
        staged = fuse([ingest, cs, fo])
        assert staged[0] is ingest and isinstance(staged[1], ComputeFanout)
        assert staged[1].parts == (cs, fo) and staged[1].name == "compute+fanout"
        assert fuse([fo, cs]) == [fo, cs]          # the other order: not fused
        assert fuse([cs, ingest, fo]) == [cs, ingest, fo]  # not adjacent
        # a stage fed by compute or the fan-out in the same process is fed from inside it
        later = _Named("reader", fed_by="fanout", wake_source=inp)
        assert Runner([*staged, later], WaitStrategy("spin")).wake_source is None
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    other = Ring.create(f"exposure-test-fused-{tag}-other", 16, ROW_SIZE)
    try:
        with _pipeline() as (inp, cs, fo, rx, _):
            fo.inp = other  # a fan-out of another ring
            assert fuse([cs, fo]) == [cs, fo]
            with pytest.raises(ValueError, match="does not read"):
                ComputeFanout(cs, fo)
            fo.inp = cs.out
    finally:
        other.close()


_RECV_NS = UPDATE_DTYPE.fields["recv_ns"][1] // 8  # ingest's clock: differs run to run
_GSEQ_W = UPDATE_DTYPE.fields["gseq"][1] // 8
_SSEQ_W = UPDATE_DTYPE.fields["sseq"][1] // 8


def _last_rows(words) -> dict:
    """The last row of each feed key (kind, id), its clock words zeroed, and a position
    row's tag too: it is its batch's last event, and batches depend on how bytes arrive."""
    words = words.copy()
    words[:, _RECV_NS] = 0
    pos = (words[:, 0] & 0xFF) == ROW_POSITION
    words[pos, _GSEQ_W] = words[pos, _SSEQ_W] = 0
    return {(int(w[0]) & 0xFF, int(w[0]) >> 32): w.tobytes() for w in words}


def _one_chained_pass_a_read(ingest, polls, fused, client) -> None:
    """A read of twenty HEARTBEATs runs the chained pass once: a flood of control frames
    costs ingest a scan each, not a pass of every stage."""
    calls = []
    chain = fused.scan_then_pass

    def counted(*args):
        calls.append(1)
        return chain(*args)

    fused.scan_then_pass = counted
    try:
        client.sendall(W.encode_heartbeat() * 20)
        _settle(polls, lambda: bool(calls) and all(
            c.pos == c.fill for c in ingest.conns.values()), ingest.after)
    finally:
        del fused.scan_then_pass
    assert len(calls) == 1


def _published(st) -> dict:
    """What desks read (accounts and the fund, instruments, sectors, cells), less what
    depends on how events fell into batches: each row's seqlock version (one per publish)
    and a cell's gseq (its batch's last, as a position row's tag)."""
    return {(name, f): np.array(getattr(st, name)[f], copy=True)
            for name in ("pub", "ipub", "spub", "cpub")
            for f in getattr(st, name).dtype.names
            if f != "ver" and (name, f) != ("cpub", "gseq")}


@pytest.mark.parametrize("fenced", [False, True])
def test_ingest_chained_to_the_fused_stage_sends_what_it_sends_unchained(fenced):
    """A real session's frames through ingest's scan with compute and the fan-out in the
    same call (the default map's hot process) and through the scan alone with the fused
    stage polled after it. Frames one at a time (some followed by a HEARTBEAT, so a read
    is scanned in parts): the same datagrams, row for row. Then thousands of records at
    once through a compute ring of 256 (the scan stops at a full ring; batches then
    depend on how the bytes arrive): the same published tally and the same last row of
    every key. A fenced primary scans on its own: every record applied, nothing sent."""
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")
    rng = random.Random(seed)
    recs = generate(9000, accounts=CAPS.accounts, instruments=200, sources=4,
                    universe=200, live_target=2000, seed=seed % 1000 + 1)
    recs["sseq"] = np.arange(1, len(recs) + 1)
    cuts = sorted(rng.sample(range(1, 3000), 299))
    frames = [recs[a:b] for a, b in zip([0, *cuts], [*cuts, 3000], strict=True)]
    got = {}
    for chained in (True, False):
        # (a fenced primary's rows wait on the fan-out ring, one per feed key: about
        # 2,000 of this flow's; the ring holds eight times that)
        with _pipeline(out_cap=16384, pair=fenced, in_cap=256) as (inp, cs, fo, rx, ctl):
            if fenced:
                ctl[CTL_VALID_NS] = 0  # a primary of a pair whose fence has expired
            sessions = np.zeros((5, SESSION_COLS), np.uint64)
            port = free_port()
            ingest = IngestStage("127.0.0.1", port, sessions, inp, next_gseq=1,
                                 max_sessions=4)
            client = None
            try:
                if chained:
                    staged = fuse([ingest, cs, fo])
                    assert ingest.down is staged[1]
                else:
                    staged = [ingest, ComputeFanout(cs, fo)]
                    assert ingest.down is None
                polls = [s.poll for s in staged]
                client = socket.create_connection(("127.0.0.1", port))
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # (no 40 ms
                # waits for delayed ACKs between small frames)
                client.sendall(W.encode_login(2))
                sent = 0
                for k, f in enumerate(frames):
                    client.sendall(W.encode_events(f) + (
                        W.encode_heartbeat() if k % 3 == 0 else b""))
                    sent += len(f)
                    _settle(polls, lambda n=sent: cs.st.ctr[C_LAST_GSEQ] == n, ingest.after)
                one_by_one = _datagrams(rx)
                if chained and not fenced:
                    _one_chained_pass_a_read(ingest, polls, staged[1], client)
                for a in range(3000, len(recs), 200):  # at once, read nothing back
                    client.sendall(W.encode_events(recs[a:a + 200]))
                _settle(polls, lambda: cs.st.ctr[C_LAST_GSEQ] == len(recs), ingest.after)
                rest = _datagrams(rx)
                assert int(sessions[2, S_HELD]) == len(recs)
                incremental = [d for d in one_by_one + rest if d.type == DG_INCREMENTAL]
                if fenced:
                    assert incremental == [] and fo.seq == 0 and len(cs.out) > 0
                    continue
                assert [d.seq for d in incremental] == list(range(1, fo.seq + 1))
                got[chained] = (_rows(one_by_one), _last_rows(_rows(one_by_one + rest)),
                                _published(cs.st))
            finally:
                if client is not None:
                    client.close()
                ingest.close()
    if fenced:
        return
    (rows_c, last_c, state_c), (rows_u, last_u, state_u) = got[True], got[False]
    rows_c[:, _RECV_NS] = rows_u[:, _RECV_NS] = 0
    assert len(rows_c) == len(rows_u) > len(frames)
    assert (rows_c == rows_u).all()  # frame by frame: the same rows in the same order
    assert last_c == last_u
    assert state_c.keys() == state_u.keys()
    assert [k for k in state_c if not (state_c[k] == state_u[k]).all()] == []
