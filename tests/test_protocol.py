"""The training protocol for real data: resampling to a spacing, CT intensities, random foreground windows."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fullres.data.augment import AugmentedDataset
from fullres.data.cache import load_case_image, preprocess_training_case
from fullres.data.fingerprint import ct_statistics, median_spacing, resolve_spacing
from fullres.data.layouts import load_dataset
from fullres.data.preprocess import (DataConfig, needs_resampling, normalize_ct, resample, resampled_shape,
                                     sample_crop_box)
from fullres.errors import UserError
from fullres.job.config import JobConfig, TrainConfig
from fullres.nets.registry import ModelConfig


def write_case(path: Path, array: np.ndarray, spacing) -> None:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def tiny_dataset(root: Path, spacings, modality: str = "CT", shape=(12, 10, 6), seed: int = 0) -> Path:
    """An MSD folder of one-channel cases at the given spacings: air -1000, a body at ~40, a lesion at ~90."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i, spacing in enumerate(spacings):
        image = np.full(shape, -1000.0, np.float32)
        image[2:-2, 2:-2, 1:-1] = 40 + rng.normal(0, 10, (shape[0] - 4, shape[1] - 4, shape[2] - 2))
        label = np.zeros(shape, np.uint8)
        label[4:7, 4:6, 2:4] = 1
        image[label == 1] += 50
        write_case(root / "imagesTr" / f"c{i}.nii.gz", image[..., None], spacing)  # MSD: 4D images
        write_case(root / "labelsTr" / f"c{i}.nii.gz", label, spacing)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "tiny", "modality": {"0": modality}, "labels": {"0": "background", "1": "lesion"},
        "numTraining": len(training), "training": training, "test": []}))
    return root


def test_resampled_shape_keeps_the_physical_extent_in_whole_voxels():
    assert resampled_shape((240, 240, 50), (0.8, 0.8, 2.5), (1.0, 1.0, 1.0)) == (192, 192, 125)
    assert resampled_shape((3, 3, 3), (1.0, 1.0, 1.0), (10.0, 10.0, 10.0)) == (1, 1, 1)
    assert not needs_resampling((1.0, 1.0, 1.0005), (1.0, 1.0, 1.0))
    assert needs_resampling((1.0, 1.0, 1.01), (1.0, 1.0, 1.0))
    assert not needs_resampling((0.5, 2.0, 3.0), None)


def test_resample_images_linearly_and_labels_by_nearest_voxel():
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[None, None, None, :], (1, 4, 4, 8)).copy()
    assert resample(ramp, (4, 4, 8)) is ramp  # the identity
    halved = resample(ramp, (4, 4, 4))
    np.testing.assert_allclose(halved[0, 0, 0], [0.5, 2.5, 4.5, 6.5], atol=1e-5)  # voxel centres, averaged
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2], labels[2:, :, :2] = 4, 2
    doubled = resample(labels, (8, 8, 8), labels=True)
    assert doubled.dtype == np.uint8 and set(np.unique(doubled)) == {0, 2, 4}
    np.testing.assert_array_equal(doubled[::2, ::2, ::2], labels)


def test_data_config_round_trips_and_old_configs_keep_their_meaning():
    config = DataConfig(channels=(0,), shape=(16, 16, 8), spacing=(0.8, 0.8, 2.5),
                        ct=((-100.0, 200.0, 40.0, 30.0),), crop="foreground")
    assert DataConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = DataConfig.from_json({"channels": [0, 1], "target": "wt", "shape": [8, 8, 8], "normalize": True})
    assert (old.spacing, old.ct, old.crop) == (None, (), "center")
    with pytest.raises(ValueError, match="ct statistics are given for 1 channels, but 2"):
        DataConfig(channels=(0, 1), ct=((0.0, 1.0, 0.0, 1.0),))
    with pytest.raises(ValueError, match="spacing must be three positive"):
        DataConfig(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="crop must be one of center, foreground"):
        DataConfig(crop="random")


