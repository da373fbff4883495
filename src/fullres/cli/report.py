"""The one place commands print from: JSON, the job header, plan's option tables, and the checks that keep
an output from replacing a file the command did not write."""

from __future__ import annotations

import json
from pathlib import Path

from fullres.errors import UserError
from fullres.files import refuse_special
from fullres.units import format_bytes


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


def spatial_lines(options) -> list[str]:
    """plan's lines on processes sharing each sample (when the job does not fit as given)."""
    if not options:
        return []
    slabs = ", its rows in slabs " + ",".join(map(str, options[0].counts)) if max(options[0].counts) > 1 else ""
    lines = ["One volume across processes (train --spatial S under torchrun; dry run of one process's shard"
             f"{slabs}, without checkpointing):"]
    lines += [f"  --spatial {option.processes}: {format_bytes(option.peak_bytes)} per process, "
              f"{'fits' if option.fits else 'does not fit'}" for option in options]
    return lines


def slab_lines(options, deeper: bool = False) -> list[str]:
    """plan's table of every-level slab schedules (when the job does not fit as given); `deeper`: schedules
    with more slabs were left untried."""
    if not options:
        return []
    lines = ["Slabs at every level, fewest first up to the first that fits (dry run, checkpointing, micro-batch 1; "
             "FLOPs by torch's counter, against the step without slabs or checkpointing):"]
    for option in options:
        coarse = list(option.counts[1:])
        while len(coarse) > 1 and coarse[-1] == 1:
            coarse.pop()
        lines.append(f"  --slabs {option.counts[0]} --coarse-slabs {','.join(map(str, coarse))}"
                     f"{' --recompute-inputs 1' if option.recompute_inputs else ''}: "
                     f"{format_bytes(option.peak_bytes)}, {'fits' if option.fits else 'does not fit'}, "
                     f"recomputation +{option.overhead:.0%} FLOPs")
    if deeper and options[-1].fits:
        lines.append("  (more slabs fit too, in less memory, each with more recomputation)")
    return lines
