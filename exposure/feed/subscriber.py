"""A subscriber to the node's multicast feed: a consistent local copy of every published row.

A connectivity engine (an OMS gateway, a desk's screen, a risk check) joins the feed's
multicast group and keeps its own view of the tallies: every account row, the fund row,
every instrument and sector row, every position cell and every account's limits (feed
version 4; :mod:`exposure.feed.wire` is the wire format). The view is
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

    from exposure.feed.subscriber import Subscriber
    from exposure.core.types import ROW_ACCOUNT

    with Subscriber.from_config("node-a.toml") as sub:        # or Subscriber(group, port,
        for ch in sub.updates(seconds=60):                     #   snapshot=[(host, port)])
            if ch.kind == ROW_ACCOUNT and ch.breach_changed:
                print("account", ch.id, "breach", ch.prev_breach, "->", ch.row["breach"])
        print(sub.state, sub.counters, sub.fund_row())
        doc = sub.document()      # accounts, fund, instruments, sectors, positions: as
                                  # `exposure dump`
        sub.positions(7)          # account 7's position rows; sub.limits(7): its limits

or drive it from your own loop: ``changes = sub.poll(0.05)`` (a list of :class:`Change`),
or pass ``on_change=callback`` (called as ``callback(kind, id, row)``; ``row`` is None when
an epoch change dropped the row).

The view, as numpy arrays of the feed's row dtypes (types.UPDATE_DTYPE, INSTRUMENT_ROW_DTYPE,
SECTOR_ROW_DTYPE, POSITION_ROW_DTYPE by the node's cell id, LIMITS_ROW_DTYPE by account)
indexed by id: :meth:`Subscriber.table` (a row is present when its
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

from exposure.core.currency import Currencies
from exposure.core.jit import entry
from exposure.core.refdata import RefData
from exposure.core.types import (
    INSTRUMENT_ROW_DTYPE,
    LIMITS_ROW_DTYPE,
    POSITION_ROW_DTYPE,
    ROW_ACCOUNT,
    ROW_DTYPES,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SECTOR,
    ROW_SIZE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.publish import position_values
from exposure.feed.merge import (
    BODY,
    I_GSEQ,
    I_START,
    INFO,
    ROW_WORDS,
    S_EPOCH,
    S_INC,
    S_JOINED,
    S_NEXT_EPOCH,
    S_REF,
    S_SEQ,
    S_WANT,
    SCAN_COUNTERS,
    SCAN_STATE,
    merge_rows,
    scan_datagrams,
    words,
)
from exposure.feed.wire import (
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
from exposure.net.liveness import silent
from exposure.net.mmsg import BatchReceiver

__all__ = ["Subscriber", "Change", "Rows", "SnapshotError", "fetch_snapshot", "COUNTERS",
           "STATES"]

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
_DTYPES = ROW_DTYPES
_KINDS = (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR, ROW_POSITION, ROW_LIMITS)
_LIMIT_FIELDS = ("gross_limit", "net_limit", "margin_limit", "loss_limit")
_SLOTS = 32          # datagrams taken per receive call
_SLOT = 65536        # bytes a datagram may have


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


class Rows(NamedTuple):
    """The view's changed rows of one kind, as arrays (what :meth:`Subscriber.poll_rows`
    returns; :meth:`Subscriber.poll` makes a :class:`Change` of each): ``kind``
    (types.ROW_*), ``ids`` (int64, ascending; the fund: -1), ``rows`` (their new rows, a
    copy in the kind's dtype; None when an epoch change dropped them) and ``prev`` (int64:
    each row's breach bits in the view before, 0 when it was absent)."""

    kind: int
    ids: np.ndarray
    rows: np.ndarray | None
    prev: np.ndarray


def _changes(batches: list[Rows]) -> list[Change]:
    out: list[Change] = []
    for b in batches:
        n = len(b.ids)
        rows = [None] * n if b.rows is None else b.rows
        out.extend(map(Change, [b.kind] * n, b.ids.tolist(), rows, b.prev.tolist()))
    return out


class SnapshotError(Exception):
    """A recovery server that could not be reached or answered something malformed."""


# ----------------------------------------------------------------------------- snapshots
def _recv_exact(s: socket.socket, buf: memoryview, deadline: float, silence: float) -> None:
    """Fill ``buf``; a server silent for ``silence`` s (the liveness rule,
    :mod:`exposure.net.liveness`) or past ``deadline`` (monotonic) is given up. Every wait
    is bounded by both."""
    got = 0
    while got < len(buf):
        left = deadline - time.monotonic()
        if left <= 0:
            raise SnapshotError(f"timed out reading the snapshot ({got} of {len(buf)} "
                                f"bytes)")
        s.settimeout(min(silence, left))
        try:
            n = s.recv_into(buf[got:])
        except TimeoutError:
            if left <= silence:
                continue  # (the deadline: said above)
            raise SnapshotError(f"the server has been silent for {silence:g} s ({got} of "
                                f"{len(buf)} bytes)") from None
        if n == 0:
            raise SnapshotError(f"connection closed after {got} of {len(buf)} bytes")
        got += n


def fetch_snapshot(addr: tuple[str, int], timeout: float = 5.0, max_rows: int = 1 << 22,
                   hold: Callable[[socket.socket | None], None] | None = None) -> Snapshot:
    """One snapshot from the recovery server at ``addr`` (blocking: connect, request,
    header, rows until EOF). A status other than SNAP_OK comes back as a Snapshot with
    that status and no rows. ``timeout`` is the liveness bound (:mod:`exposure.net.liveness`):
    the connect, and every wait for the server's bytes, gives up after it (a hung or
    SIGSTOPped server, whose kernel still accepts the connection, is given up ``timeout``
    after the last byte it sent); the whole transfer gets ``4 * timeout`` plus a second per
    320,000 rows, whatever the server trickles. Raises :class:`SnapshotError`
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
        s.sendall(snapshot_request())  # (16 bytes: the socket buffer takes them)
        hdr = bytearray(SNAP_HEADER.size)
        _recv_exact(s, memoryview(hdr), start + 4 * timeout, timeout)
        epoch, gseq, count, status, taken = parse_snapshot_header(hdr)
        if status != SNAP_OK:
            return Snapshot(epoch, gseq, status, taken, np.zeros(0, UPDATE_DTYPE))
        if count > max_rows:
            raise SnapshotError(f"a snapshot of {count} rows (at most {max_rows} expected)")
        body = bytearray(count * ROW_SIZE)
        end = start + 4 * timeout + count / 320_000
        _recv_exact(s, memoryview(body), end, timeout)
        s.settimeout(max(0.001, min(timeout, end - time.monotonic())))
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
    ``accounts``/``instruments``/``sectors``/``cells``: id bounds (the node's capacities;
    ``cells`` bounds the position rows' cell ids; rows beyond
    them are counted in ``bad_rows``); the tables grow on demand up to them. A snapshot
    holds at most one row per id, which bounds what a fetch may allocate.
    ``snapshot_timeout``: the snapshot client's liveness bound (:func:`fetch_snapshot`): a
    server that does not connect, or sends nothing for this long (hung, SIGSTOPped), is
    given up and the next one tried; ``backoff``: (first, most) seconds between rounds
    over the servers when none gave a snapshot. So a join or a recovery that meets a
    silent server goes on within ``snapshot_timeout`` plus the backoff, and one server
    that comes back is asked again within ``backoff[1]`` plus ``snapshot_timeout``.
    ``liveness_s``: no datagram for this long (the feed sends a HEARTBEAT every 100 ms
    when it has nothing else) and :attr:`silent` says so: the node is hung, gone, or cut
    off; nothing is reconnected (a datagram of the node, or of a new primary, makes it
    live again, with a snapshot where one is needed).
    ``join_wait``: on start, how long to wait for a first datagram before fetching the join
    snapshot anyway (fetching after the first datagram makes one snapshot enough; the feed
    heartbeats every 100 ms). ``max_batch``: datagrams taken per :meth:`poll`.
    """

    def __init__(self, group: str, port: int, interface: str = "127.0.0.1",
                 snapshot: Sequence[tuple[str, int]] = (), drop_every: int = 0, *,
                 on_change: Callable[[int, int, np.void | None], None] | None = None,
                 accounts: int = 4096, instruments: int = 65536, sectors: int = 256,
                 cells: int = 1048576,
                 snapshot_timeout: float = 2.0, backoff: tuple[float, float] = (0.05, 2.0),
                 join_wait: float = 0.25, max_batch: int = 1024, liveness_s: float = 1.0,
                 names: RefData | None = None, currencies: Currencies | None = None):
        if drop_every < 0:
            raise ValueError(f"drop_every = {drop_every}: 0 (off) or N >= 1")
        self.group, self.port, self.interface = group, port, interface
        self.servers: list[tuple[str, int]] = [(str(h), int(p)) for h, p in snapshot]
        self.drop_every = drop_every
        self.on_change = on_change
        self.names = names  # symbols and account names ([reference]), or None
        # The node's [currencies] (SPEC section 7): ``currencies.base`` labels the money
        # figures, ``currencies.label(row["currency"])`` an instrument row's own currency.
        self.currencies = currencies or (names.currencies if names is not None
                                         else Currencies())
        if snapshot_timeout <= 0 or liveness_s <= 0:
            raise ValueError(f"snapshot_timeout {snapshot_timeout}, liveness_s {liveness_s}: "
                             f"both > 0")
        self.snapshot_timeout = snapshot_timeout
        self.liveness_s = liveness_s
        self._since = time.monotonic()  # (silent_for before any datagram)
        self.backoff = backoff
        self.join_wait = join_wait
        self.max_batch = max_batch
        self._bounds = {ROW_ACCOUNT: accounts, ROW_FUND: 1, ROW_INSTRUMENT: instruments,
                        ROW_SECTOR: sectors, ROW_POSITION: cells, ROW_LIMITS: accounts}
        self.max_rows = 2 * accounts + instruments + sectors + cells + 1
        self._tables = {ROW_ACCOUNT: np.zeros(min(accounts, 1024), UPDATE_DTYPE),
                        ROW_FUND: np.zeros(1, UPDATE_DTYPE),
                        ROW_INSTRUMENT: np.zeros(min(instruments, 4096), INSTRUMENT_ROW_DTYPE),
                        ROW_SECTOR: np.zeros(min(sectors, 256), SECTOR_ROW_DTYPE),
                        ROW_POSITION: np.zeros(min(cells, 4096), POSITION_ROW_DTYPE),
                        ROW_LIMITS: np.zeros(min(accounts, 1024), LIMITS_ROW_DTYPE)}
        # The merge's operands: the tables as words (in kind order), the id bounds by
        # kind, and its outputs (grown with the batches).
        self._words = [words(self._tables[k]) for k in _KINDS]
        self._bound_arr = np.array([0, accounts, 1, instruments, sectors, cells, accounts],
                                   np.int64)
        self._new = np.empty((256, ROW_WORDS), np.uint64)
        self._out = np.empty((3, 256), np.int64)
        self._info = np.zeros(INFO, np.int64)
        self._merge_entry: dict[bool, Callable] = {}  # by whether the batch is writeable
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
        # The receive batch (datagrams in slots of 64 KiB: any UDP datagram fits), the
        # scan's state and counters, and the rows it gathers (a batch's, at most).
        self._rx = BatchReceiver(self.sock, _SLOTS, _SLOT)
        self._scan_st = np.zeros(SCAN_STATE, np.int64)
        self._scan_ctr = np.zeros(len(SCAN_COUNTERS), np.int64)
        self._inc = np.zeros((_SLOTS * _SLOT // ROW_SIZE, ROW_WORDS), np.uint64)
        self._ref = np.zeros_like(self._inc)

    @classmethod
    def from_config(cls, config=None, **kw) -> Subscriber:
        """A subscriber to the node that ``config`` describes: a path to its TOML, a
        loaded ``NodeConfig``, or None for the built-in default. Its ``[fanout]`` group,
        port, interface and recovery server (``snapshot_host``/``snapshot_port``), in a
        pair also ``[replication] peer_snapshot``, its capacities as id bounds, and
        ``liveness_s`` = 10 feed heartbeats (``[fanout] heartbeat_ms``), at least 1 s, and
        ``names``: the names of its ``[reference]`` files (:attr:`names`), or None, and
        ``currencies``: its ``[currencies]`` table."""
        from exposure.config.node import NodeConfig, load_config

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
        kw.setdefault("cells", cfg.caps.cells)
        kw.setdefault("liveness_s", max(1.0, 10 * cfg.feed_heartbeat_ms / 1000))
        kw.setdefault("names", cfg.names)
        kw.setdefault("currencies", cfg.currencies)
        return cls(cfg.group, cfg.fanout_port, cfg.interface, snapshot=servers, **kw)

    # ------------------------------------------------------------------------ state
    @property
    def state(self) -> str:
        """``"joining"``, ``"recovering"`` or ``"live"`` (see the module's docstring)."""
        if not self._joined:
            return "joining"
        return "live" if self._done >= self._want or not self.servers else "recovering"

    @property
    def silent_for(self) -> float:
        """Seconds since the last datagram (since the start, before any)."""
        return time.monotonic() - (self.last_datagram or self._since)

    @property
    def silent(self) -> bool:
        """No datagram for more than ``liveness_s`` (:mod:`exposure.net.liveness`): the
        feed's node is hung, gone or cut off from this host (a live feed sends a HEARTBEAT
        every ``[fanout] heartbeat_ms`` when it has nothing else). Only :meth:`poll`
        takes datagrams: a caller that does not poll sees its own pause as silence."""
        return silent(time.monotonic(), self.last_datagram or self._since, self.liveness_s)

    @property
    def counters(self) -> dict[str, int]:
        """A copy of the counters (:data:`COUNTERS` names and explains them)."""
        return dict(self._ctr)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def selectables(self) -> list[socket.socket]:
        """What to wait on (``select``) for this subscriber's next :meth:`poll` to have
        work: its feed socket and the wake-up of a completed snapshot fetch."""
        return [self.sock, self._wr]

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

    def positions(self, account: int | None = None) -> np.ndarray:
        """A copy of the position rows (POSITION_ROW_DTYPE) the view holds: every cell
        that has an account (a roll's freed cells, account -1, are left out), or only
        ``account``'s; sorted by account, then instrument. Empty where the node sends no
        position rows (``[fanout] positions = false``)."""
        t = self._tables[ROW_POSITION]
        keep = (t["kind"] != 0) & (t["account"] >= 0)
        if account is not None:
            keep &= t["account"] == account
        rows = t[keep]
        return rows[np.lexsort((rows["instrument"], rows["account"]))]

    def position_values(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(pnl, mv) of position rows (POSITION_ROW_DTYPE, e.g. :meth:`positions`'), base
        currency, at the view's instrument rows (ref_price, multiplier, rate) by the node's
        own expressions (exposure.engine.publish.position_values): equal to what the node
        publishes once the view holds the rows of the same events. A position row carries
        no price (a mark moves no position row); an instrument the view has no row for
        counts as unmarked (ref_price 0, multiplier 1, rate 1)."""
        t = self._tables[ROW_INSTRUMENT]
        i = rows["instrument"].astype(np.int64)
        ref, mult, rate = np.zeros(len(i)), np.ones(len(i)), np.ones(len(i))
        k = np.flatnonzero((i >= 0) & (i < len(t)))
        k = k[t["kind"][i[k]] != 0]
        ref[k] = t["ref_price"][i[k]]
        mult[k] = t["multiplier"][i[k]]
        rate[k] = t["rate"][i[k]]
        return position_values(rows["pos"], rows["sod_qty"], rows["sod_price"], rows["flow"],
                               ref, mult, rate)

    def limits(self, account: int) -> dict[str, float] | None:
        """One account's limits (``gross_limit``, ``net_limit``, ``margin_limit``,
        ``loss_limit``; 0 = off), or None when the view has no limits row for it."""
        t = self._tables[ROW_LIMITS]
        if 0 <= account < len(t) and t["kind"][account]:
            return {k: float(t[k][account]) for k in _LIMIT_FIELDS}
        return None

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
        """The view as the SPEC document's ``accounts``, ``fund``, ``instruments``,
        ``sectors`` and ``positions`` (what ``exposure dump`` prints for them; rows never
        seen are left out, which a reader takes as zeros; ``positions`` is empty where the
        node sends none). The feed carries no counts."""
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
        p = self.positions()
        pnl, _ = self.position_values(p)
        positions = [
            {"account": a, "instrument": i, "pos": q, "open_buy": ob, "open_sell": os_,
             "pnl": pl}
            for a, i, q, ob, os_, pl in zip(
                p["account"].tolist(), p["instrument"].tolist(), p["pos"].tolist(),
                p["open_buy"].tolist(), p["open_sell"].tolist(), pnl.tolist(),
                strict=True)]
        return {"accounts": accounts, "fund": self.fund(), "instruments": instruments,
                "sectors": sectors, "positions": positions}

    # ------------------------------------------------------------------------ polling
    def poll(self, timeout: float | None = 0.0) -> list[Change]:
        """Take what has arrived: up to ``max_batch`` datagrams and any completed
        snapshot; if nothing had, wait up to ``timeout`` seconds (None: until something
        arrives) and take what came. Returns the view's changes, in order."""
        changes = _changes(self._poll(timeout))
        self._notify(changes)
        return changes

    def poll_rows(self, timeout: float | None = 0.0) -> list[Rows]:
        """:meth:`poll`, with the changes as arrays: a :class:`Rows` per kind and merge, in
        order (no Python object per row: what a consumer of many rows, such as the
        cluster's consolidator, takes)."""
        batches = self._poll(timeout)
        if self.on_change is not None:
            self._notify(_changes(batches))
        return batches

    def _notify(self, changes: list[Change]) -> None:
        if self.on_change is not None:
            for c in changes:
                self.on_change(c.kind, c.id, c.row)

    def _poll(self, timeout: float | None) -> list[Rows]:
        if self._closed:
            raise ValueError("poll on a closed Subscriber")
        changes: list[Rows] = []
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
                select.select(self.selectables, [], [], wait)
            except InterruptedError:
                pass
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

    def _service(self, changes: list[Rows]) -> int:
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
    def _receive(self, changes: list[Rows]) -> int:
        """Up to ``max_batch`` datagrams, a receive batch (one system call) at a time:
        checked and sequenced in one jitted pass (:func:`~exposure.feed.merge.scan_datagrams`),
        their rows merged."""
        ctr = self._ctr
        rx = self._rx
        st = self._scan_st
        sc = self._scan_ctr
        taken = 0
        while taken < self.max_batch:
            n = rx.recv(self.max_batch - taken)
            if not n:
                break
            taken += n
            d0 = ctr["datagrams"]
            ctr["datagrams"] += n
            self.last_datagram = time.monotonic()
            self._scan_in()
            k = 0
            while True:
                k = scan_datagrams(rx.words, rx.lens, k, n, d0, self.drop_every,
                                   bool(self.servers), st, sc, self._inc, self._ref)
                if k >= n:
                    break
                self._scan_out()  # a datagram of a higher epoch at k: follow it
                self._new_epoch(int(st[S_NEXT_EPOCH]), changes)
                self._scan_in()   # (the rows gathered before it are of the older epoch)
            self._scan_out()
            # The batch's rows, merged in one pass each (the rule is order-free).
            if st[S_INC]:
                self._merge_words(self._inc[:st[S_INC]], False, changes)
            if st[S_REF]:
                self._merge_words(self._ref[:st[S_REF]], True, changes)
            if n < rx.slots:
                break
        if taken:
            for name, v in zip(SCAN_COUNTERS, sc.tolist(), strict=True):
                ctr[name] += v
            sc[:] = 0
        return taken

    def _scan_in(self) -> None:
        st = self._scan_st
        st[S_EPOCH] = self.epoch
        st[S_SEQ] = -1 if self.seq is None else self.seq
        st[S_WANT] = self._want
        st[S_JOINED] = self._joined
        st[S_INC] = st[S_REF] = 0

    def _scan_out(self) -> None:
        st = self._scan_st
        self.seq = None if st[S_SEQ] < 0 else int(st[S_SEQ])
        self._want = int(st[S_WANT])
        self._joined = bool(st[S_JOINED])

    def _new_epoch(self, epoch: int, changes: list[Rows]) -> None:
        """Follow ``epoch`` (higher than the view's): drop the whole view."""
        if self.epoch:
            self._ctr["epoch_changes"] += 1
            for kind in _KINDS:
                t = self._tables[kind]
                ids = np.flatnonzero(t["kind"] != 0)
                if len(ids):
                    prev = t["breach"][ids].astype(np.int64)
                    changes.append(Rows(kind, ids - 1 if kind == ROW_FUND else ids, None,
                                        prev))
                t.view(np.uint8)[:] = 0
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
        words(bigger)[:len(t)] = words(t)  # whole rows (a structured copy skips padding)
        self._tables[kind] = bigger
        self._words[kind - 1] = words(bigger)

    def _merge(self, rows: np.ndarray, replace_equal: bool, changes: list[Rows]) -> None:
        """Apply ``rows`` (UPDATE_DTYPE, any kinds, any order) by the per-row gseq rule."""
        if len(rows):
            self._merge_words(words(np.ascontiguousarray(rows)), replace_equal, changes)

    def _merge_words(self, rw: np.ndarray, replace_equal: bool, changes: list[Rows]) -> None:
        """:meth:`_merge` of rows as words (:func:`exposure.feed.merge.merge_rows`: one
        jitted pass)."""
        n = len(rw)
        if len(self._new) < n:
            self._new = np.empty((max(n, 2 * len(self._new)), ROW_WORDS), np.uint64)
            self._out = np.empty((3, len(self._new)), np.int64)
        o = self._out
        info = self._info
        while True:
            args = (rw, *self._words, self._bound_arr, replace_equal, BODY, self._new, o[0],
                    o[1], o[2], info)
            call = self._merge_entry.get(rw.flags.writeable)
            if call is None:  # the compiled entry, once per kind of batch (_jit.entry)
                call = self._merge_entry[rw.flags.writeable] = entry(merge_rows, *args)
            count = call(*args)
            if count >= 0:
                break
            for kind in _KINDS:  # an id beyond its table (within bounds): grow, again
                if info[kind]:
                    self._grow(kind, int(info[kind]) - 1)
        if info[0]:
            self._ctr["bad_rows"] += int(info[0])
        if not count:
            return
        self.gseq = max(self.gseq, int(info[I_GSEQ]))
        # Copies: the rows, ids and bits handed out never move after this.
        new = self._new[:count].copy().view(UPDATE_DTYPE).reshape(count)
        ids = o[1, :count].copy()
        prev = o[2, :count].copy()
        cuts = [*info[I_START:I_START + len(_KINDS)].tolist(), count]
        for k, kind in enumerate(_KINDS):
            a, b = cuts[k], cuts[k + 1]
            if a < b:
                r = new[a:b] if _DTYPES[kind] is UPDATE_DTYPE else new[a:b].view(_DTYPES[kind])
                changes.append(Rows(kind, ids[a:b], r, prev[a:b]))

    def _apply_snapshot(self, f: _Fetched, changes: list[Rows]) -> None:
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
        """One line: epoch, state, fund gross/net/crossing (labelled with the base
        currency's code) and the main counters."""
        f = self.fund()
        c = self._ctr
        state = self.state + (" silent" if self.silent else "")
        return (f"epoch {self.epoch} {state:<10} seq {self.seq or 0} gseq {self.gseq} "
                f"| {self.currencies.base} gross {f['gross']:.2f} net {f['net']:.2f} "
                f"crossing {f['crossing']:.2f} "
                f"| dg {c['datagrams']} inc {c['incrementals']} ref {c['refreshes']} "
                f"hb {c['heartbeats']} gaps {c['gaps']} rec {c['recoveries']} "
                f"epochs {c['epoch_changes']} stale {c['stale_epoch']} "
                f"bad {c['bad_datagrams']} dropped {c['dropped']}")


def _records(rows: np.ndarray, idname: str, cols: dict[str, np.ndarray]) -> list[dict]:
    keys = [idname, *cols]
    columns = [rows[idname].astype(np.int64).tolist(), *(c.tolist() for c in cols.values())]
    return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)]

