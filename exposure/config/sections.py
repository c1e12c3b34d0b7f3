"""One check per section of the merged configuration. Each takes its section's merged keys
and returns them as :class:`~exposure.config.model.NodeConfig` fields, or raises
:class:`~exposure.config.model.ConfigError` naming the bad key and value. Relative file
names are taken from ``base``, the config file's directory."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from exposure.config.defaults import RELEASE_POLICIES
from exposure.config.model import ConfigError, Partition
from exposure.config.paths import data_dir
from exposure.config.values import address, is_loopback, port
from exposure.core.capacity import Capacities, CapacityError
from exposure.core.currency import Currencies, CurrencyError
from exposure.core.types import EVENT_SIZE, MAX_DATAGRAM
from exposure.shm.ring_layout import RingLayoutError, check_capacity
from exposure.store.journal import FSYNC_POLICIES

__all__ = ["node", "capacities", "rings", "ingest", "fanout", "journal", "snapshot", "desks",
           "replication", "partition", "reference", "day_schedule", "currencies", "web"]


def node(nd: dict) -> dict:
    """[node]: the name (in the segments' names) and the stall limit."""
    name = nd["name"]
    if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 64:
        raise ConfigError(f"node.name = {name!r}: letters, digits, '-' and '_' only (1..64)")
    if not 100 <= nd["stall_ms"] <= 3_600_000:
        raise ConfigError(f"node.stall_ms = {nd['stall_ms']}: 100..3600000")
    return {"name": name, "stall_ms": nd["stall_ms"]}


def capacities(caps: dict) -> Capacities:
    """[capacities]."""
    try:
        return Capacities.from_dict(caps)
    except CapacityError as e:
        raise ConfigError(f"capacities: {e}") from e


def rings(rg: dict) -> dict[str, int]:
    """[rings]: each ring's slots (``tap``, an older config's ring from ingest to the
    journal, which reads the compute ring now, is checked and then dropped)."""
    for ring, slots in rg.items():
        try:
            check_capacity(slots, EVENT_SIZE)
        except RingLayoutError as e:
            raise ConfigError(f"rings.{ring}: {e}") from e
    return {k: v for k, v in rg.items() if k != "tap"}


def _ip(value: str, err: str = "an address in [ingest]/[fanout] is not an IP address: "):
    try:
        return ipaddress.ip_address(value)
    except ValueError as e:
        raise ConfigError(f"{err}{e}") from e


def ingest(ing: dict, base: Path, caps: Capacities) -> dict:
    """[ingest]: the session port, its bounds, and the sessions file that authenticates
    its sessions."""
    port(ing["port"], "ingest.port")
    if ing["max_sessions"] < 1:
        raise ConfigError(f"ingest.max_sessions = {ing['max_sessions']}: at least 1")
    if not 0 <= ing["ack_interval_us"] <= 1_000_000:
        raise ConfigError(f"ingest.ack_interval_us = {ing['ack_interval_us']}: 0..1000000")
    _ip(ing["host"])
    for key, lo, hi in (("max_connections", 1, 100_000), ("login_timeout_ms", 100, 600_000),
                        ("idle_timeout_ms", 6000, 86_400_000), ("max_output_kb", 4, 65536)):
        if not lo <= ing[key] <= hi:
            raise ConfigError(f"ingest.{key} = {ing[key]}: {lo}..{hi}")
    kb = ing["ipc_ring_kb"]
    if not 64 <= kb <= 1 << 20 or kb & (kb - 1):
        raise ConfigError(f"ingest.ipc_ring_kb = {kb}: a power of two in 64..1048576")
    out = {k: ing[k] for k in ("max_connections", "login_timeout_ms", "idle_timeout_ms",
                               "max_output_kb", "max_sessions", "ack_interval_us", "ipc",
                               "ipc_ring_kb")}
    out["ingest_host"], out["ingest_port"] = ing["host"], ing["port"]
    if not ing["sessions"]:
        if not is_loopback(ing["host"]):
            raise ConfigError(f"ingest.host = {ing['host']!r} is not a loopback address: a "
                              "node that others can reach needs ingest.sessions (a sessions "
                              "file with each session's secret and entitlements)")
        return out
    from exposure.net.sessions import SessionsError, load_sessions

    path = base / os.path.expanduser(ing["sessions"])
    try:
        load_sessions(path, ing["max_sessions"], caps.accounts, caps.sources)
    except SessionsError as e:
        raise ConfigError(f"ingest.sessions: {e}") from None
    out["sessions_file"] = path
    return out


def fanout(fo: dict) -> dict:
    """[fanout]: the multicast feed and the recovery server."""
    port(fo["port"], "fanout.port")
    grp = _ip(fo["group"])
    _ip(fo["interface"])
    if not grp.is_multicast:
        raise ConfigError(f"fanout.group = {fo['group']!r} is not a multicast address")
    for key, lo, hi in (("ttl", 0, 255), ("heartbeat_ms", 10, 60_000),
                        ("refresh_rows_per_s", 0, 1_000_000)):
        if not lo <= fo[key] <= hi:
            raise ConfigError(f"fanout.{key} = {fo[key]}: {lo}..{hi}")
    if fo["max_datagram"] != 0 and not 256 <= fo["max_datagram"] <= MAX_DATAGRAM:
        raise ConfigError(f"fanout.max_datagram = {fo['max_datagram']}: 0 (the interface's "
                          f"MTU) or 256..{MAX_DATAGRAM}")
    if fo["snapshot_port"]:
        port(fo["snapshot_port"], "fanout.snapshot_port")
    _ip(fo["snapshot_host"], f"fanout.snapshot_host = {fo['snapshot_host']!r}: ")
    return {"group": fo["group"], "fanout_port": fo["port"], "interface": fo["interface"],
            "ttl": fo["ttl"], "max_datagram": fo["max_datagram"],
            "feed_heartbeat_ms": fo["heartbeat_ms"],
            "refresh_rows_per_s": fo["refresh_rows_per_s"],
            "snapshot_host": fo["snapshot_host"], "snapshot_port": fo["snapshot_port"],
            "feed_positions": fo["positions"]}


def journal(jn: dict, name: str) -> dict:
    """[journal]: the fsync policy, the segments' size and the data directory (which
    defaults to one named after the node, ``name``)."""
    if jn["fsync"] not in FSYNC_POLICIES:
        raise ConfigError(f"journal.fsync = {jn['fsync']!r}: one of {', '.join(FSYNC_POLICIES)}")
    if not 1 <= jn["interval_ms"] <= 10_000:
        raise ConfigError(f"journal.interval_ms = {jn['interval_ms']}: 1..10000")
    if not 1 <= jn["segment_mb"] <= 65536:
        raise ConfigError(f"journal.segment_mb = {jn['segment_mb']}: 1..65536")
    if not 0 <= jn["prewrite_mb"] <= 1024:
        raise ConfigError(f"journal.prewrite_mb = {jn['prewrite_mb']}: 0..1024")
    if not 0 <= jn["cache_mb"] <= 65536:
        raise ConfigError(f"journal.cache_mb = {jn['cache_mb']}: 0..65536")
    return {"fsync": jn["fsync"], "fsync_interval_ms": jn["interval_ms"],
            "segment_bytes": jn["segment_mb"] << 20, "prewrite_bytes": jn["prewrite_mb"] << 20,
            "journal_cache_bytes": jn["cache_mb"] << 20, "data_dir": data_dir(jn["dir"], name)}


def snapshot(sn: dict, dy: dict | None = None) -> dict:
    """[snapshot]: when snapshots are taken, how many are kept, and what becomes of the
    journal they cover; with [day] keep_days, the trading days the journal keeps (one
    retention rule: :func:`exposure.store.snapshot.retain`)."""
    keep_days = 0 if dy is None else dy["keep_days"]
    if not 0 <= keep_days <= 3660:
        raise ConfigError(f"day.keep_days = {keep_days}: 0..3660 (0: by snapshots only)")
    if sn["every_events"] < 0 or sn["every_s"] < 0:
        raise ConfigError(f"snapshot.every_events = {sn['every_events']}, every_s = "
                          f"{sn['every_s']}: not negative")
    if not 1 <= sn["keep"] <= 100:
        raise ConfigError(f"snapshot.keep = {sn['keep']}: 1..100")
    if sn["journal"] not in ("delete", "archive", "keep"):
        raise ConfigError(f"snapshot.journal = {sn['journal']!r}: delete, archive or keep")
    return {"snapshot_every_events": sn["every_events"], "snapshot_every_s": sn["every_s"],
            "snapshot_keep": sn["keep"], "snapshot_journal": sn["journal"],
            "keep_days": keep_days}


def desks(dk: dict) -> dict:
    """[desks]: the tally segment's permission bits and group."""
    try:
        mode = int(dk["mode"], 8)
    except ValueError:
        raise ConfigError(f"desks.mode = {dk['mode']!r}: octal permission bits such as "
                          "\"0640\"") from None
    if not 0 <= mode <= 0o777 or mode & 0o600 != 0o600 or mode & 0o022:
        raise ConfigError(f"desks.mode = {dk['mode']!r}: the owner (the node) reads and "
                          "writes; group and others at most read (e.g. \"0640\")")
    if dk["group"]:
        import grp

        try:
            grp.getgrnam(dk["group"])
        except KeyError:
            raise ConfigError(f"desks.group = {dk['group']!r}: no such group") from None
    return {"desk_mode": mode, "desk_group": dk["group"]}


def replication(rp: dict, base: Path) -> dict:
    """[replication] (empty when off): the pair's addresses, shared secret, arbiter and
    timing."""
    if rp["release"] not in RELEASE_POLICIES:
        raise ConfigError(f"replication.release = {rp['release']!r}: one of "
                          f"{', '.join(RELEASE_POLICIES)}")
    if not rp["peer"]:
        return {}
    out = {"repl_peer": address(rp["peer"], "replication.peer"), "release": rp["release"]}
    for key in ("listen", "secret_file", "etcd"):
        if not rp[key]:
            raise ConfigError(f"replication.{key} is required when replication.peer is set")
    out["repl_listen"] = address(rp["listen"], "replication.listen")
    for key in ("peer_ingest", "peer_snapshot"):
        if rp[key]:
            out[key] = address(rp[key], f"replication.{key}")
    out["secret_file"] = _secret(rp["secret_file"], base)
    out["etcd"] = _etcd(rp["etcd"])
    out["etcd_prefix"] = _etcd_prefix(rp["etcd_prefix"])
    return {**out, **_pair_timing(rp)}


def _secret(name: str, base: Path) -> Path:
    """replication.secret_file: a readable shared secret."""
    from exposure.net.repl import read_secret

    secret = base / os.path.expanduser(name)
    try:
        read_secret(secret)
    except ValueError as e:
        raise ConfigError(f"replication.secret_file: {e}") from None
    return secret


def _etcd(etcd: str | list) -> tuple[str, ...]:
    """replication.etcd: one endpoint URL, or a list of them."""
    from exposure.pair.coord import parse_endpoint

    urls = [etcd] if isinstance(etcd, str) else etcd
    for u in urls:
        if not isinstance(u, str):
            raise ConfigError(f"replication.etcd = {etcd!r}: URLs as strings")
        try:
            parse_endpoint(u)
        except ValueError as e:
            raise ConfigError(f"replication.etcd: {e}") from None
    return tuple(urls)


def _etcd_prefix(prefix: str) -> str:
    """replication.etcd_prefix: a key path, without its trailing slashes."""
    if not prefix.startswith("/") or len(prefix) > 200 or not all(
            c.isalnum() or c in "/-_." for c in prefix) or prefix.rstrip("/") == "":
        raise ConfigError(f"replication.etcd_prefix = {prefix!r}: a key path such as "
                          "/exposure/pair (letters, digits, / - _ .)")
    return prefix.rstrip("/")


def _pair_timing(rp: dict) -> dict:
    """replication.alone_after_ms, strict, heartbeat_ms and failover_ms."""
    if not 1 <= rp["alone_after_ms"] <= 600_000:
        raise ConfigError(f"replication.alone_after_ms = {rp['alone_after_ms']}: 1..600000")
    if not 1 <= rp["heartbeat_ms"] <= 10_000:
        raise ConfigError(f"replication.heartbeat_ms = {rp['heartbeat_ms']}: 1..10000")
    if not 2 * rp["heartbeat_ms"] <= rp["failover_ms"] <= 600_000:
        raise ConfigError(f"replication.failover_ms = {rp['failover_ms']}: at least two "
                          f"heartbeats ({2 * rp['heartbeat_ms']} ms) and at most 600000")
    return {"alone_after_ms": rp["alone_after_ms"], "strict": rp["strict"],
            "heartbeat_ms": rp["heartbeat_ms"], "failover_ms": rp["failover_ms"]}


def partition(pt: dict, base: Path) -> dict:
    """[partition]: the cluster file's map and this node's index in it."""
    if not pt["cluster"]:
        if pt["name"]:
            raise ConfigError(f"partition.name = {pt['name']!r} needs partition.cluster")
        return {}
    from exposure.core.partition import MapError, PartitionMap

    path = base / os.path.expanduser(pt["cluster"])
    try:
        pmap = PartitionMap.load(path)
        index = pmap.index(pt["name"])
    except MapError as e:
        raise ConfigError(f"partition: {e}") from None
    return {"partition": Partition(path, pt["name"], index, pmap)}


def web(wb: dict, base: Path) -> dict:
    """[web]: where ``exposure web`` serves the page and with which users file and TLS
    files (paths relative to the config's directory; read when the page starts)."""
    if not wb["host"].strip():
        raise ConfigError("web.host is empty (an address: 127.0.0.1, 0.0.0.0, ::)")
    if not 1 <= wb["port"] <= 65535:
        raise ConfigError(f"web.port = {wb['port']}: 1..65535")
    if not 1 <= wb["max_clients"] <= 100_000:
        raise ConfigError(f"web.max_clients = {wb['max_clients']}: 1..100,000")
    if bool(wb["tls_cert"]) != bool(wb["tls_key"]):
        raise ConfigError("web.tls_cert and web.tls_key: both or neither")
    files = {k: base / os.path.expanduser(wb[k]) if wb[k] else None
             for k in ("users", "tls_cert", "tls_key")}
    return {"web_host": wb["host"], "web_port": wb["port"], "web_users": files["users"],
            "web_tls_cert": files["tls_cert"], "web_tls_key": files["tls_key"],
            "web_max_clients": wb["max_clients"]}


def day_schedule(dy: dict, base: Path) -> dict:
    """[day] roll_at, tz, weekdays, load_after_roll: the scheduled roll
    (:mod:`exposure.core.day`; none while roll_at is "") and the files it loads."""
    from exposure.core.day import parse_schedule

    out: dict = {}
    if dy["roll_at"]:
        try:
            out["roll_schedule"] = parse_schedule(dy["roll_at"], dy["tz"], dy["weekdays"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    files = dy["load_after_roll"]
    if not all(isinstance(f, str) and f for f in files):
        raise ConfigError(f"day.load_after_roll = {files!r}: a list of file names")
    if files and "roll_schedule" not in out:
        raise ConfigError("day.load_after_roll needs day.roll_at (the loads follow the "
                          "scheduled roll)")
    out["load_after_roll"] = tuple(base / os.path.expanduser(f) for f in files)
    return out


def currencies(cc: dict) -> Currencies:
    """[currencies]: the base currency's code and the others' ids (SPEC section 7)."""
    try:
        return Currencies.from_table(cc["base"], cc["ids"])
    except CurrencyError as e:
        raise ConfigError(str(e)) from None


def reference(rf: dict, base: Path, caps: Capacities,
              ccy: Currencies | None = None) -> dict:
    """[reference]: ``instruments.csv`` and ``accounts.csv``, read and checked now (ids
    within the capacities, currency codes in [currencies]): the names that ``dump
    --names``, ``top``, ``watch``, desks and subscribers show (``NodeConfig.names``; none
    when both are "")."""
    if not rf["instruments"] and not rf["accounts"]:
        return {}
    from exposure.core.refdata import RefDataError, load_refdata

    paths = {k: base / os.path.expanduser(rf[k]) if rf[k] else None
             for k in ("instruments", "accounts")}
    try:
        return {"names": load_refdata(paths["instruments"], paths["accounts"], caps,
                                      currencies=ccy)}
    except RefDataError as e:
        raise ConfigError(f"reference: {e}") from None
