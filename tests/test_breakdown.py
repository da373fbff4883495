"""`bench --breakdown`: the parts of one profiled training step add up to the step, the convolutions'
FLOPs are torch's FLOP counter's (forward, recomputed forward, backward-data, backward-weights), every
part has a share, and the CLI prints the same as JSON.

Tiny networks (2-4 filters, 16^3 voxels) on one thread.
"""

from __future__ import annotations

import json

import pytest
import torch

from fullres.bench import breakdown
from fullres.bench.flops import count_forward_flops, count_step_flops
from fullres.config import JobConfig, Strategy
from fullres.model import ModelConfig


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
