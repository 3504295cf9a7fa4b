"""Gradient kernels of dense, deconv, local and tiled under Triton's interpreter.

Each net runs with backend="triton"; the loss is (out * seed).sum(), and the
input and parameter gradients are compared with an independent reference
under PyTorch autograd (tests/reference.py): F.linear; F.conv_transpose1d/2d/3d
cropped or zero-extended by the language's rules for deconv; direct loops over
eq. 9.9 for local and eq. 9.10 for tiled (each position's kernel picked by
p mod t) — never convdsl's own torch lowering.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.triton.families import dense_grad, family
from convdsl.triton.families.conv import Tile
from convdsl.triton.families.dense_grad import SplitK

from ..reference import conv_by_torch, deconv_by_transpose, local_loop, tiled_loop

TOL = {"f32": 1e-4, "f16": 2e-2}  # relative to the reference's largest value
DTYPES = {"f32": torch.float32, "f16": torch.float16}
OURS = ("_dense_dx", "_dense_dw", "_deconv_dx", "_deconv_dw", "_local_dx", "_local_dw",
        "_tiled_dx", "_tiled_dw")
FAMILIES = ("dense_dx", "dense_dw", "deconv_dx", "deconv_dw", "local_dx", "local_dw")


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny shapes: intra-op threads only add latency on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-wide tiles, so small tensors straddle every block boundary."""
    for name in FAMILIES:
        fam = family(name)
        monkeypatch.setattr(fam, "CONFIGS", {**fam.CONFIGS, "cpu": [Tile(16, 16, 16, 1, 1)]})


@pytest.fixture
def split_k(monkeypatch):
    """Slices of at most 32 reduction rows: the split-K path and its reduction kernel."""
    monkeypatch.setitem(dense_grad.SPLIT_K, "cpu", SplitK(min_k=1 << 30, max_k=32, programs=1))


# -- helpers -----------------------------------------------------------------------------------

def fmt(v) -> str:
    if isinstance(v, (tuple, list)) and len(v) == 1:
        return fmt(v[0])
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(fmt(i) for i in v) + ")"
    return str(v)


def one_layer(x_type: str, layer: str) -> str:
    return f"net A(x: {x_type}) {{\n    y = {layer}\n    return y\n}}\n"


def decl(dtype, shape) -> str:
    return f"{dtype}[{', '.join(str(d) for d in shape)}]"


def triton_net(src: str, seed: int = 0):
    net = convdsl.compile(src, backend="triton")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net


