"""Predict masks with a trained run: the run's own preprocessing, layout and precision (as its validation ran),
an inference plan that fits the memory (:func:`plan_inference`: whole volume, whole volume in slabs, or
sliding windows, chosen by the dry run's inference peak; or, under torchrun with `--spatial S`, each volume
shared by S processes), through PyTorch or the run's exported ONNX / OpenVINO model (`--engine`), and
NIfTI masks of every voxel written back in each input's original geometry (padding undone, same affine and
header).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fullres.cost.dryrun import dryrun_inference
from fullres.cost.plan import check_spatial, refuse_process_count, slab_schedules
from fullres.data.cache import load_case_image
from fullres.data.layouts import (
    MSD_REGIONS,
    apply_value_map,
    brats_case_spec,
    is_dataset_folder,
    load_case_folder,
    load_dataset,
    match_channels,
    value_map,
)
from fullres.data.msd import DatasetIndex
from fullres.data.nifti import NIFTI_SUFFIXES, case_id_from_path, write_nifti
from fullres.data.preprocess import resample, uncrop
from fullres.engine.losses import primary_output
from fullres.engine.spatial import gather_rows, local_rows, mesh, space_of
from fullres.errors import UserError
from fullres.files import refuse_special, write_json
from fullres.job.config import JobConfig, Strategy, TrainConfig
from fullres.job.step import autocast, prepare_model, to_device, use_space
from fullres.kernels.device import Process, available_memory
from fullres.nets.registry import build_model, build_on_meta, check_divisible, model_spec, spatial_divisor
from fullres.run.checkpoint import (
    check_weights_fit,
    load_checkpoint,
    load_weights,
    open_run_config,
    resolve_checkpoint,
)
from fullres.run.export import activation_of, default_engine_file, open_engine
from fullres.run.versions import versions
from fullres.units import format_bytes

SLIDING_WINDOW_OVERLAP = 0.5  # of the window, on each axis (MONAI's sliding_window_inference, Gaussian weights)


@dataclass(frozen=True)
class Predictor:
    model: nn.Module
    config: TrainConfig
    checkpoint: Path


def load_predictor(run_or_checkpoint: Path, device: torch.device, trust_code: bool = False) -> Predictor:
    """The run's network with its weights, ready to predict on `device`. The checkpoint is loaded as data
    (weights_only, every field checked) and its network built only as :func:`fullres.run.trust.trusted_model`
    allows (`trust_code`: the user's own --trust-code); UserError in one line otherwise."""
    checkpoint = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(checkpoint)  # weights_only=True
    config = open_run_config(state, checkpoint, trust_code)
    try:
        check_weights_fit(build_on_meta(config.job.model, config.job.shape), state, checkpoint)
        model = build_model(config.job.model, config.job.shape)
    except ValueError as error:
        raise UserError(f"{checkpoint}: {error}") from None
    load_weights(model, state, checkpoint)
    return Predictor(prepare_model(model.to(device).eval(), inference_strategy(config)), config, checkpoint)


def inference_strategy(config: TrainConfig):
    """The run's layout and precision, as its validation passes ran; checkpointing and accumulation only
    act on training, and slabs start off at every level (:func:`plan_inference` turns them on when a whole
    volume does not fit)."""
    return replace(config.job.strategy.without_slabs(), checkpointing=False, checkpoint_levels=0, accumulate=1)


@dataclass(frozen=True)
class PredictInput:
    """One case to predict: its id (the mask's file name), its image (one file, or one 3D file per
    channel), and the dataset folder it came from (its layout, modality names and label values), if any."""

    case_id: str
    image: Path | tuple[Path, ...]
    index: DatasetIndex | None = None


CASE_CHOICES = ("test", "all")


def expand_inputs(inputs: list[str], layout: str | None = None, cases: str = "test") -> list[PredictInput]:
    """NIfTI files as given; a BraTS case folder (BraTS2021_00001/ with its modality files): that one case,
    channels named by its files; a dataset folder in any layout: its test cases (MSD: dataset.json's test
    list; nnU-Net: imagesTs/; BraTS: case folders without a seg file, or in test/), or with `cases` "all"
    every case, training ones included; any other folder: every NIfTI file in it (its imagesTs/ when it has
    one). `layout` forces the folders'. UserError in one line naming the input otherwise."""
    if cases not in CASE_CHOICES:
        raise UserError(f"--cases must be one of {', '.join(CASE_CHOICES)}, got {cases!r}")
    found_all: list[PredictInput] = []
    for item in map(Path, inputs):
        if item.is_dir() and brats_case_spec(item, layout) is not None:
            index = load_case_folder(item, layout)
            found = [PredictInput(case.case_id, case.image, index) for case in (*index.training, *index.test)]
        elif is_dataset_folder(item, layout):
            index = load_dataset(item, layout)
            chosen = (*index.training, *index.test) if cases == "all" else index.test
            found = [PredictInput(case.case_id, case.image, index) for case in chosen]
            if not found:
                raise UserError(f"{item}: no test cases to predict in this {index.layout} dataset folder"
                                + (" (case folders without a seg file, or in test/)"
                                   if index.layout.startswith("brats") else "")
                                + ("; --cases all predicts its training cases too" if index.training else ""))
        elif item.is_dir():
            folder = item / "imagesTs" if (item / "imagesTs").is_dir() else item
            found = [PredictInput(case_id_from_path(p), p) for p in sorted(folder.iterdir())
                     if p.name.endswith(NIFTI_SUFFIXES)]
            if not found:
                raise UserError(f"{item}: no NIfTI images to predict in this folder")
        elif item.name.endswith(NIFTI_SUFFIXES):
            if not item.exists():
                raise UserError(f"{item}: no such file")
            found = [PredictInput(case_id_from_path(item), item)]
        elif not item.exists():
            raise UserError(f"{item}: no such file or folder")
        else:
            raise UserError(f"{item}: not a NIfTI file (.nii or .nii.gz) nor a folder")
        found_all.extend(found)
    seen: dict[str, PredictInput] = {}
    names = {case.case_id for case in found_all}
    for case in found_all:  # with --probabilities, case "a_prob"'s mask would be case "a"'s probabilities
        if case.case_id.endswith("_prob") and case.case_id[:-5] in names:
            raise UserError(f"two inputs are named {case.case_id[:-5]} and {case.case_id}: the second's mask would be "
                            f"the first's {case.case_id}.nii.gz probabilities file (rename one)")
    for case in found_all:  # one mask per case name: a second would silently replace the first
        first = seen.setdefault(case.case_id, case)
        if first is not case:
            where = lambda c: c.image[0] if isinstance(c.image, tuple) else c.image  # noqa: E731
            raise UserError(f"two inputs are named {case.case_id}: {where(first)} and {where(case)}; their masks "
                            "would be one file (predict them into separate --out folders)")
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


@dataclass(frozen=True)
class InferencePlan:
    """How one volume is predicted: "whole" (one pass), "slabs" (one pass in slabs along H, exact: `slabs` is
    the full-resolution count, or one count per level, full resolution first), "spatial" (one pass shared by
    `spatial` processes, each computing its rows of every level, exact), or "sliding" (windows of `window`,
    overlapping by :data:`SLIDING_WINDOW_OVERLAP`, Gaussian-blended); `need` is the dry run's inference peak
    of that choice in bytes (one process's), `budget` the memory it had to fit, `reason` why it was chosen."""

    mode: str
    need: int
    budget: int
    reason: str
    slabs: int | tuple[int, ...] = 1
    window: tuple[int, int, int] | None = None
    spatial: int = 1

    @property
    def slab_counts(self) -> tuple[int, ...]:
        return strategy_with_slabs(Strategy(), self.slabs).slab_counts

    def describe(self) -> str:
        if self.mode == "whole":
            how = "whole volumes in one pass"
        elif self.mode == "slabs":
            counts = self.slab_counts
            how = ("whole volumes in one pass of " + (f"{counts[0]} slabs" if len(counts) == 1 else
                   f"slabs {','.join(map(str, counts))} per level") + " (exact)")
        elif self.mode == "spatial":
            how = f"whole volumes shared by {self.spatial} processes, each its rows of every level (exact)"
        else:
            how = (f"sliding windows of {'x'.join(map(str, self.window))} "
                   f"({SLIDING_WINDOW_OVERLAP:.0%} overlap, Gaussian-weighted)")
        return f"{how}: {self.reason}"


def strategy_with_slabs(strategy: Strategy, slabs: int | tuple[int, ...]) -> Strategy:
    """`strategy` with `slabs`: a full-resolution count, or one count per level, full resolution first."""
    counts = (slabs,) if isinstance(slabs, int) else tuple(slabs)
    return replace(strategy, slabs=counts[0], coarse_slabs=counts[1:])


def inference_need(config: TrainConfig, shape: tuple[int, int, int], device: torch.device,
                   slabs: int | tuple[int, ...] = 1, spatial: int = 1) -> int:
    """The dry run's peak of one inference forward of the run's network at `shape` (its precision and memory
    format, `slabs` slabs at full resolution or per level, the output activation), in bytes; with `spatial`
    = S, one of S processes sharing the volume."""
    job = JobConfig(model=config.job.model, shape=tuple(shape), batch=1,
                    strategy=strategy_with_slabs(inference_strategy(config), slabs))
    try:
        return dryrun_inference(job, activation_of(config), device.type, spatial=spatial).peak_bytes
    except ValueError as error:
        raise UserError(str(error)) from None


def windows_need(config: TrainConfig, shape: tuple[int, int, int], window: tuple[int, int, int],
                 device: torch.device) -> int:
    """Sliding windows of `window` over a volume of `shape`: one window's dry-run inference peak, plus MONAI's
    blending buffers (output and count maps of the whole volume) and the window's input copy, fp32."""
    blending = (config.job.model.classes + 1) * 4 * int(np.prod(shape))
    return inference_need(config, window, device) + blending + 4 * int(np.prod(window))


def _smaller_window(window: tuple[int, ...], divisor: int, smallest: int) -> tuple[int, ...] | None:
    """`window` with its largest axis halved (down to a multiple of the divisor, not below `smallest`);
    None when no axis can shrink."""
    order = sorted(range(3), key=lambda axis: -window[axis])
    for axis in order:
        size = max(smallest, window[axis] // 2 // divisor * divisor)
        if size < window[axis]:
            return tuple(size if i == axis else s for i, s in enumerate(window))
    return None


def fixed_input_shape(config: TrainConfig) -> tuple[int, int, int] | None:
    """The training shape, when the run's network (built for it) takes no other (MONAI's UNETR: its position
    embeddings); None when it takes any multiple of its divisor. Probed on the meta device."""
    model, shape = config.job.model, tuple(config.job.shape)
    larger = tuple(size + spatial_divisor(model) for size in shape)
    try:
        network = build_on_meta(model, shape)
        network(torch.empty(1, model.in_channels, *larger, device="meta"))
    except Exception:  # noqa: BLE001 - any refusal of another shape means the network is fixed-size
        return shape
    return None


def training_window(config: TrainConfig) -> tuple[int, int, int] | None:
    """The training shape when the run was trained on random windows of larger images (``crop``
    "foreground"), else None. Such a run's normalisation statistics and context are a window's, so it is
    predicted in windows of it whatever runs it (PyTorch, or a dynamic export): whole-volume inference would
    shift its inputs (nnU-Net predicts in windows of its patch size for the same reason)."""
    return tuple(config.job.shape) if config.data.crop == "foreground" else None


def inference_window(config: TrainConfig) -> tuple[int, int, int] | None:
    """The window a run is predicted in, or None for the whole volume (slabs and windows only where memory asks):
    its :func:`training_window`, else its training shape when its network takes no other
    (:func:`fixed_input_shape`)."""
    return training_window(config) or fixed_input_shape(config)


def plan_inference(config: TrainConfig, shape: tuple[int, int, int], device: torch.device,
                   budget: int | None = None, spatial: int = 1,
                   fixed: tuple[int, int, int] | None = None) -> InferencePlan:
    """Pick, in this order, the first way to predict a volume of `shape` whose dry-run inference peak fits
    `budget` bytes (None: the memory available on `device` now): the whole volume in one pass; the whole
    volume in 2, 4, 8, ... full-resolution slabs while more still lower the peak, then with every level in
    slabs (:func:`fullres.cost.plan.slab_schedules`; networks with a slab schedule, normalised or not: the
    same result up to summation order); sliding windows, the largest found by halving
    the largest axis (multiples of the network's divisor, down to twice it), plus MONAI's full-volume
    blending buffers. When nothing fits, the smallest window is used, and the reason says so.
    `spatial` = S > 1: the volume shared by S processes (the "spatial" plan), refused with exit code 3 where
    one process's share does not fit (the budget is then each local process's). `fixed`: the window the run
    is predicted in (:func:`inference_window`): a larger volume is predicted in windows of it."""
    budget_source = "--memory" if budget is not None else "available"
    budget = available_memory(device) if budget is None else int(budget)
    shape = tuple(int(s) for s in shape)
    model = config.job.model
    have = f"{format_bytes(budget)} {budget_source}"
    if fixed is not None and shape != tuple(fixed):
        trained_on = (f"the run was trained on random {'x'.join(map(str, fixed))} windows"
                      if training_window(config) is not None else
                      f"{model.architecture} takes only {'x'.join(map(str, fixed))} inputs")
        if spatial > 1:
            raise UserError(f"--spatial {spatial}: {trained_on}, so a volume is not shared; predict without --spatial")
        need = windows_need(config, shape, fixed, device)
        return InferencePlan("sliding", need, budget, f"{trained_on}; ~{format_bytes(need)} of {have} (dry run)",
                             window=tuple(fixed))
    if spatial > 1:
        try:
            check_spatial(JobConfig(model=model, shape=shape, batch=1, strategy=inference_strategy(config)), spatial)
        except ValueError as error:
            raise UserError(f"{error} ({'x'.join(map(str, shape))} volumes)") from None
        need = inference_need(config, shape, device, spatial=spatial)
        if need > budget:
            raise UserError(f"--spatial {spatial}: one of {spatial} processes sharing a {'x'.join(map(str, shape))} "
                            f"volume needs ~{format_bytes(need)}, more than {have} (dry run); start more processes, "
                            "or predict without --spatial (slabs or sliding windows)", exit_code=3)
        return InferencePlan("spatial", need, budget, f"each needs ~{format_bytes(need)} of {have} (dry run)",
                             spatial=spatial)
    whole = inference_need(config, shape, device)
    if whole <= budget:
        return InferencePlan("whole", whole, budget, f"needs ~{format_bytes(whole)} of {have} (dry run)")
    why_not = f"a whole volume needs ~{format_bytes(whole)}, more than {have}"
    if model_spec(model.architecture).slabs:
        best, slabs = whole, 2
        while slabs <= shape[0] // 2:
            need = inference_need(config, shape, device, slabs)
            if need <= budget:
                return InferencePlan("slabs", need, budget, f"{why_not}; {slabs} slabs need ~{format_bytes(need)} "
                                     "(dry run)", slabs=slabs)
            if need >= best * 0.99:  # more slabs no longer lower the peak (the coarser levels hold it)
                break
            best, slabs = need, slabs * 2
        for counts in slab_schedules(JobConfig(model=model, shape=shape, batch=1)):
            if all(count == 1 for count in counts[1:]):  # full resolution only: tried above
                continue
            need = inference_need(config, shape, device, counts)
            if need <= budget:
                return InferencePlan("slabs", need, budget, f"{why_not}; slabs {','.join(map(str, counts))} per level "
                                     f"need ~{format_bytes(need)} (dry run)", slabs=counts)
            best = min(best, need)
        why_not += f", and slabs ~{format_bytes(best)} at least"
    divisor = spatial_divisor(model)
    window, need = shape, whole
    while True:
        smaller = _smaller_window(window, divisor, min(2 * divisor, *shape))
        if smaller is None:
            return InferencePlan("sliding", need, budget, f"{why_not}; no window fits (the smallest, "
                                 f"{'x'.join(map(str, window))}, needs ~{format_bytes(need)}): trying it anyway",
                                 window=window)
        window = smaller
        need = windows_need(config, shape, window, device)
        if need <= budget:
            return InferencePlan("sliding", need, budget, f"{why_not}; windows need ~{format_bytes(need)} "
                                 "(dry run, with the blending buffers)", window=window)


def predict_volume(predictor: Predictor, image: np.ndarray, device: torch.device, whole: bool = True,
                   plan: InferencePlan | None = None, engine=None, space=None) -> np.ndarray | None:
    """Probabilities [K, H, W, D] for one preprocessed image [C, H, W, D], as `plan` says (without one:
    `whole` volume in one pass, or sliding windows of the training shape): one pass, one pass in slabs, or
    MONAI's sliding_window_inference (Gaussian-blended). `engine` (:class:`fullres.run.export.Engine`) runs an
    exported model instead of the PyTorch one; its windows blend probabilities, PyTorch's logits.
    A "spatial" plan: every process of `space` (:class:`fullres.engine.spatial.Space`) calls this at once with the
    same image and computes its rows; the group's first process returns the whole volume, the others None."""
    strategy = inference_strategy(predictor.config)
    if plan is None:
        plan = InferencePlan("whole" if whole else "sliding", 0, 0, "", window=None if whole else predictor.config.job.shape)
    model = getattr(predictor.model, "module", predictor.model)

    def forward(volume: torch.Tensor) -> torch.Tensor:
        if engine is not None:
            return torch.from_numpy(engine(volume.cpu().numpy()))
        with autocast(strategy, device.type):
            return primary_output(predictor.model(to_device(volume, device, strategy))).float()

    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device if engine is None else "cpu")
    with torch.no_grad():
        if plan.mode == "spatial":
            use_space(model, space)
            try:
                output = forward(local_rows(x, space))
            finally:
                use_space(model, None)
        elif plan.mode in ("whole", "slabs"):
            slabbed = plan.mode == "slabs" and any(count > 1 for count in plan.slab_counts)
            if slabbed:
                model.slabs = plan.slab_counts
            try:
                output = forward(x)
            finally:
                if slabbed:
                    model.slabs = 1
        else:
            from monai.inferers import sliding_window_inference

            output = sliding_window_inference(x, roi_size=plan.window, sw_batch_size=1, predictor=forward,
                                              overlap=SLIDING_WINDOW_OVERLAP, mode="gaussian")
    output = output[0].float()
    if engine is not None:  # an exported model ends in the run's activation already
        return output.cpu().numpy()
    probabilities = torch.sigmoid(output) if predictor.config.data.target != "classes" else torch.softmax(output, 0)
    if plan.mode == "spatial":
        probabilities = gather_rows(probabilities[None], space)
        return None if probabilities is None else probabilities[0].cpu().numpy()
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
                        overwrite: bool, run_dir: Path | None = None) -> None:
    """Refuse, before any work, an `out` that would lose a file: a file in its place, a folder holding any
    input or the run (`run_dir`: the run folder, or the checkpoint file given) (never, even with
    `overwrite`), an output path that is a device, FIFO or socket, or masks already there that an earlier
    `predict` did not write (its prediction.json lists its own) unless `overwrite`."""
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
    holder = None if run_dir is None else run_dir.resolve() if run_dir.is_dir() else run_dir.resolve().parent
    if holder == here:
        raise UserError(f"--out {out} holds the run's checkpoint {run_dir}: write the masks to another folder")
    paths = output_paths(out, cases, probabilities)
    for path in paths:
        refuse_special(path, f"--out {out}:")
    if overwrite:
        return
    own: set[str] = set()
    try:  # what an earlier predict wrote here may be replaced
        info = json.loads((out / "prediction.json").read_text())
        listed = [str(name) for name in info.get("cases", [])]
        own = {"prediction.json", *listed, *(name.replace(".nii.gz", "_prob.nii.gz") for name in listed)}
    except (OSError, ValueError, AttributeError, TypeError, RecursionError):
        pass
    for path in paths:
        if (path.exists() or path.is_symlink()) and path.name not in own:
            raise UserError(f"--out {out}: {path.name} exists and was not written by fullres predict; "
                            "choose another folder, or --overwrite")


