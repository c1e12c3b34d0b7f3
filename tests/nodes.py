"""The real local nodes the end-to-end tests start (exposure.harness.localnode, shared with the perf
tool): one node, or a primary/backup pair."""

import shutil

import pytest

from exposure.harness.localnode import LocalEtcd, LocalPair, free_port
from exposure.harness.localnode import LocalNode as LiveNode

__all__ = ["LiveNode", "LocalPair", "LocalEtcd", "free_port", "etcd_or_skip"]


def etcd_or_skip(tmp_path) -> LocalEtcd:
    """A real etcd member on free ports (stop it when done), or skip the test when etcd is
    not installed (tools/install-etcd)."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (tools/install-etcd)")
    return LocalEtcd(tmp_path)
