"""Training losses and the batch scores logged while training (torch in, torch out).

Extension point: :data:`LOSSES` maps a ``--loss`` name to ``f(logits, target) -> scalar tensor``;
``train``, ``profile``, the dry run and ``bench`` all look the loss up here. Every loss is a
per-sample mean, so K micro-batches scaled by 1/K, or R data-parallel ranks averaged, give the loss
and gradient of the one full batch.

Targets: a sigmoid output (one channel per region) takes a float {0, 1} target of the logits' shape;
a softmax output takes class indices ``[B, *spatial]`` or ``[B, 1, *spatial]``.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["LOSSES", "LossFunction", "voxel_sums", "soft_dice_loss", "dice_bce_loss", "dice_coefficient", "voxel_accuracy",
           "supervised_outputs", "primary_output", "deep_supervision_weights", "deep_supervision_loss"]

LossFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_VOXEL_SUM: contextvars.ContextVar = contextvars.ContextVar("voxel_sum", default=None)


@contextlib.contextmanager
def voxel_sums(reduce: Callable[[torch.Tensor], torch.Tensor]):
    """Within, every sum over voxels a loss takes goes through `reduce`: spatial parallelism passes the sum over
    the processes that hold one sample's rows (:func:`fullres.engine.spatial.sum_over_space`)."""
    token = _VOXEL_SUM.set(reduce)
    try:
        yield
    finally:
        _VOXEL_SUM.reset(token)


def _voxel_sum(x: torch.Tensor, dims) -> torch.Tensor:
    total = x.sum(dims)
    reduce = _VOXEL_SUM.get()
    return total if reduce is None else reduce(total)


def _voxel_mean(loss: Callable[[str], torch.Tensor], elements: int) -> torch.Tensor:
    """`loss(reduction)`'s mean over its `elements` values (of the whole volume, under :func:`voxel_sums`)."""
    reduce = _VOXEL_SUM.get()
    if reduce is None:
        return loss("mean")
    total = loss("sum")
    return reduce(total) / reduce(torch.tensor(float(elements), dtype=total.dtype, device=total.device))


def _resolve_activation(logits: torch.Tensor, target: torch.Tensor, activation: str) -> str:
    if activation not in ("auto", "sigmoid", "softmax"):
        raise ValueError(f"activation must be 'auto', 'sigmoid' or 'softmax', got {activation!r}")
    if activation != "auto":
        return activation
    if target.shape == logits.shape and (logits.shape[1] == 1 or target.is_floating_point()):
        return "sigmoid"
    return "softmax"


def _class_index_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax target as class indices [B, *spatial] (accepts [B, *spatial] or [B, 1, *spatial])."""
    if target.dim() == logits.dim() and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(
            f"softmax target must be class indices of shape {tuple(logits.shape[:1] + logits.shape[2:])} "
            f"(or with a channel of 1), got {tuple(target.shape)}"
        )
    return target.long()


def _probs_and_onehot(logits: torch.Tensor, target: torch.Tensor, activation: str):
    """(probabilities, one-hot/float target), both [B, C, *spatial], and the resolved activation."""
    act = _resolve_activation(logits, target, activation)
    if act == "sigmoid":
        if target.shape != logits.shape:
            raise ValueError(f"sigmoid target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        return torch.sigmoid(logits), target.to(logits.dtype), act
    idx = _class_index_target(logits, target)
    onehot = F.one_hot(idx, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    return torch.softmax(logits, dim=1), onehot, act


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: str = "auto",
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice loss ``1 - mean_c (2 sum p_c t_c + s) / (sum p_c + sum t_c + s)`` (Milletari et al., 2016).

    Sums run over each sample's voxels, per channel ``c``; the loss averages samples and channels. Being a
    per-sample mean, K micro-batches scaled by 1/K (accumulation), or R data-parallel ranks averaged, give
    exactly the loss and gradient of the one full batch.

    * ``activation="sigmoid"``: ``logits`` [B, C, *spatial] with independent sigmoid channels (C = 1 for a
      binary whole-tumour model), ``target`` of the same shape with values in {0, 1}; every channel counts.
    * ``activation="softmax"``: ``logits`` [B, C, *spatial], ``target`` class indices [B, *spatial] (or
      [B, 1, *spatial]); the background channel 0 is left out unless ``include_background``.
    * ``"auto"`` (default): sigmoid when target has the logits' shape and either C = 1 or the target is a
      float tensor; softmax otherwise.
    """
    probs, onehot, act = _probs_and_onehot(logits, target, activation)
    if act == "softmax" and not include_background and probs.shape[1] > 1:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    dims = tuple(range(2, probs.dim()))
    intersection = _voxel_sum(probs * onehot, dims)
    denominator = _voxel_sum(probs, dims) + _voxel_sum(onehot, dims)
    return 1.0 - ((2.0 * intersection + smooth) / (denominator + smooth)).mean()


def dice_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    activation: str = "auto",
    bce_weight: float = 1.0,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """``soft_dice_loss + bce_weight * cross-entropy``.

    The cross-entropy is binary (``binary_cross_entropy_with_logits``, mean over voxels and channels) for
    sigmoid outputs and categorical (``cross_entropy`` over all classes) for softmax outputs; the
    activation is resolved as in :func:`soft_dice_loss`.
    """
    act = _resolve_activation(logits, target, activation)
    loss = soft_dice_loss(logits, target, act, include_background, smooth)
    if act == "sigmoid":
        ce = _voxel_mean(lambda reduction: F.binary_cross_entropy_with_logits(
            logits, target.to(logits.dtype), reduction=reduction), logits.numel())
    else:
        indices = _class_index_target(logits, target)
        ce = _voxel_mean(lambda reduction: F.cross_entropy(logits, indices, reduction=reduction), indices.numel())
    return loss + bce_weight * ce


