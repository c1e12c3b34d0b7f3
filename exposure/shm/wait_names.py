"""The names of the wait strategies (:mod:`exposure.shm.wait`), without numba: the
configuration checks a process's ``wait`` against them before anything is compiled."""

__all__ = ["WAIT_STRATEGIES"]

WAIT_STRATEGIES = ("spin", "spin-then-block", "block", "sleep")
