"""Training through generated kernels: forward kernels, then the kernels of the
derived backward graph (issue 4)."""
import warnings
from pathlib import Path

import torch

import convdsl
from convdsl.compiler import load_program

SMALL = """net Small(x: f32[N, 1, 8, 8]) {
    h = relu(conv(x, 4, kernel=3, pad=same))
    p = maxpool(h, 2)
    return dense(flatten(p), 3)
}"""


def test_a_short_training_run_lowers_the_loss():
    torch.manual_seed(0)
    net = convdsl.compile(SMALL, backend="triton")
    x = torch.randn(16, 1, 8, 8)
    target = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert net._program._backward[()].reference_ops() == []


def test_gradients_equal_the_torch_backend():
    torch.manual_seed(1)
    tri = convdsl.compile(SMALL, backend="triton")
    ref = convdsl.compile(SMALL, backend="torch")
    ref.load_state_dict(tri.state_dict())
    x = torch.randn(4, 1, 8, 8)
    xt, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    seed = torch.randn(4, 3)
    (tri(xt) * seed).sum().backward()
    (ref(xr) * seed).sum().backward()
    torch.testing.assert_close(xt.grad, xr.grad, atol=1e-5, rtol=1e-4)
    for (name, a), b in zip(tri.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_every_example_backward_runs_only_generated_kernels():
    """Lowering only (no execution): no gradient op is left to the torch lowering."""
    root = Path(__file__).resolve().parents[2] / "examples"
    leftovers = {}
    for path in sorted(root.glob("*.cdsl")):
        for name in load_program(path).nets:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                net = convdsl.compile(path, net=name, backend="triton")
            for program in net._program.programs(net):
                ops = program.reference_ops()
                if ops:
                    leftovers[f"{path.name}:{name}"] = ops
    assert leftovers == {}
