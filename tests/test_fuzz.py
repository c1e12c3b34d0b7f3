"""Hostile and broken input against a real node's session port (issue 12): the fuzzer of
``perf/fuzz/`` at a small size (``EXPOSURE_FUZZ_FRAMES``, 20,000 by default; ``.ci/run``'s
soak stage sets 200,000), with the seed from ``EXPOSURE_FUZZ_SEED`` or a random one,
printed: rerun a failure with that variable (``python -m perf.fuzz --seed S`` for the
large run)."""

import json
import os
import random

import pytest

from perf.fuzz import run_fuzz

pytestmark = pytest.mark.process

FRAMES = int(os.environ.get("EXPOSURE_FUZZ_FRAMES", "20000"))
CHECKS = ("alive", "memory", "journal", "reject_byte", "document", "unauthorized",
          "protocol")


def _seed() -> int:
    env = os.environ.get("EXPOSURE_FUZZ_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


# (the first node start compiles the kernels: minutes; a run takes well under a minute)
@pytest.mark.soak
@pytest.mark.timeout(900)
def test_a_fuzzed_node_survives_and_equals_the_replay_of_what_it_took(tmp_path):
    seed = _seed()
    print(f"perf.fuzz seed {seed} (rerun with EXPOSURE_FUZZ_SEED={seed})")
    rep = run_fuzz(frames=FRAMES, connections=16, workers=2, seed=seed, tmp=tmp_path,
                   login_timeout_ms=1500, rss_limit_mb=128, log=print)
    summary = {k: rep.get(k) for k in ("seed", "frames_sent", "connections_made",
                                       "node_start_s", "seconds", "verify_s",
                                       "rss_before_kb", "rss_after_kb",
                                       "port_counters")}
    print(json.dumps(summary))
    assert rep["segments_left"] == [], "the node left shared memory behind"
    assert list(tmp_path.iterdir()) == [], "the fuzzer left files behind"
    checks = rep["checks"]
    for name in CHECKS:
        assert checks[name]["ok"], (f"seed {seed}: check {name} failed: "
                                    f"{json.dumps(checks[name], default=str)[:4000]}")
    assert rep["pass"], f"seed {seed}: {json.dumps(checks, default=str)[:4000]}"
    # it did what it says: every kind of input, many connections, records that reached
    # the kernel of every category, authorized and not
    assert rep["frames_sent"] >= FRAMES
    assert rep["connections_made"] >= 500
    frames = rep["frames_by_category"]
    for cat in ("events", "heartbeat", "login", "resend_identical", "auth_wrong_secret",
                "auth_unconfigured", "auth_bad_id", "prelogin_heartbeat", "prelogin_events"):
        assert frames.get(cat, 0) > 0, (cat, frames)
    assert set(rep["records_by_category"]) >= {"flow", "unentitled", "edge_random",
                                               "byte_random", "bit_flipped", "reference"}
    assert checks["unauthorized"]["model"] > 0
    assert checks["document"]["accepted"] > 0 and checks["document"]["rejected"] > 0
    port = rep["port_counters"]
    assert port["auth_failures"] > 0 and port["closed_before_login"] > 0
    assert port["logins"] > 0
