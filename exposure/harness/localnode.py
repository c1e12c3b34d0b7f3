"""A real local node with a unique name and ports, started with `exposure run` (for tests
and the latency probe); ``stop()`` always stops it and removes what it left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path

from exposure.harness.wait import WaitTimeout, wait_for

__all__ = ["LocalNode", "LocalPair", "LocalEtcd", "free_port", "free_group", "listening",
           "process_map", "cpu_times", "terminate"]


_HANDED_OUT: set[int] = set()


def _below_ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            first = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        first = 32768
    return 10000, max(10001, first - 1)


def free_port() -> int:
    """A TCP port nothing listens on, for a test's or tool's server. Taken at random from
    below the kernel's ephemeral range: a port the kernel hands out (bind to port 0) can be
    taken, before the server binds it, as the source port of any outgoing connection (an
    etcd that failed with "address already in use" that way). Never the same port twice in
    one process."""
    import random

    rnd = random.SystemRandom()
    lo, hi = _below_ephemeral()
    for _ in range(500):
        port = rnd.randint(lo, hi)
        if port in _HANDED_OUT:
            continue
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            s.close()
        _HANDED_OUT.add(port)
        return port
    s = socket.socket()  # (a crowded host: the kernel's choice)
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
                 repl_port: int | None = None, start: bool = True, ingest: str = ""):
        self.name = f"{prefix}{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.port, self.mport = free_port(), mport or free_port()
        self.sport = free_port()  # the recovery server (snapshots of the feed)
        self.repl_port = repl_port  # a node of a pair: its replication listener
        self.group = group or free_group()
        self.config = tmp / f"{self.name}.toml"
        self.data_dir = data_dir or tmp / f"{self.name}.data"
        self.config.write_text(
            f'[node]\nname = "{self.name}"\n[capacities]\norders = {orders}\ncells = {cells}\n'
            f"[ingest]\nport = {self.port}\n{ingest}\n[fanout]\nport = {self.mport}\n"
            f'group = "{self.group}"\nsnapshot_port = {self.sport}\n'
            f'[journal]\ndir = "{self.data_dir}"\n'
            f'fsync = "{fsync}"\n{extra}')
        self.log = tmp / f"{self.name}.log"
        self.env: dict[str, str] = {}  # added to the node's environment (NOTIFY_SOCKET...)
        self.wrap: list[str] = []  # a command prefix, e.g. ip netns exec NS (another host)
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
            self.proc = subprocess.Popen(
                [*self.wrap, sys.executable, "-m", "exposure", "run", "--config",
                 str(self.config)], stdout=log, stderr=log, text=True,
                env={**os.environ, **self.env})

    def wait_ready(self, timeout: float = 120) -> None:
        """Wait until the node listens (for sessions, or as a backup for its primary);
        RuntimeError with its log if it exits first, and after ``timeout`` s (it is
        stopped)."""
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited: {self.log.read_text()[-3000:]}")
            return listening("127.0.0.1", self.port) or bool(
                self.repl_port and listening("127.0.0.1", self.repl_port))

        try:
            wait_for(up, timeout, f"node {self.name} to listen", self, step=0.01, tail=3000)
        except WaitTimeout:
            self.stop()
            raise

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

    def signal_all(self, sig: int) -> list[int]:
        """Send ``sig`` to the supervisor and every stage process (the supervisor first:
        SIGSTOP of everything, as a hung machine); returns the pids."""
        pids = list(self.pids().values())
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

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

    def counters(self) -> dict[str, int]:
        """The node's counters segment by name (exposure.shm.counters_layout); {} while
        down."""
        from exposure.config.node import load_config
        from exposure.node.segments import read_counters

        try:
            return read_counters(load_config(self.config))
        except FileNotFoundError:
            return {}

    def last_gseq(self) -> int:
        """The gseq of the last event compute applied (0 while down)."""
        from exposure.core.types import C_LAST_GSEQ
        from exposure.shm.tally_segment import TallySegment

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

    def dump(self, process: bool = True, timeout: float = 120) -> dict:
        """The node's document: what ``exposure dump --compact`` prints (run as a child
        process, as an operator would; RuntimeError with its stderr if it fails), or with
        ``process=False`` what a desk on the node's host reads (a Desk, in this
        process)."""
        if not process:
            from exposure.engine.desk import Desk

            with Desk(self.name) as desk:
                return desk.document()
        import orjson

        p = self.cli("dump", "--compact", timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"exposure dump failed ({p.returncode}): "
                               f"{p.stderr.decode(errors='replace')[-2000:]}")
        return orjson.loads(p.stdout)

    def restarts(self) -> list[str]:
        """What the node's supervisor logged about restarts (its watchdog, exits), each
        line prefixed with the node's name."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [f"{self.name}: {line.strip()}" for line in text.splitlines()
                if "no progress" in line or "restart" in line or "exited" in line]

    def segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"exposure.{self.name}.")]

    def add_keys(self, table: str, keys: str) -> None:
        """Add TOML ``keys`` (lines) to one of the tables the config already has
        (``node``, ``ingest``, ``fanout``, ``journal``: ``extra`` lands after
        ``[journal]``); for a node made with ``start=False``, before it starts."""
        text = self.config.read_text()
        head = f"[{table}]\n"
        if head not in text:
            raise ValueError(f"the config has no [{table}] table")
        self.config.write_text(text.replace(head, f"{head}{keys.strip()}\n", 1))

    def session_row(self, row: int = 0) -> list[int] | None:
        """A copy of row ``row`` of the node's session table (exposure.shm.session_layout:
        row 0 holds the session port's counters, row s session s's); None while down."""
        import numpy as np

        from exposure.shm.segment import SharedArray
        from exposure.shm.session_layout import SESSION_COLS

        try:
            seg = SharedArray.attach(f"/exposure.{self.name}.sessions",
                                     (row + 1, SESSION_COLS), np.uint64, readonly=True)
        except (FileNotFoundError, ValueError):
            return None
        try:
            return [int(x) for x in seg.array[row]]
        finally:
            seg.close()

    def port_counters(self) -> dict[str, int]:
        """The session port's counters by name (session_layout.NODE_COUNTERS); {} while
        down."""
        from exposure.shm.session_layout import NODE_COUNTERS

        r = self.session_row(0)
        return {} if r is None else {k: r[c] for k, c in NODE_COUNTERS.items()}

    def session_counters(self, sid: int) -> dict[str, int]:
        """Session ``sid``'s counters (session_layout.SESSION_COUNTERS, plus held, done,
        connected); {} while down."""
        from exposure.shm import session_layout as SL

        r = self.session_row(sid)
        if r is None:
            return {}
        return {"held": r[SL.S_HELD], "done": r[SL.S_DONE], "connected": r[SL.S_CONNECTED],
                **{k: r[c] for k, c in SL.SESSION_COUNTERS.items()}}

    def stop(self) -> None:
        terminate(self.proc)
        for n in self.segments():  # only if the node failed to clean up (the test checks)
            os.unlink(f"/dev/shm/{n}")


