"""The grammar: every construct of LANGUAGE.md §1–§7 parses to the right AST."""
import pytest

from convdsl import ConvDSLError
from convdsl import ast
from convdsl.parser import parse, read_source

FULL = '''
# a comment on its own line
table T = [[0, 1], [1, 2],]          # trailing comma
block b(x, c, k=3) { return relu(conv(x, c, kernel=k, pad=same)) }
shared block s(x) {
    return x
}
net Many(image: f32[N, 3, H, W], mask: bf16[N, 1, H, W], seq: f16[B, 2, T],
         vol: f32[N, 1, 4, 4, 4], flat: f32[N, 10],) {
    a, c = split(image, [1, 2])
    y = conv(image, 4, kernel=(3, 5), stride=1, pad=((1, 1), (2, 2)), init=normal(0.1),
             name="layer.one", flip=true, trainable=false)
    z = -y * 2 + y - 0.5 * y
    w = leaky_relu(y, slope=1e-2) + 1.5e1 * y
    q = b(image, 4)
    r = s(q)
    return z, w, r, a, c
}
'''


def test_full_program_parses():
    program = parse(FULL, "full.cdsl")
    assert list(program.tables) == ["T"]
    assert list(program.blocks) == ["b", "s"]
    assert list(program.nets) == ["Many"]
    assert program.blocks["s"].shared and not program.blocks["b"].shared
    net = program.nets["Many"]
    assert [i.name for i in net.inputs] == ["image", "mask", "seq", "vol", "flat"]
    assert [i.dtype for i in net.inputs] == ["f32", "bf16", "f16", "f32", "f32"]
    assert [d.value for d in net.inputs[0].dims] == ["N", 3, "H", "W"]
    assert len(net.body) == 7
    assert isinstance(net.body[-1], ast.Return) and len(net.body[-1].values) == 5


def test_tuple_assignment_and_return_list():
    net = parse(FULL).nets["Many"]
    first = net.body[0]
    assert [t.name for t in first.targets] == ["a", "c"]
    assert isinstance(first.value, ast.Call) and first.value.func == "split"
    assert isinstance(first.value.args[1], ast.ListLit)


def test_keyword_arguments_literals_and_spans():
    net = parse(FULL, "full.cdsl").nets["Many"]
    call = net.body[1].value
    kw = {k.name: k.value for k in call.kwargs}
    assert isinstance(kw["kernel"], ast.TupleLit) and [i.value for i in kw["kernel"].items] == [3, 5]
    assert isinstance(kw["pad"], ast.TupleLit) and isinstance(kw["pad"].items[0], ast.TupleLit)
    assert isinstance(kw["init"], ast.Call) and kw["init"].func == "normal"
    assert isinstance(kw["name"], ast.StringLit) and kw["name"].value == "layer.one"
    assert isinstance(kw["flip"], ast.BoolLit) and kw["flip"].value is True
    assert call.span.filename == "full.cdsl" and call.span.line == 11
    assert call.func_span.column == 9


def test_operator_precedence():
    net = parse(FULL).nets["Many"]
    z = net.body[2].value  # -y * 2 + y - 0.5 * y  ==  ((-y * 2) + y) - (0.5 * y)
    assert isinstance(z, ast.Binary) and z.op == "-"
    assert isinstance(z.left, ast.Binary) and z.left.op == "+"
    assert isinstance(z.left.left, ast.Binary) and z.left.left.op == "*"
    assert isinstance(z.left.left.left, ast.Negate)
    assert isinstance(z.right, ast.Binary) and z.right.op == "*"


def test_numbers():
    net = parse(FULL).nets["Many"]
    w = net.body[3].value
    slope = w.left.kwargs[0].value
    assert isinstance(slope, ast.FloatLit) and slope.value == 0.01
    assert w.right.left.value == 15.0


def test_dotted_names_parse():
    program = parse("net A(x: f32[N, 1]) { y = dense(x, 2, share=enc.first) return y }")
    kw = program.nets["A"].body[0].value.kwargs[0]
    assert isinstance(kw.value, ast.Name) and kw.value.text == "enc.first"


def test_empty_file_has_no_nets():
    program = parse("# nothing here\n")
    assert not program.nets


@pytest.mark.parametrize("src,words", [
    ("net A(x: f32[N, 1]) { y = f(x,, 2) return y }", "unexpected ','"),
    ("net A(x: f32[N, 1]) { y = relu(x) return }", "unexpected '}'"),
    ("net A(x: f32[N, 1]) { return x } }", "unexpected '}'"),
    ("net (x: f32[N, 1]) { return x }", "unexpected '('"),
    ('net A(x: f32[N, 1]) { y = dense(x, 2, name="unterminated) return y }', "unexpected character"),
    ("net A(x: f32[N, 1]) { y = dense(x, 2, a=1, 3) return y }", "positional argument after"),
    ("net A(x: f32[N, 1]) { y = dense(x, 2, a=1, a=2) return y }", "given twice"),
    ("net return(x: f32[N, 1]) { return x }", "reserved keyword"),
])
def test_syntax_errors_say_what_went_wrong(src, words):
    with pytest.raises(ConvDSLError) as info:
        parse(src)
    assert words in str(info.value)
    assert info.value.line == 1 and info.value.column >= 1


def test_syntax_error_lists_what_was_expected():
    with pytest.raises(ConvDSLError) as info:
        parse("net A(x: f32[N, 1]) {\n  y = dense(x, 2)\n  return y,\n}")
    assert "expected" in str(info.value) and info.value.line == 4


def test_read_source_accepts_text_and_paths(tmp_path):
    path = tmp_path / "n.cdsl"
    path.write_text("net A(x: f32[N, 1]) { return x }")
    assert read_source(str(path)) == (path.read_text(), str(path))
    assert read_source(path)[1] == str(path)
    text = "net A(x: f32[N, 1]) { return x }"
    assert read_source(text) == (text, "<string>")
