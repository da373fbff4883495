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
    if measured is None:
        pytest.skip("this process's peak cannot be read here")
    result = dryrun_estimate(job)
    assert result.breakdown["runtime"] == measured > 0
    fitted = plan(job, result.peak_bytes * 4, "dryrun")
    assert fitted.fits and fitted.max_batch >= 2 and fitted.max_shape is not None

