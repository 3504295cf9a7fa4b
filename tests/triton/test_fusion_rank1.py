"""A frozen rank-1 kernel found by the optimizer runs as fused 1-D passes
(families/rank1.py) and computes what the dense conv computes."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.initializers import gaussian

SOURCE = """
net Blur(x: f32[N, 2, 11, 12]) {
    b = depthwise(x, 5, pad=same, init=gaussian(1.2), bias=none, trainable=false)
    return relu(conv(b, 4, kernel=3))
}
"""


def test_blur_runs_separable_and_matches_dense_conv():
    torch.manual_seed(0)
    net = convdsl.compile(SOURCE, backend="triton")
    assert [p.family for p in net._program.inference.plans] == ["separable_rank1", "conv"]
    kernel = gaussian((2, 1, 5, 5), 1.2)
    torch.testing.assert_close(net.state_dict()["b.weight"], kernel)
    sd = {k: v.detach().clone().requires_grad_() for k, v in net.state_dict().items()}
    x = torch.randn(2, 2, 11, 12, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    ref = F.relu(F.conv2d(F.conv2d(xr, kernel, padding=2, groups=2), sd["conv.weight"],
                          sd["conv.bias"]))
    y = net(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    seed = torch.randn_like(y)
    (y * seed).sum().backward()
    (ref * seed).sum().backward()
    for name, p in net.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, sd[name].grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_weights_that_are_no_longer_rank1_fall_back_exactly():
    net = convdsl.compile(SOURCE, backend="triton")
    state = net.state_dict()
    state["b.weight"] = torch.randn_like(state["b.weight"])
    net.load_state_dict(state)
    x = torch.randn(1, 2, 11, 12)
    ref = F.relu(F.conv2d(F.conv2d(x, state["b.weight"], padding=2, groups=2),
                          state["conv.weight"], state["conv.bias"]))
    with pytest.warns(convdsl.ConvDSLWarning, match="not .*computing it densely"):
        y = net(x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_rank1_fused_with_its_activation():
    net = convdsl.compile("net A(x: f32[N, 1, 10, 10]) { return relu(conv(x, 2, kernel=5, "
                          "init=gaussian(1.0), trainable=false, bias=none)) }", backend="triton")
    (plan,) = net._program.inference.plans
    assert plan.family == "separable_rank1" and "relu" in plan.name
    x = torch.randn(2, 1, 10, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(net(x), F.relu(F.conv2d(x, gaussian((2, 1, 5, 5), 1.0))),
                                   rtol=1e-4, atol=1e-5)
