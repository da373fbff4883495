"""Dataset layouts: MSD, nnU-Net v2 raw, BraTS 2021 and BraTS 2023 (GLI) folders, read into one case list.

Each layout, given its folder, lists the training cases (case id, image: one 4D file or one 3D file per
channel, label), the test cases, the modality names (in the layout's channel order), the label values
with their names and the BraTS regions WT / TC / ET in the layout's own label values:

    msd        dataset.json (modality, labels, training, test); imagesTr/CASE.nii.gz 4D; labelsTr/; imagesTs/
    nnunet     dataset.json (channel_names, labels, file_ending, numTraining); imagesTr/CASE_0000.nii.gz ...
               one 3D file per channel; labelsTr/CASE.nii.gz; imagesTs/ optional
    brats2021  BraTS2021_XXXXX/BraTS2021_XXXXX_{flair,t1,t1ce,t2,seg}.nii.gz; labels 0, 1 NCR, 2 ED, 4 ET
    brats2023  BraTS-GLI-XXXXX-YYY/BraTS-GLI-XXXXX-YYY-{t2f,t1n,t1c,t2w,seg}.nii.gz; labels 0, 1 NCR, 2 ED, 3 ET

BraTS folders: the case folders directly inside the dataset folder are training cases (each needs its
seg file), unless none of them has one (a validation folder: all are test cases); case folders in a
`test/` subfolder are test cases. `load_dataset(root, layout=None)` detects the layout from the folder.
Every path is resolved and must stay inside the dataset folder.

Labels move between layouts by their role: edema (WT but not TC), core (TC but not ET), enhancing (ET).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fullres.data.msd import (
    DATASET_JSON,
    DatasetIndex,
    TestCase,
    TrainingCase,
    brats_regions,
    canonical_modality,
    load_dataset_json,
    numbered_names,
    read_dataset_json,
)
from fullres.errors import UserError
from fullres.terms import LAYOUTS

ERROR, WARNING = "error", "warning"

# ---------------------------------------------------------------------------------------------
# modality names

#: Canonical modality names, in the channel order every layout fullres writes uses.
CANONICAL_MODALITIES = ("FLAIR", "T1", "T1c", "T2")


def match_channels(source: Sequence[str], channels: Sequence[int], target: Sequence[str]) -> tuple[int, ...]:
    """The indices in `target`'s modalities of `source`'s channels `channels`, matched by name (aliases
    included). Identity when the names agree; UserError naming the channel that `target` lacks."""
    source, target = list(source), list(target)
    if [source[c] for c in channels if c < len(source)] == [target[c] for c in channels if c < len(target)]:
        return tuple(channels)
    out = []
    for c in channels:
        name = source[c] if c < len(source) else str(c)
        key = canonical_modality(name)
        hits = [i for i, t in enumerate(target) if t.lower() == name.lower()
                or (key is not None and canonical_modality(t) == key)]
        if not hits:
            raise UserError(f"channel {name!r} is not among this dataset's modalities ({', '.join(target)})")
        out.append(hits[0])
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# label roles


ROLES = ("edema", "core", "enhancing")


def label_roles(regions: Mapping[str, Sequence[int]]) -> dict[int, str]:
    """{value: role} for each foreground value: 'enhancing' (in ET), 'core' (in TC, not ET), 'edema' (in WT only)."""
    wt, tc, et = (set(regions.get(name, ())) for name in ("WT", "TC", "ET"))
    roles = {}
    for value in sorted(wt | tc | et):
        roles[value] = "enhancing" if value in et else "core" if value in tc else "edema"
    return roles


def role_values(regions: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """{role: the label value written for it} (the smallest value with that role)."""
    out: dict[str, int] = {}
    for value, role in sorted(label_roles(regions).items()):
        out.setdefault(role, value)
    return out


def value_map(source: Mapping[str, Sequence[int]], target: Mapping[str, Sequence[int]],
              source_values: Sequence[int]) -> dict[int, int]:
    """{source label value: target label value}, by role; 0 stays 0. UserError for a role the target lacks."""
    roles, targets = label_roles(source), role_values(target)
    out = {}
    for value in source_values:
        if value == 0:
            out[0] = 0
            continue
        role = roles.get(value)
        if role is None:
            raise UserError(f"label value {value} is in no region (WT, TC, ET); it cannot be mapped to another layout")
        if role not in targets:
            raise UserError(f"label value {value} ({role}) has no counterpart in the target layout")
        out[value] = targets[role]
    return out


def apply_value_map(label: np.ndarray, mapping: Mapping[int, int], path: Path | str) -> np.ndarray:
    """`label` with every value replaced by `mapping[value]`; UserError naming `path` for an unmapped value."""
    table = np.full(256, -1, dtype=np.int16)
    for source, target in mapping.items():
        table[int(source)] = int(target)
    out = table[np.asarray(label, dtype=np.uint8)]
    if (out < 0).any():
        bad = sorted(set(np.unique(np.asarray(label)[out < 0]).tolist()))
        raise UserError(f"{path}: label values {', '.join(map(str, bad))} are not among the layout's labels "
                        f"({', '.join(map(str, sorted(mapping)))})")
    return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# the BraTS layouts


@dataclass(frozen=True)
class BratsSpec:
    name: str
    title: str
    folder: re.Pattern
    separator: str
    modalities: tuple[str, ...]  # file suffixes in channel order (FLAIR, T1, T1c, T2)
    labels: dict[int, str]
    regions: dict[str, tuple[int, ...]]
    id_format: str  # case id from a number

    def file(self, case: str, part: str, suffix: str = ".nii.gz") -> str:
        return f"{case}{self.separator}{part}{suffix}"

    def case_number(self, case: str) -> int | None:
        match = self.folder.fullmatch(case)
        return int(match.group(1)) if match else None


BRATS2021 = BratsSpec(
    "brats2021", "BraTS 2021", re.compile(r"BraTS2021_(\d+)"), "_", ("flair", "t1", "t1ce", "t2"),
    {0: "background", 1: "necrotic / non-enhancing tumour core", 2: "peritumoral edema", 4: "GD-enhancing tumour"},
    {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}, "BraTS2021_{:05d}")
BRATS2023 = BratsSpec(
    "brats2023", "BraTS 2023", re.compile(r"BraTS-GLI-(\d+)-(\d+)"), "-", ("t2f", "t1n", "t1c", "t2w"),
    {0: "background", 1: "non-enhancing tumour core", 2: "surrounding non-enhancing FLAIR hyperintensity (edema)",
     3: "enhancing tumour"},
    {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}, "BraTS-GLI-{:05d}-000")
BRATS = {spec.name: spec for spec in (BRATS2021, BRATS2023)}
BRATS_SEG = "seg"
BRATS_TEST_FOLDER = "test"
TEST_LABELS = "labelsTs"  # test labels kept aside (by synth and convert), named CASE.nii.gz

MSD_REGIONS = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}
MSD_LABELS = {0: "background", 1: "edema", 2: "non-enhancing tumor", 3: "enhancing tumour"}
NNUNET_LABELS = {"background": 0, "edema": 1, "non-enhancing": 2, "enhancing": 3}
NNUNET_CHANNEL = re.compile(r"(.+)_(\d{4})")


@dataclass
class Problem:
    path: Path
    message: str
    severity: str = ERROR


@dataclass
class Scan:
    """What a layout reader found: the index (possibly partial) and the structural problems on the way."""

    index: DatasetIndex | None
    problems: list[Problem] = field(default_factory=list)

    def raise_first(self) -> None:
        errors = [p for p in self.problems if p.severity == ERROR]
        if errors:
            more = f" (and {len(errors) - 1} more problems; run `fullres check`)" if len(errors) > 1 else ""
            raise UserError(f"{errors[0].path}: {errors[0].message}{more}")


# ---------------------------------------------------------------------------------------------
# detection and loading


def _json_object(root: Path) -> dict | None:
    try:
        raw = json.loads((root / DATASET_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def detect_layout(root: Path) -> str:
    """The layout of a dataset folder: nnunet (dataset.json with channel_names or file_ending), msd
    (another dataset.json), brats2021 / brats2023 (case folders), else msd (whose reader then says what
    is missing)."""
    root = Path(root)
    if not root.is_dir():
        return "msd"
    if (root / DATASET_JSON).exists():
        raw = _json_object(root)
        if raw is not None and ("channel_names" in raw or "file_ending" in raw) and "modality" not in raw:
            return "nnunet"
        return "msd"
    for folder in (root, root / BRATS_TEST_FOLDER):
        if not folder.is_dir():
            continue
        names = [entry.name for entry in folder.iterdir() if entry.is_dir()]
        for spec in BRATS.values():
            if any(spec.folder.fullmatch(name) for name in names):
                return spec.name
    return "msd"


def check_layout_name(layout: str | None) -> str | None:
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return layout


def scan_dataset(root: Path, layout: str | None = None) -> Scan:
    """Read a non-MSD dataset folder, collecting problems instead of stopping at the first one."""
    root = Path(root).resolve()
    layout = check_layout_name(layout) or detect_layout(root)
    if layout == "nnunet":
        return _scan_nnunet(root)
    if layout in BRATS:
        return _scan_brats(root, BRATS[layout])
    raise ValueError("scan_dataset reads nnunet and BraTS folders; MSD folders go through load_dataset_json")


def load_dataset(root: Path, layout: str | None = None) -> DatasetIndex:
    """The dataset folder `root` as a DatasetIndex, in any layout (detected, or forced by `layout`:
    msd, nnunet, brats2021, brats2023). Every problem is a one-line UserError naming the file."""
    root = Path(root)
    layout = check_layout_name(layout) or detect_layout(root)
    if layout == "msd":
        return load_dataset_json(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected a {layout} dataset folder)")
    scan = scan_dataset(root, layout)
    scan.raise_first()
    assert scan.index is not None
    return scan.index


def kept_test_labels(index: DatasetIndex) -> Path | None:
    """`labelsTs/` beside the dataset (test labels kept aside by synth and convert), when present."""
    folder = index.root / TEST_LABELS
    return folder if folder.is_dir() else None


def _inside(root: Path, path: Path, problems: list[Problem]) -> bool:
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        problems.append(Problem(path, f"leaves the dataset folder (a symlink to {resolved})"))
        return False
    return True


# ---------------------------------------------------------------------------------------------
# nnU-Net v2 raw


def _nnunet_labels(value: Any) -> tuple[dict[int, str], dict[str, tuple[int, ...]] | None, list[str]]:
    """dataset.json `labels` -> ({value: name}, explicit regions for region-based labels or None, problems)."""
    if not isinstance(value, dict) or not value:
        return {}, None, ["'labels' must be a non-empty object like {\"background\": 0, \"edema\": 1}"]
    names: dict[int, str] = {}
    region_lists: dict[str, tuple[int, ...]] = {}
    problems = []
    for name, number in value.items():
        if isinstance(number, int) and not isinstance(number, bool) and 0 <= number <= 255:
            names.setdefault(number, name)
        elif (isinstance(number, list) and number
              and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in number)):
            region_lists[name] = tuple(sorted(set(number)))
        else:
            problems.append(f"'labels' entry {name!r}: {number!r} must be a label value 0..255 or a list of them")
    if not region_lists:
        return names, None, problems
    values = sorted({v for vs in region_lists.values() for v in vs} | set(names))
    regions: dict[str, tuple[int, ...]] = {}
    for name, vs in list(region_lists.items()) + [(n, (v,)) for v, n in names.items() if v != 0]:
        words = " " + re.sub(r"[^a-z]+", " ", name.lower()) + " "
        if "whole" in words or " wt " in words:
            regions.setdefault("WT", vs)
        elif "core" in words or " tc " in words:
            regions.setdefault("TC", vs)
        elif ("enhanc" in words and "non" not in words) or " et " in words:
            regions.setdefault("ET", vs)
    labels = {v: names.get(v, "background" if v == 0 else f"label {v}") for v in values}
    return labels, regions, problems


def _nnunet_group(folder: Path, ending: str, channels: int, root: Path, problems: list[Problem],
                  ) -> dict[str, dict[int, Path]]:
    """CASE -> {channel: path} for the `CASE_XXXX<ending>` files of an imagesTr/ or imagesTs/ folder."""
    cases: dict[str, dict[int, Path]] = {}
    if not folder.is_dir():
        return cases
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.name.endswith(ending):
            problems.append(Problem(path, f"not a {ending} file (dataset.json's file_ending); ignored", WARNING))
            continue
        match = NNUNET_CHANNEL.fullmatch(path.name[: -len(ending)])
        if not match:
            problems.append(Problem(path, f"not named CASE_XXXX{ending} (a case name and a 4-digit channel)"))
            continue
        channel = int(match.group(2))
        if channel >= channels:
            problems.append(Problem(path, f"channel {match.group(2)} but dataset.json's channel_names declares "
                                          f"{channels} channels (0000..{channels - 1:04d})"))
            continue
        if _inside(root, path, problems):
            cases.setdefault(match.group(1), {})[channel] = path
    return cases


def _nnunet_cases(grouped: dict[str, dict[int, Path]], folder: Path, ending: str, channels: int,
                  problems: list[Problem]) -> dict[str, tuple[Path, ...]]:
    complete = {}
    for case, files in grouped.items():
        missing = [c for c in range(channels) if c not in files]
        for c in missing:
            present = ", ".join(f"{k:04d}" for k in sorted(files))
            problems.append(Problem(folder / f"{case}_{c:04d}{ending}",
                                    f"missing: case {case} has channel files {present} but not {c:04d}"))
        if not missing:
            complete[case] = tuple(files[c] for c in range(channels))
    return complete


def _scan_nnunet(root: Path) -> Scan:
    problems: list[Problem] = []
    json_path = root / DATASET_JSON
    try:
        raw = read_dataset_json(root)
    except UserError as error:
        return Scan(None, [Problem(json_path, str(error).removeprefix(f"{json_path}: "))])
    for key in ("channel_names", "labels", "file_ending"):
        if key not in raw:
            problems.append(Problem(json_path, f"missing key '{key}' (an nnU-Net v2 dataset.json)"))
    channel_names: dict[int, str] = {}
    if "channel_names" in raw:
        names, found = numbered_names(raw["channel_names"], "channel_names")
        problems += [Problem(json_path, p) for p in found]
        if names and sorted(names) != list(range(len(names))):
            problems.append(Problem(json_path, f"'channel_names' keys must be 0..{len(names) - 1}, got {sorted(names)}"))
        elif names:
            channel_names = names
    labels, explicit_regions, found = _nnunet_labels(raw.get("labels")) if "labels" in raw else ({}, None, [])
    problems += [Problem(json_path, p) for p in found]
    ending = raw.get("file_ending", ".nii.gz")
    if not isinstance(ending, str) or not ending.startswith("."):
        problems.append(Problem(json_path, f"'file_ending' must be a string like \".nii.gz\", got {ending!r}"))
        ending = ".nii.gz"
    elif ending not in (".nii.gz", ".nii"):
        problems.append(Problem(json_path, f"'file_ending' {ending!r}: fullres reads NIfTI (.nii.gz or .nii)"))
    if "numTraining" in raw and (not isinstance(raw["numTraining"], int) or isinstance(raw["numTraining"], bool)):
        problems.append(Problem(json_path, f"'numTraining' must be an integer, got {raw['numTraining']!r}"))
    if not channel_names:
        return Scan(None, problems)
    channels = len(channel_names)
    images_tr, labels_tr = root / "imagesTr", root / "labelsTr"
    if not images_tr.is_dir():
        problems.append(Problem(images_tr, "folder not found (an nnU-Net dataset has imagesTr/ and labelsTr/)"))
    grouped = _nnunet_group(images_tr, ending, channels, root, problems)
    train_files = _nnunet_cases(grouped, images_tr, ending, channels, problems)
    training = []
    for case in sorted(train_files):
        label = labels_tr / f"{case}{ending}"
        if not label.is_file():
            problems.append(Problem(label, f"missing: training case {case} has no label"))
        elif _inside(root, label, problems):
            training.append(TrainingCase(case, train_files[case], label))
    if labels_tr.is_dir():
        for path in sorted(labels_tr.iterdir()):
            if path.name.endswith(ending) and path.name[: -len(ending)] not in grouped \
                    and not path.name.startswith("."):
                case = path.name[: -len(ending)]
                problems.append(Problem(path, f"label of case {case}, which has no images in imagesTr/"))
    n_cases = len(grouped)
    if isinstance(raw.get("numTraining"), int) and raw["numTraining"] != n_cases:
        problems.append(Problem(json_path, f"'numTraining' is {raw['numTraining']} but imagesTr/ holds {n_cases} cases"))
    images_ts = root / "imagesTs"
    test_files = _nnunet_cases(_nnunet_group(images_ts, ending, channels, root, problems), images_ts, ending,
                               channels, problems)
    test = [TestCase(case, test_files[case]) for case in sorted(test_files)]
    regions = explicit_regions if explicit_regions else brats_regions(labels)
    index = DatasetIndex(root=root, modalities=tuple(channel_names[i] for i in range(channels)),
                         labels=dict(sorted(labels.items())), training=tuple(training), test=tuple(test),
                         name=str(raw.get("name", "")), layout="nnunet", region_map=regions)
    return Scan(index, problems)


# ---------------------------------------------------------------------------------------------
# BraTS 2021 / 2023


def _brats_file(folder: Path, spec: BratsSpec, part: str) -> Path:
    """The case's file for `part` (.nii.gz, or .nii when only that exists)."""
    gz = folder / spec.file(folder.name, part)
    plain = folder / spec.file(folder.name, part, ".nii")
    return plain if not gz.exists() and plain.exists() else gz


