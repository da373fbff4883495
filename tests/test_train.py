"""Training end to end on tiny volumes: run files, resume, preflight, DDP equality, SIGKILL recovery."""

from __future__ import annotations

import json
from dataclasses import replace
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fullres.job.config import JobConfig, Strategy
from fullres.cost.table1 import table1
from fullres.nets.registry import ModelConfig
from fullres.run.checkpoint import load_checkpoint
from fullres.job.config import TrainConfig
from fullres.cost.plan import candidate_strategies, preflight
from fullres.run.train import CSV_COLUMNS

# On the CPU even on a GPU machine: these tests compare weights bit for bit, which cuDNN's nondeterministic
# backward does not promise (tests/test_cuda.py covers training on CUDA).
TINY = ["--shape", "32", "32", "24", "--filters", "2", "--batch", "2", "--workers", "0", "--threads", "1",
        "--quiet", "--lr", "1e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def train_msd(tmp_path_factory) -> Path:
    from fullres.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("train") / "msd", train_cases=6, test_cases=1,
                         shape=(32, 32, 24), seed=3, progress=False)


def weights(path: Path) -> dict:
    return load_checkpoint(path)["model"]


def test_train_writes_run_files(train_msd, tmp_path, cli):
    straight = tmp_path / "straight"
    code, out, err = cli("train", train_msd, "--out", straight, "--epochs", "2", *TINY)
    assert code == 0, err
    for name in ("config.json", "metrics.csv", "last.pt", "best.pt", "curves.png", "splits.json",
                 "validation/summary.json"):
        assert (straight / name).exists(), name
    (split,) = json.loads((straight / "splits.json").read_text())  # the default: one seeded split
    summary = json.loads((straight / "validation" / "summary.json").read_text())
    assert summary["folds"] == 0 and set(summary["cases"]) == set(split["val"])
    assert list((straight / "tb").iterdir())
    rows = (straight / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == CSV_COLUMNS and len(rows) == 3
    config = TrainConfig.from_json(json.loads((straight / "config.json").read_text()))
    assert config.epochs == 2 and config.job.model.filters == 2 and config.data.shape == (32, 32, 24)
    assert "preflight" in out and "done: validation Dice" in out


def test_resume_epochs_extends_a_run_to_what_an_uninterrupted_run_gives(train_msd, tmp_path, cli):
    """--resume --epochs N extends a finished run: with the constant schedule it ends with the weights of a
    run trained for N epochs from the start."""
    flags = [*TINY, "--schedule", "constant"]
    assert cli("train", train_msd, "--out", tmp_path / "a", "--epochs", "3", *flags)[0] == 0
    assert cli("train", train_msd, "--out", tmp_path / "b", "--epochs", "2", *flags)[0] == 0
    code, out, err = cli("train", "--out", tmp_path / "b", "--resume", "--epochs", "3", "--quiet")
    assert code == 0, err
    assert "resuming after epoch 2 of 3" in out
    assert json.loads((tmp_path / "b" / "config.json").read_text())["epochs"] == 3
    a, b = weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert len((tmp_path / "b" / "metrics.csv").read_text().splitlines()) == 4


def test_resume_refuses_flags_that_disagree_with_the_run(train_msd, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", train_msd, "--out", run, "--epochs", "2", *TINY)[0] == 0
    (run / ".last.pt.k1l2d3.tmp").write_bytes(b"half a checkpoint")  # a write cut short by a kill
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    other_data = tmp_path / "elsewhere"
    for data, flags, message in (([], ["--lr", "0.5"], "--lr 0.5 differs from the run's 0.001"),
                                 ([], ["--checkpointing"], "--checkpointing True differs from the run's False"),
                                 ([], ["--shape", "32", "32", "16"], "--shape 32 32 16 differs from the run's (32, 32, 24)"),
                                 ([], ["--channels", "2"], "--channels differs from the run's channels [0, 1, 2, 3]"),
                                 ([], ["--epochs", "1"], "--epochs 1 is fewer than the run's 2"),
                                 ([other_data], [], "a resumed run trains on its own data")):
        code, out, err = cli("train", *data, "--out", run, "--resume", *flags)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    # flags that agree are accepted: the finished run has nothing left to do
    code, out, err = cli("train", train_msd, "--out", run, "--resume", "--lr", "1e-3")
    assert code == 0, err
    assert "removed 1 unfinished checkpoint write(s) of the interrupted run: .last.pt.k1l2d3.tmp" in out
    assert not (run / ".last.pt.k1l2d3.tmp").exists() and (run / "last.pt").read_bytes() == before["last.pt"]


def test_cosine_schedule_extended_follows_the_longer_cosine():
    from fullres.run.train import lr_schedule

    config = TrainConfig.from_json({"job": JobConfig(shape=(16, 16, 16)).to_json(), "data": {"shape": [16, 16, 16]},
                                    "data_dir": ".", "epochs": 2})
    assert [lr_schedule(config)(e) for e in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    longer = lr_schedule(replace(config, epochs=4))
    assert [longer(e) for e in range(5)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447, 0.0], abs=1e-6)
    assert lr_schedule(replace(config, schedule="constant"))(7) == 1.0


def test_existing_run_is_never_overwritten_and_resume_needs_a_run(train_msd, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", train_msd, "--out", run, "--epochs", "1", *TINY)[0] == 0
    before = (run / "last.pt").read_bytes()
    code, _, err = cli("train", train_msd, "--out", run, "--epochs", "1", *TINY)
    assert code == 2 and "already holds a run: use --resume" in err
    assert (run / "last.pt").read_bytes() == before
    code, _, err = cli("train", "--out", tmp_path / "empty", "--resume")
    assert code == 2 and "holds no run to resume" in err
    mine = tmp_path / "mine"  # a folder of the user's own files is never written into
    mine.mkdir()
    (mine / "metrics.csv").write_text("my numbers\n")
    code, _, err = cli("train", train_msd, "--out", mine, "--epochs", "1", *TINY)
    assert code == 2 and "is not empty and holds no run" in err
    assert [path.name for path in mine.iterdir()] == ["metrics.csv"]
    assert (mine / "metrics.csv").read_text() == "my numbers\n"


def test_job_that_cannot_fit_is_refused_before_training(train_msd, tmp_path, cli):
    # how long the refusal takes is a benchmark (benchmarks/latency.py), not a test
    code, _, err = cli("train", train_msd, "--out", tmp_path / "r", "--memory", "1MB", *TINY)
    assert code == 3 and not (tmp_path / "r").exists()
    assert "the job does not fit" in err and "--strategy auto" in err and "--force" in err
    assert "smaller shape" in err and "tiling" in err and "Traceback" not in err
    assert not (tmp_path / "r" / "last.pt").exists()


def test_strategy_auto_prefers_exact_strategies():
    job = JobConfig(model=ModelConfig(filters=8), shape=(32, 32, 32), batch=4)
    names = [name for name, _ in candidate_strategies(job)]
    selective = [f"checkpointing of the {k} finest level{'s' if k > 1 else ''}" for k in (1, 2, 3)]
    assert names[:6] == ["as given", *selective, "checkpointing", "checkpointing + accumulate x2"]
    assert names.index("bf16") > names.index("checkpointing + accumulate x4")
    # slabs (exact, more recomputation) after accumulation, before bf16; with normalisation too, since
    # slabs compute its statistics over the whole volume
    assert names.index("checkpointing + accumulate x4") < names.index("checkpointing + accumulate x4 + 4 slabs") < names.index("bf16")
    assert any("slabs" in name for name, _ in candidate_strategies(job.with_(model=ModelConfig(filters=8, norm="instance"))))
    assert not any("bf16" in name for name, _ in candidate_strategies(job, allow_bf16=False))
    per_sample = table1(job.model, job.shape, 1).training_bytes
    chosen, needed, name = preflight(job, budget=2 * per_sample, method="table1", auto=True)
    assert name == "checkpointing + accumulate x2"
    assert chosen.batch == 2 and chosen.strategy == Strategy(checkpointing=True, accumulate=2)
    assert chosen.effective_batch == job.effective_batch and needed <= 2 * per_sample


def test_bad_data_is_refused_with_check_messages(train_msd, tmp_path, cli):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(train_msd, broken, ignore=shutil.ignore_patterns(".fullres_cache"))
    (broken / "labelsTr" / "BRATS_001.nii.gz").write_bytes(b"not a nifti")
    code, _, err = cli("train", broken, "--out", tmp_path / "r", *TINY)
    assert code == 1 and "labelsTr/BRATS_001.nii.gz" in err and "problem" in err


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: 0 must be at least 1"),
    (["--lr", "-1"], "argument --lr: -1.0 must be a finite number greater than 0"),
    (["--val-fraction", "1"], "argument --val-fraction: 1.0 must be in [0, 1)"),
    (["--shape", "30", "32", "24"], "30 is not divisible by 8"),
    (["--channels", "PD"], "--channels"),
])
def test_bad_train_options(train_msd, tmp_path, cli, argv, message):
    code, _, err = cli("train", train_msd, "--out", tmp_path / "r", *TINY, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(train_msd, tmp_path):
    flags = ["--shape", "32", "32", "24", "--filters", "2", "--workers", "0", "--threads", "1", "--quiet",
             "--epochs", "2", "--dropout", "0", "--lr", "1e-3", "--device", "cpu"]
    single = subprocess.run([sys.executable, "-m", "fullres", "train", str(train_msd), "--out", str(tmp_path / "one"),
                             "--batch", "2", *flags], capture_output=True, text=True, env=subprocess_env())
    assert single.returncode == 0, single.stderr
    # Loopback only, a free port, and a time limit that reports what the ranks printed: a machine whose
    # hostname does not resolve must not turn a rendezvous into a hang.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--local-addr", "127.0.0.1", "-m", "fullres", "train", str(train_msd), "--out", str(tmp_path / "two"),
               "--batch", "1", *flags]
    try:
        ddp = subprocess.run(command, capture_output=True, text=True, timeout=300,
                             env={**subprocess_env(), "GLOO_SOCKET_IFNAME": "lo"})
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not end in 300 s; its stderr:\n{(error.stderr or b'')[-3000:]!r}")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    one, two = weights(tmp_path / "one" / "last.pt"), weights(tmp_path / "two" / "last.pt")
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-6, msg=name)


