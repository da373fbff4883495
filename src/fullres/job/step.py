"""One training step under a memory strategy: the single definition that train, profile, bench and the
dry-run estimator all run, so that what is measured or estimated is what trains; and
:func:`build_training`, the one place a job's model, optimizer and gradient scaler are set up.

A step takes `accumulate` micro-batches, each forward + backward under autocast when asked, and
then one optimizer update. Losses are per-sample means, so K micro-batches of b samples, each
scaled by 1/K, give the gradient of one batch of K x b (exact with no batch-norm).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fullres.job.config import JobConfig, Strategy
from fullres.kernels.onednn import cpu_workarounds
from fullres.engine.losses import LossFunction, deep_supervision_loss, primary_output
from fullres.engine.tape import shard_network, slab_network
from fullres.nets.registry import build_model
from fullres.presets import PAPER

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(strategy: Strategy, device_type: str):
    """The autocast context for a strategy (a no-op for fp32)."""
    if strategy.precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[strategy.precision])


def prepare_model(model: nn.Module, strategy: Strategy) -> nn.Module:
    """Apply the strategy's model-side settings (memory format, checkpointing, slabs) in place. A network
    with its own schedule (the paper's UNet3D: `checkpointing` and `slabs` attributes) gets them set; any
    other network runs in slabs through its recorded tape (:func:`fullres.engine.tape.slab_network`) or is
    checkpointed block by block (:func:`checkpoint_blocks`)."""
    if strategy.channels_last:
        # Each 5-D weight in place, as Module.to(memory_format=...) does, but without the tensor swap that
        # fails on the dry run's fake parameters.
        for parameter in model.parameters():
            if parameter.dim() == 5:
                parameter.data = parameter.data.contiguous(memory_format=torch.channels_last_3d)
    inner = getattr(model, "module", model)  # DistributedDataParallel wraps the network
    if _own_schedule(inner):
        inner.checkpointing = strategy.checkpointing
        inner.checkpoint_levels = strategy.checkpoint_levels
        inner.slabs = strategy.slab_counts if len(strategy.slab_counts) > 1 else strategy.slabs
        inner.recompute_inputs = strategy.recompute_inputs
    elif strategy.slabbed:
        slab_network(inner, strategy.slab_counts, strategy.recompute_inputs)
    elif strategy.checkpointing:
        checkpoint_blocks(inner)
    return model


def _own_schedule(module: nn.Module) -> bool:
    # The paper's UNet3D: its checkpointing and slabs are attributes its own forward reads.
    return hasattr(module, "checkpointing") and hasattr(module, "slabs")


def use_space(model: nn.Module, space) -> nn.Module:
    """From now on `model`'s forward takes and returns this process's rows of the volume and of the output under
    `space` (:class:`fullres.engine.spatial.Space`; None: the whole volume again), in place, after
    :func:`prepare_model`: the paper's network by its own schedule, whole rows per level; in slabs, and any
    other network, through its recorded tape (:func:`fullres.engine.tape.shard_network`: slabs within shards)."""
    inner = getattr(model, "module", model)
    if _own_schedule(inner) and not hasattr(inner, "_fullres_slab_forward"):
        counts = inner.slab_counts()
        if all(count == 1 for count in counts):
            inner.space = space
            return model
        slab_network(inner, counts, inner.recompute_inputs)  # its plain forward is what the tape records
        inner.slabs, inner.checkpointing, inner.recompute_inputs = 1, False, 0
    shard_network(inner, space)
    return model


def checkpoint_blocks(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[str]:
    """Wrap the forward of each of `model`'s blocks in non-reentrant activation checkpointing (exact: it
    restores the RNG state, so dropout repeats on recompute): each keeps only its inputs for backward and
    recomputes the rest. Returns the blocks' names (a module's first name in `named_modules`); idempotent.

    The blocks are the module calls that actually run, found by one forward on the meta device of an input of
    `input_shape` (N, C, H, W, D) (:func:`find_blocks`); without `input_shape`, by that of the first real
    input, when the model is first called (until then the list is empty). Where the meta forward fails (a
    network that reads tensors it holds outside its parameters and buffers), the blocks are the top-level
    children with parameters, descending while there is only one, ModuleLists standing for their items."""
    if getattr(model, "_fullres_blocks", None) is not None:
        return list(model._fullres_blocks)
    if input_shape is None:
        if not hasattr(model, "_fullres_find_blocks"):
            def at_first_call(module, args):
                first = next((arg for arg in args if isinstance(arg, torch.Tensor)), None)
                module._fullres_find_blocks.remove()
                if first is not None:
                    checkpoint_blocks(module, tuple(first.shape))
            model._fullres_find_blocks = model.register_forward_pre_hook(at_first_call)
        return []
    names = find_blocks(model, input_shape)
    modules = dict(model.named_modules())
    for name in names:
        block = modules[name]
        if not getattr(block, "_fullres_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward)
            block._fullres_checkpointed = True
    model._fullres_blocks = tuple(names)
    return list(names)


def find_blocks(model: nn.Module, input_shape: tuple[int, ...]) -> list[str]:
    """The names of the modules :func:`checkpoint_blocks` checkpoints in `model` for inputs of `input_shape`.

    One forward on the meta device (nothing allocated; outside any fake-tensor or dispatch mode in force)
    records which module calls which, each call's tensor inputs, and the bytes autograd saves inside it.
    Starting from the model's own calls, the call saving the most is split into the calls it makes, again
    and again until it is a single module; of the sets of blocks on the way, the finest whose estimated peak
    of what checkpointing keeps (the blocks' inputs, what is saved outside any block, the largest block's
    recomputed activations) is within NEAR_TIE of the least is chosen. So a U-Net's blocks come out as its stages,
    the largest of them (full resolution) split further, and a ModuleList, a Sequential iterated by its
    owner, or a module reached under two names (DynUNet's skip layers) is never taken for a block that
    runs. Modules without parameters are never blocks."""
    try:
        tree = _call_tree(model, input_shape)
    except Exception:  # noqa: BLE001 - any network the meta forward cannot run: its structure decides
        return _static_blocks(model)
    names = {id(module): name for name, module in model.named_modules()}

    def weighted(calls):
        return [call for call in calls if call.weighted]

    def cost(blocks):
        inside = {key for call in blocks for key in call.saved_keys}
        kept = sum(size for key, size in tree.saved.items() if key not in inside)
        inputs = {key: size for call in blocks for key, size in call.inputs.items()}
        recomputed = max((sum(tree.saved[key] for key in call.saved_keys if key not in call.inputs) for call in blocks),
                         default=0)  # a block's inputs are kept already: recomputing it saves them again for free
        return kept + sum(inputs.values()) + recomputed

    blocks = weighted(tree.calls)
    while len(blocks) == 1 and weighted(blocks[0].calls):  # a wrapper: its calls are the blocks
        blocks = weighted(blocks[0].calls)
    candidates = [blocks]
    while blocks:  # split the largest block until it is one module
        largest = max(blocks, key=lambda call: call.saved)
        inner = weighted(largest.calls)
        if not inner:
            break
        blocks = [call for block in blocks for call in (inner if block is largest else [block])]
        candidates.append(blocks)
    costs = [cost(candidate) for candidate in candidates]
    # the estimate leaves out backward's gradients, which grow with the largest block: near-ties go finer
    best = [candidate for candidate, value in zip(candidates, costs) if value <= NEAR_TIE * min(costs)][-1]
    return list(dict.fromkeys(names[id(call.module)] for call in best))


NEAR_TIE = 1.05  # sets of blocks whose estimated peak is within 5 % of the least count as equal


class _Call:
    """One module call of a meta forward: the calls it makes, its tensor inputs and the tensors saved in it."""

    def __init__(self, module: nn.Module, inputs: dict[int, int]) -> None:
        self.module, self.inputs, self.calls = module, inputs, []
        self.weighted = any(True for _ in module.parameters())
        self.saved_keys: set[int] = set()
        self.saved = 0


class _CallTree:
    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.saved: dict[int, int] = {}  # storage -> bytes, every tensor autograd saved
        self.seen: list[torch.Tensor] = []  # every tensor keyed, alive so that no storage address is reused

    def key(self, tensor: torch.Tensor) -> tuple[int, int]:
        """(the tensor's storage, its bytes)."""
        self.seen.append(tensor)
        storage = tensor.untyped_storage()
        return storage._cdata, storage.nbytes()




def _call_tree(model: nn.Module, input_shape: tuple[int, ...]) -> _CallTree:
    from torch.utils._python_dispatch import _disable_current_modes
    from torch.utils._pytree import tree_flatten

    tree, stack, hooks, weights = _CallTree(), [], [], set()

    def tensors(values):
        return [value for value in tree_flatten(values)[0] if isinstance(value, torch.Tensor)]

    def enter(module, args, kwargs):
        call = _Call(module, dict(tree.key(t) for t in tensors((args, kwargs))))
        (stack[-1].calls if stack else tree.calls).append(call)
        stack.append(call)

    def leave(module, args, kwargs, output):
        call = stack.pop()
        for outer in stack:  # what a call saves, its callers save too
            outer.saved_keys |= call.saved_keys
            outer.saved = sum(tree.saved[key] for key in outer.saved_keys)

    def pack(tensor):
        key, size = tree.key(tensor)
        if key not in tree.saved and key not in weights:  # weights stay whatever is recomputed
            tree.saved[key] = size
            if stack:
                stack[-1].saved_keys.add(key)
                stack[-1].saved = sum(tree.saved[k] for k in stack[-1].saved_keys)
        return tensor

    with _disable_current_modes():
        swapped = []  # (a module's _parameters or _buffers, name, the tensor there): restored below
        for module in model.modules():  # each module once, however many names it has
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        swapped.append((table, name, tensor))
        dtype = next((tensor.dtype for _, _, tensor in swapped if tensor.is_floating_point()), torch.float32)
        x = torch.empty(tuple(input_shape), dtype=dtype, device="meta")
        for module in model.modules():
            if module is not model:
                hooks.append(module.register_forward_pre_hook(enter, with_kwargs=True))
                hooks.append(module.register_forward_hook(leave, with_kwargs=True))
        try:
            for table, name, tensor in swapped:
                meta = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device="meta")
                table[name] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
                weights.add(tree.key(table[name])[0])
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                model(x)
        finally:
            for table, name, tensor in swapped:
                table[name] = tensor
            for hook in hooks:
                hook.remove()
    return tree


def _static_blocks(model: nn.Module) -> list[str]:
    """Top-level children with parameters, descending while there is only one; ModuleLists and
    ModuleDicts stand for their items (their own forward is never called)."""
    def unpacked(named):
        for name, child in named:
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                yield from unpacked((f"{name}.{item}", grandchild) for item, grandchild in child.named_children())
            else:
                yield name, child

    prefix, blocks = "", list(unpacked(model.named_children()))
    while True:
        with_parameters = [(name, child) for name, child in blocks if any(True for _ in child.parameters())]
        if len(with_parameters) != 1 or not any(True for _ in with_parameters[0][1].children()):
            break
        prefix += with_parameters[0][0] + "."
        blocks = list(unpacked(with_parameters[0][1].named_children()))
    return [prefix + name for name, _ in with_parameters]


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def offloaded(strategy: Strategy):
    """Saved activations kept in (pinned) host memory until backward needs them, with --offload."""
    if not strategy.offload:
        return nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=True)


