"""Running an IR graph with each op's torch lowering (the torch backend, and
the reference for derived backward graphs)."""
from __future__ import annotations

from .ir import Graph, ValueRef
from .ops import OPS


def run_graph(graph: Graph, inputs: dict[int, object], attrs_by_node: dict[int, dict], lookup,
              stop_before: int | None = None):
    """Values of every result, keyed by ValueRef. `inputs` maps input node ids
    to tensors; `lookup(name)` gives a parameter. With `stop_before`, return
    that node's operands instead."""
    values: dict[ValueRef, object] = {ValueRef(n, 0): v for n, v in inputs.items()}
    for node in graph.nodes():
        if node.op == "_input":
            continue
        args = [values[r] for r in node.inputs]
        if node.id == stop_before:
            return args
        params = {role: lookup(name) for role, name in node.params.items()}
        result = OPS[node.op].torch(args, attrs_by_node[node.id], params)
        if isinstance(result, (list, tuple)):
            for index, item in enumerate(result):
                values[ValueRef(node.id, index)] = item
        else:
            values[ValueRef(node.id, 0)] = result
    return values
