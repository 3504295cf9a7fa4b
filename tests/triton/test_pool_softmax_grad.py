"""Generated gradient kernels for pooling, maxout and softmax (families pool_dx,
maxout_dx, softmax_dx), run under Triton's interpreter on CPU tensors.

Each test builds a net with backend="triton", takes loss = (out * seed).sum()
for a random seed and compares the input gradient with an INDEPENDENT
reference under PyTorch autograd, never with the ops' own torch lowerings:
F.max_pool*d, F.avg_pool*d(count_include_pad=False), F.lp_pool*d and
F.adaptive_max/avg_pool*d where they implement the same definition, and
otherwise the definitions written as float64 loops here (wavgpool, lppool with
padding or p != 2, asymmetric padding, adaptive lp / wavg), torch.max over
reshaped channels for maxout, torch.softmax / torch.log_softmax.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl.triton.aot import compile_program
from convdsl.triton.families import pool_grad as pool_grad_family
from convdsl.triton.families import softmax_grad as softmax_grad_family

F64 = torch.float64
GRAD_OPS = {"_pool_dx", "_maxout_dx", "_softmax_dx", "_log_softmax_dx"}
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 1e-2)}
_MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_AMAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_AAVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
# The interpreter computes masked lanes too; numpy warns about values never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


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
# Nets, gradients and checks
# --------------------------------------------------------------------------------------

_NETS: dict[str, torch.nn.Module] = {}


def compile_net(src: str) -> torch.nn.Module:
    if src not in _NETS:
        _NETS[src] = convdsl.compile(src, backend="triton")
    return _NETS[src]


def lit(v) -> str:
    """A Python value as a .cdsl literal: 3, same, (3, 2), (3,), ((1, 2), (0, 1))."""
    if isinstance(v, (tuple, list)):
        inner = ", ".join(lit(e) for e in v)
        return f"({inner},)" if len(v) == 1 else f"({inner})"
    return str(v)


def net_for(expr: str, channels, spatial, dtype: str = "f32") -> torch.nn.Module:
    dims = ", ".join(["N", str(channels)] + [str(s) for s in spatial])
    return compile_net(f"net T(x: {dtype}[{dims}]) {{\n    return {expr}\n}}\n")


def pool_expr(kind, window=None, stride=None, pad=None, output=None, extra="") -> str:
    args = ["x"]
    if window is not None:
        args.append(lit(window))
    if stride is not None:
        args.append(f"stride={lit(stride)}")
    if pad is not None:
        args.append(f"pad={lit(pad)}")
    if output is not None:
        args.append(f"output={lit(output)}")
    if extra:
        args.append(extra)
    return f"{kind}({', '.join(args)})"


def triton_grad(net, x: torch.Tensor, seed: torch.Tensor | None = None):
    """(dx, seed) from the net's generated backward kernels, for loss = (out * seed).sum()."""
    x = x.detach().clone().requires_grad_(True)
    out = net(x)
    if seed is None:
        seed = torch.randn(out.shape).to(out.dtype)
    (out * seed).sum().backward()
    # every gradient op of these nets ran a generated kernel
    assert not GRAD_OPS & set(net._program._backward[("x",)].reference_ops())
    return x.grad, seed


