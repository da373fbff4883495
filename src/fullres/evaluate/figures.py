"""The paper's figures, one function per figure, named after it.

* :func:`figure7_overlay`  - Figure 7: prediction vs ground truth over the MRI, three orthogonal views.
* :func:`training_curves`  - loss, Dice and accuracy per epoch, train and validation, from a run's ``metrics.csv``.
* :func:`figure3_memory_vs_size`, :func:`figure5_estimate_vs_measured` - Figures 3 and 5 from a sweep's rows.
* :func:`figure6_chart`    - Figure 6: training images/s per speed variant, from a ``fullres bench`` result.

Matplotlib is used through ``matplotlib.figure.Figure`` objects only (rendered by the Agg canvas), never
``pyplot``: no global figure state, no GUI backend, safe in threads and in library code. Every PNG is
written atomically (temp file in the same folder, then ``os.replace``), so a reader never sees half a file.

Orientation (Figure 7): the volume's array axes are taken as (x, y, z) = (patient Left->Right,
Posterior->Anterior, Inferior->Superior), i.e. nibabel's RAS+ canonical orientation; pass ``affine`` to
have the volume reoriented to it first. Views follow the radiological convention, the same in all three:
axial and coronal show the patient's right on the image's LEFT; axial has anterior at the top; coronal
and sagittal have superior at the top; sagittal has anterior on the left. Each panel carries its
orientation letters. Pixel aspect follows the voxel spacing, so anisotropic volumes look right.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from fullres.cost.steptime import STOCK
from fullres.data.nifti import open_nifti, read_array
from fullres.errors import UserError
from fullres.evaluate.lesions import DEFAULT_CHALLENGE, lesion_masks
from fullres.files import write_bytes_atomically

__all__ = ["figure7_overlay", "training_curves", "PRED_COLOUR", "TRUTH_COLOUR", "OVERLAP_COLOUR"]

#: Overlay colours (RGB in [0, 1]): prediction only, ground truth only, both.
PRED_COLOUR = (1.0, 0.0, 0.0)  # red
TRUTH_COLOUR = (0.0, 0.35, 1.0)  # blue
OVERLAP_COLOUR = (0.75, 0.0, 0.85)  # purple
MISSED_COLOUR = (1.0, 0.9, 0.0)  # yellow outline: a truth lesion no prediction matched
FALSE_POSITIVE_COLOUR = (0.0, 0.9, 0.3)  # green outline: a prediction component matching no lesion
_OVERLAY_ALPHA = 0.6

TRAINING_COLUMNS = ("epoch", "train_loss", "val_loss", "train_dice", "val_dice", "train_accuracy", "val_accuracy")


def _new_figure(figsize: tuple[float, float], dpi: int):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, dpi=dpi)


def _save_atomic(fig, path: str | os.PathLike, dpi: int) -> Path:
    """Render to memory, then write the PNG atomically (a reader never sees half a file)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    write_bytes_atomically(path, buffer.getvalue())
    return path


# --------------------------------------------------------------------------------------------------
# Figure 7
# --------------------------------------------------------------------------------------------------


def _to_ras(arrays: list[np.ndarray], affine: np.ndarray) -> tuple[list[np.ndarray], tuple[float, float, float]]:
    import nibabel as nib

    affine = np.asarray(affine, dtype=float)
    ornt = nib.orientations.io_orientation(affine)
    out = [nib.orientations.apply_orientation(a, ornt) for a in arrays]
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # spacing per array axis
    spacing = tuple(float(zooms[int(ax)]) for ax in np.argsort(ornt[:, 0]))  # per RAS axis
    return out, spacing  # type: ignore[return-value]


def _grey(image: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] with the 1st-99th percentile window of the non-zero voxels (the head, not the air)."""
    image = np.asarray(image, dtype=np.float32)
    finite = np.isfinite(image)
    vals = image[finite & (image != 0)]
    if vals.size == 0:
        vals = image[finite]
    if vals.size == 0:
        return np.zeros(image.shape, np.float32)
    lo, hi = np.percentile(vals, [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    out = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return out.astype(np.float32)


def _compose(grey2d: np.ndarray, truth2d: np.ndarray, pred2d: np.ndarray) -> np.ndarray:
    """RGB image: grey, blended with red (prediction only), blue (truth only), purple (both)."""
    rgb = np.repeat(grey2d[..., None], 3, axis=-1)
    for mask, colour in (
        (pred2d & ~truth2d, PRED_COLOUR),
        (truth2d & ~pred2d, TRUTH_COLOUR),
        (truth2d & pred2d, OVERLAP_COLOUR),
    ):
        rgb[mask] = (1 - _OVERLAY_ALPHA) * rgb[mask] + _OVERLAY_ALPHA * np.asarray(colour, np.float32)
    return rgb


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of `mask` (all False when it is empty)."""
    if not mask.any():
        return mask
    from scipy import ndimage

    labels, count = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    return labels == 1 + int(np.argmax(ndimage.sum_labels(mask, labels, range(1, count + 1))))


