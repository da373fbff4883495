"""fullres from Python (fullres.api): estimate and plan a researcher's own nn.Module with their loss and
optimizer, exactly as the CLI's dry run does for a named network."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fullres
from fullres.errors import UserError
from fullres.nets.registry import ModelConfig
from fullres.nets.unet3d import UNet3D

SHAPE = (4, 16, 16, 16)


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv3d(8, 2, 1))


def test_the_public_names():
    assert {"estimate", "plan", "checkpointed", "Estimate", "Plan"} <= set(fullres.__all__)
    assert fullres.estimate is fullres.api.estimate


def test_an_instance_is_estimated_as_the_same_network_by_name():
    instance = UNet3D(ModelConfig(in_channels=4, filters=2))
    mine = fullres.estimate(instance, SHAPE, batch=2)
    named = fullres.estimate("unet3d", SHAPE, batch=2, model_args={"filters": 2})
    without_runtime = lambda result: result.peak_bytes - result.breakdown["runtime"]  # noqa: E731
    assert without_runtime(mine) == without_runtime(named) > 0
    assert {k: v for k, v in mine.breakdown.items() if k != "runtime"} == \
           {k: v for k, v in named.breakdown.items() if k != "runtime"}
    assert mine.modelled == named.modelled == ()  # both runtime terms measured: in this process, and in a fresh one


def test_an_instances_runtime_term_is_measured_in_process_and_cached(monkeypatch):
    from fullres.cost import measure, runtime

    net = small_net()
    first = fullres.estimate(net, SHAPE)
    # what this process needs beyond the tensors (0 in a process that has already run such steps)
    assert first.breakdown["runtime"] >= 0 and first.modelled == ()
    monkeypatch.setattr(measure, "reset_hwm", lambda: (_ for _ in ()).throw(AssertionError("measured again")))
    assert fullres.estimate(small_net(), SHAPE).breakdown["runtime"] == first.breakdown["runtime"]  # cached
    wider = nn.Sequential(nn.Conv3d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 2, 1))
    monkeypatch.setattr(measure, "reset_hwm", lambda: False)  # a process whose peak cannot be read
    assert fullres.estimate(wider, SHAPE).modelled == (
        "runtime (this process's peak could not be read: a modelled constant)",)
    assert runtime.CALIBRATION_VERSION >= 1  # the in-process term's cache, shared with fullres.cost


def test_the_instance_is_left_as_it_was():
    net = small_net()
    before = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    fullres.estimate(net, SHAPE)
    assert all(torch.equal(before[name], tensor) and tensor.device.type == "cpu"
               for name, tensor in net.state_dict().items())
    assert not any(name.startswith("python:") for name in fullres.nets.registry.MODELS)  # its private name is gone


def test_the_optimizer_state_is_what_the_optimizer_allocates():
    net = small_net()
    parameters = sum(p.numel() * p.element_size() for p in net.parameters())
    adam = fullres.estimate(net, SHAPE)
    momentum = fullres.estimate(net, SHAPE, optimizer=functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9))
    plain = fullres.estimate(net, SHAPE, optimizer=torch.optim.SGD)
    assert adam.breakdown["parameters"] == momentum.breakdown["parameters"] == parameters
    assert adam.breakdown["optimizer_state"] >= 2 * parameters  # exp_avg and exp_avg_sq (+ step counters)
    assert momentum.breakdown["optimizer_state"] == parameters  # one momentum buffer per parameter
    assert plain.breakdown["optimizer_state"] == 0


def test_the_users_loss_runs_on_the_fake_step():
    seen = []

    def loss(logits, targets):
        seen.append((type(logits).__name__, tuple(logits.shape), targets.dtype))
        return nn.functional.cross_entropy(logits, targets[:, 0])

    result = fullres.estimate(small_net(), SHAPE, batch=2, loss=loss)
    assert result.peak_bytes > 0
    assert seen and seen[-1] == ("FakeTensor", (2, 2, 16, 16, 16), torch.int64)  # the step at batch 2, faked


def test_a_factory_and_a_monai_instance():
    from monai.networks.nets import SegResNet

    factory = fullres.estimate(lambda i, o, width=4: nn.Conv3d(i, o, 3, padding=1), SHAPE, classes=3,
                               model_args={"width": 4})
    assert factory.breakdown["parameters"] == (3 * 4 * 27 + 3) * 4
    segresnet = fullres.estimate(SegResNet(spatial_dims=3, in_channels=4, out_channels=3, init_filters=8), SHAPE)
    assert segresnet.job.model.classes == 3 and segresnet.peak_bytes > factory.peak_bytes


def test_plan_finds_the_largest_batch_that_fits():
    net = small_net()
    one = fullres.estimate(net, SHAPE, batch=1).peak_bytes
    four = fullres.estimate(net, SHAPE, batch=4).peak_bytes
    budget = (four + fullres.estimate(net, SHAPE, batch=5).peak_bytes) // 2
    found = fullres.plan(net, SHAPE, budget)
    assert found.fits and found.batch == 4 and found.estimate.peak_bytes == four <= budget
    refused = fullres.plan(net, SHAPE, one - 1)
    assert not refused.fits and refused.batch == 0
    shrunk = fullres.plan(net, (4, 64, 16, 16), one, shrink_shape=True)
    assert shrunk.fits and shrunk.batch == 1 and shrunk.input_shape[1] < 64


def test_checkpointed_wraps_the_users_model_and_keeps_its_gradients():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU()),
                        nn.Sequential(nn.Conv3d(4, 1, 1)))
    x = torch.randn(1, 2, 8, 8, 8)
    net(x).sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    assert fullres.checkpointed(net) is net
    net(x).sum().backward()
    for expected, got in zip(plain, (p.grad for p in net.parameters())):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("call, says", [
    (lambda: fullres.estimate(small_net(), (16, 16, 16)), "input_shape must be (channels, H, W, D)"),
    (lambda: fullres.estimate(small_net(), (3, 16, 16, 16)), "does not take"),
    (lambda: fullres.estimate(small_net(), SHAPE, loss="nope"), "loss must be one of"),
    (lambda: fullres.estimate(small_net(), SHAPE, optimizer=42), "optimizer"),
    (lambda: fullres.estimate(small_net(), SHAPE, strategy={"slabs": 0}), "slabs must be >= 1"),
    (lambda: fullres.estimate("nonet", SHAPE), "unknown network 'nonet'"),
    (lambda: fullres.estimate(lambda i, o: nn.Conv3d(i, o, 1), SHAPE), "classes"),
])
def test_bad_arguments_are_one_clear_error(call, says):
    with pytest.raises(UserError, match=None) as refused:
        call()
    assert says in str(refused.value)
