"""A job's training memory by name of method, and the `fullres profile` comparison.

Extension point: :data:`ESTIMATORS` maps a method name (``--method``) to ``f(job, device) -> bytes``;
`plan`, the training preflight and `estimate --time` pick one by name.

* ``table1``: the whitepaper's hand method (:mod:`fullres.cost.table1`).
* ``dryrun``: the real peak of a training step on fake tensors (:mod:`fullres.cost.dryrun`), with the
  network's runtime term measured on this machine (:mod:`fullres.cost.runtime`) on CPU.
"""

from __future__ import annotations

from typing import Callable

import torch

from fullres.cost import runtime
from fullres.cost.dryrun import CUDA_RUNTIME_BYTES, DryRunResult, dryrun
from fullres.cost.measure import measure_peak, measure_spatial_peaks
from fullres.cost.table1 import table1
from fullres.errors import UserError
from fullres.job.config import JobConfig
from fullres.kernels.device import avx512
from fullres.kernels.malloc import policy_for, prepare_pool_for

BYTES_PER_VALUE = {"fp32": 4, "bf16": 2, "fp16": 2}


def table1_training_bytes(job: JobConfig, device: str = "cpu") -> int:
    """Whitepaper Table 1: (weights + every layer's output, once) x bytes per value x 2 for training.

    Only precision changes it (4 or 2 bytes per value); the other strategies are invisible to it.
    """
    return table1(job.model, job.shape, job.batch, BYTES_PER_VALUE[job.strategy.precision]).training_bytes


def dryrun_estimate(job: JobConfig, device: str = "cpu", loss: str = "dice", spatial: int = 1,
                    spatial_index: int | None = None, context: bool = True) -> DryRunResult:
    """The dry run of `job` on `device` with its runtime term: on CPU the one this network and strategy
    measured on this machine (cached after the first time; a subprocess of a few seconds before), on
    CUDA the context's modelled constant :data:`fullres.cost.dryrun.CUDA_RUNTIME_BYTES` (none with
    `context` False: what max_memory_allocated counts). A CUDA job needs no GPU here (fake CPU tensors
    stand in: :func:`fullres.cost.dryrun.cuda_stand_in`). `spatial` = S: one of S processes sharing each
    sample (`spatial_index`: which; default the largest with two neighbours). A dry run already made in this
    process with the same inputs (job, device, loss, process, runtime term, allocator policy, thread count,
    CPU features) is answered from memory: `plan` and `--strategy auto` meet the same candidates more than
    once."""
    kind = torch.device(device).type
    try:
        term = runtime.measured_runtime_bytes(job) if kind == "cpu" else \
            CUDA_RUNTIME_BYTES if kind == "cuda" and context else 0
        allocator = policy_for(job.strategy, device)
        # the thread count and the CPU's features choose kernels and their buffers
        key = (job, device, loss, spatial, spatial_index, term, allocator, torch.get_num_threads(), avx512())
        if key not in _DRY_RUNS:
            if len(_DRY_RUNS) >= 256:  # a long-lived process (a notebook, the test suite) keeps the latest
                _DRY_RUNS.pop(next(iter(_DRY_RUNS)))
            _DRY_RUNS[key] = dryrun(job, loss=loss, device=device, runtime=term, spatial=spatial,
                                    spatial_index=spatial_index, allocator=allocator)
        return _DRY_RUNS[key]
    except ValueError as error:  # a network the dry run cannot follow: one line, not a traceback
        raise UserError(str(error)) from None


_DRY_RUNS: dict[tuple, DryRunResult] = {}


def dryrun_training_bytes(job: JobConfig, device: str = "cpu") -> int:
    """The real peak of a training step on `device` (fake tensors, nothing allocated; "cuda" needs no GPU)."""
    return dryrun_estimate(job, device).peak_bytes


ESTIMATORS: dict[str, Callable[..., int]] = {
    "table1": table1_training_bytes,
    "dryrun": dryrun_training_bytes,
}


def estimate_training_bytes(job: JobConfig, method: str, device: str = "cpu") -> int:
    """Bytes `job` needs to train on `device` ("cpu" or "cuda"; Table 1's method ignores it)."""
    if method not in ESTIMATORS:
        raise ValueError(f"unknown estimation method {method!r}: choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[method](job, device=device)


def profile(job: JobConfig, loss: str = "dice", device: str = "cpu", steps: int = 2) -> dict:
    """Estimate (dry run) and measurement (real steps in a fresh process) of one job on `device`:
    ``{"measured_bytes", "estimated_bytes", "error"}`` with ``error = (estimated - measured) / measured``,
    the device, the caching allocator's reserved bytes (CUDA; None on CPU) and each step's seconds."""
    prepare_pool_for(job.strategy, device)  # the measured child runs under it: the dry run must know if it can
    estimated = dryrun_estimate(job, device, loss, context=False).peak_bytes  # as max_memory_allocated counts
    peak = measure_peak(job, steps=steps, loss=loss, device=device)
    measured = peak.measured_bytes
    return {"measured_bytes": measured, "estimated_bytes": estimated, "error": (estimated - measured) / measured,
            "device": device, "reserved_bytes": peak.reserved_bytes, "step_seconds": peak.step_seconds}


def profile_spatial(job: JobConfig, spatial: int, loss: str = "dice", steps: int = 2) -> list[dict]:
    """:func:`profile` of each of `spatial` CPU processes sharing every sample (``train --spatial S``): per
    rank, its rows, the dry run of that process (its shard, halos included) and its measured peak, from
    S fresh processes run together (:func:`fullres.cost.measure.measure_spatial_peaks`)."""
    prepare_pool_for(job.strategy, "cpu")
    estimates = [dryrun_estimate(job, "cpu", loss, spatial=spatial, spatial_index=k).peak_bytes
                 for k in range(spatial)]
    ranks = []
    for rank, (estimated, peak) in enumerate(zip(estimates, measure_spatial_peaks(job, spatial, steps, loss))):
        measured = peak.measured_bytes
        ranks.append({"rank": rank, "rows": peak.extra["rows"], "measured_bytes": measured,
                      "estimated_bytes": estimated, "error": (estimated - measured) / measured,
                      "step_seconds": peak.step_seconds, "threads": peak.threads})
    return ranks
