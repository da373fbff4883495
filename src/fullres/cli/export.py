"""`fullres export`: the trained network as ONNX or OpenVINO IR, verified against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.cli.options import add_trust_argument, positive_int
from fullres.cli.report import print_json


def add_parser(commands) -> None:
    export = commands.add_parser("export", help=HELP["export"])
    export.add_argument("run_dir", metavar="RUN", help="run folder (uses best.pt) or a checkpoint file")
    export.add_argument("--format", required=True, help="onnx or openvino")
    export.add_argument("--out", default=None, metavar="FILE",
                        help="the model file (default: RUN/export/model.onnx, or RUN/export/model.xml + .bin)")
    shape = export.add_mutually_exclusive_group()
    shape.add_argument("--shape", nargs=3, type=positive_int, metavar=("H", "W", "D"),
                       help="the input's spatial size (default: the run's)")
    shape.add_argument("--dynamic", action="store_true", help="any spatial size the network takes")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    export.add_argument("--json", action="store_true", help="machine-readable output")
    add_trust_argument(export)
    export.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.run.export import export_run

    result = export_run(Path(args.run_dir), args.format, Path(args.out) if args.out else None,
                        tuple(args.shape) if args.shape else None, args.dynamic, args.overwrite, args.trust_code)
    if args.json:
        print_json(result)
        return 0
    shape = "any H x W x D" if result["shape"] is None else " x ".join(map(str, result["shape"]))
    print(f"wrote {' + '.join(result['files'])} ({args.format}, input 1 x {result['in_channels']} x {shape}); verified against PyTorch at "
          f"{' x '.join(map(str, result['verified_shape']))}: max abs difference {result['max_abs_diff']:.1e} "
          f"(tolerance {result['tolerance']:g})")
    return 0
