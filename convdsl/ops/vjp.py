"""One vector-Jacobian product rule per op (tinygrad's habit: the engine only
walks the graph; the calculus lives here, one rule per op).

A rule gets a VJPContext (convdsl.autodiff) for one forward node and returns
one gradient per operand, or None where no gradient is needed or defined; it
reports parameter gradients with `ctx.param_grad(role, ref)`.
"""
from __future__ import annotations

from .base import OPS
from .grads import ACTIVATION_GRADS, LINEAR_IN_X


def _parametric(ctx):
    node = ctx.node
    family = "conv" if node.op == "depthwise" else node.op
    dy = ctx.grad()
    weights = sorted(r for r in node.params if r != "bias")
    dx = None
    if ctx.needs_input(0):  # h (eq. 9.13): skipped when the operand needs no gradient
        dx = ctx.emit(f"_{family}_dx", [dy], {"input_type": ctx.input_type(0)},
                      params={r: node.params[r] for r in weights})
    if any(ctx.needs_param(r) for r in weights):  # g (eq. 9.11)
        shapes = [ctx.param_shape(r) for r in weights]
        refs = ctx.emit_results(f"_{family}_dw", [dy, ctx.saved_input(0)],
                                {"roles": tuple(weights), "param_shapes": shapes},
                                params={r: node.params[r] for r in weights})
        for role, ref in zip(weights, refs):
            if ctx.needs_param(role):
                ctx.param_grad(role, ref)
    if "bias" in node.params and ctx.needs_param("bias"):
        ctx.param_grad("bias", ctx.emit("_bias_grad", [dy], {
            "mode": node.attrs["bias"], "tiles": node.attrs.get("tiles"),
            "param_shapes": [ctx.param_shape("bias")]}))
    return [dx]


def _pool(ctx):
    if not ctx.needs_input(0):
        return [None]
    # Max and Lp read the input values; avg and Gaussian-weighted only its shape.
    reads_x = ctx.node.op in ("maxpool", "lppool")
    operands = [ctx.grad()] + ([ctx.saved_input(0)] if reads_x else [])
    return [ctx.emit("_pool_dx", operands, {"input_type": ctx.input_type(0)})]


def _maxout(ctx):
    if not ctx.needs_input(0):
        return [None]
    return [ctx.emit("_maxout_dx", [ctx.grad(), ctx.saved_input(0)],
                     {"input_type": ctx.input_type(0)})]


def _activation(ctx):
    if not ctx.needs_input(0):
        return [None]
    saved = ACTIVATION_GRADS[ctx.node.op][0]
    value = ctx.saved_input(0) if saved == "x" else ctx.saved_output(0)
    return [ctx.emit(f"_{ctx.node.op}_dx", [ctx.grad(), value], {})]


def _identity(ctx):
    return [ctx.grad()]


def _add(ctx):
    return [ctx.grad() if ctx.needs_input(i) else None for i in range(2)]


def _sub(ctx):
    dy = ctx.grad()
    return [dy if ctx.needs_input(0) else None,
            ctx.scale(dy, -1.0) if ctx.needs_input(1) else None]


def _mul(ctx):
    dy = ctx.grad()
    a, b = (ctx.needs_input(i) for i in range(2))
    return [ctx.emit("_mul", [dy, ctx.saved_input(1)], {"symbol": "*"}) if a else None,
            ctx.emit("_mul", [dy, ctx.saved_input(0)], {"symbol": "*"}) if b else None]


def _scalar(ctx):
    attrs = ctx.node.attrs
    if not ctx.needs_input(0):
        return [None]
    if attrs["symbol"] == "*":
        return [ctx.scale(ctx.grad(), attrs["scalar"])]
    if attrs["symbol"] == "-" and attrs["scalar_first"]:
        return [ctx.scale(ctx.grad(), -1.0)]
    return [ctx.grad()]


def _flatten(ctx):
    if not ctx.needs_input(0):
        return [None]
    return [ctx.emit("_reshape", [ctx.grad()], {"input_type": ctx.input_type(0)})]


def _concat(ctx):
    dy, axis, start, grads = ctx.grad(), ctx.node.attrs["axis"], 0, []
    for i in range(len(ctx.node.inputs)):
        length = ctx.input_type(i)[1][axis]
        grads.append(ctx.emit("_narrow", [dy], {"axis": axis, "start": start, "length": length})
                     if ctx.needs_input(i) else None)
        start = start + length
    return grads


def _split(ctx):
    if not ctx.needs_input(0):
        return [None]
    grads = [ctx.grad(k) for k in range(len(ctx.node.types))]
    like = next(g for g in grads if g is not None)
    parts = [g if g is not None else ctx.emit("_zeros", [like], {
        "input_type": ctx.output_type(k)}) for k, g in enumerate(grads)]
    return [ctx.emit("concat", parts, {"axis": 1})]


RULES = {
    "_add": _add, "_sub": _sub, "_mul": _mul, "_scalar": _scalar,
    "identity": _identity, "flatten": _flatten, "concat": _concat, "split": _split,
    "maxout": _maxout,
}
RULES.update({op: _parametric for op in LINEAR_IN_X + ("depthwise",)})
RULES.update({op: _pool for op in ("maxpool", "avgpool", "lppool", "wavgpool")})
RULES.update({op: _activation for op in ACTIVATION_GRADS})

for _name, _rule in RULES.items():
    OPS.attach_vjp(_name, _rule)
