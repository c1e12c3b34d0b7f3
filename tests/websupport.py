"""What the web page's tests share: a node with names, a users file, events to send."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from exposure.bench.flowgen import generate
from exposure.core.types import T_FILL, T_LIMIT, T_NEW
from exposure.harness.localnode import LocalNode
from exposure.net.producer import Producer
from exposure.web.users import hash_password

SEED = 28          # the generated flow's seed (the accounts below are its accounts)
PASSWORDS = {"risk": "risk-pass-1", "pm1": "pm1-pass-1", "pm2": "pm2-pass-1"}
_sessions = itertools.count(10)


def flow(n: int, seed: int = SEED) -> np.ndarray:
    """``n`` generated events over 40 accounts (instruments, limits, orders, fills, marks)."""
    print(f"flow seed {seed}")
    return generate(n, accounts=40, instruments=400, universe=60, live_target=400,
                    seed=seed)


def accounts_of(recs: np.ndarray) -> list[int]:
    """The accounts ``recs`` move (the limit, order and fill events' accounts)."""
    keep = np.isin(recs["type"], (T_LIMIT, T_NEW, T_FILL))
    return sorted(set(recs["account"][keep].tolist()))


ACCOUNTS = accounts_of(flow(3000))
PM1 = tuple(ACCOUNTS[:4])    # pm1's accounts (the first by name in the users file)
PM2 = tuple(ACCOUNTS[4:8])


def web_node(tmp: Path) -> LocalNode:
    """A node whose config names an accounts.csv and an instruments.csv ([reference])."""
    (tmp / "accounts.csv").write_text(
        "name,account\n" + "".join(f"ACC-{a:04d},{a}\n" for a in ACCOUNTS))
    (tmp / "instruments.csv").write_text(
        "symbol,instrument\n" + "".join(f"SYM{i},{i}\n" for i in range(0, 400, 3)))
    return LocalNode(tmp, extra='[reference]\naccounts = "accounts.csv"\n'
                               'instruments = "instruments.csv"\n')


@contextlib.contextmanager
def fed_node(tmp: Path) -> Iterator[LocalNode]:
    """A :func:`web_node` that took 3,000 events of the flow; stopped on the way out."""
    n = web_node(tmp)
    try:
        send(n, flow(3000))
        yield n
    finally:
        n.stop()


def users_file(tmp: Path) -> Path:
    p = tmp / "users.toml"
    p.write_text(
        f'[[user]]\nname = "risk"\npassword = "{hash_password(PASSWORDS["risk"])}"\n'
        'accounts = "all"\n'
        f'[[user]]\nname = "pm1"\npassword = "{hash_password(PASSWORDS["pm1"])}"\n'
        f'accounts = ["ACC-{PM1[0]:04d}", {", ".join(map(str, PM1[1:]))}]\n'
        f'[[user]]\nname = "pm2"\npassword = "{hash_password(PASSWORDS["pm2"])}"\n'
        f'accounts = [{", ".join(map(str, PM2))}]\n')
    return p


def send(node: LocalNode, events) -> None:
    """Send ``events`` (a record array, or SPEC event dicts) as a fresh session; wait
    until the node acknowledged them all."""
    from exposure.config.node import load_config

    with Producer(load_config(node.config), session=next(_sessions)) as p:
        if isinstance(events, np.ndarray):
            p.send(events)
        else:
            for e in events:
                p.send(e)
        p.flush(timeout=60)
        assert p.acked == p.sent
