"""Numerical tests of `local` (eq. 9.9), `tiled` (eq. 9.10), `deconv`
(eq. 9.12–9.14, incl. the tied autoencoder) and `dense` (LANGUAGE.md §6).

References are independent of convdsl: direct loops over the book's equations
for local and tiled, F.conv_transpose* and the adjoint of F.conv* for deconv,
F.linear for dense.  Forward values and gradients w.r.t. the input and every
parameter are compared; a subset also runs gradcheck in float64.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ..reference import (
    CONV_T,
    add_bias,
    conv_by_torch,
    deconv_by_adjoint,
    keff,
    local_loop,
    out_size,
    per_dim,
    resolve_pads,
    tf_same_pads,
    tiled_loop,
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
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(fmt(i) for i in v) + ")"
    return str(v)


def decl(n, c, spatial):
    return f"x: f32[{', '.join(str(v) for v in (n, c) + tuple(spatial))}]"


# -- local: eq. 9.9 -------------------------------------------------------------------------

LOCAL_CASES = [
    # rank, C, spatial, out, kernel, stride, pad, bias
    (1, 2, (7,), 3, 3, 1, "valid", "location"),
    (1, 2, (8,), 2, 2, 2, "same", "channel"),
    (2, 2, (5, 6), 3, (2, 3), (1, 2), 1, "location"),
    (2, 3, (5, 5), 2, 3, 2, "same", "channel"),
    (2, 2, (3, 4), 2, 2, 1, "full", "none"),
    (2, 2, (5, 4), 2, 2, 1, ((1, 0), (0, 2)), "location"),
    (3, 2, (3, 4, 3), 2, 2, 1, "valid", "location"),
]


@pytest.mark.parametrize("rank,c,spatial,out,kernel,stride,pad,bias", LOCAL_CASES)
def test_local_matches_eq_9_9(rank, c, spatial, out, kernel, stride, pad, bias):
    net = compile_net(one_layer(f"y = local(x, {out}, kernel={fmt(kernel)}, stride={fmt(stride)}, "
                                f"pad={fmt(pad)}, bias={bias})", decl(2, c, spatial)))
    k, s = per_dim(kernel, rank), per_dim(stride, rank)
    pads = resolve_pads(pad, spatial, kernel, stride)
    o = tuple(out_size(m, kk, ss, b, a) for m, kk, ss, (b, a) in zip(spatial, k, s, pads))
    expected = {"y.weight": (out,) + o + (c,) + k}
    if bias == "location":
        expected["y.bias"] = (out,) + o
    elif bias == "channel":
        expected["y.bias"] = (out,)
    assert shape_dict(net) == expected
    assert net.parameter_count() == sum(math.prod(v) for v in expected.values())
    randomize(net, seed=rank + 40)
    check_against(net, [rand(2, c, *spatial, seed=41)], lambda x, p: local_loop(
        x, p["y.weight"], p.get("y.bias"), stride=s, pad=pads, bias=bias))


def test_local_default_bias_is_location():
    net = compile_net(one_layer("y = local(x, 2, kernel=3)", decl(1, 1, (5, 6))))
    assert shape_dict(net) == {"y.weight": (2, 3, 4, 1, 3, 3), "y.bias": (2, 3, 4)}


def test_local_with_identical_kernels_is_conv():
    """Unsharing is the only difference: copying one kernel to every position
    gives F.conv2d's result."""
    net = compile_net(one_layer("y = local(x, 3, kernel=3, stride=2, pad=1, bias=channel)",
                                decl(2, 2, (6, 5))))
    k = rand(3, 2, 3, 3, seed=42)
    b = rand(3, seed=43)
    o = (3, 3)
    w = k.view(3, 1, 1, 2, 3, 3).expand(3, *o, 2, 3, 3).contiguous()
    net.load_state_dict({"y.weight": w, "y.bias": b})
    x = rand(2, 2, 6, 5, seed=44)
    assert_close(net(x).detach(), conv_by_torch(x, k, b, stride=2, pad=[(1, 1), (1, 1)]),
                 "local==conv")


