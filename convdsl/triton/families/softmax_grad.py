"""Input gradients of softmax and log_softmax along one axis (`_softmax_dx`,
`_log_softmax_dx`), from dy and the forward OUTPUT y:

    softmax:      dx = y · (dy − Σ dy·y)
    log_softmax:  dx = dy − exp(y) · Σ dy

one program per block of rows, in fp32, laid out as the forward kernel
(softmax.py): an axis that fits a block is read once and kept in registers; a
longer one takes two passes (the row sums, then dx chunk by chunk)."""
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
)
from .pool import numel
from .softmax import axis_inner, blocks

# Block configs, best first (the GPU tunes among its list on first use,
# autotune.py; the first is the default and what aot compiles).
# TILE: elements per program; MAX_BLOCK_L: the longest axis done in one pass;
# CHUNK: the block along a longer axis. Two operands are live per element, so
# the GPU tiles are half the forward's.
CONFIGS = {
    "gpu": [{"TILE": 1024, "MAX_BLOCK_L": 4096, "CHUNK": 1024, "num_warps": 4},
            {"TILE": 2048, "MAX_BLOCK_L": 8192, "CHUNK": 2048, "num_warps": 8}],
    "cpu": [{"TILE": 16384, "MAX_BLOCK_L": 16384, "CHUNK": 4096, "num_warps": 4}],
}
_FLOPS_PER_ELEMENT = 4  # multiply and sum; subtract and multiply (or exp)


class SoftmaxDx(Family):
    name = "softmax_dx"

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        rank = graph.type_of(node.inputs[0]).rank
        axis = int(node.attrs["fattrs"]["axis"])
        log = node.op == "_log_softmax_dx"
        name = safe_name(node.op, node.id)
        others = [i for i in range(rank) if i != axis]
        source = module_source(render("softmax_grad.py.jinja", name=name, log=log, rank=rank,
                                      axis=axis, others=others))
        return KernelPlan(name, self.name, source, (node.id,), tuple(node.inputs),
                          (ValueRef(node.id, 0),), meta={"rank": rank, "axis": axis, "log": log},
                          direction="backward")

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        dy, y = inputs
        axis = plan.meta["axis"]
        assert dy.shape == y.shape and dy.dim() == plan.meta["rank"], (dy.shape, y.shape)
        # allocate dx in dy's dtype (empty_like keeps a dense dy's strides)
        dx = torch.empty_like(dy)
        if dx.numel() == 0:
            return [dx]
        # grid and launch; the config is tuned on first use on a GPU
        if config is None:  # timing relaunches this with each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, CONFIGS, (dy, y), relaunch, extra=axis)
        n_rows = dx.numel() // dx.shape[axis]
        meta = blocks(config, dx.shape[axis], n_rows)
        inner = axis_inner(dx, axis)
        grid = (cdiv(n_rows, meta["ROWS"]),)
        kernel[grid](dy, y, dx, n_rows, *dx.shape, *dy.stride(), *y.stride(), *dx.stride(),
                     **meta, AXIS_INNER=inner, RED=1 if inner else 0,
                     INDEX_64=needs_int64(dy, y, dx), num_warps=config["num_warps"])
        return [dx]

    def aot(self, plan, graph):
        rank, axis = plan.meta["rank"], plan.meta["axis"]
        dy_type = graph.type_of(plan.inputs[0])
        names = (["n_rows"] + [f"size_{i}" for i in range(rank)]
                 + [f"stride_{t}{i}" for t in ("dy", "y", "dx") for i in range(rank)])
        signature = {"dy_ptr": POINTER[dy_type.dtype],
                     "y_ptr": POINTER[graph.type_of(plan.inputs[1]).dtype],
                     "dx_ptr": POINTER[dy_type.dtype], **{k: "i32" for k in names}}
        config = CONFIGS["gpu"][0]
        length = static_value(dy_type.shape[axis])
        if length is not None:
            meta = blocks(config, length, 1 << 20)
        else:  # an unknown length: the two-pass form serves any
            meta = {"BLOCK_L": config["CHUNK"], "ROWS": max(1, config["TILE"] // config["CHUNK"]),
                    "SINGLE": False}
        # Contiguous tensors: the last dim has stride 1, as the JIT specializes.
        inner = axis == rank - 1
        constexprs = {**{f"stride_{t}{rank - 1}": 1 for t in ("dy", "y", "dx")}, **meta,
                      "AXIS_INNER": inner, "RED": 1 if inner else 0, "INDEX_64": False}
        signature.update({k: "constexpr" for k in constexprs})
        return signature, constexprs, {"num_warps": config["num_warps"]}

    def cost(self, plan, graph, env):
        dy_type = graph.type_of(plan.inputs[0])
        n = numel(dy_type, env)
        length = evaluate(dy_type.shape[plan.meta["axis"]], env)
        single = blocks(CONFIGS["gpu"][0], length, 1)["SINGLE"]
        # read dy and y, write dx; a long axis reads both twice
        return n * _FLOPS_PER_ELEMENT, n * (3 if single else 5) * ITEMSIZE[dy_type.dtype]
