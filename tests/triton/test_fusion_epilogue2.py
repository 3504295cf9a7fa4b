"""Epilogue fusion in the deconv, local and tiled kernels, and the fused pooling
gradient (`_pool_dx` + activation derivative), under Triton's interpreter.

Every fused net is checked three ways, forward and backward: against an
independent reference written with torch.nn.functional ops, the loops of
tests/reference.py and autograd (never convdsl's torch lowering), against the same net compiled without the optimizer
(optimize=False: one kernel per op), and by kernel count — the fused program
must launch fewer kernels. The inference variant (under no_grad: nothing
stored) and the training variant (intermediates the backward pass reads are
stored, kernel names say `saving`) are both run.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.ir.types import symbol
from convdsl.triton.families import family

from ..ops.helpers import randomize, single_thread  # noqa: F401  (autouse fixture)
from ..reference import (
    conv_by_torch,
    deconv_by_transpose,
    local_loop,
    pool_loop,
    tiled_loop,
    window_cells,
)

MINE = ("deconv", "local", "tiled", "pool_dx")


# -- the nets ------------------------------------------------------------------------------------

def net_source(inputs: str, body: str) -> str:
    return f"net A({inputs}) {{\n{body}\n}}\n"


# name -> (source, input shapes by name, reference(inputs, params), fused family,
#          the training variant stores an intermediate)
EPILOGUE_CASES = {
    "deconv+relu": (
        net_source("x: f32[N, 3, 4, 5]",
                   "    y = relu(deconv(x, 4, kernel=3, stride=2, pad=same))\n    return y"),
        {"x": (2, 3, 4, 5)},
        lambda i, p: F.relu(deconv_by_transpose(i["x"], p["y.weight"], p["y.bias"], stride=2,
                                                pad="same")),
        "deconv", False),
    "deconv+sigmoid": (  # size= past the natural output, as the autoencoder's last layer
        net_source("x: f32[N, 2, 4, 4]",
                   "    y = sigmoid(deconv(x, 1, kernel=3, stride=2, pad=same, size=(7, 8)))\n"
                   "    return y"),
        {"x": (2, 2, 4, 4)},
        lambda i, p: torch.sigmoid(deconv_by_transpose(i["x"], p["y.weight"], p["y.bias"],
                                                       stride=2, pad="same", size=(7, 8))),
        "deconv", False),
    "deconv+add+elu": (  # a residual operand; elu's derivative reads its input: kept
        net_source("x: f32[N, 3, 4, 5], s: f32[N, 2, 8, 10]",
                   "    y = elu(deconv(x, 2, kernel=3, stride=2, pad=same) + s)\n    return y"),
        {"x": (2, 3, 4, 5), "s": (2, 2, 8, 10)},
        lambda i, p: F.elu(deconv_by_transpose(i["x"], p["y.weight"], p["y.bias"], stride=2,
                                               pad="same") + i["s"]),
        "deconv", True),
    "local+relu": (
        net_source("x: f32[N, 3, 5, 6]",
                   "    y = relu(local(x, 4, kernel=3, stride=2))\n    return y"),
        {"x": (2, 3, 5, 6)},
        lambda i, p: F.relu(local_loop(i["x"], p["y.weight"], p["y.bias"], stride=2)),
        "local", False),
    "local+softplus": (  # softplus's derivative reads its input: kept
        net_source("x: f32[N, 2, 4, 5]",
                   "    y = softplus(local(x, 3, kernel=2, stride=2))\n    return y"),
        {"x": (2, 2, 4, 5)},
        lambda i, p: F.softplus(local_loop(i["x"], p["y.weight"], p["y.bias"], stride=2)),
        "local", True),
    "tiled+relu": (
        net_source("x: f32[N, 2, 5, 6]",
                   "    y = relu(tiled(x, 3, kernel=3, tiles=2, pad=same, bias=tiled))\n"
                   "    return y"),
        {"x": (2, 2, 5, 6)},
        lambda i, p: F.relu(tiled_loop(i["x"], p["y.weight"], p["y.bias"], pad="same")),
        "tiled", False),
    "tiled+scalar+sub+tanh": (  # three epilogue steps, a residual as the second operand
        net_source("x: f32[N, 2, 5, 6], s: f32[N, 3, 5, 6]",
                   "    y = tanh(tiled(x, 3, kernel=3, tiles=2, pad=same) * 0.5 - s)\n"
                   "    return y"),
        {"x": (2, 2, 5, 6), "s": (2, 3, 5, 6)},
        lambda i, p: torch.tanh(
            tiled_loop(i["x"], p["y.weight"], p["y.bias"], pad="same") * 0.5 - i["s"]),
        "tiled", False),
}

# name -> (source, input shape, reference(x, params), activation derivative fused into pool_dx)
POOL_CASES = {
    # conv -> relu -> maxpool: the forward is one conv_pool kernel, storing the pre-pool map
    "conv+relu+maxpool": (
        net_source("x: f32[N, 3, 8, 8]",
                   "    h = relu(conv(x, 4, kernel=3, pad=1))\n    return maxpool(h, 2)"),
        (2, 3, 8, 8),
        lambda x, p: F.max_pool2d(F.relu(conv_by_torch(x, p["h.weight"], p["h.bias"], pad=1)), 2),
        "relu_dx"),
    "conv+tanh+avgpool": (
        net_source("x: f32[N, 3, 8, 8]",
                   "    h = tanh(conv(x, 4, kernel=3, pad=1))\n    return avgpool(h, 2)"),
        (2, 3, 8, 8),
        lambda x, p: F.avg_pool2d(torch.tanh(conv_by_torch(x, p["h.weight"], p["h.bias"], pad=1)),
                                  2),
        "tanh_dx"),
    # overlapping windows at stride 1: too much recomputation for forward pool fusion,
    # so conv+relu and maxpool run apart; the gradient is fused all the same
    "conv+relu+maxpool3s1": (
        net_source("x: f32[N, 3, 7, 7]",
                   "    h = relu(conv(x, 4, kernel=3, pad=1))\n"
                   "    return maxpool(h, 3, stride=1, pad=1)"),
        (2, 3, 7, 7),
        lambda x, p: F.max_pool2d(F.relu(conv_by_torch(x, p["h.weight"], p["h.bias"], pad=1)), 3,
                                  stride=1, padding=1),
        "relu_dx"),
    "tiled+relu+lppool": (
        net_source("x: f32[N, 2, 6, 6]",
                   "    h = relu(tiled(x, 4, kernel=3, tiles=2, pad=same))\n"
                   "    return lppool(h, 2, p=2)"),
        (2, 2, 6, 6),
        # the language's L2 pooling: an all-zero window (relu leaves some) is 0 and passes no
        # gradient, where F.lp_pool2d gives NaN
        lambda x, p: pool_loop(F.relu(tiled_loop(x, p["h.weight"], p["h.bias"], pad="same")),
                               "lppool", window_cells((6, 6), 2)),
        "relu_dx"),
    "deconv+relu+avgpool": (  # windows over the padding: it is not counted
        net_source("x: f32[N, 3, 4, 5]",
                   "    h = relu(deconv(x, 4, kernel=3, stride=2, pad=same))\n"
                   "    return avgpool(h, 3, stride=2, pad=1)"),
        (2, 3, 4, 5),
        lambda x, p: F.avg_pool2d(F.relu(deconv_by_transpose(x, p["h.weight"], p["h.bias"],
                                                             stride=2, pad="same")), 3,
                                  stride=2, padding=1, count_include_pad=False),
        "relu_dx"),
}


# -- helpers -------------------------------------------------------------------------------------

def pair(src: str):
    """The fused and the unfused (optimize=False) triton nets, equal random parameters."""
    fused = convdsl.compile(src, backend="triton")
    plain = convdsl.compile(src, backend="triton", optimize=False)
    values = randomize(fused, seed=3)
    assert randomize(plain, seed=3).keys() == values.keys()
    return fused, plain, values


def inputs_for(shapes: dict, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}


def projection(y: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    return torch.randn(y.shape, generator=g, dtype=torch.float64)


def run_with_grad(net, inputs: dict):
    """Output and every gradient (inputs and parameters) of <net(inputs), projection>."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y = net(*leaves.values())
    (y.double() * projection(y)).sum().backward()
    grads = {f"input:{k}": v.grad for k, v in leaves.items()}
    grads.update({k: p.grad for k, p in net.named_parameters()})
    return y.detach(), grads


