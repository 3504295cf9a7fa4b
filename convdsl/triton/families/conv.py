"""Convolution as an implicit GEMM on tensor cores (kernels/conv.py.jinja).

One kernel per conv node, 1-D to 3-D. Per group g the conv is the product
Y_g[M, C_out/g] = X_g[M, K] @ W_g[K, C_out/g], with M = N·prod(out spatial)
and K = (C_in/g)·prod(kernel); the kernel gathers X_g's tiles from the input
on the fly (implicit GEMM), so the patch matrix never exists in memory.

Launch-time choices (the tile, int64 indexing, the dot's precision, the
resolved padding) are arguments; the layer's geometry (kernel, stride,
dilation, flip) is constexpr, so each layer gets code specialized to it.

Connection tables (LeNet's C3) run as a sparse reduction: for each block of
BLOCK_N output channels the host lists the union of input channels its rows
read, and the K loop visits only those channels × taps; an int8 membership
matrix masks the weight loads, so absent connections are never read and count
as zero whatever the dense weight holds there.

A fused node (ops/fused.py) whose steps are [conv, elementwise steps...] runs
as the same kernel with its epilogue (families/epilogue.py) applied to the
fp32 accumulator after the bias: activations, `+`/`-` a residual operand read
at the output's positions, scalar arithmetic. Only the last step's value is
stored, plus, in the training variant, the intermediates the backward pass reads.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ...ir import ValueRef
from ...ir.types import evaluate
from ...ops.spatial import effective_kernel, resolve_pads
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
from .epilogue import (
    Epilogue,
    anchor_step,
    epilogue_flops,
    epilogue_of,
    epilogue_signature,
    launch_attrs,
    launch_params,
    like_output,
    residual_operands,
)

DIMS = {1: ("w",), 2: ("h", "w"), 3: ("d", "h", "w")}  # spatial dim letters, outermost first
TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
SHARED_LIMIT = 99 * 1024  # shared memory a tile may pipeline: fits sm_80, sm_86/89 and sm_90


@dataclass(frozen=True)
class Tile:
    """One tiling of a GEMM-shaped kernel."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int

    def shared_bytes(self, a_itemsize: int, b_itemsize: int) -> int:
        """Shared memory the software pipeline holds: num_stages A and B tiles."""
        return self.num_stages * (self.BLOCK_M * self.BLOCK_K * a_itemsize
                                  + self.BLOCK_K * self.BLOCK_N * b_itemsize)

    def launch_options(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def fit(self, rows: int, cols: int, reduction: int) -> Tile:
        """This tile shrunk to a GEMM of rows x cols over `reduction` (powers of
        two, never below 16: tl.dot's smallest operand). A grouped conv with 4
        channels a group then reads 16-wide tiles, not 64-wide ones 94% masked."""
        return dataclasses.replace(
            self, BLOCK_M=max(16, min(self.BLOCK_M, _next_power_of_2(rows))),
            BLOCK_N=max(16, min(self.BLOCK_N, _next_power_of_2(cols))),
            BLOCK_K=max(16, min(self.BLOCK_K, _next_power_of_2(reduction))))


def _next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 without its constexpr wrapper (a launch calls this)."""
    return 1 << max(int(n) - 1, 0).bit_length()


# GPU tiles: the first that fits shared memory is the default; the others are
# candidates for the autotuner. Chosen from compiles of a ResNet 3x3 layer
# (64 -> 64 channels, 56x56, NCHW) as a real launch specializes it
# (aot_launch.py, sm_90): registers per thread bf16 / tf32 / exact f32, none
# spills. 128x128 tiles spill 232-536 bytes there and are left out. The
# default is the one that also compiles without spills with no facts about
# its arguments (aot.py's representative build, a launch with odd strides):
# 64x64x64 needs fewer registers as launched but spills 504 bytes there with a
# fused residual epilogue, so it is the autotuner's first alternative.
CONV_TILES = (  # f16 / bf16
    Tile(64, 64, 32, num_warps=4, num_stages=3),  # 252
    Tile(64, 64, 64, num_warps=4, num_stages=3),  # 167
    Tile(128, 64, 64, num_warps=8, num_stages=3),  # 171
    Tile(64, 128, 32, num_warps=8, num_stages=3),  # 171
    Tile(128, 64, 32, num_warps=8, num_stages=3),  # 240
)
CONV_F32_TILES = (  # tf32 / exact f32
    Tile(64, 64, 32, num_warps=4, num_stages=3),  # 216 / 204
    Tile(64, 64, 64, num_warps=4, num_stages=3),  # 198 / 186
    Tile(64, 128, 32, num_warps=8, num_stages=3),  # 230 / 189
    Tile(128, 64, 32, num_warps=8, num_stages=3),  # 220 / 202
)
# Connection tables (a gathered [BLOCK_K, BLOCK_N] membership tile) and 3-D
# convs (three position vectors per row) need more registers per row: fewer rows
# by default; the autotuner may still find a wider tile faster on a given layer.
NARROW_TILES = (Tile(32, 64, 32, num_warps=4, num_stages=3),
                Tile(32, 32, 32, num_warps=4, num_stages=3),
                Tile(64, 64, 32, num_warps=4, num_stages=3))
# The interpreter runs one program at a time in numpy: fewer, larger programs
# are faster, and tl.dot needs every dim >= 16.
CONV_CPU_TILE = Tile(64, 32, 32, num_warps=1, num_stages=1)


@functools.lru_cache(maxsize=4096)
def fit_tiles(tiles: tuple[Tile, ...], problem: tuple[int, int, int] | None) -> tuple[Tile, ...]:
    """Each tile shrunk to a GEMM (rows, cols, reduction) (Tile.fit), repeats
    dropped, order kept; unchanged when the problem is not known (None).
    Cached: every launch asks."""
    if problem is None:
        return tuple(tiles)
    fitted: list[Tile] = []
    for tile in tiles:
        tile = tile.fit(*problem)
        if tile not in fitted:
            fitted.append(tile)
    return tuple(fitted)


def pick_tile(tiles, a_itemsize: int, b_itemsize: int) -> Tile:
    for tile in tiles:
        if tile.shared_bytes(a_itemsize, b_itemsize) <= SHARED_LIMIT:
            return tile
    return tiles[-1]


@functools.lru_cache(maxsize=1024)
def tile_candidates(first: Tile, tiles: tuple[Tile, ...], a_itemsize: int,
                    b_itemsize: int) -> tuple[Tile, ...]:
    """What the autotuner times: `first` (the default a family picks), then
    the other tiles that fit shared memory. Cached: every launch asks."""
    return (first, *(t for t in tiles if t != first
                     and t.shared_bytes(a_itemsize, b_itemsize) <= SHARED_LIMIT))


def input_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """How tl.dot multiplies fp32 operands (ignored for f16/bf16)."""
    return "tf32" if dtype == torch.float32 and allow_tf32 else "ieee"


def dot_in_fp32(x: torch.Tensor) -> bool:
    """The interpreter's bf16 tl.dot is unreliable: multiply there in fp32
    (exact for products of 16-bit values; the accumulator is fp32 anyway)."""
    return target(x) == "cpu" and x.dtype != torch.float32


class WeightCache:
    """Weights converted (and, for convs, re-laid-out) for the GPU, once per
    parameter version: `optimizer.step()` bumps `_version` (shared by every
    `.detach()` of the parameter), so a stale copy is never used. Holding the
    source tensor keeps its storage alive, so no other tensor can take its
    data_ptr while the entry exists: a fresh `.detach()` of the same
    parameter finds the entry."""

    def __init__(self, limit: int = 256):
        self.limit = limit
        self._entries: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, weight: torch.Tensor, dtype: torch.dtype, make) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, tuple(weight.shape), weight.stride(), dtype,
               str(weight.device))
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.limit:
                self._entries.clear()
            with torch.no_grad():
                entry = self._entries[key] = (weight, make(weight.detach()))
        return entry[1]


def packed_conv_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[out, in, *k] in `dtype`, stored as [*k, in, out] (out contiguous) but
    returned as a view indexed [out, in, *k]: the kernel reads real strides,
    and a [BLOCK_K, BLOCK_N] weight tile is now contiguous along out."""
    rank = weight.dim() - 2
    order = tuple(range(2, 2 + rank)) + (1, 0)  # [*k, in, out]
    packed = weight.to(dtype).permute(order).contiguous()
    back = [order.index(axis) for axis in range(weight.dim())]
    return packed.permute(back)


def output_format(x: torch.Tensor) -> torch.memory_format:
    """Keep a channels-last input's layout for the output, as PyTorch's conv does."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def table_blocks(table, c_in: int, block_n: int, device) -> tuple[torch.Tensor, ...]:
    """(block_start, block_chan, member) for a connection table and BLOCK_N:
    block b of output channels b·BLOCK_N.. reads block_chan[block_start[b]:
    block_start[b+1]], the sorted union of its rows; member[o, c] is 1 where
    row o lists input c."""
    starts, channels = [0], []
    for first in range(0, len(table), block_n):
        union = sorted(set().union(*table[first:first + block_n]))
        channels.extend(union)
        starts.append(len(channels))
    member = torch.zeros(len(table), c_in, dtype=torch.int8)
    for out, row in enumerate(table):
        member[out, list(row)] = 1
    return (torch.tensor(starts, dtype=torch.int32, device=device),
            torch.tensor(channels, dtype=torch.int32, device=device),
            member.to(device))


TABLE_BLOCKS_CACHED = 256


def cached_table_blocks(table, c_in: int, block_n: int, device) -> tuple[torch.Tensor, ...]:
    """table_blocks, memoized (the same tensors for the same arguments): what the
    conv and conv_pool launches pass to conv_operands."""
    return _table_blocks(table, c_in, block_n, str(device))


@functools.lru_cache(maxsize=TABLE_BLOCKS_CACHED)
def _table_blocks(table, c_in: int, block_n: int, device: str) -> tuple[torch.Tensor, ...]:
    return table_blocks(table, c_in, block_n, torch.device(device))


def conv_operands(x, weight, params, attrs, channels, block_n, table_blocks) -> tuple[list, list]:
    """x, the weight, the bias and a connection table's block lists (from
    `table_blocks(table, c_in, block_n, device)`), with the membership
    matrix's strides: the operands every implicit-GEMM conv kernel reads."""
    pointers = [x, weight]
    if attrs["bias"] != "none":
        pointers.append(params["bias"].detach())
    extra_strides = []
    if attrs["table"] is not None:
        blocks = table_blocks(attrs["table"], channels, block_n, x.device)
        pointers.extend(blocks)
        extra_strides = list(blocks[2].stride())
    return pointers, extra_strides


