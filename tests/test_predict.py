"""Predict, evaluate and show on a tiny trained run: geometry round trip, the metrics contract, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fullres.run import predict as predict_module
from fullres.cli import main

TINY = ["--shape", "32", "32", "24", "--filters", "2", "--batch", "2", "--workers", "0", "--threads", "1",
        "--quiet", "--epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch run on a 33x30x26 dataset: shapes that need crop and pad to 32x32x24."""
    from fullres.data.synth import write_dataset

    root = tmp_path_factory.mktemp("predict")
    data = write_dataset(root / "msd", train_cases=3, test_cases=2, shape=(33, 30, 26), seed=5, progress=False)
    assert main(["train", str(data), "--out", str(root / "run"), *TINY]) == 0
    return data, root / "run"


def test_masks_overlay_the_original_images_exactly(trained, tmp_path, cli):
    data, run = trained
    code, out, err = cli("predict", run, data, "--out", tmp_path / "pred", "--probabilities", "--quiet")
    assert code == 0, err
    assert "whole volumes in one pass" in out
    for image_path in sorted((data / "imagesTs").glob("*.nii.gz")):
        image, mask = nib.load(image_path), nib.load(tmp_path / "pred" / image_path.name)
        assert mask.shape == image.shape[:3] == (33, 30, 26)
        np.testing.assert_array_equal(mask.affine, image.affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        probabilities = nib.load(tmp_path / "pred" / image_path.name.replace(".nii.gz", "_prob.nii.gz"))
        assert probabilities.shape == (33, 30, 26)
        # every voxel predicted, also the row and depth outside the 32x32x24 training shape (a sigmoid is > 0)
        assert (np.asarray(probabilities.dataobj) > 0).all()


def test_a_volume_larger_than_the_training_shape_is_predicted_whole(trained, tmp_path, cli):
    """A 40x36x20 input with a run trained at 32x32x24: padded to 40x40x24 (multiples of 8), predicted in one
    pass, every voxel in the mask's geometry."""
    from fullres.data.nifti import write_nifti

    data, run = trained
    image = np.asarray(nib.load(data / "imagesTs" / "BRATS_004.nii.gz").dataobj)
    large = np.zeros((40, 36, 20, image.shape[3]), image.dtype)
    large[:33, :30, :20] = image[:, :, :20]
    large[33:, :30] = image[25:32, :30, :20]  # brain-like voxels in the rows beyond the training shape
    write_nifti(tmp_path / "large.nii.gz", large, np.eye(4))
    code, out, err = cli("predict", run, tmp_path / "large.nii.gz", "--out", tmp_path / "pred", "--probabilities",
                         "--quiet")
    assert code == 0, err
    assert "whole volumes in one pass" in out
    probabilities = np.asarray(nib.load(tmp_path / "pred" / "large_prob.nii.gz").dataobj)
    assert probabilities.shape == (40, 36, 20) and (probabilities > 0).all()


def test_a_fixed_size_network_is_predicted_in_windows_of_its_shape():
    from types import SimpleNamespace

    from fullres.job.config import JobConfig
    from fullres.nets.registry import ModelConfig

    unetr = ModelConfig(architecture="monai:UNETR", in_channels=1, classes=1, args='{"feature_size": 4, '
                        '"hidden_size": 48, "mlp_dim": 96, "num_heads": 4}')
    job = JobConfig(model=unetr, shape=(32, 32, 32), batch=1)
    assert predict_module.fixed_input_shape(SimpleNamespace(job=job)) == (32, 32, 32)
    assert predict_module.fixed_input_shape(SimpleNamespace(job=JobConfig(shape=(32, 32, 32), batch=1))) is None


def test_sliding_windows_when_the_whole_volume_does_not_fit(trained, tmp_path, cli, monkeypatch):
    data, run = trained
    monkeypatch.setattr(predict_module, "available_memory", lambda device: 0)
    code, out, _ = cli("predict", run, data / "imagesTs" / "BRATS_004.nii.gz", "--out", tmp_path, "--quiet")
    assert code == 0 and "sliding windows" in out
    assert nib.load(tmp_path / "BRATS_004.nii.gz").shape == (33, 30, 26)


def test_evaluate_json_contract_and_csv(trained, tmp_path, cli):
    data, run = trained
    assert cli("predict", run, data, "--out", tmp_path / "pred", "--quiet")[0] == 0
    code, out, err = cli("evaluate", tmp_path / "pred", data / "labelsTs", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"cases", "summary"}
    assert set(result["cases"]) == {"BRATS_004", "BRATS_005"}
    assert set(result["cases"]["BRATS_004"]["WT"]) == {"dice", "nsd", "hd95"}
    assert set(result["summary"]["WT"]["dice"]) == {"mean", "std"}
    assert (tmp_path / "pred" / "metrics.csv").read_text().startswith("case,region,dice,nsd,hd95")


def test_show_draws_figure7(trained, tmp_path, cli):
    data, run = trained
    image = data / "imagesTs" / "BRATS_004.nii.gz"
    label = data / "labelsTs" / "BRATS_004.nii.gz"
    code, _, err = cli("show", image, "--pred", label, "--label", label, "--out", tmp_path / "f.png")
    assert code == 0, err
    from PIL import Image

    with Image.open(tmp_path / "f.png") as png:  # the figure itself: 12 x 4.8 inches at 100 dpi, drawn on
        assert png.format == "PNG" and png.size == (1200, 480), png.size
        colours = np.unique(np.asarray(png.convert("RGB")).reshape(-1, 3), axis=0)
        assert len(colours) > 50  # three views of an image, not a blank canvas
    code, _, err = cli("show", image, "--channel", "9", "--out", tmp_path / "g.png")
    assert code == 2 and "--channel 9" in err


def test_checkpoint_that_needs_code_is_refused(small_msd, tmp_path, cli):
    bad = tmp_path / "evil.pt"
    torch.save({"model": Path("x")}, bad)  # a pickled object: not loadable with weights_only=True
    code, _, err = cli("predict", bad, small_msd, "--out", tmp_path / "p")
    assert code == 2 and "evil.pt: not a loadable fullres checkpoint" in err and "Traceback" not in err


@pytest.mark.parametrize("make_input, message", [
    (lambda p: p / "missing.nii.gz", "no such file"),
    (lambda p: (p / "notes.txt").write_text("x") and p / "notes.txt", "not a NIfTI file"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no NIfTI images to predict"),
])
def test_bad_predict_inputs(trained, tmp_path, cli, make_input, message):
    _, run = trained
    code, _, err = cli("predict", run, make_input(tmp_path), "--out", tmp_path / "out")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_missing_run_is_refused(small_msd, tmp_path, cli):
    code, _, err = cli("predict", tmp_path / "nowhere", small_msd, "--out", tmp_path / "o")
    assert code == 2 and "no such run folder or checkpoint" in err


@pytest.mark.parametrize("strategy", [{"channels_last": True}, {"precision": "bf16", "checkpointing": True, "slabs": 2}])
def test_prediction_runs_in_the_runs_layout_and_precision(strategy):
    """Predict runs as validation did: the run's memory format and autocast precision (slabs and
    checkpointing are training-only), whole volume and sliding windows alike."""
    from fullres.job.config import JobConfig, Strategy
    from fullres.data.preprocess import DataConfig
    from fullres.nets.registry import ModelConfig
    from fullres.nets.unet3d import UNet3D
    from fullres.job.step import autocast
    from fullres.job.config import TrainConfig

    shape = (16, 16, 16)
    job = JobConfig(model=ModelConfig(in_channels=2, filters=2), shape=shape, batch=1, strategy=Strategy(**strategy))
    config = TrainConfig(job=job, data=DataConfig(channels=(0, 1), shape=shape), data_dir="unused")
    torch.manual_seed(0)
    model = UNet3D(job.model).eval()
    reference = UNet3D(job.model).eval()
    reference.load_state_dict(model.state_dict())
    predictor = predict_module.Predictor(predict_module.prepare_model(model, predict_module.inference_strategy(config)),
                                         config, Path("unused"))
    assert model.slabs == 1 and not model.checkpointing
    assert model.conv1a.weight.is_contiguous(memory_format=torch.channels_last_3d) == job.strategy.channels_last
    image = np.random.default_rng(0).standard_normal((2, 32, 16, 16)).astype(np.float32)
    with torch.no_grad(), autocast(job.strategy, "cpu"):
        expected = torch.sigmoid(reference(torch.from_numpy(image)[None]).float())[0].numpy()
    cpu = torch.device("cpu")
    whole = predict_module.predict_volume(predictor, image, cpu, whole=True)
    np.testing.assert_allclose(whole, expected, rtol=0, atol=1e-5)
    windows = predict_module.predict_volume(predictor, image, cpu, whole=False)
    assert windows.shape == expected.shape and np.isfinite(windows).all()


def test_an_image_with_nan_voxels_is_refused_not_predicted_empty(trained, tmp_path, cli):
    data, run = trained
    source = nib.load(data / "imagesTs" / "BRATS_004.nii.gz")
    array = np.asarray(source.dataobj, dtype=np.float32).copy()
    array[3, 4, 5, 0] = np.nan
    array[6, 7, 8, 1] = np.inf
    bad = tmp_path / "inputs" / "BRATS_NAN.nii.gz"
    bad.parent.mkdir()
    nib.save(nib.Nifti1Image(array, source.affine), bad)
    code, _, err = cli("predict", run, bad, "--out", tmp_path / "pred", "--quiet")
    assert code == 2 and f"{bad}: 2 voxels are NaN or infinite" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "pred" / "BRATS_NAN.nii.gz").exists()


# ---- data as users hold it: a BraTS case folder, a dataset's cases, labels read from a dataset -------------

@pytest.fixture(scope="module")
def brats_trained(tmp_path_factory):
    """A 1-epoch run on a BraTS 2021 folder: 3 labelled case folders, 1 test case in test/ (its label kept
    aside in labelsTs/)."""
    from fullres.data.synth import write_dataset

    root = tmp_path_factory.mktemp("brats")
    data = write_dataset(root / "brats", train_cases=3, test_cases=1, shape=(32, 32, 24), seed=4, progress=False,
                         layout="brats2021")
    assert main(["train", str(data), "--out", str(root / "run"), *TINY, "--tracker", "none"]) == 0
    return data, root / "run"


def test_a_brats_case_folder_is_one_case(brats_trained, tmp_path, cli):
    data, run = brats_trained
    case = data / "BraTS2021_00001"
    code, out, err = cli("predict", run, case, "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert "predicting 1 case(s)" in out
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["BraTS2021_00001.nii.gz", "prediction.json"]
    mask = nib.load(tmp_path / "pred" / "BraTS2021_00001.nii.gz")
    assert mask.shape == nib.load(case / "BraTS2021_00001_flair.nii.gz").shape
    assert json.loads((tmp_path / "pred" / "prediction.json").read_text())["layout"] == "brats2021"


def test_a_case_folder_missing_a_modality_is_refused(brats_trained, tmp_path, cli):
    import shutil

    data, run = brats_trained
    case = tmp_path / "BraTS2021_00001"
    shutil.copytree(data / "BraTS2021_00001", case)
    (case / "BraTS2021_00001_t1ce.nii.gz").unlink()
    code, _, err = cli("predict", run, case, "--out", tmp_path / "pred", "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "BraTS2021_00001_t1ce.nii.gz: missing" in err and "t1ce" in err
    assert not (tmp_path / "pred").exists()


def test_a_dataset_folder_predicts_its_test_cases_or_all(brats_trained, tmp_path, cli):
    data, run = brats_trained
    code, _, err = cli("predict", run, data, "--out", tmp_path / "test", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "test").glob("*.nii.gz")) == ["BraTS2021_00004.nii.gz"]
    code, _, err = cli("predict", run, data, "--cases", "all", "--out", tmp_path / "all", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "all").glob("*.nii.gz")) == [
        f"BraTS2021_0000{i}.nii.gz" for i in range(1, 5)]
    code, _, err = cli("predict", run, data, "--cases", "some", "--out", tmp_path / "x")
    assert code == 2 and "--cases" in err and not (tmp_path / "x").exists()


def test_a_labelled_dataset_without_test_cases_points_at_cases_all(brats_trained, tmp_path, cli):
    import shutil

    data, run = brats_trained
    copy = tmp_path / "brats"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns("test", "labelsTs", ".fullres_cache"))
    code, _, err = cli("predict", run, copy, "--out", tmp_path / "pred")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{copy}: no test cases" in err and "--cases all" in err and not (tmp_path / "pred").exists()


