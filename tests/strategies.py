"""Hypothesis strategies: event streams over a small universe, so that orders collide.

Lifecycles across several sources, accounts and instruments, overfills, fills after
cancels, replaces below the filled quantity, marks, reference-data changes, limits,
start-of-day positions, busts (of live, finished and unknown orders, matching or not) and
rolls (SPEC section 6), instruments in several currencies and moving fx rates (SPEC
section 7), and malformed lines (wrong kinds, missing fields, unknown types,
non-objects, non-finite numbers).
"""

from __future__ import annotations

import json

from hypothesis import strategies as st

SOURCES = st.integers(0, 2)
ACCOUNTS = st.integers(0, 3)
INSTRUMENTS = st.integers(0, 3)
ORDER_IDS = st.integers(0, 5)
SIDES = st.sampled_from(["buy", "sell", "short"])
QTY = st.one_of(st.integers(1, 500), st.integers(10**11, 10**12))
PRICES = st.one_of(st.sampled_from([0.0, 0.01, 1.0, 99.5, 100.0, 101.25]),
                   st.floats(0.01, 1e4, allow_nan=False, allow_infinity=False))
POS_PRICES = st.floats(0.01, 1e4, allow_nan=False, allow_infinity=False)
CURRENCIES = st.integers(0, 3)  # 0: the base currency
RATES = st.one_of(st.sampled_from([0.0067, 0.92, 1.0, 1.27, 150.0]),
                  st.floats(1e-4, 1e3, allow_nan=False, allow_infinity=False))
LIMITS = st.one_of(st.just(0), st.floats(0, 1e7, allow_nan=False, allow_infinity=False))


@st.composite
def order_event(draw):
    kind = draw(st.sampled_from(["new", "new", "fill", "fill", "fill", "cancel", "done",
                                 "replace", "replace", "bust"]))
    e = {"type": kind, "source": draw(SOURCES), "order_id": draw(ORDER_IDS)}
    if kind in ("new", "fill", "bust"):
        e.update(account=draw(ACCOUNTS), instrument=draw(INSTRUMENTS), side=draw(SIDES),
                 qty=draw(QTY), price=draw(PRICES if kind == "new" else POS_PRICES))
    elif kind == "replace":
        e.update(qty=draw(QTY), price=draw(PRICES))
    if draw(st.booleans()) and e["source"] == 0:
        del e["source"]  # defaults to 0
    return e


@st.composite
def reference_event(draw):
    kind = draw(st.sampled_from(["mark", "mark", "instrument", "limit", "position", "roll",
                                 "fx"]))
    if kind == "roll":
        return {"type": "roll"}
    if kind == "fx":
        return {"type": "fx", "currency": draw(st.integers(1, 3)), "rate": draw(RATES)}
    if kind == "mark":
        return {"type": "mark", "instrument": draw(INSTRUMENTS), "price": draw(POS_PRICES)}
    if kind == "instrument":
        return {"type": "instrument", "instrument": draw(INSTRUMENTS),
                "multiplier": draw(st.sampled_from([0.01, 1.0, 50.0, 100.0])),
                "margin_rate": draw(st.sampled_from([0.0, 0.1, 0.25, 1.0])),
                "beta": draw(st.sampled_from([-0.5, 0.0, 0.8, 1.2])),
                "sector": draw(st.integers(0, 3)),
                **({"currency": draw(CURRENCIES)} if draw(st.booleans()) else {})}
    if kind == "limit":
        e = {"type": "limit", "account": draw(ACCOUNTS)}
        for k in ("gross", "net", "margin", "loss"):
            if draw(st.booleans()):
                e[k] = draw(LIMITS)
        return e
    e = {"type": "position", "account": draw(ACCOUNTS), "instrument": draw(INSTRUMENTS),
         "qty": draw(st.integers(-(10**6), 10**6))}
    if draw(st.booleans()):
        e["price"] = draw(POS_PRICES)
    return e


_BAD_VALUES = st.sampled_from(["10", 10.0, True, None, [], {}, -1, 2**64, 4096, 70000,
                               float("nan"), float("inf"), -0.0, 0, 10**12 + 1, 2**63])


@st.composite
def malformed_event(draw):
    base = draw(st.one_of(order_event(), reference_event()))
    how = draw(st.sampled_from(["field", "drop", "type", "garbage"]))
    if how == "field":
        key = draw(st.sampled_from(sorted(base)))
        if key != "type":
            base[key] = draw(_BAD_VALUES)
    elif how == "drop":
        key = draw(st.sampled_from(sorted(base)))
        if key != "type":
            del base[key]
    elif how == "type":
        base["type"] = draw(st.sampled_from(["transfer", "NEW", "", 5, None]))
    else:
        return draw(st.sampled_from(["not json", "[1, 2]", '"new"', "17", "{", "null"]))
    return base


def line(e) -> str:
    return e if isinstance(e, str) else json.dumps(e)


@st.composite
def fx_event(draw):
    """A currency's new rate (SPEC section 7), or an instrument moved to another currency."""
    if draw(st.integers(0, 2)) == 0:
        return {"type": "instrument", "instrument": draw(INSTRUMENTS),
                "multiplier": draw(st.sampled_from([1.0, 50.0])), "margin_rate": 0.1,
                "beta": 1.0, "sector": draw(st.integers(0, 3)), "currency": draw(CURRENCIES)}
    return {"type": "fx", "currency": draw(st.integers(1, 3)), "rate": draw(RATES)}


@st.composite
def currency_setup(draw):
    """Each instrument described, in a currency of its own draw (0 included)."""
    return [{"type": "instrument", "instrument": i, "multiplier": 1.0, "margin_rate": 0.25,
             "beta": 0.8, "sector": i % 2, "currency": draw(CURRENCIES)} for i in range(4)]


EVENTS = st.lists(
    st.one_of(order_event(), order_event(), order_event(), reference_event(),
              malformed_event()),
    min_size=1, max_size=120,
).map(lambda es: [line(e) for e in es])
# Streams in which currencies matter: every instrument in a currency from the start, and
# rates (and instruments' currencies) that move often among the trading.
FX_EVENTS = st.tuples(
    currency_setup(),
    st.lists(st.one_of(order_event(), order_event(), order_event(), fx_event(), fx_event(),
                       reference_event(), malformed_event()), min_size=10, max_size=120),
).map(lambda p: [line(e) for e in p[0] + p[1]])
