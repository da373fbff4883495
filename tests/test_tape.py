"""Slabs for any convolutional network (fullres.engine.tape): each family's output and gradients equal the
whole-volume ones in float64, and what slabs cannot split is refused by name."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fullres.engine.tape import SlabForward, Unsliceable, record, slab_network
from fullres.job.config import JobConfig, Strategy
from fullres.nets.registry import ModelConfig, build_model

SMALL_NNUNET = {"n_stages": 4, "features_per_stage": [8, 16, 32, 64], "strides": [1, 2, 2, 2]}
FAMILIES = {
    "monai:SegResNet": {"init_filters": 8},
    "monai:BasicUNet": {"features": [8, 8, 16, 32, 64, 8]},
    "monai:DynUNet": {"filters": [8, 16, 32, 64, 64]},
    "monai:UNet": {},
    "nnunet:PlainConvUNet": SMALL_NNUNET,
    "nnunet:ResidualEncoderUNet": {**SMALL_NNUNET, "n_blocks_per_stage": [1, 2, 2, 2], "n_conv_per_stage_decoder": 1},
    "intel-unet": None,
}


def family(architecture: str) -> nn.Module:
    args = FAMILIES[architecture]
    if args is None:
        config = ModelConfig(architecture=architecture, in_channels=2, classes=3, norm="batch", filters=4)
    else:
        config = ModelConfig(architecture=architecture, in_channels=2, classes=3, args=json.dumps(args))
    return build_model(config, (32, 32, 32)).double()


def gradients_after(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    y = model(x)
    (y.square().sum() + y[:, :, 3:9].sum()).backward()  # uneven over H: slab boundaries matter
    return y.detach(), [p.grad for p in model.parameters()]


def assert_equal_runs(model: nn.Module, x: torch.Tensor, counts: tuple[int, ...], recompute_inputs: int = 0) -> None:
    slabbed = slab_network(copy.deepcopy(model), counts, recompute_inputs)
    whole_out, whole_grads = gradients_after(model, x)
    slab_out, slab_grads = gradients_after(slabbed, x)
    assert torch.allclose(slab_out, whole_out, rtol=0, atol=1e-12 * whole_out.abs().max())
    scale = max(g.abs().max() for g in whole_grads if g is not None)
    for a, b in zip(whole_grads, slab_grads):
        assert (a is None) == (b is None)
        if a is not None:  # biases before a normalisation have a zero gradient: compared at the model's scale
            assert torch.allclose(b, a, rtol=0, atol=1e-11 * scale)
    for a, b in zip(model.buffers(), slabbed.buffers()):  # batch norm's running statistics
        assert torch.allclose(a.double(), b.double(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_every_family_in_slabs_gives_the_whole_volume_output_and_gradients(architecture):
    torch.manual_seed(0)
    model = family(architecture)
    assert_equal_runs(model, torch.randn(1, 2, 32, 32, 32, dtype=torch.float64), (4, 2))


@pytest.mark.parametrize("architecture", ["nnunet:PlainConvUNet", "monai:SegResNet"])
def test_recomputed_level_inputs_give_the_whole_volume_gradients(architecture):
    torch.manual_seed(0)
    assert_equal_runs(family(architecture), torch.randn(1, 2, 32, 32, 32, dtype=torch.float64), (4, 4, 2), 2)


class Zoo(nn.Module):
    """Every operation the tape splits, with the awkward settings: dilation, odd strides and kernels, padded
    pooling, output padding, interpolation modes, group and batch norm, padding along W and D."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p
        self.a = nn.Conv3d(2, 8, 5, padding=4, dilation=2)
        self.down = nn.Conv3d(8, 8, 3, stride=2, padding=1)
        self.group = nn.GroupNorm(4, 8)
        self.batch = nn.BatchNorm3d(8)
        self.prelu = nn.PReLU(8)
        self.up = nn.ConvTranspose3d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv3d(40, 3, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):
        a = F.leaky_relu(self.group(self.a(x)), 0.1)
        b = self.prelu(self.batch(self.down(a)))  # H 24 -> 12 (H: a multiple of 8)
        c = F.max_pool3d(b, 3, stride=2, padding=1)  # 12 -> 6
        d = F.avg_pool3d(c, 2)  # 6 -> 3
        e = F.interpolate(d, scale_factor=2, mode="trilinear", align_corners=True)  # 3 -> 6
        f = F.interpolate(e + c, scale_factor=2, mode="nearest")  # 6 -> 12
        g = self.up(F.relu(f) + b)  # 12 -> 24
        h = F.interpolate(b, size=tuple(g.shape[2:]), mode="trilinear")
        k = F.interpolate(b, scale_factor=2, mode="nearest-exact")
        padded = F.pad(a, (1, 1, 1, 1, 0, 0), mode="replicate")  # W and D only
        merged = torch.cat([g, h, k, a, F.avg_pool3d(padded, (1, 3, 3), stride=1)], dim=1)
        return self.head(F.dropout(merged, self.p, self.training))


