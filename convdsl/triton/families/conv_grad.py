"""The convolution's gradients (kernels/conv_grad.py.jinja): the input
gradient h (eq. 9.13), the kernel gradient g (eq. 9.11) and the bias gradient
of every conv variant — stride, padding, dilation, groups, depthwise,
connection tables, flip, separable factors, 1-D to 3-D.

- ConvDx: transposed implicit GEMM in gather form. Input positions are split
  into residue classes modulo the stride, one per program, so a program visits
  only the taps that reach its class (no masked-out tap is ever multiplied)
  and every dx element is written once: no atomics. Depthwise layers (each
  group reads one channel) use a direct kernel instead of a width-1 tl.dot.
  A fused node [_conv_dx, activation derivative...] (the fuse-backward-epilogue
  pass: conv_dx+relu_dx, conv_dx+tanh_dx, ...) is the same kernel with the
  derivatives applied to the fp32 sum before its one store (families/
  epilogue.py); their second operand, the saved forward value, is a residual
  loaded at dx's own offsets, so the pre-derivative dx never reaches memory.
- ConvDw: GEMM with M = out/groups, N = (C/groups)·taps, K = N·positions,
  split-K into an fp32 partial-sum buffer [splits, …] and a second kernel that
  adds the splits (or, for a separable kernel, adds them and contracts dK with
  the other factors into each factor's gradient).
- BiasGrad: a split reduction of dy for channel, location and tiled biases,
  and the same second kernel.

Sizes are arguments; the forward layer's geometry (kernel, stride, dilation,
flip) is constexpr. Tile configurations are data: the interpreter ("cpu")
uses one fixed tile and no split; a GPU tunes among its candidates on first
use (autotune.py), the first being the default that aot compiles.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ...ir import ValueRef
from ...ops.spatial import resolve_pads
from .. import autotune
from ..codegen import module_source, render, safe_name
from ..loader import load_kernel
from .base import (
    ITEMSIZE,
    POINTER,
    Family,
    KernelPlan,
    cdiv,
    needs_int64,
    next_power_of_2,
)
from .conv import (
    DIMS,
    TORCH_DTYPE,
    Tile,
    WeightCache,
    dot_in_fp32,
    epilogue_bytes,
    epilogue_meta,
    epilogue_outputs,
    fit_tiles,
    input_precision,
    pick_tile,
    table_blocks,
    table_connections,
    tile_candidates,
)
from .epilogue import (
    anchor_step,
    epilogue_flops,
    epilogue_of,
    launch_attrs,
    launch_params,
)
from .spatial import numel, pad3, spatial3, target

TEMPLATE = "conv_grad.py.jinja"
GPU_PROGRAMS = 4 * 132  # split-K aims for about this many programs (4 waves of an H100)


# -- shared helpers -------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """What a gradient kernel needs from its forward conv's canonical attrs."""

    rank: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    flip: bool
    table: tuple | None
    separable: bool
    groups: int
    out: int

    @classmethod
    def of(cls, fattrs: dict) -> "Geometry":
        table = fattrs["table"]
        return cls(len(fattrs["kernel"]), tuple(fattrs["kernel"]), tuple(fattrs["stride"]),
                   tuple(fattrs["dilation"]), bool(fattrs["flip"]),
                   None if table is None else tuple(tuple(r) for r in table),
                   bool(fattrs["separable"]), int(fattrs["groups"]), int(fattrs["out"]))

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    def direct(self, channels: int) -> bool:
        """Each group reads one input channel (depthwise): no tl.dot."""
        return self.table is None and channels == self.groups

    def constexprs(self) -> dict:
        values = {}
        for d, k, s, r in zip(DIMS[self.rank], self.kernel, self.stride, self.dilation):
            values.update({f"KERNEL_{d.upper()}": k, f"CONV_STRIDE_{d.upper()}": s,
                           f"DILATION_{d.upper()}": r})
        values["FLIP"] = self.flip
        return values


def _geometry(node) -> Geometry:
    return Geometry.of(node.attrs["fattrs"])


def _pads(fattrs: dict, sizes) -> tuple[int, ...]:
    """Padding before each spatial dim, resolved on the forward input's sizes."""
    pads = resolve_pads(fattrs["pad"], tuple(sizes), fattrs["kernel"], fattrs["stride"],
                        fattrs["dilation"])
    return tuple(int(before) for before, _ in pads)


def _weight_numel(g: Geometry, channels: int) -> int:
    """Values of the layer's weight roles (all factors of a separable kernel)."""
    c_w = channels if g.table is not None else channels // g.groups
    if g.separable:
        return sum(g.out * c_w * k for k in g.kernel)
    return g.out * c_w * g.taps


