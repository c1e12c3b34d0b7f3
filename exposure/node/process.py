"""One process of a node's process map: attach the segments, build its stages, run them.

The supervisor (:mod:`exposure.node.supervisor`) starts
``python -m exposure.node.supervisor --process NAME`` for
every ``[[process]]`` of the config; this module is that process's body. Each stage name of
the map has one builder in :data:`BUILDERS` (the registry): a function of the process's
:class:`Context` that returns the stage, or None when the config leaves it out (the
mirror without ``[replication]``, the recovery server with ``snapshot_port = 0``). The loop
is :class:`exposure.node.stages.agent.Runner`, which knows no particular stage.
"""

from __future__ import annotations

import atexit
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from exposure.config.node import NodeConfig
from exposure.core.types import C_LAST_GSEQ
from exposure.net.repl import read_secret
from exposure.net.sessions import Entitlements, load_sessions
from exposure.node.segments import reject_shape, ring_names, segment_names, session_shape
from exposure.node.stages.agent import Runner, Stage
from exposure.node.stages.compute import ComputeStage
from exposure.node.stages.fanout import FanoutStage
from exposure.node.stages.fused import fuse
from exposure.node.stages.ingest import IngestStage, PortLimits
from exposure.node.stages.journal import JournalStage
from exposure.node.stages.mirror import MirrorStage
from exposure.node.stages.replica import ReplicaStage
from exposure.node.stages.sequencer import Sequencer
from exposure.node.stages.snapshot_server import SnapshotServer
from exposure.shm import counters_layout as CN
from exposure.shm.control import CONTROL_WORDS, CTL_PROGRESS
from exposure.shm.ring import Ring
from exposure.shm.segment import SharedArray
from exposure.shm.tally_segment import TallySegment
from exposure.shm.wait import WaitStrategy
from exposure.store.journal import JournalWriter, read_record

__all__ = ["Context", "BUILDERS", "run_process", "exit_process"]

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What a process has attached, for its stages' builders."""

    cfg: NodeConfig
    epoch: int
    names: dict[str, str]
    sessions: np.ndarray   # the session table (writable)
    ctl: np.ndarray        # the control block
    cnt: np.ndarray        # the counters segment
    rings: dict[str, Ring]
    opened: list = field(default_factory=list)  # closed when the process ends
    rejects: np.ndarray | None = None  # the reject log (exposure.shm.reject_layout)

    def tally(self, writable: bool = False) -> TallySegment:
        seg = TallySegment.attach(self.names["tally"], writable=writable)
        self.opened.append(seg)
        return seg


def _session_auth(cfg: NodeConfig) -> tuple[dict[int, bytes] | None, Entitlements]:
    """The sessions' secrets and entitlements, read in the ingest process only (secrets
    live nowhere else); without a sessions file: none, and everything open."""
    if cfg.sessions_file is None:
        return None, Entitlements.everything(cfg.max_sessions)
    specs = load_sessions(cfg.sessions_file, cfg.max_sessions, cfg.caps.accounts,
                          cfg.caps.sources)
    return ({sid: s.secret for sid, s in specs.items()},
            Entitlements.of(specs, cfg.max_sessions, cfg.caps.accounts, cfg.caps.sources))


def _port_limits(cfg: NodeConfig) -> PortLimits:
    return PortLimits(max_connections=cfg.max_connections,
                      login_timeout_ms=cfg.login_timeout_ms,
                      idle_timeout_ms=cfg.idle_timeout_ms,
                      max_output=cfg.max_output_kb * 1024, ipc_ring_kb=cfg.ipc_ring_kb)


def _replica_factory(cx: Context):
    """How ingest builds the replica side of the link (a backup's), or None."""
    cfg = cx.cfg
    if not cfg.replicated:
        return None
    secret = read_secret(cfg.secret_file)

    def make(seq: Sequencer) -> ReplicaStage:
        last = read_record(cfg.data_dir, seq.last) if seq.last > 0 else None
        return ReplicaStage(cfg.repl_listen, secret, cx.ctl, cx.sessions, seq, last,
                            cfg.data_dir, cfg.heartbeat_ms, cfg.failover_ms,
                            cfg.ack_interval_us)
    return make


