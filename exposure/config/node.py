"""Node configuration: a TOML file, validated completely before anything starts.

The process map is configuration, not code: each ``[[process]]`` lists the stages it runs
(stages in one process still hand over through rings), the CPU it is pinned to and its
wait strategy. :data:`DEFAULT_TOML` is the complete, commented built-in default; it fits a
2-core machine with one spinning process.

Every error names the offending key and value (:class:`ConfigError`).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from exposure.core.capacity import Capacities, CapacityError
from exposure.core.partition import MapError, PartitionMap
from exposure.core.types import EVENT_SIZE
from exposure.shm.control import MAX_PROCESSES
from exposure.shm.ring_layout import RingLayoutError, check_capacity
from exposure.shm.wait import WAIT_STRATEGIES
from exposure.store.journal import FSYNC_POLICIES

__all__ = ["NodeConfig", "Partition", "ProcessSpec", "ConfigError", "load_config",
           "resolve_cpu", "DEFAULT_TOML", "STAGES", "RELEASE_POLICIES"]

# The stages of a live node, in pipeline order. Every one must run in exactly one process.
STAGES = ("ingest", "compute", "fanout", "journal", "mirror", "snapshot")
# Stages a node may leave out of its process map: the mirror, unless [replication] is on.
OPTIONAL_STAGES = ("mirror", "snapshot")
RELEASE_POLICIES = ("replicated+local", "replicated", "local")

DEFAULT_TOML = """\
# exposure node configuration (the built-in default; `exposure run --config FILE` replaces it)

[node]
name = "exposure"            # shared-memory segments are /exposure.<name>.<ring|tally>
stall_ms = 5000              # a process whose loop makes no progress this long counts as
                             # dead: it is killed and the node's processes restart

[capacities]                 # SPEC section 1 defaults; raise them here
accounts = 4096
instruments = 65536
sectors = 256
sources = 1024
orders = 1048576             # live orders
cells = 1048576              # (account, instrument) cells

[rings]                      # slots of each ring (powers of two), records of 128 bytes
compute = 131072             # ingest -> compute and the journal (both read every record;
                             # a slot is free once both have passed it)
fanout = 16384               # compute -> fan-out (changed rows)
mirror = 65536               # journal -> mirror (records for the backup)

[ingest]                     # TCP sessions from upstream systems
host = "127.0.0.1"
port = 7700
max_sessions = 256
ack_interval_us = 200        # at most one ACK per session per interval while events stream
                             # (each ACK is a send syscall on the hot path); 0 = every poll
sessions = ""                # the sessions file: each session's secret and entitlements
                             # (exposure/sessions.py). "" = every session open and
                             # entitled to everything, which only a loopback host allows
max_connections = 320        # open connections; at the cap the oldest one that has not
                             # logged in makes room
login_timeout_ms = 5000      # from connect to a valid LOGIN
idle_timeout_ms = 30000      # a session that sends nothing this long is closed (clients
                             # send HEARTBEATs every 5 s when they have nothing to send;
                             # at least 6000)
max_output_kb = 64           # answers queued for a client; one that does not read them
                             # is disconnected

[desks]                      # who may read the tally segment (/dev/shm/exposure.<name>.tally)
mode = "0640"                # its permission bits: desks read it, nobody else writes it
group = ""                   # its group (desk users are its members); "" = the node's own

[fanout]                     # UDP multicast of tally updates
group = "239.255.77.1"
port = 7701
interface = "127.0.0.1"      # IP_MULTICAST_IF; loopback works on this machine
ttl = 1
max_datagram = 1400          # bytes of one datagram (rows are packed up to this)
heartbeat_ms = 100           # an idle feed sends a heartbeat (the last seq) this often
refresh_rows_per_s = 2000    # published rows re-sent per second in a slow cycle, while the
                             # hot path is idle, so silent rows converge (0 = off)
snapshot_host = "127.0.0.1"  # the recovery server: every row as of a gseq, over TCP
snapshot_port = 7702         # (stage "snapshot"; 0 = off). docs/feed.md

[journal]                    # every sequenced record, on disk, before it is acknowledged
dir = ""                     # data directory; "" = ~/.local/share/exposure/<node name>
                             # (exposure run --data-dir DIR overrides)
