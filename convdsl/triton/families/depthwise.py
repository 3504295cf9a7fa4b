"""Depthwise convolution (a conv whose groups equal its input channels): a
direct kernel, one tile of an output plane per program, no tl.dot.

A fused node [depthwise conv, elementwise steps...] (ops/fused.py) is the same
kernel with the epilogue (families/epilogue.py) applied before the one store."""
from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch

from ...ir import ValueRef
from .. import autotune
from ..codegen import module_source, render, safe_name
from .base import (
    ITEMSIZE,
    Family,
    KernelPlan,
    cdiv,
    needs_int64,
)
from .conv import epilogue_bytes, epilogue_meta, epilogue_outputs
from .epilogue import (
    anchor_step,
    epilogue_flops,
    epilogue_of,
    epilogue_signature,
    launch_attrs,
    launch_params,
)
from .spatial import (  # noqa: F401  (the helpers this family uses)
    STRIDES_X,
    STRIDES_Y,
    TORCH_DTYPE,
    Arguments,
    bias_args,
    bias_value,
    concrete_pads,
    dot_options,
    ints,
    numel,
    pad3,
    param_numel,
    pow2,
    spatial3,
    target,
    the_node,
    window_sizes,
)


class Depthwise(Family):
    name = "depthwise"
    # Output tile (BLOCK_H, BLOCK_W) per spatial rank. GPU: tuned among the list on
    # first use (autotune.py), the first (128 threads, 8 outputs each) the default
    # that aot compiles; the interpreter prefers few, large programs.
    CONFIGS: ClassVar[dict] = {
        "gpu": [{1: (1, 512), 2: (8, 64), 3: (8, 64)},
                {1: (1, 1024), 2: (16, 64), 3: (16, 64)},  # large planes
                {1: (1, 256), 2: (8, 16), 3: (8, 16)}],  # small planes (7x7, 14x14)
        "cpu": [{1: (1, 1024), 2: (32, 64), 3: (16, 64)}],
    }

    def plan(self, graph, nodes) -> KernelPlan:
        """A depthwise conv node, or a fused node [depthwise conv, elementwise
        steps...]: inputs (x, *residuals), outputs (the last step's value, *kept)."""
        (node,) = nodes
        anchor = anchor_step(node)
        ep = epilogue_of(graph, node)
        x = graph.type_of(node.inputs[0])
        a = anchor.attrs
        rank = x.rank - 2
        multiplier = a["out"] // x.channels
        name = safe_name("depthwise", anchor.layer or "", *ep.name_parts(), node.id)
        doc = (f"Depthwise {rank}-D convolution, kernel {'x'.join(map(str, a['kernel']))}, "
               f"multiplier {multiplier}, bias={a['bias']}{ep.describe()}.")
        source = module_source(render("depthwise.py.jinja", name=name, bias=a["bias"], doc=doc,
                                      ep=ep.template()))
        meta = {"rank": rank, "bias": a["bias"], "multiplier": multiplier,
                "kernel": pad3(a["kernel"], 1), "stride": pad3(a["stride"], 1),
                "dilation": pad3(a["dilation"], 1), "flip": bool(a["flip"]),
                **epilogue_meta(ep), "epilogue_args": tuple(epilogue_signature(ep, "ptr:y"))}
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0], *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs), meta=meta)

    @staticmethod
    def arguments(meta) -> Arguments:
        bias = meta["bias"]
        return Arguments((("x_ptr", "ptr:x"), ("w_ptr", "ptr:fp32")) + bias_args(bias)
                         + (("y_ptr", "ptr:y"),)
                         # the epilogue's residual and kept pointers, typed like y
                         + tuple((n, "ptr:y") for n in meta.get("epilogue_args", ()))
                         + ints("C_OUT", "D", "H", "W", "OD", "OH", "OW")
                         + (ints("n_positions") if bias == "location" else ())
                         + ints("pad_d", "pad_h", "pad_w") + ints(*STRIDES_X) + ints(*STRIDES_Y))

    def constexprs(self, meta, block, index_64: bool) -> dict:
        (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = meta["kernel"], meta["stride"], meta["dilation"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "DIL_D": dd, "DIL_H": dh, "DIL_W": dw, "MULT": meta["multiplier"],
                "FLIP": meta["flip"], "BLOCK_H": block[0], "BLOCK_W": block[1],
                "INDEX_64": index_64}

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs: x, then the epilogue's residual operands (if any)
        meta = plan.meta
        x, *residuals = inputs
        (node_id,) = plan.nodes
        a, p = launch_attrs(attrs[node_id]), launch_params(params[node_id])
        rank = meta["rank"]
        assert x.dim() == rank + 2
        weight = p["weight"].contiguous()
        c_out = weight.shape[0]
        assert c_out == x.shape[1] * meta["multiplier"]
        pads = concrete_pads(a, x.shape[2:], a["dilation"])
        out_spatial = window_sizes(x.shape[2:], a["kernel"], a["stride"], a["dilation"], pads)
        # allocate the output (a residual's layout when there is one) and the kept values
        y, residuals, kept = epilogue_outputs(residuals, (x.shape[0], c_out) + out_spatial,
                                              x.dtype, x.device, torch.contiguous_format,
                                              meta.get("kept", 0))
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sy = spatial3(y)
        if config is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, self.CONFIGS[target(x)], (x,), relaunch, extra=meta)
        bh, bw = config[rank]
        block = (min(bh, pow2(oh)), min(bw, pow2(ow)))
        values = {"x_ptr": x, "w_ptr": weight, "y_ptr": y, "C_OUT": c_out,
                  **dict(zip(meta.get("epilogue_args", ()), [*residuals, *kept])),
                  "D": d, "H": h, "W": w, "OD": od, "OH": oh, "OW": ow,
                  **bias_value(p, meta["bias"]),
                  **dict(zip(("pad_d", "pad_h", "pad_w"), pad3([b for b, _ in pads], 0))),
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_Y, sy))}
        if meta["bias"] == "location":
            values["n_positions"] = od * oh * ow
        # grid: one program per (n, o, od, tile_h, tile_w)
        grid = (x.shape[0] * c_out * od * cdiv(oh, block[0]) * cdiv(ow, block[1]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, block, needs_int64(x, y)))
        return [y, *kept]

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.inputs[0]).dtype
        meta = plan.meta
        constexprs = self.constexprs(meta, self.CONFIGS["gpu"][0][meta["rank"]], False)
        return self.arguments(meta).signature(dtype, constexprs), constexprs

    def cost(self, plan, graph, env):
        """FLOPs: a multiply-add per tap and output, the bias, one per output
        for each epilogue step. Bytes: x, weight, bias, y, and the epilogue's
        residuals (read) and kept intermediates (stored)."""
        node = the_node(graph, plan)
        anchor = anchor_step(node)
        ep = epilogue_of(graph, node)
        x, y = graph.type_of(plan.inputs[0]), graph.type_of(plan.outputs[0])
        outputs = numel(y, env)
        taps = math.prod(plan.meta["kernel"])
        flops = (2 * outputs * taps + (outputs if plan.meta["bias"] != "none" else 0)
                 + outputs * epilogue_flops(ep))
        nbytes = ((numel(x, env) + outputs) * ITEMSIZE[x.dtype]
                  + 4 * (param_numel(graph, anchor, "weight") + param_numel(graph, anchor, "bias"))
                  + epilogue_bytes(ep, outputs, ITEMSIZE[x.dtype]))
        return flops, nbytes
