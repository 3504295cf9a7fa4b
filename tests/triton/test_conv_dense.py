"""The conv (implicit GEMM) and dense kernel families under Triton's interpreter.

Every forward is compared with an independent reference (tests/reference.py):
F.conv1d/2d/3d on an explicitly padded input, a direct loop over a connection
table's rows, or F.linear — never with convdsl's own torch lowering (except the backward check,
which compares the two backends' gradients).
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl.ir.types import symbol
from convdsl.triton.families import family
from convdsl.triton.families.conv import Tile, table_blocks

from ..reference import conv_by_torch, conv_table_loop, flip_kernel

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = {"f32": 1e-4, "f16": 2e-2, "bf16": 8e-2}  # relative to the output's largest value


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes: intra-op threads only add latency on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles, so small tensors straddle every block boundary."""
    monkeypatch.setattr(family("conv"), "cpu_tile", Tile(16, 16, 16, 1, 1))
    monkeypatch.setattr(family("dense"), "cpu_tile", Tile(16, 16, 16, 1, 1))


# -- helpers -----------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return fmt(v[0])  # one spatial dim: `(3)` would read as a parenthesized 3
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(fmt(i) for i in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def conv_net(shape, out, dtype="f32", **kw) -> str:
    args = "".join(f", {k}={fmt(v)}" for k, v in kw.items())
    dims = ", ".join(str(d) for d in shape)
    return f"net A(x: {dtype}[{dims}]) {{\n    c = conv(x, {out}{args})\n    return c\n}}\n"


def triton_net(src: str):
    net = convdsl.compile(src, backend="triton")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return net


def params(net) -> dict:
    """The net's parameters in float64, for the references."""
    return {k: v.detach().double() for k, v in net.named_parameters()}


def assert_close(got, want, dtype="f32"):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err} (scale {scale})"


def check_conv(shape, out, dtype="f32", x=None, **kw):
    net = triton_net(conv_net(shape, out, dtype, **kw))
    if x is None:
        x = torch.randn(*shape).to(DTYPES[dtype])
    y = net(x)
    assert y.dtype == x.dtype
    p = params(net)
    w = flip_kernel(p["c.weight"]) if kw.get("flip", False) else p["c.weight"]
    want = conv_by_torch(x.double(), w, p.get("c.bias"), stride=kw.get("stride", 1),
                         pad=kw.get("pad", "valid"), dilation=kw.get("dilation", 1),
                         groups=kw.get("groups", 1), bias=kw.get("bias", "channel"))
    assert_close(y, want, dtype)
    return net, y


# -- conv: geometry ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(kernel=3),
    dict(kernel=3, pad="same"),
    dict(kernel=(3, 2), pad="full"),
    dict(kernel=3, pad=((1, 2), (0, 3))),
    dict(kernel=(2, 3), stride=(2, 3), pad="same"),
    dict(kernel=3, stride=2, pad=1, dilation=(2, 1)),
    dict(kernel=(3, 3), dilation=2, pad="same", bias="none"),
], ids=lambda kw: "-".join(f"{k}{fmt(v)}" for k, v in kw.items()))
def test_conv2d_geometry(kw):
    check_conv((2, 3, 9, 8), 5, **kw)


def test_conv1d():
    check_conv((2, 4, 23), 6, kernel=4, stride=2, pad="same", dilation=2)


def test_conv3d():
    check_conv((1, 3, 5, 6, 7), 4, kernel=(2, 3, 2), stride=(1, 2, 1), pad=((1, 0), (1, 1), (0, 2)))


def test_groups():
    check_conv((2, 6, 7, 7), 4, kernel=3, groups=2, pad="same")


def test_flip_is_true_convolution():
    check_conv((1, 2, 6, 7), 3, kernel=(3, 2), flip=True, pad="full")
    check_conv((1, 2, 11), 3, kernel=4, flip=True, groups=1, stride=2)


@pytest.mark.parametrize("bias", ["none", "channel", "location"])
def test_bias_modes(bias):
    net, _ = check_conv((2, 3, 6, 5), 4, kernel=3, pad="same", bias=bias)
    assert ("bias_ptr" in next(iter(net.kernels.values()))) == (bias != "none")


# -- conv: connection tables -----------------------------------------------------------------

