"""A live node: its shared segments, the processes of its process map, and the supervisor.

``exposure run`` creates the segments (tally, sessions, control, one ring per hand-off),
recovers the state from the data directory, starts one OS process per ``[[process]]`` of
the config (``python -m exposure.node.supervisor --process NAME``), each pinned to its CPU
and running
its stages in turn; stages hand over through the rings whether or not they share a
process. The supervisor restarts the processes from the journal when one dies, and stops
everything, removing the segments, on SIGINT/SIGTERM.

In a primary/backup pair the supervisor also runs the node's part of the **roles**
(:class:`exposure.pair.election.Election`, against etcd's pair record): it chooses the role at
every start, promotes a backup in place (no restart: failover costs the silence plus a
few milliseconds), records when the primary runs alone, and restarts a demoted primary's
processes as a backup.

The supervisor also watches every process's **progress counter** (control block): a
process whose loop has not advanced for ``stall_ms`` (hung, stopped, spinning inside one
call) counts as dead, is killed, and the node's processes restart. Under systemd
(``Type=notify``, ``WatchdogSec``) it sends READY=1 once started and WATCHDOG=1 while
every process makes progress (:mod:`exposure.node.sdnotify`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from exposure.config.node import NodeConfig, check_ports_free, load_config
from exposure.core import jit as _jit  # noqa: F401  (before any kernel: the keyed cache)
from exposure.core.log import setup
from exposure.core.types import EVENT_SIZE, UPDATE_DTYPE
from exposure.engine.publish import versions
from exposure.net.hosts import client_host
from exposure.node.process import exit_process, run_process
from exposure.node.sdnotify import Notifier
from exposure.node.segments import (
    reject_shape,
    ring_consumers,
    ring_names,
    segment_names,
    session_shape,
)
from exposure.pair.coord import PairStore
from exposure.pair.election import Election, Stopped
from exposure.shm import counters_layout as CN
from exposure.shm.control import (
    CONTROL_WORDS,
    CTL_EPOCH,
    CTL_IN_SYNC,
    CTL_PROGRESS,
    CTL_RELOAD,
    CTL_ROLE,
    CTL_SEQUENCED,
    ROLE_BACKUP,
    ROLE_NAMES,
    ROLE_PRIMARY,
)
from exposure.shm.ipc_layout import ipc_name
from exposure.shm.ring import Ring
from exposure.shm.segment import SharedArray
from exposure.shm.session_layout import S_DURABLE
from exposure.shm.tally_segment import TallySegment
from exposure.store.journal import first_gseq
from exposure.store.recovery import next_epoch, recover

_ROLL_GSEQ = CN.INDEX["journal_roll_gseq"]

__all__ = ["Node", "main"]


_START_NS = 120 * 1_000_000_000  # a process that never reaches its loop (compiling, loading)


log = logging.getLogger(__name__)


class Node:
    """The supervisor side: owns the segments and the processes."""

    def __init__(self, cfg: NodeConfig, config_path: str | None):
        self.cfg = cfg
        self.config_path = config_path
        self.procs: dict[str, subprocess.Popen] = {}
        self.owned: list = []
        self.rings: dict[str, Ring] = {}
        self.restarts: list[float] = []
        self.snapshotter: subprocess.Popen | None = None
        self.snap_gseq = 0          # journaled gseq when the last snapshot was started
        self.roll_due = 0           # a roll recovery replayed: its day's report may be missing
        self.snap_time = time.monotonic()
        self.election: Election | None = None
        self.stop_flag: list = []
        self.progress: dict[str, tuple[int, int]] = {}  # process -> (counter, seen at ns)
        self.last_loop = time.monotonic_ns()
        self.notify = Notifier()
        self.all_cpus = set(os.sched_getaffinity(0))

    def start(self, stop_flag: list | None = None) -> None:
        """Create the segments, recover, choose the role (in a pair: waits for etcd;
        raises :class:`exposure.pair.election.Stopped` if ``stop_flag`` fills meanwhile),
        start the processes."""
        if stop_flag is not None:
            self.stop_flag = stop_flag
        self._off_the_spinners()
        cfg, names = self.cfg, segment_names(self.cfg)
        self.tally = TallySegment.create(names["tally"], cfg.caps, mode=cfg.desk_mode,
                                         group=cfg.desk_group)  # refuses a live node
        self.owned.append(self.tally)
        try:
            check_ports_free(cfg)
            sessions = SharedArray.create(names["sessions"], session_shape(cfg), np.uint64)
            self.owned.append(sessions)
            self.sessions = sessions
            self.rejects = SharedArray.create(names["rejects"], reject_shape(cfg), np.uint64)
            self.owned.append(self.rejects)
            self.control = SharedArray.create(names["control"], (CONTROL_WORDS,), np.uint64)
            self.owned.append(self.control)
            self.ctl = self.control.array
            self.counters = SharedArray.create(names["counters"], (CN.COUNTER_WORDS,),
                                               np.uint64)
            self.owned.append(self.counters)
            cnt = self.counters.array
            cnt[:3] = (CN.MAGIC, CN.VERSION, CN.COUNTER_WORDS)
            cnt[CN.INDEX["started_ns"]] = time.time_ns()
            cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = self.tally.state
            self.recovered = recover(st, versions(st), self.tally.words, sessions.array,
                                     cfg.data_dir, cfg.segment_bytes, log.info,
                                     state_buf=self.tally.buf, rejects=self.rejects.array)
            self.snap_gseq = self.recovered.snapshot_gseq
            self.roll_due = self.recovered.last_roll
            self._make_rings()
            if cfg.replicated:
                self.election = Election(
                    cfg.name, self.ctl, PairStore(cfg.etcd, cfg.etcd_prefix), cfg.data_dir,
                    release=cfg.release, failover_ms=cfg.failover_ms,
                    alone_after_ms=cfg.alone_after_ms, strict=cfg.strict, tail=self._tail,
                    log=log.info)
            self._choose_role()
            self._spawn_all()
        except BaseException:
            self.stop()
            raise

    def ready(self) -> bool:
        """Whether the node does what it is for: a primary accepts sessions (its ingest
        listens), a backup follows its primary (in sync with it)."""
        if self.role == ROLE_BACKUP:
            return bool(self.ctl[CTL_IN_SYNC])
        return bool(self.counters.array[CN.INDEX["ingest_listening"]])

    def _starting(self, say, since: float) -> None:
        """Tell ``say`` what a node that is not ready yet waits for: on a first run the
        stage processes compile their kernels (about a minute here); a backup catches up
        with its primary."""
        waiting = [p.name for i, p in enumerate(self.cfg.processes)
                   if not self.ctl[CTL_PROGRESS + i]]
        say(f"starting ({time.monotonic() - since:.0f} s): " + (
            f"process(es) {', '.join(waiting)} loading or compiling their kernels (a first "
            "run compiles them: about a minute)" if waiting else
            "following the primary (catching up)" if self.role == ROLE_BACKUP else
            "opening the session port"))

    def ready_line(self) -> str:
        cfg = self.cfg
        if self.role == ROLE_BACKUP:
            return (f"ready: backup, epoch {self.epoch}, following its primary "
                    f"(sessions go to {cfg.peer_ingest[0]}:{cfg.peer_ingest[1]})"
                    if cfg.peer_ingest else f"ready: backup, epoch {self.epoch}")
        return (f"ready: {ROLE_NAMES[self.role]}, epoch {self.epoch}, accepting sessions on "
                f"{cfg.ingest_host}:{cfg.ingest_port}")

    def _off_the_spinners(self) -> None:
        """The supervisor (its etcd requests, its loop) runs on the CPUs no stage spins on:
        a wake-up on a spinning core preempts the hot path for milliseconds. Stage
        processes pin themselves; the snapshot process inherits this set."""
        spin = {p.cpu for p in self.cfg.processes if p.wait == "spin"}
        cpus = self.all_cpus - spin
        if cpus:
            os.sched_setaffinity(0, cpus)

    def _popen(self, cmd: list[str], nice: int = 0) -> subprocess.Popen:
        """A child with this machine's whole CPU set (it checks the config against it, then
        pins itself), not the supervisor's, at ``nice`` more than the supervisor's from its
        first instruction (its imports included)."""
        cpus = self.all_cpus

        def child() -> None:
            os.sched_setaffinity(0, cpus)
            if nice:
                os.nice(nice)

        return subprocess.Popen(cmd, preexec_fn=child)

    def _make_rings(self) -> None:
        names = segment_names(self.cfg)
        for ring in ring_names(self.cfg):
            size = UPDATE_DTYPE.itemsize if ring == "fanout" else EVENT_SIZE
            old = self.rings.pop(ring, None)
            if old is not None:
                old.close()
            Ring.unlink(names[ring])  # a dead node's leftovers (the tally check passed)
            self.rings[ring] = Ring.create(names[ring], self.cfg.rings[ring], size,
                                           consumers=ring_consumers(ring))

    # ------------------------------------------------------------------ roles
    @property
    def epoch(self) -> int:
        return int(self.ctl[CTL_EPOCH])

    @property
    def role(self) -> int:
        return int(self.ctl[CTL_ROLE])

    def _tail(self) -> int:
        """The highest gseq this node holds: sequenced or received, at least durable (both
        start at what recovery found)."""
        return max(int(self.sessions.array[0, S_DURABLE]), int(self.ctl[CTL_SEQUENCED]))

    def _choose_role(self) -> None:
        """At start and at every restart of the processes: primary or backup."""
        ctl = self.ctl
        ctl[CTL_SEQUENCED] = self.recovered.last_gseq
        if self.election is None:
            ctl[CTL_EPOCH] = next_epoch(self.cfg.data_dir)
            ctl[CTL_ROLE] = ROLE_PRIMARY
            return
        self.election.start(self.stop_flag)

    def restart(self, why: str, reload: int = 0) -> None:
        """A process died: stop the others, rebuild tallies and sessions from the journal
        (in place: desks stay attached), fresh rings, start every process again. Whatever
        was in flight and not durable was never acknowledged (or, under a pair's
        'replicated' policy, is in the synchronous backup, which then takes over:
        :meth:`exposure.pair.election.Election.start`); clients resend it.
        ``reload``: the replica asked for a rebuild (RELOAD_*): the data directory's state
        is moved aside first (and a received snapshot put in its place)."""
        t0 = time.perf_counter()
        log.warning(f"{why}; restarting the node's processes from the journal")
        self.counters.array[CN.INDEX["restarts_total"]] += 1
        self._stop_processes()
        self.procs.clear()
        if self.snapshotter is not None:
            self.snapshotter.terminate()
            self.snapshotter.wait()
            self.snapshotter = None
        if reload:
            self._move_aside(reload)
            self.ctl[CTL_RELOAD] = 0
        st = self.tally.state
        self.recovered = recover(st, versions(st), self.tally.words, self.sessions.array,
                                 self.cfg.data_dir, self.cfg.segment_bytes, log.info,
                                 reset_first=True, state_buf=self.tally.buf,
                                 rejects=self.rejects.array)
        self.snap_gseq = self.recovered.snapshot_gseq
        self.roll_due = self.recovered.last_roll
        self._make_rings()
        self._choose_role()
        self._spawn_all()
        self.notify.status(f"{ROLE_NAMES[self.role]}, epoch {self.epoch}")
        log.info(f"restarted as {ROLE_NAMES[self.role]}, epoch {self.epoch}: recovered "
                 f"{self.recovered.records:,} events up to gseq {self.recovered.last_gseq}; "
                 f"{time.perf_counter() - t0:.2f} s until the processes were started")

    def _move_aside(self, how: int) -> None:
        from exposure.node.stages.replica import INCOMING, RELOAD_RESET, RELOAD_SNAPSHOT
        from exposure.store.snapshot import snapshots

        d = self.cfg.data_dir
        first, last = first_gseq(d), self._tail()
        if how == RELOAD_RESET and last:
            # Under a replicated policy none of these was acknowledged beyond what the
            # primary holds (a primary acknowledges only what its synchronous backup
            # received, or alone once etcd records it; either way this node's divergent
            # part was never released); the files are kept for the operator.
            log.warning(f"the primary's history differs from this node's: moving aside "
                        f"gseq {first or 1}..{last} (the journal and snapshots of this "
                        f"node's epoch {self.epoch}); the new primary's history replaces "
                        "them")
        aside = d / f"replaced-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}"
        aside.mkdir()
        moved = 0
        for p in [*d.glob("journal-*.seg"), *(p for _, p in snapshots(d))]:
            os.replace(p, aside / p.name)
            moved += 1
        if how == RELOAD_SNAPSHOT:
            for _, p in snapshots(d / INCOMING):
                os.replace(p, d / p.name)
        log.info(f"moved this node's journal and snapshots ({moved} files) to {aside}"
                 + (" and installed the primary's snapshot" if how == RELOAD_SNAPSHOT else ""))

    def _spawn_all(self) -> None:
        self.progress.clear()
        self.counters.array[CN.INDEX["ingest_listening"]] = 0  # the new ingest says when
        for i, p in enumerate(self.cfg.processes):
            self.ctl[CTL_PROGRESS + i] = 0
            self.procs[p.name] = self._spawn(p.name)

    def _stalled(self) -> str:
        """A process whose progress counter has not moved for ``stall_ms`` (or that never
        reached its loop within two minutes): killed, and named (the caller restarts the
        node's processes). Blind after a pause of the supervisor itself (SIGSTOP, steal):
        the counters get a fresh start then."""
        now = time.monotonic_ns()
        stall_ns = self.cfg.stall_ms * 1_000_000
        if now - self.last_loop > stall_ns // 2:
            self.progress.clear()
        self.last_loop = now
        for i, spec in enumerate(self.cfg.processes):
            proc = self.procs.get(spec.name)
            if proc is None or proc.poll() is not None:
                continue
            v = int(self.ctl[CTL_PROGRESS + i])
            seen = self.progress.get(spec.name)
            if seen is None or seen[0] != v:
                self.progress[spec.name] = (v, now)
                continue
            limit = stall_ns if v else _START_NS
            if now - seen[1] > limit:
                proc.kill()
                proc.wait()
                return (f"process {spec.name} (pid {proc.pid}) made no progress for "
                        f"{(now - seen[1]) / 1e6:.0f} ms" + ("" if v else " since it started")
                        + ": killed")
        return ""

    def _spawn(self, name: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "exposure.node.supervisor", "--process", name, "--data-dir",
               str(self.cfg.data_dir), "--epoch", str(self.epoch)]
        if self.config_path:
            cmd += ["--config", self.config_path]
        return self._popen(cmd)

    def describe(self) -> str:
        cfg, names = self.cfg, segment_names(self.cfg)
        lines = [f"exposure node {cfg.name!r} ({cfg.source})",
                 f"  sessions  tcp://{cfg.ingest_host}:{cfg.ingest_port} "
                 f"(ids 1..{cfg.max_sessions}; " + (
                     f"authenticated: {cfg.sessions_file})" if cfg.sessions_file else
                     "UNAUTHENTICATED: no [ingest] sessions file, every session open and "
                     "entitled to everything; loopback only)")
                 + (f"; on this host also by shared memory (IPC, "
                    f"@{ipc_name(client_host(cfg.ingest_host), cfg.ingest_port)[1:]})"
                    if cfg.ipc else ""),
                 f"  updates   udp multicast {cfg.group}:{cfg.fanout_port} "
                 f"via {cfg.interface}",
                 f"  segments  {', '.join(names.values())}",
                 f"  epoch     {self.epoch} (in every multicast datagram's header)",
                 f"  role      {ROLE_NAMES[self.role]}" + (
                     f" (pair: replication {cfg.repl_listen[0]}:{cfg.repl_listen[1]}, peer "
                     f"{cfg.repl_peer[0]}:{cfg.repl_peer[1]}, release {cfg.release}, "
                     f"failover after {cfg.failover_ms} ms, alone after "
                     f"{'never (strict)' if cfg.strict else f'{cfg.alone_after_ms} ms'}, "
                     f"etcd {','.join(cfg.etcd)} {cfg.etcd_prefix})"
                     if cfg.replicated else " (standalone)"),
                 f"  journal   {cfg.data_dir} (fsync {cfg.fsync}"
                 + (f", every {cfg.fsync_interval_ms} ms" if cfg.fsync == "interval" else "")
                 + f"); recovered {self.recovered.records:,} events up to gseq "
                 f"{self.recovered.last_gseq} in {self.recovered.seconds:.2f} s"]
        if cfg.partition is not None:
            pt = cfg.partition
            lines.append(f"  partition {pt.name} of {pt.cluster}: owns "
                         f"{pt.pmap.describe(pt.index)}; rejects the rest as wrong_partition")
        for p in cfg.processes:
            pid = self.procs[p.name].pid if p.name in self.procs else "-"
            lines.append(f"  process   {p.name} pid {pid}: {', '.join(p.stages)} "
                         f"on cpu {p.cpu if p.cpu is not None else 'any'}, wait {p.wait}")
        return "\n".join(lines)

    def wait(self, stop_flag: list, max_restarts: int = 5, window_s: float = 60.0,
             on_ready=None, say=None) -> str:
        """Until a signal; a process that dies is restarted with the whole node (see
        :meth:`restart`), unless that happened ``max_restarts`` times within ``window_s``
        (then the node stops: something is wrong that restarting does not fix). Returns
        why it stopped. Once the node is first :meth:`ready`, systemd hears READY=1 and
        ``on_ready()`` is called; until then ``say(text)`` hears every 5 s what it waits
        for."""
        announced = False
        since = last_say = time.monotonic()
        while not stop_flag:
            if not announced:
                if self.ready():
                    announced = True
                    self.notify.ready(f"{ROLE_NAMES[self.role]}, epoch {self.epoch}")
                    if on_ready is not None:
                        on_ready()
                elif say is not None and time.monotonic() - last_say >= 5.0:
                    last_say = time.monotonic()
                    self._starting(say, since)
            try:
                for name, p in list(self.procs.items()):
                    if p.poll() is not None and not stop_flag:
                        why = self._counted_restart(f"process {name} exited with status "
                                                    f"{p.returncode}", max_restarts, window_s)
                        if why:
                            return why
                        break
                if self.election is not None and not stop_flag:
                    try:
                        if self.ctl[CTL_RELOAD]:
                            self.restart("the replica asked for a rebuild",
                                         reload=int(self.ctl[CTL_RELOAD]))
                        else:
                            why = self.election.tick()
                            if why:
                                self.restart(why)
                    except Stopped:
                        raise
                    except Exception as e:  # a restart that failed, a data dir it cannot write
                        return f"replication: {e}"
                stalled = self._stalled()
                if stalled:
                    why = self._counted_restart(stalled, max_restarts, window_s)
                    if why:
                        return why
                    continue
            except Stopped:
                break
            self.notify.watchdog()
            self._maybe_snapshot()
            time.sleep(0.01 if self.cfg.replicated else 0.02)
        return "stopping on signal"

    def _counted_restart(self, why: str, max_restarts: int, window_s: float) -> str:
        """Restart the node's processes for ``why`` unless that is the ``max_restarts``+1th
        time within ``window_s``; returns why the node must stop instead ("" to go on).
        :class:`exposure.pair.election.Stopped` passes through."""
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < window_s] + [now]
        if len(self.restarts) > max_restarts:
            return f"{why}, the {len(self.restarts)}th time in {window_s:.0f} s"
        try:
            self.restart(why)
        except Stopped:
            raise
        except Exception as e:  # a journal it cannot trust, a full disk...
            return f"{why}; restart failed: {e}"
        return ""

    def _maybe_snapshot(self) -> None:
        """Start the snapshot process when enough has been journaled or enough time has
        passed (one at a time; it runs at nice 19 on the CPUs nothing spins on)."""
        cfg = self.cfg
        if self.snapshotter is not None:
            if self.snapshotter.poll() is None:
                return
            if self.snapshotter.returncode != 0:
                log.error(f"snapshot process exited with status "
                          f"{self.snapshotter.returncode}")
            self.snapshotter = None
        durable = int(self.sessions.array[0, S_DURABLE])
        new = durable - self.snap_gseq
        # a roll journaled (or replayed by recovery) past the last snapshot: at once, for
        # the day's end-of-day report (exposure.store.eod) and the new day's snapshot
        roll = max(self.roll_due, int(self.counters.array[_ROLL_GSEQ]))
        due = (cfg.snapshot_every_events and new >= cfg.snapshot_every_events) or (
            cfg.snapshot_every_s and new > 0
            and time.monotonic() - self.snap_time >= cfg.snapshot_every_s) or (
            self.snap_gseq < roll <= durable)
        if not due:
            return
        self.snap_gseq, self.snap_time = durable, time.monotonic()
        cmd = [sys.executable, "-m", "exposure.node.snapshotter", "--data-dir", str(cfg.data_dir),
               "--upto", str(durable)]
        if self.config_path:
            cmd += ["--config", self.config_path]
        spin = {p.cpu for p in cfg.processes if p.wait == "spin"}
        cpus = self.all_cpus - spin
        if cpus:  # it pins itself once it has read the config (which checks every CPU)
            cmd += ["--cpus", ",".join(map(str, sorted(cpus)))]
        # at nice 19 from the start: its imports alone are about a second of CPU, which at
        # nice 0 came out of the clients' and the journal's core at every snapshot
        self.snapshotter = self._popen(cmd, nice=19)

    def _stop_processes(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.time() + 5
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop(self) -> None:
        if self.snapshotter is not None:
            self.snapshotter.terminate()
            self.snapshotter.wait()
        self.notify.stopping()
        self._stop_processes()
        if self.election is not None:
            self.election.close(withdraw=True)
            self.election = None
        for r in self.rings.values():
            r.close()
        self.rings.clear()
        for seg in reversed(self.owned):
            seg.close()
        self.owned.clear()


def main(argv: list[str] | None = None) -> int:
    """``python -m exposure.node.supervisor --process NAME``: one process of the map
    (:func:`exposure.node.process.run_process`)."""
    p = argparse.ArgumentParser(prog="python -m exposure.node.supervisor")
    p.add_argument("--process", required=True)
    p.add_argument("--config")
    p.add_argument("--data-dir")
    p.add_argument("--epoch", type=int, default=0)
    a = p.parse_args(argv)
    setup(label=f"exposure/{a.process}")
    cfg = load_config(a.config)
    if a.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=Path(a.data_dir))
    return run_process(cfg, a.process, a.epoch)


if __name__ == "__main__":
    exit_process(main())
