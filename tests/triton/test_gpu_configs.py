"""The GPU launch configs, checked without a GPU.

Inside `families.as_gpu()` launches on host tensors take what a GPU launch
takes — GPU tiles and warps, packed and converted weights, the autotuner's
candidate lists — and the kernels still run under the interpreter. Each net
here runs forward and backward that way and is compared with
torch.nn.functional; then every autotuning candidate of every kernel the net
launched is run again and compared with the default config's output (itself
checked against PyTorch through the net's result), so no candidate the
autotuner may pick on a GPU computes something else."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convdsl
from convdsl.initializers import gaussian
from convdsl.triton import autotune
from convdsl.triton.families.base import as_gpu, target

TABLE = "table T = [[0, 1], [1, 2], [0, 2, 3], [3]]\n"


def w(params: dict, role: str) -> torch.Tensor:
    """The net's one parameter of this role ('weight', 'bias', 'weight_0'), whatever its layer."""
    (value,) = [v for k, v in params.items() if k.endswith("." + role)]
    return value


def conv_net(body: str, shape: str, tables: str = "") -> str:
    return f"{tables}net Case(x: f32[{shape}]) {{\n    y = {body}\n    return y\n}}\n"


# name -> (source, input shape, reference(x, state dict), families autotuned)
CASES = {
    "conv_relu": (conv_net("relu(conv(x, 5, kernel=3, pad=1))", "N, 3, 9, 10"), (2, 3, 9, 10),
                  lambda x, p: F.relu(F.conv2d(x, w(p, "weight"), w(p, "bias"), padding=1)),
                  {"conv"}),
    "conv_stride_groups": (conv_net("conv(x, 6, kernel=3, stride=2, groups=2)", "N, 4, 9, 9"),
                           (2, 4, 9, 9),
                           lambda x, p: F.conv2d(x, w(p, "weight"), w(p, "bias"), stride=2,
                                                 groups=2),
                           {"conv"}),
    "conv_table": (conv_net("conv(x, 4, kernel=3, connect=T)", "N, 4, 7, 7", TABLE), (2, 4, 7, 7),
                   None, {"conv"}),
    "conv_3d": (conv_net("conv(x, 3, kernel=2)", "N, 2, 4, 5, 5"), (2, 2, 4, 5, 5),
                lambda x, p: F.conv3d(x, w(p, "weight"), w(p, "bias")), {"conv"}),
    "dense_relu": ("net Case(x: f32[N, 20]) {\n    return relu(dense(x, 7))\n}\n", (3, 20),
                   lambda x, p: F.relu(F.linear(x, w(p, "weight"), w(p, "bias"))),
                   {"dense"}),
    "deconv": (conv_net("deconv(x, 3, kernel=4, stride=2, pad=1)", "N, 4, 5, 6"), (2, 4, 5, 6),
               lambda x, p: F.conv_transpose2d(x, w(p, "weight"), w(p, "bias"), stride=2,
                                               padding=1),
               {"deconv"}),
    "local": (conv_net("local(x, 20, kernel=3)", "N, 4, 4, 4"), (2, 4, 4, 4), None, {"local"}),
    "tiled": (conv_net("tiled(x, 3, kernel=2, tiles=2)", "N, 2, 6, 6"), (2, 2, 6, 6), None,
              {"tiled"}),
    "separable": (conv_net("conv(x, 3, kernel=(5, 3), separable=true, pad=same)", "N, 2, 9, 8"),
                  (2, 2, 9, 8), None, {"separable"}),
    "rank1": (conv_net("relu(conv(x, 2, kernel=5, init=gaussian(1.0), trainable=false, "
                       "bias=none))", "N, 1, 10, 10"), (2, 1, 10, 10),
              lambda x, p: F.relu(F.conv2d(x, gaussian((2, 1, 5, 5), 1.0))),
              {"separable_rank1"}),
}


def table_reference(x, p):
    """The table conv as a dense conv whose absent connections are zero."""
    mask = torch.zeros(4, 4, 1, 1)
    for out, row in enumerate(((0, 1), (1, 2), (0, 2, 3), (3,))):
        mask[out, list(row)] = 1
    return F.conv2d(x, w(p, "weight") * mask, w(p, "bias"))


def local_reference(x, p, tiles=None):
    """Eq. 9.9 / 9.10 as a loop over output positions (unfold per position)."""
    weight, bias = w(p, "weight"), w(p, "bias")
    k = 2 if tiles else 3
    oh, ow = x.shape[2] - k + 1, x.shape[3] - k + 1
    outputs = weight.shape[2] if tiles else weight.shape[0]  # [t, t, out, ...] / [out, ...]
    y = x.new_zeros(x.shape[0], outputs, oh, ow)
    for i in range(oh):
        for j in range(ow):
            patch = x[:, :, i:i + k, j:j + k]
            kernel = weight[i % tiles, j % tiles] if tiles else weight[:, i, j]
            b = bias[i % tiles, j % tiles] if tiles else bias[:, i, j]
            y[:, :, i, j] = torch.einsum("ncij,ocij->no", patch, kernel) + b
    return y


