"""Max pooling's gradient over large windows (families/pool_grad.py, "routed"):
one argmax per window, then a gather of dy where it matches — linear in the
input, where rescanning each window once per input was quadratic for a global
or adaptive pool.

Under Triton's interpreter on CPU tensors. Every gradient is compared with an
INDEPENDENT reference: PyTorch autograd in float64 of torch.nn.functional
(adaptive_max_pool1d/2d/3d, max_pool1d/2d/3d, relu, conv3d) — ties, NaN and
-inf included, since those decide which single input gets each window's dy.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.cost import kernel_costs, program_costs
from convdsl.errors import ConvDSLInputError
from convdsl.triton.families import family
from convdsl.triton.families import pool_grad as pool_grad_family
from convdsl.triton.loader import load_kernel

F64 = torch.float64
AMAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The interpreter computes masked lanes too; numpy warns about values never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- nets, gradients, references --------------------------------------------------------------

def one_input_net(expr: str, channels: int, spatial) -> torch.nn.Module:
    dims = ", ".join(["N", str(channels)] + [str(s) for s in spatial])
    return convdsl.compile(f"net T(x: f32[{dims}]) {{\n    return {expr}\n}}\n",
                           backend="triton")


def pool_plan(net):
    """The backward program's pool_dx plan (run the net backward first)."""
    (plan,) = [p for p in net._program._backward[("x",)].plans if p.family == "pool_dx"]
    return plan


def forward_backward(net, x: torch.Tensor, seed: int = 1):
    """(y, dx, dy) of the generated kernels for loss = (y * dy).sum(), dy random."""
    leaf = x.detach().clone().requires_grad_(True)
    y = net(leaf)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    (y * dy).sum().backward()
    return y.detach(), leaf.grad, dy


def reference(fn, x: torch.Tensor, dy: torch.Tensor):
    """(y, dx) of fn under PyTorch autograd in float64."""
    leaf = x.detach().to(F64).requires_grad_(True)
    y = fn(leaf)
    (y * dy.to(F64)).sum().backward()
    return y.detach(), leaf.grad


def check(got, want):
    assert got.shape == want.shape, (got.shape, want.shape)
    torch.testing.assert_close(got.to(F64), want, atol=1e-5, rtol=1e-5, equal_nan=True)


def tied(shape, generator_seed: int = 0) -> torch.Tensor:
    """Small integers: every window holds many equal maxima."""
    g = torch.Generator().manual_seed(generator_seed)
    return torch.randint(0, 3, shape, generator=g).float()


def with_specials(x: torch.Tensor) -> torch.Tensor:
    """Two NaNs in one plane (the last in scan order wins, as in PyTorch), and
    an all -inf plane (its first input wins)."""
    x = x.clone()
    flat = x[1, 0].view(-1)
    flat[flat.numel() // 3] = flat[2 * flat.numel() // 3] = float("nan")
    x[0, 1] = float("-inf")
    return x


def assert_routed(net, routed: bool = True):
    plan = pool_plan(net)
    assert plan.meta["routed"] is routed, plan.meta
    assert (f"def {plan.name}_argmax(" in plan.source) is routed
    return plan


# -- adaptive and global max pooling, 1-D to 3-D --------------------------------------------------

# (spatial sizes declared, sizes run, output): symbolic sizes always route (the
# cell size is unknown at compile time); the static ones have cells over 64 taps.
ADAPTIVE = {
    "1d-global": ((100,), (100,), 1),
    "1d-overlap": (("L",), (30,), 7),  # 30 / 7: neighbouring cells share an input
    "2d-global": (("H", "W"), (9, 10), (1, 1)),
    "2d-overlap": (("H", "W"), (9, 10), (4, 3)),
    "2d-more-cells": (("H", "W"), (4, 10), (9, 3)),  # up to 3 cells hold one input along h
    "3d-global": (("T", "H", "W"), (4, 5, 6), (1, 1, 1)),
    "3d-overlap": (("T", "H", "W"), (5, 6, 7), (2, 3, 2)),
}


@pytest.mark.parametrize("case", sorted(ADAPTIVE))
def test_adaptive_max_with_ties_nan_and_inf(case):
    declared, sizes, output = ADAPTIVE[case]
    d = len(sizes)
    net = one_input_net(f"maxpool(x, output={output})", 2, declared)
    x = with_specials(tied((2, 2, *sizes)))
    y, dx, dy = forward_backward(net, x)
    want_y, want_dx = reference(lambda t: AMAX[d](t, output), x, dy)
    check(y, want_y)
    check(dx, want_dx)
    assert_routed(net)


@pytest.mark.parametrize("d", [1, 2, 3])
def test_fused_relu_derivative(d):
    """maxpool(relu(x)): the backward's pool_dx + relu_dx is one routed kernel,
    relu' applied after the routing (ties among relu's zeros included)."""
    sizes = {1: ("L",), 2: ("H", "W"), 3: ("T", "H", "W")}[d]
    run = {1: (70,), 2: (9, 8), 3: (3, 5, 6)}[d]
    net = one_input_net(f"maxpool(relu(x), output={(1,) * d if d > 1 else 1})", 3, sizes)
    x = tied((2, 3, *run)) - 1.0  # -1, 0, 1: relu makes ties of zeros
    x[1, 2] = -1.0  # a plane relu turns to all zeros: dy to its first input, then relu' = 0
    y, dx, dy = forward_backward(net, x)
    want_y, want_dx = reference(lambda t: AMAX[d](F.relu(t), 1), x, dy)
    check(y, want_y)
    check(dx, want_dx)
    plan = assert_routed(net)
    assert "relu_dx" in plan.name and plan.meta["epilogue"]["residuals"] == 1


def test_conv_relu_global_maxpool_like_video_factorized():
    """VideoFactorized's head in small: relu(conv 1x3x3) then a global max pool;
    input and parameter gradients against F.conv3d / F.adaptive_max_pool3d."""
    src = """net V(clip: f32[N, 2, T, H, W]) {
    h = relu(conv(clip, 4, kernel=(1, 3, 3), pad=same))
    return maxpool(h, output=(1, 1, 1))
}
"""
    net = convdsl.compile(src, backend="triton")
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 3, 6, 5, generator=g)
    leaf = x.clone().requires_grad_(True)
    y = net(leaf)
    dy = torch.randn(y.shape, generator=g)
    (y * dy).sum().backward()

    ref = {k: v.to(F64).requires_grad_(True) for k, v in params.items()}
    x64 = x.to(F64).requires_grad_(True)
    want = F.adaptive_max_pool3d(
        F.relu(F.conv3d(x64, ref["h.weight"], ref["h.bias"], padding=(0, 1, 1))), 1)
    (want * dy.to(F64)).sum().backward()
    check(y, want.detach())
    check(leaf.grad, x64.grad)
    for name, p in net.named_parameters():
        check(p.grad, ref[name].grad)
    (plan,) = [p for p in net._program._backward[("clip",)].plans if p.family == "pool_dx"]
    assert plan.meta["routed"] and "relu_dx" in plan.name