def _views(vol: np.ndarray, centre: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal 2D slices in display order (row 0 at the top, column 0 on the left)."""
    ci, cj, ck = centre
    axial = vol[:, :, ck].T[::-1, ::-1]  # rows: y (anterior top); cols: x reversed (patient right on left)
    coronal = vol[:, cj, :].T[::-1, ::-1]  # rows: z (superior top); cols: x reversed
    sagittal = vol[ci, :, :].T[::-1, ::-1]  # rows: z (superior top); cols: y reversed (anterior on left)
    return [axial, coronal, sagittal]


def figure7_overlay(
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    path: str | os.PathLike,
    spacing_mm: Sequence[float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    affine: np.ndarray | None = None,
    dpi: int = 100,
    missed: np.ndarray | None = None,
    false_positive: np.ndarray | None = None,
) -> Path:
    """Figure 7: the prediction against the ground truth over one MRI modality, in three orthogonal views.

    ``image`` [X, Y, Z] is one modality (e.g. FLAIR); ``truth`` and ``pred`` are boolean masks of the same
    shape (e.g. whole tumour). Axial, coronal and sagittal slices pass through the centre of mass of
    ``truth | pred`` (the volume centre if both are empty). The image is grey; the prediction alone is
    red, the ground truth alone blue, their overlap purple (so red = false positive, blue = false
    negative); a legend says so. Panels are drawn in mm (``spacing_mm`` per array axis), so anisotropic
    voxels keep their true aspect.

    Orientation: arrays are assumed RAS+ (nibabel canonical); give the NIfTI ``affine`` to reorient them
    first (``spacing_mm`` is then taken from the affine). See the module docstring for the radiological
    display convention. The PNG (``12 x 4.8`` inches at ``dpi``) is written atomically; returns its path.

    ``missed`` and ``false_positive`` (boolean masks of the same shape, e.g. from
    :func:`fullres.evaluate.lesions.lesion_masks`) are outlined in yellow and green where the slices cross them:
    the truth lesions no prediction component matched, and the prediction components that match no
    truth lesion. The slices then pass through the largest missed lesion (else the largest false
    positive), so that at least it shows.
    """
    image = np.asarray(image)
    truth = np.asarray(truth).astype(bool)
    pred = np.asarray(pred).astype(bool)
    if image.ndim != 3 or truth.shape != image.shape or pred.shape != image.shape:
        raise ValueError(
            f"image, truth and pred must be 3D arrays of one shape; got {image.shape}, {truth.shape}, {pred.shape}"
        )
    outlines = [np.zeros(image.shape, bool) if m is None else np.asarray(m).astype(bool) for m in (missed, false_positive)]
    if any(m.shape != image.shape for m in outlines):
        raise ValueError(f"missed and false_positive must have the image's shape {image.shape}")
    if affine is not None:
        (image, truth, pred, *outlines), spacing = _to_ras([image, truth, pred, *outlines], affine)
    else:
        spacing = tuple(float(s) for s in spacing_mm)
        if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing_mm must be 3 positive numbers, got {spacing_mm!r}")

    union = _largest_component(outlines[0] if outlines[0].any() else outlines[1])
    if not union.any():
        union = truth | pred
    if union.any():
        centre = tuple(int(round(float(c))) for c in np.argwhere(union).mean(axis=0))
    else:
        centre = tuple(n // 2 for n in image.shape)

    grey = _grey(image)
    rgb_views = [
        _compose(g, t, p) for g, t, p in zip(_views(grey, centre), _views(truth, centre), _views(pred, centre))
    ]
    sx, sy, sz = spacing
    nx, ny, nz = image.shape
    panels = [
        ("Axial", f"z = {centre[2]}", sx, sy, ("R", "L", "A", "P")),
        ("Coronal", f"y = {centre[1]}", sx, sz, ("R", "L", "S", "I")),
        ("Sagittal", f"x = {centre[0]}", sy, sz, ("A", "P", "S", "I")),
    ]

    from matplotlib.patches import Patch

    fig = _new_figure((12.0, 4.8), dpi)
    fig.patch.set_facecolor("black")
    axes = fig.subplots(1, 3)
    outline_views = [_views(m, centre) for m in outlines]
    for index, (ax, rgb, (name, where, col_mm, row_mm, (left, right, top, bottom))) in enumerate(zip(axes, rgb_views, panels)):
        rows, cols = rgb.shape[:2]
        ax.imshow(rgb, extent=(0, cols * col_mm, rows * row_mm, 0), interpolation="nearest", aspect="equal")
        for views, colour in zip(outline_views, (MISSED_COLOUR, FALSE_POSITIVE_COLOUR)):
            if views[index].any():  # contour at voxel centres, in the panel's mm
                ax.contour((np.arange(cols) + 0.5) * col_mm, (np.arange(rows) + 0.5) * row_mm,
                           views[index].astype(float), levels=[0.5], colors=[colour], linewidths=1.5)
        ax.set_title(f"{name} ({where})", color="white", fontsize=11)
        ax.set_axis_off()
        style = dict(color="yellow", fontsize=10, fontweight="bold", transform=ax.transAxes)
        ax.text(0.02, 0.5, left, ha="left", va="center", **style)
        ax.text(0.98, 0.5, right, ha="right", va="center", **style)
        ax.text(0.5, 0.98, top, ha="center", va="top", **style)
        ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    handles = [
        Patch(facecolor=PRED_COLOUR, label="prediction only (false positive)"),
        Patch(facecolor=TRUTH_COLOUR, label="ground truth only (false negative)"),
        Patch(facecolor=OVERLAP_COLOUR, label="overlap (true positive)"),
    ]
    if outlines[0].any():
        handles.append(Patch(facecolor="none", edgecolor=MISSED_COLOUR, label="missed lesion"))
    if outlines[1].any():
        handles.append(Patch(facecolor="none", edgecolor=FALSE_POSITIVE_COLOUR, label="false-positive lesion"))
    fig.legend(
        handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white", fontsize=10 if len(handles) <= 3 else 8,
        bbox_to_anchor=(0.5, 0.0),
    )
    if title:
        fig.suptitle(title, color="white", fontsize=13)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.1, top=0.86 if title else 0.92, wspace=0.03)
    return _save_atomic(fig, path, dpi)


# --------------------------------------------------------------------------------------------------
# training curves
# --------------------------------------------------------------------------------------------------


def _read_training_csv(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise UserError(f"training metrics file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in TRAINING_COLUMNS if c not in header]
        if not header:
            raise UserError(f"training metrics file {path} is empty (expected columns {', '.join(TRAINING_COLUMNS)})")
        if missing:
            raise UserError(f"training metrics file {path} lacks column(s) {', '.join(missing)}")
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    if not rows:
        raise UserError(f"training metrics file {path} has a header but no epochs")

    def num(value: str | None, column: str, line: int) -> float:
        if value is None or value.strip() == "":
            return float("nan")  # e.g. an epoch without validation
        try:
            return float(value)
        except ValueError:
            raise UserError(f"training metrics file {path}, line {line}: {column} = {value!r} is not a number") from None

    return {c: np.array([num(r.get(c), c, i + 2) for i, r in enumerate(rows)]) for c in TRAINING_COLUMNS}


def training_curves(metrics_csv_path: str | os.PathLike, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Loss, Dice and voxel accuracy per epoch, train (solid) and validation (dashed), in three panels.

    Reads a run's ``metrics.csv`` with at least the columns ``epoch, train_loss, val_loss, train_dice,
    val_dice, train_accuracy, val_accuracy`` (extra columns ignored; empty cells plotted as gaps). The
    epoch of best validation Dice is marked. Raises ``UserError`` naming the file when it is missing,
    empty, lacks a column or holds a non-number. The PNG (``13 x 4`` inches at ``dpi``) is written
    atomically; returns its path.
    """
    src = Path(metrics_csv_path)
    data = _read_training_csv(src)
    epoch = data["epoch"]

    fig = _new_figure((13.0, 4.0), dpi)
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, ("loss", "dice", "accuracy"), ("Loss", "Dice", "Voxel accuracy")):
        ax.plot(epoch, data[f"train_{key}"], "-o", color="tab:blue", markersize=3, label="train")
        ax.plot(epoch, data[f"val_{key}"], "--s", color="tab:orange", markersize=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    val_dice = data["val_dice"]
    if np.isfinite(val_dice).any():
        best = int(np.nanargmax(val_dice))
        axes[1].axvline(epoch[best], color="grey", linestyle=":", linewidth=1)
        axes[1].annotate(
            f"best val {val_dice[best]:.3f}\n(epoch {epoch[best]:g})",
            xy=(epoch[best], val_dice[best]), xytext=(5, -30), textcoords="offset points", fontsize=8,
        )
    fig.suptitle(f"Training curves: {src.parent.name or src.name}", fontsize=12)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.85, wspace=0.28)
    return _save_atomic(fig, path, dpi)


