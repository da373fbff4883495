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

The dry run estimates a job as its tensors plus one runtime term per network and strategy, measured at
16^3. For each job the script prints the *term* that would make that estimate exact (median peak minus the
dry run's tensors, `dryrun(job, runtime=0)`; for "fused" that is fullres's foreach Adam step, not the fused
one), and what the variant holds above the fixed thresholds. A term c puts every job within +-5 % of its
median m only if c lies in [term - 5 % m, term + 5 % m] for every job: the script prints that intersection
per variant (empty when no term can), beside the 16^3 job's own term, which is what fullres calibrates.
`--save` keeps every run; `--recompute` reports a saved file again.

    python benchmarks/heap_slack.py --jobs 16x16x16:1 32x32x32:1 32x32x32:4 48x64x32:1 64x64x64:1 \\
        --variants default fixed trim --repeats 3 --save slack.json
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
from pathlib import Path

from fullres.cli import positive_int

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

        def trim_before_the_update(*_):  # returns None, as a step pre-hook must
            malloc_trim(0)

        adam = torch.optim.Adam

        class TrimmedAdam(adam):
            def __init__(self, params, **kwargs):
                super().__init__(params, **kwargs)
                self.register_step_pre_hook(trim_before_the_update)

        torch.optim.Adam = TrimmedAdam
    elif variant == "fused":
        adam = torch.optim.Adam

        class FusedAdam(adam):
            def __init__(self, params, **kwargs):
                super().__init__(params, fused=True, **kwargs)

        torch.optim.Adam = FusedAdam
    print(json.dumps(measure._child(json.loads(sys.stdin.read()))))


