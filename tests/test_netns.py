"""The two-host network-namespace harness (tests/netns.py) does what partition tests rely on."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from netns import IP, Host, NetnsUnavailable, TwoHosts, two_hosts_or_skip

pytestmark = pytest.mark.process

# Accepts connections forever on (argv[1], 0); prints its port; greets each client by name.
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello from " + sys.argv[2].encode() + b"\n")
    c.close()
"""

# Connects to (argv[1], argv[2]) within argv[3] seconds; prints the greeting, or exits 1.
CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3])) as c:
        c.settimeout(float(sys.argv[3]))
        print(c.makefile().readline().strip())
except OSError as e:
    print(repr(e))
    sys.exit(1)
"""


@pytest.fixture
def hosts() -> Iterator[TwoHosts]:
    th = two_hosts_or_skip()
    try:
        yield th
    finally:
        th.close()


def _readline(p: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """A line of ``p``'s stdout within ``timeout`` seconds."""
    assert p.stdout is not None
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, f"no output from {p.args} within {timeout}s"
    return p.stdout.readline().strip()


@contextlib.contextmanager
def serve(host: Host | None, addr: str, label: str) -> Iterator[int]:
    """A greeting TCP server on ``addr`` inside ``host`` (None: the root namespace);
    yields its port."""
    argv = [sys.executable, "-I", "-S", "-c", SERVER, addr, label]
    if host is None:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    else:
        p = host.popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        yield int(_readline(p))
    finally:
        p.kill()
        p.wait(timeout=5)
        assert p.stdout is not None
        p.stdout.close()


def greeting(host: Host | None, addr: str, port: int, timeout: float = 2.0) -> str | None:
    """What the server at ``addr:port`` says to a client in ``host`` (None: the root
    namespace), or None if it cannot be reached within ``timeout`` seconds."""
    if host is None:
        try:
            with socket.create_connection((addr, port), timeout) as c:
                c.settimeout(timeout)
                return c.makefile().readline().strip()
        except OSError:
            return None
    r = subprocess.run(host.cmd([sys.executable, "-I", "-S", "-c", CLIENT, addr, str(port),
                                 str(timeout)]),
                       capture_output=True, text=True, timeout=timeout + 10)
    return r.stdout.strip() if r.returncode == 0 else None


def _links() -> set[str]:
    """The names of the root namespace's interfaces (a veth's without its ``@peer``)."""
    out = subprocess.run([IP, "-o", "link"], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[1].rstrip(":").split("@")[0] for line in out.splitlines()}


