"""Epilogue fusion in the conv, dense, depthwise and separable kernel families.

A fused node [anchor, elementwise steps...] (passes/fusion.py, fuse-epilogue)
runs as one kernel: the anchor's accumulator goes through the activations,
`+`/`-` a residual operand and scalar arithmetic before the one store, and the
training variant also stores the intermediates the backward pass reads.

Each pattern is checked under Triton's interpreter, forward (inference variant
under no_grad, training variant with grad) and backward (input and every
parameter gradient of a random projection), against
  - an independent reference written with torch.nn.functional ops, and
  - the same net lowered unfused (optimize=False),
and the fused net runs fewer kernels.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.ir.types import symbol
from convdsl.ops import OPS
from convdsl.triton.families import family

from ..reference import outer_kernel

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
TOL = {"f32": 1e-4, "f16": 2e-2, "bf16": 5e-2}  # relative to the largest reference value


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes: intra-op threads only add latency on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- independent references (torch.nn.functional only) ---------------------------------------

def conv2d(x, p, name, pad=0, groups=1, stride=1):
    return F.conv2d(x, p[f"{name}.weight"], p.get(f"{name}.bias"), stride, pad, 1, groups)


def separable2d(x, p, name, pad=0, groups=1):
    """A separable=true conv: kernel[o, c] = weight_0[o, c] (H) ⊗ weight_1[o, c] (W)."""
    w = outer_kernel([p[f"{name}.weight_0"], p[f"{name}.weight_1"]])
    return F.conv2d(x, w, p.get(f"{name}.bias"), 1, pad, 1, groups)


def dense(x, p, name):
    return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias"))


# Each case: source, input shapes, the reference, and the families its fused
# kernels come from (one fused kernel per entry).
CASES = {
    "conv+relu": (
        """net A(x: f32[N, 3, 7, 6]) {
    c = relu(conv(x, 5, kernel=3, pad=same))
    return c
}""", [(2, 3, 7, 6)],
        lambda x, p: F.relu(conv2d(x, p, "c", pad=1)),
        ["conv"]),
    # examples/recurrent_labels.cdsl: relu(conv(image) + conv(labels)), the second a residual
    "conv+add+relu": (
        """net A(image: f32[N, 3, 6, 7], labels: f32[N, 4, 6, 7]) {
    h = relu(conv(image, 6, kernel=3, pad=same, name="U")
             + conv(labels, 6, kernel=3, pad=same, bias=none, name="W"))
    return conv(h, 2, kernel=1, name="V")
}""", [(2, 3, 6, 7), (2, 4, 6, 7)],
        lambda image, labels, p: conv2d(
            F.relu(conv2d(image, p, "U", pad=1) + conv2d(labels, p, "W", pad=1)), p, "V"),
        ["conv"]),
    # elu's gradient reads its input: the training kernel stores the conv output too
    "conv+scalar+elu (keeps)": (
        """net A(x: f32[N, 4, 9]) {
    c = conv(x, 6, kernel=3, stride=2, pad=same)
    return elu(c * 0.5, alpha=0.7)
}""", [(2, 4, 9)],
        lambda x, p: F.elu(F.conv1d(x, p["c.weight"], p["c.bias"], 2, 1) * 0.5, alpha=0.7),
        ["conv"]),
    "conv3d+softplus+sub (keeps)": (
        """net A(x: f32[N, 2, 4, 5, 4], r: f32[N, 3, 4, 5, 4]) {
    c = conv(x, 3, kernel=(2, 3, 3), pad=same, bias=location)
    return softplus(c) - r
}""", [(2, 2, 4, 5, 4), (2, 3, 4, 5, 4)],
        lambda x, r, p: F.softplus(F.conv3d(F.pad(x, (1, 1, 1, 1, 0, 1)), p["c.weight"])
                                   + p["c.bias"]) - r,
        ["conv"]),
    "conv(table)+tanh": (
        """table T = [[0, 1], [1, 2], [0, 2], [0, 1, 2]]
