"""The plane-by-plane weight gradient that routes bf16 training around oneDNN's failing AMX kernel."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fullres.kernels import device as fullres_device
from fullres.kernels import onednn as kernels
from fullres.kernels.onednn import PlanarWeightGradients, cpu_workarounds, planar_weight_gradient, wide_planes

BACKWARD = torch.ops.aten.convolution_backward


def reference_weight_gradient(grad, x, weight, stride, padding):
    stride, padding = _triple(stride), _triple(padding)
    return BACKWARD(grad, x, weight, None, stride, padding, [1] * 3, False, [0] * 3, 1, [False, True, False])[1]


def _triple(value):
    return list(value) if isinstance(value, (tuple, list)) else [value] * 3


@pytest.mark.parametrize("kernel,stride,padding,batch,shape", [
    (3, 1, 1, 1, (7, 6, 5)),   # the U-Net's 3x3x3 convolutions
    (3, 1, 0, 2, (7, 6, 5)),   # a slab's: its halo rows instead of padding; a batch of two
    (2, 2, 0, 1, (8, 6, 4)),   # the strided convolution the upsampling's weight gradient is
    (3, 2, 1, 2, (9, 7, 5)),   # odd rows with stride 2
    (1, 1, 0, 1, (5, 4, 3)),   # the prediction layer's 1x1x1
    (3, 1, 3, 1, (3, 4, 4)),   # padding past the kernel's reach: some kernel rows meet no input
    ((3, 1, 2), (2, 1, 3), (1, 0, 1), 1, (9, 6, 7)),  # every size different along H and along the plane
    ((5, 3, 3), (3, 2, 1), (0, 1, 2), 2, (2 + 5, 6, 5)),  # stride along H past the kernel rows... and back
    ((3, 3, 3), (1, 2, 2), (2, 0, 1), 1, (2, 6, 5)),  # a 3-row kernel on 2 rows, padded
])
def test_planar_weight_gradient_equals_the_3d_one(kernel, stride, padding, batch, shape):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *shape, dtype=torch.float64)
    weight = torch.randn(5, 3, *_triple(kernel), dtype=torch.float64)
    grad = torch.randn_like(F.conv3d(x, weight, stride=stride, padding=padding))
    expected = reference_weight_gradient(grad, x, weight, stride, padding)
    got = planar_weight_gradient(grad, x, weight, _triple(stride), _triple(padding))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_planar_weight_gradient_takes_channels_last_maps():
    torch.manual_seed(1)
    x = torch.randn(1, 4, 6, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    weight = torch.randn(2, 4, 3, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    grad = torch.randn(1, 2, 6, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(planar_weight_gradient(grad, x, weight, [1] * 3, [1] * 3),
                               reference_weight_gradient(grad, x, weight, 1, 1), rtol=1e-12, atol=1e-12)


def test_wide_planes_are_those_the_amx_kernel_failed_on():
    assert wide_planes((256, 256), 64) and wide_planes((512, 512), 2) and wide_planes((128, 128), 2)
    assert not wide_planes((128, 128), 4)  # the 128^3 job's planes ran
    assert not wide_planes((240, 144), 144)  # so did the paper's image
    assert not wide_planes((64, 64), 1)
    assert wide_planes((128, 128), 4, channels_last=False)  # a contiguous one hung


def test_the_upsamplings_weight_gradient_is_judged_by_its_fine_plane(monkeypatch):
    seen = []
    monkeypatch.setattr(kernels, "wide_planes", lambda plane, rows, channels_last: seen.append((plane, rows)) or False)
    fine, coarse = torch.randn(1, 2, 8, 16, 12, dtype=torch.bfloat16), torch.randn(1, 2, 4, 8, 6, dtype=torch.bfloat16)
    weight = torch.randn(2, 2, 2, 2, 2, dtype=torch.bfloat16)
    with PlanarWeightGradients():  # the strided convolution whose weight gradient the 2x2x2 upsampling takes
        BACKWARD(coarse, fine, weight, None, [2] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1, [False, True, False])
    assert seen == [((16, 12), 4)]


@pytest.mark.parametrize("mask", [[True, True, True], [False, True, False], [True, True, False]])
def test_the_mode_returns_what_aten_returns(monkeypatch, mask):
    monkeypatch.setattr(kernels, "wide_planes", lambda plane, rows, channels_last: True)
    torch.manual_seed(3)
    layout = torch.channels_last_3d
    x = torch.randn(2, 4, 6, 8, 8).to(torch.bfloat16).contiguous(memory_format=layout)
    weight = torch.randn(3, 4, 3, 3, 3).to(torch.bfloat16).contiguous(memory_format=layout)
    grad = torch.randn(2, 3, 6, 8, 8).to(torch.bfloat16).contiguous(memory_format=layout)
    args = (grad, x, weight, [3], [1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, mask)
    expected = BACKWARD(*args)
    with PlanarWeightGradients():
        got = BACKWARD(*args)
    for mine, theirs in zip(got, expected):
        assert (mine is None) == (theirs is None)
        if theirs is not None:
            assert (mine.shape, mine.dtype, mine.stride()) == (theirs.shape, theirs.dtype, theirs.stride())
            torch.testing.assert_close(mine.float(), theirs.float(), rtol=0, atol=2 ** -6 * theirs.float().abs().max().item())


def test_the_mode_computes_bf16_weight_gradients_plane_by_plane(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return planar_weight_gradient(*args)

    monkeypatch.setattr(kernels, "planar_weight_gradient", counted)
    monkeypatch.setattr(kernels, "wide_planes", lambda plane, rows, channels_last: True)
    torch.manual_seed(2)
    conv = torch.nn.Conv3d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 8, 8, 8, requires_grad=True)
    gradients = []
    for mode in (PlanarWeightGradients(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)):
        conv.zero_grad()
        x.grad = None
        with mode:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
            (out.float() ** 2).sum().backward()
        gradients.append((x.grad.clone(), conv.weight.grad.clone(), conv.bias.grad.clone()))
    assert calls == [(1, 6, 8, 8, 8)]  # once, under the mode only
    (x_planar, w_planar, b_planar), (x_own, w_own, b_own) = gradients
    assert torch.equal(x_planar, x_own)  # the input gradient is PyTorch's own
    # bf16 sums in another order: within bf16's rounding of the largest entry
    torch.testing.assert_close(w_planar, w_own, rtol=0, atol=2 ** -7 * w_own.abs().max().item())
    torch.testing.assert_close(b_planar, b_own, rtol=0, atol=2 ** -7 * b_own.abs().max().item())


def test_fp32_and_narrow_planes_run_pytorchs_own_kernel(monkeypatch):
    monkeypatch.setattr(kernels, "planar_weight_gradient", lambda *args: pytest.fail("decomposed"))
    conv = torch.nn.Conv3d(2, 2, 3, padding=1)
    with PlanarWeightGradients():
        conv(torch.randn(1, 2, 4, 4, 4)).sum().backward()  # fp32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(torch.randn(1, 2, 4, 4, 4))
        out.float().sum().backward()  # bf16 on 4 x 4 planes
    assert conv.weight.grad is not None


def test_cpu_workarounds_apply_to_bf16_on_cpus_with_native_bf16(monkeypatch):
    monkeypatch.setattr(fullres_device, "amx_bf16", lambda: True)
    assert cpu_workarounds("bf16", "cpu").wide_planes
    assert not isinstance(cpu_workarounds("fp32", "cpu"), PlanarWeightGradients)
    assert not isinstance(cpu_workarounds("bf16", "cuda"), PlanarWeightGradients)
    monkeypatch.setattr(fullres_device, "amx_bf16", lambda: False)
    monkeypatch.setattr(fullres_device, "avx512_bf16", lambda: True)
    assert not cpu_workarounds("bf16", "cpu").wide_planes  # maps with fewer rows than the kernel only
    monkeypatch.setattr(fullres_device, "avx512_bf16", lambda: False)
    assert not isinstance(cpu_workarounds("bf16", "cpu"), PlanarWeightGradients)


@pytest.mark.parametrize("rows,kernel,padding,planar", [
    (2, 3, 1, True),    # a 16^3 U-Net's bottleneck: 2 rows, 3x3x3 (garbage from oneDNN's AVX-512 bf16 kernel)
    (4, 5, 2, True),
    (3, 3, 1, False),   # as many rows as the kernel: oneDNN's own
    (4, 3, 0, False),   # a slab's 2 rows with their halos
])
def test_maps_with_fewer_rows_than_the_kernel_are_taken_plane_by_plane(monkeypatch, rows, kernel, padding, planar):
    calls = []

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return planar_weight_gradient(*args)

    monkeypatch.setattr(kernels, "planar_weight_gradient", counted)
    monkeypatch.setattr(kernels, "wide_planes", lambda *args: pytest.fail("the AMX rule asked without AMX"))
    torch.manual_seed(5)
    x, weight = torch.randn(1, 32, rows, 5, 5), torch.randn(32, 32, kernel, 3, 3)
    pad = [padding, 1, 1]
    grad = torch.randn_like(F.conv3d(x, weight, padding=pad))
    expected = reference_weight_gradient(grad.double(), x.double(), weight.double(), 1, pad)
    with PlanarWeightGradients(wide_planes=False):
        got = BACKWARD(grad.bfloat16(), x.bfloat16(), weight.bfloat16(), None, [1] * 3, pad, [1] * 3, False,
                       [0] * 3, 1, [False, True, False])[1]
    assert bool(calls) == planar
    if planar:  # within bf16's rounding of the float64 sums
        assert ((got.double() - expected).norm() / expected.norm()).item() < 0.01


def test_a_bf16_training_step_takes_them_plane_by_plane(monkeypatch):
    from fullres.job.config import JobConfig, Strategy
    from fullres.nets.registry import ModelConfig
    from fullres.engine.losses import LOSSES
    from fullres.job.step import build_training, train_step

    calls = []

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return planar_weight_gradient(*args)

    # 24 rows: 3 at the bottleneck, as many as the kernel, so that oneDNN's own kernels are right everywhere
    job = JobConfig(model=ModelConfig(filters=2, dropout=0.0), shape=(24, 16, 16), batch=1,
                    strategy=Strategy(precision="bf16", channels_last=True))
    images, targets = torch.randn(1, 4, 24, 16, 16), torch.randint(0, 2, (1, 1, 24, 16, 16)).float()
    gradients = []
    monkeypatch.setattr(fullres_device, "avx512_bf16", lambda: False)
    for amx in (True, False):
        monkeypatch.setattr(fullres_device, "amx_bf16", lambda: amx)
        monkeypatch.setattr(kernels, "planar_weight_gradient", counted)
        monkeypatch.setattr(kernels, "wide_planes", lambda plane, rows, channels_last: True)
        torch.manual_seed(4)
        training = build_training(job, "cpu")
        training.optimizer.step = lambda: None  # keep the gradients as computed
        train_step(training.model, training.optimizer, images, targets, LOSSES["dice"], job.strategy)
        gradients.append({name: p.grad.clone() for name, p in training.model.named_parameters()})
        if amx:
            assert len(calls) >= 15  # every convolution's weight gradient: 14 3x3x3 (3 split in two), 1x1x1, ...
            calls.clear()
    assert not calls  # without AMX, PyTorch's own kernels
    planar, own = gradients
    for name, gradient in own.items():
        torch.testing.assert_close(planar[name], gradient, rtol=0, atol=2 ** -6 * gradient.abs().max().item() + 1e-12,
                                   msg=name)


def test_relu_in_place_has_pytorchs_gradient_written_into_the_incoming_one():
    """relu_'s gradient is F.relu's bit for bit; it is the incoming gradient itself, zeroed where the output
    is 0, unless that gradient is a view (then a new map, and the view's base is left alone)."""
    from fullres.kernels.layers import relu_

    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, 6, requires_grad=True)
    g = torch.randn(2, 3, 4, 5, 6)
    reference = torch.autograd.grad(F.relu(x.clone(), inplace=True), x, g.clone())[0]
    incoming = g.clone()
    (dx,) = torch.autograd.grad(relu_(x.clone()), x, incoming)
    assert torch.equal(dx, reference) and dx.data_ptr() == incoming.data_ptr() and not torch.equal(incoming, g)
    base = torch.cat([g, g], dim=1)
    view = base[:, :3]
    (dx,) = torch.autograd.grad(relu_(x.clone()), x, view)
    assert torch.equal(dx, reference) and torch.equal(base, torch.cat([g, g], dim=1))
    with torch.no_grad():
        y = x.detach().clone()
        assert relu_(y) is y and torch.equal(y, F.relu(x.detach()))