fsync = "interval"           # batch: fsync before acknowledging | interval: every
                             # interval_ms, acknowledging after it | none: after write()
interval_ms = 2
segment_mb = 256             # segments roll at this size

[snapshot]                   # taken by a nice-19 process replaying the journal: compute
                             # never pauses for it (exposure/snapshot.py)
every_events = 1000000       # after this many journaled events (0: never by count)
every_s = 600                # or after this many seconds with new events (0: never by time)
keep = 2                     # snapshots kept (a corrupt newest falls back to the previous)
journal = "delete"           # segments covered by the oldest kept snapshot: delete |
                             # archive (moved to DIR/archive) | keep

[replication]                # a primary/backup pair (examples/pair/); off while peer = ""
peer = ""                    # host:port of the other node's replication listener
listen = ""                  # host:port where this node, as a backup, accepts the primary
peer_ingest = ""             # host:port of the other node's sessions (clients fail over)
peer_snapshot = ""           # host:port of the other node's recovery server (subscribers)
secret_file = ""             # the shared secret (HMAC-SHA256 of the link's handshake)
etcd = "http://127.0.0.1:2379"  # the arbiter: etcd endpoint(s), a string or a list
etcd_prefix = "/exposure/pair"  # the pair's keys in etcd (one prefix per pair)
release = "replicated+local" # acknowledge an event once it is: replicated+local (in the
                             # backup's memory and durable here) | replicated | local
heartbeat_ms = 50            # the primary sends one every heartbeat_ms (its echo renews
                             # the fence); the backup when it has nothing else to send
failover_ms = 300            # the backup promotes itself after this much silence (and
                             # only when etcd records it as the synchronous member)
alone_after_ms = 200         # the primary records "running alone" in etcd after its
                             # backup has been silent this long, then acknowledges on its
                             # own durability
strict = false               # true: never run alone (stop acknowledging without a backup)

[partition]                  # one partition of a cluster (examples/cluster/, SPEC section 5)
cluster = ""                 # the cluster file with the partition map; "" = the whole fund
name = ""                    # this node's partition in it: events of accounts and sources
                             # it does not own are rejected as wrong_partition

# The process map. On 2 cores: one process runs the whole hot path, spinning on the last
# CPU; the journal runs on the other core with the clients and the OS, spinning briefly
# and then blocking. On one core nothing may spin. On a bigger host give every stage its
# own [[process]] and CPU.
[[process]]
name = "hot"
stages = ["ingest", "compute", "fanout"]
cpu = -1                     # a CPU id; negative counts from the last CPU of this machine
wait = "spin"                # spin | spin-then-block | block | sleep (exposure/shm/wait.py)

[[process]]
name = "durable"
stages = ["journal", "mirror", "snapshot"]  # the feed's recovery server (when
                             # [fanout] snapshot_port is set) sleeps here too
cpu = -2                     # the other core (on 2 cores: CPU 0)
wait = "sleep"               # wakes every tick_us by itself: ingest never pays a wake-up
tick_us = 2000               # once per fsync interval: fewer wake-ups on the core the
                             # clients share (a pair's primary: 500, since its backup's
                             # ACKs wait for the mirror here)