def _brats_case_folders(folder: Path, spec: BratsSpec) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and spec.folder.fullmatch(entry.name))


def _scan_brats(root: Path, spec: BratsSpec) -> Scan:
    problems: list[Problem] = []
    training, test = [], []
    top = _brats_case_folders(root, spec)
    labelled = any(_brats_file(case, spec, BRATS_SEG).exists() for case in top)
    for where, folders in (("root", top), ("test", _brats_case_folders(root / BRATS_TEST_FOLDER, spec))):
        for case_folder in folders:
            if not _inside(root, case_folder, problems):
                continue
            images, complete = [], True
            for part in spec.modalities:
                path = _brats_file(case_folder, spec, part)
                if not path.exists():
                    problems.append(Problem(path, f"missing: case {case_folder.name} has no {part} image"))
                    complete = False
                elif _inside(root, path, problems):
                    images.append(path)
                else:
                    complete = False
            label = _brats_file(case_folder, spec, BRATS_SEG)
            is_training = where == "root" and labelled
            if is_training and not label.exists():
                problems.append(Problem(label, f"missing: case {case_folder.name} has no label in a training "
                                               f"folder (other cases here have their {BRATS_SEG} file)"))
                complete = False
            if not complete:
                continue
            if is_training:
                if _inside(root, label, problems):
                    training.append(TrainingCase(case_folder.name, tuple(images), label))
            else:
                test.append(TestCase(case_folder.name, tuple(images)))
    if not top and not test:
        problems.append(Problem(root, f"no {spec.title} case folders (like {spec.id_format.format(1)}/) here"))
    index = DatasetIndex(root=root, modalities=spec.modalities, labels=dict(spec.labels), training=tuple(training),
                         test=tuple(test), name=root.name, layout=spec.name, region_map=dict(spec.regions))
    return Scan(index, problems)


