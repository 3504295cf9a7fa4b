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
    "maxout": "pool:Maxout",
    "softmax": "softmax:Softmax",
    "concat": "concat:Concat",
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
