"""The words a job is described in, importable without torch: every fixed choice a command's flag offers
and the launch defaults. The command line builds its parsers from these (and :class:`fullres.job.strategy.Strategy`)
alone, so `--help` and a malformed argument are answered before torch is imported; each module that
implements a name takes its list from here (tests hold each implementation's registry to it)."""

from __future__ import annotations

PRECISIONS = ("fp32", "bf16", "fp16")
TARGET_CLASSES = {"wt": 1, "regions": 3, "classes": 4}  # output channels per --target (MSD Task01: 4 labels)
NORMS = ("none", "instance", "group", "batch")
LOSS_NAMES = ("dice", "dice_bce")  # fullres.engine.losses.LOSSES
SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
LAYOUTS = ("msd", "nnunet", "brats2021", "brats2023")  # fullres.data.layouts reads each
AUGMENTATIONS = ("none", "light", "default")  # fullres.data.augment
TRACKERS = ("tensorboard", "mlflow", "none")  # the names fullres.run.tracking.TRACKER_CLASSES opens
CROPS = ("center", "foreground")  # fullres.data.preprocess.sample_crop_box
MAX_THREADS, MAX_WORKERS = 4096, 1024  # more than any machine has: a larger value is a damaged config
# How long any collective or halo exchange waits for the other processes before it fails (gloo's and
# NCCL's own defaults are 30 and 10 minutes): long enough for one rank's largest level on a CPU.
COLLECTIVE_TIMEOUT_S = 1800
