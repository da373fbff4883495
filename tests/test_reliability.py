"""Every bad input and fault a new user can meet, run as they would (`python3 -m fullres ...` in a fresh
process): one line on stderr, the expected exit code, no traceback, and every file that existed before
byte-identical afterwards.

Each row builds its own sandbox (files it may damage) next to one shared tiny dataset, run and prediction
(built once per module, never changed by any row: hashed before and after them all). The rows run two at a
time; each is then checked in its own test. Read-only folders cannot stop root from writing: those rows are
skipped, with the reason, where a probe write into the read-only folder succeeds. "No space" is a file-size
limit (RLIMIT_FSIZE) on the command: a write past it fails with EFBIG, as a full disk fails with ENOSPC.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch

SHAPE = ("--shape", "16", "16", "16")
TINY = [*SHAPE, "--filters", "2", "--batch", "1", "--epochs", "1", "--workers", "0", "--threads", "1", "--quiet"]


@dataclass(frozen=True)
class Base:
    """The shared, never-modified inputs: a dataset, a trained run, its predictions."""

    root: Path
    data: Path
    run: Path
    pred: Path

    @property
    def image(self) -> Path:
        return self.data / "imagesTs" / "BRATS_004.nii.gz"

    @property
    def label(self) -> Path:
        return self.data / "labelsTs" / "BRATS_004.nii.gz"


@dataclass(frozen=True)
class Row:
    """One bad input: `setup(sandbox, base)` makes its files and returns the command's arguments."""

    name: str
    setup: Callable[[Path, Base], list]
    code: int
    says: str  # a piece of the one stderr line
    absent: tuple[str, ...] = ()  # sandbox paths the refused command must not have created
    readonly: str | None = None  # a sandbox folder made read-only (0555) for the command
    fsize: int | None = None  # RLIMIT_FSIZE in bytes: "no space" past it
    env: dict = field(default_factory=dict)  # extra environment; "{sandbox}" is replaced
    changes: tuple[str, ...] = ()  # sandbox paths a recovering command may rewrite (a damaged cache)
    stdout_empty: bool = False
    fresh: bool = False  # run as its own `python3 -m fullres` process (else forked from a shared runner)
    check: Callable[[Path], list[str]] | None = None  # more after the run: what went wrong, [] when nothing did


# ---- helpers that make bad files -------------------------------------------------------------------

def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    return target


def truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def text(target: Path, content: str = "not what it should be\n") -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    return target


def edited_nifti(source: Path, target: Path, edit: Callable[[np.ndarray], np.ndarray], dtype=None) -> Path:
    image = nib.load(source)
    array = np.asarray(edit(np.asarray(image.dataobj).astype(dtype or np.float32).copy()), dtype=dtype or np.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, image.affine), target)
    return target


def edited_prediction(base: Base, sandbox: Path, edit, dtype=None) -> Path:
    """A copy of the shared predictions with BRATS_004's mask edited."""
    pred = copy(base.pred, sandbox / "pred")
    edited_nifti(base.label, pred / "BRATS_004.nii.gz", edit, dtype)
    return pred


def with_nan(array: np.ndarray) -> np.ndarray:
    array[1, 2, 3] = np.nan
    return array


def mismatched_checkpoint(base: Path, target: Path) -> Path:
    """The run's best.pt whose configuration says 4 base filters while its weights have 2."""
    state = torch.load(base / "best.pt", map_location="cpu", weights_only=True)
    state["config"]["job"]["model"]["filters"] = 4
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, target)
    return target


def resumable_run(base: Base, sandbox: Path, last: Callable[[Path, Path], Path]) -> Path:
    run = copy(base.run, sandbox / "run")
    last(base.run / "last.pt", run / "last.pt")
    return run


# ---- the table -------------------------------------------------------------------------------------

