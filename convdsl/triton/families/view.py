"""Ops that need no kernel: flatten and split are views of their operand, and
so are the gradients of flatten and concat; a zero gradient is an allocation."""
from __future__ import annotations

from ...ir import ValueRef
from .base import Family, KernelPlan


class View(Family):
    name = "view"

    def plan(self, graph, nodes):
        (node,) = nodes
        outputs = tuple(ValueRef(node.id, i) for i in range(len(node.types)))
        return KernelPlan(f"view_{node.id}", self.name, "", (node.id,), tuple(node.inputs), outputs,
                          meta={"op": node.op})

    def launch(self, plan, kernel, inputs, params, attrs):
        x = inputs[0]
        op = plan.meta["op"]
        (node_attrs,) = attrs.values()
        if op == "flatten":
            return [x.reshape(x.shape[0], -1)]  # a view when x is contiguous
        if op == "split":
            return list(x.split(list(node_attrs["sizes"]), dim=1))  # views, no copies
        shape = tuple(int(s) for s in node_attrs.get("input_type", (None, ()))[1])
        if op == "_reshape":  # the gradient of flatten
            return [x.reshape(shape)]
        if op == "_narrow":  # the gradient of concat: each operand's part of dy
            return [x.narrow(node_attrs["axis"], node_attrs["start"], node_attrs["length"])]
        if op == "_zeros":  # the gradient of a split result nothing reads
            return [x.new_zeros(shape)]
        raise AssertionError(f"view family cannot run {op}")

    def cost(self, plan, graph, env):
        return 0, 0