# --------------------------------------------------------------------------------------------------
# Figures 3 and 5: memory against input size, and estimate against measurement (fullres sweep)

def _sweep_series(rows: Sequence[dict]) -> dict[str, list[dict]]:
    """Rows grouped by strategy label (precision, checkpointing), each sorted by voxels."""
    series: dict[str, list[dict]] = {}
    for row in rows:
        label = str(row["precision"]) + (" + checkpointing" if str(row["checkpointing"]) == "True" else "")
        series.setdefault(label, []).append(row)
    return {label: sorted(items, key=lambda r: int(r["voxels"])) for label, items in series.items()}


def figure3_memory_vs_size(rows: Sequence[dict], path: str | os.PathLike, dpi: int = 100) -> Path:
    """Figure 3: training memory against input size (batch x voxels), measured where measured, with the
    dry-run and Table 1 estimates beside it. `rows` are `fullres sweep` CSV rows (dicts)."""
    fig = _new_figure((8, 5), dpi)
    ax = fig.add_subplot(1, 1, 1)
    for index, (label, items) in enumerate(_sweep_series(rows).items()):
        colour = f"C{index}"
        voxels = [int(r["voxels"]) / 1e6 for r in items]
        ax.plot(voxels, [int(r["dryrun_bytes"]) / 1e9 for r in items], "--", color=colour, label=f"dry run, {label}")
        ax.plot(voxels, [int(r["table1_bytes"]) / 1e9 for r in items], ":", color=colour, label=f"Table 1, {label}")
        measured = [(v, int(r["measured_bytes"]) / 1e9) for v, r in zip(voxels, items) if r.get("measured_bytes")]
        if measured:
            ax.plot(*zip(*measured), "o-", color=colour, label=f"measured, {label}")
    ax.set_xlabel("input size: batch x H x W x D (million voxels)")
    ax.set_ylabel("training memory (GB)")
    ax.set_title("Memory against input size (Figure 3)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_atomic(fig, path, dpi)


def figure5_estimate_vs_measured(rows: Sequence[dict], path: str | os.PathLike, dpi: int = 100) -> Path:
    """Figure 5: estimate against measured peak for every measured row, dry run and Table 1, with the
    identity line and the +-5 % band."""
    measured_rows = [r for r in rows if r.get("measured_bytes")]
    if not measured_rows:
        raise UserError("figure 5 needs measured rows: run the sweep with measuring on")
    fig = _new_figure((6, 6), dpi)
    ax = fig.add_subplot(1, 1, 1)
    measured = [int(r["measured_bytes"]) / 1e9 for r in measured_rows]
    for key, marker, label in (("dryrun_bytes", "o", "dry run"), ("table1_bytes", "s", "Table 1 (x2 for training)")):
        ax.scatter(measured, [int(r[key]) / 1e9 for r in measured_rows], marker=marker, label=label)
    top = max(max(measured), *(int(r["table1_bytes"]) / 1e9 for r in measured_rows)) * 1.1
    ax.plot([0, top], [0, top], color="black", linewidth=1, label="estimate = measured")
    ax.fill_between([0, top], [0, top * 0.95], [0, top * 1.05], color="grey", alpha=0.25, label="+-5 %")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured peak (GB)")
    ax.set_ylabel("estimated (GB)")
    ax.set_title("Estimate against measurement (Figure 5)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save_atomic(fig, path, dpi)


def figure6_chart(result: dict, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Figure 6 as measured: training images/s per variant (bars), each bar labelled with its step time
    and its speed-up over stock (oneDNN off); skipped variants are shown as such. Written atomically."""
    rows = result["variants"]
    if not rows:
        raise ValueError("the result has no variants to chart")
    stock = next((r["step_s"] for r in rows if r["name"] == STOCK and r["step_s"]), None)
    fig = _new_figure((max(6.0, 1.35 * len(rows) + 2.0), 5.0), dpi)
    ax = fig.subplots()
    names = [r["name"] for r in rows]
    values = [r["images_per_s"] or 0.0 for r in rows]
    colours = ["tab:grey" if r["name"] == STOCK else "tab:orange" if r["compiled"] else
               "tab:green" if r["precision"] == "bf16" else "tab:blue" for r in rows]
    bars = ax.bar(range(len(rows)), values, color=colours)
    top = max(values) if any(values) else 1.0
    for bar, row in zip(bars, rows):
        if row["step_s"] is None:
            label = "skipped"
        else:
            label = f"{row['step_s']:.3g} s/step"
            if stock:
                label += f"\n×{stock / row['step_s']:.2f}"
        ax.annotate(label, xy=(bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=25, ha="right", fontsize=9)
    ax.set_ylim(0, top * 1.45)  # room above the bars for their labels and the legend
    ax.set_ylabel("training images / s")
    job = result.get("job") or {}
    shape = "x".join(map(str, job.get("shape", [])))
    strategy = job.get("strategy", {})
    batch = job.get("batch", 0) * strategy.get("accumulate", 1)
    filters = job.get("model", {}).get("filters", "?")
    machine = result.get("machine", {})
    from matplotlib.patches import Patch

    gpu = machine.get("gpu")
    library, fp32 = ("cuDNN", f"cuDNN fp32 ({machine.get('fp32_math', 'fp32')})") if gpu else ("oneDNN", "oneDNN fp32")
    legend = [Patch(color=c, label=l) for c, l in (("tab:grey", "stock (oneDNN off)"), ("tab:blue", fp32),
                                                     ("tab:green", f"{library} bf16"), ("tab:orange", "torch.compile"))
              if c in colours]
    ax.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=8, frameon=False)
    where = gpu or f"{machine.get('cpu', machine.get('device', ''))}, threads: {result.get('threads', '?')}"
    ax.set_title(f"Training step speed: batch {batch} x {shape}, {filters} filters\n"
                 f"{where}, torch {result.get('torch', '?')} ({result.get('date', '')[:10]})"
                 + ("" if stock or gpu else "; no stock row: no speed-up"), fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.22, top=0.86)
    return _save_atomic(fig, path, dpi)


def overlay_files(image_path: Path, pred_path: Path | None, label_path: Path | None, out: Path, channel: int = 0,
                  title: str | None = None, lesions: bool = False, challenge: str = DEFAULT_CHALLENGE) -> Path:
    """Figure 7 of NIfTI files: `channel` of the image, the prediction and the truth (either may be None), and
    with `lesions` the whole tumour's missed and false-positive lesions outlined; written to `out`. UserError
    naming the file or option for an image that is not 3D/4D, a channel it lacks, or masks of another shape."""
    image_nii = open_nifti(image_path)
    image = read_array(image_nii, image_path)
    if image.ndim not in (3, 4):
        raise UserError(f"{image_path}: a {image.ndim}D image (shape {image.shape}); show draws a 3D image or a "
                        "channel of a 4D one")
    if image.ndim == 4:
        if not 0 <= channel < image.shape[3]:
            raise UserError(f"--channel {channel}: {image_path} has {image.shape[3]} channels")
        image = image[..., channel]
    masks = []
    for path in (pred_path, label_path):
        if path is None:
            masks.append(np.zeros(image.shape, bool))
            continue
        array = read_array(open_nifti(path), path)
        if array.shape != image.shape:
            raise UserError(f"{path}: shape {array.shape} differs from the image's {image.shape}")
        masks.append(array > 0)
    outlines = {}
    if lesions:  # the whole tumour's missed and false-positive lesions, as evaluate --lesion-wise finds them
        if pred_path is None or label_path is None:
            raise UserError("--lesions compares --pred with --label: give both")
        spacing = tuple(float(z) for z in image_nii.header.get_zooms()[:3])
        outlines = dict(zip(("missed", "false_positive"), lesion_masks(masks[0], masks[1], spacing, challenge)))
    return figure7_overlay(image, masks[1], masks[0], out, affine=image_nii.affine,
                           title=title or image_path.name, **outlines)
