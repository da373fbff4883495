"""Any network: the dry run against measured peaks, and what each network needs at BraTS size.

    python benchmarks/networks.py accuracy OUT [--precisions fp32 bf16] [--networks ...] [--strategies ...]
    python benchmarks/networks.py table OUT [--precisions fp32] [--networks ...]
    python benchmarks/networks.py split OUT [--networks ...]

`accuracy`: for each network at two shapes, under each of --strategies (none, checkpointing, and slabs: the
first every-level schedule `plan` offers, where the network can run in slabs), the dry run's peak (as
`fullres estimate --method dryrun` computes it, runtime term included) against two real training steps in
a fresh process (`fullres profile`'s measurement), channels-last, batch 1. Writes OUT/accuracy.csv and
prints a row per job.

`table`: for each network at BraTS size (240x240x144, or the nearest shape the network takes) and at its
usual patch, the dry-run peak per sample under each exact strategy, the largest cubic patch (batch 2,
checkpointing) that fits 24 GiB and 80 GB, and the usual patch at batch 2 on CUDA in bf16 (the dry run, no
runtime term; it needs a CUDA build of torch, not a GPU) beside nnU-Net's own estimate where the network is
nnU-Net's. Writes OUT/table.csv.

`split`: for each network at its two shapes without a strategy (channels-last, in each of --precisions, where
it runs under fullres's CPU pool), where the dry run misses: the pool's reserved bytes after two real steps
(its own counters, in a fresh process) against the dry run's replay of them, and the rest of the measured
peak RSS (outside the pool: oneDNN's own buffers, glibc, code) against the dry run's runtime term. Writes
OUT/split.csv.

Everything goes through fullres's public API (`fullres.cost.estimate`, `fullres.cost.measure`,
`fullres.cost.plan`).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from fullres.job.config import JobConfig, Strategy
from fullres.errors import UserError
from fullres.cost.estimate import dryrun_estimate
from fullres.cost.measure import measure_peak
from fullres.cost.plan import plan, slab_schedules, with_slabs
from fullres.nets.registry import ModelConfig
from fullres.terms import nearest_valid_sizes
from fullres.nets.registry import build_on_meta, spatial_divisor
from fullres.nets.families import nnunet_vram_estimate

# name -> (model args, two shapes for the accuracy goal, usual patch); in_channels 4, 3 region outputs
NETWORKS = {
    "unet3d": ("", [(64, 64, 64), (96, 96, 64)], (128, 128, 128)),
    "intel-unet": ("", [(64, 64, 64), (96, 96, 64)], (144, 144, 144)),
    "monai:SegResNet": ("", [(64, 64, 64), (96, 96, 64)], (128, 128, 128)),
    "monai:BasicUNet": ("", [(64, 64, 64), (96, 96, 64)], (128, 128, 128)),
    "monai:DynUNet": ("", [(64, 64, 64), (96, 96, 64)], (128, 128, 128)),
    "monai:UNet": ("", [(64, 64, 64), (96, 96, 64)], (128, 128, 128)),
    "monai:UNETR": ("", [(64, 64, 64), (96, 96, 64)], (96, 96, 96)),
    "monai:SwinUNETR": ('{"feature_size": 48}', [(64, 64, 64), (96, 96, 64)], (96, 96, 96)),
    "nnunet:PlainConvUNet": ("", [(64, 64, 64), (96, 96, 64)], (128, 128, 128)),
    "nnunet:ResidualEncoderUNet": ("", [(64, 64, 64), (96, 96, 64)], (128, 128, 128)),
}
BRATS = (240, 240, 144)


def model_config(name: str, args: str) -> ModelConfig:
    extra = {"norm": "batch", "filters": 16, "dropout": 0.0} if name == "intel-unet" else {}
    return ModelConfig(architecture=name, args=args, in_channels=4, classes=3, **extra)


def machine() -> dict:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "python": platform.python_version()}


def accuracy(out: Path, networks: list[str], precisions: list[str],
             strategies: tuple[str, ...] = ("none", "checkpointing")) -> None:
    rows = []
    print(json.dumps(machine()))
    print(f"{'network':<24}{'shape':<10}{'strategy':<36}{'dry run':>10}{'measured':>10}{'error':>8}")
    for name in networks:
        args, shapes, _ = NETWORKS[name]
        for shape in shapes:
            for precision in precisions:
                for strategy in strategies:
                    job = JobConfig(model=model_config(name, args), shape=shape, batch=1,
                                    strategy=Strategy(checkpointing=strategy != "none", precision=precision,
                                                      channels_last=True))
                    if strategy == "slabs":  # the plan's first every-level schedule, where the network has one
                        schedules = slab_schedules(job)
                        if not schedules:
                            continue
                        job = with_slabs(job, schedules[0])
                    start = time.perf_counter()
                    estimate = dryrun_estimate(job).peak_bytes
                    measured = measure_peak(job, steps=2, threads=torch.get_num_threads()).measured_bytes
                    error = (estimate - measured) / measured
                    row = {"network": name, "shape": "x".join(map(str, shape)), "strategy": job.strategy.describe(),
                           "dryrun_bytes": estimate, "measured_bytes": measured, "error": error,
                           "seconds": time.perf_counter() - start}
                    rows.append(row)
                    print(f"{name:<24}{row['shape']:<10}{row['strategy']:<36}{estimate / 1e9:>9.3f}G"
                          f"{measured / 1e9:>9.3f}G{error * 100:>+7.1f}%", flush=True)
    _write(out / "accuracy.csv", rows)
    within = sum(abs(row["error"]) <= 0.05 for row in rows)
    print(f"{within} of {len(rows)} within +-5 %")


def nearest_shape(shape: tuple[int, int, int], divisor: int) -> tuple[int, int, int]:
    return tuple(nearest_valid_sizes(size, divisor)[0] for size in shape)


def table(out: Path, networks: list[str], precisions: list[str]) -> None:
    rows = []
    print(json.dumps(machine()))
    strategies = {"none": {}, "checkpointing": {"checkpointing": True}}
    for name in networks:
        args, _, patch = NETWORKS[name]
        config = model_config(name, args)
        brats = nearest_shape(BRATS, spatial_divisor(config))
        for precision in precisions:
            row = {"network": name, "precision": precision, "brats_shape": "x".join(map(str, brats)),
                   "patch": "x".join(map(str, patch))}
            for label, shape in (("brats", brats), ("patch", patch)):
                for strategy, settings in strategies.items():
                    job = JobConfig(model=config, shape=shape, batch=1,
                                    strategy=Strategy(precision=precision, channels_last=True, **settings))
                    try:
                        row[f"{label}_{strategy}_bytes"] = dryrun_estimate(job).peak_bytes
                    except (UserError, ValueError) as error:
                        row[f"{label}_{strategy}_bytes"] = f"refused: {error}"
            cube = JobConfig(model=config, shape=patch, batch=2,
                             strategy=Strategy(precision=precision, channels_last=True, checkpointing=True))
            for budget_name, budget in (("24GiB", 24 * 2**30), ("80GB", 80 * 10**9)):
                result = plan(cube, budget, "dryrun")
                row[f"largest_cube_batch2_{budget_name}"] = "x".join(map(str, result.max_shape)) if result.max_shape else "none"
            gpu = JobConfig(model=config, shape=patch, batch=2, strategy=Strategy(precision="bf16", channels_last=True))
            row["patch_batch2_cuda_bf16_bytes"] = (dryrun_estimate(gpu, device="cuda").peak_bytes
                                                   if torch.backends.cuda.is_built() else "needs a CUDA build of torch")
            row["patch_batch2_nnunet_own_bytes"] = nnunet_vram_estimate(build_on_meta(config, patch), patch, 2) or ""
            rows.append(row)
            print(json.dumps(row), flush=True)
    _write(out / "table.csv", rows)


POOL_STEPS = """
import json, sys, torch
from fullres.job.config import JobConfig
from fullres.kernels import cpu_pool
from fullres.cost.flops import random_batch
from fullres.engine.losses import LOSSES
from fullres.job.step import build_training, train_step
from fullres.nets.registry import build_model
job = JobConfig.from_json(json.loads(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))
cpu_pool.install()
torch.manual_seed(0)
model = build_model(job.model, job.shape)
training = build_training(job, "cpu", model=model)
images, targets = random_batch(job, torch.device("cpu"))
for _ in range(2):
    train_step(model, training.optimizer, images, targets, LOSSES["dice"], job.strategy, training.scaler)
