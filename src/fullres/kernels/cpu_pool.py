"""A caching allocator for CPU tensors (`cpu_pool.cpp`): built here with g++, loaded with ctypes.

PyTorch's CPU tensors come from glibc, which maps every block above 32 MiB afresh (the kernel faults its
pages in again on every step) and keeps smaller ones in heaps whose holes no estimate can follow. The
pool keeps freed blocks for reuse by the rules of PyTorch's CUDA caching allocator, so that
:class:`fullres.kernels.cuda_allocator.CachingAllocatorModel` replays it exactly in the dry run: the
memory it holds is its reserved bytes, mapped populated and never returned.

The library is compiled once per source and torch version into the cache folder ($XDG_CACHE_HOME/fullres,
else ~/.cache/fullres, then cpu_pool/<key>/) against c10's headers only (no Python headers), by the
commands that train (:func:`fullres.kernels.malloc.prepare_pool`); `estimate` and `plan` never build it
(they use it, in their dry runs and runtime calibrations, once it is built: :func:`cached`).
A cached library is loaded only when it can be trusted: its folders belong to this user and no one else
can write them (else :class:`~fullres.errors.UserError`, one line), and its SHA-256, recorded beside it at
build time, matches (else it was damaged, say truncated by a crash, and is rebuilt). It is written aside,
fsynced, then renamed into place, under a lock so that concurrent processes build it once. Where it
cannot be built (no C++ compiler, not Linux), :func:`load` says why and training keeps glibc's allocator.
Where it cannot exist at all (not Linux, or no POSIX `fcntl`, as on Windows), :func:`unsupported` says why,
this module still imports, and nothing here is built or looked for.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fullres.errors import UserError
from fullres.files import user_cache_dir

try:
    import fcntl
except ImportError:  # not POSIX (Windows): the pool cannot be built or locked here, see unsupported()
    fcntl = None

SOURCE = Path(__file__).with_name("cpu_pool.cpp")
LIBRARY = "libfullres_cpu_pool.so"
DIGEST = LIBRARY + ".sha256"  # the library's SHA-256 (hex), written at build time


@dataclass(frozen=True)
class PoolStats:
    """The pool's counters, in bytes: blocks handed out (`allocated`), segments mapped (`reserved`)."""

    allocated: int
    reserved: int
    peak_allocated: int
    peak_reserved: int
    segments: int
    passthrough: int  # allocations a forked child (data-loader worker) served with plain malloc
    released: int  # segments unmapped to retry a mapping the kernel refused


def unsupported() -> str | None:
    """Why the pool cannot exist on this platform at all (one line), or None on Linux with POSIX's fcntl. Then
    it is never built nor looked for, the dry run does not model it, and jobs keep the C library's allocator."""
    if fcntl is None:
        return "the CPU pool needs POSIX (fcntl), which this Python lacks"
    if not sys.platform.startswith("linux"):
        return f"the CPU pool is built for Linux only, not {sys.platform}"
    return None


def cache_dir() -> Path:
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


def private_dir(path: Path) -> bool:
    """Make sure `path` is a folder of this user's that no one else can write (a library loaded from it runs
    in every training process): created with mode 0700 if missing, its mode tightened to 0700 if others
    could write it (then True: what it holds cannot be trusted), refused with a UserError if it is not a
    folder or belongs to another user."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as error:
        raise UserError(f"{path}: cannot create the CPU pool's cache folder ({error.strerror or error})") from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: the CPU pool's cache folder is not a folder; remove it")
    if info.st_uid != os.getuid():
        raise UserError(f"{path}: the CPU pool's cache folder belongs to another user (uid {info.st_uid}), "
                        "so its library is not loaded; remove the folder or set XDG_CACHE_HOME")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        try:
            path.chmod(0o700)
        except OSError as error:
            raise UserError(f"{path}: the CPU pool's cache folder is writable by others (mode "
                            f"{stat.S_IMODE(info.st_mode):o}) and cannot be made private ({error.strerror})") from None
        return True
    return False


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verified(target: Path) -> bool:
    """Whether `target` is a library this user built here, intact: a regular file of this user's that no one
    else can write, whose SHA-256 is the one recorded beside it when it was built."""
    try:
        info = target.lstat()
        recorded = (target.parent / DIGEST).read_text().strip()
        if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid()
                or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
            return False
        return _sha256(target) == recorded
    except OSError:
        return False


def _private(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def cached() -> Path | None:
    """The library built here before, when it can be trusted as it is (its folders private to this user, its
    hash the one recorded), else None. Creates, changes and builds nothing: `estimate` and `plan` ask this."""
    if unsupported() is not None:
        return None
    folder = cache_dir() / _build_key()
    target = folder / LIBRARY
    return target if _private(folder.parent) and _private(folder) and verified(target) else None


def _write_durably(path: Path, data: bytes, mode: int) -> None:
    """`data` into `path`: written aside, fsynced, renamed over it (a crash leaves the old file or the new)."""
    fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fchmod(file.fileno(), mode)
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build(compiler: str | None = None) -> Path:
    """Compile the pool (once per source and torch version) and return the library's path: the cached one
    when :func:`verified`, else built afresh (a damaged or foreign file is replaced).

    Raises RuntimeError with one line saying why when it cannot be built, UserError when its cache folder
    is not private to this user."""
    import torch

    reason = unsupported()
    if reason is not None:
        raise RuntimeError(reason)
    folder = cache_dir() / _build_key()
    opened = private_dir(folder.parent)
    if private_dir(folder) or opened:  # others could have written here: nothing in it is trusted
        for name in (LIBRARY, DIGEST):
            (folder / name).unlink(missing_ok=True)
    target = folder / LIBRARY
    if verified(target):
        return target
    compiler = compiler or os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found) to build the CPU pool")
    include, lib = _torch_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent processes (DDP ranks): one builds, the others wait
        if verified(target):
            return target
        with tempfile.TemporaryDirectory(dir=folder) as scratch:
            built = Path(scratch) / LIBRARY
            command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                       f"-I{include}", str(SOURCE), f"-L{lib}", "-lc10", f"-Wl,-rpath,{lib}", "-o", str(built)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                first = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr.strip()[:300])
                raise RuntimeError(f"building the CPU pool failed: {first}")
            data = built.read_bytes()
        # the digest first: a crash between the two renames leaves a library that fails verification
        _write_durably(folder / DIGEST, hashlib.sha256(data).hexdigest().encode() + b"\n", 0o600)
        _write_durably(target, data, 0o700)
        _fsync_dir(folder)
    if not verified(target):
        raise RuntimeError(f"the CPU pool built into {folder} does not verify after writing it")
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
    values = (ctypes.c_int64 * 7)()
    load().fullres_pool_stats(values)
    return PoolStats(*values)


def trace(on: bool = True) -> None:
    """Start (clearing it) or stop recording requests, as :func:`read_trace` returns them."""
    load().fullres_pool_trace(int(on))


def read_trace() -> list[tuple[int, int]]:
    """The recorded requests: (bytes asked, block address) for each allocation, (-1, block address) for
    each free, addresses as :class:`~fullres.kernels.cuda_allocator.CachingAllocatorModel` numbers them."""
    library = load()
    count = library.fullres_pool_read_trace(None, 0)
    values = (ctypes.c_int64 * count)()
    library.fullres_pool_read_trace(values, count)
    return list(zip(values[0::2], values[1::2]))
