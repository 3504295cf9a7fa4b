"""CompiledNet: the torch.nn.Module a compiled .cdsl net becomes."""
from __future__ import annotations

import torch
from torch import nn

from .checks import bind_inputs, check_layers
from .errors import ConvDSLError, ConvDSLInputError
from .ir import Graph
from .ir.printer import FORMATS
from .execute import run_graph
from .ops.inits import initialize

STAGES = ("parsed", "optimized", "backward")


class _Layer(nn.Module):
    """Holds one layer's parameters, so state_dict keys read `c1.weight`."""


def _install(root: nn.Module, dotted: str, value: nn.Parameter) -> None:
    # Layer names may be anything an identifier allows (`training`, `ir`,
    # `0`), so write the module dicts directly instead of setattr.
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        child = module._modules.get(part)
        if child is None:
            child = _Layer()
            module._modules[part] = child
        module = child
    module._parameters[leaf] = value


def _lookup(root: nn.Module, dotted: str) -> torch.Tensor:
    *path, leaf = dotted.split(".")
    module = root
    for part in path:
        module = module._modules[part]
    return module._parameters[leaf]


class CompiledNet(nn.Module):
    """A compiled net. Call it like any module: `net(x)` or `net(x, y)`."""

    def __init__(self, parsed: Graph, optimized: Graph, backend: str, warnings=(),
                 source_name: str = "<string>", optimize: bool = True):
        super().__init__()
        self._optimize = optimize
        self._graphs = {"parsed": parsed, "optimized": optimized}
        self._graph = optimized
        self.backend = backend
        self.warnings = list(warnings)
        self.source_name = source_name
        self._plans: dict[tuple, dict] = {}
        self._float64 = False  # set by net.double(): f32 inputs may then come as float64
        self._kmeans_pending = {p.layer for p in optimized.params.values() if p.init[0] == "kmeans"}
        for decl in optimized.params.values():
            value = nn.Parameter(initialize(decl), requires_grad=decl.trainable)
            _install(self, decl.name, value)
        self.register_load_state_dict_post_hook(_loaded)
        self._program = None
        if backend == "triton":
            from .triton.runtime import TritonNet

            self._program = TritonNet(self)

    # -- inspection ----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._graph.name

    def ir(self, stage: str = "optimized", format: str = "text") -> str:
        """The IR at a stage as text, dot or json. `backward` is the graph the
        compiler derives for the trainable parameters' gradients."""
        if stage not in STAGES:
            raise ValueError(f"unknown IR stage '{stage}'; choose one of {', '.join(STAGES)}")
        if format not in FORMATS:
            raise ValueError(f"unknown IR format '{format}'; choose one of {', '.join(FORMATS)}")
        graph = self.backward().graph if stage == "backward" else self._graphs[stage]
        return FORMATS[format](graph)

    def backward(self, inputs_with_grad: tuple[str, ...] = ()):
        """The derived backward graph (convdsl.autodiff.BackwardGraph), cached."""
        from .autodiff import derive_backward

        key = tuple(inputs_with_grad)
        cache = self.__dict__.setdefault("_backward", {})
        if key not in cache:
            found = derive_backward(self._graph, key)
            if self._optimize:
                from .passes import run_backward_pipeline

                found.graph = run_backward_pipeline(found.graph)
            cache[key] = found
        return cache[key]

    @property
    def kernels(self) -> dict[str, str]:
        """Generated Triton kernel sources by name (empty on the torch backend)."""
        return self._program.sources() if self._program is not None else {}

    def parameter_count(self, trainable_only: bool = False) -> int:
        """Real parameters (a connection table's absent connections excluded)."""
        return self._graph.parameter_count(trainable_only)

    @property
    def input_names(self) -> list[str]:
        return [self._graph.node(i).attrs["name"] for i in self._graph.inputs]

    def fit_features(self, x: torch.Tensor, progress: bool | None = None) -> None:
        """Fill every init=kmeans layer from data; `progress` as in kmeans.fit_kmeans_layers."""
        if not self._kmeans_pending:
            raise ConvDSLError(f"net {self.name} has no init=kmeans layer to fit")
        from .kmeans import fit_kmeans_layers

        fit_kmeans_layers(self, x, progress=progress)

    # -- running -------------------------------------------------------------------------
    def _device(self) -> torch.device | None:
        for p in self.parameters():
            return p.device
        return None

    def _plan(self, env: dict[str, int]) -> dict:
        key = tuple(sorted(env.items()))
        plan = self._plans.get(key)
        if plan is None:
            plan = check_layers(self._graph, env)
            if len(self._plans) > 64:  # variable-size inputs: keep the cache bounded
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def forward(self, *inputs):
        if self._kmeans_pending:
            layers = ", ".join(sorted(self._kmeans_pending))
            raise ConvDSLError(f"layer {layers} has init=kmeans: call net.fit_features(x) with "
                               f"training data before running the net")
        return self._execute(_autocast_inputs(self._graph, inputs))

    @property
    def unfused_graph(self) -> Graph:
        """The optimized graph without fusion: every layer its own node (k-means fitting)."""
        if "unfused" not in self._graphs:
            from .passes import PIPELINE, run_pipeline

            passes = [p for p in PIPELINE if not p.name.startswith("fuse-")]
            self._graphs["unfused"] = (run_pipeline(self._graphs["parsed"], passes)
                                       if self._optimize else self._graph)
        return self._graphs["unfused"]

    def _execute(self, inputs: tuple, stop_before: int | None = None, graph: Graph | None = None):
        """Run the graph; with `stop_before`, return that node's operands instead."""
        graph = graph or self._graph
        env = bind_inputs(graph, inputs, self._device(), allow_float64=self._float64)
        attrs_by_node = self._plan(env) if graph is self._graph else check_layers(graph, env)
        if self._program is not None and stop_before is None:
            if self._float64:
                raise ConvDSLError("the triton backend's kernels take f32, f16 and bf16, not "
                                   "float64: compile with backend='torch' to run in float64")
            return _opaque_kernels()(self._program, self, tuple(inputs), attrs_by_node, env)
        found = run_graph(graph, dict(zip(graph.inputs, inputs)), attrs_by_node,
                          lambda name: _lookup(self, name), stop_before)
        if stop_before is not None:
            return found
        outputs = tuple(found[r] for r in graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def _apply(self, fn, *args, **kwargs):
        # Track `net.double()` / `net.float()` so the input checks follow the
        # module's dtype the way a PyTorch user expects.
        result = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.zeros(1))
        if isinstance(probe, torch.Tensor) and probe.is_floating_point():
            self._float64 = probe.dtype == torch.float64
        return result

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_plans"] = {}
        return state

    def extra_repr(self) -> str:
        return f"net={self.name}, backend={self.backend}, parameters={self.parameter_count():,}"


