"""Shared machinery for the convolution-family numerical tests.

Everything here is *reference* code written independently of ``convdsl``:
PyTorch built-ins (F.conv*, F.conv_transpose*, F.linear) or direct loops over
the book's equations.  The compiled net is only ever compared with these.

(Used by tests/ops/test_conv.py and tests/ops/test_local_tiled_deconv_dense.py.)
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import convdsl

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These shapes are tiny: intra-op threads only add latency (badly so on a
    busy 2-core machine), so run each test module single-threaded and restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- building and parameterizing nets -------------------------------------------------------

def compile_net(source: str, optimize: bool = True):
    return convdsl.compile(source, backend="torch", optimize=optimize)


def one_layer(stmt: str, inputs: str, *, tables: str = "", out: str = "y") -> str:
    """Source of a net with the given input declaration and one statement."""
    return f"{tables}\nnet Net({inputs}) {{\n    {stmt}\n    return {out}\n}}\n"


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randomize(net, seed: int = 0, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Overwrite every parameter of `net` with N(0, scale²) values (also the
    entries a connection table leaves out: the compiled net must ignore them)
    and return float32 copies keyed like state_dict()."""
    g = gen(seed)
    values = {}
    with torch.no_grad():
        for name, p in net.named_parameters():
            v = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
            p.copy_(v)
            values[name] = v.clone()
    return values


