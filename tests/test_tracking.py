"""train --tracker: the configuration, every epoch's metrics and the run's figures reach TensorBoard or
MLflow, and a resumed run continues the same record."""

from __future__ import annotations

import json

import pytest

TINY = ["--shape", "16", "16", "16", "--filters", "2", "--batch", "1", "--workers", "0", "--threads", "1",
        "--quiet", "--force", "--no-autotune"]


def test_tensorboard_gets_every_metric_of_every_epoch(small_msd, tmp_path, cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert cli("train", small_msd, "--out", run, *TINY, "--epochs", "2")[0] == 0
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    assert {"train_loss", "val_dice", "peak_memory_bytes", "step_s"} <= set(events.Tags()["scalars"])
    assert [event.step for event in events.Scalars("train_loss")] == [1, 2]
    assert "config" in "".join(events.Tags()["tensors"])


def test_none_writes_no_tracker_files(small_msd, tmp_path, cli):
    run = tmp_path / "run"
    assert cli("train", small_msd, "--out", run, *TINY, "--epochs", "1", "--tracker", "none")[0] == 0
    assert not (run / "tb").exists() and not (run / "mlruns").exists()
    assert json.loads((run / "config.json").read_text())["tracker"] == "none"


def test_mlflow_records_params_metrics_and_figures_and_resume_continues_the_run(small_msd, tmp_path, cli,
                                                                                 monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    assert cli("train", small_msd, "--out", run, *TINY, "--epochs", "1", "--tracker", "mlflow")[0] == 0
    run_id = (run / "mlflow_run_id").read_text().strip()
    code, _, err = cli("train", "--out", run, "--resume", "--epochs", "2", "--quiet", "--force")
    assert code == 0, err
    assert (run / "mlflow_run_id").read_text().strip() == run_id  # the same MLflow run, continued
    client = mlflow.tracking.MlflowClient(tracking_uri=(run / "mlruns").absolute().as_uri())
    record = client.get_run(run_id)
    assert record.data.params["job.batch"] == "1" and record.data.params["tracker"] == "mlflow"
    assert [m.step for m in client.get_metric_history(run_id, "val_dice")] == [1, 2]
    assert "peak_memory_bytes" in record.data.metrics
    artifacts = {item.path for item in client.list_artifacts(run_id)}
    assert {"config.json", "metrics.csv", "curves.png"} <= artifacts
