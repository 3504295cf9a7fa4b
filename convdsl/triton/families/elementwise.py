"""Elementwise chains: activations and `+ - *`, adjacent ones fused into one
kernel that loads each operand once and stores one result."""
from __future__ import annotations

import torch

from ..codegen import module_source, render, safe_name
from .base import (
    ITEMSIZE,
    POINTER,
    Family,
    KernelPlan,
    cdiv,
    float_literal,
    needs_int64,
    target,
)

# op → (fp32 Triton expression over operands {0}, {1}; attributes it reads)
# The forms are chosen to propagate NaN as PyTorch does (relu(NaN) is NaN).
EXPRESSIONS = {
    "relu": "tl.where({0} < 0.0, 0.0, {0})",
    "sigmoid": "1.0 / (1.0 + tl.exp(-{0}))",
    "tanh": "2.0 / (1.0 + tl.exp(-2.0 * {0})) - 1.0",
    "leaky_relu": "tl.where({0} < 0.0, {0} * {slope}, {0})",
    "elu": "tl.where({0} < 0.0, {alpha} * (tl.exp({0}) - 1.0), {0})",
    # PyTorch's softplus switches to x above 20, where log(1 + e^x) == x in fp32.
    "softplus": "tl.where({0} > 20.0, {0}, tl.log(1.0 + tl.exp({0})))",
    "identity": "{0}",
    "_add": "{0} + {1}",
    "_sub": "{0} - {1}",
    "_mul": "{0} * {1}",
    # Gradients: {0} is dy, {1} the saved input or output (ops/grads.py says which);
    # `<= 0` tests as PyTorch's: a NaN input passes dy through relu and elu.
    "_relu_dx": "tl.where({1} <= 0.0, 0.0, {0})",
    "_sigmoid_dx": "{0} * {1} * (1.0 - {1})",
    "_tanh_dx": "{0} * (1.0 - {1} * {1})",
    "_leaky_relu_dx": "tl.where({1} > 0.0, {0}, {0} * {slope})",
    "_elu_dx": "tl.where({1} <= 0.0, {0} * {alpha} * tl.exp({1}), {0})",
    "_softplus_dx": "{0} / (1.0 + tl.exp(-{1}))",
}

ELEMENTWISE_OPS = frozenset(EXPRESSIONS) | {"_scalar"}


def _expression(node) -> str:
    if node.op == "_scalar":
        c = float_literal(node.attrs["scalar"])
        if node.attrs["symbol"] == "*":
            return f"{{0}} * {c}"
        if node.attrs["symbol"] == "-" and node.attrs["scalar_first"]:
            return f"{c} - {{0}}"
        return f"{{0}} + {c}"
    source = node.attrs.get("fattrs", node.attrs)  # a gradient reads its forward op's attrs
    attrs = {k: float_literal(v) for k, v in source.items() if isinstance(v, float)}
    return EXPRESSIONS[node.op].format("{0}", "{1}", **attrs)


class Elementwise(Family):
    name = "elementwise"
    BLOCK = {"gpu": 1024, "cpu": 4096}  # the interpreter runs faster with fewer programs

    def plan(self, graph, nodes) -> KernelPlan:
        internal = {n.id for n in nodes}
        inputs, names, steps = [], {}, []
        for node in nodes:
            for ref in node.inputs:
                if ref.node not in internal and ref not in names:
                    names[ref] = f"v{len(inputs)}"
                    inputs.append(ref)
        for index, node in enumerate(nodes):
            operands = [names[r] for r in node.inputs]
            target = f"t{index}"
            steps.append((target, _expression(node).format(*operands), node.op.lstrip("_")))
            names[_ref(node)] = target
        last = nodes[-1]
        # Intermediates the backward pass reads are stored too (extra outputs).
        kept = [_ref(n) for n in nodes[:-1] if _ref(n) in graph.saved_for_backward]
        name = safe_name("elementwise", *[n.op for n in nodes][:4], last.id,
                         "saving" if kept else "")  # the training variant is another kernel
        doc = "Fused elementwise chain: " + " -> ".join(n.op.lstrip("_") for n in nodes) + "."
        source = module_source(render("elementwise.py.jinja", name=name, n_inputs=len(inputs),
                                      steps=steps, result=steps[-1][0], doc=doc,
                                      n_kept=len(kept), kept=[names[r] for r in kept]))
        return KernelPlan(name, self.name, source, tuple(n.id for n in nodes), tuple(inputs),
                          (_ref(last), *kept), meta={"steps": len(steps), "kept": len(kept)})

    def launch(self, plan, kernel, inputs, params, attrs):
        operands = [t.contiguous() for t in inputs]
        outs = [torch.empty_like(operands[0], memory_format=torch.contiguous_format)
                for _ in range(1 + plan.meta["kept"])]
        n = outs[0].numel()
        block = self.BLOCK[target(outs[0])]
        grid = (cdiv(n, block),)
        kernel[grid](*operands, *outs, n, BLOCK=block, INDEX_64=needs_int64(outs[0]))
        return outs

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.outputs[0]).dtype
        signature = {f"in{i}_ptr": POINTER[dtype] for i in range(len(plan.inputs))}
        signature["out_ptr"] = POINTER[dtype]
        signature.update({f"kept{i}_ptr": POINTER[dtype] for i in range(plan.meta["kept"])})
        signature.update({"n_elements": "i32", "BLOCK": "constexpr", "INDEX_64": "constexpr"})
        return signature, {"BLOCK": self.BLOCK["gpu"], "INDEX_64": False}

    def cost(self, plan, graph, env):
        out = graph.type_of(plan.outputs[0])
        n = _numel(out, env)
        stores = 1 + plan.meta["kept"]
        return n * plan.meta["steps"], n * (len(plan.inputs) + stores) * ITEMSIZE[out.dtype]


def _ref(node):
    from ...ir import ValueRef

    return ValueRef(node.id, 0)


def _numel(ttype, env) -> int:
    from ...ir.types import evaluate

    total = 1
    for d in ttype.shape:
        total *= evaluate(d, env)
    return total
