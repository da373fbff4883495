"""The 3D networks fullres builds besides the paper's own (:mod:`fullres.nets.registry` registers them):

* ``intel-unet``: the network of the paper's code repository (IntelAI/unet, ``3D/model.py``): 5 levels,
  16 base filters, batch norm after every 3x3x3 convolution, 2x2x2 transposed convolutions halving the
  channels, concatenation skips, a 1x1x1 sigmoid head: 5,650,801 parameters (5,647,857 trainable, the
  other 2,944 batch norm's running statistics) for one input channel, as the paper's appendix says.
* ``monai:CLASS``: MONAI's 3D networks, with what the job fixes filled in.
* ``nnunet:PlainConvUNet`` / ``nnunet:ResidualEncoderUNet``: nnU-Net v2's own networks
  (dynamic-network-architectures), configured as nnU-Net plans 3d_fullres for a BraTS-sized input.
* a user's factory ``FILE.py:FUNCTION`` or ``package.module:FUNCTION``:
  ``(in_channels, out_channels, **model_args) -> nn.Module``.

Every builder returns a module mapping (N, in_channels, H, W, D) to logits (N, out_channels, H, W, D).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import stat
from pathlib import Path

import torch
from torch import nn

from fullres.errors import first_line


# ---- intel-unet -----------------------------------------------------------------------------------

class IntelUNet(nn.Module):
    """IntelAI/unet's 3D U-Net: ``levels`` levels of two (3x3x3 convolution, batch norm, ReLU), 2x2x2
    max-pooling down, 2x2x2 stride-2 transposed convolutions to half the channels up, concatenation
    skips, a 1x1x1 head. Sizes must be multiples of 2^(levels - 1)."""

    def __init__(self, in_channels: int = 1, classes: int = 1, filters: int = 16, levels: int = 5) -> None:
        super().__init__()
        widths = [filters * 2**level for level in range(levels)]
        self.down = nn.ModuleList(_intel_block(cin, cout) for cin, cout in zip([in_channels, *widths], widths))
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList(nn.ConvTranspose3d(widths[level + 1], widths[level], 2, stride=2)
                                for level in reversed(range(levels - 1)))
        self.merge = nn.ModuleList(_intel_block(2 * widths[level], widths[level]) for level in reversed(range(levels - 1)))
        self.head = nn.Conv3d(filters, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for index, block in enumerate(self.down):
            x = block(x if index == 0 else self.pool(x))
            skips.append(x)
        for up, merge, skip in zip(self.up, self.merge, reversed(skips[:-1])):
            x = merge(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def _intel_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True),
                         nn.Conv3d(cout, cout, 3, padding=1), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


# ---- MONAI --------------------------------------------------------------------------------------------

# Arguments a MONAI class requires that no job fixes: the defaults of its own tutorials for 3D segmentation.
MONAI_DEFAULTS = {
    "UNet": {"channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2), "num_res_units": 2},
    "DynUNet": {"kernel_size": (3, 3, 3, 3, 3), "strides": (1, 2, 2, 2, 2), "upsample_kernel_size": (2, 2, 2, 2)},
}


def monai_class(name: str) -> type:
    """MONAI's network class `name` (from monai.networks.nets); ValueError naming what exists otherwise."""
    import monai.networks.nets as nets

    cls = getattr(nets, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"monai.networks.nets has no network {name!r} (e.g. SegResNet, BasicUNet, UNet, DynUNet, "
                         "UNETR, SwinUNETR)")
    return cls


def build_monai(name: str, in_channels: int, classes: int, shape: tuple[int, int, int] | None, args: dict) -> nn.Module:
    """MONAI's `name` with spatial_dims=3, the job's channels, ``img_size`` (the job's shape) where the class
    takes one, MONAI_DEFAULTS for what it requires and nothing fixes, and `args` over all of them."""
    cls = monai_class(name)
    parameters = inspect.signature(cls.__init__).parameters
    kwargs = dict(MONAI_DEFAULTS.get(name, {}))
    if "spatial_dims" in parameters:
        kwargs["spatial_dims"] = 3
    kwargs["in_channels"], kwargs["out_channels"] = in_channels, classes
    if "img_size" in parameters and shape is not None:
        kwargs["img_size"] = tuple(shape)
    kwargs.update(args)
    return cls(**kwargs)


