"""The supervisor's watch over its processes: progress counters (a hung process counts as
dead) and systemd's notify protocol (READY, WATCHDOG), with a real node and a real
notify socket."""

import os
import signal
import socket
import time
import uuid

import pytest

from exposure.harness.localnode import LocalNode
from exposure.node.sdnotify import Notifier
from exposure.shm.control import CTL_PROGRESS

pytestmark = pytest.mark.process


@pytest.fixture
def notify_socket(tmp_path):
    path = str(tmp_path / f"notify-{uuid.uuid4().hex[:8]}")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    yield path, s
    s.close()


def received(s, seconds: float = 0.3) -> list[str]:
    """The notifications that arrive within ``seconds`` (or until a 0.2 s lull)."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            out.append(s.recv(4096).decode())
        except TimeoutError:
            break
    return out


def pings(s, want: int, seconds: float = 30.0) -> int:
    """Wait until ``want`` WATCHDOG=1 pings have arrived (at most ``seconds``: a loaded
    machine stretches the 100 ms between them); how many came."""
    got = 0
    end = time.monotonic() + seconds
    while got < want and time.monotonic() < end:
        got += sum(m == "WATCHDOG=1" for m in received(s, 0.5))
    return got


def test_the_notifier_speaks_sd_notify_and_rate_limits_the_watchdog(notify_socket):
    path, s = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000"})
    n.ready("primary, epoch 3")
    for _ in range(50):
        n.watchdog()  # at most one per third of the interval
    n.stopping()
    got = received(s)
    assert got == ["READY=1\nSTATUS=primary, epoch 3", "WATCHDOG=1", "STOPPING=1"]
    n.close()


def test_without_systemd_or_for_another_pid_the_notifier_does_nothing(notify_socket):
    path, s = notify_socket
    assert not Notifier({}).enabled
    Notifier({}).ready()  # no error
    other = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000",
                      "WATCHDOG_PID": str(os.getpid() + 1)})
    other.watchdog()
    assert received(s) == []
    gone = Notifier({"NOTIFY_SOCKET": path + "-missing"})
    assert gone.send("READY=1") is False  # never raises


@pytest.mark.timeout(180)
def test_a_hung_process_is_killed_and_restarted_and_the_watchdog_follows_progress(
        tmp_path, notify_socket):
    path, s = notify_socket
    n = LocalNode(tmp_path, start=False)
    text = n.config.read_text().replace("[node]\n", "[node]\nstall_ms = 600\n")
    n.config.write_text(text)
    n.env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "300000"}
    try:
        n.start()
        deadline = time.time() + 60
        got: list[str] = []
        while not any(m.startswith("READY=1") for m in got):
            assert time.time() < deadline, got
            got += received(s)
        assert pings(s, 2) >= 2  # about every 100 ms while every process makes progress
        durable = n.pids()["durable"]
        os.kill(durable, signal.SIGSTOP)  # hung: alive, but its loop does not advance
        deadline = time.time() + 30
        while "made no progress" not in n.log.read_text():
            assert time.time() < deadline, n.log.read_text()[-3000:]
            time.sleep(0.05)
        deadline = time.time() + 60
        while n.pids().get("durable") in (None, durable):
            assert time.time() < deadline, n.log.read_text()[-3000:]
            time.sleep(0.05)
        n.wait_ready()
        received(s)
        assert pings(s, 1) >= 1  # pings again after the restart
        control = n.control()
        assert control[CTL_PROGRESS] > 0 and control[CTL_PROGRESS + 1] > 0
        assert "process durable" in n.log.read_text()
    finally:
        n.stop()
    assert n.segments() == []



def test_a_child_started_nice_runs_nice_from_its_first_instruction(tmp_path):
    """The snapshot process (started every million events) is niced before it imports
    anything: its imports are about a second of CPU on the core the clients share."""
    import sys
    from types import SimpleNamespace

    from exposure.node.supervisor import Node

    out = tmp_path / "nice"
    probe = [sys.executable, "-S", "-c",
             f"import os; open({str(out)!r}, 'w').write(str(os.nice(0)))"]
    me = SimpleNamespace(all_cpus=set(os.sched_getaffinity(0)))
    for nice in (19, 0):
        assert Node._popen(me, probe, nice=nice).wait(timeout=30) == 0
        assert int(out.read_text()) == min(19, os.nice(0) + nice)
