"""Print which module of a package imports which, and fail if any imports point in a circle.

    python experiments/import_graph.py [PACKAGE_DIR]   # default: mnist_search/

Every import counts, at the top of a file or inside a function: a circle held up by imports
inside functions is still a circle. Exit code 1 and the circle when there is one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def imports_of(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from the source, without importing it."""
    name = package.name
    modules = {p.stem for p in package.glob("*.py")}
    graph = {}
    for path in sorted(package.glob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(name + ".")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == name:  # from mnist_search import data, train
                    found |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith(name + "."):
                    found.add(node.module.split(".")[1])
        graph[path.stem] = found - {path.stem, "__init__"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as [a, b, ..., a], or None."""
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                return [*path[path.index(other) :], module, other] if other in path else [other]
            if other not in state and (cycle := visit(other, [*path, module])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [])):
            return cycle
    return None


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    package = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "mnist_search"
    graph = imports_of(package)
    for module, imported in sorted(graph.items()):
        print(f"{module:12} -> {', '.join(sorted(imported)) or '-'}")
    if cycle := find_cycle(graph):
        print(f"import cycle: {' -> '.join(cycle)}", file=sys.stderr)
        return 1
    print("no import cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