def reference_with_grad(reference, inputs: dict, params: dict):
    """The reference in float64 with autograd: output and gradients."""
    leaves = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    p = {k: v.double().requires_grad_(True) for k, v in params.items()}
    y = reference(leaves, p)
    (y * projection(y)).sum().backward()
    grads = {f"input:{k}": v.grad for k, v in leaves.items()}
    grads.update({k: v.grad for k, v in p.items()})
    return y.detach(), grads


def close(actual, expected, what=""):
    expected = expected.double()
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-4 * scale,
                               msg=lambda m: f"{what}: {m}")


def plans(program):
    return [p for p in program.plans if p.source]


def backward_plans(net):
    return plans(net._program.backward_program(net, ())[1])


# -- forward epilogues: deconv, local, tiled ------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EPILOGUE_CASES))
def test_epilogue_fusion(name):
    src, shapes, reference, fam, saving = EPILOGUE_CASES[name]
    fused, plain, params = pair(src)
    inputs = inputs_for(shapes)

    # One kernel instead of the layer's and its elementwise chain's.
    (plan,) = plans(fused._program.inference)
    assert plan.family == fam and len(plans(plain._program.inference)) == 2
    ops = name.split("+")[1:]
    assert all(op in plan.name for op in ops) and "saving" not in plan.name, plan.name
    assert f"e{len(ops)}.to(y_ptr.dtype.element_ty)" in plan.source  # the epilogue is stored

    # Inference variant (no_grad: nothing stored).
    want, want_grads = reference_with_grad(reference, inputs, params)
    with torch.no_grad():
        got = fused(*inputs.values())
        unfused = plain(*inputs.values())
    close(got, want, "inference")
    close(got, unfused, "inference vs unfused")

    # Training variant: the same kernel, storing what the backward graph reads.
    y, grads = run_with_grad(fused, inputs)
    y_plain, grads_plain = run_with_grad(plain, inputs)
    (train,) = plans(fused._program.training(fused))
    assert ("saving" in train.name) == saving, train.name
    assert len(train.outputs) == 1 + saving  # result 0, and the kept intermediate
    assert (train.name != plan.name) == saving  # two variants, two kernels
    close(y, want, "training")
    close(y, y_plain, "training vs unfused")
    assert grads.keys() == want_grads.keys() == grads_plain.keys()
    for key in want_grads:
        close(grads[key], want_grads[key], f"d/d {key}")
        close(grads[key], grads_plain[key], f"d/d {key} vs unfused")