print(cpu_pool.stats().peak_reserved)
"""


def split(out: Path, networks: list[str], precisions: list[str]) -> None:
    rows = []
    print(json.dumps(machine()))
    print(f"{'network':<28}{'':<5}{'shape':<10}{'pool: dry / real':>22}{'outside: dry / real':>24}{'total error':>12}")
    for name, precision in ((name, precision) for name in networks for precision in precisions):
        args, shapes, _ = NETWORKS[name]
        for shape in shapes:
            job = JobConfig(model=model_config(name, args), shape=shape, batch=1,
                            strategy=Strategy(channels_last=True, precision=precision))
            dry = dryrun_estimate(job)
            if dry.allocator != "pool":
                print(f"{name}: not under the pool here ({dry.allocator})")
                continue
            reserved = int(subprocess.run([sys.executable, "-c", POOL_STEPS, json.dumps(job.to_json()),
                                           str(torch.get_num_threads())], capture_output=True, text=True,
                                          check=True).stdout.split()[-1])
            measured = measure_peak(job, steps=2, threads=torch.get_num_threads()).measured_bytes
            row = {"network": name, "precision": precision, "shape": "x".join(map(str, shape)),
                   "dry_pool_bytes": dry.reserved_bytes, "real_pool_bytes": reserved,
                   "dry_outside_bytes": dry.peak_bytes - dry.reserved_bytes, "real_outside_bytes": measured - reserved,
                   "error": (dry.peak_bytes - measured) / measured}
            rows.append(row)
            print(f"{name:<28}{precision:<5}{row['shape']:<10}"
                  f"{dry.reserved_bytes / 1e6:>10.1f} / {reserved / 1e6:>7.1f} MB"
                  f"{row['dry_outside_bytes'] / 1e6:>12.1f} / {row['real_outside_bytes'] / 1e6:>7.1f} MB"
                  f"{row['error'] * 100:>+11.1f}%", flush=True)
    _write(out / "split.csv", rows)


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("accuracy", "table", "split"))
    parser.add_argument("out", type=Path)
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    parser.add_argument("--strategies", nargs="+", default=["none", "checkpointing"],
                        choices=("none", "checkpointing", "slabs"), help="accuracy: the strategies measured")
    args = parser.parse_args()
    if args.what == "accuracy":
        accuracy(args.out, args.networks, args.precisions, tuple(args.strategies))
    elif args.what == "split":
        split(args.out, args.networks, args.precisions)
    else:
        table(args.out, args.networks, args.precisions)
    return 0


if __name__ == "__main__":
    sys.exit(main())
