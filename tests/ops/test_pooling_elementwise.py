"""Numerical tests of compiled nets: pooling (9.3), the detector stage (activations,
softmax) and structure ops (flatten, concat, split, arithmetic).

Every compiled result is compared with an INDEPENDENT reference, never with the
compiler itself:

* PyTorch built-ins where they implement the same definition (F.max_pool*d,
  F.avg_pool*d with count_include_pad=False, F.lp_pool*d for p=2 without
  padding, F.adaptive_max/avg_pool*d, torch.relu, torch.softmax, torch.cat ...);
* a direct Python loop over the definitions in LANGUAGE.md §6 (`pool_loop` and
  `maxout_loop` in tests/reference.py) for what PyTorch lacks: wavgpool, lppool
  with p != 2 or padding, max/avg with padding larger than PyTorch accepts or
  asymmetric (before, after) pairs, adaptive lppool/wavgpool, maxout.  The loop
  is written with differentiable torch ops (stack/max/sum over the gathered
  window values), so its autograd gives the reference gradient.

Forward values are checked in float32 against the float64 reference; input
gradients against the reference's autograd; and `torch.autograd.gradcheck`
runs in float64 (after `net.double()`) on tiny shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl

from ..cdsl_source import one_input_net, pool_expr
from ..reference import (
    adaptive_cells,
    maxout_loop,
    per_dim,
    pool_loop,
    resolve_pads,
    window_cells,
)

F64 = torch.float64
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
KINDS = ("maxpool", "avgpool", "lppool", "wavgpool")

_TORCH_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_TORCH_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_TORCH_LP = {1: F.lp_pool1d, 2: F.lp_pool2d, 3: getattr(F, "lp_pool3d", None)}
_TORCH_AMAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_TORCH_AAVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (30x for adaptive pooling on a busy
    2-core machine), so run this module single-threaded and restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------

_NETS: dict[tuple[str, bool], torch.nn.Module] = {}


def compile_net(src: str, double: bool = False) -> torch.nn.Module:
    """Compile (cached per source text); `double=True` gives a float64 copy for gradcheck."""
    key = (src, double)
    if key not in _NETS:
        net = convdsl.compile(src, backend="torch")
        _NETS[key] = net.double() if double else net
    return _NETS[key]


# --------------------------------------------------------------------------------------
# Inputs and comparison helpers
# --------------------------------------------------------------------------------------

def distinct(*shape, dtype=torch.float32) -> torch.Tensor:
    """Distinct nonzero values in [-1, 1] with gaps >> gradcheck's eps: no ties for max
    pooling, no zeros for Lp pooling."""
    n = math.prod(shape)
    v = (torch.randperm(n).to(F64) - n / 2 + 0.25) * (2.0 / n)
    return v.reshape(shape).to(dtype)


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def check_forward_backward(net, ref_fn, *inputs, atol=1e-5, rtol=1e-5, gatol=1e-5, grtol=1e-4):
    """net(*inputs) (float32) against ref_fn (float64): values, dtypes, shapes and the
    input gradients for one random upstream gradient."""
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    outs = as_tuple(net(*xs))
    rs = [t.detach().to(F64).requires_grad_() for t in inputs]
    refs = as_tuple(ref_fn(*rs))
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.dtype == inputs[0].dtype
        assert o.shape == r.shape, (o.shape, r.shape)
        torch.testing.assert_close(o.detach().to(F64), r.detach(), atol=atol, rtol=rtol)
    ups = [torch.randn(r.shape, dtype=F64) for r in refs]
    got = torch.autograd.grad(outs, xs, [u.to(o.dtype) for u, o in zip(ups, outs)], allow_unused=True)
    want = torch.autograd.grad(refs, rs, ups, allow_unused=True)
    for g, w, x in zip(got, want, xs):
        g = torch.zeros_like(x) if g is None else g
        w = torch.zeros_like(x, dtype=F64) if w is None else w
        assert g.dtype == x.dtype
        torch.testing.assert_close(g.to(F64), w, atol=gatol, rtol=grtol)
    return outs


def gradcheck_net(src: str, *inputs):
    net = compile_net(src, double=True)
    xs = tuple(t.detach().to(F64).requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(lambda *a: net(*a), xs, eps=1e-6, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Pooling against PyTorch built-ins
# --------------------------------------------------------------------------------------

# (spatial sizes, window, stride, pad): pad symmetric and <= window // 2, as PyTorch allows
BUILTIN_CASES = [
    ((11,), 3, 2, 1),
    ((8,), 2, None, None),
    ((9,), 4, 1, 2),                     # overlapping windows
    ((8, 8), 3, 2, 1),
    ((6, 6), 2, None, None),
    ((7, 9), (3, 2), (1, 2), (1, 0)),   # overlapping along dim 0
    ((5, 6, 4), 3, (2, 1, 1), 1),
    ((4, 5, 4), (2, 3, 1), (1, 2, 1), (1, 1, 0)),
]


def _builtin_id(case):
    sizes, k, s, p = case
    return f"{len(sizes)}d-m{sizes}-k{k}-s{s}-p{p}".replace(" ", "")


@pytest.mark.parametrize("case", BUILTIN_CASES, ids=_builtin_id)
@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_max_avg_pool_match_torch(kind, case):
    sizes, window, stride, pad = case
    d = len(sizes)
    net = compile_net(one_input_net(pool_expr(kind, window, stride, pad), 3, sizes))
    k = per_dim(window, d)
    s = k if stride is None else per_dim(stride, d)
    pd = (0,) * d if pad is None else per_dim(pad, d)
    if kind == "maxpool":
        ref = lambda x: _TORCH_MAX[d](x, k, s, pd)  # noqa: E731
    else:
        ref = lambda x: _TORCH_AVG[d](x, k, s, pd, count_include_pad=False)  # noqa: E731
    check_forward_backward(net, ref, distinct(2, 3, *sizes))


@pytest.mark.parametrize("case", [c for c in BUILTIN_CASES if c[3] is None or c[3] == 0]
                         + [((7,), 3, 2, None), ((7, 8), (3, 2), 2, None), ((5, 6), 2, 1, None),
                            ((4, 5, 5), 2, (1, 2, 2), None)], ids=_builtin_id)
def test_lppool_p2_matches_torch(case):
    sizes, window, stride, _ = case
    d = len(sizes)
    if _TORCH_LP[d] is None:
        pytest.skip("this torch has no lp_pool3d")
    net = compile_net(one_input_net(pool_expr("lppool", window, stride), 2, sizes))
    k = per_dim(window, d)
    s = k if stride is None else per_dim(stride, d)
    ref = lambda x: _TORCH_LP[d](x, 2.0, k if d > 1 else k[0], s if d > 1 else s[0])  # noqa: E731
    check_forward_backward(net, ref, distinct(2, 2, *sizes))


# (input sizes, output sizes): output smaller, larger, uneven and mixed
ADAPTIVE_CASES = [
    ((10,), (4,)),
    ((3,), (5,)),
    ((8, 8), (2, 2)),
    ((7, 9), (3, 4)),
    ((3, 4), (5, 7)),
    ((5, 2), (2, 3)),
    ((5, 4, 6), (2, 3, 4)),
    ((2, 3, 2), (3, 4, 3)),
]


@pytest.mark.parametrize("sizes,output", ADAPTIVE_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_adaptive_max_avg_match_torch(kind, sizes, output):
    d = len(sizes)
    net = compile_net(one_input_net(pool_expr(kind, output=output), 2, sizes))
    fn = _TORCH_AMAX[d] if kind == "maxpool" else _TORCH_AAVG[d]
    check_forward_backward(net, lambda x: fn(x, output), distinct(2, 2, *sizes))


def test_maxpool_asymmetric_padding_matches_torch_on_neg_inf_padded_input():
    """Padding never wins: same as padding with -inf by hand and max pooling without pad."""
    pads = ((2, 0), (1, 2))
    net = compile_net(one_input_net(pool_expr("maxpool", 3, 1, pads), 2, (5, 6)))
    ref = lambda x: F.max_pool2d(F.pad(x, (1, 2, 2, 0), value=-math.inf), 3, 1)  # noqa: E731
    x = distinct(2, 2, 5, 6) - 2.0  # all negative: a zero padding would win
    check_forward_backward(net, ref, x)


def test_avgpool_ignores_padding_values():
    """With every input 1, any padded window still averages to exactly 1."""
    net = compile_net(one_input_net(pool_expr("avgpool", 3, 2, ((2, 1), (1, 2))), 1, (5, 5)))
    out = net(torch.ones(1, 1, 5, 5))
    torch.testing.assert_close(out, torch.ones_like(out))
    net = compile_net(one_input_net(pool_expr("wavgpool", 3, 2, 2, extra="sigma=0.7"), 1, (5, 5)))
    out = net(torch.ones(1, 1, 5, 5))
    torch.testing.assert_close(out, torch.ones_like(out))


@pytest.mark.parametrize("expr", ["maxpool(x, 2, pad=2)", "avgpool(x, 3, pad=((0, 3), 1))",
                                  "lppool(x, (2, 3), pad=(1, 3))", "wavgpool(x, 1, pad=1)"])
def test_pad_not_smaller_than_window_is_rejected(expr):
    with pytest.raises(convdsl.ConvDSLError, match="pad"):
        convdsl.compile(one_input_net(expr, 1, (8, 8)), backend="torch")


# --------------------------------------------------------------------------------------
# Pooling against the loop reference
# --------------------------------------------------------------------------------------

# (id, sizes, window, stride, pad)
LOOP_CASES = [
    ("1d-pair", (9,), 3, 2, ((2, 1),)),
    ("1d-pad-gt-half", (7,), 4, 1, 3),
    ("1d-same", (7,), 4, 3, "same"),
    ("2d-pad-gt-half", (6, 5), 3, 2, 2),
    ("2d-pairs", (7, 6), (4, 3), (3, 2), ((3, 1), (0, 2))),
    ("2d-same-s2", (7, 8), 3, 2, "same"),
    ("2d-same-even-k", (5, 6), (2, 4), 1, "same"),
    ("2d-valid-overlap", (6, 7), 3, 1, "valid"),
    ("2d-stride-gt-window", (7, 7), 2, 3, (1, 0)),
    ("3d-pairs", (5, 4, 4), (3, 2, 3), (2, 1, 2), ((1, 2), (1, 0), (0, 2))),
    ("3d-same", (4, 5, 3), 2, 2, "same"),
]
KIND_PARAMS = [
    ("maxpool", "", {}),
    ("avgpool", "", {}),
    ("lppool", "", {}),
    ("lppool", "p=3", {"p": 3.0}),
    ("lppool", "p=1.5", {"p": 1.5}),
    ("wavgpool", "", {}),
    ("wavgpool", "sigma=0.6", {"sigma": 0.6}),
    ("wavgpool", "sigma=2.5", {"sigma": 2.5}),
]


@pytest.mark.parametrize("case", LOOP_CASES, ids=[c[0] for c in LOOP_CASES])
@pytest.mark.parametrize("kind,extra,kw", KIND_PARAMS, ids=[f"{k}-{e}" for k, e, _ in KIND_PARAMS])
def test_windowed_pool_matches_loop(kind, extra, kw, case):
    _, sizes, window, stride, pad = case
    net = compile_net(one_input_net(pool_expr(kind, window, stride, pad, extra=extra), 2, sizes))
    cells = window_cells(sizes, window, stride, pad)
    check_forward_backward(net, lambda x: pool_loop(x, kind, cells, **kw), distinct(2, 2, *sizes))


@pytest.mark.parametrize("sizes,output", ADAPTIVE_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("kind,extra,kw", KIND_PARAMS, ids=[f"{k}-{e}" for k, e, _ in KIND_PARAMS])
def test_adaptive_pool_matches_loop(kind, extra, kw, sizes, output):
    net = compile_net(one_input_net(pool_expr(kind, output=output, extra=extra), 2, sizes))
    cells = adaptive_cells(sizes, output)
    check_forward_backward(net, lambda x: pool_loop(x, kind, cells, **kw), distinct(2, 2, *sizes))


def test_wavgpool_weights_by_hand():
    """A 1-D window of 3 with sigma=1: weights e^-0.5, 1, e^-0.5; at the padded left edge
    only the centre and right weights remain and are renormalised."""
    net = compile_net(one_input_net("wavgpool(x, 3, stride=1, pad=1)", 1, (3,)))
    x = torch.tensor([[[1.0, 2.0, 4.0]]])
    e = math.exp(-0.5)
    want = [(1 * 1 + 2 * e) / (1 + e), (1 * e + 2 + 4 * e) / (1 + 2 * e), (2 * e + 4) / (e + 1)]
    torch.testing.assert_close(net(x), torch.tensor([[want]]))


def test_wavgpool_uses_euclidean_distance_in_2d():
    """Corner weight of a 3x3 window is exp(-(1+1)/2σ²): check with a one-hot input."""
    sigma = 0.8
    net = compile_net(one_input_net(pool_expr("wavgpool", 3, extra=f"sigma={sigma}"), 1, (3, 3)))
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 0, 0] = 1.0
    w = [[math.exp(-((i - 1) ** 2 + (j - 1) ** 2) / (2 * sigma**2)) for j in range(3)] for i in range(3)]
    total = sum(map(sum, w))
    torch.testing.assert_close(net(x).reshape(()), torch.tensor(w[0][0] / total))


def test_lppool_by_hand():
    net = compile_net(one_input_net("lppool(x, 2, p=3)", 1, (4,)))
    x = torch.tensor([[[1.0, -2.0, 3.0, 0.5]]])
    want = torch.tensor([[[(1 + 8) ** (1 / 3), (27 + 0.125) ** (1 / 3)]]])
    torch.testing.assert_close(net(x), want)


# --------------------------------------------------------------------------------------
# gradcheck (float64) on tiny shapes
# --------------------------------------------------------------------------------------

GRADCHECK_CASES = [  # (id, sizes, pool keyword arguments)
    ("1d-pad", (6,), dict(window=3, stride=2, pad=((2, 1),))),
    ("2d-pad", (4, 5), dict(window=(3, 2), stride=(1, 2), pad=((2, 0), (1, 1)))),
    ("2d-same", (5, 4), dict(window=3, stride=2, pad="same")),
    ("3d", (3, 4, 3), dict(window=2, stride=1, pad=(1, 0, 1))),
    ("adaptive-1d-up", (3,), dict(output=(5,))),
    ("adaptive-2d", (5, 4), dict(output=(3, 3))),
    ("adaptive-3d", (3, 2, 3), dict(output=(2, 3, 2))),
]


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=[c[0] for c in GRADCHECK_CASES])
@pytest.mark.parametrize("kind,extra", [("maxpool", ""), ("avgpool", ""), ("lppool", ""),
                                        ("lppool", "p=3"), ("wavgpool", "sigma=0.7")])
def test_pool_gradcheck(kind, extra, case):
    _, sizes, kw = case
    src = one_input_net(pool_expr(kind, extra=extra, **kw), 2, sizes)
    gradcheck_net(src, distinct(1, 2, *sizes, dtype=F64))


# --------------------------------------------------------------------------------------
# Variable spatial size (9.7)
# --------------------------------------------------------------------------------------

VARIABLE_SRC = """
net V(x: f32[N, 2, H, W]) {
    a = avgpool(x, output=(3, 2))
    b = maxpool(x, output=(2, 3))
    c = wavgpool(x, output=3, sigma=0.8)
    d = lppool(x, output=(2, 2), p=3)
    e = lppool(x, 3, stride=2, pad=same)
    f = maxpool(x, 3, stride=2, pad=same)
    g = avgpool(x, 2, stride=1, pad=((1, 0), (0, 1)))
    return a, b, c, d, e, f, g
}
"""


@pytest.mark.parametrize("hw", [(6, 4), (7, 5), (3, 8)], ids=["even-cells", "uneven-cells", "up-and-down"])
def test_variable_size_inputs(hw):
    net = compile_net(VARIABLE_SRC)

    def ref(x):
        h, w = x.shape[2:]
        return (
            pool_loop(x, "avgpool", adaptive_cells((h, w), (3, 2))),
            pool_loop(x, "maxpool", adaptive_cells((h, w), (2, 3))),
            pool_loop(x, "wavgpool", adaptive_cells((h, w), 3), sigma=0.8),
            pool_loop(x, "lppool", adaptive_cells((h, w), (2, 2)), p=3.0),
            pool_loop(x, "lppool", window_cells((h, w), 3, 2, "same")),
            pool_loop(x, "maxpool", window_cells((h, w), 3, 2, "same")),
            pool_loop(x, "avgpool", window_cells((h, w), 2, 1, ((1, 0), (0, 1)))),
        )

    outs = check_forward_backward(net, ref, distinct(2, 2, *hw))
    assert outs[0].shape == (2, 2, 3, 2) and outs[1].shape == (2, 2, 2, 3)
    assert outs[4].shape[2:] == (math.ceil(hw[0] / 2), math.ceil(hw[1] / 2))


def test_variable_size_adaptive_matches_torch_at_two_sizes():
    net = compile_net(one_input_net("maxpool(x, output=(3, 2)), avgpool(x, output=(3, 2))", 2, ("H", "W")))
    for hw in [(9, 4), (7, 5)]:
        check_forward_backward(
            net, lambda x: (F.adaptive_max_pool2d(x, (3, 2)), F.adaptive_avg_pool2d(x, (3, 2))),
            distinct(3, 2, *hw))


def test_variable_size_too_small_is_a_clear_error():
    net = compile_net(one_input_net("maxpool(x, 3)", 2, ("H", "W")))
    with pytest.raises(convdsl.ConvDSLError):
        net(torch.randn(1, 2, 2, 5))


# --------------------------------------------------------------------------------------
# NaN propagation through max pooling
# --------------------------------------------------------------------------------------

def _with_nans(*shape):
    x = torch.randn(*shape)
    x.view(-1)[torch.randperm(x.numel())[:3]] = math.nan
    return x


@pytest.mark.parametrize("expr,ref", [
    ("maxpool(x, 2)", lambda x: F.max_pool2d(x, 2)),
    ("maxpool(x, 3, stride=2, pad=1)", lambda x: F.max_pool2d(x, 3, 2, 1)),
    ("maxpool(x, 3, stride=1, pad=((2, 0), (1, 2)))",
     lambda x: F.max_pool2d(F.pad(x, (1, 2, 2, 0), value=-math.inf), 3, 1)),
    ("maxpool(x, 4, stride=2, pad=3)", lambda x: F.max_pool2d(F.pad(x, (3, 3, 3, 3), value=-math.inf), 4, 2)),
    ("maxpool(x, output=(3, 4))", lambda x: F.adaptive_max_pool2d(x, (3, 4))),
], ids=["plain", "torch-pad", "asym-pad", "big-pad", "adaptive"])
def test_maxpool_propagates_nan(expr, ref):
    net = compile_net(one_input_net(expr, 2, (7, 8)))
    x = _with_nans(2, 2, 7, 8)
    out, want = net(x), ref(x)
    assert want.isnan().any()
    torch.testing.assert_close(out, want, equal_nan=True)
    # and the windows that hold a NaN are exactly the NaN outputs of the loop reference
    assert torch.equal(out.isnan(), want.isnan())


def test_maxpool_nan_1d_and_3d():
    net1 = compile_net(one_input_net("maxpool(x, 3, stride=2, pad=((2, 1),))", 1, (9,)))
    x1 = torch.randn(1, 1, 9)
    x1[0, 0, 4] = math.nan
    out = net1(x1)
    torch.testing.assert_close(out, pool_loop(x1, "maxpool", window_cells((9,), 3, 2, ((2, 1),))),
                               equal_nan=True)
    assert out.isnan().sum() == 2  # windows [-2,1) [0,3) [2,5) [4,7) [6,9): index 4 is in two
    net3 = compile_net(one_input_net("maxpool(x, 2, stride=1, pad=(1, 0, 1))", 1, (3, 3, 3)))
    x3 = torch.randn(1, 1, 3, 3, 3)
    x3[0, 0, 1, 1, 1] = math.nan
    want = F.max_pool3d(F.pad(x3, (1, 1, 0, 0, 1, 1), value=-math.inf), 2, 1)
    torch.testing.assert_close(net3(x3), want, equal_nan=True)
    assert net3(x3).isnan().sum() == 2 * 2 * 2


# --------------------------------------------------------------------------------------
# Non-finite values must stay inside their windows (avg/lp/wavg pooling), and Lp
# pooling of an all-zero window has gradient 0. Regression tests: both were bugs of
# the first dense-matrix implementation (0 * inf = NaN leaked across windows).
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("expr,ref", [
    ("avgpool(x, 2)", lambda x: F.avg_pool2d(x, 2)),
    ("avgpool(x, 3, stride=2, pad=((2, 1), (1, 2)))",
     lambda x: pool_loop(x, "avgpool", window_cells((6, 6), 3, 2, ((2, 1), (1, 2))))),
    ("lppool(x, 2)", lambda x: F.lp_pool2d(x, 2.0, 2)),
    ("wavgpool(x, 3, stride=1, pad=1)",
     lambda x: pool_loop(x, "wavgpool", window_cells((6, 6), 3, 1, 1))),
    ("wavgpool(x, output=(2, 3))", lambda x: pool_loop(x, "wavgpool", adaptive_cells((6, 6), (2, 3)))),
], ids=["avg", "avg-pad", "lp", "wavg", "wavg-adaptive"])
@pytest.mark.parametrize("bad", [math.inf, math.nan], ids=["inf", "nan"])
def test_nonfinite_input_stays_in_its_windows(expr, ref, bad):
    """Like torch.avg_pool2d: an inf/NaN input only affects the outputs whose window holds it
    (an inf may come from f16 overflow upstream)."""
    net = compile_net(one_input_net(expr, 1, (6, 6)))
    x = torch.randn(1, 1, 6, 6)
    x[0, 0, 0, 0] = bad
    out, want = net(x), ref(x.double()).float()
    assert want.isfinite().any()  # most windows do not hold the bad value
    torch.testing.assert_close(out, want, equal_nan=True)


@pytest.mark.parametrize("relu_first", [False, True], ids=["plain", "after-relu"])
def test_lppool_gradient_with_an_all_zero_window(relu_first):
    expr = "lppool(relu(x), 2)" if relu_first else "lppool(x, 2)"
    net = compile_net(one_input_net(expr, 1, (4, 4)))
    x = torch.randn(1, 1, 4, 4)
    x[0, 0, 2:, 2:] = 0.0  # one window of zeros
    if relu_first:
        x[0, 0, :2, :2] = x[0, 0, :2, :2].abs() + 0.1  # and one with positive values
    xa = x.clone().requires_grad_()
    net(xa).sum().backward()
    xb = x.clone().requires_grad_()
    pre = torch.relu(xb) if relu_first else xb
    F.lp_pool2d(pre, 2.0, 2).sum().backward()
    assert xa.grad.isfinite().all()
    torch.testing.assert_close(xa.grad, xb.grad)


def test_lppool_zero_cell_adaptive_p3():
    """An all-zero adaptive cell pools to 0 with gradient 0; the other cells are untouched."""
    net = compile_net(one_input_net("lppool(x, output=(2, 2), p=3)", 1, (4, 5)))
    x = distinct(1, 1, 4, 5)
    x[0, 0, :2, :3] = 0.0  # cell (0, 0) covers rows [0, 2) and columns [0, 3)
    xa = x.clone().requires_grad_()
    out = net(xa)
    out.sum().backward()
    xr = x.double().requires_grad_()
    want = pool_loop(xr, "lppool", adaptive_cells((4, 5), (2, 2)), p=3.0)
    want[0, 0, 1:, :].sum().backward(retain_graph=True)  # the cells with nonzero values
    want[0, 0, 0, 1].backward()
    assert out[0, 0, 0, 0] == 0 and xa.grad.isfinite().all()
    assert (xa.grad[0, 0, :2, :2] == 0).all()  # only in cell (0, 0)
    torch.testing.assert_close(out.double(), want.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad[0, 0, 2:].double(), xr.grad[0, 0, 2:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(xa.grad[0, 0, :2, 3:].double(), xr.grad[0, 0, :2, 3:], atol=1e-5, rtol=1e-4)


def test_lppool_gradient_away_from_zero_windows_1d_p3():
    """Without zero windows Lp gradients follow the definition (p=3, 1-D)."""
    net = compile_net(one_input_net("lppool(x, 2, p=3)", 1, (6,)))
    check_forward_backward(net, lambda x: pool_loop(x, "lppool", window_cells((6,), 2), p=3.0),
                           distinct(1, 1, 6))


# --------------------------------------------------------------------------------------
# Reduced precision: f16 and bf16 keep their dtype and are close to the float32 result
# --------------------------------------------------------------------------------------

LOW_TOL = {"f16": dict(atol=5e-3, rtol=5e-3), "bf16": dict(atol=3e-2, rtol=3e-2)}
LOW_PRECISION_CASES = [  # (id, expr, sizes, reference on a float32/64 tensor)
    ("maxpool", "maxpool(x, 3, stride=2, pad=1)", (8, 8),
     lambda x: F.max_pool2d(x, 3, 2, 1)),
    ("maxpool-asym", "maxpool(x, 3, stride=1, pad=((2, 0), (1, 2)))", (6, 7),
     lambda x: pool_loop(x, "maxpool", window_cells((6, 7), 3, 1, ((2, 0), (1, 2))))),
    ("avgpool", "avgpool(x, 3, stride=2, pad=1)", (8, 8),
     lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)),
    ("lppool", "lppool(x, 2, p=3, pad=1)", (7, 7),
     lambda x: pool_loop(x, "lppool", window_cells((7, 7), 2, None, 1), p=3.0)),
    ("wavgpool", "wavgpool(x, 3, stride=2, pad=same, sigma=0.8)", (7, 8),
     lambda x: pool_loop(x, "wavgpool", window_cells((7, 8), 3, 2, "same"), sigma=0.8)),
    ("adaptive-max", "maxpool(x, output=(3, 5))", (7, 4),
     lambda x: F.adaptive_max_pool2d(x, (3, 5))),
    ("adaptive-avg", "avgpool(x, output=(3, 5))", (7, 4),
     lambda x: F.adaptive_avg_pool2d(x, (3, 5))),
    ("adaptive-lp", "lppool(x, output=(2, 3))", (5, 7),
     lambda x: pool_loop(x, "lppool", adaptive_cells((5, 7), (2, 3)))),
    ("adaptive-wavg", "wavgpool(x, output=(3, 2))", (7, 5),
     lambda x: pool_loop(x, "wavgpool", adaptive_cells((7, 5), (3, 2)))),
    ("pool-1d", "avgpool(x, 4, stride=2, pad=((3, 1),))", (9,),
     lambda x: pool_loop(x, "avgpool", window_cells((9,), 4, 2, ((3, 1),)))),
    ("pool-3d", "wavgpool(x, 2, pad=(1, 0, 1))", (3, 4, 3),
     lambda x: pool_loop(x, "wavgpool", window_cells((3, 4, 3), 2, None, (1, 0, 1)))),
    ("maxout", "maxout(x, pieces=2)", (4, 4), lambda x: maxout_loop(x, 2)),
    ("relu", "relu(x)", (4, 4), torch.relu),
    ("sigmoid", "sigmoid(x)", (4, 4), torch.sigmoid),
    ("tanh", "tanh(x)", (4, 4), torch.tanh),
    ("elu", "elu(x)", (4, 4), F.elu),
    ("softplus", "softplus(x)", (4, 4), F.softplus),
    ("softmax", "softmax(x)", (4, 4), lambda x: torch.softmax(x, 1)),
    ("log_softmax", "log_softmax(x)", (4, 4), lambda x: torch.log_softmax(x, 1)),
    ("arith", "2 - x * 0.5 + x * x", (4, 4), lambda x: 2 - x * 0.5 + x * x),
]


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("case", LOW_PRECISION_CASES, ids=[c[0] for c in LOW_PRECISION_CASES])
def test_reduced_precision_keeps_dtype(dtype, case):
    _, expr, sizes, ref = case
    net = compile_net(one_input_net(expr, 4, sizes, dtype=dtype))
    x = (distinct(2, 4, *sizes) * 2).to(DTYPES[dtype]).requires_grad_()
    out = net(x)
    assert out.dtype == DTYPES[dtype]
    want = ref(x.detach().float())
    assert out.shape == want.shape
    torch.testing.assert_close(out.float(), want, **LOW_TOL[dtype])
    out.sum().backward()
    assert x.grad is not None and x.grad.dtype == DTYPES[dtype] and x.grad.isfinite().all()


def test_reduced_precision_rejects_float32_input():
    net = compile_net(one_input_net("maxpool(x, 2)", 1, (4, 4), dtype="bf16"))
    with pytest.raises(convdsl.ConvDSLError):
        net(torch.randn(1, 1, 4, 4))


# --------------------------------------------------------------------------------------
# maxout (cross-channel pooling, figure 9.9)
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels,pieces,sizes", [
    (6, 2, (5,)), (6, 3, (4, 5)), (4, 4, (3, 3)), (3, 1, (4, 4)), (8, 2, (2, 3, 2)),
])
def test_maxout(channels, pieces, sizes):
    src = one_input_net(f"maxout(x, pieces={pieces})", channels, sizes)
    out = check_forward_backward(compile_net(src), lambda x: maxout_loop(x, pieces),
                                 distinct(2, channels, *sizes))[0]
    assert out.shape == (2, channels // pieces, *sizes)
    gradcheck_net(src, distinct(1, channels, *sizes, dtype=F64))


def test_maxout_groups_consecutive_channels():
    net = compile_net(one_input_net("maxout(x, pieces=2)", 4, (1,)))
    x = torch.tensor([1.0, 5.0, 7.0, -3.0]).reshape(1, 4, 1)
    torch.testing.assert_close(net(x), torch.tensor([5.0, 7.0]).reshape(1, 2, 1))


def test_maxout_propagates_nan():
    net = compile_net(one_input_net("maxout(x, pieces=2)", 4, (3,)))
    x = torch.randn(1, 4, 3)
    x[0, 2, 1] = math.nan
    out = net(x)
    assert out[0, 1, 1].isnan() and out.isnan().sum() == 1


# --------------------------------------------------------------------------------------
# Detector stage: activations
# --------------------------------------------------------------------------------------

ACTIVATIONS = [
    ("relu(x)", torch.relu),
    ("sigmoid(x)", torch.sigmoid),
    ("tanh(x)", torch.tanh),
    ("leaky_relu(x)", lambda x: F.leaky_relu(x, 0.01)),
    ("leaky_relu(x, slope=0.2)", lambda x: F.leaky_relu(x, 0.2)),
    ("elu(x)", lambda x: F.elu(x, 1.0)),
    ("elu(x, alpha=0.5)", lambda x: F.elu(x, 0.5)),
    ("softplus(x)", F.softplus),
    ("identity(x)", lambda x: x),
]


@pytest.mark.parametrize("expr,ref", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
@pytest.mark.parametrize("sizes", [(6,), (3, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_activation(expr, ref, sizes):
    src = one_input_net(expr, 3, sizes)
    x = distinct(2, 3, *sizes) * 4  # both signs, |x| up to 4, no exact zeros
    check_forward_backward(compile_net(src), ref, x)
    gradcheck_net(src, distinct(1, 3, *sizes, dtype=F64) * 4)


def test_activation_formulas_by_hand():
    """The definitions themselves at a few points (independent of torch's functional API)."""
    src = """
net A(x: f32[N, 4]) {
    return relu(x), sigmoid(x), tanh(x), leaky_relu(x), leaky_relu(x, slope=0.3), elu(x), elu(x, alpha=2.0), softplus(x), identity(x)
}
"""
    v = [-2.0, -0.5, 0.5, 3.0]
    x = torch.tensor([v])
    outs = compile_net(src)(x)
    want = [
        [max(0.0, a) for a in v],
        [1 / (1 + math.exp(-a)) for a in v],
        [math.tanh(a) for a in v],
        [a if a > 0 else 0.01 * a for a in v],
        [a if a > 0 else 0.3 * a for a in v],
        [a if a > 0 else math.exp(a) - 1 for a in v],
        [a if a > 0 else 2.0 * (math.exp(a) - 1) for a in v],
        [math.log1p(math.exp(a)) for a in v],
        v,
    ]
    assert len(outs) == len(want)
    for o, w in zip(outs, want):
        torch.testing.assert_close(o, torch.tensor([w]))


def test_softplus_is_stable_for_large_inputs():
    net = compile_net(one_input_net("softplus(x)", 1, (3,)))
    x = torch.tensor([[[-100.0, 50.0, 100.0]]])
    out = net(x)
    assert out.isfinite().all()
    torch.testing.assert_close(out, F.softplus(x))


# --------------------------------------------------------------------------------------
# softmax / log_softmax
# --------------------------------------------------------------------------------------

def test_softmax_over_channels_is_per_pixel_distribution():
    src = one_input_net("softmax(x), log_softmax(x)", 5, (4, 3))
    x = torch.randn(2, 5, 4, 3) * 3
    p, logp = check_forward_backward(compile_net(src),
                                     lambda x: (torch.softmax(x, 1), torch.log_softmax(x, 1)), x)
    torch.testing.assert_close(p.sum(1), torch.ones(2, 4, 3))
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(2, 4, 3))
    assert (p > 0).all()
    # by hand at one pixel
    e = x[1, :, 2, 1].double().exp()
    torch.testing.assert_close(p[1, :, 2, 1].double(), e / e.sum(), atol=1e-6, rtol=1e-5)
    gradcheck_net(one_input_net("softmax(x), log_softmax(x)", 3, (2, 2)), torch.randn(1, 3, 2, 2))


