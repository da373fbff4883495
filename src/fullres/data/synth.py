"""Synthetic BraTS-like datasets in the MSD Task01 layout: realistic phantoms, or the paper's random inputs.

A phantom is a tissue map drawn from ellipsoids deformed by smooth random fields: scalp, skull, CSF,
grey matter cortex with sulci, white matter, ventricles, deep grey nuclei, and a glioma in one
hemisphere (enhancing rim, necrotic / non-enhancing core, surrounding edema). Each tissue gets a mean
intensity per modality (FLAIR, T1w, T1gd, T2w), then texture, partial-volume blur, a smooth
multiplicative bias field and Rician noise. Like skull-stripped BraTS data the background is exactly 0.
Everything is seeded per case from (seed, case index): the same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from fullres import __version__
from fullres.data.convert import LayoutWriter, case_id_for, layout_regions, target_modalities
from fullres.data.layouts import LAYOUTS, MSD_REGIONS, apply_value_map, value_map
from fullres.data.nifti import write_nifti
from fullres.errors import UserError
from fullres.files import staged_folder

MODALITIES = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
KINDS = ("brats", "random")
DTYPES = ("int16", "float32")
MARKER = ".fullres-synth.json"  # identifies a folder this module wrote (and may replace)
SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
MIN_SIZE = 8

# Tissue classes of the phantom's tissue map.
BACKGROUND, SCALP, SKULL, CSF, GREY, WHITE, EDEMA, NECROSIS, ENHANCING = range(9)
# Mean intensity per tissue (rows) and modality (FLAIR, T1w, T1gd, T2w), in scanner-like units.
TISSUE_INTENSITY = np.array([
    [0, 0, 0, 0],                # background
    [800, 1150, 1150, 700],      # scalp: fat is bright on T1
    [80, 150, 150, 100],         # skull: dark everywhere
    [150, 300, 320, 1800],       # CSF: dark on FLAIR, bright on T2
    [750, 650, 700, 950],        # grey matter
    [550, 950, 980, 650],        # white matter: brighter than grey on T1, darker on T2/FLAIR
    [1350, 550, 600, 1500],      # edema: bright on FLAIR and T2
    [700, 350, 380, 1600],       # necrotic / non-enhancing core: dark on T1, no enhancement
    [1100, 500, 1700, 1100],     # enhancing rim: bright on T1gd only
], dtype=np.float32)
LABEL_OF_TISSUE = {EDEMA: 1, NECROSIS: 2, ENHANCING: 3}


@dataclass(frozen=True)
class Phantom:
    image: np.ndarray  # float32 (H, W, D, 4), modalities in MODALITIES order
    label: np.ndarray  # uint8 (H, W, D): 0 background, 1 edema, 2 non-enhancing / necrotic, 3 enhancing
    tissue: np.ndarray  # uint8 (H, W, D): the tissue classes above (for tests and inspection)


# ---------------------------------------------------------------------------------------------
# smooth random fields and shapes


def _interpolation_weights(size: int, cells: int) -> np.ndarray:
    """(size, cells) Gaussian weights that spread `cells` coarse values smoothly over `size` voxels."""
    centres = np.linspace(-0.5, size - 0.5, cells)
    spacing = (size / max(cells - 1, 1))
    weights = np.exp(-0.5 * ((np.arange(size)[:, None] - centres[None, :]) / spacing) ** 2)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """A zero-mean, roughly unit-std random field varying over about shape / cells voxels (float32).

    Separable: a cells^3 grid of normal values interpolated along each axis in turn, so the cost is
    one small matrix product per axis rather than a full-volume filter.
    """
    coarse = rng.standard_normal((cells, cells, cells)).astype(np.float32)
    wx, wy, wz = (_interpolation_weights(size, cells) for size in shape)
    partial = np.einsum("ia,jb,abc->ijc", wx, wy, coarse, optimize=True)  # (H, W, cells): small
    partial -= partial.mean()
    partial /= max(float(partial.std()), 1e-6)
    return (partial.reshape(-1, cells) @ wz.T).reshape(shape)


def _ellipsoid_radius(grid: tuple[np.ndarray, ...], centre, semi_axes) -> np.ndarray:
    """Normalised ellipsoidal distance: < 1 inside the ellipsoid with `semi_axes` around `centre`."""
    x, y, z = (((g - c) / a) ** 2 for g, c, a in zip(grid, centre, semi_axes))
    return np.sqrt(x + y + z)


def _box_around(centre, reach, shape) -> tuple[slice, ...]:
    lo = np.clip(np.floor(np.asarray(centre) - reach), 0, np.array(shape)).astype(int)
    hi = np.clip(np.ceil(np.asarray(centre) + reach) + 1, 0, np.array(shape)).astype(int)
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _local_grid(grid: tuple[np.ndarray, ...], box: tuple[slice, ...]) -> tuple[np.ndarray, ...]:
    """The broadcastable coordinate arrays of `grid` restricted to `box`."""
    return tuple(g[tuple(box[a] if a == i else slice(None) for a in range(3))] for i, g in enumerate(grid))


def _paint_ellipsoid(tissue: np.ndarray, grid, centre, semi_axes, value: int, where: np.ndarray) -> None:
    """Set `tissue` to `value` inside an ellipsoid, only where `where` is True (work within its box)."""
    box = _box_around(centre, np.asarray(semi_axes), tissue.shape)
    inside = (_ellipsoid_radius(_local_grid(grid, box), centre, semi_axes) < 1) & where[box]
    tissue[box][inside] = value


# ---------------------------------------------------------------------------------------------
# the phantom


def _tumour(rng, grid, brain_centre, brain_axes, hemisphere, brain_inside, parenchyma, tissue) -> None:
    """Draw a glioma into `tissue` (in place): enhancing rim, necrotic core, edema around it."""
    radius = max(rng.uniform(0.18, 0.36) * float(np.mean(brain_axes)), 4.0)
    centre = np.array([
        brain_centre[0] + hemisphere * rng.uniform(0.25, 0.5) * brain_axes[0],
        brain_centre[1] + rng.uniform(-0.4, 0.4) * brain_axes[1],
        brain_centre[2] + rng.uniform(-0.25, 0.35) * brain_axes[2],
    ])
    radii = radius * rng.uniform(0.8, 1.25, size=3)
    edema_scale = rng.uniform(1.4, 2.0)
    box = _box_around(centre, radii * edema_scale * 1.5, tissue.shape)  # the rest of the volume is untouched
    box_shape = tuple(s.stop - s.start for s in box)
    if min(box_shape) < 2:
        return
    local = _local_grid(grid, box)
    distance = _ellipsoid_radius(local, centre, radii)
    own_side = hemisphere * (local[0] - brain_centre[0]) > 1.0  # never across the midline
    tumour_distance = distance * (1 + 0.22 * smooth_field(rng, box_shape, 5))
    edema_distance = distance / edema_scale * (1 + 0.3 * smooth_field(rng, box_shape, 5))
    rim = max(rng.uniform(0.15, 0.3), 2.0 / radius) * (1 + 0.3 * smooth_field(rng, box_shape, 5))

    tumour = (tumour_distance < 1) & brain_inside[box] & own_side
    core = tumour & (tumour_distance < 1 - rim)
    edema = (edema_distance < 1) & ~tumour & parenchyma[box] & own_side
    region = tissue[box]
    region[edema] = EDEMA
    region[tumour] = ENHANCING
    region[core] = NECROSIS


def brats_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> Phantom:
    """One BraTS-like case: a head with brain anatomy and a glioma, four MR contrasts, noise and bias."""
    shape = tuple(int(s) for s in shape)
    size = np.array(shape, dtype=np.float32)
    grid = tuple(np.arange(n, dtype=np.float32).reshape([-1 if a == i else 1 for a in range(3)])
                 for i, n in enumerate(shape))

    # Head: an ellipsoid, longest front-to-back (axis 1), slightly jittered and deformed.
    head_centre = size * 0.5 + rng.uniform(-0.02, 0.02, 3) * size
    head_axes = size * np.array([0.36, 0.44, 0.47]) * rng.uniform(0.94, 1.04, 3)
    head_r = _ellipsoid_radius(grid, head_centre, head_axes) * (1 + 0.025 * smooth_field(rng, shape, 4))
    brain_edge = 0.83
    brain_r = head_r / brain_edge  # < 1 inside the brain
    brain_centre, brain_axes = head_centre, head_axes * brain_edge

    tissue = np.zeros(shape, dtype=np.uint8)
    tissue[head_r < 1] = SCALP
    tissue[head_r < 0.93] = SKULL
    tissue[head_r < 0.86] = CSF
    brain = brain_r < 1
    tissue[brain] = WHITE
    # Cortex: a grey band of varying thickness, cut by CSF-filled sulci.
    cortex = brain & (brain_r > 0.9 - 0.03 * smooth_field(rng, shape, 6))
    tissue[cortex] = GREY
    tissue[cortex & (brain_r > 0.93) & (smooth_field(rng, shape, 14) > 1.0)] = CSF
    # Interhemispheric fissure in the upper brain.
    fissure = brain & (np.abs(grid[0] - brain_centre[0]) < max(0.6, 0.004 * size[0])) & \
        (grid[2] > brain_centre[2] - 0.2 * brain_axes[2])
    tissue[fissure] = CSF
    # Deep grey nuclei, then the lateral ventricles beside the midline.
    for side in (-1, 1):
        nucleus = brain_centre + np.array([side * 0.3, 0.05, -0.1]) * brain_axes
        _paint_ellipsoid(tissue, grid, nucleus, brain_axes * [0.12, 0.18, 0.14], GREY, brain)
        ventricle = brain_centre + np.array([side * 0.1, -0.05, 0.12]) * brain_axes
        _paint_ellipsoid(tissue, grid, ventricle, brain_axes * [0.07, 0.32, 0.12], CSF, brain)

    parenchyma = (tissue == WHITE) | (tissue == GREY)
    hemisphere = 1 if rng.random() < 0.5 else -1
    _tumour(rng, grid, brain_centre, brain_axes, hemisphere, brain_r < 0.97, parenchyma, tissue)

    label = np.zeros(shape, dtype=np.uint8)
    for tissue_class, value in LABEL_OF_TISSUE.items():
        label[tissue == tissue_class] = value
    return Phantom(image=_mr_contrasts(rng, tissue), label=label, tissue=tissue)


def _mr_contrasts(rng: np.random.Generator, tissue: np.ndarray) -> np.ndarray:
    """(H, W, D, 4) float32 intensities for a tissue map: per-case contrast jitter, texture,
    partial-volume blur, smooth multiplicative bias field and Rician noise; background exactly 0."""
    intensity = (TISSUE_INTENSITY * rng.uniform(0.92, 1.08, size=(1, 4))
                 * rng.uniform(0.96, 1.04, size=TISSUE_INTENSITY.shape)).astype(np.float32)
    head = _box_around(np.zeros(3), 0, tissue.shape)
    extent = [np.flatnonzero(np.any(tissue != BACKGROUND, axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    if all(e.size for e in extent):  # work inside the head's bounding box (plus a blur margin)
        head = tuple(slice(max(e[0] - 2, 0), min(e[-1] + 3, n)) for e, n in zip(extent, tissue.shape))
    local = tissue[head]
    local_shape = local.shape
    voxels = np.flatnonzero(local != BACKGROUND)
    texture = 1 + 0.04 * smooth_field(rng, local_shape, 16)
    image = np.zeros((4,) + tissue.shape, dtype=np.float32)  # channels first while filling, for speed
    for channel in range(4):
        clean = ndimage.gaussian_filter(intensity[:, channel][local] * texture, sigma=0.5, truncate=2.0)
        bias = 1 + 0.12 * smooth_field(rng, local_shape, 3).ravel()[voxels]
        signal = clean.ravel()[voxels] * bias
        sigma = 0.025 * intensity[WHITE, channel]
        noisy = np.hypot(signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32),
                         sigma * rng.standard_normal(signal.shape, dtype=np.float32))
        channel_image = np.zeros(local_shape, dtype=np.float32)
        channel_image.ravel()[voxels] = noisy
        image[channel][head] = channel_image
    image = np.moveaxis(image, 0, -1)
    return image


def random_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Table 2 random inputs: uniform random images (0..2000) and labels 0-3."""
    image = rng.uniform(0, 2000, size=tuple(shape) + (4,)).astype(np.float32)
    label = rng.integers(0, 4, size=tuple(shape), dtype=np.uint8)
    return image, label


