"""One training step timed under a :class:`Variant` (stock kernels or oneDNN, fp32 or bf16, channels-last,
torch.compile), set against the measured matmul peak of its precision: the measured half of the time
model, used by train's autotune and by ``fullres bench``.

* :func:`matmul_peak_tflops`: measured dense matmul throughput (``torch.mm``), the roofline.
* :class:`Variant`, :func:`default_variants`, :func:`time_variant`: one row of the speed table.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import socket
import statistics
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch

from fullres.cost.flops import as_device, random_batch, step_flops, synchronize
from fullres.job.config import JobConfig, Strategy
from fullres.errors import UserError
from fullres.engine.losses import LOSSES
from fullres.kernels.malloc import set_training_malloc_policy
from fullres.job.step import build_training, to_device, train_step

MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str | torch.device = "cpu") -> dict:
    """What a timing depends on: torch, threads, the CPU's vector ISA as ATen sees it, the device."""
    device = as_device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu": cpu_model(),
        "logical_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "onednn_available": torch.backends.mkldnn.is_available(),
        "device": str(device),
        # other work on the machine skews timings, and with OpenMP's barriers by far more than its share
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["fp32_math"] = "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"  # cuDNN's fp32 convolutions
    return info


def matmul_peak_tflops(dtype: str | torch.dtype, size: int = 2048, repeats: int = 3,
                       device: str | torch.device = "cpu") -> float:
    """Measured dense ``torch.mm`` throughput of two size x size matrices in `dtype` ("fp32" or "bf16"):
    one warm-up product, then the median of `repeats` timed ones; TFLOP/s with 2 n^3 FLOPs per product.

    On a CPU without native bf16 (AVX2, AVX-512 without BF16) bf16 products are emulated and much slower
    than fp32: that is the honest peak for bf16 there. On CUDA the fp32 product uses the math cuDNN's fp32
    convolutions use (`torch.backends.cudnn.allow_tf32`, on by default: TF32 tensor cores), so a step's
    fraction of the fp32 peak compares like with like. On a CPU with oneDNN the same product is also timed
    as a channels-last 1x1x1 convolution (a GEMM in oneDNN, which runs the step's convolutions) and the
    faster of the two counts: ``torch.mm`` in fp32 goes to MKL, which on AMD CPUs runs at half of what
    oneDNN reaches (0.195 against 0.429 TFLOP/s on a 2-core Zen 5), so the step's convolutions would read
    as faster than the peak.
    """
    if isinstance(dtype, str):
        if dtype not in MATMUL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(MATMUL_DTYPES)}, got {dtype!r}")
        dtype = MATMUL_DTYPES[dtype]
    if size < 1 or repeats < 1:
        raise ValueError("size and repeats must be >= 1")
    device = as_device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    products = [(lambda: torch.mm(a, b, out=out), 2 * size**3)]
    if device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled:
        # size input and output channels over ceil(size / 4) x 2 x 2 voxels, a shape whose input and output
        # PyTorch keeps channels-last (a flat 1 x 1 x n or 2 x 2 x n falls back to the slow contiguous path)
        depth = -(-size // 4)
        voxels = torch.randn(1, size, depth, 2, 2, generator=generator).to(dtype=dtype)
        voxels = voxels.contiguous(memory_format=torch.channels_last_3d)
        weight = b.reshape(size, size, 1, 1, 1)
        products.append((lambda: torch.nn.functional.conv3d(voxels, weight), 2 * size * size * 4 * depth))
    try:
        rates = []
        for product, flops in products:
            product()  # warm-up: thread pool, kernel selection, page faults
            synchronize(device)
            seconds = []
            for _ in range(repeats):
                start = time.perf_counter()
                product()
                synchronize(device)
                seconds.append(time.perf_counter() - start)
            rates.append(flops / statistics.median(seconds) / 1e12)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return max(rates)


@dataclass(frozen=True)
class Variant:
    """How one bench row runs the job's step. `precision` and `channels_last` replace the job's own;
    checkpointing and accumulation stay the job's."""

    name: str
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    onednn: bool = True  # torch.backends.mkldnn.flags(enabled=...) around the step (CPU)
    channels_last: bool = False  # channels_last_3d weights and inputs
    compiled: bool = False  # torch.compile(model)
    threads: int | None = None  # torch.set_num_threads for this row (None: as the process is set)

    def __post_init__(self) -> None:
        if self.precision not in MATMUL_DTYPES:
            raise ValueError(f"variant precision must be one of {', '.join(MATMUL_DTYPES)}, got {self.precision!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"variant threads must be >= 1, got {self.threads}")

    def strategy(self, job: JobConfig) -> Strategy:
        return replace(job.strategy, precision=self.precision, channels_last=self.channels_last)

    def describe(self) -> str:
        parts = ["oneDNN" if self.onednn else "stock (oneDNN off)", self.precision]
        if self.channels_last:
            parts.append("channels-last")
        if self.compiled:
            parts.append("torch.compile")
        if self.threads:
            parts.append(f"{self.threads} threads")
        return " + ".join(parts)


STOCK, PLAIN = "stock_fp32", "plain_fp32"


def default_variants(device: str | torch.device = "cpu") -> list[Variant]:
    """Figure 6's rows. CPU: stock PyTorch with oneDNN off, then oneDNN fp32 (plain PyTorch), fp32
    channels-last, bf16, bf16 channels-last, and compiled fp32 / bf16 channels-last. CUDA: the same
    without the stock row (oneDNN is a CPU library)."""
    variants = [
        Variant(STOCK, "fp32", onednn=False),
        Variant(PLAIN, "fp32"),
        Variant("fp32_cl", "fp32", channels_last=True),
        Variant("bf16", "bf16"),
        Variant("bf16_cl", "bf16", channels_last=True),
        Variant("compiled_fp32_cl", "fp32", channels_last=True, compiled=True),
        Variant("compiled_bf16_cl", "bf16", channels_last=True, compiled=True),
    ]
    if as_device(device).type != "cpu":
        variants = variants[1:]
    return variants


def select_variants(names: Sequence[str] | None, device: str | torch.device = "cpu") -> list[Variant]:
    """The default variants named in `names` (all when None or empty), in the given order."""
    known = {v.name: v for v in default_variants(device)}
    if not names:
        return list(known.values())
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def _onednn_flags(enabled: bool):
    """``torch.backends.mkldnn.flags(enabled=...)``; None leaves the other oneDNN flags as they are (its
    defaults would set allow_tf32, which warns on a build without Intel GPU support)."""
    return torch.backends.mkldnn.flags(enabled=enabled, deterministic=None, allow_tf32=None, fp32_precision=None)


@contextmanager
def _threads(threads: int | None) -> Iterator[None]:
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def variant_context(variant: Variant, device: torch.device) -> Iterator[None]:
    with ExitStack() as stack:
        if device.type == "cpu":
            stack.enter_context(_onednn_flags(variant.onednn))
        stack.enter_context(_threads(variant.threads))
        yield


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = next((t for t in text if t.strip()), "")
    return f"{type(error).__name__}: {line}"[:limit]


def time_variant(job: JobConfig, variant: Variant, warmup: int = 1, repeats: int = 3,
                 device: str | torch.device = "cpu", peak_tflops: float | None = None, seed: int = 0) -> dict:
    """Time `repeats` training steps of `job` under `variant` after `warmup` untimed ones.

    Every variant builds a fresh model from the same seed, an Adam optimizer and the same random inputs
    (the job's whole effective batch), so rows differ only in how the step runs. Returns the variant's
    fields and ``step_s`` (median), ``step_s_min``, ``step_s_max``, ``step_s_all``, ``images_per_s``,
    ``voxels_per_s``, ``step_flops``, ``tflops`` (step FLOPs / median step time), ``peak_tflops`` (the
    matmul peak of the variant's precision; measured here when not given), ``fraction_of_peak``,
    ``warmup_s``, ``threads_used``, ``allocator`` (the policy `train` gives the variant, put in force
    here: :mod:`fullres.kernels.malloc`) and, compiled, ``compile_s`` (the first step's time). A compiled
    variant that torch.compile cannot build (no C compiler, an unsupported operator) is returned with
    ``skipped`` (the reason) and None timings instead of raising."""
    if warmup < 0 or repeats < 1:
        raise ValueError("warmup must be >= 0 and repeats >= 1")
    device = as_device(device)
    strategy = variant.strategy(job)
    row: dict = {**asdict(variant), "description": variant.describe(), "skipped": None, "step_s": None,
                 "step_s_min": None, "step_s_max": None, "step_s_all": [], "warmup_s": [], "images_per_s": None,
                 "voxels_per_s": None, "step_flops": step_flops(job.with_(strategy=strategy)), "tflops": None,
                 "peak_tflops": peak_tflops, "fraction_of_peak": None}
    with variant_context(variant, device):
        if peak_tflops is None:  # before the allocator policy, as bench --breakdown measures it
            peak_tflops = matmul_peak_tflops(variant.precision, device=device)
        row["allocator"] = set_training_malloc_policy(strategy, device=device.type) or "default"  # as train runs it
        torch.manual_seed(seed)
        training = build_training(job.with_(strategy=strategy), device)
        model, optimizer, scaler = training.model, training.optimizer, training.scaler
        network = model
        if variant.compiled:
            try:
                network = torch.compile(model)
            except Exception as error:  # noqa: BLE001 - any failure to build is reported, not raised
                row["skipped"] = f"torch.compile failed: {_first_line(error)}"
                return row
        torch.manual_seed(seed + 1)
        images, targets = random_batch(job, device)
        images, targets = to_device(images, device, strategy), targets.to(device)
        loss_fn = LOSSES["dice"]
        torch.manual_seed(seed + 2)  # dropout masks
        row["threads_used"] = torch.get_num_threads()

        def step() -> float:
            start = time.perf_counter()
            train_step(network, optimizer, images, targets, loss_fn, strategy, scaler)
            synchronize(device)
            return time.perf_counter() - start

        try:
            for _ in range(warmup):
                row["warmup_s"].append(step())
            if variant.compiled and not warmup:
                row["warmup_s"].append(step())  # never time the compilation
        except Exception as error:  # noqa: BLE001
            if not variant.compiled:
                raise
            row["skipped"] = f"torch.compile failed: {_first_line(error)}"
            _reset_dynamo()
            return row
        seconds = [step() for _ in range(repeats)]
    if variant.compiled:
        row["compile_s"] = row["warmup_s"][0]  # the first step compiles forward and backward
        _reset_dynamo()
    median = statistics.median(seconds)
    samples = job.effective_batch
    row.update(step_s=median, step_s_min=min(seconds), step_s_max=max(seconds), step_s_all=seconds,
               images_per_s=samples / median, voxels_per_s=samples * math.prod(job.shape) / median,
               tflops=row["step_flops"] / median / 1e12)
    row.update(peak_tflops=peak_tflops, fraction_of_peak=row["tflops"] / peak_tflops if peak_tflops else None)
    return row


def _reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - only frees caches
        pass
