"""Pooling fusion (issue 5): conv (+ bias + activation) + pooling as one
Triton kernel (family conv_pool), run under Triton's interpreter.

Every case compiles one net twice with backend="triton": optimized (the
fuse-pooling pass makes one `_fused` node) and with optimize=False (conv,
activation and pooling as separate kernels). Both are compared, forward and
backward (loss = (out * seed).sum() for a random seed; the input and every
parameter gradient), with an INDEPENDENT float64 reference written here with
torch.nn.functional: F.conv*d on an explicitly padded input (a loop over the
rows of a connection table), torch's activations, and F.max_pool*d,
F.avg_pool*d(count_include_pad=False) or F.lp_pool*d where they implement the
language's definition; otherwise (wavgpool, Lp with p != 2, asymmetric pool
padding) the definition as a loop over windows. The reference never uses
convdsl's own torch lowering.

The inference variant (torch.no_grad: nothing stored) and the training variant
(the kernel also stores the conv outputs the backward graph reads, each once)
are both run; the fused nets have fewer kernels than the unfused ones.
"""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import convdsl
from convdsl.checks import check_layers
from convdsl.ir.types import symbol
from convdsl.triton.families import family
from convdsl.triton.families.conv import Tile

F64 = torch.float64
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MAX = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
LP = {1: F.lp_pool1d, 2: F.lp_pool2d}
ACT = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
       "elu": F.elu, "identity": lambda v: v, None: lambda v: v}
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}
# The interpreter computes masked lanes too; numpy warns about values never stored.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TABLE = ((0, 1, 2), (1, 2, 3), (2, 3, 0), (3, 0, 1), (0, 1, 2, 3), (1,))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add latency on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# -- cases -------------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return fmt(v[0])
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(fmt(i) for i in v) + ")"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


# name → (input shape, conv out, conv kwargs, activation, pool op, pool kwargs)
CASES = {
    # DigitsLeNet: conv(pad same) + relu + maxpool 2x2; odd size leaves a conv row unpooled
    "relu-maxpool2": ((2, 3, 7, 8), 5, {"kernel": 3, "pad": 1}, "relu", "maxpool", {"window": 2}),
    # AlexNet: strided conv + relu + overlapping 3x3/2 max pooling
    "stride2-relu-maxpool3s2": ((2, 3, 13, 11), 6, {"kernel": 2, "stride": 2, "pad": 1}, "relu",
                                "maxpool", {"window": 3, "stride": 2}),
    # LeNet5 C3: a connection table, tanh, average pooling
    "table-tanh-avgpool2": ((1, 4, 9, 9), len(TABLE), {"kernel": 3, "connect": "T"}, "tanh",
                            "avgpool", {"window": 2}),
    # groups, sigmoid, L2 pooling (F.lp_pool2d)
    "groups-sigmoid-lppool2": ((2, 4, 8, 7), 6, {"kernel": (3, 2), "groups": 2}, "sigmoid",
                               "lppool", {"window": 2}),
    # Lp with p = 3 and padding (loop reference), conv with no bias
    "tanh-lppool3-pad": ((1, 3, 7, 6), 4, {"kernel": 2, "bias": "none"}, "tanh", "lppool",
                         {"window": 3, "stride": 2, "pad": 1, "p": 3.0}),
    # Gaussian-weighted, windows clipped by padding; elu keeps the conv output for backward too
    "elu-wavgpool-pad": ((2, 3, 8, 8), 4, {"kernel": 2, "pad": 1}, "elu", "wavgpool",
                         {"window": 3, "stride": 2, "pad": 1, "sigma": 0.8}),
    # Gaussian-weighted, whole windows (one weight per tap), even window
    "relu-wavgpool2": ((1, 2, 9, 9), 3, {"kernel": 2, "dilation": 2, "flip": True}, "relu",
                       "wavgpool", {"window": 2, "sigma": 1.3}),
    # conv straight into padded max pooling (no activation), location bias
    "maxpool-pad-location": ((2, 2, 7, 7), 3, {"kernel": 2, "bias": "location"}, None, "maxpool",
                             {"window": 3, "stride": 2, "pad": 1}),
    # asymmetric pool padding, avg pooling counts only real taps
    "avgpool-asym-pad": ((1, 3, 6, 7), 4, {"kernel": 2, "pad": ((1, 0), (0, 1))}, "relu",
                         "avgpool", {"window": (3, 2), "stride": (2, 2), "pad": ((2, 0), (0, 1))}),
    # windows with gaps (stride > window): conv outputs no window reads
    "tanh-maxpool-gaps": ((1, 2, 9, 10), 3, {"kernel": 2}, "tanh", "maxpool",
                          {"window": 2, "stride": 3}),
    # 1-D: padded average pooling
    "1d-relu-avgpool-pad": ((2, 3, 17), 5, {"kernel": 3, "stride": 2, "pad": 2}, "relu", "avgpool",
                            {"window": 3, "stride": 2, "pad": 1}),
    # 3-D: max pooling
    "3d-relu-maxpool2": ((1, 2, 4, 5, 4), 4, {"kernel": 2, "pad": ((1, 0), (1, 1), (0, 1))},
                         "relu", "maxpool", {"window": 2}),
}


