"""Reference implementations for the numerical tests, one of each, in one place.

Everything here is written independently of convdsl: PyTorch built-ins (F.conv*,
F.conv_transpose*) where they implement the same definition, and direct loops
over the equations of the Deep Learning book's chapter 9 (and LANGUAGE.md §6)
where PyTorch has no equivalent. Tests compare compiled nets with these, never
with convdsl's own torch lowering.

Conventions:

* tensors are [N, C, *spatial]; a per-dim argument is an int (every spatial dim)
  or a tuple with one entry per dim;
* `pad` takes the language's forms: "valid", "same" (TensorFlow's rule), "full",
  an int, or per dim an int or a (before, after) pair;
* a reference computes in the dtype of its inputs (pass float64 tensors for a
  float64 reference) and is differentiable, so autograd gives the reference
  gradient;
* `b=None` means no bias, whatever `bias` says.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


# -- geometry: the language's padding and size rules, written out here -------------------------

def per_dim(value, rank: int) -> tuple:
    """An int for every spatial dim, or a tuple/list already given per dim."""
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


def keff(k: int, r: int = 1) -> int:
    """The extent of a kernel of k taps at dilation r."""
    return r * (k - 1) + 1


def tf_same_pads(m: int, k: int, s: int, r: int = 1) -> tuple[int, int]:
    """TensorFlow's `same`: out = ceil(m/s); total = max((out-1)·s + k' − m, 0);
    the smaller half before."""
    total = max((-(-m // s) - 1) * s + keff(k, r) - m, 0)
    return total // 2, total - total // 2


def resolve_pads(pad, sizes, kernel, stride=1, dilation=1) -> list[tuple[int, int]]:
    """(before, after) per spatial dim for a window `kernel` at `stride` and
    `dilation` over inputs of `sizes`, by the language's rules (None = valid)."""
    rank = len(sizes)
    kernel, stride, dilation = (per_dim(v, rank) for v in (kernel, stride, dilation))
    if pad is None or pad == "valid":
        return [(0, 0)] * rank
    if pad == "same":
        return [tf_same_pads(m, k, s, r) for m, k, s, r in zip(sizes, kernel, stride, dilation)]
    if pad == "full":
        return [(keff(k, r) - 1,) * 2 for k, r in zip(kernel, dilation)]
    return [(p, p) if isinstance(p, int) else tuple(p) for p in per_dim(pad, rank)]


def out_size(m: int, k: int, s: int, before: int, after: int, r: int = 1) -> int:
    return (m + before + after - keff(k, r)) // s + 1


def pad_nd(x: torch.Tensor, pairs: Sequence[tuple[int, int]], value: float = 0.0) -> torch.Tensor:
    """Pad the spatial dims of [N, C, *m] by (before, after) pairs, first spatial
    dim first (negative values crop)."""
    flat = [v for pair in reversed(list(pairs)) for v in pair]
    return F.pad(x, flat, value=value)


# -- weights and biases ------------------------------------------------------------------------

def flip_kernel(w: torch.Tensor) -> torch.Tensor:
    """An [out, in, *k] kernel reversed along every spatial dim: conv(flip=true)
    is the true convolution of eq. 9.4, a correlation with the flipped kernel."""
    return w.flip(list(range(2, w.dim())))


