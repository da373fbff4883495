"""Memory of a training job: estimators (pluggable by name) and the planner that uses them."""

from __future__ import annotations

from typing import Callable

from fullres.config import JobConfig
from fullres.memory.table1 import table1

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2}


def table1_training_bytes(job: JobConfig, device: str = "cpu") -> int:
    """Whitepaper Table 1: (weights + every layer's output, once) x bytes per value x 2 for training.

    Only precision changes it (4 or 2 bytes per value); the other strategies are invisible to it.
    """
    return table1(job.model, job.shape, job.batch, BYTES_PER_VALUE[job.strategy.precision]).training_bytes


def dryrun_training_bytes(job: JobConfig, device: str = "cpu") -> int:
    """The real peak of a training step on `device` (fake tensors, nothing allocated): see
    fullres.memory.dryrun, with this network's runtime term as measured on this machine (cached; see
    fullres.memory.runtime). "cuda" needs a CUDA build of torch."""
    from fullres.memory.dryrun import dryrun  # imports the fake-tensor machinery only when asked

    return dryrun(job, device=device, runtime="measured").peak_bytes


# Each method maps a job to the bytes it needs to train; `plan` and the training preflight pick one by name.
ESTIMATORS: dict[str, Callable[..., int]] = {
    "table1": table1_training_bytes,
    "dryrun": dryrun_training_bytes,
}


def estimate_training_bytes(job: JobConfig, method: str, device: str = "cpu") -> int:
    """Bytes `job` needs to train on `device` ("cpu" or "cuda"; Table 1's method ignores it)."""
    if method not in ESTIMATORS:
        raise ValueError(f"unknown estimation method {method!r}: choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[method](job, device=device)
