"""nnU-Net v2 plans whose patch and batch size are the largest fullres's dry run fits in a memory budget.

:func:`fit_plans` reads nnU-Net's own plan-and-preprocess output (``nnUNet_preprocessed/DatasetXXX/
nnUNetPlans.json`` and the ``dataset.json`` beside it), builds the network nnU-Net will build for one
configuration (its architecture class and kwargs from the plans, deep supervision on), dry-runs nnU-Net's
training step for candidate patch and batch sizes, and writes ``<plans>_fullres_<SIZE>.json`` beside the
original: the same plans with only that configuration's ``patch_size`` and ``batch_size`` changed and
``plans_name`` set to the new identifier, so that ``nnUNetv2_train DATASET 3d_fullres FOLD -p <identifier>``
trains with it on the data already preprocessed (the configuration's ``data_identifier`` is kept).

A plans file is data, never code. nnU-Net itself imports every class name its plans give
(``pydoc.locate``); here the network class must be one of nnU-Net's two U-Nets and every name listed in
``_kw_requires_import`` one of the few torch.nn classes nnU-Net's planners write (:data:`ALLOWED_OPS`),
looked up in a table: nothing a plans file names is imported. Any other name, type or structure is refused
in one line (:class:`fullres.errors.UserError`) naming the file.

What the dry run models (:func:`fullres.cost.dryrun.dryrun`, nothing allocated):

* the network: the plans' class and kwargs through :func:`fullres.nets.families.build_nnunet` (the
  ``nnunet:`` family) where they are nnU-Net's default operations (Conv3d, InstanceNorm3d, LeakyReLU,
  no dropout) and strides equal on every axis; otherwise the same class with the allow-listed operations,
  built in this process (then the CPU runtime term is fullres's constant, not measured for the network);
* nnU-Net's loss: Dice + cross-entropy over softmax classes, background left out of the Dice, on every
  deep-supervision head weighted as ``nnUNetTrainer._build_loss`` (fullres's ``dice_bce`` and
  :func:`fullres.engine.losses.deep_supervision_loss`; the same peak as nnunetv2's ``DC_and_CE_loss``, tested).
  Region-based plans (sigmoid Dice + BCE) are modelled with it too, on the same head sizes;
* nnU-Net's optimizer: SGD, momentum 0.99, Nesterov: one momentum buffer per parameter;
* the precision nnU-Net trains in: fp16 autocast with a gradient scaler on CUDA, fp32 on CPU; NCDHW
  tensors (nnU-Net does not use channels-last).

Not modelled: ``torch.compile`` (nnU-Net compiles on CUDA unless ``nnUNet_compile=f``), and cuDNN's
workspaces for NCDHW tensors, which made fullres's contiguous CUDA jobs peak 12-22 % above the dry run on
an H100 (docs/memory.md): on CUDA a job must fit with :data:`CUDA_MARGIN` of headroom.

The search (nnU-Net's planner's order: patch first, then batch; every size a multiple of the network's
strides' product on its axis; batch at least 2):

1. If the plan's patch at batch 2 does not fit, shrink the axis largest against the median image size
   (nnU-Net's rule) by one stride product at a time until it fits, down to 2 voxels a side at the
   network's bottleneck; nothing fits: UserError naming what the smallest patch needs.
2. If it fits, grow the axis smallest against the median image size, one stride product at a time, while
   batch 2 fits, up to nnU-Net's cap: the median image size rounded up to the stride products.
3. The batch: the largest that fits at that patch, capped by nnU-Net's rule that one batch covers at most
   5 % of the dataset's voxels (median image size x training cases), and at least 2.

At most :data:`MAX_DRY_RUNS` dry runs.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import nn

from fullres.cost.dryrun import dryrun
from fullres.cost import runtime as runtime_term
from fullres.errors import UserError
from fullres.files import write_bytes_atomically
from fullres.job.config import JobConfig, Strategy
from fullres.nets.families import NNUNET_DEFAULTS
from fullres.nets.registry import MODELS, ModelConfig, ModelSpec, register_model
from fullres.units import UNITS, format_bytes

if TYPE_CHECKING:
    from fullres.nets.registry import ModelConfig

#: nnU-Net's network classes, by the names its plans give (``network_class_name``).
ALLOWED_NETWORKS = {
    "dynamic_network_architectures.architectures.unet.PlainConvUNet": "PlainConvUNet",
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
}

#: The torch.nn classes a plans file may name, per key, as nnU-Net writes them
#: (``torch.nn.modules.conv.Conv3d``) and as people do (``torch.nn.Conv3d``): looked up in this table, so no
#: name from a plans file is ever imported.
_OP_CLASSES = {
    "conv_op": (nn.Conv3d,),
    "norm_op": (nn.InstanceNorm3d, nn.BatchNorm3d),
    "nonlin": (nn.LeakyReLU, nn.ReLU, nn.PReLU, nn.ELU, nn.GELU),
    "dropout_op": (nn.Dropout3d, nn.Dropout),
}
ALLOWED_OPS: dict[str, dict[str, type]] = {
    key: {**{f"{cls.__module__}.{cls.__name__}": cls for cls in classes},
          **{f"torch.nn.{cls.__name__}": cls for cls in classes}}
    for key, classes in _OP_CLASSES.items()}
#: What :func:`fullres.nets.families.build_nnunet` builds when given no class (its kwargs are JSON): plans with
#: these take the ``nnunet:`` family; others are built here with their allow-listed classes.
FAMILY_OPS = {"conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d, "nonlin": nn.LeakyReLU, "dropout_op": None}
OP_KEYS = tuple(FAMILY_OPS)

#: nnU-Net's planner (ExperimentPlanner): the smallest batch, and the share of the dataset's voxels one
#: batch may cover at most.
MIN_BATCH = 2
MAX_DATASET_COVERED = 0.05
#: nnU-Net's planner keeps the bottleneck at least this many voxels a side; fullres shrinks a patch to 2
#: (instance norm needs more than one voxel) and says when it went below.
NNUNET_MIN_BOTTLENECK, MIN_BOTTLENECK = 4, 2
#: Headroom on CUDA for cuDNN's NCDHW workspaces, which the dry run does not model: contiguous jobs
#: measured 12-22 % above it on an H100 (docs/memory.md).
CUDA_MARGIN = 0.22
MAX_DRY_RUNS = 48
#: nnU-Net's SGD (nnUNetTrainer.configure_optimizers): initial learning rate 1e-2, weight decay 3e-5.
SGD = functools.partial(torch.optim.SGD, lr=1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
MAX_JSON_BYTES = 16 * 2**20  # plans and dataset.json files are kilobytes: a larger one is not one
PLANS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


# ---- reading ---------------------------------------------------------------------------------------------

def _read_json(path: Path, what: str) -> dict:
    """The JSON object in `path`; UserError naming the file otherwise (missing, too large, not JSON, not an
    object). NaN and Infinity are refused: nnU-Net never writes them."""
    def no_constants(name: str):
        raise ValueError(f"{name} is not a JSON number")

    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes is too large for {what}")
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=no_constants)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not {what}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise UserError(f"{path}: not {what}: {str(error).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not {what}: a JSON object expected, got {type(data).__name__}")
    return data


def _ints(value, where: str, count: int | None = None, least: int = 1) -> tuple[int, ...]:
    if not isinstance(value, list) or (count is not None and len(value) != count) or \
            not all(type(v) is int and v >= least for v in value):
        size = f"{count} " if count is not None else ""
        raise UserError(f"{where} must be a list of {size}whole numbers >= {least}, got {json.dumps(value)[:120]}")
    return tuple(value)


def _int(value, where: str, least: int = 1) -> int:
    if type(value) is not int or value < least:
        raise UserError(f"{where} must be a whole number >= {least}, got {json.dumps(value)[:60]}")
    return value


def read_plans(path: str | os.PathLike) -> dict:
    """nnU-Net v2 plans (``nnUNetPlans.json``) as a dict, its top level checked: ``plans_name`` a string,
    ``configurations`` an object of objects. UserError naming the file otherwise."""
    path = Path(path)
    plans = _read_json(path, "an nnU-Net plans file")
    if not isinstance(plans.get("plans_name"), str):
        raise UserError(f"{path}: not an nnU-Net v2 plans file: no \"plans_name\" string")
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or not configurations or \
            not all(isinstance(c, dict) for c in configurations.values()):
        raise UserError(f"{path}: \"configurations\" must be an object of configuration objects")
    return plans


def resolve_configuration(plans: dict, name: str, path: Path) -> dict:
    """Configuration `name` of `plans` with its ``inherits_from`` parents merged in, as nnU-Net's
    PlansManager does (the child's keys over the parent's)."""
    configurations = plans["configurations"]
    chain: list[str] = []
    current = name
    while True:
        if current not in configurations:
            known = ", ".join(sorted(configurations))
            if current == name:
                raise UserError(f"{path}: no configuration {name!r} (the plans have {known})")
            raise UserError(f"{path}: configuration {chain[-1]!r} inherits from {current!r}, which is not in the plans")
        if current in chain:
            raise UserError(f"{path}: configurations inherit in a circle: {' -> '.join([*chain, current])}")
        chain.append(current)
        parent = configurations[current].get("inherits_from")
        if parent is None:
            break
        if not isinstance(parent, str):
            raise UserError(f"{path}: configuration {current!r}: \"inherits_from\" must be a configuration name")
        current = parent
    merged: dict = {}
    for link in reversed(chain):
        merged.update(configurations[link])
    return merged


@dataclass(frozen=True)
class PlansNetwork:
    """The network and training job nnU-Net builds for one configuration of a plans file, checked.

    `class_name`: PlainConvUNet or ResidualEncoderUNet. `kwargs`: the plans' ``arch_kwargs`` with every
    operation as its torch.nn class and deep supervision on; `json_kwargs`: the same as JSON values (the
    operations left out). `divisor`: per axis, the product of the strides (every patch size a multiple of
    it). `median`: the configuration's median image size in voxels; `cases`: the dataset's training cases."""

    plans_path: Path
    configuration: str
    class_name: str
    kwargs: dict
    json_kwargs: dict
    in_channels: int
    classes: int
    region_based: bool
    patch: tuple[int, int, int]
    batch: int
    divisor: tuple[int, int, int]
    median: tuple[float, float, float]
    cases: int

    @property
    def family(self) -> bool:
        """Whether :func:`fullres.nets.families.build_nnunet` builds this network: nnU-Net's default operations
        and the same strides on every axis (the ``nnunet:`` family has one divisor for all axes)."""
        same_ops = all(self.kwargs.get(key) is FAMILY_OPS[key] for key in OP_KEYS)
        only_ops = set(self.kwargs) - set(self.json_kwargs) <= set(OP_KEYS)  # nothing else outside the JSON
        return same_ops and only_ops and _isotropic_strides(self.kwargs["strides"])

    def describe(self) -> str:
        stages = self.kwargs["n_stages"]
        ops = ", ".join(getattr(self.kwargs.get(key), "__name__", "none") for key in OP_KEYS)
        return (f"{self.class_name} ({stages} stages, {ops}; deep supervision), {self.in_channels} channels in, "
                f"{self.classes} {'regions' if self.region_based else 'classes'} out; patch sizes multiples of "
                f"{_shape(self.divisor)}")


def _isotropic_strides(strides) -> bool:
    return all(isinstance(s, int) or len(set(s)) == 1 for s in strides) if isinstance(strides, list) else True


def _shape(sizes) -> str:
    return "x".join(str(s) for s in sizes)


def _operation(name, key: str, where: str):
    """The torch.nn class a plans file names for `key`, from :data:`ALLOWED_OPS` (never imported)."""
    if key not in ALLOWED_OPS:
        raise UserError(f"{where}: _kw_requires_import lists {key!r}: fullres takes class names only for "
                        f"{', '.join(ALLOWED_OPS)}, and imports nothing a plans file names")
    if name is None:
        return None
    if not isinstance(name, str):
        raise UserError(f"{where}: {key} must be a class name or null, got {json.dumps(name)[:80]}")
    if name not in ALLOWED_OPS[key]:
        allowed = ", ".join(cls.__name__ for cls in _OP_CLASSES[key])
        raise UserError(f"{where}: {key} {name[:120]!r} is not a torch.nn class fullres allows there ({allowed}): "
                        "a plans file is data, and fullres imports nothing it names")
    return ALLOWED_OPS[key][name]


def _label_heads(dataset: dict, path: Path) -> tuple[int, bool, int]:
    """(output channels, region-based, foreground labels) as nnU-Net's LabelManager counts them from
    dataset.json's ``labels``: regions (a label given as a list of values) -> one sigmoid channel per
    foreground region; else one softmax channel per label value (the ignore label apart)."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or "background" not in labels:
        raise UserError(f"{path}: \"labels\" must be an object with a \"background\" label")
    values: set[int] = set()
    regions = 0
    region_based = any(isinstance(v, list) and len(v) > 1 for v in labels.values())
    for name, value in labels.items():
        items = value if isinstance(value, list) else [value]
        if not items or not all(type(v) is int and v >= 0 for v in items) or (name == "ignore" and len(items) != 1):
            raise UserError(f"{path}: label {name!r} must be a whole number >= 0 or a list of them, got "
                            f"{json.dumps(value)[:60]}")
        if name == "ignore":
            continue
        values.update(items)
        if set(items) != {0}:
            regions += 1
    if 0 not in values or labels["background"] != 0:
        raise UserError(f"{path}: the background label must be 0")
    foreground = len(values - {0})
    return (regions if region_based else len(values)), region_based, foreground


