"""Numba set-up shared by every jitted module: a cache directory keyed by the sources.

numba's on-disk cache invalidates a function only when *its own* file changes; a change
in a constant of :mod:`exposure.core.types` or in a helper module would silently keep stale
machine code (see shared/NOTES.md). The cache therefore lives in a directory named after
a hash of every ``.py`` file of the package, so any source change starts a fresh cache.
Set ``EXPOSURE_NUMBA_CACHE`` to choose the parent directory.

**The parent directory is bounded.** Each version of the sources leaves a directory of
30-45 MB, and every upgrade (or, on a developer's machine, every edit) makes another: 63 of
them, 621 MB, had piled up here. A process records its use of its directory (its
modification time) at start; when it makes a new one it removes the directories of other
versions that no process has used for :data:`KEEP_DAYS` days, always keeping the
:data:`KEEP` most recently used. A version still running (another checkout, the previous
release during a rolling restart) has been used recently and stays; one removed anyway only
compiles again.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numba
from numba.core import config as _nb_config

__all__ = ["CACHE_DIR", "KEEP", "KEEP_DAYS", "entry", "prune"]

_PKG = Path(__file__).resolve().parent.parent  # the exposure package (this file: core/)
KEEP = 4         # the most recently used versions' directories are always kept
KEEP_DAYS = 7.0  # other versions' directories go once unused for this long
_VERSION_DIR = re.compile(r"[0-9a-f]{16}")  # what _source_fingerprint names


def _source_fingerprint(root: Path = _PKG) -> str:
    """A hash of numba's version and of every ``.py`` file under ``root`` (the whole
    package: a constant of ``feed/wire.py`` compiled into ``node/stages/fanout.py`` must
    start a fresh cache, as must one of ``core/types.py``)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(numba.__version__.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _cache_dir() -> str:
    base = os.environ.get("EXPOSURE_NUMBA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "exposure", "numba"
    )
    return os.path.join(base, _source_fingerprint())


def prune(base: str | os.PathLike, keep: int = KEEP, keep_days: float = KEEP_DAYS,
          now: float | None = None) -> list[str]:
    """Remove the version directories under ``base`` beyond the ``keep`` most recently
    used (modification time) that have not been used for ``keep_days``; other entries are
    never touched. Returns the paths removed. Never raises for what it cannot read or
    remove (a cache: another process may be pruning too)."""
    now = time.time() if now is None else now
    found = []
    try:
        with os.scandir(base) as it:
            for e in it:
                if _VERSION_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False):
                    try:
                        found.append((e.stat(follow_symlinks=False).st_mtime, e.path))
                    except OSError:
                        continue
    except OSError:
        return []
    found.sort(reverse=True)
    gone = []
    for mtime, path in found[keep:]:
        if now - mtime > keep_days * 86400:
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


def _array_math_without_blas_probe() -> None:
    """Load numba's array-math implementations now, with ``scipy.linalg`` out of sight.

    numba loads them at a process's first compile or cache load, and their import probes
    for scipy's BLAS by importing ``scipy.linalg`` (where scipy is installed): about half
    of numba's start-up, 0.2-0.6 s of CPU in every process of a node, each start. The probe
    only picks how ``np.dot`` of two 1-D arrays is inlined in a few array functions; no
    kernel of the package does linear algebra, and one that did would still get scipy's
    BLAS (numba's ``np.dot``, ``np.linalg`` import it when they are compiled)."""
    if "scipy.linalg" in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules["scipy.linalg"] = None  # type: ignore[assignment]  # an ImportError
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg"]


_array_math_without_blas_probe()

CACHE_DIR = _cache_dir()
try:
    _new = not os.path.isdir(CACHE_DIR)
    os.makedirs(CACHE_DIR, exist_ok=True)
    _nb_config.CACHE_DIR = CACHE_DIR
except OSError:  # unwritable home: numba falls back to its own locations
    pass
else:
    try:
        os.utime(CACHE_DIR)  # used now (what prune keeps by)
    except OSError:  # (a directory another user owns: used, not marked)
        pass
    if _new:  # a new version of the sources: the old ones' directories may go
        prune(os.path.dirname(CACHE_DIR))


def entry(dispatcher, *args):
    """The compiled machine-code entry of ``dispatcher`` for the types of ``args``.

    A numba dispatcher works out the types of every argument on every call; for a call
    with a 14-array named tuple that is about 3 us of the 4.5 us a call costs. A stage's hot
    call always passes the same preallocated arrays (and Python ints), so it resolves the
    types once, here, and then calls the compiled entry directly. The caller must keep
    passing arguments of exactly these types: the entry converts them without checking.
    """
    sig = tuple(numba.typeof(a) for a in args)
    dispatcher.compile(sig)
    for s, cres in dispatcher.overloads.items():
        if tuple(s) == sig:
            return cres.entry_point
    return dispatcher  # (not reached with numba 0.68: the compiled overload is keyed by sig)
