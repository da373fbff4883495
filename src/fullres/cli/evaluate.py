"""`fullres evaluate`: Dice, NSD, HD95 (and BraTS 2023 lesion-wise scores) per case and region."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.cli.options import positive_float
from fullres.cli.report import print_json, refuse_existing, starts_with
from fullres.errors import UserError
from fullres.evaluate.lesions import CHALLENGES, DEFAULT_CHALLENGE
from fullres.terms import LAYOUTS


def add_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help=HELP["evaluate"])
    evaluate.add_argument("pred", help="folder of predicted masks")
    evaluate.add_argument("labels", metavar="LABELS",
                          help="folder of ground-truth label maps (same file names), or a dataset folder (MSD, "
                               "nnU-Net, BraTS): the labels of the predicted cases, read by case id")
    evaluate.add_argument("--tolerance", type=positive_float, default=1.0, help="NSD tolerance in mm (default 1)")
    evaluate.add_argument("--wt-only", action="store_true", help="predictions are {0,1} whole-tumour masks")
    evaluate.add_argument("--csv", default=None,
                          help="CSV path (default: PRED/metrics.csv; an earlier evaluate's CSV is replaced)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace a --csv that evaluate did not write")
    evaluate.add_argument("--layout", choices=LAYOUTS, default=None,
                          help="the labels' layout, for the values of WT/TC/ET (default: from PRED/prediction.json "
                               "or the labels' folder; else MSD's)")
    evaluate.add_argument("--lesion-wise", action="store_true",
                          help="also BraTS 2023's lesion-wise Dice and HD95, and lesion counts, per region")
    evaluate.add_argument("--challenge", choices=tuple(CHALLENGES), default=None,
                          help=f"the lesion-wise parameters (default {DEFAULT_CHALLENGE})")
    evaluate.add_argument("--json", action="store_true", help="machine-readable output")
    evaluate.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.evaluate.inputs import dataset_labels_of, evaluation_regions, predictions_are_binary
    from fullres.evaluate.metrics import METRIC_NAMES, evaluate_folders, result_columns, write_metrics_csv

    if args.challenge is not None and not args.lesion_wise:
        raise UserError("--challenge sets the lesion-wise parameters: it needs --lesion-wise")
    rule = (args.challenge or DEFAULT_CHALLENGE) if args.lesion_wise else None
    csv_path = Path(args.csv) if args.csv else Path(args.pred) / "metrics.csv"
    refuse_existing(csv_path, "--csv", args.overwrite, starts_with(",".join(["case", "region", *METRIC_NAMES])))
    labels, dataset = dataset_labels_of(Path(args.labels), args.layout)
    layout, label_regions = evaluation_regions(Path(args.pred), Path(args.labels), args.layout, dataset)
    result = evaluate_folders(args.pred, labels, tolerance_mm=args.tolerance, regions=label_regions,
                              pred_is_binary_wt=args.wt_only or predictions_are_binary(Path(args.pred)),
                              lesion_rule=rule)
    write_metrics_csv(result, csv_path)
    if args.json:
        print_json(result)
        return 0
    columns = result_columns(result)
    headers = {"dice": "Dice", "nsd": "NSD", "hd95": "HD95 (mm)", "lesion_dice": "L-Dice", "lesion_hd95": "L-HD95",
               "truth_lesions": "lesions", "matched_lesions": "matched", "missed_lesions": "missed",
               "fp_lesions": "FP"}

    def cells(values: dict) -> str:  # distances and mean counts with 2 decimals, scores with 3, counts whole
        return "".join(f"{values[m]:>11d}" if isinstance(values[m], int)
                       else f"{values[m]:>11.2f}" if m.endswith(("hd95", "lesions")) else f"{values[m]:>11.3f}"
                       for m in columns)

    width = max([16, *(len(case) + 2 for case in result["cases"])])  # BraTS 2023 names are 19 characters
    print(f"{'case':<{width}}{'region':<8}" + "".join(f"{headers.get(m, m):>11}" for m in columns))
    for case, regions in result["cases"].items():
        for region, values in regions.items():
            print(f"{case:<{width}}{region:<8}{cells(values)}")
    for region, metrics in result["summary"].items():
        print(f"{'mean ± std':<{width}}{region:<8}{cells({m: metrics[m]['mean'] for m in columns})}"
              + "   (std " + ", ".join(f"{metrics[m]['std']:.3f}" for m in columns) + ")")
    print(f"NSD tolerance {args.tolerance} mm; labels as {layout} ("
          + ", ".join(f"{name} = {{{', '.join(map(str, values))}}}" for name, values in label_regions.items())
          + ")" + (f"; lesion-wise as {rule} (docs/evaluation.md)" if rule else "") + f"; CSV: {csv_path}")
    return 0
