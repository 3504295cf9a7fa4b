"""The convolution's gradient kernels (families/conv_grad.py) under Triton's interpreter.

Every net runs forward and backward on the triton backend with loss =
(out * seed).sum(); its input and parameter gradients are compared with an
independent reference: the same layer built from tests/reference.py
(F.conv1d/2d/3d on an explicitly padded input with groups, a flipped kernel,
the factors' outer product; the loop over a connection table's rows) under
PyTorch autograd — never with convdsl's own torch lowering.
"""
from __future__ import annotations

import itertools
import pathlib

import pytest
import torch

import convdsl
from convdsl.ir.types import symbol
from convdsl.triton import aot
from convdsl.triton.families import conv_grad, family
from convdsl.triton.families.conv import Tile

from ..reference import conv_by_torch, conv_table_loop, flip_kernel, outer_kernel

DTYPES = {"f32": torch.float32, "f16": torch.float16}
TOL = {"f32": 1e-4, "f16": 2e-2}  # relative to the largest reference value
OURS = ("_conv_dx", "_conv_dw", "_bias_grad")
TABLE = ((0, 1), (1, 2), (0, 2), (0, 1, 2), (2,))  # 5 outputs over 3 inputs


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
    monkeypatch.setattr(family("conv_dx"), "cpu_tile", Tile(16, 16, 16, 1, 1))
    monkeypatch.setattr(family("conv_dw"), "cpu_tile", Tile(16, 16, 16, 1, 1))
    monkeypatch.setitem(family("conv_dx").DIRECT, "cpu", [(16, 16)])
    monkeypatch.setitem(family("conv_dw").DIRECT, "cpu", [(16, 16)])
    monkeypatch.setitem(family("bias_grad").CONFIGS, "cpu",
                        [{"channel": (16, 16), "location": (16, 16), "tiled": (16, 16)}])


@pytest.fixture
def many_splits(monkeypatch):
    """Split-K on the interpreter too: many splits, then the second pass."""
    split = {"programs": 64, "min_steps": 1}
    monkeypatch.setitem(family("conv_dw").SPLIT, "cpu", split)
    monkeypatch.setitem(family("bias_grad").SPLIT, "cpu", split)
    monkeypatch.setattr(family("conv_dw"), "cpu_tile", Tile(16, 16, 16, 1, 1))
    monkeypatch.setitem(family("conv_dw").DIRECT, "cpu", [(16, 16)])
    monkeypatch.setitem(family("bias_grad").CONFIGS, "cpu",
                        [{"channel": (16, 16), "location": (16, 16), "tiled": (16, 16)}])


# -- nets and the reference ------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return fmt(v[0])
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(fmt(i) for i in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def ref_layer(x, p, layer, *, op="conv", connect=None, flip=False, separable=False, stride=1,
              pad="valid", dilation=1, groups=1, bias="channel", **_):
    """The layer `c = op(x, ...)` of net_source, from the references in
    tests/reference.py (out, kernel and multiplier are the weights' shapes)."""
    rank = x.dim() - 2
    if separable:
        w = outer_kernel([p[f"{layer}.weight_{d}"] for d in range(rank)])
    else:
        w = p[f"{layer}.weight"]
    if flip:
        w = flip_kernel(w)
    b = p.get(f"{layer}.bias")
    if connect is not None:
        return conv_table_loop(x, w, connect, b, stride=stride, pad=pad, dilation=dilation,
                               bias=bias)
    if op == "depthwise":
        groups = x.shape[1]
    return conv_by_torch(x, w, b, stride=stride, pad=pad, dilation=dilation, groups=groups,
                         bias=bias)


def net_source(shape, layer_kw, dtype="f32") -> str:
    kw = dict(layer_kw)
    op = kw.pop("op", "conv")
    out = kw.pop("out", None)
    head = ""
    if kw.get("connect") is not None:
        rows = ", ".join("[" + ", ".join(map(str, r)) + "]" for r in kw["connect"])
        head = f"table T = [{rows}]\n"
        kw["connect"] = "T"
    args = "".join(f", {k}={fmt(v)}" for k, v in kw.items())
    first = f"{out}, " if out is not None else ""
    dims = ", ".join(str(d) for d in shape[1:])
    return (f"{head}net A(x: {dtype}[N, {dims}]) {{\n"
            f"    c = {op}(x, {first}{args.lstrip(', ')})\n    return c\n}}\n")


def triton_net(src: str):
    net = convdsl.compile(src, backend="triton")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return net


def assert_close(got, want, dtype="f32", what=""):
    assert got is not None, f"no gradient for {what}"
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err} (scale {scale})"


