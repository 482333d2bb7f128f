"""stoker's modules import each other without cycles, counting imports inside functions (they only hide a cycle),
and the lower layers never import the higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import stoker

ROOT = Path(stoker.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """stoker modules imported anywhere in `path` (top level, functions, TYPE_CHECKING blocks left out)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip = {id(node) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for node in ast.walk(node)}  # annotations only: never executed
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("stoker"):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    known = set(paths)
    # A package's __init__ re-exports; importing `stoker.x.y` runs `stoker.x` too, but that edge is not a design
    # dependency of the importer, so packages' __init__ modules are left out as targets.
    packages = {name for name, p in paths.items() if p.name == "__init__.py"}
    return {name: imports(p, name, known) - packages for name, p in paths.items() if name not in packages}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_the_walk_sees_imports_inside_functions():
    edges = graph()
    assert "stoker.storage" in edges["stoker.cache"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


LAYERS = {  # a module may import modules of its own layer or lower ones
    "stoker.errors": 0,
    "stoker.storage": 1, "stoker.cache": 1, "stoker.shm": 1, "stoker.clock": 1, "stoker.checkpoint": 1,
    "stoker.options": 1, "stoker.lru": 1, "stoker.names": 1,
    "stoker.formats": 2,
    # Three siblings that never import each other: reading, transforming and batching are separate stages.
    "stoker.dataloader": 3, "stoker.augment": 3, "stoker.bucketing": 3,
    "stoker.perf": 4, "stoker.summary": 4,
    "stoker.cli": 5, "stoker.demo": 5,
}
SIBLINGS = ("stoker.dataloader", "stoker.augment", "stoker.bucketing")


def layer(module: str) -> int | None:
    for prefix, level in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if module == prefix or module.startswith(prefix + "."):
            return level
    return None


def package(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_no_upward_or_sideways_imports():
    wrong = []
    for module, targets in graph().items():
        mine = layer(module)
        for target in targets:
            theirs = layer(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} -> {target} (upward)")
            elif package(module) in SIBLINGS and package(target) in SIBLINGS and package(module) != package(target):
                wrong.append(f"{module} -> {target} (sideways)")
    assert wrong == []


def test_every_module_has_a_layer():
    helpers = ("stoker.synthetic", "stoker.testing")  # data and servers for tests and benchmarks, outside the layers
    assert [m for m in graph() if layer(m) is None and package(m) not in helpers] == []


def test_benchmarks_import_project_code_without_editing_sys_path():
    # Run as `python benchmarks/x.py`, a script finds its sibling helpers (benchmarks/_data.py) on its own folder and
    # stoker where it is installed; test helpers live in stoker.testing / stoker.synthetic, not in tests/.
    benchmarks = ROOT.parent / "benchmarks"
    editing = [f"{path.name}:{node.lineno}" for path in sorted(benchmarks.glob("*.py"))
               for node in ast.walk(ast.parse(path.read_text(), str(path)))
               if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
               and node.value.id == "sys"]
    assert sorted(benchmarks.glob("*.py")) and editing == []
