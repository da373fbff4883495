"""fullres's CPU pool (kernels/cpu_pool.cpp): built, installed as PyTorch's CPU allocator, replayed exactly.

Each test that installs the pool does so in a subprocess: the allocator is the process's."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fullres.kernels import cpu_pool, device

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pool is built for Linux")
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None,
                                    reason="no C++ compiler: the pool is not built (tested below)")


def run_python(code: str, *args: str, **env) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


REPLAY = """
import torch
from fullres.job.config import JobConfig, ModelConfig, Strategy
from fullres.kernels import cpu_pool
from fullres.kernels.cuda_allocator import CachingAllocatorModel
from fullres.engine.losses import LOSSES
from fullres.cost.measure import make_batch
from fullres.nets.unet3d import UNet3D
from fullres.job.step import make_grad_scaler, prepare_model, train_step
torch.set_num_threads(1)
cpu_pool.install()
cpu_pool.trace(True)
job = JobConfig(model=ModelConfig(in_channels=4, filters=4), shape=(16, 16, 16), batch=2,
                strategy=Strategy(channels_last=True))
torch.manual_seed(0)
model = prepare_model(UNet3D(job.model), job.strategy)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
images, targets = make_batch(job, torch.device("cpu"))
for _ in range(2):
    train_step(model, optimizer, images, targets, LOSSES["dice"], job.strategy, make_grad_scaler(job.strategy, "cpu"))
cpu_pool.trace(False)
events, stats = cpu_pool.read_trace(), cpu_pool.stats()
replay, differ, peak = CachingAllocatorModel(), 0, 0
for nbytes, address in events:
    if nbytes >= 0:
        differ += replay.malloc(nbytes)[0] != address
        peak = max(peak, replay.allocated)
    else:
        replay.free(address)
print(len(events), differ, replay.reserved, stats.reserved, replay.allocated, stats.allocated, peak, stats.peak_allocated)
"""


@needs_compiler
def test_the_pool_follows_the_caching_allocator_model_block_for_block():
    """Two real training steps through the pool, replayed through the Python model the dry run uses:
    every block at the same (model) address, the same reserved and allocated bytes."""
    count, differ, reserved, real_reserved, allocated, real_allocated, peak, real_peak = map(int, run_python(REPLAY).split())
    assert count > 500
    assert differ == 0
    assert (reserved, allocated, peak) == (real_reserved, real_allocated, real_peak)
    assert reserved >= 2 * 2**20


REUSE = """
import resource, torch
from fullres.kernels import cpu_pool
cpu_pool.install()
def step():
    blocks = [torch.ones(16 * 2**20) for _ in range(4)]  # 4 x 64 MiB: glibc would mmap each afresh
    del blocks
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
step()
stats = cpu_pool.stats()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, stats.reserved, stats.allocated, stats.segments)
"""


@needs_compiler
def test_freed_blocks_are_reused_without_page_faults():
    faults, reserved, allocated, segments = map(int, run_python(REUSE).split())
    assert faults < 1_000  # glibc's default: ~130,000 for these two steps (test_malloc)
    assert reserved == 4 * 64 * 2**20 and segments == 4
    assert allocated == 0


FORK = """
import torch
from torch.utils.data import DataLoader, Dataset
from fullres.kernels import cpu_pool
cpu_pool.install()
class Volumes(Dataset):
    def __len__(self):
        return 8
    def __getitem__(self, index):
        return torch.full((4, 16, 16, 16), float(index))
