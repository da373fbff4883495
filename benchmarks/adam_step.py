"""Adam's update on the paper's network (19,735,329 weights, gradients set): torch's default CPU
implementation (the one fullres.job.step.build_training uses) against `fused=True`, alternated in one
process, and how far apart their weights are after the same updates.

    python benchmarks/adam_step.py [--filters 32] [--pairs 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fullres.nets.registry import ModelConfig
from fullres.nets.registry import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    optimizers, models = {}, {}
    for kind in ("default", "fused"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(filters=args.filters))
        generator = torch.Generator().manual_seed(1)
        for parameter in model.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        models[kind] = model
        optimizers[kind] = torch.optim.Adam(model.parameters(), lr=1e-3, **({"fused": True} if kind == "fused" else {}))
        optimizers[kind].step()  # the state tensors exist from here on, as in training
    seconds = {kind: [] for kind in optimizers}
    for _ in range(args.pairs):
        for kind, optimizer in optimizers.items():
            start = time.perf_counter()
            optimizer.step()
            seconds[kind].append(time.perf_counter() - start)
    difference = max((a - b).abs().max().item() for a, b in zip(models["default"].parameters(),
                                                                 models["fused"].parameters()))
    ratios = [f / d for d, f in zip(seconds["default"], seconds["fused"])]
    print(json.dumps({"weights": sum(p.numel() for p in models["default"].parameters()),
                      "threads": args.threads, "torch": torch.__version__,
                      "default_s": seconds["default"], "fused_s": seconds["fused"],
                      "median_default_s": statistics.median(seconds["default"]),
                      "median_fused_s": statistics.median(seconds["fused"]),
                      "fused_over_default": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)},
                      "max_weight_difference": difference}, indent=2))


if __name__ == "__main__":
    main()
