"""The C allocator's policy for training: large blocks always straight from and back to the kernel.

glibc serves blocks above a *dynamic* mmap threshold with mmap (returned to the OS on free) and smaller
ones from its heaps (kept after free). Each time a large mmapped block is freed the threshold rises to
its size (up to 32 MiB), so after the first training step the many 128 KiB-32 MiB activation
gradients, column buffers and oneDNN scratch blocks come from the heaps, where freed memory stays
resident and fragments: the process's peak RSS then exceeds the bytes ever alive at once.

Fixing the thresholds (`mallopt`, the same as the MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
environment variables) keeps every block above 128 KiB on mmap, so RSS follows the live tensors. The
dry-run estimator counts live bytes, so this is also what makes its estimate match the measurement.

It is opt-in (FULLRES_MALLOC=fixed): it pays for itself on memory-bound jobs (64^3, 32 filters: peak
-5.6 %, -8.8 % with checkpointing, step +3.4 %) but every mmapped block costs fresh page faults, which
made the small demo job's step 45 % slower (docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 128 * 1024  # glibc's initial default, made fixed
ENV = "FULLRES_MALLOC"  # "fixed": apply the policy; anything else keeps the C library's own


def set_training_malloc_policy(force: bool = False) -> bool:
    """With FULLRES_MALLOC=fixed (or `force`), fix glibc's mmap and trim thresholds at 128 KiB.
    Returns whether the policy is in force (False without glibc); nothing changes otherwise."""
    if not force and os.environ.get(ENV) != "fixed":
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
