"""`fullres predict`: NIfTI masks for images with a trained run."""

from __future__ import annotations

import argparse
from pathlib import Path

from fullres.cli.commands import HELP
from fullres.cli.options import add_launch_arguments, add_trust_argument, memory_size
from fullres.terms import LAYOUTS


def add_parser(commands) -> None:
    predict = commands.add_parser("predict", help=HELP["predict"])
    predict.add_argument("run_dir", metavar="RUN", help="run folder (uses best.pt) or a checkpoint file")
    predict.add_argument("inputs", nargs="+",
                         help="NIfTI images, a BraTS case folder (its modality files: one case), a dataset folder "
                              "(its test cases; see --cases), or a folder of NIfTI images")
    predict.add_argument("--cases", choices=("test", "all"), default="test",
                         help="which cases of a dataset folder: test (default), or all: every case, the training "
                              "cases included (their masks are no held-out result)")
    predict.add_argument("--ensemble", nargs="+", action="extend", default=[], metavar="RUN",
                         help="more runs (or checkpoints) whose probabilities are averaged with RUN's; they must "
                              "agree on target, channels and preprocessing. Give it after the inputs")
    predict.add_argument("--out", required=True, help="folder for the masks (<case>.nii.gz)")
    predict.add_argument("--probabilities", action="store_true", help="also write <case>_prob.nii.gz")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument("--layout", choices=LAYOUTS, default=None,
                         help="the input folders' layout (default: detected); masks follow its names and labels")
    predict.add_argument("--overwrite", action="store_true",
                         help="replace masks in --out that an earlier predict did not write (never the inputs)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.add_argument("--engine", choices=("torch", "onnx", "openvino"), default="torch",
                         help="torch (default), or the run's exported model through ONNX Runtime or OpenVINO (CPU)")
    predict.add_argument("--engine-file", default=None, metavar="FILE",
                         help="the exported model (default: the run's own, RUN/export/model.onnx or model.xml)")
    predict.add_argument("--memory", type=memory_size, default=None, metavar="SIZE",
                         help="memory the inference plan must fit (default: what is available now), e.g. 8GiB")
    add_launch_arguments(predict, "volume", "computing its rows (along H) of every level (exact); processes / S "
                                            "volumes at a time")
    add_trust_argument(predict)
    predict.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.kernels.device import configure_cpu, memory_device, pick_device, process_group
    from fullres.run.predict import predict_files

    choice = args.device if args.engine == "torch" else "cpu"
    with process_group(memory_device(choice), args.timeout) as process:  # one process without torchrun
        device = pick_device(choice, process)
        if process.world > 1 and device.type == "cpu":
            configure_cpu(0, process)  # the cores shared between the local processes
        written = predict_files(Path(args.run_dir), args.inputs, Path(args.out), device,
                                probabilities=args.probabilities, progress=not args.quiet, layout=args.layout,
                                overwrite=args.overwrite, engine=args.engine,
                                engine_file=Path(args.engine_file) if args.engine_file else None,
                                memory=args.memory, process=process, spatial=args.spatial,
                                trust_code=args.trust_code, case_set=args.cases,
                                ensemble=tuple(Path(extra) for extra in args.ensemble))
    if process.main:
        print(f"wrote {len(written)} mask(s) to {args.out}")
    return 0
