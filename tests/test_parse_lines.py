"""Each line of an events file is one record (SPEC section 2, issue 12).

A line is an event only if the whole line is exactly one JSON object, with nothing around it
but JSON whitespace. Anything else that is not blank (a scalar, an array, several objects on
one line, an object or array split over lines, a truncated object, trailing garbage, bytes
that are not UTF-8 JSON) is one record rejected as ``bad_field``, whatever its neighbours
hold: lines are never decoded together.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import order_event, reference_event

from exposure.core.capacity import Capacities
from exposure.core.types import R_BAD_FIELD, R_OUT_OF_RANGE, TYPE_CODES
from exposure.engine.document import document
from exposure.engine.parse import (
    RECORD,
    parse_events,
    record_objects,
    record_values,
    records_from_objects,
)
from exposure.engine.replay import Engine, replay_records

# No timeout mark of its own: the pyproject default (120 s) applies, as in
# test_properties.py; the first replay may compile the kernel (over 20 s when the
# numba cache is cold on a busy machine), and that cost falls on whichever test is first.
_SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.too_slow])
# Small tables keep each replay fast; the strategies' ids are all within them.
CAPS = Capacities(accounts=64, instruments=128, sectors=16, sources=8, orders=256, cells=256)

JSON_WS = b" \t\r"  # JSON whitespace that a line (split at "\n") can hold


def _blank(line: bytes) -> bool:
    return not line.strip(JSON_WS)


def _is_one_object(line: bytes) -> bool:
    """The SPEC's test, written independently of the parser: valid UTF-8 text that decodes
    as a whole to exactly one JSON object."""
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        return False


def _counts(data: bytes) -> dict:
    return document(replay_records(parse_events(data), CAPS))["counts"]


def _mark(i: int, price: float) -> bytes:
    return b'{"type":"mark","instrument":%d,"price":%r}' % (i, price)


# ------------------------------------------------------------------------------ examples
def test_two_objects_on_a_line_and_an_array_split_over_two_lines_are_three_bad_lines():
    data = b"\n".join([
        _mark(1, 2.0) + b"," + _mark(2, 3.0),  # two objects separated by a comma
        b"[" + _mark(3, 4.0),                   # an array opened on this line ...
        _mark(4, 5.0) + b"]",                   # ... and closed on this one
    ]) + b"\n"
    recs = parse_events(data)
    assert len(recs) == 3
    assert recs["reject"].tolist() == [R_BAD_FIELD] * 3
    assert _counts(data) == {"accepted": 0, "rejected": 3, "late_fills": 0, "busts": 0, "rolls": 0,
                             "rejects": {"bad_field": 3}}


def test_four_bad_lines_whose_values_would_pair_up_across_lines_are_all_rejected():
    # Joined with commas these four lines hold four JSON values (two objects, one object
    # split over two lines, a number), one per line on average: none of them is an event.
    data = b"\n".join([
        _mark(1, 2.0) + b", " + _mark(2, 3.0),
        b'{"type":"mark","instrument":3',
        b'"price":4.0}',
        b"7",
    ])
    recs = parse_events(data)
    assert recs["reject"].tolist() == [R_BAD_FIELD] * 4
    assert _counts(data) == {"accepted": 0, "rejected": 4, "late_fills": 0, "busts": 0, "rolls": 0,
                             "rejects": {"bad_field": 4}}


def test_an_object_with_surrounding_json_whitespace_is_an_event():
    data = b" \t" + _mark(1, 2.0) + b" \r\n\n  \n" + _mark(2, 3.0) + b"\r\n"
    recs = parse_events(data)
    assert recs["reject"].tolist() == [0, 0]
    assert _counts(data)["accepted"] == 2


@pytest.mark.parametrize("line", [
    pytest.param(b"\xef\xbb\xbf" + _mark(1, 2.0), id="byte-order-mark"),  # not JSON whitespace
    pytest.param(_mark(1, 2.0).decode().encode("utf-16-le"), id="utf-16"),
    pytest.param(_mark(1, 2.0) + b"\x0c", id="form-feed"),  # not JSON whitespace
    pytest.param(_mark(1, 2.0) + b"\xc2\xa0", id="no-break-space"),  # nor is this
    pytest.param(_mark(1, 2.0) + b" //", id="comment"),
    pytest.param(b'{"type":"mark","instrument":1,"price":NaN} x', id="nan-then-garbage"),
    pytest.param(b"[" * 100_000, id="deep-arrays"),  # deep nesting must not raise
    pytest.param(b'{"a":' * 100_000, id="deep-objects"),
])
def test_a_line_with_anything_but_one_object_is_bad_field(line):
    data = _mark(5, 1.0) + b"\n" + line + b"\n" + _mark(6, 1.0)
    assert parse_events(data)["reject"].tolist() == [0, R_BAD_FIELD, 0]


def test_python_only_numbers_still_reach_the_field_checks():
    # NaN and integers beyond 64 bits are read (orjson refuses them) and then fail the field
    # checks: bad_field for a non-finite price, out_of_range for an id beyond capacity.
    data = b"\n".join([
        b'{"type":"mark","instrument":1,"price":NaN}',
        b'{"type":"mark","instrument":123456789012345678901234567890,"price":1.0}',
        b'{"type":"mark","instrument":1,"price":1e400}',
    ])
    recs = parse_events(data)
    assert recs["type"].tolist() == [TYPE_CODES["mark"]] * 3
    assert _counts(data)["rejects"] == {"bad_field": 2, "out_of_range": 1}


def test_in_a_long_file_a_bad_line_or_a_long_integer_costs_only_its_own_record():
    # Lines are decoded in chunks; a line that needs the slower decoder must not move or
    # change any other line's record.
    n = 20_000
    lines = [_mark(k % 100, 1.0 + k) for k in range(n)]
    lines[9_000] = b"[" + lines[9_000]
    lines[9_001] = lines[9_001] + b"]"
    lines[15_000] = b'{"type":"mark","instrument":18446744073709551616,"price":1.0}'
    lines[15_001] = b'{"type":"mark","instrument":1,"price":Infinity}'
    recs = parse_events(b"\n".join(lines))
    assert len(recs) == n
    bad = {9_000: R_BAD_FIELD, 9_001: R_BAD_FIELD}
    assert {k: r for k, r in enumerate(recs["reject"].tolist()) if r} == bad
    ok = [k for k in range(n) if k not in (9_000, 9_001, 15_000, 15_001)]
    assert recs["price"][ok].tolist() == [1.0 + k for k in ok]
    status = Engine(CAPS).apply(recs).tolist()
    assert [status[k] for k in (9_000, 9_001, 15_000, 15_001)] == \
        [R_BAD_FIELD, R_BAD_FIELD, R_OUT_OF_RANGE, R_BAD_FIELD]


# ---------------------------------------------------------------------------- properties
EVENT = st.one_of(order_event(), reference_event())
OBJECT_TEXT = EVENT.map(json.dumps)  # ASCII only: json.dumps escapes the rest
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
SEP = st.sampled_from([",", ", ", " ", "\t", "", ",\t"])
GARBAGE = st.sampled_from([",", "}", "]", "{", "[", "x", " 1", " //c", "\x00", "\x0c",
                           "\u00a0", "\ufeff", ' {"type":"mark"}', ",{}", "null"])


def _lines(texts: list[str]) -> list[bytes]:
    return [t.encode() for t in texts]


_CUT = st.integers(1, 10_000)  # a place to cut a text, taken modulo its length


@st.composite
def _split_object(draw) -> list[bytes]:
    """An object's text (or an array of objects) cut at 1-3 places into several lines."""
    if draw(st.booleans()):
        text = draw(OBJECT_TEXT)
    else:
        events = draw(st.lists(EVENT, min_size=1, max_size=3))
        text = "[" + draw(SEP).join(map(json.dumps, events)) + "]"
    cuts = sorted({1 + c % (len(text) - 1) for c in draw(st.lists(_CUT, min_size=1,
                                                                  max_size=3))})
    bounds = [0, *cuts, len(text)]
    return _lines([text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])


