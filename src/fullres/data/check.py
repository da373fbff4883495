"""`fullres check DATA`: validate every case of an MSD folder before a long job.

Every failure mode becomes a Finding (never a traceback): dataset.json missing, malformed or with a
path that leaves the folder; a missing, unreadable, truncated or non-NIfTI file; wrong dimensionality
or channel count; image/label shape or affine mismatch; NaN/Inf in an image; label values that are not
whole numbers or not declared in dataset.json. An empty label volume is a warning. Each file's whole
voxel array is read, since a truncated gzip only shows when its data is decompressed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fullres.data.layouts import BRATS, check_layout_name, detect_layout, scan_dataset
from fullres.data.msd import DATASET_JSON, dataset_json_problems, image_files, read_dataset_json, resolve_entry
from fullres.data.nifti import NIFTI_SUFFIXES, open_nifti, read_array
from fullres.errors import UserError

ERROR, WARNING = "error", "warning"
AFFINE_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class Finding:
    path: str  # relative to the dataset folder where possible
    message: str
    severity: str  # ERROR or WARNING

    def line(self) -> str:
        return f"{'ERROR' if self.severity == ERROR else 'WARNING'} {self.path}: {self.message}"


@dataclass(frozen=True)
class CheckReport:
    root: Path
    cases: int
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == ERROR)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.severity == WARNING)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        """One line per finding: `ERROR path: message` / `WARNING path: message`."""
        return [finding.line() for finding in self.findings]

    def summary(self) -> str:
        """e.g. `checked 12 cases: 2 problems, 1 warning`."""
        def count(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"
        return f"checked {count(self.cases, 'case')}: {count(len(self.problems), 'problem')}, " \
               f"{count(len(self.warnings), 'warning')}"


class _Findings:
    """Collects findings with paths shown relative to the dataset folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.items: list[Finding] = []

    def relative(self, path: Path | str) -> str:
        if Path(path) == self.root:
            return str(path)  # the dataset folder itself: name it in full, never as "."
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def add(self, path: Path | str, message: str, severity: str = ERROR) -> None:
        self.items.append(Finding(self.relative(path), message, severity))

    def add_user_error(self, path: Path | str, error: UserError) -> None:
        """A UserError's message, without the '<path>: ' prefix the readers put in front of it."""
        message = str(error)
        for prefix in (f"{path}: ", f"{self.root / DATASET_JSON}: "):
            if message.startswith(prefix):
                message = message[len(prefix):]
        self.add(path, message)


def _read(path: Path, findings: _Findings) -> tuple[np.ndarray, np.ndarray] | None:
    """(voxel array, affine) of a NIfTI file, or None after recording why it cannot be used."""
    if path.is_file() and not path.name.endswith(NIFTI_SUFFIXES):
        findings.add(path, f"not a NIfTI file (expected a {' or '.join(NIFTI_SUFFIXES)} name)")
        return None
    try:
        image = open_nifti(path)
        return read_array(image, path), image.affine
    except UserError as error:
        findings.add_user_error(path, error)
        return None


def _check_image(path: Path, modalities: int | None, findings: _Findings) -> tuple[tuple[int, ...], np.ndarray] | None:
    """Spatial shape and affine of a valid image; None (with findings) otherwise."""
    read = _read(path, findings)
    if read is None:
        return None
    data, affine = read
    if data.ndim != 4:
        findings.add(path, f"image must be 4D (H, W, D, modalities), got shape {data.shape}")
        return None
    if modalities is not None and data.shape[3] != modalities:
        findings.add(path, f"image has {data.shape[3]} channels but dataset.json declares {modalities} modalities")
    if data.dtype.kind == "f":
        nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
        if nan or inf:
            findings.add(path, f"image has {nan} NaN and {inf} Inf voxels")
    return data.shape[:3], affine


def _label_values(data: np.ndarray) -> np.ndarray:
    """The distinct values of a label volume (bincount for small non-negative integers: much faster)."""
    if data.dtype.kind in "iu" and data.size and data.min() >= 0 and data.max() < 65536:
        return np.flatnonzero(np.bincount(data.ravel()))
    return np.unique(data)


def _check_label(path: Path, image_path: Path, image: tuple[tuple[int, ...], np.ndarray] | None,
                 declared: set[int] | None, findings: _Findings, declared_in: str = "dataset.json labels") -> None:
    read = _read(path, findings)
    if read is None:
        return
    data, affine = read
    if data.ndim != 3:
        findings.add(path, f"label must be 3D (H, W, D), got shape {data.shape}")
        return
    if image is not None:
        shape, image_affine = image
        if data.shape != shape:
            findings.add(path, f"label shape {data.shape} != image shape {shape} ({findings.relative(image_path)})")
        elif not np.allclose(affine, image_affine, rtol=0, atol=AFFINE_TOLERANCE_MM):
            difference = float(np.abs(affine - image_affine).max())
            findings.add(path, f"label affine differs from the image's ({findings.relative(image_path)}) "
                               f"by up to {difference:g}")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)):
            findings.add(path, "label has NaN or Inf values")
            return
        if not np.array_equal(data, np.round(data)):
            findings.add(path, "label values must be whole numbers (found fractional values)")
            return
    values = _label_values(data)
    if declared is not None:
        undeclared = [v for v in values.tolist() if v not in declared]
        if undeclared:
            shown = ", ".join(f"{v:g}" for v in undeclared[:10])
            findings.add(path, f"label values {shown} are not declared in {declared_in} "
                               f"({', '.join(map(str, sorted(declared)))})")
    if not np.any(values != 0):
        findings.add(path, "empty label volume (no foreground voxels)", WARNING)


