""".cdsl source text for the numerical tests: Python values as literals, a
one-input net around an expression, a pooling call."""
from __future__ import annotations


def literal(value) -> str:
    """A Python value as a .cdsl literal: 3, 0.5, same, (3, 2), (3,), ((1, 2), (0, 1))."""
    if isinstance(value, (tuple, list)):
        inner = ", ".join(literal(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return str(value)


def one_input_net(expr: str, channels: int, spatial, dtype: str = "f32") -> str:
    """`net T(x: dtype[N, channels, *spatial]) { return expr }`; spatial sizes may be symbols."""
    dims = ", ".join(["N", str(channels)] + [str(s) for s in spatial])
    return f"net T(x: {dtype}[{dims}]) {{\n    return {expr}\n}}\n"


def pool_expr(kind: str, window=None, stride=None, pad=None, output=None, extra: str = "") -> str:
    """A pooling call on x, e.g. `maxpool(x, 3, stride=2, pad=same)`; `extra` is
    appended as written (`p=3`, `sigma=0.7`)."""
    args = ["x"]
    if window is not None:
        args.append(literal(window))
    if stride is not None:
        args.append(f"stride={literal(stride)}")
    if pad is not None:
        args.append(f"pad={literal(pad)}")
    if output is not None:
        args.append(f"output={literal(output)}")
    if extra:
        args.append(extra)
    return f"{kind}({', '.join(args)})"
