"""The IR: golden text dumps of the examples, dot and JSON formats, determinism."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convdsl
from convdsl.passes import PIPELINE

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"
NETS = ["LeNet5", "FixedSize", "AnySize", "FullyConv"]


@pytest.mark.parametrize("stage", ["parsed", "optimized"])
@pytest.mark.parametrize("name", NETS)
def test_golden_ir(name, stage):
    """Set UPDATE_GOLDEN=1 to rewrite the expected dumps after an intended change."""
    text = convdsl.compile(ROOT / "examples" / "lenet5.cdsl", net=name).ir(stage)
    path = GOLDEN / f"lenet5.{name}.{stage}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_parsed_and_optimized_differ_by_the_passes():
    net = convdsl.compile(ROOT / "examples" / "lenet5.cdsl", net="LeNet5")
    assert "pad=valid" in net.ir("parsed")
    assert "pad=((0, 0), (0, 0))" in net.ir("optimized")
    assert [p.name for p in PIPELINE] == ["canonicalize", "infer-shapes", "dce", "separable-rank1",
                                          "fuse-epilogue", "fuse-depthwise-pointwise",
                                          "fuse-pooling"]


def test_ir_lines_carry_shapes_and_source_lines():
    text = convdsl.compile(ROOT / "examples" / "lenet5.cdsl", net="LeNet5").ir()
    conv_line = next(line for line in text.splitlines() if "layer=c1" in line)
    assert "f32[N, 6, 28, 28]" in conv_line and "@lenet5.cdsl:11" in conv_line


def test_depthwise_is_canonicalized_to_grouped_conv():
    net = convdsl.compile("net A(x: f32[N, 3, 8, 8]) { return depthwise(x, 3, multiplier=2) }")
    assert "depthwise(" in net.ir("parsed")
    line = next(l for l in net.ir().splitlines() if "conv(" in l)
    assert "groups=3" in line and "out=6" in line and "from=depthwise" in line


def test_dead_code_is_removed_but_parameters_stay():
    src = "net A(x: f32[N, 1, 8, 8]) {\n y = conv(x, 2, kernel=3)\n return relu(x)\n}"
    with pytest.warns(convdsl.ConvDSLWarning):
        net = convdsl.compile(src)
    assert "conv(" in net.ir("parsed") and "conv(" not in net.ir("optimized")
    assert list(net.state_dict()) == ["y.weight", "y.bias"]
    unopt = convdsl.compile(src, optimize=False)
    assert unopt.ir("optimized") == unopt.ir("parsed")


def test_dot_and_json_formats():
    net = convdsl.compile(ROOT / "examples" / "lenet5.cdsl", net="LeNet5", optimize=False)
    dot = net.ir(format="dot")
    assert dot.startswith('digraph "LeNet5" {') and "n0 -> n1;" in dot
    doc = json.loads(net.ir(format="json"))
    assert doc["net"] == "LeNet5" and doc["parameter_count"] == 60806
    conv = next(n for n in doc["nodes"] if n["layer"] == "c3")
    assert conv["op"] == "conv" and conv["types"][0]["shape"] == ["N", "16", "10", "10"]
    assert conv["params"] == {"bias": "c3.bias", "weight": "c3.weight"}
    assert conv["source"]["line"] == 13
    fused = json.loads(convdsl.compile(ROOT / "examples" / "lenet5.cdsl", net="LeNet5").ir(
        format="json"))
    node = next(n for n in fused["nodes"] if n["layer"] == "c3")
    assert node["op"] == "fused[conv+tanh+avgpool]"
    assert [s["op"] for s in node["attrs"]["steps"]] == ["conv", "tanh", "avgpool"]
    assert node["params"] == {"0.bias": "c3.bias", "0.weight": "c3.weight"}


def test_unknown_stage_or_format():
    net = convdsl.compile("net A(x: f32[N, 1]) { return x }")
    with pytest.raises(ValueError, match="unknown IR stage"):
        net.ir("lowered")
    with pytest.raises(ValueError, match="unknown IR format"):
        net.ir(format="yaml")


def test_symbolic_shapes_print_readably():
    net = convdsl.compile(ROOT / "examples" / "lenet5.cdsl", net="AnySize")
    assert "f32[N, 16, floor(H/2), floor(W/2)]" in net.ir()


def test_ir_is_identical_across_processes():
    code = ("import convdsl;print(convdsl.compile('examples/lenet5.cdsl', net='AnySize')"
            ".ir(format='json'))")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}, check=True).stdout
            for seed in (1, 2)]
    assert runs[0] == runs[1]
