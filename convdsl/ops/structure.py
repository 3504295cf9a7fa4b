"""Structure ops: flatten, concat, split (LANGUAGE.md §6, 'Structure'); and net inputs."""
from __future__ import annotations

import sympy
import torch

from ..ir.types import TensorType, dims_equal
from .base import OPS, Arg, OpDef, ShapeContext


def _flatten_shape(ctx: ShapeContext) -> list[TensorType]:
    x = ctx.x
    if x.rank < 2:
        raise ctx.error(f"flatten needs a batched input [N, ...]; got {x}")
    features = sympy.Integer(1)
    for d in x.shape[1:]:
        features = features * d
    return [TensorType(x.dtype, (x.shape[0], features))]


OPS.register(OpDef(
    "flatten", "structure", (Arg("x", "tensor"),), _flatten_shape, lambda ctx: {},
    torch=lambda inputs, attrs, params: torch.flatten(inputs[0], 1), triton="view",
    doc="[N, C, ...] to [N, F], channel-major (as torch.flatten(x, 1))",
))


def _normalize_concat(ctx: ShapeContext) -> dict:
    axis = ctx.attrs["axis"]
    axis = 1 if axis == "channel" else axis
    rank = ctx.x.rank
    if not 1 <= axis < rank:
        raise ctx.error(f"axis= must be channel or an axis 1..{rank - 1}, got {axis}", "axis")
    return {"axis": axis}


def _concat_shape(ctx: ShapeContext) -> list[TensorType]:
    axis = ctx.attrs["axis"]
    first = ctx.inputs[0]
    total = sympy.Integer(0)
    for index, t in enumerate(ctx.inputs):
        if t.rank != first.rank:
            raise ctx.error(f"concat needs tensors of one rank; operand {index} is {t}, operand 0 "
                            f"is {first}")
        if t.dtype != first.dtype:
            raise ctx.error(f"concat needs one dtype; operand {index} is {t.dtype}, operand 0 is "
                            f"{first.dtype}")
        for ax, (p, q) in enumerate(zip(t.shape, first.shape)):
            if ax != axis and not dims_equal(p, q):
                raise ctx.error(f"concat along axis {axis} needs the other dims equal; operand "
                                f"{index} is {t}, operand 0 is {first}")
        total = total + t.shape[axis]
    shape = list(first.shape)
    shape[axis] = total
    return [TensorType(first.dtype, tuple(shape))]


OPS.register(OpDef(
    "concat", "structure", (Arg("tensors", "tensor"), Arg("axis", "axis", "channel")),
    _concat_shape, _normalize_concat, variadic=True,
    torch=lambda inputs, attrs, params: torch.cat(inputs, attrs["axis"]), triton="concat",
    doc="concatenate along an axis, the channels by default",
))


def _normalize_split(ctx: ShapeContext) -> dict:
    x = ctx.x
    sizes = ctx.attrs["sizes"]
    if x.rank < 2 or x.channels is None:
        raise ctx.error(f"split needs an input with a fixed channel dim; got {x}")
    if isinstance(sizes, int):
        if sizes < 1 or x.channels % sizes:
            raise ctx.error(f"split into {sizes} equal parts needs the channel count "
                            f"({x.channels}) to be a multiple of it", "sizes")
        sizes = (x.channels // sizes,) * sizes
    sizes = tuple(sizes)
    if any(s < 1 for s in sizes):
        raise ctx.error("split sizes must be >= 1", "sizes")
    return {"sizes": sizes}


def _split_shape(ctx: ShapeContext) -> list[TensorType]:
    x = ctx.x
    sizes = ctx.attrs["sizes"]
    if sum(sizes) != x.channels:
        raise ctx.error(f"split sizes {list(sizes)} add up to {sum(sizes)}, but the input has "
                        f"{x.channels} channels", "sizes")
    return [TensorType(x.dtype, (x.shape[0], sympy.Integer(s)) + x.shape[2:]) for s in sizes]


OPS.register(OpDef(
    "split", "structure", (Arg("x", "tensor"), Arg("sizes", "ints")), _split_shape,
    _normalize_split, results=lambda attrs: len(attrs["sizes"]),
    torch=lambda inputs, attrs, params: list(torch.split(inputs[0], list(attrs["sizes"]), 1)),
    triton="view",
    doc="split along the channels: a, b = split(x, [ca, cb])",
))

OPS.register(OpDef(
    "_input", "input", (), lambda ctx: [ctx.attrs["type"]], doc="a net input",
))
