"""The pipeline, as one function: parse → build IR → passes → lower → run."""
from __future__ import annotations

from pathlib import Path

import torch

from .builder import build_graph, emit_warnings, pick_net
from .module import CompiledNet
from .parser import parse, read_source
from .passes import run_pipeline, verify

BACKENDS = ("auto", "triton", "torch")


def choose_backend(backend: str) -> str:
    """`auto` means generated Triton kernels where CUDA is available, else PyTorch ops."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if torch.cuda.is_available() else "torch"
    return backend


def compile(source: str | Path, *, net: str | None = None, backend: str = "auto",
            optimize: bool = True) -> CompiledNet:
    """Compile a .cdsl file (a path) or .cdsl source text into a CompiledNet."""
    backend = choose_backend(backend)
    text, filename = read_source(source)
    program = parse(text, filename)                    # text → AST
    net_ast = pick_net(program, net)
    parsed, warnings = build_graph(program, net_ast)   # AST → IR, shapes inferred
    verify(parsed, "building")
    optimized = run_pipeline(parsed) if optimize else parsed   # passes, verified after each
    emit_warnings(warnings)
    return CompiledNet(parsed, optimized, backend, warnings, filename, optimize)  # lowered to torch ops


def load_program(source: str | Path):
    text, filename = read_source(source)
    return parse(text, filename)


__all__ = ["compile", "choose_backend", "load_program", "torch"]
