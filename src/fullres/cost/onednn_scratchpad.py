"""What oneDNN's AVX-512 bf16 weight-gradient kernels book as scratchpad, computed as oneDNN computes it.

ATen runs oneDNN with a user scratchpad (``attr-scratchpad:user``): each call takes one buffer of the
primitive's scratchpad size from PyTorch's allocator, so under fullres's CPU pool it is a block of the pool,
and a block the size of a feature map or more. On CPUs with AVX-512 and without AMX, a bf16 channels-last 3D
convolution's weight gradient runs ``jit_bf16:avx512_core_bf16`` (``jit_bf16_1x1`` for a 1x1x1 kernel),
whose scratchpad holds transposed copies of the input and the output gradient for each thread that splits
the reduction over the batch and depth, and fp32 weight-gradient buffers to reduce into. Their sizes follow
from the kernel's own configuration: this module repeats the arithmetic of oneDNN v3.12's
``jit_avx512_core_bf16_conv_bwd_weights_kernel_f32_t::init_conf``, ``balance`` and ``init_scratchpad`` (and
the 1x1 kernel's), for channels-last tensors, one group, no dilation. No library exposes it: oneDNN's
primitive-descriptor query is not exported from torch's library, and creating the primitive needs the
memory. Checked against the pool's trace of real steps (AVX-512 bf16 AMD Zen 4, 2 threads, torch 2.13):
30 weight gradients of the paper's U-Net from 4^3 to 64^3, 4-512 channels, 3^3 and 2^3 stride-2 kernels,
within 0.03 % (docs/results/memory.md); tests/test_cpu_pool.py holds seven layers to it. Not modelled:
oneDNN's fallbacks to other kernels (kernel width over 14, padding past half the kernel, sizes past 2^31).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

SIMD = 16  # fp32 lanes of a zmm register: oneDNN's channel block
BARRIER_BYTES = 4096  # simple_barrier::ctx_t, aligned to a page
ALIGNMENT = 128  # memory_tracking's default: every booking is padded by it


def _div_up(a: int, b: int) -> int:
    return -(-a // b)


def _rnd_up(a: int, b: int) -> int:
    return _div_up(a, b) * b


def _booked(*sizes: int, barriers: tuple[int, ...] = ()) -> int:
    """A registrar's total for these bookings (bytes), and for barrier bookings of these many contexts."""
    return sum(size + ALIGNMENT for size in sizes if size) + sum((count + 1) * BARRIER_BYTES for count in barriers)


