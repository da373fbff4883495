"""`fullres bench`: training-step speed (Figure 6), where a step's time goes (--breakdown), and
inference speed of the exported engines (--inference)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.cli.options import add_job_arguments, job_from_args, positive_int
from fullres.cli.report import print_json, refuse_existing

if TYPE_CHECKING:
    from fullres.job.config import JobConfig


def add_parser(commands) -> None:
    bench = commands.add_parser("bench", help=HELP["bench"])
    add_job_arguments(bench)
    bench.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                       help="stock_fp32 plain_fp32 fp32_cl bf16 bf16_cl compiled_fp32_cl compiled_bf16_cl (default: all)")
    bench.add_argument("--warmup", type=positive_int, default=1, help="untimed steps per variant")
    bench.add_argument("--repeats", type=positive_int, default=3, help="timed steps per variant (median reported)")
    bench.add_argument("--peak-size", type=positive_int, default=None,
                       help="matrix size for the matmul peak (default 2048 on CPU, 8192 on CUDA, where 2048 is too small "
                            "to fill the GPU)")
    bench.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bench.add_argument("--breakdown", action="store_true",
                       help="where one step's time goes, per operator (torch.profiler; default job 64^3 x 1)")
    bench.add_argument("--chart", default=None, help="write the Figure 6 bar chart here (PNG)")
    bench.add_argument("--overwrite", action="store_true", help="replace an existing --chart")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument("--inference", action="store_true",
                       help="time one inference forward instead: PyTorch fp32 (and bf16 on native-bf16 CPUs), "
                            "ONNX Runtime and OpenVINO, alternated")
    bench.add_argument("--engines", nargs="+", default=None, metavar="ENGINE",
                       help="with --inference: torch-fp32, torch-bf16, onnxruntime, openvino (default: all but "
                            "bf16 where the CPU has no native bf16)")
    bench.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.bench.speed import run_bench
    from fullres.cost.steptime import select_variants
    from fullres.evaluate.figures import figure6_chart
    from fullres.kernels.device import Process, configure_cpu, pick_device

    if args.breakdown:
        from fullres.bench.breakdown import (
            DEFAULT_BATCH,
            DEFAULT_SHAPE,
            format_breakdown,
            run_breakdown,
        )
        args.shape, args.batch = args.shape or DEFAULT_SHAPE, args.batch or DEFAULT_BATCH
    job = job_from_args(args)
    if args.inference:
        return print_inference_bench(job, args)
    if args.chart:
        refuse_existing(Path(args.chart), "--chart", args.overwrite)
    device = pick_device(args.device, Process())
    if device.type == "cpu":
        configure_cpu(args.threads, Process())
    if args.breakdown:
        result = run_breakdown(job, device, peak_size=args.peak_size or 2048)
        print_json(result) if args.json else print("\n".join(format_breakdown(result)))
        return 0
    result = run_bench(job, select_variants(args.variants, device), warmup=args.warmup, repeats=args.repeats,
                       device=device, peak_size=args.peak_size or (8192 if device.type == "cuda" else 2048))
    if args.chart:
        figure6_chart(result, Path(args.chart))
    if args.json:
        print_json(result)
        return 0
    peaks = result["matmul_peak_tflops"]
    print(f"matmul peak: fp32 {peaks['fp32']:.3f} TFLOP/s" + (f", bf16 {peaks['bf16']:.3f} TFLOP/s" if peaks.get("bf16") else ""))
    print(f"{'variant':<20}{'step s (min-max)':>24}{'img/s':>9}{'TFLOP/s':>10}{'of peak':>9}")
    for row in result["variants"]:
        if row.get("skipped"):
            print(f"{row['name']:<20}  skipped: {row['skipped']}")
            continue
        of_peak = f"{row['fraction_of_peak'] * 100:>8.1f}%" if row["fraction_of_peak"] else f"{'-':>9}"
        print(f"{row['name']:<20}{row['step_s']:>10.2f} ({row['step_s_min']:.2f}-{row['step_s_max']:.2f})"
              f"{row['images_per_s']:>9.2f}{row['tflops']:>10.3f}{of_peak}")
    print("speed-ups: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["speedups"].items() if v))
    return 0


def print_inference_bench(job: JobConfig, args: argparse.Namespace) -> int:
    from fullres.bench.inference import run_inference_bench
    from fullres.kernels.device import Process, configure_cpu

    configure_cpu(args.threads, Process())
    result = run_inference_bench(job, tuple(args.engines) if args.engines else None, warmup=args.warmup,
                                 repeats=args.repeats)
    if args.json:
        print_json(result)
        return 0
    print(f"inference: 1 x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, {job.model.architecture} "
          f"{job.model.filters} filters, {result['machine']['threads']} threads, median of {args.repeats} "
          "alternated rounds")
    print(f"{'engine':<14}{'seconds (min-max)':>24}{'vs torch fp32':>15}{'max abs diff':>14}")
    for row in result["rows"]:
        ratio = f"{row['vs_torch_fp32']:.2f}x" if row["vs_torch_fp32"] else "-"
        diff = f"{row['max_abs_diff']:.1e}" if row["max_abs_diff"] is not None else "-"
        print(f"{row['engine']:<14}{row['seconds']:>10.3f} ({row['seconds_min']:.3f}-{row['seconds_max']:.3f})"
              f"{ratio:>15}{diff:>14}")
    return 0
