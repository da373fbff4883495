"""Where a training step's time goes (``fullres bench --breakdown``): one step of a job, after a warm-up
step, profiled with ``torch.profiler`` and split into parts whose times add up to the profiled step.

* Convolutions: forward (and, under checkpointing or slabs, the forward recomputed in backward),
  backward-data and backward-weights (bias included), each with its FLOPs (torch's FLOP counter
  formulas applied to the exact calls of the step) and its achieved TFLOP/s against the matmul peak of
  the step's precision measured in the same run (:func:`fullres.cost.steptime.matmul_peak_tflops`).
* Everything else (ReLU, pooling, dropout, concatenation, additions, padding, copies and casts,
  normalisation, the loss, the optimizer, the autograd engine's own work, Python between operators) as
  time and share of the step.

How the parts are found: the profiler's operator tree under the step is walked from the top; an
operator of a known kind (:data:`CLAIMS`) takes its whole time (children included), any other
operator gives only its own (self) time to the part it belongs to, and its children are walked. An
autograd backward node belongs to the part of the forward operator that created it (matched by the
autograd sequence number), so e.g. the loss's backward is counted as the loss. Every microsecond of the
step is therefore in exactly one part.

Backward-data against backward-weights: on CPU each convolution's backward is one
``aten::convolution_backward`` call computing both. For each distinct call of the step (shapes,
strides, dtype, output mask), ``torch.ops.aten.convolution_backward`` is timed alone with output mask
(True, False, False) and (False, True, bias), alternated, and the profiled time of every such call is
split in the ratio of the two (see :func:`split_ratios`).
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from fullres.cost.flops import as_device, random_batch, synchronize
from fullres.cost.steptime import Variant, machine_info, matmul_peak_tflops, variant_context
from fullres.job.config import JobConfig
from fullres.errors import UserError
from fullres.engine.losses import LOSSES
from fullres.kernels.malloc import set_training_malloc_policy
from fullres.job.step import build_training, to_device, train_step

aten = torch.ops.aten

STEP_RANGE = "fullres::step"
LOSS_RANGE = "fullres::loss"
ENGINE_PREFIX = "autograd::engine::evaluate_function: "

CONV_FORWARD = "conv forward"
CONV_RECOMPUTE = "conv forward, recomputed in backward"
CONV_DATA = "conv backward-data"
CONV_WEIGHTS = "conv backward-weights (+bias)"
CONV_PARTS = (CONV_FORWARD, CONV_RECOMPUTE, CONV_DATA, CONV_WEIGHTS)
FORWARD_CONV_OPS = ("aten::conv3d", "aten::conv_transpose3d", "aten::convolution", "aten::_convolution")
BACKWARD_CONV_OP = "aten::convolution_backward"
PYTHON = "Python and the rest (between operators)"
ENGINE = "autograd engine (node bookkeeping, gradient accumulation)"

# Operators that take their whole time (children included) for a part.
CLAIMS = {
    **{name: "ReLU" for name in ("aten::relu", "aten::relu_", "aten::threshold_backward")},
    **{name: "max pooling" for name in ("aten::max_pool3d", "aten::max_pool3d_with_indices",
                                         "aten::max_pool3d_with_indices_backward")},
    **{name: "dropout" for name in ("aten::dropout", "aten::native_dropout", "aten::native_dropout_backward",
                                     "aten::feature_dropout", "aten::bernoulli_")},
    "aten::cat": "concatenation",
    **{name: "additions (decoder sums, gradients of branches)" for name in ("aten::add", "aten::add_")},
    **{name: "zero-padding (conv1a widened to 8 channels)" for name in ("aten::pad", "aten::constant_pad_nd")},
    **{name: "copies, casts and layout changes" for name in ("aten::copy_", "aten::clone", "aten::contiguous",
                                                             "aten::_to_copy", "aten::to")},
    **{name: "allocation and zero-fill" for name in ("aten::empty", "aten::empty_like", "aten::empty_strided",
                                                     "aten::zeros", "aten::zeros_like", "aten::zero_",
                                                     "aten::fill_")},
    **{name: "normalisation" for name in ("aten::instance_norm", "aten::group_norm", "aten::batch_norm",
                                          "aten::layer_norm", "aten::native_group_norm_backward",
                                          "aten::native_batch_norm_backward", "aten::native_layer_norm_backward")},
    **{name: "slicing (decoder weight halves, slab rows)" for name in ("aten::slice", "_TakeRows")},
    LOSS_RANGE: "loss (soft Dice, forward and backward)",
}
# Parts of generic operators: inside a backward node of a known part they are that part's work.
GENERIC_PARTS = {CLAIMS[name] for name in ("aten::add", "aten::copy_", "aten::empty")}
PREFIX_CLAIMS = {"Optimizer.step#": "optimizer step (Adam)", "Optimizer.zero_grad#": "zero_grad"}
ENGINE_NODES = {"torch::autograd::AccumulateGrad": ENGINE}


def _shape(value) -> tuple | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


@dataclass
class ConvCall:
    """One distinct convolution call of the step (forward or backward), as dispatched, with what is
    needed to count its FLOPs and to replay it alone."""

    kind: str  # "forward" | "backward"
    key: tuple
    transposed: bool
    flops: int  # one call, torch's FLOP counter formula
    flops_data: int = 0  # backward: of grad_input
    flops_weights: int = 0  # backward: of grad_weight
    output_mask: tuple[bool, bool, bool] = (False, False, False)
    replay: dict = field(default_factory=dict)  # tensors' (shape, stride, dtype) and the other arguments


def _tensor_spec(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype


class ConvRecorder(TorchDispatchMode):
    """Records every distinct ``aten.convolution`` and ``aten.convolution_backward`` call dispatched while
    active, keyed by its tensors' shapes as the profiler reports them, with FLOPs from torch's FLOP
    counter formulas (``torch.utils.flop_counter.flop_registry``)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple, ConvCall] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is aten.convolution:
            key = ("forward", _shape(args[0]), _shape(args[1]))
            if key not in self.calls:
                self.calls[key] = ConvCall("forward", key, bool(args[6]),
                                           flop_registry[aten.convolution](*args, **kwargs, out_val=out))
        elif packet is aten.convolution_backward:
            key = ("backward", _shape(args[0]), _shape(args[1]), _shape(args[2]))
            if key not in self.calls:
                mask = tuple(bool(m) for m in args[10])
                count = flop_registry[aten.convolution_backward]

                def flops(with_mask):
                    return count(*args[:10], list(with_mask), out_val=out)

                self.calls[key] = ConvCall(
                    "backward", key, bool(args[7]), flops(mask),
                    flops_data=flops((mask[0], False, False)), flops_weights=flops((False, mask[1], False)),
                    output_mask=mask,
                    replay={"grad_output": _tensor_spec(args[0]), "input": _tensor_spec(args[1]),
                            "weight": _tensor_spec(args[2]), "rest": tuple(args[3:10])})
        return out


