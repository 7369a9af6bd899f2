"""The dependencies in pyproject.toml are what merv imports: every third-party module merv imports (parsed from the
source, not run) is declared in the core dependencies or in the extra its importing module belongs to, every core
dependency is imported somewhere, and each "pip install '...[extra]'" hint names an extra that has the package."""

import ast
import re
import sys

from packaging.requirements import Requirement

from tests.helpers import REPO

PACKAGE = REPO / "merv"
# import name -> distribution, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "decord": "decord2", "liger_kernel": "liger-kernel",
                "hiera": "hiera-transformer", "lmms_eval": "lmms-eval"}  # fmt: skip
# modules that exist only for an extra (the rest of merv is core, or guards its optional imports, see below)
FILE_EXTRA = {"merv/serve/": "serve", "merv/integrations/lmms_eval.py": "lmms-eval",
              "merv/integrations/__init__.py": "lmms-eval"}  # fmt: skip
HINT = re.compile(r"pip install '(?:merv|\.)\[([\w-]+)\]'")


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """Core distributions and each extra's (``merv[x]`` inside an extra expanded)."""
    from setuptools.config.pyprojecttoml import read_configuration  # its own TOML reader: Python 3.10 has none

    project = read_configuration(REPO / "pyproject.toml", expand=False)["project"]
    core = {normal(Requirement(r).name) for r in project["dependencies"]}
    raw = {extra: [Requirement(r) for r in reqs] for extra, reqs in project["optional-dependencies"].items()}

    def expand(extra: str) -> set[str]:
        out = set()
        for req in raw[extra]:
            out |= set().union(*(expand(e) for e in req.extras)) if normal(req.name) == "merv" else {normal(req.name)}
        return out

    return core, {extra: expand(extra) for extra in raw}


def third_party_imports():
    """``(file, line, top-level module, extra named by the except clause guarding it or None)`` of every import."""
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        guards = {}  # import node id -> extra its try's handler names
        for node in ast.walk(tree):
            if isinstance(node, ast.Try):
                hints = {m for h in node.handlers for n in ast.walk(h) if isinstance(n, ast.Constant)
                         and isinstance(n.value, str) for m in HINT.findall(n.value)}  # fmt: skip
                assert len(hints) <= 1, f"{path}:{node.lineno}: one try names several extras {sorted(hints)}"
                for inner in (n for stmt in node.body for n in ast.walk(stmt)):
                    if hints:
                        guards[id(inner)] = next(iter(hints))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("merv", "__future__"):
                    yield path.relative_to(REPO).as_posix(), node.lineno, top, guards.get(id(node))


IMPORTS = list(third_party_imports())


def test_every_import_is_declared_in_core_or_its_extra():
    core, extras = declared()
    guarded = {top: extra for _, _, top, extra in IMPORTS if extra}  # merv.train.strategy guards liger_kernel ...
    problems = []
    for file, line, top, _ in IMPORTS:
        dist = DISTRIBUTION.get(top, normal(top))
        allowed = set(core)
        for prefix, extra in FILE_EXTRA.items():
            if file.startswith(prefix):
                allowed |= extras[extra]
        if top in guarded:  # an optional feature: reached only past the guard (models.merv's liger loss, say)
            allowed |= extras[guarded[top]]
        if dist not in allowed:
            problems.append(f"{file}:{line} imports {top} ({dist}), declared in neither core nor its extra")
    assert not problems, "\n".join(problems)


def test_every_core_dependency_is_imported_by_core_merv():
    """Not only by an extra's modules (accelerate: the lmms-eval plugin's) or past a guard."""
    core, _ = declared()
    imported = {DISTRIBUTION.get(top, normal(top)) for file, _, top, extra in IMPORTS
                if not extra and not any(file.startswith(prefix) for prefix in FILE_EXTRA)}  # fmt: skip
    assert not core - imported, f"core dependencies that no core module imports: {sorted(core - imported)}"


def test_install_hints_name_the_extra_that_has_the_package():
    _, extras = declared()
    guarded = [(file, line, top, extra) for file, line, top, extra in IMPORTS if extra]
    assert {"liger_kernel", "openai", "hiera"} <= {top for _, _, top, _ in guarded}
    for file, line, top, extra in guarded:
        assert DISTRIBUTION.get(top, normal(top)) in extras[extra], f"{file}:{line}: pip install '.[{extra}]' for {top}"
    for path in PACKAGE.rglob("*.py"):
        for extra in HINT.findall(path.read_text()):
            assert extra in extras, f"{path.relative_to(REPO)} names an extra {extra!r} that pyproject.toml lacks"
