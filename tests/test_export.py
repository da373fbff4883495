"""Export (ONNX, OpenVINO IR) of a tiny run, predictions through the exported engines, and the inference
planner (whole volume -> slabs -> sliding windows, chosen by the dry run's inference peak)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fullres.run import predict as predict_module
from fullres.run.checkpoint import BEST, save_checkpoint
from fullres.job.config import JobConfig, Strategy, TrainConfig
from fullres.data.preprocess import DataConfig
from fullres.nets.registry import ModelConfig
from fullres.nets.unet3d import UNet3D

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
openvino = pytest.importorskip("openvino")

SHAPE = (32, 32, 24)  # the small_msd cases' shape: predict's preprocessing keeps it


def write_run(folder: Path, data_dir: Path, target: str = "wt", seed: int = 0, filters: int = 2) -> Path:
    """A run folder as `train` leaves it (best.pt with weights and config), without training: random weights
    are as good as trained ones for comparing engines, and take no time."""
    classes = 4 if target == "classes" else 3 if target == "regions" else 1
    job = JobConfig(model=ModelConfig(in_channels=4, filters=filters, classes=classes), shape=SHAPE, batch=1)
    config = TrainConfig(job=job, data=DataConfig(target=target, shape=SHAPE), data_dir=str(data_dir))
    torch.manual_seed(seed)
    model = UNet3D(job.model)
    with torch.no_grad():  # logits spread around 0, so that masks are neither empty nor full
        model.PredictionMask.weight.mul_(50)
        logits = model.eval()(torch.randn(1, 4, *SHAPE))
        model.PredictionMask.bias.sub_(logits.flatten(2).median(2).values[0])
    folder.mkdir(parents=True)
    save_checkpoint(folder / BEST, {"model": model.state_dict(), "config": config.to_json()})
    (folder / "config.json").write_text(json.dumps(config.to_json()))
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory, small_msd):
    return write_run(tmp_path_factory.mktemp("export") / "run", small_msd)


@pytest.fixture(scope="module")
def exported(run):
    """The run's own ONNX and OpenVINO exports, at the default paths."""
    from fullres.run.export import export_run

    return {fmt: export_run(run, fmt) for fmt in ("onnx", "openvino")}


def test_exports_are_written_inside_the_run_and_verified(run, exported):
    onnx_result, ov_result = exported["onnx"], exported["openvino"]
    assert onnx_result["path"] == str(run / "export" / "model.onnx")
    assert ov_result["files"] == [str(run / "export" / "model.xml"), str(run / "export" / "model.bin")]
    for result in exported.values():
        assert result["shape"] == list(SHAPE) and 0 <= result["max_abs_diff"] <= 1e-4
    model = onnx.load(str(run / "export" / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["fullres.in_channels"] == "4" and props["fullres.activation"] == "sigmoid"
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 4, *SHAPE]
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".")]  # no staging left behind


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_exported_output_equals_pytorch_on_a_random_input(run, exported, fmt):
    from fullres.run.export import load_run_network, open_engine

    network = load_run_network(run)
    x = torch.randn(1, 4, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = network.with_activation()(x).numpy()
    engine = open_engine(fmt, Path(exported[fmt]["path"]), network.config, network.checkpoint)
    got = engine(x.numpy())
    assert got.shape == expected.shape == (1, 1, *SHAPE)
    assert np.abs(got - expected).max() <= 1e-4
    assert 0.05 < (expected > 0.5).mean() < 0.95  # the comparison is not of constant outputs


def test_dynamic_softmax_export_runs_other_shapes(tmp_path, small_msd, cli):
    from fullres.run.export import load_run_network, open_engine

    run = write_run(tmp_path / "run", small_msd, target="classes", seed=1)
    code, out, err = cli("export", run, "--format", "onnx", "--dynamic", "--out", tmp_path / "dyn.onnx")
    assert code == 0, err
    assert "verified against PyTorch at 16 x 16 x 16" in out
    network = load_run_network(run)
    engine = open_engine("onnx", tmp_path / "dyn.onnx", network.config, network.checkpoint)
    assert engine.spatial_shape is None
    x = torch.randn(1, 4, 24, 16, 40)
    with torch.no_grad():
        expected = network.with_activation()(x).numpy()
    got = engine(x.numpy())
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-5)  # softmax over the 4 classes
    assert np.abs(got - expected).max() <= 1e-4
    code, _, err = cli("export", run, "--format", "onnx", "--shape", "16", "16", "16", "--out", tmp_path / "dyn.onnx",
                       "--overwrite")
    assert code == 0, err
    engine = open_engine("onnx", tmp_path / "dyn.onnx", network.config, network.checkpoint, run_shape=False)
    assert engine.spatial_shape == (16, 16, 16)


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
def test_predictions_through_engines_equal_the_torch_path(run, exported, small_msd, tmp_path, cli, fmt):
    code, out, err = cli("predict", run, small_msd, "--out", tmp_path / "torch", "--quiet", "--probabilities")
    assert code == 0, err
    code, out, err = cli("predict", run, small_msd, "--out", tmp_path / fmt, "--quiet", "--engine", fmt,
                         "--probabilities")
    assert code == 0, err
    assert f"{fmt} engine" in out
    masks = sorted((tmp_path / "torch").glob("*[0-9].nii.gz"))
    assert masks
    for mask in masks:
        reference = np.asarray(nib.load(mask).dataobj)
        through = nib.load(tmp_path / fmt / mask.name)
        np.testing.assert_array_equal(np.asarray(through.dataobj), reference)
        np.testing.assert_array_equal(through.affine, nib.load(mask).affine)
        assert 0 < reference.sum() < reference.size
        prob = mask.name.replace(".nii.gz", "_prob.nii.gz")
        np.testing.assert_allclose(nib.load(tmp_path / fmt / prob).get_fdata(),
                                   nib.load(tmp_path / "torch" / prob).get_fdata(), atol=1e-4)
    assert json.loads((tmp_path / fmt / "prediction.json").read_text())["engine"] == fmt


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_refusals_name_the_cause_and_write_nothing(run, exported, tmp_path, small_msd, cli):
    before = snapshot(run / "export")
    code, _, err = cli("export", run, "--format", "onnx")  # the run's export exists
    assert code == 2 and "model.onnx exists: pass --overwrite" in err and len(err.splitlines()) == 1
    code, _, err = cli("export", run, "--format", "openvino")
    assert code == 2 and "model.xml exists" in err
    code, _, err = cli("export", run, "--format", "tflite")
    assert code == 2 and "--format tflite: not an export format" in err
    code, _, err = cli("export", tmp_path / "nowhere", "--format", "onnx")
    assert code == 2 and "no such run folder or checkpoint" in err
    code, _, err = cli("export", run, "--format", "onnx", "--shape", "20", "16", "16", "--out", tmp_path / "x.onnx")
    assert code == 2 and "H=20 is not divisible by 8" in err and not (tmp_path / "x.onnx").exists()
    assert snapshot(run / "export") == before
    assert "Traceback" not in err


