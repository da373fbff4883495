"""Checkpoints and run folders: atomic saves, safe loads, and what `--resume` reads back.

A checkpoint is ``{"model", "optimizer", "scheduler", "epoch", "best_dice", "history", "rng", "config"}``
written to a temporary file, fsynced and renamed (a reader never sees half of one) and loaded with
``weights_only=True`` (a file that needs arbitrary code to load is refused, not run).
"""

from __future__ import annotations

import io
import json
import os
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from fullres.job.config import TrainConfig
from fullres.errors import UserError, first_line
from fullres.files import atomic_write, special_file, unfinished_writes
from fullres.run.trust import trusted_model

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
    """weights_only=True: a checkpoint that needs arbitrary code to load is refused, not run. Its fields are
    checked (:func:`check_state`): UserError naming the file and the field otherwise."""
    if special_file(Path(path)) is not None:  # a FIFO would block the read
        raise UserError(f"{path}: not a regular file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder, not a checkpoint") from None
    except RecursionError:
        raise UserError(f"{path}: not a loadable fullres checkpoint (nested too deeply)") from None
    except Exception as error:  # pickle errors, a non-checkpoint file, a forbidden global
        reason = first_line(error) or type(error).__name__
        raise UserError(f"{path}: not a loadable fullres checkpoint ({reason[:300]})") from None
    check_state(state, path)
    return state


def check_state(state, path: Path) -> None:
    """A checkpoint's fields, by type: "model" maps names to tensors, "epoch" is a count, "best_dice" a number,
    "history" a list of rows of numbers, "rng" a byte tensor; UserError naming the field otherwise."""
    def refuse(field: str, what: str):
        raise UserError(f"{path}: not a fullres checkpoint: {field} {what}")

    if not isinstance(state, dict):
        refuse("its content", f"is {type(state).__name__}, not a dictionary of fields")
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                 for k, v in weights.items()):
        refuse('"model"', "is not a mapping of names to tensors")
    if "config" not in state:
        refuse('"config"', "is missing")
    if "epoch" in state and (isinstance(state["epoch"], bool) or not isinstance(state["epoch"], int)
                             or not 0 <= state["epoch"] < 2**31):
        refuse('"epoch"', "is not a count of epochs")
    if "best_dice" in state and (isinstance(state["best_dice"], bool)
                                 or not isinstance(state["best_dice"], (int, float))):
        refuse('"best_dice"', "is not a number")
    history = state.get("history", [])
    if not isinstance(history, list) or not all(
            isinstance(row, dict) and all(isinstance(k, str) and isinstance(v, (int, float, str)) for k, v in row.items())
            for row in history):
        refuse('"history"', "is not a list of rows of numbers")
    if "rng" in state and not (isinstance(state["rng"], torch.Tensor) and state["rng"].dtype == torch.uint8):
        refuse('"rng"', "is not a random-generator state")
    for name in ("optimizer", "scheduler"):
        if name in state and not isinstance(state[name], dict):
            refuse(f'"{name}"', "is not a dictionary")


def open_run_config(state: dict, checkpoint: Path, trust_code: bool) -> TrainConfig:
    """The run configuration a checkpoint holds, checked field by field, with its network as it may be built
    here (:func:`fullres.run.trust.trusted_model`: code the run names is refused unless this user trusts it).
    Nothing is imported or built."""
    return _opened(TrainConfig.from_json(state["config"], where=f"{checkpoint}: config"), checkpoint.parent,
                   trust_code, checkpoint)


def _opened(config: TrainConfig, run_dir: Path, trust_code: bool, where: Path) -> TrainConfig:
    """`config`, read from the run in `run_dir`, with its network as :func:`fullres.run.trust.trusted_model` allows."""
    return replace(config, job=replace(config.job, model=trusted_model(config.job.model, run_dir, trust_code, where)))