def _tensor(spec: tuple, generator: torch.Generator) -> torch.Tensor:
    shape, stride, dtype = spec
    storage = sum((s - 1) * st for s, st in zip(shape, stride)) + 1 if all(shape) else 0
    flat = torch.randn(storage, generator=generator).to(dtype)
    return flat.as_strided(shape, stride)


def split_ratios(calls: list[ConvCall], repeats: int = 1) -> dict[tuple, dict]:
    """For each backward call computing both gradients: ``torch.ops.aten.convolution_backward`` timed
    alone on random tensors of the call's shapes, strides and dtype with output mask (True, False,
    False) (grad_input) and (False, True, bias) (grad_weight and grad_bias): one untimed call of each,
    then `repeats` alternated timed pairs; the medians and ``data_share`` = data / (data + weights)."""
    generator = torch.Generator().manual_seed(0)
    ratios = {}
    for call in calls:
        if call.kind != "backward" or not (call.output_mask[0] and call.output_mask[1]):
            continue
        spec = call.replay
        grad_output, inputs, weight = (_tensor(spec[name], generator) for name in ("grad_output", "input", "weight"))
        masks = {"data": [True, False, False], "weights": [False, True, call.output_mask[2]]}

        def run(mask) -> float:
            start = time.perf_counter()
            aten.convolution_backward(grad_output, inputs, weight, *spec["rest"], mask)
            return time.perf_counter() - start

        for mask in masks.values():
            run(mask)  # oneDNN primitive creation, first touch of the outputs
        seconds = {name: [] for name in masks}
        for _ in range(repeats):
            for name, mask in masks.items():
                seconds[name].append(run(mask))
        data, weights = (statistics.median(seconds[name]) for name in masks)
        ratios[call.key] = {"data_s": data, "weights_s": weights, "data_share": data / (data + weights)}
        del grad_output, inputs, weight
    return ratios


