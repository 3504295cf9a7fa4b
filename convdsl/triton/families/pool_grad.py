"""Input gradients of spatial pooling (`_pool_dx`) and maxout (`_maxout_dx`).

Pooling's gradient is a gather: every lane computes one element of dx and
sums over the output windows that contain that input, so no two lanes write
the same address and no atomics are needed. Along a dim, the windows holding
input i are a short contiguous run of outputs: for a window K with stride S
the at most ceil(K / S) outputs ending at floor((i + pad) / S); for adaptive
cells [floor(o·m/a), ceil((o+1)·m/a)) those from floor(i·a/m) on (at most
ceil(a/m) + 1 of them). Per window the input's share of dy is

* max  — all of it if the input is the window's argmax, recomputed from x in
  PyTorch's scan order (ties go to the first maximal input, NaNs to the last,
  an all -inf window to its first real input: F.max_pool*d's gradient);
* avg  — 1 / the number of real inputs in the window;
* lp   — sign(x)·(|x| / y)^(p−1), with the window's value y recomputed from x
  (0 for an all-zero window);
* wavg — the input's normalised Gaussian weight in that window (a product of
  per-dim weights, since the real taps of a window form a box).

A fused node [_pool_dx, activation derivative...] (ops/fused.py, made by the
fuse-backward-epilogue pass: pool_dx+relu_dx, pool_dx+tanh_dx, ...) is the
same kernel with the derivatives applied to each lane's gathered fp32 sum
before its one store (families/epilogue.py): their second operand, the saved
forward value, is a residual loaded at the lane's own input position. For max
and Lp that is usually the very tensor the windows are rescanned from; it is
simply loaded twice (the second load of one element per lane hits the cache).

Rescanning makes max pooling cost O(inputs · windows per input · taps): fine
for 2x2 or 3x3 windows, quadratic for a global or adaptive pool, whose window
is the whole input. So max pooling over large windows is *routed* (see
`routes_by_argmax`): a first kernel finds each window's argmax once, one
program lane per window scanning it chunk by chunk, and stores it as an int32
flat index into the input plane; the dx kernel is then the same gather, each
input adding the dy of the candidate windows whose stored argmax is itself.
Both passes are linear (windows · taps, and inputs · windows per input), every
dx element is still written once by one lane summing in a fixed order — the
same bytes every run, no atomics, overlapping adaptive cells included — and a
fused epilogue stays where it was, in the dx kernel. Scattering dy from the
argmax pass instead would need atomics (non-deterministic float adds) wherever
windows overlap.

Maxout's gradient works per group instead: one lane finds a group's argmax
channel (the first maximal, as torch.max's index) and writes all its dx
elements, dy at the argmax and 0 at the others.
"""
from __future__ import annotations

import functools
import math

import torch

from ...errors import ConvDSLInputError
from ...ir import ValueRef
from ...ir.types import evaluate, static_value
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
    float_literal,
    needs_int64,
    next_power_of_2,
    target,
)
from .deconv import epilogue_meta, epilogue_tensors
from .epilogue import anchor_step, launch_attrs
from .pool import (
    DIMS,
    cell_bounds,
    channels_inner,
    empty_output,
    longest_cell,
    numel,
)

