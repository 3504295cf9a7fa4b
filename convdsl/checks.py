"""Run-time checks: inputs against their declarations, and every layer
against the sizes the inputs bind (LANGUAGE.md §8, last sentence)."""
from __future__ import annotations

import torch

from .errors import ConvDSLInputError
from .ir import Graph, TensorType
from .ir.types import concretize, evaluate, static_value, symbol
from .limits import MAX_EXTENT, max_tensor_elements
from .ops import OPS, ShapeContext
from .ops.spatial import effective_kernel, resolve_pads

# Ops that pad their input before sliding a window over it.
WINDOWED_OPS = frozenset({"conv", "depthwise", "local", "tiled", "maxpool", "avgpool", "lppool",
                          "wavgpool"})

TORCH_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def bind_inputs(graph: Graph, inputs: tuple, device: torch.device | None,
                allow_float64: bool = False) -> dict[str, int]:
    """Check each input's type, rank, dtype, device and dims; return the size symbols' values."""
    names = [graph.node(i).attrs["name"] for i in graph.inputs]
    if len(inputs) != len(names):
        raise ConvDSLInputError(f"net {graph.name} takes {len(names)} input"
                                f"{'' if len(names) == 1 else 's'} ({', '.join(names)}), "
                                f"got {len(inputs)}", graph.span)
    env: dict[str, int] = {}
    where: dict[str, tuple[str, int]] = {}
    for node_id, value in zip(graph.inputs, inputs):
        node = graph.node(node_id)
        name, declared = node.attrs["name"], node.types[0]
        span = node.span
        if not isinstance(value, torch.Tensor):
            raise ConvDSLInputError(f"input '{name}' must be a torch.Tensor, got "
                                    f"{type(value).__name__}", span)
        if value.dim() != declared.rank:
            raise ConvDSLInputError(f"input '{name}' is declared {declared} (rank {declared.rank}) "
                                    f"but got a tensor of shape {_shape_text(value.shape)} "
                                    f"(rank {value.dim()})", span)
        want = TORCH_DTYPES[declared.dtype]
        if allow_float64 and value.dtype == torch.float64:
            want = torch.float64  # the module was converted with net.double()
        if value.dtype != want:
            got = DTYPE_NAMES.get(value.dtype, str(value.dtype).replace("torch.", ""))
            raise ConvDSLInputError(f"input '{name}' is declared {declared.dtype} but got {got}; "
                                    f"convert it with .to(torch.{str(want).replace('torch.', '')})",
                                    span)
        if device is not None and value.device.type != device.type:
            raise ConvDSLInputError(f"input '{name}' is on {value.device} but the net's parameters "
                                    f"are on {device}", span)
        for axis, (d, actual) in enumerate(zip(declared.shape, value.shape)):
            fixed = static_value(d)
            if fixed is not None:
                if fixed != actual:
                    raise ConvDSLInputError(f"input '{name}' dim {axis} must be {fixed} (declared "
                                            f"{declared}), got {actual} in shape "
                                            f"{_shape_text(value.shape)}", span)
                continue
            sym = str(d)
            if sym in env and env[sym] != actual:
                first, first_axis = where[sym]
                raise ConvDSLInputError(f"size {sym} is {env[sym]} from input '{first}' dim "
                                        f"{first_axis} but {actual} from input '{name}' dim {axis}; "
                                        f"the same symbol must get the same value", span)
            if actual < 1:
                raise ConvDSLInputError(f"input '{name}' dim {axis} ({sym}) is empty", span)
            env[sym] = int(actual)
            where[sym] = (name, axis)
    return env