def read_network(plans_path: str | os.PathLike, configuration: str = "3d_fullres", plans: dict | None = None) \
        -> PlansNetwork:
    """The network and job of `configuration` in the plans at `plans_path` (and the dataset.json beside it),
    every value checked against what nnU-Net writes: UserError in one line naming the file otherwise."""
    path = Path(plans_path)
    plans = read_plans(path) if plans is None else plans
    label_manager = plans.get("label_manager", "LabelManager")
    if label_manager != "LabelManager":
        raise UserError(f"{path}: label_manager {label_manager!r}: fullres counts output channels as nnU-Net's "
                        "LabelManager does, and another may count them differently")
    config = resolve_configuration(plans, configuration, path)
    where = f"{path}: configuration {configuration!r}"
    patch = config.get("patch_size")
    if isinstance(patch, list) and len(patch) == 2:
        raise UserError(f"{where} is 2D: fullres plans 3D configurations (3d_fullres, 3d_lowres, "
                        "3d_cascade_fullres)")
    patch = _ints(patch, f"{where}: patch_size", 3)
    batch = _int(config.get("batch_size"), f"{where}: batch_size")
    median = config.get("median_image_size_in_voxels")
    if not (isinstance(median, list) and len(median) == 3 and
            all(type(v) in (int, float) and math.isfinite(v) and v > 0 for v in median)):
        raise UserError(f"{where}: median_image_size_in_voxels must be 3 positive numbers, got "
                        f"{json.dumps(median)[:80]}")
    architecture = config.get("architecture")
    if not isinstance(architecture, dict):
        raise UserError(f"{where}: no \"architecture\" object (plans written by nnU-Net before 2.4? plan again)")
    network_name = architecture.get("network_class_name")
    if network_name not in ALLOWED_NETWORKS:
        raise UserError(f"{where}: network_class_name {str(network_name)[:120]!r} is not nnU-Net's PlainConvUNet or "
                        "ResidualEncoderUNet (dynamic_network_architectures.architectures.unet): fullres builds only "
                        "those, and imports nothing a plans file names")
    class_name = ALLOWED_NETWORKS[network_name]
    arch_kwargs = architecture.get("arch_kwargs")
    requires_import = architecture.get("_kw_requires_import", [])
    if not isinstance(arch_kwargs, dict):
        raise UserError(f"{where}: architecture.arch_kwargs must be an object")
    if not (isinstance(requires_import, list) and
            all(isinstance(k, str) and k in arch_kwargs for k in requires_import)):
        raise UserError(f"{where}: architecture._kw_requires_import must list keys of arch_kwargs")
    kwargs, json_kwargs = _network_kwargs(class_name, arch_kwargs, requires_import, where)
    divisor = _divisor(kwargs, where)
    for axis, (size, step) in enumerate(zip(patch, divisor)):
        if size % step:
            raise UserError(f"{where}: patch_size {_shape(patch)} is not a multiple of the strides' product "
                            f"{_shape(divisor)} on axis {axis}")
    dataset_path = path.with_name("dataset.json")
    dataset = _read_json(dataset_path, "nnU-Net's dataset.json")
    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or not channels:
        raise UserError(f"{dataset_path}: \"channel_names\" must be an object naming each input channel")
    cases = _int(dataset.get("numTraining"), f"{dataset_path}: numTraining")
    classes, region_based, foreground = _label_heads(dataset, dataset_path)
    in_channels = len(channels)
    if config.get("previous_stage") is not None:  # the cascade's second stage also reads the first's labels
        in_channels += foreground
    network = PlansNetwork(path, configuration, class_name, kwargs, json_kwargs, in_channels, classes, region_based,
                           patch, batch, divisor, tuple(float(v) for v in median), cases)
    try:  # on the meta device: shapes only, nothing allocated
        with torch.device("meta"):
            build_network(network)
    except Exception as error:  # noqa: BLE001 - whatever the class raises on these kwargs (asserts too): one line
        text = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"{where}: {class_name} cannot be built from its arch_kwargs: {text}") from None
    return network


