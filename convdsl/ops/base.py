"""What an op is: its signature, shape rule, parameter rule and lowerings.

Each op of LANGUAGE.md §6 is one `OpDef` in the table (`convdsl.ops.OPS`).
The builder reads the signature to convert arguments, the shape rule gives
result types (on symbolic sizes at compile time, on concrete sizes when the
runtime checks an input), the parameter rule declares the state_dict entries,
and each backend lowers the op from the same entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConvDSLError, ConvDSLInputError, Span
from ..ir.types import TensorType

REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    """One argument of an op. `kind` says how the builder reads the expression:

    tensor     a tensor value               int, float, bool   a constant
    spatial    int or tuple of ints         pad        valid/same/full, int or tuple
    enum       one of `choices` (bare word) table      a table name or list of lists
    layer      a layer name (share=)        init       he, normal(0.1), gabor(...)
    string     a string literal             size       int/tuple of ints or size symbols
    ints       int or list of ints          axis       `channel` or an int
    """

    name: str
    kind: str
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()


# Arguments that every parametric op takes (LANGUAGE.md §6, first paragraph).
LAYER_ARGS = (
    Arg("init", "init", None),
    Arg("trainable", "bool", True),
    Arg("name", "string", None),
    Arg("share", "layer", None),
)


@dataclass(frozen=True)
class ParamShape:
    """A parameter an op needs, before it gets its layer name."""

    shape: tuple[int, ...]
    fan_in: int = 1
    fan_out: int = 1
    mask: Any = None  # connection table rows (weight entries outside stay zero)
    count: int | None = None  # real parameters; default prod(shape)
    is_bias: bool = False


@dataclass
class ShapeContext:
    """What a shape rule sees: operand types, attributes, and a way to complain.

    At compile time `runtime` is None and errors point at the argument's span.
    At run time (concrete sizes) errors become ConvDSLInputError naming the
    input sizes that made the layer invalid.
    """

    op: str
    inputs: list[TensorType]
    attrs: dict[str, Any]
    span: Span
    arg_spans: dict[str, Span] = field(default_factory=dict)
    runtime: str | None = None  # "for input 'x' with H=3": appended at run time

    def error(self, message: str, arg: str | None = None) -> ConvDSLError:
        span = self.arg_spans.get(arg, self.span) if arg else self.span
        if self.runtime is not None:
            return ConvDSLInputError(f"{message} {self.runtime}", span)
        return ConvDSLError(message, span)

    def value(self, name: str):
        return self.attrs[name]

    @property
    def x(self) -> TensorType:
        return self.inputs[0]

    @property
    def spatial_rank(self) -> int:
        return self.inputs[0].rank - 2


@dataclass(frozen=True)
class OpDef:
    name: str
    family: str  # conv, pool, activation, elementwise, structure, input
    args: tuple[Arg, ...]
    shape: Callable[[ShapeContext], list[TensorType]]
    normalize: Callable[[ShapeContext], dict] | None = None  # raw args → canonical attrs
    params: Callable[[ShapeContext, list[TensorType]], dict[str, ParamShape]] | None = None
    torch: Callable[..., Any] | None = None  # (inputs, attrs, params) → tensor or list
    variadic: bool = False  # the first positional takes every positional tensor (concat)
    parametric: bool = False
    results: Callable[[dict], int] = lambda attrs: 1
    doc: str = ""
    # The Triton kernel family that lowers it: a name, or (attrs, operand types) → name.
    triton: str | Callable[[dict, list], str] | None = None
    # The vector-Jacobian product: (VJPContext) → one gradient per operand, None
    # where there is none (see ops/vjp.py; attached there, after the backward ops exist).
    vjp: Callable[[Any], list] | None = None

    def triton_family(self, attrs: dict, inputs: list[TensorType]) -> str | None:
        return self.triton(attrs, inputs) if callable(self.triton) else self.triton

    @property
    def signature(self) -> tuple[Arg, ...]:
        return self.args + (LAYER_ARGS if self.parametric else ())


class OpTable:
    """The one table of op definitions; backends and passes look ops up here."""

    def __init__(self):
        self._ops: dict[str, OpDef] = {}

    def register(self, op: OpDef) -> OpDef:
        if op.name in self._ops:
            raise ValueError(f"op {op.name} registered twice")
        self._ops[op.name] = op
        return op

    def attach_vjp(self, name: str, rule: Callable) -> None:
        from dataclasses import replace

        self._ops[name] = replace(self._ops[name], vjp=rule)

    def __getitem__(self, name: str) -> OpDef:
        return self._ops[name]

    def __contains__(self, name: str) -> bool:
        return name in self._ops

    def get(self, name: str) -> OpDef | None:
        return self._ops.get(name)

    def names(self) -> list[str]:
        return sorted(self._ops)

    def user_facing(self) -> list[str]:
        """Ops a .cdsl program may call (internal ones start with an underscore)."""
        return [n for n in self.names() if not n.startswith("_")]


OPS = OpTable()
