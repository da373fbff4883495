"""Speed bench and time estimate: FLOP counting (pinned to a hand count, exact scaling), the run_bench JSON
contract, the Figure 6 chart, and the training wall-time arithmetic and its calibration cache.

Everything runs tiny networks (2 filters, 16^3 voxels) on one thread: the whole file takes seconds on 2 cores.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

from fullres.evaluate import figures
from fullres.cost import flops, timing
from fullres.bench import speed
from fullres.cost import steptime
from fullres.cost.steptime import Variant
from fullres.job.config import JobConfig, Strategy
from fullres.data.msd import split_cases
from fullres.errors import UserError
from fullres.nets.registry import ModelConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: kernels this small gain nothing from two, and on a machine busy with other
    work OpenMP's barriers make a 2-thread step of this size ~30x slower than a 1-thread one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_job(**changes) -> JobConfig:
    job = JobConfig(model=ModelConfig(in_channels=2, filters=2), shape=(16, 16, 16), batch=2)
    return job.with_(**changes)


# ---- FLOPs ----------------------------------------------------------------------------------------

def test_conv3d_flops_equal_a_hand_count():
    n, c_in, c_out, k, d, h, w = 2, 3, 5, 3, 8, 6, 4
    conv = nn.Conv3d(c_in, c_out, kernel_size=k, padding=1)
    macs = n * c_out * d * h * w * c_in * k**3  # one multiply-add per weight per output voxel; bias not counted
    x = torch.randn(n, c_in, d, h, w, requires_grad=True)
    # forward 2 x MACs; backward: grad of the input (a transposed conv, 2 x MACs) + grad of the weight (2 x MACs)
    assert flops.count_flops(lambda: conv(x).sum().backward()) == 3 * 2 * macs
    assert flops.count_flops(lambda: conv(x)) == 2 * macs
    x_data = torch.randn(n, c_in, d, h, w)  # the first layer: no gradient for the image, so no grad-input conv
    assert flops.count_flops(lambda: conv(x_data).sum().backward()) == 2 * 2 * macs


def test_step_flops_double_with_the_batch():
    one, two = flops.count_step_flops(tiny_job(batch=1)), flops.count_step_flops(tiny_job(batch=2))
    assert one > 0 and two == 2 * one
    # accumulation counts every micro-batch: 2 x 1 samples cost what 1 x 2 samples cost
    assert flops.count_step_flops(tiny_job(batch=1, strategy=Strategy(accumulate=2))) == two


@pytest.mark.parametrize("job", [
    tiny_job(batch=3),
    tiny_job(shape=(16, 24, 32), batch=1),
    tiny_job(shape=(32, 16, 8), strategy=Strategy(checkpointing=True, accumulate=2)),
    tiny_job(model=ModelConfig(in_channels=4, filters=3, classes=3, norm="instance"), shape=(24, 16, 16)),
    tiny_job(shape=(32, 24, 16), batch=2, strategy=Strategy(checkpointing=True, slabs=4)),
], ids=["batch3", "anisotropic", "checkpointing-accumulate", "instance-norm-3-classes", "slabs"])
def test_scaled_step_flops_equal_the_direct_count(job):
    """The proof that counting one 16^3 sample and scaling by batch x voxels is exact."""
    assert flops.step_flops(job) == flops.count_step_flops(job)
    assert flops.forward_flops(job) == flops.count_forward_flops(job)


def test_checkpointing_counts_the_recomputed_forward():
    plain = flops.count_step_flops(tiny_job())
    checkpointed = flops.count_step_flops(tiny_job(strategy=Strategy(checkpointing=True)))
    assert plain < checkpointed < 2 * plain


def test_flops_are_the_steps_own_where_a_cpu_workaround_routes_them(monkeypatch):
    """On a CPU whose bf16 weight gradients of short maps go plane by plane (16^3: a 2-row bottleneck), the
    count is still the 3D convolutions', real and on fake tensors."""
    from fullres.kernels import device as fullres_device

    monkeypatch.setattr(fullres_device, "amx_bf16", lambda: False)
    monkeypatch.setattr(fullres_device, "avx512_bf16", lambda: True)
    bf16 = tiny_job(batch=1, strategy=Strategy(precision="bf16"))
    fp32 = flops.count_step_flops(tiny_job(batch=1))
    assert flops.count_step_flops(bf16) == fp32
    assert timing.fake_step_flops(bf16) == fp32


def test_precision_and_layout_change_no_count():
    """Why the unit count may run in fp32, contiguous, for a bf16 / channels-last job."""
    fp32 = flops.count_step_flops(tiny_job(batch=1))
    other = flops.count_step_flops(tiny_job(batch=1, strategy=Strategy(precision="bf16", channels_last=True)))
    assert other == fp32


# ---- run_bench ------------------------------------------------------------------------------------

def refuse_compile(model, *args, **kwargs):
    raise RuntimeError("no C compiler here (test)")