def monai_divisor(name: str, args: dict) -> int:
    """The factor every spatial size must be a multiple of for MONAI's `name` with `args`."""
    if name == "SwinUNETR":
        return 32  # patch 2 and four 2x merges
    if name == "UNETR":
        return int(args.get("patch_size", 16)) if isinstance(args.get("patch_size", 16), int) else 16
    if name == "SegResNet":
        return 2 ** (len(args.get("blocks_down", (1, 2, 2, 4))) - 1)
    if name in ("UNet", "DynUNet"):
        strides = args.get("strides", MONAI_DEFAULTS[name]["strides"])
        divisor = 1
        for stride in strides:
            divisor *= max(stride) if isinstance(stride, (list, tuple)) else int(stride)
        return divisor
    return 16  # BasicUNet and others: four 2x poolings


# ---- nnU-Net (dynamic-network-architectures) -----------------------------------------------------------

# nnU-Net v2's 3d_fullres plan for BraTS-sized inputs (MSD Task01: 128^3 patches): six stages, 32 features
# doubling to a 320 cap, 3x3x3 kernels, stride 2 after the first stage, instance norm, leaky ReLU;
# ResidualEncoderUNet with the ResEnc M preset's blocks per stage. Deep supervision off: one output.
NNUNET_DEFAULTS = {
    "PlainConvUNet": {"n_stages": 6, "features_per_stage": (32, 64, 128, 256, 320, 320), "kernel_sizes": 3,
                      "strides": (1, 2, 2, 2, 2, 2), "n_conv_per_stage": 2, "n_conv_per_stage_decoder": 2,
                      "conv_bias": True},
    "ResidualEncoderUNet": {"n_stages": 6, "features_per_stage": (32, 64, 128, 256, 320, 320), "kernel_sizes": 3,
                            "strides": (1, 2, 2, 2, 2, 2), "n_blocks_per_stage": (1, 3, 4, 6, 6, 6),
                            "n_conv_per_stage_decoder": 1, "conv_bias": True},
}


def build_nnunet(name: str, in_channels: int, classes: int, args: dict) -> nn.Module:
    if name not in NNUNET_DEFAULTS:
        raise ValueError(f"nnunet:{name}: choose nnunet:PlainConvUNet or nnunet:ResidualEncoderUNet")
    try:
        from dynamic_network_architectures.architectures import unet
    except ImportError:
        raise ValueError("nnunet networks need dynamic-network-architectures: pip install 'fullres[nnunet-networks]'") from None
    kwargs = {**NNUNET_DEFAULTS[name], "conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d,
              "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU,
              "nonlin_kwargs": {"inplace": True}, "deep_supervision": False, **args}
    return getattr(unet, name)(input_channels=in_channels, num_classes=classes, **kwargs)


#: nnU-Net v2's planner constants (ExperimentPlanner, ResEncUNetPlanner): the feature-map count of its
#: `compute_conv_feature_map_size` that corresponds to 8 GB of GPU memory at batch 2 (its authors call
#: the numbers arbitrary, set to reproduce nnU-Net v1's configurations).
NNUNET_VRAM_REFERENCE = {"PlainConvUNet": 560_000_000, "ResidualEncoderUNet": 680_000_000}
NNUNET_REFERENCE_BYTES, NNUNET_REFERENCE_BATCH = 8 * 10**9, 2


def nnunet_vram_estimate(model: nn.Module, shape: tuple[int, int, int], batch: int) -> int | None:
    """nnU-Net v2's own GPU-memory estimate for one of its networks at `shape` and `batch`, in bytes: the
    network's convolutional feature-map count against the planner's reference constant, scaled linearly
    in batch as its batch-size rule is (GB read as 10^9 bytes). None for any other network."""
    reference = NNUNET_VRAM_REFERENCE.get(type(model).__name__)
    if reference is None or not hasattr(model, "compute_conv_feature_map_size"):
        return None
    count = int(model.compute_conv_feature_map_size(tuple(shape)))
    return round(count / reference * NNUNET_REFERENCE_BYTES * batch / NNUNET_REFERENCE_BATCH)


