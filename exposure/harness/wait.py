"""The one synchronous wait of the tests, benchmarks and tools: poll a predicate until it
holds; on a timeout say what was awaited, for how long, the last value the predicate gave
(and what ``show()`` says) and, where a node is given, the tail of its log. (An asyncio
client waits its own way: perf/fuzz/client.py ``Conn.wait``.)"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

__all__ = ["WaitTimeout", "wait_for"]


class WaitTimeout(AssertionError, RuntimeError):
    """:func:`wait_for` ran out of time: an AssertionError to a test (an expectation that
    did not come true), a RuntimeError to a tool (as the harness's timeouts always were)."""


def wait_for(pred: Callable[[], Any], timeout: float, what: str, node=None, *,
             step: float = 0.005, show: Callable[[], Any] | None = None,
             tail: int = 4000) -> Any:
    """Call ``pred`` every ``step`` s until it returns something true, and return that.
    After ``timeout`` s raise :class:`WaitTimeout` naming ``what``, the time waited, the
    predicate's last value (where it is more than False or None), ``show()`` (the state
    worth seeing) and the last ``tail`` characters of ``node.log`` (a LocalNode, or
    anything with a ``log`` path)."""
    t0 = time.monotonic()
    end = t0 + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > end:
            break
        time.sleep(step)
    msg = f"timed out after {time.monotonic() - t0:.1f} s waiting for {what}"
    if value is not None and not isinstance(value, bool):
        msg += f"; last value {value!r}"
    if show is not None:
        try:
            msg += f"; now {show()!r}"
        except Exception as e:  # the message must still come out
            msg += f"; show() failed: {type(e).__name__}: {e}"
    if node is not None:
        try:
            text = node.log.read_text(errors="replace")[-tail:]
        except OSError as e:
            text = f"(no log: {e})"
        msg += f"\n--- {node.log} (the last {tail} characters):\n{text}"
    raise WaitTimeout(msg)
