"""k-means feature learning for init=kmeans conv layers (convdsl/kmeans.py)."""
import numpy as np
import pytest
import torch

import convdsl
from convdsl import ConvDSLError
from convdsl.kmeans import (
    fit_kmeans_layers,
    learn_kernels,
    normalize_patches,
    sample_patches,
    spherical_kmeans,
    zca_whitening,
)
from convdsl.module import _lookup
from convdsl.torch_ops.local import extract_patches

KM = """
net KM(x: f32[N, 1, 16, 16]) {
    f = relu(conv(x, 8, kernel=5, init=kmeans, trainable=false))
    return dense(flatten(maxpool(f, output=2)), 10)
}
"""

STACKED = """
net Two(x: f32[N, 1, 12, 12]) {
    a = relu(conv(x, 4, kernel=3, init=kmeans, trainable=false))
    b = relu(conv(a, 6, kernel=3, stride=2, init=kmeans, trainable=false))
    return dense(flatten(b), 3)
}
"""

PLAIN = """
net Plain(x: f32[N, 1, 8, 8]) {
    return dense(flatten(relu(conv(x, 4, kernel=3))), 2)
}
"""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The k-means loop runs many tiny matmuls; on a loaded machine multithreaded BLAS spins
    # (seconds instead of milliseconds), so these tests run single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compile_net(src, seed=0):
    torch.manual_seed(seed)
    return convdsl.compile(src, backend="torch")


def data(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g)


def conv_node(net, layer):
    return next(n for n in net.unfused_graph.nodes() if n.layer == layer)


def user_of(net, node):
    return net.unfused_graph.users(node.id)[0]


# -- the net-level workflow --------------------------------------------------------------------

def test_running_before_fit_raises():
    net = compile_net(KM)
    with pytest.raises(ConvDSLError, match="fit_features"):
        net(data((2, 1, 16, 16)))


def test_fit_then_forward():
    net = compile_net(KM)
    before = _lookup(net, "f.weight").detach().clone()
    x = data((32, 1, 16, 16))
    net.fit_features(x)
    assert net._kmeans_pending == set()
    weight = _lookup(net, "f.weight")
    assert weight.shape == (8, 1, 5, 5) and weight.dtype == torch.float32
    assert not torch.equal(weight, before)
    assert torch.isfinite(weight).all() and torch.isfinite(_lookup(net, "f.bias")).all()
    assert not weight.requires_grad  # trainable=false stays frozen
    y = net(x)
    assert y.shape == (32, 10) and torch.isfinite(y).all()


def test_report():
    net = compile_net(KM)
    report = fit_kmeans_layers(net, data((16, 1, 16, 16)), max_patches=500, iterations=3)
    info = report["f"]
    assert info["patches"] == 500
    assert 1 <= info["iterations"] <= 3
    assert -1 <= info["mean_similarity"] <= 1
    assert sum(info["counts"]) == 500 and len(info["counts"]) == 8


def test_deterministic_given_seed():
    x = data((16, 1, 16, 16))
    nets = [compile_net(KM) for _ in range(3)]
    fit_kmeans_layers(nets[0], x, seed=3, max_patches=1000)
    fit_kmeans_layers(nets[1], x, seed=3, max_patches=1000)
    fit_kmeans_layers(nets[2], x, seed=4, max_patches=1000)
    w = [_lookup(n, "f.weight") for n in nets]
    assert torch.equal(w[0], w[1])
    assert torch.equal(_lookup(nets[0], "f.bias"), _lookup(nets[1], "f.bias"))
    assert torch.equal(nets[0](x), nets[1](x))
    assert not torch.equal(w[0], w[2])


def test_stacked_layers_fitted_in_order():
    net = compile_net(STACKED)
    a_node, b_node = conv_node(net, "a"), conv_node(net, "b")
    seen = []
    real_execute = net._execute

    def spy(inputs, stop_before=None, graph=None):
        if stop_before == b_node.id:  # b's input must come from a fitted a
            seen.append(("b-input", _lookup(net, "a.weight").detach().clone(),
                         set(net._kmeans_pending)))
        return real_execute(inputs, stop_before, graph)

    net._execute = spy
    order = []
    x = data((16, 1, 12, 12))
    report = fit_kmeans_layers(net, x, iterations=2,
                               progress=lambda layer, step, total: order.append(layer))
    del net._execute
    assert list(report) == ["a", "b"]
    assert order[0] == "a" and order[-1] == "b" and order == sorted(order)
    (_, a_weight_then, pending_then), = seen
    assert pending_then == {"b"}
    assert torch.equal(a_weight_then, _lookup(net, "a.weight"))
    assert _lookup(net, "b.weight").shape == (6, 4, 3, 3)
    assert net._kmeans_pending == set()
    assert torch.isfinite(net(x)).all()


