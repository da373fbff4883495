"""`fullres train`: from a dataset and the job flags to a trained run folder.

    fullres train [DATA] --out RUN_DIR [job flags]            one process (CPU with oneDNN, or CUDA)
    torchrun --nproc-per-node N -m fullres train ...          DistributedDataParallel (gloo / NCCL)

:func:`run` is the command: it fills unset options from the preset (``paper`` with DATA, ``demo``
without), checks the data, runs the memory preflight (:func:`fullres.cost.plan.preflight`), picks the
memory format by measurement, writes RUN_DIR/config.json and calls :func:`train`, the epoch loop.

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
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from fullres.cost.plan import default_method, fastest_fitting, preflight, refuse_spatial, spatial_need
from fullres.cost.steptime import Variant, time_variant
from fullres.cost.timing import fake_step_flops, reference_kernel_flops
from fullres.data import load_dataset_json
from fullres.data.check import check_dataset
from fullres.data.layouts import BRATS
from fullres.data.msd import MSDDataset, fold_splits, resolve_channels, split_cases
from fullres.data.fingerprint import ct_statistics, resolve_spacing
from fullres.data.preprocess import DataConfig
from fullres.data.synth import write_dataset
from fullres.engine.losses import LOSSES, dice_coefficient, primary_output, voxel_accuracy
from fullres.engine.spatial import gather_rows, local_rows, mesh, reduce_gradients, space_of, sums_over
from fullres.data.augment import AugmentedDataset, EpochSampler
from fullres.errors import UserError
from fullres.evaluate.figures import figure7_overlay, training_curves
from fullres.evaluate.lesions import DEFAULT_CHALLENGE
from fullres.evaluate.metrics import evaluate_folders
from fullres.evaluate.metrics import write_metrics_csv as write_validation_csv
from fullres.files import atomic_write, write_json
from fullres.job.config import JobConfig, Strategy, TrainConfig, job_defaults
from fullres.job.step import autocast, build_training, to_device, train_step, use_space
from fullres.kernels.device import (
    Process,
    available_memory,
    configure_cpu,
    fast_bf16,
    is_main_process,
    peak_memory,
    pick_device,
    process_group,
)
from fullres.kernels.malloc import policy_line, prepare_pool_for, set_training_malloc_policy
from fullres.presets import DEMO_DATA
from fullres.run.checkpoint import (
    BEST,
    CONFIG_FILE,
    LAST,
    load_checkpoint,
    prepare_run_dir,
    read_run_config,
    remove_stale_temporaries,
    resolve_checkpoint,
    run_lock,
    save_checkpoint,
)
from fullres.run.predict import PredictInput, predict_files
from fullres.run.tracking import open_tracker
from fullres.run.trust import copy_factory_source, remember
from fullres.run.versions import versions
from fullres.terms import COLLECTIVE_TIMEOUT_S
from fullres.units import format_bytes

CSV_COLUMNS = ["epoch", "train_loss", "train_dice", "train_accuracy", "val_loss", "val_dice", "val_accuracy",
               "step_s", "images_per_s", "peak_memory_bytes", "lr", "epoch_s"]


# ---- the command ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainRequest:
    """What `fullres train` was asked: the run folder, the data, and every option, None where the
    command line left it to the preset. `make_job(options, in_channels, classes)` turns the job options
    into a JobConfig (the CLI's validation, so errors name its flags)."""

    out: Path
    data: Path | None
    options: dict  # job flags and training options by their CLI names (underscores), None = preset's
    make_job: Callable[[dict, int, int | None], JobConfig]
    strategy: str = "manual"  # manual | auto
    memory: int | None = None  # preflight budget in bytes (None: what is available)
    force: bool = False
    autotune: bool = True
    resume: bool = False
    progress: bool = True
    layout: str | None = None  # the dataset's layout (None: detected from the folder)
    spatial: int = 1  # processes sharing each sample (--spatial): a launch option, not part of the run's config
    timeout: float = COLLECTIVE_TIMEOUT_S  # seconds a collective waits for the other processes (--timeout)
    trust_code: bool = False  # --resume: build a network that is code the run names (fullres.run.trust)


def run(request: TrainRequest, log=print) -> dict:
    """`fullres train` (see the module docstring). Returns the last epoch's metrics row. Every check on the job
    and the data runs before the run folder is made (the demo's, which holds its synthetic data, is removed
    again on a refusal); the main process holds the run's lock (:func:`fullres.run.checkpoint.run_lock`) while it
    writes the run and trains."""
    run_dir = request.out
    main_process = is_main_process()
    if request.resume:
        prepare_run_dir(run_dir, resume=True)
        with run_lock(run_dir, new=False, log=log) if main_process else nullcontext():
            config = _resumed_config(request, read_run_config(run_dir, request.trust_code), main_process)
            if main_process and (stale := remove_stale_temporaries(run_dir)):
                log(f"removed {len(stale)} unfinished checkpoint write(s) of the interrupted run: "
                    + ", ".join(path.name for path in stale))
            last = train(config, run_dir, resume=True, progress=request.progress, log=log, spatial=request.spatial,
                         timeout_s=request.timeout)
    else:
        config = _new_run(request, main_process, log)
        with run_lock(run_dir, new=True, log=log) if main_process else nullcontext():
            if main_process:
                copy_factory_source(config.job.model, run_dir)
                remember(config.job.model)  # the user trains with this code: their runs of it open without a flag
                write_json(run_dir / CONFIG_FILE, config.to_json())
            last = train(config, run_dir, resume=False, progress=request.progress, log=log, spatial=request.spatial,
                         timeout_s=request.timeout)
    if main_process:
        tracked = {"tensorboard": ", tb/", "mlflow": ", MLflow run"}.get(config.tracker, "")
        log(f"done: validation Dice {last.get('val_dice', float('nan')):.3f} after {last.get('epoch', 0)} epochs; "
            f"run in {run_dir}/ (config.json, splits.json, metrics.csv, last.pt, best.pt, "
            f"{'validation/, ' if (run_dir / VALIDATION_DIR / 'summary.json').exists() else ''}curves.png{tracked})")
    return last


VERSIONS_FILE = "versions.json"


def record_versions(run_dir: Path, resumed: bool) -> None:
    """RUN/versions.json: the fullres, torch, CUDA, oneDNN and Python that trained the run
    (:func:`fullres.run.versions.versions`), and those of each resume after it."""
    current = versions()
    recorded = {"trained_with": current, "resumed_with": []}
    if resumed:
        try:
            previous = json.loads((run_dir / VERSIONS_FILE).read_text())
            if isinstance(previous, dict) and isinstance(previous.get("resumed_with"), list):
                recorded = {"trained_with": previous.get("trained_with"), "resumed_with": previous["resumed_with"]}
        except (OSError, ValueError, RecursionError):
            recorded = {"trained_with": None, "resumed_with": []}  # a run from before versions were recorded
        recorded["resumed_with"].append(current)
    write_json(run_dir / VERSIONS_FILE, recorded)


def _run_values(config: TrainConfig) -> dict:
    """The run's value of each option `--resume` compares, by CLI name (channels as resolved indices)."""
    job = config.job
    return {"model": job.model.architecture, "model_args": job.model.args,
            "shape": tuple(job.shape), "target": config.data.target, "filters": job.model.filters, "batch": job.batch,
            "dropout": job.model.dropout, "norm": job.model.norm, "lr": config.lr, "loss": config.loss,
            "schedule": config.schedule, "seed": config.seed, "val_fraction": config.val_fraction,
            "device": config.device, "threads": config.threads, "workers": config.workers, "tracker": config.tracker,
            "augment": config.augment, "folds": config.folds or None, "fold": config.fold if config.folds else None,
            "crop": config.data.crop,
            **{spec.name: getattr(job.strategy, spec.name) for spec in fields(Strategy)}}


def _resumed_config(request: TrainRequest, config: TrainConfig, main_process: bool) -> TrainConfig:
    """The run's own configuration. A flag given with --resume must agree with it, except --epochs above
    the run's, which extends the run (the new total is written to config.json)."""
    given = {name: value for name, value in request.options.items() if value is not None}
    if request.layout is not None and request.layout != config.layout:
        raise UserError(f"--resume: --layout {request.layout} differs from the run's {config.layout}")
    if request.data is not None and request.data.absolute() != Path(config.data_dir):
        raise UserError(f"--resume: DATA {request.data} differs from the run's {config.data_dir}; "
                        "a resumed run trains on its own data")
    if "channels" in given:
        index = load_dataset_json(Path(config.data_dir), config.layout)
        if resolve_channels(given.pop("channels"), index.modalities) != tuple(config.data.channels):
            raise UserError(f"--resume: --channels differs from the run's channels {list(config.data.channels)}")
    if "spacing" in given:
        spacing = resolve_spacing(given.pop("spacing"), load_dataset_json(Path(config.data_dir), config.layout))
        if spacing != config.data.spacing:
            raise UserError(f"--resume: --spacing {spacing or 'none'} differs from the run's "
                            f"{config.data.spacing or 'none'} (config.json); resume without it, or start a new run")
    values = _run_values(config)
    if given.get("model_args"):
        try:
            given["model_args"] = json.dumps(json.loads(given["model_args"]), sort_keys=True)
        except ValueError:
            pass  # not JSON: it differs from the run's, and is refused below
    for name, value in given.items():
        if name in values and (tuple(value) if name == "shape" else value) != values[name]:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--resume: {flag} {' '.join(map(str, value)) if name == 'shape' else value} differs "
                            f"from the run's {values[name]} (config.json); resume without it, or start a new run")
    refuse_spatial(config.job, request.spatial, int(os.environ.get("WORLD_SIZE", "1")))  # any S the job splits into
    epochs = given.get("epochs", config.epochs)
    if epochs < config.epochs:
        raise UserError(f"--resume: --epochs {epochs} is fewer than the run's {config.epochs}; a run can be extended, "
                        "not shortened")
    if epochs > config.epochs:
        config = replace(config, epochs=epochs)
        if main_process:
            write_json(request.out / CONFIG_FILE, config.to_json())
    return config


