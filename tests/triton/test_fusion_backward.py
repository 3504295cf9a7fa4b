"""Backward epilogue fusion in the conv_dx and dense_dx kernel families.

In a backward graph the input gradient of a conv or dense layer meets the
previous layer's activation derivative (`_relu_dx(dx, saved)`, `_tanh_dx`, ...);
the fuse-backward-epilogue pass (passes/fusion.py) makes them one `_fused` node,
conv_dx+relu_dx / dense_dx+relu_dx, and the dx kernel applies the derivative to
its fp32 sum before the one store, reading the saved forward value at dx's
own offsets (families/epilogue.py).

Each net runs under Triton's interpreter, forward (inference variant under
no_grad, training variant with grad) and backward (the input and every
parameter gradient of a random projection), against
  - an independent reference written with torch.nn.functional ops in float64, and
  - the same net lowered unfused (optimize=False),
and its backward program runs fewer kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.ir import ValueRef
from convdsl.ir.types import symbol
from convdsl.triton.families import conv_grad, dense_grad, family
from convdsl.triton.families.conv import Tile
from convdsl.triton.families.epilogue import epilogue_of, epilogue_signature
from convdsl.triton.loader import load_kernel

from ..reference import conv_by_torch, conv_table_loop, outer_kernel

TABLE = ((0, 1), (1, 2), (2, 3), (0, 3), (0, 1, 2, 3), (1,))  # 6 outputs over 4 inputs
TABLE_SRC = "table T = [[0, 1], [1, 2], [2, 3], [0, 3], [0, 1, 2, 3], [1]]\n"


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes: intra-op threads only add latency on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles, so the small tensors straddle block boundaries."""
    monkeypatch.setattr(family("conv_dx"), "cpu_tile", Tile(16, 16, 16, 1, 1))
    monkeypatch.setitem(family("conv_dx").DIRECT, "cpu", [(16, 16)])
    monkeypatch.setitem(family("dense_dx").CONFIGS, "cpu", [Tile(16, 16, 16, 1, 1)])


# -- independent references (tests/reference.py) ----------------------------------------------

def conv(x, p, name, stride=1, pad=0, groups=1, connect=None, separable=False):
    """The layer `name = conv(x, ...)`: F.conv on a padded input, the loop over a
    connection table's rows, the factors' outer product for separable."""
    rank = x.dim() - 2
    if separable:
        w = outer_kernel([p[f"{name}.weight_{d}"] for d in range(rank)])
    else:
        w = p[f"{name}.weight"]
    b = p.get(f"{name}.bias")
    if connect is not None:
        return conv_table_loop(x, w, connect, b, stride=stride, pad=pad)
    return conv_by_torch(x, w, b, stride=stride, pad=pad, groups=groups)


def dense(x, p, name):
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


def net_source(args: str, body: str, head: str = "") -> str:
    return f"{head}net A({args}) {{\n{body}\n}}\n"


