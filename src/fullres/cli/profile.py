"""`fullres profile`: a training step's measured peak memory against its dry run."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from fullres.cli.commands import HELP
from fullres.cli.options import (
    add_job_arguments,
    add_memory_device_argument,
    job_from_args,
    positive_int,
)
from fullres.cli.report import print_json
from fullres.errors import UserError
from fullres.units import format_bytes

if TYPE_CHECKING:
    from fullres.job.config import JobConfig


def add_parser(commands) -> None:
    profile = commands.add_parser("profile", help=HELP["profile"])
    add_job_arguments(profile)
    profile.add_argument("--steps", type=positive_int, default=2, help="training steps to run (the 2nd is the peak)")
    profile.add_argument("--spatial", type=positive_int, default=1, metavar="S",
                         help="S processes share each sample, as train --spatial: each rank's peak against its dry run")
    add_memory_device_argument(profile)
    profile.add_argument("--json", action="store_true", help="machine-readable output")
    profile.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.cost.estimate import profile
    from fullres.kernels.device import memory_device

    job = job_from_args(args)
    device = memory_device(args.device)
    if args.spatial > 1:
        return _profile_spatial(args, job, device)
    result = profile(job, steps=args.steps, device=device)
    if args.json:
        print_json(result)
        return 0
    print(f"Job: {job.describe()}; {args.steps} real training steps")
    print(f"estimated (dry run): {format_bytes(result['estimated_bytes'])}")
    print(f"measured ({'max_memory_allocated' if device == 'cuda' else 'peak RSS above post-import RSS'}): "
          f"{format_bytes(result['measured_bytes'])}"
          + (f" (reserved by the caching allocator: {format_bytes(result['reserved_bytes'])})" if device == "cuda" else ""))
    print(f"error: {result['error'] * 100:+.1f} %")
    return 0


def _profile_spatial(args: argparse.Namespace, job: JobConfig, device: str) -> int:
    from fullres.cost.estimate import profile_spatial
    from fullres.cost.plan import check_spatial

    if device != "cpu":
        raise UserError(f"--spatial {args.spatial}: profile starts its processes on this CPU (--device cpu); on "
                        "GPUs, train under torchrun logs each epoch's peak")
    try:
        check_spatial(job, args.spatial)
    except ValueError as error:
        raise UserError(str(error)) from None
    ranks = profile_spatial(job, args.spatial, steps=args.steps)
    if args.json:
        print_json({"spatial": args.spatial, "ranks": ranks})
        return 0
    print(f"Job: {job.describe()}; {args.steps} real training steps, each "
          f"sample shared by {args.spatial} processes (gloo, {ranks[0]['threads']} thread(s) each)")
    print(f"{'rank':>4}  {'rows':>11}  {'dry run':>22}  {'measured (peak RSS above imports)':>34}  error")
    for rank in ranks:
        lo, hi = rank["rows"]
        print(f"{rank['rank']:>4}  {f'{lo}..{hi}':>11}  {format_bytes(rank['estimated_bytes']):>22}  "
              f"{format_bytes(rank['measured_bytes']):>34}  {rank['error'] * 100:+.1f} %")
    return 0
