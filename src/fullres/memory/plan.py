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


def largest_fitting(fits: Callable[[int], bool], guess: int = 1) -> int:
    """Largest n >= 1 with fits(n), for a monotone `fits` (true then false); 0 if fits(1) is false.

    Gallops from `guess` (steps 1, 2, 4, ... away from it) and then bisects, so a good guess costs a
    few calls of `fits` (each a dry run, for the dry-run method) instead of a search from 1."""
    guess = min(max(1, guess), MAX_SEARCH)
    if fits(guess):  # the answer is guess or above: gallop up
        low, step = guess, 1
        while low + step <= MAX_SEARCH and fits(low + step):
            low, step = low + step, step * 2
        high = min(low + step, MAX_SEARCH + 1)
    else:  # below guess: gallop down
        high, step = guess, 1
        while high - step >= 1 and not fits(high - step):
            high, step = high - step, step * 2
        low = high - step
        if low < 1:
            if not fits(1):
                return 0
            low = 1
    while high - low > 1:  # invariant: fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def scaled_shape(shape: tuple[int, int, int], longest: int) -> tuple[int, int, int]:
    """`shape` scaled so its longest side is `longest` voxels, each side rounded to a multiple of 8."""
    scale = longest / max(shape)
    return tuple(max(DOWNSAMPLING, round(side * scale / DOWNSAMPLING) * DOWNSAMPLING) for side in shape)


def plan(job: JobConfig, budget_bytes: int, method: str, device: str = "cpu") -> Plan:
    """Fit of `job` in `budget_bytes` on `device` ("cpu" or "cuda"), the largest batch at its shape, and the
    largest shape (H, W, D scaled together, multiples of 8) at its batch."""
    required = estimate_training_bytes(job, method, device)

    def batch_fits(batch: int) -> bool:
        return estimate_training_bytes(job.with_(batch=batch), method, device) <= budget_bytes

    def longest_side(steps: int) -> int:
        # From 16 voxels up: at 8 the bottleneck is a single voxel, which instance norm cannot train on.
        return (steps + 1) * DOWNSAMPLING

    def shape_fits(steps: int) -> bool:
        return estimate_training_bytes(job.at_shape(scaled_shape(job.shape, longest_side(steps))), method, device) <= budget_bytes

    # Guesses from a straight line through the job's own estimates at batch 1 and 2: memory is nearly
    # affine in samples, and, at a fixed batch, in voxels. The search then checks around the guess.
    one, two = (estimate_training_bytes(job.with_(batch=b), method, device) for b in (1, 2))
    per_sample = max(two - one, 1)
    fixed = one - per_sample
    batch_guess = (budget_bytes - required) // per_sample + job.batch
    voxel_ratio = max((budget_bytes - fixed) / max(required - fixed, 1), 1e-9)
    side_guess = max(job.shape) * voxel_ratio ** (1 / 3)
    steps = largest_fitting(shape_fits, guess=max(1, round(side_guess / DOWNSAMPLING) - 1))
    return Plan(
        method=method,
        fits=required <= budget_bytes,
        required_bytes=required,
        budget_bytes=budget_bytes,
        max_batch=largest_fitting(batch_fits, guess=int(batch_guess)),
        max_shape=scaled_shape(job.shape, longest_side(steps)) if steps else None,
    )
