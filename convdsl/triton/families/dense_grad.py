"""Gradients of a fully connected layer (kernels/dense_grad.py.jinja): the
input gradient dx = dy @ W and the weight gradient dW = dy^T @ x, each one
tiled GEMM with tl.dot and an fp32 accumulator.

A fused node [_dense_dx, activation derivative...] (the fuse-backward-epilogue
pass: dense_dx+relu_dx, ...) is the dx kernel with the derivatives applied to
the fp32 accumulator before its one store (families/epilogue.py); the saved
forward value they read is a residual loaded at dx's own offsets.

The module also holds what every weight gradient of the convolution family
shares (the deconv_grad and local_grad families import it): `SplitK`, which
cuts a long reduction into slices whose partial sums a second kernel
(kernels/grad_reduce.py.jinja) adds in a fixed order — deterministic, and no
atomics contend for the same few weights.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...ir import ValueRef
from .. import autotune
from ..codegen import module_source, render, safe_name
from ..loader import load_kernel
from .base import (
    ITEMSIZE,
    Family,
    KernelPlan,
    cdiv,
    needs_int64,
)
from .conv import (
    TORCH_DTYPE,
    Tile,
    dot_in_fp32,
    epilogue_bytes,
    epilogue_meta,
    epilogue_outputs,
    input_precision,
)
from .epilogue import anchor_step, epilogue_flops, epilogue_of, launch_params
from .spatial import Arguments, ints, numel, pow2, target

# -- shared by the weight gradients -----------------------------------------------------------


@dataclass(frozen=True)
class SplitK:
    """How a weight gradient's reduction (over samples, or samples x positions)
    is cut into slices, each reduced by its own programs into a workspace row.

    A slice covers at most `max_k` reduction rows; beyond that, and while the
    output tiles alone leave the GPU idle, the reduction is cut into more
    slices, each at least `min_k` rows long, aiming at `programs` programs."""

    min_k: int
    max_k: int
    programs: int

    def slices(self, k_total: int, out_tiles: int, block_k: int) -> tuple[int, int]:
        """(number of slices, reduction rows per slice: a multiple of block_k)."""
        k_total = max(int(k_total), 1)
        splits = max(-(-k_total // self.max_k),
                     min(-(-self.programs // max(out_tiles, 1)), k_total // self.min_k), 1)
        per = -(-k_total // splits)
        per = -(-per // block_k) * block_k
        return -(-k_total // per), per


# GPU: a slice of >= 512 rows keeps the K loop long enough to pipeline; aim at
# two waves of 132 SMs. The interpreter runs one program at a time: slices only
# bound the length of one program's loop.
SPLIT_K = {"gpu": SplitK(min_k=512, max_k=1 << 16, programs=264),
           "cpu": SplitK(min_k=1 << 30, max_k=1 << 14, programs=1)}
REDUCE_BLOCK = {"gpu": 1024, "cpu": 1 << 16}


def reduce_name(kernel: str) -> str:
    """The split-K reduction kernel beside GEMM kernel `kernel` in one module."""
    return kernel + "_reduce"


def reduce_source(kernel: str, what: str) -> str:
    """The reduction kernel of GEMM kernel `kernel`; `what` names the gradient."""
    return render("grad_reduce.py.jinja", name=reduce_name(kernel), what=what)


def weight_gradient(shape, splits: int, device) -> tuple[torch.Tensor, ...]:
    """(the fp32 gradient in `shape`, the buffer the GEMM kernel writes: the
    gradient itself for one slice, else a [splits, numel] workspace)."""
    dw = torch.empty(tuple(shape), device=device, dtype=torch.float32)
    if splits == 1:
        return dw, dw
    return dw, torch.empty((splits, dw.numel()), device=device, dtype=torch.float32)


def reduce_slices(plan: KernelPlan, workspace: torch.Tensor, dw: torch.Tensor) -> None:
    """Sum the workspace's rows into dw with the plan's reduction kernel."""
    if workspace is dw:
        return
    kernel = load_kernel(plan.source, reduce_name(plan.name))
    block = REDUCE_BLOCK[target(dw)]
    n = dw.numel()
    kernel[(cdiv(n, block),)](workspace, dw, n, workspace.shape[0], BLOCK=block,
                                     INDEX_64=needs_int64(workspace))


def reduce_aot(plan: KernelPlan) -> tuple[str, dict, dict]:
    """(name, signature, constexprs) of the reduction kernel, for aot.compile_kernel."""
    constexprs = {"BLOCK": REDUCE_BLOCK["gpu"], "INDEX_64": False}
    signature = {"ws_ptr": "*fp32", "out_ptr": "*fp32", "n_elements": "i32", "splits": "i32",
                 **{k: "constexpr" for k in constexprs}}
    return reduce_name(plan.name), signature, constexprs


def reduce_bytes(splits: int, elements: int) -> int:
    """Extra global-memory traffic of a split reduction: write, read and store."""
    return 0 if splits == 1 else (2 * splits + 1) * elements * 4


def weight_layer(node) -> str:
    """The forward layer's name, from its weight's parameter name ("enc.weight")."""
    name = node.params.get("weight", "")
    return name.rsplit(".", 1)[0] if "." in name else name


def clamp_tile(tile: Tile, m: int, n: int, k: int) -> tuple[int, int, int]:
    """The interpreter's tile shrunk to the problem (tl.dot needs every dim >= 16)."""
    return (max(16, min(tile.BLOCK_M, pow2(m))), max(16, min(tile.BLOCK_N, pow2(n))),
            max(16, min(tile.BLOCK_K, pow2(k))))