TABLE = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [0, 4, 5], [0, 1, 5], [0, 1, 2, 3],
         [1, 2, 3, 4], [2, 3, 4, 5], [0, 3, 4, 5], [0, 1, 4, 5], [0, 1, 2, 5], [0, 1, 3, 4],
         [1, 2, 4, 5], [0, 2, 3, 5], [0, 1, 2, 3, 4, 5], [5], [0, 5]]


def table_src(dtype="f32", bias="channel", flip=False):
    rows = ", ".join("[" + ", ".join(map(str, r)) + "]" for r in TABLE)
    return (f"table T = [{rows}]\n"
            f"net A(x: {dtype}[N, 6, 9, 8]) {{\n"
            f"    c = conv(x, {len(TABLE)}, kernel=3, pad=same, connect=T, bias={bias}, "
            f"flip={fmt(flip)})\n    return c\n}}\n")


@pytest.mark.parametrize("tiles", [False, True], ids=["cpu-tile", "small-tiles"])
def test_table(tiles, request):
    if tiles:
        request.getfixturevalue("small_tiles")
    net = triton_net(table_src(flip=tiles))
    x = torch.randn(1 if tiles else 2, 6, 9, 8)
    p = params(net)
    w = flip_kernel(p["c.weight"]) if tiles else p["c.weight"]
    assert_close(net(x), conv_table_loop(x.double(), w, TABLE, p["c.bias"], pad="same"))


def test_table_weights_outside_do_not_leak():
    net = triton_net(table_src(bias="none"))
    mask = torch.zeros(len(TABLE), 6, 1, 1)
    for o, row in enumerate(TABLE):
        mask[o, row] = 1
    with torch.no_grad():
        net.c.weight.copy_(torch.where(mask.bool(), net.c.weight, torch.tensor(1000.)))
    x = torch.randn(1, 6, 9, 8)
    assert_close(net(x), conv_table_loop(x.double(), params(net)["c.weight"], TABLE, pad="same"))