def source(case: str, dtype: str = "f32") -> str:
    shape, out, conv_kw, act, pool, pool_kw = CASES[case]
    args = "".join(f", {k}={fmt(v)}" for k, v in conv_kw.items())
    conv = f"conv(x, {out}{args})"
    pool_args = "".join(f", {k}={fmt(v)}" for k, v in pool_kw.items() if k != "window")
    table = ""
    if conv_kw.get("connect"):
        table = "table T = [" + ", ".join(
            "[" + ", ".join(map(str, row)) + "]" for row in TABLE) + "]\n"
    dims = ", ".join(str(d) for d in ("N",) + shape[1:])
    return (f"{table}net A(x: {dtype}[{dims}]) {{\n"
            f"    c = {f'{act}({conv})' if act else conv}\n"
            f"    return {pool}(c, {fmt(pool_kw['window'])}{pool_args})\n}}\n")


_NETS: dict[tuple, tuple] = {}


def nets(case: str, dtype: str = "f32"):
    """(fused, unfused) Triton nets with the same random parameters."""
    key = (case, dtype)
    if key not in _NETS:
        src = source(case, dtype)
        fused = convdsl.compile(src, backend="triton")
        unfused = convdsl.compile(src, backend="triton", optimize=False)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in fused.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        unfused.load_state_dict(fused.state_dict())
        _NETS[key] = fused, unfused
    return _NETS[key]


# -- the independent reference ---------------------------------------------------------------

def per_dim(v, rank):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * rank


def pairs(pad, rank):
    """(before, after) per dim from an int, per-dim ints or per-dim pairs."""
    return [tuple(p) if isinstance(p, (tuple, list)) else (p, p) for p in per_dim(pad, rank)]


def ref_conv(x, w, b, rank, kernel, stride=1, pad=0, dilation=1, groups=1, flip=False,
             bias="channel", connect=None, table=TABLE):
    flat = [v for pair in reversed(pairs(pad, rank)) for v in pair]
    x = F.pad(x, flat)
    if flip:
        w = w.flip(list(range(2, 2 + rank)))
    stride, dilation = per_dim(stride, rank), per_dim(dilation, rank)
    if connect:  # a loop over the table's rows: output o sums the inputs its row lists
        outs = []
        for o, row in enumerate(table):
            outs.append(sum(CONV[rank](x[:, c:c + 1], w[o:o + 1, c:c + 1], None, stride, 0,
                                       dilation) for c in row))
        y = torch.cat(outs, dim=1)
    else:
        y = CONV[rank](x, w, None, stride, 0, dilation, groups)
    if bias == "channel":
        y = y + b.reshape((1, -1) + (1,) * rank)
    elif bias == "location":
        y = y + b.unsqueeze(0)
    return y