# name -> (source, input shape, reference(x, p), the fused kernels' family, the
# activation derivatives fused into it: one fused kernel per entry)
CASES = {
    "conv-relu-conv": (
        net_source("x: f32[N, 3, 7, 6]",
                   "    h = relu(conv(x, 4, kernel=3, pad=1, name=\"a\"))\n"
                   "    return conv(h, 5, kernel=3, pad=1, name=\"b\")"),
        (2, 3, 7, 6),
        lambda x, p: conv(F.relu(conv(x, p, "a", pad=1)), p, "b", pad=1),
        "conv_dx", ["relu_dx"]),
    # stride 2: positions no tap reaches get dx = 0, the derivative still applies
    "conv-tanh-conv-stride2": (
        net_source("x: f32[N, 3, 9, 8]",
                   "    h = tanh(conv(x, 4, kernel=3, pad=1, name=\"a\"))\n"
                   "    return conv(h, 5, kernel=3, stride=2, pad=1, name=\"b\")"),
        (2, 3, 9, 8),
        lambda x, p: conv(torch.tanh(conv(x, p, "a", pad=1)), p, "b", stride=2, pad=1),
        "conv_dx", ["tanh_dx"]),
    "conv-sigmoid-conv-groups": (
        net_source("x: f32[N, 4, 6, 7]",
                   "    h = sigmoid(conv(x, 6, kernel=3, pad=1, name=\"a\"))\n"
                   "    return conv(h, 4, kernel=3, stride=(2, 1), groups=2, pad=1, name=\"b\")"),
        (2, 4, 6, 7),
        lambda x, p: conv(torch.sigmoid(conv(x, p, "a", pad=1)), p, "b", stride=(2, 1),
                          pad=1, groups=2),
        "conv_dx", ["sigmoid_dx"]),
    # a connection table: the dx kernel visits each channel block's union of outputs
    "conv-relu-conv-table": (
        net_source("x: f32[N, 3, 7, 6]",
                   "    h = relu(conv(x, 4, kernel=3, pad=1, name=\"a\"))\n"
                   "    return conv(h, 6, kernel=3, stride=2, connect=T, pad=1, name=\"b\")",
                   TABLE_SRC),
        (2, 3, 7, 6),
        lambda x, p: conv(F.relu(conv(x, p, "a", pad=1)), p, "b", stride=2, pad=1,
                          connect=TABLE),
        "conv_dx", ["relu_dx"]),
    # elu's derivative reads its input: the forward's training kernel keeps it
    "conv-elu-depthwise": (
        net_source("x: f32[N, 3, 7, 6]",
                   "    h = elu(conv(x, 4, kernel=3, pad=1, name=\"a\"), alpha=0.7)\n"
                   "    return depthwise(h, kernel=3, multiplier=2, stride=2, pad=1, name=\"b\")"),
        (2, 3, 7, 6),
        lambda x, p: conv(F.elu(conv(x, p, "a", pad=1), 0.7), p, "b", stride=2, pad=1,
                          groups=4),
        "conv_dx", ["elu_dx"]),
    "conv-softplus-separable": (
        net_source("x: f32[N, 3, 7, 6]",
                   "    h = softplus(conv(x, 4, kernel=3, pad=1, name=\"a\"))\n"
                   "    return conv(h, 5, kernel=(3, 2), separable=true, pad=1, name=\"b\")"),
        (2, 3, 7, 6),
        lambda x, p: conv(F.softplus(conv(x, p, "a", pad=1)), p, "b", pad=1, separable=True),
        "conv_dx", ["softplus_dx"]),
    "conv1d-leaky-conv1d-stride2": (
        net_source("x: f32[N, 3, 11]",
                   "    h = leaky_relu(conv(x, 4, kernel=3, pad=1, name=\"a\"), slope=0.2)\n"
                   "    return conv(h, 5, kernel=3, stride=2, pad=1, name=\"b\")"),
        (2, 3, 11),
        lambda x, p: conv(F.leaky_relu(conv(x, p, "a", pad=1), 0.2), p, "b", stride=2, pad=1),
        "conv_dx", ["leaky_relu_dx"]),
    "dense-relu-dense": (
        net_source("x: f32[N, 7]",
                   "    h = relu(dense(x, 9, name=\"a\"))\n    return dense(h, 5, name=\"b\")"),
        (3, 7),
        lambda x, p: dense(F.relu(dense(x, p, "a")), p, "b"),
        "dense_dx", ["relu_dx"]),
    # two derivatives: both dense_dx kernels fuse one
    "dense-tanh-dense-elu-dense": (
        net_source("x: f32[N, 6]",
                   "    h = tanh(dense(x, 8, name=\"a\"))\n"
                   "    g = elu(dense(h, 7, name=\"b\"))\n    return dense(g, 4, name=\"c\")"),
        (5, 6),
        lambda x, p: dense(F.elu(dense(torch.tanh(dense(x, p, "a")), p, "b")), p, "c"),
        "dense_dx", ["elu_dx", "tanh_dx"]),
}
SLOW_CASES = {
    "conv3d-relu-conv3d-stride2": (
        net_source("x: f32[N, 2, 5, 4, 5]",
                   "    h = relu(conv(x, 3, kernel=3, pad=1, name=\"a\"))\n"
                   "    return conv(h, 4, kernel=(3, 2, 3), stride=(2, 1, 2), pad=1, name=\"b\")"),
        (1, 2, 5, 4, 5),
        lambda x, p: conv(F.relu(conv(x, p, "a", pad=1)), p, "b", stride=(2, 1, 2), pad=1),
        "conv_dx", ["relu_dx"]),
}