def rand(*shape, seed=1, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_close(got, want, tol, what):
    scale = max(want.abs().max().item(), 1e-3)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def check_gradients(net, x, reference, x_grad: bool, dtype="f32"):
    """Run the triton net's backward and reference(x, params) under PyTorch
    autograd in fp32 with the same seed; compare output and every gradient."""
    x = x.clone().requires_grad_(x_grad)
    y = net(x)
    seed = rand(*y.shape, seed=7)
    (y.float() * seed).sum().backward()

    params = {k: v.detach().float().clone().requires_grad_(True)
              for k, v in net.named_parameters()}
    xr = x.detach().float().clone().requires_grad_(x_grad)
    yr = reference(xr, params)
    (yr * seed).sum().backward()

    tol = TOL[dtype]
    assert y.dtype == x.dtype
    assert_close(y.detach(), yr.detach(), tol, "output")
    if x_grad:
        assert x.grad.dtype == x.dtype  # dx in dy's dtype
        assert_close(x.grad, xr.grad, tol, "input gradient")
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert_close(p.grad, params[name].grad, tol, f"gradient of {name}")
    key = ("x",) if x_grad else ()
    left = net._program._backward[key].reference_ops()
    assert not set(left) & set(OURS), left
    return net._program._backward[key]


# -- dense ---------------------------------------------------------------------------------------

def dense_reference(x, p):
    return F.linear(x, p["y.weight"], p.get("y.bias"))


@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
@pytest.mark.parametrize("rows,features,out", [(5, 7, 3), (37, 70, 45)])
def test_dense_gradients(rows, features, out, x_grad, small_tiles):
    net = triton_net(one_layer(decl("f32", ("N", features)), f"dense(x, {out}, bias=none)"))
    program = check_gradients(net, rand(rows, features), dense_reference, x_grad)
    families = {p.family for p in program.plans}
    assert "dense_dw" in families and ("dense_dx" in families) == x_grad


def test_dense_split_k(split_k):
    """100 samples in slices of 32: four partial sums, added by the reduction kernel."""
    net = triton_net(one_layer(decl("f32", ("N", 20)), "dense(x, 9, bias=none)"))
    program = check_gradients(net, rand(100, 20), dense_reference, True)
    (plan,) = [p for p in program.plans if p.family == "dense_dw"]
    assert f"def {plan.name}_reduce(" in plan.source


def test_dense_f16():
    net = triton_net(one_layer(decl("f16", ("N", 24)), "dense(x, 10, bias=none)"))
    check_gradients(net, rand(6, 24, dtype=torch.float16), dense_reference, True, "f16")


def test_dense_in_a_deeper_net():
    """dense after flatten: dy comes from another kernel, dx feeds the reshape."""
    src = ("net A(x: f32[N, 2, 3, 3]) {\n    h = relu(flatten(x))\n"
           "    y = dense(h, 4, bias=none)\n    return y\n}")
    net = triton_net(src)
    check_gradients(net, rand(3, 2, 3, 3),
                    lambda x, p: F.linear(torch.relu(x.flatten(1)), p["y.weight"]), True)


# -- deconv --------------------------------------------------------------------------------------

def deconv_reference(stride, pad, dilation=1, size=None, bias="none", name="y"):
    """reference(x, p) of the layer `name = deconv(x, ...)`."""
    return lambda x, p: deconv_by_transpose(x, p[f"{name}.weight"], p.get(f"{name}.bias"),
                                            stride=stride, pad=pad, dilation=dilation, size=size,
                                            bias=bias)


DECONV_CASES = [
    # rank, C_in, spatial, out, kernel, stride, pad, dilation, size
    (1, 3, (5,), 2, 3, 2, 0, 1, None),
    (1, 2, (4,), 3, 4, 3, 1, 1, 13),  # size= natural + 2
    (2, 2, (3, 4), 3, 3, 2, "same", 1, None),
    (2, 2, (3, 3), 2, (3, 2), (2, 3), ((1, 0), (0, 1)), (1, 2), None),
    (2, 2, (3, 4), 2, 3, 2, "valid", 2, (10, 12)),
    (2, 2, (3, 2), 2, 3, (2, 3), "same", 1, (5, 5)),  # same, size below m·s
    (2, 2, (3, 3), 2, 2, 3, "same", 1, None),  # k < s: zero-extended past the last tap
    (3, 2, (2, 3, 2), 2, 3, 2, 1, 1, None),
]


@pytest.mark.parametrize("rank,cin,spatial,out,kernel,stride,pad,dilation,size", DECONV_CASES)
def test_deconv_gradients(rank, cin, spatial, out, kernel, stride, pad, dilation, size):
    size_arg = "" if size is None else f", size={fmt(size)}"
    layer = (f"deconv(x, {out}, kernel={fmt(kernel)}, stride={fmt(stride)}, pad={fmt(pad)}, "
             f"dilation={fmt(dilation)}, bias=none{size_arg})")
    net = triton_net(one_layer(decl("f32", (2, cin) + spatial), layer))
    ref = deconv_reference(stride, pad, dilation, size)
    check_gradients(net, rand(2, cin, *spatial), ref, True)


@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
def test_deconv_symbolic_sizes(x_grad):
    """One net at two input sizes: the geometry is resolved at launch."""
    net = triton_net(one_layer("f32[N, 3, H, W]",
                               "deconv(x, 2, kernel=3, stride=2, pad=same, bias=none)"))
    for n, h, w in ((1, 3, 4), (2, 5, 2)):
        net.zero_grad()
        ref = deconv_reference(2, "same")
        check_gradients(net, rand(n, 3, h, w, seed=h), ref, x_grad)


def test_deconv_tiles_and_split_k(small_tiles, split_k):
    """20 input channels and 18 output (channel, tap) columns on 16-wide tiles;
    2 x 4 x 5 = 40 reduction rows in slices of 32."""
    layer = "deconv(x, 2, kernel=3, stride=2, pad=1, bias=channel)"
    net = triton_net(one_layer(decl("f32", (2, 20, 4, 5)), layer))
    ref = deconv_reference(2, 1, bias="channel")
    check_gradients(net, rand(2, 20, 4, 5), ref, True)


def test_deconv_f16():
    layer = "deconv(x, 3, kernel=(2, 3), stride=2, pad=same, bias=none)"
    net = triton_net(one_layer(decl("f16", (2, 4, 3, 4)), layer))
    ref = deconv_reference(2, "same")
    check_gradients(net, rand(2, 4, 3, 4, dtype=torch.float16), ref, True, "f16")


TIED_SRC = """
net AE(x: f32[2, 2, 8, 6]) {
    h = conv(x, 4, kernel=3, stride=2, pad=same, bias=none, name="enc")
    r = deconv(h, 2, kernel=3, stride=2, pad=same, bias=none, share=enc)
    return r
}
"""


def tied_reference(x, p, uses=("conv", "deconv")):
    w = p["enc.weight"]
    w_conv = w if "conv" in uses else w.detach()
    w_dec = w if "deconv" in uses else w.detach()
    h = conv_by_torch(x, w_conv, stride=2, pad="same")
    # the deconv reads the conv's [out, in, k] weight as its [in, out, k]
    return deconv_by_transpose(h, w_dec, stride=2, pad="same")


def test_tied_autoencoder_accumulates_both_uses():
    net = triton_net(TIED_SRC)
    assert list(dict(net.named_parameters())) == ["enc.weight"]
    check_gradients(net, rand(2, 2, 8, 6), tied_reference, False)
    # both uses contribute: neither partial gradient alone is the total
    parts = []
    for use in ("conv", "deconv"):
        p = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
        y = tied_reference(rand(2, 2, 8, 6), p, uses=(use,))
        (y * rand(*y.shape, seed=7)).sum().backward()
        parts.append(p["enc.weight"].grad)
    total = dict(net.named_parameters())["enc.weight"].grad
    assert parts[0].abs().max() > 1e-3 and parts[1].abs().max() > 1e-3
    assert_close(total, parts[0] + parts[1], TOL["f32"], "accumulated tied gradient")


# -- local (eq. 9.9) and tiled (eq. 9.10) --------------------------------------------------------

LOCAL_CASES = [
    # rank, C, spatial, out, kernel, stride, pad
    (1, 2, (7,), 3, 3, 1, "valid"),
    (1, 2, (8,), 2, 2, 2, "same"),
    (2, 2, (5, 6), 3, (2, 3), (1, 2), 1),
    (2, 3, (5, 5), 2, 3, 2, "same"),
    (2, 2, (4, 5), 2, 2, 1, ((1, 0), (0, 2))),
    (3, 2, (3, 4, 3), 2, 2, 1, "valid"),
]


@pytest.mark.parametrize("rank,c,spatial,out,kernel,stride,pad", LOCAL_CASES)
def test_local_gradients(rank, c, spatial, out, kernel, stride, pad):
    layer = (f"local(x, {out}, kernel={fmt(kernel)}, stride={fmt(stride)}, pad={fmt(pad)}, "
             f"bias=none)")
    net = triton_net(one_layer(decl("f32", (2, c) + spatial), layer))
    check_gradients(net, rand(2, c, *spatial),
                    lambda x, p: local_loop(x, p["y.weight"], stride=stride, pad=pad), True)


def test_local_weight_only_and_tiles(small_tiles):
    """No input gradient; 18 input channels x 4 taps on 16-wide tiles."""
    layer = "local(x, 17, kernel=2, bias=none)"
    net = triton_net(one_layer(decl("f32", (3, 18, 3, 3)), layer))
    program = check_gradients(net, rand(3, 18, 3, 3), lambda x, p: local_loop(x, p["y.weight"]),
                              False)
    assert [p.family for p in program.plans] == ["local_dw"]


TILED_CASES = [
    # rank, C, spatial, out, kernel, tiles, stride, pad
    (1, 2, (9,), 2, 2, 3, 2, "same"),  # o = 5: not a multiple of t
    (2, 2, (6, 7), 3, 3, (2, 3), 1, "valid"),
    (2, 2, (7, 6), 2, (2, 3), 2, 2, 1),
    (2, 2, (4, 5), 2, 2, 2, 1, "full"),
    (2, 2, (3, 6), 2, 2, (3, 2), (1, 2), "valid"),  # o = (2, 3): a tile without positions
    (3, 2, (4, 4, 3), 2, 2, (2, 1, 2), 1, "valid"),
]


@pytest.mark.parametrize("rank,c,spatial,out,kernel,tiles,stride,pad", TILED_CASES)
def test_tiled_gradients(rank, c, spatial, out, kernel, tiles, stride, pad):
    layer = (f"tiled(x, {out}, kernel={fmt(kernel)}, tiles={fmt(tiles)}, stride={fmt(stride)}, "
             f"pad={fmt(pad)}, bias=none)")
    net = triton_net(one_layer(decl("f32", (2, c) + spatial), layer))
    check_gradients(net, rand(2, c, *spatial),
                    lambda x, p: tiled_loop(x, p["y.weight"], stride=stride, pad=pad), True)


@pytest.mark.parametrize("x_grad", [True, False], ids=["dx", "no-dx"])
def test_tiled_symbolic_sizes(x_grad):
    net = triton_net(one_layer("f32[N, 2, H, W]",
                               "tiled(x, 2, kernel=3, tiles=(2, 3), stride=(1, 2), pad=same, "
                               "bias=none)"))
    for n, h, w in ((1, 5, 7), (2, 8, 4)):
        net.zero_grad()
        check_gradients(net, rand(n, 2, h, w, seed=h),
                        lambda x, p: tiled_loop(x, p["y.weight"], stride=(1, 2), pad="same"),
                        x_grad)


def test_tiled_split_k_and_tiles(small_tiles, split_k):
    """Each tile's reduction: 3 samples x 4 x 5 positions = 60 rows, in slices of 32."""
    layer = "tiled(x, 3, kernel=3, tiles=2, pad=same, bias=none)"
    net = triton_net(one_layer(decl("f32", (3, 6, 8, 10)), layer))
    check_gradients(net, rand(3, 6, 8, 10), lambda x, p: tiled_loop(x, p["y.weight"], pad="same"),
                    True)


def test_tiled_f16():
    layer = "tiled(x, 3, kernel=2, tiles=2, pad=same, bias=none)"
    net = triton_net(one_layer(decl("f16", (2, 3, 5, 4)), layer))
    check_gradients(net, rand(2, 3, 5, 4, dtype=torch.float16),
                    lambda x, p: tiled_loop(x, p["y.weight"], pad="same"), True, "f16")


# -- int64 indexing -----------------------------------------------------------------------------

def test_int64_index_path(monkeypatch, split_k):
    """The INDEX_64 variant (a tensor of 2^31 elements or more) on small tensors:
    the same gradients, split-K reductions included."""
    from convdsl.triton.families import deconv_grad, local_grad

    for module in (dense_grad, deconv_grad, local_grad):
        monkeypatch.setattr(module, "needs_int64", lambda *tensors: True)
    net = triton_net(one_layer(decl("f32", ("N", 20)), "dense(x, 9, bias=none)"))
    check_gradients(net, rand(40, 20), dense_reference, True)
    net = triton_net(one_layer(decl("f32", (2, 3, 4, 5)),
                               "deconv(x, 2, kernel=3, stride=2, pad=1, bias=none)"))
    check_gradients(net, rand(2, 3, 4, 5), deconv_reference(2, 1), True)
    net = triton_net(one_layer(decl("f32", (3, 2, 6, 7)),
                               "tiled(x, 2, kernel=2, tiles=2, stride=(1, 2), bias=none)"))
    check_gradients(net, rand(3, 2, 6, 7), lambda x, p: tiled_loop(x, p["y.weight"], stride=(1, 2)),
                    True)


# -- ahead of time -------------------------------------------------------------------------------

MIXED_SRC = """
net M(x: f32[N, 3, H, W], v: f16[N, 16], u: f32[N, 2, 5, 6]) {
    d = deconv(x, 4, kernel=3, stride=2, pad=same, bias=none, name="d")
    f = dense(v, 8, bias=none, name="f")
    l = local(u, 3, kernel=3, bias=none, name="l")
    t = tiled(x, 3, kernel=3, tiles=2, bias=none, name="t")
    return d, f, l, t
}"""


def mixed_net_after_backward():
    net = triton_net(MIXED_SRC)
    inputs = (rand(2, 3, 4, 4).requires_grad_(), rand(2, 16, dtype=torch.float16).requires_grad_(),
              rand(2, 2, 5, 6).requires_grad_())
    outs = net(*inputs)
    sum((o.float() * rand(*o.shape, seed=3)).sum() for o in outs).backward()
    return net


def our_plans(net):
    (program,) = net._program._backward.values()
    plans = [p for p in program.plans if p.family in FAMILIES]
    return program, plans


def test_aot_signatures_match_kernel_arguments():
    from convdsl.triton.loader import load_kernel

    net = mixed_net_after_backward()
    program, plans = our_plans(net)
    assert {p.family for p in plans} == set(FAMILIES)
    env = {"N": 8, "H": 32, "W": 32}
    from convdsl.ir.types import symbol

    for plan in plans:
        fam = family(plan.family)
        signature, constexprs = fam.aot(plan, program.graph)[:2]
        kernel = load_kernel(plan.source, plan.name, interpret=True)
        assert list(signature) == list(kernel.arg_names), plan.name
        assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)
        for name, sig, cx in getattr(fam, "aot_extra", lambda *a: [])(plan, program.graph):
            extra = load_kernel(plan.source, name, interpret=True)
            assert list(sig) == list(extra.arg_names), name
        flops, nbytes = fam.cost(plan, program.graph, {symbol(k): v for k, v in env.items()})
        assert flops > 0 and nbytes > 0, plan.name