def load_input(case: PredictInput, config: TrainConfig, trained: DatasetIndex | None,
               least: tuple[int, int, int] = (1, 1, 1), divisor: int | None = None):
    """One case read and preprocessed as the run expects: (image, box, source image). The image is the whole
    input, zero-padded to multiples of the network's divisor and to at least `least` (every voxel is
    predicted, whatever the training shape; `divisor`: another multiple, e.g. one every network of an
    ensemble takes). Raises UserError naming the file when it is unreadable, has
    the wrong channels or non-finite voxels."""
    data = config.data
    if case.index is not None and trained is not None and case.index.modalities != trained.modalities:
        data = replace(data, channels=match_channels(trained.modalities, data.channels, case.index.modalities))
    image, box, source = load_case_image(case.image, data, case_id=case.case_id,
                                         divisor=divisor or spatial_divisor(config.job.model), least=least)
    if not np.isfinite(image).all():  # a NaN would silently become an empty mask: count them in the file
        for path in (case.image if isinstance(case.image, tuple) else (case.image,)):
            raw = np.asanyarray(nib.load(path).dataobj)
            bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
            if bad:
                raise UserError(f"{path}: {bad} voxels are NaN or infinite; fix the image (fullres predicts no "
                                "mask from them)")
    check_divisible(config.job.model, image.shape[1:])
    return image, box, source


