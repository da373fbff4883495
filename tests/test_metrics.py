"""fullres.evaluate.metrics: agreement with an independent implementation, empty-mask convention, files, losses."""

from __future__ import annotations

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from fullres.errors import UserError
from fullres.engine.losses import dice_bce_loss, dice_coefficient, soft_dice_loss, voxel_accuracy
from fullres.evaluate.metrics import (DEFAULT_REGIONS, dice, evaluate_case, evaluate_folders, hd95, image_diagonal_mm, normalized_surface_distance, region_masks, summarize, write_metrics_csv, write_metrics_json)

SPACING = (1.0, 1.5, 2.5)
SHAPE = (24, 24, 16)


# ------------------------------------------------------------------------------------------------
# independent reference implementation (scipy + numpy, no MONAI)
# ------------------------------------------------------------------------------------------------


def ref_surface(mask):
    return mask & ~ndimage.binary_erosion(mask)  # 6-connected, volume border counts as outside


def ref_directed(a, b, spacing):
    """Distances (mm) from every surface voxel of a to the nearest surface voxel of b."""
    sa, sb = ref_surface(a), ref_surface(b)
    return ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]


def ref_metrics(pred, truth, spacing, tol):
    d = 2.0 * (pred & truth).sum() / (pred.sum() + truth.sum())
    dpt, dtp = ref_directed(pred, truth, spacing), ref_directed(truth, pred, spacing)
    nsd = ((dpt <= tol).sum() + (dtp <= tol).sum()) / (dpt.size + dtp.size)
    h = max(np.percentile(dpt, 95), np.percentile(dtp, 95))
    return {"dice": d, "nsd": nsd, "hd95": h}


