"""Dead-code elimination: drop ops whose results no output needs.

Parameters stay declared (the state_dict follows the source, not the pass)."""
from __future__ import annotations

import networkx as nx


def eliminate_dead_code(graph) -> bool:
    live = set(graph.inputs)
    for ref in graph.outputs:
        live.add(ref.node)
        live |= nx.ancestors(graph.nx, ref.node)
    dead = [n for n in graph.nx.nodes if n not in live]
    for node_id in dead:
        graph.remove(node_id)
    return bool(dead)
