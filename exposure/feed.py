"""A subscriber to the node's multicast feed: a consistent local copy of every published row.

A connectivity engine (an OMS gateway, a desk's screen, a risk check) joins the feed's
multicast group and keeps its own view of the tallies: every account row, the fund row,
every instrument and sector row (:mod:`exposure.feedwire` is the wire format). The view is
kept right through lost datagrams, late joins and node restarts or failovers:

* **merge rule**: every row carries the gseq of the event that last moved it, and within
  one epoch a row's state is a function of that gseq; so per row (kind, id) the view keeps
  the highest gseq seen (an incremental row replaces on ``>``, a refresh or snapshot row
  on ``>=``). Rows may therefore be applied in any order, from any source;
* **late join**: on start the subscriber asks the node's recovery server for a snapshot
  (TCP, in a background thread: datagrams keep flowing meanwhile and are applied by the
  same rule);
* **gaps**: incremental datagrams count 1, 2, 3, ... per epoch; a jump, or a heartbeat or
  refresh naming a seq above the last one seen, means datagrams were lost: the subscriber
  fetches a snapshot requested *after* the loss was seen (so it holds every lost row);
* **epochs**: a datagram or snapshot of a higher epoch is a new incarnation of the node
  (restart, failover): the whole view is dropped (rows of events that were never made
  durable would otherwise stay as phantoms) and rebuilt from that epoch's snapshot and
  incrementals. Datagrams of a lower epoch are ignored (counted);
* **servers**: ``snapshot`` lists the recovery servers (a pair: both nodes). One that
  answers NOT_PRIMARY, fails or serves an older epoch makes the subscriber try the next;
  BUSY and NOT_READY are retried with exponential backoff.

``state`` is ``"joining"`` until the first snapshot is applied, ``"recovering"`` while a
loss or an epoch change waits for its snapshot, else ``"live"``. Without any snapshot
server the subscriber goes live on its first datagram and can only count its gaps (the
node's slow refresh cycle still converges every row).

Example::

    from exposure.feed import Subscriber
    from exposure.types import ROW_ACCOUNT

    with Subscriber.from_config("node-a.toml") as sub:        # or Subscriber(group, port,
        for ch in sub.updates(seconds=60):                     #   snapshot=[(host, port)])
            if ch.kind == ROW_ACCOUNT and ch.breach_changed:
                print("account", ch.id, "breach", ch.prev_breach, "->", ch.row["breach"])
        print(sub.state, sub.counters, sub.fund_row())
        doc = sub.document()      # accounts, fund, instruments, sectors: as `exposure dump`

or drive it from your own loop: ``changes = sub.poll(0.05)`` (a list of :class:`Change`),
or pass ``on_change=callback`` (called as ``callback(kind, id, row)``; ``row`` is None when
an epoch change dropped the row).

The view, as numpy arrays of the feed's row dtypes (types.UPDATE_DTYPE, INSTRUMENT_ROW_DTYPE,
SECTOR_ROW_DTYPE) indexed by id: :meth:`Subscriber.table` (a row is present when its
``kind`` is not 0; ``gseq`` is the event that last moved it), :meth:`Subscriber.rows` (the
present rows only), :meth:`Subscriber.fund_row`. Everything runs on the thread that calls
:meth:`Subscriber.poll`; only snapshot fetches run on a helper thread.
"""

from __future__ import annotations

import queue
import select
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .feedwire import (
    DG_HEARTBEAT,
    DG_INCREMENTAL,
    DG_REFRESH,
    DG_TYPES,
    DGRAM_HEADER,
    DGRAM_MAGIC,
    FEED_VERSION,
    SNAP_BUSY,
    SNAP_HEADER,
    SNAP_NOT_PRIMARY,
    SNAP_NOT_READY,
    SNAP_OK,
    Snapshot,
    open_receiver,
    parse_snapshot_header,
    snapshot_request,
)
from .types import (
    INSTRUMENT_ROW_DTYPE,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_SECTOR,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)

__all__ = ["Subscriber", "Change", "SnapshotError", "fetch_snapshot", "COUNTERS", "STATES"]

