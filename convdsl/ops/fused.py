"""`_fused`: several table ops computed as one node (made by the fusion passes).

A fused node holds a short program of *steps*, each an ordinary op of the
table with its own attributes and parameters:

    %9, %9#1, %9#2 = fused[conv+relu+maxpool](%0)
        steps: s0 = conv(in0) ... ; s1 = relu(s0) ; s2 = maxpool(s1) ...

Operands of a step are `in<k>` (the fused node's k-th operand) or `s<j>` (an
earlier step's result). Result 0 is the last step's value, the one the rest
of the net reads; result j >= 1 is step j-1's value — an intermediate that a
kernel keeps on chip and stores only when the derived backward graph saves it
(`Graph.saved_for_backward`).

Because every step is a table op, the fused node needs no calculus of its own:
its shape rule, torch lowering and VJP rule run the steps' rules in order (or
in reverse), so a fused node is numerically the chain it replaced and its
derived backward graph is that chain's backward graph.
"""
from __future__ import annotations

from ..ir import Node, TensorType, ValueRef
from .base import OPS, Arg, OpDef, ShapeContext

FUSED = "_fused"


def step_operand(text: str) -> tuple[str, int]:
    """'in2' → ('in', 2); 's0' → ('s', 0)."""
    kind = "in" if text.startswith("in") else "s"
    return kind, int(text[len(kind):])


def result_index(step: int, n_steps: int) -> int:
    """Which result of the fused node holds step `step`'s value."""
    return 0 if step == n_steps - 1 else step + 1


def step_params(params: dict, step: int) -> dict:
    """The fused node's params (`<step>.<role>` → value) of one step, by role."""
    prefix = f"{step}."
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _step_context(ctx: ShapeContext, k: int, step: dict, types: list,
                  spans: dict) -> ShapeContext:
    return ShapeContext(step["op"], types, step["attrs"], ctx.arg_spans.get(f"step{k}", ctx.span),
                        spans.get(f"step{k}", {}), ctx.runtime)


def _spans_by_step(arg_spans: dict) -> dict[str, dict]:
    """'step<k>.<arg>' spans grouped by step in one pass (a long chain stays linear)."""
    grouped: dict[str, dict] = {}
    for key, span in arg_spans.items():
        step, dot, arg = key.partition(".")
        if dot:
            grouped.setdefault(step, {})[arg] = span
    return grouped


def _shape(ctx: ShapeContext) -> list[TensorType]:
    values = {f"in{i}": t for i, t in enumerate(ctx.inputs)}
    spans = _spans_by_step(ctx.arg_spans)
    found = []
    for k, step in enumerate(ctx.attrs["steps"]):
        types = [values[o] for o in step["operands"]]
        result = OPS[step["op"]].shape(_step_context(ctx, k, step, types, spans))[0]
        values[f"s{k}"] = result
        found.append(result)
    return [found[-1]] + found[:-1]


def _torch(inputs, attrs, params):
    values = {f"in{i}": x for i, x in enumerate(inputs)}
    found = []
    for k, step in enumerate(attrs["steps"]):
        result = OPS[step["op"]].torch([values[o] for o in step["operands"]], step["attrs"],
                                       step_params(params, k))
        values[f"s{k}"] = result
        found.append(result)
    return [found[-1]] + found[:-1]


# Ops that can start a fused node: the anchor computes the tile that the
# following steps (an elementwise epilogue, a pooling window) consume on chip.
ANCHORS = ("conv", "deconv", "dense", "local", "tiled", "_pool_dx")
POOLS = ("maxpool", "avgpool", "lppool", "wavgpool")


def pattern(steps) -> str:
    return "+".join(step["op"].lstrip("_") for step in steps)


def _triton(attrs, inputs) -> str | None:
    """The kernel family: conv → pool is its own kernel, depthwise → pointwise
    too; otherwise the anchor's family, which applies the epilogue steps."""
    steps = attrs["steps"]
    ops = [step["op"] for step in steps]
    if sum(op in ANCHORS for op in ops) == 2:
        return "dwpw"
    if ops[-1] in POOLS:
        return "conv_pool"
    anchor = steps[0]
    return OPS[anchor["op"]].triton_family(anchor["attrs"], inputs[:1])


def step_refs(node: Node) -> dict[str, ValueRef]:
    """Each step operand name → the forward value it stands for."""
    steps = node.attrs["steps"]
    refs = {f"in{i}": r for i, r in enumerate(node.inputs)}
    refs.update({f"s{k}": ValueRef(node.id, result_index(k, len(steps)))
                 for k in range(len(steps))})
    return refs


def step_node(node: Node, k: int) -> Node:
    """A stand-in forward node for step k, reading real forward values."""
    steps = node.attrs["steps"]
    step = steps[k]
    # Only this step's operands: step_refs would make a pass over every step quadratic.
    refs = [node.inputs[i] if kind == "in" else ValueRef(node.id, result_index(i, len(steps)))
            for kind, i in map(step_operand, step["operands"])]
    return Node(node.id, step["op"], refs, step["attrs"],
                [node.types[result_index(k, len(steps))]],
                node.arg_spans.get(f"step{k}", node.span), layer=step.get("layer"),
                params=step_params(node.params, k), binding=step.get("binding"))


def _vjp(ctx):
    """The steps' VJP rules in reverse, each seeing its step as a plain node."""
    from ..autodiff import StepVJPContext

    node = ctx.node
    steps = node.attrs["steps"]
    grads: dict[str, list] = {f"s{len(steps) - 1}": [ctx.grad(0)] if ctx.grad(0) else []}
    for k in range(len(steps) - 1):  # an intermediate is read by the backward graph only
        extra = ctx.grad(result_index(k, len(steps)))
        if extra is not None:
            grads.setdefault(f"s{k}", []).append(extra)
    requires = _requires(ctx, node)
    for k in reversed(range(len(steps))):
        incoming = grads.get(f"s{k}")
        if not incoming or not requires[f"s{k}"]:
            continue
        dy = ctx.sum(incoming)
        sub = StepVJPContext(ctx, step_node(node, k), [dy],
                             needs=[requires[o] for o in steps[k]["operands"]],
                             result=result_index(k, len(steps)))
        for operand, grad in zip(steps[k]["operands"], OPS[steps[k]["op"]].vjp(sub)):
            if grad is not None:
                grads.setdefault(operand, []).append(grad)
    return [ctx.sum(grads[f"in{i}"]) if grads.get(f"in{i}") else None
            for i in range(len(node.inputs))]


def _requires(ctx, node: Node) -> dict[str, bool]:
    """Which step values depend on something that wants a gradient."""
    found = {f"in{i}": ctx.needs_input(i) for i in range(len(node.inputs))}
    for k, step in enumerate(node.attrs["steps"]):
        trainable = any(ctx.param_trainable(name)
                        for name in step_params(node.params, k).values())
        found[f"s{k}"] = trainable or any(found[o] for o in step["operands"])
    return found


OPS.register(OpDef(
    FUSED, "fused", (Arg("x", "tensor"),), _shape, None, torch=_torch, variadic=True,
    results=lambda attrs: len(attrs["steps"]), triton=_triton, vjp=_vjp,
    doc="several ops computed as one kernel (made by the fusion passes; see passes/fusion.py)",
))