def _rows() -> list[Row]:
    R = Row
    return [
        # predict: outputs
        R("predict --out is the input folder", lambda s, b: ["predict", b.run, copy(b.data / "imagesTs", s / "in"),
                                                             "--out", s / "in"], 2, "holds the input", fresh=True),
        R("predict --out holds a loose input", lambda s, b: ["predict", b.run, copy(b.image, s / "in" / b.image.name),
                                                             "--out", s / "in"], 2, "holds the input"),
        R("predict --out is a file", lambda s, b: ["predict", b.run, b.image, "--out", text(s / "out.txt")],
          2, "is a file"),
        R("predict --out has a mask it did not write",
          lambda s, b: ["predict", b.run, b.image, "--out", text(s / "pred" / "BRATS_004.nii.gz").parent],
          2, "was not written by fullres predict"),
        R("predict --out inside a file", lambda s, b: ["predict", b.run, b.image, "--out", text(s / "f") / "pred"],
          1, "Not a directory"),
        R("predict --out read-only", lambda s, b: ["predict", b.run, b.image, "--out", (s / "ro").mkdir() or s / "ro"],
          1, "Permission denied", readonly="ro"),
        R("predict, no space", lambda s, b: ["predict", b.run, b.image, "--out", s / "pred", "--quiet"], 1,
          "BRATS_004.nii.gz: File too large", fsize=64),
        # predict: inputs, checked before the first mask is written
        R("predict, 3 inputs, the last truncated",
          lambda s, b: ["predict", b.run, copy(b.data / "imagesTs", s / "in"),
                        truncated(b.image, s / "in2" / "BRATS_009.nii.gz"), "--out", s / "pred", "--quiet"],
          2, "BRATS_009.nii.gz", absent=("pred",)),
        R("predict, 3 inputs, one with NaN",
          lambda s, b: ["predict", b.run, b.image, edited_nifti(b.image, s / "in" / "BRATS_NAN.nii.gz", with_nan),
                        b.data / "imagesTs" / "BRATS_005.nii.gz", "--out", s / "pred", "--quiet"],
          2, "BRATS_NAN.nii.gz: 4 voxels are NaN or infinite", absent=("pred",)),
        R("predict, 3D image for a 4-channel run",
          lambda s, b: ["predict", b.run, edited_nifti(b.image, s / "in" / "one.nii.gz", lambda a: a[..., 0]),
                        "--out", s / "pred", "--quiet"], 2, "one.nii.gz", absent=("pred",)),
        R("predict, not a NIfTI file", lambda s, b: ["predict", b.run, text(s / "notes.txt"), "--out", s / "pred"],
          2, "not a NIfTI file", absent=("pred",)),
        R("predict, missing input", lambda s, b: ["predict", b.run, s / "gone.nii.gz", "--out", s / "pred"],
          2, "no such file", absent=("pred",)),
        # predict: checkpoints
        R("predict, truncated checkpoint",
          lambda s, b: ["predict", truncated(b.run / "best.pt", s / "best.pt"), b.image, "--out", s / "pred"],
          2, "not a loadable fullres checkpoint", absent=("pred",)),
        R("predict, checkpoint config disagrees with its weights",
          lambda s, b: ["predict", mismatched_checkpoint(b.run, s / "best.pt"), b.image, "--out", s / "pred"],
          2, "do not fit the network", absent=("pred",)),
        R("predict, text file as checkpoint", lambda s, b: ["predict", text(s / "best.pt"), b.image, "--out", s / "p"],
          2, "not a loadable fullres checkpoint", absent=("p",)),
        R("predict, run folder without checkpoint",
          lambda s, b: ["predict", (s / "run").mkdir() or s / "run", b.image, "--out", s / "p"],
          2, "no best.pt or last.pt", absent=("p",)),
        # evaluate
        R("evaluate --csv exists", lambda s, b: ["evaluate", b.pred, b.data / "labelsTs", "--csv", text(s / "m.csv")],
          2, "exists: choose another path, or --overwrite", fresh=True),
        R("evaluate --csv is a folder",
          lambda s, b: ["evaluate", b.pred, b.data / "labelsTs", "--csv", (s / "m").mkdir() or s / "m"],
          2, "is a folder"),
        R("evaluate, undeclared label 7",
          lambda s, b: ["evaluate", edited_prediction(b, s, lambda a: np.where(a > 0, 7, 0), np.uint8),
                        b.data / "labelsTs", "--csv", s / "m.csv"], 2, "outside the declared", absent=("m.csv",)),
        R("evaluate, NaN in a prediction",
          lambda s, b: ["evaluate", edited_prediction(b, s, with_nan),
                        b.data / "labelsTs", "--csv", s / "m.csv"], 2, "non-integer values", absent=("m.csv",)),
        R("evaluate, prediction of another shape",
          lambda s, b: ["evaluate", edited_prediction(b, s, lambda a: a[:-2] > 0, np.uint8),
                        b.data / "labelsTs", "--csv", s / "m.csv"], 2, "shape", absent=("m.csv",)),
        R("evaluate, missing labels folder", lambda s, b: ["evaluate", b.pred, s / "nowhere", "--csv", s / "m.csv"],
          2, "nowhere", absent=("m.csv",)),
        R("evaluate, read-only prediction folder", lambda s, b: ["evaluate", copy(b.pred, s / "ro"), b.data / "labelsTs"],
          1, "Permission denied", readonly="ro"),
        R("evaluate, no space", lambda s, b: ["evaluate", b.pred, b.data / "labelsTs", "--csv", s / "m.csv"],
          1, "File too large", fsize=64, absent=("m.csv",)),
        # show
        R("show --out exists", lambda s, b: ["show", b.image, "--out", text(s / "f.png")], 2, "exists", fresh=True),
        R("show --out is a folder", lambda s, b: ["show", b.image, "--out", (s / "f").mkdir() or s / "f"],
          2, "is a folder"),
        R("show, mask of another shape",
          lambda s, b: ["show", b.image, "--pred", edited_nifti(b.label, s / "m.nii.gz", lambda a: a[:-1], np.uint8),
                        "--out", s / "f.png"], 2, "differs from the image's", absent=("f.png",)),
        R("show, truncated image", lambda s, b: ["show", truncated(b.image, s / "t.nii.gz"), "--out", s / "f.png"],
          2, "t.nii.gz", absent=("f.png",)),
        R("show, no space", lambda s, b: ["show", b.image, "--out", s / "f.png"], 1, "File too large", fsize=512,
          absent=("f.png",)),
        R("show --out read-only", lambda s, b: ["show", b.image, "--out", ((s / "ro").mkdir() or s / "ro") / "f.png"],
          1, "Permission denied", readonly="ro"),
        # train
        R("train --out a non-run folder", lambda s, b: ["train", b.data, "--out", text(s / "mine" / "notes.txt").parent,
                                                        *TINY], 2, "not empty and holds no run", fresh=True),
        R("train --out is a file", lambda s, b: ["train", b.data, "--out", text(s / "run"), *TINY], 2, "is a file"),
        R("train --out holds a run", lambda s, b: ["train", b.data, "--out", copy(b.run, s / "run"), *TINY],
          2, "already holds a run"),
        R("train --out inside a file", lambda s, b: ["train", b.data, "--out", text(s / "f") / "run", *TINY],
          1, "Not a directory"),
        R("train --out read-only", lambda s, b: ["train", b.data, "--out", ((s / "ro").mkdir() or s / "ro") / "run",
                                                 *TINY, "--force"], 1, "Permission denied", readonly="ro"),
        R("train, no space", lambda s, b: ["train", copy(b.data, s / "data"), "--out", s / "run", *TINY, "--force"],
          1, ".fullres_cache/BRATS_001", fsize=4096),  # its first large file: a case of the cache
        R("train --resume, truncated last.pt",
          lambda s, b: ["train", "--out", resumable_run(b, s, truncated), "--resume", "--quiet"],
          2, "not a loadable fullres checkpoint"),
        R("train --resume, last.pt of another network",
          lambda s, b: ["train", "--out", resumable_run(b, s, mismatched_checkpoint_last), "--resume", "--quiet",
                        "--force"], 2, "last.pt: does not fit the run's configuration"),
        R("train, missing data folder", lambda s, b: ["train", s / "nodata", "--out", s / "run", *TINY], 2,
          "nodata: no such folder", absent=("run",)),
        R("train --model unknown", lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--model", "nonet"],
          2, "nonet", absent=("run",)),
        R("train --model-args not JSON", lambda s, b: ["train", b.data, "--out", s / "run", *TINY,
                                                       "--model-args", "{filters: 3"], 2, "--model-args",
          absent=("run",)),
        R("train --model-args unknown keyword", lambda s, b: ["train", b.data, "--out", s / "run", *TINY,
                                                              "--model", "monai:SegResNet", "--model-args",
                                                              '{"no_such_arg": 1}'], 2, "no_such_arg",
          absent=("run",)),
        R("train --channels FOO", lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--channels", "FOO"],
          2, "unknown channel 'FOO'", absent=("run",)),
        # estimate, plan: sizes and jobs
        R("estimate, shape overflows", lambda s, b: ["estimate", "--shape", "800000", "800000", "800000"], 2,
          "800000x800000x800000 with 32 filters is too large", fresh=True),
        R("estimate, filters overflow", lambda s, b: ["estimate", "--filters", "100000000"], 2,
          "100000000 filters is too large"),
        R("estimate --channels FOO", lambda s, b: ["estimate", "--channels", "T1,FOO"], 2, "unknown channel 'FOO'"),
        R("estimate, shape not divisible", lambda s, b: ["estimate", "--shape", "15", "16", "16"], 2, "15"),
        R("estimate --model FILE missing", lambda s, b: ["estimate", "--model", f"{s / 'nets.py'}:make"], 2,
          "nets.py"),
        R("plan --memory nonsense", lambda s, b: ["plan", "--memory", "12XB"], 2, "12XB"),
        # the other writers
        R("sweep --out is a file", lambda s, b: ["sweep", "--shapes", "16", "--no-measure", "--out", text(s / "o")],
          2, "is a file"),
        R("sweep --out holds a sweep.csv it did not write",
          lambda s, b: ["sweep", "--shapes", "16", "--no-measure", "--out", text(s / "o" / "sweep.csv").parent],
          2, "exists"),
        R("bench --chart exists", lambda s, b: ["bench", *SHAPE, "--chart", text(s / "c.png")], 2, "exists"),
        R("synth into a non-empty folder", lambda s, b: ["synth", text(s / "o" / "notes.txt").parent, "--cases", "1",
                                                         "--shape", "16", "16", "16", "--quiet"], 2, "o"),
        R("synth, no space", lambda s, b: ["synth", s / "o", "--cases", "1", "--shape", "16", "16", "16", "--quiet"],
          1, "File too large", fsize=1024, absent=("o",)),
        R("convert into a non-empty folder",
          lambda s, b: ["convert", b.data, text(s / "o" / "notes.txt").parent, "--layout", "nnunet", "--quiet"],
          2, "o"),
        R("demo --out a non-demo folder", lambda s, b: ["demo", "--out", text(s / "o" / "notes.txt").parent],
          2, "not empty and is not a previous demo"),
        R("check, missing folder", lambda s, b: ["check", s / "nowhere"], 2, "no such folder", stdout_empty=True, fresh=True),
        R("check, a file", lambda s, b: ["check", text(s / "f")], 2, "not a folder", stdout_empty=True),
        # damaged caches: recovered from, the user's files untouched
        R("estimate --method dryrun, corrupt runtime cache",
          lambda s, b: [text(s / "cache" / "fullres" / "runtime.json", "{garbage") and "estimate", "--method",
                        "dryrun", *SHAPE, "--filters", "2", "--batch", "1", "--checkpointing"],
          0, "", env={"XDG_CACHE_HOME": "{sandbox}/cache"}, changes=("cache/fullres/runtime.json",)),
        R("train, corrupt preprocessing cache",
          lambda s, b: [corrupt_cache(copy(b.data, s / "data")) and "train", s / "data", "--out", s / "run",
                        *TINY, "--force"], 0, "", changes=("data/.fullres_cache",)),
    ]


