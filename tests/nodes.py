"""The real local node the end-to-end tests start (perf.localnode, shared with the probe)."""

from perf.localnode import LocalNode as LiveNode
from perf.localnode import free_port

__all__ = ["LiveNode", "free_port"]
