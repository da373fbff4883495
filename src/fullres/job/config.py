"""Jobs and runs described as data (frozen dataclasses, validated once, saved as JSON).

* `Strategy` (:mod:`fullres.job.strategy`): how a step trades compute for memory (all exact but the
  precision).
* `JobConfig`: the network, the input and the strategy: one training job for every command (estimate,
  plan, train, profile, bench).
* `TrainConfig`: a whole run (job, data, optimisation, machine settings), saved as RUN/config.json and
  read back by resume and predict.

Defaults live in :mod:`fullres.presets`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from fullres.data.preprocess import DataConfig
from fullres.engine.losses import LOSSES
from fullres.nets.unet3d import LEVELS as SLAB_LEVELS
from fullres.nets.registry import ModelConfig
from fullres.nets.registry import check_divisible, model_spec, slab_levels, slab_refusal
from fullres.engine.slabs import slab_rows
from fullres.presets import DEMO, PAPER, PRESETS
from fullres.job.strategy import Strategy
from fullres.schema import from_data
from fullres.terms import AUGMENTATIONS, DEVICES, MAX_THREADS, MAX_WORKERS, SCHEDULES, TRACKERS


def _first_whole_level(counts, recompute_inputs: int) -> int | None:
    """The first of levels 0..recompute_inputs (those that make and read the recomputed inputs) that runs whole
    under per-level slab `counts` (missing counts: whole); None if all are slabbed."""
    padded = tuple(counts) + (1,) * (recompute_inputs + 1)
    return next((level for level in range(recompute_inputs + 1) if padded[level] == 1), None)


@dataclass(frozen=True)
class JobConfig:
    """One training job: `batch` is the micro-batch of one forward/backward; the optimizer sees
    `batch * strategy.accumulate` samples per step."""

    model: ModelConfig = field(default_factory=ModelConfig)
    shape: tuple[int, int, int] = PAPER.shape
    batch: int = PAPER.batch
    strategy: Strategy = field(default_factory=Strategy)

    def describe(self) -> str:
        """The job in one line, as every command prints it: batch x channels x shape, filters, strategy."""
        return (f"batch {self.batch} x {self.model.in_channels} x {' x '.join(map(str, self.shape))}, "
                f"{self.model.filters} base filters, {self.strategy.describe()}")

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"shape must be H W D, got {self.shape}")
        check_divisible(self.model, self.shape)
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        widest = max(self.model.in_channels, 32 * self.model.filters, self.model.classes)
        if self.batch * widest * self.shape[0] * self.shape[1] * self.shape[2] >= 2**62 or \
                (16 * self.model.filters) ** 2 * 27 >= 2**62:
            raise ValueError(f"batch {self.batch} x {'x'.join(map(str, self.shape))} with {self.model.filters} filters "
                             "is too large: its tensors would have more elements than 64-bit sizes can count")
        if self.strategy.slabbed:
            refusal = slab_refusal(self.model.architecture)
            if refusal:
                raise ValueError(f"slabs: {refusal}")
            counts, levels = self.strategy.slab_counts, slab_levels(self.model)
            if levels is not None and len(counts) > levels:
                raise ValueError(f"--coarse-slabs: {self.model.architecture} has {levels - 1} levels below full "
                                 f"resolution, got {len(counts) - 1} counts ({self.strategy.coarse_slabs})")
            for level, count in enumerate(counts):  # raises when a level's H cannot hold that many slabs
                try:
                    slab_rows(self.shape[0] >> level, count)
                except ValueError as error:
                    flag = "--slabs" if level == 0 else f"--coarse-slabs (level 1/{2 ** level})"
                    raise ValueError(f"{flag}: {error}") from None
        levels = self.strategy.checkpoint_levels
        if levels:
            if not model_spec(self.model.architecture).slabs:
                raise ValueError(f"--checkpoint-levels: the {self.model.architecture} network is checkpointed block by "
                                 "block, not by resolution level; use --checkpointing alone")
            if levels >= SLAB_LEVELS:
                raise ValueError(f"--checkpoint-levels: {self.model.architecture} has {SLAB_LEVELS} levels: give 1 to "
                                 f"{SLAB_LEVELS - 1} (0, the default, checkpoints every level), got {levels}")
        recompute = self.strategy.recompute_inputs
        if recompute:
            levels = slab_levels(self.model)
            below = 0 if slab_refusal(self.model.architecture) else None if levels is None else levels - 1
            if below is not None and recompute > below:
                raise ValueError(f"--recompute-inputs: {self.model.architecture} has {below} levels whose "
                                 f"input can be recomputed, got {recompute}")
            whole = _first_whole_level(self.strategy.slab_counts, recompute)
            if whole is not None:  # a whole level would compute (or read) a recomputed map whole: nothing saved
                raise ValueError(f"--recompute-inputs {recompute}: the levels that make and read each recomputed input "
                                 f"must be slabbed, and level 1/{2 ** whole} runs whole (see --slabs, --coarse-slabs)")

    @property
    def effective_batch(self) -> int:
        return self.batch * self.strategy.accumulate

    def with_(self, **changes) -> "JobConfig":
        return replace(self, **changes)

    def at_shape(self, shape: tuple[int, int, int]) -> "JobConfig":
        """This job at another shape; each level's slabs capped at what its H holds (2 rows each at least)."""
        counts = [min(count, max(1, (shape[0] >> level) // 2)) for level, count in enumerate(self.strategy.slab_counts)]
        coarse = ",".join(map(str, counts[1:])) if self.strategy.coarse_slabs else ""
        whole = _first_whole_level(counts, self.strategy.recompute_inputs)
        recompute = self.strategy.recompute_inputs if whole is None else max(0, whole - 1)  # between slabbed levels only
        return replace(self, shape=tuple(shape), strategy=replace(self.strategy, slabs=counts[0], coarse_slabs=coarse,
                                                                  recompute_inputs=recompute))

    def to_json(self) -> dict:
        return {**asdict(self), "model": self.model.to_json()}

    @classmethod
    def from_json(cls, data: dict, where: str = "job") -> "JobConfig":
        """The job `data` describes, every field checked against its type first (:mod:`fullres.schema`):
        UserError naming the field otherwise."""
        return from_data(cls, data, where)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as RUN_DIR/config.json and read back by resume and predict."""

    job: JobConfig
    data: DataConfig
    data_dir: str  # the dataset folder trained on (the synthetic one inside RUN_DIR for the demo)
    epochs: int = PAPER.epochs
    lr: float = PAPER.lr
    loss: str = PAPER.loss
    seed: int = PAPER.seed
    val_fraction: float = PAPER.val_fraction
    device: str = "auto"
    threads: int = 0  # 0: one per physical core (the paper's setting)
    workers: int = 1
    schedule: str = PAPER.schedule
    strategy_choice: str = "manual"  # how job.strategy was chosen: manual, or auto (by the preflight)
    layout: str | None = None  # the dataset's layout (fullres.data.LAYOUTS), as detected or forced
    tracker: str = "tensorboard"  # where metrics go besides the run folder (fullres.run.tracking)
    # augmentation of the training samples (fullres.data.augment); "none" for a run saved before it existed,
    # so such a run resumes as it trained (new runs take their preset's, fullres.presets)
    augment: str = "none"
    # cross-validation: fold `fold` of `folds` (fullres.data.msd.fold_splits); folds 0 is the single seeded
    # split by val_fraction (what a run saved before folds existed used)
    folds: int = 0
    fold: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"--seed must be in 0..{2**32 - 1}, got {self.seed}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (0 <= self.threads <= MAX_THREADS and 0 <= self.workers <= MAX_WORKERS):
            raise ValueError(f"--threads must be in 0..{MAX_THREADS} and --workers in 0..{MAX_WORKERS}, got "
                             f"{self.threads} and {self.workers}")
        if self.device not in DEVICES:
            raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.tracker not in TRACKERS:
            raise ValueError(f"--tracker must be one of {', '.join(TRACKERS)}, got {self.tracker!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"--augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}")
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"--folds must be at least 2, got {self.folds}")
        if self.folds == 0 and self.fold != 0:
            raise ValueError(f"--fold {self.fold} needs --folds K (K >= 2 cross-validation folds)")
        if self.folds and not 0 <= self.fold < self.folds:
            raise ValueError(f"--fold {self.fold} is out of range for --folds {self.folds} (0..{self.folds - 1})")
        if self.strategy_choice not in ("manual", "auto"):
            raise ValueError(f"strategy_choice must be manual or auto, got {self.strategy_choice!r}")
        if not self.data_dir:
            raise ValueError("data_dir must name the dataset folder")
        if tuple(self.data.shape) != tuple(self.job.shape):
            raise ValueError(f"data shape {self.data.shape} differs from the model's input shape {self.job.shape}")

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["job"], values["data"] = self.job.to_json(), self.data.to_json()
        return values

    @classmethod
    def from_json(cls, data: dict, where: str = "config") -> "TrainConfig":
        """The run `data` describes (a config.json, a checkpoint's "config"), every field checked against its
        type first (:mod:`fullres.schema`): UserError naming the field otherwise. Nothing is imported or built."""
        return from_data(cls, data, where)


def job_defaults(architecture: str = "unet3d", demo: bool = False) -> dict:
    """Every job flag's and training option's default (CLI names) for a job of `architecture`: its own
    preset where it has one (intel-unet), else the paper's; with `demo`, the demo's sizes and optimisation
    with the network's own normalisation and dropout."""
    try:
        own = PRESETS.get(model_spec(architecture).preset)
    except ValueError:
        own = None  # an unknown network: ModelConfig names it when the job is built
    preset = DEMO if demo else own or PAPER
    values = preset.values()
    if demo and own is not None:
        values.update(norm=own.norm, dropout=own.dropout)
    machine = {spec.name: spec.default for spec in fields(TrainConfig) if spec.name in ("device", "threads", "workers")}
    return {**values, **{spec.name: spec.default for spec in fields(Strategy)}, **machine,
            "model": architecture, "model_args": ""}
