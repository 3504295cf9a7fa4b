"""A frozen conv kernel the optimizer found rank-1 (passes/separable.py:
`rank1_separable=true`) runs on the separable family's fused 1-D passes.

The parameter stays the full kernel; at launch it is factored (one SVD per
[o, i] slice, cached per weight version) into the per-axis vectors the
separable kernel reads. If the weights were changed since compilation (a
loaded state_dict) and are no longer rank-1, the layer is computed exactly
by its PyTorch lowering instead, with a warning — never a wrong answer."""
from __future__ import annotations

import warnings

import torch

from ...errors import ConvDSLWarning
from ...ops import OPS
from ...passes.separable import rank1_factors
from .conv import WeightCache
from .epilogue import is_fused
from .separable import Separable

# Relative reconstruction error above which a kernel is no longer rank-1.
FALLBACK_ERROR = 1e-4


class SeparableRank1(Separable):
    name = "separable_rank1"
    fuses = True

    def __init__(self):
        super().__init__()
        self._factors = WeightCache()

    def plan(self, graph, nodes):
        plan = super().plan(graph, nodes)
        plan.name = plan.name.replace("k_separable", "k_separable_rank1", 1)
        plan.source = plan.source.replace("def k_separable", "def k_separable_rank1", 1)
        plan.meta["fused"] = is_fused(nodes[0])
        plan.meta["op"] = nodes[0].op
        plan.meta["results"] = tuple(r.index for r in plan.outputs)
        return plan

    def launch(self, plan, kernel, inputs, params, attrs, config=None):
        (node_id,) = plan.nodes
        given = params[node_id]
        role = "0.weight" if plan.meta["fused"] else "weight"
        weight = given[role]
        factors, error = self._factors.get(weight, weight.dtype, _factored)
        if error > FALLBACK_ERROR:
            return self._exact(plan, inputs, given, attrs[node_id], error)
        prefix = role[: -len("weight")]
        params = dict(params)
        params[node_id] = {k: v for k, v in given.items() if k != role}
        params[node_id].update({f"{prefix}weight_{d}": f for d, f in enumerate(factors)})
        return super().launch(plan, kernel, inputs, params, attrs, config)

    def _exact(self, plan, inputs, params, attrs, error):
        warnings.warn(f"a conv compiled as separable (its frozen kernel was rank-1) now has a "
                      f"kernel that is not (relative error {error:.1e}): computing it densely",
                      ConvDSLWarning, stacklevel=2)
        results = OPS[plan.meta["op"]].torch(list(inputs), attrs, params)
        results = results if isinstance(results, (list, tuple)) else [results]
        return [results[i] for i in plan.meta["results"]]

    def cost(self, plan, graph, env):
        """As the separable kernel, reading the factors: O·I·Σk values."""
        flops, nbytes = super().cost(plan, graph, env)
        node = graph.node(plan.nodes[0])
        name = node.params.get("0.weight" if is_fused(node) else "weight")
        shape = graph.params[name].shape
        factor_values = shape[0] * shape[1] * sum(shape[2:])
        return flops, nbytes + 4 * factor_values


def _factored(weight: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    factors, error = rank1_factors(weight.float())
    return [f.float().contiguous() for f in factors], error
