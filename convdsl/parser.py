"""Source text → AST. Lark does the parsing; this module turns its tree into
`convdsl.ast` dataclasses and its exceptions into `ConvDSLError`s that say what
was expected in words."""
from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .errors import ConvDSLError, Span
from .limits import INT_MAX, MAX_NESTING, stack_room
from .resources import grammar_path

KEYWORDS = frozenset({"net", "block", "shared", "table", "return", "true", "false"})
DTYPES = ("f32", "f16", "bf16")

# Terminal names as a user would say them.
_TOKEN_WORDS = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a number", "STRING": "a string",
    "LPAR": "'('", "RPAR": "')'", "LSQB": "'['", "RSQB": "']'", "LBRACE": "'{'",
    "RBRACE": "'}'", "COMMA": "','", "COLON": "':'", "EQUAL": "'='", "DOT": "'.'",
    "ADD_OP": "'+' or '-'", "MUL_OP": "'*'", "MINUS": "'-'", "SHARED": "'shared'",
    "RETURN": "'return'", "NET": "'net'", "BLOCK": "'block'", "TABLE": "'table'",
    "TRUE": "'true'", "FALSE": "'false'", "$END": "the end of the file",
}

# Common mistakes, recognised by example (Lark's match_examples).
_MISTAKES = {
    "an input is declared as 'name: dtype[dims]', with ':' not '='": [
        "net A(x = f32[N, 1, 8, 8]) { return x }",
        "net A(x: f32[N], y = f32[N]) { return x }",
    ],
    "missing ',' between arguments": [
        "net A(x: f32[N, 1, 8]) { y = conv(x 3) return y }",
        "net A(x: f32[N, 1, 8]) { y = conv(x, 3 kernel=3) return y }",
        "net A(x: f32[N, 1, 8]) { y = conv(x, 3, kernel=3 stride=1) return y }",
        "net A(x: f32[N, 1, 8]) { y = conv(x, (3, 3) 2) return y }",
    ],
    "unclosed '(': missing ')'": [
        "net A(x: f32[N, 1, 8]) { y = conv(x, 3 }",
        "net A(x: f32[N, 1, 8]) { y = relu(conv(x, 3, kernel=3) return y }",
        "net A(x: f32[N, 1, 8]) { y = relu(conv(x, 3, kernel=3)\n z = relu(y) return z }",
        "net A(x: f32[N, 1, 8]) { return relu(x }",
    ],
    "unclosed '{': missing '}' at the end of the body": [
        "net A(x: f32[N, 1, 8]) { return x",
        "net A(x: f32[N, 1, 8]) { y = relu(x) return y",
        "net A(x: f32[N, 1, 8]) { y = relu(x)",
        "net A(x: f32[N, 1, 8]) { y = relu(x)\n",
        "net A(x: f32[N, 1, 8]) {",
        "net A(x: f32[N, 1, 8]) { y = x",
    ],
    "an input needs a type, as in 'x: f32[N, 3, H, W]'": [
        "net A(x) { return x }",
        "net A(x, y: f32[N]) { return x }",
    ],
}


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(grammar_path().read_text(), parser="lalr", propagate_positions=True,
                maybe_placeholders=True)


def _span_of_meta(meta, filename: str, source: str) -> Span:
    if getattr(meta, "empty", False):
        return Span(filename, 1, 1, 1, 1, source)
    return Span(filename, meta.line, meta.column, meta.end_line, meta.end_column, source)


def _span_of_token(tok: Token, filename: str, source: str) -> Span:
    return Span(filename, tok.line, tok.column, tok.end_line or tok.line,
                tok.end_column or tok.column + len(tok), source)