def lr_schedule(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate factor after `epoch` epochs: constant 1, or the cosine from 1 to 0 over the run's
    epochs (closed form, so a run extended to more epochs follows the longer cosine from where it is)."""
    if config.schedule == "constant":
        return lambda epoch: 1.0
    return lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, config.epochs) / config.epochs))


def _new_run(request: TrainRequest, main_process: bool, log) -> TrainConfig:
    """The configuration of a new run, every check passed; nothing is written (the run is written under its
    lock, by :func:`run`) but the demo's synthetic dataset, inside a RUN_DIR this command makes and removes
    again when the job is refused."""
    run_dir = request.out
    if main_process:
        prepare_run_dir(run_dir, resume=False)
    demo = main_process and request.data is None
    folder_made, data_made = demo and not run_dir.exists(), demo and not (run_dir / "synthetic_data").exists()
    try:
        return _configure_new_run(request, main_process, log)
    except BaseException:
        if folder_made:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif data_made:  # an empty --out given by the user stays, empty again
            shutil.rmtree(run_dir / "synthetic_data", ignore_errors=True)
        raise


def _configure_new_run(request: TrainRequest, main_process: bool, log) -> TrainConfig:
    run_dir = request.out
    defaults = job_defaults(request.options.get("model") or "unet3d", demo=request.data is None)
    options = {name: defaults[name] if value is None and name in defaults else value
               for name, value in request.options.items()}
    if request.data is None:  # the embedded default: a synthetic dataset and a job sized for 2 CPU cores
        data_dir = (demo_dataset(run_dir, request.progress) if main_process
                    else wait_for_dataset(run_dir / "synthetic_data"))
    else:
        data_dir = request.data.absolute()
    refuse_bad_data(data_dir, request.layout)
    index = load_dataset_json(data_dir, request.layout)
    channels = resolve_channels(options["channels"], index.modalities)
    spacing_spec = options.get("spacing") or defaults["spacing"]
    spacing = resolve_spacing([spacing_spec] if isinstance(spacing_spec, str) else spacing_spec, index)
    classes = len(index.labels) if options["target"] == "classes" else None
    job = request.make_job(options, len(channels), classes)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    refuse_spatial(job, request.spatial, world)
    if request.spatial > 1 and request.strategy == "auto":
        raise UserError(f"--spatial {request.spatial}: give the strategy (--strategy auto does not plan per process yet)")
    folds, fold = options.get("folds") or 0, options.get("fold") or 0
    if folds:
        train_cases = len(fold_splits([case.case_id for case in index.training], folds, options["seed"])[fold]["train"])
    else:
        train_cases = len(split_cases(index.training, options["val_fraction"], options["seed"])[0])
    global_batch = job.effective_batch * (world // request.spatial)
    if train_cases < global_batch:
        raise UserError(f"{train_cases} training cases are fewer than one global batch of {global_batch} "
                        f"(--batch {job.batch} x --accumulate {job.strategy.accumulate} x "
                        f"{world // request.spatial} data-parallel process(es)): a smaller --batch, or more cases")
    device = pick_device(options["device"], Process())
    prepare_pool_for(job.strategy, device.type, either_layout=request.autotune)  # before the dry runs: they model it
    if not request.force:
        budget = request.memory or available_memory(device)
        method = default_method()
        if request.strategy == "auto":  # the fastest exact strategy that fits, by estimated step time
            if device.type == "cpu":
                configure_cpu(options["threads"], Process())  # its calibration runs with the run's threads
            job, needed, chosen = fastest_fitting(job, budget, method, allow_bf16=fast_bf16(device), device=device.type)
        elif request.spatial > 1:  # what one process holds: its shard of every level, and its halos
            needed, chosen = spatial_need(job, request.spatial, method, device.type), "as given"
            if needed > budget:
                raise UserError(f"the job does not fit: one of {request.spatial} processes sharing each sample needs "
                                f"{format_bytes(needed)} of the {format_bytes(budget)} available ({method} estimate); "
                                "more processes per sample (see `fullres plan`), or --force", exit_code=3)
        else:
            job, needed, chosen = preflight(job, budget, method, auto=False, device=device.type)
        if main_process:
            log(f"preflight ({method}): needs {format_bytes(needed)}{' per process' if request.spatial > 1 else ''} "
                f"of {format_bytes(budget)} available"
                + (f"; --strategy auto chose: {chosen}" if request.strategy == "auto" else ""))
    if request.autotune and request.spatial == 1:  # its trial steps run the whole volume in one process
        total_steps = options["epochs"] * (train_cases // (job.effective_batch * int(os.environ.get("WORLD_SIZE", "1"))))
        chosen, choice = choose_memory_format(job, device, total_steps)
        if chosen != job and not request.force:
            # the preflight judged the other layout (and its allocator): check the one that will run
            try:
                _, needed, _ = preflight(chosen, budget, method, auto=False, device=device.type)
            except UserError:
                chosen, choice = job, choice + f"; kept {'channels-last' if job.strategy.channels_last else 'contiguous'}: the faster one does not fit"
            else:
                choice += f"; preflight ({method}): needs {format_bytes(needed)}"
        job = chosen
        if main_process:
            log(choice)
    if main_process and (warning := reference_kernel_warning(job, device)):
        log(warning)
    ct = ct_statistics(index, channels)  # read every training case: only where a used channel is CT
    if main_process and (spacing is not None or ct):
        log("preprocessing: " + "; ".join(
            ([f"resampled to {' x '.join(f'{s:g}' for s in spacing)} mm"] if spacing is not None else [])
            + [f"{index.modalities[c]} clipped to [{stats[0]:g}, {stats[1]:g}], mean {stats[2]:g}, std {stats[3]:g}"
               for c, stats in zip(channels, ct) if stats is not None]))
    try:
        config = TrainConfig(
            job=job, data=DataConfig(channels=channels, target=options["target"], shape=tuple(options["shape"]),
                                     spacing=spacing, ct=ct, crop=options.get("crop") or defaults["crop"]),
            data_dir=str(data_dir), epochs=options["epochs"], lr=options["lr"], loss=options["loss"],
            seed=options["seed"], val_fraction=options["val_fraction"], device=options["device"],
            threads=options["threads"], workers=options["workers"], schedule=options["schedule"],
            strategy_choice="auto" if request.strategy == "auto" and not request.force else "manual",
            layout=index.layout, tracker=options.get("tracker") or "tensorboard",
            augment=options.get("augment") or defaults["augment"], folds=folds, fold=fold)
    except ValueError as error:
        raise UserError(str(error)) from None
    return config


# ---- kernels ------------------------------------------------------------------------------------

AUTOTUNE_MIN_STEPS = 100  # below this, timing 2 x 2 trial steps would cost more than it could save


def reference_kernel_warning(job: JobConfig, device: torch.device) -> str | None:
    """A line when oneDNN would compute some of `job`'s weight gradients with its reference kernel on this CPU
    (channels-last fp32: without AVX-512 past its 1 GiB GEMM scratchpad, with it on maps of 2 GiB or more; ~1000x
    slower), else None."""
    if device.type != "cpu" or not job.strategy.channels_last or job.strategy.precision != "fp32":
        return None

    slow = reference_kernel_flops(job)
    if not slow:
        return None
    return (f"warning: oneDNN runs {slow / 1e12:.2f} of this step's {fake_step_flops(job) / 1e12:.2f} TFLOP (weight "
            "gradients too large for its fast kernels) on its reference kernel here, ~1000x slower; "
            "--slabs, the contiguous layout or --strategy auto avoid it")


def choose_memory_format(job: JobConfig, device: torch.device, total_steps: int) -> tuple[JobConfig, str]:
    """Channels-last only where it is measured faster, for this job on this machine: one warm-up and one
    timed step of each memory format on a throwaway model (the run's own model and RNG are untouched).
    The choice changes speed, never the numerics. Returns the job and a line saying what was chosen."""
    if job.strategy.channels_last:
        return job, "memory format: channels-last (asked for)"
    if total_steps < AUTOTUNE_MIN_STEPS:
        return job, f"memory format: contiguous (run of {total_steps} steps too short to measure the alternative)"
    if reference_kernel_warning(job.with_(strategy=replace(job.strategy, channels_last=True)), device):
        return job, "memory format: contiguous (channels-last would run weight gradients on oneDNN's reference kernel here)"
    seconds = {}
    for channels_last in (False, True):
        variant = Variant("autotune", job.strategy.precision, onednn=True, channels_last=channels_last, compiled=False)
        # peak_tflops given so that no matmul peak is measured: only the step time is wanted here
        seconds[channels_last] = time_variant(job, variant, warmup=1, repeats=1, device=device,
                                              peak_tflops=math.inf)["step_s"]
    faster = seconds[True] < seconds[False]
    chosen = job.with_(strategy=replace(job.strategy, channels_last=faster))
    return chosen, (f"memory format: {'channels-last' if faster else 'contiguous'} (measured "
                    f"{seconds[False]:.2f} s/step contiguous, {seconds[True]:.2f} s/step channels-last)")


# ---- checkpoints --------------------------------------------------------------------------------

def write_metrics_csv(path: Path, history: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path) as file:
        file.write(text.getvalue().encode())


# ---- data ---------------------------------------------------------------------------------------

def demo_dataset(run_dir: Path, progress: bool) -> Path:
    """The embedded default: a synthetic MSD dataset inside the run folder (written once)."""
    folder = run_dir / "synthetic_data"
    if not (folder / "dataset.json").exists():
        write_dataset(folder, progress=progress, **DEMO_DATA)
    return folder


def refuse_bad_data(data_dir: Path, layout: str | None = None) -> None:
    report = check_dataset(data_dir, layout=layout)
    if not report.ok:
        first = report.problems[0].line() if report.problems else report.lines()[0]
        more = len(report.problems) - 1
        raise UserError(f"the dataset has problems; fix them first: {first}"
                        + (f" (and {more} more: `fullres check {data_dir}` lists them)" if more > 0 else ""),
                        exit_code=1)


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


def evaluate(model, loader, loss_fn, device, strategy: Strategy, space=None) -> tuple[float, float, float]:
    """Mean loss, Dice and voxel accuracy of `model` over `loader`. With `space` (spatial parallelism), every
    process of the group calls this at once and computes its rows; the sums run over the group."""
    totals = EpochTotals()
    model.eval()
    with torch.no_grad():
        for images, targets in loader:
            if space is not None:
                images, targets = local_rows(images, space), local_rows(targets, space)
            images, targets = to_device(images, device, strategy), targets.to(device)
            with autocast(strategy, device.type):
                logits = primary_output(model(images)).float()
            with sums_over(space):
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
          log=print, spatial: int = 1, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> dict:
    """Train per `config` into `run_dir`. Returns the last epoch's metrics row. `spatial` = S: under torchrun,
    each S consecutive processes share every sample, each holding its rows of every level
    (:mod:`fullres.engine.spatial`); the processes / S groups are data-parallel. A process that loses the others
    (one died, or waited `timeout_s` seconds in a collective) raises a UserError naming its rank."""
    device_type = "cuda" if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()) else "cpu"
    hint = f"; after a fix, continue from the last checkpoint with --out {run_dir} --resume"
    with process_group(device_type, timeout_s, hint) as process:
        return _train(config, run_dir, process, resume, progress, log, spatial)


def _train(config: TrainConfig, run_dir: Path, process: Process, resume: bool, progress: bool, log,
           spatial: int) -> dict:
    from tqdm import tqdm

    device = pick_device(config.device, process)
    if device.type == "cpu":
        settings = configure_cpu(config.threads, process)
        if process.main:
            log(settings)
    job = config.job
    space, data_rank, data_size = None, process.rank, process.world
    if spatial > 1:
        space, data_rank, data_size = _spatial_group(job, spatial, process, device)
    if process.main:
        processes = f"{process.world} process(es)"
        if space is not None:
            processes += f": {data_size} x {spatial} sharing each sample"
        log(f"job: {job.describe()} (global batch {job.effective_batch * data_size}, {processes}, {device})")
        if config.augment != "none":
            log(f"augmentation: {config.augment} (MONAI, in the data workers; seeded by seed, epoch and case)")
        if config.data.crop == "foreground":
            log("training windows: random, a third centred on a foreground voxel (where an image is larger than "
                "--shape)")

    set_training_malloc_policy(job.strategy, device=device.type)
    allocator_line = policy_line(job.strategy, device.type)
    if allocator_line and process.main:
        log(allocator_line)
    torch.manual_seed(config.seed)
    training = build_training(job, device, lr=config.lr)
    model, optimizer, scaler = training.model, training.optimizer, training.scaler
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(config))
    start_epoch, best_dice, history = 0, -1.0, []
    if resume and (run_dir / LAST).exists():  # killed before the first checkpoint: start over
        state = load_checkpoint(run_dir / LAST)
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, best_dice, history = state["epoch"], state["best_dice"], state["history"]
        except (KeyError, TypeError, ValueError, RuntimeError) as error:  # another run's, or another network's
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            raise UserError(f"{run_dir / LAST}: does not fit the run's configuration in config.json ({detail})") from None
        if process.main:
            log(f"resuming after epoch {start_epoch} of {config.epochs} from {run_dir / 'last.pt'}")
    index = load_dataset_json(Path(config.data_dir), config.layout)
    splits = run_splits(config, index)
    record_splits(run_dir, splits, config, write=process.main)  # every process refuses a changed split alike
    if process.main:  # once the run's state and split are accepted: a refused resume changes nothing
        record_versions(run_dir, resumed=start_epoch > 0)
    network = model
    if space is not None:
        use_space(model, space)  # its forward computes this process's rows; gradients summed in before_update
    elif process.world > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    by_id = {case.case_id: case for case in index.training}
    split = splits[config.fold]
    train_cases, val_cases = [by_id[c] for c in split["train"]], [by_id[c] for c in split["val"]]
    train_set = MSDDataset.from_index(index, config.data, train_cases)
    val_set = MSDDataset.from_index(index, replace(config.data, crop="center"), val_cases)  # the job's shape
    global_batch = job.effective_batch * data_size
    if len(train_set) < global_batch:
        raise UserError(f"{len(train_set)} training cases are fewer than one global batch of {global_batch}")
    # One sampler for any number of processes: the same seeded permutation, dealt out by rank, so
    # N processes with batch b see exactly the samples one process with batch N x b sees.
    sampler = DistributedSampler(train_set, num_replicas=data_size, rank=data_rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    if config.augment != "none" or config.data.crop == "foreground":
        # each sample's window and augmentation: a function of (seed, epoch, case index) alone
        train_set = AugmentedDataset(train_set, config.augment, config.seed, window=tuple(job.shape))
        sampler = EpochSampler(sampler)
    loader = DataLoader(train_set, batch_size=job.effective_batch, sampler=sampler, drop_last=True,
                        num_workers=config.workers, pin_memory=device.type == "cuda",
                        persistent_workers=config.workers > 0)
    val_loader = DataLoader(val_set, batch_size=1, num_workers=0)
    loss_fn = LOSSES[config.loss]
    before_update = (lambda: reduce_gradients(model.parameters(), data_size=data_size)) if space else None

    tracker = open_tracker(config.tracker, run_dir, config.to_json(), start_epoch) if process.main else None
    row: dict[str, Any] = history[-1] if history else {}
    for epoch in range(start_epoch, config.epochs):
        # The epoch's randomness (dropout; the sampler's order; augmentation) is a function of (seed, epoch) alone,
        # so a run resumed after a crash repeats exactly what the uninterrupted run would have done.
        # The loader's iterator is made first: a new one draws its workers' seed from the global RNG
        # and a persistent one, reset, does not, so a resumed run would otherwise shift dropout's stream.
        sampler.set_epoch(epoch)
        batches = iter(loader)
        torch.manual_seed(config.seed * 100_003 + epoch)
        totals = EpochTotals()
        epoch_start = time.perf_counter()
        bar = tqdm(batches, total=len(loader), desc=f"epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not (progress and process.main), dynamic_ncols=True)
        for images, targets in bar:
            step_start = time.perf_counter()
            if space is not None:
                images, targets = local_rows(images, space), local_rows(targets, space)
            images, targets = to_device(images, device, job.strategy), targets.to(device)
            micro = []  # (dice, accuracy) of each micro-batch, weighted equally: equal sizes

            def score(logits, micro_targets):
                with sums_over(space):
                    micro.append((float(dice_coefficient(logits, micro_targets)),
                                  float(voxel_accuracy(logits, micro_targets))))

            with sums_over(space):
                loss = train_step(network, optimizer, images, targets, loss_fn, job.strategy, scaler,
                                  no_sync=getattr(network, "no_sync", None), on_output=score,
                                  before_update=before_update)
            totals.step_seconds.append(time.perf_counter() - step_start)
            if not math.isfinite(loss):  # the weights are spoilt from here on; the last checkpoint is not
                kept = f"{run_dir / LAST} is as it was after epoch {epoch}" if epoch else "no checkpoint was written"
                raise UserError(f"epoch {epoch + 1}, step {totals.batches + 1}: the loss is {loss} (not finite): "
                                f"training stopped; {kept} (a lower --lr, or check the data)", exit_code=1)
            totals.add(loss, sum(d for d, _ in micro) / len(micro), sum(a for _, a in micro) / len(micro),
                       len(images))
            bar.set_postfix(loss=f"{loss:.3f}", dice=f"{totals.dice / totals.batches:.3f}",
                            step=f"{totals.step_seconds[-1]:.2f}s")
        scheduler.step()
        train_loss, train_dice, train_accuracy = reduce_mean(list(totals.means()), process, device)
        epoch_seconds = time.perf_counter() - epoch_start
        validated = (math.nan, math.nan, math.nan)
        if len(val_set) and (process.main or space is not None):  # shared volumes: every space group validates
            validated = evaluate(model, val_loader, loss_fn, device, job.strategy, space)
        if process.main:
            val_loss, val_dice, val_accuracy = validated
            step_s = sorted(totals.step_seconds)[len(totals.step_seconds) // 2]
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_dice": train_dice,
                   "train_accuracy": train_accuracy, "val_loss": val_loss, "val_dice": val_dice,
                   "val_accuracy": val_accuracy, "step_s": step_s,
                   "images_per_s": totals.images * data_size / sum(totals.step_seconds),
                   "peak_memory_bytes": peak_memory(device), "lr": scheduler.get_last_lr()[0],
                   "epoch_s": epoch_seconds}
            history.append(row)
            improved = not math.isnan(val_dice) and val_dice > best_dice
            best_dice = max(best_dice, val_dice) if improved else best_dice
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "best_dice": best_dice,
                     "history": history, "rng": torch.get_rng_state(), "config": config.to_json()}
            save_checkpoint(run_dir / LAST, state)
            if improved:
                save_checkpoint(run_dir / BEST, state)
            write_metrics_csv(run_dir / "metrics.csv", history)
            tracker.log_epoch(row, epoch + 1)
            log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {train_loss:.4f}/{val_loss:.4f}  "
                f"dice {train_dice:.3f}/{val_dice:.3f}  accuracy {train_accuracy:.4f}/{val_accuracy:.4f}  "
                f"(train/val)  step {step_s:.2f}s  {row['images_per_s']:.2f} img/s  "
                f"peak {format_bytes(row['peak_memory_bytes'])}{'  *best' if improved else ''}")
        if process.world > 1:
            dist.barrier()
    if len(val_set) and (process.main or space is not None):
        draw_validation_overlays(model, val_set, config, run_dir, device, space=space, draw=process.main)
    if len(val_set) and process.main:
        try:
            validate_run(config, run_dir, index, val_cases, device, log, progress)
        except UserError as error:  # the trained run stands; `fullres predict` and `evaluate` can redo this
            log(f"warning: validation summary not written: {error}")
    if process.world > 1:
        dist.barrier()  # the others wait while the main process predicts and scores the validation cases
    if tracker is not None:
        training_curves(run_dir / "metrics.csv", run_dir / "curves.png")
        tracker.finish([run_dir / CONFIG_FILE, run_dir / "metrics.csv", run_dir / "curves.png",
                        *sorted(run_dir.glob("overlay_*.png"))])
    return row


SPLITS_FILE = "splits.json"
VALIDATION_DIR = "validation"


def run_splits(config: TrainConfig, index) -> list[dict[str, list[str]]]:
    """The run's splits, nnU-Net style [{"train": [case ids], "val": [case ids]}, ...]: its K folds
    (:func:`fullres.data.msd.fold_splits`), or with folds 0 the one seeded split by val_fraction."""
    if config.folds:
        return fold_splits([case.case_id for case in index.training], config.folds, config.seed)
    train_cases, val_cases = split_cases(index.training, config.val_fraction, config.seed)
    return [{"train": [case.case_id for case in train_cases], "val": [case.case_id for case in val_cases]}]


def record_splits(run_dir: Path, splits: list[dict], config: TrainConfig, write: bool = True) -> None:
    """RUN/splits.json: written (if `write`) when missing (a new run, or one from before splits were
    recorded); when present it must equal `splits`, else UserError (the dataset's cases changed since the
    run started)."""
    path = run_dir / SPLITS_FILE
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as error:
            raise UserError(f"{path}: unreadable ({error}); it records the run's split") from None
        if recorded != splits:
            raise UserError(f"{path}: the split of {config.data_dir} differs from the one this run trained with "
                            "(its training cases changed); restore the dataset, or start a new run")
        return
    if write:
        write_json(path, splits)


def validate_run(config: TrainConfig, run_dir: Path, index, val_cases: list, device: torch.device, log=print,
                 progress: bool = False) -> dict:
    """The run's validation cases predicted with its best checkpoint (as `fullres predict` would, every voxel,
    in the dataset's layout) into RUN/validation/, scored against their labels (Dice, NSD, HD95 per region;
    lesion-wise too for BraTS folders) into RUN/validation/summary.json: the split, the checkpoint, each
    case's scores and the mean and std over the cases. Returns that summary."""
    out = run_dir / VALIDATION_DIR
    selected = [PredictInput(case.case_id, case.image, index) for case in val_cases]
    # trust_code: this process trained the network, so its code is the user's own
    predict_files(run_dir, [], out, device, progress=progress, log=log, overwrite=True, trust_code=True,
                  selected=selected)
    lesion_rule = DEFAULT_CHALLENGE if index.layout in BRATS else None
    result = evaluate_folders(out, {case.case_id: Path(case.label) for case in val_cases}, regions=index.regions,
                              pred_is_binary_wt=config.data.target == "wt", lesion_rule=lesion_rule)
    summary = {"folds": config.folds, "fold": config.fold, "checkpoint": str(resolve_checkpoint(run_dir).name),
               "layout": index.layout, "regions": {name: list(values) for name, values in index.regions.items()},
               "lesion_wise": lesion_rule, "cases": result["cases"],
               "mean": {region: {metric: values["mean"] for metric, values in metrics.items()}
                        for region, metrics in result["summary"].items()},
               "std": {region: {metric: values["std"] for metric, values in metrics.items()}
                       for region, metrics in result["summary"].items()}}
    write_json(out / "summary.json", summary)
    write_validation_csv(result, out / "metrics.csv")
    log(f"validation: {len(val_cases)} case(s) predicted into {out}/, mean Dice "
        + ", ".join(f"{region} {metrics['dice']:.3f}" for region, metrics in summary["mean"].items())
        + " (summary.json)")
    return summary


def _spatial_group(job: JobConfig, spatial: int, process: Process, device: torch.device):
    """(this process's Space, its data-parallel rank, the data-parallel size) on a data x space mesh."""
    refuse_spatial(job, spatial, process.world)
    device_mesh = mesh(spatial, device.type)
    return space_of(device_mesh, job.shape[0]), device_mesh.get_local_rank("data"), device_mesh.size(0)


def draw_validation_overlays(model, val_set, config: TrainConfig, run_dir: Path, device: torch.device,
                             cases: int = 3, space=None, draw: bool = True) -> list[Path]:
    """Figure 7 for the first few validation cases (preprocessed space), as run_dir/overlay_<case>.png. With
    `space`, every process of the group computes its rows (all call this at once) and the group's first
    process, if `draw`, draws."""
    model.eval()
    channel = 0  # the first input channel: FLAIR when the run uses MSD's order
    paths = []
    for index in range(min(cases, len(val_set))):
        image, target = val_set[index]
        x = image[None] if space is None else local_rows(image[None], space)
        with torch.no_grad(), autocast(config.job.strategy, device.type):
            logits = primary_output(model(to_device(x, device, config.job.strategy))).float()
        if space is not None and (logits := gather_rows(logits, space)) is None:
            continue
        logits = logits[0].cpu()
        if not draw:
            continue
        if config.data.target == "classes":
            truth, pred = target > 0, logits.argmax(0) > 0
        else:  # wt, or WT/TC/ET channels: the whole tumour is channel 0
            truth, pred = target[0] > 0.5, torch.sigmoid(logits[0]) > 0.5
        case = val_set.cases[index].case_id
        paths.append(figure7_overlay(image[channel].numpy(), truth.numpy(), pred.numpy(),
                                     run_dir / f"overlay_{case}.png", title=f"{case} (validation)"))
    return paths


def wait_for_dataset(folder: Path, timeout_s: float = 600.0) -> Path:
    """Under torchrun, ranks other than 0 wait for rank 0 to write the demo dataset."""
    deadline = time.monotonic() + timeout_s
    while not (folder / "dataset.json").exists():
        if time.monotonic() > deadline:
            raise UserError(f"{folder}: the synthetic dataset did not appear within {timeout_s:.0f} s")
        time.sleep(0.5)
    return folder
