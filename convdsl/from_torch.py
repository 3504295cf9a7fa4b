"""Bring a PyTorch `nn.Sequential` over as .cdsl text.

    text, state = convdsl.from_torch(model, input_shape=(8, 3, 32, 32), return_state=True)
    net = convdsl.compile(text)
    net.load_state_dict(state)          # net(x) now equals model(x)

Each layer becomes one statement. A layer with parameters is bound to a name
of its own (`conv1`, `deconv1`, `dense1`, numbered per kind), which is also its
layer name (docs/language.md, "Layer naming"), so its parameters are
`conv1.weight`, `conv1.bias`; every other layer rebinds `h`. A comment on each
line gives the PyTorch module path and the layer. Anything convdsl cannot
express exactly (batch norm, dropout, ceil_mode pooling, padding counted in an
average, ...) is an error naming the layer: a conversion never changes what
the model computes, with one documented exception — PyTorch's LPPool raises x,
not |x|, to the power p, so for an odd or fractional p the two agree only on
non-negative inputs (after a ReLU, say); such a line carries a comment.

torch is imported when the function runs, not with the module: `import
convdsl` stays cheap for the Pygments lexer.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

from .errors import ConvDSLError

_DTYPES = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_SPATIAL_SYMBOLS = {1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


@dataclass(frozen=True)
class _Activation:
    """How an elementwise layer becomes a .cdsl call: its op, the keyword
    arguments read from the layer (attribute, keyword, the keyword's default:
    left out when equal), and the attribute values convdsl's op requires."""

    op: str
    keywords: tuple[tuple[str, str, float], ...] = ()
    required: tuple[tuple[str, float], ...] = ()
    why: str = ""  # the error when a required value differs


# Matched by exact class, so a subclass that computes something else (a
# quantized ReLU6 subclasses ReLU) is refused rather than converted.
_ACTIVATIONS = {
    "ReLU": _Activation("relu"),
    "Sigmoid": _Activation("sigmoid"),
    "Tanh": _Activation("tanh"),
}
# Matched with isinstance.
_PARAMETRIC_ACTIVATIONS = {
    "LeakyReLU": _Activation("leaky_relu", keywords=(("negative_slope", "slope", 0.01),)),
    "ELU": _Activation("elu", keywords=(("alpha", "alpha", 1.0),)),
    "Softplus": _Activation("softplus", required=(("beta", 1), ("threshold", 20)),
                            why="only beta=1, threshold=20 are supported (convdsl's softplus "
                                "is log(1 + exp(x)))"),
}


@dataclass(frozen=True)
class _PoolKind:
    """A windowed pooling layer: its .cdsl op and what convdsl refuses, as
    (test(layer, rank, pad), message formatted with the layer) pairs."""

    op: str
    refusals: tuple = ()


_POOL_KINDS = {  # by PyTorch base class, in torch.nn.modules.pooling
    "_MaxPoolNd": _PoolKind("maxpool", (
        (lambda layer, rank, pad: any(d != 1 for d in _spatial(layer.dilation, rank)),
         "dilation is not supported for pooling"),
        (lambda layer, rank, pad: layer.return_indices, "return_indices=True is not supported"),
    )),
    "_AvgPoolNd": _PoolKind("avgpool", (
        (lambda layer, rank, pad: any(pad) and layer.count_include_pad,
         "convdsl's avgpool does not count padding: use count_include_pad=False"),
        (lambda layer, rank, pad: getattr(layer, "divisor_override", None) is not None,
         "divisor_override is not supported"),
    )),
    "_LPPoolNd": _PoolKind("lppool", (
        (lambda layer, rank, pad: not 0 < float(layer.norm_type) < math.inf,
         "norm_type={layer.norm_type} is not supported"),
    )),
}
_LP_NOTE = "PyTorch raises x (not |x|) to p: equal only for x >= 0"