def _ingest(cx: Context) -> Stage:
    cfg = cx.cfg
    with TallySegment.attach(cx.names["tally"]) as tally:
        next_gseq = int(tally.state.ctr[C_LAST_GSEQ]) + 1
    secrets, ents = _session_auth(cfg)
    return IngestStage(cfg.ingest_host, cfg.ingest_port, cx.sessions, cx.rings["compute"],
                       next_gseq, cfg.max_sessions, cfg.ack_interval_us, ctl=cx.ctl,
                       release=cfg.release, replica=_replica_factory(cx), secrets=secrets,
                       entitlements=ents, limits=_port_limits(cfg), counters=cx.cnt,
                       partition=cfg.partition.ingest_args() if cfg.partition else None,
                       rejects=cx.rejects, ipc=cfg.ipc)


def _compute(cx: Context) -> Stage:
    return ComputeStage(cx.tally(writable=True), cx.sessions, cx.rings["compute"],
                        cx.rings["fanout"], counters=cx.cnt, rejects=cx.rejects,
                        positions=cx.cfg.feed_positions)


def _journal(cx: Context) -> Stage:
    cfg = cx.cfg
    return JournalStage(cx.rings["compute"].reader(1), cx.sessions,
                        JournalWriter(cfg.data_dir, cfg.segment_bytes, cfg.prewrite_bytes,
                                      cache_bytes=cfg.journal_cache_bytes),
                        cfg.fsync,
                        cfg.fsync_interval_ms, mirror_ring=cx.rings.get("mirror"), ctl=cx.ctl,
                        counters=cx.cnt)


def _fanout(cx: Context) -> Stage:
    cfg = cx.cfg
    tally = cx.tally()  # read-only: the refresh cycle
    return FanoutStage(cx.rings["fanout"], cfg.group, cfg.fanout_port, cfg.interface,
                       cfg.ttl, cfg.max_datagram, tally.state, epoch=cx.epoch, ctl=cx.ctl,
                       pair=cfg.replicated, heartbeat_ms=cfg.feed_heartbeat_ms,
                       refresh_rows_per_s=cfg.refresh_rows_per_s, counters=cx.cnt,
                       words=tally.words, positions=cfg.feed_positions)


def _snapshot(cx: Context) -> Stage | None:
    cfg = cx.cfg
    if not cfg.snapshot_port:  # 0: off
        return None
    tally = cx.tally()
    return SnapshotServer(cfg.snapshot_host, cfg.snapshot_port, tally.state, cx.ctl,
                          pair=cfg.replicated, counters=cx.cnt, words=tally.words,
                          positions=cfg.feed_positions)


def _mirror(cx: Context) -> Stage | None:
    cfg = cx.cfg
    if not cfg.replicated:
        return None
    return MirrorStage(cx.rings["mirror"], cx.ctl, cx.sessions, cfg.repl_peer,
                       read_secret(cfg.secret_file), cfg.data_dir, cfg.heartbeat_ms,
                       cfg.failover_ms, counters=cx.cnt)


def _roll(cx: Context) -> Stage | None:
    """The scheduled roll ([day] roll_at; none without it), on the clock of
    :func:`exposure.core.day.clock_from_env`."""
    from exposure.core.day import clock_from_env
    from exposure.node.stages.scheduler import RollScheduler

    cfg = cx.cfg
    if cfg.roll_schedule is None:
        return None
    return RollScheduler(cfg, cx.tally().state.ctr, cx.sessions, cx.ctl,
                         clock=clock_from_env())


# The registry: a stage name of the process map -> its builder.
BUILDERS: dict[str, Callable[[Context], Stage | None]] = {
    "ingest": _ingest, "compute": _compute, "fanout": _fanout, "journal": _journal,
    "mirror": _mirror, "snapshot": _snapshot, "roll": _roll,
}


