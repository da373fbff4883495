"""Preprocessing as pure array functions: resampling, brain extent, crop/pad around it, intensity
normalisation, training targets.

A case goes  image (C, H0, W0, D0) at its own voxel spacing  ->  resampled to `DataConfig.spacing`
(when it differs)  ->  per channel: CT clipped and standardised with the dataset's statistics, anything
else z-scored over the brain (foreground) voxels  ->  crop/pad to `DataConfig.shape` centred on the brain
->  (C, H, W, D). The `CropBox` recorded on the way lets `uncrop` put a prediction back into the resampled
geometry exactly; `resample` takes it back to the input's own grid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np

from fullres.errors import UserError
from fullres.terms import CROPS, TARGET_CLASSES

TARGETS = tuple(TARGET_CLASSES)
REGION_NAMES = ("WT", "TC", "ET")
#: nnU-Net's share of training crops centred on a foreground voxel (the rest are placed uniformly)
FOREGROUND_SHARE = 1 / 3


@dataclass(frozen=True)
class DataConfig:
    """What the network sees: which channels, which target, at which size, normalised or not.

    target: "wt" = whole tumour (label > 0) as 1 float channel (the paper); "regions" = WT/TC/ET
    as 3 float channels; "classes" = the raw integer labels, int64 (H, W, D).
    spacing: the voxel spacing (mm, along H, W, D) every image is resampled to before anything else;
    None = each image as stored. `shape` counts voxels at this spacing.
    ct: per entry of `channels`, None (z-scored per case over the foreground, as MRI) or the dataset's CT
    statistics (low, high, mean, std): clipped to [low, high], then (x - mean) / std over the whole image.
    Empty = every channel z-scored.
    crop: how a training image larger than `shape` is cut: "center" = the window centred on the brain
    (the paper's fixed crop); "foreground" = a random window per sample, a third of them centred on a
    random foreground voxel (nnU-Net's oversampling); see :func:`sample_crop_box`.
    """

    channels: tuple[int, ...] = (0, 1, 2, 3)
    target: str = "wt"
    shape: tuple[int, int, int] = (240, 240, 144)
    normalize: bool = True
    spacing: tuple[float, float, float] | None = None
    ct: tuple[tuple[float, float, float, float] | None, ...] = ()
    crop: str = "center"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
            if len(self.spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing):
                raise ValueError(f"spacing must be three positive sizes in mm (H, W, D), got {self.spacing}")
        object.__setattr__(self, "ct", tuple(None if c is None else tuple(float(v) for v in c) for c in self.ct))
        if self.ct and len(self.ct) != len(self.channels):
            raise ValueError(f"ct statistics are given for {len(self.ct)} channels, but {len(self.channels)} are used")
        for stats in self.ct:
            if stats is not None and (len(stats) != 4 or not stats[0] <= stats[1] or not stats[3] > 0):
                raise ValueError(f"ct statistics must be (low <= high, mean, std > 0), got {stats}")
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if not self.channels or min(self.channels) < 0 or len(set(self.channels)) != len(self.channels):
            raise ValueError(f"channels must be distinct indices >= 0, got {self.channels}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive sizes (H, W, D), got {self.shape}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (lists for tuples) that `from_json` turns back into an equal config."""
        return {"channels": list(self.channels), "target": self.target, "shape": list(self.shape),
                "normalize": self.normalize, "spacing": None if self.spacing is None else list(self.spacing),
                "ct": [None if c is None else list(c) for c in self.ct], "crop": self.crop}

    def ct_of(self, position: int) -> tuple[float, float, float, float] | None:
        """The CT statistics of the `position`-th used channel, None when it is z-scored per case."""
        return self.ct[position] if self.ct else None

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> "DataConfig":
        """Inverse of `to_json`; accepts the dict or its JSON text. Unknown keys are a UserError."""
        if isinstance(data, str):
            data = json.loads(data)
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise UserError(f"data config: unknown keys {', '.join(sorted(unknown))}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise UserError(f"data config: {error}") from None


@dataclass(frozen=True)
class CropBox:
    """How an original volume maps into the network-sized one, per axis (H, W, D).

    original[source[a][0]:source[a][1]] lands at network[destination[a][0]:destination[a][1]];
    everything else in the network volume is zero padding.
    """

    original_shape: tuple[int, int, int]
    target_shape: tuple[int, int, int]
    source: tuple[tuple[int, int], ...]
    destination: tuple[tuple[int, int], ...]

    def source_slices(self) -> tuple[slice, ...]:
        return tuple(slice(start, stop) for start, stop in self.source)

    def destination_slices(self) -> tuple[slice, ...]:
        return tuple(slice(start, stop) for start, stop in self.destination)

    def to_json(self) -> dict[str, Any]:
        return {"original_shape": list(self.original_shape), "target_shape": list(self.target_shape),
                "source": [list(p) for p in self.source], "destination": [list(p) for p in self.destination]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "CropBox":
        return cls(tuple(data["original_shape"]), tuple(data["target_shape"]),
                   tuple(tuple(p) for p in data["source"]), tuple(tuple(p) for p in data["destination"]))


def covering_shape(shape: tuple[int, ...], divisor: int, least: tuple[int, ...] = (1, 1, 1)) -> tuple[int, ...]:
    """The smallest shape that holds all of `shape` in multiples of `divisor`, and at least `least`: what a
    network that takes multiples of `divisor` predicts every voxel of a volume of `shape` at."""
    return tuple(max(-(-size // divisor) * divisor, -(-low // divisor) * divisor, divisor)
                 for size, low in zip(shape, least))


def brain_mask(image: np.ndarray) -> np.ndarray:
    """Voxels non-zero in any channel of a (C, H, W, D) image: the brain (MSD backgrounds are exactly 0)."""
    return np.any(image != 0, axis=0)


def bounding_box(mask: np.ndarray) -> tuple[tuple[int, int], ...]:
    """(start, stop) of the True voxels along each axis; the whole extent when nothing is True."""
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(np.any(mask, axis=others))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(box)


def centred_crop_box(original_shape: tuple[int, ...], extent: tuple[tuple[int, int], ...],
                     target_shape: tuple[int, ...]) -> CropBox:
    """A window of `target_shape` centred on `extent`, kept inside the volume when cropping and
    covering the whole volume when padding (so padding never also crops)."""
    source, destination = [], []
    for size, (low, high), target in zip(original_shape, extent, target_shape):
        start = int(np.floor((low + high - target) / 2))  # window [start, start + target) centred on the extent
        start = min(max(start, min(0, size - target)), max(0, size - target))
        src_start, src_stop = max(start, 0), min(start + target, size)
        source.append((src_start, src_stop))
        destination.append((src_start - start, src_stop - start))
    return CropBox(tuple(original_shape), tuple(target_shape), tuple(source), tuple(destination))


def crop_or_pad(array: np.ndarray, box: CropBox) -> np.ndarray:
    """Apply `box` to the last three axes of `array` (zeros where the window leaves the volume)."""
    lead = array.shape[:-3]
    out = np.zeros(lead + box.target_shape, dtype=array.dtype)
    out[(...,) + box.destination_slices()] = array[(...,) + box.source_slices()]
    return out


def uncrop(prediction: np.ndarray, box: CropBox) -> np.ndarray:
    """Put a network-sized prediction (..., H, W, D) back into the original geometry (zeros outside)."""
    if tuple(prediction.shape[-3:]) != box.target_shape:
        raise ValueError(f"prediction spatial shape {prediction.shape[-3:]} != crop box target {box.target_shape}")
    out = np.zeros(prediction.shape[:-3] + box.original_shape, dtype=prediction.dtype)
    out[(...,) + box.source_slices()] = prediction[(...,) + box.destination_slices()]
    return out


def resampled_shape(shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]) -> tuple[int, ...]:
    """The voxel grid of an image of `shape` at `spacing` resampled to `target` spacing (nnU-Net's rule:
    the physical extent kept, rounded to whole voxels, at least one)."""
    return tuple(max(1, int(round(size * have / want))) for size, have, want in zip(shape, spacing, target))


def needs_resampling(spacing: tuple[float, ...], target: tuple[float, ...] | None) -> bool:
    """Whether an image at `spacing` differs from the `target` spacing (None: never) by more than 0.1 %."""
    return target is not None and any(abs(have - want) > 1e-3 * want for have, want in zip(spacing, target))


def resampled_grid(shape: tuple[int, ...], spacing: tuple[float, ...], config: DataConfig) -> tuple[int, ...]:
    """The voxel grid an image of `shape` at `spacing` has once resampled to `config.spacing` (its own
    grid where the spacings agree, or the config keeps images as stored)."""
    return resampled_shape(shape, spacing, config.spacing) if needs_resampling(spacing, config.spacing) else tuple(shape)


def resample(array: np.ndarray, shape: tuple[int, ...], labels: bool = False) -> np.ndarray:
    """`array` (..., H, W, D) resampled to the spatial `shape` by MONAI's ``Resize``: trilinear for images and
    probabilities (float32 out), nearest voxel for integer labels (same dtype out, the label set kept).
    The identity (the very array) when the shape is already `shape`."""
    from monai.transforms import Resize

    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[-3:]) == shape:
        return array
    lead = array.shape[:-3]
    flat = np.asarray(array).reshape((-1,) + array.shape[-3:])
    resize = Resize(shape, mode="nearest-exact" if labels else "trilinear",
                    align_corners=None if labels else False)
    out = np.asarray(resize(flat.astype(np.float32)).array)  # MetaTensor.array: its numpy data
    out = out.reshape(lead + shape)
    return np.rint(out).astype(array.dtype) if labels else out.astype(np.float32)


def normalize_ct(channel: np.ndarray, stats: tuple[float, float, float, float]) -> np.ndarray:
    """nnU-Net's CT normalisation: clipped to the dataset's foreground percentiles [low, high], then
    standardised with the dataset's foreground mean and std (the same numbers for every case)."""
    low, high, mean, std = stats
    return ((np.clip(channel.astype(np.float64), low, high) - mean) / std).astype(np.float32)


def zscore_brain(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-channel (x - mean) / std over the brain mask; voxels outside it stay exactly 0."""
    out = np.zeros(image.shape, dtype=np.float32)
    if not mask.any():
        return out
    for channel in range(image.shape[0]):
        values = image[channel][mask].astype(np.float64)
        std = values.std()
        out[channel][mask] = (values - values.mean()) / (std if std > 0 else 1.0)
    return out


def preprocess_image(image: np.ndarray, config: DataConfig,
                     spacing: tuple[float, float, float] | None = None) -> tuple[np.ndarray, CropBox]:
    """(C_all, H0, W0, D0) float32 at voxel `spacing` -> the config's channels, resampled to
    `config.spacing`, normalised, cropped: (C, H, W, D) and its box (whose original shape is the resampled
    grid). `spacing` None: the image is taken as already at `config.spacing`.

    The brain extent and mask use all channels, so FLAIR-only and 4-channel runs crop identically.
    """
    if max(config.channels) >= image.shape[0]:
        raise UserError(f"--channels asks for channel {max(config.channels)} but the image has {image.shape[0]}")
    if spacing is not None:
        image = resample(image, resampled_grid(image.shape[1:], spacing, config))  # the identity at its own grid
    mask = brain_mask(image)
    box = centred_crop_box(image.shape[1:], bounding_box(mask), config.shape)
    selected = image[list(config.channels)]
    if config.normalize:
        scored = np.empty(selected.shape, dtype=np.float32)
        for position in range(len(config.channels)):  # each channel by its own rule, computed once
            stats = config.ct_of(position)
            scored[position] = (zscore_brain(selected[position:position + 1], mask)[0] if stats is None
                                else normalize_ct(selected[position], stats))
        selected = scored
    else:
        selected = selected.astype(np.float32)
    return crop_or_pad(selected, box), box


def sample_crop_box(shape: tuple[int, ...], foreground: np.ndarray, window: tuple[int, ...],
                    rng: np.random.Generator) -> tuple[slice, ...]:
    """A random training window of `window` voxels inside a volume of `shape` (each at least `window`):
    with probability :data:`FOREGROUND_SHARE` centred on a random voxel of `foreground` (a boolean volume;
    where it has one), else placed uniformly; kept inside the volume. The slices of the window."""
    starts = [int(rng.integers(0, size - size_w + 1)) for size, size_w in zip(shape, window)]
    if rng.random() < FOREGROUND_SHARE:
        voxels = np.flatnonzero(foreground)
        if voxels.size:
            centre = np.unravel_index(voxels[int(rng.integers(voxels.size))], foreground.shape)
            starts = [min(max(int(c) - size_w // 2, 0), size - size_w)
                      for c, size, size_w in zip(centre, shape, window)]
    return tuple(slice(start, start + size_w) for start, size_w in zip(starts, window))


def make_target(label: np.ndarray, target: str, regions: Mapping[str, tuple[int, ...]] | None = None) -> np.ndarray:
    """The training target from an integer label volume (H, W, D).

    "wt": float32 (1, H, W, D) label > 0; "regions": float32 (3, H, W, D) WT/TC/ET from `regions`
    (see `brats_regions`); "classes": int64 (H, W, D).
    """
    if target == "wt":
        return (label > 0)[None].astype(np.float32)
    if target == "regions":
        if regions is None or any(name not in regions for name in REGION_NAMES):
            raise UserError("target 'regions' needs WT, TC and ET, derived from dataset.json's label names")
        return np.stack([np.isin(label, regions[name]) for name in REGION_NAMES]).astype(np.float32)
    if target == "classes":
        return label.astype(np.int64)
    raise ValueError(f"unknown target {target!r}")
