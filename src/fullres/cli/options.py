"""The command line's shared vocabulary: argument types that refuse bad values in one line, the job
flags every job command takes (one command line describes one job everywhere), and the job they describe."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from typing import TYPE_CHECKING

from fullres.errors import UserError
from fullres.job.strategy import Strategy
from fullres.kernels.gpus import GPUS, GPU, gpu_named
from fullres.terms import COLLECTIVE_TIMEOUT_S, DEVICES, NORMS, OWN_DIVISORS, TARGET_CLASSES, check_sizes
from fullres.units import parse_size

if TYPE_CHECKING:
    from fullres.job.config import JobConfig


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


def shape_spec(text: str) -> tuple[int, int, int]:
    """'64' (a cube) or '64x64x32'."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape: write N or HxWxD, e.g. 64 or 96x96x64")
    return tuple(positive_int(p) for p in parts)


def add_job_arguments(parser: argparse.ArgumentParser) -> None:
    """One command line describes one job everywhere. Unset flags stay None and are filled from the
    network's preset (:func:`fullres.job.config.job_defaults`): the paper's, or intel-unet's own; `train`
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
    architecture = options.get("model") or "unet3d"
    paper = architecture == "unet3d"
    prefix, network = ("", "") if paper else (f"--model {architecture}: ", f"network {architecture}: ")
    if architecture in OWN_DIVISORS and options.get("shape"):  # refused before torch is imported
        try:
            check_sizes(tuple(options["shape"]), *OWN_DIVISORS[architecture], network)
        except ValueError as error:
            raise UserError(prefix + str(error)) from None
    from fullres.cost.plan import check_checkpointing
    from fullres.job.config import JobConfig, job_defaults
    from fullres.nets.families import factory_file, file_digest
    from fullres.nets.registry import ModelConfig, check_shape, tape_refusal

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
        job = JobConfig(model=model, shape=tuple(options["shape"]), batch=options["batch"], strategy=strategy)
        check_shape(job.model, job.shape)
        refusal = tape_refusal(job.model, job.shape) if job.strategy.slabbed else None
        if refusal:
            raise ValueError(f"--slabs: {refusal}")
        check_checkpointing(job)  # refuses, or warns, where block checkpointing saves (almost) nothing
        return job
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise UserError(prefix + str(error)) from None


def job_from_args(args: argparse.Namespace) -> JobConfig:
    return job_from_options(vars(args))


def add_memory_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="the device whose memory is estimated (auto: CUDA when present)")


def gpu_choice(text: str) -> GPU:
    try:
        return gpu_named(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_budget_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--memory SIZE and --gpu NAME: the budget a job is planned against (--gpu: that GPU's memory, on CUDA)."""
    parser.add_argument("--memory", type=memory_size, default=None,
                        help="memory budget, e.g. 192GB, 384GiB, 1.5TB" + (" (or --gpu)" if required else ""))
    parser.add_argument("--gpu", type=gpu_choice, default=None, metavar="NAME",
                        help=f"plan for this GPU: its memory is the budget, the job runs on CUDA (modelled where no "
                             f"GPU is here); one of {', '.join(GPUS)}")


def job_budget_and_device(args: argparse.Namespace, required: bool = False) -> tuple[JobConfig, int | None, str]:
    """The job the flags describe (:func:`job_from_args`), the budget in bytes (None: none given and none
    `required`) and the estimate's device type (:func:`fullres.kernels.device.estimate_device`) that
    --memory, --gpu and --device say; UserError naming the options where they disagree. The flags torch is
    not needed for (the budget's, and a shape fullres's own networks refuse) are checked before it is
    imported."""
    if args.gpu is not None and args.memory is not None:
        raise UserError("--memory and --gpu both set the budget: give one")
    if args.gpu is not None and args.device == "cpu":
        raise UserError(f"--gpu {args.gpu.name} plans a CUDA job: not with --device cpu")
    if required and args.gpu is None and args.memory is None:
        raise UserError("give the budget: --memory SIZE or --gpu NAME")
    job = job_from_args(args)
    from fullres.kernels.device import estimate_device

    budget = args.gpu.memory_bytes if args.gpu is not None else args.memory
    return job, budget, "cuda" if args.gpu is not None else estimate_device(args.device)


def add_trust_argument(parser: argparse.ArgumentParser) -> None:
    """--trust-code: the user's own word that the run's network code may run (see fullres.run.trust)."""
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