def loop_pool(h, kind, window, stride, pads, p=2.0, sigma=1.0):
    """The pooling definitions as a loop over windows (padding never counts)."""
    sizes = h.shape[2:]
    outs = [(m + b + a - k) // s + 1 for m, (b, a), k, s in zip(sizes, pads, window, stride)]
    results = []
    for pos in itertools.product(*(range(o) for o in outs)):
        starts = [q * s - b for q, s, (b, _) in zip(pos, stride, pads)]
        values, dist2 = [], []
        for off in itertools.product(*(range(k) for k in window)):
            idx = tuple(st + t for st, t in zip(starts, off))
            if all(0 <= i < m for i, m in zip(idx, sizes)):
                values.append(h[(slice(None), slice(None)) + idx])
                dist2.append(sum((t - (k - 1) / 2) ** 2 for t, k in zip(off, window)))
        v = torch.stack(values, -1)
        if kind == "maxpool":
            r = v.amax(-1)
        elif kind == "avgpool":
            r = v.mean(-1)
        elif kind == "lppool":  # an all-zero window: value 0 and gradient 0, as F.lp_pool2d
            total = v.abs().pow(p).sum(-1)
            safe = torch.where(total > 0, total, torch.ones_like(total))
            r = torch.where(total > 0, safe.pow(1.0 / p), torch.zeros_like(total))
        else:  # exp(-d^2 / 2 sigma^2) from the window centre, normalised over the real taps
            d2 = torch.tensor(dist2, dtype=F64)
            wt = torch.exp(-(d2 - d2.min()) / (2 * sigma**2))
            r = (v * wt).sum(-1) / wt.sum()
        results.append(r)
    return torch.stack(results, -1).reshape(*h.shape[:2], *outs)


def ref_pool(h, kind, window, stride=None, pad=0, p=2.0, sigma=1.0):
    rank = h.dim() - 2
    window = per_dim(window, rank)
    stride = window if stride is None else per_dim(stride, rank)
    pads = pairs(pad, rank)
    symmetric = all(b == a and b <= k // 2 for (b, a), k in zip(pads, window))
    before = tuple(b for b, _ in pads)
    if kind == "maxpool" and symmetric:
        return MAX[rank](h, window, stride, before)
    if kind == "avgpool" and symmetric:
        return AVG[rank](h, window, stride, before, count_include_pad=False)
    if kind == "lppool" and p == 2.0 and not any(map(any, pads)) and rank in LP:
        return LP[rank](h, 2.0, window, stride)
    return loop_pool(h, kind, window, stride, pads, p, sigma)


def reference(case, x, params):
    shape, _, conv_kw, act, pool, pool_kw = CASES[case]
    rank = len(shape) - 2
    kw = dict(conv_kw)
    kw["kernel"] = per_dim(kw["kernel"], rank)
    h = ref_conv(x, params["c.weight"], params.get("c.bias"), rank, **kw)
    h = ACT[act](h)
    return ref_pool(h, pool, **pool_kw)


# -- running ---------------------------------------------------------------------------------

def run(net, x, seed, grad: bool):
    """Output, and with `grad` the gradients of (out * seed).sum() for x and every parameter."""
    if not grad:
        with torch.no_grad():
            return net(x), {}
    xi = x.clone().requires_grad_(True)
    net.zero_grad()
    y = net(xi)
    (y * seed).sum().backward()
    grads = {"x": xi.grad}
    grads.update({name: p.grad for name, p in net.named_parameters()})
    return y.detach(), grads


def run_reference(case, x, net, seed):
    xi = x.double().requires_grad_(True)
    params = {name: p.detach().double().requires_grad_(True) for name, p in
              net.named_parameters()}
    y = reference(case, xi, params)
    (y * seed.double()).sum().backward()
    grads = {"x": xi.grad}
    grads.update({name: p.grad for name, p in params.items()})
    return y.detach(), grads


def close(got, want, tol=1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"max error {err} (scale {scale})"


def kernel_names(program) -> list[str]:
    return [p.name for p in program.plans]


# The interpreter is slow (every integer op is overflow-checked): these run with -m slow.
SLOW = {"tanh-lppool3-pad", "relu-wavgpool2", "maxpool-pad-location", "avgpool-asym-pad"}


def marked(cases, slow=SLOW):
    return [pytest.param(c, marks=pytest.mark.slow) if c in slow else c for c in cases]


@pytest.mark.parametrize("case", marked(sorted(CASES)))
def test_fused_forward_backward(case):
    fused, unfused = nets(case)
    shape = CASES[case][0]
    x = torch.randn(shape)
    seed = torch.randn(fused(x).shape)

    # The fuse-pooling pass made one conv_pool kernel: fewer kernels than unfused.
    program = fused._program.inference
    (plan,) = [p for p in program.plans if p.family == "conv_pool"]
    assert len(program.plans) == 1 < len(unfused._program.inference.plans)
    assert "saving" not in plan.name

    want, want_grads = run_reference(case, x, fused, seed)
    # Inference variant (no_grad): stores the pooled output only.
    y_inf, _ = run(fused, x, seed, grad=False)
    close(y_inf, want)
    # Training variant: the same output, and the conv outputs the backward reads.
    y, grads = run(fused, x, seed, grad=True)
    close(y, want)
    for name, g in want_grads.items():
        close(grads[name], g)
    # The unfused Triton net gives the same numbers.
    y_un, grads_un = run(unfused, x, seed, grad=True)
    close(y, y_un)
    for name, g in grads_un.items():
        close(grads[name], g)
    training = fused._program._training
    assert len(training.plans) == 1 < len(unfused._program._training.plans)
    kept = len(training.plans[0].outputs) - 1
    assert ("saving" in training.plans[0].name) == (kept > 0)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_geometries(data):
    """Random conv and pooling geometry: fused forward (both variants) and the
    input and weight gradients equal the reference."""
    rank = data.draw(st.integers(1, 2), "rank")
    groups = data.draw(st.sampled_from([1, 2]), "groups")
    conv_kw = {"kernel": tuple(data.draw(st.integers(1, 3)) for _ in range(rank)),
               "stride": tuple(data.draw(st.integers(1, 2)) for _ in range(rank)),
               "dilation": tuple(data.draw(st.integers(1, 2)) for _ in range(rank)),
               "pad": tuple((data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2)))
                            for _ in range(rank)),
               "groups": groups, "flip": data.draw(st.booleans(), "flip")}
    window = tuple(data.draw(st.integers(1, 3)) for _ in range(rank))
    pool_kw = {"window": window,
               "stride": tuple(data.draw(st.integers(1, 3)) for _ in range(rank)),
               "pad": tuple((data.draw(st.integers(0, k - 1)), data.draw(st.integers(0, k - 1)))
                            for k in window)}
    kind = data.draw(st.sampled_from(["maxpool", "avgpool", "lppool", "wavgpool"]), "kind")
    if kind == "wavgpool":
        pool_kw["sigma"] = 0.7
    act = data.draw(st.sampled_from(["relu", "tanh", "elu", None]), "act")
    shape = (2, 2 * groups) + tuple(data.draw(st.integers(5, 8)) for _ in range(rank))
    CASES["random"] = (shape, 2 * groups, conv_kw, act, kind, pool_kw)
    _NETS.pop(("random", "f32"), None)
    try:
        try:
            fused, _ = nets("random")
            x = torch.randn(shape)
            seed = torch.randn(fused(x).shape)
        except convdsl.ConvDSLError:
            assume(False)  # the input is too small for this geometry
        assume(any(p.family == "conv_pool" for p in fused._program.inference.plans))
        want, want_grads = run_reference("random", x, fused, seed)
        y_inf, _ = run(fused, x, seed, grad=False)
        y, grads = run(fused, x, seed, grad=True)
    finally:
        CASES.pop("random")
        _NETS.pop(("random", "f32"), None)
    close(y_inf, want)
    close(y, want)
    close(grads["x"], want_grads["x"])
    close(grads["c.weight"], want_grads["c.weight"])


def test_training_variant_stores_every_conv_output_once():
    """The kept values equal the pre-pool activation everywhere, also at the
    conv outputs no window reads (gaps, the trailing row), so the backward graph
    never reads uninitialised memory."""
    for case, pre in (("tanh-maxpool-gaps", torch.tanh), ("relu-maxpool2", torch.relu)):
        fused, _ = nets(case)
        program = fused._program.training(fused)
        (plan,) = program.plans
        assert "saving" in plan.name and len(plan.outputs) == 2
        x = torch.randn(CASES[case][0])
        kernel = program.kernel(plan)
        params = {plan.nodes[0]: {"0.weight": fused.c.weight, "0.bias": fused.c.bias}}
        attrs = check_layers(program.graph, {"N": x.shape[0]})
        _, kept = family("conv_pool").launch(plan, kernel, [x], params,
                                             {plan.nodes[0]: attrs[plan.nodes[0]]})
        conv_kw = CASES[case][2]
        kw = dict(conv_kw, kernel=per_dim(conv_kw["kernel"], 2))
        want = pre(ref_conv(x.double(), fused.c.weight.detach().double(),
                            fused.c.bias.detach().double(), 2, **kw))
        assert torch.isfinite(kept).all()
        close(kept, want)


def test_nan_wins_max_and_stays_in_its_windows():
    fused, unfused = nets("relu-maxpool2")
    x = torch.randn(CASES["relu-maxpool2"][0])
    x[0, 1, 2, 3] = float("nan")
    with torch.no_grad():
        a, b = fused(x), unfused(x)
    assert torch.equal(a.isnan(), b.isnan()) and a.isnan().any() and not a.isnan().all()
    close(torch.nan_to_num(a), torch.nan_to_num(b))


@pytest.mark.parametrize("case", marked(["stride2-relu-maxpool3s2", "table-tanh-avgpool2",
                                          "elu-wavgpool-pad"],
                                         {"table-tanh-avgpool2", "elu-wavgpool-pad"}))
def test_small_tiles_straddle_block_boundaries(case, monkeypatch):
    """16-wide tiles: pooled positions, channels and K blocks all cross tile edges."""
    monkeypatch.setattr(family("conv_pool"), "cpu_tile", Tile(16, 16, 16, 1, 1))
    fused, _ = nets(case)
    shape = (3,) + CASES[case][0][1:]
    x = torch.randn(shape)
    seed = torch.randn(fused(x).shape)
    want, want_grads = run_reference(case, x, fused, seed)
    y, grads = run(fused, x, seed, grad=True)
    close(y, want)
    for name, g in want_grads.items():
        close(grads[name], g)


def test_packed_weights_channels_last_bf16(monkeypatch):
    """The GPU's packed weight layout, a channels-last input and bf16."""
    monkeypatch.setitem(family("conv_pool").pack_weights, "cpu", True)
    case = "stride2-relu-maxpool3s2"
    fused, _ = nets(case)
    x = torch.randn(CASES[case][0]).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = fused(x)
        want = reference(case, x.double(), {k: v.double() for k, v in fused.state_dict().items()})
    assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, want)
    fused16, unfused16 = nets(case, "bf16")
    x16 = torch.randn(CASES[case][0]).to(torch.bfloat16)
    with torch.no_grad():
        y16, u16 = fused16(x16), unfused16(x16)
        want = reference(case, x16.double(),
                         {k: v.double() for k, v in fused16.state_dict().items()})
    assert y16.dtype == torch.bfloat16
    close(y16, want, 3e-2)
    close(y16, u16, 3e-2)