@pytest.mark.parametrize("norm", ["none", "instance", "batch"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_unets_gradients_are_those_of_pytorchs_relu(monkeypatch, norm, precision):
    """The paper's network takes ReLU's gradient in place: every weight's gradient equals the one with
    PyTorch's own in-place ReLU, bit for bit, in both layouts, with and without checkpointing, at one
    thread (where ATen's slow path returns some gradients in another layout than the maps') and two."""
    from fullres.nets import unet3d
    from fullres.nets.registry import ModelConfig, build_model

    config = ModelConfig(in_channels=2, filters=4, classes=3, norm=norm, dropout=0.2)
    torch.manual_seed(0)
    model = build_model(config, (16, 16, 16))
    x = torch.randn(2, 2, 16, 16, 16)

    def gradients(channels_last: bool, checkpointing: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.checkpointing = checkpointing
        torch.manual_seed(1)
        images = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
        with cpu_workarounds(precision, "cpu"):
            with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                out = model(images)
            out.float().square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    threads = torch.get_num_threads()
    try:
        for torch_threads, channels_last, checkpointing in itertools.product((1, 2), (False, True), (False, True)):
            torch.set_num_threads(torch_threads)
            ours = gradients(channels_last, checkpointing)
            with monkeypatch.context() as patch:
                patch.setattr(unet3d, "relu_", lambda t: F.relu(t, inplace=True))
                theirs = gradients(channels_last, checkpointing)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs)), (torch_threads, channels_last, checkpointing)
    finally:
        torch.set_num_threads(threads)
