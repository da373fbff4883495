"""The C allocator's policy for training: large blocks always straight from and back to the kernel.

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
block's fresh page faults cost more than they save (the demo job's step: +45 %; docs/benchmarks.md).
FULLRES_MALLOC=fixed applies it to every job, FULLRES_MALLOC=default to none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's initial default, made fixed
ENV = "FULLRES_MALLOC"  # "fixed": every job; "default": no job; unset: jobs with checkpointing or slabs


def policy_wanted(strategy=None) -> bool:
    """Whether a job with this `fullres.config.Strategy` (None: no job yet) runs under the policy."""
    setting = os.environ.get(ENV, "")
    if setting in ("fixed", "default"):
        return setting == "fixed"
    return strategy is not None and (strategy.checkpointing or strategy.slabs > 1)


def set_training_malloc_policy(strategy=None, force: bool = False) -> bool:
    """Fix glibc's mmap and trim thresholds at 128 KiB when `policy_wanted(strategy)` (or `force`).
    Returns whether this call put the policy in force (False without glibc); nothing changes otherwise."""
    if not force and not policy_wanted(strategy):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES))