def _declared(raw: dict[str, Any], key: str) -> dict[int, str] | None:
    value = raw.get(key)
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() for k in value):
        return None
    return {int(k): v for k, v in value.items()}


def check_dataset(root: Path, progress: bool = False, layout: str | None = None) -> CheckReport:
    """Validate every training and test case of the dataset folder `root`, in its layout (detected, or
    forced: msd, nnunet, brats2021, brats2023; see `fullres.data.layouts`)."""
    layout = check_layout_name(layout) or detect_layout(Path(root))
    if layout != "msd":
        return _check_layout(Path(root).resolve(), layout, progress)
    root = Path(root).resolve()
    findings = _Findings(root)
    try:
        raw = read_dataset_json(root)
    except UserError as error:
        path = root / DATASET_JSON if root.is_dir() else root
        findings.add_user_error(path, error)
        return CheckReport(root, 0, tuple(findings.items))
    json_path = root / DATASET_JSON
    for problem in dataset_json_problems(raw):
        findings.add(json_path, problem)

    modalities = _declared(raw, "modality")
    labels = _declared(raw, "labels")
    training = [e for e in raw.get("training", []) if isinstance(e, dict)] if isinstance(raw.get("training"), list) else []
    training = [e for e in training if isinstance(e.get("image"), str) and isinstance(e.get("label"), str)]
    test = [e for e in raw.get("test", []) if isinstance(e, str)] if isinstance(raw.get("test"), list) else []
    for key, entries in (("numTraining", training), ("numTest", test)):
        if isinstance(raw.get(key), int) and raw[key] != len(entries):
            findings.add(json_path, f"'{key}' is {raw[key]} but {len(entries)} entries are listed", WARNING)

    def resolve(entry: str, where: str) -> Path | None:
        try:
            return resolve_entry(root, entry, where)
        except UserError as error:
            findings.add_user_error(json_path, error)
            return None

    n_modalities = len(modalities) if modalities else None
    declared = set(labels) if labels else None
    jobs = [("training", i, e) for i, e in enumerate(training)] + [("test", i, e) for i, e in enumerate(test)]
    for kind, i, entry in tqdm(jobs, desc="check", unit="case", disable=True if not progress else None):
        if kind == "training":
            image_path = resolve(entry["image"], f"training[{i}].image")
            label_path = resolve(entry["label"], f"training[{i}].label")
            image = _check_image(image_path, n_modalities, findings) if image_path else None
            if label_path:
                _check_label(label_path, image_path, image, declared, findings)
        else:
            image_path = resolve(entry, f"test[{i}]")
            if image_path:
                _check_image(image_path, n_modalities, findings)
    return CheckReport(root, len(jobs), tuple(findings.items))


def _check_channel_files(files: tuple[Path, ...], findings: _Findings) -> tuple[tuple[int, ...], np.ndarray] | None:
    """Per-channel 3D images (nnU-Net, BraTS): each readable, 3D and finite, all of one shape and affine.
    The first channel's (shape, affine), or None when the case's image cannot be used."""
    reference: tuple[tuple[int, ...], np.ndarray, Path] | None = None
    usable = True
    for path in files:
        read = _read(path, findings)
        if read is None:
            usable = False
            continue
        data, affine = read
        if data.ndim != 3:
            findings.add(path, f"image must be 3D (H, W, D), one file per channel, got shape {data.shape}")
            usable = False
            continue
        if data.dtype.kind == "f":
            nan, inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
            if nan or inf:
                findings.add(path, f"image has {nan} NaN and {inf} Inf voxels")
        if reference is None:
            reference = (data.shape, affine, path)
        elif data.shape != reference[0]:
            findings.add(path, f"shape {data.shape} != {findings.relative(reference[2])}'s shape {reference[0]} "
                               "(the case's files disagree)")
            usable = False
        elif not np.allclose(affine, reference[1], rtol=0, atol=AFFINE_TOLERANCE_MM):
            difference = float(np.abs(affine - reference[1]).max())
            findings.add(path, f"affine differs from {findings.relative(reference[2])}'s by up to {difference:g} "
                               "(the case's files disagree)")
    return (reference[0], reference[1]) if usable and reference is not None else None


def _check_layout(root: Path, layout: str, progress: bool) -> CheckReport:
    """check_dataset for the nnunet and BraTS layouts: the folder's structure, then every case's files."""
    findings = _Findings(root)
    if not root.is_dir():
        findings.add(root, f"not a directory (expected a {layout} dataset folder)")
        return CheckReport(root, 0, tuple(findings.items))
    scan = scan_dataset(root, layout)
    for problem in scan.problems:
        findings.add(problem.path, problem.message, problem.severity)
    index = scan.index
    if index is None:
        return CheckReport(root, 0, tuple(findings.items))
    declared = set(index.labels)
    declared_in = f"{BRATS[layout].title} labels" if layout in BRATS else "dataset.json labels"
    jobs = [(case, True) for case in index.training] + [(case, False) for case in index.test]
    for case, training in tqdm(jobs, desc="check", unit="case", disable=True if not progress else None):
        files = image_files(case.image)
        image = _check_channel_files(files, findings)
        if training:
            _check_label(case.label, files[0], image, declared, findings, declared_in)
    return CheckReport(root, len(jobs), tuple(findings.items))
