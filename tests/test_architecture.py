"""The package's imports go one way (docs/architecture.md, "Layers").

Every module under personalize/ is parsed (not imported), with the imports inside functions
too, since those run as well: a lazy import hides an import cycle, it does not remove it.
Imports under `if TYPE_CHECKING:` never run and are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

PACKAGE = ROOT / "personalize"

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS: list[tuple[str, set[str]]] = [
    ("errors", {"errors"}),
    ("helpers", {"io", "precision", "logs", "signals", "hypernetwork_options"}),
    ("foundation", {"config", "models", "data", "testing"}),
    ("adapters", {"adapters"}),
    ("methods", {"methods"}),
    ("inference", {"inference"}),
    ("training", {"training"}),
    ("apps", {"evaluation", "toyworld", "tools", "demo", "cli", "__main__", ""}),
]
# Layers that must not import each other although one sits above the other: inference loads
# artifacts through adapters only, so it stays usable without the training code.
FORBIDDEN = {("inference", "methods"), ("methods", "inference")}
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else ""
    return next(name for name, tops in LAYERS if top in tops)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, path: Path) -> set[str]:
    """The modules of ours `module` imports: `from a.b import c` is a.b.c when that is a
    module, else a.b."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _is_type_checking(block)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m in MODULES and m != module}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _cycle() -> list[str] | None:
    """One import cycle, as a path of modules, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_walk_sees_the_package():
    assert len(MODULES) > 60
    assert "personalize.adapters.lora" in GRAPH["personalize.inference"]
    assert "personalize.errors" in GRAPH["personalize.cli"]  # an import inside main()


def test_no_import_cycle():
    assert _cycle() is None, " -> ".join(_cycle() or [])


def test_imports_follow_the_layers():
    order = [name for name, _ in LAYERS]
    wrong = []
    for module, targets in GRAPH.items():
        here = _layer(module)
        for target in sorted(targets):
            there = _layer(target)
            if order.index(there) > order.index(here) or (here, there) in FORBIDDEN:
                wrong.append(f"{module} ({here}) imports {target} ({there})")
    assert wrong == [], "\n".join(wrong)


def test_errors_is_a_leaf():
    assert GRAPH["personalize.errors"] == set()


def test_format_modules_stay_small():
    # The modules of the layers this test guards; the training loop has its own split.
    owned = (
        "personalize.adapters",
        "personalize.inference",
        "personalize.tools",
        "personalize.toyworld",
    )
    big = {
        m: n
        for m, p in MODULES.items()
        if m.startswith(owned) and (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert big == {}