net A(x: f32[N, 3, 6, 6]) {
    return tanh(conv(x, 4, kernel=3, connect=T))
}""", [(2, 3, 6, 6)],
        lambda x, p: torch.tanh(F.conv2d(
            x, p["conv.weight"] * torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 1, 1]],
                                               dtype=x.dtype)[:, :, None, None],
            p["conv.bias"])),
        ["conv"]),
    "dense+relu": (
        """net A(x: f32[N, 3, 4, 4]) {
    d = relu(dense(flatten(x), 20))
    return dense(d, 5)
}""", [(3, 3, 4, 4)],
        lambda x, p: dense(F.relu(dense(x.flatten(1), p, "d")), p, "dense"),
        ["dense"]),
    "dense+add+sigmoid+scalar": (
        """net A(x: f32[N, 12], r: f32[N, 9]) {
    return 1.0 - sigmoid(r + dense(x, 9))
}""", [(5, 12), (5, 9)],
        lambda x, r, p: 1.0 - torch.sigmoid(r + dense(x, p, "dense")),
        ["dense"]),
    "depthwise+relu": (
        """net A(x: f32[N, 4, 7, 8]) {
    d = relu(depthwise(x, 3, pad=same))
    return d
}""", [(2, 4, 7, 8)],
        lambda x, p: F.relu(conv2d(x, p, "d", pad=1, groups=4)),
        ["depthwise"]),
    "depthwise+add+leaky_relu (keeps)": (
        """net A(x: f32[N, 3, 7, 7]) {
    d = depthwise(x, 3, multiplier=2, stride=2, pad=same)
    return leaky_relu(d + conv(x, 6, kernel=1, stride=2), slope=0.2)
}""", [(2, 3, 7, 7)],
        lambda x, p: F.leaky_relu(conv2d(x, p, "d", pad=1, groups=3, stride=2)
                                  + conv2d(x, p, "conv", stride=2), 0.2),
        ["depthwise"]),
    "separable+relu": (
        """net A(x: f32[N, 2, 6, 5]) {
    h = relu(conv(x, 3, kernel=3, pad=same, separable=true))
    return h
}""", [(2, 2, 6, 5)],
        lambda x, p: F.relu(separable2d(x, p, "h", pad=1)),
        ["separable"]),
    # examples/separable_blur.cdsl DifferenceOfGaussians: narrow - wide, then conv+relu
    "separable+sub": (
        """net A(image: f32[N, 1, 6, 5]) {
    narrow = conv(image, 1, kernel=3, pad=same, separable=true, bias=none)
    wide = conv(image, 1, kernel=5, pad=same, separable=true, bias=none)
    dog = narrow - wide
    return conv(relu(conv(dog, 2, kernel=3, pad=same)), 2, kernel=1)
}""", [(2, 1, 6, 5)],
        lambda image, p: conv2d(F.relu(conv2d(
            separable2d(image, p, "narrow", pad=1) - separable2d(image, p, "wide", pad=2),
            p, "conv.1", pad=1)), p, "conv.0"),
        ["separable", "conv"]),
}


# -- helpers -----------------------------------------------------------------------------------

def compile_pair(src: str, dtype: str = "f32"):
    """(fused net, unfused net) with the same random parameters."""
    src = src.replace("f32[", f"{dtype}[")
    fused = convdsl.compile(src, backend="triton")
    plain = convdsl.compile(src, backend="triton", optimize=False)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in fused.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def fused_plans(program) -> list:
    return [plan for plan in program.plans
            if any(program.graph.node(n).op == "_fused" for n in plan.nodes)]


def assert_close(got, want, dtype="f32", what=""):
    assert got is not None and want is not None, what
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(want.abs().max().item(), 1.0)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err} (scale {scale})"


def run_with_grad(net, xs, proj):
    """Output and gradients (inputs, then parameters by name) of (y * proj).sum()."""
    xs = [x.clone().requires_grad_(True) for x in xs]
    net.zero_grad()
    y = net(*xs)
    (y.float() * proj).sum().backward()
    grads = {f"input{i}": x.grad for i, x in enumerate(xs)}
    grads.update({name: p.grad for name, p in net.named_parameters() if p.requires_grad})
    return y.detach(), grads


def reference_with_grad(ref, xs, params, proj):
    xs = [x.double().requires_grad_(True) for x in xs]
    ps = {k: v.detach().double().requires_grad_(True) for k, v in params.items()}
    y = ref(*xs, ps)
    (y * proj.double()).sum().backward()
    grads = {f"input{i}": x.grad for i, x in enumerate(xs)}
    grads.update({k: v.grad for k, v in ps.items()})
    return y.detach(), grads


# -- every pattern: forward and backward, fused = unfused = reference ------------------------

# Bigger interpreter runs (3-D, tables, a second depthwise pattern): -m slow.
SLOW = {"conv3d+softplus+sub (keeps)", "conv(table)+tanh", "depthwise+add+leaky_relu (keeps)"}


def cases(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(names)]


@pytest.mark.parametrize("case", cases(CASES))
def test_fused_forward_and_backward(case):
    src, shapes, ref, families = CASES[case]
    fused, plain = compile_pair(src)
    torch.manual_seed(1)
    xs = [torch.randn(*s) for s in shapes]
    params = dict(fused.named_parameters())

    # The pass fused, the families compute the fused nodes, fewer kernels run.
    inference = fused._program.inference
    assert sorted(p.family for p in fused_plans(inference)) == sorted(families)
    assert len(inference.plans) < len(plain._program.inference.plans)
    assert not inference.aliases  # no fused node fell back to one kernel per step

    # A random projection of the output: the loss whose gradients are compared.
    with torch.no_grad():
        shape = ref(*[x.double() for x in xs], {k: v.double() for k, v in params.items()}).shape
    proj = torch.randn(shape)
    want, want_grads = reference_with_grad(ref, xs, params, proj)

    # Inference variant (no_grad): nothing saved.
    with torch.no_grad():
        y_fused, y_plain = fused(*xs), plain(*xs)
    assert_close(y_fused, want, what="fused forward (inference)")
    assert_close(y_plain, y_fused, what="unfused vs fused forward")

    # Training variant and backward.
    got, got_grads = run_with_grad(fused, xs, proj)
    _, unfused_grads = run_with_grad(plain, xs, proj)
    assert_close(got, want, what="fused forward (training)")
    training = fused._program.training(fused)
    assert len(training.plans) < len(plain._program.training(plain).plans)
    assert sorted(p.family for p in fused_plans(training)) == sorted(families)
    assert set(got_grads) == set(want_grads) == set(unfused_grads)
    for name in want_grads:
        assert_close(got_grads[name], want_grads[name], what=f"d/d{name} fused vs reference")
        assert_close(unfused_grads[name], got_grads[name], what=f"d/d{name} unfused vs fused")


@pytest.mark.parametrize("case", ["conv+scalar+elu (keeps)", "depthwise+add+leaky_relu (keeps)",
                                  "conv3d+softplus+sub (keeps)"])
def test_training_variant_stores_what_backward_reads(case):
    """elu / leaky_relu / softplus gradients read their input (the anchor's
    output): the training kernel stores it too, under another name; inference
    stores only the result."""
    src = CASES[case][0]
    net, _ = compile_pair(src)
    inference, training = net._program.inference, net._program.training(net)
    (inf,), (train,) = fused_plans(inference), fused_plans(training)
    assert len(inf.outputs) == 1 and len(train.outputs) == 2
    assert train.outputs[1] in training.graph.saved_for_backward
    assert "saving" in train.name and "saving" not in inf.name and inf.name != train.name
    assert "kept0_ptr" in train.source and "kept0_ptr" not in inf.source


def test_kernel_names_and_sources():
    net, _ = compile_pair(CASES["conv+add+relu"][0])
    (plan,) = fused_plans(net._program.inference)
    # the later conv (W) absorbs the add: its residual (U's output) comes first
    assert plan.name.startswith("k_conv_2d_w_add_relu")
    assert "res0_ptr" in plan.source and "# relu" in plan.source
    assert len(plan.inputs) == 2  # labels, then the residual (conv U's output)
    again = convdsl.compile(CASES["conv+add+relu"][0], backend="triton")
    assert again.kernels == net.kernels  # deterministic


# -- dtypes and layouts ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["bf16", pytest.param("f16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", cases(["conv+add+relu", "dense+add+sigmoid+scalar",
                                        "depthwise+add+leaky_relu (keeps)", "separable+sub"]))
def test_half_precision_forward(case, dtype):
    src, shapes, ref, _ = CASES[case]
    fused, plain = compile_pair(src, dtype)
    torch.manual_seed(1)
    xs = [torch.randn(*s).to(DTYPES[dtype]) for s in shapes]
    params = {k: v.detach().double() for k, v in fused.named_parameters()}
    want = ref(*[x.double() for x in xs], params)
    with torch.no_grad():
        y = fused(*xs)
        assert y.dtype == DTYPES[dtype]
        assert_close(y, want, dtype, "fused")
        assert_close(plain(*xs), want, dtype, "unfused")


def test_residual_layouts():
    """The output takes the first residual's layout; a residual in another
    layout is copied to it, so one offset expression addresses all of them."""
    src = """net A(x: f32[N, 4, 5, 6], z: f32[N, 4, 5, 6]) {
    return relu(conv(x, 4, kernel=3, pad=same) + x - z)
}"""
    net, _ = compile_pair(src)
    (plan,) = fused_plans(net._program.inference)
    assert "res1_ptr" in plan.source
    p = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(2, 4, 5, 6).to(memory_format=torch.channels_last)
    for z in (torch.randn(2, 4, 5, 6), torch.randn(2, 6, 5, 4).transpose(1, 3)):
        want = F.relu(conv2d(x, p, "conv", pad=1) + x - z)
        with torch.no_grad():
            y = net(x, z)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert_close(y, want)


def test_cost_counts_the_fused_kernel():
    """FLOPs include the epilogue steps; bytes the residual read and the
    kept store, and no longer the intermediate's round trip."""
    src = """net A(x: f32[N, 3, 8, 8], r: f32[N, 4, 8, 8]) {
    return elu(conv(x, 4, kernel=3, pad=same) + r)
}"""
    net, plain = compile_pair(src)
    env = {symbol("N"): 2}
    n_y, n_x, weights = 2 * 4 * 8 * 8, 2 * 3 * 8 * 8, 4 * 3 * 9 + 4

    def total(program):
        costs = [family(p.family).cost(p, program.graph, env) for p in program.plans]
        return sum(c[0] for c in costs), sum(c[1] for c in costs)

    (plan,) = fused_plans(net._program.inference)
    flops, nbytes = family("conv").cost(plan, net._program.inference.graph, env)
    assert flops == 2 * n_y * 3 * 9 + 2 * n_y  # GEMM, then add and elu
    assert nbytes == 4 * (n_x + weights + n_y + n_y)  # x, weight+bias, residual, y
    training = net._program.training(net)
    (plan,) = fused_plans(training)
    assert family("conv").cost(plan, training.graph, env)[1] == nbytes + 4 * n_y  # kept
    fused_flops, fused_bytes = total(net._program.inference)
    plain_flops, plain_bytes = total(plain._program.inference)
    assert fused_flops == plain_flops and fused_bytes < plain_bytes


