"""The fuzzer's sessions and content: the configured sessions (:data:`SPECS`) and their
sessions file, the fuzzer's own entitlement model (independent of :mod:`exposure.net.sessions`),
the deterministic content of a session by (seed, session, sseq), and EVENTS frames of it."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exposure.core.types import (
    EVENT_DTYPE,
    EVENT_SIZE,
    R_BAD_FIELD,
    R_UNAUTHORIZED,
    R_WRONG_PARTITION,
    T_BUST,
    T_CANCEL,
    T_DONE,
    T_FILL,
    T_FX,
    T_INSTRUMENT,
    T_LIMIT,
    T_MARK,
    T_NEW,
    T_POSITION,
    T_REPLACE,
    T_ROLL,
)
from exposure.net import wire as W

CHUNK = 8192            # content records per deterministic chunk
N_INST = 48             # instruments per session (1000 * id ...)
REF = 1                 # the reference session (instrument and mark events first)
MAX_SESSIONS = 256      # the node's [ingest] max_sessions (the default)
_HB = W.encode_heartbeat()
_EV1 = np.frombuffer(W.HEADER.pack(W.MAGIC, W.VERSION, W.K_EVENTS, EVENT_SIZE), np.uint8)
_M64 = 0xFFFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------- sessions
@dataclass(frozen=True)
class Spec:
    """One configured session: its entitlements (None: all) and what its own flow uses."""

    id: int
    name: str
    sources: tuple[int, ...] | None
    accounts: tuple[int, ...] | None
    instrument: bool
    mark: bool
    limit: bool
    flow_sources: tuple[int, ...]
    flow_accounts: tuple[int, ...]
    inline: bool        # secret inline in the sessions file (else a secret_file)
    roll: bool = False  # may it send roll events
    fx: bool = False    # may it send fx events (SPEC section 7)

    @property
    def instruments(self) -> np.ndarray:
        return np.arange(1000 * self.id, 1000 * self.id + N_INST, dtype=np.uint32)

    def variants(self) -> list[str]:
        """The ways an event of this session can be unauthorized."""
        v = []
        if self.sources is not None:
            v.append("src")
        if self.accounts is not None:
            v.append("acct")
        for flag in ("instrument", "mark", "limit"):
            if not getattr(self, flag):
                v.append(flag)
        return v


def _r(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(range(lo, hi + 1))


SPECS = (
    Spec(1, "ref", (1,), _r(0, 19), True, True, True, (1,), _r(0, 19), True, roll=True,
         fx=True),
    Spec(3, "pm-a", (3,), _r(100, 119), False, False, True, (3,), _r(100, 119), False),
    Spec(5, "pm-b", (5, 6), _r(200, 219), False, False, False, (5, 6), _r(200, 219), False),
    Spec(7, "pm-c", _r(10, 19), _r(300, 319), False, True, False, (10, 11, 12), _r(300, 319),
         True),
    Spec(9, "wide", None, None, False, False, False, (40, 41), _r(400, 419), False),
    Spec(11, "mute", (), (), False, False, False, (50,), _r(500, 519), True),
)
SPEC_BY_ID = {s.id: s for s in SPECS}
UNCONFIGURED = tuple(s for s in range(1, MAX_SESSIONS + 1) if s not in SPEC_BY_ID)


def secret_of(seed: int, sid: int) -> bytes:
    return hashlib.sha256(f"exposure-fuzz/{seed}/{sid}".encode()).hexdigest().encode()


def _toml_ids(ids: tuple[int, ...] | None) -> str:
    if ids is None:
        return '"all"'
    if len(ids) > 2 and ids == tuple(range(ids[0], ids[-1] + 1)):
        return f'["{ids[0]}-{ids[-1]}"]'
    return "[" + ", ".join(str(x) for x in ids) + "]"


def write_sessions(directory: Path, seed: int) -> Path:
    """The sessions file (and its secret files) for :data:`SPECS`."""
    lines = []
    for s in SPECS:
        lines += ["[[session]]", f"id = {s.id}", f'name = "{s.name}"']
        sec = secret_of(seed, s.id).decode()
        if s.inline:
            lines.append(f'secret = "{sec}"')
        else:
            p = directory / f"fuzz-{s.id}.secret"
            p.write_text(sec + "\n")
            p.chmod(0o600)
            lines.append(f'secret_file = "{p.name}"')
        lines += [f"sources = {_toml_ids(s.sources)}", f"accounts = {_toml_ids(s.accounts)}",
                  f"instrument = {str(s.instrument).lower()}",
                  f"mark = {str(s.mark).lower()}", f"limit = {str(s.limit).lower()}",
                  f"roll = {str(s.roll).lower()}", f"fx = {str(s.fx).lower()}", ""]
    path = directory / "fuzz-sessions.toml"
    path.write_text("\n".join(lines))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------- the model
def model_authorized(recs: np.ndarray, spec: Spec) -> np.ndarray:
    """The fuzzer's own reading of the entitlement rules (exposure/sessions.py's table,
    re-implemented): whether each record of session ``spec`` is authorized. Unknown types
    pass (the kernel rejects them as bad_type)."""
    t = recs["type"]
    src_ok = (np.ones(len(recs), bool) if spec.sources is None
              else np.isin(recs["source"], np.asarray(spec.sources, np.uint32)))
    acc_ok = (np.ones(len(recs), bool) if spec.accounts is None
              else np.isin(recs["account"], np.asarray(spec.accounts, np.uint32)))
    ok = np.ones(len(recs), bool)
    ok &= ~np.isin(t, [T_NEW, T_FILL, T_REPLACE, T_CANCEL, T_DONE, T_BUST]) | src_ok
    ok &= ~np.isin(t, [T_NEW, T_FILL, T_POSITION, T_LIMIT, T_BUST]) | acc_ok
    ok &= (t != T_LIMIT) | spec.limit
    ok &= (t != T_INSTRUMENT) | spec.instrument
    ok &= (t != T_ROLL) | spec.roll
    ok &= (t != T_FX) | spec.fx
    ok &= (t != T_MARK) | spec.mark
    return ok


def model_reject_byte(recs: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """The reject byte a node stamps: 9 (unauthorized) where not ``ok``; else the client's
    own, except that a client's own 9 or 8 (wrong_partition) becomes bad_field (only
    ingest decides those)."""
    own = recs["reject"]
    mine = np.isin(own, [R_UNAUTHORIZED, R_WRONG_PARTITION])
    return np.where(ok, np.where(mine, R_BAD_FIELD, own), R_UNAUTHORIZED).astype(np.uint8)


# --------------------------------------------------------------------------- content
_CATS = ("flow", "unentitled", "edge_random", "byte_random", "bit_flipped", "reference")
_CAT_P = (0.84, 0.06, 0.05, 0.03, 0.02)
_REF_CAT = 5
# Bits a bit flip may touch: all but the top three exponent bits of the float fields
# (price, x0..x3), so that no accepted value can overflow the tallies to inf (which no
# comparison of documents can pass).
_FLIPPABLE = np.array([b for b in range(EVENT_SIZE * 8)
                       if not (64 * 8 <= b < 104 * 8 and 60 <= b % 64 <= 62)])


def _remap(vals: np.ndarray, targets) -> np.ndarray:
    _, inv = np.unique(vals, return_inverse=True)
    t = np.asarray(targets)
    return t[inv.reshape(-1) % len(t)].astype(vals.dtype)


def _ref_block(seed: int) -> np.ndarray:
    """Session 1's first records: reference data and a first mark for every session's
    instruments, and limits for its own accounts."""
    rng = np.random.default_rng([seed & _M64, 0x5EF])
    insts = np.concatenate([s.instruments for s in SPECS])
    n = len(insts)
    ins = np.zeros(n, EVENT_DTYPE)
    ins["type"] = T_INSTRUMENT
    ins["instrument"] = insts
    ins["x0"] = rng.choice([1.0, 10.0, 100.0], n)
    ins["x1"] = rng.uniform(0.05, 0.5, n)
    ins["x2"] = rng.uniform(0.5, 1.5, n)
    ins["sector"] = insts // 1000 * 4 + rng.integers(0, 4, n)
    mk = np.zeros(n, EVENT_DTYPE)
    mk["type"] = T_MARK
    mk["instrument"] = insts
    mk["price"] = np.round(rng.uniform(5, 500, n), 2)
    accs = SPEC_BY_ID[REF].flow_accounts
    lim = np.zeros(len(accs), EVENT_DTYPE)
    lim["type"] = T_LIMIT
    lim["account"] = accs
    lim["x0"], lim["x1"], lim["x2"], lim["x3"] = 5e8, 1e8, 5e7, 2e6
    return np.concatenate([ins, mk, lim])


def _foreign(spec: Spec, attr: str, extra: tuple[int, ...]) -> np.ndarray:
    own = getattr(spec, "sources" if attr == "flow_sources" else "accounts") or ()
    pool = {x for s in SPECS for x in getattr(s, attr)} | set(extra)
    return np.array(sorted(pool - set(own)), np.uint32)


def _unentitled(rng, flow: np.ndarray, m: int, spec: Spec) -> np.ndarray:
    """``m`` valid-looking events outside ``spec``'s entitlements."""
    out = np.zeros(m, EVENT_DTYPE)
    if m == 0:
        return out
    orders = flow[np.isin(flow["type"], [T_NEW, T_FILL])]
    if len(orders):
        out[:] = orders[rng.integers(0, len(orders), m)]
    else:
        out["type"] = T_NEW
    out["reject"] = 0
    out["flags"] = 0
    out["account"] = rng.choice(spec.flow_accounts, m)
    out["source"] = rng.choice(spec.flow_sources, m)
    out["instrument"] = rng.choice(spec.instruments, m)
    out["side"] = rng.integers(1, 4, m)
    out["qty"] = rng.integers(1, 50, m) * 100
    out["price"] = np.round(rng.uniform(5, 500, m), 2)
    variants = spec.variants()
    v = rng.integers(0, len(variants), m)
    for j, name in enumerate(variants):
        sel = np.flatnonzero(v == j)
        k = len(sel)
        if name == "src":
            out["type"][sel] = rng.choice([T_NEW, T_FILL, T_REPLACE, T_CANCEL, T_DONE], k)
            out["source"][sel] = rng.choice(_foreign(spec, "flow_sources", (900, 1023)), k)
        elif name == "acct":
            kinds = [T_NEW, T_FILL, T_POSITION] + ([T_LIMIT] if spec.limit else [])
            out["type"][sel] = rng.choice(kinds, k)
            out["account"][sel] = rng.choice(_foreign(spec, "flow_accounts", (4000, 4095)), k)
            out["x0"][sel] = 1e9
        elif name == "instrument":
            out["type"][sel] = T_INSTRUMENT
            out["x0"][sel], out["x1"][sel], out["x2"][sel] = 2.0, 0.1, 1.0
            out["sector"][sel] = 3
        elif name == "mark":
            out["type"][sel] = T_MARK
        else:
            out["type"][sel] = T_LIMIT
            out["x0"][sel], out["x1"][sel], out["x2"][sel], out["x3"][sel] = 1e9, 1e8, 1e7, 1e6
    return out