@st.composite
def _truncated_object(draw) -> list[bytes]:
    text = draw(OBJECT_TEXT)
    return [text[: 1 + draw(_CUT) % (len(text) - 1)].encode()]


def _one(strategy) -> st.SearchStrategy:
    return strategy.map(lambda b: [b])


NOT_ONE_OBJECT = st.one_of(
    _one(SCALAR.map(lambda v: json.dumps(v).encode())),                  # scalars
    _one(st.lists(st.one_of(EVENT, SCALAR), max_size=3)                  # arrays
         .map(lambda v: json.dumps(v).encode())),
    _one(st.tuples(st.lists(OBJECT_TEXT, min_size=2, max_size=3), SEP)   # objects side by side
         .map(lambda t: t[1].join(t[0]).encode())),
    _split_object(),                                                      # fragments
    _truncated_object(),                                                  # truncated
    _one(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b""))),  # random bytes
    _one(st.tuples(OBJECT_TEXT, GARBAGE).map(lambda t: (t[0] + t[1]).encode())),  # trailing
    _one(st.tuples(GARBAGE, OBJECT_TEXT).map(lambda t: (t[0] + t[1]).encode())),  # leading
    _one(OBJECT_TEXT.map(lambda t: t.encode("utf-16-le"))),              # not UTF-8
).filter(lambda group: not any(_is_one_object(x) for x in group))