def conv_operand_signature(attrs, pointer: str, packed: bool) -> dict:
    """The ahead-of-time types of conv_operands' list (x, the weight, the bias, a
    table's block lists): the weight in the input's dtype when a GPU launch
    packs it, else fp32."""
    sig = {"x_ptr": pointer, "w_ptr": pointer if packed else "*fp32"}
    if attrs["bias"] != "none":
        sig["bias_ptr"] = "*fp32"
    if attrs["table"] is not None:
        sig.update({"block_start_ptr": "*i32", "block_chan_ptr": "*i32", "member_ptr": "*i8"})
    return sig


def table_connections(table) -> int:
    return sum(len(row) for row in table)


def geometry(attrs) -> dict:
    """The layer's constexpr geometry: KERNEL_H, CONV_STRIDE_H, DILATION_H, ... per dim."""
    found = {}
    for d, k, s, r in zip(DIMS[len(attrs["kernel"])], attrs["kernel"], attrs["stride"],
                          attrs["dilation"]):
        found.update({f"KERNEL_{d.upper()}": k, f"CONV_STRIDE_{d.upper()}": s,
                      f"DILATION_{d.upper()}": r})
    return found


def _numel(ttype, env) -> int:
    return math.prod(evaluate(d, env) for d in ttype.shape)


