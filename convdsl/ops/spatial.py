"""Spatial arithmetic shared by the conv and pooling families.

Sizes may be Python ints (run time) or sympy expressions (compile time, with
size symbols); the same formulas serve both.
"""
from __future__ import annotations

import math

import sympy

from ..ir.types import Dim, static_value
from .base import ShapeContext

PAD_MODES = ("valid", "same", "full")


def _is_int(v) -> bool:
    return isinstance(v, int) or (isinstance(v, sympy.Basic) and v.is_Integer)


def _ceil_div(a, b):
    if _is_int(a) and _is_int(b):
        return -(-int(a) // int(b))
    return sympy.ceiling(sympy.Rational(1, 1) * a / b)


def _floor_div(a, b):
    if _is_int(a) and _is_int(b):
        return int(a) // int(b)
    return sympy.floor(sympy.Rational(1, 1) * a / b)


def _max0(v):
    if _is_int(v):
        return max(int(v), 0)
    return sympy.Max(v, 0)


def effective_kernel(kernel: int, dilation: int) -> int:
    """The extent a dilated kernel covers: dilation·(k−1)+1."""
    return dilation * (kernel - 1) + 1


def expand_spatial(ctx: ShapeContext, name: str, minimum: int = 1) -> tuple[int, ...]:
    """An int (same in every dim) or a tuple with one entry per spatial dim."""
    value = ctx.attrs[name]
    d = ctx.spatial_rank
    if isinstance(value, int):
        value = (value,) * d
    value = tuple(value)
    if len(value) != d:
        raise ctx.error(f"{name}= needs {d} entr{'y' if d == 1 else 'ies'} for a {d}-D input "
                        f"(one per spatial dim), got {len(value)}", name)
    for v in value:
        if not isinstance(v, int) or v < minimum:
            raise ctx.error(f"{name}= must be an integer >= {minimum}, got {v}", name)
    return value


def normalize_pad(ctx: ShapeContext, name: str = "pad", modes=PAD_MODES):
    """valid/same/full stay words; an int or tuple becomes one (before, after) pair per dim."""
    value = ctx.attrs[name]
    d = ctx.spatial_rank
    if isinstance(value, str):
        if value not in modes:
            raise ctx.error(f"{name}= must be {', '.join(modes)}, an integer or a tuple; got '{value}'",
                            name)
        return value
    if isinstance(value, int):
        value = (value,) * d
    value = tuple(value)
    if len(value) != d:
        raise ctx.error(f"{name}= needs {d} entries for a {d}-D input (one per spatial dim), "
                        f"got {len(value)}", name)
    pairs = []
    for v in value:
        pair = (v, v) if isinstance(v, int) else tuple(v)
        if len(pair) != 2 or not all(isinstance(p, int) and p >= 0 for p in pair):
            raise ctx.error(f"{name}= entries must be integers >= 0 or (before, after) pairs", name)
        pairs.append(pair)
    return tuple(pairs)


def resolve_pads(pad, sizes, kernel, stride, dilation=None):
    """(before, after) per dim. `same` follows TensorFlow's rule: total padding
    max((ceil(m/s)−1)·s + k' − m, 0), the smaller half before."""
    d = len(sizes)
    dilation = dilation or (1,) * d
    if not isinstance(pad, str):
        return tuple(tuple(p) for p in pad)
    pairs = []
    for m, k, s, r in zip(sizes, kernel, stride, dilation):
        keff = effective_kernel(k, r)
        if pad == "valid":
            pairs.append((0, 0))
        elif pad == "full":
            pairs.append((keff - 1, keff - 1))
        else:
            total = _max0((_ceil_div(m, s) - 1) * s + keff - m)
            before = _floor_div(total, 2)
            pairs.append((before, total - before))
    return tuple(pairs)


def window_output(m: Dim, before, after, keff: int, stride: int):
    """Number of window positions: floor((m + b + a − k')/s) + 1."""
    return _floor_div(m + before + after - keff, stride) + 1


def conv_output_sizes(ctx: ShapeContext, pad, kernel, stride, dilation=None, what="kernel"):
    """Output spatial sizes of a windowed op, checking windows fit where sizes are known."""
    sizes = ctx.x.spatial
    dilation = dilation or (1,) * len(sizes)
    pads = resolve_pads(pad, sizes, kernel, stride, dilation)
    out = []
    for axis, (m, k, s, r, (b, a)) in enumerate(zip(sizes, kernel, stride, dilation, pads)):
        keff = effective_kernel(k, r)
        if pad == "same":
            out.append(_ceil_div(m, s))
            continue
        padded = m + b + a
        known = static_value(sympy.sympify(padded))
        if known is not None and known < keff:
            extent = f"{k}" if r == 1 else f"{k} (dilated to {keff})"
            raise ctx.error(f"{what} {extent} is larger than the padded input {known} along spatial "
                            f"dim {axis} (input size {m})", "kernel" if what == "kernel" else None)
        out.append(window_output(m, b, a, keff, s))
    return tuple(sympy.sympify(o) for o in out), pads


def require_spatial_input(ctx: ShapeContext, what: str | None = None):
    x = ctx.x
    if not 3 <= x.rank <= 5:
        raise ctx.error(f"{what or ctx.op} needs a [N, C, spatial...] input with 1 to 3 spatial dims; "
                        f"got {x}")
    if x.channels is None:
        raise ctx.error(f"{what or ctx.op} needs a fixed channel count; got {x}")


def require_static_spatial(ctx: ShapeContext, sizes, why: str):
    for d in sizes:
        if static_value(sympy.sympify(d)) is None:
            raise ctx.error(f"{why} needs a fixed spatial size, but a size here is {d}; "
                            f"declare the input with integer spatial dims")


def prod(values) -> int:
    return math.prod(int(v) for v in values)
