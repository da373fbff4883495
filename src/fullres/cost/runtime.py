"""The dry run's runtime term on CPU, measured per network on this machine and cached.

A training process holds memory that no tensor owns: the modules that building Adam imports, code pages
touched by the first step, oneDNN's primitive cache (one JIT-compiled kernel per convolution shape, so it
grows with the network's channel counts), and what the C allocator keeps under the job's policy (under
the pool, the tensors' segments are the dry run's; glibc still serves what PyTorch does not allocate). It
stops growing with the volume early, so it is measured once per network and strategy on a small volume at
batch 1 (:func:`calibration_shapes`: 16^3 for the paper's network; under the CPU pool and glibc's fixed
thresholds at 64^3 too, where the code its kernels touch at larger volumes counts, interpolated between):
``measured peak - the dry run's tensors``, in a fresh process (``measure_peak``). Under the CPU pool the
pool's own peak (its counters, read in that process) is kept too, and where the replay counts more than the
pool held the term is ``measured peak - the pool's peak``: a replay over at the calibration size (MONAI's
UNet in bf16 at 32^3 was 21 MB over, exact at 64^3) does not lower every larger job's estimate, while one
under (an operator the replay does not know) is still carried as a constant.

Measured on an AVX-512 bf16 CPU (AMD Zen 4; docs/results/memory.md), 32 filters, channels-last: the
constant measured with filters 1 (86.6 MiB) left checkpointed fp32 jobs of 48x32x32 to 96x96x64 3.4-6.9 %
low; their network's own term is 125 MiB and brings them to +0.4..+1.2 %.

Under glibc's default heap (contiguous fp32 jobs and bf16 ones on AMX, without checkpointing or slabs) the
same 16^3 step keeps a different amount each run: 540-562 MB over nine fresh processes for the 32-filter bf16
network on the AVX-512 bf16 CPU. There the term is the median of three measurements, so that one unlucky process
does not bias every later estimate; under the pool and the fixed thresholds a job's peak repeats to within
0.5 MB, and the term is measured once.

So that one job gives the same bytes in every process, the measurement is made once per machine and
cached: processes that need the same term at once wait on a lock beside the cache and read the first
one's measurement, and where the cache folder cannot be written (a read-only home) the term is not
measured at all but the constant :data:`fullres.cost.dryrun.CPU_RUNTIME_BYTES` (and its bf16 part).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import socket
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from fullres.engine.losses import LOSSES
from fullres.job.config import JobConfig
from fullres.job.step import build_training, train_step
from fullres.files import cache_lookup, cache_store, source_digest, user_cache_dir
from fullres.nets.registry import build_on_meta, rebuilt_elsewhere, spatial_divisor
from fullres.cost.dryrun import TERM_HOLDS_FIRST_CALL, dryrun, runtime_bytes
from fullres.kernels import device as fullres_device
from fullres.kernels.malloc import ENV, policy_for, trim_heap
from fullres.cost import measure

CALIBRATION_SHAPE = (16, 16, 16)
# Where peaks repeat (the pool, fixed thresholds), the calibration's side. Under the pool, what a job holds
# outside it (fp32, channels-last, 2 threads, AVX-512 bf16 AMD Zen 4): MONAI's SegResNet 98 MB at 16^3, 101 at
# 32^3, 110 at 48^3, 121 at 64^3, 112-117 from 80^3 to 128^3 (code pages of libtorch's kernels touched only at
# larger volumes, +21 MB between 16^3 and 64^3); nine other families 112-127 MB at 64^3 and 96x96x64, 108-121
# MB at 48^3. In bf16 it stays within 2 MB from 16^3 on.
REPEATABLE_CALIBRATION_SIDE = 64
CACHE_FILE = "runtime.json"
CACHE_VERSION = 8  # 2: the allocator policy is part of the key (the CPU pool); 3: medians under glibc's heap;
# 4: the dry run charges AVX2's GEMM weight-gradient buffers (the term is measured minus the dry run);
# 5: native bf16 and AMX in the key (AVX-512 CPUs with and without them share a capability);
# 6: under the pool, the pool's own peak is kept beside the measured peak; 7: 64^3 too under the pool and fixed;
# 8: fp32 jobs hold MKL's largest GEMM buffers from the start (fullres.kernels.malloc.hold_gemm_buffers)
NOISY_POLICIES = ("default", "cached")  # glibc's heap: its peak varies from process to process
NOISY_RUNS = 3


def calibration_shape(job: JobConfig) -> tuple[int, int, int]:
    """16^3 for the paper's network; for others the smallest cube whose coarsest level keeps 2 voxels a
    side (normalisation in training needs more than one value per channel): 2 x the network's divisor."""
    side = max(CALIBRATION_SHAPE[0], 2 * spatial_divisor(job.model))
    return (side, side, side)


