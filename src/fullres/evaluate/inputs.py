"""What `evaluate` scores against: the labels (a flat folder, or a dataset folder's labelled cases), the
label values of WT / TC / ET (--layout, the prediction.json `predict` wrote, the dataset), and whether the
predictions are whole-tumour masks."""

from __future__ import annotations

import json
from pathlib import Path

from fullres.data.layouts import (MSD_REGIONS, dataset_labels, detect_label_regions, is_dataset_folder, load_dataset,
                                  regions_for_layout)
from fullres.errors import UserError


def dataset_labels_of(labels: Path, layout: str | None):
    """(labels, dataset): for a dataset folder, {case id: label path} of its labelled cases and its index;
    for any other folder, the folder itself and None."""
    if not is_dataset_folder(labels):
        return labels, None
    index = load_dataset(labels, layout)
    found = dataset_labels(index)
    if not found:
        raise UserError(f"{labels}: this {index.layout} dataset folder has no label maps to score against")
    return found, index


def evaluation_regions(pred_dir: Path, labels_dir: Path, layout: str | None, dataset=None) -> tuple[str, dict]:
    """The label values of WT / TC / ET for scoring: --layout, else the prediction.json `predict` wrote,
    else `dataset`'s (the dataset folder given as LABELS), else the dataset holding LABELS (DATA/labelsTs)
    or BraTS case names in it, else MSD Task01's."""
    if layout is not None:
        return layout, dataset.regions if dataset is not None else regions_for_layout(layout, labels_dir)
    try:
        info = json.loads((pred_dir / "prediction.json").read_text())
        if isinstance(info.get("regions"), dict) and info["regions"]:
            return str(info.get("layout", "prediction.json")), {k: tuple(v) for k, v in info["regions"].items()}
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        pass
    if dataset is not None:
        return dataset.layout, dataset.regions
    found = detect_label_regions(labels_dir)
    return found if found is not None else ("msd", dict(MSD_REGIONS))


def predictions_are_binary(pred_dir: Path) -> bool:
    """A folder written by `fullres predict` for a whole-tumour run holds {0, 1} masks: evaluate WT only."""
    info = pred_dir / "prediction.json"
    try:
        return json.loads(info.read_text()).get("target") == "wt"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
