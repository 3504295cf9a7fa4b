"""Running a net's kernels inside PyTorch autograd.

One torch.autograd.Function covers the whole net: `forward` runs the forward
kernels and keeps exactly the values the derived backward graph reads;
`backward` runs that graph's kernels (convdsl.autodiff derives it; one graph
per set of inputs that need a gradient)."""
from __future__ import annotations

import torch

from .. import log
from ..checks import check_layers
from ..ir import Graph, ValueRef
from ..ir.types import symbol
from .aot_launch import recording_kernel
from .families import KernelPlan, family
from .loader import load_kernel
from .lowering import expand_fused, lower


class TritonProgram:
    """One graph's kernels, lowered once; compiled (or interpreted) on first use."""

    def __init__(self, graph: Graph, backward: bool = False):
        # Fused nodes no family computes run as their steps (lowering.expand_fused).
        self.graph, self.aliases, self.origins = expand_fused(graph, backward)
        self.plans = lower(self.graph, backward)
        self._kernels: dict[str, object] = {}
        for plan in self.plans:
            log.emit("kernels", lambda plan=plan: _describe(plan, self.graph, backward))

    @property
    def sources(self) -> dict[str, str]:
        return {p.name: p.source for p in self.plans if p.source}

    def reference_ops(self) -> list[str]:
        """Ops that still run their torch lowering (no generated kernel yet)."""
        return sorted({p.meta["op"] for p in self.plans if p.family == "reference"})

    def kernel(self, plan: KernelPlan):
        if not plan.source:
            return None
        recorder = recording_kernel(plan.source, plan.name)
        if recorder is not None:  # aot_launch.recording(): never cached
            return recorder
        kernel = self._kernels.get(plan.name)
        if kernel is None:
            kernel = self._kernels[plan.name] = load_kernel(plan.source, plan.name)
        return kernel

    def _last_uses(self) -> dict[int, list[ValueRef]]:
        """Plan index → the values no later plan reads (outputs and saved
        values excepted): run() drops them as soon as that plan is done."""
        if getattr(self, "_drops", None) is None:
            keep = set(self.graph.outputs) | set(self.graph.saved_for_backward)
            last: dict[ValueRef, int] = {}
            for index, plan in enumerate(self.plans):
                for ref in plan.inputs:
                    last[ref] = index
            drops: dict[int, list[ValueRef]] = {}
            for ref, index in last.items():
                if ref not in keep:
                    drops.setdefault(index, []).append(ref)
            self._drops = drops
        return self._drops

    def run(self, inputs: dict[int, torch.Tensor], attrs_by_node: dict, lookup) -> dict:
        """Every plan in order; `inputs` by input node id, `lookup(name)` a parameter.
        Intermediate values are released right after their last reader."""
        values = {ValueRef(n, 0): v for n, v in inputs.items()}
        drops = self._last_uses()
        for index, plan in enumerate(self.plans):
            params: dict[int, dict] = {}
            for node_id in plan.nodes:
                for role, name in self.graph.node(node_id).params.items():
                    params.setdefault(node_id, {})[role] = lookup(name)
            attrs = {n: self._attrs(attrs_by_node, n) for n in plan.nodes}
            outputs = family(plan.family).launch(plan, self.kernel(plan),
                                                 [values[r] for r in plan.inputs], params, attrs)
            for ref, value in zip(plan.outputs, outputs):
                values[ref] = value
            for ref in drops.get(index, ()):
                values.pop(ref, None)
        for fused, held in self.aliases.items():
            if held in values:
                values[fused] = values[held]
        return values

    def _attrs(self, attrs_by_node: dict, node_id: int) -> dict:
        """Concrete attributes of a node; an expanded fused step's come from its fused node."""
        origin = self.origins.get(node_id)
        if origin is None:
            return attrs_by_node[node_id]
        fused, step = origin
        return attrs_by_node[fused]["steps"][step]["attrs"]

    def __getstate__(self):
        return {**self.__dict__, "_kernels": {}, "_drops": None}


def _describe(plan: KernelPlan, graph: Graph, backward: bool) -> str:
    """CONVDSL_LOG=kernels: one line per plan, naming the IR nodes it computes."""
    kind = "backward" if backward else "training" if graph.saved_for_backward else "forward"
    nodes = []
    for node_id in plan.nodes:
        if not graph.nx.has_node(node_id):  # a helper step the lowering added (a reduction)
            nodes.append(f"%{node_id}")
            continue
        node = graph.node(node_id)
        pattern = node.attrs.get("pattern")
        label = f"%{node.id} {node.op}" + (f"[{pattern}]" if pattern else "")
        nodes.append(label + (f" ({node.layer})" if node.layer else "") + f" @{node.span.location}")
    return f"{kind} {plan.name}: family {plan.family}, nodes {', '.join(nodes)}"


