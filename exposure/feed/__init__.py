"""The multicast feed: its wire format (:mod:`.wire`), the subscriber's jitted merge
(:mod:`.merge`) and :class:`Subscriber` (:mod:`.subscriber`), a self-healing copy of a
node's or a consolidator's feed.

    from exposure.feed import Subscriber
    with Subscriber.from_config("node.toml") as sub:
        for change in sub.poll(timeout=1.0): ...

This package's ``__init__`` is the public module users import.
"""

from exposure.feed.subscriber import (
    COUNTERS,
    STATES,
    Change,
    Rows,
    SnapshotError,
    Subscriber,
    fetch_snapshot,
)

__all__ = ["Subscriber", "Change", "Rows", "SnapshotError", "fetch_snapshot", "COUNTERS",
           "STATES"]
