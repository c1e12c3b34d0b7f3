"""A cluster: one fund's stream over several partitions, each a node or a pair, composed
into one document (shared/SPEC.md section 5; the map itself: :mod:`exposure.core.partition`).

The cluster file (``examples/cluster/cluster.toml``)::

    [cluster]
    name = "fund"              # the cluster's name (its consolidator's segments)
    accounts = 4096            # the ids the map covers
    sources = 1024

    [consolidator]
    config = "consolidator.toml"  # its name, [fanout] and capacities (cluster.consolidator)
    cpu = 1                    # optional: the CPU it is pinned to (negative: from the last)
    wait = "block"             # sleep in select when idle; "spin" (needs cpu) polls on

    [[partition]]
    name = "p0"
    config = "p0.toml"         # the partition's node config (a pair: ["a.toml", "b.toml"])
    accounts = [[0, 2047]]     # ids and [lo, hi] ranges, inclusive
    sources = [[0, 7]]

Each partition's node config names the cluster file and its partition
(``[partition] cluster``, ``name``), so that its ingest rejects what it does not own.
:func:`load_cluster` checks that they agree.

Composition (:func:`compose`), from each partition's tallies as read here:

* ``accounts`` and ``positions`` from the partition that owns the account;
* ``instruments``: ``fund_pos``, ``open_buy``, ``open_sell`` summed; ``ref_price`` the
  lowest-numbered partition's that has priced it (once marked, all partitions agree);
* ``fund``: the eleven account sums summed; ``net_long_mv``, ``net_short_mv`` and
  ``crossing`` from the summed ``fund_pos`` (SPEC section 3), valued in the base currency
  at each instrument's rate (SPEC section 7; every partition sees every fx event);
* ``sectors`` summed;
* ``counts`` summed, with mark, instrument, fx and roll events (every partition sees them;
  the kernel counts them apart: ``types.C_BCAST_*``) counted once.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from exposure.config.node import ConfigError, NodeConfig, load_config, resolve_cpu
from exposure.core.partition import MapError, PartitionMap, read_toml
from exposure.core.types import (
    C_ACCEPTED,
    C_BCAST_ACCEPTED,
    C_BCAST_BAD_FIELD,
    C_BCAST_OUT_OF_RANGE,
    C_BUSTS,
    C_LATE_FILLS,
    C_REJECTED,
    C_REJECTS,
    C_ROLLS,
    R_BAD_FIELD,
    R_OUT_OF_RANGE,
    REASONS,
)

__all__ = ["Cluster", "ClusterError", "PartView", "load_cluster", "compose", "send_cluster",
           "partition_views", "replay_partition", "replay_cluster", "primary_of"]

_ACC_SUMS = ("long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
             "worst_gross", "margin", "beta_net", "pnl", "live_orders")


class ClusterError(ValueError):
    """A cluster file that cannot run, or a partition that cannot be read."""


@dataclass(frozen=True)
class Cluster:
    path: Path
    name: str
    pmap: PartitionMap
    configs: tuple[NodeConfig, ...]  # per partition, in map order (a pair's first node)
    consolidator: NodeConfig | None = None
    members: tuple[tuple[NodeConfig, ...], ...] = ()  # per partition: its node(s)
    consolidator_cpu: int | None = None  # the CPU it is pinned to (None: not pinned)
    consolidator_wait: str = "block"     # "block" (sleeps in select) or "spin"

    @property
    def names(self) -> tuple[str, ...]:
        return self.pmap.names


_KEYS = {"cluster": {"name", "accounts", "sources"},
         "partition": {"name", "config", "accounts", "sources"},
         "consolidator": {"config", "cpu", "wait"}}
_CONSOLIDATOR_WAITS = ("block", "spin")


def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster file and every partition's node config."""
    path = Path(path)
    try:
        pmap = PartitionMap.load(path)
    except MapError as e:
        raise ClusterError(str(e)) from None
    doc = read_toml(path)
    for sec in doc:
        if sec not in _KEYS:
            raise ClusterError(f"{path}: unknown section [{sec}] (allowed: cluster, "
                               "consolidator, partition)")
    extra = set(doc.get("cluster", {})) - _KEYS["cluster"]
    if extra:
        raise ClusterError(f"{path}: unknown key cluster.{sorted(extra)[0]}")
    name = doc.get("cluster", {}).get("name", "cluster")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_"
                                                        for c in name):
        raise ClusterError(f"{path}: cluster.name = {name!r}: letters, digits, '-', '_'")
    members, seen = [], {}
    for k, p in enumerate(doc["partition"]):
        extra = set(p) - _KEYS["partition"]
        if extra:
            raise ClusterError(f"{path}: unknown key partition[{k}].{sorted(extra)[0]}")
        files = [p["config"]] if isinstance(p.get("config"), str) else p.get("config")
        if not files or not all(isinstance(f, str) and f for f in files) or len(files) > 2:
            raise ClusterError(f"{path}: partition {p['name']!r} needs config = \"FILE\" "
                               "(a node) or [\"A\", \"B\"] (the two nodes of a pair)")
        cfgs = []
        for f in files:
            try:
                cfg = load_config(path.parent / f)
            except ConfigError as e:
                raise ClusterError(f"partition {p['name']!r}: {e}") from None
            part = cfg.partition
            if part is None or part.name != p["name"] or (
                    part.cluster.resolve() != path.resolve()):
                raise ClusterError(
                    f"partition {p['name']!r}: its config {cfg.source} must say [partition] "
                    f"cluster = {str(path.name)!r} (this file) and name = {p['name']!r}, so "
                    "that it rejects what it does not own")
            for what in ("name", "ingest_port"):
                v = getattr(cfg, what)
                if v in seen.get(what, {}):
                    raise ClusterError(f"partitions {seen[what][v]!r} and {p['name']!r} "
                                       f"have the same {what.replace('_', ' ')} {v!r}")
                seen.setdefault(what, {})[v] = p["name"]
            cfgs.append(cfg)
        members.append(tuple(cfgs))
    configs = [m[0] for m in members]
    ccy = configs[0].currencies  # SPEC 7: one table, or the same id means two currencies
    for cfg in (c for m in members for c in m):
        if cfg.currencies != ccy:
            raise ClusterError(f"{cfg.source}: [currencies] ({cfg.currencies.describe()}) "
                               f"differs from {configs[0].source}'s ({ccy.describe()}): "
                               "every partition names the same currencies")
    cons = None
    ct = doc.get("consolidator", {})
    if set(ct) - _KEYS["consolidator"]:
        raise ClusterError(f"{path}: unknown key consolidator."
                           f"{sorted(set(ct) - _KEYS['consolidator'])[0]}")
    if ct.get("config"):
        try:
            cons = load_config(path.parent / ct["config"])
        except ConfigError as e:
            raise ClusterError(f"consolidator: {e}") from None
        if cons.currencies != ccy:
            raise ClusterError(f"consolidator: [currencies] ({cons.currencies.describe()}) "
                               f"differs from the partitions' ({ccy.describe()})")
        if cons.name in seen["name"]:
            raise ClusterError(f"the consolidator and partition {seen['name'][cons.name]!r} "
                               f"have the same name {cons.name!r}")
        for what, (bound, have) in {"accounts": (pmap.acc_owner.size, cons.caps.accounts),
                                    "instruments": (max(c.caps.instruments for c in configs),
                                                    cons.caps.instruments),
                                    "sectors": (max(c.caps.sectors for c in configs),
                                                cons.caps.sectors)}.items():
            if have < bound:
                raise ClusterError(f"consolidator: capacities.{what} = {have}: at least "
                                   f"{bound} (the partitions')")
    cpu, wait = _consolidator_process(path, ct)
    return Cluster(path, name, pmap, tuple(configs), cons, tuple(members), cpu, wait)


