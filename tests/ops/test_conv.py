"""Numerical tests of `conv` and `depthwise` (LANGUAGE.md §6, book eq. 9.4–9.8).

Every compiled result is compared with an independent reference: F.conv{1,2,3}d
on an explicitly padded input, or a direct loop over the book's equation where
PyTorch has no equivalent (connection tables, flip as true convolution, location
bias, separable outer products).  Forward values and the gradients w.r.t. the
input and every parameter are checked; a subset also runs gradcheck in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..reference import (
    conv_by_torch,
    conv_table_loop,
    keff,
    out_size,
    outer_kernel,
    per_dim,
    resolve_pads,
    tf_same_pads,
    true_convolution_full,
)
from .helpers import (
    assert_close,
    check_against,
    compile_net,
    gradcheck_net,
    one_layer,
    rand,
    randomize,
    shape_dict,
    single_thread,  # noqa: F401  (autouse fixture)
)


def fmt(v) -> str:
    """A Python int / str / (nested) tuple as .cdsl source."""
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(fmt(i) for i in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def decl(n, c, spatial):
    return f"x: f32[{', '.join(str(v) for v in (n, c) + tuple(spatial))}]"


# -- the TF `same` rule itself ---------------------------------------------------------------

@pytest.mark.parametrize("m,k,s,r,expected", [
    (5, 3, 2, 1, (1, 1)),   # out 3: total (3-1)*2+3-5 = 2
    (6, 3, 2, 1, (0, 1)),   # out 3: total 1 -> smaller half (0) before
    (4, 4, 1, 1, (1, 2)),   # even kernel, stride 1: total 3
    (7, 2, 2, 1, (0, 1)),
    (8, 1, 2, 1, (0, 0)),   # 1x1 stride 2: no padding
    (6, 3, 3, 1, (0, 0)),   # total max(3+3-6, 0) = 0
    (5, 3, 1, 2, (2, 2)),   # dilated k' = 5: total 4
    (10, 4, 2, 2, (2, 3)),  # k' = 7: out 5, total 8+7-10 = 5
])
def test_tf_same_rule_reference_values(m, k, s, r, expected):
    """Sanity of the test's own TF-rule helper against hand-computed values."""
    assert tf_same_pads(m, k, s, r) == expected


# -- conv against F.conv: ranks, stride, pads, dilation, groups -----------------------------

CONV_CASES = [
    # rank, C, spatial, out, kernel, stride, pad, dilation, groups
    (1, 3, (11,), 4, 3, 1, "valid", 1, 1),
    (1, 2, (10,), 3, 4, 2, "same", 1, 1),
    (1, 4, (9,), 4, 3, 2, "same", 2, 2),
    (1, 2, (7,), 2, 3, 1, "full", 1, 1),
    (1, 2, (8,), 3, 5, 3, 2, 1, 1),
    (1, 2, (9,), 3, 3, 2, "full", 2, 1),
    (2, 3, (7, 8), 4, 3, 1, "valid", 1, 1),
    (2, 3, (7, 8), 4, (3, 2), (2, 1), "same", 1, 1),
    (2, 4, (8, 7), 6, 3, 2, "same", (2, 1), 2),
    (2, 2, (6, 5), 3, (2, 3), 1, "full", 1, 1),
    (2, 2, (6, 5), 3, 3, 2, "full", 2, 1),
    (2, 3, (6, 6), 2, 3, 1, 1, 1, 1),
    (2, 3, (6, 7), 2, 3, (1, 2), (2, 0), 1, 1),                 # pad tuple
    (2, 3, (6, 7), 2, 3, 2, ((1, 2), (0, 3)), 1, 1),            # (before, after) pairs
    (2, 3, (6, 7), 2, 3, 1, (1, (0, 2)), 1, 1),                 # int and pair mixed
    (2, 6, (6, 6), 6, 3, 1, 1, 1, 3),                           # groups=3
    (2, 6, (5, 5), 3, 1, 1, "valid", 1, 3),                     # 1x1, groups=3
    (2, 4, (7, 6), 4, 3, 2, "valid", 2, 4),                     # groups = C
    (3, 2, (5, 6, 4), 3, 3, 1, "valid", 1, 1),
    (3, 2, (5, 6, 4), 4, (3, 2, 2), (2, 1, 2), "same", 1, 2),
    (3, 2, (4, 5, 5), 2, 2, 1, "full", (1, 2, 1), 1),
    (3, 3, (5, 4, 4), 3, 3, (1, 2, 1), ((1, 0), (0, 1), (1, 1)), 1, 1),
]


