"""The convolution family: conv, depthwise, local, tiled, deconv, dense
(LANGUAGE.md §6, the book's eq. 9.4–9.14)."""
from __future__ import annotations

import sympy

from ..ir.types import TensorType, static_value
from ..torch_ops import conv as tconv
from ..torch_ops import local as tlocal
from .base import OPS, Arg, OpDef, ParamShape, ShapeContext
from .spatial import (
    conv_output_sizes,
    effective_kernel,
    expand_spatial,
    normalize_pad,
    prod,
    require_spatial_input,
    require_static_spatial,
    resolve_pads,
)

BIAS_MODES = ("none", "channel", "location", "tiled")


def _check_out_and_bias(ctx: ShapeContext, what: str = "output channels") -> None:
    """Every parametric op: a positive output count; bias=tiled only on tiled."""
    a = ctx.attrs
    if a["out"] < 1:
        raise ctx.error(f"{what} must be >= 1, got {a['out']}", "out")
    if a.get("bias") == "tiled" and ctx.op != "tiled":
        raise ctx.error(f"bias=tiled needs the tiled op; {ctx.op} takes none, channel or location",
                        "bias")


# -- conv ---------------------------------------------------------------------------------

def _normalize_conv(ctx: ShapeContext) -> dict:
    require_spatial_input(ctx)
    _check_out_and_bias(ctx)
    a = ctx.attrs
    out = a["out"]
    table = a.get("connect")
    groups = a["groups"]
    if table is not None and groups != 1:
        raise ctx.error("connect= and groups= cannot be combined; a table already says which "
                        "channels each output reads", "connect")
    return {
        "out": out,
        "kernel": expand_spatial(ctx, "kernel"),
        "stride": expand_spatial(ctx, "stride"),
        "pad": normalize_pad(ctx),
        "dilation": expand_spatial(ctx, "dilation"),
        "groups": groups,
        "table": table,
        "bias": a["bias"],
        "flip": a["flip"],
        "separable": a["separable"],
    }


def _check_table(ctx: ShapeContext, table, out: int, channels: int):
    if len(table) != out:
        raise ctx.error(f"connection table has {len(table)} rows but the conv has {out} output "
                        f"channels; they must match", "connect")
    for row_index, row in enumerate(table):
        if not row:
            raise ctx.error(f"row {row_index} of the connection table is empty", "connect")
        for ch in row:
            if not 0 <= ch < channels:
                raise ctx.error(f"row {row_index} of the connection table reads input channel {ch}, "
                                f"but the input has channels 0..{channels - 1}", "connect")
        if len(set(row)) != len(row):
            raise ctx.error(f"row {row_index} of the connection table lists a channel twice",
                            "connect")


def _conv_shape(ctx: ShapeContext) -> list[TensorType]:
    a, x = ctx.attrs, ctx.x
    require_spatial_input(ctx)
    channels = x.channels
    if a["table"] is not None:
        _check_table(ctx, a["table"], a["out"], channels)
    if channels % a["groups"]:
        raise ctx.error(f"groups={a['groups']} must divide the {channels} input channels", "groups")
    if a["out"] % a["groups"]:
        raise ctx.error(f"groups={a['groups']} must divide the {a['out']} output channels", "groups")
    sizes, _ = conv_output_sizes(ctx, a["pad"], a["kernel"], a["stride"], a["dilation"])
    if a["bias"] == "location":
        require_static_spatial(ctx, sizes, "bias=location")
    return [TensorType(x.dtype, (x.shape[0], sympy.Integer(a["out"])) + sizes)]


def _bias_param(mode: str, out: int, sizes, tiles=None) -> dict:
    if mode == "channel":
        return {"bias": ParamShape((out,), is_bias=True)}
    if mode == "location":
        return {"bias": ParamShape((out,) + tuple(int(s) for s in sizes), is_bias=True)}
    if mode == "tiled":
        return {"bias": ParamShape(tuple(tiles) + (out,), is_bias=True)}
    return {}