def test_residual_layout_is_the_outputs():
    """A channels-last residual: the output takes its layout, so one offset
    expression addresses both; a strided (non-dense) residual is copied first."""
    src, shapes, reference, _, _ = EPILOGUE_CASES["deconv+add+elu"]
    fused, _, params = pair(src)
    inputs = inputs_for(shapes)
    want = reference({k: v.double() for k, v in inputs.items()},
                     {k: v.double() for k, v in params.items()})
    cl = inputs["s"].to(memory_format=torch.channels_last)
    wide = torch.zeros(2, 2, 8, 20)
    wide[..., ::2] = inputs["s"]
    with torch.no_grad():
        y = fused(inputs["x"], cl)
        assert y.is_contiguous(memory_format=torch.channels_last)
        close(y, want, "channels-last residual")
        close(fused(inputs["x"], wide[..., ::2]), want, "strided residual")


def test_bf16_epilogue():
    src = net_source("x: bf16[N, 3, 4, 5], s: bf16[N, 4, 8, 10]",
                     "    y = relu(deconv(x, 4, kernel=3, stride=2, pad=same) + s)\n    return y")
    fused, _, params = pair(src)
    inputs = {k: v.to(torch.bfloat16) for k, v in inputs_for({"x": (2, 3, 4, 5),
                                                               "s": (2, 4, 8, 10)}).items()}
    with torch.no_grad():
        y = fused(*inputs.values())
    assert y.dtype == torch.bfloat16
    want = F.relu(deconv_by_transpose(inputs["x"].double(),
                                      params["y.weight"].to(torch.bfloat16).double(),
                                      params["y.bias"].double(), stride=2, pad="same")
                  + inputs["s"].double())
    torch.testing.assert_close(y.double(), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))