def test_softmax_axis_channel_is_default():
    src = one_input_net("softmax(x, axis=channel), softmax(x, axis=1), log_softmax(x, axis=channel)",
                        3, (2, 2))
    x = torch.randn(2, 3, 2, 2)
    a, b, c = compile_net(src)(x)
    torch.testing.assert_close(a, torch.softmax(x, 1))
    torch.testing.assert_close(b, torch.softmax(x, 1))
    torch.testing.assert_close(c, torch.log_softmax(x, 1))


def test_softmax_over_features():
    src = "net S(x: f32[N, 7]) {\n    return softmax(x), log_softmax(x)\n}\n"
    x = torch.randn(4, 7) * 3
    p, logp = check_forward_backward(compile_net(src),
                                     lambda x: (torch.softmax(x, 1), torch.log_softmax(x, 1)), x)
    torch.testing.assert_close(p.sum(1), torch.ones(4))
    gradcheck_net(src, torch.randn(2, 7))


@pytest.mark.parametrize("axis", [2, 3])
def test_softmax_int_axis(axis):
    src = one_input_net(f"softmax(x, axis={axis}), log_softmax(x, axis={axis})", 3, (4, 5))
    x = torch.randn(2, 3, 4, 5)
    check_forward_backward(compile_net(src),
                           lambda x: (torch.softmax(x, axis), torch.log_softmax(x, axis)), x)