# -- fixed windows: large ones route, small ones rescan ------------------------------------------

FIXED = {
    # window 70 at stride 1: 70 windows hold each input (a loop, not unrolled)
    "1d-k70-s1": ((90,), "70, stride=1", lambda t: F.max_pool1d(t, 70, 1)),
    # padded 3-D window of 75 taps
    "3d-k355-s122-p122": ((4, 7, 8), "(3, 5, 5), stride=(1, 2, 2), pad=(1, 2, 2)",
                          lambda t: F.max_pool3d(t, (3, 5, 5), (1, 2, 2), (1, 2, 2))),
}


@pytest.mark.parametrize("case", sorted(FIXED))
def test_large_fixed_window(case):
    sizes, args, fn = FIXED[case]
    net = one_input_net(f"maxpool(x, {args})", 2, sizes)
    x = with_specials(tied((2, 2, *sizes)))
    y, dx, dy = forward_backward(net, x)
    want_y, want_dx = reference(fn, x, dy)
    check(y, want_y)
    check(dx, want_dx)
    assert_routed(net)


@pytest.mark.parametrize("window,stride", [(2, 2), (3, 2)])
def test_small_windows_keep_the_rescan(window, stride):
    net = one_input_net(f"maxpool(x, {window}, stride={stride})", 2, (7, 8))
    x = tied((2, 2, 7, 8))
    _, dx, dy = forward_backward(net, x)
    check(dx, reference(lambda t: F.max_pool2d(t, window, stride), x, dy)[1])
    assert_routed(net, routed=False)
    assert pool_grad_family.routes_by_argmax(
        {"kind": "max", "window": (9, 8)}, ()) and not pool_grad_family.routes_by_argmax(
        {"kind": "max", "window": (4, 4, 4)}, ())


def test_routing_small_overlapping_windows(monkeypatch):
    """The routed path on 3x3 windows at stride 1 (each input in 9 windows, ties
    everywhere): the rule's threshold forced to 0."""
    monkeypatch.setattr(pool_grad_family, "RESCAN_TAPS", 0)
    net = one_input_net("maxpool(x, 3, stride=1, pad=1)", 2, (6, 7))
    x = with_specials(tied((2, 2, 6, 7)))
    _, dx, dy = forward_backward(net, x)
    check(dx, reference(lambda t: F.max_pool2d(t, 3, 1, 1), x, dy)[1])
    assert_routed(net)


# -- chunks, blocks and determinism -----------------------------------------------------------

