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
MALLOC_ENV = "FULLRES_MALLOC"  # an allocator policy for every job (fullres.kernels.malloc.POLICIES)
# How long any collective or halo exchange waits for the other processes before it fails (gloo's and
# NCCL's own defaults are 30 and 10 minutes): long enough for one rank's largest level on a CPU.
COLLECTIVE_TIMEOUT_S = 1800
# fullres's own networks: the multiple every spatial size must be, and why (fullres.nets registers them
# with these), so that a shape they cannot take is refused before torch is imported.
OWN_DIVISORS = {"unet3d": (8, "the U-Net pools three times"), "intel-unet": (16, "intel-unet pools four times")}


def nearest_valid_sizes(size: int, divisor: int) -> tuple[int, int]:
    """The multiples of `divisor` just below and above `size` (the lower one at least `divisor`)."""
    lower = max(divisor, size // divisor * divisor)
    upper = -(-size // divisor) * divisor
    return lower, max(upper, divisor)


def check_sizes(shape: tuple[int, ...], divisor: int, why: str, network: str = "") -> None:
    """Raise ValueError, naming the nearest valid sizes, when a spatial size of `shape` is not a positive
    multiple of `divisor` (`why` says why; `network` prefixes the message)."""
    for axis, size in zip("HWD", shape):
        if size < divisor or size % divisor:
            lower, upper = nearest_valid_sizes(size, divisor)
            raise ValueError(f"{network}spatial size {axis}={size} is not divisible by {divisor} ({why}); "
                             f"nearest valid: {lower}" + (f" or {upper}" if upper != lower else ""))
