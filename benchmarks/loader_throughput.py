"""Full-resolution loader throughput: how fast the cache feeds 240x240x144x4 cases to training.

Synthesizes a few 240x240x155 BraTS-like cases into a temporary folder, fills the preprocessed cache
(first pass, timed on its own: gzip decompression + z-score + crop), then reads the cases through the
DataLoader for several warm passes and reports the median cases/s. Prints one JSON object.

    python benchmarks/loader_throughput.py [--cases 4] [--passes 5] [--workers 2] [--batch 1]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fullres.cost.steptime import cpu_model
from fullres.data.preprocess import DataConfig
from fullres.data.msd import MSDDataset, make_loader
from fullres.data import load_dataset_json
from fullres.data.synth import write_dataset

SOURCE_SHAPE = (240, 240, 155)
SAMPLE_SHAPE = (240, 240, 144)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fullres-loader-") as temp:
        root = Path(temp) / "Task01_synth"
        start = time.perf_counter()
        write_dataset(root, args.cases, 0, shape=SOURCE_SHAPE, seed=0, progress=False)
        synth_s = time.perf_counter() - start

        index = load_dataset_json(root)
        config = DataConfig(channels=(0, 1, 2, 3), target="wt", shape=SAMPLE_SHAPE)
        dataset = MSDDataset.from_index(index, config, cache_dir=root / ".fullres_cache")
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        fill_s = time.perf_counter() - start

        loader = make_loader(dataset, batch=args.batch, shuffle=True, workers=args.workers, seed=0, device_type="cpu")
        for _ in loader:  # warm-up: starts the persistent workers, pulls the cache into the page cache
            pass
        rates = []
        for _ in range(args.passes):
            start = time.perf_counter()
            seen = 0
            for image, target in loader:
                assert image.shape[1:] == (4,) + SAMPLE_SHAPE and target.shape[1:] == (1,) + SAMPLE_SHAPE
                seen += image.shape[0]
            rates.append(seen / (time.perf_counter() - start))

    image_mb = 4 * int(np.prod(SAMPLE_SHAPE)) * 4 / 1e6
    median = statistics.median(rates)
    print(json.dumps({
        "benchmark": "loader_throughput",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version(),
                    "torch": torch.__version__, "numpy": np.__version__},
        "cases": args.cases, "workers": args.workers, "batch": args.batch, "passes": args.passes,
        "source_shape": list(SOURCE_SHAPE), "sample_shape": [4, *SAMPLE_SHAPE],
        "sample_image_MB": round(image_mb, 1),
        "synth_seconds_per_case": round(synth_s / args.cases, 3),
        "cache_fill_seconds_per_case": round(fill_s / args.cases, 3),
        "warm_cases_per_s": [round(r, 2) for r in rates],
        "warm_median_cases_per_s": round(median, 2),
        "warm_median_image_MB_per_s": round(median * image_mb, 1),
    }, indent=2))


if __name__ == "__main__":
    main()