STATES = ("joining", "recovering", "live")
# What :attr:`Subscriber.counters` holds.
COUNTERS = (
    "datagrams",            # received from the socket (dropped and bad ones included)
    "incrementals",         # INCREMENTAL datagrams processed
    "refreshes",            # REFRESH datagrams processed
    "heartbeats",           # HEARTBEAT datagrams processed
    "gaps",                 # losses detected (a seq jump, or a heartbeat/refresh seq ahead)
    "missed",               # incremental seqs that never arrived before a later one did
    "recoveries",           # snapshots applied
    "epoch_changes",        # views dropped for a higher epoch
    "stale_epoch",          # datagrams of a lower epoch than the view's, ignored
    "bad_datagrams",        # datagrams that do not parse (feedwire.parse_datagram)
    "bad_rows",             # rows whose id is outside the view's bounds, ignored
    "dropped",              # datagrams discarded on purpose (drop_every)
    "snapshot_requests",    # connections to a recovery server
    "snapshot_errors",      # of them: failed (refused, timed out, malformed)
    "snapshot_not_primary", # of them: answered NOT_PRIMARY (the next server is tried)
    "snapshot_busy",        # of them: answered BUSY or NOT_READY (retried with backoff)
    "snapshot_stale",       # snapshots of a lower epoch than the view's, ignored
)

_ACC_FLOATS = ("long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
               "worst_gross", "margin", "beta_net", "pnl")
_DTYPES = {ROW_ACCOUNT: UPDATE_DTYPE, ROW_FUND: UPDATE_DTYPE,
           ROW_INSTRUMENT: INSTRUMENT_ROW_DTYPE, ROW_SECTOR: SECTOR_ROW_DTYPE}
_IDS = {ROW_ACCOUNT: "account", ROW_FUND: "account", ROW_INSTRUMENT: "instrument",
        ROW_SECTOR: "sector"}
_KINDS = (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR)
# Bytes of a row compared to tell a change from a re-send of the same state: the breach
# byte and the body up to the kind's last field (the head's tags differ between an event's
# row and a refresh's; the padding after the last field is not state, and numpy's copies
# of a dtype with gaps leave it undefined).
_BODY = {k: slice(56, max(o + dt.itemsize for dt, o in (v[:2] for v in d.fields.values())))
         for k, d in _DTYPES.items()}
_HDR = DGRAM_HEADER.size


class Change(NamedTuple):
    """One row of the view that changed: ``kind`` (types.ROW_*), ``id`` (account,
    instrument or sector id; -1 for the fund), ``row`` (a copy, in the kind's dtype; None
    when an epoch change dropped it) and ``prev_breach`` (the row's breach bits in the view
    before this change: 0 when it was absent)."""

    kind: int
    id: int
    row: np.void | None
    prev_breach: int = 0

    @property
    def breach_changed(self) -> bool:
        """Whether an account's breach bits differ from what the view held before (a
        breach that started or ended), however the change arrived (an incremental, a
        refresh, a snapshot after a loss). ``row["breach_prev"]`` is the node's own
        previous bits of an incremental row."""
        now = 0 if self.row is None else int(self.row["breach"])
        return now != self.prev_breach


class SnapshotError(Exception):
    """A recovery server that could not be reached or answered something malformed."""


# ----------------------------------------------------------------------------- snapshots
def _recv_exact(s: socket.socket, buf: memoryview, deadline: float) -> None:
    got = 0
    while got < len(buf):
        if time.monotonic() > deadline:
            raise SnapshotError("timed out reading the snapshot")
        n = s.recv_into(buf[got:])
        if n == 0:
            raise SnapshotError(f"connection closed after {got} of {len(buf)} bytes")
        got += n