def _network_kwargs(class_name: str, arch_kwargs: dict, requires_import: list, where: str) -> tuple[dict, dict]:
    """(kwargs with operations as classes, the same as JSON without them) for `class_name`: every key must
    be a parameter of the class, every operation allow-listed and listed in ``_kw_requires_import``."""
    import inspect


    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError:
        raise UserError("nnU-Net's networks need dynamic-network-architectures (pip install nnunetv2, or bash "
                        "scripts/setup.sh)") from None
    parameters = inspect.signature(getattr(unet, class_name).__init__).parameters
    accepted = set(parameters) - {"self", "input_channels", "num_classes"}
    kwargs, json_kwargs = {}, {}
    for key, value in arch_kwargs.items():
        if key not in accepted:
            raise UserError(f"{where}: arch_kwargs {key!r} is not a parameter of {class_name}")
        if key in requires_import:
            kwargs[key] = _operation(value, key, where)
            continue
        if key in OP_KEYS and value is not None:
            raise UserError(f"{where}: arch_kwargs {key!r} names a class but is not listed in _kw_requires_import")
        kwargs[key] = json_kwargs[key] = value
    missing = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty
               and name not in ("self", "input_channels", "num_classes") and name not in kwargs]
    if missing:
        raise UserError(f"{where}: arch_kwargs lacks {', '.join(missing)} ({class_name} needs them)")
    if kwargs.get("conv_op") is not nn.Conv3d:
        raise UserError(f"{where}: conv_op must be torch.nn Conv3d for a 3D configuration")
    # What fullres's builder would fill in where the plans say nothing: the class's own default, as nnU-Net
    # passes exactly the plans' kwargs.
    for key in NNUNET_DEFAULTS.get(class_name, {}):
        if key not in kwargs and parameters[key].default is not inspect.Parameter.empty:
            json_kwargs[key] = kwargs[key] = parameters[key].default
    for key in OP_KEYS:  # likewise for the operations, which build_nnunet would otherwise default
        kwargs.setdefault(key, parameters[key].default)
    # nnU-Net's trainer builds with deep supervision on, whatever the plans say
    kwargs["deep_supervision"] = json_kwargs["deep_supervision"] = True
    _int(kwargs["n_stages"], f"{where}: arch_kwargs n_stages")
    try:
        json.dumps(json_kwargs)
    except (TypeError, ValueError):
        raise UserError(f"{where}: arch_kwargs holds values that are not JSON") from None
    return kwargs, json_kwargs


