"""Lesion-wise Dice and HD95 as the BraTS 2023 evaluation defines them.

Since 2023 BraTS ranks by lesion-wise scores: every connected lesion counts, a missed lesion scores
Dice 0 and HD95 374 mm, and each false-positive prediction component adds a Dice 0 / HD95 374 mm
term. The definition followed here is the challenge's own evaluation code
(github.com/rachitsaluja/BraTS-2023-Metrics, ``metrics.py``, functions ``get_LesionWiseScores`` and
``get_LesionWiseResults``); on one region's binary masks of one case:

1. **Components**: 26-connected components of the prediction.
2. **Truth lesions**: the truth mask is dilated (``scipy.ndimage.binary_dilation`` with
   ``generate_binary_structure(3, 2)``, the 18-neighbourhood, ``dilation_iterations`` times) and
   the 26-connected components of the dilated mask are taken; the truth voxels inside one such
   component form one lesion (truth lesions closer than the dilation count as one).
3. **Matching**: a prediction component is matched to every truth lesion whose own dilation
   (same element and iterations) it overlaps; a component may match several lesions.
4. **Per lesion**: Dice and HD95 of the lesion against the union of its matched components
   (whole components). HD95 is the 95th percentile of surface distances weighted by surface-element
   area (DeepMind's ``compute_robust_hausdorff``, the one BraTS 2023 calls), computed here with
   MONAI's sub-voxel surface elements. A lesion with no matched component scores Dice 0 and HD95
   :data:`MISSED_HD95_MM`.
5. **Small lesions**: a truth lesion of volume ``<= min_volume_mm3`` (voxel count x voxel volume)
   is dropped from the scores and counts; the components matched to it are not false positives.
6. **False positives**: prediction components matched to no truth lesion (any size).
7. **Score**: ``lesion_dice = sum(Dice_l) / (L + FP)``, ``lesion_hd95 = (sum(HD95_l) + 374 FP) / (L + FP)``
   over the ``L`` truth lesions kept; with ``L + FP = 0`` (nothing to score) Dice 1 and HD95 0.

The challenges' parameters are :data:`CHALLENGES` (BraTS 2023 code, ``get_LesionWiseResults``);
``BraTS-GLI`` (adult glioma, the BraTS 2021/2023 data) is the default.

Labelling and dilation are scipy's; the per-lesion loop is written here because no maintained
package implements this matching (panoptica, used by BraTS 2024+, matches one-to-one by overlap
score and has no dilation or volume threshold).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "LesionRule",
    "CHALLENGES",
    "DEFAULT_CHALLENGE",
    "MISSED_HD95_MM",
    "LESION_METRIC_NAMES",
    "lesion_wise",
    "lesion_masks",
    "robust_hd95",
]

#: HD95 in mm given to a missed truth lesion and to each false-positive component (BraTS 2023 code:
#: ``replace(np.inf, 374)`` and ``len(fp) * 374``; about the 240x240x155 diagonal at 1 mm).
MISSED_HD95_MM = 374.0

#: Keys :func:`lesion_wise` returns, in CSV column order: the two scores, then the counts of truth
#: lesions scored, of those matched (true positives), missed (false negatives), and of false-positive
#: prediction components.
LESION_METRIC_NAMES: tuple[str, ...] = (
    "lesion_dice", "lesion_hd95", "truth_lesions", "matched_lesions", "missed_lesions", "fp_lesions",
)

# Structuring elements (scipy.ndimage.generate_binary_structure): 26-connectivity for components, the
# 18-neighbourhood for the dilation (BraTS 2023: generate_binary_structure(3, 2)).
_CONNECTIVITY = 3
_DILATION_CONNECTIVITY = 2


@dataclass(frozen=True)
class LesionRule:
    """One challenge's lesion-wise parameters.

    ``dilation_iterations``: iterations of the 18-neighbourhood dilation that merges nearby truth
    lesions and defines the region a prediction component must overlap to match. ``min_volume_mm3``:
    truth lesions of this volume or less are ignored.
    """

    name: str
    dilation_iterations: int
    min_volume_mm3: float

    def __post_init__(self) -> None:
        if int(self.dilation_iterations) != self.dilation_iterations or self.dilation_iterations < 1:
            # scipy reads iterations < 1 as "dilate until nothing changes"
            raise ValueError(f"dilation_iterations must be an integer >= 1, got {self.dilation_iterations!r}")
        if not (math.isfinite(self.min_volume_mm3) and self.min_volume_mm3 >= 0):
            raise ValueError(f"min_volume_mm3 must be a finite number >= 0, got {self.min_volume_mm3!r}")


#: Parameters per BraTS 2023 challenge (dilation factor, lesion volume threshold), from the
#: challenge's evaluation code (``get_LesionWiseResults``).
CHALLENGES: dict[str, LesionRule] = {
    rule.name: rule
    for rule in (
        LesionRule("BraTS-GLI", 3, 50.0),  # adult glioma
        LesionRule("BraTS-SSA", 3, 50.0),  # glioma, sub-Saharan Africa
        LesionRule("BraTS-MEN", 1, 50.0),  # meningioma
        LesionRule("BraTS-PED", 3, 50.0),  # paediatric tumours
        LesionRule("BraTS-MET", 1, 2.0),  # metastases
    )
}
DEFAULT_CHALLENGE = "BraTS-GLI"


def robust_hd95(pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Surface-area-weighted 95th-percentile symmetric Hausdorff distance in mm, both masks non-empty.

    For each direction (truth -> prediction, prediction -> truth) the distances from the surface
    elements of one mask to the other surface are sorted and the first whose cumulative area share
    reaches 95 % is taken; the result is the larger of the two (DeepMind surface-distance's
    ``compute_robust_hausdorff(.., 95)``, which the BraTS 2023 evaluation uses). Surface elements and
    their areas are MONAI's sub-voxel ones (``get_edge_surface_distance(use_subvoxels=True)``).
    """
    import torch
    from monai.metrics.utils import get_edge_surface_distance

    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if not pred.any() or not truth.any():
        raise ValueError("robust_hd95 needs two non-empty masks")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        (edges_pred, edges_truth), (d_pred, d_truth), (area_pred, area_truth) = get_edge_surface_distance(
            torch.from_numpy(pred), torch.from_numpy(truth), spacing=[float(s) for s in spacing_mm],
            use_subvoxels=True, symmetric=True,
        )
    worst = 0.0
    for distances, areas, edges in ((d_truth, area_truth, edges_truth), (d_pred, area_pred, edges_pred)):
        distances = distances.double().numpy()
        areas = areas[edges].double().numpy()  # the areas come on the grid, distances per edge voxel
        order = np.argsort(distances, kind="stable")
        share = np.cumsum(areas[order]) / areas.sum()
        index = min(int(np.searchsorted(share, 0.95)), distances.size - 1)
        worst = max(worst, float(distances[order][index]))
    return worst


