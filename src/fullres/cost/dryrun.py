"""Dry run: the peak memory of training steps, computed by running them on fake tensors.

``dryrun(job)`` builds the model under ``FakeTensorMode`` (no storage is ever allocated), makes fake
inputs and targets, and runs :func:`fullres.job.step.train_step` itself (the function train, profile
and bench run) for two steps under a ``TorchDispatchMode`` that follows every tensor storage from the
op that creates it until Python frees it. ``.item()`` on a fake tensor (the loss, Adam's step
count) answers 1.0; nothing in the step branches on it.

Definition of peak
------------------
The peak is the largest memory in use at any point while the job's model, optimizer and inputs
exist and ``steps`` training steps run, measured from the moment right after ``torch`` and
``fullres`` are imported and before the model exists. On CPU this is what
:func:`fullres.cost.measure.measure_peak` measures: the process's peak resident set size
(``VmHWM``) minus its RSS right after the imports. Hence the model's parameters count, and so do
the inputs (the effective batch of images and targets), the gradients, Adam's two moment buffers,
the tensors autograd saves for backward, the temporaries of forward, backward and the optimizer
update, and the memory the operators allocate inside themselves (oneDNN reorders and scratch
buffers), which no tensor shows. Adam's state exists from the end of the first step, so the
*second* step is the peak one (its backward runs with the moment buffers alive); the dry run
therefore runs two steps, like ``measure_peak`` does by default.

On CUDA the peak is ``torch.cuda.max_memory_allocated()``, which counts the caching allocator's blocks:
every storage is replayed through :class:`fullres.kernels.cuda_allocator.CachingAllocatorModel` (so
``reserved_bytes`` estimates ``max_memory_reserved()`` too), and the one operator workspace that matters
there, the bias-gradient sum's buffer, is modelled in :func:`cuda_bias_gradient_buffer_bytes`. Measured
on an H100 for channels-last jobs from 64^3 to 240x240x144, fp32 and bf16, with and without
checkpointing: within 0.1 %. Jobs in the contiguous layout measured 12-22 % higher (cuDNN's workspaces
for NCDHW tensors, not modelled); :data:`CUDA_CONTIGUOUS_NOTE` says so wherever such an estimate is shown.

On CPU under fullres's pool (the allocator policy of channels-last jobs without a memory strategy: fp32, and
bf16 on CPUs with native AVX-512 bf16 and without AMX; :mod:`fullres.kernels.malloc`) the same model replays
the pool, which follows the same rules: the peak is the largest of its reserved bytes (segments mapped
populated and kept) plus what an operator allocates outside it (oneDNN's scratchpad), :func:`pool_op_workspace`
saying which is which. The replay is exact for the allocations it is given (tested on a real trace), and the
reserved bytes it computes equal a real step's at 16^3 and 32^3 (0.9 % under at 64^3, 8 % under at 32^3 x 2, where
oneDNN takes one more buffer than modelled); estimates of fp32 jobs from 32^3 to 128^3 measured within -4.0..+2.3 %
(docs/memory.md). A segment the replay gets wrong costs a whole feature map, so these buffers matter.

Terms
-----
``breakdown`` splits the bytes live at the peak:

* ``parameters``, ``gradients``, ``optimizer_state`` (Adam ``exp_avg``, ``exp_avg_sq``, ``step``),
  ``inputs`` (images and targets, the whole effective batch: ``train_step`` receives it at once),
* ``activations``: tensors created in a forward pass and still alive (saved for backward, logits),
* ``transient``: tensors created in backward (activation gradients, recomputed segments under
  checkpointing) or by the optimizer update, alive at the peak,
* ``workspace``: memory an operator uses inside itself, modelled per operator in
  :func:`op_workspace` from first principles and checked against measurements (see there),
* ``allocator_cache``: on CPU under the pool (:mod:`fullres.kernels.cpu_pool`), what its segments hold
  beyond the blocks in use at the tensors' peak: the pool's segments are mapped populated and kept, so
  the peak is its reserved bytes, replayed through the same rules as CUDA's allocator,
* ``runtime``: the fixed cost of the CPU runtime's first step (lazy imports, code pages); see
  :data:`CPU_RUNTIME_BYTES`. 0 on CUDA.
"""

from __future__ import annotations

import math
import sys
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false as is_non_overlapping_and_dense
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    UnsupportedOperatorException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fullres.cost import onednn_scratchpad
from fullres.engine.losses import LOSSES
from fullres.engine.spatial import simulated
from fullres.job.config import JobConfig
from fullres.job.step import autocast, build_training, prepare_model, to_device, train_step, use_space
from fullres.kernels import device as fullres_device  # its avx512(): one switch for the model and this estimate
from fullres.kernels.cuda_allocator import CachingAllocatorModel, round_size
from fullres.kernels.gpus import MODELLED_MULTIPROCESSORS
from fullres.kernels.malloc import bf16_pool_modelled, policy_for
from fullres.kernels.onednn import as_asked, select_conv_backend
from fullres.nets.registry import build_model

aten = torch.ops.aten

CATEGORIES = ("parameters", "gradients", "optimizer_state", "inputs", "activations", "transient", "workspace",
              "allocator_cache", "runtime")

# Memory a CPU training process gains on its first step that no tensor owns, measured (not fitted) as
# measured - dry run for the smallest job (filters 1, 8^3, batch 1: 0.9 MiB of tensors; torch 2.13 CPU,
# Linux x86-64, 2 threads): 86.6 MiB, of which ~67 MiB is anonymous memory of the 828 Python modules
# (torch._dynamo, sympy, ...) that constructing torch.optim.Adam imports, and ~19 MiB file-backed
# pages of libtorch_cpu / oneDNN code touched for the first time by the forward, backward and update.
# It does not grow with the job; on CUDA (max_memory_allocated) it is 0.
CPU_RUNTIME_BYTES = 86 * 2**20 + 570 * 2**10
# What a bf16 (autocast) step adds to that, measured the same way (filters 1, 8^3, batch 1, measured -
# dry run, bf16 minus fp32, torch 2.13 CPU on an AVX-512-BF16 machine, twice each, contiguous and
# channels-last alike): 14.2 MiB, the code of oneDNN's bf16 kernels and of autocast, touched once.
CPU_AUTOCAST_RUNTIME_BYTES = 14 * 2**20 + 200 * 2**10


# What a CUDA training process holds on the GPU that no tensor owns and max_memory_allocated does not count:
# the CUDA context, cuDNN's and cuBLAS's handles and the kernels loaded (CUDA 12 loads them lazily). Not
# measured by fullres: a modelled constant of the size nvidia-smi commonly shows for such a process, charged
# where a job is planned against a GPU's memory (the runtime term of estimate and plan on CUDA).
CUDA_RUNTIME_BYTES = 512 * 2**20


def cuda_modelled_parts(stand_in: bool) -> tuple[str, ...]:
    """What a CUDA dry run models rather than measures, one line each (shown with every CUDA estimate);
    `stand_in`: fake CPU tensors stood in for CUDA ones (a torch without CUDA, or no GPU visible)."""
    parts = ["allocator: PyTorch's CUDA caching allocator, replayed by fullres's model of it (block rounding, "
             "segments)",
             f"runtime: the CUDA context, a modelled constant of {CUDA_RUNTIME_BYTES // 2**20} MiB (not measured)",
             "workspaces: cuDNN's are not modelled (the bias-gradient sum's buffer is)"]
    if stand_in:
        parts.append(f"tensors: fake CPU tensors stand in for CUDA's (no GPU here), with CPU autocast's casts; "
                     f"the bias-gradient buffer for {MODELLED_MULTIPROCESSORS} multiprocessors (the most of the "
                     "listed GPUs)")
    return tuple(parts)


def cuda_stand_in(device: str) -> bool:
    """Whether a dry run on `device` runs fake CPU tensors in place of CUDA ones: a CUDA job where this
    torch sees no GPU (autograd needs CUDA's device guard, which a torch without CUDA lacks even for fake
    tensors)."""
    return torch.device(device).type == "cuda" and not torch.cuda.is_available()


CUDA_CONTIGUOUS_NOTE = ("on CUDA only channels-last jobs are modelled exactly (measured within 0.1 %); without "
                        "--channels-last, cuDNN's workspaces made real peaks 12-22 % higher on an H100")
# Measured on an AVX-512 bf16 CPU (AMD Zen 4), bf16 jobs 32^3 to 96x96x64, five fresh processes each (docs/memory.md).
GLIBC_HEAP_NOTE = ("this job runs under glibc's default heap, whose leftovers make its peak vary from run to run "
                   "(bf16 jobs: up to 6 % between runs, the dry run -4.5..+5.2 % of their medians); "
                   "FULLRES_MALLOC=fixed makes the peak follow the estimate (within 1 %) for 0-7 % slower steps "
                   "(+30 % at 32^3 x 1, more on smaller jobs)")


@dataclass(frozen=True)
class DryRunResult:
    peak_bytes: int
    breakdown: dict[str, int]
    peak_at: str
    saved_bytes: int = 0  # the most forward-pass tensors alive at once (what autograd saves for backward)
    seconds: float = 0.0
    job: dict = field(default_factory=dict)
    reserved_bytes: int | None = None  # the caching allocator's segments: CUDA (max_memory_reserved), CPU pool
    allocator: str = "default"  # the CPU allocator policy estimated (fullres.kernels.malloc); CUDA: "default"
    # where oneDNN would compute a weight gradient with its reference kernel on this CPU (~1000x slower)
    reference_kernels: tuple[str, ...] = ()
    modelled: tuple[str, ...] = ()  # what is modelled rather than measured (CUDA: cuda_modelled_parts)

    def to_json(self) -> dict:
        result = {"method": "dryrun", "peak_bytes": self.peak_bytes, "breakdown": dict(self.breakdown),
                  "peak_at": self.peak_at, "allocator": self.allocator}
        if self.reference_kernels:
            result["reference_kernels"] = list(self.reference_kernels)
        if self.reserved_bytes is not None:
            result["reserved_bytes"] = self.reserved_bytes
        if self.modelled:
            result["modelled"] = list(self.modelled)
        return result


