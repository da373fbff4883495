"""Any network: the registry's families (intel-unet, MONAI, nnU-Net, a user's factory) build, fit their
shapes, read off Table 1, dry-run, checkpoint exactly and refuse bad input in one line."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fullres.job.config import JobConfig, Strategy
from fullres.cost.dryrun import dryrun
from fullres.cost.table1 import table1
from fullres.nets.registry import ModelConfig
from fullres.nets.registry import build_model, check_shape, count_trainable, spatial_divisor
from fullres.job.step import build_training, checkpoint_blocks, train_step
from fullres.engine.losses import LOSSES

FACTORY = '''
from torch import nn


def tiny(in_channels, out_channels, width=4):
    return nn.Sequential(nn.Conv3d(in_channels, width, 3, padding=1), nn.ReLU(), nn.Conv3d(width, out_channels, 1))
'''


def test_intel_unet_has_the_papers_appendix_parameter_counts():
    model = build_model(ModelConfig(architecture="intel-unet", in_channels=1, filters=16, norm="batch", dropout=0.0))
    buffers = sum(b.numel() for name, b in model.named_buffers() if "running" in name)
    assert count_trainable(model) == 5_647_857
    assert count_trainable(model) + buffers == 5_650_801
    assert spatial_divisor(model_config := ModelConfig(architecture="intel-unet", norm="batch")) == 16
    with pytest.raises(ValueError, match="--norm must be batch"):
        ModelConfig(architecture="intel-unet", norm="instance")
    assert model_config.norm == "batch"


@pytest.mark.parametrize("name, args, shape, divisor", [
    ("monai:SegResNet", '{"init_filters": 8}', (16, 16, 16), 8),
    ("monai:BasicUNet", '{"features": [4, 4, 8, 8, 16, 4]}', (32, 32, 32), 16),
    ("monai:UNet", '{"channels": [4, 8, 16], "strides": [2, 2]}', (16, 16, 16), 4),
    ("monai:DynUNet", '{"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]}',
     (16, 16, 16), 4),
    ("monai:UNETR", '{"feature_size": 4, "hidden_size": 48, "mlp_dim": 96, "num_heads": 4}', (32, 32, 32), 16),
    ("monai:SwinUNETR", '{"feature_size": 12, "depths": [1, 1, 1, 1]}', (64, 64, 64), 32),
    ("nnunet:PlainConvUNet", '{"features_per_stage": [4, 8, 16], "n_stages": 3, "strides": [1, 2, 2]}',
     (16, 16, 16), 4),
    ("nnunet:ResidualEncoderUNet", '{"features_per_stage": [4, 8, 16], "n_stages": 3, "strides": [1, 2, 2], '
     '"n_blocks_per_stage": [1, 1, 1]}', (16, 16, 16), 4),
])
def test_every_family_builds_checks_tables_and_dry_runs(name, args, shape, divisor):
    if name.startswith("nnunet"):
        pytest.importorskip("dynamic_network_architectures")
    config = ModelConfig(architecture=name, args=args, in_channels=2, classes=3)
    assert spatial_divisor(config) == divisor
    check_shape(config, shape)  # a forward pass on the meta device gives (N, 3, *shape)
    job = JobConfig(model=config, shape=shape, batch=1)
    rows = table1(config, shape, 1).rows
    model = build_model(config, shape)
    assert table1(config, shape, 1).trainable_weights == count_trainable(model)
    assert rows[0].type == "InputLayer" and len(rows) > 3
    result = dryrun(job, runtime=0)
    assert result.breakdown["parameters"] >= 4 * count_trainable(model)
    assert result.peak_at


def test_a_shape_the_network_cannot_take_is_named():
    with pytest.raises(ValueError, match=r"H=48 is not divisible by 32 \(SwinUNETR's downsampling\); nearest valid: 32 or 64"):
        check_shape(ModelConfig(architecture="monai:SwinUNETR"), (48, 64, 64))
    with pytest.raises(ValueError, match="does not take 32x32x32"):  # instance norm over a single voxel
        check_shape(ModelConfig(architecture="monai:SwinUNETR", args='{"feature_size": 12}'), (32, 32, 32))


SMALL_FAMILIES = {  # name -> (model args, shape, the blocks checkpointing finds)
    "monai:SegResNet": ('{"init_filters": 8, "dropout_prob": 0.2}', (16, 16, 16),
                        ["convInit", "down_layers.0.1", "down_layers.1", "down_layers.2", "down_layers.3", "up_samples.0",
                         "up_layers.0", "up_samples.1", "up_layers.1", "up_samples.2", "up_layers.2", "conv_final"]),
    "monai:BasicUNet": ('{"features": [4, 4, 8, 8, 16, 4]}', (32, 32, 32),
                        ["conv_0.conv_0", "conv_0.conv_1", "down_1", "down_2", "down_3", "down_4", "upcat_4", "upcat_3",
                         "upcat_2", "upcat_1.upsample", "upcat_1.convs.conv_0", "upcat_1.convs.conv_1", "final_conv"]),
    "monai:UNet": ('{"channels": [4, 8, 16], "strides": [2, 2]}', (16, 16, 16),
                   ["model.0", "model.1", "model.2.0", "model.2.1"]),
    "monai:DynUNet": ('{"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], '
                      '"filters": [4, 8, 16]}', (16, 16, 16),
                      ["input_block", "skip_layers.next_layer", "upsamples.1.transp_conv", "upsamples.1.conv_block",
                       "output_block"]),
    "nnunet:PlainConvUNet": ('{"features_per_stage": [4, 8, 16], "n_stages": 3, "strides": [1, 2, 2]}', (16, 16, 16),
                             ["encoder.stages.0.0.convs.0", "encoder.stages.0.0.convs.1", "encoder.stages.1",
                              "encoder.stages.2", "decoder.transpconvs.0", "decoder.stages.0", "decoder.transpconvs.1",
                              "decoder.stages.1.convs.0.all_modules", "decoder.stages.1.convs.1", "decoder.seg_layers.1"]),
    "nnunet:ResidualEncoderUNet": ('{"features_per_stage": [4, 8, 16], "n_stages": 3, "strides": [1, 2, 2], '
                                   '"n_blocks_per_stage": [1, 1, 1]}', (16, 16, 16),
                                   ["encoder.stem", "encoder.stages.0", "encoder.stages.1", "encoder.stages.2", "decoder"]),
}


@pytest.mark.parametrize("name", list(SMALL_FAMILIES))
def test_block_checkpointing_finds_the_blocks_that_run_and_gives_the_plain_gradients(name):
    """The blocks are module calls of a real forward (stages; the full-resolution ones split; never a
    ModuleList, an iterated Sequential or DynUNet's second name for its stages), and the checkpointed
    network's float64 gradients equal the plain ones (dropout repeated exactly on recompute)."""
    if name.startswith("nnunet"):
        pytest.importorskip("dynamic_network_architectures")
    args, shape, expected = SMALL_FAMILIES[name]
    config = ModelConfig(architecture=name, args=args, in_channels=2, classes=3)
    torch.manual_seed(0)
    plain = build_model(config, shape).double()
    checkpointed = build_model(config, shape).double()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 2, *shape, dtype=torch.float64)
    y = (torch.rand(2, 3, *shape) > 0.5).double()
    assert checkpoint_blocks(checkpointed, tuple(x.shape)) == expected
    assert checkpoint_blocks(checkpointed) == expected  # idempotent
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks, recomputed exactly under checkpointing
        LOSSES["dice"](model(x), y).backward()
        grads.append([p.grad for p in model.parameters()])  # None for a head the network does not use
    for a, b in zip(*grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_blocks_are_found_at_the_first_forward_when_no_shape_is_given():
    config = ModelConfig(architecture="monai:UNet", args=SMALL_FAMILIES["monai:UNet"][0], in_channels=2, classes=3)
    model = build_model(config, (16, 16, 16))
    assert checkpoint_blocks(model) == []
    model(torch.randn(1, 2, 16, 16, 16)).sum().backward()
    assert checkpoint_blocks(model) == SMALL_FAMILIES["monai:UNet"][2]
    assert all(getattr(dict(model.named_modules())[name], "_fullres_checkpointed", False)
               for name in SMALL_FAMILIES["monai:UNet"][2])


@pytest.mark.parametrize("name", ["monai:SegResNet", "monai:UNet", "monai:DynUNet", "nnunet:ResidualEncoderUNet"])
def test_checkpointing_cuts_the_dry_run_peak(name, monkeypatch):
    """SegResNet keeps its stages in ModuleLists, nnU-Net in an iterated Sequential, DynUNet reaches them
    under a second name: checkpointing the blocks that run cuts the dry run's peak of tensors by a quarter.
    Counted without the operators' workspaces, which checkpointing does not touch and which on AVX-512 CPUs
    hold oneDNN's buffers (tens of MB, more than these small jobs' tensors)."""
    from fullres.cost import dryrun as module

    if name.startswith("nnunet"):
        pytest.importorskip("dynamic_network_architectures")
    monkeypatch.setattr(module, "op_workspace", lambda *args, **kwargs: 0)
    args, shape, _ = SMALL_FAMILIES[name]
    config = ModelConfig(architecture=name, args=args, in_channels=4, classes=3)
    peaks = [dryrun(JobConfig(model=config, shape=shape, batch=32, strategy=Strategy(checkpointing=on)), runtime=0,
                    allocator="fixed").peak_bytes for on in (False, True)]
    assert peaks[1] < 0.75 * peaks[0], peaks


def test_checkpointing_that_saves_nothing_is_refused_in_one_line(cli, tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(FACTORY)
    os.chmod(path, 0o644)
    os.chmod(tmp_path, 0o755)
    code, _, err = cli("estimate", "--model", f"{path}:tiny", "--shape", "16", "16", "16", "--checkpointing",
                       "--method", "dryrun")
    assert code == 2 and f"--checkpointing: block checkpointing of {path}:tiny at 16x16x16 saves 0.0% of" in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = cli("estimate", "--model", f"{path}:tiny", "--shape", "16", "16", "16", "--method", "dryrun")
    assert code == 0, err


def test_checkpointing_that_saves_little_is_accepted_with_a_one_line_warning(cli, monkeypatch):
    from fullres.cost import plan

    monkeypatch.setattr(plan, "checkpointing_saving", lambda job: 0.12)
    code, _, err = cli("estimate", "--model", "monai:SegResNet", "--model-args", '{"init_filters": 8}', "--shape",
                       "16", "16", "16", "--checkpointing")
    assert code == 0 and err.strip() == ("fullres estimate: warning: --checkpointing: block checkpointing of "
                                         "monai:SegResNet at 16x16x16 saves only 12.0% of the activations at the dry "
                                         "run's peak (one block holds most of them)"), err


def test_offload_needs_cuda():
    job = JobConfig(model=ModelConfig(filters=2), shape=(16, 16, 16), batch=1, strategy=Strategy(offload=True))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        build_training(job, "cpu")


def test_a_users_factory_file_is_built_and_a_changed_one_refused(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(FACTORY)
    os.chmod(path, 0o644)
    os.chmod(tmp_path, 0o755)
    from fullres.nets.families import file_digest

    config = ModelConfig(architecture=f"{path}:tiny", args='{"width": 3}', in_channels=2, classes=1,
                         source_sha256=file_digest(path))
    job = JobConfig(model=config, shape=(16, 16, 16), batch=1)
    training = build_training(job, "cpu")
    assert count_trainable(training.model) == 2 * 3 * 27 + 3 + 3 + 1
    train_step(training.model, training.optimizer, torch.randn(1, 2, 16, 16, 16), torch.ones(1, 1, 16, 16, 16),
               LOSSES["dice"], job.strategy)
    path.write_text(FACTORY + "\n# edited\n")
    with pytest.raises(ValueError, match="changed since this run was configured"):
        build_model(config)
    os.chmod(path, 0o666)
    with pytest.raises(ValueError, match="writable by others"):
        build_model(ModelConfig(architecture=f"{path}:tiny"))


@pytest.mark.parametrize("argv, message", [
    (["--model", "monai:Nope"], "--model monai:Nope: monai.networks.nets has no network 'Nope'"),
    (["--model", "nnunet:Foo"], "unknown network 'nnunet:Foo'"),
    (["--model", "nope"], "unknown network 'nope'"),
    (["--model", "monai:UNet", "--model-args", "{bad"], "--model-args is not JSON"),
    (["--model", "monai:UNet", "--model-args", "[1]"], "--model-args must be a JSON object"),
    (["--model", "monai:UNet", "--model-args", '{"no_such_argument": 1}'], "unexpected keyword argument 'no_such_argument'"),
    (["--model", "monai:SwinUNETR", "--shape", "48", "48", "48"], "not divisible by 32"),
    (["--model", "missing.py:make"], "no such file"),
    (["--model", "intel-unet", "--norm", "instance"], "--norm must be batch"),
    (["--model", "monai:UNETR", "--slabs", "2", "--shape", "32", "32", "32"], "monai:UNETR cannot run in slabs"),
])
def test_bad_networks_are_refused_in_one_line(cli, argv, message):
    code, out, err = cli("estimate", *argv)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_users_factory_that_raises_is_named(cli, tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("def make(in_channels, out_channels):\n    raise RuntimeError('no GPU here')\n")
    os.chmod(tmp_path, 0o755)
    code, _, err = cli("estimate", "--model", f"{path}:make", "--shape", "16", "16", "16")
    assert code == 2 and f"{path}:make raised RuntimeError: no GPU here" in err, err


def test_intel_unet_preset_fills_the_repositorys_defaults(cli):
    code, out, err = cli("estimate", "--model", "intel-unet", "--json")
    assert code == 0, err
    table = json.loads(out)
    assert table["rows"][0]["feature_maps"] == 1 and table["rows"][0]["batch"] == 8  # FLAIR only, batch 8
    assert (table["rows"][0]["height"], table["rows"][0]["depth"]) == (144, 144)
    assert sum(row["trainable_weights"] for row in table["rows"]) == 5_647_857


def test_train_and_predict_with_a_monai_network(cli, tmp_path):
    from fullres.data.synth import write_dataset

    data = write_dataset(tmp_path / "msd", train_cases=4, test_cases=1, shape=(24, 24, 16), seed=1, progress=False)
    run = tmp_path / "run"
    code, out, err = cli("train", data, "--out", run, "--model", "monai:SegResNet", "--model-args",
                         '{"init_filters": 8}', "--shape", "16", "16", "16", "--batch", "1", "--epochs", "1",
                         "--workers", "0", "--quiet", "--device", "cpu", "--checkpointing", "--force")
    assert code == 0, err  # (--force: the preflight's calibration is the next test's subject)
    config = json.loads((run / "config.json").read_text())
    assert config["job"]["model"]["architecture"] == "monai:SegResNet"
    assert json.loads(config["job"]["model"]["args"]) == {"init_filters": 8}
    code, out, err = cli("predict", run, data, "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1
    code, _, err = cli("train", "--out", run, "--resume", "--model", "monai:UNet")
    assert code == 2 and "--model monai:UNet differs from the run's monai:SegResNet" in err


@pytest.mark.slow
def test_dry_run_follows_a_monai_network_within_five_percent():
    """The accuracy goal's cheapest case, as `estimate` computes it: SegResNet at 32^3, checkpointed."""
    from fullres.cost.estimate import dryrun_estimate
    from fullres.cost.measure import measure_peak

    job = JobConfig(model=ModelConfig(architecture="monai:SegResNet", in_channels=4, classes=1), shape=(32, 32, 32),
                    batch=1, strategy=Strategy(checkpointing=True, channels_last=True))
    estimate = dryrun_estimate(job).peak_bytes
    measured = measure_peak(job, steps=2, threads=torch.get_num_threads()).measured_bytes
    assert abs(estimate - measured) / measured <= 0.05, (estimate, measured)


SMALL_NNUNET_DS = json.dumps({"n_stages": 4, "features_per_stage": [4, 8, 8, 8], "strides": [1, 2, 2, 2],
                              "deep_supervision": True})


def test_deep_supervision_heads_are_trained_with_nnunets_weights_and_predicted_from_alone():
    from fullres.engine.losses import (deep_supervision_loss, deep_supervision_weights, primary_output, supervised_outputs)

    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([1 / 1.5, 0.5 / 1.5, 0.0])
    config = ModelConfig(architecture="nnunet:PlainConvUNet", in_channels=2, classes=1, args=SMALL_NNUNET_DS)
    check_shape(config, (16, 16, 16))  # a list of heads is accepted: the full-resolution one is the logits
    torch.manual_seed(0)
    model = build_model(config, (16, 16, 16))
    x = torch.randn(2, 2, 16, 16, 16)
    target = (torch.rand(2, 1, 16, 16, 16) > 0.5).float()
    heads = supervised_outputs(model(x))
    assert [tuple(h.shape[2:]) for h in heads] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]
    loss_fn = LOSSES["dice_bce"]
    # the independent sum: nearest-exact targets (the voxel at each coarse voxel's centre: odd indices),
    # weights 1/2^i with the coarsest at 0, normalised
    coarse = target[:, :, 1::2, 1::2, 1::2]
    expected = (1 / 1.5) * loss_fn(heads[0], target) + (0.5 / 1.5) * loss_fn(heads[1], coarse)
    assert torch.allclose(deep_supervision_loss(loss_fn, heads, target), expected)
    # a network without heads: exactly the plain loss
    assert torch.equal(deep_supervision_loss(loss_fn, heads[0], target), loss_fn(heads[0], target))
    # train_step runs on the heads; evaluation and prediction read the full-resolution logits only
    job = JobConfig(model=config, shape=(16, 16, 16), batch=2)
    training = build_training(job, "cpu")
    seen = []
    train_step(training.model, training.optimizer, x, target, loss_fn, job.strategy,
               on_output=lambda logits, y: seen.append(tuple(logits.shape)))
    assert seen == [(2, 1, 16, 16, 16)]
    with torch.no_grad():
        assert primary_output(training.model.eval()(x)).shape == (2, 1, 16, 16, 16)


def test_nnunets_own_vram_estimate_is_its_planners_feature_map_rule():
    from fullres.nets.registry import build_on_meta
    from fullres.nets.families import nnunet_vram_estimate

    config = ModelConfig(architecture="nnunet:PlainConvUNet", in_channels=4, classes=3)
    model = build_on_meta(config, (128, 128, 128))
    count = model.compute_conv_feature_map_size((128, 128, 128))
    # nnU-Net's planner: batch 2 fits 8 GB while the count stays under 560e6; linear in batch
    assert nnunet_vram_estimate(model, (128, 128, 128), 2) == round(count / 560e6 * 8e9)
    assert nnunet_vram_estimate(model, (128, 128, 128), 4) == pytest.approx(2 * nnunet_vram_estimate(model, (128, 128, 128), 2), abs=1)
    assert nnunet_vram_estimate(build_model(ModelConfig()), (16, 16, 16), 2) is None