class _ToAST(Transformer):
    """Lark tree → AST dataclasses. Reserved words used as names are errors here."""

    def __init__(self, filename: str, source: str):
        super().__init__()
        self.filename = filename
        self.source = source

    # -- helpers --------------------------------------------------------------------
    def _span(self, meta) -> Span:
        return _span_of_meta(meta, self.filename, self.source)

    def _tok_span(self, tok: Token) -> Span:
        return _span_of_token(tok, self.filename, self.source)

    def _name(self, tok: Token) -> str:
        if str(tok) in KEYWORDS:
            raise ConvDSLError(f"'{tok}' is a reserved keyword and cannot be used as a name",
                               self._tok_span(tok))
        return str(tok)

    # -- expressions ----------------------------------------------------------------
    @v_args(meta=True)
    def int_lit(self, meta, children):
        return ast.IntLit(self._span(meta), _int_value(str(children[0]), self._span(meta)))

    @v_args(meta=True)
    def float_lit(self, meta, children):
        value = float(children[0])
        if not math.isfinite(value):
            raise ConvDSLError(f"the number {_clip(children[0])} is too large for a float "
                               f"(the largest is about 1.8e308)", self._span(meta))
        return ast.FloatLit(self._span(meta), value)

    @v_args(meta=True)
    def string_lit(self, meta, children):
        raw = str(children[0])[1:-1]
        try:
            with warnings.catch_warnings():  # Python only warns about "\777" and "\q"
                warnings.simplefilter("error", DeprecationWarning)
                value = raw.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except (UnicodeDecodeError, DeprecationWarning):
            raise ConvDSLError("bad escape sequence in string", self._span(meta)) from None
        return ast.StringLit(self._span(meta), value)

    @v_args(meta=True)
    def true_lit(self, meta, children):
        return ast.BoolLit(self._span(meta), True)

    @v_args(meta=True)
    def false_lit(self, meta, children):
        return ast.BoolLit(self._span(meta), False)

    @v_args(meta=True)
    def name_ref(self, meta, children):
        return ast.Name(self._span(meta), tuple(self._name(t) for t in children))

    @v_args(meta=True)
    def tuple_lit(self, meta, children):
        return ast.TupleLit(self._span(meta), [c for c in children if c is not None])

    @v_args(meta=True)
    def list_lit(self, meta, children):
        return ast.ListLit(self._span(meta), [c for c in children if c is not None])

    @v_args(meta=True)
    def binary(self, meta, children):
        left, op, right = children
        return ast.Binary(self._span(meta), str(op), left, right)

    @v_args(meta=True)
    def negate(self, meta, children):
        return ast.Negate(self._span(meta), children[0])

    @v_args(meta=True)
    def keyword_arg(self, meta, children):
        tok, value = children
        return ast.KeywordArg(self._name(tok), value, self._tok_span(tok))

    @v_args(meta=True)
    def call(self, meta, children):
        func, *rest = children
        args, kwargs = [], []
        for item in rest:
            if item is None:
                continue
            if isinstance(item, ast.KeywordArg):
                if any(k.name == item.name for k in kwargs):
                    raise ConvDSLError(f"keyword argument '{item.name}' given twice", item.span)
                kwargs.append(item)
            elif kwargs:
                raise ConvDSLError("positional argument after a keyword argument", item.span)
            else:
                args.append(item)
        return ast.Call(self._span(meta), self._name(func), self._tok_span(func), args, kwargs)

    # -- statements -----------------------------------------------------------------
    @v_args(meta=True)
    def assign(self, meta, children):
        *targets, value = children
        return ast.Assign([ast.Target(self._name(t), self._tok_span(t)) for t in targets],
                          value, self._span(meta))

    @v_args(meta=True)
    def return_stmt(self, meta, children):
        return ast.Return(list(children), self._span(meta))

    @v_args(meta=True)
    def body(self, meta, children):
        return (list(children), self._span(meta))

    # -- definitions ----------------------------------------------------------------
    @v_args(meta=True)
    def dim_int(self, meta, children):
        return ast.Dim(int(children[0]), self._span(meta))

    @v_args(meta=True)
    def dim_symbol(self, meta, children):
        return ast.Dim(self._name(children[0]), self._span(meta))

    @v_args(meta=True)
    def net_input(self, meta, children):
        name, dtype, *dims = children
        return ast.NetInput(self._name(name), str(dtype), self._tok_span(dtype),
                            [d for d in dims if d is not None], self._span(meta))

    @v_args(meta=True)
    def net_def(self, meta, children):
        name, *inputs, (body, body_span) = children
        return ast.NetDef(self._name(name), [i for i in inputs if i is not None], body,
                          self._span(meta), body_span)

    @v_args(meta=True)
    def block_param(self, meta, children):
        name, default = children
        return ast.BlockParam(self._name(name), default, self._span(meta))

    @v_args(meta=True)
    def block_def(self, meta, children):
        shared, name, *params, (body, body_span) = children
        return ast.BlockDef(self._name(name), shared is not None,
                            [p for p in params if p is not None], body, self._span(meta), body_span)

    @v_args(meta=True)
    def table_def(self, meta, children):
        name, rows = children
        return ast.TableDef(self._name(name), rows, self._span(meta))

    def start(self, children):
        return children


def _clip(text: str, limit: int = 30) -> str:
    return text if len(text) <= limit else f"{text[:12]}...{text[-6:]} ({len(text)} digits)"


def _int_value(text: str, span: Span) -> int:
    # Check the length first: int() refuses strings of more than 4300 digits.
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(INT_MAX)) or int(digits) > INT_MAX:
        raise ConvDSLError(f"the integer {_clip(text)} is too large (the largest is 2^63 - 1)",
                           span)
    return int(digits)


