"""`fullres plan`: does a job fit a memory budget; the largest batch and shape that do; slab and
spatial options, and with --optimize time the exact strategies ranked by step time."""

from __future__ import annotations

import argparse
import sys

from fullres.cli.commands import HELP
from fullres.cli.options import (
    add_budget_arguments,
    add_job_arguments,
    add_memory_device_argument,
    job_budget_and_device,
)
from fullres.cli.report import print_json, slab_lines, spatial_lines
from fullres.errors import UserError
from fullres.units import format_bytes


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help=HELP["plan"])
    add_job_arguments(plan)
    add_budget_arguments(plan, required=True)
    plan.add_argument("--method", choices=("table1", "dryrun"), default="dryrun",
                      help="dryrun (default): the real peak of a training step, on fake tensors (seconds per "
                           "estimate); table1: the paper's hand method (Table 2's verdicts)")
    plan.add_argument("--optimize", choices=("memory", "time"), default="memory",
                      help="time: also rank the exact strategies that fit by estimated step time (calibrated here)")
    add_memory_device_argument(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    job, budget, device = job_budget_and_device(args, required=True)
    from fullres.cost.dryrun import cuda_modelled_parts, cuda_stand_in
    from fullres.cost.plan import plan, slab_options, slab_schedules, spatial_options

    result = plan(job, budget, args.method, device)
    ranking = None
    if args.optimize == "time" and cuda_stand_in(device):
        raise UserError("--optimize time calibrates step times on the GPU itself: no GPU is visible here")
    if args.optimize == "time":
        from fullres.cost.plan import format_ranking, ranking_report
        from fullres.kernels.device import Process, configure_cpu
        configure_cpu(0, Process())  # calibrated with the threads train uses, so train reads the same cache
        ranking = ranking_report(job, budget, args.method, device)
    options, spatial = [], []
    if args.method == "dryrun" and not result.fits and not job.strategy.coarse_slabs:
        from tqdm import tqdm

        # minutes at full resolution: a bar on a terminal (tqdm stays silent where stderr is not one)
        options = slab_options(job, budget, device, progress=lambda schedules: tqdm(
            schedules, desc="plan: slab schedules (a dry run and a FLOP count each)", unit="schedule",
            file=sys.stderr, leave=False, disable=None))
    if args.method == "dryrun" and not result.fits:
        spatial = spatial_options(job, budget, args.method, device)
    modelled = cuda_modelled_parts(cuda_stand_in(device)) if device == "cuda" and args.method == "dryrun" else ()
    if args.json:
        print_json({**result.to_json(), **({"ranking": ranking} if ranking is not None else {}),
                    **({"device": device, "modelled": list(modelled)} if modelled else {}),
                    **({"gpu": args.gpu.name} if args.gpu is not None else {}),
                    **({"slab_options": [option.to_json() for option in options]} if options else {}),
                    **({"spatial_options": [option.to_json() for option in spatial]} if spatial else {})})
        return 0
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    print(f"Job: {job.describe()} (method: {result.method}" + (f", on {args.gpu.name}" if args.gpu else
                                                                 ", on CUDA" if device == "cuda" else "") + ")")
    print(f"Needs {format_bytes(result.required_bytes)} of {format_bytes(result.budget_bytes)}: {verdict}, "
          f"margin {format_bytes(result.margin_bytes)}")
    print(f"Largest batch at {' x '.join(map(str, job.shape))}: {result.max_batch or 'none (batch 1 does not fit)'}")
    shape = ' x '.join(map(str, result.max_shape)) if result.max_shape else "none (not even 16 voxels a side fits)"
    print(f"Largest shape at batch {job.batch}: {shape}")
    deeper = bool(options) and not options[-1].recompute_inputs and len(options) < len(slab_schedules(job))
    for line in slab_lines(options, deeper) + spatial_lines(spatial):
        print(line)
    if ranking is not None:
        print("\n".join(format_ranking(ranking)))
    if modelled:
        print("Modelled, not measured:")
        for part in modelled:
            print(f"  {part}")
    return 0