def case_source(case: PredictInput, trained: DatasetIndex | None) -> tuple[DatasetIndex | None, dict]:
    """The dataset whose layout names and values `case`'s mask (its own folder's, else the training one's) and
    that layout's WT / TC / ET label values (MSD's without either)."""
    source_index = case.index or trained
    return source_index, source_index.regions if source_index is not None else dict(MSD_REGIONS)


def ensemble_fields(predictor: Predictor) -> dict[str, object]:
    """What the runs of an ensemble must agree on, by name: target, channels (by modality name where the
    training dataset is readable), preprocessing, and for a classes target the label values."""
    config, trained = predictor.config, training_dataset(predictor.config)
    channels = [trained.modalities[c] if trained is not None and c < len(trained.modalities) else str(c)
                for c in config.data.channels]
    agreed = {"target": config.data.target, "channels": ",".join(channels),
              "normalize": config.data.normalize,
              "spacing": "none" if config.data.spacing is None else " x ".join(f"{s:g}" for s in config.data.spacing),
              "CT statistics": json.dumps(config.data.to_json()["ct"])}
    if config.data.target == "classes":
        agreed["labels"] = ",".join(map(str, sorted(trained.labels) if trained is not None else range(4)))
    return agreed


def check_ensemble(predictors: list[Predictor], names: list[Path]) -> None:
    """Refuse, in one line naming the run and the field, runs that do not agree on what
    :func:`ensemble_fields` lists: their probabilities would not mean the same thing."""
    first = ensemble_fields(predictors[0])
    for predictor, name in zip(predictors[1:], names[1:]):
        other = ensemble_fields(predictor)
        for field_name, value in first.items():
            if other[field_name] != value:
                raise UserError(f"--ensemble {name}: its {field_name} {other[field_name]} differs from {names[0]}'s "
                                f"{value}; an ensemble averages runs with the same target, channels and "
                                "preprocessing")


