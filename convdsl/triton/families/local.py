"""Locally connected (eq. 9.9) and tiled (eq. 9.10) convolutions.

Both are a set of weight matrices [C_OUT, C·taps], one per *class* of output
positions: for `local` every position is its own class, for `tiled` position p
belongs to class p mod t. One kernel (local.py.jinja) runs an implicit GEMM per
class, rows = (sample, position of the class), so each weight element is read
once per block of rows — the weight is the big tensor of `local`.

A fused node [local or tiled, elementwise steps...] (ops/fused.py; e.g.
local+relu, tiled+relu) is the same kernel with the steps applied to the fp32
tile before its one store (families/epilogue.py, as deconv.py does)."""
from __future__ import annotations

import functools
import math
from typing import ClassVar

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
from .deconv import epilogue_meta, epilogue_tensors
from .epilogue import anchor_step, launch_attrs, launch_params
from .spatial import (
    STRIDES_X,
    STRIDES_Y,
    TORCH_DTYPE,
    Arguments,
    bias_args,
    bias_value,
    block_candidates,
    concrete_pads,
    dot_options,
    ints,
    numel,
    pad3,
    param_numel,
    spatial3,
    target,
    the_node,
    window_sizes,
)


class Local(Family):
    name = "local"
    fuses = True  # computes fused nodes [local or tiled, elementwise epilogue...]
    # (BLOCK_M max, BLOCK_N max, BLOCK_K max), each clamped to the problem (>= 16
    # for tl.dot). GPU: the first entry is the default, the others candidates
    # for the autotuner. A local class has one row per sample, so BLOCK_M is
    # small and the weight slab (BLOCK_K x BLOCK_N) wide.
    CONFIGS: ClassVar[dict] = {"gpu": [(16, 64, 64), (16, 128, 32), (32, 64, 32), (16, 32, 64)],
                               "cpu": [(64, 64, 64)]}

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        anchor = anchor_step(node)  # the layer itself, or step 0 of a fused node
        x = graph.type_of(anchor.inputs[0])
        a = anchor.attrs
        rank = x.rank - 2
        epilogue = epilogue_meta(graph, node)
        ep = epilogue["ep"]
        name = safe_name(self.name, node.layer or "", *ep.name_parts(), node.id)
        what = ("Locally connected" if self.name == "local"
                else f"Tiled ({'x'.join(map(str, a['tiles']))} tiles)")
        doc = (f"{what} {rank}-D convolution, kernel {'x'.join(map(str, a['kernel']))}, "
               f"bias={a['bias']}{ep.describe()}.")
        source = module_source(render("local.py.jinja", name=name, op=self.name, bias=a["bias"],
                                      doc=doc, ep=ep.template()))
        meta = {"rank": rank, "bias": a["bias"], "kernel": pad3(a["kernel"], 1),
                "stride": pad3(a["stride"], 1),
                "epilogue": {k: v for k, v in epilogue.items() if k != "ep"}}
        return KernelPlan(name, self.name, source, (node.id,),
                          (anchor.inputs[0], *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs), meta=meta)

    @staticmethod
    def arguments(meta) -> Arguments:
        bias = meta["bias"]
        return Arguments((("x_ptr", "ptr:x"), ("w_ptr", "ptr:fp32")) + bias_args(bias)
                         + (("y_ptr", "ptr:y"),) + meta["epilogue"]["args"]
                         + ints("N", "C", "D", "H", "W", "C_OUT", "OD", "OH", "OW")
                         + (ints("n_positions") if bias == "location" else ())
                         + ints("T_D", "T_H", "T_W", "J_D", "J_H", "J_W", "pad_d", "pad_h", "pad_w",
                                "stride_wclass", "stride_wo")
                         + ints(*STRIDES_X) + ints(*STRIDES_Y))

    @staticmethod
    def constexprs(meta, block, index_64: bool, dot: dict) -> dict:
        (kd, kh, kw), (sd, sh, sw) = meta["kernel"], meta["stride"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "BLOCK_M": block[0], "BLOCK_N": block[1], "BLOCK_K": block[2], **dot,
                "INDEX_64": index_64}

    def classes(self, attrs, weight, out_spatial, c_out, reduction):
        """(T per dim, stride between class matrices, stride between output channels)."""
        positions = math.prod(out_spatial)
        return pad3(out_spatial, 1), reduction, positions * reduction

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        meta = plan.meta
        x, *residuals = inputs
        (node_id,) = plan.nodes
        a, p = launch_attrs(attrs[node_id]), launch_params(params[node_id])
        assert x.dim() == meta["rank"] + 2 and len(residuals) == meta["epilogue"]["residuals"]
        weight = p["weight"].contiguous()
        c_out, channels = a["out"], x.shape[1]
        pads = concrete_pads(a, x.shape[2:])
        out_spatial = window_sizes(x.shape[2:], a["kernel"], a["stride"], (1,) * meta["rank"], pads)
        reduction = channels * math.prod(a["kernel"])
        tiles, stride_wclass, stride_wo = self.classes(a, weight, out_spatial, c_out, reduction)
        assert weight.numel() == math.prod(tiles) * c_out * reduction, "weight shape"
        # allocate the output (in a residual's layout) and the kept intermediates like it
        y, extra = epilogue_tensors(meta["epilogue"], residuals,
                                    (x.shape[0], c_out) + out_spatial, x.dtype, x.device)
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sy = spatial3(y)
        sub = [cdiv(o, t) for o, t in zip((od, oh, ow), tiles)]
        rows = x.shape[0] * math.prod(sub)
        block = config
        if block is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            block = autotune.choose(
                plan, block_candidates(self.CONFIGS[target(x)], rows, c_out, reduction),
                (x, *residuals), relaunch,
                extra={"out": c_out, "kernel": meta["kernel"], "stride": meta["stride"]})
        values = {"x_ptr": x, "w_ptr": weight, **bias_value(p, meta["bias"]), "y_ptr": y,
                  **extra, "N": x.shape[0], "C": channels, "D": d, "H": h, "W": w,
                  "C_OUT": c_out, "OD": od, "OH": oh, "OW": ow,
                  **dict(zip(("T_D", "T_H", "T_W"), tiles)), **dict(zip(("J_D", "J_H", "J_W"), sub)),
                  **dict(zip(("pad_d", "pad_h", "pad_w"), pad3([b for b, _ in pads], 0))),
                  "stride_wclass": stride_wclass, "stride_wo": stride_wo,
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_Y, sy))}
        if meta["bias"] == "location":
            values["n_positions"] = od * oh * ow
        # grid: one program per (class, output-channel block, row block)
        grid = (math.prod(tiles) * cdiv(c_out, block[1]) * cdiv(rows, block[0]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, block, needs_int64(x, y, weight),
                                     dot_options(target(x), x.dtype)))
        return [y, *(extra[f"kept{i}_ptr"] for i in range(meta["epilogue"]["kept"]))]

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.inputs[0]).dtype
        constexprs = self.constexprs(plan.meta, self.CONFIGS["gpu"][0], False,
                                    dot_options("cuda", TORCH_DTYPE[dtype]))
        return self.arguments(plan.meta).signature(dtype, constexprs), constexprs

    def cost(self, plan, graph, env):
        """FLOPs: 2·C·taps per output, plus the bias and the epilogue per output.
        Bytes: x, the weight and bias, y, and the epilogue's residuals read and
        kept values written."""
        anchor = anchor_step(the_node(graph, plan))
        x, y = graph.type_of(plan.inputs[0]), graph.type_of(plan.outputs[0])
        outputs = numel(y, env)
        reduction = x.channels * math.prod(anchor.attrs["kernel"])
        flops = (2 * outputs * reduction + (outputs if anchor.attrs["bias"] != "none" else 0)
                 + outputs * plan.meta["epilogue"]["flops"])
        # x; y, each residual and each kept value (all of y's size)
        tensors = numel(x, env) + outputs * (len(plan.inputs) - 1 + len(plan.outputs))
        nbytes = (tensors * ITEMSIZE[x.dtype]
                  + 4 * (param_numel(graph, anchor, "weight") + param_numel(graph, anchor, "bias")))
        return flops, nbytes


class Tiled(Local):
    """Tiled convolution: t_1 x ... x t_d classes; weight [*t, out, in, *k]."""

    name = "tiled"
    # 32 rows x 64 channels x 32 K: ~170 registers in the AOT build (no
    # alignment facts there, every row index held per thread), no spills.
    CONFIGS: ClassVar[dict] = {"gpu": [(32, 64, 32), (64, 64, 32), (32, 128, 32), (16, 64, 64)],
                               "cpu": [(64, 64, 64)]}

    def classes(self, attrs, weight, out_spatial, c_out, reduction):
        return pad3(attrs["tiles"], 1), c_out * reduction, reduction
