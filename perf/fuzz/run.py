"""The fuzzer's run: start a node, send the reference block, fuzz it from worker processes,
check it (:func:`run_fuzz`)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from exposure.harness.machine import cpu_jiffies, cpu_shares
from perf.fuzz.client import WAIT_S, _Sync
from perf.fuzz.content import (
    REF,
    SPECS,
    Content,
    _ref_block,
    events_frames,
    secret_of,
    write_sessions,
)
from perf.fuzz.traffic import _worker_main
from perf.fuzz.verify import _rss_kb, run_checks, verify


def _machine(before: list[int], after: list[int], load0: tuple) -> dict:
    """What else the machine did meanwhile (exposure.harness.machine.cpu_shares: user nice
    system idle iowait irq softirq steal): shares of all CPUs' time, and the load
    averages."""
    return {"cpus": os.cpu_count(), "cpu_pct": cpu_shares(before, after), "loadavg_before": load0,
            "loadavg_after": os.getloadavg()}



def _plan(frames: int, connections: int, workers: int, seed: int, port: int,
          start_held: dict, login_timeout_ms: int) -> list[dict]:
    n_sess = len(SPECS)
    n_chaos = max(connections - n_sess, workers)
    workers = max(1, min(workers, n_sess))
    sess_budget = max(1, int(frames * 0.8) // n_sess)
    chaos_budget = max(1, (frames - sess_budget * n_sess) // n_chaos)
    out = []
    for w in range(workers):
        out.append({"seed": seed, "port": port, "start_held": start_held,
                    "login_timeout_ms": login_timeout_ms,
                    "sids": [s.id for s in SPECS][w::workers],
                    "chaos": list(range(n_chaos))[w::workers],
                    "session_budget": sess_budget, "chaos_budget": chaos_budget,
                    "sleepers": 2})
    return out


def _start_node(tmp: Path, seed: int, login_timeout_ms: int | None):
    from exposure.harness.localnode import LocalNode

    sessions = write_sessions(tmp, seed)
    node = LocalNode(tmp, prefix="fz", start=False,
                     extra="[snapshot]\nevery_events = 0\nevery_s = 0\n")
    text = node.config.read_text()
    head = f"[ingest]\nport = {node.port}\n"
    assert head in text, "exposure.harness.localnode's config layout changed"
    add = f'host = "127.0.0.1"\nsessions = "{sessions}"\n'
    if login_timeout_ms:
        add += f"login_timeout_ms = {login_timeout_ms}\n"
    node.config.write_text(text.replace(head, head + add))
    node.start(timeout=600)
    return node


def _send_reference(port: int, seed: int, log) -> tuple[int, list[str]]:
    """Session 1's reference block, acknowledged before anything else is sent (a session
    the node closed meanwhile logs in again and sends the rest); the retries' reasons."""
    n = len(_ref_block(seed))
    retries: list[str] = []
    while True:
        c = None
        try:
            c = _Sync(port, REF, secret_of(seed, REF))
            if c.held < n:
                m = n - c.held
                raw = Content(seed, REF).raw(c.held + 1, n + 1)
                c.s.settimeout(WAIT_S)
                c.s.sendall(events_frames(raw, [64] * (m // 64) + ([m % 64] if m % 64
                                                                   else [])))
                c.wait_ack(n)
            return n, retries
        except (OSError, RuntimeError) as e:
            retries.append(f"{type(e).__name__}: {e}")
            log(f"perf.fuzz: the reference block: {retries[-1]}; again")
            if len(retries) >= 5:
                raise
            time.sleep(1)
        finally:
            if c is not None:
                c.close()