def _ranked(stem: str) -> tuple[str, ...]:
    """A layer PyTorch has in 1-, 2- and 3-d variants: Conv1d, Conv2d, Conv3d."""
    return tuple(f"{stem}{rank}d" for rank in (1, 2, 3))


SUPPORTED = (
    *_ranked("Conv"), *_ranked("ConvTranspose"), "Linear", "Flatten",
    *_ACTIVATIONS, *_PARAMETRIC_ACTIVATIONS, "Identity",
    *_ranked("MaxPool"), *_ranked("AvgPool"), *_ranked("LPPool"),
    *_ranked("AdaptiveAvgPool"), *_ranked("AdaptiveMaxPool"),
    "Softmax", "LogSoftmax", "Softmax2d", "Sequential",
)


def from_torch(module, input_shape=None, name: str = "Net", *, return_state: bool = False):
    """The .cdsl text of a net equivalent to `module` (an `nn.Sequential`).

    `input_shape` is the input's shape, `(N, C, H, W)` style; each entry is an
    int or a size symbol such as `"H"`. The batch dim is always written `N`
    (any batch size runs) unless given as a symbol. Without it, the shape comes
    from the first convolution or linear layer, with symbolic spatial sizes
    (`L`; `H, W`; `D, H, W`). Fixed sizes are needed where convdsl needs them:
    a `Linear` after `Flatten` of a map whose size depends on the input.

    With `return_state=True` the result is `(text, state)`; `state` is a
    state_dict keyed by the .cdsl layer names, for `CompiledNet.load_state_dict`.
    """
    import torch

    from .parser import KEYWORDS

    if not isinstance(module, torch.nn.Module):
        raise ConvDSLError(f"from_torch takes a torch.nn.Sequential, not {type(module).__name__}")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name in KEYWORDS:
        raise ConvDSLError(f"net name '{name}' is not a valid .cdsl name")
    layers = list(_leaves(module, ""))
    dtype = _dtype(module)
    shape = _input_shape(layers, input_shape)
    writer = _Writer(shape, _record_sizes(layers, shape, dtype))
    for path, layer in layers:
        writer.convert(path, layer)
    text = writer.text(name, dtype, type(module).__name__)
    return (text, writer.state) if return_state else text


# -- walking the model ------------------------------------------------------------------

def _leaves(module, prefix: str):
    """(path, layer) for every layer, nested Sequentials opened, in call order."""
    from torch import nn

    if isinstance(module, nn.Sequential):
        for key, child in module._modules.items():
            if child is not None:
                yield from _leaves(child, f"{prefix}.{key}" if prefix else key)
    else:
        yield prefix or type(module).__name__, module


def _dtype(module) -> str:
    for p in module.parameters():
        found = _DTYPES.get(str(p.dtype).removeprefix("torch."))
        if found is None:
            raise ConvDSLError(f"parameters of dtype {p.dtype} have no .cdsl type; convert the "
                               f"model to float32, float16 or bfloat16 first")
        return found
    return "f32"


def _describe(path: str, layer) -> str:
    return f"{path} ({type(layer).__name__})"


def _unsupported(path: str, layer) -> ConvDSLError:
    return ConvDSLError(f"{_describe(path, layer)} is not supported by from_torch; "
                        f"supported layers: {', '.join(SUPPORTED)}")


@dataclass
class _Shape:
    """What the converter knows of the tensor between layers."""

    dims: list  # the input declaration: batch, channels, spatial (ints or symbols)
    spatial: int | None  # spatial rank; None for a [N, F] tensor
    channels: int | None
    sizes: list = field(default_factory=list)  # spatial sizes; None where they vary


