"""Selective checkpointing (--checkpoint-levels K): only the K finest resolutions recompute, exactly."""

import copy

import pytest

from fullres.cost import flops
from fullres.cli import main
from fullres.job.config import JobConfig, Strategy
from fullres.cost.dryrun import dryrun
from fullres.cost.plan import candidate_strategies
from fullres.nets.registry import ModelConfig

from test_step import assert_same_gradients, batch, gradients, tiny_model

TINY = JobConfig(model=ModelConfig(in_channels=2, filters=4), shape=(16, 16, 16), batch=1)


@pytest.mark.parametrize("strategy", [
    Strategy(checkpointing=True, checkpoint_levels=1),
    Strategy(checkpointing=True, checkpoint_levels=3),
    Strategy(checkpointing=True, checkpoint_levels=2, slabs=2),  # the whole coarse levels under the runner
], ids=["finest", "three", "with-slabs"])
def test_selected_levels_keep_the_gradients(strategy):
    model = tiny_model(dropout=0.3)
    images, targets = batch(2)
    loss_plain, plain = gradients(model, images, targets, Strategy())
    loss_selected, selected = gradients(copy.deepcopy(model), images, targets, strategy)
    assert loss_plain == pytest.approx(loss_selected, rel=1e-6)
    assert_same_gradients(plain, selected)


def test_each_level_recomputes_its_own_forward():
    """Counted FLOPs grow strictly with every level checkpointed, up to checkpointing all of them."""
    counts = [flops.count_step_flops(TINY)]
    for levels in (1, 2, 3):
        counts.append(flops.count_step_flops(TINY.with_(strategy=Strategy(checkpointing=True, checkpoint_levels=levels))))
    counts.append(flops.count_step_flops(TINY.with_(strategy=Strategy(checkpointing=True))))
    assert counts == sorted(set(counts))


def test_each_level_checkpointed_saves_activations():
    job = TINY.with_(shape=(32, 32, 32))
    saved = [dryrun(job).saved_bytes]
    for levels in (1, 2, 3):
        saved.append(dryrun(job.with_(strategy=Strategy(checkpointing=True, checkpoint_levels=levels))).saved_bytes)
    saved.append(dryrun(job.with_(strategy=Strategy(checkpointing=True))).saved_bytes)
    assert saved == sorted(set(saved), reverse=True)


def test_the_plan_offers_each_selection():
    names = [name for name, _ in candidate_strategies(TINY)]
    assert names[:5] == ["as given", "checkpointing of the 1 finest level", "checkpointing of the 2 finest levels",
                         "checkpointing of the 3 finest levels", "checkpointing"]


@pytest.mark.parametrize("flags, message", [
    (["--checkpoint-levels", "1"], "--checkpoint-levels chooses the levels --checkpointing recomputes: give "
                                   "--checkpointing too"),
    (["--checkpointing", "--checkpoint-levels", "4"], "--checkpoint-levels: unet3d has 4 levels: give 1 to 3 (0, the "
                                                      "default, checkpoints every level), got 4"),
    (["--model", "nnunet:PlainConvUNet", "--checkpointing", "--checkpoint-levels", "1"],
     "--checkpoint-levels: the nnunet:PlainConvUNet network is checkpointed block by block, not by resolution level; "
     "use --checkpointing alone"),
])
def test_bad_selections_are_refused_in_one_line(flags, message, capsys):
    assert main(["estimate", "--shape", "32", "32", "32", "--batch", "1", *flags]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith(message) and "\n" not in err and "Traceback" not in err


def test_the_strategy_says_what_it_checkpoints(capsys):
    assert main(["estimate", "--method", "dryrun", "--shape", "32", "32", "32", "--batch", "1", "--filters", "4",
                 "--checkpointing", "--checkpoint-levels", "2"]) == 0
    assert "checkpointing of the 2 finest levels" in capsys.readouterr().out
