"""Training speed: the paper's Figure 6 (stock vs oneDNN vs bf16 / channels-last / compiled) and a
training wall-time estimate, both measured with :func:`fullres.step.train_step` itself.

* :func:`matmul_peak_tflops` - measured dense matmul throughput (``torch.mm``), the roofline a step is
  compared against.
* :func:`step_flops` - FLOPs of one training step (forward + backward of every micro-batch), counted by
  ``torch.utils.flop_counter.FlopCounterMode`` while ``train_step`` really runs. Only matrix-product
  operators are counted (convolutions and their backward: 2 x multiply-adds, bias excluded); the loss,
  ReLU, pooling, norms and the Adam update are not FLOPs in this sense.
* :class:`Variant`, :func:`default_variants`, :func:`time_variant`, :func:`run_bench` - the speed table.
* :func:`figure6_chart` - the bar chart.
* :func:`calibrate`, :func:`calibration`, :func:`estimate_time` - seconds per step and per validation
  case on this machine (measured once, cached), and the wall time of a whole training run.

Exact FLOP scaling
------------------
Every counted operator is a convolution whose count is ``2 x batch x C_in x C_out x kernel volume x
voxels`` at its level (output voxels for a convolution, input voxels for a transposed one), and each
level holds ``voxels / 8**level`` voxels. The count of a step is therefore exactly
``effective batch x voxels x (count of one 16^3 sample) / 16^3`` for a fixed network and strategy
(checkpointing's recomputation included), whatever the shape's aspect. :func:`step_flops` counts
one 16^3 sample and scales; :func:`count_step_flops` counts the job as given, and the tests check
that both agree.
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
from typing import Callable, Iterator, Sequence

import torch

from fullres.config import JobConfig, Strategy
from fullres.errors import UserError
from fullres.files import cache_lookup, cache_store, user_cache_dir

__all__ = ["Variant", "default_variants", "select_variants", "matmul_peak_tflops", "step_flops", "forward_flops",
           "count_flops", "count_step_flops", "count_forward_flops", "time_variant", "run_bench", "figure6_chart",
           "calibrate", "calibration", "calibration_job", "estimate_time", "split_sizes", "machine_info"]

MATMUL_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
UNIT_SHAPE = (16, 16, 16)  # the smallest shape every norm accepts (the 2^3 bottleneck has > 1 voxel)
UNIT_VOXELS = math.prod(UNIT_SHAPE)
DEFAULT_CALIBRATION_FLOPS = 2e11  # at most this many FLOPs per calibration step (seconds on a laptop CPU)
CACHE_FILE = "calibration.json"
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------------

def _device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    device = _device(device)
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


# ------------------------------------------------------------------------------------------------
# matmul peak
# ------------------------------------------------------------------------------------------------

def matmul_peak_tflops(dtype: str | torch.dtype, size: int = 2048, repeats: int = 3,
                       device: str | torch.device = "cpu") -> float:
    """Measured dense ``torch.mm`` throughput of two size x size matrices in `dtype` ("fp32" or "bf16"):
    one warm-up product, then the median of `repeats` timed ones; TFLOP/s with 2 n^3 FLOPs per product.

    On a CPU without native bf16 (AVX2, AVX-512 without BF16) bf16 products are emulated and much slower
    than fp32: that is the honest peak for bf16 there. On CUDA the fp32 product uses the math cuDNN's fp32
    convolutions use (`torch.backends.cudnn.allow_tf32`, on by default: TF32 tensor cores), so a step's
    fraction of the fp32 peak compares like with like.
    """
    if isinstance(dtype, str):
        if dtype not in MATMUL_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(MATMUL_DTYPES)}, got {dtype!r}")
        dtype = MATMUL_DTYPES[dtype]
    if size < 1 or repeats < 1:
        raise ValueError("size and repeats must be >= 1")
    device = _device(device)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    try:
        torch.mm(a, b, out=out)  # warm-up: thread pool, kernel selection, page faults
        _sync(device)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            _sync(device)
            seconds.append(time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    return 2 * size**3 / statistics.median(seconds) / 1e12


# ------------------------------------------------------------------------------------------------
# FLOPs
# ------------------------------------------------------------------------------------------------

def _loss():
    from fullres.metrics import soft_dice_loss

    return soft_dice_loss


def _make_batch(job: JobConfig, device: torch.device, batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and {0, 1} targets shaped like the model's output (as `fullres profile` makes them)."""
    from fullres.memory.measure import make_batch

    if batch is not None:
        job = job.with_(batch=batch, strategy=replace(job.strategy, accumulate=1))
    return make_batch(job, device)