def _conv_params(ctx: ShapeContext, outs) -> dict:
    a = ctx.attrs
    channels = ctx.x.channels
    per_group = channels // a["groups"]
    taps = prod(a["kernel"])
    fan_in = per_group * taps
    fan_out = a["out"] // a["groups"] * taps
    params = {}
    if a["table"] is not None:
        connections = sum(len(row) for row in a["table"])
        fan_in = max(1, connections * taps // a["out"])
        shape = (a["out"], channels) + a["kernel"]
        if a["separable"]:
            for d, k in enumerate(a["kernel"]):
                params[f"weight_{d}"] = ParamShape((a["out"], channels, k), fan_in, fan_out,
                                                   mask=a["table"], count=connections * k)
        else:
            params["weight"] = ParamShape(shape, fan_in, fan_out, mask=a["table"],
                                          count=connections * taps)
    elif a["separable"]:
        for d, k in enumerate(a["kernel"]):
            params[f"weight_{d}"] = ParamShape((a["out"], per_group, k), fan_in, fan_out)
    else:
        params["weight"] = ParamShape((a["out"], per_group) + a["kernel"], fan_in, fan_out)
    params.update(_bias_param(a["bias"], a["out"], outs[0].spatial))
    return params


def _conv_torch(inputs, attrs, params):
    x = inputs[0]
    pads = resolve_pads(attrs["pad"], tuple(x.shape[2:]), attrs["kernel"], attrs["stride"],
                        attrs["dilation"])
    return tconv.conv(x, params, dict(attrs, pads=pads))


CONV_ARGS = (
    Arg("x", "tensor"),
    Arg("out", "int"),
    Arg("kernel", "spatial"),
    Arg("stride", "spatial", 1),
    Arg("pad", "pad", "valid"),
    Arg("dilation", "spatial", 1),
    Arg("groups", "int", 1),
    Arg("connect", "table", None),
    Arg("bias", "enum", "channel", BIAS_MODES),
    Arg("flip", "bool", False),
    Arg("separable", "bool", False),
)

def conv_family(attrs: dict, inputs) -> str:
    """Which kernel computes a conv: fused 1-D passes for separable kernels, a
    direct kernel when every group reads one channel (depthwise; a width-1
    tl.dot would waste the tensor cores), else implicit GEMM."""
    if attrs["separable"]:
        return "separable"
    if attrs.get("rank1_separable"):
        return "separable_rank1"  # a frozen rank-1 kernel (passes/separable.py)
    if attrs["table"] is None and attrs["groups"] > 1 and attrs["groups"] == inputs[0].channels:
        return "depthwise"
    return "conv"


OPS.register(OpDef(
    "conv", "conv", CONV_ARGS, _conv_shape, _normalize_conv, _conv_params, _conv_torch,
    parametric=True, triton=conv_family,
    doc="multichannel convolution (eq. 9.7/9.8): cross-correlation, flip=true for true convolution",
))


# -- depthwise: a conv with groups = C_in (canonicalized to conv) ----------------------------

def _normalize_depthwise(ctx: ShapeContext) -> dict:
    require_spatial_input(ctx)
    multiplier = ctx.attrs["multiplier"]
    if multiplier < 1:
        raise ctx.error(f"multiplier= must be >= 1, got {multiplier}", "multiplier")
    channels = ctx.x.channels
    conv_ctx = ShapeContext(ctx.op, ctx.inputs, dict(ctx.attrs, out=channels * multiplier,
                                                     groups=channels, connect=None),
                            ctx.span, ctx.arg_spans, ctx.runtime)
    return _normalize_conv(conv_ctx)


OPS.register(OpDef(
    "depthwise", "conv",
    (Arg("x", "tensor"), Arg("kernel", "spatial"), Arg("multiplier", "int", 1))
    + tuple(a for a in CONV_ARGS if a.name in ("stride", "pad", "dilation", "bias", "flip",
                                               "separable")),
    _conv_shape, _normalize_depthwise, _conv_params, _conv_torch, parametric=True,
    triton=conv_family,
    doc="depthwise convolution: conv with groups = input channels, out = C_in * multiplier",
))


# -- local: unshared convolution (eq. 9.9) ---------------------------------------------------

def _normalize_local(ctx: ShapeContext) -> dict:
    require_spatial_input(ctx)
    _check_out_and_bias(ctx)
    a = ctx.attrs
    return {"out": a["out"], "kernel": expand_spatial(ctx, "kernel"),
            "stride": expand_spatial(ctx, "stride"), "pad": normalize_pad(ctx), "bias": a["bias"]}


def _local_shape(ctx: ShapeContext) -> list[TensorType]:
    a, x = ctx.attrs, ctx.x
    require_spatial_input(ctx)
    if ctx.op == "local":
        require_static_spatial(ctx, x.spatial, "local (one kernel per output position)")
    sizes, _ = conv_output_sizes(ctx, a["pad"], a["kernel"], a["stride"])
    if a["bias"] == "location":
        require_static_spatial(ctx, sizes, "bias=location")
    return [TensorType(x.dtype, (x.shape[0], sympy.Integer(a["out"])) + sizes)]


def _local_params(ctx: ShapeContext, outs) -> dict:
    a = ctx.attrs
    sizes = tuple(int(s) for s in outs[0].spatial)
    taps = prod(a["kernel"])
    weight = (a["out"],) + sizes + (ctx.x.channels,) + a["kernel"]
    params = {"weight": ParamShape(weight, ctx.x.channels * taps, a["out"] * taps)}
    params.update(_bias_param(a["bias"], a["out"], sizes))
    return params


def _resolved(attrs, x):
    return resolve_pads(attrs["pad"], tuple(x.shape[2:]), attrs["kernel"], attrs["stride"])


def _local_torch(inputs, attrs, params):
    x = inputs[0]
    y = tlocal.local_conv(x, params["weight"].to(x.dtype), attrs["stride"], _resolved(attrs, x))
    return tconv.add_bias(y, params.get("bias"), attrs["bias"])


OPS.register(OpDef(
    "local", "conv",
    (Arg("x", "tensor"), Arg("out", "int"), Arg("kernel", "spatial"), Arg("stride", "spatial", 1),
     Arg("pad", "pad", "valid"), Arg("bias", "enum", "location", BIAS_MODES)),
    _local_shape, _normalize_local, _local_params, _local_torch, parametric=True, triton="local",
    doc="locally connected (unshared) convolution, eq. 9.9",
))


# -- tiled convolution (eq. 9.10) ------------------------------------------------------------

def _normalize_tiled(ctx: ShapeContext) -> dict:
    require_spatial_input(ctx)
    _check_out_and_bias(ctx)
    a = ctx.attrs
    return {"out": a["out"], "kernel": expand_spatial(ctx, "kernel"),
            "stride": expand_spatial(ctx, "stride"), "pad": normalize_pad(ctx),
            "bias": a["bias"], "tiles": expand_spatial(ctx, "tiles")}


def _tiled_params(ctx: ShapeContext, outs) -> dict:
    a = ctx.attrs
    taps = prod(a["kernel"])
    weight = a["tiles"] + (a["out"], ctx.x.channels) + a["kernel"]
    params = {"weight": ParamShape(weight, ctx.x.channels * taps, a["out"] * taps)}
    params.update(_bias_param(a["bias"], a["out"], outs[0].spatial, a["tiles"]))
    return params


def _tiled_torch(inputs, attrs, params):
    x = inputs[0]
    y = tlocal.tiled_conv(x, params["weight"].to(x.dtype), attrs["stride"], _resolved(attrs, x))
    return tconv.add_bias(y, params.get("bias"), attrs["bias"])


OPS.register(OpDef(
    "tiled", "conv",
    (Arg("x", "tensor"), Arg("out", "int"), Arg("kernel", "spatial"), Arg("tiles", "spatial"),
     Arg("stride", "spatial", 1), Arg("pad", "pad", "valid"),
     Arg("bias", "enum", "tiled", BIAS_MODES)),
    _local_shape, _normalize_tiled, _tiled_params, _tiled_torch, parametric=True, triton="tiled",
    doc="tiled convolution, eq. 9.10: t kernels per dim, output position p uses kernel p mod t",
))


# -- deconv: transpose convolution (eq. 9.12-9.14) -------------------------------------------

def _normalize_deconv(ctx: ShapeContext) -> dict:
    require_spatial_input(ctx)
    _check_out_and_bias(ctx)
    a = ctx.attrs
    size = a.get("size")
    if size is not None:
        d = ctx.spatial_rank
        size = (size,) * d if not isinstance(size, tuple) else size
        if len(size) != d:
            raise ctx.error(f"size= needs {d} entries for a {d}-D input, got {len(size)}", "size")
    return {"out": a["out"], "kernel": expand_spatial(ctx, "kernel"),
            "stride": expand_spatial(ctx, "stride"), "pad": normalize_pad(ctx, modes=("valid", "same")),
            "dilation": expand_spatial(ctx, "dilation"), "size": size, "bias": a["bias"]}


def deconv_ranges(attrs, sizes):
    """Per dim: (natural output size, smallest and largest size= allowed).

    Explicit pads: natural (m−1)·s + k' − before − after, and size= may add up
    to s−1 (the rows a stride leaves ambiguous). `same` follows TensorFlow's
    transpose rule: natural m·s, and any size whose `same` conv gives m back,
    i.e. (m−1)·s+1 .. m·s."""
    ranges = []
    for axis, (m, k, s, r) in enumerate(zip(sizes, attrs["kernel"], attrs["stride"],
                                            attrs["dilation"])):
        keff = effective_kernel(k, r)
        if attrs["pad"] == "same":
            ranges.append((m * s, (m - 1) * s + 1, m * s))
        else:
            before, after = (0, 0) if attrs["pad"] == "valid" else attrs["pad"][axis]
            natural = (m - 1) * s + keff - before - after
            ranges.append((natural, natural, natural + s - 1))
    return ranges


def deconv_crops(attrs, sizes, out_sizes):
    """Where each output dim starts inside the full transposed convolution."""
    starts = []
    for axis, (m, k, s, r, out) in enumerate(zip(sizes, attrs["kernel"], attrs["stride"],
                                                 attrs["dilation"], out_sizes)):
        if attrs["pad"] == "same":
            total = max((m - 1) * s + effective_kernel(k, r) - out, 0)
            starts.append(total // 2)
        else:
            starts.append(0 if attrs["pad"] == "valid" else attrs["pad"][axis][0])
    return starts


# Sizes substituted for the symbols of a size difference, each symbol its own
# value, before `_always_negative` falls back on sympy.simplify.
_PROBE_SIZES = (1, 2, 3, 4, 5, 7, 12, 97)


def _always_negative(diff) -> bool:
    """Whether the size difference `diff` is one negative integer whatever the
    sizes: what `sympy.simplify(diff)` being a negative Integer said before, at
    a fraction of the cost (simplify took most of the compile time of the nets
    with a deconv). A negative constant is negative and equal at every size, so
    a probe at some sizes that finds a value >= 0, or two different values,
    settles it; only a difference that looks constant and negative at every
    probe, or that probing cannot evaluate, still goes to simplify."""
    diff = sympy.sympify(diff)
    if diff.is_Integer:
        return bool(diff < 0)
    symbols = sorted(diff.free_symbols, key=str)
    # Probing is only sound inside the symbols' domain: sizes are positive integers.
    if all(s.is_integer and s.is_positive for s in symbols):
        first = None
        for base in _PROBE_SIZES:
            value = diff.xreplace({s: sympy.Integer(base + i) for i, s in enumerate(symbols)})
            if not value.is_Integer:
                break
            if value >= 0 or (first is not None and value != first):
                return False
            first = value
    simplified = sympy.simplify(diff)
    return bool(simplified.is_Integer and simplified < 0)


def _deconv_shape(ctx: ShapeContext) -> list[TensorType]:
    a, x = ctx.attrs, ctx.x
    require_spatial_input(ctx)
    out_sizes = []
    for axis, (natural, low, high) in enumerate(deconv_ranges(a, x.spatial)):
        natural, low, high = (sympy.sympify(v) for v in (natural, low, high))
        want = natural if a["size"] is None else sympy.sympify(a["size"][axis])
        if _always_negative(want - low) or _always_negative(high - want):
            raise ctx.error(f"size= {want} is not a possible output along spatial dim {axis}: "
                            f"with this stride and padding it must be in {low}..{high}", "size")
        known = static_value(want)
        if known is not None and known < 1:
            raise ctx.error(f"transpose convolution output would be {known} along spatial dim "
                            f"{axis}; reduce pad=", "pad")
        out_sizes.append(want)
    if a["bias"] == "location":
        require_static_spatial(ctx, out_sizes, "bias=location")
    return [TensorType(x.dtype, (x.shape[0], sympy.Integer(a["out"])) + tuple(out_sizes))]


def _deconv_params(ctx: ShapeContext, outs) -> dict:
    a = ctx.attrs
    taps = prod(a["kernel"])
    weight = (ctx.x.channels, a["out"]) + a["kernel"]
    params = {"weight": ParamShape(weight, ctx.x.channels * taps, a["out"] * taps)}
    params.update(_bias_param(a["bias"], a["out"], outs[0].spatial))
    return params


def _deconv_torch(inputs, attrs, params):
    x = inputs[0]
    sizes = tuple(x.shape[2:])
    size = attrs["size"] or tuple(nat for nat, _, _ in deconv_ranges(attrs, sizes))
    starts = deconv_crops(attrs, sizes, size)
    return tconv.deconv(x, params, dict(attrs, starts=starts, size=tuple(size)))


OPS.register(OpDef(
    "deconv", "conv",
    (Arg("x", "tensor"), Arg("out", "int"), Arg("kernel", "spatial"), Arg("stride", "spatial", 1),
     Arg("pad", "pad", 0), Arg("size", "size", None), Arg("dilation", "spatial", 1),
     Arg("bias", "enum", "channel", BIAS_MODES)),
    _deconv_shape, _normalize_deconv, _deconv_params, _deconv_torch, parametric=True,
    triton="deconv",
    doc="transpose convolution (eq. 9.12-9.14); size= picks the output size when stride makes it "
        "ambiguous",
))


# -- dense -----------------------------------------------------------------------------------

def _normalize_dense(ctx: ShapeContext) -> dict:
    _check_out_and_bias(ctx, "output features")
    a = ctx.attrs
    if a["bias"] not in ("none", "channel"):
        raise ctx.error("dense takes bias=none or bias=channel", "bias")
    return {"out": a["out"], "bias": a["bias"]}


def _dense_shape(ctx: ShapeContext) -> list[TensorType]:
    x = ctx.x
    if x.rank != 2:
        raise ctx.error(f"dense needs an [N, F] input; got {x} (use flatten(x) first)")
    if static_value(x.shape[1]) is None:
        raise ctx.error(f"dense needs a fixed number of input features, but it is {x.shape[1]}: "
                        f"pool to a fixed size first (e.g. maxpool(x, output=4))")
    return [TensorType(x.dtype, (x.shape[0], sympy.Integer(ctx.attrs["out"])))]


def _dense_params(ctx: ShapeContext, outs) -> dict:
    features = int(ctx.x.shape[1])
    out = ctx.attrs["out"]
    params = {"weight": ParamShape((out, features), features, out)}
    params.update(_bias_param(ctx.attrs["bias"], out, ()))
    return params


OPS.register(OpDef(
    "dense", "conv",
    (Arg("x", "tensor"), Arg("out", "int"), Arg("bias", "enum", "channel", BIAS_MODES)),
    _dense_shape, _normalize_dense, _dense_params,
    lambda inputs, attrs, params: tconv.dense(inputs[0], params, attrs),
    parametric=True, triton="dense", doc="fully connected layer on [N, F]",
))
