"""CPU per update: FINOS Perspective's server (a table, one view per client, row deltas as
Arrow) against the plain page's encoding step (exposure.web.view: the moved rows as lists,
one JSON encoding per scope of users). docs/web.md, docs/performance.md.

    python3 -m venv /tmp/pv && /tmp/pv/bin/pip install perspective-python==5.6.1 orjson
    /tmp/pv/bin/python perf/bench_perspective.py

Perspective is not a dependency of the project: this script runs in a scratch venv.
"""

import time

import numpy as np
import orjson
import perspective

A = 200
rng = np.random.default_rng(1)
FLOATS = ["gross", "net", "long_mv", "short_mv", "worst_gross", "margin", "beta_net", "pnl",
          "open_buy_mv", "open_sell_mv"]

def rows(k: int) -> dict:
    cols = {"account": list(range(A)), "name": [f"ACC-{a:04d}" for a in range(A)]}
    for f in FLOATS:
        cols[f] = (rng.random(A) * 1e8).tolist()
    cols["live_orders"] = rng.integers(0, 50, A).tolist()
    cols["breach"] = rng.integers(0, 32, A).tolist()
    return cols

N = 50
data = [rows(k) for k in range(N + 1)]
def cpu() -> float:
    return time.process_time()

for nviews in (1, 10, 100):
    server = perspective.Server()
    client = server.new_local_client()
    t = client.table(data[0], index="account", name=f"acc{nviews}")
    got = [0]
    def cb(*a, got=got, **k):
        delta = a[-1] if a and not isinstance(a[-1], int) else k.get("delta")
        got[0] += len(delta) if delta is not None else 0
    views = []
    for _ in range(nviews):
        v = t.view(sort=[["gross", "desc"]])
        v.on_update(cb, mode="row")
        views.append(v)
    c0, w0 = cpu(), time.perf_counter()
    for k in range(1, N + 1):
        t.update(data[k])
    t.size()  # (flush the update queue)
    c1, w1 = cpu(), time.perf_counter()
    print(f"perspective {nviews:4d} views: {1e3*(c1-c0)/N:8.2f} ms CPU per update of {A} rows "
          f"(wall {1e3*(w1-w0)/N:.2f} ms), delta bytes per update {got[0]/N:,.0f}")
    for v in views:
        v.delete()
    t.delete()

# The plain page: the rows as lists, one JSON encoding per scope (all clients of a scope share it)
for scopes in (1, 10, 100):
    c0 = cpu()
    for k in range(1, N + 1):
        d = data[k]
        rl = [list(r) for r in zip(*[d[c] for c in
                                     ["account", "name", *FLOATS, "live_orders", "breach"]],
                                   strict=True)]
        for s in range(scopes):
            sub = rl if scopes == 1 else rl[s::scopes]
            orjson.dumps(sub)
    c1 = cpu()
    print(f"plain page {scopes:4d} scopes: {1e3*(c1-c0)/N:8.2f} ms CPU per update of {A} rows")
