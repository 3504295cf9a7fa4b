"""The IR graph: one networkx node per op, carrying its attributes, result
types, source span, layer name and parameters.

Node ids are small integers in creation order, so iteration and printing are
deterministic. The operand order of a node lives in `Node.inputs` (the same
producer may feed a node twice, as in `x * x`); the networkx edges mirror it
for graph algorithms.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import networkx as nx

from ..errors import Span
from .types import TensorType


@dataclass(frozen=True)
class ValueRef:
    """Result `index` of node `node`."""

    node: int
    index: int = 0

    def __str__(self) -> str:
        return f"%{self.node}" if self.index == 0 else f"%{self.node}#{self.index}"


@dataclass
class ParamDecl:
    """One parameter tensor of the net (a state_dict entry)."""

    name: str  # e.g. "c1.weight"
    shape: tuple[int, ...]
    init: tuple  # (initializer name, {arguments})
    trainable: bool
    layer: str
    role: str  # "weight", "bias", "weight_0", ...
    span: Span
    fan_in: int = 1
    fan_out: int = 1
    mask: Any = None  # connection table: tuple of rows; weight entries outside it are held at zero
    count: int = 0  # real parameters (a table's zeros excluded)
    separable_rank: int = 0  # for separable factors weight_d: how many factors make the kernel
    separable_sizes: tuple[int, ...] = ()  # ... and the kernel size along each


@dataclass
class Node:
    id: int
    op: str
    inputs: list[ValueRef]
    attrs: dict[str, Any]
    types: list[TensorType]
    span: Span
    layer: str | None = None  # the layer name of a parametric op
    params: dict[str, str] = field(default_factory=dict)  # role → ParamDecl name
    binding: str | None = None  # the SSA name the program gave this result, if any
    origin: str | None = None  # set by passes: what this node was rewritten from
    arg_spans: dict[str, Span] = field(default_factory=dict)  # where each argument was written


class Graph:
    """A net's IR: nodes in a networkx.DiGraph plus inputs, outputs and parameters."""

    def __init__(self, name: str, span: Span):
        self.name = name
        self.span = span
        self.nx = nx.DiGraph()
        self.inputs: list[int] = []  # nodes with op "input", in declaration order
        self.outputs: list[ValueRef] = []
        self.params: dict[str, ParamDecl] = {}
        self.symbols: dict[str, tuple[str, int]] = {}  # size symbol → (input name, axis) that binds it
        self.output_names: list[str] | None = None  # what each output is, where not obvious
        # Values a derived backward graph reads: kernels that fuse must still store them.
        self.saved_for_backward: frozenset = frozenset()
        self._next_id = 0

    # -- construction -----------------------------------------------------------------
    def add(self, op: str, inputs: list[ValueRef], attrs: dict, types: list[TensorType],
            span: Span, **extra) -> Node:
        node = Node(self._next_id, op, list(inputs), dict(attrs), list(types), span, **extra)
        self._next_id += 1
        self.nx.add_node(node.id, node=node)
        for ref in node.inputs:
            self.nx.add_edge(ref.node, node.id)
        return node

    def remove(self, node_id: int) -> None:
        self.nx.remove_node(node_id)

    def replace_uses(self, old: ValueRef, new: ValueRef) -> None:
        # Only the producer's users can read `old` (edges mirror inputs): visiting
        # them, not every node in order, keeps a pass over n nodes O(n) here.
        for node in self.users(old.node):
            if old in node.inputs:
                node.inputs = [new if r == old else r for r in node.inputs]
                self.rewire(node)
        if old in self.output_set():  # a set: a pass over a graph of n outputs stays O(n)
            self.outputs = [new if r == old else r for r in self.outputs]

    def output_set(self) -> frozenset:
        """The outputs as a set, rebuilt when `outputs` is replaced or grows."""
        cached = getattr(self, "_outputs_seen", None)
        if cached is None or cached[0] is not self.outputs or cached[1] != len(self.outputs):
            # holding the list keeps its id from being reused by another one
            cached = self._outputs_seen = (self.outputs, len(self.outputs),
                                           frozenset(self.outputs))
        return cached[2]

    def rewire(self, node: Node) -> None:
        """Make the networkx edges match `node.inputs` again after an edit."""
        for pred in list(self.nx.predecessors(node.id)):
            self.nx.remove_edge(pred, node.id)
        for ref in node.inputs:
            self.nx.add_edge(ref.node, node.id)

    # -- queries ----------------------------------------------------------------------
    def node(self, node_id: int) -> Node:
        return self.nx.nodes[node_id]["node"]

    def __contains__(self, node_id: int) -> bool:
        return node_id in self.nx

    def nodes(self) -> Iterator[Node]:
        """Nodes in a deterministic topological order (ties broken by id)."""
        for node_id in nx.lexicographical_topological_sort(self.nx):
            yield self.node(node_id)

    def type_of(self, ref: ValueRef) -> TensorType:
        return self.node(ref.node).types[ref.index]

    def users(self, node_id: int) -> list[Node]:
        return [self.node(n) for n in sorted(self.nx.successors(node_id))]

    def layers(self) -> list[Node]:
        return [n for n in self.nodes() if n.layer is not None]

    def parameter_count(self, trainable_only: bool = False) -> int:
        return sum(p.count for p in self.params.values() if p.trainable or not trainable_only)

    def copy(self) -> "Graph":
        import copy as _copy

        clone = Graph(self.name, self.span)
        clone.nx = nx.DiGraph()
        for node in self.nodes():
            clone.nx.add_node(node.id, node=_copy.copy(node))
            clone.node(node.id).inputs = list(node.inputs)
            clone.node(node.id).attrs = dict(node.attrs)
            clone.node(node.id).types = list(node.types)
            clone.node(node.id).params = dict(node.params)
        clone.nx.add_edges_from(self.nx.edges)
        clone.inputs = list(self.inputs)
        clone.outputs = list(self.outputs)
        clone.params = dict(self.params)
        clone.symbols = dict(self.symbols)
        clone.output_names = self.output_names
        clone.saved_for_backward = self.saved_for_backward
        clone._next_id = self._next_id
        return clone
