"""The preprocessed cache: each case decompressed and preprocessed once, then memory-mapped.

An entry is three files in the cache folder, named `<case_id>.<key>.*`:
  .image.npy  float32 (C, H, W, D), preprocessed and cropped
  .label.npy  uint8 (H, W, D), cropped the same way (training cases only)
  .box.json   the CropBox; written last, so its presence marks a complete entry
The key hashes the source files' absolute paths, sizes and mtimes, the options that shape the stored
arrays (channels, shape, normalize, spacing, CT statistics, crop) and CACHE_FORMAT_VERSION: touching a
source file or changing an option makes a new entry. (The target is computed from the stored label at load
time, so switching between wt / regions / classes reuses the same entry.) Old entries are left in place; delete the
folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np

from fullres.files import atomic_write, write_bytes_atomically
from fullres.data.nifti import case_id_from_path, open_nifti, read_image_channels_first, read_label, voxel_spacing
from fullres.data.preprocess import (CropBox, DataConfig, covering_shape, crop_or_pad, preprocess_image, resample,
                                     resampled_grid)
from fullres.errors import UserError

CACHE_FORMAT_VERSION = 1
CACHE_DIR_NAME = ".fullres_cache"


def default_cache_dir(root: Path) -> Path:
    """`<root>/.fullres_cache` when it can be created and written, else `~/.cache/fullres/<hash of root>`."""
    root = Path(root).resolve()
    in_dataset = root / CACHE_DIR_NAME
    try:
        in_dataset.mkdir(exist_ok=True)
        if os.access(in_dataset, os.W_OK | os.X_OK):
            return in_dataset
    except OSError:
        pass
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return user_cache / "fullres" / hashlib.sha256(str(root).encode()).hexdigest()[:16]


def source_fingerprint(path: Path) -> list:
    """[absolute path, size, mtime_ns]: changes whenever the file is replaced or rewritten."""
    try:
        stat = path.stat()
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(sources: list[Path], config: DataConfig) -> str:
    """Hex digest of the sources' fingerprints, the array-shaping options and the cache format version."""
    options = {"channels": list(config.channels), "shape": list(config.shape), "normalize": config.normalize}
    json_form = config.to_json()
    for name, default in (("spacing", None), ("ct", []), ("crop", "center")):  # only where set: older keys hold
        if json_form[name] != default:
            options[name] = json_form[name]
    payload = {"version": CACHE_FORMAT_VERSION, "options": options,
               "sources": [source_fingerprint(Path(p)) for p in sources]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def entry_paths(cache_dir: Path, case_id: str, key: str) -> dict[str, Path]:
    stem = f"{case_id}.{key}"
    return {part: cache_dir / f"{stem}.{part}" for part in ("image.npy", "label.npy", "box.json")}


def save_npy_atomically(path: Path, array: np.ndarray) -> None:
    with atomic_write(path) as file:
        np.save(file, array, allow_pickle=False)


def read_entry(paths: dict[str, Path], with_label: bool) -> tuple[np.ndarray, np.ndarray | None, CropBox] | None:
    """The memory-mapped arrays and box of a complete entry, or None when it is absent or damaged."""
    if not paths["box.json"].is_file():
        return None
    try:
        box = CropBox.from_json(json.loads(paths["box.json"].read_text()))
        image = np.load(paths["image.npy"], mmap_mode="r")
        label = np.load(paths["label.npy"], mmap_mode="r") if with_label else None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # half-deleted or foreign files: rebuild the entry
    return image, label, box


def write_entry(paths: dict[str, Path], image: np.ndarray, label: np.ndarray | None, box: CropBox) -> None:
    save_npy_atomically(paths["image.npy"], image)
    if label is not None:
        save_npy_atomically(paths["label.npy"], label)
    write_bytes_atomically(paths["box.json"], json.dumps(box.to_json()).encode())


def require_channels(image: np.ndarray, config: DataConfig, path: Path) -> None:
    if max(config.channels) >= image.shape[0]:
        raise UserError(f"{path}: --channels asks for channel {max(config.channels)} but the image has "
                        f"{image.shape[0]} (channels are numbered from 0)")


def _files(image) -> list[Path]:
    return [Path(image)] if isinstance(image, (str, os.PathLike)) else [Path(p) for p in image]


def _case_id(image, case_id: str | None) -> str:
    if case_id is not None and not isinstance(image, (str, os.PathLike)):
        return case_id
    return case_id_from_path(_files(image)[0])


def preprocess_training_case(image_path, label_path: Path, config: DataConfig) -> tuple[np.ndarray, np.ndarray, CropBox]:
    """Read and preprocess one case from its NIfTI files: image (C, H, W, D) float32, label (H, W, D) uint8,
    both resampled to `config.spacing` (the label by nearest voxel). `image_path`: one 4D file, or the
    per-channel 3D files. With `config.crop` "foreground" the whole (resampled) image is kept, padded to at
    least `config.shape`, for the training sampler to cut a random window from; else the centred window."""
    image, source = read_image_channels_first(image_path)
    image_path = _files(image_path)[0]
    require_channels(image, config, image_path)
    label = read_label(label_path)
    if label.shape != image.shape[1:]:
        raise UserError(f"{label_path}: label shape {label.shape} != image spatial shape {image.shape[1:]} ({image_path})")
    spacing = voxel_spacing(source)
    grid = resampled_grid(image.shape[1:], spacing, config)
    label = resample(label, grid, labels=True)
    if config.crop == "foreground":
        config = replace(config, shape=covering_shape(grid, 1, config.shape))
    processed, box = preprocess_image(image, config, spacing)
    return processed, crop_or_pad(label, box), box


def load_training_arrays(image_path, label_path: Path, config: DataConfig,
                         cache_dir: Path | None, case_id: str | None = None) -> tuple[np.ndarray, np.ndarray, CropBox]:
    """A training case, preprocessed: from the cache when it holds it (memory-mapped), else read and cached.
    `image_path`: one 4D file, or the per-channel 3D files (then `case_id` names the cache entry)."""
    if cache_dir is None:
        return preprocess_training_case(image_path, label_path, config)
    paths = entry_paths(Path(cache_dir), _case_id(image_path, case_id),
                        cache_key([*_files(image_path), label_path], config))
    cached = read_entry(paths, with_label=True)
    if cached is not None:
        return cached
    image, label, box = preprocess_training_case(image_path, label_path, config)
    write_entry(paths, image, label, box)
    return image, label, box


def load_case_image(path, config: DataConfig, cache_dir: Path | None = None, case_id: str | None = None,
                    divisor: int | None = None, least: tuple[int, int, int] = (1, 1, 1),
                    ) -> tuple[np.ndarray, CropBox, nib.Nifti1Image]:
    """One image preprocessed for prediction: (C, H, W, D) float32, its CropBox, and the source image
    (the first channel's file for per-channel images) opened lazily (for `.affine` and `.header` when
    writing the prediction; its voxels are not kept). `path`: one file, or the per-channel 3D files.
    With `divisor`: the whole image, zero-padded to multiples of `divisor` and to at least `least`
    (:func:`covering_shape`), instead of the crop to `config.shape`; nothing is cropped.
    The image is resampled to `config.spacing` first (where its own spacing differs).

    Put the network output back with `uncrop(prediction, box)` (on the resampled grid, `box.original_shape`),
    then `resample(..., source.shape[:3])` to the input's own grid.
    """
    files = _files(path)
    paths = None
    if cache_dir is not None and divisor is None:  # a whole image's shape is known only once it is read
        paths = entry_paths(Path(cache_dir), _case_id(path, case_id), cache_key(files, config))
        cached = read_entry(paths, with_label=False)
        if cached is not None:
            image, _, box = cached
            return np.array(image), box, open_nifti(files[0])
    raw, source = read_image_channels_first(path)
    require_channels(raw, config, files[0])
    spacing = voxel_spacing(source)
    if divisor is not None:
        config = replace(config, shape=covering_shape(resampled_grid(raw.shape[1:], spacing, config), divisor, least))
    image, box = preprocess_image(raw, config, spacing)
    if paths is not None:
        write_entry(paths, image, None, box)
    return image, box, source
