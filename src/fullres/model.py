"""The networks fullres trains, in a registry; the first is the paper's 3D U-Net (whitepaper Table 1).

Extension point: :data:`MODELS` maps an architecture name to a :class:`ModelSpec`, and
:func:`build_model` is the one place a network is constructed (train, predict, the dry run, Table 1,
bench and profile all call it). :func:`register_model` adds a network; docs/extending.md has an example.

The paper's network (``unet3d``), with Table 1's layer names as module names:

Encoder: four levels of two 3x3x3 convolutions (32/64, 64/128, 128/256, 256/512 filters for
base 32), 2x2x2 max-pooling between them, dropout after conv3a and conv4a. Decoder: 2x2x2
stride-2 transposed convolutions that keep the channel count, concatenation skips, two 3x3x3
convolutions per level, and a 1x1x1 prediction. No normalisation by default, as in Table 1.

With the defaults the network has exactly 19,735,329 trainable weights (Table 1's total).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fullres import device as fullres_device
from fullres.kernels import select_conv_backend  # noqa: F401 - part of this module's API
from fullres import networks
from fullres.errors import first_line
from fullres.losses import primary_output
from fullres.presets import PAPER
from fullres.slabs import Level, forward_levels, slab_rows  # noqa: F401 - slab_rows is part of this module's API

NORMS = ("none", "instance", "group", "batch")
DOWNSAMPLING = 8  # three 2x poolings: every spatial size must be a multiple of 8
MODELS: dict[str, "ModelSpec"] = {}  # architecture name -> ModelSpec; filled by register_model below
FAMILIES = ("monai:CLASS", "nnunet:PlainConvUNet", "nnunet:ResidualEncoderUNet", "FILE.py:FUNCTION",
            "package.module:FUNCTION")
LEVELS = 4  # resolutions of unet3d: full, 1/2, 1/4, 1/8 (the bottleneck)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the network's shape and weights count. `architecture` names a network of
    :data:`MODELS` or of a family (``monai:CLASS``, ``nnunet:...``, a user's ``FILE.py:FUNCTION``);
    `args` is its keyword arguments as canonical JSON (``--model-args``); `source_sha256` the content hash
    of a user's factory file, checked whenever the network is built again. `filters`, `dropout` and
    `norm` shape fullres's own networks (unet3d, intel-unet); other networks take `args`. `factory_dir`:
    the folder a ``FILE.py`` factory is loaded from instead of its own path, set only by the process that
    opens a run (:func:`fullres.checkpoint.trusted_model`), never saved or read from a file."""

    in_channels: int = 4
    filters: int = PAPER.filters
    classes: int = 1  # 1: sigmoid mask (the paper's whole tumour); N > 1: softmax over N classes
    dropout: float = PAPER.dropout
    norm: str = PAPER.norm
    architecture: str = "unet3d"
    args: str = ""
    source_sha256: str = ""
    factory_dir: str = field(default="", compare=False, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        spec = model_spec(self.architecture)  # raises ValueError naming an unknown network
        if self.args:
            try:
                parsed = json.loads(self.args)
            except ValueError as error:
                raise ValueError(f"--model-args is not JSON: {error}") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"--model-args must be a JSON object of keyword arguments, got {self.args}")
            object.__setattr__(self, "args", json.dumps(parsed, sort_keys=True))
        if spec.check is not None:
            spec.check(self)
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.filters < 1:
            raise ValueError(f"filters must be >= 1, got {self.filters}")
        if self.classes < 1:
            raise ValueError(f"classes must be >= 1, got {self.classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.norm == "group" and self.filters % 8:
            raise ValueError(f"group norm uses 8 groups: filters must be a multiple of 8, got {self.filters}")

    def to_json(self) -> dict:
        """The saved fields (not `factory_dir`, which only the process that opened the run may set)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "factory_dir"}

    @property
    def kwargs(self) -> dict:
        """`args` as keyword arguments."""
        return json.loads(self.args) if self.args else {}


def nearest_valid_sizes(size: int, divisor: int = DOWNSAMPLING) -> tuple[int, int]:
    """The multiples of `divisor` just below and above `size` (the lower one at least `divisor`)."""
    lower = max(divisor, size // divisor * divisor)
    upper = -(-size // divisor) * divisor
    return lower, max(upper, divisor)


class Concatenate(nn.Module):
    """Channel concatenation as a module, so that walking the model sees Table 1's concatenate rows."""

    def forward(self, upsampled: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([upsampled, skip], dim=1)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(8, channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    return nn.Identity()


# (name, input-channel multiple of `filters`, output multiple) for each 3x3x3 convolution,
# in forward order; conv1a's input is the image. Table 1's widths for filters=32.
_CONVS = {
    "conv1a": (None, 1), "conv1b": (1, 2),
    "conv2a": (2, 2), "conv2b": (2, 4),
    "conv3a": (4, 4), "conv3b": (4, 8),
    "conv4a": (8, 8), "conv4b": (8, 16),
    "conv5a": (16 + 8, 8), "conv5b": (8, 8),
    "conv6a": (8 + 4, 4), "conv6b": (4, 4),
    "conv7a": (4 + 2, 4), "conv7b": (4, 4),
}
_TRANSPOSED = {"transConv4": 16, "transConv5": 8, "transConv6": 4}


class UNet3D(nn.Module):
    """The Table 1 network. Input (N, C, H, W, D) with H, W, D multiples of 8; output logits (N, classes, H, W, D)."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        config = config if config is not None else ModelConfig()
        self.config = config
        self.checkpointing = False  # a training strategy, not part of the weights: set by the trainer
        self.checkpoint_levels = 0  # with checkpointing: only the levels finer than this (0: every level)
        self.slabs: int | tuple[int, ...] = 1  # slabs along H per resolution (a strategy too): see slab_counts
        self.recompute_inputs = 0  # levels below full resolution whose slabbed input is recomputed, not stored
        self.space = None  # spatial parallelism: this process's fullres.spatial.Space (its rows of every level)
        f = config.filters
        for name, (cin, cout) in _CONVS.items():
            in_channels = config.in_channels if cin is None else cin * f
            setattr(self, name, Conv3d(in_channels, cout * f, kernel_size=3, padding=1))
            # Norm modules only exist when asked for, so the default model is exactly Table 1's.
            if config.norm != "none":
                setattr(self, "norm" + name[4:], _norm(config.norm, cout * f))
        for name, channels in _TRANSPOSED.items():
            setattr(self, name, ConvTranspose3d(channels * f, channels * f, kernel_size=2, stride=2))
        self.pool1, self.pool2, self.pool3 = (nn.MaxPool3d(2) for _ in range(3))
        self.dropout_1 = nn.Dropout(config.dropout)
        self.dropout_2 = nn.Dropout(config.dropout)
        self.concatenate_1, self.concatenate_2, self.concatenate_3 = (Concatenate() for _ in range(3))
        self.PredictionMask = nn.Conv3d(4 * f, config.classes, kernel_size=1)

    def conv(self, name: str, x: torch.Tensor, pre_activation: torch.Tensor | None = None) -> torch.Tensor:
        """3x3x3 convolution `name` (or its given `pre_activation`), its normalisation (if any), ReLU."""
        x = getattr(self, name)(x) if pre_activation is None else pre_activation
        if self.config.norm != "none":
            x = getattr(self, "norm" + name[4:])(x)
        return F.relu(x, inplace=True)  # in place: the pre-activation map is never kept beside the activation

    # The forward pass as segments, in order. With activation checkpointing each segment keeps only
    # its inputs for the backward pass and recomputes the rest. Boundaries sit where they cut the peak:
    # the full-resolution stages (conv1a, conv1b, and the last decoder level) are split finely because
    # they hold most of the memory; a segment never returns a full-resolution 128-channel map it
    # could instead recompute (transConv6's output lives inside `decoder7a`).
    def encoder1a(self, x):
        return self.conv("conv1a", x)

    def encoder1b(self, x):
        return self.conv("conv1b", x)

    def encoder2(self, skip1):
        return self.conv("conv2b", self.conv("conv2a", self.pool1(skip1)))

    def encoder3(self, skip2):
        return self.conv("conv3b", self.dropout_1(self.conv("conv3a", self.pool2(skip2))))

    def bottleneck(self, skip3):
        return self.conv("conv4b", self.dropout_2(self.conv("conv4a", self.pool3(skip3))))

    def conv_of_concatenation(self, name: str, concatenate: nn.Module, up, skip):
        """conv `name` of the channel concatenation of `up` and `skip`. In training the concatenation is
        never materialised: conv(cat(up, skip), W) = conv(up, W_up) + conv(skip, W_skip), the same
        maths, so neither the concatenated map nor its gradient (the largest tensors of a decoder
        level's recomputation) exists; measured, the step is also 0-5 % faster (docs/performance.md).
        Without gradients (inference, and Table 1 reading the layers off the model) the modules run."""
        if not torch.is_grad_enabled():
            return self.conv(name, concatenate(up, skip))
        layer = getattr(self, name)
        split = up.shape[1]
        pre_activation = F.conv3d(up, layer.weight[:, :split], layer.bias, padding=1)
        pre_activation = pre_activation.add_(F.conv3d(skip, layer.weight[:, split:], None, padding=1))
        return self.conv(name, None, pre_activation)

    # Each decoder segment starts with its transposed convolution, so a checkpoint keeps the coarse
    # input (1/8 of the voxels) rather than the upsampled map.
    def decoder5(self, x4, skip3):
        return self.conv("conv5b", self.conv_of_concatenation("conv5a", self.concatenate_1, self.transConv4(x4), skip3))

    def decoder6(self, x5, skip2):
        return self.conv("conv6b", self.conv_of_concatenation("conv6a", self.concatenate_2, self.transConv5(x5), skip2))

    def decoder7a(self, x6, skip1):
        return self.conv_of_concatenation("conv7a", self.concatenate_3, self.transConv6(x6), skip1)

    def decoder7b(self, x7):
        return self.PredictionMask(self.conv("conv7b", x7))

    # Slabs (fullres.slabs): level r of the encoder and of the decoder (resolution 1/2^r) in counts[r]
    # slabs along H, each reading one halo row per convolution and recomputed in backward; a slabbed
    # encoder level's output (the skip) is recomputed from its stored input where the decoder reads it.
    ENCODERS = (Level(("conv1a", "conv1b")), Level(("conv2a", "conv2b")),
                Level(("conv3a", "conv3b"), dropout="dropout_1"), Level(("conv4a", "conv4b"), dropout="dropout_2"))
    DECODERS = (Level(("conv7a", "conv7b"), decoder=True, prediction="PredictionMask"),
                Level(("conv6a", "conv6b"), decoder=True), Level(("conv5a", "conv5b"), decoder=True))
    UPSAMPLERS = ("transConv6", "transConv5", "transConv4")

    def slab_counts(self) -> tuple[int, ...]:
        """Slabs per resolution, full resolution first: `slabs` is an int S (full resolution only: (S, 1, 1, 1))
        or one count per resolution, missing ones 1."""
        counts = (self.slabs,) if isinstance(self.slabs, int) else tuple(self.slabs)
        if len(counts) > LEVELS or any(count < 1 for count in counts):
            raise ValueError(f"slabs: one count >= 1 per resolution, at most {LEVELS}, got {counts}")
        return counts + (1,) * (LEVELS - len(counts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_divisible(self.config, tuple(x.shape[2:]))
        if self.space is not None:  # x is this process's rows of the volume
            from fullres.spatial import forward_shards
            return forward_shards(self, x, self.space)
        run = self.runner()
        counts = self.slab_counts()
        if any(count > 1 for count in counts):
            return forward_levels(self, x, counts, self.ENCODERS, self.DECODERS, self.UPSAMPLERS, run,
                                  recompute_inputs=self.recompute_inputs)
        skip1 = run(0)(self.encoder1b, run(0)(self.encoder1a, x))
        skip2 = run(1)(self.encoder2, skip1)
        x = self._middle(run, skip2)
        x = run(0)(self.decoder7a, x, skip1)
        return run(0)(self.decoder7b, x)

    def _middle(self, run, skip2):
        """The half-resolution and coarser levels: skip2 in, decoder6's output out."""
        skip3 = run(2)(self.encoder3, skip2)
        x = run(3)(self.bottleneck, skip3)
        x = run(2)(self.decoder5, x, skip3)
        return run(1)(self.decoder6, x, skip2)

    def runner(self) -> Callable[[int], Callable]:
        """level -> how that resolution's segments run (level 0: full resolution): checkpointed when
        training with `checkpointing` and the level is among the `checkpoint_levels` finest (0: all), else
        called plainly. The finest levels first: their maps are the largest (measured by the dry run on the
        paper's image: docs/memory.md#memory-strategies)."""
        checkpointed = self.checkpointing and torch.is_grad_enabled()
        levels = self.checkpoint_levels or LEVELS
        return lambda level: self._checkpointed if checkpointed and level < levels else _call

    @staticmethod
    def _checkpointed(segment, *inputs):
        # Non-reentrant checkpointing restores the RNG state, so dropout masks repeat exactly on recompute.
        return checkpoint(segment, *inputs, use_reentrant=False)


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


def _call(segment, *inputs):
    return segment(*inputs)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- the registry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """A network fullres can build.

    `build(config, shape)` returns an nn.Module mapping (N, in_channels, H, W, D) to logits
    (N, classes, H, W, D); `shape` is the job's (H, W, D), for networks that fix their input size (MONAI's
    UNETR), or None. `divisor(config)`: every spatial size must be a multiple of it (`why` says why, in
    errors). `check(config)` refuses settings the network cannot take. `slabs`: the module honours the
    `slabs`, `checkpointing` and `checkpoint_levels` attributes the trainer sets (its own exact slab and
    segment schedule, by resolution level);
    other networks are checkpointed block by block (:func:`fullres.step.prepare_model`). `preset`: the name
    of its defaults in :data:`fullres.presets.PRESETS`, if it has its own."""

    name: str
    build: Callable[[ModelConfig, tuple[int, int, int] | None], nn.Module]
    description: str
    slabs: bool = False
    divisor: Callable[[ModelConfig], int] = lambda config: 1
    why: str = "the network's downsampling"
    check: Callable[[ModelConfig], None] | None = None
    preset: str | None = None


_FAMILY_SPECS: dict[str, ModelSpec] = {}  # monai:/nnunet:/factory specs, made on first use


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to :data:`MODELS` under its name (a name may be registered once)."""
    if spec.name in MODELS:
        raise ValueError(f"a network named {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered network or of a family member (``monai:CLASS``, ``nnunet:NAME``, a user's
    ``FILE.py:FUNCTION`` / ``package.module:FUNCTION``). ValueError naming the network and the reason."""
    if name in MODELS:
        return MODELS[name]
    if name in _FAMILY_SPECS:
        return _FAMILY_SPECS[name]
    family, _, member = name.partition(":")
    if family == "monai" and member:
        networks.monai_class(member)
        spec = ModelSpec(name, lambda config, shape: networks.build_monai(member, config.in_channels, config.classes,
                                                                           shape, config.kwargs),
                         f"MONAI's {member}", divisor=lambda config: networks.monai_divisor(member, config.kwargs),
                         why=f"{member}'s downsampling")
    elif family == "nnunet" and member:
        if member not in networks.NNUNET_DEFAULTS:
            raise ValueError(f"unknown network {name!r}: choose nnunet:PlainConvUNet or nnunet:ResidualEncoderUNet")
        spec = ModelSpec(name, lambda config, shape: networks.build_nnunet(member, config.in_channels, config.classes,
                                                                            config.kwargs),
                         f"nnU-Net v2's {member}", divisor=lambda config: networks.nnunet_divisor(member, config.kwargs),
                         why=f"{member}'s strides")
    elif networks.is_factory_name(name):
        spec = ModelSpec(name, lambda config, shape: networks.build_factory(name, config.in_channels, config.classes,
                                                                             config.kwargs, config.source_sha256,
                                                                             config.factory_dir),
                         f"the factory {name}")
    else:
        raise ValueError(f"unknown network {name!r}: choose one of {', '.join(sorted(MODELS))}, or "
                         f"{', '.join(FAMILIES)}")
    _FAMILY_SPECS[name] = spec
    return spec


def build_model(config: ModelConfig, shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The network `config` describes, for inputs of spatial `shape` where the network needs to know it, on
    the current default device, in training mode. ValueError naming the network when it cannot be built."""
    try:
        return model_spec(config.architecture).build(config, tuple(shape) if shape is not None else None)
    except Exception as error:  # noqa: BLE001 - a library's constructor refusing its arguments, in any type
        raise ValueError(f"network {config.architecture}: {_first_line(error)}") from None


def build_on_meta(config: ModelConfig, shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The network on the meta device (shapes only, nothing allocated). A network whose constructor reads
    tensor values (SwinUNETR's drop-path rates) is built on the CPU and moved."""
    try:
        with torch.device("meta"):
            return build_model(config, shape)
    except ValueError as error:
        if "meta" not in str(error):
            raise
    return build_model(config, shape).to("meta")


def spatial_divisor(config: ModelConfig) -> int:
    """Every spatial size of `config`'s network must be a multiple of this."""
    return int(model_spec(config.architecture).divisor(config))


def check_divisible(config: ModelConfig, shape: tuple[int, ...]) -> None:
    """Raise ValueError, naming the nearest valid sizes, when a spatial size of `shape` is not a positive
    multiple of the network's divisor."""
    divisor = spatial_divisor(config)
    for axis, size in zip("HWD", shape):
        if size < divisor or size % divisor:
            lower, upper = nearest_valid_sizes(size, divisor)
            network = "" if config.architecture == "unet3d" else f"network {config.architecture}: "
            raise ValueError(f"{network}spatial size {axis}={size} is not divisible by {divisor} "
                             f"({model_spec(config.architecture).why}); nearest valid: {lower}"
                             + (f" or {upper}" if upper != lower else ""))


def check_shape(config: ModelConfig, shape: tuple[int, int, int], batch: int = 1) -> None:
    """Raise ValueError naming the network when it does not take `shape`: a size that is not a multiple of
    its divisor, or a forward pass in training mode that fails on the meta device (nothing is allocated)
    or returns another shape than logits (batch, classes, *shape)."""
    check_divisible(config, shape)
    if config.architecture == "unet3d":
        return  # the paper's network takes every multiple of 8
    model = build_on_meta(config, shape)
    try:  # outside the meta context: tensors a forward makes for itself (masks, indices) stay real
        output = model(torch.empty(max(batch, 2), config.in_channels, *shape, device="meta"))
    except Exception as error:  # noqa: BLE001 - any failure is the network refusing this shape
        raise ValueError(f"network {config.architecture} does not take {'x'.join(map(str, shape))}: "
                         f"{_first_line(error)}") from None
    expected = (max(batch, 2), config.classes, *shape)
    if isinstance(output, (list, tuple)) or (isinstance(output, torch.Tensor) and output.dim() == 6):
        output = primary_output(output)  # deep-supervision heads: the full-resolution one is the logits
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"network {config.architecture} returns {got} for {'x'.join(map(str, shape))}, not "
                         f"logits of shape {expected}")


def _first_line(error: BaseException) -> str:
    return first_line(error) or type(error).__name__


def _intel_check(config: ModelConfig) -> None:
    if config.norm != "batch":
        raise ValueError("intel-unet has batch norm after every convolution: --norm must be batch")


register_model(ModelSpec("unet3d", lambda config, shape: UNet3D(config),
                         "the whitepaper's Table 1 3D U-Net (19,735,329 weights at 32 filters)", slabs=True,
                         divisor=lambda config: DOWNSAMPLING, why="the U-Net pools three times"))
register_model(ModelSpec("intel-unet", lambda config, shape: networks.IntelUNet(config.in_channels, config.classes,
                                                                               config.filters),
                         "the paper's code repository's 3D U-Net (IntelAI/unet: 5,650,801 parameters)",
                         divisor=lambda config: 16, why="intel-unet pools four times", check=_intel_check,
                         preset="intel-unet"))
