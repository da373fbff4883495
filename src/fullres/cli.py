"""The `fullres` command: parses, calls the stage that does the work, prints (human text or --json).

estimate -> plan -> synth/check (data) -> train -> predict -> evaluate -> show.
Every bad input ends as one line on stderr (`fullres <command>: error: ...`) and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import traceback
import warnings
from dataclasses import fields
import sys
from pathlib import Path

import numpy as np

from fullres.config import PRECISIONS, SCHEDULES, TARGET_CLASSES, JobConfig, Strategy, job_defaults
from fullres.data.layouts import LAYOUTS as LAYOUT_NAMES
from fullres.device import COLLECTIVE_TIMEOUT_S, memory_device
from fullres.errors import UserError, first_line
from fullres.files import refuse_special
from fullres.lesions import CHALLENGES, DEFAULT_CHALLENGE
from fullres.losses import LOSSES
from fullres.model import NORMS, ModelConfig, check_shape
from fullres.networks import factory_file, file_digest
from fullres.presets import PAPER
from fullres.units import format_bytes, parse_size


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- argument types: each rejects bad input with a message naming what is wrong -------------

def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
    return value


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0)


def positive_int(text: str) -> int:
    return _whole_number(text, 1)


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
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"{spec!r} names no channel")
    from fullres.data.msd import canonical_modality

    for item in items:
        if spec.lower() != "all" and not item.isdigit() and canonical_modality(item) is None:
            raise argparse.ArgumentTypeError(f"unknown channel {item!r}: name FLAIR, T1, T1c or T2 (or their "
                                             "aliases: T1w, T1gd, T2w, flair, t1ce, t2f, ...) or give indices")
    return len(items)


def seed_value(text: str) -> int:
    value = _whole_number(text, 0)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"{value} must be below 2^32")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{value} must be a finite number greater than 0")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 1)")
    return value


def channels_spec(text: str) -> str:
    """Validate a --channels spec early (a clear error naming the option) and keep its text."""
    channel_count(text)
    return text.strip()


# ---- the job flags shared by estimate, plan, train, profile and bench --------------------------

def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """One command line describes one job everywhere. Unset flags stay None and are filled from the
    network's preset (:func:`fullres.config.job_defaults`): the paper's, or intel-unet's own; `train`
    without data fills them from the demo's."""
    group = parser.add_argument_group("job")
    group.add_argument("--model", metavar="NAME",
                       help="the network: unet3d (the paper's Table 1 network), intel-unet (the paper's code "
                            "repository's), monai:CLASS (e.g. monai:SegResNet), nnunet:PlainConvUNet, "
                            "nnunet:ResidualEncoderUNet, or a factory FILE.py:FUNCTION / package.module:FUNCTION")
    group.add_argument("--model-args", metavar="JSON",
                       help="the network's keyword arguments as a JSON object, e.g. '{\"feature_size\": 48}'")
    group.add_argument("--shape", nargs=3, type=positive_int, metavar=("H", "W", "D"),
                       help="input volume in voxels, multiples of the network's divisor (paper: 240 240 144)")
    group.add_argument("--channels", type=channels_spec,
                       help="N (the first N modalities) or names/indices, e.g. FLAIR or 0,3 (paper: 4 = all)")
    group.add_argument("--target", choices=sorted(TARGET_CLASSES),
                       help="wt: whole-tumour mask (paper); regions: WT/TC/ET channels; classes: raw labels")
    group.add_argument("--filters", type=positive_int, help="base filters of unet3d and intel-unet (paper: 32)")
    group.add_argument("--batch", type=positive_int, help="samples per forward/backward (paper: 16)")
    group.add_argument("--dropout", type=float, help="dropout after conv3a and conv4a (paper: 0.2)")
    group.add_argument("--norm", choices=NORMS, help="normalisation after each convolution (paper: none)")
    strategy = parser.add_argument_group("memory strategies (exact gradients unless noted)")
    for spec in fields(Strategy):  # one flag per Strategy field, described by its metadata
        flag, meta = "--" + spec.name.replace("_", "-"), spec.metadata
        if spec.type in ("bool", bool):
            strategy.add_argument(flag, action="store_true", default=None, help=meta["help"])
        elif spec.type in ("int", int):  # a count that may be 0 (its default) accepts 0
            kind = non_negative_int if spec.default == 0 else positive_int
            strategy.add_argument(flag, type=kind, metavar=meta.get("metavar"), help=meta["help"])
        else:
            strategy.add_argument(flag, choices=meta.get("choices"), metavar=meta.get("metavar"), help=meta["help"])


JOB_FLAGS = ("model", "model_args", "shape", "channels", "target", "filters", "batch", "dropout", "norm",
             *(f.name for f in fields(Strategy)))


def job_from_options(options: dict, in_channels: int | None = None, classes: int | None = None) -> JobConfig:
    """The job the flags describe (`options` by their CLI names; None: the network's preset); `in_channels`
    and `classes` come from the dataset when there is one. The network is checked to take the job's shape
    (a forward pass on the meta device). Bad combinations raise UserError naming what is wrong."""
    try:
        defaults = job_defaults(options.get("model") or "unet3d")
        options = {name: defaults[name] if options.get(name) is None and name in defaults else value
                   for name, value in {**defaults, **options}.items()}
        architecture = options["model"]
        source = factory_file(architecture)
        digest = file_digest(source) if source is not None and source.is_file() else ""
        model = ModelConfig(in_channels=in_channels or channel_count(options["channels"]), filters=options["filters"],
                            classes=classes or TARGET_CLASSES[options["target"]], dropout=options["dropout"],
                            norm=options["norm"], architecture=architecture, args=options["model_args"] or "",
                            source_sha256=digest)
        strategy = Strategy(**{spec.name: options[spec.name] for spec in fields(Strategy)})
        if strategy.checkpoint_levels and not strategy.checkpointing:
            raise ValueError("--checkpoint-levels chooses the levels --checkpointing recomputes: give --checkpointing too")
        job = JobConfig(model=model, shape=tuple(options["shape"]), batch=options["batch"], strategy=strategy)
        check_shape(job.model, job.shape)
        return job
    except (ValueError, argparse.ArgumentTypeError) as error:
        prefix = "" if options.get("model", "unet3d") == "unet3d" else f"--model {options.get('model')}: "
        raise UserError(prefix + str(error)) from None


