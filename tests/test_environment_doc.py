"""docs/environment.md lists every environment variable merv reads or sets: the package's source is parsed for
``os.environ`` / ``os.getenv`` uses (names resolved through the module constants that hold them), and each must be a
row of the table; no row names a variable merv no longer touches."""

import ast
import re

from tests.helpers import REPO

PACKAGE = REPO / "merv"
DOC = REPO / "docs" / "environment.md"
# uses whose variable name is data, not a constant: what they read by default (the doc says how to rename it)
INDIRECT = {"self.api_key_env": {"MERV_JUDGE_API_KEY"}}


def constants() -> dict[str, dict[str, set[str]]]:
    """``{module: {NAME: {strings}}}`` of module-level constants: a string, or the strings of a dict/tuple/list."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        found = {}
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                values = {n.value for n in ast.walk(node.value) if isinstance(n, ast.Constant)}
                strings = {v for v in values if isinstance(v, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", v)}
                if strings:
                    found[node.targets[0].id] = strings
        out[str(path)] = found
    return out


def is_environ(node: ast.AST) -> bool:
    """``os.environ``, ``environ``, or a local ``env`` that stands for it (judge's resolution takes one)."""
    if isinstance(node, ast.Attribute):
        return node.attr == "environ"
    return isinstance(node, ast.Name) and node.id in ("environ", "env")


def environment_uses():
    """``(file:line, names)`` of every use of the environment in merv."""
    consts = constants()
    everywhere = {}
    for found in consts.values():
        for name, strings in found.items():
            everywhere.setdefault(name, set()).update(strings)
    for path in sorted(PACKAGE.rglob("*.py")):
        local = dict(consts[str(path)])
        tree = ast.parse(path.read_text())
        for loop in ast.walk(tree):  # `for k in TORCH_VARIABLES`: k stands for the constant's names
            if (
                isinstance(loop, ast.comprehension | ast.For)
                and isinstance(loop.target, ast.Name)
                and isinstance(loop.iter, ast.Name)
                and loop.iter.id in local
            ):
                local.setdefault(loop.target.id, set()).update(local[loop.iter.id])
        # `os.environ.update(env)`: every variable-like key of the module's dict literals may be set
        dict_keys = {
            k.value
            for d in ast.walk(tree)
            if isinstance(d, ast.Dict)
            for k in d.keys
            if isinstance(k, ast.Constant) and isinstance(k.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", k.value)
        }
        for node in ast.walk(tree):
            key = None
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and is_environ(node.func.value)
            ):
                yield f"{path.relative_to(REPO)}:{node.lineno}", dict_keys or {"<unresolved update>"}
                continue
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                reads = node.func.attr in ("get", "setdefault", "pop") and is_environ(node.func.value)
                if (reads or node.func.attr == "getenv") and node.args:
                    key = node.args[0]
            elif isinstance(node, ast.Subscript) and is_environ(node.value):
                key = node.slice
            if key is None:
                continue
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if isinstance(key, ast.Constant):
                yield where, {key.value}
            elif isinstance(key, ast.Name):
                yield where, local.get(key.id) or everywhere.get(key.id) or {f"<unresolved {key.id}>"}
            elif isinstance(key, ast.Subscript) and isinstance(key.value, ast.Name):  # ENV_KEYS[name]
                yield where, local.get(key.value.id) or everywhere.get(key.value.id) or {"<unresolved>"}
            else:
                yield where, INDIRECT.get(ast.unparse(key), {f"<unresolved {ast.unparse(key)}>"})


def documented() -> set[str]:
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", DOC.read_text(), flags=re.M))


def test_every_environment_variable_merv_uses_is_in_the_table():
    table = documented()
    uses = list(environment_uses())
    assert len(uses) > 10
    missing = [f"{where}: {name}" for where, names in uses for name in sorted(names) if name not in table]
    assert not missing, "not in docs/environment.md:\n" + "\n".join(missing)


def test_the_table_names_only_variables_merv_uses():
    used = {name for _, names in environment_uses() for name in names}
    assert not documented() - used, f"docs/environment.md lists what merv never touches: {documented() - used}"


def test_the_readme_links_the_table():
    assert "(docs/environment.md)" in (REPO / "README.md").read_text()
