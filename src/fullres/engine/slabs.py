"""Slabs: any level of a U-Net computed in horizontal slabs along H, exactly, normalisation included.

A *level* is two 3x3x3 convolutions at one resolution, each followed by its normalisation (if any)
and ReLU (the decoder's first convolution reads the upsampled coarser map and the skip; the last level
ends with the 1x1x1 prediction). A level in S slabs computes its output rows [start, stop) from its
inputs' rows with a halo of one row per convolution (zero padding only at the volume's real edges), so
each slab is the whole-volume result up to summation order. Each slab runs under non-reentrant
activation checkpointing: only its inputs are kept, and it is recomputed in backward.

Data flow (:func:`forward_levels`): maps live as :class:`Rows` (a list of pieces along H) behind
*sources* that produce any row range on demand: :class:`Stored` pieces, :class:`Pooled` and
:class:`Upsampled` views of another source, and :class:`Recomputed`, a level's output computed from
that level's own sources when read. A slabbed encoder level stores only the pooled input of the level
below (8 times fewer voxels than its own output, at the same width), or with `recompute_inputs` not even
that: the level below reads it through :class:`Pooled` of the level recomputed; its skip is recomputed
from its own input inside the decoder's slabs. A slabbed decoder level read by a slabbed level above is
recomputed inside that level's slabs, so only the last level's output (the logits) is stored. So no
activation of a slabbed level ever exists whole, nor as a full set of stored slabs.

Normalisation (:func:`level_statistics`): instance, group and batch norm take statistics over the
whole volume (batch norm: over the batch too). For each normalised convolution of a slabbed level a
statistics pass runs the level slab by slab up to that convolution and keeps, per slab, its count,
mean and sum of squared deviations (a checkpoint: small outputs, the slab recomputed in backward);
the partial moments are combined exactly (Chan et al.'s pairwise formula, stable where sums of squares
cancel). The normalise pass then applies the whole-volume mean and variance. The statistics are
ordinary autograd tensors, so the backward through them (the gradient of every voxel's normalised
value with respect to the mean and variance) is exact: each statistics slab is recomputed in backward
like any other. Batch norm's running statistics are updated once per forward, as nn.BatchNorm3d does.

Dropout in a slabbed level cannot draw its mask from the generator's stream (a voxel read by two slabs'
halos, or recomputed from a stored input, must get one value): it is a hash of the voxel's global
index and a seed drawn once per forward (:func:`row_dropout`), so any slab computes the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def slab_rows(height: int, slabs: int) -> list[tuple[int, int]]:
    """[start, stop) rows of `slabs` near-equal slabs of `height` rows, every boundary even (the 2x
    transposed convolution maps row k of the coarser level to rows 2k and 2k+1, and 2x pooling maps
    rows 2k, 2k+1 to row k); an odd height (the coarsest level's) puts its last row in the last slab."""
    if not 1 <= slabs <= height // 2:
        raise ValueError(f"slabs must be between 1 and {height // 2} (H={height} rows, 2 per slab at least), got {slabs}")
    pairs = height // 2
    bounds = [2 * (pairs * i // slabs) for i in range(slabs)] + [height]
    return list(zip(bounds[:-1], bounds[1:]))


def take_rows(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """x[:, :, low:high] (a view), whose gradient is laid out like the incoming one: PyTorch's own slice
    backward fills a contiguous (NCDHW) zero tensor and copies a channels-last gradient into it, so every
    element is transposed (10x the time of a same-layout copy, measured) and the next convolution reorders
    it back."""
    if low == 0 and high == x.shape[2]:
        return x
    if not (torch.is_grad_enabled() and x.requires_grad):
        return x[:, :, low:high]
    return _TakeRows.apply(x, low, high)


class _TakeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, low, high):
        ctx.shape, ctx.low, ctx.high = x.shape, low, high
        return x[:, :, low:high]

    @staticmethod
    def backward(ctx, grad):
        channels_last = grad.is_contiguous(memory_format=torch.channels_last_3d) and not grad.is_contiguous()
        out = torch.empty(ctx.shape, dtype=grad.dtype, device=grad.device,
                          memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
        out[:, :, :ctx.low].zero_()
        out[:, :, ctx.high:].zero_()
        out[:, :, ctx.low:ctx.high].copy_(grad)
        return out, None, None


# ---- sources: a map's rows on demand ------------------------------------------------------------

class Rows:
    """A feature map (N, C, H, W, D) held as pieces along H: piece i holds rows bounds[i]..bounds[i+1]."""

    def __init__(self, pieces: Sequence[torch.Tensor], bounds: Sequence[int]) -> None:
        self.pieces, self.bounds = list(pieces), list(bounds)
        self.height = self.bounds[-1]

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> "Rows":
        return cls([tensor], [0, tensor.shape[2]])

    def rows(self, low: int, high: int) -> torch.Tensor:
        parts = [take_rows(piece, max(low, start) - start, min(high, stop) - start)
                 for piece, start, stop in zip(self.pieces, self.bounds, self.bounds[1:]) if start < high and stop > low]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def all(self) -> torch.Tensor:
        return self.pieces[0] if len(self.pieces) == 1 else torch.cat(self.pieces, dim=2)


class Stored(Rows):
    """A map kept in memory (whole, or as the slabs that made it)."""


class Pooled:
    """2x2x2 max-pooling of `source`: row k reads the source's rows 2k and 2k+1."""

    def __init__(self, source) -> None:
        self.source, self.height = source, source.height // 2

    def rows(self, low: int, high: int) -> torch.Tensor:
        return F.max_pool3d(self.source.rows(2 * low, 2 * high), 2)


class Upsampled:
    """`layer` (a 2x2x2 stride-2 transposed convolution) of `source`: rows 2k and 2k+1 read its row k only."""

    def __init__(self, source, layer: Callable) -> None:
        self.source, self.layer, self.height = source, layer, 2 * source.height

    def rows(self, low: int, high: int) -> torch.Tensor:
        first, last = low // 2, -(-high // 2)
        return take_rows(self.layer(self.source.rows(first, last)), low - 2 * first, high - 2 * first)


class Recomputed:
    """A level's output, recomputed from the level's own sources whenever rows are read (an encoder level's
    skip from its stored input; a decoder level's output from the coarser map and the skip)."""

    def __init__(self, net, level: "Level", sources: list, statistics: list | None, seed: int | None) -> None:
        self.net, self.level, self.sources, self.statistics, self.seed = net, level, sources, statistics, seed
        self.height = sources[0].height

    def rows(self, low: int, high: int) -> torch.Tensor:
        return level_rows(self.net, self.level, self.sources, low, high, self.statistics, seed=self.seed)


# ---- levels -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Level:
    """One level of the U-Net: its two convolutions (module names), whether its first convolution reads an
    upsampled map and a skip (decoder), the dropout module after its first convolution, its prediction."""

    convs: tuple[str, str]
    decoder: bool = False
    dropout: str | None = None
    prediction: str | None = None


def _normalise(net, name: str, y: torch.Tensor) -> torch.Tensor:
    """The normalisation module after convolution `name` (a whole level), if any."""
    return y if net.config.norm == "none" else getattr(net, "norm" + name[4:])(y)


class _NormReLU(torch.autograd.Function):
    """relu(y * scale + shift) that keeps only its output for backward (the next convolution keeps that map
    anyway), not `y`: where ReLU passed a value, y = (z - shift) / scale; elsewhere the gradient is 0. So a
    normalised convolution costs no more saved memory than one without normalisation."""

    @staticmethod
    def forward(ctx, y, scale, shift):
        z = torch.addcmul(shift, y, scale).relu_()
        ctx.save_for_backward(z, scale, shift)
        return z

    @staticmethod
    def backward(ctx, grad):
        z, scale, shift = ctx.saved_tensors
        g = grad * (z > 0)
        dims = [dim for dim in range(z.dim()) if scale.shape[dim] == 1 and z.shape[dim] != 1]
        accumulate = torch.promote_types(z.dtype, torch.float32)
        sum_g = g.sum(dims, keepdim=True, dtype=accumulate)
        sum_gz = (g * z).sum(dims, keepdim=True, dtype=accumulate)
        grad_scale = (sum_gz - shift * sum_g) / scale  # the sum of g * y, y recovered where g is not 0
        return g.mul_(scale), grad_scale.to(scale.dtype), sum_g.to(shift.dtype)


def level_rows(net, level: Level, sources: list, low: int, high: int, statistics, upto: int | None = None,
               seed: int | None = None, samples: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Rows [low, high) of `level`'s output read from `sources` (the input; or the upsampled map and the
    skip). `statistics`: per normalised convolution, the whole-volume (mean, variance), or None to run the
    norm modules (a whole level). `upto` = k: stop at convolution k's output before its normalisation
    (what a statistics pass needs). `seed`: hashed dropout (slabbed levels), else the dropout module;
    `samples`: (first, stride) of the batch's samples' indices in the global batch (their masks are theirs)."""
    depth = len(level.convs) if upto is None else upto
    height = sources[0].height
    first, last = max(low - depth, 0), min(high + depth, height)  # one halo row per convolution
    if level.decoder:
        y = _conv_of_concatenation(getattr(net, level.convs[0]), sources[0].rows(first, last),
                                   sources[1].rows(first, last))
    else:
        y = getattr(net, level.convs[0])(sources[0].rows(first, last))
    for index, name in enumerate(level.convs):
        if index:  # each convolution needs one halo row fewer than the one before: the rest is not computed
            keep_first, keep_last = max(low - depth + index, 0), min(high + depth - index, height)
            y = getattr(net, name)(take_rows(y, keep_first - first, keep_last - first))
            first = keep_first
        if upto is not None and index + 1 == upto:
            return take_rows(y, low - first, high - first)
        if statistics is None or net.config.norm == "none":
            y = F.relu(_normalise(net, name, y), inplace=True)
        else:
            y = _NormReLU.apply(y, *norm_affine(getattr(net, "norm" + name[4:]), net.config.norm, y, *statistics[index]))
        if index == 0 and level.dropout is not None:
            module = getattr(net, level.dropout)
            y = (module(y) if seed is None else
                 row_dropout(y, module.p if module.training else 0.0, seed, first, height, samples))
    y = take_rows(y, low - first, high - first)
    return getattr(net, level.prediction)(y) if level.prediction else y


def _conv_of_concatenation(layer, up: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """conv(cat(up, skip)) as conv(up, W_up) + conv(skip, W_skip): the concatenation never exists."""
    split = up.shape[1]
    out = F.conv3d(up, layer.weight[:, :split], layer.bias, padding=1)
    return out.add_(F.conv3d(skip, layer.weight[:, split:], None, padding=1))


# ---- normalisation over the whole volume, slab by slab ------------------------------------------

def _reduced_dims(kind: str, y: torch.Tensor, module) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`y` viewed so that the statistics reduce over the returned dims: instance (N, C), group (N, G), batch (C,)."""
    if kind == "group":
        return y.unflatten(1, (module.num_groups, y.shape[1] // module.num_groups)), (2, 3, 4, 5)
    if kind == "batch":
        return y, (0, 2, 3, 4)
    return y, (2, 3, 4)


def moments(module, kind: str, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, sum of squared deviations) of `y`'s pre-normalisation values per statistic, in at
    least fp32."""
    y = y.to(torch.promote_types(y.dtype, torch.float32))
    grouped, dims = _reduced_dims(kind, y, module)
    mean = grouped.mean(dims, keepdim=True)
    m2 = (grouped - mean).square().sum(dims)
    count = torch.full_like(m2, grouped.numel() // m2.numel())
    return count, mean.squeeze(dims), m2


def combine(partials: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Whole-volume (mean, biased variance, count) from per-slab moments (Chan et al.'s pairwise formula)."""
    counts = torch.stack([p[0] for p in partials])
    means = torch.stack([p[1] for p in partials])
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total
    m2 = torch.stack([p[2] for p in partials]).sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total, total


def norm_affine(module, kind: str, y: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), shaped to broadcast over `y`: `module`'s normalisation with these statistics is
    y * scale + shift."""
    rstd = torch.rsqrt(var + module.eps)
    if kind == "group":
        per_group = y.shape[1] // module.num_groups
        mean, rstd = mean.repeat_interleave(per_group, dim=1), rstd.repeat_interleave(per_group, dim=1)
    elif kind == "batch":
        mean, rstd = mean.unsqueeze(0), rstd.unsqueeze(0)
    weight = getattr(module, "weight", None)
    scale = rstd if weight is None else rstd * weight
    shift = -mean * scale if getattr(module, "bias", None) is None else module.bias - mean * scale
    shape = (*scale.shape, 1, 1, 1)
    return scale.reshape(shape).to(y.dtype), shift.reshape(shape).to(y.dtype)


def level_statistics(net, level: Level, sources: list, bounds: list[tuple[int, int]], slab_call,
                     seed: int | None, combine_partials: Callable = combine,
                     samples: tuple[int, int] = (0, 1)) -> list | None:
    """Per normalised convolution of `level`, the whole-volume (mean, variance), computed slab by slab
    (`slab_call` runs each slab, checkpointed in training); None without normalisation. Batch norm in
    eval mode uses its running statistics; in training it updates them once, as nn.BatchNorm3d does.
    `combine_partials` (default :func:`combine`) turns the slabs' moments into (mean, variance, count):
    spatial parallelism gathers every process's slabs first."""
    kind = net.config.norm
    if kind == "none":
        return None
    statistics: list = []
    for index, name in enumerate(level.convs):
        module = getattr(net, "norm" + name[4:])
        if kind == "batch" and not module.training and module.running_mean is not None:
            statistics.append((module.running_mean, module.running_var))
            continue
        known = list(statistics)

        def partial(low, high, known=known, index=index, module=module):
            return moments(module, kind, level_rows(net, level, sources, low, high, known, upto=index + 1, seed=seed,
                                                    samples=samples))

        partials = [slab_call(partial, low, high) for low, high in bounds]
        mean, var, count = combine_partials(partials)
        if kind == "batch" and module.training and module.running_mean is not None:
            _update_running(module, mean, var, int(count.reshape(-1)[0].item()))
        statistics.append((mean, var))
    return statistics


def _update_running(module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """nn.BatchNorm's running-statistics update (the unbiased variance, momentum or cumulative average)."""
    with torch.no_grad():
        module.num_batches_tracked.add_(1)
        momentum = module.momentum if module.momentum is not None else 1.0 / float(module.num_batches_tracked)
        unbiased = var * count / max(count - 1, 1)
        module.running_mean.mul_(1 - momentum).add_(mean.detach().to(module.running_mean.dtype), alpha=momentum)
        module.running_var.mul_(1 - momentum).add_(unbiased.detach().to(module.running_var.dtype), alpha=momentum)


# ---- dropout that any slab reproduces -----------------------------------------------------------

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values kept in [0, 2^32) in int64, so no product overflows)."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def row_dropout(y: torch.Tensor, p: float, seed: int, first_row: int, height: int,
                samples: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Dropout of rows [first_row, first_row + y.shape[2]) of a (N, C, height, W, D) map whose samples are
    numbers first, first + stride, ... (`samples`) of the global batch, the mask a hash of each voxel's global
    index and `seed`: every slab, and every process holding a part of the batch, drops a voxel alike."""
    if p == 0.0:
        return y
    n, c, h, w, d = y.shape
    index = lambda size, dim, offset=0: torch.arange(offset, offset + size, device=y.device).view(  # noqa: E731
        [size if i == dim else 1 for i in range(5)])
    sample = samples[0] + samples[1] * index(n, 0)
    key = (((sample * c + index(c, 1)) * height + index(h, 2, first_row)) * w + index(w, 3)) * d + index(d, 4)
    hashed = _mix32(_mix32((key & _MASK32) ^ (seed & _MASK32)) ^ (key >> 32))
    keep = hashed >= int(p * 2**32)
    return y * keep.to(y.dtype) * (1.0 / (1.0 - p))


# ---- the forward pass ---------------------------------------------------------------------------

def _checkpointed(function, *inputs):
    # Non-reentrant: tensors the function reads from its closure (stored pieces, statistics) get their
    # gradients too, and the RNG state is restored on recompute.
    return checkpoint(function, *inputs, use_reentrant=False)


def call(function, *inputs):
    return function(*inputs)


def _piece(tensor: torch.Tensor) -> torch.Tensor:
    # A copy, not a view: a view would keep the slab's halo rows alive with the stored piece.
    return tensor if tensor._base is None else tensor.clone(memory_format=torch.preserve_format)


def forward_levels(net, x: torch.Tensor, counts: Sequence[int], encoders: Sequence[Level],
                   decoders: Sequence[Level], upsamplers: Sequence[str], run: Callable[[int], Callable],
                   recompute_inputs: int = 0) -> torch.Tensor:
    """The U-Net's forward with encoder level r and decoder level r (same resolution) in counts[r] slabs
    along H. `encoders`: full resolution down to the bottleneck; `decoders[r]`: the decoder level at
    resolution r (r < len(encoders) - 1), reading `upsamplers[r]` of the level below. A level r in one slab
    runs whole under `run(r)` (checkpointed or not: the model's per-level runner), its output stored; a level in more slabs
    is recomputed in backward slab by slab, whatever `run` does. `recompute_inputs` = K: the pooled outputs
    of slabbed encoder levels 0..K-1 (the inputs of levels 1..K) are not stored but recomputed from their
    own inputs wherever a slab below reads them."""
    slab_call = _checkpointed if torch.is_grad_enabled() else call
    source = Stored.whole(x)
    skips = []
    for r, level in enumerate(encoders):
        height, count = source.height, counts[r]
        bottleneck = r == len(encoders) - 1
        if count == 1:
            out = run(r)(lambda source=source, level=level, height=height:
                         level_rows(net, level, [source], 0, height, None))
            skips.append(Stored.whole(out))
            source = Pooled(skips[-1])
            continue
        bounds = slab_rows(height, count)
        seed = dropout_seed(net, level)
        statistics = level_statistics(net, level, [source], bounds, slab_call, seed)
        if bottleneck:
            slab = _slab(net, level, [source], statistics, seed, pool=False)
            skips.append(Stored([slab_call(slab, low, high) for low, high in bounds], [b for b, _ in bounds] + [height]))
            continue
        skips.append(Recomputed(net, level, [source], statistics, seed))  # recomputed where the decoder reads it
        if r < recompute_inputs:  # the level below reads its input recomputed: nothing of this level stored
            source = Pooled(skips[-1])
            continue
        slab = _slab(net, level, [source], statistics, seed, pool=True)
        source = Stored([slab_call(slab, low, high) for low, high in bounds], [b // 2 for b, _ in bounds] + [height // 2])
    below = skips[-1]
    for r in reversed(range(len(decoders))):
        level, skip = decoders[r], skips[r]
        inputs = [Upsampled(below, getattr(net, upsamplers[r])), skip]
        height, count = skip.height, counts[r]
        if count == 1:
            out = run(r)(lambda inputs=inputs, level=level, height=height:
                         level_rows(net, level, inputs, 0, height, None))
            below = Stored.whole(out)
            continue
        bounds = slab_rows(height, count)
        statistics = level_statistics(net, level, inputs, bounds, slab_call, None)
        if r > 0 and counts[r - 1] > 1:  # read in slabs above: recomputed there, never stored
            below = Recomputed(net, level, inputs, statistics, None)
            continue
        slab = _slab(net, level, inputs, statistics, None, pool=False)
        below = Stored([slab_call(slab, low, high) for low, high in bounds], [b for b, _ in bounds] + [height])
    return below.all()


def _slab(net, level: Level, sources: list, statistics, seed: int | None, pool: bool) -> Callable:
    """The function computing one slab's output rows (pooled 2x2x2 with `pool`), as a stored piece."""
    def slab(low: int, high: int) -> torch.Tensor:
        out = level_rows(net, level, sources, low, high, statistics, seed=seed)
        return F.max_pool3d(out, 2) if pool else _piece(out)
    return slab


def dropout_seed(net, level: Level) -> int | None:
    """A seed for a slabbed level's hashed dropout, drawn from torch's generator once per forward."""
    if level.dropout is None:
        return None
    module = getattr(net, level.dropout)
    if not module.training or module.p == 0.0:
        return None
    return int(torch.randint(0, 2**31 - 1, (1,)).item())