def mismatched_checkpoint_last(source: Path, target: Path) -> Path:
    """last.pt with weights of a 4-filter network in a 2-filter run."""
    from fullres.job.config import TrainConfig
    from fullres.nets.registry import build_model

    state = torch.load(source, map_location="cpu", weights_only=True)
    config = TrainConfig.from_json(state["config"])
    other = build_model(replace(config.job.model, filters=4), config.job.shape)
    state["model"] = other.state_dict()
    torch.save(state, target)
    return target


def corrupt_cache(data: Path) -> bool:
    """Truncate every preprocessed-case file in the dataset's cache."""
    entries = sorted((data / ".fullres_cache").glob("*.npy"))
    assert entries, "the shared run left no cache to damage"
    for path in entries:
        path.write_bytes(path.read_bytes()[:40])
    return True



# ---- a run is data: hostile runs and checkpoints ------------------------------------------------------

MARKER = "RAN"  # a file hostile code would write into the sandbox: its absence proves nothing ran
DELETE = object()
SLEEPERS: dict[str, subprocess.Popen] = {}  # sandbox -> a process that hostile code would signal


def evil_source(sandbox: Path) -> str:
    marker = str(sandbox / MARKER)
    return (f"import pathlib\npathlib.Path({marker!r}).write_text('imported')\n"
            f"def make(in_channels, out_channels, **kwargs):\n    pathlib.Path({marker!r}).write_text('called')\n"
            "    import torch\n    return torch.nn.Conv3d(in_channels, out_channels, 1)\n")


def nothing_ran(sandbox: Path) -> list[str]:
    return [f"hostile code ran: {(sandbox / MARKER).read_text()}"] if (sandbox / MARKER).exists() else []


def sleeper_alive(sandbox: Path) -> list[str]:
    sleeper = SLEEPERS.pop(str(sandbox))
    alive = sleeper.poll() is None
    sleeper.kill()
    sleeper.wait()
    return [] if alive else [f"the process the run named was signalled (exit {sleeper.returncode})"]


