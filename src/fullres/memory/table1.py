"""The whitepaper's Table 1 method: count every layer's output once, add its weights, double for training.

    params(layer)     = trainable_weights(layer) + batch * H * W * D * feature_maps(layer)
    memory_mb(layer)  = params(layer) * bytes_per_value / 1e6          (MB = 1e6 bytes, as the paper)
    training_mb       = 2 * sum(memory_mb)                             ("double for training")

The layer list is not written down here: it is read off the real `UNet3D` by running it on the
meta device (no memory is allocated) with a forward hook on every leaf module, so a change of
filters, channels or depth changes the table with the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from fullres.model import Concatenate, Conv3d, ModelConfig, build_model, validate_spatial_shape

# Keras names, as Table 1 prints them.
_LAYER_TYPES = {
    nn.Conv3d: "Conv3D",
    Conv3d: "Conv3D",  # fullres's nn.Conv3d (oneDNN for few input channels), the same layer
    nn.ConvTranspose3d: "Conv3DTranspose",
    nn.MaxPool3d: "MaxPooling3D",
    nn.Dropout: "Dropout",
    Concatenate: "Concatenate",
    nn.InstanceNorm3d: "InstanceNormalization",
    nn.GroupNorm: "GroupNormalization",
    nn.BatchNorm3d: "BatchNormalization",
}


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


def _row(name: str, kind: str, shape: tuple[int, ...], weights: int, bytes_per_value: int) -> Table1Row:
    batch, channels, height, width, depth = shape
    feature_map_size = batch * channels * height * width * depth
    params = weights + feature_map_size
    return Table1Row(name, kind, batch, height, width, depth, channels, weights, feature_map_size,
                     params, params * bytes_per_value / 1e6)


def table1(model_config: ModelConfig, shape: tuple[int, int, int], batch: int,
           bytes_per_value: int = 4) -> Table1:
    """Table 1 for `model_config` at spatial `shape` (H, W, D) and `batch`, read off the real model."""
    validate_spatial_shape(shape)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    with torch.device("meta"):
        model = build_model(model_config)
    rows = [_row("Input_Image", "InputLayer", (batch, model_config.in_channels, *shape), 0, bytes_per_value)]

    def record(module: nn.Module, _inputs, output: torch.Tensor) -> None:
        weights = sum(p.numel() for p in module.parameters(recurse=False) if p.requires_grad)
        rows.append(_row(names[module], _LAYER_TYPES[type(module)], tuple(output.shape), weights, bytes_per_value))

    names = {m: n for n, m in model.named_modules() if type(m) in _LAYER_TYPES}
    handles = [m.register_forward_hook(record) for m in names]
    try:
        with torch.no_grad():
            model(torch.empty(batch, model_config.in_channels, *shape, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return Table1(tuple(rows), bytes_per_value)