# -- helpers -------------------------------------------------------------------------------------

def randomize(net, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    values = {}
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            values[name] = p.detach().clone()
    return values


def pair(src: str):
    """The fused and the unfused (optimize=False) triton nets, equal random parameters."""
    fused = convdsl.compile(src, backend="triton")
    plain = convdsl.compile(src, backend="triton", optimize=False)
    values = randomize(fused, seed=3)
    assert randomize(plain, seed=3).keys() == values.keys()
    return fused, plain, values


def projection(y: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(y.shape, generator=g, dtype=torch.float64)


def run_with_grad(net, x: torch.Tensor, x_grad: bool = True):
    """Output and every gradient (input and parameters) of <net(x), projection>."""
    for p in net.parameters():
        p.grad = None
    leaf = x.clone().requires_grad_(x_grad)
    y = net(leaf)
    (y.double() * projection(y)).sum().backward()
    grads = {k: p.grad for k, p in net.named_parameters()}
    if x_grad:
        grads["input"] = leaf.grad
    return y.detach(), grads


def reference_with_grad(reference, x: torch.Tensor, params: dict, x_grad: bool = True):
    """The F.* reference in float64 with autograd: output and gradients."""
    leaf = x.double().requires_grad_(x_grad)
    p = {k: v.double().requires_grad_(True) for k, v in params.items()}
    y = reference(leaf, p)
    (y * projection(y)).sum().backward()
    grads = {k: v.grad for k, v in p.items()}
    if x_grad:
        grads["input"] = leaf.grad
    return y.detach(), grads


def close(actual, expected, what="", tol=1e-4):
    assert actual is not None, f"{what}: no gradient"
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    expected = expected.double()
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale,
                               msg=lambda m: f"{what}: {m}")


def backward(net, with_grad: tuple):
    """(graph, kernel plans) of the backward program for inputs `with_grad`."""
    program = net._program.backward_program(net, with_grad)[1]
    return program.graph, [p for p in program.plans if p.source]


def fused_dx(net, with_grad: tuple, fam: str) -> list:
    graph, plans = backward(net, with_grad)
    return [p for p in plans if p.family == fam and graph.node(p.nodes[0]).op == "_fused"]


def check(name: str, case) -> None:
    src, shape, reference, fam, derivatives = case
    fused, plain, params = pair(src)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))

    # The backward programs: each derivative fused into a dx kernel, fewer kernels.
    for with_grad in ((), ("x",)):
        graph, plans = backward(fused, with_grad)
        _, plain_plans = backward(plain, with_grad)
        assert len(plans) == len(plain_plans) - len(derivatives), (with_grad, [
            p.name for p in plans], [p.name for p in plain_plans])
        mine = fused_dx(fused, with_grad, fam)
        assert sorted(d for p in mine for d in derivatives if d in p.name) == sorted(derivatives)
        for plan in mine:
            node = graph.node(plan.nodes[0])
            assert node.attrs["pattern"].split("+")[0] == fam
            assert len(plan.inputs) == 2 and len(plan.outputs) == 1  # dy, saved; dx
            assert "saving" not in plan.name  # a backward graph keeps nothing for later
            assert f"def {plan.name}(" in plan.source
        assert not any(d in p.name for p in plans if p.family == "elementwise"
                       for d in derivatives)
        assert sum(p.family == "elementwise" for p in plain_plans) >= len(derivatives)

    # Inference variant (no_grad: nothing stored), forward only.
    want, want_grads = reference_with_grad(reference, x, params)
    with torch.no_grad():
        got, unfused = fused(x), plain(x)
    close(got, want, "inference")
    close(got, unfused, "inference vs unfused")

    # Training variant, and the backward pass with and without the input's gradient.
    y, grads = run_with_grad(fused, x)
    y_plain, grads_plain = run_with_grad(plain, x)
    close(y, want, "training")
    close(y, y_plain, "training vs unfused")
    assert grads.keys() == want_grads.keys() == grads_plain.keys()
    for key in want_grads:
        close(grads[key], want_grads[key], f"d/d {key}")
        close(grads[key], grads_plain[key], f"d/d {key} vs unfused")
    _, grads = run_with_grad(fused, x, x_grad=False)
    _, want_grads = reference_with_grad(reference, x, params, x_grad=False)
    for key in want_grads:
        close(grads[key], want_grads[key], f"d/d {key} (no input gradient)")


# -- the fused patterns -------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_backward_epilogue(name):
    check(name, CASES[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_CASES))
def test_backward_epilogue_slow(name):
    check(name, SLOW_CASES[name])


def test_block_boundaries_int64_packed(small_tiles, monkeypatch):
    """16-wide tiles: masked rows and columns of dx and of the saved value; with
    int64 offsets and the GPU's packed weight layout forced on here too."""
    monkeypatch.setattr(conv_grad, "needs_int64", lambda *t: True)
    monkeypatch.setattr(dense_grad, "needs_int64", lambda *t: True)
    monkeypatch.setitem(family("conv_dx").pack_weights, "cpu", True)
    src = net_source("x: f32[N, 20, 5, 7]",
                     "    h = relu(conv(x, 18, kernel=1, name=\"a\"))\n"
                     "    return conv(h, 17, kernel=3, pad=1, name=\"b\")")
    reference = lambda x, p: conv(F.relu(conv(x, p, "a")), p, "b", pad=1)
    check("boundaries", (src, (1, 20, 5, 7), reference, "conv_dx", ["relu_dx"]))
    src = net_source("x: f32[N, 18]",
                     "    h = sigmoid(dense(x, 20, name=\"a\"))\n    return dense(h, 17, name=\"b\")")
    reference = lambda x, p: dense(torch.sigmoid(dense(x, p, "a")), p, "b")
    check("boundaries", (src, (19, 18), reference, "dense_dx", ["sigmoid_dx"]))


def test_saved_value_layout_is_dx_layout(monkeypatch):
    """A channels-last input makes channels-last saved values: dx takes their
    layout, so one offset expression addresses both."""
    src, shape, reference, fam, _ = CASES["conv-relu-conv"]
    fused, _, params = pair(src)
    calls = spy_launches(monkeypatch, fam)
    x = torch.randn(shape).to(memory_format=torch.channels_last)
    _, grads = run_with_grad(fused, x)
    _, want = reference_with_grad(reference, x, params)
    for key in want:
        close(grads[key], want[key], f"d/d {key}")
    (_, inputs, _, _, outputs) = next(c for c in calls if c[0].meta["residuals"])
    saved, (dx,) = inputs[1], outputs
    assert saved.is_contiguous(memory_format=torch.channels_last) and not saved.is_contiguous()
    assert dx.stride() == saved.stride()


def test_f16():
    """A half-precision net: the derivative in fp32, dx stored in f16."""
    src = net_source("x: f16[N, 3, 7, 6]",
                     "    h = tanh(conv(x, 4, kernel=3, pad=1, name=\"a\"))\n"
                     "    return conv(h, 5, kernel=3, stride=2, pad=1, name=\"b\")")
    fused, _, params = pair(src)
    x = torch.randn(2, 3, 7, 6).half()
    assert fused_dx(fused, ("x",), "conv_dx")
    _, grads = run_with_grad(fused, x)
    half = {k: v.half().double() for k, v in params.items()}
    _, want = reference_with_grad(
        lambda x, p: CASES["conv-tanh-conv-stride2"][2](x, p), x.double(), half)
    assert grads["input"].dtype == torch.float16
    for key in want:
        close(grads[key], want[key], f"d/d {key}", tol=2e-2)