def separable_reference(x, p):
    dense = torch.einsum("oci,ocj->ocij", w(p, "weight_0"), w(p, "weight_1"))
    return F.conv2d(x, dense, w(p, "bias"), padding=(2, 1))


REFERENCES = {"conv_table": table_reference, "local": local_reference,
              "tiled": lambda x, p: local_reference(x, p, tiles=2),
              "separable": separable_reference}


@pytest.fixture
def exact_fp32():
    """GPU configs multiply fp32 in TF32 when PyTorch allows it: compare exactly."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def choices(monkeypatch):
    """Every autotune.choose call: (family, candidates, run)."""
    seen = []
    real = autotune.choose

    def recording(plan, candidates, tensors, run, extra=()):
        listed = candidates[target(tensors[0])] if isinstance(candidates, dict) else candidates
        seen.append((plan.family, list(listed), run))
        return real(plan, candidates, tensors, run, extra)

    monkeypatch.setattr(autotune, "choose", recording)
    return seen


# Slow under the interpreter; the default run still covers each family's code:
# tiled runs the local kernel, rank1 the separable one, the 2-D convs conv's.
SLOW = {"local", "separable", "conv_3d"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in sorted(CASES)])
def test_gpu_configs_compute_the_reference(case, exact_fp32, choices):
    source, shape, reference, tuned = CASES[case]
    reference = reference or REFERENCES[case]
    torch.manual_seed(0)
    net = convdsl.compile(source, backend="triton")
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    params = {k: v.detach().clone().requires_grad_(k in trainable)
              for k, v in net.state_dict().items()}
    x = torch.randn(*shape, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with as_gpu():
        y = net(x)
        seed = torch.randn_like(y)
        (y * seed).sum().backward()
    want = reference(xr, params)
    (want * seed).sum().backward()
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    for name in trainable:
        torch.testing.assert_close(dict(net.named_parameters())[name].grad, params[name].grad,
                                   rtol=1e-4, atol=1e-4)

    # Each kernel's other candidates: the same values as its default.
    families = {family for family, _, _ in choices}
    assert tuned <= families, (tuned, families)
    with as_gpu():
        for family, candidates, run in choices:
            if family in tuned:
                assert len(candidates) > 1, f"{family}: no autotuning candidates on a GPU"
            default = run(candidates[0])
            for config in candidates[1:]:
                for got, expected in zip(run(config), default):
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5,
                                               msg=lambda m, c=config, f=family: f"{f} {c}: {m}")


def test_every_candidate_runs_once_inside_as_gpu(exact_fp32, monkeypatch):
    """as_gpu(every_candidate=True) runs each other candidate before the default,
    so a recorder sees every config a GPU may compile."""
    real, calls, listed = autotune.choose, [], []

    def counting(plan, candidates, tensors, run, extra=()):
        def counted(config):
            calls.append(config)
            return run(config)
        listed.append(candidates)
        return real(plan, candidates, tensors, counted, extra)

    monkeypatch.setattr(autotune, "choose", counting)
    net = convdsl.compile(CASES["conv_relu"][0], backend="triton")
    with as_gpu(every_candidate=True):
        y = net(torch.randn(2, 3, 9, 10))
    (candidates,) = listed
    assert len(candidates) > 1 and calls == candidates[1:]
    assert y.shape == (2, 5, 9, 10)


def test_outside_as_gpu_a_host_tensor_takes_the_cpu_configs():
    x = torch.zeros(1)
    assert target(x) == "cpu"
    with as_gpu():
        assert target(x) == "gpu"
    assert target(x) == "cpu"


def test_the_weight_cache_hits_for_a_fresh_detach_and_misses_after_a_step():
    """GPU launches re-lay weights out once per parameter version; every launch
    passes a fresh `.detach()` of the parameter."""
    from convdsl.triton.families.conv import WeightCache

    cache, made = WeightCache(), []
    weight = torch.nn.Parameter(torch.randn(4, 3))

    def make(w):
        made.append(w)
        return w.t().contiguous()

    first = cache.get(weight.detach(), torch.float32, make)
    assert cache.get(weight.detach(), torch.float32, make) is first and len(made) == 1
    with torch.no_grad():
        weight.add_(1.0)  # what an optimizer step does: bumps the version
    again = cache.get(weight.detach(), torch.float32, make)
    assert len(made) == 2 and torch.equal(again, weight.detach().t())


def test_tiles_shrink_to_a_small_group():
    from convdsl.triton.families.conv import CONV_TILES, Tile

    assert CONV_TILES[0].fit(10_000, 4, 4) == Tile(64, 16, 16, num_warps=4, num_stages=3)
    assert CONV_TILES[0].fit(10, 1000, 1000).BLOCK_M == 16
    assert CONV_TILES[0].fit(10_000, 1000, 1000) == CONV_TILES[0]
