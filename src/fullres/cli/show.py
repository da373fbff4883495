"""`fullres show`: Figure 7, prediction against truth in three views."""

from __future__ import annotations

import argparse
from pathlib import Path

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
    from fullres.evaluate.figures import overlay_files

    out = Path(args.out)
    for given in (args.image, args.pred, args.label):  # never over an input, whatever --overwrite says
        if given is not None and out.exists() and Path(given).exists() and out.resolve() == Path(given).resolve():
            raise UserError(f"--out {args.out} is one of the inputs: give another path")
    refuse_existing(out, "--out", args.overwrite)

    out = overlay_files(Path(args.image), Path(args.pred) if args.pred else None,
                        Path(args.label) if args.label else None, out, channel=args.channel, title=args.title,
                        lesions=args.lesions, challenge=args.challenge)
    print(f"wrote {out}")
    return 0
