"""The built-in default configuration: complete and commented, the TOML text every user
file is merged over (:mod:`exposure.config.merge`); it fits a 2-core machine with one
spinning process. Also the names the configuration knows: the stages and release policies.
"""

import tomllib

__all__ = ["DEFAULT_TOML", "STAGES", "OPTIONAL_STAGES", "RELEASE_POLICIES", "default_doc"]

# The stages of a live node, in pipeline order. Every one must run in exactly one process.
STAGES = ("ingest", "compute", "fanout", "journal", "mirror", "snapshot", "roll")
# Stages a node may leave out of its process map: the mirror, unless [replication] is on;
# the recovery server and the scheduled roll are placed where the journal runs.
OPTIONAL_STAGES = ("mirror", "snapshot", "roll")
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
ipc = true                   # producers on this host may send through shared memory: a
                             # Unix socket beside the port (abstract name, no file) where
                             # they log in and get a ring (docs/client.md); false: TCP only
ipc_ring_kb = 1024           # each IPC session's ring (a power of two, 64..1048576)

[desks]                      # who may read the tally segment (/dev/shm/exposure.<name>.tally)
mode = "0640"                # its permission bits: desks read it, nobody else writes it
group = ""                   # its group (desk users are its members); "" = the node's own

[fanout]                     # UDP multicast of tally updates
group = "239.255.77.1"
port = 7701
interface = "127.0.0.1"      # IP_MULTICAST_IF; loopback works on this machine
ttl = 1
max_datagram = 0             # bytes of one datagram (rows are packed up to this); 0 = the
                             # interface's MTU less the IP and UDP headers: 1472 on
                             # Ethernet, 8972 with jumbo frames, 65000 on loopback
heartbeat_ms = 100           # an idle feed sends a heartbeat (the last seq) this often
refresh_rows_per_s = 2000    # published rows re-sent per second in a slow cycle, while the
                             # hot path is idle, so silent rows converge (0 = off)
snapshot_host = "127.0.0.1"  # the recovery server: every row as of a gseq, over TCP
snapshot_port = 7702         # (stage "snapshot"; 0 = off). docs/feed.md
positions = true             # position rows (one per (account, instrument) cell) on the
                             # feed and in its snapshots; false: accounts, limits,
                             # instruments and sectors only (docs/feed.md)

[journal]                    # every sequenced record, on disk, before it is acknowledged
dir = ""                     # data directory; "" = ~/.local/share/exposure/<node name>
                             # (exposure run --data-dir DIR overrides)
fsync = "interval"           # batch: fsync before acknowledging | interval: every
                             # interval_ms, acknowledging after it | none: after write()
interval_ms = 2
segment_mb = 256             # segments roll at this size
prewrite_mb = 4              # zeros written ahead of the data, so a sync overwrites and
                             # commits no file size (0: plain appends). docs/performance.md
cache_mb = 256               # the newest journal kept in the page cache for its readers
                             # (snapshotter, mirror); older synced pages are dropped, so
                             # writes reuse them (0: the kernel decides). docs/performance.md

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

[currencies]                 # SPEC section 7: tallies are in the base currency; an
                             # instrument's prices in its own (docs/operations.md, Currencies)
base = "USD"                 # the base currency's code (ISO 4217 form: three capitals); id 0
ids = {}                     # the others' ids 1..255, e.g. { EUR = 1, JPY = 2, GBP = 3 }:
                             # instruments.csv's currency column and fx rates.csv use codes

[reference]                  # names for people and for the FIX gateway (docs/operations.md)
instruments = ""             # instruments.csv: symbol,instrument[,name,...]; "" = none
accounts = ""                # accounts.csv: name,account; "" = none (dump --names, top
                             # and watch show symbols and account names where set)

[day]                        # the trading day (docs/operations.md, Trading day)
roll_at = ""                 # the scheduled roll's local time "HH:MM" ("" = no scheduled
                             # roll); the roll at date D's roll_at closes trading day D
tz = "UTC"                   # its time zone (IANA: "America/New_York", "Europe/London")
weekdays = ["mon", "tue", "wed", "thu", "fri"]  # the days that roll
load_after_roll = []         # instruments/limits/positions CSVs sent right after the
                             # scheduled roll, on its session (exposure.core.loads)
keep_days = 2                # trading days whose journal stays replayable (the day in
                             # progress and the one before: ~5 GB at 20 M events a day);
                             # older segments go per [snapshot] journal. 0 = by snapshots only

[web]                        # the risk desk's page, `exposure web --config FILE`
                             # (docs/web.md); its command-line options override these
host = "127.0.0.1"           # the address it binds; beyond loopback it needs users
port = 8080
users = ""                   # the users file: who may log in and which accounts each
                             # sees; "" = none (then loopback only, everyone sees all)
tls_cert = ""                # PEM certificate and key: serve HTTPS (both or neither;
tls_key = ""                 # or a reverse proxy with TLS in front)
max_clients = 200            # browsers at once; more are refused

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
nice = -10                   # ACKs wait for this process: on the core it shares with
                             # clients that busy-poll, at nice 0 its wake-ups queued behind
                             # them for whole time slices (ACK p99 7.0 ms; at -10 4.2 ms
                             # while the disk is quiet: docs/performance.md, Acknowledgement
                             # tail). It uses about 10% of the core at 20,000 events/s.
                             # (Needs root or CAP_SYS_NICE; else a warning, inherited nice.)
"""


def default_doc() -> dict:
    """:data:`DEFAULT_TOML`, parsed (a fresh dict every call)."""
    return tomllib.loads(DEFAULT_TOML)
