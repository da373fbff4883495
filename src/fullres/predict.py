"""Predict masks with a trained run: the run's own preprocessing, layout and precision (as its validation ran),
whole volumes in one pass when they fit, and NIfTI masks written back in each input's original geometry
(crop/pad undone, same affine and header).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from torch import nn

from fullres.checkpoint import BEST, LAST, load_checkpoint
from fullres.config import TrainConfig
from fullres.data import load_case_image, load_dataset, uncrop, write_nifti
from fullres.data.layouts import MSD_REGIONS, apply_value_map, detect_layout, match_channels, value_map
from fullres.data.msd import DatasetIndex
from fullres.data.nifti import NIFTI_SUFFIXES, case_id_from_path
from fullres.device import available_memory
from fullres.errors import UserError
from fullres.files import write_json
from fullres.memory.table1 import table1
from fullres.model import build_model, check_divisible
from fullres.losses import primary_output
from fullres.step import autocast, prepare_model, to_device

SLIDING_WINDOW_OVERLAP = 0.5


@dataclass(frozen=True)
class Predictor:
    model: nn.Module
    config: TrainConfig
    checkpoint: Path


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


def load_predictor(run_or_checkpoint: Path, device: torch.device) -> Predictor:
    checkpoint = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(checkpoint)  # weights_only=True
    try:
        config = TrainConfig.from_json(state["config"])
    except (KeyError, TypeError, ValueError) as error:
        raise UserError(f"{checkpoint}: the checkpoint holds no readable run configuration ({error})") from None
    model = build_model(config.job.model, config.job.shape)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError) as error:  # weights of another network than its config describes
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{checkpoint}: its weights do not fit the network its configuration describes "
                        f"({detail[:200]})") from None
    return Predictor(prepare_model(model.to(device).eval(), inference_strategy(config)), config, checkpoint)


def inference_strategy(config: TrainConfig):
    """The run's layout and precision, as its validation passes ran; checkpointing and accumulation only
    act on training, and slabs stay off (inference memory is judged by `forward_bytes` for whole volumes)."""
    return replace(config.job.strategy, checkpointing=False, accumulate=1, slabs=1)


@dataclass(frozen=True)
class PredictInput:
    """One case to predict: its id (the mask's file name), its image (one file, or one 3D file per
    channel), and the dataset folder it came from (its layout, modality names and label values), if any."""

    case_id: str
    image: Path | tuple[Path, ...]
    index: DatasetIndex | None = None


def expand_inputs(inputs: list[str], layout: str | None = None) -> list[PredictInput]:
    """NIfTI files as given; a folder: a dataset's test cases in any layout (MSD: dataset.json's test list;
    nnU-Net: imagesTs/; BraTS: case folders without a seg file, or in test/), or else every NIfTI file in
    it (a folder without a dataset contributes its imagesTs/ when it has one). `layout` forces the folders'."""
    found_all: list[PredictInput] = []
    for item in map(Path, inputs):
        if item.is_dir():
            detected = layout or detect_layout(item)
            if layout is not None or (item / "dataset.json").exists() or detected != "msd":
                index = load_dataset(item, layout)
                found = [PredictInput(case.case_id, case.image, index) for case in index.test]
                if not found:
                    raise UserError(f"{item}: no test cases to predict in this {index.layout} dataset folder"
                                    + (" (case folders without a seg file, or in test/)"
                                       if index.layout.startswith("brats") else ""))
            else:
                folder = item / "imagesTs" if (item / "imagesTs").is_dir() else item
                found = [PredictInput(case_id_from_path(p), p) for p in sorted(folder.iterdir())
                         if p.name.endswith(NIFTI_SUFFIXES)]
            if not found:
                raise UserError(f"{item}: no NIfTI images to predict in this folder")
            found_all.extend(found)
        elif item.name.endswith(NIFTI_SUFFIXES):
            if not item.exists():
                raise UserError(f"{item}: no such file")
            found_all.append(PredictInput(case_id_from_path(item), item))
        else:
            raise UserError(f"{item}: not a NIfTI file (.nii or .nii.gz) nor a folder")
    return found_all


def training_dataset(config: TrainConfig) -> DatasetIndex | None:
    """The dataset the run trained on (its layout, modalities and label values), read from config.json's
    data_dir; None when that folder is gone or unreadable (MSD Task01 conventions are assumed then)."""
    try:
        return load_dataset(Path(config.data_dir), getattr(config, "layout", None))
    except (UserError, OSError):
        return None


