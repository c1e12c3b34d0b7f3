"""docs/feed.md is the feed's spec: its tables, parsed here into struct formats without the
code's dtypes or structs, decode what the code sends, and what they encode the code reads."""

import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from exposure.core.types import NO_SESSION, ROW_DTYPES, ROW_KINDS, ROW_SIZE
from exposure.feed.wire import (
    DG_TYPES,
    DGRAM_HEADER,
    DGRAM_MAGIC,
    FEED_VERSION,
    SNAP_HEADER,
    SNAP_MAGIC,
    SNAP_REQUEST_MAGIC,
    SNAP_STATUS,
    dgram_word,
    parse_datagram,
    parse_snapshot_header,
    rows_of,
    snapshot_request,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "feed.md"
TEXT = DOC.read_text()
# The page's types: struct codes and sizes ("pad": any size, skipped).
TYPES = {"u1": ("B", 1), "u2": ("H", 2), "u4": ("I", 4), "u8": ("Q", 8), "i4": ("i", 4),
         "i8": ("q", 8), "f8": ("d", 8)}
HEAD_SIZE = 56


def _seed() -> int:
    seed = random.SystemRandom().randrange(1 << 30)
    print(f"seed {seed}")
    return seed


# ----------------------------------------------------------------------------- the page
class Field:
    def __init__(self, off: str, size: str, typ: str, name: str, meaning: str):
        self.off, self.size, self.type = int(off), int(size), typ.strip()
        self.name, self.meaning = name.strip(), meaning.strip()

    def __repr__(self) -> str:
        return f"{self.off}:{self.size}:{self.type}:{self.name}"


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables() -> dict[str, list[Field]]:
    """Every ``off | size | type | field | meaning`` table of the page, by the text of the
    ``###`` heading above it."""
    out: dict[str, list[Field]] = {}
    heading = None
    lines = TEXT.splitlines()
    k = 0
    while k < len(lines):
        ln = lines[k]
        if ln.startswith("#"):
            heading = ln.lstrip("#").strip()
        elif ln.startswith("|") and heading is not None:
            assert _cells(ln) == ["off", "size", "type", "field", "meaning"], ln
            assert set(lines[k + 1].replace("|", "").strip()) <= {"-", " "}, lines[k + 1]
            rows = []
            k += 2
            while k < len(lines) and lines[k].startswith("|"):
                c = _cells(lines[k])
                assert len(c) == 5, lines[k]
                rows.append(Field(*c))
                k += 1
            assert heading not in out, f"two tables under {heading!r}"
            out[heading] = rows
            heading = None
            continue
        k += 1
    return out


TABLES = tables()


def table(prefix: str) -> list[Field]:
    hits = [t for h, t in TABLES.items() if h.startswith(prefix)]
    assert len(hits) == 1, f"{prefix!r}: {len(hits)} tables ({sorted(TABLES)})"
    return hits[0]


def bodies() -> dict[int, tuple[str, list[Field]]]:
    """kind -> (its id's name, its body table), from headings "Kind N (name) ... body"."""
    out = {}
    for h, t in TABLES.items():
        if h.startswith("Kind ") and h.endswith("body"):
            for kind, name in re.findall(r"[Kk]ind (\d+) \((\w+)\)", h):
                out[int(kind)] = (name, t)
    return out


def fmt(fields: list[Field]) -> tuple[struct.Struct, list[str]]:
    """A little-endian struct and the names of its values (pads skipped)."""
    codes, names = ["<"], []
    for f in fields:
        if f.type == "pad":
            codes.append(f"{f.size}x")
        else:
            codes.append(TYPES[f.type][0])
            names.append(f.name)
    return struct.Struct("".join(codes)), names


def decode(fields: list[Field], data, offset: int = 0) -> dict:
    s, names = fmt(fields)
    return dict(zip(names, s.unpack_from(data, offset), strict=True))


def constant(fields: list[Field], name: str) -> int:
    """The value a table's meaning column gives a field: ``0x...`` or the first `N`."""
    m = next(f.meaning for f in fields if f.name == name)
    hit = re.search(r"`(0x[0-9A-Fa-f]+|\d+)`", m)
    assert hit, f"{name}: no value in {m!r}"
    return int(hit.group(1), 0)


def codes(fields: list[Field], name: str) -> dict[int, str]:
    """``{code: word}`` from a meaning like "`1` INCREMENTAL, `2` REFRESH"."""
    m = next(f.meaning for f in fields if f.name == name)
    return {int(c): w for c, w in re.findall(r"`(\d+)` (\w+)", m)}


HEADER = table("Datagram header")
HEAD = table("Row head")
REQUEST = table("Snapshot request")
RESPONSE = table("Snapshot response header")
BODIES = bodies()


def row_fields(kind: int) -> list[Field]:
    return HEAD + BODIES[kind][1]


# The code's id field of a kind whose heading names it otherwise.
ID_NAMES = {"fund": "account", "position": "cell", "limits": "account"}


def code_name(kind: int, name: str) -> str:
    """The code's field name for the page's: the head's ``id`` is the kind's id."""
    if name != "id":
        return name
    word = BODIES[kind][0]
    return ID_NAMES.get(word, word)


# ----------------------------------------------------------------------------- (a) layout
def _check_layout(fields: list[Field], start: int, end: int, what: str) -> None:
    at = start
    for f in fields:
        assert f.off == at, f"{what}: {f.name} at {f.off}, expected {at} (gap or overlap)"
        if f.type != "pad":
            assert f.type in TYPES, f"{what}: {f.name} has type {f.type!r}"
            assert TYPES[f.type][1] == f.size, f"{what}: {f.name} {f.type} of {f.size} bytes"
        assert f.size > 0
        at += f.size
    assert at == end, f"{what}: ends at {at}, expected {end}"
    names = [f.name for f in fields]
    assert len(set(names)) == len(names), f"{what}: a field named twice: {names}"


@pytest.mark.timeout(60)
def test_the_tables_are_contiguous_and_of_the_stated_sizes():
    _check_layout(HEADER, 0, 32, "datagram header")
    _check_layout(HEAD, 0, HEAD_SIZE, "row head")
    assert sorted(BODIES) == sorted(ROW_KINDS) == [1, 2, 3, 4, 5, 6]
    for kind, (_, body) in BODIES.items():
        _check_layout(body, HEAD_SIZE, 160, f"kind {kind} body")
        _check_layout(row_fields(kind), 0, 160, f"kind {kind} row")
        assert fmt(row_fields(kind))[0].size == 160
    _check_layout(REQUEST, 0, 16, "snapshot request")
    _check_layout(RESPONSE, 0, 32, "snapshot response header")
    assert fmt(HEADER)[0].size == DGRAM_HEADER.size == 32
    assert fmt(RESPONSE)[0].size == SNAP_HEADER.size
    assert constant(HEADER, "row_size") == constant(RESPONSE, "row_size") == ROW_SIZE == 160


@pytest.mark.timeout(60)
def test_the_page_names_every_field_and_constant_of_the_code():
    for kind, dt in ROW_DTYPES.items():
        doc = {code_name(kind, f.name) for f in row_fields(kind) if f.type != "pad"}
        assert doc == set(dt.names), f"kind {kind}: {doc ^ set(dt.names)}"
    assert constant(HEADER, "magic") == DGRAM_MAGIC
    assert constant(HEADER, "version") == constant(REQUEST, "version") == FEED_VERSION
    assert constant(RESPONSE, "version") == FEED_VERSION
    assert constant(REQUEST, "magic") == SNAP_REQUEST_MAGIC
    assert constant(RESPONSE, "magic") == SNAP_MAGIC
    assert {k: w.lower() for k, w in codes(HEADER, "type").items()} == DG_TYPES
    assert codes(HEAD, "kind") == ROW_KINDS
    assert {k: w.lower() for k, w in
            re.findall(r"`(\d+)` ([A-Z][A-Z ]*[A-Z])", TEXT.split("Statuses:")[1])[:4]} \
        == {str(k): w for k, w in SNAP_STATUS.items()}
    assert f"0x{NO_SESSION:08X}" in TEXT


# ----------------------------------------------------------------------------- (b) decode
def _random_row(rng: np.random.Generator, kind: int) -> np.ndarray:
    """One row of ``kind`` in the code's dtype: every byte random first (pads stay
    garbage), then every field a random value of its type, distinct within the row."""
    dt = ROW_DTYPES[kind]
    raw = rng.integers(0, 256, ROW_SIZE, dtype=np.uint8)
    row = raw.view(dt).copy()
    small = iter(rng.choice(np.arange(5, 256), 8, replace=False).tolist())
    seen: set = set()
    for name in dt.names:
        t = dt.fields[name][0]
        if name == "kind":
            row[name] = kind
            continue
        while True:
            if t.kind == "f":
                v = float(rng.standard_normal() * 10.0 ** int(rng.integers(-3, 13)))
            elif t.itemsize == 1:
                v = next(small)
            else:
                info = np.iinfo(t)
                v = int(rng.integers(info.min, info.max, endpoint=True, dtype=t.type))
            if v not in seen:
                break
        seen.add(v)
        row[name] = v
    return row


def _code_datagram(rng, dtype: int, kinds: list[int]) -> tuple[bytes, dict, np.ndarray]:
    rows = np.concatenate([_random_row(rng, k).view(np.uint8) for k in kinds]) \
        if kinds else np.zeros(0, np.uint8)
    hdr = {"magic": DGRAM_MAGIC, "epoch": int(rng.integers(1, 2**32)),
           "seq": int(rng.integers(1, 2**63)), "sent_ns": int(rng.integers(1, 2**62)),
           "count": len(kinds), "type": dtype}
    data = DGRAM_HEADER.pack(hdr["magic"], hdr["epoch"], hdr["seq"],
                             *dgram_word(len(kinds), dtype), hdr["sent_ns"]) + rows.tobytes()
    return data, hdr, rows


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # bit for bit
    return int(a) == int(b)


@pytest.mark.timeout(60)
def test_datagrams_the_code_builds_decode_with_the_page():
    rng = np.random.default_rng(_seed())
    for dtype in DG_TYPES:
        for _ in range(20):
            n = 0 if dtype == 3 else int(rng.integers(1, 9))
            kinds = [int(k) for k in rng.choice(sorted(BODIES), n)]
            data, want, rows = _code_datagram(rng, dtype, kinds)
            got = decode(HEADER, data)
            assert got.pop("reserved") == 0
            assert got.pop("version") == constant(HEADER, "version")
            assert got.pop("row_size") == constant(HEADER, "row_size")
            assert got == want
            assert len(data) == 32 + ROW_SIZE * got["count"]
            for j, kind in enumerate(kinds):
                off = 32 + ROW_SIZE * j
                head = decode(HEAD, data, off)
                assert head["kind"] == kind
                row = decode(row_fields(kind), data, off)
                code = rows[j * ROW_SIZE:(j + 1) * ROW_SIZE].view(ROW_DTYPES[kind])[0]
                for name, v in row.items():
                    assert _same(v, code[code_name(kind, name)].item()), (kind, name, v)


@pytest.mark.timeout(60)
def test_a_datagram_encoded_from_the_page_parses_with_the_code():
    rng = np.random.default_rng(_seed())
    kinds = [1, 2, 3, 4, 5, 6, 5, 1]
    values, body = [], b""
    for kind in kinds:
        s, names = fmt(row_fields(kind))
        v = {}
        for k, name in enumerate(names):
            t = next(f.type for f in row_fields(kind) if f.name == name)
            if name == "kind":
                v[name] = kind
            elif t == "f8":
                v[name] = float(rng.standard_normal() * 1e6) + k
            else:
                bits = 8 * TYPES[t][1]
                lo, hi = (-(1 << (bits - 1)), 1 << (bits - 1)) if t[0] == "i" \
                    else (0, 1 << bits)
                v[name] = int(rng.integers(lo, hi, dtype=np.int64 if bits < 64 else
                                           (np.int64 if t[0] == "i" else np.uint64)))
        body += s.pack(*(v[n] for n in names))
        values.append(v)
    hs, hnames = fmt(HEADER)
    hv = {"magic": constant(HEADER, "magic"), "epoch": 77, "seq": 123456789,
          "count": len(kinds), "type": 1, "version": constant(HEADER, "version"),
          "row_size": constant(HEADER, "row_size"), "reserved": 0, "sent_ns": 42}
    d = parse_datagram(hs.pack(*(hv[n] for n in hnames)) + body)
    assert (d.epoch, d.seq, d.sent_ns, d.type, len(d.updates)) == (77, 123456789, 42, 1, 8)
    for kind in sorted(set(kinds)):
        got = d.rows(kind)
        want = [v for v, k in zip(values, kinds, strict=True) if k == kind]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            for name, v in w.items():
                assert _same(g[code_name(kind, name)].item(), v), (kind, name)
        assert len(rows_of(d.updates, kind)) == len(want)


# ----------------------------------------------------------------------------- (c) snapshots
@pytest.mark.timeout(60)
def test_snapshot_headers_and_requests_match_the_page():
    rng = np.random.default_rng(_seed())
    req = decode(REQUEST, snapshot_request())
    assert req == {"magic": constant(REQUEST, "magic"), "version": constant(REQUEST, "version"),
                   "reserved1": 0, "reserved2": 0}
    assert len(snapshot_request()) == fmt(REQUEST)[0].size
    for status in SNAP_STATUS:
        want = {"magic": SNAP_MAGIC, "epoch": int(rng.integers(1, 2**32)),
                "gseq": int(rng.integers(1, 2**63)),
                "count": int(rng.integers(1, 2**31)) if status == 0 else 0,
                "status": status, "version": FEED_VERSION, "row_size": ROW_SIZE,
                "taken_ns": int(rng.integers(1, 2**62))}
        data = SNAP_HEADER.pack(*want.values())
        assert decode(RESPONSE, data) == want
        # and back: encoded from the page, read by the code
        s, names = fmt(RESPONSE)
        mine = s.pack(*(want[n] for n in names))
        assert mine == data
        assert parse_snapshot_header(mine) == (want["epoch"], want["gseq"], want["count"],
                                               status, want["taken_ns"])
