"""A trained run's network out of PyTorch: ONNX and OpenVINO IR files, verified against PyTorch, and the
engines that run them for `fullres predict --engine`.

What is exported is the function `predict` computes from a preprocessed image (1, C, H, W, D) float32:
the run's network (built from its saved config through the model registry, its checkpoint's weights, in
fp32 whatever precision it trained in) followed by its output activation, sigmoid per channel (targets wt
and regions) or softmax over channels (classes). The image's normalisation (per-case z-score inside the
brain) and crop stay in fullres's preprocessing, which every engine shares.

ONNX comes from ``torch.onnx.export``'s TorchScript exporter (``dynamo=False``: one trace, a few seconds;
the dynamo exporter, which needs onnxscript, is the fallback where the former is gone), opset
:data:`OPSET`. OpenVINO IR is converted from that ONNX graph by ``openvino.convert_model`` and saved in
fp32 (``compress_to_fp16=False``). Each file records the SHA-256 of the checkpoint it came from, the run's
channels, classes and activation; `predict --engine` refuses a file recorded for another checkpoint.

An export is verified before it is written: the file's runtime (ONNX Runtime; OpenVINO's CPU plugin with
fp32 inference precision) and PyTorch run the same random input, and the largest absolute difference of
the probabilities must be at most :data:`TOLERANCE`, else the export is refused with the figure.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fullres.errors import UserError
from fullres.files import current_umask, refuse_special
from fullres.job.config import TrainConfig
from fullres.nets.registry import build_model, build_on_meta, check_shape, spatial_divisor
from fullres.run.checkpoint import (
    check_weights_fit,
    load_checkpoint,
    load_weights,
    open_run_config,
    resolve_checkpoint,
)

FORMATS = ("onnx", "openvino")
ENGINES = ("torch", *FORMATS)
TOLERANCE = 1e-4  # max |exported - PyTorch| on probabilities, fp32
OPSET = 17
DEFAULT_NAMES = {"onnx": "model.onnx", "openvino": "model.xml"}
EXPORT_FOLDER = "export"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"
METADATA_KEYS = ("checkpoint_sha256", "in_channels", "classes", "activation", "architecture")
INSTALL_HINT = "pip install 'fullres[deploy]' (onnx, onnxruntime, onnxscript, openvino)"


def activation_of(config: TrainConfig) -> str:
    """The run's output activation: softmax over channels for target classes, else sigmoid per channel."""
    return "softmax" if config.data.target == "classes" else "sigmoid"


class WithActivation(nn.Module):
    """`network`'s logits through the run's output activation, in fp32: the function every engine runs."""

    def __init__(self, network: nn.Module, activation: str) -> None:
        super().__init__()
        self.network, self.activation = network, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x).float()
        return torch.softmax(logits, 1) if self.activation == "softmax" else torch.sigmoid(logits)


@dataclass(frozen=True)
class RunNetwork:
    """A run's network on the CPU in eval mode, fp32 and contiguous, with its config and checkpoint."""

    model: nn.Module
    config: TrainConfig
    checkpoint: Path

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.config.job.shape)

    def with_activation(self) -> WithActivation:
        return WithActivation(self.model, activation_of(self.config)).eval()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_run_network(run_or_checkpoint: Path, trust_code: bool = False) -> RunNetwork:
    """The run's network with its checkpoint's weights. UserError when the run or its checkpoint is missing,
    unreadable, names code this user has not trusted (`trust_code`: their --trust-code; :mod:`fullres.run.trust`),
    or holds weights of another network than its config describes."""
    checkpoint = resolve_checkpoint(run_or_checkpoint)
    state = load_checkpoint(checkpoint)
    config = open_run_config(state, checkpoint, trust_code)
    try:
        check_weights_fit(build_on_meta(config.job.model, config.job.shape), state, checkpoint)
        with torch.device("cpu"):
            model = build_model(config.job.model, config.job.shape)
    except ValueError as error:
        raise UserError(f"{checkpoint}: {error}") from None
    load_weights(model, state, checkpoint)
    return RunNetwork(model.eval(), config, checkpoint)