def output_labels(labels: np.ndarray, target: str, trained: DatasetIndex | None,
                  regions: dict[str, tuple[int, ...]], same_dataset: bool) -> np.ndarray:
    """`labels_from_probabilities`' map in the output layout's values (`regions`: its WT/TC/ET).

    wt: {0, 1} as is. regions: 1/2/3 (edema/core/enhancing) become the layout's values for those roles.
    classes: class k is the training dataset's k-th label value, mapped by role into the output layout
    unless it is the training dataset's own layout.
    """
    if target == "wt":
        return labels
    if target == "regions":
        mapping = value_map(MSD_REGIONS, regions, range(4))
    else:
        values = sorted(trained.labels) if trained is not None else [0, 1, 2, 3]
        train_regions = trained.regions if trained is not None else MSD_REGIONS
        to_output = ({v: v for v in values} if same_dataset
                     else value_map(train_regions, regions, values))
        mapping = {k: to_output[v] for k, v in enumerate(values)}
    if all(k == v for k, v in mapping.items()):
        return labels
    return apply_value_map(labels, mapping, "prediction")


def forward_bytes(config: TrainConfig) -> int:
    """Inference memory for one whole volume: every layer's output once (Table 1 without the training double)."""
    return table1(config.job.model, config.job.shape, 1).params * 4


def predict_volume(predictor: Predictor, image: np.ndarray, device: torch.device, whole: bool) -> np.ndarray:
    """Probabilities [K, H, W, D] for one preprocessed image [C, H, W, D]: in one pass, or sliding windows
    of the training shape with 50 % overlap and Gaussian blending (MONAI's sliding_window_inference)."""
    strategy = inference_strategy(predictor.config)

    def forward(volume: torch.Tensor) -> torch.Tensor:
        with autocast(strategy, device.type):
            return primary_output(predictor.model(to_device(volume, device, strategy))).float()

    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    with torch.no_grad():
        if whole:
            logits = forward(x)
        else:
            from monai.inferers import sliding_window_inference

            logits = sliding_window_inference(x, roi_size=predictor.config.job.shape, sw_batch_size=1,
                                              predictor=forward, overlap=SLIDING_WINDOW_OVERLAP,
                                              mode="gaussian")
    logits = logits[0].float()
    probabilities = torch.sigmoid(logits) if predictor.config.data.target != "classes" else torch.softmax(logits, 0)
    return probabilities.cpu().numpy()


def labels_from_probabilities(probabilities: np.ndarray, target: str, threshold: float = 0.5) -> np.ndarray:
    """The label map to save. wt: {0, 1} whole tumour. regions (WT, TC, ET channels): BraTS's nesting
    ET -> 3, TC without ET -> 2, WT without TC -> 1. classes: the most probable label."""
    if target == "wt":
        return (probabilities[0] > threshold).astype(np.uint8)
    if target == "regions":
        wt, tc, et = (probabilities > threshold)
        labels = np.zeros(wt.shape, np.uint8)
        labels[wt] = 1
        labels[wt & tc] = 2
        labels[wt & tc & et] = 3
        return labels
    return probabilities.argmax(0).astype(np.uint8)


def output_paths(out: Path, cases: list[PredictInput], probabilities: bool) -> list[Path]:
    """Every file `predict_files` writes in `out`: each case's mask (and probabilities), then prediction.json."""
    names = [f"{case.case_id}.nii.gz" for case in cases]
    names += [f"{case.case_id}_prob.nii.gz" for case in cases] if probabilities else []
    return [out / name for name in names] + [out / "prediction.json"]


