"""The abstract syntax tree: plain dataclasses, each node with its source span."""
from __future__ import annotations

from dataclasses import dataclass, field

from .errors import Span


@dataclass
class Expr:
    span: Span


@dataclass
class Name(Expr):
    """A bare (possibly dotted) name: a binding, a table, a layer or an enum word."""

    parts: tuple[str, ...]

    @property
    def text(self) -> str:
        return ".".join(self.parts)


@dataclass
class IntLit(Expr):
    value: int


@dataclass
class FloatLit(Expr):
    value: float


@dataclass
class BoolLit(Expr):
    value: bool


@dataclass
class StringLit(Expr):
    value: str


@dataclass
class TupleLit(Expr):
    items: list[Expr]


@dataclass
class ListLit(Expr):
    items: list[Expr]


@dataclass
class KeywordArg:
    name: str
    value: Expr
    span: Span  # the keyword itself


@dataclass
class Call(Expr):
    func: str
    func_span: Span
    args: list[Expr]
    kwargs: list[KeywordArg]


@dataclass
class Binary(Expr):
    op: str  # "+", "-" or "*"
    left: Expr
    right: Expr


@dataclass
class Negate(Expr):
    operand: Expr


@dataclass
class Target:
    name: str
    span: Span


@dataclass
class Assign:
    targets: list[Target]
    value: Expr
    span: Span


@dataclass
class Return:
    values: list[Expr]
    span: Span


Statement = Assign | Return


@dataclass
class Dim:
    value: int | str  # an integer size or a symbol such as N
    span: Span


@dataclass
class NetInput:
    name: str
    dtype: str
    dtype_span: Span
    dims: list[Dim]
    span: Span


@dataclass
class TableDef:
    name: str
    rows: ListLit
    span: Span


@dataclass
class BlockParam:
    name: str
    default: Expr | None
    span: Span


@dataclass
class BlockDef:
    name: str
    shared: bool
    params: list[BlockParam]
    body: list[Statement]
    span: Span
    body_span: Span


@dataclass
class NetDef:
    name: str
    inputs: list[NetInput]
    body: list[Statement]
    span: Span
    body_span: Span


@dataclass
class Program:
    filename: str
    source: str
    tables: dict[str, TableDef] = field(default_factory=dict)
    blocks: dict[str, BlockDef] = field(default_factory=dict)
    nets: dict[str, NetDef] = field(default_factory=dict)
