"""The logging seam: one format for every process, on stderr, and a rate limit.

Every module logs through its own logger (``log = logging.getLogger(__name__)``); a
process entry point (``exposure run``, a stage process, the snapshotter, the consolidator,
the tools) calls :func:`setup` once, which gives the root logger one handler on stderr::

    2025-01-31T14:02:03.512 exposure/p1[48213] WARNING exposure.node.stages.ingest: ...

time (local, milliseconds), the process's label and pid, the level, the module, the
message. Under systemd journald keeps stderr (``journalctl -u exposure@NAME``); under the
test harness it goes to the node's log file. The level comes from ``setup(level=...)``,
else from ``EXPOSURE_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR; a number also works), else
INFO. ``print`` stays for what a command says to its user (the CLI's output, the node's
banner and ``ready`` line on stdout).

:class:`RateLog` keeps a flood (connections refused, logins failing) from becoming a
flood of lines: at most one line per kind of event per ``every_s``, counting the ones it
held back. This module imports only the standard library (``exposure status`` imports it).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import TextIO

__all__ = ["ENV", "FORMAT", "DATEFMT", "setup", "level_from", "RateLog"]

ENV = "EXPOSURE_LOG_LEVEL"
FORMAT = ("%(asctime)s.%(msecs)03d %(label)s[%(process)d] %(levelname)s %(name)s: "
          "%(message)s")
DATEFMT = "%Y-%m-%dT%H:%M:%S"
_DEFAULT = logging.INFO


class _Handler(logging.StreamHandler):
    """The one handler :func:`setup` installs (found again by its type: idempotent).
    Without a stream of its own it writes to whatever ``sys.stderr`` is when a record
    comes (as logging's last resort does), so a caller that swaps stderr for a while (a
    test capturing it, a tool's main run in-process) never leaves it writing to a closed
    file."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._follow = stream is None
        super().__init__(stream)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr if self._follow else self._stream

    @stream.setter
    def stream(self, value: TextIO) -> None:
        self._stream = value

    def setStream(self, stream: TextIO) -> TextIO | None:  # noqa: N802 (logging's name)
        if self._follow:  # (from now on this stream, not stderr's current one)
            self._stream, self._follow = sys.stderr, False
        return super().setStream(stream)


def level_from(value: str | int | None, default: int = _DEFAULT) -> int:
    """A level from a name (``"warning"``, any case) or a number; ``default`` for None or
    an empty string; ValueError for a name logging does not know."""
    if value is None or value == "":
        return default
    if isinstance(value, int):
        return value
    v = value.strip()
    if v.lstrip("-").isdigit():
        return int(v)
    got = logging.getLevelName(v.upper())
    if not isinstance(got, int):
        raise ValueError(f"unknown log level {value!r} (DEBUG, INFO, WARNING, ERROR)")
    return got


def setup(level: str | int | None = None, label: str = "exposure",
          stream: TextIO | None = None) -> logging.Handler:
    """Send every logger's records to ``stream`` (stderr) in :data:`FORMAT`, at ``level``
    (else ``$EXPOSURE_LOG_LEVEL``, else INFO); ``label`` names the process in each line.
    Calling it again (a tool's main inside the CLI's) replaces the label, level and stream
    of the same handler: never two handlers, never a line twice. Returns the handler."""
    bad = None
    if level is None:
        try:
            lvl = level_from(os.environ.get(ENV))
        except ValueError as e:
            lvl, bad = _DEFAULT, e
    else:
        lvl = level_from(level)
    root = logging.getLogger()
    h = next((h for h in root.handlers if isinstance(h, _Handler)), None)
    if h is None:
        h = _Handler(stream)
        root.addHandler(h)
    elif stream is not None and h.stream is not stream:
        h.setStream(stream)
    h.setFormatter(logging.Formatter(FORMAT, DATEFMT, defaults={"label": label}))
    root.setLevel(lvl)
    if bad is not None:
        logging.getLogger(__name__).warning("%s: %s; logging at INFO", ENV, bad)
    return h


class RateLog:
    """At most one line per ``key`` per ``every_s`` through ``logger`` (at ``level``, or
    the call's); the lines it held back are counted in the next one."""

    def __init__(self, logger: logging.Logger, every_s: float = 5.0,
                 level: int = logging.WARNING) -> None:
        self.logger = logger
        self.level = level
        self.every_ns = int(every_s * 1e9)
        self._last: dict[str, int] = {}
        self._held: dict[str, int] = {}

    def __call__(self, key: str, msg: str, level: int | None = None) -> bool:
        """Log ``msg`` unless a line of this ``key`` went out less than ``every_s`` ago
        (then count it); True if it went out."""
        now = time.monotonic_ns()
        last = self._last.get(key)
        if last is not None and now - last < self.every_ns:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = now
        held = self._held.pop(key, 0)
        more = f" (and {held} more like it)" if held else ""
        self.logger.log(self.level if level is None else level, "%s%s", msg, more)
        return True
