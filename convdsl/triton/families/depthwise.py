"""Depthwise convolution (a conv whose groups equal its input channels): a
direct kernel, one tile of an output plane per program, no tl.dot.

The module also holds the spatial helpers the other conv-variant families
(separable, local, tiled, deconv) share: every kernel of these families is
written for three spatial dims, and 1-D and 2-D tensors are passed with unit
leading dims (size 1, stride 0), so one template serves every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton

from ...ir import ValueRef
from ...ir.types import evaluate
from ...ops.spatial import resolve_pads
from ..codegen import module_source, render, safe_name
from .base import ITEMSIZE, POINTER, Family, KernelPlan, needs_int64

# -- shared spatial helpers -----------------------------------------------------------------


def pad3(values, fill: int) -> tuple[int, ...]:
    """A per-spatial-dim tuple (1 to 3 entries) as exactly three, unit dims first."""
    values = tuple(int(v) for v in values)
    return (fill,) * (3 - len(values)) + values


def spatial3(t: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """(D, H, W) sizes and the five strides (n, c, d, h, w) of an [N, C, *s] tensor."""
    rank = t.dim() - 2
    sizes = pad3(t.shape[2:], 1)
    strides = tuple(t.stride()[:2]) + pad3(t.stride()[2:], 0)
    assert 1 <= rank <= 3
    return sizes, strides


def window_sizes(sizes, kernel, stride, dilation, pads) -> tuple[int, ...]:
    """Output sizes of a windowed op: floor((m + before + after − k')/s) + 1."""
    return tuple((m + b + a - (r * (k - 1) + 1)) // s + 1
                 for m, k, s, r, (b, a) in zip(sizes, kernel, stride, dilation, pads))


def concrete_pads(attrs: dict, sizes, dilation=None) -> tuple[tuple[int, int], ...]:
    """(before, after) per dim at run time: valid/same/full resolved on real sizes."""
    pads = resolve_pads(attrs["pad"], tuple(sizes), attrs["kernel"], attrs["stride"], dilation)
    return tuple((int(b), int(a)) for b, a in pads)


def pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def numel(ttype, env) -> int:
    return math.prod(evaluate(d, env) for d in ttype.shape)


def param_numel(graph, node, role: str) -> int:
    name = node.params.get(role)
    return math.prod(graph.params[name].shape) if name is not None else 0


def dot_options(device: str, dtype: torch.dtype) -> dict:
    """How a kernel's tl.dot multiplies. fp32 operands: TF32 on a GPU when
    PyTorch's convolutions may use it (cudnn.allow_tf32), else exact. 16-bit
    operands run in fp32 under the interpreter, whose bf16 tl.dot is unreliable
    (exact: the products of 16-bit values fit fp32, and the sum is fp32 anyway)."""
    tf32 = device != "cpu" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return {"INPUT_PRECISION": "tf32" if tf32 else "ieee",
            "DOT_FP32": device == "cpu" and dtype != torch.float32}


TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def target(t: torch.Tensor) -> str:
    """Which tile table applies: the interpreter ("cpu") or a GPU."""
    return "cpu" if t.device.type == "cpu" else "gpu"


@dataclass(frozen=True)
class Arguments:
    """A kernel's run-time arguments in order, each with its AOT type, and its
    constexprs. `launch` and `aot` fill the same list, so they cannot drift."""

    runtime: tuple[tuple[str, str], ...]  # (name, "ptr:x" | "ptr:fp32" | "ptr:y" | "ptr:i32" | "i32")

    def values(self, given: dict) -> list:
        assert set(given) == {n for n, _ in self.runtime}, sorted(set(given) ^ {n for n, _ in self.runtime})
        return [given[n] for n, _ in self.runtime]

    def signature(self, dtype: str, constexprs: dict) -> dict:
        kinds = {"ptr:x": POINTER[dtype], "ptr:y": POINTER[dtype], "ptr:fp32": "*fp32",
                 "ptr:i32": "*i32", "i32": "i32"}
        signature = {n: kinds[k] for n, k in self.runtime}
        signature.update({n: "constexpr" for n in constexprs})
        return signature


STRIDES_X = ("stride_xn", "stride_xc", "stride_xd", "stride_xh", "stride_xw")
STRIDES_Y = ("stride_yn", "stride_yc", "stride_yd", "stride_yh", "stride_yw")


def ints(*names) -> tuple[tuple[str, str], ...]:
    return tuple((n, "i32") for n in names)


def bias_args(mode: str) -> tuple[tuple[str, str], ...]:
    return (("bias_ptr", "ptr:fp32"),) if mode != "none" else ()


def bias_value(params: dict, mode: str) -> dict:
    return {"bias_ptr": params["bias"].contiguous()} if mode != "none" else {}


def the_node(graph, plan):
    (node_id,) = plan.nodes
    return graph.node(node_id)


# -- depthwise ------------------------------------------------------------------------------


class Depthwise(Family):
    name = "depthwise"
    # Output tile (BLOCK_H, BLOCK_W) per spatial rank. GPU: the first entry (128
    # threads, 8 outputs each); the interpreter prefers few, large programs.
    CONFIGS = {
        "gpu": [{1: (1, 512), 2: (8, 64), 3: (8, 64)}],
        "cpu": [{1: (1, 1024), 2: (32, 64), 3: (16, 64)}],
    }

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        x = graph.type_of(node.inputs[0])
        a = node.attrs
        rank = x.rank - 2
        multiplier = a["out"] // x.channels
        name = safe_name("depthwise", node.layer or "", node.id)
        doc = (f"Depthwise {rank}-D convolution, kernel {'x'.join(map(str, a['kernel']))}, "
               f"multiplier {multiplier}, bias={a['bias']}.")
        source = module_source(render("depthwise.py.jinja", name=name, bias=a["bias"], doc=doc))
        meta = {"rank": rank, "bias": a["bias"], "multiplier": multiplier,
                "kernel": pad3(a["kernel"], 1), "stride": pad3(a["stride"], 1),
                "dilation": pad3(a["dilation"], 1), "flip": bool(a["flip"])}
        return KernelPlan(name, self.name, source, (node.id,), (node.inputs[0],),
                          (ValueRef(node.id, 0),), meta=meta)

    @staticmethod
    def arguments(meta) -> Arguments:
        bias = meta["bias"]
        return Arguments((("x_ptr", "ptr:x"), ("w_ptr", "ptr:fp32")) + bias_args(bias)
                         + (("y_ptr", "ptr:y"),)
                         + ints("C_OUT", "D", "H", "W", "OD", "OH", "OW")
                         + (ints("n_positions") if bias == "location" else ())
                         + ints("pad_d", "pad_h", "pad_w") + ints(*STRIDES_X) + ints(*STRIDES_Y))

    def constexprs(self, meta, block, index_64: bool) -> dict:
        (kd, kh, kw), (sd, sh, sw), (dd, dh, dw) = meta["kernel"], meta["stride"], meta["dilation"]
        return {"KD": kd, "KH": kh, "KW": kw, "SD": sd, "SH": sh, "SW": sw,
                "DIL_D": dd, "DIL_H": dh, "DIL_W": dw, "MULT": meta["multiplier"],
                "FLIP": meta["flip"], "BLOCK_H": block[0], "BLOCK_W": block[1],
                "INDEX_64": index_64}

    def launch(self, plan, kernel, inputs, params, attrs):
        # check inputs
        meta = plan.meta
        (x,) = inputs
        (node_id,) = plan.nodes
        a, p = attrs[node_id], params[node_id]
        rank = meta["rank"]
        assert x.dim() == rank + 2
        weight = p["weight"].contiguous()
        c_out = weight.shape[0]
        assert c_out == x.shape[1] * meta["multiplier"]
        pads = concrete_pads(a, x.shape[2:], a["dilation"])
        out_spatial = window_sizes(x.shape[2:], a["kernel"], a["stride"], a["dilation"], pads)
        # allocate the output
        y = torch.empty((x.shape[0], c_out) + out_spatial, device=x.device, dtype=x.dtype)
        (d, h, w), sx = spatial3(x)
        (od, oh, ow), sy = spatial3(y)
        bh, bw = self.CONFIGS[target(x)][0][rank]
        block = (min(bh, pow2(oh)), min(bw, pow2(ow)))
        values = {"x_ptr": x, "w_ptr": weight, "y_ptr": y, "C_OUT": c_out,
                  "D": d, "H": h, "W": w, "OD": od, "OH": oh, "OW": ow,
                  **bias_value(p, meta["bias"]),
                  **dict(zip(("pad_d", "pad_h", "pad_w"), pad3([b for b, _ in pads], 0))),
                  **dict(zip(STRIDES_X, sx)), **dict(zip(STRIDES_Y, sy))}
        if meta["bias"] == "location":
            values["n_positions"] = od * oh * ow
        # grid: one program per (n, o, od, tile_h, tile_w)
        grid = (x.shape[0] * c_out * od * triton.cdiv(oh, block[0]) * triton.cdiv(ow, block[1]),)
        kernel[grid](*self.arguments(meta).values(values),
                     **self.constexprs(meta, block, needs_int64(x, y)))
        return [y]

    def aot(self, plan, graph):
        dtype = graph.type_of(plan.inputs[0]).dtype
        meta = plan.meta
        constexprs = self.constexprs(meta, self.CONFIGS["gpu"][0][meta["rank"]], False)
        return self.arguments(meta).signature(dtype, constexprs), constexprs

    def cost(self, plan, graph, env):
        node = the_node(graph, plan)
        x, y = graph.type_of(plan.inputs[0]), graph.type_of(plan.outputs[0])
        outputs = numel(y, env)
        taps = math.prod(plan.meta["kernel"])
        flops = 2 * outputs * taps + (outputs if plan.meta["bias"] != "none" else 0)
        nbytes = ((numel(x, env) + outputs) * ITEMSIZE[x.dtype]
                  + 4 * (param_numel(graph, node, "weight") + param_numel(graph, node, "bias")))
        return flops, nbytes