# Runs `fullres ARGS...` with every checkpoint write cut short: after half of the bytes of the Nth write
# reached the temporary file, the process SIGKILLs itself, so a kill lands inside a checkpoint write for sure
# (a kill from outside at a random moment rarely does: a tiny checkpoint takes microseconds to write).
KILL_DURING_WRITE = """
import contextlib, os, signal, sys
import fullres.run.checkpoint as checkpoint
original, writes, at = checkpoint.atomic_write, [0], int(os.environ["KILL_AT_WRITE"])

@contextlib.contextmanager
def killing(path):
    with original(path) as file:
        class Half:
            def write(self, data):
                writes[0] += 1
                if writes[0] == at:
                    data = bytes(data)
                    file.write(data[: len(data) // 2])
                    file.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return file.write(data)
        yield Half()

checkpoint.atomic_write = killing
from fullres.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Started:
    """Runs a command, reading its stdout on a thread: `training` is set once the run printed its "job:" line
    (set-up done, the epochs begin); `wait()` returns its exit code and stderr."""

    def __init__(self, cli: list[str], env: dict, stderr_path: Path):
        import threading

        self.training, self.stderr_path = threading.Event(), stderr_path
        with open(stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=stderr, env=env, text=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            if line.startswith("job:"):
                self.training.set()

    def wait(self) -> tuple[int, str]:
        self.process.wait()
        self.reader.join()
        return self.process.returncode, self.stderr_path.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("schedule", [["--schedule", "constant", "--workers", "0"], []],
                         ids=["constant-no-workers", "defaults"])
def test_sigkill_at_random_moments_and_during_writes_then_resume_gives_the_uninterrupted_weights(
        train_msd, tmp_path, schedule):
    """Five SIGKILLs per run: three at random moments from outside, two inside a checkpoint write (its
    temporary file left behind proves it); after each, last.pt loads and --resume goes on, and the run ends
    with exactly the weights of an uninterrupted one. With the default schedule (cosine) and data-loading
    workers (1) too."""
    flags = ["--shape", "32", "32", "24", "--filters", "2", "--batch", "1", "--threads", "1", "--quiet",
             "--epochs", "8", "--device", "cpu", *schedule]
    command = [sys.executable, "-m", "fullres", "train", str(train_msd)]
    reference = Started([*command, "--out", str(tmp_path / "ref"), *flags], subprocess_env(), tmp_path / "ref.err")
    reference.training.wait(timeout=300)
    started = time.monotonic()
    code, err = reference.wait()
    assert code == 0, err
    # A random moment is drawn within a fifth of the reference's epochs, counted from the "job:" line: three
    # such kills and two in writes (each at most an epoch on) leave the run unfinished on any machine speed.
    window = (time.monotonic() - started) / 5

    run = tmp_path / "killed"
    rng = random.Random(1)
    kills, during_write, first = 0, 0, True
    while True:
        cli = [*command[:3], "train", str(train_msd), "--out", str(run), *flags] if first else \
            [*command[:3], "train", "--out", str(run), "--resume", "--quiet"]
        outside = kills - during_write
        in_write = during_write < 2 and (outside >= 3 or kills >= 2 * during_write + 1)
        if in_write:
            cli = [sys.executable, "-c", KILL_DURING_WRITE, *cli[3:]]
        env = {**subprocess_env(), "KILL_AT_WRITE": "1"}
        before = set(run.glob(".*.tmp"))
        process = Started(cli, env, tmp_path / "killed.err")
        if not in_write and outside < 3:
            while process.process.poll() is None and not process.training.wait(timeout=0.02):
                pass
            deadline = time.monotonic() + rng.uniform(0.0, window)
            while process.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            if process.process.poll() is None:
                process.process.send_signal(signal.SIGKILL)
        code, err = process.wait()
        if code == -signal.SIGKILL:
            kills += 1
            if in_write:
                left = set(run.glob(".*.pt.*.tmp")) - before
                assert left, "killed in a checkpoint write, yet no temporary file was left"
                during_write += 1
        elif code == 0:
            break
        else:
            raise AssertionError(err[-2000:])
        if (run / "last.pt").exists():
            load_checkpoint(run / "last.pt")  # never unreadable, whenever the kill came
        first = not (run / "config.json").exists()  # killed before config.json: a new run, else --resume
    assert kills == 5 and during_write == 2, (kills, during_write)
    # each resume removed the unfinished writes before it; the last write was never cut short
    assert not list(run.glob(".*.tmp")), sorted(path.name for path in run.glob(".*.tmp"))
    reference_weights, resumed = weights(tmp_path / "ref" / "last.pt"), weights(run / "last.pt")
    for name in reference_weights:
        torch.testing.assert_close(resumed[name], reference_weights[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("contiguous_s, channels_last_s", [(2.0, 1.5), (1.5, 2.0)])
def test_memory_format_is_chosen_by_measurement_and_only_for_long_runs(monkeypatch, contiguous_s, channels_last_s):
    import fullres.run.train
    from fullres.run.train import choose_memory_format

    job = JobConfig(model=ModelConfig(filters=2), shape=(16, 16, 16), batch=1)
    cpu = torch.device("cpu")
    unchanged, line = choose_memory_format(job, cpu, total_steps=10)
    assert unchanged == job and "too short" in line
    asked = job.with_(strategy=Strategy(channels_last=True))
    assert choose_memory_format(asked, cpu, total_steps=1000) == (asked, "memory format: channels-last (asked for)")
    timed = []

    def fake_time_variant(job_, variant, **kwargs):
        timed.append(variant.channels_last)
        return {"step_s": channels_last_s if variant.channels_last else contiguous_s}

    monkeypatch.setattr(fullres.run.train, "time_variant", fake_time_variant)
    chosen, line = choose_memory_format(job, cpu, total_steps=1000)
    assert sorted(timed) == [False, True]
    assert chosen.strategy.channels_last == (channels_last_s < contiguous_s)
    assert chosen.with_(strategy=job.strategy) == job  # only the memory format may change
    assert f"{contiguous_s:.2f} s/step contiguous, {channels_last_s:.2f} s/step channels-last" in line


def test_memory_format_trial_really_times_both_formats():
    from fullres.run.train import choose_memory_format

    job = JobConfig(model=ModelConfig(filters=2), shape=(16, 16, 16), batch=1)
    chosen, line = choose_memory_format(job, torch.device("cpu"), total_steps=1000)
    assert "s/step contiguous" in line and "s/step channels-last" in line
    assert chosen.strategy.channels_last == line.startswith("memory format: channels-last")


# ---- cross-validation folds and the validation summary ------------------------------------------------------

def test_fold_trains_on_its_split_and_scores_its_validation_cases(train_msd, tmp_path, cli):
    from fullres.data.layouts import load_dataset
    from fullres.data.msd import fold_splits

    run = tmp_path / "fold1"
    code, out, err = cli("train", train_msd, "--out", run, "--epochs", "1", "--folds", "3", "--fold", "1",
                         "--tracker", "none", *TINY)
    assert code == 0, err
    splits = json.loads((run / "splits.json").read_text())
    ids = sorted(case.case_id for case in load_dataset(train_msd).training)
    assert len(splits) == 3 and all(set(fold) == {"train", "val"} for fold in splits)
    assert sorted(c for fold in splits for c in fold["val"]) == ids  # each case validated in exactly one fold
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == ids and fold["val"] == sorted(fold["val"])
    # stable: the same for the case ids in any order, and for another fold's run of the same dataset and seed
    assert fold_splits(ids[::-1], 3, 0) == fold_splits(ids, 3, 0) == splits
    assert fold_splits(ids, 3, 1) != splits
    config = TrainConfig.from_json(json.loads((run / "config.json").read_text()))
    assert (config.folds, config.fold) == (3, 1)
    val = splits[1]["val"]
    assert sorted(p.name for p in (run / "validation").glob("*.nii.gz")) == [f"{c}.nii.gz" for c in val]
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert {"folds", "fold", "checkpoint", "cases", "mean", "std"} <= set(summary)
    assert (summary["folds"], summary["fold"], summary["checkpoint"]) == (3, 1, "best.pt")
    assert set(summary["cases"]) == set(val)
    assert set(summary["mean"]["WT"]) == {"dice", "nsd", "hd95"}
    assert "validation: " in out
    # resuming checks the recorded split
    (run / "splits.json").write_text(json.dumps(splits[::-1]))
    code, _, err = cli("train", "--out", run, "--resume", "--epochs", "2", "--quiet")
    assert code == 2 and "splits.json: the split of" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("train", "--out", run, "--resume", "--fold", "2", "--quiet")
    assert code == 2 and "--fold 2 differs from the run's 1" in err


@pytest.mark.parametrize("flags, message", [
    (["--folds", "3", "--fold", "3"], "--fold 3 is out of range for --folds 3 (0..2)"),
    (["--fold", "1"], "--fold 1 needs --folds K"),
    (["--folds", "1"], "--folds must be at least 2, got 1"),
    (["--folds", "7"], "--folds 7: the dataset has 6 training case(s)"),
    (["--folds", "3", "--val-fraction", "0.3"], "--val-fraction and --folds both choose"),
])
def test_bad_folds_are_refused(train_msd, tmp_path, cli, flags, message):
    code, _, err = cli("train", train_msd, "--out", tmp_path / "run", *flags, *TINY)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_configs_from_before_folds_load_as_the_single_split(train_msd, tmp_path, cli):
    from fullres.data.preprocess import DataConfig

    job = JobConfig(model=ModelConfig(in_channels=4, filters=2), shape=(32, 32, 24), batch=1)
    saved = TrainConfig(job=job, data=DataConfig(shape=(32, 32, 24)), data_dir=str(train_msd)).to_json()
    del saved["folds"], saved["fold"]
    config = TrainConfig.from_json(saved)
    assert (config.folds, config.fold) == (0, 0)
    with pytest.raises(ValueError, match="out of range"):
        replace(config, folds=2, fold=2)
