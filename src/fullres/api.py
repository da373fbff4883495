"""fullres from Python: the memory of one training step of *your* network, in *your* training script.

Three calls, the same dry run as ``fullres estimate --method dryrun`` (a real forward, backward and
optimizer step on fake tensors; nothing is allocated):

* :func:`estimate` -- the peak of a training step of any ``nn.Module`` (an instance, a factory, or a name
  fullres knows), with your loss and your optimizer, under a memory strategy, on CPU or CUDA;
* :func:`plan` -- the largest batch (and, if asked, the largest input) that fits a memory budget;
* :func:`checkpointed` -- the activation checkpointing fullres applies, on your own model.

Example::

    import functools, torch, fullres
    from monai.networks.nets import SegResNet

    net = SegResNet(spatial_dims=3, in_channels=4, out_channels=3)
    result = fullres.estimate(net, (4, 128, 128, 128), batch=2,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.99))
    print(result.peak_bytes, result.peak_at, result.breakdown)
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from fullres.cost import runtime as runtime_term
from fullres.cost.dryrun import CUDA_RUNTIME_BYTES, dryrun
from fullres.cost.plan import largest_fitting
from fullres.engine.losses import LOSSES, primary_output
from fullres.errors import UserError, first_line
from fullres.job.config import JobConfig, Strategy
from fullres.job.step import prepare_model
from fullres.nets.registry import (
    MODELS,
    ModelConfig,
    ModelSpec,
    model_spec,
    rebuilt_elsewhere,
    register_model,
    spatial_divisor,
)
from fullres.units import parse_size

LossLike = str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerLike = str | type | Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class Estimate:
    """What one training step needs. `peak_bytes`: the step's peak on the device; `peak_at`: the operation
    at the peak; `breakdown`: bytes by kind at the peak (parameters, gradients, optimizer_state, inputs,
    activations, workspace, runtime, ...); `modelled`: the parts that are a model rather than a measurement
    of this machine (the CUDA allocator; a CPU runtime term this process could not measure)."""

    peak_bytes: int
    peak_at: str
    breakdown: dict
    job: JobConfig
    modelled: tuple[str, ...] = ()

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


@dataclass(frozen=True)
class Plan:
    """The largest job that fits `budget_bytes`: its `batch`, `input_shape` (C, H, W, D) and its estimate;
    `fits` False (and `estimate` that of the smallest job tried) when nothing does."""

    fits: bool
    batch: int
    input_shape: tuple[int, ...]
    estimate: Estimate
    budget_bytes: int


def estimate(model: nn.Module | Callable[..., nn.Module] | str, input_shape: tuple[int, ...], batch: int = 1, *,
             classes: int | None = None, loss: LossLike = "dice", optimizer: OptimizerLike = "adam",
             strategy: Strategy | dict | None = None, device: str = "cpu", model_args: dict | None = None) -> Estimate:
    """The peak memory of one training step (forward, loss, backward, optimizer step) at `batch` inputs of
    `input_shape` = (channels, H, W, D). On CPU the runtime term (memory no tensor owns) of an instance or a
    factory is measured in this process and cached (:func:`fullres.cost.runtime.in_process_runtime_bytes`); of a name, in a fresh one.

    `model`: an ``nn.Module`` instance (its parameters are copied as shapes only, on the meta device; the
    instance is not changed), a factory ``f(in_channels, out_channels, **model_args) -> nn.Module``, or a
    name fullres builds (``"unet3d"``, ``"monai:SegResNet"``, ``"nnunet:PlainConvUNet"``, a registered one).
    `model_args`: the factory's keyword arguments, or for a name its ``--model-args`` (``filters``, ``dropout``
    and ``norm`` set fullres's own networks).
    `classes`: output channels (default: read from the model's output on the meta device; 1 for a name).
    `loss`: a name of :data:`fullres.engine.losses.LOSSES` or any callable ``(logits, targets) -> scalar``, run on
    the fake tensors (targets: float (N, 1, H, W, D) for one class, int64 (N, 1, H, W, D) for more).
    `optimizer`: "adam", a ``torch.optim.Optimizer`` class (default arguments but ``lr=1e-3``), or a callable
    ``parameters -> optimizer``; its state is whatever its ``step`` allocates. `strategy`: a
    :class:`fullres.job.config.Strategy` (or its fields as a dict): checkpointing, accumulation, precision,
    channels-last. `device`: "cpu" or "cuda" (CUDA is modelled with fullres's caching-allocator model and a
    constant for the CUDA context; no GPU is needed, `modelled` says what is modelled).
    UserError in one line when the network cannot be followed or the arguments are wrong."""
    in_channels, shape = _split_shape(input_shape)
    strategy = _strategy(strategy)
    with _as_job(model, in_channels, shape, batch, classes, strategy, model_args) as (job, registered):
        return _estimate(job, registered, loss, _optimizer(optimizer), device)


def plan(model: nn.Module | Callable[..., nn.Module] | str, input_shape: tuple[int, ...], memory: int | str, *,
         max_batch: int = 256, shrink_shape: bool = False, classes: int | None = None, loss: LossLike = "dice",
         optimizer: OptimizerLike = "adam", strategy: Strategy | dict | None = None, device: str = "cpu",
         model_args: dict | None = None) -> Plan:
    """The largest batch (at most `max_batch`) whose training step fits `memory` (bytes, or text such as
    ``"24GiB"``) at `input_shape`; with `shrink_shape`, when not even batch 1 fits, the largest input whose
    longest side is cut in steps of the network's divisor until batch 1 fits. Arguments as :func:`estimate`."""
    budget = parse_size(memory) if isinstance(memory, str) else int(memory)
    in_channels, shape = _split_shape(input_shape)
    strategy = _strategy(strategy)
    optimizer = _optimizer(optimizer)
    with _as_job(model, in_channels, shape, 1, classes, strategy, model_args) as (job, registered):
        def at(batch: int, at_shape=shape) -> Estimate:
            return _estimate(replace(job, batch=batch, shape=at_shape), registered, loss, optimizer, device)

        first = at(1)
        if first.peak_bytes <= budget:
            best = largest_fitting(lambda b: b <= max_batch and at(b).peak_bytes <= budget)
            return Plan(True, best, (in_channels, *shape), at(best), budget)
        if not shrink_shape:
            return Plan(False, 0, (in_channels, *shape), first, budget)
        divisor = max(1, spatial_divisor(job.model))
        current = list(shape)
        while max(current) > divisor:
            axis = current.index(max(current))
            current[axis] -= divisor
            result = at(1, tuple(current))
            if result.peak_bytes <= budget:
                return Plan(True, 1, (in_channels, *current), result, budget)
        return Plan(False, 0, (in_channels, *shape), first, budget)


def checkpointed(model: nn.Module, strategy: Strategy | dict | None = None) -> nn.Module:
    """`model` (changed in place and returned) with the strategy's training-time wrappers fullres applies
    (:func:`fullres.job.step.prepare_model`): by default activation checkpointing of its blocks, each block's
    activations recomputed in backward instead of kept. Gradients are unchanged."""
    chosen = _strategy(strategy) if strategy is not None else Strategy(checkpointing=True)
    return prepare_model(model, chosen)


# ---- the parts ------------------------------------------------------------------------------------------

def _split_shape(input_shape) -> tuple[int, tuple[int, int, int]]:
    dims = tuple(int(size) for size in input_shape)
    if len(dims) != 4 or min(dims) < 1:
        raise UserError(f"input_shape must be (channels, H, W, D) of positive sizes, got {tuple(input_shape)}")
    return dims[0], dims[1:]


def _strategy(strategy) -> Strategy:
    if strategy is None:
        return Strategy()
    if isinstance(strategy, Strategy):
        return strategy
    try:
        return Strategy(**dict(strategy))
    except (TypeError, ValueError) as error:
        raise UserError(f"strategy: {error}") from None


def _optimizer(optimizer) -> str | Callable:
    if optimizer == "adam":
        return "adam"
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return lambda parameters: optimizer(parameters, lr=1e-3)
    if callable(optimizer):
        return optimizer
    raise UserError(f"optimizer: 'adam', a torch.optim.Optimizer class or a callable, got {optimizer!r}")


def _loss(loss):
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise UserError(f"loss must be one of {', '.join(LOSSES)} or a callable, got {loss!r}")
    return loss


def _estimate(job: JobConfig, registered: bool, loss, optimizer, device: str) -> Estimate:
    loss = _loss(loss)
    cpu = torch.device(device).type == "cpu"
    modelled: tuple[str, ...] = ()
    runtime = 0
    if cpu and not registered and not _in_process_only(job.model.architecture):
        runtime = runtime_term.measured_runtime_bytes(job)  # a network fullres rebuilds by name: measured in a fresh process
    elif cpu:  # the user's own object: measured in this process (it cannot be rebuilt in another), cached
        runtime = runtime_term.in_process_runtime_bytes(job, loss, optimizer)
        if runtime is None:  # the dry run's modelled constant
            modelled = ("runtime (this process's peak could not be read: a modelled constant)",)
    else:  # the CUDA context: a modelled constant, as `fullres estimate` charges it
        runtime = CUDA_RUNTIME_BYTES
    try:
        # this process's allocator: glibc's, unless a fullres command set its own policy
        result = dryrun(job, loss=loss, optimizer=optimizer, device=device, runtime=runtime,
                        allocator="default" if cpu else None)
    except ValueError as error:
        raise UserError(str(error)) from None
    return Estimate(result.peak_bytes, result.peak_at, dict(result.breakdown), job, modelled or result.modelled)


def _in_process_only(name: str) -> bool:
    """A name registered in this process (a user's register_model): a fresh process would not know it."""
    return not rebuilt_elsewhere(name)



class _as_job:
    """The job for `model` at the shape: a name as it is; an instance or a factory registered in this
    process under a private name for the duration (its skeleton on the meta device)."""

    def __init__(self, model, in_channels: int, shape, batch: int, classes, strategy: Strategy, model_args) -> None:
        self.args = (model, in_channels, shape, batch, classes, strategy, model_args or {})
        self.name = None

    def __enter__(self) -> tuple[JobConfig, bool]:
        model, in_channels, shape, batch, classes, strategy, model_args = self.args
        if isinstance(model, str):
            try:
                model_spec(model)
                own = {key: model_args[key] for key in ("filters", "dropout", "norm") if key in model_args}
                rest = {key: value for key, value in model_args.items() if key not in own}
                config = ModelConfig(in_channels=in_channels, classes=classes or 1, architecture=model,
                                     args=_json(rest), **own)
                return JobConfig(model=config, shape=shape, batch=batch, strategy=strategy), False
            except ValueError as error:
                raise UserError(str(error)) from None
        skeleton = _skeleton(model, in_channels, classes, model_args)
        classes = classes or _output_channels(skeleton, in_channels, shape)
        self.name = f"python:{type(skeleton).__name__}@{id(skeleton):x}"
        register_model(ModelSpec(self.name, lambda config, at_shape: _materialised(skeleton),
                                 f"{type(skeleton).__name__} from a Python script"))
        try:
            config = ModelConfig(in_channels=in_channels, classes=classes, architecture=self.name)
            return JobConfig(model=config, shape=shape, batch=batch, strategy=strategy), True
        except ValueError as error:
            self.__exit__()
            raise UserError(str(error)) from None

    def __exit__(self, *exc) -> None:
        if self.name is not None:
            MODELS.pop(self.name, None)
            runtime_term.tensor_bytes.cache_clear()  # keyed by the job: a later instance may reuse the name


def _json(args: dict) -> str:
    import json

    return json.dumps(args, sort_keys=True) if args else ""


def _skeleton(model, in_channels: int, classes, model_args: dict) -> nn.Module:
    """The network as shapes only: an instance's parameters and buffers replaced by meta tensors (nothing
    copied), a factory built on the meta device."""
    if isinstance(model, nn.Module):
        tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers())
        memo = {}
        for _, tensor in tensors:
            if id(tensor) in memo:
                continue
            meta = torch.empty_like(tensor, device="meta")
            memo[id(tensor)] = nn.Parameter(meta, requires_grad=tensor.requires_grad) \
                if isinstance(tensor, nn.Parameter) else meta
        return copy.deepcopy(model, memo)
    if callable(model):
        if classes is None:
            raise UserError("classes: give the output channels when `model` is a factory")
        with torch.device("meta"):
            built = model(in_channels, classes, **model_args)
        if not isinstance(built, nn.Module):
            raise UserError(f"the factory returned {type(built).__name__}, not an nn.Module")
        return built
    raise UserError(f"model: an nn.Module, a factory or a network name, got {type(model).__name__}")