# -- fused epilogues (shared with the dense, depthwise and separable families) -----------------

def epilogue_outputs(residuals, shape, dtype, device, memory_format, kept: int):
    """(y, residuals, kept tensors) of a kernel with a fused epilogue. y takes
    the first residual's layout (epilogue.like_output), every other residual
    is brought to y's strides and the kept tensors share them, so the one
    offset expression of the kernel addresses all of them."""
    residuals = residual_operands(list(residuals))
    y = like_output(residuals[0] if residuals else None, shape, dtype, device, memory_format)
    for r in residuals:
        if tuple(r.shape) != tuple(y.shape):
            raise ValueError(f"residual operand of shape {tuple(r.shape)} for an output of "
                             f"shape {tuple(y.shape)}")
    residuals = [r if r.stride() == y.stride() else torch.empty_like(y).copy_(r)
                 for r in residuals]
    return y, residuals, [torch.empty_like(y) for _ in range(kept)]


def epilogue_bytes(ep: Epilogue, outputs: int, itemsize: int) -> int:
    """Global-memory bytes the epilogue adds: residuals read, intermediates stored."""
    return (len(ep.residuals) + len(ep.kept)) * outputs * itemsize


def epilogue_meta(ep: Epilogue) -> dict:
    """What a launch needs to know of the epilogue (the kernel has the rest)."""
    return {"residuals": len(ep.residuals), "kept": len(ep.kept)}