@pytest.mark.parametrize("path,name,families", [
    ("separable_blur.cdsl", "SeparableNet", {"separable"}),
    ("separable_blur.cdsl", "DifferenceOfGaussians", {"separable", "conv"}),
    ("recurrent_labels.cdsl", "RecurrentLabeler", {"conv"}),
    ("lenet5.cdsl", "LeNet5", {"dense"}),
])
def test_examples_fuse_in_these_families(path, name, families):
    """The example nets' epilogues are computed by these families, not expanded
    back into one kernel per step."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "examples"
    net = convdsl.compile(root / path, net=name, backend="triton")
    program = net._program.inference
    ours = {"conv", "dense", "depthwise", "separable"}
    fused = {p.family for p in fused_plans(program)} & ours
    assert fused >= families
    for fused_id in {fused_id for fused_id, _ in program.origins.values()}:
        node = net._graph.node(fused_id)  # run one kernel per step: not one of ours
        types = [net._graph.type_of(r) for r in node.inputs]
        assert OPS["_fused"].triton_family(node.attrs, types) not in ours, node.attrs["pattern"]


# -- ahead of time -----------------------------------------------------------------------------

AOT_SRC = """net A(x: f32[N, 16, 16, 16], r: f32[N, 32, 16, 16], v: f32[N, 32, 16, 16]) {
    c = elu(conv(x, 32, kernel=3, pad=same) + r)
    d = leaky_relu(depthwise(c, 3, pad=same) - v)
    s = softplus(conv(d, 32, kernel=5, pad=same, separable=true, groups=32) + r)
    return relu(dense(flatten(s), 10) * 2.0)
}"""


def test_aot_signatures_match_kernel_arguments():
    """aot() lists the epilogue's pointers where the kernels take them."""
    from convdsl.triton.loader import load_kernel

    net = convdsl.compile(AOT_SRC, backend="triton")
    seen = set()
    for program in (net._program.inference, net._program.training(net)):
        for plan in fused_plans(program):
            signature, constexprs = family(plan.family).aot(plan, program.graph)[:2]
            kernel = load_kernel(plan.source, plan.name, interpret=True)
            assert list(signature) == list(kernel.arg_names), plan.name
            assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)
            assert "res0_ptr" in signature or plan.family == "dense"
            seen.add((plan.family, "kept0_ptr" in signature))
    assert seen == {(f, kept) for f in ("conv", "depthwise", "separable", "dense")
                    for kept in (False, True)} - {("dense", True)}


