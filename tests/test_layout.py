"""The package layout's rules (issue 15): no import circles between the project's modules (imports inside
functions included), and no module over ~400 lines unless its docstring says why."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("symphony", "symphony_kernels")
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    mods = {}
    for package in PACKAGES:
        for f in (ROOT / package).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, path: Path, known) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def test_no_import_circles():
    mods = _modules()
    edges = {m: _imports(m, p, mods) for m, p in mods.items()}
    # a package's __init__ re-exports lazily; an edge from it to its own submodule is not a circle
    edges = {m: {t for t in ts if not (mods[m].name == "__init__.py" and t.startswith(m + "."))}
             for m, ts in edges.items()}
    state, path, circles = {}, [], []

    def visit(m):
        state[m] = 1
        path.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                circles.append(path[path.index(t):] + [t])
            elif t not in state:
                visit(t)
        path.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not circles, " ; ".join(" -> ".join(c) for c in circles)


def test_modules_are_small_or_say_why():
    long = []
    for name, path in _modules().items():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "long because" not in doc:
            long.append(f"{name} ({lines} lines)")
    assert not long, "modules over ~400 lines without a reason in their docstring: " + ", ".join(long)
