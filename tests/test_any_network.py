"""Any network, any entry point: a network registered in this process is estimated and planned with its
runtime term measured here; a factory that downsamples gets its divisor by probing; a GPU job is planned
from a CPU-only torch."""

from __future__ import annotations

import uuid

import pytest
import torch
from torch import nn

from fullres.cost import runtime
from fullres.cost.estimate import dryrun_estimate
from fullres.cost.plan import plan
from fullres.job.config import JobConfig
from fullres.nets.registry import MODELS, ModelConfig, ModelSpec, register_model, rebuilt_elsewhere


def _tiny(config: ModelConfig, shape) -> nn.Module:
    return nn.Sequential(nn.Conv3d(config.in_channels, 2, 3, padding=1), nn.ReLU(), nn.Conv3d(2, config.classes, 1))


@pytest.fixture
def registered():
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    register_model(ModelSpec(name, _tiny, "two convolutions"))
    try:
        yield name
    finally:
        MODELS.pop(name, None)


def test_a_name_registered_here_is_calibrated_in_this_process(registered, monkeypatch):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("a fresh process does not know a name registered here")

    monkeypatch.setattr(runtime.measure, "measure_peak", no_subprocess)
    assert not rebuilt_elsewhere(registered) and rebuilt_elsewhere("unet3d") and rebuilt_elsewhere("monai:UNet")
    job = JobConfig(model=ModelConfig(architecture=registered, in_channels=1), shape=(16, 16, 16), batch=1)
    measured = runtime.in_process_runtime_bytes(job)
    result = dryrun_estimate(job)
    if measured is None:  # no /proc here, or a pool's cached blocks hid the steps: the modelled constant
        assert result.breakdown["runtime"] == runtime.runtime_bytes(job) > 0
    else:
        assert result.breakdown["runtime"] == measured > 0
    # batch 2 adds oneDNN's backward scratchpad on AVX-512 (batch 1 runs ATen's slow path): room for it either way
    fitted = plan(job, max(4 * result.peak_bytes, dryrun_estimate(job.with_(batch=2)).peak_bytes), "dryrun")
    assert fitted.fits and fitted.max_batch >= 2 and fitted.max_shape is not None


def test_steps_run_in_memory_the_process_held_are_not_a_measurement(registered, monkeypatch, tmp_path):
    """A warm process (a CPU pool's cached blocks, say) can run the calibration steps without its RSS growing
    by their tensors: that reading is not cached and the modelled constant stands in."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(runtime.measure, "rss_bytes", lambda: (1 << 30, (1 << 30) + 4096))
    job = JobConfig(model=ModelConfig(architecture=registered, in_channels=1), shape=(16, 16, 16), batch=1)
    if not runtime.measure.reset_hwm():
        pytest.skip("no /proc/self/clear_refs: the peak cannot be read here")
    assert runtime.in_process_runtime_bytes(job) is None
    assert not (tmp_path / "fullres" / runtime.IN_PROCESS_CACHE_FILE).exists()
    assert runtime.measured_runtime_bytes(job) == runtime.runtime_bytes(job)


POOLS_TWICE = '''import torch
from torch import nn


class TwoPools(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.inc = nn.Conv3d(i, 4, 3, padding=1)
        self.down = nn.Sequential(nn.MaxPool3d(2), nn.Conv3d(4, 4, 3, padding=1), nn.MaxPool3d(2))
        self.up = nn.Sequential(nn.ConvTranspose3d(4, 4, 2, stride=2), nn.ConvTranspose3d(4, 4, 2, stride=2))
        self.out = nn.Conv3d(8, o, 1)

    def forward(self, x):
        skip = self.inc(x)
        return self.out(torch.cat([skip, self.up(self.down(skip))], 1))


def make(i, o, **kwargs):
    return TwoPools(i, o)
'''


def test_a_factory_that_pools_twice_gets_divisor_4_and_plans_in_its_multiples(tmp_path, cli):
    from fullres.nets.families import file_digest
    from fullres.nets.registry import probed_divisor, spatial_divisor

    source = tmp_path / "pools.py"
    source.write_text(POOLS_TWICE)
    name = f"{source}:make"
    config = ModelConfig(architecture=name, in_channels=1, source_sha256=file_digest(source))
    assert spatial_divisor(config) == 4 and probed_divisor(config) == 4
    code, out, err = cli("plan", "--model", name, "--shape", "16", "16", "12", "--channels", "1", "--batch", "1",
                         "--memory", "2GiB", "--json")
    assert code == 0 and "Traceback" not in err, err
    import json

    largest = json.loads(out)["max_shape"]
    assert largest and all(side % 4 == 0 for side in largest)
    code, _, err = cli("estimate", "--model", name, "--shape", "16", "16", "10", "--channels", "1")
    assert code == 2 and "nearest valid: 8 or 12" in err and len(err.splitlines()) == 1


def test_a_factory_without_downsampling_keeps_divisor_1(tmp_path):
    from fullres.nets.registry import spatial_divisor

    source = tmp_path / "flat.py"
    source.write_text("import torch\ndef make(i, o, **k):\n    return torch.nn.Conv3d(i, o, 3, padding=1)\n")
    assert spatial_divisor(ModelConfig(architecture=f"{source}:make", in_channels=1)) == 1


def test_a_job_read_from_a_file_runs_no_factory_code_before_it_is_trusted(tmp_path):
    """JobConfig checks a factory's sizes against its declared divisor (1): probing would run its code."""
    from fullres.nets.registry import spatial_divisor

    marker = tmp_path / "ran"
    source = tmp_path / "loud.py"
    source.write_text(POOLS_TWICE + f"\nopen({str(marker)!r}, 'w').close()\n")
    config = ModelConfig(architecture=f"{source}:make", in_channels=1)
    JobConfig(model=config, shape=(16, 16, 10), batch=1)
    assert not marker.exists()
    assert spatial_divisor(config) == 4 and marker.exists()


def test_the_gpu_table_names_its_cards_and_refuses_others():
    from fullres.kernels.gpus import GPUS, gpu_named

    assert gpu_named("h100-80gb") is gpu_named("H10080GB") is GPUS["H100-80GB"]
    assert GPUS["H100-80GB"].memory_bytes == 80 * 2**30 and GPUS["RTX4090"].memory_bytes == 24 * 2**30
    with pytest.raises(ValueError, match="unknown GPU 'B300': choose one of V100-32GB, "):
        gpu_named("B300")
