import pytest
import torch
import torch.nn.functional as F

from fullres.kernels.layers import ConvTranspose3d, _UpsamplingWeightGradient
from fullres.nets.registry import ModelConfig
from fullres.nets.unet3d import UNet3D
from fullres.nets.registry import count_trainable

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


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs a torch built with oneDNN")
def test_few_input_channels_run_on_onednn_with_the_same_result():
    """conv1a at batch 1 where ATen's rule (N x C x D x H <= 20480) picks its slow path: zero channels
    move it to oneDNN, with the same output and weight gradient (up to summation order)."""
    from fullres.kernels.layers import Conv3d, _conv_backend, _few_channels_on_onednn

    torch.manual_seed(0)
    layer = Conv3d(4, 8, kernel_size=3, padding=1)
    reference = torch.nn.Conv3d(4, 8, kernel_size=3, padding=1)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 4, 64, 48, 8)  # 4 x 64 x 48 = 12288: slow path; 8 x 64 x 48: oneDNN
    assert _conv_backend(x, layer.weight, layer.bias, layer).endswith("Slow3d")
    assert _few_channels_on_onednn(layer, x) is not None
    gradient = torch.randn(1, 8, 64, 48, 8)
    wide, plain = layer(x), reference(x)
    torch.testing.assert_close(wide, plain, rtol=0, atol=1e-5)
    wide.backward(gradient)
    plain.backward(gradient)
    for mine, theirs in ((layer.weight.grad, reference.weight.grad), (layer.bias.grad, reference.bias.grad)):
        assert (mine - theirs).abs().max() <= 1e-4 * theirs.abs().max()
    # Left alone: enough channels, bf16, or a volume small enough that 8 channels stay on the slow path
    assert _few_channels_on_onednn(layer, torch.randn(1, 4, 16, 16, 16)) is None
    assert _few_channels_on_onednn(layer, x.bfloat16()) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _few_channels_on_onednn(layer, x) is None
    wide_layer = Conv3d(8, 8, kernel_size=3, padding=1)
    assert _few_channels_on_onednn(wide_layer, torch.randn(1, 8, 16, 16, 16)) is None
    reflecting = Conv3d(4, 8, kernel_size=3, padding=1, padding_mode="reflect")
    assert _few_channels_on_onednn(reflecting, x) is None


def test_few_channels_left_alone_where_torch_cannot_say_which_kernel(monkeypatch):
    from fullres.kernels.layers import Conv3d, _few_channels_on_onednn

    monkeypatch.delattr(torch._C, "_select_conv_backend")
    layer = Conv3d(4, 8, kernel_size=3, padding=1)
    x = torch.randn(1, 4, 64, 48, 8)
    assert _few_channels_on_onednn(layer, x) is None
    assert layer(x).shape == (1, 8, 64, 48, 8)


def test_upsampling_weight_gradient_as_the_strided_adjoint():
    """The transposed convolution's gradients through the strided convolution it is the adjoint of equal
    PyTorch's own (float64: the same sums), whichever kernel this CPU would pick for the layer."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 5, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 8, 10, 6, dtype=torch.float64)
    ours = torch.autograd.grad(_UpsamplingWeightGradient.apply(x, weight, bias, (2, 2, 2)), (x, weight, bias), grad)
    torchs = torch.autograd.grad(F.conv_transpose3d(x, weight, bias, stride=2), (x, weight, bias), grad)
    for a, b in zip(ours, torchs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    layer = ConvTranspose3d(6, 5, 2, stride=2).double()
    reference = torch.nn.ConvTranspose3d(6, 5, 2, stride=2).double()
    reference.load_state_dict(layer.state_dict())
    for module in (layer, reference):
        (module(x.detach()) * grad).sum().backward()
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-12, atol=1e-12)


def test_upsampling_under_autocast_keeps_the_parameters_dtype():
    x = torch.randn(1, 8, 4, 4, 4).contiguous(memory_format=torch.channels_last_3d).requires_grad_()
    weight = torch.randn(8, 8, 2, 2, 2, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _UpsamplingWeightGradient.apply(x, weight, bias, (2, 2, 2))
        expected = F.conv_transpose3d(x, weight, bias, stride=2)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected)
    out.float().sum().backward()
    assert (x.grad.dtype, weight.grad.dtype, bias.grad.dtype) == (torch.float32,) * 3
    torch.testing.assert_close(bias.grad, torch.full_like(bias, 8 ** 3))