def test_a_checkpoint_of_another_network_is_refused(tmp_path, small_msd, cli):
    run = write_run(tmp_path / "run", small_msd)
    state = torch.load(run / BEST, weights_only=True)
    config = TrainConfig.from_json(state["config"])
    wider = JobConfig(model=ModelConfig(in_channels=4, filters=4), shape=SHAPE, batch=1)
    state["config"] = TrainConfig(job=wider, data=config.data, data_dir=config.data_dir).to_json()
    save_checkpoint(run / BEST, state)
    code, _, err = cli("export", run, "--format", "onnx")
    assert code == 2 and "weights do not fit the network its config describes" in err
    assert len(err.strip().splitlines()) == 1 and not (run / "export").exists()


def test_engine_files_of_another_run_or_shape_are_refused(run, exported, tmp_path, small_msd, cli):
    from fullres.run.export import export_run

    other = write_run(tmp_path / "other", small_msd, seed=4)
    code, _, err = cli("predict", other, small_msd, "--out", tmp_path / "p", "--engine", "onnx",
                       "--engine-file", exported["onnx"]["path"])
    assert code == 2 and "exported from another checkpoint" in err and not (tmp_path / "p").exists()
    export_run(other, "onnx", tmp_path / "small.onnx", shape=(16, 16, 16))
    code, _, err = cli("predict", other, small_msd, "--out", tmp_path / "p", "--engine", "onnx",
                       "--engine-file", tmp_path / "small.onnx")
    assert code == 2 and "takes 16x16x16 volumes, the run's images are 32x32x24" in err
    code, _, err = cli("predict", other, small_msd, "--out", tmp_path / "p", "--engine", "openvino")
    assert code == 2 and "model.xml: no such openvino model file" in err


# ---- the inference planner --------------------------------------------------------------------------

def tiny_config(filters: int = 4, shape=(32, 32, 32), norm: str = "none", **strategy) -> TrainConfig:
    job = JobConfig(model=ModelConfig(in_channels=2, filters=filters, norm=norm), shape=shape, batch=1,
                    strategy=Strategy(**strategy))
    return TrainConfig(job=job, data=DataConfig(channels=(0, 1), shape=shape), data_dir="unused")


def test_the_plan_follows_the_memory_budget():
    config, cpu = tiny_config(), torch.device("cpu")
    whole = predict_module.inference_need(config, (32, 32, 32), cpu)
    slabs2 = predict_module.inference_need(config, (32, 32, 32), cpu, slabs=2)
    assert slabs2 < whole
    plan = predict_module.plan_inference(config, (32, 32, 32), cpu, budget=whole)
    assert plan.mode == "whole" and plan.need == whole and "--memory" in plan.reason
    plan = predict_module.plan_inference(config, (32, 32, 32), cpu, budget=whole - 1)
    assert plan.mode == "slabs" and plan.slabs == 2 and plan.need == slabs2
    assert "a whole volume needs" in plan.describe()
    plan = predict_module.plan_inference(config, (32, 32, 32), cpu, budget=1)
    assert plan.mode == "sliding" and plan.window == (16, 16, 16) and "no window fits" in plan.reason


