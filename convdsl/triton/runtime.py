"""Running kernel plans. Each kernel call is one torch.autograd.Function.

Until the compiler derives backward kernels (issue 4), a kernel's backward
recomputes its nodes with the torch lowering and differentiates that — the
gradients are right, and the forward runs only generated kernels."""
from __future__ import annotations

import torch

from ..ir import Graph
from ..ops import OPS
from .families import KernelPlan, family
from .loader import load_kernel
from .lowering import lower


class _Call:
    """What one kernel invocation needs besides its tensors."""

    def __init__(self, program: "TritonProgram", plan: KernelPlan, attrs: dict, roles: list):
        self.program, self.plan, self.attrs, self.roles = program, plan, attrs, roles

    def split(self, tensors):
        n = len(self.plan.inputs)
        params: dict[int, dict] = {}
        for (node_id, role), tensor in zip(self.roles, tensors[n:]):
            params.setdefault(node_id, {})[role] = tensor
        return list(tensors[:n]), params

    def run_kernel(self, tensors):
        inputs, params = self.split(tensors)
        kernel = self.program.kernel(self.plan)
        return family(self.plan.family).launch(self.plan, kernel, inputs, params, self.attrs)

    def run_reference(self, tensors):
        """The same nodes through the torch lowering (differentiable)."""
        inputs, params = self.split(tensors)
        graph = self.program.graph
        values = dict(zip(self.plan.inputs, inputs))
        for node_id in self.plan.nodes:
            node = graph.node(node_id)
            args = [values[r] for r in node.inputs]
            result = OPS[node.op].torch(args, self.attrs[node_id], params.get(node_id, {}))
            results = result if isinstance(result, (list, tuple)) else [result]
            for index, value in enumerate(results):
                from ..ir import ValueRef

                values[ValueRef(node_id, index)] = value
        return [values[r] for r in self.plan.outputs]


class _KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, *tensors):
        ctx.call = call
        ctx.save_for_backward(*tensors)
        outputs = call.run_kernel(tensors)
        ctx.mark_non_differentiable(*[o for o in outputs if not o.is_floating_point()])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        wanted = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(w) for t, w in zip(tensors, wanted)]
            outputs = ctx.call.run_reference(leaves)
            pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
            targets = [leaf for leaf, w in zip(leaves, wanted) if w]
            found = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs],
                                        allow_unused=True) if pairs and targets else []
        found = iter(found)
        return (None, *[next(found) if w else None for w in wanted])


class TritonProgram:
    """A net's kernels, lowered once; compiled (or interpreted) on first use."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.plans = lower(graph)
        self._kernels: dict[str, object] = {}

    @property
    def sources(self) -> dict[str, str]:
        return {p.name: p.source for p in self.plans if p.source}

    def kernel(self, plan: KernelPlan):
        if not plan.source:
            return None
        kernel = self._kernels.get(plan.name)
        if kernel is None:
            kernel = self._kernels[plan.name] = load_kernel(plan.source, plan.name)
        return kernel

    def run(self, inputs: dict, attrs_by_node: dict, lookup) -> dict:
        """Execute every plan; `lookup(param name)` gives a parameter tensor."""
        values = dict(inputs)
        for plan in self.plans:
            roles, params = [], []
            for node_id in plan.nodes:
                for role, name in sorted(self.graph.node(node_id).params.items()):
                    roles.append((node_id, role))
                    params.append(lookup(name))
            attrs = {n: attrs_by_node[n] for n in plan.nodes}
            call = _Call(self, plan, attrs, roles)
            operands = [values[r] for r in plan.inputs] + params
            outputs = _KernelFunction.apply(call, *operands)
            for ref, value in zip(plan.outputs, outputs):
                values[ref] = value
        return values

    def __getstate__(self):
        return {"graph": self.graph, "plans": self.plans, "_kernels": {}}
