"""Hypothesis strategies that write .cdsl programs, and a mutator that breaks them.

The generator follows the grammar (grammar/convdsl.lark): tables, plain and
shared blocks, nets with typed inputs, statements whose expressions call the
ops of the op table with argument values drawn from a mix of sensible and
hostile ones (zero, negative, huge, wrong kinds, strings). It does not try to
be correct: about half of its programs compile, the rest must fail with a
ConvDSLError. The mutator then damages text at the token level (delete,
duplicate, swap, replace) and the byte level (random bytes, unicode).
"""
from __future__ import annotations

import re

from hypothesis import strategies as st

SYMBOLS = ("N", "H", "W", "T", "D")
DTYPES = ("f32",) * 12 + ("f16", "bf16", "f64", "int8")
ACTIVATIONS = ("relu", "sigmoid", "tanh", "elu", "softplus", "identity", "leaky_relu")
POOLS = ("maxpool", "avgpool", "lppool", "wavgpool")
WORDS = ("same", "valid", "full", "channel", "none", "location", "tiled", "he", "xavier",
         "zeros", "edges", "kmeans", "lambda", "import", "N", "H", "true_", "x")
HOSTILE_NAMES = ("lambda", "import", "tl", "triton", "pid", "None", "self", "__import__", "os",
                 "def", "class", "print", "exec", "weight", "training", "_x", "x1")

# Small ints most of the time, sometimes something a shape rule must refuse.
small_int = st.one_of(st.integers(1, 4), st.integers(1, 4), st.sampled_from(
    [0, -1, -3, 7, 64, 1000, 10**6, 10**12, 2**31, 2**63, 10**30]))
spatial = st.one_of(small_int.map(str), st.lists(small_int, min_size=1, max_size=4).map(
    lambda v: "(" + ", ".join(map(str, v)) + ("," if len(v) == 1 else "") + ")"))
pad_value = st.one_of(st.sampled_from(["same", "valid", "full", "0", "1", "2", "(1, 0)",
                                       "((1, 2), (0, 1))", "((1, 2))", "(1, 2, 3)", "-1",
                                       "circular", "\"same\"", "1.5"]), spatial)
number = st.one_of(st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False).map(
    lambda f: repr(abs(f))), st.sampled_from(["0.0", "1e-3", "1e308", "1e309", "0.5", "2.", ".25",
                                              "3", "-1.0", "1e-320"]))
init_value = st.one_of(st.sampled_from(["he", "xavier", "zeros", "edges", "gaussian(1.0)",
                                        "gaussian(0)", "normal(0.1)", "normal(-1)", "normal()",
                                        "uniform(-1, 1)", "uniform(1)", "gabor()", "gabor(2, 1, 1)",
                                        "gabor(orientations=0)", "gabor(orientations=[])",
                                        "gabor(frequencies=[0.5, 1.0])", "kmeans", "bogus",
                                        "normal(std=0.1, mean=1)", "gaussian(\"x\")",
                                        "gabor(orientations=1000000000)", "normal(1e309)"]))
string_value = st.one_of(
    st.sampled_from(['"enc"', '"enc.conv"', '"a b"', '"x\\"y"', '"\\n"', '"lambda"', '"tl"',
                     '"__import__"', '""', '"1abc"', '"a..b"', '"\\u00e9"', '"os.system"',
                     '"x\\"); import os #"', '"\\x00"', '"\\q"']),
    st.text(alphabet=st.characters(blacklist_characters='"\\\n'), max_size=8).map(
        lambda s: '"' + s + '"'))
scalar_value = st.one_of(small_int.map(str), number, st.sampled_from(WORDS), string_value,
                         st.just("true"), st.just("false"), spatial)


def _rarely(draw, one_in: int) -> bool:
    """True about once in `one_in` draws. Hypothesis favours the ends of a range,
    so the rare branch is a value in the middle."""
    return draw(st.integers(1, one_in)) == (one_in + 1) // 2


def _table_rows(draw) -> str:
    rows = draw(st.lists(st.lists(st.integers(-1, 5), min_size=0, max_size=4), min_size=0,
                         max_size=6))
    return "[" + ", ".join("[" + ", ".join(map(str, r)) + "]" for r in rows) + "]"