def _transpose(table, channels: int) -> tuple[tuple[int, ...], ...]:
    """Per input channel, the output channels whose rows list it."""
    return tuple(tuple(o for o, row in enumerate(table) if c in row) for c in range(channels))


def _splits(row_programs: int, k_total: int, block_k: int, config: dict) -> tuple[int, int]:
    """(splits, k_per_split): enough programs to fill the machine, each with at
    least `min_steps` reduction steps; k_per_split is a multiple of block_k."""
    steps = cdiv(k_total, block_k)
    want = max(1, config["programs"] // max(row_programs, 1))
    splits = max(1, min(want, steps // config["min_steps"]))
    per_split = cdiv(steps, splits) * block_k
    return cdiv(k_total, per_split), per_split


class _Args:
    """A kernel's arguments in order with their AOT types: launch and aot read
    the same list, so they cannot drift ("ptr:dy" is the activation dtype)."""

    def __init__(self):
        self.items: list[tuple[str, str]] = []

    def add(self, kind: str, *names: str) -> "_Args":
        self.items.extend((n, kind) for n in names)
        return self

    def values(self, given: dict) -> list:
        names = [n for n, _ in self.items]
        assert set(given) == set(names), sorted(set(given) ^ set(names))
        return [given[n] for n in names]

    def signature(self, dtype: str, constexprs: dict) -> dict:
        kinds = {"ptr:dy": POINTER[dtype], "ptr:w": POINTER[dtype], "ptr:fp32": "*fp32",
                 "ptr:i32": "*i32", "ptr:i8": "*i8", "i32": "i32"}
        signature = {n: kinds[k] for n, k in self.items}
        signature.update({n: "constexpr" for n in constexprs})
        return signature


def _strides(prefix: str, dims) -> list[str]:
    return [f"stride_{prefix}n", f"stride_{prefix}c"] + [f"stride_{prefix}{d}" for d in dims]


def _sum_kernel(name: str, what: str) -> str:
    return render(TEMPLATE, kind="sum", name=name, doc=f"Adds the split partial sums of {what}.")


# The second pass: partial sums [splits, n] -> [n].
SUM_BLOCK = {"gpu": 1024, "cpu": 4096}


def _run_sum(plan, part: torch.Tensor, out: torch.Tensor, splits: int) -> None:
    kernel = load_kernel(plan.source, plan.meta["sum"])
    n = out.numel()
    block = SUM_BLOCK[target(out)]
    kernel[(cdiv(n, block),)](part, out, n, splits, BLOCK=block,
                                     INDEX_64=needs_int64(part))


def _sum_aot() -> tuple[dict, dict]:
    constexprs = {"BLOCK": SUM_BLOCK["gpu"], "INDEX_64": False}
    sig = {"part_ptr": "*fp32", "out_ptr": "*fp32", "n_elements": "i32", "splits": "i32"}
    sig.update({k: "constexpr" for k in constexprs})
    return sig, constexprs


# -- the input gradient h -------------------------------------------------------------------

class ConvDx(Family):
    """dx = the transpose of the forward conv applied to dy (eq. 9.13)."""

    name = "conv_dx"
    fuses = True  # computes fused nodes [_conv_dx, activation derivative...] (lowering.py)
    tiles = (Tile(64, 64, 32, num_warps=4, num_stages=3),
             Tile(128, 64, 32, num_warps=8, num_stages=3))
    cpu_tile = Tile(64, 32, 32, num_warps=1, num_stages=1)
    # Direct (depthwise) kernel: (positions, channels) per program.
    DIRECT = {"gpu": [(64, 32)], "cpu": [(128, 32)]}
    # GPU: the weight re-laid out as [*k, out, in] in the activation dtype, so a
    # [BLOCK_K (out), BLOCK_N (in)] tile is contiguous along in.
    pack_weights = {"cpu": False, "gpu": True}

    def __init__(self):
        self._tables: dict[tuple, tuple[torch.Tensor, ...]] = {}
        self._weights = WeightCache()

    def plan(self, graph, nodes) -> KernelPlan:
        """A _conv_dx node, or a fused node [_conv_dx, activation derivatives...]:
        inputs (dy, *residuals), outputs (the last step's value, *kept values)."""
        (node,) = nodes
        anchor = anchor_step(node)  # the _conv_dx itself, or step 0 of a fused node
        ep = epilogue_of(graph, node)
        g = _geometry(anchor)
        dtype, shape = anchor.attrs["input_type"]
        channels = int(shape[1])
        direct = g.direct(channels)
        name = safe_name("conv_dx", f"{g.rank}d", *ep.name_parts(), node.id)
        doc = (f"Input gradient of a {g.rank}-D {'separable ' if g.separable else ''}convolution, "
               f"kernel {'x'.join(map(str, g.kernel))}, stride {'x'.join(map(str, g.stride))}"
               + (f", {g.groups} groups" if g.groups > 1 else "")
               + (", connection table" if g.table is not None else "")
               + (", direct (one channel per group)" if direct else "") + ep.describe() + ".")
        source = module_source(render(TEMPLATE, kind="dx", name=name, doc=doc,
                                      dims=list(DIMS[g.rank]), direct=direct,
                                      table=g.table is not None, separable=g.separable,
                                      strided=any(s > 1 for s in g.stride), ep=ep.template()))
        meta = {"rank": g.rank, "dtype": dtype, "direct": direct, "channels": channels,
                **epilogue_meta(ep)}
        return KernelPlan(name, self.name, source, (node.id,), (anchor.inputs[0], *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs), meta=meta, direction="backward")

    @staticmethod
    def arguments(g: Geometry, direct: bool, residuals: int = 0, kept: int = 0) -> _Args:
        """Run-time arguments in kernel order; the epilogue's pointers follow dx_ptr."""
        dims = DIMS[g.rank]
        args = _Args().add("ptr:dy", "dy_ptr")
        if g.separable:
            args.add("ptr:fp32", *(f"w{i}_ptr" for i in range(g.rank)))
        else:
            args.add("ptr:w", "w_ptr")
        if g.table is not None:
            args.add("ptr:i32", "block_start_ptr", "block_chan_ptr").add("ptr:i8", "member_ptr")
        args.add("ptr:dy", "dx_ptr")
        args.add("ptr:dy", *(f"res{i}_ptr" for i in range(residuals)),
                 *(f"kept{i}_ptr" for i in range(kept)))
        args.add("i32", "batch", "c_in", "c_out", "groups", *(f"in_{d}" for d in dims),
                 *(f"out_{d}" for d in dims), *(f"rows_{d}" for d in dims),
                 *(f"pad_{d}" for d in dims), *_strides("dy", dims))
        if g.separable:
            for i in range(g.rank):
                args.add("i32", f"stride_w{i}o", f"stride_w{i}c", f"stride_w{i}k")
        else:
            args.add("i32", "stride_wo", "stride_wc", *(f"stride_w{d}" for d in dims))
        args.add("i32", *_strides("dx", dims))
        if g.table is not None:
            args.add("i32", "stride_mc", "stride_mo")
        return args

    # With a connection table the channel lists and membership masks take
    # registers; the narrower tile keeps sm_80 from spilling.
    table_tile = Tile(32, 64, 32, num_warps=4, num_stages=3)

    def tile(self, direct: bool, device: str, itemsize: int, w_itemsize: int,
             table: bool = False, rank: int = 2) -> Tile:
        if direct:
            m, n = self.DIRECT[device][0]
            return Tile(m, n, 1, num_warps=4, num_stages=1)
        if device == "cpu":
            return self.cpu_tile
        if rank == 3:
            return Tile(32, 32, 32, num_warps=4, num_stages=3)  # 3-D indices: spills otherwise
        if table:
            return self.table_tile
        return pick_tile(self.tiles, itemsize, w_itemsize)

    def candidates(self, direct: bool, device: str, itemsize: int, w_itemsize: int,
                   table: bool = False, rank: int = 2) -> list[Tile]:
        """The tile `tile` picks, then the other tiles that fit, for the autotuner."""
        first = self.tile(direct, device, itemsize, w_itemsize, table, rank)
        if direct or device == "cpu" or table or rank == 3:
            return [first]
        return list(tile_candidates(first, tuple(self.tiles), itemsize, w_itemsize))

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs: dy, then the epilogue's residuals (saved forward values).
        dy, *residuals = inputs
        (node_id,) = plan.nodes
        a, p = launch_attrs(attrs[node_id]), launch_params(params[node_id])
        g = Geometry.of(a["fattrs"])
        dy = dy.detach()
        assert len(residuals) == plan.meta["residuals"], (len(inputs), plan.meta)
        if dy.dtype not in TORCH_DTYPE.values():
            raise TypeError(f"the triton conv gradient takes f32/f16/bf16, got {dy.dtype}")
        shape = tuple(int(s) for s in a["input_type"][1])
        batch, channels, sizes = shape[0], shape[1], shape[2:]
        dims = DIMS[g.rank]
        direct = plan.meta["direct"]
        device = target(dy)

        # Allocate the output: the forward input's shape, dy's dtype; with an
        # epilogue, a residual's layout, which the residuals and kept values share.
        dx, residuals, kept = epilogue_outputs(residuals, shape, dy.dtype, dy.device,
                                               torch.contiguous_format, plan.meta["kept"])

        groups = 1 if g.table is not None else g.groups
        c_in, c_out = channels // groups, g.out // groups
        values = {"dy_ptr": dy, "dx_ptr": dx, "batch": batch, "c_in": c_in, "c_out": c_out,
                  "groups": groups}
        values.update({f"res{i}_ptr": r for i, r in enumerate(residuals)})
        values.update({f"kept{i}_ptr": k for i, k in enumerate(kept)})
        if g.separable:
            factors = [p[f"weight_{i}"].detach() for i in range(g.rank)]
            values.update({f"w{i}_ptr": f for i, f in enumerate(factors)})
            for i, f in enumerate(factors):
                values.update(zip((f"stride_w{i}o", f"stride_w{i}c", f"stride_w{i}k"), f.stride()))
            w_itemsize = 4
        else:
            weight = p["weight"].detach()
            if self.pack_weights[device] and not direct:
                weight = self._weights.get(weight, dy.dtype, lambda w: _pack_dx(w, dy.dtype))
            values["w_ptr"] = weight
            values.update(zip(["stride_wo", "stride_wc"] + [f"stride_w{d}" for d in dims],
                              weight.stride()))
            w_itemsize = weight.element_size()
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tiles = self.candidates(direct, device, dy.element_size(), w_itemsize,
                                    g.table is not None, g.rank)
            if not direct and g.table is None and device == "gpu":
                # each shrunk to one group's GEMM: input positions x c_in over c_out
                positions = batch * math.prod(cdiv(m, s) for m, s in zip(sizes, g.stride))
                tiles = list(fit_tiles(tuple(tiles), (positions, c_in, c_out)))
            tile = autotune.choose(plan, tiles, (dy, *residuals), relaunch, extra=g)
        if g.table is not None:
            blocks = self._table_blocks(g.table, channels, tile.BLOCK_N, dy.device)
            values.update(zip(("block_start_ptr", "block_chan_ptr", "member_ptr"), blocks))
            values["stride_mc"], values["stride_mo"] = blocks[2].stride()
        rows = [cdiv(m, s) for m, s in zip(sizes, g.stride)]
        values.update(zip((f"in_{d}" for d in dims), sizes))
        values.update(zip((f"out_{d}" for d in dims), dy.shape[2:]))
        values.update(zip((f"rows_{d}" for d in dims), rows))
        values.update(zip((f"pad_{d}" for d in dims), _pads(a["fattrs"], sizes)))
        values.update(zip(_strides("dy", dims), dy.stride()))
        values.update(zip(_strides("dx", dims), dx.stride()))

        # Grid: positions of a residue class × channel blocks × (groups ×) classes.
        classes = math.prod(g.stride)
        m_total = batch * math.prod(rows)
        if direct:
            grid = (cdiv(m_total, tile.BLOCK_M), cdiv(groups, tile.BLOCK_N), classes)
        else:
            grid = (cdiv(m_total, tile.BLOCK_M), cdiv(c_in, tile.BLOCK_N),
                    groups * classes)

        # Launch.
        options = tile.launch_options() if device == "gpu" else {}
        kernel[grid](*self.arguments(g, direct, len(residuals), len(kept)).values(values),
                     **self.constexprs(g, tile, dy.dtype, dot_in_fp32(dy),
                                       needs_int64(dy, dx, values.get("w_ptr", dy))),
                     **options)
        return [dx, *kept]

    @staticmethod
    def constexprs(g: Geometry, tile: Tile, dtype: torch.dtype, dot_fp32: bool,
                   index_64: bool) -> dict:
        return {**g.constexprs(), "BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N,
                "BLOCK_K": tile.BLOCK_K,
                "INPUT_PRECISION": input_precision(dtype, torch.backends.cudnn.allow_tf32),
                "DOT_FP32": dot_fp32, "INDEX_64": index_64}

    def _table_blocks(self, table, channels, block_n, device):
        key = (table, channels, block_n, str(device))
        if key not in self._tables:
            self._tables[key] = table_blocks(_transpose(table, channels), len(table), block_n,
                                             device)
        return self._tables[key]

    def aot(self, plan, graph):
        node = graph.node(plan.nodes[0])
        g = _geometry(anchor_step(node))
        dtype, direct = plan.meta["dtype"], plan.meta["direct"]
        w_itemsize = ITEMSIZE[dtype] if self.pack_weights["gpu"] else 4
        tile = self.tile(direct, "gpu", ITEMSIZE[dtype], w_itemsize, g.table is not None, g.rank)
        constexprs = self.constexprs(g, tile, TORCH_DTYPE[dtype], False, False)
        ep = epilogue_of(graph, node)
        args = self.arguments(g, direct, len(ep.residuals), len(ep.kept))
        sig = args.signature(dtype, constexprs)  # the epilogue's pointers: epilogue_signature
        if g.separable or direct or not self.pack_weights["gpu"]:
            sig.update({n: "*fp32" for n, k in args.items if k == "ptr:w"})
        return sig, constexprs, tile.launch_options()

    def aot_extra(self, plan, graph) -> list[tuple[str, dict, dict]]:
        return []  # one kernel per plan

    def cost(self, plan, graph, env):
        """A tl.dot FLOP count of the useful work: 2 per (dy element, tap, input
        channel it reaches) — the residue classes skip the taps a stride misses —
        plus one per dx element for each epilogue step. Bytes: dy read, dx
        written, the weights, and the epilogue's residuals (read) and kept values
        (written)."""
        node = graph.node(plan.nodes[0])
        g = _geometry(anchor_step(node))
        ep = epilogue_of(graph, node)
        dy = graph.type_of(node.inputs[0])
        dx = node.types[0]
        positions = numel(dy, env) // g.out  # N · output positions
        if g.table is not None:
            weights = table_connections(g.table) * g.taps
        else:
            weights = g.out * (plan.meta["channels"] // g.groups) * g.taps
        n_dx = numel(dx, env)
        flops = 2 * positions * weights + n_dx * epilogue_flops(ep)
        w_bytes = 4 * _weight_numel(g, plan.meta["channels"])
        return flops, ((numel(dy, env) + n_dx) * ITEMSIZE[dx.dtype] + w_bytes
                       + epilogue_bytes(ep, n_dx, ITEMSIZE[dx.dtype]))


def _pack_dx(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[out, in, *k] stored as [*k, out, in] (in contiguous), viewed back as [out, in, *k]."""
    rank = weight.dim() - 2
    order = tuple(range(2, 2 + rank)) + (0, 1)
    packed = weight.to(dtype).permute(order).contiguous()
    return packed.permute([order.index(axis) for axis in range(weight.dim())])


# -- the kernel gradient g ------------------------------------------------------------------

class ConvDw(Family):
    """dW (eq. 9.11): one fp32 gradient per weight role, in attrs["roles"] order."""

    name = "conv_dw"
    tiles = (Tile(64, 64, 32, num_warps=4, num_stages=3),
             Tile(128, 64, 32, num_warps=8, num_stages=3))  # a candidate for the autotuner
    cpu_tile = Tile(32, 64, 64, num_warps=1, num_stages=1)
    # Direct (depthwise) kernel: ((out, tap) rows, reduction) per program.
    DIRECT = {"gpu": [(32, 32)], "cpu": [(64, 256)]}
    # Split-K: programs to aim for, and the fewest reduction steps per split.
    SPLIT = {"gpu": {"programs": GPU_PROGRAMS, "min_steps": 8},
             "cpu": {"programs": 1, "min_steps": 1}}
    FACTOR_BLOCK = {"gpu": 64, "cpu": 256}  # rows per program of the factors kernel, at most
    # A factors program holds a [BLOCK_R, TAPS_P2] fp32 tile: on a GPU at most
    # 4096 values (11x11 kernels at 64 rows spilled 144 bytes as launched).
    FACTOR_TILE = 4096

    def factor_block(self, device: str, g: Geometry) -> int:
        block = self.FACTOR_BLOCK[device]
        if device == "gpu":
            block = min(block, max(16, self.FACTOR_TILE // next_power_of_2(g.taps)))
        return block

    def __init__(self):
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        g = _geometry(node)
        x = graph.type_of(node.inputs[1])
        channels = int(x.channels)
        direct = g.direct(channels)
        name = safe_name("conv_dw", f"{g.rank}d", node.id)
        doc = (f"Kernel gradient of a {g.rank}-D {'separable ' if g.separable else ''}convolution, "
               f"kernel {'x'.join(map(str, g.kernel))}"
               + (f", {g.groups} groups" if g.groups > 1 else "")
               + (", connection table" if g.table is not None else "")
               + (", direct (one channel per group)" if direct else "") + ".")
        kernels = [render(TEMPLATE, kind="dw", name=name, doc=doc, dims=list(DIMS[g.rank]),
                          direct=direct, table=g.table is not None)]
        meta = {"rank": g.rank, "dtype": x.dtype, "direct": direct, "channels": channels}
        if g.separable:
            meta["factors"] = f"{name}_factors"
            doc = "Gradients of the separable factors, from the full kernel gradient."
            kernels.append(render(TEMPLATE, kind="factors", name=meta["factors"],
                                  factors=g.rank, doc=doc))
        else:
            meta["sum"] = f"{name}_sum"
            kernels.append(_sum_kernel(meta["sum"], "the kernel gradient"))
        outputs = tuple(ValueRef(node.id, i) for i in range(len(node.types)))
        return KernelPlan(name, self.name, module_source(*kernels), (node.id,),
                          tuple(node.inputs), outputs, meta=meta, direction="backward")

    @staticmethod
    def arguments(g: Geometry) -> _Args:
        dims = DIMS[g.rank]
        args = _Args().add("ptr:dy", "dy_ptr", "x_ptr")
        if g.table is not None:
            args.add("ptr:i32", "active_ptr").add("ptr:i8", "member_ptr")
        args.add("ptr:fp32", "part_ptr")
        args.add("i32", "batch", "c_in", "c_out", "groups", *(f"in_{d}" for d in dims),
                 *(f"out_{d}" for d in dims), *(f"pad_{d}" for d in dims), "k_per_split",
                 *_strides("dy", dims), *_strides("x", dims))
        if g.table is not None:
            args.add("i32", "stride_mo", "stride_mc")
        return args.add("i32", "stride_ps")

    # 3-D gathers keep three sets of position indices live; the narrower tile
    # keeps sm_90 from spilling.
    tile_3d = Tile(32, 32, 32, num_warps=4, num_stages=3)

    def tile(self, direct: bool, device: str, itemsize: int, rank: int = 2) -> Tile:
        if direct:
            m, k = self.DIRECT[device][0]
            return Tile(m, 1, k, num_warps=4, num_stages=1)
        if device == "cpu":
            return self.cpu_tile
        if rank == 3:
            return self.tile_3d
        return pick_tile(self.tiles, itemsize, itemsize)

    def candidates(self, direct: bool, device: str, itemsize: int, rank: int = 2) -> list[Tile]:
        """The tile `tile` picks, then the other tiles that fit, for the autotuner."""
        first = self.tile(direct, device, itemsize, rank)
        if direct or device == "cpu" or rank == 3:
            return [first]
        return list(tile_candidates(first, tuple(self.tiles), itemsize, itemsize))

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # Check inputs.
        dy, x = (t.detach() for t in inputs)
        (node_id,) = plan.nodes
        a, p = attrs[node_id], params[node_id]
        g = Geometry.of(a["fattrs"])
        dims = DIMS[g.rank]
        direct = plan.meta["direct"]
        device = target(dy)
        batch, channels, sizes = x.shape[0], x.shape[1], tuple(x.shape[2:])
        groups = 1 if g.table is not None else g.groups
        c_in, c_out = channels // groups, g.out // groups
        tile = config
        if tile is None:  # tuned on first use on a GPU: timing relaunches each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            tiles = self.candidates(direct, device, dy.element_size(), g.rank)
            tile = autotune.choose(plan, tiles, (dy, x), relaunch, extra=g)

        # Grid and split: tiles of dW × splits of K (× groups).
        k_total = batch * math.prod(dy.shape[2:])
        if direct:
            tiles, grid_z = cdiv(g.out * g.taps, tile.BLOCK_M), 1
        else:
            tiles = cdiv(c_out, tile.BLOCK_M) * cdiv(c_in * g.taps, tile.BLOCK_N)
            grid_z = groups
        splits, k_per_split = _splits(tiles * grid_z, k_total, tile.BLOCK_K, self.SPLIT[device])

        # Allocate: fp32 partial sums (the result itself when one split needs no
        # second pass), then each role's gradient.
        full = (g.out, c_in) + g.kernel  # dW of the full (multiplied-out) kernel
        one_pass = splits == 1 and not g.separable
        part = torch.empty(((1,) if one_pass else (splits,)) + full, device=dy.device,
                           dtype=torch.float32)
        values = {"dy_ptr": dy, "x_ptr": x, "part_ptr": part, "batch": batch, "c_in": c_in,
                  "c_out": c_out, "groups": groups, "k_per_split": k_per_split,
                  "stride_ps": part.stride(0)}
        if g.table is not None:
            values["active_ptr"], values["member_ptr"] = self._table_tiles(
                g.table, channels, g.taps, tile, dy.device)
            values["stride_mo"], values["stride_mc"] = values["member_ptr"].stride()
        values.update(zip((f"in_{d}" for d in dims), sizes))
        values.update(zip((f"out_{d}" for d in dims), dy.shape[2:]))
        values.update(zip((f"pad_{d}" for d in dims), _pads(a["fattrs"], sizes)))
        values.update(zip(_strides("dy", dims), dy.stride()))
        values.update(zip(_strides("x", dims), x.stride()))

        # Launch the GEMM, then the second pass.
        options = tile.launch_options() if device == "gpu" else {}
        kernel[(tiles, splits, grid_z)](
            *self.arguments(g).values(values),
            **self.constexprs(g, tile, dy.dtype, dot_in_fp32(dy), needs_int64(dy, x, part)),
            **options)
        if one_pass:
            return [part[0]]
        if not g.separable:
            dw = torch.empty(full, device=dy.device, dtype=torch.float32)
            _run_sum(plan, part, dw, splits)
            return [dw]
        return self._factor_grads(plan, part, p, g, splits, a["roles"])

    def _factor_grads(self, plan, part, params, g: Geometry, splits: int, roles) -> list:
        factors = [params[f"weight_{d}"].detach().float().contiguous() for d in range(g.rank)]
        rows = factors[0].shape[0] * factors[0].shape[1]
        grads = [torch.empty(f.shape, device=part.device, dtype=torch.float32) for f in factors]
        block = self.factor_block(target(part), g)
        kernel = load_kernel(plan.source, plan.meta["factors"])
        kernel[(cdiv(rows, block),)](
            part, *factors, *grads, rows, splits,
            **self.factor_constexprs(g, block, needs_int64(part)))
        by_role = {f"weight_{d}": grad for d, grad in enumerate(grads)}
        return [by_role[r] for r in roles]

    @staticmethod
    def factor_constexprs(g: Geometry, block: int, index_64: bool) -> dict:
        return {**{f"K{d}": k for d, k in enumerate(g.kernel)},
                "TAPS_P2": next_power_of_2(g.taps), "BLOCK_R": block,
                "INDEX_64": index_64}

    @staticmethod
    def constexprs(g: Geometry, tile: Tile, dtype: torch.dtype, dot_fp32: bool,
                   index_64: bool) -> dict:
        return {**g.constexprs(), "BLOCK_M": tile.BLOCK_M, "BLOCK_N": tile.BLOCK_N,
                "BLOCK_K": tile.BLOCK_K,
                "INPUT_PRECISION": input_precision(dtype, torch.backends.cudnn.allow_tf32),
                "DOT_FP32": dot_fp32, "INDEX_64": index_64}

    def _table_tiles(self, table, channels, taps, tile, device):
        """(active [tiles] int32, member [out, in] int8): a tile of dW is active
        when one of its (o, c) pairs is a connection of the table."""
        key = (table, channels, taps, tile.BLOCK_M, tile.BLOCK_N, str(device))
        if key not in self._tables:
            member = torch.zeros(len(table), channels, dtype=torch.int8)
            for o, row in enumerate(table):
                member[o, list(row)] = 1
            tiles_n = cdiv(channels * taps, tile.BLOCK_N)
            cols = member.repeat_interleave(taps, dim=1)  # [out, in * taps]
            cols = torch.nn.functional.pad(cols, (0, tiles_n * tile.BLOCK_N - cols.shape[1]))
            rows = cdiv(len(table), tile.BLOCK_M) * tile.BLOCK_M
            cols = torch.nn.functional.pad(cols, (0, 0, 0, rows - len(table)))
            active = cols.reshape(rows // tile.BLOCK_M, tile.BLOCK_M, tiles_n, tile.BLOCK_N)
            active = active.amax(dim=(1, 3)).reshape(-1).to(torch.int32)
            self._tables[key] = (active.to(device), member.to(device))
        return self._tables[key]

    def aot(self, plan, graph):
        node = graph.node(plan.nodes[0])
        g = _geometry(node)
        dtype = plan.meta["dtype"]
        tile = self.tile(plan.meta["direct"], "gpu", ITEMSIZE[dtype], g.rank)
        constexprs = self.constexprs(g, tile, TORCH_DTYPE[dtype], False, False)
        return self.arguments(g).signature(dtype, constexprs), constexprs, tile.launch_options()

    def aot_extra(self, plan, graph) -> list[tuple[str, dict, dict]]:
        """The second kernel of the plan's module: (name, signature, constexprs)."""
        if "sum" in plan.meta:
            return [(plan.meta["sum"], *_sum_aot())]
        g = _geometry(graph.node(plan.nodes[0]))
        constexprs = self.factor_constexprs(g, self.factor_block("gpu", g), False)
        sig = {"part_ptr": "*fp32", **{f"f{d}_ptr": "*fp32" for d in range(g.rank)},
               **{f"g{d}_ptr": "*fp32" for d in range(g.rank)}, "rows": "i32", "splits": "i32"}
        sig.update({k: "constexpr" for k in constexprs})
        return [(plan.meta["factors"], sig, constexprs)]

    def cost(self, plan, graph, env):
        """2 FLOPs per (dy element, input channel it reads, tap); a table counts
        only its connections. Bytes: dy and x read once, dW written once."""
        node = graph.node(plan.nodes[0])
        g = _geometry(node)
        dy, x = (graph.type_of(r) for r in node.inputs)
        positions = numel(dy, env) // g.out
        if g.table is not None:
            weights = table_connections(g.table) * g.taps
        else:
            weights = g.out * (plan.meta["channels"] // g.groups) * g.taps
        flops = 2 * positions * weights
        grads = 4 * sum(math.prod(int(v) for v in shape) for shape in node.attrs["param_shapes"])
        return flops, (numel(dy, env) + numel(x, env)) * ITEMSIZE[x.dtype] + grads


# -- the bias gradient ----------------------------------------------------------------------

class BiasGrad(Family):
    """dy summed over what a bias is shared by: channel → [out], location →
    [out, *o], tiled → [*t, out]; fp32."""

    name = "bias_grad"
    # (BLOCK_R, BLOCK_K) per mode: channel and tiled reduce long rows of
    # positions, location reduces over the batch only.
    CONFIGS = {
        "gpu": [{"channel": (16, 128), "location": (128, 8), "tiled": (16, 64)}],
        "cpu": [{"channel": (16, 1024), "location": (1024, 16), "tiled": (16, 1024)}],
    }
    SPLIT = {"gpu": {"programs": GPU_PROGRAMS, "min_steps": 4},
             "cpu": {"programs": 1, "min_steps": 1}}

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        mode = node.attrs["mode"]
        dy = graph.type_of(node.inputs[0])
        name = safe_name("bias_grad", mode, node.id)
        doc = f"Gradient of a {mode} bias, fp32."
        source = module_source(render(TEMPLATE, kind="bias", name=name, doc=doc, mode=mode),
                               _sum_kernel(f"{name}_sum", "the bias gradient"))
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0],),
                          (ValueRef(node.id, 0),),
                          meta={"mode": mode, "dtype": dy.dtype, "sum": f"{name}_sum"},
                          direction="backward")

    @staticmethod
    def arguments(mode: str) -> _Args:
        args = _Args().add("ptr:dy", "dy_ptr").add("ptr:fp32", "part_ptr")
        args.add("i32", "batch", "channels", "size_d", "size_h", "size_w")
        if mode == "tiled":
            args.add("i32", "tile_d", "tile_h", "tile_w", "rows_d", "rows_h", "rows_w")
        return args.add("i32", "k_per_split", *_strides("dy", "dhw"), "stride_ps")

    def launch(self, plan, kernel, inputs, params, attrs):
        # Check inputs.
        (dy,) = inputs
        dy = dy.detach()
        if dy.dim() == 2:  # a dense layer's [N, out]: one position per sample
            dy = dy.unsqueeze(-1)
        (node_id,) = plan.nodes
        a = attrs[node_id]
        mode = plan.meta["mode"]
        device = target(dy)
        (sd, sh, sw), strides = spatial3(dy)
        batch, channels = dy.shape[:2]
        positions = sd * sh * sw
        values = {"dy_ptr": dy, "batch": batch, "channels": channels, "size_d": sd,
                  "size_h": sh, "size_w": sw}
        values.update(zip(_strides("dy", "dhw"), strides))
        if mode == "channel":
            shape, k_total = (channels,), batch * positions
        elif mode == "location":
            shape, k_total = (channels,) + tuple(dy.shape[2:]), batch
        else:
            tiles = tuple(int(t) for t in a["tiles"])
            td, th, tw = pad3(tiles, 1)
            rows = (cdiv(sd, td), cdiv(sh, th), cdiv(sw, tw))
            values.update(zip(("tile_d", "tile_h", "tile_w"), (td, th, tw)))
            values.update(zip(("rows_d", "rows_h", "rows_w"), rows))
            shape, k_total = tiles + (channels,), batch * math.prod(rows)
        block_r, block_k = self.CONFIGS[device][0][mode]

        # Grid and split; allocate the partial sums (the result when one split).
        n_rows = math.prod(shape)
        row_programs = cdiv(n_rows, block_r)
        splits, k_per_split = _splits(row_programs, k_total, block_k, self.SPLIT[device])
        out = torch.empty(shape, device=dy.device, dtype=torch.float32)
        part = out if splits == 1 else torch.empty((splits,) + shape, device=dy.device,
                                                   dtype=torch.float32)
        values.update({"part_ptr": part, "k_per_split": k_per_split,
                       "stride_ps": n_rows})

        # Launch, then add the splits.
        kernel[(row_programs, splits)](*self.arguments(mode).values(values),
                                       BLOCK_R=block_r, BLOCK_K=block_k,
                                       INDEX_64=needs_int64(dy, part))
        if splits > 1:
            _run_sum(plan, part, out, splits)
        return [out]

    def aot(self, plan, graph):
        mode = plan.meta["mode"]
        block_r, block_k = self.CONFIGS["gpu"][0][mode]
        constexprs = {"BLOCK_R": block_r, "BLOCK_K": block_k, "INDEX_64": False}
        return self.arguments(mode).signature(plan.meta["dtype"], constexprs), constexprs

    def aot_extra(self, plan, graph) -> list[tuple[str, dict, dict]]:
        return [(plan.meta["sum"], *_sum_aot())]

    def cost(self, plan, graph, env):
        dy = graph.type_of(plan.inputs[0])
        n = numel(dy, env)
        out = math.prod(int(s) for s in graph.node(plan.nodes[0]).attrs["param_shapes"][0])
        return n, n * ITEMSIZE[dy.dtype] + 4 * out
