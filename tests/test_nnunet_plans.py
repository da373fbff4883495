"""`fullres nnunet plan` (fullres.nnunet.plans) against nnU-Net v2 itself: a synthetic dataset taken through
nnU-Net's own fingerprinting, planning and preprocessing on CPU; the written plans loaded by nnU-Net's
PlansManager, its network built by nnU-Net's get_network_from_plans and its trainer initialised from them.

The nnU-Net steps run in fresh processes: nnunetv2 reads nnUNet_raw / nnUNet_preprocessed / nnUNet_results
once, when it is imported. The dataset: 3 BraTS-like cases of 24^3, which nnU-Net plans as a 3-stage
PlainConvUNet with a 24x20x20 patch at batch 2; each dry run takes about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed: pip install nnunetv2 with torch pinned "
                                       "(docs/nnunet.md#install)")

from fullres.errors import UserError  # noqa: E402
from fullres.nnunet.plans import fit_plans, read_network  # noqa: E402

DATASET = "Dataset901_Synth"
GB = 10**9

# nnU-Net's plan-and-preprocess through its Python API (what nnUNetv2_plan_and_preprocess -d 901 -c 3d_fullres
# --verify_dataset_integrity runs), one process each. Only change: the fingerprint samples 10^5 foreground
# voxels for its intensity statistics instead of 10^8 (40 s on 2 cores); patch and batch do not depend on them.
PLAN_AND_PREPROCESS = textwrap.dedent("""
    import os
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments, preprocess
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    if __name__ == "__main__":
        verify_dataset_integrity(os.path.join(os.environ["nnUNet_raw"], "{dataset}"), 1)
        extractor = DatasetFingerprintExtractor(901, 1, verbose=False)
        extractor.num_foreground_voxels_for_intensitystats = 10**5
        extractor.run(overwrite_existing=True)
        plan_experiments([901])
        preprocess([901], configurations=("3d_fullres",), num_processes=(1,))
""").format(dataset=DATASET)

# What nnUNetv2_train DATASET 3d_fullres 0 -p PLANS builds before its first epoch, on CPU.
TRAINER = textwrap.dedent("""
    import json, sys, torch
    from nnunetv2.run.run_training import get_trainer_from_args

    trainer = get_trainer_from_args("901", "3d_fullres", 0, "nnUNetTrainer", sys.argv[1], device=torch.device("cpu"))
    trainer.initialize()
    print("RESULT " + json.dumps({
        "patch_size": list(trainer.configuration_manager.patch_size), "batch_size": trainer.batch_size,
        "deep_supervision": trainer.enable_deep_supervision, "optimizer": type(trainer.optimizer).__name__,
        "momentum": trainer.optimizer.defaults["momentum"], "nesterov": trainer.optimizer.defaults["nesterov"],
        "parameters": sum(p.numel() for p in trainer.network.parameters()),
        "data": trainer.preprocessed_dataset_folder}))
""")


def _nnunet(env: dict, code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def nnunet_env(tmp_path_factory) -> dict:
    """nnU-Net's three folders in a temporary place, the synthetic dataset planned and preprocessed by nnU-Net."""
    from fullres.data.synth import write_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "OMP_NUM_THREADS": "1"}
    write_dataset(root / "raw" / DATASET, train_cases=3, test_cases=0, shape=(24, 24, 24), seed=3, layout="nnunet",
                  progress=False)
    _nnunet(env, PLAN_AND_PREPROCESS)
    return env


@pytest.fixture(scope="module")
def source(nnunet_env) -> Path:
    return Path(nnunet_env["nnUNet_preprocessed"]) / DATASET / "nnUNetPlans.json"


@pytest.fixture(scope="module")
def peaks(source) -> dict:
    """The dry run's needs at the plan's own job and at the smallest patch (from a budget nothing fits)."""
    trials = []
    with pytest.raises(UserError) as refused:
        fit_plans(source, 10**6, progress=trials.append)
    assert trials[0].patch == read_network(source).patch and trials[0].batch == 2
    return {"plan": trials[0].needed_bytes, "smallest": trials[-1].needed_bytes, "smallest_patch": trials[-1].patch,
            "trials": trials, "refusal": str(refused.value)}


