"""Augmentation on the fly (fullres.data.augment): shapes, label sets, seeding, flips, the run config, the CLI."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from fullres.job.config import JobConfig, TrainConfig, job_defaults
from fullres.data.augment import AUGMENTATIONS, AugmentedDataset, EpochSampler, augment, sample_seed
from fullres.errors import UserError

SHAPES = [(32, 32, 16), (32, 16, 16)]  # square axial plane (90-degree rotations) and not


def sample(shape=(32, 32, 16), target="wt", seed=0):
    """A 4-channel image with a brain-like non-zero block and an asymmetric label inside it."""
    rng = np.random.default_rng(seed)
    image = np.zeros((4, *shape), np.float32)
    image[:, 4:-4, 3:-5, 2:-3] = rng.standard_normal((4, shape[0] - 8, shape[1] - 8, shape[2] - 5))
    label = np.zeros(shape, np.int64)
    label[6:14, 5:9, 3:7], label[8:11, 6:8, 4:6], label[20:23, 9:12, 8:11] = 1, 3, 2
    if target == "classes":
        return image, label
    if target == "regions":
        return image, np.stack([label > 0, np.isin(label, (2, 3)), label == 3]).astype(np.float32)
    return image, (label > 0)[None].astype(np.float32)


@pytest.mark.parametrize("preset", AUGMENTATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("target", ["wt", "regions", "classes"])
def test_shape_dtype_and_label_set_are_kept(preset, shape, target):
    image, label = sample(shape, target)
    values = set(np.unique(label).tolist())
    for seed in range(12):
        for as_torch in (False, True):
            given = (torch.from_numpy(image), torch.from_numpy(label)) if as_torch else (image, label)
            out_image, out_label = augment(*given, preset, seed)
            assert type(out_image) is type(given[0]) and type(out_label) is type(given[1])
            assert tuple(out_image.shape) == image.shape and tuple(out_label.shape) == label.shape
            assert str(out_image.dtype).endswith("float32") and str(out_label.dtype).endswith(str(label.dtype))
            out_label = np.asarray(out_label)
            assert set(np.unique(out_label).tolist()) <= values, (seed, np.unique(out_label))
            assert np.isfinite(np.asarray(out_image)).all()


def test_default_resamples_and_keeps_labels_nearest():
    """Over a few seeds the default preset moves the label off every flip/rotation of it (affine or elastic
    resampling happened), and the label set stays {0, 1, 2, 3}: nearest neighbour, no blended values."""
    image, label = sample(target="classes")
    rigid = [np.rot90(np.flip(label, axes), k, (0, 1)) if axes else np.rot90(label, k, (0, 1))
             for axes in itertools.chain.from_iterable(itertools.combinations(range(3), n) for n in range(4))
             for k in range(4)]
    resampled = 0
    for seed in range(30):
        _, out = augment(image, label, "default", seed)
        assert set(np.unique(out).tolist()) <= {0, 1, 2, 3}
        resampled += not any(np.array_equal(out, other) for other in rigid)
    assert resampled > 0


def test_none_is_the_identity():
    image, label = sample()
    out_image, out_label = augment(image, label, "none", 5)
    assert out_image is image and out_label is label


def test_same_seed_same_bytes_and_epochs_differ():
    image, label = sample(target="regions")
    for preset in ("light", "default"):
        first, again = augment(image, label, preset, 11), augment(image, label, preset, 11)
        assert first[0].tobytes() == again[0].tobytes() and first[1].tobytes() == again[1].tobytes()
    dataset = AugmentedDataset([(torch.from_numpy(image), torch.from_numpy(label))] * 3, "default", seed=4)
    a, b = dataset[(2, 1)], dataset[(2, 1)]
    assert a[0].numpy().tobytes() == b[0].numpy().tobytes() and a[1].numpy().tobytes() == b[1].numpy().tobytes()
    assert sample_seed(4, 2, 1) == sample_seed(4, 2, 1) != sample_seed(4, 3, 1) != sample_seed(5, 2, 1)
    epochs = [dataset[(epoch, 1)][0].numpy().tobytes() for epoch in range(4)]
    assert len(set(epochs)) == len(epochs)


def test_a_flip_really_flips():
    """light's only spatial transforms are the flips: each output label is np.flip of the input along some
    axes; every axis is flipped for some seed, and where no intensity transform fired the image is exactly
    np.flip of the input along the same axes."""
    image, label = sample(target="classes")
    subsets = [axes for n in range(4) for axes in itertools.combinations(range(3), n)]
    seen, exact = set(), 0
    for seed in range(24):
        out_image, out_label = augment(image, label, "light", seed)
        (axes,) = [axes for axes in subsets if np.array_equal(out_label, np.flip(label, axes) if axes else label)]
        seen.update(axes)
        flipped = np.flip(image, tuple(a + 1 for a in axes)) if axes else image
        exact += bool(axes) and np.array_equal(out_image, flipped)
    assert seen == {0, 1, 2} and exact > 0


def test_epoch_sampler_keys_each_index_by_its_epoch():
    sampler = EpochSampler(torch.utils.data.DistributedSampler(range(6), num_replicas=1, rank=0, seed=3))
    sampler.set_epoch(2)
    keys = list(sampler)
    assert len(keys) == len(sampler) == 6 and {epoch for epoch, _ in keys} == {2}
    assert sorted(index for _, index in keys) == list(range(6))


def run_config(**changes) -> TrainConfig:
    data = {"job": JobConfig(shape=(16, 16, 16)).to_json(), "data": {"shape": [16, 16, 16]}, "data_dir": ".",
            **changes}
    return TrainConfig.from_json(json.loads(json.dumps(data)))


def test_the_config_round_trips_and_an_old_config_loads_without_augmentation():
    config = run_config(augment="light")
    assert config.augment == "light"
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    old = config.to_json()
    del old["augment"]  # a run saved before the field existed
    assert TrainConfig.from_json(old).augment == "none"
    with pytest.raises(UserError, match="--augment must be one of none, light, default"):
        run_config(augment="heavy")


def test_presets():
    assert job_defaults()["augment"] == "none"  # the paper's job: unchanged
    assert job_defaults("intel-unet")["augment"] == "none"
    assert job_defaults(demo=True)["augment"] == "default"  # `train` without DATA
    assert (job_defaults()["spacing"], job_defaults()["crop"]) == ("none", "center")
    assert (job_defaults(demo=True)["spacing"], job_defaults(demo=True)["crop"]) == ("auto", "foreground")


def test_cli_refuses_an_unknown_preset_in_one_line(cli, small_msd, tmp_path):
    code, out, err = cli("train", small_msd, "--out", tmp_path / "run", "--augment", "heavy")
    assert code == 2 and "--augment" in err and "heavy" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_augmented_training_resumes_bit_exact(small_msd, tmp_path, cli):
    """3 epochs straight (a worker process) equal 2 epochs then --resume --epochs 3 (in process): each
    sample's random window (16^3 of 32x32x24 images) and augmentation depend on (seed, epoch, case index)
    alone. The run records its preset, and --resume refuses another."""
    from fullres.run.checkpoint import load_checkpoint

    flags = ["--shape", "16", "16", "16", "--filters", "2", "--batch", "1", "--threads", "1", "--quiet", "--lr", "1e-3",
             "--device", "cpu", "--schedule", "constant", "--augment", "default", "--crop", "foreground", "--force",
             "--tracker", "none"]
    assert cli("train", small_msd, "--out", tmp_path / "a", "--epochs", "3", "--workers", "1", *flags)[0] == 0
    assert cli("train", small_msd, "--out", tmp_path / "b", "--epochs", "2", "--workers", "0", *flags)[0] == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["augment"] == "default"
    code, _, err = cli("train", "--out", tmp_path / "b", "--resume", "--augment", "light")
    assert code == 2 and "--augment light differs from the run's default" in err
    code, _, err = cli("train", "--out", tmp_path / "b", "--resume", "--crop", "center")
    assert code == 2 and "--crop center differs from the run's foreground" in err
    code, out, err = cli("train", "--out", tmp_path / "b", "--resume", "--epochs", "3", "--quiet", "--force")
    assert code == 0, err
    a, b = load_checkpoint(tmp_path / "a" / "last.pt")["model"], load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
