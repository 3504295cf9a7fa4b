"""The deconv shape rule on symbolic sizes (convdsl/ops/conv.py).

The rule refuses a size= that is outside the possible range for every input
size. It used to ask sympy.simplify whether each difference of sizes is a
negative constant, which took most of the compile time of the nets with a
deconv; it now probes the difference at a few sizes first. Checked here: the
same verdict as simplify on generated differences and on tricky ones, the same
IR for the example nets, natural output sizes against torch's transpose
convolution at concrete sizes, and the errors on symbolic sizes.
"""
from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import pytest
import sympy
import torch
import torch.nn.functional as F

import convdsl
from convdsl import ConvDSLError
from convdsl.ir.types import symbol
from convdsl.ops import conv as conv_ops

ROOT = Path(__file__).resolve().parents[2]
H, W = symbol("H"), symbol("W")


def negative_by_simplify(diff) -> bool:
    """The verdict the rule gave before: simplify, then a negative Integer?"""
    simplified = sympy.simplify(diff)
    return bool(simplified.is_Integer and simplified < 0)


def compile_quiet(src, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convdsl.compile(src, **kw)


# -- the probe agrees with simplify ----------------------------------------------------------

TRICKY = [
    sympy.Integer(-3), sympy.Integer(0), sympy.Integer(2),
    H - 2 * sympy.ceiling(H / 2) + 1,          # 0 or 1: never a constant
    -H + 2 * sympy.ceiling(H / 2),             # 0 or 1
    H - 2 * sympy.ceiling(H / 2) - 1,          # -1 or -2: negative, but not one constant
    (H + 1) ** 2 - H ** 2 - 2 * H - 3,         # -2 hidden in a square: probes defer to simplify
    -H + sympy.ceiling(H / 2) + sympy.floor(H / 2) - 1,  # -1 everywhere, which simplify misses
    sympy.Mod(H, 2) - 2,                       # -2 or -1
    sympy.floor(H / 2) - H,                    # negative, not constant
    sympy.Max(H, W) - H - W - 1,               # two symbols
    sympy.Symbol("Q") - 3,                     # not a size symbol: straight to simplify
    sympy.Symbol("Q") - sympy.Symbol("Q") - 1,
]


@pytest.mark.parametrize("diff", TRICKY, ids=[str(d) for d in TRICKY])
def test_tricky_differences_get_the_verdict_simplify_gave(diff):
    assert conv_ops._always_negative(diff) == negative_by_simplify(diff)


def test_the_hidden_negative_constant_is_still_refused():
    assert conv_ops._always_negative((H + 1) ** 2 - H ** 2 - 2 * H - 3)


# Input sizes a deconv meets after strided convs and pools, and the size= values a program can
# write: a size symbol or a number.
INPUT_SIZES = [H, sympy.ceiling(H / 2), sympy.floor((H - 1) / 3) + 1, sympy.Integer(5)]
WANTS = [None, H, sympy.Integer(1), sympy.Integer(10)]
SETTINGS = [  # kernel, stride, pad, dilation
    (3, 2, "same", 1), (2, 2, "same", 1), (3, 1, ((1, 1),), 1), (3, 2, ((1, 1),), 1),
    (4, 3, ((0, 2),), 2), (1, 2, "valid", 1),
]


def generated_differences():
    for m, want, (k, s, pad, r) in itertools.product(INPUT_SIZES, WANTS, SETTINGS):
        attrs = {"kernel": (k,), "stride": (s,), "dilation": (r,), "pad": pad}
        (natural, low, high), = conv_ops.deconv_ranges(attrs, (m,))
        want = natural if want is None else want
        yield want - low
        yield high - want


def test_generated_differences_get_the_verdict_simplify_gave():
    diffs = sorted(set(map(sympy.sympify, generated_differences())), key=sympy.default_sort_key)
    assert len(diffs) > 40
    disagree = [d for d in diffs if conv_ops._always_negative(d) != negative_by_simplify(d)]
    assert disagree == []
    assert any(negative_by_simplify(d) for d in diffs)  # the refusing branch is exercised


# -- the example nets: the same IR, and no simplify --------------------------------------------

DECONV_NETS = [("autoencoder.cdsl", "TiedAutoencoder"), ("autoencoder.cdsl", "TiedAutoencoderRGB"),
               ("volumetric_3d.cdsl", "VolumeSegmenter")]


def ir_dumps(path, name) -> list[str]:
    net = compile_quiet(ROOT / "examples" / path, net=name)
    return [net.ir(stage) for stage in ("parsed", "optimized", "backward")]


@pytest.mark.parametrize("path,name", DECONV_NETS, ids=[n for _, n in DECONV_NETS])
def test_example_ir_is_the_one_simplify_gave(path, name, monkeypatch):
    calls = []
    simplify = sympy.simplify
    monkeypatch.setattr(sympy, "simplify", lambda e, *a, **k: calls.append(e) or simplify(e))
    fast = ir_dumps(path, name)
    assert calls == []  # every difference settled by probing
    monkeypatch.setattr(conv_ops, "_always_negative", negative_by_simplify)
    assert ir_dumps(path, name) == fast
    assert calls  # the reference did run


# -- symbolic sizes end to end ------------------------------------------------------------------

def deconv_net(expr: str) -> str:
    return f"net D(x: f32[N, 1, H]) {{\n    h = conv(x, 2, kernel=3, stride=2, pad=same)\n" \
           f"    return {expr}\n}}\n"


def out_size(net) -> sympy.Expr:
    return net._graph.type_of(net._graph.outputs[0]).shape[-1]


def reference_natural(m: int, k: int, s: int, pad, r: int) -> int:
    """torch's transpose convolution length; TensorFlow's m·s for `same`."""
    if pad == "same":
        return m * s
    before, after = pad
    full = F.conv_transpose1d(torch.zeros(1, 1, m), torch.zeros(1, 1, k), stride=s,
                              dilation=r).shape[-1]
    return full - before - after


@pytest.mark.parametrize("k,s,pad,r", [(3, 2, "same", 1), (2, 3, "same", 1), (3, 2, (1, 1), 1),
                                       (4, 3, (0, 2), 2), (3, 1, (1, 0), 1)])
def test_natural_symbolic_size_matches_torch_at_concrete_sizes(k, s, pad, r):
    pad_text = "same" if pad == "same" else f"({pad},)"
    net = compile_quiet(deconv_net(f"deconv(h, 1, kernel={k}, stride={s}, pad={pad_text}, "
                                   f"dilation={r})"))
    size = out_size(net)
    assert size.free_symbols == {H}
    for h in range(3, 12):
        m = -(-h // 2)  # the strided `same` conv before the deconv
        assert size.subs(H, h) == reference_natural(m, k, s, pad, r), h


def test_size_equal_to_the_input_symbol_is_accepted_where_it_fits():
    # after a stride-2 `same` conv, stride-2 `same` deconv: 2·ceil(H/2) - 1 .. 2·ceil(H/2) holds H
    net = compile_quiet(deconv_net("deconv(h, 1, kernel=3, stride=2, pad=same, size=H)"))
    assert out_size(net) == H


def test_a_size_outside_the_range_for_every_input_is_refused_at_its_argument():
    src = "net D(x: f32[N, 1, H]) {\n    return deconv(x, 1, kernel=3, size=H)\n}\n"
    with pytest.raises(ConvDSLError) as info:
        compile_quiet(src)
    assert info.value.line == 2
    assert "size= H is not a possible output" in info.value.message
    assert "must be in H + 2..H + 2" in info.value.message


@pytest.mark.parametrize("size,ok", [(1, False), (9, True), (10, True), (11, False)])
def test_concrete_sizes_against_the_strides_range(size, ok):
    # input 5, stride 2, kernel 1, no pad: natural (5-1)·2+1 = 9, size= may add up to 1
    src = f"net D(x: f32[N, 1, 5]) {{\n    return deconv(x, 1, kernel=1, stride=2, size={size})\n}}\n"
    if ok:
        assert out_size(compile_quiet(src)) == size
    else:
        with pytest.raises(ConvDSLError, match="must be in 9..10"):
            compile_quiet(src)
