"""Drop-in convolution layers that route around CPU kernels that crawl: the same parameters and state
dict as torch's, on oneDNN where ATen's own rules would choose a slow path; and :func:`relu_`, ReLU whose
gradient is taken in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fullres.kernels import device as fullres_device
from fullres.kernels.onednn import select_conv_backend


FEW_CHANNELS = 8  # below this many input channels a convolution may be widened (zero channels) onto oneDNN


class Conv3d(nn.Conv3d):
    """nn.Conv3d (same parameters and state dict) that runs on oneDNN where ATen's rules would send a
    convolution with few input channels to its slow path: see `_few_channels_on_onednn`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = _few_channels_on_onednn(self, x)
        return super().forward(x) if wide is None else wide


class ConvTranspose3d(nn.ConvTranspose3d):
    """nn.ConvTranspose3d (same parameters and state dict). In training on an AVX-512 CPU, a kernel-sized
    stride (the U-Net's 2x2x2 upsampling) takes its weight gradient as the weight gradient of the strided
    convolution it is the adjoint of, as TensorFlow does: the same sums on oneDNN's brgemm kernel, where
    PyTorch's deconvolution weight gradient takes 3.4x as long (64^3, bf16: 0.036 s against 0.123 s for the
    128-channel upsampling; docs/performance.md). Its output and input gradient are PyTorch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _strided_adjoint_applies(self, x):
            return super().forward(x)
        return _UpsamplingWeightGradient.apply(x, self.weight, self.bias, tuple(self.stride))


def _strided_adjoint_applies(layer: nn.ConvTranspose3d, x: torch.Tensor) -> bool:
    if not (torch.is_grad_enabled() and layer.weight.requires_grad) or x.device.type != "cpu":
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # graphs keep PyTorch's own operator
        return False
    # brgemm on AVX-512; on AVX2 a strided weight gradient may run im2col past oneDNN's scratchpad limit
    if not fullres_device.avx512():
        return False
    return (tuple(layer.kernel_size) == tuple(layer.stride) and not any(layer.padding) and not any(layer.output_padding)
            and all(d == 1 for d in layer.dilation) and layer.groups == 1)


class _UpsamplingWeightGradient(torch.autograd.Function):
    """conv_transpose3d(x, W, b, stride=k) with kernel k; backward: the input gradient by PyTorch's own
    convolution_backward, the weight gradient as that of conv3d(grad, W, stride=k) with x as its output's
    gradient (dW[i, o, a] = sum_p x[i, p] grad[o, k p + a] either way), the bias gradient summed in fp32 at
    least.
    Under autocast the operands are cast once, as autocast would, and kept for backward in that dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            x, cast_weight = x.to(dtype), weight.to(dtype)
            out = F.conv_transpose3d(x, cast_weight, None if bias is None else bias.to(dtype), stride=stride)
        ctx.save_for_backward(x, cast_weight)
        ctx.stride, ctx.has_bias = stride, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        aten, zeros, ones = torch.ops.aten, [0, 0, 0], [1, 1, 1]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = aten.convolution_backward(grad, x, weight, None, list(ctx.stride), zeros, ones, True, zeros, 1,
                                               [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            grad_weight = aten.convolution_backward(x, grad, weight, None, list(ctx.stride), zeros, ones, False, zeros,
                                                    1, [False, True, False])[1]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3, 4), dtype=torch.promote_types(grad.dtype, torch.float32))
        return grad_x, grad_weight, grad_bias, None


def relu_(x: torch.Tensor) -> torch.Tensor:
    """ReLU in place, as ``F.relu(x, inplace=True)``, with the same gradient (bit for bit), taken in place:
    where the incoming gradient is a map of its own (not a view) in the output's layout, it is zeroed where
    the output is 0 instead of copied into a new map of the activation's size (one allocation and one write
    less per ReLU; at full resolution a new map also means its pages faulted in). For networks whose ReLU outputs reach their
    consumers (convolutions, pooling, dropout) directly, whose backwards return gradients of their own: an
    incoming gradient that is also handed to another node (an addition's) would be changed for it too."""
    if not (torch.is_grad_enabled() and x.requires_grad) or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return F.relu(x, inplace=True)  # graphs keep PyTorch's own operator (a compiler may fuse it)
    return _ReLUInPlace.apply(x)


class _ReLUInPlace(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x.relu_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (output,) = ctx.saved_tensors
        # a view (the rest of its base may be read elsewhere), or another layout than the output's (PyTorch's
        # own gradient would take a layout of its choosing, and the next backward's sums follow it)
        if grad._base is not None or grad.stride() != output.stride():
            return torch.ops.aten.threshold_backward(grad, output, 0)
        return torch.ops.aten.threshold_backward.grad_input(grad, output, 0, grad_input=grad)


def _conv_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: nn.Conv3d) -> str:
    """`select_conv_backend` for `layer` run on `x` with these weights ("" where this torch does not say:
    then nothing is widened)."""
    return select_conv_backend(x, weight, bias, layer.stride, layer.padding, layer.dilation, False, (0, 0, 0),
                               layer.groups)


def _few_channels_on_onednn(layer: nn.Conv3d, x: torch.Tensor) -> torch.Tensor | None:
    """The first convolution (4 input channels) on oneDNN where ATen would take its slow path, else None.

    ATen runs an fp32 CPU convolution at batch 1 with N x C x D x H <= 20480 (conv1a below
    full resolution, e.g. 4 x 64 x 64) through vol2col + GEMM, which with 4 x 27 rows per GEMM runs
    far below the machine's rate. Zero input channels (and zero weights for them) change nothing in
    the sum but lift it past that rule: measured at 64^3, channels-last, 2 threads, forward and
    backward 176 ms on the slow path against 53 ms padded to 8 channels on oneDNN, the training step
    1.5 % faster (docs/performance.md).
    The gradients of the real weights are the same up to summation order."""
    channels = x.shape[1]
    if channels >= FEW_CHANNELS or x.device.type != "cpu" or x.dtype != torch.float32 or layer.groups != 1:
        return None
    if torch.is_autocast_enabled("cpu"):  # bf16 convolutions always run on oneDNN
        return None
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):  # F.conv3d below pads with zeros, by number
        return None
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # a compiled or exported graph must not bake in this machine's kernel choice
        return None
    if _conv_backend(x, layer.weight, layer.bias, layer) != "Slow3d":
        return None
    zeros = (0, 0, 0, 0, 0, 0, 0, FEW_CHANNELS - channels)  # pad dim 1 (channels) at its end
    wide_x, wide_weight = F.pad(x, zeros), F.pad(layer.weight, zeros)
    if _conv_backend(wide_x, wide_weight, layer.bias, layer) != "Mkldnn":
        return None
    return F.conv3d(wide_x, wide_weight, layer.bias, layer.stride, layer.padding, layer.dilation)