def set_field(data: dict, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        data = data[part]
    if value is DELETE:
        del data[last]
    else:
        data[last] = value


def hostile_run(base: Base, sandbox: Path, edits: dict, files: dict | None = None, where: str = "both") -> Path:
    """A copy of the shared run whose checkpoints' "config" and/or config.json have `edits` (path -> value),
    with `files` (relative path -> text, "{evil}" for the hostile factory) beside them."""
    run = copy(base.run, sandbox / "run")
    for name, content in (files or {}).items():
        text(run / name, evil_source(sandbox) if content == "{evil}" else content)
    if where in ("both", "checkpoint"):
        for name in ("best.pt", "last.pt"):
            state = torch.load(run / name, map_location="cpu", weights_only=True)
            for path, value in edits.items():
                set_field(state["config"], path, value)
            torch.save(state, run / name)
    if where in ("both", "config"):
        config = json.loads((run / "config.json").read_text())
        for path, value in edits.items():
            set_field(config, path, value)
        (run / "config.json").write_text(json.dumps(config))
    return run


def sha256_of(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def evil_with_copy(base: Base, sandbox: Path) -> Path:
    """A run whose factory evil.py:make is in RUN/network/ with its SHA-256 recorded: complete, but not
    trained on this account (the sandbox's own config home)."""
    digest = sha256_of(evil_source(sandbox))
    return hostile_run(base, sandbox, {"job.model.architecture": "evil.py:make", "job.model.source_sha256": digest},
                       {"network/evil.py": "{evil}", "evil.py": "{evil}"})


def with_sleeper(sandbox: Path) -> int:
    SLEEPERS[str(sandbox)] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    return SLEEPERS[str(sandbox)].pid


def pickled_code(base: Base, sandbox: Path) -> Path:
    """best.pt whose pickle would run code (a global that writes the marker) if loaded without weights_only."""
    import pathlib

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.write_text, (pathlib.Path(sandbox / MARKER), "unpickled"))

    run = copy(base.run, sandbox / "run")
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    state["extra"] = Payload()
    torch.save(state, run / "best.pt")
    return run


TRUSTED_ENV = {"XDG_CONFIG_HOME": "{sandbox}/config"}  # no factory was ever trained on this account


def _trust_rows() -> list[Row]:
    R = Row
    evil_relative = {"job.model.architecture": "evil.py:make", "job.model.source_sha256": ""}
    rows = []
    for command in ("predict", "export", "resume"):
        def argv(run, s, b, command=command):
            if command == "predict":
                return ["predict", run, b.image, "--out", s / "pred", "--quiet"]
            if command == "export":
                return ["export", run, "--format", "onnx", "--out", s / "m.onnx"]
            return ["train", "--out", run, "--resume", "--quiet", "--force"]

        absent = {"predict": ("pred",), "export": ("m.onnx",), "resume": ()}[command]
        rows += [
            R(f"{command}: evil.py beside the run, no SHA-256",
              lambda s, b, a=argv: a(hostile_run(b, s, evil_relative, {"evil.py": "{evil}"}), s, b), 2,
              "no recorded copy in the run", absent=absent, check=nothing_ran, env=TRUSTED_ENV),
            R(f"{command}: evil.py with its SHA-256, no copy in the run",
              lambda s, b, a=argv: a(hostile_run(b, s, {"job.model.architecture": "evil.py:make",
                                                         "job.model.source_sha256": sha256_of(evil_source(s))},
                                                 {"evil.py": "{evil}"}), s, b), 2,
              "no recorded copy in the run", absent=absent, check=nothing_ran, env=TRUSTED_ENV),
            R(f"{command}: the run's own copy, not trained on this account",
              lambda s, b, a=argv: a(evil_with_copy(b, s), s, b), 2, "--trust-code", absent=absent,
              check=nothing_ran, env=TRUSTED_ENV),
            R(f"{command}: builtins:print as the network",
              lambda s, b, a=argv: a(hostile_run(b, s, {"job.model.architecture": "builtins:print"}), s, b), 2,
              "builtins:print", absent=absent, env=TRUSTED_ENV, stdout_empty=True),
            R(f"{command}: os:kill as the network, a live process as its channels",
              lambda s, b, a=argv: a(hostile_run(b, s, {"job.model.architecture": "os:kill",
                                                         "job.model.in_channels": with_sleeper(s),
                                                         "job.model.classes": 9}), s, b), 2,
              "os:kill", absent=absent, env=TRUSTED_ENV, check=sleeper_alive),
            R(f"{command}: a traversing factory path",
              lambda s, b, a=argv: a(hostile_run(b, s, {"job.model.architecture": "../../../evil.py:make"},
                                                 {"evil.py": "{evil}"}), s, b), 2,
              "no recorded copy", absent=absent, check=nothing_ran, env=TRUSTED_ENV),
        ]
    rows += [
        R("predict: the run's copy changed after training",
          lambda s, b: ["predict", hostile_run(b, s, {"job.model.architecture": "evil.py:make",
                                                      "job.model.source_sha256": "0" * 64},
                                               {"network/evil.py": "{evil}"}),
                        b.image, "--out", s / "pred", "--trust-code"], 2, "SHA-256 differs", absent=("pred",),
          check=nothing_ran, env=TRUSTED_ENV),
        R("predict: the run's copy is a symlink out of the run",
          lambda s, b: ["predict", symlinked_copy(b, s), b.image, "--out", s / "pred", "--trust-code"], 2,
          "not a regular file", absent=("pred",), check=nothing_ran, env=TRUSTED_ENV),
        R("predict: subprocess:run as the network",
          lambda s, b: ["predict", hostile_run(b, s, {"job.model.architecture": "subprocess:run"}), b.image,
                        "--out", s / "pred"], 2, "subprocess:run", absent=("pred",), env=TRUSTED_ENV),
        R("predict: a checkpoint whose pickle runs code",
          lambda s, b: ["predict", pickled_code(b, s), b.image, "--out", s / "pred"], 2,
          "not a loadable fullres checkpoint", absent=("pred",), check=nothing_ran),
        R("predict: factory_dir set by the run itself",
          lambda s, b: ["predict", hostile_run(b, s, {"job.model.factory_dir": str(s)}), b.image, "--out", s / "pred"],
          2, "unknown field factory_dir", absent=("pred",)),
        R("predict: nnU-Net arguments naming a function",
          lambda s, b: ["predict", hostile_run(b, s, {"job.model.architecture": "nnunet:PlainConvUNet",
                                                      "job.model.args": '{"nonlin": "os.system"}'}),
                        b.image, "--out", s / "pred"], 2, "nnunet:PlainConvUNet", absent=("pred",)),
        R("predict: a MONAI attribute that is no network",
          lambda s, b: ["predict", hostile_run(b, s, {"job.model.architecture": "monai:__class__"}), b.image,
                        "--out", s / "pred"], 2, "__class__", absent=("pred",)),
    ]
    return rows


def symlinked_copy(base: Base, sandbox: Path) -> Path:
    run = evil_with_copy(base, sandbox)
    (run / "network" / "evil.py").unlink()
    (run / "network" / "evil.py").symlink_to(run / "evil.py")
    return run


# ---- checkpoint and config fields: one schema -----------------------------------------------------------

FIELD_CASES = [  # (field path, a bad value, a word the refusal names)
    ("seed", "abc", "seed"), ("seed", -1, "seed"), ("seed", 2**40, "seed"), ("seed", 1.5, "seed"),
    ("seed", True, "seed"), ("seed", None, "seed"),
    ("threads", "x", "threads"), ("threads", -1, "threads"), ("threads", 10**6, "threads"),
    ("workers", -3, "workers"), ("epochs", 0, "epochs"), ("epochs", "ten", "epochs"), ("epochs", 10**30, "epochs"),
    ("lr", "fast", "lr"), ("lr", -1, "lr"), ("lr", 0, "lr"), ("lr", float("inf"), "lr"), ("lr", float("nan"), "lr"),
    ("data_dir", 5, "data_dir"), ("data_dir", None, "data_dir"), ("data_dir", "", "data_dir"),
    ("data_dir", "x" * 5000, "data_dir"), ("device", "tpu", "device"), ("loss", "mse", "loss"),
    ("schedule", "linear", "schedule"), ("val_fraction", 2, "val-fraction"),
    ("job.shape", [16, 16], "shape"), ("job.shape", ["a", 16, 16], "shape"), ("job.shape", [16, 16, -16], "D=-16"),
    ("job.batch", 0, "batch"), ("job.batch", "1", "batch"), ("job.model.filters", 0, "filters"),
    ("job.model.filters", 10**9, "too large"), ("job.model.in_channels", 0, "in_channels"),
    ("job.model.architecture", 7, "architecture"), ("job.model.architecture", "nonet", "nonet"),
    ("job.model.args", "{bad", "--model-args"), ("job.model.args", "[1]", "--model-args"),
    ("job.strategy.slabs", 0, "slabs"), ("job.strategy.precision", "fp8", "precision"),
    ("data.channels", [], "channels"), ("data.channels", [-1], "channels"), ("data.channels", "0", "channels"),
    ("data.target", "xx", "target"), ("foo", 1, "foo"), ("job", DELETE, "job"), ("job.model", [], "model"),
]


def _field_rows() -> list[Row]:
    R = Row
    rows = []
    for path, value, says in FIELD_CASES:
        label = "deleted" if value is DELETE else json.dumps(value)[:24]
        rows.append(R(f"predict: checkpoint config {path} = {label}",
                      lambda s, b, p=path, v=value: ["predict", hostile_run(b, s, {p: v}, where="checkpoint"), b.image,
                                                     "--out", s / "pred"], 2, says, absent=("pred",)))
        rows.append(R(f"resume: config.json {path} = {label}",
                      lambda s, b, p=path, v=value: ["train", "--out", hostile_run(b, s, {p: v}, where="config"),
                                                     "--resume", "--quiet", "--force"], 2, says))
    rows.append(R("predict: checkpoint config with 10^6 filters (not built)",
                  lambda s, b: ["predict", hostile_run(b, s, {"job.model.filters": 10**6}, where="checkpoint"),
                                b.image, "--out", s / "pred"], 2, "do not fit the network", absent=("pred",)))
    for name, state in CHECKPOINTS.items():
        rows.append(R(f"predict: checkpoint {name}",
                      lambda s, b, st=state: ["predict", saved(st, b, s / "best.pt"), b.image, "--out", s / "pred"],
                      2, "best.pt", absent=("pred",)))
    for name, content in CONFIG_FILES.items():
        rows.append(R(f"resume: config.json {name}",
                      lambda s, b, c=content: ["train", "--out", config_file(b, s, c), "--resume", "--quiet"],
                      2, "config.json"))
    return rows


def _nested(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


CHECKPOINTS = {  # what best.pt holds -> a refusal naming it
    "is a bare tensor": lambda state: torch.zeros(3),
    "is a list": lambda state: [state],
    "has no weights": lambda state: {k: v for k, v in state.items() if k != "model"},
    "has weights of numbers": lambda state: {**state, "model": {"conv1a.weight": 1.0}},
    "has no config": lambda state: {k: v for k, v in state.items() if k != "config"},
    "has a config that is text": lambda state: {**state, "config": "unet3d"},
    "has an epoch that is text": lambda state: {**state, "epoch": "3"},
    "has a float random state": lambda state: {**state, "rng": torch.zeros(5)},
    "has a history that is text": lambda state: {**state, "history": "none"},
    "has a config nested 100 deep": lambda state: {**state, "config": _nested(100)},
}


def saved(make, base: Base, target: Path) -> Path:
    state = torch.load(base.run / "best.pt", map_location="cpu", weights_only=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(make(state), target)
    return target


CONFIG_FILES = {
    "is a list": "[1, 2]", "is text": '"unet3d"', "is empty": "", "is binary": "\x00\xff\x10garbage",
    "is nested 100,000 deep": "[" * 100_000 + "]" * 100_000, "has a NaN lr": None,
}


def config_file(base: Base, sandbox: Path, content: str | None) -> Path:
    run = copy(base.run, sandbox / "run")
    if content is None:
        (run / "config.json").write_text(re.sub(r'"lr": [0-9.e+-]+', '"lr": NaN', (run / "config.json").read_text()))
    else:
        (run / "config.json").write_text(content, errors="surrogateescape")
    return run


# ---- no silent wrong answer, and one line for every fault ---------------------------------------------------

def special(kind: str, path: Path) -> Path:
    """A device node (a symlink to /dev/null), a FIFO or a socket at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "device":
        path.symlink_to("/dev/null")
    elif kind == "FIFO":
        os.mkfifo(path)
    else:
        import socket

        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
        server.close()  # the socket file stays
    return path


def with_affine(source: Path, target: Path, affine) -> Path:
    """A copy of `source` whose header's sform is `affine` (qform off), written byte by byte: nibabel would
    refuse to write an affine it cannot decompose, but a file from elsewhere can hold one."""
    data = np.asarray(nib.load(source).dataobj).astype("<f4")
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"], header["sform_code"], header["qform_code"] = 352, 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = np.asarray(affine, dtype=np.float32)[:3]
    target.parent.mkdir(parents=True, exist_ok=True)
    raw = header.binaryblock + b"\0" * 4 + data.tobytes(order="F")
    target.write_bytes(gzip.compress(raw) if target.name.endswith(".gz") else raw)
    return target


def complex_image(source: Path, target: Path) -> Path:
    data = np.asarray(nib.load(source).dataobj).astype(np.complex64) * (1 + 1j)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, nib.load(source).affine), target)
    return target


def of_dims(source: Path, target: Path, dims: int) -> Path:
    data = np.asarray(nib.load(source).dataobj).astype(np.float32)
    data = data[..., 0, 0] if dims == 2 else data[..., None]
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), target)
    return target


def locked_run(base: Base, sandbox: Path, held: bool = True) -> Path:
    """A copy of the run whose lock a live process holds (`held`), or names a dead one (not held)."""
    run = copy(base.run, sandbox / "run")
    if held:
        code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('locked', flush=True); "
                "time.sleep(600)")
        holder = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, text=True)
        holder.stdout.readline()
        SLEEPERS[str(sandbox)] = holder
    return run


def lock_released(sandbox: Path) -> list[str]:
    return sleeper_alive(sandbox)  # the holder must be untouched too


def deep_dataset(base: Base, sandbox: Path) -> Path:
    data = copy(base.data, sandbox / "data")
    (data / "dataset.json").write_text("[" * 100_000 + "]" * 100_000)
    return data


def loop(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(path.name + ".b")
    (path.parent / (path.name + ".b")).symlink_to(path.name)
    return path


def factory(sandbox: Path, body: str, name: str = "nets.py") -> str:
    text(sandbox / name, "import torch\n" + body)
    return f"{name}:make"


WARNS = ("import warnings\nwarnings.warn('a library warning before the refusal')\n"
         "def make(in_channels, out_channels, **kwargs):\n    raise ValueError('refused by the factory')\n")


def _silent_rows() -> list[Row]:
    R = Row
    pred = lambda b, s, edit, dtype: edited_prediction(b, s, edit, dtype)  # noqa: E731
    rows = [
        # evaluate: label values checked before any cast
        R("evaluate, label 65537 would wrap to 1",
          lambda s, b: ["evaluate", pred(b, s, lambda a: np.where(a > 0, 65537, 0), np.int32), b.data / "labelsTs",
                        "--csv", s / "m.csv"], 2, "65537", absent=("m.csv",)),
        R("evaluate, label -1", lambda s, b: ["evaluate", pred(b, s, lambda a: np.where(a > 0, -1, 0), np.int16),
                                              b.data / "labelsTs", "--csv", s / "m.csv"], 2, "-1", absent=("m.csv",)),
        R("evaluate, label 1e10 as float", lambda s, b: ["evaluate", pred(b, s, lambda a: np.where(a > 0, 1e10, 0), np.float64),
                                                         b.data / "labelsTs", "--csv", s / "m.csv"], 2, "label value",
          absent=("m.csv",)),
        R("evaluate, infinite label", lambda s, b: ["evaluate", pred(b, s, lambda a: np.where(a > 0, np.inf, 0), np.float32),
                                                    b.data / "labelsTs", "--csv", s / "m.csv"], 2, "0..inf",
          absent=("m.csv",)),
        R("evaluate, complex prediction",
          lambda s, b: ["evaluate", complex_prediction(b, s), b.data / "labelsTs", "--csv", s / "m.csv"], 2,
          "complex", absent=("m.csv",)),
        R("evaluate, prediction with a NaN affine",
          lambda s, b: ["evaluate", affine_prediction(b, s, np.full((4, 4), np.nan)), b.data / "labelsTs",
                        "--csv", s / "m.csv"], 2, "not finite", absent=("m.csv",)),
        R("evaluate, prediction with a singular affine",
          lambda s, b: ["evaluate", affine_prediction(b, s, np.diag([1.0, 0.0, 1.0, 1.0])), b.data / "labelsTs",
                        "--csv", s / "m.csv"], 2, "singular", absent=("m.csv",)),
        R("evaluate, deeply nested prediction.json is ignored",
          lambda s, b: [text(copy(b.pred, s / "p") / "prediction.json", "[" * 100_000 + "]" * 100_000) and "evaluate",
                        s / "p", b.data / "labelsTs", "--csv", s / "m.csv"], 0, ""),
        # predict: inputs refused before the first mask
        R("predict, two inputs named alike",
          lambda s, b: ["predict", b.run, b.image, copy(b.image, s / "other" / b.image.name), "--out", s / "pred"],
          2, "two inputs are named BRATS_004", absent=("pred",)),
        R("predict, a file and a dataset case named alike",
          lambda s, b: ["predict", b.run, b.data, copy(b.image, s / "other" / b.image.name), "--out", s / "pred"],
          2, "two inputs are named BRATS_004", absent=("pred",)),
        R("predict, complex voxels", lambda s, b: ["predict", b.run, complex_image(b.image, s / "in" / "c.nii.gz"),
                                                   "--out", s / "pred"], 2, "complex", absent=("pred",)),
        R("predict, NaN affine (second input)",
          lambda s, b: ["predict", b.run, b.image, with_affine(b.image, s / "in" / "nan.nii.gz", np.full((4, 4), np.nan)),
                        "--out", s / "pred"], 2, "not finite", absent=("pred",)),
        R("predict, singular affine",
          lambda s, b: ["predict", b.run, with_affine(b.image, s / "in" / "flat.nii.gz", np.diag([1.0, 1.0, 0.0, 1.0])),
                        "--out", s / "pred"], 2, "singular", absent=("pred",)),
        R("predict, infinite affine",
          lambda s, b: ["predict", b.run, with_affine(b.image, s / "in" / "inf.nii.gz", np.diag([1.0, np.inf, 1.0, 1.0])),
                        "--out", s / "pred"], 2, "not finite", absent=("pred",)),
        R("predict --out is the run folder", lambda s, b: ["predict", copy(b.run, s / "run"), b.image, "--out", s / "run",
                                                           "--overwrite"], 2, "holds the run's checkpoint"),
        R("predict --out holds the checkpoint given",
          lambda s, b: ["predict", copy(b.run / "best.pt", s / "ck" / "best.pt"), b.image, "--out", s / "ck"], 2,
          "holds the run's checkpoint"),
        R("predict, deeply nested prediction.json in --out",
          lambda s, b: ["predict", b.run, b.image, "--out",
                        text(s / "pred" / "prediction.json", "[" * 100_000 + "]" * 100_000).parent, "--quiet"],
          2, "prediction.json exists and was not written by fullres predict"),
        R("predict, input is a symlink loop", lambda s, b: ["predict", b.run, loop(s / "in" / "x.nii.gz"), "--out",
                                                            s / "pred"], 2, "x.nii.gz", absent=("pred",)),
        R("predict, a dataset with nested dataset.json",
          lambda s, b: ["predict", b.run, deep_dataset(b, s), "--out", s / "pred"], 2, "dataset.json", absent=("pred",)),
        R("predict --memory overflows", lambda s, b: ["predict", b.run, b.image, "--out", s / "pred", "--memory",
                                                      "1e400GB"], 2, "1e400GB", absent=("pred",)),
        # show
        R("show, 2D image", lambda s, b: ["show", of_dims(b.image, s / "flat.nii.gz", 2), "--out", s / "f.png"],
          2, "2D image", absent=("f.png",)),
        R("show, 5D image", lambda s, b: ["show", of_dims(b.image, s / "deep.nii.gz", 5), "--out", s / "f.png"],
          2, "5D image", absent=("f.png",)),
        R("show, complex image", lambda s, b: ["show", complex_image(b.image, s / "c.nii.gz"), "--out", s / "f.png"],
          2, "complex", absent=("f.png",)),
        R("show --out is the image, with --overwrite",
          lambda s, b: ["show", copy(b.image, s / "i.nii.gz"), "--out", s / "i.nii.gz", "--overwrite"], 2,
          "one of the inputs"),
        R("show --out is the mask, with --overwrite",
          lambda s, b: ["show", b.image, "--pred", copy(b.label, s / "m.nii.gz"), "--out", s / "m.nii.gz", "--overwrite"],
          2, "one of the inputs"),
        R("show --out is the label through a symlink",
          lambda s, b: ["show", b.image, "--label", copy(b.label, s / "l.nii.gz"), "--out",
                        (s / "l.png").symlink_to(s / "l.nii.gz") or s / "l.png", "--overwrite"], 2, "one of the inputs"),
        R("show, NaN affine", lambda s, b: ["show", with_affine(b.image, s / "n.nii.gz", np.full((4, 4), np.nan)),
                                            "--out", s / "f.png"], 2, "not finite", absent=("f.png",)),
        # train
        R("train --lr inf", lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--lr", "inf"], 2, "--lr",
          absent=("run",)),
        R("train --lr nan", lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--lr", "nan"], 2, "--lr",
          absent=("run",)),
        R("train --lr 1e309", lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--lr", "1e309"], 2, "--lr",
          absent=("run",)),
        R("train --seed -1", lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--seed", "-1", "--force",
                                           "--no-autotune"], 2, "--seed", absent=("run",)),
        R("train, fewer cases than one batch: nothing written",
          lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--batch", "16", "--force"], 2,
          "fewer than one global batch", absent=("run",)),
        R("train, a job that does not fit: nothing written",
          lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--memory", "1MB"], 3, "does not fit",
          absent=("run",)),
        R("train, a dataset with a problem: nothing written",
          lambda s, b: ["train", broken_dataset(b, s), "--out", s / "run", *TINY, "--force"], 1, "has problems",
          absent=("run",)),
        R("train into a run another process trains in",
          lambda s, b: ["train", b.data, "--out", locked_run(b, s), *TINY, "--force"], 2, "is in use",
          check=lock_released),
        R("train --resume into a run another process trains in",
          lambda s, b: ["train", "--out", locked_run(b, s), "--resume", "--quiet", "--force"], 2, "is in use",
          check=lock_released),
        R("train --memory overflows", lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--memory", "9e99TB"],
          2, "9e99TB", absent=("run",)),
        R("train DATA is a symlink loop", lambda s, b: ["train", loop(s / "d"), "--out", s / "run", *TINY], 2,
          "no such folder", absent=("run",)),
        R("train, a dataset with nested dataset.json",
          lambda s, b: ["train", deep_dataset(b, s), "--out", s / "run", *TINY, "--force"], 1, "nested too deeply",
          absent=("run",)),
        R("train, a factory that raises SystemExit on import",
          lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--model",
                        factory(s, "raise SystemExit(3)\ndef make(i, o):\n    pass\n")], 2, "SystemExit",
          absent=("run",)),
        R("train, a factory that calls sys.exit",
          lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--model",
                        factory(s, "import sys\ndef make(i, o, **k):\n    sys.exit('bye')\n")], 2, "SystemExit",
          absent=("run",)),
        R("train, a factory that returns no network",
          lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--model",
                        factory(s, "def make(i, o, **k):\n    return 42\n")], 2, "not a torch.nn.Module",
          absent=("run",)),
        R("train, a factory that warns, then raises: one line",
          lambda s, b: ["train", b.data, "--out", s / "run", *TINY, "--model", factory(s, WARNS)], 2,
          "refused by the factory", absent=("run",)),
        R("predict, inputs a and a_prob", lambda s, b: ["predict", b.run, b.image,
                                                        copy(b.image, s / "in" / "BRATS_004_prob.nii.gz"),
                                                        "--out", s / "pred", "--probabilities"], 2,
          "BRATS_004_prob", absent=("pred",)),
        R("resume: config.json is a FIFO",
          lambda s, b: ["train", "--out", fifo_config(b, s), "--resume", "--quiet"], 2, "not a regular file"),
        R("train, the demo refused in an empty --out: left empty",
          lambda s, b: ["train", "--out", (s / "empty").mkdir() or s / "empty", "--memory", "1MB", "--quiet"], 3,
          "does not fit", check=lambda s: [] if not any((s / "empty").iterdir()) else ["--out is not empty"]),
        R("plan --memory overflows", lambda s, b: ["plan", "--memory", "1e400GB"], 2, "1e400GB"),
        R("check, a symlink loop", lambda s, b: ["check", loop(s / "d")], 2, "d"),
        R("synth into a previous synth with a user's case in it",
          lambda s, b: ["synth", synth_with_user_file(s), "--cases", "1", "--shape", "16", "16", "16", "--quiet"],
          2, "not a previous `fullres synth` output"),
        R("convert, a dataset with nested dataset.json",
          lambda s, b: ["convert", deep_dataset(b, s), s / "o", "--layout", "nnunet", "--quiet"], 2, "dataset.json",
          absent=("o",)),
    ]
    writers = {  # command -> (argv for an output path, the option its refusal names)
        "evaluate --csv": lambda s, b, out: ["evaluate", b.pred, b.data / "labelsTs", "--csv", out, "--overwrite"],
        "show --out": lambda s, b, out: ["show", b.image, "--out", out, "--overwrite"],
        "export --out": lambda s, b, out: ["export", b.run, "--format", "onnx", "--out", out, "--overwrite"],
        "bench --chart": lambda s, b, out: ["bench", *SHAPE, "--chart", out, "--overwrite"],
        "predict mask": lambda s, b, out: ["predict", b.run, b.image, "--out", out.parent, "--overwrite"],
    }
    names = {"evaluate --csv": "m.csv", "show --out": "f.png", "export --out": "m.onnx", "bench --chart": "c.png",
             "predict mask": "BRATS_004.nii.gz"}
    for writer, make_argv in writers.items():
        for kind in ("device", "FIFO", "socket"):
            rows.append(R(f"{writer} is a {kind}, with --overwrite",
                          lambda s, b, m=make_argv, k=kind, n=names[writer]: m(s, b, special(k, s / "o" / n)), 2,
                          f"is a {kind}", check=still_special(kind, names[writer])))
    return rows


def still_special(kind: str, name: str):
    def check(sandbox: Path) -> list[str]:
        path = sandbox / "o" / name
        ok = {"device": path.is_symlink() and path.is_char_device(), "FIFO": path.is_fifo(),
              "socket": path.is_socket()}[kind]
        return [] if ok else [f"{path} is no longer a {kind}"]
    return check


def fifo_config(base: Base, sandbox: Path) -> Path:
    run = copy(base.run, sandbox / "run")
    (run / "config.json").unlink()
    os.mkfifo(run / "config.json")
    return run


def complex_prediction(base: Base, sandbox: Path) -> Path:
    pred = copy(base.pred, sandbox / "pred")
    complex_image(base.label, pred / "BRATS_004.nii.gz")
    return pred


def affine_prediction(base: Base, sandbox: Path, affine) -> Path:
    pred = copy(base.pred, sandbox / "pred")
    with_affine(base.pred / "BRATS_004.nii.gz", pred / "BRATS_004.nii.gz", affine)
    return pred


def broken_dataset(base: Base, sandbox: Path) -> Path:
    data = copy(base.data, sandbox / "data")
    truncated(base.data / "imagesTr" / "BRATS_001.nii.gz", data / "imagesTr" / "BRATS_001.nii.gz")
    return data


def synth_with_user_file(sandbox: Path) -> Path:
    from fullres.data.synth import write_dataset

    out = write_dataset(sandbox / "o", train_cases=1, test_cases=0, shape=(16, 16, 16), progress=False)
    copy(out / "imagesTr" / "BRATS_001.nii.gz", out / "imagesTr" / "BRATS_077.nii.gz")
    return out

ROWS = _rows() + _trust_rows() + _field_rows() + _silent_rows()


# ---- running them ----------------------------------------------------------------------------------

def tree_hashes(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    hashes = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if path.is_file() and not any(relative == s or relative.startswith(s + "/") for s in skip):
            hashes[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


def writes_despite_chmod(folder: Path) -> bool:
    """True when a read-only folder does not stop this process (root): such a row cannot be run."""
    probe = folder / ".probe"
    try:
        probe.write_bytes(b"")
    except OSError:
        return False
    probe.unlink()
    return True


@dataclass
class Outcome:
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    skipped: str | None = None
    seconds: float = 0.0
    created: list = field(default_factory=list)
    argv: list = field(default_factory=list)
    failures: list = field(default_factory=list)


def prepare_row(row: Row, sandbox: Path, base: Base) -> tuple[Outcome, dict | None]:
    """The row's sandbox and files, the hashes before, and the job to run (None when it cannot be run here)."""
    sandbox.mkdir(parents=True)
    argv = [str(a) for a in row.setup(sandbox, base)]
    outcome = Outcome(before=tree_hashes(sandbox, row.changes), argv=[a.replace(str(sandbox), "S")
                                                                      .replace(str(base.root), "B") for a in argv])
    if row.readonly:
        (sandbox / row.readonly).chmod(0o555)
        if writes_despite_chmod(sandbox / row.readonly):
            (sandbox / row.readonly).chmod(0o755)
            outcome.skipped = "running as root: a read-only folder does not stop writes"
            return outcome, None
    env = {"PYTHONDONTWRITEBYTECODE": "1", **{k: v.replace("{sandbox}", str(sandbox)) for k, v in row.env.items()}}
    job = {"argv": argv, "cwd": str(sandbox), "env": env, "fsize": row.fsize, "timeout": 240,
           "stdout": str(sandbox.parent / f"{sandbox.name}.out"), "stderr": str(sandbox.parent / f"{sandbox.name}.err")}
    return outcome, job


def finish_row(row: Row, sandbox: Path, outcome: Outcome, job: dict, code: int | None, seconds: float) -> Outcome:
    if row.readonly:
        (sandbox / row.readonly).chmod(0o755)
    outcome.code, outcome.seconds = code, seconds
    outcome.stdout, outcome.stderr = Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text()
    outcome.after = tree_hashes(sandbox, row.changes)
    outcome.created = [path for path in row.absent if (sandbox / path).exists() or (sandbox / path).is_symlink()]
    if row.check is not None:
        outcome.failures = row.check(sandbox)
    return outcome


def run_fresh(job: dict) -> int:
    """One row as its own `python3 -m fullres` process (its output through pipes: a file-size limit on the
    command must not cut what it says)."""
    def limit():  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))

    done = subprocess.run([sys.executable, "-m", "fullres", *job["argv"]], capture_output=True, text=True,
                          env={**os.environ, **job["env"]}, cwd=job["cwd"], timeout=300,
                          preexec_fn=limit if job["fsize"] is not None else None)
    Path(job["stdout"]).write_text(done.stdout)
    Path(job["stderr"]).write_text(done.stderr)
    return done.returncode


RUNNER = Path(__file__).with_name("row_runner.py")


def run_forked(jobs: list[dict]) -> list[int | None]:
    """Rows one after another from one process that imported fullres once (tests/row_runner.py)."""
    done = subprocess.run([sys.executable, str(RUNNER)], input=json.dumps(jobs), capture_output=True, text=True,
                          timeout=60 + 240 * len(jobs))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def build_base(root: Path) -> Base:
    """A 5-case 18x17x16 dataset, a 1-epoch 16^3 run on it (2 filters) and its predictions of the test cases."""
    from fullres.cli import main
    from fullres.data.synth import write_dataset

    data = write_dataset(root / "data", train_cases=3, test_cases=2, shape=(18, 17, 16), seed=3, progress=False)
    assert main(["train", str(data), "--out", str(root / "run"), *TINY, "--force", "--no-autotune"]) == 0
    assert main(["predict", str(root / "run"), str(data), "--out", str(root / "pred"), "--quiet"]) == 0
    return Base(root, data, root / "run", root / "pred")


def run_rows(rows: list[Row], base: Base, sandboxes: Path, workers: int = 2) -> dict[str, Outcome]:
    """Every row in its own sandbox: rows marked `fresh` as their own processes, the others forked from
    `workers` runner processes that share them out; "shared files": the base's hashes before and after."""
    before = tree_hashes(base.root)
    prepared = {}
    for i, row in enumerate(rows):
        sandbox = sandboxes / f"row{i}"
        prepared[row.name] = (row, sandbox, *prepare_row(row, sandbox, base))
    runnable = [(row, job) for row, _, _, job in prepared.values() if job is not None]
    # a file-size limit would also cut the forked child's stderr file: those rows get their own process
    forked = [(row, job) for row, job in runnable if not (row.fresh or row.fsize is not None)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        fresh = {row.name: pool.submit(run_fresh, job) for row, job in runnable
                 if row.fresh or row.fsize is not None}
        shares = [forked[k::workers] for k in range(workers)]
        batches = [pool.submit(run_forked, [job for _, job in share]) for share in shares if share]
        codes = {name: future.result() for name, future in fresh.items()}
        for share, batch in zip([share for share in shares if share], batches):
            codes.update({row.name: code for (row, _), code in zip(share, batch.result())})
    seconds = (time.monotonic() - started) / max(1, len(runnable))
    results = {}
    for name, (row, sandbox, outcome, job) in prepared.items():
        results[name] = outcome if job is None else finish_row(row, sandbox, outcome, job, codes[name], seconds)
    results["shared files"] = Outcome(before=before, after=tree_hashes(base.root))
    return results


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return build_base(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def outcomes(base, tmp_path_factory) -> dict[str, Outcome]:
    results = run_rows(ROWS, base, tmp_path_factory.mktemp("sandboxes"))
    if os.environ.get("FULLRES_RELIABILITY_TABLE"):  # docs/results/reliability.md's table is written from this
        Path(os.environ["FULLRES_RELIABILITY_TABLE"]).write_text(table_markdown(results, base, tmp_path_factory))
    return results


def table_markdown(results: dict[str, Outcome], base: Base, tmp_path_factory) -> str:
    """The table as markdown: each row's command (S: its sandbox, B: the shared files), exit code and line."""
    sandboxes = str(tmp_path_factory.getbasetemp())
    lines = ["| # | input or fault | command | exit | the line printed on stderr |", "|---|---|---|---|---|"]
    for number, row in enumerate(ROWS, 1):
        outcome = results[row.name]
        said = outcome.skipped or outcome.stderr.strip().splitlines()[-1:] and outcome.stderr.strip().splitlines()[-1]
        said = re.sub(r"\S*/sandboxes\d*/row\d+", "S", str(said or "")).replace(str(base.root), "B")
        said = said.replace(sandboxes, "T")
        argv = " ".join(outcome.argv).replace("|", "\\|")
        lines.append(f"| {number} | {row.name} | `fullres {argv[:160]}` | {outcome.code if not outcome.skipped else '-'} "
                     f"| {said[:260].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def test_the_table_is_large_enough():
    assert len(ROWS) >= 250 and len({row.name for row in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row, outcomes, base):
    outcome = outcomes[row.name]
    if outcome.skipped:
        pytest.skip(outcome.skipped)
    lines = outcome.stderr.strip().splitlines()
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.code == row.code, (outcome.code, outcome.stderr)
    if row.code:
        assert len(lines) == 1 and lines[0].startswith("fullres "), outcome.stderr
        assert row.says in lines[0], lines[0]
    else:
        assert not [line for line in lines if "error" in line.lower()], outcome.stderr
    if row.stdout_empty:
        assert outcome.stdout == "", outcome.stdout
    changed = [p for p in outcome.before if outcome.after.get(p) != outcome.before[p]]
    assert not changed, f"changed or removed: {changed}"
    assert not outcome.created, f"written by a refused command: {outcome.created}"
    assert not outcome.failures, outcome.failures


def test_no_row_changed_the_shared_files(outcomes):
    shared = outcomes["shared files"]
    assert shared.before and shared.after == shared.before


# ---- what --overwrite and a command's own earlier output allow ----------------------------------------

def test_a_commands_own_output_is_replaced_and_others_only_with_overwrite(base, tmp_path, cli):
    pred = tmp_path / "pred"
    assert cli("predict", base.run, base.image, "--out", pred, "--quiet")[0] == 0
    mask = (pred / "BRATS_004.nii.gz").read_bytes()
    assert cli("predict", base.run, base.image, "--out", pred, "--quiet")[0] == 0  # its own masks: replaced
    assert (pred / "BRATS_004.nii.gz").read_bytes() == mask
    foreign = tmp_path / "other"
    text(foreign / "BRATS_004.nii.gz")
    code, _, err = cli("predict", base.run, base.image, "--out", foreign, "--quiet")
    assert code == 2 and "was not written by fullres predict" in err
    assert cli("predict", base.run, base.image, "--out", foreign, "--quiet", "--overwrite")[0] == 0
    assert (foreign / "BRATS_004.nii.gz").read_bytes() == mask
    inputs = copy(base.image, tmp_path / "in" / base.image.name)
    code, _, err = cli("predict", base.run, inputs, "--out", inputs.parent, "--overwrite", "--quiet")
    assert code == 2 and "holds the input" in err  # never the inputs, even with --overwrite
    # evaluate: its own CSV again, a foreign one only with --overwrite
    labels, scored = base.data / "labelsTs", copy(base.pred, tmp_path / "scored")
    assert cli("evaluate", scored, labels)[0] == 0 and cli("evaluate", scored, labels)[0] == 0
    mine = text(tmp_path / "scores.csv")
    assert cli("evaluate", scored, labels, "--csv", mine)[0] == 2 and mine.read_text() == "not what it should be\n"
    assert cli("evaluate", scored, labels, "--csv", mine, "--overwrite")[0] == 0
    assert mine.read_text().startswith("case,region,dice,nsd,hd95\n")
    # sweep: its own folder again
    for _ in range(2):
        assert cli("sweep", "--shapes", "16", "--filters", "2", "--no-measure", "--checkpointing-sweep", "off",
                   "--out", tmp_path / "sweep")[0] == 0


# ---- the dry run gives the same bytes in every process --------------------------------------------------

DRYRUN = [sys.executable, "-m", "fullres", "estimate", "--method", "dryrun", "--json", *SHAPE, "--filters", "2",
          "--batch", "1", "--checkpointing"]


def test_the_dry_run_gives_the_same_bytes_in_two_processes(tmp_path):
    """Two processes started together with an empty cache: one measures the runtime term, the other waits
    for it (under glibc each measurement differs by up to tens of MB, so two would disagree); a cache that
    cannot be written gives the constant term, the same in every process."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    started = [subprocess.Popen(DRYRUN, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for _ in range(2)]
    results = [process.communicate() + (process.returncode,) for process in started]
    assert [code for _, _, code in results] == [0, 0], [err for _, err, _ in results]
    first, second = (json.loads(out) for out, _, _ in results)
    assert first["peak_bytes"] == second["peak_bytes"] and first["breakdown"] == second["breakdown"]
    # a checkpointed job (glibc's fixed thresholds): measured once at 16^3 and once at 64^3
    entries = json.loads((tmp_path / "cache" / "fullres" / "runtime.json").read_text()).values()
    assert first["breakdown"]["runtime"] > 0 and [entry["measured_bytes"] > 0 for entry in entries] == [True, True]

    from fullres.job.config import JobConfig, Strategy
    from fullres.cost.dryrun import runtime_bytes
    from fullres.nets.registry import ModelConfig

    unwritable = {**os.environ, "XDG_CACHE_HOME": str(text(tmp_path / "a-file"))}  # no folder can be made there
    peaks = []
    for _ in range(2):
        done = subprocess.run(DRYRUN, capture_output=True, text=True, env=unwritable)
        assert done.returncode == 0, done.stderr
        peaks.append(json.loads(done.stdout))
    job = JobConfig(model=ModelConfig(in_channels=4, filters=2), shape=(16, 16, 16), batch=1,
                    strategy=Strategy(checkpointing=True))
    assert peaks[0] == peaks[1] and peaks[0]["breakdown"]["runtime"] == runtime_bytes(job)
