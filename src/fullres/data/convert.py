"""Writing datasets in any layout, and `fullres convert DATA OUT --layout L` (one layout into another).

`LayoutWriter` writes cases in a layout's own file names and folders, and at `finish()` its dataset.json
(MSD, nnU-Net). Label volumes are given in the target layout's values; `convert_dataset` maps them by
role (edema, core, enhancing; see `fullres.data.layouts.value_map`) and picks channels by name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fullres import __version__
from fullres.data.layouts import (BRATS, BRATS_SEG, BRATS_TEST_FOLDER, CANONICAL_MODALITIES, LAYOUTS, MSD_LABELS, MSD_REGIONS, NNUNET_LABELS, TEST_LABELS, apply_value_map, kept_test_labels, load_dataset, value_map)
from fullres.data.msd import DatasetIndex, canonical_modality, image_files
from fullres.data.nifti import open_nifti, read_array, read_label, write_nifti
from fullres.errors import UserError
from fullres.files import staged_folder

MSD_MODALITY_NAMES = {"FLAIR": "FLAIR", "T1": "T1w", "T1c": "t1gd", "T2": "T2w"}  # as `synth` writes them
NNUNET_MODALITY_NAMES = {"FLAIR": "FLAIR", "T1": "T1", "T1c": "T1c", "T2": "T2"}


def layout_regions(layout: str) -> dict[str, tuple[int, ...]]:
    """WT / TC / ET in the label values fullres writes for `layout`."""
    return dict(BRATS[layout].regions) if layout in BRATS else dict(MSD_REGIONS)


def case_id_for(layout: str, number: int) -> str:
    """The case id fullres writes for case `number` (1, 2, ...) in `layout`."""
    return BRATS[layout].id_format.format(number) if layout in BRATS else f"BRATS_{number:03d}"


class LayoutWriter:
    """Writes one dataset in `layout` under `root` (which must exist): cases first, then `finish()`.
    `labels`: {value: name} in the written values, for dataset.json; None = the glioma labels as `layout`
    names them."""

    def __init__(self, root: Path, layout: str, modalities: Sequence[str], name: str = "BRATS",
                 description: str = "", labels: Mapping[int, str] | None = None) -> None:
        if layout not in LAYOUTS:
            raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.root, self.layout, self.modalities = Path(root), layout, tuple(modalities)
        self.name, self.description = name, description
        self.labels = None if labels is None else {int(value): str(label) for value, label in labels.items()}
        self.training: list[str] = []
        self.test: list[str] = []
        self.files: list[str] = []

    def _write(self, relative: str, array: np.ndarray, affine: np.ndarray) -> None:
        write_nifti(self.root / relative, array, affine)
        self.files.append(relative)

    def _images(self, case: str, image: np.ndarray, affine: np.ndarray, test: bool) -> None:
        """`image` (H, W, D, C) in `self.modalities` order."""
        if image.ndim != 4 or image.shape[3] != len(self.modalities):
            raise ValueError(f"image must be (H, W, D, {len(self.modalities)}), got {image.shape}")
        if self.layout == "msd":
            self._write(f"{'imagesTs' if test else 'imagesTr'}/{case}.nii.gz", image, affine)
        elif self.layout == "nnunet":
            for c in range(image.shape[3]):
                self._write(f"{'imagesTs' if test else 'imagesTr'}/{case}_{c:04d}.nii.gz",
                            np.ascontiguousarray(image[..., c]), affine)
        else:
            spec = BRATS[self.layout]
            folder = f"{BRATS_TEST_FOLDER}/{case}" if test else case
            for c, part in enumerate(spec.modalities):
                self._write(f"{folder}/{spec.file(case, part)}", np.ascontiguousarray(image[..., c]), affine)

    def add_training(self, case: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> None:
        self._images(case, image, affine, test=False)
        if self.layout in BRATS:
            self._write(f"{case}/{BRATS[self.layout].file(case, BRATS_SEG)}", label.astype(np.uint8), affine)
        else:
            self._write(f"labelsTr/{case}.nii.gz", label.astype(np.uint8), affine)
        self.training.append(case)

    def add_test(self, case: str, image: np.ndarray, affine: np.ndarray, label: np.ndarray | None = None) -> None:
        """A test case; its label, when given, is kept aside in labelsTs/CASE.nii.gz (for `evaluate`)."""
        self._images(case, image, affine, test=True)
        if label is not None:
            self._write(f"{TEST_LABELS}/{case}.nii.gz", label.astype(np.uint8), affine)
        self.test.append(case)

    def finish(self) -> None:
        """dataset.json (MSD, nnU-Net) and the empty folders the layout expects."""
        if self.layout == "msd":
            for sub in ("imagesTr", "labelsTr", "imagesTs"):
                (self.root / sub).mkdir(exist_ok=True)
            raw = {"name": self.name, "description": self.description, "tensorImageSize": "4D",
                   "modality": {str(i): name for i, name in enumerate(self.modalities)},
                   "labels": {str(k): v for k, v in (self.labels or MSD_LABELS).items()},
                   "numTraining": len(self.training), "numTest": len(self.test),
                   "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                                for c in self.training],
                   "test": [f"./imagesTs/{c}.nii.gz" for c in self.test]}
        elif self.layout == "nnunet":
            for sub in ("imagesTr", "labelsTr"):
                (self.root / sub).mkdir(exist_ok=True)
            raw = {"name": self.name, "description": self.description,
                   "channel_names": {str(i): name for i, name in enumerate(self.modalities)},
                   "labels": dict(NNUNET_LABELS) if self.labels is None else
                   {label: value for value, label in sorted(self.labels.items())},
                   "numTraining": len(self.training), "file_ending": ".nii.gz"}
        else:
            return
        (self.root / "dataset.json").write_text(json.dumps(raw, indent=2) + "\n")
        self.files.append("dataset.json")


def target_modalities(layout: str, source: Sequence[str]) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(source channel indices, target names) for writing `source`'s channels in `layout`.

    BraTS layouts need FLAIR, T1, T1c and T2 (by any of their names) and take them in that order; MSD and
    nnU-Net keep every channel, renaming the four known modalities to their own names.
    """
    canonical = [canonical_modality(name) for name in source]
    if layout in BRATS:
        missing = [m for m in CANONICAL_MODALITIES if m not in canonical]
        if missing:
            raise UserError(f"{BRATS[layout].title} needs the modalities FLAIR, T1, T1c and T2; the dataset has "
                            f"{', '.join(source)} (no {', '.join(missing)})")
        return tuple(canonical.index(m) for m in CANONICAL_MODALITIES), BRATS[layout].modalities
    names = MSD_MODALITY_NAMES if layout == "msd" else NNUNET_MODALITY_NAMES
    return tuple(range(len(source))), tuple(names.get(c, s) if c else s for c, s in zip(canonical, source))