def _plans_manager(path: Path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(str(path))


def _nnunet_network(path: Path, configuration: str = "3d_fullres"):
    """The network nnU-Net builds from the plans at `path` (nnUNetTrainer.build_network_architecture)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    dataset = json.loads((path.parent / "dataset.json").read_text())
    config = _plans_manager(path).get_configuration(configuration)
    return get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                  config.network_arch_init_kwargs_req_import, len(dataset["channel_names"]),
                                  len(dataset["labels"]), allow_init=True, deep_supervision=True)


def _copy_dataset(source: Path, folder: Path, change_plans=None, change_dataset=None) -> Path:
    """The plans and dataset.json of `source`'s folder copied to `folder`, changed by the callbacks."""
    folder.mkdir(parents=True, exist_ok=True)
    plans = json.loads(source.read_text())
    dataset = json.loads((source.parent / "dataset.json").read_text())
    if change_plans:
        change_plans(plans)
    if change_dataset:
        change_dataset(dataset)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return folder / "nnUNetPlans.json"


def test_nnunet_plans_the_synthetic_dataset_as_expected(source):
    network = read_network(source)
    assert network.class_name == "PlainConvUNet" and network.family
    assert (network.in_channels, network.classes, network.cases) == (4, 4, 3)
    assert network.divisor == (4, 4, 4) and network.batch == 2
    assert all(size % 4 == 0 for size in network.patch)


def test_a_plan_that_fits_is_kept_and_nnunet_builds_and_trains_from_it(source, nnunet_env, peaks):
    result = fit_plans(source, GB)
    assert not result.changed and (result.patch, result.batch) == (read_network(source).patch, 2)
    assert result.plans_path == source.with_name("nnUNetPlans_fullres_1GB.json")
    assert result.peak_bytes == peaks["plan"]  # fp32 on CPU: no margin
    assert "5 % rule" in result.summary and "largest already" in result.summary
    # only plans_name differs from the source
    written, original = json.loads(result.plans_path.read_text()), json.loads(source.read_text())
    assert written.pop("plans_name") == "nnUNetPlans_fullres_1GB"
    original.pop("plans_name")
    assert written == original
    trainer = json.loads(_nnunet(nnunet_env, TRAINER, "nnUNetPlans_fullres_1GB").split("RESULT ", 1)[1])
    assert trainer["patch_size"] == list(result.patch) and trainer["batch_size"] == result.batch
    assert trainer["deep_supervision"] and trainer["optimizer"] == "SGD"
    assert (trainer["momentum"], trainer["nesterov"]) == (0.99, True)
    assert trainer["data"].endswith("nnUNetPlans_3d_fullres")  # the data nnU-Net preprocessed, reused
    from fullres.nnunet.plans import build_network
    assert trainer["parameters"] == sum(p.numel() for p in build_network(read_network(result.plans_path)).parameters())


def test_a_budget_the_plan_exceeds_shrinks_the_patch(source, peaks, tmp_path):
    budget = (peaks["plan"] + peaks["smallest"]) // 2
    result = fit_plans(source, budget, plans_name="nnUNetPlans_small")
    original = read_network(source).patch
    assert result.batch == 2 and result.needed_bytes <= budget
    assert result.patch != original and all(new <= old for new, old in zip(result.patch, original))
    assert all(size % 4 == 0 and size >= 8 for size in result.patch)
    # every patch tried before it, a step larger, did not fit
    shrinking = [t for t in result.trials if t.batch == 2]
    assert all(not t.fits for t in shrinking[:-1]) and shrinking[-1].fits and shrinking[-1].patch == result.patch
    assert "shrank the axis largest against the median image" in result.summary
    config = _plans_manager(result.plans_path).get_configuration("3d_fullres")
    assert tuple(config.patch_size) == result.patch and config.batch_size == 2
    assert _plans_manager(result.plans_path).plans_name == "nnUNetPlans_small"
    import torch

    outputs = _nnunet_network(result.plans_path)(torch.zeros(2, 4, *result.patch))
    assert [tuple(o.shape[2:]) for o in outputs][0] == result.patch and len(outputs) == 2  # deep supervision


def test_a_budget_below_the_smallest_patch_is_refused_in_one_line(source, peaks):
    message = peaks["refusal"]
    assert "\n" not in message and str(source) in message and "does not fit" in message
    assert "8x8x8" in message and peaks["smallest_patch"] == (8, 8, 8)
    with pytest.raises(UserError, match="does not fit"):
        fit_plans(source, peaks["smallest"] - 1, plans_name="nnUNetPlans_none")
    assert not source.with_name("nnUNetPlans_none.json").exists()


def test_a_shrunken_plan_grows_back_and_the_batch_fills_the_budget(source, peaks, tmp_path):
    """nnU-Net shrank the patch (a copy planned at 12x12x12) and the dataset has 2000 cases, so its 5 % rule
    allows batch 78 at 24x20x20: the patch grows back to the median image first, then the batch up to the
    budget."""
    def small_patch(plans):
        plans["configurations"]["3d_fullres"]["patch_size"] = [12, 12, 12]

    def many_cases(dataset):
        dataset["numTraining"] = 2000

    copy = _copy_dataset(source, tmp_path / DATASET, small_patch, many_cases)
    budget = peaks["plan"] + 3 * (peaks["plan"] - peaks["smallest"])
    result = fit_plans(copy, budget)
    assert result.original_patch == (12, 12, 12) and result.patch == read_network(source).patch
    assert 2 < result.batch < 78 and result.needed_bytes <= budget
    larger = [t for t in result.trials if t.patch == result.patch and t.batch == result.batch + 1]
    assert larger and not larger[0].fits and f"batch {result.batch}: {result.batch + 1} does not fit" in result.summary
    config = _plans_manager(result.plans_path).get_configuration("3d_fullres")
    assert (tuple(config.patch_size), config.batch_size) == (result.patch, result.batch)


def test_other_operations_and_anisotropic_strides_build_as_nnunet_builds_them(source, tmp_path):
    """BatchNorm3d, ReLU and strides 1x2x2 first: outside fullres's nnunet: family, built here from the
    allow-listed classes; nnU-Net's own construction gives the same parameters."""
    def custom(plans):
        kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        kwargs.update(norm_op="torch.nn.modules.batchnorm.BatchNorm3d", nonlin="torch.nn.ReLU",
                      strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], nonlin_kwargs={"inplace": True})
        plans["configurations"]["3d_fullres"]["patch_size"] = [22, 20, 20]

    copy = _copy_dataset(source, tmp_path / DATASET, custom)
    network = read_network(copy)
    assert not network.family and network.divisor == (2, 4, 4)
    result = fit_plans(copy, GB)
    assert result.patch[0] % 2 == 0 and result.patch[1] % 4 == 0 and result.patch[2] % 4 == 0
    assert any("constant" in note for note in result.modelled)  # the CPU runtime term of a network built here
    from fullres.nnunet.plans import build_network

    theirs, ours = _nnunet_network(result.plans_path), build_network(read_network(result.plans_path))
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert {type(m).__name__ for m in theirs.modules()} >= {"BatchNorm3d", "ReLU"}


