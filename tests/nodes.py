"""Test-only scaffolding around the harness (exposure.harness: LocalNode, LocalPair,
LocalEtcd, LocalCluster, wait_for): what needs pytest."""

import shutil

import pytest

from exposure.harness.localnode import LocalEtcd

__all__ = ["etcd_or_skip"]


def etcd_or_skip(tmp_path) -> LocalEtcd:
    """A real etcd member on free ports (stop it when done), or skip the test when etcd is
    not installed (tools/install-etcd)."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (tools/install-etcd)")
    return LocalEtcd(tmp_path)
