"""convdsl.from_torch: an nn.Sequential becomes .cdsl text whose compiled net,
loaded with the returned state, computes what the PyTorch model computes."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import convdsl
from convdsl import ConvDSLError
from convdsl.from_torch import SUPPORTED

ATOL = 1e-5

# The reference models' own warnings (padding="same" with even kernels, Softmax() without dim).
pytestmark = pytest.mark.filterwarnings("ignore:.*(padding='same'|Implicit dimension):UserWarning")


def converted(model, **kwargs) -> convdsl.CompiledNet:
    text, state = convdsl.from_torch(model, return_state=True, **kwargs)
    net = convdsl.compile(text, backend="torch")
    net.load_state_dict(state)  # strict: the keys are exactly the net's
    return net


def assert_same(model, net, x):
    model.eval()
    with torch.no_grad():
        expected, got = model(x), net(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=ATOL)


def lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.LeakyReLU(0.2),
        nn.Linear(120, 84), nn.Sigmoid(), nn.Linear(84, 10), nn.LogSoftmax(dim=1))


MODELS = {
    "lenet": (lenet, (3, 1, 28, 28), {"input_shape": (8, 1, 28, 28)}),
    "conv1d-groups-deconv": (lambda: nn.Sequential(
        nn.Conv1d(4, 8, 3, stride=2, padding=1, dilation=2, groups=2, bias=False), nn.ELU(0.5),
        nn.LPPool1d(2, 3), nn.ConvTranspose1d(8, 3, 4, stride=2, padding=1, output_padding=1),
        nn.Softplus(), nn.AdaptiveMaxPool1d(5), nn.Softmax(dim=-1)), (2, 4, 40), {}),
    "conv3d-same-adaptive": (lambda: nn.Sequential(
        nn.Conv3d(2, 4, (3, 2, 3), padding="same"), nn.Sigmoid(),
        nn.MaxPool3d(2, stride=1, padding=1), nn.AdaptiveAvgPool3d((2, None, 3)),
        nn.Flatten(), nn.Linear(4 * 2 * 9 * 3, 5)), (2, 2, 6, 8, 7),
        {"input_shape": ("B", 2, 6, 8, 7)}),
    "nested-deconv-sized": (lambda: nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=(1, 0)), nn.ReLU()),
        nn.ConvTranspose2d(8, 3, 3, stride=2, output_padding=1, dilation=1),
        nn.Identity(), nn.ReLU(), nn.LPPool2d(3, 2), nn.Softmax2d()),
        (2, 3, 11, 12), {"input_shape": (2, 3, 11, 12)}),
    "any-size-classifier": (lambda: nn.Sequential(
        nn.Conv2d(3, 8, 3, padding="same", dilation=2), nn.ReLU(),
        nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
        nn.Conv2d(8, 8, 3, groups=8), nn.Tanh(), nn.LPPool2d(2, (2, 3), stride=1),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)), (2, 3, 17, 20), {}),
    "dense-only": (lambda: nn.Sequential(
        nn.Linear(12, 16), nn.ELU(), nn.Flatten(), nn.Linear(16, 3, bias=False), nn.Softmax()),
        (5, 12), {}),
}


@pytest.mark.parametrize("key", MODELS)
def test_converted_model_computes_the_same(key):
    torch.manual_seed(0)
    build, shape, kwargs = MODELS[key]
    model = build()
    net = converted(model, **kwargs)
    assert_same(model, net, torch.randn(*shape))


def test_symbolic_sizes_run_at_any_size():
    torch.manual_seed(1)
    model = MODELS["any-size-classifier"][0]()
    text = convdsl.from_torch(model, name="AnySize")
    assert "net AnySize(x: f32[N, 3, H, W])" in text
    net = converted(model)
    for size in [(9, 9), (16, 23)]:
        assert_same(model, net, torch.randn(3, 3, *size))


def test_text_names_layers_and_state_keys():
    text, state = convdsl.from_torch(lenet(), input_shape=(1, 1, 28, 28), return_state=True)
    assert "conv1 = conv(x, 6, kernel=5, pad=2)" in text
    assert "dense3 = dense(h, 10)" in text
    assert "# 12: LogSoftmax" in text
    assert list(state) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias",
                           "dense1.weight", "dense1.bias", "dense2.weight", "dense2.bias",
                           "dense3.weight", "dense3.bias"]
    assert set(state) == set(convdsl.compile(text, backend="torch").state_dict())
    # The state is a copy: training the net leaves the PyTorch model alone.
    model = lenet()
    _, state = convdsl.from_torch(model, input_shape=(1, 1, 28, 28), return_state=True)
    state["conv1.weight"].zero_()
    assert model[0].weight.abs().sum() > 0


def test_converted_net_trains_like_the_model():
    # Gradients flow through the compiled net the way they flow through the model.
    torch.manual_seed(2)
    model = lenet()
    net = converted(model, input_shape=(1, 1, 28, 28))
    x, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 9, 1])
    for module in (model, net):
        torch.nn.functional.nll_loss(module(x), labels).backward()
    torch.testing.assert_close(net.conv1.weight.grad, model[0].weight.grad, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(net.dense3.bias.grad, model[11].bias.grad, atol=ATOL, rtol=1e-4)


def test_half_precision_models_keep_their_dtype():
    text = convdsl.from_torch(nn.Sequential(nn.Conv2d(3, 4, 3)).to(torch.bfloat16))
    assert "x: bf16[N, 3, H, W]" in text
    convdsl.compile(text, backend="torch")


@settings(max_examples=12, deadline=None)
@given(kernel=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2),
       dilation=st.integers(1, 2), groups=st.sampled_from([1, 2]), bias=st.booleans(),
       pool=st.sampled_from(["max", "avg", "lp"]), window=st.integers(1, 3))
def test_random_conv_and_pool_configurations(kernel, stride, pad, dilation, groups, bias, pool,
                                              window):
    torch.manual_seed(3)
    pooling = {"max": nn.MaxPool2d(window, padding=window // 2),
               "avg": nn.AvgPool2d(window, stride=1),
               "lp": nn.LPPool2d(2, window)}[pool]
    model = nn.Sequential(nn.Conv2d(4, 6, kernel, stride=stride, padding=pad, dilation=dilation,
                                    groups=groups, bias=bias), nn.ReLU(), pooling)
    assert_same(model, converted(model), torch.randn(2, 4, 13, 11))


@settings(max_examples=10, deadline=None)
@given(kernel=st.integers(1, 4), stride=st.integers(1, 3), pad=st.integers(0, 2),
       extra=st.integers(0, 2), bias=st.booleans())
def test_random_transpose_convolutions(kernel, stride, pad, extra, bias):
    extra = min(extra, stride - 1)  # PyTorch: output_padding < stride
    torch.manual_seed(4)
    model = nn.Sequential(nn.ConvTranspose2d(3, 2, kernel, stride=stride, padding=pad,
                                             output_padding=extra, bias=bias))
    x = torch.randn(2, 3, 5, 6)
    try:
        model(x)
    except RuntimeError:  # PyTorch refuses (an empty output)
        return
    # With a fixed size even output_padding > padding is expressible.
    assert_same(model, converted(model, input_shape=(2, 3, 5, 6)), x)
    if extra <= pad:
        assert_same(model, converted(model), x)


# -- what cannot be converted says so, naming the layer ----------------------------------

@pytest.mark.parametrize("model, message", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.ReLU(), nn.BatchNorm2d(4))),
     r"1\.1 \(BatchNorm2d\) is not supported by from_torch; supported layers: Conv1d"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5)), r"1 \(Dropout\) is not supported"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.AvgPool2d(3, padding=1)),
     r"1 \(AvgPool2d\): .*count_include_pad=False"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, ceil_mode=True)), r"ceil_mode"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2, dilation=2)), r"dilation"),
    (nn.Sequential(nn.Conv2d(3, 4, 3, padding_mode="reflect")), r"padding_mode='reflect'"),
    (nn.Sequential(nn.ConvTranspose2d(4, 4, 3, groups=2)), r"groups"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(100, 2)),
     r"2 \(Linear\): reads a flattened map whose size depends on the input size: pass input_sh"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2)), r"put nn.Flatten\(\) before it"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(5, 4, 3)), r"expects 5 channels but gets 4"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool1d(2)), r"expects 1 spatial dims"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softmax(dim=0)), r"normalizes over dim 0"),
    (nn.Sequential(nn.Softplus(beta=2), nn.Linear(3, 3)), r"beta=1"),
    (nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(3, 3, 1)), r"cannot tell the input shape"),
    (nn.Sequential(nn.ReLU()), r"pass input_shape"),
    (nn.Sequential(nn.Conv2d(3, 4, 3)).double(), r"float64 have no .cdsl type"),
])
def test_unsupported_layers_are_clear_errors(model, message):
    with pytest.raises(ConvDSLError, match=message):
        convdsl.from_torch(model)


def test_bad_arguments_are_clear_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ConvDSLError, match="net name 'return' is not a valid"):
        convdsl.from_torch(model, name="return")
    with pytest.raises(ConvDSLError, match="not list"):
        convdsl.from_torch([nn.ReLU()])
    with pytest.raises(ConvDSLError, match=r"0 \(Conv2d\) fails on the input_shape given"):
        convdsl.from_torch(model, input_shape=(1, 5, 8, 8))
    with pytest.raises(ConvDSLError, match="channel count"):
        convdsl.from_torch(model, input_shape=(1, "C", 8, 8))


def test_errors_render_without_a_traceback():
    with pytest.raises(ConvDSLError) as caught:
        convdsl.from_torch(nn.Sequential(nn.GRU(3, 3)))
    assert str(caught.value).startswith("error: 0 (GRU) is not supported by from_torch")


# -- every layer from_torch lists converts, and computes what it computes ------------------

# Arguments for each layer kind: the ranked ones (Conv1d/2d/3d, ...) by their stem.
LAYER_ARGUMENTS = {
    "Conv": lambda cls: cls(4, 5, 3, stride=2, padding=1),
    "ConvTranspose": lambda cls: cls(4, 2, 3, stride=2, padding=1, output_padding=1),
    "MaxPool": lambda cls: cls(3, stride=2, padding=1),
    "AvgPool": lambda cls: cls(3, stride=2, padding=1, count_include_pad=False),
    "LPPool": lambda cls: cls(2, 2),
    "AdaptiveAvgPool": lambda cls: cls(3),
    "AdaptiveMaxPool": lambda cls: cls(2),
    "Linear": lambda cls: nn.Sequential(nn.Flatten(), cls(4 * 6**2, 3)),
    "LeakyReLU": lambda cls: cls(0.2),
    "ELU": lambda cls: cls(0.5),
    "Softmax": lambda cls: cls(dim=1),
    "LogSoftmax": lambda cls: cls(dim=1),
    "Sequential": lambda cls: cls(nn.ReLU(), nn.Sequential(nn.Tanh())),
}


def layer_under_test(name: str) -> tuple[nn.Sequential, tuple]:
    """A model that runs the PyTorch layer `name` (an entry of SUPPORTED) on the
    output of a 1x1 convolution of its rank, and the input shape to run it at."""
    ranked = re.fullmatch(r"(\w+?)([123])d", name)
    if ranked and ranked.group(1) != "Softmax":  # Softmax2d: one class, not a rank of Softmax
        stem, rank = ranked.group(1), int(ranked.group(2))
    else:
        stem, rank = name, 2
    layer = LAYER_ARGUMENTS.get(stem, lambda cls: cls())(getattr(nn, name))
    return nn.Sequential(getattr(nn, f"Conv{rank}d")(3, 4, 1), layer), (2, 3) + (6,) * rank


@pytest.mark.parametrize("name", SUPPORTED)
def test_every_supported_layer_converts(name):
    torch.manual_seed(5)
    model, shape = layer_under_test(name)
    text = convdsl.from_torch(model, input_shape=shape)
    assert f": {name}" in text or name in ("Identity", "Sequential")
    assert_same(model, converted(model, input_shape=shape), torch.randn(*shape))