def test_softmax_is_numerically_stable():
    src = one_input_net("softmax(x), log_softmax(x)", 3, (2,))
    x = torch.tensor([[[1000.0, -1000.0], [999.0, 0.0], [-1000.0, 1000.0]]])
    p, logp = compile_net(src)(x)
    assert p.isfinite().all() and logp.isfinite().all()
    torch.testing.assert_close(p, torch.softmax(x.double(), 1).float())
    torch.testing.assert_close(logp, torch.log_softmax(x.double(), 1).float())


# --------------------------------------------------------------------------------------
# Structure: flatten, concat, split
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes", [(5,), (3, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_flatten(sizes):
    src = one_input_net("flatten(x)", 3, sizes)
    x = torch.randn(2, 3, *sizes)
    out = check_forward_backward(compile_net(src), lambda x: torch.flatten(x, 1), x)[0]
    assert out.shape == (2, 3 * math.prod(sizes))
    # channel-major: the first features are channel 0's spatial values in row-major order
    torch.testing.assert_close(out[:, : math.prod(sizes)], x[:, 0].reshape(2, -1))


def test_flatten_then_pool_pipeline():
    src = one_input_net("flatten(maxpool(relu(x), 2))", 2, (4, 4))
    x = distinct(2, 2, 4, 4)
    check_forward_backward(compile_net(src), lambda x: torch.flatten(F.max_pool2d(torch.relu(x), 2), 1), x)


