"""Every compile-time error of LANGUAGE.md §8: message, line, column, caret."""
import re
import warnings

import pytest

import convdsl
from convdsl import ConvDSLError, ConvDSLWarning

NET = "net A(x: f32[N, 2, 8, 8]) {{\n{body}\n}}"

# (name, program, line, column, words the message must contain)
CASES = [
    ("syntax, missing comma", NET.format(body="  y = conv(x 4, kernel=3)\n  return y"), 2, 14,
     "missing ','"),
    ("syntax, unclosed paren", NET.format(body="  y = relu(conv(x, 4, kernel=3)\n  return y"), 3, 3,
     "unclosed '('"),
    ("syntax, = instead of :", "net A(x = f32[N, 2, 8, 8]) {\n  return x\n}", 1, 9, "':' not '='"),
    ("syntax, stray character", NET.format(body="  y = x @ x\n  return y"), 2, 9,
     "unexpected character '@'"),
    ("unclosed brace at end of file", "net A(x: f32[N, 2, 8, 8]) {\n  return x\n", 2, 11,
     "unclosed '{'"),
    ("reserved keyword as name", NET.format(body="  table = relu(x)\n  return table"), 2, 3,
     "reserved keyword"),
    ("unknown op", NET.format(body="  y = cnov(x, 4, kernel=3)\n  return y"), 2, 7,
     "unknown op 'cnov'; did you mean 'conv'"),
    ("unknown name", NET.format(body="  y = conv(z, 4, kernel=3)\n  return y"), 2, 12,
     "unknown name 'z'"),
    ("unknown keyword argument", NET.format(body="  return conv(x, 4, kernal=3)"), 2, 21,
     "no argument 'kernal'; did you mean 'kernel'"),
    ("missing argument", NET.format(body="  return conv(x, 4)"), 2, 10, "needs the argument 'kernel'"),
    ("wrong argument type", NET.format(body="  return conv(x, 4, kernel=1.5)"), 2, 28,
     "must be an integer"),
    ("string where int", NET.format(body='  return conv(x, "four", kernel=3)'), 2, 18,
     "must be an integer"),
    ("bad enum word", NET.format(body="  return conv(x, 4, kernel=3, pad=sme)"), 2, 35, "got 'sme'"),
    ("bad bias mode", NET.format(body="  return conv(x, 4, kernel=3, bias=chanel)"), 2, 36,
     "must be one of none, channel, location, tiled"),
    ("channel mismatch in +", "net A(x: f32[N, 2, 8, 8], y: f32[N, 3, 8, 8]) {\n  return x + y\n}",
     2, 10, "same shape"),
    ("+ of different spatial shapes", NET.format(body="  y = conv(x, 2, kernel=3)\n  return x + y"),
     3, 10, "same shape"),
    ("kernel larger than padded input", NET.format(body="  return conv(x, 4, kernel=9)"), 2, 28,
     "larger than the padded input 8"),
    ("dilated kernel too large", NET.format(body="  return conv(x, 4, kernel=3, dilation=4)"), 2, 28,
     "dilated to 9"),
    ("table rows vs out", "table T = [[0], [1]]\n" + NET.format(
        body="  return conv(x, 3, kernel=3, connect=T)"), 3, 39, "2 rows but the conv has 3"),
    ("table channel out of range", "table T = [[0], [5]]\n" + NET.format(
        body="  return conv(x, 2, kernel=3, connect=T)"), 3, 39, "reads input channel 5"),
    ("unknown table", NET.format(body="  return conv(x, 2, kernel=3, connect=Q)"), 2, 39,
     "unknown table 'Q'"),
    ("table with groups", "table T = [[0], [1]]\n" + NET.format(
        body="  return conv(x, 2, kernel=3, connect=T, groups=2)"), 3, 39, "cannot be combined"),
    ("groups do not divide", NET.format(body="  return conv(x, 3, kernel=3, groups=2)"), 2, 38,
     "must divide the 3 output channels"),
    ("share of incompatible shapes", NET.format(
        body="  a = conv(x, 4, kernel=3)\n  b = conv(x, 4, kernel=5, share=a)\n  return a, b"),
     3, 34, "this layer needs weight of shape"),
    ("share between op kinds", "net A(x: f32[N, 2, 8, 8]) {\n  a = conv(x, 2, kernel=3)\n"
     "  b = local(a, 2, kernel=3, share=a)\n  return b\n}", 3, 35, "cannot share"),
    ("share of an unknown layer", NET.format(body="  return conv(x, 2, kernel=3, share=enc)"), 2, 37,
     "no layer 'enc'"),
    ("init with share", NET.format(
        body="  a = conv(x, 2, kernel=3)\n  b = conv(x, 2, kernel=3, share=a, init=zeros)\n  return a, b"),
     3, 42, "no effect"),
    ("local on symbolic sizes", "net A(x: f32[N, 2, H, W]) {\n  return local(x, 4, kernel=3)\n}",
     2, 10, "needs a fixed spatial size"),
    ("location bias on symbolic sizes",
     "net A(x: f32[N, 2, H, W]) {\n  return conv(x, 4, kernel=3, bias=location)\n}", 2, 10,
     "bias=location needs a fixed spatial size"),
    ("tiled bias on conv", NET.format(body="  return conv(x, 2, kernel=3, bias=tiled)"), 2, 36,
     "needs the tiled op"),
    ("missing return", NET.format(body="  y = relu(x)"), 3, 1, "no return statement"),
    ("statement after return", NET.format(body="  return x\n  y = relu(x)"), 3, 3,
     "statement after return"),
    ("recursion", "block f(x) {\n  return f(x)\n}\n" + NET.format(body="  return f(x)"), 2, 10,
     "recursion"),
    ("mutual recursion", "block f(x) {\n  return g(x)\n}\nblock g(x) {\n  return f(x)\n}\n"
     + NET.format(body="  return f(x)"), 5, 10, "recursion"),
    ("binding shadows an op", NET.format(body="  conv = relu(x)\n  return conv"), 2, 3,
     "op name"),
    ("bad layer name", NET.format(body='  return conv(x, 2, kernel=3, name="a b")'), 2, 36,
     "not a layer name"),
    ("name with code", NET.format(body='  return conv(x, 2, kernel=3, name="x\\"); import os")'),
     2, 36, "not a layer name"),
    ("duplicate layer name", NET.format(
        body='  y = conv(x, 2, kernel=3, name="q")\n  z = conv(y, 2, kernel=3, name="q")\n  return z'),
     3, 33, "already used"),
    ("unknown dtype", "net A(x: f64[N, 2, 8, 8]) {\n  return x\n}", 1, 10, "unknown dtype 'f64'"),
    ("symbolic channels", "net A(x: f32[N, C, 8, 8]) {\n  return x\n}", 1, 17,
     "channel dim of 'x' must be an integer"),
    ("split bound to one name", NET.format(body="  y = split(x, [1, 1])\n  return y"), 2, 3,
     "2 results but 1 name"),
    ("split sizes", NET.format(body="  a, b = split(x, [1, 3])\n  return a, b"), 2, 19,
     "add up to 4"),
    ("dense on 4-D", NET.format(body="  return dense(x, 3)"), 2, 10, "flatten"),
    ("dense on variable features", "net A(x: f32[N, 2, H, W]) {\n  return dense(flatten(x), 3)\n}",
     2, 10, "fixed number of input features"),
    ("tuple of wrong length", NET.format(body="  return conv(x, 4, kernel=(3, 3, 3))"), 2, 28,
     "needs 2 entries"),
    ("pool padding as large as window", NET.format(body="  return maxpool(x, 2, pad=2)"), 2, 28,
     "smaller than the window"),
    ("pool window and output", NET.format(body="  return maxpool(x, 2, output=3)"), 2, 31,
     "either a window or output="),
    ("maxout pieces", NET.format(body="  return maxout(x, pieces=3)"), 2, 27, "multiple of 3"),
    ("unknown initializer", NET.format(body="  return conv(x, 2, kernel=3, init=gausian(1.0))"),
     2, 36, "unknown initializer 'gausian'"),
    ("initializer called as op", NET.format(body="  return normal(x)"), 2, 10, "initializer"),
    ("gabor on 3-D", "net A(x: f32[N, 1, 8, 8, 8]) {\n  return conv(x, 2, kernel=3, init=gabor)\n}",
     2, 36, "1-D or 2-D"),
    ("edges on separable", NET.format(body="  return conv(x, 2, kernel=3, separable=true, init=edges)"),
     2, 52, "not outer products"),
    ("deconv size out of range", NET.format(body="  return deconv(x, 2, kernel=3, stride=2, size=30)"),
     2, 48, "17..18"),
    ("block arity", "block b(x, c) {\n  return conv(x, c, kernel=1)\n}\n" + NET.format(
        body="  return b(x)"), 5, 10, "needs the argument 'c'"),
    ("too many positional arguments", NET.format(body="  return relu(x, 2)"), 2, 18,
     "at most 1 positional"),
    ("input of rank 1", "net A(x: f32[N]) {\n  return x\n}", 1, 7, "has 1 dim"),
    ("net defined twice", NET.format(body="  return x") + "\n" + NET.format(body="  return x"), 4, 1,
     "defined twice"),
    ("multi-result in an expression", NET.format(body="  return relu(split(x, [1, 1]))"), 2, 15,
     "bind them to names first"),
    ("concat of different sizes", "net A(x: f32[N, 2, 8, 8], y: f32[N, 2, 4, 4]) {\n"
     "  return concat(x, y)\n}", 2, 10, "other dims equal"),
]


