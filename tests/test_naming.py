"""Layer and parameter names (LANGUAGE.md §5): the state_dict keys."""
import pytest
import torch

import convdsl


def keys(src, **kw):
    return list(convdsl.compile(src, backend="torch", **kw).state_dict())


def test_statement_names_its_layer():
    src = """net A(x: f32[N, 1, 8, 8]) {
        h = relu(conv(x, 4, kernel=3))
        return h
    }"""
    assert keys(src) == ["h.weight", "h.bias"]


def test_several_layers_in_one_statement_are_numbered_in_source_order():
    src = """net A(x: f32[N, 2, 8, 8], y: f32[N, 2, 8, 8]) {
        h = conv(x, 4, kernel=3) + conv(y, 4, kernel=3, bias=none)
        return h
    }"""
    net = convdsl.compile(src)
    sd = net.state_dict()
    assert list(sd) == ["h.0.weight", "h.0.bias", "h.1.weight"]


def test_nested_calls_are_numbered_by_position():
    src = """net A(x: f32[N, 2, 4, 4]) {
        h = dense(flatten(conv(x, 3, kernel=3)), 5)
        return h
    }"""
    sd = convdsl.compile(src).state_dict()
    assert sd["h.0.weight"].shape == (5, 12)  # dense comes first in the text
    assert sd["h.1.weight"].shape == (3, 2, 3, 3)


def test_rebinding_gives_ssa_names():
    src = """net A(x: f32[N, 2, 8, 8]) {
        h = conv(x, 2, kernel=3, pad=same)
        h = conv(h, 2, kernel=3, pad=same)
        h = relu(h)
        h = conv(h, 2, kernel=3, pad=same)
        return h
    }"""
    assert [k for k in keys(src) if k.endswith("weight")] == ["h.weight", "h_2.weight", "h_4.weight"]


def test_rebinding_an_input_counts_as_second_binding():
    src = """net A(x: f32[N, 2, 8, 8]) {
        x = conv(x, 2, kernel=3)
        return x
    }"""
    assert keys(src) == ["x_2.weight", "x_2.bias"]


def test_return_statement_layers_are_named_after_the_op():
    src = """net A(x: f32[N, 4]) {
        f = relu(dense(x, 8))
        return dense(f, 3)
    }"""
    assert keys(src) == ["f.weight", "f.bias", "dense.weight", "dense.bias"]


def test_plain_block_calls_prefix_inner_names():
    src = """
    block conv_relu(x, c, k=3) {
        y = conv(x, c, kernel=k, pad=same)
        return relu(y)
    }
    net A(x: f32[N, 1, 8, 8]) {
        r = conv_relu(x, 4)
        s = conv_relu(r, 8, k=5)
        return s
    }"""
    net = convdsl.compile(src)
    sd = net.state_dict()
    assert list(sd) == ["r.y.weight", "r.y.bias", "s.y.weight", "s.y.bias"]
    assert sd["s.y.weight"].shape == (8, 4, 5, 5)


def test_block_return_layers_and_nesting():
    src = """
    block inner(x) { return conv(x, 2, kernel=1) }
    block outer(x) {
        a = inner(x)
        return inner(a)
    }
    net A(x: f32[N, 2, 4, 4]) {
        o = outer(x)
        return o
    }"""
    assert [k for k in keys(src) if k.endswith("weight")] == ["o.a.conv.weight",
                                                              "o.inner.conv.weight"]


def test_shared_block_uses_one_parameter_set():
    src = """
    shared block refine(x, y) {
        h = relu(conv(x, 4, kernel=3, pad=same) + conv(y, 4, kernel=3, pad=same, bias=none))
        return softmax(conv(h, 4, kernel=1))
    }
    net R(image: f32[N, 4, 8, 8]) {
        y1 = refine(image, image)
        y2 = refine(image, y1)
        y3 = refine(image, y2)
        return y3
    }"""
    net = convdsl.compile(src)
    assert list(net.state_dict()) == ["refine.h.0.weight", "refine.h.0.bias", "refine.h.1.weight",
                                      "refine.conv.weight", "refine.conv.bias"]
    y = net(torch.randn(2, 4, 8, 8))
    y.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_name_override_and_dotted_names():
    src = """net A(x: f32[N, 1, 8, 8]) {
        h = conv(x, 2, kernel=3, name="enc.first")
        return conv(h, 2, kernel=3, name="U")
    }"""
    assert keys(src) == ["enc.first.weight", "enc.first.bias", "U.weight", "U.bias"]