def _document(lines: list[bytes], newline: bytes, final: bool) -> bytes:
    return newline.join(lines) + (newline if final else b"")


@_SETTINGS
@given(st.lists(NOT_ONE_OBJECT, min_size=1, max_size=12), st.sampled_from([b"\n", b"\r\n"]),
       st.booleans())
def test_a_file_without_a_line_that_is_one_object_yields_no_event(groups, newline, final):
    lines = [x for g in groups for x in g]
    data = _document(lines, newline, final)
    recs = parse_events(data)
    assert len(recs) == sum(not _blank(x) for x in lines)
    assert recs["reject"].tolist() == [R_BAD_FIELD] * len(recs)
    counts = _counts(data)
    assert counts["accepted"] == 0
    assert counts["rejected"] == counts["rejects"].get("bad_field", 0) == len(recs)


BLANK = st.sampled_from([b"", b" ", b"\t", b"\r", b"  \t "])
PAD = st.sampled_from(["", " ", "\t", "  ", " \t "])


@st.composite
def _mixed_line_groups(draw):
    """Groups of lines, each tagged: an event (its object), a bad group, or blank lines."""
    kind = draw(st.sampled_from(["event", "event", "bad", "blank"]))
    if kind == "event":
        e = draw(EVENT)
        text = draw(PAD) + json.dumps(e) + draw(PAD)
        return [(text.encode(), e)]
    if kind == "bad":
        return [(x, None) for x in draw(NOT_ONE_OBJECT)]
    return [(draw(BLANK), None)]


@_SETTINGS
@given(st.lists(_mixed_line_groups(), min_size=1, max_size=20), st.booleans())
def test_exactly_the_lines_that_are_one_object_become_events(groups, final):
    tagged = [(x, e) for g in groups for x, e in g]
    data = _document([x for x, _ in tagged], b"\n", final)
    kept = [e for x, e in tagged if not _blank(x)]  # records follow the non-blank lines
    recs = parse_events(data)
    assert len(recs) == len(kept)
    got = record_objects(recs)
    for k, e in enumerate(kept):
        if e is None:
            assert recs["reject"][k] == R_BAD_FIELD, k
        else:
            assert recs["reject"][k] == 0, (k, e)
            assert recs["type"][k] == TYPE_CODES[e["type"]], (k, e)
            assert {key: got[k][key] for key in e} == e, (k, e)
    status = Engine(CAPS).apply(recs).tolist()
    assert [status[k] for k, e in enumerate(kept) if e is None] == \
        [R_BAD_FIELD] * sum(e is None for e in kept)


# ------------------------------------------------------------------ one object, no numpy
_EDGE = st.one_of(
    st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**32 - 1, 2**32, 2**63 - 1,
                                                    2**63, 2**64 - 1, 2**64, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=6), st.sampled_from(["buy", "sell", "short", "Buy"]),
    st.lists(st.integers(), max_size=2))
_KEYS = ["type", "source", "order_id", "account", "instrument", "side", "qty", "price",
         "multiplier", "margin_rate", "beta", "sector", "gross", "net", "margin", "loss"]


@st.composite
def _any_object(draw):
    """A SPEC event, the same with fields dropped or replaced by edge values, or not an
    object at all."""
    base = draw(st.one_of(order_event(), reference_event()))
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.none()))
    for key in draw(st.lists(st.sampled_from(_KEYS), max_size=3)):
        if draw(st.booleans()):
            base.pop(key, None)
        else:
            base[key] = draw(_EDGE) if key != "type" else draw(
                st.one_of(st.sampled_from(["new", "fill", "mark", "nope"]), _EDGE))
    return base


@settings(max_examples=3000, deadline=None)
@given(_any_object())
def test_one_object_packs_to_the_same_record_as_the_column_path(obj):
    """record_values (the producer's path for one dict) gives byte for byte the record of
    records_from_objects, whatever the object holds."""
    want = records_from_objects([obj]).tobytes()
    assert RECORD.pack(*record_values(obj)) == want, obj