def test_wrong_inputs_give_convdsl_errors():
    net = compile_net(KM)
    before = _lookup(net, "f.weight").detach().clone()
    for bad in (data((4, 1, 15, 16)), data((1, 16, 16)), np.zeros((4, 1, 16, 16), np.float32),
                data((4, 1, 16, 16)).double(), (data((4, 1, 16, 16)), data((4, 1, 16, 16)))):
        with pytest.raises(ConvDSLError):
            net.fit_features(bad)
    assert torch.equal(_lookup(net, "f.weight"), before)
    assert net._kmeans_pending == {"f"}


def test_bad_options_and_constant_data():
    net = compile_net(KM)
    with pytest.raises(ConvDSLError, match="max_patches"):
        fit_kmeans_layers(net, data((2, 1, 16, 16)), max_patches=0)
    with pytest.raises(ConvDSLError, match="constant"):
        fit_kmeans_layers(net, torch.zeros(2, 1, 16, 16))
    assert net._kmeans_pending == {"f"}


def test_net_without_kmeans_layers():
    net = compile_net(PLAIN)
    with pytest.raises(ConvDSLError, match="kmeans"):
        net.fit_features(data((2, 1, 8, 8)))
    with pytest.raises(ConvDSLError, match="kmeans"):
        fit_kmeans_layers(net, data((2, 1, 8, 8)))


# -- the folding rule and the weight layout -------------------------------------------------------

def test_fold_matches_whitened_response():
    """kernel·p + bias = (s(p)/s̄)·(Wc)·p_n − (Wc)·μ, so c·z = kernel·p·s̄/s(p) + bias exactly."""
    g = torch.Generator().manual_seed(1)
    patches = torch.rand(3000, 12, generator=g, dtype=torch.float64) * 255
    fit = learn_kernels(patches, 5, generator=torch.Generator().manual_seed(0))
    normalized, scales, _ = normalize_patches(patches)
    z = (normalized - fit["mean"]) @ fit["whitening"]
    whitened_response = z @ fit["centroids"].T
    layer = patches @ fit["kernels"].T + fit["bias"]
    assert fit["kernels"].sum(dim=1).abs().max() < 1e-9  # zero-sum: brightness removed
    reconstructed = (layer - fit["bias"]) * (fit["contrast"] / scales)[:, None] + fit["bias"]
    torch.testing.assert_close(reconstructed, whitened_response, rtol=1e-7, atol=1e-7)
    # brightness shifts do not change the response
    torch.testing.assert_close(layer, (patches + 17) @ fit["kernels"].T + fit["bias"])


def test_weights_written_in_conv_layout():
    """Multichannel input, pad=same, flip=true: the conv applies exactly the learned kernels."""
    src = """
    net L(x: f32[N, 2, 9, 9]) {
        c = relu(conv(x, 6, kernel=3, pad=same, flip=true, init=kmeans))
        return dense(flatten(c), 2)
    }
    """
    net = compile_net(src)
    x = data((6, 2, 9, 9))
    fit_kmeans_layers(net, x, seed=5)
    pads = ((1, 1), (1, 1))
    patches = sample_patches(x, (3, 3), (1, 1), pads, max_patches=20000,
                             generator=torch.Generator().manual_seed(5))
    assert patches.shape == (6 * 81, 18)
    ref = learn_kernels(patches, 6, generator=torch.Generator().manual_seed(5))
    kernels = ref["kernels"].reshape(6, 2, 3, 3).float()
    torch.testing.assert_close(_lookup(net, "c.weight"), kernels.flip(2, 3))
    torch.testing.assert_close(_lookup(net, "c.bias"), ref["bias"].float())
    node = conv_node(net, "c")
    conv_out = net._execute((x,), stop_before=user_of(net, node).id,
                            graph=net.unfused_graph)[0]  # [N, 6, 9, 9]
    windows = extract_patches(x, (3, 3), (1, 1), pads)  # [N, C, 9, 9, 3, 3]
    expect = torch.einsum("ncxyuv,icuv->nixy", windows, kernels) + ref["bias"].float()[None, :, None, None]
    torch.testing.assert_close(conv_out, expect, rtol=1e-4, atol=1e-4)


