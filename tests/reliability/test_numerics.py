"""Numerics: property tests over random layer configurations, forward and
backward on both backends, against torch.nn.functional; NaN and Inf
propagate as in PyTorch; f16/bf16 within the tolerances of docs/reliability.md.

The default run is small and derandomized; CONVDSL_PROPERTY_EXAMPLES=N runs
N random configurations per property.
"""
from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import convdsl

LONG = int(os.environ.get("CONVDSL_PROPERTY_EXAMPLES", "0") or 0)
BACKENDS = ["torch", "triton"]
CONV_FN = {1: F.conv1d, 2: F.conv2d}
F32 = {"rtol": 1e-4, "atol": 1e-4}
# Low precision: |got - want| <= atol·max|want| + rtol·|want| (docs/reliability.md).
LOW = {"f16": {"rtol": 1e-2, "atol": 1e-2}, "bf16": {"rtol": 4e-2, "atol": 4e-2}}
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def prop_settings(default: int):
    return settings(max_examples=LONG or default, deadline=None, derandomize=not LONG,
                    database=None, suppress_health_check=list(HealthCheck))


def compile_quiet(src: str, backend: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convdsl.compile(src, backend=backend)


def tup(values) -> str:
    """A .cdsl tuple literal; a one-element tuple needs its trailing comma."""
    values = list(values)
    return "(" + ", ".join(map(str, values)) + ("," if len(values) == 1 else "") + ")"


# -- convolution -----------------------------------------------------------------------------

@st.composite
def conv_configs(draw):
    rank = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 1, 2]))
    table = groups == 1 and draw(st.integers(0, 3)) == 1
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    pad = draw(st.sampled_from(["valid", "same", "full", "int", "pairs"]))
    extents = [r * (k - 1) + 1 for k, r in zip(kernel, dilation)]
    sizes = tuple(draw(st.integers(e, e + 4)) for e in extents)
    pads = draw(st.tuples(*[st.tuples(st.integers(0, 2), st.integers(0, 2))] * rank))
    if pad == "int":
        pads = tuple((pads[0][0], pads[0][0]) for _ in range(rank))
    rows = None
    if table:
        rows = [sorted(draw(st.sets(st.integers(0, c_in - 1), min_size=1, max_size=c_in)))
                for _ in range(c_out)]
    return {"rank": rank, "groups": groups, "rows": rows, "c_in": c_in, "c_out": c_out,
            "kernel": kernel, "stride": stride, "dilation": dilation, "pad": pad, "pads": pads,
            "sizes": sizes, "batch": draw(st.integers(1, 2)),
            "bias": draw(st.sampled_from(["channel", "none"])),
            "flip": draw(st.integers(0, 4)) == 1}


def conv_source(c, dtype="f32") -> str:
    dims = ", ".join(map(str, c["sizes"]))
    pad = {"int": str(c["pads"][0][0]), "pairs": tup(tup(p) for p in c["pads"])}.get(c["pad"],
                                                                                  c["pad"])
    extra = f", connect={c['rows']}" if c["rows"] else f", groups={c['groups']}"
    return (f"net C(x: {dtype}[N, {c['c_in']}, {dims}]) {{\n    return conv(x, {c['c_out']}, "
            f"kernel={tup(c['kernel'])}, stride={tup(c['stride'])}, pad={pad}, "
            f"dilation={tup(c['dilation'])}, bias={c['bias']}, flip={str(c['flip']).lower()}"
            f"{extra})\n}}")


