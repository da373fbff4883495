"""What glibc's default heap adds to a bf16 step's peak, job by job, and whether any runtime term could follow it.

Each job is measured as `fullres profile` measures it (``measure_peak``'s child: peak RSS above the RSS after
import, two steps) in `--repeats` fresh processes per allocator variant, variants alternated:

  default  glibc's default heap, the policy bf16 jobs run under
  fixed    FULLRES_MALLOC=fixed: every block above 128 KiB mapped and returned, so the peak is the live tensors
  trim     glibc's default, with malloc_trim(0) before each forward, before each loss (after the forward) and
           before each optimizer update: the heap's free pages handed back at every phase
  fused    glibc's default, Adam with fused=True (no foreach temporaries in the update)
  thp      fixed, with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge pages for malloc's mappings,
           fewer page faults)
  fixed1m  glibc's thresholds fixed at 1 MiB instead of 128 KiB (fewer blocks mapped afresh each step)
  fixed4m  the same at 4 MiB

The *slack* of a variant is its median minus the fixed variant's median: what the heap holds beyond the live
tensors. The dry run estimates a job as its tensors plus one runtime term per network and strategy, so a
term c puts every job within +-5 % of its median only if c lies in [slack - 5 % m, slack + 5 % m] for every
job (m its median): the script prints that intersection per variant, empty when no term can.

    python benchmarks/heap_slack.py --jobs 16x16x16:1 32x32x32:1 32x32x32:4 48x64x32:1 64x64x64:1 \\
        --variants default fixed trim --repeats 3
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import shlex
import statistics
import subprocess
import sys

VARIANTS = {"default": {}, "fixed": {"FULLRES_MALLOC": "fixed"}, "trim": {}, "fused": {},
            "thp": {"FULLRES_MALLOC": "fixed", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
            # glibc reads these at start-up; FULLRES_MALLOC=default so that fullres leaves them as set
            "fixed1m": {"FULLRES_MALLOC": "default", "MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_TRIM_THRESHOLD_": str(2**20)},
            "fixed4m": {"FULLRES_MALLOC": "default", "MALLOC_MMAP_THRESHOLD_": str(2**22), "MALLOC_TRIM_THRESHOLD_": str(2**22)}}


def _child(variant: str) -> None:
    """Measure the job on stdin under `variant`'s changes (made before the measurement child runs)."""
    import torch

    from fullres.memory import measure

    if variant == "trim":
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        from fullres.model import UNet3D

        malloc_trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
        malloc_trim.argtypes = [ctypes.c_size_t]
        def trim_around_the_forward(module, *_):  # returns None: the hooks must not replace inputs or outputs
            if type(module) is UNet3D:
                malloc_trim(0)

        register_module_forward_pre_hook(trim_around_the_forward)
        register_module_forward_hook(trim_around_the_forward)
        adam = torch.optim.Adam

        class TrimmedAdam(adam):
            def __init__(self, params, **kwargs):
                super().__init__(params, **kwargs)
                self.register_step_pre_hook(lambda *_: malloc_trim(0) and None)

        torch.optim.Adam = TrimmedAdam
    elif variant == "fused":
        adam = torch.optim.Adam

        class FusedAdam(adam):
            def __init__(self, params, **kwargs):
                super().__init__(params, fused=True, **kwargs)

        torch.optim.Adam = FusedAdam
    print(json.dumps(measure._child(json.loads(sys.stdin.read()))))


def _job(spec: str, filters: int):
    from fullres.config import JobConfig, ModelConfig, Strategy

    shape, _, batch = spec.partition(":")
    return JobConfig(model=ModelConfig(in_channels=4, filters=filters), shape=tuple(int(n) for n in shape.split("x")),
                     batch=int(batch or 1), strategy=Strategy(channels_last=True, precision="bf16"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["16x16x16:1", "32x32x32:1", "32x32x32:4"], metavar="HxWxD:BATCH")
    parser.add_argument("--variants", nargs="+", default=["default", "fixed", "trim"], choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--filters", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0

    from fullres.bench import machine_info

    machine = machine_info("cpu")
    print(f"$ {shlex.join(['python', 'benchmarks/heap_slack.py', *(sys.argv[1:] if argv is None else argv)])}")
    print(f"date: {machine['date']}; machine: {machine['cpu']}; torch {machine['torch']}; {args.threads} threads")
    variants = list(dict.fromkeys(["fixed", *args.variants]))  # slack is measured against fixed
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for spec in args.jobs:
        request = json.dumps({"job": _job(spec, args.filters).to_json(), "steps": 2, "loss": "dice", "device": "cpu",
                              "threads": args.threads})
        for _ in range(args.repeats):
            for variant in variants:
                env = {**os.environ, **VARIANTS[variant], "OMP_NUM_THREADS": str(args.threads)}
                done = subprocess.run([sys.executable, __file__, "--child", variant], input=request, capture_output=True,
                                      text=True, env=env)
                if done.returncode != 0:
                    print(f"{spec} {variant}: the measurement failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
                    return 1
                peak = json.loads(done.stdout.strip().splitlines()[-1])
                results.setdefault((spec, variant), []).append((peak["measured_bytes"] / 1e6, peak["step_seconds"][-1]))
    print(f"{'job':>14} {'variant':>8} {'median MB':>10} {'range MB':>15} {'slack MB':>9} {'step s':>7}")
    bounds: dict[str, list[float]] = {variant: [float("-inf"), float("inf")] for variant in variants}
    for spec in args.jobs:
        fixed = statistics.median(mb for mb, _ in results[(spec, "fixed")])
        for variant in variants:
            peaks = [mb for mb, _ in results[(spec, variant)]]
            median = statistics.median(peaks)
            slack = median - fixed
            low, high = bounds[variant]
            bounds[variant] = [max(low, slack - 0.05 * median), min(high, slack + 0.05 * median)]
            seconds = statistics.median(s for _, s in results[(spec, variant)])
            print(f"{spec:>14} {variant:>8} {median:10.1f} {min(peaks):7.1f}-{max(peaks):<7.1f} {slack:9.1f} {seconds:7.3f}")
    for variant in variants:
        low, high = bounds[variant]
        verdict = f"{low:.1f} to {high:.1f} MB" if low <= high else f"none (the bounds cross by {low - high:.1f} MB)"
        print(f"{variant}: a runtime term within +-5 % of every job's median needs a slack of {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