@dataclass
class _Walk:
    """Accumulates the parts while the profiler's operator tree is walked."""

    calls: dict[tuple, ConvCall]
    parts: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # microseconds
    flops: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    counts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    backward_events: list[tuple[tuple, float]] = field(default_factory=list)
    forward_parts: dict[int, str] = field(default_factory=dict)  # autograd sequence number -> part
    layers: dict[tuple, dict] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)

    def claim_forward_sequence(self, event, part: str) -> None:
        stack = [event]
        while stack:
            node = stack.pop()
            if node.sequence_nr >= 0 and not node.name.startswith(ENGINE_PREFIX):
                self.forward_parts.setdefault(node.sequence_nr, part)
            stack.extend(node.cpu_children)

    def layer(self, key: tuple) -> dict:
        return self.layers.setdefault(key, {"calls": 0, "time_us": 0.0})

    def conv_forward(self, event, in_backward: bool) -> None:
        convolution = event
        while convolution.name != "aten::convolution" and convolution.cpu_children:
            inner = [c for c in convolution.cpu_children if c.name in FORWARD_CONV_OPS]
            if not inner:
                break
            convolution = inner[0]
        shapes = convolution.input_shapes
        key = ("forward", tuple(shapes[0]), tuple(shapes[1])) if len(shapes) >= 2 else None
        call = self.calls.get(key)
        part = CONV_RECOMPUTE if in_backward else CONV_FORWARD
        self.parts[part] += event.cpu_time_total
        if not _ran(convolution):
            return  # checkpointing's recomputation stopped early, before the kernel: no FLOPs
        self.counts[part] += 1
        if call is None:
            self.unmatched.append(f"{event.name} {shapes}")
        else:
            self.flops[part] += call.flops
            layer = self.layer(key)
            layer["calls"] += 1
            layer["time_us"] += event.cpu_time_total
        if not in_backward:
            self.claim_forward_sequence(event, ENGINE)  # its backward node's own time: bookkeeping

    def conv_backward(self, event) -> None:
        shapes = event.input_shapes
        key = ("backward", *(tuple(s) for s in shapes[:3])) if len(shapes) >= 3 else None
        self.backward_events.append((key, event.cpu_time_total))

    def walk(self, event, context: str, in_backward: bool) -> None:
        name = event.name
        if name.startswith(ENGINE_PREFIX):
            in_backward = True
            node = name[len(ENGINE_PREFIX):]
            # the node's own call belongs to its forward operator's part; the rest (summing the gradients
            # of a tensor used twice, freeing) is the engine's
            own = ENGINE_NODES.get(node) or self.forward_parts.get(event.sequence_nr, f"other: {node}")
            self.parts[ENGINE] += event.self_cpu_time_total
            for child in event.cpu_children:
                self.walk(child, own if child.name == node else ENGINE, True)
            return
        if name in FORWARD_CONV_OPS:
            return self.conv_forward(event, in_backward)
        if name == BACKWARD_CONV_OP:
            return self.conv_backward(event)
        part = CLAIMS.get(name) or next((p for prefix, p in PREFIX_CLAIMS.items() if name.startswith(prefix)), None)
        if part in GENERIC_PARTS and context not in (None, ENGINE):
            part = None
        if part is not None:
            self.parts[part] += event.cpu_time_total
            self.counts[part] += 1
            if not in_backward:
                self.claim_forward_sequence(event, part)
            return
        own = context if context is not None else f"other: {name}"
        if not in_backward and event.sequence_nr >= 0:
            self.forward_parts.setdefault(event.sequence_nr, own)
        self.parts[own] += event.self_cpu_time_total
        for child in event.cpu_children:
            self.walk(child, context, in_backward)


