"""The dataset's fingerprint, as nnU-Net takes it: the target spacing and the CT intensity statistics.

Both come from every training case of the dataset (not one fold's), so that all folds of a dataset, and
an ensemble of them, preprocess alike. They are stored in the run's :class:`DataConfig` and applied the
same way at predict.

* Spacing: ``--spacing auto`` is the median voxel spacing of the training images, per axis (read from the
  NIfTI headers, so it costs no voxel reads); ``none`` keeps each image as stored; three numbers give it.
* CT: a channel whose modality name is "CT" is clipped to the 0.5 and 99.5 percentiles of the dataset's
  foreground voxels (label > 0) and standardised with their mean and std; up to 10,000 voxels are drawn
  from each case's foreground with a fixed seed, as nnU-Net's fingerprint does. Other channels are
  z-scored per case over the foreground. The statistics are kept in the dataset's cache folder, keyed by
  the training files (paths, sizes, mtimes) and the channels, so the K folds of a dataset read it once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fullres.data.cache import default_cache_dir, source_fingerprint
from fullres.data.msd import DatasetIndex, image_files
from fullres.data.nifti import open_nifti, read_image_channels_first, read_label, voxel_spacing
from fullres.errors import UserError
from fullres.files import cache_lookup, cache_store

CT_CACHE_FILE = "ct_statistics.json"  # in the dataset's cache folder (fullres.data.cache.default_cache_dir)
VOXELS_PER_CASE = 10_000
PERCENTILES = (0.5, 99.5)


def is_ct(modality: str) -> bool:
    """Whether a channel named `modality` is normalised as CT (its name is "CT", in any case)."""
    return modality.strip().lower() == "ct"


def median_spacing(index: DatasetIndex) -> tuple[float, float, float]:
    """The median voxel spacing (H, W, D) of `index`'s training images, from their headers."""
    if not index.training:
        raise UserError(f"{index.root}: no training cases to take the median spacing of")
    spacings = np.array([voxel_spacing(open_nifti(image_files(case.image)[0])) for case in index.training])
    return tuple(float(s) for s in np.median(spacings, axis=0))


def resolve_spacing(spec: Sequence[str] | None, index: DatasetIndex) -> tuple[float, float, float] | None:
    """`--spacing` as given (["auto"], ["none"] or three numbers in mm) -> the spacing to train at, or None."""
    if spec is None or list(spec) == ["none"]:
        return None
    if list(spec) == ["auto"]:
        return median_spacing(index)
    try:
        values = tuple(float(v) for v in spec)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"--spacing {' '.join(spec)}: give auto, none, or three positive sizes in mm (X Y Z)")
    return values


def ct_statistics(index: DatasetIndex, channels: Sequence[int], seed: int = 1234, cache: bool = True,
                  ) -> tuple[tuple[float, float, float, float] | None, ...]:
    """Per entry of `channels`: (low, high, mean, std) of the dataset's foreground voxels where the channel's
    modality is CT, None elsewhere; () when no used channel is CT (every channel z-scored per case).
    With `cache`, read from (or written to) the dataset's cache folder when its training files are unchanged."""
    names = [index.modalities[c] if c < len(index.modalities) else "" for c in channels]
    wanted = [position for position, name in enumerate(names) if is_ct(name)]
    if not wanted:
        return ()
    if not cache:
        return _ct_statistics(index, channels, names, wanted, seed)
    path = default_cache_dir(index.root) / CT_CACHE_FILE
    key = {"channels": list(channels), "seed": seed, "voxels": VOXELS_PER_CASE, "percentiles": list(PERCENTILES),
           "sources": [source_fingerprint(Path(p)) for case in index.training
                       for p in (*image_files(case.image), case.label)]}
    record = cache_lookup(path, key)
    try:
        return tuple(None if c is None else tuple(float(v) for v in c) for c in record["statistics"])
    except (TypeError, ValueError, KeyError):
        pass  # absent or damaged: computed again
    statistics = _ct_statistics(index, channels, names, wanted, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return statistics  # no cache folder: only the next run reads the data again
    cache_store(path, key, {"statistics": statistics})
    return statistics


def _ct_statistics(index: DatasetIndex, channels: Sequence[int], names: list[str], wanted: list[int],
                   seed: int) -> tuple[tuple[float, float, float, float] | None, ...]:
    rng = np.random.default_rng(seed)
    samples: list[list[np.ndarray]] = [[] for _ in wanted]
    for case in index.training:
        image, _ = read_image_channels_first(case.image)
        label = read_label(case.label)
        if label.shape != image.shape[1:]:
            raise UserError(f"{case.label}: label shape {label.shape} != image spatial shape {image.shape[1:]}")
        foreground = np.flatnonzero(label > 0)
        if not foreground.size:
            continue
        picked = rng.choice(foreground, size=min(VOXELS_PER_CASE, foreground.size), replace=False)
        for k, position in enumerate(wanted):
            samples[k].append(image[channels[position]].reshape(-1)[picked])
    out: list = [None] * len(channels)
    for k, position in enumerate(wanted):
        if not samples[k]:
            raise UserError(f"{index.root}: no training case has foreground voxels (label > 0) to take the CT "
                            f"statistics of channel {names[position]} from")
        values = np.concatenate(samples[k]).astype(np.float64)
        low, high = np.percentile(values, PERCENTILES)
        std = float(values.std())
        out[position] = (float(low), float(high), float(values.mean()), std if std > 0 else 1.0)
    return tuple(out)
