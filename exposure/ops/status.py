"""``exposure status``: what a running node is doing, from its shared memory.

Read-only and lock-free (each counter is one aligned word with one writer: see
:mod:`exposure.shm.counters_layout`, :mod:`exposure.shm.session_layout` and
:mod:`exposure.shm.control`). It reports the role and epoch; the global seqs received,
computed, durable and replicated, and the lags between them in events and microseconds;
the processes (pid, CPU share, wait strategy); every stage's counters and their rates
(sampled over ``interval`` seconds); the session port's counters; and per session whether
it is connected, what the node holds, has processed and has on disk, its rejects per
reason (``unauthorized`` included: records outside its entitlements) and its own
counters. In a pair it adds the coordinator's record from etcd when it can reach it.

``exposure status --cluster FILE`` (:func:`cluster_status`) shows each partition's node
(its map, role, seqs, lags, rates and wrong_partition rejects) and the consolidator (its
process, batches and the cluster's fund).
"""

from __future__ import annotations

import time

import numpy as np

from exposure.config.node import NodeConfig
from exposure.core.day import clock_from_env, day_info
from exposure.core.types import (
    C_LAST_GSEQ,
    C_REJECTS,
    C_ROLL_DATE,
    C_ROLL_GSEQ,
    C_ROLLS,
    C_UNAUTHORIZED,
    NODE_REASONS,
    R_WRONG_PARTITION,
)
from exposure.net.sessions import session_names
from exposure.node.segments import read_control, read_counters, ring_backlog, ring_names
from exposure.shm import session_layout as SL
from exposure.shm.control import (
    CONTROL_WORDS,
    CTL_EPOCH,
    CTL_FANOUT_ERRORS,
    CTL_REPL_DUR,
    CTL_ROLE,
    CTL_SEQUENCED,
    ROLE_NAMES,
)
from exposure.shm.segment import SharedArray
from exposure.shm.tally_segment import TallySegment

__all__ = ["node_status", "lags", "read_counters", "read_control", "render", "cluster_status",
           "render_cluster"]


def lags(counters: dict[str, int], computed: int, durable: int,
         replicated: int | None) -> dict[str, float]:
    """How far the journal (and, in a pair, the backup's durable mark) trail compute, in
    events and in microseconds of ingest receive time: the last record computed against
    the last one durable (on the backup: the last one its ACKs covered, at frame
    granularity, so never less than the truth). 0 when nothing is behind."""
    def us(recv_key: str, behind: bool) -> float:
        then = counters[recv_key]
        return round(max((counters["compute_recv_ns"] - then) / 1e3, 0.0), 1) \
            if then and behind else 0.0

    out = {"journal_events": max(computed - durable, 0),
           "journal_us": us("journal_durable_recv_ns", computed > durable)}
    if replicated is not None:
        out["replication_events"] = max(computed - replicated, 0)
        out["replication_us"] = us("mirror_replicated_recv_ns", computed > replicated)
    return out


def _processes(cfg: NodeConfig, writer_pid: int, interval: float) -> list[dict]:
    """The supervisor and each process of the map: pid, CPU share over ``interval``."""
    import psutil

    procs = []
    try:
        sup = psutil.Process(writer_pid)
        procs.append(("supervisor", sup, "block"))
        waits = {p.name: p.wait for p in cfg.processes}
        for c in sup.children():
            cl = c.cmdline()
            if "--process" in cl:
                name = cl[cl.index("--process") + 1]
                procs.append((name, c, waits.get(name, "")))
        for _, p, _ in procs:
            p.cpu_percent(None)
    except psutil.Error:
        return []
    time.sleep(interval)
    out = []
    for name, p, wait in procs:
        try:
            cpu = p.cpu_percent(None)
            aff = p.cpu_affinity()
        except psutil.Error:
            continue
        out.append({"name": name, "pid": p.pid, "cpu": round(cpu, 1), "wait": wait,
                    "cpus": aff})
    return out


