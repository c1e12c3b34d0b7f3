"""The liveness rule: a peer that says nothing for a bound is taken for dead.

A peer can go silent without closing anything: a hung or SIGSTOPped process, a frozen
virtual machine, a host gone without a reset. The kernel then still accepts connections
into the listen backlog and bytes into the socket buffers, so a reader that waits for the
peer's answer without a limit waits for ever. Every link of the project whose peer can go
silent applies one rule:

* the peer is **silent** once nothing has been heard from it for more than ``bound``; the
  link is then treated exactly as a closed one (closed, then reconnected and resumed, or
  the next server tried);
* the side that must be heard sends a HEARTBEAT when it has sent nothing (or, on the
  pair's link, no HEARTBEAT) for ``every``, a fraction of the bound, so that a quiet but
  live peer is never taken for a silent one;
* no call on such a path blocks longer than the time left to the deadline.

The bounds, each derived from configuration (docs/pair.md, docs/feed.md, docs/client.md):

================================  =================================  ======================
link                              bound                              heartbeat
================================  =================================  ======================
producer -> node (sessions)       ``liveness_s``: a pair's           the producer's, every
                                  ``failover_ms`` x 3 (>= 1 s), a    ``liveness_s / 3``;
                                  standalone node 3 s                the node answers each
mirror: the primary hears the     ``[replication] failover_ms``      the backup's ACK or
backup                            (a handshake: at least 2 s)        HEARTBEAT, every
                                                                     ``heartbeat_ms``
replica: the backup hears the     ``[replication] failover_ms``      the mirror's HEARTBEAT,
primary                                                              every ``heartbeat_ms``
subscriber's snapshot client      ``snapshot_timeout`` (2 s): the    none (a transfer is
                                  connect, and each wait for bytes   short)
subscriber's feed (multicast)     ``liveness_s`` (1 s): reported     the feed's HEARTBEAT,
                                  (``Subscriber.silent``), nothing   every ``[fanout]
                                  to reconnect                       heartbeat_ms`` (100)
================================  =================================  ======================

Units: whatever clock the caller keeps (``time.monotonic_ns()`` integers or
``time.monotonic()`` seconds), the same for every argument.
"""

from __future__ import annotations

__all__ = ["Liveness", "silent", "time_left"]


def silent(now: float, heard: float, bound: float) -> bool:
    """Whether a peer last heard at ``heard`` is silent at ``now`` (nothing for more
    than ``bound``)."""
    return now - heard > bound


def time_left(now: float, heard: float, bound: float) -> float:
    """How long until a peer last heard at ``heard`` is silent (<= 0: it is)."""
    return heard + bound - now


class Liveness:
    """One link's timers: ``heard`` (the last time anything came from the peer) against
    ``bound``, and ``sent`` (the last heartbeat, or whatever the link counts as one)
    against ``every`` (None: this side sends no heartbeat)."""

    __slots__ = ("bound", "every", "heard", "sent")

    def __init__(self, bound: float, every: float | None = None, now: float = 0) -> None:
        if bound <= 0 or (every is not None and every <= 0):
            raise ValueError(f"liveness bound {bound} and heartbeat {every}: both > 0")
        self.bound = bound
        self.every = every
        self.heard = now
        self.sent = now

    def hear(self, now: float) -> None:
        """Something came from the peer at ``now``."""
        self.heard = now

    def silent(self, now: float) -> bool:
        """Nothing from the peer for more than ``bound``: take it for dead."""
        return now - self.heard > self.bound

    def silent_for(self, now: float) -> float:
        return now - self.heard

    def beat_due(self, now: float) -> bool:
        """A heartbeat is due (the last one is ``every`` old)."""
        return self.every is not None and now - self.sent >= self.every

    def next_due(self, now: float) -> float:
        """How long a wait may last before something is due (the silence deadline, or the
        next heartbeat); never negative."""
        due = self.heard + self.bound
        if self.every is not None:
            due = min(due, self.sent + self.every)
        return max(due - now, 0)

    def __repr__(self) -> str:
        return (f"Liveness(bound={self.bound}, every={self.every}, heard={self.heard}, "
                f"sent={self.sent})")
