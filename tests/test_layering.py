"""lorafast's structure, read from its imports (module level and inside functions): no import circle, and the lower
packages (``kernels/``, ``bases/``) import nothing of lorafast outside themselves but modules that import nothing."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lorafast"
LOWER = ("lorafast.kernels", "lorafast.bases")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """``{module: the lorafast modules it imports}`` for every module of ``package``."""
    paths = {_module_name(p): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = here.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                imported |= {f"{target}.{a.name}" if f"{target}.{a.name}" in paths else target for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorafast"):
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names if a.name.startswith("lorafast")}
        graph[name] = {m for m in imported if m in paths and m != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]`` of ``graph``, None when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (circle := visit(nxt)):
                return circle
        state[node] = 2
        path.pop()
        return None

    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def test_lorafast_has_no_import_circle():
    assert find_circle(import_graph()) is None, find_circle(import_graph())


def test_the_checker_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_lower_packages_import_no_upper_module():
    graph = import_graph()
    leaves = {m for m, deps in graph.items() if not deps}
    for package in LOWER:
        for module in (m for m in graph if m == package or m.startswith(package + ".")):
            upward = {m for m in graph[module] if not m.startswith(package) and m not in leaves}
            assert not upward, f"{module} imports {sorted(upward)}, above {package}"