def reference_pads(c) -> list[tuple[int, int]]:
    """LANGUAGE.md's padding rules, written out independently of convdsl.ops."""
    out = []
    for m, k, s, r, pair in zip(c["sizes"], c["kernel"], c["stride"], c["dilation"], c["pads"]):
        extent = r * (k - 1) + 1
        if c["pad"] == "valid":
            out.append((0, 0))
        elif c["pad"] == "full":
            out.append((extent - 1, extent - 1))
        elif c["pad"] == "same":
            total = max((math.ceil(m / s) - 1) * s + extent - m, 0)
            out.append((total // 2, total - total // 2))
        else:
            out.append(tuple(pair))
    return out


def reference_conv(c, x, weight, bias):
    if c["rows"]:
        mask = torch.zeros(c["c_out"], c["c_in"])
        for o, row in enumerate(c["rows"]):
            mask[o, row] = 1
        weight = weight * mask.reshape(mask.shape + (1,) * c["rank"])
    if c["flip"]:
        weight = weight.flip(list(range(2, 2 + c["rank"])))
    flat = [p for pair in reversed(reference_pads(c)) for p in pair]  # F.pad: last dim first
    return CONV_FN[c["rank"]](F.pad(x, flat), weight, bias, stride=c["stride"],
                              dilation=c["dilation"], groups=1 if c["rows"] else c["groups"])


def grads_of(out, seed_out, leaves):
    return torch.autograd.grad((out * seed_out).sum(), leaves, allow_unused=True)


@prop_settings(20)
@given(conv_configs(), st.sampled_from(BACKENDS))
def test_conv_forward_and_backward_match_torch(c, backend):
    net = compile_quiet(conv_source(c), backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(c["batch"], c["c_in"], *c["sizes"], generator=gen, requires_grad=True)
    params = dict(net.named_parameters())
    weight, bias = params["conv.weight"], params.get("conv.bias")
    ref_w = weight.detach().clone().requires_grad_(True)
    ref_b = None if bias is None else bias.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    got, want = net(x), reference_conv(c, ref_x, ref_w, ref_b)
    torch.testing.assert_close(got, want, **F32)
    seed = torch.randn(want.shape, generator=gen)
    leaves = [x, weight] + ([bias] if bias is not None else [])
    ref_leaves = [ref_x, ref_w] + ([ref_b] if ref_b is not None else [])
    got_grads = grads_of(got, seed, leaves)
    want_grads = grads_of(want, seed, ref_leaves)
    if c["rows"]:  # absent connections are not parameters: held at zero, no gradient
        mask = (weight.detach() != 0) | (ref_w.detach() != 0)
        want_grads = (want_grads[0], want_grads[1] * mask, *want_grads[2:])
        got_grads = (got_grads[0], got_grads[1] * mask, *got_grads[2:])
    for name, a, b in zip(["x", "weight", "bias"], got_grads, want_grads):
        torch.testing.assert_close(a, b, **F32, msg=lambda m, n=name: f"d{n}: {m}")


# -- pooling ---------------------------------------------------------------------------------

@st.composite
def pool_configs(draw):
    rank = draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["maxpool", "avgpool", "lppool"]))
    adaptive = draw(st.integers(0, 3)) == 0
    window = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    pad = tuple(draw(st.integers(0, k - 1)) if kind != "lppool" else 0 for k in window)
    sizes = tuple(draw(st.integers(max(k - 2 * p, 1), 7)) for k, p in zip(window, pad))
    output = tuple(draw(st.integers(1, m)) for m in sizes)
    return {"rank": rank, "kind": kind, "adaptive": adaptive, "window": window,
            "stride": stride, "pad": pad, "sizes": sizes, "output": output,
            "channels": draw(st.integers(1, 3)), "batch": draw(st.integers(1, 2)),
            "p": draw(st.sampled_from([1.0, 2.0, 3.0]))}


def pool_source(c) -> str:
    dims = ", ".join(map(str, c["sizes"]))
    if c["adaptive"]:
        args = f"output={tup(c['output'])}"
    else:
        args = f"{tup(c['window'])}, stride={tup(c['stride'])}"
        if c["kind"] != "lppool":
            args += f", pad={tup(c['pad'])}"
    if c["kind"] == "lppool":
        args += f", p={c['p']}"
    return f"net P(x: f32[N, {c['channels']}, {dims}]) {{\n    return {c['kind']}(x, {args})\n}}"


def reference_pool(c, x):
    d = c["rank"]
    if c["adaptive"]:
        fn = {"maxpool": F.adaptive_max_pool1d if d == 1 else F.adaptive_max_pool2d,
              "avgpool": F.adaptive_avg_pool1d if d == 1 else F.adaptive_avg_pool2d}
        if c["kind"] in fn:
            return fn[c["kind"]](x, c["output"])
        # Lp over the adaptive cells: (mean |x|^p · cell size)^(1/p), cell by cell.
        return adaptive_lp(x, c["output"], c["p"])
    flat = [p for p in reversed(c["pad"]) for _ in range(2)]
    if c["kind"] == "maxpool":
        pool = F.max_pool1d if d == 1 else F.max_pool2d
        return pool(F.pad(x, flat, value=-math.inf), c["window"], c["stride"])
    pool = F.avg_pool1d if d == 1 else F.avg_pool2d
    if c["kind"] == "avgpool":  # the mean over real inputs: padding is not counted
        total = pool(F.pad(x, flat), c["window"], c["stride"])
        count = pool(F.pad(torch.ones_like(x), flat), c["window"], c["stride"])
        return total / count
    cells = math.prod(c["window"])
    return (pool(x.abs() ** c["p"], c["window"], c["stride"]) * cells) ** (1 / c["p"])


def adaptive_lp(x, output, p):
    sizes = x.shape[2:]
    out = torch.empty(*x.shape[:2], *output, dtype=x.dtype)
    for index in torch.cartesian_prod(*[torch.arange(o) for o in output]).reshape(
            -1, len(output)).tolist():
        region = tuple(slice(i * m // o, -(-(i + 1) * m // o)) for i, m, o in
                       zip(index, sizes, output))
        out[(..., *index)] = (x[(..., *region)].abs() ** p).flatten(2).sum(-1) ** (1 / p)
    return out


@prop_settings(20)
@given(pool_configs(), st.sampled_from(BACKENDS))
def test_pooling_forward_and_backward_match_torch(c, backend):
    net = compile_quiet(pool_source(c), backend)
    gen = torch.Generator().manual_seed(1)
    # Distinct values: max pooling's gradient goes to one clear winner; none is 0,
    # where the gradient of Lp pooling is a convention (0 in convdsl, NaN in autograd).
    base = torch.randperm(c["batch"] * c["channels"] * math.prod(c["sizes"]), generator=gen)
    x = (base.float() / 7 - 3 + 1 / 14).reshape(c["batch"], c["channels"], *c["sizes"])
    x, ref_x = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got, want = net(x), reference_pool(c, ref_x)
    torch.testing.assert_close(got, want, **F32)
    seed = torch.randn(want.shape, generator=gen)
    torch.testing.assert_close(grads_of(got, seed, [x])[0], grads_of(want, seed, [ref_x])[0],
                               **F32)


# -- low precision ---------------------------------------------------------------------------

def assert_within(got: torch.Tensor, want: torch.Tensor, dtype: str) -> None:
    tol = LOW[dtype]
    scale = want.abs().max().item() or 1.0
    err = (got.double() - want.double()).abs()
    bound = tol["atol"] * scale + tol["rtol"] * want.double().abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{dtype}: error {err.max().item():.3g} beyond tolerance (scale {scale:.3g})"


@prop_settings(12)
@given(conv_configs(), st.sampled_from(["f16", "bf16"]), st.sampled_from(BACKENDS))
def test_low_precision_conv_within_documented_tolerance(c, dtype, backend):
    net = compile_quiet(conv_source(c, dtype), backend)
    x = torch.randn(c["batch"], c["c_in"], *c["sizes"], generator=torch.Generator().manual_seed(2))
    x = x.to(TORCH_DTYPE[dtype])
    params = dict(net.named_parameters())
    # The reference: the same rounded inputs and parameters, in float64.
    bias = params.get("conv.bias")
    want = reference_conv(c, x.double(), params["conv.weight"].detach().to(TORCH_DTYPE[dtype])
                          .double(), None if bias is None else bias.detach().double())
    got = net(x)
    assert got.dtype == TORCH_DTYPE[dtype]
    assert_within(got, want, dtype)


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_net_within_documented_tolerance(dtype, backend):
    src = f"""net L(x: {dtype}[N, 3, 8, 8]) {{
        h = relu(conv(x, 8, kernel=3, pad=same))
        h = avgpool(maxpool(h, 2), output=2)
        return softmax(dense(flatten(h), 5))
    }}"""
    net = compile_quiet(src, backend)
    ref = compile_quiet(src.replace(dtype, "f32"), "torch")
    rounded = {k: v.to(TORCH_DTYPE[dtype]).float() for k, v in net.state_dict().items()}
    ref.load_state_dict(rounded)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)).to(TORCH_DTYPE[dtype])
    assert_within(net(x), ref(x.float()), dtype)


