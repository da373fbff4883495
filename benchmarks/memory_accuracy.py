"""Dry-run estimate vs measured peak (fresh subprocess per row) over a sweep of jobs.

    python benchmarks/memory_accuracy.py [--csv out.csv] [--quick] [--threads N] [--max-gib 18]

Rows whose dry run exceeds --max-gib (default 18 GiB of a 24 GiB machine) are skipped and listed.
Peak is the process peak RSS above the RSS right after importing torch and fullres (see
fullres.memory.dryrun). error = (estimate - measured) / measured.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import sys

from fullres.config import JobConfig, Strategy
from fullres.memory.dryrun import dryrun
from fullres.memory.measure import measure_peak
from fullres.model import ModelConfig

SHAPES = [(32, 32, 32), (48, 48, 48), (64, 64, 64), (32, 48, 64), (96, 96, 96), (128, 128, 128), (160, 160, 160),
          (160, 128, 96)]
QUICK_SHAPES = [(32, 32, 32), (48, 48, 48), (32, 48, 64)]


def jobs(shapes, batches, filters):
    for shape, batch, precision, checkpointing in itertools.product(shapes, batches, ("fp32", "bf16"), (False, True)):
        yield JobConfig(model=ModelConfig(filters=filters), shape=shape, batch=batch,
                        strategy=Strategy(precision=precision, checkpointing=checkpointing))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default="memory_accuracy.csv")
    parser.add_argument("--quick", action="store_true", help="shapes <= 64 voxels a side, batch 1")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--max-gib", type=float, default=18.0)
    args = parser.parse_args(argv)
    shapes, batches = (QUICK_SHAPES, (1,)) if args.quick else (SHAPES, (1, 2, 4))
    fields = ["shape", "batch", "precision", "checkpointing", "estimate_mib", "measured_mib", "error", "peak_at",
              "step_s", "threads", "dryrun_s"]
    skipped, errors = [], []
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        print(" ".join(f"{f:>14s}" for f in fields[:7]))
        for job in jobs(shapes, batches, args.filters):
            estimate = dryrun(job)
            label = "x".join(map(str, job.shape))
            if estimate.peak_bytes > args.max_gib * 2**30:
                skipped.append(f"{label} b{job.batch} {job.strategy.describe()}: dry run "
                               f"{estimate.peak_bytes / 2**30:.1f} GiB > {args.max_gib} GiB")
                continue
            measured = measure_peak(job, steps=2, threads=args.threads)
            error = (estimate.peak_bytes - measured.measured_bytes) / measured.measured_bytes
            errors.append(error)
            row = {"shape": label, "batch": job.batch, "precision": job.strategy.precision,
                   "checkpointing": job.strategy.checkpointing, "estimate_mib": round(estimate.peak_bytes / 2**20, 1),
                   "measured_mib": round(measured.measured_bytes / 2**20, 1), "error": round(error, 4),
                   "peak_at": estimate.peak_at, "step_s": round(max(measured.step_seconds), 2),
                   "threads": measured.threads, "dryrun_s": round(estimate.seconds, 2)}
            writer.writerow(row)
            handle.flush()
            print(" ".join(f"{str(row[f]):>14s}" for f in fields[:7]), flush=True)
    for line in skipped:
        print("skipped:", line)
    if errors:
        print(f"max |error| {max(abs(e) for e in errors):.1%} over {len(errors)} rows; CSV: {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
