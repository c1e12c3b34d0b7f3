"""The gateway's configuration: a TOML file with one ``[gateway]`` table, an optional
``[limits]`` table and one ``[[fix]]`` table per FIX session (docs/fix.md#configuration).

Every file name is taken relative to the config file's directory. Unknown keys anywhere
are an error that names them; every other error names the key and the value
(:class:`GatewayConfigError`). The ``[[fix]]`` tables are checked by the session layer's
``SessionConfig.from_table``.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["GatewayConfig", "GatewayConfigError", "Limits", "load_gateway_config",
           "ORDER_KEYS", "GATEWAY_KEYS", "LIMIT_KEYS", "session_key"]

ORDER_KEYS = ("clordid", "orderid")

GATEWAY_KEYS: dict[str, type | tuple[type, ...]] = {
    "node": str, "session": int, "secret_file": str, "instruments": str, "accounts": str,
    "data_dir": str, "spool": (bool, str), "order_key": str, "name": str,
    "connect_timeout": (int, float),
}

LIMIT_KEYS: dict[str, tuple[int, int, int]] = {
    # key: (default, least, most)
    "segment_bytes": (64 << 20, 1 << 16, 1 << 34),      # one journal segment file
    "prewrite_bytes": (4 << 20, 0, 1 << 30),            # zeros written ahead (0: appends)
    "checkpoint_every": (100_000, 1, 1 << 40),          # journal records between checkpoints
    "pending_messages": (65_536, 16, 1 << 24),          # journaled, not yet durable
    "window": (262_144, 1024, 1 << 24),                 # the producer's window (events)
    "dead_letters": (1_000_000, 1, 1 << 30),            # dead letters kept for redeliver
    "max_connections": (64, 1, 65_536),                 # FIX connections at once
    "max_message": (65_536, 512, 1 << 24),              # bytes of one FIX message
}


class GatewayConfigError(ValueError):
    """A gateway config that cannot run; the message names the key and the value."""


@dataclass(frozen=True)
class Limits:
    segment_bytes: int = LIMIT_KEYS["segment_bytes"][0]
    prewrite_bytes: int = LIMIT_KEYS["prewrite_bytes"][0]
    checkpoint_every: int = LIMIT_KEYS["checkpoint_every"][0]
    pending_messages: int = LIMIT_KEYS["pending_messages"][0]
    window: int = LIMIT_KEYS["window"][0]
    dead_letters: int = LIMIT_KEYS["dead_letters"][0]
    max_connections: int = LIMIT_KEYS["max_connections"][0]
    max_message: int = LIMIT_KEYS["max_message"][0]


@dataclass(frozen=True)
class GatewayConfig:
    """A checked gateway config. ``node``: the node's (or a pair member's) config file, None
    for the built-in node; ``data_dir`` holds the inbound journal, checkpoints, the
    outbound FIX seqs, the dead letters and the control socket; ``fix``: the session
    layer's ``SessionConfig`` objects, one per ``[[fix]]`` table (``fix_tables``: the
    tables as written)."""

    source: Path
    name: str
    node: Path | None
    session: int
    secret_file: Path | None
    instruments: Path
    accounts: Path
    data_dir: Path
    spool: Path | None
    order_key: str
    connect_timeout: float
    limits: Limits
    fix_tables: tuple[dict, ...]
    fix: tuple[Any, ...] = field(default=(), compare=False)

    @property
    def journal_dir(self) -> Path:
        return self.data_dir / "journal"

    @property
    def dead_letter_file(self) -> Path:
        return self.data_dir / "dead-letters.fix"

    @property
    def status_file(self) -> Path:
        return self.data_dir / "status.json"

    @property
    def control_socket(self) -> Path:
        return self.data_dir / "control.sock"

    @property
    def seqs_file(self) -> Path:
        return self.data_dir / "outbound-seqs.json"

    def node_config(self):
        """The node's config (exposure.config.node.NodeConfig); GatewayConfigError if it
        cannot be loaded."""
        from exposure.config.node import ConfigError, load_config

        try:
            return load_config(self.node)
        except ConfigError as e:
            raise GatewayConfigError(f"[gateway] node = {str(self.node)!r}: {e}") from e


def _type_ok(v: Any, t) -> bool:
    ts = t if isinstance(t, tuple) else (t,)
    if isinstance(v, bool) and bool not in ts:
        return False
    return isinstance(v, ts)


def _tname(t) -> str:
    ts = t if isinstance(t, tuple) else (t,)
    names = {str: "a string", int: "an integer", float: "a number", bool: "true/false"}
    return " or ".join(names.get(x, x.__name__) for x in ts)


def _unknown(table: str, got: dict, known) -> None:
    extra = sorted(set(got) - set(known))
    if extra:
        raise GatewayConfigError(
            f"unknown key{'s' if len(extra) > 1 else ''} in [{table}]: "
            f"{', '.join(extra)} (known: {', '.join(sorted(known))})")


def _path(here: Path, key: str, v: str) -> Path:
    if not v:
        raise GatewayConfigError(f"[gateway] {key} = {v!r}: an empty file name")
    p = Path(os.path.expanduser(v))
    return p if p.is_absolute() else here / p


def load_gateway_config(path: str | Path, *, sessions: bool = True) -> GatewayConfig:
    """Read and check the gateway config ``path``. With ``sessions`` the ``[[fix]]`` tables
    are also checked by the session layer (``SessionConfig.from_table``); without, only
    their presence (for tools that need the data directory alone)."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise GatewayConfigError(f"cannot read gateway config {str(path)!r}: "
                                 f"{getattr(e, 'strerror', None) or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise GatewayConfigError(f"gateway config {str(path)!r} is not valid TOML: {e}") \
            from e
    return parse_gateway_config(doc, path, sessions=sessions)