def test_cost_counts_the_fused_kernel():
    """FLOPs: the layer's plus one per epilogue step and output; bytes: the
    layer's plus the residual read, with the elementwise kernel's traffic gone."""
    src, *_ = EPILOGUE_CASES["deconv+add+elu"]
    fused, plain, _ = pair(src)
    env = {symbol("N"): 4}
    (plan,) = plans(fused._program.inference)
    deconv_plan, chain = plans(plain._program.inference)
    flops, nbytes = family("deconv").cost(plan, fused._program.inference.graph, env)
    flops0, nbytes0 = family("deconv").cost(deconv_plan, plain._program.inference.graph, env)
    chain_bytes = family("elementwise").cost(chain, plain._program.inference.graph, env)[1]
    outputs = 4 * 2 * 8 * 10
    assert flops == flops0 + 2 * outputs  # + and elu
    assert nbytes == nbytes0 + 4 * outputs  # the residual
    assert nbytes < nbytes0 + chain_bytes
    (train,) = plans(fused._program.training(fused))
    assert family("deconv").cost(train, fused._program.training(fused).graph, env)[1] == \
        nbytes + 4 * outputs  # the kept pre-activation


def test_source_is_deterministic_and_names_are_safe():
    src = net_source("x: f32[N, 3, 7, 7]",
                     "    lambda = relu(local(x, 4, kernel=3, stride=2))\n    return lambda")
    a = convdsl.compile(src, backend="triton").kernels
    b = convdsl.compile(src, backend="triton").kernels
    assert a == b and len(a) == 1
    (name,) = a
    assert name.startswith("k_local_lambda_relu_") and "def lambda" not in a[name]


# -- the fused pooling gradient -------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_pool_gradient_fusion(name):
    src, shape, reference, derivative = POOL_CASES[name]
    fused, plain, params = pair(src)
    inputs = inputs_for({"x": shape})

    # The backward graph's pool_dx + activation derivative is one kernel.
    got_plans, plain_plans = backward_plans(fused), backward_plans(plain)
    assert len(got_plans) == len(plain_plans) - 1
    (pool,) = [p for p in got_plans if p.family == "pool_dx"]
    graph = fused._program.backward_program(fused, ())[1].graph
    assert derivative in pool.name and graph.node(pool.nodes[0]).op == "_fused"
    assert not any(derivative in p.name for p in got_plans if p is not pool)
    assert any(derivative in p.name for p in plain_plans if p.family == "elementwise")

    want, want_grads = reference_with_grad(lambda i, p: reference(i["x"], p), inputs, params)
    with torch.no_grad():
        close(fused(inputs["x"]), want, "inference")
    y, grads = run_with_grad(fused, inputs)
    y_plain, grads_plain = run_with_grad(plain, inputs)
    close(y, want, "training")
    close(y, y_plain, "training vs unfused")
    assert grads.keys() == want_grads.keys() == grads_plain.keys()
    for key in want_grads:
        close(grads[key], want_grads[key], f"d/d {key}")
        close(grads[key], grads_plain[key], f"d/d {key} vs unfused")


