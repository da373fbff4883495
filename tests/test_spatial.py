"""Spatial parallelism (fullres.engine.spatial): processes sharing one volume along H give the whole volume's logits,
gradients and optimizer step, alone and combined with data parallelism (gloo, float64)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from fullres.engine.losses import soft_dice_loss
from fullres.nets.registry import ModelConfig
from fullres.nets.unet3d import UNet3D
from fullres.engine.spatial import shard_bounds
from gloo_workers import run_workers

WORKER = r"""
import sys
from datetime import timedelta
import torch
import torch.distributed as dist
from fullres.engine.losses import soft_dice_loss, voxel_sums
from fullres.nets.registry import ModelConfig
from fullres.nets.unet3d import UNet3D
from fullres.engine.spatial import forward_shards, mesh, reduce_gradients, space_of, sum_over_space

rank, world, spatial, init, out, norm, height, dropout = sys.argv[1:9]
rank, world, spatial, height, dropout = int(rank), int(world), int(spatial), int(height), float(dropout)
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world, timeout=timedelta(seconds=60))
device_mesh = mesh(spatial)
space = space_of(device_mesh, height)
data_index, data_size = device_mesh.get_local_rank("data"), device_mesh.size(0)
torch.manual_seed(0)
model = UNet3D(ModelConfig(in_channels=2, filters=4, norm=norm, dropout=dropout)).double()
images, targets = torch.load(f"{out}/data.pt")
lo, hi = space.rows(0)
x, t = images[data_index:data_index + 1, :, lo:hi], targets[data_index:data_index + 1, :, lo:hi]
if norm == "none":  # channels-last maps and weights (the halos travel as contiguous buffers)
    from fullres.job.config import Strategy
    from fullres.job.step import prepare_model
    prepare_model(model, Strategy(channels_last=True))
    x = x.contiguous(memory_format=torch.channels_last_3d)
logits = forward_shards(model, x, space)
with voxel_sums(lambda total: sum_over_space(total, space)):
    loss = soft_dice_loss(logits, t)
loss.backward()
reduce_gradients(model.parameters(), data_size=data_size)
grads = {name: p.grad.clone() for name, p in model.named_parameters()}
torch.optim.Adam(model.parameters(), lr=1e-2).step()
torch.save({"logits": logits.detach(), "rows": (lo, hi), "sample": data_index, "loss": loss.detach(),
            "grads": grads, "weights": {n: p.detach().clone() for n, p in model.named_parameters()}},
           f"{out}/rank{rank}.pt")
