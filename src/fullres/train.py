"""Train the 3D U-Net on whole volumes: preflight, the epoch loop, logs, atomic checkpoints, resume, DDP.

    fullres train [DATA] --out RUN_DIR [job flags]            one process (CPU with oneDNN, or CUDA)
    torchrun --nproc-per-node N -m fullres train ...          DistributedDataParallel (gloo / NCCL)

RUN_DIR gets config.json (the whole TrainConfig), metrics.csv (a row per epoch), TensorBoard events
(tb/), last.pt each epoch and best.pt by validation Dice, each written atomically; --resume continues
from last.pt with the same model, optimizer, scheduler, RNG and sampler state.

Global batch per optimizer step = --batch x --accumulate x processes. Every loss is a per-sample mean,
so any split of that batch over micro-batches and processes gives the same update.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from fullres.config import JobConfig, Strategy
from fullres.data import DataConfig, MSDDataset, check_dataset, load_dataset_json, split_cases, write_dataset
from fullres.files import atomic_write
from fullres.errors import UserError
from fullres.metrics import dice_bce_loss, dice_coefficient, soft_dice_loss, voxel_accuracy
from fullres.model import UNet3D
from fullres.memory.malloc import policy_line, set_training_malloc_policy
from fullres.step import make_grad_scaler, prepare_model, to_device, train_step
from fullres.units import format_bytes

LOSSES = {"dice": soft_dice_loss, "dice_bce": dice_bce_loss}
CSV_COLUMNS = ["epoch", "train_loss", "train_dice", "train_accuracy", "val_loss", "val_dice", "val_accuracy",
               "step_s", "images_per_s", "peak_memory_bytes", "lr", "epoch_s"]

# The embedded default: a synthetic dataset small enough to train in a few minutes on 2 CPU cores.
DEMO_SYNTH = {"train_cases": 20, "test_cases": 4, "shape": (48, 48, 32), "seed": 0}
# Instance norm and Dice + BCE keep so small a network from collapsing to an all-background output,
# which the paper's plain no-norm soft-Dice set-up does within a few epochs at this size.
DEMO_JOB = {"shape": (48, 48, 32), "filters": 8, "batch": 2, "epochs": 10, "lr": 3e-3, "norm": "instance",
            "loss": "dice_bce"}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; saved as RUN_DIR/config.json and read back by resume and predict."""

    job: JobConfig
    data: DataConfig
    data_dir: str  # the MSD folder trained on (the synthetic one inside RUN_DIR for the demo)
    epochs: int = 25  # the paper's 25
    lr: float = 1e-4
    loss: str = "dice"
    seed: int = 0
    val_fraction: float = 0.2
    device: str = "auto"
    threads: int = 0  # 0: one per physical core (the paper's setting)
    workers: int = 1
    schedule: str = "cosine"
    strategy_choice: str = "manual"  # how job.strategy was chosen: manual, or auto (by the preflight)

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"--schedule must be cosine or constant, got {self.schedule!r}")
        if self.threads < 0 or self.workers < 0:
            raise ValueError("--threads and --workers must be >= 0")
        if tuple(self.data.shape) != tuple(self.job.shape):
            raise ValueError(f"data shape {self.data.shape} differs from the model's input shape {self.job.shape}")

    def to_json(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["job"], values["data"] = self.job.to_json(), self.data.to_json()
        return values

    @classmethod
    def from_json(cls, data: dict) -> "TrainConfig":
        return cls(**{**data, "job": JobConfig.from_json(data["job"]), "data": DataConfig.from_json(data["data"])})


# ---- machine and process set-up -------------------------------------------------------------------

def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads counted once), from sysfs topology."""
    cpus = os.sched_getaffinity(0)
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


@dataclass(frozen=True)
class Process:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_process_group(device_type: str) -> Process:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Process()
    dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return Process(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(choice: str, process: Process) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available (this torch: " + torch.__version__ + ")")
        if process.local_rank >= torch.cuda.device_count():
            raise UserError(f"--device cuda: local process {process.local_rank} has no GPU of its own "
                            f"({torch.cuda.device_count()} visible): start at most that many processes per node "
                            f"(torchrun --nproc-per-node), or use --device cpu")
        torch.cuda.set_device(process.local_rank)
        return torch.device("cuda", process.local_rank)
    return torch.device("cpu")


def configure_cpu(threads: int, process: Process) -> str:
    """oneDNN on, intra-op threads = physical cores (shared between local processes). Returns a log line."""
    torch.backends.mkldnn.enabled = True
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", process.world))
    threads = threads or max(1, physical_cores() // local_world)
    torch.set_num_threads(threads)
    return (f"CPU: {threads} threads, oneDNN {'on' if torch.backends.mkldnn.is_available() else 'unavailable'}, "
            f"ISA {torch.backends.cpu.get_cpu_capability()}")


# ---- kernels ------------------------------------------------------------------------------------

AUTOTUNE_MIN_STEPS = 100  # below this, timing 2 x 2 trial steps would cost more than it could save


def choose_memory_format(job: JobConfig, device: torch.device, total_steps: int) -> tuple[JobConfig, str]:
    """Channels-last only where it is measured faster, for this job on this machine: one warm-up and one
    timed step of each memory format on a throwaway model (the run's own model and RNG are untouched).
    The choice changes speed, never the numerics. Returns the job and a line saying what was chosen."""
    if job.strategy.channels_last:
        return job, "memory format: channels-last (asked for)"
    if total_steps < AUTOTUNE_MIN_STEPS:
        return job, f"memory format: contiguous (run of {total_steps} steps too short to measure the alternative)"
    from fullres.bench import Variant, time_variant

    seconds = {}
    for channels_last in (False, True):
        variant = Variant("autotune", job.strategy.precision, onednn=True, channels_last=channels_last, compiled=False)
        # peak_tflops given so that no matmul peak is measured: only the step time is wanted here
        seconds[channels_last] = time_variant(job, variant, warmup=1, repeats=1, device=device,
                                              peak_tflops=math.inf)["step_s"]
    faster = seconds[True] < seconds[False]
    chosen = job.with_(strategy=_with(job.strategy, channels_last=faster))
    return chosen, (f"memory format: {'channels-last' if faster else 'contiguous'} (measured "
                    f"{seconds[False]:.2f} s/step contiguous, {seconds[True]:.2f} s/step channels-last)")


# ---- memory -------------------------------------------------------------------------------------

def available_memory(device: torch.device) -> int:
    """Bytes this job may use: MemAvailable on CPU (per local process under torchrun), free memory on CUDA."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            available = int(line.split()[1]) * 1024
            return available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def default_method() -> str:
    from fullres.memory import ESTIMATORS

    return "dryrun" if "dryrun" in ESTIMATORS else "table1"


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 has hardware support here. Without it (e.g. an AVX2-only CPU) oneDNN emulates bf16
    about 100x slower than fp32 (docs/benchmarks.md), so --strategy auto must not pick it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


SLAB_CHOICES = (4, 8, 16)  # slabs --strategy auto tries: beyond 16 the full-resolution slab is no longer the peak


def candidate_strategies(job: JobConfig, allow_bf16: bool = True) -> list[tuple[str, JobConfig]]:
    """Least approximate first: none; checkpointing; accumulation (same global batch in smaller
    micro-batches); full-resolution slabs at micro-batch 1 (exact, but each slab recomputed); bf16
    (approximates fp32 numerics) last, and only where `allow_bf16`."""
    candidates = [("as given", job), ("checkpointing", job.with_(strategy=_with(job.strategy, checkpointing=True)))]
    total = job.batch * job.strategy.accumulate
    for micro in sorted({d for d in range(1, job.batch) if total % d == 0}, reverse=True):
        strategy = _with(job.strategy, checkpointing=True, accumulate=total // micro)
        candidates.append((f"checkpointing + accumulate x{total // micro}", job.with_(batch=micro, strategy=strategy)))
    if job.model.norm == "none":  # slabs are exact only without normalisation statistics
        for slabs in (n for n in SLAB_CHOICES if n > job.strategy.slabs and n <= job.shape[0] // 2):
            strategy = _with(job.strategy, checkpointing=True, accumulate=total, slabs=slabs)
            name = f"checkpointing + accumulate x{total} + {slabs} slabs" if total > 1 else f"checkpointing + {slabs} slabs"
            candidates.append((name, job.with_(batch=1, strategy=strategy)))
    if job.strategy.precision == "fp32" and allow_bf16:
        for name, candidate in list(candidates):
            bf16 = _with(candidate.strategy, precision="bf16")
            candidates.append((f"{name} + bf16" if name != "as given" else "bf16", candidate.with_(strategy=bf16)))
    return candidates


def _with(strategy: Strategy, **changes) -> Strategy:
    return Strategy(**{**asdict(strategy), **changes})


def preflight(job: JobConfig, budget: int, method: str, auto: bool,
              allow_bf16: bool = True, device: str = "cpu") -> tuple[JobConfig, int, str]:
    """The job (or with --strategy auto, the least approximate variant) that fits `budget` by `method`.
    Refuses with the estimate, the budget and the options when nothing fits."""
    from fullres.memory import estimate_training_bytes

    tried = []
    for name, candidate in (candidate_strategies(job, allow_bf16) if auto else [("as given", job)]):
        needed = estimate_training_bytes(candidate, method, device)
        if needed <= budget:
            return candidate, needed, name
        tried.append(f"{name}: {format_bytes(needed)}")
    if auto and not allow_bf16:
        tried.append("bf16: not tried (no hardware bf16 here; emulated it runs ~100x slower)")
    raise UserError(refusal(job, budget, method, tried), exit_code=3)


def refusal(job: JobConfig, budget: int, method: str, tried: list[str]) -> str:
    from fullres.memory.plan import plan

    # The suggestions use Table 1's method: a search of many dry runs would take minutes, and Table 1
    # overstates real needs, so what it says fits does fit.
    result = plan(job, budget, "table1")
    shape = " ".join(map(str, result.max_shape)) if result.max_shape else "none"
    lines = [f"the job does not fit: needs more than the {format_bytes(budget)} available ({method} estimate); tried "
             + "; ".join(tried) + ".",
             "  Exact options: --strategy auto (checkpointing, then accumulation, then slabs, then bf16), or a machine with "
             "more memory"
             " (see `fullres plan`).",
             f"  The paper's tricks, never applied for you (sizes by the conservative Table 1 method): a smaller "
             f"shape (at batch {job.batch}: --shape {shape}), a smaller batch (largest: {result.max_batch or 'none'}), "
             "fewer --filters, or tiling.",
             "  --force runs it anyway."]
    return "\n".join(lines)


# ---- checkpoints --------------------------------------------------------------------------------

def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temp file, fsync, rename: a reader never sees a partial checkpoint."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    with atomic_write(path) as file:
        file.write(buffer.getbuffer())
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict:
    """weights_only=True: a checkpoint that needs arbitrary code to load is refused, not run."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: no such checkpoint") from None
    except Exception as error:  # pickle errors, a non-checkpoint file, a forbidden global
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{path}: not a loadable fullres checkpoint ({first_line})") from None


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path) as file:
        file.write(text.getvalue().encode())


def write_json(path: Path, data: dict) -> None:
    with atomic_write(path) as file:
        file.write((json.dumps(data, indent=2) + "\n").encode())


# ---- data ---------------------------------------------------------------------------------------

def demo_dataset(run_dir: Path, progress: bool) -> Path:
    """The embedded default: a synthetic MSD dataset inside the run folder (written once)."""
    folder = run_dir / "synthetic_data"
    if not (folder / "dataset.json").exists():
        write_dataset(folder, progress=progress, **DEMO_SYNTH)
    return folder


def refuse_bad_data(data_dir: Path) -> None:
    report = check_dataset(data_dir)
    if not report.ok:
        raise UserError("the dataset has problems; fix them first (fullres check):\n"
                        + "\n".join(report.lines()) + "\n" + report.summary(), exit_code=1)


# ---- the loop -------------------------------------------------------------------------------------

@dataclass
class EpochTotals:
    loss: float = 0.0
    dice: float = 0.0
    accuracy: float = 0.0
    batches: int = 0
    images: int = 0
    step_seconds: list = field(default_factory=list)

    def add(self, loss: float, dice: float, accuracy: float, images: int) -> None:
        self.loss += loss
        self.dice += dice
        self.accuracy += accuracy
        self.batches += 1
        self.images += images

    def means(self) -> tuple[float, float, float]:
        n = max(1, self.batches)
        return self.loss / n, self.dice / n, self.accuracy / n


def evaluate(model, loader, loss_fn, device, strategy: Strategy) -> tuple[float, float, float]:
    from fullres.step import autocast

    totals = EpochTotals()
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            images, targets = to_device(images, device, strategy), targets.to(device)
            with autocast(strategy, device.type):
                logits = model(images).float()
            totals.add(loss_fn(logits, targets).item(), float(dice_coefficient(logits, targets)),
                       float(voxel_accuracy(logits, targets)), len(images))
    model.train()
    return totals.means()


def reduce_mean(values: list[float], process: Process, device: torch.device) -> list[float]:
    if process.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / process.world).tolist()


def train(config: TrainConfig, run_dir: Path, resume: bool = False, progress: bool = True,
          log=print) -> dict:
    """Train per `config` into `run_dir`. Returns the last epoch's metrics row."""
    from tqdm import tqdm

    process = start_process_group("cuda" if config.device == "cuda" or
                                  (config.device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        device = pick_device(config.device, process)
        if device.type == "cpu":
            settings = configure_cpu(config.threads, process)
            if process.main:
                log(settings)
        job = config.job
        if process.main:
            log(f"job: batch {job.batch} x {job.model.in_channels} x {' x '.join(map(str, job.shape))}, "
                f"{job.model.filters} base filters, {job.strategy.describe()} "
                f"(global batch {job.effective_batch * process.world}, {process.world} process(es), {device})")

        set_training_malloc_policy(job.strategy, device=device.type)
        allocator_line = policy_line(job.strategy, device.type)
        if allocator_line and process.main:
            log(allocator_line)
        torch.manual_seed(config.seed)
        model = UNet3D(job.model).to(device)
        prepare_model(model, job.strategy)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
                     if config.schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0))
        scaler = make_grad_scaler(job.strategy, device.type)
        start_epoch, best_dice, history = 0, -1.0, []
        if resume and (run_dir / "last.pt").exists():  # killed before the first checkpoint: start over
            state = load_checkpoint(run_dir / "last.pt")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best_dice, history = state["epoch"], state["best_dice"], state["history"]
            if process.main:
                log(f"resuming after epoch {start_epoch} of {config.epochs} from {run_dir / 'last.pt'}")
        network = model
        if process.world > 1:
            network = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)

        index = load_dataset_json(Path(config.data_dir))
        train_cases, val_cases = split_cases(index.training, config.val_fraction, config.seed)
        train_set = MSDDataset.from_index(index, config.data, train_cases)
        val_set = MSDDataset.from_index(index, config.data, val_cases)
        global_batch = job.effective_batch * process.world
        if len(train_set) < global_batch:
            raise UserError(f"{len(train_set)} training cases are fewer than one global batch of {global_batch}")
        # One sampler for any number of processes: the same seeded permutation, dealt out by rank, so
        # N processes with batch b see exactly the samples one process with batch N x b sees.
        sampler = DistributedSampler(train_set, num_replicas=process.world, rank=process.rank, shuffle=True,
                                     seed=config.seed, drop_last=True)
        loader = DataLoader(train_set, batch_size=job.effective_batch, sampler=sampler, drop_last=True,
                            num_workers=config.workers, pin_memory=device.type == "cuda",
                            persistent_workers=config.workers > 0)
        val_loader = DataLoader(val_set, batch_size=1, num_workers=0)
        loss_fn = LOSSES[config.loss]

        writer = None
        if process.main:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_epoch + 1)
        row: dict[str, Any] = history[-1] if history else {}
        for epoch in range(start_epoch, config.epochs):
            # The epoch's randomness (dropout; the sampler's order) is a function of (seed, epoch) alone,
            # so a run resumed after a crash repeats exactly what the uninterrupted run would have done.
            torch.manual_seed(config.seed * 100_003 + epoch)
            sampler.set_epoch(epoch)
            totals = EpochTotals()
            epoch_start = time.perf_counter()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                       disable=not (progress and process.main), dynamic_ncols=True)
            for images, targets in bar:
                step_start = time.perf_counter()
                images, targets = to_device(images, device, job.strategy), targets.to(device)
                micro = []  # (dice, accuracy) of each micro-batch, weighted equally: equal sizes

                def score(logits, micro_targets):
                    micro.append((float(dice_coefficient(logits, micro_targets)),
                                  float(voxel_accuracy(logits, micro_targets))))

                loss = train_step(network, optimizer, images, targets, loss_fn, job.strategy, scaler,
                                  no_sync=getattr(network, "no_sync", None), on_output=score)
                totals.step_seconds.append(time.perf_counter() - step_start)
                totals.add(loss, sum(d for d, _ in micro) / len(micro), sum(a for _, a in micro) / len(micro),
                           len(images))
                bar.set_postfix(loss=f"{loss:.3f}", dice=f"{totals.dice / totals.batches:.3f}",
                                step=f"{totals.step_seconds[-1]:.2f}s")
            scheduler.step()
            train_loss, train_dice, train_accuracy = reduce_mean(list(totals.means()), process, device)
            epoch_seconds = time.perf_counter() - epoch_start
            if process.main:
                val_loss, val_dice, val_accuracy = (evaluate(model, val_loader, loss_fn, device, job.strategy)
                                                    if len(val_set) else (math.nan, math.nan, math.nan))
                step_s = sorted(totals.step_seconds)[len(totals.step_seconds) // 2]
                row = {"epoch": epoch + 1, "train_loss": train_loss, "train_dice": train_dice,
                       "train_accuracy": train_accuracy, "val_loss": val_loss, "val_dice": val_dice,
                       "val_accuracy": val_accuracy, "step_s": step_s,
                       "images_per_s": totals.images * process.world / sum(totals.step_seconds),
                       "peak_memory_bytes": peak_memory(device), "lr": scheduler.get_last_lr()[0],
                       "epoch_s": epoch_seconds}
                history.append(row)
                improved = not math.isnan(val_dice) and val_dice > best_dice
                best_dice = max(best_dice, val_dice) if improved else best_dice
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_dice": best_dice,
                         "history": history, "rng": torch.get_rng_state(), "config": config.to_json()}
                save_checkpoint(run_dir / "last.pt", state)
                if improved:
                    save_checkpoint(run_dir / "best.pt", state)
                write_metrics_csv(run_dir / "metrics.csv", history)
                for key in CSV_COLUMNS[1:]:
                    writer.add_scalar(key, row[key], epoch + 1)
                writer.flush()
                log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {train_loss:.4f}/{val_loss:.4f}  "
                    f"dice {train_dice:.3f}/{val_dice:.3f}  accuracy {train_accuracy:.4f}/{val_accuracy:.4f}  "
                    f"(train/val)  step {step_s:.2f}s  {row['images_per_s']:.2f} img/s  "
                    f"peak {format_bytes(row['peak_memory_bytes'])}{'  *best' if improved else ''}")
            if process.world > 1:
                dist.barrier()
        if writer:
            writer.close()
        if process.main and len(val_set):
            draw_validation_overlays(model, val_set, config, run_dir, device)
        return row
    finally:
        if process.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def draw_validation_overlays(model, val_set, config: TrainConfig, run_dir: Path, device: torch.device,
                             cases: int = 3) -> list[Path]:
    """Figure 7 for the first few validation cases (preprocessed space), as run_dir/overlay_<case>.png."""
    from fullres.figures import figure7_overlay
    from fullres.step import autocast

    model.eval()
    channel = 0  # the first input channel: FLAIR when the run uses MSD's order
    paths = []
    for index in range(min(cases, len(val_set))):
        image, target = val_set[index]
        with torch.no_grad(), autocast(config.job.strategy, device.type):
            logits = model(image[None].to(device)).float()[0].cpu()
        if config.data.target == "classes":
            truth, pred = target > 0, logits.argmax(0) > 0
        else:  # wt, or WT/TC/ET channels: the whole tumour is channel 0
            truth, pred = target[0] > 0.5, torch.sigmoid(logits[0]) > 0.5
        case = val_set.cases[index].case_id
        paths.append(figure7_overlay(image[channel].numpy(), truth.numpy(), pred.numpy(),
                                     run_dir / f"overlay_{case}.png", title=f"{case} (validation)"))
    return paths


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    """A new run never overwrites an old one; --resume needs one."""
    if resume:
        if not (run_dir / "config.json").exists():
            raise UserError(f"--resume: {run_dir} holds no run to resume (no config.json)")
        return
    if (run_dir / "last.pt").exists() or (run_dir / "config.json").exists():
        raise UserError(f"--out {run_dir} already holds a run: use --resume to continue it, or another --out")
    run_dir.mkdir(parents=True, exist_ok=True)


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    try:
        return TrainConfig.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{path}: not a readable fullres run configuration ({error})") from None


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def wait_for_dataset(folder: Path, timeout_s: float = 600.0) -> Path:
    """Under torchrun, ranks other than 0 wait for rank 0 to write the demo dataset."""
    deadline = time.monotonic() + timeout_s
    while not (folder / "dataset.json").exists():
        if time.monotonic() > deadline:
            raise UserError(f"{folder}: the synthetic dataset did not appear within {timeout_s:.0f} s")
        time.sleep(0.5)
    return folder
