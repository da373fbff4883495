import csv

from fullres.cli import main
from fullres.evaluate.figures import figure5_estimate_vs_measured


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


def test_repeated_measurements_keep_the_median_and_the_range(tmp_path, monkeypatch, capsys):
    """--repeats N measures every job N times (fresh processes: glibc's heap differs run to run) and compares
    the median; the CSV keeps the lowest and highest, the printed row the range."""
    from fullres.cost import measure

    peaks = iter([520, 500, 560] * 2)  # two jobs, three runs each

    def fake_measure_peak(job, steps=2, device="cpu", **_):
        return measure.MeasuredPeak(measured_bytes=next(peaks) * 10**6, baseline_bytes=0, reserved_bytes=None,
                                    step_seconds=[0.5, 0.2], threads=1, device=device)

    monkeypatch.setattr(measure, "measure_peak", fake_measure_peak)
    assert main(["sweep", "--shapes", "16", "--filters", "2", "--checkpointing-sweep", "both", "--repeats", "3",
                 "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "sweep.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert (row["measured_bytes"], row["repeats"]) == (str(520 * 10**6), "3")
        assert (row["measured_min_bytes"], row["measured_max_bytes"]) == (str(500 * 10**6), str(560 * 10**6))
        assert float(row["dryrun_error"]) == (int(row["dryrun_bytes"]) - 520 * 10**6) / (520 * 10**6)
    assert "(median of 3: 0.500-0.560 GB)" in capsys.readouterr().out
    assert (tmp_path / "figure5_estimate_vs_measured.png").exists()


def test_zero_repeats_is_one_line(capsys):
    try:
        code = main(["sweep", "--shapes", "16", "--repeats", "0", "--out", "x"])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "--repeats" in err and len(err.strip().splitlines()) == 1
