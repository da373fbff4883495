"""FLOPs of a training step and of a validation forward pass, counted by torch's
``torch.utils.flop_counter.FlopCounterMode`` while :func:`fullres.job.step.train_step` really runs.

Only matrix-product operators are counted (convolutions and their backward: 2 x multiply-adds, bias
excluded); the loss, ReLU, pooling, norms and the Adam update are not FLOPs in this sense.

Exact FLOP scaling
------------------
Every counted operator is a convolution whose count is ``2 x batch x C_in x C_out x kernel volume x
voxels`` at its level (output voxels for a convolution, input voxels for a transposed one), and each
level holds ``voxels / 8**level`` voxels. The count of a step is therefore exactly
``effective batch x voxels x (count of one 16^3 sample) / 16^3`` for a fixed network and strategy
(checkpointing's recomputation included), whatever the shape's aspect. :func:`step_flops` counts
one 16^3 sample and scales; :func:`count_step_flops` counts the job as given, and the tests check
that both agree.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from fullres.job.config import JobConfig
from fullres.kernels.onednn import as_asked
from fullres.engine.losses import LOSSES
from fullres.cost.measure import make_batch
from fullres.nets.registry import build_model
from fullres.job.step import build_training, to_device, train_step

UNIT_SHAPE = (16, 16, 16)  # the smallest shape every norm accepts (the 2^3 bottleneck has > 1 voxel)
UNIT_VOXELS = math.prod(UNIT_SHAPE)


def as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_batch(job: JobConfig, device: torch.device, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and {0, 1} targets shaped like the model's output (as `fullres profile` makes them)."""
    if batch is not None:
        job = job.with_(batch=batch, strategy=replace(job.strategy, accumulate=1))
    return make_batch(job, device)


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs that FlopCounterMode counts while `run()` executes (forward, and backward when it runs one),
    with the operations as asked for (:func:`fullres.kernels.onednn.as_asked`)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, as_asked():
        run()
    return int(counter.get_total_flops())


def count_step_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one training step of `job` as given, counted by FlopCounterMode while ``train_step``
    really runs (fresh model, Adam, random inputs of the whole effective batch). Costs one real step."""
    device = as_device(device)
    torch.manual_seed(0)
    training = build_training(job, device)
    model, optimizer = training.model, training.optimizer
    images, targets = random_batch(job, device)
    images = to_device(images, device, job.strategy)
    return count_flops(lambda: train_step(model, optimizer, images, targets, LOSSES["dice"], job.strategy))


def count_forward_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one validation forward pass (batch 1, eval mode, no gradients) at `job`'s shape, counted."""
    device = as_device(device)
    model = build_model(job.model, job.shape).to(device).eval()
    images = torch.zeros(1, job.model.in_channels, *job.shape, device=device)
    with torch.no_grad():
        return count_flops(lambda: model(images))


def _unit_job(job: JobConfig) -> JobConfig:
    """One 16^3 sample, one micro-batch, the same network and checkpointing. Precision and memory layout
    change no count (FlopCounterMode counts by shapes; the tests check it), so the unit runs in fp32,
    contiguous: emulated bf16 on a CPU without native bf16 would make counting seconds slower.
    With slabs the unit keeps the job's H (the slabs' halo rows are recomputed work that depends on H),
    H x 16 x 16: every level's count is then exactly proportional to W x D."""
    shape = UNIT_SHAPE if not job.strategy.slabbed else (job.shape[0], *UNIT_SHAPE[1:])
    return job.with_(shape=shape, batch=1,
                     strategy=replace(job.strategy, accumulate=1, precision="fp32", channels_last=False))


def _scale(unit_count: int, unit: JobConfig, samples: int, voxels: int) -> int:
    unit_voxels = math.prod(unit.shape)
    total = unit_count * samples * voxels
    if total % unit_voxels:  # cannot happen for shapes that are multiples of 8 (see the module docstring)
        raise AssertionError(f"FLOP count {unit_count} does not scale exactly to {voxels} voxels")
    return total // unit_voxels


def step_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one training step of `job` (forward + backward, all micro-batches), counted by
    FlopCounterMode running ``train_step`` on real tensors: on the job itself when it is no bigger than
    its unit, else on the unit (one 16^3 sample; H x 16 x 16 with slabs) and scaled exactly by effective
    batch x voxels / unit voxels (see the module docstring; the tests check the scaling against direct
    counts)."""
    voxels, unit = math.prod(job.shape), _unit_job(job)
    if job.effective_batch * voxels <= math.prod(unit.shape):
        return count_step_flops(job, device)
    return _scale(_unit_flops(unit, "step"), unit, job.effective_batch, voxels)


def forward_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one validation case's forward pass (batch 1) at `job`'s shape, counted (scaled as above)."""
    voxels, unit = math.prod(job.shape), _unit_job(job)
    if voxels <= math.prod(unit.shape):
        return count_forward_flops(job, device)
    return _scale(_unit_flops(unit, "forward"), unit, 1, voxels)


_UNIT_COUNTS: dict[tuple[JobConfig, str], int] = {}


def _unit_flops(unit: JobConfig, kind: str) -> int:
    key = (unit, kind)
    if key not in _UNIT_COUNTS:
        _UNIT_COUNTS[key] = count_step_flops(unit) if kind == "step" else count_forward_flops(unit)
    return _UNIT_COUNTS[key]
