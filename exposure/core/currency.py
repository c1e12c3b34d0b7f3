"""The fund's currencies (shared/SPEC.md section 7): the base currency's code and the ids of
the others, as a node's ``[currencies]`` table names them.

    from exposure.core.currency import Currencies
    ccy = Currencies.from_table("USD", {"EUR": 1, "JPY": 2})
    ccy.id_of("JPY")   # 2
    ccy.code(0)        # "USD" (id 0 is always the base currency)

A code is three capital letters A-Z, the form of ISO 4217 (the list itself is not checked:
funds also use codes outside it, such as CNH for offshore yuan). Ids are 1..255, each used
once; the base currency is id 0 and is not listed among the others. The events carry the
ids (an ``instrument``'s ``currency``, an ``fx``'s); files, FIX and people use the codes.

No numba, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Currencies", "CurrencyError", "DEFAULT_BASE", "MAX_CURRENCY", "valid_code"]

DEFAULT_BASE = "USD"
MAX_CURRENCY = 255          # the highest id (SPEC section 7: 0 <= currency < 256)
_CODE = re.compile(r"[A-Z]{3}")


class CurrencyError(ValueError):
    """A currencies table that cannot be used; the message names the code or the id."""


def valid_code(code: object) -> bool:
    """Whether ``code`` is three capital letters A-Z (an ISO 4217 code's form)."""
    return isinstance(code, str) and _CODE.fullmatch(code) is not None


@dataclass(frozen=True)
class Currencies:
    """The base currency's code and the other currencies' ids (code -> 1..255). Build one
    with :meth:`from_table` (which checks it); the default is the base alone, ``USD``."""

    base: str = DEFAULT_BASE
    ids: Mapping[str, int] = field(default_factory=dict)
    _codes: dict[int, str] = field(default_factory=dict, init=False, repr=False,
                                   compare=False)

    def __post_init__(self) -> None:
        codes = {0: self.base, **{int(v): k for k, v in self.ids.items()}}
        object.__setattr__(self, "_codes", codes)

    @classmethod
    def from_table(cls, base: object = DEFAULT_BASE, ids: object = None, *,
                   where: str = "currencies") -> Currencies:
        """A checked table; :class:`CurrencyError` names ``where``'s bad key and value."""
        if not valid_code(base):
            raise CurrencyError(f"{where}.base = {base!r}: a currency code, three capital "
                                f"letters such as \"USD\" (ISO 4217)")
        ids = {} if ids is None else ids
        if not isinstance(ids, Mapping):
            raise CurrencyError(f"{where}.ids = {ids!r}: a table of codes and ids, e.g. "
                                "{ EUR = 1, JPY = 2 }")
        seen: dict[int, str] = {}
        for code, cid in ids.items():
            if not valid_code(code):
                raise CurrencyError(f"{where}.ids: {code!r} is not a currency code (three "
                                    f"capital letters such as \"EUR\", ISO 4217)")
            if code == base:
                raise CurrencyError(f"{where}.ids.{code}: {code} is the base currency, "
                                    f"whose id is always 0; leave it out of ids")
            if not isinstance(cid, int) or isinstance(cid, bool) or \
                    not 1 <= cid <= MAX_CURRENCY:
                raise CurrencyError(f"{where}.ids.{code} = {cid!r}: an id 1..{MAX_CURRENCY} "
                                    f"(0 is the base currency, {base})")
            if cid in seen:
                raise CurrencyError(f"{where}.ids.{code} = {cid}: id {cid} is {seen[cid]}'s "
                                    f"too (each id once)")
            seen[cid] = code
        return cls(base, dict(sorted(ids.items(), key=lambda kv: kv[1])))

    def id_of(self, code: str) -> int | None:
        """The id of a code (the base's is 0), or None for a code the table does not name."""
        if code == self.base:
            return 0
        return self.ids.get(code)

    def code(self, cid: int) -> str | None:
        """The code of an id, or None for an id the table does not name."""
        return self._codes.get(int(cid))

    def label(self, cid: int) -> str:
        """The code of an id, or ``#<id>`` for one the table does not name (an event sent
        with an id the config leaves out is still shown)."""
        c = self._codes.get(int(cid))
        return c if c is not None else f"#{int(cid)}"

    @property
    def codes(self) -> dict[int, str]:
        """Every id the table names and its code, the base (0) first."""
        return dict(sorted(self._codes.items()))

    def describe(self) -> str:
        """One line for people: ``USD (base), EUR = 1, JPY = 2``."""
        return ", ".join([f"{self.base} (base)"] + [f"{k} = {v}" for k, v in self.ids.items()])
