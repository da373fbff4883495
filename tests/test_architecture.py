"""The package's layering: no import cycles (counting imports inside functions), one construction site
per extension point, and `fullres estimate` byte-identical to the recorded answers on six jobs."""

from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import fullres

PACKAGE = Path(fullres.__file__).parent
GOLDEN = Path(__file__).parent / "data" / "estimate_golden.json"


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """fullres modules `path` imports anywhere in it (top level or inside a function): `from a.b import c`
    counts as a.b.c when that is a module, else as a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {module for module in found if module in known and module != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
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


def test_no_import_cycles():
    found = modules()
    graph = {name: imports_of(path, name, set(found)) for name, path in found.items()}
    assert graph["fullres.train"] >= {"fullres.checkpoint", "fullres.device", "fullres.step"}  # the walk sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_function_level_cycle(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    known = {"a", "b"}
    graph = {"a": imports_of(tmp_path / "a.py", "a", known), "b": imports_of(tmp_path / "b.py", "b", known)}
    assert find_cycle(graph) == ["a", "b", "a"]


def calls_to(names: set[str]) -> dict[str, list[str]]:
    """Every call of a function or class in `names`, by module."""
    hits: dict[str, list[str]] = {}
    for module, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                if called in names:
                    hits.setdefault(module, []).append(called)
    return hits


def test_registries_are_the_only_construction_sites():
    # Networks are built by the registry alone; optimizers and gradient scalers by build_training alone.
    assert set(calls_to({"UNet3D"})) == set()
    assert set(calls_to({"Adam", "GradScaler"})) == {"fullres.step"}
    assert set(calls_to({"build_model"})) <= {"fullres.step", "fullres.memory.table1", "fullres.memory.dryrun",
                                              "fullres.predict", "fullres.bench.flops"}


@pytest.mark.skipif(not GOLDEN.exists(), reason="no recorded estimates")
def test_estimate_json_unchanged_on_six_jobs(monkeypatch):
    """`fullres estimate --json`, both methods, equals the answers recorded before the package was
    layered (the runtime term fixed at 100 MB, 2 threads: the tensors' model is what is compared)."""
    from fullres.cli import main
    from fullres.memory import runtime

    golden = json.loads(GOLDEN.read_text())
    if golden["cpu_capability"] != torch.backends.cpu.get_cpu_capability():
        pytest.skip(f"recorded on {golden['cpu_capability']}: oneDNN's workspaces differ by vector ISA")
    monkeypatch.setattr(runtime, "measured_runtime_bytes", lambda job, *args, **kwargs: 100_000_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name, flags in golden["flags"].items():
            for method in ("table1", "dryrun"):
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    assert main(["estimate", *flags, "--method", method, "--device", "cpu", "--json"]) == 0
                assert json.loads(out.getvalue()) == golden["estimates"][f"{name}/{method}"], f"{name}/{method}"
    finally:
        torch.set_num_threads(threads)
