"""`fullres synth`: a synthetic brain-tumour dataset in any of the four layouts, or a CT lesion dataset
with per-case anisotropic spacing (msd or nnunet layout)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.cli.options import positive_int
from fullres.terms import LAYOUTS


def add_parser(commands) -> None:
    synth = commands.add_parser("synth", help=HELP["synth"])
    synth.add_argument("out", help="output folder (created; must be empty or a previous synth output)")
    synth.add_argument("--cases", type=positive_int, required=True, help="training cases")
    synth.add_argument("--test-cases", type=positive_int, default=None, help="test cases (default: cases/4, at least 1)")
    synth.add_argument("--shape", nargs=3, type=positive_int, default=[240, 240, 155], metavar=("H", "W", "D"),
                       help="volume size (default 240 240 155, like BraTS); for --kind ct the grid at the median "
                            "spacing 0.8 0.8 2.5 mm: each case has round(H*0.8/sx) x round(W*0.8/sy) x "
                            "round(D*2.5/sz) voxels (at least 8) at its own spacing sx sy sz")
    synth.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    synth.add_argument("--kind", choices=("brats", "random", "ct"), default="brats",
                       help="brats: BraTS-like phantoms; random: the paper's random-valued inputs (Table 2); "
                            "ct: one-channel CT phantoms in HU with lesions, spacing 0.7-0.9 x 0.7-0.9 x 2-3 mm "
                            "per case (msd or nnunet layout)")
    synth.add_argument("--dtype", choices=("int16", "float32"), default="int16", help="image voxel type")
    synth.add_argument("--layout", choices=LAYOUTS, default="msd",
                       help="msd (default), nnunet, brats2021 or brats2023: files, names and label values")
    synth.add_argument("--quiet", action="store_true", help="no progress bar")
    synth.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.data.synth import write_dataset

    test_cases = args.test_cases if args.test_cases is not None else max(1, args.cases // 4)
    out = write_dataset(Path(args.out), train_cases=args.cases, test_cases=test_cases, shape=tuple(args.shape),
                        seed=args.seed, kind=args.kind, dtype=args.dtype, progress=not args.quiet,
                        layout=args.layout)
    channels = 1 if args.kind == "ct" else 4
    grid = " at the median spacing" if args.kind == "ct" else ""
    print(f"wrote {args.cases} training and {test_cases} test cases ({args.kind}, "
          f"{' x '.join(map(str, args.shape))} x {channels}{grid}"
          + (f", {args.layout} layout" if args.layout != "msd" else "") + f") to {out}")
    return 0