def test_a_network_without_slabs_goes_from_whole_to_sliding_windows():
    cpu = torch.device("cpu")
    model = ModelConfig(architecture="intel-unet", in_channels=1, filters=4, norm="batch", dropout=0.0)
    other = TrainConfig(job=JobConfig(model=model, shape=(64, 64, 64), batch=1),
                        data=DataConfig(channels=(0,), shape=(64, 64, 64)), data_dir="unused")
    whole = predict_module.inference_need(other, (64, 64, 64), cpu)
    plan = predict_module.plan_inference(other, (64, 64, 64), cpu, budget=whole - 1)
    assert plan.mode == "sliding" and "slabs" not in plan.reason and plan.window == (32, 64, 64)  # H halved first


def test_a_normalised_network_past_full_resolution_slabs_gets_every_level_slabs(monkeypatch):
    """Instance norm in slabs is exact, so normalised networks get slabs too; when full-resolution slabs no
    longer lower the peak enough, the schedules with every level in slabs come next, the first that fits."""
    config, cpu = tiny_config(filters=4, norm="instance"), torch.device("cpu")
    counts_tried = []
    real_need = predict_module.inference_need

    def need(config_, shape, device, slabs=1):
        counts_tried.append(predict_module.strategy_with_slabs(Strategy(), slabs).slab_counts)
        return real_need(config_, shape, device, slabs)

    monkeypatch.setattr(predict_module, "inference_need", need)
    every_level = real_need(config, (32, 32, 32), cpu, (16, 8, 4, 2))
    full_resolution = min(real_need(config, (32, 32, 32), cpu, s) for s in (2, 4, 8, 16))
    assert every_level < full_resolution
    plan = predict_module.plan_inference(config, (32, 32, 32), cpu, budget=every_level)
    assert plan.mode == "slabs" and plan.slab_counts == (16, 8, 4, 2) and plan.need == every_level
    assert counts_tried[0] == (1,) and (16, 8, 4, 2) == counts_tried[-1] and (8, 4, 2, 1) in [
        tuple(c) + (1,) * (4 - len(c)) for c in counts_tried]
    assert "slabs 16,8,4,2 per level" in plan.describe() and "(exact)" in plan.describe()


@pytest.mark.parametrize("strategy, norm", [({}, "none"), ({"channels_last": True}, "none"), ({}, "instance")])
def test_slab_inference_equals_whole_volume_inference(strategy, norm):
    config = tiny_config(filters=2, shape=(32, 16, 16), norm=norm, **strategy)
    torch.manual_seed(0)
    model = UNet3D(config.job.model).eval()
    predictor = predict_module.Predictor(predict_module.prepare_model(model, predict_module.inference_strategy(config)),
                                         config, Path("unused"))
    image = np.random.default_rng(0).standard_normal((2, 32, 16, 16)).astype(np.float32)
    cpu = torch.device("cpu")
    whole = predict_module.predict_volume(predictor, image, cpu, plan=predict_module.InferencePlan("whole", 0, 0, ""))
    for slabs in (2, 4, 16, (4, 2), (16, 8, 4, 2)):
        plan = predict_module.InferencePlan("slabs", 0, 0, "", slabs=slabs)
        np.testing.assert_allclose(predict_module.predict_volume(predictor, image, cpu, plan=plan), whole,
                                   rtol=0, atol=1e-6)
    assert model.slabs == 1  # the plan's slabs are not left on the model


def test_predict_memory_flag_picks_and_reports_the_plan(run, small_msd, tmp_path, cli):
    code, out, err = cli("predict", run, small_msd, "--out", tmp_path / "a", "--quiet", "--memory", "1KiB")
    assert code == 0, err
    assert "sliding windows of 16x16x16 (50% overlap, Gaussian-weighted)" in out and "no window fits" in out
    code, out, err = cli("predict", run, small_msd, "--out", tmp_path / "b", "--quiet", "--memory", "64GiB")
    assert code == 0 and "whole volumes in one pass: needs ~" in out and "64.0 GiB) --memory" in out
    code, _, err = cli("predict", run, small_msd, "--out", tmp_path / "c", "--memory", "lots")
    assert code == 2 and "--memory" in err


def test_bench_inference_times_every_engine_on_the_same_volume(cli):
    code, out, err = cli("bench", "--inference", "--shape", "16", "16", "16", "--filters", "2", "--threads", "1",
                         "--warmup", "1", "--repeats", "1", "--engines", "torch-fp32", "onnxruntime", "openvino",
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    rows = {row["engine"]: row for row in result["rows"]}
    assert list(rows) == ["torch-fp32", "onnxruntime", "openvino"]
    assert rows["torch-fp32"]["vs_torch_fp32"] == 1.0 and rows["torch-fp32"]["max_abs_diff"] == 0.0
    assert all(0 <= row["max_abs_diff"] <= 1e-4 and row["seconds"] > 0 for row in rows.values())
    code, _, err = cli("bench", "--inference", "--shape", "16", "16", "16", "--engines", "tensorrt")
    assert code == 2 and "--engines tensorrt" in err
