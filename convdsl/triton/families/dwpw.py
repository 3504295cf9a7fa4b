"""Depthwise conv → 1×1 conv as one kernel (kernels/dwpw.py.jinja): the fused
node fuse-depthwise-pointwise makes, steps [depthwise conv, elementwise...,
1×1 conv, elementwise...] (MobileNet's depthwise-separable block).

A program computes a [BLOCK_M positions × BLOCK_N outputs] tile of the
pointwise conv as a GEMM whose A operand — the depthwise result — is made in
registers, BLOCK_K channels at a time, so it never reaches global memory. The
training variant stores the depthwise-side values the backward graph reads
(from the programs of the first column block only)."""
from __future__ import annotations

import functools
import math

import torch

from ...ir import ValueRef
from ...ir.types import evaluate
from ...ops.fused import result_index, step_node
from .. import autotune
from ..codegen import module_source, render, safe_name
from .base import (
    ITEMSIZE,
    POINTER,
    Family,
    KernelPlan,
    cdiv,
    needs_int64,
)
from .conv import DIMS, Tile, WeightCache, geometry
from .epilogue import epilogue_of, epilogue_signature, like_output, residual_operands
from .spatial import concrete_pads, dot_options, target, window_sizes

# GPU tiles, the first the default that aot compiles; the rest tuned on first use.
TILES = {
    "gpu": [Tile(64, 64, 16, num_warps=4, num_stages=2),  # no spills at sm_80/sm_90
            Tile(128, 64, 16, num_warps=8, num_stages=2),
            Tile(64, 128, 16, num_warps=4, num_stages=2),
            Tile(32, 64, 16, num_warps=4, num_stages=2)],
    "cpu": [Tile(64, 32, 16, num_warps=1, num_stages=1)],
}


def pointwise_step(node) -> int:
    """Index of the 1×1 conv among the fused node's steps (the second conv)."""
    return [s["op"] for s in node.attrs["steps"]].index("conv", 1)


