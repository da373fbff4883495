"""`fullres convert`: a dataset rewritten in another layout, label values mapped."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.terms import LAYOUTS


def add_parser(commands) -> None:
    convert = commands.add_parser("convert", help=HELP["convert"])
    convert.add_argument("data", help="dataset folder (any layout)")
    convert.add_argument("out", help="new folder (must not exist, or be empty)")
    convert.add_argument("--layout", choices=LAYOUTS, required=True, help="the layout to write")
    convert.add_argument("--source-layout", choices=LAYOUTS, default=None,
                         help="DATA's layout (default: detected)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.data.convert import convert_dataset

    source, train_cases, test_cases = convert_dataset(Path(args.data), Path(args.out), args.layout,
                                                      source_layout=args.source_layout, progress=not args.quiet)
    print(f"wrote {train_cases} training and {test_cases} test cases of {source.root} ({source.layout}) "
          f"to {args.out} in the {args.layout} layout")
    return 0
