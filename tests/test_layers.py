"""Layers that point one way. Every import of every module under ``exposure/`` (at module
level and inside functions: ``import x``, ``from x import y``, ``from pkg import module``,
relative or absolute) is read with :mod:`ast`, and

* a module imports only from its own layer or a lower one (:data:`ORDER`);
* no internal module imports a public thin module (:data:`PUBLIC`);
* no modules import each other, directly or round a longer cycle;
* the product imports neither ``perf`` (the benchmark scripts) nor ``tests``.

And ``exposure status``, ``exposure send --help`` and ``exposure dump`` (no node running)
load no numba: the operator's reads are numpy views over the layouts.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "exposure"

# The layer order, lowest first: a module may import from its own layer and the ones before
# it, never from one after it. docs/design.md (its "Modules" section) must state the same
# order: core < shm < engine < store < net < pair < config < feed < node < cluster < fix
# < harness < bench < ops < public
ORDER = ("core", "shm", "engine", "store", "net", "pair", "config", "feed", "node", "cluster",
         "fix", "web", "harness", "bench", "ops", "public")

# The public thin modules users import (exposure/__init__.py says which): the top layer.
# Nothing inside the product imports them; they re-export what lies below.
PUBLIC = frozenset({
    "exposure", "exposure.__main__", "exposure.desk", "exposure.client", "exposure.replay",
    "exposure.feed", "exposure.config",
})

FORBIDDEN_TOP = ("perf", "tests")  # outside the product: never imported by it


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    return {_name(p): p for p in sorted(PKG.rglob("*.py")) if "__pycache__" not in p.parts}


def layer(mod: str) -> str:
    if mod in PUBLIC:
        return "public"
    parts = mod.split(".")
    if len(parts) < 2 or parts[1] not in ORDER:
        raise AssertionError(f"{mod} ({modules()[mod].relative_to(ROOT)}) is in no layer: "
                             f"put it in a package of tests/test_layers.py's ORDER, or name "
                             f"it in PUBLIC")
    return parts[1]


def _base(mod: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (``from .x import y`` resolved)."""
    if not node.level:
        return node.module or ""
    is_pkg = modules()[mod].name == "__init__.py"
    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
    pkg = pkg[: len(pkg) - (node.level - 1)]
    return ".".join(pkg + ([node.module] if node.module else []))


@cache
def imports(mod: str) -> tuple[tuple[str, int], ...]:
    """(imported name, line) for every import of ``mod``, anywhere in it; ``from pkg import
    name`` gives ``pkg.name`` when that is a module, else ``pkg``."""
    tree = ast.parse(modules()[mod].read_text(), str(modules()[mod]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(mod, node)
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in modules() else base, node.lineno))
    return tuple(out)


@cache
def graph() -> dict[str, dict[str, int]]:
    """module -> {internal module it imports: the first line that does}."""
    g: dict[str, dict[str, int]] = {}
    for m in modules():
        deps: dict[str, int] = {}
        for name, line in imports(m):
            if name in modules() and name != m:
                deps.setdefault(name, line)
        g[m] = deps
    return g


def _where(mod: str, line: int) -> str:
    return f"{modules()[mod].relative_to(ROOT)}:{line}"


def test_every_module_is_in_a_layer():
    for m in modules():
        layer(m)


def test_no_module_imports_a_higher_layer():
    bad = []
    for m, deps in graph().items():
        lm = ORDER.index(layer(m))
        for d, line in sorted(deps.items()):
            ld = ORDER.index(layer(d))
            if d in PUBLIC and m not in PUBLIC:
                bad.append(f"{_where(m, line)}: {m} ({layer(m)}) imports the public thin "
                           f"module {d}: import what it re-exports from its own module")
            elif ld > lm:
                bad.append(f"{_where(m, line)}: {m} ({layer(m)}) imports {d} ({layer(d)}), "
                           f"a higher layer")
    assert not bad, ("imports against the layer order " + " < ".join(ORDER) + ":\n  "
                     + "\n  ".join(bad))


def _cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path m0 -> m1 -> ... -> m0) per strongly connected component of more
    than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    comps.append(sorted(comp))
    out = []
    for comp in comps:  # a shortest way back to the component's first module
        members, start = set(comp), comp[0]
        prev: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(g[v]):
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(prev[path[-1]])
        out.append(path[::-1])
    return out


def test_no_import_cycles():
    g = graph()
    cycles = _cycles(g)
    text = []
    for c in cycles:
        text.append(" -> ".join(c) + "   (" + ", ".join(
            _where(a, g[a][b]) for a, b in zip(c, c[1:], strict=False)) + ")")
    assert not cycles, "modules that import each other:\n  " + "\n  ".join(text)


def test_the_cycle_finder_finds_a_cycle():
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1, "d": 1}, "d": {}}
    assert _cycles(g) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_module_imports_another_modules_private_names():
    """``from x import _name`` reaches into another module's insides: give the name a
    public spelling (in ``x``'s ``__all__``) or move the code to where it is used."""
    bad = []
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = _base(m, node)
                bad += [f"{_where(m, node.lineno)}: {m} imports {a.name} from {base}"
                        for a in node.names
                        if a.name.startswith("_") and base.split(".")[0] == "exposure"
                        and f"{base}.{a.name}" not in modules()]
    assert not bad, "private names imported across modules:\n  " + "\n  ".join(bad)


