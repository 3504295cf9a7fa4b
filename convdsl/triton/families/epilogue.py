"""What a kernel family needs to compute a fused node (ops/fused.py): the
anchor step it computes itself, and the elementwise epilogue that follows it,
as fp32 Triton expressions applied to the accumulator before the one store.

A family that supports epilogues plans plain and fused nodes alike:

    anchor = anchor_step(node)            # op, attrs, param roles of step 0
    ep = epilogue_of(graph, node)         # the steps after it (maybe none)
    render(..., ep=ep.template())         # kernels/common.jinja: epilogue_pointers,
                                          # apply_epilogue
    KernelPlan(..., inputs=(x, *ep.residuals), outputs=(result 0, *ep.kept_refs))

and at launch `launch_attrs(attrs, node_id)` / `launch_params(params, node_id)`
give the anchor's concrete attributes and parameters whatever the node is.
Residual operands and stored intermediates share the output's layout, so one
offset expression addresses all of them (`like_output`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...ir import Graph, Node, ValueRef
from ...ops.fused import FUSED, result_index, step_node, step_params
from .elementwise import _expression


@dataclass
class Epilogue:
    steps: list[tuple[str, str, str]] = field(default_factory=list)  # (var, expression, op)
    residuals: list[ValueRef] = field(default_factory=list)  # loaded at the output's offsets
    kept: list[tuple[ValueRef, str]] = field(default_factory=list)  # stored for backward
    result: str = "acc"

    @property
    def kept_refs(self) -> tuple[ValueRef, ...]:
        return tuple(ref for ref, _ in self.kept)

    @property
    def ops(self) -> list[str]:
        return [op for _, _, op in self.steps]

    def template(self) -> dict:
        """The template parameter `ep` (kernels/common.jinja)."""
        return {"steps": [list(s) for s in self.steps], "residuals": len(self.residuals),
                "kept": [var for _, var in self.kept], "result": self.result}

    def describe(self) -> str:
        """For docstrings: ', then relu -> add' or ''."""
        return f", then {' -> '.join(self.ops)}" if self.steps else ""

    def name_parts(self) -> list[str]:
        """For kernel names: the epilogue ops, and `saving` for the training variant."""
        return self.ops[:3] + (["saving"] if self.kept else [])


def is_fused(node: Node) -> bool:
    return node.op == FUSED


def anchor_step(node: Node) -> Node:
    """Step 0 of a fused node as a plain node (or the node itself)."""
    return step_node(node, 0) if is_fused(node) else node


def launch_attrs(attrs: dict, node: Node | None = None) -> dict:
    """The anchor's concrete attributes from a node's concrete attributes."""
    return attrs["steps"][0]["attrs"] if "steps" in attrs else attrs


def launch_params(params: dict) -> dict:
    """The anchor's parameters by role ('weight', 'bias')."""
    return step_params(params, 0) if any(k[:1].isdigit() for k in params) else params


def epilogue_of(graph: Graph, node: Node, acc: str = "acc", stop: int | None = None,
                start: int = 1) -> Epilogue:
    """Steps start..stop-1 of a fused node as expressions over `acc` (the value
    of step start-1, by default step 0: the anchor)."""
    if not is_fused(node):
        return Epilogue(result=acc)
    steps = node.attrs["steps"]
    stop = len(steps) if stop is None else stop
    ep = Epilogue()
    names = {f"s{start - 1}": acc}
    for k in range(start, stop):
        operands = []
        for operand in steps[k]["operands"]:
            if operand not in names:  # a fused-node operand: read at the output's positions
                ref = node.inputs[int(operand[2:])]
                if ref not in ep.residuals:
                    ep.residuals.append(ref)
                names[operand] = f"r{ep.residuals.index(ref)}"
            operands.append(names[operand])
        var = f"e{k}"
        ep.steps.append((var, _expression(step_node(node, k)).format(*operands),
                         steps[k]["op"].lstrip("_")))
        names[f"s{k}"] = var
    ep.result = names[f"s{stop - 1}"]
    saved = graph.saved_for_backward
    for k in range(start - 1, stop - 1):
        ref = ValueRef(node.id, result_index(k, len(steps)))
        if ref in saved:
            ep.kept.append((ref, names[f"s{k}"]))
    return ep


def like_output(reference: torch.Tensor, shape, dtype, device, memory_format) -> torch.Tensor:
    """The output tensor: with a residual operand, the residual's exact layout
    (so one offset expression addresses both), else `memory_format`."""
    if reference is not None and _dense(reference):
        return torch.empty_like(reference, dtype=dtype)
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def residual_operands(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Residuals must be dense (no gaps, no overlap) to share the output's offsets."""
    return [t.detach() if _dense(t) else t.detach().contiguous() for t in tensors]


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some permutation of the dims is contiguous."""
    if t.is_contiguous():
        return True
    dims = sorted(range(t.dim()), key=lambda d: t.stride(d))
    expected = 1
    for d in dims:
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def epilogue_signature(ep: Epilogue, pointer: str) -> dict:
    """The epilogue's pointer arguments for ahead-of-time signatures."""
    sig = {f"res{i}_ptr": pointer for i in range(len(ep.residuals))}
    sig.update({f"kept{i}_ptr": pointer for i in range(len(ep.kept))})
    return sig


def epilogue_flops(ep: Epilogue) -> int:
    """Floating-point operations per output element the epilogue adds."""
    return len(ep.steps)