def fetch_snapshot(addr: tuple[str, int], timeout: float = 5.0, max_rows: int = 1 << 22,
                   hold: Callable[[socket.socket | None], None] | None = None) -> Snapshot:
    """One snapshot from the recovery server at ``addr`` (blocking: connect, request,
    header, rows until EOF). A status other than SNAP_OK comes back as a Snapshot with
    that status and no rows. ``timeout`` bounds each socket operation; the whole transfer
    gets ``4 * timeout`` plus a second per 320,000 rows. Raises :class:`SnapshotError`
    (with the reason) on a refused connection, a timeout or a malformed answer, including
    more than ``max_rows`` rows or a row of unknown kind. ``hold``: called with the
    connected socket, then with None, so that another thread may shut it down (cancel)."""
    start = time.monotonic()
    try:
        s = socket.create_connection(addr, timeout=timeout)
    except OSError as e:
        raise SnapshotError(f"{addr[0]}:{addr[1]}: {e.strerror or e}") from e
    if hold is not None:
        hold(s)
    try:
        s.sendall(snapshot_request())
        hdr = bytearray(SNAP_HEADER.size)
        _recv_exact(s, memoryview(hdr), start + 4 * timeout)
        epoch, gseq, count, status, taken = parse_snapshot_header(hdr)
        if status != SNAP_OK:
            return Snapshot(epoch, gseq, status, taken, np.zeros(0, UPDATE_DTYPE))
        if count > max_rows:
            raise SnapshotError(f"a snapshot of {count} rows (at most {max_rows} expected)")
        body = bytearray(count * ROW_SIZE)
        _recv_exact(s, memoryview(body), start + 4 * timeout + count / 320_000)
        if s.recv(1):
            raise SnapshotError(f"more than the {count} rows its header announced")
        rows = np.frombuffer(body, UPDATE_DTYPE)
        if count and not np.isin(rows["kind"], _KINDS).all():
            raise SnapshotError("a snapshot row of unknown kind")
        return Snapshot(epoch, gseq, status, taken, rows)
    except (OSError, ValueError) as e:  # socket errors, timeouts, a header that is not one
        raise SnapshotError(f"{addr[0]}:{addr[1]}: {getattr(e, 'strerror', None) or e}") \
            from e
    finally:
        if hold is not None:
            hold(None)
        s.close()


class _Fetched(NamedTuple):
    gen: int          # the subscriber's loss generation when the fetch started
    server: int       # index of the server that answered
    snap: Snapshot


class _Fetcher(threading.Thread):
    """Fetches one SNAP_OK snapshot, trying the servers in turn from ``first`` and backing
    off between rounds; hands it to the subscriber (a queue) and wakes its poll."""

    def __init__(self, sub: Subscriber, gen: int, first: int, delay: float):
        super().__init__(name="exposure-feed-snapshot", daemon=True)
        self.sub, self.gen, self.first, self.delay = sub, gen, first, delay
        self.stop = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def _hold(self, s: socket.socket | None) -> None:
        with self._lock:
            self._sock = s
            if s is not None and self.stop.is_set():  # cancelled while connecting
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cancel(self) -> None:
        self.stop.set()
        with self._lock:
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def run(self) -> None:
        sub = self.sub
        ctr = sub._ctr
        servers = sub.servers
        backoff = sub.backoff[0]
        if self.delay and self.stop.wait(self.delay):
            return
        while not self.stop.is_set():
            for k in range(len(servers)):
                if self.stop.is_set():
                    return
                i = (self.first + k) % len(servers)
                ctr["snapshot_requests"] += 1
                try:
                    snap = fetch_snapshot(servers[i], sub.snapshot_timeout, sub.max_rows,
                                          self._hold)
                except SnapshotError as e:
                    ctr["snapshot_errors"] += 1
                    sub.last_snapshot_error = str(e)
                    continue
                if snap.status == SNAP_OK:
                    sub._fetched.put(_Fetched(self.gen, i, snap))
                    sub._wake()
                    return
                if snap.status == SNAP_NOT_PRIMARY:
                    ctr["snapshot_not_primary"] += 1
                elif snap.status in (SNAP_BUSY, SNAP_NOT_READY):
                    ctr["snapshot_busy"] += 1
                h, p = servers[i]
                sub.last_snapshot_error = f"{h}:{p}: " + (
                    "not primary" if snap.status == SNAP_NOT_PRIMARY else
                    "busy" if snap.status == SNAP_BUSY else "not ready")
            if self.stop.wait(backoff):
                return
            backoff = min(2 * backoff, sub.backoff[1])


