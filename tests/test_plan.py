import csv
from pathlib import Path

import pytest

from fullres.job.config import JobConfig
from fullres.cost.plan import largest_fitting, plan, scaled_shape
from fullres.units import format_bytes, parse_size

PAPER_TABLE2 = Path(__file__).parent / "data" / "table2.csv"


@pytest.mark.parametrize("row", list(csv.DictReader(PAPER_TABLE2.open())), ids=lambda r: r["server"])
def test_table1_method_reproduces_table2(row):
    job = JobConfig(shape=(int(row["height"]), int(row["width"]), int(row["depth"])), batch=int(row["batch"]))
    result = plan(job, int(row["server_memory_gb"]) * 10**9, "table1")
    # The paper's memory-rich server has no recorded outcome ("-"), but it is the one that trained the job.
    assert result.fits == (row["outcome"] != "fail")


def test_plan_margins_and_maxima():
    result = plan(JobConfig(shape=(128, 128, 128), batch=16), 192 * 10**9, "table1")
    assert not result.fits and result.margin_bytes < 0
    assert result.max_batch == 13  # 13 x 14.46 GB < 192 GB < 14 x 14.46 GB
    assert plan(JobConfig(shape=(128, 128, 128), batch=13), 192 * 10**9, "table1").fits
    assert not plan(JobConfig(shape=(128, 128, 128), batch=14), 192 * 10**9, "table1").fits
    assert result.max_shape == (120, 120, 120)
    assert plan(JobConfig(shape=(128, 128, 128), batch=1), 10**6, "table1").max_batch == 0


def test_paper_job_needs_915_gb():
    result = plan(JobConfig(), parse_size("1.5TB"), "table1")
    assert round(result.required_bytes / 1e6, 2) == 914797.96
    assert result.max_shape[2] < result.max_shape[0]  # aspect kept: 240:240:144


def test_search_helpers():
    assert largest_fitting(lambda n: n <= 37) == 37
    assert largest_fitting(lambda n: False) == 0
    for answer in range(0, 40):  # any guess, above or below, finds the same answer
        for guess in range(1, 50):
            assert largest_fitting(lambda n: n <= answer, guess=guess) == answer
    calls = []
    assert largest_fitting(lambda n: calls.append(n) or n <= 1000, guess=1000) == 1000 and len(calls) <= 3
    assert scaled_shape((240, 240, 144), 120) == (120, 120, 72)


@pytest.mark.parametrize("text, size", [("192GB", 192 * 10**9), ("384GiB", 384 * 2**30), ("1.5TB", 15 * 10**11),
                                        ("24 gib", 24 * 2**30), ("512MB", 512 * 10**6)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [("12XB", "unknown unit"), ("-1GB", "negative"), ("0GB", "zero"),
                                           ("many", "not a memory size"), ("12", "not a memory size")])
def test_parse_size_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_size(text)


def test_format_bytes():
    assert format_bytes(914_797_959_432) == "914.8 GB (852.0 GiB)"


def test_plan_searches_shapes_too_small_for_the_jobs_slabs():
    """Smaller shapes hold fewer slabs: the search caps them instead of failing."""
    from fullres.job.config import Strategy
    from fullres.nets.registry import ModelConfig

    job = JobConfig(ModelConfig(filters=2), (64, 64, 64), 1, Strategy(checkpointing=True, slabs=16))
    assert job.at_shape((16, 16, 16)).strategy.slabs == 8
    result = plan(job, 10**5, "table1")
    assert not result.fits and result.max_shape is None
