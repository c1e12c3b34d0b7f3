"""What a checked configuration is: :class:`NodeConfig` with its :class:`ProcessSpec` and
:class:`Partition`, and :class:`ConfigError`, whose message names the key and the value."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exposure.core.capacity import Capacities
from exposure.core.currency import Currencies

if TYPE_CHECKING:
    from exposure.core.day import Schedule
    from exposure.core.partition import PartitionMap
    from exposure.core.refdata import RefData

__all__ = ["ConfigError", "ProcessSpec", "Partition", "NodeConfig"]


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the value."""


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    stages: tuple[str, ...]
    cpu: int | None
    wait: str
    tick_us: int = 500
    nice: int = 0          # the process's nice value (-20..19; 0 = left as started)


@dataclass(frozen=True)
class Partition:
    """This node's place in a cluster: partition ``index`` (``name``) of ``pmap``."""

    cluster: Path
    name: str
    index: int
    pmap: PartitionMap

    def ingest_args(self) -> tuple[int, np.ndarray, np.ndarray]:
        return self.index, self.pmap.acc_owner, self.pmap.src_owner


@dataclass(frozen=True)
class NodeConfig:
    name: str
    caps: Capacities
    rings: dict[str, int]
    ingest_host: str
    ingest_port: int
    max_sessions: int
    ack_interval_us: int
    group: str
    fanout_port: int
    interface: str
    ttl: int
    max_datagram: int
    processes: tuple[ProcessSpec, ...]
    data_dir: Path
    fsync: str
    fsync_interval_ms: int
    segment_bytes: int
    prewrite_bytes: int
    journal_cache_bytes: int
    snapshot_every_events: int
    snapshot_every_s: int
    snapshot_keep: int
    snapshot_journal: str
    repl_peer: tuple[str, int] | None = None
    repl_listen: tuple[str, int] | None = None
    peer_ingest: tuple[str, int] | None = None
    peer_snapshot: tuple[str, int] | None = None
    secret_file: Path | None = None
    etcd: tuple[str, ...] = ()
    etcd_prefix: str = "/exposure/pair"
    release: str = "local"
    heartbeat_ms: int = 50
    failover_ms: int = 300
    alone_after_ms: int = 200
    strict: bool = False
    stall_ms: int = 5000
    sessions_file: Path | None = None
    max_connections: int = 320
    login_timeout_ms: int = 5000
    idle_timeout_ms: int = 30000
    max_output_kb: int = 64
    ipc: bool = True         # [ingest] ipc: producers on this host may log in by IPC
    ipc_ring_kb: int = 1024
    desk_mode: int = 0o640
    desk_group: str = ""
    feed_heartbeat_ms: int = 100
    refresh_rows_per_s: int = 2000
    feed_positions: bool = True  # [fanout] positions: position rows on the feed (version 4)
    snapshot_host: str = "127.0.0.1"
    snapshot_port: int = 7702
    partition: Partition | None = None
    names: RefData | None = field(default=None, compare=False)  # [reference]; None = no files
    currencies: Currencies = field(default_factory=Currencies)  # [currencies] (SPEC 7)
    keep_days: int = 2                      # [day]: days the journal keeps replayable
    roll_schedule: Schedule | None = None   # [day]: the scheduled roll (None: none)
    load_after_roll: tuple[Path, ...] = ()  # [day]: files loaded right after it
    web_host: str = "127.0.0.1"             # [web]: exposure web's defaults
    web_port: int = 8080
    web_users: Path | None = None
    web_tls_cert: Path | None = None
    web_tls_key: Path | None = None
    web_max_clients: int = 200
    source: str = field(default="<built-in default>")

    @property
    def replicated(self) -> bool:
        """Whether this node is one of a primary/backup pair."""
        return self.repl_peer is not None

    def segment(self, what: str) -> str:
        """Shared-memory name of one of this node's segments."""
        return f"/exposure.{self.name}.{what}"
