"""Compute and the fan-out fused into one call a pass (exposure.node.stages.fused): the
wire sees exactly what the two stages polled one after the other send, datagram for
datagram, through a full fan-out ring and past an empty one (a batch's rows sent from
compute's buffer); a backup packs and sends nothing; a fenced primary
holds its rows while compute goes on; only a compute stage directly followed by the
fan-out reading its ring is fused."""

import contextlib
import os
import random
import uuid

import numpy as np
import pytest

from exposure.bench.flowgen import generate
from exposure.core.capacity import Capacities
from exposure.core.types import C_LAST_GSEQ, EVENT_WORDS, ROW_SIZE, UPDATE_DTYPE
from exposure.feed.wire import DG_INCREMENTAL, open_receiver, parse_datagram
from exposure.harness.localnode import free_group, free_port
from exposure.node.stages.agent import Runner, Stage
from exposure.node.stages.compute import ComputeStage
from exposure.node.stages.fanout import FanoutStage
from exposure.node.stages.fused import ComputeFanout, fuse
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
from exposure.shm.session_layout import SESSION_COLS
from exposure.shm.tally_segment import TallySegment
from exposure.shm.wait import WaitStrategy

pytestmark = [pytest.mark.timeout(300), pytest.mark.process]  # (the first use compiles)

# (the flow generator draws instrument ids from 0..65535 and sectors from 0..63)
CAPS = Capacities(accounts=64, instruments=65536, sectors=64, sources=4, orders=8192,
                  cells=4096)
_COMPUTE_NS = UPDATE_DTYPE.fields["compute_ns"][1] // 8  # the same word in every row kind


@contextlib.contextmanager
def _pipeline(out_cap: int = 16, role: int = ROLE_PRIMARY, pair: bool = False):
    """Compute over a fresh tally segment and its fan-out (through a fan-out ring of
    ``out_cap`` rows) to a fresh group a receiver has joined; yields (input ring, compute,
    fan-out, receiver, control block) and removes all of it."""
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    seg = TallySegment.create(f"exposure-test-fused-{tag}-tally", CAPS)
    inp = Ring.create(f"exposure-test-fused-{tag}-in", 4096, EVENT_WORDS * 8)
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


def _run(stage_polls, inp, chunks) -> None:
    """Push each chunk of records, then poll until a whole pass does nothing."""
    for words in chunks:
        assert ring_push(inp.ctrl, inp.slots, words, len(words)) == len(words)
        while sum(p() for p in stage_polls):
            pass


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