def torch_grad(fn, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """The reference: PyTorch autograd of fn in float64."""
    x64 = x.detach().to(F64).requires_grad_(True)
    (fn(x64) * seed.to(F64)).sum().backward()
    return x64.grad


def check(got, ref, dtype=torch.float32):
    assert got.dtype == dtype and got.shape == ref.shape, (got.dtype, got.shape, ref.shape)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got.to(F64), ref.to(F64), atol=atol, rtol=rtol, equal_nan=True)


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """The same values with the channel dim innermost in memory (any rank)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


# --------------------------------------------------------------------------------------
# Pooling by its definition, differentiable (float64 loops)
# --------------------------------------------------------------------------------------

def per_dim(v, d):
    return (v,) * d if isinstance(v, int) else tuple(v)


def tf_same(m: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's `same`: total max((ceil(m/s)-1)*s + k - m, 0), the smaller half before."""
    total = max((-(-m // s) - 1) * s + k - m, 0)
    return total // 2, total - total // 2


def window_cells(sizes, window, stride=None, pad=None):
    """Per spatial dim, the (start, length) of each output's window (start < 0: padding)."""
    d = len(sizes)
    window = per_dim(window, d)
    stride = window if stride is None else per_dim(stride, d)
    if pad is None:
        pads = [(0, 0)] * d
    elif pad == "same":
        pads = [tf_same(m, k, s) for m, k, s in zip(sizes, window, stride)]
    else:
        pads = [(p, p) if isinstance(p, int) else tuple(p) for p in per_dim(pad, d)]
    return [[(r * s - b, k) for r in range((m + b + a - k) // s + 1)]
            for m, k, s, (b, a) in zip(sizes, window, stride, pads)]


def adaptive_cells(sizes, output):
    """Cell i covers [floor(i*m/a), ceil((i+1)*m/a))."""
    return [[(i * m // a, -(-(i + 1) * m // a) - i * m // a) for i in range(a)]
            for m, a in zip(sizes, per_dim(output, len(sizes)))]


def ref_pool(x: torch.Tensor, kind: str, cells, p: float = 2.0, sigma: float = 1.0):
    """Pool x [N, C, *m] over the windows `cells` by the definitions (padding never
    counts); differentiable, so autograd gives the reference gradient. The max takes
    torch.max's index: the first maximal input, as max_pool's gradient."""
    sizes = tuple(x.shape[2:])
    outs = []
    for pos in itertools.product(*(range(len(c)) for c in cells)):
        box = [cells[i][j] for i, j in enumerate(pos)]
        values, dist2 = [], []
        for off in itertools.product(*(range(length) for _, length in box)):
            idx = tuple(start + q for (start, _), q in zip(box, off))
            if all(0 <= j < m for j, m in zip(idx, sizes)):
                values.append(x[(slice(None), slice(None)) + idx])
                dist2.append(sum((q - (length - 1) / 2) ** 2 for q, (_, length) in zip(off, box)))
        v = torch.stack(values, -1)
        if kind == "maxpool":
            r = v.max(-1).values
        elif kind == "avgpool":
            r = v.mean(-1)
        elif kind == "lppool":
            r = v.abs().pow(p).sum(-1).pow(1.0 / p)
        else:  # wavgpool: exp(-d^2 / 2 sigma^2), normalised over the real taps
            d2 = torch.tensor(dist2, dtype=x.dtype)
            w = torch.exp(-(d2 - d2.min()) / (2 * sigma**2))
            r = (v * w).sum(-1) / w.sum()
        outs.append(r)
    return torch.stack(outs, -1).reshape(*x.shape[:2], *(len(c) for c in cells))


def _extra(extra: str) -> dict:
    """p= and sigma= of an extra argument string, for ref_pool."""
    found = {}
    for part in filter(None, (s.strip() for s in extra.split(","))):
        key, value = part.split("=")
        found[key] = float(value)
    return found


# --------------------------------------------------------------------------------------
# Max and avg pooling against PyTorch built-ins
# --------------------------------------------------------------------------------------

# (sizes, window, stride, pad): pads symmetric and <= window // 2, as PyTorch allows
BUILTIN_CASES = [
    ((11,), 3, 2, 1),
    ((9,), 4, 1, 2),                     # overlapping windows
    ((8, 8), 3, 2, 1),
    ((7, 9), (3, 2), (1, 2), (1, 0)),    # overlapping along dim 0
    ((5, 6, 4), 3, (2, 1, 1), 1),
]


@pytest.mark.parametrize("case", BUILTIN_CASES,
                         ids=lambda c: f"{len(c[0])}d-k{c[1]}-s{c[2]}-p{c[3]}".replace(" ", ""))
@pytest.mark.parametrize("kind", ["maxpool", "avgpool"])
def test_max_avg_grad_match_torch(kind, case):
    sizes, window, stride, pad = case
    d = len(sizes)
    net = net_for(pool_expr(kind, window, stride, pad), 3, sizes)
    x = torch.randn(2, 3, *sizes)
    dx, seed = triton_grad(net, x)
    k, s, p = per_dim(window, d), per_dim(stride, d), per_dim(pad, d)
    if kind == "maxpool":
        ref = torch_grad(lambda t: _MAX[d](t, k, s, p), x, seed)
    else:
        ref = torch_grad(lambda t: _AVG[d](t, k, s, p, count_include_pad=False), x, seed)
    check(dx, ref)


@pytest.mark.parametrize("d", [1, 2])
def test_lp2_grad_matches_torch(d):
    sizes = (10,) * d
    net = net_for(pool_expr("lppool", 3, 2), 2, sizes)
    x = torch.randn(2, 2, *sizes)
    dx, seed = triton_grad(net, x)
    lp = F.lp_pool1d if d == 1 else F.lp_pool2d
    check(dx, torch_grad(lambda t: lp(t, 2.0, 3, 2), x, seed))


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
    ("lppool", (8,), 3, 1, 1, "p=0.5"),
    ("maxpool", (8, 7), 3, 2, ((2, 1), (0, 2)), ""),                   # larger than torch allows
    ("maxpool", (6,), 4, 3, ((3, 1),), ""),
    ("maxpool", (10,), 2, 3, None, ""),                                # stride > window: gaps
    ("avgpool", (7, 6), 3, 1, ((2, 0), (0, 2)), ""),
    ("avgpool", (5, 4, 5), 3, 2, ((2, 2), (0, 1), (1, 2)), ""),
    ("avgpool", (9, 5), (2, 1), 3, None, ""),                          # stride > window: gaps
]


@pytest.mark.parametrize("case", LOOP_CASES, ids=lambda c: f"{c[0]}-{len(c[1])}d-{c[5]}")
def test_pool_grad_matches_definition(case):
    kind, sizes, window, stride, pad, extra = case
    net = net_for(pool_expr(kind, window, stride, pad, extra=extra), 2, sizes)
    x = torch.randn(2, 2, *sizes)
    dx, seed = triton_grad(net, x)
    cells = window_cells(sizes, window, stride, pad)
    check(dx, torch_grad(lambda t: ref_pool(t, kind, cells, **_extra(extra)), x, seed))


def test_lp_grad_of_zero_window_is_zero():
    """(sum |x|^p)^(1/p) has no slope at 0: an all-zero window passes no gradient,
    and a zero beside a nonzero input gets none (p > 1)."""
    net = net_for(pool_expr("lppool", 2, extra="p=3.0"), 1, (4, 4))
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 2.0
    dx, seed = triton_grad(net, x)
    expected = torch.zeros(1, 1, 4, 4)
    expected[0, 0, 0, 0] = seed[0, 0, 0, 0]  # d/dx (|x|^3)^(1/3) = sign(x) for a lone input
    check(dx, expected)


# --------------------------------------------------------------------------------------
# Adaptive pooling: cells of varying size, overlapping when there are more than inputs
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
def test_adaptive_grad(kind, case):
    sizes, output = case
    d = len(sizes)
    extra = {"lppool": "p=3.0", "wavgpool": "sigma=0.8"}.get(kind, "")
    net = net_for(pool_expr(kind, output=output, extra=extra), 3, sizes)
    x = torch.randn(2, 3, *sizes)
    dx, seed = triton_grad(net, x)
    if kind == "maxpool":
        ref = torch_grad(lambda t: _AMAX[d](t, output), x, seed)
    elif kind == "avgpool":
        ref = torch_grad(lambda t: _AAVG[d](t, output), x, seed)
    else:
        cells = adaptive_cells(sizes, output)
        ref = torch_grad(lambda t: ref_pool(t, kind, cells, p=3.0, sigma=0.8), x, seed)
    check(dx, ref)


def test_adaptive_many_cells_per_input():
    """Output 3x the input along a dim: each input lies in up to 4 cells."""
    net = net_for(pool_expr("wavgpool", output=(10, 2), extra="sigma=0.6"), 2, (3, 6))
    x = torch.randn(2, 2, 3, 6)
    dx, seed = triton_grad(net, x)
    cells = adaptive_cells((3, 6), (10, 2))
    check(dx, torch_grad(lambda t: ref_pool(t, "wavgpool", cells, sigma=0.6), x, seed))


# --------------------------------------------------------------------------------------
# Max pooling: ties, NaN and -inf route as F.max_pool*d's gradient
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1, 2, 3])
def test_max_ties_go_to_the_first_maximal_input(d):
    """All-equal input, overlapping windows: each window's dy to its first input."""
    sizes = (7, 6, 5)[:d]
    net = net_for(pool_expr("maxpool", 3, 1, 1), 2, sizes)
    x = torch.ones(2, 2, *sizes)
    x[1, 1] = 0.0
    x[1, 1, (0,) * d] = -1.0  # a lone smaller value among ties
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: _MAX[d](t, 3, 1, 1), x, seed))


def test_adaptive_max_ties_and_overlap():
    net = net_for(pool_expr("maxpool", output=(7, 3)), 1, (5, 4))
    x = torch.full((2, 1, 5, 4), 2.5)
    x[1, 0, :, 2:] = 3.0
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: F.adaptive_max_pool2d(t, (7, 3)), x, seed))