def gemm_blocks(tile: Tile, device: str, m: int, n: int, k: int) -> tuple[int, int, int]:
    """GPU: the configured tile as is (the one aot compiles); interpreter: clamped."""
    if device == "gpu":
        return tile.BLOCK_M, tile.BLOCK_N, tile.BLOCK_K
    return clamp_tile(tile, m, n, k)


def launch_options(tile: Tile, device: str) -> dict:
    return tile.launch_options() if device == "gpu" else {}


# -- dense ---------------------------------------------------------------------------------

class DenseDx(Family):
    """dx[N, F] = dy[N, C_OUT] @ W[C_OUT, F]."""

    name = "dense_dx"
    kind = "dx"
    fuses = True  # dx computes fused nodes [_dense_dx, activation derivative...] (lowering.py)
    # Tiles as data: GPU the first entry, the interpreter its own fixed one.
    CONFIGS = {"gpu": [Tile(64, 64, 32, num_warps=4, num_stages=3),
                       Tile(128, 64, 16, num_warps=8, num_stages=3)],
               "cpu": [Tile(64, 64, 64, num_warps=1, num_stages=1)]}
    MATMUL = "matmul"  # F.linear's fp32 products follow torch.backends.cuda.matmul.allow_tf32

    def plan(self, graph, nodes) -> KernelPlan:
        """The gradient node, or (dx) a fused node [_dense_dx, activation
        derivatives...]: inputs (dy, *residuals), outputs (the last step's value,
        *kept values)."""
        (node,) = nodes
        anchor = anchor_step(node)  # the gradient node itself, or step 0 of a fused node
        ep = epilogue_of(graph, node)
        dy = graph.type_of(anchor.inputs[0])
        name = safe_name(self.name, weight_layer(anchor), *ep.name_parts(), node.id)
        what = "input" if self.kind == "dx" else "weight"
        doc = (f"{what.capitalize()} gradient of a fully connected layer, "
               f"{_features(graph, anchor)} -> {anchor.attrs['fattrs']['out']} features"
               f"{ep.describe()}.")
        sources = [render("dense_grad.py.jinja", kind=self.kind, name=name, doc=doc,
                          ep=ep.template())]
        if self.kind == "dw":
            sources.append(reduce_source(name, "a dense weight gradient"))
        if node is anchor:
            outputs = tuple(ValueRef(node.id, i) for i in range(len(node.types)))
        else:
            outputs = (ValueRef(node.id, 0), *ep.kept_refs)
        return KernelPlan(name, self.name, module_source(*sources), (node.id,),
                          (*anchor.inputs, *ep.residuals), outputs,
                          meta={"dtype": dy.dtype, **epilogue_meta(ep)}, direction="backward")

    @staticmethod
    def precision(dtype: torch.dtype, device: str) -> str:
        if device == "cpu":
            return "ieee"
        return input_precision(dtype, torch.backends.cuda.matmul.allow_tf32)

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs: dy, then the epilogue's residuals (saved forward values).
        dy, *residuals = (t.detach() for t in inputs)
        (node_id,) = plan.nodes
        weight = launch_params(params[node_id])["weight"].detach()
        assert dy.dim() == 2 and weight.dim() == 2 and dy.shape[1] == weight.shape[0]
        assert len(residuals) == plan.meta["residuals"], (len(inputs), plan.meta)
        device = target(dy)
        batch, c_out = dy.shape
        features = weight.shape[1]
        # Allocate the output (a residual's layout when there is one: the
        # residuals and kept values share dx's offsets).
        dx, residuals, kept = epilogue_outputs(residuals, (batch, features), dy.dtype, dy.device,
                                               torch.contiguous_format, plan.meta["kept"])
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tile = autotune.choose(plan, self.CONFIGS[device], (dy, weight, *residuals),
                                   relaunch)
        # Grid and launch.
        bm, bn, bk = gemm_blocks(tile, device, batch, features, c_out)
        grid = (cdiv(batch, bm), cdiv(features, bn))
        kernel[grid](dy, weight, dx, *residuals, *kept, batch, features, c_out,
                     *dy.stride(), *weight.stride(), *dx.stride(),
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     INPUT_PRECISION=self.precision(dy.dtype, device), DOT_FP32=dot_in_fp32(dy),
                     INDEX_64=needs_int64(dy, weight, dx), **launch_options(tile, device))
        return [dx, *kept]

    def arguments(self, residuals: int = 0, kept: int = 0) -> Arguments:
        """Run-time arguments in kernel order; the epilogue's pointers follow dx_ptr."""
        epilogue = tuple((f"res{i}_ptr", "ptr:y") for i in range(residuals)) + tuple(
            (f"kept{i}_ptr", "ptr:y") for i in range(kept))
        return Arguments((("dy_ptr", "ptr:x"), ("w_ptr", "ptr:fp32"), ("dx_ptr", "ptr:y"))
                         + epilogue
                         + ints("batch", "features", "c_out", "stride_dyn", "stride_dyo",
                                "stride_wo", "stride_wf", "stride_dxn", "stride_dxf"))

    def constexprs(self, plan) -> dict:
        tile = self.CONFIGS["gpu"][0]
        return {"BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K,
                "INPUT_PRECISION": self.precision(TORCH_DTYPE[plan.meta["dtype"]], "gpu"),
                "DOT_FP32": False, "INDEX_64": False}

    def aot(self, plan, graph):
        constexprs = self.constexprs(plan)
        # dx: the epilogue's pointers too (epilogue_signature's names, after dx_ptr)
        args = (self.arguments(plan.meta["residuals"], plan.meta["kept"]) if self.kind == "dx"
                else self.arguments())
        return (args.signature(plan.meta["dtype"], constexprs), constexprs,
                self.CONFIGS["gpu"][0].launch_options())

    def cost(self, plan, graph, env):
        """2 FLOPs per multiply-add, plus one per dx element for each epilogue
        step. Bytes: dy read, dx written, the fp32 weight, and the epilogue's
        residuals (read) and kept values (written)."""
        node = graph.node(plan.nodes[0])
        anchor = anchor_step(node)
        ep = epilogue_of(graph, node)
        dy = graph.type_of(anchor.inputs[0])
        rows, c_out = numel(dy, env) // int(dy.shape[1]), int(dy.shape[1])
        features = _features(graph, anchor)
        flops = 2 * rows * features * c_out + rows * features * epilogue_flops(ep)
        nbytes = (rows * (c_out + features)) * ITEMSIZE[dy.dtype] + c_out * features * 4
        return flops, nbytes + epilogue_bytes(ep, rows * features, ITEMSIZE[dy.dtype])


