"""Roles of a primary/backup pair: who is primary, when a backup may take over, when a
primary runs alone, and the fence that keeps two nodes from acknowledging at once.

The truth is etcd's pair record (:mod:`exposure.pair.coord`): ``{epoch, primary, sync}``, changed
only by compare-and-swap. The supervisor of each node runs one :class:`Election`: it reads
the record (and the members' keys) every ``poll_ms`` (250), publishes its own member key,
and makes the transitions below (a backup about to promote itself reads it afresh); the
stages see the outcome in the control block
(:mod:`exposure.shm.control`).

**Start** (and every restart of the node's processes), :meth:`Election.start`:

* no record: the node whose journal holds the most (ties: the smaller name) creates it,
  as primary, running alone, at an epoch above any it knows;
* the record names this node primary: it becomes primary again at a new epoch, running
  alone (its backup must catch up with the new incarnation) -- unless the release policy
  is ``replicated`` and the synchronous backup is alive and in sync: then the backup may
  hold acknowledged events this node never made durable, so this node starts as a backup
  and lets it take over;
* the record names the other node: backup.

etcd unreachable at start: the node waits (and says so); no role is taken without it.

**Running alone** (the primary). While the record names a synchronous backup, the primary
releases per its policy and only while its *fence* holds. When the backup has been silent
for ``alone_after_ms``, the primary records ``sync = ""`` *before* acknowledging anything
the backup does not hold; from then on it acknowledges on its own durability
(``CTL_ALONE``) and the stale backup may not be promoted. With ``strict`` it never does:
it stops acknowledging instead. When the backup is back, follows this epoch and has caught
up, the primary (1) stops releasing alone and waits for ingest to confirm it
(``CTL_ALONE_SEEN``), (2) waits until the backup has received everything ingest had
sequenced by then (so it holds everything ever acknowledged), (3) records it as ``sync``.

**The fence.** A primary that is not alone may act (acknowledge, publish) only until
``CTL_VALID_NS``: the echo of a heartbeat it sent at ``t`` says the backup heard it at
``t`` or later, so the backup, which promotes only after ``failover_ms`` of silence,
cannot promote before ``t + failover_ms``; the mirror sets the fence a margin earlier. So a
primary cut off from its backup stops acknowledging and publishing before the backup may
take over, whether or not it reaches etcd; it goes on once it has recorded that it runs
alone (which also forbids the promotion: the two compare-and-swaps exclude each other).

**Promotion** (the backup), in :meth:`Election.tick`: the primary silent for
``failover_ms``, this backup in sync with it (``CTL_IN_SYNC``), and the record naming this
node ``sync`` at the epoch it follows; then one compare-and-swap to ``{epoch + 1, this node,
sync ""}``. A backup the record does not name never promotes itself (it may lack what the
primary acknowledged alone); it says why once.

**Demotion.** A primary that sees a higher epoch, in the record or from its backup,
returns a reason from :meth:`Election.tick`; the supervisor restarts the node's processes,
and :meth:`Election.start` makes it a backup.

**etcd unreachable.** Nothing that is running needs etcd: the fence is renewed by the
backup's echoes, so a healthy pair keeps serving. A transition (promotion, running alone)
waits for etcd -- safe, not available -- and the log says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from exposure.pair.coord import CoordError, PairState, PairStore
from exposure.shm.control import (
    CTL_ALONE,
    CTL_ALONE_SEEN,
    CTL_EPOCH,
    CTL_HEARD_NS,
    CTL_IN_SYNC,
    CTL_LINK,
    CTL_PEER_EPOCH,
    CTL_REPL_RECV,
    CTL_ROLE,
    CTL_SEQUENCED,
    CTL_VALID_NS,
    ROLE_BACKUP,
    ROLE_NAMES,
    ROLE_PRIMARY,
)
from exposure.store.recovery import read_epoch, store_epoch

__all__ = ["Election", "Stopped"]

_MS = 1_000_000


class Stopped(Exception):
    """The node was asked to stop while it waited for etcd."""


class Election:
    """One node's part of the pair's roles (see the module docstring).

    ``ctl`` is the node's control block; ``tail()`` gives the highest gseq the node holds
    (for its member key); ``log`` writes one line."""

    def __init__(self, name: str, ctl: np.ndarray, store: PairStore, data_dir, *,
                 release: str, failover_ms: int, alone_after_ms: int, strict: bool,
                 tail: Callable[[], int], log: Callable[[str], None], poll_ms: int = 250):
        self.name = name
        self.ctl = ctl
        self.store = store
        self.data_dir = data_dir
        self.release = release
        self.failover_ns = failover_ms * _MS
        self.alone_after_ns = alone_after_ms * _MS
        self.strict = strict
        self.tail = tail
        self.log = log
        self.poll_ns = poll_ms * _MS
        self.state: PairState | None = None
        self.rev = 0
        self.members: dict[str, dict] = {}
        self.fresh = False          # the last read succeeded
        self.read_at = 0            # when (monotonic ns)
        self.next_read = 0
        self.next_publish = 0
        self.published: tuple = ()
        self.role_since = time.monotonic_ns()
        self.known = 0              # the highest epoch stored in the data directory
        self.join: tuple[str, int] | None = None  # recording the backup as sync: (phase, target)
        self.said = ""              # the last situation logged (each said once)
        self.fenced = False         # (logged when it starts)
        self.etcd_said = ""

    # ------------------------------------------------------------------ plumbing
    def _say(self, key: str, msg: str) -> None:
        if key != self.said:
            self.log(msg)
            self.said = key

    def _etcd_down(self, e: CoordError, doing: str) -> None:
        msg = f"{doing}: {e}"
        if msg != self.etcd_said:
            self.log(msg)
            self.etcd_said = msg

    def _read(self) -> bool:
        try:
            self.state, self.rev, self.members = self.store.read()
        except CoordError as e:
            self.fresh = False
            self._etcd_down(e, "cannot read the pair's record"
                            + ("" if self.role == ROLE_BACKUP or self.state is None else
                               " (serving on: nothing running needs etcd)"))
            return False
        if self.etcd_said:
            self.log("etcd answers again")
            self.etcd_said = ""
        self.fresh = True
        self.read_at = time.monotonic_ns()
        return True

    def _swap(self, new: PairState, why: str) -> bool | None:
        """Compare-and-swap the record from what was last read; True if this node made
        the change, False if the record had changed (it is read again), None if etcd
        did not answer."""
        try:
            ok = self.store.swap(self.rev, new)
        except CoordError as e:
            self._etcd_down(e, f"cannot record {why} in etcd; waiting for it")
            self.fresh = False
            return None
        if ok:
            self.state = new  # (kept if the read below fails)
        self._read()
        return ok

    @property
    def role(self) -> int:
        return int(self.ctl[CTL_ROLE])

    @property
    def epoch(self) -> int:
        return int(self.ctl[CTL_EPOCH])

    def _peer(self) -> tuple[str, dict] | None:
        """The other live member (at most one other shares the prefix)."""
        for name, info in self.members.items():
            if name != self.name:
                return name, info
        return None

    def _note_epoch(self, epoch: int) -> None:
        """Remember the highest epoch seen, durably, so a restart never goes below it."""
        if epoch > self.known:
            self.known = max(epoch, read_epoch(self.data_dir))
            store_epoch(self.data_dir, self.known)

    # ------------------------------------------------------------------ start
    def start(self, stop: list | None = None) -> None:
        """Choose this node's role (see the module docstring) and set the control block.
        Waits for etcd; raises :class:`Stopped` if ``stop`` becomes true meanwhile."""
        ctl = self.ctl
        self.known = read_epoch(self.data_dir)
        ctl[CTL_PEER_EPOCH] = max(int(ctl[CTL_PEER_EPOCH]), self.known)
        for w in (CTL_IN_SYNC, CTL_ALONE, CTL_VALID_NS, CTL_ALONE_SEEN, CTL_LINK,
                  CTL_HEARD_NS, CTL_REPL_RECV):
            ctl[w] = 0
        self.join = None
        self.said = ""
        tail = self.tail()
        while True:
            if stop:
                raise Stopped
            if not self._read():
                time.sleep(0.2)
                continue
            st, peer = self.state, self._peer()
            floor = max(self.known, int(ctl[CTL_PEER_EPOCH]), int(ctl[CTL_EPOCH]))
            if st is None:
                if peer is not None and (int(peer[1].get("tail", 0)), self.name) > (tail,
                                                                                  peer[0]):
                    self._say("defer-create", f"no pair record in etcd yet; {peer[0]!r} holds "
                              f"more (gseq {peer[1].get('tail')} against {tail}): it starts "
                              "the pair")
                    time.sleep(0.1)
                    continue
                if self._swap(PairState(floor + 1, self.name), "a new pair"):
                    self.log(f"no pair record in etcd: this node starts the pair as primary "
                             f"(epoch {floor + 1}, holding gseq {tail})")
                    self._become_primary()
                    return
                time.sleep(0.05)
                continue
            if st.epoch < floor:
                self._say("old-record", f"etcd's pair record ({st.describe()}) is older than "
                          f"epoch {floor}, which this node has seen: was etcd's data lost "
                          "or restored? (roles follow the record; epochs stay increasing)")
            if st.primary != self.name:
                self._become_backup()
                return
            if (self.release == "replicated" and st.sync and peer is not None
                    and peer[0] == st.sync and peer[1].get("in_sync")
                    and peer[1].get("following") == st.epoch):
                self.log(f"this node was primary at epoch {st.epoch}; under release "
                         f"'replicated' its synchronous backup {st.sync!r} may hold acknowledged "
                         "events that this journal lacks: starting as a backup (it takes over)")
                self._become_backup()
                return
            new = PairState(max(st.epoch, floor) + 1, self.name)
            if self._swap(new, "this node's new incarnation as primary"):
                self._become_primary()
                return
            time.sleep(0.05)

    def _become_primary(self) -> None:
        ctl, st = self.ctl, self.state
        self._note_epoch(st.epoch)
        ctl[CTL_ALONE] = 0 if self.strict else 1  # the record says alone (sync "")
        ctl[CTL_VALID_NS] = 0
        ctl[CTL_EPOCH] = st.epoch
        ctl[CTL_ROLE] = ROLE_PRIMARY  # last: the stages act on the role
        self.role_since = time.monotonic_ns()
        self.join = None
        self.said = ""
        self._publish(force=True)

    def _become_backup(self) -> None:
        ctl, st = self.ctl, self.state
        self._note_epoch(st.epoch)
        ctl[CTL_PEER_EPOCH] = max(int(ctl[CTL_PEER_EPOCH]), st.epoch)
        ctl[CTL_EPOCH] = max(int(ctl[CTL_EPOCH]), st.epoch)
        ctl[CTL_ROLE] = ROLE_BACKUP
        self.role_since = time.monotonic_ns()
        self.said = ""
        self._publish(force=True)

    # ------------------------------------------------------------------ every loop
    def _publish(self, force: bool = False) -> None:
        """This node's member key: put when what it says changes, its lease kept alive
        every second otherwise (the tail it carries is as of the last put: it matters to
        nodes that start, whose tails do not move)."""
        ctl = self.ctl
        backup = self.role == ROLE_BACKUP
        # "following" before "in_sync": the replica clears IN_SYNC before it publishes a
        # new epoch, so an in_sync read after a new "following" is never the old link's.
        # IN_SYNC outlives the link (a restarting primary reads it to hand over).
        key = (self.role, self.epoch,
               int(ctl[CTL_PEER_EPOCH]) if backup else self.epoch,
               bool(backup and ctl[CTL_IN_SYNC]))
        now = time.monotonic_ns()
        changed = force or key != self.published
        if not changed and now < self.next_publish:
            return
        info = None
        if changed:
            info = {"role": ROLE_NAMES.get(key[0], "?"), "epoch": key[1],
                    "following": key[2], "in_sync": key[3], "tail": self.tail()}
        try:
            self.store.publish_member(self.name, info)
        except CoordError:
            self.next_publish = now + 5 * self.poll_ns
            return  # said by the reads
        self.published = key
        self.next_publish = now + _MS * 1000 * self.store.member_ttl // 3

    def tick(self) -> str | None:
        """One step, every supervisor loop. Returns why the node must restart as a backup
        (a demotion), or None."""
        now = time.monotonic_ns()
        self._note_epoch(int(self.ctl[CTL_PEER_EPOCH]))
        if now >= self.next_read:
            self.next_read = now + self.poll_ns
            self._read()
        self._publish()
        if self.role == ROLE_PRIMARY:
            return self._primary(now)
        self._backup(now)
        return None

    def _primary(self, now: int) -> str | None:
        ctl, st = self.ctl, self.state
        peer_epoch = int(ctl[CTL_PEER_EPOCH])
        if peer_epoch > self.epoch:
            return (f"the backup knows epoch {peer_epoch}, newer than this primary's "
                    f"{self.epoch}: demoting to backup")
        if st is not None and self.fresh and (st.epoch > self.epoch or
                                              st.primary != self.name):
            return f"etcd records {st.describe()}: this primary (epoch {self.epoch}) demotes"
        if st is None or st.epoch != self.epoch:
            return None  # (etcd unreachable since the start: nothing to decide)
        silent = now - max(int(ctl[CTL_HEARD_NS]), self.role_since)
        if st.sync:
            ctl[CTL_ALONE] = 0
            fenced = now >= int(ctl[CTL_VALID_NS])
            if fenced and not self.fenced:
                self.log(f"fenced at epoch {self.epoch}: no echo from the backup {st.sync!r} "
                         f"for {silent / _MS:.0f} ms (it may be promoting); acknowledging and "
                         "publishing nothing")
            self.fenced = fenced
            if silent < self.alone_after_ns:
                self.said = ""
                return None
            if self.strict:
                self._say("strict", f"the backup {st.sync!r} has been silent for "
                          f"{silent / _MS:.0f} ms; strict: acknowledging nothing until it is "
                          "back")
                return None
            if self._swap(PairState(st.epoch, self.name), "running alone"):
                ctl[CTL_ALONE] = 1
                self.log(f"running alone at epoch {st.epoch}: the backup {st.sync!r} has been "
                         f"silent for {silent / _MS:.0f} ms; acknowledging on this node's "
                         "durability (the backup may not take over until it is in sync again)")
            return None
        # The record says alone.
        if self.join is None:
            ctl[CTL_ALONE] = 0 if self.strict else 1
            peer = self._peer()
            if (peer is not None and ctl[CTL_LINK] and silent < self.alone_after_ns
                    and peer[1].get("in_sync") and peer[1].get("following") == self.epoch):
                self.join = (peer[0], -1)
                ctl[CTL_ALONE] = 0  # (1) stop releasing alone
            return None
        name, target = self.join
        if not ctl[CTL_LINK] or silent >= self.alone_after_ns:
            self.log(f"the backup {name!r} went away before it was recorded as synchronous")
            self.join = None
            ctl[CTL_ALONE] = 0 if self.strict else 1
            return None
        if target < 0:
            if int(ctl[CTL_ALONE_SEEN]) != 1:  # ingest acts on it (ALONE + 1)
                return None
            self.join = (name, int(ctl[CTL_SEQUENCED]))  # (2) what it must hold
            return None
        if int(ctl[CTL_REPL_RECV]) < target:
            return None
        ok = self._swap(PairState(st.epoch, self.name, name),  # (3)
                        f"{name!r} as the synchronous backup")
        if ok:
            self.log(f"the backup {name!r} is synchronous again at epoch {st.epoch} (it holds "
                     f"gseq {int(ctl[CTL_REPL_RECV])}, at least {target})")
        elif ok is False:
            ctl[CTL_ALONE] = 0 if self.strict else 1
        self.join = None
        return None

    def _backup(self, now: int) -> None:
        ctl, st = self.ctl, self.state
        silent = now - max(int(ctl[CTL_HEARD_NS]), self.role_since)
        if silent < self.failover_ns:
            self.said = ""
            return
        following = int(ctl[CTL_PEER_EPOCH])
        quiet = f"the primary has been silent for {silent / _MS:.0f} ms"
        if self.fresh and now - self.read_at > 50 * _MS:
            self._read()  # decide on a record at most 50 ms old (the swap checks it too)
            st = self.state
        if not ctl[CTL_IN_SYNC]:
            self._say("unsynced", f"{quiet}, but this backup is not in sync with it: not "
                      "promoting")
            return
        if st is None or not self.fresh:
            self._say("no-etcd", f"{quiet}; promoting needs etcd, which does not answer: "
                      "waiting for it")
            return
        if st.primary == self.name:
            if st.epoch > max(following, self.epoch):  # our own swap, its answer lost
                self._become_primary()
                self.log(f"promoted to primary at epoch {st.epoch}: etcd recorded this "
                         "node's promotion (the answer to it had been lost)")
            return
        if st.sync != self.name:
            self._say("not-sync", f"{quiet}, but etcd records {st.describe()}: this backup "
                      "may lack what it acknowledged; not promoting (waiting for "
                      f"{st.primary!r})")
            return
        if st.epoch != following:
            self._say("epoch", f"{quiet}, but etcd's record is at epoch {st.epoch} and this "
                      f"backup follows epoch {following}: not promoting")
            return
        new = PairState(max(st.epoch, self.known, self.epoch) + 1, self.name)
        if self._swap(new, "the promotion"):
            self._become_primary()
            self.log(f"promoted to primary at epoch {new.epoch}: {quiet} "
                     f"(etcd recorded it; was {st.describe()})")

    def close(self, withdraw: bool) -> None:
        if withdraw:
            self.store.withdraw_member(self.name)
        self.store.close()
