"""The `fullres` command: parses, calls the stage that does the work, prints (human text or --json).

estimate -> plan -> synth/check (data) -> train -> predict -> evaluate -> show.
Every bad input ends as one line on stderr (`fullres <command>: error: ...`) and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
import warnings

from fullres.cli.commands import HELP, Parser, VersionAction
from fullres.errors import OneLineWarning, UserError, first_line
from fullres.terms import MALLOC_ENV

ALL = "all"


def build_parser(command: str | None = ALL) -> argparse.ArgumentParser:
    """The command line's parser: every command with its arguments (`command` "all"), or only `command`'s,
    the others listed by name and help without importing their modules (so `fullres --help` and a bad
    command name answer without importing torch)."""
    parser = Parser(prog="fullres", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=VersionAction)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, help in HELP.items():
        if command not in (ALL, name):
            commands.add_parser(name, help=help)
            continue
        # a fixed table of fullres's own modules: nothing read from input chooses what is imported
        module = importlib.import_module(f"fullres.cli.{name}")
        if name == "demo":
            module.add_parser(commands, build_parser)
        else:
            module.add_parser(commands)
    return parser


def command_of(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option, where that is a command."""
    first = next((word for word in argv if not word.startswith("-")), None)
    return first if first in HELP else None


def main(argv: list[str] | None = None) -> int:
    """Run one command. A refusal or fault is one line on stderr and a non-zero exit code: library warnings
    (and log records of level WARNING and above) raised on the way are held back while the command runs and
    shown after it only when it succeeds; an unexpected exception is one line too (FULLRES_TRACEBACK=1 shows
    its traceback)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(command_of(argv)).parse_args(argv)

    # the fake-tensor mode logs every operator a dry run cannot follow, traceback included; the refusal says it
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    logged = _HeldRecords()
    root = logging.getLogger()
    root.addHandler(logged)
    try:
        with warnings.catch_warnings(record=True) as held:
            if not sys.warnoptions:  # the user's own -W / PYTHONWARNINGS stand
                warnings.simplefilter("default")
            code, message = _run(args)
    finally:
        root.removeHandler(logged)
    if message is not None:
        print(f"fullres {args.command}: {' '.join(message.split())}", file=sys.stderr)
    else:
        for record in logged.records:  # as logging's last resort would have printed them
            sys.stderr.write(logging.lastResort.format(record) + "\n")
        for warning in held[:HELD_WARNINGS]:  # as Python would have printed them, the user's job's in one line
            if issubclass(warning.category, OneLineWarning):
                print(f"fullres {args.command}: warning: {' '.join(str(warning.message).split())}", file=sys.stderr)
                continue
            sys.stderr.write(warnings.formatwarning(warning.message, warning.category, warning.filename,
                                                    warning.lineno, warning.line))
        if len(held) > HELD_WARNINGS:
            sys.stderr.write(f"... and {len(held) - HELD_WARNINGS} more warnings\n")
    return code


HELD_WARNINGS = 50  # a long training run's repeated warnings are shown up to this many


class _HeldRecords(logging.Handler):
    """Libraries' log records of level WARNING and above, held like their warnings: printed after a command
    that succeeds, dropped when it fails (matplotlib's "could not save font_manager cache" on a full disk
    would otherwise stand beside the one line that says so)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < HELD_WARNINGS:
            self.records.append(record)


def _run(args: argparse.Namespace) -> tuple[int, str | None]:
    """(exit code, the one line to print on failure or None)."""
    try:
        if os.environ.get(MALLOC_ENV):  # a policy for every job, before anything is allocated (kernels/malloc.py)
            from fullres.kernels.malloc import set_training_malloc_policy  # torch: only when asked for

            set_training_malloc_policy()
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
