"""Run-time checks on both backends: every bad input is a ConvDSLInputError
naming the input, the dim and the .cdsl line; every odd memory layout
(non-contiguous, channels-last, strided, broadcast, offset) gives the output
and gradients a contiguous input gives. tests/test_runtime.py covers the
messages on the torch backend; this file holds both backends to them."""
from __future__ import annotations

import warnings

import pytest
import torch

import convdsl
from convdsl import ConvDSLError, ConvDSLInputError

BACKENDS = ["torch", "triton"]

SRC = """net A(x: f32[N, 1, H, W], y: f32[N, 2, H, W]) {
  a = conv(x, 2, kernel=5)
  b = conv(y, 2, kernel=5)
  h = maxpool(a + b, 2)
  return relu(h)
}"""


def compile_quiet(src: str, backend: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convdsl.compile(src, backend=backend)


@pytest.fixture(scope="module", params=BACKENDS)
def net(request):
    return compile_quiet(SRC, request.param)


def refused(net, *inputs) -> ConvDSLInputError:
    with pytest.raises(ConvDSLInputError) as info:
        net(*inputs)
    err = info.value
    assert str(err).startswith("<string>:")  # the file:line:col form, with caret
    return err


def xy(n=2, h=12, w=12):
    return torch.randn(n, 1, h, w), torch.randn(n, 2, h, w)


def test_wrong_number_and_kind_of_inputs(net):
    x, y = xy()
    assert "takes 2 inputs (x, y), got 1" in refused(net, x).message
    assert "takes 2 inputs (x, y), got 3" in refused(net, x, y, y).message
    err = refused(net, x, y.numpy())
    assert "input 'y' must be a torch.Tensor, got ndarray" in err.message and err.line == 1


@pytest.mark.parametrize("shape", [(2, 2, 12), (2, 2, 12, 12, 1), (2,), ()])
def test_wrong_rank_names_input_and_ranks(net, shape):
    x, _ = xy()
    err = refused(net, x, torch.randn(shape))
    assert "input 'y'" in err.message and "rank 4" in err.message
    assert f"(rank {len(shape)})" in err.message and (err.line, err.column) == (1, 27)


@pytest.mark.parametrize("dtype,name", [(torch.float64, "float64"), (torch.float16, "f16"),
                                        (torch.bfloat16, "bf16"), (torch.int64, "int64"),
                                        (torch.bool, "bool"), (torch.complex64, "complex64")])
def test_wrong_dtype_names_input(net, dtype, name):
    x, y = xy()
    err = refused(net, x.to(dtype), y)
    assert f"input 'x' is declared f32 but got {name}" in err.message and err.column == 7


def test_wrong_device_names_input(net):
    x, y = xy()
    err = refused(net, x, y.to("meta"))
    assert "input 'y' is on meta" in err.message and "parameters are on cpu" in err.message


def test_wrong_fixed_dim_names_input_and_dim(net):
    x, _ = xy()
    err = refused(net, x, torch.randn(2, 3, 12, 12))
    assert "input 'y' dim 1 must be 2" in err.message and "[2, 3, 12, 12]" in err.message


@pytest.mark.parametrize("which,shape", [(0, (3, 1, 12, 12)), (1, (2, 2, 12, 13))])
def test_inconsistent_symbols_name_both_places(net, which, shape):
    inputs = list(xy())
    inputs[which] = torch.randn(shape[0], inputs[which].shape[1], *shape[2:])
    err = refused(net, *inputs)
    assert "the same symbol must get the same value" in err.message
    assert "input 'x' dim" in err.message and "input 'y' dim" in err.message


def test_empty_dims_are_refused(net):
    x, y = xy(n=0)
    assert "input 'x' dim 0 (N) is empty" in refused(net, x, y).message


@pytest.mark.parametrize("h,lines,what", [
    (4, (2, 3), "kernel 5 is larger than the padded input 4"),  # both convs: either line
    (5, (4,), "window 2 is larger than the padded input 1"),
])
def test_inputs_too_small_name_the_layer_line_and_sizes(net, h, lines, what):
    err = refused(net, *xy(h=h, w=9))
    assert err.line in lines and what in err.message
    assert f"H={h} (input 'x' dim 2)" in err.message


@pytest.mark.parametrize("backend", BACKENDS)
def test_deconv_size_checked_against_symbolic_input_at_run_time(backend):
    src = """net D(x: f32[N, 2, H, W], s: f32[N, 1, S, S]) {
        return deconv(x, 1, kernel=3, stride=2, pad=same, size=(S, S))
    }"""
    net = compile_quiet(src, backend)
    assert net(torch.randn(1, 2, 4, 4), torch.randn(1, 1, 8, 8)).shape == (1, 1, 8, 8)
    with pytest.raises(ConvDSLInputError) as info:
        net(torch.randn(1, 2, 4, 4), torch.randn(1, 1, 11, 11))
    assert info.value.line == 2 and "size=" in info.value.message


@pytest.mark.parametrize("backend", BACKENDS)
def test_runtime_errors_leave_the_net_usable(backend):
    net = compile_quiet(SRC, backend)
    with pytest.raises(ConvDSLError):
        net(*xy(h=3))
    assert net(*xy()).shape == (2, 2, 4, 4)


# -- memory layouts ------------------------------------------------------------------------

LAYOUT_SRC = """net L(x: f32[N, 3, H, W], y: f32[N, 3, H, W]) {
    a = relu(conv(x, 4, kernel=3, pad=same))
    b = depthwise(y, 3, pad=same)
    c = concat(a, b)
    d = maxpool(c, 2)
    e = softmax(d)
    return dense(flatten(avgpool(e, output=2)), 5), d * 2
}"""


def _strided(t: torch.Tensor) -> torch.Tensor:
    n, c, h, w = t.shape
    wide = torch.zeros(n, c, 2 * h + 1, 2 * w + 3)
    wide[:, :, 1::2, 3::2] = t  # differentiable: the gradient flows back to t
    return wide[:, :, 1::2, 3::2]


# Differentiable ways to pass the values of a leaf in another memory layout.
LAYOUTS = {
    "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    "transposed": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3),
    "permuted": lambda t: t.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3),
    "strided": _strided,
    "offset": lambda t: torch.cat([torch.zeros(7), t.flatten()])[7:].view(t.shape),
    "batch_broadcast": lambda t: t.expand(2, *t.shape[1:]),  # stride 0 along N
}


@pytest.fixture(scope="module")
def layout_nets():
    nets = {b: compile_quiet(LAYOUT_SRC, b) for b in BACKENDS}
    nets["triton"].load_state_dict(nets["torch"].state_dict())
    return nets


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_layouts_give_the_contiguous_result(layout_nets, backend, layout):
    """Outputs and input gradients through an odd layout equal the torch
    backend's through a contiguous copy of the same values."""
    gen = torch.Generator().manual_seed(1)
    make = LAYOUTS[layout]
    x = torch.randn(1 if layout == "batch_broadcast" else 2, 3, 6, 5, generator=gen)
    y = torch.randn(2, 3, 6, 5, generator=gen)
    leaf, ref_leaf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    odd = make(leaf)
    assert not odd.is_contiguous() or layout == "offset"
    got = layout_nets[backend](odd, LAYOUTS["channels_last"](y))
    want = layout_nets["torch"](make(ref_leaf).contiguous(), y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    sum(o.sum() * (i + 1) for i, o in enumerate(got)).backward()
    sum(o.sum() * (i + 1) for i, o in enumerate(want)).backward()
    torch.testing.assert_close(leaf.grad, ref_leaf.grad, rtol=1e-4, atol=1e-5)
