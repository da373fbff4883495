"""Routes around CPU kernels that fail: the same sums, computed by kernels that work.

oneDNN v3.12 (torch 2.13) on AMX CPUs computes a bf16 3D convolution's weight gradient with a kernel
(`brgconv_bwd_w:avx10_1_512_amx`) that corrupts the heap, segfaults or never returns on wide planes
(every 3x3x3 and 1x1x1 shape tried at 512 x 512; some at 256 x 256 and 128 x 128; docs/performance.md).
Its forward and input gradient, and its 2D weight gradient on the same planes, work. A 3D weight
gradient is a stack of 2D ones, one per kernel row along H: `dW[:, :, kh]` sums, over the output rows r,
the 2D weight gradient of output row r against input row `stride * r + kh - padding`, and those rows
are a batch of 2D images (in channels-last memory, views). :class:`PlanarWeightGradients` computes
bf16 3D weight gradients that way on AMX CPUs; :func:`planar_weight_gradient` is the decomposition.

Without AMX, oneDNN's AVX-512 bf16 weight gradient (`jit_bf16:avx512_core_bf16`, seen on an AMD Zen 5)
returns garbage (relative errors up to 1e36) or corrupts the heap when the input has fewer rows along H
than the kernel (a 3x3x3 convolution of a map 2 rows tall, such as the bottleneck of a 16^3 U-Net) and
more than 16 input or output channels; every such case found had fewer rows than the kernel, and none
with as many. :class:`PlanarWeightGradients` takes those plane by plane too, on CPUs with AVX-512 bf16 or
AMX: their 2D weight gradients are right.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fullres.kernels import device as fullres_device

_CONVOLUTION_BACKWARD = torch.ops.aten.convolution_backward.default


def planar_weight_gradient(grad: torch.Tensor, input: torch.Tensor, weight: torch.Tensor, stride, padding) -> torch.Tensor:
    """The weight gradient of `conv3d(input, weight, stride=stride, padding=padding)` (groups 1, dilation 1)
    for the output gradient `grad`, as 2D weight gradients: one per kernel row along H, each over the
    batch of the output rows that row of the kernel touches. The same sums as the 3D weight gradient in
    another order; over the samples of a batch they are summed in fp32 at least. Returns `grad.dtype`."""
    s_h, p_h = stride[0], padding[0]
    rows_in, rows_out = input.shape[2], grad.shape[2]
    rows = []
    for kh in range(weight.shape[2]):
        first = max(0, -((kh - p_h) // s_h))  # the first output row whose input row s_h r + kh - p_h is >= 0
        last = min(rows_out, (rows_in - 1 - kh + p_h) // s_h + 1)  # one past the last within the input
        start = s_h * first + kh - p_h
        parts = [_CONVOLUTION_BACKWARD(grad[sample, :, first:last].transpose(0, 1),
                                       input[sample, :, start:start + s_h * (last - first - 1) + 1:s_h].transpose(0, 1),
                                       weight[:, :, kh], None, list(stride[1:]), list(padding[1:]), [1, 1], False,
                                       [0, 0], 1, [False, True, False])[1]
                 for sample in range(grad.shape[0])] if last > first else []
        if not parts:  # the kernel row never meets the input (padding wider than the kernel's reach)
            rows.append(torch.zeros_like(weight[:, :, kh], dtype=grad.dtype))
        elif len(parts) == 1:
            rows.append(parts[0])
        else:
            rows.append(torch.stack(parts).sum(0, dtype=torch.promote_types(grad.dtype, torch.float32)).to(grad.dtype))
    return torch.stack(rows, dim=2)


def _fails(args, amx: bool) -> bool:
    grad, input, weight, _, stride, padding, dilation, transposed, _, groups, output_mask = args
    if not (output_mask[1] and weight.dim() == 5 and not transposed and groups == 1 and all(d == 1 for d in dilation)
            and grad.device.type == "cpu" and grad.dtype == torch.bfloat16):
        return False
    if input.shape[2] < weight.shape[2]:
        return True
    # the larger plane: the upsampling's weight gradient is a strided convolution's from the fine map
    return amx and wide_planes(max(input.shape[3:], grad.shape[3:], key=lambda plane: plane[0] * plane[1]),
                               grad.shape[2], _channels_last(input) or _channels_last(weight))


# Where the AMX kernel failed (docs/performance.md): planes of 256 x 256 and wider; at 128 x 128, slabs of 2
# rows, and contiguous maps. Elsewhere (every 64^3, 128^3 and 240 x 240 x 144 job measured) it works and is up
# to 10 % faster than the planes.
WIDE_PLANE, NARROW_FAILING_PLANE, NARROW_FAILING_ROWS = 256 * 256, 128 * 128, 2


def wide_planes(plane, rows: int, channels_last: bool = True) -> bool:
    """Whether an AMX bf16 3D weight gradient is computed plane by plane: `plane`, the larger W x D plane of its
    input and output gradient; `rows`, the output gradient's along H; planes compared by area."""
    area = plane[0] * plane[1]
    return area >= WIDE_PLANE or (area >= NARROW_FAILING_PLANE and (rows <= NARROW_FAILING_ROWS or not channels_last))