def test_max_nan_and_minus_inf_like_torch():
    """A NaN wins its windows (the last NaN in scan order, as PyTorch's kernel);
    an all -inf window sends dy to its first real input."""
    net = net_for(pool_expr("maxpool", 3, 1, 1), 2, (6, 7))
    x = torch.randn(2, 2, 6, 7)
    x[0, 0, 2, 2] = x[0, 0, 3, 3] = float("nan")
    x[0, 1, 1, 4] = float("inf")
    x[1, 0] = float("-inf")
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: F.max_pool2d(t, 3, 1, 1), x, seed))


def test_max_ties_across_tap_chunks():
    """Windows longer than one tile of taps (MAX_TAPS) are scanned in chunks; a
    tie between chunks keeps the earlier input, a NaN in any chunk wins."""
    assert 9 * 8 > pool_grad_family.MAX_TAPS
    net = net_for(pool_expr("maxpool", (9, 8), (3, 4), (4, 3)), 2, (12, 11))
    x = torch.randint(0, 3, (2, 2, 12, 11)).float()
    x[1, 1, 7, 9] = float("nan")
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: F.max_pool2d(t, (9, 8), (3, 4), (4, 3)), x, seed))


@pytest.mark.parametrize("output", [(1, 1), (2, 3)])
def test_adaptive_max_long_cells(output):
    net = net_for(pool_expr("maxpool", output=output), 2, (10, 9))
    x = torch.randint(0, 3, (2, 2, 10, 9)).float()
    x[0, 1] = -float("inf")
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: F.adaptive_max_pool2d(t, output), x, seed))


