"""Memory over a grid of jobs: Table 1 and the dry run estimate, a fresh process measures (Figures 3 and 5).

Each row is one job: its Table 1 training bytes, its dry-run peak, and (unless measuring is off) the
peak measured by `measure_peak` in a fresh process, with error = (estimate - measured) / measured. With
`repeats` > 1 each job is measured that many times, each in its own process, and the row keeps the median
and the range: under glibc's default heap (contiguous fp32 jobs, bf16 ones on AMX; no checkpointing) the same job's
peak differs from run to run by up to 6 % (bf16 on an AVX-512 bf16 AMD Zen 4, five runs per job).
"""

from __future__ import annotations

import csv
import io
import itertools
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

from fullres.cost import measure as measurement
from fullres.cost.estimate import dryrun_estimate, table1_training_bytes
from fullres.files import write_bytes_atomically
from fullres.job.config import JobConfig
from fullres.kernels.malloc import prepare_pool_for

CSV_COLUMNS = ["shape", "batch", "precision", "checkpointing", "slabs", "channels_last", "voxels", "table1_bytes", "dryrun_bytes",
               "measured_bytes", "table1_error", "dryrun_error", "peak_at", "step_s", "repeats", "measured_min_bytes",
               "measured_max_bytes"]


@dataclass(frozen=True)
class SweepRow:
    job: JobConfig
    table1_bytes: int
    dryrun_bytes: int
    measured_bytes: int | None  # the median of `repeats` measurements, one fresh process each
    peak_at: str
    step_s: float | None
    repeats: int = 1
    measured_range: tuple[int, int] | None = None  # the lowest and highest measurement

    def error(self, estimate: int) -> float | None:
        return None if not self.measured_bytes else (estimate - self.measured_bytes) / self.measured_bytes

    def to_csv(self) -> dict:
        shape = self.job.shape
        return {"shape": "x".join(map(str, shape)), "batch": self.job.batch,
                "precision": self.job.strategy.precision, "checkpointing": self.job.strategy.checkpointing,
                "slabs": self.job.strategy.slabs, "channels_last": self.job.strategy.channels_last,
                "voxels": self.job.batch * shape[0] * shape[1] * shape[2], "table1_bytes": self.table1_bytes,
                "dryrun_bytes": self.dryrun_bytes, "measured_bytes": self.measured_bytes,
                "table1_error": self.error(self.table1_bytes), "dryrun_error": self.error(self.dryrun_bytes),
                "peak_at": self.peak_at, "step_s": self.step_s,
                "repeats": self.repeats if self.measured_bytes else None,
                "measured_min_bytes": self.measured_range[0] if self.measured_range else None,
                "measured_max_bytes": self.measured_range[1] if self.measured_range else None}


def sweep_jobs(base: JobConfig, shapes: Iterable[tuple[int, int, int]], batches: Iterable[int],
               precisions: Iterable[str], checkpointing: Iterable[bool]) -> list[JobConfig]:
    jobs = []
    for shape, batch, precision, ck in itertools.product(shapes, batches, precisions, checkpointing):
        at_shape = base.at_shape(shape)  # slabs capped at what this shape's H holds
        jobs.append(at_shape.with_(batch=batch, strategy=replace(at_shape.strategy, checkpointing=ck, precision=precision)))
    return jobs


def run_sweep(jobs: list[JobConfig], measure: bool, max_measure_bytes: int,
              on_row: Callable[[SweepRow], None] = lambda row: None, device: str = "cpu",
              repeats: int = 1) -> tuple[list[SweepRow], list[str]]:
    """Rows for every job on `device` ("cpu" or "cuda"), each measured `repeats` times; jobs whose dry run
    exceeds `max_measure_bytes` are estimated, not measured (listed in the second return value)."""
    rows, unmeasured = [], []
    for job in jobs:
        if measure:
            prepare_pool_for(job.strategy, device)  # as the measured child will (once per process)
        estimate = dryrun_estimate(job, device)
        measured = []
        if measure and estimate.peak_bytes <= max_measure_bytes:
            measured = [measurement.measure_peak(job, steps=2, device=device) for _ in range(repeats)]
        elif measure:
            unmeasured.append(f"{'x'.join(map(str, job.shape))} batch {job.batch} {job.strategy.describe()}: "
                              f"dry run {estimate.peak_bytes / 2**30:.1f} GiB, over the measuring limit")
        runs = [m.measured_bytes for m in measured]
        row = SweepRow(job, table1_training_bytes(job), estimate.peak_bytes,
                       int(statistics.median(runs)) if runs else None, estimate.peak_at,
                       statistics.median(max(m.step_seconds) for m in measured) if measured else None,
                       repeats, (min(runs), max(runs)) if runs else None)
        rows.append(row)
        on_row(row)
    return rows, unmeasured


def write_sweep_csv(rows: list[SweepRow], path: Path) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(row.to_csv() for row in rows)
    write_bytes_atomically(path, text.getvalue().encode())