# Block configs, best first. The GPU tunes among its list on first use
# (autotune.py); the first is the default and what aot compiles.
# BLOCK: inputs per program; max and lp rescan each window as a [BLOCK, TBLOCK]
# tile of taps, so for them BLOCK shrinks until the tile holds at most TILE
# values: 4 a thread at num_warps=4 keeps a 3x3 or 3x3x3 window near 70
# registers (a 2048 tile reaches 255 and spills). The interpreter runs faster
# with fewer, bigger programs.
CONFIGS = {
    "gpu": [{"BLOCK": 256, "TILE": 512, "num_warps": 4},
            {"BLOCK": 512, "TILE": 1024, "num_warps": 4},
            {"BLOCK": 1024, "TILE": 2048, "num_warps": 8}],
    "cpu": [{"BLOCK": 4096, "TILE": 1 << 17, "num_warps": 4}],
}
MAXOUT_CONFIGS = {
    "gpu": [{"BLOCK": 512, "num_warps": 4}, {"BLOCK": 1024, "num_warps": 4}],
    "cpu": [{"BLOCK": 4096, "num_warps": 4}],
}
UNROLL = 16  # a fixed loop over at most this many candidate windows unrolls
MAX_TAPS = 64  # windows of at most this many taps are one tile; longer ones go in chunks of it
# Max pooling rescans windows of at most this many taps per input (one tile, no
# second kernel or buffer); larger ones are routed through a per-window argmax.
RESCAN_TAPS = MAX_TAPS
# The argmax kernel: chunks of at most TAPS taps (a power of 2), BLOCK = TILE // chunk
# windows per program. A global pool is few windows of many taps: one window a
# program, 1024-tap chunks, 8 values a thread at num_warps=4.
ARGMAX_CONFIGS = {
    "gpu": {"TILE": 1024, "TAPS": 1024, "num_warps": 4},
    "cpu": {"TILE": 1 << 16, "TAPS": 1 << 12, "num_warps": 4},
}
NO_WINNER = 1 << 30  # the template's NONE: flat indices in an input plane stay below it

# FLOPs per (input, window) pair by kind, and per tap for the kinds that rescan a window
_WINDOW_FLOPS = {"max": 2, "avg": 2, "lp": 6, "wavg": 8}
_TAP_FLOPS = {"max": 2, "avg": 0, "lp": 2, "wavg": 0}
_ARGMAX_FLOPS = 2  # per (window, tap): compare, select the index
# The AOT specialization of adaptive cells when the input size is symbolic.
_AOT_CELL, _AOT_CELLS_PER_INPUT = 4, 2


def _dims(rank: int) -> list[str]:
    return list(DIMS[3 - rank:])


def _flat(coords: list[str], counts: list[str]) -> str:
    """The row-major flat index of `coords` over `counts` (the first count unused)."""
    expr = coords[0]
    for coord, count in zip(coords[1:], counts[1:]):
        expr = f"({expr}) * {count} + {coord}"
    return expr


def routes_by_argmax(fattrs: dict, shape) -> bool:
    """Max pooling whose windows may hold more than RESCAN_TAPS taps finds each
    window's argmax once (two kernels) instead of rescanning it per input. An
    adaptive cell's size is known only when the input's spatial sizes are."""
    if fattrs["kind"] != "max":
        return False
    if "output" not in fattrs:
        return math.prod(fattrs["window"]) > RESCAN_TAPS
    sizes = [static_value(m) for m in shape[2:]]
    if None in sizes:
        return True
    return math.prod(longest_cell(m, a) for m, a in zip(sizes, fattrs["output"])) > RESCAN_TAPS


def _unflatten(index: str, counts: list[str]) -> list[str]:
    """Per dim, its coordinate in the flat row-major `index` over `counts`."""
    exprs = []
    for i, count in enumerate(counts):
        later = counts[i + 1:]
        expr = index if not later else f"{index} // ({' * '.join(later)})"
        if i > 0:
            expr = f"{expr} % {count}"
        exprs.append(expr)
    return exprs


