"""AST → IR: inline blocks, resolve names, convert arguments, infer shapes,
declare parameters with the names of LANGUAGE.md §5.

Blocks are macros: a call evaluates its tensor arguments once in the caller
and binds every other argument (a number, an enum word, an initializer, a
table) as an unevaluated expression, so `pad=p` or `init=i` inside the block
mean what they would have meant at the call site.
"""
from __future__ import annotations

import difflib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

from . import ast
from .errors import ConvDSLError, ConvDSLWarning, Span
from .ir import Graph, ParamDecl, TensorType, ValueRef
from .ir.types import DTYPES, dim, symbol
from .limits import (
    INT_MAX,
    MAX_BLOCK_DEPTH,
    MAX_EXTENT,
    MAX_GABOR_BANK,
    max_param_elements,
    stack_room,
)
from .ops import OPS, OpDef, ShapeContext
from .ops.base import REQUIRED
from .ops.inits import INITS, KERNEL_INITS, default_init
from .ops.inits import REQUIRED as INIT_REQUIRED

LAYER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


# -- values the evaluator passes around -----------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    ref: ValueRef
    type: TensorType


@dataclass(frozen=True)
class Word:
    """A bare name that is not bound: an enum value (same), a table, a layer, a symbol."""

    text: str
    span: Span


@dataclass(frozen=True)
class InitCall:
    name: str
    args: tuple
    kwargs: tuple  # ((name, value), ...)
    span: Span


@dataclass
class Deferred:
    """A non-tensor block argument, evaluated where it is used, in the caller's scope."""

    expr: ast.Expr
    scope: Scope


@dataclass
class Binding:
    value: Any
    ssa: str
    span: Span
    used: bool = False
    kind: str = "binding"  # binding, input, parameter


@dataclass
class Scope:
    prefix: str  # layer-name prefix: "" in a net, "r." in a plain block call bound to r
    block: ast.BlockDef | None = None
    names: dict[str, Binding] = field(default_factory=dict)
    ssa_counts: dict[str, int] = field(default_factory=dict)
    stack: tuple[str, ...] = ()  # block calls in progress, for recursion errors
    shared_root: str | None = None  # the innermost enclosing shared block, if any
    all_bindings: list[Binding] = field(default_factory=list)

    def bind(self, name: str, value, span: Span, kind: str = "binding") -> Binding:
        count = self.ssa_counts.get(name, 0) + 1
        self.ssa_counts[name] = count
        binding = Binding(value, self.ssa_name(name, count), span, kind=kind)
        self.names[name] = binding
        self.all_bindings.append(binding)
        return binding

    def next_ssa(self, name: str) -> str:
        return self.ssa_name(name, self.ssa_counts.get(name, 0) + 1)

    @staticmethod
    def ssa_name(name: str, count: int) -> str:
        return name if count == 1 else f"{name}_{count}"

    def lookup(self, name: str) -> Binding | None:
        binding = self.names.get(name)
        if binding is not None:
            binding.used = True
        return binding


