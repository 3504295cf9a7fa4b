"""Run-time input checks (LANGUAGE.md §8): each names the input, the dim and the line."""
import pytest
import torch

import convdsl
from convdsl import ConvDSLError, ConvDSLInputError

SRC = """net A(x: f32[N, 1, H, W], y: f32[N, 2, H, W]) {
  a = conv(x, 2, kernel=5)
  b = conv(y, 2, kernel=5)
  return a + b
}"""


@pytest.fixture(scope="module")
def net():
    return convdsl.compile(SRC)


def call(net, *args):
    with pytest.raises(ConvDSLInputError) as info:
        net(*args)
    assert isinstance(info.value, ConvDSLError) and isinstance(info.value, ValueError)
    return info.value


def test_runs_at_several_sizes(net):
    assert net(torch.randn(2, 1, 9, 7), torch.randn(2, 2, 9, 7)).shape == (2, 2, 5, 3)
    assert net(torch.randn(1, 1, 5, 5), torch.randn(1, 2, 5, 5)).shape == (1, 2, 1, 1)


def test_wrong_number_of_inputs(net):
    err = call(net, torch.randn(2, 1, 9, 9))
    assert "takes 2 inputs (x, y), got 1" in err.message and err.line == 1


def test_wrong_rank(net):
    err = call(net, torch.randn(2, 1, 9), torch.randn(2, 2, 9, 9))
    assert "input 'x'" in err.message and "rank 4" in err.message and err.column == 7


def test_wrong_dtype(net):
    err = call(net, torch.randn(2, 1, 9, 9).half(), torch.randn(2, 2, 9, 9))
    assert "input 'x' is declared f32 but got f16" in err.message


def test_wrong_fixed_dim(net):
    err = call(net, torch.randn(2, 3, 9, 9), torch.randn(2, 2, 9, 9))
    assert "input 'x' dim 1 must be 1" in err.message


def test_inconsistent_symbol(net):
    err = call(net, torch.randn(2, 1, 9, 9), torch.randn(2, 2, 10, 9))
    assert "size H is 9 from input 'x' dim 2 but 10 from input 'y' dim 2" in err.message
    assert err.line == 1 and err.column == 27


def test_input_too_small_names_layer_line_and_dim(net):
    err = call(net, torch.randn(2, 1, 3, 9), torch.randn(2, 2, 3, 9))
    assert err.line == 2 and "kernel 5 is larger than the padded input 3" in err.message
    assert "H=3 (input 'x' dim 2)" in err.message


def test_not_a_tensor(net):
    err = call(net, [1.0], torch.randn(2, 2, 9, 9))
    assert "must be a torch.Tensor" in err.message


def test_non_contiguous_and_channels_last_inputs_are_correct(net):
    x = torch.randn(2, 1, 9, 9)
    y = torch.randn(2, 2, 9, 18)[..., ::2]
    expected = net(x.contiguous(), y.contiguous())
    got = net(x.to(memory_format=torch.channels_last), y)
    torch.testing.assert_close(got, expected)


def test_too_small_for_pooling_then_conv():
    net = convdsl.compile("net P(x: f32[N, 1, H, W]) {\n  p = maxpool(x, 4)\n"
                          "  return conv(p, 2, kernel=3)\n}")
    assert net(torch.randn(1, 1, 12, 12)).shape == (1, 2, 1, 1)
    err = call(net, torch.randn(1, 1, 8, 8))
    assert err.line == 3


def test_kmeans_layer_must_be_fitted_first():
    net = convdsl.compile("net K(x: f32[N, 1, 8, 8]) {\n"
                          "  return conv(x, 4, kernel=3, init=kmeans)\n}")
    with pytest.raises(ConvDSLError, match="fit_features"):
        net(torch.randn(2, 1, 8, 8))


def test_half_and_bfloat16_nets_run():
    for dtype, torch_dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        net = convdsl.compile(f"net H(x: {dtype}[N, 2, 8, 8]) {{\n"
                              f"  return maxpool(relu(conv(x, 3, kernel=3, pad=same)), 2)\n}}")
        x = torch.randn(2, 2, 8, 8)
        y = net(x.to(torch_dtype))
        assert y.dtype == torch_dtype and y.shape == (2, 3, 4, 4)
        reference = torch.nn.functional.max_pool2d(torch.relu(torch.nn.functional.conv2d(
            x, net.state_dict()["conv.weight"], net.state_dict()["conv.bias"], padding=1)), 2)
        torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.05)
