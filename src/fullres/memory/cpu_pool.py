"""A caching allocator for CPU tensors (`cpu_pool.cpp`): built here with g++, loaded with ctypes.

PyTorch's CPU tensors come from glibc, which maps every block above 32 MiB afresh (the kernel faults its
pages in again on every step) and keeps smaller ones in heaps whose holes no estimate can follow. The
pool keeps freed blocks for reuse by the rules of PyTorch's CUDA caching allocator, so that
:class:`fullres.memory.cuda_allocator.CachingAllocatorModel` replays it exactly in the dry run: the
memory it holds is its reserved bytes, mapped populated and never returned.

The library is compiled once per source and torch version into the cache folder ($XDG_CACHE_HOME/fullres,
else ~/.cache/fullres) against c10's headers only (no Python headers). Where that cannot be done (no C++
compiler, not Linux), :func:`load` says why and training keeps glibc's allocator.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("cpu_pool.cpp")
LIBRARY = "libfullres_cpu_pool.so"


@dataclass(frozen=True)
class PoolStats:
    """The pool's counters, in bytes: blocks handed out (`allocated`), segments mapped (`reserved`)."""

    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int
    segments: int
    passthrough: int  # allocations a forked child (data-loader worker) served with plain malloc


def cache_dir() -> Path:
    from fullres.files import user_cache_dir

    return user_cache_dir() / "cpu_pool"


def _torch_paths() -> tuple[Path, Path]:
    import torch

    root = Path(torch.__file__).parent
    return root / "include", root / "lib"


def _build_key() -> str:
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{torch.__version__} {torch._C._GLIBCXX_USE_CXX11_ABI} {sys.platform}".encode())
    return digest.hexdigest()[:16]


def build(compiler: str | None = None) -> Path:
    """Compile the pool (once per source and torch version) and return the library's path.

    Raises RuntimeError with one line saying why when it cannot be built."""
    import torch

    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"the CPU pool is built for Linux only, not {sys.platform}")
    target = cache_dir() / _build_key() / LIBRARY
    if target.exists():
        return target
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found) to build the CPU pool")
    include, lib = _torch_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # built aside, then renamed: atomic
        built = Path(scratch) / LIBRARY
        command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                   f"-I{include}", str(SOURCE), f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", str(built)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
            raise RuntimeError(f"building the CPU pool failed: {first}")
        os.replace(built, target)
    return target


@functools.lru_cache(maxsize=1)
def load() -> ctypes.CDLL:
    """The pool's library, built if needed (RuntimeError when it cannot be)."""
    library = ctypes.CDLL(str(build()))
    library.fullres_pool_stats.argtypes = [ctypes.POINTER(ctypes.c_int64)]
    library.fullres_pool_stats.restype = None
    library.fullres_pool_read_trace.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    library.fullres_pool_read_trace.restype = ctypes.c_int64
    library.fullres_pool_trace.argtypes = [ctypes.c_int]
    for name in ("fullres_pool_install", "fullres_pool_uninstall", "fullres_pool_installed"):
        getattr(library, name).restype = ctypes.c_int
    return library


def install() -> None:
    """Make the pool PyTorch's CPU allocator for the rest of the process (tensors made before keep theirs)."""
    if not load().fullres_pool_install():
        raise RuntimeError("PyTorch did not take the CPU pool as its CPU allocator")


def uninstall() -> None:
    """Give PyTorch back its own CPU allocator; blocks the pool handed out still return to it."""
    load().fullres_pool_uninstall()


def installed() -> bool:
    """Whether the pool is PyTorch's CPU allocator now. Never builds it: a library not loaded yet was never
    installed (jobs under glibc's policies ask this)."""
    return load.cache_info().currsize > 0 and bool(load().fullres_pool_installed())


def stats() -> PoolStats:
    values = (ctypes.c_int64 * 6)()
    load().fullres_pool_stats(values)
    return PoolStats(*values)


def trace(on: bool = True) -> None:
    """Start (clearing it) or stop recording requests, as :func:`read_trace` returns them."""
    load().fullres_pool_trace(int(on))


def read_trace() -> list[tuple[int, int]]:
    """The recorded requests: (bytes asked, block address) for each allocation, (-1, block address) for
    each free, addresses as :class:`~fullres.memory.cuda_allocator.CachingAllocatorModel` numbers them."""
    library = load()
    count = library.fullres_pool_read_trace(None, 0)
    values = (ctypes.c_int64 * count)()
    library.fullres_pool_read_trace(values, count)
    return list(zip(values[0::2], values[1::2]))