@dataclass
class LayerRecord:
    op: str
    params: dict[str, str]  # role → param name
    span: Span
    shared_key: str | None  # the enclosing shared block, for shared-block layers
    attrs: dict = field(default_factory=dict)  # the op's attributes, for share= checks


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class NetBuilder:
    def __init__(self, program: ast.Program, net: ast.NetDef):
        self.program = program
        self.net = net
        self.graph = Graph(net.name, net.span)
        self.layers: dict[str, LayerRecord] = {}
        self.warnings: list[ConvDSLWarning] = []
        self._block_has_layers: dict[str, bool] = {}
        self._param_elements = 0  # elements of every parameter tensor declared so far
        self._max_param_elements = max_param_elements()

    # == entry point ========================================================================
    def build(self) -> Graph:
        scope = Scope(prefix="")
        for inp in self.net.inputs:
            self._declare_input(inp, scope)
        results = self._run_body(self.net.body, self.net.body_span, scope, f"net '{self.net.name}'")
        self.graph.outputs = [r.ref for r in results]
        return self.graph

    # == inputs =============================================================================
    def _declare_input(self, inp: ast.NetInput, scope: Scope) -> None:
        if inp.dtype not in DTYPES:
            hint = difflib.get_close_matches(inp.dtype, DTYPES, 1)
            raise ConvDSLError(f"unknown dtype '{inp.dtype}'; use {', '.join(DTYPES)}"
                               + (f" (did you mean {hint[0]}?)" if hint else ""), inp.dtype_span)
        if not 2 <= len(inp.dims) <= 5:
            raise ConvDSLError(f"input '{inp.name}' has {_plural(len(inp.dims), 'dim')}; inputs are "
                               f"[batch, channels] or [batch, channels, 1 to 3 spatial dims]",
                               inp.span)
        if inp.name in scope.names:
            raise ConvDSLError(f"input '{inp.name}' is declared twice", inp.span)
        self._check_binding_name(inp.name, inp.span)
        shape = []
        for axis, d in enumerate(inp.dims):
            if isinstance(d.value, str):
                if axis == 1:
                    raise ConvDSLError(f"the channel dim of '{inp.name}' must be an integer, not "
                                       f"'{d.value}' (channel counts are fixed; sizes may vary)",
                                       d.span)
                self.graph.symbols.setdefault(d.value, (inp.name, axis))
                shape.append(symbol(d.value))
            else:
                if d.value < 1:
                    raise ConvDSLError(f"dims must be >= 1, got {d.value}", d.span)
                shape.append(dim(d.value))
        ttype = TensorType(inp.dtype, tuple(shape))
        node = self.graph.add("_input", [], {"name": inp.name, "type": ttype}, [ttype], inp.span,
                              binding=inp.name)
        self.graph.inputs.append(node.id)
        scope.bind(inp.name, Tensor(ValueRef(node.id), ttype), inp.span, kind="input")

    # == bodies =============================================================================
    def _run_body(self, body, body_span: Span, scope: Scope, what: str) -> list[Tensor]:
        results = None
        for stmt in body:
            if results is not None:
                raise ConvDSLError("statement after return; return must come last", stmt.span)
            if isinstance(stmt, ast.Assign):
                self._assign(stmt, scope)
            else:
                results = self._return(stmt, scope)
        if results is None:
            end = Span(body_span.filename, body_span.end_line, max(body_span.end_column - 1, 1),
                       body_span.end_line, body_span.end_column, body_span.source)
            raise ConvDSLError(f"{what} has no return statement; end it with 'return <value>'", end)
        for binding in scope.all_bindings:
            if not binding.used and isinstance(binding.value, Tensor):
                what_is = {"input": "input", "parameter": "block argument"}.get(binding.kind,
                                                                               "result")
                self.warnings.append(ConvDSLWarning(
                    f"{what_is} '{binding.ssa}' is never used", binding.span))
        return results

    def _check_binding_name(self, name: str, span: Span) -> None:
        if name in OPS and not name.startswith("_"):
            raise ConvDSLError(f"'{name}' is an op name; a binding may not shadow it", span)
        if name in self.program.blocks:
            raise ConvDSLError(f"'{name}' is a block name; a binding may not shadow it", span)

    def _assign(self, stmt: ast.Assign, scope: Scope) -> None:
        for target in stmt.targets:
            self._check_binding_name(target.name, target.span)
        base = scope.next_ssa(stmt.targets[0].name)
        naming = self._plan_names(stmt.value, scope, lambda kind: base)
        value = self._eval(stmt.value, scope, naming)
        targets = stmt.targets
        if isinstance(value, list):
            if len(targets) != len(value):
                raise ConvDSLError(f"this gives {_plural(len(value), 'result')} but "
                                   f"{_plural(len(targets), 'name')} "
                                   f"receive{'s' if len(targets) == 1 else ''} them", stmt.span)
            for target, item in zip(targets, value):
                self._bind_target(scope, target, item)
        else:
            if len(targets) != 1:
                raise ConvDSLError(f"this gives one result but {len(targets)} names receive it",
                                   stmt.span)
            self._bind_target(scope, targets[0], value)

    def _bind_target(self, scope: Scope, target: ast.Target, value) -> None:
        binding = scope.bind(target.name, value, target.span)
        if isinstance(value, Tensor):
            node = self.graph.node(value.ref.node)
            if node.binding is None and node.op != "_input":
                node.binding = binding.ssa

    def _return(self, stmt: ast.Return, scope: Scope) -> list[Tensor]:
        naming = self._plan_names(ast.TupleLit(stmt.span, stmt.values), scope, lambda kind: kind)
        results = []
        for expr in stmt.values:
            value = self._eval(expr, scope, naming)
            results.append(self._as_tensor(value, expr, "return"))
        return results

    # == naming (LANGUAGE.md §5) =============================================================
    def _plan_names(self, expr: ast.Expr, scope: Scope, base_of) -> dict[int, str]:
        """Layer names of the parametric ops in one statement, in source order.

        `base_of(kind)` gives the statement's name: the (SSA) target of an
        assignment, or the op/block name itself in a `return`."""
        items: list[ast.Call] = []
        self._collect_layers(expr, scope, items)
        items.sort(key=lambda c: (c.span.line, c.span.column))
        groups: dict[str, list[ast.Call]] = {}
        for call in items:
            groups.setdefault(base_of(call.func), []).append(call)
        naming = {}
        for base, calls in groups.items():
            for index, call in enumerate(calls):
                naming[id(call)] = base if len(calls) == 1 else f"{base}.{index}"
        return naming

    def _collect_layers(self, expr, scope: Scope, items: list) -> None:
        if isinstance(expr, ast.Call):
            op = OPS.get(expr.func)
            block = self.program.blocks.get(expr.func)
            is_layer = op is not None and op.parametric
            if is_layer or (block is not None and not block.shared
                            and self._has_layers(block, scope.stack)):
                items.append(expr)
            for arg in expr.args:
                self._collect_layers(arg, scope, items)
            for kw in expr.kwargs:
                self._collect_layers(kw.value, scope, items)
        elif isinstance(expr, ast.Binary):
            self._collect_layers(expr.left, scope, items)
            self._collect_layers(expr.right, scope, items)
        elif isinstance(expr, ast.Negate):
            self._collect_layers(expr.operand, scope, items)
        elif isinstance(expr, (ast.TupleLit, ast.ListLit)):
            for item in expr.items:
                self._collect_layers(item, scope, items)

    def _has_layers(self, block: ast.BlockDef, stack: tuple[str, ...]) -> bool:
        if block.name in self._block_has_layers:
            return self._block_has_layers[block.name]
        if block.name in stack or len(stack) >= MAX_BLOCK_DEPTH:
            return False  # recursion and depth are reported when the call is evaluated
        found: list = []
        inner = Scope(prefix="", stack=stack + (block.name,))
        for stmt in block.body:
            exprs = [stmt.value] if isinstance(stmt, ast.Assign) else stmt.values
            for e in exprs:
                self._collect_layers(e, inner, found)
        calls_shared = any(self.program.blocks.get(c.func) is not None for c in found)
        result = bool(found) or calls_shared
        self._block_has_layers[block.name] = result
        return result

    # == expressions ========================================================================
    def _eval(self, expr: ast.Expr, scope: Scope, naming: dict):
        """Evaluate in a tensor-or-constant position: returns Tensor, list[Tensor], or a constant."""
        if isinstance(expr, ast.Call):
            if expr.func in OPS and not expr.func.startswith("_"):
                return self._op_call(expr, scope, naming)
            if expr.func in self.program.blocks:
                return self._block_call(expr, self.program.blocks[expr.func], scope, naming)
            if expr.func in INITS:
                raise ConvDSLError(f"{expr.func}(...) is an initializer; use it as "
                                   f"init={expr.func}(...) on a layer", expr.func_span)
            if expr.func in self.program.nets:
                raise ConvDSLError(f"'{expr.func}' is a net; nets cannot be called (make it a block)",
                                   expr.func_span)
            raise ConvDSLError(f"unknown op '{expr.func}'" + self._suggest(expr.func),
                               expr.func_span)
        if isinstance(expr, ast.Name):
            return self._name_value(expr, scope, naming)
        if isinstance(expr, ast.Binary):
            return self._binary(expr, scope, naming)
        if isinstance(expr, ast.Negate):
            operand = self._eval(expr.operand, scope, naming)
            if isinstance(operand, Tensor):
                return self._scalar_op(operand, -1.0, "*", False, expr.span)
            return _in_range(-self._number(operand, expr.operand), expr.span)
        return self._const(expr, scope)

    def _suggest(self, name: str) -> str:
        known = OPS.user_facing() + sorted(self.program.blocks)
        close = difflib.get_close_matches(name, known, 1)
        return f"; did you mean '{close[0]}'?" if close else ""

    def _name_value(self, expr: ast.Name, scope: Scope, naming: dict):
        if len(expr.parts) == 1:
            binding = scope.lookup(expr.parts[0])
            if binding is not None:
                value = binding.value
                if isinstance(value, Deferred):
                    return self._eval(value.expr, value.scope, {})
                return value
        raise ConvDSLError(f"unknown name '{expr.text}'" + self._suggest_name(expr.text, scope),
                           expr.span)

    def _suggest_name(self, name: str, scope: Scope) -> str:
        close = difflib.get_close_matches(name, list(scope.names), 1)
        return f"; did you mean '{close[0]}'?" if close else ""

    def _binary(self, expr: ast.Binary, scope: Scope, naming: dict):
        left = self._eval(expr.left, scope, naming)
        right = self._eval(expr.right, scope, naming)
        lt, rt = isinstance(left, Tensor), isinstance(right, Tensor)
        if lt and rt:
            op = {"+": "_add", "-": "_sub", "*": "_mul"}[expr.op]
            return self._make_node(OPS[op], [left, right], {}, expr.span, {})[0]
        if lt or rt:
            tensor, const = (left, right) if lt else (right, left)
            number = self._number(const, expr.right if lt else expr.left)
            return self._scalar_op(tensor, number, expr.op, not lt, expr.span)
        a = self._number(left, expr.left)
        b = self._number(right, expr.right)
        return _in_range({"+": a + b, "-": a - b, "*": a * b}[expr.op], expr.span)

    def _number(self, value, expr: ast.Expr):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConvDSLError(f"expected a tensor or a number here, got {self._describe(value)}",
                               expr.span)
        return value

    def _scalar_op(self, tensor: Tensor, number, symbol_: str, scalar_first: bool, span: Span):
        if symbol_ == "-" and not scalar_first:
            symbol_, number = "+", -number
        attrs = {"scalar": float(number), "symbol": symbol_, "scalar_first": scalar_first}
        return self._make_node(OPS["_scalar"], [tensor], attrs, span, {})[0]

    def _as_tensor(self, value, expr: ast.Expr, what: str) -> Tensor:
        if isinstance(value, Tensor):
            return value
        if isinstance(value, list):
            raise ConvDSLError(f"this gives {_plural(len(value), 'result')}; bind them to names "
                               f"first (a, b = ...) and use one in {what}", expr.span)
        raise ConvDSLError(f"{what} needs a tensor, got {self._describe(value)}", expr.span)

    @staticmethod
    def _describe(value) -> str:
        if isinstance(value, Word):
            return f"the unknown name '{value.text}'"
        if isinstance(value, Tensor):
            return f"a tensor {value.type}"
        if isinstance(value, InitCall):
            return f"the initializer {value.name}(...)"
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return f"the string {_shorten(json.dumps(value))}"
        return _shorten(repr(value))

    # -- constants ---------------------------------------------------------------------------
    def _const(self, expr: ast.Expr, scope: Scope):
        """Evaluate in a constant position: numbers, tuples, lists, words, initializer calls."""
        if isinstance(expr, (ast.IntLit, ast.FloatLit, ast.BoolLit, ast.StringLit)):
            return expr.value
        if isinstance(expr, ast.TupleLit):
            return tuple(self._const(i, scope) for i in expr.items)
        if isinstance(expr, ast.ListLit):
            return [self._const(i, scope) for i in expr.items]
        if isinstance(expr, ast.Negate):
            return _in_range(-self._number(self._const(expr.operand, scope), expr.operand),
                             expr.span)
        if isinstance(expr, ast.Binary):
            a = self._number(self._const(expr.left, scope), expr.left)
            b = self._number(self._const(expr.right, scope), expr.right)
            return _in_range({"+": a + b, "-": a - b, "*": a * b}[expr.op], expr.span)
        if isinstance(expr, ast.Name):
            binding = scope.lookup(expr.parts[0]) if len(expr.parts) == 1 else None
            if binding is None:
                return Word(expr.text, expr.span)
            if isinstance(binding.value, Deferred):
                return self._const(binding.value.expr, binding.value.scope)
            return binding.value
        if isinstance(expr, ast.Call):
            if expr.func in OPS or expr.func in self.program.blocks:
                raise ConvDSLError(f"expected a constant here, not a call of '{expr.func}'",
                                   expr.span)
            if expr.func not in INITS:
                raise ConvDSLError(f"unknown initializer '{expr.func}'; known: "
                                   f"{', '.join(INITS)}", expr.func_span)
            return InitCall(expr.func, tuple(self._const(a, scope) for a in expr.args),
                            tuple((k.name, self._const(k.value, scope)) for k in expr.kwargs),
                            expr.span)
        raise ConvDSLError("unsupported expression", expr.span)

    # == op calls ===========================================================================
    def _bind_args(self, call: ast.Call, signature, what: str, variadic: bool = False):
        """Match positional and keyword arguments to a signature: name → expression(s)."""
        bound: dict[str, Any] = {}
        names = [a.name for a in signature]
        positional = list(call.args)
        if variadic:
            bound[names[0]] = positional
            positional = []
            names_left = names[1:]
        else:
            names_left = names
        if len(positional) > len(names_left):
            extra = positional[len(names_left)]
            raise ConvDSLError(f"{what} takes at most {_plural(len(names_left), 'positional argument')}",
                               extra.span)
        for name, expr in zip(names_left, positional):
            bound[name] = expr
        for kw in call.kwargs:
            if kw.name not in names:
                close = difflib.get_close_matches(kw.name, names, 1)
                raise ConvDSLError(f"{what} has no argument '{kw.name}'"
                                   + (f"; did you mean '{close[0]}'?" if close
                                      else f"; it takes {', '.join(names)}"), kw.span)
            if kw.name in bound:
                raise ConvDSLError(f"argument '{kw.name}' given twice", kw.span)
            bound[kw.name] = kw.value
        return bound

    def _op_call(self, call: ast.Call, scope: Scope, naming: dict):
        op = OPS[call.func]
        bound = self._bind_args(call, op.signature, call.func, op.variadic)
        tensors, attrs, spans, given = [], {}, {}, set()
        for arg in op.signature:
            expr = bound.get(arg.name)
            if arg.kind == "tensor":
                exprs = expr if op.variadic and arg is op.signature[0] else [expr]
                if op.variadic and not exprs:
                    raise ConvDSLError(f"{call.func} needs at least one tensor", call.span)
                for e in exprs:
                    if e is None:
                        raise ConvDSLError(f"{call.func} needs the tensor argument '{arg.name}'",
                                           call.span)
                    tensors.append(self._as_tensor(self._eval(e, scope, naming), e,
                                                   f"{call.func}'s '{arg.name}'"))
                continue
            if expr is None:
                if arg.default is REQUIRED:
                    raise ConvDSLError(f"{call.func} needs the argument '{arg.name}'", call.span)
                attrs[arg.name] = arg.default
                continue
            given.add(arg.name)
            spans[arg.name] = self._arg_span(call, arg.name, expr)
            attrs[arg.name] = self._convert(expr, arg, scope, call.func)
        layer_opts = {k: attrs.pop(k) for k in ("init", "trainable", "name", "share") if k in attrs}
        results = self._make_node(op, tensors, attrs, call.span, spans)
        if op.parametric:
            self._declare_layer(op, results, call, scope, naming, layer_opts, given, spans)
        return results if len(results) > 1 else results[0]

    @staticmethod
    def _arg_span(call: ast.Call, name: str, expr: ast.Expr) -> Span:
        return expr.span

    def _make_node(self, op: OpDef, tensors: list[Tensor], attrs: dict, span: Span,
                   spans: dict) -> list[Tensor]:
        ctx = ShapeContext(op.name, [t.type for t in tensors], attrs, span, spans)
        if op.normalize is not None:
            ctx.attrs = op.normalize(ctx)
        types = op.shape(ctx)
        node = self.graph.add(op.name, [t.ref for t in tensors], ctx.attrs, types, span)
        node.arg_spans = spans  # kept for re-running the shape rule in passes
        self._last_ctx = ctx
        return [Tensor(ValueRef(node.id, i), t) for i, t in enumerate(types)]

    # -- argument kinds (see ops.base.Arg) ---------------------------------------------------
    def _convert(self, expr: ast.Expr, arg, scope: Scope, opname: str):
        kind = arg.kind
        what = f"{opname}'s {arg.name}="
        if kind == "layer" and isinstance(expr, ast.Name):
            return (expr.text, expr.span)  # a layer name, even where a tensor has that name
        value = self._const(expr, scope)
        if kind == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConvDSLError(f"{what} must be an integer, got {self._describe(value)}",
                                   expr.span)
            return _extent(value, expr, what)
        if kind == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConvDSLError(f"{what} must be a number, got {self._describe(value)}",
                                   expr.span)
            return float(value)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ConvDSLError(f"{what} must be true or false, got {self._describe(value)}",
                                   expr.span)
            return value
        if kind in ("spatial", "ints"):
            return self._int_tuple(value, expr, what, allow_list=kind == "ints")
        if kind == "pad":
            if isinstance(value, Word):
                return value.text
            if isinstance(value, (list, tuple)):
                return tuple(self._int_tuple(v, expr, what) for v in value)
            return self._int_tuple(value, expr, what)
        if kind == "enum":
            text = value.text if isinstance(value, Word) else value
            if not isinstance(text, str) or text not in arg.choices:
                raise ConvDSLError(f"{what} must be one of {', '.join(arg.choices)}; got "
                                   f"{self._describe(value)}", expr.span)
            return text
        if kind == "axis":
            if isinstance(value, Word) and value.text == "channel":
                return "channel"
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            raise ConvDSLError(f"{what} must be channel or an integer axis, got "
                               f"{self._describe(value)}", expr.span)
        if kind == "table":
            return self._table(value, expr, scope)
        if kind == "layer":
            text = value.text if isinstance(value, Word) else value
            if not isinstance(text, str) or not LAYER_NAME.match(text):
                raise ConvDSLError(f"{what} must name a layer, got {self._describe(value)}",
                                   expr.span)
            return (text, expr.span)
        if kind == "string":
            if not isinstance(value, str):
                raise ConvDSLError(f'{what} must be a string like "enc1", got '
                                   f"{self._describe(value)}", expr.span)
            return value
        if kind == "init":
            return self._init_spec(value, expr)
        if kind == "size":
            items = value if isinstance(value, (tuple, list)) else (value,)
            sizes = []
            for v in items:
                if isinstance(v, Word) and v.text in self.graph.symbols:
                    sizes.append(symbol(v.text))
                elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
                    sizes.append(_extent(v, expr, what))
                else:
                    raise ConvDSLError(f"{what} takes sizes >= 1 or size symbols of the net's "
                                       f"inputs, got {self._describe(v)}", expr.span)
            return tuple(sizes) if isinstance(value, (tuple, list)) else sizes[0]
        raise AssertionError(f"unknown argument kind {kind}")

    def _int_tuple(self, value, expr, what, allow_list=False):
        if isinstance(value, int) and not isinstance(value, bool):
            return _extent(value, expr, what)
        if isinstance(value, (tuple, list)) and value and all(
                isinstance(v, int) and not isinstance(v, bool) for v in value):
            return tuple(_extent(v, expr, what) for v in value)
        raise ConvDSLError(f"{what} must be an integer or a tuple of integers, got "
                           f"{self._describe(value)}", expr.span)

    def _table(self, value, expr, scope: Scope):
        rows_expr = value
        if isinstance(value, Word):
            table = self.program.tables.get(value.text)
            if table is None:
                raise ConvDSLError(f"unknown table '{value.text}'", expr.span)
            rows_expr = self._const(table.rows, scope)
            expr = table.rows
        if not isinstance(rows_expr, list) or not all(isinstance(r, list) for r in rows_expr):
            raise ConvDSLError("a connection table is a list of rows, each a list of input "
                               "channels, e.g. [[0, 1], [1, 2]]", expr.span)
        for row in rows_expr:
            if not all(isinstance(c, int) and not isinstance(c, bool) for c in row):
                raise ConvDSLError("connection table entries must be channel numbers", expr.span)
        return tuple(tuple(r) for r in rows_expr)

    def _init_spec(self, value, expr) -> tuple[str, dict, Span]:
        if isinstance(value, Word):
            name, args, kwargs = value.text, (), ()
        elif isinstance(value, InitCall):
            name, args, kwargs = value.name, value.args, value.kwargs
        else:
            raise ConvDSLError(f"init= takes an initializer such as he, xavier or normal(0.1); got "
                               f"{self._describe(value)}", expr.span)
        if name not in INITS:
            close = difflib.get_close_matches(name, list(INITS), 1)
            raise ConvDSLError(f"unknown initializer '{name}'"
                               + (f"; did you mean '{close[0]}'?" if close
                                  else f"; known: {', '.join(INITS)}"), expr.span)
        spec = INITS[name]
        if len(args) > len(spec):
            raise ConvDSLError(f"init={name} takes at most {_plural(len(spec), 'argument')}",
                               expr.span)
        out = {}
        for (pname, default), v in zip(spec, args):
            out[pname] = v
        for k, v in kwargs:
            if k not in dict(spec):
                raise ConvDSLError(f"init={name} has no argument '{k}'", expr.span)
            out[k] = v
        for pname, default in spec:
            if pname not in out:
                if default is INIT_REQUIRED:
                    raise ConvDSLError(f"init={name} needs the argument '{pname}'", expr.span)
                out[pname] = default
        for pname, v in out.items():
            ok = v is None or isinstance(v, (int, float, list, tuple)) and not isinstance(v, bool)
            if isinstance(v, (list, tuple)):
                ok = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in v)
                out[pname] = [float(e) for e in v]
            if not ok:
                raise ConvDSLError(f"init={name}: {pname} must be a number or a list of numbers",
                                   expr.span)
        _check_init_values(name, out, expr.span)
        return (name, out, expr.span)

    # == layers and parameters ==============================================================
    def _declare_layer(self, op: OpDef, results, call: ast.Call, scope: Scope, naming: dict,
                       opts: dict, given: set, spans: dict) -> None:
        node = self.graph.node(results[0].ref.node)
        ctx = self._last_ctx
        if opts.get("name") is not None:
            if not LAYER_NAME.match(opts["name"]):
                raise ConvDSLError(f'name={json.dumps(opts["name"])} is not a layer name: use identifiers '
                                   f"joined by '.', like \"enc1\" or \"enc.conv\"", spans["name"])
            local = opts["name"]
        else:
            local = naming.get(id(call), call.func)
        layer = scope.prefix + local
        node.layer = layer
        shapes = op.params(ctx, node.types)
        # Every call of a shared block (and of plain blocks inside it) gives its
        # layers the same names; within one shared block a name is one layer.
        shared_key = scope.shared_root

        existing = self.layers.get(layer)
        if existing is not None:
            if shared_key is not None and existing.shared_key == shared_key:
                self._reuse_shared(layer, existing, shapes, node, call)
                return
            raise ConvDSLError(f"layer name '{layer}' is already used (line "
                               f"{existing.span.line}); names must be unique — give one "
                               f'name="..."', spans.get("name", call.func_span))

        init = opts.get("init") or (*default_init(op.name), None)
        self._check_init(op, node, init, spans)
        share = opts.get("share")
        params: dict[str, str] = {}
        if share is not None:
            if "init" in given:
                raise ConvDSLError("init= has no effect on a layer that shares another's "
                                   "parameters (share=)", spans["init"])
            params = self._shared_params(op, layer, share, shapes, node, scope)
        for role, shape in shapes.items():
            if role in params:
                continue
            decl = ParamDecl(
                name=f"{layer}.{role}", shape=tuple(int(s) for s in shape.shape),
                init=("zeros", {}) if shape.is_bias else (init[0], init[1]),
                trainable=opts.get("trainable", True), layer=layer, role=role, span=call.span,
                fan_in=shape.fan_in, fan_out=shape.fan_out, mask=shape.mask,
                count=shape.count if shape.count is not None else _prod(shape.shape),
            )
            self._count_elements(decl)
            if role.startswith("weight_"):
                decl.separable_rank = len(node.attrs["kernel"])
                decl.separable_sizes = tuple(node.attrs["kernel"])
            self.graph.params[decl.name] = decl
            params[role] = decl.name
        node.params = params
        self.layers[layer] = LayerRecord(op.name, params, call.span, shared_key, dict(node.attrs))

    def _count_elements(self, decl: ParamDecl) -> None:
        size = _prod(decl.shape)
        self._param_elements += size
        if self._param_elements > self._max_param_elements:
            shape = "[" + ", ".join(map(str, decl.shape)) + "]"
            raise ConvDSLError(
                f"parameter {decl.name} of shape {shape} has {size:,} elements, which brings the "
                f"net to {self._param_elements:,}: more than the {self._max_param_elements:,} "
                f"allowed ({self._max_param_elements * 4 / 2**30:.0f} GiB as f32); shrink the "
                f"layer, or raise the bound with CONVDSL_MAX_PARAMS", decl.span)

    def _check_init(self, op: OpDef, node, init, spans) -> None:
        name = init[0]
        span = spans.get("init", node.span)
        if name in KERNEL_INITS and op.name not in ("conv", "depthwise"):
            raise ConvDSLError(f"init={name} draws conv kernels; it works on conv and depthwise "
                               f"layers, not {op.name}", span)
        separable = node.attrs.get("separable")
        if separable and name in ("edges", "gabor", "kmeans"):
            raise ConvDSLError(f"init={name} makes kernels that are not outer products; it cannot "
                               f"initialize a separable=true conv", span)
        sigma = init[1].get("sigma") if name == "gaussian" else None
        if isinstance(sigma, list) and len(sigma) != len(node.attrs["kernel"]):
            raise ConvDSLError(f"init=gaussian: give one sigma, or one per spatial dim "
                               f"({len(node.attrs['kernel'])}), not {len(sigma)}", span)
        if name == "gabor" and len(node.attrs["kernel"]) == 3:
            raise ConvDSLError("init=gabor needs a 1-D or 2-D kernel (Gabor functions are defined "
                               "on lines and planes)", span)

    def _reuse_shared(self, layer, existing: LayerRecord, shapes, node, call) -> None:
        for role, shape in shapes.items():
            decl = self.graph.params[existing.params[role]]
            if tuple(decl.shape) != tuple(int(s) for s in shape.shape):
                raise ConvDSLError(
                    f"shared block call gives {decl.name} the shape {list(shape.shape)}, but an "
                    f"earlier call gave it {list(decl.shape)}: every call of a shared block must "
                    f"use the same channel counts", call.span)
        node.params = dict(existing.params)

    def _shared_params(self, op: OpDef, layer: str, share, shapes, node, scope: Scope) -> dict:
        text, span = share
        target = None
        for candidate in (scope.prefix + text, text):
            if candidate in self.layers:
                target = candidate
                break
        if target is None:
            known = ", ".join(sorted(self.layers)) or "none yet"
            raise ConvDSLError(f"share={text}: no layer '{text}' is defined before this one "
                               f"(layers so far: {known})", span)
        owner = self.layers[target]
        if op.name == "deconv" and owner.op in ("conv", "depthwise"):
            # The tied transpose: deconv's [in, out, k] is conv's [out, in, k]
            # when the conv applies its weight as it is.
            applied = [("connect=", owner.attrs.get("table") is not None),
                       ("groups=", owner.attrs.get("groups", 1) != 1),
                       ("flip=true", owner.attrs.get("flip")),
                       ("separable=true", owner.attrs.get("separable"))]
            for what, present in applied:
                if present:
                    raise ConvDSLError(f"share={text}: a deconv can only tie to a plain conv; "
                                       f"'{target}' uses {what}, so its weight is not the kernel "
                                       f"it applies", span)
            roles = ["weight"]
        elif op.name == owner.op:
            if owner.attrs.get("table") != node.attrs.get("table"):
                raise ConvDSLError(f"share={text}: '{target}' holds its weight to a connection "
                                   f"table; a layer sharing it must use the same connect= table",
                                   span)
            roles = list(shapes)
            if set(roles) != set(owner.params):
                raise ConvDSLError(f"share={text}: '{target}' has parameters "
                                   f"{sorted(owner.params)} but this layer needs {sorted(roles)}",
                                   span)
        else:
            raise ConvDSLError(f"share={text}: a {op.name} cannot share the parameters of a "
                               f"{owner.op} ('{target}')", span)
        params = {}
        for role in roles:
            if role not in owner.params:
                raise ConvDSLError(f"share={text}: '{target}' has no {role}", span)
            decl = self.graph.params[owner.params[role]]
            want = tuple(int(s) for s in shapes[role].shape)
            if tuple(decl.shape) != want:
                raise ConvDSLError(f"share={text}: {decl.name} has shape {list(decl.shape)} but "
                                   f"this layer needs {role} of shape {list(want)}", span)
            params[role] = decl.name
        return params

    # == blocks =============================================================================
    def _block_call(self, call: ast.Call, block: ast.BlockDef, scope: Scope, naming: dict):
        if block.name in scope.stack:
            chain = " -> ".join(scope.stack[scope.stack.index(block.name):] + (block.name,))
            raise ConvDSLError(f"block '{block.name}' calls itself ({chain}); recursion is not "
                               f"allowed", call.func_span)
        if len(scope.stack) >= MAX_BLOCK_DEPTH:
            raise ConvDSLError(f"block calls nest more than {MAX_BLOCK_DEPTH} deep here "
                               f"({scope.stack[0]} -> ... -> {scope.stack[-1]} -> {block.name}); "
                               f"flatten some blocks into their callers", call.func_span)
        signature = [_BlockArg(p.name, p.default) for p in block.params]
        bound = self._bind_args(call, signature, f"block {block.name}")
        if block.shared:
            prefix = f"{block.name}."
        else:
            prefix = scope.prefix + naming.get(id(call), block.name) + "."
        root = block.name if block.shared else scope.shared_root
        inner = Scope(prefix=prefix, block=block, stack=scope.stack + (block.name,),
                      shared_root=root)
        empty = Scope(prefix=prefix, block=block, stack=inner.stack, shared_root=root)
        for param in block.params:
            expr = bound.get(param.name)
            if expr is None:
                if param.default is None:
                    raise ConvDSLError(f"block {block.name} needs the argument '{param.name}'",
                                       call.span)
                value = Deferred(param.default, empty)
            elif self._is_tensor_expr(expr, scope):
                value = self._eval(expr, scope, naming)
                if not isinstance(value, Tensor):
                    value = self._as_tensor(value, expr, f"block {block.name}'s '{param.name}'")
            else:
                value = Deferred(expr, scope)
            inner.bind(param.name, value, param.span, kind="parameter")
        results = self._run_body(block.body, block.body_span, inner, f"block '{block.name}'")
        return results if len(results) > 1 else results[0]

    def _is_tensor_expr(self, expr, scope: Scope) -> bool:
        if isinstance(expr, ast.Call):
            return expr.func in OPS or expr.func in self.program.blocks
        if isinstance(expr, ast.Name) and len(expr.parts) == 1:
            binding = scope.names.get(expr.parts[0])
            if binding is None:
                return False
            if isinstance(binding.value, Deferred):
                return self._is_tensor_expr(binding.value.expr, binding.value.scope)
            return isinstance(binding.value, (Tensor, list))
        if isinstance(expr, ast.Binary):
            return self._is_tensor_expr(expr.left, scope) or self._is_tensor_expr(expr.right, scope)
        if isinstance(expr, ast.Negate):
            return self._is_tensor_expr(expr.operand, scope)
        return False