def check_layers(graph: Graph, env: dict[str, int],
                 max_elements: int | None = None) -> dict[int, dict]:
    """Re-run each op's shape rule on concrete sizes; return its concrete attributes.

    A layer that the bound sizes make invalid (an input too small for a kernel,
    a size= out of range) raises an error at that layer's source line, and so
    does one that would make a tensor of more than `max_elements` elements
    (default: limits.max_tensor_elements())."""
    limit = max_tensor_elements() if max_elements is None else max_elements
    sym_env = {symbol(k): v for k, v in env.items()}
    bound = ", ".join(f"{k}={v}" + (f" (input '{graph.symbols[k][0]}' dim {graph.symbols[k][1]})"
                                    if k in graph.symbols else "")
                      for k, v in sorted(env.items()))
    concrete_types: dict = {}
    attrs_by_node: dict[int, dict] = {}
    for node in graph.nodes():
        if node.op == "_input":
            concrete_types[node.id] = [_concrete_type(node.types[0], sym_env)]
            continue
        attrs = concretize(node.attrs, sym_env)
        ins = [concrete_types[r.node][r.index] for r in node.inputs]
        ctx = ShapeContext(node.op, ins, attrs, node.span, node.arg_spans,
                           runtime=f"(at run time, with {bound})" if bound else "(at run time)")
        types = OPS[node.op].shape(ctx)
        for t in types:
            for axis, d in enumerate(t.shape):
                if int(d) < 1:
                    what = f"layer '{node.layer}'" if node.layer else f"{node.op.lstrip('_')}"
                    raise ConvDSLInputError(
                        f"{what} would give an empty output (size {int(d)} along dim {axis}) for "
                        f"inputs with {bound}: the input is too small for it", node.span)
        _check_sizes(node, attrs, ins, types, bound, limit)
        concrete_types[node.id] = types
        attrs_by_node[node.id] = attrs
    return attrs_by_node


def _check_sizes(node, attrs: dict, ins: list[TensorType], types: list[TensorType], bound: str,
                 limit: int) -> None:
    """Refuse, before anything is allocated, a layer whose output or padded
    input would be absurdly large, or whose windows overflow int32 indexing."""
    what = f"layer '{node.layer}'" if node.layer else node.op.lstrip("_")
    sizes = f"for inputs with {bound}" if bound else "for these inputs"
    tensors = [("output", [int(d) for d in t.shape]) for t in types]
    for step, source in _windowed(node, attrs, ins, types):
        window = step.get("kernel") or step.get("window")
        if window is not None and "pad" in step and source.rank > 2:
            x = [int(d) for d in source.shape]
            stride = step.get("stride") or window
            dilation = step.get("dilation") or (1,) * len(window)
            pads = resolve_pads(step["pad"], tuple(x[2:]), window, stride, dilation)
            padded = x[:2] + [m + b + a for m, (b, a) in zip(x[2:], pads)]
            extents = [effective_kernel(k, r) for k, r in zip(window, dilation)]
            if max(padded[2:] + extents) > MAX_EXTENT:
                raise ConvDSLInputError(
                    f"{what} would pad its input to {_shape_text(padded)} with a window extent of "
                    f"{_shape_text(extents)} {sizes}: beyond 2^31 - 1 along a dim", node.span)
            tensors.append(("padded input", padded))
    for role, shape in tensors:
        numel = 1
        for d in shape:
            numel *= d
        if numel > limit:
            raise ConvDSLInputError(
                f"{what} would make a{'n' if role[0] == 'o' else ''} {role} of shape "
                f"{_shape_text(shape)} ({numel:,} elements) {sizes}: more than the {limit:,} "
                f"one tensor may hold (CONVDSL_MAX_TENSOR_ELEMENTS)", node.span)


def _windowed(node, attrs: dict, ins: list[TensorType], types: list[TensorType]):
    """(attributes, input type) of each windowed op the node computes: itself,
    or the steps of a fused node (operands `in<k>`: the node's k-th input;
    `s<j>`: step j's result, which is result j + 1, or result 0 for the last)."""
    if node.op != "_fused":
        if node.op in WINDOWED_OPS and ins:
            yield attrs, ins[0]
        return
    steps = attrs.get("steps") or ()
    for step in steps:
        if step.get("op") not in WINDOWED_OPS or not step.get("operands"):
            continue
        operand = step["operands"][0]
        if operand.startswith("in"):
            yield step["attrs"], ins[int(operand[2:])]
        else:
            j = int(operand[1:])
            yield step["attrs"], types[0 if j == len(steps) - 1 else j + 1]


def _concrete_type(t: TensorType, sym_env) -> TensorType:
    import sympy

    return TensorType(t.dtype, tuple(sympy.Integer(evaluate(d, sym_env)) for d in t.shape))
