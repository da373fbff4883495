"""A run is data: what opening a run may run (fullres.run.trust), the one schema its fields are read with
(fullres.schema), the run lock, a non-finite loss, and one line for every failure. The refusals themselves,
as a user meets them, are rows of tests/test_reliability.py; these are the paths that work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fullres.errors import UserError

TINY = ["--shape", "16", "16", "16", "--batch", "1", "--epochs", "1", "--workers", "0", "--threads", "1", "--quiet",
        "--force", "--no-autotune"]
NETS = """import torch
def make(in_channels, out_channels, width=3):
    return torch.nn.Sequential(torch.nn.Conv3d(in_channels, width, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.Conv3d(width, out_channels, 1))
"""


@pytest.fixture(scope="module")
def factory_run(tmp_path_factory):
    """A 1-epoch run of a factory network from a user's nets.py, trained under its own config home."""
    from fullres.cli import main
    from fullres.data.synth import write_dataset

    root = tmp_path_factory.mktemp("trust")
    data = write_dataset(root / "data", train_cases=3, test_cases=1, shape=(16, 16, 16), seed=1, progress=False)
    (root / "nets.py").write_text(NETS)
    home = root / "home"
    env = {**os.environ, "XDG_CONFIG_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "fullres", "train", str(data), "--out", str(root / "run"),
                           "--model", "nets.py:make", *TINY], cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root, data, root / "run", home


def predict(root: Path, cwd: Path, home: Path, out: str, *flags: str):
    env = {**os.environ, "XDG_CONFIG_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "fullres", "predict", str(root / "run"), str(root / "data"), "--out",
                           out, "--quiet", *flags], cwd=cwd, env=env, capture_output=True, text=True)


def test_train_copies_the_factory_into_the_run_and_remembers_its_hash(factory_run):
    root, _, run, home = factory_run
    copy = run / "network" / "nets.py"
    assert copy.read_text() == NETS
    config = json.loads((run / "config.json").read_text())
    digest = config["job"]["model"]["source_sha256"]
    assert digest and "factory_dir" not in config["job"]["model"]
    store = json.loads((home / "fullres" / "trusted-factories.json").read_text())
    assert store == {f"sha256:{digest}:make": "nets.py:make"}  # the file and the function in it


def test_the_users_own_run_predicts_from_any_folder_with_the_runs_copy(factory_run, tmp_path):
    root, _, _, home = factory_run
    # another nets.py where predict runs: the run's copy is what is built, never this file
    (tmp_path / "nets.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('x')\n" + NETS)
    done = predict(root, tmp_path, home, "pred")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "pred" / "BRATS_004.nii.gz").exists() and not (tmp_path / "RAN").exists()


def test_another_account_needs_trust_code_and_then_gets_the_runs_copy(factory_run, tmp_path):
    root, _, _, _ = factory_run
    stranger = tmp_path / "stranger"
    refused = predict(root, tmp_path, stranger, "p1")
    assert refused.returncode == 2 and "--trust-code" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "p1").exists()
    trusted = predict(root, tmp_path, stranger, "p2", "--trust-code")
    assert trusted.returncode == 0, trusted.stderr
    assert not (stranger / "fullres" / "trusted-factories.json").exists()  # --trust-code trusts once, records nothing


def test_a_changed_copy_is_refused_even_with_trust_code(factory_run, tmp_path):
    import shutil

    root, _, run, home = factory_run
    moved = tmp_path / "moved"
    shutil.copytree(run, moved / "run")
    shutil.copytree(root / "data", moved / "data")
    (moved / "run" / "network" / "nets.py").write_text(NETS + "\n# edited\n")
    done = predict(moved, tmp_path, home, "p", "--trust-code")
    assert done.returncode == 2 and "SHA-256 differs" in done.stderr
    assert not (tmp_path / "p").exists()


def test_trusted_model_rules(tmp_path):
    from fullres.nets.registry import ModelConfig
    from fullres.run.trust import trusted_model

    where = tmp_path / "config.json"
    for name in ("unet3d", "monai:SegResNet"):  # registered names and allow-listed libraries pass as they are
        model = ModelConfig(architecture=name)
        assert trusted_model(model, tmp_path, False, where) is model
    module = ModelConfig(architecture="builtins:print")
    with pytest.raises(UserError, match="builtins:print"):
        trusted_model(module, tmp_path, False, where)
    assert trusted_model(module, tmp_path, True, where) is module  # the user's own --trust-code
    (tmp_path / "network").mkdir()
    (tmp_path / "network" / "nets.py").write_text(NETS)
    digest = __import__("hashlib").sha256(NETS.encode()).hexdigest()
    factory = ModelConfig(architecture="../elsewhere/nets.py:make", source_sha256=digest)
    opened = trusted_model(factory, tmp_path, True, where)
    assert opened.factory_dir == str((tmp_path / "network").absolute()) and opened == factory
    assert "factory_dir" not in opened.to_json()


def test_a_module_factory_is_trusted_only_where_its_package_was_found(monkeypatch, tmp_path):
    from fullres.run import trust
    from fullres.nets.registry import ModelConfig

    model = ModelConfig(architecture="mynets.blocks:make")
    monkeypatch.setattr(trust, "_module_origin", lambda name: "/home/me/mynets/__init__.py")
    trust.remember(model)
    assert trust.trusted_model(model, tmp_path, False, tmp_path / "config.json") is model
    # a same-named package in the folder the command runs from would shadow it: not trusted there
    monkeypatch.setattr(trust, "_module_origin", lambda name: str(tmp_path / "mynets" / "__init__.py"))
    with pytest.raises(UserError, match="--trust-code"):
        trust.trusted_model(model, tmp_path, False, tmp_path / "config.json")


