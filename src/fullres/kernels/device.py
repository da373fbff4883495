"""The machine a job runs on: device choice, CPU threads, the process group, and its memory.

Every command that runs or sizes a job asks here, so `estimate`, `plan`, `bench` and `train` agree on
which device "auto" means, how many threads a CPU job gets, and how much memory is available.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from fullres.errors import UserError
from fullres.terms import COLLECTIVE_TIMEOUT_S

try:
    import resource
except ImportError:  # not POSIX (Windows): see peak_memory
    resource = None


def avx512() -> bool:
    """Whether oneDNN gets AVX-512 kernels here (its brgemm convolutions; AVX2 CPUs run others)."""
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


@functools.cache
def _cpu_flag(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return any(line.startswith("flags") and flag in line.split() for line in cpuinfo)
    except OSError:
        return False


def amx_bf16() -> bool:
    """Whether this CPU has AMX for bf16 (Linux's `amx_bf16` flag), which oneDNN uses for bf16 convolutions."""
    return _cpu_flag("amx_bf16")


def avx512_bf16() -> bool:
    """Whether this CPU has AVX-512 bf16 instructions (Linux's `avx512_bf16` flag): oneDNN's native bf16
    kernels without AMX (`jit_bf16:avx512_core_bf16`)."""
    return _cpu_flag("avx512_bf16")


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads counted once), from sysfs topology; where
    there is neither an affinity mask nor sysfs (macOS, Windows), the logical CPUs."""
    if not hasattr(os, "sched_getaffinity"):
        return max(1, os.cpu_count() or 1)
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_process_group(device_type: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Process:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process. Every collective
    and point-to-point transfer of the group fails after `timeout_s` seconds without its peers, so a rank
    that hangs cannot hang the others (one that dies is seen at once: its connections close)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Process()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Process(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


# How a failed transfer reads: torch.distributed's own errors (NCCL, the store), and gloo's, which are plain
# RuntimeErrors that name its transport: a timeout, or a connection a dead peer closed.
_GLOO_FAILURES = ("gloo/transport", "Timed out waiting", "Connection closed by peer", "Connection reset by peer")


@contextlib.contextmanager
def collective_failures(process: Process, resume_hint: str = ""):
    """Turn a failed collective or halo exchange (a peer that died, or hung past the timeout) into a
    one-line UserError naming this rank and the cause, exit code 1; other errors pass unchanged."""
    try:
        yield
    except RuntimeError as error:
        lost = isinstance(error, dist.DistError) or any(mark in str(error) for mark in _GLOO_FAILURES)
        if process.world == 1 or not lost:
            raise
        cause = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        cause = cause.split("] ", 1)[-1] if cause.startswith("[") else cause  # gloo's source location
        raise UserError(f"rank {process.rank} of {process.world}: lost the other processes ({cause[:200]})"
                        f"{resume_hint}", exit_code=1) from None


@contextlib.contextmanager
def process_group(device_type: str, timeout_s: float = COLLECTIVE_TIMEOUT_S, resume_hint: str = ""):
    """This process in torchrun's group (:func:`start_process_group`; one process without torchrun), its
    failed collectives turned into one line (:func:`collective_failures`), the group destroyed on the way out."""
    process = start_process_group(device_type, timeout_s)
    try:
        with collective_failures(process, resume_hint):
            yield process
    finally:
        if process.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def pick_device(choice: str, process: Process) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (this torch: " + torch.__version__ + ")")
        if process.local_rank >= torch.cuda.device_count():
            raise UserError(f"--device cuda: local process {process.local_rank} has no GPU of its own "
                            f"({torch.cuda.device_count()} visible): start at most that many processes per node "
                            f"(torchrun --nproc-per-node), or use --device cpu")
        torch.cuda.set_device(process.local_rank)
        return torch.device("cuda", process.local_rank)
    return torch.device("cpu")


def configure_cpu(threads: int, process: Process) -> str:
    """oneDNN on, intra-op threads = physical cores (shared between local processes). Returns a log line."""
    torch.backends.mkldnn.enabled = True
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", process.world))
    threads = threads or max(1, physical_cores() // local_world)
    torch.set_num_threads(threads)
    return (f"CPU: {threads} threads, oneDNN {'on' if torch.backends.mkldnn.is_available() else 'unavailable'}, "
            f"ISA {torch.backends.cpu.get_cpu_capability()}")


def available_memory(device: torch.device) -> int:
    """Bytes this job may use: MemAvailable on CPU (per local process under torchrun), free memory on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // local
    except OSError:  # no /proc (macOS, Windows)
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // local
    except (AttributeError, ValueError, OSError):  # no sysconf, or not this name (macOS, Windows)
        raise UserError("cannot read this machine's available memory here: give the budget with --memory") from None


def peak_memory(device: torch.device) -> int:
    """The peak of this process: CUDA's allocated bytes, or on CPU its peak resident set (without `resource`,
    /proc's VmHWM; 0 where neither reports it, as on Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if resource is None:
        try:
            with open("/proc/self/status") as status:
                return next((int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")), 0)
        except OSError:
            return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 has hardware support here. Without it (e.g. an AVX2-only CPU) oneDNN emulates bf16
    about 100x slower than fp32 (docs/performance.md), so --strategy auto must not pick it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def memory_device(choice: str) -> str:
    """The device type a memory estimate or measurement is for: "auto" is CUDA when this torch sees one.
    The dry run of a CUDA job runs fake CUDA tensors (no GPU memory is touched) but reads the GPU's
    multiprocessor count, so it needs a CUDA build of torch and a visible GPU."""
    if choice == "cuda" and not torch.backends.cuda.is_built():
        raise UserError(f"--device cuda: this torch ({torch.__version__}) is built without CUDA")
    return pick_device(choice, Process()).type


def estimate_device(choice: str) -> str:
    """The device type a dry-run estimate or plan is for: "auto" is CUDA when this torch sees a GPU; "cuda"
    needs none (the dry run models a CUDA job on any machine: :func:`fullres.cost.dryrun.cuda_stand_in`).
    Measurements need the device itself: :func:`memory_device`."""
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice
