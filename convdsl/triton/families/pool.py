"""Spatial pooling (max, avg, Lp, Gaussian-weighted; strided, padded or
adaptive; 1-D to 3-D) and maxout, each one bandwidth-bound kernel.

Every lane computes one output element: it splits its flat index into
(n, c, o...) in the output's memory order and loops over the window's taps.
Windows, strides and the Lp exponent / Gaussian width are compile-time
constants; sizes, pads (`same` pads follow the run-time sizes) and strides are
arguments. Inputs keep their strides (a channels-last input is read in place
and gives a channels-last output, like torch's pooling)."""
from __future__ import annotations

import functools
import math

import torch

from ...ir import ValueRef
from ...ir.types import evaluate, static_value
from ...ops.spatial import resolve_pads
from .. import autotune
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

DIMS = ("d", "h", "w")  # spatial dim letters, outermost first

# Block configs, best first. The GPU tunes among its list on first use
# (autotune.py); the first is the default: 4 elements a thread keeps a 27-tap
# unrolled window's loads in flight without spilling, and num_warps=4 is what
# aot.compile_kernel builds. The interpreter
# runs faster with fewer, bigger programs.
CONFIGS = {
    "gpu": [{"BLOCK": 512, "num_warps": 4}, {"BLOCK": 1024, "num_warps": 4},
            {"BLOCK": 1024, "num_warps": 8}],
    "cpu": [{"BLOCK": 4096, "num_warps": 4}],
}
MAXOUT_CONFIGS = CONFIGS

# FLOPs per tap by kind (compare/add; square-add or |x|^p; weight, multiply, two adds)
_TAP_FLOPS = {"max": 1, "avg": 1, "lp": 2, "wavg": 4}
# The AOT specialization of an adaptive cell's length when the input size is symbolic.
_AOT_CELL = 4


def pick_config(configs: dict, tensor: torch.Tensor) -> dict:
    """The block config for the device: the interpreter's on the CPU, else the GPU's first."""
    return dict(configs[target(tensor)][0])


def numel(ttype, env) -> int:
    """Elements of a (possibly symbolic) tensor type at sizes `env`."""
    return math.prod(evaluate(d, env) for d in ttype.shape)


def channels_inner(x: torch.Tensor) -> bool:
    """The channel dim varies fastest in memory (a channels-last layout)."""
    others = [x.stride(i) for i in range(2, x.dim()) if x.shape[i] > 1]
    return x.dim() > 2 and x.shape[1] > 1 and bool(others) and x.stride(1) < min(others)


def empty_output(x: torch.Tensor, shape: tuple, c_inner: bool) -> torch.Tensor:
    """[N, C', *s'] in x's dtype: channels-last when `c_inner`, else contiguous."""
    if not c_inner:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    permuted = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return torch.empty(permuted, dtype=x.dtype, device=x.device).movedim(-1, 1)