dist.destroy_process_group()
"""


def whole_volume(norm: str, images, targets, dropout: float):
    torch.manual_seed(0)
    model = UNet3D(ModelConfig(in_channels=2, filters=4, norm=norm, dropout=dropout)).double()
    # With dropout, the slabbed forward: its hashed mask is the processes' (any schedule draws the same one,
    # tests/test_slabs.py); nn.Dropout's whole-volume mask is another draw.
    model.slabs = (2, 2, 2, 2) if dropout else 1
    logits = model(images)
    loss = soft_dice_loss(logits, targets)  # a per-sample mean: the batch's loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    torch.optim.Adam(model.parameters(), lr=1e-2).step()
    return logits.detach(), loss.detach(), grads, {n: p.detach() for n, p in model.named_parameters()}


def run_processes(tmp_path, world: int, spatial: int, norm: str, samples: int, height: int, dropout: float):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(samples, 2, height, 8, 8, generator=generator, dtype=torch.float64)
    targets = (torch.rand(samples, 1, height, 8, 8, generator=generator) > 0.7).double()
    torch.save((images, targets), tmp_path / "data.pt")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run_workers(script, world, [spatial, tmp_path / "init", tmp_path, norm, height, dropout])
    return images, targets, [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("world,spatial,norm,samples,height,dropout", [
    (2, 2, "none", 1, 32, 0.0), (2, 2, "instance", 1, 32, 0.3), (4, 4, "instance", 1, 64, 0.0),
    (4, 2, "instance", 2, 32, 0.3)], ids=["2-none", "2-instance-dropout", "4-instance", "2x2-instance-dropout"])
def test_processes_sharing_a_volume_give_the_whole_volume_step(tmp_path, world, spatial, norm, samples, height,
                                                               dropout):
    """Each process's rows of the logits are the whole volume's; every process ends with the whole batch's
    gradients and the same Adam step (2 x 2: two samples, each across two processes)."""
    images, targets, ranks = run_processes(tmp_path, world, spatial, norm, samples, height, dropout)
    logits, loss, grads, weights = whole_volume(norm, images, targets, dropout)
    for result in ranks:
        lo, hi = result["rows"]
        sample = result["sample"]
        torch.testing.assert_close(result["logits"][0], logits[sample, :, lo:hi], rtol=1e-9, atol=1e-12)
        if samples == 1:
            torch.testing.assert_close(result["loss"], loss, rtol=1e-12, atol=1e-12)
        for name in grads:  # atol: a bias before a norm has a gradient of 0 up to rounding
            torch.testing.assert_close(result["grads"][name], grads[name], rtol=1e-9, atol=1e-12, msg=name)
            if grads[name].abs().max() > 1e-10:  # Adam turns such a bias's rounding noise into a step of +-lr
                torch.testing.assert_close(result["weights"][name], weights[name], rtol=1e-9, atol=1e-12, msg=name)


def test_shards_halve_exactly_to_the_coarsest_level():
    assert shard_bounds(64, 4) == [(0, 16), (16, 32), (32, 48), (48, 64)]
    assert shard_bounds(240, 3) == [(0, 80), (80, 160), (160, 240)]
    assert shard_bounds(40, 2) == [(0, 16), (16, 40)]  # 5 units of 8 rows: 2 and 3
    with pytest.raises(ValueError, match=r"--spatial 4: H=48 must be a multiple of 8 with at least 16 rows per "
                                         r"process \(64 in all\)"):
        shard_bounds(48, 4)



@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    from fullres.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("spatial") / "msd", train_cases=4, test_cases=1, shape=(32, 32, 24),
                         seed=3, progress=False)


FLAGS = ["--shape", "32", "32", "24", "--filters", "2", "--workers", "0", "--threads", "1", "--quiet", "--dropout", "0",
         "--lr", "1e-3", "--device", "cpu", "--batch", "1"]


def fullres(*args, processes: int = 1) -> subprocess.CompletedProcess:
    """`fullres ARGS`, or under torchrun with `processes` (loopback, a free port, a time limit)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                 "--local-addr", "127.0.0.1"] if processes > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"}
    try:
        return subprocess.run([*launcher, "-m", "fullres", *map(str, args)], capture_output=True, text=True, env=env,
                              timeout=300)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"fullres {args[0]} did not end in 300 s; its stderr:\n{(error.stderr or b'')[-3000:]!r}")


@pytest.mark.slow
def test_train_with_spatial_equals_one_process_and_resumes_under_another_count(msd, tmp_path):
    """`torchrun --nproc-per-node 2 ... train --spatial 2` ends its epoch with one process's weights; the run then
    resumes in one process (another S) and ends as the one-process run resumed alike."""
    from fullres.run.checkpoint import load_checkpoint

    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := fullres("train", msd, "--out", one, "--epochs", "1", *FLAGS)).returncode == 0, done.stderr
    shared = fullres("train", msd, "--out", two, "--epochs", "1", *FLAGS, "--spatial", "2", processes=2)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert "2 process(es): 1 x 2 sharing each sample" in shared.stdout and "per process" in shared.stdout

    def same_weights():
        a, b = load_checkpoint(one / "last.pt")["model"], load_checkpoint(two / "last.pt")["model"]
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)

    same_weights()
    for run in (one, two):
        assert (done := fullres("train", "--out", run, "--resume", "--epochs", "2", *FLAGS)).returncode == 0, done.stderr
    same_weights()


