"""The names and shapes of a node's shared segments, one place for the supervisor that
creates them, the processes that attach to them and the tools that read them.

A node of config name ``N`` has ``/exposure.N.tally``, ``.sessions``, ``.rejects`` (each
session's last rejected events: :mod:`exposure.shm.reject_layout`), ``.control``,
``.counters`` and one ring per hand-off: ``ring.compute`` (ingest -> compute and the
journal, its two consumers), ``ring.fanout`` (compute -> fan-out) and, in a pair,
``ring.mirror`` (journal -> mirror). :func:`read_control`, :func:`read_counters` and
:func:`ring_backlog` read the control block, the counters and a ring's backlog (numpy only,
read-only: for the operator's tools, the cluster's choice of a pair's primary and the
harness).
"""

from __future__ import annotations

import numpy as np

from exposure.config.node import NodeConfig
from exposure.shm import counters_layout as CN
from exposure.shm import ring_layout as RL
from exposure.shm.control import CONTROL_WORDS
from exposure.shm.reject_layout import reject_shape as _reject_shape
from exposure.shm.segment import SharedArray
from exposure.shm.session_layout import SESSION_COLS

__all__ = ["RINGS", "ring_names", "segment_names", "session_shape", "reject_shape",
           "ring_consumers",
           "read_control", "read_counters", "ring_backlog"]

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
    """Every shared segment of the node by short name (tally, sessions, rejects, control,
    counters, and each ring's)."""
    return {"tally": cfg.segment("tally"), "sessions": cfg.segment("sessions"),
            "rejects": cfg.segment("rejects"),
            "control": cfg.segment("control"), "counters": cfg.segment("counters"),
            **{r: cfg.segment(f"ring.{r}") for r in ring_names(cfg)}}


def session_shape(cfg: NodeConfig) -> tuple[int, int]:
    """The session table's shape: row 0 for the session port, one row per session id."""
    return (cfg.max_sessions + 1, SESSION_COLS)


def reject_shape(cfg: NodeConfig) -> tuple[int, int]:
    """The reject log's shape: one row per session id (row 0 unused)."""
    return _reject_shape(cfg.max_sessions)


def read_control(cfg: NodeConfig) -> np.ndarray:
    """A copy of the node's control block (exposure.shm.control); FileNotFoundError when
    the node is not running."""
    try:
        seg = SharedArray.attach(cfg.segment("control"), (CONTROL_WORDS,), np.uint64,
                                 readonly=True)
    except Exception as e:  # posix_ipc.ExistentialError
        raise FileNotFoundError(f"no control block {cfg.segment('control')}: is the node "
                                f"running? ({e})") from None
    try:
        return np.array(seg.array)
    finally:
        seg.close()


def read_counters(cfg: NodeConfig) -> dict[str, int]:
    """Every counter of the node's counters segment by name (exposure.shm.counters_layout);
    FileNotFoundError when the node is not running."""
    try:
        seg = SharedArray.attach(cfg.segment("counters"), (CN.COUNTER_WORDS,), np.uint64,
                                 readonly=True)
    except Exception as e:  # posix_ipc.ExistentialError, or a shape that does not fit
        raise FileNotFoundError(f"no counters segment {cfg.segment('counters')}: is the node "
                                f"running (with this config)? ({e})") from None
    try:
        words = np.array(seg.array)
    finally:
        seg.close()
    CN.check(words)
    return {c.name: int(words[CN.INDEX[c.name]]) for c in CN.COUNTERS}


def ring_backlog(cfg: NodeConfig, ring: str) -> tuple[int, list[int]]:
    """The capacity of the node's ring ``ring`` and each consumer's backlog (records
    published and not yet taken, as ``len()`` of its end of a :class:`exposure.shm.ring.Ring`
    counts them: the tail, then the consumer's head), read from the ring's header with
    numpy. FileNotFoundError when the ring does not exist, ValueError when its header is
    not a ring's."""
    name = cfg.segment(f"ring.{ring}")
    seg = SharedArray.attach(name, (RL.N_WORDS,), np.uint64, readonly=True)
    try:
        ctrl = seg.array
        if int(ctrl[RL.W_MAGIC]) != RL.MAGIC or int(ctrl[RL.W_VERSION]) != RL.VERSION:
            raise ValueError(f"ring segment {name}: not a ring of layout version "
                             f"{RL.VERSION}")
        cap, consumers = int(ctrl[RL.W_CAPACITY]), int(ctrl[RL.W_CONSUMERS])
        if not 1 <= consumers <= RL.MAX_CONSUMERS:
            raise ValueError(f"ring segment {name}: {consumers} consumers")
        fill = []
        for k in range(consumers):
            tail = int(ctrl[RL.W_TAIL])
            fill.append(tail - int(ctrl[RL.HEAD_WORDS[k]]))
        return cap, fill
    finally:
        del ctrl
        seg.close()