def test_a_saved_run_with_a_bad_spacing_is_refused_naming_the_field(tmp_path):
    good = DataConfig(channels=(0,), shape=(16, 16, 16)).to_json()
    job = JobConfig(model=ModelConfig(in_channels=1, filters=2), shape=(16, 16, 16), batch=1)
    config = {"job": job.to_json(), "data": {**good, "spacing": [1, -1, 1]}, "data_dir": str(tmp_path)}
    with pytest.raises(UserError, match=r"config\.data: spacing must be three positive sizes"):
        TrainConfig.from_json(config)
    with pytest.raises(UserError, match=r"config\.data\.ct: expected a list"):
        TrainConfig.from_json({**config, "data": {**good, "ct": "yes"}})


def test_ct_is_clipped_and_standardised_with_the_datasets_numbers():
    channel = np.array([-1000.0, 0.0, 40.0, 2000.0], np.float32)
    np.testing.assert_allclose(normalize_ct(channel, (-50.0, 150.0, 40.0, 20.0)), [-4.5, -2.0, 0.0, 5.5])


def test_fingerprint_median_spacing_and_ct_statistics_of_the_foreground(tmp_path):
    root = tiny_dataset(tmp_path / "ds", [(1.0, 1.0, 2.0), (1.0, 1.0, 3.0), (2.0, 1.0, 3.0)])
    index = load_dataset(root)
    assert median_spacing(index) == (1.0, 1.0, 3.0)
    assert resolve_spacing(["auto"], index) == (1.0, 1.0, 3.0)
    assert resolve_spacing(["none"], index) is None
    assert resolve_spacing(["0.5", "0.5", "2"], index) == (0.5, 0.5, 2.0)
    with pytest.raises(UserError, match="--spacing 1 2: give auto, none, or three positive sizes"):
        resolve_spacing(["1", "2"], index)
    (low, high, mean, std), = ct_statistics(index, (0,))
    voxels = np.concatenate([np.asarray(nib.load(root / "imagesTr" / f"c{i}.nii.gz").dataobj)[
        np.asarray(nib.load(root / "labelsTr" / f"c{i}.nii.gz").dataobj) > 0] for i in range(3)]).astype(np.float64)
    assert voxels.size < 10_000  # every foreground voxel is drawn: the statistics are exact
    np.testing.assert_allclose([low, high, mean, std], [*np.percentile(voxels, (0.5, 99.5)), voxels.mean(), voxels.std()])
    assert ct_statistics(load_dataset(tiny_dataset(tmp_path / "mr", [(1.0, 1.0, 1.0)], modality="FLAIR")), (0,)) == ()


def test_training_cases_are_resampled_and_predict_inputs_keep_their_own_grid(tmp_path):
    root = tiny_dataset(tmp_path / "ds", [(1.0, 1.0, 2.0)])
    index = load_dataset(root)
    stats = ct_statistics(index, (0,))
    config = DataConfig(channels=(0,), shape=(8, 8, 8), spacing=(1.0, 1.0, 1.0), ct=stats)
    case = index.training[0]
    image, label, box = preprocess_training_case(case.image, case.label, config)
    assert image.shape == (1, 8, 8, 8) and box.original_shape == (12, 10, 12)  # depth 6 at 2 mm -> 12 at 1 mm
    assert set(np.unique(label)) == {0, 1}
    assert image.min() == pytest.approx((stats[0][0] - stats[0][2]) / stats[0][3])  # air clipped to the low end
    whole, box, source = load_case_image(case.image, config, divisor=4)
    assert whole.shape == (1, 12, 12, 12) and box.original_shape == (12, 10, 12)
    assert source.shape[:3] == (12, 10, 6)  # the grid the prediction is resampled back to
    kept = replace(config, crop="foreground")
    image, label, box = preprocess_training_case(case.image, case.label, kept)
    assert image.shape == (1, 12, 10, 12) and label.shape == (12, 10, 12)  # whole, for the sampler to cut from


