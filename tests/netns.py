"""Two "hosts" made of Linux network namespaces, for tests of partitions and failover.

Topology (all of it private to one :class:`TwoHosts`, names unique per run)::

    root namespace:  bridge exbr<tag>  gw = 10.213.N.1/24
                       |-- exva<tag> <=veth=> eth0 in namespace exa<tag>  10.213.N.2/24
                       `-- exvb<tag> <=veth=> eth0 in namespace exb<tag>  10.213.N.3/24

``lo`` is up in each namespace (127.0.0.1 and multicast on it work there). The namespaces
have no default route and ``ip_forward`` is left alone, so nothing leaves the bridge.
N is picked at random among the 10.213.N.0/24 nets not already in use in the root
namespace, and re-checked after it is claimed, so concurrent test runs do not collide.

Use it as a context manager, or call :meth:`TwoHosts.close` in a ``finally``; an atexit
handler also tears everything down if a test crashes past that. Needs root (really
CAP_NET_ADMIN and CAP_SYS_ADMIN); without it :class:`TwoHosts` raises
:class:`NetnsUnavailable`, which :func:`two_hosts_or_skip` turns into a pytest skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

IP = shutil.which("ip") or "/usr/sbin/ip"
PREFIX = "10.213"
PROBE_PORT = 9  # nothing needs to listen: a refused connection (RST) proves reachability
_CMD_TIMEOUT = 10.0

# Run inside a namespace: exit 0 once every host:port target answers (accepts or refuses a
# TCP connection); exit 1 at the deadline, printing the targets that never answered.
_PROBE = r"""
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
pending = [(h, int(p)) for h, p in (t.rsplit(":", 1) for t in sys.argv[2:])]
while True:
    for t in list(pending):
        s = socket.socket()
        s.settimeout(0.5)
        try:
            s.connect(t)
        except ConnectionRefusedError:
            pending.remove(t)
        except OSError:
            pass
        else:
            pending.remove(t)
        finally:
            s.close()
    if not pending:
        sys.exit(0)
    if time.monotonic() > deadline:
        print(" ".join(f"{h}:{p}" for h, p in pending))
        sys.exit(1)
    time.sleep(0.05)
"""

_UNAVAILABLE_HINTS = ("not permitted", "permission denied", "not supported",
                      "unknown device type", "no such file or directory")


class NetnsUnavailable(RuntimeError):
    """Network namespaces (or veth/bridge devices) cannot be made here: not root, no
    CAP_NET_ADMIN/CAP_SYS_ADMIN, no ``ip``, or the kernel lacks the drivers."""


class IpError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and its stderr."""

    def __init__(self, argv: list[str], rc: int, stderr: str) -> None:
        super().__init__(f"{' '.join(argv)} exited {rc}: {stderr.strip()}")
        self.stderr = stderr


def _ip(*args: str, timeout: float = _CMD_TIMEOUT) -> str:
    """Run ``ip args...``; return its stdout or raise :class:`IpError`."""
    argv = [IP, *args]
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise NetnsUnavailable(f"iproute2 'ip' not found ({IP})") from e
    if p.returncode != 0:
        raise IpError(argv, p.returncode, p.stderr)
    return p.stdout


def _quiet(*args: str) -> bool:
    """Run ``ip args...`` ignoring every failure (for cleanup); True if it succeeded."""
    try:
        _ip(*args)
        return True
    except Exception:
        return False


def _unavailable(e: IpError, what: str) -> NetnsUnavailable | IpError:
    """The exception to raise for a failure to create ``what``."""
    if any(h in e.stderr.lower() for h in _UNAVAILABLE_HINTS):
        return NetnsUnavailable(f"cannot create {what} (need root / CAP_NET_ADMIN): {e}")
    return e