def run_fuzz(frames: int = 1_000_000, connections: int = 32, workers: int = 2,
             seed: int | None = None, tmp: str | Path | None = None,
             login_timeout_ms: int | None = None, rss_limit_mb: int = 256,
             keep: bool = False, log=None) -> dict:
    """Start a node, fuzz it with ``frames`` frames, check it; the report (a dict with
    ``pass``). The node is stopped and the temporary directory removed whatever
    happens (unless ``keep``)."""
    from exposure.config.node import load_config

    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
    log(f"perf.fuzz: seed {seed}")
    work = Path(tempfile.mkdtemp(prefix="exposure-fuzz-", dir=tmp))
    node = None
    report: dict = {"seed": seed, "frames_planned": frames, "connections": connections,
                    "workers": workers}
    try:
        t_start = time.monotonic()
        node = _start_node(work, seed, login_timeout_ms)
        report["node_start_s"] = round(time.monotonic() - t_start, 2)
        cfg = load_config(node.config)
        n_ref, report["reference_retries"] = _send_reference(node.port, seed, log)
        pids0 = node.pids()
        rss0 = _rss_kb(pids0.values())
        plan = _plan(frames, connections, workers, seed, node.port, {REF: n_ref},
                     cfg.login_timeout_ms)
        log(f"perf.fuzz: node {node.name} on 127.0.0.1:{node.port} (pids {pids0}), "
            f"RSS {rss0} kB; {len(plan)} client processes, {frames} frames")
        rss_peak, samples = rss0, []
        cpu0, load0 = cpu_jiffies(), os.getloadavg()
        t0 = time.monotonic()
        ctx = mp.get_context("spawn")
        with cf.ProcessPoolExecutor(len(plan), mp_context=ctx) as pool:
            futs = [pool.submit(_worker_main, a) for a in plan]
            while True:
                done, _ = cf.wait(futs, timeout=0.5)
                r = _rss_kb(node.pids().values())
                rss_peak = max(rss_peak, r)
                samples.append(r)
                if len(done) == len(futs):
                    break
            results = [f.result() for f in futs]
        secs = time.monotonic() - t0
        report["machine_during_fuzz"] = _machine(cpu0, cpu_jiffies(), load0)
        frames_by = Counter()
        stats = Counter()
        anomalies: list[str] = []
        episodes: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for r in results:
            frames_by.update(r["frames"])
            stats.update(r["stats"])
            anomalies += r["anomalies"]
            for k, (n, t) in r["episodes"].items():
                episodes[k][0] += n
                episodes[k][1] += t
        sent = sum(frames_by.values())
        log(f"perf.fuzz: {sent} frames in {secs:.1f} s; verifying")
        t1 = time.monotonic()
        ver = verify(node, seed, node.port, cfg.caps)
        report["verify_s"] = round(time.monotonic() - t1, 2)
        checks = ver.pop("checks")
        more, rss1, text = run_checks(node, pids0, rss0, rss_peak, rss_limit_mb, stats,
                                      anomalies)
        checks.update(more)
        report.update({
            "frames_sent": sent,
            "frames_by_category": dict(sorted(frames_by.items())),
            "connections_made": int(stats["connections"]),
            "seconds": round(secs, 2),
            "frames_per_s": round(sent / secs) if secs else 0,
            "rss_before_kb": rss0, "rss_after_kb": rss1, "rss_peak_kb": rss_peak,
            "rss_during_kb": samples[::max(1, len(samples) // 20)],
            "client": {k: v for k, v in sorted(stats.items())},
            "episodes": {k: {"n": n, "mean_ms": round(1000 * t / n, 2)}
                         for k, (n, t) in sorted(episodes.items())},
            "lane_seconds": [r["lane_s"] for r in results],
            "client_cpu_s": [r["cpu_s"] for r in results],
            **ver,
            "checks": checks,
            "node_log_tail": text[-3000:],
        })
        report["pass"] = all(c["ok"] for c in checks.values())
        return report
    except Exception as e:
        report["pass"] = False
        report["error"] = f"{type(e).__name__}: {e}"
        if node is not None and node.log.exists():
            report["node_log_tail"] = node.log.read_text(errors="replace")[-3000:]
        e.report = report  # (main prints it)
        raise
    finally:
        if node is not None:
            node.stop()
            report["segments_left"] = node.segments()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            report["workdir"] = str(work)
