"""The package layout holds: no import cycles, no package importing one above it, and each heavy
library imported by its one boundary module only (checked on the source, with ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cmkd_scale"

# Which parts of cmkd_scale each part may import (itself always). A part is a subpackage or a
# top-level module; an entry may also name one module of a part ("demo.synth"). Lower parts
# know nothing of higher ones: config/logs/dist at the bottom, then prep, data, models,
# distill, evaluate, tracking, then train, serve, study and demo.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "logs": set(),
    "diskspace": set(),
    "dist": {"config"},
    "prep": {"config", "diskspace", "logs"},
    "data": {"config", "logs"},
    "models": {"config"},
    "distill": {"config", "models"},
    "evaluate": {"config", "dist", "logs", "data", "models"},
    "tracking": {"config", "diskspace", "logs"},
    "train": {
        "config",
        "diskspace",
        "dist",
        "logs",
        "data",
        "models",
        "distill",
        "evaluate",
        "tracking",
    },
    "serve": {"config", "logs", "prep", "data", "models"},
    # python -m cmkd_scale.teacher_cache: the teacher over every (sample, view), once
    "teacher_cache": {"config", "dist", "logs", "data", "models", "distill"},
    "study": {
        "config",
        "dist",
        "logs",
        "data",
        "models",
        "distill",
        "evaluate",
        "tracking",
        "demo.synth",
    },
    "demo": {"config", "logs", "prep", "study"},
    # thin entry points: python -m cmkd_scale.infer | export | features
    "infer": {"serve"},
    "export": {"serve"},
    "features": {"data"},
    # python -m cmkd_scale.weights fetch: what a recipe's models need, into the local caches
    "weights": {"config", "logs", "models"},
}

# library -> the one module allowed to import it
BOUNDARIES = {
    "nvidia.dali": "cmkd_scale/data/pipeline.py",
    "deepspeed": "cmkd_scale/train/engine.py",
    "mlflow": "cmkd_scale/tracking/remote.py",
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (never executed)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path, name: str) -> list[str]:
    """Every module ``path`` imports at run time, at any depth (lazy imports inside functions
    too), plus the string arguments of ``import_module`` / ``__import__`` calls."""
    found = []
    is_package = path.name == "__init__.py"
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".")[: len(name.split(".")) - node.level + is_package]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{module}.{alias.name}"
                found.append(sub if sub in MODULES else module)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", ""))
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(node.args[0].value)
    return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_part_has_a_rule() -> None:
    parts = {_part(m) for m in MODULES} - {""}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED"


def _allowed(part: str, target: str) -> bool:
    """May a module of ``part`` import module ``target``?"""
    other = _part(target)
    if not other or other == part:
        return True
    return any(
        target == f"cmkd_scale.{entry}" or target.startswith(f"cmkd_scale.{entry}.")
        for entry in ALLOWED.get(part, set())
    )


def test_no_part_imports_one_it_may_not() -> None:
    wrong = [
        f"{module} imports {target}"
        for module, imported in GRAPH.items()
        for target in imported
        if target in MODULES and not _allowed(_part(module), target)
    ]
    assert not wrong, "imports against the layering (see ALLOWED):\n" + "\n".join(wrong)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (each is a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def users_of(graph: dict[str, list[str]], library: str) -> list[str]:
    """The modules that import ``library`` or one of its submodules."""
    return sorted(
        m
        for m, imported in graph.items()
        if any(t.split(".")[: len(library.split("."))] == library.split(".") for t in imported)
    )


def test_no_import_cycles() -> None:
    edges = {m: {t for t in ts if t in MODULES and t != m} for m, ts in GRAPH.items()}
    assert not find_cycles(edges), f"import cycles: {find_cycles(edges)}"


def test_the_checks_fail_on_a_cycle_and_on_a_stray_library_import() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c"]]
    graph = {"x.pipeline": ["nvidia.dali.fn"], "x.kaldi": ["numba", "nvidia.dali.plugin.numba"]}
    assert users_of(graph, "nvidia.dali") == ["x.kaldi", "x.pipeline"]
    assert users_of({"y": ["mlflow_helpers"]}, "mlflow") == []


@pytest.mark.parametrize("library", sorted(BOUNDARIES))
def test_library_imported_by_its_boundary_module_only(library: str) -> None:
    users = [str(MODULES[m].relative_to(ROOT)) for m in users_of(GRAPH, library)]
    assert users == [BOUNDARIES[library]], f"{library} imported by {users}"


def test_the_checks_see_lazy_and_dynamic_imports(tmp_path: Path) -> None:
    """The parser finds imports inside functions and import_module("...") calls."""
    path = tmp_path / "probe.py"
    path.write_text(
        "import importlib\n"
        "def f():\n"
        "    from nvidia.dali.plugin.numba import NumbaFunction\n"
        "    importlib.import_module('deepspeed.comm')\n"
    )
    found = _imports(path, "cmkd_scale.probe")
    assert "nvidia.dali.plugin.numba" in found and "deepspeed.comm" in found
