"""Spatial parallelism: one volume split along H across the processes of a group, exactly.

The processes of a *space* group (S of them) share one sample: rank k holds rows [lo_k, hi_k) of the
full-resolution volume and the rows [lo_k / 2^r, hi_k / 2^r) of every coarser level r, so no process
ever holds a whole feature map. A convolution reads one halo row from each neighbour: a level's two
convolutions read two rows of its input from the processes above and below (:class:`Shard`), exchanged
point-to-point with torch.distributed (gloo on CPU, NCCL on CUDA) in an autograd function whose backward
sends the halo's gradient back (:class:`_Halo`). The level is then computed by the same code as a slab
(:func:`fullres.engine.slabs.level_rows`), so a process's rows are the whole-volume result up to summation order.
Normalisation statistics are each process's moments, all-gathered and combined exactly
(:func:`fullres.engine.slabs.combine`); the Dice loss's voxel sums are all-reduced (:func:`sum_over_space`).
Each process's parameter gradients are then its rows' share; their sum over the space group (and mean
over the data group) is the whole batch's gradient (:func:`reduce_gradients`).

The world is a 2-D device mesh ``data x space`` (:func:`mesh`): ``torchrun --nproc-per-node 8`` with
S = 4 trains 2 samples at a time, each across 4 processes.

Why not DTensor or PhysicsNeMo's ShardTensor: PyTorch's DTensor convolution (``torch.distributed.tensor._tp_conv``)
exchanges halos along the last dim only, on the whole world's ranks (not one dimension of a mesh), with
no transposed convolution. PhysicsNeMo's ShardTensor (``nvidia-physicsnemo`` 2.2.2, read, not run) patches
conv3d, conv_transpose3d, group_norm and max_pool3d, but not ``F.instance_norm`` or batch norm, and it
brings torchvision, warp-lang, hydra, s3fs, onnx and timm as requirements (torchvision pins its own torch
build). The slab engine already computes each level's rows from a source of rows with halos; a source whose
halo rows come from the neighbours is all spatial parallelism needs here, and slabs and shards stay one
computation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fullres.engine.losses import voxel_sums
from fullres.engine.slabs import Upsampled, call, dropout_seed, combine, level_rows, level_statistics


@dataclass(frozen=True)
class Space:
    """This process's place in its space group: `group` (a torch.distributed group of `size` processes,
    ranks `ranks` in the world, this one at `index`), and the full-resolution volume's `height`."""

    group: object
    ranks: tuple[int, ...]
    index: int
    height: int
    samples: tuple[int, int] = (0, 1)  # (first, stride): its samples' numbers in the global batch (dropout masks)
    sent: dict = field(default_factory=lambda: {"bytes": 0}, compare=False)  # halo bytes this process has sent

    @property
    def size(self) -> int:
        return len(self.ranks)

    def rows(self, level: int = 0) -> tuple[int, int]:
        """[lo, hi) of this process at `level` (1/2^level resolution)."""
        lo, hi = shard_bounds(self.height, self.size)[self.index]
        return lo >> level, hi >> level

    @property
    def previous(self) -> int | None:
        return self.ranks[self.index - 1] if self.index > 0 else None

    @property
    def next(self) -> int | None:
        return self.ranks[self.index + 1] if self.index + 1 < self.size else None


