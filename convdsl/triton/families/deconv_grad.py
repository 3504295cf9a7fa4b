"""Gradients of a transpose convolution (kernels/deconv_grad.py.jinja).

The forward scatters x through the weight; its gradients gather dy back:
the input gradient is an ordinary strided convolution of dy with the same
weight (implicit GEMM over rows (sample, input position)), and the weight
gradient correlates x with dy (a GEMM over the samples x input positions,
split-K with a second reduction kernel when that is long). Both read dy at
p = i·s + t·dil − start, `start` being where the output begins inside the
full transposed convolution (ops.conv.deconv_crops); dy is zero outside it.
"""
from __future__ import annotations

import functools
import math

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
from .conv import TORCH_DTYPE, Tile, input_precision
from .deconv import output_geometry
from .dense_grad import (
    SPLIT_K,
    gemm_blocks,
    launch_options,
    reduce_aot,
    reduce_bytes,
    reduce_slices,
    reduce_source,
    weight_gradient,
    weight_layer,
)
from .spatial import Arguments, ints, numel, pad3, spatial3, target

STRIDES_DY = ("stride_dyn", "stride_dyc", "stride_dyd", "stride_dyh", "stride_dyw")
STRIDES_DX = ("stride_dxn", "stride_dxc", "stride_dxd", "stride_dxh", "stride_dxw")
STRIDES_X = ("stride_xn", "stride_xc", "stride_xd", "stride_xh", "stride_xw")