"""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and the value."""


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    stages: tuple[str, ...]
    cpu: int | None
    wait: str
    tick_us: int = 500


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
    desk_mode: int = 0o640
    desk_group: str = ""
    feed_heartbeat_ms: int = 100
    refresh_rows_per_s: int = 2000
    snapshot_host: str = "127.0.0.1"
    snapshot_port: int = 7702
    partition: Partition | None = None
    source: str = field(default="<built-in default>")

    @property
    def replicated(self) -> bool:
        """Whether this node is one of a primary/backup pair."""
        return self.repl_peer is not None

    def segment(self, what: str) -> str:
        """Shared-memory name of one of this node's segments."""
        return f"/exposure.{self.name}.{what}"


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "node": {"name": str, "stall_ms": int},
    "capacities": {k: int for k in Capacities().as_dict()},
    "rings": {"compute": int, "tap": int, "fanout": int, "mirror": int},
    "ingest": {"host": str, "port": int, "max_sessions": int, "ack_interval_us": int,
               "sessions": str, "max_connections": int, "login_timeout_ms": int,
               "idle_timeout_ms": int, "max_output_kb": int},
    "desks": {"mode": str, "group": str},
    "fanout": {"group": str, "port": int, "interface": str, "ttl": int, "max_datagram": int,
               "heartbeat_ms": int, "refresh_rows_per_s": int, "snapshot_host": str,
               "snapshot_port": int},
    "journal": {"dir": str, "fsync": str, "interval_ms": int, "segment_mb": int},
    "snapshot": {"every_events": int, "every_s": int, "keep": int, "journal": str},
    "partition": {"cluster": str, "name": str},
    "replication": {"peer": str, "listen": str, "peer_ingest": str, "peer_snapshot": str,
                    "secret_file": str,
                    "etcd": (str, list), "etcd_prefix": str, "release": str,
                    "heartbeat_ms": int, "failover_ms": int, "alone_after_ms": int,
                    "strict": bool},
}
_PROCESS_KEYS: dict[str, type | tuple[type, ...]] = {"name": str, "stages": list, "cpu": int,
                                                     "tick_us": int,
                                                     "wait": str}


_RETIRED = {"replication.witness": "etcd is the pair's arbiter now (replication.etcd, "
                                   "replication.etcd_prefix)"}


def _check_keys(table: dict, allowed: dict, where: str) -> None:
    for k, v in table.items():
        if f"{where}{k}" in _RETIRED:
            raise ConfigError(f"{where}{k} is no longer a setting: {_RETIRED[where + k]}")
        if k not in allowed:
            raise ConfigError(f"unknown key {where}{k} (allowed: {', '.join(allowed)})")
        want = allowed[k]
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise ConfigError(f"{where}{k} = {v!r}: expected {getattr(want, '__name__', want)}")


def _port(v: int, key: str) -> int:
    if not 1 <= v <= 65535:
        raise ConfigError(f"{key} = {v}: a port is 1..65535")
    return v


