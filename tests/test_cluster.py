"""A cluster (SPEC section 5): the partition map, routing, wrong_partition, composition.

Offline here (each partition replays what the router gives it, marked as its ingest marks
it); with live partition nodes in tests/test_cluster_live.py.
"""

import numpy as np
import pytest

from exposure.cluster.topology import compose, replay_cluster, replay_partition, state_view
from exposure.config.node import ConfigError, load_config
from exposure.core.partition import ALL, MapError, PartitionMap
from exposure.core.routing import mark, route, split
from exposure.core.types import (
    EVENT_DTYPE,
    R_BAD_FIELD,
    R_WRONG_PARTITION,
    T_CANCEL,
    T_FILL,
    T_FX,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_NEW,
    T_POSITION,
    T_REPLACE,
)
from exposure.engine.document import compare_documents, document
from exposure.engine.replay import replay_records
from tests.clusterflow import cluster_stream, three_partitions, two_partitions

pytestmark = pytest.mark.timeout(300)


def _rec(**kw) -> np.ndarray:
    r = np.zeros(1, EVENT_DTYPE)
    for k, v in kw.items():
        r[k] = v
    return r


def test_each_event_goes_where_the_map_says():
    pm = two_partitions()
    recs = np.concatenate([
        _rec(type=T_NEW, source=9, account=5),        # orders: by source
        _rec(type=T_CANCEL, source=3),
        _rec(type=T_FILL, source=8, account=2048),
        _rec(type=T_POSITION, account=3000, source=1),  # position, limit: by account
        _rec(type=T_LIMIT, account=12),
        _rec(type=T_MARK, instrument=7),              # mark, instrument, fx: everyone
        _rec(type=T_INSTRUMENT, instrument=7),
        _rec(type=T_FX, qty=2, price=1.1),
        _rec(type=0),                                  # no valid type: the first partition
        _rec(type=99, source=9),
        _rec(type=T_NEW, source=500, account=3000),    # an id the map leaves out: the first
        _rec(type=T_REPLACE, source=5000),             # beyond the map: the first
    ])
    assert route(recs, pm).tolist() == [1, 0, 1, 1, 0, ALL, ALL, ALL, 0, 0, 0, 0]
    parts = split(recs, pm)
    assert [len(p) for p in parts] == [9, 6]
    assert parts[1]["type"].tolist() == [T_NEW, T_FILL, T_POSITION, T_MARK, T_INSTRUMENT,
                                         T_FX]


def test_a_partition_marks_what_it_does_not_own():
    pm = two_partitions()
    recs = np.concatenate([
        _rec(type=T_NEW, source=1, account=5),         # owned
        _rec(type=T_NEW, source=1, account=3000),      # account elsewhere
        _rec(type=T_FILL, source=9, account=5),        # source elsewhere
        _rec(type=T_CANCEL, source=9),
        _rec(type=T_LIMIT, account=2048),
        _rec(type=T_MARK, instrument=3),               # everyone's
        _rec(type=T_FX, qty=1, price=0.5, source=9, account=3000),  # everyone's
        _rec(type=T_NEW, source=1, account=3000, reject=R_BAD_FIELD),  # decided already
        _rec(type=T_CANCEL, source=1, reject=R_WRONG_PARTITION),  # a client's claim
    ])
    assert mark(recs, pm, 0) == 4
    assert recs["reject"].tolist() == [0, 8, 8, 8, 8, 0, 0, R_BAD_FIELD, R_BAD_FIELD]


def test_wrong_partition_comes_after_out_of_range_and_before_the_order_rules():
    pm = two_partitions()
    recs = np.concatenate([
        _rec(type=T_NEW, source=1, account=3000, instrument=70000, side=1, qty=1),
        _rec(type=T_NEW, source=1, account=3000, instrument=1, side=1, qty=0),
        _rec(type=T_CANCEL, source=9, order_id=77),    # unknown there too: wrong_partition
        _rec(type=T_NEW, source=1, account=3000, instrument=1, side=1, qty=5, price=2.0),
    ])
    mark(recs, pm, 0)  # as partition 0's ingest would, whatever the router did
    doc = document(replay_records(recs))
    assert doc["counts"]["rejects"] == {"out_of_range": 1, "bad_field": 1,
                                        "wrong_partition": 2}
    assert doc["accounts"] == [] and doc["instruments"] == [] and doc["positions"] == []