def test_int64_indexing(monkeypatch):
    from convdsl.triton.families import conv_pool as module

    monkeypatch.setattr(module, "needs_int64", lambda *t: True)
    case = "table-tanh-avgpool2"
    fused, _ = nets(case)
    x = torch.randn(CASES[case][0])
    seed = torch.randn(fused(x).shape)
    want, want_grads = run_reference(case, x, fused, seed)
    y, grads = run(fused, x, seed, grad=True)
    close(y, want)
    close(grads["c.weight"], want_grads["c.weight"])


def test_example_nets_fuse():
    """LeNet5, DigitsLeNet and AlexNet: every conv → pool becomes one kernel; so
    does AnySize's and FullyConv's pad=same conv → pool, on symbolic sizes."""
    expect = {("lenet5.cdsl", "LeNet5"): 2, ("digits.cdsl", "DigitsLeNet"): 2,
              ("alexnet.cdsl", None): 3, ("lenet5.cdsl", "AnySize"): 1,
              ("lenet5.cdsl", "FullyConv"): 1}
    for (path, name), count in expect.items():
        src = (EXAMPLES / path).read_text()
        fused = convdsl.compile(src, net=name, backend="triton")
        unfused = convdsl.compile(src, net=name, backend="triton", optimize=False)
        plans = fused._program.inference.plans
        assert sum(p.family == "conv_pool" for p in plans) == count, path
        assert len(plans) < len(unfused._program.inference.plans)


