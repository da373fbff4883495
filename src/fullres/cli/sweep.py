"""`fullres sweep`: memory over many shapes: sweep.csv, Figure 3 and Figure 5."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.cli.options import (
    add_job_arguments,
    add_memory_device_argument,
    job_from_args,
    memory_size,
    positive_int,
    shape_spec,
)
from fullres.cli.report import refuse_existing, starts_with
from fullres.errors import UserError
from fullres.terms import PRECISIONS
from fullres.units import parse_size


def add_parser(commands) -> None:
    sweep = commands.add_parser("sweep", help=HELP["sweep"])
    add_job_arguments(sweep)
    sweep.add_argument("--shapes", nargs="+", type=shape_spec, required=True, metavar="HxWxD",
                       help="shapes to sweep, e.g. 32 48 64 96x96x64")
    sweep.add_argument("--batches", nargs="+", type=positive_int, default=[1], help="batches to sweep")
    sweep.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32"], help="precisions to sweep")
    sweep.add_argument("--checkpointing-sweep", choices=("off", "on", "both"), default="both",
                       help="sweep without and/or with activation checkpointing")
    sweep.add_argument("--max-measure", type=memory_size, default=parse_size("18GiB"),
                       help="rows whose dry run exceeds this are estimated only (default 18GiB)")
    sweep.add_argument("--no-measure", action="store_true", help="estimates only (seconds, not minutes)")
    sweep.add_argument("--repeats", type=positive_int, default=1,
                       help="measure each job N times, each in a fresh process; the median is compared (under "
                            "glibc's default heap a job's peak varies by a few per cent)")
    add_memory_device_argument(sweep)
    sweep.add_argument("--out", required=True, help="folder for sweep.csv and the figures")
    sweep.add_argument("--overwrite", action="store_true",
                       help="replace files in --out that an earlier sweep did not write")
    sweep.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import csv

    from fullres.kernels.device import memory_device
    from fullres.cost.sweep import CSV_COLUMNS, run_sweep, sweep_jobs, write_sweep_csv
    from fullres.evaluate.figures import (
        figure3_memory_vs_size,
        figure5_estimate_vs_measured,
    )

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for sweep.csv and the figures")
    earlier = starts_with(",".join(CSV_COLUMNS))(out / "sweep.csv")  # an earlier sweep's files may be replaced
    for name in ("sweep.csv", "figure3_memory_vs_size.png", "figure5_estimate_vs_measured.png"):
        refuse_existing(out / name, f"--out {out}:", args.overwrite, lambda path: earlier)
    base = job_from_args(args)
    device = memory_device(args.device)
    try:
        jobs = sweep_jobs(base, args.shapes, args.batches, args.precisions,
                          {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing_sweep])
    except ValueError as error:
        raise UserError(f"--shapes: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'shape':<14}{'batch':>6}  {'strategy':<46}{'Table 1':>12}{'dry run':>12}{'measured':>12}{'error':>9}")

    def show(row) -> None:
        error = row.error(row.dryrun_bytes)
        print(f"{'x'.join(map(str, row.job.shape)):<14}{row.job.batch:>6}  {row.job.strategy.describe():<46}"
              f"{row.table1_bytes / 1e9:>10.2f}GB{row.dryrun_bytes / 1e9:>10.2f}GB"
              + (f"{row.measured_bytes / 1e9:>10.2f}GB{error * 100:>+8.1f}%" if row.measured_bytes else f"{'-':>12}")
              + (f"  (median of {row.repeats}: {row.measured_range[0] / 1e9:.3f}-{row.measured_range[1] / 1e9:.3f} GB)"
                 if row.measured_bytes and row.repeats > 1 else ""),
              flush=True)

    rows, unmeasured = run_sweep(jobs, measure=not args.no_measure, max_measure_bytes=args.max_measure, on_row=show,
                                 device=device, repeats=args.repeats)
    for line in unmeasured:
        print("not measured:", line)
    write_sweep_csv(rows, out / "sweep.csv")
    table = list(csv.DictReader((out / "sweep.csv").open()))
    figure3_memory_vs_size(table, out / "figure3_memory_vs_size.png")
    written = ["sweep.csv", "figure3_memory_vs_size.png"]
    if any(row.measured_bytes for row in rows):
        figure5_estimate_vs_measured(table, out / "figure5_estimate_vs_measured.png")
        written.append("figure5_estimate_vs_measured.png")
        errors = [abs(row.error(row.dryrun_bytes)) for row in rows if row.measured_bytes]
        print(f"dry run: max |error| {max(errors) * 100:.1f} % over {len(errors)} measured rows")
    print(f"wrote {', '.join(written)} in {out}")
    return 0
