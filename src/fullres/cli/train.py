"""`fullres train`: a run folder trained from a dataset and the job flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.cli.options import (
    JOB_FLAGS,
    add_job_arguments,
    add_launch_arguments,
    add_trust_argument,
    fraction,
    job_from_options,
    memory_size,
    non_negative_int,
    positive_float,
    positive_int,
    seed_value,
)
from fullres.errors import UserError
from fullres.terms import AUGMENTATIONS, CROPS, DEVICES, LAYOUTS, LOSS_NAMES, SCHEDULES, TRACKERS


def add_parser(commands) -> None:
    train = commands.add_parser("train", help=HELP["train"])
    add_train_arguments(train)
    train.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.run.train import TrainRequest
    from fullres.run.train import run as train

    if args.data is not None and not args.resume and not Path(args.data).is_dir():  # before --out is made
        raise UserError(f"DATA {args.data}: {'not a folder' if Path(args.data).exists() else 'no such folder'}")
    if args.fold is not None and args.folds is None and not args.resume:
        raise UserError(f"--fold {args.fold} needs --folds K (the number of cross-validation folds)")
    if args.folds is not None and args.folds < 2:
        raise UserError(f"--folds must be at least 2, got {args.folds}")
    if args.folds is not None and not 0 <= (args.fold or 0) < args.folds:
        raise UserError(f"--fold {args.fold} is out of range for --folds {args.folds} (0..{args.folds - 1})")
    if args.folds is not None and args.val_fraction is not None:
        raise UserError("--val-fraction and --folds both choose the validation cases: give one")
    options = {name: getattr(args, name) for name in (*JOB_FLAGS, "epochs", "lr", "loss", "schedule", "seed",
                                                       "val_fraction", "device", "threads", "workers", "tracker",
                                                       "augment", "folds", "fold", "spacing", "crop")}
    train(TrainRequest(out=Path(args.out), data=Path(args.data) if args.data is not None else None, options=options,
                     make_job=job_from_options, strategy=args.strategy, memory=args.memory, force=args.force,
                     autotune=not args.no_autotune, resume=args.resume, progress=not args.quiet, layout=args.layout,
                     spatial=args.spatial, timeout=args.timeout, trust_code=args.trust_code))
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", nargs="?", default=None,
                        help="MSD dataset folder (default: a synthetic dataset generated inside --out)")
    parser.add_argument("--out", required=True, help="run folder: config.json, metrics.csv, checkpoints, logs")
    add_job_arguments(parser)
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="epochs (paper: 25); with --resume, more than the run's extends it")
    parser.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate")
    parser.add_argument("--loss", choices=LOSS_NAMES, default=None, help="soft Dice (default), or Dice + BCE")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None, help="learning-rate schedule (default: cosine)")
    parser.add_argument("--seed", type=seed_value, default=None, help="weights, split, order and dropout follow from it")
    parser.add_argument("--val-fraction", type=fraction, default=None, help="share of cases held out for validation")
    parser.add_argument("--folds", type=non_negative_int, default=None, metavar="K",
                        help="K-fold cross-validation (K >= 2): the cases split into K folds by --seed, written to "
                             "RUN/splits.json (default: one seeded split by --val-fraction)")
    parser.add_argument("--fold", type=non_negative_int, default=None, metavar="I",
                        help="with --folds K: the fold validated on, 0..K-1 (default 0)")
    parser.add_argument("--device", choices=DEVICES, default=None, help="auto (default): CUDA when present")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    parser.add_argument("--workers", type=int, default=None, help="data-loading worker processes (default 1)")
    parser.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                        help="augmentation of the training samples: none (the paper's job), light (flips, intensity), "
                             "default (also affine, elastic, axial 90-degree rotations; the demo's)")
    parser.add_argument("--spacing", nargs="+", default=None, metavar="S",
                        help="voxel spacing every image is resampled to for training, and each prediction back from: "
                             "auto (the training images' median, as nnU-Net; the demo's), none (as stored; the paper "
                             "preset's, so the default with DATA), or X Y Z in mm; --shape counts voxels at it")
    parser.add_argument("--crop", choices=CROPS, default=None,
                        help="training images larger than --shape: foreground (a random window per sample, a third "
                             "centred on a foreground voxel; the demo's) or center (one window on the brain; the "
                             "paper preset's, so the default with DATA)")
    parser.add_argument("--tracker", choices=TRACKERS, default=None,
                        help="where metrics, configuration and figures go besides the run folder: tensorboard "
                             "(default, RUN/tb), mlflow ($MLFLOW_TRACKING_URI or RUN/mlruns), none")
    parser.add_argument("--strategy", choices=("manual", "auto"), default="manual",
                        help="auto: the fastest exact strategy that fits, by estimated step time (checkpointing, "
                             "accumulation, slabs; bf16 where the hardware has it)")
    parser.add_argument("--memory", type=memory_size, default=None,
                        help="memory budget for the preflight (default: what is available now)")
    parser.add_argument("--force", action="store_true", help="skip the memory preflight")
    parser.add_argument("--no-autotune", action="store_true",
                        help="keep the contiguous memory format instead of timing channels-last (runs of 100+ steps)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="the dataset's layout (default: detected from the folder)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out from last.pt (other flags must agree with its config.json)")
    add_trust_argument(parser)
    add_launch_arguments(parser, "sample", "holding its rows (along H) of every level; processes / S samples at a "
                                           "time (exact; a resumed run may change S)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