# ----------------------------------------------------------------------------- subscriber
class Subscriber:
    """A live, self-healing copy of one node's (or one pair's) published rows.

    ``group``/``port``/``interface``: the feed (config ``[fanout]``). ``snapshot``: the
    recovery servers, ``[(host, port), ...]`` (a pair: both nodes; empty: no recovery).
    ``drop_every``: discard every Nth datagram on receipt (a demonstration of recovery;
    0 = off). ``on_change(kind, id, row)``: called from :meth:`poll` for every change.
    ``accounts``/``instruments``/``sectors``: id bounds (the node's capacities; rows beyond
    them are counted in ``bad_rows``); the tables grow on demand up to them. A snapshot
    holds at most one row per id, which bounds what a fetch may allocate.
    ``snapshot_timeout``: seconds per socket operation of a fetch; ``backoff``: (first,
    most) seconds between rounds over the servers when none gave a snapshot.
    ``join_wait``: on start, how long to wait for a first datagram before fetching the join
    snapshot anyway (fetching after the first datagram makes one snapshot enough; the feed
    heartbeats every 100 ms). ``max_batch``: datagrams taken per :meth:`poll`.
    """

    def __init__(self, group: str, port: int, interface: str = "127.0.0.1",
                 snapshot: Sequence[tuple[str, int]] = (), drop_every: int = 0, *,
                 on_change: Callable[[int, int, np.void | None], None] | None = None,
                 accounts: int = 4096, instruments: int = 65536, sectors: int = 256,
                 snapshot_timeout: float = 2.0, backoff: tuple[float, float] = (0.05, 2.0),
                 join_wait: float = 0.25, max_batch: int = 1024):
        if drop_every < 0:
            raise ValueError(f"drop_every = {drop_every}: 0 (off) or N >= 1")
        self.group, self.port, self.interface = group, port, interface
        self.servers: list[tuple[str, int]] = [(str(h), int(p)) for h, p in snapshot]
        self.drop_every = drop_every
        self.on_change = on_change
        self.snapshot_timeout = snapshot_timeout
        self.backoff = backoff
        self.join_wait = join_wait
        self.max_batch = max_batch
        self._bounds = {ROW_ACCOUNT: accounts, ROW_FUND: 1, ROW_INSTRUMENT: instruments,
                        ROW_SECTOR: sectors}
        self.max_rows = accounts + instruments + sectors + 1
        self._tables = {ROW_ACCOUNT: np.zeros(min(accounts, 1024), UPDATE_DTYPE),
                        ROW_FUND: np.zeros(1, UPDATE_DTYPE),
                        ROW_INSTRUMENT: np.zeros(min(instruments, 4096), INSTRUMENT_ROW_DTYPE),
                        ROW_SECTOR: np.zeros(min(sectors, 256), SECTOR_ROW_DTYPE)}
        self._ctr: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.epoch = 0              # the view's epoch (0: none seen yet)
        self.seq: int | None = None  # the last incremental seq of this epoch (None: none yet)
        self.gseq = 0               # the highest gseq applied in this epoch
        self.snapshot_gseq = 0      # the gseq of the last snapshot applied
        self.last_snapshot_error = ""
        self.last_datagram = 0.0    # time.monotonic() of the last datagram (0: none)
        # Loss generations: every loss (or a first datagram of an epoch) asks for a snapshot
        # fetched after it; a snapshot fetch started at generation g satisfies up to g.
        self._want = 0
        self._done = 0
        self._joined = False        # a first snapshot (or, serverless, datagram) applied
        self._fetcher: _Fetcher | None = None
        self._fetched: queue.SimpleQueue[_Fetched] = queue.SimpleQueue()
        self._next_server = 0
        self._retry_delay = 0.0
        self._stale_backoff = 0.0
        self._join_at = time.monotonic() + join_wait
        self._closed = False
        self._buf = bytearray(65536)
        self._pend: dict[bool, list[bytes]] = {False: [], True: []}
        self._wr, self._ww = socket.socketpair()
        self._wr.setblocking(False)
        self._ww.setblocking(False)
        try:
            self.sock = open_receiver(group, port, interface)
        except OSError:
            self._wr.close()
            self._ww.close()
            raise
        if sys.platform == "linux":  # only this socket's groups (Linux otherwise delivers
            try:                     # every group any socket joined, on this port)
                self.sock.setsockopt(socket.IPPROTO_IP,
                                     getattr(socket, "IP_MULTICAST_ALL", 49), 0)
            except OSError:
                pass
        self.sock.setblocking(False)

    @classmethod
    def from_config(cls, config=None, **kw) -> Subscriber:
        """A subscriber to the node that ``config`` describes: a path to its TOML, a
        loaded ``NodeConfig``, or None for the built-in default. Its ``[fanout]`` group,
        port, interface and recovery server (``snapshot_host``/``snapshot_port``), in a
        pair also ``[replication] peer_snapshot``, and its capacities as id bounds."""
        from .config import NodeConfig, load_config

        cfg = config if isinstance(config, NodeConfig) else load_config(
            None if config is None else Path(config))
        servers = []
        if cfg.snapshot_port:
            servers.append((cfg.snapshot_host, cfg.snapshot_port))
        if cfg.peer_snapshot:
            servers.append(tuple(cfg.peer_snapshot))
        kw.setdefault("accounts", cfg.caps.accounts)
        kw.setdefault("instruments", cfg.caps.instruments)
        kw.setdefault("sectors", cfg.caps.sectors)
        return cls(cfg.group, cfg.fanout_port, cfg.interface, snapshot=servers, **kw)

    # ------------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """``"joining"``, ``"recovering"`` or ``"live"`` (see the module's docstring)."""
        if not self._joined:
            return "joining"
        return "live" if self._done >= self._want or not self.servers else "recovering"

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters (:data:`COUNTERS` names and explains them)."""
        return dict(self._ctr)

    @property
    def closed(self) -> bool:
        return self._closed

    def table(self, kind: int) -> np.ndarray:
        """The view's whole table of one kind (types.ROW_*), indexed by id (the fund: one
        row), in the kind's feed dtype; a row is present when its ``kind`` is not 0. A
        read-only view: copy what you keep across :meth:`poll` calls."""
        t = self._tables[kind].view()
        t.flags.writeable = False
        return t

    def present(self, kind: int) -> np.ndarray:
        """The ids of the rows of ``kind`` the view holds, ascending."""
        return np.flatnonzero(self._tables[kind]["kind"] != 0)

    def rows(self, kind: int) -> np.ndarray:
        """A copy of the present rows of ``kind``, ascending by id."""
        t = self._tables[kind]
        return t[t["kind"] != 0]

    @property
    def accounts(self) -> np.ndarray:
        """A copy of every account row the view holds (UPDATE_DTYPE), by account id."""
        return self.rows(ROW_ACCOUNT)

    @property
    def instruments(self) -> np.ndarray:
        """A copy of every instrument row (INSTRUMENT_ROW_DTYPE), by instrument id."""
        return self.rows(ROW_INSTRUMENT)

    @property
    def sectors(self) -> np.ndarray:
        """A copy of every sector row (SECTOR_ROW_DTYPE), by sector id."""
        return self.rows(ROW_SECTOR)

    def account(self, account: int) -> np.void | None:
        """A copy of one account's row, or None when the view has none."""
        t = self._tables[ROW_ACCOUNT]
        if 0 <= account < len(t) and t["kind"][account]:
            return t[account].copy()
        return None

    def fund_row(self) -> np.void | None:
        """A copy of the fund row (UPDATE_DTYPE, with net_long_mv/net_short_mv), or None."""
        t = self._tables[ROW_FUND]
        return t[0].copy() if t["kind"][0] else None

    def breaches(self) -> np.ndarray:
        """The ids of the accounts whose breach bits are not 0."""
        t = self._tables[ROW_ACCOUNT]
        return np.flatnonzero((t["kind"] != 0) & (t["breach"] != 0))

    def fund(self) -> dict:
        """The SPEC document's ``fund`` (zeros before any fund row), with ``crossing``."""
        r = self.fund_row()
        if r is None:
            out: dict = dict.fromkeys(_ACC_FLOATS, 0.0)
            out.update(live_orders=0, net_long_mv=0.0, net_short_mv=0.0, crossing=0.0)
            return out
        out = {k: float(r[k]) for k in _ACC_FLOATS}
        out["live_orders"] = int(r["live_orders"])
        out["net_long_mv"] = float(r["net_long_mv"])
        out["net_short_mv"] = float(r["net_short_mv"])
        out["crossing"] = out["gross"] - (out["net_long_mv"] + out["net_short_mv"])
        return out

    def document(self) -> dict:
        """The view as the SPEC document's ``accounts``, ``fund``, ``instruments`` and
        ``sectors`` (what ``exposure dump`` prints for them; rows never seen are left out,
        which a reader takes as zeros). The feed carries no positions or counts."""
        a = self.accounts
        accounts = _records(a, "account", {**{k: a[k] for k in _ACC_FLOATS},
                                           "live_orders": a["live_orders"],
                                           "breach": a["breach"].astype(np.int64)})
        i = self.instruments
        instruments = _records(i, "instrument", {k: i[k] for k in
                                                 ("ref_price", "fund_pos", "open_buy",
                                                  "open_sell")})
        s = self.sectors
        sectors = _records(s, "sector", {"net_mv": s["net_mv"], "gross_mv": s["gross_mv"]})
        return {"accounts": accounts, "fund": self.fund(), "instruments": instruments,
                "sectors": sectors}

    # ------------------------------------------------------------------------ polling
    def poll(self, timeout: float | None = 0.0) -> list[Change]:
        """Take what has arrived: up to ``max_batch`` datagrams and any completed
        snapshot; if nothing had, wait up to ``timeout`` seconds (None: until something
        arrives) and take what came. Returns the view's changes, in order."""
        if self._closed:
            raise ValueError("poll on a closed Subscriber")
        changes: list[Change] = []
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._service(changes):
                break
            now = time.monotonic()
            if end is not None and now >= end:
                break
            wait = None if end is None else end - now
            if self._fetcher is None and self._want == 0 and self.servers:
                w = max(0.0, self._join_at - now)  # the join snapshot's deadline
                wait = w if wait is None else min(wait, w)
            try:
                select.select([self.sock, self._wr], [], [], wait)
            except InterruptedError:
                pass
        if self.on_change is not None:
            for c in changes:
                self.on_change(c.kind, c.id, c.row)
        return changes

    def updates(self, seconds: float | None = None, timeout: float = 0.1) -> Iterator[Change]:
        """Every change, as it comes, for ``seconds`` (None: until :meth:`close`)."""
        end = None if seconds is None else time.monotonic() + seconds
        while not self._closed:
            left = timeout if end is None else min(timeout, end - time.monotonic())
            if left < 0:
                return
            yield from self.poll(left)

    def run_for(self, seconds: float) -> None:
        """Poll (discarding the change list) for ``seconds``."""
        for _ in self.updates(seconds):
            pass

    def _service(self, changes: list[Change]) -> int:
        """One round: completed snapshots, datagrams, then a fetch if one is due. Returns
        how many datagrams and snapshots it took."""
        did = 0
        try:
            while self._wr.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                f = self._fetched.get_nowait()
            except queue.Empty:
                break
            self._fetcher = None
            self._apply_snapshot(f, changes)
            did += 1
        did += self._receive(changes)
        self._maybe_fetch()
        return did

    def _wake(self) -> None:
        try:
            self._ww.send(b"x")
        except OSError:
            pass

    def _maybe_fetch(self) -> None:
        if not self.servers or self._fetcher is not None or self._closed:
            return
        if self._want == 0:
            if time.monotonic() < self._join_at:
                return
            self._want = 1  # no datagram yet: fetch the join snapshot anyway
        if self._done >= self._want:
            return
        self._fetcher = _Fetcher(self, self._want, self._next_server, self._retry_delay)
        self._retry_delay = 0.0
        self._fetcher.start()

    # ------------------------------------------------------------------------ datagrams
    def _receive(self, changes: list[Change]) -> int:
        ctr = self._ctr
        buf = self._buf
        mv = memoryview(buf)
        n_taken = 0
        while n_taken < self.max_batch:
            try:
                n = self.sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # an ICMP error reported on the socket: not a datagram
                break
            n_taken += 1
            ctr["datagrams"] += 1
            self.last_datagram = time.monotonic()
            if self.drop_every and ctr["datagrams"] % self.drop_every == 0:
                ctr["dropped"] += 1
                continue
            hdr = _check_datagram(mv, n)
            if hdr is None:
                ctr["bad_datagrams"] += 1
                continue
            self._datagram(*hdr, mv, n, changes)
        for replace_equal in (False, True):  # the batch's rows, merged in one pass each
            pend = self._pend[replace_equal]
            if pend:
                rows = np.frombuffer(b"".join(pend), UPDATE_DTYPE)
                pend.clear()
                self._merge(rows, replace_equal, changes)
        return n_taken

    def _datagram(self, epoch: int, seq: int, dtype: int, count: int, mv: memoryview, n: int,
                  changes: list[Change]) -> None:
        ctr = self._ctr
        if epoch < self.epoch:
            ctr["stale_epoch"] += 1
            return
        if epoch > self.epoch:
            self._new_epoch(epoch, changes)
        if dtype == DG_INCREMENTAL:
            ctr["incrementals"] += 1
        elif dtype == DG_REFRESH:
            ctr["refreshes"] += 1
        else:
            ctr["heartbeats"] += 1
        if self.seq is None:
            # The first datagram of this epoch: whatever was lost before it is invisible
            # to seq checks, so the view needs a snapshot fetched after it.
            self.seq = seq
            self._want += 1
        elif dtype == DG_INCREMENTAL:
            if seq > self.seq + 1:
                ctr["gaps"] += 1
                ctr["missed"] += seq - self.seq - 1
                self._want += 1
            self.seq = max(self.seq, seq)
        elif seq > self.seq:  # a heartbeat or refresh naming incrementals never seen
            ctr["gaps"] += 1
            ctr["missed"] += seq - self.seq
            self._want += 1
            self.seq = seq
        if not self.servers:
            self._joined = True
        if dtype != DG_HEARTBEAT and count:
            # Merged at the end of the batch (the rule is order-free); a copy: the receive
            # buffer is reused.
            self._pend[dtype == DG_REFRESH].append(bytes(mv[_HDR:n]))

    def _new_epoch(self, epoch: int, changes: list[Change]) -> None:
        """Follow ``epoch`` (higher than the view's): drop the whole view."""
        if self.epoch:
            self._ctr["epoch_changes"] += 1
            for kind in _KINDS:
                t = self._tables[kind]
                ids = np.flatnonzero(t["kind"] != 0)
                if kind == ROW_FUND:
                    changes.extend(Change(kind, -1, None, int(t["breach"][0])) for _ in ids)
                else:
                    br = t["breach"][ids].tolist()
                    changes.extend(Change(kind, i, None, b)
                                   for i, b in zip(ids.tolist(), br, strict=True))
                t.view(np.uint8)[:] = 0
        for pend in self._pend.values():  # rows of the older epoch not merged yet
            pend.clear()
        self.epoch = epoch
        self.seq = None
        self.gseq = 0
        self.snapshot_gseq = 0

    # ------------------------------------------------------------------------ merging
    def _grow(self, kind: int, top: int) -> None:
        t = self._tables[kind]
        if top < len(t):
            return
        size = len(t)
        while size <= top:
            size *= 2
        bigger = np.zeros(min(size, self._bounds[kind]), t.dtype)
        bigger[:len(t)] = t
        self._tables[kind] = bigger

    def _merge(self, rows: np.ndarray, replace_equal: bool, changes: list[Change]) -> None:
        """Apply ``rows`` (UPDATE_DTYPE, any kinds, any order) by the per-row gseq rule:
        a row replaces the view's when its gseq is higher (``replace_equal``: or equal).
        A row that would replace one of the same gseq and the same state is not written,
        so the view keeps the event's tags (session, times) rather than a refresh's."""
        kinds = rows["kind"]
        for kind in _KINDS:
            m = kinds == kind
            if not m.any():
                continue
            r = rows[m].view(_DTYPES[kind])
            ids = r[_IDS[kind]].astype(np.int64)
            if kind == ROW_FUND:
                ok = ids == -1
                idx = np.zeros(len(ids), np.int64)
            else:
                ok = (ids >= 0) & (ids < self._bounds[kind])
                idx = ids
            if not ok.all():
                self._ctr["bad_rows"] += int((~ok).sum())
                r, idx = r[ok], idx[ok]
                if not len(r):
                    continue
            if len(r) > 1:  # one row per id: the highest gseq (the last of equals)
                order = np.lexsort((r["gseq"], idx))
                si = idx[order]
                last = np.ones(len(si), bool)
                last[:-1] = si[1:] != si[:-1]
                keep = order[last]
                r, idx = r[keep], idx[keep]
            self._grow(kind, int(idx.max()))
            t = self._tables[kind]
            cur = t[idx]
            had = cur["kind"] != 0
            gnew, gcur = r["gseq"], cur["gseq"]
            rb = r.view(np.uint8).reshape(-1, ROW_SIZE)
            cb = cur.view(np.uint8).reshape(-1, ROW_SIZE)
            newer = gnew > gcur
            if replace_equal:
                same_g = gnew == gcur
                if same_g.any():  # equal gseq: written only when the state differs
                    body = _BODY[kind]
                    newer |= same_g & ((rb[:, 1] != cb[:, 1])
                                       | (rb[:, body] != cb[:, body]).any(axis=1))
            sel = np.flatnonzero(~had | newer)
            if not len(sel):
                continue
            new = r[sel]  # its own array: the Change rows never move after this
            t[idx[sel]] = new
            self.gseq = max(self.gseq, int(new["gseq"].max()))
            prev = np.where(had[sel], cur["breach"][sel], 0).tolist()
            out_ids = [-1] * len(sel) if kind == ROW_FUND else idx[sel].tolist()
            changes.extend(map(Change, [kind] * len(sel), out_ids, new, prev))

    def _apply_snapshot(self, f: _Fetched, changes: list[Change]) -> None:
        snap = f.snap
        if self.epoch and snap.epoch < self.epoch:
            # An older incarnation's server (a deposed primary, a stale node): the other.
            self._ctr["snapshot_stale"] += 1
            h, p = self.servers[f.server]
            self.last_snapshot_error = (f"{h}:{p}: a snapshot of epoch {snap.epoch}, "
                                        f"older than the feed's {self.epoch}")
            self._next_server = (f.server + 1) % len(self.servers)
            self._stale_backoff = min(2 * self._stale_backoff, self.backoff[1]) \
                if self._stale_backoff else self.backoff[0]
            self._retry_delay = self._stale_backoff
            return
        if snap.epoch > self.epoch:
            # A newer incarnation than any datagram seen: follow it. No datagram of it has
            # arrived yet, so none was lost: this snapshot and what follows are the view.
            self._new_epoch(snap.epoch, changes)
        self._merge(snap.rows, True, changes)
        self._ctr["recoveries"] += 1
        self.snapshot_gseq = snap.gseq
        self._next_server = f.server
        self._stale_backoff = 0.0
        self._done = max(self._done, f.gen)
        self._joined = True

    # ------------------------------------------------------------------------ closing
    def close(self) -> None:
        """Stop a snapshot fetch, leave the group, close the sockets (idempotent)."""
        if self._closed:
            return
        self._closed = True
        f = self._fetcher
        if f is not None:
            f.cancel()
            f.join(timeout=self.snapshot_timeout + 1.0)
        self._fetcher = None
        for s in (self.sock, self._wr, self._ww):
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"<Subscriber {self.group}:{self.port} epoch {self.epoch} {self.state} "
                f"seq {self.seq} gseq {self.gseq}>")

    def describe(self) -> str:
        """One line: epoch, state, fund gross/net/crossing and the main counters."""
        f = self.fund()
        c = self._ctr
        return (f"epoch {self.epoch} {self.state:<10} seq {self.seq or 0} gseq {self.gseq} "
                f"| gross {f['gross']:.2f} net {f['net']:.2f} crossing {f['crossing']:.2f} "
                f"| dg {c['datagrams']} inc {c['incrementals']} ref {c['refreshes']} "
                f"hb {c['heartbeats']} gaps {c['gaps']} rec {c['recoveries']} "
                f"epochs {c['epoch_changes']} stale {c['stale_epoch']} "
                f"bad {c['bad_datagrams']} dropped {c['dropped']}")