def _die_with_parent() -> None:
    """A stage process must not outlive its supervisor (kill -9 included): a new
    supervisor would find it still spinning on the old rings."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the supervisor died before prctl
        raise SystemExit(1)


def run_process(cfg: NodeConfig, name: str, epoch: int = 0) -> int:
    """The body of one process of the map: attach, pin, run the stages until SIGTERM."""
    spec = next((p for p in cfg.processes if p.name == name), None)
    if spec is None:
        log.error(f"no process {name!r} in the config")
        return 2
    _die_with_parent()
    if spec.cpu is not None:
        os.sched_setaffinity(0, {spec.cpu})
    if spec.nice:  # before any thread starts: threads inherit it
        try:
            os.setpriority(os.PRIO_PROCESS, 0, spec.nice)
        except OSError as e:  # a negative nice needs CAP_SYS_NICE or RLIMIT_NICE
            log.warning("process %s: nice %d refused (%s); running at %d", name, spec.nice,
                        e.strerror, os.getpriority(os.PRIO_PROCESS, 0))
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    names = segment_names(cfg)
    opened: list = []
    stages: list[Stage] = []
    try:
        sessions = SharedArray.attach(names["sessions"], session_shape(cfg), np.uint64)
        opened.append(sessions)
        control = SharedArray.attach(names["control"], (CONTROL_WORDS,), np.uint64)
        opened.append(control)
        counters = SharedArray.attach(names["counters"], (CN.COUNTER_WORDS,), np.uint64)
        opened.append(counters)
        rejects = SharedArray.attach(names["rejects"], reject_shape(cfg), np.uint64)
        opened.append(rejects)
        rings = {r: Ring.attach(names[r]) for r in ring_names(cfg)}
        opened += rings.values()
        cx = Context(cfg, epoch, names, sessions.array, control.array, counters.array, rings,
                     opened, rejects.array)
        # In the map's order, ingest last: the kernels compile (or load) before the node
        # accepts a session.
        for st in sorted(spec.stages, key=lambda s: s == "ingest"):
            stage = BUILDERS[st](cx)
            if stage is not None:
                stages.append(stage)
        order = {st: k for k, st in enumerate(spec.stages)}
        stages.sort(key=lambda s: order[s.name])
        wait = WaitStrategy(spec.wait, spins=20_000, timeout_s=0.002,
                            tick_s=spec.tick_us / 1e6)
        # The progress counter the supervisor watches: written every 64 passes (a pass is
        # at most a tick or a blocking wait of a few ms long).
        slot = CTL_PROGRESS + cfg.processes.index(spec)
        ctl = control.array

        def progress(beat: int) -> None:
            ctl[slot] = beat

        # Compute followed by its fan-out: one jitted call a pass (exposure.node.stages.fused)
        runner = Runner(fuse(stages), wait, progress)
        # No cyclic-GC pauses in the loop: everything long-lived exists now (frozen out of
        # the collector's sight); what the loop allocates per frame is acyclic and freed by
        # reference counting.
        gc.collect()
        gc.freeze()
        gc.disable()
        runner.run(stop)
        return 0
    finally:
        for s in stages:
            s.close()
        for o in opened:
            o.close()


def exit_process(code: int) -> None:
    """End a node's process (a stage process, the supervisor) with ``code`` once it has
    closed everything it opened: flush the logs and the standard streams, run the
    ``atexit`` handlers, then ``os._exit``. What that skips is the interpreter's teardown,
    which in a process that has loaded numba (thousands of cyclic objects: typing
    registries, compiled overloads) costs 0.1-0.5 s of CPU at every stop and restart of a
    node and leaves nothing behind that matters: segments are closed and unlinked, the
    journal is closed, sockets and memory go with the process. A process that still has a
    non-daemon thread running exits the ordinary way (the interpreter waits for it)."""
    if any(t is not threading.main_thread() and t.is_alive() and not t.daemon
           for t in threading.enumerate()):
        sys.exit(code)
    try:
        atexit._run_exitfuncs()  # logging.shutdown (flushes every handler) among them
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    finally:
        os._exit(code)
