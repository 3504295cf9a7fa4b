"""No code injection: user text reaches generated kernels only as mangled names.

Extends tests/triton/test_elementwise.py (hostile names give valid Python)
and tests/test_naming.py (Python words as layer names on the torch backend):
here every name a program chooses (net, input, bindings, block, table,
layers) is hostile at once, in a net that exercises several kernel families,
forward, training and backward programs included; and `name=` strings that
are not layer names are refused with a diagnostic that cannot be spoofed.
"""
from __future__ import annotations

import ast
import re
import warnings

import pytest
import torch

import convdsl
from convdsl import ConvDSLError

# Every name the program chooses; {x} is the placeholder for each.
TEMPLATE = """table {table} = [[0, 1], [1]]
block {block}(x, c) {{
    {inner} = relu(conv(x, c, kernel=3, pad=same, name="{layer}"))
    return {inner}
}}
net {net}({input}: f32[N, 2, 6, 6]) {{
    {h} = {block}({input}, 2)
    {g} = conv({h}, 2, kernel=1, connect={table})
    {p} = maxpool({g}, 2)
    {d} = deconv({p}, 2, kernel=2, stride=2)
    {s} = {d} + {input}
    {f} = dense(flatten(avgpool({s}, output=2)), 3)
    return softmax({f})
}}
"""
SLOTS = ("table", "block", "inner", "layer", "net", "input", "h", "g", "p", "d", "s", "f")
HOSTILE = ("lambda", "import", "tl", "triton", "pid", "None", "self", "__import__", "os",
           "exec", "k_conv_2d_1", "__class__", "_modules", "forward", "x_ptr", "BLOCK")
# Markers: words no template contains, so each occurrence is user text.
NEUTRAL = {slot: f"zq{slot}" for slot in SLOTS}


def variant(shift: int) -> dict[str, str]:
    """Each slot gets a different hostile word; `shift` rotates the assignment."""
    return {slot: HOSTILE[(i + shift) % len(HOSTILE)] for i, slot in enumerate(SLOTS)}


def all_kernel_sources(names: dict[str, str]) -> tuple[convdsl.CompiledNet, list[str]]:
    """Every kernel a training step can run (forward, training, backward), in plan order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = convdsl.compile(TEMPLATE.format(**names), backend="triton")
    programs = net._program.programs(net)
    return net, [plan.source for program in programs for plan in program.plans if plan.source]


_MANGLED = re.compile(r"\bk_\w+")


def canonical(sources: list[str]) -> str:
    """Kernel names (k_...) replaced by their order of first appearance."""
    seen: dict[str, str] = {}
    return _MANGLED.sub(lambda m: seen.setdefault(m.group(), f"k_{len(seen)}"),
                        "\n\n".join(sources))


@pytest.fixture(scope="module")
def neutral():
    return all_kernel_sources(NEUTRAL)


def test_user_text_appears_only_inside_mangled_kernel_names(neutral):
    _, sources = neutral
    assert len(sources) >= 10  # conv, pooling, deconv, dense, softmax, and their gradients
    text = "\n".join(sources)
    for marker in NEUTRAL.values():
        for match in re.finditer(rf"\w*{marker}\w*", text):
            assert match.group().startswith("k_"), f"{marker} reached kernel code as {match.group()!r}"


@pytest.mark.parametrize("shift", [0, 5, 11])
def test_hostile_names_change_nothing_but_mangled_names(neutral, shift):
    """Kernels of the hostile program equal the neutral one's up to kernel
    names: no name reaches code except inside an identifier that starts k_."""
    _, neutral_sources = neutral
    _, hostile_sources = all_kernel_sources(variant(shift))
    assert canonical(hostile_sources) == canonical(neutral_sources)
    for source in hostile_sources:
        assert_only_triton_imports(source)


def assert_only_triton_imports(source: str) -> None:
    """The generated module imports Triton and nothing else, and calls no
    builtin that could run or load code."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        assert not isinstance(node, ast.ImportFrom), f"'from {node.module} import' in a kernel"
        if isinstance(node, ast.Import):
            assert {a.name for a in node.names} <= {"triton", "triton.language", "math"}
        elif isinstance(node, ast.Name):
            assert node.id not in {"exec", "eval", "open", "__import__", "compile", "getattr",
                                   "globals", "os", "sys"}, node.id


