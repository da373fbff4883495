"""The allocator policy a training job runs under: fullres's CPU pool, or glibc with fixed thresholds.

**pool** (channels-last jobs without checkpointing or slabs, on CPU: fp32, and bf16 where
:func:`bf16_pool_modelled`): PyTorch's CPU tensors come
from :mod:`fullres.kernels.cpu_pool`, a caching allocator with the rules of PyTorch's CUDA one. Freed blocks
are reused, so after the first step no page is faulted in again, and the memory it holds (its segments,
mapped populated, never returned) is what the dry run's replay of the same rules predicts. Measured
(docs/results/performance.md, AVX-512 bf16 AMD Zen 4): the 64^3 x 1 fp32 channels-last step 2-6 % faster
than under glibc's default in one process with steps alternated, and 1.01x TensorFlow's; the demo job's
configuration 11 % faster; peaks -8..+12 % of glibc's default; the dry run within -4.0..+2.3 % of them from 32^3 to 128^3,
where glibc's default heap missed 4 of 10 jobs by 6-10 %.
Contiguous (NCDHW) fp32 jobs keep glibc's default: oneDNN reorders whole feature maps for them, and the
pool would keep those blocks (the paper's 240x240x144 batch-1 fp32 step: 39.6 GB replayed under the pool,
34.0 GB of live tensors). Where the pool cannot be built (no C++ compiler), fp32 jobs run under glibc's
default too.

bf16 channels-last jobs run under the pool too on CPUs with native AVX-512 bf16 and without AMX, where the dry run
models what oneDNN's bf16 kernels take from it (:func:`bf16_pool_modelled`): each weight gradient's
scratchpad, transposed copies of its input and output gradient for each thread that splits the reduction
over batch x depth (:mod:`fullres.cost.onednn_scratchpad`), and the fp32 copy a bf16 bias gradient is summed
in. The pool keeps those copies populated, so a bf16 job's peak grows with its threads. Measured on an
AVX-512 bf16 AMD Zen 4 at 2 threads (docs/results/memory.md, docs/results/performance.md, docs/results/models.md):
the 64^3 bf16 step ~10 % faster than under glibc's default; the dry run within 1 % for the paper's network and
some other families, 4-18 % low for others. On AMX CPUs (another weight-gradient kernel, not modelled) and
where bf16 is emulated, bf16 jobs keep glibc's default,
whose peaks wander with the heap's leftovers by a few percent from run to run (docs/memory.md);
FULLRES_MALLOC=fixed makes such a job's peak exact at some cost in speed.

**fixed** (jobs with checkpointing or slabs): glibc with large blocks always straight from and back to
the kernel, so the peak is the live tensors the dry run counts.

glibc serves blocks above a *dynamic* mmap threshold with mmap (returned to the OS on free) and smaller
ones from its heaps (kept after free). Each time a large mmapped block is freed the threshold rises to
its size (up to 32 MiB), so after the first training step the many 128 KiB-32 MiB activation
gradients, column buffers and oneDNN scratch blocks come from the heaps, where freed memory stays
resident and fragments: the process's peak RSS then exceeds the bytes ever alive at once.

Fixing the thresholds (`mallopt`, the same as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
environment variables) keeps every block above 128 KiB on mmap, so RSS follows the live tensors. The
dry-run estimator counts live bytes, so this is also what makes its estimate match the measurement.

It is applied to jobs that declare memory their constraint, those with checkpointing or slabs: there
it pays for itself (64^3, 32 filters, channels-last: measured peak -11 % with checkpointing, -15 % with
slabs, and the dry run's error falls from -14/-19 % to -3/-5 %), while on small, allocation-heavy jobs every mmapped
block's fresh page faults cost more than they save (the demo job's step: +45 %; docs/performance.md).

The opposite policy, "cached", trades memory for speed: no block is ever mmapped (M_MMAP_MAX 0) and the
heap is never trimmed, so from the third step on no page is faulted in again (glibc's default still
mmaps every block above 32 MiB, and faults it in afresh: ~440,000 faults per 64^3 step). Measured at
64^3 x 1, 32 filters, fp32 channels-last: the step 8 % faster (12.86 s to 11.83 s), but the peak RSS 29 % above the fixed
policy's (+9 % at 48x64x32 x 2, +20 % at 96x96x64), held as free heap the dry run does not predict. So
it is opt-in, for jobs with memory to spare: FULLRES_MALLOC=cached.

FULLRES_MALLOC=pool, =fixed, =cached or =default applies that policy to every job.

**MKL's GEMM buffers** (fp32 jobs under the pool and the fixed thresholds): ATen's slow convolution path
(fp32 at batch 1 where N x C x D x H is at most 20480: a network's coarsest levels, and the few-row slabs of a
slab schedule) multiplies with MKL's SGEMM, whose memory manager keeps every packing buffer it allocates, per
thread, and allocates another whenever a request is larger than any it holds. What it holds then depends on the
order of the job's GEMMs, not on its tensors: MONAI's UNet in slabs 8,4,2 held 16.5 MB at 64^3, 26.4 at
96x96x64 and 46.6 at 128x128x96; the paper's network in slabs 47.6 MB at 64^3 and 6.6 at 96x96x64 (2 threads,
AVX-512 bf16 AMD Zen 4; `benchmarks/slow_path.py buffers`), enough to move a job's peak by 5 % either way from
its calibration. So these jobs start with one GEMM whose buffers are the largest MKL requests here (5.5 MB a
thread); every later request fits in them and nothing is added (:func:`hold_gemm_buffers`).

Where the pool cannot exist (no POSIX fcntl/resource, as on Windows; not Linux), a job that would run under
it keeps the C library's default allocator, the dry run does not model the pool, and `estimate` and `plan`
say so in a warning (:func:`pool_unavailable`); `train` says so in its allocator line.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import mmap
import os
import warnings

import torch

from fullres.errors import UserError
from fullres.kernels import cpu_pool
from fullres.kernels import device as fullres_device
from fullres.terms import MALLOC_ENV

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
THRESHOLD_BYTES = 128 * 1024  # glibc's initial default, made fixed
ENV = MALLOC_ENV  # one of POLICIES for every job; unset: chosen by the strategy
POLICIES = ("pool", "fixed", "cached", "default")


@functools.lru_cache(maxsize=1)
def _load_pool() -> str | None:
    try:
        cpu_pool.load()
    except (RuntimeError, OSError) as error:
        return str(error)
    return None


def prepare_pool() -> str | None:
    """Build (if needed) and load the CPU pool; why it cannot be used here (one line), or None. Commands that
    train call this (through :func:`set_training_malloc_policy`, or before the dry run of the job they are
    about to run, so that it estimates the allocator the job gets); once per process, a failed build is
    not retried. Raises UserError when the pool's cache folder is not private to this user."""
    return _load_pool()


