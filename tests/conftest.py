"""Fixtures shared by the tests."""

# isort: off
# First, before any module that defines a kernel (support imports the engine): every kernel
# this process compiles then goes to the cache keyed by the sources (exposure.core.jit), the
# one the nodes the tests start use.
import exposure.core.jit  # noqa: F401
# isort: on
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# The numba warm-up, opt-in (EXPOSURE_WARMUP=1; docs/testing.md). On a fresh clone the
# kernels' first compile costs about 30 s inside the first process test's setup. With the
# warm-up, the tests that start no process run first (each group keeps its files' order), and
# meanwhile tests/warm_numba.py compiles the node's kernels on the last CPU (a real node
# started, fed, restarted and stopped); the first process test waits for it (outside its
# timeout). On the quiet machine (2026-12-07) the unit tests and two process files from a
# cold cache took 125 and 131 s with it against 149 and 153 s without, but the whole suite
# from a fresh clone took 842 s with it against 834 s without (the warm-up's 51 s slowed the
# unit tests beside it); on the loaded one (2026-12-06, load 3-6) five files had taken 95
# and 119 s with it against 69 and 110 s. So it stays off unless asked for.


def _warmup_wanted() -> bool:
    import os

    return os.environ.get("EXPOSURE_WARMUP") == "1"


def pytest_collection_modifyitems(session, config, items):
    """With the warm-up: the tests marked `process` after the others, each group in
    collection order."""
    if not _warmup_wanted():
        return
    unit = [i for i in items if i.get_closest_marker("process") is None]
    rest = [i for i in items if i.get_closest_marker("process") is not None]
    items[:] = unit + rest


class _Warmup:
    """Starts tests/warm_numba.py once the session's tests are known (with
    EXPOSURE_WARMUP=1, when the session selects a `process` test) and waits for it before
    the first `process` test."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.log = None
        self.started = self.waited = 0.0
        self.line = ""

    def pytest_collection_finish(self, session):
        if not _warmup_wanted() or not any(
                i.get_closest_marker("process") for i in session.items):
            return
        self.log = tempfile.TemporaryFile()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("warm_numba.py"))],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def _join(self, timeout: float = 600) -> None:
        t0 = time.monotonic()
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.waited = time.monotonic() - t0
        self.log.seek(0)
        out = self.log.read().decode(errors="replace").strip()
        self.log.close()
        self.line = (out.splitlines()[-1] if rc == 0 and out else
                     f"failed ({rc}), the tests compile what they need: {out[-1500:]}")
        self.proc = None

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item, nextitem):
        if self.proc is not None and item.get_closest_marker("process") is not None:
            self._join()
        yield

    def pytest_terminal_summary(self, terminalreporter):
        if self.line:
            terminalreporter.write_line(
                f"{self.line} (started with the session; the first process test waited "
                f"{self.waited:.1f} s for it)")

    def pytest_sessionfinish(self, session):
        if self.proc is not None:  # no process test ran (-x, a failure in the unit tests)
            self.proc.terminate()
            self._join(30)


def pytest_configure(config):
    config.pluginmanager.register(_Warmup(), "exposure-numba-warmup")
    config.pluginmanager.register(_Bytecode(), "exposure-bytecode-cache")


# ---------------------------------------------------------------------------------------------
# A bytecode cache for the processes the tests start. Where the environment sets
# PYTHONDONTWRITEBYTECODE (this machine's does), every `exposure run`, stage process and CLI
# call compiled the package's sources again: about 0.2 s of a node's 1.4-1.8 s start and
# 15% of its CPU, measured (docs/testing.md). For the session the children may write
# bytecode, into a directory of its own (PYTHONPYCACHEPREFIX), so the checkout stays as it
# was; it goes at the end.


class _Bytecode:
    def __init__(self):
        self.dir: str | None = None
        self.saved: dict[str, str | None] = {}

    def pytest_sessionstart(self, session):
        import os

        if not os.environ.get("PYTHONDONTWRITEBYTECODE"):
            return
        self.dir = tempfile.mkdtemp(prefix="exposure-tests-pycache-")
        for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX"):
            self.saved[k] = os.environ.get(k)
        del os.environ["PYTHONDONTWRITEBYTECODE"]
        os.environ["PYTHONPYCACHEPREFIX"] = self.dir

    def pytest_sessionfinish(self, session):
        import os
        import shutil

        if self.dir is None:
            return
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
