"""The consolidator: the cluster's rows from every partition's feed, published as a node
publishes its own (shared/SPEC.md section 5; docs/cluster.md).

It subscribes to each partition's multicast feed (:class:`exposure.feed.subscriber.Subscriber`:
recovery from the recovery server, epochs, a pair's failover) and composes, for every row
that moved in any partition:

* an **account** row: the owning partition's row (``partition.PartitionMap``);
* an **instrument** row: ``fund_pos``, ``open_buy``, ``open_sell`` and ``gross_mv`` summed,
  ``ref_price`` the lowest-numbered partition's that has priced it, reference data from the
  lowest-numbered partition that has the row, ``net_mv`` = fund_pos x ref_price x multiplier;
* a **sector** row: summed;
* the **fund** row: the eleven account sums summed, ``net_long_mv`` / ``net_short_mv`` from
  the summed ``fund_pos`` of every instrument (so the crossing is the cluster's);
* a **limits** row (feed version 4): the owning partition's, written to the segment's
  ``acc_lim`` (and ``acc_gseq``: the consolidator's gseq) under its state seqlock;
* a **position** row (feed version 4): a partition's cell ``c`` gets a cluster cell id of
  its own the first time it is seen (ids taken in order from 0, so the cluster's cell table
  is dense as a node's: its refresh and snapshot stop at the first unused id), which then
  stays that partition cell's for the consolidator's life: whatever the partition's row
  says (a roll's freed cell too: account -1) is what the cluster's row says. A row the
  partition's view dropped (a new epoch of the partition) is sent as a freed cell until
  the partition's snapshot brings it back. Beyond the consolidator's ``[capacities]
  cells`` new cells are counted (``cells_full``) and not sent.

The rows go to the consolidator's own tally segment (``/exposure.<name>.tally``, read-only
for desks: :class:`exposure.engine.desk.Desk` reads it as a node's) and, through a fan-out ring,
to a :class:`~exposure.node.stages.fanout.FanoutStage` on the consolidator's own multicast group,
with a recovery server (:class:`~exposure.node.stages.snapshot_server.SnapshotServer`) for its
subscribers: the formats are a node's, so engines subscribe to the cluster as to one node.

The consolidator's rows carry its own sequence (one gseq per composed batch) and its own
epoch (the start time, in seconds; a consolidator waits for the next second before it
exits or picks one, so every restart is a higher epoch): a restarted consolidator is a new
incarnation whose subscribers drop their view and fetch its snapshot. It keeps no state
that a restart can lose: it rebuilds from the partitions' snapshots. Counts are not on
the partitions' feeds, so its segment has none: ``exposure dump --cluster`` composes the
whole document (counts and positions too) from the partitions' own segments.

Nothing is published while a partition's subscriber is not live: joining (before its first
snapshot), or recovering from a loss or from the partition's new epoch (a restart, a
pair's failover: its view was dropped). The rows that moved meanwhile are held and
composed once its snapshot is in: a view of some partitions only would be a wrong fund.
"""

from __future__ import annotations

import select
import time

import numpy as np

from exposure.cluster.compose import (
    compose_accounts,
    compose_fund,
    compose_instruments,
    compose_sectors,
    resum,
)
from exposure.core.partition import PartitionMap
from exposure.core.types import (
    C_CELLS,
    INSTPUB_DTYPE,
    INSTRUMENT_ROW_DTYPE,
    LIMITS_ROW_DTYPE,
    NO_SESSION,
    POSITION_ROW_DTYPE,
    POSPUB_DTYPE,
    PUBROW_DTYPE,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_LIMITS,
    ROW_POSITION,
    ROW_SECTOR,
    SECPUB_DTYPE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)
from exposure.engine.publish import position_values, store_rows, versions
from exposure.feed.subscriber import Subscriber
from exposure.node.stages.agent import Stage
from exposure.shm.ring import ring_push
from exposure.shm.seqlock import write_begin, write_end

__all__ = ["ConsolidateStage"]

_KINDS = (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR, ROW_LIMITS)
_LIMITS = ("gross_limit", "net_limit", "margin_limit", "loss_limit")
_POS = ("account", "instrument", "pos", "open_buy", "open_sell", "sod_qty", "sod_price", "flow")
_NONE = np.zeros(0, np.int64)


def _words(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint64).reshape(len(a), -1)


class _Scratch:
    """A published dtype's scratch rows (and the same as words), one per id at most."""

    def __init__(self, dtype: np.dtype, n: int):
        self.rows = np.zeros(max(n, 1), dtype)
        self.words = _words(self.rows)


