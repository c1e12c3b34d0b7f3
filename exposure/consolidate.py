"""The consolidator: the cluster's rows from every partition's feed, published as a node
publishes its own (shared/SPEC.md section 5; docs/cluster.md).

It subscribes to each partition's multicast feed (:class:`exposure.feed.Subscriber`:
recovery from the recovery server, epochs, a pair's failover) and composes, for every row
that moved in any partition:

* an **account** row: the owning partition's row (``partition.PartitionMap``);
* an **instrument** row: ``fund_pos``, ``open_buy``, ``open_sell`` and ``gross_mv`` summed,
  ``ref_price`` the lowest-numbered partition's that has priced it, reference data from the
  lowest-numbered partition that has the row, ``net_mv`` = fund_pos x ref_price x multiplier;
* a **sector** row: summed;
* the **fund** row: the eleven account sums summed, ``net_long_mv`` / ``net_short_mv`` from
  the summed ``fund_pos`` of every instrument (so the crossing is the cluster's).

The rows go to the consolidator's own tally segment (``/exposure.<name>.tally``, read-only
for desks: :class:`exposure.desk.Desk` reads it as a node's) and, through a fan-out ring,
to a :class:`~exposure.stages.fanout.FanoutStage` on the consolidator's own multicast group,
with a recovery server (:class:`~exposure.stages.snapshot_server.SnapshotServer`) for its
subscribers: the formats are a node's, so engines subscribe to the cluster as to one node.

The consolidator's rows carry its own sequence (one gseq per composed batch) and its own
epoch (the start time, in seconds; a consolidator waits for the next second before it
exits or picks one, so every restart is a higher epoch): a restarted consolidator is a new
incarnation whose subscribers drop their view and fetch its snapshot. It keeps no state
that a restart can lose: it rebuilds from the partitions' snapshots. Positions and counts
are not on the partitions' feeds, so its segment has none: ``exposure dump --cluster``
composes the whole document (counts and positions too) from the partitions' own segments.

Nothing is published while a partition's subscriber is not live: joining (before its first
snapshot), or recovering from a loss or from the partition's new epoch (a restart, a
pair's failover: its view was dropped). The rows that moved meanwhile are held and
composed once its snapshot is in: a view of some partitions only would be a wrong fund.
"""

from __future__ import annotations

import select
import time

import numpy as np

from .feed import Subscriber
from .partition import PartitionMap
from .publish import store_rows, versions
from .shm import counters_layout as CN
from .shm.ring import ring_push
from .stages.agent import Stage
from .types import (
    INSTPUB_DTYPE,
    INSTRUMENT_ROW_DTYPE,
    NO_SESSION,
    PUBROW_DTYPE,
    ROW_ACCOUNT,
    ROW_FUND,
    ROW_INSTRUMENT,
    ROW_SECTOR,
    SECPUB_DTYPE,
    SECTOR_ROW_DTYPE,
    UPDATE_DTYPE,
)

__all__ = ["ConsolidateStage"]

_KINDS = (ROW_ACCOUNT, ROW_FUND, ROW_INSTRUMENT, ROW_SECTOR)
_ACC_COLS = ("long_mv", "short_mv", "gross", "net", "open_buy_mv", "open_sell_mv",
             "worst_gross", "margin", "beta_net", "pnl", "live_orders", "breach")
_FUND_SUMS = _ACC_COLS[:-1]


def _words(a: np.ndarray) -> np.ndarray:
    return a.view(np.uint64).reshape(len(a), -1)


def _rows_at(sub: Subscriber, kind: int, ids: np.ndarray) -> np.ndarray:
    """The subscriber's rows of ``kind`` at ``ids`` (zero rows where it has none)."""
    t = sub.table(kind)
    out = np.zeros(len(ids), t.dtype)
    inside = ids < len(t)
    out[inside] = t[ids[inside]]
    return out


