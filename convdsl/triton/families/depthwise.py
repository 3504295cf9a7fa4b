"""Depthwise convolution (a conv whose groups equal its input channels): a
direct kernel, one tile of an output plane per program, no tl.dot."""
from __future__ import annotations

import math

import torch
import triton

from ...ir import ValueRef
from ..codegen import module_source, render, safe_name
from .base import ITEMSIZE, Family, KernelPlan, needs_int64

from .spatial import (  # noqa: F401  (the helpers this family uses)
    Arguments,
    STRIDES_X,
    STRIDES_Y,
    TORCH_DTYPE,
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
    # Output tile (BLOCK_H, BLOCK_W) per spatial rank. GPU: the first entry (128
    # threads, 8 outputs each); the interpreter prefers few, large programs.
    CONFIGS = {
        "gpu": [{1: (1, 512), 2: (8, 64), 3: (8, 64)}],
        "cpu": [{1: (1, 1024), 2: (32, 64), 3: (16, 64)}],
    }

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        x = graph.type_of(node.inputs[0])
        a = node.attrs
        rank = x.rank - 2
        multiplier = a["out"] // x.channels
        name = safe_name("depthwise", node.layer or "", node.id)
        doc = (f"Depthwise {rank}-D convolution, kernel {'x'.join(map(str, a['kernel']))}, "
               f"multiplier {multiplier}, bias={a['bias']}.")
        source = module_source(render("depthwise.py.jinja", name=name, bias=a["bias"], doc=doc))
        meta = {"rank": rank, "bias": a["bias"], "multiplier": multiplier,
                "kernel": pad3(a["kernel"], 1), "stride": pad3(a["stride"], 1),
                "dilation": pad3(a["dilation"], 1), "flip": bool(a["flip"])}
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0],),
                          (ValueRef(node.id, 0),), meta=meta)

    @staticmethod
    def arguments(meta) -> Arguments:
        bias = meta["bias"]
        return Arguments((("x_ptr", "ptr:x"), ("w_ptr", "ptr:fp32")) + bias_args(bias)
                         + (("y_ptr", "ptr:y"),)
                         + ints("C_OUT", "D", "H", "W", "OD", "OH", "OW")
                         + (ints("n_positions") if bias == "location" else ())
                         + ints("pad_d", "pad_h", "pad_w") + ints(*STRIDES_X) + ints(*STRIDES_Y))

    def constexprs(self, meta, block, index_64: bool) -> dict:
        (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = meta["kernel"], meta["stride"], meta["dilation"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "DIL_D": dd, "DIL_H": dh, "DIL_W": dw, "MULT": meta["multiplier"],
                "FLIP": meta["flip"], "BLOCK_H": block[0], "BLOCK_W": block[1],
                "INDEX_64": index_64}

    def launch(self, plan, kernel, inputs, params, attrs):
        # check inputs
        meta = plan.meta
        (x,) = inputs
        (node_id,) = plan.nodes
        a, p = attrs[node_id], params[node_id]
        rank = meta["rank"]
        assert x.dim() == rank + 2
        weight = p["weight"].contiguous()
        c_out = weight.shape[0]
        assert c_out == x.shape[1] * meta["multiplier"]
        pads = concrete_pads(a, x.shape[2:], a["dilation"])
        out_spatial = window_sizes(x.shape[2:], a["kernel"], a["stride"], a["dilation"], pads)
        # allocate the output
        y = torch.empty((x.shape[0], c_out) + out_spatial, device=x.device, dtype=x.dtype)
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sy = spatial3(y)
        bh, bw = self.CONFIGS[target(x)][0][rank]
        block = (min(bh, pow2(oh)), min(bw, pow2(ow)))
        values = {"x_ptr": x, "w_ptr": weight, "y_ptr": y, "C_OUT": c_out,
                  "D": d, "H": h, "W": w, "OD": od, "OH": oh, "OW": ow,
                  **bias_value(p, meta["bias"]),
                  **dict(zip(("pad_d", "pad_h", "pad_w"), pad3([b for b, _ in pads], 0))),
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_Y, sy))}
        if meta["bias"] == "location":
            values["n_positions"] = od * oh * ow
        # grid: one program per (n, o, od, tile_h, tile_w)
        grid = (x.shape[0] * c_out * od * triton.cdiv(oh, block[0]) * triton.cdiv(ow, block[1]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, block, needs_int64(x, y)))
        return [y]

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.inputs[0]).dtype
        meta = plan.meta
        constexprs = self.constexprs(meta, self.CONFIGS["gpu"][0][meta["rank"]], False)
        return self.arguments(meta).signature(dtype, constexprs), constexprs

    def cost(self, plan, graph, env):
        node = the_node(graph, plan)
        x, y = graph.type_of(plan.inputs[0]), graph.type_of(plan.outputs[0])
        outputs = numel(y, env)
        taps = math.prod(plan.meta["kernel"])
        flops = 2 * outputs * taps + (outputs if plan.meta["bias"] != "none" else 0)
        nbytes = ((numel(x, env) + outputs) * ITEMSIZE[x.dtype]
                  + 4 * (param_numel(graph, node, "weight") + param_numel(graph, node, "bias")))
        return flops, nbytes