def calibration_shapes(job: JobConfig) -> list[tuple[int, int, int]]:
    """Where `job`'s term is measured: :func:`calibration_shape` and, under the CPU pool and glibc's fixed
    thresholds (whose peaks repeat, so one run each), also the smallest cube of a multiple of the divisor from
    :data:`REPEATABLE_CALIBRATION_SIDE` on: what the process holds beside its tensors grows with the volume up
    to there (the library code its kernels touch), then no more; between the two it is interpolated
    (:func:`measured_runtime_bytes`)."""
    small = calibration_shape(job)
    if policy_for(job.strategy) not in TERM_HOLDS_FIRST_CALL:
        return [small]
    divisor = spatial_divisor(job.model)
    side = max(small[0], -(-REPEATABLE_CALIBRATION_SIDE // divisor) * divisor)
    return [small] if side == small[0] else [small, (side, side, side)]


def runtime_job(job: JobConfig, shape: tuple[int, int, int] | None = None) -> JobConfig:
    """The job whose measured excess over its tensors is `job`'s runtime term: same network and strategy,
    at `shape` (:func:`calibration_shape` by default) and batch 1, no accumulation (slabs capped at what its
    rows hold)."""
    small = job.at_shape(shape or calibration_shape(job))
    return replace(small, batch=1, strategy=replace(small.strategy, accumulate=1))


def _cache_key(job: JobConfig, shape: tuple[int, int, int] | None = None) -> dict:
    return {"version": CACHE_VERSION, "job": runtime_job(job, shape).to_json(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "avx512_bf16": fullres_device.avx512_bf16(),
            "amx_bf16": fullres_device.amx_bf16(), "threads": torch.get_num_threads(),
            "hostname": socket.gethostname(), "malloc": os.environ.get(ENV, ""), "policy": policy_for(job.strategy)}


@functools.lru_cache(maxsize=None)
def tensor_bytes(small: JobConfig, threads: int, policy: str) -> int:
    """The dry run's tensors for the 16^3 calibration job, once per process: `plan` asks for the same
    network's term at every batch and shape it tries (~0.3 s each). `threads` is part of the key because the
    kernels ATen picks, and so the workspaces, depend on it; `policy`, the allocator's (the pool's segments)."""
    return dryrun(small, runtime=0, allocator=policy).peak_bytes


def measured_runtime_bytes(job: JobConfig, cache_dir: str | os.PathLike | None = None, refresh: bool = False) -> int:
    """`job`'s runtime term in bytes (see the module docstring), from ``cache_dir/runtime.json`` when this
    network, strategy, torch, CPU, thread count and allocator setting were measured before; otherwise
    measured now (two training steps at each of :func:`calibration_shapes` in a subprocess, a few seconds; the
    median of three under glibc's heap) and cached; between two calibrations interpolated by the job's voxels
    per micro-batch (SegResNet, fp32, under the pool: 98 MB outside it at 16^3, 101 at 32^3, 110 at 48^3, 121
    at 64^3; linear in voxels within 2.5 MB). A network registered in this process (:func:`register_model`),
    which a fresh process cannot rebuild, is measured in this one instead (:func:`in_process_runtime_bytes`)."""
    if not rebuilt_elsewhere(job.model.architecture):
        term = in_process_runtime_bytes(job)
        return runtime_bytes(job) if term is None else term
    try:
        import resource  # noqa: F401 - the measuring child reads its peak with it where /proc is missing
    except ImportError:  # not POSIX: nothing to measure with; the modelled constant
        return runtime_bytes(job)
    shapes = calibration_shapes(job)
    terms = [_calibrated_term(job, shape, cache_dir, refresh) for shape in shapes]
    if len(terms) == 1:
        return terms[0]
    # per micro-batch voxels, between the two calibrations' (each at batch 1), linearly
    low, high = (math.prod(shape) for shape in shapes)
    voxels = math.prod(job.shape) * max(1, job.batch // max(1, job.strategy.accumulate))
    fraction = min(1.0, max(0.0, (voxels - low) / (high - low)))
    return round(terms[0] + (terms[1] - terms[0]) * fraction)


def _calibrated_term(job: JobConfig, shape: tuple[int, int, int], cache_dir, refresh: bool) -> int:
    """The term measured at `shape` (:func:`runtime_job`), cached; the modelled constant where it cannot be."""
    path = (Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir()) / CACHE_FILE
    key = _cache_key(job, shape)
    small = runtime_job(job, shape)
    # The measurement is cached, and beside it the dry run's tensors with the digest of the code that
    # computed them: they are reused only by the same code, so a change to the tensor model never leaves a
    # stale difference behind (and the same code need not dry-run the calibration job again: ~1 s each).
    code = source_digest()
    cached = None if refresh else cache_lookup(path, key)
    if cached is not None and cached.get("code") == code and isinstance(cached.get("tensor_bytes"), int):
        return _term(cached, cached["tensor_bytes"])
    try:
        tensors = tensor_bytes(small, torch.get_num_threads(), key["policy"])
    except Exception:  # noqa: BLE001 - a network that does not take the calibration size: the modelled constant
        return runtime_bytes(job)
    with _measuring(path) as writable:
        if not writable:  # a measurement no later process could read: every process would get its own
            return runtime_bytes(job) if cached is None else _term(cached, tensors)
        cached = None if refresh else cache_lookup(path, key)  # measured by another process meanwhile
        if cached is not None:
            cache_store(path, key, {**cached, "code": code, "tensor_bytes": tensors})
            return _term(cached, tensors)
        try:
            peaks = [measure.measure_peak(small, steps=2, threads=torch.get_num_threads(), build_pool=False)
                     for _ in range(NOISY_RUNS if key["policy"] in NOISY_POLICIES else 1)]
        except RuntimeError:  # the child could not run the calibration job: the modelled constant, uncached
            return runtime_bytes(job)
        runs = [peak.measured_bytes for peak in peaks]
        measured = int(statistics.median(runs))
        entry = {"measured_bytes": measured, "runs": runs, "code": code, "tensor_bytes": tensors}
        pool = peaks[0].reserved_bytes if key["policy"] == "pool" and len(peaks) == 1 else None
        if pool is not None:  # the pool's own counters: what lies outside it, whatever the replay gets here
            entry["pool_bytes"] = int(pool)
        cache_store(path, key, entry)
    return _term(entry, tensors)


def _term(entry: dict, tensors: int) -> int:
    """The term from a calibration measurement: its peak minus the dry run's tensors; under the CPU pool, minus
    the pool's own peak where the replay counts more than the pool held (so a replay that is over at the
    calibration size does not lower every estimate; one that is under is carried as it was measured)."""
    pool = entry.get("pool_bytes")
    return max(0, int(entry["measured_bytes"]) - (min(tensors, int(pool)) if isinstance(pool, int) else tensors))


IN_PROCESS_CACHE_FILE = "runtime-in-process.json"
CALIBRATION_VERSION = 2  # 2: the term itself is cached (it does not depend on the loss or the optimizer)


def in_process_runtime_bytes(job: JobConfig, loss="dice", optimizer="adam") -> int | None:
    """The CPU runtime term of a network registered in this process (an instance, a factory, a name given
    to :func:`fullres.nets.registry.register_model`): two real training steps of it at the calibration size
    (:func:`runtime_job`) in this process, their peak RSS above the RSS before them minus the dry run's
    tensors for the same steps; cached per machine by the network's class and parameter shapes, strategy,
    torch, CPU and threads. `loss` and `optimizer` as :func:`fullres.cost.dryrun.dryrun` takes them. None
    where this process's peak cannot be read (no /proc/self/clear_refs), where the steps ran in memory the
    process held already (the RSS grew by less than their tensors: a CPU pool's cached blocks), neither
    cached, or where the network does not take the calibration size."""
    small = runtime_job(job)
    try:
        skeleton = build_on_meta(small.model, small.shape)
    except ValueError:
        return None
    shapes = json.dumps([[name, list(t.shape), str(t.dtype)] for name, t in skeleton.state_dict().items()])
    key = {"version": CALIBRATION_VERSION, "network": type(skeleton).__module__ + "." + type(skeleton).__qualname__,
           "shapes": hashlib.sha256(shapes.encode()).hexdigest(), "job": {**small.to_json(), "model": None},
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "threads": torch.get_num_threads(), "hostname": socket.gethostname()}
    path = user_cache_dir() / IN_PROCESS_CACHE_FILE
    cached = cache_lookup(path, key)
    if cached is not None:
        return int(cached["runtime_bytes"])
    try:
        tensors = dryrun(small, loss=loss, optimizer=optimizer, runtime=0, allocator="default").peak_bytes
    except ValueError:  # the network does not take the calibration size: the modelled constant
        return None
    trim_heap()  # free heap memory from earlier work back to the kernel: the steps below must fault theirs in
    baseline, _ = measure.rss_bytes()
    if not measure.reset_hwm():
        return None
    training = build_training(small, "cpu", optimizer=None if optimizer == "adam" else optimizer)
    for parameter in training.model.parameters():  # the copy's storage is uninitialised: make it finite
        torch.nn.init.normal_(parameter.data, std=0.01)
    images, targets = measure.make_batch(small, "cpu")
    try:
        for _ in range(2):
            train_step(training.model, training.optimizer, images, targets,
                       loss if callable(loss) else LOSSES[loss], small.strategy, training.scaler)
    except Exception:  # noqa: BLE001 - the network refusing the calibration size: the modelled constant
        return None
    _, peak = measure.rss_bytes()
    del training, images, targets
    if peak - baseline < tensors:  # the steps ran in blocks this process held already (the CPU pool's): unseen
        return None
    term = peak - baseline - tensors
    cache_store(path, key, {"runtime_bytes": term, "measured_bytes": peak - baseline})
    return term


@contextlib.contextmanager
def _measuring(path: Path):
    """Hold an exclusive lock on `path`.lock while a term is measured and stored (other processes wait,
    then find it cached). Yields False, holding nothing, when the cache folder cannot be written."""
    try:
        import fcntl
    except ImportError:  # not POSIX: measured without a lock
        yield True
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.parent / (path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield False
        return
    try:
        if not os.access(path.parent, os.W_OK):
            yield False
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock
