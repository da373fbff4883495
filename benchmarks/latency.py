"""How long fullres takes to answer, as a user waits for it: each command timed as a whole process (the
`fullres` console script, a fresh interpreter each time), `--repeats` times, rounds alternating the order.

    python benchmarks/latency.py [--repeats 3] [--commands help argerror table1 dryrun ...] [--timeout 900]

The commands (the paper's job unless named): `help` (`fullres --help`), `cmdhelp` (`estimate --help`),
`badflag` (a value its parser refuses), `argerror` (a job the network refuses: a shape it cannot take),
`table1` (`estimate`), `dryrun` (`estimate --method dryrun`; its first run in a round also fills the
per-machine calibration cache, so the median is the warm answer), `refusal` (`train` refused by its memory
preflight on a tiny synthetic dataset), `phantom` (one 240x240x155 synthetic case), `plan24` (`plan --memory
24GiB --batch 1`), `plantime` (`plan --memory 24GiB --batch 1 --optimize time`), `slabs512` (the dry run of
the 512^3 every-level slab schedule). Prints a Markdown table (min, median, max seconds) with the command,
date, CPU features, torch version and commit, and one JSON line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHANTOM = ("import numpy as np; from fullres.data.synth import brats_phantom; "
           "brats_phantom((240, 240, 155), np.random.default_rng(0))")


def commands(scratch: Path) -> dict[str, list[str]]:
    fullres = ["fullres"]
    data = scratch / "data"
    return {
        "help": [*fullres, "--help"],
        "cmdhelp": [*fullres, "estimate", "--help"],
        "badflag": [*fullres, "estimate", "--precision", "fp8"],
        "argerror": [*fullres, "estimate", "--shape", "7", "7", "7"],
        "table1": [*fullres, "estimate"],
        "dryrun": [*fullres, "estimate", "--method", "dryrun", "--device", "cpu"],
        "refusal": [*fullres, "train", str(data), "--out", str(scratch / "refused"), "--memory", "1MB",
                    "--shape", "16", "16", "16", "--filters", "2", "--batch", "1", "--epochs", "1"],
        "phantom": [sys.executable, "-c", PHANTOM],
        "plan24": [*fullres, "plan", "--memory", "24GiB", "--batch", "1", "--device", "cpu"],
        "plantime": [*fullres, "plan", "--memory", "24GiB", "--batch", "1", "--optimize", "time", "--device", "cpu"],
        "slabs512": [*fullres, "estimate", "--method", "dryrun", "--device", "cpu", "--shape", "512", "512", "512",
                     "--batch", "1", "--channels", "1", "--checkpointing", "--slabs", "16", "--coarse-slabs", "8,4,2"],
    }


def cpu_features() -> str:
    flags = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    named = [("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512 bf16"), ("amx_tile", "AMX")]
    return ", ".join(name for flag, name in named if flag in flags) or "unknown"


def timed(argv: list[str], timeout: float) -> tuple[float | None, int]:
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, -1
    return time.perf_counter() - start, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commands", nargs="+", default=["help", "cmdhelp", "badflag", "argerror", "table1", "dryrun", "refusal", "phantom"])
    parser.add_argument("--timeout", type=float, default=900, help="seconds before a command counts as not answering")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        table = commands(scratch)
        shown = {name: " ".join(Path(a).name.upper() if a.startswith(str(scratch)) else
                                "python" if a == sys.executable else a for a in argv) for name, argv in table.items()}
        unknown = [name for name in args.commands if name not in table]
        if unknown:
            parser.error(f"unknown command(s): {', '.join(unknown)}; choose from {', '.join(table)}")
        if "refusal" in args.commands:
            subprocess.run(["fullres", "synth", str(scratch / "data"), "--cases", "2", "--shape", "16", "16", "16",
                            "--quiet"], check=True, stdout=subprocess.DEVNULL)
        seconds: dict[str, list[float]] = {name: [] for name in args.commands}
        codes: dict[str, set[int]] = {name: set() for name in args.commands}
        for round_ in range(args.repeats):
            order = args.commands if round_ % 2 == 0 else list(reversed(args.commands))
            for name in order:
                took, code = timed(table[name], args.timeout)
                codes[name].add(code)
                if took is not None:
                    seconds[name].append(took)
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    import torch  # only for its version, after the timings

    print(f"`python benchmarks/latency.py --repeats {args.repeats} --commands {' '.join(args.commands)}`; "
          f"{datetime.date.today()}, {cpu_features()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"commit {commit}, load average {os.getloadavg()[0]:.1f} after\n")
    print("| command | exit | min s | median s | max s |\n|---|---|---|---|---|")
    for name in args.commands:
        got = seconds[name]
        cells = (f"{min(got):.2f} | {statistics.median(got):.2f} | {max(got):.2f}" if got
                 else f"> {args.timeout:.0f} | | ")
        print(f"| `{shown[name]}` | {','.join(map(str, sorted(codes[name])))} | {cells} |")
    print(json.dumps({"seconds": seconds, "exit_codes": {k: sorted(v) for k, v in codes.items()},
                      "cpu_features": cpu_features(), "torch": torch.__version__, "commit": commit}))


if __name__ == "__main__":
    main()
