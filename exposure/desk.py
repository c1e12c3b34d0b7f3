"""Read-only access to a node's (or a consolidator's) tallies in shared memory.

    from exposure.desk import Desk
    with Desk("exposure") as d:
        print(d.fund(), d.accounts()[:5])

    from exposure.desk import open_desk
    with open_desk("node.toml") as d:        # the node's name and its [reference] names
        for r in d.accounts():
            print(d.names.account_name(int(r["account"])) if d.names else r["account"])

The implementation is :mod:`exposure.engine.desk`; this module is what users import.
"""

from __future__ import annotations

from pathlib import Path

from exposure.config.model import NodeConfig
from exposure.core.currency import Currencies
from exposure.core.refdata import RefData
from exposure.engine.desk import ACCOUNT_ROW, INSTRUMENT_ROW, POSITION_ROW, SECTOR_ROW, Desk

__all__ = ["Desk", "ACCOUNT_ROW", "INSTRUMENT_ROW", "SECTOR_ROW", "POSITION_ROW", "RefData",
           "Currencies", "load_names", "open_desk"]


def _config(config: str | Path | NodeConfig | None) -> NodeConfig:
    from exposure.config.node import load_config

    return config if isinstance(config, NodeConfig) else load_config(config)


def load_names(config: str | Path | NodeConfig | None = None) -> RefData | None:
    """The names of a node's ``[reference]`` files (``instruments.csv``, ``accounts.csv``)
    for ``config`` (a path, a loaded ``NodeConfig`` or None for the built-in default), or
    None where the config names no file. Lookups: ``symbol(i)``, ``instrument_name(i)``,
    ``instrument_of(symbol)``, ``account_name(a)``, ``account_of(name)``."""
    return _config(config).names


def open_desk(config: str | Path | NodeConfig | None = None) -> Desk:
    """A :class:`Desk` on the node that ``config`` describes, with ``Desk.names`` set from
    its ``[reference]`` files (None where it names none) and ``Desk.currencies`` from its
    ``[currencies]`` (the base currency's code labels money figures; an instrument row's
    ``currency`` id names its own)."""
    cfg = _config(config)
    return Desk(cfg.name, names=cfg.names, currencies=cfg.currencies)
