"""Detector-stage nonlinearities, softmax, and the arithmetic `+ - *`."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.types import TensorType, dims_equal
from .base import OPS, Arg, OpDef, ShapeContext


def _same_shape(ctx: ShapeContext) -> list[TensorType]:
    return [ctx.x]


def _no_attrs(ctx: ShapeContext) -> dict:
    return {}


# name → (extra args, torch function of (x, attrs), doc)
ACTIVATIONS = {
    "relu": ((), lambda x, a: torch.relu(x), "max(0, x)"),
    "sigmoid": ((), lambda x, a: torch.sigmoid(x), "1 / (1 + exp(-x))"),
    "tanh": ((), lambda x, a: torch.tanh(x), "hyperbolic tangent"),
    "leaky_relu": ((Arg("slope", "float", 0.01),),
                   lambda x, a: F.leaky_relu(x, a["slope"]), "x if x > 0 else slope * x"),
    "elu": ((Arg("alpha", "float", 1.0),), lambda x, a: F.elu(x, a["alpha"]),
            "x if x > 0 else alpha * (exp(x) - 1)"),
    "softplus": ((), lambda x, a: F.softplus(x), "log(1 + exp(x))"),
    "identity": ((), lambda x, a: x, "x unchanged"),
}


def _activation_normalize(ctx: ShapeContext) -> dict:
    return {k: float(v) for k, v in ctx.attrs.items()}


def _activation_torch(fn):
    return lambda inputs, attrs, params: fn(inputs[0], attrs)


for _name, (_extra, _fn, _doc) in ACTIVATIONS.items():
    OPS.register(OpDef(_name, "activation", (Arg("x", "tensor"),) + _extra, _same_shape,
                       _activation_normalize, torch=_activation_torch(_fn), doc=_doc,
                       triton="elementwise"))


def _normalize_axis(ctx: ShapeContext) -> dict:
    axis = ctx.attrs["axis"]
    rank = ctx.x.rank
    axis = 1 if axis == "channel" else axis
    if not 1 <= axis < rank:
        raise ctx.error(f"axis= must be channel or an axis 1..{rank - 1} of a rank-{rank} tensor, "
                        f"got {axis}", "axis")
    return {"axis": axis}


OPS.register(OpDef(
    "softmax", "activation", (Arg("x", "tensor"), Arg("axis", "axis", "channel")), _same_shape,
    _normalize_axis, torch=lambda inputs, attrs, params: torch.softmax(inputs[0], attrs["axis"]),
    triton="softmax",
    doc="softmax over an axis, the channels by default: per-pixel class probabilities (9.6)",
))
OPS.register(OpDef(
    "log_softmax", "activation", (Arg("x", "tensor"), Arg("axis", "axis", "channel")), _same_shape,
    _normalize_axis,
    torch=lambda inputs, attrs, params: torch.log_softmax(inputs[0], attrs["axis"]),
    triton="softmax",
    doc="log of softmax, computed stably",
))


# -- arithmetic: the language's + - * (internal op names, not callable from .cdsl) ----------

def _binary_shape(ctx: ShapeContext) -> list[TensorType]:
    a, b = ctx.inputs
    symbol = ctx.attrs["symbol"]
    if a.rank != b.rank or not all(dims_equal(p, q) for p, q in zip(a.shape, b.shape)):
        raise ctx.error(f"'{symbol}' needs tensors of the same shape; got {a} and {b}")
    if a.dtype != b.dtype:
        raise ctx.error(f"'{symbol}' needs tensors of the same dtype; got {a.dtype} and {b.dtype}")
    return [a]


_BINARY = {"_add": ("+", torch.add), "_sub": ("-", torch.sub), "_mul": ("*", torch.mul)}
for _name, (_symbol, _fn) in _BINARY.items():
    OPS.register(OpDef(
        _name, "elementwise", (Arg("a", "tensor"), Arg("b", "tensor")), _binary_shape,
        lambda ctx, s=_symbol: {"symbol": s},
        torch=lambda inputs, attrs, params, f=_fn: f(inputs[0], inputs[1]),
        doc=f"a {_symbol} b, elementwise on equal shapes", triton="elementwise",
    ))


def _scalar_torch(inputs, attrs, params):
    x, c = inputs[0], attrs["scalar"]
    if attrs["symbol"] == "+":
        return x + c
    if attrs["symbol"] == "*":
        return x * c
    return c - x if attrs["scalar_first"] else x - c


OPS.register(OpDef(
    "_scalar", "elementwise",
    (Arg("x", "tensor"), Arg("scalar", "float"), Arg("symbol", "string"),
     Arg("scalar_first", "bool", False)),
    _same_shape, lambda ctx: dict(ctx.attrs), torch=_scalar_torch,
    doc="a tensor combined with a constant: x + c, x - c, c - x, x * c", triton="elementwise",
))
