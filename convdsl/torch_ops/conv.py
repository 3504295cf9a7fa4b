"""Convolution, transpose convolution, dense and bias in PyTorch ops.

Pads are (before, after) per spatial dim and may be asymmetric (TensorFlow's
`same`), so padding is applied with F.pad and the convolution itself is valid.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def pad_spatial(x: Tensor, pads: Sequence[Sequence[int]], value: float = 0.0) -> Tensor:
    flat = [int(v) for pair in reversed(pads) for v in pair]  # F.pad lists the last dim first
    if not any(flat):
        return x
    return F.pad(x, flat, value=value)


@functools.lru_cache(maxsize=64)
def _table_mask_cpu(table: tuple[tuple[int, ...], ...], in_channels: int) -> Tensor:
    mask = torch.zeros(len(table), in_channels)
    for out, row in enumerate(table):
        mask[out, list(row)] = 1.0
    return mask


def table_mask(table, in_channels: int, rank: int, like: Tensor) -> Tensor:
    """[out, in, 1, ...] with ones on the table's connections."""
    mask = _table_mask_cpu(table, in_channels).to(device=like.device, dtype=like.dtype)
    return mask.reshape(mask.shape + (1,) * rank)


def separable_kernel(factors: Sequence[Tensor]) -> Tensor:
    """Outer product of one [out, in, k_d] factor per spatial dim → [out, in, k_1, ..., k_d]."""
    kernel = factors[0]
    for factor in factors[1:]:
        kernel = kernel.unsqueeze(-1) * factor.reshape(factor.shape[:2] + (1,) * (kernel.dim() - 2)
                                                       + factor.shape[2:])
    return kernel


def conv_kernel(params: dict, attrs: dict, rank: int) -> Tensor:
    """The dense kernel a conv applies: factors multiplied out, table masked, flipped."""
    if attrs.get("separable"):
        weight = separable_kernel([params[f"weight_{d}"] for d in range(rank)])
    else:
        weight = params["weight"]
    if attrs.get("table") is not None:
        weight = weight * table_mask(attrs["table"], weight.shape[1], rank, weight)
    if attrs.get("flip"):
        weight = weight.flip(list(range(2, 2 + rank)))
    return weight


def add_bias(y: Tensor, bias: Tensor | None, mode: str) -> Tensor:
    """channel: [out]; location: [out, *o]; tiled: [*t, out], cycled over positions."""
    if bias is None or mode == "none":
        return y
    bias = bias.to(y.dtype)
    rank = y.dim() - 2
    if mode == "channel":
        return y + bias.reshape((1, -1) + (1,) * rank)
    if mode == "location":
        return y + bias.unsqueeze(0)
    if mode == "tiled":
        tiles = bias.shape[:rank]
        index = [torch.arange(o, device=y.device) % t for o, t in zip(y.shape[2:], tiles)]
        grid = torch.meshgrid(*index, indexing="ij")
        full = bias[grid]  # [*o, out]
        return y + full.movedim(-1, 0).unsqueeze(0)
    raise ValueError(f"unknown bias mode {mode}")


def conv(x: Tensor, params: dict, attrs: dict) -> Tensor:
    rank = x.dim() - 2
    weight = conv_kernel(params, attrs, rank).to(x.dtype)
    y = _CONV[rank](pad_spatial(x, attrs["pads"]), weight, None, attrs["stride"], 0,
                    attrs["dilation"], attrs["groups"])
    return add_bias(y, params.get("bias"), attrs["bias"])


def deconv(x: Tensor, params: dict, attrs: dict) -> Tensor:
    """Transpose convolution: the full transposed output, then cropped (or
    zero-extended) to `before` .. `before + size` in every dim."""
    rank = x.dim() - 2
    weight = params["weight"].to(x.dtype)
    full = _CONV_T[rank](x, weight, None, attrs["stride"], 0, 0, 1, attrs["dilation"])
    for axis, (before, size) in enumerate(zip(attrs["starts"], attrs["size"])):
        dim = axis + 2
        have = full.shape[dim] - before
        if have < size:  # positions past the last kernel tap receive only the bias
            extra = [0, 0] * (rank - 1 - axis) + [0, size - have]
            full = F.pad(full, extra)
        full = full.narrow(dim, before, size)
    return add_bias(full, params.get("bias"), attrs["bias"])


def dense(x: Tensor, params: dict, attrs: dict) -> Tensor:
    bias = params.get("bias")
    return F.linear(x, params["weight"].to(x.dtype), None if bias is None else bias.to(x.dtype))
