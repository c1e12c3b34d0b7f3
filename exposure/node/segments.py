"""The names and shapes of a node's shared segments, one place for the supervisor that
creates them, the processes that attach to them and the tools that read them.

A node of config name ``N`` has ``/exposure.N.tally``, ``.sessions``, ``.control``,
``.counters`` and one ring per hand-off: ``ring.compute`` (ingest -> compute and the
journal, its two consumers), ``ring.fanout`` (compute -> fan-out) and, in a pair,
``ring.mirror`` (journal -> mirror).
"""

from __future__ import annotations

from exposure.config.node import NodeConfig
from exposure.shm.session_layout import SESSION_COLS

__all__ = ["RINGS", "ring_names", "segment_names", "session_shape", "ring_consumers"]

RINGS = ("compute", "fanout", "mirror")


def ring_names(cfg: NodeConfig) -> tuple[str, ...]:
    """The rings a node of ``cfg`` has (a pair's also the mirror's), each in shared memory
    as ``cfg.segment("ring." + name)``."""
    return RINGS if cfg.replicated else RINGS[:2]


def ring_consumers(ring: str) -> int:
    """How many consumers read ``ring``: the compute ring is read by compute and the
    journal, every other ring by one stage."""
    return 2 if ring == "compute" else 1


def segment_names(cfg: NodeConfig) -> dict[str, str]:
    """Every shared segment of the node by short name (tally, sessions, control, counters,
    and each ring's)."""
    return {"tally": cfg.segment("tally"), "sessions": cfg.segment("sessions"),
            "control": cfg.segment("control"), "counters": cfg.segment("counters"),
            **{r: cfg.segment(f"ring.{r}") for r in ring_names(cfg)}}


def session_shape(cfg: NodeConfig) -> tuple[int, int]:
    """The session table's shape: row 0 for the session port, one row per session id."""
    return (cfg.max_sessions + 1, SESSION_COLS)