def _input_shape(layers, given) -> _Shape:
    if given is not None:
        dims = list(given)
        if len(dims) < 2 or len(dims) > 5:
            raise ConvDSLError(f"input_shape {tuple(given)} must be (N, C) or (N, C, spatial...) "
                               f"with 1 to 3 spatial dims")
        dims[0] = dims[0] if isinstance(dims[0], str) else "N"
        for d in dims[1:]:
            if not (isinstance(d, str) and re.fullmatch(r"[A-Za-z_]\w*", d)) and not (
                    isinstance(d, int) and d >= 1):
                raise ConvDSLError(f"input_shape entry {d!r} is neither a size nor a symbol")
        if not isinstance(dims[1], int):
            raise ConvDSLError("input_shape: the channel count (dim 1) must be an int")
        spatial = [d if isinstance(d, int) else None for d in dims[2:]]
        return _Shape(dims, len(dims) - 2 if len(dims) > 2 else None, dims[1], spatial)
    from torch import nn

    for path, layer in layers:
        if isinstance(layer, (nn.modules.conv._ConvNd)):
            rank = len(layer.kernel_size)
            dims = ["N", layer.in_channels, *_SPATIAL_SYMBOLS[rank]]
            return _Shape(dims, rank, layer.in_channels, [None] * rank)
        if isinstance(layer, nn.Linear):
            return _Shape(["N", layer.in_features], None, layer.in_features)
        if type(layer).__name__ not in SUPPORTED:
            raise _unsupported(path, layer)
        if not _keeps_shape(layer):
            raise ConvDSLError(f"cannot tell the input shape from {_describe(path, layer)}: "
                               f"pass input_shape=(N, C, ...)")
    raise ConvDSLError("the model has no convolution or linear layer to tell the input shape "
                       "from: pass input_shape=(N, C, ...)")


def _keeps_shape(layer) -> bool:
    name = type(layer).__name__
    return name in _ACTIVATIONS or name in _PARAMETRIC_ACTIVATIONS or name == "Identity"


@functools.cache
def _dispatch() -> tuple:
    """(PyTorch classes, _Writer method) in the order `convert` tries them:
    transpose convolutions before convolutions, which they subclass."""
    from torch import nn

    conv, pooling = nn.modules.conv, nn.modules.pooling
    return (
        (nn.Identity, "_skip"),
        (conv._ConvTransposeNd, "_deconv"),
        (conv._ConvNd, "_conv"),
        (nn.Linear, "_linear"),
        (nn.Flatten, "_flatten"),
        (tuple(getattr(nn, name) for name in _PARAMETRIC_ACTIVATIONS), "_parametric_activation"),
        ((nn.Softmax, nn.LogSoftmax, nn.Softmax2d), "_softmax"),
        ((pooling._AdaptiveAvgPoolNd, pooling._AdaptiveMaxPoolNd), "_adaptive_pool"),
        (tuple(getattr(pooling, base) for base in _POOL_KINDS), "_pool"),
    )


def _record_sizes(layers, shape: _Shape, dtype: str) -> dict[str, list]:
    """Each layer's output spatial sizes, from running the PyTorch layers on
    zeros; empty when the input has symbolic sizes."""
    import torch

    if shape.spatial is None or None in shape.sizes:
        return {}
    torch_dtype = {v: k for k, v in _DTYPES.items()}[dtype]
    x = torch.zeros(1, *shape.dims[1:], dtype=getattr(torch, torch_dtype))
    found = {}
    with torch.no_grad():
        for path, layer in layers:
            try:
                x = layer(x)
            except (RuntimeError, ValueError) as failure:  # the model rejects this shape
                raise ConvDSLError(f"{_describe(path, layer)} fails on the input_shape given: "
                                   f"{failure}") from None
            found[path] = list(x.shape[2:]) if x.dim() > 2 else []
    return found


# -- writing .cdsl ------------------------------------------------------------------------

def _ints(values) -> str:
    """An int when every spatial dim agrees (`3`), else a tuple (`(3, 5)`)."""
    values = tuple(int(v) for v in values)
    return str(values[0]) if len(set(values)) == 1 else "(" + ", ".join(map(str, values)) + ")"