def _ran(convolution) -> bool:
    """Whether a profiled ``aten::convolution`` reached its kernel. Non-reentrant checkpointing stops
    recomputing (by raising from the hook that saves tensors for backward) as soon as every tensor
    backward needs exists again, which can be inside a convolution, before its kernel runs."""
    if convolution.name != "aten::convolution":
        return True
    stack = list(convolution.cpu_children)  # under a dispatch mode (fullres.kernels.onednn) the kernel sits deeper
    while stack:
        node = stack.pop()
        if node.name == "aten::_convolution":
            return True
        stack.extend(node.cpu_children)
    return False


def _dice_in_range(output, target):
    with torch.profiler.record_function(LOSS_RANGE):
        return LOSSES["dice"](output, target)


def run_breakdown(job: JobConfig, device: str | torch.device = "cpu", split_repeats: int = 1,
                  peak_size: int = 2048, seed: int = 0) -> dict:
    """Profile one training step of `job` (as given: its precision, layout and strategy; fresh model,
    Adam, random inputs, after one warm-up step, under the allocator `train` gives it) and break it
    down (see the module docstring). Returns (JSON-ready) ``{"step_s" (the profiled step), "wall_s",
    "parts": [{"part", "time_s", "share", "calls", and for convolutions "flops", "tflops",
    "fraction_of_peak"}], "conv_flops", "conv_layers" (per distinct call), "backward_split",
    "matmul_peak_tflops", "precision", "channels_last", "job", "machine"}``; parts are ordered
    convolutions first, then by time."""
    device = as_device(device)
    if device.type != "cpu":
        raise UserError("bench --breakdown profiles CPU steps (--device cpu)")
    if split_repeats < 1:
        raise ValueError("split_repeats must be >= 1")
    strategy = job.strategy
    variant = Variant("breakdown", strategy.precision if strategy.precision in ("fp32", "bf16") else "fp32",
                      channels_last=strategy.channels_last)
    if strategy.precision != variant.precision:
        raise UserError(f"bench --breakdown runs fp32 or bf16 on CPU, not {strategy.precision}")
    with variant_context(variant, device):
        # before the step's allocator: under "fixed" every large block is mapped afresh, and the oneDNN
        # product's output would be faulted in on every call (0.33 against 0.40 TFLOP/s, AVX-512 bf16 AMD Zen 5)
        peak = matmul_peak_tflops(variant.precision, size=peak_size, device=device)
        allocator = set_training_malloc_policy(strategy, device=device.type) or "default"
        torch.manual_seed(seed)
        training = build_training(job, device)
        torch.manual_seed(seed + 1)
        images, targets = random_batch(job, device)
        images, targets = to_device(images, device, strategy), targets.to(device)
        torch.manual_seed(seed + 2)

        def step() -> None:
            train_step(training.model, training.optimizer, images, targets, _dice_in_range, strategy, training.scaler)

        recorder = ConvRecorder()
        with recorder:  # the warm-up step, which also records the step's convolution calls
            step()
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            start = time.perf_counter()
            with torch.profiler.record_function(STEP_RANGE):
                step()
            synchronize(device)
            wall = time.perf_counter() - start
        del training, images, targets
        ratios = split_ratios(list(recorder.calls.values()), split_repeats)
    events = profiler.events()
    step_event = next(e for e in events if e.name == STEP_RANGE)
    walk = _Walk(recorder.calls)
    walk.parts[PYTHON] += step_event.self_cpu_time_total
    for child in step_event.cpu_children:
        walk.walk(child, None, False)
    for key, microseconds in walk.backward_events:
        call = recorder.calls.get(key)
        if call is None:
            walk.unmatched.append(f"{BACKWARD_CONV_OP} {key}")
            walk.parts[CONV_WEIGHTS] += microseconds
            continue
        share = ratios[key]["data_share"] if key in ratios else float(call.output_mask[0])
        for part, seconds, flops in ((CONV_DATA, microseconds * share, call.flops_data),
                                     (CONV_WEIGHTS, microseconds * (1 - share), call.flops_weights)):
            if flops or seconds:
                walk.parts[part] += seconds
                walk.flops[part] += flops
                walk.counts[part] += 1
        layer = walk.layer(key)
        layer["calls"] += 1
        layer["time_us"] += microseconds
    total_us = step_event.cpu_time_total
    parts = []
    for name, microseconds in walk.parts.items():
        row = {"part": name, "time_s": microseconds / 1e6, "share": microseconds / total_us,
               "calls": walk.counts.get(name, 0)}
        if name in CONV_PARTS:
            flops = walk.flops.get(name, 0)
            tflops = flops / (microseconds / 1e6) / 1e12 if microseconds else None
            row.update(flops=flops, tflops=tflops, fraction_of_peak=tflops / peak if tflops and peak else None)
        parts.append(row)
    parts.sort(key=lambda r: (r["part"] not in CONV_PARTS,
                              CONV_PARTS.index(r["part"]) if r["part"] in CONV_PARTS else -r["time_s"]))
    layers = []
    for key, layer in walk.layers.items():
        call = recorder.calls[key]
        seconds = layer["time_us"] / 1e6
        row = {"kind": call.kind, "transposed": call.transposed, "shapes": [list(s) for s in key[1:]],
               "calls": layer["calls"], "time_s": seconds, "flops": call.flops * layer["calls"],
               "tflops": call.flops * layer["calls"] / seconds / 1e12 if seconds else None}
        if key in ratios:
            row.update({f"alone_{k}": v for k, v in ratios[key].items()})
        layers.append(row)
    layers.sort(key=lambda r: -r["time_s"])
    conv_flops = sum(walk.flops.get(p, 0) for p in CONV_PARTS)
    return {
        "step_s": total_us / 1e6,
        "wall_s": wall,
        "parts": parts,
        "conv_flops": conv_flops,
        "conv_s": sum(walk.parts.get(p, 0.0) for p in CONV_PARTS) / 1e6,
        "conv_layers": layers,
        "unmatched": walk.unmatched,
        "backward_split": {"method": "convolution_backward timed alone per distinct call, output mask "
                                     "(True, False, False) against (False, True, bias), alternated; "
                                     "each profiled call split in that ratio",
                           "repeats": split_repeats},
        "matmul_peak_tflops": peak,
        "precision": variant.precision,
        "channels_last": variant.channels_last,
        "allocator": allocator,
        "job": job.to_json(),
        "machine": machine_info(device),
    }


