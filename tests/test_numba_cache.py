"""numba's cache directory stays bounded: a new version of the sources removes the
directories of versions unused for days, beyond the few most recently used, and nothing
else (exposure.core.jit)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exposure.core import jit

DAY = 86400.0


def _version(base: Path, name: str, age_days: float, now: float) -> Path:
    d = base / name
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f.nbi").write_bytes(b"x")
    t = now - age_days * DAY
    os.utime(d, (t, t))
    return d


def test_prune_keeps_the_most_recent_and_the_recently_used_and_nothing_else(tmp_path):
    now = time.time()
    ages = {f"{k:016x}": age for k, age in enumerate([0.1, 30, 20, 10, 9, 8, 3, 2])}
    for name, age in ages.items():
        _version(tmp_path, name, age, now)
    (tmp_path / "notes").mkdir()                       # not a version directory
    old_notes = now - 90 * DAY
    os.utime(tmp_path / "notes", (old_notes, old_notes))
    (tmp_path / "0123456789abcdef.txt").write_text("")  # a file, whatever its name
    gone = jit.prune(tmp_path, keep=4, keep_days=7, now=now)
    # newest first: 0.1, 2, 3, 8 kept as the four most recent; of the rest, 9, 10, 20, 30
    # days unused: all past 7 days
    assert sorted(Path(p).name for p in gone) == sorted(
        n for n, a in ages.items() if a in (9, 10, 20, 30))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["notes", "0123456789abcdef.txt"]
                          + [n for n, a in ages.items() if a in (0.1, 2, 3, 8)])
    # within the grace period nothing beyond the four goes
    assert jit.prune(tmp_path, keep=1, keep_days=30, now=now) == []
    assert jit.prune(tmp_path / "missing", now=now) == []


@pytest.mark.process
def test_a_new_version_of_the_sources_prunes_the_old_ones_and_marks_its_own_used(tmp_path):
    now = time.time()
    old = [_version(tmp_path, f"{k:016x}", 10 + k, now) for k in range(6)]
    env = {**os.environ, "EXPOSURE_NUMBA_CACHE": str(tmp_path)}
    code = "from exposure.core import jit; print(jit.CACHE_DIR)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         timeout=120, check=True, text=True).stdout.strip()
    mine = Path(out)
    assert mine.parent == tmp_path and mine.is_dir()
    assert now - mine.stat().st_mtime < 60
    # its own, then the three most recently used of the old: the rest were 13-15 days idle
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name] + [p.name for p in old[:3]])
    # a start on an existing version prunes nothing (only a new version does)
    newer = _version(tmp_path, "f" * 16, 40, now)
    subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                   timeout=120, check=True)
    assert newer.is_dir()
