"""The op table: every op of the language, defined once (see base.OpDef)."""
from . import conv, elementwise, pool, structure  # noqa: F401  (each module registers its ops)
from . import grads, vjp  # noqa: F401  (backward ops and VJP rules, after the forward ops)
from . import fused  # noqa: F401  (several ops as one node, made by the fusion passes)
from .base import LAYER_ARGS, OPS, Arg, OpDef, ParamShape, ShapeContext

__all__ = ["LAYER_ARGS", "OPS", "Arg", "OpDef", "ParamShape", "ShapeContext"]