def test_table_blocks_are_unions_and_cost_counts_connections():
    start, chan, member = table_blocks(tuple(map(tuple, TABLE)), 6, 4, "cpu")
    assert start.tolist()[0] == 0 and len(start) == -(-len(TABLE) // 4) + 1
    assert chan[start[0]:start[1]].tolist() == [0, 1, 2, 3, 4, 5]
    assert chan[start[4]:start[5]].tolist() == [0, 5]  # rows 16, 17 read only inputs 0 and 5
    assert member.sum().item() == sum(len(r) for r in TABLE)
    net = triton_net(table_src(bias="none"))
    program = net._program.forward
    (plan,) = program.plans
    flops, nbytes = family("conv").cost(plan, program.graph, {symbol("N"): 2})
    connections = sum(len(r) for r in TABLE)
    assert flops == 2 * (2 * 9 * 8) * connections * 9
    assert nbytes == 4 * (2 * 6 * 9 * 8 + 2 * len(TABLE) * 9 * 8 + connections * 9)


# -- conv: sizes, dtypes, layouts ------------------------------------------------------------

def test_symbolic_sizes_two_sizes():
    src = conv_net(("N", 3, "H", "W"), 4, kernel=3, stride=2, pad="same")
    net = triton_net(src)
    p = params(net)
    for shape in [(1, 3, 7, 9), (2, 3, 12, 5)]:
        x = torch.randn(*shape)
        want = conv_by_torch(x.double(), p["c.weight"], p["c.bias"], stride=2, pad="same")
        assert_close(net(x), want)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_inputs(dtype):
    check_conv((2, 5, 7, 6), 6, dtype=dtype, kernel=3, pad="same", bias="location")


def test_channels_last_and_strided_inputs():
    x = torch.randn(2, 5, 8, 7).to(memory_format=torch.channels_last)
    net, y = check_conv((2, 5, 8, 7), 4, x=x, kernel=3, pad="same")
    assert y.is_contiguous(memory_format=torch.channels_last)
    wide = torch.randn(2, 5, 8, 14)
    check_conv((2, 5, 8, 7), 4, x=wide[..., ::2], kernel=3, stride=2)
    check_conv((2, 5, 8, 7), 4, x=torch.randn(2, 8, 7, 5).permute(0, 3, 1, 2), kernel=2)


def test_every_block_boundary(small_tiles):
    # M = 5·7 = 35 (16 ∤), out/group = 20, channels/group = 17: K blocks 16 + 1 per tap.
    check_conv((1, 34, 5, 7), 40, kernel=2, pad="same", groups=2)
    check_conv((3, 17, 5, 6), 33, kernel=(2, 1), stride=(1, 2))


def test_packed_weights_as_on_gpu(monkeypatch):
    """The GPU re-lays weights out as [*k, in, out]; run that path here too."""
    monkeypatch.setitem(family("conv").pack_weights, "cpu", True)
    monkeypatch.setitem(family("dense").convert_weights, "cpu", True)
    check_conv((2, 4, 6, 6), 5, kernel=3, pad="same", flip=True)
    check_conv((1, 4, 5, 6, 5), 4, dtype="bf16", kernel=2, groups=2)
    check_dense(6, 20, 9, "f16")


def test_int64_indexing(monkeypatch):
    """INDEX_64 switches on at 2^31 elements; force it on small tensors to run that code."""
    from convdsl.triton.families import conv as conv_module
    from convdsl.triton.families import dense as dense_module
    from convdsl.triton.families.base import needs_int64

    assert not needs_int64(torch.empty(1).expand(2**31 - 1))
    assert needs_int64(torch.empty(1).expand(2**31))
    monkeypatch.setattr(conv_module, "needs_int64", lambda *t: True)
    monkeypatch.setattr(dense_module, "needs_int64", lambda *t: True)
    check_conv((2, 4, 6, 5), 6, kernel=3, pad="same", groups=2, bias="location")
    check_dense(3, 20, 5)
    net = triton_net(table_src())
    x = torch.randn(1, 6, 9, 8)
    p = params(net)
    assert_close(net(x), conv_table_loop(x.double(), p["c.weight"], TABLE, p["c.bias"], pad="same"))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_small_convs(data):
    rank = data.draw(st.integers(1, 3), "rank")
    groups = data.draw(st.sampled_from([1, 2]), "groups")
    cin = groups * data.draw(st.integers(1, 3), "cin/g")
    out = groups * data.draw(st.integers(1, 3), "out/g")
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(data.draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(data.draw(st.integers(1, 2)) for _ in range(rank))
    pad = data.draw(st.sampled_from(["valid", "same", "full", "pairs"]), "pad")
    if pad == "pairs" and rank == 1:
        pad = data.draw(st.integers(0, 2), "pad int")
    elif pad == "pairs":
        pad = tuple((data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
                    for _ in range(rank))
    sizes = tuple(data.draw(st.integers(r * (k - 1) + 1, 5)) for k, r in zip(kernel, dilation))
    flip = data.draw(st.booleans(), "flip")
    bias = data.draw(st.sampled_from(["none", "channel"]), "bias")
    check_conv((2, cin) + sizes, out, kernel=kernel, stride=stride, dilation=dilation, pad=pad,
               groups=groups, flip=flip, bias=bias)


# -- dense -------------------------------------------------------------------------------------

def check_dense(n, features, out, dtype="f32", bias="channel"):
    src = (f"net D(x: {dtype}[N, {features}]) {{\n"
           f"    d = dense(x, {out}, bias={bias})\n    return d\n}}\n")
    net = triton_net(src)
    x = torch.randn(n, features).to(DTYPES[dtype])
    p = params(net)
    want = F.linear(x.double(), p["d.weight"], None if bias == "none" else p["d.bias"])
    y = net(x)
    assert y.dtype == x.dtype
    assert_close(y, want, dtype)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
@pytest.mark.parametrize("bias", ["none", "channel"])
def test_dense(dtype, bias):
    check_dense(5, 70, 11, dtype, bias)


def test_dense_block_boundaries(small_tiles):
    check_dense(35, 50, 17)  # 16 ∤ 35, 50, 17


def test_conv_dense_net():
    src = """
net A(x: f32[N, 3, 8, 8]) {
    c = conv(x, 8, kernel=3, pad=same, stride=2)
    d = dense(flatten(relu(c)), 10)
    return d
}
"""
    net = triton_net(src)
    x = torch.randn(2, 3, 8, 8)
    p = params(net)
    h = conv_by_torch(x.double(), p["c.weight"], p["c.bias"], stride=2, pad="same").relu()
    assert_close(net(x), F.linear(h.flatten(1), p["d.weight"], p["d.bias"]))


# -- gradients, naming, determinism ------------------------------------------------------------

BACKWARD_NETS = {
    "conv": """
net A(x: f32[N, 3, 5, 4]) {
    h = conv(x, 4, kernel=3, pad=same, flip=true, bias=location)
    return conv(tanh(h), 5, kernel=2, stride=2, groups=1)
}""",
    "conv-dense": """
net A(x: f32[N, 3, 5, 4]) {
    h = tanh(conv(x, 5, kernel=3, pad=same, bias=none))
    return dense(flatten(h), 4)
}""",
}


@pytest.mark.parametrize("which", ["conv", "conv-dense"])
def test_backward_matches_torch_backend(which):
    src = BACKWARD_NETS[which]
    tri = triton_net(src)
    ref = convdsl.compile(src, backend="torch")
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(2, 3, 5, 4)
    grads = []
    for net in (tri, ref):
        xi = x.clone().requires_grad_(True)
        net.zero_grad()
        net(xi).square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer", ["lambda", "tl", "pid"])
def test_layer_named_like_a_keyword(layer):
    src = (f"net A(x: f32[N, 2, 5, 5]) {{\n    {layer} = conv(x, 3, kernel=2)\n"
           f"    return dense(flatten({layer}), 2)\n}}\n")
    net = triton_net(src)
    for source in net.kernels.values():
        assert f"def {layer}" not in source
    x = torch.randn(1, 2, 5, 5)
    p = params(net)
    h = conv_by_torch(x.double(), p[f"{layer}.weight"], p[f"{layer}.bias"])
    want = F.linear(h.flatten(1), p["dense.weight"], p["dense.bias"])
    assert_close(net(x), want)


def test_source_is_deterministic():
    src = table_src() + conv_net(("N", 4, "L"), 6, kernel=3, pad="same", bias="none").replace(
        "net A", "net B")
    for name in ("A", "B"):
        a = convdsl.compile(src, net=name, backend="triton").kernels
        b = convdsl.compile(src, net=name, backend="triton").kernels
        assert a == b and a


def test_aot_signature_matches_kernel_arguments():
    from convdsl.triton.loader import load_kernel

    for src in (table_src(bias="location"), AOT_NETS["mixed"]):
        net = convdsl.compile(src, backend="triton")
        program = net._program.forward
        for plan in program.plans:
            if plan.family not in ("conv", "dense"):
                continue
            signature, constexprs = family(plan.family).aot(plan, program.graph)
            kernel = load_kernel(plan.source, plan.name, interpret=True)
            assert list(signature) == list(kernel.arg_names)
            assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)


# -- ahead-of-time compilation -------------------------------------------------------------------

AOT_NETS = {
    "resnet_bf16": """
net R(x: bf16[N, 64, H, W]) {
    a = relu(conv(x, 64, kernel=3, pad=same, bias=none))
    b = conv(a, 128, kernel=3, stride=2, pad=1)
    return conv(b, 256, kernel=1, bias=none)
}""",
    "mixed": """
table T = [[0, 1], [1, 2], [0, 2], [0, 1, 2]]
net M(x: f32[N, 3, 16, 16], v: f16[N, 4, L], u: f32[N, 2, 5, 6, 7]) {
    a = conv(x, 4, kernel=5, connect=T, bias=location, flip=true)
    b = conv(v, 8, kernel=3, dilation=2, groups=2)
    c = conv(u, 4, kernel=(2, 3, 3), pad=same)
    return dense(flatten(a), 10), b, c
}""",
}


def stack_bytes(cubin: bytes, name: str, tmp_path) -> int:
    """Stack frame per thread: ptxas puts spills there too (aot's LOCAL misses them)."""
    import subprocess

    from convdsl.triton.aot import _cuobjdump

    path = tmp_path / f"{name}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=False).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("net_name", sorted(AOT_NETS))
def test_aot_compiles_without_spills(net_name, target, tmp_path):
    from convdsl.triton.aot import compile_program

    net = convdsl.compile(AOT_NETS[net_name], backend="triton")
    reports = compile_program(net._program, target, tmp_path, {"N": 8, "H": 32, "W": 32, "L": 50})
    ours = [r for r in reports if r.family in ("conv", "dense")]
    assert ours
    for r in ours:
        print(target, r.name, "registers", r.registers, "spills", r.spills, "shared",
              r.shared_bytes, "flops", r.flops, "bytes", r.bytes)
        assert r.registers is not None and r.spills == 0, r
        assert stack_bytes((tmp_path / f"{r.name}.cubin").read_bytes(), r.name, tmp_path) == 0
        assert r.flops > 0 and r.bytes > 0
