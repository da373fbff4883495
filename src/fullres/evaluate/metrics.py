"""Segmentation quality, measured the way the field measures it.

Evaluation metrics on whole volumes (numpy in, float out): Dice, normalized surface distance
(NSD, "surface Dice") and the 95th-percentile Hausdorff distance (HD95), per tumour region, per case,
and summarised over a folder of NIfTI predictions. The maths is MONAI's (``monai.metrics``), the
field's reference implementation; this module adds the region logic, the empty-mask convention,
the bounding-box crop that keeps it fast on 240x240x155 volumes, and file handling. Training losses
and the batch scores logged during training live in :mod:`fullres.engine.losses`.

Extension point: :data:`METRICS` maps a metric's name to ``f(pred_mask, truth_mask, spacing_mm,
tolerance_mm) -> float``; every case, summary, CSV column and printed table follows it. Lesion-wise
scores (BraTS 2023's lesion-wise Dice and HD95 and the lesion counts, :mod:`fullres.evaluate.lesions`) come
from one matching per region, so they are one group added beside these when asked for
(``lesion_rule``); the CSV and the table take their columns from the result.

Regions (BraTS, MSD Task01 labels 0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour)::

    WT (whole tumour)     = labels {1, 2, 3}
    TC (tumour core)      = labels {2, 3}
    ET (enhancing tumour) = label  {3}

A region mask is ``np.isin(label_map, region_labels)``. ``DEFAULT_REGIONS`` holds these; callers that
read a dataset pass its own (``DatasetIndex.regions``, see ``fullres.data.layouts``): BraTS 2021 labels
(1 necrotic core, 2 edema, 4 enhancing) give WT {1, 2, 4}, TC {1, 4}, ET {4}; BraTS 2023 (1 core,
2 edema, 3 enhancing) WT {1, 2, 3}, TC {1, 3}, ET {3}. ``evaluate`` takes them from ``--layout``, the
``prediction.json`` that ``predict`` writes, or the labels' folder.

Distances are in millimetres: every surface metric takes the voxel spacing ``(sx, sy, sz)`` in mm,
in array-axis order (nibabel ``header.get_zooms()[:3]``), so anisotropic voxels are honoured.

Surface conventions (MONAI's, kept): the surface of a mask is its voxels that have at least one
6-connected neighbour outside the mask (``mask & ~binary_erosion(mask)``, volume border counted as
outside); distances are Euclidean, in mm, between surface-voxel centres.

Empty-mask convention
---------------------
A region can be absent from the ground truth, the prediction, or both (ET is absent in a fair
share of BraTS cases). Every metric then has a fixed, finite value, so that means over cases are
always defined and an absent region is neither silently dropped nor allowed to produce NaN/inf:

* **both empty** (region absent, and correctly predicted absent): Dice = 1, NSD = 1, HD95 = 0 mm.
* **exactly one empty** (region missed entirely, or predicted where there is none): Dice = 0, NSD = 0,
  HD95 = the length of the image diagonal in mm, ``sqrt(sum((shape_i * spacing_i)^2))``, the largest
  distance possible inside the volume (BraTS-style evaluations likewise substitute a large finite
  penalty, 373.13 mm for 240x240x155 at 1 mm, which is exactly this diagonal).

Means and standard deviations in ``summarize`` are taken over all cases with these values included;
std is the population std (numpy ``ddof=0``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from fullres.data.nifti import case_id_from_path, is_nifti, open_nifti, read_array
from fullres.errors import UserError
from fullres.files import write_bytes_atomically
from fullres.evaluate.lesions import LesionRule, lesion_wise

__all__ = [
    "DEFAULT_REGIONS",
    "METRIC_NAMES",
    "dice",
    "normalized_surface_distance",
    "hd95",
    "image_diagonal_mm",
    "region_masks",
    "evaluate_case",
    "summarize",
    "evaluate_folders",
    "write_metrics_csv",
    "write_metrics_json",
    "result_columns",
    "METRICS",
]

#: BraTS regions for MSD Task01 labels (0 background, 1 edema, 2 non-enhancing tumour, 3 enhancing tumour).
DEFAULT_REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}

# Voxels kept around the joint bounding box before calling MONAI. One voxel is enough for the
# erosion that finds surfaces to see the same neighbourhood as in the full volume; two is slack.
_CROP_MARGIN = 2


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _check_pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    truth = np.asarray(truth).astype(bool, copy=False)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction and truth shapes differ: {pred.shape} vs {truth.shape}")
    return pred, truth


def _check_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be {ndim} positive numbers (mm), got {spacing_mm!r}")
    return spacing


def image_diagonal_mm(shape: Sequence[int], spacing_mm: Sequence[float]) -> float:
    """Length of the image diagonal in mm: ``sqrt(sum_i (shape_i * spacing_i)^2)``.

    The HD95 value used when exactly one of prediction and truth is empty (see module docstring).
    """
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing_mm))))


def _crop_joint(pred: np.ndarray, truth: np.ndarray, margin: int = _CROP_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of ``pred | truth`` plus ``margin`` voxels (clipped to the volume).

    Surfaces and the distances between them are unchanged: voxels outside the box are background in
    both masks, and the margin keeps every surface voxel's neighbourhood (or the volume border) intact.
    """
    union = pred | truth
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=other))
        lo = max(int(idx[0]) - margin, 0)
        hi = min(int(idx[-1]) + 1 + margin, union.shape[axis])
        slices.append(slice(lo, hi))
    sl = tuple(slices)
    return pred[sl], truth[sl]


