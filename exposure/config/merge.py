"""A user's TOML document over the built-in default: every section a table, every key known
and of its type (an unknown or retired key is an error naming it), and each section's keys
laid over the default's."""

from __future__ import annotations

from exposure.config.defaults import default_doc
from exposure.config.model import ConfigError
from exposure.core.capacity import Capacities

__all__ = ["SCHEMA", "PROCESS_KEYS", "check_keys", "merge_over_defaults"]

SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "node": {"name": str, "stall_ms": int},
    "capacities": {k: int for k in Capacities().as_dict()},
    "rings": {"compute": int, "tap": int, "fanout": int, "mirror": int},
    "ingest": {"host": str, "port": int, "max_sessions": int, "ack_interval_us": int,
               "sessions": str, "max_connections": int, "login_timeout_ms": int,
               "idle_timeout_ms": int, "max_output_kb": int, "ipc": bool, "ipc_ring_kb": int},
    "desks": {"mode": str, "group": str},
    "fanout": {"group": str, "port": int, "interface": str, "ttl": int, "max_datagram": int,
               "heartbeat_ms": int, "refresh_rows_per_s": int, "snapshot_host": str,
               "snapshot_port": int, "positions": bool},
    "journal": {"dir": str, "fsync": str, "interval_ms": int, "segment_mb": int,
                "prewrite_mb": int, "cache_mb": int},
    "snapshot": {"every_events": int, "every_s": int, "keep": int, "journal": str},
    "partition": {"cluster": str, "name": str},
    "currencies": {"base": str, "ids": dict},
    "reference": {"instruments": str, "accounts": str},
    "web": {"host": str, "port": int, "users": str, "tls_cert": str, "tls_key": str,
            "max_clients": int},
    "day": {"roll_at": str, "tz": str, "weekdays": list, "load_after_roll": list,
            "keep_days": int},
    "replication": {"peer": str, "listen": str, "peer_ingest": str, "peer_snapshot": str,
                    "secret_file": str,
                    "etcd": (str, list), "etcd_prefix": str, "release": str,
                    "heartbeat_ms": int, "failover_ms": int, "alone_after_ms": int,
                    "strict": bool},
}
# The keys of one [[process]] table (checked by exposure.config.processes).
PROCESS_KEYS: dict[str, type | tuple[type, ...]] = {"name": str, "stages": list, "cpu": int,
                                                    "tick_us": int, "nice": int,
                                                    "wait": str}

_RETIRED = {"replication.witness": "etcd is the pair's arbiter now (replication.etcd, "
                                   "replication.etcd_prefix)"}


def check_keys(table: dict, allowed: dict, where: str) -> None:
    """Every key of ``table`` is in ``allowed`` and of its type; ``where`` prefixes the
    key in the error (``"ingest."``, ``"process[0]."``)."""
    for k, v in table.items():
        if f"{where}{k}" in _RETIRED:
            raise ConfigError(f"{where}{k} is no longer a setting: {_RETIRED[where + k]}")
        if k not in allowed:
            raise ConfigError(f"unknown key {where}{k} (allowed: {', '.join(allowed)})")
        want = allowed[k]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"{where}{k} = {v!r}: expected {getattr(want, '__name__', want)}")


def merge_over_defaults(doc: dict) -> dict:
    """Each section of :data:`SCHEMA` as the default's keys overridden by ``doc``'s, and
    ``"process"``: ``doc``'s [[process]] tables if it has any, else the default's (not yet
    checked: :func:`exposure.config.processes.parse_processes`)."""
    base = default_doc()
    unknown = set(doc) - set(SCHEMA) - {"process"}
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] (allowed: "
                          f"{', '.join([*SCHEMA, 'process'])})")
    merged: dict = {}
    for sec, allowed in SCHEMA.items():
        t = doc.get(sec, {})
        if not isinstance(t, dict):
            raise ConfigError(f"[{sec}] must be a table")
        check_keys(t, allowed, f"{sec}.")
        merged[sec] = {**base[sec], **t}
    merged["process"] = doc["process"] if "process" in doc else base["process"]
    return merged
