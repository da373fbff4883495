"""Issue 6's accuracy goal: dry-run estimate vs measured peak over 32^3-160^3 (non-cubic too), batch 1-4,
fp32 and bf16, with and without checkpointing. A thin wrapper over `fullres sweep` with that grid.

    python benchmarks/memory_accuracy.py OUT [--quick] [--precisions fp32 bf16] [--max-measure 18GiB] [--repeats N]
    python benchmarks/memory_accuracy.py OUT --recompute A/sweep.csv B/sweep.csv ...

The first form measures (hours on 2 cores for the whole grid; --quick keeps shapes <= 64 a side and
batch 1). Jobs run channels-last, the layout fullres recommends for memory-bound jobs (contiguous
tensors add oneDNN reorder copies: see docs/memory.md). Set FULLRES_MALLOC=fixed to measure every
row under the allocator policy that jobs with checkpointing or slabs get anyway.

The second form merges sweeps run in pieces: it keeps their measurements and recomputes every dry run
with the code as it is now, so the table and Figures 3 and 5 show the estimator that ships. Its runtime
term is the one measured on the machine running it (under its FULLRES_MALLOC): run it where the sweeps ran.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from fullres.cli import main as fullres

SHAPES = ["32", "48", "64", "32x48x64", "96", "96x96x64", "128", "160x128x96", "160"]
QUICK_SHAPES = ["32", "48", "64", "32x48x64"]


def recompute(sources: list[str], out: Path) -> None:
    from fullres.job.config import JobConfig, Strategy
    from fullres.evaluate.figures import figure3_memory_vs_size, figure5_estimate_vs_measured
    from fullres.cost.estimate import table1_training_bytes
    from fullres.cost.estimate import dryrun_estimate
    from fullres.cost.sweep import SweepRow, write_sweep_csv

    rows = []
    for source in sources:
        for raw in csv.DictReader(open(source)):
            strategy = Strategy(checkpointing=raw["checkpointing"] == "True", precision=raw["precision"],
                                channels_last=raw.get("channels_last") == "True", slabs=int(raw.get("slabs") or 1))
            job = JobConfig(shape=tuple(int(v) for v in raw["shape"].split("x")), batch=int(raw["batch"]),
                            strategy=strategy)
            estimate = dryrun_estimate(job)  # the estimate fullres shows: runtime term measured per network
            measured = int(raw["measured_bytes"]) if raw["measured_bytes"] else None
            low, high = raw.get("measured_min_bytes"), raw.get("measured_max_bytes")
            rows.append(SweepRow(job, table1_training_bytes(job), estimate.peak_bytes, measured, estimate.peak_at,
                                 float(raw["step_s"]) if raw.get("step_s") else None, int(raw.get("repeats") or 1),
                                 (int(low), int(high)) if low and high else None))
            row = rows[-1]
            error = f"{row.error(row.dryrun_bytes) * 100:+.1f} %" if measured else "-"
            spread = (f" ({row.repeats} runs: {(row.measured_range[0] - measured) / measured * 100:+.1f}…"
                      f"{(row.measured_range[1] - measured) / measured * 100:+.1f} %)" if row.repeats > 1 and row.measured_range else "")
            print(f"| {raw['shape']} | {job.batch} | {strategy.describe()} | {row.table1_bytes / 1e9:.2f} GB | "
                  f"{row.dryrun_bytes / 1e9:.2f} GB | {(measured or 0) / 1e9:.2f} GB{spread} | {error} |")
    out.mkdir(parents=True, exist_ok=True)
    write_sweep_csv(rows, out / "sweep.csv")
    table = list(csv.DictReader((out / "sweep.csv").open()))
    figure3_memory_vs_size(table, out / "figure3_memory_vs_size.png")
    figure5_estimate_vs_measured(table, out / "figure5_estimate_vs_measured.png")
    errors = [abs(r.error(r.dryrun_bytes)) for r in rows if r.measured_bytes]
    print(f"max |error| {max(errors) * 100:.1f} % over {len(errors)} rows; "
          f"{sum(e <= 0.05 for e in errors)} within +-5 %")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--max-measure", default="18GiB")
    parser.add_argument("--repeats", default="1", help="measurements per job (fresh processes; the median is compared)")
    parser.add_argument("--recompute", nargs="+", metavar="CSV", help="merge these sweep CSVs, re-estimating")
    args = parser.parse_args(argv)
    if args.recompute:
        recompute(args.recompute, Path(args.out))
        return 0
    shapes, batches = (QUICK_SHAPES, ["1"]) if args.quick else (SHAPES, ["1", "2", "4"])
    return fullres(["sweep", "--channels-last", "--shapes", *shapes, "--batches", *batches,
                    "--precisions", *args.precisions, "--checkpointing-sweep", "both",
                    "--max-measure", args.max_measure, "--repeats", args.repeats, "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
