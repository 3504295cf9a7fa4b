"""Spatial helpers shared by the conv-variant kernel families (depthwise,
separable, local, tiled, deconv and the gradients): every kernel of these
families is written for three spatial dims, and 1-D and 2-D tensors are passed
with unit leading dims (size 1, stride 0), so one template serves every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...ir.types import evaluate
from ...ops.spatial import resolve_pads
from .base import POINTER, target  # noqa: F401  (target: the families import it from here)


def pad3(values, fill: int) -> tuple[int, ...]:
    """A per-spatial-dim tuple (1 to 3 entries) as exactly three, unit dims first."""
    values = tuple(int(v) for v in values)
    return (fill,) * (3 - len(values)) + values


def spatial3(t: torch.Tensor) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """(D, H, W) sizes and the five strides (n, c, d, h, w) of an [N, C, *s] tensor."""
    rank = t.dim() - 2
    sizes = pad3(t.shape[2:], 1)
    strides = tuple(t.stride()[:2]) + pad3(t.stride()[2:], 0)
    assert 1 <= rank <= 3
    return sizes, strides


def window_sizes(sizes, kernel, stride, dilation, pads) -> tuple[int, ...]:
    """Output sizes of a windowed op: floor((m + before + after − k')/s) + 1."""
    return tuple((m + b + a - (r * (k - 1) + 1)) // s + 1
                 for m, k, s, r, (b, a) in zip(sizes, kernel, stride, dilation, pads))


def concrete_pads(attrs: dict, sizes, dilation=None) -> tuple[tuple[int, int], ...]:
    """(before, after) per dim at run time: valid/same/full resolved on real sizes."""
    pads = resolve_pads(attrs["pad"], tuple(sizes), attrs["kernel"], attrs["stride"], dilation)
    return tuple((int(b), int(a)) for b, a in pads)


def pow2(n: int) -> int:
    """The next power of two >= n (at least 1); triton.next_power_of_2 without
    its constexpr wrapper, which costs microseconds a call at every launch."""
    return 1 << max(int(n) - 1, 0).bit_length()


def clamp_block(config: tuple, rows: int, cols: int, reduction: int) -> tuple:
    """A GEMM tile (BLOCK_M, BLOCK_N, BLOCK_K, *rest) shrunk to the problem's
    powers of two, but never below 16 (tl.dot's smallest operand)."""
    bm, bn, bk, *rest = config
    return (max(16, min(bm, pow2(rows))), max(16, min(bn, pow2(cols))),
            max(16, min(bk, pow2(reduction))), *rest)


def block_candidates(configs, rows: int, cols: int, reduction: int) -> list[tuple]:
    """Each config clamped to the problem, repeats dropped, in order: the
    first is the default, the rest what the autotuner may time on a GPU."""
    found: list[tuple] = []
    for config in configs:
        block = clamp_block(config, rows, cols, reduction)
        if block not in found:
            found.append(block)
    return found


def numel(ttype, env) -> int:
    return math.prod(evaluate(d, env) for d in ttype.shape)


def param_numel(graph, node, role: str) -> int:
    name = node.params.get(role)
    return math.prod(graph.params[name].shape) if name is not None else 0


def dot_options(device: str, dtype: torch.dtype) -> dict:
    """How a kernel's tl.dot multiplies. fp32 operands: TF32 on a GPU when
    PyTorch's convolutions may use it (cudnn.allow_tf32), else exact. 16-bit
    operands run in fp32 under the interpreter, whose bf16 tl.dot is unreliable
    (exact: the products of 16-bit values fit fp32, and the sum is fp32 anyway)."""
    tf32 = device != "cpu" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return {"INPUT_PRECISION": "tf32" if tf32 else "ieee",
            "DOT_FP32": device == "cpu" and dtype != torch.float32}


TORCH_DTYPE = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Arguments:
    """A kernel's run-time arguments in order, each with its AOT type, and its
    constexprs. `launch` and `aot` fill the same list, so they cannot drift."""

    runtime: tuple[tuple[str, str], ...]  # (name, "ptr:x" | "ptr:fp32" | "ptr:y" | "ptr:i32" | "i32")

    def values(self, given: dict) -> list:
        assert set(given) == {n for n, _ in self.runtime}, sorted(set(given) ^ {n for n, _ in self.runtime})
        return [given[n] for n, _ in self.runtime]

    def signature(self, dtype: str, constexprs: dict) -> dict:
        kinds = {"ptr:x": POINTER[dtype], "ptr:y": POINTER[dtype], "ptr:fp32": "*fp32",
                 "ptr:i32": "*i32", "i32": "i32"}
        signature = {n: kinds[k] for n, k in self.runtime}
        signature.update({n: "constexpr" for n in constexprs})
        return signature


STRIDES_X = ("stride_xn", "stride_xc", "stride_xd", "stride_xh", "stride_xw")
STRIDES_Y = ("stride_yn", "stride_yc", "stride_yd", "stride_yh", "stride_yw")


def ints(*names) -> tuple[tuple[str, str], ...]:
    return tuple((n, "i32") for n in names)


def bias_args(mode: str) -> tuple[tuple[str, str], ...]:
    return (("bias_ptr", "ptr:fp32"),) if mode != "none" else ()


def bias_value(params: dict, mode: str) -> dict:
    return {"bias_ptr": params["bias"].contiguous()} if mode != "none" else {}


def the_node(graph, plan):
    (node_id,) = plan.nodes
    return graph.node(node_id)


# -- depthwise ------------------------------------------------------------------------------
