"""A Medical Segmentation Decathlon folder: dataset.json, channel choice, BraTS regions, the torch Dataset.

Layout (Task01_BrainTumour):  dataset.json, imagesTr/*.nii.gz (4D, H x W x D x modalities),
labelsTr/*.nii.gz (3D integer labels), imagesTs/*.nii.gz. dataset.json's `training` holds
{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"} objects; `test` holds plain paths.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fullres.data.cache import default_cache_dir, load_training_arrays
from fullres.data.nifti import case_id_from_path
from fullres.data.preprocess import REGION_NAMES, DataConfig, make_target
from fullres.errors import UserError

DATASET_JSON = "dataset.json"


class TrainingCase(NamedTuple):
    case_id: str
    image: Path | tuple[Path, ...]  # one 4D file (MSD), or one 3D file per channel (nnU-Net, BraTS)
    label: Path


class TestCase(NamedTuple):
    case_id: str
    image: Path | tuple[Path, ...]


def image_files(image: Path | str | Sequence) -> tuple[Path, ...]:
    """The files of a case's image: (the 4D file,) or the per-channel 3D files in channel order."""
    if isinstance(image, (str, os.PathLike)):
        return (Path(image),)
    return tuple(Path(p) for p in image)


def as_image_source(image: Path | str | Sequence) -> Path | tuple[Path, ...]:
    """A Path for one file, a tuple of Paths for per-channel files."""
    files = image_files(image)
    return files[0] if isinstance(image, (str, os.PathLike)) else files


@dataclass(frozen=True)
class DatasetIndex:
    """dataset.json, resolved: absolute paths that are guaranteed to lie inside `root`."""

    root: Path
    modalities: tuple[str, ...]  # channel names in channel order, e.g. ("FLAIR", "T1w", "t1gd", "T2w")
    labels: dict[int, str]  # {0: "background", 1: "edema", ...}
    training: tuple[TrainingCase, ...]
    test: tuple[TestCase, ...]
    name: str = ""
    layout: str = "msd"  # msd, nnunet, brats2021, brats2023 (see fullres.data.layouts)
    region_map: Mapping[str, tuple[int, ...]] | None = None  # WT/TC/ET label values; None: from the label names

    @property
    def regions(self) -> dict[str, tuple[int, ...]]:
        """The BraTS regions WT / TC / ET in this dataset's label values."""
        if self.region_map is not None:
            return {name: tuple(values) for name, values in self.region_map.items()}
        return brats_regions(self.labels)


# ---------------------------------------------------------------------------------------------
# dataset.json


