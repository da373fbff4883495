"""Augmentation on the fly: MONAI's random transforms on whole preprocessed volumes, in the data workers.

The contract:

* A sample is an image float32 (C, H, W, D) and its target as :class:`fullres.data.MSDDataset` gives it
  (float32 (K, H, W, D) masks for "wt" and "regions", int64 (H, W, D) classes for "classes"), numpy arrays
  or torch tensors. :func:`augment` returns the same kind of array with the same shape and dtype: the
  training shape (``--shape``) never changes.
* The image is interpolated linearly, the target by nearest neighbour, so the target keeps its label set.
* The result is a pure function of the sample, the preset and `seed`: every random transform draws from a
  ``np.random.RandomState`` seeded from it (MONAI's ``Randomizable.set_random_state``), never from a global
  RNG. In training the seed is :func:`sample_seed` (run seed, epoch, case index), so a resumed run, any
  number of workers and any number of processes see exactly the samples an uninterrupted run sees.
* ``none`` is the identity (the very arrays given). Validation and prediction never augment.

Presets (probabilities after nnU-Net's defaults):

* ``light``: a flip along each axis (p 0.5 each) and the intensity transforms: scale x0.75-1.25 and shift
  +-0.1 per channel (p 0.15 each), gamma 0.7-1.5 keeping mean and std (p 0.3), Gaussian noise of standard
  deviation up to 0.1 (p 0.1). Nothing is resampled.
* ``default``: ``light`` plus, first, a small affine (rotation +-15 degrees about each axis, scale 0.9-1.1
  per axis; p 0.2), a light elastic deformation (sigma 9-13, magnitude 0-900 voxels, a few voxels of
  displacement; p 0.1) and a 90-degree rotation in the axial (H, W) plane (p 0.5, only where H == W: on
  other shapes it would change the shape, and its 180-degree case is two of the flips).
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fullres.data.preprocess import sample_crop_box
from fullres.terms import AUGMENTATIONS

KEYS = ("image", "label")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of case `index` in `epoch` of a run seeded `seed` (0..2**32-1, what MONAI takes)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint32)[0])


def build_augmentation(preset: str, shape: tuple[int, int, int]):
    """The MONAI ``Compose`` of `preset` for samples of spatial `shape` (H, W, D), on dictionaries with an
    "image" (C, H, W, D) and a float "label" (K, H, W, D); None for ``none``."""
    from monai.transforms import (Compose, Identityd, OneOf, Rand3DElasticd, RandAdjustContrastd, RandAffined,
                                  RandFlipd, RandGaussianNoised, RandRotate90d, RandScaleIntensityd,
                                  RandShiftIntensityd)

    if preset not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {preset!r}")
    if preset == "none":
        return None
    modes, angle = ("bilinear", "nearest"), math.radians(15)
    spatial = []
    if preset == "default":
        spatial = [
            RandAffined(KEYS, prob=0.2, rotate_range=(angle,) * 3, scale_range=(0.1,) * 3, mode=modes,
                        padding_mode="zeros"),
            # OneOf: Rand3DElasticd resamples (seconds at full size) even when it does not deform
            OneOf([Rand3DElasticd(KEYS, sigma_range=(9, 13), magnitude_range=(0, 900), prob=1.0, mode=modes,
                                  padding_mode="zeros"), Identityd(KEYS)], weights=(0.1, 0.9)),
        ]
        if shape[0] == shape[1]:
            spatial.append(RandRotate90d(KEYS, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    flips = [RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)]
    intensity = [
        RandScaleIntensityd("image", factors=0.25, prob=0.15, channel_wise=True),
        RandShiftIntensityd("image", offsets=0.1, prob=0.15, channel_wise=True),
        RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3, retain_stats=True),
        RandGaussianNoised("image", std=0.1, prob=0.1),
    ]
    return Compose([*spatial, *flips, *intensity])


def augment(image: Any, target: Any, preset: str, seed: int, transform=None) -> tuple[Any, Any]:
    """(image, target) augmented by `preset` with the random choices of `seed` (see the module's contract).
    `transform`: the preset's Compose for this shape, built once by the caller (else built here)."""
    if preset == "none":
        return image, target
    if transform is None:
        transform = build_augmentation(preset, tuple(image.shape[-3:]))
    as_numpy = isinstance(image, np.ndarray)
    image_in, target_in = torch.as_tensor(image), torch.as_tensor(target)
    classes = target_in.ndim == 3  # "classes": (H, W, D) integers, resampled as one float channel
    label = target_in[None].float() if classes else target_in.float()
    transform.set_random_state(seed=seed)
    out = transform({"image": image_in.float(), "label": label})
    image_out = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).to(image_in.dtype).contiguous()
    label_out = torch.as_tensor(out["label"]).as_subclass(torch.Tensor)
    label_out = (label_out[0].round() if classes else label_out).to(target_in.dtype).contiguous()
    if as_numpy:
        return image_out.numpy(), label_out.numpy()
    return image_out, label_out


class AugmentedDataset(Dataset):
    """`dataset`'s samples cut to the training window and augmented by `preset`, indexed by (epoch, index):
    the seed of each is :func:`sample_seed` (`seed`, epoch, index), so a sample depends on nothing a worker
    holds. Feed it from an :class:`EpochSampler`.

    `window` (H, W, D): a sample larger than it along any axis is cut to it first by
    :func:`fullres.data.preprocess.sample_crop_box` (a random window, a third of them centred on a
    foreground voxel of the target), from a random stream of its own; None = samples are used whole."""

    def __init__(self, dataset: Dataset, preset: str, seed: int, window: tuple[int, int, int] | None = None) -> None:
        build_augmentation(preset, (1, 1, 1))  # an unknown preset fails here, not in a worker
        self.dataset, self.preset, self.seed = dataset, preset, seed
        self.window = None if window is None else tuple(int(w) for w in window)
        self._transforms: dict = {}  # per shape, built in the process that uses them

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, target = self.dataset[index]
        seed = sample_seed(self.seed, epoch, index)
        shape = tuple(image.shape[-3:])
        if self.window is not None and shape != self.window:
            foreground = (target > 0) if target.ndim == 3 else (target > 0).any(0)
            box = sample_crop_box(shape, np.asarray(foreground), self.window, np.random.default_rng([seed, 1]))
            image, target = image[(...,) + box].contiguous(), target[(...,) + box].contiguous()
            shape = self.window
        if shape not in self._transforms:
            self._transforms[shape] = build_augmentation(self.preset, shape)
        return augment(image, target, self.preset, seed, self._transforms[shape])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_transforms": {}}  # workers build their own


class EpochSampler(Sampler):
    """`sampler`'s indices as (epoch, index) keys for an :class:`AugmentedDataset`; ``set_epoch`` sets both."""

    def __init__(self, sampler) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch  # the epoch this pass was made for, even if set_epoch runs before it ends
        return ((epoch, int(index)) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)
