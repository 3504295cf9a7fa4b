"""Locally connected and tiled convolutions in pure PyTorch.

All functions take ``x`` shaped ``[N, C, *spatial]`` with ``d = x.dim() - 2``
spatial dims (1, 2 or 3).  Spatial arguments (``kernel``, ``stride``,
``dilation``) are length-``d`` tuples of ints and ``pads`` is a sequence of
``d`` ``(before, after)`` pairs.  Everything is built from ``F.pad``,
``Tensor.unfold`` and ``einsum`` so ordinary autograd differentiates it.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["extract_patches", "local_conv", "tiled_conv", "output_size"]

# Index letters for generated einsum equations (d <= 3).
_OUT_LETTERS = "xyz"
_KER_LETTERS = "uvw"


def _spatial_dims(x: Tensor) -> int:
    d = x.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(f"expected input of shape [N, C, *spatial] with 1-3 spatial dims, got {tuple(x.shape)}")
    return d


def _check_len(name: str, value: Sequence, d: int) -> None:
    if len(value) != d:
        raise ValueError(f"{name} must have {d} entries (one per spatial dim), got {tuple(value)}")


def output_size(size: int, kernel: int, stride: int, before: int, after: int, dilation: int = 1) -> int:
    """Number of window positions along one dim: floor((m + b + a - k_eff) / s) + 1."""
    k_eff = dilation * (kernel - 1) + 1
    span = size + before + after - k_eff
    if span < 0:
        raise ValueError(f"window of extent {k_eff} does not fit padded size {size + before + after}")
    return span // stride + 1


def _pad_spatial(x: Tensor, pads: Sequence[Sequence[int]], fill: float) -> Tensor:
    # F.pad wants the last dim's pair first, flattened.
    flat = [int(v) for pair in reversed(pads) for v in pair]
    if not any(flat):
        return x
    return F.pad(x, flat, mode="constant", value=fill)


def extract_patches(
    x: Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    pads: Sequence[Sequence[int]],
    dilation: Sequence[int] | None = None,
    fill: float = 0.0,
) -> Tensor:
    """Sliding-window patches of ``x`` after padding with ``fill``.

    Args:
        x: ``[N, C, *m]``.
        kernel, stride, dilation: length-``d`` tuples (dilation defaults to 1s).
        pads: ``d`` pairs ``(before, after)``.
        fill: value used for the padding.

    Returns:
        ``[N, C, *o, *k]`` where ``o[i] = floor((m[i] + before + after - k_eff) / s) + 1``
        and ``k_eff = dilation * (k - 1) + 1``; entry ``[n, c, *p, *q]`` is the
        padded input at ``p * s + q * dilation``.
    """
    d = _spatial_dims(x)
    dilation = tuple(dilation) if dilation is not None else (1,) * d
    for name, value in (("kernel", kernel), ("stride", stride), ("pads", pads), ("dilation", dilation)):
        _check_len(name, value, d)
    if min((*kernel, *stride, *dilation)) < 1 or min(v for pair in pads for v in pair) < 0:
        raise ValueError(f"kernel/stride/dilation must be >= 1 and pads >= 0, got {kernel}, {stride}, {dilation}, {pads}")
    for i in range(d):
        output_size(x.shape[2 + i], kernel[i], stride[i], *pads[i], dilation=dilation[i])

    patches = _pad_spatial(x, pads, fill)
    for i in range(d):
        k_eff = dilation[i] * (kernel[i] - 1) + 1
        # unfold appends the window as a new trailing dim, so after the loop the
        # window dims sit after all output dims in spatial order.
        patches = patches.unfold(2 + i, k_eff, stride[i])
    if any(r != 1 for r in dilation):
        # A dilated window is every r-th element of the contiguous k_eff span.
        patches = patches[(..., *(slice(None, None, r) for r in dilation))]
    return patches


def _out_sizes(patches: Tensor, d: int) -> tuple[int, ...]:
    return tuple(patches.shape[2 : 2 + d])


def local_conv(x: Tensor, weight: Tensor, stride: Sequence[int], pads: Sequence[Sequence[int]]) -> Tensor:
    """Locally connected (unshared) convolution, Deep Learning book eq. 9.9.

    ``Z[n, i, *p] = sum_{c, q} x_pad[n, c, p * s + q] * weight[i, *p, c, *q]``.

    Args:
        x: ``[N, C, *m]``.
        weight: ``[out, *o, C, *k]`` -- one kernel per output position.
        stride: length-``d`` tuple.
        pads: ``d`` pairs ``(before, after)`` of zero padding.

    Returns:
        ``[N, out, *o]``.
    """
    d = _spatial_dims(x)
    if weight.dim() != 2 + 2 * d:
        raise ValueError(f"local_conv weight must be [out, *o, C, *k] ({2 + 2 * d} dims), got {tuple(weight.shape)}")
    kernel = tuple(weight.shape[2 + d :])
    if weight.shape[1 + d] != x.shape[1]:
        raise ValueError(f"weight has {weight.shape[1 + d]} input channels, input has {x.shape[1]}")
    patches = extract_patches(x, kernel, stride, pads)
    o = _out_sizes(patches, d)
    if tuple(weight.shape[1 : 1 + d]) != o:
        raise ValueError(f"weight output dims {tuple(weight.shape[1:1 + d])} != computed output size {o}")
    outs, ks = _OUT_LETTERS[:d], _KER_LETTERS[:d]
    return torch.einsum(f"nc{outs}{ks},i{outs}c{ks}->ni{outs}", patches, weight)


def tiled_conv(x: Tensor, weight: Tensor, stride: Sequence[int], pads: Sequence[Sequence[int]]) -> Tensor:
    """Tiled convolution, Deep Learning book eq. 9.10.

    Output position ``p`` (per dim) uses kernel stack ``p mod t``:
    ``Z[n, i, *p] = sum_{c, q} x_pad[n, c, p * s + q] * weight[*(p % t), i, c, *q]``.

    Args:
        x: ``[N, C, *m]``.
        weight: ``[*t, out, C, *k]`` with ``t`` the tile count per dim.
        stride: length-``d`` tuple.
        pads: ``d`` pairs ``(before, after)`` of zero padding.

    Returns:
        ``[N, out, *o]``; ``o`` need not be a multiple of ``t``.
    """
    d = _spatial_dims(x)
    if weight.dim() != 2 + 2 * d:
        raise ValueError(f"tiled_conv weight must be [*t, out, C, *k] ({2 + 2 * d} dims), got {tuple(weight.shape)}")
    tiles = tuple(weight.shape[:d])
    n_out, c_in = weight.shape[d], weight.shape[d + 1]
    kernel = tuple(weight.shape[d + 2 :])
    if c_in != x.shape[1]:
        raise ValueError(f"weight has {c_in} input channels, input has {x.shape[1]}")
    patches = extract_patches(x, kernel, stride, pads)
    o = _out_sizes(patches, d)
    outs, ks = _OUT_LETTERS[:d], _KER_LETTERS[:d]
    equation = f"nc{outs}{ks},ic{ks}->ni{outs}"

    if math.prod(tiles) == 1:
        return torch.einsum(equation, patches, weight.reshape(weight.shape[d:]))

    # One einsum per tile: positions p ≡ tile (mod t) form a strided sub-grid
    # that all share a kernel, so the only Python loop is over prod(t) tiles.
    # Writing into a fresh buffer is safe for autograd (it never requires grad
    # before the first write).
    out = patches.new_zeros((x.shape[0], n_out, *o))
    for tile in itertools.product(*(range(t) for t in tiles)):
        if any(a >= size for a, size in zip(tile, o)):
            continue
        grid = (slice(None), slice(None), *(slice(a, None, t) for a, t in zip(tile, tiles)))
        out[grid] = torch.einsum(equation, patches[grid], weight[tile])
    return out