# ------------------------------------------------------------------------------------------------
# operator workspaces
# ------------------------------------------------------------------------------------------------

def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


_BACKENDS: dict[tuple, str] = {}


def _untouched(tensor) -> torch.Tensor:
    """A real CPU tensor with `tensor`'s sizes, strides and dtype whose memory is reserved but never
    touched: an anonymous MAP_NORESERVE mapping, so even a multi-terabyte probe costs no memory and is
    not refused by the kernel's overcommit check (a plain torch.empty of 50 GB is)."""
    import mmap

    if tensor.numel() == 0:
        return torch.empty(tuple(tensor.shape), dtype=tensor.dtype)
    elements = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    nbytes = elements * tensor.element_size()
    # MAP_NORESERVE: in the mmap module from Python 3.12; 0x4000 is Linux's value (elsewhere: 0, a plain
    # mapping, still untouched).
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
    flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0) | noreserve
    mapping = mmap.mmap(-1, nbytes, flags=flags)
    flat = torch.frombuffer(mapping, dtype=torch.uint8).view(tensor.dtype)
    return flat.as_strided(tuple(tensor.shape), tuple(tensor.stride()))


def conv_backend(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups) -> str:
    """The name of the kernel family ATen picks for this convolution on this machine (eager's own rules).

    The rules read shapes, strides, dtypes, the thread count and the CPU's features, never the data,
    so they are asked with real tensors of the same layout whose memory is never touched."""
    key = (tuple(input.shape), tuple(input.stride()), input.dtype, tuple(weight.shape), tuple(weight.stride()),
           weight.dtype, bias is not None, tuple(stride), tuple(padding), tuple(dilation), bool(transposed),
           tuple(output_padding), int(groups), torch.get_num_threads())
    if key not in _BACKENDS:
        def probe(x, w):
            b = torch.empty(tuple(bias.shape), dtype=bias.dtype) if isinstance(bias, torch.Tensor) else None
            return select_conv_backend(x, w, b, stride, padding, dilation, transposed, output_padding, groups)

        with torch.utils._python_dispatch._disable_current_modes():
            try:
                backend = probe(_untouched(input), _untouched(weight))
            except (OSError, ValueError, RuntimeError, AttributeError, TypeError):
                # No such mapping here (strict overcommit, an address-space limit, no mmap flags): ask about
                # one sample instead, whose rules are the same but for the largest tensors.
                try:
                    one = torch.empty((1, *input.shape[1:]), dtype=input.dtype)
                    backend = probe(one, torch.empty(tuple(weight.shape), dtype=weight.dtype))
                except RuntimeError:
                    backend = ""
        _BACKENDS[key] = backend or "Slow3d"  # not known: assume the path with the larger workspace
    return _BACKENDS[key]


def _columns_bytes(input, weight, output_voxels: int, transposed: bool) -> int:
    """The vol2col buffer of ATen's slow 3D convolution: (batch, C_in * kD * kH * kW, output voxels)."""
    kernel = math.prod(weight.shape[2:])
    if transposed:  # col2vol of the transposed conv: (batch, C_out * k^3, input voxels)
        return input.shape[0] * weight.shape[1] * kernel * math.prod(input.shape[2:]) * input.element_size()
    return input.shape[0] * weight.shape[1] * kernel * output_voxels * input.element_size()


# oneDNN's convolution backward allocates a scratchpad of its own (weight-gradient reduction buffers
# and the like) that does not grow with the volume: measured on single convolutions and transposed
# convolutions with the allocator policy (peak RSS minus the tensors, 64^3 and 96^3, 32-192 channels,
# fp32 and bf16, 2 threads, torch 2.13 on an AVX-512 bf16 CPU, AMD Zen 4; docs/results/memory.md): 39-53 MB; 45 MB used.
ONEDNN_BACKWARD_SCRATCH_BYTES = 45 * 10**6
# The allocator policies whose peaks repeat, where the runtime term is also calibrated at 64^3
# (fullres.cost.runtime.calibration_shapes) and so holds the ~35 MB a process's first oneDNN backward takes and
# keeps (measured: a convolution of another shape after it adds 0.2-3 MB); there no first call is charged.
TERM_HOLDS_FIRST_CALL = ("pool", "fixed")


# oneDNN offers a primitive only if its scratchpad is at most this (``scratchpad_limit``, 1 GiB); past it the
# convolution's weight gradient falls back to the reference kernel (``ref:any``).
ONEDNN_SCRATCHPAD_LIMIT = 2**30
ONEDNN_JIT_OPERAND_LIMIT = 2**31  # AVX-512: the largest operand its jit/brgemm weight gradients take, exclusive
# What ``ref:any`` computes a weight gradient at, measured on an AVX2-only CPU (AMD EPYC, 2 threads, torch
# 2.13): 128 -> 1 channels, 3^3, 102x128x128, 11.5 GFLOP in 118.7 s (its input gradient and forward apart).
# GEMM ran the same convolution at 100 rows in 5.7 s with its input gradient: the reference kernel is ~100-1000x
# slower.
ONEDNN_REFERENCE_FLOPS_PER_S = 0.1e9


def onednn_reference_weight_gradient(conv: "_Convolution", weight_gradient: bool = True) -> bool:
    """Whether oneDNN computes this channels-last fp32 convolution's weight gradient with its reference kernel:
    on a CPU without AVX-512, where it would run im2col + GEMM, whose scratchpad (the input, transposed, one
    output plane's columns and the weight gradient, :func:`gemm_weight_gradient_bytes`) exceeds
    :data:`ONEDNN_SCRATCHPAD_LIMIT`. Measured on an AVX2-only CPU (oneDNN's verbose log names the kernel): 128
    input channels at 128x128 planes take GEMM up to 100 rows and ``ref:any`` from 102; 116 channels at 128^3
    ``ref:any``, 100 GEMM; 64 channels at 208x128x128 GEMM; 192 channels at 18x240x144 ``ref:any``, 128 at
    20x240x144 GEMM. Contiguous (NCDHW) convolutions shrink their column block instead, and 1x1x1 ones run
    another kernel (``jit_1x1``).

    With AVX-512, where it runs jit or brgemm kernels instead, a channels-last fp32 weight gradient (kernel
    larger than 1x1x1, transposed or not) whose input or output gradient holds :data:`ONEDNN_JIT_OPERAND_LIMIT`
    bytes or more runs ``ref:any`` too. Measured on an AVX-512 + AMX-BF16 CPU (Intel Xeon): the 2x2x2 stride-2
    weight gradient on 128 maps of 120x240x144 (0.989 x 2^31 bytes) ``jit:avx512_core``, of 124x240x144
    ``ref:any``; the 3x3x3 128 -> 128 one at 240x240x144 and PyTorch's deconvolution there ``ref:any``."""
    if _onednn_gemm_weight_gradient(conv, weight_gradient):
        return _gemm_scratchpad_bytes(conv) + _nbytes(conv.weight) > ONEDNN_SCRATCHPAD_LIMIT
    return (fullres_device.avx512() and _onednn_fp32_channels_last_weight_gradient(conv, weight_gradient)
            and max(_nbytes(conv.input), _nbytes(conv.grad_output)) >= ONEDNN_JIT_OPERAND_LIMIT)


def _onednn_gemm_weight_gradient(conv: "_Convolution", weight_gradient: bool) -> bool:
    """Whether oneDNN would compute this weight gradient by im2col + GEMM: channels-last fp32, a kernel
    larger than 1x1x1, not transposed, on a CPU without AVX-512 (and not ATen's slow path)."""
    return (not fullres_device.avx512() and not conv.transposed
            and _onednn_fp32_channels_last_weight_gradient(conv, weight_gradient))


def _onednn_fp32_channels_last_weight_gradient(conv: "_Convolution", weight_gradient: bool) -> bool:
    """A weight gradient oneDNN computes in fp32 channels-last (not ATen's slow path), kernel larger than 1x1x1:
    the kind both reference-kernel rules are about."""
    return (weight_gradient and not conv.forward and not conv.backend.startswith("Slow") and _onednn_channels_last(conv)
            and conv.input.dtype == torch.float32 and math.prod(conv.weight.shape[2:]) > 1)


def _gemm_scratchpad_bytes(conv: "_Convolution") -> int:
    plane = math.prod(conv.grad_output.shape[3:])
    columns = conv.input.shape[1] * math.prod(conv.weight.shape[2:]) * plane * conv.input.element_size()
    return _nbytes(conv.input) + columns


def reference_weight_gradient_flops(func, args) -> int:
    """FLOPs of `func` (an aten operator call) that oneDNN runs on its reference kernel on this CPU
    (:func:`onednn_reference_weight_gradient`): a convolution backward's weight gradient, 2 x N x C_out x
    C_in x kernel volume x output voxels; 0 for everything else."""
    if func is not aten.convolution_backward.default or args[0].device.type != "cpu":
        return 0
    conv = _cpu_convolution(func, args)
    if not onednn_reference_weight_gradient(conv, weight_gradient=bool(args[10][1])):
        return 0
    return 2 * conv.grad_output.numel() * conv.input.shape[1] * math.prod(conv.weight.shape[2:])


def gemm_weight_gradient_bytes(conv: "_Convolution", weight_gradient: bool = True) -> int:
    """What oneDNN's weight gradient of a channels-last fp32 convolution takes on a CPU without AVX-512,
    where it runs im2col + GEMM (``x64:gemm:jit``): a copy of the input and the column buffer of one
    output plane along the first spatial dim, C_in x kernel volume x (the output's last two sizes).

    Measured per operator on an AVX2-only CPU (AMD EPYC, 2 threads, torch 2.13; peak RSS reset before the call):
    exact to 0.2 MB from 16x64x64 to 20x240x144 maps, 4-256 input channels, 1 and 2 threads, with and
    without the input gradient (whose kernel, brgemm, takes nothing). 1x1x1 and transposed convolutions
    run other kernels here and take nothing; AVX-512 CPUs run brgemm for the weight gradient too."""
    if not _onednn_gemm_weight_gradient(conv, weight_gradient) or onednn_reference_weight_gradient(conv):
        return 0  # another kernel; or the reference one, past oneDNN's scratchpad limit, which takes nothing
    return _gemm_scratchpad_bytes(conv)


