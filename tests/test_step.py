"""Exact-gradient strategies: checkpointing and accumulation must not change the gradient."""

import copy

import pytest
import torch

from fullres.job.config import Strategy
from fullres.engine.losses import soft_dice_loss
from fullres.nets.registry import ModelConfig
from fullres.nets.unet3d import UNet3D
from fullres.job.step import make_grad_scaler, prepare_model, train_step


def tiny_model(dropout=0.2, norm="none"):
    torch.manual_seed(0)
    return UNet3D(ModelConfig(in_channels=2, filters=4, dropout=dropout, norm=norm))


def batch(n=4, shape=(16, 16, 16)):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 2, *shape, generator=generator)
    targets = (torch.rand(n, 1, *shape, generator=generator) > 0.7).float()
    return images, targets


def gradients(model, images, targets, strategy, seed=0):
    prepare_model(model, strategy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the gradients
    torch.manual_seed(seed)
    loss = train_step(model, optimizer, images, targets, soft_dice_loss, strategy)
    return loss, {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_gradients(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def test_checkpointing_keeps_gradients_with_dropout():
    model = tiny_model(dropout=0.3)
    images, targets = batch(2)
    loss_plain, plain = gradients(model, images, targets, Strategy())
    loss_ckpt, ckpt = gradients(copy.deepcopy(model), images, targets, Strategy(checkpointing=True))
    assert loss_plain == pytest.approx(loss_ckpt, rel=1e-6)
    assert_same_gradients(plain, ckpt)


def test_accumulation_equals_one_large_batch():
    model = tiny_model(dropout=0.0)
    images, targets = batch(4)
    loss_full, full = gradients(model, images, targets, Strategy())
    loss_accumulated, accumulated = gradients(copy.deepcopy(model), images, targets, Strategy(accumulate=4))
    assert loss_full == pytest.approx(loss_accumulated, rel=1e-5)
    assert_same_gradients(full, accumulated)


def test_accumulation_update_equals_one_large_batch_adam():
    images, targets = batch(4)
    updated = []
    for strategy in (Strategy(), Strategy(accumulate=2, checkpointing=True)):
        model = prepare_model(tiny_model(dropout=0.0), strategy)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(2):
            train_step(model, optimizer, images, targets, soft_dice_loss, strategy)
        updated.append(model.state_dict())
    for name in updated[0]:
        torch.testing.assert_close(updated[0][name], updated[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_channels_last_and_bf16_run_and_stay_close():
    model = tiny_model(dropout=0.0)
    images, targets = batch(2)
    _, plain = gradients(model, images, targets, Strategy())
    _, channels_last = gradients(copy.deepcopy(model), images, targets, Strategy(channels_last=True))
    # Another layout sums in another order (and differently with each thread count): an elementwise
    # rtol fails on near-zero entries now and then. fp32 summation error scales with the tensor's
    # magnitude, so bound the worst difference by its largest entry (measured: 2-3e-6 at 1 and 2 threads).
    for name in plain:
        scale = plain[name].abs().max()
        assert (plain[name] - channels_last[name]).abs().max() <= 1e-4 * scale, name
    loss_bf16, bf16 = gradients(copy.deepcopy(model), images, targets, Strategy(precision="bf16"))
    assert all(torch.isfinite(g).all() for g in bf16.values())


def test_uneven_accumulation_and_fp16_on_cpu_are_refused():
    model = tiny_model()
    images, targets = batch(3)
    with pytest.raises(ValueError, match="does not split into 2 equal micro-batches"):
        gradients(model, images, targets, Strategy(accumulate=2))
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        make_grad_scaler(Strategy(precision="fp16"), "cpu")


@pytest.mark.parametrize("strategy", [Strategy(slabs=4), Strategy(slabs=3, checkpointing=True),
                                      Strategy(slabs=16, channels_last=True), Strategy(slabs=2, accumulate=2)])
def test_slabs_keep_gradients(strategy):
    """Full-resolution levels slab by slab (halo rows, recomputed in backward): the whole-volume gradient."""
    model = tiny_model(dropout=0.3)
    images, targets = batch(2, shape=(32, 16, 24))
    loss_plain, plain = gradients(model, images, targets, Strategy())
    loss_slabs, slabs = gradients(copy.deepcopy(model), images, targets, strategy)
    assert loss_plain == pytest.approx(loss_slabs, rel=1e-6)
    assert_same_gradients(plain, slabs)


def test_slabs_keep_inference_output():
    model = tiny_model().eval()
    images, _ = batch(1, shape=(24, 16, 16))
    with torch.no_grad():
        whole = model(images)
        model.slabs = 6  # 2 rows each: every slab reads halo rows from both neighbours
        slabbed = model(images)
    torch.testing.assert_close(whole, slabbed, rtol=1e-5, atol=1e-6)


def test_slab_rows_are_even_and_cover_the_volume():
    from fullres.engine.slabs import slab_rows

    assert slab_rows(240, 16)[:2] == [(0, 14), (14, 30)] and slab_rows(240, 16)[-1][1] == 240
    for height, slabs in [(16, 8), (24, 5), (240, 7)]:
        rows = slab_rows(height, slabs)
        assert rows[0][0] == 0 and rows[-1][1] == height and len(rows) == slabs
        assert all(a % 2 == 0 and b - a >= 2 and b == c for (a, b), (c, _) in zip(rows, rows[1:] + [(height, 0)]))
    with pytest.raises(ValueError, match="slabs must be between 1 and 8"):
        slab_rows(16, 9)


def test_slabs_are_refused_with_too_few_rows():
    from fullres.job.config import JobConfig

    with pytest.raises(ValueError, match=r"slabs must be between 1 and 8 \(H=16 rows"):
        JobConfig(shape=(16, 32, 32), strategy=Strategy(slabs=9))
    with pytest.raises(ValueError, match="slabs must be >= 1"):
        Strategy(slabs=0)


def test_concatenation_free_decoder_convolution_equals_the_concatenation():
    """In training the decoders convolve `up` and `skip` separately and add (no concatenated map); the
    output and every gradient equal those of the convolution of the concatenation."""
    model = tiny_model().double()  # float64: the two summation orders then agree to ~1e-12
    generator = torch.Generator().manual_seed(3)
    up = torch.randn(2, 16, 8, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    skip = torch.randn(2, 8, 8, 8, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    results = []
    for concatenated in (True, False):
        model.zero_grad(set_to_none=True)
        up.grad = skip.grad = None
        if concatenated:
            out = model.conv("conv7a", model.concatenate_3(up, skip))
        else:
            out = model.conv_of_concatenation("conv7a", model.concatenate_3, up, skip)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        results.append((out.detach(), up.grad.clone(), skip.grad.clone(), model.conv7a.weight.grad.clone(),
                        model.conv7a.bias.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
