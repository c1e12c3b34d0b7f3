"""docs/design.md lists every module of the package: its "Modules" section, parsed here, names
each ``exposure/**.py`` once, under the heading of its package, and the packages' headings
follow the layer order the section states. A module added without a line, or a line left
behind by a module that moved, fails here by name."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "design.md"
PKG = ROOT / "exposure"
PUBLIC = "public"  # the heading of the top-level modules (exposure/*.py)


def _section() -> list[str]:
    """The lines of the ``## Modules`` section, up to the next ``## `` heading."""
    lines = DOC.read_text().splitlines()
    start = lines.index("## Modules")
    out = []
    for ln in lines[start + 1:]:
        if ln.startswith("## "):
            break
        out.append(ln)
    return out


def _layers(section: list[str]) -> list[str]:
    """The layer order the section states, lowest first: the line ``core < shm < ...``."""
    for ln in section:
        parts = [p.strip(" `") for p in ln.split("<")]
        if len(parts) > 3 and all(re.fullmatch(r"[a-z_]+", p) for p in parts):
            return parts
    raise AssertionError("docs/design.md's Modules section states no layer order "
                         "(a line `core < shm < ...`)")


def listed() -> dict[str, str]:
    """Every module the section lists (path relative to exposure/) -> the package heading
    it is listed under. A row is ``| `path.py` | what it does |`` under ``### package``."""
    out: dict[str, str] = {}
    heading = None
    for ln in _section():
        if ln.startswith("### "):
            heading = ln[4:].split()[0].strip("`:")
            continue
        m = re.match(r"\|\s*`([^`]+\.py)`\s*\|(.*)\|\s*$", ln)
        if m is None:
            continue
        path, what = m.group(1), m.group(2).strip()
        assert heading is not None, f"{path} is listed before any ### package heading"
        assert path not in out, f"{path} is listed twice"
        assert what, f"{path} is listed without saying what it does"
        out[path] = heading
    return out


def on_disk() -> set[str]:
    return {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")
            if "__pycache__" not in p.parts}


def _package(path: str) -> str:
    return path.split("/")[0] if "/" in path else PUBLIC


def test_every_module_is_listed_and_every_listed_module_exists():
    doc, tree = set(listed()), on_disk()
    missing, extra = sorted(tree - doc), sorted(doc - tree)
    assert not missing and not extra, (
        "docs/design.md's Modules section and exposure/ differ:\n"
        + (f"  not listed (add a line under its package): {', '.join(missing)}\n"
           if missing else "")
        + (f"  listed but not in the tree (remove or rename): {', '.join(extra)}\n"
           if extra else ""))


def test_each_module_is_under_its_package_and_packages_follow_the_layers():
    section = _section()
    layers = _layers(section)
    where = listed()
    wrong = sorted(f"{p} (under {h}, belongs to {_package(p)})"
                   for p, h in where.items() if h != _package(p))
    assert not wrong, "modules listed under another package's heading: " + ", ".join(wrong)
    packages = sorted({p.parent.relative_to(PKG).parts[0] for p in PKG.glob("*/__init__.py")})
    unplaced = sorted(set(packages) - set(layers))
    assert not unplaced, f"packages with no place in the layer order: {', '.join(unplaced)}"
    headings = [ln[4:].split()[0].strip("`:") for ln in section if ln.startswith("### ")]
    assert headings == [h for h in layers if h in headings], (
        f"the package headings {headings} do not follow the layer order {layers}")
    assert layers[-1] == PUBLIC, f"the layer order should end with {PUBLIC!r}: {layers}"


def test_the_stated_layer_order_is_the_one_the_layering_test_enforces():
    """The order is written in two places, the layering test and this page: they agree."""
    from test_layers import ORDER

    assert tuple(_layers(_section())) == ORDER, (
        f"docs/design.md states the layers {_layers(_section())}, tests/test_layers.py "
        f"enforces {list(ORDER)}: make them one order")
