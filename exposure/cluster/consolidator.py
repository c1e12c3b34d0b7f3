"""The consolidator process: ``exposure consolidate --cluster FILE``.

One process, one loop (:class:`exposure.node.stages.agent.Runner`) over three stages: the
:class:`~exposure.cluster.consolidate.ConsolidateStage` (every partition's feed in, the cluster's
rows out), a :class:`~exposure.node.stages.fanout.FanoutStage` (the cluster's multicast feed)
and a :class:`~exposure.node.stages.snapshot_server.SnapshotServer` (its recovery server). With
the cluster file's ``[consolidator] wait = "block"`` (the default) it sleeps in ``select``
on the partitions' feed sockets when there is nothing to do; with ``"spin"`` it polls
without sleeping, on the CPU ``[consolidator] cpu`` gives it (each wake-up from ``select``
costs tens of microseconds of a cold Python loop; a host with a spare core spins).

Its settings are the node config named by the cluster file's ``[consolidator] config``:
``[node] name`` (the segment ``/exposure.<name>.tally`` that desks read), ``[desks]``,
``[capacities]`` (accounts, instruments and sectors: the partitions' own, at least),
``[fanout]`` (its own group, port and recovery server) and ``[rings] fanout``. So
``Desk(name)``, ``exposure dump --config``, ``exposure watch --config`` and
:meth:`exposure.feed.subscriber.Subscriber.from_config` take the consolidator as they take a node.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time

import numpy as np

from exposure.cluster.consolidate import ConsolidateStage
from exposure.cluster.topology import Cluster
from exposure.core.capacity import Capacities
from exposure.core.log import setup
from exposure.core.types import UPDATE_DTYPE
from exposure.feed.subscriber import Subscriber
from exposure.node.stages.agent import Runner
from exposure.node.stages.fanout import FanoutStage
from exposure.node.stages.snapshot_server import SnapshotServer
from exposure.shm.control import CONTROL_WORDS, CTL_EPOCH, CTL_ROLE, ROLE_PRIMARY
from exposure.shm.ring import Ring
from exposure.shm.tally_segment import TallySegment
from exposure.shm.wait import WaitStrategy

__all__ = ["run_consolidator", "epoch_now"]

log = logging.getLogger(__name__)


def epoch_now(after: int = 0) -> int:
    """A new incarnation's epoch: the time in whole seconds, once it is past ``after``
    (waits for that: a restart must be a higher epoch, or its subscribers would take its
    datagrams for the old incarnation's)."""
    while int(time.time()) <= after:
        time.sleep(0.02)
    return int(time.time()) & 0xFFFFFFFF


def _previous_epoch_bound(name: str) -> int:
    """The highest epoch a dead consolidator whose segment is left could have had: it took
    its epoch within a second of creating the segment (0: no segment left)."""
    import posix_ipc

    try:
        with TallySegment.attach(name) as old:
            return int(old.layout.header(old.buf)["writer_start"]) + 1
    except (FileNotFoundError, ValueError, posix_ipc.Error):
        return 0


def run_consolidator(cluster: Cluster, stop: list, on_ready=None) -> dict:
    """Run until ``stop`` is non-empty; return the counts. ``on_ready(text)`` is called
    once every partition's view has joined and the cluster's rows are published."""
    cfg = cluster.consolidator
    if cfg is None:
        raise ValueError(f"{cluster.path}: no [consolidator] config")
    caps = Capacities(accounts=cfg.caps.accounts, instruments=cfg.caps.instruments,
                      sectors=cfg.caps.sectors, sources=1, orders=1, cells=cfg.caps.cells)
    ring_name = cfg.segment("ring.fanout")
    Ring.unlink(ring_name)  # a dead consolidator's leftovers
    after = _previous_epoch_bound(cfg.segment("tally"))
    seg = TallySegment.create(cfg.segment("tally"), caps, mode=cfg.desk_mode,
                              group=cfg.desk_group)
    ring = Ring.create(ring_name, cfg.rings["fanout"], UPDATE_DTYPE.itemsize)
    epoch = epoch_now(after)
    ctl = np.zeros(CONTROL_WORDS, np.int64)
    ctl[CTL_ROLE], ctl[CTL_EPOCH] = ROLE_PRIMARY, epoch
    subs: list[Subscriber] = []
    stages = []
    try:
        for pcfg in cluster.configs:
            subs.append(Subscriber.from_config(pcfg))
        cons = ConsolidateStage(cluster.pmap, subs, seg.state, ring, on_ready=lambda: (
            on_ready(f"consolidator {cfg.name!r} ready: {len(subs)} partitions, feed "
                     f"{cfg.group}:{cfg.fanout_port}, epoch {epoch}") if on_ready else None),
            words=seg.words)
        stages.append(cons)
        stages.append(FanoutStage(ring, cfg.group, cfg.fanout_port, cfg.interface, cfg.ttl,
                                  cfg.max_datagram, seg.state, epoch=epoch,
                                  heartbeat_ms=cfg.feed_heartbeat_ms,
                                  refresh_rows_per_s=cfg.refresh_rows_per_s,
                                  words=seg.words, positions=cfg.feed_positions))
        if cfg.snapshot_port:
            stages.append(SnapshotServer(cfg.snapshot_host, cfg.snapshot_port, seg.state, ctl,
                                         words=seg.words, positions=cfg.feed_positions))
        # What exists now lives for the whole run (numba's and numpy's machinery, the
        # stages): frozen out of the cyclic collector's sight, whose full collections
        # would otherwise walk it all (py-spy put 38% of this process's samples in them
        # at 10,000 events/s; 2% after). The collector stays on for what the run makes
        # later.
        gc.collect()
        gc.freeze()
        if cluster.consolidator_cpu is not None:
            os.sched_setaffinity(0, {cluster.consolidator_cpu})
        Runner(stages, WaitStrategy(cluster.consolidator_wait)).run(stop)
        return {"batches": cons.batches, "rows": cons.rows_total, "epoch": epoch}
    finally:
        epoch_now(epoch)  # a successor started after this returns has a higher epoch
        for s in stages:
            s.close()
        for s in subs:
            if not s.closed:
                s.close()
        ring.close()
        Ring.unlink(ring_name)
        seg.close()


def main(cluster: Cluster) -> int:
    stop: list = []

    def _stop(*_):
        stop.append(1)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    setup(label="exposure/consolidate")
    res = run_consolidator(cluster, stop, on_ready=log.info)
    log.info(f"stopped after {res['batches']:,} batches, {res['rows']:,} rows")
    return 0
