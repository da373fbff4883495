"""Experiment tracking for `train` (``--tracker``): where the run's configuration, per-epoch metrics (the
rows of metrics.csv, peak memory included) and figures go besides the run folder itself.

* ``tensorboard`` (default): RUN/tb/, TensorBoard's event files; the configuration as text.
* ``mlflow``: an MLflow run (MLflow or mlflow-skinny installed: ``pip install "fullres[mlflow]"``) in the
  tracking store ``$MLFLOW_TRACKING_URI`` names, else a local file store in RUN/mlruns/ (MLflow keeps that
  backend in maintenance mode and asks for ``MLFLOW_ALLOW_FILE_STORE=true``, which fullres sets for it);
  parameters are the configuration's fields by dotted name, metrics the epoch's, artifacts the run's
  config.json, metrics.csv, curves and overlays. ``--resume`` continues the same MLflow run (its id is
  kept in RUN/mlflow_run_id).
* ``none``: only the run folder's own files.

Extension point: :data:`TRACKER_CLASSES` maps a name to a class with ``(run_dir, config_json, start_epoch)``,
``log_epoch(row, epoch)``, ``finish(files)``; its name goes in :data:`fullres.terms.TRACKERS` too (what
``train --tracker`` offers before torch is imported).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from fullres.errors import UserError
from fullres.files import write_bytes_atomically


class NoTracker:
    """Nothing beyond the run folder."""

    def __init__(self, run_dir: Path, config_json: dict, start_epoch: int) -> None:
        pass

    def log_epoch(self, row: dict, epoch: int) -> None:
        pass

    def finish(self, files: list[Path]) -> None:
        pass


class TensorBoardTracker(NoTracker):
    """RUN/tb/: every numeric column of the epoch's row as a scalar; the configuration as text once."""

    def __init__(self, run_dir: Path, config_json: dict, start_epoch: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1)
        if start_epoch == 0:
            self.writer.add_text("config", "```\n" + json.dumps(config_json, indent=2) + "\n```", 0)

    def log_epoch(self, row: dict, epoch: int) -> None:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, epoch)
        self.writer.flush()

    def finish(self, files: list[Path]) -> None:
        self.writer.close()


RUN_ID_FILE = "mlflow_run_id"


class MLflowTracker(NoTracker):
    """One MLflow run per fullres run (see the module docstring)."""

    def __init__(self, run_dir: Path, config_json: dict, start_epoch: int) -> None:
        try:
            import mlflow
        except ImportError:
            raise UserError("--tracker mlflow needs MLflow: pip install mlflow-skinny (or fullres[mlflow])") from None
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store: see the docstring
            mlflow.set_tracking_uri((run_dir / "mlruns").absolute().as_uri())
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if start_epoch and id_file.is_file() else None
        mlflow.set_experiment("fullres")
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_dir.name)
        if run_id is None:
            write_bytes_atomically(id_file, (self.run.info.run_id + "\n").encode())
            mlflow.log_params({key: str(value)[:500] for key, value in _flat(config_json).items()})

    def log_epoch(self, row: dict, epoch: int) -> None:
        self.mlflow.log_metrics({key: float(value) for key, value in row.items()
                                 if key != "epoch" and isinstance(value, (int, float))}, step=epoch)

    def finish(self, files: list[Path]) -> None:
        for path in files:
            if path.is_file():
                self.mlflow.log_artifact(str(path))
        self.mlflow.end_run()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "none": NoTracker}


def open_tracker(kind: str, run_dir: Path, config_json: dict, start_epoch: int) -> NoTracker:
    """The tracker `kind` names for the run in `run_dir` (resumed after `start_epoch` epochs)."""
    if kind not in TRACKER_CLASSES:
        raise UserError(f"--tracker must be one of {', '.join(TRACKER_CLASSES)}, got {kind!r}")
    return TRACKER_CLASSES[kind](run_dir, config_json, start_epoch)


def _flat(data: dict, prefix: str = "") -> dict:
    """{"job": {"batch": 2}} -> {"job.batch": 2}."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
