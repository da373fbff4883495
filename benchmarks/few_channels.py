"""The first convolution on oneDNN instead of ATen's slow path (fullres.model.Conv3d), measured in one process.

At batch 1, ATen runs an fp32 CPU convolution with N x C x D x H <= 20480 (conv1a's 4 input channels
below full resolution) through vol2col + GEMM. fullres zero-pads its input channels to 8 so oneDNN
takes it. This script times, interleaved in one process so both see the same machine state:

* the convolution alone (conv1a's shape, forward + weight-gradient backward), and
* whole training steps of the Table 1 network (fp32, channels-last, Adam),

each with the widening on and off, and prints the medians and their ratio.

    python benchmarks/few_channels.py [--shape 64 64 64] [--filters 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fullres.model as model_module
from fullres.config import Strategy
from fullres.metrics import soft_dice_loss
from fullres.model import ModelConfig, UNet3D
from fullres.step import prepare_model, to_device, train_step


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up each)")
    args = parser.parse_args(argv)
    print("$ python benchmarks/few_channels.py " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")

    strategy = Strategy(channels_last=True)
    cpu = torch.device("cpu")
    widen = model_module._few_channels_on_onednn
    variants = {"oneDNN (widened)": widen, "ATen slow path": lambda layer, x: None}

    torch.manual_seed(0)
    layer = prepare_model(model_module.Conv3d(4, args.filters, kernel_size=3, padding=1), strategy)
    x = to_device(torch.randn(1, 4, *args.shape), cpu, strategy)
    gradient = to_device(torch.randn(1, args.filters, *args.shape), cpu, strategy)
    backend = model_module._conv_backend(x, layer.weight, layer.bias, layer)
    wide = F.pad(x, (0, 0, 0, 0, 0, 0, 0, 4))
    wide_backend = model_module._conv_backend(wide, F.pad(layer.weight, (0, 0, 0, 0, 0, 0, 0, 4)), layer.bias, layer)
    print(f"conv1a at {tuple(x.shape)}: ATen picks {backend}; widened to 8 channels: {wide_backend}")

    def conv_once():
        layer.zero_grad()
        layer(x).backward(gradient)

    network = prepare_model(UNet3D(ModelConfig(filters=args.filters)), strategy)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-4)
    targets = (torch.rand(1, 1, *args.shape) > 0.5).float()

    def step_once():
        train_step(network, optimizer, x, targets, soft_dice_loss, strategy)

    for label, once, repeats in (("conv1a forward + backward", conv_once, 5), ("training step", step_once, args.steps)):
        times = {name: [] for name in variants}
        try:
            for repeat in range(repeats + 1):  # the first round warms up
                for name, fn in variants.items():
                    model_module._few_channels_on_onednn = fn
                    seconds = timed(once)
                    if repeat:
                        times[name].append(seconds)
        finally:
            model_module._few_channels_on_onednn = widen
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, values in times.items():
            print(f"{label:27s} {name:18s} median {medians[name]:8.3f} s  (min {min(values):.3f}, max {max(values):.3f})")
        slow, fast = medians["ATen slow path"], medians["oneDNN (widened)"]
        print(f"{label:27s} widened / slow path: {fast / slow:.3f} (saves {slow - fast:.3f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