class Host:
    """One network namespace joined to the bridge: a "host" with its own IP stack."""

    name: str
    """The namespace's name, e.g. ``exa1a2b3c``."""
    addr: str
    """Its IPv4 address on the bridge, e.g. ``10.213.7.2``."""
    veth: str
    """The root-namespace end of its veth pair (its end inside is ``eth0``)."""

    def __init__(self, name: str, addr: str, veth: str) -> None:
        self.name = name
        self.addr = addr
        self.veth = veth
        self._procs: list[subprocess.Popen[Any]] = []

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.addr!r})"

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed to run inside this namespace: ``ip netns exec <name> argv...``."""
        return [IP, "netns", "exec", self.name, *argv]

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace (``kw`` as for :class:`subprocess.Popen`).

        :meth:`TwoHosts.close` kills it if it is still running then."""
        p = subprocess.Popen(self.cmd(argv), **kw)
        self._procs.append(p)
        return p

    def wait_reachable(self, targets: list[tuple[str, int]], timeout: float = 10.0) -> None:
        """Return once every ``(addr, port)`` in ``targets`` answers a TCP connect from
        inside this namespace (accepted or refused: either proves the path works);
        raise :class:`TimeoutError` if some do not within ``timeout`` seconds."""
        argv = [sys.executable, "-I", "-S", "-c", _PROBE, str(timeout)]
        argv += [f"{a}:{p}" for a, p in targets]
        try:
            r = subprocess.run(self.cmd(argv), capture_output=True, text=True,
                               timeout=timeout + 10)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{self}: reachability probe hung") from e
        if r.returncode != 0:
            raise TimeoutError(f"{self}: no answer within {timeout}s from "
                               f"{r.stdout.strip() or '?'} {r.stderr.strip()}".strip())


