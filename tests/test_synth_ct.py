"""`fullres synth --kind ct`: one HU channel, per-case anisotropic spacing, lesions anywhere in the body."""

from __future__ import annotations

import json
import time

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fullres.data.check import check_dataset
from fullres.data.synth import make_spaced_case, write_dataset
from fullres.errors import UserError

SHAPE = (48, 48, 16)
CASES = 6
MEDIAN = (0.8, 0.8, 2.5)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ct_msd(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ct") / "ct", CASES - 1, 1, shape=SHAPE, seed=11, kind="ct",
                         progress=False)


def _cases(root):
    """[(image HU (H, W, D), label (H, W, D), zooms, image affine, label affine)] for every case, test included."""
    out = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        for path in sorted((root / images).glob("*.nii.gz")):
            image, label = nib.load(path), nib.load(root / labels / path.name)
            assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
            data = np.asanyarray(image.dataobj)
            assert data.ndim == 4 and data.shape[3] == 1
            out.append((data[..., 0].astype(np.float32), np.asanyarray(label.dataobj), image.header.get_zooms()[:3],
                        image.affine, label.affine))
    assert len(out) == CASES
    return out


def test_same_seed_same_bytes_and_one_ct_channel(ct_msd, tmp_path):
    again = write_dataset(tmp_path / "again", CASES - 1, 1, shape=SHAPE, seed=11, kind="ct", progress=False)
    other = write_dataset(tmp_path / "other", CASES - 1, 1, shape=SHAPE, seed=12, kind="ct", progress=False)
    assert _files(ct_msd) == _files(again)
    assert _files(ct_msd)["imagesTr/CT_001.nii.gz"] != _files(other)["imagesTr/CT_001.nii.gz"]
    raw = json.loads((ct_msd / "dataset.json").read_text())
    assert raw["modality"] == {"0": "CT"}
    assert raw["labels"] == {"0": "background", "1": "lesion"}
    assert raw["numTraining"] == CASES - 1 and raw["numTest"] == 1
    assert raw["training"][0] == {"image": "./imagesTr/CT_001.nii.gz", "label": "./labelsTr/CT_001.nii.gz"}
    assert check_dataset(ct_msd).ok


def test_spacing_is_anisotropic_varies_per_case_and_sets_the_grid(ct_msd):
    cases = _cases(ct_msd)
    zooms = np.array([case[2] for case in cases], dtype=np.float64)
    assert ((0.7 <= zooms[:, :2]) & (zooms[:, :2] <= 0.9)).all()
    assert ((2.0 <= zooms[:, 2]) & (zooms[:, 2] <= 3.0)).all()
    assert (zooms[:, 2] / zooms[:, 0] > 2).all()
    assert len({tuple(z) for z in zooms.round(3)}) == CASES  # every case its own spacing
    shapes = {case[0].shape for case in cases}
    assert len(shapes) > 1  # ... and so its own grid
    for image, label, zoom, image_affine, label_affine in cases:
        expected = tuple(max(8, int(np.rint(n * m / s))) for n, m, s in zip(SHAPE, MEDIAN, zoom))
        assert image.shape == label.shape == expected
        np.testing.assert_allclose(np.abs(np.diag(image_affine)[:3]), zoom, rtol=1e-6)
        np.testing.assert_array_equal(image_affine, label_affine)
        # The same field of view in millimetres, whatever the spacing (up to half a voxel each side).
        assert (np.abs(np.array(image.shape) * zoom - np.array(SHAPE) * MEDIAN) <= np.array(zoom) / 2 + 1e-6).all()