class DeconvDx(Family):
    """dx[n, c, i] = Σ_o Σ_t dy[n, o, i·s + t·dil − start] · W[c, o, t]."""

    name = "deconv_dx"
    kind = "dx"
    # Tiles as data: GPU the first entry (what aot compiles; BLOCK_K 16 keeps the
    # gathered tiles' addresses in registers: 222/254 registers on sm_80/sm_90, no
    # spills), the interpreter's clamped to the problem.
    CONFIGS = {"gpu": [Tile(64, 64, 16, num_warps=4, num_stages=3),
                       Tile(128, 64, 16, num_warps=8, num_stages=3)],
               "cpu": [Tile(128, 64, 64, num_warps=1, num_stages=1)]}

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        a = node.attrs["fattrs"]
        dy = graph.type_of(node.inputs[0])
        rank = dy.rank - 2
        name = safe_name(self.name, weight_layer(node), node.id)
        what = "Input" if self.kind == "dx" else "Weight"
        doc = (f"{what} gradient of a transpose {rank}-D convolution, kernel "
               f"{'x'.join(map(str, a['kernel']))}, stride {'x'.join(map(str, a['stride']))}.")
        sources = [render("deconv_grad.py.jinja", kind=self.kind, name=name, doc=doc)]
        if self.kind == "dw":
            sources.append(reduce_source(name, "the weight gradient of a transpose convolution"))
        meta = {"rank": rank, "dtype": dy.dtype, "kernel": pad3(a["kernel"], 1),
                "stride": pad3(a["stride"], 1), "dilation": pad3(a["dilation"], 1)}
        outputs = tuple(ValueRef(node.id, i) for i in range(len(node.types)))
        return KernelPlan(name, self.name, module_source(*sources), (node.id,),
                          tuple(node.inputs), outputs, meta=meta, direction="backward")

    # -- the argument lists launch and aot share ------------------------------------------
    @staticmethod
    def arguments(meta) -> Arguments:
        return Arguments((("dy_ptr", "ptr:x"), ("w_ptr", "ptr:fp32"), ("dx_ptr", "ptr:y"))
                         + ints("N", "C_IN", "D", "H", "W", "C_OUT", "OD", "OH", "OW",
                                "start_d", "start_h", "start_w")
                         + ints(*STRIDES_DY) + ints(*STRIDES_DX))

    @staticmethod
    def precision(dtype: torch.dtype, device: str) -> str:
        """fp32 products as F.conv_transpose's: tf32 when cuDNN may use it."""
        if device == "cpu":
            return "ieee"
        return input_precision(dtype, torch.backends.cudnn.allow_tf32)

    @classmethod
    def constexprs(cls, meta, block, dtype: torch.dtype, device: str, index_64: bool) -> dict:
        (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = meta["kernel"], meta["stride"], meta["dilation"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "DIL_D": dd, "DIL_H": dh, "DIL_W": dw,
                "BLOCK_M": block[0], "BLOCK_N": block[1], "BLOCK_K": block[2],
                "INPUT_PRECISION": cls.precision(dtype, device),
                "DOT_FP32": device == "cpu" and dtype != torch.float32, "INDEX_64": index_64}

    @staticmethod
    def geometry(fattrs, x_sizes) -> dict:
        """start_d/h/w: where the output begins inside the full transposed convolution."""
        _, starts = output_geometry(fattrs, x_sizes)
        return dict(zip(("start_d", "start_h", "start_w"), pad3(starts, 0)))

    # -- running ---------------------------------------------------------------------------
    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs.
        meta = plan.meta
        dy = inputs[0].detach()
        (node_id,) = plan.nodes
        a = attrs[node_id]
        _, x_shape = a["input_type"]
        x_shape = tuple(int(s) for s in x_shape)
        weight = params[node_id]["weight"].detach().contiguous()
        assert dy.dim() == meta["rank"] + 2 and weight.shape[:2] == (x_shape[1], dy.shape[1])
        device = target(dy)
        # Allocate the output.
        dx = torch.empty(x_shape, device=dy.device, dtype=dy.dtype)
        (d, h, w), sdx = spatial3(dx)
        (od, oh, ow), sdy = spatial3(dy)
        n, c_in, c_out = x_shape[0], x_shape[1], dy.shape[1]
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tile = autotune.choose(plan, self.CONFIGS[device], (dy, weight), relaunch, extra=meta)
        block = gemm_blocks(tile, device, n * d * h * w, c_in, c_out * math.prod(meta["kernel"]))
        values = {"dy_ptr": dy, "w_ptr": weight, "dx_ptr": dx, "N": n, "C_IN": c_in,
                  "D": d, "H": h, "W": w, "C_OUT": c_out, "OD": od, "OH": oh, "OW": ow,
                  **self.geometry(a["fattrs"], x_shape[2:]),
                  **dict(zip(STRIDES_DY, sdy)), **dict(zip(STRIDES_DX, sdx))}
        # Grid: one program per (row block, input-channel block), row block fastest.
        grid = (cdiv(n * d * h * w, block[0]) * cdiv(c_in, block[1]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, block, dy.dtype, device, needs_int64(dy, dx, weight)),
                     **launch_options(tile, device))
        return [dx]

    # -- ahead of time and cost ------------------------------------------------------------
    def aot(self, plan, graph):
        tile = self.CONFIGS["gpu"][0]
        dtype = plan.meta["dtype"]
        constexprs = self.constexprs(plan.meta, (tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K),
                                     TORCH_DTYPE[dtype], "gpu", False)
        return (self.arguments(plan.meta).signature(dtype, constexprs), constexprs,
                tile.launch_options())

    @staticmethod
    def sizes(graph, plan, env) -> tuple[int, int, int, int]:
        """(N · input positions, C_IN, C_OUT, taps) at concrete sizes."""
        node = graph.node(plan.nodes[0])
        dy = graph.type_of(node.inputs[0])
        x = node.types[0] if node.op == "_deconv_dx" else graph.type_of(node.inputs[1])
        c_in = int(x.shape[1])
        return numel(x, env) // c_in, c_in, int(dy.shape[1]), math.prod(plan.meta["kernel"])

    def cost(self, plan, graph, env):
        """Every (input position, tap) pair is one multiply-add per channel pair;
        the taps that land outside dy are masked but counted (an upper bound)."""
        rows, c_in, c_out, taps = self.sizes(graph, plan, env)
        itemsize = ITEMSIZE[plan.meta["dtype"]]
        dy = graph.type_of(graph.node(plan.nodes[0]).inputs[0])
        flops = 2 * rows * c_in * c_out * taps
        nbytes = (rows * c_in + numel(dy, env)) * itemsize + c_in * c_out * taps * 4
        return flops, nbytes


class DeconvDw(DeconvDx):
    """dW[c, o, t] = Σ_n Σ_i x[n, c, i] · dy[n, o, i·s + t·dil − start], split-K over (n, i)."""

    name = "deconv_dw"
    kind = "dw"
    CONFIGS = {"gpu": [Tile(64, 64, 16, num_warps=4, num_stages=3),
                       Tile(128, 64, 16, num_warps=8, num_stages=3)],  # BLOCK_K 32 spills
               "cpu": [Tile(64, 64, 128, num_warps=1, num_stages=1)]}
    split_k = SPLIT_K

    @staticmethod
    def arguments(meta) -> Arguments:
        return Arguments((("x_ptr", "ptr:x"), ("dy_ptr", "ptr:x"), ("dw_ptr", "ptr:fp32"))
                         + ints("N", "C_IN", "D", "H", "W", "C_OUT", "OD", "OH", "OW",
                                "start_d", "start_h", "start_w", "k_per_split")
                         + ints(*STRIDES_X) + ints(*STRIDES_DY))

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs.
        meta = plan.meta
        dy, x = (t.detach() for t in inputs)
        (node_id,) = plan.nodes
        a = attrs[node_id]
        (shape,) = a["param_shapes"]
        c_in, c_out = x.shape[1], dy.shape[1]
        taps = math.prod(meta["kernel"])
        assert tuple(int(s) for s in shape[:2]) == (c_in, c_out) and dy.shape[0] == x.shape[0]
        device = target(dy)
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sdy = spatial3(dy)
        rows = x.shape[0] * d * h * w
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tile = autotune.choose(plan, self.CONFIGS[device], (dy, x), relaunch, extra=meta)
        block = gemm_blocks(tile, device, c_in, c_out * taps, rows)
        tiles = cdiv(c_in, block[0]) * cdiv(c_out * taps, block[1])
        splits, per = self.split_k[device].slices(rows, tiles, block[2])
        # Allocate the output (and the workspace of a split reduction).
        dw, buffer = weight_gradient(shape, splits, dy.device)
        values = {"x_ptr": x, "dy_ptr": dy, "dw_ptr": buffer, "N": x.shape[0], "C_IN": c_in,
                  "D": d, "H": h, "W": w, "C_OUT": c_out, "OD": od, "OH": oh, "OW": ow,
                  **self.geometry(a["fattrs"], x.shape[2:]), "k_per_split": per,
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_DY, sdy))}
        # Grid: (output tile, slice); then the reduction of the slices.
        kernel[(tiles, splits)](*self.arguments(meta).values(values),
                                **self.constexprs(meta, block, dy.dtype, device,
                                                  needs_int64(x, dy, buffer)),
                                **launch_options(tile, device))
        reduce_slices(plan, buffer, dw)
        return [dw]

    def aot_extra(self, plan, graph) -> list[tuple[str, dict, dict]]:
        """The split-K reduction kernel (aot.compile_program compiles only plan.name)."""
        return [reduce_aot(plan)]

    def cost(self, plan, graph, env):
        flops, nbytes = super().cost(plan, graph, env)
        rows, c_in, c_out, taps = self.sizes(graph, plan, env)
        tile = self.CONFIGS["gpu"][0]
        tiles = cdiv(c_in, tile.BLOCK_M) * cdiv(c_out * taps, tile.BLOCK_N)
        splits, _ = self.split_k["gpu"].slices(rows, tiles, tile.BLOCK_K)
        return flops, nbytes + reduce_bytes(splits, c_in * c_out * taps)