def backward_program(net, key):
    return net._program._backward[key]


def check_grads(shape, layer_kw, dtype="f32", grad_x=True, x=None):
    """Triton forward + backward against the reference's autograd; returns the net."""
    net = triton_net(net_source(shape, layer_kw, dtype))
    if x is None:
        x = torch.randn(*shape).to(DTYPES[dtype])
    xi = x.clone().requires_grad_(grad_x)
    y = net(xi)
    seed = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    (y * seed).sum().backward()

    params = {k: v.detach().float().clone().requires_grad_(True)
              for k, v in net.named_parameters()}
    xr = x.detach().float().clone().requires_grad_(grad_x)
    yr = ref_layer(xr, params, "c", **layer_kw)
    assert y.shape == yr.shape
    (yr * seed.float()).sum().backward()

    if grad_x:
        assert xi.grad.dtype == x.dtype
        assert_close(xi.grad, xr.grad, dtype, "input")
    for name, p in net.named_parameters():
        assert p.grad.dtype == torch.float32
        assert_close(p.grad, params[name].grad, dtype, name)
    key = ("x",) if grad_x else ()
    assert not set(OURS) & set(backward_program(net, key).reference_ops())
    return net


# -- geometry ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(kernel=3),
    dict(kernel=3, stride=2, pad="same"),
    dict(kernel=(3, 2), pad=((1, 2), (0, 3)), dilation=(2, 1)),
    dict(kernel=(2, 3), stride=(2, 3), pad="full", flip=True),
], ids=lambda kw: "-".join(f"{k}{fmt(v)}" for k, v in kw.items()))
def test_conv2d_geometry(kw):
    check_grads((2, 3, 9, 8), dict(out=5, **kw))


def test_conv1d_dilated_strided():
    check_grads((2, 3, 23), dict(out=4, kernel=4, stride=2, pad="same", dilation=2))


def test_conv3d_location_bias():
    check_grads((1, 3, 5, 6, 7), dict(out=4, kernel=(2, 3, 2), stride=(1, 2, 2),
                                      pad=((1, 0), (1, 1), (0, 2)), bias="location"))


def test_groups():
    check_grads((2, 6, 9, 8), dict(out=4, kernel=3, groups=2, pad=1, dilation=2))


def test_stride_larger_than_kernel_leaves_zero_rows():
    """Stride 3, kernel 2: input rows no tap reaches get an exact zero gradient."""
    net = check_grads((2, 3, 10, 9), dict(out=4, kernel=2, stride=3, bias="none"))
    assert net.c.weight.grad is not None
    x = torch.randn(1, 3, 10, 9, requires_grad=True)
    net(x).sum().backward()
    assert torch.all(x.grad[:, :, 2::3] == 0) and torch.all(x.grad[:, :, :, 2::3] == 0)


# -- depthwise, tables, separable ---------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(kernel=3, multiplier=2, stride=2, pad="same", flip=True),
    dict(kernel=(3, 2), pad=((1, 0), (2, 1)), bias="location"),
], ids=["multiplier2-stride2-flip", "pairs-location"])
def test_depthwise(kw):
    net = check_grads((2, 3, 7, 6), dict(op="depthwise", **kw))
    program = backward_program(net, ("x",))
    assert all(p.meta["direct"] for p in program.plans if p.family in ("conv_dx", "conv_dw"))


def test_table_flip_stride():
    net = check_grads((2, 3, 7, 6), dict(out=5, kernel=3, connect=TABLE, flip=True,
                                         stride=(2, 1), pad="same"))
    grad = net.c.weight.grad
    for o, row in enumerate(TABLE):
        absent = [c for c in range(3) if c not in row]
        assert torch.all(grad[o, absent] == 0)  # exactly zero outside the table


def test_table_weights_outside_do_not_leak():
    """Weights outside the table never reach dx, whatever they hold."""
    src = net_source((2, 3, 7, 6), dict(out=5, kernel=3, connect=TABLE, pad="same"))
    net = triton_net(src)
    with torch.no_grad():
        for o, row in enumerate(TABLE):
            for c in range(3):
                if c not in row:
                    net.c.weight[o, c] = 1000.0
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    net(x).sum().backward()
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    xr = x.detach().clone().requires_grad_(True)
    ref_layer(xr, params, "c", kernel=3, connect=TABLE, pad="same").sum().backward()
    assert_close(x.grad, xr.grad, what="input")


