"""Paired timing: the decoders' convolution of the concatenation against the concatenation-free form,
conv(up, W_up) + conv(skip, W_skip), that fullres trains with. Two models from the same seed, their
steps interleaved in one process, so both see the same machine state.

    python benchmarks/concat_free.py                                   # 64^3 x 1, 32 filters, channels-last
    python benchmarks/concat_free.py --contiguous
    python benchmarks/concat_free.py --shape 48 48 32 --filters 8 --batch 2 --norm instance --steps 9   # demo job
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fullres.config import JobConfig, Strategy
from fullres.memory.measure import make_batch
from fullres.metrics import soft_dice_loss
from fullres.model import ModelConfig, UNet3D
from fullres.step import prepare_model, to_device, train_step


class Concatenating(UNet3D):
    """The convolution of the materialised concatenation, in training too."""

    def conv_of_concatenation(self, name, concatenate, up, skip):
        return self.conv(name, concatenate(up, skip))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[64, 64, 64])
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--norm", default="none")
    parser.add_argument("--contiguous", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    job = JobConfig(model=ModelConfig(filters=args.filters, norm=args.norm), shape=tuple(args.shape),
                    batch=args.batch, strategy=Strategy(channels_last=not args.contiguous))
    torch.manual_seed(1)
    images, targets = make_batch(job, "cpu")
    images = to_device(images, torch.device("cpu"), job.strategy)
    runs = {}
    for name, network in (("concatenation", Concatenating), ("concatenation-free", UNet3D)):
        torch.manual_seed(0)
        model = prepare_model(network(job.model), job.strategy).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        train_step(model, optimizer, images, targets, soft_dice_loss, job.strategy)  # warm-up
        runs[name] = (model, optimizer, [])
    for _ in range(args.steps):
        for model, optimizer, seconds in runs.values():
            start = time.perf_counter()
            train_step(model, optimizer, images, targets, soft_dice_loss, job.strategy)
            seconds.append(time.perf_counter() - start)
    for name, (_, _, seconds) in runs.items():
        print(f"{name:<20} median {statistics.median(seconds):.3f} s  ({', '.join(f'{s:.2f}' for s in seconds)})")


if __name__ == "__main__":
    main()