def test_ties_across_chunks_and_same_bytes_under_any_config(monkeypatch):
    """Cells of 90 taps scanned 16 at a time, 4 cells a program (ties between
    chunks keep the earlier input, a NaN in any chunk wins), and dx kernels of
    the GPU's small blocks: the same bytes as the default run, every run."""
    declared, sizes, output = ADAPTIVE["2d-overlap"]
    x = with_specials(tied((2, 2, *sizes)))
    net = one_input_net(f"maxpool(x, output={output})", 2, declared)
    _, default, _ = forward_backward(net, x)
    _, again, _ = forward_backward(net, x)
    assert torch.equal(default.view(torch.int32), again.view(torch.int32))

    monkeypatch.setitem(pool_grad_family.ARGMAX_CONFIGS, "cpu",
                        {"TILE": 64, "TAPS": 16, "num_warps": 4})
    monkeypatch.setitem(pool_grad_family.CONFIGS, "cpu", pool_grad_family.CONFIGS["gpu"][:1])
    global_net = one_input_net("maxpool(x, output=(1, 1))", 2, declared)
    _, small, dy_global = forward_backward(global_net, x)
    check(small, reference(lambda t: F.adaptive_max_pool2d(t, 1), x, dy_global)[1])
    _, chunked, _ = forward_backward(net, x)
    assert torch.equal(default.view(torch.int32), chunked.view(torch.int32))


def test_plane_too_large_is_a_clean_error(monkeypatch):
    monkeypatch.setattr(pool_grad_family, "NO_WINNER", 64)
    net = one_input_net("maxpool(x, output=1)", 2, ("H", "W"))
    x = torch.randn(1, 2, 8, 9, requires_grad=True)
    with pytest.raises(ConvDSLInputError, match="fewer than 2"):
        net(x).sum().backward()


# -- cost model and ahead-of-time signatures ---------------------------------------------------

def test_cost_is_linear_for_video_factorized():
    """At benchmarks/suite.py's EXAMPLE_SIZES for video_3d.cdsl the training
    step was 44.8 GFLOP, 40.3 of them the global max pool's gradient."""
    sizes = {"N": 8, "T": 16, "H": 56, "W": 56}
    net = convdsl.compile(EXAMPLES / "video_3d.cdsl", net="VideoFactorized", backend="triton")
    costs = kernel_costs(net, sizes)
    step = program_costs(costs)["step"]
    assert step.flops < 8e9, step
    (pool,) = [c for c in costs if c.family == "pool_dx" and "adaptive" in c.name]
    inputs = 8 * 16 * 16 * 28 * 28  # the pooled map: N, 16 channels, T, H/2, W/2
    # one argmax compare per input, one routing check, relu': a few FLOPs an input
    assert inputs <= pool.flops <= 8 * inputs, pool
    assert pool.bytes < 8 * 4 * inputs, pool  # x, the saved relu output, dx: f32 each


def test_aot_signatures_name_the_kernels_arguments():
    """aot() and aot_extra() type exactly the two kernels' parameters."""
    net = one_input_net("maxpool(relu(x), output=(1, 1, 1))", 3, ("T", "H", "W"))
    forward_backward(net, torch.randn(1, 3, 4, 5, 6))
    plan = pool_plan(net)
    graph = net._program._backward[("x",)].graph
    pool_dx = family("pool_dx")
    signature, constexprs, options = pool_dx.aot(plan, graph)
    ((name, extra_sig, extra_constexprs, extra_options),) = pool_dx.aot_extra(plan, graph)
    assert name == plan.meta["argmax"]
    for kernel_name, sig, const in [(plan.name, signature, constexprs),
                                    (name, extra_sig, extra_constexprs)]:
        kernel = load_kernel(plan.source, kernel_name)
        assert sorted(sig) == sorted(kernel.arg_names), kernel_name  # triton maps by name
        assert {k for k, v in sig.items() if v == "constexpr"} == set(const)
    assert signature["arg_ptr"] == "*i32" and "x_ptr" not in signature
    assert extra_constexprs["TBLOCK"] == pool_grad_family.ARGMAX_CONFIGS["gpu"]["TAPS"]
    assert options["num_warps"] == extra_options["num_warps"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_aot_compiles_without_spills(target):
    from convdsl.triton.aot import compile_program

    net = convdsl.compile("""net V(clip: f16[N, 16, T, H, W]) {
    return maxpool(relu(clip), output=(1, 1, 1))
}
""", backend="triton")
    forward_backward(net, torch.randn(1, 16, 2, 3, 4).half())
    reports = compile_program(net._program._backward[("clip",)], target, None,
                              {"N": 8, "T": 16, "H": 28, "W": 28})
    names = {r.name for r in reports}
    assert any(n.endswith("_argmax") for n in names) and len(names) == 2
    for r in reports:
        assert r.registers is not None and 0 < r.registers <= 255 and r.spills == 0, r
