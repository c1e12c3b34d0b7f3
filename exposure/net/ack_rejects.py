"""What a producer's ACKs say per event: the (seq, reason) of each rejected event among the
seqs an ACK newly covers.

The node lists each rejected seq with its reason in REJECTED frames just before the ACK
that covers it (a producer logs in asking for them: ``wire.LOGIN_REJECTED``); where the
lists do not cover a range (more than the node's reject log holds between two ACKs, or a
node without per-event rejects), the ACK's per-reason counters fill in without guessing:
a seq is named only when the counts leave no doubt, else ``(0, reason)`` says "one of this
range", and ``"unknown"`` a reason the counts cannot tell (counters that went back: another
node, a restart). :class:`RejectBook` keeps the listed entries between frames; the
producer's I/O thread is its only user (docs/client.md, "Results").
"""

from __future__ import annotations

from collections.abc import Sequence

from exposure.core.types import NODE_REASONS
from exposure.net import wire as W

__all__ = ["RejectBook", "from_counts"]

Rejected = tuple[tuple[int, str], ...]


class RejectBook:
    """The REJECTED frames' entries not yet covered by an ACK (``listed``: seq -> reason
    code), and the range (lo, hi] the frames of this connection cover (-1: none yet)."""

    __slots__ = ("listed", "lo", "hi")

    def __init__(self) -> None:
        self.listed: dict[int, int] = {}
        self.lo = self.hi = -1

    def new_connection(self) -> None:
        """A new connection: its frames cover nothing yet (the entries stay)."""
        self.lo = self.hi = -1

    def on_rejected(self, payload, acked: int, sent: int) -> None:
        """A REJECTED frame: every rejected seq in (after, upto] with its reason (entries
        outside the window, (acked, sent], are dropped: bounded by the window)."""
        after, upto = W.rejected_range(payload)
        for seq, code in W.decode_rejected(payload):
            if acked < seq <= sent:
                self.listed[seq] = code
        if 0 <= self.hi and after <= self.hi:
            self.hi = max(self.hi, upto)
        else:  # the first on this connection, or entries lost in between
            self.lo, self.hi = after, upto

    def resolve(self, lo: int, hi: int, prev: Sequence[int] | None,
                now: Sequence[int]) -> Rejected:
        """The rejected events among seqs lo..hi, newly acknowledged; ``prev`` and ``now``:
        the ACK counters before (None: this connection's first ACK) and now."""
        if self.hi < 0:
            return from_counts(lo, hi, prev, now)
        listed = sorted((s, c) for s, c in self.listed.items() if s <= hi)
        for s, _ in listed:
            del self.listed[s]
        exact = tuple((s, NODE_REASONS.get(c, str(c))) for s, c in listed if s >= lo)
        if self.lo <= lo - 1 and self.hi >= hi:
            return exact
        if prev is None:
            return (*exact, (0, "unknown"))
        delta = [b - a for a, b in zip(prev, now, strict=False)]
        for s, c in listed:
            if s >= lo and 0 <= c < len(delta):
                delta[c] -= 1
        if any(d < 0 for d in delta):
            return (*exact, (0, "unknown"))
        return (*exact, *((0, NODE_REASONS.get(i, str(i))) for i, d in enumerate(delta)
                          if i for _ in range(min(d, hi - lo + 1))))


def from_counts(lo: int, hi: int, prev: Sequence[int] | None,
                now: Sequence[int]) -> Rejected:
    """The rejected events among seqs lo..hi from the counters' change alone."""
    n = hi - lo + 1
    if prev is None:  # a connection's first ACK: no baseline on this node
        return ((0, "unknown"),) if any(now) else ()
    delta = [b - a for a, b in zip(prev, now, strict=False)]
    if any(d < 0 for d in delta):  # counters reset (another node, a restart)
        return ((0, "unknown"),)
    total = sum(delta)
    if total == 0:
        return ()
    reasons = [(i, d) for i, d in enumerate(delta) if i and d]
    if total == n:
        name = NODE_REASONS.get(reasons[0][0], "unknown") if len(reasons) == 1 \
            else "unknown"
        return tuple((s, name) for s in range(lo, hi + 1))
    return tuple((0, NODE_REASONS.get(i, str(i))) for i, d in reasons
                 for _ in range(min(d, n)))