def test_config_round_trips_through_the_schema():
    from fullres.job.config import JobConfig, Strategy, TrainConfig
    from fullres.data.preprocess import DataConfig
    from fullres.nets.registry import ModelConfig

    job = JobConfig(model=ModelConfig(filters=4, args='{"a": 1}'), shape=(16, 16, 8), batch=2,
                    strategy=Strategy(checkpointing=True, slabs=2, coarse_slabs="2"))
    config = TrainConfig(job=job, data=DataConfig(shape=(16, 16, 8)), data_dir="/data", lr=0.5, seed=2**32 - 1)
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


@pytest.mark.parametrize("path, value, says", [
    ("seed", True, "expected a whole number, got true/false"),
    ("lr", "1e-3", "expected a number, got text"),
    ("job.shape", [16, 16, 16, 16], "expected 3 items, got 4"),
    ("data.channels", [0, 1.5], "expected a whole number"),
    ("job.model.args", ["x"], "expected text"),
    ("job.model.source_sha256", "x" * 5000, "5000 characters"),
    ("epochs", 2**70, "does not fit in 64 bits"),
])
def test_the_schema_names_the_field_and_what_is_wrong(path, value, says):
    from fullres.job.config import JobConfig, TrainConfig
    from fullres.data.preprocess import DataConfig

    data = TrainConfig(job=JobConfig(shape=(16, 16, 16), batch=1), data=DataConfig(shape=(16, 16, 16)),
                       data_dir="/d").to_json()
    target = data
    *parents, last = path.split(".")
    for part in parents:
        target = target[part]
    target[last] = value
    with pytest.raises(UserError) as refused:
        TrainConfig.from_json(data, where="C")
    message = str(refused.value)
    assert message.startswith(f"C.{path}: ") and says in message


def test_a_second_holder_of_the_run_lock_is_refused_and_a_dead_ones_is_taken_over(tmp_path):
    from fullres.run.checkpoint import lock_holder, run_lock

    run, said = tmp_path / "run", []
    with run_lock(run, new=True, log=said.append):
        assert lock_holder(run) == os.getpid()
        with pytest.raises(UserError, match=f"in use: process {os.getpid()}"):
            with run_lock(run, new=False):
                pass
    assert lock_holder(run) is None and (run / ".lock").read_text() == ""  # released, and says no one holds it
    (run / ".lock").write_text("999999999\n")  # what a killed process leaves: its PID, and no lock held
    with run_lock(run, new=False, log=said.append):
        pass
    assert said == [f"took over the lock of process 999999999, which is no longer running in {run}"]


def test_a_non_finite_loss_stops_training_and_keeps_the_last_checkpoint(small_msd, tmp_path, cli, monkeypatch):
    from fullres.engine import losses
    from fullres.run.checkpoint import load_checkpoint

    dice = losses.LOSSES["dice"]
    calls = []

    def poisoned(logits, targets):  # the second epoch's first step diverges
        calls.append(1)
        loss = dice(logits, targets)
        return loss * float("nan") if len(calls) > 3 else loss

    monkeypatch.setitem(losses.LOSSES, "dice", poisoned)
    code, _, err = cli("train", small_msd, "--out", tmp_path / "run", "--shape", "16", "16", "16", "--filters", "2",
                       "--batch", "1", "--epochs", "3", "--workers", "0", "--threads", "1", "--quiet", "--force",
                       "--no-autotune", "--val-fraction", "0.25")
    assert code == 1 and err.count("\n") == 1
    assert "epoch 2, step 1: the loss is nan (not finite): training stopped" in err
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(t).all() for t in state["model"].values())


def test_warnings_are_shown_after_success_and_dropped_on_a_refusal(tmp_path, cli):
    """A library's warnings and its logged warnings (matplotlib logs one when a full disk stops its font cache)
    are held: shown after a command that succeeds, dropped when it fails, so a refusal stays one line."""
    (tmp_path / "warns.py").write_text("import logging, warnings, torch\n"
                                       "def make(i, o, **k):\n    warnings.warn('from the factory')\n"
                                       "    logging.getLogger('some.library').warning('logged by a library')\n"
                                       "    if k.get('fail'):\n        raise ValueError('no')\n"
                                       "    return torch.nn.Conv3d(i, o, 1)\n")
    model = f"{tmp_path / 'warns.py'}:make"
    code, out, err = cli("estimate", "--model", model, "--shape", "8", "8", "8", "--batch", "1")
    assert code == 0 and "from the factory" in err and "logged by a library\n" in err
    code, _, err = cli("estimate", "--model", model, "--model-args", '{"fail": true}', "--shape", "8", "8", "8")
    assert code == 2 and "from the factory" not in err and "logged by" not in err and len(err.splitlines()) == 1


def test_an_unexpected_failure_is_one_line(cli, monkeypatch):
    from fullres.cli import check

    def broken(args):
        raise RuntimeError("something no check foresaw\nsecond line")

    monkeypatch.setattr(check, "run", broken)
    code, _, err = cli("check", ".")
    assert code == 1 and err == ("fullres check: error: RuntimeError: something no check foresaw (unexpected; "
                                 "FULLRES_TRACEBACK=1 shows where)\n")
