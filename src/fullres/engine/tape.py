"""Slabs for any convolutional network, without editing its code: its forward recorded once as a tape of
operations, then replayed in horizontal slabs along H, exactly, normalisation included.

Recording (:func:`record`): one forward on the meta device (nothing allocated) under a
``TorchFunctionMode`` writes down every call that reads the input or a map computed from it: 3-D
convolutions and transposed convolutions (any kernel, stride, padding, dilation, groups), max and average
pooling, interpolation (nearest, nearest-exact, trilinear), instance, group and batch norm, concatenation
over channels, padding that leaves H alone, dropout and pointwise operations (activations, residual sums).
Python control flow runs as usual, so the tape is the network at that input shape. Anything else that
reads a map (attention, reshapes across H, indexing) is refused by name: :class:`Unsliceable`.

Replay (:class:`SlabForward`): every map has a slab count from its resolution (``counts[level]``, level
``log2(H / h)``; 1: whole). A whole map whose inputs are whole is computed as usual (*eager*). A map in
slabs is *recomputed* wherever its rows are read, from the maps stored below it, with the halo each
operation needs (zero padding only at the volume's real edges), unless it is an *anchor*: the output of
an operation that shrinks the volume (pooling, strided convolution: 8 times fewer voxels than its input),
the input of one that grows it (a decoder level's output, read by the upsampling to the finer level), or
the network's output; anchors are computed slab by slab and stored as pieces, and a whole map that reads
a slabbed one is an anchor of one slab. So a level stores its downsampled input and its decoder output
(each as small as one of the finer level's maps divided by 4 or more) and a region recomputes its own
level only; each region is recomputed in backward (non-reentrant checkpointing).

Normalisation with statistics over the volume (instance, group, training batch norm) takes them from a
pass over the slabs of its input (each slab's count, mean and sum of squared deviations, combined exactly
by :func:`fullres.engine.slabs.combine`); the statistics are autograd tensors, so gradients are exact.
Dropout draws its mask from a hash of the voxel's global index (:func:`fullres.engine.slabs.row_dropout`),
so every slab and every recomputation drops the same voxels.
"""

from __future__ import annotations

import inspect
import math
from types import SimpleNamespace
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from fullres.engine.slabs import Rows, combine, row_dropout, slab_rows, take_rows
from fullres.engine.slabs import moments as slab_moments
from fullres.engine.spatial import Ordered, Space, gathered_combine, halo, shard_bounds

#: Networks that attend over the whole volume: no slab of them is the whole-volume result.
ATTENTION_NETWORKS = {"UNETR": "its transformer attends over every patch of the volume at once",
                      "SwinUNETR": "its shifted-window attention and patch merging mix rows across the volume"}


class Unsliceable(ValueError):
    """The network reads its maps with an operation slabs cannot split along H."""


# ---- the tape ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    """A map on the tape: the network's input (index 0) or an operation's output."""
    index: int


@dataclass(frozen=True)
class Held:
    """A parameter or buffer, looked up in its module when the tape runs (so the live tensor is used)."""
    module: nn.Module
    name: str

    def get(self) -> torch.Tensor:
        return getattr(self.module, self.name)


@dataclass(frozen=True, eq=False)
class Derived:
    """A tensor computed from parameters alone (a slice of a weight, a standardised weight), computed again
    from the live parameters whenever the tape reads it."""
    function: Callable
    args: tuple
    kwargs: dict

    def get(self) -> torch.Tensor:
        return self.function(*tree_map(_live, self.args, is_leaf=_is_live),
                             **tree_map(_live, self.kwargs, is_leaf=_is_live))


LIVE = (Held, Derived)


def _is_live(value) -> bool:
    return isinstance(value, (Ref, *LIVE))


def _live(value):
    return value.get() if isinstance(value, LIVE) else value


@dataclass
class Step:
    """One recorded operation: `kind` (conv, transposed, pool, interpolate, norm, cat, pad, dropout,
    pointwise), the function run (out-of-place), its arguments with :class:`Ref` and :class:`Held` in place
    of tensors, the maps it reads and the shape it makes."""
    index: int
    kind: str
    function: Callable
    args: tuple
    kwargs: dict
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str


@dataclass
class Tape:
    input_shape: tuple[int, ...]
    steps: list[Step] = field(default_factory=list)  # steps[0] is the input
    output: int = 0
    halos: dict = field(default_factory=dict, repr=False)  # (counts, recompute_inputs, processes, H) -> depths