def test_hostile_names_run_forward_under_the_interpreter():
    names = variant(3)
    net, _ = all_kernel_sources(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = convdsl.compile(TEMPLATE.format(**names), backend="torch")
    reference.load_state_dict(net.state_dict())
    assert f"{names['h']}.{names['layer']}.weight" in net.state_dict()
    x = torch.randn(2, 2, 6, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["__class__", "__dict__", "_modules", "_parameters", "forward",
                                  "__init__", "kernels", "__import__", "os"])
def test_layer_names_that_shadow_module_internals_work(name):
    """Layer names become nn.Module keys (host code): dunder and private names
    must neither break the module nor replace its attributes."""
    src = f"""net A(x: f32[N, 1, 6, 6]) {{
        h = conv(x, 2, kernel=3, name="{name}")
        return dense(flatten(h), 2, name="{name}.out")
    }}"""
    net = convdsl.compile(src, backend="torch")
    assert list(net.state_dict()) == [f"{name}.weight", f"{name}.bias", f"{name}.out.weight",
                                      f"{name}.out.bias"]
    assert isinstance(net._modules, dict) and isinstance(net._parameters, dict)
    x = torch.randn(3, 1, 6, 6)
    w, b = net.state_dict()[f"{name}.weight"], net.state_dict()[f"{name}.bias"]
    h = torch.nn.functional.conv2d(x, w, b).flatten(1)
    want = torch.nn.functional.linear(h, net.state_dict()[f"{name}.out.weight"],
                                      net.state_dict()[f"{name}.out.bias"])
    torch.testing.assert_close(net(x), want)
    net(x).sum().backward()
    assert all(p.grad is not None for p in net.parameters())


BAD_NAMES = [
    r'"a\"b"', r'"a\nb"', r'"x\"); import os #"', '"__import__(\'os\').system(\'id\')"',
    '"a b"', '""', '"1a"', '"a..b"', '".a"', '"a."', r'"\u00e9"', r'"\u0000"', r'"a\tb"',
    '"tl.load(x)"', '"a+b"', '"a-b"', r'"\"\"\""', r'"\\"', '"a/b"', '"a:b"',
]


@pytest.mark.parametrize("literal", BAD_NAMES)
def test_name_strings_that_are_not_layer_names_are_refused(literal):
    src = f"net A(x: f32[N, 1, 6, 6]) {{\n    return conv(x, 2, kernel=3, name={literal})\n}}"
    with pytest.raises(ConvDSLError) as info:
        convdsl.compile(src, backend="triton")
    err = info.value
    assert err.line == 2 and "is not a layer name" in err.message
    # The name is shown escaped: the diagnostic stays three lines whatever it holds.
    lines = str(err).split("\n")
    assert len(lines) == 3 and lines[0].startswith("<string>:2:")
    assert lines[2].strip().startswith("^")


@pytest.mark.parametrize("literal", [r'"\x"', r'"\777"', r'"\N{NOT A NAME}"', r'"\q"'])
def test_bad_escapes_in_strings_are_syntax_errors(literal):
    src = f"net A(x: f32[N, 1, 6, 6]) {{\n    return conv(x, 2, kernel=3, name={literal})\n}}"
    with pytest.raises(ConvDSLError) as info:
        convdsl.compile(src)
    assert info.value.line == 2 and "bad escape sequence" in info.value.message


def test_share_of_a_hostile_string_is_refused():
    src = """net A(x: f32[N, 1, 6, 6]) {
        h = conv(x, 1, kernel=3, pad=same)
        return conv(h, 1, kernel=3, share="h); import os")
    }"""
    with pytest.raises(ConvDSLError, match="must name a layer"):
        convdsl.compile(src)
