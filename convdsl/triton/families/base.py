"""What every kernel family provides. A family turns one IR node (or a fused
group of nodes) into a KernelPlan, launches the compiled kernel on real
tensors, and describes a representative specialization for ahead-of-time
compilation and the cost model."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...ir import Graph, Node, ValueRef

# IR dtype → Triton pointer type, for ahead-of-time signatures.
POINTER = {"f32": "*fp32", "f16": "*fp16", "bf16": "*bf16"}
ITEMSIZE = {"f32": 4, "f16": 2, "bf16": 2}
INT32_LIMIT = 2**31 - 1


@dataclass
class KernelPlan:
    """One generated kernel and everything needed to run and report it."""

    name: str  # a safe identifier (codegen.safe_name), unique within the net
    family: str
    source: str  # the whole generated module
    nodes: tuple[int, ...]  # the IR nodes it computes, in order
    inputs: tuple[ValueRef, ...]  # tensor operands from outside the group, in kernel order
    outputs: tuple[ValueRef, ...]  # the values it produces
    meta: dict[str, Any] = field(default_factory=dict)  # family-specific compile-time facts
    direction: str = "forward"


class Family:
    name: str = ""

    def plan(self, graph: Graph, nodes: list[Node]) -> KernelPlan:
        raise AssertionError(f"family {self.name} must define plan()")

    def launch(self, plan: KernelPlan, kernel, inputs: list[torch.Tensor],
               params: dict[int, dict[str, torch.Tensor]], attrs: dict[int, dict]) -> list:
        """Run the kernel: `params` and `attrs` are keyed by IR node id."""
        raise AssertionError(f"family {self.name} must define launch()")

    def aot(self, plan: KernelPlan, graph: Graph) -> tuple:
        """(signature, constexprs) of a representative specialization for
        triton.compile, optionally with a third item: launch options
        ({"num_warps": ..., "num_stages": ...}) of the GPU config."""
        raise AssertionError(f"family {self.name} must define aot()")

    # A family whose module holds helper kernels (a split-K sum) also defines
    # aot_extra(plan, graph) -> [(name, signature, constexprs[, options])].

    def cost(self, plan: KernelPlan, graph: Graph, env: dict) -> tuple[int, int]:
        """Analytic (FLOPs, global-memory bytes) at concrete sizes `env`."""
        raise AssertionError(f"family {self.name} must define cost()")


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Index arithmetic in int64 once any tensor holds 2^31 elements or more."""
    return any(t.numel() > INT32_LIMIT for t in tensors)


def float_literal(value: float) -> str:
    """A float as Triton source text; the builder admits only finite numbers."""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"non-finite constant {value} cannot be compiled")
    return repr(value)