def _grown(slices: tuple[slice, ...], by: int, shape: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - by, 0), min(s.stop + by, n)) for s, n in zip(slices, shape))


def _union(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


@dataclass
class _Matching:
    """The matching of one region of one case, inside ``crop`` of the full arrays: prediction
    ``components`` (numbered from 1), truth ``lesions`` (numbered from 1), per lesion its box (grown
    for its dilation), whether it is kept (above the volume threshold) and the components it matched."""

    crop: tuple[slice, ...]
    components: np.ndarray
    component_boxes: list
    lesions: np.ndarray
    per_lesion: list[tuple[int, tuple[slice, ...], bool, list[int]]]
    matched_any: set[int]


def _match(pred: np.ndarray, truth: np.ndarray, spacing: Sequence[float], rule: LesionRule) -> _Matching | None:
    """Steps 1-3 and 5 of the module docstring; None when both masks are empty."""
    from scipy import ndimage  # imported here: the cli imports this module for CHALLENGES

    k = int(rule.dilation_iterations)
    connect = ndimage.generate_binary_structure(3, _CONNECTIVITY)
    element = ndimage.generate_binary_structure(3, _DILATION_CONNECTIVITY)
    both = pred | truth
    if not both.any():
        return None
    # Work inside the joint bounding box grown by the dilation's reach: nothing outside it can change
    # a component, a dilation or a surface, and labelling a 240x240x155 volume is most of the cost.
    crop = _grown(ndimage.find_objects(both.astype(np.uint8))[0], k + 1, truth.shape)
    pred, truth = pred[crop], truth[crop]

    components, _ = ndimage.label(pred, connect)
    # Truth voxels take the number of their component of the dilated truth: lesions closer than the
    # dilation merge (every such component holds truth voxels, so each number is a lesion).
    groups, _ = ndimage.label(ndimage.binary_dilation(truth, element, iterations=k), connect)
    lesions = np.where(truth, groups, 0)
    voxel_mm3 = float(np.prod(spacing))
    per_lesion, matched_any = [], set()
    for number, box in enumerate(ndimage.find_objects(lesions), start=1):
        box = _grown(box, k, truth.shape)  # room for the lesion's dilation
        lesion = lesions[box] == number
        roi = ndimage.binary_dilation(lesion, element, iterations=k)
        hits = [int(h) for h in np.unique(components[box][roi]) if h != 0]
        matched_any.update(hits)
        per_lesion.append((number, box, lesion.sum() * voxel_mm3 > rule.min_volume_mm3, hits))
    return _Matching(crop, components, ndimage.find_objects(components), lesions, per_lesion, matched_any)


def _inputs(pred, truth, spacing_mm, rule):
    rule = CHALLENGES[rule] if isinstance(rule, str) else rule
    pred = np.asarray(pred, bool)
    truth = np.asarray(truth, bool)
    if pred.shape != truth.shape or pred.ndim != 3:
        raise ValueError(f"lesion-wise metrics need two 3D masks of one shape, got {pred.shape} and {truth.shape}")
    return pred, truth, tuple(float(s) for s in spacing_mm), rule


def lesion_wise(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float], rule: LesionRule | str = DEFAULT_CHALLENGE,
) -> dict[str, float | int]:
    """Lesion-wise scores of one region of one case (module docstring): ``{name: value}`` for
    :data:`LESION_METRIC_NAMES`; the scores are floats, the counts ints.

    ``pred`` and ``truth`` are 3D boolean masks of the same shape; ``spacing_mm`` the voxel size in mm
    per array axis; ``rule`` a :class:`LesionRule` or a name in :data:`CHALLENGES`.
    """
    pred, truth, spacing, rule = _inputs(pred, truth, spacing_mm, rule)
    matching = _match(pred, truth, spacing, rule)
    if matching is None:
        return _scores(0.0, 0.0, kept=0, matched=0, false_positives=0)
    shape = matching.lesions.shape
    dice_sum = hd95_sum = 0.0
    kept = matched = 0
    for number, box, keep, hits in matching.per_lesion:
        if not keep:
            continue
        kept += 1
        if not hits:
            hd95_sum += MISSED_HD95_MM
            continue
        matched += 1
        whole = box
        for h in hits:  # the matched components whole, wherever they reach
            whole = _union(whole, matching.component_boxes[h - 1])
        whole = _grown(whole, 1, shape)
        lesion_w = matching.lesions[whole] == number
        pred_w = np.isin(matching.components[whole], hits)
        dice_sum += 2.0 * float((lesion_w & pred_w).sum()) / float(lesion_w.sum() + pred_w.sum())
        hd95_sum += robust_hd95(pred_w, lesion_w, spacing)
    false_positives = len(matching.component_boxes) - len(matching.matched_any)
    return _scores(dice_sum, hd95_sum, kept=kept, matched=matched, false_positives=false_positives)


