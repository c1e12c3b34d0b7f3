"""Numba set-up shared by every jitted module: a cache directory keyed by the sources.

numba's on-disk cache invalidates a function only when *its own* file changes; a change
in a constant of :mod:`exposure.types` or in a helper module would silently keep stale
machine code (see shared/NOTES.md). The cache therefore lives in a directory named after
a hash of every ``.py`` file of the package, so any source change starts a fresh cache.
Set ``EXPOSURE_NUMBA_CACHE`` to choose the parent directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numba
from numba.core import config as _nb_config

_PKG = Path(__file__).resolve().parent


def _source_fingerprint() -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(numba.__version__.encode())
    for p in sorted(_PKG.rglob("*.py")):
        h.update(str(p.relative_to(_PKG)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _cache_dir() -> str:
    base = os.environ.get("EXPOSURE_NUMBA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "exposure", "numba"
    )
    return os.path.join(base, _source_fingerprint())


CACHE_DIR = _cache_dir()
try:
    os.makedirs(CACHE_DIR, exist_ok=True)
    _nb_config.CACHE_DIR = CACHE_DIR
except OSError:  # unwritable home: numba falls back to its own locations
    pass
