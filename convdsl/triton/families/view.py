"""Ops that need no kernel: flatten and split are views of their operand."""
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
        if plan.meta["op"] == "flatten":
            return [x.reshape(x.shape[0], -1)]  # a view when x is contiguous
        (node_attrs,) = attrs.values()
        return list(x.split(list(node_attrs["sizes"]), dim=1))  # views, no copies

    def cost(self, plan, graph, env):
        return 0, 0