def test_aot_fused_conv_compiles_without_spills(tmp_path):
    """One fused config for sm_90 (~8 s: Triton and ptxas in a worker process):
    the training variant of bf16 conv + residual add + elu, which also stores
    the sum that elu's gradient reads. -m slow compiles every family's."""
    from convdsl.triton.aot import compile_many, plan_jobs, resource_usage

    src = """net A(x: bf16[N, 64, 32, 32], r: bf16[N, 64, 32, 32]) {
    return elu(conv(x, 64, kernel=3, pad=same) + r)
}"""
    net = convdsl.compile(src, backend="triton")
    training = net._program.training(net)
    (plan,) = fused_plans(training)
    assert plan.name == "k_conv_2d_conv_add_elu_saving_2"
    (job,) = plan_jobs(plan, training.graph)
    (result,) = compile_many([job], 90, progress=False)
    registers, spills = resource_usage(result["cubin"], plan.name, tmp_path)
    print("sm_90", plan.name, "registers", registers, "spills", spills)
    assert registers is not None and spills == 0


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_aot_fused_kernels_compile_without_spills(dtype, target, tmp_path):
    """Every fused kernel of AOT_SRC, inference and training variants, in
    each of the four families: registers, no spills, a cost."""
    from convdsl.triton.aot import compile_program

    net = convdsl.compile(AOT_SRC.replace("f32[", f"{dtype}["), backend="triton")
    programs = [net._program.inference, net._program.training(net)]
    fused = {p.name: p.family for program in programs for p in fused_plans(program)}
    assert len(fused) == 7 and sum("saving" in name for name in fused) == 3
    reports = {r.name: r for r in compile_program(net._program, target, tmp_path, {"N": 8})}
    for name in sorted(fused):
        r = reports[name]
        print(target, dtype, r.name, "registers", r.registers, "spills", r.spills,
              "shared", r.shared_bytes, "flops", r.flops, "bytes", r.bytes)
        assert r.registers is not None and r.spills == 0, r
        assert r.flops > 0 and r.bytes > 0
