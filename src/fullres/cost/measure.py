"""Measure the real peak memory of training steps, in a fresh process.

``measure_peak(job)`` starts ``python -m fullres.cost.measure`` with the job's JSON on stdin. The
child imports torch and fullres, records its resident set size (RSS) as the *baseline*, and only
then builds the model, an Adam optimizer, random inputs and targets shaped like the model's output,
and runs ``steps`` calls of :func:`fullres.job.step.train_step` (the first step is the peak one: Adam
creates its state there). It reports

* CPU: ``peak RSS - baseline RSS``, the peak from ``/proc/self/status`` ``VmHWM`` (Linux), or
  ``ru_maxrss`` where there is no ``/proc``. This is the definition of "peak" that
  :mod:`fullres.cost.dryrun` estimates.
* CUDA: ``torch.cuda.max_memory_allocated()`` (the measured bytes) and ``max_memory_reserved()``.

A fresh process is the only way to get a clean high-water mark: RSS never goes down in the
allocator's books of a process that has already run something bigger.

``measure_spatial_peaks(job, S)`` starts S such children at once as one gloo process group sharing each
sample (``train --spatial S``): each holds its rows of every level and reports its own peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace

from fullres.engine.losses import LOSSES
from fullres.engine.spatial import local_rows, mesh, reduce_gradients, space_of, sums_over
from fullres.job.config import JobConfig
from fullres.job.step import build_training, train_step, use_space
from fullres.kernels import cpu_pool
from fullres.kernels.device import physical_cores
from fullres.kernels.malloc import set_training_malloc_policy


@dataclass(frozen=True)
class MeasuredPeak:
    measured_bytes: int  # CPU: peak RSS above the post-import baseline; CUDA: max_memory_allocated
    baseline_bytes: int  # CPU: RSS right after importing torch and fullres; CUDA: 0
    reserved_bytes: int | None  # CUDA: max_memory_reserved; CPU: the pool's peak reserved (None without it)
    step_seconds: list[float]  # wall time of each step
    threads: int  # torch.get_num_threads() in the child
    device: str
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def measure_peak(job: JobConfig, steps: int = 2, loss: str = "dice", device: str = "cpu",
                 threads: int | None = None, timeout: float | None = None, build_pool: bool = True) -> MeasuredPeak:
    """Run `steps` real training steps of `job` in a fresh subprocess and return its peak memory.

    `threads` sets OMP_NUM_THREADS / torch threads in the child (default: the machine's default).
    `build_pool` False: the child uses the CPU pool only if it is built already (see kernels/malloc.py).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    request = {"job": job.to_json(), "steps": steps, "loss": loss, "device": device, "threads": threads,
               "build_pool": build_pool, "factory_dir": job.model.factory_dir}
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    # -P: the current folder is not put on the child's sys.path (a file there must never be imported)
    done = subprocess.run([sys.executable, "-P", "-m", "fullres.cost.measure"], input=json.dumps(request),
                          capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"measurement child failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return MeasuredPeak(**result)


def measure_spatial_peaks(job: JobConfig, spatial: int, steps: int = 2, loss: str = "dice",
                          threads: int | None = None, timeout: float | None = None) -> list[MeasuredPeak]:
    """Run `steps` real training steps of `job` shared by `spatial` fresh CPU processes (one gloo group on
    this machine, as ``torchrun ... train --spatial S`` runs it) and return each process's peak, rank order;
    each reports its rows in ``extra["rows"]``. `threads`: per process (default: the physical cores shared)."""
    import socket


    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    threads = threads or max(1, physical_cores() // spatial)
    with socket.socket() as probe:  # a free port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    request = json.dumps({"job": job.to_json(), "steps": steps, "loss": loss, "device": "cpu", "threads": threads,
                          "spatial": spatial, "factory_dir": job.model.factory_dir})
    children = []
    for rank in range(spatial):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "WORLD_SIZE": str(spatial), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(spatial)}
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the group lives on this machine
        children.append(subprocess.Popen([sys.executable, "-P", "-m", "fullres.cost.measure", request],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    peaks, failed = [], []
    try:
        for rank, child in enumerate(children):
            out, err = child.communicate(timeout=timeout)
            if child.returncode != 0:
                failed.append(f"rank {rank} (exit {child.returncode}): {err.strip()[-1000:]}")
            else:
                peaks.append(MeasuredPeak(**json.loads(out.strip().splitlines()[-1])))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    if failed:
        raise RuntimeError("measurement children failed: " + "; ".join(failed))
    return peaks


# ------------------------------------------------------------------------------------------------
# the child
# ------------------------------------------------------------------------------------------------

def rss_bytes() -> tuple[int, int]:
    """(current RSS, peak RSS) of this process in bytes."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024
        return peak, peak


def _rss_parts() -> dict:
    """RssAnon / RssFile / RssShmem of this process in bytes (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile", "RssShmem") if k in fields}
    except OSError:
        return {}


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). True when it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def make_batch(job: JobConfig, device, generator=None):
    """Random images (effective batch, C, H, W, D) and {0, 1} targets shaped like the model's output."""
    import torch

    n = job.effective_batch
    images = torch.randn(n, job.model.in_channels, *job.shape, device=device)
    if job.model.classes == 1:
        targets = (torch.rand(n, 1, *job.shape, device=device) > 0.5).float()
    else:
        targets = torch.randint(0, job.model.classes, (n, 1, *job.shape), device=device)
    return images, targets


def _child(request: dict) -> dict:
    import time

    import torch


    if request.get("threads"):
        torch.set_num_threads(int(request["threads"]))
    job = JobConfig.from_json(request["job"])
    if request.get("factory_dir"):  # the parent opened a run: its network loads from the run's own copy
        job = replace(job, model=replace(job.model, factory_dir=request["factory_dir"]))
    device = torch.device(request["device"])
    malloc_policy = set_training_malloc_policy(job.strategy, device=device.type,  # as `fullres train` runs it
                                               build=request.get("build_pool", True))
    cuda = device.type == "cuda"
    baseline, _ = rss_bytes()
    parts_before = _rss_parts()
    hwm_reset = reset_hwm()  # import transients must not count
    spatial, space, extra = int(request.get("spatial", 1)), None, {}
    if spatial > 1:  # one of `spatial` processes sharing the sample: the group's transport is set up first
        import torch.distributed as dist


        dist.init_process_group("gloo")
        space = space_of(mesh(spatial), job.shape[0])
        extra["rows"] = list(space.rows(0))
    torch.manual_seed(0)
    training = build_training(job, device)
    model, optimizer, scaler = training.model, training.optimizer, training.scaler
    loss_fn = LOSSES[request["loss"]]
    images, targets = make_batch(job, device)
    if space is not None:  # as train --spatial: this process's rows of the batch, sums and gradients over the group
        use_space(model, space)
        images, targets = local_rows(images, space), local_rows(targets, space)
    update = (lambda: reduce_gradients(model.parameters())) if space is not None else None
    seconds = []
    for _ in range(int(request["steps"])):
        start = time.perf_counter()
        with sums_over(space):
            train_step(model, optimizer, images, targets, loss_fn, job.strategy, scaler, before_update=update)
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    _, peak = rss_bytes()
    parts_after = _rss_parts()
    if cuda:
        measured, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        base = 0
    else:
        measured, reserved, base = peak - baseline, None, baseline
        if malloc_policy == "pool":
            reserved = cpu_pool.stats().peak_reserved
    return {"measured_bytes": int(measured), "baseline_bytes": int(base), "reserved_bytes": reserved,
            "step_seconds": seconds, "threads": torch.get_num_threads(), "device": str(device),
            "extra": {"peak_rss_bytes": peak, "malloc_policy": malloc_policy, "hwm_reset": hwm_reset, "rss_before": parts_before,
                      "rss_after": parts_after, **extra}}


def main() -> None:
    raw = sys.argv[1] if len(sys.argv) > 1 else sys.stdin.read()
    request = json.loads(raw)
    if "job" not in request:  # a bare JobConfig JSON
        request = {"job": request}
    request.setdefault("steps", 2)
    request.setdefault("loss", "dice")
    request.setdefault("device", "cpu")
    print(json.dumps(_child(request)))


if __name__ == "__main__":
    main()