@functools.lru_cache(maxsize=256)
def cells_per_input(m: int, a: int) -> int:
    """The most adaptive cells (of `a` over `m` inputs) that hold one input:
    input i lies in cells floor(i·a/m) .. ceil((i+1)·a/m) − 1, a count periodic
    in i with period m / gcd(m, a); past 2^16 inputs, its bound ceil(a/m) + 1."""
    period = m // math.gcd(m, a)
    if period > 1 << 16:
        return min(a, -(-a // m) + 1)
    return max(-(-(i + 1) * a // m) - i * a // m for i in range(period))


def _wavg_params(window, sigma: float, clipped: bool) -> dict:
    """Compile-time constants of Gaussian weights over fixed windows (pool.py's forms)."""
    wscale = 1.0 / (2.0 * sigma**2 * math.log(2.0))  # exp(-d²/2σ²) = exp2(-d² · wscale)
    centre = [(k - 1) / 2 for k in window]
    half = [0.5 if k % 2 == 0 else 0.0 for k in window]
    inv_norm = [1.0 / sum(2.0 ** ((h * h - (u - c) ** 2) * wscale) for u in range(k))
                for k, c, h in zip(window, centre, half)]
    return {"WSCALE": float_literal(wscale), "CENTRE": [float_literal(c) for c in centre],
            "HALF": [float_literal(h) for h in half],
            "NEAR2": [float_literal(h * h) for h in half],
            "INV_NORM": [float_literal(v) for v in inv_norm], "clipped": clipped}


class PoolDx(Family):
    name = "pool_dx"
    fuses = True  # computes fused nodes [_pool_dx, activation derivative...]

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        anchor = anchor_step(node)  # the _pool_dx itself, or step 0 of a fused node
        epilogue = epilogue_meta(graph, node)
        ep = epilogue["ep"]
        f = anchor.attrs["fattrs"]
        kind, adaptive = f["kind"], "output" in f
        rank = len(anchor.attrs["input_type"][1]) - 2
        dims = _dims(rank)
        reads_x = kind in ("max", "lp")  # the plan's inputs include the forward input
        routed = routes_by_argmax(f, anchor.attrs["input_type"][1])
        scans = reads_x and not routed  # rescans each window it visits
        upper = [d.upper() for d in dims]
        params = {"kind": kind, "dims": dims, "adaptive": adaptive, "reads_x": scans,
                  "routed": routed, "me_flat": _flat([f"i{d}" for d in dims], upper),
                  "o_flat": _flat([f"o{d}" for d in dims], [f"O{u}" for u in upper]),
                  "n_outs": " * ".join(f"O{u}" for u in upper),
                  "cands": _unflatten("q", [f"NO_{d.upper()}" for d in dims]),
                  "n_cands": " * ".join(f"NO_{d.upper()}" for d in dims),
                  "taps": _unflatten("t", [f"K_{d.upper()}" for d in dims]),
                  "n_taps": " * ".join(f"K_{d.upper()}" for d in dims),
                  "unroll_cands": False, "one_chunk": False,
                  "p_mode": "none", "P": "2.0", "PM1": "1.0", "clipped": False,
                  "CENTRE": ["0.0"] * rank, "HALF": ["0.0"] * rank, "NEAR2": ["0.0"] * rank,
                  "INV_NORM": ["1.0"] * rank, "WSCALE": "1.0"}
        if kind == "lp":
            p = float(f["p"])
            params.update(p_mode={2.0: "two", 1.0: "one"}.get(p, "general"),
                          P=float_literal(p), PM1=float_literal(p - 1.0))
        if kind == "wavg":
            params["WSCALE"] = float_literal(1.0 / (2.0 * f["sigma"] ** 2 * math.log(2.0)))
        if not adaptive:
            window, stride = f["window"], f["stride"]
            cands = math.prod(-(-k // s) for k, s in zip(window, stride))
            params["one_chunk"] = math.prod(window) <= MAX_TAPS
            if kind == "wavg":
                pad = f["pad"]
                clipped = pad == "same" if isinstance(pad, str) else any(map(any, pad))
                params.update(_wavg_params(window, f["sigma"], clipped))
            # Unrolled, the tiles of several windows would be live at once.
            params["unroll_cands"] = cands <= UNROLL and not scans and not params["clipped"]
        name = safe_name("pool", kind, "adaptive" if adaptive else "", "dx", *ep.name_parts(),
                         node.id)
        kernels = [render("pool_grad.py.jinja", part="dx", name=name, ep=ep.template(),
                          **params)]
        if routed:
            # the argmax kernel's flat index is of a tap p, and its taps split by the cell's spans
            kernels.append(render("pool_grad.py.jinja", part="argmax", name=f"{name}_argmax",
                                  **{**params, "me_flat": _flat([f"p{d}" for d in dims], upper)},
                                  spans=_unflatten("t", [f"span_{d}" for d in dims])))
        source = module_source(*kernels)
        meta = {"kind": kind, "rank": rank, "adaptive": adaptive, "reads_x": reads_x,
                "routed": routed, "argmax": f"{name}_argmax" if routed else None,
                "clipped": params["clipped"],
                "window": tuple(f.get("window") or ()), "stride": tuple(f.get("stride") or ()),
                "output": tuple(f.get("output") or ()),
                "epilogue": {k: v for k, v in epilogue.items() if k != "ep"}}
        # inputs: dy (and x for max / lp), then the epilogue's saved forward values
        return KernelPlan(name, self.name, source, (node.id,),
                          (*anchor.inputs, *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs), meta=meta, direction="backward")

    @staticmethod
    def _constexprs(meta: dict, taps: list[int], cells: list[int]) -> dict:
        """The shape constexprs for windows of `taps` per dim held `cells` to an input."""
        dims = _dims(meta["rank"])
        found = {}
        for d, k, no in zip(dims, taps, cells):
            found[f"NO_{d.upper()}"] = no
            if not (meta["adaptive"] and meta["routed"]):  # a routed cell's taps are not read
                found[f"K_{d.upper()}"] = k
            if meta["kind"] == "wavg" and (meta["adaptive"] or meta["clipped"]):
                found[f"KP_{d.upper()}"] = next_power_of_2(k)
        if not meta["adaptive"]:
            found.update({f"S_{d.upper()}": s for d, s in zip(dims, meta["stride"])})
        if meta["reads_x"] and not meta["routed"]:
            found["TBLOCK"] = min(next_power_of_2(math.prod(taps)), MAX_TAPS)
        return found

    @staticmethod
    def _argmax_constexprs(meta: dict, taps: list[int], device: str) -> dict:
        """The argmax kernel's constexprs for windows of `taps` per dim (a fixed
        window, or the longest adaptive cell) on "gpu" or "cpu"."""
        config = ARGMAX_CONFIGS[device]
        tblock = min(next_power_of_2(math.prod(taps)), config["TAPS"])
        found = {"TBLOCK": tblock, "BLOCK": max(1, config["TILE"] // tblock)}
        if not meta["adaptive"]:
            for d, k, s in zip(_dims(meta["rank"]), meta["window"], meta["stride"]):
                found.update({f"K_{d.upper()}": k, f"S_{d.upper()}": s})
        return found

    def _argmax(self, plan, x: torch.Tensor, sizes, out_sizes, pads, taps) -> torch.Tensor:
        """Each window's argmax (routed max pooling): int32 [N, C, *out_sizes], contiguous."""
        meta = plan.meta
        if math.prod(sizes) >= NO_WINNER:
            raise ConvDSLInputError(
                f"max pooling's gradient takes input planes of fewer than 2^30 elements; "
                f"got spatial sizes {tuple(sizes)}")
        arg = torch.empty((x.shape[0], x.shape[1], *out_sizes), dtype=torch.int32,
                          device=x.device)
        if arg.numel() == 0:
            return arg
        device = target(x)
        constexprs = self._argmax_constexprs(meta, taps, device)
        window = [math.prod(taps)] if meta["adaptive"] else pads  # the loop's bound, or pads
        kernel = load_kernel(plan.source, meta["argmax"])
        kernel[(cdiv(arg.numel(), constexprs["BLOCK"]),)](
            x, arg, arg.numel(), x.shape[1], *sizes, *out_sizes, *window, *x.stride(),
            **constexprs, C_INNER=channels_inner(x), INDEX_64=needs_int64(x, arg),
            num_warps=ARGMAX_CONFIGS[device]["num_warps"])
        return arg

    @staticmethod
    def _block(config: dict, constexprs: dict) -> dict:
        """The launch config: BLOCK shrunk so a [BLOCK, taps] tile holds at most TILE
        values (the taps of max / lp windows, a dim's weights of clipped or adaptive wavg)."""
        width = max([v for k, v in constexprs.items() if k == "TBLOCK" or k.startswith("KP_")],
                    default=1)
        block = max(1, min(config["BLOCK"], config["TILE"] // width))
        return {"BLOCK": block, "num_warps": config["num_warps"]}

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        meta = plan.meta
        dy = inputs[0]
        x = inputs[1] if meta["reads_x"] else None
        residuals = inputs[2 if meta["reads_x"] else 1:]
        assert len(residuals) == meta["epilogue"]["residuals"], (len(inputs), meta)
        (a,) = attrs.values()
        a = launch_attrs(a)  # the _pool_dx step's attributes
        shape = tuple(int(s) for s in a["input_type"][1])
        sizes, out_sizes = shape[2:], tuple(dy.shape[2:])
        assert len(sizes) == meta["rank"] == dy.dim() - 2, (shape, dy.shape, meta)
        assert x is None or tuple(x.shape) == shape, (x.shape, shape)
        # windows: pads (fixed) and per dim the taps and the windows holding one input
        if meta["adaptive"]:
            pads = []
            taps = [longest_cell(m, o) for m, o in zip(sizes, meta["output"])]
            cells = [cells_per_input(m, o) for m, o in zip(sizes, meta["output"])]
        else:
            window, stride = meta["window"], meta["stride"]
            pads = [int(b) for b, _ in resolve_pads(a["fattrs"]["pad"], sizes, window, stride)]
            taps, cells = list(window), [-(-k // s) for k, s in zip(window, stride)]
        constexprs = self._constexprs(meta, taps, cells)
        # allocate dx (dy's dtype) in the layout of a residual (the saved value the
        # epilogue reads), else of x, or of dy when x is not read; kept values like dx
        c_inner = channels_inner(x if x is not None else dy)
        dx, extra = epilogue_tensors(meta["epilogue"], residuals, shape, dy.dtype, dy.device,
                                     plain=lambda: empty_output(dy, shape, c_inner))
        if residuals:
            c_inner = channels_inner(dx)  # lanes walk dx's memory order, now a residual's
        kept = [extra[f"kept{i}_ptr"] for i in range(meta["epilogue"]["kept"])]
        if dx.numel() == 0:
            return [dx, *kept]
        # grid and launch; the config is tuned on first use on a GPU
        if config is None:  # timing relaunches this with each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, CONFIGS, [dy] + ([x] if x is not None else [])
                                     + list(residuals), relaunch, extra=constexprs)
        config = self._block(config, constexprs)
        grid = (cdiv(dx.numel(), config["BLOCK"]),)
        if meta["routed"]:  # the windows' argmax replaces x
            operands = [dy, self._argmax(plan, x, sizes, out_sizes, pads, taps), dx]
            strides = [*dy.stride(), *dx.stride()]
        else:
            operands = [dy] + ([x] if x is not None else []) + [dx]
            strides = [*dy.stride(), *(x.stride() if x is not None else ()), *dx.stride()]
        kernel[grid](*operands, *extra.values(), dx.numel(), shape[1], *sizes, *out_sizes, *pads,
                     *strides, **constexprs, C_INNER=c_inner, INDEX_64=needs_int64(*operands),
                     **config)
        return [dx, *kept]

    def aot(self, plan, graph):
        meta = plan.meta
        dims = _dims(meta["rank"])
        dy_type = graph.type_of(plan.inputs[0])
        scans = meta["reads_x"] and not meta["routed"]
        tensors = ["dy"] + (["x"] if scans else []) + ["dx"]
        names = ["n_in", "C"] + [d.upper() for d in dims] + [f"O{d.upper()}" for d in dims]
        if not meta["adaptive"]:
            names += [f"pad_{d}" for d in dims]
        for t in tensors:
            names += [f"stride_{t}n", f"stride_{t}c"] + [f"stride_{t}{d}" for d in dims]
        signature = {f"{t}_ptr": POINTER[dy_type.dtype] for t in tensors}
        if scans:
            signature["x_ptr"] = POINTER[graph.type_of(plan.inputs[1]).dtype]
        if meta["routed"]:
            signature = {"dy_ptr": signature["dy_ptr"], "arg_ptr": "*i32",
                         "dx_ptr": signature["dx_ptr"]}
        # the epilogue's residual and kept pointers follow dx_ptr (epilogue_signature)
        signature.update({name: POINTER[dy_type.dtype] for name, _ in meta["epilogue"]["args"]})
        signature.update({name: "i32" for name in names})
        taps, cells = self._aot_windows(plan, graph)
        # Contiguous tensors: the innermost strides are 1, as the JIT specializes.
        constexprs = {f"stride_{t}{dims[-1]}": 1 for t in tensors}
        constexprs.update(self._constexprs(meta, taps, cells))
        config = self._block(CONFIGS["gpu"][0], constexprs)
        constexprs.update(C_INNER=False, BLOCK=config["BLOCK"], INDEX_64=False)
        signature.update({k: "constexpr" for k in constexprs})
        return signature, constexprs, {"num_warps": config["num_warps"]}

    @staticmethod
    def _aot_windows(plan, graph) -> tuple[list[int], list[int]]:
        """Per dim, the taps of the longest window and the windows holding one
        input, at the sizes AOT specializes for (known sizes, else a typical cell)."""
        meta = plan.meta
        if not meta["adaptive"]:
            return (list(meta["window"]),
                    [-(-k // s) for k, s in zip(meta["window"], meta["stride"])])
        taps, cells = [], []
        for m, a in zip(graph.type_of(plan.outputs[0]).shape[2:], meta["output"]):
            known = static_value(m)
            taps.append(longest_cell(known, a) if known else _AOT_CELL)
            cells.append(cells_per_input(known, a) if known else _AOT_CELLS_PER_INPUT)
        return taps, cells

    def aot_extra(self, plan, graph) -> list[tuple[str, dict, dict, dict]]:
        """Routed max pooling's argmax kernel; with symbolic sizes, specialized for
        cells of more taps than one chunk (a global pool's)."""
        meta = plan.meta
        if not meta["routed"]:
            return []
        dims = _dims(meta["rank"])
        names = ["n_win", "C"] + [d.upper() for d in dims] + [f"O{d.upper()}" for d in dims]
        names += ["cell_taps"] if meta["adaptive"] else [f"pad_{d}" for d in dims]
        names += ["stride_xn", "stride_xc"] + [f"stride_x{d}" for d in dims]
        taps, _ = self._aot_windows(plan, graph)
        known = all(static_value(m) for m in graph.type_of(plan.outputs[0]).shape[2:])
        if meta["adaptive"] and not known:
            taps = [ARGMAX_CONFIGS["gpu"]["TAPS"]]
        constexprs = {f"stride_x{dims[-1]}": 1,
                      **self._argmax_constexprs(meta, taps, "gpu"),
                      "C_INNER": False, "INDEX_64": False}
        signature = {"x_ptr": POINTER[graph.type_of(plan.inputs[1]).dtype], "arg_ptr": "*i32",
                     **{name: "i32" for name in names}}
        signature.update({k: "constexpr" for k in constexprs})
        return [(meta["argmax"], signature, constexprs,
                 {"num_warps": ARGMAX_CONFIGS["gpu"]["num_warps"]})]

    def cost(self, plan, graph, env):
        meta = plan.meta
        dy_type = graph.type_of(plan.inputs[0])
        dx_type = graph.type_of(plan.outputs[0])
        n_in, n_out = numel(dx_type, env), numel(dy_type, env)
        if meta["adaptive"]:
            sizes = [evaluate(d, env) for d in dx_type.shape[2:]]
            # each (input, cell) pair: the number of pairs is the cells' total volume
            planes = n_in // math.prod(sizes)
            pairs = planes * math.prod(sum(e - s for s, e in cell_bounds(m, a))
                                       for m, a in zip(sizes, meta["output"]))
            taps = math.prod(longest_cell(m, a) for m, a in zip(sizes, meta["output"]))
        else:
            pairs = n_out * math.prod(meta["window"])
            taps = math.prod(meta["window"])
        itemsize = ITEMSIZE[dy_type.dtype]
        writes = n_in * len(plan.outputs) * itemsize  # dx and any kept values
        if meta["routed"]:
            # The argmax kernel reads x once and writes an int32 per window; the dx
            # kernel checks each (input, window) pair against it, reading dy, the
            # argmax and each distinct saved value of the epilogue.
            flops = pairs * (_ARGMAX_FLOPS + _WINDOW_FLOPS["max"])
            flops += n_in * meta["epilogue"]["flops"]
            reads = (n_out + n_in * (1 + len(set(plan.inputs[2:])))) * itemsize
            return flops, reads + writes + 2 * 4 * n_out
        flops = pairs * (_WINDOW_FLOPS[meta["kind"]] + taps * _TAP_FLOPS[meta["kind"]])
        flops += n_in * meta["epilogue"]["flops"]  # the activation derivatives, per input
        # dy, and each distinct input-sized tensor (x, the epilogue's saved
        # values) once, ideally
        reads = (n_out + n_in * len(set(plan.inputs[1:]))) * itemsize
        return flops, reads + writes


class MaxoutDx(Family):
    """dy [N, G, *s] and x [N, G·pieces, *s] → dx like x: dy to each group's argmax."""

    name = "maxout_dx"

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        pieces = int(node.attrs["fattrs"]["pieces"])
        dims = _dims(len(node.attrs["input_type"][1]) - 2)
        name = safe_name("maxout", "dx", node.id)
        source = module_source(render("maxout_grad.py.jinja", name=name, dims=dims,
                                      unroll=pieces <= 16))
        return KernelPlan(name, self.name, source, (node.id,), tuple(node.inputs),
                          (ValueRef(node.id, 0),), meta={"rank": len(dims), "pieces": pieces},
                          direction="backward")

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        dy, x = inputs
        pieces = plan.meta["pieces"]
        c, sizes = x.shape[1], tuple(x.shape[2:])
        assert c == dy.shape[1] * pieces and len(sizes) == plan.meta["rank"], (x.shape, dy.shape)
        # allocate dx (dy's dtype) in x's layout
        c_inner = channels_inner(x)
        dx = empty_output(dy, tuple(x.shape), c_inner)
        if dx.numel() == 0:
            return [dx]
        # grid and launch; the config is tuned on first use on a GPU
        if config is None:  # timing relaunches this with each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, MAXOUT_CONFIGS, (dy, x), relaunch, extra=pieces)
        grid = (cdiv(dy.numel(), config["BLOCK"]),)
        kernel[grid](dy, x, dx, dy.numel(), c // pieces, *sizes, *dy.stride(), *x.stride(),
                     *dx.stride(), PIECES=pieces, C_INNER=c_inner,
                     INDEX_64=needs_int64(dy, x, dx), **config)
        return [dx]

    def aot(self, plan, graph):
        dims = _dims(plan.meta["rank"])
        dy_pointer = POINTER[graph.type_of(plan.inputs[0]).dtype]
        names = ["n_out", "G"] + [d.upper() for d in dims]
        for t in ("dy", "x", "dx"):
            names += [f"stride_{t}n", f"stride_{t}c"] + [f"stride_{t}{d}" for d in dims]
        signature = {"dy_ptr": dy_pointer, "x_ptr": POINTER[graph.type_of(plan.inputs[1]).dtype],
                     "dx_ptr": dy_pointer, **{k: "i32" for k in names}}
        inner = dims[-1] if dims else "c"
        config = MAXOUT_CONFIGS["gpu"][0]
        constexprs = {**{f"stride_{t}{inner}": 1 for t in ("dy", "x", "dx")},
                      "PIECES": plan.meta["pieces"], "C_INNER": False, "BLOCK": config["BLOCK"],
                      "INDEX_64": False}
        signature.update({k: "constexpr" for k in constexprs})
        return signature, constexprs, {"num_warps": config["num_warps"]}

    def cost(self, plan, graph, env):
        dy_type = graph.type_of(plan.inputs[0])
        n_out, n_in = numel(dy_type, env), numel(graph.type_of(plan.outputs[0]), env)
        # compare per input, select per output; read dy and x, write dx
        return 2 * n_in, (n_out + 2 * n_in) * ITEMSIZE[dy_type.dtype]