def test_lp_long_window():
    net = net_for(pool_expr("lppool", (9, 8), (3, 4), extra="p=2.0"), 2, (12, 11))
    x = torch.randn(2, 2, 12, 11)
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: F.lp_pool2d(t, 2.0, (9, 8), (3, 4)), x, seed))


@pytest.mark.parametrize("kind", ["maxpool", "lppool", "wavgpool"])
def test_gpu_config_under_the_interpreter(monkeypatch, kind):
    """The GPU's first config (small blocks of tap tiles) gives the same numbers."""
    monkeypatch.setitem(pool_grad_family.CONFIGS, "cpu", pool_grad_family.CONFIGS["gpu"][:1])
    net = net_for(pool_expr(kind, 3, 2, 1), 2, (7, 6))
    x = torch.randn(2, 2, 7, 6)
    dx, seed = triton_grad(net, x)
    cells = window_cells((7, 6), 3, 2, 1)
    check(dx, torch_grad(lambda t: ref_pool(t, kind, cells), x, seed))


# --------------------------------------------------------------------------------------
# Sizes, layouts, dtypes
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["maxpool", "wavgpool"])
def test_symbolic_sizes_same_pad_at_two_sizes(kind):
    """`same` pads follow the run-time sizes (asymmetric for some)."""
    net = net_for(pool_expr(kind, 3, 2, "same"), 2, ("H", "W"))
    for shape in [(2, 2, 7, 9), (1, 2, 10, 5)]:
        x = torch.randn(*shape)
        dx, seed = triton_grad(net, x)
        cells = window_cells(shape[2:], 3, 2, "same")
        check(dx, torch_grad(lambda t, cells=cells: ref_pool(t, kind, cells), x, seed))


