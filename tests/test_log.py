"""The logging seam (exposure.core.log): the format, one setup, levels, the rate limit.
No process, no socket: the handler writes to a StringIO."""

from __future__ import annotations

import io
import logging
import os
import re

import pytest

from exposure.core import log as L


@pytest.fixture
def root():
    """The root logger, restored after the test (its handlers and level)."""
    r = logging.getLogger()
    handlers, level = r.handlers[:], r.level
    yield r
    for h in r.handlers[:]:
        if h not in handlers:
            r.removeHandler(h)
    r.setLevel(level)


def _ours(r: logging.Logger) -> list[logging.Handler]:
    return [h for h in r.handlers if isinstance(h, L._Handler)]


def test_one_line_holds_time_process_level_module_and_message(root, monkeypatch):
    monkeypatch.delenv(L.ENV, raising=False)
    out = io.StringIO()
    L.setup(label="exposure/p1", stream=out)
    logging.getLogger("exposure.node.stages.ingest").warning("cannot listen on %s", "x:1")
    line = out.getvalue()
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3} exposure/p1\[" + str(os.getpid())
        + r"\] WARNING exposure\.node\.stages\.ingest: cannot listen on x:1\n", line), line


def test_setup_twice_keeps_one_handler_and_takes_the_new_label(root, monkeypatch):
    monkeypatch.delenv(L.ENV, raising=False)
    out = io.StringIO()
    first = L.setup(stream=out)
    second = L.setup(label="exposure/consolidate")
    assert first is second and _ours(root) == [first]
    logging.getLogger("exposure.x").info("ready")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and " exposure/consolidate[" in lines[0] and " INFO " in lines[0]
    other = io.StringIO()
    L.setup(stream=other)  # a new stream replaces the old one
    logging.getLogger("exposure.x").info("again")
    assert "again" in other.getvalue() and "again" not in out.getvalue()
    assert len(_ours(root)) == 1


def test_the_level_comes_from_the_call_else_the_environment_else_info(root, monkeypatch):
    out = io.StringIO()
    lg = logging.getLogger("exposure.y")
    monkeypatch.delenv(L.ENV, raising=False)
    L.setup(stream=out)
    assert root.level == logging.INFO
    lg.debug("hidden")
    lg.info("shown")
    monkeypatch.setenv(L.ENV, "warning")
    L.setup(stream=out)
    assert root.level == logging.WARNING
    lg.info("hidden too")
    lg.error("an error")
    L.setup(level="DEBUG", stream=out)  # the call's level wins over the environment
    assert root.level == logging.DEBUG
    lg.debug("a detail")
    text = out.getvalue()
    assert "hidden" not in text
    assert all(w in text for w in ("INFO exposure.y: shown", "ERROR exposure.y: an error",
                                   "DEBUG exposure.y: a detail"))


def test_an_unknown_level_in_the_environment_says_so_and_logs_at_info(root, monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv(L.ENV, "chatty")
    L.setup(stream=out)
    assert root.level == logging.INFO
    assert "EXPOSURE_LOG_LEVEL" in out.getvalue() and "'chatty'" in out.getvalue()


def test_level_from():
    assert L.level_from(None) == L.level_from("") == logging.INFO
    assert L.level_from("error") == L.level_from(" ERROR ") == L.level_from(40) == 40
    assert L.level_from("15") == 15
    with pytest.raises(ValueError):
        L.level_from("loud")


def test_rate_log_says_one_line_per_kind_per_interval_and_counts_the_rest(root, monkeypatch):
    now = [10**12]
    monkeypatch.setattr(L.time, "monotonic_ns", lambda: now[0])
    out = io.StringIO()
    L.setup(stream=out)
    rl = L.RateLog(logging.getLogger("exposure.z"), every_s=5.0)

    assert rl("auth", "login refused") is True
    for _ in range(3):
        now[0] += 10**9
        assert rl("auth", "login refused") is False  # within 5 s: held back, counted
    assert rl("slow", "a client does not read") is True  # another kind: its own clock
    now[0] += 2 * 10**9  # 5 s after the first line
    assert rl("auth", "login refused") is True
    now[0] += 5 * 10**9
    assert rl("auth", "login refused", level=logging.INFO) is True
    lines = out.getvalue().splitlines()
    assert [ln.split(" exposure.z: ")[1] for ln in lines] == [
        "login refused", "a client does not read", "login refused (and 3 more like it)",
        "login refused"]
    assert [ln.split()[2] for ln in lines] == ["WARNING"] * 3 + ["INFO"]


def test_the_guard_module_re_exports_the_rate_log():
    from exposure.net import guard

    assert guard.RateLog is L.RateLog