def read_dataset_json(root: Path) -> dict[str, Any]:
    """The parsed dataset.json of `root`; a one-line UserError when it is missing or not a JSON object."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected an MSD dataset folder with a {DATASET_JSON})")
    path = root / DATASET_JSON
    if not path.is_file():
        raise UserError(f"{path}: not found (an MSD dataset folder has a {DATASET_JSON} next to imagesTr/ and labelsTr/)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: unreadable ({error})") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a dataset description") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object at the top level, got {type(raw).__name__}")
    return raw


def numbered_names(value: Any, key: str) -> tuple[dict[int, str] | None, list[str]]:
    """{"0": "FLAIR", ...} -> {0: "FLAIR", ...}, or the problems that prevent it."""
    if not isinstance(value, dict) or not value:
        return None, [f"'{key}' must be a non-empty object like {{\"0\": \"name\"}}"]
    names, problems = {}, []
    for number, name in value.items():
        if not (isinstance(number, str) and number.isdigit()) or not isinstance(name, str):
            problems.append(f"'{key}' entry {number!r}: {name!r} must map a number to a name")
        else:
            names[int(number)] = name
    return names, problems


def dataset_json_problems(raw: Mapping[str, Any]) -> list[str]:
    """Everything structurally wrong with a parsed dataset.json (missing keys, wrong types), as messages."""
    problems = []
    for key in ("modality", "labels", "training"):
        if key not in raw:
            problems.append(f"missing key '{key}'")
    if "modality" in raw:
        modalities, found = numbered_names(raw["modality"], "modality")
        problems += found
        if modalities and sorted(modalities) != list(range(len(modalities))):
            problems.append(f"'modality' keys must be 0..{len(modalities) - 1}, got {sorted(modalities)}")
    if "labels" in raw:
        problems += numbered_names(raw["labels"], "labels")[1]
    if "training" in raw:
        if not isinstance(raw["training"], list):
            problems.append("'training' must be a list of {\"image\": ..., \"label\": ...} objects")
        else:
            for i, entry in enumerate(raw["training"]):
                if not (isinstance(entry, dict) and isinstance(entry.get("image"), str)
                        and isinstance(entry.get("label"), str)):
                    problems.append(f"training[{i}] must be an object with 'image' and 'label' paths, got {entry!r}")
    if "test" in raw:
        if not isinstance(raw["test"], list):
            problems.append("'test' must be a list of image paths")
        else:
            for i, entry in enumerate(raw["test"]):
                if not isinstance(entry, str):
                    problems.append(f"test[{i}] must be an image path string, got {entry!r}")
    for key in ("numTraining", "numTest"):
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool)):
            problems.append(f"'{key}' must be an integer, got {raw[key]!r}")
    return problems


def resolve_entry(root: Path, entry: str, where: str) -> Path:
    """`root / entry`, refusing anything that leaves the dataset folder (absolute, '..', outward symlink).

    `where` names the entry in messages, e.g. "training[3].image".
    """
    root = Path(root).resolve()
    source = f"{root / DATASET_JSON}: {where} {entry!r}"
    relative = PurePosixPath(entry.replace("\\", "/"))
    if relative.is_absolute() or PureWindowsPath(entry).drive:
        raise UserError(f"{source} is an absolute path; paths must be relative to the dataset folder")
    if ".." in relative.parts:
        raise UserError(f"{source} leaves the dataset folder ('..' is not allowed)")
    if not relative.parts:
        raise UserError(f"{source} is empty")
    path = root.joinpath(*relative.parts)
    if not path.resolve().is_relative_to(root):
        raise UserError(f"{source} leaves the dataset folder (a symlink to {path.resolve()})")
    return path


def load_dataset_json(root: Path) -> DatasetIndex:
    """Read `root/dataset.json` into a DatasetIndex. Every problem is a UserError naming dataset.json.

    Only dataset.json is read here; `check_dataset` also opens every listed file.
    """
    root = Path(root).resolve()
    raw = read_dataset_json(root)
    problems = dataset_json_problems(raw)
    if problems:
        more = f" (and {len(problems) - 1} more problems; run `fullres check {root}`)" if len(problems) > 1 else ""
        raise UserError(f"{root / DATASET_JSON}: {problems[0]}{more}")
    modalities = numbered_names(raw["modality"], "modality")[0]
    labels = numbered_names(raw["labels"], "labels")[0]
    training = tuple(
        TrainingCase(case_id_from_path(entry["image"]),
                     resolve_entry(root, entry["image"], f"training[{i}].image"),
                     resolve_entry(root, entry["label"], f"training[{i}].label"))
        for i, entry in enumerate(raw["training"]))
    test = tuple(TestCase(case_id_from_path(entry), resolve_entry(root, entry, f"test[{i}]"))
                 for i, entry in enumerate(raw.get("test", [])))
    return DatasetIndex(root=root, modalities=tuple(modalities[i] for i in sorted(modalities)),
                        labels=dict(sorted(labels.items())), training=training, test=test,
                        name=str(raw.get("name", "")))


# ---------------------------------------------------------------------------------------------
# channels and regions


def resolve_channels(spec: str | int, modality_names: Sequence[str]) -> tuple[int, ...]:
    """The channel indices that a `--channels` value selects.

    "4" (a lone number N): the first N modalities in dataset order ("1" is FLAIR alone in MSD Task01);
    "all": every modality; otherwise a comma list of names (case-insensitive, or another layout's name for the
    same modality: t2f = FLAIR, t1ce = T1gd) or indices: "flair,T2w", "0,3".
    """
    names = list(modality_names)
    available = ", ".join(f"{i}={name}" for i, name in enumerate(names))
    text = str(spec).strip()

    def bad(why: str) -> UserError:
        return UserError(f"--channels {text!r}: {why}; available: {available} "
                         "(give a count N for the first N, 'all', or a comma list of names or indices)")

    if text.lower() == "all":
        return tuple(range(len(names)))
    if text.isdigit():
        count = int(text)
        if not 1 <= count <= len(names):
            raise bad(f"a lone number N means the first N modalities, so N must be 1..{len(names)}")
        return tuple(range(count))
    lowered = [name.lower() for name in names]
    chosen: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if item.isdigit() and int(item) < len(names):
            index = int(item)
        elif item.lower() in lowered:
            index = lowered.index(item.lower())
        elif _alias_index(item, names) is not None:
            index = _alias_index(item, names)
        else:
            raise bad(f"unknown channel {item!r}")
        if index in chosen:
            raise bad(f"channel {item!r} is given twice")
        chosen.append(index)
    return tuple(chosen)


MODALITY_ALIASES = {  # the same modality across layouts (fullres.data.layouts.canonical_modality)
    "flair": "FLAIR", "t2f": "FLAIR", "t2flair": "FLAIR",
    "t1": "T1", "t1n": "T1", "t1w": "T1", "t1native": "T1",
    "t1c": "T1c", "t1ce": "T1c", "t1gd": "T1c", "t1gad": "T1c", "t1wce": "T1c", "t1contrast": "T1c",
    "t2": "T2", "t2w": "T2",
}


def canonical_modality(name: str) -> str | None:
    """'t2f', 'FLAIR', 'flair' -> 'FLAIR'; 'T1w', 't1n', 't1' -> 'T1'; 'T1gd', 't1ce', 't1c' -> 'T1c';
    'T2w', 't2' -> 'T2'; None for any other name."""
    return MODALITY_ALIASES.get(re.sub(r"[^a-z0-9]", "", str(name).lower()))


def _alias_index(item: str, names: Sequence[str]) -> int | None:
    """The index of the modality that `item` names under another layout's name (t2f = FLAIR, t1ce = T1gd...)."""
    key = canonical_modality(item)
    if key is None:
        return None
    hits = [i for i, name in enumerate(names) if canonical_modality(name) == key]
    return hits[0] if len(hits) == 1 else None


