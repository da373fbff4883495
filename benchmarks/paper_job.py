"""The paper's job (240x240x144, 4 modalities, effective batch 16, the Table 1 network) on one machine:
its dry-run peak under each exact strategy, and, with --measure, one real full-resolution training step.

    python benchmarks/paper_job.py                      # the strategy table (dry runs: seconds each)
    python benchmarks/paper_job.py --measure --slabs 16 [--coarse-slabs 8,4,2] [--precision bf16]
        # one real step at batch 1 in a fresh process: measured peak RSS and time (minutes)

The paper needed Table 1's 914.8 GB (a 1.5 TB server). The table prints each strategy's peak per sample
(batch 1) and for the whole job (effective batch 16 by accumulation: the 16 inputs are held at once, as
`fullres train` hands the step its whole batch) and the ratio to 914.8 GB.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from fullres.cost.steptime import machine_info
from fullres.job.config import JobConfig, Strategy
from fullres.cost.estimate import table1_training_bytes
from fullres.cost.dryrun import dryrun
from fullres.cost.estimate import dryrun_estimate
from fullres.cost.runtime import measured_runtime_bytes

GIB = 2**30
STRATEGIES = [  # (name, strategy at micro-batch 1)
    ("none", {}),
    ("channels-last", {"channels_last": True}),
    ("checkpointing", {"checkpointing": True}),
    ("checkpointing + channels-last", {"checkpointing": True, "channels_last": True}),
    ("checkpointing + 4 slabs + channels-last", {"checkpointing": True, "slabs": 4, "channels_last": True}),
    ("checkpointing + 8 slabs + channels-last", {"checkpointing": True, "slabs": 8, "channels_last": True}),
    ("checkpointing + 16 slabs + channels-last", {"checkpointing": True, "slabs": 16, "channels_last": True}),
    ("checkpointing + 32 slabs + channels-last", {"checkpointing": True, "slabs": 32, "channels_last": True}),
]


def strategy_table(precisions=("fp32", "bf16")) -> list[dict]:
    paper = table1_training_bytes(JobConfig())
    rows = []
    for precision in precisions:
        for name, settings in STRATEGIES:
            # the estimates fullres shows: each network's runtime term measured on this machine (at 16^3)
            per_sample = dryrun_estimate(JobConfig(batch=1, strategy=Strategy(precision=precision, **settings)))
            job16 = dryrun_estimate(JobConfig(batch=1, strategy=Strategy(precision=precision, accumulate=16, **settings)))
            rows.append({"precision": precision, "strategy": name, "per_sample_bytes": per_sample.peak_bytes,
                         "job_bytes": job16.peak_bytes, "peak_at": job16.peak_at,
                         "paper_ratio": paper / job16.peak_bytes})
    return rows


def measure_step(precision: str, slabs: int, coarse_slabs: str = "") -> dict:
    from fullres.cost.measure import measure_peak

    job = JobConfig(batch=1, strategy=Strategy(checkpointing=True, channels_last=True, slabs=slabs,
                                               coarse_slabs=coarse_slabs, precision=precision))
    estimate = dryrun(job, steps=1, runtime=measured_runtime_bytes(job))  # the estimate fullres shows
    measured = measure_peak(job, steps=1)
    return {"job": job.to_json(), "dryrun_bytes": estimate.peak_bytes, "dryrun_peak_at": estimate.peak_at,
            "measured": measured.to_json(),
            "error": (estimate.peak_bytes - measured.measured_bytes) / measured.measured_bytes,
            "paper_ratio": table1_training_bytes(JobConfig()) / measured.measured_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="run one real full-resolution step (minutes)")
    parser.add_argument("--slabs", type=int, default=16)
    parser.add_argument("--coarse-slabs", default="", metavar="S1,S2,S3", help="slabs of the coarser levels (e.g. 8,4,2)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args()
    print(f"$ python {shlex.join(sys.argv)}")
    machine = machine_info("cpu")
    print(f"{machine['date']}, {machine['cpu']} ({machine['cpu_capability']}), torch {machine['torch']}, "
          f"{machine['threads']} threads")
    if args.measure:
        print(json.dumps(measure_step(args.precision, args.slabs, args.coarse_slabs), indent=1))
        return
    print("| precision | strategy (micro-batch 1) | per sample | job (x16 by accumulation) | 914.8 GB / job | peak at |")
    print("|---|---|---|---|---|---|")
    for row in strategy_table():
        print(f"| {row['precision']} | {row['strategy']} | {row['per_sample_bytes'] / GIB:.2f} GiB | "
              f"{row['job_bytes'] / GIB:.2f} GiB | {row['paper_ratio']:.0f}x | {row['peak_at']} |")


if __name__ == "__main__":
    main()