@pytest.mark.parametrize("kw", [
    dict(out=4, kernel=(3, 2), pad="same", flip=True),
    dict(out=5, kernel=(3, 2), connect=TABLE, stride=2),
    dict(op="depthwise", kernel=3, multiplier=2, pad="same"),
], ids=["flip", "table-stride", "depthwise"])
def test_separable(kw):
    check_grads((2, 3, 7, 6), dict(separable=True, **kw))


def test_separable_1d_groups():
    check_grads((2, 4, 9), dict(out=4, kernel=3, separable=True, groups=2, pad="same"))


@pytest.mark.slow
def test_separable_3d():
    check_grads((1, 2, 5, 6, 7), dict(out=4, kernel=(2, 3, 2), separable=True,
                                      stride=(1, 2, 1), pad="same"))


# -- bias modes -------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["none", "channel", "location"])
def test_bias_modes(bias):
    check_grads((2, 3, 6, 5), dict(out=4, kernel=3, pad="same", bias=bias), grad_x=False)


def tiled_bias_reference(seed, tiles):
    """db[t, o] = sum of seed[n, o, p] over n and the positions p with p mod tiles = t."""
    rank = seed.dim() - 2
    out = torch.zeros(tuple(tiles) + (seed.shape[1],))
    for index in itertools.product(*(range(t) for t in tiles)):
        part = seed
        for axis, (t, at) in enumerate(zip(tiles, index)):
            part = part.index_select(2 + axis, torch.arange(at, seed.shape[2 + axis], t))
        out[index] = part.sum(dim=[0] + list(range(2, 2 + rank)))
    return out


@pytest.mark.parametrize("shape, tiles", [((2, 3, 7, 8), (2, 3)), ((2, 3, 11), (4,))])
def test_tiled_bias(shape, tiles):
    """tiled's bias gradient is a _bias_grad node too (its dx and dw are local's)."""
    dims = ", ".join(str(d) for d in shape[1:])
    src = (f"net A(x: f32[N, {dims}]) {{\n"
           f"    c = tiled(x, 4, kernel=2, tiles={fmt(tiles)})\n    return c\n}}\n")
    net = triton_net(src)
    y = net(torch.randn(*shape))
    seed = torch.randn(y.shape)
    (y * seed).sum().backward()
    assert_close(net.c.bias.grad, tiled_bias_reference(seed, tiles), what="bias")
    assert "_bias_grad" not in backward_program(net, ()).reference_ops()


# -- what needs a gradient, dtypes, layouts, block boundaries ----------------------------------

def test_first_layer_skips_input_gradient():
    net = check_grads((2, 3, 7, 6), dict(out=4, kernel=3, stride=2), grad_x=False)
    ops = [n.op for n in backward_program(net, ()).graph.nodes()]
    assert "_conv_dx" not in ops and "_conv_dw" in ops


def test_f16_input():
    check_grads((2, 5, 7, 6), dict(out=6, kernel=3, pad="same", bias="location"), dtype="f16")
    check_grads((2, 4, 7, 6), dict(op="depthwise", kernel=3, stride=2), dtype="f16")


def test_channels_last_input():
    x = torch.randn(2, 5, 8, 7).to(memory_format=torch.channels_last)
    check_grads((2, 5, 8, 7), dict(out=4, kernel=3, pad="same"), x=x)


def test_every_block_boundary(small_tiles):
    # Positions 2·5·7 = 70 (16 ∤), out/group = 20, channels/group = 17, taps 2.
    check_grads((2, 34, 5, 7), dict(out=40, kernel=2, pad="same", groups=2))
    # 17 channels, one per group: the direct kernels' channel blocks.
    check_grads((1, 17, 5, 6), dict(op="depthwise", kernel=3, stride=2, pad="same"))
    check_grads((2, 3, 7, 6), dict(out=5, kernel=3, connect=TABLE, pad="same"))


def test_split_k(many_splits):
    net = check_grads((2, 6, 9, 8), dict(out=4, kernel=3, groups=2, pad="same",
                                         bias="location"))
    (plan,) = [p for p in backward_program(net, ("x",)).plans if p.family == "conv_dw"]
    assert "def " + plan.meta["sum"] in plan.source
    check_grads((2, 3, 9, 8), dict(op="depthwise", kernel=3, multiplier=2, stride=2))
    check_grads((2, 3, 7, 6), dict(out=5, kernel=(3, 2), connect=TABLE, separable=True))


