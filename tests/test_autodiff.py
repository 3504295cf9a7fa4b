"""The derived backward graph (issue 4): one VJP rule per op, checked against
PyTorch autograd in float64 for every op, plus the 'only what is needed' rules."""
import pytest
import torch

import convdsl
from convdsl.autodiff import evaluate_backward
from convdsl.ops import OPS

# (name, inputs declaration, body returning one or more values)
PROGRAMS = [
    ("conv", "x: f32[N, 2, 7, 6]", "return conv(x, 3, kernel=3, stride=2, pad=same, dilation=1)"),
    ("conv-dilated-groups", "x: f32[N, 4, 9, 9]",
     "return conv(x, 4, kernel=3, dilation=2, groups=2, pad=((1, 2), (0, 1)))"),
    ("conv-table-flip", "x: f32[N, 3, 6, 6]",
     "return conv(x, 2, kernel=3, connect=[[0, 2], [1]], flip=true, bias=location)"),
    ("conv-separable", "x: f32[N, 2, 6, 7]", "return conv(x, 3, kernel=(3, 2), separable=true)"),
    ("conv-1d", "x: f32[N, 2, 9]", "return conv(x, 2, kernel=4, stride=3, pad=full)"),
    ("conv-3d", "x: f32[N, 1, 4, 5, 4]", "return conv(x, 2, kernel=2, pad=same)"),
    ("depthwise", "x: f32[N, 3, 6, 6]", "return depthwise(x, 3, multiplier=2, pad=1)"),
    ("local", "x: f32[N, 2, 5, 5]", "return local(x, 3, kernel=2, stride=1)"),
    ("tiled", "x: f32[N, 2, 6, 5]", "return tiled(x, 3, kernel=2, tiles=(2, 3))"),
    ("deconv", "x: f32[N, 3, 4, 4]", "return deconv(x, 2, kernel=3, stride=2, pad=same, size=7)"),
    ("dense", "x: f32[N, 5]", "return dense(x, 3)"),
    ("activations", "x: f32[N, 2, 4]",
     "return relu(x) + sigmoid(x) * tanh(x) - leaky_relu(x, slope=0.1) + elu(x) + softplus(x)"),
    ("softmax", "x: f32[N, 4, 3]", "return softmax(x) * log_softmax(x, axis=2)"),
    ("pools", "x: f32[N, 2, 6, 6]",
     "return maxpool(x, 3, stride=2, pad=1) + avgpool(x, 3, stride=2, pad=1) "
     "+ lppool(x, 3, p=3, stride=2, pad=1) + wavgpool(x, 3, stride=2, pad=1)"),
    ("adaptive", "x: f32[N, 2, 7, 5]",
     "return maxpool(x, output=3) * avgpool(x, output=3) + lppool(x, output=3) "
     "- wavgpool(x, output=3)"),
    ("maxout", "x: f32[N, 6, 3, 3]", "return maxout(x, pieces=3)"),
    ("structure", "x: f32[N, 4, 3, 3], y: f32[N, 2, 3, 3]",
     "a, b = split(x, [1, 3])\n  c = concat(b, y, a)\n  return dense(flatten(c), 2)"),
    ("split-unused-half", "x: f32[N, 4, 3]", "a, b = split(x, [2, 2])\n  return relu(a)"),
    ("arithmetic", "x: f32[N, 3], y: f32[N, 3]", "return 2 - x * y + x * 3 - y + (-x)"),
    ("fan-out", "x: f32[N, 2, 5, 5]",
     "h = conv(x, 2, kernel=3, pad=same)\n  return relu(h) * h + h"),
    ("shared", "x: f32[N, 2, 5, 5]",
     "a = conv(x, 2, kernel=3, pad=same)\n  b = conv(tanh(a), 2, kernel=3, pad=same, share=a)\n"
     "  return b"),
    ("tied-autoencoder", "x: f32[N, 1, 6, 6]",
     "e = relu(conv(x, 3, kernel=3, stride=2, pad=1))\n"
     "  return deconv(e, 1, kernel=3, stride=2, pad=1, size=6, share=e)"),
    ("two-outputs", "x: f32[N, 2, 4, 4]", "h = relu(conv(x, 3, kernel=1))\n  return h, avgpool(h, 2)"),
]


def build(decl, body):
    return convdsl.compile(f"net T({decl}) {{\n  {body}\n}}").double()