def _address(v: str, key: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    try:
        ipaddress.ip_address(host)
        if not sep:
            raise ValueError
        p = int(port)
    except ValueError:
        raise ConfigError(f"{key} = {v!r}: expected IP:PORT, e.g. 127.0.0.1:7702") from None
    return host, _port(p, key)


def _is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _ingest(ing: dict, base: Path, caps: Capacities) -> dict:
    """The [ingest] keys that bound the session port and authenticate its sessions."""
    for key, lo, hi in (("max_connections", 1, 100_000), ("login_timeout_ms", 100, 600_000),
                        ("idle_timeout_ms", 6000, 86_400_000), ("max_output_kb", 4, 65536)):
        if not lo <= ing[key] <= hi:
            raise ConfigError(f"ingest.{key} = {ing[key]}: {lo}..{hi}")
    out = {k: ing[k] for k in ("max_connections", "login_timeout_ms", "idle_timeout_ms",
                               "max_output_kb")}
    if not ing["sessions"]:
        if not _is_loopback(ing["host"]):
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


def _desks(dk: dict) -> dict:
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


def _replication(rp: dict, base: Path) -> dict:
    """The [replication] keys as NodeConfig fields (empty when off); relative file names
    are relative to ``base`` (the config file's directory)."""
    if rp["release"] not in RELEASE_POLICIES:
        raise ConfigError(f"replication.release = {rp['release']!r}: one of "
                          f"{', '.join(RELEASE_POLICIES)}")
    if not rp["peer"]:
        return {}
    out = {"repl_peer": _address(rp["peer"], "replication.peer"), "release": rp["release"]}
    for key in ("listen", "secret_file", "etcd"):
        if not rp[key]:
            raise ConfigError(f"replication.{key} is required when replication.peer is set")
    out["repl_listen"] = _address(rp["listen"], "replication.listen")
    if rp["peer_ingest"]:
        out["peer_ingest"] = _address(rp["peer_ingest"], "replication.peer_ingest")
    if rp["peer_snapshot"]:
        out["peer_snapshot"] = _address(rp["peer_snapshot"], "replication.peer_snapshot")
    from exposure.net.repl import read_secret

    secret = base / os.path.expanduser(rp["secret_file"])
    try:
        read_secret(secret)
    except ValueError as e:
        raise ConfigError(f"replication.secret_file: {e}") from None
    out["secret_file"] = secret
    urls = [rp["etcd"]] if isinstance(rp["etcd"], str) else rp["etcd"]
    from exposure.pair.coord import parse_endpoint

    for u in urls:
        if not isinstance(u, str):
            raise ConfigError(f"replication.etcd = {rp['etcd']!r}: URLs as strings")
        try:
            parse_endpoint(u)
        except ValueError as e:
            raise ConfigError(f"replication.etcd: {e}") from None
    out["etcd"] = tuple(urls)
    prefix = rp["etcd_prefix"]
    if not prefix.startswith("/") or len(prefix) > 200 or not all(
            c.isalnum() or c in "/-_." for c in prefix) or prefix.rstrip("/") == "":
        raise ConfigError(f"replication.etcd_prefix = {prefix!r}: a key path such as "
                          "/exposure/pair (letters, digits, / - _ .)")
    out["etcd_prefix"] = prefix.rstrip("/")
    if not 1 <= rp["alone_after_ms"] <= 600_000:
        raise ConfigError(f"replication.alone_after_ms = {rp['alone_after_ms']}: 1..600000")
    out["alone_after_ms"], out["strict"] = rp["alone_after_ms"], rp["strict"]
    if not 1 <= rp["heartbeat_ms"] <= 10_000:
        raise ConfigError(f"replication.heartbeat_ms = {rp['heartbeat_ms']}: 1..10000")
    if not 2 * rp["heartbeat_ms"] <= rp["failover_ms"] <= 600_000:
        raise ConfigError(f"replication.failover_ms = {rp['failover_ms']}: at least two "
                          f"heartbeats ({2 * rp['heartbeat_ms']} ms) and at most 600000")
    out["heartbeat_ms"], out["failover_ms"] = rp["heartbeat_ms"], rp["failover_ms"]
    return out


def _partition(pt: dict, base: Path) -> dict:
    """[partition]: the cluster file's map and this node's index in it."""
    if not pt["cluster"]:
        if pt["name"]:
            raise ConfigError(f"partition.name = {pt['name']!r} needs partition.cluster")
        return {}
    path = base / os.path.expanduser(pt["cluster"])
    try:
        pmap = PartitionMap.load(path)
        index = pmap.index(pt["name"])
    except MapError as e:
        raise ConfigError(f"partition: {e}") from None
    return {"partition": Partition(path, pt["name"], index, pmap)}


def _parse(doc: dict, source: str) -> NodeConfig:
    base = tomllib.loads(DEFAULT_TOML)
    unknown = set(doc) - set(_SCHEMA) - {"process"}
    if unknown:
        raise ConfigError(f"unknown section [{sorted(unknown)[0]}] (allowed: "
                          f"{', '.join([*_SCHEMA, 'process'])})")
    merged: dict = {}
    for sec, allowed in _SCHEMA.items():
        t = doc.get(sec, {})
        if not isinstance(t, dict):
            raise ConfigError(f"[{sec}] must be a table")
        _check_keys(t, allowed, f"{sec}.")
        merged[sec] = {**base[sec], **t}

    name = merged["node"]["name"]
    if not name or not all(c.isalnum() or c in "-_" for c in name) or len(name) > 64:
        raise ConfigError(f"node.name = {name!r}: letters, digits, '-' and '_' only (1..64)")
    try:
        caps = Capacities.from_dict(merged["capacities"])
    except CapacityError as e:
        raise ConfigError(f"capacities: {e}") from e
    for ring, slots in merged["rings"].items():
        try:
            check_capacity(slots, EVENT_SIZE)
        except RingLayoutError as e:
            raise ConfigError(f"rings.{ring}: {e}") from e
    # an older config's ring from ingest to the journal, which reads the compute ring now
    merged["rings"].pop("tap", None)

    ing, fo = merged["ingest"], merged["fanout"]
    _port(ing["port"], "ingest.port")
    _port(fo["port"], "fanout.port")
    if ing["max_sessions"] < 1:
        raise ConfigError(f"ingest.max_sessions = {ing['max_sessions']}: at least 1")
    if not 0 <= ing["ack_interval_us"] <= 1_000_000:
        raise ConfigError(f"ingest.ack_interval_us = {ing['ack_interval_us']}: 0..1000000")
    try:
        grp = ipaddress.ip_address(fo["group"])
        ipaddress.ip_address(fo["interface"])
        ipaddress.ip_address(ing["host"])
    except ValueError as e:
        raise ConfigError(f"an address in [ingest]/[fanout] is not an IP address: {e}") from e
    here = Path(source).parent if not source.startswith("<") else Path.cwd()
    ingest_extra = _ingest(ing, here, caps)
    if not grp.is_multicast:
        raise ConfigError(f"fanout.group = {fo['group']!r} is not a multicast address")
    if not 0 <= fo["ttl"] <= 255:
        raise ConfigError(f"fanout.ttl = {fo['ttl']}: 0..255")
    if not 256 <= fo["max_datagram"] <= 65000:
        raise ConfigError(f"fanout.max_datagram = {fo['max_datagram']}: 256..65000")
    if not 10 <= fo["heartbeat_ms"] <= 60_000:
        raise ConfigError(f"fanout.heartbeat_ms = {fo['heartbeat_ms']}: 10..60000")
    if not 0 <= fo["refresh_rows_per_s"] <= 1_000_000:
        raise ConfigError(f"fanout.refresh_rows_per_s = {fo['refresh_rows_per_s']}: "
                          "0..1000000")
    if fo["snapshot_port"]:
        _port(fo["snapshot_port"], "fanout.snapshot_port")
    try:
        ipaddress.ip_address(fo["snapshot_host"])
    except ValueError as e:
        raise ConfigError(f"fanout.snapshot_host = {fo['snapshot_host']!r}: {e}") from e

    jn = merged["journal"]
    if jn["fsync"] not in FSYNC_POLICIES:
        raise ConfigError(f"journal.fsync = {jn['fsync']!r}: one of {', '.join(FSYNC_POLICIES)}")
    if not 1 <= jn["interval_ms"] <= 10_000:
        raise ConfigError(f"journal.interval_ms = {jn['interval_ms']}: 1..10000")
    if not 100 <= merged["node"]["stall_ms"] <= 3_600_000:
        raise ConfigError(f"node.stall_ms = {merged['node']['stall_ms']}: 100..3600000")
    if not 1 <= jn["segment_mb"] <= 65536:
        raise ConfigError(f"journal.segment_mb = {jn['segment_mb']}: 1..65536")
    data_dir = Path(os.path.expanduser(jn["dir"])) if jn["dir"] else Path(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")) / \
        "exposure" / name

    sn = merged["snapshot"]
    if sn["every_events"] < 0 or sn["every_s"] < 0:
        raise ConfigError(f"snapshot.every_events = {sn['every_events']}, every_s = "
                          f"{sn['every_s']}: not negative")
    if not 1 <= sn["keep"] <= 100:
        raise ConfigError(f"snapshot.keep = {sn['keep']}: 1..100")
    if sn["journal"] not in ("delete", "archive", "keep"):
        raise ConfigError(f"snapshot.journal = {sn['journal']!r}: delete, archive or keep")

    procs_raw = doc["process"] if "process" in doc else base["process"]
    if not isinstance(procs_raw, list) or not procs_raw:
        raise ConfigError("[[process]]: at least one process is needed")
    cpus = sorted(os.sched_getaffinity(0))
    procs, seen_stage, seen_name, spinners = [], {}, set(), {}
    for k, p in enumerate(procs_raw):
        where = f"process[{k}]."
        if not isinstance(p, dict):
            raise ConfigError(f"process[{k}] must be a table")
        _check_keys(p, _PROCESS_KEYS, where)
        pname = p.get("name", f"p{k}")
        if pname in seen_name:
            raise ConfigError(f"{where}name = {pname!r} is used twice")
        seen_name.add(pname)
        stages = p.get("stages")
        if not stages:
            raise ConfigError(f"{where}stages: a process runs at least one stage")
        for s in stages:
            if s not in STAGES:
                raise ConfigError(f"{where}stages: unknown stage {s!r} (stages: "
                                  f"{', '.join(STAGES)})")
            if s in seen_stage:
                raise ConfigError(f"stage {s!r} is in both process {seen_stage[s]!r} and "
                                  f"{pname!r}")
            seen_stage[s] = pname
        cpu = resolve_cpu(p.get("cpu"), where)
        wait = p.get("wait", "spin-then-block")
        if wait not in WAIT_STRATEGIES:
            raise ConfigError(f"{where}wait = {wait!r}: one of {', '.join(WAIT_STRATEGIES)}")
        if wait == "spin":
            if cpu is None:
                raise ConfigError(f"{where}wait = 'spin' needs a pinned cpu")
            if cpu in spinners:
                raise ConfigError(f"processes {spinners[cpu]!r} and {pname!r} both spin on "
                                  f"cpu {cpu}: spinners must not share a core")
            spinners[cpu] = pname
        tick = p.get("tick_us", 500)
        if not 10 <= tick <= 1_000_000:
            raise ConfigError(f"{where}tick_us = {tick}: 10..1000000")
        procs.append(ProcessSpec(pname, tuple(stages), cpu, wait, tick))
    repl = _replication(merged["replication"], here)
    if "snapshot" not in seen_stage and fo["snapshot_port"]:
        # The recovery server goes where the journal runs (never on a spinning hot path)
        # unless the map places it.
        k = next(k for k, p in enumerate(procs) if "journal" in p.stages) \
            if "journal" in seen_stage else len(procs) - 1
        procs[k] = replace(procs[k], stages=procs[k].stages + ("snapshot",))
        seen_stage["snapshot"] = procs[k].name
    missing = [s for s in STAGES if s not in seen_stage
               and (s not in OPTIONAL_STAGES or (s == "mirror" and repl))]
    if missing:
        raise ConfigError(f"stage(s) {', '.join(missing)} run in no process")
    if len(procs) > MAX_PROCESSES:
        raise ConfigError(f"{len(procs)} [[process]] tables: at most {MAX_PROCESSES}")
    if spinners and len(spinners) >= len(cpus):
        raise ConfigError(f"{len(spinners)} spinning process(es) on {len(cpus)} CPU(s): leave "
                          "one core for everything else (use wait = 'spin-then-block')")

    return NodeConfig(
        name=name, caps=caps, rings=dict(merged["rings"]), ingest_host=ing["host"],
        ingest_port=ing["port"], max_sessions=ing["max_sessions"],
        ack_interval_us=ing["ack_interval_us"], group=fo["group"],
        fanout_port=fo["port"], interface=fo["interface"], ttl=fo["ttl"],
        max_datagram=fo["max_datagram"], feed_heartbeat_ms=fo["heartbeat_ms"],
        refresh_rows_per_s=fo["refresh_rows_per_s"], snapshot_host=fo["snapshot_host"],
        snapshot_port=fo["snapshot_port"], processes=tuple(procs), data_dir=data_dir,
        fsync=jn["fsync"], fsync_interval_ms=jn["interval_ms"],
        segment_bytes=jn["segment_mb"] << 20, snapshot_every_events=sn["every_events"],
        snapshot_every_s=sn["every_s"], snapshot_keep=sn["keep"],
        snapshot_journal=sn["journal"], stall_ms=merged["node"]["stall_ms"], source=source,
        **ingest_extra, **_desks(merged["desks"]), **repl,
        **_partition(merged["partition"], here))


def resolve_cpu(cpu, where: str = "") -> int | None:
    """A ``cpu`` setting: None (not pinned), or a CPU of this machine (a negative number
    counts from the last); ConfigError naming ``where`` + ``cpu`` otherwise."""
    if cpu is None:
        return None
    if isinstance(cpu, bool) or not isinstance(cpu, int):
        raise ConfigError(f"{where}cpu = {cpu!r}: a CPU number")
    cpus = sorted(os.sched_getaffinity(0))
    if -len(cpus) <= cpu < 0:
        cpu = cpus[cpu]
    if cpu not in cpus:
        raise ConfigError(f"{where}cpu = {cpu}: this machine has CPUs "
                          f"{', '.join(map(str, cpus))}")
    return cpu


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