def _words(name: str) -> str:
    return " " + re.sub(r"[^a-z]+", " ", name.lower()) + " "


def _is_edema(name: str) -> bool:
    words = _words(name)
    return "edema" in words or "oedema" in words or " ed " in words


def _is_enhancing(name: str) -> bool:
    """'enhancing tumour' or 'ET', but not 'non-enhancing tumor' / 'NET'."""
    words = _words(name)
    non_enhancing = re.search(r" non ?enhanc", words) is not None
    return (("enhanc" in words and not non_enhancing) or " et " in words) and " net " not in words


def _is_tumour_core(name: str) -> bool:
    """Necrotic / non-enhancing / enhancing tumour: every tumour label except edema."""
    words = _words(name)
    if _is_edema(name):
        return False
    return any(part in words for part in ("necro", "enhanc", "tumor", "tumour", "core", " ncr ", " net ", " et "))


def brats_regions(labels: Mapping[int, str]) -> dict[str, tuple[int, ...]]:
    """BraTS evaluation regions from dataset.json label names (never from a copied number mapping).

    WT = every non-background label; TC = tumour labels except edema; ET = "enhancing" but not
    "non-enhancing". MSD Task01 {1: edema, 2: non-enhancing tumor, 3: enhancing tumour} gives
    WT (1, 2, 3), TC (2, 3), ET (3,). Regions with no label are left out.
    """
    foreground = {value: name for value, name in sorted(labels.items())
                  if value != 0 and "background" not in name.lower()}
    regions = {
        "WT": tuple(foreground),
        "TC": tuple(v for v, name in foreground.items() if _is_tumour_core(name)),
        "ET": tuple(v for v, name in foreground.items() if _is_enhancing(name)),
    }
    return {region: values for region, values in regions.items() if values}


# ---------------------------------------------------------------------------------------------
# the torch Dataset, the split and the loader


