"""Fully connected layers: y = x @ W^T + b as one tiled GEMM (kernels/dense.py.jinja).

A fused node [dense, elementwise steps...] (ops/fused.py) is the same kernel
with the epilogue (families/epilogue.py) applied to the fp32 accumulator
before the one store; see conv.py for the shared epilogue helpers."""
from __future__ import annotations

import functools
from typing import ClassVar

import torch

from ...ir import ValueRef
from .. import autotune
from ..codegen import module_source, render, safe_name
from .base import (
    ITEMSIZE,
    POINTER,
    Family,
    KernelPlan,
    cdiv,
    needs_int64,
    target,
)
from .conv import (
    TORCH_DTYPE,
    Tile,
    WeightCache,
    _numel,
    dot_in_fp32,
    epilogue_bytes,
    epilogue_meta,
    epilogue_outputs,
    input_precision,
    pick_tile,
    tile_candidates,
)
from .epilogue import (
    anchor_step,
    epilogue_flops,
    epilogue_of,
    epilogue_signature,
    launch_attrs,
    launch_params,
)

# GPU tiles: the first that fits shared memory is the default, the others
# candidates for the autotuner (see conv.CONV_TILES). Registers per thread for
# a bf16 1024 -> 1024 layer + relu as launched (aot_launch.py, sm_90): 88, 174,
# 174, 88, 88; none spills (128x128 with 4 warps spills 184 bytes: left out).
DENSE_TILES = (
    Tile(64, 64, 32, num_warps=4, num_stages=3),
    Tile(128, 128, 64, num_warps=8, num_stages=3),
    Tile(128, 128, 32, num_warps=8, num_stages=3),
    Tile(128, 64, 64, num_warps=8, num_stages=3),
    Tile(64, 128, 64, num_warps=8, num_stages=3),
)
# Exact fp32 products (INPUT_PRECISION "ieee", PyTorch's default for fp32 matmuls)
# run on FMA units with both operand tiles in registers: a 16-wide K step keeps
# sm_80 under 255 registers with a fused epilogue (32 wide spills there).
DENSE_IEEE_TILES = (Tile(64, 64, 16, num_warps=4, num_stages=3),) + DENSE_TILES[1:]
DENSE_CPU_TILE = Tile(32, 64, 64, num_warps=1, num_stages=1)