def _autocasting(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device autocast does not know (meta): bind_inputs reports it
        return False


def _autocast_inputs(graph: Graph, inputs: tuple) -> tuple:
    """Inside torch.autocast an input may come in the autocast dtype (an earlier
    autocast op's output): an f32 input takes it upcast, losslessly, as nn.Conv2d would."""
    found = list(inputs)
    for i, (node_id, value) in enumerate(zip(graph.inputs, inputs)):
        if (isinstance(value, torch.Tensor) and graph.node(node_id).types[0].dtype == "f32"
                and _autocasting(value.device.type)
                and value.dtype == torch.get_autocast_dtype(value.device.type)):
            found[i] = value.float()
    return tuple(found)


def _run_kernels(program, net: CompiledNet, inputs: tuple, attrs_by_node: dict, env: dict):
    """The triton backend's kernels as one call. Autocast is off inside, so the
    kernels compute in the declared dtypes, like a custom op autocast does not
    list; the ops after the net autocast as usual."""
    with torch.autocast(inputs[0].device.type, enabled=False):
        return program(net, inputs, attrs_by_node, env)


_OPAQUE_KERNELS = []


def _opaque_kernels():
    """_run_kernels as an opaque call for torch.compile, which graph-breaks there
    and runs it eagerly: Dynamo cannot trace kernel launches (nor Triton's
    interpreter) inside the net's autograd.Function. Built on first use, because
    torch.compiler.disable imports Dynamo, which imports Triton, and
    convdsl.triton must choose interpreted or compiled kernels before that."""
    if not _OPAQUE_KERNELS:
        _OPAQUE_KERNELS.append(torch.compiler.disable(_run_kernels))
    return _OPAQUE_KERNELS[0]


def _loaded(module: CompiledNet, incompatible_keys) -> None:
    # Loading weights gives k-means layers their kernels: nothing left to fit.
    if not incompatible_keys.missing_keys:
        module._kmeans_pending = set()


__all__ = ["CompiledNet", "ConvDSLInputError"]