def _divisor(kwargs: dict, where: str) -> tuple[int, int, int]:
    """Per axis, the product of the stages' strides (an int stride counts on every axis)."""
    stages, strides = kwargs["n_stages"], kwargs["strides"]
    if isinstance(strides, int):
        strides = [strides] * stages
    if not isinstance(strides, list) or len(strides) != stages:
        raise UserError(f"{where}: arch_kwargs strides must be one per stage ({stages})")
    divisor = [1, 1, 1]
    for stride in strides:
        per_axis = [stride] * 3 if type(stride) is int else list(_ints(stride, f"{where}: arch_kwargs strides", 3))
        if type(stride) is int and stride < 1:
            raise UserError(f"{where}: arch_kwargs strides must be >= 1")
        divisor = [d * s for d, s in zip(divisor, per_axis)]
    return tuple(divisor)


# ---- the network as fullres builds it ------------------------------------------------------------------

def build_network(network: PlansNetwork) -> nn.Module:
    """The module nnU-Net builds for `network` (its class, the plans' kwargs with the allow-listed
    operations, deep supervision on), on the current default device."""
    from dynamic_network_architectures.architectures import unet

    cls = getattr(unet, network.class_name)
    return cls(input_channels=network.in_channels, num_classes=network.classes, **network.kwargs)


