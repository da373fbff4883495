"""The whitepaper's Table 1 method: count every layer's output once, add its weights, double for training.

    params(layer)     = trainable_weights(layer) + batch * H * W * D * feature_maps(layer)
    memory_mb(layer)  = params(layer) * bytes_per_value / 1e6          (MB = 1e6 bytes, as the paper)
    training_mb       = 2 * sum(memory_mb)                             ("double for training")

The layer list is not written down here: it is read off the real network (any network of
:func:`fullres.nets.registry.build_model`) by running it on the meta device (no memory is allocated) with a
forward hook on every module that produces a feature map (convolutions, linear layers, normalisations,
pooling, dropout, the paper's concatenations), so a change of filters, channels or depth changes the
table with the model. For the paper's network the rows are exactly Table 1's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fullres.nets.unet3d import Concatenate
from fullres.kernels.layers import Conv3d, ConvTranspose3d
from fullres.nets.registry import ModelConfig
from fullres.nets.registry import build_on_meta, check_divisible

# Keras names, as Table 1 prints them.
_LAYER_TYPES = {
    nn.Conv3d: "Conv3D",
    Conv3d: "Conv3D",  # fullres's nn.Conv3d (oneDNN for few input channels), the same layer
    nn.ConvTranspose3d: "Conv3DTranspose",
    ConvTranspose3d: "Conv3DTranspose",  # fullres's, the same layer
    nn.MaxPool3d: "MaxPooling3D",
    nn.Dropout: "Dropout",
    Concatenate: "Concatenate",
    nn.InstanceNorm3d: "InstanceNormalization",
    nn.GroupNorm: "GroupNormalization",
    nn.BatchNorm3d: "BatchNormalization",
    nn.Linear: "Dense",
    nn.LayerNorm: "LayerNormalization",
}
# Other networks' layers are recognised by their base class and named by their own class.
_LAYER_BASES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.dropout._DropoutNd)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm)  # transformer layers: features in the last dimension


def _layer_type(module: nn.Module) -> str | None:
    if type(module) in _LAYER_TYPES:
        return _LAYER_TYPES[type(module)]
    if isinstance(module, _LAYER_BASES) or any(True for _ in module.parameters(recurse=False)):
        return type(module).__name__  # a layer with weights of its own (e.g. PReLU) counts them too
    return None


@dataclass(frozen=True)
class Table1Row:
    layer: str
    type: str
    batch: int
    height: int
    width: int
    depth: int
    feature_maps: int
    trainable_weights: int
    feature_map_size: int
    params: int
    memory_mb: float


@dataclass(frozen=True)
class Table1:
    rows: tuple[Table1Row, ...]
    bytes_per_value: int

    @property
    def trainable_weights(self) -> int:
        return sum(r.trainable_weights for r in self.rows)

    @property
    def feature_map_size(self) -> int:
        return sum(r.feature_map_size for r in self.rows)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def size_mb(self) -> float:
        return self.params * self.bytes_per_value / 1e6

    @property
    def training_mb(self) -> float:
        """Table 1's "double for training": forward maps plus as much again for the backward pass."""
        return 2 * self.size_mb

    @property
    def training_bytes(self) -> int:
        return 2 * self.params * self.bytes_per_value

    def to_json(self) -> dict:
        return {
            "method": "table1",
            "bytes_per_value": self.bytes_per_value,
            "rows": [asdict(r) for r in self.rows],
            "totals": {
                "trainable_weights": self.trainable_weights,
                "feature_map_size": self.feature_map_size,
                "params": self.params,
                "size_mb": self.size_mb,
                "training_mb": self.training_mb,
            },
        }


def _row(name: str, kind: str, shape: tuple[int, ...], weights: int, bytes_per_value: int,
         channels_last: bool = False) -> Table1Row:
    """A row for a layer whose output has `shape`: (batch, channels, H, W, D), or with fewer or more
    spatial dimensions (their product as H), or channels last (`channels_last`, tokens as H)."""
    if len(shape) == 5 and not channels_last:
        batch, channels, height, width, depth = shape
    else:
        batch, channels = shape[0], shape[-1] if channels_last else shape[1]
        rest = shape[1:-1] if channels_last else shape[2:]
        height, width, depth = math.prod(rest), 1, 1
    feature_map_size = batch * channels * height * width * depth
    params = weights + feature_map_size
    return Table1Row(name, kind, batch, height, width, depth, channels, weights, feature_map_size,
                     params, params * bytes_per_value / 1e6)


def table1(model_config: ModelConfig, shape: tuple[int, int, int], batch: int,
           bytes_per_value: int = 4) -> Table1:
    """Table 1 for `model_config` at spatial `shape` (H, W, D) and `batch`, read off the real model."""
    check_divisible(model_config, shape)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    model = build_on_meta(model_config, shape)
    rows = [_row("Input_Image", "InputLayer", (batch, model_config.in_channels, *shape), 0, bytes_per_value)]

    def record(module: nn.Module, _inputs, output) -> None:
        if not isinstance(output, torch.Tensor):  # e.g. a layer returning attention weights too: not a feature map
            return
        weights = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        rows.append(_row(names[module], _layer_type(module), tuple(output.shape), weights, bytes_per_value,
                         isinstance(module, _CHANNELS_LAST)))

    names = {m: n for n, m in model.named_modules() if _layer_type(m) is not None}
    handles = [m.register_forward_hook(record) for m in names]
    try:
        with torch.no_grad():
            model(torch.empty(batch, model_config.in_channels, *shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    counted = sum(row.trainable_weights for row in rows)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if total > counted:  # weights no hooked layer owns (a transformer's position embeddings): one row, so totals hold
        rows.append(Table1Row("other weights", "Weights", batch, 0, 0, 0, 0, total - counted, 0, total - counted,
                              (total - counted) * bytes_per_value / 1e6))
    return Table1(tuple(rows), bytes_per_value)
