import csv

from fullres.cli import main
from fullres.figures import figure5_estimate_vs_measured


def test_sweep_estimates_every_job_and_draws_figure3(tmp_path, capsys):
    assert main(["sweep", "--shapes", "16", "16x16x24", "--batches", "1", "2", "--filters", "2", "--no-measure",
                 "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == 2 * 2 * 2  # shapes x batches x checkpointing off/on
    assert {r["shape"] for r in rows} == {"16x16x16", "16x16x24"}
    assert all(int(r["dryrun_bytes"]) > 0 and int(r["table1_bytes"]) > 0 and r["measured_bytes"] == "" for r in rows)
    batch2 = [r for r in rows if r["shape"] == "16x16x16" and r["batch"] == "2" and r["checkpointing"] == "False"]
    batch1 = [r for r in rows if r["shape"] == "16x16x16" and r["batch"] == "1" and r["checkpointing"] == "False"]
    # Table 1 grows with the batch by construction (the dry run need not at tiny sizes: torch may pick
    # another convolution kernel, with another workspace, for another batch).
    assert int(batch2[0]["table1_bytes"]) > int(batch1[0]["table1_bytes"])
    assert (tmp_path / "figure3_memory_vs_size.png").stat().st_size > 1000
    assert not (tmp_path / "figure5_estimate_vs_measured.png").exists()


def test_figure5_draws_measured_rows(tmp_path):
    rows = [{"precision": "fp32", "checkpointing": "False", "voxels": v, "table1_bytes": 3 * v, "dryrun_bytes": v,
             "measured_bytes": int(v * 1.02)} for v in (10**6, 2 * 10**6)]
    assert figure5_estimate_vs_measured(rows, tmp_path / "f5.png").stat().st_size > 1000


def test_bad_sweep_shape_is_one_line(capsys):
    try:
        code = main(["sweep", "--shapes", "30x32", "--out", "x"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "'30x32' is not a shape" in err and len(err.strip().splitlines()) == 1
