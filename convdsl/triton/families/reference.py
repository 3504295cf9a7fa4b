"""Backward ops that have no generated kernel yet run their torch lowering.

This family exists so the migration to generated backward kernels is visible
and measurable: `TritonNet.reference_ops()` lists what still runs here, and
the tests assert which nets run only generated kernels."""
from __future__ import annotations

from ...ir import ValueRef
from ...ops import OPS
from .base import Family, KernelPlan


class Reference(Family):
    name = "reference"

    def plan(self, graph, nodes):
        (node,) = nodes
        outputs = tuple(ValueRef(node.id, i) for i in range(len(node.types)))
        return KernelPlan(f"reference_{node.id}", self.name, "", (node.id,), tuple(node.inputs),
                          outputs, meta={"op": node.op}, direction="backward")

    def launch(self, plan, kernel, inputs, params, attrs):
        ((node_id, node_attrs),) = attrs.items()
        result = OPS[plan.meta["op"]].torch(inputs, node_attrs, params.get(node_id, {}))
        return list(result) if isinstance(result, (list, tuple)) else [result]

    def cost(self, plan, graph, env):
        return 0, 0
