"""A job described as data: the network, the input, and the exact-gradient memory strategies.

One `JobConfig` describes one training job for every command (estimate, plan, train, profile,
bench). It is validated once, at the CLI, and serialised to JSON next to every run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from fullres.model import ModelConfig, slab_rows, validate_spatial_shape

PRECISIONS = ("fp32", "bf16", "fp16")
PAPER_SHAPE = (240, 240, 144)  # BraTS 240x240x155, depth cropped to 144 (whitepaper Table 1)
PAPER_BATCH = 16


@dataclass(frozen=True)
class Strategy:
    """How a training step trades compute for memory. All but `precision` keep gradients exact."""

    checkpointing: bool = False  # recompute activations in the backward pass
    accumulate: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # autocast dtype: fp32 (off), bf16, fp16 (CUDA, with a gradient scaler)
    channels_last: bool = False  # channels_last_3d memory format
    slabs: int = 1  # full-resolution levels computed (and recomputed in backward) in this many slabs along H

    def __post_init__(self) -> None:
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.slabs < 1:
            raise ValueError(f"slabs must be >= 1, got {self.slabs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def describe(self) -> str:
        parts = [self.precision]
        if self.checkpointing:
            parts.append("checkpointing")
        if self.accumulate > 1:
            parts.append(f"accumulate x{self.accumulate}")
        if self.channels_last:
            parts.append("channels-last")
        if self.slabs > 1:
            parts.append(f"{self.slabs} slabs")
        return " + ".join(parts)


@dataclass(frozen=True)
class JobConfig:
    """One training job: `batch` is the micro-batch of one forward/backward; the optimizer sees
    `batch * strategy.accumulate` samples per step."""

    model: ModelConfig = field(default_factory=ModelConfig)
    shape: tuple[int, int, int] = PAPER_SHAPE
    batch: int = PAPER_BATCH
    strategy: Strategy = field(default_factory=Strategy)

    def __post_init__(self) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"shape must be H W D, got {self.shape}")
        validate_spatial_shape(self.shape)
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.strategy.slabs > 1:
            slab_rows(self.shape[0], self.strategy.slabs)  # raises when H cannot hold that many slabs
            if self.model.norm != "none":
                raise ValueError(f"slabs need norm 'none': {self.model.norm} normalisation takes its statistics over "
                                 "the whole volume, so slab by slab it would not be exact")

    @property
    def effective_batch(self) -> int:
        return self.batch * self.strategy.accumulate

    def with_(self, **changes) -> "JobConfig":
        return replace(self, **changes)

    def at_shape(self, shape: tuple[int, int, int]) -> "JobConfig":
        """This job at another shape; slabs capped at what its H holds (2 rows each at least)."""
        slabs = min(self.strategy.slabs, max(1, shape[0] // 2))
        return replace(self, shape=tuple(shape), strategy=replace(self.strategy, slabs=slabs))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "JobConfig":
        return cls(model=ModelConfig(**data["model"]), shape=tuple(data["shape"]), batch=data["batch"],
                   strategy=Strategy(**data["strategy"]))