def test_symbolic_sizes_adaptive_at_two_sizes():
    """Cell lengths and cells per input change with the sizes: fewer and more cells than inputs."""
    net = net_for(pool_expr("lppool", output=(3, 4), extra="p=2.5"), 2, ("H", "W"))
    for shape in [(2, 2, 7, 9), (1, 2, 2, 3)]:
        x = torch.randn(*shape)
        dx, seed = triton_grad(net, x)
        cells = adaptive_cells(shape[2:], (3, 4))
        check(dx, torch_grad(lambda t, cells=cells: ref_pool(t, "lppool", cells, p=2.5), x, seed))


@pytest.mark.parametrize("kind", ["maxpool", "avgpool", "lppool", "wavgpool"])
def test_half_precision(kind):
    net = net_for(pool_expr(kind, 3, 2, 1), 3, (9, 8), "f16")
    x = torch.randn(2, 3, 9, 8).half()
    dx, seed = triton_grad(net, x)
    cells = window_cells((9, 8), 3, 2, 1)
    check(dx, torch_grad(lambda t: ref_pool(t, kind, cells), x, seed), torch.float16)


@pytest.mark.parametrize("kind", ["maxpool", "lppool"])
def test_channels_last_input(kind):
    sizes = (7, 6)
    net = net_for(pool_expr(kind, 3, 2, 1), 4, sizes)
    x = channels_last(torch.randn(2, 4, *sizes))
    dx, seed = triton_grad(net, x)
    cells = window_cells(sizes, 3, 2, 1)
    check(dx, torch_grad(lambda t: ref_pool(t, kind, cells), x, seed))
    assert dx.stride(1) == 1  # dx in x's layout


def test_broadcast_dy_and_strided_input():
    """loss = out.sum() hands the backward an expanded dy (all strides 0)."""
    net = net_for(pool_expr("avgpool", 3, 2, 1), 3, ("H", "W"))
    x = torch.randn(2, 3, 14, 10)[:, :, ::2, 1:]
    xg = x.clone().requires_grad_(True)
    net(xg).sum().backward()
    ref = torch_grad(lambda t: F.avg_pool2d(t, 3, 2, 1, count_include_pad=False), x,
                     torch.ones(2, 3, 4, 5))
    check(xg.grad, ref)


def test_block_boundaries(monkeypatch):
    """dx sizes just past whole blocks, with small blocks so several programs run."""
    monkeypatch.setitem(pool_grad_family.CONFIGS, "cpu",
                        [{"BLOCK": 64, "TILE": 1 << 17, "num_warps": 4}])
    monkeypatch.setitem(pool_grad_family.MAXOUT_CONFIGS, "cpu", [{"BLOCK": 32, "num_warps": 4}])
    src = """net T(x: f32[N, 4, H, W]) {
    return maxout(wavgpool(x, 3, stride=1, pad=1, sigma=0.9), pieces=2)
}
"""
    net = compile_net(src)
    for shape in [(1, 4, 4, 4), (1, 4, 7, 7), (5, 4, 1, 13)]:  # 64, 196, 260 inputs
        x = torch.randn(*shape)
        dx, seed = triton_grad(net, x)
        cells = window_cells(shape[2:], 3, 1, 1)

        def ref(t, cells=cells):
            y = ref_pool(t, "wavgpool", cells, sigma=0.9)
            return y.reshape(y.shape[0], 2, 2, *y.shape[2:]).max(2).values

        check(dx, torch_grad(ref, x, seed))


