"""Will a job fit a memory budget, and what is the largest batch or shape that does (whitepaper Table 2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fullres.config import JobConfig
from fullres.memory import estimate_training_bytes
from fullres.model import DOWNSAMPLING

MAX_SEARCH = 1 << 20  # no batch or side length beyond a million is searched


@dataclass(frozen=True)
class Plan:
    method: str
    fits: bool
    required_bytes: int
    budget_bytes: int
    max_batch: int  # 0: not even batch 1 fits at this shape
    max_shape: tuple[int, int, int] | None  # None: not even a 16-voxel longest side fits at this batch

    @property
    def margin_bytes(self) -> int:
        return self.budget_bytes - self.required_bytes

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "fits": self.fits,
            "required_mb": self.required_bytes / 1e6,
            "budget_mb": self.budget_bytes / 1e6,
            "margin_mb": self.margin_bytes / 1e6,
            "max_batch": self.max_batch,
            "max_shape": list(self.max_shape) if self.max_shape else None,
        }


def largest_fitting(fits: Callable[[int], bool]) -> int:
    """Largest n >= 1 with fits(n), for a monotone `fits` (true then false); 0 if fits(1) is false."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= MAX_SEARCH and fits(high):
        low, high = high, high * 2
    high = min(high, MAX_SEARCH + 1)
    while high - low > 1:  # invariant: fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def scaled_shape(shape: tuple[int, int, int], longest: int) -> tuple[int, int, int]:
    """`shape` scaled so its longest side is `longest` voxels, each side rounded to a multiple of 8."""
    scale = longest / max(shape)
    return tuple(max(DOWNSAMPLING, round(side * scale / DOWNSAMPLING) * DOWNSAMPLING) for side in shape)


def plan(job: JobConfig, budget_bytes: int, method: str) -> Plan:
    """Fit of `job` in `budget_bytes`, the largest batch at its shape, and the largest shape
    (H, W, D scaled together, multiples of 8) at its batch."""
    required = estimate_training_bytes(job, method)

    def batch_fits(batch: int) -> bool:
        return estimate_training_bytes(job.with_(batch=batch), method) <= budget_bytes

    def longest_side(steps: int) -> int:
        # From 16 voxels up: at 8 the bottleneck is a single voxel, which instance norm cannot train on.
        return (steps + 1) * DOWNSAMPLING

    def shape_fits(steps: int) -> bool:
        return estimate_training_bytes(job.with_(shape=scaled_shape(job.shape, longest_side(steps))), method) <= budget_bytes

    steps = largest_fitting(shape_fits)
    return Plan(
        method=method,
        fits=required <= budget_bytes,
        required_bytes=required,
        budget_bytes=budget_bytes,
        max_batch=largest_fitting(batch_fits),
        max_shape=scaled_shape(job.shape, longest_side(steps)) if steps else None,
    )
