"""Training-step speed, the paper's Figure 6: stock kernels against oneDNN, fp32 against bf16,
channels-last, torch.compile, each timed on :func:`fullres.job.step.train_step` and set against the measured
matmul peak of its precision.

* :func:`matmul_peak_tflops`: measured dense matmul throughput (``torch.mm``), the roofline.
* :class:`Variant`, :func:`default_variants`, :func:`time_variant`, :func:`run_bench`: the speed table
  (the chart is :func:`fullres.evaluate.figures.figure6_chart`).
"""

from __future__ import annotations
from __future__ import annotations

import os
from typing import Sequence

import torch

from fullres.cost.flops import as_device, step_flops
from fullres.job.config import JobConfig
from fullres.cost.steptime import (MATMUL_DTYPES, PLAIN, STOCK, Variant, default_variants, machine_info,
                                    matmul_peak_tflops, time_variant)


def run_bench(job: JobConfig, variants: Sequence[Variant] | None = None, warmup: int = 1, repeats: int = 3,
              device: str | torch.device = "cpu", peak_size: int = 2048, seed: int = 0) -> dict:
    """Figure 6's measurements: the matmul peaks, every variant's step timing, and the speed-ups.

    Returns (JSON-ready) ``{"matmul_peak_tflops": {"fp32", "bf16"}, "variants": [time_variant rows],
    "speedups": {"onednn_vs_stock", "best_vs_plain_fp32"}, "best_variant", "job", "step_flops",
    "warmup", "repeats", "date", "torch", "threads", "cpu_capability", "machine"}``. Speed-ups are
    ratios of the median step times of this run (None when a row is missing or skipped); each row
    also gets ``speedup_vs_stock``.
    """
    device = as_device(device)
    variants = list(default_variants(device) if variants is None else variants)
    machine = machine_info(device)
    precisions = sorted({v.precision for v in variants} | {"fp32"}, key=list(MATMUL_DTYPES).index)
    peaks = {p: None for p in MATMUL_DTYPES}
    for precision in precisions:
        peaks[precision] = matmul_peak_tflops(precision, size=peak_size, device=device)
    rows = [time_variant(job, v, warmup, repeats, device=device, peak_tflops=peaks[v.precision], seed=seed)
            for v in variants]
    timed = {row["name"]: row["step_s"] for row in rows if row["step_s"]}
    stock, plain = timed.get(STOCK), timed.get(PLAIN)
    for row in rows:
        row["speedup_vs_stock"] = stock / row["step_s"] if stock and row["step_s"] else None
    best = min(timed, key=timed.get) if timed else None
    return {
        "matmul_peak_tflops": peaks,
        "variants": rows,
        "speedups": {"onednn_vs_stock": stock / plain if stock and plain else None,
                     "best_vs_plain_fp32": plain / timed[best] if plain and best else None},
        "best_variant": best,
        "job": job.to_json(),
        "step_flops": step_flops(job),
        "warmup": warmup,
        "repeats": repeats,
        "date": machine["date"],
        "torch": machine["torch"],
        "threads": machine["threads"],
        "cpu_capability": machine["cpu_capability"],
        "machine": machine,
        "load_average_1min_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