@pytest.mark.slow
def test_any_network_trains_and_predicts_across_processes_in_slabs(msd, tmp_path):
    """`train --spatial 2` of MONAI's SegResNet, each process's rows in slabs (its recorded tape), ends its epoch
    with the one-process run's losses; `predict --spatial 2` from it writes the one-process masks. (Not its
    weights: Adam's first steps are +-lr whatever a gradient's size, so fp32 rounding in SegResNet's near-zero
    gradients moves a few percent of its weights by up to lr; tests/test_tape_spatial.py checks the gradients.)"""
    import csv
    import numpy as np
    import nibabel as nib

    # --force: the preflight of such a job (its calibration, ~1 min) is tests/test_tape.py's and
    # tests/test_tape_spatial.py's; here the runs' equality is tested
    flags = [*FLAGS, "--model", "monai:SegResNet", "--model-args", '{"init_filters": 8}', "--slabs", "2",
             "--coarse-slabs", "2", "--force"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (done := fullres("train", msd, "--out", one, "--epochs", "1", *flags)).returncode == 0, done.stderr[-3000:]
    shared = fullres("train", msd, "--out", two, "--epochs", "1", *flags, "--spatial", "2", processes=2)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert "2 process(es): 1 x 2 sharing each sample" in shared.stdout
    [a], [b] = (list(csv.DictReader((run / "metrics.csv").open())) for run in (one, two))
    for column in ("train_loss", "val_loss"):  # (not Dice: thresholded, one voxel moves it)
        assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-5), column
    alone = fullres("predict", one, msd, "--out", tmp_path / "p1", "--quiet", "--device", "cpu")
    together = fullres("predict", one, msd, "--out", tmp_path / "p2", "--quiet", "--device", "cpu", "--spatial", "2",
                       processes=2)
    assert alone.returncode == 0 and together.returncode == 0, (alone.stderr + together.stderr)[-3000:]
    masks = sorted((tmp_path / "p1").glob("*.nii.gz"))
    assert masks and [m.name for m in masks] == sorted(m.name for m in (tmp_path / "p2").glob("*.nii.gz"))
    for mask in masks:
        np.testing.assert_array_equal(np.asanyarray(nib.load(mask).dataobj),
                                      np.asanyarray(nib.load(tmp_path / "p2" / mask.name).dataobj), err_msg=mask.name)


def test_spatial_jobs_that_cannot_split_are_refused_before_a_run_folder(msd, tmp_path):
    cases = [(["--spatial", "2"], "--spatial 2 must divide the number of processes (1; start them with torchrun "
                                  "--nproc-per-node)"),
             (["--spatial", "3"], "--spatial 3: H=32 must be a multiple of 8 with at least 16 rows per process (48 in all)"),
             (["--spatial", "2", "--checkpointing"], "--spatial 2: not with --checkpointing or --offload (each process "
                                                     "computes its rows of a level whole or in slabs)")]
    for flags, message in cases:
        out = tmp_path / "refused"
        result = fullres("train", msd, "--out", out, "--epochs", "1", *FLAGS, *flags)
        assert result.returncode != 0 and result.stderr.strip().splitlines()[-1] == f"fullres train: error: {message}"
        assert not out.exists()


def test_plan_says_how_many_processes_a_job_needs(monkeypatch):
    """plan's spatial options: 2, 4, ... processes, each one's dry run (its shard, halos included), up to the
    first that fits; the strategies --spatial does not combine with left out; none where H does not split."""
    import fullres.cost.runtime as runtime
    from fullres.job.config import JobConfig, Strategy
    from fullres.cost.dryrun import dryrun
    from fullres.cost.plan import spatial_need, spatial_options

    monkeypatch.setattr(runtime, "measured_runtime_bytes", lambda job: 0)  # the tensors are what is compared
    job = JobConfig(model=ModelConfig(filters=2), shape=(64, 32, 32), batch=1, strategy=Strategy(checkpointing=True))
    plain = job.with_(strategy=Strategy())
    need = {s: spatial_need(plain, s, "dryrun") for s in (2, 4)}
    assert need[2] == dryrun(plain, spatial=2, runtime=0).peak_bytes
    assert need[4] < need[2] < dryrun(plain, runtime=0).peak_bytes
    [only] = spatial_options(job, need[2], "dryrun")
    assert (only.processes, only.peak_bytes, only.fits) == (2, need[2], True)
    two, four = spatial_options(job, need[4], "dryrun")
    assert (two.processes, two.fits, four.processes, four.fits) == (2, False, 4, True)
    assert [o.processes for o in spatial_options(job, 1, "dryrun")] == [2, 4]  # 64 rows: 16 a process at most 4
    assert spatial_options(JobConfig(shape=(24, 32, 32)), 1, "dryrun") == []
    # slabs within each process's rows: kept, and less than the rows whole
    slabbed = job.with_(strategy=Strategy(checkpointing=True, slabs=4, coarse_slabs="2"))
    first, *_ = spatial_options(slabbed, 1, "dryrun")
    assert (first.processes, first.counts) == (2, (4, 2)) and first.peak_bytes < need[2]
    assert first.to_json()["slabs"] == [4, 2]


