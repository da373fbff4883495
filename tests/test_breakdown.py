"""`bench --breakdown`: the parts of one profiled training step add up to the step, the convolutions'
FLOPs are torch's FLOP counter's (forward, recomputed forward, backward-data, backward-weights), every
part has a share, and the CLI prints the same as JSON. The fastest strategy that fits (`plan --optimize
time`, `train --strategy auto`): FLOPs counted on fake tensors equal the real count, and the ranking
follows the estimate (a calibration stands in for this machine's, so the test is exact).

Tiny networks (2-4 filters, 16^3 voxels) on one thread.
"""

from __future__ import annotations

import json

import pytest
import torch

from fullres.bench import breakdown
from fullres.cost import timing
from fullres.cost.flops import count_forward_flops, count_step_flops
from fullres.job.config import JobConfig, Strategy
from fullres.kernels.device import fast_bf16
from fullres.errors import UserError
from fullres.cost import plan
from fullres.cost.plan import candidate_strategies, fastest_fitting, rank_by_time
from fullres.nets.registry import ModelConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def job(**strategy) -> JobConfig:
    return JobConfig(model=ModelConfig(filters=4), shape=(16, 16, 16), batch=1, strategy=Strategy(**strategy))


def parts(result: dict) -> dict[str, dict]:
    return {row["part"]: row for row in result["parts"]}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_parts_add_up_and_conv_flops_are_the_counters(checkpointing):
    tiny = job(checkpointing=checkpointing)
    result = breakdown.run_breakdown(tiny, peak_size=128)
    rows = parts(result)
    total = sum(row["time_s"] for row in result["parts"])
    assert total == pytest.approx(result["step_s"], rel=1e-6)
    assert result["step_s"] <= result["wall_s"] * 1.01 + 1e-3  # the profiled step is the timed one
    assert all(0 <= row["share"] <= 1 for row in result["parts"])
    assert sum(row["share"] for row in result["parts"]) == pytest.approx(1, rel=1e-6)
    assert not result["unmatched"]
    # every convolution's FLOPs, as torch's FlopCounterMode counts the real step
    assert result["conv_flops"] == count_step_flops(tiny)
    forward = count_forward_flops(tiny)
    assert rows[breakdown.CONV_FORWARD]["flops"] == forward
    assert rows[breakdown.CONV_WEIGHTS]["flops"] == forward  # each weight gradient costs its forward
    # conv1a's input needs no gradient: backward-data is the forward without conv1a (4 -> 4 channels)
    conv1a = 2 * 4 * 4 * 27 * 16**3
    assert rows[breakdown.CONV_DATA]["flops"] == forward - conv1a
    if checkpointing:
        recomputed = rows[breakdown.CONV_RECOMPUTE]["flops"]
        assert 0 < recomputed < forward  # recomputation stops once backward has what it needs
    else:
        assert breakdown.CONV_RECOMPUTE not in rows
    for name in breakdown.CONV_PARTS:
        if name in rows:
            row = rows[name]
            assert row["tflops"] == pytest.approx(row["flops"] / row["time_s"] / 1e12)
            assert row["fraction_of_peak"] == pytest.approx(row["tflops"] / result["matmul_peak_tflops"])
    for name in ("optimizer step (Adam)", "loss (soft Dice, forward and backward)", "ReLU", "max pooling",
                 breakdown.PYTHON):
        assert rows[name]["time_s"] > 0, name
    both = [layer for layer in result["conv_layers"] if "alone_data_share" in layer]
    assert both and all(0 < layer["alone_data_share"] < 1 for layer in both)


def test_parts_are_found_under_the_cpu_workarounds_mode(monkeypatch):
    # bf16 steps on AMX CPUs run under fullres.kernels' dispatch mode, which nests every operator one level deeper
    import fullres.job.step
    from fullres.kernels.onednn import PlanarWeightGradients

    monkeypatch.setattr(fullres.job.step, "cpu_workarounds", lambda precision, device_type: PlanarWeightGradients())
    tiny = job()
    rows = parts(breakdown.run_breakdown(tiny, peak_size=128))
    assert rows[breakdown.CONV_FORWARD]["flops"] == count_forward_flops(tiny)
    assert rows[breakdown.CONV_WEIGHTS]["flops"] == count_forward_flops(tiny)