def test_evaluate_reads_the_labels_of_the_predicted_cases_from_a_dataset(brats_trained, tmp_path, cli):
    data, run = brats_trained
    assert cli("predict", run, data / "BraTS2021_00002", data, "--out", tmp_path / "pred", "--quiet")[0] == 0
    code, out, err = cli("evaluate", tmp_path / "pred", data, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["cases"]) == {"BraTS2021_00002", "BraTS2021_00004"}  # a training case and a test case
    # the same scores as against a flat folder of those labels
    flat = tmp_path / "labels"
    flat.mkdir()
    (flat / "BraTS2021_00002.nii.gz").write_bytes((data / "BraTS2021_00002" / "BraTS2021_00002_seg.nii.gz").read_bytes())
    (flat / "BraTS2021_00004.nii.gz").write_bytes((data / "labelsTs" / "BraTS2021_00004.nii.gz").read_bytes())
    code, out, err = cli("evaluate", tmp_path / "pred", flat, "--json", "--overwrite")
    assert code == 0, err
    assert json.loads(out) == result


@pytest.mark.parametrize("layout", ["msd", "nnunet"])
def test_evaluate_against_msd_and_nnunet_dataset_folders(tmp_path, cli, layout):
    """Labels copied as predictions score Dice 1, each read from the dataset by its case id."""
    from fullres.data.layouts import dataset_labels, load_dataset
    from fullres.data.synth import write_dataset

    data = write_dataset(tmp_path / "data", train_cases=2, test_cases=1, shape=(16, 16, 16), seed=2, progress=False,
                         layout=layout)
    labels = dataset_labels(load_dataset(data))
    pred = tmp_path / "pred"
    pred.mkdir()
    for case, path in list(labels.items())[:2]:
        (pred / f"{case}.nii.gz").write_bytes(path.read_bytes())
    code, out, err = cli("evaluate", pred, data, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result["cases"]) == set(list(labels)[:2])
    assert all(region["dice"] == 1.0 for case in result["cases"].values() for region in case.values())
    (pred / "stranger.nii.gz").write_bytes(next(iter(labels.values())).read_bytes())
    code, _, err = cli("evaluate", pred, data, "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "stranger.nii.gz: the dataset has no label for case stranger" in err


# ---- ensembles -----------------------------------------------------------------------------------------------

def test_an_ensemble_averages_the_runs_probabilities(trained, tmp_path, cli):
    data, run = trained
    other = tmp_path / "other"
    assert main(["train", str(data), "--out", str(other), *TINY, "--seed", "1", "--tracker", "none"]) == 0
    for name, runs in (("a", [run]), ("b", [other]), ("ab", [run, "--ensemble", other])):
        code, out, err = cli("predict", runs[0], data, *runs[1:], "--out", tmp_path / name, "--probabilities",
                             "--quiet")
        assert code == 0, err
    assert "ensemble of 2 runs" in out
    for case in ("BRATS_004", "BRATS_005"):
        a, b, ab = (np.asarray(nib.load(tmp_path / name / f"{case}_prob.nii.gz").dataobj) for name in ("a", "b", "ab"))
        assert not np.allclose(a, b)  # two different networks
        np.testing.assert_allclose(ab, (a + b) / 2, rtol=0, atol=1e-6)
        mask = np.asarray(nib.load(tmp_path / "ab" / f"{case}.nii.gz").dataobj)
        np.testing.assert_array_equal(mask, (ab > 0.5).astype(np.uint8))
    assert len(json.loads((tmp_path / "ab" / "prediction.json").read_text())["ensemble"]) == 2


def test_an_ensemble_of_disagreeing_runs_is_refused(trained, tmp_path, cli):
    data, run = trained
    regions = tmp_path / "regions"
    assert main(["train", str(data), "--out", str(regions), *TINY, "--target", "regions", "--tracker", "none"]) == 0
    code, _, err = cli("predict", run, data, "--ensemble", regions, "--out", tmp_path / "pred")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--ensemble {regions}: its target regions differs" in err and "wt" in err
    assert not (tmp_path / "pred").exists()
    code, _, err = cli("predict", run, data, "--ensemble", tmp_path / "nowhere", "--out", tmp_path / "pred")
    assert code == 2 and "nowhere: no such run folder or checkpoint" in err and not (tmp_path / "pred").exists()


def test_a_brats_run_scores_its_validation_cases_lesion_wise(brats_trained):
    """Training ends with the default split's validation cases predicted in the BraTS values and scored,
    lesion-wise too."""
    _, run = brats_trained
    (split,) = json.loads((run / "splits.json").read_text())
    summary = json.loads((run / "validation" / "summary.json").read_text())
    assert summary["layout"] == "brats2021" and summary["lesion_wise"] == "BraTS-GLI"
    assert set(summary["cases"]) == set(split["val"])
    assert {"dice", "nsd", "hd95", "lesion_dice", "lesion_hd95"} <= set(summary["mean"]["WT"])
    for case in split["val"]:
        values = set(np.unique(np.asarray(nib.load(run / "validation" / f"{case}.nii.gz").dataobj)).tolist())
        assert values <= {0, 1}  # a whole-tumour run's masks
