"""IR graph → kernel plans. Adjacent elementwise ops become one kernel."""
from __future__ import annotations

from ..errors import ConvDSLError
from ..ir import Graph, Node, ValueRef
from ..ir.types import dims_equal
from ..ops import OPS
from ..ops.fused import FUSED, result_index, step_node
from .families import KernelPlan, family


def family_of(graph: Graph, node: Node, backward: bool = False) -> str:
    op = OPS[node.op]
    name = op.triton_family(node.attrs, [graph.type_of(r) for r in node.inputs])
    if name is not None and not _available(name):
        name = None
    if name is None:
        if backward:
            return "reference"  # a gradient op whose kernel does not exist yet
        raise ConvDSLError(f"{node.op} has no Triton lowering", node.span)
    return name


def _available(name: str) -> bool:
    from .families import family

    try:
        family(name)
        return True
    except (KeyError, ModuleNotFoundError):  # a family whose module is not written yet
        return False


def _fusable_into(graph: Graph, producer: Node, node: Node, outputs: set[int]) -> bool:
    """`node` may join `producer`'s chain when the intermediate lives nowhere else."""
    return (producer.id not in outputs
            and len(graph.users(producer.id)) == 1
            and sum(r.node == producer.id for r in node.inputs) >= 1
            and producer.types[0].rank == node.types[0].rank
            and all(dims_equal(a, b) for a, b in zip(producer.types[0].shape, node.types[0].shape))
            and producer.types[0].dtype == node.types[0].dtype)


def group_nodes(graph: Graph, backward: bool = False) -> list[list[Node]]:
    """Nodes in execution order, elementwise chains grouped."""
    outputs = {r.node for r in graph.outputs}
    groups: list[list[Node]] = []
    chain_of: dict[int, list[Node]] = {}  # last node of an open elementwise chain → the chain
    for node in graph.nodes():
        if node.op == "_input":
            continue
        name = family_of(graph, node, backward)
        if name == "elementwise":
            for ref in node.inputs:
                chain = chain_of.get(ref.node)
                if chain is not None and _fusable_into(graph, chain[-1], node, outputs):
                    del chain_of[ref.node]
                    chain.append(node)
                    chain_of[node.id] = chain
                    # The chain now runs at its newest node: after every group
                    # that produces one of its operands.
                    groups.pop(next(i for i, g in enumerate(groups) if g is chain))
                    groups.append(chain)
                    break
            else:
                chain = [node]
                groups.append(chain)
                chain_of[node.id] = chain
        else:
            groups.append([node])
    return groups


def _computes_fused(name: str) -> bool:
    """Whether family `name` computes fused nodes (ops/fused.py) in one kernel."""
    if not _available(name):
        return False
    import sys

    module = sys.modules[type(family(name)).__module__]
    return getattr(family(name), "fuses", None) is True or hasattr(module, "epilogue_of")


def expand_fused(graph: Graph, backward: bool = False) -> tuple[Graph, dict, dict]:
    """A copy of `graph` in which each fused node that no kernel family computes
    runs as its steps again, one kernel each (intermediates then live in memory).
    Returns the graph, the aliases (a fused intermediate → the value now
    holding it) and each expanded node's origin (node id → (fused id, step))."""
    todo = [n for n in graph.nodes() if n.op == FUSED and not _computes_fused(
        OPS[FUSED].triton_family(n.attrs, [graph.type_of(r) for r in n.inputs]))]
    if not todo:
        return graph, {}, {}
    graph = graph.copy()
    graph._next_id = max(graph._next_id, EXPANDED_IDS)  # kernel names stay unique
    aliases: dict[ValueRef, ValueRef] = {}
    origins: dict[int, tuple[int, int]] = {}
    for original in todo:
        node = graph.node(original.id)
        steps = node.attrs["steps"]
        refs = {f"in{i}": r for i, r in enumerate(node.inputs)}
        for k, step in enumerate(steps[:-1]):
            plain = step_node(node, k)
            added = graph.add(plain.op, [refs[o] for o in step["operands"]], plain.attrs,
                              plain.types, plain.span, layer=plain.layer, params=plain.params,
                              binding=plain.binding, origin=f"%{node.id} fused")
            refs[f"s{k}"] = ValueRef(added.id, 0)
            origins[added.id] = (node.id, k)
            aliases[ValueRef(node.id, result_index(k, len(steps)))] = ValueRef(added.id, 0)
        last = step_node(node, len(steps) - 1)
        node.op, node.attrs, node.params = last.op, last.attrs, last.params
        node.inputs = [refs[o] for o in steps[-1]["operands"]]
        node.types = node.types[:1]
        origins[node.id] = (node.id, len(steps) - 1)
        graph.rewire(node)
    graph.saved_for_backward = frozenset(aliases.get(r, r) for r in graph.saved_for_backward)
    return graph, aliases, origins


EXPANDED_IDS = 1_000_000


def lower(graph: Graph, backward: bool = False) -> list[KernelPlan]:
    plans = []
    seen: set[str] = set()
    for group in group_nodes(graph, backward):
        plan = family(family_of(graph, group[0], backward)).plan(graph, group)
        if backward:
            plan.direction = "backward"
        if plan.source and plan.name in seen:
            raise AssertionError(f"two kernels named {plan.name}")
        seen.add(plan.name)
        plans.append(plan)
    return plans
