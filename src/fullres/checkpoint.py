"""Checkpoints and run folders: atomic saves, safe loads, and what `--resume` reads back.

A checkpoint is ``{"model", "optimizer", "scheduler", "epoch", "best_dice", "history", "rng", "config"}``
written to a temporary file, fsynced and renamed (a reader never sees half of one) and loaded with
``weights_only=True`` (a file that needs arbitrary code to load is refused, not run).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch

from fullres.config import TrainConfig
from fullres.errors import UserError
from fullres.files import atomic_write, unfinished_writes

CONFIG_FILE = "config.json"
LAST, BEST = "last.pt", "best.pt"


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temp file, fsync, rename: a reader never sees a partial checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path) as file:
        file.write(buffer.getbuffer())
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict:
    """weights_only=True: a checkpoint that needs arbitrary code to load is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as error:  # pickle errors, a non-checkpoint file, a forbidden global
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a loadable fullres checkpoint ({first_line})") from None


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run never overwrites an old one; --resume needs one."""
    if resume:
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume: {run_dir} holds no run to resume (no config.json)")
        return
    if (run_dir / LAST).exists() or (run_dir / CONFIG_FILE).exists():
        raise UserError(f"--out {run_dir} already holds a run: use --resume to continue it, or another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"--out {run_dir} is not empty and holds no run: choose a new or empty folder")
    run_dir.mkdir(parents=True, exist_ok=True)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary files of checkpoint writes that a killed run left in `run_dir`
    (:func:`fullres.files.unfinished_writes` of last.pt and best.pt). For a resumed run's main process,
    once its flags are accepted. Returns the files removed."""
    stale = [path for name in (LAST, BEST) for path in unfinished_writes(run_dir / name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    try:
        return TrainConfig.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a readable fullres run configuration ({error})") from None


def load_weights(model: torch.nn.Module, state: dict, checkpoint: Path) -> None:
    """`state["model"]` into `model`; UserError in one line when they belong to another network."""
    try:
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as error:
        detail = str(error).strip().splitlines()
        reason = (detail[1].strip() if len(detail) > 1 else detail[0]) if detail else type(error).__name__
        raise UserError(f"{checkpoint}: its weights do not fit the network its config describes "
                        f"({reason[:200]})") from None


def resolve_checkpoint(run_or_checkpoint: Path) -> Path:
    """A run folder means its best.pt (or last.pt when no validation ran); a file is taken as it is."""
    path = Path(run_or_checkpoint)
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).exists():
                return path / name
        raise UserError(f"{path}: no best.pt or last.pt in this run folder")
    if not path.exists():
        raise UserError(f"{path}: no such run folder or checkpoint")
    return path