def test_name_override_inside_plain_block_keeps_prefix():
    src = """
    block b(x) { return conv(x, 2, kernel=1, name="U") }
    net A(x: f32[N, 2, 4, 4]) {
        r = b(x)
        return r
    }"""
    assert keys(src) == ["r.U.weight", "r.U.bias"]


@pytest.mark.parametrize("name", ["lambda", "import", "tl", "triton", "pid", "None", "self",
                                  "training", "forward", "ir", "weight", "state_dict"])
def test_layer_names_that_are_python_words_work(name):
    src = f"""net A(x: f32[N, 1, 6, 6]) {{
        h = conv(x, 2, kernel=3, name="{name}")
        return h
    }}"""
    net = convdsl.compile(src)
    assert list(net.state_dict()) == [f"{name}.weight", f"{name}.bias"]
    assert net(torch.randn(1, 1, 6, 6)).shape == (1, 2, 4, 4)
    assert callable(net.forward) and callable(net.ir)


def test_share_reuses_parameters_and_accumulates_gradients():
    src = """net A(x: f32[N, 2, 6, 6]) {
        a = conv(x, 2, kernel=3, pad=same)
        b = conv(a, 2, kernel=3, pad=same, share=a)
        return b
    }"""
    net = convdsl.compile(src)
    assert list(net.state_dict()) == ["a.weight", "a.bias"]
    x = torch.randn(1, 2, 6, 6)
    net(x).sum().backward()
    w, bias = net.state_dict()["a.weight"], net.state_dict()["a.bias"]
    w_ref = w.clone().requires_grad_()
    b_ref = bias.clone().requires_grad_()
    conv = lambda t: torch.nn.functional.conv2d(t, w_ref, b_ref, padding=1)
    conv(conv(x)).sum().backward()
    params = dict(net.named_parameters())
    torch.testing.assert_close(params["a.weight"].grad, w_ref.grad)
    torch.testing.assert_close(params["a.bias"].grad, b_ref.grad)


def test_tied_deconv_shares_the_conv_kernel():
    src = """net AE(x: f32[N, 1, 8, 8]) {
        enc = relu(conv(x, 4, kernel=3, stride=2, pad=1))
        return deconv(enc, 1, kernel=3, stride=2, pad=1, size=8, share=enc)
    }"""
    net = convdsl.compile(src)
    assert list(net.state_dict()) == ["enc.weight", "enc.bias", "deconv.bias"]


def test_state_dict_roundtrip(tmp_path):
    src = """net A(x: f32[N, 1, 8, 8]) {
        h = relu(conv(x, 3, kernel=3))
        return dense(flatten(h), 2)
    }"""
    a, b = convdsl.compile(src), convdsl.compile(src)
    path = tmp_path / "w.pt"
    torch.save(a.state_dict(), path)
    b.load_state_dict(torch.load(path))
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x))


def test_parameter_count_counts_only_table_connections():
    src = """table T = [[0], [0, 1], [1]]
    net A(x: f32[N, 2, 8, 8]) {
        return conv(x, 3, kernel=3, connect=T)
    }"""
    net = convdsl.compile(src)
    assert net.state_dict()["conv.weight"].shape == (3, 2, 3, 3)
    assert net.parameter_count() == 4 * 9 + 3


def test_lenet5_has_60806_parameters():
    net = convdsl.compile("examples/lenet5.cdsl", net="LeNet5")
    assert net.parameter_count() == 60806


def test_frozen_layers_have_no_gradient():
    src = """net A(x: f32[N, 1, 8, 8]) {
        f = relu(conv(x, 4, kernel=3, init=edges, trainable=false))
        return dense(flatten(f), 2)
    }"""
    net = convdsl.compile(src)
    params = dict(net.named_parameters())
    assert not params["f.weight"].requires_grad and not params["f.bias"].requires_grad
    net(torch.randn(2, 1, 8, 8)).sum().backward()
    assert params["f.weight"].grad is None and params["dense.weight"].grad is not None
    assert net.parameter_count(trainable_only=True) == 2 * 144 + 2