def _as_monai_batch(mask: np.ndarray) -> torch.Tensor:
    """[X, Y, Z] bool -> [B=1, C=1, X, Y, Z] float tensor, MONAI's one-hot layout with one foreground channel."""
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


# --------------------------------------------------------------------------------------------------
# per-mask metrics
# --------------------------------------------------------------------------------------------------


def _empty_mask_value(pred: np.ndarray, truth: np.ndarray, both_empty: float, one_empty: float) -> float | None:
    """The empty-mask convention's value (module docstring) when a mask is empty; None when neither is."""
    pred_any, truth_any = bool(pred.any()), bool(truth.any())
    if pred_any and truth_any:
        return None
    return one_empty if pred_any or truth_any else both_empty


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice similarity coefficient of two binary masks.

    ``Dice = 2 |P ∩ T| / (|P| + |T|)`` (Dice 1945; Sørensen 1948), computed by
    ``monai.metrics.compute_dice``. Empty-mask convention: both empty -> 1.0; exactly one empty -> 0.0.
    """
    pred, truth = _check_pair(pred, truth)
    empty = _empty_mask_value(pred, truth, both_empty=1.0, one_empty=0.0)
    if empty is not None:
        return empty
    from monai.metrics import compute_dice

    pred, truth = _crop_joint(pred, truth)
    value = compute_dice(_as_monai_batch(pred), _as_monai_batch(truth), include_background=True, ignore_empty=False)
    return float(value.reshape(-1)[0])


def normalized_surface_distance(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float = 1.0
) -> float:
    """Normalized surface distance (NSD, "surface Dice") at tolerance ``tau`` mm (Nikolov et al., 2021).

    ``NSD = (|{p in S_P : d(p, S_T) <= tau}| + |{t in S_T : d(t, S_P) <= tau}|) / (|S_P| + |S_T|)``,
    where ``S_P``, ``S_T`` are the surface voxels of prediction and truth and ``d`` is the Euclidean
    distance in mm (voxel spacing ``spacing_mm`` applied). Computed by
    ``monai.metrics.compute_surface_dice`` (voxel-count form, ``use_subvoxels=False``).
    Empty-mask convention: both empty -> 1.0; exactly one empty -> 0.0.
    """
    pred, truth = _check_pair(pred, truth)
    spacing = _check_spacing(spacing_mm, pred.ndim)
    if not (math.isfinite(tolerance_mm) and tolerance_mm >= 0):
        raise ValueError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    empty = _empty_mask_value(pred, truth, both_empty=1.0, one_empty=0.0)
    if empty is not None:
        return empty
    from monai.metrics import compute_surface_dice

    pred, truth = _crop_joint(pred, truth)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_surface_dice(
            _as_monai_batch(pred),
            _as_monai_batch(truth),
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            distance_metric="euclidean",
            spacing=list(spacing),
        )
    return float(value.reshape(-1)[0])


def hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm.

    ``HD95 = max( P95_{p in S_P} d(p, S_T), P95_{t in S_T} d(t, S_P) )``: the larger of the two directed
    95th percentiles of surface-to-surface Euclidean distances in mm (the BraTS definition), computed by
    ``monai.metrics.compute_hausdorff_distance(percentile=95, spacing=spacing_mm)``; percentiles use
    linear interpolation (``torch.quantile``).
    Empty-mask convention: both empty -> 0.0; exactly one empty -> image diagonal in mm
    (:func:`image_diagonal_mm` of the full, uncropped volume).
    """
    pred, truth = _check_pair(pred, truth)
    spacing = _check_spacing(spacing_mm, pred.ndim)
    empty = _empty_mask_value(pred, truth, both_empty=0.0, one_empty=image_diagonal_mm(pred.shape, spacing))
    if empty is not None:
        return empty
    from monai.metrics import compute_hausdorff_distance

    pred, truth = _crop_joint(pred, truth)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        value = compute_hausdorff_distance(
            _as_monai_batch(pred),
            _as_monai_batch(truth),
            include_background=True,
            distance_metric="euclidean",
            percentile=95,
            directed=False,
            spacing=list(spacing),
        )
    return float(value.reshape(-1)[0])


