"""No import cycles between esa's modules, function-local imports included.

Every module of ``esa/``, ``cli/`` (installed as ``esa.cli``) and ``kernels/`` (``esa.kernels``) is parsed with
:mod:`ast`; each ``import`` / ``from ... import`` anywhere in it (module level, inside functions, under ``if``)
becomes an edge to the esa module it names. ``from esa.x import y`` counts as an edge to ``esa.x.y`` when that is a
module, else to ``esa.x``. A package's ``__init__`` is a module like any other, but the implicit import of a parent
package (``esa.kernels.topk`` runs ``esa/kernels/__init__.py``) is not an edge: a cycle through ``__init__``
re-exports is harmless, one between two modules that call each other is not.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

ROOTS = {"esa": REPO / "esa", "esa.cli": REPO / "cli", "esa.kernels": REPO / "kernels"}


def module_files() -> dict[str, Path]:
    """Dotted module name → source file, for every .py under the three roots."""
    out = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """The esa modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest prefix of ``name`` that is a module of ours
        parts = name.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in modules:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                add(target if target in modules else base)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    names = set(files)
    return {m: imports_of(m, p, names) for m, p in files.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_the_parser_sees_local_relative_and_aliased_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import esa.a as x\nfrom . import b\ndef f():\n    from .c import thing\n    from esa import d\n"
                   "if True:\n    from esa.e import g\n")
    modules = {"esa", "esa.a", "esa.b", "esa.c", "esa.d", "esa.e", "esa.m"}
    assert imports_of("esa.m", src, modules) == {"esa.a", "esa.b", "esa.c", "esa.d", "esa.e"}


def test_cycle_finder_reports_a_closed_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_every_module_is_parsed():
    graph = import_graph()
    assert {"esa.commands.profile", "esa.cli.main", "esa.kernels.dispatch", "esa.reporting.build"} <= set(graph)
    assert "esa.runio" in graph["esa.commands.baseline"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def commands_importers(graph: dict[str, set[str]]) -> list[str]:
    """Modules that import the command modules (esa.commands.*) but are neither esa.api, a command, nor the CLI:
    the library must not depend on its commands (library → commands → api → cli)."""
    allowed = ("esa.api", "esa.commands", "esa.cli")
    return sorted(m for m, deps in graph.items()
                  if not any(m == a or m.startswith(a + ".") for a in allowed)
                  and any(d == "esa.commands" or d.startswith("esa.commands.") for d in deps))


def test_the_finder_of_command_importers_finds_them():
    graph = {"esa.trials": {"esa.commands.perturb"}, "esa.api": {"esa.commands.profile"},
             "esa.commands.run": {"esa.commands.profile"}, "esa.cli.main": {"esa.commands"}, "esa.scoring": set()}
    assert commands_importers(graph) == ["esa.trials"]


def test_only_the_api_and_the_cli_import_the_commands():
    graph = import_graph()
    assert {"esa.commands.perturb", "esa.commands.run"} <= set(graph)
    offenders = commands_importers(graph)
    assert not offenders, f"library modules importing esa.commands: {offenders}"