def _changed(source: Path, tmp_path: Path, change) -> Path:
    def apply(plans):
        change(plans["configurations"]["3d_fullres"])
    return _copy_dataset(source, tmp_path / DATASET, apply)


def _arch(config: dict) -> dict:
    return config["architecture"]["arch_kwargs"]


BAD_PLANS = {
    "a class to import": (lambda c: _arch(c).update(nonlin="fullres_nnunet_evil.Boom"), "fullres imports nothing"),
    "a builtin": (lambda c: _arch(c).update(norm_op="builtins.eval"), "is not a torch.nn class fullres allows"),
    "another network": (lambda c: c["architecture"].update(network_class_name="fullres_nnunet_evil.Net"),
                        "is not nnU-Net's PlainConvUNet"),
    "an import not an op": (lambda c: c["architecture"]["_kw_requires_import"].append("conv_bias"),
                            "fullres takes class names only for"),
    "an unknown kwarg": (lambda c: _arch(c).update(no_such=1), "'no_such' is not a parameter of PlainConvUNet"),
    "a 2D patch": (lambda c: c.update(patch_size=[24, 20]), "is 2D"),
    "a patch of text": (lambda c: c.update(patch_size="24x20x20"), "patch_size must be a list of 3 whole numbers"),
    "a boolean batch": (lambda c: c.update(batch_size=True), "batch_size must be a whole number"),
    "an indivisible patch": (lambda c: c.update(patch_size=[24, 20, 18]), "not a multiple of the strides' product"),
    "kernels for 2 of 3 stages": (lambda c: _arch(c).update(kernel_sizes=[[3, 3, 3]] * 2),
                                  "cannot be built from its arch_kwargs"),
}


@pytest.mark.parametrize("case", BAD_PLANS)
def test_a_bad_plans_file_is_refused_in_one_line_without_importing(case, source, tmp_path):
    change, expected = BAD_PLANS[case]
    copy = _changed(source, tmp_path, change)
    with pytest.raises(UserError) as refused:
        fit_plans(copy, GB)
    message = str(refused.value)
    assert expected in message and str(copy) in message and "\n" not in message
    assert not any(name.startswith("fullres_nnunet_evil") for name in sys.modules)
    assert not copy.with_name("nnUNetPlans_fullres_1GB.json").exists()


