import pytest
import torch

from fullres.model import ModelConfig, UNet3D, count_trainable

TABLE1_LAYERS = ["conv1a", "conv1b", "pool1", "conv2a", "conv2b", "pool2", "conv3a", "dropout_1", "conv3b", "pool3",
                 "conv4a", "dropout_2", "conv4b", "transConv4", "concatenate_1", "conv5a", "conv5b", "transConv5",
                 "concatenate_2", "conv6a", "conv6b", "transConv6", "concatenate_3", "conv7a", "conv7b",
                 "PredictionMask"]


def meta_model(**kwargs):
    with torch.device("meta"):
        return UNet3D(ModelConfig(**kwargs))


def test_parameter_counts_match_table1():
    assert count_trainable(meta_model()) == 19_735_329
    assert count_trainable(meta_model(in_channels=1)) == 19_732_737


def test_module_names_are_table1_layer_names():
    names = {name for name, _ in meta_model().named_children()}
    assert set(TABLE1_LAYERS) <= names


def test_forward_shapes_sigmoid_and_softmax():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 16, 16, 24)
    assert UNet3D(ModelConfig(filters=4)).eval()(x).shape == (2, 1, 16, 16, 24)
    assert UNet3D(ModelConfig(filters=4, classes=4, norm="instance"))(x).shape == (2, 4, 16, 16, 24)


@pytest.mark.parametrize("norm", ["instance", "group", "batch"])
def test_normalisation_adds_norm_modules(norm):
    model = meta_model(filters=8, norm=norm)
    assert hasattr(model, "norm1a") and count_trainable(model) > count_trainable(meta_model(filters=8))


def test_size_not_divisible_by_8_names_nearest_sizes():
    with pytest.raises(ValueError, match=r"D=20 .* nearest valid: 16 or 24"):
        UNet3D(ModelConfig(filters=2))(torch.zeros(1, 4, 16, 16, 20))


@pytest.mark.parametrize("kwargs, message", [
    ({"in_channels": 0}, "in_channels"), ({"filters": 0}, "filters"), ({"classes": 0}, "classes"),
    ({"dropout": 1.0}, "dropout"), ({"norm": "layer"}, "norm"), ({"norm": "group", "filters": 4}, "multiple of 8"),
])
def test_bad_model_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
