"""`fullres demo`: the whole pipeline on built-in synthetic data, as the commands a user would type."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.errors import UserError


def add_parser(commands, build_parser) -> None:
    """`build_parser`: the whole command line's parser, which the demo runs each step through."""
    demo = commands.add_parser("demo", help=HELP["demo"])
    demo.add_argument("--out", default="fullres-demo", help="results folder (default: ./fullres-demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--model", default=None, metavar="NAME", help="the network to train (default: unet3d; see train)")
    demo.add_argument("--model-args", default=None, metavar="JSON", help="its keyword arguments (JSON)")
    demo.set_defaults(run=run, build_parser=build_parser)


DEMO_MARKER = ".fullres-demo"


def run(args: argparse.Namespace) -> int:
    """The whole pipeline on the embedded synthetic default, as the commands a user would type."""
    import shutil

    from fullres.kernels.device import Process, available_memory, pick_device

    out = Path(args.out).absolute()
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).exists():
            raise UserError(f"--out {out} is not empty and is not a previous demo; choose a new folder")
        shutil.rmtree(out)  # only ever a folder this command wrote (it carries the marker)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("written by `fullres demo`; the next demo replaces this folder\n")
    run, data = out / "run", out / "run" / "synthetic_data"
    device = pick_device("auto", Process())  # where `train` below will run (CUDA when present)
    budget = f"{available_memory(device) / 2**30:.1f}GiB"
    quiet = ["--quiet"] if args.quiet else []
    model = (["--model", args.model] if args.model else []) + (["--model-args", args.model_args] if args.model_args else [])
    steps = [
        ("1/7 estimate: the paper's job, Table 1 method", ["estimate"]),
        ("2/7 plan: the paper's job on its 1.5 TB server (Table 2)", ["plan", "--memory", "1.5TB", "--device", "cpu"]),
        ("3/7 plan: the demo job on this machine (dry-run method)",
         ["plan", "--memory", budget, "--method", "dryrun", "--shape", "48", "48", "32", "--filters", "8",
          "--batch", "2", "--device", device.type,
          *(model or ["--norm", "instance"])]),
        ("4/7 train: synthetic BraTS-like data, whole 48x48x32 volumes", ["train", "--out", str(run), *quiet, *model]),
        ("5/7 predict: the held-out synthetic test cases", ["predict", str(run), str(data), "--out",
                                                             str(out / "predictions"), *quiet]),
        ("6/7 evaluate: Dice, NSD, HD95 against the kept-aside test labels",
         ["evaluate", str(out / "predictions"), str(data / "labelsTs")]),
    ]
    parser = args.build_parser()
    for title, argv in steps:
        print(f"\n== {title}\n$ fullres {' '.join(argv)}", flush=True)
        step = parser.parse_args(argv)
        code = step.run(step)
        if code:
            return code
    print("\n== 7/7 show: Figure 7 overlays (prediction red, truth blue, overlap purple)")
    figures = out / "figures"
    for mask in sorted((out / "predictions").glob("*.nii.gz")):
        argv = ["show", str(data / "imagesTs" / mask.name), "--pred", str(mask), "--label",
                str(data / "labelsTs" / mask.name), "--out", str(figures / mask.name.replace(".nii.gz", ".png"))]
        step = parser.parse_args(argv)
        code = step.run(step)
        if code:
            return code
    print(f"\nDone. Results in {out}/:\n  run/          config.json, metrics.csv, best.pt, last.pt, curves.png, "
          f"overlay_*.png, tb/\n  predictions/  masks (NIfTI, original geometry) and metrics.csv\n"
          f"  figures/      Figure 7 overlays of the test cases")
    return 0
