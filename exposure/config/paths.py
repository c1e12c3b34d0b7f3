"""Where things are: the directory relative file names in a config are taken from, and a
node's data directory (XDG_DATA_HOME)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["config_dir", "data_dir"]


def config_dir(source: str) -> Path:
    """The directory of the config file ``source`` (the current one for the built-in
    default, whose source is ``"<built-in default>"``)."""
    return Path(source).parent if not source.startswith("<") else Path.cwd()


def data_dir(journal_dir: str, name: str) -> Path:
    """``[journal] dir`` (``~`` expanded), or for ``""``
    ``$XDG_DATA_HOME/exposure/<name>`` (``~/.local/share`` when XDG_DATA_HOME is unset)."""
    if journal_dir:
        return Path(os.path.expanduser(journal_dir))
    return Path(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")) / \
        "exposure" / name
