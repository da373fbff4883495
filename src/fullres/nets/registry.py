"""The networks fullres trains, in a registry; the first is the paper's 3D U-Net (whitepaper Table 1).

Extension point: :data:`MODELS` maps an architecture name to a :class:`ModelSpec`, and
:func:`build_model` is the one place a network is constructed (train, predict, the dry run, Table 1,
bench and profile all call it). :func:`register_model` adds a network; docs/extending.md has an example.
The first is the paper's 3D U-Net (:mod:`fullres.nets.unet3d`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from fullres.engine.losses import primary_output
from fullres.engine.spatial import simulated
from fullres.engine.tape import ATTENTION_NETWORKS, SlabForward, Unsliceable, record
from fullres.errors import first_line
from fullres.nets import families
from fullres.presets import PAPER
from fullres.terms import NORMS, OWN_DIVISORS, check_sizes

DOWNSAMPLING = OWN_DIVISORS["unet3d"][0]  # three 2x poolings: every spatial size must be a multiple of 8


@dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the network's shape and weights count. `architecture` names a network of
    :data:`MODELS` or of a family (``monai:CLASS``, ``nnunet:...``, a user's ``FILE.py:FUNCTION``);
    `args` is its keyword arguments as canonical JSON (``--model-args``); `source_sha256` the content hash
    of a user's factory file, checked whenever the network is built again. `filters`, `dropout` and
    `norm` shape fullres's own networks (unet3d, intel-unet); other networks take `args`. `factory_dir`:
    the folder a ``FILE.py`` factory is loaded from instead of its own path, set only by the process that
    opens a run (:func:`fullres.run.checkpoint.trusted_model`), never saved or read from a file."""

    in_channels: int = 4
    filters: int = PAPER.filters
    classes: int = 1  # 1: sigmoid mask (the paper's whole tumour); N > 1: softmax over N classes
    dropout: float = PAPER.dropout
    norm: str = PAPER.norm
    architecture: str = "unet3d"
    args: str = ""
    source_sha256: str = ""
    factory_dir: str = field(default="", compare=False, repr=False, metadata={"internal": True})

    def __post_init__(self) -> None:
        spec = model_spec(self.architecture)  # raises ValueError naming an unknown network
        if self.args:
            try:
                parsed = json.loads(self.args)
            except ValueError as error:
                raise ValueError(f"--model-args is not JSON: {error}") from None
            if not isinstance(parsed, dict):
                raise ValueError(f"--model-args must be a JSON object of keyword arguments, got {self.args}")
            object.__setattr__(self, "args", json.dumps(parsed, sort_keys=True))
        if spec.check is not None:
            spec.check(self)
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if self.filters < 1:
            raise ValueError(f"filters must be >= 1, got {self.filters}")
        if self.classes < 1:
            raise ValueError(f"classes must be >= 1, got {self.classes}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.norm == "group" and self.filters % 8:
            raise ValueError(f"group norm uses 8 groups: filters must be a multiple of 8, got {self.filters}")

    def to_json(self) -> dict:
        """The saved fields (not `factory_dir`, which only the process that opened the run may set)."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "factory_dir"}

    @property
    def kwargs(self) -> dict:
        """`args` as keyword arguments."""
        return json.loads(self.args) if self.args else {}


@dataclass(frozen=True)
class ModelSpec:
    """A network fullres can build.

    `build(config, shape)` returns an nn.Module mapping (N, in_channels, H, W, D) to logits
    (N, classes, H, W, D); `shape` is the job's (H, W, D), for networks that fix their input size (MONAI's
    UNETR), or None. `divisor(config)`: every spatial size must be a multiple of it (`why` says why, in
    errors). `check(config)` refuses settings the network cannot take. `slabs`: the module honours the
    `slabs`, `checkpointing` and `checkpoint_levels` attributes the trainer sets (its own exact slab and
    segment schedule, by resolution level); `probe`: the network declares no divisor (a user's factory), so
    :func:`spatial_divisor` finds it by building the network (:func:`probed_divisor`);
    other networks are checkpointed block by block (:func:`fullres.job.step.prepare_model`). `preset`: the name
    of its defaults in :data:`fullres.presets.PRESETS`, if it has its own."""

    name: str
    build: Callable[[ModelConfig, tuple[int, int, int] | None], nn.Module]
    description: str
    slabs: bool = False
    divisor: Callable[[ModelConfig], int] = lambda config: 1
    why: str = "the network's downsampling"
    check: Callable[[ModelConfig], None] | None = None
    preset: str | None = None
    probe: bool = False  # no divisor of its own: :func:`spatial_divisor` probes the built network


MODELS: dict[str, "ModelSpec"] = {}  # architecture name -> ModelSpec; filled by register_model below
FAMILIES = ("monai:CLASS", "nnunet:PlainConvUNet", "nnunet:ResidualEncoderUNet", "FILE.py:FUNCTION",
            "package.module:FUNCTION")


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


BUILT_IN: set[str] = set()  # the names fullres.nets registers on import (every fresh process knows them)
_FAMILY_SPECS: dict[str, ModelSpec] = {}  # monai:/nnunet:/factory specs, made on first use


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to :data:`MODELS` under its name (a name may be registered once)."""
    if spec.name in MODELS:
        raise ValueError(f"a network named {spec.name!r} is already registered")
    MODELS[spec.name] = spec
    return spec


def rebuilt_elsewhere(name: str) -> bool:
    """Whether a fresh process that imports fullres builds the network `name` as this one does: fullres's
    own networks and the families (``monai:``, ``nnunet:``, factories), not a name registered later in this
    process (a user's :func:`register_model`, which that process never ran)."""
    return name not in MODELS or name in BUILT_IN


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered network or of a family member (``monai:CLASS``, ``nnunet:NAME``, a user's
    ``FILE.py:FUNCTION`` / ``package.module:FUNCTION``). ValueError naming the network and the reason."""
    if name in MODELS:
        return MODELS[name]
    if name in _FAMILY_SPECS:
        return _FAMILY_SPECS[name]
    family, _, member = name.partition(":")
    if family == "monai" and member:
        families.monai_class(member)
        spec = ModelSpec(name, lambda config, shape: families.build_monai(member, config.in_channels, config.classes,
                                                                           shape, config.kwargs),
                         f"MONAI's {member}", divisor=lambda config: families.monai_divisor(member, config.kwargs),
                         why=f"{member}'s downsampling")
    elif family == "nnunet" and member:
        if member not in families.NNUNET_DEFAULTS:
            raise ValueError(f"unknown network {name!r}: choose nnunet:PlainConvUNet or nnunet:ResidualEncoderUNet")
        spec = ModelSpec(name, lambda config, shape: families.build_nnunet(member, config.in_channels, config.classes,
                                                                            config.kwargs),
                         f"nnU-Net v2's {member}", divisor=lambda config: families.nnunet_divisor(member, config.kwargs),
                         why=f"{member}'s strides")
    elif families.is_factory_name(name):
        spec = ModelSpec(name, lambda config, shape: families.build_factory(name, config.in_channels, config.classes,
                                                                             config.kwargs, config.source_sha256,
                                                                             config.factory_dir),
                         f"the factory {name}", why="its downsampling, probed", probe=True)
    else:
        raise ValueError(f"unknown network {name!r}: choose one of {', '.join(sorted(MODELS))}, or "
                         f"{', '.join(FAMILIES)}")
    _FAMILY_SPECS[name] = spec
    return spec


def build_model(config: ModelConfig, shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The network `config` describes, for inputs of spatial `shape` where the network needs to know it, on
    the current default device, in training mode. ValueError naming the network when it cannot be built."""
    try:
        return model_spec(config.architecture).build(config, tuple(shape) if shape is not None else None)
    except Exception as error:  # noqa: BLE001 - a library's constructor refusing its arguments, in any type
        raise ValueError(f"network {config.architecture}: {_first_line(error)}") from None


def build_on_meta(config: ModelConfig, shape: tuple[int, int, int] | None = None) -> nn.Module:
    """The network on the meta device (shapes only, nothing allocated). A network whose constructor reads
    tensor values (SwinUNETR's drop-path rates) is built on the CPU and moved."""
    try:
        with torch.device("meta"):
            return build_model(config, shape)
    except ValueError as error:
        if "meta" not in str(error):
            raise
    return build_model(config, shape).to("meta")


PROBED_DIVISORS = (1, 2, 4, 8, 16, 32, 64)  # the divisors a probe can find


def _takes(model: nn.Module, config: ModelConfig, side: int) -> bool:
    """Whether `model` (on the meta device) maps a cube of `side` to logits of the same spatial size."""
    try:
        with torch.no_grad():
            output = model(torch.empty(2, config.in_channels, side, side, side, device="meta"))
    except Exception:  # noqa: BLE001 - any failure is the network refusing this size
        return False
    if isinstance(output, (list, tuple)) or (isinstance(output, torch.Tensor) and output.dim() == 6):
        output = primary_output(output)
    return isinstance(output, torch.Tensor) and tuple(output.shape[2:]) == (side,) * 3


@functools.lru_cache(maxsize=64)
def probed_divisor(config: ModelConfig) -> int:
    """The spatial divisor of a network that does not declare one (a user's factory), found on the meta
    device: the smallest d of :data:`PROBED_DIVISORS` whose cubes of 2d and 3d the network maps to logits of
    their own size, provided a cube of 2d + d/2 fails (a network that takes that too has no power-of-two
    divisor: 1). 1 where the network cannot be built or takes none of them (:func:`check_shape` then says
    why). Cached per config: a dozen meta forwards at most."""
    try:
        model = build_on_meta(config)
    except ValueError:
        return 1
    for divisor in PROBED_DIVISORS:
        if _takes(model, config, 2 * divisor) and _takes(model, config, 3 * divisor):
            # a divisor d > 1 shows as a failure between its multiples
            return divisor if divisor == 1 or not _takes(model, config, 2 * divisor + divisor // 2) else 1
    return 1


def declared_divisor(config: ModelConfig) -> int:
    """The divisor `config`'s network declares (1 for one that declares none); nothing is built or run."""
    return int(model_spec(config.architecture).divisor(config))


def spatial_divisor(config: ModelConfig) -> int:
    """Every spatial size of `config`'s network must be a multiple of this: its declared divisor, or for a
    network that declares none (a factory) the probed one, which builds and runs it on the meta device: only
    for a network the user chose on their command line or a run whose code they trust."""
    spec = model_spec(config.architecture)
    return probed_divisor(config) if spec.probe else declared_divisor(config)


def slab_refusal(architecture: str) -> str | None:
    """Why `architecture` cannot run in slabs, in a phrase naming it; None where it can (its own schedule,
    or any other network through :mod:`fullres.engine.tape`, which refuses an operation it cannot split
    when it first records the network)."""
    family, _, member = architecture.partition(":")
    if family == "monai" and member in ATTENTION_NETWORKS:
        return f"{architecture} cannot run in slabs: {ATTENTION_NETWORKS[member]}, so no slab is the whole-volume result"
    return None


@functools.lru_cache(maxsize=64)
def tape_refusal(config: ModelConfig, shape: tuple[int, int, int]) -> str | None:
    """Why `config`'s network cannot run in slabs at `shape`: the first operation its recorded forward reads
    a map with that slabs cannot split (:func:`fullres.engine.tape.record`, on the meta device); None where it
    can, or where it has its own schedule."""
    if model_spec(config.architecture).slabs:
        return None
    refusal = slab_refusal(config.architecture)
    if refusal:
        return refusal
    model = build_on_meta(config, shape)
    try:
        record(model, (1, config.in_channels, *shape))
    except Unsliceable as error:
        return str(error)
    return None


@functools.lru_cache(maxsize=64)
def spatial_refusal(config: ModelConfig, shape: tuple[int, int, int], processes: int, counts: tuple[int, ...] = (1,),
                    recompute_inputs: int = 0) -> str | None:
    """Why `processes` processes cannot share a volume of `shape` through `config`'s recorded tape in slab
    `counts` (:class:`fullres.engine.tape.SlabForward` with a space): an operation that cannot be split, H that
    does not split, or a map too short for its halos; None where they can. Records the network on the meta
    device (a factory's code runs)."""
    refusal = slab_refusal(config.architecture)
    if refusal:
        return refusal
    try:
        tape = record(build_on_meta(config, shape), (1, config.in_channels, *shape))
        SlabForward(tape, counts, recompute_inputs, simulated(shape[0], processes))
    except (Unsliceable, ValueError) as error:
        return first_line(error)
    return None


def slab_levels(config: ModelConfig, probe: bool = False) -> int | None:
    """How many resolution levels slab counts can be given for: one more than the number of 2x
    downsamplings in the network's divisor. For a network that declares none (a factory), None unless
    `probe` (which runs its code, :func:`spatial_divisor`: so a job read from a file is validated without it)."""
    if model_spec(config.architecture).probe and not probe:
        return None
    return max(1, spatial_divisor(config).bit_length())


def check_divisible(config: ModelConfig, shape: tuple[int, ...], probe: bool = False) -> None:
    """Raise ValueError, naming the nearest valid sizes, when a spatial size of `shape` is not a positive
    multiple of the network's divisor: the declared one, or with `probe` :func:`spatial_divisor` (which
    runs a factory's code: so a job read from a file is checked before its code is trusted)."""
    network = "" if config.architecture == "unet3d" else f"network {config.architecture}: "
    divisor = spatial_divisor(config) if probe else declared_divisor(config)
    check_sizes(shape, divisor, model_spec(config.architecture).why, network)


def check_shape(config: ModelConfig, shape: tuple[int, int, int], batch: int = 1) -> None:
    """Raise ValueError naming the network when it does not take `shape`: a size that is not a multiple of
    its divisor (probed for a factory: this builds the network anyway), or a forward pass in training mode that fails on the meta device (nothing is allocated)
    or returns another shape than logits (batch, classes, *shape)."""
    check_divisible(config, shape, probe=True)
    if config.architecture == "unet3d":
        return  # the paper's network takes every multiple of 8
    model = build_on_meta(config, shape)
    try:  # outside the meta context: tensors a forward makes for itself (masks, indices) stay real
        output = model(torch.empty(max(batch, 2), config.in_channels, *shape, device="meta"))
    except Exception as error:  # noqa: BLE001 - any failure is the network refusing this shape
        raise ValueError(f"network {config.architecture} does not take {'x'.join(map(str, shape))}: "
                         f"{_first_line(error)}") from None
    expected = (max(batch, 2), config.classes, *shape)
    if isinstance(output, (list, tuple)) or (isinstance(output, torch.Tensor) and output.dim() == 6):
        output = primary_output(output)  # deep-supervision heads: the full-resolution one is the logits
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(f"network {config.architecture} returns {got} for {'x'.join(map(str, shape))}, not "
                         f"logits of shape {expected}")


def _first_line(error: BaseException) -> str:
    return first_line(error) or type(error).__name__
