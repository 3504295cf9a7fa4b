"""Reverse-mode autodiff on the IR: the forward graph walked backwards, each
node's VJP rule (ops/vjp.py) emitting backward ops into a new graph.

The backward graph's inputs are the gradients of the net's outputs (`dout0`,
...) and the forward values the rules read (`saved %3`): exactly what must be
kept from the forward pass. Its outputs are the gradients of the trainable
parameters (shared ones accumulated over every use) and of the net inputs that
require one. Nothing is derived for frozen layers or for operands whose
gradient nobody needs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span
from .ir import Graph, Node, TensorType, ValueRef
from .ops import OPS, ShapeContext


@dataclass
class BackwardGraph:
    graph: Graph
    grads: list[str]  # what each output is the gradient of: "c1.weight", "input:image"
    saved: dict[ValueRef, int]  # forward value → backward input node reading it
    seeds: list[int]  # backward input node of each forward output's gradient
    inputs_with_grad: tuple[str, ...] = ()


@dataclass
class _State:
    forward: Graph
    backward: Graph
    requires: dict[int, bool]
    grads: dict[ValueRef, list[ValueRef]] = field(default_factory=dict)
    param_grads: dict[str, list[ValueRef]] = field(default_factory=dict)
    saved: dict[ValueRef, int] = field(default_factory=dict)


class VJPContext:
    """What a rule sees for one forward node, and how it adds backward ops."""

    def __init__(self, state: _State, node: Node, grads: list[ValueRef | None]):
        self._state, self.node, self._grads = state, node, grads

    # -- reading the forward node ----------------------------------------------------------
    def grad(self, index: int = 0) -> ValueRef | None:
        return self._grads[index]

    def needs_input(self, index: int) -> bool:
        return self._state.requires[self.node.inputs[index].node]

    def needs_param(self, role: str) -> bool:
        return self._state.forward.params[self.node.params[role]].trainable

    def input_type(self, index: int) -> tuple:
        t = self._state.forward.type_of(self.node.inputs[index])
        return (t.dtype, tuple(t.shape))

    def output_type(self, index: int) -> tuple:
        t = self.node.types[index]
        return (t.dtype, tuple(t.shape))

    def param_trainable(self, name: str) -> bool:
        return self._state.forward.params[name].trainable

    def param_shape(self, role: str) -> tuple[int, ...]:
        return tuple(self._state.forward.params[self.node.params[role]].shape)

    def saved_input(self, index: int) -> ValueRef:
        return self._save(self.node.inputs[index])

    def saved_output(self, index: int) -> ValueRef:
        return self._save(ValueRef(self.node.id, index))

    # -- writing the backward graph ----------------------------------------------------------
    def emit(self, op: str, inputs: list[ValueRef], attrs: dict, params: dict | None = None):
        refs = self.emit_results(op, inputs, attrs, params)
        return refs[0]

    def emit_results(self, op: str, inputs: list[ValueRef], attrs: dict,
                     params: dict | None = None) -> list[ValueRef]:
        attrs = dict(attrs)
        if OPS[op].family == "grad":  # backward ops re-read the forward op's attributes
            attrs.update(forward=self.node.op, fattrs=self.node.attrs)
        return _emit(self._state.backward, op, inputs, attrs, self.node, params or {})

    def scale(self, ref: ValueRef, factor: float) -> ValueRef:
        return self.emit("_scalar", [ref], {"scalar": float(factor), "symbol": "*",
                                            "scalar_first": False})

    def sum(self, refs: list[ValueRef]) -> ValueRef:
        """One gradient from several contributions (a value read more than once)."""
        return _accumulate(self._state, refs, self.node)

    def param_grad(self, role: str, ref: ValueRef) -> None:
        self._state.param_grads.setdefault(self.node.params[role], []).append(ref)

    def _save(self, ref: ValueRef) -> ValueRef:
        state = self._state
        if ref not in state.saved:
            t = state.forward.type_of(ref)
            producer = state.forward.node(ref.node)
            label = str(ref) if ref.index or not producer.binding else producer.binding
            node = state.backward.add("_input", [], {"name": f"saved {label}", "type": t,
                                                     "forward": str(ref)}, [t], producer.span)
            state.backward.inputs.append(node.id)
            state.saved[ref] = node.id
        return ValueRef(state.saved[ref], 0)


class StepVJPContext(VJPContext):
    """The context of one step of a fused node (ops/fused.py): the step looks
    like a plain forward node, its value is result `result` of the fused node,
    and `needs` says which of its operands want a gradient."""

    def __init__(self, outer: VJPContext, step: Node, grads: list, needs: list[bool],
                 result: int):
        super().__init__(outer._state, step, grads)
        self._needs, self._result = needs, result

    def needs_input(self, index: int) -> bool:
        return self._needs[index]

    def saved_output(self, index: int) -> ValueRef:
        return self._save(ValueRef(self.node.id, self._result))


def _emit(graph: Graph, op: str, inputs: list[ValueRef], attrs: dict, origin: Node,
          params: dict) -> list[ValueRef]:
    ctx = ShapeContext(op, [graph.type_of(r) for r in inputs], attrs, origin.span)
    types = OPS[op].shape(ctx)
    node = graph.add(op, inputs, attrs, types, origin.span, params=dict(params),
                     origin=f"%{origin.id} {origin.op.lstrip('_')}")
    return [ValueRef(node.id, i) for i in range(len(types))]


def _accumulate(state: _State, refs: list[ValueRef], origin: Node) -> ValueRef:
    """Sum the contributions to one gradient (fan-out, shared parameters)."""
    total = refs[0]
    for ref in refs[1:]:
        total = _emit(state.backward, "_add", [total, ref], {"symbol": "+"}, origin, {})[0]
    return total


def requires_grad(graph: Graph, inputs_with_grad) -> dict[int, bool]:
    """Which forward values depend on something that wants a gradient."""
    wanted = set(inputs_with_grad)
    requires: dict[int, bool] = {}
    for node in graph.nodes():
        if node.op == "_input":
            requires[node.id] = node.attrs["name"] in wanted
            continue
        trainable = any(graph.params[p].trainable for p in node.params.values())
        requires[node.id] = trainable or any(requires[r.node] for r in node.inputs)
    return requires


def derive_backward(forward: Graph, inputs_with_grad=()) -> BackwardGraph:
    """The backward graph of `forward` for its trainable parameters and the
    named inputs."""
    backward = Graph(f"{forward.name}.backward", forward.span)
    backward._next_id = forward._next_id  # ids unique across both graphs: kernel names too
    backward.params = forward.params  # gradient ops read the forward parameters
    state = _State(forward, backward, requires_grad(forward, inputs_with_grad))
    seeds = []
    for index, ref in enumerate(forward.outputs):
        t = forward.type_of(ref)
        node = backward.add("_input", [], {"name": f"dout{index}", "type": t}, [t], forward.span)
        backward.inputs.append(node.id)
        seeds.append(node.id)
        state.grads.setdefault(ref, []).append(ValueRef(node.id, 0))

    for node in reversed(list(forward.nodes())):
        if node.op == "_input" or not state.requires[node.id]:
            continue
        incoming = [state.grads.get(ValueRef(node.id, k)) for k in range(len(node.types))]
        if not any(incoming):
            continue  # no output of this node reaches a returned value
        grads = [_accumulate(state, refs, node) if refs else None for refs in incoming]
        rule = OPS[node.op].vjp
        results = rule(VJPContext(state, node, grads))
        for ref, grad in zip(node.inputs, results):
            if grad is not None:
                state.grads.setdefault(ref, []).append(grad)

    names = []
    owners = _owners(forward)
    for name in forward.params:
        refs = state.param_grads.get(name)
        if refs:
            backward.outputs.append(_accumulate(state, refs, owners[name]))
            names.append(name)
    for node_id in forward.inputs:
        node = forward.node(node_id)
        refs = state.grads.get(ValueRef(node_id, 0))
        if node.attrs["name"] in inputs_with_grad and refs:
            backward.outputs.append(_accumulate(state, refs, node))
            names.append(f"input:{node.attrs['name']}")
    backward.output_names = names
    return BackwardGraph(backward, names, dict(state.saved), seeds, tuple(inputs_with_grad))


def evaluate_backward(net, inputs: tuple, grad_outputs: tuple, inputs_with_grad=()) -> dict:
    """Gradients from the derived backward graph, run with the torch lowerings:
    {"c1.weight": tensor, ..., "input:x": tensor}. A check of the VJP rules
    against PyTorch's own autograd, and a reference for backward kernels."""
    import torch

    from .checks import bind_inputs, check_layers
    from .execute import run_graph
    from .module import _lookup

    forward = net._graph
    bwd = net.backward(tuple(inputs_with_grad))
    env = bind_inputs(forward, tuple(inputs), None, allow_float64=True)

    def lookup(name):
        return _lookup(net, name).detach()

    with torch.no_grad():
        values = run_graph(forward, dict(zip(forward.inputs, inputs)), check_layers(forward, env),
                           lookup)
        feed = dict(zip(bwd.seeds, grad_outputs))
        feed.update({node_id: values[ref] for ref, node_id in bwd.saved.items()})
        found = run_graph(bwd.graph, feed, check_layers(bwd.graph, env), lookup)
    return {name: found[ref] for name, ref in zip(bwd.grads, bwd.graph.outputs)}


def _owners(forward: Graph) -> dict[str, Node]:
    """Each parameter's first user in program order, the node its accumulated
    gradient is attributed to. One walk for all parameters: a walk per
    parameter made deriving a long net quadratic."""
    owners: dict[str, Node] = {}
    for node in forward.nodes():
        for param in node.params.values():
            owners.setdefault(param, node)
    return owners


__all__ = ["BackwardGraph", "Span", "TensorType", "VJPContext", "derive_backward",
           "requires_grad"]
