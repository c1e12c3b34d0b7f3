"""A real local node with a unique name and ports, started with `exposure run` (for tests
and the latency probe); ``stop()`` always stops it and removes what it left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

__all__ = ["LocalNode", "LocalPair", "free_port", "free_group", "listening", "process_map"]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def free_group() -> str:
    """A multicast group unlikely to be shared with another test or tool run."""
    return f"239.255.{os.getpid() % 250}.{1 + int(uuid.uuid4().hex[:2], 16) % 250}"


def listening(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` (probed by binding, not connecting: a
    probe must not look like a peer to the node)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
        return False
    except OSError:
        return True
    finally:
        s.close()


class LocalNode:
    def __init__(self, tmp: Path, orders: int = 65536, cells: int = 65536,
                 prefix: str = "t", data_dir: Path | None = None, fsync: str = "interval",
                 extra: str = "", mport: int | None = None, group: str | None = None,
                 repl_port: int | None = None, start: bool = True):
        self.name = f"{prefix}{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.port, self.mport = free_port(), mport or free_port()
        self.repl_port = repl_port  # a node of a pair: its replication listener
        self.group = group or free_group()
        self.config = tmp / f"{self.name}.toml"
        self.data_dir = data_dir or tmp / f"{self.name}.data"
        self.config.write_text(
            f'[node]\nname = "{self.name}"\n[capacities]\norders = {orders}\ncells = {cells}\n'
            f"[ingest]\nport = {self.port}\n[fanout]\nport = {self.mport}\n"
            f'group = "{self.group}"\n[journal]\ndir = "{self.data_dir}"\n'
            f'fsync = "{fsync}"\n{extra}')
        self.log = tmp / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self, timeout: float = 120) -> None:
        """Start ``exposure run`` on this node's config (again, after a crash: as systemd
        would) and wait until it listens (for sessions, or as a backup for its primary);
        its output goes to ``self.log``."""
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start ``exposure run`` without waiting for it."""
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "exposure", "run", "--config",
                                          str(self.config)], stdout=log, stderr=log,
                                         text=True)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.log.read_text()[-3000:]}")
            if listening("127.0.0.1", self.port) or (
                    self.repl_port and listening("127.0.0.1", self.repl_port)):
                break
            if time.time() > deadline:
                self.stop()
                raise RuntimeError("node did not start listening")
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> dict[str, int]:
        """The supervisor and each stage process (by its [[process]] name)."""
        import psutil

        out = {"supervisor": self.proc.pid}
        try:
            for c in psutil.Process(self.proc.pid).children():
                cl = c.cmdline()
                if "--process" in cl:
                    out[cl[cl.index("--process") + 1]] = c.pid
        except psutil.Error:
            pass
        return out

    def kill9(self) -> None:
        """kill -9 of the whole node: the supervisor (its stage processes follow it, by
        PR_SET_PDEATHSIG) and, to be sure, each stage process."""
        pids = self.pids()
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        import psutil

        for pid in pids.values():  # gone before the test goes on (they hold the ports)
            try:
                psutil.Process(pid).wait(timeout=10)
            except psutil.Error:
                pass
        # The dead incarnation's control block would still say "primary" until a restarted
        # supervisor makes its own; nothing must read a dead node's role meanwhile.
        try:
            os.unlink(f"/dev/shm/exposure.{self.name}.control")
        except FileNotFoundError:
            pass

    def control(self):
        """A copy of the node's control block (exposure.shm.control), None while down."""
        import numpy as np

        from exposure.shm.control import CONTROL_WORDS
        from exposure.shm.segment import SharedArray

        try:
            seg = SharedArray.attach(f"/exposure.{self.name}.control", (CONTROL_WORDS,),
                                     np.uint64, readonly=True)
        except (FileNotFoundError, ValueError):
            return None
        try:
            return seg.array.copy()
        finally:
            seg.close()

    def last_gseq(self) -> int:
        """The gseq of the last event compute applied (0 while down)."""
        from exposure.shm.tally_segment import TallySegment
        from exposure.types import C_LAST_GSEQ

        try:
            seg = TallySegment.attach(f"/exposure.{self.name}.tally")
        except (FileNotFoundError, ValueError):
            return 0
        try:
            return int(seg.state.ctr[C_LAST_GSEQ])
        finally:
            seg.close()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exposure", *args, "--config",
                               str(self.config)], capture_output=True, timeout=timeout)

    def segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"exposure.{self.name}.")]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for n in self.segments():  # only if the node failed to clean up (the test checks)
            os.unlink(f"/dev/shm/{n}")


def process_map(hot_wait: str = "spin", hot_cpu: int = -1, tick_us: int = 500) -> str:
    """The [[process]] tables of a node of a pair (and of the standalone node the pair
    benchmark compares with): ingest, compute and fan-out in one process; journal and
    mirror in a second one, sleeping a tick between polls on CPU 0."""
    return f"""
[[process]]
name = "hot"
stages = ["ingest", "compute", "fanout"]
cpu = {hot_cpu}
wait = "{hot_wait}"
tick_us = {tick_us}

[[process]]
name = "durable"
stages = ["journal", "mirror"]
cpu = -2
wait = "sleep"
tick_us = {tick_us}
"""


class LocalPair:
    """Two real nodes of a primary/backup pair on loopback, with their own secret, witness,
    ports and data directories; ``a`` starts first (the primary), then ``b`` (its backup).
    On 2 cores only ``a``'s hot process spins (CPU 1); everything else sleeps a tick
    (500 us) between polls on CPU 0, where the clients run too."""

    def __init__(self, tmp: Path, release: str = "replicated+local", orders: int = 65536,
                 cells: int = 65536, failover_ms: int = 300, heartbeat_ms: int = 50,
                 fsync: str = "interval", start: bool = True, extra: str = "",
                 node_extra: str = ""):
        self.secret = tmp / "pair.secret"
        self.secret.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.witness = tmp / "pair.witness"
        mport, group = free_port(), free_group()
        ra, rb = free_port(), free_port()
        nodes = []
        for tag, mine in (("pa", ra), ("pb", rb)):
            nodes.append(LocalNode(tmp, orders, cells, prefix=tag, fsync=fsync, mport=mport,
                                   group=group, repl_port=mine, start=False,
                                   extra=node_extra))
        self.a, self.b = nodes
        for n, other, wait, cpu in ((self.a, self.b, "spin", -1),
                                    (self.b, self.a, "sleep", -2)):
            n.config.write_text(n.config.read_text() + f"""
[replication]
listen = "127.0.0.1:{n.repl_port}"
peer = "127.0.0.1:{other.repl_port}"
peer_ingest = "127.0.0.1:{other.port}"
secret_file = "{self.secret}"
witness = "{self.witness}"
release = "{release}"
heartbeat_ms = {heartbeat_ms}
failover_ms = {failover_ms}
{extra}
{process_map(wait, cpu)}""")
        if start:
            self.start()

    def start(self, timeout: float = 120) -> None:
        """``a`` first: once it holds the witness (it is the primary), ``b`` starts beside
        it while ``a`` is still loading its stages."""
        self.a.launch()
        deadline = time.time() + timeout
        while not (self.witness.exists() and self.a.name in self.witness.read_text()):
            if self.a.proc.poll() is not None or time.time() > deadline:
                self.a.wait_ready(1)  # raises with the log
            time.sleep(0.02)
        self.b.launch()
        self.a.wait_ready(timeout)
        self.b.wait_ready(timeout)

    def stop(self) -> None:
        for n in (self.b, self.a):
            n.stop()