def job_from_args(args: argparse.Namespace) -> JobConfig:
    return job_from_options(vars(args))


def add_memory_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="the device whose memory is estimated (auto: CUDA when present)")


def print_json(data: object) -> None:
    print(json.dumps(data, indent=2))


def refuse_existing(path: Path, option: str, overwrite: bool, ours=None) -> None:
    """Before any work: refuse an output file `path` that is a folder, or that exists and is not this
    command's own earlier output (`ours(path)` true) unless `overwrite`."""
    if path.is_dir():
        raise UserError(f"{option} {path} is a folder: give a file path")
    refuse_special(path, option)
    if (path.exists() or path.is_symlink()) and not overwrite and not (ours is not None and ours(path)):
        raise UserError(f"{option} {path} exists: choose another path, or --overwrite")


def starts_with(header: str):
    """`ours` for refuse_existing: a file whose first line is `header`, or `header` followed by more columns
    (this command's own CSV, with or without optional columns)."""
    def ours(path: Path) -> bool:
        try:
            with path.open(errors="replace") as file:
                line = file.readline().rstrip("\r\n")
                return line == header or line.startswith(header + ",")
        except OSError:
            return False
    return ours


# ---- estimate -----------------------------------------------------------------------------------

def cmd_estimate(args: argparse.Namespace) -> int:
    from fullres.memory.estimate import BYTES_PER_VALUE
    from fullres.memory.table1 import table1

    job = job_from_args(args)
    if args.time:
        return print_time_estimate(job, args)
    if args.method == "dryrun":
        return print_dryrun(job, args.json, memory_device(args.device))
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


def print_dryrun(job: JobConfig, as_json: bool, device: str = "cpu") -> int:
    from fullres.memory.dryrun import CUDA_CONTIGUOUS_NOTE, GLIBC_HEAP_NOTE
    from fullres.memory.estimate import dryrun_estimate

    result = dryrun_estimate(job, device)
    note = None
    if device == "cuda" and not job.strategy.channels_last:
        note = CUDA_CONTIGUOUS_NOTE
    elif device == "cpu" and result.allocator == "default":
        note = GLIBC_HEAP_NOTE
    if as_json:
        print_json({**result.to_json(), **({"note": note} if note else {})})
        return 0
    print(f"Dry run: one training step of batch {job.batch} x {job.model.in_channels} x "
          f"{' x '.join(map(str, job.shape))}, {job.model.filters} base filters, {job.strategy.describe()}, Adam, "
          f"on {device}")
    print(f"Peak: {format_bytes(result.peak_bytes)} at {result.peak_at}"
          + (f" (allocator: {result.allocator})" if device == "cpu" else ""))
    for term, size in result.breakdown.items():
        print(f"  {term:<16}{format_bytes(size)}")
    if result.reserved_bytes is not None:
        what = "max_memory_reserved" if device == "cuda" else "fullres's CPU pool"
        print(f"Reserved by the caching allocator ({what}): {format_bytes(result.reserved_bytes)}")
    if result.reference_kernels:
        print("warning: oneDNN runs these weight gradients on its reference kernel on this CPU (~1000x slower; past "
              "its 1 GiB scratchpad): " + "; ".join(result.reference_kernels) + ". --slabs or the contiguous layout "
              "avoid it (docs/performance.md)")
    if note:
        print(f"note: {note}")
    return 0


def print_time_estimate(job: JobConfig, args: argparse.Namespace) -> int:
    """The paper's promise: plug in the dataset size and epochs, get memory and time (measured here)."""
    from fullres.bench.timing import estimate_time
    from fullres.device import Process, configure_cpu
    from fullres.memory.estimate import estimate_training_bytes

    if args.cases is None:
        raise UserError("--time needs --cases N (labelled cases in the dataset)")
    configure_cpu(args.threads, Process())  # calibration is keyed by threads: use what train uses
    result = estimate_time(job, args.cases, args.epochs, args.val_fraction, refresh=args.recalibrate)
    result["memory_bytes"] = estimate_training_bytes(job, args.method, memory_device(args.device))
    result["memory_method"] = args.method
    if args.json:
        print_json(result)
        return 0
    hours = result["total_s"] / 3600
    source = (f"extrapolated by FLOPs from {' x '.join(map(str, result['extrapolated_from']))}"
              if result.get("extrapolated_from") else "measured on this job")
    print(f"Job: batch {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} base filters, {job.strategy.describe()}")
    print(f"Memory ({args.method}): {format_bytes(result['memory_bytes'])}")
    print(f"Step: {result['step_s']:.2f} s ({source}{', cached' if result.get('cached') else ''}); "
          f"validation forward: {result['forward_s']:.2f} s")
    print(f"{result['steps_per_epoch']} steps/epoch x {result['epochs']} epochs: training {result['train_s'] / 3600:.2f} h "
          f"+ validation {result['validation_s'] / 3600:.2f} h = {hours:.2f} h on this machine")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from fullres.bench.speed import run_bench, select_variants
    from fullres.device import Process, configure_cpu, pick_device
    from fullres.figures import figure6_chart

    if args.breakdown:
        from fullres.bench.breakdown import DEFAULT_BATCH, DEFAULT_SHAPE, format_breakdown, run_breakdown
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
    from fullres.device import Process, configure_cpu

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