# -- feature recovery ------------------------------------------------------------------------------

def edge_patterns():
    u = torch.arange(5, dtype=torch.float64) - 2
    vertical = torch.sign(u)[None, :].expand(5, 5)
    horizontal = vertical.T
    diagonal = torch.sign(u[None, :] + u[:, None])
    anti = torch.sign(u[None, :] - u[:, None])
    return torch.stack([vertical, horizontal, diagonal, anti])  # [4, 5, 5]


def test_recovers_oriented_edges_from_patches():
    patterns = edge_patterns().reshape(4, 25)
    g = torch.Generator().manual_seed(0)
    n = 2000
    labels = torch.randint(4, (n,), generator=g)
    contrast = 20 + 60 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    brightness = 255 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    patches = patterns[labels] * contrast + brightness + 5 * torch.randn(n, 25, generator=g,
                                                                       dtype=torch.float64)
    fit = learn_kernels(patches, 4, generator=torch.Generator().manual_seed(0))
    # each pattern has a centroid close to it in whitened space
    normalized, _, _ = normalize_patches(patterns)
    whitened = (normalized - fit["mean"]) @ fit["whitening"]
    cos = torch.nn.functional.normalize(whitened, dim=1) @ fit["centroids"].T
    assert (cos.max(dim=1).values > 0.9).all()
    assert sorted(cos.argmax(dim=1).tolist()) == [0, 1, 2, 3]
    # de-whitened (W⁻¹ c), the centroids are the normalized patterns (less their mean μ)
    dewhitened = fit["centroids"] @ torch.linalg.inv(fit["whitening"])
    cos = torch.nn.functional.normalize(normalized - fit["mean"], dim=1) @ \
        torch.nn.functional.normalize(dewhitened, dim=1).T
    assert (cos.max(dim=1).values > 0.9).all()
    # the assignments are pure
    for label in range(4):
        clusters = fit["assignments"][labels == label]
        assert (clusters == clusters.mode().values).float().mean() > 0.98
    # the raw kernels respond most to their own pattern
    response = patterns @ fit["kernels"].T
    assert sorted(response.argmax(dim=1).tolist()) == [0, 1, 2, 3]


def test_recovers_edges_through_the_net():
    src = """
    net E(x: f32[N, 1, 20, 20]) {
        f = relu(conv(x, 4, kernel=5, stride=5, init=kmeans, trainable=false))
        return dense(flatten(f), 2)
    }
    """
    patterns = edge_patterns().float()
    g = torch.Generator().manual_seed(2)
    labels = torch.randint(4, (100, 4, 4), generator=g)
    tiles = patterns[labels]  # [100, 4, 4, 5, 5]: a 4×4 grid of 5×5 tiles per image
    images = tiles.permute(0, 1, 3, 2, 4).reshape(100, 1, 20, 20)
    images = images * 0.3 + 0.5 + 0.02 * torch.randn(images.shape, generator=g)
    net = compile_net(src)
    report = fit_kmeans_layers(net, images)
    assert report["f"]["patches"] == 1600 and report["f"]["mean_similarity"] > 0.5
    kernels = _lookup(net, "f.weight").reshape(4, 25)
    response = patterns.reshape(4, 25) @ kernels.T
    assert sorted(response.argmax(dim=1).tolist()) == [0, 1, 2, 3]
    # selective: each pattern drives its own feature well above the others (after the ReLU)
    own = response.max(dim=1).values
    others = response.sort(dim=1).values[:, -2].clamp(min=0)
    assert (own > 2 * others).all(), response


# -- the k-means core ------------------------------------------------------------------------------