def count_flops(run: Callable[[], object]) -> int:
    """FLOPs that FlopCounterMode counts while `run()` executes (forward, and backward when it runs one)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


def count_step_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one training step of `job` as given, counted by FlopCounterMode while ``train_step``
    really runs (fresh model, Adam, random inputs of the whole effective batch). Costs one real step."""
    from fullres.model import UNet3D
    from fullres.step import prepare_model, to_device, train_step

    device = _device(device)
    torch.manual_seed(0)
    model = prepare_model(UNet3D(job.model).to(device), job.strategy)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images, targets = _make_batch(job, device)
    images = to_device(images, device, job.strategy)
    return count_flops(lambda: train_step(model, optimizer, images, targets, _loss(), job.strategy))


def count_forward_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one validation forward pass (batch 1, eval mode, no gradients) at `job`'s shape, counted."""
    from fullres.model import UNet3D

    device = _device(device)
    model = UNet3D(job.model).to(device).eval()
    images = torch.zeros(1, job.model.in_channels, *job.shape, device=device)
    with torch.no_grad():
        return count_flops(lambda: model(images))


def _unit_job(job: JobConfig) -> JobConfig:
    """One 16^3 sample, one micro-batch, the same network and checkpointing. Precision and memory layout
    change no count (FlopCounterMode counts by shapes; the tests check it), so the unit runs in fp32,
    contiguous: emulated bf16 on a CPU without native bf16 would make counting seconds slower.
    With slabs the unit keeps the job's H (the slabs' halo rows are recomputed work that depends on H),
    H x 16 x 16: every level's count is then exactly proportional to W x D."""
    shape = UNIT_SHAPE if job.strategy.slabs == 1 else (job.shape[0], *UNIT_SHAPE[1:])
    return job.with_(shape=shape, batch=1,
                     strategy=replace(job.strategy, accumulate=1, precision="fp32", channels_last=False))


def _scale(unit_count: int, unit: JobConfig, samples: int, voxels: int) -> int:
    unit_voxels = math.prod(unit.shape)
    total = unit_count * samples * voxels
    if total % unit_voxels:  # cannot happen for shapes that are multiples of 8 (see the module docstring)
        raise AssertionError(f"FLOP count {unit_count} does not scale exactly to {voxels} voxels")
    return total // unit_voxels


def step_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one training step of `job` (forward + backward, all micro-batches), counted by
    FlopCounterMode running ``train_step`` on real tensors: on the job itself when it is no bigger than
    its unit, else on the unit (one 16^3 sample; H x 16 x 16 with slabs) and scaled exactly by effective
    batch x voxels / unit voxels (see the module docstring; the tests check the scaling against direct
    counts)."""
    voxels, unit = math.prod(job.shape), _unit_job(job)
    if job.effective_batch * voxels <= math.prod(unit.shape):
        return count_step_flops(job, device)
    return _scale(_unit_flops(unit, "step"), unit, job.effective_batch, voxels)


def forward_flops(job: JobConfig, device: str | torch.device = "cpu") -> int:
    """FLOPs of one validation case's forward pass (batch 1) at `job`'s shape, counted (scaled as above)."""
    voxels, unit = math.prod(job.shape), _unit_job(job)
    if voxels <= math.prod(unit.shape):
        return count_forward_flops(job, device)
    return _scale(_unit_flops(unit, "forward"), unit, 1, voxels)


_UNIT_COUNTS: dict[tuple[JobConfig, str], int] = {}


def _unit_flops(unit: JobConfig, kind: str) -> int:
    key = (unit, kind)
    if key not in _UNIT_COUNTS:
        _UNIT_COUNTS[key] = count_step_flops(unit) if kind == "step" else count_forward_flops(unit)
    return _UNIT_COUNTS[key]


# ------------------------------------------------------------------------------------------------
# variants
# ------------------------------------------------------------------------------------------------

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
    if _device(device).type != "cpu":
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
    here: :mod:`fullres.memory.malloc`) and, compiled, ``compile_s`` (the first step's time). A compiled
    variant that torch.compile cannot build (no C compiler, an unsupported operator) is returned with
    ``skipped`` (the reason) and None timings instead of raising."""
    from fullres.memory.malloc import set_training_malloc_policy
    from fullres.model import UNet3D
    from fullres.step import make_grad_scaler, prepare_model, to_device, train_step

    if warmup < 0 or repeats < 1:
        raise ValueError("warmup must be >= 0 and repeats >= 1")
    device = _device(device)
    strategy = variant.strategy(job)
    row: dict = {**asdict(variant), "description": variant.describe(), "skipped": None, "step_s": None,
                 "step_s_min": None, "step_s_max": None, "step_s_all": [], "warmup_s": [], "images_per_s": None,
                 "voxels_per_s": None, "step_flops": step_flops(job.with_(strategy=strategy)), "tflops": None,
                 "peak_tflops": peak_tflops, "fraction_of_peak": None}
    with variant_context(variant, device):
        row["allocator"] = set_training_malloc_policy(strategy, device=device.type) or "default"  # as train runs it
        torch.manual_seed(seed)
        model = prepare_model(UNet3D(job.model).to(device), strategy)
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        scaler = make_grad_scaler(strategy, device.type)
        network = model
        if variant.compiled:
            try:
                network = torch.compile(model)
            except Exception as error:  # noqa: BLE001 - any failure to build is reported, not raised
                row["skipped"] = f"torch.compile failed: {_first_line(error)}"
                return row
        torch.manual_seed(seed + 1)
        images, targets = _make_batch(job, device)
        images, targets = to_device(images, device, strategy), targets.to(device)
        loss_fn = _loss()
        torch.manual_seed(seed + 2)  # dropout masks
        row["threads_used"] = torch.get_num_threads()

        def step() -> float:
            start = time.perf_counter()
            train_step(network, optimizer, images, targets, loss_fn, strategy, scaler)
            _sync(device)
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
    if peak_tflops is None:
        peak_tflops = matmul_peak_tflops(variant.precision, device=device)
    row.update(peak_tflops=peak_tflops, fraction_of_peak=row["tflops"] / peak_tflops if peak_tflops else None)
    return row


