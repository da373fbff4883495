"""One volume across processes (--spatial) against one process: step time, halo traffic, per-process peak.

    torchrun --standalone --nproc-per-node 2 benchmarks/spatial.py --shape 128 128 128   # 2 processes x 1 thread
    python benchmarks/spatial.py --shape 128 128 128 --threads 2 --slabs 2              # 1 process x 2 threads

Each process runs `--warmup` + `--steps` training steps of the paper's network (fp32, channels-last unless
`--contiguous`, batch 1, Adam, soft Dice; one process may run `--slabs N` at full resolution) through fullres.job.step.train_step, as `fullres train --spatial S` does, and prints one JSON line:
its median step time, the halo bytes it sent per step, its peak RSS above its RSS after the imports, and the
dry run of what one process holds (`fullres.cost.dryrun.dryrun(..., spatial=S)`, with this machine's runtime
term).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist

from fullres.cost.steptime import machine_info
from fullres.job.config import JobConfig, Strategy
from fullres.nets.registry import ModelConfig
from fullres.engine.losses import LOSSES
from fullres.cost.dryrun import dryrun
from fullres.kernels.malloc import prepare_pool_for, set_training_malloc_policy
from fullres.cost.runtime import measured_runtime_bytes
from fullres.engine.spatial import local_rows, mesh, reduce_gradients, space_of, sums_over
from fullres.job.step import build_training, to_device, train_step


def rss() -> tuple[int, int]:
    current = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128))
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slabs", type=int, default=1, help="one process: full-resolution slabs")
    parser.add_argument("--contiguous", action="store_true", help="NCDHW maps instead of channels-last")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    job = JobConfig(model=ModelConfig(filters=args.filters), shape=tuple(args.shape), batch=1,
                    strategy=Strategy(channels_last=not args.contiguous, slabs=args.slabs))
    baseline, _ = rss()  # as fullres profile measures: above the RSS right after the imports
    torch.set_num_threads(args.threads)
    prepare_pool_for(job.strategy)
    set_training_malloc_policy(job.strategy)
    space = None
    if world > 1:
        dist.init_process_group("gloo")
        space = space_of(mesh(world), job.shape[0])
    torch.manual_seed(0)
    training = build_training(job, "cpu")
    images = torch.randn(1, 4, *job.shape)
    targets = (torch.rand(1, 1, *job.shape) > 0.9).float()
    if space is not None:
        training.model.space = space
        images, targets = local_rows(images, space), local_rows(targets, space)
    images = to_device(images, torch.device("cpu"), job.strategy)
    update = (lambda: reduce_gradients(training.model.parameters())) if space else None
    times, sent = [], []
    for step in range(args.warmup + args.steps):
        before = space.sent["bytes"] if space else 0
        started = time.perf_counter()
        with sums_over(space):
            train_step(training.model, training.optimizer, images, targets, LOSSES["dice"], job.strategy,
                       before_update=update)
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
            sent.append((space.sent["bytes"] if space else 0) - before)
    _, peak = rss()
    # the dry run after the steps: its memory is not theirs
    estimate = dryrun(job, steps=2, runtime=measured_runtime_bytes(job), spatial=world).peak_bytes
    info = machine_info("cpu")
    print(json.dumps({"processes": world, "threads": args.threads, "rank": dist.get_rank() if space else 0,
                      "strategy": job.strategy.describe(),
                      "shape": list(job.shape), "rows": list(space.rows(0)) if space else [0, job.shape[0]],
                      "step_s": statistics.median(times), "step_s_all": times, "halo_bytes_per_step": sent[-1],
                      "peak_bytes": peak - baseline, "dryrun_bytes": estimate,
                      "dryrun_error": (estimate - (peak - baseline)) / (peak - baseline),
                      "date": info["date"], "cpu": info["cpu"], "isa": info["cpu_capability"], "torch": info["torch"]}),
          flush=True)
    if space:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