def random_inputs(net):
    torch.manual_seed(0)
    shapes = []
    for node_id in net._graph.inputs:
        t = net._graph.node(node_id).types[0]
        shapes.append([3 if not d.is_Integer else int(d) for d in t.shape])
    return tuple(torch.randn(s, dtype=torch.float64) for s in shapes)


@pytest.mark.parametrize("name,decl,body", PROGRAMS, ids=[p[0] for p in PROGRAMS])
def test_derived_gradients_match_autograd(name, decl, body):
    net = build(decl, body)
    inputs = random_inputs(net)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    names = tuple(net.input_names)
    leaves = [x.clone().requires_grad_() for x in inputs]
    outputs = net(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    seeds = tuple(torch.randn_like(o) for o in outputs)
    torch.autograd.backward(outputs, seeds)
    derived = evaluate_backward(net, inputs, seeds, inputs_with_grad=names)
    expected = {k: p.grad for k, p in net.named_parameters() if p.requires_grad}
    expected.update({f"input:{n}": leaf.grad for n, leaf in zip(names, leaves)})
    assert set(derived) == {k for k, v in expected.items() if v is not None}
    for key, grad in derived.items():
        torch.testing.assert_close(grad, expected[key], msg=key)


def test_every_forward_op_has_a_vjp_rule():
    forward = [n for n in OPS.names() if OPS[n].family != "grad" and n != "_input"]
    assert [n for n in forward if OPS[n].vjp is None] == []


def backward_text(src, **kw):
    return convdsl.compile(src).backward(**kw).graph


def test_first_layer_input_gradient_is_skipped():
    src = "net A(x: f32[N, 1, 6, 6]) {\n  return conv(relu(conv(x, 2, kernel=3)), 2, kernel=3)\n}"
    net = convdsl.compile(src)
    ops = _ops_and_steps(net.backward().graph)
    assert ops.count("_conv_dx") == 1 and ops.count("_conv_dw") == 2
    with_input = _ops_and_steps(net.backward(("x",)).graph)
    assert with_input.count("_conv_dx") == 2


def _ops_and_steps(graph) -> list[str]:
    """Every op of a graph, the steps of fused nodes included."""
    return [s["op"] for n in graph.nodes()
            for s in (n.attrs["steps"] if n.op == "_fused" else [{"op": n.op}])]


def test_frozen_layers_get_no_weight_gradient():
    src = """net F(x: f32[N, 1, 6, 6]) {
        f = relu(conv(x, 4, kernel=3, init=edges, trainable=false))
        return dense(flatten(f), 2)
    }"""
    bwd = convdsl.compile(src).backward()
    ops = [n.op for n in bwd.graph.nodes()]
    assert "_conv_dw" not in ops and "_conv_dx" not in ops and "_relu_dx" not in ops
    assert bwd.grads == ["dense.weight", "dense.bias"]


def test_only_what_the_rules_read_is_saved():
    src = """net S(x: f32[N, 2, 8, 8]) {
        a = avgpool(conv(x, 2, kernel=1), 2)
        return relu(a)
    }"""
    bwd = convdsl.compile(src).backward()
    saved = sorted(bwd.graph.node(n).attrs["name"] for n in bwd.saved.values())
    # relu reads its output; conv's weight gradient reads its input; avgpool reads nothing
    assert saved == ["saved %3", "saved x"]


def test_shared_parameters_accumulate_over_every_use():
    src = """net S(x: f32[N, 2, 5, 5]) {
        a = conv(x, 2, kernel=3, pad=same)
        b = conv(a, 2, kernel=3, pad=same, share=a)
        return b
    }"""
    bwd = convdsl.compile(src).backward()
    assert bwd.grads == ["a.weight", "a.bias"]
    adds = [n for n in bwd.graph.nodes() if n.op == "_add"]
    assert len(adds) == 2  # weight and bias: one contribution from each use


def test_backward_ir_is_printable_in_every_format():
    net = convdsl.compile("examples/lenet5.cdsl", net="LeNet5")
    text = net.ir("backward")
    assert text.startswith("net LeNet5.backward(dout0: f32[N, 10], saved f6")
    assert "conv_dw(" in text and "from=%1 conv" in text
    assert "return " in text and "(c1.weight)" in text
    assert net.ir("backward", format="dot").startswith("digraph")
    assert '"origin": "%12 dense"' in net.ir("backward", format="json")


def test_cli_prints_the_backward_stage(capsys):
    from convdsl.cli import main

    assert main(["ir", "examples/lenet5.cdsl", "--net", "FullyConv", "--stage", "backward"]) == 0
    assert "conv_dw" in capsys.readouterr().out