F_MAX_POOL = (F.max_pool3d,)
KINDS: dict[Any, str] = {
    torch.conv3d: "conv", torch.conv_transpose3d: "transposed", F.max_pool3d: "pool", F.avg_pool3d: "pool",
    F.interpolate: "interpolate", F.instance_norm: "norm", F.group_norm: "norm", F.batch_norm: "norm",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat", F.pad: "pad", F.dropout: "dropout",
}
POINTWISE = {
    F.relu, torch.relu, torch.Tensor.relu, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish,
    F.relu6, F.hardtanh, torch.prelu, F.prelu, torch.sigmoid, torch.Tensor.sigmoid, torch.tanh, torch.Tensor.tanh,
    torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.sub, torch.Tensor.sub,
    torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.mul, torch.Tensor.mul, torch.Tensor.__mul__,
    torch.Tensor.__rmul__, torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.Tensor.__neg__,
    torch.Tensor.neg, torch.Tensor.contiguous, torch.Tensor.clone, torch.Tensor.float, torch.Tensor.to,
    torch.clamp, torch.Tensor.clamp,
}
#: in-place operations replayed out of place (a recomputed region must not write into what it reads)
OUT_OF_PLACE = {
    torch.Tensor.add_: torch.add, torch.Tensor.__iadd__: torch.add, torch.Tensor.sub_: torch.sub,
    torch.Tensor.__isub__: torch.sub, torch.Tensor.mul_: torch.mul, torch.Tensor.__imul__: torch.mul,
    torch.Tensor.div_: torch.div, torch.Tensor.__itruediv__: torch.div, torch.Tensor.relu_: torch.relu,
    torch.relu_: torch.relu, F.relu_: torch.relu, F.leaky_relu_: F.leaky_relu, F.elu_: F.elu,
    torch.Tensor.clamp_: torch.clamp,
}
#: positional parameters of the builtins whose arguments the replay reads by name
BUILTIN_PARAMETERS = {
    torch.conv3d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    torch.conv_transpose3d: ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
    F.avg_pool3d: ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    torch.cat: ("tensors", "dim"), torch.concat: ("tensors", "dim"), torch.concatenate: ("tensors", "dim"),
}

SIGNATURES = {F.max_pool3d: F._max_pool3d}  # boolean-dispatched: the signature of the branch taken


def _name(function) -> str:
    return getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)


