"""A cluster of live partition nodes (SPEC section 5): `exposure send --cluster` routes a
seeded stream, each partition's ingest rejects what it does not own, and the composed
document (`exposure dump --cluster`) equals replay of the whole stream. The streams quote
instruments in several currencies and move the rates throughout (SPEC section 7): every
partition applies every fx, the cluster counts it once, through a kill -9, a restart and a
pair's failover."""

import os
import signal
import subprocess
import sys

import numpy as np
import orjson
import pytest

from exposure.cluster.topology import replay_cluster, replay_partition
from exposure.core.routing import split
from exposure.engine.desk import Desk
from exposure.engine.document import compare_documents, document
from exposure.engine.replay import replay_records
from exposure.feed.subscriber import Subscriber
from exposure.harness.cluster import LocalCluster
from exposure.harness.wait import WaitTimeout, wait_for
from tests.clusterflow import cluster_stream
from tests.nodes import etcd_or_skip

pytestmark = [pytest.mark.timeout(400), pytest.mark.process]

def _cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "exposure", *args], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _applied(c: LocalCluster, recs, nodes=None) -> None:
    """Wait until each partition has applied (and published) everything routed to it."""
    for n, sub in zip(nodes or c.nodes, split(recs, c.cluster.pmap), strict=True):
        want = len(sub)
        wait_for(lambda n=n, want=want: n.last_gseq() == want, 60,
                 f"{n.name} applies {want} events")


def _cluster_rows(doc: dict) -> dict:
    """What the consolidator publishes: accounts, fund, instruments, sectors and (feed
    version 4) positions."""
    return {k: doc[k] for k in ("accounts", "fund", "instruments", "sectors", "positions")}


def _converged(c: LocalCluster, want: dict):
    """Wait until the consolidator's segment (a Desk) and its feed (a Subscriber) both
    show ``want``'s rows; returns the subscriber's counters."""
    want = _cluster_rows(want)
    with Subscriber.from_config(c.cons_config) as sub:
        def same() -> bool:
            sub.poll(0.05)
            try:
                with Desk(c.cons_name) as desk:
                    seg = _cluster_rows(desk.document())
            except (FileNotFoundError, TimeoutError):
                return False
            return (compare_documents(seg, want) == []
                    and compare_documents(sub.document(), want) == [])
        try:
            wait_for(same, 60, "the consolidator shows the cluster's rows", step=0.05)
        except WaitTimeout:
            with Desk(c.cons_name) as desk:
                print(compare_documents(_cluster_rows(desk.document()), want))
            print(compare_documents(sub.document(), want))
            raise
        return sub.counters


def _rates_agree(c: LocalCluster, recs) -> None:
    """The consolidator's instrument rows carry each instrument's currency and its rate as
    replay has them (SPEC section 7: every partition saw every fx)."""
    st = replay_records(recs)
    with Desk(c.cons_name) as desk:
        ins = desk.instruments()
    cur = st.inst["currency"][ins["instrument"]]
    assert (ins["currency"] == cur).all() and (cur != 0).any()
    assert (ins["rate"] == st.rate[cur]).all()
    assert len(np.unique(ins["rate"])) > 2


def test_three_partitions_and_the_consolidator_through_its_restart(tmp_path):
    """Three partitions. The consolidator's segment and feed equal the composed document,
    which equals replay of the whole stream; killed (-9) and restarted mid-stream (then
    spinning on a pinned CPU: [consolidator] wait = "spin"), it rebuilds from the
    partitions' snapshots, and its subscribers from its own.
    `exposure status --cluster` shows every partition and the consolidator."""
    seed = 33
    print(f"seed {seed}")
    two = LocalCluster(tmp_path, [("p0", [[0, 999]], [[0, 3]]),
                                  ("p1", [[1000, 2999]], [[4, 9]]),
                                  ("p2", [[3000, 4095]], [[10, 15]])])
    try:
        two.start()
        _consolidator_through_a_restart(two, tmp_path, seed)
    finally:
        two.stop()
    for n in two.nodes:
        assert n.segments() == [], f"{n.name} left segments behind"