def reference_spherical_kmeans(x, centroids, iterations=50):
    """Full-batch Lloyd spherical k-means in numpy."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
    for _ in range(iterations):
        assign = (x @ c.T).argmax(axis=1)
        for j in range(len(c)):
            if (assign == j).any():
                s = x[assign == j].sum(axis=0)
                c[j] = s / np.linalg.norm(s)
    return c, (x @ c.T).argmax(axis=1)


def test_spherical_kmeans_known_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(3, 10, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(3, (600,), generator=g)
    scale = 0.5 + 3 * torch.rand(600, 1, generator=g, dtype=torch.float64)  # norms do not matter
    x = (centers[labels] + 0.1 * torch.randn(600, 10, generator=g, dtype=torch.float64)) * scale
    out = spherical_kmeans(x, 3, iterations=20, batch_size=64, generator=torch.Generator().manual_seed(1))
    c = out["centroids"]
    torch.testing.assert_close(c.norm(dim=1), torch.ones(3, dtype=torch.float64))
    match = (centers @ c.T).argmax(dim=1)
    assert sorted(match.tolist()) == [0, 1, 2]
    assert ((centers @ c.T).max(dim=1).values > 0.99).all()
    assert torch.equal(out["assignments"], match[labels])
    ref_c, ref_assign = reference_spherical_kmeans(x.numpy(), centers.numpy())
    assert np.array_equal(out["assignments"].numpy(), match.numpy()[ref_assign])
    np.testing.assert_allclose(c[match].numpy(), ref_c, atol=2e-3)
    assert out["mean_similarity"] > 0.9
    assert out["counts"].sum() == 600


def test_spherical_kmeans_deterministic_and_checks():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(0))
    a = spherical_kmeans(x, 5, generator=torch.Generator().manual_seed(7))
    b = spherical_kmeans(x, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a["centroids"], b["centroids"])
    assert torch.equal(a["assignments"], b["assignments"])
    with pytest.raises(ConvDSLError, match="at least"):
        spherical_kmeans(x[:3], 5)


def test_zca_whitens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 4, generator=g, dtype=torch.float64) @ torch.tensor(
        [[3.0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 1, 0, 0.5]], dtype=torch.float64)
    w, mean, eps = zca_whitening(x, zca_eps=1e-6)
    z = (x - mean) @ w
    torch.testing.assert_close(torch.cov(z.T), torch.eye(4, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(w, w.T)


# -- grouped convs and tables ----------------------------------------------------------------------

def test_grouped_conv_and_table():
    src = """
    table T = [[0], [0], [1, 2], [1, 2], [0, 1, 2]]
    net G(x: f32[N, 3, 10, 10]) {
        g = relu(conv(x, 4, kernel=3, groups=3, init=kmeans))
        t = relu(conv(x, 5, kernel=3, connect=T, bias=none, init=kmeans))
        return dense(flatten(maxpool(g + t, output=2)), 2)
    }
    """
    with pytest.raises(ConvDSLError):  # 3 groups do not divide 4 outputs
        convdsl.compile(src, backend="torch")
    src = src.replace("conv(x, 4, kernel=3, groups=3", "conv(x, 6, kernel=3, groups=3").replace(
        "conv(x, 5,", "conv(x, 6,").replace("[0, 1, 2]]", "[0, 1, 2], [0, 1, 2]]")
    net = compile_net(src)
    x = data((8, 3, 10, 10))
    report = fit_kmeans_layers(net, x, iterations=3)
    assert set(report) == {"g", "t"} and net._kmeans_pending == set()
    assert _lookup(net, "g.weight").shape == (6, 1, 3, 3)
    t = _lookup(net, "t.weight")
    assert t.shape == (6, 3, 3, 3)
    assert (t[0:2, 1:] == 0).all() and (t[2:4, 0] == 0).all()  # outside the table: zero
    assert (t[0:2, 0] != 0).any() and (t[2:4, 1:] != 0).any() and (t[4:, :] != 0).any()
    assert torch.isfinite(net(x)).all()


def test_progress_true_without_tqdm(capsys):
    net = compile_net(KM)
    fit_kmeans_layers(net, data((4, 1, 16, 16)), iterations=2, progress=True)
    try:
        import tqdm  # noqa: F401
    except ImportError:
        assert "kmeans f" in capsys.readouterr().err
