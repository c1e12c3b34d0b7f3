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

__all__ = ["LocalNode", "free_port", "free_group"]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def free_group() -> str:
    """A multicast group unlikely to be shared with another test or tool run."""
    return f"239.255.{os.getpid() % 250}.{1 + int(uuid.uuid4().hex[:2], 16) % 250}"


class LocalNode:
    def __init__(self, tmp: Path, orders: int = 65536, cells: int = 65536,
                 prefix: str = "t", data_dir: Path | None = None, fsync: str = "interval",
                 extra: str = ""):
        self.name = f"{prefix}{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.port, self.mport = free_port(), free_port()
        self.group = free_group()
        self.config = tmp / f"{self.name}.toml"
        self.data_dir = data_dir or tmp / f"{self.name}.data"
        self.config.write_text(
            f'[node]\nname = "{self.name}"\n[capacities]\norders = {orders}\ncells = {cells}\n'
            f"[ingest]\nport = {self.port}\n[fanout]\nport = {self.mport}\n"
            f'group = "{self.group}"\n[journal]\ndir = "{self.data_dir}"\n'
            f'fsync = "{fsync}"\n{extra}')
        self.log = tmp / f"{self.name}.log"
        self.start()

    def start(self, timeout: float = 120) -> None:
        """Start ``exposure run`` on this node's config (again, after a crash: as systemd
        would) and wait until it listens; its output goes to ``self.log``."""
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "exposure", "run", "--config",
                                          str(self.config)], stdout=log, stderr=log,
                                         text=True)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.log.read_text()[-3000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError("node did not start listening") from None
                time.sleep(0.1)

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

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "exposure", *args, "--config",
                               str(self.config)], capture_output=True, timeout=timeout)

    def segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"exposure.{self.name}.")]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for n in self.segments():  # only if the node failed to clean up (the test checks)
            os.unlink(f"/dev/shm/{n}")