def outer_kernel(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A separable kernel [out, in, k_1, ..., k_d]: the outer product over the
    spatial dims of its [out, in, k_d] factors (section 9.8)."""
    letters = "pqr"[:len(factors)]  # o and c name the channels
    spec = ",".join(f"oc{a}" for a in letters) + f"->oc{letters}"
    return torch.einsum(spec, *factors)


def add_bias(y: torch.Tensor, b: torch.Tensor | None, mode: str = "channel") -> torch.Tensor:
    """y [N, out, *o] plus a bias: `channel` b [out], `location` b [out, *o],
    `tiled` b [*t, out] (position p adds b[p mod t], eq. 9.10's sharing)."""
    if b is None or mode == "none":
        return y
    if mode == "channel":
        return y + b.view(1, -1, *([1] * (y.dim() - 2)))
    if mode == "location":
        assert b.shape == y.shape[1:], (b.shape, y.shape)
        return y + b.unsqueeze(0)
    if mode == "tiled":
        rank = y.dim() - 2
        tile_of = torch.meshgrid(
            *(torch.arange(o) % t for o, t in zip(y.shape[2:], b.shape[:rank])), indexing="ij")
        return y + b[tile_of].movedim(-1, 0).unsqueeze(0)  # b[tile_of]: [*o, out]
    raise ValueError(mode)


# -- convolution (eq. 9.4-9.8) -----------------------------------------------------------------

def conv_by_torch(x, w, b=None, *, stride=1, pad="valid", dilation=1, groups=1,
                  bias="channel") -> torch.Tensor:
    """F.conv{1,2,3}d on an explicitly zero-padded input, so every padding form
    of the language (asymmetric pairs, TF same) is allowed; w [out, in/groups, *k]."""
    rank = x.dim() - 2
    stride, dilation = per_dim(stride, rank), per_dim(dilation, rank)
    pairs = resolve_pads(pad, tuple(x.shape[2:]), tuple(w.shape[2:]), stride, dilation)
    y = CONV[rank](pad_nd(x, pairs), w, None, stride=stride, dilation=dilation, groups=groups)
    return add_bias(y, b, bias)


def windowed_sum_loop(xpad: torch.Tensor, out_sizes, kernel, stride, dilation,
                      contrib: Callable) -> torch.Tensor:
    """Direct loop over the book's windowed sum (eq. 9.7/9.8 and relatives):

        Z[:, :, p] = Σ_q contrib(p, q, V[:, :, p·s + q·r])

    where contrib maps the [N, C] input slice at kernel offset q for output
    position p to the [N, out] contribution."""
    n = xpad.shape[0]
    cols = []
    for p in itertools.product(*(range(o) for o in out_sizes)):
        acc = None
        for q in itertools.product(*(range(k) for k in kernel)):
            idx = tuple(pi * s + qi * r for pi, qi, s, r in zip(p, q, stride, dilation))
            term = contrib(p, q, xpad[(slice(None), slice(None)) + idx])
            acc = term if acc is None else acc + term
        cols.append(acc)
    y = torch.stack(cols, dim=-1)
    return y.reshape(n, y.shape[1], *out_sizes)


def conv_table_loop(x, w, table, b=None, *, stride=1, pad="valid", dilation=1,
                    bias="channel") -> torch.Tensor:
    """Eq. 9.7 restricted to a connection table, as a loop: output i sums only
    the input channels its row lists, Z[i, p] = Σ_{l ∈ T[i]} Σ_q V[l, p·s + q·r] K[i, l, q].
    The entries of w outside the table are replaced by zeros before the sum
    (not multiplied by 0: an inf or NaN there must not leak either)."""
    rank = x.dim() - 2
    kernel = tuple(w.shape[2:])
    stride, dilation = per_dim(stride, rank), per_dim(dilation, rank)
    xp = pad_nd(x, resolve_pads(pad, tuple(x.shape[2:]), kernel, stride, dilation))
    outs = [out_size(m, k, s, 0, 0, r)
            for m, k, s, r in zip(xp.shape[2:], kernel, stride, dilation)]
    connected = torch.zeros(w.shape[:2], dtype=torch.bool)
    for i, row in enumerate(table):
        connected[i, list(row)] = True
    w = torch.where(connected.view(connected.shape + (1,) * rank), w, w.new_zeros(()))

    def contrib(p, q, xs):  # xs [N, C] -> [N, out]
        return xs @ w[(slice(None), slice(None)) + q].T

    return add_bias(windowed_sum_loop(xp, outs, kernel, stride, dilation, contrib), b, bias)


def true_convolution_full(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Eq. 9.4 summed over input channels, literally:
    S[n, o, i] = Σ_c Σ_m I[n, c, m] · K[o, c, i − m], for every i where some
    term exists (the 'full' convolution, size m + k − 1 per dim)."""
    m_sizes, k_sizes = x.shape[2:], w.shape[2:]
    out_sizes = [m + k - 1 for m, k in zip(m_sizes, k_sizes)]
    n, out = x.shape[0], w.shape[0]
    cols = []
    for i in itertools.product(*(range(o) for o in out_sizes)):
        acc = x.new_zeros(n, out)
        for m in itertools.product(*(range(s) for s in m_sizes)):
            kk = tuple(a - b for a, b in zip(i, m))
            if all(0 <= v < k for v, k in zip(kk, k_sizes)):
                # [N, C] @ [C, out]
                acc = acc + x[(slice(None), slice(None)) + m] @ w[(slice(None), slice(None)) + kk].T
        cols.append(acc)
    return torch.stack(cols, -1).reshape(n, out, *out_sizes)


# -- unshared convolution: local (eq. 9.9) and tiled (eq. 9.10) --------------------------------

def local_loop(x, w, b=None, *, stride=1, pad="valid", bias="location") -> torch.Tensor:
    """Z[n, i, p] = Σ_{l, q} V[n, l, p·s + q] · W[i, p, l, q]   (eq. 9.9, 0-based):
    every output position p its own kernel; w [out, *o, in, *k]."""
    rank = x.dim() - 2
    out_sizes, kernel = tuple(w.shape[1:1 + rank]), tuple(w.shape[2 + rank:])
    stride = per_dim(stride, rank)
    xp = pad_nd(x, resolve_pads(pad, tuple(x.shape[2:]), kernel, stride))

    def contrib(p, q, xs):
        return xs @ w[(slice(None),) + p + (slice(None),) + q].T  # [N, in] @ [in, out]

    y = windowed_sum_loop(xp, out_sizes, kernel, stride, (1,) * rank, contrib)
    return add_bias(y, b, bias)


def tiled_loop(x, w, b=None, *, stride=1, pad="valid", bias="tiled") -> torch.Tensor:
    """Z[n, i, p] = Σ_{l, q} V[n, l, p·s + q] · K[p mod t, i, l, q]   (eq. 9.10, 0-based):
    t kernel stacks in rotation; w [*t, out, in, *k]."""
    rank = x.dim() - 2
    tiles, kernel = tuple(w.shape[:rank]), tuple(w.shape[rank + 2:])
    stride = per_dim(stride, rank)
    xp = pad_nd(x, resolve_pads(pad, tuple(x.shape[2:]), kernel, stride))
    out_sizes = [out_size(m, k, s, 0, 0) for m, k, s in zip(xp.shape[2:], kernel, stride)]

    def contrib(p, q, xs):
        tile = tuple(pi % ti for pi, ti in zip(p, tiles))
        return xs @ w[tile + (slice(None), slice(None)) + q].T

    y = windowed_sum_loop(xp, out_sizes, kernel, stride, (1,) * rank, contrib)
    return add_bias(y, b, bias)


def patches_loop(x, kernel, stride, pads, dilation, fill: float) -> torch.Tensor:
    """[N, C, *o, *k]: the input under each output's window (tap q of output p
    reads V[p·s + q·r − before]), `fill` where that falls in the padding."""
    rank = x.dim() - 2
    xp = pad_nd(x, pads, value=fill)
    outs = [out_size(m, k, s, b, a, r)
            for m, k, s, (b, a), r in zip(x.shape[2:], kernel, stride, pads, dilation)]
    out = x.new_empty(*x.shape[:2], *outs, *kernel)
    for p in itertools.product(*map(range, outs)):
        for q in itertools.product(*map(range, kernel)):
            idx = tuple(p[i] * stride[i] + q[i] * dilation[i] for i in range(rank))
            out[(slice(None), slice(None)) + p + q] = xp[(slice(None), slice(None)) + idx]
    return out


# -- transpose convolution (eq. 9.12-9.14) -----------------------------------------------------

def deconv_by_transpose(x, w, b=None, *, stride=1, pad="valid", dilation=1, size=None,
                        bias="channel") -> torch.Tensor:
    """F.conv_transpose{1,2,3}d (the full transposed output, (m−1)·s + k' per dim),
    cropped from each dim's start and zero-extended past its end to the
    language's output size; w [in, out, *k].

    pad=same follows TensorFlow's transpose rule: natural size m·s, and the crop
    before is half the excess, smaller half first. Other pads crop (before,
    after); `size` overrides the natural size either way."""
    rank = x.dim() - 2
    kernel = tuple(w.shape[2:])
    stride, dilation = per_dim(stride, rank), per_dim(dilation, rank)
    full = CONV_T[rank](x, w, None, stride=stride, dilation=dilation)
    spatial, full_sizes = tuple(x.shape[2:]), tuple(full.shape[2:])
    if pad == "same":
        natural = tuple(m * s for m, s in zip(spatial, stride))
        sizes = natural if size is None else per_dim(size, rank)
        starts = [max(f - sz, 0) // 2 for f, sz in zip(full_sizes, sizes)]
    else:
        pairs = resolve_pads(pad, spatial, kernel, stride, dilation)
        natural = tuple(f - before - after for f, (before, after) in zip(full_sizes, pairs))
        sizes = natural if size is None else per_dim(size, rank)
        starts = [before for before, _ in pairs]
    y = full
    for axis, (start, want) in enumerate(zip(starts, sizes)):
        dim = 2 + axis
        missing = start + want - y.shape[dim]
        if missing > 0:  # past the last tap: only the bias reaches there
            y = torch.cat([y, y.new_zeros(*y.shape[:dim], missing, *y.shape[dim + 1:])], dim)
        y = y.narrow(dim, start, want)
    return add_bias(y, b, bias)


def deconv_by_adjoint(x, w, *, stride, before, size, dilation=None, groups=1) -> torch.Tensor:
    """Transpose convolution as the adjoint of a convolution (eq. 9.12–9.14):
    the gradient, w.r.t. a zero input z of spatial size `size`, of
    conv(pad(z, before, ·), w) contracted with x.  The `after` padding (or crop)
    is chosen so the conv output has exactly x's spatial size.  Differentiable in
    x and w (create_graph)."""
    rank = x.dim() - 2
    dilation = dilation or (1,) * rank
    n = x.shape[0]
    cout = w.shape[1] * groups
    z = torch.zeros((n, cout) + tuple(size), dtype=x.dtype, requires_grad=True)
    pairs = []
    for m, k, s, b, sz, r in zip(x.shape[2:], w.shape[2:], stride, before, size, dilation):
        after = (m - 1) * s + keff(k, r) - sz - b
        pairs.append((b, after))
    y = CONV[rank](pad_nd(z, pairs), w, None, stride=stride, dilation=dilation, groups=groups)
    assert y.shape == x.shape, (y.shape, x.shape)
    (grad,) = torch.autograd.grad(y, z, grad_outputs=x, create_graph=True)
    return grad


# -- pooling (section 9.3) ---------------------------------------------------------------------

def window_cells(sizes, window, stride=None, pad=None) -> list[list[tuple[int, int]]]:
    """Per spatial dim, the (start, length) of each output's window (start < 0:
    padding); the stride defaults to the window."""
    rank = len(sizes)
    window = per_dim(window, rank)
    stride = window if stride is None else per_dim(stride, rank)
    pairs = resolve_pads(pad, sizes, window, stride)
    return [[(r * s - before, k) for r in range(out_size(m, k, s, before, after))]
            for m, k, s, (before, after) in zip(sizes, window, stride, pairs)]


def adaptive_cells(sizes, output) -> list[list[tuple[int, int]]]:
    """Adaptive pooling's cells: cell i of a dim covers [floor(i·m/a), ceil((i+1)·m/a))."""
    return [[(i * m // a, -(-(i + 1) * m // a) - i * m // a) for i in range(a)]
            for m, a in zip(sizes, per_dim(output, len(sizes)))]


def pool_loop(x: torch.Tensor, kind: str, cells, p: float = 2.0, sigma: float = 1.0):
    """Pool x [N, C, *m] over the windows `cells` (window_cells, adaptive_cells)
    by the definitions of LANGUAGE.md §6; padding never counts.

    maxpool: the largest value (NaN if any is NaN; the gradient goes to the first
    maximal input, as torch.max's); avgpool: the mean; lppool: (Σ|v|^p)^(1/p),
    0 with gradient 0 for an all-zero window; wavgpool: weights
    exp(−d²/2σ²) by the distance d of each tap from the window's centre,
    normalised over the real taps."""
    sizes = tuple(x.shape[2:])
    outs = []
    for pos in itertools.product(*(range(len(c)) for c in cells)):
        box = [cells[i][j] for i, j in enumerate(pos)]
        values, dist2 = [], []
        for off in itertools.product(*(range(length) for _, length in box)):
            idx = tuple(start + q for (start, _), q in zip(box, off))
            if all(0 <= j < m for j, m in zip(idx, sizes)):
                values.append(x[(slice(None), slice(None)) + idx])
                dist2.append(sum((q - (length - 1) / 2) ** 2 for q, (_, length) in zip(off, box)))
        assert values, "a window of padding alone"
        v = torch.stack(values, -1)
        if kind == "maxpool":
            r = v.max(-1).values
        elif kind == "avgpool":
            r = v.mean(-1)
        elif kind == "lppool":
            total = v.abs().pow(p).sum(-1)
            nonzero = total > 0  # the inner where keeps the root's gradient finite at 0
            r = torch.where(nonzero, torch.where(nonzero, total, 1.0).pow(1.0 / p), 0.0)
        elif kind == "wavgpool":
            # shifted by the nearest real tap: the same after normalising, and a
            # tiny sigma cannot underflow every weight of a padded window to 0
            d2 = torch.tensor(dist2, dtype=x.dtype)
            w = torch.exp(-(d2 - d2.min()) / (2 * sigma**2))
            r = (v * w).sum(-1) / w.sum()
        else:
            raise ValueError(kind)
        outs.append(r)
    return torch.stack(outs, -1).reshape(*x.shape[:2], *(len(c) for c in cells))


def maxout_loop(x: torch.Tensor, pieces: int) -> torch.Tensor:
    """Maxout (cross-channel pooling, figure 9.9): output channel g is the max of
    input channels g·k .. g·k + k − 1, taken pairwise in order, so a NaN wins
    and ties (and the gradient) go to the first maximal channel."""
    groups = []
    for g in range(x.shape[1] // pieces):
        run = x[:, g * pieces]
        for j in range(1, pieces):
            nxt = x[:, g * pieces + j]
            run = torch.where(run.isnan() | (run >= nxt), run, nxt)
        groups.append(run)
    return torch.stack(groups, 1)


__all__ = [
    "CONV", "CONV_T", "adaptive_cells", "add_bias", "conv_by_torch", "conv_table_loop",
    "deconv_by_adjoint", "deconv_by_transpose", "flip_kernel", "keff", "local_loop",
    "maxout_loop", "out_size", "outer_kernel", "pad_nd", "patches_loop", "per_dim", "pool_loop",
    "resolve_pads", "tf_same_pads", "tiled_loop", "true_convolution_full", "window_cells",
    "windowed_sum_loop",
]
