"""The kernel families, by the name the op table gives (OpDef.triton)."""
from __future__ import annotations

import importlib

from .base import Family, KernelPlan

# family name → "module:Class" (imported on first use)
_REGISTRY = {
    "elementwise": "elementwise:Elementwise",
    "view": "view:View",
    "reference": "reference:Reference",
    "conv": "conv:Conv",
    "dense": "dense:Dense",
    "depthwise": "depthwise:Depthwise",
    "separable": "separable:Separable",
    "local": "local:Local",
    "tiled": "local:Tiled",
    "deconv": "deconv:Deconv",
    "pool": "pool:Pool",
    "conv_pool": "conv_pool:ConvPool",
    "dwpw": "dwpw:DepthwisePointwise",
    "separable_rank1": "rank1:SeparableRank1",
    "maxout": "pool:Maxout",
    "softmax": "softmax:Softmax",
    "concat": "concat:Concat",
    # gradients (ops/grads.py); until a module exists its ops run as "reference"
    "conv_dx": "conv_grad:ConvDx",
    "conv_dw": "conv_grad:ConvDw",
    "bias_grad": "conv_grad:BiasGrad",
    "dense_dx": "dense_grad:DenseDx",
    "dense_dw": "dense_grad:DenseDw",
    "deconv_dx": "deconv_grad:DeconvDx",
    "deconv_dw": "deconv_grad:DeconvDw",
    "local_dx": "local_grad:LocalDx",
    "local_dw": "local_grad:LocalDw",
    "pool_dx": "pool_grad:PoolDx",
    "maxout_dx": "pool_grad:MaxoutDx",
    "softmax_dx": "softmax_grad:SoftmaxDx",
}

_LOADED: dict[str, Family] = {}


def family(name: str) -> Family:
    if name not in _LOADED:
        if name not in _REGISTRY:
            raise KeyError(name)
        module_name, cls = _REGISTRY[name].split(":")
        module = importlib.import_module(f"{__name__}.{module_name}")
        _LOADED[name] = getattr(module, cls)()
    return _LOADED[name]


def known() -> list[str]:
    return sorted(_REGISTRY)


__all__ = ["Family", "KernelPlan", "family", "known"]
