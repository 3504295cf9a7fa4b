"""The test references of tests/reference.py against each other and PyTorch's
built-ins where both apply: many tests lean on each of them, so a mistake here
would hide a mistake in convdsl."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from .ops.helpers import single_thread  # noqa: F401  (autouse fixture)
from .reference import (
    add_bias,
    conv_by_torch,
    conv_table_loop,
    deconv_by_adjoint,
    deconv_by_transpose,
    local_loop,
    maxout_loop,
    outer_kernel,
    patches_loop,
    pool_loop,
    resolve_pads,
    tiled_loop,
    true_convolution_full,
    window_cells,
)

D = torch.float64


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=D)


@pytest.mark.parametrize("pad,expected", [
    ("valid", [(0, 0), (0, 0)]),
    ("same", [(1, 1), (0, 1)]),   # m = (5, 6), k = 3, s = 2: totals 2 and 1
    ("full", [(2, 2), (4, 4)]),   # dilation (1, 2): k' = (3, 5)
    (1, [(1, 1), (1, 1)]),
    ((2, (0, 3)), [(2, 2), (0, 3)]),
])
def test_resolve_pads(pad, expected):
    dilation = (1, 2) if pad == "full" else 1
    assert resolve_pads(pad, (5, 6), 3, 2, dilation) == expected


def test_pool_loop_matches_torch_pooling():
    x = rand(2, 3, 7, 8)
    cells = window_cells((7, 8), 3, 2, 1)
    torch.testing.assert_close(pool_loop(x, "maxpool", cells), F.max_pool2d(x, 3, 2, 1))
    torch.testing.assert_close(pool_loop(x, "avgpool", cells),
                               F.avg_pool2d(x, 3, 2, 1, count_include_pad=False))
    torch.testing.assert_close(pool_loop(x, "lppool", window_cells((7, 8), 2)),
                               F.lp_pool2d(x, 2.0, 2))
    # a very large sigma weighs every tap alike
    torch.testing.assert_close(pool_loop(x, "wavgpool", cells, sigma=1e6),
                               pool_loop(x, "avgpool", cells))


def test_pool_loop_wavg_weights_and_zero_lp_window():
    x = torch.tensor([[[1.0, 2.0, 4.0]]], dtype=D)
    e = math.exp(-0.5)
    got = pool_loop(x, "wavgpool", window_cells((3,), 3, 1, 1))
    want = [(1 + 2 * e) / (1 + e), (e + 2 + 4 * e) / (1 + 2 * e), (2 * e + 4) / (e + 1)]
    torch.testing.assert_close(got, torch.tensor([[want]], dtype=D))
    z = torch.zeros(1, 1, 4, dtype=D, requires_grad=True)
    y = pool_loop(z, "lppool", window_cells((4,), 2), p=3.0)
    y.sum().backward()
    assert torch.equal(y.detach(), torch.zeros(1, 1, 2, dtype=D)) and torch.equal(z.grad, 0 * z)


def test_maxout_loop_takes_the_first_maximum_and_nan():
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, math.nan, 5.0]], dtype=D).reshape(1, 6, 1)
    x.requires_grad_(True)
    y = maxout_loop(x, 3)
    assert y[0, 0, 0] == 3.0 and y[0, 1, 0].isnan()
    y[:, :1].sum().backward()
    assert x.grad.flatten().tolist() == [0, 1, 0, 0, 0, 0]
    torch.testing.assert_close(maxout_loop(rand(2, 6, 3), 2), rand(2, 6, 3).reshape(2, 3, 2, 3).amax(2))


def test_conv_table_loop_with_every_connection_is_conv():
    x, w, b = rand(2, 3, 6, 7), rand(4, 3, 3, 2, seed=1), rand(4, seed=2)
    full = [[0, 1, 2]] * 4
    kw = {"stride": (2, 1), "pad": "same", "dilation": (1, 2)}
    torch.testing.assert_close(conv_table_loop(x, w, full, b, **kw), conv_by_torch(x, w, b, **kw))
    # a row without input 1 ignores what the weight holds there
    w2 = w.clone()
    w2[0, 1] = 1e3
    sparse = [[0, 2], [0, 1, 2], [1], [2]]
    torch.testing.assert_close(conv_table_loop(x, w2, sparse, b)[:, 0],
                               conv_table_loop(x, w, sparse, b)[:, 0])


def test_true_convolution_is_correlation_with_the_flipped_kernel():
    x, w = rand(1, 2, 5, 4), rand(3, 2, 3, 2, seed=1)
    torch.testing.assert_close(true_convolution_full(x, w),
                               conv_by_torch(x, w.flip([2, 3]), pad="full"))


def test_local_and_tiled_loops_with_one_kernel_are_conv():
    x, k = rand(2, 3, 7, 6), rand(4, 3, 3, 2, seed=1)
    kw = {"stride": (2, 1), "pad": ((1, 0), (0, 1))}
    want = conv_by_torch(x, k, **kw)
    local = k[:, None, None].expand(4, *want.shape[2:], 3, 3, 2)
    torch.testing.assert_close(local_loop(x, local, **kw), want)
    torch.testing.assert_close(tiled_loop(x, k.expand(2, 3, 4, 3, 3, 2), **kw), want)


def test_tiled_bias_repeats_over_positions():
    y, b = torch.zeros(1, 2, 3, 5, dtype=D), rand(2, 3, 2)  # tiles (2, 3), 2 outputs
    got = add_bias(y, b, "tiled")
    for i in range(3):
        for j in range(5):
            assert torch.equal(got[0, :, i, j], b[i % 2, j % 3])


def test_patches_loop_matches_unfold():
    x = rand(2, 3, 6, 5)
    pads = [(1, 0), (2, 1)]
    got = patches_loop(x, (3, 2), (2, 1), pads, (1, 2), fill=0.0)
    cols = F.unfold(F.pad(x, (2, 1, 1, 0)), (3, 2), dilation=(1, 2), stride=(2, 1))
    torch.testing.assert_close(got.permute(0, 1, 4, 5, 2, 3).reshape(cols.shape), cols)


@pytest.mark.parametrize("pad,size", [("same", None), ("same", (5, 8)), (((1, 0), (0, 2)), None),
                                      ("valid", (8, 10))])
def test_deconv_by_transpose_is_the_adjoint_of_conv(pad, size):
    x, w = rand(2, 3, 3, 4), rand(3, 2, 3, 3, seed=1)
    y = deconv_by_transpose(x, w, stride=2, pad=pad, size=size)
    # the conv it transposes: for same, the same conv over the output size (TensorFlow)
    over = tuple(y.shape[2:]) if pad == "same" else (3, 4)
    before = [b for b, _ in resolve_pads(pad, over, 3, 2)]
    torch.testing.assert_close(y, deconv_by_adjoint(x, w, stride=(2, 2), before=before,
                                                    size=y.shape[2:]))


def test_outer_kernel():
    a, b = rand(2, 3, 4), rand(2, 3, 5, seed=1)
    torch.testing.assert_close(outer_kernel([a, b]), a[..., :, None] * b[..., None, :])