# -- kept intermediates, cost, names ---------------------------------------------------------------

def spy_launches(monkeypatch, fam: str) -> list:
    """Record every launch of a family: (plan, inputs, params, attrs, outputs)."""
    calls = []
    cls = type(family(fam))
    original = cls.launch

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        outputs = original(self, plan, kernel, inputs, params, attrs, config)
        calls.append((plan, list(inputs), params, attrs, outputs))
        return outputs

    monkeypatch.setattr(cls, "launch", launch)
    return calls


@pytest.mark.parametrize("name", ["conv-tanh-conv-stride2", "dense-relu-dense"])
def test_kept_intermediate(name, monkeypatch):
    """Were the raw dx (the fused node's result 1) saved, the same kernel stores
    it too: a training-variant plan of the backward node, launched on the
    tensors the real backward pass used."""
    src, shape, _, fam, _ = CASES[name]
    fused, _, _ = pair(src)
    calls = spy_launches(monkeypatch, fam)
    run_with_grad(fused, torch.randn(shape))
    graph, _ = backward(fused, ("x",))
    (plan, inputs, params, attrs, _) = next(c for c in calls if c[0].meta["residuals"])
    node = graph.node(plan.nodes[0])
    graph = graph.copy()
    graph.saved_for_backward = frozenset({ValueRef(node.id, 1)})
    saving = family(fam).plan(graph, [graph.node(node.id)])
    assert "saving" in saving.name and saving.name != plan.name
    assert saving.outputs == (ValueRef(node.id, 0), ValueRef(node.id, 1))
    kernel = load_kernel(saving.source, saving.name)
    dx, raw = family(fam).launch(saving, kernel, inputs, params, attrs)
    (plain,) = family(fam).launch(plan, load_kernel(plan.source, plan.name), inputs, params,
                                  attrs)
    torch.testing.assert_close(dx, plain, rtol=0, atol=0)
    # the raw dx: the transpose of the layer applied to dy, before the derivative
    (weight,) = [v.detach() for k, v in params[node.id].items() if k.endswith("weight")]
    dy, saved = inputs
    if fam == "dense_dx":
        want = dy.double() @ weight.double()
    else:
        want = torch.nn.grad.conv2d_input(tuple(saved.shape), weight.double(), dy.double(),
                                          stride=2, padding=1)
    close(raw, want, "kept raw dx")
    assert raw.stride() == dx.stride()


def test_cost_counts_the_fused_kernel():
    """FLOPs: the GEMM's plus one per dx element for the derivative; bytes: the
    dx kernel's plus the saved value read, and the elementwise kernel's traffic
    (dx and the saved value read, the product written) is gone."""
    env = {symbol("N"): 4}
    for name, fam, n_dx in (("conv-tanh-conv-stride2", "conv_dx", 4 * 4 * 9 * 8),
                            ("dense-relu-dense", "dense_dx", 4 * 9)):
        src, *_ = CASES[name]
        fused, plain, _ = pair(src)
        graph, _ = backward(fused, ())
        plain_graph, plain_plans = backward(plain, ())
        (plan,) = fused_dx(fused, (), fam)
        (plan0,) = [p for p in plain_plans if p.family == fam]
        (chain,) = [p for p in plain_plans if p.family == "elementwise"]
        flops, nbytes = family(fam).cost(plan, graph, env)
        flops0, nbytes0 = family(fam).cost(plan0, plain_graph, env)
        chain_bytes = family("elementwise").cost(chain, plain_graph, env)[1]
        assert flops == flops0 + n_dx, name
        assert nbytes == nbytes0 + 4 * n_dx, name  # the saved value, read once
        assert nbytes < nbytes0 + chain_bytes, name
        assert chain_bytes - (nbytes - nbytes0) == 2 * 4 * n_dx  # dx: stored, read back


