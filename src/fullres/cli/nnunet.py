"""`fullres nnunet plan DATASET --memory SIZE`: nnU-Net v2 plans whose patch and batch size fit a memory
budget (:mod:`fullres.nnunet.plans`).

:func:`add_arguments` fills the ``nnunet`` command's parser (its ``plan`` action sets ``run``), and
:func:`run` runs it: exit 0 with the written plans, or a :class:`fullres.errors.UserError` (one line, exit 2)
for a bad plans file, a budget nothing fits, or an output that exists.
"""

from __future__ import annotations

import argparse
import json
import sys

from fullres.cli.commands import HELP
from fullres.units import format_bytes, parse_size


def _memory_size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``nnunet`` command's actions (``plan``) on `parser`, each setting ``run`` to :func:`run`."""
    actions = parser.add_subparsers(dest="nnunet_action", required=True, metavar="ACTION",
                                    parser_class=type(parser))
    plan = actions.add_parser(
        "plan", help="write nnU-Net plans whose patch and batch size are the largest the dry run fits in --memory",
        description="Read nnU-Net's nnUNetPlans.json for DATASET and write <plans>_fullres_<SIZE>.json beside it: "
                    "the configuration's patch and batch size the largest that fit --memory by fullres's dry run "
                    "of nnU-Net's training step; then: nnUNetv2_train DATASET CONFIGURATION FOLD -p <that name>.")
    plan.add_argument("dataset", metavar="DATASET",
                      help="nnUNet_preprocessed/DatasetXXX_Name folder, a plans file, or a dataset name or id "
                           "looked up under $nnUNet_preprocessed")
    plan.add_argument("--memory", type=_memory_size, required=True, metavar="SIZE",
                      help="the memory a training process may use, e.g. 24GiB, 80GB (GPU memory with --device cuda)")
    plan.add_argument("--configuration", default="3d_fullres", metavar="NAME",
                      help="the plans' configuration to fit (default 3d_fullres)")
    plan.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="the device nnU-Net will train on (auto: CUDA when present)")
    plan.add_argument("--plans", default="nnUNetPlans", metavar="NAME",
                      help="the source plans identifier (default nnUNetPlans; e.g. nnUNetResEncUNetMPlans)")
    plan.add_argument("--plans-name", default=None, metavar="NAME",
                      help="the new plans identifier (default <plans>_fullres_<SIZE>)")
    plan.add_argument("--overwrite", action="store_true", help="replace an existing plans file of that name")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``nnunet plan``: fit, write, print what changed and why (or JSON with --json). Returns 0."""
    from fullres.nnunet.plans import fit_plans, locate_plans, train_command

    source = locate_plans(args.dataset, args.plans)

    def progress(trial) -> None:
        verdict = "fits" if trial.fits else "does not fit"
        print(f"  dry run {'x'.join(map(str, trial.patch))} x {trial.batch}: {format_bytes(trial.needed_bytes)} "
              f"{verdict}", file=sys.stderr, flush=True)

    result = fit_plans(source, args.memory, configuration=args.configuration, device=args.device,
                       plans_name=args.plans_name, overwrite=args.overwrite,
                       progress=None if args.json else progress)
    if args.json:
        print(json.dumps({**result.to_json(), "train": train_command(result)}, indent=2))
        return 0
    print(f"{result.source_path}: {result.configuration}, {result.network}")
    print(f"wrote {result.plans_path}")
    print(result.summary)
    for note in result.modelled:
        print(f"  modelled: {note}")
    if result.inherited_by:
        print(f"  {', '.join(result.inherited_by)} inherit{'s' if len(result.inherited_by) == 1 else ''} the new sizes")
    print(f"train with: {train_command(result)}")
    return 0


def add_parser(commands) -> None:
    add_arguments(commands.add_parser("nnunet", help=HELP["nnunet"]))