def test_local_position_uses_its_own_kernel():
    """Only the kernel at position p affects output p: zero every kernel but
    one, and only that output unit (plus bias) is non-zero."""
    net = compile_net(one_layer("y = local(x, 1, kernel=2, bias=none)", decl(1, 1, (4, 4))))
    w = torch.zeros(1, 3, 3, 1, 2, 2)
    w[0, 1, 2, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    net.load_state_dict({"y.weight": w})
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = net(x).detach()
    expected = torch.zeros(1, 1, 3, 3)
    # window at rows 1..2, cols 2..3: [[6, 7], [10, 11]]
    expected[0, 0, 1, 2] = 1 * 6 + 2 * 7 + 3 * 10 + 4 * 11
    assert torch.equal(y, expected)


# -- tiled: eq. 9.10 ------------------------------------------------------------------------

TILED_CASES = [
    # rank, C, spatial, out, kernel, tiles, stride, pad, bias
    (1, 2, (8,), 3, 3, 2, 1, "valid", "tiled"),         # o = 6
    (1, 2, (9,), 2, 2, 3, 2, "same", "tiled"),          # o = 5: not a multiple of t
    (2, 2, (6, 7), 3, 3, (2, 3), 1, "valid", "tiled"),  # o = (4, 5)
    (2, 2, (7, 6), 2, (2, 3), 2, 2, 1, "channel"),
    (2, 3, (5, 5), 2, 3, (3, 2), 1, "same", "location"),
    (2, 2, (4, 5), 2, 2, 2, 1, "full", "none"),
    (3, 2, (4, 4, 3), 2, 2, (2, 1, 2), 1, "valid", "tiled"),
    (2, 2, (3, 6), 2, 2, (3, 2), (1, 2), "valid", "tiled"),  # o = (2, 3) < t along dim 0
]


@pytest.mark.parametrize("rank,c,spatial,out,kernel,tiles,stride,pad,bias", TILED_CASES)
def test_tiled_matches_eq_9_10(rank, c, spatial, out, kernel, tiles, stride, pad, bias):
    net = compile_net(one_layer(f"y = tiled(x, {out}, kernel={fmt(kernel)}, tiles={fmt(tiles)}, "
                                f"stride={fmt(stride)}, pad={fmt(pad)}, bias={bias})",
                                decl(2, c, spatial)))
    k, t, s = per_dim(kernel, rank), per_dim(tiles, rank), per_dim(stride, rank)
    pads = resolve_pads(pad, spatial, kernel, stride)
    o = tuple(out_size(m, kk, ss, b, a) for m, kk, ss, (b, a) in zip(spatial, k, s, pads))
    expected = {"y.weight": t + (out, c) + k}
    expected.update({"tiled": {"y.bias": t + (out,)}, "channel": {"y.bias": (out,)},
                     "location": {"y.bias": (out,) + o}, "none": {}}[bias])
    assert shape_dict(net) == expected
    randomize(net, seed=rank + 50)
    check_against(net, [rand(2, c, *spatial, seed=51)], lambda x, p: tiled_loop(
        x, p["y.weight"], p.get("y.bias"), stride=s, pad=pads, bias=bias))


def test_tiled_default_bias_is_tiled():
    net = compile_net(one_layer("y = tiled(x, 2, kernel=3, tiles=2)", decl(1, 1, (6, 6))))
    assert shape_dict(net) == {"y.weight": (2, 2, 2, 1, 3, 3), "y.bias": (2, 2, 2)}


def test_tiled_one_tile_is_conv():
    net = compile_net(one_layer("y = tiled(x, 3, kernel=(3, 2), tiles=1, stride=2, pad=same)",
                                decl(2, 2, (7, 6))))
    assert shape_dict(net) == {"y.weight": (1, 1, 3, 2, 3, 2), "y.bias": (1, 1, 3)}
    randomize(net, seed=52)
    pads = [tf_same_pads(7, 3, 2), tf_same_pads(6, 2, 2)]
    check_against(net, [rand(2, 2, 7, 6, seed=53)],
                  lambda x, p: conv_by_torch(x, p["y.weight"][0, 0], p["y.bias"][0, 0], stride=2,
                                             pad=pads))


def test_tiled_full_tiles_is_local():
    """tiles equal to the output size: every position its own kernel, as local."""
    net_t = compile_net(one_layer("y = tiled(x, 2, kernel=2, tiles=(3, 4), bias=none)",
                                  decl(2, 2, (4, 5))))
    net_l = compile_net(one_layer("y = local(x, 2, kernel=2, bias=none)", decl(2, 2, (4, 5))))
    wt = rand(3, 4, 2, 2, 2, 2, seed=54)                      # [t1, t2, out, in, k, k]
    net_t.load_state_dict({"y.weight": wt})
    net_l.load_state_dict({"y.weight": wt.permute(2, 0, 1, 3, 4, 5).contiguous()})  # [out, o, in, k]
    x = rand(2, 2, 4, 5, seed=55)
    # each against the loop reference (never compiler vs compiler)
    check_against(net_t, [x], lambda x, p: tiled_loop(x, p["y.weight"]))
    check_against(net_l, [x], lambda x, p: local_loop(x, p["y.weight"]))


@pytest.mark.parametrize("pad", ["same", "valid", "full", 1, ((0, 2), (1, 0))], ids=str)
@pytest.mark.parametrize("optimize", [True, False], ids=["opt", "noopt"])
def test_tiled_symbolic_size_two_sizes(pad, optimize):
    net = compile_net(one_layer(f"y = tiled(x, 2, kernel=3, tiles=(2, 3), stride=(1, 2), "
                                f"pad={fmt(pad)})", "x: f32[N, 2, H, W]"), optimize=optimize)
    randomize(net, seed=56)
    for n, h, w in ((1, 5, 7), (2, 8, 4)):
        pads = resolve_pads(pad, (h, w), 3, (1, 2))
        check_against(net, [rand(n, 2, h, w, seed=h)], lambda x, p, pads=pads: tiled_loop(
            x, p["y.weight"], p["y.bias"], stride=(1, 2), pad=pads))


# -- deconv against F.conv_transpose (symmetric integer padding) ----------------------------

DECONV_T_CASES = [
    # rank, Cin, spatial, out, kernel, stride, pad, dilation, extra (size − natural per dim)
    (1, 3, (5,), 2, 3, 2, 0, 1, (0,)),
    (1, 2, (4,), 3, 4, 3, 1, 1, (2,)),
    (1, 2, (4,), 2, 3, 1, 2, 1, (0,)),
    (2, 2, (3, 4), 3, 3, 2, 1, 1, (1, 0)),
    (2, 2, (3, 3), 2, (2, 3), (2, 1), (1, 0), 1, (1, 0)),
    (2, 2, (3, 4), 3, 3, 2, 1, 2, (0, 1)),
    (3, 2, (2, 3, 2), 2, 3, 2, 1, 1, (1, 0, 1)),
    (3, 2, (2, 2, 3), 2, 2, (1, 2, 3), 0, 1, (0, 1, 2)),
]


@pytest.mark.parametrize("rank,cin,spatial,out,kernel,stride,pad,dilation,extra", DECONV_T_CASES)
def test_deconv_matches_conv_transpose(rank, cin, spatial, out, kernel, stride, pad, dilation,
                                       extra):
    k, s, p, r = (per_dim(v, rank) for v in (kernel, stride, pad, dilation))
    natural = tuple((m - 1) * ss - 2 * pp + keff(kk, rr)
                    for m, ss, pp, kk, rr in zip(spatial, s, p, k, r))
    size = tuple(n + e for n, e in zip(natural, extra))
    size_arg = "" if not any(extra) else f", size={fmt(size if rank > 1 else size[0])}"
    net = compile_net(one_layer(
        f"y = deconv(x, {out}, kernel={fmt(kernel)}, stride={fmt(stride)}, pad={fmt(pad)}, "
        f"dilation={fmt(dilation)}{size_arg})", decl(2, cin, spatial)))
    assert shape_dict(net) == {"y.weight": (cin, out) + k, "y.bias": (out,)}
    randomize(net, seed=60 + rank)

    def ref(x, prm):
        return CONV_T[rank](x, prm["y.weight"], prm["y.bias"], stride=s, padding=p,
                            output_padding=extra, dilation=r)
    x = rand(2, cin, *spatial, seed=61)
    assert net(x).shape == (2, out) + size
    check_against(net, [x], ref)


# -- deconv against the adjoint of a conv (same, valid, pairs, size=) -----------------------

DECONV_ADJ_CASES = [
    # rank, Cin, spatial, out, kernel, stride, pad, size (None = natural)
    (1, 2, (4,), 3, 3, 2, "same", None),      # k' > s: total 1, out = 8
    (1, 2, (5,), 2, 4, 2, "same", None),      # total 2
    (1, 2, (4,), 2, 2, 3, "same", None),      # k' < s: total 0, out = m·s past the last tap
    (1, 2, (4,), 2, 3, 2, "valid", None),
    (1, 2, (4,), 2, 3, 2, "valid", 10),       # natural 9, size 10
    (2, 2, (3, 4), 3, 3, 2, "same", None),
    (2, 2, (3, 4), 2, (4, 3), (2, 3), "same", None),
    (2, 2, (3, 3), 2, 3, 2, ((1, 0), (0, 2)), None),
    (2, 2, (3, 3), 2, 3, 2, ((1, 0), (0, 2)), (7, 6)),  # natural (6, 5) + (1, 1)
    (2, 2, (3, 4), 2, 3, (1, 2), (1, (2, 0)), None),
    (3, 2, (2, 3, 2), 2, 3, 2, "same", None),
    (3, 2, (2, 2, 2), 2, 2, (2, 1, 2), "valid", (5, 3, 4)),
    (2, 2, (3, 2), 2, 3, (2, 3), "same", (5, 5)),      # same, size= below m·s: (m−1)·s + 1..
    (2, 2, (3, 3), 2, 4, 2, "same", (6, 5)),           # even kernel: crop moves with size
    (1, 2, (3,), 2, 1, 3, "same", 7),                  # 1-tap kernel, k' < s, size (m−1)·s + 1
    (1, 2, (4,), 2, 2, 3, "same", 11),                 # k' < s
]


@pytest.mark.parametrize("rank,cin,spatial,out,kernel,stride,pad,size", DECONV_ADJ_CASES)
def test_deconv_is_adjoint_of_conv(rank, cin, spatial, out, kernel, stride, pad, size):
    k, s = per_dim(kernel, rank), per_dim(stride, rank)
    if pad == "same":
        # TensorFlow's transpose rule: natural m·s; for an output size S the
        # crop is the `same` conv's before-padding at S (and that conv maps S to m)
        natural = tuple(m * ss for m, ss in zip(spatial, s))
        size_t = natural if size is None else per_dim(size, rank)
        for m, ss, sz in zip(spatial, s, size_t):
            assert -(-sz // ss) == m, "test case: size must be a same-conv preimage of m"
        before = [tf_same_pads(sz, kk, ss)[0] for sz, kk, ss in zip(size_t, k, s)]
    else:
        pairs = [(0, 0)] * rank if pad == "valid" else \
            [(v, v) if isinstance(v, int) else tuple(v) for v in per_dim(pad, rank)]
        before = [b for b, _ in pairs]
        natural = tuple((m - 1) * ss + kk - b - a for m, ss, kk, (b, a) in zip(spatial, s, k, pairs))
        size_t = natural if size is None else per_dim(size, rank)
    size_arg = "" if size is None else f", size={fmt(size)}"
    net = compile_net(one_layer(
        f"y = deconv(x, {out}, kernel={fmt(kernel)}, stride={fmt(stride)}, pad={fmt(pad)}{size_arg})",
        decl(2, cin, spatial)))
    randomize(net, seed=70 + rank)

    def ref(x, p):
        y = deconv_by_adjoint(x, p["y.weight"], stride=s, before=before, size=size_t)
        return add_bias(y, p["y.bias"])
    x = rand(2, cin, *spatial, seed=71)
    assert net(x).shape == (2, out) + size_t
    check_against(net, [x], ref)


def test_deconv_same_output_is_input_times_stride_symbolic():
    net = compile_net(one_layer("y = deconv(x, 2, kernel=3, stride=2, pad=same)",
                                "x: f32[N, 3, H, W]"))
    randomize(net, seed=72)
    for n, h, w in ((1, 3, 4), (2, 5, 2)):
        x = rand(n, 3, h, w, seed=h * w)
        assert net(x).shape == (n, 2, 2 * h, 2 * w)
        check_against(net, [x], lambda x, p, size=(2 * h, 2 * w): add_bias(
            deconv_by_adjoint(x, p["y.weight"], stride=(2, 2), before=(0, 0), size=size),
            p["y.bias"]))


@pytest.mark.parametrize("optimize", [True, False], ids=["opt", "noopt"])
def test_deconv_symbolic_pairs_and_size(optimize):
    """Asymmetric pads and a symbolic size= (`size=(H2, W2)` is not in the
    language, so the natural size) at two input sizes."""
    net = compile_net(one_layer("y = deconv(x, 2, kernel=(3, 2), stride=(2, 3), pad=((1, 0), (0, 1)))",
                                "x: f32[N, 3, H, W]"), optimize=optimize)
    randomize(net, seed=77)
    for n, h, w in ((1, 3, 2), (2, 4, 5)):
        size = ((h - 1) * 2 + 3 - 1, (w - 1) * 3 + 2 - 1)
        x = rand(n, 3, h, w, seed=h + w)
        assert net(x).shape == (n, 2) + size
        check_against(net, [x], lambda x, p, size=size: add_bias(
            deconv_by_adjoint(x, p["y.weight"], stride=(2, 3), before=(1, 0), size=size),
            p["y.bias"]))


def test_deconv_bias_none_and_location():
    net = compile_net(one_layer("y = deconv(x, 2, kernel=3, stride=2, bias=none)", decl(1, 2, (3, 3))))
    assert shape_dict(net) == {"y.weight": (2, 2, 3, 3)}
    randomize(net, seed=73)
    check_against(net, [rand(1, 2, 3, 3, seed=74)],
                  lambda x, p: F.conv_transpose2d(x, p["y.weight"], stride=2))
    net = compile_net(one_layer("y = deconv(x, 2, kernel=3, stride=2, bias=location)",
                                decl(1, 2, (3, 3))))
    assert shape_dict(net) == {"y.weight": (2, 2, 3, 3), "y.bias": (2, 7, 7)}
    randomize(net, seed=75)
    check_against(net, [rand(1, 2, 3, 3, seed=76)],
                  lambda x, p: F.conv_transpose2d(x, p["y.weight"], stride=2) + p["y.bias"])


# -- tied convolutional autoencoder: deconv(share=conv) -------------------------------------

TIED_SRC = """
net AE(x: f32[2, 2, 8, 6]) {
    h = conv(x, 4, kernel=3, stride=2, pad=same, name="enc")
    r = deconv(h, 2, kernel=3, stride=2, pad=same, share=enc)
    return r
}
"""


def tied_reference(x, p, uses=("conv", "deconv")):
    w = p["enc.weight"]
    w_conv = w if "conv" in uses else w.detach()
    w_dec = w if "deconv" in uses else w.detach()
    pads = [tf_same_pads(8, 3, 2), tf_same_pads(6, 3, 2)]
    h = conv_by_torch(x, w_conv, p["enc.bias"], stride=2, pad=pads)
    # F.conv_transpose with the same [out, in, k] tensor read as [in, out, k]:
    # full transposed output (9, 7), then the same crop TF uses (before 0).
    full = F.conv_transpose2d(h, w_dec, stride=2)
    return full[:, :, 0:8, 0:6] + p["r.bias"].view(1, -1, 1, 1)


def test_tied_deconv_shares_one_weight():
    net = compile_net(TIED_SRC)
    assert shape_dict(net) == {"enc.weight": (4, 2, 3, 3), "enc.bias": (4,), "r.bias": (2,)}
    assert net.parameter_count() == 4 * 2 * 9 + 4 + 2
    randomize(net, seed=80)
    x = rand(2, 2, 8, 6, seed=81)
    grads = check_against(net, [x], tied_reference)
    # the gradient is the sum of the two uses' contributions
    partial = []
    for use in ("conv", "deconv"):
        xr = x.double()
        pr = {k: v.detach().double().requires_grad_(True) for k, v in net.named_parameters()}
        y = tied_reference(xr, pr, uses=(use,))
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).double()
        (y * g).sum().backward()
        partial.append(pr["enc.weight"].grad)
    assert partial[0].abs().max() > 1e-3 and partial[1].abs().max() > 1e-3
    assert_close(grads["enc.weight"], partial[0] + partial[1], "accumulated tied gradient")


def test_tied_deconv_reference_by_adjoint():
    """The decoder half alone is the adjoint of the encoder's linear map."""
    net = compile_net(TIED_SRC)
    randomize(net, seed=82)

    def ref(x, p):
        pads = [tf_same_pads(8, 3, 2), tf_same_pads(6, 3, 2)]
        h = conv_by_torch(x, p["enc.weight"], p["enc.bias"], stride=2, pad=pads)
        r = deconv_by_adjoint(h, p["enc.weight"], stride=(2, 2),
                              before=(pads[0][0], pads[1][0]), size=(8, 6))
        return r + p["r.bias"].view(1, -1, 1, 1)
    check_against(net, [rand(2, 2, 8, 6, seed=83)], ref)


def test_tied_deconv_share_by_statement_name():
    """share= names the layer `h` even though `h` is also the bound tensor."""
    src = TIED_SRC.replace(', name="enc"', "").replace("share=enc", "share=h")
    net = compile_net(src)
    assert shape_dict(net) == {"h.weight": (4, 2, 3, 3), "h.bias": (4,), "r.bias": (2,)}
    randomize(net, seed=84)
    rename = {"h.weight": "enc.weight", "h.bias": "enc.bias", "r.bias": "r.bias"}
    check_against(net, [rand(2, 2, 8, 6, seed=85)],
                  lambda x, p: tied_reference(x, {rename[k]: v for k, v in p.items()}))


@pytest.mark.parametrize("pad", ["same", "valid"])
def test_tied_autoencoder_symbolic_size_restores_input_size(pad):
    """`size=(H, W)` on the tied decoder gives back the input size, odd or even;
    the decoder is the adjoint of the encoder's linear map at that size."""
    src = f"""
net AE(x: f32[N, 2, H, W]) {{
    h = conv(x, 3, kernel=3, stride=2, pad={pad})
    r = deconv(h, 2, kernel=3, stride=2, pad={pad}, share=h, size=(H, W))
    return r
}}
"""
    net = compile_net(src)
    randomize(net, seed=86)
    for n, hh, ww in ((1, 7, 9), (2, 8, 6)):
        pads = ([tf_same_pads(hh, 3, 2), tf_same_pads(ww, 3, 2)] if pad == "same"
                else [(0, 0), (0, 0)])

        def ref(x, p, pads=pads, hh=hh, ww=ww):
            h = conv_by_torch(x, p["h.weight"], p["h.bias"], stride=2, pad=pads)
            r = deconv_by_adjoint(h, p["h.weight"], stride=(2, 2),
                                  before=(pads[0][0], pads[1][0]), size=(hh, ww))
            return r + p["r.bias"].view(1, -1, 1, 1)
        x = rand(n, 2, hh, ww, seed=hh)
        assert net(x).shape == (n, 2, hh, ww)
        check_against(net, [x], ref)


TABLE = [[0, 1], [1, 2], [0, 2], [2]]


@pytest.mark.parametrize("encoder", [
    "conv(x, 4, kernel=3, connect=T)",
    "conv(x, 4, kernel=3, flip=true)",
    "conv(x, 4, kernel=3, groups=2)",
    "conv(x, 4, kernel=3, separable=true)",
])
def test_tied_deconv_rejects_convs_whose_weight_is_not_their_kernel(encoder):
    """A tied decoder is the transpose of the kernel the encoder applies; with a
    table, groups, flip or factors that is not the stored weight, so the
    compiler refuses rather than compute a different map."""
    import convdsl

    src = f"""
table T = {TABLE}
net AE(x: f32[1, 4, 6, 6]) {{
    h = {encoder}
    r = deconv(h, 4, kernel=3, share=h)
    return r
}}
"""
    with pytest.raises(convdsl.ConvDSLError, match="can only tie to a plain conv"):
        compile_net(src)


# -- dense ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", ["channel", "none"])
def test_dense_matches_linear(bias):
    net = compile_net(one_layer(f"y = dense(x, 5, bias={bias})", "x: f32[3, 7]"))
    expected = {"y.weight": (5, 7)}
    if bias == "channel":
        expected["y.bias"] = (5,)
    assert shape_dict(net) == expected
    randomize(net, seed=90)
    check_against(net, [rand(3, 7, seed=91)],
                  lambda x, p: F.linear(x, p["y.weight"], p.get("y.bias")))


def test_dense_symbolic_batch():
    net = compile_net(one_layer("y = dense(x, 4)", "x: f32[N, 6]"))
    randomize(net, seed=92)
    for n in (1, 5):
        check_against(net, [rand(n, 6, seed=n)],
                      lambda x, p: F.linear(x, p["y.weight"], p["y.bias"]))


def test_conv_flatten_dense_chain():
    src = """
net Net(x: f32[2, 2, 5, 4]) {
    h = conv(x, 3, kernel=3, pad=same)
    y = dense(flatten(h), 4)
    return y
}
"""
    net = compile_net(src)
    assert shape_dict(net)["y.weight"] == (4, 3 * 5 * 4)
    randomize(net, seed=93, scale=0.3)

    def ref(x, p):
        h = conv_by_torch(x, p["h.weight"], p["h.bias"], pad=[(1, 1), (1, 1)])
        return F.linear(torch.flatten(h, 1), p["y.weight"], p["y.bias"])
    check_against(net, [rand(2, 2, 5, 4, seed=94)], ref)


# -- gradcheck (float64) --------------------------------------------------------------------

@pytest.mark.parametrize("src,shape", [
    (one_layer("y = local(x, 2, kernel=2, stride=(1, 2), pad=same)", "x: f32[1, 2, 3, 4]"),
     (1, 2, 3, 4)),
    (one_layer("y = local(x, 2, kernel=2, stride=2, bias=channel)", "x: f32[1, 2, 5]"), (1, 2, 5)),
    (one_layer("y = tiled(x, 2, kernel=2, tiles=(2, 3), pad=1)", "x: f32[1, 2, 3, 4]"),
     (1, 2, 3, 4)),
    (one_layer("y = tiled(x, 2, kernel=2, tiles=2, stride=2)", "x: f32[1, 2, 7]"), (1, 2, 7)),
    (one_layer("y = deconv(x, 2, kernel=3, stride=2, pad=1, size=(6, 5))", "x: f32[1, 2, 3, 3]"),
     (1, 2, 3, 3)),
    (one_layer("y = deconv(x, 2, kernel=2, stride=3, pad=same)", "x: f32[1, 2, 3]"), (1, 2, 3)),
    (one_layer("y = dense(x, 3)", "x: f32[2, 5]"), (2, 5)),
    (TIED_SRC.replace("f32[2, 2, 8, 6]", "f32[1, 2, 4, 4]").replace("conv(x, 4", "conv(x, 3"),
     (1, 2, 4, 4)),
])
def test_gradcheck_local_tiled_deconv_dense(src, shape):
    net = compile_net(src)
    randomize(net, seed=95)
    assert gradcheck_net(net, [rand(*shape, seed=96, dtype=torch.float64)])
