"""Shape inference: re-run every op's shape rule on its operands' types."""
from __future__ import annotations

from ..ir.types import dims_equal
from ..ops import OPS, ShapeContext
from .verify import IRVerificationError


def infer_shapes(graph) -> bool:
    for node in graph.nodes():
        op = OPS[node.op]
        ctx = ShapeContext(node.op, [graph.type_of(r) for r in node.inputs], node.attrs, node.span,
                           getattr(node, "arg_spans", {}))
        types = op.shape(ctx)
        if len(types) != len(node.types) or any(
                a.dtype != b.dtype or a.rank != b.rank
                or not all(dims_equal(p, q) for p, q in zip(a.shape, b.shape))
                for a, b in zip(types, node.types)):
            raise IRVerificationError(
                f"shape of %{node.id} ({node.op}) changed from "
                f"{[str(t) for t in node.types]} to {[str(t) for t in types]}")
    return False
