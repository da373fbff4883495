"""`check_dataset` on a corpus of broken datasets that the tests make themselves."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fullres.data.check import check_dataset
from fullres.data.nifti import write_nifti

IMAGE = "imagesTr/BRATS_002.nii.gz"
LABEL = "labelsTr/BRATS_002.nii.gz"


def _read(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


def _edit_json(root, change):
    raw = json.loads((root / "dataset.json").read_text())
    change(raw)
    (root / "dataset.json").write_text(json.dumps(raw))


def test_clean_dataset_passes(small_msd):
    report = check_dataset(small_msd)
    assert report.ok and report.lines() == []
    assert report.summary() == "checked 5 cases: 0 problems, 0 warnings"


def _truncate(root):
    data = (root / IMAGE).read_bytes()
    (root / IMAGE).write_bytes(data[: len(data) // 2])


def _wrong_dimensionality(root):
    data, affine = _read(root / IMAGE)
    write_nifti(root / IMAGE, data[..., 0], affine)


def _wrong_modalities(root):
    data, affine = _read(root / IMAGE)
    write_nifti(root / IMAGE, data[..., :3], affine)


def _nan(root):
    data, affine = _read(root / IMAGE)
    data = data.astype(np.float32)
    data[3, 4, 5, 1] = np.nan
    data[6, 4, 5, 2] = np.inf
    write_nifti(root / IMAGE, data, affine)


def _label_4d(root):
    data, affine = _read(root / LABEL)
    write_nifti(root / LABEL, np.stack([data, data], axis=-1), affine)


def _shape_mismatch(root):
    data, affine = _read(root / LABEL)
    write_nifti(root / LABEL, data[:, :, :20], affine)


def _affine_mismatch(root):
    data, affine = _read(root / LABEL)
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    write_nifti(root / LABEL, data, shifted)


def _undeclared_label(root):
    data, affine = _read(root / LABEL)
    data[0, 0, 0] = 5
    write_nifti(root / LABEL, data, affine)


def _fractional_label(root):
    data, affine = _read(root / LABEL)
    data = data.astype(np.float32)
    data[0, 0, 0] = 0.5
    write_nifti(root / LABEL, data, affine)


def _not_nifti(root):
    (root / IMAGE).write_text("this is not an image")


def _missing(root):
    (root / LABEL).unlink()


def _path_escape(root):
    _edit_json(root, lambda raw: raw["training"][1].update(image="../../etc/passwd"))


def _absolute_path(root):
    _edit_json(root, lambda raw: raw["training"][1].update(label="/tmp/label.nii.gz"))


def _test_image_3d(root):
    data, affine = _read(root / "imagesTs/BRATS_005.nii.gz")
    write_nifti(root / "imagesTs/BRATS_005.nii.gz", data[..., 0], affine)


@pytest.mark.parametrize("break_it, expected", [
    (_truncate, f"ERROR {IMAGE}: truncated or corrupt data"),
    (_wrong_dimensionality, f"ERROR {IMAGE}: image must be 4D (H, W, D, modalities), got shape (32, 32, 24)"),
    (_wrong_modalities, f"ERROR {IMAGE}: image has 3 channels but dataset.json declares 4 modalities"),
    (_nan, f"ERROR {IMAGE}: image has 1 NaN and 1 Inf voxels"),
    (_label_4d, f"ERROR {LABEL}: label must be 3D (H, W, D), got shape (32, 32, 24, 2)"),
    (_shape_mismatch, f"ERROR {LABEL}: label shape (32, 32, 20) != image shape (32, 32, 24) ({IMAGE})"),
    (_affine_mismatch, f"ERROR {LABEL}: label affine differs from the image's ({IMAGE}) by up to 2"),
    (_undeclared_label, f"ERROR {LABEL}: label values 5 are not declared in dataset.json labels (0, 1, 2, 3)"),
    (_fractional_label, f"ERROR {LABEL}: label values must be whole numbers"),
    (_not_nifti, f"ERROR {IMAGE}: not a NIfTI file"),
    (_missing, f"ERROR {LABEL}: file not found"),
    (_path_escape, "ERROR dataset.json: training[1].image '../../etc/passwd' leaves the dataset folder"),
    (_absolute_path, "ERROR dataset.json: training[1].label '/tmp/label.nii.gz' is an absolute path"),
    (_test_image_3d, "ERROR imagesTs/BRATS_005.nii.gz: image must be 4D"),
])
def test_each_broken_file_gives_one_clear_problem(msd_copy, break_it, expected):
    break_it(msd_copy)
    report = check_dataset(msd_copy)
    assert not report.ok
    assert len(report.problems) == 1, report.lines()
    assert report.lines()[0].startswith(expected), report.lines()
    assert report.summary() == "checked 5 cases: 1 problem, 0 warnings"


def test_empty_label_is_a_warning(msd_copy):
    data, affine = _read(msd_copy / LABEL)
    write_nifti(msd_copy / LABEL, np.zeros_like(data), affine)
    report = check_dataset(msd_copy)
    assert report.ok
    assert report.lines() == [f"WARNING {LABEL}: empty label volume (no foreground voxels)"]
    assert report.summary() == "checked 5 cases: 0 problems, 1 warning"


def test_symlink_leaving_the_folder(msd_copy, tmp_path):
    outside = tmp_path / "outside.nii.gz"
    outside.write_bytes((msd_copy / LABEL).read_bytes())
    (msd_copy / LABEL).unlink()
    (msd_copy / LABEL).symlink_to(outside)
    report = check_dataset(msd_copy)
    assert [f.path for f in report.problems] == ["dataset.json"]
    assert "training[1].label" in report.problems[0].message and "symlink" in report.problems[0].message


@pytest.mark.parametrize("content, expected", [
    (None, "ERROR dataset.json: not found"),
    ('{"training": [', "ERROR dataset.json: not valid JSON (line 1, column 15"),
    ("[1, 2]", "ERROR dataset.json: expected a JSON object at the top level, got list"),
    ('{"modality": {"0": "FLAIR"}, "labels": {"0": "background"}}', "ERROR dataset.json: missing key 'training'"),
    ('{"modality": ["FLAIR"], "labels": {"0": "background"}, "training": []}', "ERROR dataset.json: 'modality' must be"),
    ('{"modality": {"0": "FLAIR"}, "labels": {"0": "background"}, "training": [{"image": "x.nii.gz"}]}',
     "ERROR dataset.json: training[0] must be an object with 'image' and 'label' paths"),
    ('{"modality": {"0": "FLAIR"}, "labels": {"0": "background"}, "training": [], "test": "imagesTs"}',
     "ERROR dataset.json: 'test' must be a list of image paths"),
])
def test_bad_dataset_json(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    report = check_dataset(tmp_path)
    assert not report.ok
    assert report.lines()[0].startswith(expected), report.lines()


def test_not_a_folder_and_count_mismatch(tmp_path, msd_copy):
    report = check_dataset(tmp_path / "nothing-here")
    assert not report.ok and "not a directory" in report.lines()[0]
    _edit_json(msd_copy, lambda raw: raw.update(numTraining=484))
    report = check_dataset(msd_copy)
    assert report.ok and report.lines() == ["WARNING dataset.json: 'numTraining' is 484 but 4 entries are listed"]


def test_several_problems_are_all_reported(msd_copy):
    _truncate(msd_copy)
    _missing(msd_copy)
    (msd_copy / "labelsTr/BRATS_003.nii.gz").write_bytes(b"\x1f\x8b garbage")
    report = check_dataset(msd_copy)
    assert len(report.problems) == 3, report.lines()
    assert report.summary() == "checked 5 cases: 3 problems, 0 warnings"
