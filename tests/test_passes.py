"""The optimizer: each pass visible (golden IR after it), verified, and
numerically neutral; fusion fires where it should and nowhere else."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.autodiff import evaluate_backward
from convdsl.cli import main
from convdsl.initializers import edges, gabor, gaussian
from convdsl.passes import BACKWARD_PIPELINE, PIPELINE, trace_passes
from convdsl.passes.separable import is_rank1, rank1_factors

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"

# Every pattern the passes know, in one small net.
PATTERNS = """
net Patterns(x: f32[N, 3, 12, 12]) {
    a = maxpool(relu(conv(x, 8, kernel=3, pad=1)), 2)            # conv+relu+maxpool
    b = relu(conv(depthwise(a, 3, pad=1), 8, kernel=1))          # depthwise -> pointwise
    c = relu(conv(b, 8, kernel=3, pad=1) + a)                    # + residual
    s = depthwise(c, 5, pad=2, init=gaussian(1.0), bias=none, trainable=false)  # rank-1
    return dense(flatten(s), 4)
}
"""


def ops_of(net):
    return [n.attrs["pattern"] if n.op == "_fused" else n.op for n in net._graph.nodes()
            if n.op != "_input"]


def test_pipeline_names_and_docs():
    names = [p.name for p in PIPELINE]
    assert names == ["canonicalize", "infer-shapes", "dce", "separable-rank1", "fuse-epilogue",
                     "fuse-depthwise-pointwise", "fuse-pooling"]
    assert [p.name for p in BACKWARD_PIPELINE] == ["fuse-backward-epilogue"]
    assert all(p.doc for p in (*PIPELINE, *BACKWARD_PIPELINE))


def test_patterns_fuse_as_expected():
    net = convdsl.compile(PATTERNS, backend="torch")
    assert ops_of(net) == ["conv+relu+maxpool", "conv+conv+relu", "conv+add+relu", "conv",
                           "flatten", "dense"]
    blur = next(n for n in net._graph.nodes() if n.layer == "s")
    assert blur.attrs["rank1_separable"] and "separable-rank1" in blur.origin
    assert "rank1_separable=true" in net.ir() and "fused[conv+relu+maxpool]" in net.ir()
    unfused = convdsl.compile(PATTERNS, backend="torch", optimize=False)
    assert "_fused" not in {n.op for n in unfused._graph.nodes()}


@pytest.mark.parametrize("step", range(len(PIPELINE) + len(BACKWARD_PIPELINE)))
def test_golden_ir_after_each_pass(step):
    """Set UPDATE_GOLDEN=1 to rewrite the expected dumps after an intended change."""
    net = convdsl.compile(PATTERNS, backend="torch")
    trace = trace_passes(net)
    assert [s.name for s in trace] == [p.name for p in (*PIPELINE, *BACKWARD_PIPELINE)]
    found = trace[step]
    path = GOLDEN / f"passes.{step:02d}.{found.name}.txt"
    text = found.text + ("\n# diff\n" + found.diff if found.changed else "\n# no change\n")
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_every_pass_changes_the_patterns_net():
    changed = {s.name for s in trace_passes(convdsl.compile(PATTERNS, backend="torch"))
               if s.changed}
    assert {"separable-rank1", "fuse-epilogue", "fuse-depthwise-pointwise", "fuse-pooling",
            "fuse-backward-epilogue"} <= changed


def _compare(source, net_name=None, sizes=None, dtype=torch.float64):
    """Optimized net (derived backward) vs the unoptimized one under torch
    autograd: same outputs, same gradients."""
    torch.manual_seed(0)
    fused = convdsl.compile(source, net=net_name, backend="torch")
    plain = convdsl.compile(source, net=net_name, backend="torch", optimize=False)
    plain.load_state_dict(fused.state_dict())
    fused.double()
    plain.double()
    graph = fused._graph
    inputs = []
    for i in graph.inputs:
        t = graph.node(i).types[0]
        inputs.append(torch.randn([int(d) if d.is_Integer else (sizes or {}).get(str(d), 12)
                                   for d in t.shape], dtype=dtype))
    out_f, out_p = fused(*inputs), plain(*inputs)
    torch.testing.assert_close(out_f, out_p, rtol=1e-12, atol=1e-12)
    seed = torch.randn_like(out_p)
    names = [n for n, p in plain.named_parameters() if p.requires_grad]
    params = dict(plain.named_parameters())
    want = torch.autograd.grad((out_p * seed).sum(), [params[n] for n in names])
    got = evaluate_backward(fused, tuple(inputs), (seed,))
    for name, ref in zip(names, want):
        torch.testing.assert_close(got[name], ref, rtol=1e-10, atol=1e-12, msg=name)


def test_patterns_are_numerically_neutral():
    _compare(PATTERNS)


@pytest.mark.parametrize("path,name", [
    ("lenet5.cdsl", "LeNet5"), ("alexnet.cdsl", "AlexNet"), ("digits.cdsl", "DigitsLeNet"),
    ("separable_blur.cdsl", "DepthwiseSeparableNet"), ("recurrent_labels.cdsl",
                                                        "RecurrentLabeler"),
    ("autoencoder.cdsl", "TiedAutoencoder"), ("separable_blur.cdsl", "FoundSeparable"),
])
def test_example_nets_are_numerically_neutral(path, name):
    _compare(ROOT / "examples" / path, name, sizes={"N": 2, "H": 12, "W": 12})


def test_fused_forward_matches_functional_reference():
    """conv+relu+maxpool as PyTorch's own ops compute it."""
    net = convdsl.compile("net A(x: f32[N, 2, 9, 9]) { return maxpool(relu(conv(x, 4, "
                          "kernel=3, pad=1)), 3, stride=2) }", backend="torch")
    assert ops_of(net) == ["conv+relu+maxpool"]
    x = torch.randn(2, 2, 9, 9)
    ref = F.max_pool2d(F.relu(F.conv2d(x, net.state_dict()["conv.weight"],
                                       net.state_dict()["conv.bias"], padding=1)), 3, 2)
    torch.testing.assert_close(net(x), ref)