def shard_bounds(height: int, size: int, levels: int = 4, halo: int = 2) -> list[tuple[int, int]]:
    """[lo, hi) rows of `size` near-equal shards of `height`, every boundary a multiple of 2^(levels - 1) (so it
    halves exactly down to the coarsest level) and every shard at least `halo` rows at that level (a
    convolution's halo comes from the neighbour only)."""
    unit = 2 ** (levels - 1)
    units = height // unit
    if height % unit or units < halo * size:
        raise ValueError(f"--spatial {size}: H={height} must be a multiple of {unit} with at least {halo * unit} rows "
                         f"per process ({halo * unit * size} in all)")
    bounds = [unit * (units * k // size) for k in range(size + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def local_rows(tensor: torch.Tensor, space: Space) -> torch.Tensor:
    """A copy of this process's full-resolution rows of a batch (N, C, H, W, D), or of class indices (N, H, W, D):
    the whole batch can then be freed."""
    lo, hi = space.rows(0)
    rows = tensor[:, :, lo:hi] if tensor.dim() == 5 else tensor[:, lo:hi]
    return rows.clone(memory_format=torch.preserve_format)


def mesh(space_size: int, device: str = "cpu"):
    """The world as a ``data x space`` device mesh (torch.distributed.device_mesh): consecutive ranks share a
    sample. Needs an initialised process group whose size `space_size` divides."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % space_size:
        raise ValueError(f"--spatial {space_size} must divide the number of processes ({world})")
    return init_device_mesh(device, (world // space_size, space_size), mesh_dim_names=("data", "space"))


def space_of(device_mesh, height: int) -> Space:
    """This process's :class:`Space` in `device_mesh` for a volume of `height` rows. Data group k of G holds
    samples k, k + G, ... of each global batch (a distributed sampler's deal): its hashed dropout masks are theirs."""
    group = device_mesh.get_group("space")
    ranks = tuple(dist.get_process_group_ranks(group))
    return Space(group, ranks, ranks.index(dist.get_rank()), height,
                 samples=(device_mesh.get_local_rank("data"), device_mesh.size(0)))


# ---- halo exchange ------------------------------------------------------------------------------

def simulated(height: int, size: int, index: int | None = None) -> Space:
    """A Space without a process group, for the dry run: process `index` of `size`, by default the one with the
    most rows among those with two neighbours (one, for 2 processes); its exchanges and reductions move
    nothing, its tensors are all there."""
    bounds = shard_bounds(height, size)
    if index is None:
        inner = range(1, size - 1) if size > 2 else range(size)
        index = max(inner, key=lambda k: bounds[k][1] - bounds[k][0])
    return Space(None, tuple(range(size)), index, height)


def _exchange(space: Space, to_previous: torch.Tensor, to_next: torch.Tensor, from_previous: torch.Tensor,
              from_next: torch.Tensor) -> None:
    """Send to the neighbours and receive from them at once (point-to-point, torch.distributed)."""
    if space.group is None:  # simulated: the receive buffers exist, nothing moves
        return
    ops = []
    if space.previous is not None:
        ops += [dist.P2POp(dist.isend, to_previous.contiguous(), space.previous, space.group),
                dist.P2POp(dist.irecv, from_previous, space.previous, space.group)]
    if space.next is not None:
        ops += [dist.P2POp(dist.isend, to_next.contiguous(), space.next, space.group),
                dist.P2POp(dist.irecv, from_next, space.next, space.group)]
    for request in dist.batch_isend_irecv(ops) if ops else []:
        request.wait()
    space.sent["bytes"] += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)


def _empty_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    # contiguous whatever x's memory format: the backends send and receive contiguous buffers only
    return x.new_empty((x.shape[0], x.shape[1], rows, *x.shape[3:]))


class Ordered:
    """A chain through the collectives of one forward, so that backward runs them in the reverse of the forward's
    order on every process: each takes the chain's token and gives the next, and the output carries the last
    (:meth:`after`). Without it the autograd engine runs each when its gradients are ready, which differs
    between processes holding different rows (different edge padding, different readers of a halo), and two
    processes waiting on different exchanges wait forever."""

    def __init__(self) -> None:
        self.token = torch.zeros((), requires_grad=torch.is_grad_enabled())

    def after(self, output: torch.Tensor) -> torch.Tensor:
        """`output`, whose gradient reaches the last collective first."""
        return _Then.apply(output, self.token) if self.token.requires_grad else output


class _Then(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(())


class _Halo(torch.autograd.Function):
    """(the previous process's `last` rows, the next one's `first` rows, the next token), given this process's
    `first` and `last` rows of a map held in shards along H (every process passes as many rows); at the
    volume's edges, 0 rows. Backward sends each halo's gradient to its owner and returns those received for
    `first` and `last`."""

    @staticmethod
    def forward(ctx, first, last, token, space: Space):
        ctx.space, ctx.shapes = space, (first.shape, last.shape)
        above = _empty_rows(last, last.shape[2] if space.previous is not None else 0)
        below = _empty_rows(first, first.shape[2] if space.next is not None else 0)
        _exchange(space, first, last, above, below)
        return above, below, token.new_zeros(())

    @staticmethod
    def backward(ctx, grad_above, grad_below, grad_token):  # unused outputs' gradients arrive as zeros
        space, (first_shape, last_shape) = ctx.space, ctx.shapes
        first = grad_above.new_zeros(first_shape) if space.previous is not None else None
        last = grad_above.new_zeros(last_shape) if space.next is not None else None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:  # alike on every process: the same map
            # my `above` was the previous process's `last`: its gradient goes back there, and so on
            _exchange(space, grad_above, grad_below, first, last)
        return first, last, grad_token.new_zeros(()), None


def halo(first: torch.Tensor, last: torch.Tensor, space: Space,
         order: Ordered | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the previous process's last rows, the next one's first rows) of a map held in shards along H, for this
    process's `first` and `last` rows (each process of the group calls it at once, with as many rows; at the
    volume's edges 0 rows come back); differentiable: each halo's gradient goes back to its owner, in `order`'s
    turn where given."""
    token = order.token if order is not None else first.new_zeros(())
    above, below, token = _Halo.apply(first, last, token, space)
    if order is not None:
        order.token = token
    return above, below


class Shard:
    """A map held in shards along H across the space group: this process's rows [lo, hi) of `height`, read
    (as a slab source) with up to a shard's rows more on each side from the neighbours."""

    def __init__(self, local: torch.Tensor, lo: int, hi: int, height: int, space: Space) -> None:
        self.local, self.lo, self.hi, self.height, self.space = local, lo, hi, height, space

    def rows(self, low: int, high: int) -> torch.Tensor:
        # Every process asks for the same halo depth at once (edges clipped): the exchange is symmetric.
        depth = max(self.lo - low, high - self.hi, 0)
        if depth == 0:
            return self.local[:, :, low - self.lo:high - self.lo]
        if depth > self.hi - self.lo:
            raise ValueError(f"a halo of {depth} rows is more than this process's {self.hi - self.lo} rows")
        above, below = halo(self.local[:, :, :depth], self.local[:, :, self.local.shape[2] - depth:], self.space)
        parts = [above[:, :, above.shape[2] - (self.lo - low):]] if low < self.lo else []
        parts.append(self.local[:, :, max(low, self.lo) - self.lo:min(high, self.hi) - self.lo])
        if high > self.hi:
            parts.append(below[:, :, :high - self.hi])
        return torch.cat(parts, dim=2)


# ---- reductions over the space group -------------------------------------------------------------

class _SumOfIdenticalUses(torch.autograd.Function):
    """all_reduce(SUM) of a partial sum that every process of the group then uses identically (the loss): the
    gradient of that one use is each process's partial's gradient, so backward is the identity."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        if group is not None:
            dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_space(x: torch.Tensor, space: Space) -> torch.Tensor:
    """The sum over the space group of every process's `x` (each a partial voxel sum of one sample), for a
    quantity every process then computes alike (the Dice loss)."""
    return _SumOfIdenticalUses.apply(x, space.group)


def sums_over(space: Space | None):
    """A context within which every voxel sum a loss or metric takes (:func:`fullres.engine.losses.voxel_sums`) is summed
    over `space`'s group; without a space, a context that changes nothing."""
    if space is None:
        return contextlib.nullcontext()
    return voxel_sums(lambda total: sum_over_space(total, space))


class _Gather(torch.autograd.Function):
    """Every process's `x` stacked (S, ...), by one all_reduce of a zero-padded stack (any backend); backward:
    the gradients every process holds for this process's slot, summed."""

    @staticmethod
    def forward(ctx, x, token, space: Space):
        ctx.space = space
        stacked = x.new_zeros((space.size, *x.shape))
        stacked[space.index] = x
        if space.group is not None:
            dist.all_reduce(stacked, group=space.group)
        return stacked, token.new_zeros(())

    @staticmethod
    def backward(ctx, grad, grad_token):
        grad = grad.clone()
        if ctx.space.group is not None:
            dist.all_reduce(grad, group=ctx.space.group)
        return grad[ctx.space.index], grad_token.new_zeros(()), None


def gathered_combine(space: Space, order: Ordered | None = None):
    """:func:`fullres.engine.slabs.combine` of every process's slab moments, gathered with their gradients (each process
    normalises its own rows with the statistics, so the gradients of all rows meet in each one's moments), in
    `order`'s turn where given."""

    def combine_all(partials):
        [(count, mean, m2)] = partials
        token = order.token if order is not None else count.new_zeros(())
        gathered, token = _Gather.apply(torch.stack([count, mean, m2]), token, space)
        if order is not None:
            order.token = token
        return combine([tuple(moments) for moments in gathered])

    return combine_all


def reduce_gradients(parameters, data_size: int = 1) -> None:
    """Each process's gradients summed over the whole world and divided by the data-parallel size: the sum over
    a space group is one sample group's gradient, the mean over data groups the batch's (losses are means)."""
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad)
            if data_size > 1:
                parameter.grad.div_(data_size)


def gather_rows(local: torch.Tensor, space: Space) -> torch.Tensor | None:
    """The whole volume (N, C, H, W, D) on the group's first process from every process's rows `local` (its rows
    [lo, hi) of H); None on the others. Every process of the group calls it at once (no gradient)."""
    bounds = shard_bounds(space.height, space.size)
    most = max(hi - lo for lo, hi in bounds)
    padded = local.new_zeros((*local.shape[:2], most, *local.shape[3:]))  # the backends gather equal shapes
    padded[:, :, :local.shape[2]] = local
    first = space.index == 0
    parts = [torch.empty_like(padded) for _ in bounds] if first else None
    if space.group is not None:
        dist.gather(padded, parts, dst=space.ranks[0], group=space.group)
    elif first:
        parts[0] = padded
    if not first:
        return None
    return torch.cat([part[:, :, :hi - lo] for part, (lo, hi) in zip(parts, bounds)], dim=2)


# ---- the forward pass -------------------------------------------------------------------------------

def forward_shards(net, x: torch.Tensor, space: Space) -> torch.Tensor:
    """The U-Net's forward on this process's rows `x` (N, C, hi - lo, W, D) of the volume: its rows of the
    logits. Every process of the space group calls it at once. The network's levels (``ENCODERS``,
    ``DECODERS``, ``UPSAMPLERS``) are computed by :func:`fullres.engine.slabs.level_rows` on :class:`Shard` sources."""
    encoders, decoders, upsamplers = net.ENCODERS, net.DECODERS, net.UPSAMPLERS
    combine_all = gathered_combine(space)
    lo, hi = space.rows(0)
    if x.shape[2] != hi - lo:
        raise ValueError(f"this process holds rows {lo}..{hi} of H={space.height}, got {x.shape[2]} rows")
    source = Shard(x, lo, hi, space.height, space)
    skips = []
    for r, level in enumerate(encoders):
        lo, hi = space.rows(r)
        seed = dropout_seed(net, level)
        statistics = level_statistics(net, level, [source], [(lo, hi)], call, seed, combine_all, space.samples)
        out = level_rows(net, level, [source], lo, hi, statistics, seed=seed, samples=space.samples)
        skips.append(Shard(out, lo, hi, source.height, space))
        if r + 1 < len(encoders):
            source = Shard(F.max_pool3d(out, 2), lo // 2, hi // 2, source.height // 2, space)
    below = skips[-1]
    for r in reversed(range(len(decoders))):
        level, skip = decoders[r], skips[r]
        lo, hi = space.rows(r)
        inputs = [Upsampled(below, getattr(net, upsamplers[r])), skip]
        statistics = level_statistics(net, level, inputs, [(lo, hi)], call, None, combine_all)
        below = Shard(level_rows(net, level, inputs, lo, hi, statistics), lo, hi, skip.height, space)
    return below.local
