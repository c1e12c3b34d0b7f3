"""What ``exposure send`` and ``send --cluster`` do on a :class:`~exposure.net.producer.Producer`.

* :func:`open_producer`: a producer for one node or pair, its first login within the
  command's ``--timeout`` (a node started at the same moment is waited for: a refused
  connection is tried again until then), a :class:`~exposure.net.client.SendError` that
  names every address otherwise.
* :class:`Watch`: the command's two bounds on a producer that never gives up by itself:
  ``retry_s``, how long the node may stay away (0: a lost connection fails the command),
  and ``timeout``, how long outstanding events may wait without one acknowledgement while
  connected.
* :func:`put`: hand records to the producer, waiting for window room under the watch.
* :func:`send_numbered`: a file's records as seqs 1..n of the session, resending only what
  the node lacks (what :func:`exposure.net.client.send_records` does in one batch),
  paced and with progress; :func:`finish`: wait for every acknowledgement, then close.
* :func:`summary`: the JSON keys the command prints.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np

from exposure.net.client import SendError
from exposure.net.producer import (
    AuthError,
    FlushTimeout,
    Producer,
    ProducerError,
    WindowFull,
    endpoints_of,
)

__all__ = ["open_producer", "Watch", "put", "send_numbered", "finish", "summary",
           "abandon"]

log = logging.getLogger(__name__)

_POLL = 0.05      # seconds between looks at the producer while waiting
_CHUNK = 1024     # records handed over at a time (paced: a chunk at a time)


def open_producer(cfg, session: int, secret: bytes | None, timeout: float, *,
                  endpoints=None, spool=None, window: int = 65536) -> Producer:
    """A logged-in producer of session ``session`` for ``cfg`` (a NodeConfig: its ingest
    address, then a pair's peer) or ``endpoints``, within ``timeout`` seconds."""
    try:
        return Producer(cfg, session, endpoints=endpoints, secret=secret, spool=spool,
                        window=window, send_timeout=0.25, connect_timeout=timeout)
    except AuthError as e:
        raise SendError(f"login refused: {e}") from None
    except ProducerError as e:
        where = ", ".join(f"{h}:{p}" for h, p in (endpoints or endpoints_of(cfg)))
        raise SendError(f"cannot reach the node at {where}: {e}") from None


class Watch:
    """Fails a command whose node stays away longer than ``retry_s`` (0: at once) or
    leaves events unacknowledged for ``timeout`` s while connected (:meth:`check`)."""

    def __init__(self, p: Producer, timeout: float, retry_s: float | None) -> None:
        self.p, self.timeout, self.retry_s = p, timeout, retry_s
        now = time.monotonic()
        self._acked = p.acked
        self._since = now                 # when acked last moved (or a login happened)
        self._logins = p.stats["logins"]
        self._drops = p.stats["reconnects"]
        self._away: float | None = None   # when the connection was seen lost

    def check(self) -> None:
        """SendError when a bound is passed; a ProducerError the producer met (a refused
        login, a session taken over) as a SendError too."""
        p, st = self.p, self.p.stats
        try:
            p.flush(0)
        except FlushTimeout:
            pass
        except ProducerError as e:
            raise SendError(str(e)) from None
        now = time.monotonic()
        logins, drops = st["logins"], st["reconnects"]
        if drops != self._drops and self._away is None:
            self._away = now
        self._drops = drops
        connected = logins > drops
        if self.retry_s is not None and self._away is not None:
            if self.retry_s <= 0 or now - self._away > self.retry_s:
                raise SendError(
                    f"the node went away ({st['last_error']})"
                    + (f" and no endpoint took the session within --retry {self.retry_s:g} s"
                       if self.retry_s > 0 else " (--retry 0: not reconnecting)"))
        if logins != self._logins and connected:
            self._logins, self._away, self._since = logins, None, now
        if p.acked != self._acked:
            self._acked, self._since = p.acked, now
        if not connected:
            self._since = now
        elif p.acked < p.sent and now - self._since > self.timeout:
            raise SendError(
                f"timed out waiting for the node: no acknowledgement from {st['endpoint']} "
                f"for {self.timeout:g} s (acknowledged up to seq {p.acked} of {p.sent})")

    def sleep_until(self, t: float) -> None:
        """Wait until monotonic ``t``, checking meanwhile."""
        while (left := t - time.monotonic()) > 0:
            time.sleep(min(left, _POLL))
            self.check()


def put(p: Producer, recs: np.ndarray, watch: Watch) -> None:
    """Hand ``recs`` to the producer (numbered on from ``p.sent``), waiting for room in
    the window while ``watch`` allows."""
    lo = 0
    while lo < len(recs):
        before = p.sent
        try:
            p.send(recs[lo:])
            return
        except WindowFull:
            lo += p.sent - before  # (what fitted was taken)
            watch.check()
        except ProducerError as e:
            raise SendError(str(e)) from None


def send_numbered(p: Producer, recs: np.ndarray, watch: Watch, rate: float = 0.0,
                  progress: Callable[[str], None] | None = None) -> int:
    """Send ``recs`` as seqs 1..n of the session, only those beyond what the node holds
    (``p.sent`` after the first login); return how many it skipped. ``rate`` > 0 paces
    the sending (events per second)."""
    skip = min(p.sent, len(recs))
    todo = recs[skip:]
    chunk = _CHUNK if rate <= 0 else max(1, min(_CHUNK, int(rate // 100)))
    t0 = said = time.monotonic()
    for lo in range(0, len(todo), chunk):
        if rate > 0:  # chunk k leaves at t0 + k * chunk / rate
            watch.sleep_until(t0 + lo / rate)
        put(p, todo[lo:lo + chunk], watch)
        if progress is not None and time.monotonic() - said >= 2.0:
            said = time.monotonic()
            done = min(lo + chunk, len(todo))
            progress(f"sent {done:,} of {len(todo):,} events ({done / (said - t0):,.0f}/s)")
    return skip


def finish(p: Producer, watch: Watch, limit: float | None = None) -> None:
    """Wait for every event sent to be acknowledged (within the watch's bounds, and
    ``limit`` seconds in all when given), then disconnect. SendError otherwise (the
    producer is shut down either way)."""
    end = None if limit is None else time.monotonic() + limit
    try:
        while True:
            try:
                p.flush(_POLL)
                break
            except FlushTimeout:
                watch.check()
                if end is not None and time.monotonic() > end:
                    raise SendError(
                        f"{p.sent - p.acked} events (seqs {p.acked + 1}..{p.sent}) not "
                        f"acknowledged within {limit:g} s of the stop (last: "
                        f"{p.stats['last_error'] or p.stats['endpoint']})") from None
            except ProducerError as e:
                raise SendError(str(e)) from None
    except BaseException:
        abandon(p)
        raise
    # The node answers every login with an ACK (what it processed, the session's rejects
    # so far): a run that had nothing to send waits for it (5 s at most), so that it too
    # reports the session's rejects.
    deadline = time.monotonic() + 5.0
    while p.stats["acks"] == 0 and time.monotonic() < deadline:
        time.sleep(0.002)
    try:
        p.close(5.0)
    except ProducerError as e:
        raise SendError(str(e)) from None


def abandon(p: Producer) -> None:
    """Disconnect without waiting for acknowledgements."""
    try:
        p.close(0)
    except ProducerError:
        pass


def summary(p: Producer, sent: int, skipped: int) -> dict:
    """The counts ``exposure send`` prints: ``sent`` (events this run handed over),
    ``resent_skipped`` (events the node already held), ``acknowledged`` (the highest seq
    acknowledged), ``rejected`` and ``rejects`` (the session's rejects by reason, as of the
    last acknowledgement), ``reconnects``, ``endpoint``."""
    rejects = dict(p.stats["rejects"])
    return {"session": p.session, "sent": int(sent), "resent_skipped": int(skipped),
            "acknowledged": int(p.acked), "rejected": int(sum(rejects.values())),
            "rejects": rejects, "reconnects": int(p.stats["reconnects"]),
            "endpoint": p.stats["endpoint"]}