def test_block_boundary_default_config():
    net = net_for(pool_expr("maxpool", 2), 1, ("H", "W"))
    for shape in [(1, 1, 63, 65), (1, 1, 17, 241)]:  # 4095 and 4097 inputs, an odd edge unused
        x = torch.randn(*shape)
        dx, seed = triton_grad(net, x)
        check(dx, torch_grad(lambda t: F.max_pool2d(t, 2), x, seed))


def test_index_64_path(monkeypatch):
    """The int64 index path (taken for tensors of 2^31 elements or more) on small tensors."""
    for module in (pool_grad_family, softmax_grad_family):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors: True)
    src = """net T(x: f32[N, 4, H, W]) {
    a = lppool(x, 3, stride=2, pad=1, p=3.0)
    return log_softmax(maxout(maxpool(a, output=(2, 3)), pieces=2))
}
"""
    net = compile_net(src)
    x = torch.randn(2, 4, 7, 6)
    dx, seed = triton_grad(net, x)
    cells = window_cells((7, 6), 3, 2, 1)

    def ref(t):
        a = F.adaptive_max_pool2d(ref_pool(t, "lppool", cells, p=3.0), (2, 3))
        return torch.log_softmax(a.reshape(2, 2, 2, 2, 3).max(2).values, 1)

    check(dx, torch_grad(ref, x, seed))


# --------------------------------------------------------------------------------------
# Maxout
# --------------------------------------------------------------------------------------

def ref_maxout(t: torch.Tensor, pieces: int) -> torch.Tensor:
    n, c = t.shape[:2]
    return t.reshape(n, c // pieces, pieces, *t.shape[2:]).max(2).values


@pytest.mark.parametrize("channels, pieces, sizes", [(6, 3, (5, 4)), (8, 2, ()), (4, 4, (7,)),
                                                     (6, 2, (2, 3, 2)), (3, 1, (4,))])
def test_maxout_grad(channels, pieces, sizes):
    net = net_for(f"maxout(x, pieces={pieces})", channels, sizes)
    x = torch.randn(2, channels, *sizes)
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: ref_maxout(t, pieces), x, seed))


def test_maxout_ties_nan_and_channels_last():
    """Ties go to the first maximal channel and NaNs to the first NaN, as torch.max's index."""
    net = net_for("maxout(x, pieces=3)", 6, (3, 5))
    x = torch.randn(2, 6, 3, 5)
    x[0, 0:3] = 1.0                                   # all equal
    x[1, 3:6, 1] = torch.tensor([0.5, 2.0, 2.0])[:, None]  # tie after a smaller one
    x[1, 1, 2, 2] = x[1, 2, 2, 2] = float("nan")
    x[0, 3:6, 0, 0] = float("-inf")
    for layout in (x, channels_last(x)):
        dx, seed = triton_grad(net, layout)
        check(dx, torch_grad(lambda t: ref_maxout(t, 3), x, seed))
    assert dx.stride(1) == 1


def test_maxout_half_precision():
    net = net_for("maxout(x, pieces=2)", 4, (5,), "f16")
    x = torch.randn(3, 4, 5).half()
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: ref_maxout(t, 2), x, seed), torch.float16)


# --------------------------------------------------------------------------------------
# Softmax and log_softmax
# --------------------------------------------------------------------------------------

SOFTMAX = {"softmax": torch.softmax, "log_softmax": torch.log_softmax}


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, axis", [((3, 5, 4, 6), 1), ((2, 3, 4, 7), 3), ((4, 3000), 1),
                                         ((2, 6, 5), 2)], ids=["channels", "last", "long", "3d"])
def test_softmax_grad(op, shape, axis):
    net = net_for(f"{op}(x, axis={axis})", shape[1], shape[2:])
    x = torch.randn(*shape) * 3
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: SOFTMAX[op](t, axis), x, seed))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("shape, axis", [((4, 3000), 1), ((3, 1500, 4), 1)], ids=["inner", "outer"])
def test_softmax_grad_two_passes(monkeypatch, op, shape, axis):
    """An axis longer than one block: row sums chunk by chunk, then dx."""
    monkeypatch.setitem(softmax_grad_family.CONFIGS, "cpu",
                        [{"TILE": 2048, "MAX_BLOCK_L": 1024, "CHUNK": 512, "num_warps": 4}])
    net = net_for(f"{op}(x, axis={axis})", shape[1], shape[2:])
    x = torch.randn(*shape) * 3
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: SOFTMAX[op](t, axis), x, seed))