def _check_datagram(mv: memoryview, n: int) -> tuple[int, int, int, int] | None:
    """(epoch, seq, type, count) of a valid datagram (what feedwire.parse_datagram
    accepts), else None. Rows are checked by their kind byte alone: parse_datagram's
    ``np.isin`` costs some 70 us a datagram, this about 1."""
    if n < _HDR:
        return None
    magic, epoch, seq, w16, w20, _ = DGRAM_HEADER.unpack_from(mv)
    count, dtype, version, row_size = w16 & 0xFFFF, (w16 >> 16) & 0xFF, w16 >> 24, w20 & 0xFFFF
    if (magic != DGRAM_MAGIC or version != FEED_VERSION or dtype not in DG_TYPES
            or row_size != ROW_SIZE or n != _HDR + count * ROW_SIZE):
        return None
    if count:
        kinds = bytes(mv[_HDR:n:ROW_SIZE])
        if min(kinds) < ROW_ACCOUNT or max(kinds) > ROW_SECTOR:
            return None
    return epoch, seq, dtype, count


def _records(rows: np.ndarray, idname: str, cols: dict[str, np.ndarray]) -> list[dict]:
    keys = [idname, *cols]
    columns = [rows[idname].astype(np.int64).tolist(), *(c.tolist() for c in cols.values())]
    return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]

