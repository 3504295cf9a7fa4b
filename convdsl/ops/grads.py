"""Backward ops: what the VJP rules (ops/vjp.py) emit into the backward graph.

Each is an op of the one table, with a shape rule and a torch lowering, so a
backward graph verifies, prints and runs like a forward one. The names say
which forward op and which operand a gradient is for: `_conv_dx` is the
book's input gradient h (a transpose convolution, eq. 9.13), `_conv_dw` its
kernel gradient g (eq. 9.11).

Torch lowerings: elementwise rules are written out; the structured ones
(convolution family, pooling) take the vector-Jacobian product of the forward
lowering with torch.func.vjp — the torch backend is PyTorch's second opinion,
and the generated Triton kernels are checked against PyTorch autograd.
"""
from __future__ import annotations

import math

import torch

from ..ir.types import TensorType
from .base import OPS, Arg, OpDef, ShapeContext

# Forward ops whose input gradient is linear in the weights only: the forward
# input's values are not read, only its shape.
LINEAR_IN_X = ("conv", "local", "tiled", "deconv", "dense")


def _like_input(ctx: ShapeContext) -> list[TensorType]:
    """The gradient of a forward operand: that operand's type."""
    dtype, shape = ctx.attrs["input_type"]
    return [TensorType(dtype, tuple(shape))]


def _like_params(ctx: ShapeContext) -> list[TensorType]:
    return [TensorType("f32", tuple(shape)) for shape in ctx.attrs["param_shapes"]]


def _like_dy(ctx: ShapeContext) -> list[TensorType]:
    return [ctx.inputs[0]]


def _forward(attrs):
    return OPS[attrs["forward"]].torch


def _without_bias(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "bias"}


def _zeros_like_input(attrs, dy):
    dtype, shape = attrs["input_type"]
    return torch.zeros(tuple(int(s) for s in shape), dtype=dy.dtype, device=dy.device)


def _vjp(fn, primals, dy):
    out, pullback = torch.func.vjp(fn, *primals)
    return pullback(dy.to(out.dtype))


# -- the convolution family: input gradient h and weight gradient g ------------------------

def _dx_torch(inputs, attrs, params):
    """h: the transpose of the forward map applied to dy (linear: x's values unused)."""
    dy = inputs[0]
    x0 = _zeros_like_input(attrs, dy)
    fwd, fattrs = _forward(attrs), attrs["fattrs"]
    weights = _without_bias(params)
    (dx,) = _vjp(lambda x: fwd([x], fattrs, weights), (x0,), dy)
    return dx


def _dw_torch(inputs, attrs, params):
    """g: the gradient of each weight role, in attrs["roles"] order."""
    dy, x = inputs
    fwd, fattrs = _forward(attrs), attrs["fattrs"]
    roles = attrs["roles"]
    others = {k: v for k, v in params.items() if k not in roles and k != "bias"}
    start = [params[r].detach() if r in params else None for r in roles]

    def apply(*weights):
        return fwd([x.detach()], fattrs, dict(others, **dict(zip(roles, weights))))

    grads = _vjp(apply, tuple(start), dy)
    return list(grads) if len(grads) > 1 else grads[0]


def _bias_grad_torch(inputs, attrs, params):
    """Sum dy over what the bias is shared across (batch; positions for channel bias)."""
    dy = inputs[0]
    dy = dy.to(torch.promote_types(dy.dtype, torch.float32))  # f16 sums in fp32
    mode = attrs["mode"]
    rank = dy.dim() - 2
    if mode == "channel":
        return dy.sum(dim=[0] + list(range(2, dy.dim())))
    if mode == "location":
        return dy.sum(dim=0)
    tiles = attrs["tiles"]  # tiled: bias [*t, out]; position p feeds tile p mod t
    channels = dy.shape[1]
    index = [torch.arange(o, device=dy.device) % t for o, t in zip(dy.shape[2:], tiles)]
    flat = torch.zeros((), dtype=torch.long, device=dy.device)
    for axis, (idx, t) in enumerate(zip(index, tiles)):  # row-major tile number per position
        flat = flat * t + idx.reshape((-1,) + (1,) * (rank - 1 - axis))
    sums = torch.zeros((math.prod(tiles), channels), dtype=dy.dtype, device=dy.device)
    sums.index_add_(0, flat.reshape(-1), dy.sum(dim=0).reshape(channels, -1).T)
    return sums.reshape(tuple(tiles) + (channels,))


_DX = Arg("dy", "tensor")
# Kernel families of the gradients (convdsl/triton/families); local and tiled share one.
_GRAD_FAMILY = {"conv": "conv", "local": "local", "tiled": "local", "deconv": "deconv",
                "dense": "dense"}