def test_random_windows_stay_inside_and_a_third_hold_the_foreground():
    foreground = np.zeros((40, 40, 40), bool)
    foreground[39, 0, 39] = True  # one voxel in a corner: a uniform window holds it 1/27 of the time
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(600):
        box = sample_crop_box((40, 40, 40), foreground, (14, 14, 14), rng)
        assert all(0 <= s.start and s.stop <= 40 and s.stop - s.start == 14 for s in box)
        hits += bool(foreground[box].any())
    assert 0.30 < hits / 600 < 0.45  # a third centred on it, plus the uniform ones that happen to hold it
    again = [sample_crop_box((40, 40, 40), foreground, (14, 14, 14), np.random.default_rng(7)) for _ in range(2)]
    assert again[0] == again[1]


class Whole(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        image = torch.arange(24 * 20 * 16, dtype=torch.float32).reshape(1, 24, 20, 16)
        target = torch.zeros(1, 24, 20, 16)
        target[0, 20:, 15:, 12:] = 1
        return image, target


def test_the_sampler_cuts_each_sample_by_its_seed_epoch_and_index():
    data = AugmentedDataset(Whole(), "none", seed=3, window=(8, 8, 8))
    image, target = data[0, 1]
    assert image.shape == (1, 8, 8, 8) and target.shape == (1, 8, 8, 8)
    first = data[0, 1][0]
    assert torch.equal(first, image)  # the same key, the same window
    starts = {int(data[epoch, 1][0].flatten()[0]) for epoch in range(12)}
    assert len(starts) > 3  # other epochs, other windows
    flat = torch.arange(24 * 20 * 16, dtype=torch.float32).reshape(24, 20, 16)
    corner = int(image[0, 0, 0, 0])
    h, rest = divmod(corner, 20 * 16)
    w, d = divmod(rest, 16)
    assert torch.equal(image[0], flat[h:h + 8, w:w + 8, d:d + 8])  # a window of the volume, not a resampling


CT_JOB = ["--channels", "all", "--shape", "16", "16", "8", "--filters", "2", "--batch", "1", "--norm", "instance",
          "--workers", "0", "--threads", "1", "--quiet", "--device", "cpu", "--epochs", "1", "--no-autotune"]


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory) -> Path:
    """4 + 1 synthetic CT cases of differing anisotropic spacings, larger than the 16x16x8 window."""
    from fullres.data.synth import write_dataset

    return write_dataset(tmp_path_factory.mktemp("ct") / "ct", train_cases=4, test_cases=1, shape=(24, 24, 10),
                         seed=3, kind="ct", progress=False)


@pytest.fixture(scope="module")
def ct_run(ct_data, tmp_path_factory) -> Path:
    """One epoch on random 16x16x8 windows at the median spacing (written once; copy it to change it)."""
    from fullres.cli import main

    run = tmp_path_factory.mktemp("ct_run") / "run"
    assert main([str(a) for a in ("train", ct_data, "--out", run, *CT_JOB, "--spacing", "auto",
                                  "--crop", "foreground")]) == 0
    return run


