"""Transpose convolution (eq. 9.12–9.14) in gather form: an implicit GEMM per
stride phase, tl.dot over input channels for each tap the phase uses (see
deconv.py.jinja). The output is the full transposed convolution read from
`deconv_crops` on, `size` long; positions past its end get only the bias.

A fused node [deconv, elementwise steps...] (ops/fused.py; e.g. deconv+relu,
deconv+sigmoid) is the same kernel with the steps applied to the fp32 tile
before its one store (families/epilogue.py): the pre-activation never reaches
global memory, unless the training variant keeps it for the backward pass."""
from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch

from ...ir import ValueRef
from ...ops.conv import deconv_crops, deconv_ranges
from .. import autotune
from ..codegen import module_source, render, safe_name
from .base import (
    ITEMSIZE,
    Family,
    KernelPlan,
    cdiv,
    needs_int64,
)
from .conv import WeightCache
from .epilogue import (
    anchor_step,
    epilogue_flops,
    epilogue_of,
    epilogue_signature,
    launch_attrs,
    launch_params,
    like_output,
    residual_operands,
)
from .spatial import (
    STRIDES_X,
    STRIDES_Y,
    TORCH_DTYPE,
    Arguments,
    bias_args,
    bias_value,
    block_candidates,
    dot_options,
    ints,
    numel,
    pad3,
    param_numel,
    spatial3,
    target,
    the_node,
)


def epilogue_meta(graph, node) -> dict:
    """Plan-time facts of a node's fused epilogue (none for a plain node): the
    template parameter, the extra pointer arguments in kernel order, and counts."""
    ep = epilogue_of(graph, node)
    return {"ep": ep, "args": tuple(epilogue_signature(ep, "ptr:y").items()),
            "residuals": len(ep.residuals), "kept": len(ep.kept), "flops": epilogue_flops(ep)}


def epilogue_tensors(meta: dict, residuals: list, shape, dtype, device, plain=None):
    """(y, {pointer name: tensor}) for a launch: y takes the first residual's
    layout (else contiguous, or what `plain()` allocates); every residual is
    brought to y's strides and every kept tensor allocated like y, so y's
    offsets address them all."""
    residuals = residual_operands(residuals)
    if residuals or plain is None:
        y = like_output(residuals[0] if residuals else None, shape, dtype, device,
                        torch.contiguous_format)
    else:
        y = plain()
    values = {}
    for i, r in enumerate(residuals):
        if r.stride() != y.stride():
            r = torch.empty_like(y, dtype=r.dtype).copy_(r)
        values[f"res{i}_ptr"] = r
    for i in range(meta["kept"]):
        values[f"kept{i}_ptr"] = torch.empty_like(y)
    return y, values


