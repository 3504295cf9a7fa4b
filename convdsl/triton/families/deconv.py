"""Transpose convolution (eq. 9.12–9.14) in gather form: an implicit GEMM per
stride phase, tl.dot over input channels for each tap the phase uses (see
deconv.py.jinja). The output is the full transposed convolution read from
`deconv_crops` on, `size` long; positions past its end get only the bias."""
from __future__ import annotations

import math

import torch
import triton

from ...ir import ValueRef
from ...ops.conv import deconv_crops, deconv_ranges
from ..codegen import module_source, render, safe_name
from .base import ITEMSIZE, Family, KernelPlan, needs_int64
from .spatial import (
    STRIDES_X,
    STRIDES_Y,
    TORCH_DTYPE,
    Arguments,
    bias_args,
    bias_value,
    dot_options,
    ints,
    numel,
    pad3,
    param_numel,
    pow2,
    spatial3,
    target,
    the_node,
)


def output_geometry(attrs: dict, sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(output sizes, crop starts) at concrete input sizes."""
    sizes = tuple(int(s) for s in sizes)
    size = attrs["size"] or tuple(natural for natural, _, _ in deconv_ranges(attrs, sizes))
    size = tuple(int(s) for s in size)
    starts = tuple(int(s) for s in deconv_crops(attrs, sizes, size))
    return size, starts


class Deconv(Family):
    name = "deconv"
    # (BLOCK_M max, BLOCK_N max, BLOCK_K max), each clamped to the problem (>= 16 for tl.dot).
    # (BLOCK_M, BLOCK_N, BLOCK_K, pipeline stages of the channel loop). The
    # channel loop sits inside the tap loop: pipelining it 3 deep costs ~80
    # registers per thread, so 2 stages; larger tiles spill in the AOT build
    # (no alignment facts there: every row offset is held per thread).
    CONFIGS = {"gpu": [(32, 32, 32, 2)], "cpu": [(128, 64, 64, 1)]}

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        x = graph.type_of(node.inputs[0])
        a = node.attrs
        rank = x.rank - 2
        name = safe_name("deconv", node.layer or "", node.id)
        doc = (f"Transpose {rank}-D convolution, kernel {'x'.join(map(str, a['kernel']))}, "
               f"stride {'x'.join(map(str, a['stride']))}, bias={a['bias']}.")
        source = module_source(render("deconv.py.jinja", name=name, bias=a["bias"], doc=doc))
        meta = {"rank": rank, "bias": a["bias"], "kernel": pad3(a["kernel"], 1),
                "stride": pad3(a["stride"], 1), "dilation": pad3(a["dilation"], 1)}
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0],),
                          (ValueRef(node.id, 0),), meta=meta)

    @staticmethod
    def arguments(meta) -> Arguments:
        bias = meta["bias"]
        return Arguments((("x_ptr", "ptr:x"), ("w_ptr", "ptr:fp32")) + bias_args(bias)
                         + (("y_ptr", "ptr:y"),)
                         + ints("N", "C_IN", "D", "H", "W", "C_OUT", "OD", "OH", "OW")
                         + (ints("n_positions") if bias == "location" else ())
                         + ints("J_D", "J_H", "J_W", "start_d", "start_h", "start_w")
                         + ints(*STRIDES_X) + ints(*STRIDES_Y))

    @staticmethod
    def constexprs(meta, block, index_64: bool, dot: dict) -> dict:
        (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = meta["kernel"], meta["stride"], meta["dilation"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "DIL_D": dd, "DIL_H": dh, "DIL_W": dw,
                "BLOCK_M": block[0], "BLOCK_N": block[1], "BLOCK_K": block[2],
                "STAGES": block[3], **dot,
                "INDEX_64": index_64}

    def launch(self, plan, kernel, inputs, params, attrs):
        # check inputs
        meta = plan.meta
        (x,) = inputs
        (node_id,) = plan.nodes
        a, p = attrs[node_id], params[node_id]
        assert x.dim() == meta["rank"] + 2
        c_in, c_out = p["weight"].shape[:2]
        taps = math.prod(meta["kernel"])
        # [C_IN, C_OUT, *k] -> [taps, C_IN, C_OUT]: each tap's matrix dense, C_OUT contiguous
        weight = p["weight"].reshape(c_in, c_out, taps).permute(2, 0, 1).contiguous()
        assert c_in == x.shape[1]
        out_spatial, starts = output_geometry(a, x.shape[2:])
        # allocate the output
        y = torch.empty((x.shape[0], c_out) + out_spatial, device=x.device, dtype=x.dtype)
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sy = spatial3(y)
        phases = meta["stride"]
        sub = [triton.cdiv(o, s) for o, s in zip((od, oh, ow), phases)]
        rows = x.shape[0] * math.prod(sub)
        bm, bn, bk, stages = self.CONFIGS[target(x)][0]
        block = (max(16, min(bm, pow2(rows))), max(16, min(bn, pow2(c_out))),
                 max(16, min(bk, pow2(c_in))), stages)
        values = {"x_ptr": x, "w_ptr": weight, **bias_value(p, meta["bias"]), "y_ptr": y,
                  "N": x.shape[0], "C_IN": c_in, "D": d, "H": h, "W": w,
                  "C_OUT": c_out, "OD": od, "OH": oh, "OW": ow,
                  **dict(zip(("J_D", "J_H", "J_W"), sub)),
                  **dict(zip(("start_d", "start_h", "start_w"), pad3(starts, 0))),
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_Y, sy))}
        if meta["bias"] == "location":
            values["n_positions"] = od * oh * ow
        # grid: one program per (stride phase, output-channel block, row block)
        grid = (math.prod(phases) * triton.cdiv(c_out, block[1]) * triton.cdiv(rows, block[0]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, block, needs_int64(x, y),
                                     dot_options(x.device.type, x.dtype)))
        return [y]

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.inputs[0]).dtype
        constexprs = self.constexprs(plan.meta, self.CONFIGS["gpu"][0], False,
                                    dot_options("cuda", TORCH_DTYPE[dtype]))
        return self.arguments(plan.meta).signature(dtype, constexprs), constexprs

    def cost(self, plan, graph, env):
        """FLOPs of the taps that reach the output: 2·C_IN multiply-adds per
        (output, tap landing on it) ≈ 2·C_IN·C_OUT·taps per input position."""
        node = the_node(graph, plan)
        x, y = graph.type_of(plan.inputs[0]), graph.type_of(plan.outputs[0])
        outputs = numel(y, env)
        c_in = x.channels
        taps = math.prod(node.attrs["kernel"]) / math.prod(node.attrs["stride"])
        flops = int(2 * outputs * c_in * taps) + (outputs if node.attrs["bias"] != "none" else 0)
        nbytes = ((numel(x, env) + outputs) * ITEMSIZE[x.dtype]
                  + 4 * (param_numel(graph, node, "weight") + param_numel(graph, node, "bias")))
        return flops, nbytes