def prepare_pool_for(strategy, device: str = "cpu", either_layout: bool = False) -> None:
    """:func:`prepare_pool` where a job with this strategy would run under the pool (`either_layout`: in
    either memory layout, for a job whose layout a trial may still switch); nothing otherwise. For
    commands that train, before their dry runs."""
    from dataclasses import replace

    layouts = (False, True) if either_layout else (strategy.channels_last,)
    if any(wanted_policy(replace(strategy, channels_last=layout), device) == "pool" for layout in layouts):
        prepare_pool()


@functools.cache
def _say_pool_off(reason: str) -> None:
    """Warn, once per process, that the pool cannot exist here (a `plan` asks about many jobs)."""
    warnings.warn(f"{reason}: fullres's CPU pool and the dry run's model of it are off here, so jobs that "
                  "would use it are estimated and run under the C library's default allocator", stacklevel=3)


def pool_unavailable(build: bool = False) -> str | None:
    """Why the CPU pool cannot be used here (one line), or None when it can. Builds it only when `build`;
    otherwise (`estimate`, `plan`: they never train) the answer of this process's :func:`prepare_pool` if
    it ran, else whether a trustworthy library is already built (:func:`fullres.kernels.cpu_pool.cached`)."""
    if build or _load_pool.cache_info().currsize:
        return prepare_pool()
    reason = cpu_pool.unsupported()
    if reason is not None:  # `estimate`, `plan`: nothing else would tell them (train prints policy_line)
        _say_pool_off(reason)
        return reason
    if cpu_pool.cached() is None:
        return "the CPU pool is not built yet (the first training command here builds it)"
    return None


def wanted_policy(strategy=None, device: str = "cpu") -> str:
    """The policy the rules give a job with this `fullres.job.config.Strategy` on `device` (None: no job yet,
    as the CLI starts), whether or not the pool can be built here. On CUDA the tensors do not live in the
    C allocator: "default"."""
    setting = os.environ.get(ENV, "")
    if setting and setting not in POLICIES:
        raise UserError(f"{ENV}={setting!r} is not an allocator policy: use one of {', '.join(POLICIES)}, or unset it")
    if strategy is None or torch.device(device).type != "cpu":
        return setting if setting and setting != "pool" else "default"
    if setting:
        return setting
    if strategy.checkpointing or strategy.slabbed:
        return "fixed"
    if not strategy.channels_last:
        return "default"
    modelled = strategy.precision == "fp32" or strategy.precision == "bf16" and bf16_pool_modelled()
    return "pool" if modelled else "default"


def bf16_pool_modelled() -> bool:
    """Whether the dry run models the buffers oneDNN's bf16 kernels take from the pool on this CPU: native
    AVX-512 bf16 without AMX (:mod:`fullres.cost.onednn_scratchpad`). Not on AMX CPUs (another weight-gradient
    kernel, not measured) nor where bf16 is emulated."""
    return fullres_device.avx512_bf16() and not fullres_device.amx_bf16()