def _consolidator_through_a_restart(two: LocalCluster, tmp_path, seed: int) -> None:
    pm = two.cluster.pmap
    recs, _ = cluster_stream(seed, pm, n=6_000, currencies=3)
    half = len(recs) // 2
    two.start_consolidator()
    two.send(recs[:half])
    _applied(two, recs[:half])
    _converged(two, document(replay_records(recs[:half])))
    two.stop_consolidator(signal.SIGKILL)
    two.send(recs, "--retry", "60")  # the rest, while it is down
    two.consolidator_process('cpu = -1\nwait = "spin"\n')  # restarted polling, pinned
    two.start_consolidator()
    assert os.sched_getaffinity(two.cons.pid) == {two.cluster.consolidator_cpu}
    _applied(two, recs)
    want = document(replay_records(recs))
    assert compare_documents(two.dump(), want) == []
    _converged(two, want)
    _rates_agree(two, recs)
    watched = orjson.loads(_cli("watch", "--config", str(two.cons_config), "--seconds",
                                "1.5", "--json"))  # as one node's feed
    assert compare_documents(watched, _cluster_rows(want)) == []
    st = orjson.loads(_cli("status", "--cluster", str(two.file), "--json"))
    assert [p["state"] for p in st["partitions"]] == ["primary"] * 3
    assert [p["wrong_partition"] for p in st["partitions"]] == [0] * 3
    assert st["consolidator"]["state"] == "running"
    assert abs(st["consolidator"]["fund"]["crossing"] - want["fund"]["crossing"]) < 1e-3
    text = _cli("status", "--cluster", str(two.file))
    assert text.startswith("cluster t: 3 partitions") and "cons " in text, text
    two.stop_consolidator()
    assert not os.path.exists(f"/dev/shm/exposure.{two.cons_name}.tally")


def test_misrouted_events_a_restart_and_a_pair_failover_leave_the_cluster_exact(tmp_path):
    """p0 is a node, p1 a primary/backup pair (its own etcd prefix), with the consolidator.
    A seeded stream with 1% misrouted orders; halfway p0 is killed (-9) and restarted and
    p1's primary is killed (-9): the backup takes over, the client resends what each
    partition does not hold (failing over to p1's backup), the consolidator follows the
    pair. Each misrouted event is rejected as wrong_partition and changes nothing else; the
    composed document equals replay of the whole stream, each partition equals replay of
    what was routed to it, and the consolidator's segment and feed show the cluster."""
    seed = 35
    print(f"seed {seed}")
    etcd = etcd_or_skip(tmp_path)
    c = LocalCluster(tmp_path, [("p0", [[0, 2047]], [[0, 7]]),
                                ("p1", [[2048, 4095]], [[8, 15]])], pairs={"p1": etcd})
    try:
        c.start()
        c.start_consolidator()
        pm = c.cluster.pmap
        recs, bad = cluster_stream(seed, pm, n=12_000, misroute=0.01, currencies=4)
        half = len(recs) // 2
        c.send(recs[:half])
        _applied(c, recs[:half])
        assert compare_documents(c.dump(), replay_cluster(recs[:half], pm)) == []
        pair = c.pairs["p1"]
        c.nodes[0].kill9()
        c.nodes[0].start()
        pair.a.kill9()
        res = c.send(recs, "--retry", "60")
        assert res["events"] == len(recs)
        assert res["delivered"] == sum(len(s) for s in split(recs, pm))
        assert res["partitions"]["p0"]["resent_skipped"] > 0  # it held the first half
        assert res["partitions"]["p1"]["endpoint"].endswith(f":{pair.b.port}")
        assert set(res["rejects"]) <= {"wrong_partition"}
        nodes = [c.nodes[0], pair.b]
        _applied(c, recs, nodes=nodes)
        got = c.dump()  # p1 read from its new primary
        assert compare_documents(got, replay_cluster(recs, pm)) == []
        want = document(replay_records(recs[~bad]))  # misrouted: rejected, nothing moves
        want["counts"]["rejected"] += int(bad.sum())
        want["counts"]["rejects"]["wrong_partition"] = int(bad.sum())
        assert compare_documents(got, want) == []
        for k, n in enumerate(nodes):
            mine = n.dump(process=False)
            assert compare_documents(mine, document(replay_partition(recs, pm, k))) == []
        assert "partition p0 of" in c.nodes[0].log.read_text()  # its banner: what it owns
        _converged(c, want)
        _rates_agree(c, recs)
    finally:
        c.stop()
        etcd.stop()