def test_concat_three_tensors():
    src = """
net C(a: f32[N, 1, H, W], b: f32[N, 2, H, W], c: f32[N, 3, H, W]) {
    return concat(a, b, c), concat(c, a, axis=channel)
}
"""
    a, b, c = torch.randn(2, 1, 4, 5), torch.randn(2, 2, 4, 5), torch.randn(2, 3, 4, 5)
    outs = check_forward_backward(compile_net(src),
                                  lambda a, b, c: (torch.cat([a, b, c], 1), torch.cat([c, a], 1)), a, b, c)
    assert outs[0].shape == (2, 6, 4, 5)
    gradcheck_net(src, torch.randn(1, 1, 2, 2), torch.randn(1, 2, 2, 2), torch.randn(1, 3, 2, 2))


@pytest.mark.parametrize("axis", [2, 3])
def test_concat_int_axis(axis):
    src = f"""
net C(a: f32[N, 2, 3, 4], b: f32[N, 2, 3, 4], c: f32[N, 2, 3, 4]) {{
    return concat(a, b, c, axis={axis})
}}
"""
    xs = [torch.randn(2, 2, 3, 4) for _ in range(3)]
    check_forward_backward(compile_net(src), lambda *t: torch.cat(t, axis), *xs)


def test_split_sizes_and_equal_parts():
    src = """
net S(x: f32[N, 6, 3, 3]) {
    a, b = split(x, [2, 4])
    p, q, r = split(x, 3)
    return a, b, p, q, r
}
"""
    x = torch.randn(2, 6, 3, 3)
    outs = check_forward_backward(compile_net(src),
                                  lambda x: torch.split(x, [2, 4], 1) + torch.split(x, 2, 1), x)
    assert [o.shape[1] for o in outs] == [2, 4, 2, 2, 2]