class Conv(Family):
    name = "conv"
    tiles = CONV_TILES
    f32_tiles = CONV_F32_TILES
    narrow_tiles = NARROW_TILES
    cpu_tile = CONV_CPU_TILE
    # re-lay weights out (see packed_conv_weight)
    pack_weights: ClassVar[dict] = {"cpu": False, "gpu": True}

    def __init__(self):
        self._weights = WeightCache()

    # -- planning ------------------------------------------------------------------------
    def plan(self, graph, nodes) -> KernelPlan:
        """A conv node, or a fused node [conv, elementwise steps...]: inputs
        (x, *residuals), outputs (the last step's value, *kept intermediates)."""
        (node,) = nodes
        anchor = anchor_step(node)
        ep = epilogue_of(graph, node)
        x = graph.type_of(node.inputs[0])
        a = anchor.attrs
        rank = x.rank - 2
        name = safe_name("conv", f"{rank}d", anchor.layer or "", *ep.name_parts(), node.id)
        geometry = "x".join(str(k) for k in a["kernel"])
        doc = (f"{rank}-D convolution, kernel {geometry}, {a['out']} outputs"
               + (f", {a['groups']} groups" if a["groups"] > 1 else "")
               + (", connection table" if a["table"] is not None else "")
               + f", bias {a['bias']}{ep.describe()}.")
        source = module_source(render("conv.py.jinja", name=name, doc=doc, dims=list(DIMS[rank]),
                                      bias=a["bias"], table=a["table"] is not None,
                                      ep=ep.template()))
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0], *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs),
                          meta={"rank": rank, "dtype": x.dtype, **epilogue_meta(ep)})

    # -- running -------------------------------------------------------------------------
    def tile(self, device: str, attrs, x_itemsize: int, w_itemsize: int) -> Tile:
        if device == "cpu":
            return self.cpu_tile
        return pick_tile(self._tiles(attrs, x_itemsize), x_itemsize, w_itemsize)

    def _tiles(self, attrs, x_itemsize: int):
        if attrs["table"] is not None or len(attrs["kernel"]) == 3:
            return self.narrow_tiles
        return self.f32_tiles if x_itemsize == 4 else self.tiles

    def candidates(self, device: str, attrs, x_itemsize: int, w_itemsize: int,
                   problem: tuple[int, int, int] | None = None) -> list[Tile]:
        """The default tile, then the others the autotuner may time on a GPU;
        with `problem` (rows, output channels, input channels of a group) each
        shrunk to it (Tile.fit), repeats dropped."""
        first = self.tile(device, attrs, x_itemsize, w_itemsize)
        if device == "cpu":
            return [first]
        tiles = tile_candidates(first, tuple(self._tiles(attrs, x_itemsize)), x_itemsize,
                                w_itemsize)
        return list(fit_tiles(tiles, problem))

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs: x, then the epilogue's residual operands (if any).
        x, *residuals = inputs
        (node_id,) = plan.nodes
        a, p = launch_attrs(attrs[node_id]), launch_params(params[node_id])
        if x.dtype not in TORCH_DTYPE.values():
            raise TypeError(f"the triton conv takes f32/f16/bf16 inputs, got {x.dtype}")
        x = x.detach()
        batch, channels, sizes = x.shape[0], x.shape[1], tuple(x.shape[2:])
        groups, c_out_total = a["groups"], a["out"]
        pads = resolve_pads(a["pad"], sizes, a["kernel"], a["stride"], a["dilation"])
        out_sizes = tuple((m + before + after - effective_kernel(k, r)) // s + 1
                          for m, (before, after), k, s, r in zip(sizes, pads, a["kernel"],
                                                                 a["stride"], a["dilation"]))
        device = target(x)
        weight = p["weight"].detach()
        if self.pack_weights[device]:
            weight = self._weights.get(weight, x.dtype, lambda w: packed_conv_weight(w, x.dtype))

        # Allocate the output (a residual's layout when there is one) and the kept values.
        y, residuals, kept = epilogue_outputs(residuals, (batch, c_out_total) + out_sizes,
                                              x.dtype, x.device, output_format(x),
                                              plan.meta.get("kept", 0))

        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            layer = {k: a[k] for k in ("out", "kernel", "stride", "dilation", "groups", "flip")}
            tile = autotune.choose(
                plan, self.candidates(device, a, x.element_size(), weight.element_size(),
                                      self._problem(a, batch, out_sizes, channels)),
                (x, *residuals), relaunch,
                extra={**layer, "pads": pads, "table": a["table"] is not None})

        # Grid: output-position blocks × output-channel blocks × groups.
        c_in, c_out = channels // groups, c_out_total // groups
        m_total = batch * math.prod(out_sizes)
        grid = (cdiv(m_total, tile.BLOCK_M), cdiv(c_out, tile.BLOCK_N), groups)

        # Launch.
        pointers, extra_strides = conv_operands(x, weight, p, a, channels, tile.BLOCK_N,
                                                cached_table_blocks)
        pointers += [y, *residuals, *kept]
        location = [math.prod(out_sizes)] if a["bias"] == "location" else []
        options = tile.launch_options() if device == "gpu" else {}
        kernel[grid](
            *pointers,
            batch, c_in, c_out, *sizes, *out_sizes, *location, *(before for before, _ in pads),
            *x.stride(), *weight.stride(), *y.stride(), *extra_strides,
            **geometry(a), FLIP=bool(a["flip"]),
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            INPUT_PRECISION=input_precision(x.dtype, torch.backends.cudnn.allow_tf32),
            DOT_FP32=dot_in_fp32(x), INDEX_64=needs_int64(x, weight, y), **options)
        return [y, *kept]

    @staticmethod
    def _problem(attrs, batch: int, out_sizes, channels: int) -> tuple[int, int, int] | None:
        """(rows, output channels, input channels) of one group's GEMM; None for a
        table (a column block reads the union of its rows' inputs, not c_in)."""
        if attrs["table"] is not None:
            return None
        groups = attrs["groups"]
        return batch * math.prod(out_sizes), attrs["out"] // groups, channels // groups

    # -- ahead of time -------------------------------------------------------------------
    def aot(self, plan, graph):
        node = graph.node(plan.nodes[0])
        a, dtype, rank = anchor_step(node).attrs, plan.meta["dtype"], plan.meta["rank"]
        dims = DIMS[rank]
        pointer = POINTER[dtype]
        # A GPU launch packs the weight in the input's dtype (pack_weights["gpu"]).
        w_itemsize = ITEMSIZE[dtype] if self.pack_weights["gpu"] else 4
        tile = self.tile("gpu", a, ITEMSIZE[dtype], w_itemsize)
        sig = conv_operand_signature(a, pointer, self.pack_weights["gpu"])
        sig["y_ptr"] = pointer
        sig.update(epilogue_signature(epilogue_of(graph, node), pointer))
        ints = ["batch", "c_in", "c_out", *(f"in_{d}" for d in dims), *(f"out_{d}" for d in dims)]
        if a["bias"] == "location":
            ints.append("n_positions")
        ints += [f"pad_{d}" for d in dims]
        for t in ("x", "w", "y"):
            ints += [f"stride_{t}n" if t != "w" else "stride_wo", f"stride_{t}c"]
            ints += [f"stride_{t}{d}" for d in dims]
        if a["table"] is not None:
            ints += ["stride_mo", "stride_mc"]
        sig.update({i: "i32" for i in ints})
        constexprs = geometry(a)
        constexprs.update({"FLIP": bool(a["flip"]), "BLOCK_M": tile.BLOCK_M,
                           "BLOCK_N": tile.BLOCK_N, "BLOCK_K": tile.BLOCK_K,
                           "INPUT_PRECISION": input_precision(TORCH_DTYPE[dtype],
                                                              torch.backends.cudnn.allow_tf32),
                           "DOT_FP32": False, "INDEX_64": False})
        sig.update({k: "constexpr" for k in constexprs})
        return sig, constexprs

    # -- cost ----------------------------------------------------------------------------
    def cost(self, plan, graph, env):
        """FLOPs: the GEMM's multiply-adds, plus one per output for each
        epilogue step. Bytes: x, weights, bias and y, plus the epilogue's
        residuals (read) and kept intermediates (stored)."""
        node = graph.node(plan.nodes[0])
        a = anchor_step(node).attrs
        ep = epilogue_of(graph, node)
        x, y = graph.type_of(node.inputs[0]), node.types[0]
        taps = math.prod(a["kernel"])
        rows = _numel(y, env) // a["out"]  # M = N · output positions
        if a["table"] is not None:
            weights = table_connections(a["table"]) * taps  # only real connections
        else:
            weights = a["out"] * (x.channels // a["groups"]) * taps
        flops = 2 * rows * weights + _numel(y, env) * epilogue_flops(ep)
        bias = {"none": 0, "channel": a["out"], "location": _numel(y, env) // _numel_batch(y, env)}
        nbytes = ((_numel(x, env) + _numel(y, env)) * ITEMSIZE[x.dtype]
                  + (weights + bias[a["bias"]]) * 4
                  + epilogue_bytes(ep, _numel(y, env), ITEMSIZE[x.dtype]))
        return flops, nbytes


def _numel_batch(ttype, env) -> int:
    return evaluate(ttype.shape[0], env)