@st.composite
def _value_for(draw, kind: str, tables: list[str]) -> str:
    """A keyword argument's value: usually of the right kind, sometimes not."""
    if _rarely(draw, 20):
        return draw(scalar_value)
    if kind == "int":
        return str(draw(small_int))
    if kind == "spatial":
        return draw(spatial)
    if kind == "pad":
        return draw(pad_value)
    if kind == "float":
        return draw(number)
    if kind == "bool":
        return draw(st.sampled_from(["true", "false"]))
    if kind == "bias":
        return draw(st.sampled_from(["none", "channel", "location", "tiled"]))
    if kind == "init":
        return draw(init_value)
    if kind == "table":
        return draw(st.sampled_from(tables)) if tables and draw(st.booleans()) else _table_rows(
            draw)
    if kind == "string":
        return draw(string_value)
    if kind == "axis":
        return draw(st.sampled_from(["channel", "0", "1", "2", "3", "-1", "9"]))
    if kind == "ints":
        return draw(st.one_of(small_int.map(str), st.lists(small_int, min_size=1, max_size=4).map(
            lambda v: "[" + ", ".join(map(str, v)) + "]")))
    if kind == "size":
        return draw(st.one_of(spatial, st.sampled_from(["H", "(H, W)", "(N, 3)", "Q"])))
    return draw(scalar_value)


# op → (positional constants after the tensor, {keyword: kind})
_LAYER_KW = {"init": "init", "trainable": "bool", "name": "string", "bias": "bias"}
OP_ARGS = {
    "conv": (("int", "spatial"), {"stride": "spatial", "pad": "pad", "dilation": "spatial",
                                  "groups": "int", "connect": "table", "flip": "bool",
                                  "separable": "bool", **_LAYER_KW}),
    "depthwise": (("spatial",), {"multiplier": "int", "stride": "spatial", "pad": "pad",
                                 "dilation": "spatial", **_LAYER_KW}),
    "local": (("int", "spatial"), {"stride": "spatial", "pad": "pad", **_LAYER_KW}),
    "tiled": (("int", "spatial"), {"tiles": "spatial", "stride": "spatial", "pad": "pad",
                                   **_LAYER_KW}),
    "deconv": (("int", "spatial"), {"stride": "spatial", "pad": "pad", "size": "size",
                                    "dilation": "spatial", **_LAYER_KW}),
    "dense": (("int",), dict(_LAYER_KW)),
    "maxpool": (("spatial",), {"stride": "spatial", "pad": "pad", "output": "spatial"}),
    "avgpool": (("spatial",), {"stride": "spatial", "pad": "pad", "output": "spatial"}),
    "lppool": (("spatial",), {"stride": "spatial", "p": "float", "output": "spatial"}),
    "wavgpool": (("spatial",), {"stride": "spatial", "sigma": "float", "pad": "pad"}),
    "maxout": ((), {"pieces": "int"}),
    "softmax": ((), {"axis": "axis"}),
    "log_softmax": ((), {"axis": "axis"}),
    "leaky_relu": ((), {"slope": "float"}),
    "elu": ((), {"alpha": "float"}),
    "split": (("ints",), {}),
    "flatten": ((), {}),
}


@st.composite
def _call(draw, tensors: list[str], depth: int, tables: list[str], blocks: dict) -> str:
    """An expression that (usually) yields a tensor."""
    if depth <= 0 or not draw(st.integers(0, 3)):
        return draw(st.sampled_from(tensors))
    choice = draw(st.integers(0, 9))
    inner = draw(_call(tensors, depth - 1, tables, blocks))
    if choice == 0:
        return draw(st.sampled_from(ACTIVATIONS)) + f"({inner})"
    if choice == 1:
        other = draw(_call(tensors, depth - 1, tables, blocks))
        op = draw(st.sampled_from("+-*"))
        if draw(st.booleans()):
            other = draw(number)
        return f"({inner} {op} {other})"
    if choice == 2 and blocks:
        name = draw(st.sampled_from(sorted(blocks)))
        args = [inner] + [str(draw(small_int)) for _ in range(draw(st.integers(0, blocks[name])))]
        return f"{name}({', '.join(args)})"
    if choice == 3:
        more = draw(st.lists(_call(tensors, depth - 1, tables, blocks), min_size=0, max_size=2))
        extra = f", axis={draw(_value_for('axis', tables))}" if draw(st.booleans()) else ""
        return f"concat({', '.join([inner] + more)}{extra})"
    if choice == 4:
        return f"-{inner}"
    op = draw(st.sampled_from(sorted(OP_ARGS)))
    positional, keywords = OP_ARGS[op]
    args = [inner] + [draw(_value_for(kind, tables)) for kind in positional]
    if positional and _rarely(draw, 8):
        args.pop()  # a missing required argument
    for key in draw(st.lists(st.sampled_from(sorted(keywords) or ["bogus"]), max_size=3,
                             unique=True)):
        args.append(f"{key}={draw(_value_for(keywords.get(key, 'any'), tables))}")
    return f"{op}({', '.join(args)})"


