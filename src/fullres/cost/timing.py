"""How long a training run takes on this machine: a short calibration of the job's step and validation
forward pass (cached), extrapolated by counted FLOPs for jobs too big to run here, and the wall time of
``fullres train`` on N cases for E epochs (``fullres estimate --time``).
"""

from __future__ import annotations

import datetime
import os
import socket
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fullres.cost.dryrun import ONEDNN_REFERENCE_FLOPS_PER_S, reference_weight_gradient_flops
from fullres.cost.estimate import table1_training_bytes
from fullres.cost.flops import as_device, forward_flops, random_batch, step_flops, synchronize
from fullres.engine.losses import LOSSES, primary_output
from fullres.errors import UserError
from fullres.files import cache_lookup, cache_store, user_cache_dir
from fullres.job.config import JobConfig
from fullres.job.step import autocast, build_training, to_device, train_step
from fullres.kernels.device import available_memory
from fullres.kernels.malloc import set_training_malloc_policy
from fullres.kernels.onednn import as_asked
from fullres.nets.registry import build_model

DEFAULT_CALIBRATION_FLOPS = 2e11  # at most this many FLOPs per calibration step (seconds on a laptop CPU)
CACHE_FILE = "calibration.json"
CACHE_VERSION = 1


def calibration_job(job: JobConfig, max_flops: float = DEFAULT_CALIBRATION_FLOPS,
                    memory_bytes: int | None = None, device: str | torch.device = "cpu") -> JobConfig:
    """The job itself when one step is at most `max_flops` and (Table 1 estimate) half of `memory_bytes`;
    otherwise a scaled-down copy: the micro-batch halved first (per-sample kernels keep their shapes),
    then accumulation, then the largest spatial axis halved (multiples of 8, at least 16 each)."""
    memory_bytes = available_memory(as_device(device)) if memory_bytes is None else memory_bytes

    def too_big(candidate: JobConfig) -> bool:
        return step_flops(candidate) > max_flops or 2 * table1_training_bytes(candidate) > memory_bytes

    candidate = job
    while too_big(candidate):
        if candidate.batch > 1:
            candidate = candidate.with_(batch=max(1, candidate.batch // 2))
        elif candidate.strategy.accumulate > 1:
            candidate = candidate.with_(strategy=replace(candidate.strategy, accumulate=1))
        else:
            shape = list(candidate.shape)
            axis = max(range(3), key=lambda i: shape[i])
            smaller = max(16, shape[axis] // 2 // 8 * 8)
            if smaller >= shape[axis]:
                break  # 16^3, batch 1: nothing smaller to measure
            shape[axis] = smaller
            candidate = candidate.with_(shape=tuple(shape))
    return candidate


def _cache_key(job: JobConfig, device: torch.device, max_flops: float) -> dict:
    return {"version": CACHE_VERSION, "job": job.to_json(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "hostname": socket.gethostname(), "device": str(device), "max_flops": max_flops}


def _measure(job: JobConfig, device: torch.device, steps: int = 2,
             forwards: int = 2) -> tuple[float, float, float]:
    """(seconds per training step, per validation forward pass, per Adam update) of `job`, measured:
    1 warm-up + `steps` timed ``train_step`` calls (Adam); 2 more ``optimizer.step()`` calls alone (their
    cost grows with the weights, not with batch or voxels, so extrapolation must not scale it); then, as
    ``fullres train`` validates (eval mode, no gradients, batch 1, the job's autocast), 1 warm-up +
    `forwards` timed forward passes."""
    set_training_malloc_policy(job.strategy, device=device.type)  # timed under the allocator `train` uses
    torch.manual_seed(0)
    training = build_training(job, device)
    model, optimizer, scaler = training.model, training.optimizer, training.scaler
    images, targets = random_batch(job, device)
    images, targets = to_device(images, device, job.strategy), targets.to(device)
    loss_fn = LOSSES["dice"]
    seconds = []
    for index in range(1 + steps):
        start = time.perf_counter()
        train_step(model, optimizer, images, targets, loss_fn, job.strategy, scaler)
        synchronize(device)
        if index:
            seconds.append(time.perf_counter() - start)
    update = []
    for _ in range(2):
        start = time.perf_counter()
        optimizer.step()  # the last step's gradients are still there
        synchronize(device)
        update.append(time.perf_counter() - start)
    del images, targets, optimizer
    model.eval()
    image = to_device(random_batch(job, device, batch=1)[0], device, job.strategy)
    forward = []
    with torch.no_grad():
        for index in range(1 + forwards):
            start = time.perf_counter()
            with autocast(job.strategy, device.type):
                primary_output(model(image)).float()
            synchronize(device)
            if index:
                forward.append(time.perf_counter() - start)
    return statistics.median(seconds), statistics.median(forward), min(update)


def calibration(job: JobConfig, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                max_flops: float = DEFAULT_CALIBRATION_FLOPS, refresh: bool = False) -> dict:
    """Seconds per training step and per validation forward pass of `job` on this machine.

    Measured once with a short run (see :func:`_measure`) and cached in ``cache_dir/calibration.json``
    under the (job JSON, torch version, CPU capability, threads, hostname, device) key; later calls
    read the cache (``"cached": true``) unless `refresh`. When one step of the job exceeds `max_flops`
    or its Table 1 memory exceeds half of the available memory, a smaller job
    (:func:`calibration_job`) is measured instead and the times are scaled by the FLOP ratios counted
    by FlopCounterMode (``"extrapolated_from"`` names it), all but the Adam update, which is measured
    on its own and kept as is. Extrapolation assumes the same FLOP/s at both sizes; bigger kernels
    usually run faster, so it tends to overestimate (and cannot see a job that would swap).
    """
    device = as_device(device)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()
    path = cache / CACHE_FILE
    key = _cache_key(job, device, max_flops)
    cached = None if refresh else cache_lookup(path, key)
    if cached is not None:
        return {**cached, "cached": True}

    measured_job = calibration_job(job, max_flops, device=device)
    start = time.perf_counter()
    step_s, forward_s, optimizer_s = _measure(measured_job, device)
    flops = {"step": step_flops(job), "forward": forward_flops(job)}
    measured_flops = {"step": step_flops(measured_job), "forward": forward_flops(measured_job)}
    extrapolated = measured_job != job
    record = {
        # the Adam update does not grow with batch or voxels: only the rest of the step is scaled
        "step_s": min(optimizer_s, step_s) + max(0.0, step_s - optimizer_s) * flops["step"] / measured_flops["step"],
        "forward_s": forward_s * flops["forward"] / measured_flops["forward"],
        "measured_step_s": step_s,
        "measured_forward_s": forward_s,
        "optimizer_s": optimizer_s,
        "step_flops": flops["step"],
        "forward_flops": flops["forward"],
        "extrapolated_from": ({"shape": list(measured_job.shape), "batch": measured_job.batch,
                               "accumulate": measured_job.strategy.accumulate,
                               "step_flops": measured_flops["step"], "forward_flops": measured_flops["forward"]}
                              if extrapolated else None),
        "calibration_s": time.perf_counter() - start,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {**cache_store(path, key, record), "cached": False}


def calibrate(job: JobConfig, cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
              max_flops: float = DEFAULT_CALIBRATION_FLOPS) -> float:
    """Seconds per training step of `job` on this machine (see :func:`calibration`; cached)."""
    return calibration(job, cache_dir, device, max_flops)["step_s"]


def split_sizes(cases: int, val_fraction: float) -> tuple[int, int]:
    """(train, validation) case counts exactly as ``fullres train`` splits (fullres.data.msd.split_cases)."""
    n_val = round(cases * val_fraction)
    if val_fraction > 0 and cases >= 2:
        n_val = min(max(n_val, 1), cases - 1)
    elif cases < 2:
        n_val = 0
    return cases - n_val, n_val


def estimate_time(job: JobConfig, cases: int, epochs: int, val_fraction: float = 0.2,
                  cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                  max_flops: float = DEFAULT_CALIBRATION_FLOPS, refresh: bool = False) -> dict:
    """Wall time of ``fullres train`` on `cases` labelled cases for `epochs` epochs, one process.

    Cases split as train splits them; each epoch runs ``floor(train cases / effective batch)`` steps
    (the trainer drops the last incomplete batch) and one forward pass per validation case.
    ``train_s = steps_per_epoch x epochs x step_s``, ``validation_s = val_cases x epochs x forward_s``,
    both measured by :func:`calibration`. Data loading (overlapped with compute by the loader workers),
    checkpoint writes and the final overlays are not included.
    """
    if cases < 1 or epochs < 1:
        raise UserError(f"cases and epochs must be >= 1, got {cases} and {epochs}")
    if not 0 <= val_fraction < 1:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    train_cases, val_cases = split_sizes(cases, val_fraction)
    steps = train_cases // job.effective_batch
    if steps == 0:
        raise UserError(f"{train_cases} training cases are fewer than one batch of {job.effective_batch}")
    measured = calibration(job, cache_dir=cache_dir, device=device, max_flops=max_flops, refresh=refresh)
    train_s = steps * epochs * measured["step_s"]
    validation_s = val_cases * epochs * measured["forward_s"]
    return {
        "step_s": measured["step_s"],
        "forward_s": measured["forward_s"],
        "cases": cases,
        "train_cases": train_cases,
        "val_cases": val_cases,
        "effective_batch": job.effective_batch,
        "steps_per_epoch": steps,
        "epochs": epochs,
        "train_s": train_s,
        "validation_s": validation_s,
        "total_s": train_s + validation_s,
        "extrapolated_from": measured.get("extrapolated_from"),
        "cached": measured.get("cached", False),
        "threads": torch.get_num_threads(),
        "excludes": "data loading, checkpoint writes, validation overlays",
    }


# ---- the step time of each memory strategy (`plan --optimize time`, `train --strategy auto`) ----------

class _ScalarsOfFakes(TorchDispatchMode):
    """``.item()`` of a fake tensor (the loss, Adam's step count) answers 1: no data, and FLOPs do not
    depend on it. Also sums the FLOPs that oneDNN would run on its reference kernel on this CPU
    (:func:`fullres.cost.dryrun.reference_weight_gradient_flops`)."""

    def __init__(self) -> None:
        super().__init__()
        self.reference_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0 if args[0].is_floating_point() else 1
        self.reference_flops += reference_weight_gradient_flops(func, args)
        return func(*args, **(kwargs or {}))


_FAKE_COUNTS: dict[JobConfig, tuple[int, int]] = {}  # job -> (its step's FLOPs, those on the reference kernel)


def fake_step_flops(job: JobConfig) -> int:
    """FLOPs of one training step of `job` as given (all micro-batches; checkpointing's and slabs'
    recomputation included), counted by torch's FlopCounterMode while ``train_step`` runs on fake
    tensors (``FakeTensorMode``: shapes only, no memory, no arithmetic), so a full-resolution job costs
    seconds. One micro-batch is counted and multiplied by the accumulation steps: every micro-batch runs
    the same shapes, and the optimizer's update has no counted operator. The same count as
    :func:`fullres.cost.flops.count_step_flops` (tested)."""
    return _fake_counts(job)[0]


def reference_kernel_flops(job: JobConfig) -> int:
    """The FLOPs of :func:`fake_step_flops` that oneDNN would compute with its reference kernel on this CPU
    (channels-last fp32 weight gradients past its scratchpad limit, without AVX-512:
    :func:`fullres.cost.dryrun.onednn_reference_weight_gradient`)."""
    return _fake_counts(job)[1]


def _fake_counts(job: JobConfig) -> tuple[int, int]:
    if job not in _FAKE_COUNTS:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.utils.flop_counter import FlopCounterMode


        micro = job.with_(strategy=replace(job.strategy, accumulate=1))
        counter, scalars = FlopCounterMode(display=False), _ScalarsOfFakes()
        with FakeTensorMode(allow_non_fake_inputs=False), counter, scalars, as_asked():
            model = build_model(micro.model, micro.shape)
            training = build_training(micro, "cpu", model=model)
            images, targets = random_batch(micro, torch.device("cpu"))
            train_step(model, training.optimizer, images, targets, LOSSES["dice"], micro.strategy, training.scaler)
        steps = job.strategy.accumulate
        _FAKE_COUNTS[job] = (int(counter.get_total_flops()) * steps, scalars.reference_flops * steps)
    return _FAKE_COUNTS[job]


def rate_job(job: JobConfig) -> JobConfig:
    """The job whose calibration gives the FLOP rate of `job`'s precision: `job` with no memory strategy
    (no checkpointing, slabs, accumulation or offload), in its precision and memory format."""
    strategy = replace(job.strategy.without_slabs(), checkpointing=False, checkpoint_levels=0, accumulate=1, offload=False)
    return job.with_(batch=job.effective_batch, strategy=strategy)


def strategy_step_seconds(job: JobConfig, cache_dir: str | os.PathLike | None = None,
                          device: str | torch.device = "cpu", max_flops: float = DEFAULT_CALIBRATION_FLOPS) -> dict:
    """Estimated seconds of one training step of `job` under its memory strategy, without running it:
    ``optimizer_s + (step_s - optimizer_s) x FLOPs(job) / FLOPs(calibrated)``, from the cached
    :func:`calibration` of :func:`rate_job` (the job without a memory strategy, in its precision) and
    the FLOPs of `job` counted on fake tensors (:func:`fake_step_flops`), so checkpointing's and slabs'
    recomputed forward costs what its convolutions cost. One calibration per precision and memory
    format serves every strategy. Assumes the same FLOP rate for the recomputed work and for smaller
    micro-batches or slabs, and nothing for the non-convolution work the recomputation repeats. On a CPU,
    the FLOPs oneDNN would run on its reference kernel (:func:`reference_kernel_flops`) cost
    :data:`fullres.cost.dryrun.ONEDNN_REFERENCE_FLOPS_PER_S` instead (the calibration runs a smaller shape,
    where they do not arise).
    Returns ``{"step_s", "step_flops", "reference_flops", "calibrated_step_s", "calibrated_flops",
    "optimizer_s", "cached"}``."""
    measured = calibration(rate_job(job), cache_dir=cache_dir, device=device, max_flops=max_flops)
    flops = fake_step_flops(job)
    reference = reference_kernel_flops(job) if as_device(device).type == "cpu" else 0
    optimizer_s = min(measured["optimizer_s"], measured["step_s"])
    per_flop = (measured["step_s"] - optimizer_s) / measured["step_flops"]
    step_s = optimizer_s + per_flop * (flops - reference) + reference / ONEDNN_REFERENCE_FLOPS_PER_S
    return {"step_s": step_s, "step_flops": flops, "reference_flops": reference,
            "calibrated_step_s": measured["step_s"], "calibrated_flops": measured["step_flops"],
            "optimizer_s": optimizer_s, "cached": measured.get("cached", False)}