# -- NaN and Inf -----------------------------------------------------------------------------

SPECIAL = [math.nan, math.inf, -math.inf]


def special_input(value: float, where: tuple) -> torch.Tensor:
    x = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(4))
    x[where] = value
    return x


NAN_CASES = {
    "maxpool": ("maxpool(x, 2)", lambda x, p: F.max_pool2d(x, 2)),
    "maxpool-overlap": ("maxpool(x, 3, stride=1, pad=1)",
                        lambda x, p: F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=-math.inf), 3, 1)),
    "avgpool": ("avgpool(x, 2)", lambda x, p: F.avg_pool2d(x, 2)),
    "adaptive-max": ("maxpool(x, output=(2, 4))", lambda x, p: F.adaptive_max_pool2d(x, (2, 4))),
    "relu": ("relu(x)", lambda x, p: F.relu(x)),
    "softmax": ("softmax(x)", lambda x, p: torch.softmax(x, dim=1)),
    "maxout": ("maxout(x, pieces=2)", lambda x, p: x.max(dim=1, keepdim=True).values),
    "conv": ("conv(x, 2, kernel=3)", lambda x, p: F.conv2d(x, p["conv.weight"], p["conv.bias"])),
}


@pytest.mark.parametrize("value", SPECIAL, ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", sorted(NAN_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_as_in_pytorch(backend, case, value):
    expr, reference = NAN_CASES[case]
    net = compile_quiet(f"net S(x: f32[N, 2, 6, 6]) {{\n    return {expr}\n}}", backend)
    params = {k: v.detach() for k, v in net.named_parameters()}
    for where in [(0, 0, 2, 3), (0, 1, 5, 5), (0, 0, 0, 0)]:
        x = special_input(value, where)
        with torch.no_grad():
            torch.testing.assert_close(net(x), reference(x, params), equal_nan=True, **F32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_pooling_gradient_flows_to_the_nan_as_in_pytorch(backend):
    net = compile_quiet("net S(x: f32[N, 2, 6, 6]) {\n    return maxpool(x, 2)\n}", backend)
    x = special_input(math.nan, (0, 0, 2, 3)).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    net(x).sum().backward()
    F.max_pool2d(ref_x, 2).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, equal_nan=True)


ACTIVATIONS_AT_NAN = {
    "relu": ("relu(x)", F.relu),
    "leaky_relu": ("leaky_relu(x, 0.1)", lambda x: F.leaky_relu(x, 0.1)),
    "tanh": ("tanh(x)", torch.tanh),
    "sigmoid": ("sigmoid(x)", torch.sigmoid),
}


@pytest.mark.parametrize("case", sorted(ACTIVATIONS_AT_NAN))
@pytest.mark.parametrize("backend", BACKENDS)
def test_activation_gradient_at_nan_as_in_pytorch(backend, case):
    """PyTorch's relu backward passes dy through at a NaN input (it tests
    `y <= 0`); so must ours. (elu is left out: PyTorch's own CPU kernels give
    dy or NaN there depending on alpha.)"""
    expr, reference = ACTIVATIONS_AT_NAN[case]
    net = compile_quiet(f"net S(x: f32[N, 2, 6, 6]) {{\n    return {expr}\n}}", backend)
    x = special_input(math.nan, (0, 0, 2, 3)).requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    seed = torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(5))
    (net(x) * seed).sum().backward()
    (reference(ref_x) * seed).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, equal_nan=True, **F32)