@pytest.mark.parametrize("optimize", [True, False], ids=["opt", "noopt"])
@pytest.mark.parametrize("rank,c,spatial,out,kernel,stride,pad,dilation,groups", CONV_CASES)
def test_conv_matches_torch(rank, c, spatial, out, kernel, stride, pad, dilation, groups, optimize):
    stmt = (f"y = conv(x, {out}, kernel={fmt(kernel)}, stride={fmt(stride)}, pad={fmt(pad)}, "
            f"dilation={fmt(dilation)}, groups={groups})")
    net = compile_net(one_layer(stmt, decl(2, c, spatial)), optimize=optimize)
    k = per_dim(kernel, rank)
    assert shape_dict(net) == {"y.weight": (out, c // groups) + k, "y.bias": (out,)}
    assert net.parameter_count() == out * (c // groups) * math.prod(k) + out
    randomize(net, seed=rank)
    pads = resolve_pads(pad, spatial, kernel, stride, dilation)
    st_, dl = per_dim(stride, rank), per_dim(dilation, rank)
    expected_shape = tuple(out_size(m, kk, s, b, a, r)
                           for m, kk, s, (b, a), r in zip(spatial, k, st_, pads, dl))
    if pad == "same":
        assert expected_shape == tuple(-(-m // s) for m, s in zip(spatial, st_))

    def ref(x, p):
        return conv_by_torch(x, p["y.weight"], p["y.bias"], stride=st_, pad=pads, dilation=dl,
                             groups=groups)

    x = rand(2, c, *spatial, seed=10 + rank)
    assert net(x).shape == (2, out) + expected_shape
    check_against(net, [x], ref)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("r", [1, 2])
def test_same_padding_tf_rule_symbolic_length(k, s, r):
    """pad=same on a symbolic length: output ceil(m/s) and TF's asymmetric
    padding, for odd and even m, every kernel/stride/dilation combination."""
    net = compile_net(one_layer(f"y = conv(x, 2, kernel={k}, stride={s}, pad=same, dilation={r})",
                                "x: f32[N, 2, L]"))
    randomize(net, seed=k * 10 + s)
    for m in (5, 6, 7, 8):
        pads = [tf_same_pads(m, k, s, r)]
        x = rand(1, 2, m, seed=m)
        y = net(x)
        assert y.shape == (1, 2, -(-m // s)), (m, k, s, r)
        w, b = net.state_dict()["y.weight"], net.state_dict()["y.bias"]
        assert_close(y.detach(), conv_by_torch(x, w, b, stride=(s,), pad=pads, dilation=(r,)),
                     f"m={m}")


@pytest.mark.parametrize("spatial", [(7, 8), (8, 7), (5, 6)])
def test_same_padding_2d_stride2_odd_even(spatial):
    net = compile_net(one_layer("y = conv(x, 3, kernel=(4, 3), stride=2, pad=same)",
                                decl(2, 2, spatial)))
    randomize(net, seed=3)
    pads = [tf_same_pads(m, k, 2) for m, k in zip(spatial, (4, 3))]
    check_against(net, [rand(2, 2, *spatial, seed=4)],
                  lambda x, p: conv_by_torch(x, p["y.weight"], p["y.bias"], stride=2, pad=pads))


# -- depthwise ------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,c,spatial,kernel,mult,stride,pad", [
    (1, 3, (9,), 3, 1, 1, "valid"),
    (1, 2, (10,), 4, 3, 2, "same"),
    (2, 3, (7, 6), 3, 2, 2, "same"),
    (2, 4, (6, 6), (3, 2), 1, 1, 1),
    (3, 2, (4, 5, 4), 2, 2, 1, "full"),
])
@pytest.mark.parametrize("optimize", [True, False], ids=["opt", "noopt"])
def test_depthwise_with_multiplier(rank, c, spatial, kernel, mult, stride, pad, optimize):
    net = compile_net(one_layer(
        f"y = depthwise(x, {fmt(kernel)}, multiplier={mult}, stride={fmt(stride)}, pad={fmt(pad)})",
        decl(2, c, spatial)), optimize=optimize)
    k = per_dim(kernel, rank)
    assert shape_dict(net) == {"y.weight": (c * mult, 1) + k, "y.bias": (c * mult,)}
    randomize(net, seed=5)
    pads = resolve_pads(pad, spatial, kernel, stride, 1)
    check_against(net, [rand(2, c, *spatial, seed=6)],
                  lambda x, p: conv_by_torch(x, p["y.weight"], p["y.bias"],
                                             stride=per_dim(stride, rank), pad=pads, groups=c))


def test_depthwise_separable_location_bias():
    net = compile_net(one_layer("y = depthwise(x, (3, 2), multiplier=2, separable=true, "
                                "bias=location, stride=2, pad=same)", decl(2, 3, (7, 6))))
    assert shape_dict(net) == {"y.weight_0": (6, 1, 3), "y.weight_1": (6, 1, 2),
                               "y.bias": (6, 4, 3)}
    randomize(net, seed=37)
    pads = [tf_same_pads(7, 3, 2), tf_same_pads(6, 2, 2)]
    check_against(net, [rand(2, 3, 7, 6, seed=38)], lambda x, p: conv_by_torch(
        x, outer_kernel([p["y.weight_0"], p["y.weight_1"]]), p["y.bias"], stride=2, pad=pads,
        groups=3, bias="location"))


def test_depthwise_channel_order():
    """Output channel c·m + j reads only input channel c (groups = C)."""
    net = compile_net(one_layer("y = depthwise(x, 1, multiplier=2, bias=none)", decl(1, 3, (4,))))
    with torch.no_grad():
        net.state_dict()["y.weight"].copy_(torch.arange(1.0, 7.0).view(6, 1, 1))
    x = torch.stack([torch.full((4,), 10.0 ** i) for i in range(3)]).unsqueeze(0)
    y = net(x)
    expected = torch.tensor([1.0, 2.0, 30.0, 40.0, 500.0, 600.0]).view(1, 6, 1).expand(1, 6, 4)
    assert torch.equal(y.detach(), expected)


# -- connection tables ----------------------------------------------------------------------

TABLE = [[0, 1], [1, 2], [0, 2], [2]]


def table_src(stmt, inputs):
    return one_layer(stmt, inputs, tables=f"table T = {TABLE}")


def test_table_forward_backward_and_zero_gradient_outside():
    net = compile_net(table_src("y = conv(x, 4, kernel=3, connect=T)", decl(2, 3, (5, 6))))
    assert shape_dict(net) == {"y.weight": (4, 3, 3, 3), "y.bias": (4,)}
    mask = torch.zeros(4, 3, dtype=torch.bool)
    for o, row in enumerate(TABLE):
        mask[o, row] = True
    # held at zero from the start
    w0 = net.state_dict()["y.weight"]
    assert torch.count_nonzero(w0[~mask]) == 0
    assert torch.count_nonzero(w0[mask]) > 0
    # entries outside the table are set non-zero here: the net must ignore them
    randomize(net, seed=7)
    grads = check_against(net, [rand(2, 3, 5, 6, seed=8)], lambda x, p: conv_table_loop(x, p["y.weight"], TABLE, p["y.bias"]))
    g = grads["y.weight"]
    assert torch.all(g[~mask] == 0), "gradient outside the connection table must be exactly 0"
    assert torch.all(g[mask].abs().sum(dim=-1).sum(dim=-1) > 0)


def test_table_stride_pad_dilation_no_bias():
    net = compile_net(table_src("y = conv(x, 4, kernel=(2, 3), connect=T, stride=2, pad=same, "
                                "dilation=(2, 1), bias=none)", decl(2, 3, (7, 6))))
    assert "y.bias" not in net.state_dict()
    randomize(net, seed=9)
    pads = [tf_same_pads(7, 2, 2, 2), tf_same_pads(6, 3, 2, 1)]
    check_against(net, [rand(2, 3, 7, 6, seed=10)],
                  lambda x, p: conv_table_loop(x, p["y.weight"], TABLE, stride=2, pad=pads,
                                               dilation=(2, 1)))


def test_table_1d_and_3d():
    net = compile_net(table_src("y = conv(x, 4, kernel=3, connect=T)", decl(2, 3, (7,))))
    randomize(net, seed=11)

    def ref1(x, p):
        w = p["y.weight"]
        cols = [sum(F.conv1d(x[:, l:l + 1], w[o:o + 1, l:l + 1]) for l in row) for o, row in enumerate(TABLE)]
        return torch.cat(cols, 1) + p["y.bias"].view(1, -1, 1)
    check_against(net, [rand(2, 3, 7, seed=12)], ref1)

    net = compile_net(table_src("y = conv(x, 4, kernel=2, connect=T)", decl(1, 3, (3, 4, 3))))
    randomize(net, seed=13)
    check_against(net, [rand(1, 3, 3, 4, 3, seed=14)],
                  lambda x, p: conv_table_loop(x, p["y.weight"], TABLE, p["y.bias"]))


def test_table_parameter_count_lenet_c3(capsys, tmp_path):
    """LeNet-5's C3: 60 connections × 25 taps + 16 biases = 1,516 parameters
    (not 16·6·25 + 16 = 2,416)."""
    src = """
table C3 = [[0,1,2], [1,2,3], [2,3,4], [3,4,5], [0,4,5], [0,1,5],
            [0,1,2,3], [1,2,3,4], [2,3,4,5], [0,3,4,5], [0,1,4,5], [0,1,2,5],
            [0,1,3,4], [1,2,4,5], [0,2,3,5], [0,1,2,3,4,5]]
net C(x: f32[N, 6, 14, 14]) {
    y = conv(x, 16, kernel=5, connect=C3)
    return y
}
"""
    net = compile_net(src)
    assert net.parameter_count() == 1516
    assert shape_dict(net)["y.weight"] == (16, 6, 5, 5)
    path = tmp_path / "c3.cdsl"
    path.write_text(src)
    from convdsl.cli import main

    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "parameters: 1,516" in out


def test_table_parameter_count_small():
    net = compile_net(table_src("y = conv(x, 4, kernel=3, connect=T)", decl(2, 3, (5, 6))))
    connections = sum(len(r) for r in TABLE)
    assert net.parameter_count() == connections * 9 + 4
    net = compile_net(table_src("y = conv(x, 4, kernel=(3, 2), connect=T, separable=true)",
                                decl(2, 3, (5, 6))))
    assert net.parameter_count() == connections * (3 + 2) + 4


def test_table_separable():
    net = compile_net(table_src("y = conv(x, 4, kernel=(3, 2), connect=T, separable=true)",
                                decl(2, 3, (5, 6))))
    assert shape_dict(net) == {"y.weight_0": (4, 3, 3), "y.weight_1": (4, 3, 2), "y.bias": (4,)}
    randomize(net, seed=15)
    grads = check_against(net, [rand(2, 3, 5, 6, seed=16)], lambda x, p: conv_table_loop(
        x, outer_kernel([p["y.weight_0"], p["y.weight_1"]]), TABLE, p["y.bias"]))
    mask = torch.zeros(4, 3, dtype=torch.bool)
    for o, row in enumerate(TABLE):
        mask[o, row] = True
    for name in ("y.weight_0", "y.weight_1"):
        assert torch.all(grads[name][~mask] == 0)


def test_table_conv_shared_by_plain_conv_keeps_table_or_is_rejected():
    import convdsl

    src = table_src("a = conv(x, 4, kernel=3, connect=T, pad=same)\n"
                    "    b = conv(x, 4, kernel=3, pad=same, share=a)", decl(1, 3, (5, 5)))
    src = src.replace("return y", "return a + b")
    try:
        net = compile_net(src)
    except convdsl.ConvDSLError:
        return  # rejecting the share is a fine resolution
    mask = torch.zeros(4, 3, dtype=torch.bool)
    for o, row in enumerate(TABLE):
        mask[o, row] = True
    randomize(net, seed=44)
    x = rand(1, 3, 5, 5, seed=45)
    net(x).sum().backward()
    grad = dict(net.named_parameters())["a.weight"].grad
    assert torch.all(grad[~mask] == 0), "connections outside the table are being trained"


# -- flip: true convolution (eq. 9.4) -------------------------------------------------------

@pytest.mark.parametrize("rank,c,spatial,kernel", [
    (1, 2, (5,), 3),
    (2, 2, (4, 3), 3),
    (2, 1, (3, 4), (2, 3)),
    (3, 1, (3, 3, 2), 2),
])
def test_flip_is_true_convolution(rank, c, spatial, kernel):
    """flip=true with pad=full is the full convolution S(i) = Σ_m I(m) K(i − m)
    summed over channels; with pad=valid, its interior."""
    k = per_dim(kernel, rank)
    for pad in ("full", "valid"):
        net = compile_net(one_layer(f"y = conv(x, 2, kernel={fmt(kernel)}, flip=true, pad={pad})",
                                    decl(2, c, spatial)))
        assert shape_dict(net)["y.weight"] == (2, c) + k
        randomize(net, seed=17)

        def ref(x, p, pad=pad):
            full = true_convolution_full(x, p["y.weight"])
            if pad == "valid":
                full = full[(slice(None), slice(None)) +
                            tuple(slice(kk - 1, m) for kk, m in zip(k, spatial))]
            return full + p["y.bias"].view(1, -1, *([1] * rank))
        check_against(net, [rand(2, c, *spatial, seed=18)], ref)


def test_flip_with_table_and_separable():
    """flip applies to the kernel a table or a separable factorization makes."""
    net = compile_net(table_src("y = conv(x, 4, kernel=(2, 3), connect=T, flip=true, pad=full)",
                                decl(1, 3, (3, 3))))
    randomize(net, seed=39)
    mask = torch.zeros(4, 3, 1, 1, dtype=torch.float64)
    for o, row in enumerate(TABLE):
        mask[o, row] = 1.0
    check_against(net, [rand(1, 3, 3, 3, seed=40)], lambda x, p: true_convolution_full(
        x, p["y.weight"] * mask) + p["y.bias"].view(1, -1, 1, 1))
    net = compile_net(one_layer("y = conv(x, 2, kernel=(2, 3), separable=true, flip=true, pad=full)",
                                decl(1, 2, (3, 2))))
    randomize(net, seed=41)
    check_against(net, [rand(1, 2, 3, 2, seed=42)], lambda x, p: true_convolution_full(
        x, outer_kernel([p["y.weight_0"], p["y.weight_1"]])) + p["y.bias"].view(1, -1, 1, 1))


def test_flip_differs_from_correlation_and_strided():
    """An asymmetric kernel: flip matters; with stride and same padding, flip
    is correlation with the reversed kernel."""
    net = compile_net(one_layer("y = conv(x, 3, kernel=(3, 2), flip=true, stride=2, pad=same)",
                                decl(2, 2, (7, 6))))
    randomize(net, seed=19)
    pads = [tf_same_pads(7, 3, 2), tf_same_pads(6, 2, 2)]
    x = rand(2, 2, 7, 6, seed=20)
    check_against(net, [x], lambda x, p: conv_by_torch(x, p["y.weight"].flip([2, 3]), p["y.bias"],
                                                        stride=2, pad=pads))
    w, b = net.state_dict()["y.weight"], net.state_dict()["y.bias"]
    unflipped = conv_by_torch(x, w, b, stride=2, pad=pads)
    assert not torch.allclose(net(x).detach(), unflipped, atol=1e-3)


# -- separable ------------------------------------------------------------------------------

@pytest.mark.parametrize("rank,c,spatial,out,kernel,stride,pad,groups", [
    (2, 3, (6, 7), 4, (3, 2), 1, "valid", 1),
    (2, 4, (7, 8), 4, 3, 2, "same", 2),
    (3, 2, (4, 5, 4), 3, (2, 3, 2), 1, 1, 1),
    (1, 2, (7,), 3, 3, 1, "full", 1),
])
def test_separable_outer_product(rank, c, spatial, out, kernel, stride, pad, groups):
    net = compile_net(one_layer(
        f"y = conv(x, {out}, kernel={fmt(kernel)}, stride={fmt(stride)}, pad={fmt(pad)}, "
        f"groups={groups}, separable=true)", decl(2, c, spatial)))
    k = per_dim(kernel, rank)
    expected = {f"y.weight_{d}": (out, c // groups, k[d]) for d in range(rank)}
    expected["y.bias"] = (out,)
    assert shape_dict(net) == expected
    assert net.parameter_count() == out * (c // groups) * sum(k) + out
    randomize(net, seed=21)
    pads = resolve_pads(pad, spatial, kernel, stride, 1)

    def ref(x, p):
        w = outer_kernel([p[f"y.weight_{d}"] for d in range(rank)])
        return conv_by_torch(x, w, p["y.bias"], stride=per_dim(stride, rank), pad=pads,
                             groups=groups)
    check_against(net, [rand(2, c, *spatial, seed=22)], ref)


def test_separable_kernel_is_rank_one():
    """The effective 2-D kernel has matrix rank 1 per (out, in): a gaussian-like
    bump factorizes; checked through the output of a delta input."""
    net = compile_net(one_layer("y = conv(x, 1, kernel=3, pad=1, separable=true, bias=none)",
                                decl(1, 1, (5, 5))))
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.5, 4.0])
    with torch.no_grad():
        net.state_dict()["y.weight_0"].copy_(a.view(1, 1, 3))
        net.state_dict()["y.weight_1"].copy_(b.view(1, 1, 3))
    delta = torch.zeros(1, 1, 5, 5)
    delta[0, 0, 2, 2] = 1.0
    y = net(delta).detach()[0, 0, 1:4, 1:4]
    # correlation of a delta reads the kernel reversed
    assert_close(y, torch.outer(a, b).flip([0, 1]), "delta response")


# -- bias modes -----------------------------------------------------------------------------

def test_bias_none():
    net = compile_net(one_layer("y = conv(x, 3, kernel=3, pad=same, bias=none)", decl(2, 2, (6, 5))))
    assert shape_dict(net) == {"y.weight": (3, 2, 3, 3)}
    randomize(net, seed=23)
    check_against(net, [rand(2, 2, 6, 5, seed=24)],
                  lambda x, p: conv_by_torch(x, p["y.weight"], None, pad=[(1, 1), (1, 1)]))


@pytest.mark.parametrize("rank,spatial,stride,pad", [
    (1, (9,), 2, "same"),
    (2, (7, 6), 2, "same"),
    (2, (6, 6), 1, "valid"),
    (3, (4, 5, 4), 1, 1),
])
def test_bias_location(rank, spatial, stride, pad):
    net = compile_net(one_layer(
        f"y = conv(x, 3, kernel=3, stride={stride}, pad={fmt(pad)}, bias=location)",
        decl(2, 2, spatial)))
    pads = resolve_pads(pad, spatial, 3, stride, 1)
    o = tuple(out_size(m, 3, stride, b, a) for m, (b, a) in zip(spatial, pads))
    assert shape_dict(net) == {"y.weight": (3, 2) + (3,) * rank, "y.bias": (3,) + o}
    assert net.parameter_count() == 3 * 2 * 3 ** rank + 3 * math.prod(o)
    randomize(net, seed=25)
    check_against(net, [rand(2, 2, *spatial, seed=26)],
                  lambda x, p: conv_by_torch(x, p["y.weight"], p["y.bias"], stride=stride, pad=pads,
                                             bias="location"))


def test_bias_location_each_unit_independent():
    """Loop check: output unit (o, i, j) gets bias[o, i, j] and nothing else."""
    net = compile_net(one_layer("y = conv(x, 2, kernel=1, bias=location, init=zeros)",
                                decl(1, 1, (2, 3))))
    b = torch.arange(12.0).view(2, 2, 3)
    net.load_state_dict({"y.weight": torch.zeros(2, 1, 1, 1), "y.bias": b})
    y = net(torch.randn(1, 1, 2, 3)).detach()
    for o in range(2):
        for i in range(2):
            for j in range(3):
                assert y[0, o, i, j] == b[o, i, j]


# -- symbolic sizes -------------------------------------------------------------------------

def test_symbolic_input_two_sizes():
    net = compile_net(one_layer("y = conv(x, 3, kernel=3, stride=2, pad=same, dilation=1)",
                                "x: f32[N, 2, H, W]"))
    randomize(net, seed=27)
    for n, h, w in ((2, 7, 9), (3, 10, 6)):
        pads = [tf_same_pads(h, 3, 2), tf_same_pads(w, 3, 2)]
        x = rand(n, 2, h, w, seed=h)
        assert net(x).shape == (n, 3, -(-h // 2), -(-w // 2))
        check_against(net, [x], lambda x, p, pads=pads: conv_by_torch(
            x, p["y.weight"], p["y.bias"], stride=2, pad=pads))


def test_symbolic_input_two_sizes_3d_valid_dilated():
    net = compile_net(one_layer("y = conv(x, 2, kernel=2, dilation=2, groups=2)",
                                "x: f32[N, 4, D, H, W]"))
    randomize(net, seed=28)
    for shape in ((1, 4, 4, 5, 3), (2, 4, 5, 3, 6)):
        x = rand(*shape, seed=sum(shape))
        check_against(net, [x], lambda x, p: conv_by_torch(x, p["y.weight"], p["y.bias"],
                                                            dilation=2, groups=2))


SYMBOLIC_PADS = ["valid", "full", "same", 1, (2, 0), ((1, 0), (2, 1))]


@pytest.mark.parametrize("pad", SYMBOLIC_PADS, ids=str)
@pytest.mark.parametrize("optimize", [True, False], ids=["opt", "noopt"])
def test_symbolic_sizes_every_pad_form(pad, optimize):
    """The same compiled net at two input sizes, for every form of pad=."""
    net = compile_net(one_layer(f"y = conv(x, 2, kernel=(3, 2), stride=(2, 1), dilation=(1, 2), "
                                f"pad={fmt(pad)})", "x: f32[N, 2, H, W]"), optimize=optimize)
    randomize(net, seed=43)
    for n, h, w in ((1, 6, 5), (2, 9, 8)):
        pads = resolve_pads(pad, (h, w), (3, 2), (2, 1), (1, 2))
        check_against(net, [rand(n, 2, h, w, seed=h)], lambda x, p, pads=pads: conv_by_torch(
            x, p["y.weight"], p["y.bias"], stride=(2, 1), pad=pads, dilation=(1, 2)))


# -- property test --------------------------------------------------------------------------

@st.composite
def conv_configs(draw):
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    c = groups * draw(st.integers(1, 2))
    out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    pad = draw(st.sampled_from(["valid", "same", "full", 0, 1, 2, "pairs"]))
    if pad == "pairs":
        pad = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(rank))
        if rank == 1:
            pad = pad[0][0]  # a 1-D pair would read as a 2-entry tuple; use an int
    max_m = {1: 9, 2: 7, 3: 5}[rank]
    spatial = tuple(draw(st.integers(keff(k, r), max(max_m, keff(k, r))))
                    for k, r in zip(kernel, dilation))
    bias = draw(st.sampled_from(["channel", "none"]))
    return rank, c, out, kernel, stride, dilation, pad, groups, spatial, bias


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_conv_property_matches_torch(cfg):
    rank, c, out, kernel, stride, dilation, pad, groups, spatial, bias = cfg
    stmt = (f"y = conv(x, {out}, kernel={fmt(kernel if rank > 1 else kernel[0])}, "
            f"stride={fmt(stride if rank > 1 else stride[0])}, pad={fmt(pad)}, "
            f"dilation={fmt(dilation if rank > 1 else dilation[0])}, groups={groups}, bias={bias})")
    net = compile_net(one_layer(stmt, decl(2, c, spatial)))
    randomize(net, seed=sum(spatial))
    pads = resolve_pads(pad, spatial, kernel, stride, dilation)

    def ref(x, p):
        return conv_by_torch(x, p["y.weight"], p.get("y.bias"), stride=stride, pad=pads,
                             dilation=dilation, groups=groups, bias=bias)
    check_against(net, [rand(2, c, *spatial, seed=len(spatial))], ref)


# -- gradcheck (float64) --------------------------------------------------------------------

@pytest.mark.parametrize("stmt,inputs,shape", [
    ("y = conv(x, 2, kernel=3, stride=2, pad=same, dilation=1, groups=2)", "x: f32[1, 4, 4, 3]",
     (1, 4, 4, 3)),
    ("y = conv(x, 2, kernel=2, stride=1, pad=((1, 0), (0, 2)), dilation=2)", "x: f32[1, 2, 4, 3]",
     (1, 2, 4, 3)),
    ("y = conv(x, 2, kernel=3, stride=2, pad=full, dilation=2)", "x: f32[2, 2, 5]", (2, 2, 5)),
    ("y = conv(x, 2, kernel=2, stride=(1, 2, 1), pad=same)", "x: f32[1, 2, 3, 3, 3]",
     (1, 2, 3, 3, 3)),
    ("y = conv(x, 3, kernel=(3, 2), separable=true, pad=same, stride=2)", "x: f32[1, 2, 5, 4]",
     (1, 2, 5, 4)),
    ("y = conv(x, 2, kernel=3, flip=true, bias=location, pad=1)", "x: f32[1, 2, 4, 3]",
     (1, 2, 4, 3)),
    ("y = depthwise(x, 3, multiplier=2, stride=2, pad=same)", "x: f32[1, 2, 4, 3]", (1, 2, 4, 3)),
])
def test_gradcheck_conv(stmt, inputs, shape):
    net = compile_net(one_layer(stmt, inputs))
    randomize(net, seed=29)
    assert gradcheck_net(net, [rand(*shape, seed=30, dtype=torch.float64)])


def test_gradcheck_table():
    net = compile_net(table_src("y = conv(x, 4, kernel=2, connect=T, stride=2, pad=same)",
                                "x: f32[1, 3, 4, 5]"))
    randomize(net, seed=31)
    assert gradcheck_net(net, [rand(1, 3, 4, 5, seed=32, dtype=torch.float64)])


def test_double_accepts_float64_and_matches():
    net = compile_net(one_layer("y = conv(x, 2, kernel=3, stride=2, pad=same)", "x: f32[1, 2, 6, 5]"))
    randomize(net, seed=33)
    w, b = (net.state_dict()[k].double() for k in ("y.weight", "y.bias"))
    net.double()
    x = rand(1, 2, 6, 5, seed=34, dtype=torch.float64)
    y = net(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y.detach(), conv_by_torch(x, w, b, stride=2, pad=[(0, 1), (1, 1)]),
                               rtol=1e-12, atol=1e-12)


# -- initializers and trainable= visible through the language --------------------------------

def test_init_zeros():
    net = compile_net(one_layer("y = conv(x, 4, kernel=3, init=zeros)", decl(2, 3, (6, 6))))
    for v in net.state_dict().values():
        assert torch.count_nonzero(v) == 0
    assert torch.count_nonzero(net(torch.randn(2, 3, 6, 6))) == 0


def test_init_normal_std():
    torch.manual_seed(0)
    net = compile_net(one_layer("y = conv(x, 64, kernel=5, init=normal(0.5))", decl(1, 32, (5, 5))))
    w = net.state_dict()["y.weight"]
    assert w.numel() == 64 * 32 * 25
    assert abs(float(w.std()) - 0.5) < 0.01
    assert abs(float(w.mean())) < 0.01
    assert torch.count_nonzero(net.state_dict()["y.bias"]) == 0  # biases start at zero


def test_init_edges_is_sobel():
    net = compile_net(one_layer("y = conv(x, 4, kernel=3, init=edges, pad=1)", decl(1, 1, (6, 6))))
    w = net.state_dict()["y.weight"]
    sobel_x = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    assert torch.equal(w[0, 0], sobel_x)
    assert torch.equal(w[1, 0], sobel_x.T)
    for o in range(4):
        assert float(w[o].sum()) == 0.0
    # as a detector: a ramp along x (columns) gives a constant interior response of 8
    ramp = torch.arange(6.0).repeat(6, 1).view(1, 1, 6, 6)
    y = net(ramp).detach()
    assert torch.all(y[0, 0, 1:-1, 1:-1] == 8.0)
    assert torch.all(y[0, 1, 1:-1, 1:-1] == 0.0)


def test_trainable_false():
    src = """
net T(x: f32[2, 2, 6, 6]) {
    f = conv(x, 3, kernel=3, trainable=false)
    y = conv(f, 2, kernel=3)
    return y
}
"""
    net = compile_net(src)
    params = dict(net.named_parameters())
    assert not params["f.weight"].requires_grad
    assert not params["f.bias"].requires_grad
    assert params["y.weight"].requires_grad
    assert net.parameter_count(trainable_only=True) == 2 * 3 * 9 + 2
    assert net.parameter_count() == 3 * 2 * 9 + 3 + 2 * 3 * 9 + 2
    randomize(net, seed=35)
    x = rand(2, 2, 6, 6, seed=36).requires_grad_(True)
    net(x).sum().backward()
    assert params["f.weight"].grad is None and params["f.bias"].grad is None
    assert params["y.weight"].grad is not None and x.grad is not None

    def ref(x, p):
        h = conv_by_torch(x, p["f.weight"], p["f.bias"])
        return conv_by_torch(h, p["y.weight"], p["y.bias"])
    check_against(net, [rand(2, 2, 6, 6, seed=37)], ref)