total = sum(float(batch.sum()) for batch in DataLoader(Volumes(), batch_size=2, num_workers=2))
print(total, cpu_pool.installed())
"""


@needs_compiler
def test_data_loader_workers_fork_from_a_process_using_the_pool():
    """A forked worker must not inherit a held lock: it serves its own tensors with plain malloc."""
    total, installed = run_python(FORK).split()
    assert float(total) == sum(range(8)) * 4 * 16 ** 3
    assert installed == "True"


@needs_compiler
def test_uninstall_gives_pytorch_its_allocator_back_and_blocks_still_return_to_the_pool():
    code = ("import torch; from fullres.kernels import cpu_pool; cpu_pool.install(); x = torch.ones(2**20); "
            "cpu_pool.uninstall(); y = torch.ones(2**20); a = cpu_pool.stats().allocated; del x; "
            "print(cpu_pool.installed(), a, cpu_pool.stats().allocated)")
    assert run_python(code) == f"False {4 * 2**20} 0"


def test_without_a_compiler_the_pool_says_why_and_training_keeps_glibc(tmp_path):
    code = ("from fullres.kernels import cpu_pool, malloc; from fullres.job.config import Strategy\n"
            "try:\n    cpu_pool.build()\nexcept RuntimeError as error:\n    print(error)\n"
            "job = Strategy(channels_last=True)\n"
            "print(malloc.policy_for(job)); print(malloc.set_training_malloc_policy(job)); "
            "print(malloc.policy_for(job)); print(malloc.policy_line(job))")
    out = run_python(code, CXX=str(tmp_path / "no-such-g++"), XDG_CACHE_HOME=str(tmp_path), FULLRES_MALLOC="")
    reason = f"no C++ compiler ({str(tmp_path / 'no-such-g++')!r} not found) to build the CPU pool"
    assert out.splitlines() == [reason, "default", "None", "default",
                                f"allocator: glibc's default, not fullres's CPU pool ({reason})"]
    assert not list(tmp_path.rglob("*.so"))


def test_a_failed_build_names_the_compiler_error(tmp_path):
    compiler = tmp_path / "broken-g++"
    compiler.write_text("#!/bin/sh\necho 'cpu_pool.cpp:1: error: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(0o755)
    code = ("from fullres.kernels import cpu_pool\n"
            "try:\n    cpu_pool.build()\nexcept RuntimeError as error:\n    print(error)")
    out = run_python(code, CXX=str(compiler), XDG_CACHE_HOME=str(tmp_path))
    assert out == "building the CPU pool failed: cpu_pool.cpp:1: error: this compiler is broken"


@needs_compiler
def test_the_library_is_built_once_per_source_and_torch(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = cpu_pool.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_pool.build() == first and first.stat().st_mtime_ns == stamp
    assert first.parent.parent == tmp_path / "fullres" / "cpu_pool"


def test_the_policy_gives_the_pool_to_fp32_cpu_jobs_without_memory_strategies():
    """fp32 channels-last: the pool; bf16 channels-last: the pool where the dry run models oneDNN's bf16
    buffers (native AVX-512 bf16 without AMX), glibc's default elsewhere; checkpointing or slabs: glibc's
    fixed thresholds; fp32 contiguous, fp16, CUDA, no job yet: glibc's default. The rules alone: whether
    the library is built yet does not enter (next test)."""
    code = ("from fullres.job.config import Strategy; from fullres.kernels.malloc import wanted_policy as p; "
            "cl = Strategy(channels_last=True); "
            "print(p(cl), p(Strategy()), p(Strategy(precision='bf16', channels_last=True)), "
            "p(Strategy(checkpointing=True, channels_last=True)), p(Strategy(slabs=2)), p(cl, 'cuda'), p(None), "
            "p(Strategy(precision='fp16', channels_last=True)))")
    bf16 = "pool" if device.avx512_bf16() and not device.amx_bf16() else "default"
    assert run_python(code, FULLRES_MALLOC="") == f"pool default {bf16} fixed fixed default default default"
    assert run_python(code, FULLRES_MALLOC="pool") == "pool pool pool pool pool default default pool"
    assert run_python(code, FULLRES_MALLOC="default") == " ".join(["default"] * 8)


@needs_compiler
def test_a_job_wanting_the_pool_runs_under_glibc_until_the_library_is_built(tmp_path):
    """estimate/plan (no build) give a pool job glibc's default while no library is cached, the pool once
    one is; a training command (build=True) builds it first."""
    code = ("from fullres.job.config import Strategy; from fullres.kernels.malloc import policy_for; "
            "cl = Strategy(channels_last=True); "
            "print(policy_for(cl), policy_for(cl, build=True), policy_for(cl))")
    cache = str(tmp_path / "cache")
    assert run_python(code, FULLRES_MALLOC="", XDG_CACHE_HOME=cache) == "default pool pool"
    assert run_python(code.replace("policy_for(cl, build=True), ", ""), FULLRES_MALLOC="",
                      XDG_CACHE_HOME=cache) == "pool pool"


# ---- the cached library: trusted only when intact and private ---------------------------------------

LOAD = ("import torch; from fullres.kernels import cpu_pool; cpu_pool.install(); x = torch.ones(2**20); "
        "print(cpu_pool.installed(), float(x.sum()), cpu_pool.load()._name)")


def built_library(cache):
    """A library built into the cache folder `cache` (a test's own): its path."""
    out = run_python("from fullres.kernels import cpu_pool; print(cpu_pool.build())", XDG_CACHE_HOME=str(cache))
    return Path(out)


@needs_compiler
def test_a_truncated_cached_library_is_rebuilt_not_loaded(tmp_path):
    """A crash while the library was written left half of it: loading that maps pages past its end (SIGBUS
    in every later training process). Its hash differs from the recorded one, so it is rebuilt."""
    library = built_library(tmp_path)
    whole = library.read_bytes()
    library.write_bytes(whole[: len(whole) // 2])
    assert run_python(LOAD, XDG_CACHE_HOME=str(tmp_path)) == f"True {float(2**20)} {library}"
    assert library.read_bytes() == whole


@needs_compiler
def test_a_library_planted_in_the_cache_is_replaced_by_a_build(tmp_path):
    library = built_library(tmp_path)
    whole = library.read_bytes()
    library.write_bytes(b"\x7fELF planted by someone else" + bytes(4096))
    assert run_python(LOAD, XDG_CACHE_HOME=str(tmp_path)).startswith("True")
    assert library.read_bytes() == whole


@needs_compiler
def test_a_cache_folder_others_could_write_is_made_private_and_its_library_rebuilt(tmp_path):
    """Someone who could write the folder could have planted a library with a matching hash file: after
    the folder is made private (0700) nothing it held is trusted."""
    library = built_library(tmp_path)
    whole = library.read_bytes()
    planted = b"\x7fELF planted, with its hash" + bytes(4096)
    library.write_bytes(planted)
    (library.parent / cpu_pool.DIGEST).write_text(hashlib.sha256(planted).hexdigest())
    library.parent.chmod(0o777)
    assert run_python(LOAD, XDG_CACHE_HOME=str(tmp_path)).startswith("True")
    assert library.read_bytes() == whole
    assert library.parent.stat().st_mode & 0o777 == 0o700


@needs_compiler
@pytest.mark.skipif(os.getuid() != 0, reason="giving a folder to another user needs root")
def test_a_cache_folder_of_another_user_is_refused_in_one_line(tmp_path):
    library = built_library(tmp_path)
    os.chown(library.parent, 65534, 65534)
    code = ("from fullres.errors import UserError; from fullres.kernels import malloc; from fullres.job.config import Strategy\n"
            "try:\n    malloc.set_training_malloc_policy(Strategy(channels_last=True))\n"
            "except UserError as error:\n    print('UserError', error)")
    out = run_python(code, XDG_CACHE_HOME=str(tmp_path), FULLRES_MALLOC="")
    assert out == (f"UserError {library.parent}: the CPU pool's cache folder belongs to another user (uid 65534), "
                   "so its library is not loaded; remove the folder or set XDG_CACHE_HOME")
    code = "from fullres.kernels import cpu_pool; print(cpu_pool.cached())"
    assert run_python(code, XDG_CACHE_HOME=str(tmp_path)) == "None"  # and estimate models glibc, untouched


NO_BUILD = """
import os, sys
from fullres.job.config import JobConfig, ModelConfig, Strategy
from fullres.cost import measure
from fullres.cost.dryrun import dryrun
from fullres.kernels.malloc import prepare_pool_for
marker = sys.argv[1]
job = JobConfig(model=ModelConfig(filters=2), shape=(16, 16, 16), batch=1, strategy=Strategy(channels_last=True))
print(dryrun(job, runtime=0).allocator, os.path.exists(marker))  # what `estimate` and `plan` run
calibration = measure.measure_peak(job, steps=1, build_pool=False)  # their runtime term's measurement
print(calibration.extra["malloc_policy"], os.path.exists(marker))
prepare_pool_for(job.strategy)  # what `train`, `profile` and `sweep` call before their dry runs
print(dryrun(job, runtime=0).allocator, os.path.exists(marker))
"""


def test_estimate_and_plan_do_not_build_the_pool_and_training_commands_do(tmp_path):
    """`estimate` and `plan` never train: their dry runs and runtime calibrations use the pool only once a
    training command has built it, and model glibc's default until then. (That `train` builds it before
    its preflight: tests/test_train_preflight.py.)"""
    marker = tmp_path / "compiler-ran"
    compiler = tmp_path / "g++"
    compiler.write_text(f"#!/bin/sh\ntouch {marker}\necho 'error: not a compiler' >&2\nexit 1\n")
    compiler.chmod(0o755)
    out = run_python(NO_BUILD, str(marker), CXX=str(compiler), XDG_CACHE_HOME=str(tmp_path / "cache"),
                     FULLRES_MALLOC="")
    assert out.splitlines() == ["default False", "None False", "default True"]
    assert not list((tmp_path / "cache").rglob("*.so"))


RELEASE = """
import resource, torch
from fullres.kernels import cpu_pool
cpu_pool.install()
MiB = 2**20
x = torch.empty(64 * MiB // 4)
del x  # its 64 MiB segment is cached
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + 48 * MiB, resource.RLIM_INFINITY))
y = torch.empty(96 * MiB // 4)  # fits the address space only once the cached segment is unmapped
stats = cpu_pool.stats()
print(stats.reserved // MiB, stats.segments, stats.released, stats.allocated // MiB)
"""


@needs_compiler
def test_cached_segments_are_released_and_the_mapping_retried_before_failing():
    assert run_python(RELEASE) == "96 1 1 96"


WORKSPACES = """
import json, torch
from fullres.cost import dryrun
from fullres.kernels import cpu_pool
torch.set_num_threads(2)
cpu_pool.install()
cl = torch.channels_last_3d
found = {}
for name, layer, side in (("transposed 3^3", torch.nn.ConvTranspose3d(32, 3, 3, stride=2, padding=1, output_padding=1), 32),
                          ("transposed 2^3", torch.nn.ConvTranspose3d(64, 16, 2, stride=2), 24),
                          ("convolution 3^3", torch.nn.Conv3d(32, 8, 3, padding=1), 48)):
    layer = layer.to(memory_format=cl)
    x = torch.randn(1, layer.in_channels, side, side, side).contiguous(memory_format=cl).requires_grad_()
    layer(x).sum().backward()  # the primitives' first calls
    y = layer(x)
    grad = torch.ones_like(y).contiguous(memory_format=cl)
    cpu_pool.trace(True)
    y = layer(x)
    forward = len(cpu_pool.read_trace())
    y.backward(grad)
    cpu_pool.trace(False)
    events = cpu_pool.read_trace()
    outputs = {y.nbytes, x.nbytes, layer.weight.nbytes, layer.bias.nbytes}
    taken = [[n for n, _ in part if n >= 2**20 and n not in outputs] for part in (events[:forward], events[forward:])]
    args = (x, layer.weight, layer.bias, list(layer.stride), list(layer.padding), list(layer.dilation),
            layer.transposed, list(layer.output_padding), 1)
    conv = dryrun._cpu_convolution(dryrun.aten.convolution.default, args)
    back = dryrun._cpu_convolution(dryrun.aten.convolution_backward.default,
                                   (grad, *args[:2], [layer.out_channels], *args[3:], [True, True, True]))
    modelled = [dryrun.onednn_transposed_scratch_bytes(conv),
                dryrun.onednn_transposed_scratch_bytes(back) + dryrun.gemm_weight_gradient_bytes(back)]
    found[name] = {"backend": conv.backend, "taken": taken, "modelled": modelled}
print(json.dumps(found))
"""


BF16_SCRATCHPADS = """
import json, torch
from fullres.cost import dryrun
from fullres.kernels import cpu_pool
import sys
torch.set_num_threads(int(sys.argv[1]))
cpu_pool.install()
cl, bf16 = torch.channels_last_3d, torch.bfloat16
found = {}
for name, layer, batch, size in (("3^3, batch split", torch.nn.Conv3d(32, 48, 3, padding=1), 2, (24, 24, 24)),
                                 ("3^3, channels split", torch.nn.Conv3d(256, 128, 3, padding=1), 1, (6, 6, 6)),
                                 ("first, 4 channels", torch.nn.Conv3d(4, 16, 3, padding=1), 1, (20, 20, 20)),
                                 ("first, wide planes", torch.nn.Conv3d(4, 32, 3, padding=1), 1, (4, 96, 96)),
                                 ("2^3 stride 2", torch.nn.Conv3d(64, 64, 2, stride=2), 1, (16, 16, 16)),
                                 ("1^3", torch.nn.Conv3d(64, 3, 1), 2, (16, 16, 16)),
                                 ("transposed 2^3", torch.nn.ConvTranspose3d(64, 32, 2, stride=2), 1, (10, 10, 10))):
    layer = layer.to(bf16).to(memory_format=cl)
    x = torch.randn(batch, layer.in_channels, *size, dtype=bf16).contiguous(memory_format=cl)
    x.requires_grad_()
    layer(x).sum().backward()  # the primitives' first calls
    y = layer(x)
    grad = torch.ones_like(y).contiguous(memory_format=cl)
    cpu_pool.trace(True)
    y.backward(grad)
    cpu_pool.trace(False)
    sizes = [n for n, _ in cpu_pool.read_trace() if n >= 0]
    args = (x, layer.weight, layer.bias, list(layer.stride), list(layer.padding), list(layer.dilation),
            layer.transposed, list(layer.output_padding), 1)
    back = dryrun._cpu_convolution(dryrun.aten.convolution_backward.default,
                                   (grad, *args[:2], [layer.out_channels], *args[3:], [True, True, True]))
    found[name] = {"largest": max(sizes), "modelled": dryrun.onednn_bf16_weight_gradient_scratchpad(back),
                   "inputs": x.nbytes}
print(json.dumps(found))
"""


@needs_compiler
@pytest.mark.skipif(not device.avx512_bf16() or device.amx_bf16(), reason="native AVX-512 bf16 kernels, no AMX")
def test_onednn_bf16_weight_gradient_scratchpads_are_the_modelled_ones():
    """On a CPU with AVX-512 and without AMX, each bf16 channels-last weight gradient takes oneDNN's scratchpad
    from PyTorch's allocator: the largest block of the backward in the pool's trace, at the size
    :mod:`fullres.cost.onednn_scratchpad` computes (threads splitting the batch or the channels, a first layer,
    one on planes wide enough for spatial blocks, a strided, a pointwise and a transposed convolution; 2 and 3
    threads), larger than the layer's input."""
    import json

    for threads in ("2", "3"):
        found = json.loads(run_python(BF16_SCRATCHPADS, threads))
        for name, seen in found.items():
            assert seen["modelled"] == pytest.approx(seen["largest"], rel=1e-3, abs=4096), (threads, name, seen)
            assert seen["largest"] > seen["inputs"], (threads, name, seen)


PLANAR = """
import json, torch
from torch.utils._python_dispatch import TorchDispatchMode
from fullres.cost import dryrun
from fullres.kernels import cpu_pool
from fullres.kernels.onednn import PlanarWeightGradients
torch.set_num_threads(2)
cpu_pool.install()
calls = []

class Planes(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not dryrun.aten.convolution_backward.default or args[0].dim() != 4:
            return func(*args, **(kwargs or {}))
        cpu_pool.trace(True)
        out = func(*args, **(kwargs or {}))
        cpu_pool.trace(False)
        workspace = dryrun.pool_op_workspace(func, args, kwargs, out)
        calls.append({"taken": [n for n, _ in cpu_pool.read_trace() if n >= 65536], "script": workspace.script,
                      "held": workspace.held, "output": out[1].nbytes, "outside": workspace.outside})
        return out

# the bottleneck of MONAI's UNet at 32^3: 2^3 maps, contiguous (its instance norm returns them so)
layer = torch.nn.Conv3d(128, 128, 3, padding=1).to(torch.bfloat16).to(memory_format=torch.channels_last_3d)
x = torch.randn(1, 128, 2, 2, 2, dtype=torch.bfloat16, requires_grad=True)
with Planes(), PlanarWeightGradients():
    for _ in range(2):  # the second: the primitives exist
        calls.clear()
        layer(x).sum().backward()
print(json.dumps(calls))
"""


@needs_compiler
@pytest.mark.skipif(not device.avx512_bf16() or device.amx_bf16(), reason="native AVX-512 bf16 kernels, no AMX")
def test_planar_weight_gradients_of_contiguous_maps_take_the_modelled_blocks():
    """A bf16 3D weight gradient of a map shorter than its kernel runs plane by plane (2D weight gradients of
    views of a contiguous map against slices of a channels-last weight). oneDNN runs each channels-last (its
    weight's strides are), so each takes the weight slice's copy, then the scratchpad of the 2D kernel, then
    two weight-sized blocks: the pool's trace of each plane is the replay's blocks and the output, in the
    order of the replay's script, the copy held (taken once)."""
    import json

    calls = json.loads(run_python(PLANAR))
    assert len(calls) == 3  # one plane per kernel row
    for call in calls:
        # no input gradient: the only output is the weight gradient, where the script takes the outputs
        modelled = call["held"] + [step[1] if step[0] == "take" else call["output"]
                                   for step in call["script"] if step[0] in ("take", "outputs")]
        assert call["held"] and call["taken"] == [size for size in modelled if size >= 65536], call
        assert call["outside"] == 0, call


BLOCKED_POINTWISE = """
import json, sys, torch
from fullres.cost import dryrun
from fullres.kernels import cpu_pool
torch.set_num_threads(2)
cpu_pool.install()
aten, found, dtype = dryrun.aten, [], getattr(torch, sys.argv[1])
cases = ((1, 32, 3, 32), (2, 48, 3, 24), (1, 8, 32, 32)) if dtype == torch.bfloat16 else \
    ((1, 96, 48, 32), (1, 48, 3, 32), (1, 4, 16, 80))  # 4 channels at 80^3: past ATen's slow-path rule
for batch, cin, cout, side in cases:
    # contiguous maps and a 1x1x1 weight with contiguous strides: autocast's copy of MONAI's output layer
    x = torch.randn(batch, cin, side, side, side, dtype=dtype)
    w = torch.randn(cout, cin, 1, 1, 1, dtype=dtype)
    forward = (x, w, None, [1] * 3, [0] * 3, [1] * 3, False, [0] * 3, 1)
    for _ in range(2):  # the second: the primitives exist
        cpu_pool.trace(True)
        y = aten.convolution.default(*forward)
        cpu_pool.trace(False)
        taken_forward = [n for n, _ in cpu_pool.read_trace() if n >= 65536]
        backward = (torch.randn_like(y), x, w, [cout], *forward[3:], [True, True, True])
        cpu_pool.trace(True)
        grads = aten.convolution_backward.default(*backward)
        cpu_pool.trace(False)
        taken_backward = [n for n, _ in cpu_pool.read_trace() if n >= 65536]
    modelled_forward = dryrun.pool_op_workspace(aten.convolution.default, forward, {}, y)
    modelled_backward = dryrun.pool_op_workspace(aten.convolution_backward.default, backward, {}, grads)
    found.append({"taken": [taken_forward, taken_backward], "outputs": [y.nbytes, grads[0].nbytes],
                  "modelled": [modelled_forward.phases, modelled_backward.phases],
                  "scripts": [modelled_forward.script, modelled_backward.script]})
print(json.dumps(found))
"""


@needs_compiler
@pytest.mark.skipif(not device.avx512_bf16() or device.amx_bf16(), reason="native AVX-512 bf16 kernels, no AMX")
def test_a_blocked_bf16_pointwise_convolution_takes_the_modelled_blocks():
    """A bf16 1x1x1 convolution of a contiguous map with a weight of contiguous strides runs in oneDNN's
    blocked layout: forward, a scratchpad of fp32 output rows per thread and blocked copies of input and
    output; backward, the weight gradient's blocked copies and scratchpad, then the input gradient's. The
    pool's trace holds exactly the modelled blocks of 64 KiB and more, phase by phase, the outputs where
    the operator takes them (forward after its blocks, the input gradient between the two phases)."""
    _check_blocked_pointwise("bfloat16")


@needs_compiler
@pytest.mark.skipif(not device.avx512(), reason="oneDNN's 16-channel blocks of AVX-512 (not measured elsewhere)")
def test_a_blocked_fp32_pointwise_convolution_takes_the_modelled_blocks():
    """The same in fp32 (SwinUNETR's 1x1x1 convolutions, whose weights have contiguous strides, on the
    contiguous maps of its transformer; nnU-Net's output layer after instance norm): blocked copies of input
    (4 channels padded to 16 too) and output (gradient) and the weight's, no scratchpad, taken and freed in
    the replay script's order (the output after the input's copy is freed)."""
    _check_blocked_pointwise("float32")


def _check_blocked_pointwise(dtype: str) -> None:
    import json

    for case in json.loads(run_python(BLOCKED_POINTWISE, dtype)):
        assert (case["scripts"][0] is not None) == (dtype == "float32")
        if case["scripts"][0] is not None:  # fp32: the operator's own order, outputs included
            for taken, script, output in zip(case["taken"], case["scripts"], case["outputs"]):
                outputs = [output]  # the output, or the input gradient (the weight's and bias's: below 64 KiB)
                takes = [step[1] if step[0] == "take" else (outputs.pop() if outputs else 0)
                         for step in script if step[0] in ("take", "outputs")]
                assert taken == [size for size in takes if size >= 65536], case
            continue
        (forward,), (weight_phase, input_phase) = case["modelled"]
        output, input_gradient = case["outputs"]
        big = lambda blocks: [size for size in blocks if size >= 65536]  # noqa: E731
        assert case["taken"][0] == big(forward) + [output], case
        assert big(case["taken"][1]) == big(weight_phase) + [input_gradient] + big(input_phase), case


@needs_compiler
@pytest.mark.skipif(device.avx512(), reason="oneDNN's buffers modelled here are those of CPUs without AVX-512")
def test_onednn_buffers_taken_from_the_pool_are_the_modelled_ones():
    """On a CPU without AVX-512, oneDNN's fp32 channels-last transposed convolution takes a padded copy of its
    input per thread in forward (and, where the kernel overlaps, a buffer in backward), and a convolution's
    weight gradient its GEMM buffer, all from PyTorch's allocator: the pool's trace holds each at the
    modelled size (within 1 %), and none besides."""
    import json

    found = json.loads(run_python(WORKSPACES))
    assert found["transposed 3^3"]["backend"] == "MkldnnTranspose"  # not torch's unnamed "???"
    for name, seen in found.items():
        for taken, modelled in zip(seen["taken"], seen["modelled"]):
            assert len(taken) == (1 if modelled else 0), (name, taken, modelled)
            if modelled:
                assert taken[0] == pytest.approx(modelled, rel=0.01), (name, taken, modelled)
    assert found["transposed 2^3"]["modelled"][1] == 0 and found["convolution 3^3"]["modelled"][0] == 0


SLOW_PATH = """
import json, torch
from fullres.kernels import cpu_pool
cpu_pool.install()
torch.set_num_threads(2)
found = {}
for name, (cin, cout, side, stride, input_grad) in {"16 -> 16 at 32^3": (16, 16, 32, 1, True),
                                                    "16 -> 32, stride 2": (16, 32, 32, 2, True),
                                                    "4 -> 8, stride 2, no input gradient": (4, 8, 32, 2, False)}.items():
    layer = torch.nn.Conv3d(cin, cout, 3, stride=stride, padding=1).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, cin, side, side, side).requires_grad_(input_grad)  # contiguous, as a norm returns it
    for _ in range(2):  # the second step's trace: nothing left to build
        cpu_pool.trace(True)
        y = layer(x)
        forward = cpu_pool.read_trace()
        cpu_pool.trace(False)
        grad = torch.randn_like(y)
        cpu_pool.trace(True)
        y.backward(grad)
        backward = cpu_pool.read_trace()
        cpu_pool.trace(False)
    found[name] = [[size for size, _ in events if size >= 65536] for events in (forward, backward)]
print(json.dumps(found))
"""


@needs_compiler
def test_atens_slow_path_takes_the_modelled_blocks_in_the_modelled_order():
    """ATen's slow 3D convolution (fp32, batch 1, N x C x D x H <= 20480) takes its column buffer from the pool
    before its output in forward, and in backward one column buffer for the input gradient, then another for
    the weight gradient: the pool's trace holds the blocks of 64 KiB and more in the order the dry run's
    replay takes them (outputs first in backward)."""
    import json

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fullres.cost import dryrun

    aten = torch.ops.aten
    found = json.loads(run_python(SLOW_PATH))
    cases = {"16 -> 16 at 32^3": (16, 16, 32, 1, True), "16 -> 32, stride 2": (16, 32, 32, 2, True),
             "4 -> 8, stride 2, no input gradient": (4, 8, 32, 2, False)}
    with FakeTensorMode():
        for name, (cin, cout, side, stride, input_grad) in cases.items():
            x = torch.empty(1, cin, side, side, side)
            weight = torch.empty(cout, cin, 3, 3, 3).to(memory_format=torch.channels_last_3d)
            args = (x, weight, None, [stride] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
            assert dryrun.workspace_before_outputs(aten.convolution.default, args), name
            out = aten.convolution.default(*args)
            phases = dryrun.pool_op_workspace(aten.convolution.default, args, {}, out).phases
            modelled_forward = [size for size in phases[0] if size >= 65536] + [out.nbytes]
            grad = torch.empty_like(out)
            mask = [input_grad, True, False]
            backward_args = (grad, x, weight, None, [stride] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1, mask)
            phases = dryrun.pool_op_workspace(aten.convolution_backward.default, backward_args, {}, None).phases
            inputs = [x.nbytes] if input_grad else []
            modelled_backward = inputs + [size for phase in phases for size in phase if size >= 65536]
            assert found[name] == [modelled_forward, modelled_backward], (name, found[name])
        # the slow transposed convolution allocates its output before its columns: the replay's usual order
        x = torch.empty(1, 32, 16, 16, 16)
        weight = torch.empty(32, 16, 3, 3, 3).to(memory_format=torch.channels_last_3d)
        args = (x, weight, None, [2] * 3, [1] * 3, [1] * 3, True, [1] * 3, 1)
        assert dryrun._cpu_convolution(aten.convolution.default, args).backend == "SlowTranspose3d"
        assert not dryrun.workspace_before_outputs(aten.convolution.default, args)


ROLL = """
import json, torch
from fullres.kernels import cpu_pool
cpu_pool.install()
found = {}
for dims in ([1], [1, 2], [1, 2, 3]):
    x = torch.randn(1, 24, 24, 16, 48)
    cpu_pool.trace(True)
    y = torch.roll(x, shifts=[-3] * len(dims), dims=dims)
    cpu_pool.trace(False)
    events = cpu_pool.read_trace()
    del y  # (freed outside the next trace)
    taken = {address: size for size, address in events if size >= 0}
    found[str(len(dims))] = [size if size >= 0 else -taken[address] for size, address in events]
print(json.dumps(found))
"""


@needs_compiler
def test_a_roll_over_several_dimensions_takes_a_copy_per_extra_dimension_before_its_output():
    """ATen's CPU roll rolls one dimension at a time: over k dimensions the pool's trace takes k - 1
    intermediate copies, then the output, and frees the copies last taken first; the replay takes the same
    blocks in the same order (a fake tensor's roll makes its output alone)."""
    import json

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fullres.cost import dryrun

    aten = torch.ops.aten
    found = json.loads(run_python(ROLL))
    with FakeTensorMode():
        x = torch.empty(1, 24, 24, 16, 48)
        for k in (1, 2, 3):
            args = (x, [-3] * k, list(range(1, k + 1)))
            out = aten.roll.default(*args)
            assert dryrun.workspace_before_outputs(aten.roll.default, args)
            phases = dryrun.pool_op_workspace(aten.roll.default, args, {}, out).phases
            copies = phases[0] if phases else []
            modelled = copies + [out.nbytes] + [-size for size in reversed(copies)]
            assert found[str(k)] == modelled, (k, found[str(k)])
            assert dryrun.op_workspace(aten.roll.default, args, {}, out) == (k - 1) * x.nbytes


LAYER_NORM = """
import json, torch
from fullres.kernels import cpu_pool
cpu_pool.install()
aten = torch.ops.aten
found = {}
for dtype in (torch.float32, torch.bfloat16):
    w, b = torch.randn(48, dtype=dtype), torch.randn(48, dtype=dtype)
    for x_cont in (True, False):
        for g_cont in (True, False):
            x = torch.randn(1, 48, 24, 24, 16, dtype=dtype).permute(0, 2, 3, 4, 1)
            x = x.contiguous() if x_cont else x
            g = torch.randn(1, 48, 24, 24, 16, dtype=dtype).permute(0, 2, 3, 4, 1)
            g = g.contiguous() if g_cont else g
            cpu_pool.trace(True)
            out, mean, rstd = aten.native_layer_norm(x, [48], w, b, 1e-5)
            forward = cpu_pool.read_trace()
            cpu_pool.trace(True)
            grads = aten.native_layer_norm_backward(g, x, [48], mean, rstd, w, b, [True, True, True])
            backward = cpu_pool.read_trace()
            cpu_pool.trace(False)
            found[f"{dtype} {x_cont} {g_cont}"] = [[size for size, _ in events if size >= 65536 or size < 0]
                                                   for events in (forward, backward)]
            del out, mean, rstd, grads
print(json.dumps(found))
"""


@needs_compiler
def test_layer_norm_copies_its_non_contiguous_operands_where_the_model_says():
    """ATen's CPU layer norm copies a non-contiguous input before its outputs (freed after them) and, in
    backward, a non-contiguous output gradient after the gradients: the pool's trace (blocks of 64 KiB and
    more, and every free) against the replay's order, fp32 and bf16."""
    import json

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fullres.cost import dryrun

    aten = torch.ops.aten
    found = json.loads(run_python(LAYER_NORM))
    with FakeTensorMode():
        for dtype in (torch.float32, torch.bfloat16):
            w, b = torch.empty(48, dtype=dtype), torch.empty(48, dtype=dtype)
            for x_cont in (True, False):
                for g_cont in (True, False):
                    x = torch.empty(1, 48, 24, 24, 16, dtype=dtype).permute(0, 2, 3, 4, 1)
                    x = x.contiguous() if x_cont else x
                    g = torch.empty(1, 48, 24, 24, 16, dtype=dtype).permute(0, 2, 3, 4, 1)
                    g = g.contiguous() if g_cont else g
                    args = (x, [48], w, b, 1e-5)
                    out = aten.native_layer_norm.default(*args)
                    held = dryrun.pool_op_workspace(aten.native_layer_norm.default, args, {}, out).held
                    forward = list(held) + [out[0].nbytes] + [-1] * len(held)
                    backward_args = (g, x, [48], out[1], out[2], w, b, [True, True, True])
                    backward_op = aten.native_layer_norm_backward.default
                    workspace = dryrun.pool_op_workspace(backward_op, backward_args, {}, None)
                    taken = [step[1] for step in workspace.script if step[0] == "take"]
                    backward = list(workspace.held) + [x.nbytes] + taken + [-1] * (len(taken) + len(workspace.held))
                    key = f"{dtype} {x_cont} {g_cont}"
                    real_forward, real_backward = found[key]
                    # the trace's frees of blocks under 64 KiB (mean, rstd, a small temporary) are not compared
                    assert real_forward[:len(forward) - len(held)] == forward[:len(forward) - len(held)], key
                    assert real_forward.count(-1) == len(held), key
                    assert [size for size in real_backward if size > 0] == [size for size in backward if size > 0], key
                    assert dryrun.op_workspace(backward_op, backward_args, {}, None) == (
                        sum(workspace.held) + sum(taken)), key


@needs_compiler
@pytest.mark.skipif(not device.avx512(), reason="the AVX-512 kernel's buffer (AVX2's: the test above)")
def test_an_overlapping_transposed_convolution_takes_a_padded_copy_per_thread_on_avx512():
    """With AVX-512, oneDNN's fp32 channels-last transposed convolution whose kernel overlaps (3^3, stride 2:
    MONAI UNet's upsampling) takes a padded copy of a sample's input per thread in forward, as on AVX2, and
    nothing in backward: the pool's trace holds it at the modelled size (within 1 %)."""
    import json

    seen = json.loads(run_python(WORKSPACES))["transposed 3^3"]
    assert seen["backend"] == "MkldnnTranspose" and seen["modelled"][1] == 0 and seen["taken"][1] == []
    (taken,) = seen["taken"][0]
    assert taken == pytest.approx(seen["modelled"][0], rel=0.01)


AVX512_BLOCKS = """
import json, sys, torch
from fullres.cost import dryrun
from fullres.kernels import cpu_pool
torch.set_num_threads(int(sys.argv[1]))
cpu_pool.install()
cl = torch.channels_last_3d
found = {}
for name, layer, size in (("transposed 2^3, half the channels", torch.nn.ConvTranspose3d(64, 32, 2, stride=2), (24, 24, 16)),
                          ("16^3 patches", torch.nn.Conv3d(4, 384, 16, stride=16), (32, 32, 48))):
    layer = layer.to(memory_format=cl)
    x = torch.randn(1, layer.in_channels, *size).contiguous(memory_format=cl)
    layer(x).sum().backward()  # the primitives' first calls
    cpu_pool.trace(True)
    y = layer(x)
    forward = len(cpu_pool.read_trace())
    y.backward(torch.ones_like(y).contiguous(memory_format=cl))
    cpu_pool.trace(False)
    events = cpu_pool.read_trace()
    args = (x, layer.weight, layer.bias, list(layer.stride), list(layer.padding), list(layer.dilation),
            layer.transposed, list(layer.output_padding), 1)
    mask = [False, True, True]
    backward_args = (y, *args[:2], [layer.out_channels], *args[3:], mask)
    modelled = dryrun.pool_op_workspace(dryrun.aten.convolution.default, args, {}, y)
    modelled_backward = dryrun.pool_op_workspace(dryrun.aten.convolution_backward.default, backward_args, {}, None)
    found[name] = {"forward": [n for n, _ in events[:forward] if n >= 2**20],
                   "backward": [n for n, _ in events[forward:] if n >= 2**20],
                   "modelled": [sorted(size for phase in modelled.phases for size in phase if size >= 2**20),
                                [step[1] for step in modelled_backward.script or () if step[0] == "take"]],
                   "output": y.nbytes, "weight": layer.weight.nbytes}
print(json.dumps(found))
"""


@needs_compiler
@pytest.mark.skipif(not device.avx512(), reason="oneDNN's AVX-512 kernels (AVX2 runs others)")
@pytest.mark.parametrize("threads", ["1", "2"])
def test_avx512_fp32_transposed_and_wide_kernel_convolutions_take_the_modelled_blocks(threads):
    """With AVX-512, oneDNN's fp32 channels-last 2^3 stride-2 transposed convolution takes a copy of a sample's
    input per thread in forward (64 -> 32 channels: not of its output), and a weight gradient whose kernel is
    wider than 14 (UNETR's patch embedding) runs im2col + GEMM with a scratchpad of four weights and the
    columns: the pool's trace holds the modelled blocks, byte for byte, in the modelled order."""
    import json

    seen = json.loads(run_python(AVX512_BLOCKS, threads))
    transposed, patches = seen["transposed 2^3, half the channels"], seen["16^3 patches"]
    assert sorted(transposed["forward"]) == sorted([transposed["output"], *transposed["modelled"][0]])
    assert patches["backward"] == patches["modelled"][1] + [patches["weight"]]  # then the weight gradient
    assert max(patches["backward"]) > 4 * patches["weight"]