def test_split_concat_roundtrip():
    src = """
net R(x: f32[N, 5, H, W]) {
    a, b, c = split(x, [1, 3, 1])
    return concat(a, b, c), concat(c, b, a)
}
"""
    x = torch.randn(2, 5, 3, 4)
    same, rev = check_forward_backward(
        compile_net(src), lambda x: (x * 1, torch.cat([x[:, 4:], x[:, 1:4], x[:, :1]], 1)), x)
    torch.testing.assert_close(same, x, atol=0, rtol=0)
    gradcheck_net(src, torch.randn(1, 5, 2, 2))


def test_split_pool_some_channels_not_others():
    """9.4: pool some channels, keep the others."""
    src = """
net M(x: f32[N, 4, 4, 4]) {
    a, b = split(x, [1, 3])
    return concat(maxpool(a, 2, stride=1, pad=((1, 0), (0, 1))), b)
}
"""
    x = distinct(2, 4, 4, 4)
    ref = lambda x: torch.cat([pool_loop(x[:, :1], "maxpool", window_cells((4, 4), 2, 1, ((1, 0), (0, 1)))),  # noqa: E731
                               x[:, 1:]], 1)
    check_forward_backward(compile_net(src), ref, x)


# --------------------------------------------------------------------------------------
# Arithmetic: + - * on equal shapes, with scalars on either side, unary minus
# --------------------------------------------------------------------------------------

