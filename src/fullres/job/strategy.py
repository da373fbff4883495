"""How a training step trades compute for memory (:class:`Strategy`), as data: importable without torch, so
the command line builds every job flag from its fields before torch is imported. What each field does is
in :mod:`fullres.job.step`; the job it belongs to, :class:`fullres.job.config.JobConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fullres.terms import PRECISIONS


def _canonical_counts(text) -> str:
    """--coarse-slabs as canonical text: positive counts joined by commas, trailing 1s dropped ("" for none)."""
    if isinstance(text, (tuple, list)):
        text = ",".join(map(str, text))
    text = str(text).replace(" ", "")
    if not text:
        return ""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--coarse-slabs must be counts separated by commas (e.g. 8,4,2), got {text!r}") from None
    if any(count < 1 for count in counts):
        raise ValueError(f"--coarse-slabs counts must be >= 1, got {text!r}")
    while counts and counts[-1] == 1:
        counts.pop()
    return ",".join(map(str, counts))


@dataclass(frozen=True)
class Strategy:
    """How a training step trades compute for memory. All but `precision` keep gradients exact.

    Each field is a job flag of every command (`--channels-last` for `channels_last`): its metadata gives
    the flag's help, and for an int its metavar, for a str its choices. What a field does is in
    :mod:`fullres.job.step`."""

    checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    checkpoint_levels: int = field(default=0, metadata={
        "metavar": "K", "help": "with --checkpointing: checkpoint only the K finest resolutions (full resolution "
                                "first, the largest maps); coarser levels keep their activations and recompute "
                                "nothing (default 0: every level; networks with levels)"})
    accumulate: int = field(default=1, metadata={"metavar": "K", "help": "K micro-batches of --batch per optimizer step"})
    precision: str = field(default="fp32", metadata={
        "choices": PRECISIONS, "help": "autocast precision (bf16/fp16 approximate the fp32 numerics; fp16 needs CUDA)"})
    channels_last: bool = field(default=False, metadata={"help": "channels_last_3d memory format"})
    slabs: int = field(default=1, metadata={
        "metavar": "S", "help": "compute the full-resolution levels in S slabs along H, each recomputed in backward "
                                "(exact, normalisation included; any convolutional network, not UNETR or SwinUNETR)"})
    coarse_slabs: str = field(default="", metadata={
        "metavar": "S1,S2,...", "help": "slabs of each coarser level, half resolution first (e.g. 8,4,2 with --slabs 16; "
                                        "default: whole), their skips recomputed from each level's stored input"})
    recompute_inputs: int = field(default=0, metadata={
        "metavar": "K", "help": "with slabs: the inputs of the K levels below full resolution (half resolution first) "
                                "are recomputed from the slabbed level above wherever read, not stored (less memory, "
                                "more FLOPs)"})
    offload: bool = field(default=False, metadata={
        "help": "keep saved activations in host memory until backward (exact; CUDA only)"})

    def __post_init__(self) -> None:
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.slabs < 1:
            raise ValueError(f"slabs must be >= 1, got {self.slabs}")
        if self.recompute_inputs < 0:
            raise ValueError(f"recompute_inputs must be >= 0, got {self.recompute_inputs}")
        if self.checkpoint_levels < 0:
            raise ValueError(f"checkpoint_levels must be >= 0, got {self.checkpoint_levels}")
        if self.checkpoint_levels and not self.checkpointing:
            raise ValueError("--checkpoint-levels chooses the levels --checkpointing recomputes: give --checkpointing too")
        object.__setattr__(self, "coarse_slabs", _canonical_counts(self.coarse_slabs))
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def slab_counts(self) -> tuple[int, ...]:
        """Slabs per resolution, full resolution first (trailing whole levels left out)."""
        counts = (self.slabs, *(int(c) for c in self.coarse_slabs.split(",") if c))
        while len(counts) > 1 and counts[-1] == 1:
            counts = counts[:-1]
        return counts

    def without_slabs(self) -> "Strategy":
        """This strategy with every level whole (no slabs, so no recomputed level inputs either)."""
        return replace(self, slabs=1, coarse_slabs="", recompute_inputs=0)

    @property
    def slabbed(self) -> bool:
        """Whether any level runs in slabs."""
        return any(count > 1 for count in self.slab_counts)

    @property
    def checkpointing_label(self) -> str:
        """What is checkpointed, as plans and logs name it: "checkpointing", "checkpointing of the K finest
        level(s)", or "" without checkpointing."""
        if not self.checkpointing:
            return ""
        levels = self.checkpoint_levels
        return f"checkpointing of the {levels} finest level{'s' if levels > 1 else ''}" if levels else "checkpointing"

    def describe(self) -> str:
        parts = [self.precision]
        if self.checkpointing:
            parts.append(self.checkpointing_label)
        if self.accumulate > 1:
            parts.append(f"accumulate x{self.accumulate}")
        if self.channels_last:
            parts.append("channels-last")
        if len(self.slab_counts) > 1:
            parts.append(f"slabs {','.join(map(str, self.slab_counts))}")
        elif self.slabs > 1:
            parts.append(f"{self.slabs} slabs")
        if self.recompute_inputs:
            parts.append(f"{self.recompute_inputs} level input{'s' if self.recompute_inputs > 1 else ''} recomputed")
        if self.offload:
            parts.append("offload")
        return " + ".join(parts)
