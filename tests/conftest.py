"""Shared fixtures: one tiny synthetic MSD dataset per test session (read-only: copy it to modify it)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SMALL_SHAPE = (32, 32, 24)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Calibrations (step times, runtime terms) and the record of trusted factories go to fresh folders:
    tests neither read a developer's cache or configuration nor leave entries in them. Subprocesses inherit
    the variables. pytest-xdist's workers share the cache (each calibration is measured once per run; its
    writes are atomic and locked), each keeps its own configuration."""
    import os

    previous = {name: os.environ.get(name) for name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    if os.environ.get("PYTEST_XDIST_WORKER"):
        cache = tmp_path_factory.getbasetemp().parent / "cache"  # the run's folder, above each worker's
        cache.mkdir(exist_ok=True)
    else:
        cache = tmp_path_factory.mktemp("cache")
    os.environ["XDG_CACHE_HOME"] = str(cache)
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config"))
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def small_msd(tmp_path_factory) -> Path:
    """4 training + 1 test BraTS-like phantoms of 32x32x24 (written once, about 0.1 s)."""
    from fullres.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("msd") / "Task01_small", train_cases=4, test_cases=1,
                         shape=SMALL_SHAPE, seed=7, progress=False)


@pytest.fixture
def msd_copy(small_msd, tmp_path) -> Path:
    """A private copy of `small_msd` that a test may modify (without the shared cache)."""
    copy = tmp_path / "Task01_copy"
    shutil.copytree(small_msd, copy, ignore=shutil.ignore_patterns(".fullres_cache"))
    return copy


@pytest.fixture
def cli(capsys):
    """Run `fullres ARGS...` in this process: (exit code, stdout, stderr). argparse's exits count too."""
    from fullres.cli import main

    def run(*argv):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run