def test_hounsfield_units_air_tissue_bone_lesions(ct_msd):
    near_border = False
    for image, label, *_ in _cases(ct_msd):
        assert -1024 <= image.min() <= -990  # air, down to the scanner floor
        assert abs(np.median(image[image < -500]) + 1000) < 10
        body = image > -500
        assert 0.3 < body.mean() < 0.9  # the body fills much of the field of view
        assert 0 <= np.median(image[body]) <= 100  # mostly soft tissue
        assert (image > 300).sum() > 20  # bone: a z-score over the body would be dominated by it
        assert ((image > -300) & (image < -30)).any()  # fat
        assert label.any() and set(np.unique(label).tolist()) == {0, 1}
        assert (image[label > 0] > -200).all() and (image[label > 0] < 250).all()  # lesions lie in soft tissue
        lesions, count = ndimage.label(label)
        for index in range(1, count + 1):
            lesion = lesions == index
            if lesion.sum() < 30:
                continue
            shell = ndimage.binary_dilation(lesion, iterations=2) & ~(label > 0) & (image > -50) & (image < 200)
            contrast = float(image[lesion].mean() - image[shell].mean())
            assert 10 < abs(contrast) < 90, contrast  # modest: normalisation matters
        h, w, d = label.shape
        x, y, z = np.nonzero(label)
        margin = np.min([x, h - 1 - x, y, w - 1 - y, z, d - 1 - z])
        near_border |= bool(margin <= 3)
    assert near_border  # a fixed centred crop would cut some lesions


def test_every_case_has_a_lesion_whatever_the_seed():
    for index in range(40):
        image, label, spacing = make_spaced_case((24, 24, 8), 3, index, "ct")
        assert label.any(), index
        assert image.shape == label.shape + (1,) and image.dtype == np.float32


def test_a_96_cube_case_is_quick():
    make_spaced_case((32, 32, 16), 0, 0, "ct")  # warm up imports and caches
    start = time.perf_counter()
    image, _, _ = make_spaced_case((96, 96, 32), 0, 1, "ct")
    assert time.perf_counter() - start < 1.0 and image.size > 200_000


def test_float32_keeps_negative_hounsfield_units(tmp_path):
    out = write_dataset(tmp_path / "f32", 1, 0, shape=(24, 24, 8), seed=1, kind="ct", dtype="float32", progress=False)
    image = nib.load(out / "imagesTr" / "CT_001.nii.gz")
    assert image.get_data_dtype() == np.float32 and np.asanyarray(image.dataobj).min() < -990


def test_nnunet_layout_has_one_ct_channel(tmp_path):
    out = write_dataset(tmp_path / "nn", 2, 1, shape=(24, 24, 8), seed=2, kind="ct", layout="nnunet", progress=False)
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["channel_names"] == {"0": "CT"} and raw["labels"] == {"background": 0, "lesion": 1}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["CT_001_0000.nii.gz", "CT_002_0000.nii.gz"]
    assert (out / "labelsTs" / "CT_003.nii.gz").is_file()
    label = np.asanyarray(nib.load(out / "labelsTr" / "CT_001.nii.gz").dataobj)
    assert set(np.unique(label).tolist()) == {0, 1}
    assert nib.load(out / "imagesTr" / "CT_001_0000.nii.gz").header.get_zooms()[2] >= 2.0
    assert check_dataset(out).ok


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_brats_layouts_are_refused_for_ct(tmp_path, cli, layout):
    out = tmp_path / "refused"
    code, stdout, stderr = cli("synth", out, "--kind", "ct", "--layout", layout, "--cases", "1",
                               "--shape", "16", "16", "16", "--quiet")
    assert code != 0 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and "--layout" in stderr and layout in stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(UserError, match="--layout"):
        write_dataset(out, 1, shape=(16, 16, 16), kind="ct", layout=layout, progress=False)


def test_cli_writes_ct(tmp_path, cli):
    code, stdout, stderr = cli("synth", tmp_path / "ct", "--kind", "ct", "--cases", "1", "--test-cases", "1",
                               "--shape", "24", "24", "8", "--quiet")
    assert code == 0 and "ct" in stdout and stderr == ""
    assert json.loads((tmp_path / "ct" / "dataset.json").read_text())["modality"] == {"0": "CT"}


def test_convert_keeps_a_lesion_datasets_own_label_names(tmp_path):
    """A label set that is not the glioma one keeps its names across layouts (not renamed edema & co)."""
    from fullres.data.convert import convert_dataset

    source = write_dataset(tmp_path / "ct", train_cases=2, test_cases=1, shape=(16, 16, 8), seed=1, kind="ct",
                           progress=False)
    convert_dataset(source, tmp_path / "nn", "nnunet")
    assert json.loads((tmp_path / "nn" / "dataset.json").read_text())["labels"] == {"background": 0, "lesion": 1}
    convert_dataset(tmp_path / "nn", tmp_path / "msd", "msd")
    assert json.loads((tmp_path / "msd" / "dataset.json").read_text())["labels"] == {"0": "background", "1": "lesion"}