@pytest.mark.parametrize("counts", [(2,), (3, 2), (12, 6, 3)])
def test_awkward_operations_in_slabs_are_exact(counts):
    torch.manual_seed(1)
    assert_equal_runs(Zoo().double(), torch.randn(2, 2, 24, 16, 16, dtype=torch.float64), counts)


def test_eval_mode_and_no_grad_run_in_slabs_too():
    torch.manual_seed(2)
    model = Zoo().double()
    x = torch.randn(1, 2, 24, 16, 16, dtype=torch.float64)
    model(x)  # running statistics that are not the initial ones
    slabbed = slab_network(copy.deepcopy(model).eval(), (4, 2))
    with torch.no_grad():
        assert torch.allclose(slabbed(x), model.eval()(x), rtol=0, atol=1e-12)


class Standardised(nn.Module):
    """Weight standardisation: a convolution's weight computed from parameters alone on every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv3d(2, 4, 3, padding=1), nn.Conv3d(4, 2, 1)

    def forward(self, x):
        w = self.conv.weight
        w = (w - w.mean(dim=(1, 2, 3, 4), keepdim=True)) / (w.std(dim=(1, 2, 3, 4), keepdim=True) + 1e-5)
        return self.head(F.relu(F.conv3d(x, w, self.conv.bias, padding=1)))


def test_weights_computed_from_parameters_are_recomputed_live():
    torch.manual_seed(3)
    assert_equal_runs(Standardised().double(), torch.randn(1, 2, 16, 8, 8, dtype=torch.float64), (4,))


@pytest.mark.parametrize("norm", ["instance", "batch"])
def test_the_papers_network_through_the_tape_equals_its_whole_volume(norm):
    """The paper's UNet3D keeps its own schedule, but its plain forward (concatenations, sliced weights)
    replays exactly too: the generic path needs nothing of it."""
    torch.manual_seed(4)
    model = build_model(ModelConfig(in_channels=2, classes=3, filters=4, norm=norm, dropout=0.0), (32, 32, 32))
    assert_equal_runs(nn.Sequential(model).double(), torch.randn(1, 2, 32, 32, 32, dtype=torch.float64), (4, 2, 2))


class Cropping(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x)[:, :, 1:-1]


class Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        tokens = y.flatten(2)
        weights = torch.softmax(tokens.transpose(1, 2) @ tokens, dim=-1)
        return (tokens @ weights).view_as(y)


@pytest.mark.parametrize("network, name", [(Cropping, "__getitem__"), (Attending, "flatten")])
def test_what_slabs_cannot_split_is_refused_by_name(network, name):
    with pytest.raises(Unsliceable, match=name):
        record(network(), (1, 1, 8, 8, 8))
    model = slab_network(network(), (2,))
    with pytest.raises(Unsliceable, match=name):
        model(torch.randn(1, 1, 8, 8, 8))


@pytest.mark.parametrize("architecture", ["monai:UNETR", "monai:SwinUNETR"])
def test_attention_networks_are_refused_by_name(architecture):
    with pytest.raises(ValueError, match=f"slabs: {architecture} cannot run in slabs: its .*atten"):
        JobConfig(model=ModelConfig(architecture=architecture, in_channels=1), shape=(64, 64, 64), batch=1,
                  strategy=Strategy(slabs=2))


def test_slab_counts_are_checked_against_the_networks_levels():
    model = ModelConfig(architecture="nnunet:PlainConvUNet", in_channels=1, args=json.dumps(SMALL_NNUNET))
    JobConfig(model=model, shape=(32, 32, 32), batch=1, strategy=Strategy(slabs=4, coarse_slabs="2,2,1"))
    with pytest.raises(ValueError, match="--coarse-slabs: nnunet:PlainConvUNet has 3 levels below full resolution"):
        JobConfig(model=model, shape=(32, 32, 32), batch=1, strategy=Strategy(slabs=4, coarse_slabs="2,2,2,2"))


def test_a_level_stores_its_downsampled_input_and_decoder_output_only():
    """What the replay keeps between regions: the input, the maps 8x smaller than the level they leave or
    enter, and the logits; nothing else at full resolution."""
    model = family("nnunet:PlainConvUNet")
    tape = record(model, (1, 2, 32, 32, 32), torch.float64)
    replay = SlabForward(tape, (4, 2))
    full = [s.index for s in tape.steps if s.shape[2] == 32]
    stored_full = [i for i in full if replay.mode[i] == "stored"]
    assert stored_full == [0, tape.output]
    assert all(tape.steps[i].shape[2] < 32 for i in replay.anchor if i != tape.output)
    assert any(tape.steps[i].shape[2] == 16 for i in replay.anchor)
    recomputed = SlabForward(tape, (4, 2), recompute_inputs=1)  # the half-resolution input is not stored
    assert {tape.steps[i].shape[2] for i in recomputed.anchor} == {tape.steps[i].shape[2] for i in replay.anchor}
    assert len(recomputed.anchor) == len(replay.anchor) - 1


def test_train_a_monai_network_in_slabs_and_predict_from_the_run(cli, tmp_path):
    from fullres.data.synth import write_dataset

    data = write_dataset(tmp_path / "msd", train_cases=2, test_cases=1, shape=(24, 24, 16), seed=1, progress=False)
    run = tmp_path / "run"
    code, out, err = cli("train", data, "--out", run, "--model", "monai:SegResNet", "--model-args",
                         '{"init_filters": 8}', "--shape", "16", "16", "16", "--batch", "1", "--epochs", "1",
                         "--workers", "0", "--quiet", "--device", "cpu", "--slabs", "4", "--coarse-slabs", "2")
    assert code == 0, err
    strategy = json.loads((run / "config.json").read_text())["job"]["strategy"]
    assert (strategy["slabs"], strategy["coarse_slabs"]) == (4, "2")
    code, out, err = cli("predict", run, data, "--out", tmp_path / "pred", "--quiet")
    assert code == 0, err
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 1


def test_a_factory_networks_slab_job_is_validated_without_running_its_code(tmp_path, monkeypatch):
    """A job read from a run's file is checked before its code is trusted: its slab levels are not probed."""
    import fullres.nets.registry as registry

    path = tmp_path / "net.py"
    path.write_text("from torch import nn\ndef make(in_channels, out_channels):\n"
                    "    return nn.Conv3d(in_channels, out_channels, 3, padding=1)\n")

    def no_probe(config):
        raise AssertionError("the factory's code ran")

    monkeypatch.setattr(registry, "probed_divisor", no_probe)
    JobConfig(model=ModelConfig(architecture=f"{path}:make", in_channels=1), shape=(16, 16, 16), batch=1,
              strategy=Strategy(slabs=4, coarse_slabs="2", recompute_inputs=1))