class MSDDataset(Dataset):
    """Training cases as (image float32 [C, H, W, D], target) pairs, preprocessed once and then read
    from the memory-mapped cache.

    target: float32 [1, H, W, D] for "wt", float32 [3, H, W, D] (WT, TC, ET) for "regions" (needs
    `labels`, dataset.json's label names), int64 [H, W, D] for "classes".
    cache_dir: where the preprocessed cache lives; None = the default for the cases' dataset folder
    (see `default_cache_dir`). cache=False reads and preprocesses the NIfTI files on every access.
    Holds only paths and options, so it pickles into DataLoader worker processes.
    """

    def __init__(self, cases: Iterable[Sequence], config: DataConfig, labels: Mapping[int, str] | None = None,
                 cache_dir: Path | None = None, cache: bool = True,
                 regions: Mapping[str, Sequence[int]] | None = None) -> None:
        self.cases = [TrainingCase(str(c[0]), as_image_source(c[1]), Path(c[2])) for c in cases]
        self.config = config
        if regions is not None:
            self.regions = {name: tuple(int(v) for v in values) for name, values in regions.items()}
        else:
            self.regions = brats_regions(labels) if labels is not None else None
        if config.target == "regions" and (self.regions is None or set(self.regions) != set(REGION_NAMES)):
            found = ", ".join(self.regions or {}) or "none"
            raise UserError(f"target 'regions' needs WT, TC and ET from dataset.json's label names; found {found}")
        # target "classes": label values -> class indices 0..K-1 (identity for MSD's 0, 1, 2, 3; BraTS 2021's
        # 0, 1, 2, 4 become 0, 1, 2, 3)
        values = sorted(labels) if labels is not None else []
        self.class_table = None
        if values and values != list(range(len(values))) and max(values) < 256:
            table = np.zeros(256, dtype=np.uint8)
            table[values] = np.arange(len(values), dtype=np.uint8)
            self.class_table = table
        if not cache:
            self.cache_dir = None
        elif cache_dir is not None:
            self.cache_dir = Path(cache_dir)
        else:
            self.cache_dir = default_cache_dir(dataset_root_of(self.cases)) if self.cases else None

    @classmethod
    def from_index(cls, index: DatasetIndex, config: DataConfig, cases: Iterable[Sequence] | None = None,
                   cache_dir: Path | None = None) -> "MSDDataset":
        """All (or the given) training cases of `index`, with its label names, regions and default cache folder."""
        cases = index.training if cases is None else cases
        return cls(cases, config, labels=index.labels, cache_dir=cache_dir or default_cache_dir(index.root),
                   regions=index.regions if index.region_map is not None else None)

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        case = self.cases[i]
        image, label, _ = load_training_arrays(case.image, case.label, self.config, self.cache_dir, case.case_id)
        label = np.asarray(label)
        if self.config.target == "classes" and self.class_table is not None:
            label = self.class_table[label]
        target = make_target(label, self.config.target, self.regions)
        return torch.from_numpy(_in_memory(image)), torch.from_numpy(target)


def _in_memory(array: np.ndarray) -> np.ndarray:
    """A writable in-memory array: copies a read-only memory map (torch wants writable memory)."""
    return array if array.flags.writeable and not isinstance(array, np.memmap) else np.array(array)


def dataset_root_of(cases: Sequence[TrainingCase]) -> Path:
    """The folder that holds every image and label of `cases` (the dataset root for MSD layouts)."""
    folders = {str(Path(p).resolve().parent) for case in cases for p in (*image_files(case.image), case.label)}
    return Path(os.path.commonpath(sorted(folders)))


def split_cases(cases: Sequence, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded random `val_fraction` of the cases for validation, the rest for training.

    Same cases and seed -> same split. With val_fraction > 0 and at least 2 cases, each side gets at
    least one case. Both lists keep the input order.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"validation fraction must be in [0, 1), got {val_fraction}")
    cases = list(cases)
    n_val = round(len(cases) * val_fraction)
    if val_fraction > 0 and len(cases) >= 2:
        n_val = min(max(n_val, 1), len(cases) - 1)
    elif len(cases) < 2:
        n_val = 0
    val_indices = set(np.random.default_rng(seed).permutation(len(cases))[:n_val].tolist())
    train = [case for i, case in enumerate(cases) if i not in val_indices]
    val = [case for i, case in enumerate(cases) if i in val_indices]
    return train, val


def fold_splits(case_ids: Sequence[str], folds: int, seed: int) -> list[dict[str, list[str]]]:
    """`folds` (K >= 2) cross-validation splits, nnU-Net style: [{"train": [...], "val": [...]}, ...], fold i
    validating on the i-th of K near-equal parts of the case ids (sorted, then shuffled by `seed`); every
    case is validated in exactly one fold. Same ids (in any order) and seed -> same splits; each list sorted.
    UserError when there are fewer cases than folds."""
    ids = sorted(set(case_ids))
    if folds < 2:
        raise UserError(f"--folds must be at least 2, got {folds}")
    if len(ids) < folds:
        raise UserError(f"--folds {folds}: the dataset has {len(ids)} training case(s); each fold needs one to "
                        "validate on (fewer folds, or more cases)")
    order = np.random.default_rng(seed).permutation(len(ids))
    parts = [sorted(ids[i] for i in part) for part in np.array_split(order, folds)]
    return [{"train": sorted(c for j, part in enumerate(parts) if j != i for c in part), "val": parts[i]}
            for i in range(folds)]


def make_loader(dataset: Dataset, batch: int, shuffle: bool, workers: int, seed: int, device_type: str) -> DataLoader:
    """A DataLoader with a seeded shuffle order, persistent workers, and pinned memory only for CUDA."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle, num_workers=workers, generator=generator,
                      pin_memory=device_type == "cuda", persistent_workers=workers > 0)
