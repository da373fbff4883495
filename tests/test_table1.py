import csv
from pathlib import Path

import pytest

from fullres.cost.table1 import table1
from fullres.nets.registry import ModelConfig

PAPER_TABLE1 = Path(__file__).parent / "data" / "table1.csv"
INTEGER_COLUMNS = ["batch", "height", "width", "depth", "feature_maps", "trainable_weights", "feature_map_size", "params"]


@pytest.fixture(scope="module")
def paper_table():
    return table1(ModelConfig(), (240, 240, 144), batch=16)


def test_every_row_equals_the_paper(paper_table):
    expected = list(csv.DictReader(PAPER_TABLE1.open()))
    assert [r.layer for r in paper_table.rows] == [row["layer"] for row in expected]
    for ours, theirs in zip(paper_table.rows, expected):
        assert ours.type == theirs["type"], ours.layer
        for column in INTEGER_COLUMNS:
            assert getattr(ours, column) == int(theirs[column]), (ours.layer, column)
        assert f"{ours.memory_mb:.2f}" == theirs["memory_mb"], ours.layer


def test_totals_equal_the_paper(paper_table):
    assert paper_table.trainable_weights == 19_735_329
    assert paper_table.feature_map_size == 114_330_009_600
    assert paper_table.params == 114_349_744_929
    assert f"{paper_table.size_mb:.2f}" == "457398.98"
    assert f"{paper_table.training_mb:.2f}" == "914797.96"


def test_table_follows_the_model():
    small = table1(ModelConfig(in_channels=1, filters=8, classes=3), (32, 32, 16), batch=2, bytes_per_value=2)
    conv1a = small.rows[1]
    assert (conv1a.layer, conv1a.feature_maps, conv1a.trainable_weights) == ("conv1a", 8, 27 * 8 + 8)
    assert small.rows[-1].feature_maps == 3
    assert small.rows[0].feature_map_size == 2 * 32 * 32 * 16
    assert small.size_mb == pytest.approx(small.params * 2 / 1e6)


def test_norm_layers_appear_as_rows():
    rows = table1(ModelConfig(filters=8, norm="instance"), (16, 16, 16), batch=1).rows
    assert "InstanceNormalization" in {r.type for r in rows}
