"""Synthetic BraTS-like datasets in the MSD Task01 layout: realistic phantoms, or the paper's random inputs.

A phantom is a tissue map drawn from ellipsoids deformed by smooth random fields: scalp, skull, CSF,
grey matter cortex with sulci, white matter, ventricles, deep grey nuclei, and a glioma in one
hemisphere (enhancing rim, necrotic / non-enhancing core, surrounding edema). Each tissue gets a mean
intensity per modality (FLAIR, T1w, T1gd, T2w), then texture, partial-volume blur, a smooth
multiplicative bias field and Rician noise. Like skull-stripped BraTS data the background is exactly 0.
Everything is seeded per case from (seed, case index): the same seed gives byte-identical files.

The ct kind is a CT-like lesion dataset made to need a real training protocol: one channel in Hounsfield
units (air, fat, soft tissue, bone), per-case anisotropic voxel spacing, and small lesions of modest
contrast anywhere in a body that fills the field of view (see `ct_phantom`).
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
KINDS = ("brats", "random", "ct")
DTYPES = ("int16", "float32")
MARKER = ".fullres-synth.json"  # identifies a folder this module wrote (and may replace)
SUBFOLDERS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
MIN_SIZE = 8
RANDOM_WHAT = "uniform random images and labels (the paper's Table 2 inputs)"  # dataset.json's description

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

CT_CHANNELS = {"0": "CT"}
CT_LABELS = {"0": "background", "1": "lesion"}
CT_MEDIAN_SPACING = (0.8, 0.8, 2.5)  # mm: --shape is a ct case's voxel grid at this spacing
CT_IN_PLANE_SPACING = (0.7, 0.9)  # mm, axes 0 and 1 (equal), drawn uniformly per case
CT_SLICE_SPACING = (2.0, 3.0)  # mm, axis 2, drawn uniformly per case
AIR_HU, FAT_HU, TISSUE_HU = -1000.0, -100.0, 40.0
HU_FLOOR = -1024.0  # scanners store nothing darker than this
CT_MIN_LESION_RADIUS = 3.0  # mm; also keeps the voxel at a lesion's centre inside it


@dataclass(frozen=True)
class Phantom:
    image: np.ndarray  # float32 (H, W, D, 4), modalities in MODALITIES order
    label: np.ndarray  # uint8 (H, W, D): 0 background, 1 edema, 2 non-enhancing / necrotic, 3 enhancing
    tissue: np.ndarray  # uint8 (H, W, D): the tissue classes above (for tests and inspection)


@dataclass(frozen=True)
class CTPhantom:
    image: np.ndarray  # float32 (H, W, D, 1) in Hounsfield units
    label: np.ndarray  # uint8 (H, W, D): 0 background, 1 lesion
    spacing: tuple[float, float, float]  # mm per voxel along axes 0, 1, 2


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


def ct_grid_shape(shape: tuple[int, int, int], spacing) -> tuple[int, int, int]:
    """A ct case's voxel grid at `spacing`: `shape` is the grid at CT_MEDIAN_SPACING, so each axis holds
    max(MIN_SIZE, round(shape * median / spacing)) voxels (ties to even) and every case covers about the
    same field of view in millimetres."""
    return tuple(max(MIN_SIZE, int(np.rint(n * m / s))) for n, m, s in zip(shape, CT_MEDIAN_SPACING, spacing))


def ct_phantom(shape: tuple[int, int, int], rng: np.random.Generator) -> CTPhantom:
    """One CT-like case in Hounsfield units, defined in millimetres and sampled at its own spacing.

    The spacing is drawn first: in-plane (axes 0, 1, equal) from CT_IN_PLANE_SPACING, slices (axis 2)
    from CT_SLICE_SPACING. The field of view is `shape` * CT_MEDIAN_SPACING mm and the voxel grid is
    `ct_grid_shape(shape, spacing)`, so the same anatomy gives different grids in different cases.
    Anatomy: air (-1000) around an elliptical body that runs through every slice and nearly fills the
    field of view in-plane; a subcutaneous fat layer (about -100); soft tissue about +40 with smooth
    low-frequency variation; ribs (+400..+700) and a vertebra (cortex +700..+1000). 1-3 ellipsoidal
    lesions, radius 3 mm to 15 % of the in-plane field of view, centred on a random soft-tissue voxel
    (anywhere, the field of view's edges included), 30-60 HU brighter or darker than the tissue around
    them; the voxel at each lesion's centre is always lesion, so every case has one. Then a slight
    partial-volume blur, Gaussian noise (sigma 15-25 HU) and the scanner floor of -1024.
    """
    in_plane = round(float(rng.uniform(*CT_IN_PLANE_SPACING)), 3)
    spacing = (in_plane, in_plane, round(float(rng.uniform(*CT_SLICE_SPACING)), 3))
    grid_shape = ct_grid_shape(shape, spacing)
    fov = np.array(shape, dtype=np.float64) * CT_MEDIAN_SPACING  # mm
    # Voxel centres in mm from the centre of the field of view.
    grid = tuple(((np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(s))
                 .reshape([-1 if a == i else 1 for a in range(3)]) for i, (n, s) in enumerate(zip(grid_shape, spacing)))

    # Body: an elliptical cylinder along axis 2, wider along axis 0, its outline gently deformed.
    centre = rng.uniform(-0.03, 0.03, 2) * fov[:2]
    axes = fov[:2] / 2 * np.array([rng.uniform(0.86, 0.96), rng.uniform(0.68, 0.82)])
    u, v = (grid[0] - centre[0]) / axes[0], (grid[1] - centre[1]) / axes[1]
    body_r = np.sqrt(u ** 2 + v ** 2) * (1 + 0.03 * smooth_field(rng, grid_shape, 4))
    body = body_r < 1
    inner = body_r < 1 - rng.uniform(0.06, 0.12)  # inside the subcutaneous fat

    hu = np.full(grid_shape, AIR_HU, dtype=np.float32)
    hu[body] = FAT_HU + 10 * smooth_field(rng, grid_shape, 6)[body]
    hu[inner] = TISSUE_HU + 10 * smooth_field(rng, grid_shape, 5)[inner]

    # Ribs: a band just inside the fat, broken around the body and along the slices.
    angle = np.arctan2(v, u)
    rib_r = rng.uniform(0.8, 0.86)
    ribs = inner & (body_r > rib_r) & (body_r < rib_r + 0.07) \
        & (np.cos(rng.integers(7, 11) * angle + rng.uniform(0, 2 * np.pi)) > 0) \
        & (np.cos(2 * np.pi * grid[2] / rng.uniform(15, 25) + rng.uniform(0, 2 * np.pi)) > -0.3)
    hu[ribs] = rng.uniform(400, 700)
    # Vertebra: a posterior cylinder, bright cortex around cancellous bone.
    spine = np.sqrt(((grid[0] - centre[0]) / (0.16 * axes[1])) ** 2
                    + ((grid[1] - centre[1] + 0.62 * axes[1]) / (0.14 * axes[1])) ** 2)
    spine = np.broadcast_to(spine, grid_shape)
    hu[spine < 1] = rng.uniform(700, 1000)
    hu[spine < 0.7] = rng.uniform(250, 400)
    bone = ribs | (spine < 1)

    soft = inner & ~bone
    label = np.zeros(grid_shape, dtype=np.uint8)
    candidates = np.flatnonzero(soft)
    spacing_mm = np.array(spacing)
    largest = max(0.15 * float(fov[:2].min()), CT_MIN_LESION_RADIUS)
    tissue_hu = hu.copy()  # before any lesion: overlapping lesions never add up their contrasts
    for _ in range(int(rng.integers(1, 4))):
        voxel = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], grid_shape))
        lesion_centre = (voxel - (np.array(grid_shape) - 1) / 2 + rng.uniform(-0.45, 0.45, 3)) * spacing_mm
        semi_axes = np.maximum(rng.uniform(CT_MIN_LESION_RADIUS, largest) * rng.uniform(0.75, 1.25, 3),
                               CT_MIN_LESION_RADIUS)
        box = _box_around(voxel, np.ceil(semi_axes * 1.5 / spacing_mm) + 1, grid_shape)
        box_shape = tuple(s.stop - s.start for s in box)
        # An irregular outline, bounded so the centre voxel (under 0.5 of a radius away) stays inside.
        distance = _ellipsoid_radius(_local_grid(grid, box), lesion_centre, semi_axes) \
            * (1 + 0.15 * np.clip(smooth_field(rng, box_shape, 4), -2, 2))
        lesion = (distance < 1) & soft[box]
        hu[box][lesion] = tissue_hu[box][lesion] + (1 if rng.random() < 0.5 else -1) * rng.uniform(30, 60)
        label[box][lesion] = 1

    hu = ndimage.gaussian_filter(hu, sigma=(0.5, 0.5, 0.3), truncate=2.0)
    hu += rng.uniform(15, 25) * rng.standard_normal(grid_shape, dtype=np.float32)
    np.maximum(hu, HU_FLOOR, out=hu)
    return CTPhantom(image=hu[..., None], label=label, spacing=spacing)


def random_case(shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The paper's Table 2 random inputs: uniform random images (0..2000) and labels 0-3."""
    image = rng.uniform(0, 2000, size=tuple(shape) + (4,)).astype(np.float32)
    label = rng.integers(0, 4, size=tuple(shape), dtype=np.uint8)
    return image, label


def synth_affine(shape: tuple[int, int, int], spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """`spacing` mm voxels (1 mm by default), RAS world axes with the first two voxel axes flipped (as in
    BraTS), centre at 0."""
    h, w, d = shape
    sx, sy, sz = (float(s) for s in spacing)
    return np.array([[-sx, 0, 0, sx * (h - 1) / 2],
                     [0, -sy, 0, sy * (w - 1) / 2],
                     [0, 0, sz, -sz * (d - 1) / 2],
                     [0, 0, 0, 1]])


def to_dtype(image: np.ndarray, dtype: str, kind: str = "brats") -> np.ndarray:
    """int16: rounded values, clipped to 0.. for the MR kinds and to int16's range for ct (Hounsfield
    units are negative); float32: as is."""
    if dtype == "int16":
        low = np.iinfo(np.int16).min if kind == "ct" else 0
        return np.rint(np.clip(image, low, np.iinfo(np.int16).max)).astype(np.int16)
    return image.astype(np.float32)


def make_case(shape: tuple[int, int, int], seed: int, index: int, kind: str = "brats") -> tuple[np.ndarray, np.ndarray]:
    """Case `index` of a dataset with `seed`: (image float32 (H, W, D, C), label uint8 (H, W, D)).

    C is 4 for brats and random, 1 for ct; a ct case's grid follows its spacing (`make_spaced_case`)."""
    image, label, _ = make_spaced_case(shape, seed, index, kind)
    return image, label


def make_spaced_case(shape: tuple[int, int, int], seed: int, index: int,
                     kind: str = "brats") -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """`make_case` plus the case's voxel spacing in mm: 1 mm for brats and random, drawn per case for ct."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    if kind == "random":
        return (*random_case(shape, rng), (1.0, 1.0, 1.0))
    if kind == "ct":
        ct = ct_phantom(shape, rng)
        return ct.image, ct.label, ct.spacing
    phantom = brats_phantom(shape, rng)
    return phantom.image, phantom.label, (1.0, 1.0, 1.0)


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


def _description(kind: str, seed: int, shape, random_what: str = RANDOM_WHAT) -> str:
    size = "x".join(map(str, shape))
    if kind == "ct":
        median = "x".join(map(str, CT_MEDIAN_SPACING))
        what = f"CT-like lesion phantoms in HU with per-case anisotropic spacing, {size} voxels at {median} mm"
    else:
        what = f"{'BraTS-like glioma phantoms' if kind == 'brats' else random_what}, {size}"
    return f"Synthetic {what}, seed {seed}, written by fullres {__version__}"


def _dataset_name(kind: str) -> str:
    return "CT_synthetic" if kind == "ct" else "BRATS_synthetic"


def _case_id(kind: str, layout: str, number: int) -> str:
    return f"CT_{number:03d}" if kind == "ct" else case_id_for(layout, number)


def _dataset_json(train_ids: list[str], test_ids: list[str], kind: str, seed: int, shape) -> dict:
    return {
        "name": _dataset_name(kind),
        "description": _description(kind, seed, shape),
        "reference": "fullres synth",
        "licence": "CC0 1.0",
        "release": f"fullres {__version__}",
        "tensorImageSize": "4D",
        "modality": CT_CHANNELS if kind == "ct" else MODALITIES,
        "labels": CT_LABELS if kind == "ct" else LABELS,
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
    BRATS_002, ... (CT_001, ... for ct); test cases follow the training ones. Everything is written to a temporary folder
    beside `out` and renamed into place. `out` may be missing, empty, or a previous synth output
    (which is replaced); anything else is refused, so user files are never touched.

    `layout` (msd, nnunet, brats2021, brats2023): the same phantoms in another layout's files, names and
    label values (see `fullres.data.layouts`); test labels are kept aside in labelsTs/CASE.nii.gz.

    `kind` ct: one channel "CT" ((H, W, D, 1) image files in msd), labels background / lesion, each case at its own
    spacing with its own voxel grid (`shape` is the grid at CT_MEDIAN_SPACING, see `ct_grid_shape`); the
    brats2021 and brats2023 layouts, which hold four MR modalities, are refused.
    """
    shape = _validate(train_cases, test_cases, shape, seed, kind, dtype)
    if kind == "ct" and layout in LAYOUTS and layout not in ("msd", "nnunet"):
        raise UserError(f"--layout {layout} holds four MR modalities of a brain; --kind ct has one CT channel "
                        "(use --layout msd or nnunet)")
    out = Path(out).absolute()
    _refuse_unless_replaceable(out)
    if layout != "msd":
        return _write_other_layout(out, train_cases, test_cases, shape, seed, kind, dtype, progress, layout)
    settings = {"kind": kind, "seed": seed, "shape": list(shape), "dtype": dtype,
                "train_cases": train_cases, "test_cases": test_cases, "fullres": __version__}
    with staged_folder(out, _move_into_place) as temp:
        ids = [_case_id(kind, "msd", i + 1) for i in range(train_cases + test_cases)]
        train_ids, test_ids = ids[:train_cases], ids[train_cases:]
        for index in _case_indices(len(ids), shape, progress):
            image, label, spacing = make_spaced_case(shape, seed, index, kind)
            affine = synth_affine(label.shape, spacing)
            images, labels = ("imagesTr", "labelsTr") if index < train_cases else ("imagesTs", "labelsTs")
            write_nifti(temp / images / f"{ids[index]}.nii.gz", to_dtype(image, dtype, kind), affine)
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
        _, names = target_modalities(layout, list((CT_CHANNELS if kind == "ct" else MODALITIES).values()))
        writer = LayoutWriter(temp, layout, names, name=_dataset_name(kind),
                              description=_description(kind, seed, shape, "uniform random images and labels"),
                              labels={int(value): label for value, label in CT_LABELS.items()} if kind == "ct" else None)
        # ct's labels are background / lesion, written as they are; the glioma labels follow the layout.
        values = {0: 0, 1: 1} if kind == "ct" else value_map(MSD_REGIONS, layout_regions(layout), range(4))
        for index in _case_indices(train_cases + test_cases, shape, progress):
            image, label, spacing = make_spaced_case(shape, seed, index, kind)
            affine = synth_affine(label.shape, spacing)
            label = apply_value_map(label, values, "synthetic label")
            case = _case_id(kind, layout, index + 1)
            if index < train_cases:
                writer.add_training(case, to_dtype(image, dtype, kind), label, affine)
            else:
                writer.add_test(case, to_dtype(image, dtype, kind), affine, label)
        writer.finish()
        settings = {"kind": kind, "seed": seed, "shape": list(shape), "dtype": dtype, "train_cases": train_cases,
                    "test_cases": test_cases, "fullres": __version__, "layout": layout, "files": writer.files}
        (temp / MARKER).write_text(json.dumps(settings, indent=2) + "\n")
    return out