# --------------------------------------------------------------------------------------------------
# per-case and per-folder evaluation
# --------------------------------------------------------------------------------------------------


#: The evaluation metrics, by name, in the order of CSV columns and result dicts: each is
#: ``f(pred_mask, truth_mask, spacing_mm, tolerance_mm) -> float`` on boolean masks of one region.
METRICS = {
    "dice": lambda pred, truth, spacing, tolerance: dice(pred, truth),
    "nsd": lambda pred, truth, spacing, tolerance: normalized_surface_distance(pred, truth, spacing, tolerance),
    "hd95": lambda pred, truth, spacing, tolerance: hd95(pred, truth, spacing),
}
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)


def _check_regions(regions: Mapping[str, Iterable[int]] | None) -> dict[str, tuple[int, ...]]:
    if regions is None:
        return dict(DEFAULT_REGIONS)
    out = {str(name): tuple(int(v) for v in labels) for name, labels in regions.items()}
    if not out:
        raise ValueError("regions must name at least one region")
    for name, labels in out.items():
        if not labels or 0 in labels:
            raise ValueError(f"region {name!r} must be a non-empty set of foreground labels (not 0), got {labels}")
    return out


def region_masks(labels: np.ndarray, regions: Mapping[str, Iterable[int]] | None = None) -> dict[str, np.ndarray]:
    """Binary mask per region: ``{name: np.isin(labels, region_labels)}`` (default regions WT/TC/ET)."""
    labels = np.asarray(labels)
    return {name: np.isin(labels, lab) for name, lab in _check_regions(regions).items()}


def evaluate_case(
    pred_labels: np.ndarray,
    truth_labels: np.ndarray,
    spacing_mm: Sequence[float],
    regions: Mapping[str, Iterable[int]] | None = None,
    tolerance_mm: float = 1.0,
    pred_is_binary_wt: bool = False,
    lesion_rule: LesionRule | str | None = None,
) -> dict[str, dict[str, float]]:
    """Dice, NSD and HD95 of one case, per region: ``{region: {"dice", "nsd", "hd95"}}``.

    ``lesion_rule`` (a :class:`fullres.evaluate.lesions.LesionRule` or a challenge name such as ``"BraTS-GLI"``):
    each region also gets :func:`fullres.evaluate.lesions.lesion_wise`'s scores and counts
    (``lesion_dice``, ``lesion_hd95``, ``truth_lesions``, ``matched_lesions``, ``missed_lesions``,
    ``fp_lesions``; counts are ints).

    ``pred_labels`` and ``truth_labels`` are integer label maps of the same shape; each region's mask is
    ``np.isin(labels, regions[region])`` on both (default regions: WT/TC/ET of BraTS labels 0-3).

    ``pred_is_binary_wt=True``: the prediction is already a binary whole-tumour mask (values in {0, 1},
    as written by a one-channel sigmoid model); only the region ``"WT"`` is evaluated, with the
    prediction mask ``pred_labels == 1`` against the truth's WT labels. ``regions`` must then contain
    ``"WT"``; other regions are ignored. Raises ``ValueError`` if the prediction has other values.

    Empty regions follow the module's empty-mask convention (all values finite).
    """
    pred_labels = np.asarray(pred_labels)
    truth_labels = np.asarray(truth_labels)
    if pred_labels.shape != truth_labels.shape:
        raise ValueError(f"prediction and truth shapes differ: {pred_labels.shape} vs {truth_labels.shape}")
    spacing = _check_spacing(spacing_mm, truth_labels.ndim)
    regs = _check_regions(regions)
    if pred_is_binary_wt:
        if "WT" not in regs:
            raise ValueError("pred_is_binary_wt=True needs a 'WT' region in regions")
        values = np.unique(pred_labels)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"pred_is_binary_wt=True but the prediction has values {values.tolist()[:10]}, not only 0/1")
        pred_masks = {"WT": pred_labels == 1}
        regs = {"WT": regs["WT"]}
    else:
        pred_masks = region_masks(pred_labels, regs)
    truth_masks = region_masks(truth_labels, regs)
    result: dict[str, dict[str, float]] = {}
    for name in regs:
        p, t = pred_masks[name], truth_masks[name]
        result[name] = {metric: compute(p, t, spacing, tolerance_mm) for metric, compute in METRICS.items()}
        if lesion_rule is not None:
            result[name].update(lesion_wise(p, t, spacing, lesion_rule))
    return result


