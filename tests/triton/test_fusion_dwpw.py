"""Depthwise → pointwise fused into one kernel (families/dwpw.py): forward and
backward equal PyTorch's own depthwise and 1×1 convs, with fewer kernels."""
import pytest
import torch
import torch.nn.functional as F

import convdsl

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
ACT = {"relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "identity": lambda t: t}


def _source(rank, channels, mult, stride, mid_act, out_act, out=20, dtype="f32"):
    sizes = {1: "17", 2: "9, 8", 3: "5, 6, 7"}[rank]
    return f"""
net DwPw(x: {dtype}[N, {channels}, {sizes}]) {{
    d = {mid_act}(depthwise(x, 3, stride={stride}, pad=1, multiplier={mult}))
    return {out_act}(conv(d, {out}, kernel=1))
}}
"""


def _reference(x, sd, rank, channels, stride, mid_act, out_act):
    conv = CONV[rank]
    d = ACT[mid_act](conv(x, sd["d.weight"], sd["d.bias"], stride=stride, padding=1,
                          groups=channels))
    return ACT[out_act](conv(d, sd["conv.weight"], sd["conv.bias"]))


@pytest.mark.parametrize("rank,channels,mult,stride,mid_act,out_act", [
    (2, 6, 1, 1, "relu", "relu"),
    (2, 6, 2, 2, "relu", "identity"),      # multiplier 2, stride 2, no final activation
    (2, 5, 1, 1, "identity", "tanh"),      # nothing between the convs
    (1, 4, 3, 2, "sigmoid", "relu"),
    (3, 3, 1, 1, "relu", "relu"),
])
def test_forward_and_backward_match_pytorch(rank, channels, mult, stride, mid_act, out_act):
    torch.manual_seed(rank * 10 + mult)
    net = convdsl.compile(_source(rank, channels, mult, stride, mid_act, out_act),
                          backend="triton")
    assert [p.family for p in net._program.inference.plans] == ["dwpw"]
    unfused = convdsl.compile(_source(rank, channels, mult, stride, mid_act, out_act),
                              backend="triton", optimize=False)
    assert len([p for p in unfused._program.inference.plans if p.source]) >= 3
    sd = {k: v.detach().clone().requires_grad_() for k, v in net.state_dict().items()}
    shape = {1: (2, channels, 17), 2: (2, channels, 9, 8), 3: (2, channels, 5, 6, 7)}[rank]
    x = torch.randn(shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y = net(x)
    ref = _reference(xr, sd, rank, channels, stride, mid_act, out_act)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    seed = torch.randn_like(y)
    (y * seed).sum().backward()
    (ref * seed).sum().backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, sd[name].grad, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the inference kernel stores nothing extra and agrees
        torch.testing.assert_close(net(x), y.detach())
    training = net._program._training.plans
    assert [p.family for p in training] == ["dwpw"] and training[0].name.find("saving") > 0


def test_bf16_forward_within_tolerance():
    torch.manual_seed(1)
    net = convdsl.compile(_source(2, 8, 1, 1, "relu", "relu", out=24, dtype="bf16"),
                          backend="triton")
    x = torch.randn(2, 8, 9, 8).to(torch.bfloat16)
    sd = {k: v.float() for k, v in net.state_dict().items()}
    ref = _reference(x.float(), sd, 2, 8, 1, "relu", "relu")
    torch.testing.assert_close(net(x).float(), ref, rtol=2e-2, atol=2e-2)


def test_example_net_uses_the_fused_kernel():
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "separable_blur.cdsl"
    net = convdsl.compile(path, net="DepthwiseSeparableNet", backend="triton")
    families = [p.family for p in net._program.inference.plans]
    assert families.count("dwpw") == 3


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_compiles_for_sm90_without_spills(dtype):
    from convdsl.triton.aot import compile_program

    net = convdsl.compile(f"""
net A(x: {dtype}[N, 32, 28, 28]) {{
    d = relu(depthwise(x, 3, pad=1))
    return relu(conv(d, 64, kernel=1))
}}""", backend="triton")
    net._program.programs(net)
    reports = [r for r in compile_program(net._program, "sm_90", None, {"N": 8})
               if "dwpw" in r.name]
    assert len(reports) == 2  # inference and training variants
    assert all(r.spills == 0 for r in reports), [(r.name, r.registers, r.spills) for r in reports]