class TritonNet:
    """The forward program and, per set of inputs needing gradients, the backward one."""

    def __init__(self, net):
        self.graph: Graph = net._graph
        self.inference = TritonProgram(self.graph)
        self._training = None
        self._backward: dict[tuple, TritonProgram] = {}
        self._attrs: dict[tuple, dict] = {}

    @property
    def forward(self) -> TritonProgram:
        return self.inference

    def training(self, net) -> TritonProgram:
        """The forward kernels when a backward pass will follow: fused as in
        inference, but storing every value a derived backward graph may read."""
        if self._training is None:
            every = tuple(net.input_names)
            saved = set(net.backward(()).saved) | set(net.backward(every).saved)
            graph = self.graph.copy()
            graph.saved_for_backward = frozenset(saved)
            self._training = TritonProgram(graph)
        return self._training

    def backward_program(self, net, inputs_with_grad: tuple) -> tuple:
        bwd = net.backward(inputs_with_grad)
        if inputs_with_grad not in self._backward:
            self._backward[inputs_with_grad] = TritonProgram(bwd.graph, backward=True)
        return bwd, self._backward[inputs_with_grad]

    def backward_attrs(self, bwd, env: dict, key: tuple) -> dict:
        if key not in self._attrs:
            if len(self._attrs) > 64:
                self._attrs.clear()
            self._attrs[key] = check_layers(bwd.graph, env)
        return self._attrs[key]

    def __call__(self, net, inputs: tuple, attrs_by_node: dict, env: dict):
        names = list(net._graph.params)
        params = [_param(net, n) for n in names]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*inputs, *params))
        program = self.training(net) if grad else self.inference
        return _NetFunction.apply(self, program if grad else None, net, attrs_by_node, env, names,
                                  len(inputs), *inputs, *params)

    def programs(self, net) -> list[TritonProgram]:
        """Every program a training step can run: inference and training
        forward kernels, and the backward kernels for the parameters."""
        if any(p.trainable for p in self.graph.params.values()):
            self.backward_program(net, ())
            self.training(net)
        found = [self.inference]
        if self._training is not None:
            found.append(self._training)
        return found + list(self._backward.values())

    def sources(self) -> dict[str, str]:
        found = dict(self.inference.sources)
        if self._training is not None:
            found.update(self._training.sources)
        for program in self._backward.values():
            found.update(program.sources)
        return found


def _param(net, name):
    from ..module import _lookup

    return _lookup(net, name)


class _NetFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, runner: TritonNet, program, net, attrs_by_node, env, names, n_in, *tensors):
        """`program` is None when no gradient will be taken (no_grad, or
        nothing requires one): then the inference kernels run and nothing is saved."""
        graph = runner.graph
        training = program is not None
        program = program or runner.inference
        params = dict(zip(names, tensors[n_in:]))
        values = program.run(dict(zip(graph.inputs, tensors[:n_in])), attrs_by_node,
                             params.__getitem__)
        outputs = tuple(values[r] for r in graph.outputs)
        needs = ctx.needs_input_grad[7:]
        if training and any(needs):
            with_grad = tuple(graph.node(n).attrs["name"]
                              for n, need in zip(graph.inputs, needs[:n_in]) if need)
            bwd, program = runner.backward_program(net, with_grad)
            saved_refs = list(bwd.saved)
            ctx.save_for_backward(*[values[r] for r in saved_refs], *tensors[n_in:])
            ctx.plan = (runner, bwd, program, saved_refs, env, with_grad, names, n_in)
        return outputs[0] if len(outputs) == 1 else outputs

    @staticmethod
    def backward(ctx, *grads):
        runner, bwd, program, saved_refs, env, with_grad, names, n_in = ctx.plan
        stored = ctx.saved_tensors
        saved, params = stored[:len(saved_refs)], dict(zip(names, stored[len(saved_refs):]))
        feed = dict(zip(bwd.seeds, grads))
        feed.update({bwd.saved[r]: v for r, v in zip(saved_refs, saved)})
        key = (tuple(sorted(env.items())), with_grad)
        attrs = runner.backward_attrs(bwd, {k: v for k, v in env.items()}, key)
        values = program.run(feed, attrs, params.__getitem__)
        found = {name: values[ref] for name, ref in zip(bwd.grads, bwd.graph.outputs)}
        input_names = [runner.graph.node(n).attrs["name"] for n in runner.graph.inputs]
        input_grads = [found.get(f"input:{name}") for name in input_names]
        param_grads = [found.get(name) for name in names]
        return (None,) * 7 + tuple(input_grads) + tuple(param_grads)


__all__ = ["TritonNet", "TritonProgram", "symbol"]