def terminate(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM ``proc`` (a node, a gateway) and wait ``timeout`` s for it, then SIGKILL."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def process_map(hot_wait: str = "spin", hot_cpu: int = -1, tick_us: int = 500,
                durable: tuple[str, ...] = ("journal", "mirror")) -> str:
    """The [[process]] tables of a node of a pair (and of the standalone node the pair
    benchmark compares with): ingest, compute and fan-out in one process; journal and
    mirror (``durable``) in a second one, sleeping a tick between polls on CPU 0. (A
    cluster's partitions on 2 cores: ``hot_wait="spin-then-block"``, ``durable=("journal",
    "snapshot")``, ``tick_us=2000``.)"""
    return f"""
[[process]]
name = "hot"
stages = ["ingest", "compute", "fanout"]
cpu = {hot_cpu}
wait = "{hot_wait}"
tick_us = {tick_us}

[[process]]
name = "durable"
stages = [{", ".join(f'"{s}"' for s in durable)}]
cpu = -2
wait = "sleep"
tick_us = {tick_us}
"""


def cpu_times(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process still running."""
    import psutil

    out = {}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            pass
    return out


class LocalPair:
    """Two real nodes of a primary/backup pair on loopback, with their own secret, ports,
    data directories and etcd prefix; ``etcd`` is a running :class:`LocalEtcd` (or its
    URL). ``a`` starts first (the primary), then ``b`` (its backup). On 2 cores only
    ``a``'s hot process spins (CPU 1); everything else sleeps a tick (500 us) between polls
    on CPU 0, where the clients run too."""

    def __init__(self, tmp: Path, etcd, release: str = "replicated+local",
                 orders: int = 65536, cells: int = 65536, failover_ms: int = 300,
                 heartbeat_ms: int = 50, fsync: str = "interval", start: bool = True,
                 extra: str = "", node_extra: str = "", alone_after_ms: int = 200,
                 strict: bool = False):
        self.secret = tmp / "pair.secret"
        self.secret.write_text(uuid.uuid4().hex + uuid.uuid4().hex)
        self.etcd_url = etcd if isinstance(etcd, str) else etcd.url
        self.prefix = f"/exposure-test/{os.getpid()}{uuid.uuid4().hex[:8]}"
        self._store = None
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
peer_snapshot = "127.0.0.1:{other.sport}"
secret_file = "{self.secret}"
etcd = "{self.etcd_url}"
etcd_prefix = "{self.prefix}"
release = "{release}"
heartbeat_ms = {heartbeat_ms}
failover_ms = {failover_ms}
alone_after_ms = {alone_after_ms}
strict = {str(strict).lower()}
{extra}
{process_map(wait, cpu)}""")
        if start:
            self.start()

    def store(self):
        """A client of the pair's record in etcd (exposure.pair.coord.PairStore)."""
        from exposure.pair.coord import PairStore

        return PairStore([self.etcd_url], self.prefix, timeout=2)

    def record(self):
        """etcd's pair record now (exposure.pair.coord.PairState, or None); tests poll it, so
        one client (one HTTP session) serves every call."""
        if self._store is None:
            self._store = self.store()
        return self._store.read()[0]

    def start(self, timeout: float = 120) -> None:
        """``a`` first: once etcd names it primary, ``b`` starts beside it while ``a`` is
        still loading its stages."""
        self.a.launch()

        def a_primary() -> bool:
            if self.a.proc.poll() is not None:
                self.a.wait_ready(1)  # raises with the log
            try:
                rec = self.record()
            except Exception:
                rec = None
            return rec is not None and rec.primary == self.a.name

        wait_for(a_primary, timeout, f"etcd to name {self.a.name} primary", self.a,
                 step=0.02)
        self.b.launch()
        self.a.wait_ready(timeout)
        self.b.wait_ready(timeout)

    def stop(self) -> None:
        for n in (self.b, self.a):
            n.stop()
        if self._store is not None:
            self._store.close()
            self._store = None


