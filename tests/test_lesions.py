"""fullres.evaluate.lesions: BraTS 2023 lesion-wise Dice / HD95 on hand-made cases, against an independent
implementation, and through `fullres evaluate --lesion-wise`."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fullres.evaluate.lesions import CHALLENGES, MISSED_HD95_MM, LesionRule, lesion_wise, robust_hd95
from fullres.evaluate.metrics import evaluate_case

SHAPE = (32, 32, 24)
ISO = (1.0, 1.0, 1.0)


def box(*ranges, shape=SHAPE):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


# ------------------------------------------------------------------------------------------------
# independent implementation: whole volumes, truth components merged explicitly, no crops
# ------------------------------------------------------------------------------------------------


def ref_lesion_wise(pred, truth, spacing, iterations, min_volume_mm3):
    cube = np.ones((3, 3, 3), bool)  # 26-connectivity
    element = cube.copy()
    element[::2, ::2, ::2] = False  # the 18-neighbourhood: the cube without its 8 corners
    truth_cc, n_truth = ndimage.label(truth, cube)
    pred_cc, n_pred = ndimage.label(pred, cube)
    dilated_cc, _ = ndimage.label(ndimage.binary_dilation(truth, element, iterations=iterations), cube)
    group_of = {c: int(dilated_cc[truth_cc == c][0]) for c in range(1, n_truth + 1)}
    used, scored = set(), []  # scored: (dice, hd95, matched) per lesion above the threshold
    for group in sorted(set(group_of.values())):
        lesion = np.isin(truth_cc, [c for c, g in group_of.items() if g == group])
        roi = ndimage.binary_dilation(lesion, element, iterations=iterations)
        hits = set(np.unique(pred_cc[roi]).tolist()) - {0}
        used |= hits
        if lesion.sum() * np.prod(spacing) <= min_volume_mm3:
            continue
        matched = np.isin(pred_cc, sorted(hits))
        scored.append((2 * (matched & lesion).sum() / (matched.sum() + lesion.sum()),
                       robust_hd95(matched, lesion, spacing) if hits else 374.0, bool(hits)))
    fp = n_pred - len(used)
    n = len(scored) + fp
    return {
        "lesion_dice": sum(d for d, _, _ in scored) / n if n else 1.0,
        "lesion_hd95": (sum(h for _, h, _ in scored) + 374.0 * fp) / n if n else 0.0,
        "truth_lesions": len(scored),
        "matched_lesions": sum(m for _, _, m in scored),
        "missed_lesions": sum(not m for _, _, m in scored),
        "fp_lesions": fp,
    }


def random_pair(rng, shape=SHAPE):
    """Blobby truth with several lesions, and a prediction that shifts it, drops and adds blobs."""
    def blobs(threshold):
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=1.6)
        return field / field.std() > threshold

    truth = blobs(1.6)
    pred = np.roll(truth, 1, axis=int(rng.integers(3))) & ~blobs(1.2) | blobs(2.2)
    return pred, truth


# ------------------------------------------------------------------------------------------------
# hand-made cases (BraTS-GLI: 3 dilations of the 18-neighbourhood, lesions <= 50 mm^3 ignored)
# ------------------------------------------------------------------------------------------------


def test_two_lesions_one_missed():
    a, b = box((2, 6), (2, 6), (2, 6)), box((20, 24), (20, 24), (14, 18))
    got = lesion_wise(a, a | b, ISO)
    assert got == {"lesion_dice": 0.5, "lesion_hd95": 187.0, "truth_lesions": 2, "matched_lesions": 1,
                   "missed_lesions": 1, "fp_lesions": 0}


def test_one_false_positive_adds_a_dice_0_hd95_374_term():
    a, far = box((2, 6), (2, 6), (2, 6)), box((20, 22), (20, 22), (14, 16))
    got = lesion_wise(a | far, a, ISO)
    assert got == {"lesion_dice": 0.5, "lesion_hd95": 187.0, "truth_lesions": 1, "matched_lesions": 1,
                   "missed_lesions": 0, "fp_lesions": 1}


def test_matching_reach_is_the_18_neighbourhood_dilated_three_times():
    a = box((4, 8), (4, 8), (4, 8))
    along_axis = {3: True, 4: False}  # a voxel 3 beyond the lesion's face is reached, 4 is not
    for gap, reached in along_axis.items():
        extra = np.zeros(SHAPE, bool)
        extra[7 + gap, 5, 5] = True
        got = lesion_wise(a | extra, a, ISO)
        assert got["fp_lesions"] == (0 if reached else 1), gap
        assert got["lesion_dice"] == pytest.approx(2 * 64 / (64 + 65) if reached else 0.5)
    # Diagonally from the corner: (2, 2, 2) is three 18-neighbour steps away; (3, 3, 3) would be
    # reached by a full 3x3x3 element, but not by BraTS's 18-neighbourhood element.
    for offset, reached in (((2, 2, 2), True), ((3, 3, 1), False), ((3, 3, 0), True), ((3, 3, 3), False)):
        extra = np.zeros(SHAPE, bool)
        extra[tuple(7 + o for o in offset)] = True
        assert lesion_wise(a | extra, a, ISO)["fp_lesions"] == (0 if reached else 1), offset


def test_touching_and_nearby_truth_lesions_merge():
    a = box((2, 6), (2, 6), (2, 6))
    corner = box((6, 10), (6, 10), (6, 10))  # touches a at one corner: one 26-connected lesion
    got = lesion_wise(a, a | corner, ISO)
    assert (got["truth_lesions"], got["matched_lesions"], got["missed_lesions"]) == (1, 1, 0)
    assert got["lesion_dice"] == pytest.approx(2 * 64 / (64 + 128))
    # Lesions 6 voxels apart: their 3-fold dilations touch, one lesion; 7 apart: two lesions.
    for gap, lesions in ((6, 1), (7, 2)):
        b = box((6 + gap, 10 + gap), (2, 6), (2, 6))
        got = lesion_wise(a, a | b, ISO)
        assert got["truth_lesions"] == lesions, gap
        assert got["lesion_dice"] == pytest.approx(2 * 64 / (64 + 128) if lesions == 1 else 0.5), gap
        assert got == pytest.approx(ref_lesion_wise(a, a | b, ISO, 3, 50.0)), gap


def test_touching_prediction_blobs_are_one_component():
    a = box((4, 8), (4, 8), (4, 8))
    touching = box((8, 12), (8, 12), (8, 12))  # corner-touching a: same component, matched, not a false positive
    got = lesion_wise(a | touching, a, ISO)
    assert got["fp_lesions"] == 0 and got["lesion_dice"] == pytest.approx(2 * 64 / (64 + 128))


def test_one_component_bridging_two_lesions_counts_for_both():
    a, b = box((2, 6), (2, 6), (2, 6)), box((20, 24), (2, 6), (2, 6))
    bridge = box((2, 24), (2, 6), (2, 6))
    got = lesion_wise(bridge, a | b, ISO)
    assert (got["truth_lesions"], got["matched_lesions"], got["fp_lesions"]) == (2, 2, 0)
    assert got["lesion_dice"] == pytest.approx(2 * 64 / (64 + 352))  # each lesion against the whole bar


def test_lesions_at_or_below_the_volume_threshold_are_ignored():
    a = box((2, 6), (2, 6), (2, 6))
    small = box((20, 25), (20, 25), (14, 16))  # 50 voxels
    got = lesion_wise(a, a | small, ISO)
    assert got == {"lesion_dice": 1.0, "lesion_hd95": 0.0, "truth_lesions": 1, "matched_lesions": 1,
                   "missed_lesions": 0, "fp_lesions": 0}
    # a prediction on an ignored lesion is not a false positive either
    assert lesion_wise(a | small, a | small, ISO)["fp_lesions"] == 0
    one_more = small.copy()
    one_more[25, 20, 14] = True  # 51 voxels: scored, and missed
    assert lesion_wise(a, a | one_more, ISO)["missed_lesions"] == 1
    # the threshold is a volume: 50 voxels of 1 x 1 x 1.1 mm are 55 mm^3
    assert lesion_wise(a, a | small, (1.0, 1.0, 1.1))["missed_lesions"] == 1
    # BraTS-MET's threshold is 2 mm^3, with one dilation
    assert lesion_wise(a, a | small, ISO, "BraTS-MET")["missed_lesions"] == 1


def test_empty_truth_and_empty_prediction():
    empty = np.zeros(SHAPE, bool)
    a, far = box((2, 6), (2, 6), (2, 6)), box((20, 22), (20, 22), (14, 16))
    nothing = {"lesion_dice": 1.0, "lesion_hd95": 0.0, "truth_lesions": 0, "matched_lesions": 0,
               "missed_lesions": 0, "fp_lesions": 0}
    assert lesion_wise(empty, empty, ISO) == nothing
    assert lesion_wise(empty, box((2, 4), (2, 4), (2, 4)), ISO) == nothing  # only an ignored lesion
    assert lesion_wise(a | far, empty, ISO) == {"lesion_dice": 0.0, "lesion_hd95": MISSED_HD95_MM,
                                                "truth_lesions": 0, "matched_lesions": 0, "missed_lesions": 0,
                                                "fp_lesions": 2}
    assert lesion_wise(empty, a | box((20, 24), (20, 24), (14, 18)), ISO) == {
        "lesion_dice": 0.0, "lesion_hd95": MISSED_HD95_MM, "truth_lesions": 2, "matched_lesions": 0,
        "missed_lesions": 2, "fp_lesions": 0}


def test_robust_hd95_exact_values():
    a = np.zeros(SHAPE, bool)
    a[5, 5, 5] = True
    b = np.zeros(SHAPE, bool)
    b[5, 5, 8] = True
    assert robust_hd95(a, b, (1.0, 1.5, 2.5)) == pytest.approx(7.5)
    assert robust_hd95(a, b, ISO) == pytest.approx(3.0)
    cube = box((4, 10), (4, 10), (4, 10))
    assert robust_hd95(cube, cube, ISO) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        robust_hd95(a, np.zeros(SHAPE, bool), ISO)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_cases_agree_with_the_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    pred, truth = random_pair(rng)
    spacing = ISO if seed == 0 else (1.0, 1.2, 1.5)
    for name in ("BraTS-GLI", "BraTS-MET"):
        rule = CHALLENGES[name]
        got = lesion_wise(pred, truth, spacing, rule)
        want = ref_lesion_wise(pred, truth, spacing, rule.dilation_iterations, rule.min_volume_mm3)
        assert got == pytest.approx(want, rel=1e-6), name
        assert got["truth_lesions"] + got["fp_lesions"] > 1, "the case should have something to match"


def test_rule_validation():
    with pytest.raises(ValueError, match="dilation_iterations"):
        LesionRule("x", 0, 50.0)
    with pytest.raises(ValueError, match="min_volume_mm3"):
        LesionRule("x", 1, -1.0)
    assert (CHALLENGES["BraTS-GLI"].dilation_iterations, CHALLENGES["BraTS-GLI"].min_volume_mm3) == (3, 50.0)


# ------------------------------------------------------------------------------------------------
# evaluate --lesion-wise
# ------------------------------------------------------------------------------------------------


def save(path, data, spacing=ISO):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.int16), np.diag([*spacing, 1.0])), str(path))


@pytest.fixture
def lesion_folders(tmp_path):
    """Two cases in MSD labels (WT {1,2,3}, TC {2,3}, ET {3}): one with a missed lesion, one with a
    false positive and a 27-voxel lesion that BraTS-GLI ignores and BraTS-MET counts."""
    truth1 = np.zeros(SHAPE, np.int16)
    truth1[2:8, 2:8, 2:8] = 1
    truth1[3:7, 3:7, 3:7] = 3
    truth1[20:26, 20:26, 14:20] = 2
    pred1 = truth1.copy()
    pred1[20:26, 20:26, 14:20] = 0  # the second lesion missed
    truth2 = np.zeros(SHAPE, np.int16)
    truth2[10:16, 10:16, 8:14] = 2
    truth2[25:28, 2:5, 2:5] = 1  # 27 voxels
    pred2 = truth2.copy()
    pred2[25:28, 2:5, 2:5] = 0
    pred2[2:4, 25:27, 18:20] = 3  # a false positive in every region
    cases = {"case_a": (pred1, truth1), "case_b": (pred2, truth2)}
    for case, (pred, truth) in cases.items():
        save(tmp_path / "pred" / f"{case}.nii.gz", pred)
        save(tmp_path / "truth" / f"{case}.nii.gz", truth)
    return tmp_path / "pred", tmp_path / "truth", cases


def test_evaluate_lesion_wise_round_trip(lesion_folders, cli):
    pred_dir, truth_dir, cases = lesion_folders
    code, out, err = cli("evaluate", pred_dir, truth_dir, "--lesion-wise", "--json")
    assert code == 0, err
    result = json.loads(out)
    regions = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}
    for case, (pred, truth) in cases.items():
        want = evaluate_case(pred, truth, ISO, regions, lesion_rule="BraTS-GLI")
        for region in regions:
            scores = result["cases"][case][region]
            assert scores == pytest.approx(want[region]), (case, region)
            assert list(scores) == ["dice", "nsd", "hd95", "lesion_dice", "lesion_hd95", "truth_lesions",
                                    "matched_lesions", "missed_lesions", "fp_lesions"]
            assert scores == pytest.approx(evaluate_case(pred, truth, ISO, regions)[region]
                                           | lesion_wise(np.isin(pred, regions[region]),
                                                         np.isin(truth, regions[region]), ISO))
    assert result["cases"]["case_a"]["WT"]["lesion_dice"] == 0.5  # one of two lesions missed
    assert result["cases"]["case_a"]["WT"]["missed_lesions"] == 1
    assert result["cases"]["case_b"]["WT"]["fp_lesions"] == 1 and result["cases"]["case_b"]["WT"]["truth_lesions"] == 1
    assert result["summary"]["WT"]["lesion_dice"]["mean"] == pytest.approx(0.5)

    rows = list(csv.reader((pred_dir / "metrics.csv").open()))
    assert rows[0] == ["case", "region", "dice", "nsd", "hd95", "lesion_dice", "lesion_hd95", "truth_lesions",
                       "matched_lesions", "missed_lesions", "fp_lesions"]
    assert rows[1][:2] == ["case_a", "WT"] and rows[1][5:] == ["0.5", "187.0", "2", "1", "1", "0"]
    assert [r[:2] for r in rows[-6:]] == [["mean", r] for r in regions] + [["std", r] for r in regions]

    code, out, err = cli("evaluate", pred_dir, truth_dir, "--lesion-wise")
    assert code == 0, err
    header = out.splitlines()[0].split()
    assert header[-6:] == ["L-Dice", "L-HD95", "lesions", "matched", "missed", "FP"]
    assert "lesion-wise as BraTS-GLI" in out

    code, out, err = cli("evaluate", pred_dir, truth_dir, "--lesion-wise", "--challenge", "BraTS-MET", "--json")
    assert code == 0, err
    assert json.loads(out)["cases"]["case_b"]["WT"]["missed_lesions"] == 1  # the 27-voxel lesion counts for MET


def test_evaluate_without_lesion_wise_keeps_its_columns_and_challenge_alone_is_refused(lesion_folders, cli):
    pred_dir, truth_dir, _ = lesion_folders
    code, out, err = cli("evaluate", pred_dir, truth_dir, "--json")
    assert code == 0, err
    assert list(json.loads(out)["cases"]["case_a"]["WT"]) == ["dice", "nsd", "hd95"]
    before = (pred_dir / "metrics.csv").read_bytes()
    code, out, err = cli("evaluate", pred_dir, truth_dir, "--challenge", "BraTS-MET")
    assert code == 2 and "--challenge" in err and "--lesion-wise" in err
    assert len(err.strip().splitlines()) == 1 and (pred_dir / "metrics.csv").read_bytes() == before
