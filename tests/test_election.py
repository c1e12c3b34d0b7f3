"""The pair's roles (exposure.pair.election) against a real single-member etcd: who starts the
pair, who follows, when a backup may promote itself, when a primary runs alone and when it
records its backup as synchronous again, demotion, strict mode, and etcd outages. The
control block is a plain array here (the stages' side is the pair tests')."""

import threading
import time

import numpy as np
import pytest
from nodes import etcd_or_skip

from exposure.pair.coord import CoordError, PairState, PairStore
from exposure.pair.election import Election, Stopped
from exposure.shm.control import (
    CONTROL_WORDS,
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
    ROLE_BACKUP,
    ROLE_PRIMARY,
)

pytestmark = pytest.mark.process


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = etcd_or_skip(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


_n = iter(range(1 << 30))


@pytest.fixture
def prefix():
    return f"/test-election/{time.time_ns()}-{next(_n)}"


class Member:
    """One node's Election with its own control block, data directory and log."""

    def __init__(self, etcd, prefix, tmp_path, name, release="replicated+local",
                 strict=False, tail=0):
        self.ctl = np.zeros(CONTROL_WORDS, np.uint64)
        self.lines: list[str] = []
        self.data = tmp_path / name
        self.data.mkdir(exist_ok=True)
        self.tail_value = tail
        self.e = Election(name, self.ctl, PairStore([etcd.url], prefix), self.data,
                          release=release, failover_ms=300, alone_after_ms=200,
                          strict=strict, tail=lambda: self.tail_value, log=self.lines.append,
                          poll_ms=10)

    @property
    def role(self):
        return int(self.ctl[CTL_ROLE])

    def silent(self, ms: float) -> None:
        """The peer was last heard ``ms`` ago (and the role is that old too)."""
        past = time.monotonic_ns() - int(ms * 1e6)
        self.ctl[CTL_HEARD_NS] = past
        self.e.role_since = min(self.e.role_since, past)

    def tick(self):
        self.e.next_read = 0  # read etcd now
        return self.e.tick()

    def log(self) -> str:
        return "\n".join(self.lines)


def record(etcd, prefix) -> PairState | None:
    s = PairStore([etcd.url], prefix)
    try:
        return s.read()[0]
    finally:
        s.close()


def force(etcd, prefix, new: PairState) -> None:
    """An operator's (or another node's) change of the record."""
    s = PairStore([etcd.url], prefix)
    try:
        _, rev, _ = s.read()
        assert s.swap(rev, new)
    finally:
        s.close()


def make_pair(etcd, prefix, tmp_path, **kw):
    """a primary, b its backup, in sync and recorded as synchronous."""
    a = Member(etcd, prefix, tmp_path, "a", **kw)
    a.e.start()
    b = Member(etcd, prefix, tmp_path, "b", **kw)
    b.e.start()
    epoch = int(a.ctl[CTL_EPOCH])
    force(etcd, prefix, PairState(epoch, "a", "b"))
    b.ctl[CTL_IN_SYNC] = b.ctl[CTL_LINK] = 1
    for m in (a, b):
        m.ctl[CTL_HEARD_NS] = time.monotonic_ns()
        m.tick()
    return a, b


# ---------------------------------------------------------------------------------- start
@pytest.mark.timeout(60)
def test_the_first_node_starts_the_pair_as_primary_running_alone(etcd, prefix, tmp_path):
    a = Member(etcd, prefix, tmp_path, "a")
    (a.data / "epoch").write_text("41\n")  # it has been primary before, at epoch 41
    a.e.start()
    assert a.role == ROLE_PRIMARY and int(a.ctl[CTL_ALONE]) == 1
    assert record(etcd, prefix) == PairState(42, "a", "")
    assert int(a.ctl[CTL_EPOCH]) == 42 and (a.data / "epoch").read_text().strip() == "42"


@pytest.mark.timeout(60)
def test_the_second_node_follows_the_recorded_primary(etcd, prefix, tmp_path):
    a = Member(etcd, prefix, tmp_path, "a")
    a.e.start()
    b = Member(etcd, prefix, tmp_path, "b")
    b.e.start()
    assert b.role == ROLE_BACKUP
    assert int(b.ctl[CTL_PEER_EPOCH]) == int(a.ctl[CTL_EPOCH])  # refuses older primaries


@pytest.mark.timeout(60)
def test_with_no_record_the_node_holding_more_starts_the_pair(etcd, prefix, tmp_path):
    small = Member(etcd, prefix, tmp_path, "small", tail=10)
    big = Member(etcd, prefix, tmp_path, "big", tail=500)
    big.e._publish(force=True)  # alive, holding gseq 500
    reads = []  # each time "small" reads etcd's record while it starts
    read = small.e._read
    small.e._read = lambda: reads.append(1) or read()
    done = threading.Event()
    t = threading.Thread(target=lambda: (small.e.start(), done.set()), daemon=True)
    t.start()
    # It defers to "big" (it says so once), then reads etcd again and again: three reads
    # after saying so, the moment to create the record has passed.
    deadline = time.monotonic() + 20
    while "'big' holds more" not in small.log():
        assert time.monotonic() < deadline, f"'small' never deferred: {small.log()!r}"
        time.sleep(0.005)
    seen = len(reads)
    while len(reads) < seen + 3:
        assert time.monotonic() < deadline, "'small' stopped reading etcd's record"
        time.sleep(0.005)
    assert not done.is_set() and record(etcd, prefix) is None  # it defers to "big"
    big.e.start()
    assert big.role == ROLE_PRIMARY
    t.join(10)
    assert done.is_set() and small.role == ROLE_BACKUP


@pytest.mark.timeout(60)
def test_a_restarted_primary_gets_a_new_epoch_and_runs_alone(etcd, prefix, tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path)
    old = int(a.ctl[CTL_EPOCH])
    a.e.start()  # its processes restart
    assert a.role == ROLE_PRIMARY and int(a.ctl[CTL_EPOCH]) == old + 1
    assert record(etcd, prefix) == PairState(old + 1, "a", "")  # b must catch up again


@pytest.mark.timeout(60)
def test_under_replicated_a_restarted_primary_lets_its_synchronous_backup_take_over(
        etcd, prefix, tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path, release="replicated")
    b.e._publish(force=True)  # b: alive, in sync, following a's epoch
    a.e.start()
    assert a.role == ROLE_BACKUP
    assert "starting as a backup" in a.log()
    b.silent(400)
    b.tick()
    assert b.role == ROLE_PRIMARY


# ------------------------------------------------------------------------------ promotion
@pytest.mark.timeout(60)
def test_a_backup_promotes_only_when_silent_in_sync_and_recorded_synchronous(etcd, prefix,
                                                                            tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path)
    epoch = int(a.ctl[CTL_EPOCH])
    b.silent(100)                       # not silent long enough
    b.tick()
    assert b.role == ROLE_BACKUP
    b.silent(400)
    b.ctl[CTL_IN_SYNC] = 0              # not in sync
    b.tick()
    assert b.role == ROLE_BACKUP and "not in sync" in b.log()
    b.ctl[CTL_IN_SYNC] = 1
    b.ctl[CTL_PEER_EPOCH] = epoch - 1   # following an older epoch than the record's
    b.tick()
    assert b.role == ROLE_BACKUP and "follows epoch" in b.log()
    b.ctl[CTL_PEER_EPOCH] = epoch
    b.tick()
    assert b.role == ROLE_PRIMARY and int(b.ctl[CTL_EPOCH]) == epoch + 1
    assert record(etcd, prefix) == PairState(epoch + 1, "b", "")
    # the old primary learns it from etcd and demotes
    why = a.tick()
    assert why and "demotes" in why


@pytest.mark.timeout(60)
def test_a_backup_the_record_does_not_name_never_promotes(etcd, prefix, tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path)
    force(etcd, prefix, PairState(int(a.ctl[CTL_EPOCH]), "a", ""))  # a runs alone
    b.silent(5_000)
    for _ in range(3):
        b.tick()
    assert b.role == ROLE_BACKUP
    assert "may lack what it acknowledged; not promoting" in b.log()


# ------------------------------------------------------------------------- running alone
@pytest.mark.timeout(60)
def test_a_primary_whose_backup_is_silent_records_running_alone_then_acknowledges(
        etcd, prefix, tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path)
    assert int(a.ctl[CTL_ALONE]) == 0
    a.silent(250)
    a.tick()
    assert record(etcd, prefix).sync == "" and int(a.ctl[CTL_ALONE]) == 1
    assert "running alone" in a.log()


@pytest.mark.timeout(60)
def test_strict_never_runs_alone(etcd, prefix, tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path, strict=True)
    a.silent(5_000)
    a.tick()
    assert record(etcd, prefix).sync == "b" and int(a.ctl[CTL_ALONE]) == 0
    assert "strict" in a.log()


@pytest.mark.timeout(60)
def test_running_alone_and_promotion_exclude_each_other(etcd, prefix, tmp_path):
    """Both read the same record; both try their compare-and-swap: exactly one wins."""
    a, b = make_pair(etcd, prefix, tmp_path)
    a.silent(400)
    b.silent(400)
    a.e._read()
    b.e._read()
    a.e.next_read = b.e.next_read = time.monotonic_ns() + 10**10  # act on what they read
    a.e.tick()
    b.e.tick()
    rec = record(etcd, prefix)
    alone = int(a.ctl[CTL_ALONE]) == 1
    promoted = b.role == ROLE_PRIMARY
    assert alone != promoted
    assert rec == (PairState(rec.epoch, "a", "") if alone else PairState(rec.epoch, "b", ""))


@pytest.mark.timeout(60)
def test_a_backup_back_in_sync_is_recorded_synchronous_only_once_it_holds_everything(
        etcd, prefix, tmp_path):
    a = Member(etcd, prefix, tmp_path, "a")
    a.e.start()
    b = Member(etcd, prefix, tmp_path, "b")
    b.e.start()
    epoch = int(a.ctl[CTL_EPOCH])
    a.ctl[CTL_SEQUENCED] = 90
    a.ctl[CTL_LINK] = 1
    a.ctl[CTL_HEARD_NS] = time.monotonic_ns()
    a.tick()
    assert int(a.ctl[CTL_ALONE]) == 1  # b has not said it is in sync
    b.ctl[CTL_IN_SYNC] = b.ctl[CTL_LINK] = 1
    b.ctl[CTL_HEARD_NS] = time.monotonic_ns()
    b.tick()  # publishes: in sync, following a's epoch
    a.tick()
    assert int(a.ctl[CTL_ALONE]) == 0  # (1) stops releasing alone ...
    a.tick()
    assert record(etcd, prefix).sync == ""  # ... and waits for ingest to confirm it
    a.ctl[CTL_ALONE_SEEN] = 1
    a.ctl[CTL_SEQUENCED] = 100
    a.tick()                            # (2) the target: what ingest had sequenced
    a.ctl[CTL_REPL_RECV] = 99
    a.tick()
    assert record(etcd, prefix).sync == ""
    a.ctl[CTL_REPL_RECV] = 100
    a.tick()                            # (3) recorded
    assert record(etcd, prefix) == PairState(epoch, "a", "b")
    assert "synchronous again" in a.log()


# ---------------------------------------------------------------------------- demotion
@pytest.mark.timeout(60)
def test_a_primary_demotes_on_a_newer_epoch_from_etcd_or_from_its_backup(etcd, prefix,
                                                                       tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path)
    epoch = int(a.ctl[CTL_EPOCH])
    a.ctl[CTL_PEER_EPOCH] = epoch + 3
    assert "newer than this primary's" in a.tick()
    a.ctl[CTL_PEER_EPOCH] = epoch
    force(etcd, prefix, PairState(epoch + 1, "b", ""))
    assert "demotes" in a.tick()


# --------------------------------------------------------------------------- etcd outage
@pytest.mark.timeout(60)
def test_without_etcd_a_healthy_pair_keeps_its_roles_and_a_transition_waits(
        etcd, prefix, tmp_path):
    a, b = make_pair(etcd, prefix, tmp_path)
    etcd.pause()
    try:
        a.ctl[CTL_HEARD_NS] = time.monotonic_ns()
        assert a.tick() is None and a.role == ROLE_PRIMARY  # serving on
        assert "serving on" in a.log()
        b.silent(400)
        b.tick()
        assert b.role == ROLE_BACKUP and "waiting for it" in b.log()
        with pytest.raises(CoordError):
            PairStore([etcd.url], prefix, timeout=0.2).read()
    finally:
        etcd.resume()
    b.silent(400)
    b.tick()
    assert b.role == ROLE_PRIMARY  # once etcd answers, the promotion goes through


@pytest.mark.timeout(60)
def test_start_waits_for_etcd_and_can_be_stopped(etcd, prefix, tmp_path):
    a = Member(etcd, prefix, tmp_path, "a")
    etcd.pause()
    try:
        stop: list = []
        threading.Timer(0.6, lambda: stop.append(1)).start()
        with pytest.raises(Stopped):
            a.e.start(stop)
        assert "cannot read the pair's record" in a.log()
    finally:
        etcd.resume()


@pytest.mark.timeout(60)
def test_a_promotion_whose_answer_was_lost_is_taken_from_the_record(etcd, prefix, tmp_path):
    """The swap went through but its answer never arrived (a timeout): the record names
    this backup primary at a new epoch, so it is."""
    a, b = make_pair(etcd, prefix, tmp_path)
    epoch = int(a.ctl[CTL_EPOCH])
    force(etcd, prefix, PairState(epoch + 1, "b", ""))  # as b's own swap would have
    b.silent(400)
    b.tick()
    assert b.role == ROLE_PRIMARY and int(b.ctl[CTL_EPOCH]) == epoch + 1
    assert "answer to it had been lost" in b.log()
