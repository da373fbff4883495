"""The package as it ships: the wheel's files and metadata, `fullres --version`, and fullres without POSIX.

The wheel installed into a clean virtual environment and run from an empty folder is scripts/smoke_wheel.sh
(CI runs it after this suite).
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """fullres's wheel, built (no dependencies) from a copy of the files it is made of, so that the working
    tree gets no build/ folder. With this Python's setuptools when it is recent enough (no download)."""
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("dist")
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(tree)]
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:  # PEP 639 licenses; bdist_wheel built in
            command.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (built,) = out.glob("fullres-*.whl")
    return built


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())


def test_the_wheel_ships_the_type_marker_the_license_and_the_pools_source(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "fullres/py.typed" in names
    assert "fullres/kernels/cpu_pool.cpp" in names  # compiled on the user's machine by the first training
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    # every module of the source tree, the subpackages included
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "fullres").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    assert not any(n.startswith(("tests/", "scripts/", "docs/")) for n in names)


def test_the_wheels_metadata_declares_the_license_extras_and_torch_range(wheel):
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["License"] is None  # the SPDX expression replaces the legacy field
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Topic :: Scientific/Engineering :: Medical Science Apps." in classifiers
    assert not any(c.startswith("License ::") for c in classifiers)  # not allowed beside License-Expression
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Issues"} <= set(urls)
    assert {"nnunet", "nnunet-networks", "deploy", "mlflow", "test"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    assert "torch<3,>=2.4" in requires
    # the networks alone must not pull a second torch build: 0.4.x declares timm (and so torchvision)
    networks = [r for r in requires if 'extra == "nnunet-networks"' in r]
    assert networks == ['dynamic-network-architectures==0.3.1; extra == "nnunet-networks"']
    assert [r for r in requires if 'extra == "nnunet"' in r] == ['nnunetv2<3,>=2.8.1; extra == "nnunet"']


def test_the_license_file_is_the_apache_2_0_text():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_version_names_fullres_torch_cuda_and_onednn():
    from fullres import __version__
    from fullres.run.versions import describe, versions

    done = subprocess.run([sys.executable, "-m", "fullres", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert "\n" not in line and line == describe()
    assert line.startswith(f"fullres {__version__}, torch {torch.__version__} (CUDA ")
    assert "oneDNN" in line
    recorded = versions()
    assert set(recorded) == {"fullres", "torch", "cuda", "onednn", "python", "platform"}
    assert recorded["cuda"] == torch.version.cuda
    json.dumps(recorded)  # what runs and predictions record
    if torch.backends.mkldnn.is_available():
        assert recorded["onednn"] and recorded["onednn"][0].isdigit() and f"oneDNN {recorded['onednn']}" in line


# Python where `resource` and `fcntl` do not exist (as on Windows), in this process and its children.
NO_POSIX = """
import importlib.abc, sys

class _NoPosix(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in ("resource", "fcntl"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoPosix())
for _name in ("resource", "fcntl"):
    sys.modules.pop(_name, None)
"""

DRIVER = """
import contextlib, io, json, sys

import fullres, fullres.cli, fullres.kernels.device
from fullres.kernels import cpu_pool

results = {"resource": fullres.kernels.device.resource is None, "fcntl": cpu_pool.fcntl is None}
job = ["--shape", "16", "16", "16", "--filters", "2", "--batch", "1"]
for name, argv in {"version": ["--version"], "estimate": ["estimate", *job],
                   "dryrun": ["estimate", "--method", "dryrun", "--channels-last", *job],
                   "plan": ["plan", "--memory", "8GB", "--method", "table1", *job]}.items():
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = fullres.cli.main(argv)
        except SystemExit as done:
            code = done.code or 0
    results[name] = {"code": code, "out": out.getvalue(), "err": err.getvalue()}
results["imported"] = sorted({"resource", "fcntl"} & set(sys.modules))
print(json.dumps(results))
"""


def test_import_estimate_and_plan_work_without_resource_and_fcntl(tmp_path):
    """Where POSIX's `resource` and `fcntl` do not exist, fullres imports, estimates (Table 1 and the dry run)
    and plans; the CPU pool and the dry run's model of it are off, and the output says so."""
    (tmp_path / "sitecustomize.py").write_text(NO_POSIX)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    env.pop("FULLRES_MALLOC", None)
    probe = subprocess.run([sys.executable, "-c", "import fcntl"], capture_output=True, text=True, env=env)
    assert probe.returncode != 0 and "No module named 'fcntl'" in probe.stderr  # the simulation holds
    done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["resource"] and results["fcntl"] and results["imported"] == []
    for name in ("version", "estimate", "dryrun", "plan"):
        assert results[name]["code"] == 0, (name, results[name]["err"])
    assert "CPU pool off: the CPU pool needs POSIX (fcntl)" in results["version"]["out"]
    assert "Double for training" in results["estimate"]["out"]
    # the channels-last fp32 job would run under the pool: here it is estimated under the C allocator, and said
    dryrun = results["dryrun"]
    assert "(allocator: default)" in dryrun["out"]
    assert "the CPU pool needs POSIX (fcntl)" in dryrun["err"] and "model of it are off" in dryrun["err"]
    assert dryrun["err"].count("CPU pool needs POSIX") == 1
    assert "FITS" in results["plan"]["out"]


def test_the_pool_says_why_it_cannot_exist_without_fcntl(monkeypatch):
    from fullres.kernels import cpu_pool, malloc

    monkeypatch.setattr(cpu_pool, "fcntl", None)
    assert cpu_pool.unsupported() == "the CPU pool needs POSIX (fcntl), which this Python lacks"
    assert cpu_pool.cached() is None
    with pytest.raises(RuntimeError, match="needs POSIX"):
        cpu_pool.build()
    if not malloc._load_pool.cache_info().currsize:  # a pool already loaded in this process stays the answer
        with pytest.warns(UserWarning, match="model of it are off"):
            malloc._say_pool_off.cache_clear()
            assert malloc.pool_unavailable() == cpu_pool.unsupported()


def test_the_set_up_scripts_parse_and_ci_runs_the_smoke_test():
    for script in ("scripts/setup.sh", "scripts/smoke_wheel.sh", ".ci/run"):
        done = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, (script, done.stderr)
    assert "scripts/smoke_wheel.sh" in (ROOT / ".ci" / "run").read_text()