def node_status(cfg: NodeConfig, interval: float = 0.25) -> dict:
    """The status of the node ``cfg`` names; FileNotFoundError when it is not running.
    Rates and CPU shares are measured over ``interval`` seconds."""
    try:
        seg = SharedArray.attach(cfg.segment("sessions"), SL.session_shape(cfg.max_sessions),
                                 np.uint64, readonly=True)
    except Exception as e:  # posix_ipc.ExistentialError, or a shape that does not fit
        raise FileNotFoundError(f"no session table {cfg.segment('sessions')}: is the node "
                                f"running (with this config)? ({e})") from None
    try:
        t = np.array(seg.array)  # one copy: every number below from the same moment
    finally:
        seg.close()
    with TallySegment.attach(cfg.segment("tally")) as tally:
        ctr = np.array(tally.state.ctr)
    try:
        ctl_seg = SharedArray.attach(cfg.segment("control"), (CONTROL_WORDS,), np.uint64,
                                     readonly=True)
        ctl = np.array(ctl_seg.array)
        ctl_seg.close()
    except Exception:  # (posix_ipc.ExistentialError: the node stopped meanwhile)
        ctl = np.zeros(CONTROL_WORDS, np.uint64)
    before = read_counters(cfg)
    t0 = time.monotonic()
    with TallySegment.attach(cfg.segment("tally")) as tally:
        writer = int(tally.layout.header(tally.buf)["writer_pid"])
    processes = _processes(cfg, writer, interval)
    if time.monotonic() - t0 < interval:
        time.sleep(max(0.0, interval - (time.monotonic() - t0)))
    after = read_counters(cfg)
    dt = max(time.monotonic() - t0, 1e-6)
    rates = {k.removesuffix("_total"): round((after[k] - before[k]) / dt, 1)
             for k in ("ingest_events_total", "compute_events_total", "compute_batches_total",
                       "fanout_datagrams_total", "journal_records_total",
                       "journal_fsyncs_total")}
    rings = {}
    for r in ring_names(cfg):
        try:
            cap, fill = ring_backlog(cfg, r)
        except Exception:  # (the node restarts its processes: its rings are remade)
            continue
        rings[r] = {"fill": fill[0], "capacity": cap}
        if len(fill) > 1:  # the journal's backlog on the compute ring
            rings[f"{r}>journal"] = {"fill": fill[1], "capacity": cap}
    names = session_names(cfg.sessions_file) if cfg.sessions_file else {}
    sessions = []
    for sid in range(1, t.shape[0]):
        row = t[sid]
        if not (row[SL.S_HELD] or row[SL.S_LOGINS] or row[SL.S_AUTH_FAILS]):
            continue
        rej = {NODE_REASONS.get(k, str(k)): int(row[SL.S_REJ + k])
               for k in range(1, SL.N_REJ) if row[SL.S_REJ + k]}
        sessions.append({
            "id": sid, "session": sid, **({"name": names[sid]} if sid in names else {}),
            "connected": bool(row[SL.S_CONNECTED]), "held": int(row[SL.S_HELD]),
            "processed": int(row[SL.S_DONE]), "durable": int(row[SL.S_DURABLE]),
            "rejects": rej,
            **{k: int(row[c]) for k, c in SL.SESSION_COUNTERS.items()}})
    received = max(after["ingest_received_gseq"], int(ctl[CTL_SEQUENCED]))
    computed = after["compute_gseq"] or int(ctr[C_LAST_GSEQ])
    durable = int(t[0, SL.S_DURABLE])
    replicated = int(ctl[CTL_REPL_DUR]) if cfg.replicated else None
    out = {"node": cfg.name,
           "role": ROLE_NAMES.get(int(ctl[CTL_ROLE]), str(int(ctl[CTL_ROLE]))),
           "epoch": int(ctl[CTL_EPOCH]),
           "gseq": {"received": received, "computed": computed, "durable": durable,
                    **({"replicated": replicated} if replicated is not None else {})},
           "lag": lags(after, computed, durable, replicated),
           "rates": rates,
           "rings": rings,
           "processes": processes,
           "counters": after,
           "authenticated": cfg.sessions_file is not None,
           "sequenced": int(ctr[C_LAST_GSEQ]), "durable": durable,
           "unauthorized": int(ctr[C_UNAUTHORIZED]),
           "port": {k: int(t[0, c]) for k, c in SL.NODE_COUNTERS.items()},
           "fanout": {"send_errors": int(ctl[CTL_FANOUT_ERRORS])},
           "sessions": sessions,
           "day": day_info(cfg.roll_schedule, int(ctr[C_ROLL_DATE]), int(ctr[C_ROLL_GSEQ]),
                           int(ctr[C_ROLLS]), clock_from_env()())}
    if cfg.replicated:
        out["coordinator"] = _coordinator(cfg)
    return out