def check_weights_fit(network_on_meta: torch.nn.Module, state: dict, checkpoint: Path) -> None:
    """Before the network is made for real: its parameters and buffers (built on the meta device) must have
    the names and shapes of the checkpoint's weights, so that a config describing a far larger network than
    the weights it carries is refused without allocating it."""
    expected = {name: tuple(tensor.shape) for name, tensor in network_on_meta.state_dict().items()}
    got = {name: tuple(tensor.shape) for name, tensor in state["model"].items()}
    if expected != got:
        differing = sorted(set(expected) ^ set(got)) or sorted(n for n in expected if expected[n] != got[n])
        name = differing[0]
        reason = (f"{name}: {got.get(name, 'absent')} in the checkpoint, {expected.get(name, 'absent')} in the network"
                  if name in expected and name in got else f"{name} is in {'the network' if name in expected else 'the checkpoint'} only")
        raise UserError(f"{checkpoint}: its weights do not fit the network its config describes ({reason[:200]})")


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run never overwrites an old one; --resume needs one. Creates nothing: the folder is made once
    every check on the job and the data has passed (:func:`run_lock`)."""
    if resume:
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume: {run_dir} holds no run to resume (no config.json)")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file, not a folder")
    if (pid := lock_holder(run_dir)) is not None:
        raise _in_use(run_dir, pid)
    if (run_dir / LAST).exists() or (run_dir / CONFIG_FILE).exists():
        raise UserError(f"--out {run_dir} already holds a run: use --resume to continue it, or another --out")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"--out {run_dir} is not empty and holds no run: choose a new or empty folder")


LOCK_FILE = ".lock"  # RUN/.lock: held (flock) by the process training in the run; holds its PID


def lock_holder(run_dir: Path) -> int | None:
    """The PID of the live process holding `run_dir`'s lock, else None."""
    try:
        import fcntl
    except ImportError:  # no flock here: runs are not locked
        return None
    path = run_dir / LOCK_FILE
    if not path.is_file():  # absent, or not a regular file (a FIFO would block the open)
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except OSError:
        return _pid_in(run_dir / LOCK_FILE) or 0  # held, by a process that wrote no PID yet
    finally:
        os.close(fd)  # closing releases a shared lock this took


def _in_use(run_dir: Path, pid: int | None) -> UserError:
    return UserError(f"--out {run_dir} is in use: {f'process {pid}' if pid else 'another process'} is training in it")


def _pid_in(path: Path) -> int | None:
    try:
        text = path.read_text()[:20].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


@contextmanager
def run_lock(run_dir: Path, new: bool, log=print) -> Iterator[None]:
    """Hold `run_dir`'s lock while a process trains in it (made here for a `new` run): a second `train` or
    `--resume` into it is refused, naming the process; the lock of a process that died (the OS released it)
    is taken over, and said. For a new run, a config.json found once the lock is held (another train
    finished in it meanwhile) is refused too. Where flock does not exist, nothing is locked."""
    try:
        import fcntl
    except ImportError:
        if new:
            run_dir.mkdir(parents=True, exist_ok=True)
        yield
        return
    if new:
        run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise UserError(f"{path}: not a regular file; remove it to use this run")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise _in_use(run_dir, _pid_in(path)) from None
        previous = _pid_in(path)
        if new and (run_dir / CONFIG_FILE).exists():
            raise UserError(f"--out {run_dir} already holds a run: use --resume to continue it, or another --out")
        if previous is not None and previous != os.getpid():
            log(f"took over the lock of process {previous}, which is no longer running in {run_dir}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a PID left in the file means its process was killed
    finally:
        os.close(fd)  # releases the lock


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove the temporary files of checkpoint writes that a killed run left in `run_dir`
    (:func:`fullres.files.unfinished_writes` of last.pt and best.pt). For a resumed run's main process,
    once its flags are accepted. Returns the files removed."""
    stale = [path for name in (LAST, BEST) for path in unfinished_writes(run_dir / name)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_run_config(run_dir: Path, trust_code: bool = False) -> TrainConfig:
    """RUN/config.json, checked field by field, with its network as it may be built here
    (:func:`fullres.run.trust.trusted_model`). UserError naming the file otherwise."""
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path}: not a regular file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error)[:200]
        raise UserError(f"{path}: not a readable fullres run configuration ({reason})") from None
    return _opened(TrainConfig.from_json(data, where=f"{path}: config"), run_dir, trust_code, path)


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