def test_softmax_grad_rows_straddle_blocks(monkeypatch):
    monkeypatch.setitem(softmax_grad_family.CONFIGS, "cpu",
                        [{"TILE": 64, "MAX_BLOCK_L": 64, "CHUNK": 16, "num_warps": 4}])
    net = net_for("softmax(x)", 5, ("H", "W"))
    for shape in [(1, 5, 4, 4), (3, 5, 3, 7)]:  # 16 rows of 8 per program, then 63
        x = channels_last(torch.randn(*shape))
        dx, seed = triton_grad(net, x)
        check(dx, torch_grad(lambda t: torch.softmax(t, 1), x, seed))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_grad_half_precision(op):
    net = net_for(f"{op}(x)", 10, (3, 4), "f16")
    x = torch.randn(2, 10, 3, 4).half()
    dx, seed = triton_grad(net, x)
    check(dx, torch_grad(lambda t: SOFTMAX[op](t, 1), x, seed), torch.float16)


# --------------------------------------------------------------------------------------
# Whole nets: no reference ops left, and ahead-of-time compilation
# --------------------------------------------------------------------------------------

NET = """net G(x: {dtype}[N, 8, H, W]) {{
    a = maxpool(x, 3, stride=2, pad=same)
    b = avgpool(x, 3, stride=2, pad=same)
    c = lppool(x, 3, stride=2, pad=same, p=3.0)
    m = maxout(wavgpool(a + b + c, output=(3, 3), sigma=0.8), pieces=2)
    return log_softmax(m) + softmax(m)
}}
"""
AOT_NET = NET.format(dtype="f16")


def test_no_reference_ops_remain():
    net = compile_net(NET.format(dtype="f32"))
    x = torch.randn(2, 8, 8, 8)
    dx, seed = triton_grad(net, x)
    backward = net._program._backward[("x",)]
    assert not GRAD_OPS & set(backward.reference_ops())
    families = {p.family for p in backward.plans}
    assert {"pool_dx", "maxout_dx", "softmax_dx"} <= families

    def ref(t):
        cells = window_cells((8, 8), 3, 2, "same")
        a, b, c = (ref_pool(t, kind, cells, p=3.0) for kind in ("maxpool", "avgpool", "lppool"))
        e = ref_pool(a + b + c, "wavgpool", adaptive_cells((4, 4), (3, 3)), sigma=0.8)
        m = ref_maxout(e, 2)
        return torch.log_softmax(m, 1) + torch.softmax(m, 1)

    check(dx, torch_grad(ref, x, seed))


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_aot_compiles_gradient_kernels_without_spills(target):
    """The heaviest gradient kernel (max pooling's rescanned windows), maxout's and
    log_softmax's; the backward program only, to keep the cold compile short."""
    src = """net A(x: f16[N, 8, H, W]) {
    return log_softmax(maxout(maxpool(x, 3, stride=2, pad=same), pieces=2))
}
"""
    net = compile_net(src)
    triton_grad(net, torch.randn(2, 8, 8, 8).half())
    reports = compile_program(net._program._backward[("x",)], target, None,
                              {"N": 8, "H": 64, "W": 64})
    assert {r.family for r in reports} == {"pool_dx", "maxout_dx", "softmax_dx"}
    for r in reports:
        assert r.direction == "backward"
        assert r.registers is not None and 0 < r.registers <= 255, r
        assert r.spills == 0, r
        assert r.flops > 0 and r.bytes > 0, r


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_aot_whole_net(target):
    """Every kernel of a net using every gradient family, forward and backward."""
    net = compile_net(AOT_NET)
    triton_grad(net, torch.randn(2, 8, 8, 8).half())
    reports = compile_program(net._program, target, None, {"N": 8, "H": 64, "W": 64})
    backward = [r for r in reports if r.direction == "backward"]
    assert {"pool_dx", "maxout_dx", "softmax_dx"} <= {r.family for r in backward}
    for r in backward:
        assert r.registers is not None and 0 < r.registers <= 255, r
        assert r.spills == 0, r


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("expr", [
    "maxpool(x, 3, stride=1, pad=1)", "lppool(x, 3, stride=1, pad=1, p=1.5)",
    "lppool(x, 2, p=2.0)", "avgpool(x, 3, stride=2, pad=same)",
    "wavgpool(x, (3, 5, 3), stride=1, pad=2, sigma=0.6)", "wavgpool(x, 4, stride=2, sigma=0.7)",
    "avgpool(x, output=(5, 3, 2))", "maxpool(x, output=(5, 3, 2))",
    "lppool(x, output=(5, 3, 2), p=2.5)", "wavgpool(x, output=(5, 3, 2), sigma=1.0)",
    "maxpool(x, (5, 5, 5), stride=2)", "maxout(x, pieces=4)", "softmax(x, axis=3)"])