def lesion_masks(
    pred: np.ndarray, truth: np.ndarray, spacing_mm: Sequence[float], rule: LesionRule | str = DEFAULT_CHALLENGE,
) -> tuple[np.ndarray, np.ndarray]:
    """The lesions :func:`lesion_wise` penalises, as two boolean masks of the inputs' shape: the missed
    truth lesions (kept, no component matched) and the false-positive prediction components."""
    pred, truth, spacing, rule = _inputs(pred, truth, spacing_mm, rule)
    missed, false_positive = np.zeros(truth.shape, bool), np.zeros(truth.shape, bool)
    matching = _match(pred, truth, spacing, rule)
    if matching is None:
        return missed, false_positive
    missed_numbers = [number for number, _, keep, hits in matching.per_lesion if keep and not hits]
    fp_numbers = [n for n in range(1, len(matching.component_boxes) + 1) if n not in matching.matched_any]
    missed[matching.crop] = np.isin(matching.lesions, missed_numbers)
    false_positive[matching.crop] = np.isin(matching.components, fp_numbers)
    return missed, false_positive


def _scores(dice_sum: float, hd95_sum: float, kept: int, matched: int, false_positives: int) -> dict:
    """The scores over ``kept`` lesions and the false positives (module docstring, step 7)."""
    terms = kept + false_positives
    if terms == 0:  # nothing to score: no lesion above the threshold and no false positive
        lesion_dice, lesion_hd95 = 1.0, 0.0
    else:
        lesion_dice = dice_sum / terms
        lesion_hd95 = (hd95_sum + MISSED_HD95_MM * false_positives) / terms
    return {
        "lesion_dice": float(lesion_dice),
        "lesion_hd95": float(lesion_hd95),
        "truth_lesions": kept,
        "matched_lesions": matched,
        "missed_lesions": kept - matched,
        "fp_lesions": false_positives,
    }
