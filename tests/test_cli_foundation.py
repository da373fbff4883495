import json
import os
import subprocess
import sys

import pytest
import torch

from fullres.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_estimate_json_contract(capsys):
    code, out, _ = run(capsys, "estimate", "--shape", "240", "240", "144", "--channels", "4", "--batch", "16", "--json")
    data = json.loads(out)
    assert code == 0 and data["method"] == "table1"
    assert set(data["rows"][0]) == {"layer", "type", "batch", "height", "width", "depth", "feature_maps",
                                    "trainable_weights", "feature_map_size", "params", "memory_mb"}
    assert set(data["totals"]) == {"trainable_weights", "feature_map_size", "params", "size_mb", "training_mb"}
    assert round(data["totals"]["training_mb"], 2) == 914797.96


def test_estimate_human_output(capsys):
    code, out, _ = run(capsys, "estimate", "--channels", "FLAIR", "--shape", "16", "16", "16", "--batch", "1")
    assert code == 0 and "conv1a (Conv3D)" in out and "Double for training" in out


def test_plan_json(capsys):
    code, out, _ = run(capsys, "plan", "--shape", "144", "144", "144", "--batch", "8", "--memory", "384GB", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] is True and data["budget_mb"] == 384000.0
    assert set(data) >= {"method", "fits", "required_mb", "budget_mb", "max_batch", "max_shape"}


@pytest.mark.parametrize("argv, message", [
    (["plan", "--memory", "12XB"], "argument --memory: unknown unit"),
    (["plan", "--memory=-5GB"], "argument --memory: '-5GB' is negative"),
    (["plan", "--memory", "0TB"], "argument --memory: '0TB' is zero"),
    (["plan"], "give the budget: --memory SIZE or --gpu NAME"),
    (["estimate", "--shape", "240", "240", "145"], "145 is not divisible by 8 (the U-Net pools three times); nearest valid: 144 or 152"),
    (["estimate", "--shape", "-8", "8", "8"], "argument --shape: -8 must be at least 1"),
    (["estimate", "--batch", "0"], "argument --batch: 0 must be at least 1"),
    (["estimate", "--batch", "two"], "argument --batch: 'two' is not a whole number"),
    (["estimate", "--channels", "0"], "argument --channels: 0 must be at least 1"),
    (["estimate", "--filters", "0"], "argument --filters: 0 must be at least 1"),
    (["estimate", "--dropout", "1.5"], "dropout must be in [0, 1)"),
    (["estimate", "--bogus"], "unrecognized arguments: --bogus"),
    (["estimate", "--precision", "fp8"], "argument --precision: invalid choice"),
    (["estimate", "--channels", "FOO"], "argument --channels: unknown channel 'FOO'"),
    (["estimate", "--shape", "800000", "800000", "800000"], "too large: its tensors would have more elements"),
    (["estimate", "--filters", "100000000"], "too large: its tensors would have more elements"),
])
def test_bad_input_is_one_line_and_nonzero(capsys, argv, message):
    code, _, err = exit_code_and_output(capsys, argv)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def exit_code_and_output(capsys, argv):
    """main() returns its code for errors it handles; argparse exits with SystemExit: take either."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_module_entry_point_has_no_traceback():
    done = subprocess.run([sys.executable, "-m", "fullres", "plan", "--memory", "lots"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("fullres plan: error:") and "Traceback" not in done.stderr


def test_estimate_dryrun_json_contract(capsys):
    code, out, _ = run(capsys, "estimate", "--method", "dryrun", "--shape", "16", "16", "16", "--filters", "2",
                       "--batch", "1", "--json")
    data = json.loads(out)
    assert code == 0 and data["method"] == "dryrun"
    assert set(data) >= {"peak_bytes", "breakdown", "peak_at"} and sum(data["breakdown"].values()) == data["peak_bytes"]
    # a contiguous job: glibc's default heap on CPU, cuDNN's unmodelled workspaces on CUDA; either is said
    assert ("cuDNN" if torch.cuda.is_available() else "glibc's default heap") in data["note"]


def test_profile_json_contract(capsys):
    code, out, _ = run(capsys, "profile", "--shape", "16", "16", "16", "--filters", "2", "--batch", "1", "--json")
    data = json.loads(out)
    assert code == 0 and {"measured_bytes", "estimated_bytes", "error"} <= set(data)
    assert data["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and len(data["step_seconds"]) == 2
    assert data["measured_bytes"] > 0 and (data["reserved_bytes"] is None) == (data["device"] == "cpu")
    assert data["error"] == pytest.approx((data["estimated_bytes"] - data["measured_bytes"]) / data["measured_bytes"])


def test_bench_cli_json_and_chart(capsys, tmp_path):
    code, out, err = run(capsys, "bench", "--shape", "16", "16", "16", "--filters", "2", "--batch", "1",
                         "--variants", "stock_fp32", "plain_fp32", "--repeats", "1", "--peak-size", "128",
                         "--threads", "1", "--chart", str(tmp_path / "fig6.png"), "--json")
    assert code == 0, err
    data = json.loads(out)
    assert [row["name"] for row in data["variants"]] == ["stock_fp32", "plain_fp32"]
    stock, plain = (row["step_s"] for row in data["variants"])
    assert data["speedups"]["onednn_vs_stock"] == pytest.approx(stock / plain)
    assert (tmp_path / "fig6.png").stat().st_size > 1000
    code, out, err = run(capsys, "bench", "--shape", "16", "16", "16", "--filters", "2", "--batch", "1",
                         "--variants", "plain_fp32", "--repeats", "1", "--peak-size", "128", "--threads", "1")
    assert code == 0 and "plain_fp32" in out and "speed-ups" in out


def test_estimate_time_needs_cases_and_reports_hours(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, _, err = run(capsys, "estimate", "--time", "--shape", "16", "16", "16")
    assert code == 2 and "--time needs --cases" in err
    code, out, err = run(capsys, "estimate", "--time", "--cases", "10", "--epochs", "2", "--shape", "16", "16", "16",
                         "--filters", "2", "--batch", "2", "--threads", "1", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["steps_per_epoch"] == 4 and data["epochs"] == 2  # 8 training cases / batch 2
    assert data["total_s"] == pytest.approx(data["train_s"] + data["validation_s"])
    assert data["memory_bytes"] > 0


def test_demo_never_replaces_a_folder_it_did_not_write(capsys, tmp_path):
    (tmp_path / "results.csv").write_text("precious")
    code, _, err = run(capsys, "demo", "--out", str(tmp_path))
    assert code == 2 and "is not empty and is not a previous demo" in err
    assert (tmp_path / "results.csv").read_text() == "precious"


def test_faults_writing_outputs_are_one_line_and_leave_files_alone(cli, tmp_path):
    """An existing --out is kept; a read-only folder or a path through a file is an OS error in one line."""
    png = tmp_path / "figure.png"
    png.write_bytes(b"mine")
    code, _, err = cli("show", "image.nii.gz", "--out", png)
    assert code == 2 and "exists: choose another path, or --overwrite" in err and png.read_bytes() == b"mine"
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = cli("synth", blocker / "data", "--cases", "1", "--shape", "16", "16", "16", "--quiet")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(blocker) in err and blocker.read_text() == "x"


def test_help_and_malformed_arguments_answer_without_importing_torch():
    """Every command's --help, and an argument its parser refuses, are answered from torch-free modules
    (fullres.terms, fullres.job.strategy): torch is imported only by a command that runs."""
    from fullres.cli.commands import HELP

    script = """
