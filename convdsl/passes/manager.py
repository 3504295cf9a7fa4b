"""The optimizer: named passes in order, the IR verified after each."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .canonicalize import canonicalize
from .dce import eliminate_dead_code
from .fusion import (
    fuse_backward_epilogue,
    fuse_depthwise_pointwise,
    fuse_epilogue,
    fuse_pooling,
)
from .separable import rewrite_rank1
from .shapes import infer_shapes
from .verify import verify


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable  # graph -> bool (changed)
    doc: str


PIPELINE: tuple[Pass, ...] = (
    Pass("canonicalize", canonicalize, "depthwise → conv(groups=C); pad words → numbers"),
    Pass("infer-shapes", infer_shapes, "re-derive every result type from the op table"),
    Pass("dce", eliminate_dead_code, "drop ops no output needs"),
    Pass("separable-rank1", rewrite_rank1,
         "a frozen conv kernel that is rank-1 (Gaussian, Sobel, box) runs as fused 1-D passes"),
    Pass("fuse-epilogue", fuse_epilogue,
         "conv/deconv/dense/local/tiled absorb the activations and + residual after them"),
    Pass("fuse-depthwise-pointwise", fuse_depthwise_pointwise,
         "depthwise conv → 1×1 conv as one kernel, the depthwise result kept on chip"),
    Pass("fuse-pooling", fuse_pooling,
         "conv (+ epilogue) → pooling as one kernel: the pre-pool map never reaches memory"),
)

# Passes over a derived backward graph (autodiff.derive_backward).
BACKWARD_PIPELINE: tuple[Pass, ...] = (
    Pass("fuse-backward-epilogue", fuse_backward_epilogue,
         "an input gradient (pooling, conv, dense) absorbs the activation derivative after it"),
)


def run_pipeline(graph, passes=PIPELINE, after: Callable | None = None):
    """Run passes in order on a copy of `graph`; `after(pass, graph)` sees each result."""
    graph = graph.copy()
    verify(graph, "building")
    for p in passes:
        _run_one(p, graph)
        if after is not None:
            after(p, graph)
    return graph


def _run_one(p: Pass, graph) -> None:
    """One pass, the IR verified after it; CONVDSL_LOG=passes says what it did."""
    from .. import log

    before = len(graph.nx) if log.enabled("passes") else 0
    changed = p.run(graph)
    verify(graph, p.name)
    log.emit("passes", lambda: f"{graph.name}: {p.name}: "
             + (f"changed ({before} -> {len(graph.nx)} nodes)" if changed else "no change"))


def run_backward_pipeline(graph, passes=BACKWARD_PIPELINE, after: Callable | None = None):
    """The backward graph's passes, in place (its inputs and outputs keep their ids)."""
    for p in passes:
        _run_one(p, graph)
        if after is not None:
            after(p, graph)
    return graph


@dataclass(frozen=True)
class PassStep:
    name: str
    changed: bool
    text: str  # the IR after the pass
    diff: str  # unified diff against the IR before it


def trace_passes(net, format: str = "text") -> list[PassStep]:
    """Every pass of both pipelines on `net`'s parsed graph, with the IR after
    each and a diff against the IR before it (`convdsl ir --print-after`)."""
    import difflib

    from ..autodiff import derive_backward
    from ..ir.printer import FORMATS

    show = FORMATS[format]
    steps: list[PassStep] = []
    before = [show(net._graphs["parsed"])]

    def record(p, graph):
        text = show(graph)
        diff = "".join(difflib.unified_diff(before[0].splitlines(True), text.splitlines(True),
                                            "before " + p.name, "after " + p.name, n=1))
        steps.append(PassStep(p.name, text != before[0], text, diff))
        before[0] = text

    optimized = run_pipeline(net._graphs["parsed"], after=record)
    backward = derive_backward(optimized, ())
    before[0] = show(backward.graph)
    run_backward_pipeline(backward.graph, after=record)
    return steps