def cell_bounds(m: int, a: int) -> list[tuple[int, int]]:
    """Adaptive cells along one dim: cell i covers [floor(i*m/a), ceil((i+1)*m/a))."""
    return [(i * m // a, -(-(i + 1) * m // a)) for i in range(a)]


def longest_cell(m: int, a: int) -> int:
    return max(end - start for start, end in cell_bounds(m, a))


def _dims(rank: int) -> list[str]:
    return list(DIMS[3 - rank:])


def _tap_expressions(dims: list[str]) -> list[str]:
    """Per dim, its tap offset from the flat tap index t (row-major over the window)."""
    exprs = []
    for i, d in enumerate(dims):
        later = " * ".join(f"K_{e.upper()}" for e in dims[i + 1:])
        expr = "t" if not later else f"t // {later}" if "*" not in later else f"t // ({later})"
        if i > 0:
            expr = f"{expr} % K_{d.upper()}"
        exprs.append(expr)
    return exprs


def _pool_args(dims: list[str], adaptive: bool) -> list[str]:
    """The kernel's run-time arguments in order (the template's signature)."""
    names = ["x_ptr", "out_ptr", "n_out", "C"] + [d.upper() for d in dims]
    names += [f"O{d.upper()}" for d in dims]
    if not adaptive:
        names += [f"pad_{d}" for d in dims]
    names += ["stride_xn", "stride_xc"] + [f"stride_x{d}" for d in dims]
    names += ["stride_on", "stride_oc"] + [f"stride_o{d}" for d in dims]
    return names


class Pool(Family):
    name = "pool"
    UNROLL_TAPS = 64  # fixed windows with at most this many taps unroll

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        a = node.attrs
        kind, adaptive = a["kind"], "output" in a
        rank = graph.type_of(node.inputs[0]).rank - 2
        dims = _dims(rank)
        params = {"kind": kind, "dims": dims, "adaptive": adaptive, "taps": _tap_expressions(dims),
                  "n_taps": " * ".join(f"K_{d.upper()}" for d in dims),
                  "unroll": not adaptive and math.prod(a["window"]) <= self.UNROLL_TAPS,
                  "p_mode": "none", "P": "2.0", "clipped": adaptive, "NEAR2": "0.0",
                  "CENTRE": ["0.0"] * rank, "HALF": ["0.0"] * rank, "WSCALE": "1.0"}
        if kind == "lp":
            p = float(a["p"])
            params["p_mode"] = {2.0: "two", 1.0: "one"}.get(p, "general")
            params["P"] = float_literal(p)
        if kind == "wavg":
            params["WSCALE"] = float_literal(1.0 / (2.0 * a["sigma"] ** 2 * math.log(2.0)))
            if not adaptive:
                window = a["window"]
                half = [0.5 if k % 2 == 0 else 0.0 for k in window]
                params["CENTRE"] = [float_literal((k - 1) / 2) for k in window]
                params["HALF"] = [float_literal(h) for h in half]
                params["NEAR2"] = float_literal(sum(h * h for h in half))
                pad = a["pad"]
                params["clipped"] = pad == "same" if isinstance(pad, str) else any(map(any, pad))
        name = safe_name("pool", kind, "adaptive" if adaptive else "", node.id)
        source = module_source(render("pool.py.jinja", name=name, **params))
        meta = {"kind": kind, "rank": rank, "adaptive": adaptive,
                "window": tuple(a.get("window") or ()), "stride": tuple(a.get("stride") or ()),
                "output": tuple(a.get("output") or ())}
        return KernelPlan(name, self.name, source, (node.id,), tuple(node.inputs),
                          (ValueRef(node.id, 0),), meta=meta)

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        (x,) = inputs
        (a,) = attrs.values()
        meta = plan.meta
        n, c, sizes = x.shape[0], x.shape[1], tuple(x.shape[2:])
        assert len(sizes) == meta["rank"], (x.shape, meta)
        # output sizes, taps per dim, strides and pads
        if meta["adaptive"]:
            out_sizes = tuple(int(o) for o in a["output"])
            taps = [longest_cell(m, o) for m, o in zip(sizes, out_sizes)]
            geometry, strides = [], {}
        else:
            window, stride = tuple(a["window"]), tuple(a["stride"])
            pads = resolve_pads(a["pad"], sizes, window, stride)
            out_sizes = tuple((m + b + e - k) // s + 1
                              for m, (b, e), k, s in zip(sizes, pads, window, stride))
            taps = list(window)
            geometry = [int(b) for b, _ in pads]
            strides = {f"S_{d.upper()}": s for d, s in zip(_dims(len(sizes)), stride)}
        # allocate the output in the input's layout
        c_inner = channels_inner(x)
        out = empty_output(x, (n, c) + out_sizes, c_inner)
        if out.numel() == 0:
            return [out]
        # grid and launch; the config is tuned on first use on a GPU
        if config is None:  # timing relaunches this with each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, CONFIGS, (x,), relaunch, extra=taps)
        grid = (cdiv(out.numel(), config["BLOCK"]),)
        windows = {f"K_{d.upper()}": k for d, k in zip(_dims(len(sizes)), taps)}
        kernel[grid](x, out, out.numel(), c, *sizes, *out_sizes, *geometry, *x.stride(),
                     *out.stride(), **windows, **strides, C_INNER=c_inner,
                     INDEX_64=needs_int64(x, out), **config)
        return [out]

    def aot(self, plan, graph):
        meta = plan.meta
        dims = _dims(meta["rank"])
        x_type = graph.type_of(plan.inputs[0])
        pointer = POINTER[x_type.dtype]
        signature = {name: "i32" for name in _pool_args(dims, meta["adaptive"])}
        signature.update(x_ptr=pointer, out_ptr=pointer)
        # A contiguous input and output: the innermost strides are 1, as the JIT specializes.
        constexprs = {f"stride_x{dims[-1]}": 1, f"stride_o{dims[-1]}": 1}
        if meta["adaptive"]:
            for d, m, o in zip(dims, x_type.shape[2:], meta["output"]):
                known = static_value(m)
                constexprs[f"K_{d.upper()}"] = longest_cell(known, o) if known else _AOT_CELL
        else:
            for d, k, s in zip(dims, meta["window"], meta["stride"]):
                constexprs[f"K_{d.upper()}"] = k
                constexprs[f"S_{d.upper()}"] = s
        config = CONFIGS["gpu"][0]
        constexprs.update(C_INNER=False, BLOCK=config["BLOCK"], INDEX_64=False)
        signature.update({k: "constexpr" for k in constexprs})
        return signature, constexprs

    def cost(self, plan, graph, env):
        meta = plan.meta
        x_type = graph.type_of(plan.inputs[0])
        out_type = graph.type_of(plan.outputs[0])
        n_in, n_out = numel(x_type, env), numel(out_type, env)
        if meta["adaptive"]:
            sizes = [evaluate(d, env) for d in x_type.shape[2:]]
            planes = n_out // math.prod(meta["output"])
            taps = planes * math.prod(sum(e - s for s, e in cell_bounds(m, o))
                                      for m, o in zip(sizes, meta["output"]))
        else:
            taps = n_out * math.prod(meta["window"])
        return taps * _TAP_FLOPS[meta["kind"]], (n_in + n_out) * ITEMSIZE[x_type.dtype]


class Maxout(Family):
    """[N, C, *s] → [N, C / pieces, *s]: the max over each run of `pieces` channels."""

    name = "maxout"

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        dims = _dims(graph.type_of(node.inputs[0]).rank - 2)
        name = safe_name("maxout", node.id)
        source = module_source(render("maxout.py.jinja", name=name, dims=dims,
                                      unroll=node.attrs["pieces"] <= 16))
        return KernelPlan(name, self.name, source, (node.id,), tuple(node.inputs),
                          (ValueRef(node.id, 0),),
                          meta={"rank": len(dims), "pieces": node.attrs["pieces"]})

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        (x,) = inputs
        (a,) = attrs.values()
        pieces = int(a["pieces"])
        n, c, sizes = x.shape[0], x.shape[1], tuple(x.shape[2:])
        assert c % pieces == 0 and len(sizes) == plan.meta["rank"], (x.shape, pieces)
        # allocate the output in the input's layout
        c_inner = channels_inner(x)
        out = empty_output(x, (n, c // pieces) + sizes, c_inner)
        if out.numel() == 0:
            return [out]
        # grid and launch; the config is tuned on first use on a GPU
        if config is None:  # timing relaunches this with each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, MAXOUT_CONFIGS, (x,), relaunch, extra=pieces)
        grid = (cdiv(out.numel(), config["BLOCK"]),)
        kernel[grid](x, out, out.numel(), c // pieces, *sizes, *x.stride(), *out.stride(),
                     PIECES=pieces, C_INNER=c_inner, INDEX_64=needs_int64(x, out), **config)
        return [out]

    def aot(self, plan, graph):
        dims = _dims(plan.meta["rank"])
        pointer = POINTER[graph.type_of(plan.inputs[0]).dtype]
        names = (["n_out", "G"] + [d.upper() for d in dims]
                 + ["stride_xn", "stride_xc"] + [f"stride_x{d}" for d in dims]
                 + ["stride_on", "stride_oc"] + [f"stride_o{d}" for d in dims])
        signature = {"x_ptr": pointer, "out_ptr": pointer, **{k: "i32" for k in names}}
        inner = dims[-1] if dims else "c"
        config = MAXOUT_CONFIGS["gpu"][0]
        constexprs = {f"stride_x{inner}": 1, f"stride_o{inner}": 1, "PIECES": plan.meta["pieces"],
                      "C_INNER": False, "BLOCK": config["BLOCK"], "INDEX_64": False}
        signature.update({k: "constexpr" for k in constexprs})
        return signature, constexprs

    def cost(self, plan, graph, env):
        x_type = graph.type_of(plan.inputs[0])
        n_in, n_out = numel(x_type, env), numel(graph.type_of(plan.outputs[0]), env)
        return n_in - n_out, (n_in + n_out) * ITEMSIZE[x_type.dtype]
