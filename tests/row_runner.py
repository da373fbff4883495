"""Runs many `fullres` command lines from one Python process, each in a forked child, as a user's shell would
run them one by one: fullres is imported once (the costly part of a fresh process) and each child gets its own
working folder, environment, file-size limit, and stdout/stderr files at the file-descriptor level, so that
everything the command and its libraries print (warnings included) is caught.

Reads a JSON list of jobs on stdin: {"argv", "cwd", "env", "fsize", "stdout", "stderr", "timeout"}; writes
a JSON list of exit codes (None: killed by a signal or past its timeout) on stdout. Used by
tests/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys


def run_child(job: dict) -> None:
    """In the forked child: the job's surroundings, then `fullres.cli.main`; never returns."""
    code = 70
    try:
        os.chdir(job["cwd"])
        os.environ.update(job["env"])
        if job.get("fsize") is not None:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        for fd, path in ((1, job["stdout"]), (2, job["stderr"])):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        signal.alarm(int(job.get("timeout", 120)))
        from fullres.cli import main

        try:
            code = main([str(arg) for arg in job["argv"]])
        except SystemExit as exit:  # argparse's refusals
            code = exit.code if isinstance(exit.code, int) else 1
    except BaseException:  # noqa: BLE001 - shown as the traceback a test then finds on stderr
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)


#: What the commands import when they run: imported once here, so that each child starts warm (since the CLI
#: imports torch only after reading the command line, importing fullres.cli alone would leave it to every child)
WARM_MODULES = ("torch", "fullres.cli.main", "fullres.run.train", "fullres.run.predict", "fullres.run.export",
                "fullres.evaluate.metrics", "fullres.evaluate.figures", "fullres.cost.estimate", "fullres.cost.plan",
                "fullres.cost.sweep", "fullres.bench.speed", "fullres.data.synth", "fullres.data.convert",
                "fullres.data.check", "monai.transforms")


def main() -> None:
    import importlib

    from fullres.cli.main import build_parser

    for name in WARM_MODULES:
        importlib.import_module(name)
    build_parser()  # every command's module and arguments

    results = []
    for job in json.load(sys.stdin):
        pid = os.fork()
        if pid == 0:
            run_child(job)
        _, status = os.waitpid(pid, 0)
        results.append(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
