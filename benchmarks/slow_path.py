"""ATen's slow convolution path on CPU, and what it costs a slab schedule: memory MKL keeps, and time.

ATen runs an fp32 CPU convolution through oneDNN only when the input is large enough (`use_mkldnn` in
ATen's ConvUtils: batch > 1, a kernel larger than 3, groups, or N x C x D x H > 20480); otherwise its slow
path unfolds the input into columns and multiplies them with MKL's SGEMM. A slab of few rows at batch 1
falls under that rule where the whole volume does not, and so do a network's coarsest levels.

`buffers`: for each network and shape, two real training steps in a fresh process (as `train` runs them,
under the job's allocator policy) and then the bytes MKL's own memory manager holds (`mkl_serv_mem_stat`):
MKL keeps each SGEMM buffer it allocates, per thread, and allocates a new one whenever a request is larger
than any it holds, so what it holds depends on the sequence of slow-path GEMMs, not on the tensors.

`convs`: forward times of convolutions a slab schedule runs, ATen's own choice against oneDNN's kernel on the
same channels-last operands (`aten.mkldnn_convolution`), alternated, median of `--repeats`.

    python benchmarks/slow_path.py buffers --strategies slabs none
    python benchmarks/slow_path.py convs --repeats 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from fullres.cost.plan import slab_schedules, with_slabs
from fullres.job.config import JobConfig, Strategy

from latency import cpu_features  # this folder is on sys.path
from networks import NETWORKS, machine, model_config  # the accuracy table's jobs

CHILD = r"""
import json, sys, torch
from fullres.cost.measure import make_batch
from fullres.engine.losses import LOSSES
from fullres.job.config import JobConfig
from fullres.job.step import build_training, train_step
from fullres.kernels.malloc import mkl_held_buffers, set_training_malloc_policy
job = JobConfig.from_json(json.loads(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]))
policy = set_training_malloc_policy(job.strategy)
torch.manual_seed(0)
training = build_training(job, torch.device("cpu"))
images, targets = make_batch(job, torch.device("cpu"))
held = []
for _ in range(2):
    train_step(training.model, training.optimizer, images, targets, LOSSES["dice"], job.strategy, training.scaler)
    held.append(mkl_held_buffers())
print(json.dumps({"policy": policy, "held": held}))
"""


def buffers(networks: list[str], strategies: list[str], precision: str) -> None:
    print(json.dumps({**machine(), "cpu": cpu_features()}))
    print(f"{'network':<28}{'shape':<10}{'strategy':<58}{'MKL after step 1, 2':>24}")
    for name in networks:
        args, shapes, _ = NETWORKS[name]
        for shape in shapes:
            for strategy in strategies:
                job = JobConfig(model=model_config(name, args), shape=shape, batch=1,
                                strategy=Strategy(checkpointing=strategy != "none", precision=precision,
                                                  channels_last=True))
                if strategy == "slabs":
                    schedules = slab_schedules(job)
                    if not schedules:
                        continue
                    job = with_slabs(job, schedules[0])
                done = subprocess.run([sys.executable, "-P", "-c", CHILD, json.dumps(job.to_json()),
                                       str(torch.get_num_threads())], capture_output=True, text=True)
                if done.returncode:
                    print(f"{name:<28}failed: {done.stderr.strip().splitlines()[-1]}")
                    continue
                held = json.loads(done.stdout.strip().splitlines()[-1])["held"]
                figures = ", ".join(f"{b / 1e6:.1f} MB ({n})" for b, n in held)
                print(f"{name:<28}{'x'.join(map(str, shape)):<10}{job.strategy.describe():<58}{figures:>24}",
                      flush=True)


# (input N, C, H, W, D; output channels; padding) of convolutions that MONAI's UNet and SegResNet run in
# slabs 8,4,2 at 64^3 and 96x96x64, and two whole-volume ones above ATen's rule for comparison
CONVS = [((1, 16, 10, 32, 32), 16, (0, 1, 1)), ((1, 16, 14, 48, 32), 16, (0, 1, 1)),
         ((1, 32, 12, 48, 32), 32, (0, 1, 1)), ((1, 64, 8, 24, 16), 64, (0, 1, 1)),
         ((1, 32, 24, 24, 16), 32, (1, 1, 1)), ((1, 16, 14, 96, 64), 16, (0, 1, 1)),
         ((1, 16, 64, 64, 64), 16, (1, 1, 1))]


def convs(repeats: int) -> None:
    print(json.dumps({**machine(), "cpu": cpu_features()}))
    print(f"{'input':<24}{'out':>4}  {'ATen picks':<12}{'ATen ms':>9}{'oneDNN ms':>11}{'ratio':>8}")
    cl = torch.channels_last_3d
    for shape, out, padding in CONVS:
        x = torch.randn(shape).to(memory_format=cl)
        w = torch.randn(out, shape[1], 3, 3, 3).to(memory_format=cl)

        def aten():
            return torch.ops.aten.convolution(x, w, None, [1] * 3, list(padding), [1] * 3, False, [0] * 3, 1)

        def onednn():
            return torch.ops.aten.mkldnn_convolution(x, w, None, list(padding), [1] * 3, [1] * 3, 1)

        picks = "oneDNN" if aten().is_contiguous(memory_format=cl) else "slow path"
        times = {aten: [], onednn: []}
        for _ in range(repeats):
            for function in (aten, onednn):  # alternated
                start = time.perf_counter()
                function()
                times[function].append(time.perf_counter() - start)
        a, b = statistics.median(times[aten]) * 1e3, statistics.median(times[onednn]) * 1e3
        print(f"{str(shape):<24}{out:>4}  {picks:<12}{a:>9.2f}{b:>11.2f}{a / b:>8.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("buffers")
    one.add_argument("--networks", nargs="+", default=[n for n in NETWORKS if "UNETR" not in n])
    one.add_argument("--strategies", nargs="+", default=["slabs"], choices=("none", "checkpointing", "slabs"))
    one.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    two = sub.add_parser("convs")
    two.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "buffers":
        buffers(args.networks, args.strategies, args.precision)
    else:
        convs(args.repeats)


if __name__ == "__main__":
    main()