class LocalEtcd:
    """A real single-member etcd (Debian's ``etcd-server``, ``tools/install-etcd``) on free
    loopback ports (or ``host``) with its own data directory; ``stop()`` kills it and
    removes the directory. ``pause()``/``resume()`` stop and start the same member (its
    data kept), as an outage would."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1", start: bool = True,
                 cpus: set[int] | None = None):
        import shutil

        self.bin = shutil.which("etcd") or "/usr/bin/etcd"
        if not os.path.exists(self.bin):
            raise FileNotFoundError("etcd is not installed (run tools/install-etcd)")
        self.host = host
        self.port, self.peer_port = free_port(), free_port()
        self.name = f"e{os.getpid()}{uuid.uuid4().hex[:6]}"
        self.data_dir = tmp / f"{self.name}.etcd"
        self.log = tmp / f"{self.name}.etcd.log"
        self.url = f"http://{host}:{self.port}"
        # Off the last CPU (where a node's hot process spins; etcd stands for a cluster on
        # other hosts), with one Go scheduler thread.
        allowed = sorted(os.sched_getaffinity(0))
        self.cpus = cpus if cpus is not None else set(allowed[:-1] or allowed)
        self.proc: subprocess.Popen | None = None
        if start:
            self.start()

    def start(self, timeout: float = 30) -> None:
        peer = f"http://{self.host}:{self.peer_port}"
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                [self.bin, "--name", self.name, "--data-dir", str(self.data_dir),
                 "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"{self.name}={peer}",
                 "--heartbeat-interval", "50", "--election-timeout", "500"],
                stdout=log, stderr=log, env={**os.environ, "GOMAXPROCS": "1"},
                preexec_fn=lambda: os.sched_setaffinity(0, self.cpus))
        import urllib.request

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if b"true" in r.read():
                        return True
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise WaitTimeout("etcd exited")
            return False

        try:
            wait_for(healthy, timeout, "etcd to be healthy", step=0.02)
        except WaitTimeout as e:
            self.stop()
            raise RuntimeError(f"etcd did not start ({e}): "
                               f"{self.log.read_text()[-2000:]}") from None

    def pause(self) -> None:
        """Stop the member (kill -9), keeping its data."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    resume = start

    def stop(self) -> None:
        import shutil

        self.pause()
        shutil.rmtree(self.data_dir, ignore_errors=True)
