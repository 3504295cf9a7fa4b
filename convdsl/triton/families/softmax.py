"""softmax and log_softmax along one axis: one program per block of rows (all
the other axes), max-subtracted and in fp32. An axis that fits a block is read
once and kept in registers; a longer one takes two passes (an online max and
sum, then the normalised values)."""
from __future__ import annotations

import functools

import torch

from ...ir import ValueRef
from ...ir.types import evaluate, static_value
from .. import autotune
from ..codegen import module_source, render, safe_name
from .base import (
    ITEMSIZE,
    POINTER,
    Family,
    KernelPlan,
    cdiv,
    needs_int64,
    next_power_of_2,
)
from .pool import numel

# Block configs, best first (the GPU tunes among its list on first use,
# autotune.py; the first is the default and what aot compiles).
# TILE: elements per program; MAX_BLOCK_L: the longest axis done in one pass;
# CHUNK: the block along a longer axis.
CONFIGS = {
    "gpu": [{"TILE": 2048, "MAX_BLOCK_L": 4096, "CHUNK": 2048, "num_warps": 4},
            {"TILE": 4096, "MAX_BLOCK_L": 8192, "CHUNK": 4096, "num_warps": 8}],
    "cpu": [{"TILE": 16384, "MAX_BLOCK_L": 16384, "CHUNK": 4096, "num_warps": 4}],
}
_FLOPS_PER_ELEMENT = 5  # max, subtract, exp, sum, divide (or log and subtract)


def blocks(config: dict, length: int, n_rows: int) -> dict:
    """BLOCK_L, ROWS and SINGLE for an axis of `length` and `n_rows` rows."""
    block = next_power_of_2(max(length, 1))
    single = block <= config["MAX_BLOCK_L"]
    if not single:
        block = config["CHUNK"]
    rows = min(max(1, config["TILE"] // block), next_power_of_2(max(n_rows, 1)))
    return {"BLOCK_L": block, "ROWS": rows, "SINGLE": single}


def axis_inner(x: torch.Tensor, axis: int) -> bool:
    """The axis is the fastest-varying dim in memory (of those longer than 1)."""
    others = [x.stride(i) for i in range(x.dim()) if i != axis and x.shape[i] > 1]
    return not others or x.stride(axis) <= min(others)


class Softmax(Family):
    name = "softmax"

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        rank = graph.type_of(node.inputs[0]).rank
        axis = int(node.attrs["axis"])
        log = node.op == "log_softmax"
        name = safe_name(node.op, node.id)
        others = [i for i in range(rank) if i != axis]
        source = module_source(render("softmax.py.jinja", name=name, log=log, rank=rank, axis=axis,
                                      others=others))
        return KernelPlan(name, self.name, source, (node.id,), tuple(node.inputs),
                          (ValueRef(node.id, 0),), meta={"rank": rank, "axis": axis, "log": log})

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        (x,) = inputs
        (a,) = attrs.values()
        axis = int(a["axis"])
        assert x.dim() == plan.meta["rank"] and axis == plan.meta["axis"], (x.shape, plan.meta)
        # allocate the output (empty_like keeps a dense input's strides)
        out = torch.empty_like(x)
        if x.numel() == 0:
            return [out]
        # grid and launch; the config is tuned on first use on a GPU
        if config is None:  # timing relaunches this with each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, CONFIGS, (x,), relaunch, extra=axis)
        n_rows = x.numel() // x.shape[axis]
        meta = blocks(config, x.shape[axis], n_rows)
        inner = axis_inner(x, axis)
        grid = (cdiv(n_rows, meta["ROWS"]),)
        kernel[grid](x, out, n_rows, *x.shape, *x.stride(), *out.stride(), **meta,
                     AXIS_INNER=inner, RED=1 if inner else 0, INDEX_64=needs_int64(x, out),
                     num_warps=config["num_warps"])
        return [out]

    def aot(self, plan, graph):
        rank, axis = plan.meta["rank"], plan.meta["axis"]
        x_type = graph.type_of(plan.inputs[0])
        pointer = POINTER[x_type.dtype]
        names = (["n_rows"] + [f"size_{i}" for i in range(rank)]
                 + [f"stride_x{i}" for i in range(rank)] + [f"stride_o{i}" for i in range(rank)])
        signature = {"x_ptr": pointer, "out_ptr": pointer, **{k: "i32" for k in names}}
        # A contiguous input: the last dim has stride 1, as the JIT specializes.
        config = CONFIGS["gpu"][0]
        length = static_value(x_type.shape[axis])
        if length is not None:
            meta = blocks(config, length, 1 << 20)
        else:  # an unknown length: the two-pass form serves any
            meta = {"BLOCK_L": config["CHUNK"], "ROWS": max(1, config["TILE"] // config["CHUNK"]),
                    "SINGLE": False}
        inner = axis == rank - 1
        constexprs = {f"stride_x{rank - 1}": 1, f"stride_o{rank - 1}": 1, **meta,
                      "AXIS_INNER": inner, "RED": 1 if inner else 0, "INDEX_64": False}
        signature.update({k: "constexpr" for k in constexprs})
        return signature, constexprs

    def cost(self, plan, graph, env):
        x_type = graph.type_of(plan.inputs[0])
        n = numel(x_type, env)
        length = evaluate(x_type.shape[plan.meta["axis"]], env)
        single = blocks(CONFIGS["gpu"][0], length, 1)["SINGLE"]
        # one read and one write; a long axis is read twice
        return n * _FLOPS_PER_ELEMENT, n * (2 if single else 3) * ITEMSIZE[x_type.dtype]
