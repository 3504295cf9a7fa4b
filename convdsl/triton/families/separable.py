"""Separable convolution (conv with separable=true): one fused kernel runs the
d 1-D passes with the intermediate kept in registers (see separable.py.jinja).
Groups and connection tables (as CSR row lists) are supported.

A fused node [separable conv, elementwise steps...] (ops/fused.py) is the same
kernel with the epilogue (families/epilogue.py) applied before the one store."""
from __future__ import annotations

import functools
from typing import ClassVar

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
from .conv import epilogue_bytes, epilogue_meta, epilogue_outputs
from .epilogue import (
    anchor_step,
    epilogue_flops,
    epilogue_of,
    epilogue_signature,
    launch_attrs,
    launch_params,
)
from .spatial import (
    STRIDES_X,
    STRIDES_Y,
    Arguments,
    bias_args,
    bias_value,
    concrete_pads,
    ints,
    numel,
    pad3,
    param_numel,
    pow2,
    spatial3,
    target,
    the_node,
    window_sizes,
)

FACTORS = {1: ("ww_ptr",), 2: ("wh_ptr", "ww_ptr"), 3: ("wd_ptr", "wh_ptr", "ww_ptr")}


def rows_for(size: int, keff: int, stride: int, rows: int) -> tuple[int, int, int]:
    """(ROWS, STEP, BLOCK) along one dim: at most `rows` input rows on chip
    (a power of two, at least one window), the outputs they give, padded."""
    need = (size - 1) * stride + keff  # input rows for the whole output
    rows = max(min(rows, pow2(need)), pow2(keff))
    step = min((rows - keff) // stride + 1, size)
    return rows, step, pow2(step)


class Separable(Family):
    name = "separable"
    # (ROWS_D, ROWS_H, BLOCK_W) per spatial rank; rank 1 keeps unit D and H.
    # GPU: the first is the default, the others candidates for the autotuner.
    CONFIGS: ClassVar[dict] = {
        "gpu": [{1: (1, 1, 256), 2: (1, 16, 64), 3: (8, 8, 32)},
                {1: (1, 1, 512), 2: (1, 8, 128), 3: (4, 8, 64)},
                {1: (1, 1, 128), 2: (1, 32, 32), 3: (8, 16, 16)},
                {1: (1, 1, 1024), 2: (1, 16, 128), 3: (16, 8, 16)}],
        "cpu": [{1: (1, 1, 1024), 2: (1, 32, 64), 3: (8, 16, 32)}],
    }
    _tables: ClassVar[dict] = {}

    def plan(self, graph, nodes) -> KernelPlan:
        """A separable conv node, or a fused node [separable conv, elementwise
        steps...]: inputs (x, *residuals), outputs (the last step's value, *kept)."""
        (node,) = nodes
        anchor = anchor_step(node)
        ep = epilogue_of(graph, node)
        x = graph.type_of(node.inputs[0])
        a = anchor.attrs
        rank = x.rank - 2
        table = a["table"] is not None
        name = safe_name("separable", anchor.layer or "", *ep.name_parts(), node.id)
        channels = "connection table" if table else f"groups={a['groups']}"
        doc = (f"Separable {rank}-D convolution, kernel {'x'.join(map(str, a['kernel']))} as "
               f"{rank} fused 1-D passes, {channels}, bias={a['bias']}{ep.describe()}.")
        source = module_source(render("separable.py.jinja", name=name, rank=rank, table=table,
                                      bias=a["bias"], doc=doc, ep=ep.template()))
        meta = {"rank": rank, "bias": a["bias"], "table": table,
                "kernel": pad3(a["kernel"], 1), "stride": pad3(a["stride"], 1),
                "dilation": pad3(a["dilation"], 1), "flip": bool(a["flip"]),
                **epilogue_meta(ep), "epilogue_args": tuple(epilogue_signature(ep, "ptr:y"))}
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0], *ep.residuals),
                          (ValueRef(node.id, 0), *ep.kept_refs), meta=meta)

    @staticmethod
    def arguments(meta) -> Arguments:
        bias, table = meta["bias"], meta["table"]
        return Arguments((("x_ptr", "ptr:x"),)
                         + tuple((f, "ptr:fp32") for f in FACTORS[meta["rank"]])
                         + ((("rows_ptr", "ptr:i32"), ("cols_ptr", "ptr:i32")) if table else ())
                         + bias_args(bias) + (("y_ptr", "ptr:y"),)
                         # the epilogue's residual and kept pointers, typed like y
                         + tuple((n, "ptr:y") for n in meta.get("epilogue_args", ()))
                         + ints("C_OUT", "D", "H", "W", "OD", "OH", "OW")
                         + (ints("n_positions") if bias == "location" else ())
                         + (() if table else ints("CPG", "OPG")) + ints("CW")
                         + ints("pad_d", "pad_h", "pad_w") + ints(*STRIDES_X) + ints(*STRIDES_Y))

    @staticmethod
    def tiles(meta, out_sizes, config) -> dict:
        """The tile constexprs for output sizes (OD, OH, OW)."""
        (kd, kh, _), (sd, sh, _), (dd, dh, _) = meta["kernel"], meta["stride"], meta["dilation"]
        rows_d, rows_h, block_w = config
        rd, step_d, block_d = rows_for(out_sizes[0], dd * (kd - 1) + 1, sd, rows_d)
        rh, step_h, block_h = rows_for(out_sizes[1], dh * (kh - 1) + 1, sh, rows_h)
        return {"ROWS_D": rd, "STEP_D": step_d, "BLOCK_D": block_d,
                "ROWS_H": rh, "STEP_H": step_h, "BLOCK_H": block_h,
                "BLOCK_W": min(block_w, pow2(out_sizes[2]))}

    @staticmethod
    def constexprs(meta, tiles: dict, index_64: bool) -> dict:
        (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = meta["kernel"], meta["stride"], meta["dilation"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "DIL_D": dd, "DIL_H": dh, "DIL_W": dw, "FLIP": meta["flip"], **tiles,
                "INDEX_64": index_64}

    def csr(self, table, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A connection table as (row starts [out + 1], channels), cached per device."""
        key = (table, str(device))
        if key not in self._tables:
            starts, cols = [0], []
            for row in table:
                cols.extend(row)
                starts.append(len(cols))
            self._tables[key] = (torch.tensor(starts, dtype=torch.int32, device=device),
                                 torch.tensor(cols, dtype=torch.int32, device=device))
        return self._tables[key]

    def candidates(self, device: str, meta, out_sizes) -> list[dict]:
        """Tile constexprs of each config at these output sizes, repeats dropped."""
        found: list[dict] = []
        for config in self.CONFIGS[device]:
            tiles = self.tiles(meta, out_sizes, config[meta["rank"]])
            if tiles not in found:
                found.append(tiles)
        return found

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        meta = plan.meta
        rank = meta["rank"]
        x, *residuals = inputs  # then the epilogue's residual operands (if any)
        (node_id,) = plan.nodes
        a, p = launch_attrs(attrs[node_id]), launch_params(params[node_id])
        assert x.dim() == rank + 2
        factors = [p[f"weight_{d}"].contiguous() for d in range(rank)]
        c_out, cw = factors[0].shape[:2]
        pads = concrete_pads(a, x.shape[2:], a["dilation"])
        out_spatial = window_sizes(x.shape[2:], a["kernel"], a["stride"], a["dilation"], pads)
        # allocate the output (a residual's layout when there is one) and the kept values
        y, residuals, kept = epilogue_outputs(residuals, (x.shape[0], c_out) + out_spatial,
                                              x.dtype, x.device, torch.contiguous_format,
                                              meta.get("kept", 0))
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sy = spatial3(y)
        values = {"x_ptr": x, **dict(zip(FACTORS[rank], factors)), **bias_value(p, meta["bias"]),
                  "y_ptr": y, **dict(zip(meta.get("epilogue_args", ()), [*residuals, *kept])),
                  "C_OUT": c_out, "D": d, "H": h, "W": w,
                  "OD": od, "OH": oh, "OW": ow, "CW": cw,
                  **dict(zip(("pad_d", "pad_h", "pad_w"), pad3([b for b, _ in pads], 0))),
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_Y, sy))}
        if meta["table"]:
            values["rows_ptr"], values["cols_ptr"] = self.csr(a["table"], x.device)
        else:
            groups = a["groups"]
            values["CPG"], values["OPG"] = x.shape[1] // groups, c_out // groups
        if meta["bias"] == "location":
            values["n_positions"] = od * oh * ow
        tiles = config
        if tiles is None:  # tuned on first use on a GPU: timing relaunches each candidate
            # Separable.launch, not an override's: `params` already holds the factors
            relaunch = functools.partial(Separable.launch, self, plan, kernel, inputs, params,
                                         attrs)
            tiles = autotune.choose(
                plan, self.candidates(target(x), meta, (od, oh, ow)), (x, *residuals), relaunch,
                extra={"out": c_out, "kernel": meta["kernel"], "stride": meta["stride"],
                       "dilation": meta["dilation"]})
        # grid: one program per (n, o, tile_d, tile_h, tile_w)
        grid = (x.shape[0] * c_out * cdiv(od, tiles["STEP_D"])
                * cdiv(oh, tiles["STEP_H"]) * cdiv(ow, tiles["BLOCK_W"]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, tiles, needs_int64(x, y)))
        return [y, *kept]

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.inputs[0]).dtype
        meta = plan.meta
        big = pad3((4096,) * meta["rank"], 1)  # a representative large output
        tiles = self.tiles(meta, big, self.CONFIGS["gpu"][0][meta["rank"]])
        constexprs = self.constexprs(meta, tiles, False)
        return self.arguments(meta).signature(dtype, constexprs), constexprs

    def cost(self, plan, graph, env):
        """FLOPs of the 1-D passes: 2·Σ_d k_d multiply-adds per output and input
        channel read (the intermediate rows a tile recomputes are not counted),
        the bias, one per output for each epilogue step. Bytes: x, the
        factors, bias, y, and the epilogue's residuals and kept intermediates."""
        node = anchor_step(the_node(graph, plan))
        ep = epilogue_of(graph, the_node(graph, plan))
        x, y = graph.type_of(plan.inputs[0]), graph.type_of(plan.outputs[0])
        a = node.attrs
        outputs = numel(y, env)
        if a["table"] is not None:
            reads = sum(len(row) for row in a["table"]) / max(len(a["table"]), 1)
        else:
            reads = x.channels // a["groups"]
        flops = int(2 * outputs * reads * sum(a["kernel"]))
        flops += outputs if a["bias"] != "none" else 0
        flops += outputs * epilogue_flops(ep)
        weights = sum(param_numel(graph, node, f"weight_{d}") for d in range(len(a["kernel"])))
        nbytes = ((numel(x, env) + outputs) * ITEMSIZE[x.dtype]
                  + 4 * (weights + param_numel(graph, node, "bias"))
                  + epilogue_bytes(ep, outputs, ITEMSIZE[x.dtype]))
        return flops, nbytes
