"""`train`'s memory preflight judges the job that will run: after the memory-format trial, under the
allocator that job gets (the CPU pool for fp32 channels-last, glibc's default for contiguous).

The trial's timing and the estimator are replaced (a recorder that answers by layout), so that each
budget decides the outcome; training then runs for real, in a subprocess (the allocator is the
process's)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

MiB = 2**20

RUN = """
import json, sys
from dataclasses import replace
import fullres.cost.plan as plan
import fullres.run.train as train
from fullres.cli import main
from fullres.kernels import cpu_pool
from fullres.kernels.malloc import policy_for

data, out, budget = sys.argv[1:4]
judged = []

def estimate(job, method, device="cpu"):
    if method != "table1":  # a refusal's suggestions are sized by Table 1, whatever the preflight's method
        judged.append([job.strategy.channels_last, policy_for(job.strategy, device)])  # what the dry run models
    return (200 if job.strategy.channels_last else 100) * 2**20

def trial(job, device, total_steps):  # the measurement said: channels-last is faster
    return job.with_(strategy=replace(job.strategy, channels_last=True)), "memory format: channels-last (measured)"

plan.estimate_training_bytes = estimate
train.choose_memory_format = trial
code = main(["train", data, "--out", out, "--epochs", "1", "--shape", "16", "16", "16", "--filters", "2",
             "--batch", "1", "--workers", "0", "--threads", "1", "--memory", budget, "--quiet"])
print(json.dumps({"code": code, "judged": judged, "installed": cpu_pool.installed(),
                  "channels_last": json.load(open(out + "/config.json"))["job"]["strategy"]["channels_last"]}))
"""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "msd"
    done = subprocess.run([sys.executable, "-m", "fullres", "synth", str(folder), "--cases", "4", "--test-cases", "1",
                           "--shape", "16", "16", "16", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return folder


def train_with_budget(dataset, out, budget_mib):
    done = subprocess.run([sys.executable, "-c", RUN, str(dataset), str(out), f"{budget_mib}MiB"],
                          capture_output=True, text=True, env={**os.environ, "FULLRES_MALLOC": ""})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def pool_here() -> bool:
    return sys.platform.startswith("linux") and shutil.which(os.environ.get("CXX") or "g++") is not None


def test_the_layout_the_trial_picks_is_checked_again_under_its_allocator(dataset, tmp_path):
    result, _ = train_with_budget(dataset, tmp_path / "run", 250)
    pool = "pool" if pool_here() else "default"
    # first the job as asked (contiguous: glibc's default), then the trial's pick under the pool it will get
    assert result["judged"] == [[False, "default"], [True, pool]]
    assert (result["code"], result["channels_last"], result["installed"]) == (0, True, pool == "pool")


def test_a_faster_layout_that_does_not_fit_is_not_taken(dataset, tmp_path):
    result, _ = train_with_budget(dataset, tmp_path / "run", 150)
    assert result["judged"] == [[False, "default"], [True, "pool" if pool_here() else "default"]]
    assert (result["code"], result["channels_last"], result["installed"]) == (0, False, False)
