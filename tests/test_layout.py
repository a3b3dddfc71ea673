"""The package's layout rules, checked on the source (no import of the package needed):

- the import graph of ``hf_batchsched`` has no cycle, counting imports inside functions (they hide cycles) and
  leaving out ``if TYPE_CHECKING:`` blocks;
- no product module imports the tests or a testing module;
- private attributes of other objects (``trainer._x``, ``scheduler._last_lr``, ``torch._foreach_norm``,
  ``config._attn_implementation``) are read or written only in the ``hf_batchsched/trainer/`` package;
- the offline assets (``hf_batchsched.assets``) are a leaf: they import nothing of the package but ``errors``;
- only ``hf_batchsched/bench/plots.py`` imports matplotlib;
- every module stays under about 400 lines, formula tables aside.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_batchsched"
PRODUCT_DIRS = (PACKAGE, ROOT / "recipes", ROOT / "benchmarks")

#: The one place allowed to touch Trainer/torch internals: the trainer package (the Trainer subclass, its step, and
#: the helpers the callbacks and the bench use instead of reading private state themselves).
INTERNALS = PACKAGE / "trainer"

#: "About 400 lines": a module may run a little over (here up to 15%) while it holds one concept.
MAX_LINES = 460
#: Modules allowed past MAX_LINES, with the reason.
LONG_MODULES = {
    "schedules/lrbench.py": "the LRBench formula table: one formula per policy, each a few lines",
}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def product_files() -> list[pathlib.Path]:
    return [path for folder in PRODUCT_DIRS for path in sorted(folder.rglob("*.py"))]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of ``tree`` except those inside ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imported_modules(path: pathlib.Path, modules: dict[str, pathlib.Path], root: pathlib.Path = ROOT) -> set[str]:
    """The package modules that ``path`` imports at run time (at any depth of the file)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg
            targets = [
                f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        # a package's __init__ importing its own submodules is how a package re-exports; a submodule importing a
        # sibling goes to the sibling, not through the __init__, so the edges below are module to module
        graph[name] = imported_modules(path, modules)
    return graph


def module_names(path: pathlib.Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports), plus the lazy exports of a
    package root (``_EXPORTS``)."""
    names = set()
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and isinstance(
                node.value, ast.Dict
            ):
                names.update(key.value for key in node.value.keys if isinstance(key, ast.Constant))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def test_every_import_of_a_package_name_resolves():
    """``from hf_batchsched.x import name`` anywhere in a product file or test, inside functions too (an import
    there only fails when the function runs), names something that ``hf_batchsched.x`` defines or imports."""
    modules = package_modules()
    bound = {name: module_names(path) for name, path in modules.items()}
    missing = []
    for path in product_files() + sorted((ROOT / "tests").glob("*.py")):
        name = module_name(path) if PACKAGE in path.parents else ""
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            for alias in node.names:
                if alias.name != "*" and alias.name not in bound[target] and f"{target}.{alias.name}" not in modules:
                    missing.append(f"{path.relative_to(ROOT)}:{node.lineno} {target}.{alias.name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)


def test_find_cycle_reports_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imported_modules_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    package = tmp_path / "hf_batchsched"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n"
        "def f():\n    from .b import g\n    from hf_batchsched import c as d\n    return g, d\n"
    )
    (package / "b.py").write_text("def g():\n    return 1\n")
    (package / "c.py").write_text("")
    modules = {module_name(p, tmp_path): p for p in package.rglob("*.py")}
    assert imported_modules(package / "a.py", modules, tmp_path) == {"hf_batchsched.b", "hf_batchsched.c"}
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import c\n")
    assert imported_modules(package / "a.py", modules, tmp_path) == set()


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_product_module_imports_tests_or_a_testing_module():
    offenders = []
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if {"tests", "testing", "helpers", "conftest"} & set(parts):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_the_offline_assets_are_a_leaf():
    graph = import_graph()
    assets = {name: targets for name, targets in graph.items() if name.split(".")[:2] == ["hf_batchsched", "assets"]}
    assert assets, "hf_batchsched.assets not found"
    above = {
        f"{name} -> {target}"
        for name, targets in assets.items()
        for target in targets
        if target.split(".")[:2] != ["hf_batchsched", "assets"] and target != "hf_batchsched.errors"
    }
    assert not above, "the assets import the package above them: " + ", ".join(sorted(above))


def test_only_the_plotting_helper_imports_matplotlib():
    plots = PACKAGE / "bench" / "plots.py"
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == plots:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(name.split(".")[0] == "matplotlib" for name in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, "matplotlib imported outside hf_batchsched/bench/plots.py: " + ", ".join(offenders)


def private_accesses(source: str, filename: str = "<source>") -> list[str]:
    """``obj._name`` reads and writes of another object's private attribute (not ``self``/``cls``)."""
    hits = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        hits.append(f"{filename}:{node.lineno} .{attr}")
    return hits


def test_private_accesses_are_found():
    source = "x = torch._foreach_norm\ny = self._mine\nz = obj.__class__\ntrainer._tr_loss = 1\n"
    assert private_accesses(source) == ["<source>:1 ._foreach_norm", "<source>:4 ._tr_loss"]


def test_only_the_trainer_package_touches_private_attributes_of_other_objects():
    offenders = [
        hit
        for path in product_files()
        if INTERNALS not in path.parents
        for hit in private_accesses(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert not offenders, "private attributes outside hf_batchsched/trainer/:\n" + "\n".join(offenders)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_under_about_400_lines(path):
    relative = str(path.relative_to(PACKAGE))
    lines = len(path.read_text().splitlines())
    if relative in LONG_MODULES:
        return
    assert lines <= MAX_LINES, f"{relative} has {lines} lines; split it by concept (limit {MAX_LINES})"
