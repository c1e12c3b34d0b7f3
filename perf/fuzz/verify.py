"""The fuzzer's checks: what the node holds, its journal, its document and its counters
against the fuzzer's own account (:func:`verify`: journal, reject_byte, document,
unauthorized), and the run's own (:func:`run_checks`: alive, memory, protocol)."""

from __future__ import annotations

import numpy as np

from exposure.core.types import EVENT_DTYPE, R_UNAUTHORIZED
from exposure.harness.wait import WaitTimeout, wait_for
from perf.fuzz.client import _Sync
from perf.fuzz.content import (
    _CATS,
    _M64,
    MAX_SESSIONS,
    SPEC_BY_ID,
    SPECS,
    content_upto,
    model_authorized,
    model_reject_byte,
    secret_of,
)


def _rss_kb(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def _attach(node):
    from exposure.shm.segment import SharedArray
    from exposure.shm.session_layout import SESSION_COLS
    from exposure.shm.tally_segment import TallySegment

    sess = SharedArray.attach(f"/exposure.{node.name}.sessions",
                              (MAX_SESSIONS + 1, SESSION_COLS), np.uint64, readonly=True)
    tally = TallySegment.attach(f"/exposure.{node.name}.tally")
    return sess, tally


def _counters(sess: np.ndarray) -> tuple[dict, dict]:
    from exposure.core.types import NODE_REASONS
    from exposure.shm import session_layout as SL

    port = {k: int(sess[0, col]) for k, col in SL.NODE_COUNTERS.items()}
    per = {}
    for s in SPECS:
        row = sess[s.id]
        d = {k: int(row[col]) for k, col in SL.SESSION_COUNTERS.items()}
        d["held"] = int(row[SL.S_HELD])
        d["done"] = int(row[SL.S_DONE])
        d["rejects"] = {NODE_REASONS.get(k, str(k)): int(row[SL.S_REJ + k])
                        for k in range(1, SL.N_REJ) if row[SL.S_REJ + k]}
        per[s.name] = d
    return port, per


def _stamp_mask() -> np.ndarray:
    """u8 words of a record the node stamps, masked out of the content comparison."""
    from exposure.core.types import (
        EVENT_WORDS,
        REJECT_SHIFT,
        W_EPOCH,
        W_GSEQ,
        W_RECV_NS,
        W_SESSION,
        W_TYPE,
    )

    m = np.full(EVENT_WORDS, _M64, np.uint64)
    m[W_GSEQ] = 0
    m[W_RECV_NS] = 0
    m[W_SESSION] = 0xFFFF_FFFF_0000_0000     # the session id is the low half
    m[W_EPOCH] = 0xFFFF_FFFF_0000_0000       # the epoch is the low half
    m[W_TYPE] = _M64 ^ (0xFF << REJECT_SHIFT)
    return m


def verify(node, seed: int, port: int, caps) -> dict:
    """The tallies, the journal and the counters against the fuzzer's own account."""
    from exposure.core.types import C_LAST_GSEQ, C_UNAUTHORIZED, NODE_REASONS
    from exposure.engine.document import compare_documents, document
    from exposure.engine.replay import Engine
    from exposure.shm import session_layout as SL
    from exposure.store.journal import read_blocks

    checks: dict[str, dict] = {}
    held = {}
    for s in SPECS:  # what the node holds for each session: a fresh login
        c = _Sync(port, s.id, secret_of(seed, s.id))
        held[s.id] = c.held
        c.close()
    total = sum(held.values())
    seg, tally = _attach(node)
    try:
        sess = seg.array
        try:
            wait_for(lambda: (int(tally.state.ctr[C_LAST_GSEQ]) == total
                              and int(sess[0, SL.S_DURABLE]) >= total
                              and all(int(sess[s.id, SL.S_DONE]) == held[s.id]
                                      for s in SPECS)),
                     60, "the node to apply and journal every held event", step=0.05)
        except WaitTimeout:
            pass  # the checks below say what differs
        table = {s.id: int(sess[s.id, SL.S_HELD]) for s in SPECS}
        node_unauth = int(tally.state.ctr[C_UNAUTHORIZED])
        last_gseq = int(tally.state.ctr[C_LAST_GSEQ])
        durable = int(sess[0, SL.S_DURABLE])
        rej_node = {s.id: [int(x) for x in sess[s.id, SL.S_REJ:SL.S_REJ + SL.N_REJ]]
                    for s in SPECS}
        port_ctr, per_session = _counters(sess)
    finally:
        seg.close()
        tally.close()
    dump = node.dump()

    blocks = list(read_blocks(node.data_dir))
    jr = (np.concatenate([b.records for b in blocks]) if blocks
          else np.zeros(0, EVENT_DTYPE))
    del blocks  # (the files' bytes: a big run's journal is hundreds of MB)
    problems = []
    if table != held:
        problems.append(f"LOGIN_OK held {held} != the session table's {table}")
    if last_gseq != total or durable < total:
        problems.append(f"records held {total}, last gseq applied {last_gseq}, durable "
                        f"{durable}")
    if not np.array_equal(jr["gseq"], np.arange(1, len(jr) + 1, dtype=np.uint64)):
        problems.append("the journal's gseqs are not 1..N")
    if len(jr) != total:
        problems.append(f"the journal holds {len(jr)} records, the sessions {total}")
    others = np.setdiff1d(np.unique(jr["session"]), [s.id for s in SPECS])
    if len(others):
        problems.append(f"records of unconfigured sessions {others.tolist()} in the journal")
    mask = _stamp_mask()
    expected = np.zeros(len(jr), EVENT_DTYPE)
    ok_all = np.zeros(len(jr), bool)
    cats_all = np.zeros(len(jr), np.uint8)
    content_bad = 0
    reject_bad = 0
    unauth_model = {}
    samples = []
    for s in SPECS:
        idx = np.flatnonzero(jr["session"] == s.id)
        got = jr[idx]
        n = min(len(got), held[s.id])
        if len(got) != held[s.id] or not np.array_equal(
                got["sseq"], np.arange(1, len(got) + 1, dtype=np.uint64)):
            problems.append(f"session {s.id}: the journal holds {len(got)} records, sseqs "
                            f"{got['sseq'][:5].tolist()}..., LOGIN_OK says {held[s.id]}")
        want, cats = content_upto(seed, s.id, max(held[s.id], len(got)))
        want, cats = want[:len(got)], cats[:len(got)]
        gw = got.view(np.uint64).reshape(len(got), -1)
        ww = want.view(np.uint64).reshape(len(want), -1)
        diff = ((gw ^ ww) & mask).any(axis=1) if len(want) == len(got) else \
            np.ones(len(got), bool)
        content_bad += int(diff.sum())
        for k in np.flatnonzero(diff)[:3].tolist():
            samples.append(f"session {s.id} sseq {int(got['sseq'][k])}: words "
                           f"{np.flatnonzero((gw[k] ^ ww[k]) & mask).tolist()} differ")
        ok = model_authorized(want, s)
        rb = model_reject_byte(want, ok)
        bad_rb = got["reject"] != rb
        reject_bad += int(bad_rb.sum())
        for k in np.flatnonzero(bad_rb)[:3].tolist():
            samples.append(f"session {s.id} sseq {k + 1}: reject byte {got['reject'][k]}, "
                           f"model {rb[k]} (type {want['type'][k]})")
        want = want.copy()
        want["reject"] = rb
        expected[idx[:n]] = want[:n]
        ok_all[idx[:n]] = ok[:n]
        cats_all[idx[:n]] = cats[:n]
        unauth_model[s.id] = int((~ok[:n]).sum())
    checks["journal"] = {"ok": not problems and content_bad == 0, "records": int(len(jr)),
                         "held": {SPEC_BY_ID[k].name: v for k, v in held.items()},
                         "content_mismatches": content_bad, "problems": problems,
                         "samples": samples[:10]}
    checks["reject_byte"] = {"ok": reject_bad == 0, "mismatches": reject_bad}

    # The model's replay: the content in journal order, less what the model finds
    # unauthorized, through the project's kernel with the node's capacities.
    expected["gseq"] = jr["gseq"]
    keep = expected[ok_all]
    del expected
    eng = Engine(caps)
    status = eng.apply(keep)
    want_doc = document(eng.state)
    diffs = compare_documents(dump, want_doc, limit=20)
    checks["document"] = {"ok": not diffs, "differences": diffs,
                          "accepted": want_doc["counts"]["accepted"],
                          "rejected": want_doc["counts"]["rejected"],
                          "late_fills": want_doc["counts"]["late_fills"]}

    umodel = sum(unauth_model.values())
    rej_model = {}
    sess_of_keep = jr["session"][ok_all]
    for s in SPECS:
        st = status[sess_of_keep == s.id]
        v = [0] * SL.N_REJ
        codes, counts = np.unique(st[(st != 0) & (st < SL.N_REJ)], return_counts=True)
        for code, k in zip(codes.tolist(), counts.tolist(), strict=True):
            v[code] = k
        v[R_UNAUTHORIZED] += unauth_model[s.id]
        rej_model[s.id] = v
    per_bad = {SPEC_BY_ID[s].name: {"node": {NODE_REASONS.get(k, k): rej_node[s][k]
                                             for k in range(1, SL.N_REJ) if rej_node[s][k]},
                                    "model": {NODE_REASONS.get(k, k): rej_model[s][k]
                                              for k in range(1, SL.N_REJ) if rej_model[s][k]}}
               for s in rej_node if rej_node[s] != rej_model[s]}
    checks["unauthorized"] = {"ok": node_unauth == umodel and not per_bad,
                              "node": node_unauth, "model": umodel,
                              "per_session_model": {SPEC_BY_ID[k].name: v
                                                    for k, v in unauth_model.items()},
                              "session_counter_mismatches": per_bad}
    records = {_CATS[k]: int(v) for k, v in zip(*np.unique(cats_all, return_counts=True),
                                                strict=True)}
    return {"checks": checks, "port_counters": port_ctr, "sessions": per_session,
            "records_taken": int(len(jr)), "records_by_category": records}


def run_checks(node, pids0: dict, rss0: int, rss_peak: int, rss_limit_mb: int,
               stats: dict, anomalies: list[str]) -> tuple[dict, int, str]:
    """The run's own checks (alive, memory, protocol: the clients' anomalies, ``stats``'
    ``anomaly_*`` counts); with the node's RSS after the run and its log."""
    checks: dict[str, dict] = {}
    pids1 = node.pids()
    rss1 = _rss_kb(pids1.values())
    text = node.log.read_text(errors="replace") if node.log.exists() else ""
    alive = node.alive and pids1 == pids0 and "restart" not in text.lower()
    checks["alive"] = {"ok": alive, "pids_before": pids0, "pids_after": pids1,
                       "supervisor_alive": node.alive,
                       "restart_in_log": "restart" in text.lower()}
    checks["memory"] = {"ok": rss1 - rss0 <= rss_limit_mb * 1024,
                        "rss_before_kb": rss0, "rss_after_kb": rss1,
                        "rss_peak_kb": rss_peak, "limit_mb": rss_limit_mb}
    n_anom = sum(v for k, v in stats.items() if k.startswith("anomaly_"))
    checks["protocol"] = {"ok": n_anom == 0, "anomalies": n_anom,
                          "examples": anomalies[:20]}
    return checks, rss1, text
