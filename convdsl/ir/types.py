"""Tensor types with symbolic dims (sympy), and helpers for dim arithmetic."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

Dim = sympy.Expr

DTYPES = ("f32", "f16", "bf16")


@functools.lru_cache(maxsize=None)
def symbol(name: str) -> sympy.Symbol:
    """Sizes are positive integers; telling sympy so keeps expressions simple."""
    return sympy.Symbol(name, integer=True, positive=True)


def dim(value) -> Dim:
    if isinstance(value, sympy.Expr):
        return value
    if isinstance(value, str):
        return symbol(value)
    return sympy.Integer(int(value))


def is_static(d: Dim) -> bool:
    return bool(d.is_Integer)


def static_value(d: Dim) -> int | None:
    return int(d) if d.is_Integer else None


def dims_equal(a: Dim, b: Dim) -> bool:
    if a == b:
        return True
    return sympy.simplify(a - b) == 0


def show_dim(d: Dim) -> str:
    return str(d).replace("floor", "floor").replace(" ", "")


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def spatial(self) -> tuple[Dim, ...]:
        return self.shape[2:]

    @property
    def channels(self) -> int | None:
        return static_value(self.shape[1]) if self.rank > 1 else None

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": [str(d) for d in self.shape]}


def evaluate(expr, env: dict) -> int:
    """A dim (or any sympy expression over size symbols) at concrete sizes."""
    if isinstance(expr, int):
        return expr
    if expr.is_Integer:
        return int(expr)
    value = expr.subs(env)
    if not value.is_number:
        raise KeyError(f"unbound size symbol in {expr}")
    return int(value)


def concretize(value, env: dict):
    """Replace every sympy expression inside nested tuples/lists/dicts by an int."""
    if isinstance(value, sympy.Basic):
        return evaluate(value, env)
    if isinstance(value, tuple):
        return tuple(concretize(v, env) for v in value)
    if isinstance(value, list):
        return [concretize(v, env) for v in value]
    if isinstance(value, dict):
        return {k: concretize(v, env) for k, v in value.items()}
    return value


def has_symbols(value) -> bool:
    if isinstance(value, sympy.Basic):
        return bool(value.free_symbols)
    if isinstance(value, (tuple, list)):
        return any(has_symbols(v) for v in value)
    if isinstance(value, dict):
        return any(has_symbols(v) for v in value.values())
    return False
