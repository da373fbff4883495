"""Slabs for any network (fullres.engine.tape): dry-run peaks and counted FLOPs.

    python benchmarks/generic_slabs.py paper [--shape 240 240 144] [--schedules 16,8,4,2 32,16,8,4]
    python benchmarks/generic_slabs.py network MODEL --shape H W D --schedule 64,32,16,8 [--recompute-inputs 1]
        [--channels 1] [--classes 4] [--precision fp32]
    python benchmarks/generic_slabs.py spatial --shape 1024 1024 1024 --runs 64:8,4,2 8:64,32,16,8

`paper`: the paper's network (unet3d, instance norm, 4 channels, batch 1, fp32, channels-last) under each
slab schedule, by its own schedule and through the generic tape (the same module wrapped so that it does
not announce a schedule of its own): the dry-run peak without the runtime term (fullres.cost.dryrun.dryrun
with runtime=0: the term is measured by a real step, minutes for a slabbed job on a few cores) and the step's
FLOPs on fake tensors (fullres.cost.timing.fake_step_flops), a row each.

`network`: one network's dry-run peak and FLOPs without slabs and with the schedule (one training step,
Adam): the figures for a large volume, where a real step takes hours on a few cores.

`spatial`: the paper's network (4 channels, instance norm, fp32, contiguous, batch 1) shared by S processes,
each its rows in slabs (S:SCHEDULE, slabs within shards through the tape): one process's dry-run peak with
this machine's runtime term (fullres.cost.estimate.dryrun_estimate with spatial=S, the process with the most
rows and two neighbours), a row each.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch
from torch import nn

from fullres.cost.dryrun import dryrun
from fullres.cost.estimate import dryrun_estimate
from fullres.cost.plan import with_slabs
from fullres.cost.timing import fake_step_flops
from fullres.job.config import JobConfig, Strategy
from fullres.nets.registry import MODELS, ModelConfig, ModelSpec, build_model, register_model


def _tape_unet3d(config: ModelConfig, shape) -> nn.Module:
    # Wrapped, the module has no `slabs` attribute: prepare_model runs it through its tape.
    return nn.Sequential(build_model(replace(config, architecture="unet3d"), shape))


def measure(job: JobConfig, runtime: bool = True) -> dict:
    start = time.perf_counter()
    peak = dryrun_estimate(job).peak_bytes if runtime else dryrun(job, runtime=0).peak_bytes
    flops = fake_step_flops(job)
    return {"describe": job.describe(), "peak_gib": peak / 2**30, "tflop": flops / 1e12,
            "seconds": round(time.perf_counter() - start, 1)}


def counts(text: str) -> tuple[int, ...]:
    return tuple(int(c) for c in text.split(","))


def paper(shape: tuple[int, int, int], schedules: list[tuple[int, ...]]) -> None:
    if "unet3d-tape" not in MODELS:
        register_model(ModelSpec("unet3d-tape", _tape_unet3d, "the paper's network through the generic tape",
                                 divisor=lambda config: 8))
    for schedule in schedules:
        for architecture in ("unet3d", "unet3d-tape"):
            job = JobConfig(model=ModelConfig(architecture=architecture, in_channels=4, norm="instance"),
                            shape=shape, batch=1, strategy=Strategy(channels_last=True))
            row = {"network": architecture, "schedule": ",".join(map(str, schedule)),
                   **measure(with_slabs(job, schedule), runtime=False)}
            print(json.dumps(row), flush=True)


def network(model: str, shape, schedule, recompute: int, channels: int, classes: int, precision: str) -> None:
    job = JobConfig(model=ModelConfig(architecture=model, in_channels=channels, classes=classes), shape=shape,
                    batch=1, strategy=Strategy(precision=precision))
    for candidate in (job, with_slabs(job, schedule, recompute)):
        print(json.dumps({"network": model, **measure(candidate)}), flush=True)


def spatial(shape, runs: list[str]) -> None:
    for run in runs:
        processes, schedule = run.split(":")
        schedule = counts(schedule)
        job = JobConfig(model=ModelConfig(in_channels=4, norm="instance"), shape=shape, batch=1,
                        strategy=Strategy(slabs=schedule[0], coarse_slabs=",".join(map(str, schedule[1:]))))
        start = time.perf_counter()
        peak = dryrun_estimate(job, spatial=int(processes)).peak_bytes
        print(json.dumps({"spatial": int(processes), "describe": job.describe(), "per_process_gb": peak / 1e9,
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("paper", "network", "spatial"))
    parser.add_argument("model", nargs="?", default="")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 144])
    parser.add_argument("--schedules", type=counts, nargs="+", default=[(16, 8, 4, 2), (32, 16, 8, 4)])
    parser.add_argument("--schedule", type=counts, default=(16, 8, 4, 2))
    parser.add_argument("--recompute-inputs", type=int, default=0)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--runs", nargs="+", default=["64:8,4,2", "8:64,32,16,8"], help="PROCESSES:SCHEDULE")
    args = parser.parse_args()
    print(json.dumps({"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                      "threads": torch.get_num_threads()}))
    if args.what == "paper":
        paper(tuple(args.shape), args.schedules)
    elif args.what == "spatial":
        spatial(tuple(args.shape), args.runs)
    else:
        network(args.model, tuple(args.shape), args.schedule, args.recompute_inputs, args.channels, args.classes,
                args.precision)
    return 0


if __name__ == "__main__":
    sys.exit(main())