def default_path(run_or_checkpoint: Path, fmt: str) -> Path:
    """RUN/export/model.onnx or RUN/export/model.xml (+ .bin); beside a checkpoint file when given one."""
    run = Path(run_or_checkpoint)
    folder = run if run.is_dir() else run.parent
    return folder / EXPORT_FOLDER / DEFAULT_NAMES[fmt]


def output_files(path: Path, fmt: str) -> list[Path]:
    """The files an export of `fmt` writes at `path`: the ONNX file, or the IR's .xml and .bin."""
    return [path] if fmt == "onnx" else [path, path.with_suffix(".bin")]


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: not an export format (choose {' or '.join(FORMATS)})")


def _require(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{module} is not installed: {INSTALL_HINT}") from None


def export_run(run_or_checkpoint: Path, fmt: str, out: Path | None = None, shape: tuple[int, int, int] | None = None,
               dynamic: bool = False, overwrite: bool = False, trust_code: bool = False) -> dict:
    """Export the run's network (see the module docstring) to `out` (default :func:`default_path`) for inputs
    of spatial `shape` (default the run's), or of any valid shape with `dynamic`; verify it; write it
    atomically. Refuses, in one line and writing nothing: an unknown format, a missing run or checkpoint,
    weights of another network, an existing file without `overwrite`, a shape the network does not take, an
    unsupported operator (named by the exporter), an export outside :data:`TOLERANCE`.

    Returns {"path", "files", "format", "in_channels", "shape" (None when dynamic), "verified_shape", "max_abs_diff",
    "tolerance", "checkpoint", "checkpoint_sha256"}."""
    check_format(fmt)
    if dynamic and shape is not None:
        raise UserError("--shape and --dynamic: give one of them")
    _require("onnx")
    _require("onnxruntime")
    if fmt == "openvino":
        _require("openvino")
    network = load_run_network(run_or_checkpoint, trust_code)
    out = Path(out) if out is not None else default_path(run_or_checkpoint, fmt)
    if fmt == "openvino" and out.suffix != ".xml":
        raise UserError(f"--out {out}: an OpenVINO IR is a .xml file (its weights go beside it in a .bin)")
    if fmt == "onnx" and out.suffix != ".onnx":
        raise UserError(f"--out {out}: an ONNX file ends in .onnx")
    for path in output_files(out, fmt):
        refuse_special(path, "--out")
    existing = [path for path in output_files(out, fmt) if path.exists()]
    if existing and not overwrite:
        raise UserError(f"--out {existing[0]} exists: pass --overwrite to replace it")
    if any(path.is_dir() for path in existing):
        raise UserError(f"--out {existing[0]} is a folder")

    config = network.config
    export_shape = tuple(shape) if shape is not None else network.shape
    try:
        check_shape(config.job.model, export_shape)
    except ValueError as error:
        raise UserError(f"--shape: {error}") from None
    # A dynamic graph is checked at a small shape other than the traced one, so that a size baked into the
    # graph shows; a fixed one at its own shape.
    divisor = spatial_divisor(config.job.model)
    verify_shape = (tuple(3 * divisor if size == 2 * divisor else 2 * divisor for size in export_shape)
                    if dynamic else export_shape)
    sha = file_sha256(network.checkpoint)
    metadata = {"checkpoint_sha256": sha, "in_channels": str(config.job.model.in_channels),
                "classes": str(config.job.model.classes), "activation": activation_of(config),
                "architecture": config.job.model.architecture}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        onnx_path = staging / (out.stem + ".onnx")
        export_onnx(network.with_activation(), export_shape, dynamic, onnx_path, metadata)
        if fmt == "onnx":
            written = onnx_path
        else:
            written = staging / out.name
            convert_openvino(onnx_path, written, metadata)
            onnx_path.unlink()
        torch.manual_seed(0)
        x = torch.randn(1, config.job.model.in_channels, *verify_shape)
        with torch.no_grad():
            expected = network.with_activation()(x).numpy()
        try:
            got = open_engine(fmt, written, config, network.checkpoint, run_shape=False)(x.numpy())
        except UserError:
            raise
        except Exception as error:  # noqa: BLE001 - the runtime refusing the file is the export failing
            raise UserError(f"{fmt} export of {network.checkpoint}: the {fmt} runtime cannot run it "
                            f"({_first_line(error)})") from None
        if got.shape != expected.shape:
            raise UserError(f"{fmt} export of {network.checkpoint}: output {got.shape}, PyTorch's {expected.shape}")
        diff = float(np.abs(got - expected).max())
        if not diff <= TOLERANCE:
            raise UserError(f"{fmt} export of {network.checkpoint}: output differs from PyTorch's by {diff:.2e} "
                            f"(max abs on probabilities; tolerance {TOLERANCE:g}): not written")
        for file in sorted(staging.iterdir(), key=lambda p: p.suffix != ".bin"):  # weights first, then the .xml
            file.chmod(0o666 & ~current_umask())
            os.replace(file, out.with_suffix(file.suffix) if fmt == "openvino" else out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {"path": str(out), "files": [str(p) for p in output_files(out, fmt)], "format": fmt,
              "in_channels": config.job.model.in_channels, "shape": None if dynamic else list(export_shape), "verified_shape": list(verify_shape),
              "max_abs_diff": diff, "tolerance": TOLERANCE, "checkpoint": str(network.checkpoint),
              "checkpoint_sha256": sha}
    return result


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[0][:300] if lines else type(error).__name__


def export_onnx(module: nn.Module, shape: tuple[int, int, int], dynamic: bool, path: Path, metadata: dict) -> None:
    import onnx

    x = torch.zeros(1, int(metadata["in_channels"]), *shape)
    axes = {2: "H", 3: "W", 4: "D"}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # tracer warnings about Python ints; deprecation of dynamo=False
            try:
                torch.onnx.export(module, (x,), buffer, dynamo=False, opset_version=OPSET, input_names=[INPUT_NAME],
                                  output_names=[OUTPUT_NAME], do_constant_folding=True,
                                  dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes} if dynamic else None)
            except TypeError:  # a torch without the TorchScript exporter: the dynamo one
                dims = {i: torch.export.Dim.DYNAMIC for i in axes} if dynamic else None
                program = torch.onnx.export(module, (x,), dynamo=True, input_names=[INPUT_NAME],
                                            output_names=[OUTPUT_NAME], dynamic_shapes=({"x": dims},) if dynamic else None)
                program.save(str(path))
                buffer = None
    except Exception as error:  # noqa: BLE001 - an unsupported operator, named by the exporter
        raise UserError(f"ONNX export failed: {_first_line(error)}") from None
    model = onnx.load_from_string(buffer.getvalue()) if buffer is not None else onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = f"fullres.{key}", value
    model.producer_name = "fullres"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def convert_openvino(onnx_path: Path, xml_path: Path, metadata: dict) -> None:
    import openvino as ov

    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as error:  # noqa: BLE001 - an operator OpenVINO cannot convert, named by it
        raise UserError(f"OpenVINO conversion failed: {_first_line(error)}") from None
    for key, value in metadata.items():
        model.set_rt_info(value, ["fullres", key])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)  # its default would halve the weights