class ConsolidateStage(Stage):
    """Polls every partition's subscriber; composes and publishes the rows that moved."""

    name = "consolidate"

    def __init__(self, pmap: PartitionMap, subscribers: list[Subscriber], state, out_ring,
                 counters: np.ndarray | None = None, on_ready=None):
        if len(subscribers) != pmap.partitions:
            raise ValueError(f"{len(subscribers)} subscribers for {pmap.partitions} "
                             "partitions")
        self.pmap = pmap
        self.subs = subscribers
        self.st = state
        self.vers = versions(state)
        self.out = out_ring
        self.cnt = CN.or_private(counters)
        self.nacc, self.ninst, self.nsec = (state.acc.shape[0], state.inst.shape[0],
                                            state.sec.shape[0])
        self.gseq = 0
        self.dirty = {k: set() for k in _KINDS}
        # The composed instruments, for the fund's net long/short over all of them.
        self.fpos = np.zeros(self.ninst, np.int64)
        self.val = np.zeros(self.ninst)  # ref_price x multiplier
        self.rows_total = 0
        self.batches = 0
        self.joined = False
        self.held = 0  # passes that held the rows back while a partition was not live
        self.on_ready = on_ready  # called once, after the first rows are published
        self._pub = _words(state.pub)
        self._ipub = _words(state.ipub)
        self._spub = _words(state.spub)
        self._ctr = _words(state.ctrpub)
        self._socks = [s.sock for s in subscribers]

    # ------------------------------------------------------------------ the duty cycle
    def poll(self) -> int:
        work = 0
        for sub in self.subs:
            for ch in sub.poll(0):
                self.dirty[ch.kind].add(ch.id)
                work += 1
        if not all(s.state == "live" for s in self.subs):
            # A partition joining, or recovering (a loss, or a new epoch whose view was
            # dropped): its rows are incomplete, so the cluster's would be wrong. Hold
            # what moved until its snapshot is in.
            self.held += 1
            return work
        if not self.joined:
            self.joined = True
            self.dirty[ROW_FUND].add(-1)  # the first batch: at least the fund's row
            work += 1
        if not any(self.dirty.values()):
            return work
        self._publish()
        if self.on_ready is not None and self.batches == 1:
            self.on_ready()
        return work + 1

    def wait_io(self, timeout: float) -> bool:
        """Sleep until a partition's datagram arrives, or for 10 ms at most (the fan-out's
        heartbeats and the recovery server's clients wait that long when idle)."""
        try:
            select.select(self._socks, [], [], max(timeout, 0.01))
        except (OSError, ValueError):
            time.sleep(timeout)
        return True

    def close(self) -> None:
        for s in self.subs:
            if not s.closed:
                s.close()

    # ------------------------------------------------------------------ composition
    def _ids(self, kind: int, bound: int) -> np.ndarray:
        ids = np.fromiter(self.dirty[kind], np.int64, len(self.dirty[kind]))
        self.dirty[kind].clear()
        ids.sort()
        return ids[(ids >= 0) & (ids < bound)]

    def _publish(self) -> None:
        self.gseq += 1
        now = time.time_ns()
        feed = []
        acc = self._accounts(self._ids(ROW_ACCOUNT, self.nacc), now)
        ins = self._instruments(self._ids(ROW_INSTRUMENT, self.ninst), now)
        sec = self._sectors(self._ids(ROW_SECTOR, self.nsec), now)
        feed += [acc, ins, sec]
        if self.dirty[ROW_FUND] or len(ins):
            self.dirty[ROW_FUND].clear()
            feed.append(self._fund(now))
        self._counters()
        rows = np.concatenate([f.view(np.uint8).reshape(len(f), -1) for f in feed if len(f)])
        if len(rows):
            pushed = ring_push(self.out.ctrl, self.out.slots, rows.view(np.uint64), len(rows))
            if pushed < len(rows):
                self.cnt[CN.INDEX["compute_ring_full_total"]] += 1
        self.rows_total += len(rows)
        self.batches += 1
        self.cnt[CN.INDEX["compute_rows_total"]] += len(rows)
        self.cnt[CN.INDEX["compute_batches_total"]] += 1
        self.cnt[CN.INDEX["compute_gseq"]] = self.gseq

    def _tag(self, rows: np.ndarray, kind: int, ids: np.ndarray, src, now: int) -> None:
        rows["kind"] = kind
        rows[rows.dtype.names[4]] = ids
        rows["session"] = NO_SESSION
        rows["gseq"] = self.gseq
        rows["compute_ns"] = now
        if src is not None:  # the partition event's times: wire to wire through here
            rows["send_ns"] = src["send_ns"]
            rows["recv_ns"] = src["recv_ns"]

    def _accounts(self, ids: np.ndarray, now: int) -> np.ndarray:
        out = np.zeros(len(ids), UPDATE_DTYPE)
        if not len(ids):
            return out
        owner = self.pmap.acc_owner
        own = np.where(ids < len(owner), owner[np.minimum(ids, len(owner) - 1)], -1)
        for k, sub in enumerate(self.subs):
            sel = np.flatnonzero((own == k) | (own < 0) & (k == 0))
            if len(sel):
                out[sel] = _rows_at(sub, ROW_ACCOUNT, ids[sel])
        src = out.copy()
        self._tag(out, ROW_ACCOUNT, ids, src, now)
        pub = np.zeros(len(ids), PUBROW_DTYPE)
        pub["gseq"] = self.gseq
        for c in _ACC_COLS:
            pub[c] = out[c]
        store_rows(self._pub, self.vers.pub, ids, _words(pub))
        return out

    def _instruments(self, ids: np.ndarray, now: int) -> np.ndarray:
        out = np.zeros(len(ids), INSTRUMENT_ROW_DTYPE)
        if not len(ids):
            return out
        have = np.zeros(len(ids), bool)
        latest = np.zeros(len(ids), INSTRUMENT_ROW_DTYPE)
        for sub in self.subs:
            r = _rows_at(sub, ROW_INSTRUMENT, ids)
            present = r["kind"] != 0
            for f in ("fund_pos", "open_buy", "open_sell"):
                out[f] += np.where(present, r[f], 0)
            out["gross_mv"] += np.where(present, r["gross_mv"], 0.0)
            unpriced = (out["ref_price"] == 0.0) & present
            out["ref_price"] = np.where(unpriced, r["ref_price"], out["ref_price"])
            first = present & ~have
            for f in ("multiplier", "margin_rate", "beta", "sector", "marked"):
                out[f] = np.where(first, r[f], out[f])
            later = present & (r["send_ns"] > latest["send_ns"])
            latest[later] = r[later]
            have |= present
        val = out["ref_price"] * out["multiplier"]
        out["net_mv"] = out["fund_pos"] * val
        self.fpos[ids] = out["fund_pos"]
        self.val[ids] = val
        self._tag(out, ROW_INSTRUMENT, ids, latest, now)
        pub = np.zeros(len(ids), INSTPUB_DTYPE)
        pub["gseq"] = self.gseq
        for f in INSTPUB_DTYPE.names[2:]:
            pub[f] = out[f]
        store_rows(self._ipub, self.vers.ipub, ids, _words(pub))
        return out

    def _sectors(self, ids: np.ndarray, now: int) -> np.ndarray:
        out = np.zeros(len(ids), SECTOR_ROW_DTYPE)
        if not len(ids):
            return out
        for sub in self.subs:
            r = _rows_at(sub, ROW_SECTOR, ids)
            present = r["kind"] != 0
            out["net_mv"] += np.where(present, r["net_mv"], 0.0)
            out["gross_mv"] += np.where(present, r["gross_mv"], 0.0)
        self._tag(out, ROW_SECTOR, ids, None, now)
        pub = np.zeros(len(ids), SECPUB_DTYPE)
        pub["gseq"] = self.gseq
        pub["net_mv"], pub["gross_mv"] = out["net_mv"], out["gross_mv"]
        store_rows(self._spub, self.vers.spub, ids, _words(pub))
        return out

    def _fund(self, now: int) -> np.ndarray:
        out = np.zeros(1, UPDATE_DTYPE)
        latest = np.zeros(1, UPDATE_DTYPE)
        for sub in self.subs:
            r = sub.table(ROW_FUND)[:1]
            if r["kind"][0] == 0:
                continue
            for c in _FUND_SUMS:
                out[c] += r[c]
            if r["send_ns"][0] > latest["send_ns"][0]:
                latest[:] = r
        mv = self.fpos * self.val
        out["net_long_mv"] = mv[self.fpos > 0].sum()
        out["net_short_mv"] = -mv[self.fpos < 0].sum()
        self._tag(out, ROW_FUND, np.array([-1]), latest, now)
        pub = np.zeros(1, PUBROW_DTYPE)
        pub["gseq"] = self.gseq
        for c in (*_FUND_SUMS, "net_long_mv", "net_short_mv"):
            pub[c] = out[c]
        store_rows(self._pub, self.vers.pub, np.array([self.nacc]), _words(pub))
        return out

    def _counters(self) -> None:
        """The counters row last: its gseq is what a snapshot of the rows includes."""
        row = np.zeros(1, self.st.ctrpub.dtype)
        row["gseq"] = self.gseq
        store_rows(self._ctr, self.vers.ctrpub, np.zeros(1, np.int64), _words(row))