def brats_case_spec(folder: Path, layout: str | None = None) -> BratsSpec | None:
    """The BraTS layout of `folder` when it is one case folder (named like BraTS2021_00001/ or
    BraTS-GLI-00001-000/ and holding at least one of that case's files), else None. `layout` forces one."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    specs = [BRATS[layout]] if layout in BRATS else [] if layout is not None else list(BRATS.values())
    for spec in specs:
        if spec.folder.fullmatch(folder.name) and any(
                _brats_file(folder, spec, part).exists() for part in (*spec.modalities, BRATS_SEG)):
            return spec
    return None


def load_case_folder(folder: Path, layout: str | None = None) -> DatasetIndex:
    """One BraTS case folder as a one-case DatasetIndex rooted at the folder: a training case when its seg
    file is there, else a test case; channels in the layout's modality order. UserError naming the
    missing file, or the folder when it is no BraTS case folder."""
    folder = Path(folder).resolve()
    spec = brats_case_spec(folder, layout)
    if spec is None:
        raise UserError(f"{folder}: not a BraTS case folder (like BraTS2021_00001/ with its "
                        "BraTS2021_00001_flair.nii.gz, _t1, _t1ce, _t2 files)")
    images = []
    for part in spec.modalities:
        path = _brats_file(folder, spec, part)
        if not path.is_file():
            raise UserError(f"{path}: missing: case {folder.name} has no {part} image")
        images.append(path)
    label = _brats_file(folder, spec, BRATS_SEG)
    case = folder.name
    training = (TrainingCase(case, tuple(images), label),) if label.is_file() else ()
    test = () if training else (TestCase(case, tuple(images)),)
    return DatasetIndex(root=folder, modalities=spec.modalities, labels=dict(spec.labels), training=training,
                        test=test, name=case, layout=spec.name, region_map=dict(spec.regions))


def is_dataset_folder(folder: Path, layout: str | None = None) -> bool:
    """Whether `folder` is a dataset folder (a dataset.json, or BraTS case folders) rather than a flat
    folder of images or label maps; `layout` given: always."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return layout is not None or (folder / DATASET_JSON).exists() or detect_layout(folder) != "msd"