# -- where fusion must not happen --------------------------------------------------------------

@pytest.mark.parametrize("body,expect", [
    # the activation is also returned: the conv output must reach memory
    ("h = conv(x, 4, kernel=3)\n return h, relu(h)", ["conv", "relu"]),
    # read twice
    ("h = conv(x, 4, kernel=3)\n return relu(h) + h", ["conv", "relu", "_add"]),
    # adaptive pooling: windows differ per output
    ("return maxpool(relu(conv(x, 4, kernel=3)), output=2)", ["conv+relu", "maxpool"]),
    # 3x3 windows at stride 1 would compute every conv output 9 times
    ("return maxpool(conv(x, 4, kernel=3), 3, stride=1)", ["conv", "maxpool"]),
    # pointwise with stride is not a 1x1 conv on the same grid
    ("return conv(depthwise(x, 3), 4, kernel=1, stride=2)", ["conv", "conv"]),
    # a trainable Gaussian is not rewritten (its values change)
    ("return depthwise(x, 5, init=gaussian(1.0))", ["conv"]),
])
def test_no_fusion_where_it_would_be_wrong(body, expect):
    net = convdsl.compile(f"net A(x: f32[N, 2, 12, 12]) {{\n {body}\n}}", backend="torch")
    assert ops_of(net) == expect
    if "gaussian" in body:
        assert "rank1_separable" not in net.ir()


# -- rank-1 detection ----------------------------------------------------------------------------

def test_rank1_accepts_separable_kernels():
    sobel = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]]).reshape(1, 1, 3, 3)
    box = torch.full((2, 3, 5, 5), 1 / 25)
    for kernel in (gaussian((3, 1, 7, 7), 1.5), gaussian((2, 2, 3, 5, 5), 1.0), sobel, box,
                   torch.zeros(2, 2, 3, 3)):
        assert is_rank1(kernel)
        factors, error = rank1_factors(kernel)
        assert error < 1e-6
        rebuilt = torch.einsum("oia,oib->oiab", factors[0], factors[1]) if kernel.dim() == 4 else \
            torch.einsum("oia,oib,oic->oiabc", *factors)
        torch.testing.assert_close(rebuilt, kernel, rtol=1e-5, atol=1e-6)


