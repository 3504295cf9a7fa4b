"""Generated kernels at sizes that straddle their block sizes, against
torch.nn.functional: every access is masked, so one past a block (or one
short of it) must give the same numbers as the sizes in between.

The interpreter's tiles (convdsl/triton/families): conv BLOCK_M=64 output
positions x BLOCK_N=32 channels x BLOCK_K=32 reduction; dense 32 x 64 x 64;
elementwise and pooling 4096 outputs per program; depthwise 32 x 64 output
rows x columns. Sizes 1, 15, 16, 17 sit around tl.dot's minimum tile (16).
The default run takes one size below, at and above each; -m slow runs all
and the backward kernels too.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import convdsl

TOL = {"rtol": 2e-4, "atol": 2e-4}


def compile_both(src: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convdsl.compile(src, backend="triton")


def case_id(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


def check(src: str, inputs: list[torch.Tensor], reference, backward: bool) -> None:
    """Forward (and backward) of the triton net against `reference(inputs, params)`."""
    net = compile_both(src)
    params = dict(net.named_parameters())
    leaves = [x.clone().requires_grad_(backward) for x in inputs]
    ref_leaves = [x.clone().requires_grad_(backward) for x in inputs]
    ref_params = {k: v.detach().clone().requires_grad_(backward) for k, v in params.items()}
    got, want = net(*leaves), reference(*ref_leaves, ref_params)
    torch.testing.assert_close(got, want, **TOL)
    if backward:
        seed = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
        (got * seed).sum().backward()
        (want * seed).sum().backward()
        for a, b in zip(leaves, ref_leaves):
            torch.testing.assert_close(a.grad, b.grad, **TOL)
        for name, p in params.items():
            torch.testing.assert_close(p.grad, ref_params[name].grad, **TOL, msg=name)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (batch, c_in, c_out, h, w, kernel): M = batch·h_out·w_out, K = c_in·k², N = c_out
CONV_FAST = [(1, 1, 1, 1, 1, 1), (1, 31, 31, 7, 9, 1), (1, 32, 32, 8, 8, 1),
             (1, 33, 33, 5, 13, 1)]
CONV_SLOW = [(1, 15, 16, 4, 4, 1), (1, 17, 15, 16, 1, 1), (2, 2, 17, 17, 17, 3),
             (1, 16, 33, 3, 11, 2), (3, 7, 1, 15, 1, 3), (1, 2, 65, 9, 8, 3)]


def _conv(n, cin, cout, h, w, k, backward):
    src = (f"net C(x: f32[N, {cin}, H, W]) {{\n    return conv(x, {cout}, kernel={k}, "
           f"pad=same)\n}}")
    total = k - 1
    pads = (total // 2, total - total // 2) * 2

    def ref(x, p):
        return F.conv2d(F.pad(x, pads), p["conv.weight"], p["conv.bias"])

    check(src, [rand(n, cin, h, w)], ref, backward)


@pytest.mark.parametrize("shape", CONV_FAST, ids=case_id)
def test_conv_around_its_tiles(shape):
    _conv(*shape, backward=shape == (1, 33, 33, 5, 13, 1))


@pytest.mark.slow
@pytest.mark.parametrize("shape", CONV_FAST + CONV_SLOW, ids=case_id)
def test_conv_around_its_tiles_forward_and_backward(shape):
    _conv(*shape, backward=True)


# (batch, features in, features out) around 32 x 64 x 64
DENSE_FAST = [(1, 1, 1), (31, 63, 63), (32, 64, 64), (33, 65, 65)]
DENSE_SLOW = [(17, 15, 16), (16, 17, 15), (64, 1, 129), (1, 129, 1)]


def _dense(n, fin, fout, backward):
    src = f"net D(x: f32[N, {fin}]) {{\n    return dense(x, {fout})\n}}"
    check(src, [rand(n, fin)], lambda x, p: F.linear(x, p["dense.weight"], p["dense.bias"]),
          backward)


@pytest.mark.parametrize("shape", DENSE_FAST, ids=case_id)
def test_dense_around_its_tiles(shape):
    _dense(*shape, backward=shape == (33, 65, 65))


@pytest.mark.slow
@pytest.mark.parametrize("shape", DENSE_FAST + DENSE_SLOW, ids=case_id)
def test_dense_around_its_tiles_forward_and_backward(shape):
    _dense(*shape, backward=True)


# Pooling outputs (c, h_out, w_out) with c·h_out·w_out = 4095, 4096, 4097; window 2.
POOL_FAST = [(5, 9, 91), (4, 32, 32), (17, 1, 241)]
POOL_SLOW = [(1, 1, 1), (3, 5, 1), (1, 16, 17), (2, 15, 33)]
POOLS = {"maxpool": lambda x: F.max_pool2d(x, 2), "avgpool": lambda x: F.avg_pool2d(x, 2)}


def _pool(op, c, h, w, backward):
    src = f"net P(x: f32[N, {c}, H, W]) {{\n    return {op}(x, 2)\n}}"
    check(src, [rand(1, c, 2 * h, 2 * w + 1)], lambda x, p: POOLS[op](x), backward)


@pytest.mark.parametrize("op", sorted(POOLS))
@pytest.mark.parametrize("shape", POOL_FAST, ids=case_id)
def test_pooling_around_its_block(op, shape):
    _pool(op, *shape, backward=False)


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(POOLS))
@pytest.mark.parametrize("shape", POOL_FAST + POOL_SLOW, ids=case_id)
def test_pooling_around_its_block_forward_and_backward(op, shape):
    _pool(op, *shape, backward=True)


@pytest.mark.parametrize("numel", [1, 4095, 4096, 4097])
def test_elementwise_chain_around_its_block(numel):
    src = "net E(x: f32[N, 1, W], y: f32[N, 1, W]) {\n    return tanh(x * 2 - y) * y + 1\n}"
    check(src, [rand(1, 1, numel, seed=1), rand(1, 1, numel, seed=2)],
          lambda x, y, p: torch.tanh(x * 2 - y) * y + 1, backward=numel == 4097)


@pytest.mark.parametrize("channels", [1, 15, 16, 17, 33])
def test_channel_softmax_at_odd_lengths(channels):
    src = f"net S(x: f32[N, {channels}, H, W]) {{\n    return softmax(x)\n}}"
    check(src, [rand(2, channels, 3, 5)], lambda x, p: torch.softmax(x, dim=1),
          backward=channels == 17)


# Depthwise output tile 32 x 64 (rows x columns).
@pytest.mark.parametrize("h,w", [(31, 63), (33, 65)] + [
    pytest.param(32, 64, marks=pytest.mark.slow), pytest.param(1, 1, marks=pytest.mark.slow)])
def test_depthwise_around_its_tile(h, w):
    src = "net W(x: f32[N, 2, H, W]) {\n    return depthwise(x, 3, pad=same)\n}"
    check(src, [rand(1, 2, h, w)],
          lambda x, p: F.conv2d(F.pad(x, (1, 1, 1, 1)), p["depthwise.weight"],
                                p["depthwise.bias"], groups=2), backward=False)


@pytest.mark.parametrize("size", [15, 16, 17])
def test_deconv_at_sizes_around_sixteen(size):
    src = f"net T(x: f32[N, {size}, H, W]) {{\n    return deconv(x, {size}, kernel=2, stride=2)\n}}"
    check(src, [rand(1, size, 3, 5)],
          lambda x, p: F.conv_transpose2d(x, p["deconv.weight"], p["deconv.bias"], stride=2),
          backward=size == 17)
