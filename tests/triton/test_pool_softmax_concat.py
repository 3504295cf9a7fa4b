"""Generated Triton kernels for pooling, maxout, softmax and concat, run under
Triton's interpreter on CPU tensors.

Every result is compared with an INDEPENDENT reference, never with the torch
lowering of the same op: PyTorch built-ins where they implement the same
definition (F.max_pool*d, F.avg_pool*d with count_include_pad=False,
F.lp_pool*d for p=2 without padding, F.adaptive_max/avg_pool*d, torch.softmax,
torch.log_softmax, torch.cat, torch.amax), and direct float64 loops over the
definitions (LANGUAGE.md §6, tests/reference.py) for what PyTorch lacks:
wavgpool, lppool with padding or p != 2, asymmetric or large padding, adaptive
lp/wavg, maxout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl.triton.aot import compile_program
from convdsl.triton.families import concat as concat_family
from convdsl.triton.families import pool as pool_family
from convdsl.triton.families import softmax as softmax_family

from ..cdsl_source import one_input_net, pool_expr
from ..reference import adaptive_cells, maxout_loop, per_dim, pool_loop, window_cells

F64 = torch.float64
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 4e-2)}
_TORCH_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_TORCH_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_TORCH_AMAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_TORCH_AAVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
# The interpreter computes every lane, masked ones too (e.g. -inf - -inf in a
# softmax row past the end); numpy warns about those values, which are never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
HYPOTHESIS = settings(max_examples=6, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------------------------
# Compiling
# --------------------------------------------------------------------------------------

_NETS: dict[tuple[str, str], torch.nn.Module] = {}


def compile_net(src: str, backend: str = "triton") -> torch.nn.Module:
    key = (src, backend)
    if key not in _NETS:
        _NETS[key] = convdsl.compile(src, backend=backend)
    return _NETS[key]


# --------------------------------------------------------------------------------------
# Comparing with a float64 reference
# --------------------------------------------------------------------------------------

def check(out, ref, dtype=torch.float32):
    assert out.dtype == dtype
    assert out.shape == ref.shape, (out.shape, ref.shape)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.to(F64), ref.to(F64), atol=atol, rtol=rtol, equal_nan=True)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same values with the channel dim innermost in memory (any rank)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


# --------------------------------------------------------------------------------------
# Pooling against PyTorch built-ins
# --------------------------------------------------------------------------------------

# (sizes, window, stride, pad) with pad symmetric and <= window // 2, as PyTorch allows
BUILTIN_CASES = [
    ((11,), 3, 2, 1),
    ((9,), 4, 1, 2),                     # overlapping windows
    ((8, 8), 3, 2, 1),
    ((7, 9), (3, 2), (1, 2), (1, 0)),    # overlapping along dim 0
    ((5, 6, 4), 3, (2, 1, 1), 1),
    ((4, 5, 4), (2, 3, 1), (1, 2, 1), (1, 1, 0)),
]


def _case_id(case):
    sizes, k, s, p = case
    return f"{len(sizes)}d-m{sizes}-k{k}-s{s}-p{p}".replace(" ", "")


@pytest.mark.parametrize("case", BUILTIN_CASES, ids=_case_id)
@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_max_avg_match_torch(kind, case):
    sizes, window, stride, pad = case
    d = len(sizes)
    net = compile_net(one_input_net(pool_expr(kind, window, stride, pad), 3, sizes))
    x = torch.randn(2, 3, *sizes)
    k, s, p = per_dim(window, d), per_dim(stride, d), per_dim(pad, d)
    if kind == "maxpool":
        ref = _TORCH_MAX[d](x.to(F64), k, s, p)
    else:
        ref = _TORCH_AVG[d](x.to(F64), k, s, p, count_include_pad=False)
    check(net(x), ref)


@pytest.mark.parametrize("d", [1, 2])
def test_lp2_matches_torch(d):
    sizes = (10,) * d
    net = compile_net(one_input_net(pool_expr("lppool", 3, 2), 2, sizes))
    x = torch.randn(2, 2, *sizes)
    lp = F.lp_pool1d if d == 1 else F.lp_pool2d
    check(net(x), lp(x.to(F64), 2.0, 3, 2))


# --------------------------------------------------------------------------------------
# Pooling against the definitions
# --------------------------------------------------------------------------------------

LOOP_CASES = [
    # (kind, sizes, window, stride, pad, extra)
    ("wavgpool", (9,), 3, 2, 1, "sigma=0.7"),
    ("wavgpool", (7, 8), (3, 4), (2, 1), None, "sigma=1.3"),           # whole windows
    ("wavgpool", (6, 7), 3, 1, ((2, 0), (1, 2)), "sigma=0.5"),
    ("wavgpool", (5, 4, 6), (2, 3, 3), (1, 2, 2), (1, 1, 2), ""),
    ("wavgpool", (7, 6), 4, 2, ((3, 3), (0, 3)), "sigma=0.05"),       # tiny sigma, heavy padding
    ("lppool", (9,), 3, 2, 2, "p=3.0"),
    ("lppool", (6, 7), (2, 3), (2, 1), ((1, 0), (2, 2)), "p=1.0"),
    ("lppool", (6, 7), 3, 2, 1, "p=2.0"),                              # p=2 with padding
    ("lppool", (4, 5, 4), 2, 1, ((0, 1), (1, 0), (1, 1)), "p=1.5"),
    ("maxpool", (8, 7), 3, 2, ((2, 1), (0, 2)), ""),                   # larger than torch allows
    ("maxpool", (6,), 4, 3, ((3, 1),), ""),
    ("avgpool", (7, 6), 3, 1, ((2, 0), (0, 2)), ""),
    ("avgpool", (5, 4, 5), 3, 2, ((2, 2), (0, 1), (1, 2)), ""),
]


@pytest.mark.parametrize("case", LOOP_CASES, ids=lambda c: f"{c[0]}-{len(c[1])}d-{c[5]}")
def test_pool_matches_definition(case):
    kind, sizes, window, stride, pad, extra = case
    net = compile_net(one_input_net(pool_expr(kind, window, stride, pad, extra=extra), 2, sizes))
    x = torch.randn(2, 2, *sizes)
    p = float(extra[2:]) if extra.startswith("p=") else 2.0
    sigma = float(extra[6:]) if extra.startswith("sigma=") else 1.0
    ref = pool_loop(x.to(F64), kind, window_cells(sizes, window, stride, pad), p=p, sigma=sigma)
    check(net(x), ref)


def test_lp_of_zero_window_is_zero():
    net = compile_net(one_input_net(pool_expr("lppool", 2, extra="p=3.0"), 1, (4, 4)))
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 2.0
    check(net(x), pool_loop(x.to(F64), "lppool", window_cells((4, 4), 2), p=3.0))


# --------------------------------------------------------------------------------------
# Adaptive pooling
# --------------------------------------------------------------------------------------

ADAPTIVE_CASES = [
    ((10,), (3,)),
    ((4,), (7,)),            # more cells than inputs: cells overlap
    ((9, 7), (4, 3)),
    ((3, 5), (5, 2)),        # larger along one dim, smaller along the other
    ((5, 6, 4), (2, 3, 4)),
]


@pytest.mark.parametrize("case", ADAPTIVE_CASES, ids=lambda c: f"{c[0]}->{c[1]}".replace(" ", ""))
@pytest.mark.parametrize("kind", ["maxpool", "avgpool", "lppool", "wavgpool"])
def test_adaptive(kind, case):
    sizes, output = case
    d = len(sizes)
    extra = {"lppool": "p=3.0", "wavgpool": "sigma=0.8"}.get(kind, "")
    net = compile_net(one_input_net(pool_expr(kind, output=output, extra=extra), 3, sizes))
    x = torch.randn(2, 3, *sizes)
    if kind == "maxpool":
        ref = _TORCH_AMAX[d](x.to(F64), output)
    elif kind == "avgpool":
        ref = _TORCH_AAVG[d](x.to(F64), output)
    else:
        ref = pool_loop(x.to(F64), kind, adaptive_cells(sizes, output), p=3.0, sigma=0.8)
    check(net(x), ref)


# --------------------------------------------------------------------------------------
# Sizes, layouts, dtypes, NaN
# --------------------------------------------------------------------------------------

def test_symbolic_sizes_same_pad_at_two_sizes():
    net = compile_net(one_input_net(pool_expr("avgpool", 3, 2, "same"), 2, ("H", "W")))
    for shape in [(2, 2, 7, 9), (1, 2, 10, 5)]:
        x = torch.randn(*shape)
        ref = pool_loop(x.to(F64), "avgpool", window_cells(shape[2:], 3, 2, "same"))
        check(net(x), ref)


def test_symbolic_sizes_adaptive_at_two_sizes():
    net = compile_net(one_input_net(pool_expr("wavgpool", output=(3, 2), extra="sigma=0.6"), 2,
                                    ("H", "W")))
    for shape in [(2, 2, 7, 9), (1, 2, 2, 5)]:
        x = torch.randn(*shape)
        ref = pool_loop(x.to(F64), "wavgpool", adaptive_cells(shape[2:], (3, 2)), sigma=0.6)
        check(net(x), ref)


def test_nan_propagates_through_max_pooling():
    net = compile_net(one_input_net(pool_expr("maxpool", 3, 2, 1), 2, (8, 8)))
    x = torch.randn(2, 2, 8, 8)
    x[0, 0, 3, 4] = float("nan")
    x[1, 1, 0, 0] = float("nan")
    x[1, 0, 5, 5] = float("inf")
    out = net(x)
    ref = F.max_pool2d(x, 3, 2, 1)
    assert out.isnan().sum() > 0
    torch.testing.assert_close(out, ref, equal_nan=True)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("kind", ["maxpool", "avgpool", "lppool", "wavgpool"])
def test_half_precision(kind, dtype):
    net = compile_net(one_input_net(pool_expr(kind, 3, 2, 1), 3, (9, 8), dtype))
    x = torch.randn(2, 3, 9, 8).to(DTYPES[dtype])
    out = net(x)
    check(out, pool_loop(x.to(F64), kind, window_cells((9, 8), 3, 2, 1)), DTYPES[dtype])


@pytest.mark.parametrize("d", [1, 2, 3])
def test_channels_last_input(d):
    sizes = (7, 6, 5)[:d]
    net = compile_net(one_input_net(pool_expr("maxpool", 3, 2, 1), 4, sizes))
    x = torch.randn(2, 4, *sizes)
    xc = channels_last(x)
    assert xc.stride(1) == 1
    out = net(xc)
    check(out, pool_loop(x.to(F64), "maxpool", window_cells(sizes, 3, 2, 1)))
    assert out.stride(1) == 1  # channels-last in, channels-last out, as torch's pooling


def test_non_contiguous_input():
    net = compile_net(one_input_net(pool_expr("avgpool", 2), 3, ("H", "W")))
    base = torch.randn(2, 3, 12, 10)
    x = base[:, :, ::2, 1:]  # strided view
    check(net(x), pool_loop(x.to(F64), "avgpool", window_cells(tuple(x.shape[2:]), 2)))


def test_block_boundaries(monkeypatch):
    """Output counts just past whole blocks, with a small block so several programs run."""
    monkeypatch.setitem(pool_family.CONFIGS, "cpu", [{"BLOCK": 64, "num_warps": 4}])
    expr = pool_expr("wavgpool", 3, 1, 1, extra="sigma=0.9")
    net = compile_net(one_input_net(expr, 3, ("H", "W")))
    for shape in [(1, 3, 8, 8), (1, 3, 5, 13), (5, 3, 1, 13)]:  # 192 = 3 * 64, 195, 195
        x = torch.randn(*shape)
        check(net(x), pool_loop(x.to(F64), "wavgpool", window_cells(shape[2:], 3, 1, 1), sigma=0.9))


def test_block_boundary_default_config():
    net = compile_net(one_input_net(pool_expr("maxpool", 2), 1, ("H", "W")))
    x = torch.randn(1, 1, 2 * 65, 2 * 63)  # 4095 outputs, then 4097 below
    check(net(x), F.max_pool2d(x.to(F64), 2))
    x = torch.randn(1, 1, 2 * 17, 2 * 241)
    check(net(x), F.max_pool2d(x.to(F64), 2))


def test_index_64_path(monkeypatch):
    """The int64 index path (taken for tensors of 2^31 elements or more) on small tensors."""
    for module in (pool_family, softmax_family, concat_family):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors: True)
    src = """net T(x: f32[N, 4, H, W]) {
    a = wavgpool(x, 3, stride=2, pad=1, sigma=0.7)
    b = maxpool(x, 2, stride=2, pad=((1, 0), (0, 1)))
    return softmax(concat(a, maxout(b, pieces=2)))
}
"""
    net = compile_net(src)
    x = torch.randn(2, 4, 7, 6)
    a = pool_loop(x.to(F64), "wavgpool", window_cells((7, 6), 3, 2, 1), sigma=0.7)
    b = maxout_loop(pool_loop(x.to(F64), "maxpool",
                              window_cells((7, 6), 2, 2, ((1, 0), (0, 1)))), 2)
    check(net(x), torch.softmax(torch.cat([a, b], 1), 1))


# --------------------------------------------------------------------------------------
# Maxout
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, pieces, sizes", [(6, 3, (5, 4)), (8, 2, ()), (4, 4, (7,)),
                                                     (6, 2, (2, 3, 2)), (3, 1, (4,))])
def test_maxout(channels, pieces, sizes):
    net = compile_net(one_input_net(f"maxout(x, pieces={pieces})", channels, sizes))
    x = torch.randn(2, channels, *sizes)
    check(net(x), maxout_loop(x.to(F64), pieces))


def test_maxout_nan_channels_last_and_half():
    net = compile_net(one_input_net("maxout(x, pieces=2)", 6, (3, 5)))
    x = torch.randn(2, 6, 3, 5)
    x[0, 1, 2, 2] = float("nan")
    x[1, 4, 0, 0] = float("nan")
    out = net(channels_last(x))
    torch.testing.assert_close(out, x.reshape(2, 3, 2, 3, 5).amax(2), equal_nan=True)
    assert out.isnan().sum() == 2 and out.stride(1) == 1
    net16 = compile_net(one_input_net("maxout(x, pieces=3)", 6, (4,), "bf16"))
    x = torch.randn(2, 6, 4).bfloat16()
    check(net16(x), maxout_loop(x.to(F64), 3), torch.bfloat16)


# --------------------------------------------------------------------------------------
# Softmax
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, axis", [((2, 5, 3, 4), 1), ((3, 7), 1), ((2, 3, 6, 5), 2),
                                         ((2, 4, 3, 2, 3), 4), ((2, 10, 9), 1)])
def test_softmax(op, shape, axis):
    spatial = shape[2:]
    net = compile_net(one_input_net(f"{op}(x, axis={axis})", shape[1], spatial))
    x = torch.randn(*shape) * 3
    ref = getattr(torch, op)(x.to(F64), axis)
    check(net(x), ref)
    if len(shape) >= 3:
        check(net(channels_last(x)), ref)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_long_axis(op):
    net = compile_net(one_input_net(f"{op}(x, axis=1)", 3000, ()))
    x = torch.randn(2, 3000) * 4
    check(net(x), getattr(torch, op)(x.to(F64), 1))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_two_pass(monkeypatch, op):
    """An axis longer than one block: the online max/sum loop, with a first chunk of -inf."""
    monkeypatch.setitem(softmax_family.CONFIGS, "cpu",
                        [{"TILE": 1024, "MAX_BLOCK_L": 256, "CHUNK": 256, "num_warps": 4}])
    net = compile_net(one_input_net(f"{op}(x, axis=1)", 1000, ()))
    x = torch.randn(3, 1000) * 4
    x[0, :300] = float("-inf")
    x[1, 700:] = 50.0
    check(net(x), getattr(torch, op)(x.to(F64), 1))
    net = compile_net(one_input_net(f"{op}(x)", 600, ("H",)))
    x = torch.randn(2, 600, 3)
    check(net(x), getattr(torch, op)(x.to(F64), 1))


def test_softmax_nan_and_half():
    net = compile_net(one_input_net("softmax(x)", 4, (3,)))
    x = torch.randn(2, 4, 3)
    x[0, 2, 1] = float("nan")
    out = net(x)
    torch.testing.assert_close(out, torch.softmax(x, 1), equal_nan=True)
    assert out[0, :, 1].isnan().all() and not out[0, :, 0].isnan().any()
    for dtype in ("f16", "bf16"):
        net = compile_net(one_input_net("log_softmax(x)", 6, (5,), dtype))
        x = torch.randn(2, 6, 5).to(DTYPES[dtype])
        check(net(x), torch.log_softmax(x.to(F64), 1), DTYPES[dtype])


# --------------------------------------------------------------------------------------
# Concat
# --------------------------------------------------------------------------------------

def test_concat_channels_with_repeats_and_layouts():
    src = "net T(x: f32[N, 3, H, W], y: f32[N, 5, H, W]) {\n    return concat(x, y, x)\n}\n"
    net = compile_net(src)
    x, y = torch.randn(2, 3, 4, 5), torch.randn(2, 5, 4, 5)
    ref = torch.cat([x, y, x], 1)
    check(net(x, y), ref)
    check(net(channels_last(x), y.transpose(2, 3).contiguous().transpose(2, 3)), ref)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_concat_other_axes(dtype):
    src = (f"net T(x: {dtype}[N, 3, A, W], y: {dtype}[N, 3, B, W], z: {dtype}[N, 3, C, W]) {{\n"
           f"    return concat(x, y, z, axis=2)\n}}\n")
    net = compile_net(src)
    t = DTYPES[dtype]
    x, y, z = (torch.randn(2, 3, m, 4).to(t) for m in (1, 6, 3))
    out = net(x, y, z)
    assert out.dtype == t
    assert torch.equal(out, torch.cat([x, y, z], 2))
    src = "net T(x: f32[N, 2, 3], y: f32[N, 2, 5]) {\n    return concat(x, y, axis=2)\n}\n"
    x, y = torch.randn(3, 2, 3), torch.randn(3, 2, 5)
    assert torch.equal(compile_net(src)(x, y), torch.cat([x, y], 2))


def test_concat_block_boundaries(monkeypatch):
    monkeypatch.setitem(concat_family.CONFIGS, "cpu", [{"BLOCK": 32, "num_warps": 4}])
    src = "net T(x: f32[N, 3, H], y: f32[N, 1, H]) {\n    return concat(y, x)\n}\n"
    net = compile_net(src)
    x, y = torch.randn(3, 3, 11)[:, :, ::1], torch.randn(3, 5, 11)[:, 2:3]  # y: a channel slice
    assert torch.equal(net(x, y), torch.cat([y, x], 1))


def test_merge_dims():
    # a contiguous channel concat copies [N, C_i * H * W] rows
    assert concat_family.merge_dims((2, 3, 4, 5), (60, 20, 5, 1), (140, 20, 5, 1)) == \
        [(2, 60, 140), (60, 1, 1)]
    assert concat_family.merge_dims((1, 1), (1, 1), (1, 1)) == []


# --------------------------------------------------------------------------------------
# Property tests (few examples: the interpreter is slow)
# --------------------------------------------------------------------------------------

@st.composite
def pool_configs(draw):
    d = draw(st.integers(1, 2))
    window = tuple(draw(st.integers(1, 4)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    pad = tuple((draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))) for k in window)
    sizes = tuple(draw(st.integers(max(1, k - b - a), 9)) for k, (b, a) in zip(window, pad))
    kind = draw(st.sampled_from(["maxpool", "avgpool", "lppool", "wavgpool"]))
    return kind, sizes, window, stride, pad


@HYPOTHESIS
@given(pool_configs())
def test_pool_property(config):
    kind, sizes, window, stride, pad = config
    extra = {"lppool": "p=2.5", "wavgpool": "sigma=0.9"}.get(kind, "")
    net = compile_net(one_input_net(pool_expr(kind, window, stride, pad, extra=extra), 2, sizes))
    x = torch.randn(1, 2, *sizes)
    ref = pool_loop(x.to(F64), kind, window_cells(sizes, window, stride, pad), p=2.5, sigma=0.9)
    check(net(x), ref)


@HYPOTHESIS
@given(st.integers(1, 3), st.lists(st.integers(1, 7), min_size=1, max_size=3),
       st.lists(st.integers(1, 5), min_size=1, max_size=2),
       st.sampled_from(["maxpool", "avgpool", "lppool", "wavgpool"]))
def test_adaptive_property(batch, sizes, output, kind):
    output = (output * 3)[:len(sizes)]
    extra = {"lppool": "p=2.0", "wavgpool": "sigma=1.1"}.get(kind, "")
    net = compile_net(one_input_net(pool_expr(kind, output=tuple(output), extra=extra), 2,
                                    ["H", "W", "D"][:len(sizes)]))
    x = torch.randn(batch, 2, *sizes)
    check(net(x), pool_loop(x.to(F64), kind, adaptive_cells(sizes, output), p=2.0, sigma=1.1))


@HYPOTHESIS
@given(st.lists(st.integers(1, 12), min_size=2, max_size=4), st.data())
def test_softmax_property(shape, data):
    axis = data.draw(st.integers(1, len(shape) - 1))
    op = data.draw(st.sampled_from(["softmax", "log_softmax"]))
    spatial = ["H", "W", "D"][:len(shape) - 2]
    net = compile_net(one_input_net(f"{op}(x, axis={axis})", shape[1], spatial))
    x = torch.randn(*shape) * 5
    check(net(x), getattr(torch, op)(x.to(F64), axis))


# --------------------------------------------------------------------------------------
# Backward (gradients come from recomputing with the torch lowering)
# --------------------------------------------------------------------------------------

BACKWARD_NET = """net B(x: f32[N, 4, H, W], y: f32[N, 2, H, W]) {
    a = maxpool(x, 2, pad=same)
    b = wavgpool(y, 3, stride=2, pad=same, sigma=0.8)
    c = maxout(concat(a, b), pieces=3)
    d = lppool(c, 2, stride=1, pad=((1, 0), (0, 1)), p=3.0)
    return log_softmax(avgpool(d, output=(2, 3)))
}
"""


def test_backward_matches_torch_backend():
    grads = {}
    for backend in ("triton", "torch"):
        net = compile_net(BACKWARD_NET, backend)
        torch.manual_seed(1)
        x = torch.randn(2, 4, 8, 6, requires_grad=True)
        y = torch.randn(2, 2, 8, 6, requires_grad=True)
        out = net(x, y)
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        loss.backward()
        grads[backend] = (out.detach(), x.grad, y.grad)
    for got, want in zip(grads["triton"], grads["torch"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# Ahead-of-time compilation and the cost model
# --------------------------------------------------------------------------------------

AOT_NET = """net A(x: f16[N, 6, H, W], z: f32[N, 3000]) {
    a = maxpool(x, 3, stride=2, pad=same)
    b = wavgpool(x, 3, stride=2, pad=same, sigma=0.5)
    c = lppool(x, 2, pad=same, p=3.0)
    d = avgpool(x, output=(3, 3))
    e = maxout(concat(a, b, c), pieces=2)
    return softmax(e), log_softmax(z, axis=1), d
}
"""


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_aot_compiles_without_spills(target):
    net = compile_net(AOT_NET)
    reports = compile_program(net._program, target, None, {"N": 8, "H": 64, "W": 64})
    families = {r.family for r in reports}
    assert {"pool", "maxout", "softmax", "concat"} <= families
    for r in reports:
        assert r.registers is not None and 0 < r.registers <= 255, r
        assert r.spills == 0, r
        assert r.bytes > 0


def test_cost_model():
    net = compile_net(AOT_NET)
    program = net._program.inference
    from convdsl.ir.types import symbol
    from convdsl.triton.families import family

    env = {symbol("N"): 2, symbol("H"): 10, symbol("W"): 8}
    by_family = {}
    for p in program.plans:
        if p.source:
            cost = family(p.family).cost(p, program.graph, env)
            by_family.setdefault((p.family, p.meta.get("kind")), []).append(cost)
    # max 3x3 stride 2 pad 1 on [2, 6, 10, 8] f16: 2*6*5*4 outputs, 9 taps each
    assert by_family[("pool", "max")] == [(2 * 6 * 5 * 4 * 9, (2 * 6 * 80 + 2 * 6 * 20) * 2)]
    # adaptive 10 -> 3 cells [0,4) [3,7) [6,10), 8 -> 3 cells [0,3) [2,6) [5,8): 12 * 10 taps
    assert by_family[("pool", "avg")] == [(2 * 6 * 12 * 10, (2 * 6 * 80 + 2 * 6 * 9) * 2)]
    # softmax over [2, 3000] f32, one read and one write
    assert (2 * 3000 * 5, 2 * 3000 * 2 * 4) in by_family[("softmax", None)]
    # concat of three [2, 6, 5, 4] f16 tensors: read and write each element once
    assert by_family[("concat", None)] == [(0, 2 * 3 * 2 * 6 * 5 * 4 * 2)]


def test_kernel_names_are_safe_and_sources_deterministic():
    a = convdsl.compile(AOT_NET, backend="triton").kernels
    b = convdsl.compile(AOT_NET, backend="triton").kernels
    assert a == b
    assert all(name.startswith("k_") and name.isidentifier() for name in a)
    assert any("softmax" in n for n in a) and any("concat" in n for n in a)
