"""`fullres show`: Figure 7, prediction against truth in three views."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fullres.cli.commands import HELP
from fullres.cli.report import refuse_existing
from fullres.errors import UserError
from fullres.evaluate.lesions import CHALLENGES, DEFAULT_CHALLENGE


def add_parser(commands) -> None:
    show = commands.add_parser("show", help=HELP["show"])
    show.add_argument("image", help="the image (NIfTI, 3D or 4D)")
    show.add_argument("--pred", default=None, help="predicted mask (NIfTI)")
    show.add_argument("--label", default=None, help="ground-truth label map (NIfTI)")
    show.add_argument("--channel", type=int, default=0, help="channel of a 4D image (default 0: FLAIR in MSD)")
    show.add_argument("--title", default=None)
    show.add_argument("--out", required=True, help="PNG path (an existing file is kept unless --overwrite)")
    show.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    show.add_argument("--lesions", action="store_true",
                      help="outline the missed (yellow) and false-positive (green) lesions of the whole tumour, "
                           "matched as evaluate --lesion-wise matches them")
    show.add_argument("--challenge", choices=tuple(CHALLENGES), default=DEFAULT_CHALLENGE,
                      help=f"with --lesions: the lesion-wise parameters (default {DEFAULT_CHALLENGE})")
    show.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from fullres.data.nifti import open_nifti, read_array
    from fullres.evaluate.figures import figure7_overlay

    out = Path(args.out)
    for given in (args.image, args.pred, args.label):  # never over an input, whatever --overwrite says
        if given is not None and out.exists() and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise UserError(f"--out {args.out} is one of the inputs: give another path")
    refuse_existing(out, "--out", args.overwrite)

    image_nii = open_nifti(Path(args.image))
    image = read_array(image_nii, Path(args.image))
    if image.ndim not in (3, 4):
        raise UserError(f"{args.image}: a {image.ndim}D image (shape {image.shape}); show draws a 3D image or a "
                        "channel of a 4D one")
    if image.ndim == 4:
        if not 0 <= args.channel < image.shape[3]:
            raise UserError(f"--channel {args.channel}: {args.image} has {image.shape[3]} channels")
        image = image[..., args.channel]
    masks = []
    for path in (args.pred, args.label):
        if path is None:
            masks.append(np.zeros(image.shape, bool))
            continue
        array = read_array(open_nifti(Path(path)), Path(path))
        if array.shape != image.shape:
            raise UserError(f"{path}: shape {array.shape} differs from the image's {image.shape}")
        masks.append(array > 0)
    outlines = {}
    if args.lesions:  # the whole tumour's missed and false-positive lesions, as evaluate --lesion-wise finds them
        from fullres.evaluate.lesions import lesion_masks

        if args.pred is None or args.label is None:
            raise UserError("--lesions compares --pred with --label: give both")
        spacing = tuple(float(z) for z in image_nii.header.get_zooms()[:3])
        outlines = dict(zip(("missed", "false_positive"), lesion_masks(masks[0], masks[1], spacing, args.challenge)))
    out = figure7_overlay(image, masks[1], masks[0], Path(args.out), affine=image_nii.affine,
                          title=args.title or Path(args.image).name, **outlines)
    print(f"wrote {out}")
    return 0
