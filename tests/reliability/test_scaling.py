"""The compiler's own time on long nets: deriving the backward graph is linear
in the number of layers (it used to search the whole forward graph once per
parameter: a minute for 1,000 layers), and the faster derivation computes the
same gradients as PyTorch's autograd and the same IR as the per-parameter search."""
from __future__ import annotations

import time
import warnings

import pytest
import torch

import convdsl
from convdsl import autodiff
from convdsl.autodiff import derive_backward, evaluate_backward
from convdsl.ir.graph import Graph


def conv_relu_stack(layers: int) -> str:
    return ("net Deep(x: f32[N, 4, H, W]) {\n    h = x\n"
            + "    h = relu(conv(h, 4, kernel=3, pad=1))\n" * layers
            + "    return h\n}\n")


def compile_quiet(src: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convdsl.compile(src, **kw)


def derive_seconds(net) -> float:
    start = time.process_time()
    derive_backward(net._graph, ())
    return time.process_time() - start


def count_forward_walks(net, monkeypatch) -> int:
    """How many times deriving the backward graph walks the forward graph."""
    walks = []
    forward_nodes = Graph.nodes

    def counted(graph):
        if graph is net._graph:
            walks.append(1)
        return forward_nodes(graph)

    monkeypatch.setattr(Graph, "nodes", counted)
    derive_backward(net._graph, ())
    monkeypatch.undo()
    return len(walks)


def test_the_forward_graph_is_walked_a_fixed_number_of_times(monkeypatch):
    """A walk per parameter made derivation quadratic; the count must not grow with depth."""
    short = count_forward_walks(compile_quiet(conv_relu_stack(4)), monkeypatch)
    long = count_forward_walks(compile_quiet(conv_relu_stack(120)), monkeypatch)
    assert short == long <= 5


def test_a_thousand_layers_derive_their_backward_graph_in_seconds():
    # Unoptimized (2,000 nodes, and a compile three times cheaper): the quadratic
    # derivation took ~22 s of CPU here on a 2-core machine, the linear one ~0.3 s.
    net = compile_quiet(conv_relu_stack(1000), optimize=False)
    seconds = derive_seconds(net)
    print(f"\nbackward graph of 1000 layers: {seconds:.2f} s of CPU")
    assert seconds < 5


@pytest.mark.slow
def test_three_thousand_optimized_layers_derive_their_backward_graph_in_seconds():
    net = compile_quiet(conv_relu_stack(3000))
    seconds = derive_seconds(net)
    print(f"\nbackward graph of 3000 layers: {seconds:.2f} s of CPU")
    assert seconds < 15  # quadratic: ~90 s


# -- the same result as before, and as autograd ----------------------------------------------

# Shared layers (one parameter, several users) and a tied deconv: each parameter's gradient
# sums over its uses and is attributed to its first user.
SHARED = """net Shared(x: f32[N, 2, 6, 6]) {
    a = relu(conv(x, 3, kernel=3, pad=same))
    b = relu(conv(a, 3, kernel=3, pad=same))
    c = tanh(conv(b, 3, kernel=3, pad=same, share=b))
    d = relu(conv(c + a, 3, kernel=3, pad=same, share=b))
    e = relu(conv(d, 4, kernel=3, stride=2, pad=1))
    return deconv(e, 3, kernel=3, stride=2, pad=1, size=6, share=e) + d
}
"""


def owners_by_search(forward: Graph) -> dict:
    """The previous attribution, a whole-graph search for each parameter."""
    def first_user(param):
        return next(n for n in forward.nodes() if param in n.params.values())

    return {name: first_user(name) for name in forward.params
            if any(name in n.params.values() for n in forward.nodes())}


@pytest.mark.parametrize("src", [SHARED, conv_relu_stack(6)], ids=["shared", "stack"])
def test_backward_ir_is_the_one_the_per_parameter_search_gave(src, monkeypatch):
    net = compile_quiet(src)
    fast = net.ir("backward")
    monkeypatch.setattr(autodiff, "_owners", owners_by_search)
    assert compile_quiet(src).ir("backward") == fast


@pytest.mark.parametrize("src", [SHARED, conv_relu_stack(6)], ids=["shared", "stack"])
def test_gradients_match_autograd(src):
    net = compile_quiet(src).double()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * 0.5)
    channels = 2 if src is SHARED else 4
    x = torch.randn(2, channels, 6, 6, generator=generator, dtype=torch.float64)
    leaf = x.clone().requires_grad_()
    out = net(leaf)
    seed = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    out.backward(seed)
    derived = evaluate_backward(net, (x,), (seed,), inputs_with_grad=("x",))
    expected = {k: p.grad for k, p in net.named_parameters()}
    expected["input:x"] = leaf.grad
    assert set(derived) == set(expected)
    for key, grad in derived.items():
        torch.testing.assert_close(grad, expected[key], msg=key)
