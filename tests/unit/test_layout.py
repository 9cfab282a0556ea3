"""The tree's design holds: imports flow dags -> training -> serving, with no circles and no path tricks."""

from __future__ import annotations

import ast
import subprocess

from tests.helpers import ROOT

PACKAGES = ("training", "serving")


def _python_files() -> list[str]:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    return [f for f in files if (ROOT / f).exists()]


def _module(path: str) -> str:
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: str) -> set[str]:
    """Every module ``path`` imports, at top level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    """Import edges between the project's own modules (training.*, serving.*, service, dags)."""
    files = [f for f in _python_files() if f.startswith(("training/", "serving/", "dags/")) or f == "service.py"]
    modules = {_module(f): f for f in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_serving_imports_nothing_from_training():
    offenders = {name: sorted(m for m in deps if m.startswith("training"))
                 for name, deps in _graph().items() if name.startswith("serving") or name == "service"}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_training_never_imports_the_dags():
    assert not {name: deps for name, deps in _graph().items()
                if name.startswith("training") and any(d.startswith("dags") for d in deps)}


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            assert cycle is None, " -> ".join(cycle)


def test_no_sys_path_or_pythonpath_edits():
    offenders = []
    for f in _python_files() + ["Makefile", "pyproject.toml"]:
        text = (ROOT / f).read_text()
        if f == "tests/unit/test_layout.py":
            continue
        for needle in ("sys.path.insert", "sys.path.append", "sys.path[:0]", "PYTHONPATH", "pythonpath ="):
            if needle in text:
                offenders.append(f"{f}: {needle}")
    assert not offenders, offenders


def test_no_class_swaps():
    offenders = [f for f in _python_files() if f != "tests/unit/test_layout.py"
                 and any(isinstance(node, ast.Attribute) and node.attr == "__class__" and isinstance(node.ctx, ast.Store)
                         for node in ast.walk(ast.parse((ROOT / f).read_text())))]
    assert not offenders, offenders


def test_the_bento_ships_the_service_and_the_serving_package_only():
    import yaml

    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    assert bentofile["include"] == ["service.py", "serving/"]