for _op in LINEAR_IN_X:
    OPS.register(OpDef(f"_{_op}_dx", "grad", (_DX,), _like_input, torch=_dx_torch,
                       triton=f"{_GRAD_FAMILY[_op]}_dx",
                       doc=f"input gradient of {_op} (transpose of the forward map)"))
    OPS.register(OpDef(f"_{_op}_dw", "grad", (_DX, Arg("x", "tensor")), _like_params,
                       torch=_dw_torch, results=lambda attrs: len(attrs["roles"]),
                       triton=f"{_GRAD_FAMILY[_op]}_dw",
                       doc=f"weight gradient of {_op} (correlation of input and dy)"))

OPS.register(OpDef("_bias_grad", "grad", (_DX,), _like_params, torch=_bias_grad_torch,
                   triton="bias_grad",
                   doc="bias gradient: dy summed over the positions a bias is shared by"))


# -- pooling --------------------------------------------------------------------------------

def _pool_dx_torch(inputs, attrs, params):
    dy = inputs[0]
    x = inputs[1] if len(inputs) > 1 else _zeros_like_input(attrs, dy)
    fwd, fattrs = _forward(attrs), attrs["fattrs"]
    (dx,) = _vjp(lambda t: fwd([t], fattrs, {}), (x.detach(),), dy)
    return dx


OPS.register(OpDef("_pool_dx", "grad", (_DX, Arg("x", "tensor", None)), _like_input,
                   torch=_pool_dx_torch, triton="pool_dx",
                   doc="pooling input gradient: max routes dy to the argmax, the others "
                       "spread it with the window's weights"))
OPS.register(OpDef("_maxout_dx", "grad", (_DX, Arg("x", "tensor")), _like_input,
                   torch=_pool_dx_torch, triton="maxout_dx",
                   doc="maxout input gradient: dy to each group's argmax"))


# -- activations: dy times the derivative, from the saved input or output -------------------

def _act(fn):
    """fn(dy, saved value, forward attrs)."""
    return lambda inputs, attrs, params: fn(inputs[0], inputs[1].to(inputs[0].dtype),
                                            attrs["fattrs"])


# name → (saved value: "x" or "y", gradient of dy given the saved value).
# Branches test `<= 0` as PyTorch's backward kernels do, so a NaN input passes
# dy through relu and elu as it does in PyTorch.
ACTIVATION_GRADS = {
    "relu": ("y", lambda dy, y, a: torch.where(y <= 0, torch.zeros_like(dy), dy)),
    "sigmoid": ("y", lambda dy, y, a: dy * y * (1 - y)),
    "tanh": ("y", lambda dy, y, a: dy * (1 - y * y)),
    "leaky_relu": ("x", lambda dy, x, a: torch.where(x > 0, dy, dy * a["slope"])),
    "elu": ("x", lambda dy, x, a: torch.where(x <= 0, dy * a["alpha"] * torch.exp(x), dy)),
    "softplus": ("x", lambda dy, x, a: dy * torch.sigmoid(x)),
    "softmax": ("y", lambda dy, y, a: y * (dy - (dy * y).sum(a["axis"], keepdim=True))),
    "log_softmax": ("y", lambda dy, y, a: dy - torch.exp(y) * dy.sum(a["axis"], keepdim=True)),
}

for _name, (_saved, _fn) in ACTIVATION_GRADS.items():
    OPS.register(OpDef(f"_{_name}_dx", "grad", (_DX, Arg(_saved, "tensor")), _like_dy,
                       torch=_act(_fn),
                       triton="softmax_dx" if "softmax" in _name else "elementwise",
                       doc=f"input gradient of {_name}, from its saved {'output' if _saved == 'y' else 'input'}"))


# -- structure ------------------------------------------------------------------------------

OPS.register(OpDef("_reshape", "grad", (_DX,), _like_input,
                   torch=lambda inputs, attrs, params: inputs[0].reshape(
                       tuple(int(s) for s in attrs["input_type"][1])),
                   triton="view", doc="dy reshaped to the forward operand's shape (flatten)"))


def _narrow_shape(ctx: ShapeContext) -> list[TensorType]:
    dy = ctx.inputs[0]
    shape = list(dy.shape)
    shape[ctx.attrs["axis"]] = ctx.attrs["length"]
    return [TensorType(dy.dtype, tuple(shape))]


OPS.register(OpDef("_narrow", "grad", (_DX,), _narrow_shape,
                   torch=lambda inputs, attrs, params: inputs[0].narrow(
                       attrs["axis"], attrs["start"], attrs["length"]),
                   triton="view", doc="the part of dy that belongs to one concat operand"))

OPS.register(OpDef("_zeros", "grad", (Arg("like", "tensor"),), _like_input,
                   torch=lambda inputs, attrs, params: _zeros_like_input(attrs, inputs[0]),
                   triton="view",
                   doc="a zero gradient, for split results nothing reads (`like` gives the device)"))