@st.composite
def _dims(draw) -> str:
    rank = draw(st.sampled_from([2, 3, 3, 4, 4, 4, 4, 4, 5] * 4 + [1, 6]))
    dims = []
    for axis in range(rank):
        if _rarely(draw, 30):
            dims.append(draw(st.sampled_from(["0", "C", str(10**12), "-1"])))
        elif axis == 1:
            dims.append(str(draw(st.integers(1, 6))))
        elif draw(st.booleans()):
            dims.append(draw(st.sampled_from(SYMBOLS)))
        else:
            dims.append(str(draw(st.integers(1, 12))))
    return ", ".join(dims)


@st.composite
def _body(draw, tensors: list[str], tables: list[str], blocks: dict, max_statements: int,
          names=("h", "g", "y", "z", "h")) -> str:
    lines = []
    pool = list(tensors)
    for _ in range(draw(st.integers(0, max_statements))):
        target = draw(st.sampled_from(names + HOSTILE_NAMES))
        if _rarely(draw, 30):
            target += f", {draw(st.sampled_from(names))}"  # a tuple assignment
        lines.append(f"    {target} = {draw(_call(pool, 3, tables, blocks))}")
        pool.append(target.split(",")[0])
    results = draw(st.lists(_call(pool, 2, tables, blocks), min_size=1, max_size=2))
    if not _rarely(draw, 40):
        lines.append("    return " + ", ".join(results))
    return "{\n" + "\n".join(lines) + "\n}"


@st.composite
def programs(draw) -> str:
    """A whole .cdsl file: tables, blocks, then one net (sometimes two)."""
    parts, tables, blocks = [], [], {}
    for i in range(draw(st.integers(0, 2))):
        tables.append(f"T{i}")
        parts.append(f"table T{i} = {_table_rows(draw)}")
    for i in range(draw(st.integers(0, 2))):
        name = f"b{i}"
        extra = draw(st.integers(0, 2))
        params = ["x"] + [f"c{j}" for j in range(extra)]
        if draw(st.booleans()):
            params.append("k=3")
        shared = "shared " if _rarely(draw, 4) else ""
        body = draw(_body(["x"], tables, dict(blocks), 2))
        if extra and draw(st.booleans()):  # give the constant parameters something to do
            kernel = "k" if "k=3" in params else "c0"
            body = body.replace("{\n", f"{{\n    x = conv(x, c{extra - 1}, kernel={kernel})\n", 1)
        parts.append(f"{shared}block {name}({', '.join(params)}) {body}")
        blocks[name] = extra
    for n in range(draw(st.sampled_from([1, 1, 1, 2]))):
        inputs = []
        for i in range(draw(st.integers(1, 2))):
            inputs.append(f"{'xy'[i]}: {draw(st.sampled_from(DTYPES))}[{draw(_dims())}]")
        body = draw(_body([i.split(':')[0] for i in inputs], tables, blocks, 5))
        parts.append(f"net Net{n}({', '.join(inputs)}) {body}")
    order = draw(st.permutations(parts))
    return "\n\n".join(order) + "\n"


# -- the mutator ------------------------------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|\d+\.?\d*(?:[eE][+-]?\d+)?|\"(?:[^\"\\\n]|\\.)*\"|"
                    r"#[^\n]*|\s+|.", re.DOTALL)
_NOISE = st.one_of(
    st.sampled_from(["(", ")", "[", "]", "{", "}", ",", "=", ":", "+", "-", "*", ".", "\"",
                     "return", "net", "block", "shared", "table", "true", "#", "\n", "\t",
                     "\\", "'", ";", "\x00", "\ufeff", "\u202e", "é", "𝑥", "\r", "99999999999",
                     "1e999", "conv", "x", "(((((", ")))))"]),
    st.text(max_size=4),
    st.binary(max_size=4).map(lambda b: b.decode("latin-1")),
)


@st.composite
def mutated(draw, source: str) -> str:
    """`source` with one to four token- or byte-level edits."""
    tokens = _TOKEN.findall(source)
    for _ in range(draw(st.integers(1, 4))):
        if not tokens:
            tokens = [""]
        i = draw(st.integers(0, len(tokens) - 1))
        action = draw(st.sampled_from(["delete", "duplicate", "swap", "replace", "insert",
                                       "truncate"]))
        if action == "delete":
            del tokens[i]
        elif action == "duplicate":
            tokens.insert(i, tokens[i])
        elif action == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif action == "replace":
            tokens[i] = draw(_NOISE)
        elif action == "insert":
            tokens.insert(i, draw(_NOISE))
        else:
            tokens = tokens[:i]
    return "".join(tokens)
