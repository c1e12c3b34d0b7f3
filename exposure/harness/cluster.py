"""A local cluster (SPEC section 5) for the tests and the cluster benchmark: partition nodes
(:class:`~exposure.harness.localnode.LocalNode` with a ``[partition]`` table, or a
:class:`~exposure.harness.localnode.LocalPair` where asked) on free ports, the cluster
file that maps them and the consolidator's config, all with unique names, ports and
groups; the consolidator (``exposure consolidate``, or a command given) runs as a child
process on demand. ``stop()`` stops everything and removes what it left in /dev/shm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

from exposure.harness.localnode import LocalNode, LocalPair, free_group, free_port, process_map
from exposure.harness.wait import wait_for

__all__ = ["LocalCluster", "partition_process_map", "map_ranges"]


def map_ranges(pmap) -> list[tuple[str, list, list]]:
    """The partitions of a PartitionMap (exposure.core.partition) whose accounts and
    sources are each one contiguous range, as :class:`LocalCluster`'s ``parts``."""
    import numpy as np

    parts = []
    for k, name in enumerate(pmap.names):
        acc = np.flatnonzero(pmap.acc_owner == k)
        src = np.flatnonzero(pmap.src_owner == k)
        parts.append((name, [[int(acc[0]), int(acc[-1])]], [[int(src[0]), int(src[-1])]]))
    return parts


def partition_process_map(cpu: int) -> str:
    """A partition's process map on 2 cores (examples/cluster/p0.toml): the hot path spins
    briefly, then blocks (several hot processes share the CPUs) on ``cpu``; journal and
    recovery server sleep 2 ms ticks on the first CPU."""
    return process_map("spin-then-block", cpu, 2000, ("journal", "snapshot"))