@torch.no_grad()
def dice_coefficient(
    logits: torch.Tensor,
    target: torch.Tensor,
    threshold: float = 0.5,
    activation: str = "auto",
    smooth: float = 1e-6,
) -> torch.Tensor:
    """Hard Dice over the batch: ``mean_c (2 |P_c ∩ T_c| + s) / (|P_c| + |T_c| + s)`` for logging (no gradient).

    Sigmoid outputs: ``P_c = sigmoid(logits_c) > threshold`` for every channel. Softmax outputs:
    ``P_c = (argmax == c)`` for the foreground classes c >= 1. Counts run over the batch and all voxels;
    the small ``smooth`` makes an all-empty channel score 1.
    """
    act = _resolve_activation(logits, target, activation)
    if act == "sigmoid":
        if target.shape != logits.shape:
            raise ValueError(f"sigmoid target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        pred = torch.sigmoid(logits) > threshold
        truth = target > 0.5
    else:
        idx = _class_index_target(logits, target)
        n = logits.shape[1]
        pred = F.one_hot(logits.argmax(1), n).movedim(-1, 1).bool()
        truth = F.one_hot(idx, n).movedim(-1, 1).bool()
        if n > 1:
            pred, truth = pred[:, 1:], truth[:, 1:]
    dims = (0, *range(2, pred.dim()))
    inter = _voxel_sum(pred & truth, dims).double()
    denom = _voxel_sum(pred, dims).double() + _voxel_sum(truth, dims).double()
    return ((2.0 * inter + smooth) / (denom + smooth)).mean().float()


@torch.no_grad()
def voxel_accuracy(
    logits: torch.Tensor, target: torch.Tensor, threshold: float = 0.5, activation: str = "auto"
) -> torch.Tensor:
    """Fraction of voxels classified correctly: ``mean(pred == target)`` over batch, channels and voxels.

    Sigmoid outputs: ``pred = sigmoid(logits) > threshold`` per channel; softmax: ``pred = argmax``.
    """
    act = _resolve_activation(logits, target, activation)
    if act == "sigmoid":
        if target.shape != logits.shape:
            raise ValueError(f"sigmoid target must have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}")
        correct = (torch.sigmoid(logits) > threshold) == (target > 0.5)
    else:
        correct = logits.argmax(1) == _class_index_target(logits, target)
    correct = correct.float()
    return _voxel_mean(lambda reduction: correct.sum() if reduction == "sum" else correct.mean(), correct.numel())


#: ``--loss`` names: soft Dice (the paper's), and Dice + cross-entropy (the demo's: it keeps a small
#: network from collapsing to all-background).
LOSSES: dict[str, LossFunction] = {"dice": soft_dice_loss, "dice_bce": dice_bce_loss}


# ---- deep supervision ---------------------------------------------------------------------------------

def supervised_outputs(output: torch.Tensor | list | tuple) -> list[torch.Tensor]:
    """A network's output as its list of logits, full resolution first: a tensor is one output; nnU-Net's
    deep supervision returns a list (full resolution first, each coarser level after it); MONAI's DynUNet
    stacks its heads, upsampled to full size, on dimension 1 (N, 1 + heads, C, *spatial)."""
    if isinstance(output, (list, tuple)):
        return list(output)
    if output.dim() == 6:
        return list(output.unbind(1))
    return [output]


def primary_output(output: torch.Tensor | list | tuple) -> torch.Tensor:
    """The full-resolution logits of a network's output: what is predicted from and scored."""
    return supervised_outputs(output)[0]


def deep_supervision_weights(outputs: int) -> list[float]:
    """nnU-Net v2's weights for `outputs` deep-supervision heads (nnUNetTrainer._build_loss): 1/2^i from
    full resolution down, the coarsest head weighted 0, normalised to sum 1; one output weighs 1."""
    if outputs == 1:
        return [1.0]
    weights = [1 / 2 ** i for i in range(outputs)]
    weights[-1] = 0.0
    return [weight / sum(weights) for weight in weights]


def deep_supervision_loss(loss_fn: LossFunction, output: torch.Tensor | list | tuple,
                          target: torch.Tensor) -> torch.Tensor:
    """`loss_fn` over every head of `output`, weighted as nnU-Net does (:func:`deep_supervision_weights`),
    each against the target resized to its head's grid by nearest-neighbour sampling (nnU-Net's
    downsampling of segmentations). A single output is `loss_fn(output, target)` exactly."""
    outputs = supervised_outputs(output)
    if len(outputs) == 1:
        return loss_fn(outputs[0].float(), target)
    terms = []
    for head, weight in zip(outputs, deep_supervision_weights(len(outputs))):
        if weight == 0:
            continue
        head_target = target
        if head.shape[2:] != target.shape[-3:]:
            grid = target if target.dim() == 5 else target[:, None]
            head_target = F.interpolate(grid.float(), size=head.shape[2:], mode="nearest-exact").to(target.dtype)
            head_target = head_target if target.dim() == 5 else head_target[:, 0]
        terms.append(weight * loss_fn(head.float(), head_target))
    return sum(terms[1:], terms[0])