class DenseDw(DenseDx):
    """dW[C_OUT, F] = dy^T @ x, split-K over the samples when they are many."""

    name = "dense_dw"
    kind = "dw"
    # BLOCK_K 16: with dy read transposed, 32 spills on sm_80 in fp32.
    CONFIGS = {"gpu": [Tile(64, 64, 16, num_warps=4, num_stages=3),
                       Tile(128, 64, 16, num_warps=8, num_stages=3)],
               "cpu": [Tile(64, 64, 64, num_warps=1, num_stages=1)]}
    split_k = SPLIT_K

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs.
        dy, x = (t.detach() for t in inputs)
        (node_id,) = plan.nodes
        (shape,) = attrs[node_id]["param_shapes"]
        batch, c_out = dy.shape
        features = x.shape[1]
        assert x.shape[0] == batch and tuple(shape) == (c_out, features)
        device = target(dy)
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tile = autotune.choose(plan, self.CONFIGS[device], (dy, x), relaunch)
        bm, bn, bk = gemm_blocks(tile, device, c_out, features, batch)
        tiles = cdiv(c_out, bm) * cdiv(features, bn)
        splits, per = self.split_k[device].slices(batch, tiles, bk)
        # Allocate the output (and the workspace of a split reduction).
        dw, buffer = weight_gradient(shape, splits, dy.device)
        # Grid and launch; then the reduction of the slices.
        grid = (cdiv(c_out, bm), cdiv(features, bn), splits)
        kernel[grid](dy, x, buffer, batch, features, c_out, per, *dy.stride(), *x.stride(),
                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     INPUT_PRECISION=self.precision(dy.dtype, device), DOT_FP32=dot_in_fp32(dy),
                     INDEX_64=needs_int64(dy, x, buffer), **launch_options(tile, device))
        reduce_slices(plan, buffer, dw)
        return [dw]

    def arguments(self) -> Arguments:
        return Arguments((("dy_ptr", "ptr:x"), ("x_ptr", "ptr:x"), ("dw_ptr", "ptr:fp32"))
                         + ints("batch", "features", "c_out", "k_per_split", "stride_dyn",
                                "stride_dyo", "stride_xn", "stride_xf"))

    def aot_extra(self, plan, graph) -> list[tuple[str, dict, dict]]:
        """The split-K reduction kernel (aot.compile_program compiles only plan.name)."""
        return [reduce_aot(plan)]

    def cost(self, plan, graph, env):
        node = graph.node(plan.nodes[0])
        dy = graph.type_of(node.inputs[0])
        rows, c_out = numel(dy, env) // int(dy.shape[1]), int(dy.shape[1])
        features = _features(graph, node)
        tile = self.CONFIGS["gpu"][0]
        tiles = cdiv(c_out, tile.BLOCK_M) * cdiv(features, tile.BLOCK_N)
        splits, _ = self.split_k["gpu"].slices(rows, tiles, tile.BLOCK_K)
        flops = 2 * rows * features * c_out
        nbytes = (rows * (c_out + features)) * ITEMSIZE[dy.dtype] + c_out * features * 4
        return flops, nbytes + reduce_bytes(splits, c_out * features)


def _features(graph, node) -> int:
    """F: the forward input's features (dx: the result's; dw: the saved input's)."""
    x = node.types[0] if node.op == "_dense_dx" else graph.type_of(node.inputs[1])
    return int(x.shape[1])


__all__ = ["DenseDx", "DenseDw", "SplitK", "SPLIT_K"]
