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

import hashlib
import json
import os
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
                                                             "--out", s / "in"], 2, "holds the input"),
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
          2, "exists: choose another path, or --overwrite"),
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
        R("show --out exists", lambda s, b: ["show", b.image, "--out", text(s / "f.png")], 2, "exists"),
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
                                                        *TINY], 2, "not empty and holds no run"),
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
          "800000x800000x800000 with 32 filters is too large"),
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
        R("check, missing folder", lambda s, b: ["check", s / "nowhere"], 2, "no such folder", stdout_empty=True),
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
    from fullres.config import TrainConfig
    from fullres.model import build_model

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


ROWS = _rows()


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


def run_row(row: Row, sandbox: Path, base: Base) -> Outcome:
    sandbox.mkdir(parents=True)
    argv = [str(a) for a in row.setup(sandbox, base)]
    outcome = Outcome(before=tree_hashes(sandbox, row.changes), argv=[a.replace(str(sandbox), "S")
                                                                      .replace(str(base.root), "B") for a in argv])
    if row.readonly:
        (sandbox / row.readonly).chmod(0o555)
        if writes_despite_chmod(sandbox / row.readonly):
            (sandbox / row.readonly).chmod(0o755)
            outcome.skipped = "running as root: a read-only folder does not stop writes"
            return outcome
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1",
           **{k: v.replace("{sandbox}", str(sandbox)) for k, v in row.env.items()}}

    def limit():  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (row.fsize, row.fsize))

    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "fullres", *argv], capture_output=True, text=True, env=env,
                          cwd=sandbox, timeout=300, preexec_fn=limit if row.fsize is not None else None)
    outcome.seconds = time.monotonic() - started
    if row.readonly:
        (sandbox / row.readonly).chmod(0o755)
    outcome.code, outcome.stdout, outcome.stderr = done.returncode, done.stdout, done.stderr
    outcome.after = tree_hashes(sandbox, row.changes)
    outcome.created = [path for path in row.absent if (sandbox / path).exists()]
    return outcome


def build_base(root: Path) -> Base:
    """A 5-case 18x17x16 dataset, a 1-epoch 16^3 run on it (2 filters) and its predictions of the test cases."""
    from fullres.cli import main
    from fullres.data import write_dataset

    data = write_dataset(root / "data", train_cases=3, test_cases=2, shape=(18, 17, 16), seed=3, progress=False)
    assert main(["train", str(data), "--out", str(root / "run"), *TINY, "--force", "--no-autotune"]) == 0
    assert main(["predict", str(root / "run"), str(data), "--out", str(root / "pred"), "--quiet"]) == 0
    return Base(root, data, root / "run", root / "pred")


def run_rows(rows: list[Row], base: Base, sandboxes: Path, workers: int = 2) -> dict[str, Outcome]:
    """Every row in its own sandbox, `workers` at a time; "shared files": the base's hashes before and after."""
    before = tree_hashes(base.root)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {row.name: pool.submit(run_row, row, sandboxes / f"row{i}", base) for i, row in enumerate(rows)}
        results = {name: future.result() for name, future in futures.items()}
    results["shared files"] = Outcome(before=before, after=tree_hashes(base.root))
    return results


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    return build_base(tmp_path_factory.mktemp("reliability"))


@pytest.fixture(scope="module")
def outcomes(base, tmp_path_factory) -> dict[str, Outcome]:
    results = run_rows(ROWS, base, tmp_path_factory.mktemp("sandboxes"))
    if os.environ.get("FULLRES_RELIABILITY_TABLE"):  # docs/reliability.md's table is written from this
        Path(os.environ["FULLRES_RELIABILITY_TABLE"]).write_text(json.dumps(
            [{"name": row.name, "argv": results[row.name].argv, "code": results[row.name].code,
              "stderr": results[row.name].stderr, "skipped": results[row.name].skipped,
              "seconds": results[row.name].seconds} for row in ROWS], indent=1))
    return results


def test_the_table_is_large_enough():
    assert len(ROWS) >= 40 and len({row.name for row in ROWS}) == len(ROWS)


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
    entry, = json.loads((tmp_path / "cache" / "fullres" / "runtime.json").read_text()).values()
    assert first["breakdown"]["runtime"] > 0 and entry["measured_bytes"] > 0

    from fullres.config import JobConfig, Strategy
    from fullres.memory.dryrun import runtime_bytes
    from fullres.model import ModelConfig

    unwritable = {**os.environ, "XDG_CACHE_HOME": str(text(tmp_path / "a-file"))}  # no folder can be made there
    peaks = []
    for _ in range(2):
        done = subprocess.run(DRYRUN, capture_output=True, text=True, env=unwritable)
        assert done.returncode == 0, done.stderr
        peaks.append(json.loads(done.stdout))
    job = JobConfig(model=ModelConfig(in_channels=4, filters=2), shape=(16, 16, 16), batch=1,
                    strategy=Strategy(checkpointing=True))
    assert peaks[0] == peaks[1] and peaks[0]["breakdown"]["runtime"] == runtime_bytes(job)