def test_a_map_gives_each_id_at_most_one_partition():
    with pytest.raises(MapError, match="account 100 is already in partition 'a'"):
        PartitionMap.from_ranges([("a", [[0, 100]], []), ("b", [[100, 200]], [])], 4096, 1024)
    with pytest.raises(MapError, match=r"\[0, 5000\] is not within 0..4095"):
        PartitionMap.from_ranges([("a", [[0, 5000]], [])], 4096, 1024)
    with pytest.raises(MapError, match="used twice"):
        PartitionMap.from_ranges([("a", [1], []), ("a", [2], [])], 4096, 1024)
    assert two_partitions().describe(1) == "accounts 2048-4095, sources 8-15"
    assert three_partitions().describe(1) == "accounts 1000-2999, 4095, sources 4-9, 1000"


@pytest.mark.parametrize("pmap,seed,ccy", [(two_partitions, 11, 0), (two_partitions, 12, 4),
                                           (three_partitions, 13, 3)])
def test_the_cluster_equals_replay_of_the_whole_stream(pmap, seed, ccy):
    """(``ccy``: instruments in that many currencies besides the base, with moving rates:
    SPEC section 7, every partition sees every fx and the cluster counts it once.)"""
    print(f"seed {seed}")
    pm = pmap()
    recs, _ = cluster_stream(seed, pm, currencies=ccy)
    assert (recs["type"] == T_FX).sum() > (150 if ccy else -1)
    want = document(replay_records(recs))
    got = replay_cluster(recs, pm)
    assert compare_documents(got, want) == []
    assert got["fund"]["crossing"] > 0  # PMs hold exposure against each other
    assert len({r["account"] for r in got["accounts"]}) == 40 * pm.partitions
    # and each partition equals replay of the events routed to it
    for k, sub in enumerate(split(recs, pm)):
        assert compare_documents(document(replay_partition(recs, pm, k)),
                                 document(replay_records(sub))) == []


def test_misrouted_events_are_rejected_and_change_nothing_else():
    seed = 21
    print(f"seed {seed}")
    pm = three_partitions()
    recs, bad = cluster_stream(seed, pm, n=10_000, misroute=0.05)
    assert bad.sum() > 100
    got = replay_cluster(recs, pm)
    want = document(replay_records(recs[~bad]))
    want["counts"]["rejected"] += int(bad.sum())
    want["counts"]["rejects"]["wrong_partition"] = int(bad.sum())
    assert compare_documents(got, want) == []


def test_marks_instruments_and_fx_count_once():
    pm = three_partitions()
    recs = np.concatenate([_rec(type=T_MARK, instrument=1, price=2.0),
                           _rec(type=T_MARK, instrument=1, price=-1.0),       # bad_field
                           _rec(type=T_MARK, instrument=70000, price=1.0),   # out_of_range
                           _rec(type=T_INSTRUMENT, instrument=1, x0=2.0, x1=0.1, x2=1.0,
                                sector=3, qty=2),
                           _rec(type=T_FX, qty=2, price=0.5),               # SPEC 7
                           _rec(type=T_FX, qty=0, price=0.5),               # bad_field
                           _rec(type=T_FX, qty=256, price=0.5),             # out_of_range
                           _rec(type=T_POSITION, account=5, instrument=1, qty=10)])
    views = [state_view(replay_partition(recs, pm, k)) for k in range(3)]
    assert [v.document["counts"]["accepted"] for v in views] == [4, 3, 3]  # p0: the position
    got = compose(views, pm)
    assert got["counts"] == document(replay_records(recs))["counts"] == {
        "accepted": 4, "rejected": 4, "late_fills": 0, "busts": 0, "rolls": 0,
        "rejects": {"bad_field": 2, "out_of_range": 2}}
    # every partition holds the rate; the fund's net long is valued at it (10 x 2 x 2 x 0.5)
    assert all(v.rates == {1: 0.5} for v in views)
    assert got["fund"]["net_long_mv"] == 20.0 == got["fund"]["gross"]