def onednn_wide_kernel_weight_gradient_bytes(conv: "_Convolution", weight_gradient: bool = True) -> int:
    """The scratchpad oneDNN's channels-last fp32 weight gradient takes from PyTorch's allocator on an AVX-512 CPU
    where the kernel is wider than 14 (UNETR's 16^3 patch embedding): its jit and brgemm kernels refuse such
    widths and im2col + GEMM runs, per sample four weight-sized buffers, the input and one output plane's
    columns (:func:`gemm_weight_gradient_bytes`'s), and 384 bytes. From the pool's trace (AMD Zen 4, 1-4
    threads, 1 and 4 input channels, 384 and 768 out, kernels 15^3 and 16^3 of their own stride, 32^3 to
    96x96x64 inputs, batch 1 and 2): exact at 16^3, 46 KB over at 15^3. 0 for every other convolution."""
    if not (fullres_device.avx512() and _onednn_fp32_channels_last_weight_gradient(conv, weight_gradient)
            and conv.weight.shape[-1] > 14 and not conv.transposed):
        return 0
    batch = conv.input.shape[0]
    per_sample = _gemm_scratchpad_bytes(conv) - _nbytes(conv.input) + _nbytes(conv.input) // batch
    return batch * (4 * _nbytes(conv.weight) + per_sample + 384)


def _contiguous_copy_bytes(tensor) -> int:
    """What ATen's slow path copies to make `tensor` contiguous (0 when it already is)."""
    return 0 if tensor.is_contiguous() else _nbytes(tensor)


def _channels_last(tensor) -> bool:
    """Contiguous in channels-last memory (a 2D map or a 3D one)."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(tensor.dim())
    return layout is not None and tensor.is_contiguous(memory_format=layout)


def cuda_bias_gradient_buffer_bytes(grad_output, multiprocessors: int) -> int:
    """The float buffer CUDA's sum kernel allocates when convolution_backward reduces a channels-last output
    gradient (N, C, D, H, W) to the bias gradient (C): ATen's Reduce.cuh splits each output's reduction over
    `ctas_per_output` blocks when it is long and keeps their partial sums in global memory,
    4 bytes x C x ctas_per_output x block width x output vector size (global_memory_size).

    Its launch configuration, followed here: 128 threads per block (512 / output vector 4), the block's x
    over the outputs (up to a warp), y over the reduction; ctas_per_output = values per thread / 16, at most
    16 blocks per multiprocessor. Measured on an H100 (132 multiprocessors) for C = 8 to 128 and 16^3 to
    128^3, fp32 and bf16 alike: exact (up to 132 MiB at 64^3 x 128 channels). Contiguous gradients reduce
    along rows and need a few KB; fewer than 4 channels are not vectorised and need ~1 KB: both 0 here.
    """
    channels = grad_output.shape[1]
    if not _channels_last(grad_output) or channels < 4:
        return 0
    vector = 4
    block_width = min(32, 1 << (channels // vector).bit_length() - 1)
    block_height = 128 // block_width
    grid_x = -(-channels // (block_width * vector))
    values_per_thread = -(-grad_output.numel() // channels // block_height)
    if values_per_thread < 16 * block_height and values_per_thread < 256:
        return 0  # one block per output column: no global buffer
    ctas_per_output = min(-(-values_per_thread // 16), -(-16 * multiprocessors // grid_x))
    semaphores = round_size(4 * grid_x)  # one int per block column, as the allocator rounds it
    return 4 * channels * ctas_per_output * block_width * vector + semaphores


def _multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


def op_workspace(func, args, kwargs, out, first_call: bool = True) -> int:
    """Bytes `func` allocates inside itself (freed before it returns), beyond its inputs and outputs.

    The convolutions allocate most; a few other CPU operators hold a buffer of an operand's size
    (:data:`_INTERNAL_BLOCKS`: batch norm's backward, a sum into another dtype, softmax over a
    channels-last map, max pooling's and a replication pad's backward on operands of mixed layouts, a roll
    over several dimensions).
    ATen's slow path (``Slow3d``: bf16 convolutions on a CPU
    without native bf16, and fp32 ones at batch 1 whose N x C x D x H is at most 20480, e.g. the first
    convolution's 4 channels below full resolution) unfolds its input into a column buffer of
    C_in x k^3 rows per output voxel, for the whole batch, and works on contiguous copies of
    channels-last tensors. Measured (peak RSS above the tensors, 2 threads, AVX-512 bf16 AMD Zen 4): forward and
    backward each hold one column buffer at a time (4 -> 32 channels at 64^3, channels-last: forward
    117.1 MB, backward 117.4 MB, for 113.2 MB of columns and a 4.2 MB input copy; 32 channels at
    16x32x32: 56.4 MB and 56.6 MB of columns), not the column gradient beside the columns.

    oneDNN convolutions work in their own layouts, measured per operator (see
    ONEDNN_BACKWARD_SCRATCH_BYTES for how): with channels-last tensors forward needs nothing and
    backward its scratchpad (AVX-512; without it, the weight gradient's GEMM buffers,
    :func:`gemm_weight_gradient_bytes`), plus, in bf16, a copy of its input and output gradient for the samples
    its threads work on at once; with contiguous (NCDHW) tensors each primitive also reorders into
    blocked layouts: forward a copy of the larger of input and output (twice the output for a
    transposed convolution), backward a copy of input and output gradient.
    """
    if func in _INTERNAL_BLOCKS:
        return sum(_INTERNAL_BLOCKS[func](args, kwargs)) if args[0].device.type == "cpu" else 0
    if func in _LAYER_NORM:
        return sum(_layer_norm_copies(func, args)) if args[0].device.type == "cpu" else 0
    if func not in (aten.convolution.default, aten.convolution_backward.default):
        return 0
    if args[0].device.type == "cuda":
        return cuda_op_workspace(func, args, _multiprocessors(args[0].device))
    if args[0].device.type != "cpu":
        return 0
    conv = _cpu_convolution(func, args)
    if conv.backend.startswith("Slow"):
        mask = None if conv.forward else args[10]
        return max(sum(phase) for phase in _slow_path_phases(conv, out, mask))
    if _onednn_channels_last(conv):
        layout = sum(_layout_copy_blocks(conv))  # channels-last copies of operands in another layout
    elif conv.forward:
        layout = 2 * _nbytes(out) if conv.transposed else max(_nbytes(conv.input), _nbytes(out))
    else:
        layout = _nbytes(conv.input) + _nbytes(conv.grad_output)  # blocked reorders
    if conv.forward:
        return layout + onednn_transposed_scratch_bytes(conv) + onednn_transposed_forward_copy_bytes(conv)
    # The scratchpad comes with the primitive's creation, the first call at these shapes: measured
    # in a training step's second backward, every convolution's extra is within the copies +- 20 MB.
    # Without AVX-512 the first call takes ~5 MB more (within the runtime term) and GEMM's buffers instead.
    gemm = gemm_weight_gradient_bytes(conv, weight_gradient=bool(args[10][1]))
    gemm += onednn_wide_kernel_weight_gradient_bytes(conv, weight_gradient=bool(args[10][1]))
    scratch = ONEDNN_BACKWARD_SCRATCH_BYTES if first_call and fullres_device.avx512() else 0
    scratch += onednn_strided_input_gradient_bytes(conv, input_gradient=bool(args[10][0]))
    return scratch + layout + sum(_bf16_copy_blocks(conv)) + gemm + onednn_transposed_scratch_bytes(conv)


def onednn_transposed_scratch_bytes(conv: "_Convolution") -> int:
    """The buffer oneDNN's channels-last transposed convolution (ATen's ``MkldnnTranspose``) allocates inside
    each call. Forward: a padded copy of one sample's input per thread, threads x C_in x prod(input size +
    (k - 1) // 2) x element bytes, whatever the batch: on a CPU without AVX-512 for every kernel, on an AVX-512
    one for kernels that overlap (larger than the stride; a kernel-sized stride takes the smaller buffer
    :func:`pool_op_workspace` models). Backward, without AVX-512 and where the kernel overlaps: C_out x
    prod(output size + 2) x 4 bytes plus four weights' worth; none with AVX-512.
    Fitted on the pool's trace (torch 2.13, stride 2; k 3 with padding 1 and output padding 1, and k 2):
    2-core AVX2 EPYC, fp32, 32-128 input channels at 24^3-48^3, batch 1 and 2, 1 and 2 threads, forward within
    0.6 % (9.24 MB for 32 channels at 32^3 on 2 threads), backward within 1 % (3, 8, 16 output channels; none
    for k 2); AVX-512 bf16 AMD Zen 4, k 3: fp32 exact at 32 channels, 32^3, 1 and 2 threads, batch 1 and 2,
    1.5 % under at 64 channels, 16^3; bf16 (2 bytes) 0.9-1.3 % under. Contiguous layouts, and bf16 on AMX
    or without native bf16, not measured (0)."""
    if conv.backend != "MkldnnTranspose" or not _onednn_channels_last(conv):
        return 0
    if not (conv.input.dtype == torch.float32 or conv.input.dtype == torch.bfloat16 and bf16_pool_modelled()):
        return 0
    avx512 = fullres_device.avx512()
    kernel = conv.weight.shape[2:]
    overlaps = any(k > s for k, s in zip(kernel, conv.stride))
    if conv.forward:
        if avx512 and not overlaps:
            return 0
        padded = math.prod(size + (k - 1) // 2 for size, k in zip(conv.input.shape[2:], kernel))
        return torch.get_num_threads() * conv.input.shape[1] * padded * conv.input.element_size()
    if avx512 or not overlaps:
        return 0
    out_channels = conv.weight.shape[1]
    padded = math.prod(size + 2 for size in conv.grad_output.shape[2:])
    return out_channels * padded * 4 + 4 * _nbytes(conv.weight)


def cuda_op_workspace(func, args, multiprocessors: int) -> int:
    """`op_workspace` on CUDA: cuDNN needs no workspace here worth counting (measured); the bias sum does."""
    if func is aten.convolution_backward.default and args[10][2]:
        return cuda_bias_gradient_buffer_bytes(args[0], multiprocessors)
    return 0


@dataclass(frozen=True)
class _Convolution:
    """A CPU convolution call as the workspace models read it (``grad_output`` None in forward)."""

    forward: bool
    input: torch.Tensor
    weight: torch.Tensor
    grad_output: torch.Tensor | None
    transposed: bool
    backend: str  # the kernel family ATen picks: "Slow3d", "Mkldnn", ...
    pointwise: bool = False  # 1x1x1, stride 1, no padding: the slow path reads its input as the columns
    stride: tuple[int, ...] = (1, 1, 1)
    padding: tuple[int, ...] = (0, 0, 0)
    plain: bool = True  # one group, no dilation
    bias: bool = False


def _cpu_convolution(func, args) -> _Convolution:
    if func is aten.convolution.default:
        input, weight, bias, stride, padding, dilation, transposed, output_padding, groups = args[:9]
        grad_output = None
    else:  # convolution_backward
        grad_output, input, weight, _, stride, padding, dilation, transposed, output_padding, groups = args[:10]
        bias = torch.empty(weight.shape[1 if transposed else 0]) if args[3] is not None else None
    backend = conv_backend(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    pointwise = math.prod(weight.shape[2:]) == 1 and all(s == 1 for s in stride) and not any(padding)
    plain = int(groups) == 1 and all(d == 1 for d in dilation)
    has_bias = bias is not None if grad_output is None else bool(args[10][2])  # backward: the bias gradient asked
    return _Convolution(grad_output is None, input, weight, grad_output, bool(transposed), backend, pointwise,
                        tuple(stride), tuple(padding), plain, has_bias)


def _sum_cast_blocks(args, kwargs) -> list[int]:
    """A CPU sum asked for another dtype than its input's (a bf16 bias gradient summed in fp32) first converts
    the whole input to that dtype: one block of its elements in the new dtype (seen in the pool's trace: 33.6 MB
    for a 2 x 128 x 32^3 bf16 gradient). CUDA's reduction converts as it reads."""
    dtype = kwargs.get("dtype")
    if dtype is None or dtype == args[0].dtype:
        return []
    return [args[0].numel() * torch.empty((), dtype=dtype).element_size()]


