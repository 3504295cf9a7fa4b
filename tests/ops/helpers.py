"""Shared machinery for the convolution-family numerical tests: building and
parameterizing one-layer nets, and comparing a compiled net's forward and
backward with a reference (the references themselves are in tests/reference.py).

(Used by tests/ops/test_conv.py and tests/ops/test_local_tiled_deconv_dense.py.)
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch.func import functional_call

import convdsl


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