class PlanarWeightGradients(TorchDispatchMode):
    """Within it, a CPU bf16 3D convolution's weight gradient (groups 1, dilation 1, not transposed) is
    :func:`planar_weight_gradient` when its input has fewer rows than its kernel, or, with `wide_planes`
    (AMX CPUs), when :func:`wide_planes` says so; its input gradient is PyTorch's own and its bias gradient
    is summed in fp32. Everything else runs as it would. torch.compile compiles under it (it is declared to
    ignore compile internals; under a mode that is not, compile falls back to eager)."""

    def __init__(self, wide_planes: bool = True):
        super().__init__()
        self.wide_planes = wide_planes

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not _CONVOLUTION_BACKWARD or kwargs or not _fails(args, self.wide_planes):
            return func(*args, **kwargs)
        grad, input, weight, _, stride, padding, dilation, transposed, output_padding, groups, mask = args
        grad_input = None
        if mask[0]:
            grad_input = func(grad, input, weight, None, stride, padding, dilation, transposed, output_padding,
                              groups, [True, False, False])[0]
        grad_weight = planar_weight_gradient(grad, input, weight, stride, padding)
        grad_bias = grad.sum((0, 2, 3, 4), dtype=torch.float32).to(grad.dtype) if mask[2] else None
        layout = _aten_layout(input, weight, stride, padding, dilation, output_padding, groups)
        return grad_input, grad_weight.contiguous(memory_format=layout), grad_bias


def select_conv_backend(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups) -> str:
    """The kernel family ATen picks for this convolution, by its own rules (shapes, strides, dtype, thread
    count, CPU features; never the data): "Mkldnn", "Slow3d", ...; "" where this torch does not say (it is
    a private function). Used by `_few_channels_on_onednn` and by the dry run's workspace model."""
    select = getattr(torch._C, "_select_conv_backend", None)
    if select is None:
        return ""
    backend = select(input, weight, bias, list(stride), list(padding), list(dilation), bool(transposed),
                     list(output_padding), int(groups), None)
    name = str(backend).split(".")[-1]
    return _UNNAMED_BACKENDS.get(int(backend), name) if name == "???" else name


# ATen's ConvBackend values that torch's Python enum leaves unnamed ("???"): oneDNN's transposed convolution.
_UNNAMED_BACKENDS = {9: "MkldnnTranspose"}


def _aten_layout(input: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, output_padding,
                 groups) -> torch.memory_format:
    """The layout ATen returns a convolution's weight gradient in: oneDNN's ("Mkldnn", and where this torch
    does not say) is channels-last when the input or the weight is; the others' (bf16 without native bf16
    runs "Slow3d") contiguous."""
    backend = select_conv_backend(input, weight, None, stride, padding, dilation, False, output_padding, groups)
    if backend not in ("", "Mkldnn"):
        return torch.contiguous_format
    return torch.channels_last_3d if _channels_last(input) or _channels_last(weight) else torch.contiguous_format


def _channels_last(tensor: torch.Tensor) -> bool:
    return tensor.is_contiguous(memory_format=torch.channels_last_3d) and not tensor.is_contiguous()


_ROUTING = [True]


@contextmanager
def as_asked() -> Iterator[None]:
    """Within it, :func:`cpu_workarounds` routes nothing: every operation runs as the step asks for it. For
    counting FLOPs, which are the step's operations' (the planes of a routed weight gradient skip the rows
    that meet only padding, and would count fewer); not for computing values on a CPU the routing is for."""
    _ROUTING.append(False)
    try:
        yield
    finally:
        _ROUTING.pop()


def cpu_workarounds(precision: str, device_type: str):
    """The context a training step's forward and backward run in: for bf16, :class:`PlanarWeightGradients`
    on an AMX CPU, and for maps with fewer rows than the kernel only on an AVX-512 bf16 CPU without AMX
    (where the mode's dispatch costs ~2 % of the 64^3 step, measured); else nothing."""
    if device_type != "cpu" or precision != "bf16" or not _ROUTING[-1]:
        return nullcontext()
    if fullres_device.amx_bf16():
        return PlanarWeightGradients()
    if fullres_device.avx512_bf16():
        return PlanarWeightGradients(wide_planes=False)
    return nullcontext()