def _batch_norm_backward_blocks(args, kwargs) -> list[int]:
    """CPU batch norm's backward (instance norm's too) holds one buffer the size of its input: measured in the
    pool's trace, fp32 and bf16, channels-last and contiguous, batch 1 and 2."""
    return [_nbytes(args[1])]


def _replication_pad_backward_blocks(args, kwargs) -> list[int]:
    """A replication pad's backward copies an output gradient that is not dense (a slice of a concatenation's
    gradient, as MONAI's UpCat pads by zero before it concatenates) into a contiguous one first."""
    grad = args[0]
    return [] if is_non_overlapping_and_dense(grad) else [grad.numel() * grad.element_size()]


def _max_pool_backward_blocks(args, kwargs) -> list[int]:
    """Max pooling's backward with the output gradient in another memory format than the input (channels-last
    against contiguous) computes in the gradient's and converts: a block of the input's size and one of the
    indices'. Measured in the pool's trace, fp32 and bf16, either way round, batch 1 and 2."""
    grad, input, indices = args[0], args[1], args[7]
    return [_nbytes(input), _nbytes(indices)] if _channels_last(grad) != _channels_last(input) else []


def _softmax_blocks(args, kwargs) -> list[int]:
    """Softmax (and log-softmax) over a tensor that is not contiguous (a channels-last map, over its channels)
    first copies it to a contiguous one: measured on single operators, fp32 and bf16, 3 and 8 channels; the
    backward does not."""
    source = args[0]
    return [] if source.is_contiguous() else [source.numel() * source.element_size()]


def _roll_blocks(args, kwargs) -> list[int]:
    """ATen's CPU roll over k > 1 dimensions rolls one dimension at a time: k - 1 intermediate copies of the
    input, taken before the output and freed after it (the pool's trace: A, B, output, free B, free A), where a
    fake tensor makes the output alone. SwinUNETR's shifted windows roll over three."""
    dims = args[2] if len(args) > 2 else kwargs.get("dims", ())
    count = len(dims) if isinstance(dims, (list, tuple)) else 1
    return [_nbytes(args[0])] * max(0, count - 1)


_LAYER_NORM = (aten.native_layer_norm.default, aten.native_layer_norm_backward.default)


def _layer_norm_copies(func, args) -> list[int]:
    """ATen's CPU layer norm works on contiguous operands: a contiguous copy of a non-contiguous input (taken
    before the outputs, freed after them) and, in backward, of a non-contiguous output gradient (taken after
    the gradients): [input copy, output-gradient copy] in bytes, 0 where the operand is contiguous (the pool's
    trace, fp32 and bf16). SwinUNETR normalises permuted maps; fake tensors copy nothing."""
    x = args[0] if func is aten.native_layer_norm.default else args[1]
    copies = [0 if x.is_contiguous() else _nbytes(x)]
    if func is aten.native_layer_norm_backward.default:
        copies.append(0 if args[0].is_contiguous() else _nbytes(args[0]))
    return copies


# Operators other than convolutions that take blocks inside themselves on CPU, and what they take.
_INTERNAL_BLOCKS = {aten.sum.dim_IntList: _sum_cast_blocks, aten.sum.default: _sum_cast_blocks,
                    aten._log_softmax.default: _softmax_blocks,
                    aten.native_batch_norm_backward.default: _batch_norm_backward_blocks,
                    aten.replication_pad3d_backward.default: _replication_pad_backward_blocks,
                    aten.max_pool3d_with_indices_backward.default: _max_pool_backward_blocks,
                    aten._softmax.default: _softmax_blocks, aten.roll.default: _roll_blocks}


def _slow_path_phases(conv: _Convolution, out, mask=None) -> list[list[int]]:
    """ATen's slow path, in phases (each phase's blocks alive together, freed before the next's): its column
    buffer, the contiguous copies of channels-last operands, and of a channels-last weight. Forward is one
    phase; backward one per gradient that needs the columns (`mask`: ATen's output mask), the input gradient's
    (col2vol) and then the weight gradient's (vol2col, beside a weight-sized buffer for the gradient before it
    is copied out). From the pool's trace (AVX-512 bf16 AMD Zen 4, 2 threads, fp32; 16 -> 16 at 32^3, 3 -> 3
    at 64^3, 4 -> 16 stride 2 at 64^3 without an input gradient): forward [weight copy, columns] and the
    output; backward [weight copy, columns] beside the input gradient, then [weight, columns]."""
    voxels = math.prod((out if conv.forward else conv.grad_output).shape[2:])
    # a pointwise convolution needs no columns (ATen's requires_columns): measured, 128 -> 1 at 64x128x128,
    # channels-last, 1 thread: forward 536.6 MB beyond its output (the 536.9 MB contiguous copy of the input)
    columns = 0 if conv.pointwise and not conv.transposed else _columns_bytes(conv.input, conv.weight, voxels,
                                                                                conv.transposed)
    weight_copy = _contiguous_copy_bytes(conv.weight)
    copies = [_contiguous_copy_bytes(conv.input)]
    if conv.forward:
        return [[weight_copy, columns, *copies]]
    copies.append(_contiguous_copy_bytes(conv.grad_output))
    mask = (True, True, False) if mask is None else mask
    phases = [[weight_copy, columns, *copies]] if mask[0] else []
    if mask[1]:
        phases.append([_nbytes(conv.weight), columns, *copies])
    return phases or [copies]


def _onednn_channels_last(conv: _Convolution) -> bool:
    """ATen runs a oneDNN convolution channels-last when its input *or* its weight is channels-last
    (``mkldnn_conv_use_channels_last``): conv1a of a channels-last network fed a contiguous batch; a 2D one
    (a plane of :func:`~fullres.kernels.onednn.planar_weight_gradient`) by the same rule."""
    return _channels_last_2d_or_3d(conv.input) or _channels_last_2d_or_3d(conv.weight)


