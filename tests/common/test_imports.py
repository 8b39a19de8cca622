"""common/ has no import circle, function-local imports included (a circle hidden inside a function still ties
the two modules together)."""
import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parents[2] / "common"


def common_imports(path: Path) -> set:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "common":
                out |= {f"common.{a.name}" for a in node.names}
            elif node.module.startswith("common."):
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("common.")}
    return out


def test_common_modules_import_each_other_without_a_circle():
    graph = {f"common.{p.stem}": common_imports(p) for p in COMMON.glob("*.py")}
    assert graph["common.checkpoint"] and graph["common.model"]  # the scan sees imports
    state = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import circle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"
    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
