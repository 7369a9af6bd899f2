"""The layer order of docs/layout.md, enforced on merv's import graph (imports at the top of a file and inside
functions alike): no cycle, no import against the order, no private name imported from another module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.helpers import REPO

# Private names still imported across modules, each with the change that removes it. An entry that no longer occurs
# fails the test, so the list only shrinks.
PENDING_PRIVATE: set[tuple[str, str, str]] = set()  # (importer, module, name) exemptions: none left


def read_layers(doc: Path) -> list[list[str]]:
    """The ```layers block of ``doc``: one list of sibling entries (packages or modules) per line, lowest first."""
    match = re.search(r"```layers\n(.*?)```", doc.read_text(), re.S)
    assert match, f"{doc}: no ```layers block"
    return [[e.strip() for e in line.split("|")] for line in match.group(1).splitlines() if line.strip()]


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module that defines ``name`` (a module, or a name inside one)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> tuple[dict[str, dict[str, int]], list[tuple[str, str, str, int]]]:
    """``importer -> {imported module: line}`` over every import statement of the package ``root`` (top-level and
    inside functions), and ``(importer, module, private name, line)`` for each ``from m import _name`` of another
    module."""
    mods = modules(root)
    package = root.name
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    private = []
    for mod, path in mods.items():
        here = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[tuple[str, str | None]] = []  # (dotted name, imported name)
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [(f"{base}.{a.name}", a.name) for a in node.names]
            for dotted, name in targets:
                if dotted.split(".")[0] != package:
                    continue
                target = _owner(dotted, mods)
                if target is None or target == mod:
                    continue
                edges[mod].setdefault(target, node.lineno)
                if name and name.startswith("_") and not name.startswith("__") and target != dotted:
                    private.append((mod, target, name, node.lineno))
    return edges, private


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """The modules of each import cycle (strongly connected component of more than one module), sorted."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for t in edges.get(todo.pop(), {}):
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    reachable = {m: reach(m) for m in edges}
    groups = {tuple(sorted(n for n in edges if m in reachable[n] and n in reachable[m])) for m in edges}
    return sorted(list(g) for g in groups if len(g) > 1)


def layering_problems(root: Path, layers: list[list[str]], pending: set = frozenset()) -> list[str]:
    """Every breach of ``layers`` in the package ``root``, one line each (empty when it is layered)."""
    edges, private = import_graph(root)
    entry_layer = {entry: i for i, line in enumerate(layers) for entry in line}

    def entry_of(mod: str) -> str | None:
        # the longest entry that is the module or a package above it; the root package's entry is its __init__ only,
        # so a new module must be placed in the order
        hits = [e for e in entry_layer if mod == e or (e != root.name and mod.startswith(e + "."))]
        return max(hits, key=len) if hits else None

    problems = [f"{m}: in no layer of docs/layout.md" for m in edges if entry_of(m) is None]
    problems += ["import cycle among " + ", ".join(group) for group in cycles(edges)]
    for mod, targets in sorted(edges.items()):
        src = entry_of(mod)
        for target, line in sorted(targets.items()):
            dst = entry_of(target)
            if src is None or dst is None or src == dst:
                continue
            if entry_layer[dst] > entry_layer[src]:
                problems.append(f"{mod} (line {line}) imports {target}: upward ({dst} is above {src})")
            elif entry_layer[dst] == entry_layer[src]:
                problems.append(f"{mod} (line {line}) imports {target}: siblings {src} and {dst} are independent")
    found = {(m, t, n) for m, t, n, _ in private}
    problems += [
        f"{m} (line {line}) imports the private {t}.{n}" for m, t, n, line in private if (m, t, n) not in pending
    ]
    problems += [f"pending exemption {p} no longer occurs: remove it from PENDING_PRIVATE" for p in pending - found]
    return problems


def test_merv_follows_the_layer_order():
    layers = read_layers(REPO / "docs" / "layout.md")
    problems = layering_problems(REPO / "merv", layers, PENDING_PRIVATE)
    assert not problems, "merv's imports break docs/layout.md:\n" + "\n".join(problems)


def test_the_check_finds_each_kind_of_breach(tmp_path):
    """A package with one breach of each kind, most of them inside functions: the check names every one."""
    pkg = tmp_path / "merv"
    for name, text in {
        "__init__.py": "",
        "low.py": "def f():\n    from merv.high import g\n",  # upward, and a cycle with high
        "high.py": "from merv.low import f\nfrom merv.low import _hidden\n",  # private
        "side.py": "def f():\n    import merv.high.sub\n",  # sibling of high (a missing submodule: its owner)
        "loose.py": "",  # in no layer
        "deep/__init__.py": "from . import inner\n",
        "deep/inner.py": "from ..low import f\n",  # relative, downward: allowed
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    layers = [["merv.low"], ["merv.deep"], ["merv.high", "merv.side"], ["merv"]]
    problems = layering_problems(pkg, layers, {("merv.x", "merv.y", "_z")})
    assert problems == [
        "merv.loose: in no layer of docs/layout.md",
        "import cycle among merv.high, merv.low",
        "merv.low (line 2) imports merv.high: upward (merv.high is above merv.low)",
        "merv.side (line 2) imports merv.high: siblings merv.side and merv.high are independent",
        "merv.high (line 2) imports the private merv.low._hidden",
        "pending exemption ('merv.x', 'merv.y', '_z') no longer occurs: remove it from PENDING_PRIVATE",
    ]