def parse_gateway_config(doc: dict, path: Path, *, sessions: bool = True) -> GatewayConfig:
    """The checked config of the parsed TOML ``doc`` read from ``path``."""
    _unknown("the gateway config's top level", doc, ("gateway", "limits", "fix"))
    here = path.resolve().parent
    g = doc.get("gateway")
    if not isinstance(g, dict):
        raise GatewayConfigError(f"{path}: no [gateway] table")
    _unknown("gateway", g, GATEWAY_KEYS)
    for k, v in g.items():
        if not _type_ok(v, GATEWAY_KEYS[k]):
            raise GatewayConfigError(f"[gateway] {k} = {v!r}: must be {_tname(GATEWAY_KEYS[k])}")
    for k in ("session", "instruments", "accounts"):
        if k not in g:
            raise GatewayConfigError(f"[gateway] {k} is required")
    session = g["session"]
    if not 1 <= session <= 2**32 - 1:
        raise GatewayConfigError(f"[gateway] session = {session}: a session id is "
                                 f"1..{2**32 - 1}")
    order_key = g.get("order_key", "clordid").lower()
    if order_key not in ORDER_KEYS:
        raise GatewayConfigError(f"[gateway] order_key = {g['order_key']!r}: one of "
                                 f"{', '.join(ORDER_KEYS)}")
    name = g.get("name", path.stem)
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise GatewayConfigError(f"[gateway] name = {name!r}: letters, digits, - _ . only")
    data_dir = _path(here, "data_dir", g["data_dir"]) if "data_dir" in g \
        else here / f"{path.stem}.fixdata"
    spool_v = g.get("spool", False)
    if spool_v is True:
        spool = data_dir / "spool"
    elif spool_v is False:
        spool = None
    else:
        spool = _path(here, "spool", spool_v)
    timeout = float(g.get("connect_timeout", 60.0))
    if not 0 < timeout <= 86400:
        raise GatewayConfigError(f"[gateway] connect_timeout = {timeout}: seconds, "
                                 "0 < t <= 86400")
    lim = doc.get("limits", {})
    if not isinstance(lim, dict):
        raise GatewayConfigError("[limits] must be a table")
    _unknown("limits", lim, LIMIT_KEYS)
    vals = {}
    for k, (dflt, lo, hi) in LIMIT_KEYS.items():
        v = lim.get(k, dflt)
        if not _type_ok(v, int) or not lo <= v <= hi:
            raise GatewayConfigError(f"[limits] {k} = {v!r}: an integer {lo}..{hi}")
        vals[k] = v
    tables = doc.get("fix", [])
    if not isinstance(tables, list) or not tables or \
            not all(isinstance(t, dict) for t in tables):
        raise GatewayConfigError(f"{path}: at least one [[fix]] table (one per FIX session)")
    tables = [_with_paths(t, here) for t in tables]
    fix: tuple = ()
    if sessions:
        fix = tuple(_session_configs(tables))
    return GatewayConfig(
        source=path, name=name,
        node=_path(here, "node", g["node"]) if "node" in g else None,
        session=session,
        secret_file=_path(here, "secret_file", g["secret_file"]) if "secret_file" in g
        else None,
        instruments=_path(here, "instruments", g["instruments"]),
        accounts=_path(here, "accounts", g["accounts"]),
        data_dir=data_dir, spool=spool, order_key=order_key, connect_timeout=timeout,
        limits=Limits(**vals), fix_tables=tuple(tables), fix=fix)


_FIX_PATH_KEYS = ("password_file",)


def _with_paths(t: dict, here: Path) -> dict:
    """A [[fix]] table with its file names (if any) made relative to the config's dir."""
    out = dict(t)
    for k in _FIX_PATH_KEYS:
        v = out.get(k)
        if isinstance(v, str) and v and not Path(v).is_absolute():
            out[k] = str(here / v)
    return out


def _session_configs(tables: list[dict]) -> list:
    from exposure.fix.session import SessionConfig

    out = []
    for i, t in enumerate(tables):
        try:
            out.append(SessionConfig.from_table(t))
        except (ValueError, TypeError, KeyError) as e:
            raise GatewayConfigError(f"[[fix]] #{i + 1}: {e}") from e
    names = [session_key(s) for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise GatewayConfigError(f"[[fix]]: two sessions with the same CompIDs: "
                                 f"{', '.join(dup)}")
    return out


def session_key(s) -> str:
    """A FIX session's name in the journal and the SeqStore: BEGIN:SENDER->TARGET."""
    return str(s.key)
