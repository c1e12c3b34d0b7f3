"""Node configuration: a TOML file, validated completely before anything starts.

The process map is configuration, not code: each ``[[process]]`` lists the stages it runs
(stages in one process still hand over through rings), the CPU it is pinned to and its
wait strategy. :data:`DEFAULT_TOML` is the complete, commented built-in default; it fits a
2-core machine with one spinning process.

Every error names the offending key and value (:class:`ConfigError`).

This module reads the file and puts the checked sections together; the parts are
:mod:`~exposure.config.defaults` (the default text), :mod:`~exposure.config.merge` (a file
over the default, unknown keys), :mod:`~exposure.config.sections` (one check per section),
:mod:`~exposure.config.paths` and :mod:`~exposure.config.processes` (the process map).
"""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path

from exposure.config import sections
from exposure.config.defaults import DEFAULT_TOML, OPTIONAL_STAGES, RELEASE_POLICIES, STAGES
from exposure.config.merge import merge_over_defaults
from exposure.config.model import ConfigError, NodeConfig, Partition, ProcessSpec
from exposure.config.paths import config_dir
from exposure.config.processes import parse_processes, place_stages, resolve_cpu

__all__ = ["NodeConfig", "Partition", "ProcessSpec", "ConfigError", "load_config",
           "resolve_cpu", "check_ports_free", "DEFAULT_TOML", "STAGES", "OPTIONAL_STAGES",
           "RELEASE_POLICIES"]


def _parse(doc: dict, source: str) -> NodeConfig:
    """``doc`` (a parsed TOML file named ``source``) over the default, checked section by
    section in the order of the default."""
    merged = merge_over_defaults(doc)
    here = config_dir(source)
    node = sections.node(merged["node"])
    caps = sections.capacities(merged["capacities"])
    fields = {**node, "caps": caps, "rings": sections.rings(merged["rings"]),
              **sections.ingest(merged["ingest"], here, caps),
              **sections.fanout(merged["fanout"]),
              **sections.journal(merged["journal"], node["name"]),
              **sections.snapshot(merged["snapshot"], merged["day"])}
    procs = parse_processes(merged["process"])
    repl = sections.replication(merged["replication"], here)
    day = sections.day_schedule(merged["day"], here)
    fields["processes"] = place_stages(procs, fields["snapshot_port"], bool(repl),
                                       scheduled="roll_schedule" in day)
    ccy = sections.currencies(merged["currencies"])
    return NodeConfig(**fields, **repl, **sections.desks(merged["desks"]), **day,
                      **sections.partition(merged["partition"], here),
                      **sections.web(merged["web"], here),
                      **sections.reference(merged["reference"], here, caps, ccy),
                      currencies=ccy, source=source)


def load_config(path: str | Path | None = None) -> NodeConfig:
    """The built-in default, or ``path`` (its sections override the default's keys)."""
    if path is None:
        return _parse(tomllib.loads(DEFAULT_TOML), "<built-in default>")
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {str(path)!r}: "
                          f"{getattr(e, 'strerror', None) or e}") from e
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {str(path)!r} is not valid TOML: {e}") from e
    return _parse(doc, str(path))


def check_ports_free(cfg: NodeConfig) -> None:
    """Raise :class:`ConfigError` if the ingest port, the recovery server's or (in a pair)
    the replication port is already bound on its host."""
    ports = [("ingest.port", (cfg.ingest_host, cfg.ingest_port))]
    if cfg.snapshot_port and any("snapshot" in p.stages for p in cfg.processes):
        ports.append(("fanout.snapshot_port", (cfg.snapshot_host, cfg.snapshot_port)))
    if cfg.repl_listen is not None:
        ports.append(("replication.listen", cfg.repl_listen))
    for key, addr in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"{key} = {addr[1]} on {addr[0]}: {e.strerror or e} "
                              "(port in use?)") from e
        finally:
            s.close()
