"""Convolution (+ bias + elementwise epilogue) and pooling as one kernel
(kernels/conv_pool.py.jinja), for the `_fused` nodes of the fuse-pooling pass:
steps [conv, activation..., maxpool | avgpool | lppool | wavgpool].

Each program computes a tile of BLOCK_M pooled output positions × BLOCK_N
output channels. For each tap of the pooling window it runs the conv's
implicit GEMM (as kernels/conv.py.jinja) for the conv outputs that tap reads,
adds the bias, applies the epilogue in fp32 and folds the value into the
pooling accumulator, so the pre-pool activation never reaches global memory.
Overlapping windows (3×3 at stride 2) recompute the conv outputs they share;
the fusion pass bounds that (passes/fusion.py, MAX_RECOMPUTE).

Both paddings may be `same` on symbolic sizes: the launch resolves them from
the real input, and they reach the kernel as arguments, never as constants.
On a GPU the tile is tuned on first use at new sizes (ConvPool.candidates,
autotune.py); the interpreter keeps one fixed tile.

Pooling follows the pool family exactly (families/pool.py): padding never
counts, average divides by the real taps, a NaN wins a max, Lp and the
Gaussian weights are computed the same way. What is pooled is the activation
rounded to the output dtype, as the unfused net stores the pooling input.

Training variant: when the backward graph reads the pre-pool activation (or
the conv output before an activation whose derivative needs it), the kernel
also stores those values. Every conv output is stored exactly once, by the
pooled position that owns it: the run of `stride` conv outputs starting at its
window's first tap. The runs partition the conv output, so the tap loop spans
max(window, stride) taps per dim and the grid covers ceil((conv + pad) / stride)
pooled positions per dim (the extra ones store kept values only). Outputs that
no window reads are stored too, so the backward graph never reads garbage.
"""
from __future__ import annotations

import functools
import math
from typing import ClassVar

import torch

from ...ir import ValueRef
from ...ir.types import evaluate
from ...ops.fused import result_index, step_node
from ...ops.spatial import effective_kernel, resolve_pads
from .. import autotune
from ..codegen import module_source, render, safe_name
from .base import (
    ITEMSIZE,
    POINTER,
    Family,
    KernelPlan,
    cdiv,
    float_literal,
    needs_int64,
    target,
)
from .conv import (
    DIMS,
    TORCH_DTYPE,
    Tile,
    WeightCache,
    cached_table_blocks,
    conv_operand_signature,
    conv_operands,
    dot_in_fp32,
    fit_tiles,
    geometry,
    input_precision,
    output_format,
    packed_conv_weight,
    pick_tile,
    table_connections,
    tile_candidates,
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
)

# GPU tiles, best first: the first that fits shared memory is the default (and
# what aot compiles); on first use at new sizes the autotuner times it against
# the others that fit (autotune.py; f32 inputs also try the 16-bit tiles, which
# may spill on sm_80 but can still win). The pooling
# accumulator is a second fp32 tile beside the conv's, and the training variant
# also stores inside the tap loop, so tiles have half conv's default rows and
# twice its warps: 32 pooled positions × 64 channels with 8 warps; f32 inputs
# (tf32 dots, 4-byte gathers) take 16 channels per K step in a 2-stage
# pipeline. These compile for sm_80 and sm_90 without spills ahead of time
# (aot.py passes no alignment facts, so every load is a scalar gather) for
# 1-D to 3-D, tables, inference and training: at most 235 registers for
# 16-bit inputs and 214 for f32. 64 × 64 with 4 warps spills, and so does f32
# with BLOCK_K = 32 (or 3 stages) on sm_80 in the training variant.
CONV_POOL_TILES = (
    Tile(32, 64, 32, num_warps=8, num_stages=3),
    Tile(64, 32, 32, num_warps=8, num_stages=3),
)
F32_TILES = (Tile(32, 64, 16, num_warps=8, num_stages=2),)
# The interpreter: fewer, larger programs are faster; tl.dot needs dims >= 16.
CPU_TILE = Tile(64, 32, 32, num_warps=1, num_stages=1)

