"""Predict masks with a trained run: the run's own preprocessing, layout and precision (as its validation ran),
whole volumes in one pass when they fit, and NIfTI masks written back in each input's original geometry
(crop/pad undone, same affine and header).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from torch import nn

from fullres.checkpoint import BEST, LAST, load_checkpoint
from fullres.config import TrainConfig
from fullres.data import load_case_image, load_dataset_json, uncrop, write_nifti
from fullres.data.nifti import NIFTI_SUFFIXES, case_id_from_path
from fullres.device import available_memory
from fullres.errors import UserError
from fullres.files import write_json
from fullres.memory.table1 import table1
from fullres.model import build_model, validate_spatial_shape
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
    model = build_model(config.job.model)
    model.load_state_dict(state["model"])
    return Predictor(prepare_model(model.to(device).eval(), inference_strategy(config)), config, checkpoint)


def inference_strategy(config: TrainConfig):
    """The run's layout and precision, as its validation passes ran; checkpointing and accumulation only
    act on training, and slabs stay off (inference memory is judged by `forward_bytes` for whole volumes)."""
    return replace(config.job.strategy, checkpointing=False, accumulate=1, slabs=1)


def expand_inputs(inputs: list[str]) -> list[Path]:
    """NIfTI files as given; a folder: its dataset.json's test images, or else every NIfTI file in it
    (an MSD folder without a test list contributes its imagesTs/)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            if (item / "dataset.json").exists():
                index = load_dataset_json(item)
                found = [case.image for case in index.test]
            else:
                folder = item / "imagesTs" if (item / "imagesTs").is_dir() else item
                found = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
            if not found:
                raise UserError(f"{item}: no NIfTI images to predict in this folder")
            files.extend(found)
        elif item.name.endswith(NIFTI_SUFFIXES):
            if not item.exists():
                raise UserError(f"{item}: no such file")
            files.append(item)
        else:
            raise UserError(f"{item}: not a NIfTI file (.nii or .nii.gz) nor a folder")
    return files


def forward_bytes(config: TrainConfig) -> int:
    """Inference memory for one whole volume: every layer's output once (Table 1 without the training double)."""
    return table1(config.job.model, config.job.shape, 1).params * 4


def predict_volume(predictor: Predictor, image: np.ndarray, device: torch.device, whole: bool) -> np.ndarray:
    """Probabilities [K, H, W, D] for one preprocessed image [C, H, W, D]: in one pass, or sliding windows
    of the training shape with 50 % overlap and Gaussian blending (MONAI's sliding_window_inference)."""
    strategy = inference_strategy(predictor.config)

    def forward(volume: torch.Tensor) -> torch.Tensor:
        with autocast(strategy, device.type):
            return predictor.model(to_device(volume, device, strategy)).float()

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


def predict_files(run_or_checkpoint: Path, inputs: list[str], out: Path, device: torch.device,
                  probabilities: bool = False, progress: bool = True, log=print) -> list[Path]:
    """Predict every input, writing OUT/<case>.nii.gz (and OUT/<case>_prob.nii.gz). Returns the mask paths."""
    from tqdm import tqdm

    files = expand_inputs(inputs)  # check every input before the first (long) prediction
    predictor = load_predictor(run_or_checkpoint, device)
    config = predictor.config
    need, have = forward_bytes(config), available_memory(device)
    whole = need <= have
    log(f"predicting {len(files)} case(s) with {predictor.checkpoint} "
        + ("as whole volumes in one pass" if whole else
           f"with sliding windows of {config.job.shape} (a whole volume needs ~{need / 1e9:.1f} GB, {have / 1e9:.1f} GB free)"))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in tqdm(files, desc="predict", disable=not progress):
        image, box, source = load_case_image(path, config.data)
        validate_spatial_shape(image.shape[1:])
        probs = predict_volume(predictor, image, device, whole)
        labels = uncrop(labels_from_probabilities(probs, config.data.target), box)
        case = case_id_from_path(path)
        mask_path = out / f"{case}.nii.gz"
        write_nifti(mask_path, labels, source.affine, source.header)
        if probabilities:
            restored = np.stack([uncrop(p, box) for p in probs], axis=-1).astype(np.float32)
            write_nifti(out / f"{case}_prob.nii.gz", restored if restored.shape[-1] > 1 else restored[..., 0],
                        source.affine, source.header)
        written.append(mask_path)
    write_json(out / "prediction.json", {"checkpoint": str(predictor.checkpoint), "target": config.data.target,
                                         "cases": [p.name for p in written]})
    return written
