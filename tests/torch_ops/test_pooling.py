"""Tests for convdsl.torch_ops.pooling against direct loop references (tests/reference.py)
and torch built-ins."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convdsl.torch_ops.pooling import adaptive_pool, maxout, pool

from ..ops.helpers import single_thread  # noqa: F401  (autouse: tiny tensors)
from ..reference import adaptive_cells, pool_loop, window_cells

DT = torch.float64
KINDS = ["max", "avg", "lp", "wavg"]


def ref_pool(x, kind, window, stride, pads, p=2.0, sigma=1.0):
    """The loop reference over the windows of this module's (window, stride, pads)."""
    cells = window_cells(tuple(x.shape[2:]), window, stride, pads)
    return pool_loop(x, f"{kind}pool", cells, p, sigma)


def ref_adaptive(x, kind, output, p=2.0, sigma=1.0):
    return pool_loop(x, f"{kind}pool", adaptive_cells(tuple(x.shape[2:]), output), p, sigma)


def distinct(*shape):
    """Values with gaps >> gradcheck's eps, so max pooling has no (near-)ties."""
    n = math.prod(shape)
    return (torch.randperm(n, dtype=DT) - n / 2).reshape(shape) * 0.1


POOL_CASES = [  # (spatial size, window, stride, pads)
    ((9,), (3,), (2,), [(2, 1)]),
    ((6, 7), (3, 2), (2, 1), [(1, 0), (1, 1)]),
    ((7, 5), (4, 3), (3, 2), [(3, 1), (0, 2)]),
    ((5, 4, 4), (3, 2, 3), (2, 1, 2), [(1, 2), (1, 0), (0, 2)]),
]


@pytest.mark.parametrize("size,window,stride,pads", POOL_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_pool_matches_loop(size, window, stride, pads, kind):
    x = torch.randn(2, 3, *size, dtype=DT) - 1.0  # mostly negative: zero padding would win a max
    kw = {"p": 3.0, "sigma": 0.8}
    torch.testing.assert_close(pool(x, kind, window, stride, pads, **kw), ref_pool(x, kind, window, stride, pads, **kw))


@pytest.mark.parametrize("pad", [0, 1])
def test_pool_matches_torch_builtins_2d(pad):
    x = torch.randn(2, 3, 8, 7, dtype=DT)
    args = ((3, 3), (2, 1), [(pad, pad), (pad, pad)])
    torch.testing.assert_close(pool(x, "max", *args), F.max_pool2d(x, 3, (2, 1), pad))
    torch.testing.assert_close(pool(x, "avg", *args), F.avg_pool2d(x, 3, (2, 1), pad, count_include_pad=False))
    if pad == 0:
        torch.testing.assert_close(pool(x, "lp", *args, p=2.0), F.lp_pool2d(x, 2.0, 3, (2, 1)))
        # lp_pool2d raises x to p without abs, so compare odd p on positive inputs.
        torch.testing.assert_close(pool(x.abs(), "lp", *args, p=3.0), F.lp_pool2d(x.abs(), 3.0, 3, (2, 1)))


def test_max_pool_fallback_path_ignores_padding():
    x = -torch.rand(1, 2, 5, 6, dtype=DT) - 1.0  # all < -1: any padding value of 0 would win
    got = pool(x, "max", (3, 3), (1, 2), [(2, 0), (1, 2)])  # asymmetric and > window // 2
    assert (got < -1).all()
    torch.testing.assert_close(got, ref_pool(x, "max", (3, 3), (1, 2), [(2, 0), (1, 2)]))


@pytest.mark.parametrize("pads", [[(1, 1), (1, 1)], [(2, 0), (0, 1)]])
def test_max_pool_propagates_nan(pads):
    x = torch.randn(1, 1, 5, 5, dtype=DT)
    x[0, 0, 2, 2] = float("nan")
    got = pool(x, "max", (3, 3), (1, 1), pads)
    ref = ref_pool(x, "max", (3, 3), (1, 1), pads)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()


def test_wavg_limits():
    x = torch.randn(2, 2, 7, 6, dtype=DT)
    args = ((3, 3), (2, 2), [(1, 2), (2, 1)])
    torch.testing.assert_close(pool(x, "wavg", *args, sigma=1e4), pool(x, "avg", *args))
    # Tiny sigma: each window reduces to its real input(s) nearest the centre; must stay finite.
    assert torch.isfinite(pool(x, "wavg", *args, sigma=1e-3)).all()
    no_pad = ((3, 3), (2, 2), [(0, 0), (0, 0)])
    torch.testing.assert_close(pool(x, "wavg", *no_pad, sigma=1e-3), x[:, :, 1:-1:2, 1:-1:2])


@pytest.mark.parametrize("kind", KINDS)
def test_pool_rejects_all_padding_window(kind):
    with pytest.raises(ValueError, match="pad"):
        pool(torch.randn(1, 1, 6, 6, dtype=DT), kind, (2, 3), (1, 1), [(0, 0), (3, 0)])


@pytest.mark.parametrize("size,window,stride,pads", [POOL_CASES[0], POOL_CASES[2], ((3, 4, 3), (2, 2, 2), (1, 2, 1), [(1, 0), (0, 1), (1, 1)])])
@pytest.mark.parametrize("kind", KINDS)
def test_pool_gradcheck(size, window, stride, pads, kind):
    x = distinct(1, 2, *size)
    if kind == "lp":
        x = x.abs() + 0.5  # |x|^p is not smooth at 0
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: pool(t, kind, window, stride, pads, p=2.5, sigma=1.3), (x,))


