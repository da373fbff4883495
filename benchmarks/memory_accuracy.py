"""Issue 6's accuracy goal: dry-run estimate vs measured peak over 32^3-160^3 (non-cubic too), batch 1-4,
fp32 and bf16, with and without checkpointing. A thin wrapper over `fullres sweep` with that grid.

    python benchmarks/memory_accuracy.py OUT [--quick] [--precisions fp32 bf16] [--max-measure 18GiB]

Writes OUT/sweep.csv, Figure 3 and Figure 5. It takes hours on 2 cores (bf16 is emulated without
AVX-512-BF16); --quick keeps shapes <= 64 a side and batch 1.
"""

from __future__ import annotations

import argparse
import sys

from fullres.cli import main as fullres

SHAPES = ["32", "48", "64", "32x48x64", "96", "96x96x64", "128", "160x128x96", "160"]
QUICK_SHAPES = ["32", "48", "64", "32x48x64"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--max-measure", default="18GiB")
    args = parser.parse_args(argv)
    shapes, batches = (QUICK_SHAPES, ["1"]) if args.quick else (SHAPES, ["1", "2", "4"])
    return fullres(["sweep", "--shapes", *shapes, "--batches", *batches, "--precisions", *args.precisions,
                    "--checkpointing-sweep", "both", "--max-measure", args.max_measure, "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