@pytest.fixture(scope="module")
def bench_result():
    variants = [v for v in steptime.default_variants("cpu") if v.name in ("stock_fp32", "plain_fp32", "bf16_cl")]
    variants.append(Variant("compiled_fp32_cl", "fp32", channels_last=True, compiled=True))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "compile", refuse_compile)
        return speed.run_bench(tiny_job(), variants, warmup=1, repeats=2, peak_size=64)


def test_run_bench_json_contract(bench_result):
    result = json.loads(json.dumps(bench_result))  # JSON-ready: no NaN, no tensors
    assert set(result["matmul_peak_tflops"]) == {"fp32", "bf16"}
    assert all(result["matmul_peak_tflops"][p] > 0 for p in ("fp32", "bf16"))
    assert {"onednn_vs_stock", "best_vs_plain_fp32"} <= set(result["speedups"])
    for key in ("torch", "threads", "cpu_capability", "date", "job", "step_flops"):
        assert key in result
    assert [row["name"] for row in result["variants"]] == ["stock_fp32", "plain_fp32", "bf16_cl", "compiled_fp32_cl"]
    for row in result["variants"]:
        for key in ("name", "precision", "onednn", "channels_last", "compiled", "step_s", "tflops"):
            assert key in row
    timed = [row for row in result["variants"] if not row["skipped"]]
    assert len(timed) == 3
    for row in timed:
        assert row["step_s_min"] <= row["step_s"] <= row["step_s_max"]
        assert row["tflops"] == pytest.approx(result["step_flops"] / row["step_s"] / 1e12)
        assert row["images_per_s"] == pytest.approx(2 / row["step_s"])
        assert row["fraction_of_peak"] == pytest.approx(row["tflops"] / result["matmul_peak_tflops"][row["precision"]])


def test_failed_compile_is_skipped_with_its_reason(bench_result):
    compiled = bench_result["variants"][-1]
    assert compiled["step_s"] is None and compiled["tflops"] is None
    assert "torch.compile failed" in compiled["skipped"] and "no C compiler" in compiled["skipped"]


def test_speedups_are_ratios_of_the_step_times(bench_result):
    step = {row["name"]: row["step_s"] for row in bench_result["variants"]}
    speedups = bench_result["speedups"]
    assert speedups["onednn_vs_stock"] == pytest.approx(step["stock_fp32"] / step["plain_fp32"])
    best = min(s for s in step.values() if s)
    assert speedups["best_vs_plain_fp32"] == pytest.approx(step["plain_fp32"] / best)
    assert step[bench_result["best_variant"]] == best
    for row in bench_result["variants"]:
        if row["step_s"]:
            assert row["speedup_vs_stock"] == pytest.approx(step["stock_fp32"] / row["step_s"])


def test_default_variants_and_selection():
    names = [v.name for v in steptime.default_variants("cpu")]
    assert names == ["stock_fp32", "plain_fp32", "fp32_cl", "bf16", "bf16_cl", "compiled_fp32_cl", "compiled_bf16_cl"]
    stock, plain = steptime.default_variants("cpu")[:2]
    assert not stock.onednn and plain.onednn and stock.precision == plain.precision == "fp32"
    assert "stock_fp32" not in [v.name for v in steptime.default_variants("cuda")]
    assert [v.name for v in steptime.select_variants(["bf16", "plain_fp32"])] == ["bf16", "plain_fp32"]
    with pytest.raises(UserError, match="unknown variant"):
        steptime.select_variants(["fp64"])


def test_onednn_flag_is_restored():
    before = torch.backends.mkldnn.enabled
    with steptime.variant_context(Variant("x", onednn=not before, threads=1), torch.device("cpu")):
        assert torch.backends.mkldnn.enabled is (not before)
        assert torch.get_num_threads() == 1
    assert torch.backends.mkldnn.enabled is before