def dataset_labels(index: DatasetIndex) -> dict[str, Path]:
    """{case id: label map} of every case of `index` that has one: the training cases' labels, the test
    labels kept aside in labelsTs/ (CASE.nii.gz), and seg files beside BraTS test cases' images."""
    found = {case.case_id: Path(case.label) for case in index.training}
    kept = kept_test_labels(index)
    spec = BRATS.get(index.layout)
    for case in index.test:
        if case.case_id in found:
            continue
        candidates = []
        if kept is not None:
            candidates += [kept / f"{case.case_id}.nii.gz", kept / f"{case.case_id}.nii"]
        if spec is not None:
            first = case.image[0] if isinstance(case.image, tuple) else Path(case.image)
            candidates.append(_brats_file(Path(first).parent, spec, BRATS_SEG))
        label = next((path for path in candidates if path.is_file()), None)
        if label is not None:
            found[case.case_id] = label
    return found


# ---------------------------------------------------------------------------------------------
# which label values a folder of label maps uses (for `evaluate`)


def regions_for_layout(layout: str, labels_dir: Path | None = None) -> dict[str, tuple[int, ...]]:
    """WT / TC / ET of `layout`. nnU-Net's depend on its dataset.json: read from the dataset that holds
    `labels_dir` (DATA/labelsTr or DATA/labelsTs) when there is one, else fullres's nnU-Net values (as MSD)."""
    check_layout_name(layout)
    if layout in BRATS:
        return dict(BRATS[layout].regions)
    if labels_dir is not None and (Path(labels_dir).parent / DATASET_JSON).exists():
        try:
            index = load_dataset(Path(labels_dir).parent, layout)
            return index.regions
        except UserError:
            pass
    return dict(MSD_REGIONS)


def detect_label_regions(labels_dir: Path) -> tuple[str, dict[str, tuple[int, ...]]] | None:
    """(layout, regions) for a folder of label maps: the dataset that holds it (DATA/labelsTr, DATA/labelsTs),
    else the BraTS case names of its files; None when nothing tells."""
    labels_dir = Path(labels_dir)
    parent = labels_dir.parent
    if labels_dir.name in ("labelsTr", TEST_LABELS) and parent.is_dir():
        layout = detect_layout(parent)
        if layout != "msd" or (parent / DATASET_JSON).exists():
            try:
                return layout, load_dataset(parent, layout).regions
            except UserError:
                pass
    if labels_dir.is_dir():
        names = [p.name for p in labels_dir.iterdir()]
        for spec in BRATS.values():
            if any(spec.folder.match(name) for name in names):
                return spec.name, dict(spec.regions)
    return None