def _bound(function, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name (defaults filled in)."""
    if function in BUILTIN_PARAMETERS:
        return {**dict(zip(BUILTIN_PARAMETERS[function], args)), **kwargs}
    bound = inspect.signature(SIGNATURES.get(function, function)).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _triple(value) -> tuple[int, int, int]:
    return tuple(value) * (3 // len(value)) if isinstance(value, (tuple, list)) else (value,) * 3


class _Recorder(TorchFunctionMode):
    def __init__(self, tape: Tape, maps: dict[int, int], held: dict[int, Held], keep: list) -> None:
        super().__init__()
        self.tape, self.maps, self.held, self.keep = tape, maps, held, keep

    def __torch_function__(self, function, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = function(*args, **kwargs)
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if not any(id(t) in self.maps for t in tensors):
            if isinstance(out, torch.Tensor) and tensors and all(id(t) in self.held for t in tensors) and \
                    function not in OUT_OF_PLACE and id(out) not in self.held:  # made from parameters alone
                hold = lambda v: self.held[id(v)] if isinstance(v, torch.Tensor) else v  # noqa: E731
                self.held[id(out)] = Derived(function, tree_map(hold, args), tree_map(hold, kwargs))
                self.keep.append(out)
            return out  # parameters, shapes, constants: not a map
        if not isinstance(out, torch.Tensor):
            if any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
                raise Unsliceable(f"{_name(function)} returns several tensors from a feature map")
            return out  # sizes, dims
        replayed = OUT_OF_PLACE.get(function, function)
        kind = KINDS.get(replayed, "pointwise" if replayed in POINTWISE else None)
        if kind is None:
            raise Unsliceable(f"slabs cannot split {_name(function)} along H (it is not a convolution, pooling, "
                              f"interpolation, normalisation, concatenation or pointwise operation)")
        if out.dim() != 5:
            raise Unsliceable(f"{_name(function)} makes a {out.dim()}-D map; slabs need (N, C, H, W, D) maps throughout")
        named = _bound(replayed, args, kwargs) if (inspect.isfunction(replayed) or replayed in BUILTIN_PARAMETERS
                                                    or replayed in SIGNATURES) else None
        if named is not None and "inplace" in named:
            named["inplace"] = False

        def placeholder(value):
            if isinstance(value, torch.Tensor):
                if id(value) in self.maps:
                    return Ref(self.maps[id(value)])
                if id(value) in self.held:
                    return self.held[id(value)]
                raise Unsliceable(f"{_name(function)} reads a tensor that is neither the input, a map computed from "
                                  f"it, nor a parameter or buffer of the network")
            return value

        step_args, step_kwargs = (), tree_map(placeholder, named) if named is not None else tree_map(placeholder, kwargs)
        if named is None:
            step_args = tree_map(placeholder, args)
        inputs = tuple(dict.fromkeys(r.index for r in tree_flatten((step_args, step_kwargs))[0] if isinstance(r, Ref)))
        step = Step(len(self.tape.steps), kind, replayed, step_args, step_kwargs, inputs, tuple(out.shape),
                    _name(function))
        _check(step, self.tape)
        self.tape.steps.append(step)
        self.maps[id(out)] = step.index  # an in-place call's result replaces the map it overwrote
        self.keep.append(out)
        return out


def _check(step: Step, tape: Tape) -> None:
    """Refuse what the replay cannot split exactly."""
    a = step.kwargs
    source = tape.steps[step.inputs[0]].shape if step.inputs else None
    if step.kind == "cat" and a.get("dim", 0) not in (1, -4):
        raise Unsliceable(f"{step.name} joins maps along dimension {a.get('dim', 0)}; slabs need channel concatenation")
    if step.kind == "pad":
        pad = list(a["pad"])
        if len(pad) > 4 and any(pad[4:]):
            raise Unsliceable(f"{step.name} pads H by {pad[4:6]}; slabs pad H only at the volume's edges")
    if step.kind == "pool":
        if a.get("return_indices"):
            raise Unsliceable(f"{step.name} with return_indices: slabs need the pooled map alone")
        if step.function is F.avg_pool3d and _triple(a.get("padding", 0))[0] and not a.get("count_include_pad", True):
            raise Unsliceable(f"{step.name}: padded average pooling without count_include_pad")
    if step.kind in ("conv", "pool"):
        k, s, p, d = _window(step, tape)
        if (source[2] + p[0] + p[1] - d * (k - 1) - 1) // s + 1 != step.shape[2]:
            raise Unsliceable(f"{step.name} with ceil_mode leaves a partial window at H's end")
    if step.kind == "interpolate":
        if a.get("antialias") or a["mode"] not in ("nearest", "nearest-exact", "trilinear"):
            raise Unsliceable(f"{step.name} mode {a['mode']!r}: slabs interpolate nearest, nearest-exact or trilinear")
    if step.kind == "norm" and step.function is F.instance_norm and a["use_input_stats"] and a["running_mean"] is not None:
        raise Unsliceable(f"{step.name}: instance norm that tracks running statistics")
    for index in step.inputs:
        height = tape.steps[index].shape[2]
        if step.kind in ("pointwise", "cat", "norm", "dropout", "pad") and height not in (step.shape[2], 1):
            raise Unsliceable(f"{step.name} reads a map of {height} rows into one of {step.shape[2]}")


def record(model: nn.Module, input_shape: Sequence[int], dtype: torch.dtype = torch.float32,
           forward: Callable | None = None) -> Tape:
    """The tape of `model`'s forward (or `forward`, a callable standing for it) on an input of `input_shape`
    (N, C, H, W, D), recorded on the meta device (outside any fake-tensor or dispatch mode in force; the
    module's own parameters and buffers are restored afterwards). Raises :class:`Unsliceable` naming the
    first operation slabs cannot split."""
    from torch.utils._python_dispatch import _disable_current_modes

    forward = forward or model
    tape = Tape(tuple(input_shape))
    with _disable_current_modes():
        swapped, held = [], {}
        for owner in model.modules():
            for table in (owner._parameters, owner._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        swapped.append((table, name, tensor, owner))
        keep = []
        try:
            for table, name, tensor, owner in swapped:
                meta = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
                table[name] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
                held.setdefault(id(table[name]), Held(owner, name))
                keep.append(table[name])
            x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
            tape.steps.append(Step(0, "input", None, (), {}, (), tuple(input_shape), "input"))
            maps = {id(x): 0}
            with _Recorder(tape, maps, held, keep), torch.no_grad():
                out = forward(x)
        finally:
            for table, name, tensor, _ in swapped:
                table[name] = tensor
        if not isinstance(out, torch.Tensor) or id(out) not in maps:
            raise Unsliceable("the network's output is not one map computed from its input (deep supervision off?)")
        tape.output = maps[id(out)]
    return tape


# ---- rows: what each operation reads -------------------------------------------------------------------

def _window(step: Step, tape: Tape) -> tuple[int, int, tuple[int, int], int]:
    """(kernel, stride, (padding before, after), dilation) along H of a convolution or pooling step."""
    a = step.kwargs
    if step.kind == "conv":
        k = a["weight"].get().shape[2] if isinstance(a["weight"], LIVE) else tape.steps[a["weight"].index].shape[2]
        s, d = _triple(a.get("stride", 1))[0], _triple(a.get("dilation", 1))[0]
        padding = a.get("padding", 0)
        if isinstance(padding, str):
            total = 0 if padding == "valid" else d * (k - 1)
            return k, s, (total // 2, total - total // 2), d
        p = _triple(padding)[0]
        return k, s, (p, p), d
    k = _triple(a["kernel_size"])[0]
    s = _triple(a.get("stride") or a["kernel_size"])[0]
    p = _triple(a.get("padding", 0))[0]
    d = _triple(a.get("dilation", 1))[0] if step.function in F_MAX_POOL else 1
    return k, s, (p, p), d


def _transposed(step: Step) -> tuple[int, int, int, int]:
    a = step.kwargs
    k = a["weight"].get().shape[2]
    return k, _triple(a.get("stride", 1))[0], _triple(a.get("padding", 0))[0], _triple(a.get("dilation", 1))[0]


def _source_rows(step: Step, tape: Tape, low: int, high: int):
    """Output rows [low, high) of an interpolation: per row (first source row, second, weight of the second)."""
    a = step.kwargs
    height, out = tape.steps[step.inputs[0]].shape[2], step.shape[2]
    factor = a.get("scale_factor")
    factor = _triple(factor)[0] if factor is not None and not a.get("recompute_scale_factor") else None
    scale = 1.0 / factor if factor else height / out
    rows = []
    for o in range(low, high):
        if a["mode"] == "trilinear":
            if a.get("align_corners"):
                source = o * ((height - 1) / (out - 1) if out > 1 else 0.0)
            else:
                source = max(scale * (o + 0.5) - 0.5, 0.0)
            first = int(source)
            rows.append((first, first + (first < height - 1), source - first))
        else:
            source = (o + 0.5) * scale if a["mode"] == "nearest-exact" else o * scale
            rows.append((min(int(math.floor(source)), height - 1), None, 0.0))
    return rows


def needed_rows(step: Step, tape: Tape, low: int, high: int) -> tuple[int, int]:
    """The rows of `step`'s first input map that output rows [low, high) read, before clipping to the
    map (rows outside it are the zero padding of convolutions and pooling)."""
    if step.kind in ("conv", "pool"):
        k, s, (before, _), d = _window(step, tape)
        return low * s - before, (high - 1) * s - before + d * (k - 1) + 1
    if step.kind == "transposed":
        k, s, p, d = _transposed(step)
        height = tape.steps[step.inputs[0]].shape[2]
        first = max(0, -((-(low + p - d * (k - 1))) // s))
        last = min(height, (high - 1 + p) // s + 1)
        return first, max(first, last)
    if step.kind == "interpolate":
        return _span(_source_rows(step, tape, low, high))
    return low, high


def _span(rows) -> tuple[int, int]:
    """The source rows [first, last) that interpolated rows (:func:`_source_rows`) read."""
    return min(r[0] for r in rows), max(r[1] if r[1] is not None else r[0] for r in rows) + 1


def input_rows(step: Step, tape: Tape, low: int, high: int) -> dict[int, tuple[int, int]]:
    """For each map `step` reads, the clipped rows that output rows [low, high) need."""
    result = {}
    for index in step.inputs:
        height = tape.steps[index].shape[2]
        if index == step.inputs[0] and step.kind in ("conv", "pool", "transposed", "interpolate"):
            first, last = needed_rows(step, tape, low, high)
        elif height == step.shape[2]:
            first, last = low, high
        else:  # broadcast over H
            first, last = 0, height
        result[index] = (max(0, first), min(height, last))
    return result


# ---- one operation on rows ----------------------------------------------------------------------------

def _pad_rows(x: torch.Tensor, before: int, after: int, value: float = 0.0) -> torch.Tensor:
    return x if before == after == 0 else F.pad(x, (0, 0, 0, 0, before, after), value=value)


def run_step(step: Step, tape: Tape, low: int, high: int, read: Callable[[int, int, int], torch.Tensor],
             statistics: dict, seed: int, whole: bool = False, samples: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Output rows [low, high) of `step`; `read(index, first, last)` gives rows of an input map, `statistics`
    the (scale, shift) of each normalisation with whole-volume statistics (:func:`norm_affine`). `whole`: all rows of a step
    whose inputs are whole, run as the network runs it (its own normalisation kernels). `samples`: the
    batch's sample numbers in the global batch (first, stride), for dropout's hashed mask."""
    a = step.kwargs
    if whole and step.kind in ("norm", "pointwise", "cat", "pad"):
        return _call(step, tape, low, high, read)

    value = _live

    if step.kind in ("conv", "pool"):
        k, s, (before, after), d = _window(step, tape)
        height = tape.steps[step.inputs[0]].shape[2]
        first, last = needed_rows(step, tape, low, high)
        x = read(step.inputs[0], max(0, first), min(height, last))
        top, bottom = max(0, -first), max(0, last - height)
        if step.kind == "conv":
            padding = a.get("padding", 0)
            if isinstance(padding, str):
                if padding == "same" and (before != after):
                    raise Unsliceable(f"{step.name}: padding='same' with an even kernel")
                padding = 0 if padding == "valid" else tuple(d_ * (k_ - 1) // 2 for d_, k_ in zip(
                    _triple(a.get("dilation", 1)), a["weight"].get().shape[2:]))
            pw = _triple(padding)
            if top == bottom:  # the convolution pads H itself
                return torch.conv3d(x, value(a["weight"]), value(a.get("bias")), a.get("stride", 1), (top, pw[1], pw[2]),
                                    a.get("dilation", 1), a.get("groups", 1))
            return torch.conv3d(_pad_rows(x, top, bottom), value(a["weight"]), value(a.get("bias")), a.get("stride", 1),
                                (0, pw[1], pw[2]), a.get("dilation", 1), a.get("groups", 1))
        pw = _triple(a.get("padding", 0))
        if step.function in F_MAX_POOL:
            return F.max_pool3d(_pad_rows(x, top, bottom, -math.inf), a["kernel_size"], a.get("stride"),
                                (0, pw[1], pw[2]), a.get("dilation", 1), a.get("ceil_mode", False))
        return F.avg_pool3d(_pad_rows(x, top, bottom), a["kernel_size"], a.get("stride"), (0, pw[1], pw[2]),
                            a.get("ceil_mode", False), True if top or bottom else a.get("count_include_pad", True),
                            a.get("divisor_override"))
    if step.kind == "transposed":
        k, s, p, d = _transposed(step)
        first, last = needed_rows(step, tape, low, high)
        weight, bias = value(a["weight"]), value(a.get("bias"))
        shape = list(step.shape)
        shape[2] = high - low
        if first >= last:  # no input row reaches these rows: the bias alone
            out = weight.new_zeros(shape)
        else:
            padding, extra = _triple(a.get("padding", 0)), _triple(a.get("output_padding", 0))
            y = torch.conv_transpose3d(read(step.inputs[0], first, last), weight, None, a.get("stride", 1),
                                       (0, padding[1], padding[2]), (0, extra[1], extra[2]), a.get("groups", 1),
                                       a.get("dilation", 1))
            offset = low - (first * s - p)  # y's row r is output row first * s - p + r
            top = max(0, -offset)
            y = y[:, :, max(0, offset):max(0, offset) + high - low - top]
            out = _pad_rows(y, top, high - low - top - y.shape[2])
        return out if bias is None else out + bias.view(1, -1, 1, 1, 1).to(out.dtype)
    if step.kind == "interpolate":
        rows = _source_rows(step, tape, low, high)
        first, last = _span(rows)
        x = read(step.inputs[0], first, last)
        lower = torch.tensor([r[0] - first for r in rows], device=x.device)
        if a["mode"] == "trilinear":
            upper = torch.tensor([r[1] - first for r in rows], device=x.device)
            weight = torch.tensor([r[2] for r in rows], dtype=x.dtype, device=x.device).view(1, 1, -1, 1, 1)
            y = torch.lerp(x.index_select(2, lower), x.index_select(2, upper), weight)
        else:
            y = x.index_select(2, lower)
        factor = a.get("scale_factor")
        scales = [None, None] if factor is None or a.get("recompute_scale_factor") else list(_triple(factor)[1:])
        size = [high - low, *step.shape[3:]]
        if a["mode"] == "trilinear":
            return torch.ops.aten.upsample_trilinear3d.default(y, size, bool(a.get("align_corners")), None, *scales)
        operator = torch.ops.aten.upsample_nearest3d if a["mode"] == "nearest" else torch.ops.aten._upsample_nearest_exact3d
        return operator.default(y, size, None, *scales)
    if step.kind == "norm" and needs_statistics(step):
        x = read(step.inputs[0], low, high)
        scale, shift = statistics[step.index]
        y = torch.addcmul(shift, x, scale)
        return y if y.dtype == x.dtype else y.to(x.dtype)
    if step.kind == "dropout":
        x = read(step.inputs[0], low, high)
        if not a["training"] or a["p"] == 0:
            return x
        return row_dropout(x, a["p"], seed, low, step.shape[2], samples)

    return _call(step, tape, low, high, read)


def _call(step: Step, tape: Tape, low: int, high: int, read: Callable) -> torch.Tensor:
    """`step`'s own function on rows [low, high) of the maps it reads (whole those broadcast over H)."""
    def sliced(v):
        if isinstance(v, Ref):
            height = tape.steps[v.index].shape[2]
            return read(v.index, low, high) if height == step.shape[2] else read(v.index, 0, height)
        return _live(v)

    return step.function(*tree_map(sliced, step.args, is_leaf=_is_live),
                         **tree_map(sliced, step.kwargs, is_leaf=_is_live))


def needs_statistics(step: Step) -> bool:
    """Whether a normalisation step takes statistics over the volume (not running ones)."""
    a = step.kwargs
    if step.kind != "norm":
        return False
    if step.function is F.batch_norm:
        return bool(a["training"])
    if step.function is F.instance_norm:
        return bool(a["use_input_stats"])
    return True


def moments(step: Step, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, sum of squared deviations) of `x` per statistic, in at least fp32
    (:func:`fullres.engine.slabs.moments`, the paper's schedule's own)."""
    kind = {F.group_norm: "group", F.batch_norm: "batch"}.get(step.function, "instance")
    return slab_moments(SimpleNamespace(num_groups=step.kwargs.get("num_groups")), kind, x)


def norm_affine(step: Step, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) shaped (N or 1, C, 1, 1, 1): the normalisation with these whole-volume statistics is
    x * scale + shift (computed once a forward, so each region applies it in one operation)."""
    a = step.kwargs
    rstd = torch.rsqrt(var + a["eps"])
    if step.function is F.batch_norm:  # (C,)
        rstd, mean = rstd[None], mean[None]
    elif step.function is F.group_norm:  # (N, G): each group's statistics for its channels
        channels = step.shape[1] // a["num_groups"]
        rstd, mean = rstd.repeat_interleave(channels, 1), mean.repeat_interleave(channels, 1)
    scale = rstd * a["weight"].get() if isinstance(a.get("weight"), LIVE) else rstd
    shift = -mean * scale
    if isinstance(a.get("bias"), LIVE):
        shift = shift + a["bias"].get()
    return scale[:, :, None, None, None], shift[:, :, None, None, None]


# ---- the slabbed forward -------------------------------------------------------------------------------

def level_of(height: int, full: int) -> int:
    return max(0, round(math.log2(full / height))) if height else 0


class SlabForward:
    """One forward of `tape` (with the live parameters it holds) on an input, each map in ``counts[level]``
    slabs (missing counts: whole); with `recompute_inputs` K, the downsampled inputs of levels 1..K are not
    stored but recomputed from the finer level wherever read (less memory, more FLOPs). Called on the
    input, returns the output map, whole.

    With a `space` (:class:`fullres.engine.spatial.Space`), the input is this process's rows [lo, hi) of the
    volume (:func:`fullres.engine.spatial.shard_bounds`) and the output its rows of the output map: every
    process of the group holds rows [lo * h / H, hi * h / H) of each map of h rows, computed in its slabs
    as above; a stored map's edge rows are exchanged with the neighbouring processes once, as deep as any
    process reads past its own rows (the depth every process derives alike from the tape), and each
    normalisation's statistics combine every process's moments (:func:`fullres.engine.spatial.gathered_combine`).
    Every process of the group calls it at once. Raises ValueError where some process would hold no row of
    a map or fewer rows than a neighbour reads."""

    def __init__(self, tape: Tape, counts: Sequence[int], recompute_inputs: int = 0, space: Space | None = None) -> None:
        self.tape, steps = tape, tape.steps
        self.space = space
        full = tape.input_shape[2]
        bounds = shard_bounds(full, space.size) if space is not None else [(0, full)]
        # every process's rows [lo, hi) of every map, level-0 rows scaled to the map's height
        self.owners = [{step.index: (lo * step.shape[2] // full, hi * step.shape[2] // full) for step in steps}
                       for lo, hi in bounds]
        self.own = self.owners[space.index if space is not None else 0]
        # the fewest rows of each map any process holds: slab counts alike on every process
        self.least = {step.index: min(hi - lo for lo, hi in (owner[step.index] for owner in self.owners))
                      for step in steps}
        self.counts, levels = {}, {}
        for step in steps:
            level = levels[step.index] = level_of(step.shape[2], full)
            count = counts[level] if level < len(counts) else 1
            self.counts[step.index] = max(1, min(count, self.least[step.index] // 2))
        used = {tape.output}
        for step in reversed(steps):
            if step.index in used:
                used.update(step.inputs)
        self.used = used
        self.mode = {}  # index -> "stored" (input, eager, anchor) or "recomputed"
        self.anchor = set()
        upsampled = {i for step in steps if step.index in used for i in step.inputs
                     if math.prod(step.shape[2:]) > math.prod(steps[i].shape[2:])}
        for step in steps:
            if step.index not in used:
                continue
            if step.kind == "input":
                self.mode[step.index] = "stored"
                continue
            reads_recomputed = any(self.mode[i] == "recomputed" for i in step.inputs)
            volume = math.prod(step.shape[2:])
            shrinks = any(math.prod(steps[i].shape[2:]) > volume for i in step.inputs) and \
                not 1 <= levels[step.index] <= recompute_inputs  # recomputed from the finer level wherever read
            if self.counts[step.index] == 1:
                self.mode[step.index] = "stored"
                if reads_recomputed:
                    self.anchor.add(step.index)
            elif step.index == tape.output or shrinks or step.index in upsampled:
                self.mode[step.index] = "stored"
                self.anchor.add(step.index)
            else:
                self.mode[step.index] = "recomputed"
        self.depth: dict[int, int] = {}
        if space is not None:
            key = (tuple(counts), recompute_inputs, space.size, space.height)
            if key not in tape.halos:
                tape.halos[key] = self._halo_depths()
            self.depth = tape.halos[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.own[0]
        if x.shape[2] != hi - lo:
            raise ValueError(f"this process holds rows {lo}..{hi} of H={self.tape.input_shape[2]}, got {x.shape[2]} rows")
        self.stored: dict[int, Rows] = {}
        self.order = Ordered() if self.space is not None else None  # backward's exchanges alike on every process
        self._keep(0, [x], [lo, hi])
        self.statistics: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.samples = self.space.samples if self.space is not None else (0, 1)
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if any(
            s.kind == "dropout" and s.kwargs["training"] and s.kwargs["p"] for s in self.tape.steps) else 0
        for step in self.tape.steps[1:]:
            if step.index not in self.used:
                continue
            if step.index in self.anchor:
                self._statistics_for(step.index)
                bounds = self._slabs(step.index, self.own)
                pieces = [_piece(_checkpointed(self._region, step.index, low, high)) for low, high in bounds]
                self._keep(step.index, pieces, [low for low, _ in bounds] + [bounds[-1][1]])
            elif self.mode[step.index] == "stored":  # eager: as the network computes it, with its own kernels
                # across processes, a normalisation's statistics are every process's
                whole = self.space is None or not needs_statistics(step)
                if not whole:
                    self._statistics(step)
                elif step.function is F.batch_norm and step.kwargs["training"]:
                    _count_batch(step)
                low, high = self.own[step.index]
                out = run_step(step, self.tape, low, high, self._read_stored, self.statistics, self.seed,
                               whole=whole, samples=self.samples)
                self._keep(step.index, [out], [low, high])
        out = self.stored[self.tape.output].all()
        return self.order.after(out) if self.order is not None else out

    # -- this process's rows: slabs, stored maps and their halos

    def _slabs(self, index: int, own: dict) -> list[tuple[int, int]]:
        """The slabs [low, high) of a process's rows `own[index]` of map `index`."""
        lo, hi = own[index]
        if hi - lo < 2:
            return [(lo, hi)]
        return [(lo + a, lo + b) for a, b in slab_rows(hi - lo, self.counts[index])]

    def _keep(self, index: int, pieces: list, bounds: list) -> None:
        """Store map `index`'s pieces; across processes, with the neighbours' edge rows that others read."""
        depth = self.depth.get(index, 0)
        if depth:
            rows = Rows(pieces, bounds)
            above, below = halo(rows.rows(bounds[0], bounds[0] + depth), rows.rows(bounds[-1] - depth, bounds[-1]),
                                self.space, self.order)
            self.stored[index] = _Shard(pieces, bounds, above, below)
        else:
            self.stored[index] = Rows(pieces, bounds)

    def _halo_depths(self) -> dict[int, int]:
        """For each stored map, the rows past its own that any process reads (the same on every process);
        ValueError where a process holds no row of a map or fewer than a neighbour reads."""
        depth: dict[int, int] = {}
        for own in self.owners:
            for index, (first, last) in self._reads(own).items():
                lo, hi = own[index]
                depth[index] = max(depth.get(index, 0), lo - first, last - hi)
        for index in sorted(self.used):
            rows, height = self.least[index], self.tape.steps[index].shape[2]
            if rows < max(1, depth.get(index, 0)):
                made = f"operation {index}, {self.tape.steps[index].name.rsplit('.', 1)[-1]}" if index else "the input"
                raise ValueError(f"--spatial {self.space.size}: a map of {height} rows ({made}) "
                                 f"leaves a process {rows} row(s), fewer than the {max(1, depth.get(index, 0))} its "
                                 f"neighbours read; fewer processes, or a taller volume")
        return {index: d for index, d in depth.items() if d > 0}

    def _reads(self, own: dict) -> dict[int, tuple[int, int]]:
        """The rows [first, last) of each stored map that the process holding rows `own` reads in a forward
        (as :meth:`__call__` reads them: eager steps, anchors' regions, statistics over recomputed maps)."""
        reads: dict[int, tuple[int, int]] = {}

        def region(target: int, low: int, high: int) -> None:
            for index, (first, last) in self._closure(target, low, high).items():
                for source, (a, b) in input_rows(self.tape.steps[index], self.tape, first, last).items():
                    if self.mode[source] != "recomputed":
                        _widen(reads, source, a, b)

        done = set()
        for step in self.tape.steps[1:]:
            if step.index not in self.used:
                continue
            if step.index in self.anchor:
                for index in sorted(self._closure(step.index, *own[step.index])):
                    source = self.tape.steps[index].inputs[0] if self.tape.steps[index].inputs else None
                    if needs_statistics(self.tape.steps[index]) and index not in done:
                        done.add(index)
                        if self.mode[source] == "recomputed":
                            for low, high in self._slabs(source, own):
                                region(source, low, high)
                for low, high in self._slabs(step.index, own):
                    region(step.index, low, high)
            elif self.mode[step.index] == "stored":
                region(step.index, *own[step.index])
        return reads

    # -- rows of stored maps, regions of recomputed ones

    def _read_stored(self, index: int, low: int, high: int) -> torch.Tensor:
        return self.stored[index].rows(low, high)

    def _closure(self, target: int, low: int, high: int) -> dict[int, tuple[int, int]]:
        """The rows of `target` and of every recomputed map it reads, for its rows [low, high)."""
        need = {target: (low, high)}
        for step in reversed(self.tape.steps[1:target + 1]):
            if step.index not in need or (step.index != target and self.mode[step.index] != "recomputed"):
                continue
            first, last = need[step.index]
            for index, (a, b) in input_rows(step, self.tape, first, last).items():
                if self.mode[index] == "recomputed":
                    _widen(need, index, a, b)
        return need

    def _region(self, target: int, low: int, high: int) -> torch.Tensor:
        """Rows [low, high) of map `target`, recomputing the maps it reads that are not stored."""
        need = self._closure(target, low, high)
        local: dict[int, tuple[int, torch.Tensor]] = {}

        def read(index: int, first: int, last: int) -> torch.Tensor:
            if index in local:
                start, tensor = local[index]
                return take_rows(tensor, first - start, last - start)
            return self.stored[index].rows(first, last)

        for index in sorted(need):
            first, last = need[index]
            local[index] = (first, run_step(self.tape.steps[index], self.tape, first, last, read, self.statistics,
                                            self.seed, samples=self.samples))
        return local[target][1]

    def _statistics_for(self, target: int) -> None:
        """Whole-volume statistics of every normalisation `target`'s region recomputes, in order."""
        for index in sorted(self._closure(target, *self.own[target])):
            if needs_statistics(self.tape.steps[index]) and index not in self.statistics:
                self._statistics(self.tape.steps[index])

    def _statistics(self, step: Step) -> None:
        source = step.inputs[0]
        if self.mode[source] == "recomputed":
            self._statistics_for(source)
            partials = [_checkpointed(self._region_moments, step, source, low, high)
                        for low, high in self._slabs(source, self.own)]
        else:
            partials = [moments(step, piece) for piece in self.stored[source].pieces]  # never joined whole
        mean, var, count = combine(partials)
        if self.space is not None:  # every process's moments
            mean, var, count = gathered_combine(self.space, self.order)([(count, mean, var * count)])
        self.statistics[step.index] = norm_affine(step, mean, var)
        if step.function is F.batch_norm:
            _update_running(step, mean, var, int(count.reshape(-1)[0].item()))

    def _region_moments(self, step: Step, source: int, low: int, high: int):
        return moments(step, self._region(source, low, high))


def _widen(ranges: dict, key, first: int, last: int) -> None:
    """`ranges[key]` widened to cover rows [first, last) (set to them where absent)."""
    old = ranges.get(key, (first, last))
    ranges[key] = (min(first, old[0]), max(last, old[1]))


class _Shard(Rows):
    """A stored map's rows held by this process, with `above` (the previous process's last rows) and `below`
    (the next one's first rows): read across its edges."""

    def __init__(self, pieces, bounds, above: torch.Tensor, below: torch.Tensor) -> None:
        super().__init__(pieces, bounds)
        self.above, self.below = above, below

    def rows(self, low: int, high: int) -> torch.Tensor:
        lo, hi = self.bounds[0], self.bounds[-1]
        if lo - low > self.above.shape[2] or high - hi > self.below.shape[2]:
            raise RuntimeError(f"rows {low}..{high} read past the halo of rows {lo}..{hi}")
        parts = [take_rows(self.above, self.above.shape[2] - (lo - low), self.above.shape[2])] if low < lo else []
        if max(low, lo) < min(high, hi):
            parts.append(super().rows(max(low, lo), min(high, hi)))
        if high > hi:
            parts.append(take_rows(self.below, 0, high - hi))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _count_batch(step: Step) -> int | None:
    """nn.BatchNorm's forward counts its batches before normalising; the tape calls F.batch_norm alone."""
    running = step.kwargs.get("running_mean")
    tracked = getattr(running.module, "num_batches_tracked", None) if isinstance(running, Held) else None
    if tracked is None:
        return None
    with torch.no_grad():
        tracked.add_(1)
    return int(tracked)


def _update_running(step: Step, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """nn.BatchNorm's running-statistics update, as its forward would have made it."""
    a = step.kwargs
    if not isinstance(a.get("running_mean"), Held):
        return
    tracked = _count_batch(step)
    momentum = a["momentum"]
    if tracked is not None and getattr(a["running_mean"].module, "momentum", 0.0) is None:
        momentum = 1.0 / tracked  # a cumulative average
    with torch.no_grad():
        running_mean, running_var = a["running_mean"].get(), a["running_var"].get()
        running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * count / max(count - 1, 1)).detach().to(running_var.dtype),
                                            alpha=momentum)


def _checkpointed(function, *args):
    # Non-reentrant: what the region reads from stored maps and statistics gets its gradient too.
    if not torch.is_grad_enabled():
        return function(*args)
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def _piece(tensor: torch.Tensor) -> torch.Tensor:
    # A copy, not a view: a view would keep the region's halo rows alive with the stored piece.
    return tensor if tensor._base is None else tensor.clone(memory_format=torch.preserve_format)


# ---- on a module --------------------------------------------------------------------------------------

def slab_network(model: nn.Module, counts: Sequence[int], recompute_inputs: int = 0) -> nn.Module:
    """Run `model`'s forward in slabs from now on (in place; idempotent; the counts can be changed by calling
    again): recorded at the first input of each shape and mode (training or not), replayed in
    ``counts[level]`` slabs per resolution level (:class:`SlabForward`). Raises :class:`Unsliceable` at that
    first call for a network slabs cannot split. With :func:`shard_network`'s space set, the forward takes
    and returns this process's rows."""
    if not hasattr(model, "_fullres_slab_forward"):
        original = model.forward
        tapes: dict[tuple, Tape] = {}

        def forward(x: torch.Tensor, *args, **kwargs):
            if args or kwargs:
                raise Unsliceable("slabs run networks called with one input map")
            space = model._fullres_space
            counts, recompute_inputs = model._fullres_slab_counts
            if space is None and all(count == 1 for count in counts):
                return original(x)
            shape = (x.shape[0], x.shape[1], space.height, *x.shape[3:]) if space is not None else tuple(x.shape)
            key = (shape, x.dtype, model.training)
            if key not in tapes:
                tapes[key] = record(model, shape, x.dtype, original)
            return SlabForward(tapes[key], counts, recompute_inputs, space)(x)

        model._fullres_slab_forward = original
        model._fullres_space = None
        model.forward = forward
    model._fullres_slab_counts = (tuple(counts), recompute_inputs)
    return model


def shard_network(model: nn.Module, space: Space | None) -> nn.Module:
    """Run `model`'s forward on this process's rows of the volume under `space`
    (:class:`fullres.engine.spatial.Space`; None: the whole volume again), in place, in the slabs
    :func:`slab_network` set (none: each process's rows whole). The forward then takes the process's rows of
    the input (:func:`fullres.engine.spatial.local_rows`) and returns its rows of the output."""
    if not hasattr(model, "_fullres_slab_forward"):
        slab_network(model, (1,))
    model._fullres_space = space
    return model