def _lcm(values: list[int]) -> int:
    out = 1
    for value in values:
        out = out * value // math.gcd(out, value)
    return out


def predict_files(run_or_checkpoint: Path, inputs: list[str], out: Path, device: torch.device,
                  probabilities: bool = False, progress: bool = True, log=print, layout: str | None = None,
                  overwrite: bool = False, engine: str = "torch", engine_file: Path | None = None,
                  memory: int | None = None, process: Process = Process(), spatial: int = 1,
                  trust_code: bool = False, case_set: str = "test", ensemble: tuple[Path, ...] = (),
                  selected: list[PredictInput] | None = None) -> list[Path]:
    """Predict every input, writing OUT/<case>.nii.gz (and OUT/<case>_prob.nii.gz). Returns the mask paths.

    Inputs as :func:`expand_inputs` reads them (`case_set`: a dataset folder's "test" or "all" cases), or
    `selected`, the cases themselves. `ensemble`: more runs (or checkpoints) whose probabilities are
    averaged with the first's, each with its own inference plan; they must agree on target, channels and
    preprocessing (:func:`check_ensemble`), and the masks follow the first run's training dataset.

    Nothing is written until every input has been read and checked (readable, the run's channels, finite,
    a shape the network takes), and each file is written atomically; `out` must not hold an input, and a
    file there that an earlier predict did not write is replaced only with `overwrite`.
    A dataset folder's cases are named and valued in its own layout (BraTS 2021: BraTS2021_XXXXX.nii.gz with
    0/1/2/4); loose files in the training dataset's layout. Channels are matched by modality name.
    `engine` "torch" runs the network in PyTorch, planned by :func:`plan_inference` to fit `memory` bytes
    (None: what is available); "onnx" / "openvino" run `engine_file` (default: the run's own export, where
    `fullres export` writes it) on the CPU, whole volumes. `trust_code`: the user's --trust-code, to build
    a network that is code the run names (:mod:`fullres.run.trust`).
    Under torchrun (`process` in a started process group), every process calls this alike: the processes form
    data groups of `spatial` (S) processes, each group predicts its share of the cases, and each case's
    volume is shared by its group's S processes (:func:`fullres.engine.spatial.forward_shards`, exact); the group's
    first process writes its masks, rank 0 prediction.json.
    """
    if spatial > 1 and engine != "torch":
        raise UserError(f"--spatial {spatial} runs the PyTorch network (--engine torch), not {engine}")
    if engine == "torch" and engine_file is not None:
        raise UserError("--engine-file needs --engine onnx or openvino")
    if ensemble and engine != "torch":
        raise UserError(f"--ensemble averages PyTorch networks: use --engine torch, not {engine}")
    refuse_process_count(spatial, process.world)
    # check every input before the first (long) prediction
    cases = selected if selected is not None else expand_inputs(inputs, layout, case_set)
    runs = [Path(run_or_checkpoint), *map(Path, ensemble)]
    for run_path in runs:
        check_output_folder(out, cases, inputs, probabilities, overwrite, run_path)
    members = [load_predictor(run_path, device, trust_code) for run_path in runs]
    check_ensemble(members, runs)
    predictor = members[0]
    config = predictor.config
    trained = training_dataset(config)
    runner = None
    if len(members) > 1:
        fixes = [inference_window(member.config) for member in members]
        found = [f for f in fixes if f is not None]
        least = tuple(max(f[axis] for f in found) for axis in range(3)) if found else (1, 1, 1)
        divisor = _lcm([spatial_divisor(member.config.job.model) for member in members])
        shapes = [tuple(load_input(case, config, trained, least, divisor)[0].shape[1:]) for case in cases]
        plans = {}
        for shape in dict.fromkeys(shapes):
            for k, member in enumerate(members):
                check_divisible(member.config.job.model, shape)
                plans[k, shape] = plan_inference(member.config, shape, device, memory, spatial, fixes[k])
        if process.main:
            log(f"predicting {len(cases)} case(s) with an ensemble of {len(members)} runs ("
                + ", ".join(str(member.checkpoint) for member in members) + "), probabilities averaged; first run: "
                + plans[0, shapes[0]].describe())
        return _predict_cases(members, cases, out, device, trained, plans, least, divisor, probabilities, progress,
                              process, spatial, engine, None)
    if engine != "torch":
        engine_file = Path(engine_file) if engine_file is not None else default_engine_file(run_or_checkpoint, engine)
        runner = open_engine(engine, engine_file, config, predictor.checkpoint)
        fixed = runner.spatial_shape or training_window(config)  # a dynamic export: the run's own windows
    else:
        fixed = inference_window(config)
    least = fixed or (1, 1, 1)
    # every input readable and usable before the first mask is written
    shapes = [tuple(load_input(case, config, trained, least)[0].shape[1:]) for case in cases]
    plans: dict[tuple, InferencePlan] = {}
    for shape in shapes:  # every shape planned (and a plan that cannot fit refused) before the first mask
        if shape in plans:
            continue
        if runner is not None and (fixed is None or shape == tuple(fixed)):
            plans[shape] = InferencePlan("whole", 0, 0, f"{engine} engine ({engine_file}), on the CPU")
        elif runner is not None:
            plans[shape] = InferencePlan("sliding", 0, 0, f"{engine} engine ({engine_file}) in windows of "
                                         f"{'x'.join(map(str, fixed))}, on the CPU", window=tuple(fixed))
        else:
            plans[shape] = plan_inference(config, shape, device, memory, spatial, fixed)
        if process.main and len(plans) == 1:
            log(f"predicting {len(cases)} case(s) with {predictor.checkpoint} as {plans[shape].describe()}")
        elif process.main:
            log(f"{'x'.join(map(str, shape))} volumes: {plans[shape].describe()}")
    return _predict_cases(members, cases, out, device, trained, {(0, shape): plan for shape, plan in plans.items()},
                          least, None, probabilities, progress, process, spatial, engine, runner)