def _consolidator_process(path: Path, ct: dict) -> tuple[int | None, str]:
    """``[consolidator] cpu`` (an index into this machine's CPUs, negative from the last)
    and ``wait`` (``"spin"`` needs a CPU of its own)."""
    try:
        cpu = resolve_cpu(ct.get("cpu"), f"{path}: consolidator.")
    except ConfigError as e:
        raise ClusterError(str(e)) from None
    wait = ct.get("wait", "block")
    if wait not in _CONSOLIDATOR_WAITS:
        raise ClusterError(f"{path}: consolidator.wait = {wait!r}: one of "
                           f"{', '.join(_CONSOLIDATOR_WAITS)}")
    if wait == "spin" and cpu is None:
        raise ClusterError(f"{path}: consolidator.wait = 'spin' needs a cpu of its own")
    return cpu, wait


# ----------------------------------------------------------------------------- composition
@dataclass
class PartView:
    """What the composition needs of one partition: its SPEC document, its instruments'
    multipliers (``{instrument: multiplier}``), its counters row (``types.C_*``) and its
    instruments' rates (``{instrument: rate of its currency}``, SPEC section 7; an
    instrument left out: 1.0)."""

    document: dict
    multipliers: dict[int, float]
    ctr: np.ndarray
    rates: dict[int, float] = field(default_factory=dict)


def _owner_rows(views: list[PartView], owner: np.ndarray, table: str) -> list:
    """Rows of ``table`` (accounts, positions) from the partition that owns the row's
    account (an account the map leaves out: the lowest-numbered partition that has it),
    sorted by account (and instrument)."""
    out: dict = {}
    for k, v in enumerate(views):
        for row in v.document.get(table, []):
            a = row["account"]
            own = int(owner[a]) if a < len(owner) else -1
            ident = (a, row.get("instrument", -1))
            if own == k or (own < 0 and ident not in out):
                out[ident] = row
    return [out[ident] for ident in sorted(out)]