@dataclass(frozen=True)
class _BlockArg:
    name: str
    default: Any
    kind: str = "any"


def _check_init_values(name: str, args: dict, span: Span) -> None:
    """Refuse, with a span, what the initializers would refuse when the net is made."""
    def one(key):
        if isinstance(args[key], list):
            raise ConvDSLError(f"init={name}: {key} must be one number, not a list", span)
        return args[key]

    if name == "normal":
        one("mean")
        if one("std") < 0:
            raise ConvDSLError("init=normal: std must be >= 0", span)
    elif name == "uniform":
        if one("a") > one("b"):
            raise ConvDSLError(f"init=uniform(a, b) needs a <= b, got a={args['a']}, "
                               f"b={args['b']}", span)
    elif name == "gaussian":
        sigmas = args["sigma"] if isinstance(args["sigma"], list) else [args["sigma"]]
        if not sigmas or not all(s > 0 for s in sigmas):
            raise ConvDSLError("init=gaussian: sigma must be > 0", span)
    elif name == "gabor":
        bank = 1
        for key, default in (("orientations", 4), ("frequencies", 2), ("phases", 2)):
            value = args[key]
            if value is None:
                bank *= default
            elif isinstance(value, list):
                if not value:
                    raise ConvDSLError(f"init=gabor: the {key} list is empty", span)
                if key == "frequencies" and min(value) < 0:
                    raise ConvDSLError("init=gabor: frequencies must be >= 0", span)
                bank *= len(value)
            elif isinstance(value, float) or value < 1:
                raise ConvDSLError(f"init=gabor: {key} takes a count >= 1 or a list of "
                                   f"values, got {value}", span)
            else:
                bank *= value
            if bank > MAX_GABOR_BANK:
                raise ConvDSLError(f"init=gabor: the bank would hold more than "
                                   f"{MAX_GABOR_BANK:,} filters; use smaller counts", span)


