"""k-means feature learning for `init=kmeans` conv layers (LANGUAGE.md §7; the
Deep Learning book §9.9; Coates, Lee & Ng 2011; Coates & Ng 2012).

`net.fit_features(x)` calls `fit_kmeans_layers(net, x)`, which fits every
init=kmeans layer in graph order, one after the other, so a later layer learns
from the outputs of the earlier ones, already fitted:

1. **Patches.** The layer's input (the net run up to that layer) is cut into
   the windows the conv reads (its kernel, stride, dilation and padding, zero
   fill), each flattened channel-major like the weight `[out, C, *k]`. At most
   `max_patches` windows are kept, drawn at random (seeded).
2. **Contrast normalization.** Each patch `p` (length D) becomes
   `p_n = (p - mean(p)) / s(p)`, `s(p) = sqrt(var(p) + eps_n)`. Coates et al.
   use eps_n = 10 for 0-255 pixels; to be independent of the data's scale we
   take `eps_n = norm_eps * mean_over_patches(var(p))` (norm_eps = 0.01, which
   is about that ratio for natural-image patches in 0-255).
3. **ZCA whitening.** `μ` = mean of the `p_n`, `Σ = cov(p_n) = U Λ Uᵀ`,
   `W = U (Λ + eps_z)^(-1/2) Uᵀ` (symmetric) with
   `eps_z = zca_eps * mean(Λ)` (zca_eps = 0.1, the value of Coates' code for
   normalized patches), and `z = W (p_n - μ)`.
4. **Spherical k-means** (Dhillon & Modha; Coates & Ng 2012 recommend it for
   whitened patches) on the directions `z / |z|` with k = the conv's `out`:
   unit-length centroids, each patch assigned to the centroid of largest dot
   product (signed, so opposite polarities are different features, which suits
   the ReLU that usually follows), mini-batch updates with per-centroid rates
   1/count (Sculley 2010), k-means++ seeding, and dead centroids re-seeded at
   the worst-fitting patches after each pass.

**Folding into the conv (the rule).** The per-patch normalization is not
linear, so the layer cannot reproduce it; it stays linear in raw patches and
applies, for centroid `c` (unit, whitened space),

    w      = W c  projected onto zero-sum vectors (w - mean(w); W c is already
             orthogonal to the all-ones direction up to rounding, since every
             p_n - μ is)
    kernel = w / s̄           where s̄ = mean over the sampled patches of s(p)
    bias   = -w · μ          (only if the layer has a bias)

Because `w` sums to zero, `w·p = w·(p - mean(p)) = s(p) · w·p_n`, so for every
raw patch

    kernel·p + bias = (s(p)/s̄) · (W c)·p_n  -  (W c)·μ

which is exactly the whitened response `c·z = c·W(p_n - μ)` whenever the patch
has the typical contrast `s(p) = s̄`; other patches get the whitened response
with its contrast-dependent part scaled by their contrast relative to s̄
(brightness, the patch mean, is removed exactly). A `bias=location` layer gets
the same constant at every position; `bias=none` drops it. With `flip=true`
the stored weight is the kernel flipped, so the conv still applies `kernel`.

Grouped convs (`groups=`, depthwise) and connection tables are fitted per set
of outputs that read the same input channels: each such set gets its own
patches (of those channels only), whitening and k-means with k = its size.
"""
from __future__ import annotations

import math
import sys
from typing import Callable

import torch

from .errors import ConvDSLError
from .ops.spatial import resolve_pads
from .torch_ops.local import extract_patches

__all__ = [
    "fit_kmeans_layers",
    "kmeans_layers",
    "sample_patches",
    "normalize_patches",
    "zca_whitening",
    "spherical_kmeans",
    "learn_kernels",
]

DEFAULT_ITERATIONS = 10
DEFAULT_BATCH_SIZE = 1024
DEFAULT_MAX_PATCHES = 20000
NORM_EPS = 0.01
ZCA_EPS = 0.1

_SAMPLE_WITHOUT_REPLACEMENT_LIMIT = 4_000_000  # above this many windows, draw with replacement
_KMEANS_PP_SAMPLE = 4096


