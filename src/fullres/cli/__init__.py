"""The `fullres` command line: one module per command (each with ``add_parser(commands)`` and ``run(args)``),
the shared argument vocabulary (`options`), the one place reports are printed from (`report`), and the
entry point (`main`). A command imports the stages it runs inside its ``run``, so parsing a command line
(and ``--help``) loads only what the parser needs."""

from fullres.cli.main import main

__all__ = ["main"]