def test_split_k_tiled_bias(many_splits):
    test_tiled_bias((2, 3, 7, 8), (2, 3))


def test_packed_weights_as_on_gpu(monkeypatch):
    """The GPU re-lays dx's weight out as [*k, out, in]; run that path here too."""
    monkeypatch.setitem(family("conv_dx").pack_weights, "cpu", True)
    check_grads((2, 4, 6, 6), dict(out=5, kernel=3, pad="same", flip=True))
    check_grads((2, 4, 6, 5), dict(out=4, kernel=2, groups=2), dtype="f16")


def test_int64_indexing(monkeypatch):
    """INDEX_64 switches on at 2^31 elements; force it on small tensors to run that code."""
    monkeypatch.setattr(conv_grad, "needs_int64", lambda *t: True)
    check_grads((2, 3, 7, 6), dict(out=5, kernel=3, connect=TABLE, stride=2, pad="same",
                                   bias="location"))
    check_grads((2, 3, 7, 6), dict(op="depthwise", kernel=3, separable=True, multiplier=2))


# -- plans, cost, ahead of time --------------------------------------------------------------

def test_cost_counts_useful_work():
    src = net_source((2, 3, 9, 8), dict(out=5, kernel=3, connect=TABLE, stride=2))
    net = triton_net(src)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    net(x).sum().backward()
    program = backward_program(net, ("x",))
    plans = {p.family: p for p in program.plans}
    env = {symbol("N"): 2}
    connections = sum(len(r) for r in TABLE)
    positions = 2 * 4 * 3  # N · output positions
    for fam in ("conv_dx", "conv_dw"):
        flops, nbytes = family(fam).cost(plans[fam], program.graph, env)
        assert flops == 2 * positions * connections * 9 and nbytes > 0
    flops, nbytes = family("bias_grad").cost(plans["bias_grad"], program.graph, env)
    assert flops == 2 * 5 * 4 * 3 and nbytes == 4 * (2 * 5 * 4 * 3) + 4 * 5


AOT_NET = """table T = [[0, 1], [1, 2], [0, 2], [0, 1, 2], [2]]
net A(x: f32[N, 3, 9, 8], z: f16[N, 4, 7]) {
    a = conv(x, 5, kernel=3, connect=T, flip=true, stride=2, pad=same)
    b = depthwise(a, kernel=3, multiplier=2, pad=same, stride=2, bias=location)
    c = conv(b, 6, kernel=(3, 2), separable=true, pad=same, groups=2)
    d = conv(z, 4, kernel=3, dilation=2, pad=same)
    return c, d
}
"""


@pytest.mark.slow
def test_aot_compiles_backward_kernels(tmp_path):
    net = triton_net(AOT_NET)
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    z = torch.randn(2, 4, 7).half().requires_grad_(True)
    c, d = net(x, z)
    (c.sum() + d.float().sum()).backward()
    (program,) = net._program._backward.values()
    ours = [p for p in program.plans if p.family in ("conv_dx", "conv_dw", "bias_grad")]
    assert {p.family for p in ours} == {"conv_dx", "conv_dw", "bias_grad"}
    assert any(p.meta.get("direct") for p in ours) and any("factors" in p.meta for p in ours)
    # The second kernels (split sums, separable factors): compile_program builds plan.name only.
    extras = [(plan, name, sig, constexprs) for plan in ours
              for name, sig, constexprs in family(plan.family).aot_extra(plan, program.graph)]
    jobs = [{"source": plan.source, "name": name, "signature": sig, "constexprs": constexprs}
            for plan, name, sig, constexprs in extras]
    for target in ("sm_80", "sm_90"):
        reports = {r.name: r for r in aot.compile_program(program, target, None, {"N": 32})}
        for plan in ours:
            report = reports[plan.name]
            assert report.registers is not None and report.registers > 0, report
            assert report.spills == 0, report
            assert report.flops > 0 and report.bytes > 0
        compiled = aot.compile_many(jobs, aot.parse_target(target))
        for (plan, name, _, _), result in zip(extras, compiled):
            registers, spills = aot.resource_usage(result["cubin"], name, pathlib.Path(tmp_path))
            assert registers is not None and registers > 0 and spills == 0, name
