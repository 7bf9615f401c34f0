"""The package's import directions, read from the source with `ast` (module-level and function-level imports).

A node is a subpackage of `sr_ray` (`reminder`, `train`, ...) or a top-level module (`tracking`, `judges`, ...).
The ground floor (config, runtime, hashing, judges, tracking) imports no area; `models` and `reminder` (the
method core) import no area above them; train, eval and serve do not import each other; nothing is circular.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sr_ray

ROOT = Path(sr_ray.__file__).resolve().parent

# The ground floor, each with what it may import (only floor modules, so the floor has no cycles either).
FLOOR = {
    "config_types": set(),
    "config": {"config_types"},
    "runtime": set(),
    "hashing": set(),
    "judges": set(),
    "tracking": set(),
    # `sr-ray` itself finds each area's CLI by module name (importlib), so statically it sits on the floor and
    # the area CLIs may use its shared `pipeline_main`.
    "cli": {"config_types", "config", "runtime"},
}
BELOW = set(FLOOR)
ALLOWED = FLOOR | {
    "models": BELOW,
    "reminder": BELOW | {"models"},
    "data": BELOW,
    "infer": BELOW | {"models", "reminder"},
    "train": BELOW | {"data", "models", "reminder", "infer"},
    "eval": BELOW | {"data", "models", "reminder", "infer"},
    "serve": BELOW | {"data", "models", "reminder"},
    "demo": BELOW | {"data", "models", "reminder", "infer", "train", "eval", "serve"},
}


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module `path` imports anywhere in its body (relative imports resolved)."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def node_of(module: str, root: Path) -> str | None:
    """The layering node of an sr_ray module (None: not sr_ray, or the package root itself)."""
    parts = module.split(".")
    if parts[0] != root.name or len(parts) < 2:
        return None
    if (root / parts[1]).is_dir() or (root / f"{parts[1]}.py").is_file():
        return parts[1]
    return None  # `from sr_ray.x import name` also names `sr_ray.x.name`, which is no module


def import_graph(root: Path) -> dict[str, dict[str, set[str]]]:
    """node -> imported node -> the importing modules (for the failure message); no self edges."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        source = node_of(module_name(path, root), root)
        if source is None:
            continue
        edges = graph.setdefault(source, {})
        for target in {node_of(m, root) for m in imported_modules(path, root)} - {None, source}:
            edges.setdefault(target, set()).add(module_name(path, root))
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    """One cycle through each back edge of a depth-first walk (empty: the graph is acyclic)."""
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                found.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_node_is_placed_in_the_table():
    assert set(import_graph(ROOT)) <= set(ALLOWED), "place the new package or module in ALLOWED"


def test_imports_point_only_down():
    upward = [f"{source} -> {target} ({', '.join(sorted(by))})"
              for source, edges in import_graph(ROOT).items()
              for target, by in sorted(edges.items()) if target not in ALLOWED.get(source, set())]
    assert upward == []


def test_no_package_level_cycles():
    assert cycles(import_graph(ROOT)) == []


def test_the_reader_sees_function_level_relative_and_from_package_imports(tmp_path):
    """The checker itself: an upward import hidden in a function, written relatively, or as
    `from pkg import module` is an edge, and two such edges are a cycle."""
    root = tmp_path / "sr_ray"
    for package in ("reminder", "train"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "tracking.py").write_text("import os\n")
    (root / "reminder" / "cli.py").write_text("def main():\n    from ..train.loop import run\n")
    (root / "train" / "loop.py").write_text("from sr_ray import tracking\nfrom sr_ray.reminder import cli\n")
    graph = import_graph(root)
    assert {s: sorted(t) for s, t in graph.items()} == {"reminder": ["train"], "train": ["reminder", "tracking"],
                                                        "tracking": []}
    assert graph["reminder"]["train"] == {"sr_ray.reminder.cli"}
    assert cycles(graph) == [["reminder", "train", "reminder"]]