# The connection-table block lists of a launch, built once per (table, C_in,
# BLOCK_N, device): the lists depend on BLOCK_N, so each tile the autotuner
# tries gets its own. Any implicit-GEMM conv family can share this cache.
# FLOPs per pooled tap by kind (compare; add; square-add or |x|^p; weight, multiply, two adds)
TAP_FLOPS = {"max": 1, "avg": 1, "lp": 2, "wavg": 4}


def pool_template_params(pool_attrs: dict, rank: int) -> dict:
    """The pooling parameters of the template, as the pool family derives them."""
    kind = pool_attrs["kind"]
    params = {"kind": kind, "p_mode": "none", "P": "2.0", "clipped": False, "NEAR2": "0.0",
              "CENTRE": ["0.0"] * rank, "HALF": ["0.0"] * rank, "WSCALE": "1.0"}
    if kind == "lp":
        p = float(pool_attrs["p"])
        params["p_mode"] = {2.0: "two", 1.0: "one"}.get(p, "general")
        params["P"] = float_literal(p)
    if kind == "wavg":
        window = pool_attrs["window"]
        half = [0.5 if k % 2 == 0 else 0.0 for k in window]
        params["WSCALE"] = float_literal(1.0 / (2.0 * pool_attrs["sigma"] ** 2 * math.log(2.0)))
        params["CENTRE"] = [float_literal((k - 1) / 2) for k in window]
        params["HALF"] = [float_literal(h) for h in half]
        params["NEAR2"] = float_literal(sum(h * h for h in half))
        pad = pool_attrs["pad"]
        params["clipped"] = pad == "same" if isinstance(pad, str) else any(map(any, pad))
    return params


def fused_epilogue(graph, node) -> Epilogue:
    """The steps between the conv and the pooling, and the values a backward
    graph reads: epilogue_of's kept values plus the pre-pool activation itself."""
    steps = node.attrs["steps"]
    last = len(steps) - 1
    ep = epilogue_of(graph, node, stop=last)
    if ep.residuals:
        raise AssertionError(f"conv_pool: node %{node.id} has a residual operand before pooling")
    pre_pool = ValueRef(node.id, result_index(last - 1, len(steps)))
    if pre_pool in graph.saved_for_backward and pre_pool not in ep.kept_refs:
        ep.kept.append((pre_pool, ep.result))
    return ep


def pool_step(node):
    return step_node(node, len(node.attrs["steps"]) - 1)


def spans(window, stride, saving: bool) -> tuple[int, ...]:
    """Taps visited per dim: the window, or in the training variant also the
    owned run of `stride` conv outputs."""
    return tuple(max(k, s) if saving else k for k, s in zip(window, stride))