def test_source_names_and_cost():
    fused, unfused = nets("elu-wavgpool-pad")
    inference = fused._program.inference
    training = fused._program.training(fused)
    (a,), (b,) = inference.plans, training.plans
    assert a.name == "k_conv_2d_elu_wavgpool_c_1" and b.name == "k_conv_2d_elu_wavgpool_saving_c_1"
    # Pooled output + the conv output (elu's derivative reads it; wavg's does not read its input).
    assert len(b.outputs) == 2 and "kept" not in a.source
    assert "tl.store(kept0_ptr + kept_offs, acc.to(" in b.source
    # elu then max pooling: the backward reads the conv output and the elu output.
    two = convdsl.compile(source("elu-wavgpool-pad").replace("wavgpool", "maxpool").replace(
        ", sigma=0.8", ""), backend="triton")
    (plan,) = two._program.training(two).plans
    assert len(plan.outputs) == 3 and plan.source.count("tl.store(kept") == 2
    assert re.search(r"def k_conv_2d_elu_wavgpool_c_1\(", a.source)
    # Deterministic source.
    again = convdsl.compile(source("elu-wavgpool-pad"), backend="triton")
    assert again._program.inference.plans[0].source == a.source
    # Cost: fewer bytes than the unfused kernels (the pre-pool map never stored) in
    # inference; FLOPs at least the conv's.
    env = {symbol("N"): 8}
    fam = family("conv_pool")
    flops, nbytes = fam.cost(a, inference.graph, env)
    _, train_bytes = fam.cost(b, training.graph, env)
    unfused_program = unfused._program.inference
    un_flops, un_bytes = 0, 0
    for plan in unfused_program.plans:
        f, n = family(plan.family).cost(plan, unfused_program.graph, env)
        un_flops, un_bytes = un_flops + f, un_bytes + n
    assert nbytes < un_bytes / 2 and nbytes < train_bytes
    # 3x3/2 windows with pad 1 on a 9x9 conv output: 5x5 pooled, reading 2+3+3+3+2 = 13
    # conv outputs per dim of 9: the conv runs (13/9)^2 times over, the unfused once.
    conv_flops = 8 * 4 * 9 * 9 * 2 * 3 * 4
    assert flops >= conv_flops * (13 / 9) ** 2 and flops > un_flops


def test_aot_signature_matches_kernel_arguments():
    from convdsl.triton.loader import load_kernel

    for case in ("table-tanh-avgpool2", "elu-wavgpool-pad", "maxpool-pad-location",
                 "1d-relu-avgpool-pad", "3d-relu-maxpool2"):
        fused, _ = nets(case)
        for program in (fused._program.inference, fused._program.training(fused)):
            (plan,) = program.plans
            signature, constexprs, _ = family("conv_pool").aot(plan, program.graph)
            kernel = load_kernel(plan.source, plan.name, interpret=True)
            assert list(signature) == list(kernel.arg_names)
            assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)


# -- pad=same on symbolic sizes ----------------------------------------------------------------
#
# `same` padding depends on the input size, so with symbolic sizes it stays a
# word in the IR and the fused kernel resolves it at each launch. Odd sizes and
# even kernels make it asymmetric (the larger half after); a stride-2 conv's
# padding differs between even and odd sizes.

# name → (two input spatial sizes, C_in, conv out, conv kwargs, activation, pool op, pool kwargs)
SAME_CASES = {
    # LeNet's AnySize: conv(pad same) + relu + 2x2 max pooling; the even kernel pads (0, 1)
    "same-even-kernel-relu-maxpool2": (((7, 8), (10, 5)), 3, 4, {"kernel": (2, 3), "pad": "same"},
                                       "relu", "maxpool", {"window": 2}),
    # stride 2 with same padding: (1, 1) at 7 but (0, 1) at 8 and 6; then 2x2 average
    # pooling with same padding: (0, 1) on odd conv outputs, counting only real taps
    "same-stride2-tanh-avgpool-same": (((7, 8), (9, 6)), 2, 4, {"kernel": 3, "stride": 2,
                                                              "pad": "same"},
                                       "tanh", "avgpool", {"window": 2, "pad": "same"}),
    # the pooling's padding is `same` too: overlapping 3x3/2 windows, (0, 1) at even sizes
    "same-elu-maxpool3s2-same": (((7, 8), (6, 9)), 2, 3, {"kernel": 3, "pad": "same"}, "elu",
                                 "maxpool", {"window": 3, "stride": 2, "pad": "same"}),
    # Gaussian-weighted pooling with same padding: windows clipped at the far edge only
    "same-stride2-relu-wavgpool-same": (((9, 7), (8, 11)), 2, 3,
                                        {"kernel": 2, "stride": 2, "pad": "same"}, "relu",
                                        "wavgpool", {"window": 2, "pad": "same", "sigma": 0.8}),
    # 1-D: Lp pooling with same padding (a loop reference), dilated conv
    "1d-same-dilated-lppool-same": (((11,), (8,)), 2, 3, {"kernel": 3, "dilation": 2,
                                                          "pad": "same"},
                                    "tanh", "lppool", {"window": 3, "stride": 2, "pad": "same"}),
}
SAME_SLOW = {"same-elu-maxpool3s2-same", "same-stride2-relu-wavgpool-same",
             "1d-same-dilated-lppool-same"}


def same_source(case: str) -> str:
    sizes, c_in, out, conv_kw, act, pool, pool_kw = SAME_CASES[case]
    dims = ("T",) if len(sizes[0]) == 1 else ("H", "W")
    args = "".join(f", {k}={fmt(v)}" for k, v in conv_kw.items())
    pool_args = "".join(f", {k}={fmt(v)}" for k, v in pool_kw.items() if k != "window")
    return (f"net S(x: f32[N, {c_in}, {', '.join(dims)}]) {{\n"
            f"    c = {act}(conv(x, {out}{args}))\n"
            f"    return {pool}(c, {fmt(pool_kw['window'])}{pool_args})\n}}\n")