def compose(views: list[PartView], pmap: PartitionMap) -> dict:
    """The cluster's SPEC document from its partitions' (SPEC section 5)."""
    accounts = _owner_rows(views, pmap.acc_owner, "accounts")
    positions = _owner_rows(views, pmap.acc_owner, "positions")

    inst: dict[int, dict] = {}
    mult: dict[int, float] = {}
    rate: dict[int, float] = {}
    for v in views:
        for row in v.document.get("instruments", []):
            i = row["instrument"]
            cur = inst.setdefault(i, {"instrument": i, "ref_price": 0.0, "fund_pos": 0,
                                      "open_buy": 0, "open_sell": 0})
            for f in ("fund_pos", "open_buy", "open_sell"):
                cur[f] += row[f]
            if cur["ref_price"] == 0.0 and row["ref_price"] != 0.0:
                cur["ref_price"] = row["ref_price"]
        for i, m in v.multipliers.items():
            mult.setdefault(i, m)
        for i, x in v.rates.items():
            rate.setdefault(i, x)
    instruments = [inst[i] for i in sorted(inst)]

    fund: dict = {}
    for f in _ACC_SUMS:
        vals = [v.document["fund"][f] for v in views]
        fund[f] = sum(vals) if f == "live_orders" else math.fsum(vals)
    def v(r: dict) -> float:
        i = r["instrument"]
        return r["ref_price"] * mult.get(i, 1.0) * rate.get(i, 1.0)

    nl = math.fsum(max(r["fund_pos"], 0) * v(r) for r in instruments)
    ns = math.fsum(max(-r["fund_pos"], 0) * v(r) for r in instruments)
    fund["net_long_mv"], fund["net_short_mv"] = nl, ns
    fund["crossing"] = fund["gross"] - (nl + ns)

    sec: dict[int, list] = {}
    for v in views:
        for row in v.document.get("sectors", []):
            sec.setdefault(row["sector"], []).append(row)
    sectors = [{"sector": s, "net_mv": math.fsum(r["net_mv"] for r in rows),
                "gross_mv": math.fsum(r["gross_mv"] for r in rows)}
               for s, rows in sorted(sec.items())]

    return {"accounts": accounts, "fund": fund, "instruments": instruments,
            "sectors": sectors, "positions": positions, "counts": compose_counts(views)}


def compose_counts(views: list[PartView]) -> dict:
    """Counts summed over the partitions, marks, instruments, fx and rolls counted once (the
    first partition's: every partition sees the same ones)."""
    ctr = np.sum([v.ctr[:C_BUSTS + 1] for v in views], axis=0)
    for v in views[1:]:
        bf, oor = v.ctr[C_BCAST_BAD_FIELD], v.ctr[C_BCAST_OUT_OF_RANGE]
        ctr[C_ACCEPTED] -= v.ctr[C_BCAST_ACCEPTED]
        ctr[C_REJECTED] -= bf + oor
        ctr[C_REJECTS + R_BAD_FIELD] -= bf
        ctr[C_REJECTS + R_OUT_OF_RANGE] -= oor
    rej = {name: int(ctr[C_REJECTS + code]) for code, name in REASONS.items()
           if ctr[C_REJECTS + code]}
    return {"accepted": int(ctr[C_ACCEPTED]), "rejected": int(ctr[C_REJECTED]),
            "late_fills": int(ctr[C_LATE_FILLS]), "busts": int(ctr[C_BUSTS]),
            "rolls": int(views[0].ctr[C_ROLLS]), "rejects": rej}


def partition_views(cluster: Cluster) -> list[PartView]:
    """Each partition's tallies, read from its tally segment on this host (:class:`Desk`;
    the counters are read first, so the rows are at least as new as the counts); of a
    pair, from the node that is primary."""
    from exposure.engine.desk import Desk

    views = []
    for name, members in zip(cluster.names, cluster.members, strict=True):
        cfg = primary_of(members)
        try:
            with Desk(cfg.name) as desk:
                views.append(desk_view(desk))
        except (FileNotFoundError, TimeoutError) as e:
            raise ClusterError(f"partition {name!r} (node {cfg.name!r}) cannot be read on "
                               f"this host: {e}") from None
    return views


def primary_of(members: tuple[NodeConfig, ...]) -> NodeConfig:
    """The member that runs here as primary (else the first: its error says why)."""
    from exposure.node.segments import read_control
    from exposure.shm.control import CTL_ROLE, ROLE_PRIMARY

    for cfg in members:
        try:
            if int(read_control(cfg)[CTL_ROLE]) == ROLE_PRIMARY:
                return cfg
        except FileNotFoundError:
            continue
    return members[0]


