"""Properties over generated streams: the kernel agrees with an independent model of the
SPEC (tests/reference_model.py, written from SPEC.md alone), and its incrementally kept
tallies equal a from-scratch recomputation from the cells."""

import numpy as np
from hypothesis import HealthCheck, given, settings
from reference_model import run_lines
from strategies import EVENTS, FX_EVENTS
from support import Run, currency_chains_ok

from exposure.bench.flowgen import generate, to_jsonl
from exposure.core.capacity import Capacities
from exposure.engine.document import compare_documents

_SETTINGS = settings(max_examples=300, deadline=None,
                     suppress_health_check=[HealthCheck.too_slow])
# Within the SPEC's tolerance, plus a few ulps of each value (see compare_documents).
REL = 1e-13
# Small tables keep each example fast; both sides get the same capacities, and the
# strategies' out-of-range ids (4096, 70000, 2**64, ...) are beyond them.
CAPS = {"accounts": 64, "instruments": 128, "sectors": 16, "sources": 8, "orders": 256,
        "cells": 256}


@_SETTINGS
@given(EVENTS)
def test_kernel_and_reference_model_agree_event_by_event(lines):
    r = Run(lines, Capacities(**CAPS))
    want_doc, want_status = run_lines(lines, **CAPS)
    assert r.statuses() == want_status
    assert compare_documents(r.doc, want_doc, rel=REL) == []


@_SETTINGS
@given(EVENTS)
def test_incremental_tallies_equal_a_recomputation_from_the_cells(lines):
    r = Run(lines, Capacities(**CAPS))
    assert compare_documents(r.doc, r.scratch, rel=REL) == []


@settings(max_examples=100, deadline=None)
@given(EVENTS)
def test_tiny_capacities_give_capacity_rejects_and_no_corrupted_state(lines):
    caps = {**CAPS, "orders": 2, "cells": 3}
    r = Run(lines, Capacities(**caps))
    want_doc, want_status = run_lines(lines, **caps)
    assert r.statuses() == want_status
    assert compare_documents(r.doc, want_doc, rel=REL) == []
    assert compare_documents(r.doc, r.scratch, rel=REL) == []


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(FX_EVENTS)
def test_with_currencies_and_moving_rates_kernel_model_and_recomputation_agree(lines):
    """SPEC section 7: instruments in several currencies, fx events among the trading,
    instruments that change currency: the kernel, the model and the recomputation agree."""
    r = Run(lines, Capacities(**CAPS))
    want_doc, want_status = run_lines(lines, **CAPS)
    assert r.statuses() == want_status
    assert compare_documents(r.doc, want_doc, rel=REL) == []
    assert compare_documents(r.doc, r.scratch, rel=REL) == []
    assert currency_chains_ok(r.state)


def test_a_long_realistic_day_agrees_with_the_model():
    """50,000 generated events (seeded) through the JSON path, the kernel and the model."""
    seed = 3
    print(f"seed {seed}")
    recs = generate(50_000, accounts=40, instruments=300, universe=30, live_target=2000,
                    seed=seed)
    lines = to_jsonl(recs).decode().splitlines()
    r = Run(lines)
    want_doc, want_status = run_lines(lines)
    assert r.statuses() == want_status
    assert compare_documents(r.doc, want_doc, rel=REL) == []
    assert compare_documents(r.doc, r.scratch, rel=REL) == []
    assert int(np.sum(r.status == 0x80)) == want_doc["counts"]["late_fills"] > 0


def test_a_realistic_week_with_busts_and_rolls_agrees_with_the_model():
    """The generated flow with busts of recent trades and a roll every 9,000 events
    (SPEC section 6): the kernel, the model and the recomputation agree."""
    seed = 3
    print(f"seed {seed}")
    recs = generate(50_000, accounts=40, instruments=300, universe=30, live_target=2000,
                    seed=seed, busts=0.02, roll_every=9000)
    lines = to_jsonl(recs).decode().splitlines()
    r = Run(lines)
    want_doc, want_status = run_lines(lines)
    assert r.statuses() == want_status
    assert compare_documents(r.doc, want_doc, rel=REL) == []
    assert compare_documents(r.doc, r.scratch, rel=REL) == []
    assert want_doc["counts"]["busts"] > 0 and want_doc["counts"]["rolls"] == 5
