"""Pooling (LANGUAGE.md §6, the book's 9.3): max, avg, Lp and Gaussian-weighted,
strided, padded or adaptive, in 1-D/2-D/3-D; and maxout across channels."""
from __future__ import annotations

import sympy

from ..ir.types import TensorType
from ..torch_ops import pooling as tpool
from .base import OPS, Arg, OpDef, ShapeContext
from .spatial import (
    conv_output_sizes,
    expand_spatial,
    normalize_pad,
    require_spatial_input,
    resolve_pads,
)

POOL_KINDS = {"maxpool": "max", "avgpool": "avg", "lppool": "lp", "wavgpool": "wavg"}


def _normalize_pool(ctx: ShapeContext) -> dict:
    require_spatial_input(ctx)
    a = ctx.attrs
    kind = POOL_KINDS[ctx.op]
    attrs = {"kind": kind}
    if kind == "lp":
        if not a["p"] > 0:
            raise ctx.error(f"p= must be > 0, got {a['p']}", "p")
        attrs["p"] = float(a["p"])
    if kind == "wavg":
        # Below 1e-6 the weights are already all on the nearest taps, and
        # 1/(2 sigma^2) would overflow (a division by zero in f64, inf in f32).
        if not a["sigma"] >= 1e-6:
            raise ctx.error(f"sigma= must be >= 1e-6, got {a['sigma']}", "sigma")
        attrs["sigma"] = float(a["sigma"])
    if a["output"] is not None:
        if a["window"] is not None:
            raise ctx.error("give either a window or output=, not both", "output")
        for other in ("stride", "pad"):
            if a.get(other) not in (None, 0):
                raise ctx.error(f"{other}= has no meaning with output= (adaptive pooling)", other)
        attrs["output"] = expand_spatial(ctx, "output")
        return attrs
    if a["window"] is None:
        raise ctx.error(f"{ctx.op} needs a window (e.g. {ctx.op}(x, 2)) or output=(a, b)")
    attrs["window"] = expand_spatial(ctx, "window")
    attrs["stride"] = attrs["window"] if a["stride"] is None else expand_spatial(ctx, "stride")
    attrs["pad"] = normalize_pad(ctx)
    if not isinstance(attrs["pad"], str):
        for (before, after), k in zip(attrs["pad"], attrs["window"]):
            if max(before, after) >= k:
                raise ctx.error(f"pad= must be smaller than the window ({k}): a window of padding "
                                f"alone has nothing to pool", "pad")
    elif attrs["pad"] == "full":
        raise ctx.error("pad=full would make windows of padding alone; use valid, same or a number",
                        "pad")
    return attrs


def _pool_shape(ctx: ShapeContext) -> list[TensorType]:
    a, x = ctx.attrs, ctx.x
    require_spatial_input(ctx)
    if "output" in a:
        sizes = tuple(sympy.Integer(o) for o in a["output"])
    else:
        sizes, _ = conv_output_sizes(ctx, a["pad"], a["window"], a["stride"], what="window")
    return [TensorType(x.dtype, x.shape[:2] + sizes)]


def _pool_torch(inputs, attrs, params):
    x = inputs[0]
    extra = {"p": attrs.get("p", 2.0), "sigma": attrs.get("sigma", 1.0)}
    if "output" in attrs:
        return tpool.adaptive_pool(x, attrs["kind"], attrs["output"], **extra)
    pads = resolve_pads(attrs["pad"], tuple(x.shape[2:]), attrs["window"], attrs["stride"])
    return tpool.pool(x, attrs["kind"], attrs["window"], attrs["stride"], pads, **extra)


_POOL_COMMON = (Arg("x", "tensor"), Arg("window", "spatial", None), Arg("stride", "spatial", None),
                Arg("pad", "pad", 0), Arg("output", "spatial", None))
_POOL_EXTRA = {"maxpool": (), "avgpool": (), "lppool": (Arg("p", "float", 2.0),),
               "wavgpool": (Arg("sigma", "float", 1.0),)}
_POOL_DOCS = {
    "maxpool": "max over each window (padding never wins)",
    "avgpool": "mean over the real inputs of each window (padding not counted)",
    "lppool": "(sum |x|^p)^(1/p) over each window; p=2 is L2 pooling",
    "wavgpool": "Gaussian-weighted average, weights exp(-d^2/2 sigma^2) from the window centre",
}

for _name in POOL_KINDS:
    OPS.register(OpDef(_name, "pool", _POOL_COMMON + _POOL_EXTRA[_name], _pool_shape,
                       _normalize_pool, torch=_pool_torch, doc=_POOL_DOCS[_name], triton="pool"))


def _normalize_maxout(ctx: ShapeContext) -> dict:
    pieces = ctx.attrs["pieces"]
    if pieces < 1:
        raise ctx.error(f"pieces= must be >= 1, got {pieces}", "pieces")
    return {"pieces": pieces}


def _maxout_shape(ctx: ShapeContext) -> list[TensorType]:
    x = ctx.x
    if x.rank < 2 or x.channels is None:
        raise ctx.error(f"maxout needs an input with a fixed channel dim; got {x}")
    pieces = ctx.attrs["pieces"]
    if x.channels % pieces:
        raise ctx.error(f"maxout with pieces={pieces} needs the channel count ({x.channels}) to be a "
                        f"multiple of {pieces}", "pieces")
    return [TensorType(x.dtype, (x.shape[0], sympy.Integer(x.channels // pieces)) + x.shape[2:])]


OPS.register(OpDef(
    "maxout", "pool", (Arg("x", "tensor"), Arg("pieces", "int")), _maxout_shape, _normalize_maxout,
    torch=lambda inputs, attrs, params: tpool.maxout(inputs[0], attrs["pieces"]), triton="maxout",
    doc="cross-channel pooling: max over each run of `pieces` consecutive channels (figure 9.9)",
))
