"""A live node: its shared segments, the processes of its process map, and the supervisor.

``exposure run`` creates the segments (tally, sessions, one ring per hand-off), starts one OS
process per ``[[process]]`` of the config (``python -m exposure.node --process NAME``), each
pinned to its CPU and running its stages in turn; stages hand over through the rings
whether or not they share a process. The supervisor stops everything, and removes the
segments, on SIGINT/SIGTERM or when a process dies (restart and recovery are the durability
work, issue 5).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .config import NodeConfig, check_ports_free, load_config
from .journal import JournalWriter
from .recovery import next_epoch, recover
from .shm.ring import Ring
from .shm.segment import SharedArray
from .shm.tally_segment import TallySegment
from .shm.wait import WaitStrategy
from .stages.compute import S_DURABLE, SESSION_COLS, ComputeStage
from .stages.fanout import FanoutStage
from .stages.ingest import IngestStage
from .stages.journal import JournalStage
from .types import C_LAST_GSEQ, EVENT_SIZE, UPDATE_DTYPE

__all__ = ["Node", "run_process", "main"]


RINGS = ("compute", "tap", "fanout")


def _names(cfg: NodeConfig) -> dict[str, str]:
    return {"tally": cfg.segment("tally"), "sessions": cfg.segment("sessions"),
            **{r: cfg.segment(f"ring.{r}") for r in RINGS}}


def _log(msg: str) -> None:
    print(f"exposure: {msg}", file=sys.stderr, flush=True)


def _session_shape(cfg: NodeConfig) -> tuple[int, int]:
    return (cfg.max_sessions + 1, SESSION_COLS)


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
        self.snap_time = time.monotonic()

    def start(self) -> None:
        cfg, names = self.cfg, _names(self.cfg)
        self.tally = TallySegment.create(names["tally"], cfg.caps)  # refuses a live node
        self.owned.append(self.tally)
        try:
            check_ports_free(cfg)
            sessions = SharedArray.create(names["sessions"], _session_shape(cfg), np.uint64)
            self.owned.append(sessions)
            self.sessions = sessions
            cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = self.tally.state
            self.recovered = recover(st, st.pub["ver"], self.tally.words, sessions.array,
                                     cfg.data_dir, cfg.segment_bytes, _log,
                                     state_buf=self.tally.buf)
            self.snap_gseq = self.recovered.snapshot_gseq
            self._make_rings()
            self.epoch = next_epoch(cfg.data_dir)
            for p in cfg.processes:
                self.procs[p.name] = self._spawn(p.name)
        except BaseException:
            self.stop()
            raise

    def _make_rings(self) -> None:
        names = _names(self.cfg)
        for ring, size in (("compute", EVENT_SIZE), ("tap", EVENT_SIZE),
                           ("fanout", UPDATE_DTYPE.itemsize)):
            old = self.rings.pop(ring, None)
            if old is not None:
                old.close()
            Ring.unlink(names[ring])  # a dead node's leftovers (the tally check passed)
            self.rings[ring] = Ring.create(names[ring], self.cfg.rings[ring], size)

    def restart(self, why: str) -> None:
        """A process died: stop the others, rebuild tallies and sessions from the journal
        (in place: desks stay attached), fresh rings, start every process again. Whatever
        was in flight and not durable was never acknowledged; clients resend it."""
        t0 = time.perf_counter()
        _log(f"{why}; restarting the node's processes from the journal")
        self._stop_processes()
        self.procs.clear()
        st = self.tally.state
        self.recovered = recover(st, st.pub["ver"], self.tally.words, self.sessions.array,
                                 self.cfg.data_dir, self.cfg.segment_bytes, _log,
                                 reset_first=True, state_buf=self.tally.buf)
        self._make_rings()
        self.epoch = next_epoch(self.cfg.data_dir)
        for p in self.cfg.processes:
            self.procs[p.name] = self._spawn(p.name)
        _log(f"restarted as epoch {self.epoch}: recovered {self.recovered.records:,} events "
             f"up to gseq {self.recovered.last_gseq}; {time.perf_counter() - t0:.2f} s until the "
             "processes were started")

    def _spawn(self, name: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "exposure.node", "--process", name, "--data-dir",
               str(self.cfg.data_dir), "--epoch", str(self.epoch)]
        if self.config_path:
            cmd += ["--config", self.config_path]
        return subprocess.Popen(cmd)

    def describe(self) -> str:
        cfg, names = self.cfg, _names(self.cfg)
        lines = [f"exposure node {cfg.name!r} ({cfg.source})",
                 f"  sessions  tcp://{cfg.ingest_host}:{cfg.ingest_port} "
                 f"(ids 1..{cfg.max_sessions})",
                 f"  updates   udp multicast {cfg.group}:{cfg.fanout_port} "
                 f"via {cfg.interface}",
                 f"  segments  {', '.join(names.values())}",
                 f"  epoch     {self.epoch} (in every multicast datagram's header)",
                 f"  journal   {cfg.data_dir} (fsync {cfg.fsync}"
                 + (f", every {cfg.fsync_interval_ms} ms" if cfg.fsync == "interval" else "")
                 + f"); recovered {self.recovered.records:,} events up to gseq "
                 f"{self.recovered.last_gseq} in {self.recovered.seconds:.2f} s"]
        for p in cfg.processes:
            pid = self.procs[p.name].pid if p.name in self.procs else "-"
            lines.append(f"  process   {p.name} pid {pid}: {', '.join(p.stages)} "
                         f"on cpu {p.cpu if p.cpu is not None else 'any'}, wait {p.wait}")
        return "\n".join(lines)

    def wait(self, stop_flag: list, max_restarts: int = 5, window_s: float = 60.0) -> str:
        """Until a signal; a process that dies is restarted with the whole node (see
        :meth:`restart`), unless that happened ``max_restarts`` times within ``window_s``
        (then the node stops: something is wrong that restarting does not fix). Returns
        why it stopped."""
        while not stop_flag:
            for name, p in list(self.procs.items()):
                if p.poll() is not None and not stop_flag:
                    why = f"process {name} exited with status {p.returncode}"
                    now = time.monotonic()
                    self.restarts = [t for t in self.restarts if now - t < window_s] + [now]
                    if len(self.restarts) > max_restarts:
                        return f"{why}, the {len(self.restarts)}th time in {window_s:.0f} s"
                    try:
                        self.restart(why)
                    except Exception as e:  # a journal it cannot trust, a full disk...
                        return f"{why}; restart failed: {e}"
                    break
            self._maybe_snapshot()
            time.sleep(0.02)
        return "stopping on signal"

    def _maybe_snapshot(self) -> None:
        """Start the snapshot process when enough has been journaled or enough time has
        passed (one at a time; it runs at nice 19 on the CPUs nothing spins on)."""
        cfg = self.cfg
        if self.snapshotter is not None:
            if self.snapshotter.poll() is None:
                return
            if self.snapshotter.returncode != 0:
                _log(f"snapshot process exited with status {self.snapshotter.returncode}")
            self.snapshotter = None
        durable = int(self.sessions.array[0, S_DURABLE])
        new = durable - self.snap_gseq
        due = (cfg.snapshot_every_events and new >= cfg.snapshot_every_events) or (
            cfg.snapshot_every_s and new > 0
            and time.monotonic() - self.snap_time >= cfg.snapshot_every_s)
        if not due:
            return
        self.snap_gseq, self.snap_time = durable, time.monotonic()
        cmd = [sys.executable, "-m", "exposure.snapshot", "--data-dir", str(cfg.data_dir),
               "--upto", str(durable)]
        if self.config_path:
            cmd += ["--config", self.config_path]
        spin = {p.cpu for p in cfg.processes if p.wait == "spin"}
        cpus = set(os.sched_getaffinity(0)) - spin
        if cpus:  # it pins itself once it has read the config (which checks every CPU)
            cmd += ["--cpus", ",".join(map(str, sorted(cpus)))]
        self.snapshotter = subprocess.Popen(cmd)

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
        self._stop_processes()
        for r in self.rings.values():
            r.close()
        self.rings.clear()
        for seg in reversed(self.owned):
            seg.close()
        self.owned.clear()


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
        print(f"exposure: no process {name!r} in the config", file=sys.stderr)
        return 2
    _die_with_parent()
    if spec.cpu is not None:
        os.sched_setaffinity(0, {spec.cpu})
    stop: list = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    names = _names(cfg)
    opened: list = []
    stages = []
    try:
        sessions = SharedArray.attach(names["sessions"], _session_shape(cfg), np.uint64)
        opened.append(sessions)
        rings = {r: Ring.attach(names[r]) for r in RINGS}
        opened += rings.values()
        # Ingest last: the kernels compile (or load) before the node accepts a session.
        for st in sorted(spec.stages, key=lambda s: s == "ingest"):
            if st == "ingest":
                tally = TallySegment.attach(names["tally"])
                next_gseq = int(tally.state.ctr[C_LAST_GSEQ]) + 1
                tally.close()
                stages.append(IngestStage(cfg.ingest_host, cfg.ingest_port, sessions.array,
                                          rings["compute"], next_gseq, cfg.max_sessions,
                                          cfg.ack_interval_us, tap_ring=rings["tap"]))
            elif st == "compute":
                tally = TallySegment.attach(names["tally"], writable=True)
                opened.append(tally)
                stages.append(ComputeStage(tally, sessions.array, rings["compute"],
                                           rings["fanout"]))
            elif st == "journal":
                stages.append(JournalStage(rings["tap"], sessions.array,
                                           JournalWriter(cfg.data_dir, cfg.segment_bytes),
                                           cfg.fsync, cfg.fsync_interval_ms))
            elif st == "fanout":
                stages.append(FanoutStage(rings["fanout"], cfg.group, cfg.fanout_port,
                                          cfg.interface, cfg.ttl, cfg.max_datagram,
                                          cfg.caps.accounts, epoch=epoch))
        wait = WaitStrategy(spec.wait, spins=20_000, timeout_s=0.002,
                            tick_s=spec.tick_us / 1e6)
        # No cyclic-GC pauses in the loop: everything long-lived exists now (frozen out of
        # the collector's sight); what the loop allocates per frame is acyclic and freed by
        # reference counting.
        gc.collect()
        gc.freeze()
        gc.disable()
        ingest = next((s for s in stages if isinstance(s, IngestStage)), None)
        # The ring whose producer is outside this process: where a blocked process sleeps.
        wake_ring = rings["compute"] if "compute" in spec.stages else (
            rings["fanout"] if "fanout" in spec.stages else rings["tap"])
        while not stop:
            work = 0
            for s in stages:
                work += s.poll()
            if ingest is not None:
                ingest.after()
            if work:
                wait.reset()
            elif spec.wait in ("spin-then-block", "block") and ingest is not None:
                ingest.poll(0.001)  # sleep in the selector: sockets wake it
            else:
                wait.idle(wake_ring)
        return 0
    finally:
        for s in stages:
            if hasattr(s, "close"):
                s.close()
        for o in opened:
            o.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m exposure.node")
    p.add_argument("--process", required=True)
    p.add_argument("--config")
    p.add_argument("--data-dir")
    p.add_argument("--epoch", type=int, default=0)
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    if a.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=Path(a.data_dir))
    return run_process(cfg, a.process, a.epoch)


if __name__ == "__main__":
    sys.exit(main())