ARITH = [
    ("x + y", lambda x, y: x + y),
    ("x - y", lambda x, y: x - y),
    ("x * y", lambda x, y: x * y),
    ("2 - x", lambda x, y: 2 - x),
    ("x - 2", lambda x, y: x - 2),
    ("2.5 + x", lambda x, y: 2.5 + x),
    ("x + 2.5", lambda x, y: x + 2.5),
    ("3 * x", lambda x, y: 3 * x),
    ("x * 0.5", lambda x, y: x * 0.5),
    ("-x", lambda x, y: -x),
    ("-x * y", lambda x, y: -x * y),
    ("2 - -x", lambda x, y: 2 + x),
    ("2 - x * 3", lambda x, y: 2 - x * 3),          # * binds tighter than -
    ("x - y - x", lambda x, y: (x - y) - x),        # left associative
    ("0.5 - x - 2", lambda x, y: (0.5 - x) - 2),
    ("(x + y) * (x - y)", lambda x, y: (x + y) * (x - y)),
    ("x * y + relu(x) * 2", lambda x, y: x * y + torch.relu(x) * 2),
    ("1 - sigmoid(x) * y - x * 0.25", lambda x, y: 1 - torch.sigmoid(x) * y - x * 0.25),
]


@pytest.mark.parametrize("expr,ref", ARITH, ids=[a[0] for a in ARITH])
def test_arithmetic(expr, ref):
    src = f"net A(x: f32[N, 2, H, W], y: f32[N, 2, H, W]) {{\n    z = {expr}\n    return z, y\n}}\n"
    x, y = distinct(2, 2, 3, 4) * 3, torch.randn(2, 2, 3, 4)
    check_forward_backward(compile_net(src), lambda x, y: (ref(x, y), y), x, y)