class ConsolidateStage(Stage):
    """Polls every partition's subscriber; composes and publishes the rows that moved."""

    name = "consolidate"

    def __init__(self, pmap: PartitionMap, subscribers: list[Subscriber], state, out_ring,
                 on_ready=None, words: np.ndarray | None = None):
        if len(subscribers) != pmap.partitions:
            raise ValueError(f"{len(subscribers)} subscribers for {pmap.partitions} "
                             "partitions")
        self.pmap = pmap
        self.subs = subscribers
        self.st = state
        self.vers = versions(state)
        self.out = out_ring
        self.nacc, self.ninst, self.nsec = (state.acc.shape[0], state.inst.shape[0],
                                            state.sec.shape[0])
        self.gseq = 0
        self.dirty: dict[int, list[np.ndarray]] = {k: [] for k in _KINDS}
        # The composed instruments, for the fund's net long/short over all of them.
        self.fpos = np.zeros(self.ninst, np.int64)
        self.val = np.zeros(self.ninst)  # ref_price x multiplier
        self.acc = np.zeros(4)  # net long, its error, net short, its error (compose.py)
        self.rows_total = 0
        self.batches = 0
        self.ring_full = 0  # batches the fan-out ring could not take whole
        self.joined = False
        self.held = 0  # passes that held the rows back while a partition was not live
        self._was_held = False
        self.on_ready = on_ready  # called once, after the first rows are published
        self._pub = _words(state.pub)
        self._ipub = _words(state.ipub)
        self._spub = _words(state.spub)
        self._ctr = _words(state.ctrpub)
        self._acc_pub = _Scratch(PUBROW_DTYPE, self.nacc)  # (the fund's row too)
        self._inst_pub = _Scratch(INSTPUB_DTYPE, self.ninst)
        self._sec_pub = _Scratch(SECPUB_DTYPE, self.nsec)
        self._ctr_row = np.zeros(1, state.ctrpub.dtype)
        self._ctr_at = np.zeros(1, np.int64)  # the counters row's index
        self._feed = np.zeros(self.nacc + self.ninst + self.nsec + 1, UPDATE_DTYPE)
        self._wait = [x for s in subscribers for x in s.selectables]
        # Feed version 4: limits (under the state seqlock: ``words``, the segment's header
        # words) and positions (per partition: its cells that moved, and its cell id ->
        # the cluster's cell id, -1 none yet).
        self._seg_words = words if words is not None else np.zeros(32, np.uint64)
        self.ncell = state.cpub.shape[0]
        self.pdirty: list[list[np.ndarray]] = [[] for _ in subscribers]
        self.cmap = [np.full(0, -1, np.int64) for _ in subscribers]
        self.cells_used = 0
        self.cells_full = 0  # partition cells never given a cluster id (capacity)
        self._cpub = _words(state.cpub)
        # The cluster cells' last published rows: a mark moves no position row, so the
        # cells of the instruments that moved get their pnl and mv published again here.
        self._cells = np.zeros(self.ncell, POSPUB_DTYPE)
        # Their ids by instrument (sorted, and where each instrument's start), rebuilt only
        # when a cell is new or changed hands (a roll's compaction): a mark is a lookup.
        self._by_inst: tuple[int, np.ndarray, np.ndarray] | None = None

    # ------------------------------------------------------------------ the duty cycle
    def poll(self) -> int:
        work = 0
        for p, sub in enumerate(self.subs):
            for b in sub.poll_rows(0):
                if b.kind == ROW_POSITION:  # a partition's own cell ids
                    self.pdirty[p].append(b.ids)
                else:
                    self.dirty[b.kind].append(b.ids)
                work += len(b.ids)
        if not all(s.state == "live" for s in self.subs):
            # A partition joining, or recovering (a loss, or a new epoch whose view was
            # dropped): its rows are incomplete, so the cluster's would be wrong. Hold
            # what moved until its snapshot is in.
            self.held += 1
            self._was_held = True
            return work
        if not self.joined:
            self.joined = True
            self.dirty[ROW_FUND].append(_NONE)  # the first batch: at least the fund's row
            work += 1
        if not any(self.dirty.values()) and not any(self.pdirty):
            return work
        self._publish()
        if self.on_ready is not None and self.batches == 1:
            self.on_ready()
        return work + 1

    def wait_io(self, timeout: float) -> bool:
        """Sleep until a partition's datagram arrives or a snapshot fetch completes, or
        for 10 ms at most (the fan-out's heartbeats and the recovery server's clients
        wait that long when idle)."""
        try:
            select.select(self._wait, [], [], max(timeout, 0.01))
        except (OSError, ValueError):
            time.sleep(timeout)
        return True

    def close(self) -> None:
        for s in self.subs:
            if not s.closed:
                s.close()

    # ------------------------------------------------------------------ composition
    def _ids(self, kind: int, bound: int) -> np.ndarray:
        got = self.dirty[kind]
        if not got:
            return _NONE
        ids = np.unique(np.concatenate(got) if len(got) > 1 else got[0])
        got.clear()
        return ids[(ids >= 0) & (ids < bound)]

    def _tables(self, kind: int) -> tuple:
        return tuple(s.table(kind) for s in self.subs)

    def _publish(self) -> None:
        self.gseq += 1
        g = self.gseq
        now = time.time_ns()
        acc = self._ids(ROW_ACCOUNT, self.nacc)
        ins = self._ids(ROW_INSTRUMENT, self.ninst)
        sec = self._ids(ROW_SECTOR, self.nsec)
        fund = bool(self.dirty[ROW_FUND]) or len(ins) > 0
        self.dirty[ROW_FUND].clear()
        na, ni, ns = len(acc), len(ins), len(sec)
        n = na + ni + ns + fund
        feed = self._feed[:n]
        feed.view(np.uint64)[:] = 0
        if na:
            p = self._acc_pub
            compose_accounts(acc, self.pmap.acc_owner, self._tables(ROW_ACCOUNT), g, now,
                             feed[:na], p.rows, p.words, self._pub, self.vers.pub)
        if ni:
            p = self._inst_pub
            compose_instruments(ins, self._tables(ROW_INSTRUMENT), g, now,
                                feed[na:na + ni].view(INSTRUMENT_ROW_DTYPE), self.fpos,
                                self.val, self.acc, p.rows, p.words, self._ipub,
                                self.vers.ipub)
        if ns:
            p = self._sec_pub
            compose_sectors(sec, self._tables(ROW_SECTOR), g, now,
                            feed[na + ni:na + ni + ns].view(SECTOR_ROW_DTYPE), p.rows,
                            p.words, self._spub, self.vers.spub)
        if fund:
            if self._was_held:  # after a hold (a partition rebuilt): exact sums again
                resum(self.fpos, self.val, self.acc)
                self._was_held = False
            p = self._acc_pub  # (the accounts' rows are stored by now)
            compose_fund(self._tables(ROW_FUND), self.nacc, g, now, feed[n - 1:], self.acc,
                         p.rows, p.words, self._pub, self.vers.pub)
        extra = [x for x in (self._limits(g, now), self._positions(g, now, ins)) if len(x)]
        self._counters()
        if n:
            pushed = ring_push(self.out.ctrl, self.out.slots, _words(feed), n)
            if pushed < n:
                self.ring_full += 1
        for x in extra:
            pushed = ring_push(self.out.ctrl, self.out.slots, _words(x), len(x))
            if pushed < len(x):
                self.ring_full += 1
            n += len(x)
        self.rows_total += n
        self.batches += 1

    @staticmethod
    def _tagged(rows: np.ndarray, kind: int, g: int, now: int) -> None:
        rows["kind"] = kind
        rows["session"] = NO_SESSION
        rows["gseq"] = g
        rows["compute_ns"] = now

    def _limits(self, g: int, now: int) -> np.ndarray:
        """The limits rows of the accounts whose owner sent one: the owner's limits (zeros
        where its view has none), stored in the segment under its state seqlock."""
        ids = self._ids(ROW_LIMITS, self.nacc)
        out = np.zeros(len(ids), LIMITS_ROW_DTYPE)
        if not len(ids):
            return out
        owner = self.pmap.acc_owner[ids]
        for p, sub in enumerate(self.subs):
            t = sub.table(ROW_LIMITS)
            sel = np.flatnonzero((owner == p) & (ids < len(t)))
            src = t[ids[sel]]
            for k in _LIMITS:
                out[k][sel] = np.where(src["kind"] != 0, src[k], 0.0)
        self._tagged(out, ROW_LIMITS, g, now)
        out["account"] = ids
        lim = np.column_stack([out[k] for k in _LIMITS])
        write_begin(self._seg_words)
        self.st.acc_lim[ids] = lim
        self.st.acc_gseq[ids] = g
        write_end(self._seg_words)
        return out

    def _cluster_cells(self, p: int, ids: np.ndarray) -> np.ndarray:
        """Partition ``p``'s cell ids as the cluster's (-1: no room left), new ones taken
        in order."""
        m = self.cmap[p]
        if len(ids) and ids[-1] >= len(m):
            bigger = np.full(max(int(ids[-1]) + 1, 2 * len(m)), -1, np.int64)
            bigger[:len(m)] = m
            m = self.cmap[p] = bigger
        new = ids[m[ids] < 0]
        room = self.ncell - self.cells_used
        if len(new) > room:
            self.cells_full += len(new) - room
            new = new[:room]
        m[new] = np.arange(self.cells_used, self.cells_used + len(new))
        self.cells_used += len(new)
        return m[ids]

    def _positions(self, g: int, now: int, ins: np.ndarray) -> np.ndarray:
        """The position rows of the partitions' cells that moved, under the cluster's cell
        ids; published to the segment's cell table with those of the cells of the
        instruments ``ins`` (which moved: their pnl and mv at the cluster's instrument
        rows, as a node's desk has them)."""
        parts = []
        for p, got in enumerate(self.pdirty):
            if not got:
                continue
            ids = np.unique(np.concatenate(got) if len(got) > 1 else got[0])
            got.clear()
            ids = ids[ids >= 0]
            cids = self._cluster_cells(p, ids)
            keep = cids >= 0
            ids, cids = ids[keep], cids[keep]
            t = self.subs[p].table(ROW_POSITION)
            rows = np.zeros(len(ids), POSITION_ROW_DTYPE)
            inside = np.flatnonzero(ids < len(t))
            src = t[ids[inside]]
            there = inside[src["kind"] != 0]
            src = src[src["kind"] != 0]
            for k in (*_POS, "send_ns", "recv_ns"):
                rows[k][there] = src[k]
            gone = np.ones(len(ids), bool)
            gone[there] = False
            rows["account"][gone] = -1  # dropped by the partition's view: a freed cell
            rows["cell"] = cids
            parts.append(rows)
        out = np.zeros(0, POSITION_ROW_DTYPE)
        if parts:
            out = np.concatenate(parts) if len(parts) > 1 else parts[0]
            self._tagged(out, ROW_POSITION, g, now)
        cells = self._cells
        ids = out["cell"].astype(np.int64)
        if len(ids) and ((cells["instrument"][ids] != out["instrument"])
                         | (cells["account"][ids] != out["account"])).any():
            self._by_inst = None
        for k in _POS:
            cells[k][ids] = out[k]
        if len(ins) and self.cells_used:
            ids = np.union1d(ids, self._cells_of(ins))
        if not len(ids):
            return out
        pub = cells[ids]
        pub["gseq"] = g
        i = pub["instrument"].astype(np.int64)
        i[(i < 0) | (i >= self.ninst)] = 0  # (a partition's row is checked nowhere else)
        ip = self.st.ipub  # (this stage writes them: as composed above)
        pub["pnl"], pub["mv"] = position_values(
            pub["pos"], pub["sod_qty"], pub["sod_price"], pub["flow"], ip["ref_price"][i],
            ip["multiplier"][i], ip["rate"][i])
        store_rows(self._cpub, self.vers.cpub, ids, _words(pub))
        return out

    def _cells_of(self, ins: np.ndarray) -> np.ndarray:
        """The cluster cells (with an account) of the instruments ``ins``."""
        if self._by_inst is None or self._by_inst[0] != self.cells_used:
            used = self._cells[:self.cells_used]
            live = np.flatnonzero(used["account"] >= 0)
            order = live[np.argsort(used["instrument"][live], kind="stable")]
            starts = np.searchsorted(used["instrument"][order], np.arange(self.ninst + 1))
            self._by_inst = (self.cells_used, order, starts)
        _, order, starts = self._by_inst
        lo, n = starts[ins], starts[ins + 1] - starts[ins]
        total = int(n.sum())
        if not total:
            return _NONE
        first = np.cumsum(n) - n  # where each instrument's run starts in the result
        return order[np.repeat(lo - first, n) + np.arange(total)]

    def _counters(self) -> None:
        """The counters row last: its gseq is what a snapshot of the rows includes."""
        self._ctr_row["gseq"] = self.gseq
        self._ctr_row["ctr"][0, C_CELLS] = self.cells_used
        store_rows(self._ctr, self.vers.ctrpub, self._ctr_at, _words(self._ctr_row))