import sys
from fullres.cli.main import main
for last, code in (("--help", 0), ("--no-such-flag", 2)):
    try:
        main(sys.argv[1:] + [last])
    except SystemExit as exit_:
        assert exit_.code == code, (last, exit_.code)
print(sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "monai", "nibabel")), file=sys.stderr)
"""
    for command in ("", *HELP):
        done = subprocess.run([sys.executable, "-c", script, *([command] if command else [])], capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, (command, done.stderr[-2000:])
        assert done.stderr.strip().splitlines()[-1] == "[]", (command, done.stderr[-2000:])


def test_a_shape_fullres_networks_refuse_is_answered_without_importing_torch():
    """estimate and plan refuse a size the paper's U-Net (8) or intel-unet (16) cannot take before torch is
    imported, with the same line the network's own check gives (job_from_options checks it again)."""
    script = """
import sys
from fullres.cli.main import main
print(main(sys.argv[1:]), sorted(name for name in sys.modules if name.split(".")[0] in ("torch", "monai")))
"""
    for argv, message in ((["estimate", "--shape", "7", "16", "16"], "fullres estimate: error: spatial size H=7 is not "
                           "divisible by 8 (the U-Net pools three times); nearest valid: 8"),
                          (["plan", "--memory", "1GB", "--shape", "16", "12", "16"], "fullres plan: error: spatial "
                           "size W=12 is not divisible by 8 (the U-Net pools three times); nearest valid: 8 or 16"),
                          (["estimate", "--model", "intel-unet", "--shape", "16", "16", "40"], "fullres estimate: "
                           "error: --model intel-unet: network intel-unet: spatial size D=40 is not divisible by 16 "
                           "(intel-unet pools four times); nearest valid: 32 or 48")):
        done = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "FULLRES_MALLOC": ""})
        assert done.stdout.strip() == "2 []", (argv, done.stdout, done.stderr[-2000:])
        assert done.stderr.strip() == message