def test_rank1_rejects_kernels_that_are_not_separable():
    torch.manual_seed(0)
    almost = gaussian((1, 1, 5, 5), 1.0)
    almost[0, 0, 2, 2] += 1e-2
    for kernel in (torch.randn(4, 2, 3, 3), edges((4, 1, 3, 3)), gabor((8, 1, 7, 7)), almost,
                   torch.randn(2, 1, 3, 3, 3)):
        assert not is_rank1(kernel)
    assert not is_rank1(torch.randn(2, 2, 5))  # 1-D: nothing to separate


def test_frozen_edge_bank_is_not_rewritten():
    net = convdsl.compile("net A(x: f32[N, 1, 8, 8]) { return conv(x, 4, kernel=3, "
                          "init=edges, trainable=false) }", backend="torch")
    assert "rank1_separable" not in net.ir()


# -- the command line ------------------------------------------------------------------------------

def test_cli_lists_passes(capsys):
    assert main(["ir", str(ROOT / "examples" / "lenet5.cdsl"), "--passes"]) == 0
    out = capsys.readouterr().out
    for p in (*PIPELINE, *BACKWARD_PIPELINE):
        assert p.name in out


def test_cli_print_after_shows_ir_and_diff(capsys, tmp_path):
    src = tmp_path / "p.cdsl"
    src.write_text(PATTERNS)
    assert main(["ir", str(src), "--print-after", "fuse-pooling"]) == 0
    out = capsys.readouterr().out
    assert "// ----- IR after fuse-pooling (changed) -----" in out
    assert "+  %1, %1#1, %1#2 = fused[conv+relu+maxpool]" in out
    assert main(["ir", str(src), "--print-after-all"]) == 0
    out = capsys.readouterr().out
    assert all(f"IR after {p.name} " in out for p in PIPELINE)
    assert main(["ir", str(src), "--print-after", "nope"]) == 1
    assert "unknown pass 'nope'" in capsys.readouterr().err


def test_cli_no_opt(capsys, tmp_path):
    src = tmp_path / "p.cdsl"
    src.write_text(PATTERNS)
    assert main(["ir", str(src), "--no-opt"]) == 0
    assert "fused" not in capsys.readouterr().out


# -- long chains ---------------------------------------------------------------------------------

def chain_source(n: int) -> str:
    """A conv, then n chained elementwise ops (one op per line), fusable into one node."""
    ops = ["h{i} + 1", "tanh(h{i})", "h{i} * 0.5", "relu(h{i})", "h{i} - 0.25"]
    body = "\n".join(f"    h{i + 1} = {ops[i % len(ops)].format(i=i)}" for i in range(n))
    return f"net Chain(x: f32[N, 2, 6, 6]) {{\n    h0 = conv(x, 3, kernel=3)\n{body}\n" \
           f"    return h{n}\n}}"


def test_a_long_elementwise_chain_fuses_with_linear_work(monkeypatch):
    """Fusing a chain runs no step's shape rule again: absorbing one op at a
    time used to re-derive every step's type each time (n^2 / 2 rules, 20,300
    for 200 ops). The fused chain computes what the unfused one does."""
    from convdsl.ops import fused

    n, evaluated = 200, []
    step_context = fused._step_context
    monkeypatch.setattr(fused, "_step_context",
                        lambda *args: evaluated.append(args[1]) or step_context(*args))
    net = convdsl.compile(chain_source(n), backend="torch")
    (node,) = [node for node in net._graph.nodes() if node.op == "_fused"]
    assert len(node.attrs["steps"]) == n + 1 and len(node.types) == n + 1
    assert len(evaluated) <= n + 1, len(evaluated)
    _compare(chain_source(n), sizes={"N": 2})


@pytest.mark.slow
def test_600_chained_ops_fuse_in_seconds():
    """A conv followed by 600 chained elementwise ops: one fused node in a few
    seconds (it took over a minute), numerically the unfused chain."""
    import time

    n = 600
    start = time.perf_counter()
    net = convdsl.compile(chain_source(n), backend="torch")
    took = time.perf_counter() - start
    assert [len(node.attrs["steps"]) for node in net._graph.nodes() if node.op == "_fused"] \
        == [n + 1]
    assert took < 10, f"compiling took {took:.1f} s"
    _compare(chain_source(n), sizes={"N": 2})