class DepthwisePointwise(Family):
    name = "dwpw"
    fuses = True

    def __init__(self):
        self._weights = WeightCache()

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        steps = node.attrs["steps"]
        p = pointwise_step(node)
        dw, pw = step_node(node, 0), step_node(node, p)
        x = graph.type_of(node.inputs[0])
        rank = x.rank - 2
        mid = epilogue_of(graph, node, acc="d", stop=p)  # between the convs, on d
        ep = epilogue_of(graph, node, acc="acc", start=p + 1)  # after the pointwise conv
        if mid.residuals or ep.residuals:
            raise AssertionError("fuse-depthwise-pointwise admits no residual operands")
        # The pointwise conv's own input (mid.result) may be stored by `ep`'s kept
        # list only if it is a pointwise-side value; depthwise-side ones are mid's.
        mid_kept = [(ref, var) for ref, var in mid.kept]
        last_mid = ValueRef(node.id, result_index(p - 1, len(steps)))
        if last_mid in graph.saved_for_backward and all(r != last_mid for r, _ in mid_kept):
            mid_kept.append((last_mid, mid.result))
        multiplier = dw.attrs["out"] // x.channels
        kept_names = ["saving"] if mid_kept or ep.kept else []
        name = safe_name("dwpw", f"{rank}d", dw.layer or "", pw.layer or "",
                         *[op for op in mid.ops + ep.ops][:3], *kept_names, node.id)
        kernel = "x".join(map(str, dw.attrs["kernel"]))
        doc = (f"Depthwise {rank}-D conv {kernel} (multiplier {multiplier}){mid.describe()}, "
               f"then a 1x1 conv to {pw.attrs['out']} channels{ep.describe()}, in one kernel.")
        source = module_source(render(
            "dwpw.py.jinja", name=name, doc=doc, dims=list(DIMS[rank]),
            dw_bias=dw.attrs["bias"], pw_bias=pw.attrs["bias"],
            mid=[list(s) for s in mid.steps], mid_kept=[var for _, var in mid_kept],
            mid_result=mid.result, ep=ep.template()))
        meta = {"rank": rank, "dtype": x.dtype, "multiplier": multiplier, "pointwise": p,
                "mid_kept": len(mid_kept), "kept": len(ep.kept), "mid_ops": len(mid.steps),
                "ep_ops": len(ep.steps)}
        outputs = (ValueRef(node.id, 0), *[r for r, _ in mid_kept], *ep.kept_refs)
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0],), outputs,
                          meta=meta)

    # -- running -----------------------------------------------------------------------------
    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        meta = plan.meta
        (x,) = inputs
        x = x.detach()
        (node_id,) = plan.nodes
        steps = attrs[node_id]["steps"]
        p = meta["pointwise"]
        dw_attrs, pw_attrs = steps[0]["attrs"], steps[p]["attrs"]
        prm = params[node_id]
        sizes = tuple(x.shape[2:])
        pads = concrete_pads(dw_attrs, sizes, dw_attrs["dilation"])
        out_sizes = window_sizes(sizes, dw_attrs["kernel"], dw_attrs["stride"],
                                 dw_attrs["dilation"], pads)
        c_mid, c_out = dw_attrs["out"], pw_attrs["out"]
        wd = self._weights.get(prm["0.weight"], torch.float32,
                               lambda w: w.float().reshape(c_mid, -1).contiguous())
        wp = self._weights.get(prm[f"{p}.weight"], x.dtype,
                               lambda w: w.to(x.dtype).reshape(c_out, c_mid).contiguous())
        batch = x.shape[0]
        y = like_output(None, (batch, c_out) + out_sizes, x.dtype, x.device,
                        torch.contiguous_format)
        mid_kept = [torch.empty((batch, c_mid) + out_sizes, dtype=x.dtype, device=x.device)
                    for _ in range(meta["mid_kept"])]
        kept = [torch.empty_like(y) for _ in range(meta["kept"])]
        mid_strides = (mid_kept[0].stride() if mid_kept
                       else torch.empty((1, 1) + (1,) * len(out_sizes)).stride())
        if config is None:
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, TILES[target(x)], (x,), relaunch, extra=meta)
        tile = config
        m_total = batch * math.prod(out_sizes)
        grid = (cdiv(m_total, tile.BLOCK_M), cdiv(c_out, tile.BLOCK_N))
        pointers = [x, wd]
        if dw_attrs["bias"] != "none":
            pointers.append(prm["0.bias"].detach().float().contiguous())
        pointers.append(wp)
        if pw_attrs["bias"] != "none":
            pointers.append(prm[f"{p}.bias"].detach().float().contiguous())
        pointers += [y, *mid_kept, *residual_operands([]), *kept]
        device = target(x)
        options = ({"num_warps": tile.num_warps, "num_stages": tile.num_stages}
                   if device == "gpu" else {})
        kernel[grid](
            *pointers, batch, c_mid, c_out, *sizes, *out_sizes, *(b for b, _ in pads),
            *x.stride(), *wp.stride(), *y.stride(), *mid_strides,
            **geometry(dw_attrs), MULT=meta["multiplier"], FLIP=bool(dw_attrs["flip"]),
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            **dot_options(device, x.dtype),
            INDEX_64=needs_int64(x, y, *mid_kept), **options)
        return [y, *mid_kept, *kept]

    # -- ahead of time -------------------------------------------------------------------------
    def aot(self, plan, graph):
        node = graph.node(plan.nodes[0])
        meta, dims = plan.meta, DIMS[plan.meta["rank"]]
        steps = node.attrs["steps"]
        dw_attrs, pw_attrs = steps[0]["attrs"], steps[meta["pointwise"]]["attrs"]
        pointer = POINTER[meta["dtype"]]
        sig = {"x_ptr": pointer, "wd_ptr": "*fp32"}
        if dw_attrs["bias"] != "none":
            sig["bd_ptr"] = "*fp32"
        sig["wp_ptr"] = pointer
        if pw_attrs["bias"] != "none":
            sig["bp_ptr"] = "*fp32"
        sig["y_ptr"] = pointer
        sig.update({f"midkept{i}_ptr": pointer for i in range(meta["mid_kept"])})
        ep = epilogue_of(graph, node, start=meta["pointwise"] + 1)
        sig.update(epilogue_signature(ep, pointer))
        ints = ["batch", "c_mid", "c_out", *(f"in_{d}" for d in dims),
                *(f"out_{d}" for d in dims), *(f"pad_{d}" for d in dims),
                "stride_xn", "stride_xc", *(f"stride_x{d}" for d in dims),
                "stride_po", "stride_pm",
                "stride_yn", "stride_yc", *(f"stride_y{d}" for d in dims),
                "stride_mn", "stride_mc", *(f"stride_m{d}" for d in dims)]
        sig.update({i: "i32" for i in ints})
        tile = TILES["gpu"][0]
        dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[meta["dtype"]]
        constexprs = {**geometry(dw_attrs), "MULT": meta["multiplier"],
                      "FLIP": bool(dw_attrs["flip"]), "BLOCK_M": tile.BLOCK_M,
                      "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K,
                      **dot_options("gpu", dtype), "INDEX_64": False}
        sig.update({k: "constexpr" for k in constexprs})
        return sig, constexprs, {"num_warps": tile.num_warps, "num_stages": tile.num_stages}

    # -- cost ------------------------------------------------------------------------------------
    def cost(self, plan, graph, env):
        """FLOPs of both convs, the biases and the elementwise steps; bytes: x,
        both weights and biases, y and the stored intermediates (the depthwise
        result itself never moves)."""
        node = graph.node(plan.nodes[0])
        meta = plan.meta
        steps = node.attrs["steps"]
        dw_attrs, pw_attrs = steps[0]["attrs"], steps[meta["pointwise"]]["attrs"]
        x, y = graph.type_of(node.inputs[0]), node.types[0]
        positions = math.prod(evaluate(d, env) for d in y.shape) // pw_attrs["out"]
        c_mid, c_out = dw_attrs["out"], pw_attrs["out"]
        taps = math.prod(dw_attrs["kernel"])
        flops = (positions * c_mid * (2 * taps + 1 + meta["mid_ops"])
                 + positions * c_out * (2 * c_mid + 1 + meta["ep_ops"]))
        itemsize = ITEMSIZE[x.dtype]
        x_numel = math.prod(evaluate(d, env) for d in x.shape)
        nbytes = (x_numel * itemsize + 4 * (c_mid * (taps + 1) + c_out * (c_mid + 1))
                  + positions * c_out * itemsize * (1 + meta["kept"])
                  + positions * c_mid * itemsize * meta["mid_kept"])
        return flops, nbytes