def cmd_sweep(args: argparse.Namespace) -> int:
    import csv

    from fullres.figures import figure3_memory_vs_size, figure5_estimate_vs_measured
    from fullres.memory.sweep import CSV_COLUMNS, run_sweep, sweep_jobs, write_sweep_csv

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for sweep.csv and the figures")
    earlier = starts_with(",".join(CSV_COLUMNS))(out / "sweep.csv")  # an earlier sweep's files may be replaced
    for name in ("sweep.csv", "figure3_memory_vs_size.png", "figure5_estimate_vs_measured.png"):
        refuse_existing(out / name, f"--out {out}:", args.overwrite, lambda path: earlier)
    base = job_from_args(args)
    device = memory_device(args.device)
    try:
        jobs = sweep_jobs(base, args.shapes, args.batches, args.precisions,
                          {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing_sweep])
    except ValueError as error:
        raise UserError(f"--shapes: {error}") from None
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'shape':<14}{'batch':>6}  {'strategy':<46}{'Table 1':>12}{'dry run':>12}{'measured':>12}{'error':>9}")

    def show(row) -> None:
        error = row.error(row.dryrun_bytes)
        print(f"{'x'.join(map(str, row.job.shape)):<14}{row.job.batch:>6}  {row.job.strategy.describe():<46}"
              f"{row.table1_bytes / 1e9:>10.2f}GB{row.dryrun_bytes / 1e9:>10.2f}GB"
              + (f"{row.measured_bytes / 1e9:>10.2f}GB{error * 100:>+8.1f}%" if row.measured_bytes else f"{'-':>12}")
              + (f"  (median of {row.repeats}: {row.measured_range[0] / 1e9:.3f}-{row.measured_range[1] / 1e9:.3f} GB)"
                 if row.measured_bytes and row.repeats > 1 else ""),
              flush=True)

    rows, unmeasured = run_sweep(jobs, measure=not args.no_measure, max_measure_bytes=args.max_measure, on_row=show,
                                 device=device, repeats=args.repeats)
    for line in unmeasured:
        print("not measured:", line)
    write_sweep_csv(rows, out / "sweep.csv")
    table = list(csv.DictReader((out / "sweep.csv").open()))
    figure3_memory_vs_size(table, out / "figure3_memory_vs_size.png")
    written = ["sweep.csv", "figure3_memory_vs_size.png"]
    if any(row.measured_bytes for row in rows):
        figure5_estimate_vs_measured(table, out / "figure5_estimate_vs_measured.png")
        written.append("figure5_estimate_vs_measured.png")
        errors = [abs(row.error(row.dryrun_bytes)) for row in rows if row.measured_bytes]
        print(f"dry run: max |error| {max(errors) * 100:.1f} % over {len(errors)} measured rows")
    print(f"wrote {', '.join(written)} in {out}")
    return 0


def shape_spec(text: str) -> tuple[int, int, int]:
    """'64' (a cube) or '64x64x32'."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write N or HxWxD, e.g. 64 or 96x96x64")
    return tuple(positive_int(p) for p in parts)


def cmd_profile(args: argparse.Namespace) -> int:
    from fullres.memory.estimate import profile

    job = job_from_args(args)
    device = memory_device(args.device)
    if args.spatial > 1:
        return _profile_spatial(args, job, device)
    result = profile(job, steps=args.steps, device=device)
    if args.json:
        print_json(result)
        return 0
    print(f"Job: batch {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} base filters, {job.strategy.describe()}; {args.steps} real training steps")
    print(f"estimated (dry run): {format_bytes(result['estimated_bytes'])}")
    print(f"measured ({'max_memory_allocated' if device == 'cuda' else 'peak RSS above post-import RSS'}): "
          f"{format_bytes(result['measured_bytes'])}"
          + (f" (reserved by the caching allocator: {format_bytes(result['reserved_bytes'])})" if device == "cuda" else ""))
    print(f"error: {result['error'] * 100:+.1f} %")
    return 0


def _profile_spatial(args: argparse.Namespace, job: JobConfig, device: str) -> int:
    from fullres.memory.estimate import profile_spatial
    from fullres.memory.plan import check_spatial

    if device != "cpu":
        raise UserError(f"--spatial {args.spatial}: profile starts its processes on this CPU (--device cpu); on "
                        "GPUs, train under torchrun logs each epoch's peak")
    try:
        check_spatial(job, args.spatial)
    except ValueError as error:
        raise UserError(str(error)) from None
    ranks = profile_spatial(job, args.spatial, steps=args.steps)
    if args.json:
        print_json({"spatial": args.spatial, "ranks": ranks})
        return 0
    print(f"Job: batch {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} base filters, {job.strategy.describe()}; {args.steps} real training steps, each "
          f"sample shared by {args.spatial} processes (gloo, {ranks[0]['threads']} thread(s) each)")
    print(f"{'rank':>4}  {'rows':>11}  {'dry run':>22}  {'measured (peak RSS above imports)':>34}  error")
    for rank in ranks:
        lo, hi = rank["rows"]
        print(f"{rank['rank']:>4}  {f'{lo}..{hi}':>11}  {format_bytes(rank['estimated_bytes']):>22}  "
              f"{format_bytes(rank['measured_bytes']):>34}  {rank['error'] * 100:+.1f} %")
    return 0


# ---- plan ---------------------------------------------------------------------------------------

def cmd_plan(args: argparse.Namespace) -> int:
    from fullres.memory.plan import plan, slab_options, spatial_options

    job = job_from_args(args)
    result = plan(job, args.memory, args.method, memory_device(args.device))
    ranking = None
    if args.optimize == "time":
        from fullres.device import Process, configure_cpu
        from fullres.memory.plan import format_ranking, ranking_report
        configure_cpu(0, Process())  # calibrated with the threads train uses, so train reads the same cache
        ranking = ranking_report(job, args.memory, args.method, memory_device(args.device))
    options, spatial = [], []
    if args.method == "dryrun" and not result.fits and not job.strategy.coarse_slabs:
        options = slab_options(job, args.memory, memory_device(args.device))
    if args.method == "dryrun" and not result.fits:
        spatial = spatial_options(job, args.memory, args.method, memory_device(args.device))
    if args.json:
        print_json({**result.to_json(), **({"ranking": ranking} if ranking is not None else {}),
                    **({"slab_options": [option.to_json() for option in options]} if options else {}),
                    **({"spatial_options": [option.to_json() for option in spatial]} if spatial else {})})
        return 0
    verdict = "FITS" if result.fits else "DOES NOT FIT"
    print(f"Job: batch {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
          f"{job.model.filters} base filters, {job.strategy.describe()} (method: {result.method})")
    print(f"Needs {format_bytes(result.required_bytes)} of {format_bytes(result.budget_bytes)}: {verdict}, "
          f"margin {format_bytes(result.margin_bytes)}")
    print(f"Largest batch at {' x '.join(map(str, job.shape))}: {result.max_batch or 'none (batch 1 does not fit)'}")
    shape = ' x '.join(map(str, result.max_shape)) if result.max_shape else "none (not even 16 voxels a side fits)"
    print(f"Largest shape at batch {job.batch}: {shape}")
    for line in slab_lines(options) + spatial_lines(spatial):
        print(line)
    if ranking is not None:
        print("\n".join(format_ranking(ranking)))
    return 0


def spatial_lines(options) -> list[str]:
    """plan's lines on processes sharing each sample (when the job does not fit as given)."""
    if not options:
        return []
    lines = ["One volume across processes (train --spatial S under torchrun; dry run of one process's shard, without "
             "checkpointing or slabs):"]
    lines += [f"  --spatial {option.processes}: {format_bytes(option.peak_bytes)} per process, "
              f"{'fits' if option.fits else 'does not fit'}" for option in options]
    return lines