def to_device(tensor: torch.Tensor, device: torch.device, strategy: Strategy) -> torch.Tensor:
    tensor = tensor.to(device, non_blocking=True)
    if strategy.channels_last and tensor.dim() == 5:
        tensor = tensor.contiguous(memory_format=torch.channels_last_3d)
    return tensor


def make_grad_scaler(strategy: Strategy, device_type: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling against underflow; bf16 has fp32's range and does not."""
    if strategy.precision != "fp16":
        return None
    if device_type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (gradient scaling); use bf16 on CPU")
    return torch.amp.GradScaler("cuda")


@dataclass
class Training:
    """What a training step needs besides data: the prepared model, its optimizer, its gradient scaler."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None


def build_training(job: JobConfig, device: str | torch.device, lr: float = PAPER.lr,
                   model: nn.Module | None = None,
                   optimizer: Callable[..., torch.optim.Optimizer] | None = None) -> Training:
    """`job`'s network (built by :func:`fullres.nets.registry.build_model` on the CPU and moved to `device`, so
    its initial weights follow the CPU generator's seed whatever the device), prepared for the job's
    strategy, with Adam at `lr` (or `optimizer(parameters)`, a user's own) and the precision's gradient
    scaler. A `model` built elsewhere (the dry run builds one on fake tensors) is prepared and used
    instead."""
    device = torch.device(device)
    if job.strategy.offload and device.type != "cuda":
        raise ValueError("--offload moves saved activations to host memory: it needs a CUDA device")
    if model is None:
        model = build_model(job.model, job.shape).to(device)
    prepare_model(model, job.strategy)
    model.train()
    made = torch.optim.Adam(model.parameters(), lr=lr) if optimizer is None else optimizer(model.parameters())
    if not isinstance(made, torch.optim.Optimizer):
        raise ValueError(f"optimizer: the callable returned {type(made).__name__}, not a torch.optim.Optimizer")
    return Training(model, made, make_grad_scaler(job.strategy, device.type))


def split_micro_batches(tensor: torch.Tensor, accumulate: int) -> tuple[torch.Tensor, ...]:
    if tensor.shape[0] % accumulate:
        raise ValueError(f"batch of {tensor.shape[0]} does not split into {accumulate} equal micro-batches")
    return tensor.chunk(accumulate)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
               loss_fn: LossFunction, strategy: Strategy, scaler: torch.amp.GradScaler | None = None,
               no_sync: Callable[[], object] | None = None,
               on_output: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
               before_update: Callable[[], None] | None = None) -> float:
    """One optimizer step over `images` (accumulate x micro-batch samples). Returns the mean loss.

    A network with deep-supervision heads is trained on all of them, weighted as nnU-Net does
    (:func:`fullres.engine.losses.deep_supervision_loss`). `on_output(logits, targets)` sees each micro-batch's
    detached full-resolution logits (for metrics) as they are made, so no logits are kept across
    micro-batches. `no_sync` (DistributedDataParallel.no_sync) skips the
    gradient all-reduce on all but the last micro-batch. `before_update()` runs once the gradients are
    complete, before the optimizer's update (spatial parallelism sums them over the processes).
    """
    device_type = images.device.type
    optimizer.zero_grad(set_to_none=True)
    total_loss = 0.0
    micro_images = split_micro_batches(images, strategy.accumulate)
    micro_targets = split_micro_batches(targets, strategy.accumulate)
    for index, (x, y) in enumerate(zip(micro_images, micro_targets)):
        last = index == strategy.accumulate - 1
        with (nullcontext() if last or no_sync is None else no_sync()), offloaded(strategy), \
                cpu_workarounds(strategy.precision, device_type):
            with autocast(strategy, device_type):
                output = model(x)
            loss = deep_supervision_loss(loss_fn, output, y) / strategy.accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        total_loss += loss.item()
        if on_output is not None:
            on_output(primary_output(output).detach(), y)
        del output, loss  # free this micro-batch's logits before the next forward
    if before_update is not None:
        before_update()
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return total_loss
