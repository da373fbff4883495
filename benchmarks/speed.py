"""Training-step speed, the paper's Figure 6: stock PyTorch (oneDNN off) vs oneDNN fp32, channels-last,
bf16 and torch.compile, each a fresh model from the same seed running fullres.job.step.train_step with Adam.

Writes OUT/speed.json (fullres.bench.speed.run_bench's result) and OUT/figure6.png, and prints the exact command,
the date, the machine, the torch version and a table. Run it on an otherwise idle machine: other work
skews the timings (the JSON records the load average before and after).

    python benchmarks/speed.py [--shape 32 32 32] [--filters 8] [--batch 2] [--repeats 3] [--warmup 1]
                               [--variants stock_fp32 plain_fp32 ...] [--threads N] [--out bench-speed]

Compiled variants take minutes to compile on a small CPU (the warm-up step, not timed); a variant that
torch.compile cannot build is reported as skipped, with the reason. bf16 on a CPU without native bf16
(AVX2) is emulated and much slower than fp32: that is measured, not hidden.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from fullres.cost.steptime import default_variants, machine_info, select_variants
from fullres.bench.speed import run_bench
from fullres.job.config import JobConfig, Strategy
from fullres.errors import UserError
from fullres.evaluate.figures import figure6_chart
from fullres.files import write_bytes_atomically
from fullres.kernels.malloc import policy_for
from fullres.nets.registry import ModelConfig
from fullres.kernels.device import Process, configure_cpu


def main(argv: list[str] | None = None) -> int:
    names = [v.name for v in default_variants("cpu")]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", nargs=3, type=int, default=[32, 32, 32], metavar=("H", "W", "D"),
                        help="input volume, multiples of 8 (default 32 32 32; paper 240 240 144)")
    parser.add_argument("--filters", type=int, default=8, help="base filters (default 8; paper 32)")
    parser.add_argument("--batch", type=int, default=2, help="samples per step (default 2; paper 16)")
    parser.add_argument("--channels", type=int, default=4, help="input channels (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--variants", nargs="+", default=None, choices=names, metavar="NAME",
                        help=f"subset and order (default all): {' '.join(names)}")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default: one per physical core)")
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size of the matmul peak (default 2048)")
    parser.add_argument("--out", default="bench-speed", help="folder for speed.json and figure6.png")
    args = parser.parse_args(argv)

    try:
        job = JobConfig(model=ModelConfig(in_channels=args.channels, filters=args.filters), shape=tuple(args.shape),
                        batch=args.batch, strategy=Strategy())
    except ValueError as error:
        parser.error(str(error))
    cpu_line = configure_cpu(args.threads, Process())  # oneDNN on by default, threads = physical cores
    try:
        policy_for(job.strategy)  # FULLRES_MALLOC checked here; each variant runs under the policy train gives it
    except UserError as error:
        parser.error(str(error))
    variants = select_variants(args.variants, "cpu")
    machine = machine_info("cpu")

    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(
        ["python", "benchmarks/speed.py", *argv])
    print(f"$ {command}")
    print(f"date: {machine['date']}")
    print(f"machine: {machine['cpu']} ({machine['logical_cpus']} logical CPUs), {machine['hostname']}; {cpu_line}")
    print(f"torch {machine['torch']}, python {machine['python']}; load average {machine['load_average_1min']:.2f}; "
          f"allocator: per variant, as `fullres train` gives it")
    print(f"job: batch {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} filters; {args.warmup} warm-up + {args.repeats} timed steps per variant", flush=True)

    result = run_bench(job, variants, warmup=args.warmup, repeats=args.repeats, peak_size=args.peak_size)
    result["command"] = command

    out = Path(args.out)
    write_bytes_atomically(out / "speed.json", (json.dumps(result, indent=2) + "\n").encode())
    chart = figure6_chart(result, out / "figure6.png")

    peaks = result["matmul_peak_tflops"]
    print(f"matmul peak: fp32 {peaks['fp32']:.3f} TFLOP/s" +
          (f", bf16 {peaks['bf16']:.3f} TFLOP/s" if peaks.get("bf16") else ""))
    print(f"{'variant':<18}{'step s':>10}{'img/s':>9}{'TFLOP/s':>9}{'of peak':>9}{'vs stock':>10}  allocator")
    for row in result["variants"]:
        if row["skipped"]:
            print(f"{row['name']:<18}  skipped: {row['skipped']}")
            continue
        vs_stock = f"x{row['speedup_vs_stock']:.2f}" if row["speedup_vs_stock"] else "-"
        print(f"{row['name']:<18}{row['step_s']:>10.4g}{row['images_per_s']:>9.3g}{row['tflops']:>9.3g}"
              f"{row['fraction_of_peak']:>9.0%}{vs_stock:>10}  {row['allocator']}")
    speedups = result["speedups"]
    fmt = lambda value: f"x{value:.2f}" if value else "n/a"  # noqa: E731
    print(f"oneDNN vs stock: {fmt(speedups['onednn_vs_stock'])}; best ({result['best_variant']}) vs plain fp32: "
          f"{fmt(speedups['best_vs_plain_fp32'])}")
    print(f"wrote {out / 'speed.json'} and {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
