"""The IR's invariants, checked after every pass."""
from __future__ import annotations

import networkx as nx

from ..errors import ConvDSLError
from ..ops import OPS


class IRVerificationError(AssertionError):
    """A pass broke the IR: a compiler bug, never a user error."""


def verify(graph, stage: str = "") -> None:
    where = f" after {stage}" if stage else ""

    def fail(msg):
        raise IRVerificationError(f"IR of net {graph.name} is invalid{where}: {msg}")

    if not nx.is_directed_acyclic_graph(graph.nx):
        fail("the graph has a cycle")
    for node in graph.nodes():
        op = OPS.get(node.op)
        if op is None:
            fail(f"%{node.id} has unknown op {node.op}")
        if len(node.types) != op.results(node.attrs) and op.name != "_input":
            fail(f"%{node.id} ({node.op}) has {len(node.types)} result types")
        for ref in node.inputs:
            if ref.node not in graph:
                fail(f"%{node.id} reads %{ref.node}, which is not in the graph")
            if ref.index >= len(graph.node(ref.node).types):
                fail(f"%{node.id} reads result {ref.index} of %{ref.node}, which has fewer")
        if set(graph.nx.predecessors(node.id)) != {r.node for r in node.inputs}:
            fail(f"%{node.id}: graph edges do not match its operands")
        for pname in node.params.values():
            if pname not in graph.params:
                fail(f"%{node.id} uses parameter {pname}, which is not declared")
    for ref in graph.outputs:
        if ref.node not in graph:
            fail(f"output {ref} is not in the graph")
    for node_id in graph.inputs:
        if node_id not in graph or graph.node(node_id).op != "_input":
            fail(f"input %{node_id} is missing")


__all__ = ["ConvDSLError", "IRVerificationError", "verify"]
