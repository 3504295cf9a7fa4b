"""concat: each operand copied into its slice of the output along the axis,
one launch per operand of one strided-copy kernel. The host merges dims that
are contiguous in both the operand and the output slice, so a contiguous
channel concat is a copy of [N, C_i * H * W] rows."""
from __future__ import annotations

import functools

import torch

from ...ir import ValueRef
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

# Block configs, best first (the GPU tunes among its list on first use,
# autotune.py; the first is the default and what aot compiles).
CONFIGS = {
    "gpu": [{"BLOCK": 1024, "num_warps": 4}, {"BLOCK": 2048, "num_warps": 8}],
    "cpu": [{"BLOCK": 16384, "num_warps": 4}],
}


def merge_dims(shape, x_strides, out_strides) -> list[tuple[int, int, int]]:
    """(size, x stride, out stride) per dim, outermost first, with size-1 dims
    dropped and neighbours merged where both tensors step through them as one."""
    dims: list[tuple[int, int, int]] = []
    for size, sx, so in zip(reversed(shape), reversed(x_strides), reversed(out_strides)):
        if size == 1:
            continue
        if dims:
            inner, ix, io = dims[-1]
            if sx == inner * ix and so == inner * io:
                dims[-1] = (size * inner, ix, io)
                continue
        dims.append((size, sx, so))
    return list(reversed(dims))


class Concat(Family):
    name = "concat"

    def plan(self, graph, nodes) -> KernelPlan:
        (node,) = nodes
        rank = graph.type_of(node.inputs[0]).rank
        name = safe_name("concat", node.id)
        source = module_source(render("concat.py.jinja", name=name, rank=rank))
        return KernelPlan(name, self.name, source, (node.id,), tuple(node.inputs),
                          (ValueRef(node.id, 0),),
                          meta={"rank": rank, "axis": int(node.attrs["axis"]),
                                "operands": len(node.inputs)})

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        # check inputs
        (a,) = attrs.values()
        axis, rank = int(a["axis"]), plan.meta["rank"]
        first = inputs[0]
        assert all(x.dim() == rank and x.dtype == first.dtype for x in inputs), plan.meta
        # allocate the output
        shape = list(first.shape)
        shape[axis] = sum(x.shape[axis] for x in inputs)
        out = torch.empty(shape, dtype=first.dtype, device=first.device)
        # the config is tuned on first use on a GPU, for all operands at once
        if config is None:  # timing relaunches this with each candidate
            relaunch = functools.partial(self.launch, plan, kernel, inputs, params, attrs)
            config = autotune.choose(plan, CONFIGS, inputs, relaunch, extra=axis)
        index_64 = needs_int64(out, *inputs)
        # one launch per operand, into its slice of the output
        offset = 0
        for x in inputs:
            part = out.narrow(axis, offset, x.shape[axis])
            offset += x.shape[axis]
            if x.numel() == 0:
                continue
            dims = merge_dims(x.shape, x.stride(), part.stride()) or [(1, 0, 0)]
            dims = [(1, 0, 0)] * (rank - len(dims)) + dims
            sizes, x_strides, out_strides = zip(*dims)
            grid = (cdiv(x.numel(), config["BLOCK"]),)
            kernel[grid](x, part, x.numel(), *sizes, *x_strides, *out_strides,
                         INDEX_64=index_64, **config)
        return [out]

    def aot(self, plan, graph):
        rank = plan.meta["rank"]
        pointer = POINTER[graph.type_of(plan.inputs[0]).dtype]
        names = (["n_elements"] + [f"size_{i}" for i in range(rank)]
                 + [f"stride_x{i}" for i in range(rank)] + [f"stride_o{i}" for i in range(rank)])
        signature = {"x_ptr": pointer, "out_ptr": pointer, **{k: "i32" for k in names}}
        # Contiguous operands: the innermost strides are 1, as the JIT specializes.
        constexprs = {f"stride_x{rank - 1}": 1, f"stride_o{rank - 1}": 1,
                      "BLOCK": CONFIGS["gpu"][0]["BLOCK"], "INDEX_64": False}
        signature.update({k: "constexpr" for k in constexprs})
        return signature, constexprs

    def cost(self, plan, graph, env):
        out = graph.type_of(plan.outputs[0])
        return 0, 2 * numel(out, env) * ITEMSIZE[out.dtype]