def test_aot_every_kernel_shape(target, expr):
    """3-D windows, one tile or chunks of taps, adaptive over symbolic sizes."""
    net = net_for(expr, 8, ("D", "H", "W"), "f16")
    triton_grad(net, torch.randn(1, 8, 5, 6, 7).half())
    reports = compile_program(net._program._backward[("x",)], target, None,
                              {"N": 8, "D": 16, "H": 32, "W": 32})
    (r,) = reports
    assert r.registers and r.spills == 0, r


def test_cost_model():
    from convdsl.ir.types import symbol

    net = compile_net(AOT_NET)
    triton_grad(net, torch.randn(2, 8, 8, 8).half())
    backward = net._program._backward[("x",)]
    env = {symbol("N"): 2, symbol("H"): 16, symbol("W"): 16}
    from convdsl.triton.families import family

    by_name = {p.name: family(p.family).cost(p, backward.graph, env) for p in backward.plans
               if p.family in ("pool_dx", "maxout_dx", "softmax_dx")}
    n_in = 2 * 8 * 16 * 16
    (avg,) = [v for k, v in by_name.items() if "_avg_" in k]
    assert avg[1] == (2 * 8 * 8 * 8 + n_in) * 2  # read dy, write dx (f16)
    (maxout,) = [v for k, v in by_name.items() if "maxout" in k]
    groups = 2 * 4 * 3 * 3  # after wavgpool(output=(3, 3)) and 2 pieces
    assert maxout[1] == (groups + 2 * 2 * groups) * 2  # read dy and x, write dx
    assert all(flops > 0 for flops, _ in by_name.values())


# --------------------------------------------------------------------------------------
# Property test (few examples: the interpreter is slow)
# --------------------------------------------------------------------------------------

@st.composite
def pool_configs(draw):
    d = draw(st.integers(1, 2))
    window = tuple(draw(st.integers(1, 4)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    pad = tuple((draw(st.integers(0, k - 1)), draw(st.integers(0, k - 1))) for k in window)
    sizes = tuple(draw(st.integers(max(1, k - b - a), 8)) for k, (b, a) in zip(window, pad))
    kind = draw(st.sampled_from(["maxpool", "avgpool", "lppool", "wavgpool"]))
    return kind, sizes, window, stride, pad


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(pool_configs())
def test_property_pool_grad(config):
    kind, sizes, window, stride, pad = config
    extra = {"lppool": "p=2.5", "wavgpool": "sigma=0.7"}.get(kind, "")
    net = net_for(pool_expr(kind, window, stride, pad, extra=extra), 2, sizes)
    x = torch.randn(2, 2, *sizes)
    dx, seed = triton_grad(net, x)
    cells = window_cells(sizes, window, stride, pad)
    check(dx, torch_grad(lambda t: ref_pool(t, kind, cells, **_extra(extra)), x, seed))