def test_a_node_config_names_its_partition(tmp_path):
    cl = tmp_path / "cluster.toml"
    cl.write_text('[[partition]]\nname = "p0"\nconfig = "p0.toml"\naccounts = [[0, 9]]\n'
                  'sources = [0]\n')
    p0 = tmp_path / "p0.toml"
    p0.write_text('[partition]\ncluster = "cluster.toml"\nname = "p0"\n')
    part = load_config(p0).partition
    assert (part.name, part.index, part.cluster) == ("p0", 0, cl)
    assert part.pmap.describe(0) == "accounts 0-9, sources 0"
    p0.write_text('[partition]\ncluster = "cluster.toml"\nname = "p9"\n')
    with pytest.raises(ConfigError, match="no partition 'p9'"):
        load_config(p0)
    p0.write_text('[partition]\nname = "p0"\n')
    with pytest.raises(ConfigError, match="needs partition.cluster"):
        load_config(p0)


def test_the_consolidator_s_cpu_and_wait_are_checked(tmp_path):
    import os

    from exposure.cluster.topology import ClusterError, load_cluster

    (tmp_path / "p0.toml").write_text('[partition]\ncluster = "cluster.toml"\nname = "p0"\n')
    (tmp_path / "cons.toml").write_text('[node]\nname = "cons-x"\n')
    base = ('[[partition]]\nname = "p0"\nconfig = "p0.toml"\naccounts = [[0, 9]]\n'
            'sources = [0]\n[consolidator]\nconfig = "cons.toml"\n')
    cl = tmp_path / "cluster.toml"
    cl.write_text(base)
    c = load_cluster(cl)
    assert (c.consolidator_cpu, c.consolidator_wait) == (None, "block")
    last = sorted(os.sched_getaffinity(0))[-1]
    cl.write_text(base + 'cpu = -1\nwait = "spin"\n')
    c = load_cluster(cl)
    assert (c.consolidator_cpu, c.consolidator_wait) == (last, "spin")
    for extra, msg in (('wait = "spin"\n', "needs a cpu of its own"),
                       ('wait = "nap"\n', "one of block, spin"),
                       ("cpu = 4096\n", "this machine has CPUs"),
                       ('cpu = "1"\n', "a CPU number"),
                       ("cpu = true\n", "a CPU number"),
                       ("cores = 2\n", "unknown key consolidator.cores")):
        cl.write_text(base + extra)
        with pytest.raises(ClusterError, match=msg):
            load_cluster(cl)


def test_every_partition_and_the_consolidator_name_the_same_currencies(tmp_path):
    """SPEC section 7: an id means one currency across the cluster (an fx goes to every
    partition), and the consolidator labels the composed figures with the same base."""
    from exposure.cluster.topology import ClusterError, load_cluster

    ccy = '[currencies]\nids = { EUR = 1, JPY = 2 }\n'
    for k in (0, 1):
        (tmp_path / f"p{k}.toml").write_text(f'[node]\nname = "p{k}"\n[ingest]\nport = '
                                             f'{7800 + k}\n[partition]\ncluster = '
                                             f'"cluster.toml"\nname = "p{k}"\n{ccy}')
    (tmp_path / "cons.toml").write_text('[node]\nname = "cons-x"\n' + ccy)
    cl = tmp_path / "cluster.toml"
    cl.write_text('[[partition]]\nname = "p0"\nconfig = "p0.toml"\naccounts = [[0, 9]]\n'
                  'sources = [0]\n[[partition]]\nname = "p1"\nconfig = "p1.toml"\n'
                  'accounts = [[10, 19]]\nsources = [1]\n[consolidator]\n'
                  'config = "cons.toml"\n')
    assert load_cluster(cl).consolidator.currencies.id_of("JPY") == 2
    p1 = (tmp_path / "p1.toml").read_text()
    (tmp_path / "p1.toml").write_text(p1.replace("JPY = 2", "JPY = 3"))
    with pytest.raises(ClusterError, match=r"p1.toml: \[currencies\] \(USD \(base\), EUR = 1, "
                                           r"JPY = 3\) differs from .*p0.toml's"):
        load_cluster(cl)
    (tmp_path / "p1.toml").write_text(p1)
    (tmp_path / "cons.toml").write_text('[node]\nname = "cons-x"\n')
    with pytest.raises(ClusterError, match=r"consolidator: \[currencies\] \(USD \(base\)\) "
                                           r"differs from the partitions'"):
        load_cluster(cl)