def rand(*shape, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


# -- padding arithmetic, written out here independently of convdsl -------------------------

def keff(k: int, r: int = 1) -> int:
    return r * (k - 1) + 1


def tf_same_pads(m: int, k: int, s: int, r: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME: out = ceil(m/s); total = max((out-1)·s + k' − m, 0);
    the smaller half before."""
    out = -(-m // s)
    total = max((out - 1) * s + keff(k, r) - m, 0)
    return (total // 2, total - total // 2)


def pad_nd(x: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Zero-pad the spatial dims of [N, C, *m] by (before, after) pairs, first
    spatial dim first (negative values crop)."""
    flat = []
    for before, after in reversed(list(pairs)):
        flat += [before, after]
    return F.pad(x, flat)


def out_size(m: int, k: int, s: int, before: int, after: int, r: int = 1) -> int:
    return (m + before + after - keff(k, r)) // s + 1


# -- references -----------------------------------------------------------------------------

def ref_conv(x, w, b, *, stride=1, pads=None, dilation=1, groups=1, bias="channel"):
    """F.conv{1,2,3}d on an explicitly padded input (asymmetric pads allowed)."""
    rank = x.dim() - 2
    if pads is not None:
        x = pad_nd(x, pads)
    y = CONV[rank](x, w, None, stride=stride, dilation=dilation, groups=groups)
    return add_ref_bias(y, b, bias)


def add_ref_bias(y, b, mode="channel"):
    if b is None or mode == "none":
        return y
    if mode == "channel":
        return y + b.view(1, -1, *([1] * (y.dim() - 2)))
    if mode == "location":
        assert b.shape == y.shape[1:], (b.shape, y.shape)
        return y + b.unsqueeze(0)
    raise ValueError(mode)


def loop_windowed(xpad: torch.Tensor, out_sizes, kernel, stride, dilation,
                  contrib: Callable) -> torch.Tensor:
    """Direct loop over the book's windowed sum (eq. 9.7/9.8 and relatives):

        Z[:, :, p] = Σ_q contrib(p, q, V[:, :, p·s + q·r])

    where contrib maps the [N, C] input slice at kernel offset q for output
    position p to the [N, out] contribution."""
    n = xpad.shape[0]
    cols = []
    for p in itertools.product(*(range(o) for o in out_sizes)):
        acc = None
        for q in itertools.product(*(range(k) for k in kernel)):
            idx = tuple(pi * s + qi * r for pi, qi, s, r in zip(p, q, stride, dilation))
            term = contrib(p, q, xpad[(slice(None), slice(None)) + idx])
            acc = term if acc is None else acc + term
        cols.append(acc)
    y = torch.stack(cols, dim=-1)
    return y.reshape(n, y.shape[1], *out_sizes)


def true_convolution_full(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq. 9.4 summed over input channels, literally:
    S[n, o, i] = Σ_c Σ_m I[n, c, m] · K[o, c, i − m], for every i where some
    term exists (the 'full' convolution, size m + k − 1 per dim)."""
    rank = x.dim() - 2
    m_sizes, k_sizes = x.shape[2:], w.shape[2:]
    out_sizes = [m + k - 1 for m, k in zip(m_sizes, k_sizes)]
    n, out = x.shape[0], w.shape[0]
    cols = []
    for i in itertools.product(*(range(o) for o in out_sizes)):
        acc = x.new_zeros(n, out)
        for m in itertools.product(*(range(s) for s in m_sizes)):
            kk = tuple(a - b for a, b in zip(i, m))
            if all(0 <= v < k for v, k in zip(kk, k_sizes)):
                # [N, C] @ [C, out]
                acc = acc + x[(slice(None), slice(None)) + m] @ w[(slice(None), slice(None)) + kk].T
        cols.append(acc)
    return torch.stack(cols, -1).reshape(n, out, *out_sizes)


def outer_kernel(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Outer product over spatial dims of [out, in, k_d] factors (einsum)."""
    letters = "abc"[: len(factors)]
    spec = ",".join(f"oi{l}" for l in letters) + f"->oi{letters}"
    return torch.einsum(spec, *factors)


def deconv_by_adjoint(x, w, *, stride, before, size, dilation=None, groups=1):
    """Transpose convolution as the adjoint of a convolution (eq. 9.12–9.14):
    the gradient, w.r.t. a zero input z of spatial size `size`, of
    conv(pad(z, before, ·), w) contracted with x.  The `after` padding (or crop)
    is chosen so the conv output has exactly x's spatial size.  Differentiable in
    x and w (create_graph)."""
    rank = x.dim() - 2
    dilation = dilation or (1,) * rank
    n, cin = x.shape[:2]
    cout = w.shape[1] * groups
    z = torch.zeros((n, cout) + tuple(size), dtype=x.dtype, requires_grad=True)
    pairs = []
    for m, k, s, b, sz, r in zip(x.shape[2:], w.shape[2:], stride, before, size, dilation):
        after = (m - 1) * s + keff(k, r) - sz - b
        pairs.append((b, after))
    y = CONV[rank](pad_nd(z, pairs), w, None, stride=stride, dilation=dilation, groups=groups)
    assert y.shape == x.shape, (y.shape, x.shape)
    (grad,) = torch.autograd.grad(y, z, grad_outputs=x, create_graph=True)
    return grad


# -- comparing a compiled net with a reference ----------------------------------------------

def assert_close(actual, expected, what="", rtol=1e-4, atol=1e-5):
    expected = expected.to(actual.dtype)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def check_against(net, inputs: Sequence[torch.Tensor], reference: Callable, *, seed: int = 1,
                  rtol=1e-4, atol=1e-5) -> dict:
    """Forward and backward of `net` (float32) against `reference(*inputs, params)`
    run in float64 on the same values.  Compares the output, the gradient w.r.t.
    every input, and the gradient w.r.t. every trainable parameter (the loss is
    Σ y·g with a fixed random g).  Returns the compiled net's grads by name."""
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    xs = [x.detach().clone().float().requires_grad_(True) for x in inputs]
    net.zero_grad(set_to_none=True)
    y = net(*xs)
    g = torch.randn(y.shape, generator=gen(seed))
    (y * g).sum().backward()

    xr = [x.detach().double().requires_grad_(True) for x in inputs]
    pr = {k: v.double().requires_grad_(True) for k, v in params.items()}
    yr = reference(*xr, pr)
    assert y.shape == yr.shape, f"output shape {tuple(y.shape)} != reference {tuple(yr.shape)}"
    (yr * g.double()).sum().backward()

    assert_close(y.detach(), yr.detach(), "forward", rtol, atol)
    for i, (a, b) in enumerate(zip(xs, xr)):
        assert a.grad is not None, f"no gradient for input {i}"
        assert_close(a.grad, b.grad, f"d/d input {i}", rtol, atol)
    grads = {}
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        expected = pr[name].grad
        if expected is None:
            expected = torch.zeros_like(pr[name])
        assert p.grad is not None, f"no gradient for parameter {name}"
        assert_close(p.grad, expected, f"d/d {name}", rtol, atol)
        grads[name] = p.grad.detach().clone()
    return grads


def gradcheck_net(net, inputs: Sequence[torch.Tensor]) -> bool:
    """torch.autograd.gradcheck in float64 over the inputs and every trainable
    parameter of the compiled net."""
    net = net.double()
    names = [k for k, p in net.named_parameters() if p.requires_grad]
    ps = [dict(net.named_parameters())[k].detach().clone().requires_grad_(True) for k in names]
    xs = [x.detach().double().requires_grad_(True) for x in inputs]
    nx = len(xs)

    def fn(*args):
        return functional_call(net, dict(zip(names, args[nx:])), tuple(args[:nx]))

    return torch.autograd.gradcheck(fn, (*xs, *ps), eps=1e-6, atol=1e-5, rtol=1e-4)


def shape_dict(net) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def prod(v) -> int:
    return math.prod(v)