class Dense(Family):
    name = "dense"
    tiles = DENSE_TILES
    ieee_tiles = DENSE_IEEE_TILES
    cpu_tile = DENSE_CPU_TILE
    # weights cast to the input's dtype once
    convert_weights: ClassVar[dict] = {"cpu": False, "gpu": True}

    def __init__(self):
        self._weights = WeightCache()

    def plan(self, graph, nodes) -> KernelPlan:
        """A dense node, or a fused node [dense, elementwise steps...]: inputs
        (x, *residuals), outputs (the last step's value, *kept intermediates)."""
        (node,) = nodes
        anchor = anchor_step(node)
        ep = epilogue_of(graph, node)
        x = graph.type_of(node.inputs[0])
        a = anchor.attrs
        name = safe_name("dense", anchor.layer or "", *ep.name_parts(), node.id)
        doc = (f"Fully connected layer, {x.shape[1]} -> {a['out']} features, "
               f"bias {a['bias']}{ep.describe()}.")
        source = module_source(render("dense.py.jinja", name=name, doc=doc, bias=a["bias"],
                                      ep=ep.template()))
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0], *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs),
                          meta={"dtype": x.dtype, **epilogue_meta(ep)})

    def tile(self, device: str, precision: str, x_itemsize: int, w_itemsize: int) -> Tile:
        if device == "cpu":
            return self.cpu_tile
        return pick_tile(self._tiles(precision, x_itemsize), x_itemsize, w_itemsize)

    def _tiles(self, precision: str, x_itemsize: int):
        return self.ieee_tiles if precision == "ieee" and x_itemsize == 4 else self.tiles

    def candidates(self, device: str, precision: str, x_itemsize: int,
                   w_itemsize: int) -> list[Tile]:
        """The default tile, then the others the autotuner may time on a GPU."""
        first = self.tile(device, precision, x_itemsize, w_itemsize)
        if device == "cpu":
            return [first]
        return list(tile_candidates(first, tuple(self._tiles(precision, x_itemsize)),
                                    x_itemsize, w_itemsize))

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs: x, then the epilogue's residual operands (if any).
        x, *residuals = inputs
        (node_id,) = plan.nodes
        a, p = launch_attrs(attrs[node_id]), launch_params(params[node_id])
        if x.dtype not in TORCH_DTYPE.values():
            raise TypeError(f"the triton dense layer takes f32/f16/bf16 inputs, got {x.dtype}")
        x = x.detach()
        device = target(x)
        weight = p["weight"].detach()
        if self.convert_weights[device] and weight.dtype != x.dtype:
            weight = self._weights.get(weight, x.dtype, lambda w: w.to(x.dtype))
        # F.linear's fp32 matmuls follow torch.backends.cuda.matmul.allow_tf32.
        precision = input_precision(x.dtype, torch.backends.cuda.matmul.allow_tf32)
        batch, features = x.shape
        c_out = weight.shape[0]

        # Allocate the output (a residual's layout when there is one) and the kept values.
        y, residuals, kept = epilogue_outputs(residuals, (batch, c_out), x.dtype, x.device,
                                              torch.contiguous_format, plan.meta.get("kept", 0))
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tile = autotune.choose(
                plan, self.candidates(device, precision, x.element_size(), weight.element_size()),
                (x, *residuals), relaunch, extra={"precision": precision, "out": c_out})

        # Grid and launch.
        grid = (cdiv(batch, tile.BLOCK_M), cdiv(c_out, tile.BLOCK_N))
        pointers = [x, weight] + ([p["bias"].detach()] if a["bias"] != "none" else [])
        pointers += [y, *residuals, *kept]
        options = tile.launch_options() if device == "gpu" else {}
        kernel[grid](
            *pointers, batch, features, c_out, *x.stride(), *weight.stride(), *y.stride(),
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            INPUT_PRECISION=precision,
            DOT_FP32=dot_in_fp32(x), INDEX_64=needs_int64(x, weight, y), **options)
        return [y, *kept]

    def aot(self, plan, graph):
        node = graph.node(plan.nodes[0])
        dtype = plan.meta["dtype"]
        pointer = POINTER[dtype]
        # A GPU launch casts the weight to the input's dtype (convert_weights["gpu"]).
        converted = self.convert_weights["gpu"]
        precision = input_precision(TORCH_DTYPE[dtype], torch.backends.cuda.matmul.allow_tf32)
        tile = self.tile("gpu", precision, ITEMSIZE[dtype], ITEMSIZE[dtype] if converted else 4)
        sig = {"x_ptr": pointer, "w_ptr": pointer if converted else "*fp32"}
        if anchor_step(node).attrs["bias"] != "none":
            sig["bias_ptr"] = "*fp32"
        sig["y_ptr"] = pointer
        sig.update(epilogue_signature(epilogue_of(graph, node), pointer))
        sig.update({k: "i32" for k in ("batch", "features", "c_out", "stride_xn", "stride_xf",
                                       "stride_wo", "stride_wf", "stride_yn", "stride_yo")})
        constexprs = {"BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K,
                      "INPUT_PRECISION": precision,
                      "DOT_FP32": False, "INDEX_64": False}
        sig.update({k: "constexpr" for k in constexprs})
        return sig, constexprs

    def cost(self, plan, graph, env):
        """FLOPs: the GEMM's multiply-adds, plus one per output for each
        epilogue step. Bytes: x, weight, bias and y, plus the epilogue's
        residuals (read) and kept intermediates (stored)."""
        node = graph.node(plan.nodes[0])
        a = anchor_step(node).attrs
        ep = epilogue_of(graph, node)
        x, y = graph.type_of(node.inputs[0]), node.types[0]
        features, c_out = int(x.shape[1]), a["out"]
        rows = _numel(x, env) // features
        bias = c_out if a["bias"] != "none" else 0
        flops = 2 * rows * features * c_out + _numel(y, env) * epilogue_flops(ep)
        nbytes = ((_numel(x, env) + _numel(y, env)) * ITEMSIZE[x.dtype]
                  + (features * c_out + bias) * 4
                  + epilogue_bytes(ep, _numel(y, env), ITEMSIZE[x.dtype]))
        return flops, nbytes
