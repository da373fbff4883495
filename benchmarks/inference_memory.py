"""The inference dry run against a measured forward: one forward (+ sigmoid) of the paper's network under
torch.no_grad(), as `fullres predict` runs it, in this fresh process; its peak RSS above the RSS after the
imports against `fullres.cost.dryrun.dryrun_inference` (docs/deploy.md).

    python benchmarks/inference_memory.py H W D [--filters F] [--slabs S] [--channels-last] [--threads T]

Prints one JSON line: measured bytes, the dry run's (with and without its CPU runtime constant), the error.
"""

from __future__ import annotations

import argparse
import json

import torch

from fullres.job.config import JobConfig, Strategy
from fullres.cost.dryrun import dryrun_inference
from fullres.nets.registry import ModelConfig
from fullres.nets.registry import build_model
from fullres.job.step import prepare_model, to_device


def status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", nargs=3, type=int)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--slabs", type=int, default=1)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    job = JobConfig(model=ModelConfig(filters=args.filters), shape=tuple(args.shape), batch=1,
                    strategy=Strategy(slabs=args.slabs, channels_last=args.channels_last))
    base = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # resets VmHWM to the current RSS
    model = prepare_model(build_model(job.model, job.shape).eval(), job.strategy)
    image = torch.randn(1, job.model.in_channels, *job.shape)
    with torch.no_grad():
        probabilities = torch.sigmoid(model(to_device(image, torch.device("cpu"), job.strategy)).float())
        del probabilities
    measured = status("VmHWM") - base
    estimate = dryrun_inference(job)
    print(json.dumps({"shape": list(job.shape), "filters": args.filters, "slabs": args.slabs,
                      "channels_last": args.channels_last, "measured_bytes": measured,
                      "dryrun_bytes": estimate.peak_bytes, "runtime_bytes": estimate.breakdown["runtime"],
                      "error": (estimate.peak_bytes - measured) / measured}))


if __name__ == "__main__":
    main()