def nnunet_divisor(name: str, args: dict) -> int:
    strides = args.get("strides", NNUNET_DEFAULTS.get(name, NNUNET_DEFAULTS["PlainConvUNet"])["strides"])
    divisor = 1
    for stride in strides:
        divisor *= max(stride) if isinstance(stride, (list, tuple)) else int(stride)
    return divisor


# ---- a user's factory -----------------------------------------------------------------------------------

def is_factory_name(name: str) -> bool:
    """`FILE.py:FUNCTION` or `package.module:FUNCTION` (not one of the prefixed families)."""
    module, _, function = name.rpartition(":")
    return bool(module) and bool(function) and module not in ("monai", "nnunet") and function.isidentifier()


def factory_file(name: str) -> Path | None:
    module = name.rpartition(":")[0]
    return Path(module).expanduser().absolute() if module.endswith(".py") else None


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_factory(name: str, expected_sha256: str = "", factory_dir: str = ""):
    """The factory function `name` names. A file must exist, be writable by its owner only (and its folder
    too), and, where `expected_sha256` is given, still hold the content it had when the job was configured.
    `factory_dir`: load the file of that name from this folder instead (a run's own copy; its SHA-256 must
    be given and match)."""
    module_name, _, function = name.rpartition(":")
    path = factory_file(name)
    if path is not None and factory_dir:
        path = Path(factory_dir).absolute() / path.name
        if not expected_sha256:
            raise ValueError(f"{path}: the run records no SHA-256 for its network's source: fullres loads no code "
                             "it cannot check")
    if path is not None:
        if not path.is_file() or (factory_dir and path.is_symlink()):  # a run's copy never points elsewhere
            raise ValueError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
        for checked in (path, path.parent):
            if checked.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise ValueError(f"{checked} is writable by others: fullres loads no code from there")
        source = path.read_bytes()
        digest = hashlib.sha256(source).hexdigest()
        if expected_sha256 and digest != expected_sha256:
            raise ValueError(f"{path} changed since this run was configured (its SHA-256 differs): restore it, "
                             "or start a new run")
        module_key = f"fullres_user_model_{digest[:12]}"
        spec = importlib.util.spec_from_loader(module_key, loader=None, origin=str(path))
        module = importlib.util.module_from_spec(spec)
        module.__file__ = str(path)
        try:  # the bytes that were checked are the bytes that run (no second read of the file)
            exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 - the user's own, checked code
        except BaseException as error:  # noqa: BLE001 - the user's code: any failure, SystemExit too, in one line
            if isinstance(error, KeyboardInterrupt):
                raise
            raise ValueError(f"{path} failed to load: {type(error).__name__}: {first_line(error)[:300]}") from None
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"cannot import {module_name}: {error}") from None
        except BaseException as error:  # noqa: BLE001 - the user's module raised while importing
            if isinstance(error, KeyboardInterrupt):
                raise
            raise ValueError(f"importing {module_name} raised {type(error).__name__}: {first_line(error)[:300]}") \
                from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise ValueError(f"{module_name} has no function {function!r}")
    return factory


def build_factory(name: str, in_channels: int, classes: int, args: dict, expected_sha256: str = "",
                  factory_dir: str = "") -> nn.Module:
    """`name`'s factory called with the job's channels and `args` (see :func:`load_factory`); anything it
    raises, SystemExit included, is a ValueError naming it."""
    factory = load_factory(name, expected_sha256, factory_dir)
    try:
        model = factory(in_channels, classes, **args)
    except BaseException as error:  # noqa: BLE001 - the user's code: any failure is reported in one line
        if isinstance(error, KeyboardInterrupt):
            raise
        raise ValueError(f"{name} raised {type(error).__name__}: {first_line(error)[:300]}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name} returned {type(model).__name__}, not a torch.nn.Module")
    return model
