import math

import numpy as np
import pytest
import torch

from convdsl.initializers import (
    edges,
    fan_in_out,
    gabor,
    gabor_bank_params,
    gabor_sigma,
    gaussian,
    gaussian_factors,
    gaussian_kernel_1d,
    he,
    normal,
    sobel_derivative_1d,
    uniform,
    xavier,
    zeros,
)

SOBEL_X = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]
SOBEL_Y = [[-1, -2, -1], [0, 0, 0], [1, 2, 1]]
SOBEL_45 = [[-2, -1, 0], [-1, 0, 1], [0, 1, 2]]
SOBEL_135 = [[0, -1, -2], [1, 0, -1], [2, 1, 0]]


def gen(seed=0):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# ----------------------------------------------------------------- edges


def test_sobel_3x3_exact_all_orientations():
    w = edges([8, 1, 3, 3])
    assert w.dtype == torch.float32 and w.shape == (8, 1, 3, 3)
    expected = [SOBEL_X, SOBEL_Y, SOBEL_45, SOBEL_135]
    for o in range(8):
        assert torch.equal(w[o, 0], torch.tensor(expected[o % 4], dtype=torch.float32)), o


def test_edges_divided_by_in_g_same_kernel_per_input():
    w = edges([4, 3, 3, 3])
    for o in range(4):
        for c in range(3):
            assert torch.allclose(w[o, c], edges([4, 1, 3, 3])[o, 0] / 3)


