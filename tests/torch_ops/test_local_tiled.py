"""Tests for convdsl.torch_ops.local against direct loop references (eqs. 9.9, 9.10;
tests/reference.py)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from convdsl.torch_ops.local import extract_patches, local_conv, tiled_conv

from ..ops.helpers import single_thread  # noqa: F401  (autouse: tiny tensors)
from ..reference import local_loop, out_size, patches_loop, tiled_loop

DT = torch.float64


CASES = [  # (spatial size, kernel, stride, pads)
    ((7,), (3,), (2,), [(1, 2)]),
    ((6, 5), (3, 2), (1, 2), [(1, 0), (0, 1)]),
    ((5, 6), (2, 3), (2, 1), [(0, 0), (2, 1)]),
    ((4, 5, 3), (2, 3, 2), (1, 2, 1), [(1, 0), (0, 1), (1, 1)]),
]


@pytest.mark.parametrize("size,kernel,stride,pads", CASES)
@pytest.mark.parametrize("dilated", [False, True])
def test_extract_patches_matches_loop(size, kernel, stride, pads, dilated):
    dilation = tuple(2 if dilated and i == 0 else 1 for i in range(len(size)))
    x = torch.randn(2, 3, *size, dtype=DT)
    got = extract_patches(x, kernel, stride, pads, dilation, fill=-7.5)
    torch.testing.assert_close(got, patches_loop(x, kernel, stride, pads, dilation, -7.5))


def _local_weight(x, n_out, kernel, stride, pads):
    d = x.dim() - 2
    o = [out_size(x.shape[2 + i], kernel[i], stride[i], *pads[i]) for i in range(d)]
    return torch.randn(n_out, *o, x.shape[1], *kernel, dtype=DT)


@pytest.mark.parametrize("size,kernel,stride,pads", CASES)
def test_local_conv_matches_eq_9_9(size, kernel, stride, pads):
    x = torch.randn(2, 3, *size, dtype=DT)
    w = _local_weight(x, 4, kernel, stride, pads)
    want = local_loop(x, w, stride=stride, pad=pads)
    torch.testing.assert_close(local_conv(x, w, stride, pads), want)


@pytest.mark.parametrize("size,kernel,stride,pads", CASES)
@pytest.mark.parametrize("tile_count", [1, 2, 3])
def test_tiled_conv_matches_eq_9_10(size, kernel, stride, pads, tile_count):
    d = len(size)
    tiles = tuple(tile_count + (i % 2) for i in range(d))  # mixed, usually non-divisors of o
    x = torch.randn(2, 3, *size, dtype=DT)
    w = torch.randn(*tiles, 4, 3, *kernel, dtype=DT)
    want = tiled_loop(x, w, stride=stride, pad=pads)
    torch.testing.assert_close(tiled_conv(x, w, stride, pads), want)


def test_tiled_single_tile_is_conv2d():
    x = torch.randn(2, 3, 9, 8, dtype=DT)
    w = torch.randn(5, 3, 3, 2, dtype=DT)
    got = tiled_conv(x, w[None, None], (2, 1), [(1, 1), (2, 2)])
    torch.testing.assert_close(got, F.conv2d(x, w, stride=(2, 1), padding=(1, 2)))


def test_local_with_shared_weight_is_conv2d():
    x = torch.randn(2, 3, 7, 6, dtype=DT)
    w = torch.randn(4, 3, 3, 3, dtype=DT)
    o = (4, 3)
    local_w = w[:, None, None].expand(4, *o, 3, 3, 3)
    torch.testing.assert_close(local_conv(x, local_w, (2, 2), [(1, 1), (1, 1)]), F.conv2d(x, w, stride=2, padding=1))


def test_tiles_equal_output_size_is_local_conv():
    x = torch.randn(2, 3, 7, 6, dtype=DT)
    stride, pads = (2, 1), [(0, 1), (1, 0)]
    o = (3, 5)  # kernel (3, 3)
    tiled_w = torch.randn(*o, 4, 3, 3, 3, dtype=DT)
    local_w = tiled_w.permute(2, 0, 1, 3, 4, 5)  # [*t, out, C, *k] -> [out, *o, C, *k]
    torch.testing.assert_close(tiled_conv(x, tiled_w, stride, pads), local_conv(x, local_w, stride, pads))


def test_local_conv_rejects_wrong_output_dims():
    x = torch.randn(1, 2, 5, 5, dtype=DT)
    with pytest.raises(ValueError, match="output"):
        local_conv(x, torch.randn(3, 4, 4, 2, 3, 3, dtype=DT), (1, 1), [(0, 0), (0, 0)])


def test_rejects_window_larger_than_input():
    with pytest.raises(ValueError):
        extract_patches(torch.randn(1, 1, 3, dtype=DT), (5,), (1,), [(0, 0)])


@pytest.mark.parametrize("size,kernel,stride,pads", [CASES[0], CASES[1], ((3, 3, 2), (2, 2, 1), (1, 2, 1), [(1, 0), (0, 1), (0, 0)])])
def test_local_and_tiled_gradcheck(size, kernel, stride, pads):
    x = torch.randn(1, 2, *size, dtype=DT, requires_grad=True)
    w_local = _local_weight(x.detach(), 2, kernel, stride, pads).requires_grad_()
    tiles = (2,) * len(size)
    w_tiled = torch.randn(*tiles, 2, 2, *kernel, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_conv(a, b, stride, pads), (x, w_local))
    assert torch.autograd.gradcheck(lambda a, b: tiled_conv(a, b, stride, pads), (x, w_tiled))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtype_preserved(dtype):
    x = torch.randn(2, 3, 6, 5, dtype=DT)
    w_local = _local_weight(x, 4, (3, 2), (1, 1), [(1, 1), (0, 0)])
    w_tiled = torch.randn(2, 3, 4, 3, 3, 2, dtype=DT)
    args = ((1, 1), [(1, 1), (0, 0)])
    for fn, w in ((local_conv, w_local), (tiled_conv, w_tiled)):
        got = fn(x.to(dtype), w.to(dtype), *args)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), fn(x, w, *args), atol=0.3, rtol=0.05)


@st.composite
def conv_configs(draw):
    d = draw(st.integers(1, 3))
    max_m = {1: 8, 2: 5, 3: 4}[d]
    size, kernel, stride, pads = [], [], [], []
    for _ in range(d):
        m = draw(st.integers(1, max_m))
        before, after = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        k = draw(st.integers(1, m + before + after))
        size.append(m), kernel.append(k), pads.append((before, after))
        stride.append(draw(st.integers(1, 3)))
    tiles = tuple(draw(st.integers(1, 3)) for _ in range(d))
    return tuple(size), tuple(kernel), tuple(stride), pads, tiles, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=30, deadline=None)
@given(conv_configs())
def test_property_local_and_tiled_match_loops(config):
    size, kernel, stride, pads, tiles, seed = config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, *size, dtype=DT, generator=g)
    o = [out_size(size[i], kernel[i], stride[i], *pads[i]) for i in range(len(size))]
    w_local = torch.randn(2, *o, 2, *kernel, dtype=DT, generator=g)
    w_tiled = torch.randn(*tiles, 2, 2, *kernel, dtype=DT, generator=g)
    want = local_loop(x, w_local, stride=stride, pad=pads)
    torch.testing.assert_close(local_conv(x, w_local, stride, pads), want)
    want = tiled_loop(x, w_tiled, stride=stride, pad=pads)
    torch.testing.assert_close(tiled_conv(x, w_tiled, stride, pads), want)