@contextmanager
def model_config(network: PlansNetwork) -> Iterator[tuple["ModelConfig", bool]]:
    """(the :class:`fullres.nets.registry.ModelConfig` of `network`, whether it is the ``nnunet:`` family). Outside
    the family the network is registered under a private name for the duration (divisor 1: the per-axis
    stride products are checked here)."""
    if network.family:
        yield ModelConfig(architecture=f"nnunet:{network.class_name}", args=json.dumps(network.json_kwargs),
                          in_channels=network.in_channels, classes=network.classes), True
        return
    name = f"nnunet-plans:{network.class_name}@{uuid.uuid4().hex[:12]}"
    register_model(ModelSpec(name, lambda config, shape: build_network(network),
                             f"nnU-Net's {network.class_name} from {network.plans_path.name}"))
    try:
        yield ModelConfig(architecture=name, in_channels=network.in_channels, classes=network.classes), False
    finally:
        MODELS.pop(name, None)


# ---- the dry run of nnU-Net's step ---------------------------------------------------------------------

@dataclass(frozen=True)
class Trial:
    patch: tuple[int, int, int]
    batch: int
    peak_bytes: int
    needed_bytes: int  # the peak and, on CUDA, CUDA_MARGIN on top
    fits: bool

    def to_json(self) -> dict:
        return {"patch_size": list(self.patch), "batch_size": self.batch, "peak_bytes": self.peak_bytes,
                "needed_bytes": self.needed_bytes, "fits": self.fits}


class _DryRuns:
    """nnU-Net's training step of `network` dry-run at any patch and batch, each once (memoised), at most
    :data:`MAX_DRY_RUNS` times."""

    def __init__(self, network: PlansNetwork, budget: int, device: str,
                 progress: Callable[[Trial], None] | None) -> None:
        self.network, self.budget, self.device, self.progress = network, budget, device, progress
        self.trials: dict[tuple, Trial] = {}

    def __call__(self, config, patch: tuple[int, int, int], batch: int) -> Trial:
        key = (tuple(patch), batch)
        if key in self.trials:
            return self.trials[key]
        if len(self.trials) >= MAX_DRY_RUNS:
            raise _Exhausted()

        cuda = torch.device(self.device).type == "cuda"
        job = JobConfig(model=config, shape=tuple(patch), batch=batch,
                        strategy=Strategy(precision="fp16" if cuda else "fp32"))
        runtime = self._runtime(job, cuda)
        try:
            result = self._dryrun(dryrun, job, runtime)
        except ValueError as error:
            raise UserError(f"{self.network.plans_path}: {error}") from None
        needed = math.ceil(result.peak_bytes * (1 + CUDA_MARGIN)) if cuda else result.peak_bytes
        trial = Trial(tuple(patch), batch, result.peak_bytes, needed, needed <= self.budget)
        self.trials[key] = trial
        if self.progress is not None:
            self.progress(trial)
        return trial

    def _dryrun(self, dryrun, job, runtime):
        # nnU-Net's process has no fullres CPU pool: glibc's default heap
        allocator = "default" if torch.device(self.device).type == "cpu" else None
        return dryrun(job, loss="dice_bce", optimizer=SGD, device=self.device, runtime=runtime, allocator=allocator)

    def _runtime(self, job, cuda: bool) -> int | None:
        if cuda:
            return 0
        if job.model.architecture.startswith("nnunet:"):
            return runtime_term.measured_runtime_bytes(job)
        return None  # a network no fresh process can rebuild: fullres's constant term