ADAPTIVE_CASES = [((7,), (3,)), ((5,), (8,)), ((7, 5), (3, 4)), ((4, 6), (6, 4)), ((5, 3, 4), (2, 5, 3))]


@pytest.mark.parametrize("size,output", ADAPTIVE_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_adaptive_matches_loop(size, output, kind):
    x = torch.randn(2, 3, *size, dtype=DT)
    got = adaptive_pool(x, kind, output, p=1.5, sigma=0.7)
    assert got.shape == (2, 3, *output)
    torch.testing.assert_close(got, ref_adaptive(x, kind, output, p=1.5, sigma=0.7))


@pytest.mark.parametrize("size,output", ADAPTIVE_CASES)
def test_adaptive_matches_torch_builtins(size, output):
    d = len(size)
    x = torch.randn(2, 3, *size, dtype=DT)
    torch.testing.assert_close(adaptive_pool(x, "max", output), getattr(F, f"adaptive_max_pool{d}d")(x, output))
    torch.testing.assert_close(adaptive_pool(x, "avg", output), getattr(F, f"adaptive_avg_pool{d}d")(x, output))


@pytest.mark.parametrize("kind", KINDS)
def test_adaptive_with_divisible_sizes_equals_pool(kind):
    x = torch.randn(2, 2, 6, 8, dtype=DT)
    no_pad = [(0, 0), (0, 0)]
    torch.testing.assert_close(adaptive_pool(x, kind, (3, 2)), pool(x, kind, (2, 4), (2, 4), no_pad))


@pytest.mark.parametrize("size,output", [((5,), (3,)), ((4, 3), (3, 5)), ((3, 2, 3), (2, 3, 2))])
@pytest.mark.parametrize("kind", KINDS)
def test_adaptive_gradcheck(size, output, kind):
    x = distinct(1, 2, *size)
    if kind == "lp":
        x = x.abs() + 0.5
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: adaptive_pool(t, kind, output, p=3.0, sigma=0.9), (x,))


def test_maxout_matches_loop_and_grad():
    x = distinct(2, 6, 3, 4)
    got = maxout(x, 3)
    ref = torch.stack([x[:, 3 * g : 3 * g + 3].amax(dim=1) for g in range(2)], dim=1)
    torch.testing.assert_close(got, ref)
    assert maxout(torch.randn(1, 4, 5, dtype=DT), 2).shape == (1, 2, 5)
    assert maxout(torch.randn(1, 6, 2, 2, 2, dtype=DT), 6).shape == (1, 1, 2, 2, 2)
    assert torch.autograd.gradcheck(lambda t: maxout(t, 2), (distinct(1, 4, 3).requires_grad_(),))
    with pytest.raises(ValueError, match="divisible"):
        maxout(x, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_dtype_preserved(dtype, kind):
    x = torch.randn(2, 3, 7, 6, dtype=DT)
    args = ((3, 3), (2, 1), [(1, 2), (0, 1)])
    got = pool(x.to(dtype), kind, *args)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), pool(x, kind, *args), atol=0.1, rtol=0.05)
    got = adaptive_pool(x.to(dtype), kind, (3, 4))
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), adaptive_pool(x, kind, (3, 4)), atol=0.1, rtol=0.05)
    assert maxout(x.to(dtype), 3).dtype == dtype


@st.composite
def pool_configs(draw):
    d = draw(st.integers(1, 3))
    max_m = {1: 9, 2: 6, 3: 4}[d]
    size, window, stride, pads = [], [], [], []
    for _ in range(d):
        m = draw(st.integers(1, max_m))
        k = draw(st.integers(1, 4))
        before, after = draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))
        if m + before + after < k:  # window must fit the padded input
            after = k - 1
            m = max(m, k - before - after)
        size.append(m), window.append(k), stride.append(draw(st.integers(1, 3))), pads.append((before, after))
    output = tuple(draw(st.integers(1, 5)) for _ in range(d))
    kind = draw(st.sampled_from(KINDS))
    p = draw(st.sampled_from([0.5, 1.0, 2.0, 3.5]))
    sigma = draw(st.floats(0.3, 3.0))
    return tuple(size), tuple(window), tuple(stride), pads, output, kind, p, sigma, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None)
@given(pool_configs())
def test_property_pool_and_adaptive_match_loops(config):
    size, window, stride, pads, output, kind, p, sigma, seed = config
    x = torch.randn(1, 2, *size, dtype=DT, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(pool(x, kind, window, stride, pads, p=p, sigma=sigma), ref_pool(x, kind, window, stride, pads, p=p, sigma=sigma))
    torch.testing.assert_close(adaptive_pool(x, kind, output, p=p, sigma=sigma), ref_adaptive(x, kind, output, p=p, sigma=sigma))
