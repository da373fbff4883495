"""Slabs at every level (fullres.engine.slabs): the whole-volume forward and gradients, normalisation included."""

import copy
from dataclasses import replace

import pytest
import torch

from fullres.job.config import JobConfig, Strategy
from fullres.engine.losses import soft_dice_loss
from fullres.nets.registry import ModelConfig
from fullres.nets.unet3d import UNet3D
from fullres.engine.slabs import row_dropout, slab_rows, take_rows
from fullres.job.step import prepare_model, train_step

SHAPE = (40, 8, 8)  # H = 40: levels of 40, 20, 10 and 5 rows (the coarsest odd)


def network(norm, dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    filters = 8 if norm == "group" else 4  # group norm: 8 groups
    return UNet3D(ModelConfig(in_channels=2, filters=filters, dropout=dropout, norm=norm)).to(dtype)


def data(n=1, shape=SHAPE, dtype=torch.float64):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 2, *shape, generator=generator).to(dtype)
    targets = (torch.rand(n, 1, *shape, generator=generator) > 0.7).to(dtype)
    return images, targets


def run(model, images, targets, slabs, checkpointing=False, seed=0):
    model.slabs, model.checkpointing = slabs, checkpointing
    torch.manual_seed(seed)
    output = model(images)
    soft_dice_loss(output, targets).backward()
    return output.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(a, b, rtol=1e-9, atol=1e-12):
    assert a.keys() == b.keys()
    for name in a:  # atol: a convolution's bias before a norm has a gradient of 0 up to rounding
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("norm,slabs", [("none", (3, 3, 2, 2)), ("instance", (3, 3, 2, 2)), ("group", (5, 1, 3, 1)),
                                        ("batch", (1, 2, 1, 2))])