def random_labels(rng, shape=SHAPE, shift=0.0):
    """A blobby BraTS-like label map: nested regions from a smoothed random field (touches the border sometimes)."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
    field = (field - field.mean()) / field.std() + shift
    labels = np.zeros(shape, np.int16)
    labels[field > 0.3] = 1
    labels[field > 0.9] = 2
    labels[field > 1.4] = 3
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluate_case_agrees_with_independent_implementation(seed):
    rng = np.random.default_rng(seed)
    truth = random_labels(rng)
    pred = truth.copy()
    noise = random_labels(rng)  # perturb: add and remove blobs
    pred[(noise >= 2) & (pred == 0)] = 1
    pred[(noise == 1) & (pred == 3)] = 2
    pred = np.roll(pred, 1, axis=2)
    tol = 2.0
    got = evaluate_case(pred, truth, SPACING, DEFAULT_REGIONS, tolerance_mm=tol)
    assert set(got) == {"WT", "TC", "ET"}
    for region, labels in DEFAULT_REGIONS.items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        assert p.any() and t.any()
        want = ref_metrics(p, t, SPACING, tol)
        for metric in ("dice", "nsd", "hd95"):
            assert got[region][metric] == pytest.approx(want[metric], rel=1e-4, abs=1e-5), (region, metric)


def test_masks_touching_the_border_match_reference():
    truth = np.zeros(SHAPE, bool)
    truth[:6, :5, :4] = True  # in a corner: the crop must not move the volume border
    pred = np.zeros(SHAPE, bool)
    pred[1:8, :4, :3] = True
    want = ref_metrics(pred, truth, SPACING, 1.0)
    assert dice(pred, truth) == pytest.approx(want["dice"])
    assert normalized_surface_distance(pred, truth, SPACING, 1.0) == pytest.approx(want["nsd"], rel=1e-5)
    assert hd95(pred, truth, SPACING) == pytest.approx(want["hd95"], rel=1e-5)


def test_spacing_is_honoured_per_axis():
    a = np.zeros(SHAPE, bool)
    b = np.zeros(SHAPE, bool)
    a[5, 5, 5] = True
    b[5, 5, 8] = True  # 3 voxels along axis 2 (2.5 mm)
    assert hd95(a, b, SPACING) == pytest.approx(7.5)
    b2 = np.zeros(SHAPE, bool)
    b2[5, 8, 5] = True  # 3 voxels along axis 1 (1.5 mm)
    assert hd95(a, b2, SPACING) == pytest.approx(4.5)
    assert normalized_surface_distance(a, b2, SPACING, tolerance_mm=4.5) == pytest.approx(1.0)
    assert normalized_surface_distance(a, b2, SPACING, tolerance_mm=4.4) == pytest.approx(0.0)


def test_identical_masks_are_perfect():
    rng = np.random.default_rng(5)
    m = np.isin(random_labels(rng), (1, 2, 3))
    assert dice(m, m) == pytest.approx(1.0)
    assert normalized_surface_distance(m, m, SPACING) == pytest.approx(1.0)
    assert hd95(m, m, SPACING) == pytest.approx(0.0)


def test_empty_mask_convention():
    empty = np.zeros(SHAPE, bool)
    full = np.zeros(SHAPE, bool)
    full[8:12, 8:12, 4:8] = True
    diag = math.sqrt((24 * 1.0) ** 2 + (24 * 1.5) ** 2 + (16 * 2.5) ** 2)
    assert image_diagonal_mm(SHAPE, SPACING) == pytest.approx(diag)
    assert (dice(empty, empty), normalized_surface_distance(empty, empty, SPACING), hd95(empty, empty, SPACING)) == (
        1.0,
        1.0,
        0.0,
    )
    for p, t in ((empty, full), (full, empty)):
        assert dice(p, t) == 0.0
        assert normalized_surface_distance(p, t, SPACING) == 0.0
        assert hd95(p, t, SPACING) == pytest.approx(diag)
    # BraTS' customary penalty is this diagonal for a 240x240x155 volume at 1 mm
    assert image_diagonal_mm((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.01)


def test_evaluate_case_with_absent_region_is_finite():
    truth = np.zeros(SHAPE, np.int16)
    truth[5:15, 5:15, 4:10] = 1
    truth[8:12, 8:12, 5:8] = 2  # no enhancing tumour in truth
    pred = truth.copy()
    pred[10, 10, 6] = 3  # a spurious ET voxel
    res = evaluate_case(pred, truth, SPACING)
    assert res["ET"] == {"dice": 0.0, "nsd": 0.0, "hd95": pytest.approx(image_diagonal_mm(SHAPE, SPACING))}
    assert res["WT"]["dice"] == pytest.approx(1.0)
    pred[10, 10, 6] = 2
    assert evaluate_case(pred, truth, SPACING)["ET"] == {"dice": 1.0, "nsd": 1.0, "hd95": 0.0}


def test_region_derivation_from_label_maps():
    labels = np.array([0, 1, 2, 3, 1, 3]).reshape(1, 2, 3)
    masks = region_masks(labels)
    assert masks["WT"].ravel().tolist() == [False, True, True, True, True, True]
    assert masks["TC"].ravel().tolist() == [False, False, True, True, False, True]
    assert masks["ET"].ravel().tolist() == [False, False, False, True, False, True]
    custom = region_masks(labels, {"edema": [1]})
    assert list(custom) == ["edema"] and custom["edema"].sum() == 2
    with pytest.raises(ValueError):
        region_masks(labels, {"bad": (0, 1)})


def test_binary_whole_tumour_prediction():
    rng = np.random.default_rng(3)
    truth = random_labels(rng)
    wt_pred = np.isin(np.roll(truth, 2, axis=0), (1, 2, 3)).astype(np.uint8)
    res = evaluate_case(wt_pred, truth, SPACING, pred_is_binary_wt=True)
    assert list(res) == ["WT"]
    want = ref_metrics(wt_pred.astype(bool), np.isin(truth, (1, 2, 3)), SPACING, 1.0)
    for metric in ("dice", "nsd", "hd95"):
        assert res["WT"][metric] == pytest.approx(want[metric], rel=1e-4)
    with pytest.raises(ValueError, match="only 0/1"):
        evaluate_case(truth, truth, SPACING, pred_is_binary_wt=True)


def test_summarize_mean_and_population_std():
    cases = {
        "a": {"WT": {"dice": 0.5, "nsd": 1.0, "hd95": 2.0}},
        "b": {"WT": {"dice": 1.0, "nsd": 1.0, "hd95": 4.0}, "ET": {"dice": 0.0, "nsd": 0.0, "hd95": 9.0}},
    }
    s = summarize(cases)
    assert s["WT"]["dice"] == {"mean": 0.75, "std": 0.25}
    assert s["WT"]["nsd"] == {"mean": 1.0, "std": 0.0}
    assert s["WT"]["hd95"] == {"mean": 3.0, "std": 1.0}
    assert s["ET"]["hd95"] == {"mean": 9.0, "std": 0.0}


# ------------------------------------------------------------------------------------------------
# folders and files
# ------------------------------------------------------------------------------------------------


AFFINE = np.diag([*SPACING, 1.0])


def save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, np.int16), affine), str(path))


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(11)
    pred_dir, label_dir = tmp_path / "pred", tmp_path / "labels"
    truths = {}
    for i, case in enumerate(["BRATS_001", "BRATS_002"]):
        truth = random_labels(rng)
        pred = np.roll(truth, i + 1, axis=1)
        save(label_dir / f"{case}.nii.gz", truth)
        save(pred_dir / (f"{case}.nii" if i else f"{case}.nii.gz"), pred)  # .nii and .nii.gz both pair
        truths[case] = (pred, truth)
    (pred_dir / "notes.txt").write_text("not a volume")
    return pred_dir, label_dir, truths


def test_evaluate_folders_reads_spacing_from_label_and_round_trips(folders, tmp_path):
    pred_dir, label_dir, truths = folders
    result = evaluate_folders(pred_dir, label_dir, tolerance_mm=1.0)
    assert set(result) == {"cases", "summary"}
    assert list(result["cases"]) == ["BRATS_001", "BRATS_002"]
    for case, (pred, truth) in truths.items():
        assert result["cases"][case] == evaluate_case(pred, truth, SPACING)
    assert set(result["summary"]) == {"WT", "TC", "ET"}
    assert set(result["summary"]["ET"]["hd95"]) == {"mean", "std"}

    json_path = tmp_path / "out" / "metrics.json"
    write_metrics_json(result, json_path)
    assert json.loads(json_path.read_text()) == result

    csv_path = tmp_path / "out" / "metrics.csv"
    write_metrics_csv(result, csv_path)
    rows = list(csv.DictReader(csv_path.open()))
    assert list(rows[0]) == ["case", "region", "dice", "nsd", "hd95"]
    assert len(rows) == 2 * 3 + 2 * 3
    for row in rows[:6]:
        for m in ("dice", "nsd", "hd95"):
            assert float(row[m]) == result["cases"][row["case"]][row["region"]][m]
    for row in rows[6:]:
        assert row["case"] in ("mean", "std")
        for m in ("dice", "nsd", "hd95"):
            assert float(row[m]) == result["summary"][row["region"]][m][row["case"]]
    assert sorted(p.name for p in csv_path.parent.iterdir()) == ["metrics.csv", "metrics.json"]  # no temp files left


def test_mismatched_shape_names_both_files(folders):
    pred_dir, label_dir, _ = folders
    save(pred_dir / "BRATS_001.nii.gz", np.zeros((24, 24, 15)))
    with pytest.raises(UserError, match=r"BRATS_001\.nii\.gz.*shape.*BRATS_001\.nii\.gz"):
        evaluate_folders(pred_dir, label_dir)


def test_mismatched_affine_names_the_file(folders):
    pred_dir, label_dir, truths = folders
    shifted = AFFINE.copy()
    shifted[0, 3] = 10.0
    save(pred_dir / "BRATS_001.nii.gz", truths["BRATS_001"][0], affine=shifted)
    with pytest.raises(UserError, match=r"pred/BRATS_001\.nii\.gz.*affine"):
        evaluate_folders(pred_dir, label_dir)


def test_missing_counterparts_are_named(folders):
    pred_dir, label_dir, truths = folders
    save(pred_dir / "BRATS_009.nii.gz", truths["BRATS_001"][0])
    with pytest.raises(UserError, match=r"BRATS_009.*no label"):
        evaluate_folders(pred_dir, label_dir)
    (pred_dir / "BRATS_009.nii.gz").unlink()
    (pred_dir / "BRATS_002.nii").unlink()
    with pytest.raises(UserError, match=r"BRATS_002\.nii\.gz has no prediction"):
        evaluate_folders(pred_dir, label_dir)


def test_empty_or_missing_folder(tmp_path, folders):
    pred_dir, label_dir, _ = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*no NIfTI"):
        evaluate_folders(tmp_path / "empty", label_dir)
    with pytest.raises(UserError, match="nowhere"):
        evaluate_folders(pred_dir, tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------------
# training-time metrics
# ------------------------------------------------------------------------------------------------


def perfect_logits(onehot):
    return (onehot.float() * 2 - 1) * 30.0


def test_soft_dice_of_perfect_prediction_is_zero():
    g = torch.Generator().manual_seed(0)
    t1 = (torch.rand(2, 1, 8, 8, 4, generator=g) > 0.6).float()
    assert soft_dice_loss(perfect_logits(t1), t1).item() == pytest.approx(0.0, abs=1e-4)
    t3 = (torch.rand(2, 3, 8, 8, 4, generator=g) > 0.6).float()  # independent sigmoid channels (WT/TC/ET)
    assert soft_dice_loss(perfect_logits(t3), t3).item() == pytest.approx(0.0, abs=1e-4)
    idx = torch.randint(0, 4, (2, 8, 8, 4), generator=g)
    onehot = torch.nn.functional.one_hot(idx, 4).movedim(-1, 1)
    assert soft_dice_loss(perfect_logits(onehot), idx).item() == pytest.approx(0.0, abs=1e-4)
    assert soft_dice_loss(perfect_logits(onehot), idx[:, None]).item() == pytest.approx(0.0, abs=1e-4)
    # a wrong prediction is penalised
    assert soft_dice_loss(-perfect_logits(t1), t1).item() > 0.9


def test_losses_have_finite_gradients():
    g = torch.Generator().manual_seed(1)
    for logits_shape, target in (
        ((2, 1, 6, 6, 4), (torch.rand(2, 1, 6, 6, 4, generator=g) > 0.5).float()),
        ((2, 1, 6, 6, 4), torch.zeros(2, 1, 6, 6, 4)),  # empty target
        ((2, 4, 6, 6, 4), torch.randint(0, 4, (2, 6, 6, 4), generator=g)),
    ):
        logits = torch.randn(*logits_shape, generator=g, requires_grad=True)
        for fn in (soft_dice_loss, dice_bce_loss):
            logits.grad = None
            loss = fn(logits, target)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
            assert logits.grad.abs().sum() > 0
    logits = torch.zeros(1, 1, 2, 2, 1)
    target = torch.ones(1, 1, 2, 2, 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    assert dice_bce_loss(logits, target).item() == pytest.approx(soft_dice_loss(logits, target).item() + bce.item())


def test_dice_coefficient_and_accuracy():
    target = torch.zeros(1, 1, 4, 4, 1)
    target[0, 0, :2, :2] = 1  # 4 voxels
    pred = torch.zeros_like(target)
    pred[0, 0, :2, :1] = 1  # 2 of them
    logits = perfect_logits(pred)
    assert dice_coefficient(logits, target).item() == pytest.approx(2 * 2 / (2 + 4), abs=1e-5)
    assert voxel_accuracy(logits, target).item() == pytest.approx(14 / 16)
    assert dice_coefficient(perfect_logits(target), target).item() == pytest.approx(1.0)
    empty = torch.zeros_like(target)
    assert dice_coefficient(perfect_logits(empty), empty).item() == pytest.approx(1.0)
    # softmax: foreground classes only
    idx = torch.tensor([[0, 1], [2, 2]]).reshape(1, 2, 2, 1)
    onehot = torch.nn.functional.one_hot(idx, 3).movedim(-1, 1)
    assert dice_coefficient(perfect_logits(onehot), idx).item() == pytest.approx(1.0)
    assert voxel_accuracy(perfect_logits(onehot), idx).item() == pytest.approx(1.0)
    wrong = idx.clone()
    wrong[0, 0, 0, 0] = 1  # background voxel predicted as class 1
    onehot_wrong = torch.nn.functional.one_hot(wrong, 3).movedim(-1, 1)
    assert voxel_accuracy(perfect_logits(onehot_wrong), idx).item() == pytest.approx(0.75)
    assert dice_coefficient(perfect_logits(onehot_wrong), idx).item() == pytest.approx((2 / 3 + 1.0) / 2, abs=1e-5)


def test_undeclared_label_values_are_refused_not_scored_as_background(tmp_path, cli):
    from fullres.data.nifti import write_nifti

    labels = np.zeros((8, 8, 8), np.uint8)
    labels[2:5, 2:5, 2:5] = 3
    for folder, array in (("truth", labels), ("pred", np.where(labels == 3, 7, 0).astype(np.uint8))):
        (tmp_path / folder).mkdir()
        write_nifti(tmp_path / folder / "case.nii.gz", array, np.eye(4))
    code, _, err = cli("evaluate", tmp_path / "pred", tmp_path / "truth")
    assert code == 2 and "has label value(s) [7] outside the declared [0, 1, 2, 3]" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "pred" / "metrics.csv").exists()