def format_breakdown(result: dict, min_share: float = 0.002) -> list[str]:
    """The breakdown as printed lines: a header, one row per part (those other than convolutions below
    `min_share` of the step summed in one row), and the sum of the parts."""
    job = result["job"]
    peak = result["matmul_peak_tflops"]
    shape = " x ".join(map(str, job["shape"]))
    lines = [f"One training step, profiled after a warm-up step: batch {job['batch']} x {shape}, {result['precision']}"
             f"{', channels-last' if result['channels_last'] else ''}; "
             f"{result['step_s']:.3f} s profiled ({result['wall_s']:.3f} s wall); matmul peak "
             f"{peak:.3f} TFLOP/s ({result['precision']}, this run)",
             f"{'part':<58}{'time s':>9}{'share':>8}{'GFLOP':>10}{'TFLOP/s':>9}{'of peak':>9}"]
    small = [r for r in result["parts"] if "flops" not in r and r["share"] < min_share]
    for row in result["parts"]:
        if row in small:
            continue
        text = f"{row['part'][:57]:<58}{row['time_s']:>9.3f}{row['share'] * 100:>7.1f}%"
        if "flops" in row:
            text += f"{row['flops'] / 1e9:>10.1f}"
            text += f"{row['tflops']:>9.3f}" if row["tflops"] else f"{'-':>9}"
            text += f"{row['fraction_of_peak'] * 100:>8.1f}%" if row["fraction_of_peak"] else f"{'-':>9}"
        lines.append(text)
    if small:
        seconds = sum(r["time_s"] for r in small)
        lines.append(f"{f'{len(small)} more parts, each under {min_share * 100:g} %':<58}{seconds:>9.3f}"
                     f"{seconds / result['step_s'] * 100:>7.1f}%")
    total = sum(r["time_s"] for r in result["parts"])
    lines.append(f"{'sum of the parts':<58}{total:>9.3f}{total / result['step_s'] * 100:>7.1f}%"
                 f"{result['conv_flops'] / 1e9:>10.1f}")
    lines.append("conv backward split into data and weights in the ratio of each distinct call timed alone "
                 "(docs/performance.md)")
    return lines



DEFAULT_SHAPE, DEFAULT_BATCH = (64, 64, 64), 1  # the breakdown's job unless the flags say otherwise