@pytest.mark.slow
@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_aot_compiles_without_spills(target, tmp_path):
    from convdsl.triton.aot import compile_many, compile_program, parse_target, resource_usage

    net = mixed_net_after_backward()
    reports = compile_program(net._program, target, tmp_path, {"N": 8, "H": 32, "W": 32})
    ours = [r for r in reports if r.family in FAMILIES]
    assert {r.family for r in ours} == set(FAMILIES)
    for r in ours:
        print(target, r.name, "registers", r.registers, "spills", r.spills, "shared",
              r.shared_bytes, "flops", r.flops, "bytes", r.bytes)
        assert r.registers is not None and 0 < r.registers <= 255 and r.spills == 0, r
        # a plan's helper kernels (its split-K reduction) report no cost of their
        # own: the cost model counts the whole plan once, on its main kernel
        assert r.name.endswith("_reduce") or (r.flops > 0 and r.bytes > 0), r
    # the split-K reduction kernels the plans carry beside their GEMM
    program, plans = our_plans(net)
    jobs = [{"source": plan.source, "name": name, "signature": sig, "constexprs": cx}
            for plan in plans if hasattr(family(plan.family), "aot_extra")
            for name, sig, cx in family(plan.family).aot_extra(plan, program.graph)]
    assert len(jobs) == sum(p.family.endswith("_dw") for p in plans) == 4
    for job, result in zip(jobs, compile_many(jobs, parse_target(target))):
        registers, spills = resource_usage(result["cubin"], job["name"], tmp_path)
        print(target, job["name"], "registers", registers, "spills", spills)
        assert registers is not None and spills == 0, job["name"]


def test_math_of_split_k():
    """Slices are whole BLOCK_K steps, cover the reduction, and respect the bounds."""
    cpu = SplitK(min_k=1 << 30, max_k=32, programs=1)
    assert cpu.slices(100, 1, 16) == (4, 32)
    assert cpu.slices(10, 1, 16) == (1, 16)
    gpu = SplitK(min_k=512, max_k=1 << 16, programs=264)
    splits, per = gpu.slices(64 * 4096, 4, 32)
    assert splits * per >= 64 * 4096 and per % 32 == 0 and per >= 512 and splits <= 66
    assert gpu.slices(1000, 300, 32) == (1, 1024)
    assert math.prod(gpu.slices(1, 1, 32)) == 32
