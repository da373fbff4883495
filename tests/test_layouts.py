"""Dataset layouts: MSD, nnU-Net v2, BraTS 2021, BraTS 2023: reading, regions, check, synth, convert, predict."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fullres.data.msd import MSDDataset, resolve_channels
from fullres.data.preprocess import DataConfig
from fullres.data.check import check_dataset
from fullres.data.layouts import detect_layout, load_dataset
from fullres.data.layouts import label_roles, value_map
from fullres.data.nifti import write_nifti
from fullres.data.synth import write_dataset
from fullres.evaluate.metrics import region_masks

SHAPE = (16, 16, 16)
LAYOUT_NAMES = ("msd", "nnunet", "brats2021", "brats2023")
REGIONS = {
    "msd": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
    "nnunet": {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)},
    "brats2021": {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)},
    "brats2023": {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)},
}
LABEL = {  # a training label file of case 2, per layout
    "nnunet": "labelsTr/BRATS_002.nii.gz",
    "brats2021": "BraTS2021_00002/BraTS2021_00002_seg.nii.gz",
    "brats2023": "BraTS-GLI-00002-000/BraTS-GLI-00002-000-seg.nii.gz",
}
FLAIR = {  # the FLAIR file of case 2
    "nnunet": "imagesTr/BRATS_002_0000.nii.gz",
    "brats2021": "BraTS2021_00002/BraTS2021_00002_flair.nii.gz",
    "brats2023": "BraTS-GLI-00002-000/BraTS-GLI-00002-000-t2f.nii.gz",
}
T2 = {
    "nnunet": "imagesTr/BRATS_002_0003.nii.gz",
    "brats2021": "BraTS2021_00002/BraTS2021_00002_t2.nii.gz",
    "brats2023": "BraTS-GLI-00002-000/BraTS-GLI-00002-000-t2w.nii.gz",
}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """The same 3 + 1 phantoms in every layout (read-only: copy to modify)."""
    root = tmp_path_factory.mktemp("layouts")
    return {layout: write_dataset(root / layout, train_cases=3, test_cases=1, shape=SHAPE, seed=3, progress=False,
                                  layout=layout) for layout in LAYOUT_NAMES}


@pytest.fixture
def copy_of(datasets, tmp_path):
    def copy(layout):
        return shutil.copytree(datasets[layout], tmp_path / layout, ignore=shutil.ignore_patterns(".fullres_cache"))
    return copy


def _read(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image.affine


# --- reading, regions and label mapping ------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_each_layout_is_detected_and_read(datasets, layout):
    root = datasets[layout]
    assert detect_layout(root) == layout
    index = load_dataset(root)
    assert index.layout == layout and index.regions == REGIONS[layout]
    assert len(index.training) == 3 and len(index.test) == 1
    for case in index.training:  # every path lies inside the dataset folder
        files = case.image if isinstance(case.image, tuple) else (case.image,)
        assert all(f.resolve().is_relative_to(root.resolve()) and f.is_file() for f in (*files, case.label))
    assert resolve_channels("FLAIR,T1c", index.modalities) == (0, 2)  # names across layouts
    assert resolve_channels("t2f,t1ce,T2w", index.modalities) == (0, 2, 3)


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_the_same_phantoms_give_the_same_region_masks_in_every_layout(datasets, layout):
    reference = load_dataset(datasets["msd"])
    index = load_dataset(datasets[layout])
    for msd_case, case in zip(reference.training, index.training):
        msd_label, label = _read(msd_case.label)[0], _read(case.label)[0]
        assert set(np.unique(label).tolist()) <= set(index.labels)
        expected, found = region_masks(msd_label, reference.regions), region_masks(label, index.regions)
        for region in ("WT", "TC", "ET"):
            np.testing.assert_array_equal(expected[region], found[region])


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_training_targets_come_from_the_layouts_labels(datasets, layout, tmp_path):
    reference = MSDDataset.from_index(load_dataset(datasets["msd"]), DataConfig(target="regions", shape=SHAPE),
                                      cache_dir=tmp_path / "a")
    dataset = MSDDataset.from_index(load_dataset(datasets[layout]), DataConfig(target="regions", shape=SHAPE),
                                    cache_dir=tmp_path / "b")
    for i in range(3):
        (image_a, target_a), (image_b, target_b) = reference[i], dataset[i]
        assert target_b.shape == (3, *SHAPE)
        assert np.array_equal(target_a.numpy(), target_b.numpy()) and np.allclose(image_a.numpy(), image_b.numpy())
    classes = MSDDataset.from_index(load_dataset(datasets[layout]), DataConfig(target="classes", shape=SHAPE),
                                    cache_dir=tmp_path / "c")
    assert set(np.unique(classes[0][1].numpy()).tolist()) <= {0, 1, 2, 3}  # 0, 1, 2, 4 are classes 0..3


def test_label_roles_and_value_maps():
    assert label_roles(REGIONS["brats2021"]) == {1: "core", 2: "edema", 4: "enhancing"}
    assert value_map(REGIONS["msd"], REGIONS["brats2021"], [0, 1, 2, 3]) == {0: 0, 1: 2, 2: 1, 3: 4}
    assert value_map(REGIONS["brats2023"], REGIONS["msd"], [0, 1, 2, 3]) == {0: 0, 1: 2, 2: 1, 3: 3}


def test_nnunet_region_based_labels(copy_of):
    root = copy_of("nnunet")
    raw = json.loads((root / "dataset.json").read_text())
    raw["labels"] = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    raw["regions_class_order"] = [1, 2, 3]
    (root / "dataset.json").write_text(json.dumps(raw))
    index = load_dataset(root)
    assert index.regions == {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)} and sorted(index.labels) == [0, 1, 2, 3]
    assert check_dataset(root).ok


def test_forced_layout_and_unknown_layout(datasets):
    from fullres.errors import UserError

    with pytest.raises(UserError, match="dataset.json: not found"):
        load_dataset(datasets["brats2021"], layout="msd")
    with pytest.raises(UserError, match="--layout must be one of"):
        load_dataset(datasets["msd"], layout="kits")


def test_symlinked_file_leaving_the_folder_is_refused(copy_of, tmp_path):
    from fullres.errors import UserError

    root = copy_of("brats2021")
    outside = tmp_path / "outside.nii.gz"
    shutil.copy(root / FLAIR["brats2021"], outside)
    (root / FLAIR["brats2021"]).unlink()
    (root / FLAIR["brats2021"]).symlink_to(outside)
    with pytest.raises(UserError, match="leaves the dataset folder"):
        load_dataset(root)
    assert any("leaves the dataset folder" in line for line in check_dataset(root).lines())


# --- check ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUT_NAMES)
def test_synth_then_check_is_clean(datasets, layout, cli):
    code, out, err = cli("check", datasets[layout])
    assert code == 0 and out.strip() == "checked 4 cases: 0 problems, 0 warnings", out + err


def _missing_modality(root, layout):
    (root / T2[layout]).unlink()
    return T2[layout], "missing: case"


def _shape_disagrees(root, layout):
    data, affine = _read(root / T2[layout])
    write_nifti(root / T2[layout], data[:, :, :12], affine)
    return T2[layout], "shape (16, 16, 12) != "


def _affine_disagrees(root, layout):
    data, affine = _read(root / T2[layout])
    shifted = affine.copy()
    shifted[1, 3] += 3
    write_nifti(root / T2[layout], data, shifted)
    return T2[layout], "affine differs from"


def _label_value_outside(root, layout):
    data, affine = _read(root / LABEL[layout])
    data[0, 0, 0] = 7
    write_nifti(root / LABEL[layout], data, affine)
    return LABEL[layout], "label values 7 are not declared in"


def _no_label(root, layout):
    (root / LABEL[layout]).unlink()
    return LABEL[layout], "has no label"


@pytest.mark.parametrize("layout", ("nnunet", "brats2021", "brats2023"))
@pytest.mark.parametrize("break_it", [_missing_modality, _shape_disagrees, _affine_disagrees, _label_value_outside,
                                      _no_label])
def test_each_broken_case_gives_one_line(copy_of, layout, break_it, cli):
    root = copy_of(layout)
    path, message = break_it(root, layout)
    code, out, err = cli("check", root)
    lines = out.strip().splitlines()
    assert code == 1 and "Traceback" not in err
    assert len(lines) == 2 and lines[0].startswith(f"ERROR {path}: ") and message in lines[0], lines
    assert lines[1].endswith("1 problem, 0 warnings")


def test_nnunet_specific_problems(copy_of, cli):
    root = copy_of("nnunet")
    (root / "imagesTr/BRATS_003_0001.nii.gz").unlink()
    raw = json.loads((root / "dataset.json").read_text())
    raw["numTraining"] = 5
    (root / "dataset.json").write_text(json.dumps(raw))
    code, out, _ = cli("check", root)
    lines = out.strip().splitlines()
    assert code == 1
    assert "ERROR imagesTr/BRATS_003_0001.nii.gz: missing: case BRATS_003 has channel files 0000, 0002, 0003 " \
           "but not 0001" in lines
    assert "ERROR dataset.json: 'numTraining' is 5 but imagesTr/ holds 3 cases" in lines
    assert lines[-1].endswith("2 problems, 0 warnings")


def test_check_with_forced_layout(datasets, cli):
    code, out, _ = cli("check", datasets["brats2023"], "--layout", "brats2021")
    assert code == 1 and "no BraTS 2021 case folders" in out


# --- synth and convert -------------------------------------------------------------------------------


def test_synth_replaces_its_own_output_in_any_layout(datasets, tmp_path):
    out = write_dataset(tmp_path / "d", 1, 1, shape=SHAPE, progress=False, layout="brats2023")
    (out / "BraTS-GLI-00001-000" / "mine.txt").write_text("user file")
    from fullres.errors import UserError

    with pytest.raises(UserError, match="not a previous `fullres synth` output"):
        write_dataset(out, 1, 1, shape=SHAPE, progress=False, layout="brats2021")
    (out / "BraTS-GLI-00001-000" / "mine.txt").unlink()
    write_dataset(out, 1, 1, shape=SHAPE, progress=False, layout="brats2021")
    assert detect_layout(out) == "brats2021"


def test_convert_round_trip_msd_brats2021_msd(datasets, tmp_path, cli):
    msd = datasets["msd"]
    code, out, err = cli("convert", msd, tmp_path / "b21", "--layout", "brats2021", "--quiet")
    assert code == 0, err
    assert load_dataset(tmp_path / "b21").layout == "brats2021"
    assert check_dataset(tmp_path / "b21").ok
    seg = _read(tmp_path / "b21/BraTS2021_00001/BraTS2021_00001_seg.nii.gz")[0]
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 4} and 4 in seg
    code, out, err = cli("convert", tmp_path / "b21", tmp_path / "back", "--layout", "msd", "--quiet")
    assert code == 0, err
    for case in ("BRATS_001", "BRATS_002", "BRATS_003"):
        for folder in ("labelsTr", "imagesTr"):
            a, affine_a = _read(msd / folder / f"{case}.nii.gz")
            b, affine_b = _read(tmp_path / "back" / folder / f"{case}.nii.gz")
            assert a.dtype == b.dtype and np.array_equal(a, b) and np.allclose(affine_a, affine_b)
    assert np.array_equal(_read(msd / "labelsTs/BRATS_004.nii.gz")[0],
                          _read(tmp_path / "back/labelsTs/BRATS_004.nii.gz")[0])
    assert check_dataset(tmp_path / "back").ok


@pytest.mark.parametrize("source, target", [("brats2023", "nnunet"), ("nnunet", "brats2023"), ("msd", "brats2023")])
def test_convert_between_other_layouts_keeps_regions(datasets, tmp_path, source, target, cli):
    code, _, err = cli("convert", datasets[source], tmp_path / "out", "--layout", target, "--quiet")
    assert code == 0, err
    a, b = load_dataset(datasets[source]), load_dataset(tmp_path / "out")
    for case_a, case_b in zip(a.training, b.training):
        masks_a = region_masks(_read(case_a.label)[0], a.regions)
        masks_b = region_masks(_read(case_b.label)[0], b.regions)
        assert all(np.array_equal(masks_a[r], masks_b[r]) for r in masks_a)


def test_convert_refuses_a_non_empty_out(datasets, tmp_path, cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    code, _, err = cli("convert", datasets["msd"], tmp_path / "out", "--layout", "nnunet")
    assert code == 2 and "exists and is not empty" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]


# --- predict naming and evaluate ---------------------------------------------------------------------


TINY = ["--shape", "16", "16", "16", "--filters", "2", "--batch", "1", "--workers", "0", "--threads", "1",
        "--quiet", "--epochs", "1", "--force", "--no-autotune"]


@pytest.fixture(scope="module")
def run(datasets, tmp_path_factory):
    """A 1-epoch 'regions' run on the BraTS 2021 phantoms."""
    from fullres.cli import main

    out = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", str(datasets["brats2021"]), "--out", str(out), "--target", "regions", *TINY]) == 0
    return out


@pytest.mark.parametrize("layout, name, values", [
    ("brats2021", "BraTS2021_00004.nii.gz", {0, 1, 2, 4}),
    ("brats2023", "BraTS-GLI-00004-000.nii.gz", {0, 1, 2, 3}),
    ("nnunet", "BRATS_004.nii.gz", {0, 1, 2, 3}),
    ("msd", "BRATS_004.nii.gz", {0, 1, 2, 3}),
])
def test_predict_writes_each_layouts_names_and_values(run, datasets, tmp_path, layout, name, values, cli):
    code, out, err = cli("predict", run, datasets[layout], "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.nii.gz")) == [name]
    mask = nib.load(tmp_path / "pred" / name)
    index = load_dataset(datasets[layout])
    first = index.test[0].image[0] if isinstance(index.test[0].image, tuple) else index.test[0].image
    source = nib.load(first)
    assert mask.shape == source.shape[:3] and np.allclose(mask.affine, source.affine)
    assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= values
    info = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    assert info["layout"] == layout and info["regions"] == {k: list(v) for k, v in REGIONS[layout].items()}
    # evaluate scores with those values (BraTS 2021: ET is label 4), from prediction.json
    code, out, err = cli("evaluate", tmp_path / "pred", datasets[layout] / "labelsTs", "--json")
    assert code == 0, err
    assert set(json.loads(out)["cases"][name.replace(".nii.gz", "")]) == {"WT", "TC", "ET"}


def test_evaluate_knows_brats2021_labels_without_prediction_json(datasets, tmp_path, cli):
    labels = datasets["brats2021"] / "labelsTs"
    shutil.copytree(labels, tmp_path / "pred")  # a perfect prediction, no prediction.json
    for argv in ([], ["--layout", "brats2021"]):
        code, out, err = cli("evaluate", tmp_path / "pred", labels, "--json", *argv)
        assert code == 0, err
        scores = json.loads(out)["cases"]["BraTS2021_00004"]
        assert scores["ET"]["dice"] == 1.0 and scores["TC"]["dice"] == 1.0
    code, out, _ = cli("evaluate", tmp_path / "pred", labels)
    assert "labels as brats2021 (WT = {1, 2, 4}, TC = {1, 4}, ET = {4})" in out
    # a prediction that calls the enhancing tumour 3 (MSD's value) is refused under BraTS 2021, not scored
    mask, affine = _read(tmp_path / "pred" / "BraTS2021_00004.nii.gz")
    assert (mask == 4).any()
    write_nifti(tmp_path / "pred" / "BraTS2021_00004.nii.gz", np.where(mask == 4, 3, mask).astype(np.uint8), affine)
    code, out, err = cli("evaluate", tmp_path / "pred", labels, "--json")
    assert code == 2 and "label value(s) [3] outside the declared [0, 1, 2, 4]" in err, err


def test_output_labels_in_each_layouts_values(datasets):
    from fullres.run.predict import output_labels

    msd, brats = load_dataset(datasets["msd"]), load_dataset(datasets["brats2021"])
    nested = np.array([0, 1, 2, 3], dtype=np.uint8)  # labels_from_probabilities: edema, core, enhancing
    assert output_labels(nested, "regions", msd, msd.regions, True).tolist() == [0, 1, 2, 3]
    assert output_labels(nested, "regions", msd, brats.regions, False).tolist() == [0, 2, 1, 4]
    assert output_labels(nested[:2], "wt", msd, brats.regions, False).tolist() == [0, 1]
    classes = np.array([0, 1, 2, 3], dtype=np.uint8)  # class k = the k-th label value of the training data
    assert output_labels(classes, "classes", brats, brats.regions, True).tolist() == [0, 1, 2, 4]
    assert output_labels(classes, "classes", brats, msd.regions, False).tolist() == [0, 2, 1, 3]
    assert output_labels(classes, "classes", None, msd.regions, True).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("layout", ["nnunet", "brats2023", "msd"])
def test_every_layout_trains_and_its_run_predicts_in_it(datasets, tmp_path, layout, cli):
    """synth -> check -> train -> predict -> evaluate in each layout (brats2021: the `run` fixture)."""
    out = tmp_path / "run"
    code, _, err = cli("train", datasets[layout], "--out", out, "--target", "classes", *TINY)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["layout"] == layout
    code, _, err = cli("predict", out, datasets[layout], "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    code, stdout, err = cli("evaluate", tmp_path / "pred", datasets[layout] / "labelsTs", "--json")
    assert code == 0, err
    assert set(next(iter(json.loads(stdout)["cases"].values()))) == {"WT", "TC", "ET"}
    code, _, err = cli("train", "--out", out, "--resume", "--layout", "msd" if layout != "msd" else "nnunet")
    assert code == 2 and "--layout" in err and "differs from the run's" in err
