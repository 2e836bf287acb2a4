"""The package's layout rules (issue 21): no import cycles between openzaya's modules, no module over 700 lines, no
function over 80 lines, each outside its named exceptions.

Run: .venv/bin/python -m pytest tests/test_layout.py -q

Imports are read with `ast`, not executed: module-level and function-level imports both count (a cycle through a
lazy import is still a cycle for a reader), and so does `__import__("openzaya....")`.
"""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "openzaya"
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
# module -> why it may be longer
LONG_MODULES = {
    "model.py": "one file that reads top to bottom (house style)",
}
# (module, function) -> why it may be longer
LONG_FUNCTIONS = {
    ("model.py", "forward"): "the block's forward stays one readable piece",
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the openzaya modules it imports (anywhere in its body)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                targets = [node.args[0].value]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and mods[t].name != "__init__.py":
                    deps.add(t)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert "openzaya.checkpoint" in graph and "openzaya.model" in graph["openzaya.checkpoint"]   # the graph is read
    assert cycles(graph) == []


def test_module_sizes():
    too_long = {}
    for p in PKG.rglob("*.py"):
        n = len(p.read_text().splitlines())
        if n > MAX_MODULE_LINES and p.relative_to(PKG).as_posix() not in LONG_MODULES:
            too_long[p.relative_to(PKG).as_posix()] = n
    assert too_long == {}, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_function_sizes():
    too_long = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).as_posix()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and (rel, node.name) not in LONG_FUNCTIONS:
                    too_long[f"{rel}:{node.lineno} {node.name}"] = n
    assert too_long == {}, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"
