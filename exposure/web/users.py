"""The web page's users file: who may log in, and which accounts each one sees.

A TOML file, one ``[[user]]`` table per person::

    [[user]]
    name = "risk"
    password = "scrypt$16384$8$1$<salt hex>$<hash hex>"   # exposure web --hash-password
    accounts = "all"                                       # the risk team: every account

    [[user]]
    name = "pm-alpha"
    password = "scrypt$16384$8$1$..."
    accounts = [101, 102, "ALPHA-3"]     # account ids, or names from accounts.csv

A password is stored only as its scrypt hash (:func:`hash_password`; ``hashlib.scrypt``,
a random 16-byte salt), and checked in constant time (:func:`hmac.compare_digest`). A
login for an unknown name costs the same scrypt as one for a known name. ``accounts`` is
``"all"`` or a list of account ids and names (names are looked up in the node's
``accounts.csv``, ``[reference]``; an unknown name is an error).

Every rule is checked when the file is read and a broken file is a :class:`UsersError`
naming the file, the user and the value; nothing starts on a broken file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path

from exposure.core.refdata import RefData

__all__ = ["User", "Users", "UsersError", "hash_password", "check_password", "load_users",
           "ALL"]

ALL = None  # a user's ``accounts`` when they see every account
_N, _R, _P = 16384, 8, 1  # scrypt's cost: about 20 ms and 16 MiB a hash
_MAX_BYTES = 1 << 20
_MAX_USERS = 10_000
_MAX_PASSWORD = 1024


class UsersError(ValueError):
    """A users file that cannot be used: the message names the file, the user, the value."""


@dataclass(frozen=True)
class User:
    """One person: ``name``, the password's hash, and ``accounts``: a frozenset of account
    ids, or None (:data:`ALL`) for every account."""

    name: str
    password_hash: str
    accounts: frozenset[int] | None

    @property
    def sees_all(self) -> bool:
        return self.accounts is None

    def may_see(self, account: int) -> bool:
        return self.accounts is None or account in self.accounts


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=64 << 20,
                          dklen=32)


def hash_password(password: str) -> str:
    """The stored form of ``password``: ``scrypt$N$r$p$salt$hash`` (hex)."""
    if not password or len(password) > _MAX_PASSWORD:
        raise ValueError(f"a password of 1 to {_MAX_PASSWORD} characters")
    salt = os.urandom(16)
    return f"scrypt${_N}${_R}${_P}${salt.hex()}${_scrypt(password, salt, _N, _R, _P).hex()}"


def _parse_hash(stored: str) -> tuple[int, int, int, bytes, bytes]:
    parts = stored.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not scrypt$N$r$p$salt$hash")
    n, r, p = (int(x) for x in parts[1:4])
    if not (2 <= n <= 1 << 20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
        raise ValueError(f"scrypt cost N={n} r={r} p={p} out of range")
    salt, digest = bytes.fromhex(parts[4]), bytes.fromhex(parts[5])
    if len(salt) < 8 or len(digest) != 32:
        raise ValueError("a salt of at least 8 bytes and a 32-byte hash")
    return n, r, p, salt, digest


_DUMMY = hash_password(secrets.token_hex(16))


def check_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (:func:`hash_password`'s form), compared in
    constant time; False for a malformed hash or an over-long password."""
    if not isinstance(password, str) or len(password) > _MAX_PASSWORD:
        return False
    try:
        n, r, p, salt, digest = _parse_hash(stored)
    except ValueError:
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), digest)


class Users:
    """The users of one file, by name."""

    def __init__(self, users: list[User], source: str = "<users>"):
        self.by_name = {u.name: u for u in users}
        self.source = source

    def __len__(self) -> int:
        return len(self.by_name)

    def authenticate(self, name: str, password: str) -> User | None:
        """The user whose name and password these are, else None. An unknown name costs the
        same hash as a known one (no timing difference tells names apart)."""
        u = self.by_name.get(name) if isinstance(name, str) else None
        ok = check_password(password, u.password_hash if u is not None else _DUMMY)
        return u if ok and u is not None else None


def _accounts(v, names: RefData | None, where: str) -> frozenset[int] | None:
    if v == "all":
        return ALL
    if not isinstance(v, list):
        raise UsersError(f"{where}: accounts = {v!r}: \"all\" or a list of account ids and "
                         "names")
    out = set()
    for a in v:
        if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < 1 << 31:
            out.add(a)
        elif isinstance(a, str):
            acc = names.account_of(a) if names is not None else None
            if acc is None:
                raise UsersError(f"{where}: account {a!r} is not named in the node's "
                                 "accounts.csv ([reference] accounts)")
            out.add(acc)
        else:
            raise UsersError(f"{where}: account {a!r}: an id (>= 0) or a name")
    return frozenset(out)


def load_users(path: str | Path, names: RefData | None = None) -> Users:
    """Read and check the users file at ``path`` (names resolved with ``names``)."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_BYTES:
            raise UsersError(f"{p}: larger than {_MAX_BYTES} bytes")
        doc = tomllib.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UsersError(f"cannot read the users file {str(p)!r}: "
                         f"{getattr(e, 'strerror', None) or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsersError(f"the users file {str(p)!r} is not valid TOML: {e}") from e
    extra = set(doc) - {"user"}
    if extra:
        raise UsersError(f"{p}: unknown key {sorted(extra)[0]!r} (only [[user]] tables)")
    rows = doc.get("user", [])
    if not isinstance(rows, list) or not rows:
        raise UsersError(f"{p}: no [[user]] table")
    if len(rows) > _MAX_USERS:
        raise UsersError(f"{p}: more than {_MAX_USERS} users")
    users: list[User] = []
    seen: set[str] = set()
    for k, row in enumerate(rows):
        where = f"{p}: user {k + 1}"
        if not isinstance(row, dict):
            raise UsersError(f"{where}: not a table")
        unknown = set(row) - {"name", "password", "accounts"}
        if unknown:
            raise UsersError(f"{where}: unknown key {sorted(unknown)[0]!r} (name, password, "
                             "accounts)")
        name = row.get("name")
        if not isinstance(name, str) or not name or len(name) > 128 \
                or not name.isprintable():
            raise UsersError(f"{where}: name = {name!r}: 1 to 128 printable characters")
        where = f"{p}: user {name!r}"
        if name in seen:
            raise UsersError(f"{where}: a second user of that name")
        seen.add(name)
        pw = row.get("password")
        try:
            _parse_hash(pw if isinstance(pw, str) else "")
        except ValueError as e:
            raise UsersError(f"{where}: password is not a hash from `exposure web "
                             f"--hash-password` ({e})") from None
        if "accounts" not in row:
            raise UsersError(f"{where}: no accounts (\"all\", or a list of ids and names)")
        users.append(User(name, pw, _accounts(row["accounts"], names, where)))
    return Users(users, str(p))
