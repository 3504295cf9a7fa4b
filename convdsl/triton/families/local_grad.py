"""Gradients of locally connected (eq. 9.9) and tiled (eq. 9.10) convolutions
(kernels/local_grad.py.jinja); one family serves both ops, the node's
attrs["forward"] says which.

As in the forward (families/local.py), the weight is a set of matrices
[C_OUT, C·taps], one per class of output positions: `local` makes every
position its own class (T = the output size), `tiled` puts p in class p mod T.

- dx gathers, for each input position, over the outputs whose windows hold it
  (no atomics). Input positions with the same phase i mod (S·T) see the same
  classes and the same valid taps, so each program takes one phase and runs
  an implicit GEMM with tl.dot over output channels, per tap.
- dW per class is dy^T @ patches over the samples and the class's positions:
  for `local` an outer product per position summed over the batch; for
  `tiled` also summed over the positions sharing a tile, split-K with a
  second reduction kernel when that is long.
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
from .spatial import Arguments, concrete_pads, ints, numel, pad3, spatial3, target

STRIDES_DY = ("stride_dyn", "stride_dyc", "stride_dyd", "stride_dyh", "stride_dyw")
STRIDES_DX = ("stride_dxn", "stride_dxc", "stride_dxd", "stride_dxh", "stride_dxw")
STRIDES_X = ("stride_xn", "stride_xc", "stride_xd", "stride_xh", "stride_xw")


def classes(op: str, fattrs: dict, out_spatial, c_out: int, reduction: int):
    """(T per dim, stride between class matrices, stride between output channels)
    of the weight: local [out, *o, in, *k], tiled [*t, out, in, *k]."""
    if op == "local":
        return pad3(out_spatial, 1), reduction, math.prod(out_spatial) * reduction
    return pad3(fattrs["tiles"], 1), c_out * reduction, reduction


class LocalDx(Family):
    """dx[n, c, i] = Σ_{p, q: p·s + q − pad = i} Σ_o dy[n, o, p] · W_class(p)[o, c, q]."""

    name = "local_dx"
    kind = "dx"
    # Tiles as data: GPU the first entry (what aot compiles; ~150 registers, no
    # spills — 64 rows with BLOCK_K 32 spill), the interpreter's clamped to the
    # problem (tl.dot needs every dim >= 16). A phase of `local` has N rows.
    CONFIGS = {"gpu": [Tile(32, 64, 16, num_warps=4, num_stages=3),
                       Tile(128, 64, 16, num_warps=8, num_stages=3)],
               "cpu": [Tile(128, 64, 64, num_warps=1, num_stages=1)]}

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        op, a = node.attrs["forward"], node.attrs["fattrs"]
        dy = graph.type_of(node.inputs[0])
        rank = dy.rank - 2
        name = safe_name(op, self.kind, weight_layer(node), node.id)
        what = "locally connected" if op == "local" else f"tiled ({'x'.join(map(str, a['tiles']))})"
        grad = "Input" if self.kind == "dx" else "Weight"
        doc = (f"{grad} gradient of a {what} {rank}-D convolution, kernel "
               f"{'x'.join(map(str, a['kernel']))}, stride {'x'.join(map(str, a['stride']))}.")
        sources = [render("local_grad.py.jinja", kind=self.kind, op=op, name=name, doc=doc)]
        if self.kind == "dw":
            sources.append(reduce_source(name, f"the weight gradient of {op}"))
        meta = {"rank": rank, "op": op, "dtype": dy.dtype, "kernel": pad3(a["kernel"], 1),
                "stride": pad3(a["stride"], 1)}
        outputs = tuple(ValueRef(node.id, i) for i in range(len(node.types)))
        return KernelPlan(name, self.name, module_source(*sources), (node.id,),
                          tuple(node.inputs), outputs, meta=meta, direction="backward")

    # -- the argument lists launch and aot share ------------------------------------------
    @staticmethod
    def arguments(meta) -> Arguments:
        return Arguments((("dy_ptr", "ptr:x"), ("w_ptr", "ptr:fp32"), ("dx_ptr", "ptr:y"))
                         + ints("N", "C", "D", "H", "W", "C_OUT", "OD", "OH", "OW",
                                "T_D", "T_H", "T_W", "J_D", "J_H", "J_W", "PH_D", "PH_H", "PH_W",
                                "pad_d", "pad_h", "pad_w", "stride_wclass", "stride_wo")
                         + ints(*STRIDES_DY) + ints(*STRIDES_DX))

    @staticmethod
    def precision(dtype: torch.dtype, device: str) -> str:
        """fp32 products as the torch lowering's einsum: tf32 when matmuls may use it."""
        if device == "cpu":
            return "ieee"
        return input_precision(dtype, torch.backends.cuda.matmul.allow_tf32)

    @classmethod
    def constexprs(cls, meta, block, dtype: torch.dtype, device: str, index_64: bool) -> dict:
        (kd, kh, kw), (sd, sh, sw) = meta["kernel"], meta["stride"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "BLOCK_M": block[0], "BLOCK_N": block[1], "BLOCK_K": block[2],
                "INPUT_PRECISION": cls.precision(dtype, device),
                "DOT_FP32": device == "cpu" and dtype != torch.float32, "INDEX_64": index_64}

    @staticmethod
    def class_args(op, fattrs, x_shape, dy: torch.Tensor, meta) -> tuple[dict, tuple]:
        """Run-time class arguments: T, pads, weight strides; and (T per dim) for the host."""
        c, c_out = int(x_shape[1]), dy.shape[1]
        reduction = c * math.prod(meta["kernel"])
        tiles, stride_wclass, stride_wo = classes(op, fattrs, tuple(dy.shape[2:]), c_out, reduction)
        pads = concrete_pads(fattrs, tuple(int(s) for s in x_shape[2:]))
        values = {**dict(zip(("T_D", "T_H", "T_W"), tiles)),
                  **dict(zip(("pad_d", "pad_h", "pad_w"), pad3([b for b, _ in pads], 0))),
                  "stride_wclass": stride_wclass, "stride_wo": stride_wo}
        return values, tiles

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
        assert dy.dim() == meta["rank"] + 2 and dy.shape[0] == x_shape[0]
        device = target(dy)
        values, tiles = self.class_args(meta["op"], a["fattrs"], x_shape, dy, meta)
        reduction = x_shape[1] * math.prod(meta["kernel"])
        assert weight.numel() == math.prod(tiles) * dy.shape[1] * reduction, "weight shape"
        # Allocate the output.
        dx = torch.empty(x_shape, device=dy.device, dtype=dy.dtype)
        (d, h, w), sdx = spatial3(dx)
        (od, oh, ow), sdy = spatial3(dy)
        n, c, c_out = x_shape[0], x_shape[1], dy.shape[1]
        # Phases of the input positions per dim: period S * T, min(period, size) of them.
        periods = [s * t for s, t in zip(meta["stride"], tiles)]
        phases = [min(u, size) for u, size in zip(periods, (d, h, w))]
        sub = [cdiv(size, u) for u, size in zip(periods, (d, h, w))]
        rows = n * math.prod(sub)
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tile = autotune.choose(plan, self.CONFIGS[device], (dy, weight), relaunch, extra=meta)
        block = gemm_blocks(tile, device, rows, c, c_out)
        values.update({"dy_ptr": dy, "w_ptr": weight, "dx_ptr": dx, "N": n, "C": c,
                       "D": d, "H": h, "W": w, "C_OUT": c_out, "OD": od, "OH": oh, "OW": ow,
                       **dict(zip(("J_D", "J_H", "J_W"), sub)),
                       **dict(zip(("PH_D", "PH_H", "PH_W"), phases)),
                       **dict(zip(STRIDES_DY, sdy)), **dict(zip(STRIDES_DX, sdx))})
        # Grid: one program per (phase, input-channel block, row block).
        grid = (math.prod(phases) * cdiv(c, block[1]) * cdiv(rows, block[0]),)
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
    def sizes(graph, plan, env) -> tuple[int, int, int, int, int]:
        """(numel of dy, numel of x, C, C_OUT, weight elements) at concrete sizes."""
        node = graph.node(plan.nodes[0])
        dy = graph.type_of(node.inputs[0])
        x = node.types[0] if node.op.endswith("_dx") else graph.type_of(node.inputs[1])
        c, c_out = int(x.shape[1]), int(dy.shape[1])
        taps = math.prod(plan.meta["kernel"])
        fattrs = node.attrs["fattrs"]
        if plan.meta["op"] == "local":
            classes_ = math.prod(int(s) for s in dy.shape[2:])  # static for local
        else:
            classes_ = math.prod(fattrs["tiles"])
        return numel(dy, env), numel(x, env), c, c_out, classes_ * c_out * c * taps

    def cost(self, plan, graph, env):
        """Each output (n, o, p) meets C·taps inputs once: the forward's FLOPs."""
        dy_n, x_n, c, c_out, weights = self.sizes(graph, plan, env)
        taps = math.prod(plan.meta["kernel"])
        flops = 2 * dy_n * c * taps
        nbytes = (dy_n + x_n) * ITEMSIZE[plan.meta["dtype"]] + weights * 4
        return flops, nbytes