class _Exhausted(Exception):
    """More than MAX_DRY_RUNS dry runs were asked for."""


# ---- the search ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FitResult:
    """What :func:`fit_plans` wrote and why. `peak_bytes`: the dry run of the fitted job; `needed_bytes`: the
    peak and, on CUDA, :data:`CUDA_MARGIN` on top, which is what must fit `memory_bytes`. `reasons`: why the
    patch and the batch are what they are; `modelled`: what the estimate models how; `summary`: one line."""

    source_path: Path
    plans_path: Path
    plans_name: str
    configuration: str
    device: str
    memory_bytes: int
    network: str
    original_patch: tuple[int, int, int]
    original_batch: int
    patch: tuple[int, int, int]
    batch: int
    peak_bytes: int
    needed_bytes: int
    reasons: tuple[str, ...]
    modelled: tuple[str, ...]
    trials: tuple[Trial, ...] = field(default=())
    inherited_by: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return self.patch != self.original_patch or self.batch != self.original_batch

    @property
    def summary(self) -> str:
        what = (f"patch {_shape(self.original_patch)} -> {_shape(self.patch)}, batch {self.original_batch} -> "
                f"{self.batch}" if self.changed else f"patch {_shape(self.patch)} and batch {self.batch} kept")
        need = format_bytes(self.needed_bytes)
        return (f"{self.plans_name} ({self.configuration}): {what}; needs {need} of {format_bytes(self.memory_bytes)} "
                f"on {self.device} by the dry run: {'; '.join(self.reasons)}")

    def to_json(self) -> dict:
        return {"source": str(self.source_path), "plans": str(self.plans_path), "plans_name": self.plans_name,
                "configuration": self.configuration, "device": self.device, "memory_bytes": self.memory_bytes,
                "network": self.network,
                "original": {"patch_size": list(self.original_patch), "batch_size": self.original_batch},
                "fitted": {"patch_size": list(self.patch), "batch_size": self.batch},
                "peak_bytes": self.peak_bytes, "needed_bytes": self.needed_bytes, "changed": self.changed,
                "reasons": list(self.reasons), "modelled": list(self.modelled), "summary": self.summary,
                "inherited_by": list(self.inherited_by), "trials": [t.to_json() for t in self.trials]}