def desk_view(desk) -> PartView:
    ctr = desk.counters()
    doc = desk.document()
    ins = desk.instruments()
    mult = dict(zip(ins["instrument"].tolist(), ins["multiplier"].tolist(), strict=True))
    rates = dict(zip(ins["instrument"].tolist(), ins["rate"].tolist(), strict=True))
    return PartView(doc, mult, ctr, rates)


def state_view(st) -> PartView:
    """A private state's view (offline replay)."""
    from exposure.engine.document import document

    touched = np.flatnonzero(st.inst["gseq"] != 0)
    mult = dict(zip(touched.tolist(), st.inst["multiplier"][touched].tolist(), strict=True))
    rates = st.rate[st.inst["currency"][touched]]
    return PartView(document(st), mult, st.ctr.copy(),
                    dict(zip(touched.tolist(), rates.tolist(), strict=True)))


def replay_partition(recs: np.ndarray, pmap: PartitionMap, k: int, caps=None):
    """Partition ``k``'s state after the events of ``recs`` routed to it, each marked as
    its ingest marks them (what it does not own is rejected as wrong_partition)."""
    from exposure.core.routing import mark, split
    from exposure.engine.replay import replay_records

    sub = split(recs, pmap)[k].copy()
    mark(sub, pmap, k)
    return replay_records(sub, caps)


def replay_cluster(recs: np.ndarray, pmap: PartitionMap, caps=None) -> dict:
    """The cluster's document for ``recs``, offline: each partition replays its own
    events, then :func:`compose`."""
    return compose([state_view(replay_partition(recs, pmap, k, caps))
                    for k in range(pmap.partitions)], pmap)


# ----------------------------------------------------------------------------- routing
def send_cluster(cluster: Cluster, recs: np.ndarray, session: int = 1, timeout: float = 60.0,
                 retry_s: float | None = None, rate: float = 0.0,
                 secrets: list[bytes | None] | None = None, progress=None,
                 frame: int = 1024) -> dict:
    """Send ``recs`` through the cluster: each record to its partition by the map (marks
    and instruments to all), one session per partition with its own seqs, each on its own
    :class:`~exposure.net.producer.Producer` (resends, failover to a pair's peer, and a
    partition that goes silent given up after the producer's liveness interval: a pair's
    ``failover_ms`` x 3, so a hung primary fails over to its backup within that bound), all
    partitions at once; their first logins within ``timeout`` and, while connected, no
    acknowledgement missing for longer (``retry_s``: how long a partition may stay away;
    default 60 s for a pair, 0 for a node: see :class:`exposure.net.sender.Watch`).
    Returns the counts of each partition (as ``exposure send FILE`` prints them) and their
    sums (``events``: the file's records; ``delivered``: what the partitions were sent, a
    mark or instrument once to each, and so also counted in each partition's ``rejected``
    when it is rejected; the cluster's document counts it once). ``frame``: events per
    frame."""
    from exposure.core.routing import split  # (jitted: here, not for dump and status)
    from exposure.net.client import SendError
    from exposure.net.sender import Watch, abandon, finish, open_producer, send_numbered, summary

    parts = split(recs, cluster.pmap)
    results: list = [None] * len(parts)

    def one(k: int) -> None:
        cfg = cluster.configs[k]
        retry = retry_s if retry_s is not None else (60.0 if cfg.peer_ingest else 0.0)
        say = (lambda m, n=cluster.names[k]: progress(f"{n}: {m}")) if progress else None
        try:
            p = open_producer(cfg, session, secrets[k] if secrets else None, timeout)
            try:
                watch = Watch(p, timeout, retry)
                skipped = send_numbered(p, parts[k], watch, rate * len(parts[k])
                                        / max(len(recs), 1), say)
            except BaseException:
                abandon(p)
                raise
            finish(p, watch)
            results[k] = summary(p, len(parts[k]) - skipped, skipped)
        except Exception as e:  # noqa: BLE001  (reported as this partition's failure)
            results[k] = e

    threads = [threading.Thread(target=one, args=(k,), daemon=True) for k in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [(cluster.names[k], r) for k, r in enumerate(results)
              if not isinstance(r, dict)]
    if failed:
        raise SendError("; ".join(f"partition {n!r}: {e}" for n, e in failed))
    total = {"events": len(recs), "delivered": 0, "sent": 0, "acknowledged": 0,
             "rejected": 0, "rejects": {}, "reconnects": 0}
    for k, r in enumerate(results):
        total["delivered"] += len(parts[k])
        for f in ("sent", "acknowledged", "rejected", "reconnects"):
            total[f] += r[f]
        for reason, n in r["rejects"].items():
            total["rejects"][reason] = total["rejects"].get(reason, 0) + n
    total["partitions"] = {n: r for n, r in zip(cluster.names, results, strict=True)}
    return total
