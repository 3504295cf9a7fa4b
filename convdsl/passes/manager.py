"""The optimizer: named passes in order, the IR verified after each."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .canonicalize import canonicalize
from .dce import eliminate_dead_code
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
)


def run_pipeline(graph, passes=PIPELINE, after: Callable | None = None):
    """Run passes in order on a copy of `graph`; `after(pass, graph)` sees each result."""
    graph = graph.copy()
    verify(graph, "building")
    for p in passes:
        p.run(graph)
        verify(graph, p.name)
        if after is not None:
            after(p, graph)
    return graph
