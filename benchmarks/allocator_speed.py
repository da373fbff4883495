"""fullres's CPU pool against glibc's default allocator, timed in one process with the steps alternated.

Separate processes on a shared 2-core machine differ by several percent from run to run; alternating the
two allocators step by step in one process (the pool installed and uninstalled between steps; every
tensor returns to the allocator that made it) cancels that drift. Both halves train the same model with
the same inputs; the first pair is warm-up. Reports each step's wall time, system time and minor page
faults, and the ratio of the medians.

    python benchmarks/allocator_speed.py --shape 64 64 64 --filters 32 --batch 1 --pairs 4
    python benchmarks/allocator_speed.py --shape 48 48 32 --filters 8 --batch 2 --norm instance --pairs 6 --inner 5
"""

from __future__ import annotations

import argparse
import resource
import shlex
import statistics
import sys
import time

import torch

from fullres.bench import _loss, _make_batch, machine_info
from fullres.config import JobConfig, ModelConfig, Strategy
from fullres.memory import cpu_pool
from fullres.model import UNet3D
from fullres.step import make_grad_scaler, prepare_model, to_device, train_step
from fullres.train import Process, configure_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("H", "W", "D"))
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--norm", default="none")
    parser.add_argument("--pairs", type=int, default=4, help="timed pairs (one more is warm-up)")
    parser.add_argument("--inner", type=int, default=1, help="steps per timed half (averaged)")
    args = parser.parse_args(argv)

    cpu_line = configure_cpu(0, Process())
    job = JobConfig(model=ModelConfig(in_channels=4, filters=args.filters, norm=args.norm), shape=tuple(args.shape),
                    batch=args.batch, strategy=Strategy(channels_last=True))
    machine = machine_info("cpu")
    print(f"$ {shlex.join(['python', 'benchmarks/allocator_speed.py', *(sys.argv[1:] if argv is None else argv)])}")
    print(f"date: {machine['date']}; machine: {machine['cpu']}, {cpu_line}; torch {machine['torch']}")
    strategy = job.strategy
    torch.manual_seed(0)
    model = prepare_model(UNet3D(job.model), strategy)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(strategy, "cpu")
    images, targets = _make_batch(job, torch.device("cpu"))
    images = to_device(images, torch.device("cpu"), strategy)
    loss_fn = _loss()
    times: dict[str, list[float]] = {"pool": [], "glibc": []}
    for index in range(args.pairs + 1):
        for name in ("pool", "glibc") if index % 2 == 0 else ("glibc", "pool"):
            cpu_pool.install() if name == "pool" else cpu_pool.uninstall()
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(args.inner):
                train_step(model, optimizer, images, targets, loss_fn, strategy, scaler)
            seconds = (time.perf_counter() - start) / args.inner
            after = resource.getrusage(resource.RUSAGE_SELF)
            if index:
                times[name].append(seconds)
            print(f"{'warm-up' if not index else f'pair {index}':>8} {name:<6} {seconds:8.3f} s/step   system "
                  f"{(after.ru_stime - before.ru_stime) / args.inner:6.2f} s   minor faults "
                  f"{(after.ru_minflt - before.ru_minflt) // args.inner:>8}", flush=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"median: pool {medians['pool']:.3f} s, glibc {medians['glibc']:.3f} s; pool / glibc = "
          f"{medians['pool'] / medians['glibc']:.3f}; pool reserved {cpu_pool.stats().peak_reserved / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
