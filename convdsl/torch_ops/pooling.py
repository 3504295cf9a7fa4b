"""Spatial and cross-channel pooling in pure PyTorch.

Inputs are ``[N, C, *spatial]`` with ``d = x.dim() - 2`` in {1, 2, 3}.
Windows run over the zero-padded input but padding never counts:

* ``"max"``  -- max over the real inputs in the window (NaN propagates).
* ``"avg"``  -- mean over the real inputs (``count_include_pad=False``).
* ``"lp"``   -- ``(sum |x|^p)^(1/p)`` over the real inputs.
* ``"wavg"`` -- ``sum(w * x) / sum(w)`` over the real inputs with Gaussian
  weights ``w = exp(-dist^2 / (2 sigma^2))``; ``dist`` is the Euclidean
  distance from the window offset to the window centre ``(len - 1) / 2``.

The avg/lp/wavg weights factor over spatial dims (a Gaussian of a squared
Euclidean distance is a product of per-dim Gaussians, and the set of real
inputs in a window is a box), so those kinds are computed exactly one dim at a
time, each output gathering only its own window; normalising each dim's
weights normalises the product.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .local import extract_patches, output_size

__all__ = ["pool", "adaptive_pool", "maxout", "POOL_KINDS"]

POOL_KINDS = ("max", "avg", "lp", "wavg")

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_ADAPTIVE_MAX = {1: F.adaptive_max_pool1d, 2: F.adaptive_max_pool2d, 3: F.adaptive_max_pool3d}
_ADAPTIVE_AVG = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


def _spatial_dims(x: Tensor) -> int:
    d = x.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(f"expected input of shape [N, C, *spatial] with 1-3 spatial dims, got {tuple(x.shape)}")
    return d


def _check_params(kind: str, p: float, sigma: float) -> None:
    if kind not in POOL_KINDS:
        raise ValueError(f"unknown pooling kind {kind!r}; expected one of {POOL_KINDS}")
    if kind == "lp" and not p > 0:
        raise ValueError(f"lp pooling needs p > 0, got {p}")
    if kind == "wavg" and not sigma > 0:
        raise ValueError(f"wavg pooling needs sigma > 0, got {sigma}")


def _window_weights(kind: str, starts: Tensor, lengths: Tensor, size: int, sigma: float):
    """Per-dim windows as gather indices ``[o, L]`` and weights ``[o, L]``.

    Row ``r`` covers input indices ``[starts[r], starts[r] + lengths[r])``;
    positions outside ``[0, size)`` (padding) get weight 0 and are masked out.
    "lp" weights are 1; "avg"/"wavg" rows are normalised to sum to 1.
    """
    longest = int(lengths.max().item())
    offset = torch.arange(longest, dtype=torch.float64, device=starts.device)[None, :]
    index = starts[:, None] + offset
    inside = (offset < lengths[:, None]) & (index >= 0) & (index < size)
    if kind == "wavg":
        centre = (lengths[:, None] - 1) / 2
        log_w = -((offset - centre) ** 2) / (2.0 * sigma**2)
        log_w = log_w.masked_fill(~inside, float("-inf"))
        # Shift by the row max so tiny sigmas cannot underflow a whole row to 0
        # (the shift cancels in the normalisation).
        weights = (log_w - log_w.amax(dim=1, keepdim=True)).exp()
    else:
        weights = inside.to(torch.float64)
    if kind != "lp":
        weights = weights / weights.sum(dim=1, keepdim=True)
    return index.clamp(0, size - 1).long(), weights, inside


def _apply_per_dim(x: Tensor, windows) -> Tensor:
    """Weighted window sums, one spatial dim at a time (the weights factor).

    Each output reads only its own window's inputs (a gather, not a dense
    matrix), and masked positions are dropped with `where`, so an inf or NaN
    input reaches only the outputs whose windows hold it — and so does its
    gradient."""
    for i, (index, weights, inside) in enumerate(windows):
        moved = x.movedim(2 + i, -1)  # [..., m]
        o, length = index.shape
        gathered = moved[..., index.reshape(-1).to(x.device)].reshape(moved.shape[:-1] + (o, length))
        weights = weights.to(dtype=x.dtype, device=x.device)
        inside = inside.to(x.device)
        terms = torch.where(inside, gathered * weights, torch.zeros((), dtype=x.dtype,
                                                                    device=x.device))
        x = terms.sum(dim=-1).movedim(-1, 2 + i)
    return x


def _reduce_with_matrices(x: Tensor, kind: str, windows, p: float) -> Tensor:
    if kind != "lp":
        return _apply_per_dim(x, windows)
    total = _apply_per_dim(x.abs().pow(p), windows)
    # (Σ|x|^p)^(1/p) has an infinite slope at 0: take the root only where the
    # sum is positive, so an all-zero window has value 0 and gradient 0 (as
    # F.lp_pool2d), instead of NaN.
    positive = total != 0  # NaN stays NaN, as in F.lp_pool2d
    safe = torch.where(positive, total, torch.ones((), dtype=total.dtype, device=total.device))
    return torch.where(positive, safe.pow(1.0 / p), torch.zeros((), dtype=total.dtype,
                                                                  device=total.device))


def pool(
    x: Tensor,
    kind: str,
    window: Sequence[int],
    stride: Sequence[int],
    pads: Sequence[Sequence[int]],
    p: float = 2.0,
    sigma: float = 1.0,
) -> Tensor:
    """Windowed spatial pooling that ignores padding.

    Args:
        x: ``[N, C, *m]``.
        kind: "max", "avg", "lp" or "wavg" (see module docstring).
        window, stride: length-``d`` tuples.
        pads: ``d`` pairs ``(before, after)``; each must be ``< window`` so no
            window is all padding.
        p: exponent for "lp" (> 0).
        sigma: Gaussian width for "wavg" (> 0).

    Returns:
        ``[N, C, *o]`` with ``o = floor((m + before + after - window) / stride) + 1``.
    """
    d = _spatial_dims(x)
    _check_params(kind, p, sigma)
    if len(window) != d or len(stride) != d or len(pads) != d:
        raise ValueError(f"window, stride and pads need {d} entries, got {window}, {stride}, {pads}")
    for k, pair in zip(window, pads):
        if max(pair) >= k:
            raise ValueError(f"pads {tuple(pads)} must be smaller than window {tuple(window)}")

    if kind == "max":
        return _max_pool(x, window, stride, pads)

    matrices = []
    for i in range(d):
        m, (before, after) = x.shape[2 + i], pads[i]
        o = output_size(m, window[i], stride[i], before, after)
        starts = torch.arange(o, dtype=torch.float64, device=x.device) * stride[i] - before
        lengths = torch.full((o,), float(window[i]), dtype=torch.float64, device=x.device)
        matrices.append(_window_weights(kind, starts, lengths, m, sigma))
    return _reduce_with_matrices(x, kind, matrices, p)


def _max_pool(x: Tensor, window, stride, pads) -> Tensor:
    d = x.dim() - 2
    before = [b for b, _ in pads]
    # torch's kernel pads with -inf itself but only supports symmetric pads of
    # at most half the window.
    if all(b == a for b, a in pads) and all(b <= k // 2 for b, k in zip(before, window)):
        return _MAX_POOL[d](x, tuple(window), tuple(stride), tuple(before))
    patches = extract_patches(x, window, stride, pads, fill=float("-inf"))
    return patches.amax(dim=tuple(range(-d, 0)))


def adaptive_pool(x: Tensor, kind: str, output: Sequence[int], p: float = 2.0, sigma: float = 1.0) -> Tensor:
    """Adaptive pooling to a fixed output grid.

    Along a dim of input size ``m`` with ``a`` output cells, cell ``i`` covers
    ``[floor(i * m / a), ceil((i + 1) * m / a))`` (PyTorch's rule); ``a`` may
    exceed ``m``, in which case cells overlap.  For "wavg" each cell's centre
    is ``(len - 1) / 2`` within its own range.

    Args:
        x: ``[N, C, *m]``.
        kind: "max", "avg", "lp" or "wavg".
        output: length-``d`` tuple of output sizes (each >= 1).

    Returns:
        ``[N, C, *output]``.
    """
    d = _spatial_dims(x)
    _check_params(kind, p, sigma)
    output = tuple(int(a) for a in output)
    if len(output) != d or min(output) < 1:
        raise ValueError(f"output must be {d} positive sizes, got {output}")
    if kind == "max":
        return _ADAPTIVE_MAX[d](x, output)
    if kind == "avg":
        return _ADAPTIVE_AVG[d](x, output)

    matrices = []
    for i, a in enumerate(output):
        m = x.shape[2 + i]
        cells = torch.arange(a, device=x.device)
        starts = torch.div(cells * m, a, rounding_mode="floor")
        ends = -torch.div(-(cells + 1) * m, a, rounding_mode="floor")  # ceil division
        matrices.append(_window_weights(kind, starts.double(), (ends - starts).double(), m, sigma))
    return _reduce_with_matrices(x, kind, matrices, p)


def maxout(x: Tensor, pieces: int) -> Tensor:
    """Cross-channel max over runs of ``pieces`` consecutive channels.

    Args:
        x: ``[N, C, *spatial]`` with ``C`` divisible by ``pieces``.

    Returns:
        ``[N, C // pieces, *spatial]``.
    """
    if x.dim() < 2:
        raise ValueError(f"maxout expects [N, C, *spatial], got {tuple(x.shape)}")
    n, c = x.shape[:2]
    if pieces < 1 or c % pieces:
        raise ValueError(f"channel count {c} is not divisible by pieces={pieces}")
    return x.reshape(n, c // pieces, pieces, *x.shape[2:]).amax(dim=2)