# -- the layers to fit -----------------------------------------------------------------------

def kmeans_layers(net) -> list:
    """The graph nodes whose weight has init=kmeans, in graph order (a shared layer once),
    in the net's unfused graph (a fused node would hide the layer's input)."""
    graph = net.unfused_graph
    found, seen = [], set()
    for node in graph.nodes():
        decls = [graph.params[name] for role, name in node.params.items()
                 if role.startswith("weight")]
        kmeans = [d for d in decls if d.init[0] == "kmeans"]
        if not kmeans:
            continue
        if any(d.name in seen for d in kmeans):
            continue  # a shared (share=) layer: its kernels were learned at its first use
        seen.update(d.name for d in kmeans)
        found.append(node)
    return found


def _check_node(net, node):
    graph = net.unfused_graph
    weight_name = node.params.get("weight")
    decl = graph.params[weight_name] if weight_name else next(
        graph.params[n] for r, n in node.params.items() if r.startswith("weight"))
    if node.op != "conv" or weight_name is None or node.attrs.get("separable"):
        raise ConvDSLError(f"layer {decl.layer}: init=kmeans needs a plain (non-separable) conv "
                           f"layer, not {node.op}", decl.span)
    return decl


def _channel_sets(node, channels: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(output channels, input channels read, weight columns) per set of outputs that read the
    same input channels: one set for a plain conv, one per group, one per distinct table row."""
    out = node.attrs["out"]
    table = node.attrs.get("table")
    if table is not None:
        sets: dict[tuple, list[int]] = {}
        for j, row in enumerate(table):
            sets.setdefault(tuple(sorted(row)), []).append(j)
        return [(outs, list(row), list(row)) for row, outs in sets.items()]
    groups = node.attrs.get("groups", 1)
    per_in, per_out = channels // groups, out // groups
    return [(list(range(g * per_out, (g + 1) * per_out)),
             list(range(g * per_in, (g + 1) * per_in)), list(range(per_in)))
            for g in range(groups)]


# -- the pipeline stages ---------------------------------------------------------------------

def sample_patches(x: torch.Tensor, kernel, stride, pads, dilation=None, *,
                   max_patches: int | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """`[S, C*prod(kernel)]` windows of `x` `[N, C, *m]` (zero padded), channel-major; all of
    them (in order) if there are at most `max_patches`, else `max_patches` drawn at random."""
    windows = extract_patches(x, kernel, stride, pads, dilation)  # [N, C, *o, *k], a view
    d = x.dim() - 2
    grid = (windows.shape[0],) + tuple(windows.shape[2:2 + d])
    total = math.prod(grid)
    if max_patches is None or total <= max_patches:
        index = torch.arange(total)
    elif total <= _SAMPLE_WITHOUT_REPLACEMENT_LIMIT:
        index = torch.randperm(total, generator=generator)[:max_patches].sort().values
    else:
        index = torch.randint(total, (max_patches,), generator=generator).sort().values
    coords = []
    for size in reversed(grid):
        coords.append(index % size)
        index = index // size
    coords = [c.to(x.device) for c in reversed(coords)]
    per_position = windows.movedim(1, 1 + d)  # [N, *o, C, *k]
    picked = per_position[tuple(coords)]  # [S, C, *k], copies only the chosen windows
    return picked.reshape(picked.shape[0], -1)


def normalize_patches(patches: torch.Tensor, norm_eps: float = NORM_EPS):
    """Brightness and contrast normalization: `(p - mean(p)) / sqrt(var(p) + eps_n)` per row,
    `eps_n = norm_eps * mean(var)`. Returns (normalized, scales s(p), eps_n)."""
    mean = patches.mean(dim=1, keepdim=True)
    centered = patches - mean
    var = centered.pow(2).mean(dim=1, keepdim=True)
    typical = float(var.mean())
    if not typical > 0 or not math.isfinite(typical):
        raise ConvDSLError("every patch is constant (or not finite)")
    eps = norm_eps * typical
    scale = torch.sqrt(var + eps)
    return centered / scale, scale.squeeze(1), eps


def zca_whitening(normalized: torch.Tensor, zca_eps: float = ZCA_EPS):
    """Symmetric ZCA whitening matrix W `[D, D]` and mean μ `[D]` of the rows (float64)."""
    data = normalized.double()
    mean = data.mean(dim=0)
    centered = data - mean
    cov = centered.T @ centered / max(data.shape[0] - 1, 1)
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp(min=0)
    eps = zca_eps * float(values.mean()) if float(values.mean()) > 0 else zca_eps
    whitening = (vectors * (values + eps).rsqrt()) @ vectors.T
    return whitening, mean, eps


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)


def _kmeans_pp(data: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding with the cosine distance 1 - cos on unit rows."""
    n = data.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [data[first]]
    distance = (1 - data @ data[first]).clamp(min=0)
    for _ in range(1, k):
        weights = distance.double().cpu()
        if float(weights.sum()) <= 0:  # fewer distinct directions than k
            pick = int(torch.randint(n, (1,), generator=generator))
        else:
            pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids.append(data[pick])
        distance = torch.minimum(distance, (1 - data @ data[pick]).clamp(min=0))
    return torch.stack(centroids)


def spherical_kmeans(data: torch.Tensor, k: int, *, iterations: int = DEFAULT_ITERATIONS,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     generator: torch.Generator | None = None,
                     callback: Callable[[int, int], None] | None = None,
                     tol: float = 1e-7) -> dict:
    """Mini-batch spherical k-means on the rows of `data` `[n, D]` (taken as directions).

    Returns {"centroids": [k, D] unit rows, "assignments": [n], "similarities": [n] (cosine to
    the assigned centroid), "mean_similarity", "counts": [k], "iterations": passes run}.
    `iterations` is the number of passes over the data; it stops early when no centroid moves
    by more than `tol` (1 - cos) in a pass. `callback(pass, iterations)` after each pass."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    n = data.shape[0]
    if k < 1:
        raise ConvDSLError(f"k-means needs k >= 1, got {k}")
    if n < k:
        raise ConvDSLError(f"k-means with {k} centroids needs at least {k} patches, got {n}")
    points = _unit_rows(data)
    seed_rows = points
    if n > _KMEANS_PP_SAMPLE:
        seed_rows = points[torch.randperm(n, generator=generator)[:_KMEANS_PP_SAMPLE]
                           .to(points.device)]
    centroids = _kmeans_pp(seed_rows, k, generator)
    counts = torch.zeros(k, dtype=points.dtype, device=points.device)
    batch_size = max(1, int(batch_size))
    passes = 0
    for step in range(iterations):
        before = centroids.clone()
        hits = torch.zeros(k, dtype=torch.long, device=points.device)
        order = torch.randperm(n, generator=generator).to(points.device)
        for start in range(0, n, batch_size):
            batch = points[order[start:start + batch_size]]
            assign = (batch @ centroids.T).argmax(dim=1)
            onehot = torch.nn.functional.one_hot(assign, k).to(batch.dtype)  # [B, k]
            sums = onehot.T @ batch
            got = torch.bincount(assign, minlength=k)
            hits += got
            counts += got.to(counts.dtype)
            rate = (1 / counts.clamp(min=1)).unsqueeze(1)
            centroids = _unit_rows(centroids + rate * (sums - got.unsqueeze(1) * centroids))
        passes = step + 1
        dead = (hits == 0).nonzero().flatten()
        if len(dead) and step + 1 < iterations:
            # Re-seed centroids nobody chose at the worst-fitting points.
            fit = (points @ centroids.T).max(dim=1).values
            worst = fit.argsort()[:len(dead)]
            centroids[dead] = points[worst]
            counts[dead] = 0
        if callback is not None:
            callback(passes, iterations)
        shift = float((1 - (before * centroids).sum(dim=1)).max())
        if not len(dead) and shift < tol:
            break
    sims = points @ centroids.T
    best, assignments = sims.max(dim=1)
    return {
        "centroids": centroids,
        "assignments": assignments,
        "similarities": best,
        "mean_similarity": float(best.mean()),
        "counts": torch.bincount(assignments, minlength=k),
        "iterations": passes,
    }


def learn_kernels(patches: torch.Tensor, k: int, *, iterations: int = DEFAULT_ITERATIONS,
                  batch_size: int = DEFAULT_BATCH_SIZE, generator: torch.Generator | None = None,
                  norm_eps: float = NORM_EPS, zca_eps: float = ZCA_EPS,
                  callback: Callable[[int, int], None] | None = None) -> dict:
    """The whole pipeline on raw patches `[S, D]`: normalize, whiten, spherical k-means, fold.

    Returns the k-means result plus "kernels" `[k, D]` and "bias" `[k]` (float64, to apply to
    raw patches as kernel·p + bias; see the module docstring), "whitening", "mean",
    "contrast" (s̄), "norm_eps", "zca_eps", "patches"."""
    normalized, scales, eps_n = normalize_patches(patches.double(), norm_eps)
    whitening, mean, eps_z = zca_whitening(normalized, zca_eps)
    whitened = (normalized - mean) @ whitening
    result = spherical_kmeans(whitened, k, iterations=iterations, batch_size=batch_size,
                              generator=generator, callback=callback)
    w = result["centroids"] @ whitening  # rows W c (W symmetric)
    w = w - w.mean(dim=1, keepdim=True)
    contrast = float(scales.mean())
    result.update(kernels=w / contrast, bias=-(w @ mean), whitening=whitening, mean=mean,
                  contrast=contrast, norm_eps=eps_n, zca_eps=eps_z, patches=patches.shape[0])
    return result


# -- progress --------------------------------------------------------------------------------

def _progress_for(progress, layer: str, total: int):
    """(callback(pass, total), close()) for progress=None (a bar if stderr is a terminal,
    see convdsl.progress), False, True or a callable."""
    from .progress import wanted

    if callable(progress) and not isinstance(progress, bool):
        return (lambda step, n: progress(layer, step, n)), lambda: None
    if not wanted(progress):
        return None, lambda: None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress is None:  # automatic bars need tqdm; lines only when asked for
            return None, lambda: None

        def report(step, n):
            print(f"kmeans {layer}: pass {step}/{n}", file=sys.stderr)
        return report, lambda: None
    bar = tqdm(total=total, desc=f"kmeans {layer}", leave=False)

    def update(step, n):
        bar.update(step - bar.n)
    return update, bar.close


# -- the entry point -------------------------------------------------------------------------

def fit_kmeans_layers(net, x, *, seed: int = 0, iterations: int = DEFAULT_ITERATIONS,
                      batch_size: int = DEFAULT_BATCH_SIZE, max_patches: int = DEFAULT_MAX_PATCHES,
                      progress=None, norm_eps: float = NORM_EPS, zca_eps: float = ZCA_EPS) -> dict:
    """Fit every init=kmeans layer of `net` on training data `x` (a tensor, or a tuple/list of
    tensors, one per net input), in graph order, and mark them fitted.

    `progress`: None (a tqdm bar when tqdm is installed and stderr is a terminal, unless
    CONVDSL_PROGRESS=0), False (quiet), True (a tqdm bar if tqdm is installed, else a line per
    pass on stderr) or a callable `progress(layer, pass, passes)`. Deterministic given `seed`.
    Returns {layer: {"patches", "mean_similarity", "iterations", "contrast", "norm_eps",
    "zca_eps", "counts"}}."""
    if isinstance(x, list):
        x = tuple(x)
    inputs = x if isinstance(x, tuple) else (x,)
    for name, value in (("iterations", iterations), ("batch_size", batch_size),
                        ("max_patches", max_patches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConvDSLError(f"fit_features: {name} must be a positive integer, got {value!r}")
    nodes = kmeans_layers(net)
    if not nodes:
        raise ConvDSLError(f"net {net.name} has no init=kmeans layer to fit")
    from .module import _lookup

    generator = torch.Generator().manual_seed(int(seed))
    report: dict[str, dict] = {}
    with torch.no_grad():
        # Check the data once up front, so a bad input fails before any layer changes.
        from .checks import bind_inputs
        bind_inputs(net._graph, inputs, net._device())
        for node in nodes:
            decl = _check_node(net, node)
            layer_input = net._execute(inputs, stop_before=node.id, graph=net.unfused_graph)[0]
            report[decl.layer] = _fit_node(net, node, decl, layer_input, generator, _lookup,
                                           iterations=iterations, batch_size=batch_size,
                                           max_patches=max_patches, progress=progress,
                                           norm_eps=norm_eps, zca_eps=zca_eps)
            net._kmeans_pending.discard(decl.layer)
    return report


def _fit_node(net, node, decl, x, generator, lookup, *, iterations, batch_size, max_patches,
              progress, norm_eps, zca_eps) -> dict:
    attrs = node.attrs
    d = x.dim() - 2
    kernel, stride = tuple(attrs["kernel"]), tuple(attrs["stride"])
    dilation = tuple(attrs.get("dilation") or (1,) * d)
    pads = resolve_pads(attrs["pad"], tuple(int(s) for s in x.shape[2:]), kernel, stride, dilation)
    pads = tuple((int(b), int(a)) for b, a in pads)
    weight = lookup(net, decl.name)
    bias_name = node.params.get("bias")
    bias = lookup(net, bias_name) if bias_name else None
    new_weight = torch.zeros(weight.shape, dtype=torch.float64)
    new_bias = torch.zeros(attrs["out"], dtype=torch.float64)
    sets = _channel_sets(node, x.shape[1])
    callback, close = _progress_for(progress, decl.layer, iterations * len(sets))
    totals = {"patches": 0, "similarity": 0.0, "iterations": 0, "counts": []}
    try:
        for index, (outs, channels, columns) in enumerate(sets):
            patches = sample_patches(x[:, channels], kernel, stride, pads, dilation,
                                     max_patches=max_patches, generator=generator)
            if callback is not None:
                done = index * iterations
                step = (lambda base: (lambda i, n: callback(base + i, iterations * len(sets))))(done)
            else:
                step = None
            try:
                fit = learn_kernels(patches, len(outs), iterations=iterations,
                                    batch_size=batch_size, generator=generator,
                                    norm_eps=norm_eps, zca_eps=zca_eps, callback=step)
            except ConvDSLError as error:
                raise ConvDSLError(f"layer {decl.layer} (init=kmeans): {error.message}",
                                   decl.span) from None
            kernels = fit["kernels"].cpu().reshape((len(outs), len(channels)) + kernel)
            new_weight[torch.tensor(outs)[:, None], torch.tensor(columns)[None, :]] = kernels
            new_bias[outs] = fit["bias"].cpu()
            totals["patches"] += fit["patches"]
            totals["similarity"] += fit["mean_similarity"] * fit["patches"]
            totals["iterations"] = max(totals["iterations"], fit["iterations"])
            totals["counts"].extend(int(c) for c in fit["counts"])
            totals.setdefault("contrast", fit["contrast"])
            totals.setdefault("norm_eps", fit["norm_eps"])
            totals.setdefault("zca_eps", fit["zca_eps"])
    finally:
        close()
    if attrs.get("flip"):
        new_weight = new_weight.flip(list(range(2, 2 + d)))
    weight.copy_(new_weight.to(weight.dtype))
    if bias is not None and attrs.get("bias", "channel") != "none":
        bias.copy_(new_bias.reshape((-1,) + (1,) * (bias.dim() - 1)).expand(bias.shape)
                   .to(bias.dtype))
    return {
        "patches": totals["patches"],
        "mean_similarity": totals["similarity"] / max(totals["patches"], 1),
        "iterations": totals["iterations"],
        "contrast": totals.get("contrast"),
        "norm_eps": totals.get("norm_eps"),
        "zca_eps": totals.get("zca_eps"),
        "counts": totals["counts"],
    }