def test_figure6_chart_writes_a_png(bench_result, tmp_path):
    path = figures.figure6_chart(bench_result, tmp_path / "charts" / "figure6.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["figure6.png"]  # no temp file left behind


# ---- time estimate --------------------------------------------------------------------------------

def fake_calibration(step_s=2.0, forward_s=0.5, extrapolated_from=None):
    def calibration(job, cache_dir=None, device="cpu", max_flops=None, refresh=False):
        return {"step_s": step_s, "forward_s": forward_s, "extrapolated_from": extrapolated_from, "cached": False}
    return calibration


def test_estimate_time_arithmetic(monkeypatch):
    monkeypatch.setattr(timing, "calibration", fake_calibration(step_s=2.0, forward_s=0.5))
    job = tiny_job(batch=2, strategy=Strategy(accumulate=2))  # effective batch 4
    result = timing.estimate_time(job, cases=23, epochs=3, val_fraction=0.2)
    # 23 cases: round(4.6) = 5 validation, 18 training; the trainer drops the last incomplete batch
    assert (result["train_cases"], result["val_cases"]) == (18, 5)
    assert result["steps_per_epoch"] == 18 // 4 == 4
    assert result["train_s"] == pytest.approx(4 * 3 * 2.0)
    assert result["validation_s"] == pytest.approx(5 * 3 * 0.5)
    assert result["total_s"] == pytest.approx(result["train_s"] + result["validation_s"])
    assert result["epochs"] == 3 and result["step_s"] == 2.0 and result["extrapolated_from"] is None
    no_val = timing.estimate_time(job, cases=8, epochs=1, val_fraction=0.0)
    assert (no_val["steps_per_epoch"], no_val["validation_s"]) == (2, 0.0)
    with pytest.raises(UserError, match="fewer than one batch"):
        timing.estimate_time(job, cases=4, epochs=1)  # 3 training cases < batch of 4


@pytest.mark.parametrize("cases", [1, 2, 3, 7, 10, 23, 484])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.5])
def test_split_sizes_match_the_trainer(cases, fraction):
    train, val = split_cases(range(cases), fraction, seed=0)
    assert timing.split_sizes(cases, fraction) == (len(train), len(val))


def test_calibration_is_cached(monkeypatch, tmp_path):
    calls = []

    def measure(job, device, steps=2, forwards=2):
        calls.append(job)
        return 0.25, 0.125, 0.0625

    monkeypatch.setattr(timing, "_measure", measure)
    job = tiny_job()
    first = timing.calibration(job, cache_dir=tmp_path)
    second = timing.calibration(job, cache_dir=tmp_path)
    assert len(calls) == 1 and not first["cached"] and second["cached"]
    assert first["step_s"] == second["step_s"] == 0.25 and second["forward_s"] == 0.125
    assert timing.calibrate(job, cache_dir=tmp_path) == 0.25 and len(calls) == 1
    assert json.loads((tmp_path / "calibration.json").read_text())  # one readable JSON file
    timing.calibration(job.with_(batch=1), cache_dir=tmp_path)  # another job: another key
    assert len(calls) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 99)  # another thread count: another key
    timing.calibration(job, cache_dir=tmp_path)
    assert len(calls) == 3


def test_big_jobs_are_extrapolated_by_the_flop_ratio(monkeypatch, tmp_path):
    monkeypatch.setattr(timing, "_measure", lambda job, device, steps=2, forwards=2: (1.0, 0.1, 0.25))
    job = tiny_job(shape=(32, 32, 16), batch=4)
    limit = flops.step_flops(job) / 10
    small = timing.calibration_job(job, max_flops=limit, memory_bytes=2**40)
    assert small.batch == 1 and math.prod(small.shape) < math.prod(job.shape)
    assert flops.step_flops(small) <= limit and small.model == job.model
    record = timing.calibration(job, cache_dir=tmp_path, max_flops=limit)
    assert record["extrapolated_from"]["shape"] == list(small.shape)
    # the Adam update (0.25 s) is kept; the rest of the measured step (0.75 s) scales with the FLOPs
    assert record["step_s"] == pytest.approx(0.25 + 0.75 * flops.step_flops(job) / flops.step_flops(small))
    assert record["forward_s"] == pytest.approx(0.1 * flops.forward_flops(job) / flops.forward_flops(small))
    assert timing.calibration_job(job, max_flops=1e30, memory_bytes=2**40) == job


def test_real_calibration_of_a_tiny_job(tmp_path):
    record = timing.calibration(tiny_job(), cache_dir=tmp_path)
    assert record["step_s"] > 0 and record["forward_s"] > 0 and record["extrapolated_from"] is None
    assert record["key"]["torch"] == torch.__version__ and "hostname" in record["key"]
    estimate = timing.estimate_time(tiny_job(), cases=10, epochs=2, cache_dir=tmp_path)
    assert estimate["cached"] and estimate["step_s"] == record["step_s"]


def test_matmul_peak_is_measured():
    assert steptime.matmul_peak_tflops("fp32", size=64, repeats=1) > 0


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_matmul_peak_on_cpu_is_the_faster_of_torch_mm_and_onednn(monkeypatch):
    """A slow torch.mm (MKL's fp32 GEMM on AMD CPUs) does not pull the peak down: oneDNN's product counts."""
    mm = torch.mm

    def slow_mm(*args, **kwargs):
        time.sleep(0.05)
        return mm(*args, **kwargs)

    monkeypatch.setattr(torch, "mm", slow_mm)
    slow_rate = 2 * 64**3 / 0.05 / 1e12
    assert steptime.matmul_peak_tflops("fp32", size=64, repeats=1) > 5 * slow_rate
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # oneDNN off: torch.mm alone
    assert steptime.matmul_peak_tflops("fp32", size=64, repeats=1) < slow_rate
    with pytest.raises(ValueError):
        steptime.matmul_peak_tflops("fp64", size=64)