def _edge_random(rng, m: int, spec: Spec) -> np.ndarray:
    """``m`` records of random edge values in every field (valid types mostly, some of
    them on the session's own ids, so they reach the kernel's rules)."""
    out = np.zeros(m, EVENT_DTYPE)
    if m == 0:
        return out
    pick = rng.choice
    out["type"] = pick([0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 9, 9, 10, 255], m)
    out["side"] = pick([0, 1, 1, 2, 3, 4, 255], m)
    out["qty"] = pick(np.array([0, 1, -1, 100, 5000, 10**12, 10**12 + 1, -10**12,
                                -10**12 - 1, 2**62, -2**63, 2**63 - 1], np.int64), m)
    fl = np.array([0.0, -0.0, 0.01, 1.0, 99.5, 1e6, 1e9, -1.0, np.nan, np.inf, -np.inf,
                   5e-324])
    out["price"] = pick(fl, m)
    xs = np.array([0.0, -1.0, 0.5, 1.0, 100.0, 1e6, np.nan, np.inf, -np.inf])
    for f in ("x0", "x1", "x2", "x3"):
        out[f] = pick(xs, m)
    out["sector"] = pick(np.array([0, 1, 255, 256, 2**32 - 1], np.uint64), m)
    out["flags"] = pick([0, 1, 2, 255], m)
    out["reject"] = pick([0] * 12 + [1, 2, 7, R_UNAUTHORIZED, 200], m)
    oid = pick(np.array([0, 2**63 - 1, 2**63, 2**64 - 1], np.uint64), m)
    small = rng.random(m) < 0.8
    oid[small] = rng.integers(1, 40, int(small.sum()))
    out["order_id"] = oid
    srcs = np.array(list(spec.flow_sources) * 4 + [1, 3, 5, 40, 900, 1023, 1024, 2**32 - 1],
                    np.uint64)
    out["source"] = pick(srcs, m)
    accs = np.array(list(spec.flow_accounts) + [0, 100, 4095, 4096, 2**32 - 1], np.uint64)
    out["account"] = pick(accs, m)
    inst = np.array(list(spec.instruments) + [1000, 3000, 65535, 65536, 2**32 - 1],
                    np.uint64)
    out["instrument"] = pick(inst, m)
    return out