def _job(spec: str, filters: int):
    """The bf16 channels-last job of a HxWxD[:BATCH] spec (ValueError, one line, when it is not one)."""
    from fullres.config import JobConfig, ModelConfig, Strategy

    shape, _, batch = spec.partition(":")
    try:
        sizes, batch_size = tuple(int(n) for n in shape.split("x")), int(batch or 1)
    except ValueError:
        raise ValueError(f"--jobs {spec!r}: not HxWxD[:BATCH], e.g. 32x32x32:4") from None
    if len(sizes) != 3 or min(sizes) < 1 or batch_size < 1:
        raise ValueError(f"--jobs {spec!r}: not HxWxD[:BATCH] with positive sizes, e.g. 32x32x32:4")
    return JobConfig(model=ModelConfig(in_channels=4, filters=filters), shape=sizes, batch=batch_size,
                     strategy=Strategy(channels_last=True, precision="bf16"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", nargs="+", default=["16x16x16:1", "32x32x32:1", "32x32x32:4"], metavar="HxWxD:BATCH")
    parser.add_argument("--variants", nargs="+", default=["default", "fixed", "trim"], choices=sorted(VARIANTS))
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--filters", type=positive_int, default=32)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--save", metavar="JSON", help="write every run's peak and step time here")
    parser.add_argument("--recompute", metavar="JSON", help="report a saved run again, measuring nothing")
    parser.add_argument("--child", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0

    if args.recompute:
        try:
            saved = json.loads(Path(args.recompute).read_text())
        except (OSError, ValueError) as error:
            parser.error(f"--recompute {args.recompute}: cannot be read as a saved run ({error})")
        missing = [key for key in ("command", "header", "jobs", "variants", "filters", "runs")
                   if not isinstance(saved, dict) or key not in saved]
        if missing:
            parser.error(f"--recompute {args.recompute}: not a saved run of this script (no {', '.join(missing)})")
        print(f"$ {saved['command']}  (recomputed from {args.recompute})")
        print(saved["header"])
        runs = {tuple(key.split("|")): [tuple(run) for run in value] for key, value in saved["runs"].items()}
        report(saved["jobs"], saved["variants"], runs, saved["filters"])
        return 0

    for spec in args.jobs:
        try:
            _job(spec, args.filters)
        except ValueError as error:
            parser.error(str(error))

    from fullres.bench import machine_info

    machine = machine_info("cpu")
    command = shlex.join(["python", "benchmarks/heap_slack.py", *(sys.argv[1:] if argv is None else argv)])
    header = f"date: {machine['date']}; machine: {machine['cpu']}; torch {machine['torch']}; {args.threads} threads"
    print(f"$ {command}")
    print(header)
    variants = list(dict.fromkeys(["fixed", *args.variants]))  # "above fixed" is measured against it
    # The caller's allocator settings must not leak into a variant (FULLRES_MALLOC=fixed would make them all fixed).
    inherited = {key: value for key, value in os.environ.items()
                 if key not in ("FULLRES_MALLOC", "GLIBC_TUNABLES") and not key.startswith("MALLOC_")}
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for spec in args.jobs:
        request = json.dumps({"job": _job(spec, args.filters).to_json(), "steps": 2, "loss": "dice", "device": "cpu",
                              "threads": args.threads})
        for _ in range(args.repeats):
            for variant in variants:
                env = {**inherited, **VARIANTS[variant], "OMP_NUM_THREADS": str(args.threads)}
                done = subprocess.run([sys.executable, __file__, "--child", variant], input=request, capture_output=True,
                                      text=True, env=env)
                lines = done.stdout.strip().splitlines()
                if done.returncode != 0 or not lines:
                    print(f"{spec} {variant}: the measurement failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
                    return 1
                peak = json.loads(lines[-1])
                runs.setdefault((spec, variant), []).append((peak["measured_bytes"] / 1e6, peak["step_seconds"][-1]))
    if args.save:
        from fullres.files import write_bytes_atomically

        write_bytes_atomically(Path(args.save), json.dumps({
            "command": command, "header": header, "jobs": args.jobs, "variants": variants, "filters": args.filters,
            "runs": {"|".join(key): value for key, value in runs.items()}}, indent=1).encode())
    report(args.jobs, variants, runs, args.filters)
    return 0


def report(jobs: list[str], variants: list[str], runs: dict, filters: int) -> None:
    """Per job and variant: median and range of the peaks, what the variant holds above the fixed thresholds,
    the runtime term that would make the dry run exact (median - the dry run's tensors, fullres's foreach Adam
    step), the step time; then, per variant, the terms that put every job within +-5 % of its median."""
    from fullres.memory.dryrun import dryrun
    from fullres.memory.runtime import CALIBRATION_SHAPE

    print(f"{'job':>14} {'variant':>8} {'median MB':>10} {'range MB':>15} {'above fixed':>11} {'term MB':>8} {'step s':>7}")
    bands: dict[str, list[float]] = {variant: [float("-inf"), float("inf")] for variant in variants}
    calibration: dict[str, float] = {}
    for spec in jobs:
        job = _job(spec, filters)
        tensors = dryrun(job, runtime=0, allocator="fixed").peak_bytes / 1e6
        fixed = statistics.median(mb for mb, _ in runs[(spec, "fixed")])
        for variant in variants:
            peaks = [mb for mb, _ in runs[(spec, variant)]]
            median = statistics.median(peaks)
            term = median - tensors
            if job.shape == CALIBRATION_SHAPE and job.batch == 1:
                calibration[variant] = term  # what fullres measures as the network's runtime term
            low, high = bands[variant]
            bands[variant] = [max(low, term - 0.05 * median), min(high, term + 0.05 * median)]
            seconds = statistics.median(s for _, s in runs[(spec, variant)])
            print(f"{spec:>14} {variant:>8} {median:10.1f} {min(peaks):7.1f}-{max(peaks):<7.1f} {median - fixed:11.1f} "
                  f"{term:8.1f} {seconds:7.3f}")
    for variant in variants:
        low, high = bands[variant]
        verdict = f"{low:.1f} to {high:.1f} MB" if low <= high else f"none (the bounds cross by {low - high:.1f} MB)"
        own = f"; the 16^3 job's own term {calibration[variant]:.1f} MB" if variant in calibration else ""
        print(f"{variant}: runtime terms within +-5 % of every job's median: {verdict}{own}")


if __name__ == "__main__":
    raise SystemExit(main())