def test_pool_gradient_cost_counts_the_epilogue():
    src, *_ = POOL_CASES["conv+relu+maxpool3s1"]
    fused, plain, _ = pair(src)
    env = {symbol("N"): 2}
    graph = fused._program.backward_program(fused, ())[1].graph
    (pool,) = [p for p in backward_plans(fused) if p.family == "pool_dx"]
    plain_graph = plain._program.backward_program(plain, ())[1].graph
    (pool0,) = [p for p in backward_plans(plain) if p.family == "pool_dx"]
    flops, nbytes = family("pool_dx").cost(pool, graph, env)
    flops0, nbytes0 = family("pool_dx").cost(pool0, plain_graph, env)
    inputs = 2 * 4 * 7 * 7
    assert flops == flops0 + inputs
    # The saved activation is the tensor max routing reads anyway: no extra bytes.
    assert pool.inputs[1] == pool.inputs[2] and nbytes == nbytes0


# -- ahead of time --------------------------------------------------------------------------------

AOT_NETS = {
    "f32": net_source("x: f32[N, 16, 8, 8], s: f32[N, 8, 16, 16], t: f32[N, 8, 8, 8]", """\
    a = elu(deconv(x, 8, kernel=3, stride=2, pad=same) + s)
    b = relu(local(x, 8, kernel=3, stride=2))
    c = softplus(tiled(t, 8, kernel=3, tiles=2, pad=same) * 0.5)
    return a, b, maxpool(relu(tiled(t, 8, kernel=3, tiles=2, pad=same)), 3, stride=1), c"""),
    "bf16": net_source("x: bf16[N, 16, 8, 8], s: bf16[N, 8, 16, 16], t: bf16[N, 8, 8, 8]", """\
    a = elu(deconv(x, 8, kernel=3, stride=2, pad=same) + s)
    b = relu(local(x, 8, kernel=3, stride=2))
    c = softplus(tiled(t, 8, kernel=3, tiles=2, pad=same) * 0.5)
    return a, b, avgpool(tanh(tiled(t, 8, kernel=3, tiles=2, pad=same)), 2), c"""),
}


def fused_plans(net):
    """(plan, graph) of every fused kernel of ours: inference, training and backward."""
    found, seen = [], set()
    for program in net._program.programs(net):
        for plan in program.plans:
            if plan.family in MINE and plan.source and plan.name not in seen:
                seen.add(plan.name)
                if program.graph.node(plan.nodes[0]).op == "_fused":
                    found.append((plan, program.graph))
    return found


def test_aot_signature_matches_kernel_arguments():
    from convdsl.triton.loader import load_kernel

    net = convdsl.compile(AOT_NETS["f32"], backend="triton")
    found = fused_plans(net)
    assert {plan.family for plan, _ in found} == set(MINE)
    for plan, graph in found:
        signature, constexprs = family(plan.family).aot(plan, graph)[:2]
        kernel = load_kernel(plan.source, plan.name, interpret=True)
        runtime = [k for k, v in signature.items() if v != "constexpr"]
        assert runtime == [a for a in kernel.arg_names if a not in constexprs], plan.name
        assert set(signature) == set(kernel.arg_names), plan.name
        assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", sorted(AOT_NETS))
def test_aot_fused_kernels_compile_without_spills(dtype, tmp_path):
    """Inference and training (saving) variants of each fused forward kernel, and
    the fused pooling gradient, compile for sm_90 without spills."""
    from convdsl.triton.aot import compile_many, plan_jobs, resource_usage

    net = convdsl.compile(AOT_NETS[dtype], backend="triton")
    jobs = [job for plan, graph in fused_plans(net) for job in plan_jobs(plan, graph)]
    names = [j["name"] for j in jobs]
    assert sum("saving" in n for n in names) >= 2, names  # training variants (elu, softplus)
    assert any("pool" in n and "dx" in n for n in names), names
    results = compile_many(jobs, 90, progress=False)
    for job, result in zip(jobs, results):
        registers, spills = resource_usage(result["cubin"], job["name"], tmp_path)
        print(dtype, job["name"], "registers", registers, "spills", spills)
        assert registers is not None and spills == 0, (job["name"], registers, spills)