def output_geometry(attrs: dict, sizes) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(output sizes, crop starts) at concrete input sizes."""
    sizes = tuple(int(s) for s in sizes)
    size = attrs["size"] or tuple(natural for natural, _, _ in deconv_ranges(attrs, sizes))
    size = tuple(int(s) for s in size)
    starts = tuple(int(s) for s in deconv_crops(attrs, sizes, size))
    return size, starts


class Deconv(Family):
    name = "deconv"
    fuses = True  # computes fused nodes [deconv, elementwise epilogue...]
    # (BLOCK_M max, BLOCK_N max, BLOCK_K max), each clamped to the problem (>= 16 for tl.dot).
    # (BLOCK_M, BLOCK_N, BLOCK_K, pipeline stages of the channel loop). The
    # channel loop sits inside the tap loop: pipelining it 3 deep costs ~80
    # registers per thread, so 2 stages; larger tiles spill in the AOT build
    # (no alignment facts there: every row offset is held per thread). The
    # others are candidates for the autotuner.
    CONFIGS: ClassVar[dict] = {"gpu": [(32, 32, 32, 2), (64, 32, 32, 2), (32, 64, 32, 2),
                                       (64, 64, 32, 2)],
                               "cpu": [(128, 64, 64, 1)]}

    def __init__(self):
        self._weights = WeightCache()

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        anchor = anchor_step(node)  # the deconv itself, or step 0 of a fused node
        x = graph.type_of(anchor.inputs[0])
        a = anchor.attrs
        rank = x.rank - 2
        epilogue = epilogue_meta(graph, node)
        ep = epilogue["ep"]
        name = safe_name("deconv", node.layer or "", *ep.name_parts(), node.id)
        doc = (f"Transpose {rank}-D convolution, kernel {'x'.join(map(str, a['kernel']))}, "
               f"stride {'x'.join(map(str, a['stride']))}, bias={a['bias']}{ep.describe()}.")
        source = module_source(render("deconv.py.jinja", name=name, bias=a["bias"], doc=doc,
                                      ep=ep.template()))
        meta = {"rank": rank, "bias": a["bias"], "kernel": pad3(a["kernel"], 1),
                "stride": pad3(a["stride"], 1), "dilation": pad3(a["dilation"], 1),
                "epilogue": {k: v for k, v in epilogue.items() if k != "ep"}}
        return KernelPlan(name, self.name, source, (node.id,),
                          (anchor.inputs[0], *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs), meta=meta)

    @staticmethod
    def arguments(meta) -> Arguments:
        bias = meta["bias"]
        return Arguments((("x_ptr", "ptr:x"), ("w_ptr", "ptr:fp32")) + bias_args(bias)
                         + (("y_ptr", "ptr:y"),) + meta["epilogue"]["args"]
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

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        meta = plan.meta
        x, *residuals = inputs
        (node_id,) = plan.nodes
        a, p = launch_attrs(attrs[node_id]), launch_params(params[node_id])
        assert x.dim() == meta["rank"] + 2 and len(residuals) == meta["epilogue"]["residuals"]
        c_in, c_out = p["weight"].shape[:2]
        taps = math.prod(meta["kernel"])
        # [C_IN, C_OUT, *k] -> [taps, C_IN, C_OUT]: each tap's matrix dense, C_OUT
        # contiguous; made once per parameter version
        weight = self._weights.get(
            p["weight"].detach(), p["weight"].dtype,
            lambda w: w.reshape(c_in, c_out, taps).permute(2, 0, 1).contiguous())
        assert c_in == x.shape[1]
        out_spatial, starts = output_geometry(a, x.shape[2:])
        # allocate the output (in a residual's layout) and the kept intermediates like it
        y, extra = epilogue_tensors(meta["epilogue"], residuals,
                                    (x.shape[0], c_out) + out_spatial, x.dtype, x.device)
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sy = spatial3(y)
        phases = meta["stride"]
        sub = [cdiv(o, s) for o, s in zip((od, oh, ow), phases)]
        rows = x.shape[0] * math.prod(sub)
        block = config
        if block is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            block = autotune.choose(
                plan, block_candidates(self.CONFIGS[target(x)], rows, c_out, c_in),
                (x, *residuals), relaunch,
                extra={"out": c_out, "kernel": meta["kernel"], "stride": meta["stride"],
                       "dilation": meta["dilation"], "starts": starts})
        values = {"x_ptr": x, "w_ptr": weight, **bias_value(p, meta["bias"]), "y_ptr": y,
                  **extra, "N": x.shape[0], "C_IN": c_in, "D": d, "H": h, "W": w,
                  "C_OUT": c_out, "OD": od, "OH": oh, "OW": ow,
                  **dict(zip(("J_D", "J_H", "J_W"), sub)),
                  **dict(zip(("start_d", "start_h", "start_w"), pad3(starts, 0))),
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_Y, sy))}
        if meta["bias"] == "location":
            values["n_positions"] = od * oh * ow
        # grid: one program per (stride phase, output-channel block, row block)
        grid = (math.prod(phases) * cdiv(c_out, block[1]) * cdiv(rows, block[0]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, block, needs_int64(x, y),
                                     dot_options(target(x), x.dtype)))
        return [y, *(extra[f"kept{i}_ptr"] for i in range(meta["epilogue"]["kept"]))]

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.inputs[0]).dtype
        constexprs = self.constexprs(plan.meta, self.CONFIGS["gpu"][0], False,
                                    dot_options("cuda", TORCH_DTYPE[dtype]))
        return self.arguments(plan.meta).signature(dtype, constexprs), constexprs

    def cost(self, plan, graph, env):
        """FLOPs of the taps that reach the output: 2·C_IN multiply-adds per
        (output, tap landing on it) ≈ 2·C_IN·C_OUT·taps per input position,
        plus the bias and the epilogue per output. Bytes: x, the weight and
        bias, y, and the epilogue's residuals read and kept values written."""
        anchor = anchor_step(the_node(graph, plan))
        x, y = graph.type_of(plan.inputs[0]), graph.type_of(plan.outputs[0])
        outputs = numel(y, env)
        c_in = x.channels
        taps = math.prod(anchor.attrs["kernel"]) / math.prod(anchor.attrs["stride"])
        flops = (int(2 * outputs * c_in * taps) + (outputs if anchor.attrs["bias"] != "none" else 0)
                 + outputs * plan.meta["epilogue"]["flops"])
        # x; y, each residual and each kept value (all of y's size)
        tensors = numel(x, env) + outputs * (len(plan.inputs) - 1 + len(plan.outputs))
        nbytes = (tensors * ITEMSIZE[x.dtype]
                  + 4 * (param_numel(graph, anchor, "weight") + param_numel(graph, anchor, "bias")))
        return flops, nbytes