def _channels_last_2d_or_3d(tensor) -> bool:
    """ATen's ``suggest_memory_format() == ChannelsLast(3d)`` (c10's is_channels_last_strides_2d/3d: the
    strides' order, ambiguous ones contiguous): a plane's weight, a slice of the 3D weight, is channels-last
    though not contiguous; autocast's bf16 copy of a 1x1x1 weight has contiguous strides, and is not,
    though is_contiguous(channels_last_3d) would say so. A batch of one is not looked at: its stride is
    arbitrary, and fake tensors give it another than real ones."""
    if tensor.dim() not in (4, 5):
        return False
    sizes, strides = tensor.shape, tensor.stride()
    smallest = 0
    for d in (1, 3, 2, 0) if tensor.dim() == 4 else (1, 4, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest and not (d == 0 and sizes[0] == 1):
            return False
        if d == 0:
            return sizes[0] == 1 or smallest != strides[1]
        smallest = strides[d] * max(sizes[d], 1)
    return True


def _layout_copy_blocks(conv: _Convolution) -> list[int]:
    """The channels-last copies ATen makes (as tensors) of the operands a channels-last oneDNN convolution
    gets in another layout. Measured in the pool's trace, conv1a at 64^3 fed a contiguous batch (8
    channels after widening): one 8 MiB copy of its input in forward and in backward, nothing outside."""
    if not _onednn_channels_last(conv):
        return []
    operands = [conv.input] if conv.forward else [conv.input, conv.grad_output]
    return [_nbytes(t) for t in operands if not _channels_last(t)]


def onednn_blocked_pointwise_phases(conv: _Convolution, mask=None) -> list[list[int]] | None:
    """The blocks a 1x1x1 oneDNN convolution takes from PyTorch's allocator, in phases, when neither its input
    nor its weight is channels-last by ATen's rule (a 1x1x1 weight with contiguous strides: autocast's bf16
    copy of one, or SwinUNETR's own; MONAI's and nnU-Net's output layers after instance norm), so oneDNN
    runs it blocked (nCdhw16c on AVX-512), channels padded to 16: copies of input and output (gradient) in
    that layout and, in bf16, a scratchpad of fp32 rows per thread (the output's channels in forward, the
    input's in the weight gradient). In backward the weight gradient runs first, then the input gradient.
    Measured in the pool's trace (AVX-512 Zen 4; bf16 at 1-4 threads, batch 1-4, 8-64 channels in, 3-64 out;
    fp32 at 2 threads, 4-96 in, 3-48 out; 4 input channels are padded to 16 too, SwinUNETR's residual 1x1x1
    convolution at 96x96x64), the blocks of 64 KiB and more exactly. None where this does not apply: another
    layout or kernel; bf16 where the bf16 pool is not modelled; fp32 without AVX-512 (8-channel blocks, not
    measured)."""
    bf16 = conv.input.dtype == torch.bfloat16
    if not (conv.pointwise and conv.plain and not conv.transposed and conv.backend == "Mkldnn"
            and not _onednn_channels_last(conv)):
        return None
    if not (bf16 and bf16_pool_modelled() or conv.input.dtype == torch.float32 and fullres_device.avx512()):
        return None
    size, threads, batch = conv.input.element_size(), torch.get_num_threads(), conv.input.shape[0]
    voxels = math.prod(conv.input.shape[2:])  # a sample's, as the output's: stride 1, no padding
    in_channels, out_channels = (-(-conv.weight.shape[i] // 16) * 16 for i in (1, 0))
    source, target = batch * voxels * in_channels * size, batch * voxels * out_channels * size
    if not bf16:
        weight = _nbytes(conv.weight)
        if conv.forward:
            return [[source, weight, target]]
        return ([[target, weight, source]] if mask[1] or mask[2] else []) + \
            ([[target, source, weight]] if mask[0] else [])
    if conv.forward:
        return [[threads * voxels * out_channels * 4 + 128, source, target]]
    phases = [[target, source, threads * voxels * in_channels * 4 + 128]] if mask[1] or mask[2] else []
    return phases + ([[target, source]] if mask[0] else [])


def _blocked_pointwise_script(conv: _Convolution, phases: list[list[int]], mask=None) -> tuple | None:
    """The fp32 blocked 1x1x1 convolution's blocks (:func:`onednn_blocked_pointwise_phases`) in the order of the
    pool's trace (AVX-512 Zen 4, 2 threads, 32 -> 3 channels at 96x96x64): forward, the input's and weight's
    copies and the output's blocked buffer, the two copies freed, then the output; backward, the weight
    gradient's copies, of which the input's outlives the others until the input gradient is taken, then the
    input gradient's copies, the weight and bias gradients last. None in bf16, where the phases say it all."""
    if conv.input.dtype != torch.float32:
        return None
    if conv.forward:
        source, weight, target = phases[0]
        return (("take", source), ("take", weight), ("take", target), ("peak",), ("free", 1), ("free", 0),
                ("outputs", None), ("peak",))
    weights = bool(mask[1] or mask[2])
    script = ()
    if weights:
        target, weight, source = phases[0]
        script += (("take", target), ("take", weight), ("take", source), ("peak",), ("free", 1), ("free", 0))
    if mask[0]:
        script += (("outputs", 1), ("peak",)) + ((("free", 0),) if weights else ())
        target, source, weight = phases[-1]
        script += (("take", target), ("take", source), ("take", weight), ("peak",), ("free",), ("free",), ("free",))
    elif weights:
        script += (("free", 0),)
    return script + (("outputs", None), ("peak",))


def _weight_slice_copy(conv: _Convolution) -> list[int]:
    """A weight that is a slice (the concatenation-free decoder's, a plane of
    :func:`~fullres.kernels.onednn.planar_weight_gradient`) is copied whole before oneDNN reads it."""
    weight = conv.weight
    return [] if weight.is_contiguous() or _channels_last(weight) else [_nbytes(weight)]


def onednn_bf16_weight_gradient_scratchpad(conv: _Convolution, weight_gradient: bool = True) -> int | None:
    """The user scratchpad oneDNN's bf16 weight gradient takes from PyTorch's allocator where
    :func:`~fullres.kernels.malloc.bf16_pool_modelled` (:mod:`fullres.cost.onednn_scratchpad`), for a
    channels-last 3D convolution with one group and no dilation; a transposed one's weight gradient is the
    convolution's with input and output gradient exchanged; 0 without a weight or bias gradient. The channels-last
    2D weight gradients that route around the 3D kernel's bug on maps shorter than the kernel use the same buffers
    with rows for depth (not checked against a trace: small maps, small buffers; oneDNN's full-spatial 2D mode not
    modelled). None where the model does not apply (forward, fp32, AMX, no native bf16, another layout); oneDNN's
    fallbacks to other kernels (kernel width over 14, padding past half the kernel) are not detected."""
    planar = conv.input.dim() == 4
    if (conv.forward or conv.input.dtype != torch.bfloat16 or conv.backend.startswith("Slow") or not conv.plain
            or not _onednn_channels_last(conv) or not bf16_pool_modelled()):
        return None
    if not weight_gradient:
        return 0

    def spatial(sizes) -> tuple[int, ...]:
        # oneDNN's 2D harness splits batch x rows as the 3D one splits batch x depth: rows in depth's place
        return (sizes[0], 1, sizes[1]) if planar else tuple(sizes)

    threads, kernel = torch.get_num_threads(), spatial(conv.weight.shape[2:])
    stride, padding = spatial(conv.stride), spatial(conv.padding)
    # a transposed convolution's weight gradient is the convolution's from its output gradient to its input
    source, target = (conv.grad_output, conv.input) if conv.transposed else (conv.input, conv.grad_output)
    in_channels, out_channels = source.shape[1], target.shape[1]
    bias = conv.bias and not conv.transposed  # oneDNN's deconvolution sums its bias gradient apart
    if conv.pointwise:
        return onednn_scratchpad.bf16_pointwise_weight_gradient_bytes(
            conv.input.shape[0], in_channels, out_channels, spatial(source.shape[2:]), threads, bias)
    return onednn_scratchpad.bf16_weight_gradient_bytes(
        conv.input.shape[0], in_channels, out_channels, spatial(source.shape[2:]), spatial(target.shape[2:]),
        kernel, stride, padding, threads, bias)


def _bf16_copy_blocks(conv: _Convolution) -> list[int]:
    """oneDNN's bf16 backward copies input and output gradient of the samples its threads work on at once
    (measured: batch 4 on 2 threads copies half); none in fp32."""
    if conv.forward or conv.input.dtype != torch.bfloat16:
        return []
    batch = conv.input.shape[0]
    share = min(batch, torch.get_num_threads())
    return [_nbytes(conv.input) * share // batch, _nbytes(conv.grad_output) * share // batch]


# ------------------------------------------------------------------------------------------------
# the tracker
# ------------------------------------------------------------------------------------------------

class _Tracker(TorchDispatchMode):
    """Follows every storage created under it: size, the phase that made it, alive or not."""

    def __init__(self, allocator: CachingAllocatorModel | None = None, workspace_in_allocator: bool = False,
                 cuda_multiprocessors: int | None = None, first_call_scratch: bool = True) -> None:
        super().__init__()
        # whether a convolution backward's first call at its shapes is charged oneDNN's first-call scratchpad
        self.first_call_scratch = first_call_scratch
        # Set where fake CPU tensors stand in for CUDA ones: operators' workspaces are CUDA's, for this many
        # multiprocessors, and no oneDNN kernel runs.
        self.cuda_multiprocessors = cuda_multiprocessors
        # With a caching allocator (CUDA's, or the CPU pool), bytes are counted as its blocks (what
        # max_memory_allocated counts); the CPU pool also serves the operators' workspaces.
        self.allocator = allocator
        self.workspace_in_allocator = workspace_in_allocator
        self.live: dict[int, int] = {}  # serial -> bytes
        self.kind: dict[int, str] = {}  # serial -> creation phase category
        self.serial_of: dict[int, int] = {}  # id(storage) -> serial, only while alive
        self.finalizers: dict[int, weakref.finalize] = {}  # serial -> what frees it
        self.addresses: dict[int, int] = {}  # serial -> its block in the caching allocator's model
        self.next_serial = 0
        self.current = 0
        self.peak = 0
        self.peak_live: dict[int, int] = {}
        self.peak_workspace = 0
        self.peak_at = ""
        self.phase = "setup"
        self.seen_backward: set[tuple] = set()  # convolution backward shapes already run (primitives made)
        self.reference_kernels: list[str] = []  # where a weight gradient runs oneDNN's reference kernel
        self.module_stack: list[str] = []
        self.activations = 0
        self.max_activations = 0

    # storages ----------------------------------------------------------------------------------
    def track(self, tensor: torch.Tensor, kind: str | None = None) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.serial_of:
            return
        serial = self.next_serial
        self.next_serial += 1
        size, address = storage.nbytes(), None
        if self.allocator is not None:
            address, size = self.allocator.malloc(size)
            self.addresses[serial] = address
        self.serial_of[key] = serial
        self.live[serial] = size
        self.kind[serial] = kind or self._phase_kind()
        self.current += size
        if self.kind[serial] == "activations":
            self.activations += size
            self.max_activations = max(self.max_activations, self.activations)
        self.finalizers[serial] = weakref.finalize(storage, self._free, key, serial, address)

    def _free(self, key: int, serial: int, address: int | None = None) -> None:
        if address is not None:
            self.allocator.free(address)
        self.serial_of.pop(key, None)
        self.finalizers.pop(serial, None)
        self.addresses.pop(serial, None)
        size = self.live.pop(serial, 0)
        self.current -= size
        if self.kind.get(serial) == "activations":
            self.activations -= size

    def serial(self, tensor: torch.Tensor) -> int | None:
        return self.serial_of.get(id(tensor.untyped_storage()))

    def _phase_kind(self) -> str:
        if self.phase == "forward":
            return "activations"
        if self.phase in ("backward", "optimizer"):
            return "transient"
        return "setup"

    def _where(self, func) -> str:
        node = torch._C._current_autograd_node()
        phase = "backward" if node is not None else self.phase
        module = self.module_stack[-1] if self.module_stack else ""
        if node is not None:  # the node's module, or (ReLU, pooling: not modules) the module it follows
            named = node.metadata.get("fullres_module", "")
            for next_node, _ in () if named else node.next_functions:
                if next_node is not None and next_node.metadata.get("fullres_module"):
                    named = "after " + next_node.metadata["fullres_module"]
                    break
            module = named or module
        where = f"{phase}: {module}" if module else phase
        if node is not None:
            where += f" ({node.name()})"
        elif phase != "optimizer":
            where += f" ({func.__name__ if hasattr(func, '__name__') else func})"
        return where

    def check_peak(self, func, workspace: int = 0) -> None:
        total = self.current + workspace
        if total > self.peak:
            self.peak = total
            self.peak_live = dict(self.live)
            self.peak_workspace = workspace
            self.peak_at = self._where(func)

    def check_pool_peak(self, func, in_pool: int, outside: int) -> None:
        """Under the CPU pool the process holds the pool's segments (populated, kept) plus what the
        operator allocates outside it."""
        total = self.allocator.reserved + outside
        if total > self.peak:
            self.peak = total
            self.peak_live = dict(self.live)
            self.peak_workspace = in_pool + outside
            self.peak_at = self._where(func)

    # dispatch ----------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:  # .item() on a fake tensor: no data, answer 1
            return 1.0 if args[0].is_floating_point() else 1
        out = func(*args, **kwargs)
        if torch._C._current_autograd_node() is not None and self.phase == "forward":
            self.phase = "backward"
        first_call = True
        if func is aten.convolution_backward.default:
            if self.cuda_multiprocessors is None and reference_weight_gradient_flops(func, args):
                where = self._where(func)
                if where not in self.reference_kernels:
                    self.reference_kernels.append(where)
            key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args[:3])
            first_call = key not in self.seen_backward and self.first_call_scratch
            self.seen_backward.add(key)
        outputs = [tensor for tensor in tree_flatten(out)[0] if isinstance(tensor, torch.Tensor)]
        # the pool carves such an operator's outputs beside its live workspace, as the real order has it
        before = self.workspace_in_allocator and workspace_before_outputs(func, args)
        untracked = outputs if before else []  # tracked once the first phase's blocks are taken
        workspace = pool_op_workspace(func, args, kwargs, out, first_call) if self.workspace_in_allocator else None
        # ATen's copies of the operands come before the outputs, and live until the operator returns
        held = [self.allocator.malloc(size)[0] for size in workspace.held] if workspace is not None else []
        scripted = workspace is not None and workspace.script is not None
        for tensor in [] if before or scripted else outputs:
            self.track(tensor)
        if scripted:
            self._run_script(func, workspace, outputs)
        elif workspace is not None:  # the CPU pool: what the operator takes from it, and what not
            for in_pool in workspace.phases or [[]]:  # no workspace: the peak is still checked after the outputs
                addresses = [self.allocator.malloc(size)[0] for size in in_pool]
                for tensor in untracked:
                    self.track(tensor)
                untracked = []
                self.check_pool_peak(func, sum(workspace.held) + sum(in_pool), workspace.outside)
                for address in reversed(addresses):  # last taken, first freed (as the trace has them)
                    self.allocator.free(address)
        for address in held:
            self.allocator.free(address)
        if workspace is None and self.cuda_multiprocessors is not None:
            self.check_peak(func, cuda_op_workspace(func, args, self.cuda_multiprocessors))
        elif workspace is None:
            self.check_peak(func, op_workspace(func, args, kwargs, out, first_call))
        return out

    def _run_script(self, func, workspace: "PoolWorkspace", outputs: list[torch.Tensor]) -> None:
        """Take and free an operator's blocks and its outputs in the order of `workspace.script`."""
        live, pending = [], list(outputs)
        for step in workspace.script:
            if step[0] == "take":
                live.append((self.allocator.malloc(step[1])[0], step[1]))
            elif step[0] == "free":  # the last block taken, or the one at the given place among those alive
                self.allocator.free(live.pop(step[1] if len(step) > 1 else -1)[0])
            elif step[0] == "outputs":
                count = len(pending) if step[1] is None else step[1]
                for tensor in pending[:count]:
                    self.track(tensor)
                pending = pending[count:]
            else:  # "peak"
                self.check_pool_peak(func, sum(workspace.held) + sum(size for _, size in live), workspace.outside)
        for tensor in pending:
            self.track(tensor)
        for address, _ in reversed(live):
            self.allocator.free(address)


# What oneDNN's channels-last transposed convolution whose kernel is its stride (2^3, stride 2) takes in forward
# on AVX-512 beyond a copy of one sample's input per thread: (fixed, per thread) bytes. From the pool's trace
# (AMD Zen 4, 1-4 threads, 16-512 input channels, half as many or as many out, 8x8x8 to 48x48x32 inputs, batch 1
# and 2): fp32 exact; bf16 0-2 KiB per thread under on some shapes.
TRANSPOSED_FORWARD_EXTRA_BYTES = {torch.float32: (12416, 8216), torch.bfloat16: (16512, 10264)}


def _onednn_per_thread_copy_bytes(sample: int, dtype: torch.dtype) -> int:
    """oneDNN's backward-data kernel (a transposed convolution's forward, a strided one's input gradient): per
    thread `sample` bytes and a little more, plus a fixed part (:data:`TRANSPOSED_FORWARD_EXTRA_BYTES`)."""
    fixed, per_thread = TRANSPOSED_FORWARD_EXTRA_BYTES.get(dtype, TRANSPOSED_FORWARD_EXTRA_BYTES[torch.float32])
    return torch.get_num_threads() * (sample + per_thread) + fixed


def onednn_transposed_forward_copy_bytes(conv: "_Convolution") -> int:
    """The block oneDNN's channels-last transposed convolution whose kernel does not overlap takes in forward on
    AVX-512: per thread, a copy of one sample's input (whatever the batch), and a little more. fp32, and bf16
    where measured (:func:`~fullres.kernels.malloc.bf16_pool_modelled`); 0 for every other convolution."""
    if not (conv.forward and conv.transposed and conv.backend == "MkldnnTranspose" and fullres_device.avx512()
            and _onednn_channels_last(conv) and onednn_transposed_scratch_bytes(conv) == 0):
        return 0
    if not (conv.input.dtype == torch.float32 or conv.input.dtype == torch.bfloat16 and bf16_pool_modelled()):
        return 0
    return _onednn_per_thread_copy_bytes(_nbytes(conv.input) // conv.input.shape[0], conv.input.dtype)


def onednn_strided_input_gradient_bytes(conv: "_Convolution", input_gradient: bool = True) -> int:
    """The block oneDNN's fp32 channels-last input gradient of a strided convolution takes on AVX-512 (the kernel a
    transposed convolution's forward runs): per thread, a copy of one sample's output gradient padded by
    (k - 1) // 2 at the end of each spatial dim, and a little more. From the pool's trace (AMD Zen 4, 1-3 threads,
    16-128 input channels, 2^3 and 3^3 kernels of stride 2, 16^3 to 96x96x64 inputs, batch 1 and 2): exact for
    2^3 kernels, 4-48 KB under for 3^3 ones. 0 for other convolutions (stride 1, transposed, 1x1x1, bf16, ATen's
    slow path; AVX2 not measured). The little more is the transposed forward's, within 128 bytes."""
    if not (input_gradient and not conv.forward and not conv.transposed and fullres_device.avx512()
            and conv.backend == "Mkldnn" and _onednn_channels_last(conv) and conv.input.dtype == torch.float32
            and any(stride > 1 for stride in conv.stride) and math.prod(conv.weight.shape[2:]) > 1):
        return 0
    padded = math.prod(size + (k - 1) // 2 for size, k in zip(conv.grad_output.shape[2:], conv.weight.shape[2:]))
    return _onednn_per_thread_copy_bytes(conv.grad_output.shape[1] * padded * conv.grad_output.element_size(),
                                         torch.float32)


def workspace_before_outputs(func, args) -> bool:
    """Whether an operator takes its workspace from the pool before its outputs (and frees it after them):
    the forward of ATen's slow 3D convolution (in the pool's trace: weight copy, columns, output, then the
    frees), and a roll over several dimensions (:func:`_roll_blocks`). The slow transposed convolution takes
    its output first, as the replay does; the dilated one is not measured."""
    if func is aten.roll.default:
        return args[0].device.type == "cpu"
    return (func is aten.convolution.default and args[0].device.type == "cpu"
            and _cpu_convolution(func, args).backend == "Slow3d")


class PoolWorkspace(NamedTuple):
    """What an operator takes beyond its outputs under the CPU pool (:func:`pool_op_workspace`)."""

    phases: list[list[int]]  # blocks from the pool: each phase's alive together, freed before the next's
    outside: int = 0  # bytes allocated elsewhere (oneDNN's own scratchpad)
    held: tuple[int, ...] = ()  # blocks taken before the outputs and freed after the last phase (ATen's copies)
    # instead of phases, the operator's own order after the held blocks: ("take", bytes), ("free",) the last
    # block taken and not freed, ("outputs", n) the next n outputs (None: the rest), ("peak",)
    script: tuple[tuple, ...] | None = None


def pool_op_workspace(func, args, kwargs, out, first_call: bool = True) -> PoolWorkspace:
    """`op_workspace` split for the CPU pool: the blocks the operator takes from PyTorch's allocator, so
    from the pool, in phases (each phase's blocks are alive together and freed before the next phase's are
    taken), those it holds through all of them, and the bytes it allocates elsewhere.

    Read from the pool's trace of real steps (``fullres.kernels.cpu_pool.trace``; 2 threads, AVX-512 bf16 AMD Zen 4):
    ATen's slow path takes its column buffer and contiguous copies as tensors; a oneDNN convolution takes
    a copy of its weight in forward (two for a weight that is a slice), three weight-sized buffers in
    backward (the weight in the primitive's layout, its gradient before the copy out), a transposed one in
    forward a copy of a sample's input per thread (:func:`onednn_transposed_forward_copy_bytes`), and in bf16
    backward the per-thread copies of input and output gradient (`_bf16_copy_blocks`). oneDNN's scratchpad and
    NCDHW reorders come from its own allocations, outside the pool. With native AVX-512 bf16 and without AMX, a
    bf16 backward takes the weight in one phase and, with a weight gradient, its user scratchpad
    (:func:`onednn_bf16_weight_gradient_scratchpad`) and two weight-sized blocks in the next ones; other
    operators their :data:`_INTERNAL_BLOCKS`. The buffers of :func:`onednn_transposed_scratch_bytes` and, on a
    CPU without AVX-512 (2-core EPYC, fp32 channels-last), the weight gradient's GEMM buffers
    (:func:`gemm_weight_gradient_bytes`) come from PyTorch's allocator, so from the pool, too."""
    if func in _INTERNAL_BLOCKS:
        blocks = _INTERNAL_BLOCKS[func](args, kwargs) if args[0].device.type == "cpu" else []
        return PoolWorkspace([blocks] if blocks else [])
    if func in _LAYER_NORM:
        if args[0].device.type != "cpu":
            return PoolWorkspace([])
        copy_x, *copy_dy = _layer_norm_copies(func, args)
        # the input's copy before the outputs; in backward the output gradient's after them (the pool's trace)
        script = (("outputs", None),) + tuple(("take", size) for size in copy_dy if size) + (("peak",),)
        return PoolWorkspace([], 0, (copy_x,) if copy_x else (), script)
    if func not in (aten.convolution.default, aten.convolution_backward.default) or args[0].device.type != "cpu":
        return PoolWorkspace([])
    conv = _cpu_convolution(func, args)
    if conv.backend.startswith("Slow"):
        phases = _slow_path_phases(conv, out, None if conv.forward else args[10])
        return PoolWorkspace([blocks for blocks in ([size for size in phase if size] for phase in phases) if blocks])
    weight = _nbytes(conv.weight)
    mask = args[10] if not conv.forward else None
    blocked = onednn_blocked_pointwise_phases(conv, mask)
    if blocked is not None:
        script = _blocked_pointwise_script(conv, blocked, mask)
        return PoolWorkspace([], 0, (), script) if script else PoolWorkspace(blocked)
    wanted = mask is not None and bool(mask[1] or mask[2])  # the weight-gradient primitive runs for either
    bf16_scratchpad = None if conv.forward else onednn_bf16_weight_gradient_scratchpad(conv, wanted)
    if bf16_scratchpad is not None:
        # As in the trace: ATen's copies (operands in another layout, a sliced weight), held to the end; the
        # input gradient, then the weight's copy for it; a weight-sized block held to the end, the scratchpad,
        # another weight-sized block, and the weight (and bias) gradient. Nothing outside: the scratchpad
        # ONEDNN_BACKWARD_SCRATCH_BYTES stands for elsewhere.
        held = tuple(_layout_copy_blocks(conv) + _weight_slice_copy(conv))
        script = (("outputs", 1), ("take", weight), ("peak",), ("free",)) if mask[0] else ()
        if bf16_scratchpad:
            script += (("take", weight), ("take", bf16_scratchpad), ("peak",), ("free",), ("take", weight),
                       ("outputs", None), ("peak",), ("free",), ("free",))
        return PoolWorkspace([], 0, held, script)
    wide = 0 if conv.forward else onednn_wide_kernel_weight_gradient_bytes(conv, wanted)
    if wide:
        # As in the trace: the weight's copy and the scratchpad beside it; two weight-sized blocks; the gradients
        script = (("outputs", 1),) if mask[0] else ()
        script += (("take", weight), ("take", wide), ("peak",), ("free",), ("take", weight), ("take", weight),
                   ("peak",), ("free",), ("outputs", None), ("peak",))
        return PoolWorkspace([], 0, tuple(_layout_copy_blocks(conv)), script)
    blocks = [weight] * (1 if conv.forward else 3)
    if conv.forward:
        blocks += _weight_slice_copy(conv)
    strided = 0 if conv.forward else onednn_strided_input_gradient_bytes(conv, bool(mask[0]))
    scratch = onednn_transposed_scratch_bytes(conv)  # taken from PyTorch's allocator too
    if not conv.forward:  # AVX2: GEMM's weight-gradient buffers, from PyTorch's allocator too
        scratch += gemm_weight_gradient_bytes(conv, weight_gradient=bool(args[10][1]))
    copy = onednn_transposed_forward_copy_bytes(conv)  # 0 where the scratch above is taken
    if scratch:
        blocks.append(scratch)
    elif copy:
        blocks.insert(0, copy)  # before the weight's copy
    layout = _layout_copy_blocks(conv)  # tensors: in the pool, not outside it
    copies = _bf16_copy_blocks(conv)
    # the input gradient's weight copy and buffer, freed before the weight gradient's blocks are taken
    phases = [[weight, strided], blocks + copies] if strided else [blocks + copies]
    # outside the pool: what op_workspace counts and the pool does not hold (NCDHW reorders, a first call's
    # scratchpad where the runtime term does not hold it: see TERM_HOLDS_FIRST_CALL)
    in_pool = sum(copies) + sum(layout) + scratch + strided + copy
    outside = op_workspace(func, args, kwargs, out, first_call) - in_pool
    return PoolWorkspace(phases, max(0, outside), tuple(layout))


# ------------------------------------------------------------------------------------------------
# the dry run
# ------------------------------------------------------------------------------------------------

def runtime_bytes(job: JobConfig, device: str = "cpu") -> int:
    """The fixed runtime cost of a training process's first steps (see CPU_RUNTIME_BYTES); 0 on CUDA."""
    if torch.device(device).type != "cpu":
        return 0
    return CPU_RUNTIME_BYTES + (CPU_AUTOCAST_RUNTIME_BYTES if job.strategy.precision != "fp32" else 0)


def dryrun(job: JobConfig, loss: str | Callable = "dice", optimizer: str | Callable = "adam", device: str = "cpu",
           steps: int = 2, runtime: int | None = None, allocator: str | None = None, spatial: int = 1,
           spatial_index: int | None = None) -> DryRunResult:
    """Peak memory of `steps` training steps of `job` (see the module docstring), nothing allocated.

    `loss`: a name of :data:`fullres.engine.losses.LOSSES`, or any callable ``(logits, targets) -> scalar`` (run on
    the fake tensors like the rest of the step; targets as `train` makes them: float (N, 1, H, W, D) for one
    class, int64 for more). `optimizer`: "adam", or any callable ``parameters -> torch.optim.Optimizer``
    (e.g. ``functools.partial(torch.optim.SGD, lr=0.01, momentum=0.99)``): its state is what it allocates
    in its own ``step`` on the fake tensors.

    `runtime` is the CPU runtime term in bytes: None, the constant :func:`runtime_bytes`; the term of
    this network measured on this machine is :func:`fullres.cost.runtime.measured_runtime_bytes`
    (:func:`fullres.cost.estimate.dryrun_estimate` passes it). On CUDA, None is 0 (what
    max_memory_allocated counts) and a number is charged as given (:data:`CUDA_RUNTIME_BYTES`, the context).
    A CUDA job runs on fake CUDA tensors where this torch sees a GPU; elsewhere, a torch without CUDA
    included, fake CPU tensors stand in for them (:func:`cuda_stand_in`) under the same allocator model, with
    CUDA's operator workspaces and no CPU kernel's. `allocator` is the CPU allocator policy
    (:mod:`fullres.kernels.malloc`); None, the one `train` gives the job. Under "pool" the peak is the pool's
    reserved bytes, replayed. A step's FLOPs on the same fake tensors: :func:`fullres.cost.timing.fake_step_flops`.
    `spatial` = S: the peak of one of S processes sharing each sample (``train --spatial``), the one with the most
    rows and two neighbours, its halo buffers and copies included (:func:`fullres.engine.spatial.simulated`);
    `spatial_index`: that of process k.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode


    if not (optimizer == "adam" or callable(optimizer)):
        raise ValueError(f"optimizer: 'adam' or a callable from parameters to an optimizer, got {optimizer!r}")
    started = time.perf_counter()
    loss_fn = loss if callable(loss) else LOSSES[loss]
    allocator = allocator or policy_for(job.strategy, device)
    pooled = torch.device(device).type == "cpu" and allocator == "pool"
    cuda = torch.device(device).type == "cuda"
    caching = CachingAllocatorModel() if cuda or pooled else None
    stand_in = cuda_stand_in(device)
    if stand_in and job.strategy.offload:
        raise ValueError("--offload on CUDA is modelled only where torch sees a GPU (host copies of fake CPU "
                         "tensors cannot be told from the device's)")
    tracker = _Tracker(caching, workspace_in_allocator=pooled,
                       cuda_multiprocessors=MODELLED_MULTIPROCESSORS if stand_in else None,
                       first_call_scratch=allocator not in TERM_HOLDS_FIRST_CALL)
    # the device the fake tensors are made on (CPU ones standing in for CUDA's: see cuda_stand_in)
    tensor_device = "cpu" if stand_in else device
    # fp16's gradient scaler needs CUDA; its state is a few bytes, so the stand-in builds the step without it
    built = job.with_(strategy=replace(job.strategy, precision="bf16")) if stand_in and \
        job.strategy.precision == "fp16" else job
    hooks = []
    with FakeTensorMode(allow_non_fake_inputs=False), tracker, (as_asked() if stand_in else nullcontext()):
        # The model: built on the fake device, its parameters tracked as the first storages.
        with torch.device(tensor_device):
            model = build_model(job.model, job.shape)
        training = build_training(built, tensor_device, model=model,
                                  optimizer=None if optimizer == "adam" else optimizer)
        rows = job.shape[0]
        if spatial > 1:
            space = simulated(job.shape[0], spatial, spatial_index)
            use_space(model, space)
            lo, hi = space.rows(0)
            rows = hi - lo
        parameters = list(model.parameters())
        for p in parameters:
            tracker.track(p, "parameters")
        for name, module in model.named_modules():
            label = name or type(module).__name__

            def pre(mod, inputs, label=label):
                tracker.module_stack.append(label)
                if torch._C._current_autograd_node() is None and tracker.phase != "optimizer":
                    tracker.phase = "forward"

            def post(mod, inputs, output, label=label):
                node = getattr(output, "grad_fn", None)
                if node is not None and "fullres_module" not in node.metadata:
                    node.metadata["fullres_module"] = label  # names the backward node after its module
                if tracker.module_stack and tracker.module_stack[-1] == label:
                    tracker.module_stack.pop()

            hooks.append(module.register_forward_pre_hook(pre))
            hooks.append(module.register_forward_hook(post))
        opt = training.optimizer

        def opt_pre(*_):
            tracker.phase = "optimizer"
            tracker.module_stack.clear()

        hooks.append(opt.register_step_pre_hook(opt_pre))
        hooks.append(opt.register_step_post_hook(lambda *_: setattr(tracker, "phase", "setup")))
        scaler = training.scaler

        # Inputs, as measure_peak makes them: the whole effective batch.
        held = (rows, *job.shape[1:])  # this process's rows of every sample
        images = torch.empty(job.effective_batch, job.model.in_channels, *held, device=tensor_device)
        if job.model.classes == 1:
            targets = torch.empty(job.effective_batch, 1, *held, device=tensor_device)
        else:
            targets = torch.empty(job.effective_batch, 1, *held, dtype=torch.long, device=tensor_device)
        tracker.track(images, "inputs")
        tracker.track(targets, "inputs")
        input_serials = {tracker.serial(images), tracker.serial(targets)}

        # Micro-batches after the second repeat its memory exactly (the same tensors, every .grad already
        # allocated), so at most two run: views of the whole batch, which stays alive, as in train_step.
        # A 16-micro-batch job then costs two micro-batches' dry run, not sixteen.
        micro_batches = min(job.strategy.accumulate, 2)
        run_strategy = replace(job.strategy, accumulate=micro_batches)
        run_images, run_targets = images[:micro_batches * job.batch], targets[:micro_batches * job.batch]
        gradient_serials = set()
        for _ in range(steps):
            tracker.phase = "forward"
            try:
                train_step(model, opt, run_images, run_targets, loss_fn, run_strategy, scaler)
            except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as error:
                op = getattr(error, "func", None) or (error.args[0] if error.args else "an operator")
                raise ValueError(f"network {job.model.architecture}: the dry run cannot follow {op} (its output "
                                 "depends on the data, or it has no shape rule); use --method table1") from None
            tracker.phase = "setup"
            gradient_serials |= {tracker.serial(p.grad) for p in parameters if p.grad is not None}
        state_serials = {tracker.serial(t) for state in opt.state.values() for t in state.values()
                         if isinstance(t, torch.Tensor)}
        parameter_serials = {tracker.serial(p) for p in parameters}
    for hook in hooks:
        hook.remove()

    breakdown = dict.fromkeys(CATEGORIES, 0)
    for serial, size in tracker.peak_live.items():
        if serial in parameter_serials:
            category = "parameters"
        elif serial in input_serials:
            category = "inputs"
        elif serial in state_serials:
            category = "optimizer_state"
        elif serial in gradient_serials:
            category = "gradients"
        else:
            category = tracker.kind[serial]
            if category == "setup":
                category = "transient"
        breakdown[category] += size
    breakdown["workspace"] = tracker.peak_workspace
    if pooled:  # the pool's free blocks at the peak: its segments stay resident from the moment they are mapped
        breakdown["allocator_cache"] = max(0, tracker.peak - sum(breakdown.values()))
    if cuda:
        breakdown["runtime"] = 0 if runtime is None else int(runtime)
    elif torch.device(device).type != "cpu":
        breakdown["runtime"] = 0
    else:
        breakdown["runtime"] = runtime_bytes(job, device) if runtime is None else int(runtime)
    peak = tracker.peak + breakdown["runtime"]
    return DryRunResult(peak_bytes=int(peak), breakdown=breakdown, peak_at=tracker.peak_at,
                        saved_bytes=tracker.max_activations, seconds=time.perf_counter() - started,
                        job=job.to_json(), reserved_bytes=caching.reserved if caching else None, allocator=allocator,
                        reference_kernels=tuple(tracker.reference_kernels),
                        modelled=cuda_modelled_parts(stand_in) if cuda else ())


# ------------------------------------------------------------------------------------------------
# inference
# ------------------------------------------------------------------------------------------------

# What a CPU inference process holds beyond its tensors at the forward's peak (code pages, oneDNN's
# primitives, glibc's heap), measured as peak RSS minus the dry run's tensors in a fresh process (torch
# 2.13 CPU, 2 threads): 12 MiB for filters 1 at 16^3, 68-107 MiB for the paper's 32-filter network at 64^3
# (contiguous, channels-last, 4 slabs). The larger is used: planning should not promise what does not fit.
CPU_INFERENCE_RUNTIME_BYTES = 104 * 2**20


def dryrun_inference(job: JobConfig, activation: str = "sigmoid", device: str = "cpu",
                     runtime: int | None = None, spatial: int = 1) -> DryRunResult:
    """Peak memory of one inference forward of `job` (batch `job.batch` at `job.shape`, its precision,
    memory format and slabs), nothing allocated: the parameters, the input (and its device or layout copy),
    every activation while alive (no gradients: nothing is saved for backward), the operators' workspaces,
    and the output `activation` ("sigmoid" or "softmax" over channels, in fp32), as `fullres predict` runs
    it. CPU: glibc's heap (no pool), plus `runtime` bytes (None: :data:`CPU_INFERENCE_RUNTIME_BYTES`);
    CUDA: the caching allocator's blocks. `spatial` = S: one of S processes sharing the volume
    (``predict --spatial``), its rows of the input and of every level with their halos (as :func:`dryrun`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode


    started = time.perf_counter()
    on_cuda = torch.device(device).type == "cuda"
    caching = CachingAllocatorModel() if on_cuda else None
    tracker = _Tracker(caching)
    strategy = replace(job.strategy, checkpointing=False, checkpoint_levels=0, accumulate=1)
    hooks = []
    with FakeTensorMode(allow_non_fake_inputs=False), tracker:
        with torch.device(device):
            model = build_model(job.model, job.shape)
        prepare_model(model.eval(), strategy)
        rows = job.shape[0]
        if spatial > 1:
            space = simulated(job.shape[0], spatial)
            use_space(model, space)
            lo, hi = space.rows(0)
            rows = hi - lo
        for p in model.parameters():
            tracker.track(p, "parameters")
        def enter(module, inputs):
            tracker.module_stack.append(names[module])

        def leave(module, inputs, output):  # returns None: a forward hook's value would replace the output
            if tracker.module_stack:
                tracker.module_stack.pop()

        names = {module: name or type(module).__name__ for name, module in model.named_modules()}
        for module in names:
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        image = torch.empty(job.batch, job.model.in_channels, *job.shape)  # every process reads the whole case
        tracker.track(image, "inputs")
        input_serials = {tracker.serial(image)}
        tracker.phase = "forward"
        try:
            with torch.no_grad():
                whole = image  # held while its rows are computed
                if spatial > 1:  # this process's rows, copied
                    image = torch.empty(job.batch, job.model.in_channels, rows, *job.shape[1:])
                    input_serials.add(tracker.serial(image))
                x = to_device(image, torch.device(device), strategy)
                input_serials.add(tracker.serial(x))
                with autocast(strategy, torch.device(device).type):
                    logits = model(x)
                del x
                logits = logits.float()
                output = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, 1)
                del logits, output, whole
        except (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException) as error:
            op = getattr(error, "func", None) or (error.args[0] if error.args else "an operator")
            raise ValueError(f"network {job.model.architecture}: the dry run cannot follow {op}") from None
        parameter_serials = {tracker.serial(p) for p in model.parameters()}
    for hook in hooks:
        hook.remove()
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for serial, size in tracker.peak_live.items():
        if serial in parameter_serials:
            breakdown["parameters"] += size
        elif serial in input_serials:
            breakdown["inputs"] += size
        else:
            breakdown["activations"] += size
    breakdown["workspace"] = tracker.peak_workspace
    breakdown["runtime"] = 0 if on_cuda else (CPU_INFERENCE_RUNTIME_BYTES if runtime is None else int(runtime))
    return DryRunResult(peak_bytes=int(tracker.peak + breakdown["runtime"]), breakdown=breakdown,
                        peak_at=tracker.peak_at, saved_bytes=0, seconds=time.perf_counter() - started,
                        job=job.to_json(), reserved_bytes=caching.reserved if caching else None)