def test_refusals_of_the_files_and_options(source, tmp_path):
    with pytest.raises(UserError, match="no configuration '3d_lowres'"):
        fit_plans(source, GB, configuration="3d_lowres")
    fit_plans(source, GB, plans_name="nnUNetPlans_again")
    with pytest.raises(UserError, match="exists: give --overwrite"):
        fit_plans(source, GB, plans_name="nnUNetPlans_again")
    assert fit_plans(source, GB, plans_name="nnUNetPlans_again", overwrite=True).plans_name == "nnUNetPlans_again"
    with pytest.raises(UserError, match="source plans' own name"):
        fit_plans(source, GB, plans_name="nnUNetPlans")
    with pytest.raises(UserError, match="--plans-name"):
        fit_plans(source, GB, plans_name="../escape")
    import torch

    if not torch.backends.cuda.is_built():
        with pytest.raises(UserError, match="built without CUDA"):
            fit_plans(source, GB, device="cuda")
    broken = tmp_path / "nnUNetPlans.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="not an nnU-Net plans file"):
        fit_plans(broken, GB)
    copy = _copy_dataset(source, tmp_path / "labels", change_dataset=lambda d: d.update(labels={"tumour": 1}))
    with pytest.raises(UserError, match="background"):
        fit_plans(copy, GB)


def test_output_channels_are_counted_as_nnunets_label_manager_counts_them(source, tmp_path):
    """Regions (BraTS's whole tumour, tumour core, enhancing tumour): one sigmoid channel per region."""
    def regions(dataset):
        dataset["labels"] = {"background": 0, "whole tumour": [1, 2, 3], "tumour core": [2, 3], "enhancing": [3]}
        dataset["regions_class_order"] = [1, 2, 3]

    copy = _copy_dataset(source, tmp_path / DATASET, change_dataset=regions)
    network = read_network(copy)
    dataset = json.loads((copy.parent / "dataset.json").read_text())
    assert network.region_based and network.classes == 3
    assert _plans_manager(copy).get_label_manager(dataset).num_segmentation_heads == network.classes
    assert _plans_manager(source).get_label_manager(json.loads((source.parent / "dataset.json").read_text())) \
        .num_segmentation_heads == read_network(source).classes == 4


def test_the_loss_modelled_has_the_peak_of_nnunets_own(source):
    """fullres's dice_bce stands in for nnU-Net's DC_and_CE_loss(MemoryEfficientSoftDiceLoss): the same peak."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    from fullres.job.config import JobConfig
    from fullres.cost.dryrun import dryrun
    from fullres.nnunet.plans import SGD, model_config

    network = read_network(source)
    nnunet_loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                                 weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    with model_config(network) as (config, _):
        job = JobConfig(model=config, shape=network.patch, batch=2)
        ours = dryrun(job, loss="dice_bce", optimizer=SGD, runtime=0, allocator="default")
        theirs = dryrun(job, loss=nnunet_loss, optimizer=SGD, runtime=0, allocator="default")
    assert ours.peak_bytes == theirs.peak_bytes
    assert ours.breakdown["optimizer_state"] <= ours.breakdown["parameters"]  # SGD: one buffer per parameter


def test_the_command_looks_up_the_dataset_and_prints_json(source, nnunet_env, monkeypatch, capsys):
    import argparse

    from fullres.cli import nnunet as nnunet_cli

    monkeypatch.setenv("nnUNet_preprocessed", nnunet_env["nnUNet_preprocessed"])
    parser = argparse.ArgumentParser(prog="fullres")
    nnunet_cli.add_arguments(parser.add_subparsers(dest="command").add_parser("nnunet"))
    args = parser.parse_args(["nnunet", "plan", "901", "--memory", "1GiB", "--device", "cpu", "--json"])
    assert args.run(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["plans"] == str(source.with_name("nnUNetPlans_fullres_1GiB.json"))
    assert printed["train"] == "nnUNetv2_train 901 3d_fullres 0 -p nnUNetPlans_fullres_1GiB"
    assert printed["fitted"] == printed["original"] and printed["changed"] is False
    args = parser.parse_args(["nnunet", "plan", str(source.parent), "--memory", "1GiB", "--device", "cpu"])
    with pytest.raises(UserError, match="exists"):
        args.run(args)
    args = parser.parse_args(["nnunet", "plan", "902", "--memory", "1GiB"])
    with pytest.raises(UserError, match="no dataset folder"):
        args.run(args)