def _torchrun_worker(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of `launcher`'s worker process with RANK=`rank`, once it runs."""
    for children in __import__("glob").glob(f"/proc/{launcher.pid}/task/*/children"):
        for pid in open(children).read().split():
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
    return None


@pytest.mark.slow
def test_a_process_that_hangs_ends_the_job_with_one_line_and_the_run_resumes(msd, tmp_path):
    """A rank stopped mid-run (SIGSTOP: it holds its connections but never answers) makes the other one fail its
    next exchange after --timeout seconds with one line naming its rank and the cause; the run then resumes from
    its last checkpoint in one process and ends."""
    import signal
    import time

    run = tmp_path / "run"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--local-addr",
         "127.0.0.1", "-m", "fullres", "train", str(msd), "--out", str(run), "--epochs", "3", *FLAGS,
         "--spatial", "2", "--timeout", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo"})
    try:
        deadline = time.monotonic() + 240
        while not (run / "last.pt").exists() and launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (run / "last.pt").exists(), "no checkpoint within 240 s"
        waiting, stopped = _torchrun_worker(launcher, 0), _torchrun_worker(launcher, 1)
        os.kill(stopped, signal.SIGSTOP)
        while os.path.exists(f"/proc/{waiting}") and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(stopped, signal.SIGKILL)  # torchrun would wait 30 s for the stopped one to take its SIGTERM
        _, stderr = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("fullres train: error: ")]
    # waiting to receive a halo, or to send one (gloo's send waits for the peer's receive)
    pattern = (r"fullres train: error: rank 0 of 2: lost the other processes \(Timed out waiting 5000ms for "
               rf"(recv|send) operation to complete\); after a fix, continue from the last checkpoint with --out "
               rf"{re.escape(str(run))} --resume")
    assert len(lines) == 1 and re.fullmatch(pattern, lines[0]), stderr[-3000:]
    assert "fullres/" not in "".join(line for line in stderr.splitlines() if line.lstrip().startswith("File "))
    from fullres.run.checkpoint import load_checkpoint

    done_before = load_checkpoint(run / "last.pt")["epoch"]
    assert 1 <= done_before < 3
    resumed = fullres("train", "--out", run, "--resume", *FLAGS)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(run / "last.pt")["epoch"] == 3


@pytest.mark.slow
def test_predict_with_spatial_equals_predict_without(msd, tmp_path):
    """`torchrun --nproc-per-node 2 ... predict --spatial 2` writes the masks and probabilities one process
    writes (each volume shared by the two processes, gathered on the first)."""
    import nibabel as nib
    import numpy as np

    run = tmp_path / "run"
    assert (done := fullres("train", msd, "--out", run, "--epochs", "1", *FLAGS, "--norm", "instance")).returncode == 0, \
        done.stderr[-3000:]
    refused = fullres("predict", run, msd, "--out", tmp_path / "refused", "--spatial", "2")
    assert refused.stderr.strip().splitlines()[-1] == ("fullres predict: error: --spatial 2 must divide the number of "
                                                       "processes (1; start them with torchrun --nproc-per-node)")
    assert refused.returncode == 2 and not (tmp_path / "refused").exists()
    one, two = tmp_path / "one", tmp_path / "two"
    assert (alone := fullres("predict", run, msd, "--out", one, "--probabilities", "--quiet",
                             "--device", "cpu")).returncode == 0, alone.stderr[-3000:]
    shared = fullres("predict", run, msd, "--out", two, "--probabilities", "--quiet", "--device", "cpu", "--spatial", "2",
                     processes=2)
    assert shared.returncode == 0, shared.stderr[-3000:]
    assert "whole volumes shared by 2 processes, each its rows of every level (exact)" in shared.stdout
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for mask in one.glob("*.nii.gz"):
        a, b = np.asanyarray(nib.load(mask).dataobj), np.asanyarray(nib.load(two / mask.name).dataobj)
        if mask.name.endswith("_prob.nii.gz"):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=mask.name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=mask.name)
    assert (one / "prediction.json").read_text() == (two / "prediction.json").read_text()


