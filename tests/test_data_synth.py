"""Synthetic datasets: layout, reproducible bytes, phantom contrasts, safe writing."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from fullres.data.synth import brats_phantom, write_dataset
from fullres.data.check import check_dataset
from fullres.data import load_dataset_json
from fullres.data.synth import CSF, EDEMA, ENHANCING, GREY, NECROSIS, WHITE, smooth_field
from fullres.errors import UserError

SHAPE = (32, 32, 24)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_dataset_json(small_msd):
    raw = json.loads((small_msd / "dataset.json").read_text())
    assert raw["tensorImageSize"] == "4D"
    assert raw["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert raw["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert raw["numTraining"] == 4 and raw["numTest"] == 1
    assert raw["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
    assert raw["test"] == ["./imagesTs/BRATS_005.nii.gz"]
    assert (small_msd / "labelsTs" / "BRATS_005.nii.gz").is_file()  # kept aside, not listed
    assert "labelsTs" not in json.dumps(raw)
    for key in ("name", "description"):
        assert isinstance(raw[key], str)

    image = nib.load(small_msd / "imagesTr" / "BRATS_001.nii.gz")
    label = nib.load(small_msd / "labelsTr" / "BRATS_001.nii.gz")
    assert image.shape == SHAPE + (4,) and image.get_data_dtype() == np.int16
    assert label.shape == SHAPE and label.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(image.affine, label.affine)
    np.testing.assert_array_equal(np.abs(np.diag(image.affine)[:3]), 1)  # 1 mm voxels
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    values = np.asanyarray(image.dataobj)
    assert 0 <= values.min() and 1000 < values.max() < 4000  # scanner-like int16 values
    assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) == {0, 1, 2, 3}
    assert check_dataset(small_msd).ok


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    first = write_dataset(tmp_path / "a", 2, 1, shape=SHAPE, seed=5, progress=False)
    second = write_dataset(tmp_path / "b", 2, 1, shape=SHAPE, seed=5, progress=False)
    third = write_dataset(tmp_path / "c", 2, 1, shape=SHAPE, seed=6, progress=False)
    assert _files(first) == _files(second)
    a, c = _files(first), _files(third)
    assert a["imagesTr/BRATS_001.nii.gz"] != c["imagesTr/BRATS_001.nii.gz"]
    # Cases of one dataset differ from each other.
    assert a["imagesTr/BRATS_001.nii.gz"] != a["imagesTr/BRATS_002.nii.gz"]
    assert a["labelsTr/BRATS_001.nii.gz"] != a["labelsTr/BRATS_002.nii.gz"]


@pytest.mark.parametrize("seed", range(4))
def test_phantom_contrasts(seed):
    phantom = brats_phantom(SHAPE, np.random.default_rng(seed))
    flair, t1, t1gd, t2 = (phantom.image[..., c] for c in range(4))

    def mean(channel, tissue):
        return float(channel[phantom.tissue == tissue].mean())

    assert set(np.unique(phantom.label).tolist()) == {0, 1, 2, 3}
    assert mean(flair, EDEMA) > mean(flair, WHITE)
    assert mean(flair, CSF) < mean(flair, WHITE)
    assert mean(t1, WHITE) > mean(t1, GREY)
    assert mean(t1, NECROSIS) < mean(t1, WHITE) and mean(t1, ENHANCING) < mean(t1, WHITE)
    assert mean(t1gd, ENHANCING) > mean(t1gd, NECROSIS)
    assert mean(t2, EDEMA) > mean(t2, WHITE) and mean(t2, CSF) > mean(t2, WHITE)
    assert (phantom.image[phantom.tissue == 0] == 0).all()  # background exactly 0, like BraTS
    assert ((phantom.label > 0) <= np.isin(phantom.tissue, (EDEMA, NECROSIS, ENHANCING))).all()


def test_tumour_stays_in_one_hemisphere_inside_the_brain():
    for seed in range(6):
        phantom = brats_phantom((64, 64, 48), np.random.default_rng(seed))
        x = np.nonzero(phantom.label)[0]  # the midline is within 2 voxels of x = 32
        assert x.size and not (x.min() < 30 and x.max() > 34)
        assert not np.isin(phantom.tissue[phantom.label > 0], (0, 1, 2)).any()  # never in scalp/skull


def test_full_size_phantom_has_the_brats_shape():
    phantom = brats_phantom((240, 240, 155), np.random.default_rng(0))
    assert phantom.image.shape == (240, 240, 155, 4) and phantom.label.sum() > 0


def test_smooth_field_is_smooth_and_normalised():
    field = smooth_field(np.random.default_rng(0), (40, 30, 20), 4)
    assert field.shape == (40, 30, 20) and field.dtype == np.float32
    assert abs(field.mean()) < 0.2 and 0.5 < field.std() < 1.5
    assert np.abs(np.diff(field, axis=0)).max() < 0.5


def test_random_kind_and_float32(tmp_path):
    out = write_dataset(tmp_path / "random", 1, 0, shape=(16, 16, 16), kind="random", dtype="float32", progress=False)
    image = nib.load(out / "imagesTr" / "BRATS_001.nii.gz")
    label = np.asanyarray(nib.load(out / "labelsTr" / "BRATS_001.nii.gz").dataobj)
    assert image.get_data_dtype() == np.float32 and image.shape == (16, 16, 16, 4)
    assert set(np.unique(label).tolist()) == {0, 1, 2, 3}
    assert load_dataset_json(out).test == ()
    assert check_dataset(out).ok


def test_refuses_foreign_folders_and_replaces_its_own(tmp_path):
    user_folder = tmp_path / "mine"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="not a previous `fullres synth` output"):
        write_dataset(user_folder, 1, shape=(16, 16, 16), progress=False)
    assert (user_folder / "notes.txt").read_text() == "precious"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        write_dataset(a_file, 1, shape=(16, 16, 16), progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    write_dataset(empty, 2, shape=(16, 16, 16), progress=False)
    write_dataset(empty, 1, shape=(16, 16, 16), progress=False)  # a previous synth output: replaced
    assert load_dataset_json(empty).training[0].case_id == "BRATS_001" and len(load_dataset_json(empty).training) == 1
    (empty / "imagesTr" / "mine.nii.gz").write_bytes(b"")
    with pytest.raises(UserError):
        write_dataset(empty, 1, shape=(16, 16, 16), progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("kwargs, match", [
    ({"train_cases": 0}, "--cases"), ({"test_cases": -1}, "--test-cases"), ({"shape": (4, 16, 16)}, "--shape"),
    ({"kind": "mri"}, "--kind"), ({"dtype": "uint8"}, "--dtype"), ({"seed": -1}, "--seed"),
])
def test_bad_options(tmp_path, kwargs, match):
    options = {"train_cases": 1, "shape": (16, 16, 16), "progress": False} | kwargs
    with pytest.raises(UserError, match=match):
        write_dataset(tmp_path / "out", **options)


# sha256 over (relative path, uncompressed NIfTI bytes) of every case file, written before the ct kind
# existed: adding kinds must not change a brats or random dataset (gzip is left out: zlib may vary).
GOLDEN = {
    ("brats", "msd"): "25545cd2d7928869c8088e56886d9cae917b4d80cc47fc7e81a44e8cbb3d8e5b",
    ("brats", "nnunet"): "4f7f047f9393801b2902f7779176de97dd66aebbce49839a6e9c04a03401d3b6",
    ("random", "msd"): "092fca347321e34121ba2fc16b1b2a94a283b2ed6910e5add63a0776a0c7c171",
}


@pytest.mark.parametrize("kind, layout", sorted(GOLDEN))
def test_brats_and_random_bytes_are_unchanged(tmp_path, kind, layout):
    import gzip
    import hashlib

    out = write_dataset(tmp_path / "out", 1, 1, shape=(24, 20, 16), seed=3, kind=kind, progress=False, layout=layout)
    digest = hashlib.sha256()
    for path in sorted(out.rglob("*.nii.gz")):
        digest.update(path.relative_to(out).as_posix().encode())
        digest.update(gzip.decompress(path.read_bytes()))
    assert digest.hexdigest() == GOLDEN[(kind, layout)]
