"""Fully connected layers: y = x @ W^T + b as one tiled GEMM (kernels/dense.py.jinja)."""
from __future__ import annotations

import torch
import triton

from ...ir import ValueRef
from ..codegen import module_source, render, safe_name
from .base import ITEMSIZE, POINTER, Family, KernelPlan, needs_int64
from .conv import TORCH_DTYPE, Tile, WeightCache, _numel, dot_in_fp32, input_precision, pick_tile

# GPU tiles: the first that fits shared memory runs (see conv.CONV_TILES).
DENSE_TILES = (
    Tile(64, 64, 32, num_warps=4, num_stages=3),
    Tile(128, 128, 64, num_warps=8, num_stages=3),
    Tile(128, 128, 32, num_warps=8, num_stages=3),
)
DENSE_CPU_TILE = Tile(32, 64, 64, num_warps=1, num_stages=1)


class Dense(Family):
    name = "dense"
    tiles = DENSE_TILES
    cpu_tile = DENSE_CPU_TILE
    convert_weights = {"cpu": False, "gpu": True}  # weights cast to the input's dtype once

    def __init__(self):
        self._weights = WeightCache()

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        x = graph.type_of(node.inputs[0])
        a = node.attrs
        name = safe_name("dense", node.layer or "", node.id)
        doc = f"Fully connected layer, {x.shape[1]} -> {a['out']} features, bias {a['bias']}."
        source = module_source(render("dense.py.jinja", name=name, doc=doc, bias=a["bias"]))
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0],),
                          (ValueRef(node.id, 0),), meta={"dtype": x.dtype})

    def launch(self, plan, kernel, inputs, params, attrs):
        # Check inputs.
        (x,) = inputs
        (node_id,) = plan.nodes
        a, p = attrs[node_id], params[node_id]
        if x.dtype not in TORCH_DTYPE.values():
            raise TypeError(f"the triton dense layer takes f32/f16/bf16 inputs, got {x.dtype}")
        x = x.detach()
        device = "cpu" if x.device.type == "cpu" else "gpu"
        weight = p["weight"].detach()
        if self.convert_weights[device] and weight.dtype != x.dtype:
            weight = self._weights.get(weight, x.dtype, lambda w: w.to(x.dtype))
        tile = (self.cpu_tile if device == "cpu"
                else pick_tile(self.tiles, x.element_size(), weight.element_size()))
        batch, features = x.shape
        c_out = weight.shape[0]

        # Allocate the output.
        y = torch.empty((batch, c_out), device=x.device, dtype=x.dtype)

        # Grid and launch.
        grid = (triton.cdiv(batch, tile.BLOCK_M), triton.cdiv(c_out, tile.BLOCK_N))
        pointers = [x, weight] + ([p["bias"].detach()] if a["bias"] != "none" else []) + [y]
        options = tile.launch_options() if device == "gpu" else {}
        kernel[grid](
            *pointers, batch, features, c_out, *x.stride(), *weight.stride(), *y.stride(),
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            # F.linear's fp32 matmuls follow torch.backends.cuda.matmul.allow_tf32.
            INPUT_PRECISION=input_precision(x.dtype, torch.backends.cuda.matmul.allow_tf32),
            DOT_FP32=dot_in_fp32(x), INDEX_64=needs_int64(x, weight, y), **options)
        return [y]

    def aot(self, plan, graph):
        node = graph.node(plan.nodes[0])
        dtype = plan.meta["dtype"]
        pointer = POINTER[dtype]
        # A GPU launch casts the weight to the input's dtype (convert_weights["gpu"]).
        converted = self.convert_weights["gpu"]
        tile = pick_tile(self.tiles, ITEMSIZE[dtype], ITEMSIZE[dtype] if converted else 4)
        sig = {"x_ptr": pointer, "w_ptr": pointer if converted else "*fp32"}
        if node.attrs["bias"] != "none":
            sig["bias_ptr"] = "*fp32"
        sig["y_ptr"] = pointer
        sig.update({k: "i32" for k in ("batch", "features", "c_out", "stride_xn", "stride_xf",
                                       "stride_wo", "stride_wf", "stride_yn", "stride_yo")})
        constexprs = {"BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K,
                      "INPUT_PRECISION": input_precision(TORCH_DTYPE[dtype],
                                                         torch.backends.cuda.matmul.allow_tf32),
                      "DOT_FP32": False, "INDEX_64": False}
        sig.update({k: "constexpr" for k in constexprs})
        return sig, constexprs

    def cost(self, plan, graph, env):
        node = graph.node(plan.nodes[0])
        x, y = graph.type_of(node.inputs[0]), node.types[0]
        features, c_out = int(x.shape[1]), node.attrs["out"]
        rows = _numel(x, env) // features
        bias = c_out if node.attrs["bias"] != "none" else 0
        flops = 2 * rows * features * c_out
        nbytes = ((_numel(x, env) + _numel(y, env)) * ITEMSIZE[x.dtype]
                  + (features * c_out + bias) * 4)
        return flops, nbytes
