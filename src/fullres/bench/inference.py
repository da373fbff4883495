"""Inference speed of one network forward (+ its output activation) through each engine on the same volume:
PyTorch fp32 (the network's memory format as the job says), PyTorch bf16 autocast (where the CPU has native
bf16; elsewhere it runs on ATen's slow path and is skipped unless asked for), ONNX Runtime and OpenVINO
(fp32 inference precision) on the network exported as `fullres export` exports it.

The engines are timed in alternation, round after round (one forward of each per round), so that a busy or
throttling machine slows all of them alike; each engine's median over the rounds is reported, with its
ratio to PyTorch fp32's median.
"""

from __future__ import annotations

import datetime
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fullres.cost.steptime import cpu_model
from fullres.errors import UserError
from fullres.job.config import JobConfig
from fullres.job.step import autocast, prepare_model, to_device
from fullres.kernels.device import fast_bf16
from fullres.nets.registry import build_model
from fullres.run.export import TOLERANCE, WithActivation, convert_openvino, export_onnx, open_onnx, open_openvino

INFERENCE_ENGINES = ("torch-fp32", "torch-bf16", "onnxruntime", "openvino")


def run_inference_bench(job: JobConfig, engines: tuple[str, ...] | None = None, warmup: int = 1, repeats: int = 3,
                        activation: str = "sigmoid") -> dict:
    """Median seconds of one forward at batch 1 of `job`'s network (random weights) through each engine."""
    if engines is None:
        engines = tuple(e for e in INFERENCE_ENGINES if e != "torch-bf16" or fast_bf16(torch.device("cpu")))
    unknown = [e for e in engines if e not in INFERENCE_ENGINES]
    if unknown:
        raise UserError(f"--engines {unknown[0]}: choose from {', '.join(INFERENCE_ENGINES)}")
    torch.manual_seed(0)
    network = build_model(job.model, job.shape).eval()
    module = WithActivation(network, activation).eval()
    x = torch.randn(1, job.model.in_channels, *job.shape)
    runners = {}
    strategy = job.strategy

    def torch_runner(precision: str):
        from dataclasses import replace

        run_strategy = replace(strategy, precision=precision, checkpointing=False, checkpoint_levels=0, accumulate=1)
        prepare_model(network, run_strategy)

        def run():
            with torch.no_grad(), autocast(run_strategy, "cpu"):
                return module(to_device(x, torch.device("cpu"), run_strategy)).numpy()
        return run

    folder = Path(tempfile.mkdtemp(prefix="fullres-bench-"))
    metadata = {"in_channels": str(job.model.in_channels), "classes": str(job.model.classes), "activation": activation}
    with torch.no_grad():
        reference = module(x).numpy()
    if "onnxruntime" in engines or "openvino" in engines:
        export_onnx(module, job.shape, False, folder / "model.onnx", metadata)
    if "onnxruntime" in engines:
        engine = open_onnx(folder / "model.onnx")
        runners["onnxruntime"] = lambda engine=engine: engine(x.numpy())
    if "openvino" in engines:
        convert_openvino(folder / "model.onnx", folder / "model.xml", metadata)
        engine = open_openvino(folder / "model.xml")
        runners["openvino"] = lambda engine=engine: engine(x.numpy())
    order = [e for e in INFERENCE_ENGINES if e in engines]
    times: dict[str, list[float]] = {e: [] for e in order}
    diffs = {}
    for round_ in range(warmup + repeats):
        for name in order:
            if name.startswith("torch"):
                run = torch_runner("bf16" if name == "torch-bf16" else "fp32")
            else:
                run = runners[name]
            started = time.perf_counter()
            output = run()
            elapsed = time.perf_counter() - started
            if round_ >= warmup:
                times[name].append(elapsed)
            else:
                diffs[name] = float(np.abs(np.asarray(output, dtype=np.float32) - reference).max())
    for path in folder.iterdir():
        path.unlink()
    folder.rmdir()
    base = statistics.median(times["torch-fp32"]) if times.get("torch-fp32") else None
    rows = []
    for name in order:
        median = statistics.median(times[name])
        rows.append({"engine": name, "seconds": median, "seconds_min": min(times[name]),
                     "seconds_max": max(times[name]), "vs_torch_fp32": (base / median) if base else None,
                     "max_abs_diff": diffs.get(name)})
    return {"job": {"model": job.model.architecture, "filters": job.model.filters, "shape": list(job.shape),
                    "in_channels": job.model.in_channels, "channels_last": job.strategy.channels_last},
            "rows": rows, "repeats": repeats, "warmup": warmup, "tolerance": TOLERANCE,
            "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "host": socket.gethostname(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}