def _extent(value: int, expr: ast.Expr, what: str) -> int:
    """Sizes, channels and geometry fit the int32 index arithmetic of the kernels."""
    if value > MAX_EXTENT:
        raise ConvDSLError(f"{what} {value} is too large: sizes and counts are at most "
                           f"2^31 - 1 = {MAX_EXTENT:,}", expr.span)
    return value


def _in_range(value, span: Span):
    """Constant arithmetic stays where literals are: finite floats, int64 ints."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConvDSLError(f"this constant evaluates to {value}, which is not a finite number",
                           span)
    if isinstance(value, int) and not -INT_MAX - 1 <= value <= INT_MAX:
        raise ConvDSLError("this constant is too large: integers must fit in 64 bits "
                           "(at most 2^63 - 1)", span)
    return value


def _shorten(text: str, limit: int = 80) -> str:
    """Keep messages about huge literals (a 500-deep tuple) readable."""
    return text if len(text) <= limit else text[:limit - 5] + " ... " + text[-5:]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def build_graph(program: ast.Program, net: ast.NetDef) -> tuple[Graph, list[ConvDSLWarning]]:
    builder = NetBuilder(program, net)
    with stack_room():  # the evaluator recurses once per nesting level and block call
        graph = builder.build()
    return graph, builder.warnings


def pick_net(program: ast.Program, name: str | None) -> ast.NetDef:
    if not program.nets:
        raise ConvDSLError(f"{program.filename} defines no net")
    if name is None:
        if len(program.nets) > 1:
            raise ConvDSLError(f"{program.filename} defines {len(program.nets)} nets "
                               f"({', '.join(program.nets)}); pick one with net=...")
        return next(iter(program.nets.values()))
    if name not in program.nets:
        raise ConvDSLError(f"no net named '{name}' in {program.filename}; it defines "
                           f"{', '.join(program.nets)}")
    return program.nets[name]


def emit_warnings(found: list[ConvDSLWarning]) -> None:
    for w in found:
        warnings.warn(w, stacklevel=3)
