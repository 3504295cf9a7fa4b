"""separable-rank1: a frozen conv kernel that is numerically rank-1 — a
Gaussian blur, a Sobel or box filter — is computed as d fused 1-D passes.

A 2-D kernel K[o, i] of size kh×kw costs kh·kw multiply-adds per output; if
K[o, i] = a ⊗ b (rank 1), the separable kernel costs kh + kw. The pass can
only know the values of a kernel that is frozen (`trainable=false`) and whose
initializer is deterministic (gaussian, edges, gabor, zeros); it computes
those values, checks every (o, i) slice, and marks the node
`rank1_separable=true`. The parameter stays the full kernel (the state_dict
does not change); the kernel family factors it when it runs, and falls back
to the dense computation if loaded weights are not rank-1 any more.
"""
from __future__ import annotations

import torch

from ..ir import Graph
from ..ops.inits import initialize

# Initializers whose values the compiler can know: no random numbers.
DETERMINISTIC = ("gaussian", "edges", "gabor", "zeros")
# A slice is rank-1 when its second singular value is this small next to the first.
RANK1_TOLERANCE = 1e-5


def is_rank1(weight: torch.Tensor, tolerance: float = RANK1_TOLERANCE) -> bool:
    """Whether every [o, i] slice of an [O, I, k1, ..., kd] kernel (d >= 2) is
    an outer product of d vectors, within `tolerance` (relative)."""
    if weight.dim() < 4:
        return False  # 1-D kernels are trivially "separable": nothing to gain
    w = weight.detach().double().flatten(0, 1)  # [O·I, k1, ..., kd]
    for axis in range(1, w.dim()):
        # Rank 1 in every unfolding (mode-axis matricization) ⇔ a rank-1 tensor.
        unfolded = w.movedim(axis, 1).flatten(2)  # [O·I, k_axis, rest]
        s = torch.linalg.svdvals(unfolded)
        if s.shape[-1] > 1 and bool((s[:, 1] > tolerance * s[:, 0].clamp_min(1e-30)).any()):
            return False
    return True


def rank1_factors(weight: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """Factors [O, I, k_d] per spatial axis with ⊗ equal to `weight`, and the
    relative error of that reconstruction (large when the kernel is not rank-1)."""
    w = weight.detach().double()
    out, cin, sizes = w.shape[0], w.shape[1], w.shape[2:]
    rest = w.reshape(out * cin, -1)
    factors = []
    for axis, k in enumerate(sizes[:-1]):
        matrix = rest.reshape(out * cin, k, -1)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        factors.append(u[:, :, 0] * s[:, :1].sqrt())
        rest = vh[:, 0, :] * s[:, :1].sqrt()
    factors.append(rest)
    rebuilt = factors[0]
    for f in factors[1:]:
        rebuilt = (rebuilt.unsqueeze(-1) * f.reshape(f.shape[0], *([1] * (rebuilt.dim() - 1)),
                                                        -1)).flatten(1)
    flat = w.reshape(out * cin, -1)
    error = float((rebuilt - flat).norm() / flat.norm().clamp_min(1e-30))
    return [f.reshape(out, cin, -1).to(weight.dtype) for f in factors], error


def rewrite_rank1(graph: Graph) -> bool:
    changed = False
    for node in graph.nodes():
        if node.op != "conv" or node.attrs["separable"] or "weight" not in node.params:
            continue
        decl = graph.params[node.params["weight"]]
        if decl.trainable or decl.init[0] not in DETERMINISTIC or len(decl.shape) < 4:
            continue
        if is_rank1(initialize(decl)):
            node.attrs["rank1_separable"] = True
            node.origin = ", ".join(filter(None, (node.origin, "separable-rank1")))
            changed = True
    return changed
