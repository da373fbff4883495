"""`fullres estimate`: the memory a training job needs (Table 1 or the dry run), and with --time its
wall time on this machine."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fullres.cli.commands import HELP
from fullres.cli.options import (
    add_budget_arguments,
    add_job_arguments,
    add_memory_device_argument,
    fraction,
    job_budget_and_device,
    positive_int,
)
from fullres.cli.report import print_json
from fullres.errors import UserError
from fullres.presets import PAPER
from fullres.units import format_bytes

if TYPE_CHECKING:
    from fullres.job.config import JobConfig


def add_parser(commands) -> None:
    estimate = commands.add_parser("estimate", help=HELP["estimate"])
    add_job_arguments(estimate)
    estimate.add_argument("--bytes-per-value", type=positive_int, default=None,
                          help="bytes per stored value (default: 4 for fp32, 2 for bf16/fp16)")
    estimate.add_argument("--method", choices=("table1", "dryrun"), default="table1",
                          help="table1: the paper's hand method; dryrun: one real training step on fake tensors")
    estimate.add_argument("--time", action="store_true",
                          help="also the training wall time, from a short calibration on this machine (cached)")
    estimate.add_argument("--cases", type=positive_int, default=None, help="with --time: labelled cases")
    estimate.add_argument("--epochs", type=positive_int, default=PAPER.epochs, help="with --time: epochs (paper: 25)")
    estimate.add_argument("--val-fraction", type=fraction, default=PAPER.val_fraction, help="with --time: validation share")
    estimate.add_argument("--threads", type=int, default=0, help="with --time: CPU threads (default: physical cores)")
    estimate.add_argument("--recalibrate", action="store_true", help="with --time: measure again, ignoring the cache")
    add_memory_device_argument(estimate)
    add_budget_arguments(estimate)
    estimate.add_argument("--json", action="store_true", help="machine-readable output")
    estimate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    job, budget, device = job_budget_and_device(args)
    from fullres.cost.estimate import BYTES_PER_VALUE
    from fullres.cost.table1 import table1

    if args.time:
        return print_time_estimate(job, args)
    if args.method == "dryrun":
        return print_dryrun(job, args.json, device, budget, args.gpu.name if args.gpu else None)
    if budget is not None:
        raise UserError("--memory and --gpu compare the dry run's estimate with the budget: add --method dryrun "
                        "(or use `fullres plan`)")
    bytes_per_value = args.bytes_per_value or BYTES_PER_VALUE[job.strategy.precision]
    table = table1(job.model, job.shape, job.batch, bytes_per_value)
    if args.json:
        print_json(table.to_json())
        return 0
    header = f"{'Layer (type)':<32}{'Batch':>6}{'H':>5}{'W':>5}{'D':>5}{'Maps':>6}{'Weights':>12}{'Feature map size':>18}{'Params':>18}{'Memory (MB)':>14}"
    print(f"Table 1 method: {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} base filters, {bytes_per_value} bytes per value")
    print(header)
    print("-" * len(header))
    for r in table.rows:
        print(f"{f'{r.layer} ({r.type})':<32}{r.batch:>6}{r.height:>5}{r.width:>5}{r.depth:>5}{r.feature_maps:>6}"
              f"{r.trainable_weights:>12,}{r.feature_map_size:>18,}{r.params:>18,}{r.memory_mb:>14,.2f}")
    print("-" * len(header))
    print(f"{'Total':<58}{table.trainable_weights:>12,}{table.feature_map_size:>18,}{table.params:>18,}{table.size_mb:>14,.2f}")
    print(f"\nForward (every layer's output once): {table.size_mb:,.2f} MB = {format_bytes(table.size_mb * 1e6)}")
    print(f"Double for training:                 {table.training_mb:,.2f} MB = {format_bytes(table.training_mb * 1e6)}")
    return 0


def print_dryrun(job: JobConfig, as_json: bool, device: str = "cpu", budget: int | None = None,
                 gpu: str | None = None) -> int:
    """The dry run's estimate of `job` on `device`; with a `budget` (bytes, of the GPU named `gpu`), whether
    it fits."""
    from fullres.cost.dryrun import CUDA_CONTIGUOUS_NOTE, GLIBC_HEAP_NOTE
    from fullres.cost.estimate import dryrun_estimate

    result = dryrun_estimate(job, device)
    note = None
    if device == "cuda" and not job.strategy.channels_last:
        note = CUDA_CONTIGUOUS_NOTE
    elif device == "cpu" and result.allocator == "default":
        note = GLIBC_HEAP_NOTE
    fit = {} if budget is None else {"budget_bytes": budget, "fits": result.peak_bytes <= budget,
                                     **({"gpu": gpu} if gpu else {})}
    if as_json:
        print_json({**result.to_json(), **({"note": note} if note else {}), **fit})
        return 0
    print(f"Dry run: one training step of {job.describe()}, Adam, on {gpu or device}")
    print(f"Peak: {format_bytes(result.peak_bytes)} at {result.peak_at}"
          + (f" (allocator: {result.allocator})" if device == "cpu" else ""))
    for term, size in result.breakdown.items():
        print(f"  {term:<16}{format_bytes(size)}")
    if result.reserved_bytes is not None:
        what = "max_memory_reserved" if device == "cuda" else "fullres's CPU pool"
        print(f"Reserved by the caching allocator ({what}): {format_bytes(result.reserved_bytes)}")
    if result.reference_kernels:
        print("warning: oneDNN runs these weight gradients on its reference kernel on this CPU (~1000x slower; past "
              "its 1 GiB scratchpad): " + "; ".join(result.reference_kernels) + ". --slabs or the contiguous layout "
              "avoid it (docs/performance.md)")
    if budget is not None:
        verdict = "FITS" if fit["fits"] else "DOES NOT FIT"
        print(f"Budget {format_bytes(budget)}{f' ({gpu})' if gpu else ''}: {verdict}, margin "
              f"{format_bytes(budget - result.peak_bytes)}")
    if result.modelled:
        print("Modelled, not measured:")
        for part in result.modelled:
            print(f"  {part}")
    if note:
        print(f"note: {note}")
    return 0


def print_time_estimate(job: JobConfig, args: argparse.Namespace) -> int:
    """The paper's promise: plug in the dataset size and epochs, get memory and time (measured here)."""
    from fullres.cost.estimate import estimate_training_bytes
    from fullres.cost.timing import estimate_time
    from fullres.kernels.device import Process, configure_cpu, memory_device

    if args.cases is None:
        raise UserError("--time needs --cases N (labelled cases in the dataset)")
    configure_cpu(args.threads, Process())  # calibration is keyed by threads: use what train uses
    result = estimate_time(job, args.cases, args.epochs, args.val_fraction, refresh=args.recalibrate)
    result["memory_bytes"] = estimate_training_bytes(job, args.method, memory_device(args.device))
    result["memory_method"] = args.method
    if args.json:
        print_json(result)
        return 0
    hours = result["total_s"] / 3600
    source = (f"extrapolated by FLOPs from {' x '.join(map(str, result['extrapolated_from']))}"
              if result.get("extrapolated_from") else "measured on this job")
    print(f"Job: {job.describe()}")
    print(f"Memory ({args.method}): {format_bytes(result['memory_bytes'])}")
    print(f"Step: {result['step_s']:.2f} s ({source}{', cached' if result.get('cached') else ''}); "
          f"validation forward: {result['forward_s']:.2f} s")
    print(f"{result['steps_per_epoch']} steps/epoch x {result['epochs']} epochs: training {result['train_s'] / 3600:.2f} h "
          f"+ validation {result['validation_s'] / 3600:.2f} h = {hours:.2f} h on this machine")
    return 0