def _reset_dynamo() -> None:
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001 - only frees caches
        pass


def run_bench(job: JobConfig, variants: Sequence[Variant] | None = None, warmup: int = 1, repeats: int = 3,
              device: str | torch.device = "cpu", peak_size: int = 2048, seed: int = 0) -> dict:
    """Figure 6's measurements: the matmul peaks, every variant's step timing, and the speed-ups.

    Returns (JSON-ready) ``{"matmul_peak_tflops": {"fp32", "bf16"}, "variants": [time_variant rows],
    "speedups": {"onednn_vs_stock", "best_vs_plain_fp32"}, "best_variant", "job", "step_flops",
    "warmup", "repeats", "date", "torch", "threads", "cpu_capability", "machine"}``. Speed-ups are
    ratios of the median step times of this run (None when a row is missing or skipped); each row
    also gets ``speedup_vs_stock``.
    """
    device = _device(device)
    variants = list(default_variants(device) if variants is None else variants)
    machine = machine_info(device)
    precisions = sorted({v.precision for v in variants} | {"fp32"}, key=list(MATMUL_DTYPES).index)
    peaks = {p: None for p in MATMUL_DTYPES}
    for precision in precisions:
        peaks[precision] = matmul_peak_tflops(precision, size=peak_size, device=device)
    rows = [time_variant(job, v, warmup, repeats, device=device, peak_tflops=peaks[v.precision], seed=seed)
            for v in variants]
    timed = {row["name"]: row["step_s"] for row in rows if row["step_s"]}
    stock, plain = timed.get(STOCK), timed.get(PLAIN)
    for row in rows:
        row["speedup_vs_stock"] = stock / row["step_s"] if stock and row["step_s"] else None
    best = min(timed, key=timed.get) if timed else None
    return {
        "matmul_peak_tflops": peaks,
        "variants": rows,
        "speedups": {"onednn_vs_stock": stock / plain if stock and plain else None,
                     "best_vs_plain_fp32": plain / timed[best] if plain and best else None},
        "best_variant": best,
        "job": job.to_json(),
        "step_flops": step_flops(job),
        "warmup": warmup,
        "repeats": repeats,
        "date": machine["date"],
        "torch": machine["torch"],
        "threads": machine["threads"],
        "cpu_capability": machine["cpu_capability"],
        "machine": machine,
        "load_average_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------------
# Figure 6
# ------------------------------------------------------------------------------------------------

def figure6_chart(result: dict, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Figure 6 as measured: training images/s per variant (bars), each bar labelled with its step time
    and its speed-up over stock (oneDNN off); skipped variants are shown as such. Written atomically."""
    from fullres.figures import _new_figure, _save_atomic

    rows = result["variants"]
    if not rows:
        raise ValueError("the result has no variants to chart")
    stock = next((r["step_s"] for r in rows if r["name"] == STOCK and r["step_s"]), None)
    fig = _new_figure((max(6.0, 1.35 * len(rows) + 2.0), 5.0), dpi)
    ax = fig.subplots()
    names = [r["name"] for r in rows]
    values = [r["images_per_s"] or 0.0 for r in rows]
    colours = ["tab:grey" if r["name"] == STOCK else "tab:orange" if r["compiled"] else
               "tab:green" if r["precision"] == "bf16" else "tab:blue" for r in rows]
    bars = ax.bar(range(len(rows)), values, color=colours)
    top = max(values) if any(values) else 1.0
    for bar, row in zip(bars, rows):
        if row["step_s"] is None:
            label = "skipped"
        else:
            label = f"{row['step_s']:.3g} s/step"
            if stock:
                label += f"\n×{stock / row['step_s']:.2f}"
        ax.annotate(label, xy=(bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=9)
    ax.set_ylim(0, top * 1.45)  # room above the bars for their labels and the legend
    ax.set_ylabel("training images / s")
    job = result.get("job") or {}
    shape = "x".join(map(str, job.get("shape", [])))
    strategy = job.get("strategy", {})
    batch = job.get("batch", 0) * strategy.get("accumulate", 1)
    filters = job.get("model", {}).get("filters", "?")
    machine = result.get("machine", {})
    from matplotlib.patches import Patch

    gpu = machine.get("gpu")
    library, fp32 = ("cuDNN", f"cuDNN fp32 ({machine.get('fp32_math', 'fp32')})") if gpu else ("oneDNN", "oneDNN fp32")
    legend = [Patch(color=c, label=l) for c, l in (("tab:grey", "stock (oneDNN off)"), ("tab:blue", fp32),
                                                     ("tab:green", f"{library} bf16"), ("tab:orange", "torch.compile"))
              if c in colours]
    ax.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8, frameon=False)
    where = gpu or f"{machine.get('cpu', machine.get('device', ''))}, threads: {result.get('threads', '?')}"
    ax.set_title(f"Training step speed: batch {batch} x {shape}, {filters} filters\n"
                 f"{where}, torch {result.get('torch', '?')} ({result.get('date', '')[:10]})"
                 + ("" if stock or gpu else "; no stock row: no speed-up"), fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.22, top=0.86)
    return _save_atomic(fig, path, dpi)


# ------------------------------------------------------------------------------------------------
# training wall-time estimate
# ------------------------------------------------------------------------------------------------

def _memory_bytes(job: JobConfig) -> int:
    from fullres.memory import table1_training_bytes

    return table1_training_bytes(job)


def calibration_job(job: JobConfig, max_flops: float = DEFAULT_CALIBRATION_FLOPS,
                    memory_bytes: int | None = None, device: str | torch.device = "cpu") -> JobConfig:
    """The job itself when one step is at most `max_flops` and (Table 1 estimate) half of `memory_bytes`;
    otherwise a scaled-down copy: the micro-batch halved first (per-sample kernels keep their shapes),
    then accumulation, then the largest spatial axis halved (multiples of 8, at least 16 each)."""
    from fullres.train import available_memory  # the preflight's own reading of free memory

    memory_bytes = available_memory(_device(device)) if memory_bytes is None else memory_bytes

    def too_big(candidate: JobConfig) -> bool:
        return step_flops(candidate) > max_flops or 2 * _memory_bytes(candidate) > memory_bytes

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
    from fullres.memory.malloc import set_training_malloc_policy
    from fullres.model import UNet3D
    from fullres.step import autocast, make_grad_scaler, prepare_model, to_device, train_step

    set_training_malloc_policy(job.strategy, device=device.type)  # timed under the allocator `train` uses
    torch.manual_seed(0)
    model = prepare_model(UNet3D(job.model).to(device), job.strategy)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(job.strategy, device.type)
    images, targets = _make_batch(job, device)
    images, targets = to_device(images, device, job.strategy), targets.to(device)
    loss_fn = _loss()
    seconds = []
    for index in range(1 + steps):
        start = time.perf_counter()
        train_step(model, optimizer, images, targets, loss_fn, job.strategy, scaler)
        _sync(device)
        if index:
            seconds.append(time.perf_counter() - start)
    update = []
    for _ in range(2):
        start = time.perf_counter()
        optimizer.step()  # the last step's gradients are still there
        _sync(device)
        update.append(time.perf_counter() - start)
    del images, targets, optimizer
    model.eval()
    image = to_device(_make_batch(job, device, batch=1)[0], device, job.strategy)
    forward = []
    with torch.no_grad():
        for index in range(1 + forwards):
            start = time.perf_counter()
            with autocast(job.strategy, device.type):
                model(image).float()
            _sync(device)
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
    device = _device(device)
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