def test_slab_rows_count_as_slicing_forward_and_backward():
    result = breakdown.run_breakdown(job(checkpointing=True, slabs=2, channels_last=True), peak_size=128)
    rows = parts(result)
    assert rows["slicing (decoder weight halves, slab rows)"]["time_s"] > 0
    assert not [name for name in rows if "TakeRows" in name]
    assert sum(row["time_s"] for row in result["parts"]) == pytest.approx(result["step_s"], rel=1e-6)


def test_cli_breakdown_json(cli):
    code, out, err = cli("bench", "--breakdown", "--shape", 16, 16, 16, "--filters", 2, "--threads", 1,
                         "--peak-size", 64, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["job"]["batch"] == 1 and result["job"]["shape"] == [16, 16, 16]
    assert sum(row["time_s"] for row in result["parts"]) == pytest.approx(result["step_s"], rel=1e-6)
    assert result["precision"] == "fp32"
    code, out, err = cli("bench", "--breakdown", "--shape", 16, 16, 16, "--filters", 2, "--threads", 1,
                         "--peak-size", 64)
    assert code == 0, err
    assert "conv backward-data" in out and "sum of the parts" in out


# ---- the fastest strategy that fits ----------------------------------------------------------------

def test_fake_flops_equal_the_real_count():
    for strategy in (Strategy(), Strategy(checkpointing=True, accumulate=2), Strategy(checkpointing=True, slabs=2)):
        tiny = JobConfig(model=ModelConfig(filters=2), shape=(16, 16, 16), batch=2 // strategy.accumulate,
                         strategy=strategy)
        assert timing.fake_step_flops(tiny) == count_step_flops(tiny), strategy


def fake_calibration(job, cache_dir=None, device="cpu", max_flops=None, refresh=False):
    """A machine that runs 1e11 FLOP/s plus a 0.25 s optimizer update."""
    flops = timing.fake_step_flops(job)
    assert job == timing.rate_job(job)  # calibrated without a memory strategy
    return {"step_s": 0.25 + flops / 1e11, "optimizer_s": 0.25, "step_flops": flops, "cached": True}


@pytest.fixture
def calibrated(monkeypatch):
    monkeypatch.setattr(timing, "calibration", fake_calibration)


def ranking_job(norm: str = "none") -> JobConfig:
    """16^3, batch 2: three exact candidates without slabs, then slab schedules. Without normalisation the
    slab candidates count in seconds (instance norm's statistics passes make them ~7x slower to count)."""
    return JobConfig(model=ModelConfig(filters=4, norm=norm), shape=(16, 16, 16), batch=2)


def stand_in_bytes(job, method, device="cpu"):
    """A memory model standing in for the dry run (minutes on a busy 2-core machine): 1 MB fixed plus 1 MB
    per sample of the micro-batch, 0.1 MB less for each level checkpointed (0.6 MB with every level)."""
    levels = (job.strategy.checkpoint_levels or 4) if job.strategy.checkpointing else 0
    return 10**6 + job.batch * (10**6 - levels * 10**5)


def test_generous_budget_runs_as_given_tight_budget_checkpoints(calibrated, monkeypatch):
    monkeypatch.setattr(plan, "estimate_training_bytes", stand_in_bytes)
    job = ranking_job()
    needs = {name: stand_in_bytes(candidate, "dryrun") for name, candidate in candidate_strategies(job, allow_bf16=False)}
    selective = [f"checkpointing of the {k} finest level{'s' if k > 1 else ''}" for k in (1, 2, 3)]
    assert list(needs)[:6] == ["as given", *selective, "checkpointing", "checkpointing + accumulate x2"]
    assert all("slabs" in name for name in list(needs)[6:]) and len(needs) > 6
    # with normalisation computed over the whole volume, slabs apply to instance norm too
    assert [name for name, _ in candidate_strategies(ranking_job("instance"), allow_bf16=False)] == list(needs)
    ranked, tried = rank_by_time(job, 10 * needs["as given"], "dryrun", allow_bf16=False)
    assert not tried and ranked[0].name == "as given"
    steps = [r.step_s for r in ranked]
    assert steps == sorted(steps)  # ordered by the estimate
    for r in ranked:  # the estimate is the calibrated rate times the strategy's own FLOPs
        assert r.step_s == pytest.approx(0.25 + timing.fake_step_flops(r.job) / 1e11)
    assert ranked[1].step_flops > ranked[0].step_flops  # checkpointing recomputes the forward
    # a budget the two finest levels meet: no coarser level is recomputed for it
    chosen, needed, line = fastest_fitting(job, needs[selective[1]], "dryrun", allow_bf16=False)
    assert (chosen.strategy.checkpointing, chosen.strategy.checkpoint_levels, needed) == (True, 2, needs[selective[1]])
    assert line.startswith(selective[1] + " (estimated") and f"runner-up: {selective[2]}" in line
    budget = needs["checkpointing"]
    assert budget < needs[selective[2]]
    chosen, needed, line = fastest_fitting(job, budget, "dryrun", allow_bf16=False)
    # checkpointing and checkpointing + accumulate x2 do the same FLOPs: the less approximate wins the tie
    assert chosen.strategy.checkpointing and chosen.batch == 2 and needed == needs["checkpointing"]
    assert line.startswith("checkpointing (estimated") and "runner-up: checkpointing + accumulate x2" in line
    with pytest.raises(UserError, match="does not fit"):
        fastest_fitting(job, 1000, "dryrun", allow_bf16=False)


def test_a_job_with_coarse_slabs_of_its_own_keeps_every_candidate_in_the_ranking(calibrated, monkeypatch):
    """Only plan's every-level schedules end their series once one fits: a job given coarse slabs of its own
    (slab counts (1, 2)) that fits as given still has its checkpointed candidates ranked."""
    from dataclasses import replace

    monkeypatch.setattr(plan, "estimate_training_bytes", stand_in_bytes)
    job = ranking_job()
    job = job.with_(strategy=replace(job.strategy, coarse_slabs="2"))
    assert job.strategy.slab_counts == (1, 2)
    ranked, tried = rank_by_time(job, 10 * stand_in_bytes(job, "dryrun"), "dryrun", allow_bf16=False)
    names = [r.name for r in ranked]
    assert not tried and "as given" in names and "checkpointing" in names
    assert [name for name in names if "slabs 8,4,2" in name] == ["checkpointing + accumulate x2 + slabs 8,4,2"]


def test_plan_optimize_time_prints_the_ranking(calibrated, cli):
    code, out, err = cli("plan", "--shape", 16, 16, 16, "--batch", 2, "--filters", 4, "--norm", "none",
                         "--memory", "64GB", "--method", "table1", "--optimize", "time", "--json")
    assert code == 0, err
    report = json.loads(out)["ranking"]
    ranking = report["fastest_first"]
    assert ranking[0]["strategy"] == "as given"
    # the deepest schedule fits too, and cannot be faster than the every-level one ranked before it (in bf16
    # too, where this CPU has it natively and the ranking offers bf16)
    deepest = "checkpointing + accumulate x2 + slabs 8,4,2 + 1 level input recomputed"
    bf16 = [deepest + " + bf16"] if fast_bf16(torch.device("cpu")) else []
    assert report["not_estimated"] == [deepest, *bf16]
    assert [r["step_s"] for r in ranking] == sorted(r["step_s"] for r in ranking)
    code, out, err = cli("plan", "--shape", 16, 16, 16, "--batch", 2, "--filters", 4, "--norm", "none",
                         "--memory", "64GB", "--method", "table1", "--optimize", "time")
    assert code == 0 and "fastest first" in out and "checkpointing" in out