def test_the_product_imports_no_perf_and_no_tests():
    bad = [f"{_where(m, line)}: {m} imports {name}"
           for m in modules() for name, line in imports(m)
           if name.split(".")[0] in FORBIDDEN_TOP]
    assert not bad, ("the product imports what it does not install (perf: the benchmark "
                     "scripts; tests):\n  " + "\n  ".join(bad))


# ------------------------------------------------------------------------- numba-free reads
_PROBE = """
import sys
sys.argv = ["exposure", *{argv!r}]
from exposure.ops.cli import main
try:
    main()
except SystemExit:
    pass
sys.stdout.flush()
print("NUMBA_LOADED", "numba" in sys.modules, sorted(m for m in sys.modules
      if m.startswith("numba"))[:3], file=sys.stderr)
"""


@pytest.fixture(scope="module")
def idle_config(tmp_path_factory):
    """A node config whose node never runs (a name of its own)."""
    path = tmp_path_factory.mktemp("layers") / "idle.toml"
    path.write_text(f'[node]\nname = "layers-idle-{__import__("os").getpid()}"\n')
    return path


@pytest.mark.process
@pytest.mark.parametrize("argv", [
    ["send", "--help"],
    ["status", "--config", "{cfg}"],
    ["status", "--config", "{cfg}", "--json"],
    ["dump", "--config", "{cfg}"],
    ["status", "--cluster", "{cluster}"],
    ["dump", "--cluster", "{cluster}"],
], ids=["send --help", "status", "status --json", "dump", "status --cluster",
        "dump --cluster"])
def test_operator_commands_load_no_numba(argv, idle_config):
    """With no node running (the commands answer that none is), and so also with one: the
    reads are the same modules."""
    cluster = ROOT / "examples" / "cluster" / "cluster.toml"
    argv = [a.format(cfg=idle_config, cluster=cluster) for a in argv]
    p = subprocess.run([sys.executable, "-c", _PROBE.format(argv=argv)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("NUMBA_LOADED")]
    assert line, f"exposure {' '.join(argv)} did not finish: {p.stderr[-2000:]}"
    assert line[-1].startswith("NUMBA_LOADED False"), (
        f"`exposure {' '.join(argv)}` imported numba ({line[-1]}): an operator's read "
        f"of a node must not load the compiler; find the import with `python -X "
        f"importtime -m exposure {' '.join(argv)}`")


@pytest.mark.process
def test_the_read_side_modules_load_no_numba():
    """What status, dump, top, metrics and a desk run once a node is there: importing
    them loads no numba (the jitted seqlock and ring code is for the node's processes)."""
    mods = ["exposure.ops.status", "exposure.ops.top", "exposure.ops.metrics",
            "exposure.engine.desk", "exposure.desk", "exposure.cluster.topology",
            "exposure.node.segments", "exposure.shm.tally_segment", "exposure.core.partition"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods)
            + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numba')[:3])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == "[]", (
        f"importing {', '.join(mods)} loads numba ({p.stdout.strip()}); find which with "
        f"`python -X importtime -c 'import ...'`")


def test_every_module_with_cached_kernels_imports_the_cache_directory_first():
    # numba picks a kernel's cache directory when its decorator runs: a module that
    # defines ``cache=True`` kernels before exposure.core.jit was ever imported caches them
    # under its own __pycache__, where a change to a constant elsewhere (core/types.py)
    # would not invalidate them. Each such module therefore imports exposure.core.jit.
    missing = []
    for mod, path in modules().items():
        src = path.read_text()
        if (mod == "exposure.core.jit"
                or not re.search(r"^@(numba\.)?n?jit\([^)]*cache=True", src, re.M)):
            continue
        if not re.search(r"^from exposure\.core import (.*\b)?jit\b|^from exposure\.core\.jit "
                         r"import|^import exposure\.core\.jit", src, re.M):
            missing.append(str(path.relative_to(ROOT)))
    assert missing == [], f"cache=True kernels without importing exposure.core.jit: {missing}"


def test_the_numba_cache_is_keyed_by_every_source_of_the_package(tmp_path):
    """A constant of one module is compiled into another module's cached kernels (the
    feed's VERSION into the fan-out's, a type code into the kernel's): numba invalidates a
    cache entry only when its own file changes, so exposure.core.jit keys the cache
    directory by every .py file of the package, not only of core/ (a feed version bumped
    in feed/wire.py once kept the fan-out sending the old one)."""
    from exposure.core import jit

    assert jit._PKG == Path(jit.__file__).resolve().parent.parent
    assert (jit._PKG / "feed" / "wire.py").exists() and (jit._PKG / "core" / "types.py").exists()
    (tmp_path / "core").mkdir()
    (tmp_path / "feed").mkdir()
    (tmp_path / "core" / "types.py").write_text("A = 1\n")
    (tmp_path / "feed" / "wire.py").write_text("VERSION = 4\n")
    before = jit._source_fingerprint(tmp_path)
    (tmp_path / "feed" / "wire.py").write_text("VERSION = 5\n")
    assert jit._source_fingerprint(tmp_path) != before
    assert jit.CACHE_DIR.endswith(jit._source_fingerprint())
