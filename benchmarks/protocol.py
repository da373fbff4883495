"""The training protocol's evidence: the paper's protocol against resampling, random foreground windows and
augmentation, on synthetic CT made to need them, and K folds trained and ensembled.

The data (`fullres synth --kind ct`): one CT channel in Hounsfield units (air, fat, soft tissue, bone),
anisotropic voxels that differ per case (0.7-0.9 mm in-plane, 2-3 mm slices), lesions of modest contrast
anywhere in the body, including the first and last slices of a field of view larger than the training
window. Every run trains the same small network for the same number of epochs; each is scored on the
held-out test cases (`fullres predict` then `fullres evaluate`: Dice per case, mean and std).

Protocols (the flags that differ):
  paper     --augment none    --spacing none --crop center      (images as stored, one centred window)
  windows   --augment none    --spacing auto --crop foreground  (median spacing, random foreground windows)
  full      --augment default --spacing auto --crop foreground  (and the default augmentation)
Then `full` in K folds (`--folds K --fold i`): each fold's validation Dice from RUN/validation/summary.json,
each fold's test Dice, and the K runs' ensemble (`predict --ensemble`) on the test cases.

Prints a markdown table with the command, date, CPU features, torch version and commit, and writes
OUT/protocol.json. Minutes per run on 2 cores at the defaults.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from latency import cpu_features  # the benchmarks' one CPU-feature line (this folder is on sys.path)

HERE = Path(__file__).resolve().parent
PROTOCOLS = {
    "paper": ["--augment", "none", "--spacing", "none", "--crop", "center"],
    "windows": ["--augment", "none", "--spacing", "auto", "--crop", "foreground"],
    "full": ["--augment", "default", "--spacing", "auto", "--crop", "foreground"],
}


def fullres(*argv: str) -> float:
    """Run `python -m fullres ARGV`, failing loudly; the seconds it took."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fullres", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def test_dice(pred: Path) -> list[float]:
    """Per-case Dice of the masks in `pred`, from the metrics.csv `fullres evaluate` wrote there."""
    with open(pred / "metrics.csv") as file:
        return [float(row["dice"]) for row in csv.DictReader(file)]


def scored(run: Path, data: Path, ensemble: list[Path] = ()) -> list[float]:
    """The test cases of `data` predicted by `run` (and averaged with `ensemble`), then scored."""
    out = run / ("test_ensemble" if ensemble else "test")
    extra = ["--ensemble", *map(str, ensemble)] if ensemble else []
    fullres("predict", str(run), str(data), "--out", str(out), "--quiet", "--overwrite", *extra)
    fullres("evaluate", str(out), str(data), "--overwrite")
    return test_dice(out)


def summary(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "cases": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--test-cases", type=int, default=8)
    parser.add_argument("--image", nargs=3, type=int, default=[64, 64, 24], help="synth --shape (at the median spacing)")
    parser.add_argument("--shape", nargs=3, type=int, default=[48, 48, 16], help="the training window")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--protocols", nargs="+", choices=tuple(PROTOCOLS), default=list(PROTOCOLS))
    parser.add_argument("--folds", type=int, default=3, help="0: no folds")
    args = parser.parse_args()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / "ct"
    if not data.exists():
        fullres("synth", str(data), "--kind", "ct", "--cases", str(args.cases), "--test-cases", str(args.test_cases),
                "--shape", *map(str, args.image), "--seed", "0", "--quiet")
    job = ["--channels", "all", "--shape", *map(str, args.shape), "--filters", "8", "--batch", "2", "--norm",
           "instance", "--loss", "dice_bce", "--lr", "3e-3", "--dropout", "0", "--epochs", str(args.epochs),
           "--workers", "1", "--quiet", "--device", "cpu"]
    results: dict = {"protocols": {}, "folds": []}
    for name in args.protocols:
        for seed in args.seeds:
            run = args.out / "runs" / f"{name}-seed{seed}"
            seconds = fullres("train", str(data), "--out", str(run), *job, *PROTOCOLS[name], "--seed", str(seed)) \
                if not (run / "last.pt").exists() else None
            dice = scored(run, data)
            results["protocols"].setdefault(name, []).append({"seed": seed, "train_s": seconds, **summary(dice)})
            print(f"{name} seed {seed}: test Dice {statistics.fmean(dice):.3f}", file=sys.stderr)
    fold_runs = []
    for fold in range(args.folds):
        run = args.out / "runs" / f"full-fold{fold}"
        seconds = fullres("train", str(data), "--out", str(run), *job, *PROTOCOLS["full"], "--seed", "0",
                          "--folds", str(args.folds), "--fold", str(fold)) if not (run / "last.pt").exists() else None
        validation = json.loads((run / "validation" / "summary.json").read_text())["mean"]["WT"]["dice"]
        results["folds"].append({"fold": fold, "train_s": seconds, "validation_dice": validation,
                                 **summary(scored(run, data))})
        fold_runs.append(run)
    if fold_runs:
        results["ensemble"] = summary(scored(fold_runs[0], data, fold_runs[1:]))

    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    results["machine"] = {"date": str(datetime.date.today()), "cpu_features": cpu_features(),
                          "cores": os.cpu_count(), "torch": torch.__version__, "commit": commit,
                          "command": " ".join(["python", "benchmarks/protocol.py", *sys.argv[1:]])}
    (args.out / "protocol.json").write_text(json.dumps(results, indent=1))
    machine = results["machine"]
    print(f"`{machine['command']}` — {machine['date']}, {machine['cpu_features']}, {machine['cores']} cores, "
          f"torch {machine['torch']}, commit {commit}\n")
    print("| protocol | seed | test Dice (mean ± std over cases) | train s |\n|---|---|---|---|")
    for name, rows in results["protocols"].items():
        for row in rows:
            seconds = f"{row['train_s']:.0f}" if row["train_s"] else "-"
            print(f"| {name} | {row['seed']} | {row['mean']:.3f} ± {row['std']:.3f} | {seconds} |")
    if results["folds"]:
        print("\n| fold | validation Dice | test Dice (mean ± std) |\n|---|---|---|")
        for row in results["folds"]:
            print(f"| {row['fold']} | {row['validation_dice']:.3f} | {row['mean']:.3f} ± {row['std']:.3f} |")
        ensemble = results["ensemble"]
        print(f"| ensemble of {len(results['folds'])} | - | {ensemble['mean']:.3f} ± {ensemble['std']:.3f} |")


if __name__ == "__main__":
    main()
