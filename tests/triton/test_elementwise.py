"""Elementwise chains and views on the triton backend (under the interpreter)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.triton.aot import compile_program
from convdsl.triton.codegen import safe_name

REFERENCES = {
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "leaky_relu(x, slope=0.2)": lambda x: F.leaky_relu(x, 0.2),
    "elu(x, alpha=0.5)": lambda x: F.elu(x, 0.5),
    "softplus": F.softplus,
    "identity": lambda x: x,
}


def one(expr: str, dtype="f32", shape="N, 3, 5, 7"):
    call = expr if "(" in expr else f"{expr}(x)"
    return convdsl.compile(f"net E(x: {dtype}[{shape}]) {{\n  return {call}\n}}", backend="triton")


@pytest.mark.parametrize("expr", list(REFERENCES))
def test_activation_matches_pytorch(expr):
    net = one(expr)
    x = torch.randn(2, 3, 5, 7) * 4
    x[0, 0, 0, :3] = torch.tensor([30.0, -30.0, 0.0])
    torch.testing.assert_close(net(x), REFERENCES[expr](x), atol=2e-6, rtol=1e-5)


def test_relu_propagates_nan_like_pytorch():
    x = torch.tensor([[math.nan, -1.0, 2.0]])
    got = convdsl.compile("net R(x: f32[N, 3]) {\n return relu(x)\n}", backend="triton")(x)
    assert math.isnan(got[0, 0]) and got[0, 1] == 0 and got[0, 2] == 2


def test_chain_is_one_kernel_and_matches():
    src = """net C(x: f32[N, 4, H, W], y: f32[N, 4, H, W]) {
        a = relu(x) * 2.5 + y
        b = 1 - tanh(a)
        return sigmoid(-b * y)
    }"""
    net = convdsl.compile(src, backend="triton")
    assert len(net.kernels) == 1
    x, y = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    expected = torch.sigmoid(-(1 - torch.tanh(torch.relu(x) * 2.5 + y)) * y)
    torch.testing.assert_close(net(x, y), expected)


def test_chain_breaks_where_an_intermediate_is_used_twice():
    src = """net C(x: f32[N, 4]) {
        a = relu(x)
        return a * sigmoid(a)
    }"""
    net = convdsl.compile(src, backend="triton")
    x = torch.randn(3, 4)
    torch.testing.assert_close(net(x), torch.relu(x) * torch.sigmoid(torch.relu(x)))
    assert len(net.kernels) == 2


@pytest.mark.parametrize("dtype,torch_dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
def test_low_precision_keeps_dtype(dtype, torch_dtype):
    net = one("tanh(relu(x) + x * 0.5)", dtype)
    x = torch.randn(2, 3, 5, 7)
    got = net(x.to(torch_dtype))
    assert got.dtype == torch_dtype
    torch.testing.assert_close(got.float(), torch.tanh(torch.relu(x) + x * 0.5), atol=2e-2,
                               rtol=2e-2)


def test_non_contiguous_input():
    net = one("relu(x) - 1")
    x = torch.randn(2, 7, 5, 3).permute(0, 3, 2, 1)
    torch.testing.assert_close(net(x), torch.relu(x) - 1)


def test_gradients_flow():
    src = "net G(x: f32[N, 3], y: f32[N, 3]) {\n  return tanh(x * y) + y\n}"
    net = convdsl.compile(src, backend="triton")
    x, y = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    net(x, y).pow(2).sum().backward()
    gx, gy = x.grad.clone(), y.grad.clone()
    x.grad = y.grad = None
    (torch.tanh(x * y) + y).pow(2).sum().backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gy, y.grad)


def test_flatten_and_split_are_views_without_kernels():
    src = """net V(x: f32[N, 4, 3, 3]) {
        a, b = split(x, [1, 3])
        return flatten(b), a
    }"""
    net = convdsl.compile(src, backend="triton")
    assert net.kernels == {}
    x = torch.randn(2, 4, 3, 3)
    flat, a = net(x)
    torch.testing.assert_close(flat, torch.flatten(x[:, 1:], 1))
    assert a.data_ptr() == x.data_ptr()  # a view of the input, no copy


@pytest.mark.parametrize("name", ["lambda", "tl", "pid", "None", "import", "triton"])
def test_hostile_layer_names_never_reach_kernel_code(name):
    src = f"""net H(x: f32[N, 2, 6, 6]) {{
        {name}_out = relu(conv(x, 2, kernel=3, name="{name}")) * 2
        return {name}_out
    }}"""
    net = convdsl.compile(src, backend="triton")
    for source in net.kernels.values():
        compile(source, "<kernel>", "exec")  # valid Python


def test_safe_names():
    assert safe_name("conv", "lambda") == "k_conv_lambda"
    assert safe_name("x\"); import os #") == "k_x____import_os"
    assert safe_name("None").isidentifier()


def test_generated_source_is_deterministic():
    src = "net D(x: f32[N, 3]) {\n  return sigmoid(relu(x) * 3) - 1\n}"
    a = convdsl.compile(src, backend="triton").kernels
    b = convdsl.compile(src, backend="triton").kernels
    assert a == b and len(a) == 1


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_elementwise_kernels_compile_ahead_of_time(target):
    src = "net A(x: f16[N, 3, H, W], y: f16[N, 3, H, W]) {\n  return tanh(x + y) * 2\n}"
    net = convdsl.compile(src, backend="triton")
    reports = compile_program(net._program, target, None, {"N": 8, "H": 32, "W": 32})
    assert len(reports) == 1
    report = reports[0]
    assert report.registers and report.registers > 0 and report.spills == 0
    assert report.flops == 8 * 3 * 32 * 32 * 3 and report.bytes == 8 * 3 * 32 * 32 * 2 * 3


def test_cli_compile_writes_kernels_ir_and_report(tmp_path):
    from convdsl.cli import main

    path = tmp_path / "e.cdsl"
    path.write_text("net E(x: f32[N, 3, H, W]) {\n  return relu(x) * 2\n}\n")
    out = tmp_path / "out"
    assert main(["compile", str(path), "-o", str(out), "--target", "sm_90", "--shape", "N=4"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == "sm_90" and report["sizes"] == {"H": 32, "N": 4, "W": 32}
    (kernel,) = report["kernels"]
    assert kernel["direction"] == "forward" and kernel["spills"] == 0
    assert set(kernel) >= {"name", "direction", "registers", "spills", "shared_bytes", "flops",
                           "bytes"}
    assert (out / f"{kernel['name']}.py").exists() and (out / f"{kernel['name']}.ptx").exists()
    assert (out / "ir.optimized.txt").exists()
    assert main(["compile", str(path), "-o", str(out), "--target", "sm_7"]) == 1
