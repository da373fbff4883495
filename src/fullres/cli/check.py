"""`fullres check`: every case of a dataset validated before a long job."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.errors import UserError
from fullres.terms import LAYOUTS


def add_parser(commands) -> None:
    check = commands.add_parser("check", help=HELP["check"])
    check.add_argument("data", help="dataset folder")
    check.add_argument("--layout", choices=LAYOUTS, default=None,
                       help="the folder's layout (default: detected)")
    check.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.data.check import check_dataset

    data = Path(args.data)
    if not data.is_dir():  # the command's own error (stderr), not a finding about a dataset (stdout)
        raise UserError(f"{data}: {'not a folder' if data.exists() else 'no such folder'} (give a dataset folder)")
    report = check_dataset(data, layout=args.layout)
    for line in report.lines():
        print(line)
    print(report.summary())
    return 0 if report.ok else 1