def test_every_level_in_slabs_gives_the_whole_volume_gradients(norm, slabs):
    """Odd slab counts, slabs of uneven heights (40 rows in 3: 12, 14, 14; 5 rows in 2: 2, 3), float64."""
    model = network(norm)
    images, targets = data(2 if norm == "batch" else 1)
    whole_model, slab_model = copy.deepcopy(model), copy.deepcopy(model)
    whole_output, whole = run(whole_model, images, targets, 1)
    slab_output, slabbed = run(slab_model, images, targets, slabs)
    torch.testing.assert_close(whole_output, slab_output, rtol=1e-10, atol=1e-12)
    assert_same(whole, slabbed)
    if norm == "batch":  # running statistics updated once, as the whole-volume forward does
        for name, buffer in whole_model.named_buffers():
            torch.testing.assert_close(buffer, dict(slab_model.named_buffers())[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("norm,slabs,recompute", [("none", (3, 3, 2, 2), 1), ("instance", (3, 3, 2, 2), 3),
                                                  ("batch", (2, 3, 2, 2), 2)])
def test_recomputed_level_inputs_give_the_whole_volume_gradients(norm, slabs, recompute):
    """Levels' inputs recomputed from the slabbed level above wherever read (nothing of those levels stored),
    with dropout (hashed: every recomputation draws the same mask) and checkpointing: the outputs and gradients
    of the schedule that stores them, which equal the whole volume's."""
    model = network(norm, dropout=0.3)
    images, targets = data(2 if norm == "batch" else 1)
    stored_model, recomputed_model = copy.deepcopy(model), copy.deepcopy(model)
    stored_output, stored = run(stored_model, images, targets, slabs, checkpointing=True)
    recomputed_model.recompute_inputs = recompute
    recomputed_output, recomputed = run(recomputed_model, images, targets, slabs, checkpointing=True)
    torch.testing.assert_close(stored_output, recomputed_output, rtol=1e-10, atol=1e-12)
    assert_same(stored, recomputed)
    recomputed_model.eval()  # no dropout (batch norm: the running statistics of the step): the whole volume's forward
    whole_model = copy.deepcopy(recomputed_model)
    whole_model.slabs, whole_model.recompute_inputs = 1, 0
    with torch.no_grad():
        torch.testing.assert_close(whole_model(images), recomputed_model(images), rtol=1e-10, atol=1e-12)


def test_recomputed_inputs_are_not_stored_and_are_validated():
    """The dry run: recomputing the half-resolution level's input takes its stored maps (and their gradient)
    off the peak; a recomputed input between whole levels is refused, and at_shape keeps only what still applies."""
    from fullres.cost.dryrun import dryrun

    stored = JobConfig(shape=(64, 32, 32), batch=1, model=ModelConfig(filters=2),
                       strategy=Strategy(checkpointing=True, slabs=8, coarse_slabs="4,2"))
    recomputed = stored.with_(strategy=Strategy(checkpointing=True, slabs=8, coarse_slabs="4,2", recompute_inputs=1))
    assert dryrun(recomputed, steps=1).breakdown["activations"] < dryrun(stored, steps=1).breakdown["activations"]
    assert recomputed.strategy.describe() == "fp32 + checkpointing + slabs 8,4,2 + 1 level input recomputed"
    assert JobConfig.from_json(recomputed.to_json()) == recomputed
    deeper = stored.with_(strategy=Strategy(slabs=8, coarse_slabs="4,2", recompute_inputs=2))
    assert deeper.at_shape((16, 8, 8)).strategy.recompute_inputs == 2  # 16, 8, 4 rows: slabs 8, 4, 2 still
    assert deeper.at_shape((8, 8, 8)).strategy.recompute_inputs == 1  # level 1/4 has 2 rows: whole
    with pytest.raises(ValueError, match=r"--recompute-inputs 2: the levels that make and read each recomputed input "
                                         r"must be slabbed, and level 1/4 runs whole"):
        JobConfig(shape=(64, 32, 32), strategy=Strategy(slabs=8, coarse_slabs="4", recompute_inputs=2))
    with pytest.raises(ValueError, match="has 3 levels whose input can be recomputed, got 4"):
        JobConfig(shape=(64, 32, 32), strategy=Strategy(slabs=8, coarse_slabs="4,2,2", recompute_inputs=4))
    with pytest.raises(ValueError, match="recompute_inputs must be >= 0"):
        Strategy(recompute_inputs=-1)


def test_recompute_inputs_flag(capsys):
    from fullres.cli import main

    assert main(["estimate", "--shape", "32", "32", "32", "--batch", "1", "--recompute-inputs", "0"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:  # argparse's refusal
        main(["estimate", "--shape", "32", "32", "32", "--recompute-inputs", "-1"])
    assert refused.value.code == 2
    assert capsys.readouterr().err.strip().endswith("argument --recompute-inputs: -1 must be at least 0")
    assert main(["estimate", "--shape", "32", "32", "32", "--slabs", "4", "--recompute-inputs", "1"]) != 0
    assert capsys.readouterr().err.strip() == (
        "fullres estimate: error: --recompute-inputs 1: the levels that make and read each recomputed input must be "
        "slabbed, and level 1/2 runs whole (see --slabs, --coarse-slabs)")


def test_normalise_and_relu_keeps_only_its_output_and_has_the_exact_gradient():
    from fullres.engine.slabs import _NormReLU

    torch.manual_seed(0)
    y = torch.randn(2, 3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    for scale_shape in ((2, 3, 1, 1, 1), (1, 3, 1, 1, 1)):  # per sample and channel (instance, group); per channel
        scale = torch.randn(scale_shape, dtype=torch.float64, requires_grad=True)
        shift = torch.randn(scale_shape, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(_NormReLU.apply, (y, scale, shift))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        z = _NormReLU.apply(y, scale, shift)
    assert [tuple(t.shape) for t in saved if t.numel() > 3] == [tuple(y.shape)] and saved[0].data_ptr() == z.data_ptr()


def test_slab_heights_are_exact_at_every_level():
    assert slab_rows(40, 3) == [(0, 12), (12, 26), (26, 40)]
    assert slab_rows(5, 2) == [(0, 2), (2, 5)]  # an odd (coarsest) level: its last row in the last slab
    with pytest.raises(ValueError, match="between 1 and 2"):
        slab_rows(5, 3)


@pytest.mark.parametrize("norm", ["instance", "group"])
def test_norm_in_full_resolution_slabs_through_the_training_step(norm):
    """--norm instance --slabs 3 (and group norm), fp32, with and without --checkpointing: the whole-volume step."""
    model = network(norm, dropout=0.2, dtype=torch.float32)
    images, targets = data(1, shape=(24, 8, 8), dtype=torch.float32)
    results = []
    for strategy in (Strategy(), Strategy(slabs=3), Strategy(slabs=3, coarse_slabs="3", checkpointing=True)):
        job_model = prepare_model(copy.deepcopy(model), strategy)
        optimizer = torch.optim.SGD(job_model.parameters(), lr=0.0)
        torch.manual_seed(0)
        loss = train_step(job_model, optimizer, images, targets, soft_dice_loss, strategy)
        results.append((loss, {name: p.grad.clone() for name, p in job_model.named_parameters()}))
    for loss, gradients in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        scale = max(g.abs().max() for g in results[0][1].values())
        for name, gradient in gradients.items():  # fp32 sums in another order: bound by the largest gradient
            assert (gradient - results[0][1][name]).abs().max() <= 1e-4 * scale, name


def test_inference_in_slabs_equals_the_whole_volume():
    """No gradients, eval mode: instance norm still takes each volume's statistics; batch norm its running ones."""
    images, _ = data(1)
    for norm in ("instance", "batch"):
        model = network(norm).eval()
        with torch.no_grad():
            whole = model(images)
            model.slabs = (5, 3, 2, 2)
            slabbed = model(images)
        torch.testing.assert_close(whole, slabbed, rtol=1e-10, atol=1e-12)


def test_dropout_in_slabs_is_one_mask_whatever_the_slabs():
    """A slabbed level's dropout hashes each voxel's index: every slab count (halos, recomputed skips) draws the
    same mask, so outputs and gradients agree across schedules; and it drops about p of the voxels."""
    model = network("instance", dropout=0.5)
    images, targets = data()
    first_output, first = run(copy.deepcopy(model), images, targets, (2, 2, 2, 2))
    second_output, second = run(copy.deepcopy(model), images, targets, (3, 5, 5, 2), checkpointing=True)
    torch.testing.assert_close(first_output, second_output, rtol=1e-10, atol=1e-12)
    assert_same(first, second)
    with torch.no_grad():
        no_dropout = network("instance")
        no_dropout.slabs = (2, 2, 2, 2)
        assert not torch.allclose(first_output, no_dropout(images))

    ones = torch.ones(2, 8, 40, 16, 16)
    dropped = row_dropout(ones, 0.3, seed=7, first_row=0, height=40)
    assert dropped.unique().tolist() == [0.0, pytest.approx(1 / 0.7)]
    assert abs((dropped == 0).float().mean().item() - 0.3) < 0.01
    rows = row_dropout(ones[:, :, 11:23], 0.3, seed=7, first_row=11, height=40)  # any rows: the same mask
    torch.testing.assert_close(rows, dropped[:, :, 11:23])
    assert not torch.equal(row_dropout(ones, 0.3, seed=8, first_row=0, height=40), dropped)


def test_slab_schedules_in_the_job():
    assert Strategy(slabs=16, coarse_slabs="8, 4,1").coarse_slabs == "8,4"
    assert Strategy(slabs=16, coarse_slabs="8,4,1").slab_counts == (16, 8, 4)
    assert Strategy(slabs=4, coarse_slabs="1,1").slab_counts == (4,) and not Strategy().slabbed
    assert Strategy(coarse_slabs="1,2").slabbed and Strategy(coarse_slabs="1,2").describe() == "fp32 + slabs 1,1,2"
    job = JobConfig(model=ModelConfig(norm="instance"), shape=(32, 32, 32), strategy=Strategy(slabs=2, coarse_slabs="2"))
    assert JobConfig.from_json(job.to_json()) == job
    assert job.at_shape((16, 16, 16)).strategy.slab_counts == (2, 2)
    assert JobConfig(shape=(64, 32, 32), strategy=Strategy(slabs=16, coarse_slabs="8,4,4")).at_shape(
        (16, 16, 16)).strategy.slab_counts == (8, 4, 2)
    with pytest.raises(ValueError, match="--coarse-slabs must be counts separated by commas"):
        Strategy(coarse_slabs="8;4")
    with pytest.raises(ValueError, match="--coarse-slabs counts must be >= 1"):
        Strategy(coarse_slabs="8,0")
    with pytest.raises(ValueError, match=r"--coarse-slabs \(level 1/4\): slabs must be between 1 and 4 \(H=8 rows"):
        JobConfig(shape=(32, 32, 32), strategy=Strategy(coarse_slabs="2,5"))
    with pytest.raises(ValueError, match="3 levels below full resolution, got 4 counts"):
        JobConfig(shape=(64, 32, 32), strategy=Strategy(coarse_slabs="2,2,2,2"))


def test_coarse_slabs_flag(capsys):
    from fullres.cli import main

    assert main(["estimate", "--shape", "32", "32", "32", "--batch", "1", "--norm", "instance", "--slabs", "4",
                 "--coarse-slabs", "2,2", "--filters", "2"]) == 0
    capsys.readouterr()
    assert main(["estimate", "--shape", "32", "32", "32", "--coarse-slabs", "2,x"]) != 0
    assert capsys.readouterr().err.strip() == ("fullres estimate: error: --coarse-slabs must be counts separated by "
                                               "commas (e.g. 8,4,2), got '2,x'")


def test_plan_offers_every_level_schedules_with_their_counted_flops(monkeypatch):
    import fullres.cost.runtime as runtime
    from fullres.cost.flops import count_step_flops
    from fullres.cost.plan import candidate_strategies, slab_options, slab_schedules, with_slabs

    # Without normalisation: instance norm's statistics passes make the slabbed dry run ~7x slower (their
    # gradients are tested above); the runtime term, measured by a real step, is not what is under test.
    monkeypatch.setattr(runtime, "measured_runtime_bytes", lambda job: 0)
    job = JobConfig(model=ModelConfig(filters=1, norm="none"), shape=(16, 16, 16), batch=2)
    assert slab_schedules(job) == [(8, 4, 2, 1)]  # 16 rows hold 8 slabs, 8 rows 4, 4 rows 2, 2 rows 1
    assert slab_schedules(JobConfig(shape=(240, 240, 144), batch=1)) == [
        (8, 4, 2, 1), (16, 8, 4, 2), (32, 16, 8, 4), (64, 32, 16, 8), (120, 60, 30, 15)]
    assert slab_schedules(JobConfig(model=ModelConfig(architecture="intel-unet", norm="batch"), shape=(32, 32, 32))) == [
        (8, 4, 2, 1, 1), (16, 8, 4, 2, 1)]  # any network through its tape: five levels
    assert slab_schedules(JobConfig(model=ModelConfig(architecture="monai:UNETR", in_channels=1), shape=(32, 32, 32))) == []
    names = [name for name, _ in candidate_strategies(job, allow_bf16=False)]
    assert names[-1] == "checkpointing + accumulate x2 + slabs 8,4,2 + 1 level input recomputed"
    assert "checkpointing + accumulate x2 + slabs 8,4,2" in names
    candidate = with_slabs(job, (8, 4, 2, 1))
    assert candidate.batch == 1 and candidate.strategy.accumulate == 2 and candidate.strategy.slab_counts == (8, 4, 2)
    shown = []
    option, recomputed = slab_options(job, budget_bytes=1, progress=lambda items: shown.extend(items) or items)
    assert shown == [((8, 4, 2, 1), 0), ((8, 4, 2, 1), 1)]  # the progress bar is given every schedule, once
    assert option.counts == recomputed.counts == (8, 4, 2, 1) and not option.fits and not recomputed.fits
    assert slab_options(job, budget_bytes=option.peak_bytes) == [replace(option, fits=True)]  # the first that fits ends it
    assert (option.recompute_inputs, recomputed.recompute_inputs) == (0, 1)
    assert option.flops == count_step_flops(candidate)  # the dry run's count on fake tensors is the real count
    assert recomputed.flops == count_step_flops(with_slabs(job, (8, 4, 2, 1), 1)) > option.flops
    plain = count_step_flops(job)
    assert option.overhead == pytest.approx(option.flops / plain - 1) and option.overhead > 0


def test_plan_looks_past_a_schedule_that_fits_on_the_reference_kernel(monkeypatch):
    """A schedule that fits but runs a weight gradient on oneDNN's reference kernel (~1000x slower) does not
    end the search: a deeper one may avoid it."""
    import fullres.cost.plan as plan
    from fullres.cost.dryrun import DryRunResult

    job = JobConfig(model=ModelConfig(filters=1, norm="none"), shape=(16, 16, 16), batch=1)
    shown = []

    def dry_run(candidate, device="cpu"):
        slow = () if candidate.strategy.recompute_inputs else ("backward: conv1a",)
        return DryRunResult(peak_bytes=1, breakdown={}, peak_at="", reference_kernels=slow)

    monkeypatch.setattr(plan, "dryrun_estimate", dry_run)
    options = plan.slab_options(job, budget_bytes=2, progress=lambda items: shown.extend(items) or items)
    assert [option.recompute_inputs for option in options] == [0, 1] and all(option.fits for option in options)


@pytest.mark.parametrize("memory_format", [torch.channels_last_3d, torch.contiguous_format])
def test_rows_taken_have_the_slice_gradient_in_the_layout_it_arrives_in(memory_format):
    x = torch.randn(2, 3, 10, 4, 5, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    weight = torch.randn(2, 3, 6, 4, 5, dtype=torch.float64).contiguous(memory_format=memory_format)
    mine, = torch.autograd.grad((take_rows(x, 3, 9) * weight).sum(), x)
    theirs, = torch.autograd.grad((x[:, :, 3:9] * weight).sum(), x)
    assert torch.equal(mine, theirs)
    assert mine.is_contiguous(memory_format=memory_format)
    assert theirs.is_contiguous()  # PyTorch's own: NCDHW, whatever the incoming layout
    assert take_rows(x, 0, 10) is x