def _coordinator(cfg: NodeConfig) -> dict | None:
    """The pair's record in etcd (None when etcd cannot be reached within a second)."""
    try:
        from exposure.pair.coord import PairStore

        rec, rev, members = PairStore(cfg.etcd, cfg.etcd_prefix, timeout=1.0).read()
    except Exception as e:  # etcd down, or not installed: status still answers
        return {"error": str(e)[:200]}
    return {"record": None if rec is None else {"epoch": rec.epoch, "primary": rec.primary,
                                                 "sync": rec.sync},
            "revision": rev, "members": sorted(members)}


def render(st: dict) -> str:
    """The status as a few lines of text for a terminal."""
    g = st["gseq"]
    lines = [f"node {st['node']}: {st['role']}, epoch {st['epoch']}",
             "gseq  received {received:,}  computed {computed:,}  durable {durable:,}".format(
                 **g) + (f"  replicated {g['replicated']:,}" if "replicated" in g else ""),
             f"lag   journal {st['lag']['journal_events']:,} events "
             f"({st['lag']['journal_us']:,.0f} us)"
             + (f", replication {st['lag']['replication_events']:,} events "
                f"({st['lag']['replication_us']:,.0f} us)"
                if "replication_events" in st["lag"] else ""),
             "rates " + ", ".join(f"{k} {v:,.0f}/s" for k, v in st["rates"].items())]
    lines.append("rings " + ", ".join(f"{k} {v['fill']:,}/{v['capacity']:,}"
                                      for k, v in st["rings"].items()))
    for p in st["processes"]:
        lines.append(f"proc  {p['name']:<10} pid {p['pid']:<8} cpu {p['cpu']:5.1f}%  "
                     f"wait {p['wait'] or '-'}  cpus {p['cpus']}")
    c = st["counters"]
    lines.append(f"feed  {c['fanout_datagrams_total']:,} datagrams, "
                 f"{c['fanout_dropped_total']:,} dropped, {c['fanout_heartbeats_total']:,} "
                 f"heartbeats, {c['fanout_refresh_datagrams_total']:,} refresh; snapshots "
                 f"{c['snapshot_served_total']:,} served")
    lines.append(f"disk  {c['journal_fsyncs_total']:,} fsyncs "
                 f"(max {c['journal_fsync_ns_max'] / 1e3:,.0f} us); restarts "
                 f"{c['restarts_total']}")
    port = st["port"]
    lines.append("port  " + ", ".join(f"{k} {v:,}" for k, v in port.items() if v))
    for s in st["sessions"]:
        lines.append(f"sess  {s['id']:<5} {'up  ' if s['connected'] else 'down'} held "
                     f"{s['held']:,} processed {s['processed']:,} durable {s['durable']:,}"
                     + (f" rejects {s['rejects']}" if s["rejects"] else ""))
    if "day" in st:
        lines.append(_day_line(st["day"]))
    if "coordinator" in st:
        lines.append(f"etcd  {st['coordinator']}")
    return "\n".join(lines)