def _bit_flipped(rng, flow: np.ndarray, m: int) -> np.ndarray:
    """``m`` copies of flow records with one to four random bits flipped."""
    out = (flow[rng.integers(0, len(flow), m)].copy() if len(flow) and m
           else np.zeros(m, EVENT_DTYPE))
    u8 = out.view(np.uint8).reshape(m, EVENT_SIZE)
    k = rng.integers(1, 5, m)
    for j in range(4):
        rows = np.flatnonzero(k > j)
        bits = rng.choice(_FLIPPABLE, len(rows))
        u8[rows, bits // 8] ^= (1 << (bits % 8)).astype(np.uint8)
    return out


def content_chunk(seed: int, sid: int, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Records sseq ``c * CHUNK + 1 ..`` of session ``sid`` and each one's category
    (index into ``_CATS``): a pure function of its arguments."""
    from exposure.bench.flowgen import generate

    spec = SPEC_BY_ID[sid]
    rng = np.random.default_rng([seed & _M64, sid, c])
    head = _ref_block(seed) if sid == REF and c == 0 else np.zeros(0, EVENT_DTYPE)
    n = CHUNK - len(head)
    cat = rng.choice(len(_CAT_P), n, p=_CAT_P)
    nf = int((cat == 0).sum())
    flow = generate(max(nf, 1), accounts=len(spec.flow_accounts), instruments=N_INST,
                    sources=len(spec.flow_sources), universe=16, live_target=256,
                    seed=int(rng.integers(1, 2**31)))[:nf].copy()
    flow["account"] = _remap(flow["account"], spec.flow_accounts)
    flow["instrument"] = _remap(flow["instrument"], spec.instruments)
    flow["source"] = np.asarray(spec.flow_sources, np.uint32)[flow["source"]]
    flow["order_id"] += np.uint64(c) << np.uint64(32)
    flow["gseq"] = 0
    body = np.zeros(n, EVENT_DTYPE)
    body[cat == 0] = flow
    body[cat == 1] = _unentitled(rng, flow, int((cat == 1).sum()), spec)
    body[cat == 2] = _edge_random(rng, int((cat == 2).sum()), spec)
    m = int((cat == 3).sum())
    body[cat == 3] = np.frombuffer(rng.bytes(m * EVENT_SIZE), EVENT_DTYPE)
    body["send_ns"][cat != 3] = rng.integers(0, 2**62, int((cat != 3).sum()))
    body[cat == 4] = _bit_flipped(rng, flow, int((cat == 4).sum()))
    out = np.concatenate([head, body])
    out["sseq"] = np.arange(c * CHUNK + 1, (c + 1) * CHUNK + 1, dtype=np.uint64)
    cats = np.concatenate([np.full(len(head), _REF_CAT, np.uint8), cat.astype(np.uint8)])
    return out, cats


class Content:
    """A session's content by sseq (chunks generated on demand, kept)."""

    def __init__(self, seed: int, sid: int):
        self.seed, self.sid = seed, sid
        self._bytes: dict[int, bytes] = {}

    def _chunk(self, c: int) -> bytes:
        b = self._bytes.get(c)
        if b is None:
            b = self._bytes[c] = content_chunk(self.seed, self.sid, c)[0].tobytes()
        return b

    def raw(self, lo: int, hi: int) -> bytes:
        """The records sseq ``lo`` .. ``hi - 1`` (1-based), as bytes."""
        parts = []
        s = lo
        while s < hi:
            c, i = divmod(s - 1, CHUNK)
            n = min(hi - s, CHUNK - i)
            parts.append(self._chunk(c)[i * EVENT_SIZE:(i + n) * EVENT_SIZE])
            s += n
        return b"".join(parts)

    def records(self, lo: int, hi: int) -> np.ndarray:
        return np.frombuffer(self.raw(lo, hi), EVENT_DTYPE).copy()


def content_upto(seed: int, sid: int, held: int) -> tuple[np.ndarray, np.ndarray]:
    """Records 1..held of a session and their categories."""
    recs, cats = [], []
    for c in range(-(-held // CHUNK)):
        r, k = content_chunk(seed, sid, c)
        recs.append(r)
        cats.append(k)
    if not recs:
        return np.zeros(0, EVENT_DTYPE), np.zeros(0, np.uint8)
    return np.concatenate(recs)[:held], np.concatenate(cats)[:held]


# --------------------------------------------------------------------------- frames
def _hdr(kind: int, length: int, magic: int = W.MAGIC, version: int = W.VERSION) -> bytes:
    return W.HEADER.pack(magic, version, kind, length & 0xFFFF_FFFF)


def events_frames(raw: bytes, sizes: list[int] | None = None) -> bytes:
    """EVENTS frames of the records ``raw``: one record each, or ``sizes`` records each."""
    n = len(raw) // EVENT_SIZE
    if sizes is None:
        a = np.empty((n, 8 + EVENT_SIZE), np.uint8)
        a[:, :8] = _EV1
        a[:, 8:] = np.frombuffer(raw, np.uint8).reshape(n, EVENT_SIZE)
        return a.tobytes()
    parts = []
    o = 0
    for k in sizes:
        parts.append(_hdr(W.K_EVENTS, k * EVENT_SIZE))
        parts.append(raw[o:o + k * EVENT_SIZE])
        o += k * EVENT_SIZE
    return b"".join(parts)


def _sizes(rnd: random.Random, nframes: int) -> list[int] | None:
    if rnd.random() < 0.5:
        return None
    out = []
    for _ in range(nframes):
        u = rnd.random()
        out.append(1 if u < 0.8 else rnd.randint(2, 8) if u < 0.97 else rnd.randint(9, 300))
    return out


def _random_records(nrng, k: int) -> np.ndarray:
    return np.frombuffer(nrng.bytes(k * EVENT_SIZE), EVENT_DTYPE).copy()
