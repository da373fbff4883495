"""The commands, in the pipeline's order, with the line `fullres --help` lists for each: the table the entry
point reads before it imports a command (and torch), and each command's parser takes its help from; the
parser class and the `--version` action, which import nothing heavy until used."""

from __future__ import annotations

import argparse

HELP = {
    "estimate": "memory a training job needs (whitepaper Table 1)",
    "plan": "does a job fit a machine's memory; largest batch and shape that do",
    "profile": "measure a training step's real peak memory against the dry run",
    "bench": "training-step speed: stock vs oneDNN, fp32 vs bf16, channels-last, compile",
    "sweep": "memory over many shapes: CSV, Figure 3 and Figure 5",
    "synth": "write a synthetic dataset (brain-tumour MRI, CT lesions or random)",
    "check": "validate every case of a dataset (MSD, nnU-Net, BraTS) before a long job",
    "convert": "rewrite a dataset in another layout, label values mapped",
    "train": "train the 3D U-Net on whole volumes (no DATA: a synthetic demo)",
    "demo": "the whole pipeline on built-in synthetic data (a few minutes on 2 cores)",
    "predict": "write NIfTI masks for images with a trained run",
    "export": "the trained network as ONNX or OpenVINO IR, verified against PyTorch",
    "evaluate": "Dice, NSD and HD95 per case and region (WT, TC, ET)",
    "show": "Figure 7: prediction (red) vs truth (blue) in three views",
    "nnunet": "nnU-Net v2: write plans whose patch and batch size fit a memory budget (nnunet plan)",
}


class Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


class VersionAction(argparse.Action):
    """`--version`: prints :func:`fullres.run.versions.describe` on stdout, unwrapped (argparse's own "version"
    action wraps it to the terminal's width), and exits 0. torch is imported only when it is asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the versions of fullres, torch, CUDA, oneDNN and Python, and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from fullres.run.versions import describe

        print(describe(), flush=True)
        parser.exit()
