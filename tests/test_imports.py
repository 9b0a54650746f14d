"""Imports run one way: no import circle among hakd's modules, and no layer imports a layer above it.

The graph is read from the source with `ast` (module-level and function-level imports alike; imports
under `if TYPE_CHECKING:` are for annotations only and do not count), so a deferred import inside a
function cannot hide a circle. The layers, lowest first:

  base           infra/*, except the top: config, errors, storage, provenance, ... (imports no stage)
  teacher_cache  imports base
  student_train  imports base and teacher_cache
  analysis       imports base, teacher_cache and student_train
  top            infra/cli.py, infra/pipeline.py, infra/bench/ (may import anything)
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("infra", "teacher_cache", "student_train", "analysis")
TOP = ("infra.cli", "infra.pipeline", "infra.bench")
LAYERS = ("base", "teacher_cache", "student_train", "analysis", "top")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (package __init__s by their package name)."""
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every dotted name `tree` imports (for `from a import b`: both a and a.b), TYPE_CHECKING blocks left out."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return names


@functools.cache
def import_graph() -> dict[str, frozenset[str]]:
    """Module -> the project modules it imports (read once per session)."""
    mods = project_modules()
    graph = {}
    for name, path in mods.items():
        imported = imported_names(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
        graph[name] = frozenset(m for m in imported if m in mods and m != name and mods[m].name != "__init__.py")
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def layer(module: str) -> str:
    if any(module == t or module.startswith(t + ".") for t in TOP):
        return "top"
    top_package = module.split(".")[0]
    return "base" if top_package == "infra" else top_package


def test_cycle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_seen_in_functions_but_not_under_type_checking():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import infra.cli\n"
              "def f():\n    from teacher_cache.job import plan\n")
    names = imported_names(ast.parse(source), "infra.x", False)
    assert "teacher_cache.job" in names and "infra.cli" not in names


def test_no_import_circles():
    found = cycles(import_graph())
    assert not found, "import circles (each line: modules that import one another, directly or not):\n" + \
        "\n".join(", ".join(c) for c in found)


def test_layers_import_downwards():
    wrong = []
    for module, imported in sorted(import_graph().items()):
        rank = LAYERS.index(layer(module))
        wrong += [f"{module} ({layer(module)}) imports {m} ({layer(m)})"
                  for m in sorted(imported) if LAYERS.index(layer(m)) > rank]
    assert not wrong, "imports against the layering base < teacher_cache < student_train < analysis < top:\n" + \
        "\n".join(wrong)
