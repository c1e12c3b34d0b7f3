"""Session credentials and entitlements: the sessions file.

A node that listens on anything but a loopback address must have a sessions file
(``[ingest] sessions``): TOML with one ``[[session]]`` table per upstream system::

    [[session]]
    id = 1                        # the session id it logs in as (1..[ingest] max_sessions)
    name = "alpha-oms"            # for logs and status (default "session-<id>")
    secret_file = "alpha.secret"  # its own secret (>= 16 bytes), relative to this file;
                                  # or secret = "..." inline (then protect this file)
    sources = [1]                 # the order-id namespaces it may use: ids, "lo-hi"
                                  # ranges, or "all"
    accounts = [10, 11, "20-29"]  # the accounts it may write (new, fill, bust, position,
                                  # limit)
    instrument = false            # may it send instrument (reference data) events
    mark = false                  # ... mark events
    fx = false                    # ... fx events (currency rates, SPEC section 7)
    limit = false                 # ... limit events (for its accounts)
    roll = false                  # ... roll events (a new trading day: an operator's)

Omitted lists entitle nothing and omitted flags are false: a session may do only what its
table says. Login proves the secret by HMAC over a fresh per-connection nonce
(:func:`exposure.net.wire.login_mac`); secrets stay in the ingest process's memory and never
reach the journal, the logs or ``repr``.

A record of a known type outside its session's entitlements is *unauthorized*: ingest
marks it (``types.R_UNAUTHORIZED``), the kernel applies nothing, and it is counted in the
session's counters and the node's status, never in the SPEC document (replay has no
sessions). The rules, per event type:

=========================== =========================================================
type                        needs
=========================== =========================================================
new, fill, bust             its source and its account
replace, cancel, done       its source
position                    its account
limit                       ``limit`` and its account
instrument / mark / fx      ``instrument`` / ``mark`` / ``fx``
roll                        ``roll`` (an operator's event: ``exposure roll``, the
                            scheduled roll)
=========================== =========================================================

Without a sessions file (the built-in default) every session is open and entitled to
everything: allowed only on a loopback address, and the node says so when it starts.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["SessionSpec", "SessionsError", "Entitlements", "load_sessions",
           "secret_for", "session_names", "ENT_INSTRUMENT", "ENT_MARK", "ENT_LIMIT",
           "ENT_ALL_SOURCES", "ENT_ALL_ACCOUNTS", "ENT_ROLL", "ENT_FX"]

# Entitlement flag bits (Entitlements.flags[session]).
ENT_INSTRUMENT = 1
ENT_MARK = 2
ENT_LIMIT = 4
ENT_ALL_SOURCES = 8
ENT_ALL_ACCOUNTS = 16
ENT_ROLL = 32
ENT_FX = 64
ENT_EVERYTHING = (ENT_INSTRUMENT | ENT_MARK | ENT_LIMIT | ENT_ALL_SOURCES | ENT_ALL_ACCOUNTS
                  | ENT_ROLL | ENT_FX)

_KEYS = {"id", "name", "secret", "secret_file", "sources", "accounts", "instrument", "mark",
         "limit", "roll", "fx"}
MIN_SECRET = 16


class SessionsError(ValueError):
    """A sessions file that cannot be used; the message names the session and the key."""


@dataclass(frozen=True)
class SessionSpec:
    id: int
    name: str
    secret: bytes = field(repr=False)
    sources: tuple[int, ...] | None    # None: all
    accounts: tuple[int, ...] | None   # None: all
    instrument: bool = False
    mark: bool = False
    limit: bool = False
    roll: bool = False
    fx: bool = False

    @property
    def flags(self) -> int:
        return ((ENT_INSTRUMENT if self.instrument else 0)
                | (ENT_MARK if self.mark else 0) | (ENT_LIMIT if self.limit else 0)
                | (ENT_ROLL if self.roll else 0) | (ENT_FX if self.fx else 0)
                | (ENT_ALL_SOURCES if self.sources is None else 0)
                | (ENT_ALL_ACCOUNTS if self.accounts is None else 0))


def _ids(v, key: str, cap: int) -> tuple[int, ...] | None:
    if v == "all":
        return None
    if not isinstance(v, list):
        raise SessionsError(f"{key} = {v!r}: a list of ids and \"lo-hi\" ranges, or \"all\"")
    out: set[int] = set()
    for x in v:
        if isinstance(x, int) and not isinstance(x, bool):
            lo = hi = x
        elif isinstance(x, str) and x.count("-") == 1:
            a, b = x.split("-")
            try:
                lo, hi = int(a), int(b)
            except ValueError:
                raise SessionsError(f"{key}: {x!r} is not a range \"lo-hi\"") from None
        else:
            raise SessionsError(f"{key}: {x!r} is neither an id nor a range \"lo-hi\"")
        if not 0 <= lo <= hi < cap:
            raise SessionsError(f"{key}: {x!r} outside 0..{cap - 1} (the capacity)")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))


def _secret(t: dict, where: str, base: Path) -> bytes:
    if ("secret" in t) == ("secret_file" in t):
        raise SessionsError(f"{where}: give exactly one of secret and secret_file")
    if "secret" in t:
        if not isinstance(t["secret"], str):
            raise SessionsError(f"{where}.secret: a string")
        data = t["secret"].encode().strip()
    else:
        if not isinstance(t["secret_file"], str):
            raise SessionsError(f"{where}.secret_file: a file name")
        p = base / os.path.expanduser(t["secret_file"])
        try:
            data = p.read_bytes().strip()
        except OSError as e:
            raise SessionsError(f"{where}.secret_file: cannot read {str(p)!r}: "
                                f"{e.strerror or e}") from None
    if len(data) < MIN_SECRET:
        raise SessionsError(f"{where}: the secret is {len(data)} bytes; use at least "
                            f"{MIN_SECRET} (e.g. `head -c 32 /dev/urandom | base64`)")
    return data


def load_sessions(path: str | Path, max_sessions: int, accounts: int,
                  sources: int) -> dict[int, SessionSpec]:
    """The sessions of ``path`` by id; :class:`SessionsError` names what is wrong (never
    a secret)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        doc = tomllib.loads(raw.decode())
    except OSError as e:
        raise SessionsError(f"cannot read the sessions file {str(path)!r}: "
                            f"{e.strerror or e}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise SessionsError(f"the sessions file {str(path)!r} is not TOML: {e}") from None
    unknown = set(doc) - {"session"}
    if unknown:
        raise SessionsError(f"{path}: unknown key {sorted(unknown)[0]!r} (one [[session]] "
                            "table per session)")
    tables = doc.get("session", [])
    if not isinstance(tables, list) or not tables:
        raise SessionsError(f"{path}: no [[session]] tables")
    out: dict[int, SessionSpec] = {}
    for k, t in enumerate(tables):
        where = f"{path.name}: session[{k}]"
        bad = set(t) - _KEYS
        if bad:
            raise SessionsError(f"{where}: unknown key {sorted(bad)[0]!r} (allowed: "
                                f"{', '.join(sorted(_KEYS))})")
        sid = t.get("id")
        if not isinstance(sid, int) or isinstance(sid, bool) or not 1 <= sid <= max_sessions:
            raise SessionsError(f"{where}.id = {sid!r}: 1..{max_sessions} "
                                "([ingest] max_sessions)")
        if sid in out:
            raise SessionsError(f"{where}.id = {sid}: given twice")
        where = f"{path.name}: session {sid}"
        name = t.get("name", f"session-{sid}")
        if not isinstance(name, str) or not name.isprintable() or len(name) > 64:
            raise SessionsError(f"{where}.name: printable text of at most 64 characters")
        for flag in ("instrument", "mark", "limit", "roll", "fx"):
            if not isinstance(t.get(flag, False), bool):
                raise SessionsError(f"{where}.{flag} = {t[flag]!r}: true or false")
        out[sid] = SessionSpec(
            id=sid, name=name, secret=_secret(t, where, path.parent),
            sources=_ids(t.get("sources", []), f"{where}.sources", sources),
            accounts=_ids(t.get("accounts", []), f"{where}.accounts", accounts),
            instrument=t.get("instrument", False), mark=t.get("mark", False),
            limit=t.get("limit", False), roll=t.get("roll", False), fx=t.get("fx", False))
    return out


def session_names(path: str | Path) -> dict[int, str]:
    """Each session's name by id, read without its secret ({} when the file cannot be
    read or parsed: names are for display)."""
    try:
        doc = tomllib.loads(Path(path).read_text())
        return {t["id"]: str(t.get("name", f"session-{t['id']}"))
                for t in doc.get("session", []) if isinstance(t.get("id"), int)}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def secret_for(path: str | Path, session: int) -> bytes:
    """Session ``session``'s secret from a sessions file (for ``exposure send``)."""
    specs = load_sessions(path, 2**32 - 1, 2**32, 2**32)
    if session not in specs:
        raise SessionsError(f"{path}: no [[session]] with id = {session}")
    return specs[session].secret


class Entitlements:
    """The entitlements as arrays for ingest's jitted scan, one row per session id:
    ``flags`` (ENT_* bits), ``src`` and ``acct`` (bitmaps: bit ``x`` of row ``s`` set when
    session ``s`` may use source / account ``x``)."""

    def __init__(self, max_sessions: int, accounts: int, sources: int) -> None:
        n = max_sessions + 1
        self.flags = np.zeros(n, np.uint8)
        self.src = np.zeros((n, (sources + 63) // 64), np.uint64)
        self.acct = np.zeros((n, (accounts + 63) // 64), np.uint64)

    @classmethod
    def everything(cls, max_sessions: int) -> Entitlements:
        """Every session open and entitled to everything (no sessions file)."""
        e = cls(max_sessions, 64, 64)
        e.flags[1:] = ENT_EVERYTHING
        return e

    @classmethod
    def of(cls, specs: dict[int, SessionSpec], max_sessions: int, accounts: int,
           sources: int) -> Entitlements:
        e = cls(max_sessions, accounts, sources)
        for sid, s in specs.items():
            e.flags[sid] = s.flags
            for ids, bits in ((s.sources, e.src[sid]), (s.accounts, e.acct[sid])):
                for x in ids or ():
                    bits[x >> 6] |= np.uint64(1) << np.uint64(x & 63)
        return e

    def allows(self, session: int, what: str, x: int = 0) -> bool:
        """For tests and status: may ``session`` use ``what`` ("source", "account",
        "instrument", "mark", "limit", "roll", "fx") ``x``."""
        f = int(self.flags[session])
        if what in ("source", "account"):
            every = ENT_ALL_SOURCES if what == "source" else ENT_ALL_ACCOUNTS
            bits = self.src if what == "source" else self.acct
            return bool(f & every) or (x < bits.shape[1] * 64 and bool(
                int(bits[session, x >> 6]) >> (x & 63) & 1))
        return bool(f & {"instrument": ENT_INSTRUMENT, "mark": ENT_MARK,
                         "limit": ENT_LIMIT, "roll": ENT_ROLL, "fx": ENT_FX}[what])