def tf_same_pads(sizes, kernel, stride, dilation=1):
    """The language's `same` rule (LANGUAGE.md), written out here: total padding
    max((ceil(m/s) - 1)·s + k' - m, 0), the smaller half before."""
    rank = len(sizes)
    pads = []
    for m, k, s, r in zip(sizes, per_dim(kernel, rank), per_dim(stride, rank),
                          per_dim(dilation, rank)):
        total = max((-(-m // s) - 1) * s + r * (k - 1) + 1 - m, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def same_reference(case, x, params):
    _, _, _, conv_kw, act, pool, pool_kw = SAME_CASES[case]
    rank = x.dim() - 2
    kw = dict(conv_kw, kernel=per_dim(conv_kw["kernel"], rank))
    kw["pad"] = tf_same_pads(x.shape[2:], kw["kernel"], kw.get("stride", 1), kw.get("dilation", 1))
    h = ACT[act](ref_conv(x, params["c.weight"], params["c.bias"], rank, **kw))
    pool_kw = dict(pool_kw)
    if pool_kw.get("pad") == "same":
        window = per_dim(pool_kw["window"], rank)
        pool_kw["pad"] = tf_same_pads(h.shape[2:], window, pool_kw.get("stride", window))
    return ref_pool(h, pool, **pool_kw)


_SAME_NETS: dict[str, object] = {}


def same_net(case: str):
    if case not in _SAME_NETS:
        net = convdsl.compile(same_source(case), backend="triton")
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        _SAME_NETS[case] = net
    return _SAME_NETS[case]


@pytest.mark.parametrize("case", marked(sorted(SAME_CASES), SAME_SLOW))
def test_same_padding_fuses_on_symbolic_sizes(case):
    """The conv's (and the pooling's) `same` padding stays symbolic in the IR,
    the net still compiles to one conv_pool kernel, and at two input sizes
    (different, some asymmetric pads) forward and every gradient equal the
    reference; the training variant too."""
    net = same_net(case)
    sizes, c_in = SAME_CASES[case][:2]
    (fused,) = [n for n in net._graph.nodes() if n.op == "_fused"]
    assert fused.attrs["steps"][0]["attrs"]["pad"] == "same"
    (plan,) = net._program.inference.plans
    assert plan.family == "conv_pool"
    for spatial in sizes:
        x = torch.randn((2, c_in) + spatial)
        seed = torch.randn(net(x).shape)
        xi = x.double().requires_grad_(True)
        params = {k: v.detach().double().requires_grad_(True)
                  for k, v in net.named_parameters()}
        want = same_reference(case, xi, params)
        (want * seed.double()).sum().backward()
        y_inf, _ = run(net, x, seed, grad=False)
        close(y_inf, want.detach())
        y, grads = run(net, x, seed, grad=True)
        close(y, want.detach())
        close(grads["x"], xi.grad)
        for name, p in params.items():
            close(grads[name], p.grad)
    (train_plan,) = net._program.training(net).plans
    assert train_plan.family == "conv_pool" and "saving" in train_plan.name


def test_same_padding_cost_and_aot_signature():
    """The cost model and the aot signature need no padding amounts: the cost
    resolves them at the sizes it is given (two sets here), aot passes them as
    launch arguments."""
    from convdsl.triton.loader import load_kernel

    case = "same-stride2-tanh-avgpool-same"
    net = same_net(case)
    fam = family("conv_pool")
    for program in (net._program.inference, net._program.training(net)):
        (plan,) = program.plans
        signature, _, _ = fam.aot(plan, program.graph)
        kernel = load_kernel(plan.source, plan.name, interpret=True)
        assert list(signature) == list(kernel.arg_names)
        assert signature["pad_h"] == signature["ppad_w"] == "i32"  # launch arguments
    (plan,) = net._program.inference.plans
    graph = net._program.inference.graph
    out, weights = 4, 4 * 2 * 9  # conv out channels; weights: out x C_in x 3 x 3
    for h, w in ((32, 32), (33, 17)):
        env = {symbol("N"): 8, symbol("H"): h, symbol("W"): w}
        flops, nbytes = fam.cost(plan, graph, env)
        conv_h, conv_w = -(-h // 2), -(-w // 2)  # same padding, stride 2: ceil(m / 2)
        pooled = -(-conv_h // 2) * -(-conv_w // 2)  # and again for the pooling
        # 2x2 windows at stride 2 read every conv output once: one GEMM row each
        assert flops >= 8 * conv_h * conv_w * 2 * weights
        # f32 x and pooled output, f32 weights and bias: the conv output never stored
        assert nbytes == 4 * (8 * 2 * h * w + 8 * out * pooled + weights + out)


@pytest.mark.slow  # the fast variant: same-even-kernel-relu-maxpool2 above
@pytest.mark.parametrize("name", ["AnySize", "FullyConv"])
def test_anysize_example_nets_match_functional(name):
    """LeNet's AnySize and FullyConv (figure 9.11), whose first conv (pad=same)
    and max pooling now fuse although H and W are symbolic, against PyTorch's
    own functional ops, forward and backward, at two image sizes."""
    src = (EXAMPLES / "lenet5.cdsl").read_text()
    net = convdsl.compile(src, net=name, backend="triton")
    assert [p.family for p in net._program.inference.plans][:2] == ["conv_pool", "conv"]

    def functional(x, p):
        h = F.max_pool2d(F.relu(F.conv2d(x, p["h1.conv.weight"], p["h1.conv.bias"],
                                         padding="same")), 2)
        h = F.relu(F.conv2d(h, p["h2.conv.weight"], p["h2.conv.bias"], padding="same"))
        if name == "AnySize":
            return F.linear(F.adaptive_max_pool2d(h, 3).flatten(1), p["dense.weight"],
                            p["dense.bias"])
        scores = F.conv2d(h, p["scores.weight"], p["scores.bias"])
        return F.adaptive_avg_pool2d(scores, 1).flatten(1)

    for size in ((9, 11), (12, 8)):
        x = torch.randn((2, 3) + size)
        y, grads = run(net, x, torch.ones(1), grad=True)
        xi = x.double().requires_grad_(True)
        params = {k: v.detach().double().requires_grad_(True) for k, v in net.named_parameters()}
        want = functional(xi, params)
        want.sum().backward()
        close(y, want.detach())
        close(grads["x"], xi.grad)
        for key, p in params.items():
            close(grads[key], p.grad)


# -- autotuning ------------------------------------------------------------------------------------

class FakeCudaTensor:
    """What autotune.choose reads of an operand, as if on a GPU this machine lacks."""

    def __init__(self, t: torch.Tensor):
        self._t, self.device = t, torch.device("cuda", 0)
        self.shape, self.dtype = t.shape, t.dtype

    def __getattr__(self, name):  # is_contiguous, dim, stride
        return getattr(self._t, name)


def test_candidates_are_the_default_then_the_tiles_that_fit():
    from convdsl.triton.families.conv import SHARED_LIMIT

    fam = family("conv_pool")
    attrs = {"table": None, "kernel": (3, 3)}
    assert fam.candidates("cpu", attrs, 4, 4) == [fam.cpu_tile]
    for x_itemsize, w_itemsize in ((2, 2), (4, 4)):
        tiles = fam.candidates("gpu", attrs, x_itemsize, w_itemsize)
        assert tiles[0] == fam.tile("gpu", attrs, x_itemsize, w_itemsize)  # what aot compiles
        assert len(set(tiles)) == len(tiles) > 1
        assert all(t.shared_bytes(x_itemsize, w_itemsize) <= SHARED_LIMIT for t in tiles)
    assert fam.candidates("gpu", attrs, 4, 4)[0].BLOCK_K == 16  # f32: the tf32 tile first
    # Shrunk to a small layer (40 grid rows, 6 outputs, 3 inputs a group): no
    # 64-wide tiles 90% masked; tiles that become the same are tried once.
    small = fam.candidates("gpu", attrs, 2, 2, (40, 6, 3))
    assert small == [Tile(32, 16, 16, 8, 3), Tile(64, 16, 16, 8, 3)]


@pytest.mark.parametrize("case", ["same-stride2-tanh-avgpool-same", "table-tanh-avgpool2"])
def test_gpu_configs_compute_the_reference(case, monkeypatch):
    """Inside families.as_gpu() a launch on host tensors takes the GPU's tiles,
    warps and packed weights (under the interpreter): the training forward (the
    kernel that also stores the conv outputs) equals the reference, and every
    autotuning candidate of it gives the default's values, kept outputs too.
    (The backward kernels' GPU configs are other families': test_gpu_configs.py.)"""
    from convdsl.triton import autotune
    from convdsl.triton.families.base import as_gpu

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact fp32 dots
    tried = []
    real_choose = autotune.choose

    def recording(plan, candidates, tensors, run, extra=()):
        if plan.family == "conv_pool":
            tried.append((list(candidates), run))
        return real_choose(plan, candidates, tensors, run, extra)

    monkeypatch.setattr(autotune, "choose", recording)
    if case in SAME_CASES:
        net, shape = same_net(case), (2, SAME_CASES[case][1]) + SAME_CASES[case][0][0]
    else:
        net, shape = nets(case)[0], CASES[case][0]
    x = torch.randn(shape)
    with as_gpu():
        y = net(x.clone().requires_grad_(True))
    params = {k: v.detach().double() for k, v in net.named_parameters()}
    xd = x.double()
    want = same_reference(case, xd, params) if case in SAME_CASES else reference(case, xd, params)
    close(y.detach(), want)
    assert len(tried) == 1 and len(tried[0][0]) > 1
    with as_gpu():
        for candidates, run in tried:
            default = run(candidates[0])
            for config in candidates[1:]:
                for got, expected in zip(run(config), default):
                    close(got, expected, 1e-5)


# An 18-row connection table: BLOCK_N = 16 splits the output channels into two
# column blocks (two block lists), BLOCK_N = 32 keeps one.
TABLE18 = tuple((o % 4, (o + 1) % 4) if o % 3 else (o % 4,) for o in range(18))


def test_gpu_launch_tunes_each_tile_with_its_own_table_blocks(tmp_path, monkeypatch):
    """The autotuning path of conv_pool's launch, run on this CPU: a fake CUDA
    device and a fake timer make autotune.choose time every candidate (each a
    real interpreted launch, with the table-block lists of its own BLOCK_N),
    keep the fastest, store it on disk and launch it; a second call at the same
    sizes times nothing."""
    from convdsl.triton import autotune
    from convdsl.triton.families import conv_pool as module

    fam = family("conv_pool")
    tiles = [Tile(64, 32, 32, 1, 1), Tile(16, 16, 16, 1, 1), Tile(32, 16, 16, 1, 1)]
    monkeypatch.setattr(fam, "candidates", lambda *args: list(tiles))
    real_choose = autotune.choose
    monkeypatch.setattr(autotune, "choose", lambda plan, candidates, tensors, run, extra=(): (
        real_choose(plan, candidates, [FakeCudaTensor(t) for t in tensors], run, extra)))
    monkeypatch.setattr(autotune, "device_name", lambda device: "Fake GPU")
    launched, block_ns = [], []

    def timer(fn):
        fn()
        return 1.0 if launched[-1] == tiles[1] else 2.0  # the 16 x 16 tile is fastest

    monkeypatch.setattr(autotune, "TUNER", autotune.Autotuner(tmp_path, timer))
    original = type(fam).launch

    def spy(self, plan, kernel, inputs, params, attrs, config=None):
        launched.append(config)
        return original(self, plan, kernel, inputs, params, attrs, config)

    monkeypatch.setattr(type(fam), "launch", spy)
    real_blocks = module.cached_table_blocks

    def blocks(table, c_in, block_n, device):
        block_ns.append(block_n)
        return real_blocks(table, c_in, block_n, device)

    monkeypatch.setattr(module, "cached_table_blocks", blocks)

    rows = ", ".join("[" + ", ".join(map(str, row)) + "]" for row in TABLE18)
    net = convdsl.compile(f"table T = [{rows}]\nnet A(x: f32[N, 4, 5, 5]) {{\n"
                          "    return avgpool(tanh(conv(x, 18, kernel=2, connect=T)), 2)\n}\n",
                          backend="triton")
    x = torch.randn(2, 4, 5, 5)
    p = {k: v.detach().double() for k, v in net.named_parameters()}
    want = F.avg_pool2d(torch.tanh(ref_conv(x.double(), p["conv.weight"], p["conv.bias"], 2,
                                            (2, 2), connect=True, table=TABLE18)), 2)
    with torch.no_grad():
        close(net(x), want)
    assert launched == [None, *tiles]  # the call, then one timed launch per candidate
    assert block_ns == [32, 16, 16, 16]  # each candidate's BLOCK_N, then the winner's
    (path,) = tmp_path.iterdir()
    (entry,) = json.loads(path.read_text())["entries"].values()
    assert entry["config"]["BLOCK_M"] == 16 and entry["timings_ms"] == [2.0, 1.0, 2.0]
    with torch.no_grad():
        close(net(x), want)
    assert launched == [None, *tiles, None] and block_ns[-1] == 16  # remembered: no timing


def test_table_blocks_are_built_once_per_block_n():
    from convdsl.triton.families.conv import cached_table_blocks, table_blocks

    first = cached_table_blocks(TABLE18, 4, 16, torch.device("cpu"))
    assert cached_table_blocks(TABLE18, 4, 16, "cpu") is first
    other = cached_table_blocks(TABLE18, 4, 32, "cpu")
    assert other is not first and len(other[0]) == 2 and len(first[0]) == 3
    for got, want in zip(first, table_blocks(TABLE18, 4, 16, "cpu")):
        assert torch.equal(got, want)


# -- ahead of time ---------------------------------------------------------------------------

AOT_NETS = {
    "alexnet_f32": """
net A(x: f32[N, 16, H, W]) {
    c = relu(conv(x, 64, kernel=5, pad=2))
    return maxpool(c, 3, stride=2)
}""",
    "digits_bf16": """
net D(x: bf16[N, 64, H, W]) {
    c = relu(conv(x, 128, kernel=3, pad=1, bias=none))
    return maxpool(c, 2)
}""",
    "video_3d_bf16": """
net V(x: bf16[N, 16, 8, H, W]) {
    c = relu(conv(x, 32, kernel=3, pad=1))
    return maxpool(c, 2)
}""",
    "same_symbolic_f32": """
net S(x: f32[N, 16, H, W]) {
    c = relu(conv(x, 32, kernel=3, stride=2, pad=same))
    return maxpool(c, 3, stride=2, pad=same)
}""",
    "lenet_table_f32": """
table T = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [0, 4, 5], [0, 1, 5]]
net L(x: f32[N, 6, H, W]) {
    c = tanh(conv(x, 6, kernel=5, connect=T))
    return avgpool(c, 2)
}""",
}


def stack_bytes(cubin: bytes, name: str, tmp_path) -> int:
    import subprocess

    from convdsl.triton.aot import _cuobjdump

    path = tmp_path / f"{name}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True,
                         text=True, check=False).stdout
    return int(re.search(r"STACK:(\d+)", out).group(1))


def _aot(net_name, tmp_path, training, target="sm_90"):
    from convdsl.triton.aot import compile_program

    net = convdsl.compile(AOT_NETS[net_name], backend="triton")
    program = net._program.training(net) if training else net._program.inference
    reports = compile_program(program, target, tmp_path, {"N": 8, "H": 32, "W": 32})
    ours = [r for r in reports if r.family == "conv_pool"]
    assert len(ours) == 1
    for r in ours:
        print(target, r.name, "registers", r.registers, "spills", r.spills, "shared",
              r.shared_bytes, "flops", r.flops, "bytes", r.bytes)
        assert r.registers is not None and r.spills == 0, r
        assert stack_bytes((tmp_path / f"{r.name}.cubin").read_bytes(), r.name, tmp_path) == 0
        assert r.flops > 0 and r.bytes > 0
    return ours


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("net_name", sorted(AOT_NETS))
def test_aot_without_spills(net_name, training, target, tmp_path):
    _aot(net_name, tmp_path, training, target)
