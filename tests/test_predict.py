"""Predict, evaluate and show on a tiny trained run: geometry round trip, the metrics contract, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fullres import predict as predict_module
from fullres.cli import main

TINY = ["--shape", "32", "32", "24", "--filters", "2", "--batch", "2", "--workers", "0", "--threads", "1",
        "--quiet", "--epochs", "1"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch run on a 33x30x26 dataset: shapes that need crop and pad to 32x32x24."""
    from fullres.data import write_dataset

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
    assert code == 0, err and (tmp_path / "f.png").stat().st_size > 1000
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