def test_arithmetic_gradcheck():
    src = "net A(x: f32[N, 2, 3], y: f32[N, 2, 3]) {\n    return 2 - x * y + -y * 0.5 - (x - 1)\n}\n"
    gradcheck_net(src, torch.randn(1, 2, 3), torch.randn(1, 2, 3))


# --------------------------------------------------------------------------------------
# Property test: random pooling configurations against the loop reference
# --------------------------------------------------------------------------------------

@st.composite
def pool_configs(draw):
    kind = draw(st.sampled_from(KINDS))
    d = draw(st.integers(1, 3))
    window = tuple(draw(st.integers(1, 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    pad_style = draw(st.sampled_from(["int", "pairs", "same", "valid", "none"]))
    if pad_style == "int":
        pad = draw(st.integers(0, min(window) - 1))
    elif pad_style == "pairs":
        pad = tuple((draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))) for k in window)
    elif pad_style == "none":
        pad = None
    else:
        pad = pad_style
    max_size = {1: 9, 2: 6, 3: 4}[d]
    if pad == "same":  # `same` pads enough for any size
        sizes = tuple(draw(st.integers(1, max_size)) for _ in window)
    else:  # the window must fit the padded input
        pairs = resolve_pads(pad, (1,) * d, window, stride)
        sizes = tuple(draw(st.integers(max(1, k - b - a), max_size)) for k, (b, a) in zip(window, pairs))
    symbolic = draw(st.booleans())  # declare the spatial dims as size symbols
    extra, kw = "", {}
    if kind == "lppool":
        p = draw(st.sampled_from([1.0, 1.5, 2.0, 3.0]))
        extra, kw = f"p={p}", {"p": p}
    elif kind == "wavgpool":
        sigma = draw(st.sampled_from([0.5, 1.0, 2.0]))
        extra, kw = f"sigma={sigma}", {"sigma": sigma}
    return kind, sizes, window, stride, pad, extra, kw, symbolic


@st.composite
def adaptive_configs(draw):
    kind = draw(st.sampled_from(KINDS))
    d = draw(st.integers(1, 3))
    max_size = {1: 9, 2: 6, 3: 4}[d]
    sizes = tuple(draw(st.integers(1, max_size)) for _ in range(d))
    output = tuple(draw(st.integers(1, max_size)) for _ in range(d))
    symbolic = draw(st.booleans())
    return kind, sizes, output, symbolic


_PROPERTY = settings(max_examples=100, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.too_slow])


def _declared(sizes, symbolic):
    return ["S0", "S1", "S2"][: len(sizes)] if symbolic else sizes


@_PROPERTY
@given(pool_configs())
def test_property_windowed_pooling_matches_loop(config):
    kind, sizes, window, stride, pad, extra, kw, symbolic = config
    expr = pool_expr(kind, window, stride, pad, extra=extra)
    net = compile_net(one_input_net(expr, 2, _declared(sizes, symbolic)))
    cells = window_cells(sizes, window, stride, pad)
    check_forward_backward(net, lambda x: pool_loop(x, kind, cells, **kw), distinct(1, 2, *sizes))


@_PROPERTY
@given(adaptive_configs())
def test_property_adaptive_pooling_matches_loop(config):
    kind, sizes, output, symbolic = config
    expr = pool_expr(kind, output=output)
    net = compile_net(one_input_net(expr, 2, _declared(sizes, symbolic)))
    cells = adaptive_cells(sizes, output)
    check_forward_backward(net, lambda x: pool_loop(x, kind, cells), distinct(1, 2, *sizes))