class TwoHosts:
    """Two namespaces ``a`` and ``b`` on a private bridge whose root-side address is ``gw``."""

    a: Host
    b: Host
    gw: str
    """The root namespace's address on the bridge (services both hosts reach listen here)."""
    bridge: str
    """The bridge's name in the root namespace."""
    net: str
    """The bridge's subnet, e.g. ``10.213.7.0/24``."""

    def __init__(self) -> None:
        """Build the namespaces, veths and bridge, and check that ``a``, ``b`` and ``gw``
        reach one another; on any failure, remove what was made and raise
        (:class:`NetnsUnavailable` if namespaces cannot be made here at all)."""
        self._closed = False
        self._namespaces: list[str] = []
        self._links: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- building -------------------------------------------------------------------------

    def _build(self) -> None:
        tag = f"{os.getpid() % 0x1000:03x}{secrets.randbelow(0x1000):03x}"
        self.bridge = f"exbr{tag}"
        self.a = Host(f"exa{tag}", "", f"exva{tag}")
        self.b = Host(f"exb{tag}", "", f"exvb{tag}")

        for h in (self.a, self.b):
            try:
                _ip("netns", "add", h.name)
            except IpError as e:
                if "exists" in e.stderr.lower():
                    raise  # another run holds the name: a real (and very unlikely) clash
                raise NetnsUnavailable(f"cannot create a network namespace "
                                       f"(need root / CAP_SYS_ADMIN): {e}") from e
            self._namespaces.append(h.name)

        try:
            _ip("link", "add", self.bridge, "type", "bridge", "stp_state", "0",
                "forward_delay", "0")
        except IpError as e:
            raise _unavailable(e, "a bridge") from e
        self._links.append(self.bridge)

        n = self._claim_subnet()
        self.gw = f"{PREFIX}.{n}.1"
        self.net = f"{PREFIX}.{n}.0/24"
        self.a.addr = f"{PREFIX}.{n}.2"
        self.b.addr = f"{PREFIX}.{n}.3"
        _ip("link", "set", self.bridge, "up")

        for h in (self.a, self.b):
            try:
                _ip("link", "add", h.veth, "type", "veth", "peer", "name", "eth0",
                    "netns", h.name)
            except IpError as e:
                raise _unavailable(e, "a veth pair") from e
            self._links.append(h.veth)
            _ip("link", "set", h.veth, "master", self.bridge)
            _ip("link", "set", h.veth, "up")
            _ip("-n", h.name, "addr", "add", f"{h.addr}/24", "dev", "eth0")
            _ip("-n", h.name, "link", "set", "eth0", "up")
            _ip("-n", h.name, "link", "set", "lo", "up")

        # Traffic must cross the bridge whatever br_netfilter/iptables are loaded: verify.
        try:
            self.a.wait_reachable([(self.gw, PROBE_PORT), (self.b.addr, PROBE_PORT)])
            self.b.wait_reachable([(self.gw, PROBE_PORT), (self.a.addr, PROBE_PORT)])
        except TimeoutError as e:
            raise RuntimeError(f"bridge {self.bridge} does not pass TCP between the namespaces "
                               f"and gw (br_netfilter with iptables/nftables rules?): {e}") from e

    def _claim_subnet(self) -> int:
        """Put ``10.213.N.1/24`` on the bridge for an N no one else in the root namespace
        uses, re-checking after the claim (two runs may race for the same N)."""
        for _ in range(20):
            used = self._used_subnets()
            free = [n for n in range(1, 255) if n not in used]
            if not free:
                raise RuntimeError(f"no free {PREFIX}.N.0/24 subnet in the root namespace")
            n = free[(os.getpid() + secrets.randbelow(1 << 16)) % len(free)]
            _ip("addr", "add", f"{PREFIX}.{n}.1/24", "dev", self.bridge)
            if self._used_subnets(exclude=self.bridge).isdisjoint({n}):
                return n
            _quiet("addr", "del", f"{PREFIX}.{n}.1/24", "dev", self.bridge)
            time.sleep(secrets.randbelow(50) / 1000)  # back off before a fresh pick
        raise RuntimeError(f"could not claim a free {PREFIX}.N.0/24 subnet")

    @staticmethod
    def _used_subnets(exclude: str | None = None) -> set[int]:
        """The Ns of 10.213.N.x addresses and routes in the root namespace (bar ``exclude``)."""
        used: set[int] = set()
        for line in _ip("-o", "-4", "addr", "show").splitlines():
            f = line.split()
            if len(f) >= 4 and f[1] != exclude and f[3].startswith(f"{PREFIX}."):
                used.add(int(f[3].split(".")[2]))
        for line in _ip("-o", "-4", "route", "show", "table", "all").splitlines():
            f = line.split()
            if f and f[0] != "local" and f[0].startswith(f"{PREFIX}.") \
                    and not (exclude and f"dev {exclude} " in line + " "):
                used.add(int(f[0].split(".")[2]))
        return used

    # -- partitions -----------------------------------------------------------------------

    def cut(self, host: Host) -> None:
        """``host`` loses every link, to the other host and to ``gw``: its veth goes down
        on the root side and inside the namespace. Its ``lo`` keeps working."""
        _ip("link", "set", host.veth, "down")
        _ip("-n", host.name, "link", "set", "eth0", "down")

    def heal(self, host: Host, timeout: float = 10.0) -> None:
        """Undo :meth:`cut`; return once ``host`` reaches ``gw`` again (TimeoutError if it
        does not within ``timeout`` seconds)."""
        _ip("-n", host.name, "link", "set", "eth0", "up")
        _ip("link", "set", host.veth, "up")
        host.wait_reachable([(self.gw, PROBE_PORT)], timeout)

    # -- teardown -------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what still runs in the namespaces, remove them, the veths and the bridge.
        Idempotent; never raises."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        for name in self._namespaces:
            with contextlib.suppress(Exception):
                for pid in _ip("netns", "pids", name).split():
                    with contextlib.suppress(Exception):
                        os.kill(int(pid), signal.SIGKILL)
        for h in (getattr(self, "a", None), getattr(self, "b", None)):
            for p in h._procs if h else ():
                with contextlib.suppress(Exception):
                    if p.poll() is None:
                        p.kill()
                    p.wait(timeout=5)
                for f in (p.stdin, p.stdout, p.stderr):
                    with contextlib.suppress(Exception):
                        if f:
                            f.close()
        # Root-side veths first (that destroys both ends even if a namespace lingers),
        # then the namespaces, the bridge last.
        for link in reversed(self._links):
            if link != getattr(self, "bridge", None):
                _quiet("link", "del", link)
        for name in self._namespaces:
            _quiet("netns", "del", name)
        if getattr(self, "bridge", None) in self._links:
            _quiet("link", "del", self.bridge)

    def __enter__(self) -> TwoHosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def two_hosts_or_skip() -> TwoHosts:
    """A fresh :class:`TwoHosts`, or ``pytest.skip`` with the reason namespaces are
    unavailable here."""
    import pytest  # here, so that the harness itself does not need pytest

    try:
        return TwoHosts()
    except NetnsUnavailable as e:
        pytest.skip(str(e))
