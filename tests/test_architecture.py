"""The package's layering: packages on floors that no import climbs, no import cycles (counting imports
inside functions), no private name crossing a module, no fullres import inside a function outside the
documented places, one construction site per extension point, and `fullres estimate` byte-identical to the
recorded answers on six jobs."""

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


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
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
    assert graph["fullres.run.train"] >= {"fullres.run.checkpoint", "fullres.kernels.device", "fullres.job.step"}  # the walk sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_function_level_cycle(tmp_path):
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from a import x\n")
    known = {"a", "b"}
    graph = {"a": imports_of(tmp_path / "a.py", "a", known), "b": imports_of(tmp_path / "b.py", "b", known)}
    assert find_cycle(graph) == ["a", "b", "a"]


# The floors, lowest first: a package may import its own modules and those of any lower floor, never one on
# its own floor or above. "base" is the package's root modules (errors, units, files, schema, presets).
FLOORS = ("base", "data kernels engine", "nets", "job", "cost", "evaluate", "run", "bench nnunet api", "cli")
FLOOR = {package: level for level, names in enumerate(FLOORS) for package in names.split()}
# Where a fullres import inside a function is the design: the package's face loads its API on first use,
# and each command imports the stages it runs inside its run(), so that parsing (and --help) stays light.
LAZY = {"fullres": "the public API is loaded on first use", "fullres.cli": "commands import their stages in run()"}


def package_of(module: str) -> str:
    parts = module.split(".")
    if module == "fullres.__main__":
        return "cli"
    if module == "fullres.api":
        return "api"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOOR) else "base"


def function_level_imports(path: Path) -> list[str]:
    """The fullres imports inside functions of `path` (as source text)."""
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fullres") or \
                        isinstance(node, ast.Import) and any(alias.name.startswith("fullres") for alias in node.names):
                    found.append(ast.unparse(node))
    return found