def test_a_ct_run_trains_at_the_median_spacing_and_predicts_on_each_inputs_own_grid(ct_data, ct_run, tmp_path, cli):
    data = json.loads((ct_run / "config.json").read_text())["data"]
    assert tuple(data["spacing"]) == median_spacing(load_dataset(ct_data)) and data["crop"] == "foreground"
    (stats,) = data["ct"]
    assert stats[0] < stats[2] < stats[1] and stats[3] > 0  # low < mean < high, from the lesions' voxels
    code, out, err = cli("predict", ct_run, ct_data, "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert "sliding windows of 16x16x8" in out and "trained on random 16x16x8 windows" in out
    (test_image,) = sorted((ct_data / "imagesTs").glob("*.nii.gz"))
    source, mask = nib.load(test_image), nib.load(tmp_path / "pred" / test_image.name)
    assert mask.shape == source.shape[:3]  # back on the input's own grid, every voxel predicted
    np.testing.assert_allclose(mask.affine, source.affine)
    assert source.header.get_zooms()[:3] != tuple(data["spacing"])  # so the prediction was resampled back


def test_a_dynamic_export_of_a_window_trained_run_predicts_in_its_windows(ct_data, ct_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(ct_run, run)
    code, out, err = cli("export", run, "--format", "onnx", "--dynamic")
    assert code == 0, err
    code, out, err = cli("predict", run, ct_data, "--out", tmp_path / "pred", "--quiet", "--engine", "onnx")
    assert code == 0, err
    assert "in windows of 16x16x8" in out
    torch_code, _, err = cli("predict", run, ct_data, "--out", tmp_path / "torch", "--quiet")
    assert torch_code == 0, err
    (name,) = [p.name for p in (tmp_path / "torch").glob("*.nii.gz")]
    agree = np.mean(np.asarray(nib.load(tmp_path / "pred" / name).dataobj)
                    == np.asarray(nib.load(tmp_path / "torch" / name).dataobj))
    assert agree > 0.999  # the same windows, the same blending: the same masks up to float rounding


def test_resume_with_another_spacing_is_refused_and_changes_nothing(ct_run, tmp_path, cli):
    run = tmp_path / "run"
    shutil.copytree(ct_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    code, out, err = cli("train", "--out", run, "--resume", "--epochs", "2", "--spacing", "none")
    assert code != 0 and "--resume: --spacing none differs from the run's" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("flags, message", [
    (["--spacing", "1", "2"], "--spacing 1 2: give auto, none, or three positive sizes in mm"),
    (["--spacing", "0", "1", "1"], "--spacing 0 1 1: give auto, none, or three positive sizes in mm"),
    (["--crop", "random"], "argument --crop: invalid choice"),
])
def test_bad_protocol_flags_are_refused_in_one_line_and_nothing_is_made(ct_data, tmp_path, cli, flags, message):
    code, out, err = cli("train", ct_data, "--out", tmp_path / "run", *CT_JOB, *flags)
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_ct_statistics_are_read_once_per_dataset_and_again_when_a_file_changes(tmp_path, monkeypatch):
    from fullres.data import fingerprint

    root = tiny_dataset(tmp_path / "ds", [(1.0, 1.0, 2.0), (1.0, 1.0, 3.0)])
    first = ct_statistics(load_dataset(root), (0,))
    reads = []
    real = fingerprint.read_image_channels_first
    monkeypatch.setattr(fingerprint, "read_image_channels_first", lambda path: reads.append(path) or real(path))
    assert ct_statistics(load_dataset(root), (0,)) == first and reads == []  # from the cache
    image = root / "imagesTr" / "c1.nii.gz"
    array = np.asarray(nib.load(image).dataobj).copy()
    array[4:7, 4:6, 2:4] += 300  # the lesion brighter: other statistics
    write_case(image, array, (1.0, 1.0, 3.0))
    changed = ct_statistics(load_dataset(root), (0,))
    assert len(reads) == 2 and changed != first


def test_the_spacing_is_the_affines_even_where_the_header_pixdim_says_otherwise(tmp_path):
    from fullres.data.nifti import open_nifti, voxel_spacing

    image = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([0.8, 0.8, 2.5, 1.0]))
    image.header["pixdim"][1:4] = 0  # a broken header: nibabel reads these zeros as 1 mm
    nib.save(image, str(tmp_path / "z.nii.gz"))
    opened = open_nifti(tmp_path / "z.nii.gz")
    assert opened.header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(voxel_spacing(opened), (0.8, 0.8, 2.5), rtol=1e-6)