def test_names_are_deterministic_and_safe():
    src = net_source("x: f32[N, 3, 6, 6]",
                     "    lambda = relu(conv(x, 4, kernel=3, name=\"def\"))\n"
                     "    return conv(lambda, 2, kernel=3, name=\"tl\")")
    sources = []
    for _ in range(2):
        net = convdsl.compile(src, backend="triton")
        (plan,) = fused_dx(net, (), "conv_dx")
        sources.append((plan.name, plan.source))
    assert sources[0] == sources[1]
    name, source = sources[0]
    assert name.startswith("k_conv_dx_2d_relu_dx_") and "def def" not in source


# -- ahead of time --------------------------------------------------------------------------------

AOT_NETS = {
    "f32": net_source("x: f32[N, 16, 8, 8], z: f32[N, 32]", """\
    h = relu(conv(x, 32, kernel=3, pad=1, name="a"))
    u = tanh(conv(h, 32, kernel=3, stride=2, pad=1, name="f"))
    d = sigmoid(depthwise(u, kernel=3, pad=1, name="b"))
    g = relu(dense(z, 64, name="e"))
    return conv(d, 12, kernel=3, connect=T, pad=1, name="c"), dense(g, 8, name="k")""",
                      "table T = [[0, 1], [1, 2], [2, 3], [3, 4], [4, 5], [5, 6], [6, 7], "
                      "[7, 8], [8, 9], [9, 10], [10, 11], [0, 11]]\n"),
    "bf16": net_source("x: bf16[N, 16, 8, 8], z: bf16[N, 32]", """\
    h = relu(conv(x, 32, kernel=3, pad=1, name="a"))
    g = elu(dense(z, 64, name="e"))
    return conv(h, 16, kernel=3, stride=2, pad=1, name="f"), dense(g, 8, name="k")"""),
}


def aot_plans(dtype: str):
    net = convdsl.compile(AOT_NETS[dtype], backend="triton")
    graph, plans = backward(net, ("x", "z"))
    return [(p, graph) for p in plans if p.family in ("conv_dx", "dense_dx")
            and graph.node(p.nodes[0]).op == "_fused"]


def test_aot_signature_matches_kernel_arguments():
    found = aot_plans("f32")
    assert {p.family for p, _ in found} == {"conv_dx", "dense_dx"}
    assert any(p.meta.get("direct") for p, _ in found)  # the depthwise dx
    for plan, graph in found:
        signature, constexprs = family(plan.family).aot(plan, graph)[:2]
        ep = epilogue_of(graph, graph.node(plan.nodes[0]))
        assert epilogue_signature(ep, signature["dx_ptr"]).items() <= signature.items()
        kernel = load_kernel(plan.source, plan.name, interpret=True)
        runtime = [k for k, v in signature.items() if v != "constexpr"]
        assert runtime == [a for a in kernel.arg_names if a not in constexprs], plan.name
        assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", sorted(AOT_NETS))
def test_aot_fused_dx_compiles_without_spills(dtype, tmp_path):
    """Fused dx kernels (implicit GEMM, direct, table; dense) compile for sm_90
    without spills."""
    from convdsl.triton.aot import compile_many, plan_jobs, resource_usage

    found = aot_plans(dtype)
    jobs = [job for plan, graph in found for job in plan_jobs(plan, graph)]
    names = [j["name"] for j in jobs]
    assert any("conv_dx" in n for n in names) and any("dense_dx" in n for n in names), names
    results = compile_many(jobs, 90, progress=False)
    for job, result in zip(jobs, results):
        registers, spills = resource_usage(result["cubin"], job["name"], tmp_path)
        print(dtype, job["name"], "registers", registers, "spills", spills)
        assert registers is not None and spills == 0, (job["name"], registers, spills)
