"""The real local nodes the end-to-end tests start (perf.localnode, shared with the perf
tool): one node, or a primary/backup pair."""

from perf.localnode import LocalNode as LiveNode
from perf.localnode import LocalPair, free_port

__all__ = ["LiveNode", "LocalPair", "free_port"]