def policy_for(strategy=None, device: str = "cpu", build: bool = False) -> str:
    """The allocator policy the job runs under: `wanted_policy`, but glibc's default where the pool is
    wanted and cannot be used (`build`: see :func:`pool_unavailable`)."""
    wanted = wanted_policy(strategy, device)
    return "default" if wanted == "pool" and pool_unavailable(build) is not None else wanted


def policy_line(strategy, device: str = "cpu") -> str | None:
    """What `train` says about the allocator of this job (None: glibc's default, as wanted)."""
    policy = policy_for(strategy, device)
    if policy == "default" and wanted_policy(strategy, device) == "pool":
        return f"allocator: glibc's default, not fullres's CPU pool ({pool_unavailable()})"
    return {"pool": "allocator: fullres's CPU pool (freed blocks reused, no page faults after the first step; "
                    "its segments are in the estimate)",
            "fixed": "allocator: glibc mmap/trim thresholds fixed at 128 KiB (peaks follow the live tensors)",
            "cached": "allocator: freed memory kept for reuse (FULLRES_MALLOC=cached: faster, peak above the "
                      "estimate)"}.get(policy)


def _libc(function: str, argtypes: list):
    """The C library's `function` (returning int) with `argtypes`, or None where there is no such library or
    function (not glibc)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        found = getattr(ctypes.CDLL(name), function)
    except (OSError, AttributeError):
        return None
    found.argtypes, found.restype = argtypes, ctypes.c_int
    return found


def trim_heap() -> bool:
    """Hand glibc's free heap memory back to the kernel (`malloc_trim(0)`), so that blocks allocated next are
    faulted in afresh and show in the RSS. False where there is no glibc."""
    trim = _libc("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


# (m, k, n) of an SGEMM whose packing buffers are the largest MKL asks for on this CPU: 5.5 MB a thread on an
# AVX-512 AMD Zen 4 from m >= 768, n >= 8192, k >= 512 (all slow-path convolutions measured ask 3.3-5.1 MB)
HOLDING_GEMM = (1024, 512, 8192)
_held_threads = 0


def hold_gemm_buffers() -> bool:
    """Make MKL's memory manager hold, for each of this process's threads, SGEMM buffers as large as any it
    will ask for, so that later GEMMs (ATen's slow convolution path) reuse them and it never holds more (see
    the module docstring). One GEMM of :data:`HOLDING_GEMM` on operands mapped outside both glibc's heap and
    fullres's pool (they are unmapped after it: glibc's thresholds and the pool's segments stay as they were);
    again only when the thread count has grown. Returns whether it ran (False without MKL)."""
    global _held_threads
    threads = torch.get_num_threads()
    if threads <= _held_threads or not torch.backends.mkl.is_available():
        return False
    m, k, n = HOLDING_GEMM
    shapes = ((m, k), (k, n), (m, n))
    maps = [mmap.mmap(-1, rows * cols * 4) for rows, cols in shapes]
    try:
        a, b, c = (torch.frombuffer(buffer, dtype=torch.float32).view(shape) for buffer, shape in zip(maps, shapes))
        torch.mm(a, b, out=c)
        del a, b, c  # the maps close only once no tensor exports them
    finally:
        for buffer in maps:
            buffer.close()
    _held_threads = threads
    return True


def mkl_held_buffers() -> tuple[int, int] | None:
    """(bytes, buffers) that MKL's memory manager holds in this process (`mkl_serv_mem_stat`, which torch's
    library exports); None where torch has no MKL or does not export it."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        stat = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")).mkl_serv_mem_stat
    except (OSError, AttributeError):
        return None
    stat.restype = ctypes.c_int64
    buffers = ctypes.c_int(0)
    return stat(ctypes.byref(buffers)), buffers.value


def set_training_malloc_policy(strategy=None, force: bool = False, device: str = "cpu",
                               build: bool = True) -> str | None:
    """Put `policy_for(strategy, device, build)` in force ("fixed" when `force`). Returns the policy's name,
    or None when nothing changed (the default policy, or no glibc). `build` False: the pool only if it is
    built already (the runtime calibrations of `estimate` and `plan`). An fp32 job under the pool or the fixed
    thresholds first has MKL hold its largest GEMM buffers (:func:`hold_gemm_buffers`)."""
    policy = "fixed" if force else policy_for(strategy, device, build)
    if policy in ("pool", "fixed") and strategy is not None and strategy.precision == "fp32" \
            and torch.device(device).type == "cpu":
        hold_gemm_buffers()
    if policy == "pool":
        cpu_pool.install()
        return policy
    if cpu_pool.installed():  # a later job of the same process under another policy
        cpu_pool.uninstall()
    if policy == "default":
        return None
    mallopt = _libc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return None
    if policy == "fixed":
        done = mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)
    else:
        done = mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)
    return policy if done else None