def layering_violations(package: Path = PACKAGE) -> list[str]:
    """Every import that climbs a floor or crosses to another package on the same floor, every private name
    imported from another module, and every fullres import inside a function outside :data:`LAZY`."""
    found = modules(package)
    root = package.name
    problems = []
    for name, path in sorted(found.items()):
        lazy = name in LAZY or any(name.startswith(place + ".") for place in LAZY if place != root)
        here = package_of(name)
        for imported in sorted(imports_of(path, name, set(found))):
            there = package_of(imported)
            if there != here and FLOOR[there] >= FLOOR[here] and not (lazy and name == root):
                problems.append(f"{name} imports {imported}: {there} is not below {here}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(root):
                private = [alias.name for alias in node.names if alias.name.startswith("_")
                           and not alias.name.startswith("__")]
                if private:
                    problems.append(f"{name} imports private {', '.join(private)} from {node.module}")
        if not lazy:
            problems += [f"{name} imports inside a function: {line}" for line in function_level_imports(path)]
    return problems


def test_no_import_runs_back_up_a_floor():
    assert {package_of(name) for name in modules()} == set(FLOOR)  # every package has a floor, every floor a package
    assert layering_violations() == []


def test_the_floor_check_fails_on_planted_violations(tmp_path):
    package = tmp_path / "fullres"
    for folder in ("engine", "run", "cost", "cli"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("")
    (package / "run" / "train.py").write_text("def _helper():\n    pass\n")
    (package / "engine" / "slabs.py").write_text("from fullres.run import train\n")  # climbs from engine to run
    (package / "cost" / "plan.py").write_text("from fullres.run.train import _helper\n"  # climbs, and private
                                               "def f():\n    from fullres.errors import x\n")  # inside a function
    (package / "cli" / "main.py").write_text("def run():\n    from fullres.run import train\n")  # documented
    assert layering_violations(package) == [
        "fullres.cost.plan imports fullres.run.train: run is not below cost",
        "fullres.cost.plan imports private _helper from fullres.run.train",
        "fullres.cost.plan imports inside a function: from fullres.errors import x",
        "fullres.engine.slabs imports fullres.run.train: run is not below engine",
    ]


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
    # Networks are built by the registry alone (fullres.nets registers its own); optimizers and gradient scalers by build_training alone.
    assert set(calls_to({"UNet3D", "IntelUNet", "build_monai", "build_nnunet", "build_factory"})) == {"fullres.nets", "fullres.nets.registry"}  # built-in registrations, families
    assert set(calls_to({"Adam", "GradScaler"})) == {"fullres.job.step"}
    assert set(calls_to({"build_model"})) <= {"fullres.nets.registry", "fullres.job.step", "fullres.cost.dryrun",
                                              "fullres.run.predict", "fullres.run.export", "fullres.cost.flops",
                                              "fullres.cost.timing", "fullres.bench.inference"}


@pytest.mark.skipif(not GOLDEN.exists(), reason="no recorded estimates")
def test_estimate_json_unchanged_on_six_jobs(monkeypatch):
    """`fullres estimate --json`, both methods, equals the answers recorded before the package was
    layered (the runtime term fixed at 100 MB, 2 threads: the tensors' model is what is compared)."""
    from fullres.cli import main
    from fullres.kernels import malloc
    from fullres.cost import runtime

    golden = json.loads(GOLDEN.read_text())
    if golden["cpu_capability"] != torch.backends.cpu.get_cpu_capability():
        pytest.skip(f"recorded on {golden['cpu_capability']}: oneDNN's workspaces differ by vector ISA")
    monkeypatch.setattr(runtime, "measured_runtime_bytes", lambda job, *args, **kwargs: 100_000_000)
    # as where a training command has built the CPU pool: estimate then models it for fp32 channels-last
    monkeypatch.setattr(malloc, "pool_unavailable", lambda build=False: None)
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


def tiny_network(config, shape):
    from torch import nn

    return nn.Sequential(nn.Conv3d(config.in_channels, config.filters, 3, padding=1), nn.ReLU(),
                         nn.Conv3d(config.filters, config.classes, 1))


def test_a_registered_network_is_built_estimated_and_trained_everywhere(monkeypatch):
    """docs/extending.md's worked example: one register_model call, and Table 1, the dry run and a
    training step all run the new network, in slabs too; strategies it has no schedule for are refused."""
    from fullres.job.config import JobConfig, Strategy
    from fullres.cost.dryrun import dryrun
    from fullres.cost.plan import candidate_strategies
    from fullres.cost.table1 import table1
    from fullres.nets.registry import MODELS, register_model
    from fullres.nets.registry import ModelConfig, ModelSpec
    from fullres.job.step import build_training, train_step
    from fullres.engine.losses import LOSSES

    monkeypatch.delitem(MODELS, "tiny", raising=False)  # the registry is as it was after the test
    register_model(ModelSpec("tiny", tiny_network, "two convolutions"))
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec("tiny", tiny_network, "again"))
    model = ModelConfig(architecture="tiny", in_channels=2, filters=3)
    job = JobConfig(model=model, shape=(16, 16, 16), batch=1)
    rows = table1(model, job.shape, job.batch).rows
    assert [row.type for row in rows] == ["InputLayer", "Conv3D", "Conv3D"]
    assert rows[1].trainable_weights == 2 * 3 * 27 + 3 and rows[1].feature_map_size == 3 * 16**3
    assert dryrun(job, runtime=0).breakdown["parameters"] == 4 * (2 * 3 * 27 + 3 + 3 * 1 + 1)
    training = build_training(job, "cpu")
    images, targets = torch.randn(1, 2, 16, 16, 16), torch.ones(1, 1, 16, 16, 16)
    before = [p.detach().clone() for p in training.model.parameters()]
    train_step(training.model, training.optimizer, images, targets, LOSSES["dice"], job.strategy)
    assert any(not torch.equal(a, b) for a, b in zip(before, training.model.parameters()))
    with pytest.raises(ValueError, match="--checkpoint-levels: the tiny network is checkpointed block by block"):
        JobConfig(model=model, shape=(16, 16, 16), batch=1, strategy=Strategy(checkpointing=True, checkpoint_levels=1))
    slabbed = JobConfig(model=model, shape=(16, 16, 16), batch=1, strategy=Strategy(slabs=2))  # through its tape
    slab_model = build_training(slabbed, "cpu").model
    assert torch.allclose(slab_model(images), slab_model._fullres_slab_forward(images), atol=1e-6)
    assert [candidate.strategy.slab_counts for _, candidate in candidate_strategies(job) if
            candidate.strategy.slabbed and candidate.strategy.precision == "fp32"] == [(8,)]
    with pytest.raises(ValueError, match="unknown network 'nope'"):
        ModelConfig(architecture="nope")


def test_strategy_fields_are_the_job_flags():
    """A Strategy field is a flag of every job command, with its metadata's help."""
    from dataclasses import fields

    from fullres.cli.main import build_parser
    from fullres.job.config import Strategy

    parser = build_parser()
    for command in ("estimate", "plan", "profile", "bench", "sweep", "train"):
        text = parser._subparsers._group_actions[0].choices[command].format_help()
        for spec in fields(Strategy):
            assert "--" + spec.name.replace("_", "-") in text, (command, spec.name)
            assert spec.metadata["help"].split()[0] in text


def test_a_metric_added_to_the_registry_reaches_the_case_table_and_the_csv(monkeypatch, tmp_path):
    import numpy as np

    from fullres.evaluate import metrics

    monkeypatch.setitem(metrics.METRICS, "volume", lambda pred, truth, spacing, tolerance: float(pred.sum()))
    monkeypatch.setattr(metrics, "METRIC_NAMES", tuple(metrics.METRICS))
    labels = np.zeros((8, 8, 8), np.int16)
    labels[2:4, 2:4, 2:4] = 3
    case = metrics.evaluate_case(labels, labels, (1.0, 1.0, 1.0))
    assert case["ET"]["volume"] == 8.0 and case["WT"]["dice"] == 1.0
    metrics.write_metrics_csv({"cases": {"c": case}, "summary": metrics.summarize({"c": case})}, tmp_path / "m.csv")
    assert (tmp_path / "m.csv").read_text().splitlines()[0] == "case,region,dice,nsd,hd95,volume"


def test_the_loss_registry_is_the_train_commands_choices():
    from fullres.cli.main import build_parser
    from fullres.engine.losses import LOSSES

    train = build_parser()._subparsers._group_actions[0].choices["train"]
    loss = next(action for action in train._actions if action.dest == "loss")
    assert tuple(loss.choices) == tuple(LOSSES)


def test_the_torch_free_names_are_the_registries_names():
    """fullres.terms lists, without torch, the names that torch-side registries implement."""
    from fullres import terms
    from fullres.engine.losses import LOSSES
    from fullres.run.tracking import TRACKER_CLASSES

    assert terms.LOSS_NAMES == tuple(LOSSES)
    assert terms.TRACKERS == tuple(TRACKER_CLASSES)
