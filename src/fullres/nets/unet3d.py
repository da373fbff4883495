"""The paper's network (``unet3d``), with Table 1's layer names as module names.

The paper's network (``unet3d``), with Table 1's layer names as module names:

Encoder: four levels of two 3x3x3 convolutions (32/64, 64/128, 128/256, 256/512 filters for
base 32), 2x2x2 max-pooling between them, dropout after conv3a and conv4a. Decoder: 2x2x2
stride-2 transposed convolutions that keep the channel count, concatenation skips, two 3x3x3
convolutions per level, and a 1x1x1 prediction. No normalisation by default, as in Table 1.

With the defaults the network has exactly 19,735,329 trainable weights (Table 1's total).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from fullres.engine.slabs import Level, call, forward_levels
from fullres.engine.spatial import forward_shards
from fullres.kernels.layers import Conv3d, ConvTranspose3d, relu_
from fullres.nets.registry import DOWNSAMPLING, ModelConfig
from fullres.terms import OWN_DIVISORS, check_sizes

LEVELS = 4  # resolutions: full, 1/2, 1/4, 1/8 (the bottleneck)
UNET3D_WHY = OWN_DIVISORS["unet3d"][1]


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
        self.space = None  # spatial parallelism: this process's fullres.engine.spatial.Space (its rows of every level)
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
        return relu_(x)  # in place: the pre-activation map is never kept beside the activation

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

    # Slabs (fullres.engine.slabs): level r of the encoder and of the decoder (resolution 1/2^r) in counts[r]
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
        check_sizes(tuple(x.shape[2:]), DOWNSAMPLING, UNET3D_WHY)
        if self.space is not None:  # x is this process's rows of the volume
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
        return lambda level: self._checkpointed if checkpointed and level < levels else call

    @staticmethod
    def _checkpointed(segment, *inputs):
        # Non-reentrant checkpointing restores the RNG state, so dropout masks repeat exactly on recompute.
        return checkpoint(segment, *inputs, use_reentrant=False)


