"""Fixtures shared by the tests."""

import pytest
from support import Run

from exposure.harness.localnode import LocalNode


@pytest.fixture
def run():
    """``run(lines, caps=None)``: a :class:`support.Run` of the real parser and kernel."""
    return Run


@pytest.fixture
def node(tmp_path):
    """A real node on the built-in default config (unique name and ports), stopped after
    the test, which fails if the node left shared memory behind. (For `process` tests.)"""
    n = LocalNode(tmp_path)
    try:
        yield n
    finally:
        n.stop()
    assert n.segments() == [], "the node left shared memory behind"


# ---------------------------------------------------------------------------------------------
# The `process` marker, made honest. `python3 -m pytest -m "not process"` is the one-minute run
# of every test that starts no process and opens no socket (docs/testing.md). A test outside
# the marker that tries either fails loudly instead of passing slowly, so a missing marker
# cannot hide: while such a test runs (its fixtures' setup and teardown included), creating a
# socket, forking, spawning or starting a multiprocessing child raises ProcessNotMarked.

_ADVICE = (
    "{what} in a test not marked `process`: mark it with @pytest.mark.process (or "
    "`pytestmark = pytest.mark.process` for the whole module), so that the unit run "
    '(`python3 -m pytest -m "not process"`) leaves it out'
)


class ProcessNotMarked(RuntimeError):
    """A test that is not marked `process` started a process or opened a socket."""


def _refuse(item, what: str):
    def refuse(*_args, **_kwargs):
        msg = _ADVICE.format(what=what)
        item.stash.setdefault(_VIOLATIONS, []).append(msg)
        raise ProcessNotMarked(msg)

    return refuse


_VIOLATIONS = pytest.StashKey[list]()


def _guards(item):
    """(owner, attribute, replacement) for every way a test may start a process or open a
    socket."""
    import _posixsubprocess
    import multiprocessing.process
    import os
    import socket
    import subprocess

    out = [
        (socket.socket, "__init__", _refuse(item, "socket.socket()")),
        (subprocess.Popen, "__init__", _refuse(item, "subprocess.Popen()")),
        (_posixsubprocess, "fork_exec", _refuse(item, "fork_exec (a subprocess)")),
        (multiprocessing.process.BaseProcess, "start", _refuse(item, "multiprocessing start()")),
        (os, "system", _refuse(item, "os.system()")),
    ]
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp"):
        if hasattr(os, name):
            out.append((os, name, _refuse(item, f"os.{name}()")))
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.get_closest_marker("process") is not None:
        yield
        return
    mp = pytest.MonkeyPatch()
    try:
        for owner, name, value in _guards(item):
            mp.setattr(owner, name, value)
        yield
    finally:
        mp.undo()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that caught ProcessNotMarked still fails."""
    outcome = yield
    report = outcome.get_result()
    seen = item.stash.get(_VIOLATIONS, None)
    if seen:
        if report.passed:
            report.outcome = "failed"
            report.longrepr = "\n".join(dict.fromkeys(seen))
        seen.clear()