def test_the_spatial_inference_plan_is_one_process_share_and_refused_where_it_cannot_fit():
    import fullres.run.predict as predict_module
    from fullres.job.config import JobConfig, Strategy, TrainConfig
    from fullres.data.preprocess import DataConfig
    from fullres.errors import UserError

    job = JobConfig(model=ModelConfig(in_channels=2, filters=4, norm="instance"), shape=(64, 32, 32), batch=1,
                    strategy=Strategy(checkpointing=True))  # training-only: inference runs without it
    config, cpu = TrainConfig(job=job, data=DataConfig(channels=(0, 1), shape=job.shape), data_dir="unused"), \
        torch.device("cpu")
    whole = predict_module.inference_need(config, (64, 32, 32), cpu)
    share = {s: predict_module.inference_need(config, (64, 32, 32), cpu, spatial=s) for s in (2, 4)}
    # not below `whole` at 4 filters: a shard's split decoder convolutions take ATen's slow path (column buffers)
    assert share[4] < share[2]
    plan = predict_module.plan_inference(config, (64, 32, 32), cpu, budget=share[2], spatial=2)
    assert (plan.mode, plan.need, plan.spatial) == ("spatial", share[2], 2)
    with pytest.raises(UserError) as refused:
        predict_module.plan_inference(config, (64, 32, 32), cpu, budget=share[2] - 1, spatial=2)
    assert refused.value.exit_code == 3 and str(refused.value).startswith(
        "--spatial 2: one of 2 processes sharing a 64x32x32 volume needs ~")
    with pytest.raises(UserError, match=r"^--spatial 5: H=64 must be a multiple of 8 with at least 16 rows per process "
                                        r"\(80 in all\) \(64x32x32 volumes\)$"):
        predict_module.plan_inference(config, (64, 32, 32), cpu, budget=whole, spatial=5)


@pytest.mark.slow
def test_profile_measures_each_process_sharing_a_sample():
    """`profile --spatial 2` runs two processes sharing each sample (one gloo group, as train --spatial) and gives
    each rank's rows, its dry run (that process's shard) and its measured peak."""
    import json

    from fullres.cli.main import build_parser
    from fullres.cli.options import job_from_args
    from fullres.cost.dryrun import dryrun

    flags = ["--shape", "32", "16", "16", "--filters", "2", "--batch", "1", "--norm", "instance", "--device", "cpu"]
    done = fullres("profile", *flags, "--spatial", "2", "--steps", "1", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads(done.stdout)["ranks"]
    assert [(r["rank"], r["rows"]) for r in ranks] == [(0, [0, 16]), (1, [16, 32])]
    job = job_from_args(build_parser().parse_args(["profile", *flags]))
    # each rank's dry run is that process's tensors, plus one runtime term measured for the job
    tensors = [dryrun(job, spatial=2, spatial_index=k, runtime=0).peak_bytes for k in (0, 1)]
    runtime = ranks[0]["estimated_bytes"] - tensors[0]
    assert runtime > 0 and ranks[1]["estimated_bytes"] == tensors[1] + runtime
    for rank in ranks:
        assert rank["measured_bytes"] > 0 and len(rank["step_seconds"]) == 1
    refused = fullres("profile", *flags, "--spatial", "3")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        "fullres profile: error: --spatial 3: H=32 must be a multiple of 8 with at least 16 rows per process (48 in all)")
