"""fullres.evaluate.figures: Figure 7 overlay and training curves render the right pixels, atomically."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from matplotlib.image import imread

from fullres.errors import UserError
from fullres.evaluate.figures import figure7_overlay, training_curves

SHAPE = (32, 32, 16)
SPACING = (1.0, 1.0, 2.0)


def sphere(centre_mm, radius_mm, shape=SHAPE, spacing=SPACING):
    g = np.indices(shape).astype(float) * np.asarray(spacing)[:, None, None, None]
    return ((g - np.asarray(centre_mm, float)[:, None, None, None]) ** 2).sum(0) < radius_mm**2


def case():
    rng = np.random.default_rng(0)
    truth = sphere((16, 16, 16), 6)
    pred = sphere((20, 16, 16), 6)  # shifted towards +x, the patient's right in RAS
    image = rng.normal(1.0, 0.1, SHAPE) + truth
    return image, truth, pred


def colour_masks(png):
    rgb = png[..., :3]
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = (r - g > 0.4) & (b - g < 0.15)
    blue = (b - g > 0.3) & (r - g < 0.15)
    purple = (r - g > 0.3) & (b - g > 0.3)
    return red, blue, purple


def test_figure7_overlay_png_has_colours_where_expected(tmp_path):
    image, truth, pred = case()
    out = figure7_overlay(image, truth, pred, tmp_path / "fig7.png", spacing_mm=SPACING, title="case 0")
    assert out == tmp_path / "fig7.png"
    assert [p.name for p in tmp_path.iterdir()] == ["fig7.png"]  # no temp file left behind
    png = imread(str(out))
    assert png.shape[:2] == (480, 1200)  # 12 x 4.8 inches at 100 dpi
    red, blue, purple = colour_masks(png)
    body = np.zeros(png.shape[:2], bool)
    body[60:420] = True  # image rows, away from title and legend
    assert (red & body).sum() > 50 and (blue & body).sum() > 50 and (purple & body).sum() > 50
    # Axial panel (left third): radiological view puts the patient's right (+x, where the prediction
    # overshoots) on the image's left, so red lies left of blue.
    axial = np.zeros_like(body)
    axial[60:420, :400] = True
    red_cols = np.nonzero(red & axial)[1]
    blue_cols = np.nonzero(blue & axial)[1]
    assert red_cols.mean() < blue_cols.mean()
    # the legend (bottom strip) shows all three colours
    legend = np.zeros_like(body)
    legend[430:] = True
    assert (red & legend).any() and (blue & legend).any() and (purple & legend).any()


def test_figure7_overlay_reorients_with_affine(tmp_path):
    image, truth, pred = case()
    ras = figure7_overlay(image, truth, pred, tmp_path / "ras.png", spacing_mm=SPACING)
    # the same volume stored left-to-right flipped (LAS), with an affine that says so
    affine = np.diag([-SPACING[0], SPACING[1], SPACING[2], 1.0])
    flipped = [a[::-1] for a in (image, truth, pred)]
    las = figure7_overlay(*flipped, tmp_path / "las.png", affine=affine)
    np.testing.assert_array_equal(imread(str(ras)), imread(str(las)))


def test_figure7_overlay_with_empty_masks(tmp_path):
    image, truth, _ = case()
    empty = np.zeros_like(truth)
    png = imread(str(figure7_overlay(image, empty, empty, tmp_path / "empty.png")))
    red, blue, purple = colour_masks(png)
    body = np.zeros(png.shape[:2], bool)
    body[40:420] = True
    assert not (red & body).any() and not (blue & body).any() and not (purple & body).any()
    with pytest.raises(ValueError):
        figure7_overlay(image, truth[:-1], truth[:-1], tmp_path / "bad.png")


def write_csv(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


COLUMNS = ["epoch", "train_loss", "val_loss", "train_dice", "val_dice", "train_accuracy", "val_accuracy"]


def test_training_curves(tmp_path):
    rows = [[e, 1 / e, 1.2 / e, 1 - 1 / (e + 1), 0.9 - 1 / (e + 1), 0.99, 0.98] for e in range(1, 6)]
    rows[2][2] = ""  # an epoch without validation: a gap, not an error
    src = tmp_path / "run" / "metrics.csv"
    src.parent.mkdir()
    write_csv(src, COLUMNS + ["lr"], [r + [1e-3] for r in rows])
    out = training_curves(src, tmp_path / "curves.png")
    png = imread(str(out))
    assert png.shape[:2] == (400, 1300)
    assert png[..., :3].std() > 0.05  # something was drawn


def test_training_curves_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.csv"
    write_csv(missing, ["epoch", "train_loss", "val_loss"], [[1, 0.5, 0.6]])
    with pytest.raises(UserError, match=r"missing\.csv.*train_dice"):
        training_curves(missing, tmp_path / "x.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty\.csv.*empty"):
        training_curves(empty, tmp_path / "x.png")
    header_only = tmp_path / "header.csv"
    write_csv(header_only, COLUMNS, [])
    with pytest.raises(UserError, match=r"header\.csv.*no epochs"):
        training_curves(header_only, tmp_path / "x.png")
    garbage = tmp_path / "garbage.csv"
    write_csv(garbage, COLUMNS, [[1, "abc", 1, 1, 1, 1, 1]])
    with pytest.raises(UserError, match=r"garbage\.csv.*train_loss"):
        training_curves(garbage, tmp_path / "x.png")
    with pytest.raises(UserError, match=r"nofile\.csv"):
        training_curves(tmp_path / "nofile.csv", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_figure7_outlines_missed_and_false_positive_lesions(tmp_path):
    from fullres.evaluate.lesions import lesion_masks

    image, truth, _ = case()
    far = sphere((4, 4, 4), 3)  # a second truth lesion, far from the first: no prediction reaches it
    stray = sphere((28, 4, 4), 3)  # a prediction component matching no truth lesion, in far's axial slice
    truth_two, pred = truth | far, truth | stray
    missed, false_positive = lesion_masks(pred, truth_two, SPACING)
    assert np.array_equal(missed, far) and np.array_equal(false_positive, stray)
    plain = imread(str(figure7_overlay(image, truth_two, pred, tmp_path / "plain.png", spacing_mm=SPACING)))
    marked = imread(str(figure7_overlay(image, truth_two, pred, tmp_path / "marked.png", spacing_mm=SPACING,
                                        missed=missed, false_positive=false_positive)))

    def yellow(png):
        r, g, b = png[..., 0], png[..., 1], png[..., 2]
        return (r > 0.8) & (g > 0.75) & (b < 0.3)

    def green(png):
        r, g, b = png[..., 0], png[..., 1], png[..., 2]
        return (g > 0.7) & (r < 0.3) & (b < 0.5)

    body = np.zeros(marked.shape[:2], bool)
    body[60:420] = True  # the panels, away from the orientation letters' rows... and the legend
    letters = yellow(plain) & body  # the orientation letters are yellow too
    assert (yellow(marked) & body & ~letters).sum() > 20  # the missed lesion's outline
    assert (green(marked) & body).sum() > 20 and not (green(plain) & body).any()
    legend = np.zeros_like(body)
    legend[430:] = True
    assert (green(marked) & legend).any() and not (green(plain) & legend).any()