def _describe_expected(expected: set[str]) -> str:
    words = sorted({_TOKEN_WORDS.get(t, repr(t.lower())) for t in expected if not t.startswith("__")})
    if not words:
        return ""
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _describe_token(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    return f"'{tok}'"


def _syntax_error(err: UnexpectedInput, text: str, filename: str) -> ConvDSLError:
    line = getattr(err, "line", None) or 1
    column = getattr(err, "column", None) or 1
    if isinstance(err, UnexpectedEOF) or (isinstance(err, UnexpectedToken) and err.token.type == "$END"):
        lines = text.splitlines() or [""]
        line, column = len(lines), len(lines[-1]) + 1
    width = len(err.token) if isinstance(err, UnexpectedToken) and err.token.type != "$END" else 1
    span = Span(filename, line, column, line, column + max(width, 1), text)

    hint = None
    if not isinstance(err, UnexpectedCharacters):  # a stray character: the plain message is clearer
        try:
            hint = err.match_examples(_lark().parse, _MISTAKES, use_accepts=True)
        except Exception:  # noqa: BLE001 - best effort; never hide the real error
            hint = None

    if isinstance(err, UnexpectedCharacters):
        message = f"unexpected character {text[err.pos_in_stream]!r}"
        expected = _describe_expected(set(err.allowed or ()))
    elif isinstance(err, UnexpectedToken):
        message = f"unexpected {_describe_token(err.token)}"
        if err.token.type == "NAME" and str(err.token) in KEYWORDS:
            message = f"'{err.token}' is a reserved keyword"
        expected = _describe_expected(set(err.expected))
    else:
        message = "unexpected end of file"
        expected = _describe_expected(set(getattr(err, "expected", ()) or ()))
    at_end = isinstance(err, UnexpectedEOF) or (
        isinstance(err, UnexpectedToken) and err.token.type == "$END")
    if at_end:
        hint = _unclosed_bracket(text) or hint
    if hint:
        message = f"syntax error: {hint} ({message})"
    elif expected:
        message = f"syntax error: {message}; expected {expected}"
    else:
        message = f"syntax error: {message}"
    return ConvDSLError(message, span)


def _unclosed_bracket(text: str) -> str | None:
    """At end of file, name the innermost bracket left open, if any."""
    stack = []
    closers = {")": "(", "]": "[", "}": "{"}
    for line in text.splitlines():
        for ch in line.split("#", 1)[0]:
            if ch in "([{":
                stack.append(ch)
            elif ch in closers and stack and stack[-1] == closers[ch]:
                stack.pop()
    if not stack:
        return None
    opener = stack[-1]
    closer = {v: k for k, v in closers.items()}[opener]
    return f"unclosed '{opener}': missing '{closer}'"


def _check_nesting(tree: Tree, text: str, filename: str) -> None:
    """Refuse a parse tree deeper than MAX_NESTING, found without recursion,
    pointing at the first node past the limit."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            span = _span_of_meta(node.meta, filename, text)
            raise ConvDSLError(f"expressions nest more than {MAX_NESTING} levels deep here; "
                               f"bind parts of it to names in separate statements", span)
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))


def parse(text: str, filename: str = "<string>") -> ast.Program:
    """Parse .cdsl text into a Program; raises ConvDSLError on any syntax error."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, text, filename) from None
    _check_nesting(tree, text, filename)
    try:
        with stack_room():  # the transformer recurses once per tree level
            items = _ToAST(filename, text).transform(tree)
    except Exception as err:  # Lark wraps errors raised inside callbacks
        inner = getattr(err, "orig_exc", err)
        if isinstance(inner, ConvDSLError):
            raise inner from None
        raise
    program = ast.Program(filename, text)
    for item in items:
        _, table = {
            ast.TableDef: ("table", program.tables),
            ast.BlockDef: ("block", program.blocks),
            ast.NetDef: ("net", program.nets),
        }[type(item)]
        for other in (program.tables, program.blocks, program.nets):
            if item.name in other:
                first = other[item.name].span
                raise ConvDSLError(f"'{item.name}' is defined twice (first at line {first.line})",
                                   item.span)
        table[item.name] = item
    return program


def read_source(source: str | Path) -> tuple[str, str]:
    """(text, filename) for a path to a .cdsl file or for source text itself."""
    if isinstance(source, Path):
        return _read_file(source), str(source)
    if isinstance(source, str):
        looks_like_path = "\n" not in source and "{" not in source and len(source) < 4096
        if looks_like_path:
            path = Path(source)
            if path.suffix == ".cdsl" or path.is_file():
                return _read_file(path), source
    return source, "<string>"


def _read_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvDSLError(f"no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConvDSLError(f"cannot read {path}: {err}") from None