def summarize(
    cases: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and std over cases: ``{region: {metric: {"mean", "std"}}}``.

    ``mean = (1/N) sum_i x_i``, ``std = sqrt((1/N) sum_i (x_i - mean)^2)`` (population std, numpy ddof=0),
    over the N cases that report the region. Regions and metrics keep their first-seen order.
    """
    collected: dict[str, dict[str, list[float]]] = {}
    for case_metrics in cases.values():
        for region, metrics in case_metrics.items():
            slot = collected.setdefault(region, {})
            for metric, value in metrics.items():
                slot.setdefault(metric, []).append(float(value))
    return {
        region: {
            metric: {"mean": float(np.mean(vals)), "std": float(np.std(vals))} for metric, vals in metrics.items()
        }
        for region, metrics in collected.items()
    }


def _nifti_files(folder: Path, what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"{what} folder {folder} does not exist or is not a folder")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not is_nifti(path) or not path.is_file() or path.name.startswith("."):
            continue
        case = case_id_from_path(path)
        if case in files:
            raise UserError(f"{what} folder {folder} has two files for case {case}: {files[case].name} and {path.name}")
        files[case] = path
    if not files:
        raise UserError(f"{what} folder {folder} has no NIfTI files (.nii.gz or .nii)")
    return files


def _load_labels(path: Path):
    img = open_nifti(path)  # a damaged file, a NaN or singular affine: refused there
    data = read_array(img, path)  # complex or other non-real voxels: refused there
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path} is not a 3D label map (shape {data.shape})")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):  # NaN too: it never equals itself
            raise UserError(f"{path} has non-integer values; expected a label map")
        data = rounded
    # checked before the cast: a value past int16 would wrap onto a declared label
    low, high = (data.min(), data.max()) if data.size else (0, 0)
    if low < 0 or high > np.iinfo(np.int16).max:
        raise UserError(f"{path} has label value(s) {low:g}..{high:g}: label values lie in 0..{np.iinfo(np.int16).max}")
    return data.astype(np.int16, copy=False), img


def evaluate_folders(
    pred_dir: str | os.PathLike,
    label_dir: str | os.PathLike | Mapping[str, Path],
    tolerance_mm: float = 1.0,
    regions: Mapping[str, Iterable[int]] | None = None,
    pred_is_binary_wt: bool = False,
    lesion_rule: LesionRule | str | None = None,
) -> dict:
    """Evaluate every prediction in ``pred_dir`` against its label in ``label_dir``.

    Files pair by case name: ``CASE.nii.gz`` (or ``CASE.nii``) in both folders; other files are ignored.
    The voxel spacing is read from the LABEL's header (``header.get_zooms()[:3]``, mm). Each pair must
    have the same shape and (to 1e-4) the same affine.

    Returns ``{"cases": {CASE: {REGION: {"dice", "nsd", "hd95"}}}, "summary": {REGION: {METRIC: {"mean", "std"}}}}``
    (regions default to WT/TC/ET for labels 0-3; ``pred_is_binary_wt`` and ``lesion_rule``, which adds
    the lesion-wise keys, as in :func:`evaluate_case`).

    ``label_dir`` may instead be ``{CASE: label path}`` (a dataset's labels, e.g.
    :func:`fullres.data.layouts.dataset_labels`): then the predicted cases are scored, each of which must
    have a label there; the dataset's other cases are left out.

    Raises ``UserError`` naming the folder or file for: a missing or empty folder, a case present in
    only one folder, a shape or affine mismatch, an unreadable or non-label file.
    """
    pred_dir = Path(pred_dir)
    preds = _nifti_files(pred_dir, "prediction")
    if isinstance(label_dir, Mapping):
        absent = sorted(set(preds) - set(label_dir))
        if absent:
            raise UserError(f"prediction {preds[absent[0]]}: the dataset has no label for case {absent[0]}"
                            + (f" (and {len(absent) - 1} more cases)" if len(absent) > 1 else ""))
        labels = {case: Path(label_dir[case]) for case in preds}
    else:
        label_dir = Path(label_dir)
        labels = _nifti_files(label_dir, "label")
    missing_label = sorted(set(preds) - set(labels))
    if missing_label:
        raise UserError(
            f"prediction {preds[missing_label[0]]} has no label {label_dir / (missing_label[0] + '.nii.gz')}"
            + (f" (and {len(missing_label) - 1} more cases without labels)" if len(missing_label) > 1 else "")
        )
    missing_pred = sorted(set(labels) - set(preds))
    if missing_pred:
        raise UserError(
            f"label {labels[missing_pred[0]]} has no prediction {pred_dir / (missing_pred[0] + '.nii.gz')}"
            + (f" (and {len(missing_pred) - 1} more cases without predictions)" if len(missing_pred) > 1 else "")
        )
    regs = _check_regions(regions)
    cases: dict[str, dict[str, dict[str, float]]] = {}
    for case in sorted(labels):
        truth, truth_img = _load_labels(labels[case])
        pred, pred_img = _load_labels(preds[case])
        declared = {0, *(value for values in regs.values() for value in values)}
        for path, array, allowed in ((labels[case], truth, declared),
                                     (preds[case], pred, {0, 1} if pred_is_binary_wt else declared)):
            undeclared = sorted(set(np.unique(array).tolist()) - allowed)
            if undeclared:  # scoring them as background would be a silently wrong answer
                raise UserError(f"{path} has label value(s) {undeclared[:5]} outside the declared "
                                f"{sorted(allowed)} (the regions {', '.join(regs)}); pass --layout if the dataset uses others")
        if pred.shape != truth.shape:
            raise UserError(f"{preds[case]} has shape {pred.shape} but its label {labels[case]} has shape {truth.shape}")
        if not np.allclose(pred_img.affine, truth_img.affine, atol=1e-4, rtol=0):
            raise UserError(
                f"{preds[case]} and its label {labels[case]} have different affines (voxel-to-world matrices); "
                "resample the prediction onto the label's grid"
            )
        spacing = tuple(float(z) for z in truth_img.header.get_zooms()[:3])
        try:
            cases[case] = evaluate_case(pred, truth, spacing, regs, tolerance_mm, pred_is_binary_wt, lesion_rule)
        except ValueError as exc:
            raise UserError(f"{preds[case]}: {exc}") from exc
    return {"cases": cases, "summary": summarize(cases)}


# --------------------------------------------------------------------------------------------------
# writing results
# --------------------------------------------------------------------------------------------------


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomically(Path(path), text.encode("utf-8"))


def result_columns(result: Mapping) -> tuple[str, ...]:
    """The metric names of an :func:`evaluate_folders` result, in order: :data:`METRIC_NAMES`, then the
    lesion-wise ones when it has them."""
    for regions in result["cases"].values():
        for metrics in regions.values():
            return tuple(metrics)
    return METRIC_NAMES


def write_metrics_csv(result: Mapping, path: str | os.PathLike) -> None:
    """Write an :func:`evaluate_folders` result as CSV, atomically (temp file + ``os.replace``).

    Columns ``case, region, dice, nsd, hd95`` (then the lesion-wise ones, when evaluated): one row per
    case x region (cases sorted as in the result), then one ``mean`` row and one ``std`` row per region
    (``case`` = "mean" / "std"). Floats are written with ``repr`` precision, counts as integers.
    """
    import io

    columns = result_columns(result)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "region", *columns])
    for case, regions in result["cases"].items():
        for region, metrics in regions.items():
            writer.writerow([case, region, *(str(metrics[m]) if isinstance(metrics[m], (int, np.integer))
                                             else repr(float(metrics[m])) for m in columns)])
    for stat in ("mean", "std"):
        for region, metrics in result["summary"].items():
            writer.writerow([stat, region, *(repr(float(metrics[m][stat])) for m in columns)])
    _atomic_write_text(path, buf.getvalue())


def write_metrics_json(result: Mapping, path: str | os.PathLike) -> None:
    """Write an :func:`evaluate_folders` result as JSON (the documented contract), atomically."""
    _atomic_write_text(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