def _number(value: float) -> str:
    if not math.isfinite(value):
        raise ValueError(value)
    return repr(float(value))


def _spatial(value, rank: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank


class _Writer:
    """Turns layers into statements, keeping the shape and the weights."""

    def __init__(self, shape: _Shape, sizes: dict[str, list]):
        self.shape = shape
        self.input_dims = list(shape.dims)
        self.recorded = sizes
        self.lines: list[tuple[str, str]] = []  # (statement, comment)
        self.state: dict = {}
        self.counts: dict[str, int] = {}
        self.current = "x"

    # -- helpers ---------------------------------------------------------------------
    def _fail(self, path, layer, why: str) -> ConvDSLError:
        return ConvDSLError(f"{_describe(path, layer)}: {why}")

    def _emit(self, path, layer, expr: str, binding: str = "h", note: str = "") -> None:
        comment = f"{path}: {type(layer).__name__}"
        self.lines.append((f"{binding} = {expr}", comment + (f"; {note}" if note else "")))
        self.current = binding

    def _layer_name(self, kind: str) -> str:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return f"{kind}{self.counts[kind]}"

    def _keep(self, name: str, layer) -> None:
        for role, value in layer.named_parameters(recurse=False):
            self.state[f"{name}.{role}"] = value.detach().clone()

    def _need_spatial(self, path, layer, rank: int) -> None:
        if self.shape.spatial != rank:
            got = ("a [N, F] tensor" if self.shape.spatial is None
                   else f"a tensor with {self.shape.spatial} spatial dims")
            raise self._fail(path, layer, f"expects {rank} spatial dims but gets {got}")

    def _need_channels(self, path, layer, count: int) -> None:
        if self.shape.channels is not None and self.shape.channels != count:
            what = "features" if self.shape.spatial is None else "channels"
            raise self._fail(path, layer, f"expects {count} {what} but gets "
                                          f"{self.shape.channels}")

    def _sizes_after(self, path, fallback: list) -> None:
        self.shape.sizes = self.recorded.get(path, fallback)

    def _emit_layer(self, kind: str, path, layer, args: list) -> None:
        """A layer with parameters: bound to a name of its own (`conv1`), its
        weights kept under that name."""
        if layer.bias is None:
            args.append("bias=none")
        name = self._layer_name(kind)
        self._keep(name, layer)
        self._emit(path, layer, f"{kind}({', '.join(args)})", binding=name)

    # -- layers ----------------------------------------------------------------------
    def convert(self, path: str, layer) -> None:
        plain = _ACTIVATIONS.get(type(layer).__name__)
        if plain is not None:
            return self._activation(path, layer, plain)
        for classes, method in _dispatch():
            if isinstance(layer, classes):
                return getattr(self, method)(path, layer)
        raise _unsupported(path, layer)

    def _skip(self, path, layer) -> None:
        """nn.Identity: no statement."""

    def _window_layer(self, path, layer) -> tuple[int, list]:
        """The checks and leading arguments convolutions and transpose
        convolutions share: (rank, [input, out, kernel=, stride=])."""
        rank = len(layer.kernel_size)
        self._need_spatial(path, layer, rank)
        self._need_channels(path, layer, layer.in_channels)
        if layer.padding_mode != "zeros":
            raise self._fail(path, layer, f"padding_mode='{layer.padding_mode}' is not "
                                          f"supported (convdsl pads with zeros)")
        args = [self.current, str(layer.out_channels), f"kernel={_ints(layer.kernel_size)}"]
        if any(s != 1 for s in layer.stride):
            args.append(f"stride={_ints(layer.stride)}")
        return rank, args

    @staticmethod
    def _dilation(layer) -> list:
        return [f"dilation={_ints(layer.dilation)}"] if any(d != 1 for d in layer.dilation) else []

    def _conv(self, path, layer) -> None:
        rank, args = self._window_layer(path, layer)
        if layer.padding == "same":  # stride 1: PyTorch's split is TensorFlow's rule too
            args.append("pad=same")
        elif layer.padding != "valid" and any(p != 0 for p in layer.padding):
            args.append(f"pad={_ints(layer.padding)}")
        args += self._dilation(layer)
        if layer.groups != 1:
            args.append(f"groups={layer.groups}")
        self._emit_layer("conv", path, layer, args)
        self.shape.channels = layer.out_channels
        self._sizes_after(path, [None] * rank)

    def _deconv(self, path, layer) -> None:
        rank, args = self._window_layer(path, layer)
        if layer.groups != 1:
            raise self._fail(path, layer, "groups > 1 is not supported (deconv has no groups)")
        # PyTorch crops `padding` from the full transposed output at the start and
        # `padding - output_padding` at the end; convdsl's pairs say exactly that.
        pads, extra = list(layer.padding), list(layer.output_padding)
        after = [p - e for p, e in zip(pads, extra)]
        if any(a < 0 for a in after):
            # The extra positions lie past the full output (bias only): ask for
            # the size, which then has to be known.
            sizes = self.recorded.get(path)
            if sizes is None:
                raise self._fail(path, layer, "output_padding larger than padding needs a fixed "
                                              "input size: pass input_shape with int sizes")
            after = [max(a, 0) for a in after]
        else:
            sizes = None
        if after != pads:
            args.append("pad=(" + ", ".join(f"({p}, {a})" for p, a in zip(pads, after))
                        + ("," if rank == 1 else "") + ")")
        elif any(pads):
            args.append(f"pad={_ints(pads)}")
        if sizes is not None:
            args.append(f"size={_ints(sizes) if rank > 1 else sizes[0]}")
        args += self._dilation(layer)
        self._emit_layer("deconv", path, layer, args)
        self.shape.channels = layer.out_channels
        self._sizes_after(path, [None] * rank)

    def _linear(self, path, layer) -> None:
        if self.shape.spatial is not None:
            raise self._fail(path, layer, "convdsl's dense reads [N, F]: put nn.Flatten() "
                                          "before it")
        if self.shape.channels is None:
            raise self._fail(path, layer, "reads a flattened map whose size depends on the "
                                          "input size: pass input_shape with int sizes, or pool "
                                          "to a fixed size first (nn.AdaptiveAvgPool2d)")
        self._need_channels(path, layer, layer.in_features)
        self._emit_layer("dense", path, layer, [self.current, str(layer.out_features)])
        self.shape.channels = layer.out_features

    def _flatten(self, path, layer) -> None:
        rank = 2 + (self.shape.spatial or 0)
        if layer.start_dim != 1 or layer.end_dim not in (-1, rank - 1):
            raise self._fail(path, layer, "only Flatten(start_dim=1, end_dim=-1) is supported")
        if self.shape.spatial is None:
            return  # [N, F] stays [N, F]
        sizes = self.shape.sizes
        known = self.shape.channels is not None and None not in sizes
        self.shape.channels = self.shape.channels * math.prod(sizes) if known else None
        self.shape.spatial, self.shape.sizes = None, []
        self._emit(path, layer, f"flatten({self.current})")

    def _activation(self, path, layer, spec: _Activation) -> None:
        if any(getattr(layer, attr) != value for attr, value in spec.required):
            raise self._fail(path, layer, spec.why)
        args = [self.current]
        try:
            for attr, keyword, default in spec.keywords:
                value = getattr(layer, attr)
                if value != default:
                    args.append(f"{keyword}={_number(value)}")
        except ValueError:
            raise self._fail(path, layer, "a non-finite parameter has no .cdsl literal") from None
        self._emit(path, layer, f"{spec.op}({', '.join(args)})")

    def _parametric_activation(self, path, layer) -> None:
        from torch import nn

        for name, spec in _PARAMETRIC_ACTIVATIONS.items():
            if isinstance(layer, getattr(nn, name)):
                return self._activation(path, layer, spec)
        raise _unsupported(path, layer)

    def _softmax(self, path, layer) -> None:
        from torch import nn

        op = "log_softmax" if isinstance(layer, nn.LogSoftmax) else "softmax"
        rank = 2 + (self.shape.spatial or 0)
        if isinstance(layer, nn.Softmax2d):
            self._need_spatial(path, layer, 2)
            dim = 1
        elif layer.dim is None:
            dim = 0 if rank in (0, 1, 3) else 1  # PyTorch's implicit choice
        else:
            dim = layer.dim + rank if layer.dim < 0 else layer.dim
        if not 1 <= dim < rank:
            raise self._fail(path, layer, f"normalizes over dim {dim}; convdsl normalizes over "
                                          f"dims 1 to {rank - 1} (not the batch)")
        axis = "" if dim == 1 else f", axis={dim}"
        self._emit(path, layer, f"{op}({self.current}{axis})")

    def _pool(self, path, layer) -> None:
        from torch.nn.modules import pooling

        rank = int(type(layer).__name__[-2])
        self._need_spatial(path, layer, rank)
        if getattr(layer, "ceil_mode", False):
            raise self._fail(path, layer, "ceil_mode=True is not supported")
        window = _spatial(layer.kernel_size, rank)
        stride = _spatial(layer.stride or layer.kernel_size, rank)
        pad = _spatial(getattr(layer, "padding", 0), rank)
        kind = next(kind for base, kind in _POOL_KINDS.items()
                    if isinstance(layer, getattr(pooling, base)))
        for refuses, message in kind.refusals:
            if refuses(layer, rank, pad):
                raise self._fail(path, layer, message.format(layer=layer))
        args = [self.current, _ints(window)]
        if stride != window:
            args.append(f"stride={_ints(stride)}")
        if any(pad):
            args.append(f"pad={_ints(pad)}")
        note = ""
        if kind.op == "lppool":
            p = float(layer.norm_type)
            if p != 2.0:
                args.append(f"p={_number(p)}")
            if not (p.is_integer() and int(p) % 2 == 0):
                note = _LP_NOTE
        self._emit(path, layer, f"{kind.op}({', '.join(args)})", note=note)
        self._sizes_after(path, [None] * rank)

    def _adaptive_pool(self, path, layer) -> None:
        from torch import nn

        rank = int(type(layer).__name__[-2])
        self._need_spatial(path, layer, rank)
        if getattr(layer, "return_indices", False):
            raise self._fail(path, layer, "return_indices=True is not supported")
        output = list(_spatial(layer.output_size, rank))
        for i, size in enumerate(output):
            if size is None:  # PyTorch keeps this dim's size
                if self.shape.sizes[i] is None:
                    raise self._fail(path, layer, "output_size None needs a fixed input size: "
                                                  "pass input_shape with int sizes")
                output[i] = self.shape.sizes[i]
        op = "maxpool" if isinstance(layer, nn.modules.pooling._AdaptiveMaxPoolNd) else "avgpool"
        self._emit(path, layer, f"{op}({self.current}, output={_ints(output)})")
        self.shape.sizes = output

    # -- the file ----------------------------------------------------------------------
    def text(self, name: str, dtype: str, source: str) -> str:
        dims = ", ".join(str(d) for d in self.input_dims)
        width = max([len(s) for s, _ in self.lines] + [0]) + 2
        body = [f"    {s.ljust(width)}# {c}" for s, c in self.lines]
        return "\n".join([f"# Converted from a PyTorch {source} by convdsl.from_torch.",
                          f"net {name}(x: {dtype}[{dims}]) {{", *body,
                          f"    return {self.current}", "}", ""])


__all__ = ["SUPPORTED", "from_torch"]