# ---- engines ----------------------------------------------------------------------------------------

@dataclass
class Engine:
    """A loaded exported model: call it with an image batch (1, C, H, W, D) float32, get probabilities."""

    kind: str
    path: Path
    run: object  # the runtime's callable
    input_shape: tuple  # (N, C, H, W, D), None for a dynamic size
    output_channels: int | None
    metadata: dict

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(np.ascontiguousarray(x, dtype=np.float32))

    @property
    def spatial_shape(self) -> tuple | None:
        """The fixed (H, W, D) the file takes; None when any size is dynamic."""
        sizes = tuple(self.input_shape[2:])
        return sizes if all(isinstance(size, int) for size in sizes) else None


def threads() -> int:
    return max(1, torch.get_num_threads())


def open_engine(kind: str, path: Path, config: TrainConfig, checkpoint: Path | None = None,
                run_shape: bool = True) -> Engine:
    """The exported model at `path` as an :class:`Engine`, checked against the run: a file recorded for
    another checkpoint, another channel count, class count or (with `run_shape`) a fixed spatial shape other
    than the run's is refused in one line (UserError)."""
    path = Path(path)
    if kind not in FORMATS:
        raise UserError(f"--engine {kind}: not an exported format (choose {' or '.join(FORMATS)})")
    if not path.is_file():
        raise UserError(f"{path}: no such {kind} model file (write it with `fullres export RUN --format {kind}`)")
    if kind == "onnx":
        engine = open_onnx(path)
    else:
        engine = open_openvino(path)
    check_engine(engine, config, checkpoint, run_shape)
    return engine