def _case_number(layout: str, case: str) -> int | None:
    if layout in BRATS:
        return BRATS[layout].case_number(case)
    digits = re.findall(r"\d+", case)
    return int(digits[-1]) if digits else None


def new_case_ids(source: DatasetIndex, layout: str) -> dict[str, str]:
    """{source case id: target case id}: kept between MSD and nnU-Net, else renumbered by the id's number
    (BRATS_001 <-> BraTS2021_00001 <-> BraTS-GLI-00001-000), or in order when numbers are missing or repeat."""
    cases = [c.case_id for c in source.training] + [c.case_id for c in source.test]
    if layout in ("msd", "nnunet") and source.layout in ("msd", "nnunet"):
        return {c: c for c in cases}
    numbers = [_case_number(source.layout, c) for c in cases]
    if None in numbers or len(set(numbers)) != len(numbers):
        numbers = list(range(1, len(cases) + 1))
    return {c: case_id_for(layout, n) for c, n in zip(cases, numbers)}


def read_image(image) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, D, C) voxels in their stored dtype, and the affine (of the first file)."""
    files = image_files(image)
    arrays, affine = [], None
    for path in files:
        nii = open_nifti(path)
        data = read_array(nii, path)
        affine = nii.affine if affine is None else affine
        arrays.append(data if data.ndim == 4 else data[..., None])
    if len({a.shape[:3] for a in arrays}) > 1:
        raise UserError(f"{files[0].parent}: the case's channel files differ in shape")
    return (arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=3)), affine


def refuse_non_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty; refusing to write into it (choose a new or empty folder)")


def convert_dataset(data: Path, out: Path, layout: str, source_layout: str | None = None,
                    progress: bool = False) -> tuple[DatasetIndex, int, int]:
    """Rewrite the dataset `data` in `layout` under `out` (which must be missing or empty), label values
    mapped by role, channels chosen by name. Test cases follow, with their kept-aside labels (labelsTs/).
    Written to a temporary folder beside `out`, then renamed. Returns (source index, training, test cases)."""
    from tqdm import tqdm

    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    out = Path(out).absolute()
    refuse_non_empty(out)
    source = load_dataset(Path(data), source_layout)
    if out.resolve().is_relative_to(source.root):
        raise UserError(f"{out}: inside the source dataset {source.root}; choose a folder outside it")
    channels, names = target_modalities(layout, source.modalities)
    values = value_map(source.regions, layout_regions(layout), sorted(source.labels))
    ids = new_case_ids(source, layout)
    test_labels = kept_test_labels(source)
    with staged_folder(out, _rename_into_empty) as temp:
        # glioma labels take the target layout's names; any other label set keeps its own, at the mapped values
        glioma = {"TC", "ET"} <= set(source.regions)
        writer = LayoutWriter(temp, layout, names, name=source.name or "converted",
                              description=f"{source.root.name} ({source.layout}) converted by fullres {__version__}",
                              labels=None if glioma else {values[v]: label for v, label in source.labels.items()})
        jobs = [("train", c) for c in source.training] + [("test", c) for c in source.test]
        for kind, case in tqdm(jobs, desc="convert", unit="case", disable=not progress):
            image, affine = read_image(case.image)
            image = np.ascontiguousarray(image[..., list(channels)])
            if kind == "train":
                label = apply_value_map(read_label(case.label), values, case.label)
                writer.add_training(ids[case.case_id], image, label, affine)
            else:
                label = None
                if test_labels is not None and (test_labels / f"{case.case_id}.nii.gz").is_file():
                    path = test_labels / f"{case.case_id}.nii.gz"
                    label = apply_value_map(read_label(path), values, path)
                writer.add_test(ids[case.case_id], image, affine, label)
        writer.finish()
    return source, len(source.training), len(source.test)


def _rename_into_empty(temp: Path, out: Path) -> None:
    if out.exists():
        refuse_non_empty(out)  # again: it may have filled while we were writing
        out.rmdir()
    os.rename(temp, out)
