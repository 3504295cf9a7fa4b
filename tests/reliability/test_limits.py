"""Deep and large programs: nesting hundreds deep works, beyond the limits of
convdsl/limits.py is a ConvDSLError at the right line; thousands of layers
work; absurd sizes are refused before anything is allocated."""
from __future__ import annotations

import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl import ConvDSLError, ConvDSLInputError
from convdsl.limits import MAX_BLOCK_DEPTH, MAX_NESTING

from .harness import check_cli

X = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(0))


def net_returning(expr: str, decl: str = "f32[N, 2, H, W]", prelude: str = "") -> str:
    return f"{prelude}net A(x: {decl}) {{\n    return {expr}\n}}\n"


def compile_quiet(src: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convdsl.compile(src, **kw)


# (name, expression nested `depth` deep, what it computes)
NESTED = {
    "calls": (lambda d: "relu(" * d + "x" + ")" * d, lambda x, d: F.relu(x)),
    "negation": (lambda d: "-" * d + "x", lambda x, d: x if d % 2 == 0 else -x),
    "parentheses": (lambda d: "(" * d + "x" + ")" * d, lambda x, d: x),
    "sums": (lambda d: "x" + " + x" * d, lambda x, d: x * (d + 1)),
    "constant arithmetic": (lambda d: "x * (" + "1 + " * d + "1)", lambda x, d: x * (d + 1)),
    "scalar chains": (lambda d: "x" + " * 1" * d, lambda x, d: x),
}


@pytest.mark.parametrize("kind", sorted(NESTED))
def test_nesting_hundreds_deep_works(kind):
    make, expected = NESTED[kind]
    depth = MAX_NESTING - 20
    limit = sys.getrecursionlimit()
    net = compile_quiet(net_returning(make(depth)))
    torch.testing.assert_close(net(X), expected(X, depth), rtol=1e-5, atol=1e-4)
    assert sys.getrecursionlimit() == limit  # raised only while compiling


@pytest.mark.parametrize("kind", sorted(set(NESTED) - {"parentheses"}))
@pytest.mark.parametrize("depth", [MAX_NESTING + 10, 3_000])
def test_nesting_past_the_limit_is_a_clear_error(kind, depth, tmp_path):
    src = net_returning(NESTED[kind][0](depth))
    with pytest.raises(ConvDSLError) as info:
        compile_quiet(src)
    assert info.value.line == 2 and f"more than {MAX_NESTING} levels" in info.value.message
    assert check_cli(src, tmp_path) == 1


@pytest.mark.parametrize("src", [
    "table T = " + "[" * 600 + "0" + "]" * 600 + "\n" + net_returning("x"),
    net_returning("conv(x, 2, kernel=" + "(" * 600 + "1" + ",)" * 600 + ")"),
], ids=["list", "tuple"])
def test_deeply_nested_literals_are_a_clear_error(src):
    with pytest.raises(ConvDSLError, match="nest more than"):
        compile_quiet(src)


def chain_of_blocks(depth: int) -> str:
    """block b0 calls b1 calls ... b<depth-1>, passing k down; the last has a layer."""
    blocks = [f"block b{i}(x, k) {{ return b{i + 1}(x, k) }}" for i in range(depth - 1)]
    blocks.append(f"block b{depth - 1}(x, k) {{ return conv(x, 2, kernel=k, pad=same) }}")
    return "\n".join(blocks) + "\n" + net_returning("b0(x, 3)")


def test_blocks_calling_blocks_hundreds_deep_work():
    depth = MAX_BLOCK_DEPTH - 10
    net = compile_quiet(chain_of_blocks(depth))
    layer = "b0." + ".".join(f"b{i}" for i in range(1, depth)) + ".conv"
    assert list(net.state_dict()) == [f"{layer}.weight", f"{layer}.bias"]
    params = net.state_dict()
    want = F.conv2d(X, params[f"{layer}.weight"], params[f"{layer}.bias"], padding=1)
    torch.testing.assert_close(net(X), want)


def test_blocks_past_the_depth_limit_are_a_clear_error(tmp_path):
    src = chain_of_blocks(MAX_BLOCK_DEPTH + 50)
    with pytest.raises(ConvDSLError) as info:
        compile_quiet(src)
    assert f"more than {MAX_BLOCK_DEPTH} deep" in info.value.message
    assert info.value.line == MAX_BLOCK_DEPTH  # the call that would go one level deeper
    assert check_cli(src, tmp_path) == 1


def test_mutual_recursion_through_many_blocks_is_reported():
    blocks = "\n".join(f"block b{i}(x) {{ return b{(i + 1) % 300}(x) }}" for i in range(300))
    with pytest.raises(ConvDSLError, match="calls itself"):
        compile_quiet(blocks + "\n" + net_returning("b0(x)"))


def layer_stack(layers: int) -> str:
    lines = ["net Big(x: f32[N, 2, H, W]) {", "    h = x"]
    lines += ["    h = relu(conv(h, 2, kernel=1, init=normal(0.5)))"] * layers
    return "\n".join(lines + ["    return h", "}"])


def run_stack(layers: int, backward: bool) -> None:
    start = time.process_time()
    net = compile_quiet(layer_stack(layers))
    assert len(net.state_dict()) == 2 * layers
    x = torch.randn(1, 2, 3, 3)
    want, params = x, net.state_dict()
    for i in range(layers):  # `h = x` is the first binding of h: layers are h_2, h_3, ...
        want = F.relu(F.conv2d(want, params[f"h_{i + 2}.weight"], params[f"h_{i + 2}.bias"]))
    torch.testing.assert_close(net(x), want)
    if backward:
        net(x).sum().backward()
        assert all(p.grad is not None for p in net.parameters())
    print(f"\n{layers} layers: {time.process_time() - start:.1f} s of CPU")


def test_a_thousand_layers_compile_and_run():
    run_stack(1000, backward=False)


@pytest.mark.slow
def test_five_thousand_layers_compile_run_and_train():
    run_stack(5000, backward=True)


# -- absurd sizes: refused before anything is allocated -------------------------------------

@pytest.fixture
def no_parameter_allocation(monkeypatch):
    """Fail the test if the net's parameters are ever initialized."""
    import convdsl.module

    def refuse(decl, *args, **kwargs):
        raise AssertionError(f"allocated {decl.name} of shape {decl.shape}")

    monkeypatch.setattr(convdsl.module, "initialize", refuse)


@pytest.mark.parametrize("expr,decl", [
    ("conv(x, 1000000000, kernel=1000)", "f32[N, 2, H, W]"),               # 2e15 weights
    ("dense(flatten(x), 10)", "f32[N, 3, 1000000000000, 1000000000000]"),  # input dims 10^12
    ("local(x, 4, 3)", "f32[N, 2, 100000, 100000]"),
    ("conv(x, 2, 1, bias=location)", "f32[N, 2, 1000000, 1000000]"),
    ("tiled(x, 2, 3, tiles=(40000, 40000))", "f32[N, 2, 50000, 50000]"),
])
def test_a_parameter_larger_than_memory_is_refused_at_its_line(expr, decl, tmp_path,
                                                               no_parameter_allocation):
    src = net_returning(expr, decl)
    start = time.process_time()
    with pytest.raises(ConvDSLError) as info:
        compile_quiet(src)
    assert info.value.line == 2 and "CONVDSL_MAX_PARAMS" in info.value.message
    assert time.process_time() - start < 5
    assert check_cli(src, tmp_path) == 1


def test_the_parameter_bound_counts_the_whole_net(monkeypatch):
    src = net_returning("conv(conv(x, 4, kernel=1), 4, kernel=1)")  # 12 + 20 parameters
    monkeypatch.setenv("CONVDSL_MAX_PARAMS", "32")
    assert compile_quiet(src).parameter_count() == 32
    monkeypatch.setenv("CONVDSL_MAX_PARAMS", "31")
    with pytest.raises(ConvDSLError, match="brings the net to 32"):
        compile_quiet(src)


def test_input_dims_of_ten_to_the_twelve_compile_symbolically():
    net = compile_quiet(net_returning("avgpool(relu(conv(x, 4, kernel=3)), output=1)",
                                      "f32[N, 3, 1000000000000, 1000000000000]"))
    assert "999999999998" in net.ir("parsed")
    with pytest.raises(ConvDSLInputError, match="dim 2 must be 1000000000000"):
        net(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("expr,message", [
    ("conv(x, 2, kernel=3, stride=3000000000)", "stride= 3000000000 is too large"),
    ("maxpool(x, output=(4294967296, 2))", "output= 4294967296 is too large"),
    ("conv(x, 2, kernel=1, dilation=(1, 2147483648))", "too large"),
    ("conv(x, 2, kernel=" + "9" * 5000 + ")", "is too large (the largest is 2^63 - 1)"),
    ("x * 1e400", "too large for a float"),
    ("x * (1e300 * 1e300)", "not a finite number"),
    ("x * (9223372036854775807 + 1)", "must fit in 64 bits"),
    ("conv(x, 2, 3, init=gabor(orientations=100000, phases=100000))", "more than 65,536"),
    ("conv(x, 2, 3, init=gabor(orientations=2.5))", "takes a count >= 1"),
    ("conv(x, 2, 3, init=gaussian([1, 2, 3]))", "one per spatial dim"),
    ("conv(x, 2, 3, init=normal([1.0]))", "must be one number"),
    ("conv(x, 2, 3, init=uniform(1, -1))", "needs a <= b"),
    ("wavgpool(x, 2, sigma=1e-300)", "sigma= must be >= 1e-6"),
])
def test_absurd_arguments_are_clear_errors(expr, message, no_parameter_allocation):
    with pytest.raises(ConvDSLError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("^", r"\^").replace("+", r"\+").replace("*", r"\*")) as info:
        compile_quiet(net_returning(expr))
    assert info.value.line == 2


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("expr,what", [
    ("conv(x, 2, kernel=2, dilation=100000000, pad=same)", "padded input"),
    ("maxpool(x, output=(200000, 200000))", "output of shape"),
    ("deconv(x, 2, kernel=1, stride=(1000000000, 1000000000))", "output of shape"),
])
def test_run_time_tensors_beyond_the_bound_are_refused_before_allocation(expr, what, backend):
    net = compile_quiet(net_returning(expr), backend=backend)
    with pytest.raises(ConvDSLInputError) as info:
        net(X)
    assert info.value.line == 2 and what in info.value.message
    assert "CONVDSL_MAX_TENSOR_ELEMENTS" in info.value.message or "2^31" in info.value.message