def _namespaces() -> list[str]:
    out = subprocess.run([IP, "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.timeout(60)
def test_both_hosts_reach_each_other_and_gw_over_tcp(hosts: TwoHosts) -> None:
    a, b = hosts.a, hosts.b
    assert len({a.addr, b.addr, hosts.gw}) == 3
    assert a.name != b.name and max(len(a.name), len(b.name), len(hosts.bridge)) <= 15

    with serve(a, a.addr, "a") as pa, serve(b, b.addr, "b") as pb, \
            serve(None, hosts.gw, "gw") as pg:
        # host to host, over the bridge
        assert greeting(a, b.addr, pb) == "hello from b"
        assert greeting(b, a.addr, pa) == "hello from a"
        # hosts to the root namespace's gw
        assert greeting(a, hosts.gw, pg) == "hello from gw"
        assert greeting(b, hosts.gw, pg) == "hello from gw"
        # the root namespace to each host
        assert greeting(None, a.addr, pa) == "hello from a"
        assert greeting(None, b.addr, pb) == "hello from b"


@pytest.mark.timeout(60)
def test_cut_isolates_a_host_from_everything_and_heal_restores_it(hosts: TwoHosts) -> None:
    a, b = hosts.a, hosts.b
    with serve(a, a.addr, "a") as pa, serve(b, b.addr, "b") as pb, \
            serve(None, hosts.gw, "gw") as pg:
        hosts.cut(a)
        # a reaches neither b nor gw; neither b nor the root namespace reaches a
        assert greeting(a, b.addr, pb, timeout=0.5) is None
        assert greeting(a, hosts.gw, pg, timeout=0.5) is None
        assert greeting(b, a.addr, pa, timeout=0.5) is None
        assert greeting(None, a.addr, pa, timeout=0.5) is None
        # b is unaffected
        assert greeting(b, hosts.gw, pg) == "hello from gw"
        assert greeting(None, b.addr, pb) == "hello from b"

        hosts.heal(a)  # returns once a reaches gw again: no sleep needed after it
        assert greeting(a, hosts.gw, pg) == "hello from gw"
        assert greeting(a, b.addr, pb) == "hello from b"
        assert greeting(b, a.addr, pa) == "hello from a"
        assert greeting(None, a.addr, pa) == "hello from a"
        assert greeting(b, hosts.gw, pg) == "hello from gw"


@pytest.mark.timeout(60)
def test_close_leaves_no_namespace_veth_or_bridge_and_is_idempotent() -> None:
    th = two_hosts_or_skip()
    try:
        names = [th.a.name, th.b.name]
        links = [th.bridge, th.a.veth, th.b.veth]
        gw = th.gw
        assert set(names) <= set(_namespaces())
        assert set(links) <= _links()
        # something still running inside a namespace must not keep it (or its veth) alive
        sleeper = th.a.popen(["sleep", "600"])
    finally:
        th.close()

    assert sleeper.poll() is not None, "close() left a process running in the namespace"
    assert not set(names) & set(_namespaces())
    assert not set(links) & _links()
    assert f" {gw}/" not in subprocess.run([IP, "-o", "addr"], capture_output=True,
                                          text=True, check=True).stdout
    th.close()  # idempotent: a second close is a no-op and does not raise
    with th:  # nor does the context manager's close after an explicit one
        pass


@pytest.mark.timeout(60)
def test_context_manager_closes_on_error() -> None:
    try:
        with two_hosts_or_skip() as th:
            name = th.a.name
            raise KeyError("boom")
    except KeyError:
        pass
    assert name not in _namespaces()


@pytest.mark.timeout(60)
def test_a_crashed_process_leaves_nothing_behind() -> None:
    """The atexit handler tears down what a test that never reached close() made."""
    two_hosts_or_skip().close()  # skip here, not in the child, if namespaces are unavailable
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import netns\n"
            "th = netns.TwoHosts()\n"
            "print(th.a.name, th.b.name, th.bridge, th.a.veth, th.b.veth, flush=True)\n"
            "th.a.popen(['sleep', '600'])\n"
            "raise SystemError('crash')\n")
    r = subprocess.run([sys.executable, "-I", "-c", code, here], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode != 0 and "crash" in r.stderr
    a, b, *links = r.stdout.split()
    assert not {a, b} & set(_namespaces())
    assert not set(links) & _links()


@pytest.mark.timeout(60)
def test_loopback_and_multicast_on_it_work_inside_a_namespace(hosts: TwoHosts) -> None:
    a = hosts.a
    with serve(a, "127.0.0.1", "a-lo") as port:
        assert greeting(a, "127.0.0.1", port) == "hello from a-lo"

    # what a node's fan-out does: multicast with IP_MULTICAST_IF 127.0.0.1, looped back
    mcast = r"""
import socket
r = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
r.bind(("", 0))
mreq = socket.inet_aton("239.213.0.1") + socket.inet_aton("127.0.0.1")
r.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
s.sendto(b"tally", ("239.213.0.1", r.getsockname()[1]))
r.settimeout(5)
print(r.recv(64).decode())
"""
    r = subprocess.run(a.cmd([sys.executable, "-I", "-S", "-c", mcast]), capture_output=True,
                       text=True, timeout=20)
    assert (r.returncode, r.stdout.strip()) == (0, "tally"), r.stderr


@pytest.mark.timeout(60)
def test_without_privileges_it_raises_netns_unavailable() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop to an unprivileged user")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import netns\n"
            "try:\n    netns.TwoHosts()\nexcept netns.NetnsUnavailable as e:\n"
            "    print('unavailable:', e)\n")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                        "--inh-caps=-all", sys.executable, "-I", "-c", code, here],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("unavailable:"), (r.stdout, r.stderr)
    assert issubclass(NetnsUnavailable, RuntimeError)


@pytest.mark.timeout(60)
def test_concurrent_instances_get_distinct_names_and_subnets() -> None:
    t0 = time.monotonic()
    with two_hosts_or_skip() as one, two_hosts_or_skip() as two:
        assert {one.a.name, one.b.name}.isdisjoint({two.a.name, two.b.name})
        assert one.bridge != two.bridge and one.net != two.net
    assert time.monotonic() - t0 < 30
