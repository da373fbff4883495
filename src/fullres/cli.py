"""The `fullres` command: parses, calls the stage that does the work, prints (human text or --json).

estimate -> plan -> synth/check (data) -> train -> predict -> evaluate -> show.
Every bad input ends as one line on stderr (`fullres <command>: error: ...`) and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fullres.config import PAPER_BATCH, PAPER_SHAPE, PRECISIONS, JobConfig, Strategy
from fullres.errors import UserError
from fullres.model import DOWNSAMPLING, ModelConfig, nearest_valid_sizes
from fullres.units import format_bytes, parse_size

TARGET_CLASSES = {"wt": 1, "regions": 3, "classes": 4}  # output channels per target (MSD Task01 has 4 labels)


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- argument types: each rejects bad input with a message naming what is wrong -------------

def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def spatial_size(text: str) -> int:
    value = positive_int(text)
    if value % DOWNSAMPLING:
        lower, upper = nearest_valid_sizes(value)
        raise argparse.ArgumentTypeError(
            f"{value} is not divisible by {DOWNSAMPLING} (the U-Net pools three times); nearest valid: {lower} or {upper}")
    return value


def memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def channel_count(spec: str) -> int:
    """Input channels implied by a --channels spec: 'N' (the first N modalities) or a comma list of names/indices."""
    spec = spec.strip()
    if spec.lstrip("-").isdigit():
        return positive_int(spec)
    items = [item for item in spec.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{spec!r} names no channel")
    return len(items)


def channels_spec(text: str) -> str:
    """Validate a --channels spec early (a clear error naming the option) and keep its text."""
    channel_count(text)
    return text.strip()


# ---- the job flags shared by estimate, plan, train, profile and bench --------------------------

def add_job_arguments(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """One command line describes one job everywhere. With defaults=False unset flags stay None so the
    command can fill them (train picks the demo's small job when it has no data)."""
    group = parser.add_argument_group("job")
    group.add_argument("--shape", nargs=3, type=spatial_size, metavar=("H", "W", "D"),
                       default=list(PAPER_SHAPE) if defaults else None,
                       help="input volume in voxels, multiples of 8 (paper: 240 240 144)")
    group.add_argument("--channels", type=channels_spec, default="4" if defaults else None,
                       help="N (the first N modalities) or names/indices, e.g. FLAIR or 0,3 (default: 4 = all)")
    group.add_argument("--target", choices=sorted(TARGET_CLASSES), default="wt" if defaults else None,
                       help="wt: whole-tumour mask (paper); regions: WT/TC/ET channels; classes: raw labels")
    group.add_argument("--filters", type=positive_int, default=32 if defaults else None,
                       help="base filters (paper: 32)")
    group.add_argument("--batch", type=positive_int, default=PAPER_BATCH if defaults else None,
                       help="samples per forward/backward (paper: 16)")
    group.add_argument("--dropout", type=float, default=0.2, help="dropout after conv3a and conv4a")
    group.add_argument("--norm", choices=("none", "instance", "group", "batch"), default="none",
                       help="normalisation after each convolution (paper: none)")
    strategy = parser.add_argument_group("memory strategies (exact gradients unless noted)")
    strategy.add_argument("--checkpointing", action="store_true", help="recompute activations in backward")
    strategy.add_argument("--accumulate", type=positive_int, default=1, metavar="K",
                          help="K micro-batches of --batch per optimizer step")
    strategy.add_argument("--precision", choices=PRECISIONS, default="fp32",
                          help="autocast precision (bf16/fp16 approximate the fp32 numerics)")
    strategy.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")


def job_from_args(args: argparse.Namespace) -> JobConfig:
    try:
        model = ModelConfig(in_channels=channel_count(args.channels), filters=args.filters,
                            classes=TARGET_CLASSES[args.target], dropout=args.dropout, norm=args.norm)
        strategy = Strategy(checkpointing=args.checkpointing, accumulate=args.accumulate,
                            precision=args.precision, channels_last=args.channels_last)
        return JobConfig(model=model, shape=tuple(args.shape), batch=args.batch, strategy=strategy)
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise UserError(str(error)) from None


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


# ---- estimate -----------------------------------------------------------------------------------

def cmd_estimate(args: argparse.Namespace) -> int:
    from fullres.memory import BYTES_PER_VALUE
    from fullres.memory.table1 import table1

    job = job_from_args(args)
    bytes_per_value = args.bytes_per_value or BYTES_PER_VALUE[job.strategy.precision]
    table = table1(job.model, job.shape, job.batch, bytes_per_value)
    if args.json:
        print_json(table.to_json())
        return 0
    header = f"{'Layer (type)':<32}{'Batch':>6}{'H':>5}{'W':>5}{'D':>5}{'Maps':>6}{'Weights':>12}{'Feature map size':>18}{'Params':>18}{'Memory (MB)':>14}"
    print(f"Table 1 method: {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} base filters, {bytes_per_value} bytes per value")
    print(header)
    print("-" * len(header))
    for r in table.rows:
        print(f"{f'{r.layer} ({r.type})':<32}{r.batch:>6}{r.height:>5}{r.width:>5}{r.depth:>5}{r.feature_maps:>6}"
              f"{r.trainable_weights:>12,}{r.feature_map_size:>18,}{r.params:>18,}{r.memory_mb:>14,.2f}")
    print("-" * len(header))
    print(f"{'Total':<58}{table.trainable_weights:>12,}{table.feature_map_size:>18,}{table.params:>18,}{table.size_mb:>14,.2f}")
    print(f"\nForward (every layer's output once): {table.size_mb:,.2f} MB = {format_bytes(table.size_mb * 1e6)}")
    print(f"Double for training:                 {table.training_mb:,.2f} MB = {format_bytes(table.training_mb * 1e6)}")
    return 0


# ---- plan ---------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace) -> int:
    from fullres.memory.plan import plan

    job = job_from_args(args)
    result = plan(job, args.memory, args.method)
    if args.json:
        print_json(result.to_json())
        return 0
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    print(f"Job: batch {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} base filters, {job.strategy.describe()} (method: {result.method})")
    print(f"Needs {format_bytes(result.required_bytes)} of {format_bytes(result.budget_bytes)}: {verdict}, "
          f"margin {format_bytes(result.margin_bytes)}")
    print(f"Largest batch at {' x '.join(map(str, job.shape))}: {result.max_batch or 'none (batch 1 does not fit)'}")
    shape = ' x '.join(map(str, result.max_shape)) if result.max_shape else "none (8 x 8 x 8 does not fit)"
    print(f"Largest shape at batch {job.batch}: {shape}")
    return 0


# ---- data ---------------------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    from fullres.data.synth import write_dataset

    test_cases = args.test_cases if args.test_cases is not None else max(1, args.cases // 4)
    out = write_dataset(Path(args.out), train_cases=args.cases, test_cases=test_cases, shape=tuple(args.shape),
                        seed=args.seed, kind=args.kind, dtype=args.dtype, progress=not args.quiet)
    print(f"wrote {args.cases} training and {test_cases} test cases ({args.kind}, "
          f"{' x '.join(map(str, args.shape))} x 4) to {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from fullres.data.check import check_dataset

    report = check_dataset(Path(args.data))
    for line in report.lines():
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


# ---- the parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fullres", description=__doc__.splitlines()[0])
    from fullres import __version__
    parser.add_argument("--version", action="version", version=f"fullres {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    estimate = commands.add_parser("estimate", help="memory a training job needs (whitepaper Table 1)")
    add_job_arguments(estimate)
    estimate.add_argument("--bytes-per-value", type=positive_int, default=None,
                          help="bytes per stored value (default: 4 for fp32, 2 for bf16/fp16)")
    estimate.add_argument("--json", action="store_true", help="machine-readable output")
    estimate.set_defaults(run=cmd_estimate)

    plan = commands.add_parser("plan", help="does a job fit a machine's memory; largest batch and shape that do")
    add_job_arguments(plan)
    plan.add_argument("--memory", type=memory_size, required=True, help="memory budget, e.g. 192GB, 384GiB, 1.5TB")
    plan.add_argument("--method", choices=("table1",), default="table1", help="estimation method")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(run=cmd_plan)

    synth = commands.add_parser("synth", help="write a synthetic MSD-format brain-tumour dataset")
    synth.add_argument("out", help="output folder (created; must be empty or a previous synth output)")
    synth.add_argument("--cases", type=positive_int, required=True, help="training cases")
    synth.add_argument("--test-cases", type=positive_int, default=None, help="test cases (default: cases/4, at least 1)")
    synth.add_argument("--shape", nargs=3, type=positive_int, default=[240, 240, 155], metavar=("H", "W", "D"),
                       help="volume size (default 240 240 155, like BraTS)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    synth.add_argument("--kind", choices=("brats", "random"), default="brats",
                       help="brats: BraTS-like phantoms; random: the paper's random-valued inputs (Table 2)")
    synth.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="image voxel type")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(run=cmd_synth)

    check = commands.add_parser("check", help="validate every case of an MSD dataset before a long job")
    check.add_argument("data", help="dataset folder (with dataset.json)")
    check.set_defaults(run=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as error:
        print(f"fullres {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"fullres {args.command}: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"fullres {args.command}: error: out of memory (see `fullres plan` for what fits)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