def _materialised(skeleton: nn.Module) -> nn.Module:
    """A copy of the skeleton whose parameters and buffers are new empty tensors on the current device
    (fake ones inside the dry run, where only factory functions may make tensors); tied tensors stay tied."""
    from torch.utils._python_dispatch import _disable_current_modes

    device = torch.empty(0).device
    with _disable_current_modes():  # outside the fake mode and the dry run's tracker: meta tensors, not counted
        clone = copy.deepcopy(skeleton)
    made: dict[int, torch.Tensor] = {}

    def empty(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in made:
            fresh = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
            made[id(tensor)] = nn.Parameter(fresh, requires_grad=tensor.requires_grad) \
                if isinstance(tensor, nn.Parameter) else fresh
        return made[id(tensor)]

    for module in clone.modules():
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for name, tensor in list(tensors.items()):
                if tensor is not None:
                    tensors[name] = empty(tensor)
    return clone


def _output_channels(skeleton: nn.Module, in_channels: int, shape) -> int:
    try:
        with torch.no_grad():
            output = skeleton(torch.empty(2, in_channels, *shape, device="meta"))
    except Exception as error:  # noqa: BLE001 - any failure is the network refusing this input
        raise UserError(f"the network does not take (2, {in_channels}, {', '.join(map(str, shape))}): "
                        f"{first_line(error) or type(error).__name__}") from None
    output = primary_output(output) if isinstance(output, (list, tuple)) else output
    return int(output.shape[1])