def synth_affine(shape: tuple[int, int, int]) -> np.ndarray:
    """1 mm voxels, RAS world axes with the first two voxel axes flipped (as in BraTS), centre at 0."""
    h, w, d = shape
    return np.array([[-1.0, 0, 0, (h - 1) / 2],
                     [0, -1.0, 0, (w - 1) / 2],
                     [0, 0, 1.0, -(d - 1) / 2],
                     [0, 0, 0, 1]])


def to_dtype(image: np.ndarray, dtype: str) -> np.ndarray:
    """int16: rounded scanner-like values; float32: as is."""
    if dtype == "int16":
        return np.rint(np.clip(image, 0, np.iinfo(np.int16).max)).astype(np.int16)
    return image.astype(np.float32)


def make_case(shape: tuple[int, int, int], seed: int, index: int, kind: str = "brats") -> tuple[np.ndarray, np.ndarray]:
    """Case `index` of a dataset with `seed`: (image float32 (H, W, D, 4), label uint8 (H, W, D))."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    if kind == "random":
        return random_case(shape, rng)
    phantom = brats_phantom(shape, rng)
    return phantom.image, phantom.label


# ---------------------------------------------------------------------------------------------
# the dataset writer


def _validate(train_cases: int, test_cases: int, shape, seed: int, kind: str, dtype: str) -> tuple[int, int, int]:
    if train_cases < 1:
        raise UserError(f"--cases must be at least 1, got {train_cases}")
    if test_cases < 0:
        raise UserError(f"--test-cases must be 0 or more, got {test_cases}")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more, got {seed}")
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < MIN_SIZE:
        raise UserError(f"--shape must be three sizes H W D of at least {MIN_SIZE}, got {' '.join(map(str, shape))}")
    return shape


def _listed_files_only(folder: Path) -> bool:
    """A non-MSD synth output: every file is one the marker lists (or the cache, dataset.json, the marker)."""
    try:
        listed = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return False
    for path in folder.rglob("*"):
        relative = path.relative_to(folder)
        if relative.parts[0] in (".fullres_cache", MARKER, "dataset.json") or path.is_dir():
            continue
        if relative.as_posix() not in listed:
            return False
    return True


def is_previous_synth_output(folder: Path) -> bool:
    """True when `folder` holds only what `write_dataset` wrote there (the files its marker lists, plus
    dataset.json, the marker and the data cache): safe to replace. A file anyone else put there, even one
    named like a case, makes it not."""
    if not (folder / MARKER).is_file():
        return False
    return _listed_files_only(folder)


def _refuse_unless_replaceable(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; refusing to overwrite it")
    if any(out.iterdir()) and not is_previous_synth_output(out):
        raise UserError(f"{out}: folder is not empty and is not a previous `fullres synth` output; "
                        "refusing to write into it (choose a new or empty folder)")


def _dataset_json(train_ids: list[str], test_ids: list[str], kind: str, seed: int, shape) -> dict:
    what = "BraTS-like glioma phantoms" if kind == "brats" else "uniform random images and labels (the paper's Table 2 inputs)"
    return {
        "name": "BRATS_synthetic",
        "description": f"Synthetic {what}, {'x'.join(map(str, shape))}, seed {seed}, written by fullres {__version__}",
        "reference": "fullres synth",
        "licence": "CC0 1.0",
        "release": f"fullres {__version__}",
        "tensorImageSize": "4D",
        "modality": MODALITIES,
        "labels": LABELS,
        "numTraining": len(train_ids),
        "numTest": len(test_ids),
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train_ids],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test_ids],
    }


def write_dataset(out: Path, train_cases: int, test_cases: int = 0, shape: tuple[int, int, int] = (240, 240, 155),
                  seed: int = 0, kind: str = "brats", dtype: str = "int16", progress: bool = True,
                  layout: str = "msd") -> Path:
    """Write a complete MSD Task01-style folder to `out` and return it.

    imagesTr/ + labelsTr/ (listed in dataset.json's `training`), imagesTs/ (listed in `test`) and
    labelsTs/ (the test labels, kept aside for evaluation and not listed). Cases are BRATS_001,
    BRATS_002, ...; test cases follow the training ones. Everything is written to a temporary folder
    beside `out` and renamed into place. `out` may be missing, empty, or a previous synth output
    (which is replaced); anything else is refused, so user files are never touched.

    `layout` (msd, nnunet, brats2021, brats2023): the same phantoms in another layout's files, names and
    label values (see `fullres.data.layouts`); test labels are kept aside in labelsTs/CASE.nii.gz.
    """
    shape = _validate(train_cases, test_cases, shape, seed, kind, dtype)
    out = Path(out).absolute()
    _refuse_unless_replaceable(out)
    if layout != "msd":
        return _write_other_layout(out, train_cases, test_cases, shape, seed, kind, dtype, progress, layout)
    settings = {"kind": kind, "seed": seed, "shape": list(shape), "dtype": dtype,
                "train_cases": train_cases, "test_cases": test_cases, "fullres": __version__}
    with staged_folder(out, _move_into_place) as temp:
        ids = [f"BRATS_{i + 1:03d}" for i in range(train_cases + test_cases)]
        train_ids, test_ids = ids[:train_cases], ids[train_cases:]
        affine = synth_affine(shape)
        for index in _case_indices(len(ids), shape, progress):
            image, label = make_case(shape, seed, index, kind)
            images, labels = ("imagesTr", "labelsTr") if index < train_cases else ("imagesTs", "labelsTs")
            write_nifti(temp / images / f"{ids[index]}.nii.gz", to_dtype(image, dtype), affine)
            write_nifti(temp / labels / f"{ids[index]}.nii.gz", label, affine)
        for sub in SUBFOLDERS:
            (temp / sub).mkdir(exist_ok=True)
        (temp / "dataset.json").write_text(json.dumps(_dataset_json(train_ids, test_ids, kind, seed, shape), indent=2) + "\n")
        settings["files"] = sorted(path.relative_to(temp).as_posix() for path in temp.rglob("*.nii.gz"))
        (temp / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return out


def _case_indices(total: int, shape, progress: bool):
    """range(total) behind a progress bar, hidden when asked or when a couple of small cases take no time."""
    quiet = not progress or (total <= 2 and int(np.prod(shape)) < 2_000_000)
    return tqdm(range(total), desc="synth", unit="case", disable=True if quiet else None)


def _move_into_place(temp: Path, out: Path) -> None:
    """Rename `temp` to `out`; an existing (empty or previous synth) `out` is moved aside first, then deleted."""
    if not out.exists():
        os.rename(temp, out)
        return
    _refuse_unless_replaceable(out)  # again: it may have changed while we were writing
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    os.rename(temp, out)
    shutil.rmtree(old)


def _write_other_layout(out: Path, train_cases: int, test_cases: int, shape, seed: int, kind: str, dtype: str,
                        progress: bool, layout: str) -> Path:
    """`write_dataset` for the nnunet and BraTS layouts: the same cases, labels mapped to the layout's values."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    with staged_folder(out, _move_into_place) as temp:
        _, names = target_modalities(layout, list(MODALITIES.values()))
        what = "BraTS-like glioma phantoms" if kind == "brats" else "uniform random images and labels"
        writer = LayoutWriter(temp, layout, names, name="BRATS_synthetic",
                              description=f"Synthetic {what}, {'x'.join(map(str, shape))}, seed {seed}, "
                                          f"written by fullres {__version__}")
        values = value_map(MSD_REGIONS, layout_regions(layout), range(4))
        affine = synth_affine(shape)
        for index in _case_indices(train_cases + test_cases, shape, progress):
            image, label = make_case(shape, seed, index, kind)
            label = apply_value_map(label, values, "synthetic label")
            case = case_id_for(layout, index + 1)
            if index < train_cases:
                writer.add_training(case, to_dtype(image, dtype), label, affine)
            else:
                writer.add_test(case, to_dtype(image, dtype), affine, label)
        writer.finish()
        settings = {"kind": kind, "seed": seed, "shape": list(shape), "dtype": dtype, "train_cases": train_cases,
                    "test_cases": test_cases, "fullres": __version__, "layout": layout, "files": writer.files}
        (temp / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return out