def grid_sizes(conv_sizes, out_sizes, pads, stride, saving: bool) -> tuple[int, ...]:
    """Pooled positions the grid covers: the pooled output, or in the training
    variant enough owners ceil((conv + pad before) / stride) for every conv output."""
    if not saving:
        return tuple(out_sizes)
    return tuple(max(o, -(-(m + before) // s))
                 for m, o, (before, _), s in zip(conv_sizes, out_sizes, pads, stride))


def covered(conv: int, out: int, grid: int, before: int, window: int, stride: int,
            saving: bool) -> int:
    """Conv evaluations along one dim: per grid position, the visited taps that
    fall on the conv output (window taps of real pooled positions, and in the
    training variant the owned runs). Their product over dims is the cost
    model's count (a slight overcount for the training grid's extra rows)."""
    total = 0
    for p in range(grid):
        start = p * stride - before
        taps = set()
        if p < out:
            taps.update(range(start, start + window))
        if saving:
            taps.update(range(start, start + stride))
        total += sum(0 <= c < conv for c in taps)
    return total


class ConvPool(Family):
    name = "conv_pool"
    fuses = True  # computes `_fused` nodes in one kernel (lowering.expand_fused)
    tiles = CONV_POOL_TILES
    f32_tiles = F32_TILES
    cpu_tile = CPU_TILE
    # re-lay weights out (conv.packed_conv_weight)
    pack_weights: ClassVar[dict] = {"cpu": False, "gpu": True}

    def __init__(self):
        self._weights = WeightCache()

    # -- planning ------------------------------------------------------------------------
    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        conv, pool = anchor_step(node), pool_step(node)
        a, pa = conv.attrs, pool.attrs
        x = graph.type_of(node.inputs[0])
        rank = x.rank - 2
        ep = fused_epilogue(graph, node)
        saving = bool(ep.kept)
        name = safe_name("conv", f"{rank}d", *ep.ops[:3], pool.op, "saving" if saving else "",
                         node.layer or "", node.id)
        kernel = "x".join(str(k) for k in a["kernel"])
        window = "x".join(str(k) for k in pa["window"])
        stride = "x".join(str(s) for s in pa["stride"])
        doc = (f"{rank}-D convolution, kernel {kernel}, {a['out']} outputs"
               + (f", {a['groups']} groups" if a["groups"] > 1 else "")
               + (", connection table" if a["table"] is not None else "")
               + f", bias {a['bias']}{ep.describe()}, then {pool.op} {window} stride {stride}"
               + (f", storing {len(ep.kept)} intermediate(s) for backward" if saving else "")
               + ".")
        source = module_source(render(
            "conv_pool.py.jinja", name=name, doc=doc, dims=list(DIMS[rank]), bias=a["bias"],
            table=a["table"] is not None, ep=ep.template(), saving=saving,
            **pool_template_params(pa, rank)))
        meta = {"rank": rank, "dtype": x.dtype, "kind": pa["kind"], "saving": saving,
                "kept": len(ep.kept), "epilogue": ep.ops}
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0],),
                          (ValueRef(node.id, 0), *ep.kept_refs), meta=meta)

    # -- running -------------------------------------------------------------------------
    def tile(self, device: str, attrs, x_itemsize: int, w_itemsize: int) -> Tile:
        """Tables and 3-D convs fit the same tiles as 2-D ones (see CONV_POOL_TILES)."""
        if device == "cpu":
            return self.cpu_tile
        tiles = self.f32_tiles if x_itemsize == 4 else self.tiles
        return pick_tile(tiles, x_itemsize, w_itemsize)

    def candidates(self, device: str, attrs, x_itemsize: int, w_itemsize: int,
                   problem: tuple[int, int, int] | None = None) -> list[Tile]:
        """What the autotuner times on a GPU: the tile `tile` picks (the one aot
        compiles), then every other tile that fits shared memory; with `problem`
        (grid rows, output and input channels of a group) each shrunk to it
        (Tile.fit), repeats dropped. The interpreter keeps its one fixed tile."""
        first = self.tile(device, attrs, x_itemsize, w_itemsize)
        if device == "cpu":
            return [first]
        tiles = (*self.f32_tiles, *self.tiles) if x_itemsize == 4 else self.tiles
        return list(fit_tiles(tile_candidates(first, tiles, x_itemsize, w_itemsize), problem))

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs; the anchor's and the pooling's concrete attributes.
        (x,) = inputs
        (node_id,) = plan.nodes
        a = launch_attrs(attrs[node_id])
        pa = attrs[node_id]["steps"][-1]["attrs"]
        p = launch_params(params[node_id])
        if x.dtype not in TORCH_DTYPE.values():
            raise TypeError(f"the triton conv takes f32/f16/bf16 inputs, got {x.dtype}")
        x = x.detach()
        batch, channels, sizes = x.shape[0], x.shape[1], tuple(x.shape[2:])
        groups, c_out_total = a["groups"], a["out"]
        saving = plan.meta["saving"]

        # Conv geometry: padding and the conv output (the pooling input) sizes.
        pads = resolve_pads(a["pad"], sizes, a["kernel"], a["stride"], a["dilation"])
        conv_sizes = tuple((m + before + after - effective_kernel(k, r)) // s + 1
                           for m, (before, after), k, s, r in zip(sizes, pads, a["kernel"],
                                                                  a["stride"], a["dilation"]))
        # Pooling geometry: its padding, the pooled sizes, the grid's extent.
        window, stride = tuple(pa["window"]), tuple(pa["stride"])
        ppads = resolve_pads(pa["pad"], conv_sizes, window, stride)
        out_sizes = tuple((m + before + after - k) // s + 1
                          for m, (before, after), k, s in zip(conv_sizes, ppads, window, stride))
        extent = grid_sizes(conv_sizes, out_sizes, ppads, stride, saving)

        device = target(x)
        weight = p["weight"].detach()
        if self.pack_weights[device]:
            weight = self._weights.get(weight, x.dtype, lambda w: packed_conv_weight(w, x.dtype))

        # Allocate the pooled output in x's layout, and the kept conv-sized values.
        fmt = output_format(x)
        y = like_output(None, (batch, c_out_total) + out_sizes, x.dtype, x.device, fmt)
        kept = []
        if plan.meta["kept"]:
            first = torch.empty((batch, c_out_total) + conv_sizes, dtype=x.dtype,
                                device=x.device, memory_format=fmt)
            kept = [first] + [torch.empty_like(first) for _ in range(plan.meta["kept"] - 1)]

        # The GEMM of one group: rows (pooled positions the grid covers), columns.
        c_in, c_out = channels // groups, c_out_total // groups
        m_total = batch * math.prod(extent)

        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            layer = {k: a[k] for k in ("out", "kernel", "stride", "dilation", "groups", "flip")}
            # A table's column blocks read the union of their rows' inputs, not c_in.
            problem = None if a["table"] is not None else (m_total, c_out, c_in)
            tile = autotune.choose(
                plan, self.candidates(device, a, x.element_size(), weight.element_size(),
                                      problem),
                (x,), relaunch,
                extra={**layer, "pads": pads, "table": a["table"] is not None,
                       "window": window, "pool_stride": stride, "pool_pads": ppads})

        # Grid: pooled-position blocks × output-channel blocks × groups.
        grid = (cdiv(m_total, tile.BLOCK_M), cdiv(c_out, tile.BLOCK_N), groups)

        # Launch.
        pointers, extra_strides = conv_operands(x, weight, p, a, channels, tile.BLOCK_N,
                                                cached_table_blocks)
        pointers.append(y)
        pointers.extend(kept)
        location = [math.prod(conv_sizes)] if a["bias"] == "location" else []
        kept_strides = list(kept[0].stride()) if kept else []
        pool_geometry = {}
        for d, k, s, span in zip(DIMS[len(sizes)], window, stride, spans(window, stride, saving)):
            pool_geometry.update({f"POOL_{d.upper()}": k, f"POOL_STRIDE_{d.upper()}": s,
                                  f"SPAN_{d.upper()}": span})
        options = tile.launch_options() if device == "gpu" else {}
        kernel[grid](
            *pointers,
            batch, c_in, c_out, *sizes, *conv_sizes, *out_sizes,
            *(extent if saving else ()), *location,
            *(before for before, _ in pads), *(before for before, _ in ppads),
            *x.stride(), *weight.stride(), *y.stride(), *kept_strides, *extra_strides,
            **geometry(a), FLIP=bool(a["flip"]), **pool_geometry,
            BLOCK_M=tile.BLOCK_M, BLOCK_N=tile.BLOCK_N, BLOCK_K=tile.BLOCK_K,
            INPUT_PRECISION=input_precision(x.dtype, torch.backends.cudnn.allow_tf32),
            DOT_FP32=dot_in_fp32(x), INDEX_64=needs_int64(x, weight, y, *kept[:1]), **options)
        return [y, *kept]

    # -- ahead of time -------------------------------------------------------------------
    def aot(self, plan, graph):
        node = graph.node(plan.nodes[0])
        a, pa = anchor_step(node).attrs, pool_step(node).attrs
        dtype, rank, saving = plan.meta["dtype"], plan.meta["rank"], plan.meta["saving"]
        dims = DIMS[rank]
        pointer = POINTER[dtype]
        # A GPU launch packs the weight in the input's dtype (pack_weights["gpu"]).
        w_itemsize = ITEMSIZE[dtype] if self.pack_weights["gpu"] else 4
        tile = self.tile("gpu", a, ITEMSIZE[dtype], w_itemsize)
        sig = conv_operand_signature(a, pointer, self.pack_weights["gpu"])
        sig["y_ptr"] = pointer
        sig.update(epilogue_signature(fused_epilogue(graph, node), pointer))
        ints = ["batch", "c_in", "c_out", *(f"in_{d}" for d in dims),
                *(f"conv_{d}" for d in dims), *(f"out_{d}" for d in dims)]
        if saving:
            ints += [f"grid_{d}" for d in dims]
        if a["bias"] == "location":
            ints.append("n_positions")
        ints += [f"pad_{d}" for d in dims] + [f"ppad_{d}" for d in dims]
        for t in ("x", "w", "y") + (("k",) if saving else ()):
            ints += [f"stride_{t}n" if t != "w" else "stride_wo", f"stride_{t}c"]
            ints += [f"stride_{t}{d}" for d in dims]
        if a["table"] is not None:
            ints += ["stride_mo", "stride_mc"]
        sig.update({i: "i32" for i in ints})
        constexprs = geometry(a)
        constexprs["FLIP"] = bool(a["flip"])
        window, stride = pa["window"], pa["stride"]
        for d, k, s, span in zip(dims, window, stride, spans(window, stride, saving)):
            constexprs.update({f"POOL_{d.upper()}": k, f"POOL_STRIDE_{d.upper()}": s,
                               f"SPAN_{d.upper()}": span})
        constexprs.update({"BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N,
                           "BLOCK_K": tile.BLOCK_K,
                           "INPUT_PRECISION": input_precision(TORCH_DTYPE[dtype],
                                                              torch.backends.cudnn.allow_tf32),
                           "DOT_FP32": False, "INDEX_64": False})
        sig.update({k: "constexpr" for k in constexprs})
        return sig, constexprs, tile.launch_options()

    # -- cost ----------------------------------------------------------------------------
    def cost(self, plan, graph, env):
        """FLOPs of every conv evaluation the kernel makes (overlapping windows
        recompute shared outputs), its bias and epilogue, and the pooling; bytes
        of x, the weights and bias, the pooled output and the kept values."""
        node = graph.node(plan.nodes[0])
        a, pa = anchor_step(node).attrs, pool_step(node).attrs
        saving = plan.meta["saving"]
        x, y = graph.type_of(node.inputs[0]), node.types[0]
        conv_type = node.types[result_index(0, len(node.attrs["steps"]))]
        batch = evaluate(x.shape[0], env)
        conv_sizes = [evaluate(d, env) for d in conv_type.shape[2:]]
        out_sizes = [evaluate(d, env) for d in y.shape[2:]]
        pads = resolve_pads(pa["pad"], tuple(conv_sizes), pa["window"], pa["stride"])
        window, stride = pa["window"], pa["stride"]
        extent = grid_sizes(conv_sizes, out_sizes, pads, stride, saving)
        evaluations = batch * math.prod(
            covered(m, o, g, before, k, s, saving)
            for m, o, g, (before, _), k, s in zip(conv_sizes, out_sizes, extent, pads, window,
                                                  stride))
        taps = math.prod(a["kernel"])
        if a["table"] is not None:
            weights = table_connections(a["table"]) * taps  # only real connections
        else:
            weights = a["out"] * (x.channels // a["groups"]) * taps
        per_output = (1 if a["bias"] != "none" else 0) + epilogue_flops(fused_epilogue(graph, node))
        n_out = batch * a["out"] * math.prod(out_sizes)
        flops = (evaluations * (2 * weights + a["out"] * per_output)
                 + n_out * math.prod(window) * TAP_FLOPS[pa["kind"]])
        n_conv = batch * a["out"] * math.prod(conv_sizes)
        bias = {"none": 0, "channel": a["out"], "location": a["out"] * math.prod(conv_sizes)}
        itemsize = ITEMSIZE[x.dtype]
        x_numel = math.prod(evaluate(d, env) for d in x.shape)
        nbytes = ((x_numel + n_out + plan.meta["kept"] * n_conv) * itemsize
                  + (weights + bias[a["bias"]]) * 4)
        return flops, nbytes