def slab_lines(options) -> list[str]:
    """plan's table of every-level slab schedules (when the job does not fit as given)."""
    if not options:
        return []
    lines = ["Slabs at every level (dry run, checkpointing, micro-batch 1; FLOPs by torch's counter, against the "
             "step without slabs or checkpointing):"]
    for option in options:
        coarse = list(option.counts[1:])
        while len(coarse) > 1 and coarse[-1] == 1:
            coarse.pop()
        lines.append(f"  --slabs {option.counts[0]} --coarse-slabs {','.join(map(str, coarse))}"
                     f"{' --recompute-inputs 1' if option.recompute_inputs else ''}: "
                     f"{format_bytes(option.peak_bytes)}, {'fits' if option.fits else 'does not fit'}, "
                     f"recomputation +{option.overhead:.0%} FLOPs")
    return lines


# ---- data ---------------------------------------------------------------------------------------

def cmd_synth(args: argparse.Namespace) -> int:
    from fullres.data.synth import write_dataset

    test_cases = args.test_cases if args.test_cases is not None else max(1, args.cases // 4)
    out = write_dataset(Path(args.out), train_cases=args.cases, test_cases=test_cases, shape=tuple(args.shape),
                        seed=args.seed, kind=args.kind, dtype=args.dtype, progress=not args.quiet,
                        layout=args.layout)
    print(f"wrote {args.cases} training and {test_cases} test cases ({args.kind}, "
          f"{' x '.join(map(str, args.shape))} x 4"
          + (f", {args.layout} layout" if args.layout != "msd" else "") + f") to {out}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from fullres.data.check import check_dataset

    data = Path(args.data)
    if not data.is_dir():  # the command's own error (stderr), not a finding about a dataset (stdout)
        raise UserError(f"{data}: {'not a folder' if data.exists() else 'no such folder'} (give a dataset folder)")
    report = check_dataset(data, layout=args.layout)
    for line in report.lines():
        print(line)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_convert(args: argparse.Namespace) -> int:
    from fullres.data.convert import convert_dataset

    source, train_cases, test_cases = convert_dataset(Path(args.data), Path(args.out), args.layout,
                                                      source_layout=args.source_layout, progress=not args.quiet)
    print(f"wrote {train_cases} training and {test_cases} test cases of {source.root} ({source.layout}) "
          f"to {args.out} in the {args.layout} layout")
    return 0


# ---- train --------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from fullres.train import TrainRequest, run

    if args.data is not None and not args.resume and not Path(args.data).is_dir():  # before --out is made
        raise UserError(f"DATA {args.data}: {'not a folder' if Path(args.data).exists() else 'no such folder'}")
    options = {name: getattr(args, name) for name in (*JOB_FLAGS, "epochs", "lr", "loss", "schedule", "seed",
                                                       "val_fraction", "device", "threads", "workers", "tracker",
                                                       "augment")}
    run(TrainRequest(out=Path(args.out), data=Path(args.data) if args.data is not None else None, options=options,
                     make_job=job_from_options, strategy=args.strategy, memory=args.memory, force=args.force,
                     autotune=not args.no_autotune, resume=args.resume, progress=not args.quiet, layout=args.layout,
                     spatial=args.spatial, timeout=args.timeout, trust_code=args.trust_code))
    return 0


# ---- predict, evaluate, show ----------------------------------------------------------------------

def cmd_predict(args: argparse.Namespace) -> int:
    from fullres.device import configure_cpu, pick_device, process_group
    from fullres.predict import predict_files

    choice = args.device if args.engine == "torch" else "cpu"
    with process_group(memory_device(choice), args.timeout) as process:  # one process without torchrun
        device = pick_device(choice, process)
        if process.world > 1 and device.type == "cpu":
            configure_cpu(0, process)  # the cores shared between the local processes
        written = predict_files(Path(args.run_dir), args.inputs, Path(args.out), device,
                                probabilities=args.probabilities, progress=not args.quiet, layout=args.layout,
                                overwrite=args.overwrite, engine=args.engine,
                                engine_file=Path(args.engine_file) if args.engine_file else None,
                                memory=args.memory, process=process, spatial=args.spatial,
                                trust_code=args.trust_code)
    if process.main:
        print(f"wrote {len(written)} mask(s) to {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fullres.export import export_run

    result = export_run(Path(args.run_dir), args.format, Path(args.out) if args.out else None,
                        tuple(args.shape) if args.shape else None, args.dynamic, args.overwrite, args.trust_code)
    if args.json:
        print_json(result)
        return 0
    shape = "any H x W x D" if result["shape"] is None else " x ".join(map(str, result["shape"]))
    print(f"wrote {' + '.join(result['files'])} ({args.format}, input 1 x {result['in_channels']} x {shape}); verified against PyTorch at "
          f"{' x '.join(map(str, result['verified_shape']))}: max abs difference {result['max_abs_diff']:.1e} "
          f"(tolerance {result['tolerance']:g})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fullres.metrics import METRIC_NAMES, evaluate_folders, result_columns, write_metrics_csv

    if args.challenge is not None and not args.lesion_wise:
        raise UserError("--challenge sets the lesion-wise parameters: it needs --lesion-wise")
    rule = (args.challenge or DEFAULT_CHALLENGE) if args.lesion_wise else None
    csv_path = Path(args.csv) if args.csv else Path(args.pred) / "metrics.csv"
    refuse_existing(csv_path, "--csv", args.overwrite, starts_with(",".join(["case", "region", *METRIC_NAMES])))
    layout, label_regions = evaluation_regions(Path(args.pred), Path(args.labels), args.layout)
    result = evaluate_folders(args.pred, args.labels, tolerance_mm=args.tolerance, regions=label_regions,
                              pred_is_binary_wt=args.wt_only or predictions_are_binary(Path(args.pred)),
                              lesion_rule=rule)
    write_metrics_csv(result, csv_path)
    if args.json:
        print_json(result)
        return 0
    columns = result_columns(result)
    headers = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)", "lesion_dice": "L-Dice", "lesion_hd95": "L-HD95",
               "truth_lesions": "lesions", "matched_lesions": "matched", "missed_lesions": "missed",
               "fp_lesions": "FP"}

    def cells(values: dict) -> str:  # distances and mean counts with 2 decimals, scores with 3, counts whole
        return "".join(f"{values[m]:>11d}" if isinstance(values[m], int)
                       else f"{values[m]:>11.2f}" if m.endswith(("hd95", "lesions")) else f"{values[m]:>11.3f}"
                       for m in columns)

    width = max([16, *(len(case) + 2 for case in result["cases"])])  # BraTS 2023 names are 19 characters
    print(f"{'case':<{width}}{'region':<8}" + "".join(f"{headers.get(m, m):>11}" for m in columns))
    for case, regions in result["cases"].items():
        for region, values in regions.items():
            print(f"{case:<{width}}{region:<8}{cells(values)}")
    for region, metrics in result["summary"].items():
        print(f"{'mean ± std':<{width}}{region:<8}{cells({m: metrics[m]['mean'] for m in columns})}"
              + "   (std " + ", ".join(f"{metrics[m]['std']:.3f}" for m in columns) + ")")
    print(f"NSD tolerance {args.tolerance} mm; labels as {layout} ("
          + ", ".join(f"{name} = {{{', '.join(map(str, values))}}}" for name, values in label_regions.items())
          + ")" + (f"; lesion-wise as {rule} (docs/evaluation.md)" if rule else "") + f"; CSV: {csv_path}")
    return 0


def evaluation_regions(pred_dir: Path, labels_dir: Path, layout: str | None) -> tuple[str, dict]:
    """The label values of WT / TC / ET for scoring: --layout, else the prediction.json `predict` wrote,
    else the dataset holding LABELS (DATA/labelsTs) or BraTS case names in it, else MSD Task01's."""
    from fullres.data.layouts import MSD_REGIONS, detect_label_regions, regions_for_layout

    if layout is not None:
        return layout, regions_for_layout(layout, labels_dir)
    try:
        info = json.loads((pred_dir / "prediction.json").read_text())
        if isinstance(info.get("regions"), dict) and info["regions"]:
            return str(info.get("layout", "prediction.json")), {k: tuple(v) for k, v in info["regions"].items()}
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        pass
    found = detect_label_regions(labels_dir)
    return found if found is not None else ("msd", dict(MSD_REGIONS))


def predictions_are_binary(pred_dir: Path) -> bool:
    """A folder written by `fullres predict` for a whole-tumour run holds {0, 1} masks: evaluate WT only."""
    info = pred_dir / "prediction.json"
    try:
        return json.loads(info.read_text()).get("target") == "wt"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def cmd_show(args: argparse.Namespace) -> int:
    from fullres.figures import figure7_overlay
    from fullres.data.nifti import open_nifti, read_array

    out = Path(args.out)
    for given in (args.image, args.pred, args.label):  # never over an input, whatever --overwrite says
        if given is not None and out.exists() and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise UserError(f"--out {args.out} is one of the inputs: give another path")
    refuse_existing(out, "--out", args.overwrite)

    image_nii = open_nifti(Path(args.image))
    image = read_array(image_nii, Path(args.image))
    if image.ndim not in (3, 4):
        raise UserError(f"{args.image}: a {image.ndim}D image (shape {image.shape}); show draws a 3D image or a "
                        "channel of a 4D one")
    if image.ndim == 4:
        if not 0 <= args.channel < image.shape[3]:
            raise UserError(f"--channel {args.channel}: {args.image} has {image.shape[3]} channels")
        image = image[..., args.channel]
    masks = []
    for path in (args.pred, args.label):
        if path is None:
            masks.append(np.zeros(image.shape, bool))
            continue
        array = read_array(open_nifti(Path(path)), Path(path))
        if array.shape != image.shape:
            raise UserError(f"{path}: shape {array.shape} differs from the image's {image.shape}")
        masks.append(array > 0)
    outlines = {}
    if args.lesions:  # the whole tumour's missed and false-positive lesions, as evaluate --lesion-wise finds them
        from fullres.lesions import lesion_masks

        if args.pred is None or args.label is None:
            raise UserError("--lesions compares --pred with --label: give both")
        spacing = tuple(float(z) for z in image_nii.header.get_zooms()[:3])
        outlines = dict(zip(("missed", "false_positive"), lesion_masks(masks[0], masks[1], spacing, args.challenge)))
    out = figure7_overlay(image, masks[1], masks[0], Path(args.out), affine=image_nii.affine,
                          title=args.title or Path(args.image).name, **outlines)
    print(f"wrote {out}")
    return 0


# ---- demo ---------------------------------------------------------------------------------------

DEMO_MARKER = ".fullres-demo"


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole pipeline on the embedded synthetic default, as the commands a user would type."""
    import shutil

    from fullres.device import Process, available_memory, pick_device

    out = Path(args.out).absolute()
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise UserError(f"--out {out} is not empty and is not a previous demo; choose a new folder")
        shutil.rmtree(out)  # only ever a folder this command wrote (it carries the marker)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by `fullres demo`; the next demo replaces this folder\n")
    run, data = out / "run", out / "run" / "synthetic_data"
    device = pick_device("auto", Process())  # where `train` below will run (CUDA when present)
    budget = f"{available_memory(device) / 2**30:.1f}GiB"
    quiet = ["--quiet"] if args.quiet else []
    model = (["--model", args.model] if args.model else []) + (["--model-args", args.model_args] if args.model_args else [])
    steps = [
        ("1/7 estimate: the paper's job, Table 1 method", ["estimate"]),
        ("2/7 plan: the paper's job on its 1.5 TB server (Table 2)", ["plan", "--memory", "1.5TB", "--device", "cpu"]),
        ("3/7 plan: the demo job on this machine (dry-run method)",
         ["plan", "--memory", budget, "--method", "dryrun", "--shape", "48", "48", "32", "--filters", "8",
          "--batch", "2", "--device", device.type,
          *(model or ["--norm", "instance"])]),
        ("4/7 train: synthetic BraTS-like data, whole 48x48x32 volumes", ["train", "--out", str(run), *quiet, *model]),
        ("5/7 predict: the held-out synthetic test cases", ["predict", str(run), str(data), "--out",
                                                             str(out / "predictions"), *quiet]),
        ("6/7 evaluate: Dice, NSD, HD95 against the kept-aside test labels",
         ["evaluate", str(out / "predictions"), str(data / "labelsTs")]),
    ]
    parser = build_parser()
    for title, argv in steps:
        print(f"\n== {title}\n$ fullres {' '.join(argv)}", flush=True)
        step = parser.parse_args(argv)
        code = step.run(step)
        if code:
            return code
    print("\n== 7/7 show: Figure 7 overlays (prediction red, truth blue, overlap purple)")
    figures = out / "figures"
    for mask in sorted((out / "predictions").glob("*.nii.gz")):
        argv = ["show", str(data / "imagesTs" / mask.name), "--pred", str(mask), "--label",
                str(data / "labelsTs" / mask.name), "--out", str(figures / mask.name.replace(".nii.gz", ".png"))]
        step = parser.parse_args(argv)
        code = step.run(step)
        if code:
            return code
    print(f"\nDone. Results in {out}/:\n  run/          config.json, metrics.csv, best.pt, last.pt, curves.png, "
          f"overlay_*.png, tb/\n  predictions/  masks (NIfTI, original geometry) and metrics.csv\n"
          f"  figures/      Figure 7 overlays of the test cases")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None,
                        help="MSD dataset folder (default: a synthetic dataset generated inside --out)")
    parser.add_argument("--out", required=True, help="run folder: config.json, metrics.csv, checkpoints, logs")
    add_job_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="epochs (paper: 25); with --resume, more than the run's extends it")
    parser.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate")
    parser.add_argument("--loss", choices=tuple(LOSSES), default=None, help="soft Dice (default), or Dice + BCE")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate schedule (default: cosine)")
    parser.add_argument("--seed", type=seed_value, default=None, help="weights, split, order and dropout follow from it")
    parser.add_argument("--val-fraction", type=fraction, default=None, help="share of cases held out for validation")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="auto (default): CUDA when present")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading worker processes (default 1)")
    parser.add_argument("--tracker", choices=("tensorboard", "mlflow", "none"), default=None,
                        help="where metrics, configuration and figures go besides the run folder: tensorboard "
                             "(default, RUN/tb), mlflow ($MLFLOW_TRACKING_URI or RUN/mlruns), none")
    parser.add_argument("--augment", choices=("none", "light", "default"), default=None,
                        help="augmentation of the training samples: none (the paper's job), light (flips, intensity), "
                             "default (also affine, elastic, axial 90-degree rotations; the demo's)")
    parser.add_argument("--strategy", choices=("manual", "auto"), default="manual",
                        help="auto: the fastest exact strategy that fits, by estimated step time (checkpointing, "
                             "accumulation, slabs; bf16 where the hardware has it)")
    parser.add_argument("--memory", type=memory_size, default=None,
                        help="memory budget for the preflight (default: what is available now)")
    parser.add_argument("--force", action="store_true", help="skip the memory preflight")
    parser.add_argument("--no-autotune", action="store_true",
                        help="keep the contiguous memory format instead of timing channels-last (runs of 100+ steps)")
    parser.add_argument("--layout", choices=LAYOUT_NAMES, default=None,
                        help="the dataset's layout (default: detected from the folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from last.pt (other flags must agree with its config.json)")
    add_trust_argument(parser)
    add_launch_arguments(parser, "sample", "holding its rows (along H) of every level; processes / S samples at a "
                                           "time (exact; a resumed run may change S)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """--trust-code: the user's own word that the run's network code may run (see fullres.trust)."""
    parser.add_argument("--trust-code", action="store_true",
                        help="build a network that is code the run names (its factory file, or a module to import) "
                             "even if it was not trained on this account; read that code first")


def add_launch_arguments(parser: argparse.ArgumentParser, unit: str, how: str) -> None:
    """--spatial S and --timeout, for a command that runs under torchrun (train, predict)."""
    parser.add_argument("--spatial", type=positive_int, default=1, metavar="S",
                        help=f"under torchrun: S processes share each {unit}, each {how}")
    parser.add_argument("--timeout", type=positive_int, default=COLLECTIVE_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun: a process waiting this long for the others in a collective ends the "
                             f"job (default {COLLECTIVE_TIMEOUT_S})")


# ---- the parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fullres", description=__doc__.splitlines()[0])
    from fullres.versions import VersionAction
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    estimate = commands.add_parser("estimate", help="memory a training job needs (whitepaper Table 1)")
    add_job_arguments(estimate)
    estimate.add_argument("--bytes-per-value", type=positive_int, default=None,
                          help="bytes per stored value (default: 4 for fp32, 2 for bf16/fp16)")
    estimate.add_argument("--method", choices=("table1", "dryrun"), default="table1",
                          help="table1: the paper's hand method; dryrun: one real training step on fake tensors")
    estimate.add_argument("--time", action="store_true",
                          help="also the training wall time, from a short calibration on this machine (cached)")
    estimate.add_argument("--cases", type=positive_int, default=None, help="with --time: labelled cases")
    estimate.add_argument("--epochs", type=positive_int, default=PAPER.epochs, help="with --time: epochs (paper: 25)")
    estimate.add_argument("--val-fraction", type=fraction, default=PAPER.val_fraction, help="with --time: validation share")
    estimate.add_argument("--threads", type=int, default=0, help="with --time: CPU threads (default: physical cores)")
    estimate.add_argument("--recalibrate", action="store_true", help="with --time: measure again, ignoring the cache")
    add_memory_device_argument(estimate)
    estimate.add_argument("--json", action="store_true", help="machine-readable output")
    estimate.set_defaults(run=cmd_estimate)

    plan = commands.add_parser("plan", help="does a job fit a machine's memory; largest batch and shape that do")
    add_job_arguments(plan)
    plan.add_argument("--memory", type=memory_size, required=True, help="memory budget, e.g. 192GB, 384GiB, 1.5TB")
    plan.add_argument("--method", choices=("table1", "dryrun"), default="dryrun",
                      help="dryrun (default): the real peak of a training step, on fake tensors (seconds per "
                           "estimate); table1: the paper's hand method (Table 2's verdicts)")
    plan.add_argument("--optimize", choices=("memory", "time"), default="memory",
                      help="time: also rank the exact strategies that fit by estimated step time (calibrated here)")
    add_memory_device_argument(plan)
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(run=cmd_plan)

    profile = commands.add_parser("profile", help="measure a training step's real peak memory against the dry run")
    add_job_arguments(profile)
    profile.add_argument("--steps", type=positive_int, default=2, help="training steps to run (the 2nd is the peak)")
    profile.add_argument("--spatial", type=positive_int, default=1, metavar="S",
                         help="S processes share each sample, as train --spatial: each rank's peak against its dry run")
    add_memory_device_argument(profile)
    profile.add_argument("--json", action="store_true", help="machine-readable output")
    profile.set_defaults(run=cmd_profile)

    bench = commands.add_parser("bench", help="training-step speed: stock vs oneDNN, fp32 vs bf16, channels-last, compile")
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
    bench.set_defaults(run=cmd_bench)

    sweep = commands.add_parser("sweep", help="memory over many shapes: CSV, Figure 3 and Figure 5")
    add_job_arguments(sweep)
    sweep.add_argument("--shapes", nargs="+", type=shape_spec, required=True, metavar="HxWxD",
                       help="shapes to sweep, e.g. 32 48 64 96x96x64")
    sweep.add_argument("--batches", nargs="+", type=positive_int, default=[1], help="batches to sweep")
    sweep.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32"], help="precisions to sweep")
    sweep.add_argument("--checkpointing-sweep", choices=("off", "on", "both"), default="both",
                       help="sweep without and/or with activation checkpointing")
    sweep.add_argument("--max-measure", type=memory_size, default=parse_size("18GiB"),
                       help="rows whose dry run exceeds this are estimated only (default 18GiB)")
    sweep.add_argument("--no-measure", action="store_true", help="estimates only (seconds, not minutes)")
    sweep.add_argument("--repeats", type=positive_int, default=1,
                       help="measure each job N times, each in a fresh process; the median is compared (under "
                            "glibc's default heap a job's peak varies by a few per cent)")
    add_memory_device_argument(sweep)
    sweep.add_argument("--out", required=True, help="folder for sweep.csv and the figures")
    sweep.add_argument("--overwrite", action="store_true",
                       help="replace files in --out that an earlier sweep did not write")
    sweep.set_defaults(run=cmd_sweep)


    synth = commands.add_parser("synth", help="write a synthetic brain-tumour dataset (MSD layout, or another)")
    synth.add_argument("out", help="output folder (created; must be empty or a previous synth output)")
    synth.add_argument("--cases", type=positive_int, required=True, help="training cases")
    synth.add_argument("--test-cases", type=positive_int, default=None, help="test cases (default: cases/4, at least 1)")
    synth.add_argument("--shape", nargs=3, type=positive_int, default=[240, 240, 155], metavar=("H", "W", "D"),
                       help="volume size (default 240 240 155, like BraTS)")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    synth.add_argument("--kind", choices=("brats", "random"), default="brats",
                       help="brats: BraTS-like phantoms; random: the paper's random-valued inputs (Table 2)")
    synth.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="image voxel type")
    synth.add_argument("--layout", choices=LAYOUT_NAMES, default="msd",
                       help="msd (default), nnunet, brats2021 or brats2023: files, names and label values")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(run=cmd_synth)

    check = commands.add_parser("check", help="validate every case of a dataset (MSD, nnU-Net, BraTS) before a long job")
    check.add_argument("data", help="dataset folder")
    check.add_argument("--layout", choices=LAYOUT_NAMES, default=None,
                       help="the folder's layout (default: detected)")
    check.set_defaults(run=cmd_check)

    convert = commands.add_parser("convert", help="rewrite a dataset in another layout, label values mapped")
    convert.add_argument("data", help="dataset folder (any layout)")
    convert.add_argument("out", help="new folder (must not exist, or be empty)")
    convert.add_argument("--layout", choices=LAYOUT_NAMES, required=True, help="the layout to write")
    convert.add_argument("--source-layout", choices=LAYOUT_NAMES, default=None,
                         help="DATA's layout (default: detected)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=cmd_convert)

    train = commands.add_parser("train", help="train the 3D U-Net on whole volumes (no DATA: a synthetic demo)")
    add_train_arguments(train)
    train.set_defaults(run=cmd_train)

    demo = commands.add_parser("demo", help="the whole pipeline on built-in synthetic data (a few minutes on 2 cores)")
    demo.add_argument("--out", default="fullres-demo", help="results folder (default: ./fullres-demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--model", default=None, metavar="NAME", help="the network to train (default: unet3d; see train)")
    demo.add_argument("--model-args", default=None, metavar="JSON", help="its keyword arguments (JSON)")
    demo.set_defaults(run=cmd_demo)

    predict = commands.add_parser("predict", help="write NIfTI masks for images with a trained run")
    predict.add_argument("run_dir", metavar="RUN", help="run folder (uses best.pt) or a checkpoint file")
    predict.add_argument("inputs", nargs="+", help="NIfTI images, or a dataset folder (its test cases)")
    predict.add_argument("--out", required=True, help="folder for the masks (<case>.nii.gz)")
    predict.add_argument("--probabilities", action="store_true", help="also write <case>_prob.nii.gz")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--layout", choices=LAYOUT_NAMES, default=None,
                         help="the input folders' layout (default: detected); masks follow its names and labels")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace masks in --out that an earlier predict did not write (never the inputs)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.add_argument("--engine", choices=("torch", "onnx", "openvino"), default="torch",
                         help="torch (default), or the run's exported model through ONNX Runtime or OpenVINO (CPU)")
    predict.add_argument("--engine-file", default=None, metavar="FILE",
                         help="the exported model (default: the run's own, RUN/export/model.onnx or model.xml)")
    predict.add_argument("--memory", type=memory_size, default=None, metavar="SIZE",
                         help="memory the inference plan must fit (default: what is available now), e.g. 8GiB")
    add_launch_arguments(predict, "volume", "computing its rows (along H) of every level (exact); processes / S "
                                            "volumes at a time")
    add_trust_argument(predict)
    predict.set_defaults(run=cmd_predict)

    export = commands.add_parser("export", help="the trained network as ONNX or OpenVINO IR, verified against PyTorch")
    export.add_argument("run_dir", metavar="RUN", help="run folder (uses best.pt) or a checkpoint file")
    export.add_argument("--format", required=True, help="onnx or openvino")
    export.add_argument("--out", default=None, metavar="FILE",
                        help="the model file (default: RUN/export/model.onnx, or RUN/export/model.xml + .bin)")
    shape = export.add_mutually_exclusive_group()
    shape.add_argument("--shape", nargs=3, type=positive_int, metavar=("H", "W", "D"),
                       help="the input's spatial size (default: the run's)")
    shape.add_argument("--dynamic", action="store_true", help="any spatial size the network takes")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    add_trust_argument(export)
    export.set_defaults(run=cmd_export)

    evaluate = commands.add_parser("evaluate", help="Dice, NSD and HD95 per case and region (WT, TC, ET)")
    evaluate.add_argument("pred", help="folder of predicted masks")
    evaluate.add_argument("labels", help="folder of ground-truth label maps (same file names)")
    evaluate.add_argument("--tolerance", type=positive_float, default=1.0, help="NSD tolerance in mm (default 1)")
    evaluate.add_argument("--wt-only", action="store_true", help="predictions are {0,1} whole-tumour masks")
    evaluate.add_argument("--csv", default=None,
                          help="CSV path (default: PRED/metrics.csv; an earlier evaluate's CSV is replaced)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a --csv that evaluate did not write")
    evaluate.add_argument("--layout", choices=LAYOUT_NAMES, default=None,
                          help="the labels' layout, for the values of WT/TC/ET (default: from PRED/prediction.json "
                               "or the labels' folder; else MSD's)")
    evaluate.add_argument("--lesion-wise", action="store_true",
                          help="also BraTS 2023's lesion-wise Dice and HD95, and lesion counts, per region")
    evaluate.add_argument("--challenge", choices=tuple(CHALLENGES), default=None,
                          help=f"the lesion-wise parameters (default {DEFAULT_CHALLENGE})")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.set_defaults(run=cmd_evaluate)

    show = commands.add_parser("show", help="Figure 7: prediction (red) vs truth (blue) in three views")
    show.add_argument("image", help="the image (NIfTI, 3D or 4D)")
    show.add_argument("--pred", default=None, help="predicted mask (NIfTI)")
    show.add_argument("--label", default=None, help="ground-truth label map (NIfTI)")
    show.add_argument("--channel", type=int, default=0, help="channel of a 4D image (default 0: FLAIR in MSD)")
    show.add_argument("--title", default=None)
    show.add_argument("--out", required=True, help="PNG path (an existing file is kept unless --overwrite)")
    show.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    show.add_argument("--lesions", action="store_true",
                      help="outline the missed (yellow) and false-positive (green) lesions of the whole tumour, "
                           "matched as evaluate --lesion-wise matches them")
    show.add_argument("--challenge", choices=tuple(CHALLENGES), default=DEFAULT_CHALLENGE,
                      help=f"with --lesions: the lesion-wise parameters (default {DEFAULT_CHALLENGE})")
    show.set_defaults(run=cmd_show)

    from fullres import nnunet_cli
    nnunet_cli.add_arguments(commands.add_parser(
        "nnunet", help="nnU-Net v2: write plans whose patch and batch size fit a memory budget (nnunet plan)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. A refusal or fault is one line on stderr and a non-zero exit code: library warnings
    raised on the way are held back while the command runs and shown after it only when it succeeds; an
    unexpected exception is one line too (FULLRES_TRACEBACK=1 shows its traceback)."""
    from fullres.memory.malloc import set_training_malloc_policy

    parser = build_parser()
    args = parser.parse_args(argv)
    # the fake-tensor mode logs every operator a dry run cannot follow, traceback included; the refusal says it
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    with warnings.catch_warnings(record=True) as held:
        if not sys.warnoptions:  # the user's own -W / PYTHONWARNINGS stand
            warnings.simplefilter("default")
        code, message = _run(args, set_training_malloc_policy)
    if message is not None:
        print(f"fullres {args.command}: {' '.join(message.split())}", file=sys.stderr)
    else:
        for warning in held[:HELD_WARNINGS]:  # as Python would have printed them
            sys.stderr.write(warnings.formatwarning(warning.message, warning.category, warning.filename,
                                                    warning.lineno, warning.line))
        if len(held) > HELD_WARNINGS:
            sys.stderr.write(f"... and {len(held) - HELD_WARNINGS} more warnings\n")
    return code


HELD_WARNINGS = 50  # a long training run's repeated warnings are shown up to this many


def _run(args: argparse.Namespace, set_training_malloc_policy) -> tuple[int, str | None]:
    """(exit code, the one line to print on failure or None)."""
    try:
        set_training_malloc_policy()  # FULLRES_MALLOC=fixed|cached|default for every job (see memory/malloc.py)
        return args.run(args), None
    except UserError as error:
        return error.exit_code, f"error: {error}"
    except KeyboardInterrupt:
        return 130, "interrupted"
    except MemoryError:
        return 1, "error: out of memory (see `fullres plan` for what fits)"
    except OSError as error:  # permissions, a read-only or full disk, a path that is a file or a folder
        where = f"{error.filename}: " if error.filename else ""
        return 1, f"error: {where}{error.strerror or error}"
    except RecursionError:
        return 1, "error: an input is nested too deeply to read (JSON or a symlink chain)"
    except Exception as error:  # noqa: BLE001 - a failure no check foresaw: one line, never a traceback
        if os.environ.get("FULLRES_TRACEBACK"):
            traceback.print_exc()
        return 1, (f"error: {type(error).__name__}: {first_line(error)[:300]} (unexpected; "
                   "FULLRES_TRACEBACK=1 shows where)")


if __name__ == "__main__":
    sys.exit(main())