class LocalCluster:
    """``parts`` (name, accounts, sources: TOML ranges, ``[[first, last], id, ...]``) as
    partition nodes under ``dir``; a partition named in ``pairs`` (name -> a running
    LocalEtcd or its URL) is a primary/backup pair. Hot processes alternate between the
    last and the first CPU (all on the first where there are pairs: a pair's primary spins
    on the last). Nodes are named ``prefix`` + partition name (+ pid and a random tag), the
    consolidator ``prefix`` + "cons"; the cluster is called ``name``."""

    def __init__(self, dir: Path, parts: list[tuple[str, list, list]],
                 pairs: dict | None = None, name: str = "t", prefix: str = "c"):
        self.dir = Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.file = self.dir / "cluster.toml"
        self.cons_name = f"{prefix}cons{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.cons_config = self.dir / "consolidator.toml"
        self.cons_config.write_text(
            f'[node]\nname = "{self.cons_name}"\n[fanout]\ngroup = "{free_group()}"\n'
            f"port = {free_port()}\nsnapshot_port = {free_port()}\n")
        self.cons_log = self.dir / "consolidator.log"
        self.cons: subprocess.Popen | None = None
        self.nodes: list[LocalNode] = []  # one a partition (a pair's: its first primary)
        self.pairs: dict[str, LocalPair] = {}
        text = f'[cluster]\nname = "{name}"\n[consolidator]\nconfig = "{self.cons_config}"\n'
        for k, (pname, accs, srcs) in enumerate(parts):
            part = f'[partition]\ncluster = "{self.file}"\nname = "{pname}"\n'
            if pairs and pname in pairs:  # a pair (its a spins on the last CPU)
                pair = LocalPair(self.dir, pairs[pname], start=False, node_extra=part)
                self.pairs[pname] = pair
                self.nodes.append(pair.a)
                files = f'["{pair.a.config}", "{pair.b.config}"]'
            else:
                n = LocalNode(self.dir, prefix=f"{prefix}{pname}", start=False,
                              extra=part + partition_process_map(
                                  -2 if pairs or k % 2 else -1))
                self.nodes.append(n)
                files = f'"{n.config}"'
            text += (f'[[partition]]\nname = "{pname}"\nconfig = {files}\n'
                     f"accounts = {accs}\nsources = {srcs}\n")
        self.file.write_text(text)
        self.cluster = self._load()

    def _load(self):
        from exposure.cluster.topology import load_cluster

        return load_cluster(self.file)

    # -------------------------------------------------------------------- partitions
    def start(self, timeout: float = 120) -> None:
        """Start every pair, then every other node, and wait until all listen."""
        for p in self.pairs.values():
            p.start(timeout)
        for n in self.nodes:
            if n.proc is None:
                n.launch()
        for n in self.nodes:
            n.wait_ready(timeout)

    def node_pids(self) -> list[int]:
        """Every partition node's supervisor and stage processes."""
        return [p for n in self.nodes for p in n.pids().values()]

    def events(self) -> list[str]:
        """What the nodes' supervisors said about restarts (watchdog, exits)."""
        return [e for n in self.nodes for e in n.restarts()]

    def log_tails(self, chars: int = 1500) -> str:
        """The tail of every log under ``dir`` (on a failure, before they are removed)."""
        return "\n".join(f"--- {f.name}:\n{f.read_text(errors='replace')[-chars:]}"
                         for f in sorted(self.dir.glob("*.log")))

    def send(self, recs, *extra: str, timeout: float = 300) -> dict:
        """``exposure send --cluster`` of ``recs`` (written to ``dir``/events.jsonl) with
        ``extra`` arguments; its JSON result (RuntimeError with its stderr if it fails)."""
        import orjson

        from exposure.engine.parse import to_jsonl

        f = self.dir / "events.jsonl"
        f.write_bytes(to_jsonl(recs))
        return orjson.loads(self._cli("send", "--cluster", str(self.file), str(f), *extra,
                                      timeout=timeout))

    def dump(self, timeout: float = 120) -> dict:
        """The composed document, as ``exposure dump --cluster --compact`` prints it."""
        import orjson

        return orjson.loads(self._cli("dump", "--cluster", str(self.file), "--compact",
                                      timeout=timeout))

    @staticmethod
    def _cli(*args: str, timeout: float) -> str:
        out = subprocess.run([sys.executable, "-m", "exposure", *args], capture_output=True,
                             text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"exposure {args[0]} failed ({out.returncode}): "
                               f"{out.stderr[-2000:]}")
        return out.stdout

    # -------------------------------------------------------------------- consolidator
    def consolidator_process(self, lines: str) -> None:
        """Rewrite the cluster file's [consolidator] keys after ``config`` (cpu, wait)."""
        head = f'[consolidator]\nconfig = "{self.cons_config}"\n'
        text = self.file.read_text()
        start = text.index(head) + len(head)
        end = text.index("[[partition]]", start)
        self.file.write_text(text[:start] + lines + text[end:])
        self.cluster = self._load()

    def start_consolidator(self, timeout: float = 120, cmd: list[str] | None = None,
                           ready: Callable[[], bool] | None = None, **popen) -> None:
        """Start the consolidator (a running one is stopped first): ``exposure consolidate
        --cluster`` (or ``cmd``, with ``popen``'s Popen arguments), its output appended to
        ``cons_log``; wait until it logs "ready" once more (or ``ready()``). RuntimeError
        with its log if it exits first."""
        self.stop_consolidator()
        before = self.cons_log.read_text().count("ready") if self.cons_log.exists() else 0
        if cmd is None:
            cmd = [sys.executable, "-m", "exposure", "consolidate", "--cluster",
                   str(self.file)]
        if ready is None:
            def ready() -> bool:
                return self.cons_log.read_text().count("ready") > before
        with open(self.cons_log, "a") as log:
            self.cons = subprocess.Popen(cmd, stdout=log, stderr=log, **popen)
        wait_for(lambda: self.cons.poll() is not None or ready(), timeout,
                 "the consolidator to be ready", step=0.01)
        if self.cons.poll() is not None:
            raise RuntimeError(f"the consolidator exited: "
                               f"{self.cons_log.read_text(errors='replace')[-3000:]}")

    def stop_consolidator(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Send ``sig`` to a running consolidator and wait for it (kill -9 after
        ``timeout`` s)."""
        proc, self.cons = self.cons, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def consolidator_cpu_seconds(self) -> float:
        """The consolidator's CPU time so far (user + system)."""
        import psutil

        t = psutil.Process(self.cons.pid).cpu_times()
        return t.user + t.system

    def stop(self) -> None:
        """Stop the consolidator, every pair and node, and remove what the consolidator
        left in /dev/shm (one killed before its clean-up ran)."""
        try:
            self.stop_consolidator()
        finally:
            for seg in os.listdir("/dev/shm"):
                if seg.startswith(f"exposure.{self.cons_name}."):
                    try:
                        os.unlink(f"/dev/shm/{seg}")
                    except FileNotFoundError:
                        pass
            for p in self.pairs.values():
                p.stop()
            for n in self.nodes:
                n.stop()
