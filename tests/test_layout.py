"""The layout the README draws, held by tests: commands above the libraries, imports in one direction.

    flamingo_annotate (commands) -> pipeline, training -> media -> flamingo

Two checks: a static one over every import statement in the source (function-local ones included, only
`if TYPE_CHECKING:` blocks left out), which finds cycles between packages and between the modules of one
package; and a dynamic one that imports each library in a fresh interpreter and looks at what came in.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flamingo", "media", "pipeline", "training", "flamingo_annotate")
# What each package may import, besides itself. Everything else among PACKAGES is forbidden.
ALLOWED = {
    "flamingo": set(),
    "media": {"flamingo"},
    "pipeline": {"flamingo", "media"},
    "training": {"flamingo", "media"},
    "flamingo_annotate": {"flamingo", "media", "pipeline", "training"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports at run time, resolved to the longest known module name."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names]   # a module, or a name in `base`
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_packages_import_only_downwards():
    wrong = sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                   for target in targets
                   if (src := module.split(".")[0]) != (dst := target.split(".")[0]) and dst not in ALLOWED[src])
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle_between_or_inside_packages():
    graph = import_graph()
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(module.split(".")[0], set()).update(
            t.split(".")[0] for t in targets if t.split(".")[0] != module.split(".")[0])
    assert find_cycle(packages) is None, find_cycle(packages)
    # Inside a package: no cycle between its modules, and none of them goes through the package's own
    # __init__ (whose re-exports are for users outside it).
    own_init = sorted(f"{m} imports {t}" for m, ts in graph.items() for t in ts if "." in m and t == m.split(".")[0])
    assert not own_init, "\n".join(own_init)
    inner = {m: {t for t in ts if t.split(".")[0] == m.split(".")[0] and "." in t} for m, ts in graph.items()}
    assert find_cycle(inner) is None, " -> ".join(find_cycle(inner) or [])


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def loaded_after_import(package: str) -> set[str]:
    """Top-level modules present after importing every module of `package` in a fresh interpreter."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"root = importlib.import_module({package!r})\n"
        "for info in pkgutil.walk_packages(root.__path__, root.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("package, forbidden", [
    ("flamingo", {"ray", "pipeline", "training", "media", "flamingo_annotate"}),
    ("media", {"ray", "pipeline", "training", "flamingo_annotate"}),
    ("training", {"pipeline", "flamingo_annotate"}),
    ("pipeline", {"training", "flamingo_annotate"}),
])
def test_a_library_loads_without_what_sits_above_it(package, forbidden):
    assert not loaded_after_import(package) & forbidden


def test_task_files_and_the_model_config_load_without_torch():
    """`validate` and `--help` stay instant: checking task files (their demonstrations decoded) and configs
    need no deep-learning import."""
    code = ("import glob, sys, flamingo.config, flamingo.tokens, pipeline.task, pipeline.schema\n"
            "tasks, problems = pipeline.task.check_tasks(sorted(glob.glob('jobs/tasks/*.yaml')))\n"
            "assert len(tasks) == len(glob.glob('jobs/tasks/*.yaml')) >= 2 and not problems, problems\n"
            "print(sorted({'torch', 'ray', 'transformers', 'open_clip'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
