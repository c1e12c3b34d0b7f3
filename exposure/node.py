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
from .recovery import recover
from .shm.ring import Ring
from .shm.segment import SharedArray
from .shm.tally_segment import TallySegment
from .shm.wait import WaitStrategy
from .stages.compute import SESSION_COLS, ComputeStage
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

    def start(self) -> None:
        cfg, names = self.cfg, _names(self.cfg)
        self.tally = TallySegment.create(names["tally"], cfg.caps)  # refuses a live node
        self.owned.append(self.tally)
        try:
            check_ports_free(cfg)
            sessions = SharedArray.create(names["sessions"], _session_shape(cfg), np.uint64)
            self.owned.append(sessions)
            cfg.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            st = self.tally.state
            self.recovered = recover(st, st.pub["ver"], self.tally.words, sessions.array,
                                     cfg.data_dir, cfg.segment_bytes, _log)
            for ring, size in (("compute", EVENT_SIZE), ("tap", EVENT_SIZE),
                               ("fanout", UPDATE_DTYPE.itemsize)):
                Ring.unlink(names[ring])  # a dead node's leftovers (the tally check passed)
                self.owned.append(Ring.create(names[ring], cfg.rings[ring], size))
            for p in cfg.processes:
                self.procs[p.name] = self._spawn(p.name)
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "exposure.node", "--process", name, "--data-dir",
               str(self.cfg.data_dir)]
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
                 f"  journal   {cfg.data_dir} (fsync {cfg.fsync}"
                 + (f", every {cfg.fsync_interval_ms} ms" if cfg.fsync == "interval" else "")
                 + f"); recovered {self.recovered.records:,} events up to gseq "
                 f"{self.recovered.last_gseq} in {self.recovered.seconds:.2f} s"]
        for p in cfg.processes:
            pid = self.procs[p.name].pid if p.name in self.procs else "-"
            lines.append(f"  process   {p.name} pid {pid}: {', '.join(p.stages)} "
                         f"on cpu {p.cpu if p.cpu is not None else 'any'}, wait {p.wait}")
        return "\n".join(lines)

    def wait(self, stop_flag: list) -> str:
        """Until a signal or a process exits; returns why."""
        while not stop_flag:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    return f"process {name} exited with status {p.returncode}"
            time.sleep(0.05)
        return "stopping on signal"

    def stop(self) -> None:
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
        for seg in reversed(self.owned):
            seg.close()
        self.owned.clear()


def run_process(cfg: NodeConfig, name: str) -> int:
    """The body of one process of the map: attach, pin, run the stages until SIGTERM."""
    spec = next((p for p in cfg.processes if p.name == name), None)
    if spec is None:
        print(f"exposure: no process {name!r} in the config", file=sys.stderr)
        return 2
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
                                          cfg.caps.accounts))
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
    a = p.parse_args(argv)
    cfg = load_config(a.config)
    if a.data_dir:
        cfg = dataclasses.replace(cfg, data_dir=Path(a.data_dir))
    return run_process(cfg, a.process)


if __name__ == "__main__":
    sys.exit(main())