def open_onnx(path: Path) -> Engine:
    _require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - not an ONNX model, or one ORT cannot load
        raise UserError(f"{path}: not a loadable ONNX model ({_first_line(error)})") from None
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1 or len(inputs[0].shape) != 5:
        raise UserError(f"{path}: not a fullres export (one 5-D input and one output expected)")
    props = session.get_modelmeta().custom_metadata_map
    metadata = {key: props[f"fullres.{key}"] for key in METADATA_KEYS if f"fullres.{key}" in props}
    name = inputs[0].name
    out_channels = outputs[0].shape[1] if len(outputs[0].shape) == 5 and isinstance(outputs[0].shape[1], int) else None
    return Engine("onnx", path, lambda x: session.run(None, {name: x})[0], tuple(inputs[0].shape), out_channels, metadata)


def open_openvino(path: Path) -> Engine:
    _require("openvino")
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(str(path))
    except Exception as error:  # noqa: BLE001
        raise UserError(f"{path}: not a loadable OpenVINO IR ({_first_line(error)})") from None
    if len(model.inputs) != 1 or len(model.outputs) != 1 or model.inputs[0].get_partial_shape().rank.get_length() != 5:
        raise UserError(f"{path}: not a fullres export (one 5-D input and one output expected)")
    metadata = {}
    for key in METADATA_KEYS:
        if model.has_rt_info(["fullres", key]):
            metadata[key] = model.get_rt_info(["fullres", key]).astype(str)
    shape = tuple(d.get_length() if d.is_static else None for d in model.inputs[0].get_partial_shape())
    out_dim = model.outputs[0].get_partial_shape()[1]
    # fp32 inference: the CPU plugin's default on a CPU with native bf16 would be bf16.
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                 "INFERENCE_NUM_THREADS": threads()})
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer({0: x})[compiled.outputs[0]])

    return Engine("openvino", path, run, shape, out_dim.get_length() if out_dim.is_static else None, metadata)


def check_engine(engine: Engine, config: TrainConfig, checkpoint: Path | None, run_shape: bool = True) -> None:
    """Refuse an exported file that does not match the run (one line naming the file and the mismatch)."""
    model = config.job.model
    recorded = engine.metadata.get("checkpoint_sha256")
    if recorded and checkpoint is not None and recorded != file_sha256(Path(checkpoint)):
        raise UserError(f"{engine.path}: exported from another checkpoint than {checkpoint} "
                        f"(export the run again: `fullres export RUN --format {engine.kind} --overwrite`)")
    channels = engine.input_shape[1]
    if isinstance(channels, int) and channels != model.in_channels:
        raise UserError(f"{engine.path}: takes {channels} input channels, the run {model.in_channels}")
    if engine.output_channels is not None and engine.output_channels != model.classes:
        raise UserError(f"{engine.path}: outputs {engine.output_channels} channels, the run {model.classes}")
    fixed = engine.spatial_shape
    if run_shape and fixed is not None and tuple(fixed) != tuple(config.job.shape):
        raise UserError(f"{engine.path}: takes {'x'.join(map(str, fixed))} volumes, the run's images are "
                        f"{'x'.join(map(str, config.job.shape))} (export with --dynamic or the run's --shape)")
    if engine.metadata.get("activation") not in (None, "", activation_of(config)):
        raise UserError(f"{engine.path}: ends in {engine.metadata['activation']}, the run in {activation_of(config)}")


def default_engine_file(run_or_checkpoint: Path, kind: str) -> Path:
    """The run's own export of `kind` (where `fullres export RUN --format KIND` writes it)."""
    return default_path(run_or_checkpoint, kind)
