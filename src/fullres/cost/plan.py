"""Will a job fit a memory budget, what is the largest batch or shape that does (whitepaper Table 2), and
which exact strategy makes a job fit (`--strategy auto` and the training preflight).

Extension point: a new memory strategy (a `Strategy` field the step honours) joins the search in
:func:`candidate_strategies`, ordered by how approximate it is.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from fullres.cost.dryrun import dryrun
from fullres.cost.estimate import ESTIMATORS, dryrun_estimate, estimate_training_bytes
from fullres.cost.timing import fake_step_flops, strategy_step_seconds
from fullres.engine.spatial import shard_bounds
from fullres.errors import OneLineWarning, UserError
from fullres.job.config import JobConfig
from fullres.kernels.device import fast_bf16
from fullres.nets.registry import model_spec, slab_levels, spatial_divisor, spatial_refusal, tape_refusal
from fullres.nets.unet3d import LEVELS as SLAB_LEVELS
from fullres.units import format_bytes

MAX_SEARCH = 1 << 20  # no batch or side length beyond a million is searched


@dataclass(frozen=True)
class Plan:
    method: str
    fits: bool
    required_bytes: int
    budget_bytes: int
    max_batch: int  # 0: not even batch 1 fits at this shape
    max_shape: tuple[int, int, int] | None  # None: not even a 16-voxel longest side fits at this batch

    @property
    def margin_bytes(self) -> int:
        return self.budget_bytes - self.required_bytes

    def to_json(self) -> dict:
        return {
            "method": self.method,
            "fits": self.fits,
            "required_mb": self.required_bytes / 1e6,
            "budget_mb": self.budget_bytes / 1e6,
            "margin_mb": self.margin_bytes / 1e6,
            "max_batch": self.max_batch,
            "max_shape": list(self.max_shape) if self.max_shape else None,
        }


def largest_fitting(fits: Callable[[int], bool], guess: int = 1) -> int:
    """Largest n >= 1 with fits(n), for a monotone `fits` (true then false); 0 if fits(1) is false.

    Gallops from `guess` (steps 1, 2, 4, ... away from it) and then bisects, so a good guess costs a
    few calls of `fits` (each a dry run, for the dry-run method) instead of a search from 1."""
    guess = min(max(1, guess), MAX_SEARCH)
    if fits(guess):  # the answer is guess or above: gallop up
        low, step = guess, 1
        while low + step <= MAX_SEARCH and fits(low + step):
            low, step = low + step, step * 2
        high = min(low + step, MAX_SEARCH + 1)
    else:  # below guess: gallop down
        high, step = guess, 1
        while high - step >= 1 and not fits(high - step):
            high, step = high - step, step * 2
        low = high - step
        if low < 1:
            if not fits(1):
                return 0
            low = 1
    while high - low > 1:  # invariant: fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def scaled_shape(shape: tuple[int, int, int], longest: int, divisor: int = 8) -> tuple[int, int, int]:
    """`shape` scaled so its longest side is `longest` voxels, each side rounded to a multiple of `divisor`."""
    scale = longest / max(shape)
    return tuple(max(divisor, round(side * scale / divisor) * divisor) for side in shape)


def plan(job: JobConfig, budget_bytes: int, method: str, device: str = "cpu") -> Plan:
    """Fit of `job` in `budget_bytes` on `device` ("cpu" or "cuda"), the largest batch at its shape, and the
    largest shape (H, W, D scaled together, multiples of the network's divisor) at its batch."""
    required = estimate_training_bytes(job, method, device)
    unit = spatial_divisor(job.model)  # shapes are searched in multiples of the network's divisor

    def batch_fits(batch: int) -> bool:
        return estimate_training_bytes(job.with_(batch=batch), method, device) <= budget_bytes

    def longest_side(steps: int) -> int:
        # From two divisors up: at one the bottleneck is a single voxel, which instance norm cannot train on.
        return (steps + 1) * unit

    def shape_fits(steps: int) -> bool:
        return estimate_training_bytes(job.at_shape(scaled_shape(job.shape, longest_side(steps), unit)), method, device) <= budget_bytes

    # Guesses from a straight line through the job's own estimates at batch 1 and 2: memory is nearly
    # affine in samples, and, at a fixed batch, in voxels. The search then checks around the guess.
    one, two = (estimate_training_bytes(job.with_(batch=b), method, device) for b in (1, 2))
    per_sample = max(two - one, 1)
    fixed = one - per_sample
    batch_guess = (budget_bytes - required) // per_sample + job.batch
    voxel_ratio = max((budget_bytes - fixed) / max(required - fixed, 1), 1e-9)
    side_guess = max(job.shape) * voxel_ratio ** (1 / 3)
    steps = largest_fitting(shape_fits, guess=max(1, round(side_guess / unit) - 1))
    return Plan(
        method=method,
        fits=required <= budget_bytes,
        required_bytes=required,
        budget_bytes=budget_bytes,
        max_batch=largest_fitting(batch_fits, guess=int(batch_guess)),
        max_shape=scaled_shape(job.shape, longest_side(steps), unit) if steps else None,
    )


# ---- the strategy search and the training preflight ---------------------------------------------

def default_method() -> str:
    """The preflight's method: the dry run where it is available, else Table 1's."""
    return "dryrun" if "dryrun" in ESTIMATORS else "table1"


SLAB_CHOICES = (4, 8, 16)  # slabs --strategy auto tries: beyond 16 the full-resolution slab is no longer the peak


SLAB_BASES = (8, 16, 32, 64, 128)  # full-resolution slabs of the every-level schedules plan and --strategy auto offer


def slab_schedules(job: JobConfig) -> list[tuple[int, ...]]:
    """Every-level slab schedules for `job`'s network: S slabs at full resolution (each of SLAB_BASES), half as
    many at each coarser level (at least 1), each capped at what the level's rows hold (2 each); none for a
    network that cannot run in slabs (attention over the volume)."""
    if tape_refusal(job.model, job.shape):
        return []
    levels = slab_levels(job.model, probe=True)
    schedules = []
    for base in SLAB_BASES:
        counts = tuple(max(1, min(base >> level, (job.shape[0] >> level) // 2)) for level in range(levels))
        if counts not in schedules and counts[0] == min(base, job.shape[0] // 2):
            schedules.append(counts)
    return schedules


def with_slabs(job: JobConfig, counts: tuple[int, ...], recompute_inputs: int = 0) -> JobConfig:
    """`job` with `counts` slabs per level (and `recompute_inputs`), checkpointing on and micro-batch 1 (the
    same effective batch)."""
    coarse = ",".join(map(str, counts[1:]))
    strategy = replace(job.strategy, checkpointing=True, accumulate=job.effective_batch, slabs=counts[0],
                       coarse_slabs=coarse, recompute_inputs=recompute_inputs)
    return job.with_(batch=1, strategy=strategy)


def recomputed_schedule(job: JobConfig) -> tuple[int, ...] | None:
    """The deepest of :func:`slab_schedules`, offered once more with the half-resolution level's input
    recomputed (the largest map a schedule stores): None where that level cannot be slabbed."""
    if not model_spec(job.model.architecture).slabs:
        return None
    schedules = slab_schedules(job)
    return schedules[-1] if schedules and schedules[-1][1] > 1 else None


def check_spatial(job: JobConfig, spatial: int) -> None:
    """Raise ValueError, naming --spatial, where `job` cannot be split across `spatial` processes: the paper's
    network by its own schedule (whole rows per level), in slabs and any other network through its tape
    (:func:`fullres.nets.registry.spatial_refusal`)."""
    if spatial == 1:
        return
    strategy = job.strategy
    if strategy.checkpointing or strategy.offload:
        raise ValueError(f"--spatial {spatial}: not with --checkpointing or --offload (each process computes its rows "
                         "of a level whole or in slabs)")
    if model_spec(job.model.architecture).slabs and not strategy.slabbed:
        shard_bounds(job.shape[0], spatial)
        return
    refusal = spatial_refusal(job.model, job.shape, spatial, strategy.slab_counts if strategy.slabbed else (1,),
                              strategy.recompute_inputs)
    if refusal:
        raise ValueError(refusal if refusal.startswith("--spatial") else f"--spatial {spatial}: {refusal}")


# Block checkpointing that saves less than REFUSE_BELOW of the dry-run peak is refused (recomputation for
# nothing); less than WARN_BELOW is accepted with a warning.
REFUSE_BELOW, WARN_BELOW = 0.05, 0.25


FIXED_STATE = ("parameters", "gradients", "optimizer_state", "inputs")  # what no recomputation changes
JUDGED_BATCH = 64  # fake tensors: the dry run costs the same at any batch


@functools.lru_cache(maxsize=64)
def checkpointing_saving(job: JobConfig) -> float:
    """The fraction of the CPU dry-run peak beyond the fixed state (weights, their gradients, the optimizer's
    state, the inputs; the runtime term apart) that block checkpointing saves for `job`'s network at its
    shape and micro-batch JUDGED_BATCH: both dry runs under the same allocator, so only the recomputation
    differs, and at a batch where the activations outweigh the weights' state, so that the peak falls in
    backward, where checkpointing acts, not in the optimizer's update (a small job's peak)."""
    one = job.with_(batch=JUDGED_BATCH, strategy=replace(job.strategy, accumulate=1))
    beyond = []
    for on in (False, True):
        result = dryrun(one.with_(strategy=replace(one.strategy, checkpointing=on)), runtime=0, allocator="fixed")
        beyond.append(result.peak_bytes - sum(result.breakdown[name] for name in FIXED_STATE))
    return 1 - beyond[1] / beyond[0] if beyond[0] > 0 else 0.0


def check_checkpointing(job: JobConfig) -> float | None:
    """For a job with --checkpointing of a network without its own schedule (checkpointed block by block):
    the fraction of the dry-run peak's activations and temporaries it saves (:func:`checkpointing_saving`). A UserError naming the
    network where that is under REFUSE_BELOW; a one-line warning where it is under WARN_BELOW. None for
    other jobs, or where the dry run cannot follow the network (the estimate says why)."""
    if not job.strategy.checkpointing or job.strategy.slabbed or model_spec(job.model.architecture).slabs:
        return None
    try:
        saving = checkpointing_saving(job)
    except ValueError:
        return None
    where = f"block checkpointing of {job.model.architecture} at {'x'.join(map(str, job.shape))}"
    if saving < REFUSE_BELOW:
        raise UserError(f"--checkpointing: {where} saves {saving:.1%} of the activations at the dry run's "
                        "peak (its blocks keep about what they would recompute); train without it")
    if saving < WARN_BELOW:
        warnings.warn(OneLineWarning(f"--checkpointing: {where} saves only {saving:.1%} of the activations at the "
                                     "dry run's peak (one block holds most of them)"), stacklevel=2)
    return saving


def refuse_spatial(job: JobConfig, spatial: int, world: int) -> None:
    """A UserError naming --spatial where `world` processes (torchrun's) cannot share `job`'s samples `spatial`
    at a time."""
    try:
        check_spatial(job, spatial)
    except ValueError as error:
        raise UserError(str(error)) from None
    refuse_process_count(spatial, world)


def refuse_process_count(spatial: int, world: int) -> None:
    """A UserError naming --spatial where it does not divide the `world` processes torchrun started."""
    if world % spatial:
        raise UserError(f"--spatial {spatial} must divide the number of processes ({world}; start them with "
                        "torchrun --nproc-per-node)")


def spatial_need(job: JobConfig, spatial: int, method: str, device: str = "cpu") -> int:
    """Bytes one of `spatial` processes sharing each sample needs: the dry run of its shard, halos included
    (:func:`fullres.cost.dryrun.dryrun`'s `spatial`); Table 1's method, of the largest shard's rows."""
    if method == "dryrun":
        return dryrun_estimate(job, device, spatial=spatial).peak_bytes
    rows = max(hi - lo for lo, hi in shard_bounds(job.shape[0], spatial))
    return estimate_training_bytes(job.with_(shape=(rows, *job.shape[1:])), method, device)


@dataclass(frozen=True)
class SpatialOption:
    """`processes` sharing each sample (--spatial), each its rows in slab `counts` (full resolution first; (1,):
    whole): one process's dry-run peak and whether it fits."""

    processes: int
    peak_bytes: int
    fits: bool
    counts: tuple[int, ...] = (1,)

    def to_json(self) -> dict:
        return {"spatial": self.processes, "slabs": list(self.counts), "per_process_mb": self.peak_bytes / 1e6,
                "fits": self.fits}


def spatial_options(job: JobConfig, budget_bytes: int, method: str, device: str = "cpu") -> list[SpatialOption]:
    """2, 4, 8, ... processes sharing each sample, as far as H splits (16 rows a process at least), up to the
    first count whose shard fits `budget_bytes`: each one's per-process estimate (the job in its slabs, if any,
    without the strategies --spatial does not combine with: checkpointing, offload). [] where H does not split
    in two (:func:`check_spatial`)."""
    plain = job.with_(strategy=replace(job.strategy, checkpointing=False, checkpoint_levels=0, offload=False))
    counts = plain.strategy.slab_counts if plain.strategy.slabbed else (1,)
    options, processes = [], 2
    while True:
        try:
            check_spatial(plain, processes)
        except ValueError:
            return options
        need = spatial_need(plain, processes, method, device)
        options.append(SpatialOption(processes, need, need <= budget_bytes, counts))
        if need <= budget_bytes:
            return options
        processes *= 2


@dataclass(frozen=True)
class SlabOption:
    """One slab schedule of a job: its dry-run peak, whether it fits the budget, one step's FLOPs (torch's
    counter, recomputation included) and their excess over the step without slabs or checkpointing."""

    counts: tuple[int, ...]
    peak_bytes: int
    fits: bool
    flops: int
    overhead: float
    recompute_inputs: int = 0

    def to_json(self) -> dict:
        return {"slabs": list(self.counts), "recompute_inputs": self.recompute_inputs, "peak_mb": self.peak_bytes / 1e6,
                "fits": self.fits, "flops": self.flops, "recompute_overhead": self.overhead}


def slab_options(job: JobConfig, budget_bytes: int, device: str = "cpu",
                 progress: Callable[[list], Iterable] = iter) -> list[SlabOption]:
    """The dry run of :func:`slab_schedules`, fewest slabs first, up to the first that fits `budget_bytes`
    and runs no weight gradient on oneDNN's reference kernel (more slabs only add recomputation; a schedule
    of many slabs takes the longest to dry-run), then the
    deepest once more with the half-resolution level's input recomputed if none fitted; each with its FLOPs
    against those of `job` without slabs or checkpointing, both counted by torch's counter on fake tensors
    (:func:`fullres.cost.timing.fake_step_flops`; the dry run with the runtime term its method uses).
    `progress` wraps the list of schedules (a progress bar; seconds to a minute each at full resolution)."""
    plain = job.with_(strategy=replace(job.strategy.without_slabs(), checkpointing=False, checkpoint_levels=0))
    baseline = fake_step_flops(plain)
    options = []
    deepest = recomputed_schedule(job)
    schedules = [(counts, 0) for counts in slab_schedules(job)] + ([(deepest, 1)] if deepest else [])
    for counts, recompute in progress(schedules):
        candidate = with_slabs(job, counts, recompute)
        result = dryrun_estimate(candidate, device)
        flops = fake_step_flops(candidate)
        options.append(SlabOption(counts, result.peak_bytes, result.peak_bytes <= budget_bytes, flops,
                                  flops / baseline - 1, recompute))
        if options[-1].fits and not result.reference_kernels:  # else a deeper one may avoid the slow kernel
            break
    return options


def candidate_strategies(job: JobConfig, allow_bf16: bool = True, device: str = "cpu") -> list[tuple[str, JobConfig]]:
    """Least approximate first: none; checkpointing of the 1, 2, ... finest levels (networks with levels),
    then of every level; accumulation (same global batch in smaller
    micro-batches); full-resolution slabs at micro-batch 1 (exact, but each slab recomputed; networks with
    a slab schedule), then every level in slabs (:func:`slab_schedules`); on CUDA, each exact candidate with its saved activations offloaded to host memory;
    bf16 (approximates fp32 numerics) last, and only where `allow_bf16`."""
    candidates = [("as given", job)]
    if model_spec(job.model.architecture).slabs:  # networks with levels: the finest ones alone first
        for levels in range(1, SLAB_LEVELS):
            strategy = replace(job.strategy, checkpointing=True, checkpoint_levels=levels)
            candidates.append((strategy.checkpointing_label, job.with_(strategy=strategy)))
    candidates.append(("checkpointing", job.with_(strategy=replace(job.strategy, checkpointing=True))))
    total = job.batch * job.strategy.accumulate
    for micro in sorted({d for d in range(1, job.batch) if total % d == 0}, reverse=True):
        strategy = replace(job.strategy, checkpointing=True, accumulate=total // micro)
        candidates.append((f"checkpointing + accumulate x{total // micro}", job.with_(batch=micro, strategy=strategy)))
    if model_spec(job.model.architecture).slabs:
        for slabs in (n for n in SLAB_CHOICES if n > job.strategy.slabs and n <= job.shape[0] // 2):
            strategy = replace(job.strategy, checkpointing=True, accumulate=total, slabs=slabs)
            name = f"checkpointing + accumulate x{total} + {slabs} slabs" if total > 1 else f"checkpointing + {slabs} slabs"
            candidates.append((name, job.with_(batch=1, strategy=strategy)))
    for counts in slab_schedules(job):  # every level in slabs: the least memory, the most recomputation
        if counts[0] > job.strategy.slabs:
            candidate = with_slabs(job, counts)
            accumulate = f" + accumulate x{total}" if total > 1 else ""
            counts = candidate.strategy.slab_counts
            candidates.append((f"checkpointing{accumulate} + slabs {','.join(map(str, counts))}", candidate))
    deepest = recomputed_schedule(job)  # the paper's network's own schedule only
    if deepest and deepest[0] > job.strategy.slabs:
        candidate = with_slabs(job, deepest, 1)
        accumulate = f" + accumulate x{total}" if total > 1 else ""
        candidates.append((f"checkpointing{accumulate} + slabs {','.join(map(str, candidate.strategy.slab_counts))} "
                           "+ 1 level input recomputed", candidate))
    if device == "cuda" and not job.strategy.offload:
        for name, candidate in list(candidates):
            offload = replace(candidate.strategy, offload=True)
            candidates.append((f"{name} + offload" if name != "as given" else "offload", candidate.with_(strategy=offload)))
    if job.strategy.precision == "fp32" and allow_bf16:
        for name, candidate in list(candidates):
            bf16 = replace(candidate.strategy, precision="bf16")
            candidates.append((f"{name} + bf16" if name != "as given" else "bf16", candidate.with_(strategy=bf16)))
    return candidates


def preflight(job: JobConfig, budget: int, method: str, auto: bool,
              allow_bf16: bool = True, device: str = "cpu") -> tuple[JobConfig, int, str]:
    """The job (or with --strategy auto, the least approximate variant) that fits `budget` by `method`.
    Refuses with the estimate, the budget and the options when nothing fits."""
    tried = []
    for name, candidate in (candidate_strategies(job, allow_bf16, device) if auto else [("as given", job)]):
        needed = estimate_training_bytes(candidate, method, device)
        if needed <= budget:
            return candidate, needed, name
        tried.append(f"{name}: {format_bytes(needed)}")
    if auto and not allow_bf16:
        tried.append("bf16: not tried (no hardware bf16 here; emulated it runs ~100x slower)")
    raise UserError(refusal(job, budget, method, tried), exit_code=3)


def refusal(job: JobConfig, budget: int, method: str, tried: list[str]) -> str:
    # The suggestions use Table 1's method: a search of many dry runs would take minutes, and Table 1
    # overstates real needs, so what it says fits does fit.
    result = plan(job, budget, "table1")
    shape = " ".join(map(str, result.max_shape)) if result.max_shape else "none"
    lines = [f"the job does not fit: needs more than the {format_bytes(budget)} available ({method} estimate); tried "
             + "; ".join(tried) + ".",
             "  Exact options: --strategy auto (checkpointing, then accumulation, then slabs at every level, then bf16), or a machine with "
             "more memory"
             " (see `fullres plan`).",
             f"  The paper's tricks, never applied for you (sizes by the conservative Table 1 method): a smaller "
             f"shape (at batch {job.batch}: --shape {shape}), a smaller batch (largest: {result.max_batch or 'none'}), "
             "fewer --filters, or tiling.",
             "  --force runs it anyway."]
    return "\n".join(lines)


# ---- the fastest exact strategy that fits (`plan --optimize time`, `train --strategy auto`) ---------

@dataclass(frozen=True)
class RankedStrategy:
    """One candidate strategy that fits, with its estimated step time and peak memory."""

    name: str
    job: JobConfig
    peak_bytes: int
    step_s: float  # estimated: FLOPs over this machine's calibrated rate (fullres.cost.timing)
    step_flops: int

    def to_json(self) -> dict:
        return {"strategy": self.name, "describe": self.job.strategy.describe(), "batch": self.job.batch,
                "step_s": self.step_s, "step_tflop": self.step_flops / 1e12, "peak_mb": self.peak_bytes / 1e6}


def rank_by_time(job: JobConfig, budget: int, method: str, allow_bf16: bool = True, device: str = "cpu",
                 step_seconds: Callable[[JobConfig], dict] | None = None) -> tuple[list[RankedStrategy], list[str]]:
    """The candidates of :func:`candidate_strategies` that fit `budget` by `method`, fastest first by
    estimated step time (`step_seconds(candidate)` -> ``{"step_s", "step_flops"}``; default
    :func:`fullres.cost.timing.strategy_step_seconds`, calibrated once per precision on this machine);
    ties keep the least approximate first. Also returns "name: bytes" of those that do not fit.

    Every-level slab schedules come fewest slabs first, and each deeper one only adds recomputation, so past
    the first that fits (in the same precision and offload) and runs no convolution on oneDNN's reference
    kernel, none can be faster: they are not estimated (their dry runs are the slowest of all)."""
    ranked, tried, _ = _rank(job, budget, method, allow_bf16, device, step_seconds)
    return ranked, tried


def _rank(job: JobConfig, budget: int, method: str, allow_bf16: bool, device: str,
          step_seconds: Callable[[JobConfig], dict] | None) -> tuple[list[RankedStrategy], list[str], list[str]]:
    """:func:`rank_by_time`, and the names of the deeper slab schedules it did not estimate."""
    if step_seconds is None:
        def step_seconds(candidate: JobConfig) -> dict:
            return strategy_step_seconds(candidate, device=device)

    fitting, tried, skipped, settled = [], [], [], set()
    every_level = {with_slabs(job, counts).strategy.slab_counts for counts in slab_schedules(job)}
    for name, candidate in candidate_strategies(job, allow_bf16, device):
        series = (candidate.strategy.precision, candidate.strategy.offload) \
            if candidate.strategy.slab_counts in every_level else None  # an every-level slab schedule
        if series in settled:
            skipped.append(name)
            continue
        needed = estimate_training_bytes(candidate, method, device)
        if needed > budget:
            tried.append(f"{name}: {format_bytes(needed)}")
            continue
        estimate = step_seconds(candidate)
        fitting.append(RankedStrategy(name, candidate, needed, estimate["step_s"], estimate["step_flops"]))
        if series is not None and not estimate.get("reference_flops"):
            settled.add(series)
    order = sorted(range(len(fitting)), key=lambda i: (fitting[i].step_s, i))  # stable: exactness breaks ties
    return [fitting[i] for i in order], tried, skipped


def fastest_fitting(job: JobConfig, budget: int, method: str, allow_bf16: bool = True, device: str = "cpu",
                    step_seconds: Callable[[JobConfig], dict] | None = None) -> tuple[JobConfig, int, str]:
    """`--strategy auto`: the fastest candidate that fits (see :func:`rank_by_time`), its peak, and one line
    naming it, its estimated step time and the runner-up's. Refuses as :func:`preflight` does when
    nothing fits."""
    ranked, tried = rank_by_time(job, budget, method, allow_bf16, device, step_seconds)
    if not ranked:
        if not allow_bf16:
            tried.append("bf16: not tried (no hardware bf16 here; emulated it runs ~100x slower)")
        raise UserError(refusal(job, budget, method, tried), exit_code=3)
    best = ranked[0]
    line = f"{best.name} (estimated {best.step_s:.2f} s/step"
    if len(ranked) > 1:
        line += f"; runner-up: {ranked[1].name}, {ranked[1].step_s:.2f} s/step"
    return best.job, best.peak_bytes, line + ")"


def ranking_report(job: JobConfig, budget: int, method: str, device: str = "cpu",
                   step_seconds: Callable[[JobConfig], dict] | None = None) -> dict:
    """`plan --optimize time`: :func:`rank_by_time` with bf16 only where this machine runs it natively
    (:func:`fullres.kernels.device.fast_bf16`), JSON-ready."""
    import torch


    allow_bf16 = fast_bf16(torch.device(device))
    ranked, tried, skipped = _rank(job, budget, method, allow_bf16, device, step_seconds)
    return {"fastest_first": [r.to_json() for r in ranked], "does_not_fit": tried, "not_estimated": skipped,
            "budget_mb": budget / 1e6,
            "method": method, "bf16": "tried" if allow_bf16 else "not tried (no hardware bf16 here)"}


def format_ranking(report: dict) -> list[str]:
    lines = [f"Exact strategies that fit, fastest first (step time estimated from FLOPs and this machine's "
             f"calibrated rate; memory: {report['method']}):",
             f"  {'#':<3}{'strategy':<48}{'batch':>6}{'step s':>10}{'TFLOP':>10}  peak"]
    for index, row in enumerate(report["fastest_first"], 1):
        lines.append(f"  {index:<3}{row['strategy'][:47]:<48}{row['batch']:>6}{row['step_s']:>10.2f}"
                     f"{row['step_tflop']:>10.3f}  {format_bytes(row['peak_mb'] * 1e6)}")
    if not report["fastest_first"]:
        lines.append("  none fits")
    if report["does_not_fit"]:
        lines.append("  does not fit: " + "; ".join(report["does_not_fit"]))
    if report["not_estimated"]:
        lines.append("  not estimated (deeper slab schedules: each slower, more recomputation): "
                     + "; ".join(report["not_estimated"]))
    lines.append(f"  bf16: {report['bf16']}")
    return lines
