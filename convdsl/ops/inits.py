"""The initializers a program may name with `init=` (LANGUAGE.md §7): their
arguments, where they apply, and how a parameter tensor is filled."""
from __future__ import annotations

import math

import torch

from .. import initializers as I

REQUIRED = object()

# name → ((argument, default), ...)
INITS: dict[str, tuple[tuple[str, object], ...]] = {
    "he": (),
    "xavier": (),
    "zeros": (),
    "normal": (("std", REQUIRED), ("mean", 0.0)),
    "uniform": (("a", REQUIRED), ("b", REQUIRED)),
    "gaussian": (("sigma", 1.0),),
    "edges": (),
    "gabor": (("orientations", 4), ("frequencies", None), ("phases", None)),
    "kmeans": (),
}

# Hand-designed kernels need an [out, in, k...] conv kernel to draw on.
KERNEL_INITS = ("gaussian", "edges", "gabor", "kmeans")

DEFAULT_INIT = {"dense": ("xavier", {})}  # every other parametric op: he


def default_init(op: str) -> tuple[str, dict]:
    return DEFAULT_INIT.get(op, ("he", {}))


def initialize(decl, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh float32 tensor for one ParamDecl."""
    name, args = decl.init
    shape = tuple(decl.shape)
    if name == "zeros":
        value = I.zeros(shape)
    elif name in ("he", "kmeans"):  # kmeans starts from he until fit_features fills it
        value = _he(decl, shape, generator)
    elif name == "xavier":
        value = I.xavier(shape, decl.fan_in, decl.fan_out, generator=generator)
    elif name == "normal":
        value = I.normal(shape, args["std"], mean=args["mean"], generator=generator)
    elif name == "uniform":
        value = I.uniform(shape, args["a"], args["b"], generator=generator)
    elif name == "gaussian":
        if decl.role.startswith("weight_"):
            axis = int(decl.role.split("_")[1])
            value = _gaussian_factor(decl, shape, args["sigma"], axis)
        else:
            value = I.gaussian(shape, args["sigma"])
    elif name == "edges":
        value = I.edges(shape)
    elif name == "gabor":
        value = I.gabor(shape, args["orientations"], args["frequencies"], args["phases"])
    else:  # the builder only lets known names through
        raise ValueError(f"unknown initializer {name}")
    if decl.mask is not None:
        value = value * _mask_like(decl.mask, value)
    return value.float()


def _he(decl, shape, generator):
    rank = decl.role.startswith("weight_") and decl.separable_rank or 0
    if not rank:
        return I.he(shape, decl.fan_in, generator=generator)
    # A separable kernel is a product of `rank` factors: give each factor the
    # rank-th root of he's standard deviation so the product has he's.
    std = math.sqrt(2.0 / decl.fan_in) ** (1.0 / rank)
    return I.normal(shape, std, generator=generator)


def _gaussian_factor(decl, shape, sigma, axis):
    full_shapes = [shape[:2] + (k,) for k in decl.separable_sizes]
    return I.gaussian_factors(full_shapes, sigma)[axis]


def _mask_like(table, value):
    mask = torch.zeros(value.shape[:2])
    for out, row in enumerate(table):
        mask[out, list(row)] = 1.0
    return mask.reshape(mask.shape + (1,) * (value.dim() - 2))