@pytest.mark.parametrize("name,src,line,column,words", CASES, ids=[c[0] for c in CASES])
def test_error_position_and_message(name, src, line, column, words):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvDSLWarning)
        with pytest.raises(ConvDSLError) as info:
            convdsl.compile(src, backend="torch")
    err = info.value
    assert (err.line, err.column) == (line, column), str(err)
    assert words in err.message, str(err)
    text = str(err)
    head, source_line, caret = text.split("\n")
    assert re.match(rf"<string>:{line}:{column}: error: ", head)
    assert source_line == src.splitlines()[line - 1]
    assert caret.index("^") == column - 1


def test_error_from_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.cdsl"
    path.write_text("net A(x: f32[N, 1, 8, 8]) {\n  return cnov(x)\n}\n")
    with pytest.raises(ConvDSLError) as info:
        convdsl.compile(str(path))
    assert info.value.filename == str(path)
    assert str(info.value).startswith(f"{path}:2:10: error: unknown op 'cnov'")


def test_caret_spans_the_offending_token():
    src = NET.format(body="  y = cnov(x, 4, kernel=3)\n  return y")
    with pytest.raises(ConvDSLError) as info:
        convdsl.compile(src)
    assert str(info.value).splitlines()[2] == "      ^~~~"


def test_missing_file_is_a_user_error():
    with pytest.raises(ConvDSLError, match="no such file"):
        convdsl.compile("does/not/exist.cdsl")


def test_several_nets_need_a_choice():
    src = NET.format(body="  return x") + "\nnet B(x: f32[N, 1]) {\n  return x\n}"
    with pytest.raises(ConvDSLError, match="pick one with net="):
        convdsl.compile(src)
    with pytest.raises(ConvDSLError, match="no net named 'C'"):
        convdsl.compile(src, net="C")
    assert convdsl.compile(src, net="B").name == "B"


@pytest.mark.parametrize("body,what", [
    ("  y = conv(x, 2, kernel=3)\n  return x", "result 'y' is never used"),
    ("  a, b = split(x, [1, 1])\n  return a", "result 'b' is never used"),
])
def test_unused_results_warn(body, what):
    with pytest.warns(ConvDSLWarning, match=what) as record:
        convdsl.compile(NET.format(body=body))
    assert ":2:" in str(record[0].message) or ":2:" in str(record[-1].message)


def test_unused_input_warns():
    src = "net A(x: f32[N, 2, 8, 8], y: f32[N, 2, 8, 8]) {\n  return relu(x)\n}"
    with pytest.warns(ConvDSLWarning, match="input 'y' is never used"):
        convdsl.compile(src)
