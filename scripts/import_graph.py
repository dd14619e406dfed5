"""The package's module import graph, and a check that it stays a tree without hidden imports.

Usage: ``python scripts/import_graph.py [PACKAGE_DIR]`` (default: ``src/finderpartner`` next to this script).

Every ``import`` / ``from ... import`` of the package's own modules is read from the source (AST, no module is
imported): top level and inside functions, relative and absolute. The graph is printed, one module per line
with what it imports (``*`` marks an import inside a function). The exit status is 1 when

- modules import each other in a cycle (counting imports inside functions: that is how a circle hides), or
- a function imports one of the package's modules, outside ``LAZY_ALLOWED``, or
- the layers are crossed: a module outside ``train/`` imports one of its modules instead of ``train`` itself (its
  ``__init__`` is the door: what the command line needs), or the library layer (the top-level modules and
  ``data/``) imports ``interop/`` (ONNX and open_clip conversion sit above the library, reached from ``cli/``).

Imports under ``if TYPE_CHECKING:`` never run; they are shown (``~``) but not checked.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

# Modules that may import the package lazily, and why. ``check-env`` must run (and say what to install) when
# torch, transformers or pydantic are missing: the command line and the environment report import the rest of
# the package only inside the commands that need it.
LAZY_ALLOWED = {
    "cli": "the command line (the cli package, all its modules) imports each command's modules when that command "
    "runs, so check-env needs no torch",
    "env": "the environment report reads the config only when pydantic and pyyaml are importable",
}


# Sub-packages whose modules only the sub-package itself imports; the rest of the package goes through __init__.
SEALED = ("train",)
# Sub-packages above the library layer: the top-level modules and data/ must not import them.
ABOVE_LIBRARY = ("interop",)
LIBRARY = ("", "data")  # the package's top level ('' : modules with no dot) and these sub-packages


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _lazy_allowed(module: str) -> bool:
    return any(_in(module, name) for name in LAZY_ALLOWED)


def _layer_problems(edges: list[Edge], package: str) -> list[str]:
    """Imports that cross the layers: a sealed sub-package's module from outside, interop/ from the library."""
    problems = []
    for e in edges:
        if e.type_only:
            continue
        for sealed in SEALED:
            if e.target.startswith(sealed + ".") and not _in(e.source, sealed):
                problems.append(
                    f"layer: {_label(package, e.source)} (line {e.line}) imports {_label(package, e.target)}; "
                    f"import it from {_label(package, sealed)} (its __init__ exports what others need)"
                )
        library = "." not in e.source or any(_in(e.source, p) for p in LIBRARY if p)
        for above in ABOVE_LIBRARY:
            if library and _in(e.target, above) and not _in(e.source, above):
                problems.append(
                    f"layer: the library module {_label(package, e.source)} (line {e.line}) imports "
                    f"{_label(package, e.target)}; only the command line may use {_label(package, above)}"
                )
    return problems


@dataclass(frozen=True)
class Edge:
    source: str  # module names relative to the package: 'index', 'data.files'; '' is the package itself
    target: str
    line: int
    in_function: bool
    type_only: bool


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package by its dotted name relative to the package ('' for ``__init__``)."""
    names = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve(base: list[str], name: str, modules: dict[str, Path]) -> str | None:
    """The package module that ``base`` + ``name`` denotes, or the nearest enclosing one that exists."""
    parts = base + ([p for p in name.split(".") if p] if name else [])
    while parts and ".".join(parts) not in modules:
        parts = parts[:-1]
    return ".".join(parts) if ".".join(parts) in modules else None


def _package_parts(module: str, path: Path) -> list[str]:
    """The package a module's relative imports start from (a package's ``__init__`` is its own package)."""
    parts = module.split(".") if module else []
    return parts if path.name == "__init__.py" else parts[:-1]


def _targets(node: ast.Import | ast.ImportFrom, module: str, path: Path, package: str, modules: dict[str, Path]):
    """The package modules one import statement names."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name == package or a.name.startswith(package + ".")]
        return [_resolve([], n.removeprefix(package).lstrip("."), modules) for n in names]
    if node.level:
        base = _package_parts(module, path)
        if node.level > 1:
            base = base[: len(base) - (node.level - 1)]
        prefix = node.module or ""
    elif node.module == package or (node.module or "").startswith(package + "."):
        base, prefix = [], (node.module or "").removeprefix(package).lstrip(".")
    else:
        return []
    found = []
    for alias in node.names:  # 'from . import x' may name a submodule, or a name defined in the package
        joined = f"{prefix}.{alias.name}" if prefix else alias.name
        target = joined if ".".join(base + [joined]).strip(".") in modules else prefix
        found.append(_resolve(base, target, modules))
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def edges_of(module: str, path: Path, package: str, modules: dict[str, Path]) -> list[Edge]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    edges: list[Edge] = []

    def visit(node: ast.AST, in_function: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(child, module, path, package, modules):
                    if target is not None and target != module:
                        edges.append(Edge(module, target, child.lineno, in_function, type_only))
            is_function = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            guarded = isinstance(child, ast.If) and _is_type_checking(child)
            visit(child, in_function or is_function, type_only or guarded)

    visit(tree, False, False)
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def check(package_dir: Path) -> tuple[list[Edge], list[str]]:
    """All edges of the package, and the problems (cycles, function-level imports outside ``LAZY_ALLOWED``)."""
    package = package_dir.name
    modules = module_names(package_dir)
    edges = [e for m, p in modules.items() for e in edges_of(m, p, package, modules)]
    problems = [
        f"cycle: {' <-> '.join(_label(package, m) for m in component)}"
        for component in cycles([e for e in edges if not e.type_only])
    ]
    problems += [
        f"function-level import: {_label(package, e.source)} (line {e.line}) imports {_label(package, e.target)}"
        for e in edges
        if e.in_function and not e.type_only and not _lazy_allowed(e.source)
    ]
    problems += _layer_problems(edges, package)
    return edges, problems


def _label(package: str, module: str) -> str:
    return f"{package}.{module}" if module else package


def format_graph(package: str, edges: list[Edge], modules: list[str]) -> str:
    lines = []
    for m in sorted(modules):
        out = sorted({(e.target, "~" if e.type_only else "*" if e.in_function else "") for e in edges if e.source == m})
        lines.append(f"{_label(package, m)} -> " + (", ".join(f"{t or package}{mark}" for t, mark in out) or "-"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "src" / "finderpartner"
    parser.add_argument("package_dir", nargs="?", type=Path, default=default)
    parser.add_argument("--quiet", action="store_true", help="only the problems")
    args = parser.parse_args(argv)
    edges, problems = check(args.package_dir)
    if not args.quiet:
        print(format_graph(args.package_dir.name, edges, list(module_names(args.package_dir))))
        print("(* inside a function, ~ only under TYPE_CHECKING)")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if not problems:
        print(
            f"import graph of {args.package_dir.name}: no cycles, no function-level imports of its own modules, "
            f"{', '.join(SEALED)} entered only through __init__, {', '.join(ABOVE_LIBRARY)} not imported by the library"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