def _search(network: PlansNetwork, run: Callable[[tuple, int], Trial], budget: int, device: str) \
        -> tuple[tuple, int, list[str]]:
    """(patch, batch, reasons) by the rule of the module docstring, `run(patch, batch)` dry-running each
    candidate against `budget` bytes on `device`; UserError when nothing fits."""
    reasons: list[str] = []
    patch = list(network.patch)
    median, divisor = network.median, network.divisor
    floor = [min(size, MIN_BOTTLENECK * step) for size, step in zip(patch, divisor)]
    cap = [max(size, math.ceil(m / step) * step) for size, step, m in zip(patch, divisor, median)]
    first = run(tuple(patch), MIN_BATCH)
    if not first.fits:
        current = first
        while not current.fits:
            axes = [a for a in range(3) if patch[a] - divisor[a] >= floor[a]]
            if not axes:
                raise UserError(f"{network.plans_path}: {network.configuration} does not fit {format_bytes(budget)} "
                                f"on {device}: its smallest patch, {_shape(patch)} (the bottleneck "
                                f"{MIN_BOTTLENECK} voxels a side) at batch {MIN_BATCH}, needs "
                                f"{format_bytes(current.needed_bytes)}")
            axis = max(axes, key=lambda a: patch[a] / median[a])
            patch[axis] -= divisor[axis]
            current = run(tuple(patch), MIN_BATCH)
        reasons.append(f"{_shape(network.patch)} x {MIN_BATCH} needs {format_bytes(first.needed_bytes)}: shrank "
                       f"the axis largest against the median image ({_shape(round(m) for m in median)}) one stride "
                       f"product at a time, as nnU-Net's planner does, until {_shape(patch)} x {MIN_BATCH} fitted")
    else:
        grown = False
        blocked: set[int] = set()
        while True:
            axes = [a for a in range(3) if a not in blocked and patch[a] + divisor[a] <= cap[a]]
            if not axes:
                break
            axis = min(axes, key=lambda a: patch[a] / median[a])
            larger = list(patch)
            larger[axis] += divisor[axis]
            if run(tuple(larger), MIN_BATCH).fits:
                patch, grown = larger, True
            else:
                blocked.add(axis)
        at_cap = patch == cap
        if grown:
            reasons.append(f"grew the patch toward the median image ({_shape(round(m) for m in median)}), the axis "
                           f"smallest against it first, while batch {MIN_BATCH} fitted"
                           + ("" if at_cap else " (a larger one does not fit)"))
        elif at_cap:
            reasons.append(f"the patch is nnU-Net's largest already (the median image "
                           f"{_shape(round(m) for m in median)}, rounded up to multiples of {_shape(divisor)})")
        else:
            reasons.append("no larger patch fits at batch 2")
    bottleneck = [size // step for size, step in zip(patch, divisor)]
    if min(bottleneck) < min(NNUNET_MIN_BOTTLENECK, min(s // d for s, d in zip(network.patch, divisor))):
        reasons.append(f"the bottleneck is {_shape(bottleneck)} voxels, below the {NNUNET_MIN_BOTTLENECK} a side "
                       "nnU-Net's planner keeps: it would plan fewer stages (nnUNetv2_plan_experiment "
                       "-gpu_memory_target)")
    # The batch: the largest that fits, doubling then bisecting, within nnU-Net's 5 % rule.
    covered = round(math.prod(median) * network.cases * MAX_DATASET_COVERED / math.prod(patch))
    limit = max(covered, MIN_BATCH)
    best, low_fail = MIN_BATCH, None
    step = MIN_BATCH
    while best < limit:
        candidate = min(limit, best + step)
        if run(tuple(patch), candidate).fits:
            best, step = candidate, step * 2
        else:
            low_fail = candidate
            break
    if low_fail is not None:
        lo, hi = best, low_fail
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if run(tuple(patch), mid).fits:
                lo = mid
            else:
                hi = mid
        best = lo
        reasons.append(f"batch {best}: {best + 1} does not fit")
    elif covered <= MIN_BATCH:
        reasons.append(f"batch {MIN_BATCH}: nnU-Net's smallest (its 5 % rule allows {max(covered, 0)}: "
                       f"{network.cases} cases of median {_shape(round(m) for m in median)})")
    else:
        reasons.append(f"batch {best}: nnU-Net's 5 % rule caps it there ({network.cases} cases of median "
                       f"{_shape(round(m) for m in median)})")
    return tuple(patch), best, reasons


# ---- writing -------------------------------------------------------------------------------------------

def size_label(size: int) -> str:
    """`size` bytes as the shortest exact ``<whole number><unit>`` (``24GiB``, ``8GB``, ``1500GB``)."""
    exact = [(size // scale, unit) for unit, scale in UNITS.items() if size % scale == 0]
    number, unit = min(exact)
    spelled = {"KIB": "KiB", "MIB": "MiB", "GIB": "GiB", "TIB": "TiB"}.get(unit, unit)
    return f"{number}{spelled}"


def _check_plans_name(name: str, source: Path) -> None:
    if not PLANS_NAME.fullmatch(name) or name.endswith(".json"):
        raise UserError(f"--plans-name {name!r}: letters, digits, '_', '.' and '-' (at most 200, no .json), as "
                        "nnU-Net uses it in folder names")
    if name == source.stem:
        raise UserError(f"--plans-name {name!r} is the source plans' own name: choose another, the original stays")


def write_plans(plans: dict, configuration: str, patch, batch: int, path: Path, name: str) -> dict:
    """A copy of `plans` with `configuration`'s patch_size and batch_size set and ``plans_name`` = `name`,
    written atomically to `path` as nnU-Net writes plans (indented 4, keys in order). Returns the copy."""
    written = json.loads(json.dumps(plans))
    written["plans_name"] = name
    written["configurations"][configuration]["patch_size"] = list(patch)
    written["configurations"][configuration]["batch_size"] = int(batch)
    write_bytes_atomically(path, (json.dumps(written, indent=4) + "\n").encode())
    return written


def fit_plans(plans_path: str | os.PathLike, memory_bytes: int, configuration: str = "3d_fullres",
              device: str = "cpu", plans_name: str | None = None, overwrite: bool = False,
              progress: Callable[[Trial], None] | None = None) -> FitResult:
    """Write nnU-Net plans whose `configuration` has the largest patch and batch size fullres's dry run fits
    in `memory_bytes` on `device` ("cpu" or "cuda"), by the search of the module docstring, and return what
    changed and why (:class:`FitResult`).

    The new plans go beside `plans_path` as ``<plans_name>.json`` (default ``<source
    name>_fullres_<SIZE>``, e.g. ``nnUNetPlans_fullres_24GiB``), atomically; an existing file is replaced
    only with `overwrite`. Only the configuration's ``patch_size`` and ``batch_size`` and the top-level
    ``plans_name`` differ from the source (configurations inheriting from it inherit the new sizes).
    `progress` sees each dry run's :class:`Trial` as it finishes. UserError in one line for a bad plans file,
    a budget nothing fits, or an output that exists."""
    source = Path(plans_path).absolute()
    if type(memory_bytes) is not int or memory_bytes <= 0:
        raise UserError(f"memory must be a positive number of bytes, got {memory_bytes!r}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.backends.cuda.is_built():
        raise UserError(f"--device cuda: this torch ({torch.__version__}) is built without CUDA, and the dry run of a "
                        "CUDA step needs a CUDA build of torch")
    plans = read_plans(source)
    network = read_network(source, configuration, plans)
    name = plans_name or f"{source.stem}_fullres_{size_label(memory_bytes)}"
    _check_plans_name(name, source)
    target = source.with_name(f"{name}.json")
    if target.exists() and not overwrite:
        raise UserError(f"{target} exists: give --overwrite to replace it, or another --plans-name")
    runs = _DryRuns(network, memory_bytes, device, progress)
    with model_config(network) as (config, family):
        try:
            patch, batch, reasons = _search(network, functools.partial(runs, config), memory_bytes, device)
        except _Exhausted:
            raise UserError(f"{source}: the search stopped after {MAX_DRY_RUNS} dry runs without an answer") from None
        fitted = runs(config, patch, batch)
    modelled = _modelled(network, family, device)
    write_plans(plans, configuration, patch, batch, target, name)
    inherited = _inheritors(plans, configuration)
    return FitResult(source, target, name, configuration, device, memory_bytes, network.describe(), network.patch,
                     network.batch, patch, batch, fitted.peak_bytes, fitted.needed_bytes, tuple(reasons), modelled,
                     tuple(runs.trials.values()), inherited)


def _inheritors(plans: dict, configuration: str) -> tuple[str, ...]:
    """The configurations that inherit `configuration`'s patch or batch size (``inherits_from``, directly or
    not, with no configuration between them setting both)."""
    configurations = plans["configurations"]
    found = []
    for name in configurations:
        chain, current = [], name
        while isinstance(current, str) and current in configurations and current != configuration \
                and len(chain) <= len(configurations):
            chain.append(configurations[current])
            current = configurations[current].get("inherits_from")
        if name != configuration and current == configuration and \
                not all(any(key in link for link in chain) for key in ("patch_size", "batch_size")):
            found.append(name)
    return tuple(sorted(found))


def _modelled(network: PlansNetwork, family: bool, device: str) -> tuple[str, ...]:
    cuda = device == "cuda"
    notes = [
        (f"network: nnU-Net's {network.class_name} with the plans' kwargs, deep supervision on, built by "
         + ("fullres's nnunet: family" if family else "fullres from the allow-listed classes")),
        ("loss: Dice + cross-entropy on every deep-supervision head, weighted as nnU-Net's trainer"
         + (" (region-based plans train sigmoid Dice + BCE: the same head sizes)" if network.region_based else "")),
        "optimizer: SGD, momentum 0.99, Nesterov (one momentum buffer per parameter)",
        f"precision: {'fp16 autocast and a gradient scaler' if cuda else 'fp32'}, NCDHW, as nnU-Net trains on {device}",
    ]
    if cuda:
        notes.append(f"not modelled: cuDNN's NCDHW workspaces and torch.compile; the job must fit with "
                     f"{CUDA_MARGIN:.0%} headroom over the dry run's peak")
    else:
        notes.append("runtime term: " + ("measured for this network on this machine" if family else
                                         "fullres's constant (this network is not rebuilt in a fresh process)")
                     + "; glibc's default heap, whose leftovers vary from run to run (up to ~10 % of a job of a "
                       "few hundred MB)")
    return tuple(notes)


# ---- finding a dataset's plans -------------------------------------------------------------------------

def locate_plans(dataset: str, plans: str = "nnUNetPlans") -> Path:
    """The plans file `plans`.json of `dataset`: a plans file, a preprocessed dataset folder, or a dataset
    name (``Dataset901_Synth``) or id (``901``) under ``$nnUNet_preprocessed``. UserError otherwise."""
    given = Path(dataset).expanduser()
    if given.is_file():
        return given
    if given.is_dir():
        found = given / f"{plans}.json"
        if not found.is_file():
            others = sorted(p.stem for p in given.glob("*.json") if p.name not in ("dataset.json",
                                                                                    "dataset_fingerprint.json"))
            raise UserError(f"{given}: no {plans}.json" + (f" (plans here: {', '.join(others)}; --plans NAME)"
                                                         if others else " (run nnUNetv2_plan_and_preprocess first)"))
        return found
    if os.sep in dataset or dataset.endswith(".json"):
        raise UserError(f"{dataset}: no such file or folder")
    root = os.environ.get("nnUNet_preprocessed")
    if not root:
        raise UserError(f"DATASET {dataset!r} is not a folder, and $nnUNet_preprocessed is not set to look it up in")
    if dataset.isdigit():
        matches = sorted(Path(root).glob(f"Dataset{int(dataset):03d}_*"))
    else:
        matches = [Path(root) / dataset] if (Path(root) / dataset).is_dir() else []
    matches = [m for m in matches if m.is_dir()]
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(m.name for m in matches)
        raise UserError(f"DATASET {dataset!r}: {'no' if not matches else 'more than one'} dataset folder in "
                        f"$nnUNet_preprocessed ({root}) matches ({found})")
    return locate_plans(str(matches[0]), plans)


def train_command(result: FitResult) -> str:
    """The nnU-Net command that trains with the written plans (fold 0)."""
    folder = result.plans_path.parent.name
    match = re.fullmatch(r"Dataset(\d+)_.*", folder)
    dataset = str(int(match.group(1))) if match else folder
    return f"nnUNetv2_train {dataset} {result.configuration} 0 -p {result.plans_name}"