def _day_line(d: dict) -> str:
    last = (f"last roll {d['last_roll_date'] or '(undated)'} at gseq {d['last_roll_gseq']:,}"
            if d["last_roll_gseq"] else "no roll yet")
    sched = (f"; trading day {d['trading_day']}, next roll {d['next_roll']} ({d['roll_at']})"
             if d["trading_day"] else "; no scheduled roll")
    return f"day   {last} ({d['rolls']} rolls){sched}"


def cluster_status(cluster, interval: float = 0.25) -> dict:
    """Every partition's status (as :func:`node_status`, in brief; ``"down"`` with the
    reason when its node does not run on this host) and the consolidator's."""
    from exposure.cluster.topology import primary_of

    parts = []
    for k, (name, members) in enumerate(zip(cluster.names, cluster.members, strict=True)):
        cfg = primary_of(members)
        row = {"partition": name, "node": cfg.name, "owns": cluster.pmap.describe(k)}
        try:
            st = node_status(cfg, interval)
        except (FileNotFoundError, TimeoutError) as e:
            parts.append({**row, "state": "down", "error": str(e)[:200]})
            continue
        with TallySegment.attach(cfg.segment("tally")) as tally:
            wrong = int(tally.state.ctr[C_REJECTS + R_WRONG_PARTITION])
        parts.append({**row, "state": st["role"], "epoch": st["epoch"], "gseq": st["gseq"],
                      "lag": st["lag"], "rates": st["rates"], "wrong_partition": wrong,
                      "sessions": sum(s["connected"] for s in st["sessions"])})
    return {"cluster": cluster.name, "partitions": parts,
            "consolidator": _consolidator_status(cluster)}


def _consolidator_status(cluster) -> dict | None:
    cfg = cluster.consolidator
    if cfg is None:
        return None
    from exposure.engine.desk import Desk

    pid = TallySegment.writer_of(cfg.segment("tally"))
    out: dict = {"name": cfg.name, "feed": f"{cfg.group}:{cfg.fanout_port}", "pid": pid}
    try:
        import psutil

        alive = pid > 0 and psutil.pid_exists(pid)
        with Desk(cfg.name) as desk:
            fund = desk.fund()
            batches = int(desk.state.ctrpub[0]["gseq"])
    except (FileNotFoundError, TimeoutError) as e:
        return {**out, "state": "down", "error": str(e)[:200]}
    out["state"] = "running" if alive else "down (its segment is left from a dead process)"
    out["batches"] = batches
    out["fund"] = {k: fund[k] for k in ("gross", "net", "crossing", "live_orders")}
    out["currency"] = cfg.currencies.base  # the fund's figures are in it (SPEC 7)
    return out


def render_cluster(st: dict) -> str:
    """The cluster's status as a few lines of text."""
    lines = [f"cluster {st['cluster']}: {len(st['partitions'])} partitions"]
    for p in st["partitions"]:
        if p["state"] == "down":
            lines.append(f"part  {p['partition']:<6} {p['node']}: down ({p['error']})")
            continue
        g = p["gseq"]
        lines.append(f"part  {p['partition']:<6} {p['node']}: {p['state']}, epoch "
                     f"{p['epoch']}, computed {g['computed']:,}, durable {g['durable']:,}, "
                     f"{p['rates']['compute_events']:,.0f} events/s, journal lag "
                     f"{p['lag']['journal_events']:,}, wrong_partition "
                     f"{p['wrong_partition']:,}, {p['sessions']} sessions up; {p['owns']}")
    c = st["consolidator"]
    if c is None:
        lines.append("cons  none configured ([consolidator] config)")
    elif "fund" not in c:
        lines.append(f"cons  {c['name']}: down ({c.get('error', '')})")
    else:
        f = c["fund"]
        lines.append(f"cons  {c['name']}: {c['state']} (pid {c['pid']}), feed {c['feed']}, "
                     f"{c['batches']:,} batches; fund ({c.get('currency', '?')}) gross "
                     f"{f['gross']:,.2f}, net "
                     f"{f['net']:,.2f}, crossing {f['crossing']:,.2f}")
    return "\n".join(lines)