def check_output_folder(out: Path, cases: list[PredictInput], inputs: list[str], probabilities: bool,
                        overwrite: bool) -> None:
    """Refuse, before any work, an `out` that would lose a file: a file in its place, a folder holding any
    input (never, even with `overwrite`), or masks already there that an earlier `predict` did not write
    (its prediction.json lists its own) unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file: give a folder for the masks")
    if not out.is_dir():
        return
    here = out.resolve()
    for case in cases:
        for path in (case.image if isinstance(case.image, tuple) else (case.image,)):
            if Path(path).resolve().parent == here:
                raise UserError(f"--out {out} holds the input {path}: write the masks to another folder")
    for item in map(Path, inputs):
        if item.is_dir() and item.resolve() == here:
            raise UserError(f"--out {out} is the input folder {item}: write the masks to another folder")
    if overwrite:
        return
    own: set[str] = set()
    try:  # what an earlier predict wrote here may be replaced
        info = json.loads((out / "prediction.json").read_text())
        listed = [str(name) for name in info.get("cases", [])]
        own = {"prediction.json", *listed, *(name.replace(".nii.gz", "_prob.nii.gz") for name in listed)}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    for path in output_paths(out, cases, probabilities):
        if (path.exists() or path.is_symlink()) and path.name not in own:
            raise UserError(f"--out {out}: {path.name} exists and was not written by fullres predict; "
                            "choose another folder, or --overwrite")


def load_input(case: PredictInput, config: TrainConfig, trained: DatasetIndex | None):
    """One case read and preprocessed as the run expects: (image, crop box, source image). Raises UserError
    naming the file when it is unreadable, has the wrong channels or non-finite voxels, or a shape the
    network cannot take."""
    data = config.data
    if case.index is not None and trained is not None and case.index.modalities != trained.modalities:
        data = replace(data, channels=match_channels(trained.modalities, data.channels, case.index.modalities))
    image, box, source = load_case_image(case.image, data, case_id=case.case_id)
    if not np.isfinite(image).all():  # a NaN would silently become an empty mask: count them in the file
        for path in (case.image if isinstance(case.image, tuple) else (case.image,)):
            raw = np.asanyarray(nib.load(path).dataobj)
            bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
            if bad:
                raise UserError(f"{path}: {bad} voxels are NaN or infinite; fix the image (fullres predicts no "
                                "mask from them)")
    check_divisible(config.job.model, image.shape[1:])
    return image, box, source


def predict_files(run_or_checkpoint: Path, inputs: list[str], out: Path, device: torch.device,
                  probabilities: bool = False, progress: bool = True, log=print, layout: str | None = None,
                  overwrite: bool = False) -> list[Path]:
    """Predict every input, writing OUT/<case>.nii.gz (and OUT/<case>_prob.nii.gz). Returns the mask paths.

    Nothing is written until every input has been read and checked (readable, the run's channels, finite,
    a shape the network takes), and each file is written atomically; `out` must not hold an input, and a
    file there that an earlier predict did not write is replaced only with `overwrite`.
    A dataset folder's cases are named and valued in its own layout (BraTS 2021: BraTS2021_XXXXX.nii.gz with
    0/1/2/4); loose files in the training dataset's layout. Channels are matched by modality name.
    """
    from tqdm import tqdm

    cases = expand_inputs(inputs, layout)  # check every input before the first (long) prediction
    check_output_folder(out, cases, inputs, probabilities, overwrite)
    predictor = load_predictor(run_or_checkpoint, device)
    config = predictor.config
    trained = training_dataset(config)
    for case in cases:
        load_input(case, config, trained)  # every input readable and usable before the first mask is written
    need, have = forward_bytes(config), available_memory(device)
    whole = need <= have
    log(f"predicting {len(cases)} case(s) with {predictor.checkpoint} "
        + ("as whole volumes in one pass" if whole else
           f"with sliding windows of {config.job.shape} (a whole volume needs ~{need / 1e9:.1f} GB, {have / 1e9:.1f} GB free)"))
    out.mkdir(parents=True, exist_ok=True)
    written, layouts, region_sets = [], set(), []
    for case in tqdm(cases, desc="predict", disable=not progress):
        source_index = case.index or trained
        regions = source_index.regions if source_index is not None else dict(MSD_REGIONS)
        image, box, source = load_input(case, config, trained)
        probs = predict_volume(predictor, image, device, whole)
        same = trained is not None and source_index is not None and source_index.root == trained.root
        labels = output_labels(labels_from_probabilities(probs, config.data.target), config.data.target, trained,
                               regions, same or source_index is None)
        labels = uncrop(labels, box)
        mask_path = out / f"{case.case_id}.nii.gz"
        write_nifti(mask_path, labels, source.affine, source.header)
        if probabilities:
            restored = np.stack([uncrop(p, box) for p in probs], axis=-1).astype(np.float32)
            write_nifti(out / f"{case.case_id}_prob.nii.gz", restored if restored.shape[-1] > 1 else restored[..., 0],
                        source.affine, source.header)
        written.append(mask_path)
        layouts.add(source_index.layout if source_index is not None else "msd")
        if regions not in region_sets:
            region_sets.append(regions)
    info = {"checkpoint": str(predictor.checkpoint), "target": config.data.target,
            "cases": [p.name for p in written],
            "layout": layouts.pop() if len(layouts) == 1 else "mixed"}
    if len(region_sets) == 1:  # the label values of the masks' (and their truths') WT / TC / ET, for `evaluate`
        info["regions"] = {name: list(values) for name, values in region_sets[0].items()}
    write_json(out / "prediction.json", info)
    return written