class LocalDw(LocalDx):
    """dW_class[o, c, q] = Σ_n Σ_{p in class} dy[n, o, p] · x_pad[n, c, p·s + q]."""

    name = "local_dw"
    kind = "dw"
    CONFIGS = {"gpu": [Tile(64, 64, 16, num_warps=4, num_stages=3),
                       Tile(128, 64, 16, num_warps=8, num_stages=3)],  # BLOCK_K 32 spills
               "cpu": [Tile(64, 64, 64, num_warps=1, num_stages=1)]}
    split_k = SPLIT_K

    @staticmethod
    def arguments(meta) -> Arguments:
        return Arguments((("dy_ptr", "ptr:x"), ("x_ptr", "ptr:x"), ("dw_ptr", "ptr:fp32"))
                         + ints("N", "C", "D", "H", "W", "C_OUT", "OD", "OH", "OW",
                                "T_D", "T_H", "T_W", "J_D", "J_H", "J_W", "pad_d", "pad_h", "pad_w",
                                "k_per_split", "split_stride", "stride_wclass", "stride_wo")
                         + ints(*STRIDES_DY) + ints(*STRIDES_X))

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs.
        meta = plan.meta
        dy, x = (t.detach() for t in inputs)
        (node_id,) = plan.nodes
        a = attrs[node_id]
        (shape,) = a["param_shapes"]
        assert dy.dim() == meta["rank"] + 2 and dy.shape[0] == x.shape[0]
        device = target(dy)
        values, tiles = self.class_args(meta["op"], a["fattrs"], x.shape, dy, meta)
        n, c, c_out = x.shape[0], x.shape[1], dy.shape[1]
        reduction = c * math.prod(meta["kernel"])
        assert math.prod(shape) == math.prod(tiles) * c_out * reduction, "weight shape"
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sdy = spatial3(dy)
        sub = [cdiv(o, t) for o, t in zip((od, oh, ow), tiles)]
        rows = n * math.prod(sub)  # the reduction of one class
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tile = autotune.choose(plan, self.CONFIGS[device], (dy, x), relaunch, extra=meta)
        block = gemm_blocks(tile, device, c_out, reduction, rows)
        tiles_out = (math.prod(tiles) * cdiv(c_out, block[0])
                     * cdiv(reduction, block[1]))
        splits, per = self.split_k[device].slices(rows, tiles_out, block[2])
        # Allocate the output (and the workspace of a split reduction).
        dw, buffer = weight_gradient(shape, splits, dy.device)
        values.update({"dy_ptr": dy, "x_ptr": x, "dw_ptr": buffer, "N": n, "C": c,
                       "D": d, "H": h, "W": w, "C_OUT": c_out, "OD": od, "OH": oh, "OW": ow,
                       **dict(zip(("J_D", "J_H", "J_W"), sub)),
                       "k_per_split": per, "split_stride": dw.numel(),
                       **dict(zip(STRIDES_DY, sdy)), **dict(zip(STRIDES_X, sx))})
        # Grid: (class x output-channel block x column block, slice); then the reduction.
        kernel[(tiles_out, splits)](*self.arguments(meta).values(values),
                                    **self.constexprs(meta, block, dy.dtype, device,
                                                      needs_int64(dy, x, buffer)),
                                    **launch_options(tile, device))
        reduce_slices(plan, buffer, dw)
        return [dw]

    def aot_extra(self, plan, graph) -> list[tuple[str, dict, dict]]:
        """The split-K reduction kernel (aot.compile_program compiles only plan.name)."""
        return [reduce_aot(plan)]

    def cost(self, plan, graph, env):
        flops, nbytes = super().cost(plan, graph, env)
        dy_n, _, c, c_out, weights = self.sizes(graph, plan, env)
        reduction = c * math.prod(plan.meta["kernel"])
        classes_ = weights // (c_out * reduction)
        rows = dy_n // (c_out * classes_)  # samples x positions of one class
        tile = self.CONFIGS["gpu"][0]
        tiles_out = (classes_ * cdiv(c_out, tile.BLOCK_M)
                     * cdiv(reduction, tile.BLOCK_N))
        splits, _ = self.split_k["gpu"].slices(rows, tiles_out, tile.BLOCK_K)
        return flops, nbytes + reduce_bytes(splits, weights)