def _balance(threads: int, mb_work: int, nb_oc: int, nb_ic: int, cost, widened: int) -> tuple[int, int, int]:
    """oneDNN's ``balance``: the split of `threads` over the reduction (batch x depth, `mb_work` items), output
    and input channel blocks with the lowest `cost` (the last of equals); a reduction split past half the
    threads but short of all of them is widened to min(`widened`, threads)."""
    best, split = cost(1, 1, 1), (1, 1, 1)
    for nthr_mb in range(1, min(threads, mb_work) + 1):
        for nthr_oc in range(1, min(threads // nthr_mb, nb_oc) + 1):
            nthr_ic = min(threads // nthr_mb // nthr_oc, nb_ic)
            if (value := cost(nthr_mb, nthr_oc, nthr_ic)) <= best:
                best, split = value, (nthr_mb, nthr_oc, nthr_ic)
    nthr_mb, nthr_oc, nthr_ic = split
    if threads // 2 < nthr_mb < threads:
        nthr_mb = min(widened, threads)
    return nthr_mb, nthr_oc, nthr_ic


@functools.cache
def per_core_l2_bytes() -> int:
    """The CPU's level-2 cache per core (Linux's sysfs), which oneDNN's heuristics read; 1 MiB where unknown."""
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            if level == "2" and kind != "Instruction":
                size = (index / "size").read_text().strip().upper()
                return int(size.rstrip("KMB")) * {"K": 2**10, "M": 2**20}.get(size.rstrip("B")[-1:], 1)
        except (OSError, ValueError):
            break
    return 2**20


def bf16_weight_gradient_bytes(batch: int, in_channels: int, out_channels: int, input_size, output_size, kernel,
                               stride, padding, threads: int, bias: bool) -> int:
    """Scratchpad of ``jit_bf16:avx512_core_bf16``'s weight gradient (bf16 weights and bias gradients) of a
    3D convolution, channels-last, one group, no dilation (any kernel but a 1x1x1 one of stride 1 without
    padding, which ``jit_bf16_1x1`` takes); sizes as (D, H, W)."""
    first = in_channels < SIMD  # is_1stconv: the channel block is all the input channels
    ic_block = in_channels if first else SIMD
    nb_ic, nb_oc = _div_up(in_channels, ic_block), _div_up(out_channels, SIMD)
    l_pad = padding[2]
    r_pad = max(0, (output_size[2] - 1) * stride[2] + kernel[2] - (input_size[2] + l_pad))
    transpose_src = not (first and in_channels == 1)
    tr_pad = _rnd_up(max(l_pad, r_pad + 1), 2)
    tr_iw = _rnd_up(_div_up(input_size[2], stride[2]) + tr_pad, 2) * stride[2] if transpose_src else input_size[2]
    tr_ow = _rnd_up(output_size[2], 2)
    mb_work = batch * output_size[0]  # harness_3d_reduction: threads split the batch and the output depth

    src_bytes = batch * in_channels * input_size[0] * input_size[1] * tr_iw * 2
    dst_bytes = batch * out_channels * output_size[0] * output_size[1] * tr_ow * 2
    wei_scale = 0.5 * (dst_bytes + src_bytes) / (out_channels * in_channels * math.prod(kernel) * 4)
    ratio = nb_oc / nb_ic
    src_coef = max(1 / ratio, 1.0) * (4.0 if wei_scale < 1 else 1.0)
    dst_coef, wei_coef = max(ratio, 1.0), max(wei_scale, 1.0)

    def cost(nthr_mb: int, nthr_oc: int, nthr_ic: int) -> float:
        src = (src_coef * _div_up(mb_work, nthr_mb) * _div_up(nb_ic, nthr_ic) * batch * ic_block * input_size[0]
               * input_size[1] * tr_iw / mb_work / stride[0] / stride[1] / stride[2])
        wei = wei_coef * _div_up(nb_oc, nthr_oc) * _div_up(nb_ic, nthr_ic) * math.prod(kernel) * ic_block * SIMD
        dst = (dst_coef * _div_up(mb_work, nthr_mb) * _div_up(nb_oc, nthr_oc) * batch * SIMD * output_size[0]
               * output_size[1] * tr_ow / mb_work)
        return src + dst + wei

    nthr_mb, nthr_oc, nthr_ic = _balance(threads, mb_work, nb_oc, nb_ic, cost, widened=mb_work)
    nthr = nthr_mb * nthr_oc * nthr_ic
    # A first convolution on wide planes transposes in spatial blocks, each thread into buffers of its own.
    l2_floats = per_core_l2_bytes() // 4
    gradient = out_channels * math.prod(output_size)
    non_temporal = gradient >= 2 * l2_floats and min(kernel) >= 6
    blocked = (first and not non_temporal and gradient >= l2_floats and output_size[1] * output_size[2] >= 64 * 124
               and output_size[0] > 1)
    src_buffers, dst_buffers = (nthr, nthr) if blocked else (nthr_mb * nb_ic, nthr_mb * nb_oc)
    tr_src = (src_buffers * tr_iw * ic_block * input_size[0] * input_size[1] if transpose_src else 0) + tr_pad
    tr_dst = dst_buffers * tr_ow * SIMD * output_size[0] * output_size[1]
    weights = nb_oc * SIMD * nb_ic * ic_block * math.prod(kernel)
    reduction = (weights + (nb_oc * SIMD if bias else 0)) * nthr_mb  # bf16 gradients: every split reduces in fp32
    barriers = [] if blocked else [nthr // count for count in (nthr_oc, nthr_ic) if count > 1] + [1]
    return _booked(2 * tr_src, 2 * tr_dst, 4 * reduction, barriers=tuple(barriers))


def _best_divider(value: int, low: int, high: int, find_max: bool, step: int = 1) -> int:
    high = max(1, min(high, value))
    low = max(1, min(low, high))
    best_loss, chosen = math.inf, high
    for divider in range(high, low - 1, -step):
        padded = _rnd_up(value, divider)
        loss = (padded - value) / padded
        if (find_max and loss < best_loss) or (not find_max and loss <= best_loss):
            best_loss, chosen = loss, divider
    return chosen


def bf16_pointwise_weight_gradient_bytes(batch: int, in_channels: int, out_channels: int, size, threads: int,
                                         bias: bool) -> int:
    """Scratchpad of ``jit_bf16_1x1:avx512_core_bf16``'s weight gradient (1x1x1 kernel, stride 1, no padding,
    channels-last, bf16 gradients): per thread, transposed copies of the whole map's input and output
    gradient for its block of channels, and the fp32 reduction buffers."""
    reduce_dim = math.prod(size)
    reduce_block = _best_divider(reduce_dim, 8, 16, True, 2)
    if reduce_dim % reduce_block:
        reduce_block = _best_divider(size[2], 4, size[2], False, 2)
    if reduce_block > 256:
        reduce_block = 1
    reduce_block = _rnd_up(reduce_block, 2)
    nb_bcast, nb_load = _div_up(in_channels, SIMD), _div_up(out_channels, SIMD)
    nb_reduce = _div_up(reduce_dim, reduce_block)
    output_coef = 4 * max(1, out_channels // in_channels)

    def cost(nthr_mb: int, nthr_oc: int, nthr_ic: int) -> int:
        work = _div_up(batch * nb_reduce, nthr_mb)
        return (work * _div_up(nb_bcast, nthr_ic) * SIMD * reduce_block + work * _div_up(nb_load, nthr_oc) * SIMD
                * reduce_block + output_coef * _div_up(nb_load, nthr_oc) * _div_up(nb_bcast, nthr_ic) * SIMD * SIMD)

    nthr_mb, nthr_oc, nthr_ic = _balance(threads, batch * nb_reduce, nb_load, nb_bcast, cost, widened=batch)
    nthr = nthr_mb * nthr_oc * nthr_ic

    load_blocks = _best_divider(nb_load, 16, nb_load, False)
    bcast_blocks = _best_divider(nb_bcast, 5, nb_bcast, False)
    padded_bias = 2 * out_channels if bias and out_channels % SIMD else 0
    out_padded = _rnd_up(out_channels, SIMD)
    reduction = (out_padded * _rnd_up(in_channels, SIMD) + (out_padded if bias else 0)) * nthr_mb
    rows = _rnd_up(reduce_dim, 2)
    return _booked(padded_bias, 4 * reduction, 2 * nthr * rows * SIMD * load_blocks,
                   2 * nthr * rows * SIMD * bcast_blocks, barriers=(1,) if nthr_mb > 1 else ())