def _predict_cases(members: list[Predictor], cases: list[PredictInput], out: Path, device: torch.device,
                   trained: DatasetIndex | None, plans: dict, least: tuple[int, int, int], divisor: int | None,
                   probabilities: bool, progress: bool, process: Process, spatial: int, engine: str,
                   runner) -> list[Path]:
    """The writing half of :func:`predict_files`: every case (this process's share) predicted by each
    member (`plans[k, shape]`), their probabilities averaged, masks written, then prediction.json."""
    from tqdm import tqdm

    predictor, config = members[0], members[0].config
    space, data_rank, data_size = None, process.rank, process.world
    if process.world > 1:
        dist.barrier()  # every process has checked the inputs and the folder before any writes into it
        if spatial > 1:
            device_mesh = mesh(spatial, device.type)
            space = space_of(device_mesh, 0)
            data_rank, data_size = device_mesh.get_local_rank("data"), device_mesh.size(0)

    out.mkdir(parents=True, exist_ok=True)
    for case in tqdm(cases[data_rank::data_size], desc="predict", disable=not (progress and process.main)):
        source_index, regions = case_source(case, trained)
        image, box, source = load_input(case, config, trained, least, divisor)
        shape = tuple(image.shape[1:])
        case_space = None if space is None else replace(space, height=shape[0])
        parts = [predict_volume(member, image, device, plan=plans[k, shape], engine=runner, space=case_space)
                 for k, member in enumerate(members)]
        if parts[0] is None:  # another process of the group writes this case
            continue
        probs = parts[0] if len(parts) == 1 else (sum(parts) / len(parts)).astype(np.float32)
        # back on the input's own grid: out of the padding, then from the training spacing (trilinear)
        probs = resample(uncrop(probs, box), tuple(source.shape[:3]))
        same = trained is not None and source_index is not None and source_index.root == trained.root
        labels = output_labels(labels_from_probabilities(probs, config.data.target), config.data.target, trained,
                               regions, same or source_index is None)
        mask_path = out / f"{case.case_id}.nii.gz"
        write_nifti(mask_path, labels, source.affine, source.header)
        if probabilities:
            restored = np.moveaxis(probs, 0, -1).astype(np.float32)
            write_nifti(out / f"{case.case_id}_prob.nii.gz", restored if restored.shape[-1] > 1 else restored[..., 0],
                        source.affine, source.header)
    if process.world > 1:
        dist.barrier()  # every mask is written before prediction.json lists them
    layouts, region_sets = set(), []
    for case in cases:
        source_index, regions = case_source(case, trained)
        layouts.add(source_index.layout if source_index is not None else "msd")
        if regions not in region_sets:
            region_sets.append(regions)
    written = output_paths(out, cases, probabilities=False)[:-1]  # the masks, every group's
    info = {"checkpoint": str(predictor.checkpoint), "target": config.data.target, "engine": engine,
            **({"ensemble": [str(member.checkpoint) for member in members]} if len(members) > 1 else {}),
            "versions": versions(),
            "cases": [p.name for p in written],
            "layout": layouts.pop() if len(layouts) == 1 else "mixed"}
    if len(region_sets) == 1:  # the label values of the masks' (and their truths') WT / TC / ET, for `evaluate`
        info["regions"] = {name: list(values) for name, values in region_sets[0].items()}
    if process.main:
        write_json(out / "prediction.json", info)
    return written
