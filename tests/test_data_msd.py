"""dataset.json reading, channels, regions, preprocessing, the cache and the torch Dataset."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fullres.data.preprocess import CropBox, DataConfig, crop_or_pad, uncrop
from fullres.data.msd import MSDDataset, brats_regions, make_loader, resolve_channels, split_cases
from fullres.data.cache import default_cache_dir, load_case_image
from fullres.data import load_dataset_json
from fullres.data.nifti import write_nifti
from fullres.data.preprocess import bounding_box, brain_mask, centred_crop_box, zscore_brain
from fullres.errors import UserError

TASK01_LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
MODALITIES = ("FLAIR", "T1w", "t1gd", "T2w")
SHAPE = (32, 24, 16)  # from 32x32x24: keeps H, crops W and D around the brain


def _brain_stats(image: torch.Tensor, raw_mask: np.ndarray, box: CropBox) -> tuple[np.ndarray, np.ndarray]:
    mask = crop_or_pad(raw_mask, box)
    values = image.numpy()[:, mask]
    return values.mean(axis=1), values.std(axis=1)


# --- dataset.json -------------------------------------------------------------------------------


def test_load_dataset_json(small_msd):
    index = load_dataset_json(small_msd)
    assert index.modalities == MODALITIES
    assert index.labels == TASK01_LABELS
    assert [c.case_id for c in index.training] == ["BRATS_001", "BRATS_002", "BRATS_003", "BRATS_004"]
    case_id, image, label = index.training[0]
    assert image == small_msd.resolve() / "imagesTr" / "BRATS_001.nii.gz" and image.is_file()
    assert label == small_msd.resolve() / "labelsTr" / "BRATS_001.nii.gz" and label.is_file()
    assert [(c.case_id, c.image.name) for c in index.test] == [("BRATS_005", "BRATS_005.nii.gz")]


@pytest.mark.parametrize("entry, why", [
    ("../outside.nii.gz", "leaves the dataset folder"),
    ("./imagesTr/../../outside.nii.gz", "leaves the dataset folder"),
    ("/etc/passwd", "absolute path"),
])
def test_path_escaping_the_dataset_is_rejected(msd_copy, entry, why):
    raw = json.loads((msd_copy / "dataset.json").read_text())
    raw["training"][1]["label"] = entry
    (msd_copy / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match=why) as error:
        load_dataset_json(msd_copy)
    assert "dataset.json" in str(error.value) and "training[1].label" in str(error.value)


def test_symlink_pointing_outside_is_rejected(msd_copy, tmp_path):
    outside = tmp_path / "elsewhere.nii.gz"
    outside.write_bytes((msd_copy / "labelsTr" / "BRATS_001.nii.gz").read_bytes())
    link = msd_copy / "labelsTr" / "BRATS_001.nii.gz"
    link.unlink()
    link.symlink_to(outside)
    with pytest.raises(UserError, match="leaves the dataset folder.*symlink"):
        load_dataset_json(msd_copy)


def test_missing_and_malformed_dataset_json(tmp_path):
    with pytest.raises(UserError, match="dataset.json: not found"):
        load_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text('{"modality": ')
    with pytest.raises(UserError, match=r"not valid JSON \(line 1"):
        load_dataset_json(tmp_path)
    (tmp_path / "dataset.json").write_text('{"modality": {"0": "FLAIR"}, "labels": {"0": "background"}}')
    with pytest.raises(UserError, match="missing key 'training'") as error:
        load_dataset_json(tmp_path)
    assert "\n" not in str(error.value)


# --- channels and regions -----------------------------------------------------------------------


@pytest.mark.parametrize("spec, expected", [
    ("4", (0, 1, 2, 3)), ("1", (0,)), ("2", (0, 1)), ("all", (0, 1, 2, 3)),
    ("FLAIR", (0,)), ("flair,T2w", (0, 3)), ("T1GD", (2,)), ("0,3", (0, 3)), (" t2w , 0 ", (3, 0)),
])
def test_resolve_channels(spec, expected):
    assert resolve_channels(spec, MODALITIES) == expected


@pytest.mark.parametrize("spec", ["0", "5", "PD", "0,9", "flair,flair", "", "1.5"])
def test_bad_channels_name_the_option_and_the_choices(spec):
    with pytest.raises(UserError, match="--channels") as error:
        resolve_channels(spec, MODALITIES)
    assert "0=FLAIR, 1=T1w, 2=t1gd, 3=T2w" in str(error.value)


def test_regions_from_task01_label_names():
    assert brats_regions(TASK01_LABELS) == {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}


def test_regions_follow_names_not_numbers():
    # Another release's convention (label 2 = enhancing): the names decide.
    other = {0: "background", 1: "necrotic tumor core", 2: "GD-enhancing tumor", 4: "peritumoral edema"}
    assert brats_regions(other) == {"WT": (1, 2, 4), "TC": (1, 2), "ET": (2,)}
    assert brats_regions({0: "background", 1: "edema"}) == {"WT": (1,)}


# --- preprocessing ------------------------------------------------------------------------------


def test_crop_pad_centres_on_the_brain_and_uncrop_restores_geometry():
    rng = np.random.default_rng(0)
    image = np.zeros((2, 30, 20, 155), dtype=np.float32)
    image[:, 5:25, 4:16, 3:150] = rng.random((2, 20, 12, 147)) + 0.5
    box = centred_crop_box(image.shape[1:], bounding_box(brain_mask(image)), (24, 32, 144))
    # H 30 -> 24 crops around the brain (5..25), W 20 -> 32 pads, D 155 -> 144 crops around 3..150.
    assert box.source == ((3, 27), (0, 20), (4, 148))
    assert box.destination == ((0, 24), (6, 26), (0, 144))
    cropped = crop_or_pad(image, box)
    assert cropped.shape == (2, 24, 32, 144)
    restored = uncrop(cropped, box)
    assert restored.shape == image.shape
    inside = (slice(None),) + box.source_slices()
    np.testing.assert_array_equal(restored[inside], image[inside])
    outside = np.ones(image.shape, bool)
    outside[inside] = False
    assert not restored[outside].any()
    assert CropBox.from_json(json.loads(json.dumps(box.to_json()))) == box


def test_uncrop_is_exact_when_the_brain_fits():
    label = np.zeros((40, 36, 30), dtype=np.uint8)
    label[12:30, 10:26, 8:22] = np.random.default_rng(1).integers(0, 4, (18, 16, 14))
    box = centred_crop_box(label.shape, bounding_box(label > 0), (24, 48, 16))
    np.testing.assert_array_equal(uncrop(crop_or_pad(label, box), box), label)


def test_zscore_over_brain_only():
    image = np.zeros((1, 8, 8, 8), dtype=np.float32)
    image[0, 2:6, 2:6, 2:6] = np.arange(64).reshape(4, 4, 4) + 100
    out = zscore_brain(image, brain_mask(image))
    brain = out[0, 2:6, 2:6, 2:6]
    assert abs(brain.mean()) < 1e-5 and abs(brain.std() - 1) < 1e-5
    assert (out[0][~brain_mask(image)[None][0]] == 0).all()


def test_data_config_json_round_trip():
    config = DataConfig(channels=(0, 3), target="regions", shape=(32, 24, 16), normalize=False)
    text = json.dumps(config.to_json())
    assert DataConfig.from_json(json.loads(text)) == config
    assert DataConfig.from_json(text) == config
    assert DataConfig() == DataConfig(channels=(0, 1, 2, 3), target="wt", shape=(240, 240, 144), normalize=True)
    with pytest.raises(UserError, match="unknown keys"):
        DataConfig.from_json({"channels": [0], "colour": "red"})
    with pytest.raises(ValueError, match="target"):
        DataConfig(target="tumour")


# --- the Dataset --------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [(0,), (0, 1, 2, 3)])
@pytest.mark.parametrize("target, target_shape, dtype", [
    ("wt", (1,) + SHAPE, torch.float32),
    ("regions", (3,) + SHAPE, torch.float32),
    ("classes", SHAPE, torch.int64),
])
def test_dataset_items(small_msd, tmp_path, channels, target, target_shape, dtype):
    index = load_dataset_json(small_msd)
    config = DataConfig(channels=channels, target=target, shape=SHAPE)
    dataset = MSDDataset.from_index(index, config, cache_dir=tmp_path / "cache")
    assert len(dataset) == 4
    image, label_target = dataset[1]
    assert image.dtype == torch.float32 and image.shape == (len(channels),) + SHAPE
    assert label_target.dtype == dtype and label_target.shape == target_shape

    raw = np.moveaxis(np.asanyarray(nib.load(index.training[1].image).dataobj), -1, 0)
    raw_label = np.asanyarray(nib.load(index.training[1].label).dataobj)
    box = centred_crop_box(raw.shape[1:], bounding_box(brain_mask(raw)), SHAPE)
    mean, std = _brain_stats(image, brain_mask(raw), box)
    # The brain is slightly larger than the crop, so the cropped statistics are close to (0, 1).
    assert np.all(np.abs(mean) < 0.15) and np.all(np.abs(std - 1) < 0.15)
    assert (image.numpy()[:, ~crop_or_pad(brain_mask(raw), box)] == 0).all()
    cropped_label = crop_or_pad(raw_label, box)
    if target == "wt":
        np.testing.assert_array_equal(label_target[0].numpy(), cropped_label > 0)
    elif target == "regions":
        np.testing.assert_array_equal(label_target[1].numpy(), np.isin(cropped_label, (2, 3)))
        np.testing.assert_array_equal(label_target[2].numpy(), cropped_label == 3)
    else:
        np.testing.assert_array_equal(label_target.numpy(), cropped_label)


def test_normalised_over_brain_when_the_whole_brain_fits(small_msd, tmp_path):
    index = load_dataset_json(small_msd)
    dataset = MSDDataset.from_index(index, DataConfig(shape=(40, 40, 32)), cache_dir=tmp_path)
    image, _ = dataset[0]
    raw = np.moveaxis(np.asanyarray(nib.load(index.training[0].image).dataobj), -1, 0)
    box = centred_crop_box(raw.shape[1:], bounding_box(brain_mask(raw)), (40, 40, 32))
    mean, std = _brain_stats(image, brain_mask(raw), box)
    np.testing.assert_allclose(mean, 0, atol=1e-4)
    np.testing.assert_allclose(std, 1, atol=1e-4)


def test_regions_target_needs_label_names(small_msd):
    index = load_dataset_json(small_msd)
    with pytest.raises(UserError, match="regions"):
        MSDDataset(index.training, DataConfig(target="regions"), labels={0: "background", 1: "edema"}, cache=False)


def test_cache_hit_reads_no_nifti(small_msd, tmp_path, monkeypatch):
    index = load_dataset_json(small_msd)
    config = DataConfig(shape=SHAPE)
    dataset = MSDDataset.from_index(index, config, cache_dir=tmp_path)
    first = [dataset[i] for i in range(len(dataset))]  # epoch 1 fills the cache

    def no_nifti(*args, **kwargs):
        raise AssertionError("a cached epoch must not read NIfTI files")

    monkeypatch.setattr(nib, "load", no_nifti)
    for i, (image, target) in enumerate(dataset):
        assert torch.equal(image, first[i][0]) and torch.equal(target, first[i][1])
    assert len(list(tmp_path.glob("*.box.json"))) == 4


def test_cache_invalidated_by_source_change_and_option_change(msd_copy, tmp_path, monkeypatch):
    case = load_dataset_json(msd_copy).training[0]
    reads = []
    original_load = nib.load

    def counting_load(path, *args, **kwargs):
        reads.append(Path(path).name)
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(nib, "load", counting_load)
    config = DataConfig(shape=SHAPE)
    MSDDataset([case], config, cache_dir=tmp_path)[0]
    assert len(reads) == 2  # image + label
    MSDDataset([case], config, cache_dir=tmp_path)[0]
    assert len(reads) == 2  # hit
    MSDDataset([case], DataConfig(shape=SHAPE, target="classes"), cache_dir=tmp_path)[0]
    assert len(reads) == 2  # the target is derived from the cached label: still a hit
    MSDDataset([case], DataConfig(shape=SHAPE, normalize=False), cache_dir=tmp_path)[0]
    assert len(reads) == 4  # an option changed
    MSDDataset([case], DataConfig(channels=(0,), shape=SHAPE), cache_dir=tmp_path)[0]
    assert len(reads) == 6
    stat = case.image.stat()
    os.utime(case.image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    MSDDataset([case], config, cache_dir=tmp_path)[0]
    assert len(reads) == 8  # the source file changed


def test_cache_entries_are_plain_npy_in_the_default_dir(msd_copy):
    index = load_dataset_json(msd_copy)
    dataset = MSDDataset.from_index(index, DataConfig(shape=SHAPE))
    assert dataset.cache_dir == msd_copy.resolve() / ".fullres_cache"
    dataset[0]
    image_file = next(dataset.cache_dir.glob("BRATS_001.*.image.npy"))
    assert np.load(image_file, mmap_mode="r").shape == (4,) + SHAPE
    assert not list(dataset.cache_dir.glob("*.tmp"))


def test_default_cache_dir_falls_back_to_user_cache(msd_copy, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.setattr("fullres.data.cache.os.access", lambda path, mode: False)  # an unwritable dataset folder
    fallback = default_cache_dir(msd_copy)
    assert fallback.parent == tmp_path / "user-cache" / "fullres"
    assert fallback == default_cache_dir(msd_copy) != default_cache_dir(tmp_path)


def test_dataset_pickles_and_works_with_workers(small_msd, tmp_path):
    index = load_dataset_json(small_msd)
    dataset = MSDDataset.from_index(index, DataConfig(channels=(0,), shape=SHAPE), cache_dir=tmp_path)
    assert pickle.loads(pickle.dumps(dataset)).cases == dataset.cases
    loader = make_loader(dataset, batch=2, shuffle=True, workers=2, seed=0, device_type="cpu")
    assert not loader.pin_memory
    batches = [(x.shape, y.shape) for x, y in loader]
    assert batches == [((2, 1) + SHAPE, (2, 1) + SHAPE)] * 2
    assert make_loader(dataset, 1, False, 0, 0, "cuda").pin_memory


def test_split_is_deterministic_and_never_empty():
    cases = [f"case{i}" for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=3)
    assert (train, val) == split_cases(cases, 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == sorted(cases) and not set(train) & set(val)
    assert split_cases(cases, 0.2, seed=4) != (train, val)
    assert [len(part) for part in split_cases(cases[:2], 0.01, seed=0)] == [1, 1]
    assert [len(part) for part in split_cases(cases[:2], 0.99, seed=0)] == [1, 1]
    assert split_cases(cases, 0.0, seed=0) == (cases, [])
    assert split_cases(cases[:1], 0.5, seed=0) == (cases[:1], [])
    with pytest.raises(UserError):
        split_cases(cases, 1.0, seed=0)


def test_load_case_image_for_prediction(small_msd, tmp_path):
    index = load_dataset_json(small_msd)
    config = DataConfig(channels=(0,), shape=SHAPE)
    image, box, source = load_case_image(index.test[0].image, config, cache_dir=tmp_path)
    assert image.shape == (1,) + SHAPE and image.dtype == np.float32
    assert box.original_shape == (32, 32, 24)
    np.testing.assert_array_equal(source.affine, nib.load(index.test[0].image).affine)
    again, box_again, _ = load_case_image(index.test[0].image, config, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, image)
    assert box_again == box
    no_cache, _, _ = load_case_image(index.test[0].image, config)
    np.testing.assert_array_equal(no_cache, image)
    prediction = uncrop(np.ones(SHAPE, np.uint8), box)
    assert prediction.shape == (32, 32, 24) and prediction.sum() == np.prod(SHAPE)
    write_nifti(tmp_path / "pred.nii.gz", prediction, source.affine, source.header)  # 3D uint8 with the 4D header
    written = nib.load(tmp_path / "pred.nii.gz")
    assert written.shape == (32, 32, 24) and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), prediction)
    np.testing.assert_array_equal(written.affine, source.affine)