def test_edges_1d():
    assert torch.equal(edges([2, 1, 3])[0, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(edges([2, 1, 3])[1, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(edges([1, 1, 5])[0, 0], torch.tensor([-1.0, -2.0, 0.0, 2.0, 1.0]))
    assert sobel_derivative_1d(2).tolist() == [-1.0, 1.0]


def _check_antisymmetric_zero_sum(kern):
    assert abs(kern.sum().item()) < 1e-5
    # point reflection through the centre flips the sign
    flipped = torch.flip(kern, dims=list(range(kern.dim())))
    assert torch.allclose(flipped, -kern, atol=1e-6)
    assert kern.abs().sum() > 0


@pytest.mark.parametrize("k", [(5, 5), (3, 5), (5, 3), (4, 4), (7, 7), (2, 6)])
def test_edges_2d_zero_sum_antisymmetric(k):
    w = edges([4, 1, *k])
    assert w.shape == (4, 1, *k)
    for o in range(4):
        _check_antisymmetric_zero_sum(w[o, 0])


def test_edges_5x5_directions():
    w = edges([4, 1, 5, 5])[:, 0]
    # 0 deg: antisymmetric in x (columns), symmetric in y
    assert torch.allclose(torch.flip(w[0], [1]), -w[0])
    assert torch.allclose(torch.flip(w[0], [0]), w[0])
    # 90 deg is the transpose of 0 deg
    assert torch.allclose(w[1], w[0].T)
    # 45 deg increases towards bottom-right; 135 deg is its left-right mirror
    assert w[2][4, 4] > 0 > w[2][0, 0]
    assert torch.allclose(w[3], torch.flip(w[2], [1]))
    # 45 deg is symmetric about the main diagonal (its direction)
    assert torch.allclose(w[2], w[2].T)


def test_edges_rectangular_3x5_axis_kernels():
    w = edges([2, 1, 3, 5])[:, 0]
    expected_x = torch.outer(torch.tensor([1.0, 2, 1]), torch.tensor([-1.0, -2, 0, 2, 1]))
    assert torch.equal(w[0], expected_x)
    expected_y = torch.outer(torch.tensor([-1.0, 0, 1]), torch.tensor([1.0, 4, 6, 4, 1]))
    assert torch.equal(w[1], expected_y)


def test_edges_3d_sobel():
    w = edges([6, 2, 3, 3, 3])
    assert w.shape == (6, 2, 3, 3, 3)
    b = torch.tensor([1.0, 2, 1])
    d = torch.tensor([-1.0, 0, 1])
    ein = lambda a, bb, c: torch.einsum("i,j,k->ijk", a, bb, c)
    expected = [ein(b, b, d), ein(b, d, b), ein(d, b, b)]  # x (last), y, z
    for o in range(6):
        assert torch.allclose(w[o, 0], expected[o % 3] / 2)
        assert torch.equal(w[o, 0], w[o, 1])
        _check_antisymmetric_zero_sum(w[o, 0])


@pytest.mark.parametrize("k", [(5, 5, 5), (3, 5, 4)])
def test_edges_3d_zero_sum_antisymmetric(k):
    w = edges([3, 1, *k])
    for o in range(3):
        _check_antisymmetric_zero_sum(w[o, 0])


# --------------------------------------------------------------- gaussian


def test_gaussian_kernel_1d():
    g = gaussian_kernel_1d(5, 1.0)
    assert g.dtype == torch.float32
    assert abs(g.sum().item() - 1) < 1e-6
    x = np.arange(5) - 2.0
    ref = np.exp(-x**2 / 2)
    assert np.allclose(g.numpy(), ref / ref.sum(), atol=1e-7)
    # even size: centred between pixels, symmetric
    g4 = gaussian_kernel_1d(4, 0.7)
    assert torch.allclose(g4, torch.flip(g4, [0]))


@pytest.mark.parametrize("k", [(3,), (5, 5), (3, 5), (3, 3, 3)])
def test_gaussian_per_channel_blur(k):
    out, in_g = 5, 3
    w = gaussian([out, in_g, *k], 1.2)
    assert w.shape == (out, in_g, *k) and w.dtype == torch.float32
    for o in range(out):
        for c in range(in_g):
            if c == o % in_g:
                assert abs(w[o, c].sum().item() - 1) < 1e-5
            else:
                assert torch.count_nonzero(w[o, c]) == 0


@pytest.mark.parametrize("k", [(5,), (3, 5), (3, 4, 5)])
def test_gaussian_factors_outer_product(k):
    out, in_g = 4, 2
    sigma = [0.8, 1.1, 1.5][: len(k)]
    factors = gaussian_factors([[out, in_g, n] for n in k], sigma)
    assert len(factors) == len(k)
    for f, n in zip(factors, k):
        assert f.shape == (out, in_g, n)
    letters = "xyz"[: len(k)]
    spec = ",".join(f"oc{l}" for l in letters) + "->oc" + letters
    full = torch.einsum(spec, *factors)
    assert torch.allclose(full, gaussian([out, in_g, *k], sigma), atol=1e-7)


# ------------------------------------------------------------------ gabor


def _gabor_ref(kh, kw, tau, f, phi):
    """Eq. 9.16-9.18 computed independently, normalized to unit L2 norm."""
    sigma = max(kh, kw) / 4.0
    beta = 1.0 / (2 * sigma**2)
    x0, y0 = (kw - 1) / 2.0, (kh - 1) / 2.0
    w = np.zeros((kh, kw))
    for yi in range(kh):
        for xi in range(kw):
            xp = (xi - x0) * np.cos(tau) + (yi - y0) * np.sin(tau)
            yp = -(xi - x0) * np.sin(tau) + (yi - y0) * np.cos(tau)
            w[yi, xi] = np.exp(-beta * xp**2 - beta * yp**2) * np.cos(f * xp + phi)
    return w / np.linalg.norm(w)


def test_gabor_matches_formula():
    tau, f, phi = 0.7, 1.1, 0.3
    w = gabor([3, 2, 7, 9], orientations=[0.0, tau], frequencies=[f], phases=[phi])
    ref = _gabor_ref(7, 9, tau, f, phi)
    # bank = [(0, f, phi), (tau, f, phi)]; channel 1 -> entry 1; divided by in_g = 2
    assert np.allclose(w[1, 0].numpy() * 2, ref, atol=1e-6)
    assert np.allclose(w[1, 1].numpy() * 2, ref, atol=1e-6)
    assert np.allclose(w[2, 0].numpy() * 2, _gabor_ref(7, 9, 0.0, f, phi), atol=1e-6)


def test_gabor_default_bank_matches_formula():
    w = gabor([16, 1, 7, 7])
    bank = gabor_bank_params(4, None, None, 7)
    assert len(bank) == 16
    for o in range(16):
        assert np.allclose(w[o, 0].numpy(), _gabor_ref(7, 7, *bank[o]), atol=1e-6)


def test_gabor_unit_norm():
    w = gabor([12, 1, 5, 5], orientations=3, frequencies=2, phases=2)
    norms = torch.linalg.vector_norm(w.flatten(1), dim=1)
    assert torch.allclose(norms, torch.ones(12), atol=1e-5)
    w1 = gabor([4, 1, 9])
    assert torch.allclose(torch.linalg.vector_norm(w1.flatten(1), dim=1), torch.ones(4), atol=1e-5)


def test_gabor_bank_order_and_cycling():
    bank = gabor_bank_params(2, [1.0, 0.5], 2, 5)
    assert bank == [
        (0.0, 1.0, 0.0), (0.0, 1.0, math.pi / 2),
        (0.0, 0.5, 0.0), (0.0, 0.5, math.pi / 2),
        (math.pi / 2, 1.0, 0.0), (math.pi / 2, 1.0, math.pi / 2),
        (math.pi / 2, 0.5, 0.0), (math.pi / 2, 0.5, math.pi / 2),
    ]
    w = gabor([20, 1, 5, 5], orientations=2, frequencies=[1.0, 0.5], phases=2)
    for o in range(20):
        assert torch.equal(w[o], w[o % 8])
    for a in range(8):
        for b in range(a + 1, 8):
            assert not torch.allclose(w[a], w[b])


def test_gabor_counts_and_defaults():
    assert [t for t, _, _ in gabor_bank_params(4, [1.0], [0.0], 3)] == [i * math.pi / 4 for i in range(4)]
    assert [p for _, _, p in gabor_bank_params([0.0], [1.0], None, 3)] == [0.0, math.pi / 2]
    assert [f for _, f, _ in gabor_bank_params([0.0], 3, [0.0], 3)] == [math.pi / 2, math.pi / 4, math.pi / 8]
    assert gabor_sigma(8) == 2.0


def test_gabor_1d_formula():
    f, phi = 0.9, 0.4
    w = gabor([2, 1, 7], frequencies=[f], phases=[0.0, phi])
    x = np.arange(7) - 3.0
    beta = 1 / (2 * (7 / 4) ** 2)
    ref = np.exp(-beta * x**2) * np.cos(f * x + phi)
    assert np.allclose(w[1, 0].numpy(), ref / np.linalg.norm(ref), atol=1e-6)


def test_gabor_rejects_3d():
    with pytest.raises(ValueError, match="gabor needs a 1-D or 2-D kernel"):
        gabor([2, 1, 3, 3, 3])


# ------------------------------------------------------- random initializers


def test_he_statistics():
    fan_in = 50
    w = he([400, 50, 5, 5], fan_in, generator=gen(1))
    assert w.dtype == torch.float32
    assert abs(w.std().item() - math.sqrt(2 / fan_in)) < 0.01 * math.sqrt(2 / fan_in) + 1e-3
    assert abs(w.mean().item()) < 5e-3


def test_xavier_statistics():
    fan_in, fan_out = 300, 500
    w = xavier([1000, 500], fan_in, fan_out, generator=gen(2))
    bound = math.sqrt(6 / (fan_in + fan_out))
    assert w.abs().max().item() <= bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.01 * bound
    assert abs(w.mean().item()) < 0.01 * bound


def test_normal_uniform_zeros():
    w = normal([200000], 0.5, mean=2.0, generator=gen(3))
    assert abs(w.mean().item() - 2.0) < 0.01 and abs(w.std().item() - 0.5) < 0.01
    u = uniform([200000], -1.0, 3.0, generator=gen(4))
    assert u.min() >= -1.0 and u.max() < 3.0 and abs(u.mean().item() - 1.0) < 0.02
    z = zeros([2, 3, 3])
    assert z.dtype == torch.float32 and torch.count_nonzero(z) == 0


def test_determinism_with_generator():
    for fn in (
        lambda g: he([8, 3, 3, 3], 27, generator=g),
        lambda g: xavier([8, 3, 3, 3], 27, 72, generator=g),
        lambda g: normal([8, 3], 0.1, generator=g),
        lambda g: uniform([8, 3], 0.0, 1.0, generator=g),
    ):
        assert torch.equal(fn(gen(7)), fn(gen(7)))
        assert not torch.equal(fn(gen(7)), fn(gen(8)))


def test_fan_in_out():
    assert fan_in_out([16, 8, 3, 3]) == (72, 144)
    assert fan_in_out([16, 4, 3, 3], groups=2) == (36, 72)
    assert fan_in_out([10, 20]) == (20, 10)
    with pytest.raises(ValueError):
        fan_in_out([15, 4, 3], groups=2)


# -------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "call",
    [
        lambda: gaussian_kernel_1d(5, -1.0),
        lambda: gaussian_kernel_1d(5, 0.0),
        lambda: gaussian_kernel_1d(0, 1.0),
        lambda: gaussian([2, 1, 3, 3], -0.5),
        lambda: gaussian([2, 1, 3, 3], [1.0]),
        lambda: gaussian([2, 1], 1.0),
        lambda: gaussian_factors([], 1.0),
        lambda: gaussian_factors([[2, 1, 3], [3, 1, 3]], 1.0),
        lambda: gabor([2, 1, 3, 3], orientations=0),
        lambda: gabor([2, 1, 3, 3], orientations=[]),
        lambda: gabor([2, 1, 3, 3], frequencies=[]),
        lambda: gabor([2, 1, 3, 3], frequencies=-2),
        lambda: gabor([2, 1, 3, 3], frequencies=[-1.0]),
        lambda: gabor([2, 1, 3, 3], phases=[]),
        lambda: gabor([2, 1, 3, 3], phases=0),
        lambda: he([3, 3], 0),
        lambda: xavier([3, 3], 3, -1),
        lambda: normal([3], -1.0),
        lambda: uniform([3], 2.0, 1.0),
        lambda: edges([2, 1, 1, 1]),
        lambda: edges([0, 1, 3, 3]),
        lambda: edges([2, 1, 3, 3, 3, 3]),
    ],
)
def test_validation_errors(call):
    with pytest.raises(ValueError):
        call()


def test_returns_new_tensors():
    a, b = edges([4, 1, 3, 3]), edges([4, 1, 3, 3])
    a.add_(1.0)
    assert torch.equal(b[0, 0], torch.tensor(SOBEL_X, dtype=torch.float32))
    g1 = gabor([2, 1, 5, 5])
    g1.zero_()
    assert gabor([2, 1, 5, 5]).abs().sum() > 0
